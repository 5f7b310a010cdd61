"""This process's view of the published table: the table a handle uses,
its block mappings, and the section entry that keeps both current.

``TableView`` is what a DirtyMemory handle knows of the published table
(the base of DirtyMemory); its public methods are what dirty.py, take.py,
retired.py and coordinator.py call on it: sections (``begin_section``,
``end_section``, ``enter_range``), the table (``refresh``, ``load_table``,
``set_table``, ``invalidate``), block mappings (``block``, ``map_block``,
``block_segment``, ``unmap_blocks``), the block walk (``walk``, ``over``)
and the range checks (``page_of``, ``reaching``): ``INTERFACE``.  These are
also the seams tests hook (trio's "a hook that acts at just the wrong
moment"), by name, never a private method.

Invariants, kept here:

- A view uses the table it read inside a read-side section; a memb reader
  re-reads the generation when its outermost section begins and the
  grace-period counter moved, a qsbr reader at its quiescent points.  A
  table seen by a reader therefore exists, and its blocks are live, until
  the reader leaves.
- Newer tables only add RAM, so moving to the newest table is always safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from . import atomic, bitmap, layout
from .bitmap import Block
from .clients import DIRTY_MEMORY_NUM, as_index
from .errors import BadInput, CorruptSegment
from .rcu import Closed, Local, Rcu, Reader
from .segment import Segment
from .table import EMPTY, Table, attach_part, published_tag, read_table

TAG_TRIES = 1000   # a table name's tag re-read while the coordinator keeps publishing


class Section:
    """The context manager of DirtyMemory.read_section(): a plain class, not
    a generator, so a section costs little more than its two atomics."""

    __slots__ = ("_view",)

    def __init__(self, view: TableView) -> None:
        self._view = view

    def __enter__(self) -> None:
        self._view.begin_section()

    def __exit__(self, *exc: object) -> None:
        self._view.end_section()


#: The view's interface: what dirty.py, take.py, retired.py and
#: coordinator.py call on a handle's view (a closed handle refuses each).
INTERFACE = ("begin_section", "end_section", "enter_range", "refresh", "load_table",
             "set_table", "invalidate", "block", "map_block", "block_segment", "unmap_blocks",
             "walk", "over", "page_of", "reaching")


class TableView(atomic.VIEW_BASE):  # type: ignore[misc]
    """The table a handle uses, its block mappings and its section entry.

    The base of DirtyMemory (a base class, not a member: the accessors' hot
    path reads these fields straight off ``self``).  Its public methods are
    the interface of dirty.py, take.py, retired.py and coordinator.py (the
    module doc lists them); tests hook them by these names.  Where the
    kernel was built its own base is the C ViewCore (shmdirty/_kernel_src/):
    ``_seen``, ``_blocks``, ``_local``, ``_table``, ``page_bits`` and
    ``block_pages`` are stored there, and its ``set_dirty_flag`` reads them."""

    name: str
    page_bits: int
    page_size: int
    block_pages: int
    tcg: bool
    max_readers: int
    # Set by DirtyMemory (tests change them on a handle); read by take.py:
    swap_min_words: int        # whole blocks with this many dirty words are swapped
    # Invariant (the bounded swap, take.SwapTake): no take waits longer than
    # this for a grace period; past it the retired blocks are taken word by
    # word and wait in retired.Retired for their give-back.
    swap_grace_budget: float   # how long a swap waits for its grace period (s)

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
        self._header = header   # its H_TABLE_TAGS name the published tables
        # This thread's Reader is ``self._local.reader`` (one threading.local
        # lookup per op: readers are per thread, rcu.py); a thread's first op
        # makes it through ``self._rcu.reader``.
        # Once the handle is closed both are the closed stand-in (handles.CLOSED).
        self._rcu: Rcu | Closed = rcu
        self._local: Local | Closed = rcu._local
        # The table is shared by the handle's threads and only moves forward
        # (set_table, under _view_lock).  That is safe for every thread: a
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
    def begin_section(self, r: Reader | None = None) -> Table:
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
                self.refresh()
            except BaseException:
                r.read_unlock()
                raise
            self._seen = r.seen
        return self._table

    def end_section(self, r: Reader | None = None) -> None:
        (self._local.reader if r is None else r).read_unlock()

    def quiescent(self) -> None:
        """qsbr: a quiescent point; the table is re-read if it may have moved
        (where a qsbr reader's view catches up, besides begin_section)."""
        try:
            r = self._local.reader
        except AttributeError:
            r = self._rcu.reader   # this thread's first use
        # Only while online (inside a section): a table read outside one may
        # be unlinked before it is attached.  Offline, the next op catches up.
        if (r.quiescent() or r.seen != self._seen) and r.online:
            self.refresh()
            self._seen = r.seen
        if self._rcu.gp.pending:
            self._rcu.gp.run_callbacks()

    def invalidate(self) -> None:
        """Re-read the generation at the next section."""
        self._seen = -1

    def refresh(self) -> Table:
        """Move to the newest table (always safe: newer tables only add)."""
        g = atomic.load(self._gen_ptr, atomic.SEQ_CST)
        if g != self._table.generation:
            self.load_table(g)
        return self._table

    def load_table(self, g: int) -> None:
        """Read the table of generation ``g`` and use it (the one place a
        view reads a table segment: tests hook it to act at that moment).
        Its name's random part is in the header; if two publications
        overwrote it since ``g`` was loaded, the newest table is used."""
        for _ in range(TAG_TRIES):
            tag = published_tag(self._header, g)
            if tag is not None:
                self.set_table(read_table(self.name, g, tag))
                return
            # seq_cst: as refresh() (the Dekker pair with publish).
            g = atomic.load(self._gen_ptr, atomic.SEQ_CST)
        raise CorruptSegment(layout.header_name(self.name),
                             f"records no name for the table of generation {g}")

    def set_table(self, t: Table) -> None:
        with self._view_lock:
            if t.generation < self._table.generation:
                return  # another thread moved further already: keep the newer
            mapped = self._mapped
            self._blocks = [[mapped[b][0] if b in mapped else None for b in ids]
                            for ids in t.block_ids]
            self._table = t

    # --- block mappings -----------------------------------------------------------------
    def block(self, client: int, idx: int) -> Block:
        b = self._blocks[client][idx]
        if b is None:
            bid = self._table.block_ids[client][idx]
            b = self.map_block(bid)
            # Mapping frees the GIL: another thread may have moved the view
            # to a newer table, which may hold a fresh block here (a swap).
            # Filed only where the current table names it; the caller's
            # section still covers the table it read, so it may use ``b``.
            with self._view_lock:
                if self._table.block_ids[client][idx] == bid:
                    self._blocks[client][idx] = b
        return b

    def map_block(self, block_id: int, seg: Segment | None = None) -> Block:
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

    def block_segment(self, block_id: int) -> Segment:
        self.map_block(block_id)
        return self._mapped[block_id][1]

    def unmap_blocks(self, block_ids: list[int] | None = None) -> None:
        """Unmap ``block_ids`` (every block when None); tables never list them again."""
        ids = list(self._mapped) if block_ids is None else block_ids
        for bid in ids:
            m = self._mapped.pop(bid, None)
            if m is not None:
                m[1].close()
        if block_ids is None:
            self._blocks = []

    # --- ranges -------------------------------------------------------------------------
    def reaching(self, t: Table, lo: int, end: int, what: str, pages: bool = False,
                 holes: bool = False) -> Table:
        """A table whose RAM holds bytes [lo, end): ``t``, or the newest (a
        qsbr reader's table may be behind); BadInput about ``what`` if none,
        giving RAM in pages if ``what`` counts pages, else in bytes.
        Callers test ``t`` inline first: this is the slow path."""
        if not _inside(t, lo, end, holes):
            t = self.refresh()
            if not _inside(t, lo, end, holes):
                # A hole (a removed RAM block) is outside RAM like the space
                # past its end (table.Table's invariant): the same error.
                listed = "" if t.ram_prefix == t.ram_size else (
                    f"; RAM blocks (offset, size): "
                    f"{[(hex(o), hex(s)) for o, s in t.ram_blocks]}")
                if pages:
                    raise BadInput(f"{what} is outside guest RAM: pages "
                                   f"[0, {t.ram_size >> self.page_bits}) "
                                   f"({t.ram_size:#x} bytes){listed}")
                raise BadInput(f"{what} is outside guest RAM [0, {t.ram_size:#x}){listed}")
        return t

    def _range(self, t: Table, start: Any, length: Any,
               holes: bool = False) -> tuple[Table, int, int]:
        """The page range [page, end) of (start, length), checked against RAM
        (with ``holes``, only against [0, ram_size): sync takes RAM pages only)."""
        if (start.__class__ is int and length.__class__ is int and 0 <= start
                and 0 < length <= t.ram_prefix - start):
            # The common case, checked without the conversions below.
            return t, start >> self.page_bits, -(-(start + length) >> self.page_bits)
        start = as_index(start, "start")
        length = as_index(length, "length")
        if length < 0:
            raise BadInput(f"length {length} is negative")
        if start < 0 or start + length > t.ram_size or not (
                holes or t.covers(start, start + length)):
            t = self.reaching(t, start, start + length,
                              f"range [{start:#x}, {start:#x}+{length:#x})", holes=holes)
        page = start >> self.page_bits
        if length == 0:
            return t, page, page  # an empty range, even inside a page, covers no page
        return t, page, -(-(start + length) >> self.page_bits)

    def enter_range(self, start: Any, length: Any,
                    holes: bool = False) -> tuple[Table, int, int]:
        """Enter a section and check (start, length) in it: the opening of
        every range accessor.  The caller leaves with ``end_section()``; on bad
        input the section is left here.  (``begin_section`` written in: one call
        less per op.)  With ``holes`` a range over a hole is accepted (the
        caller walks ``Table.ram_runs``)."""
        try:
            r = self._local.reader
        except AttributeError:
            r = self._rcu.reader   # this thread's first op
        r.read_lock()
        try:
            if r.seen != self._seen:
                self.refresh()
                self._seen = r.seen
            return self._range(self._table, start, length, holes)
        except BaseException:
            r.read_unlock()
            raise

    def page_of(self, t: Table, addr: Any) -> int:
        a = as_index(addr, "address")
        if not 0 <= a < t.ram_prefix:
            self.reaching(t, a, a + 1, f"address {a:#x}")
        return a >> self.page_bits

    def walk(self, page: int, end: int) -> Iterator[tuple[int, int, int]]:
        return bitmap.walk(page, end, self.block_pages)

    def over(self, op: int, client: int, page: int, end: int) -> int:
        """bitmap.walk_blocks over pages [page, end) of ``client``: one call
        (one C call on the kernel), after mapping any block it names.  The
        list is read again after each mapping: while one maps (the GIL is
        free) another thread may move the view to a newer table (always
        safe to use), whose new list is where the block went."""
        while (r := bitmap.walk_blocks(self._blocks[client], page, end, self.block_pages,
                                       op)) < 0:
            self.block(client, -1 - r)
        return r


def _inside(t: Table, lo: int, end: int, holes: bool) -> bool:
    """Bytes [lo, end) inside guest RAM (with ``holes``: inside [0, ram_size])."""
    return 0 <= lo and end <= t.ram_size if holes else t.covers(lo, end)
