"""A pure-Python reference model of the seed's dirty-memory semantics.

The seed is QEMU's "memory: RCU ram_list.dirty_memory[] for safe RAM hotplug"
(../shared/seed/000_066fc1290194f6ed.txt).  The model has no shared memory,
no blocks and no RCU: each client's bitmap is one Python int (bit p is page
p), RAM blocks are a dict {offset: size}.  It is the independent side of the
tests that drive ``shmdirty.DirtyMemory`` (tests/test_dirty_model.py), like
h11's tests/test_against_stdlib_http.py.  numpy appears only to read and
write the arrays that callers pass in.

SEMANTIC CHOICES -- where DESIGN.md section 3 and issue 4 are silent.
dirty.py must match every one of them (the hypothesis machine checks it):

 1. Integers.  Every address, length, size, offset, page count, client and
    mask is a Python int or a numpy integer scalar (anything with
    ``__index__``), but never a bool (``True``/``np.True_``).  Anything else
    (float, str, None, bool) is a ValueError, not a TypeError.
 2. Ranges.  (start, length) is valid iff ``0 <= start``, ``0 <= length`` and
    ``start + length <= ram_size`` (exact Python arithmetic: a length that
    would wrap a 64-bit ram_addr_t is simply too long), and every byte of
    it is guest RAM: a hole left by ram_block_remove is outside RAM like
    the space past its end (rule 11; issue 17).  So for length 0,
    ``start == ram_size`` is valid (an empty range at the end), and an
    empty range inside a hole too.  start need not be page aligned.
    sync_dirty_bitmap alone accepts a range over holes (rule 8).
 3. Page range of a valid (start, length): ``start >> page_bits`` up to
    ``ceil((start + length) / page_size)`` exclusive -- except that length 0
    is ALWAYS the empty page range, even for an unaligned start (the seed's
    get_dirty would look at one page there; DESIGN fixes length 0 as:
    get_dirty False, all_dirty True, test_and_clear_dirty False, and every
    set / sync / snapshot of length 0 changes nothing, sync returns 0).
 4. Single addresses (set_dirty_flag, get_dirty_flag): ``addr`` inside a
    RAM block (so ``0 <= addr < ram_size`` and not in a hole); the page is
    ``addr >> page_bits``.
 5. client in 0..2, mask in 0..7.  A mask of 0 is valid and does nothing.
    range_includes_clean returns the subset of ``mask`` whose clients have at
    least one clean page in the range (0 for length 0).
 6. Validation comes first: an invalid call raises ValueError and changes
    nothing at all (no bitmap bit, no RAM block, no ram_size, no dest word).
 7. set_dirty_lebitmap(bitmap, start, pages):
    - bitmap is bytes-like (``bytes``, ``bytearray``, ``memoryview``) or a
      1-D numpy array of dtype uint64 (kind 'u', itemsize 8).  Anything
      else (list, str, int64 / uint32 array, 2-D array) is a ValueError.
    - bit i of the bitmap is bit ``i % 8`` of byte ``i // 8`` (bytes) or bit
      ``i % 64`` of the VALUE of word ``i // 64`` (array); the two agree for
      little-endian words.  Bit i marks page ``(start >> page_bits) + i``.
    - it must hold at least ``pages`` bits (a bytes object need not be a
      multiple of 8 long); bits at index >= pages are ignored (exact range).
    - valid iff ``0 <= start <= ram_size``, ``pages >= 0``,
      ``(start >> page_bits) + pages <= ram_size >> page_bits`` and those
      pages are RAM (no hole); start need not be page or word aligned.
    - sets VGA and MIGRATION; CODE too only when the map has tcg=True.
 8. sync_dirty_bitmap(dest, start, length) -> int:
    - dest is a writeable 1-D numpy uint64 array; bit p (page p, global) is
      bit ``p % 64`` of the value of ``dest[p // 64]``.  Wrong type/dtype,
      not 1-D or read-only: ValueError (checked even for length 0).
    - any range inside [0, ram_size] (rule 2, holes allowed: the pages of
      a hole are not RAM, are not taken and do not count); start need not
      be word (64-page) aligned, nor even page aligned.
    - dest must hold the last page of the range: ``64 * len(dest) >= end
      page``, else ValueError (no requirement for an empty range).
    - for each page in the page range whose MIGRATION bit is set: clear it,
      set the page's dest bit; return how many of those dest bits were 0
      before.  Only RAM pages (rule 11).  Pages outside the range and the
      other clients are untouched.
 9. set_dirty_pages(pages, client): pages is a 1-D numpy array of integer
    dtype (kind 'i' or 'u'); every value a RAM page (``0 <= p < ram_size >>
    page_bits``, not in a hole), else ValueError.  Duplicates are fine, an
    empty array does nothing.  A list, a float or bool array, or a 2-D
    array is a ValueError.
10. snapshot_and_clear_dirty(start, length, client): validate like any
    range; take and clear exactly the page range (rule 3).  The snapshot's
    window is ``[(start >> page_bits) * page_size, ceil((start + length) /
    page_size) * page_size)``.  snap.get_dirty(s, l) is valid iff ``l >= 0``
    and ``window_lo <= s`` and ``s + l <= window_hi`` (ValueError otherwise);
    it answers from the recorded bits with the page-range rule (length 0:
    False).  Page bits of the window that were not taken read as clean.
    A snapshot never changes and never looks at the map again.
11. RAM blocks.  ram_size is QEMU's last_ram_offset(): the end of the
    highest RAM block, 0 with no blocks.
    - ram_block_add(size): size a positive multiple of page_size.  Placement
      is best fit over the gaps between blocks sorted by offset, INCLUDING
      the gap [0, first block) (QEMU's find_ram_offset skips that one; we
      do not), the smallest gap that fits wins, ties go to the lowest
      offset; if no gap fits, the block goes at ram_size.  The block's pages
      become dirty for all three clients.  Returns the offset.
    - ram_block_remove(offset): offset must be the start of an existing RAM
      block, else ValueError.  No bit changes.  ram_size shrinks if that was
      the highest block.  A hole left in the middle is NOT RAM (issue 17):
      every accessor refuses it (rules 2, 4, 7, 9) as it refuses the space
      past ram_size, and nothing counts its bits (dirty_pages, sync); it
      keeps them unseen until an add fills it, marking it dirty anyway.
    - extend(new_ram_size): new_ram_size a positive multiple of page_size
      (else ValueError, even when it is smaller than ram_size); if it is
      larger than ram_size, a RAM block [ram_size, new_ram_size) is added
      there (not best fit), dirty for all clients, and it can later be
      removed by its offset; otherwise nothing happens.
    - create(ram_size): ram_size a non-negative multiple of page_size; a
      positive one is the first RAM block [0, ram_size), dirty for all.
    - Pages beyond ram_size keep whatever bits they had, but nothing can see
      them: the only way back below ram_size is an add or extend, which
      marks its pages dirty for all clients.
12. Results are plain Python objects: ``bool`` (not numpy.bool_) from
    get_dirty_flag, get_dirty, all_dirty, test_and_clear_dirty and
    snap.get_dirty; ``int`` from range_includes_clean, sync_dirty_bitmap and
    ram_block_add; None from the setters, ram_block_remove and extend.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

DIRTY_MEMORY_VGA = 0
DIRTY_MEMORY_CODE = 1
DIRTY_MEMORY_MIGRATION = 2
DIRTY_MEMORY_NUM = 3
DIRTY_CLIENTS_ALL = (1 << DIRTY_MEMORY_NUM) - 1
DIRTY_CLIENTS_NOCODE = DIRTY_CLIENTS_ALL & ~(1 << DIRTY_MEMORY_CODE)
DIRTY_MEMORY_BLOCK_SIZE = 256 * 1024 * 8


def as_int(what: str, value: Any) -> int:
    """``value`` as an int (rule 1), or ValueError naming ``what``."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be an integer, not a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, not {type(value).__name__}") from None


