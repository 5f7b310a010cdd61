"""DirtyMemory: a map's lifecycle and the seed's dirty-memory accessors.

Shared state (names in layout.py):

- the header: page geometry, the published table ``generation``, the
  grace-period counter and the reader slots;
- one immutable table segment per generation (table.py);
- one segment per (client, block) holding ``block_pages`` bits (bitmap.py).

Every accessor runs inside a read-side section over the table it read
there (view.TableView, the base of DirtyMemory); the takes run the
handle's take object (take.py), which the coordinator chose; what only the
coordinator does lives in coordinator.py, and the coordinator methods here
are one-line delegations to it.  Each process copies a table into Python lists when it
first sees it and caches its block mappings, so an op touches shared memory
only for the grace-period counter (memb) and the bitmap words themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np

from . import atomic, bitmap, handles, layout, segment
from .clients import (
    DIRTY_CLIENTS_ALL,
    DIRTY_CLIENTS_NOCODE,
    DIRTY_MEMORY_BLOCK_SIZE,
    DIRTY_MEMORY_CODE,
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_NUM,
    DIRTY_MEMORY_VGA,
    U64,
    as_index,
    as_words,
    check_client,
    check_geometry,
    check_mask,
    clients_of,
)
from .coordinator import Coordinator, create_map
from .errors import BadInput, HandleClosed, MapExists, RcuMisuse, check_timeout
from .handles import MapState
from .rcu import CLOSE_TIMEOUT, FLAVORS, Closed, Rcu
from .snapshot import DirtySnapshot, Taking
from .table import MAX_BLOCKS, Table, find_ram_offset
from .take import SWAP_GRACE_BUDGET, SWAP_MIN_WORDS, Words
from .view import INTERFACE, Section, TableView

__all__ = ["DIRTY_CLIENTS_ALL", "DIRTY_CLIENTS_NOCODE", "DIRTY_MEMORY_BLOCK_SIZE",
           "DIRTY_MEMORY_CODE", "DIRTY_MEMORY_MIGRATION", "DIRTY_MEMORY_NUM",
           "DIRTY_MEMORY_VGA", "MAX_BLOCKS", "SWAP_MIN_WORDS", "DirtyMemory", "DirtySnapshot",
           "Table", "find_ram_offset"]

_RELEASE = atomic.RELEASE
_index, _client, _mask, _clients = as_index, check_client, check_mask, clients_of


class DirtyMemory(TableView):
    """A dirty-memory map in shared memory (README.md, "The library")."""

    #: What the coordinator methods delegate to; a subclass may swap in its
    #: own (tests do, to show a broken publication or swap is caught).
    coordinator_class: type[Coordinator] = Coordinator
    #: Made by create() in this process: leaving its with-block destroys the map.
    _created = False

    # --- construction ---------------------------------------------------------
    def __init__(self, name: str, shared: MapState) -> None:
        """Use create(), attach() or adopt()."""
        rcu = shared.rcu
        self._init_view(name, shared.header, rcu)
        self._shared = shared
        self.flavor = rcu.flavor
        hdr = shared.header.words
        self._ram_ptr = hdr.ptr(layout.H_RAM_SIZE)
        # The closed stand-in (handles.CLOSED) once the handle is closed.
        self._coordinator: Coordinator | Closed = self.coordinator_class(
            self, rcu, shared.header, shared.coord)
        self._section = Section(self)
        self._set_page, self._set_pages = bitmap.page_setters()
        # set_dirty_flag runs in C (ViewCore) for a handle made on the kernel.
        self._flag_in_c = atomic.batch is not None
        # Whole blocks with at least this many dirty words are taken by a
        # block swap and a grace period rather than word by word (take.py).
        self.swap_min_words = SWAP_MIN_WORDS
        # How long a swap may wait for its grace period (s) before it takes
        # the retired blocks word by word instead (take.py).
        self.swap_grace_budget = SWAP_GRACE_BUDGET
        self._closed = False
        self.begin_section()  # the first table
        self.end_section()

    @classmethod
    def create(cls, ram_size: int = 0, *, page_bits: int = 12,
               block_pages: int = DIRTY_MEMORY_BLOCK_SIZE, max_readers: int = 64,
               tcg: bool = False, name: str | None = None) -> DirtyMemory:
        """Create a map; the caller becomes its coordinator.  ``ram_size`` > 0
        adds [0, ram_size) as the first RAM block."""
        page_bits, block_pages, max_readers, ram_size = check_geometry(
            page_bits, block_pages, max_readers, ram_size)
        name = layout.new_map_name() if name is None else layout.check_map_name(name)
        try:
            hdr = create_map(name, page_bits, block_pages, max_readers, tcg)
        except FileExistsError:
            raise MapExists(name) from None
        dm = cls._open(name, handles.acquire(name, "memb", hdr))
        dm._coordinator.take_role()
        dm._created = True
        if ram_size:
            try:
                dm.ram_block_add(ram_size)
            except BaseException:
                dm.destroy()
                raise
        return dm

    @classmethod
    def attach(cls, name: str, *, flavor: str = "memb") -> DirtyMemory:
        """Attach to an existing map as a reader/writer of ``flavor``.
        MapNotFound if there is no such map."""
        if flavor not in FLAVORS:
            raise BadInput(f"flavor {flavor!r} is not one of {FLAVORS}")
        name = layout.check_map_name(name)
        return cls._open(name, handles.acquire(name, flavor))

    @classmethod
    def _open(cls, name: str, st: MapState, into: DirtyMemory | None = None) -> DirtyMemory:
        """A handle on ``st`` (whose reference the caller took): new, or ``into``."""
        try:
            dm = cls.__new__(cls) if into is None else into
            dm.__init__(name, st)  # type: ignore[misc]
            return dm
        except BaseException:
            with handles.lock:
                last = handles.release(name, st)
            if last:
                handles.finish(st, 0.0)
            raise

    @classmethod
    def adopt(cls, name: str) -> DirtyMemory:
        """Become the coordinator of ``name`` if its coordinator is dead (or
        has left).  NotCoordinator if it is alive or another process won."""
        name = layout.check_map_name(name)
        st = handles.known(name)
        # A process that reads the map already adopts in the flavor it reads in.
        dm = cls.attach(name, flavor="memb" if st is None else st.rcu.flavor)
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
            raise HandleClosed(f"this handle of map {self.name} is closed: attach again")

    @property
    def rcu(self) -> Rcu:
        """This process's readers of the map (one per thread) and its grace periods."""
        rcu = self._rcu
        if isinstance(rcu, Closed):   # as _open_check()
            raise HandleClosed(f"this handle of map {self.name} is closed: attach again")
        return rcu

    @property
    def ram_size(self) -> int:
        """The published RAM size (end of the last RAM block), in bytes."""
        self._open_check()
        # acquire: pairs with the coordinator's release after publishing.
        return atomic.load(self._ram_ptr, atomic.ACQUIRE)

    @property
    def is_coordinator(self) -> bool:
        """True for the handle create() or adopt() returned while its process
        coordinates the map; a handle from attach() never is."""
        self._open_check()
        return self._coordinator.is_coordinator()

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
    def read_section(self) -> Section:
        """``with dm.read_section():`` one read-side section around many ops."""
        return self._section

    def __enter__(self) -> DirtyMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving ``with DirtyMemory.create(...) as dm:`` destroys the map (in
        the process that created it, while it coordinates); any other handle
        (attached, unpickled, inherited through fork) is closed."""
        if self._created and not self._closed and self.is_coordinator:
            self.destroy()
        else:
            self.close()

    # --- accessors -----------------------------------------------------------------
    # The five hottest ops (set_dirty_flag, get_dirty, set_dirty_range,
    # test_and_clear_dirty, set_dirty_pages): where the kernel was built
    # each is a C method of TableView's base (shmdirty/_kernel_src/cores.c,
    # ViewCore).  For a handle made on the kernel backend it reads this
    # thread's reader and the table fields as the Python path does and runs
    # the op in the same call (opening and closing a memb section there when
    # outside one).
    # Whatever it declines (bad input, a stale table, a block not mapped yet,
    # a first op, a take that may swap) it hands to the Python path,
    # ``_<op>_py``; without the kernel that is the method itself (the aliases
    # at the end).
    def _set_dirty_flag_py(self, addr: Any, client: Any) -> None:
        """Mark the page holding ``addr`` dirty for ``client``."""
        try:
            r = self._local.reader   # this thread's reader: one lookup
        except AttributeError:
            r = self._rcu.reader     # this thread's first op
        # release on the bit: whoever takes it, with acquire, sees what was
        # written before it (the guest page).
        if r.online and r.seen == self._seen:
            # qsbr, online, table current: already inside a section.
            if self._set_page(self._blocks, client, addr, self._table.ram_prefix,
                              self.page_bits, self.block_pages, _RELEASE):
                return
        client = _client(client)
        t = self.begin_section(r)
        try:
            # ram_prefix: RAM up to the first hole; past it, page_of's exact check.
            if not self._set_page(self._blocks, client, addr, t.ram_prefix, self.page_bits,
                                  self.block_pages, _RELEASE):
                idx, bit = divmod(self.page_of(t, addr), self.block_pages)
                bitmap.set_range(self.block(client, idx), bit, 1)
        finally:
            self.end_section(r)

    def get_dirty_flag(self, addr: int, client: int) -> bool:
        """Is the page holding ``addr`` dirty for ``client``?"""
        client = _client(client)
        t = self.begin_section()
        try:
            idx, bit = divmod(self.page_of(t, addr), self.block_pages)
            return bitmap.test(self.block(client, idx), bit)
        finally:
            self.end_section()

    def _get_dirty_py(self, start: int, length: int, client: int) -> bool:
        """Is any page of [start, start+length) dirty for ``client``?"""
        client = _client(client)
        t, page, end = self.enter_range(start, length)
        try:
            return bool(self.over(bitmap.WALK_ANY, client, page, end))
        finally:
            self.end_section()

    def all_dirty(self, start: int, length: int, client: int) -> bool:
        """Is every page of [start, start+length) dirty for ``client``?"""
        client = _client(client)
        t, page, end = self.enter_range(start, length)
        try:
            return bool(self.over(bitmap.WALK_ALL, client, page, end))
        finally:
            self.end_section()

    def range_includes_clean(self, start: int, length: int, mask: int) -> int:
        """The clients of ``mask`` for which some page of the range is clean."""
        mask = _mask(mask)
        t, page, end = self.enter_range(start, length)
        try:
            clean = 0
            for c in _clients(mask):
                if not self.over(bitmap.WALK_ALL, c, page, end):
                    clean |= 1 << c
            return clean
        finally:
            self.end_section()

    def _set_dirty_range_py(self, start: int, length: int, mask: int) -> None:
        """Mark [start, start+length) dirty for the clients of ``mask``."""
        mask = _mask(mask)
        t, page, end = self.enter_range(start, length)
        try:
            for c in _clients(mask):
                self.over(bitmap.WALK_SET, c, page, end)
        finally:
            self.end_section()

    def _test_and_clear_dirty_py(self, start: int, length: int, client: int) -> bool:
        """Clear [start, start+length) for ``client``; True if any page was dirty."""
        client = _client(client)
        taker = self._coordinator.taker
        t, page, end = self.enter_range(start, length)
        try:
            if end - page < taker.swap_pages:
                # Nothing this handle's take could swap (no block covered
                # whole, or a take that never swaps): one call, the words
                # taken one by one.
                return bool(self.over(bitmap.WALK_TAKE, client, page, end))
        finally:
            self.end_section()
        return taker.test_and_clear(client, start, length)

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
        t, page0, end = self.enter_range((start >> pb) << pb, pages << pb)
        try:
            for idx, off, num in self.walk(page0, end):
                k = idx * self.block_pages + off - page0   # source bit of block bit `off`
                bitmap.or_bitmaps([self.block(c, idx) for c in clients], off, num, bits, k)
        finally:
            self.end_section()

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

        def merge(g0: int, taken: Words) -> None:
            nonlocal newly
            d = dest[g0:g0 + len(taken)]
            newly += bitmap.popcount(taken & ~d)
            d |= taken
        # holes: the range may cross removed RAM blocks; only RAM pages are taken.
        self._coordinator.taker.run(DIRTY_MEMORY_MIGRATION, start, length, merge, check,
                                    holes=True)
        return newly

    def _set_dirty_pages_py(self, pages: Any, client: int) -> None:
        """Mark a batch of page numbers (an integer numpy array) dirty."""
        client = _client(client)
        if not isinstance(pages, np.ndarray) or pages.dtype.kind not in "iu" or pages.ndim != 1:
            raise BadInput("pages must be a 1-D numpy array of integer page numbers")
        t = self.begin_section()
        try:
            if not len(pages):
                return
            lo, hi = int(pages.min()), int(pages.max())
            if lo < 0 or (hi + 1) << self.page_bits > t.ram_prefix:
                t = self.reaching(t, lo << self.page_bits, (hi + 1) << self.page_bits,
                                  f"page numbers [{lo}, {hi}]", pages=True, holes=True)
            p = np.ascontiguousarray(pages, dtype=np.int64)
            if (hi + 1) << self.page_bits > t.ram_prefix and len(
                    bad := t.pages_outside(p, self.page_bits)):
                # Past a hole: each page checked (a removed block is not RAM).
                t = self.reaching(t, int(bad[0]) << self.page_bits,
                                  (int(bad[0]) + 1) << self.page_bits,
                                  f"page number {int(bad[0])}", pages=True)
                if len(t.pages_outside(p, self.page_bits)):
                    raise BadInput(f"page numbers {t.pages_outside(p, self.page_bits)[:4]}"
                                   " are outside guest RAM")
            # release: as set_dirty_flag.  One call; it names a block to map
            # first if one is not mapped yet.
            while (idx := self._set_pages(self._blocks[client], p, self.block_pages,
                                          _RELEASE)) >= 0:
                self.block(client, idx)
        finally:
            self.end_section()

    for _f in (_set_dirty_flag_py, _get_dirty_py, _set_dirty_range_py,
               _test_and_clear_dirty_py, _set_dirty_pages_py):   # for argument errors
        _f.__qualname__ = "DirtyMemory." + _f.__name__[1:-3]
    del _f
    if atomic.VIEW_BASE is object:   # no kernel built: the Python paths are the methods
        set_dirty_flag = _set_dirty_flag_py
        get_dirty = _get_dirty_py
        set_dirty_range = _set_dirty_range_py
        test_and_clear_dirty = _test_and_clear_dirty_py
        set_dirty_pages = _set_dirty_pages_py

    def snapshot_and_clear_dirty(self, start: int, length: int, client: int) -> DirtySnapshot:
        """Take the dirty bits of the range for ``client`` into a snapshot."""
        client = _client(client)
        taking = Taking(self.page_bits, start, length)
        self._coordinator.taker.run(client, start, length, taking.merge, taking.check)
        assert taking.snap is not None   # check() made it, inside the take's section
        return taking.snap

    def dirty_pages(self, client: int) -> int:
        """How many pages of guest RAM are dirty for ``client``."""
        client = _client(client)
        t = self.begin_section()
        try:
            total = 0
            pb = self.page_bits
            for p0, p1 in t.ram_runs(0, t.ram_size >> pb, pb):   # RAM only, no hole
                for idx, off, num in self.walk(p0, p1):
                    w0, masks = bitmap.range_masks(off, num)
                    words = self.block(client, idx).words[w0:w0 + len(masks)]
                    total += bitmap.popcount(words & masks)
            return total
        finally:
            self.end_section()

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
        GraceTimeout after ``timeout`` seconds (a request that raised is
        withdrawn); BadInput unless ``timeout`` is None or a finite number >= 0."""
        self._coordinator.request_extend(new_ram_size, check_timeout(timeout))

    def serve(self, stop_event: Any = None) -> None:
        """Coordinator: grant request_extend() calls until ``stop_event`` is set."""
        self._coordinator.serve(stop_event)

    def serve_once(self) -> bool:
        """Grant a pending request, run due call_rcu callbacks; True if it grew."""
        self._open_check()  # the header may be unmapped
        return self._coordinator.serve_once()

    # --- leaving -----------------------------------------------------------------
    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Leave: free this process's slots (every thread's, with its last
        handle), unmap.  Other threads must not be using the handle.

        With the last handle, as liburcu's rcu_barrier at exit: every
        call_rcu callback of this process whose grace period ends within
        ``timeout`` seconds runs first.  The handle is closed either way;
        then CallbacksDropped (a GraceTimeout) says how many could not run
        and who held them up, CallbackFailed (an ExceptionGroup) carries the
        errors callbacks raised."""
        timeout = check_timeout(timeout)
        d = self.__dict__
        if d.get("_pending_attach"):   # never attached: nothing to leave
            d.update(_pending_attach=False, _closed=True)
        if d.get("_closed"):
            return
        if self._rcu.nesting:
            raise RcuMisuse(f"map {self.name}: close() inside a read-side section")
        self._coordinator.leave()   # the give-back thread on this view (retired.py)
        with handles.lock:
            if self._shared.refs == 1 and self._rcu.sections_open():
                raise RcuMisuse(f"map {self.name}: close() while another thread is inside "
                                "a read-side section")
            # The process leaves the coordinator role with its last handle,
            # or its last coordinating one (attached handles cannot use it).
            if self._coordinator.drop_role() or self._shared.refs == 1:
                self._coordinator.resign()
            self._closed = True
            # Every later op fails clearly (the header is unmapped below).
            self._rcu = self._local = self._coordinator = handles.CLOSED
            self.unmap_blocks()
            st = self._shared
            last = handles.release(self.name, st)
            if type(self) is not _Unattached:
                self.__class__ = _ClosedHandle   # the view's methods refuse from now on
        if last:
            handles.finish(st, timeout)

    def destroy(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Coordinator: unlink every segment of this map, then close (which
        runs this process's callbacks, or reports them: see close())."""
        timeout = check_timeout(timeout)
        self._open_check()
        self._coordinator.require("destroy()")
        if self._rcu.nesting:  # as close(), refused before anything is unlinked
            raise RcuMisuse(f"map {self.name}: destroy() inside a read-side section")
        for n in segment.list_segments(self.name):
            segment.unlink(n)
        self._coordinator.forget()
        self.close(timeout)

    def __repr__(self) -> str:
        if self._closed:
            return f"<DirtyMemory {self.name} closed>"
        return (f"<DirtyMemory {self.name} ram_size={self.ram_size:#x} "
                f"generation={self._table.generation} flavor={self.flavor}>")


