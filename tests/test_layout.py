"""Byte offsets, the owner word and segment names (shmdirty/layout.py):
every name is built and parsed here, and the two agree."""

from __future__ import annotations

import pytest

import shmdirty as sd
from shmdirty import layout


def test_names_parse_back() -> None:
    m = "abc_1.x"
    for name, role, index in ((layout.header_name(m), "hdr", None),
                              (layout.table_name(m, 12, 0xabc), "t", 12),
                              (layout.block_name(m, 0), "b", 0),
                              (layout.ram_name(m, 3), "ram", 3),
                              (layout.dst_name(m, 4), "dst", 4)):
        assert name.startswith(layout.map_prefix(m)) and name.startswith(layout.map_prefix())
        assert layout.map_of(name) == m
        assert layout.role_of(name) == (role, index)
    assert layout.map_of("other-abc-hdr") is None
    assert layout.role_of(layout.map_prefix(m) + "Weird-") == ("?", None)


def test_map_names() -> None:
    fresh = {layout.new_map_name() for _ in range(20)}
    assert len(fresh) == 20 and all(layout.check_map_name(n) == n for n in fresh)
    assert layout.check_map_name(layout.PREFIX + "abc") == "abc"
    for bad in ("", "a/b", "a b", "x" * (layout.MAX_MAP_NAME + 1), "a-b"):
        with pytest.raises(sd.BadInput, match="map name"):
            layout.check_map_name(bad)


def test_owner_word_packs_pid_and_start() -> None:
    for pid, start in ((1, 0), (4194303, 123456789), (77, 1 << 40)):
        w = layout.owner_word(pid, start)
        assert (layout.owner_pid(w), layout.owner_start(w)) == (pid, start)
    assert layout.owner_word(5, 1) != layout.owner_word(5, 2)   # a reused pid differs


def test_sizes_and_offsets() -> None:
    assert layout.slot_offset(0) == layout.H_SLOTS == layout.HEADER_FIXED
    assert layout.slot_offset(3) - layout.slot_offset(2) == layout.SLOT_BYTES
    assert layout.SLOT_BYTES % 64 == 0                  # one cache line each
    assert layout.header_size(4) == layout.slot_offset(4)
    assert layout.table_size(3, 2, 1) == layout.T_BLOCK_IDS + 8 * (3 * 2 + 2)
    assert layout.block_size(1024) == layout.B_WORDS + 128
    assert layout.B_WORDS % 64 == 0                     # bitmap words start on a cache line


# --- issue 17.4: a name is refused up front unless its longest segment name fits ------------
def test_longest_map_name_fits_every_derived_segment_name() -> None:
    longest = "n" * layout.MAX_MAP_NAME
    assert layout.check_map_name(longest) == longest
    worst = [layout.header_name(longest), layout.block_name(longest, (1 << 63) - 1),
             layout.table_name(longest, (1 << 32) - 1, (1 << 32) - 1)]
    assert max(len(n) for n in worst) == layout.NAME_MAX    # no slack, no overflow
    # Guest RAM is in memfds (no /dev/shm name): their names fit memfd_create's limit.
    memfds = [layout.ram_name(longest, (1 << 32) - 1), layout.dst_name(longest, (1 << 32) - 1)]
    assert max(len(n) for n in memfds) <= layout.MEMFD_NAME_MAX
    with pytest.raises(sd.BadInput, match=f"at most {layout.MAX_MAP_NAME} characters"):
        layout.check_map_name(longest + "n")


def test_create_refuses_a_too_long_name_and_makes_nothing(map_name: str) -> None:
    from shmdirty import segment
    name = (map_name + "x" * 300)[:layout.MAX_MAP_NAME + 1]
    with pytest.raises(sd.BadInput, match=str(layout.MAX_MAP_NAME)):
        sd.DirtyMemory.create(1 << 20, block_pages=64 * 64, name=name)
    assert [n for n in segment.list_segments() if map_name in n] == []


def test_a_map_with_the_longest_name_works(map_name: str) -> None:
    name = (map_name + "x" * 300)[:layout.MAX_MAP_NAME]
    with sd.DirtyMemory.create(1 << 20, block_pages=64, name=name) as dm:
        dm.extend(2 << 20)                 # new blocks and a new table
        dm.set_dirty_flag(0, sd.DIRTY_MEMORY_VGA)
        assert dm.get_dirty_flag(0, sd.DIRTY_MEMORY_VGA)
