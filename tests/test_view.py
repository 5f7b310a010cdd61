"""This process's view of the published table (shmdirty/view.py): which
table a section uses, when it is re-read, block mappings, the block walk.

Every wait has a timeout.
"""

from __future__ import annotations

import traceback
from typing import Any

import pytest

import shmdirty as sd
from shmdirty import layout

pytestmark = pytest.mark.timeout(60)

PB = 12
PS = 1 << PB
BP = 64               # block_pages: small blocks, so MAX_BLOCKS is reachable
VGA = sd.DIRTY_MEMORY_VGA
WAIT = 30.0


def _coordinator_on_cue(name: str, ready: Any, cue: Any, done: Any, conn: Any) -> None:
    """Create the map; on each ``cue`` grow RAM by one block and run a barrier
    (the old table is unlinked), then set ``done``.  Stops after two cues."""
    try:
        dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=name)
        try:
            ready.set()
            for _ in range(2):
                assert cue.wait(WAIT), "never cued"
                cue.clear()
                dm.extend(dm.ram_size + BP * PS)
                dm.rcu.barrier(timeout=WAIT)
                done.set()
            conn.send(("ok", None))
        finally:
            dm.destroy()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def test_offline_quiescent_reads_no_table_outside_a_section(
        map_name: str, spawn_ctx: Any, children: list[Any]) -> None:
    """DirtyMemory.quiescent() re-read the table whenever this handle was
    behind, also when the qsbr process was offline (or memb): outside any
    section, so a grace period could end between loading the generation and
    attaching its table, which was then gone: CorruptSegment on a healthy map.
    The grace period (another process's extend + barrier) is run exactly in
    that window, which it can only be when this process holds no section."""
    ready, cue, done = spawn_ctx.Event(), spawn_ctx.Event(), spawn_ctx.Event()
    parent, child = spawn_ctx.Pipe(duplex=False)
    p = spawn_ctx.Process(target=_coordinator_on_cue,
                          args=(map_name, ready, cue, done, child))
    p.start()
    children.append(p)
    child.close()
    assert ready.wait(WAIT), "the coordinator never created the map"

    def grace_period_now() -> None:
        done.clear()
        cue.set()
        assert done.wait(WAIT), "the coordinator's extend + barrier did not finish"

    h1 = sd.DirtyMemory.attach(map_name, flavor="qsbr")
    h2 = sd.DirtyMemory.attach(map_name, flavor="qsbr")   # shares h1's slot
    try:
        r = h1.rcu
        r.thread_offline()
        grace_period_now()                 # generation moves; both handles behind
        assert h1.get_dirty(0, 2 * BP * PS, VGA)   # h1 catches up: ``seen`` moved
        assert r.seen != h2._seen and not r.online

        outside: list[int] = []
        real = h2.load_table

        def load_table(g: int) -> None:
            if not r.online and r.nesting == 0:
                outside.append(g)
                grace_period_now()         # possible only here: no section held
            real(g)
        h2.load_table = load_table  # type: ignore[method-assign]

        h2.quiescent()
        assert outside == [], "quiescent() read a table outside any section"
        # The handle catches up at its next op, inside a section.
        assert h2.get_dirty(0, 2 * BP * PS, VGA)
    finally:
        h2.close()
        h1.close()
        if not outside:
            cue.set()                      # its second round, unused above
        p.join(WAIT)
    assert parent.poll(WAIT)
    status, err = parent.recv()
    assert status == "ok", err


def test_a_section_rereads_the_table_only_after_the_counter_moved(map_name: str) -> None:
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    a = sd.DirtyMemory.attach(map_name)
    try:
        t0 = a.begin_section()
        a.end_section()
        assert a.begin_section() is t0                # nothing published: the same table
        a.end_section()
        dm.extend(2 * BP * PS)                        # publish: the counter moves
        t1 = a.begin_section()
        a.end_section()
        assert t1 is not t0 and t1.generation == dm.generation and t1.ram_size == 2 * BP * PS
        # refresh() moves to the newest table without a section; invalidate()
        # makes the next section read the generation again.
        dm.extend(3 * BP * PS)
        assert a.refresh().ram_size == 3 * BP * PS
        a.invalidate()
        assert a.begin_section().generation == dm.generation
        a.end_section()
    finally:
        a.close()
        dm.destroy()


def test_block_mappings_are_cached_and_the_walk_tiles_a_range(map_name: str) -> None:
    dm = sd.DirtyMemory.create(3 * BP * PS, block_pages=BP, name=map_name)
    try:
        t = dm.begin_section()
        try:
            b = dm.block(VGA, 1)
            assert b.block_id == t.block_ids[VGA][1]
            assert dm.block(VGA, 1) is b and dm.map_block(b.block_id) is b
            assert dm.block_segment(b.block_id).name == layout.block_name(map_name, b.block_id)
            assert list(dm.walk(BP - 1, 2 * BP + 1)) == [(0, BP - 1, 1), (1, 0, BP), (2, 0, 1)]
            assert dm.page_of(t, 5 * PS + 3) == 5
            with pytest.raises(sd.BadInput, match="outside guest RAM"):
                dm.page_of(t, 3 * BP * PS)
        finally:
            dm.end_section()
        # enter_range: a section and the page range; bad input leaves no section open.
        assert dm.enter_range(PS, 2 * PS)[1:] == (1, 3)
        dm.end_section()
        with pytest.raises(sd.BadInput):
            dm.enter_range(0, 4 * BP * PS)
        assert dm.rcu.nesting == 0
    finally:
        dm.destroy()


def test_a_closed_handle_refuses_the_view(map_name: str) -> None:
    from shmdirty.view import INTERFACE

    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    dm.destroy()
    for name in INTERFACE:
        with pytest.raises(sd.HandleClosed):
            getattr(dm, name)()
