"""This process's maps and their handles (shmdirty/handles.py): the shared
state, and closed handles (handles.CLOSED).

Objects of a closed or destroyed handle never reach unmapped memory
(issue 10, part 3).

``r = dm.rcu; dm.destroy(); r.readers()`` used to kill the interpreter
with SIGSEGV.  Every object the API hands out (the handle, its Rcu and
grace periods, a read_section, a snapshot) must, once the handle is closed
or destroyed, raise a ShmDirtyError from every public method and property
that would touch the map, and never crash or hang.  A snapshot holds only
process-local memory and keeps answering.

Each call runs in a forked grandchild of a spawned prober (tests/
rel_workers.py ``probe_closed``), so one SIGSEGV costs one outcome, not the
run.
"""

from __future__ import annotations

from typing import Any

import pytest
import rel_workers as W
from mp_harness import child_result

import shmdirty as sd
from shmdirty import segment

pytestmark = pytest.mark.timeout(120)

PB = 12
PS = 1 << PB
BP = 64               # block_pages: small blocks, so MAX_BLOCKS is reachable
WAIT = 30.0

# Calls that may return on a closed handle: they leave, or touch nothing shared.
MAY_RETURN = {
    ("DirtyMemory", "close"), ("DirtyMemory", "table"),
    # The geometry: immutable ints copied at attach (C fields on the kernel).
    ("DirtyMemory", "page_bits"), ("DirtyMemory", "block_pages"),
    ("Rcu", "unregister"), ("Rcu", "close"), ("Rcu", "closed"), ("Rcu", "reader"),
    ("Rcu", "slot"), ("Rcu", "nesting"), ("Rcu", "online"), ("Rcu", "seen"),
    ("Rcu", "sections_open"), ("Rcu", "leave"), ("Rcu", "finish"),
    ("GracePeriods", "pending"), ("GracePeriods", "close"), ("GracePeriods", "forked"),
    ("GracePeriods", "drop_callbacks"), ("GracePeriods", "closed"),
    ("GracePeriods", "pending_owned"), ("GracePeriods", "take_errors"),
}


def check(report: dict[str, dict[str, str]]) -> list[str]:
    bad = []
    for kind, calls in report.items():
        for attr, outcome in calls.items():
            if kind == "snapshot":
                ok = outcome.startswith("returned")          # plain memory: it works
            elif (kind, attr) in MAY_RETURN:
                ok = outcome.startswith("returned") or outcome.endswith("shmdirty=True")
            else:
                ok = outcome.endswith("shmdirty=True")
            if not ok:
                bad.append(f"{kind}.{attr}: {outcome}")
    return bad


@pytest.mark.parametrize("scenario", ["destroy", "close-coordinator", "close-attached-memb",
                                      "close-attached-qsbr"])
def test_every_method_after_close_raises_and_never_crashes(
        map_name: str, spawn_ctx: Any, children: list[Any], scenario: str) -> None:
    coord = None
    if scenario.startswith("close-attached"):
        coord = sd.DirtyMemory.create(1 << 20, name=map_name)
    try:
        report = child_result(spawn_ctx, W.probe_closed, map_name, scenario, timeout=110,
                              children=children)
    finally:
        if coord is not None:
            coord.destroy()
    print(report)
    assert report["Rcu"] and report["DirtyMemory"] and report["GracePeriods"]
    bad = check(report)
    assert not bad, "\n".join(bad)


