"""The Python baselines: ``lock`` and ``atomics-api``.

``lock`` is the world before the seed's patch: one numpy uint64 bitmap
(rows VGA, CODE, MIGRATION) in one shared segment, every access behind one
``multiprocessing.Lock``.  Hot-plug grows it the old way: under the lock,
allocate a bigger segment, copy, publish its generation in a control
segment, unlink the old one; workers notice the generation under the lock
and remap.

``atomics-api`` has the same flat bitmap and no lock: every word access is
one op through the ``atomics`` package's public ``atomicview`` API with a
view made per op (``shmdirty.atomic``'s ``public`` backend).  It has no way
to grow (that needs RCU or a lock), so it has no hot-plug variant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .internals import Segment, atomic, layout, unlink_segment
from .registry import (
    DIRTY_MEMORY_NUM,
    Cell,
    Created,
    Impl,
    register_impl,
    reset,
    workload,
)
from .workloads import (
    BIT,
    DISPLAY_CLIENT,
    FLAG_CLIENT,
    LEBITMAP_CLIENTS,
    ONES,
    OPS,
    RANGE_MASK,
    Work,
    any_in_range,
    popcount_sum,
    set_range,
    test_and_clear_range,
    word_spans,
)

DATA = layout.PREFIX_BYTES  # bitmap words start after the segment prefix
RANGE_CLIENTS = tuple(c for c in range(DIRTY_MEMORY_NUM) if RANGE_MASK >> c & 1)
SEQ = atomic.SEQ_CST
ONE = np.uint64(1)
SIX = np.uint64(6)
LOW6 = np.uint64(63)


def _words_for(cell_bytes: int, page_bits: int) -> int:
    pages = cell_bytes >> page_bits
    return (pages + 63) // 64


def _bitmap_segment(name: str, nwords: int) -> Segment:
    seg = Segment.create(name, DATA + 8 * DIRTY_MEMORY_NUM * nwords, layout.KIND_BLOCK,
                         arg0=nwords)
    seg.seal()
    return seg


def _rows(seg: Segment, nwords: int) -> list[np.ndarray[Any, Any]]:
    a = seg.array(DATA, DIRTY_MEMORY_NUM * nwords).reshape(DIRTY_MEMORY_NUM, nwords)
    return [a[c] for c in range(DIRTY_MEMORY_NUM)]


def _fill(rows: list[np.ndarray[Any, Any]], dirty: tuple[int, ...]) -> None:
    """A new bitmap is all clean; make the clients of ``dirty`` all dirty."""
    for c in dirty:
        rows[c][:] = ONES


# =============================================================================
# lock
# =============================================================================
class _LockParent:
    """The creator's side of the lock baseline: owns the segments, grows."""

    def __init__(self, stem: str, nwords: int, page_bits: int, lock: Any) -> None:
        self.stem = stem
        self.page_bits = page_bits
        self.lock = lock
        self.gen = 0
        self.nwords = nwords
        self.ctl = Segment.create(f"{stem}-ctl", DATA + 16, layout.KIND_TABLE)
        # ctl[0]: generation of the current bitmap segment, ctl[1]: its words.
        # Written and read only under the lock (the lock orders them).
        self.ctl_words = self.ctl.array(DATA, 2)
        self.seg = _bitmap_segment(self.seg_name(0), nwords)
        self.ctl_words[:] = (0, nwords)
        self.ctl.seal()

    def seg_name(self, gen: int) -> str:
        return f"{self.stem}-bm{gen}"

    def grow(self, new_bytes: int) -> None:
        new_words = _words_for(new_bytes, self.page_bits)
        if new_words <= self.nwords:
            return
        with self.lock:  # the whole allocate-and-copy, as before the patch
            new = _bitmap_segment(self.seg_name(self.gen + 1), new_words)
            old_rows = _rows(self.seg, self.nwords)
            new_rows = _rows(new, new_words)
            for c in range(DIRTY_MEMORY_NUM):
                new_rows[c][: self.nwords] = old_rows[c]
            del old_rows, new_rows
            old, self.seg = self.seg, new
            self.gen += 1
            self.nwords = new_words
            self.ctl_words[:] = (self.gen, new_words)
            unlink_segment(old.name)
            old.close()

    def close(self) -> None:
        self.ctl_words = None  # type: ignore[assignment]
        for seg in (self.seg, self.ctl):
            unlink_segment(seg.name)
            seg.close()


