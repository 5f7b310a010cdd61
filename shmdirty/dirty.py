"""DirtyMemory: the seed's dirty-memory accessors over RCU block tables.

Shared state (names in layout.py):

- the header: page geometry, the published table ``generation``, the
  grace-period counter and the reader slots;
- one immutable table segment per generation: for every client the ids of
  its blocks, the RAM size, and the list of RAM blocks;
- one segment per (client, block) holding ``block_pages`` bits.

Invariants, kept here:

- Only the coordinator writes tables.  It builds the next one aside (reusing
  every existing block, adding zeroed blocks), publishes it by storing the
  generation, and unlinks the old table only after a grace period
  (``call_rcu``).  Blocks are never moved, and growth never frees one.
- Every accessor runs inside a read-side section and uses the table it read
  there; a memb reader re-reads the generation when its outermost section
  begins, a qsbr reader at its quiescent points.  A table seen by a reader
  therefore exists, and its blocks are live, until the reader leaves.
- Each process copies a table into Python lists when it first sees it and
  caches its block mappings, so an op touches shared memory only for the
  generation word (memb) and the bitmap words themselves.
"""

from __future__ import annotations

import operator
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import atomic, bitmap, layout, segment
from .bitmap import Block
from .errors import BadInput, CorruptSegment, GraceTimeout, NotCoordinator, ShmDirtyError
from .rcu import FLAVORS, Rcu, my_owner_word, owner_alive
from .segment import Segment

DIRTY_MEMORY_VGA = 0
DIRTY_MEMORY_CODE = 1
DIRTY_MEMORY_MIGRATION = 2
DIRTY_MEMORY_NUM = 3
DIRTY_CLIENTS_ALL = (1 << DIRTY_MEMORY_NUM) - 1
DIRTY_CLIENTS_NOCODE = DIRTY_CLIENTS_ALL & ~(1 << DIRTY_MEMORY_CODE)
DIRTY_MEMORY_BLOCK_SIZE = 256 * 1024 * 8

SWAP_MIN_WORDS = 512        # ~0.2 ms of per-word atomics: about what a swap costs
MAX_BLOCKS = 1 << 16        # blocks per client: bounds the table and the segment count
_SERVE_POLL = 1e-3          # how often serve() looks for requests (s)
_REQUEST_POLL = 2e-4        # how often request_extend() looks for the grant (s)

U64 = np.dtype(np.uint64)
_RELEASE = atomic.RELEASE


class CoordinatorGone(ShmDirtyError, RuntimeError):
    """The map's coordinator is dead or has left: call DirtyMemory.adopt()."""


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


class _Shared:
    """What every handle of one map in this process shares: the header
    mapping, the one reader slot (one slot per process), and the
    coordinator lock (coordinating is per process: every handle of the
    coordinator's process may publish)."""

    def __init__(self, header: Segment, rcu: Rcu) -> None:
        self.header = header
        self.rcu = rcu
        self.refs = 0
        self.coord_lock = threading.RLock()
        self.pool: list[int] = []  # coordinator: ids of retired blocks, zeroed, for reuse
        # coordinator: (client, index, block id) retired by a take whose grace
        # period did not finish; their bits go back (see _restore_unmerged)
        self.unmerged: list[tuple[int, int, int]] = []


_shared: dict[str, _Shared] = {}
_shared_lock = threading.Lock()


