"""One generation's block table: the table segment, block counts, and where
a new RAM block goes.

A table segment (layout.py, ``T_*``) is immutable once its generation is
published: for every client the ids of its blocks, the RAM size, and the
RAM blocks.  ``read_table`` is its one reader and ``write_table`` its one
writer (called by the coordinator only).  This process's view of the
published table is view.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import atomic, layout, segment
from .clients import DIRTY_MEMORY_NUM
from .errors import BadInput, CorruptSegment, MapNotFound
from .segment import Segment

MAX_BLOCKS = 1 << 16        # blocks per client: bounds the table and the segment count


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