class LockState:
    """A worker's view of the lock baseline.  ``rows()`` must be called with
    the lock held: it remaps when the creator has grown the bitmap."""

    tick = None

    def __init__(self, handle: dict[str, Any], lock: Any) -> None:
        self.lock = lock
        self.stem = handle["stem"]
        self.ctl = Segment.attach(f"{self.stem}-ctl", layout.KIND_TABLE, DATA + 16)
        self.ctl_words = self.ctl.array(DATA, 2)
        self.gen = -1
        self.seg: Segment | None = None
        self.clients: list[np.ndarray[Any, Any]] = []
        with lock:
            self.rows()

    def rows(self) -> list[np.ndarray[Any, Any]]:
        if self.ctl_words[0] != self.gen:
            self._remap()
        return self.clients

    def _remap(self) -> None:
        gen, nwords = (int(x) for x in self.ctl_words)
        seg = Segment.attach(f"{self.stem}-bm{gen}", layout.KIND_BLOCK,
                             DATA + 8 * DIRTY_MEMORY_NUM * nwords)
        self.clients = _rows(seg, nwords)
        old, self.seg, self.gen = self.seg, seg, gen
        if old is not None:
            old.close()

    def close(self) -> None:
        self.clients = []
        self.ctl_words = None  # type: ignore[assignment]
        if self.seg is not None:
            self.seg.close()
        self.ctl.close()


class LockImpl(Impl):
    name = "lock"
    grows = True

    def create(self, cell: Cell, lock: Any) -> Created:
        parent = _LockParent(cell.stem, _words_for(cell.guest_bytes, cell.page_bits),
                             cell.page_bits, lock)
        return Created(handle={"stem": cell.stem}, obj=parent)

    def prepare(self, created: Created, clean: tuple[int, ...], dirty: tuple[int, ...]) -> None:
        p: _LockParent = created.obj
        with p.lock:
            _fill(_rows(p.seg, p.nwords), dirty)

    def grow(self, created: Created, new_bytes: int) -> None:
        created.obj.grow(new_bytes)

    def destroy(self, created: Created) -> None:
        created.obj.close()

    def open(self, handle: Any, lock: Any) -> LockState:
        return LockState(handle, lock)


register_impl(LockImpl())


@workload("set_dirty_flag", "lock")
def _lock_flag(s: LockState, w: Work, j: int, n: int) -> int:
    lock = s.lock
    for p in w.pages[j:j + n]:
        with lock:
            s.rows()[FLAG_CLIENT][p >> 6] |= BIT[p & 63]
    return n


@workload("set_dirty_range", "lock")
def _lock_range(s: LockState, w: Work, j: int, n: int) -> int:
    r = w.range_pages
    for p in w.starts[j:j + n]:
        with s.lock:
            rows = s.rows()
            for c in RANGE_CLIENTS:
                set_range(rows[c], p, p + r)
    return n


@workload("get_dirty", "lock")
def _lock_get(s: LockState, w: Work, j: int, n: int) -> int:
    r = w.range_pages
    for p in w.starts[j:j + n]:
        with s.lock:
            any_in_range(s.rows()[DISPLAY_CLIENT], p, p + r)
    return n


@workload("test_and_clear_dirty", "lock")
def _lock_tac(s: LockState, w: Work, j: int, n: int) -> int:
    r = w.range_pages
    for p in w.starts[j:j + n]:
        with s.lock:
            test_and_clear_range(s.rows()[DISPLAY_CLIENT], p, p + r)
    return n


@workload("set_dirty_pages", "lock")
def _lock_pages(s: LockState, w: Work, j: int, n: int) -> int:
    for b in w.batches[j:j + n]:
        idx, bits = b >> SIX, ONE << (b & LOW6)
        with s.lock:
            np.bitwise_or.at(s.rows()[FLAG_CLIENT], idx, bits)
    return n


