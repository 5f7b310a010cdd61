"""Byte offsets, the owner word and segment names (shmdirty/layout.py):
every name is built and parsed here, and the two agree."""

from __future__ import annotations

import pytest

import shmdirty as sd
from shmdirty import layout


def test_names_parse_back() -> None:
    m = "abc_1.x"
    for name, role, index in ((layout.header_name(m), "hdr", None),
                              (layout.table_name(m, 12), "t", 12),
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
    for bad in ("", "a/b", "a b", "x" * 101, "a-b"):
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
