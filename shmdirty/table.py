"""One generation's block table: page geometry, the table segment, and this
process's view of the current table.

A table segment (layout.py, ``T_*``) is immutable once its generation is
published: for every client the ids of its blocks, the RAM size, and the
RAM blocks.  ``read_table`` is its one reader and ``write_table`` its one
writer.  ``TableView`` is what a DirtyMemory handle knows of the published
table: the table it uses, its block mappings (one dict, block id -> mapped
block), and the section entry that keeps both current.

Invariants, kept here:

- A view uses the table it read inside a read-side section; a memb reader
  re-reads the generation when its outermost section begins and the
  grace-period counter moved, a qsbr reader at its quiescent points.  A
  table seen by a reader therefore exists, and its blocks are live, until
  the reader leaves.
- Newer tables only add RAM, so moving to the newest table is always safe.
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import atomic, bitmap, layout, segment
from .bitmap import Block
from .errors import BadInput, CorruptSegment, MapNotFound
from .rcu import Rcu
from .segment import Segment

DIRTY_MEMORY_VGA = 0
DIRTY_MEMORY_CODE = 1
DIRTY_MEMORY_MIGRATION = 2
DIRTY_MEMORY_NUM = 3
DIRTY_CLIENTS_ALL = (1 << DIRTY_MEMORY_NUM) - 1
DIRTY_CLIENTS_NOCODE = DIRTY_CLIENTS_ALL & ~(1 << DIRTY_MEMORY_CODE)
DIRTY_MEMORY_BLOCK_SIZE = 256 * 1024 * 8

MAX_BLOCKS = 1 << 16        # blocks per client: bounds the table and the segment count
U64 = np.dtype(np.uint64)


# --- input checks shared by the accessors and the coordinator ---------------------
def as_index(value: Any, what: str) -> int:
    """``value`` as a Python int (not a bool); BadInput naming ``what``."""
    if isinstance(value, (bool, np.bool_)):
        raise BadInput(f"{what} must be an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise BadInput(f"{what} must be an integer, not {type(value).__name__}") from None


def as_words(bits: Any, what: str) -> tuple[np.ndarray[Any, np.dtype[np.uint64]], int]:
    """A uint64 array from a uint64 array or little-endian bytes, and how
    many bits the caller gave."""
    if isinstance(bits, np.ndarray):
        if bits.dtype != U64 or bits.ndim != 1:
            raise BadInput(f"{what} must be a 1-D uint64 array, not {bits.ndim}-D {bits.dtype}")
        return np.ascontiguousarray(bits), len(bits) * 64   # a strided view is copied
    if isinstance(bits, (bytes, bytearray, memoryview)):
        raw = bytes(bits)
        nbits = len(raw) * 8
        raw += b"\0" * (-len(raw) % 8)
        return np.frombuffer(raw, dtype="<u8").astype(np.uint64), nbits
    raise BadInput(f"{what} must be a uint64 numpy array or bytes, not {type(bits).__name__}")


def check_client(client: Any) -> int:
    if client.__class__ is int and 0 <= client < DIRTY_MEMORY_NUM:
        return client
    c = as_index(client, "client")
    if not 0 <= c < DIRTY_MEMORY_NUM:
        raise BadInput(f"client {c} is not one of 0 (VGA), 1 (CODE), 2 (MIGRATION)")
    return c


def check_mask(mask: Any) -> int:
    m = as_index(mask, "mask")
    if not 0 <= m <= DIRTY_CLIENTS_ALL:
        raise BadInput(f"client mask {m:#x} is not in [0, {DIRTY_CLIENTS_ALL:#x}]")
    return m


def check_geometry(page_bits: Any, block_pages: Any, max_readers: Any,
                   ram_size: Any) -> tuple[int, int, int, int]:
    """DirtyMemory.create()'s arguments, checked; BadInput naming the bad one."""
    page_bits = as_index(page_bits, "page_bits")
    if not 6 <= page_bits <= 30:
        raise BadInput(f"page_bits {page_bits} is not in [6, 30]")
    block_pages = as_index(block_pages, "block_pages")
    if block_pages <= 0 or block_pages % 64 or block_pages > 1 << 32:
        raise BadInput(f"block_pages {block_pages} must be a positive multiple of 64, "
                       "at most 2**32")
    max_readers = as_index(max_readers, "max_readers")
    if not 1 <= max_readers <= 4096:
        raise BadInput(f"max_readers {max_readers} is not in [1, 4096]")
    ram_size = as_index(ram_size, "ram_size")
    if ram_size < 0 or ram_size % (1 << page_bits):
        raise BadInput(f"ram_size {ram_size:#x} must be a non-negative multiple of the "
                       f"page size {1 << page_bits:#x}")
    return page_bits, block_pages, max_readers, ram_size