def _index(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise BadInput(f"{what} must be an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise BadInput(f"{what} must be an integer, not {type(value).__name__}") from None


def _client(client: Any) -> int:
    if client.__class__ is int and 0 <= client < DIRTY_MEMORY_NUM:
        return client
    c = _index(client, "client")
    if not 0 <= c < DIRTY_MEMORY_NUM:
        raise BadInput(f"client {c} is not one of 0 (VGA), 1 (CODE), 2 (MIGRATION)")
    return c


def _mask(mask: Any) -> int:
    m = _index(mask, "mask")
    if not 0 <= m <= DIRTY_CLIENTS_ALL:
        raise BadInput(f"client mask {m:#x} is not in [0, {DIRTY_CLIENTS_ALL:#x}]")
    return m


def _clients(mask: int) -> list[int]:
    return [c for c in range(DIRTY_MEMORY_NUM) if mask >> c & 1]


def _as_words(bits: Any, what: str) -> tuple[np.ndarray[Any, np.dtype[np.uint64]], int]:
    """A uint64 array from a uint64 array or little-endian bytes, and how
    many bits the caller gave."""
    if isinstance(bits, np.ndarray):
        if bits.dtype != U64 or bits.ndim != 1:
            raise BadInput(f"{what} must be a 1-D uint64 array, not {bits.ndim}-D {bits.dtype}")
        return bits, len(bits) * 64
    if isinstance(bits, (bytes, bytearray, memoryview)):
        raw = bytes(bits)
        nbits = len(raw) * 8
        raw += b"\0" * (-len(raw) % 8)
        return np.frombuffer(raw, dtype="<u8").astype(np.uint64), nbits
    raise BadInput(f"{what} must be a uint64 numpy array or bytes, not {type(bits).__name__}")


class DirtySnapshot:
    """Dirty bits taken by snapshot_and_clear_dirty(), queried later
    (current QEMU's display path).  Plain process-local memory."""

    def __init__(self, page_bits: int, page: int, end: int,
                 words: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
        self.page_bits = page_bits
        self.start = page << page_bits
        self.end = end << page_bits
        self._page = page
        self._words = words  # global word (page >> 6) .. of the range

    def get_dirty(self, start: int, length: int) -> bool:
        """Was any page of [start, start+length) dirty in the snapshot?"""
        start, length = _index(start, "start"), _index(length, "length")
        if length < 0 or start < self.start or start + length > self.end:
            raise BadInput(f"range [{start:#x}, +{length:#x}) is outside the snapshot "
                           f"[{self.start:#x}, {self.end:#x})")
        if length == 0:
            return False
        page = start >> self.page_bits
        end = -(-(start + length) >> self.page_bits)
        first = page - (self._page & ~63)
        return bitmap.any_set(Block(-1, self._words, None), first, end - page)


class DirtyMemory:
    """A dirty-memory map in shared memory: see DESIGN.md section 3."""

    # --- construction ---------------------------------------------------------
    def __init__(self, name: str, shared: _Shared) -> None:
        """Use create(), attach() or adopt()."""
        self.name = name
        self._shared = shared
        self._rcu: Any = shared.rcu
        self.flavor = shared.rcu.flavor
        hdr = shared.header
        self.page_bits = hdr.words.load(layout.H_PAGE_BITS, atomic.RELAXED)
        self.page_size = 1 << self.page_bits
        self.block_pages = hdr.words.load(layout.H_BLOCK_PAGES, atomic.RELAXED)
        self.tcg = bool(hdr.words.load(layout.H_TCG, atomic.RELAXED))
        self.max_readers = hdr.words.load(layout.H_MAX_READERS, atomic.RELAXED)
        self._gen_ptr = hdr.words.ptr(layout.H_GENERATION)
        self._coord_ptr = hdr.words.ptr(layout.H_COORD)
        self._req_ptr = hdr.words.ptr(layout.H_REQUEST)
        self._ram_ptr = hdr.words.ptr(layout.H_RAM_SIZE)
        self._next_block_ptr = hdr.words.ptr(layout.H_NEXT_BLOCK)
        self._gen = 0
        self._seen = -1  # the rcu counter value this handle's table is checked against
        self._table = Table(0, 0, ((),) * DIRTY_MEMORY_NUM, ())
        self._blocks: list[list[Block | None]] = [[] for _ in range(DIRTY_MEMORY_NUM)]
        self._block_segs: dict[int, Segment] = {}
        self._block_cache: dict[int, Block] = {}
        self._coord_lock = shared.coord_lock
        self._section = _Section(self)
        self._set_page, self._set_pages = bitmap.page_setters()
        # memb: set_dirty_flag's whole section in one C call (kernel only).
        self._memb_set_page = (atomic.batch.memb_set_page
                               if atomic.batch and self.flavor == "memb" else None)
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
        page_bits = _index(page_bits, "page_bits")
        if not 6 <= page_bits <= 30:
            raise BadInput(f"page_bits {page_bits} is not in [6, 30]")
        block_pages = _index(block_pages, "block_pages")
        if block_pages <= 0 or block_pages % 64 or block_pages > 1 << 32:
            raise BadInput(f"block_pages {block_pages} must be a positive multiple of 64, "
                           "at most 2**32")
        max_readers = _index(max_readers, "max_readers")
        if not 1 <= max_readers <= 4096:
            raise BadInput(f"max_readers {max_readers} is not in [1, 4096]")
        ram_size = _index(ram_size, "ram_size")
        if ram_size < 0 or ram_size % (1 << page_bits):
            raise BadInput(f"ram_size {ram_size:#x} must be a non-negative multiple of the "
                           f"page size {1 << page_bits:#x}")
        name = segment.new_map_name() if name is None else segment.check_map_name(name)
        try:
            hdr = Segment.create(layout.header_name(name), layout.header_size(max_readers),
                                 layout.KIND_HEADER)
        except FileExistsError:
            raise FileExistsError(f"map {name!r} already exists (segment "
                                  f"{layout.header_name(name)}): pick another name, or "
                                  "attach to it") from None
        try:
            w = hdr.words
            # Nobody can read the header before seal(): relaxed stores.
            for off, value in ((layout.H_PAGE_BITS, page_bits),
                               (layout.H_BLOCK_PAGES, block_pages),
                               (layout.H_TCG, int(bool(tcg))),
                               (layout.H_MAX_READERS, max_readers),
                               (layout.H_GP, 1),
                               (layout.H_GENERATION, 1),
                               (layout.H_COORD, my_owner_word())):
                w.store(off, value, atomic.RELAXED)
            t = Segment.create(layout.table_name(name, 1), layout.table_size(3, 0, 0),
                               layout.KIND_TABLE, 1)
            t.seal()
            t.close()
            hdr.seal()
        except BaseException:
            hdr.close()
            for n in segment.list_segments(name):
                segment.unlink(n)
            raise
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
        name = segment.check_map_name(name)
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
        name = segment.check_map_name(name)
        with _shared_lock:
            sh = _shared.get(name)
        # A process that reads the map already adopts in the flavor it reads in.
        dm = cls.attach(name, flavor="memb" if sh is None else sh.rcu.flavor)
        try:
            mine = my_owner_word()
            coord = atomic.load(dm._coord_ptr, atomic.ACQUIRE)
            if coord != mine:
                if coord and owner_alive(coord):
                    raise NotCoordinator(f"map {dm.name}: coordinator pid "
                                         f"{layout.owner_pid(coord)} is alive")
                # acq_rel: exactly one adopter wins; it sees everything the
                # old coordinator published.
                ok, now = atomic.compare_exchange(dm._coord_ptr, coord, mine,
                                                  atomic.ACQ_REL, atomic.ACQUIRE)
                if not ok:
                    raise NotCoordinator(f"map {dm.name}: pid {layout.owner_pid(now)} "
                                         "adopted it first")
                dm._reap_unreachable()
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

    @property
    def table(self) -> Table:
        """The table this process uses now."""
        return self._table

    def ram_blocks(self) -> list[tuple[int, int]]:
        """(offset, size) of every RAM block, as of the current table."""
        with self.read_section():
            return list(self._table.ram_blocks)

    # --- sections and the table cache --------------------------------------------
    def _begin(self) -> Table:
        """Enter a read-side section; return the table to use in it.

        The generation is re-read only when the grace-period counter moved
        since this handle last looked: the coordinator advances it after
        every publication, and a table published but not yet followed by an
        advance is one a grace period will still wait for us on."""
        r = self._rcu
        r.read_lock()
        if r.seen != self._seen:
            try:
                self._refresh()
            except BaseException:
                r.read_unlock()
                raise
            self._seen = r.seen
        return self._table

    def _end(self) -> None:
        self._rcu.read_unlock()

    def _refresh(self) -> Table:
        """Move to the newest table (always safe: newer tables only add)."""
        g = atomic.load(self._gen_ptr, atomic.SEQ_CST)
        if g != self._gen:
            self._load_table(g)
        return self._table

    def read_section(self) -> _Section:
        """``with dm.read_section():`` one read-side section around many ops."""
        return self._section

    def __enter__(self) -> DirtyMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def quiescent(self) -> None:
        """qsbr: a quiescent point; the table is re-read if it may have moved."""
        r = self._rcu
        # Only while online (inside a section): a table read outside one may
        # be unlinked before it is attached.  Offline, the next op catches up.
        if (r.quiescent() or r.seen != self._seen) and r.online:
            self._refresh()
            self._seen = r.seen
        if r.gp.pending:
            self._rcu.gp.run_callbacks()

    def _load_table(self, g: int) -> None:
        seg = Segment.attach(layout.table_name(self.name, g), layout.KIND_TABLE,
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
        t = Table(g, ram_size, tuple(tuple(ids[c * nb:(c + 1) * nb])
                                     for c in range(DIRTY_MEMORY_NUM)),
                  tuple(zip(ram[0::2], ram[1::2], strict=True)))
        self._set_table(t)

    def _set_table(self, t: Table) -> None:
        cache = self._block_cache
        self._blocks = [[cache.get(b) for b in ids] for ids in t.block_ids]
        self._table = t
        self._gen = t.generation

    def _block(self, client: int, idx: int) -> Block:
        b = self._blocks[client][idx]
        if b is None:
            b = self._map_block(self._table.block_ids[client][idx])
            self._blocks[client][idx] = b
        return b

    def _map_block(self, block_id: int, seg: Segment | None = None) -> Block:
        b = self._block_cache.get(block_id)
        if b is not None:
            return b
        if seg is None:
            seg = Segment.attach(layout.block_name(self.name, block_id), layout.KIND_BLOCK,
                                 layout.block_size(self.block_pages))
        self._block_segs[block_id] = seg
        b = Block(block_id, seg.array(layout.B_WORDS, self.block_pages // 64),
                  seg.words.base + layout.B_WORDS)
        self._block_cache[block_id] = b
        return b

    # --- validation ------------------------------------------------------------------
    def _range(self, t: Table, start: Any, length: Any) -> tuple[Table, int, int]:
        """The page range [page, end) of (start, length), checked against RAM."""
        if (start.__class__ is int and length.__class__ is int and 0 <= start
                and 0 < length <= t.ram_size - start):
            # The common case, checked without the conversions below.
            return t, start >> self.page_bits, -(-(start + length) >> self.page_bits)
        start = _index(start, "start")
        length = _index(length, "length")
        if length < 0:
            raise BadInput(f"length {length} is negative")
        if start < 0 or start + length > t.ram_size or (length == 0 and start > t.ram_size):
            t = self._refresh()  # a qsbr reader's table may be behind
            if start < 0 or start + length > t.ram_size or (length == 0 and start > t.ram_size):
                raise BadInput(f"range [{start:#x}, {start:#x}+{length:#x}) is outside guest "
                               f"RAM [0, {t.ram_size:#x})")
        page = start >> self.page_bits
        if length == 0:
            return t, page, page  # an empty range, even inside a page (DESIGN.md)
        return t, page, -(-(start + length) >> self.page_bits)

    def _page(self, t: Table, addr: Any) -> int:
        a = _index(addr, "address")
        if not 0 <= a < t.ram_size:
            t = self._refresh()
            if not 0 <= a < t.ram_size:
                raise BadInput(f"address {a:#x} is outside guest RAM [0, {t.ram_size:#x})")
        return a >> self.page_bits

    def _walk(self, page: int, end: int) -> Iterator[tuple[int, int, int]]:
        return bitmap.walk(page, end, self.block_pages)

    def _over(self, op: int, client: int, page: int, end: int) -> int:
        """bitmap.walk_blocks over pages [page, end) of ``client``: one call
        (one C call on the kernel), after mapping any block it names."""
        blocks = self._blocks[client]
        while (r := bitmap.walk_blocks(blocks, page, end, self.block_pages, op)) < 0:
            self._block(client, -1 - r)
        return r

    # --- accessors -----------------------------------------------------------------
    def set_dirty_flag(self, addr: int, client: int) -> None:
        """Mark the page holding ``addr`` dirty for ``client``."""
        # The hottest op, written out: past the RCU check, one C call does
        # the argument checks, page -> block, word and bit, and the op
        # (release: whoever takes the bit, with acquire, sees what was
        # written before it: the guest page).  Anything it declines (bad
        # input, a block not mapped yet) takes the slow path.
        r = self._rcu
        if r.online and r.seen == self._seen:
            # qsbr, online, table current: already inside a section.
            if self._set_page(self._blocks, client, addr, self._table.ram_size,
                              self.page_bits, self.block_pages, _RELEASE):
                return
        elif self._memb_set_page and r.seen == self._seen:
            # memb on the kernel: open the section, set the bit, close it,
            # in one C call (Rcu.compiled_section), if the counter still
            # reads `seen` (else the slow path re-reads the table).
            words = r.compiled_section()
            if words and self._memb_set_page(*words, r.seen, self._blocks, client, addr,
                                             self._table.ram_size, self.page_bits,
                                             self.block_pages, _RELEASE):
                return
        self._set_dirty_flag_slow(addr, client)

    def _set_dirty_flag_slow(self, addr: Any, client: Any) -> None:
        client = _client(client)
        t = self._begin()
        try:
            if not self._set_page(self._blocks, client, addr, t.ram_size, self.page_bits,
                                  self.block_pages, _RELEASE):
                idx, bit = divmod(self._page(t, addr), self.block_pages)
                bitmap.set_range(self._block(client, idx), bit, 1)  # release: as above
        finally:
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
        t = self._begin()
        try:
            t, page, end = self._range(t, start, length)
            return bool(self._over(bitmap.WALK_ANY, client, page, end))
        finally:
            self._end()

    def all_dirty(self, start: int, length: int, client: int) -> bool:
        """Is every page of [start, start+length) dirty for ``client``?"""
        client = _client(client)
        t = self._begin()
        try:
            t, page, end = self._range(t, start, length)
            return bool(self._over(bitmap.WALK_ALL, client, page, end))
        finally:
            self._end()

    def range_includes_clean(self, start: int, length: int, mask: int) -> int:
        """The clients of ``mask`` for which some page of the range is clean."""
        mask = _mask(mask)
        t = self._begin()
        try:
            t, page, end = self._range(t, start, length)
            clean = 0
            for c in _clients(mask):
                if not self._over(bitmap.WALK_ALL, c, page, end):
                    clean |= 1 << c
            return clean
        finally:
            self._end()

    def set_dirty_range(self, start: int, length: int, mask: int) -> None:
        """Mark [start, start+length) dirty for the clients of ``mask``."""
        mask = _mask(mask)
        t = self._begin()
        try:
            t, page, end = self._range(t, start, length)
            for c in _clients(mask):
                self._over(bitmap.WALK_SET, c, page, end)
        finally:
            self._end()

    def test_and_clear_dirty(self, start: int, length: int, client: int) -> bool:
        """Clear [start, start+length) for ``client``; True if any page was dirty."""
        client = _client(client)
        t = self._begin()
        try:
            t, page, end = self._range(t, start, length)
            if end - page < self.block_pages:
                # No block covered whole (nothing to swap): one call.
                return bool(self._over(bitmap.WALK_TAKE, client, page, end))
        finally:
            self._end()
        dirty = False

        def merge(g0: int, taken: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
            nonlocal dirty
            dirty = dirty or bool(taken.any())
        self._take(client, start, length, merge)
        return dirty

    def set_dirty_lebitmap(self, bitmap_: Any, start: int, pages: int) -> None:
        """Merge a little-endian bitmap (bit i = page of ``start`` + i), as KVM
        returns it: VGA and MIGRATION always, CODE only for a tcg map."""
        bits, nbits = _as_words(bitmap_, "bitmap")
        pages = _index(pages, "pages")
        if pages < 0:
            raise BadInput(f"pages {pages} is negative")
        if nbits < pages:
            raise BadInput(f"bitmap holds {nbits} bits, fewer than pages={pages}")
        start = _index(start, "start")
        clients = _clients(DIRTY_CLIENTS_ALL if self.tcg else DIRTY_CLIENTS_NOCODE)
        pb = self.page_bits
        t = self._begin()
        try:
            t, page0, end = self._range(t, (start >> pb) << pb, pages << pb)
            for idx, off, num in self._walk(page0, end):
                k = idx * self.block_pages + off - page0   # source bit of block bit `off`
                for c in clients:
                    bitmap.or_bitmap(self._block(c, idx), off, num, bits, k)
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
            npages = t.ram_size >> self.page_bits
            if lo < 0 or hi >= npages:
                t = self._refresh()
                npages = t.ram_size >> self.page_bits
                if lo < 0 or hi >= npages:
                    raise BadInput(f"page numbers [{lo}, {hi}] are outside guest RAM "
                                   f"pages [0, {npages})")
            p = np.ascontiguousarray(pages, dtype=np.int64)
            # release: as set_dirty_flag.  One call; it names a block to map
            # first if one is not mapped yet.
            while (idx := self._set_pages(self._blocks[client], p, self.block_pages,
                                          _RELEASE)) >= 0:
                self._block(client, idx)
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
        and zeroed for reuse: no atomics at all."""
        bp, bw = self.block_pages, self.block_pages >> 6
        swap: list[int] = []
        t = self._begin()
        try:
            t, page, end = self._range(t, start, length)
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
            for idx, block in zip(swap, self._swap_out(client, swap), strict=True):
                merge(idx * bw, block.words)
                self._recycle(block)

    def _swap_out(self, client: int, idxs: list[int]) -> list[Block]:
        """Coordinator: put zeroed blocks in place of ``client``'s blocks
        ``idxs``; return the old ones once no writer can reach them."""
        self._restore_unmerged()
        with self._coord_lock:
            t = self._refresh()
            retired = self._publish(list(t.ram_blocks), swap=[(client, i) for i in idxs])
        pending = [(client, i, b) for i, b in zip(idxs, retired, strict=True)]
        self._shared.unmerged.extend(pending)
        # A grace period: every section that could have found the old blocks
        # has ended, and its bit sets happen before our reads (the waiter's
        # seq_cst slot loads pair with the readers' release unlocks).  If the
        # wait is interrupted, the bits stay in `unmerged` and go back into
        # the live blocks at the next take or close: nothing is lost.
        self._rcu.synchronize()
        for p in pending:
            self._shared.unmerged.remove(p)
        return [self._map_block(b) for b in retired]

    def _recycle(self, block: Block) -> None:
        block.words[:] = 0  # nobody can reach it: plain stores
        self._shared.pool.append(block.block_id)

    def _restore_unmerged(self, timeout: float | None = None) -> None:
        """Put back the bits of blocks retired by a take whose grace period
        was interrupted (they were taken by nobody)."""
        if not self._shared.unmerged:
            return
        self._rcu.synchronize(timeout)
        bw = self.block_pages >> 6
        t = self._begin()
        try:
            for client, idx, bid in list(self._shared.unmerged):
                old = self._map_block(bid)
                if idx < t.num_blocks:
                    bitmap.or_words(self._block(client, idx), 0, old.words[:bw].copy())
                self._shared.unmerged.remove((client, idx, bid))
                self._recycle(old)
        finally:
            self._end()

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

    # --- the coordinator ----------------------------------------------------------------
    def _require_coordinator(self, what: str) -> None:
        self._open_check()
        coord = atomic.load(self._coord_ptr, atomic.ACQUIRE)
        if coord != my_owner_word():
            who = f"pid {layout.owner_pid(coord)}" if coord else "no process"
            raise NotCoordinator(f"{what} is for the coordinator of map {self.name} ({who}); "
                                 f"this is pid {os.getpid()}: use request_extend() or adopt()")

    def _size(self, size: Any, what: str) -> int:
        n = _index(size, what)
        if n <= 0 or n % self.page_size:
            raise BadInput(f"{what} {n:#x} must be a positive multiple of the page size "
                           f"{self.page_size:#x}")
        return n

    def _publish(self, ram_blocks: list[tuple[int, int]],
                 dirty: tuple[int, int] | None = None,
                 swap: list[tuple[int, int]] = ()) -> list[int]:  # type: ignore[assignment]
        """Build and publish the next table for ``ram_blocks``; the old one is
        unlinked after a grace period.  ``dirty`` (offset, size) is marked
        dirty for every client before the table is published, so new RAM is
        dirty even if this process dies right after.  Each (client, index)
        of ``swap`` gets a zeroed block; the ids of the blocks it replaced
        are returned.  Nothing changes if this fails."""
        t = self._refresh()
        ram_blocks = sorted(ram_blocks)
        ram_size = max((o + s for o, s in ram_blocks), default=0)
        pages = ram_size >> self.page_bits
        need = max(t.num_blocks, -(-pages // self.block_pages))
        if need > MAX_BLOCKS:
            raise BadInput(f"RAM size {ram_size:#x} needs {need} blocks of "
                           f"{self.block_pages} pages; at most {MAX_BLOCKS} are supported")
        ids = [list(t.block_ids[c]) for c in range(DIRTY_MEMORY_NUM)]
        made: list[tuple[int, Segment]] = []
        made_table = False
        g = t.generation + 1
        tname = layout.table_name(self.name, g)
        pool = self._shared.pool
        taken_from_pool: list[int] = []
        retired: list[int] = []

        def fresh(c: int) -> int:
            if pool:
                taken_from_pool.append(pool.pop())
                return taken_from_pool[-1]
            # relaxed: only the coordinator allocates ids; the word lives in
            # the header so an adopter goes on from it.
            bid = atomic.fetch_add(self._next_block_ptr, 1, atomic.RELAXED)
            seg = Segment.create(layout.block_name(self.name, bid),
                                 layout.block_size(self.block_pages), layout.KIND_BLOCK, c, bid)
            made.append((bid, seg))
            seg.seal()
            return bid

        placed: list[tuple[int, int]] = []
        try:
            for c in range(DIRTY_MEMORY_NUM):
                for idx in range(t.num_blocks, need):
                    ids[c].append(fresh(c))
                    placed.append((c, idx))
            for c, idx in swap:
                retired.append(ids[c][idx])
                ids[c][idx] = fresh(c)
                placed.append((c, idx))
            for bid, seg in made:
                self._map_block(bid, seg)
            for c, idx in placed:
                # Where the block sits, for an adopter that finds it retired
                # but not yet taken (_reap_unreachable gives its bits back).
                w = self._block_segs[self._map_block(ids[c][idx]).block_id].words
                w.store(layout.P_ARG0, c, atomic.RELAXED)
                w.store(layout.P_ARG2, idx, atomic.RELAXED)
            if dirty is not None:
                # Before the publication: no reader can see the new blocks
                # yet, and setting bits in blocks they can see is harmless.
                for idx, off, num in self._walk(dirty[0] >> self.page_bits,
                                                (dirty[0] + dirty[1]) >> self.page_bits):
                    for c in range(DIRTY_MEMORY_NUM):
                        bitmap.set_range(self._map_block(ids[c][idx]), off, num)
            flat = [b for c in ids for b in c]
            tseg = Segment.create(tname, layout.table_size(DIRTY_MEMORY_NUM, need,
                                                           len(ram_blocks)),
                                  layout.KIND_TABLE, g)
            made_table = True
            try:
                w = tseg.words
                w.store(layout.T_RAM_SIZE, ram_size, atomic.RELAXED)
                w.store(layout.T_NUM_BLOCKS, need, atomic.RELAXED)
                w.store(layout.T_NUM_RAM_BLOCKS, len(ram_blocks), atomic.RELAXED)
                body = tseg.array(layout.T_BLOCK_IDS, len(flat) + 2 * len(ram_blocks))
                body[:len(flat)] = flat
                body[len(flat):] = [x for blk in ram_blocks for x in blk]
                del body
                tseg.seal()
            finally:
                tseg.close()
        except BaseException:
            pool.extend(taken_from_pool)
            for bid, seg in made:
                self._block_cache.pop(bid, None)
                self._block_segs.pop(bid, None)
                seg.close()
                segment.unlink(seg.name)
            if made_table:  # not a name someone else holds (FileExistsError)
                segment.unlink(tname)
            raise
        # The publication.  seq_cst: the updater's half of the Dekker pair; a
        # reader that loads g finds the sealed table and its sealed blocks.
        atomic.store(self._gen_ptr, g, atomic.SEQ_CST)
        # Advance the grace-period counter: readers re-read the generation
        # only when it moved (see _begin).
        self._rcu.gp.start_poll()
        # release: request_extend() waiters that see the size see the table.
        atomic.store(self._ram_ptr, ram_size, atomic.RELEASE)
        self._set_table(Table(g, ram_size, tuple(tuple(c) for c in ids), tuple(ram_blocks)))
        old = layout.table_name(self.name, t.generation)
        self._rcu.call_rcu(lambda: segment.unlink(old))
        return retired

    def ram_block_add(self, size: int) -> int:
        """Place a RAM block of ``size`` bytes (the smallest gap that fits,
        else the end), grow the bitmap if needed, mark it dirty; its offset."""
        self._require_coordinator("ram_block_add()")
        size = self._size(size, "RAM block size")
        with self._coord_lock:
            blocks = list(self._refresh().ram_blocks)
            offset = find_ram_offset(blocks, size)
            self._publish(blocks + [(offset, size)], dirty=(offset, size))
            # Again after the publication: a sync of the old range may have
            # taken the bits set before it.
            self.set_dirty_range(offset, size, DIRTY_CLIENTS_ALL)
        return offset

    def ram_block_remove(self, offset: int) -> None:
        """Forget the RAM block at ``offset``; its bitmap blocks stay for reuse."""
        self._require_coordinator("ram_block_remove()")
        offset = _index(offset, "offset")
        with self._coord_lock:
            blocks = list(self._refresh().ram_blocks)
            found = [b for b in blocks if b[0] == offset]
            if not found:
                raise BadInput(f"no RAM block starts at {offset:#x}; blocks start at "
                               f"{[hex(o) for o, _ in blocks]}")
            blocks.remove(found[0])
            self._publish(blocks)

    def extend(self, new_ram_size: int) -> None:
        """Grow guest RAM to ``new_ram_size`` (a new RAM block at the end,
        dirty for every client).  No-op if it is not larger."""
        self._require_coordinator("extend()")
        new_ram_size = self._size(new_ram_size, "RAM size")
        with self._coord_lock:
            t = self._refresh()
            if new_ram_size <= t.ram_size:
                return
            added = (t.ram_size, new_ram_size - t.ram_size)
            self._publish(list(t.ram_blocks) + [added], dirty=added)
            self.set_dirty_range(*added, DIRTY_CLIENTS_ALL)

    def request_extend(self, new_ram_size: int, timeout: float | None = None) -> None:
        """Ask the coordinator to grow RAM to ``new_ram_size`` and wait until
        it is published (any process)."""
        new_ram_size = self._size(new_ram_size, "RAM size")
        need = -(-(new_ram_size >> self.page_bits) // self.block_pages)
        if need > MAX_BLOCKS:  # never posted: the coordinator could not grant it
            raise BadInput(f"RAM size {new_ram_size:#x} needs {need} blocks of "
                           f"{self.block_pages} pages; at most {MAX_BLOCKS} are supported")
        if self.is_coordinator:
            self.extend(new_ram_size)
            return
        # Post the largest request: a CAS-max (acq_rel; the serve loop loads
        # it with acquire).
        cur = atomic.load(self._req_ptr, atomic.ACQUIRE)
        while cur < new_ram_size:
            ok, cur = atomic.compare_exchange(self._req_ptr, cur, new_ram_size,
                                              atomic.ACQ_REL, atomic.ACQUIRE)
            if ok:
                break
        deadline = None if timeout is None else time.monotonic() + timeout
        # A qsbr reader waits offline: it must not hold up grace periods.
        r = self._rcu
        offline = r.flavor == "qsbr" and r.online and r.nesting == 0
        if offline:
            r.thread_offline()
        try:
            self._await_ram_size(new_ram_size, timeout, deadline)
        finally:
            if offline:
                r.thread_online()
        self._seen = -1  # re-read the table at the next op

    def _await_ram_size(self, new_ram_size: int, timeout: float | None,
                        deadline: float | None) -> None:
        next_check = 0.0
        while self.ram_size < new_ram_size:
            now = time.monotonic()
            if now >= next_check:
                coord = atomic.load(self._coord_ptr, atomic.ACQUIRE)
                if not coord or not owner_alive(coord):
                    raise CoordinatorGone(
                        f"map {self.name}: no live coordinator to grant RAM size "
                        f"{new_ram_size:#x}; call DirtyMemory.adopt({self.name!r})")
                next_check = now + 0.05
            if deadline is not None and now >= deadline:
                raise GraceTimeout(
                    f"map {self.name}: coordinator pid {layout.owner_pid(coord)} did not grant "
                    f"RAM size {new_ram_size:#x} within {timeout} s (is it calling serve()?)")
            time.sleep(_REQUEST_POLL)

    def serve(self, stop_event: Any = None) -> None:
        """Coordinator: grant request_extend() calls until ``stop_event`` is set."""
        self._require_coordinator("serve()")
        while stop_event is None or not stop_event.is_set():
            self.serve_once()
            if stop_event is not None and hasattr(stop_event, "wait"):
                stop_event.wait(_SERVE_POLL)
            else:
                time.sleep(_SERVE_POLL)

    def serve_once(self) -> bool:
        """Grant a pending request, run due call_rcu callbacks; True if it grew."""
        self._open_check()  # the header may be unmapped
        grew = False
        req = atomic.load(self._req_ptr, atomic.ACQUIRE)
        if req > self.ram_size:
            self.extend(req)
            grew = True
        if req:
            # Granted (or already met): withdraw it, so that RAM removed later
            # is not grown back by a stale request.  A CAS: a larger request
            # posted meanwhile stays for the next round.
            atomic.compare_exchange(self._req_ptr, req, 0, atomic.ACQ_REL, atomic.RELAXED)
        if self._rcu.gp.pending:
            self._rcu.gp.run_callbacks()
        return grew

    def _reap_unreachable(self) -> None:
        """After adoption: finish what the old coordinator left half done.

        - A table newer than the published generation was never published,
          so no reader can hold it: unlinked now (the next table takes its name).
        - A generation published before the header's RAM size was stored: the
          old coordinator may have died before marking that RAM dirty too; mark
          it for every client (a spurious dirty page costs a copy, a missing one
          loses data), then store the size.
        - Older tables and blocks in no table go after a grace period."""
        t = self._refresh()
        # acquire / release: as in _publish.
        shown = atomic.load(self._ram_ptr, atomic.ACQUIRE)
        if shown != t.ram_size:
            if shown < t.ram_size:
                self.set_dirty_range(shown, t.ram_size - shown, DIRTY_CLIENTS_ALL)
            atomic.store(self._ram_ptr, t.ram_size, atomic.RELEASE)
        keep = {layout.header_name(self.name), layout.table_name(self.name, t.generation)}
        keep.update(layout.block_name(self.name, b) for ids in t.block_ids for b in ids)
        stale = []
        for n in segment.list_segments(self.name):
            role = n.rsplit("-", 1)[1]
            if n in keep or role[:1] not in ("t", "b") or not role[1:].isdigit():
                continue
            if role[0] == "t" and int(role[1:]) > t.generation:
                segment.unlink(n)
            else:
                stale.append(n)

        published = t.num_blocks  # positions a block could have been retired from

        def reap() -> None:
            self._give_back([int(n.rsplit("-b", 1)[1]) for n in stale
                             if n.rsplit("-", 1)[1][0] == "b"], published)
            for n in stale:
                segment.unlink(n)
        self._rcu.call_rcu(reap)

    def _give_back(self, block_ids: list[int], published: int) -> None:
        """After a grace period: OR the bits of blocks no table references
        (retired by a take whose coordinator died before reading them) back
        into the live block at the position they were taken from.  A block
        whose position is at or past ``published`` (the number of blocks when
        this process adopted) was made by a growth that never got published:
        its bits (new RAM marked dirty early) belong to nobody."""
        self._begin()
        try:
            for bid in block_ids:
                try:
                    old = self._map_block(bid)
                except CorruptSegment:
                    continue  # never sealed: created by a growth that died
                w = self._block_segs[bid].words
                c = w.load(layout.P_ARG0, atomic.RELAXED)
                idx = w.load(layout.P_ARG2, atomic.RELAXED)
                if c < DIRTY_MEMORY_NUM and idx < published and old.words.any():
                    bitmap.or_words(self._block(c, idx), 0, old.words.copy())
        finally:
            self._end()
        for bid in block_ids:
            self._block_cache.pop(bid, None)
            seg = self._block_segs.pop(bid, None)
            if seg is not None:
                seg.close()

    # --- leaving -----------------------------------------------------------------
    def close(self) -> None:
        """Leave: free this process's slot (with its last handle), unmap."""
        if self._closed:
            return
        if self._rcu.nesting:
            raise ShmDirtyError(f"map {self.name}: close() inside a read-side section")
        with _shared_lock:
            last = self._shared.refs == 1
            if last and self.is_coordinator:
                try:
                    self._restore_unmerged(timeout=1.0)
                    self._rcu.barrier(timeout=1.0)
                except GraceTimeout:
                    pass  # an adopter reaps what is left
                # release: the next coordinator sees all we published.
                atomic.compare_exchange(self._coord_ptr, my_owner_word(), 0,
                                        atomic.ACQ_REL, atomic.RELAXED)
            self._closed = True
            self._rcu = _CLOSED
            self._blocks = []
            self._block_cache.clear()
            for seg in self._block_segs.values():
                seg.close()
            self._block_segs.clear()
            self._drop(self.name, self._shared)

    def destroy(self) -> None:
        """Coordinator: unlink every segment of this map, then close."""
        self._require_coordinator("destroy()")
        if self._rcu.nesting:  # as close(), refused before anything is unlinked
            raise ShmDirtyError(f"map {self.name}: destroy() inside a read-side section")
        for n in segment.list_segments(self.name):
            segment.unlink(n)
        self._rcu.gp._callbacks.clear()
        self._rcu.gp._batch.clear()
        self._shared.unmerged.clear()
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<DirtyMemory {self.name} closed>"
        return (f"<DirtyMemory {self.name} ram_size={self.ram_size:#x} "
                f"generation={self._gen} flavor={self.flavor}>")


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
    """Stands in for the Rcu of a closed handle: every op fails clearly."""

    nesting = 0
    flavor = "closed"

    def read_lock(self) -> bool:
        raise ShmDirtyError("this DirtyMemory handle is closed")

    def __getattr__(self, name: str) -> Any:
        raise ShmDirtyError("this DirtyMemory handle is closed")


_CLOSED: Any = _Closed()


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


def _unpickle(name: str, flavor: str) -> DirtyMemory:
    return DirtyMemory.attach(name, flavor=flavor)
