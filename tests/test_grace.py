"""Grace periods as waiters see them (shmdirty/grace.py): the counter,
polling tokens, waiting with back-off, call_rcu, and who owns a slot.

Every wait has a timeout.
"""

from __future__ import annotations

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