def clients_of(mask: int) -> list[int]:
    return [c for c in range(DIRTY_MEMORY_NUM) if mask >> c & 1]


# --- block counts and placement ---------------------------------------------------------
def blocks_needed(ram_size: int, page_bits: int, block_pages: int) -> int:
    """Blocks per client that cover ``ram_size`` bytes; BadInput past MAX_BLOCKS."""
    need = -(-(ram_size >> page_bits) // block_pages)
    if need > MAX_BLOCKS:
        raise BadInput(f"RAM size {ram_size:#x} needs {need} blocks of {block_pages} "
                       f"pages; at most {MAX_BLOCKS} are supported")
    return need


def find_ram_offset(blocks: list[tuple[int, int]], size: int) -> int:
    """QEMU's find_ram_offset: the smallest gap between RAM blocks that fits
    ``size`` (the space before the first block counts), else the end."""
    best, best_gap = None, None
    prev_end = 0
    for off, sz in sorted(blocks):
        gap = off - prev_end
        if gap >= size and (best_gap is None or gap < best_gap):
            best, best_gap = prev_end, gap
        prev_end = max(prev_end, off + sz)
    return prev_end if best is None else best


# --- the table and its segment ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Table:
    """One generation's table, copied out of its (immutable) segment."""

    generation: int
    ram_size: int
    block_ids: tuple[tuple[int, ...], ...]      # per client
    ram_blocks: tuple[tuple[int, int], ...]     # (offset, size), by offset

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids[0])


EMPTY = Table(0, 0, ((),) * DIRTY_MEMORY_NUM, ())


def attach_part(map_name: str, seg_name: str, kind: int, min_size: int) -> Segment:
    """Map a table or block segment of ``map_name``.  MapNotFound if the
    whole map is gone (destroyed under an attached handle: its header is
    unlinked too), else CorruptSegment if the segment is missing or bad."""
    try:
        return Segment.attach(seg_name, kind, min_size)
    except CorruptSegment:
        if not os.path.exists(os.path.join(segment.SHM_DIR, layout.header_name(map_name))):
            raise MapNotFound(map_name) from None
        raise


def read_table(map_name: str, generation: int) -> Table:
    """Copy the table of ``generation`` out of its segment; MapNotFound if
    the map is gone, CorruptSegment if the table is missing or inconsistent."""
    seg = attach_part(map_name, layout.table_name(map_name, generation), layout.KIND_TABLE,
                      layout.T_BLOCK_IDS)
    try:
        w = seg.words
        # The table is immutable once published (its generation store is a
        # release after these words): relaxed loads.
        ram_size = w.load(layout.T_RAM_SIZE, atomic.RELAXED)
        nb = w.load(layout.T_NUM_BLOCKS, atomic.RELAXED)
        nr = w.load(layout.T_NUM_RAM_BLOCKS, atomic.RELAXED)
        need = layout.table_size(DIRTY_MEMORY_NUM, nb, nr)
        if nb > MAX_BLOCKS or seg.size < need:
            raise CorruptSegment(seg.name, f"holds {nb} blocks, {nr} RAM blocks: needs "
                                 f"{need} bytes, has {seg.size}")
        ids = seg.array(layout.T_BLOCK_IDS, DIRTY_MEMORY_NUM * nb).tolist()
        ram = seg.array(layout.T_BLOCK_IDS + 8 * DIRTY_MEMORY_NUM * nb, 2 * nr).tolist()
    finally:
        seg.close()
    return Table(generation, ram_size,
                 tuple(tuple(ids[c * nb:(c + 1) * nb]) for c in range(DIRTY_MEMORY_NUM)),
                 tuple(zip(ram[0::2], ram[1::2], strict=True)))


def write_table(map_name: str, t: Table) -> None:
    """Create and seal the segment of ``t`` (not yet published: the caller
    stores the generation).  FileExistsError if the name is taken; on any
    other failure nothing is left behind."""
    name = layout.table_name(map_name, t.generation)
    flat = [b for ids in t.block_ids for b in ids]
    seg = Segment.create(name, layout.table_size(DIRTY_MEMORY_NUM, t.num_blocks,
                                                 len(t.ram_blocks)),
                         layout.KIND_TABLE, t.generation)
    try:
        w = seg.words
        # Nobody reads the table before its seal (a release): relaxed stores.
        w.store(layout.T_RAM_SIZE, t.ram_size, atomic.RELAXED)
        w.store(layout.T_NUM_BLOCKS, t.num_blocks, atomic.RELAXED)
        w.store(layout.T_NUM_RAM_BLOCKS, len(t.ram_blocks), atomic.RELAXED)
        body = seg.array(layout.T_BLOCK_IDS, len(flat) + 2 * len(t.ram_blocks))
        body[:len(flat)] = flat
        body[len(flat):] = [x for blk in t.ram_blocks for x in blk]
        del body
        seg.seal()
    except BaseException:
        seg.close()
        segment.unlink(name)
        raise
    seg.close()