class _ClosedHandle(DirtyMemory):
    """A closed handle (close() makes it one): the view's methods (view.py
    ``INTERFACE``, which the library calls) raise HandleClosed instead of
    reaching the unmapped header or blocks; every other method already
    does, through the closed stand-ins (handles.CLOSED)."""


def _refuse(name: str) -> Callable[..., NoReturn]:
    def refused(self: DirtyMemory, *args: object, **kwargs: object) -> NoReturn:
        raise HandleClosed(f"this handle of map {self.name} is closed: attach again")
    refused.__name__ = refused.__qualname__ = name
    return refused


for _name in INTERFACE:
    setattr(_ClosedHandle, _name, _refuse(_name))
del _name


class _Unattached(DirtyMemory):
    """A handle unpickled (in a pool worker, say): it holds only the map's
    name and flavor until its first use attaches it, and then becomes a
    plain DirtyMemory.  An error (MapNotFound, NoReaderSlot) so surfaces
    inside the task that used the handle, where the pool reports it, not in
    the worker's unpickling, which some pools take for their end of input.
    (A class of its own: a ``__getattr__`` on DirtyMemory would slow every
    attribute load of every op.)"""

    def __getattr__(self, attr: str) -> Any:
        d = self.__dict__
        # One thread attaches, another's use waits (the attach's lookups re-enter).
        with handles.attach_lock:
            if d.get("_pending_attach") and not attr.startswith("__"):
                d["_pending_attach"] = False
                try:
                    self._open(d["name"], handles.acquire(d["name"], d["flavor"]), self)
                except BaseException:
                    d["_pending_attach"] = True   # the next use tries again
                    raise
                self.__class__ = DirtyMemory
        if type(self) is not _Unattached:   # attached, by this thread or another
            return getattr(self, attr)
        if d.get("_closed"):
            raise HandleClosed(f"this handle of map {d.get('name')} is closed")
        raise AttributeError(attr)

    def __repr__(self) -> str:
        if self.__dict__.get("_pending_attach"):
            return f"<DirtyMemory {self.name} (attaches on first use)>"
        return super().__repr__()


def _unpickle(name: str, flavor: str) -> DirtyMemory:
    dm = _Unattached.__new__(_Unattached)
    dm.__dict__.update(name=name, flavor=flavor, _pending_attach=True)
    return dm

