"""DirtyMemory: a map's lifecycle and the seed's dirty-memory accessors.

Shared state (names in layout.py):

- the header: page geometry, the published table ``generation``, the
  grace-period counter and the reader slots;
- one immutable table segment per generation (table.py);
- one segment per (client, block) holding ``block_pages`` bits (bitmap.py).

Every accessor runs inside a read-side section over the table it read
there (table.TableView, the base of DirtyMemory); what only the coordinator
does lives in coordinator.py, and the coordinator methods here are one-line
delegations to it.  Each process copies a table into Python lists when it
first sees it and caches its block mappings, so an op touches shared memory
only for the grace-period counter (memb) and the bitmap words themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from . import atomic, bitmap, layout, segment
from .coordinator import SWAP_MIN_WORDS, Coordinator, Shared, create_map
from .errors import BadInput, CorruptSegment, ShmDirtyError
from .rcu import FLAVORS, Rcu, my_owner_word
from .segment import Segment
from .snapshot import DirtySnapshot
from .table import (
    DIRTY_CLIENTS_ALL,
    DIRTY_CLIENTS_NOCODE,
    DIRTY_MEMORY_BLOCK_SIZE,
    DIRTY_MEMORY_CODE,
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_NUM,
    DIRTY_MEMORY_VGA,
    MAX_BLOCKS,
    U64,
    Table,
    TableView,
    as_index,
    as_words,
    check_client,
    check_geometry,
    check_mask,
    clients_of,
    find_ram_offset,
)

__all__ = ["DIRTY_CLIENTS_ALL", "DIRTY_CLIENTS_NOCODE", "DIRTY_MEMORY_BLOCK_SIZE",
           "DIRTY_MEMORY_CODE", "DIRTY_MEMORY_MIGRATION", "DIRTY_MEMORY_NUM",
           "DIRTY_MEMORY_VGA", "MAX_BLOCKS", "SWAP_MIN_WORDS", "DirtyMemory", "DirtySnapshot",
           "Table", "find_ram_offset"]

_RELEASE = atomic.RELEASE
_index, _client, _mask, _clients = as_index, check_client, check_mask, clients_of


class _Shared:
    """What every handle of one map in this process shares: the header
    mapping, the one reader slot (one slot per process), and the
    coordinator's state (coordinating is per process)."""

    def __init__(self, header: Segment, rcu: Rcu) -> None:
        self.header = header
        self.rcu = rcu
        self.refs = 0
        self.coord = Shared()


_shared: dict[str, _Shared] = {}
_shared_lock = threading.Lock()


