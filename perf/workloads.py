"""What each workload does, and the inputs every worker precomputes.

Every implementation runs the same calls on the same inputs (random pages
and ranges from the same seed).  Clients follow QEMU's use: vCPU writes
dirty MIGRATION (set_dirty_flag, set_dirty_pages), DMA dirties VGA and
MIGRATION (set_dirty_range with DIRTY_CLIENTS_NOCODE), the display tests and
clears VGA, KVM's log merges into VGA and MIGRATION (no CODE: tcg=False),
migration syncs MIGRATION.

Bulk workloads (set_dirty_lebitmap, sync_dirty_bitmap) split the guest into
one slice per worker; one op is one call over the worker's whole slice.
Their untimed reset puts the slice back before every call, so every call
does the same work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .registry import (
    BUSY_READER,
    DIRTY_CLIENTS_NOCODE,
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_VGA,
    RCU_LOCK,
    RCU_MICRO_OPS,
    RCU_QS_RAW,
    RCU_QUIESCENT,
    RCU_RAW_ATOMIC,
    RCU_SECTION,
    Cell,
)

ONES = (1 << 64) - 1
CYCLE = 1 << 16  # random inputs per worker, reused cyclically


@dataclass(frozen=True)
class OpSpec:
    name: str
    what: str              # one line for the report and docs
    chunk: int             # calls per timed chunk (qsbr: quiescent() after each chunk)
    clean: tuple[int, ...] = ()  # clients whose bitmap must start clean
    dirty: tuple[int, ...] = ()  # clients whose bitmap must start dirty
    bulk: bool = False     # one call covers the worker's slice of the guest
    patterns: tuple[str | None, ...] = (None,)


_VGA, _MIG = DIRTY_MEMORY_VGA, DIRTY_MEMORY_MIGRATION

OPS: dict[str, OpSpec] = {
    s.name: s
    for s in (
        OpSpec("set_dirty_flag", "one random page, MIGRATION", chunk=64, clean=(_MIG,)),
        OpSpec("set_dirty_range", "random range of range_pages pages, VGA|MIGRATION",
               chunk=64, clean=(_VGA, _MIG)),
        OpSpec("get_dirty", "random range of range_pages clean pages, VGA", chunk=64,
               clean=(_VGA,)),
        OpSpec("test_and_clear_dirty", "random range of range_pages pages, VGA "
               "(starts all dirty)", chunk=64, dirty=(_VGA,)),
        OpSpec("set_dirty_pages", "a batch of batch_pages random pages, MIGRATION",
               chunk=1, clean=(_MIG,)),
        OpSpec("set_dirty_lebitmap", "the worker's slice as a KVM bitmap into VGA and "
               "MIGRATION (cleared, untimed, before each call)", chunk=1, bulk=True,
               patterns=("dense", "sparse")),
        OpSpec("sync_dirty_bitmap", "the worker's slice of MIGRATION (1 % dirtied, untimed, "
               "before each call) into a private bitmap, counting new pages", chunk=1,
               bulk=True, clean=(_MIG,), patterns=("sparse",)),
        OpSpec(BUSY_READER, "get_dirty_flag of a random page in a section of its own "
               "(memb) or followed by quiescent() (qsbr) (RCU micro only)", chunk=64),
        OpSpec(RCU_SECTION, "an empty `with dm.read_section()` (RCU micro only)", chunk=64),
        OpSpec(RCU_LOCK, "dm.rcu.read_lock(); dm.rcu.read_unlock() (RCU micro only)",
               chunk=64),
        OpSpec(RCU_QUIESCENT, "qsbr dm.quiescent() (RCU micro only)", chunk=64),
        OpSpec(RCU_QS_RAW, "qsbr dm.rcu.quiescent() (RCU micro only)", chunk=64),
        OpSpec(RCU_RAW_ATOMIC, "atomic.fetch_add on a Words.ptr pointer (RCU micro only)",
               chunk=64),
    )
}

PATTERNS = {
    "dense": "half the words all ones, in runs of 64 words (sequential writes)",
    "sparse": "1 % of pages at random",
}

# Clients of each workload (the C program and every implementation agree).
FLAG_CLIENT = DIRTY_MEMORY_MIGRATION
RANGE_MASK = DIRTY_CLIENTS_NOCODE
DISPLAY_CLIENT = DIRTY_MEMORY_VGA
LEBITMAP_CLIENTS = (DIRTY_MEMORY_VGA, DIRTY_MEMORY_MIGRATION)


@dataclass
class Work:
    """One worker's inputs.  Addresses are bytes (ram_addr_t), pages are numbers."""

    index: int
    workers: int
    page_bits: int
    guest_pages: int
    range_pages: int
    range_bytes: int
    cycle: int = 1                      # the harness cycles j over [0, cycle)
    pages: list[int] = field(default_factory=list)   # random pages
    addrs: list[int] = field(default_factory=list)   # the same, as addresses
    starts: list[int] = field(default_factory=list)  # range starts, pages
    start_addrs: list[int] = field(default_factory=list)
    batches: list[Any] = field(default_factory=list)  # uint64 page arrays
    slice_page: int = 0                 # bulk: first page of this worker's slice
    slice_pages: int = 0
    slice_start: int = 0                # bytes
    slice_bytes: int = 0
    lebitmap: Any = None                # uint64 LE bitmap of the slice
    lebitmap_pages: int = 0             # popcount of lebitmap
    dest: Any = None                    # sync: uint64, indexed by global page


