"""Looking at maps without attaching (shmdirty/maps.py): status, who maps
a segment, inspect, and collecting a dead map's segments."""

from __future__ import annotations

from typing import Any

import pytest

import shmdirty as sd
from shmdirty import layout, maps, segment
from shmdirty.segment import Segment

pytestmark = pytest.mark.timeout(60)

PS = 4096


def test_a_live_map_is_live_and_inspected(map_name: str) -> None:
    with sd.DirtyMemory.create(128 * PS, block_pages=64, name=map_name) as dm:
        dm.test_and_clear_dirty(0, 128 * PS, sd.DIRTY_MEMORY_VGA)
        dm.set_dirty_flag(5 * PS, sd.DIRTY_MEMORY_VGA)
        st = maps.map_status(map_name)
        assert st.state == "live" and not st.garbage and st.coordinator_alive
        assert (st.page_bits, st.block_pages, st.ram_size) == (12, 64, 128 * PS)
        assert st.generation == dm.generation
        info: dict[str, Any] = maps.inspect_map(map_name)
        assert info["dirty_pages"] == {"VGA": 1, "CODE": 128, "MIGRATION": 128}
        assert info["bitmap_blocks"] == 2 and info["ram_blocks"] == [[0, 128 * PS]]
        assert info["segment_kinds"]["hdr"] == 1 and info["segment_kinds"]["b"] == 6
        # Its own process maps the header.
        import os
        assert os.getpid() in maps.mappers([layout.header_name(map_name)])[
            layout.header_name(map_name)]
        assert maps.collect(map_name) == (maps.map_status(map_name), 0)   # live: kept
        assert segment.list_segments(map_name)


def test_absent_and_headerless_maps(map_name: str) -> None:
    assert maps.map_status(map_name).state == "absent"
    with pytest.raises(LookupError, match="is not a map"):
        maps.inspect_map(map_name)
    # A block segment with no header and nobody mapping it: garbage, collected.
    seg = Segment.create(layout.block_name(map_name, 0), layout.block_size(64),
                         layout.KIND_BLOCK)
    seg.seal()
    seg.close()
    st = maps.map_status(map_name)
    assert st.state == "dead" and "no header" in st.why
    st, removed = maps.collect(map_name)
    assert st.garbage and removed == 1
    assert segment.list_segments(map_name) == []


def test_segment_kinds_counts_roles() -> None:
    names = [layout.header_name("m"), layout.table_name("m", 1, 0xabc), layout.block_name("m", 0),
             layout.block_name("m", 1), layout.ram_name("m", 0)]
    assert maps.segment_kinds(names) == {"hdr": 1, "t": 1, "b": 2, "ram": 1}


def test_a_map_whose_coordinator_died_is_live_while_a_reader_is(
        map_name: str, spawn_ctx: Any, children: list[Any]) -> None:
    """issue 17.6(c): the coordinator (a spawned child) is SIGKILLed; this
    process still reads the map.  ls / gc must call it live and gc --yes
    (maps.collect) must leave every segment: a map is dead only when its
    coordinator AND every reader are gone."""
    import dirty_workers

    created, go, grown, stop = (spawn_ctx.Event() for _ in range(4))
    p = spawn_ctx.Process(target=dirty_workers.growing_coordinator,
                          args=(map_name, 128, 64, 0, 2, go, created, grown, -1, stop))
    p.start()
    children.append(p)
    assert created.wait(30), "the coordinator never created the map"
    dm = sd.DirtyMemory.attach(map_name)
    try:
        dm.set_dirty_flag(3 * PS, sd.DIRTY_MEMORY_VGA)    # a reader: this process's slot
        p.kill()
        p.join(30)
        assert p.exitcode == -9
        before = sorted(segment.list_segments(map_name))
        st = maps.map_status(map_name)
        assert not st.coordinator_alive and st.coordinator_pid == p.pid
        assert any(r.alive for r in st.readers)
        assert st.state == "live" and not st.garbage, st.why
        st, removed = maps.collect(map_name)
        assert removed == 0, "gc removed a map under its live reader"
        assert sorted(segment.list_segments(map_name)) == before
        assert dm.get_dirty_flag(3 * PS, sd.DIRTY_MEMORY_VGA)   # still usable
    finally:
        dm.close()
    # Now nobody is alive: garbage, collected.
    assert maps.map_status(map_name).garbage
    assert maps.collect(map_name)[1] == len(before)