# --- this process's view of the current table ---------------------------------------------
class TableView(atomic.VIEW_BASE):  # type: ignore[misc]
    """The table a handle uses, its block mappings and its section entry.

    The base of DirtyMemory (a base class, not a member: the accessors' hot
    path reads these fields straight off ``self``).  Its ``_`` methods are
    the interface of dirty.py and coordinator.py, not of users.  Where the
    kernel was built its own base is the C ViewCore (shmdirty/_kernel_src/):
    ``_seen``, ``_blocks``, ``_local``, ``_table``, ``page_bits`` and
    ``block_pages`` are stored there, and its ``set_dirty_flag`` reads them."""

    name: str
    page_bits: int
    page_size: int
    block_pages: int
    tcg: bool
    max_readers: int
    swap_grace_budget: float   # set by DirtyMemory; read by the coordinator's swap

    def _init_view(self, name: str, header: Segment, rcu: Rcu) -> None:
        self.name = name
        w = header.words
        # The geometry is immutable after creation: relaxed loads.
        self.page_bits = w.load(layout.H_PAGE_BITS, atomic.RELAXED)
        self.page_size = 1 << self.page_bits
        self.block_pages = w.load(layout.H_BLOCK_PAGES, atomic.RELAXED)
        self.tcg = bool(w.load(layout.H_TCG, atomic.RELAXED))
        self.max_readers = w.load(layout.H_MAX_READERS, atomic.RELAXED)
        self._gen_ptr = w.ptr(layout.H_GENERATION)
        # This thread's Reader is ``self._local.reader`` (one threading.local
        # lookup per op: readers are per thread, rcu.py); a thread's first op
        # makes it through ``self._rcu.reader``.
        self._rcu: Any = rcu
        self._local: Any = rcu._local
        # The table is shared by the handle's threads and only moves forward
        # (_set_table, under _view_lock).  That is safe for every thread: a
        # thread uses it only inside its own section, after checking that
        # the counter it saw there equals the ``_seen`` that was stored after
        # a refresh made at that counter; a newer table is always safe.
        self._view_lock = threading.Lock()
        self._seen = -1  # the reader's counter value this view's table is checked against
        self._table = EMPTY
        # Per client, per table index: the mapped block (None until first use).
        self._blocks: list[list[Block | None]] = [[] for _ in range(DIRTY_MEMORY_NUM)]
        # Every block this view has mapped, by id, with its segment.
        self._mapped: dict[int, tuple[Block, Segment]] = {}

    @property
    def table(self) -> Table:
        """The table this process uses now."""
        return self._table

    # --- sections ---------------------------------------------------------------------
    def _begin(self, r: Any = None) -> Table:
        """Enter a read-side section of this thread (``r``: its Reader, if the
        caller has it at hand); return the table to use in it.

        The generation is re-read only when the grace-period counter moved
        since this view last looked: the coordinator advances it after
        every publication, and a table published but not yet followed by an
        advance is one a grace period will still wait for us on."""
        if r is None:
            try:
                r = self._local.reader
            except AttributeError:
                r = self._rcu.reader   # this thread's first op
        r.read_lock()
        if r.seen != self._seen:
            try:
                self._refresh()
            except BaseException:
                r.read_unlock()
                raise
            self._seen = r.seen
        return self._table

    def _end(self, r: Any = None) -> None:
        (self._local.reader if r is None else r).read_unlock()

    def _invalidate(self) -> None:
        """Re-read the generation at the next section."""
        self._seen = -1

    def _refresh(self) -> Table:
        """Move to the newest table (always safe: newer tables only add)."""
        g = atomic.load(self._gen_ptr, atomic.SEQ_CST)
        if g != self._table.generation:
            self._load_table(g)
        return self._table

    def _load_table(self, g: int) -> None:
        self._set_table(read_table(self.name, g))

    def _set_table(self, t: Table) -> None:
        with self._view_lock:
            if t.generation < self._table.generation:
                return  # another thread moved further already: keep the newer
            mapped = self._mapped
            self._blocks = [[mapped[b][0] if b in mapped else None for b in ids]
                            for ids in t.block_ids]
            self._table = t

    # --- block mappings -----------------------------------------------------------------
    def _block(self, client: int, idx: int) -> Block:
        b = self._blocks[client][idx]
        if b is None:
            bid = self._table.block_ids[client][idx]
            b = self._map_block(bid)
            # Mapping frees the GIL: another thread may have moved the view
            # to a newer table, which may hold a fresh block here (a swap).
            # Filed only where the current table names it; the caller's
            # section still covers the table it read, so it may use ``b``.
            with self._view_lock:
                if self._table.block_ids[client][idx] == bid:
                    self._blocks[client][idx] = b
        return b

    def _map_block(self, block_id: int, seg: Segment | None = None) -> Block:
        """The mapped block ``block_id`` (attached on first use, or ``seg``)."""
        m = self._mapped.get(block_id)
        if m is not None:
            return m[0]
        if seg is None:
            seg = attach_part(self.name, layout.block_name(self.name, block_id),
                              layout.KIND_BLOCK, layout.block_size(self.block_pages))
        b = Block(block_id, seg.array(layout.B_WORDS, self.block_pages // 64),
                  seg.words.base + layout.B_WORDS)
        # setdefault (one step under the GIL): of two threads mapping the
        # same block at once, one mapping is kept and the other closed.
        m = self._mapped.setdefault(block_id, (b, seg))
        if m[1] is not seg:
            del b
            seg.close()
        return m[0]

    def _block_segment(self, block_id: int) -> Segment:
        self._map_block(block_id)
        return self._mapped[block_id][1]

    def _unmap_blocks(self, block_ids: list[int] | None = None) -> None:
        """Unmap ``block_ids`` (every block when None); tables never list them again."""
        ids = list(self._mapped) if block_ids is None else block_ids
        for bid in ids:
            m = self._mapped.pop(bid, None)
            if m is not None:
                m[1].close()
        if block_ids is None:
            self._blocks = []

    # --- ranges -------------------------------------------------------------------------
    def _reaching(self, t: Table, lo: int, end: int, what: str, pages: bool = False) -> Table:
        """A table whose RAM holds bytes [lo, end): ``t``, or the newest (a
        qsbr reader's table may be behind); BadInput about ``what`` if none,
        giving RAM in pages if ``what`` counts pages, else in bytes.
        Callers test ``t`` inline first: this is the slow path."""
        if lo < 0 or end > t.ram_size:
            t = self._refresh()
            if lo < 0 or end > t.ram_size:
                if pages:
                    raise BadInput(f"{what} is outside guest RAM: pages "
                                   f"[0, {t.ram_size >> self.page_bits}) "
                                   f"({t.ram_size:#x} bytes)")
                raise BadInput(f"{what} is outside guest RAM [0, {t.ram_size:#x})")
        return t

    def _range(self, t: Table, start: Any, length: Any) -> tuple[Table, int, int]:
        """The page range [page, end) of (start, length), checked against RAM."""
        if (start.__class__ is int and length.__class__ is int and 0 <= start
                and 0 < length <= t.ram_size - start):
            # The common case, checked without the conversions below.
            return t, start >> self.page_bits, -(-(start + length) >> self.page_bits)
        start = as_index(start, "start")
        length = as_index(length, "length")
        if length < 0:
            raise BadInput(f"length {length} is negative")
        if start < 0 or start + length > t.ram_size:
            t = self._reaching(t, start, start + length,
                               f"range [{start:#x}, {start:#x}+{length:#x})")
        page = start >> self.page_bits
        if length == 0:
            return t, page, page  # an empty range, even inside a page, covers no page
        return t, page, -(-(start + length) >> self.page_bits)

    def _enter_range(self, start: Any, length: Any) -> tuple[Table, int, int]:
        """Enter a section and check (start, length) in it: the opening of
        every range accessor.  The caller leaves with ``_end()``; on bad
        input the section is left here.  (``_begin`` written in: one call
        less per op.)"""
        try:
            r = self._local.reader
        except AttributeError:
            r = self._rcu.reader   # this thread's first op
        r.read_lock()
        try:
            if r.seen != self._seen:
                self._refresh()
                self._seen = r.seen
            return self._range(self._table, start, length)
        except BaseException:
            r.read_unlock()
            raise

    def _page(self, t: Table, addr: Any) -> int:
        a = as_index(addr, "address")
        if not 0 <= a < t.ram_size:
            self._reaching(t, a, a + 1, f"address {a:#x}")
        return a >> self.page_bits

    def _walk(self, page: int, end: int) -> Iterator[tuple[int, int, int]]:
        return bitmap.walk(page, end, self.block_pages)

    def _over(self, op: int, client: int, page: int, end: int) -> int:
        """bitmap.walk_blocks over pages [page, end) of ``client``: one call
        (one C call on the kernel), after mapping any block it names.  The
        list is read again after each mapping: while one maps (the GIL is
        free) another thread may move the view to a newer table (always
        safe to use), whose new list is where the block went."""
        while (r := bitmap.walk_blocks(self._blocks[client], page, end, self.block_pages,
                                       op)) < 0:
            self._block(client, -1 - r)
        return r
