"""Guest RAM and the destination image: one memfd per RAM block.

RAM block ``i`` of a map (the i-th by offset in ``DirtyMemory.ram_blocks()``)
lives in a memfd called ``layout.ram_name(map, i)`` = ``shmdirty-<map>-ram<i>``
(``workers.memfd``: no name in /dev/shm, freed when the last process holding
it exits, so no kill leaves guest RAM behind); a destination copy of it in
one called ``shmdirty-<map>-dst<i>``.  Both are KIND_RAM segments whose
prefix records the block's offset (arg0) and size (arg1); guest page ``k``
of the block is at byte ``RAM_DATA + k * page_size``, page-aligned like
host RAM.  The creator of a block keeps it mapped for as long as it needs
it, and at least until another process of the run holds it; others open it
through a holder (``memfd.open_block``).

Blocks are only ever appended (``extend`` / ``request_extend`` put the new
block at the end), so block ``i`` keeps its index for the whole run.

Every page carries a stamp: word 0 says who wrote it (``TAG_BOOT`` for the
initial contents, ``TAG_VCPU | vcpu``), word 1 the global page number,
word 2 a sequence number, and every other word a value mixed from those, so
a page copied at the wrong time differs from its source in thousands of
bytes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from shmdirty import layout
from shmdirty.errors import CorruptSegment
from shmdirty.segment import Segment

from . import memfd

# The guest's page: x86's 4 KiB page, the unit of KVM's dirty log; every map
# `shmdirty migrate` makes (source and destination, either guest) has it.
PAGE_BITS = 12
RAM_DATA = 4096          # byte offset of guest page 0 in a RAM segment
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23   # <linux/mman.h>

# The map of a loopback receiver: ``<map>_dst`` (workers/migration.py); so a
# migrate run's own map name is at most this long (issue 17.4).
DST_MAP_SUFFIX = "_dst"
MAX_MIGRATE_NAME = layout.MAX_MAP_NAME - len(DST_MAP_SUFFIX)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
TAG_BOOT = 0xB007 << 32  # word 0 of a page nobody has written since boot
TAG_VCPU = 0xC0DE << 32  # word 0 of a page a vCPU wrote: TAG_VCPU | vcpu index
TAG_MASK = 0xFFFF_FFFF << 32
_MIX = np.uint64(0x9E37_79B9_7F4A_7C15)

U64Pages = np.ndarray[Any, np.dtype[np.uint64]]


def dst_name(map_name: str, index: int) -> str:
    """The destination memfd of RAM block ``index``."""
    return layout.dst_name(map_name, index)


def segment_name(map_name: str, role: str, index: int) -> str:
    return layout.ram_name(map_name, index) if role == "ram" else dst_name(map_name, index)


def stamp(view: U64Pages, pages: np.ndarray[Any, Any], tag: int,
          seq: np.ndarray[Any, Any]) -> U64Pages:
    """Fill rows of ``view`` (one row per page, uint64 words) with the stamp
    of global ``pages``; returns ``view``."""
    p = pages.astype(np.uint64)
    s = seq.astype(np.uint64)
    view[:] = (((s << np.uint64(24)) ^ p ^ np.uint64(tag)) * _MIX)[:, None]
    view[:, 0] = np.uint64(tag)
    view[:, 1] = p
    view[:, 2] = s
    return view


class GuestRam:
    """This process's mappings of one map's RAM (``role="ram"``) or
    destination (``role="dst"``) segments."""

    def __init__(self, map_name: str, page_bits: int, role: str = "ram") -> None:
        if role not in ("ram", "dst"):
            raise ValueError(f"role {role!r} is not 'ram' or 'dst'")
        self.map_name = map_name
        self.role = role
        self.page_bits = page_bits
        self.page_size = 1 << page_bits
        self.blocks: list[tuple[int, int]] = []      # (offset, size) in bytes
        self.views: list[U64Pages] = []              # (pages, page_size // 8) per block
        self._segs: list[Segment] = []
        self._starts = np.zeros(0, dtype=np.int64)   # first global page of each block

    @property
    def npages(self) -> int:
        """Pages up to the end of the last mapped block."""
        return (self.blocks[-1][0] + self.blocks[-1][1]) >> self.page_bits if self.blocks else 0

    def update(self, ram_blocks: Sequence[tuple[int, int]], *, create: bool = False,
               boot_fill: bool = False) -> list[int]:
        """Map the blocks of ``ram_blocks`` not mapped yet (creating their
        segments with ``create``, stamped as booted with ``boot_fill``);
        returns their indexes."""
        for i, blk in enumerate(self.blocks):
            if i >= len(ram_blocks) or tuple(ram_blocks[i]) != blk:
                raise RuntimeError(f"map {self.map_name}: RAM block {i} was {blk}, now "
                                   f"{ram_blocks[i] if i < len(ram_blocks) else 'gone'}; "
                                   "guest RAM blocks may only be appended")
        new = list(range(len(self.blocks), len(ram_blocks)))
        for i in new:
            offset, size = ram_blocks[i]
            seg = (self.create_segment(i, offset, size, boot_fill) if create
                   else self.attach_segment(i, offset, size))
            self._add(seg, offset, size)
        return new

    def create_segment(self, index: int, offset: int, size: int, boot_fill: bool) -> Segment:
        """The one place guest RAM is allocated: a memfd for block ``index``,
        reserved before anything is written (``memfd.create``), its prefix,
        optionally the boot stamps, sealed.  The returned segment holds the
        memfd: keep it mapped until another process holds it too."""
        name = segment_name(self.map_name, self.role, index)
        fd = memfd.create(name, RAM_DATA + size)
        try:
            seg = Segment.create_fd(name, fd, RAM_DATA + size, layout.KIND_RAM, offset, size)
        finally:
            os.close(fd)     # the mapping keeps its own descriptor
        try:
            if boot_fill:
                first = offset >> self.page_bits
                n = size >> self.page_bits
                view = seg.array(RAM_DATA, size // 8).reshape(n, self.page_size // 8)
                stamp(view, np.arange(first, first + n), TAG_BOOT, np.zeros(n, np.uint64))
                del view
            seg.seal()
        except BaseException:
            seg.close()      # the last holder: the kernel frees it
            raise
        return seg

    def attach_segment(self, index: int, offset: int, size: int) -> Segment:
        """Open block ``index``'s memfd through a process that holds it and
        check it is that block."""
        name = segment_name(self.map_name, self.role, index)
        fd = memfd.open_block(name)
        try:
            seg = Segment.attach_fd(name, fd, layout.KIND_RAM, RAM_DATA + size)
        finally:
            os.close(fd)
        got = (seg.read_word(layout.P_ARG0), seg.read_word(layout.P_ARG1))
        if got != (offset, size):
            seg.close()
            raise CorruptSegment(name, f"holds RAM [{got[0]:#x}, +{got[1]:#x}), expected "
                                 f"[{offset:#x}, +{size:#x})")
        return seg

    def preallocate(self, index: int) -> None:
        """Map block ``index``'s pages here now (its memory was reserved at
        creation): on this machine batch mapping costs a fraction of a page
        fault per first store into each 4 KiB page."""
        self.populate(index, write=True)

    def populate(self, index: int, write: bool = False) -> None:
        """Map block ``index``'s pages into this process now
        (``MADV_POPULATE_READ`` / ``_WRITE``, Linux 5.14); best effort."""
        view = self.views[index]
        _libc.madvise(view.ctypes.data, view.nbytes, MADV_POPULATE_WRITE if write
                      else MADV_POPULATE_READ)

    def _add(self, seg: Segment, offset: int, size: int) -> None:
        n = size >> self.page_bits
        self._segs.append(seg)
        self.views.append(seg.array(RAM_DATA, size // 8).reshape(n, self.page_size // 8))
        self.blocks.append((offset, size))
        self._starts = np.array([o >> self.page_bits for o, _ in self.blocks], dtype=np.int64)

    def split(self, pages: np.ndarray[Any, Any]) -> Iterator[tuple[int, np.ndarray[Any, Any],
                                                                   np.ndarray[Any, Any]]]:
        """Group global ``pages`` by block: (block index, page numbers within
        the block, positions in ``pages``)."""
        if not len(pages):
            return
        idx = np.searchsorted(self._starts, pages, side="right") - 1
        if idx.min() < 0 or int(pages.max()) >= self.npages:
            raise ValueError(f"pages [{int(pages.min())}, {int(pages.max())}] are outside the "
                             f"mapped guest RAM [0, {self.npages})")
        for b in np.unique(idx).tolist():
            sel = np.flatnonzero(idx == b)
            yield b, pages[sel] - self._starts[b], sel

    def close(self) -> None:
        """Unmap every block (the last process to do so frees it)."""
        self.views.clear()
        for seg in self._segs:
            seg.close()
        self._segs.clear()
        self.blocks.clear()
        self._starts = np.zeros(0, dtype=np.int64)


def compare(src: GuestRam, dst: GuestRam) -> tuple[int, list[int], int]:
    """Byte-for-byte comparison: (pages compared, global numbers of the pages
    that differ, pages whose stamp says a vCPU wrote them)."""
    if src.blocks != dst.blocks:
        raise ValueError(f"source RAM blocks {src.blocks} != destination blocks {dst.blocks}")
    differ: list[int] = []
    written = 0
    for (offset, _), s, d in zip(src.blocks, src.views, dst.views, strict=True):
        rows = np.flatnonzero((s != d).any(axis=1))
        differ.extend((rows + (offset >> src.page_bits)).tolist())
        written += int(np.count_nonzero(s[:, 0] & np.uint64(TAG_MASK) == np.uint64(TAG_VCPU)))
    return src.npages, differ, written