def _slice(w: Work) -> slice:
    return slice(w.slice_page // 64, (w.slice_page + w.slice_pages) // 64)


@workload("set_dirty_lebitmap", "lock")
def _lock_lebitmap(s: LockState, w: Work, j: int, n: int) -> int:
    sl = _slice(w)
    with s.lock:
        rows = s.rows()
        for c in LEBITMAP_CLIENTS:
            rows[c][sl] |= w.lebitmap
    return 1


@reset("set_dirty_lebitmap", "lock")
def _lock_lebitmap_reset(s: LockState, w: Work) -> None:
    sl = _slice(w)
    with s.lock:
        rows = s.rows()
        for c in LEBITMAP_CLIENTS:
            rows[c][sl] = 0


@workload("sync_dirty_bitmap", "lock")
def _lock_sync(s: LockState, w: Work, j: int, n: int) -> int:
    # Before the seed's patch the whole sync (migration_bitmap_sync) ran
    # under the iothread lock: take the words (copy + zero: nobody else can
    # touch them while we hold the lock), OR them into the migration bitmap
    # and count the new pages, all in numpy, all under the lock.
    sl = _slice(w)
    with s.lock:
        src = s.rows()[FLAG_CLIENT][sl]
        bits = src.copy()
        src[:] = 0
        dest = w.dest[sl]
        new = popcount_sum(bits & ~dest)
        dest |= bits
    _check_sync(w, new)
    return 1


@reset("sync_dirty_bitmap", "lock")
def _lock_sync_reset(s: LockState, w: Work) -> None:
    w.dest[:] = 0
    with s.lock:
        s.rows()[FLAG_CLIENT][_slice(w)] |= w.lebitmap


def _check_sync(w: Work, got: int) -> None:
    """Every bit the reset set is new to the zeroed destination."""
    if got != w.lebitmap_pages:
        raise AssertionError(f"sync_dirty_bitmap counted {got} new pages, "
                             f"expected {w.lebitmap_pages}")


# =============================================================================
# atomics-api
# =============================================================================
class AtomicsApiState:
    """The flat bitmap, each word reached through the public API."""

    tick = None

    def __init__(self, handle: dict[str, Any], lock: Any) -> None:
        self.nwords = handle["nwords"]
        self.seg = Segment.attach(handle["name"], layout.KIND_BLOCK,
                                  DATA + 8 * DIRTY_MEMORY_NUM * self.nwords)
        self._previous = atomic.backend.name
        self.api = atomic.use_backend("public")  # switched back by close()
        base = self.seg.words.base + DATA
        # row pointers: a word's pointer is row[c] + 8 * word
        self.row = [base + 8 * self.nwords * c for c in range(DIRTY_MEMORY_NUM)]
        self.clients = _rows(self.seg, self.nwords)  # plain reads and untimed resets

    def close(self) -> None:
        atomic.use_backend(self._previous)
        self.clients = []
        self.row = []
        self.seg.close()


class AtomicsApiImpl(Impl):
    name = "atomics-api"

    def skip(self, cell: Cell, quick: bool) -> str | None:
        if quick and OPS[cell.op].bulk:
            return ("atomics-api: bulk workloads skipped under --quick (seconds per call "
                    "through the public API); run without --quick")
        return super().skip(cell, quick)

    def create(self, cell: Cell, lock: Any) -> Created:
        nwords = _words_for(cell.guest_bytes, cell.page_bits)
        seg = _bitmap_segment(f"{cell.stem}-bm", nwords)
        return Created(handle={"name": seg.name, "nwords": nwords}, obj=seg)

    def prepare(self, created: Created, clean: tuple[int, ...], dirty: tuple[int, ...]) -> None:
        _fill(_rows(created.obj, created.handle["nwords"]), dirty)

    def destroy(self, created: Created) -> None:
        unlink_segment(created.obj.name)
        created.obj.close()

    def open(self, handle: Any, lock: Any) -> AtomicsApiState:
        return AtomicsApiState(handle, lock)


register_impl(AtomicsApiImpl())


@workload("set_dirty_flag", "atomics-api")
def _api_flag(s: AtomicsApiState, w: Work, j: int, n: int) -> int:
    fetch_or, row = s.api.fetch_or, s.row[FLAG_CLIENT]
    for p in w.pages[j:j + n]:
        fetch_or(row + ((p >> 6) << 3), 1 << (p & 63), SEQ)
    return n


def _api_set_span(s: AtomicsApiState, c: int, first: int, end: int) -> None:
    """QEMU's bitmap_set_atomic: or the edge words, store full words, fence."""
    row, last_rmw = s.row[c], False
    for word, m in word_spans(first, end):
        if m == ONES:
            s.api.store(row + 8 * word, ONES, atomic.RELAXED)
            last_rmw = False
        else:
            s.api.fetch_or(row + 8 * word, m, SEQ)
            last_rmw = True
    if not last_rmw:
        atomic.fence()


@workload("set_dirty_range", "atomics-api")
def _api_range(s: AtomicsApiState, w: Work, j: int, n: int) -> int:
    r = w.range_pages
    for p in w.starts[j:j + n]:
        for c in RANGE_CLIENTS:
            _api_set_span(s, c, p, p + r)
    return n


@workload("get_dirty", "atomics-api")
def _api_get(s: AtomicsApiState, w: Work, j: int, n: int) -> int:
    load, row, r = s.api.load, s.row[DISPLAY_CLIENT], w.range_pages
    for p in w.starts[j:j + n]:
        for word, m in word_spans(p, p + r):
            if load(row + 8 * word, atomic.RELAXED) & m:
                break
    return n


@workload("test_and_clear_dirty", "atomics-api")
def _api_tac(s: AtomicsApiState, w: Work, j: int, n: int) -> int:
    api, row, r = s.api, s.row[DISPLAY_CLIENT], w.range_pages
    for p in w.starts[j:j + n]:
        for word, m in word_spans(p, p + r):
            if m == ONES:
                api.exchange(row + 8 * word, 0, SEQ)
            else:
                api.fetch_and(row + 8 * word, ONES ^ m, SEQ)
    return n


@workload("set_dirty_pages", "atomics-api")
def _api_pages(s: AtomicsApiState, w: Work, j: int, n: int) -> int:
    fetch_or, row = s.api.fetch_or, s.row[FLAG_CLIENT]
    for b in w.batches[j:j + n]:
        for p in b.tolist():
            fetch_or(row + ((p >> 6) << 3), 1 << (p & 63), SEQ)
    return n


@workload("set_dirty_lebitmap", "atomics-api")
def _api_lebitmap(s: AtomicsApiState, w: Work, j: int, n: int) -> int:
    fetch_or, w0 = s.api.fetch_or, w.slice_page // 64
    nz = np.flatnonzero(w.lebitmap)
    values = w.lebitmap[nz].tolist()
    rows = [s.row[c] for c in LEBITMAP_CLIENTS]
    for k, v in zip(nz.tolist(), values, strict=True):
        off = 8 * (w0 + k)
        for row in rows:
            fetch_or(row + off, v, SEQ)
    return 1


@reset("set_dirty_lebitmap", "atomics-api")
def _api_lebitmap_reset(s: AtomicsApiState, w: Work) -> None:
    for c in LEBITMAP_CLIENTS:  # untimed, and no other worker touches this slice
        s.clients[c][_slice(w)] = 0


@workload("sync_dirty_bitmap", "atomics-api")
def _api_sync(s: AtomicsApiState, w: Work, j: int, n: int) -> int:
    exchange, row, w0 = s.api.exchange, s.row[FLAG_CLIENT], w.slice_page // 64
    dest, count = w.dest, 0
    # A plain read picks the words worth an exchange, as the seed's loop does.
    for k in np.flatnonzero(s.clients[FLAG_CLIENT][_slice(w)]).tolist():
        bits = exchange(row + 8 * (w0 + k), 0, SEQ)
        if bits:
            d = int(dest[w0 + k])
            count += (bits & ~d).bit_count()
            dest[w0 + k] = d | bits
    _check_sync(w, count)
    return 1


@reset("sync_dirty_bitmap", "atomics-api")
def _api_sync_reset(s: AtomicsApiState, w: Work) -> None:
    w.dest[:] = 0
    s.clients[FLAG_CLIENT][_slice(w)] |= w.lebitmap

