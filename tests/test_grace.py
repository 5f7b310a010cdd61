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
