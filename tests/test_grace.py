"""Grace periods as waiters see them (shmdirty/grace.py): the counter,
polling tokens, waiting with back-off, call_rcu, and who owns a slot.

Every wait has a timeout.
"""

from __future__ import annotations

import os
import time

import pytest

import shmdirty as sd
from shmdirty import layout
from shmdirty.rcu import Rcu
from shmdirty.segment import Segment

pytestmark = pytest.mark.timeout(60)

PB = 12
PS = 1 << PB
BP = 64               # block_pages: small blocks, so MAX_BLOCKS is reachable
VGA = sd.DIRTY_MEMORY_VGA


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


def test_a_token_waits_for_sections_begun_before_it(map_name: str) -> None:
    """start_poll / poll / blockers / wait: a section begun before the token
    blocks it (its slot and owner named), one begun after does not."""
    from shmdirty import grace

    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    hdr = Segment.attach(layout.header_name(map_name), layout.KIND_HEADER,
                         layout.HEADER_FIXED)
    other = Rcu(hdr, dm.max_readers, "memb")
    try:
        gp = dm.rcu.gp
        other.read_lock()                             # begun before the token
        token = gp.start_poll()
        assert token == gp.counter()
        assert gp.blockers(token) == [(other.slot, other.reader.owner)]
        assert not gp.poll(token)
        with pytest.raises(sd.GraceTimeout, match=f"slot {other.slot}|pid"):
            gp.wait(token, timeout=0.05)
        other.read_unlock()
        other.read_lock()                             # begun after: not waited for
        assert gp.blockers(token) == [] and gp.poll(token)
        gp.wait(token, timeout=1.0)
        other.read_unlock()
        assert gp.poll(token - 1)                     # older tokens are complete too
    finally:
        other.close()
        hdr.close()
        dm.destroy()
    assert grace.owner_alive(grace.my_owner_word())


def test_call_rcu_runs_after_a_grace_period(map_name: str) -> None:
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    hdr = Segment.attach(layout.header_name(map_name), layout.KIND_HEADER,
                         layout.HEADER_FIXED)
    other = Rcu(hdr, dm.max_readers, "memb")
    ran: list[int] = []
    try:
        other.read_lock()
        dm.rcu.call_rcu(lambda: ran.append(1))
        assert dm.rcu.gp.pending == 1
        dm.rcu.gp.run_callbacks()                     # the reader is inside: not yet
        assert ran == []
        other.read_unlock()
        dm.rcu.barrier(timeout=10.0)
        assert ran == [1] and dm.rcu.gp.pending == 0
    finally:
        other.close()
        hdr.close()
        dm.destroy()


def test_owner_words_of_dead_or_reused_pids_are_not_alive() -> None:
    import os

    from shmdirty import grace

    me = grace.my_owner_word()
    assert layout.owner_pid(me) == os.getpid()
    assert grace.start_ticks(os.getpid()) == layout.owner_start(me)
    assert not grace.owner_alive(layout.owner_word(os.getpid(), layout.owner_start(me) + 1))
    assert not grace.owner_alive(layout.owner_word((1 << 22) - 1, 1))   # no such pid


# --- issue 17.2: teardown runs the callbacks it can, reports what it cannot ----------
def _parked(map_name: str, dm: sd.DirtyMemory) -> tuple[Segment, Rcu]:
    hdr = Segment.attach(layout.header_name(map_name), layout.KIND_HEADER,
                         layout.HEADER_FIXED)
    return hdr, Rcu(hdr, dm.max_readers, "memb")



def test_an_attached_process_runs_its_due_callbacks_when_it_closes(
        map_name: str, spawn_ctx: object, children: list[object]) -> None:
    import multiprocessing.connection

    import rcu_workers

    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    try:
        recv, send = spawn_ctx.Pipe(duplex=False)  # type: ignore[attr-defined]
        p = spawn_ctx.Process(target=rcu_workers.close_with_callback_due,  # type: ignore[attr-defined]
                              args=(map_name, send))
        p.start()
        children.append(p)
        send.close()
        assert multiprocessing.connection.wait([recv], 30.0), "the child reported nothing"
        status, value = recv.recv()
        assert status == "ok", value
        queued, ran = value
        assert queued == 1, "the callback ran before its reader left (test set-up)"
        assert ran == ["ran"], "close() dropped a callback whose grace period had ended"
        p.join(30.0)
    finally:
        dm.destroy()



