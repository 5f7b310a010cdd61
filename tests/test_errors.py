"""The errors (shmdirty/errors.py): every one exported, pickled with its
fields, and ``check_timeout`` for every public timeout (issue 13, libfix).
The rest of that issue's tests moved to the modules they test:
test_pools.py (errors through pools), test_coordinator.py (attach() never
coordinates, a failed request is withdrawn), test_dirty.py (MapExists,
set_dirty_pages' error), test_handles.py (closed handles).

Every pool wait has a timeout: a regression fails instead of hanging.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import err_workers as W
import pytest

import shmdirty as sd

pytestmark = pytest.mark.timeout(120)



# --- 1. errors pickle ------------------------------------------------------------------
def test_every_error_is_exported() -> None:
    assert {c.__name__ for c in W.ERRORS} >= {"CorruptSegment", "MapNotFound", "MapExists",
                                            "BadInput", "GraceTimeout", "NotCoordinator"}


@pytest.mark.parametrize("cls", W.ERRORS, ids=lambda c: c.__name__)
def test_error_round_trips_through_pickle(cls: type[sd.ShmDirtyError]) -> None:
    e = W.example(cls)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls
    if isinstance(e, BaseExceptionGroup):   # exceptions compare by identity
        assert repr(back.args) == repr(e.args)
        assert [type(x) for x in back.exceptions] == [type(x) for x in e.exceptions]
    else:
        assert back.args == e.args
    assert str(back) == str(e)
    assert vars(back) == vars(e)


def test_corrupt_segment_keeps_its_fields() -> None:
    back = pickle.loads(pickle.dumps(sd.CorruptSegment("x", "y")))
    assert (back.segment, back.why) == ("x", "y")
    assert str(back) == str(sd.CorruptSegment("x", "y"))
    m = pickle.loads(pickle.dumps(sd.MapNotFound("m")))
    assert m.map == "m" and str(m) == str(sd.MapNotFound("m"))


# --- 2. timeouts -----------------------------------------------------------------------
BAD_TIMEOUTS = [math.nan, -1, -0.5, math.inf, "1", True]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
def test_bad_timeouts_are_refused(map_name: str, timeout: Any) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    other = sd.DirtyMemory.attach(map_name)
    try:
        calls = [lambda: other.request_extend(1 << 20, timeout=timeout),
                 lambda: dm.request_extend(1 << 20, timeout=timeout),
                 lambda: dm.rcu.synchronize(timeout=timeout),
                 lambda: dm.rcu.barrier(timeout=timeout),
                 lambda: dm.rcu.gp.wait(dm.rcu.start_poll(), timeout),
                 lambda: dm.rcu.gp.run_callbacks(True, timeout)]
        for call in calls:
            with pytest.raises(sd.BadInput, match="timeout"):
                call()
        # Nothing changed: no request is left for the coordinator to grant.
        assert not dm.serve_once()
        assert dm.ram_size == 64 * 4096
    finally:
        other.close()
        dm.destroy()


def test_good_timeouts_are_taken(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        for t in (None, 0, 0.0, 5, 2.5):
            dm.rcu.synchronize(timeout=t)
            dm.rcu.barrier(timeout=t)
        dm.request_extend(128 * 4096, timeout=0)   # the coordinator grows at once
        assert dm.ram_size == 128 * 4096
    finally:
        dm.destroy()


# --- 3. attach() never coordinates -----------------------------------------------------


# --- 4. a request that raised is withdrawn ---------------------------------------------


# --- 5. MapExists -----------------------------------------------------------------------


# --- 7. what the docs say ----------------------------------------------------------------


