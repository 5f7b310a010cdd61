"""This process's view of the published table (shmdirty/view.py): which
table a section uses, when it is re-read, block mappings, the block walk.

Every wait has a timeout.
"""

from __future__ import annotations

import traceback
from typing import Any

import pytest

import shmdirty as sd

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
        real = h2._load_table

        def load_table(g: int) -> None:
            if not r.online and r.nesting == 0:
                outside.append(g)
                grace_period_now()         # possible only here: no section held
            real(g)
        h2._load_table = load_table  # type: ignore[method-assign]

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
