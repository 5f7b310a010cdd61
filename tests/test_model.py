"""The reference model (tests/model.py) against small hand-worked examples.

Each example is worked out from the seed's code and the choices listed at the
top of model.py; none needs shared memory.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model import (
    DIRTY_CLIENTS_ALL,
    DIRTY_CLIENTS_NOCODE,
    DIRTY_MEMORY_CODE,
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_VGA,
    RefDirtyMemory,
)

PS = 4096
VGA, CODE, MIG = DIRTY_MEMORY_VGA, DIRTY_MEMORY_CODE, DIRTY_MEMORY_MIGRATION


def clean(pages: int, tcg: bool = False) -> RefDirtyMemory:
    """A model with one RAM block of ``pages`` pages, every bit cleared."""
    m = RefDirtyMemory(pages * PS, page_bits=12, block_pages=64, tcg=tcg)
    for c in range(3):
        assert m.test_and_clear_dirty(0, pages * PS, c) is (pages > 0)
    return m


def test_constants_follow_the_seed() -> None:
    assert (VGA, CODE, MIG) == (0, 1, 2)
    assert DIRTY_CLIENTS_ALL == 0b111
    assert DIRTY_CLIENTS_NOCODE == 0b101


def test_new_ram_starts_dirty_for_all_clients() -> None:
    m = RefDirtyMemory(4 * PS, page_bits=12, block_pages=64)
    assert m.ram_size == 4 * PS
    for c in range(3):
        assert m.dirty_pages(c) == [0, 1, 2, 3]
        assert m.all_dirty(0, 4 * PS, c)


def test_empty_map_rejects_every_address() -> None:
    m = RefDirtyMemory(0, page_bits=12, block_pages=64)
    assert m.ram_size == 0
    with pytest.raises(ValueError):
        m.get_dirty_flag(0, VGA)
    assert m.get_dirty(0, 0, VGA) is False      # the empty range at the end is valid
    with pytest.raises(ValueError):
        m.get_dirty(0, 1, VGA)


# -- range rounding -------------------------------------------------------------
def test_unaligned_range_covers_every_page_it_touches() -> None:
    m = clean(4)
    m.set_dirty_range(PS - 1, 2, 1 << VGA)           # last byte of page 0, first of page 1
    assert m.dirty_pages(VGA) == [0, 1]
    m.set_dirty_range(3 * PS, 1, 1 << VGA)
    assert m.dirty_pages(VGA) == [0, 1, 3]
    assert m.dirty_pages(CODE) == [] and m.dirty_pages(MIG) == []


def test_range_end_rounds_up_start_rounds_down() -> None:
    m = clean(4)
    m.set_dirty_flag(2 * PS + 7, CODE)                # page 2
    assert m.get_dirty(PS + 100, PS, CODE) is True    # [PS+100, 2PS+100) touches page 2
    assert m.get_dirty(PS + 100, PS - 100, CODE) is False   # ends exactly at 2PS
    assert m.get_dirty(3 * PS - 1, 1, CODE) is True
    assert m.get_dirty_flag(2 * PS, CODE) is True
    assert m.get_dirty_flag(3 * PS - 1, CODE) is True
    assert m.get_dirty_flag(3 * PS, CODE) is False


def test_all_dirty_needs_every_page() -> None:
    m = clean(4)
    m.set_dirty_range(0, 3 * PS, 1 << MIG)
    assert m.all_dirty(0, 3 * PS, MIG) is True
    assert m.all_dirty(1, 3 * PS - 1, MIG) is True
    assert m.all_dirty(0, 3 * PS + 1, MIG) is False
    assert m.all_dirty(0, PS, VGA) is False


def test_length_zero_rules() -> None:
    m = RefDirtyMemory(4 * PS, page_bits=12, block_pages=64)   # all dirty
    before = m.state()
    for start in (0, 5, PS, 2 * PS + 1, 4 * PS):
        assert m.get_dirty(start, 0, VGA) is False
        assert m.test_and_clear_dirty(start, 0, VGA) is False
    m2 = clean(4)
    for start in (0, 5, PS, 2 * PS + 1, 4 * PS):
        assert m2.all_dirty(start, 0, MIG) is True
        assert m2.range_includes_clean(start, 0, DIRTY_CLIENTS_ALL) == 0
        m2.set_dirty_range(start, 0, DIRTY_CLIENTS_ALL)
        m2.set_dirty_lebitmap(b"\xff", start, 0)
        assert m2.sync_dirty_bitmap(np.zeros(1, np.uint64), start, 0) == 0
        assert m2.snapshot_and_clear_dirty(start, 0, VGA).get_dirty(start, 0) is False
    assert m.state() == before
    assert m2.dirty_pages(VGA) == m2.dirty_pages(CODE) == m2.dirty_pages(MIG) == []


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 20 * PS), length=st.integers(1, 6 * PS))
def test_page_range_is_the_pages_the_bytes_touch(start: int, length: int) -> None:
    pages = 32
    m = clean(pages)
    if start + length > pages * PS:
        with pytest.raises(ValueError):
            m.set_dirty_range(start, length, 1 << VGA)
        return
    m.set_dirty_range(start, length, 1 << VGA)
    touched = [p for p in range(pages) if p * PS < start + length and start < (p + 1) * PS]
    assert m.dirty_pages(VGA) == touched


# -- masks ------------------------------------------------------------------------
def test_set_dirty_range_honours_the_mask() -> None:
    m = clean(2)
    m.set_dirty_range(0, PS, DIRTY_CLIENTS_NOCODE)
    assert (m.dirty_pages(VGA), m.dirty_pages(CODE), m.dirty_pages(MIG)) == ([0], [], [0])
    m.set_dirty_range(PS, PS, 0)
    assert (m.dirty_pages(VGA), m.dirty_pages(CODE), m.dirty_pages(MIG)) == ([0], [], [0])
    m.set_dirty_range(PS, PS, 1 << CODE)
    assert (m.dirty_pages(VGA), m.dirty_pages(CODE), m.dirty_pages(MIG)) == ([0], [1], [0])


def test_range_includes_clean_reports_the_masked_clients_with_a_clean_page() -> None:
    m = clean(2)
    m.set_dirty_range(0, 2 * PS, 1 << VGA)
    m.set_dirty_range(0, PS, 1 << MIG)
    assert m.range_includes_clean(0, 2 * PS, DIRTY_CLIENTS_ALL) == (1 << CODE) | (1 << MIG)
    assert m.range_includes_clean(0, PS, DIRTY_CLIENTS_ALL) == 1 << CODE
    assert m.range_includes_clean(0, 2 * PS, 1 << VGA) == 0
    assert m.range_includes_clean(0, 2 * PS, 1 << MIG) == 1 << MIG
    assert m.range_includes_clean(0, 2 * PS, 0) == 0


def test_test_and_clear_clears_only_its_client_and_range() -> None:
    m = RefDirtyMemory(4 * PS, page_bits=12, block_pages=64)
    assert m.test_and_clear_dirty(PS + 1, PS, CODE) is True    # pages 1 and 2
    assert m.dirty_pages(CODE) == [0, 3]
    assert m.dirty_pages(VGA) == [0, 1, 2, 3]
    assert m.test_and_clear_dirty(PS, 2 * PS, CODE) is False
    assert m.test_and_clear_dirty(0, 4 * PS, CODE) is True
    assert m.dirty_pages(CODE) == []


# -- set_dirty_lebitmap -------------------------------------------------------------
@pytest.mark.parametrize("tcg", [False, True])
def test_lebitmap_sets_code_only_under_tcg(tcg: bool) -> None:
    m = clean(8, tcg=tcg)
    m.set_dirty_lebitmap(b"\x05", 2 * PS, 3)           # bits 0 and 2 -> pages 2 and 4
    assert m.dirty_pages(VGA) == [2, 4]
    assert m.dirty_pages(MIG) == [2, 4]
    assert m.dirty_pages(CODE) == ([2, 4] if tcg else [])


def test_lebitmap_ignores_bits_past_pages_and_rounds_start_down() -> None:
    m = clean(8)
    m.set_dirty_lebitmap(b"\xff", PS + 123, 3)          # start page 1, three pages
    assert m.dirty_pages(VGA) == [1, 2, 3]


def test_lebitmap_array_and_bytes_agree_little_endian() -> None:
    words = np.array([(1 << 63) | 1, 0b110], dtype=np.uint64)
    a, b = clean(200), clean(200)
    a.set_dirty_lebitmap(words, 64 * PS, 67)
    b.set_dirty_lebitmap(words.astype("<u8").tobytes(), 64 * PS, 67)
    assert a.dirty_pages(MIG) == b.dirty_pages(MIG) == [64, 127, 129, 130]


def test_lebitmap_short_bitmap_and_overrun_are_errors() -> None:
    m = clean(100)
    before = m.state()
    for bitmap, start, pages in [
        (b"\xff", 0, 9),                                  # 8 bits for 9 pages
        (np.ones(1, np.uint64), 0, 65),
        (np.ones(2, np.uint64), 90 * PS, 11),             # pages 90..100 past the end
        (np.ones(2, np.int64), 0, 3),                     # wrong dtype
        ([1, 2], 0, 3),
        (np.ones((1, 1), np.uint64), 0, 3),
        (b"\x01", 100 * PS + 1, 0),                       # start past ram_size
    ]:
        with pytest.raises(ValueError):
            m.set_dirty_lebitmap(bitmap, start, pages)
    assert m.state() == before


# -- sync_dirty_bitmap ----------------------------------------------------------------
def test_sync_counts_only_newly_dirty_pages_and_takes_migration_bits() -> None:
    m = clean(200)
    for p in (3, 64, 65, 130):
        m.set_dirty_flag(p * PS, MIG)
    m.set_dirty_flag(4 * PS, VGA)
    dest = np.zeros(4, np.uint64)
    dest[1] = 1 << 0                                      # page 64 already in dest
    assert m.sync_dirty_bitmap(dest, 0, 200 * PS) == 3
    assert dest.tolist() == [1 << 3, 0b11, 1 << 2, 0]
    assert m.dirty_pages(MIG) == []
    assert m.dirty_pages(VGA) == [4]                      # other clients untouched
    assert m.sync_dirty_bitmap(dest, 0, 200 * PS) == 0    # nothing left to take
    assert dest.tolist() == [1 << 3, 0b11, 1 << 2, 0]


def test_sync_with_unaligned_start_takes_exactly_the_range() -> None:
    m = RefDirtyMemory(200 * PS, page_bits=12, block_pages=64)   # all dirty
    dest = np.zeros(4, np.uint64)
    assert m.sync_dirty_bitmap(dest, 70 * PS + 5, 3 * PS) == 4   # pages 70..73
    assert dest.tolist() == [0, 0b1111 << 6, 0, 0]
    assert m.get_dirty(70 * PS, 4 * PS, MIG) is False
    assert m.all_dirty(0, 70 * PS, MIG) and m.all_dirty(74 * PS, 126 * PS, MIG)


def test_sync_dest_must_hold_the_range() -> None:
    m = RefDirtyMemory(200 * PS, page_bits=12, block_pages=64)
    before = m.state()
    short = np.zeros(2, np.uint64)                        # pages 0..127
    with pytest.raises(ValueError):
        m.sync_dirty_bitmap(short, 100 * PS, 28 * PS + 1)  # reaches page 128
    ro = np.zeros(4, np.uint64)
    ro.flags.writeable = False
    for dest in (ro, np.zeros(4, np.int64), [0, 0, 0, 0], np.zeros((4, 1), np.uint64)):
        with pytest.raises(ValueError):
            m.sync_dirty_bitmap(dest, 0, PS)
    assert m.state() == before and short.tolist() == [0, 0]
    assert m.sync_dirty_bitmap(short, 100 * PS, 28 * PS) == 28   # ends at page 128: fits


# -- set_dirty_pages ------------------------------------------------------------------
def test_set_dirty_pages_marks_each_page_once() -> None:
    m = clean(10)
    m.set_dirty_pages(np.array([7, 2, 7, 9], np.uint32), CODE)
    assert m.dirty_pages(CODE) == [2, 7, 9]
    assert m.dirty_pages(VGA) == []
    m.set_dirty_pages(np.array([], np.int64), VGA)
    assert m.dirty_pages(VGA) == []
    before = m.state()
    for pages in (np.array([1, 10]), np.array([-1]), np.array([1.0]), [1, 2],
                  np.array([True]), np.array([[1]])):
        with pytest.raises(ValueError):
            m.set_dirty_pages(pages, VGA)
    assert m.state() == before


# -- snapshot_and_clear_dirty -----------------------------------------------------------
def test_snapshot_takes_clears_and_answers_later() -> None:
    m = clean(10)
    m.set_dirty_pages(np.array([2, 5, 8]), VGA)
    snap = m.snapshot_and_clear_dirty(2 * PS + 10, 4 * PS, VGA)   # pages 2..6
    assert m.dirty_pages(VGA) == [8]
    m.set_dirty_flag(3 * PS, VGA)                        # later writes do not show
    assert snap.get_dirty(2 * PS, PS) is True
    assert snap.get_dirty(3 * PS, 2 * PS) is False
    assert snap.get_dirty(4 * PS + 1, PS) is True        # pages 4, 5
    assert snap.get_dirty(6 * PS, PS) is False
    assert snap.get_dirty(7 * PS, 0) is False
    for s, n in ((2 * PS - 1, 1), (6 * PS, PS + 1), (3 * PS, -1), (7 * PS + 1, 0)):
        with pytest.raises(ValueError):
            snap.get_dirty(s, n)


# -- RAM blocks ---------------------------------------------------------------------------
def test_find_ram_offset_best_fit_after_removes() -> None:
    m = RefDirtyMemory(0, page_bits=12, block_pages=64)
    a = m.ram_block_add(4 * PS)
    b = m.ram_block_add(8 * PS)
    c = m.ram_block_add(3 * PS)
    d = m.ram_block_add(2 * PS)
    assert (a, b, c, d) == (0, 4 * PS, 12 * PS, 15 * PS)
    assert m.ram_size == 17 * PS
    m.ram_block_remove(b)                                  # gap [4, 12): 8 pages
    m.ram_block_remove(d)                                  # last block: ram_size shrinks
    assert m.ram_size == 15 * PS
    m.ram_block_remove(a)                                  # gap [0, 4) merges: [0, 12)
    assert m.ram_block_add(5 * PS) == 0                    # lowest offset in the gap
    assert m.ram_block_add(8 * PS) == 15 * PS              # [5, 12) is too small: the end
    assert m.ram_block_add(7 * PS) == 5 * PS
    assert m.ram_size == 23 * PS


def test_find_ram_offset_prefers_the_smallest_gap() -> None:
    m = RefDirtyMemory(0, page_bits=12, block_pages=64)
    offs = [m.ram_block_add(n * PS) for n in (6, 1, 3, 1)]   # 0, 6, 7, 10
    assert offs == [0, 6 * PS, 7 * PS, 10 * PS]
    m.ram_block_remove(0)                                     # gap of 6 at 0
    m.ram_block_remove(7 * PS)                                # gap of 3 at 7
    assert m.ram_block_add(2 * PS) == 7 * PS                  # 3 beats 6
    assert m.ram_block_add(2 * PS) == 0                       # left: 1 at 9, 6 at 0
    assert m.ram_block_add(PS) == 9 * PS                      # 1 beats 4
    assert m.ram_size == 11 * PS


def test_added_block_is_dirty_and_a_hole_is_not_ram() -> None:
    """(issue 17 item 5) A removed block's hole is outside RAM: refused like
    the space past the end, never counted; an add fills it, dirty."""
    m = RefDirtyMemory(0, page_bits=12, block_pages=64)
    m.ram_block_add(2 * PS)
    hole = m.ram_block_add(2 * PS)
    m.ram_block_add(2 * PS)
    for c in range(3):
        m.test_and_clear_dirty(0, 6 * PS, c)
    m.set_dirty_flag(hole, VGA)
    m.ram_block_remove(hole)
    assert m.ram_size == 6 * PS
    for op, args in (("get_dirty_flag", (hole, VGA)), ("set_dirty_flag", (hole + PS, VGA)),
                     ("get_dirty", (0, 6 * PS, VGA)), ("test_and_clear_dirty", (hole, 1, VGA)),
                     ("set_dirty_pages", (np.array([3]), VGA))):
        with pytest.raises(ValueError, match="outside"):
            getattr(m, op)(*args)
    assert m.dirty_pages(VGA) == []                        # the hole's bit does not count
    dest = np.zeros(1, np.uint64)
    m.set_dirty_range(0, PS, 1 << MIG)
    assert m.sync_dirty_bitmap(dest, 0, 6 * PS) == 1       # holes allowed: RAM pages only
    assert m.ram_block_add(PS) == hole
    for c in range(3):
        assert m.dirty_pages(c) == [2]


def test_extend_grows_only_and_its_block_can_be_removed() -> None:
    m = RefDirtyMemory(2 * PS, page_bits=12, block_pages=64)
    m.test_and_clear_dirty(0, 2 * PS, MIG)
    m.extend(2 * PS)
    m.extend(PS)
    assert m.ram_size == 2 * PS and m.dirty_pages(MIG) == []
    m.extend(5 * PS)
    assert m.ram_size == 5 * PS
    assert m.dirty_pages(MIG) == [2, 3, 4]
    m.ram_block_remove(2 * PS)
    assert m.ram_size == 2 * PS
    before = m.state()
    for bad in (0, -PS, PS + 1, 3.0 * PS, "8192", None, True):
        with pytest.raises(ValueError):
            m.extend(bad)
        with pytest.raises(ValueError):
            m.ram_block_add(bad)
    for bad in (PS, 2 * PS, -1, 1.0, None):
        with pytest.raises(ValueError):
            m.ram_block_remove(bad)
    assert m.state() == before


def test_bad_scalars_are_value_errors_and_change_nothing() -> None:
    m = RefDirtyMemory(4 * PS, page_bits=12, block_pages=64)
    m.test_and_clear_dirty(0, PS, VGA)
    before = m.state()
    calls = [
        lambda: m.set_dirty_flag(4 * PS, VGA),
        lambda: m.set_dirty_flag(-1, VGA),
        lambda: m.set_dirty_flag(0, 3),
        lambda: m.set_dirty_flag(0, -1),
        lambda: m.set_dirty_flag(0, True),
        lambda: m.set_dirty_flag(0.0, VGA),
        lambda: m.set_dirty_range(0, 4 * PS + 1, 1),
        lambda: m.set_dirty_range(PS, -1, 1),
        lambda: m.set_dirty_range(PS, 2**64 - PS, 1),       # wraps to 0 in 64 bits
        lambda: m.set_dirty_range(0, PS, 8),
        lambda: m.set_dirty_range(0, PS, -1),
        lambda: m.test_and_clear_dirty(4 * PS + 1, 0, VGA),
        lambda: m.test_and_clear_dirty(0, PS, 3),
        lambda: m.range_includes_clean(0, PS, 8),
        lambda: m.snapshot_and_clear_dirty(0, 4 * PS + 1, MIG),
        lambda: m.get_dirty(None, PS, VGA),
        lambda: m.all_dirty(0, "1", VGA),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert m.state() == before


def test_numpy_integer_scalars_are_accepted() -> None:
    m = clean(4)
    m.set_dirty_flag(np.int64(PS), np.uint8(MIG))
    m.set_dirty_range(np.uint64(2 * PS), np.int32(PS), np.int16(1 << VGA))
    assert m.dirty_pages(MIG) == [1] and m.dirty_pages(VGA) == [2]


def test_runs_partition_the_ram() -> None:
    m = clean(10)
    m.set_dirty_pages(np.array([0, 1, 4, 9]), VGA)
    assert m.runs(VGA) == [(0, 2, True), (2, 2, False), (4, 1, True), (5, 4, False),
                           (9, 1, True)]
    assert m.runs(CODE) == [(0, 10, False)]
    m.set_dirty_range(0, 10 * PS, 1 << MIG)
    assert m.runs(MIG) == [(0, 10, True)]
