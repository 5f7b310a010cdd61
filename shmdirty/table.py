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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

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
    tag: int = 0                                # random part of its segment's name
    # Invariant (issue 17 item 5): guest RAM is the union of ``ram_blocks``;
    # a removed block leaves a hole below ``ram_size`` that is not RAM.
    # ``ram_prefix`` is where the first hole begins (``ram_size`` when there
    # is none): everything below it is RAM, so the accessors' fast paths
    # (the kernel's included: atomic.KERNEL_ATTRIBUTES) check an address
    # against it alone and hand anything past it to the exact check.
    ram_prefix: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        end = 0
        for off, size in self.ram_blocks:
            if off > end:
                break
            end = max(end, off + size)
        object.__setattr__(self, "ram_prefix", end)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids[0])

    def covers(self, lo: int, end: int) -> bool:
        """Are bytes [lo, end) guest RAM (an empty range: inside [0, ram_size])?"""
        if lo < 0 or end > self.ram_size:
            return False
        if end <= self.ram_prefix or end <= lo:
            return True
        for off, size in self.ram_blocks:
            if off > lo:
                return False
            lo = max(lo, off + size)
            if lo >= end:
                return True
        return False

    def ram_runs(self, page: int, end: int, page_bits: int) -> list[tuple[int, int]]:
        """The page ranges [p0, p1) of guest RAM inside pages [page, end)."""
        if end <= self.ram_prefix >> page_bits:
            return [(page, end)] if page < end else []
        runs: list[tuple[int, int]] = []
        for off, size in self.ram_blocks:
            p0, p1 = max(page, off >> page_bits), min(end, (off + size) >> page_bits)
            if p0 < p1:
                if runs and runs[-1][1] == p0:
                    runs[-1] = (runs[-1][0], p1)
                else:
                    runs.append((p0, p1))
        return runs

    def pages_outside(self, pages: np.ndarray[Any, np.dtype[np.int64]],
                      page_bits: int) -> np.ndarray[Any, np.dtype[np.int64]]:
        """The pages of ``pages`` that are not guest RAM."""
        inside = np.zeros(len(pages), dtype=bool)
        for off, size in self.ram_blocks:
            inside |= (pages >= off >> page_bits) & (pages < (off + size) >> page_bits)
        return pages[~inside]


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


def read_table(map_name: str, generation: int, tag: int) -> Table:
    """Copy the table of ``generation`` (name tag ``tag``) out of its segment;
    MapNotFound if the map is gone, CorruptSegment if the table is missing
    or inconsistent."""
    seg = attach_part(map_name, layout.table_name(map_name, generation, tag),
                      layout.KIND_TABLE, layout.T_BLOCK_IDS)
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
                 tuple(zip(ram[0::2], ram[1::2], strict=True)), tag)


def published_tag(header: Segment, generation: int) -> int | None:
    """The name tag the header records for ``generation``, or None if its
    word already holds a later generation's (two publications since: the
    caller reloads the generation, the newest table is always safe)."""
    # acquire: pairs with publish()'s release store of the word, made before
    # the generation's store; the caller loaded the generation (seq_cst) first.
    word = header.words.load(layout.H_TABLE_TAGS + layout.WORD * (generation % 2),
                             atomic.ACQUIRE)
    if word >> layout.TABLE_TAG_BITS != generation:
        return None
    return word & ((1 << layout.TABLE_TAG_BITS) - 1)


def record_tag(header: Segment, t: Table) -> None:
    """Record ``t``'s name tag in the header, before its generation is stored."""
    # release: a reader that loads the generation (seq_cst, stored after this)
    # and then this word (acquire) sees the tag; a reader of an older
    # generation sees a mismatch and reloads.
    header.words.store(layout.H_TABLE_TAGS + layout.WORD * (t.generation % 2),
                       layout.table_tag_word(t.generation, t.tag), atomic.RELEASE)


CREATE_TRIES = 16   # fresh random names tried when a name is taken (squatted)


def write_table(map_name: str, t: Table) -> Table:
    """Create and seal the segment of ``t`` (not yet published: the caller
    records its tag and stores the generation); returns ``t`` with the tag
    it got: a fresh random one, retried when a name is taken.  On failure
    nothing is left behind."""
    if t.generation >= layout.GENERATION_LIMIT:
        raise BadInput(f"map {map_name}: generation {t.generation} is past "
                       f"{layout.GENERATION_LIMIT - 1}")
    flat = [b for ids in t.block_ids for b in ids]
    size = layout.table_size(DIRTY_MEMORY_NUM, t.num_blocks, len(t.ram_blocks))
    for attempt in range(CREATE_TRIES):
        t = replace(t, tag=layout.new_table_tag())
        name = layout.table_name(map_name, t.generation, t.tag)
        try:
            seg = Segment.create(name, size, layout.KIND_TABLE, t.generation)
            break
        except FileExistsError:
            if attempt == CREATE_TRIES - 1:
                raise
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
    return t