def pages_per_op(cell: Cell) -> int:
    op = cell.op
    if op == "set_dirty_flag" or op in RCU_MICRO_OPS:
        return 1
    if op == "set_dirty_pages":
        return cell.batch_pages
    if OPS[op].bulk:
        return slice_pages(cell)
    return cell.range_pages


def slice_pages(cell: Cell) -> int:
    """Pages of one worker's slice: the guest split evenly, whole words."""
    per = (cell.guest_bytes >> cell.page_bits) // cell.workers
    return per - per % 64


def make_work(cell: Cell, index: int) -> Work:
    """Build worker ``index``'s inputs for ``cell`` (not timed)."""
    rng = np.random.default_rng([cell.seed, index])
    guest_pages = cell.guest_bytes >> cell.page_bits
    w = Work(index=index, workers=cell.workers, page_bits=cell.page_bits,
             guest_pages=guest_pages, range_pages=cell.range_pages,
             range_bytes=cell.range_pages << cell.page_bits)
    spec = OPS[cell.op]
    if spec.bulk:
        n = slice_pages(cell)
        w.slice_page = index * n
        w.slice_pages = n
        w.slice_start = w.slice_page << cell.page_bits
        w.slice_bytes = n << cell.page_bits
        w.lebitmap = pattern(cell.pattern or "sparse", n // 64, rng)
        w.lebitmap_pages = popcount_sum(w.lebitmap)
        if cell.op == "sync_dirty_bitmap":
            w.dest = np.zeros((w.slice_page + n) // 64, dtype=np.uint64)
            if index:  # a vCPU writer in shmdirty's sync cells: pages of its own slice
                pages = w.slice_page + rng.integers(0, n, CYCLE, dtype=np.int64)
                w.pages = pages.tolist()
                w.addrs = (pages << cell.page_bits).tolist()
    elif cell.op == "set_dirty_pages":
        w.batches = [rng.integers(0, guest_pages, cell.batch_pages, dtype=np.uint64)
                     for _ in range(16)]
        w.cycle = len(w.batches)
    elif cell.op in RCU_MICRO_OPS and cell.op != BUSY_READER:
        pass  # no inputs
    elif cell.op in ("set_dirty_flag", BUSY_READER):
        pages = rng.integers(0, guest_pages, CYCLE, dtype=np.int64)
        w.pages = pages.tolist()
        w.addrs = (pages << cell.page_bits).tolist()
        w.cycle = CYCLE
    else:
        starts = rng.integers(0, guest_pages - cell.range_pages + 1, CYCLE, dtype=np.int64)
        w.starts = starts.tolist()
        w.start_addrs = (starts << cell.page_bits).tolist()
        w.cycle = CYCLE
    return w


def pattern(kind: str, nwords: int, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """A little-endian uint64 bitmap of ``nwords`` words (see PATTERNS)."""
    if kind == "dense":
        k = np.arange(nwords)
        return np.where((k // 64) % 2 == 0, np.uint64(ONES), np.uint64(0)).astype(np.uint64)
    if kind == "sparse":
        bm = np.zeros(nwords, dtype=np.uint64)
        pages = rng.integers(0, nwords * 64, max(1, nwords * 64 // 100), dtype=np.uint64)
        np.bitwise_or.at(bm, pages >> np.uint64(6), np.uint64(1) << (pages & np.uint64(63)))
        return bm
    raise ValueError(f"unknown pattern {kind!r}; known: {', '.join(PATTERNS)}")


def popcount_sum(a: np.ndarray[Any, Any]) -> int:
    """Set bits in a uint64 array."""
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(a).sum())
    return int(np.unpackbits(np.ascontiguousarray(a).view(np.uint8)).sum())


# --- plain numpy bit ranges (the lock baseline runs these under its lock) ---
BIT = [np.uint64(1 << i) for i in range(64)]


def _lo(b: int) -> int:
    """Mask of bits [0, b)."""
    return (1 << b) - 1


def set_range(words: np.ndarray[Any, Any], first: int, end: int) -> None:
    """Set bits [first, end) of ``words`` (plain stores)."""
    w0, b0 = divmod(first, 64)
    w1, b1 = divmod(end, 64)
    if w0 == w1:
        words[w0] |= np.uint64(_lo(b1) ^ _lo(b0))
        return
    if b0:
        words[w0] |= np.uint64(ONES ^ _lo(b0))
        w0 += 1
    if w1 > w0:
        words[w0:w1] = ONES
    if b1:
        words[w1] |= np.uint64(_lo(b1))


def any_in_range(words: np.ndarray[Any, Any], first: int, end: int) -> bool:
    """Is any bit of [first, end) set?"""
    w0, b0 = divmod(first, 64)
    w1, b1 = divmod(end, 64)
    if w0 == w1:
        return bool(int(words[w0]) & (_lo(b1) ^ _lo(b0)))
    if b0:
        if int(words[w0]) & (ONES ^ _lo(b0)):
            return True
        w0 += 1
    if w1 > w0 and words[w0:w1].any():
        return True
    return bool(b1 and int(words[w1]) & _lo(b1))


def test_and_clear_range(words: np.ndarray[Any, Any], first: int, end: int) -> bool:
    """Clear bits [first, end); return whether any was set (plain loads/stores)."""
    dirty = False
    for w, m in word_spans(first, end):
        if m == ONES:
            continue
        old = int(words[w])
        if old & m:
            dirty = True
            words[w] = old & ~m & ONES
    w0, b0 = divmod(first, 64)
    w1 = end // 64
    full0 = w0 + (1 if b0 else 0)
    if w1 > full0:
        mid = words[full0:w1]
        if mid.any():
            dirty = True
            mid[:] = 0
    return dirty


def word_spans(first: int, end: int) -> list[tuple[int, int]]:
    """(word, mask) for every word bits [first, end) touch; full words get ONES."""
    w0, b0 = divmod(first, 64)
    w1, b1 = divmod(end, 64)
    if w0 == w1:
        return [(w0, _lo(b1) ^ _lo(b0))] if b1 > b0 else []
    out = []
    if b0:
        out.append((w0, ONES ^ _lo(b0)))
        w0 += 1
    out.extend((w, ONES) for w in range(w0, w1))
    if b1:
        out.append((w1, _lo(b1)))
    return out