def test_closed_handle_objects_as_the_readme_says(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    a = sd.DirtyMemory.attach(map_name)
    r = a.rcu
    a.close()
    with pytest.raises(sd.HandleClosed):
        _ = a.rcu
    r.synchronize(timeout=10)          # another handle is open: the shared rcu works
    gp = r.gp
    dm.destroy()
    for use in (lambda: dm.rcu, gp.start_poll, lambda: gp.wait(1, 0), r.synchronize,
                lambda: r.barrier(1), lambda: dm.read_section().__enter__()):
        with pytest.raises(sd.HandleClosed):
            use()
    assert r.gp is gp                  # the attribute itself still reads


def _serve_once_after_close(name: str, conn: Any) -> None:
    """Create, destroy (closes the last handle), then serve_once() on it."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=name)
    dm.destroy()
    try:
        dm.serve_once()
        conn.send(("returned", None))
    except Exception as e:
        conn.send((type(e).__name__, isinstance(e, sd.ShmDirtyError)))
    finally:
        conn.close()


def test_serve_once_on_a_closed_handle_raises(
        map_name: str, spawn_ctx: Any, children: list[Any]) -> None:
    """serve_once() skipped the closed check and loaded the request word
    through a pointer into the unmapped header: SIGSEGV.  (Run in a child.)"""
    parent, child = spawn_ctx.Pipe(duplex=False)
    p = spawn_ctx.Process(target=_serve_once_after_close, args=(map_name, child))
    p.start()
    children.append(p)
    child.close()
    try:
        got = parent.recv() if parent.poll(WAIT) else None
    except EOFError:                       # it died before it could say
        got = None
    p.join(WAIT)
    assert p.exitcode == 0, f"the child died with exit code {p.exitcode}"
    assert got == ("HandleClosed", True)    # a ShmDirtyError (issue 10)
    assert segment.list_segments(map_name) == []


# --- the handle count (issue 17.6: mutants of handles.acquire / release) ----------------------
def test_the_process_state_lives_exactly_as_long_as_its_handles(map_name: str) -> None:
    """Three handles of one map in one process share one state, counted:
    it stays while any is open, goes with the last (its reader slots free),
    and a later attach in the same process makes a fresh one that works."""
    from shmdirty import handles
    dm = sd.DirtyMemory.create(2 * BP * PS, block_pages=BP, name=map_name)
    try:
        st = handles.known(map_name)
        assert st is not None and st.refs == 1
        a = sd.DirtyMemory.attach(map_name)
        b = sd.DirtyMemory.attach(map_name)
        assert handles.known(map_name) is st and st.refs == 3
        a.close()
        assert handles.known(map_name) is st and st.refs == 2
        a.close()                                    # idempotent: counts once
        assert st.refs == 2
        b.close()
        assert handles.known(map_name) is st and st.refs == 1
        # The creator still works: its state was not closed under it.
        dm.set_dirty_flag(5 * PS, sd.DIRTY_MEMORY_MIGRATION)
        c = sd.DirtyMemory.attach(map_name)
        assert c.get_dirty_flag(5 * PS, sd.DIRTY_MEMORY_MIGRATION) and st.refs == 2
        c.close()
    finally:
        dm.close()
    assert handles.known(map_name) is None, "the last handle left the state behind"
    assert st.refs == 0 and st.rcu.closed
    # A later attach in this process starts afresh (the map is still there).
    d = sd.DirtyMemory.attach(map_name)
    try:
        st2 = handles.known(map_name)
        assert st2 is not None and st2 is not st and st2.refs == 1
        assert d.get_dirty_flag(5 * PS, sd.DIRTY_MEMORY_MIGRATION)
    finally:
        d.close()
    assert handles.known(map_name) is None


def test_an_attach_that_lost_the_race_joins_the_winners_state(map_name: str,
                                                              monkeypatch: Any) -> None:
    """Two threads attach a map this process has no state of: the one that
    finds the other's state made meanwhile (between its header's mapping and
    its second look) drops its header and counts itself in that state.  The
    race is forced: the first attach's header mapping runs the second attach."""
    from shmdirty import handles
    sd.DirtyMemory.create(2 * BP * PS, block_pages=BP, name=map_name).close()
    assert handles.known(map_name) is None
    real = handles.open_header
    inner: list[sd.DirtyMemory] = []

    def open_header(name: str) -> Any:
        hdr = real(name)
        monkeypatch.setattr(handles, "open_header", real)
        inner.append(sd.DirtyMemory.attach(name))   # the other thread wins meanwhile
        return hdr

    monkeypatch.setattr(handles, "open_header", open_header)
    outer = sd.DirtyMemory.attach(map_name)
    try:
        st = handles.known(map_name)
        assert st is not None and len(inner) == 1 and st.refs == 2
        inner[0].close()
        assert handles.known(map_name) is st and st.refs == 1
        outer.set_dirty_flag(3 * PS, sd.DIRTY_MEMORY_MIGRATION)   # still works
        assert outer.get_dirty_flag(3 * PS, sd.DIRTY_MEMORY_MIGRATION)
    finally:
        outer.close()
    assert handles.known(map_name) is None and st.refs == 0