class DirtyMemory(TableView):
    """A dirty-memory map in shared memory (README.md, "The library")."""

    #: What the coordinator methods delegate to; a subclass may swap in its
    #: own (tests do, to show a broken publication or swap is caught).
    coordinator_class: type[Coordinator] = Coordinator

    # --- construction ---------------------------------------------------------
    def __init__(self, name: str, shared: _Shared) -> None:
        """Use create(), attach() or adopt()."""
        rcu = shared.rcu
        self._init_view(name, shared.header, rcu.reader)
        self._shared = shared
        self._rcu: Any = rcu
        self.flavor = rcu.flavor
        hdr = shared.header.words
        self._coord_ptr = hdr.ptr(layout.H_COORD)
        self._ram_ptr = hdr.ptr(layout.H_RAM_SIZE)
        self._coordinator = self.coordinator_class(self, rcu, shared.header, shared.coord)
        self._section = _Section(self)
        self._set_bit = atomic.backend.bit_test_set_raw
        # Whole blocks with at least this many dirty words are taken by a
        # block swap and a grace period rather than word by word (coordinator).
        self.swap_min_words = SWAP_MIN_WORDS
        self._closed = False
        self._begin()  # the first table
        self._end()

    @classmethod
    def create(cls, ram_size: int = 0, *, page_bits: int = 12,
               block_pages: int = DIRTY_MEMORY_BLOCK_SIZE, max_readers: int = 64,
               tcg: bool = False, name: str | None = None) -> DirtyMemory:
        """Create a map; the caller becomes its coordinator.  ``ram_size`` > 0
        adds [0, ram_size) as the first RAM block."""
        page_bits, block_pages, max_readers, ram_size = check_geometry(
            page_bits, block_pages, max_readers, ram_size)
        name = layout.new_map_name() if name is None else layout.check_map_name(name)
        hdr = create_map(name, page_bits, block_pages, max_readers, tcg)
        dm = cls._open(name, hdr, "memb")
        if ram_size:
            try:
                dm.ram_block_add(ram_size)
            except BaseException:
                dm.destroy()
                raise
        return dm

    @classmethod
    def attach(cls, name: str, *, flavor: str = "memb") -> DirtyMemory:
        """Attach to an existing map as a reader/writer of ``flavor``."""
        if flavor not in FLAVORS:
            raise BadInput(f"flavor {flavor!r} is not one of {FLAVORS}")
        name = layout.check_map_name(name)
        with _shared_lock:
            sh = _shared.get(name)
            if sh is not None:
                if sh.rcu.flavor != flavor:
                    raise BadInput(f"this process already reads map {name} as {sh.rcu.flavor}")
                return cls._new(name, sh)
        hdr = Segment.attach(layout.header_name(name), layout.KIND_HEADER, layout.HEADER_FIXED)
        readers = hdr.words.load(layout.H_MAX_READERS, atomic.RELAXED)
        if hdr.size < layout.header_size(readers):
            hdr.close()
            raise CorruptSegment(hdr.name, f"is {hdr.size} bytes, too small for "
                                 f"{readers} reader slots")
        return cls._open(name, hdr, flavor)

    @classmethod
    def _open(cls, name: str, hdr: Segment, flavor: str) -> DirtyMemory:
        readers = hdr.words.load(layout.H_MAX_READERS, atomic.RELAXED)
        with _shared_lock:
            try:
                sh = _shared[name] = _Shared(hdr, Rcu(hdr, readers, flavor))
            except BaseException:
                hdr.close()
                raise
            return cls._new(name, sh)

    @classmethod
    def _new(cls, name: str, sh: _Shared) -> DirtyMemory:
        # Called with _shared_lock held.
        sh.refs += 1
        try:
            return cls(name, sh)
        except BaseException:
            cls._drop(name, sh)
            raise

    @staticmethod
    def _drop(name: str, sh: _Shared) -> None:
        sh.refs -= 1
        if sh.refs == 0:
            _shared.pop(name, None)
            sh.rcu.unregister()
            sh.header.close()

    @classmethod
    def adopt(cls, name: str) -> DirtyMemory:
        """Become the coordinator of ``name`` if its coordinator is dead (or
        has left).  NotCoordinator if it is alive or another process won."""
        name = layout.check_map_name(name)
        with _shared_lock:
            sh = _shared.get(name)
        # A process that reads the map already adopts in the flavor it reads in.
        dm = cls.attach(name, flavor="memb" if sh is None else sh.rcu.flavor)
        try:
            dm._coordinator.adopt()
        except BaseException:
            dm.close()
            raise
        return dm

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickle, (self.name, self.flavor))

    # --- properties -----------------------------------------------------------
    def _open_check(self) -> None:
        # The header's words are unmapped once the last handle closes.
        if self._closed:
            raise ShmDirtyError(f"this handle of map {self.name} is closed")

    @property
    def rcu(self) -> Rcu:
        """This process's RCU reader and grace periods for the map."""
        self._open_check()
        return self._rcu  # type: ignore[no-any-return]

    @property
    def ram_size(self) -> int:
        """The published RAM size (end of the last RAM block), in bytes."""
        self._open_check()
        # acquire: pairs with the coordinator's release after publishing.
        return atomic.load(self._ram_ptr, atomic.ACQUIRE)

    @property
    def is_coordinator(self) -> bool:
        self._open_check()
        return atomic.load(self._coord_ptr, atomic.ACQUIRE) == my_owner_word()

    @property
    def generation(self) -> int:
        """The published table generation."""
        self._open_check()
        return atomic.load(self._gen_ptr, atomic.SEQ_CST)

    def ram_blocks(self) -> list[tuple[int, int]]:
        """(offset, size) of every RAM block, as of the current table."""
        with self.read_section():
            return list(self._table.ram_blocks)

    # --- sections ---------------------------------------------------------------
    def read_section(self) -> _Section:
        """``with dm.read_section():`` one read-side section around many ops."""
        return self._section

    def __enter__(self) -> DirtyMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def quiescent(self) -> None:
        """qsbr: a quiescent point; the table is re-read if it may have moved."""
        r = self._reader
        # Only while online (inside a section): a table read outside one may
        # be unlinked before it is attached.  Offline, the next op catches up.
        if (r.quiescent() or r.seen != self._seen) and r.online:
            self._refresh()
            self._seen = r.seen
        if self._rcu.gp.pending:
            self._rcu.gp.run_callbacks()

    # --- accessors -----------------------------------------------------------------
    def set_dirty_flag(self, addr: int, client: int) -> None:
        """Mark the page holding ``addr`` dirty for ``client``."""
        # The hottest op, written out: one C call for the bit, and a qsbr
        # reader that is online with a current table skips section entry.
        if client.__class__ is not int or not 0 <= client < 3:
            client = _client(client)
        r = self._reader
        plain = r.online and r.seen == self._seen
        t = self._table if plain else self._begin()
        try:
            if addr.__class__ is int and 0 <= addr < t.ram_size:
                page = addr >> self.page_bits
            else:
                page = self._page(t, addr)
            bp = self.block_pages
            idx = page // bp
            bit = page - idx * bp
            b = self._blocks[client][idx] or self._block(client, idx)
            # release: whoever takes the bit (acquire) sees what was written
            # before it (the guest page).
            self._set_bit(b.base + ((bit >> 6) << 3), bit & 63, _RELEASE)
        finally:
            if not plain:
                self._end()

    def get_dirty_flag(self, addr: int, client: int) -> bool:
        """Is the page holding ``addr`` dirty for ``client``?"""
        client = _client(client)
        t = self._begin()
        try:
            idx, bit = divmod(self._page(t, addr), self.block_pages)
            return bitmap.test(self._block(client, idx), bit)
        finally:
            self._end()

    def get_dirty(self, start: int, length: int, client: int) -> bool:
        """Is any page of [start, start+length) dirty for ``client``?"""
        client = _client(client)
        t, page, end = self._enter_range(start, length)
        try:
            return any(bitmap.any_set(self._block(client, idx), off, num)
                       for idx, off, num in self._walk(page, end))
        finally:
            self._end()

    def all_dirty(self, start: int, length: int, client: int) -> bool:
        """Is every page of [start, start+length) dirty for ``client``?"""
        client = _client(client)
        t, page, end = self._enter_range(start, length)
        try:
            return all(bitmap.all_set(self._block(client, idx), off, num)
                       for idx, off, num in self._walk(page, end))
        finally:
            self._end()

    def range_includes_clean(self, start: int, length: int, mask: int) -> int:
        """The clients of ``mask`` for which some page of the range is clean."""
        mask = _mask(mask)
        t, page, end = self._enter_range(start, length)
        try:
            clean = 0
            for c in _clients(mask):
                if not all(bitmap.all_set(self._block(c, idx), off, num)
                           for idx, off, num in self._walk(page, end)):
                    clean |= 1 << c
            return clean
        finally:
            self._end()

    def set_dirty_range(self, start: int, length: int, mask: int) -> None:
        """Mark [start, start+length) dirty for the clients of ``mask``."""
        mask = _mask(mask)
        t, page, end = self._enter_range(start, length)
        try:
            clients = _clients(mask)
            for idx, off, num in self._walk(page, end):
                for c in clients:
                    bitmap.set_range(self._block(c, idx), off, num)
        finally:
            self._end()

    def test_and_clear_dirty(self, start: int, length: int, client: int) -> bool:
        """Clear [start, start+length) for ``client``; True if any page was dirty."""
        client = _client(client)
        dirty = False

        def merge(g0: int, taken: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
            nonlocal dirty
            dirty = dirty or bool(taken.any())
        self._take(client, start, length, merge)
        return dirty

    def set_dirty_lebitmap(self, bitmap_: Any, start: int, pages: int) -> None:
        """Merge a little-endian bitmap (bit i = page of ``start`` + i), as KVM
        returns it: VGA and MIGRATION always, CODE only for a tcg map."""
        bits, nbits = as_words(bitmap_, "bitmap")
        pages = _index(pages, "pages")
        if pages < 0:
            raise BadInput(f"pages {pages} is negative")
        if nbits < pages:
            raise BadInput(f"bitmap holds {nbits} bits, fewer than pages={pages}")
        start = _index(start, "start")
        clients = _clients(DIRTY_CLIENTS_ALL if self.tcg else DIRTY_CLIENTS_NOCODE)
        pb = self.page_bits
        t, page0, end = self._enter_range((start >> pb) << pb, pages << pb)
        try:
            for idx, off, num in self._walk(page0, end):
                k = idx * self.block_pages + off - page0   # source bit of block bit `off`
                w0 = off >> 6
                nwords = ((off + num - 1) >> 6) - w0 + 1
                words = bitmap.shifted(bits, k - (off & 63), nwords, k, k + num)
                for c in clients:
                    bitmap.or_words(self._block(c, idx), w0, words)
        finally:
            self._end()

    def sync_dirty_bitmap(self, dest: Any, start: int, length: int) -> int:
        """Take MIGRATION bits of the range into ``dest`` (uint64, indexed by
        global page); return how many pages were newly dirty in ``dest``."""
        if not isinstance(dest, np.ndarray) or dest.dtype != U64 or dest.ndim != 1:
            raise BadInput("dest must be a 1-D uint64 numpy array indexed by global page")
        if not dest.flags.writeable:
            raise BadInput("dest must be writeable")
        newly = 0

        def check(end: int) -> None:
            if end > len(dest) * 64 and length:
                raise BadInput(f"dest holds {len(dest) * 64} pages; the range ends at page {end}")

        def merge(g0: int, taken: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
            nonlocal newly
            d = dest[g0:g0 + len(taken)]
            newly += bitmap.popcount(taken & ~d)
            d |= taken
        self._take(DIRTY_MEMORY_MIGRATION, start, length, merge, check)
        return newly

    def set_dirty_pages(self, pages: Any, client: int) -> None:
        """Mark a batch of page numbers (an integer numpy array) dirty."""
        client = _client(client)
        if not isinstance(pages, np.ndarray) or pages.dtype.kind not in "iu" or pages.ndim != 1:
            raise BadInput("pages must be a 1-D numpy array of integer page numbers")
        t = self._begin()
        try:
            if not len(pages):
                return
            lo, hi = int(pages.min()), int(pages.max())
            if lo < 0 or (hi + 1) << self.page_bits > t.ram_size:
                self._reaching(t, lo, (hi + 1) << self.page_bits, f"page numbers [{lo}, {hi}]")
            p = pages.astype(np.uint64)
            bw = self.block_pages >> 6
            gword = p >> np.uint64(6)
            bits = np.left_shift(np.uint64(1), p & np.uint64(63))
            order = np.argsort(gword, kind="stable")
            gword, bits = gword[order], bits[order]
            uniq, starts = np.unique(gword, return_index=True)
            merged = np.bitwise_or.reduceat(bits, starts)
            blk = uniq // np.uint64(bw)
            cuts = np.flatnonzero(np.diff(blk)) + 1
            for lo_i, hi_i in zip(np.r_[0, cuts], np.r_[cuts, len(uniq)], strict=True):
                idx = int(blk[lo_i])
                bitmap.or_sparse(self._block(client, idx),
                                 (uniq[lo_i:hi_i] - np.uint64(idx * bw)).astype(np.intp),
                                 merged[lo_i:hi_i])
        finally:
            self._end()

    def snapshot_and_clear_dirty(self, start: int, length: int, client: int) -> DirtySnapshot:
        """Take the dirty bits of the range for ``client`` into a snapshot."""
        client = _client(client)
        snap: list[DirtySnapshot] = []

        def check(end: int) -> None:
            # The window is the range's pages, ceil((start+length)/page) even
            # for length 0 (which takes nothing).
            first = _index(start, "start")
            page = first >> self.page_bits
            end = max(end, -(-(first + _index(length, "length")) >> self.page_bits))
            words = np.zeros(((max(end, page + 1) - 1) >> 6) - (page >> 6) + 1, dtype=np.uint64)
            snap.append(DirtySnapshot(self.page_bits, page, end, words))

        def merge(g0: int, taken: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
            g0 -= snap[0]._page >> 6
            snap[0]._words[g0:g0 + len(taken)] |= taken
        self._take(client, start, length, merge, check)
        return snap[0]

    def _take(self, client: int, start: Any, length: Any,
              merge: Callable[[int, np.ndarray[Any, np.dtype[np.uint64]]], None],
              check: Callable[[int], None] | None = None) -> None:
        """Take (read and clear) the bits of a range for ``client``, handing
        each piece to ``merge(first global word, words)``.

        Blocks the range covers only in part lose their bits word by word
        (an atomic exchange / fetch_and per dirty word).  Blocks it covers
        whole are swapped, when this is the coordinator outside any section
        and they hold enough dirty words to pay for it: a new table puts a
        zeroed block in their place, and after one grace period no writer
        can reach the retired block, which is then read with plain numpy
        and zeroed for reuse: no atomics at all (coordinator.swap_out)."""
        bp, bw = self.block_pages, self.block_pages >> 6
        swap: list[int] = []
        t, page, end = self._enter_range(start, length)
        try:
            if check is not None:
                check(end)
            pieces = list(self._walk(page, end))
            whole = [idx for idx, _, num in pieces if num == bp]
            if whole and self._rcu.nesting == 1 and self.is_coordinator:
                dirty_words = sum(int(np.count_nonzero(self._block(client, i).words))
                                  for i in whole)
                if dirty_words >= self.swap_min_words:
                    swap = whole
            for idx, off, num in pieces:
                if num == bp and swap:
                    continue
                w0, taken = bitmap.take(self._block(client, idx), off, num)
                merge(idx * bw + w0, taken)
        finally:
            self._end()
        if swap:
            coord = self._coordinator
            for idx, block in zip(swap, coord.swap_out(client, swap), strict=True):
                merge(idx * bw, block.words)
                coord.recycle(block)

    def dirty_pages(self, client: int) -> int:
        """How many pages of guest RAM are dirty for ``client``."""
        client = _client(client)
        t = self._begin()
        try:
            total = 0
            for idx, off, num in self._walk(0, t.ram_size >> self.page_bits):
                w0, masks = bitmap.range_masks(off, num)
                words = self._block(client, idx).words[w0:w0 + len(masks)]
                total += bitmap.popcount(words & masks)
            return total
        finally:
            self._end()

    # --- the coordinator: one-line delegations to coordinator.py -----------------------
    def ram_block_add(self, size: int) -> int:
        """Place a RAM block of ``size`` bytes (the smallest gap that fits,
        else the end), grow the bitmap if needed, mark it dirty; its offset."""
        return self._coordinator.ram_block_add(size)

    def ram_block_remove(self, offset: int) -> None:
        """Forget the RAM block at ``offset``; its bitmap blocks stay for reuse."""
        self._coordinator.ram_block_remove(offset)

    def extend(self, new_ram_size: int) -> None:
        """Grow guest RAM to ``new_ram_size`` (a new RAM block at the end,
        dirty for every client).  No-op if it is not larger."""
        self._coordinator.extend(new_ram_size)

    def request_extend(self, new_ram_size: int, timeout: float | None = None) -> None:
        """Ask the coordinator to grow RAM to ``new_ram_size`` and wait until
        it is published (any process).  CoordinatorGone if it is dead,
        GraceTimeout after ``timeout`` seconds."""
        self._coordinator.request_extend(new_ram_size, timeout)

    def serve(self, stop_event: Any = None) -> None:
        """Coordinator: grant request_extend() calls until ``stop_event`` is set."""
        self._coordinator.serve(stop_event)

    def serve_once(self) -> bool:
        """Grant a pending request, run due call_rcu callbacks; True if it grew."""
        self._open_check()  # the header may be unmapped
        return self._coordinator.serve_once()

    # --- leaving -----------------------------------------------------------------
    def close(self) -> None:
        """Leave: free this process's slot (with its last handle), unmap."""
        if self._closed:
            return
        if self._reader.nesting:
            raise ShmDirtyError(f"map {self.name}: close() inside a read-side section")
        with _shared_lock:
            if self._shared.refs == 1:
                self._coordinator.resign()
            self._closed = True
            # Every later op fails clearly (the header is unmapped below).
            self._rcu = self._reader = self._coordinator = _CLOSED
            self._unmap_blocks()
            self._drop(self.name, self._shared)

    def destroy(self) -> None:
        """Coordinator: unlink every segment of this map, then close."""
        self._open_check()
        self._coordinator.require("destroy()")
        if self._reader.nesting:  # as close(), refused before anything is unlinked
            raise ShmDirtyError(f"map {self.name}: destroy() inside a read-side section")
        for n in segment.list_segments(self.name):
            segment.unlink(n)
        self._coordinator.forget()
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<DirtyMemory {self.name} closed>"
        return (f"<DirtyMemory {self.name} ram_size={self.ram_size:#x} "
                f"generation={self._table.generation} flavor={self.flavor}>")


class _Section:
    """The context manager of read_section(): a plain class, not a
    generator, so a section costs little more than its two atomics."""

    __slots__ = ("_dm",)

    def __init__(self, dm: DirtyMemory) -> None:
        self._dm = dm

    def __enter__(self) -> None:
        self._dm._begin()

    def __exit__(self, *exc: object) -> None:
        self._dm._end()


class _Closed:
    """Stands in for the Rcu, the Reader and the Coordinator of a closed
    handle: every op fails clearly."""

    nesting = 0
    online = False
    seen = -2
    flavor = "closed"

    def read_lock(self) -> None:
        raise ShmDirtyError("this DirtyMemory handle is closed")

    def __getattr__(self, name: str) -> Any:
        raise ShmDirtyError("this DirtyMemory handle is closed")


_CLOSED: Any = _Closed()


def _unpickle(name: str, flavor: str) -> DirtyMemory:
    return DirtyMemory.attach(name, flavor=flavor)
