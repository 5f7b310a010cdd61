"""Regression tests from an adversarial review of the concurrency protocol and
the error / cleanup paths.  Each test failed before its fix.

Spawn targets live at module level here (children import this module).  No
sleeps stand in for synchronisation: Events, pipes and joins; every wait has
a timeout.
"""

from __future__ import annotations

import traceback
from typing import Any

import pytest

import shmdirty as sd
from shmdirty import layout, segment
from shmdirty.rcu import Rcu
from shmdirty.segment import Segment

pytestmark = pytest.mark.timeout(60)

PB = 12
PS = 1 << PB
BP = 64               # block_pages: small blocks, so MAX_BLOCKS is reachable
VGA = sd.DIRTY_MEMORY_VGA
WAIT = 30.0


# --- spawn targets ---------------------------------------------------------------------
def _request_too_big(name: str, size: int, conn: Any) -> None:
    """Attach (not the coordinator) and request ``size``; report what happened."""
    try:
        dm = sd.DirtyMemory.attach(name)
        try:
            dm.request_extend(size, timeout=5.0)
            conn.send(("returned", None))
        except Exception as e:
            conn.send((type(e).__name__, isinstance(e, sd.BadInput)))
        finally:
            dm.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


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


# --- 1. a request the coordinator can never grant --------------------------------------
def test_request_beyond_max_blocks_is_refused_before_it_is_posted(
        map_name: str, spawn_ctx: Any, children: list[Any]) -> None:
    """request_extend() validated only the page size: a size needing more than
    MAX_BLOCKS blocks was posted to the header; the coordinator's serve_once()
    then raised BadInput on every call (the request is withdrawn only after
    extend() succeeds), so one bad request from any process killed serve()."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    try:
        too_big = (sd.dirty.MAX_BLOCKS + 1) * BP * PS
        parent, child = spawn_ctx.Pipe(duplex=False)
        p = spawn_ctx.Process(target=_request_too_big, args=(map_name, too_big, child))
        p.start()
        children.append(p)
        child.close()
        assert parent.poll(WAIT), "the requester never reported"
        what, is_bad_input = parent.recv()
        p.join(WAIT)
        # Nothing was posted, and the coordinator's serve loop survives.
        assert dm._shared.header.words.load(layout.H_REQUEST) == 0
        assert dm.serve_once() is False
        assert (what, is_bad_input) == ("BadInput", True)
    finally:
        dm.destroy()


# --- 2. a closed handle ----------------------------------------------------------------
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


# --- 3. a token from the future --------------------------------------------------------
def test_polling_a_token_never_started_does_not_end_later_grace_periods(
        map_name: str) -> None:
    """poll(token) with a token above the counter found no reader older than
    it, declared it complete, and remembered it as the newest completed
    token: every later grace period of this process (synchronize, call_rcu,
    the swap's wait) then returned at once, with readers still inside."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    hdr = Segment.attach(layout.header_name(map_name), layout.KIND_HEADER,
                         layout.HEADER_FIXED)
    reader = Rcu(hdr, dm.max_readers, "memb")   # another reader, slot of its own
    try:
        bogus = dm.rcu.gp.counter() + 1000
        refused = False
        try:
            dm.rcu.poll(bogus)
        except sd.BadInput:
            refused = True
        reader.read_lock()
        try:
            tok = dm.rcu.start_poll()
            assert not dm.rcu.poll(tok), "a grace period ended with a reader inside"
            with pytest.raises(sd.GraceTimeout):
                dm.rcu.synchronize(timeout=0.05)
        finally:
            reader.read_unlock()
        assert dm.rcu.poll(tok)
        assert refused, "a token never handed out by start_poll() was accepted"
    finally:
        reader.unregister()
        hdr.close()
        dm.destroy()


# --- 4. quiescent() outside a section --------------------------------------------------
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


# --- 5. destroy() refused like close() -------------------------------------------------
def test_destroy_inside_a_section_refuses_before_unlinking(map_name: str) -> None:
    """destroy() unlinked every segment and dropped the pending callbacks,
    and only then did close() refuse (inside a read-side section): the call
    failed, the handle stayed open, and the map was gone for everyone."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    before = segment.list_segments(map_name)
    with dm.read_section(), pytest.raises(sd.ShmDirtyError):
        dm.destroy()
    assert segment.list_segments(map_name) == before
    other = sd.DirtyMemory.attach(map_name)     # the map is still there
    assert other.get_dirty_flag(0, VGA)
    other.close()
    dm.destroy()
    assert segment.list_segments(map_name) == []