def test_destroy_runs_the_callbacks_whose_grace_period_ended(map_name: str) -> None:
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    hdr, other = _parked(map_name, dm)
    ran: list[int] = []
    try:
        other.read_lock()
        dm.rcu.call_rcu(lambda: ran.append(1))
        assert dm.rcu.gp.pending == 1
        other.read_unlock()
    finally:
        other.close()
        hdr.close()
        dm.destroy()
    assert ran == [1], "destroy() dropped a callback whose grace period had ended"



def test_close_names_the_callbacks_it_could_not_run(map_name: str) -> None:
    """A reader parked for good: close() waits its timeout, then says how
    many callbacks could not run (the handle is closed all the same)."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    hdr, other = _parked(map_name, dm)
    ran: list[int] = []
    try:
        other.read_lock()
        dm.rcu.call_rcu(lambda: ran.append(1))
        dm.rcu.call_rcu(lambda: ran.append(2))
        with pytest.raises(sd.CallbacksDropped, match="2 call_rcu callbacks") as info:
            dm.close(timeout=0.1)
        assert isinstance(info.value, sd.GraceTimeout)
        assert info.value.count == 2
        assert f"pid {os.getpid()}" in str(info.value)   # who held them up
        assert ran == []
        with pytest.raises(sd.HandleClosed):
            dm.get_dirty(0, PS, VGA)
        other.read_unlock()
    finally:
        other.close()
        hdr.close()
        sd.DirtyMemory.adopt(map_name).destroy()



def test_a_failing_callback_is_reported_to_its_owner_not_to_serve(map_name: str) -> None:
    """The error surfaced in a later serve_once() (ending a serve() loop);
    now serve_once() goes on and barrier() raises it, with every other
    callback run."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    hdr, other = _parked(map_name, dm)
    ran: list[int] = []

    def boom() -> None:
        raise KeyError("the owner's bug")
    try:
        other.read_lock()
        dm.rcu.call_rcu(boom)
        dm.rcu.call_rcu(lambda: ran.append(1))
        other.read_unlock()
        # serve_once() runs them once it looks again (it backs off up to
        # 10 ms between looks at a batch): it must never raise their errors.
        deadline = time.monotonic() + 10.0
        while not ran and time.monotonic() < deadline:
            dm.serve_once()
        assert ran == [1]
        with pytest.raises(sd.CallbackFailed) as info:
            dm.rcu.barrier(timeout=10.0)
        assert isinstance(info.value, ExceptionGroup)
        assert [type(e) for e in info.value.exceptions] == [KeyError]
        dm.rcu.barrier(timeout=10.0)         # reported once
        other.read_lock()
        dm.rcu.call_rcu(boom)
        other.read_unlock()
        with pytest.raises(sd.CallbackFailed, match="1 call_rcu callback"):
            dm.close()                       # the close that ran it reports it
    finally:
        other.close()
        hdr.close()
        if not dm._closed:
            dm.close()
        sd.DirtyMemory.adopt(map_name).destroy()


def test_a_callback_queued_after_its_batch_started_waits_for_the_next(map_name: str) -> None:
    """issue 17.6(e): the call_rcu batch boundary, with two readers.  A is
    queued while reader 1 is inside: A's batch starts a grace period.
    Reader 2 enters after that start (it does not hold A up).  B, queued
    now, must wait for a grace period of its own, which reader 2 holds up:
    once reader 1 leaves, A runs and B does not until reader 2 leaves."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    hdr, r1 = _parked(map_name, dm)
    r2 = Rcu(hdr, dm.max_readers, "memb")
    ran: list[str] = []
    try:
        r1.read_lock()
        dm.rcu.call_rcu(lambda: ran.append("A"))   # A's grace period starts here
        r2.read_lock()                             # begun after it: not waited for by A
        dm.rcu.call_rcu(lambda: ran.append("B"))   # after the start: the next batch
        assert ran == [] and dm.rcu.gp.pending == 2
        r1.read_unlock()
        with pytest.raises(sd.GraceTimeout, match=f"slot {r2.slot}"):
            dm.rcu.barrier(timeout=0.1)            # A's batch is over; B's waits for r2
        assert ran == ["A"], "B ran in A's batch, before its own grace period"
        r2.read_unlock()
        dm.rcu.barrier(timeout=10.0)
        assert ran == ["A", "B"]
    finally:
        for r in (r1, r2):
            while r.nesting:          # a failed assertion left it inside
                r.read_unlock()
            r.close()
        hdr.close()
        dm.destroy()
