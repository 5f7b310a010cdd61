"""The table segment (shmdirty/table.py): its one writer and one reader
round-trip a table, a damaged or missing table is a clear error, block
counts, and where a new RAM block goes (QEMU's find_ram_offset)."""

from __future__ import annotations

import pytest

import shmdirty as sd
from shmdirty import layout, segment
from shmdirty.clients import DIRTY_MEMORY_NUM
from shmdirty.segment import Segment
from shmdirty.table import (
    EMPTY,
    MAX_BLOCKS,
    Table,
    blocks_needed,
    find_ram_offset,
    read_table,
    write_table,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def header(map_name: str) -> object:
    """A header segment, so a missing table is CorruptSegment, not MapNotFound."""
    hdr = Segment.create(layout.header_name(map_name), layout.header_size(1),
                         layout.KIND_HEADER)
    hdr.seal()
    yield hdr
    hdr.close()


def test_write_then_read_round_trips(map_name: str, header: object) -> None:
    t = Table(7, 5 << 12, ((1, 2, 3), (4, 5, 6), (7, 8, 9)), ((0, 1 << 12), (2 << 12, 3 << 12)))
    t = write_table(map_name, t)
    assert read_table(map_name, 7, t.tag) == t
    assert t.num_blocks == 3 and EMPTY.num_blocks == 0
    # A second write of the same generation gets a name of its own (a random
    # tag, issue 18.7): the first is kept.
    t2 = write_table(map_name, Table(7, 0, ((),) * DIRTY_MEMORY_NUM, ()))
    assert t2.tag != t.tag and read_table(map_name, 7, t.tag) == t


def test_a_missing_or_damaged_table_is_named(map_name: str, header: object) -> None:
    with pytest.raises(sd.CorruptSegment) as e:
        read_table(map_name, 3, 9)
    assert layout.table_name(map_name, 3, 9) in str(e.value)
    # A table claiming more blocks than its segment holds.
    seg = Segment.create(layout.table_name(map_name, 4, 9), layout.table_size(3, 1, 0),
                         layout.KIND_TABLE, 4)
    seg.words.store(layout.T_NUM_BLOCKS, 5)
    seg.seal()
    seg.close()
    with pytest.raises(sd.CorruptSegment, match="holds 5 blocks"):
        read_table(map_name, 4, 9)


def test_a_table_of_a_map_gone_is_map_not_found(map_name: str) -> None:
    with pytest.raises(sd.MapNotFound):
        read_table(map_name, 1, 0)
    assert segment.list_segments(map_name) == []


def test_blocks_needed() -> None:
    assert blocks_needed(0, 12, 64) == 0
    assert blocks_needed(1 << 12, 12, 64) == 1
    assert blocks_needed(64 << 12, 12, 64) == 1
    assert blocks_needed((64 << 12) + 4096, 12, 64) == 2
    assert blocks_needed(MAX_BLOCKS * 64 << 12, 12, 64) == MAX_BLOCKS
    with pytest.raises(sd.BadInput, match=f"at most {MAX_BLOCKS}"):
        blocks_needed((MAX_BLOCKS * 64 + 1) << 12, 12, 64)


def test_find_ram_offset_takes_the_smallest_gap_that_fits() -> None:
    assert find_ram_offset([], 10) == 0
    assert find_ram_offset([(0, 10)], 5) == 10                  # the end
    assert find_ram_offset([(10, 10)], 5) == 0                  # the space before the first
    blocks = [(0, 10), (30, 10), (45, 10), (100, 10)]           # gaps 20, 5, 45
    assert find_ram_offset(blocks, 5) == 40                     # the smallest that fits
    assert find_ram_offset(blocks, 6) == 10
    assert find_ram_offset(blocks, 21) == 55
    assert find_ram_offset(blocks, 46) == 110
    assert find_ram_offset(list(reversed(blocks)), 5) == 40     # any order