def _is_u64_array(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "u" and a.dtype.itemsize == 8


class RefSnapshot:
    """What snapshot_and_clear_dirty took: the bits of pages [first, first+n)."""

    def __init__(self, page_bits: int, lo: int, hi: int, first: int, bits: int) -> None:
        self.page_bits = page_bits
        self.lo = lo          # window, bytes: [lo, hi)
        self.hi = hi
        self.first = first    # page number of bit 0 of ``bits``
        self.bits = bits

    def get_dirty(self, start: Any, length: Any) -> bool:
        """True if a page of [start, start+length) was dirty when taken."""
        start = as_int("start", start)
        length = as_int("length", length)
        if length < 0 or start < self.lo or start + length > self.hi:
            raise ValueError(
                f"range [{start}, {start}+{length}) outside the snapshot [{self.lo}, {self.hi})"
            )
        if length == 0:
            return False
        ps = 1 << self.page_bits
        first = start >> self.page_bits
        end = (start + length + ps - 1) >> self.page_bits
        mask = ((1 << (end - first)) - 1) << (first - self.first)
        return bool(self.bits & mask)


class RefDirtyMemory:
    """The seed's accessors over three plain per-page bitmaps, plus RAM blocks."""

    def __init__(
        self,
        ram_size: int = 0,
        page_bits: int = 12,
        block_pages: int = DIRTY_MEMORY_BLOCK_SIZE,
        tcg: bool = False,
    ) -> None:
        page_bits = as_int("page_bits", page_bits)
        block_pages = as_int("block_pages", block_pages)
        ram_size = as_int("ram_size", ram_size)
        if not 0 < page_bits < 48:
            raise ValueError(f"page_bits {page_bits} outside 1..47")
        if block_pages <= 0 or block_pages % 64:
            raise ValueError(f"block_pages {block_pages} must be a positive multiple of 64")
        self.page_bits = page_bits
        self.page_size = 1 << page_bits
        self.block_pages = block_pages
        self.tcg = bool(tcg)
        if ram_size < 0 or ram_size % self.page_size:
            raise ValueError(
                f"ram_size {ram_size} must be a non-negative multiple of {self.page_size}"
            )
        self.bitmaps = [0] * DIRTY_MEMORY_NUM   # bit p of bitmaps[c]: page p dirty for c
        self.blocks: dict[int, int] = {}        # RAM blocks: offset -> size, bytes
        self.bitmap_pages = 0                   # high-water mark: the bitmap never shrinks
        if ram_size:
            self._add_block(0, ram_size)

    # -- derived state ----------------------------------------------------------
    @property
    def ram_size(self) -> int:
        """last_ram_offset(): the end of the highest RAM block."""
        return max((o + s for o, s in self.blocks.items()), default=0)

    @property
    def ram_pages(self) -> int:
        return self.ram_size >> self.page_bits

    @property
    def ram_mask(self) -> int:
        """Bit p set for every page p of guest RAM (holes are not RAM)."""
        m = 0
        for o, sz in self.blocks.items():
            m |= self._span(o >> self.page_bits, (o + sz) >> self.page_bits)
        return m

    def covers(self, lo: int, end: int) -> bool:
        """Are bytes [lo, end) RAM (rule 2; an empty range: True)?"""
        if end <= lo:
            return True
        first, last = lo >> self.page_bits, (end - 1) >> self.page_bits
        span = self._span(first, last + 1)
        return self.ram_mask & span == span

    def state(self) -> tuple[int, tuple[int, ...], tuple[tuple[int, int], ...]]:
        """Everything an observer could compare: ram_size, visible bits, blocks."""
        visible = self.ram_mask
        return (
            self.ram_size,
            tuple(b & visible for b in self.bitmaps),
            tuple(sorted(self.blocks.items())),
        )

    def dirty_pages(self, client: int) -> list[int]:
        """The dirty pages of ``client`` in guest RAM, ascending."""
        b = self.bitmaps[client] & self.ram_mask
        out = []
        while b:
            low = b & -b
            out.append(low.bit_length() - 1)
            b ^= low
        return out

    def runs(self, client: int) -> list[tuple[int, int, bool]]:
        """Maximal runs (first page, page count, dirty) covering guest RAM
        (a run never crosses a hole)."""
        out: list[tuple[int, int, bool]] = []
        for o, sz in sorted(self.blocks.items()):
            out += self._runs(client, o >> self.page_bits, (o + sz) >> self.page_bits)
        return out

    def _runs(self, client: int, p: int, n: int) -> list[tuple[int, int, bool]]:
        out: list[tuple[int, int, bool]] = []
        b = self.bitmaps[client]
        while p < n:
            y = b >> p
            dirty = bool(y & 1)
            z = ~y if dirty else y          # the run is the trailing zeros of z
            run = n - p if z == 0 else min(n - p, (z & -z).bit_length() - 1)
            out.append((p, run, dirty))
            p += run
        return out

    # -- validation ---------------------------------------------------------------
    def _client(self, client: Any) -> int:
        c = as_int("client", client)
        if not 0 <= c < DIRTY_MEMORY_NUM:
            raise ValueError(f"client {c} outside 0..{DIRTY_MEMORY_NUM - 1}")
        return c

    def _mask(self, mask: Any) -> int:
        m = as_int("mask", mask)
        if not 0 <= m <= DIRTY_CLIENTS_ALL:
            raise ValueError(f"mask {m} outside 0..{DIRTY_CLIENTS_ALL}")
        return m

    def _addr(self, addr: Any) -> int:
        a = as_int("addr", addr)
        if not 0 <= a < self.ram_size or not self.covers(a, a + 1):
            raise ValueError(f"address {a:#x} outside guest RAM")
        return a >> self.page_bits

    def _range(self, start: Any, length: Any, holes: bool = False) -> tuple[int, int]:
        """The page range [first, end) of a valid (start, length) (rules 2, 3;
        ``holes``: a range over holes is valid, rule 8)."""
        s = as_int("start", start)
        n = as_int("length", length)
        if n < 0:
            raise ValueError(f"length {n} is negative")
        if s < 0 or s + n > self.ram_size or not (holes or self.covers(s, s + n)):
            raise ValueError(f"range [{s:#x}, {s:#x}+{n:#x}) outside guest RAM")
        first = s >> self.page_bits
        if n == 0:
            return first, first
        return first, (s + n + self.page_size - 1) >> self.page_bits

    def _size(self, what: str, size: Any) -> int:
        n = as_int(what, size)
        if n <= 0 or n % self.page_size:
            raise ValueError(f"{what} {n} must be a positive multiple of {self.page_size}")
        return n

    @staticmethod
    def _span(first: int, end: int) -> int:
        return ((1 << (end - first)) - 1) << first

    # -- accessors ------------------------------------------------------------------
    def set_dirty_flag(self, addr: Any, client: Any) -> None:
        page = self._addr(addr)
        c = self._client(client)
        self.bitmaps[c] |= 1 << page

    def get_dirty_flag(self, addr: Any, client: Any) -> bool:
        page = self._addr(addr)
        c = self._client(client)
        return bool((self.bitmaps[c] >> page) & 1)

    def get_dirty(self, start: Any, length: Any, client: Any) -> bool:
        first, end = self._range(start, length)
        c = self._client(client)
        return bool(self.bitmaps[c] & self._span(first, end))

    def all_dirty(self, start: Any, length: Any, client: Any) -> bool:
        first, end = self._range(start, length)
        c = self._client(client)
        span = self._span(first, end)
        return self.bitmaps[c] & span == span

    def range_includes_clean(self, start: Any, length: Any, mask: Any) -> int:
        first, end = self._range(start, length)
        m = self._mask(mask)
        span = self._span(first, end)
        return sum(
            1 << c
            for c in range(DIRTY_MEMORY_NUM)
            if m & (1 << c) and self.bitmaps[c] & span != span
        )

    def set_dirty_range(self, start: Any, length: Any, mask: Any) -> None:
        first, end = self._range(start, length)
        m = self._mask(mask)
        span = self._span(first, end)
        for c in range(DIRTY_MEMORY_NUM):
            if m & (1 << c):
                self.bitmaps[c] |= span

    def test_and_clear_dirty(self, start: Any, length: Any, client: Any) -> bool:
        first, end = self._range(start, length)
        c = self._client(client)
        span = self._span(first, end)
        dirty = bool(self.bitmaps[c] & span)
        self.bitmaps[c] &= ~span
        return dirty

    def set_dirty_lebitmap(self, bitmap: Any, start: Any, pages: Any) -> None:
        if isinstance(bitmap, (bytes, bytearray, memoryview)):
            nbits = 8 * len(bitmap)
            value = int.from_bytes(bytes(bitmap), "little")
        elif _is_u64_array(bitmap) and bitmap.ndim == 1:
            nbits = 64 * len(bitmap)
            value = sum(int(w) << (64 * i) for i, w in enumerate(bitmap.tolist()))
        else:
            raise ValueError("bitmap must be bytes or a 1-D uint64 numpy array")
        s = as_int("start", start)
        n = as_int("pages", pages)
        if n < 0:
            raise ValueError(f"pages {n} is negative")
        if nbits < n:
            raise ValueError(f"bitmap holds {nbits} bits, fewer than pages={n}")
        first = s >> self.page_bits if s >= 0 else -1
        if (s < 0 or s > self.ram_size or first + n > self.ram_pages
                or not self.covers(first << self.page_bits, (first + n) << self.page_bits)):
            raise ValueError(
                f"pages [{first}, {first}+{n}) outside [0, {self.ram_pages})"
            )
        bits = (value & ((1 << n) - 1)) << first
        clients = DIRTY_CLIENTS_ALL if self.tcg else DIRTY_CLIENTS_NOCODE
        for c in range(DIRTY_MEMORY_NUM):
            if clients & (1 << c):
                self.bitmaps[c] |= bits

    def sync_dirty_bitmap(self, dest: Any, start: Any, length: Any) -> int:
        if not (_is_u64_array(dest) and dest.ndim == 1):
            raise ValueError("dest must be a 1-D uint64 numpy array")
        if not dest.flags.writeable:
            raise ValueError("dest is read-only")
        first, end = self._range(start, length, holes=True)
        if end > first and end > 64 * len(dest):
            raise ValueError(f"dest holds {64 * len(dest)} pages, the range ends at page {end}")
        mig = self.bitmaps[DIRTY_MEMORY_MIGRATION]
        taken = mig & self._span(first, end) & self.ram_mask   # RAM pages only
        self.bitmaps[DIRTY_MEMORY_MIGRATION] = mig & ~taken
        newly = 0
        while taken:
            low = taken & -taken
            taken ^= low
            w, bit = divmod(low.bit_length() - 1, 64)
            word = int(dest[w])
            if not (word >> bit) & 1:
                newly += 1
                dest[w] = word | (1 << bit)
        return newly

    def set_dirty_pages(self, pages: Any, client: Any) -> None:
        if not (
            isinstance(pages, np.ndarray) and pages.dtype.kind in "iu" and pages.ndim == 1
        ):
            raise ValueError("pages must be a 1-D numpy array of an integer dtype")
        c = self._client(client)
        values = [int(p) for p in pages.tolist()]
        ram = self.ram_mask
        bad = [p for p in values if not 0 <= p < self.ram_pages or not ram >> p & 1]
        if bad:
            raise ValueError(f"page {bad[0]} outside [0, {self.ram_pages})")
        for p in values:
            self.bitmaps[c] |= 1 << p

    def snapshot_and_clear_dirty(self, start: Any, length: Any, client: Any) -> RefSnapshot:
        first, end = self._range(start, length)
        c = self._client(client)
        s, n = as_int("start", start), as_int("length", length)
        lo = first << self.page_bits
        hi = ((s + n + self.page_size - 1) >> self.page_bits) << self.page_bits
        span = self._span(first, end)
        bits = (self.bitmaps[c] & span) >> first
        self.bitmaps[c] &= ~span
        return RefSnapshot(self.page_bits, lo, hi, first, bits)

    # -- RAM blocks -------------------------------------------------------------------
    def find_ram_offset(self, size: int) -> int:
        """Best fit among the gaps (including the one at 0), else ram_size."""
        best: tuple[int, int] | None = None   # (gap size, offset)
        cursor = 0
        for off, sz in sorted(self.blocks.items()):
            gap = off - cursor
            if gap >= size and (best is None or (gap, cursor) < best):
                best = (gap, cursor)
            cursor = off + sz
        return cursor if best is None else best[1]

    def _add_block(self, offset: int, size: int) -> None:
        self.blocks[offset] = size
        self.bitmap_pages = max(self.bitmap_pages, self.ram_pages)
        span = self._span(offset >> self.page_bits, (offset + size) >> self.page_bits)
        for c in range(DIRTY_MEMORY_NUM):
            self.bitmaps[c] |= span

    def ram_block_add(self, size: Any) -> int:
        n = self._size("size", size)
        offset = self.find_ram_offset(n)
        self._add_block(offset, n)
        return offset

    def ram_block_remove(self, offset: Any) -> None:
        o = as_int("offset", offset)
        if o not in self.blocks:
            raise ValueError(
                f"no RAM block at offset {o:#x}; blocks at {sorted(self.blocks)}"
            )
        del self.blocks[o]

    def extend(self, new_ram_size: Any) -> None:
        n = self._size("new_ram_size", new_ram_size)
        old = self.ram_size
        if n > old:
            self._add_block(old, n - old)
