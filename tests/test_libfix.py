"""Library items of a fresh-user test (issue 13, libfix): errors pickle,
timeouts are checked, attach() never coordinates, a failed request is
withdrawn, create() of an existing name says MapExists.

Every pool wait has a timeout: a regression fails instead of hanging.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing as mp
import os
import pickle
from typing import Any

import err_workers as W
import pytest

import shmdirty as sd
from shmdirty import segment

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0
ERRORS = [getattr(sd, n) for n in sd.__all__
          if isinstance(getattr(sd, n), type) and issubclass(getattr(sd, n), sd.ShmDirtyError)]


def _example(cls: type[sd.ShmDirtyError]) -> sd.ShmDirtyError:
    """An instance built the way the library builds it (its own parameters)."""
    if "__init__" in vars(cls):
        params = list(inspect.signature(cls).parameters)
        return cls(*[f"{p}-value" for p in params])
    return cls("something went wrong")


# --- 1. errors pickle ------------------------------------------------------------------
def test_every_error_is_exported() -> None:
    assert {c.__name__ for c in ERRORS} >= {"CorruptSegment", "MapNotFound", "MapExists",
                                            "BadInput", "GraceTimeout", "NotCoordinator"}


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_error_round_trips_through_pickle(cls: type[sd.ShmDirtyError]) -> None:
    e = _example(cls)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls
    assert back.args == e.args
    assert str(back) == str(e)
    assert vars(back) == vars(e)


def test_corrupt_segment_keeps_its_fields() -> None:
    back = pickle.loads(pickle.dumps(sd.CorruptSegment("x", "y")))
    assert (back.segment, back.why) == ("x", "y")
    assert str(back) == str(sd.CorruptSegment("x", "y"))
    m = pickle.loads(pickle.dumps(sd.MapNotFound("m")))
    assert m.map == "m" and str(m) == str(sd.MapNotFound("m"))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_pool_gets_errors_back(method: str) -> None:
    with mp.get_context(method).Pool(1) as pool:
        for cls in ERRORS:
            e = _example(cls)
            r = pool.apply_async(W.raise_error, (cls.__name__, e.args if "__init__" not in
                                                 vars(cls) else e._ctor_args))
            with pytest.raises(cls) as got:
                r.get(WAIT)
            assert str(got.value) == str(e)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_pool_survives_a_map_destroyed_between_tasks(map_name: str, method: str) -> None:
    bp = 64
    dm = sd.DirtyMemory.create(4 * bp * 4096, block_pages=bp, name=map_name)
    live = sd.DirtyMemory.create(bp * 4096, block_pages=bp, name=map_name + "l")
    try:
        with mp.get_context(method).Pool(1) as pool:
            # The worker attaches and keeps its handle (mapping block 0 only).
            assert pool.apply_async(W.attach_and_dirty, (map_name, 1)).get(WAIT) == 1
            dm.destroy()
            # Its next task needs a block (and table) that is gone with the map.
            bad = pool.apply_async(W.attach_and_dirty, (map_name, 3 * bp))
            try:
                bad.get(WAIT)
            except mp.TimeoutError:
                pytest.fail("the pool hung: the task's error did not come back")
            except sd.MapNotFound as e:
                assert map_name in str(e)
            else:
                pytest.fail("a task on a destroyed map succeeded")
            assert pool.apply_async(W.attach_and_dirty, (map_name + "l", 2)).get(WAIT) == 2
        assert live.get_dirty_flag(2 * live.page_size, W.MIG)
    finally:
        if not dm.__dict__.get("_closed"):
            dm.destroy()
        live.destroy()


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
def test_attach_in_the_creating_process_is_not_coordinator(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        a = sd.DirtyMemory.attach(map_name)
        assert dm.is_coordinator and not a.is_coordinator
        for call in (lambda: a.extend(1 << 20), lambda: a.ram_block_add(4096 * 64),
                     lambda: a.ram_block_remove(0), a.destroy, lambda: a.serve(None)):
            with pytest.raises(sd.NotCoordinator):
                call()
        assert dm.ram_size == 64 * 4096 and os.path.exists(
            os.path.join(segment.SHM_DIR, f"shmdirty-{map_name}-hdr"))
        a.close()
        u = pickle.loads(pickle.dumps(dm))   # an unpickled handle attaches: no role
        assert not u.is_coordinator
        with pytest.raises(sd.NotCoordinator):
            u.extend(1 << 20)
        u.close()
        dm.extend(128 * 4096)   # the creator still coordinates
        assert dm.ram_size == 128 * 4096
        # The creator leaves first: its process resigns; an attached handle adopts.
        b = sd.DirtyMemory.attach(map_name)
        dm.close()
        assert not b.is_coordinator
        c = sd.DirtyMemory.adopt(map_name)
        assert c.is_coordinator and not b.is_coordinator
        b.close()
        c.destroy()
    finally:
        for n in segment.list_segments(map_name):
            segment.unlink(n)


# --- 4. a request that raised is withdrawn ---------------------------------------------
def test_timed_out_request_is_withdrawn(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            got = pool.apply_async(W.timed_request, (map_name, 1 << 20, 0.2)).get(WAIT)
        assert got == "GraceTimeout"
        assert not dm.serve_once()          # nothing left to grant
        assert dm.ram_size == 64 * 4096
    finally:
        dm.destroy()


# --- 5. MapExists -----------------------------------------------------------------------
def test_create_of_an_existing_name_is_map_exists(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        before = segment.list_segments(map_name)
        with pytest.raises(sd.MapExists) as e:
            sd.DirtyMemory.create(128 * 4096, name=map_name)
        assert isinstance(e.value, FileExistsError) and isinstance(e.value, sd.ShmDirtyError)
        assert map_name in str(e.value) and "shmdirty gc" in str(e.value)
        assert segment.list_segments(map_name) == before
        dm.set_dirty_flag(0, W.MIG)          # the existing map is untouched
        assert dm.ram_size == 64 * 4096 and dm.is_coordinator
    finally:
        dm.destroy()


# --- 7. what the docs say ----------------------------------------------------------------
def test_set_dirty_pages_error_counts_pages(map_name: str) -> None:
    import numpy as np
    dm = sd.DirtyMemory.create(256 * 4096, block_pages=64, name=map_name)
    try:
        dm.test_and_clear_dirty(0, 256 * 4096, W.MIG)   # new RAM starts dirty
        with pytest.raises(sd.BadInput) as e:
            dm.set_dirty_pages(np.array([3, 256]), W.MIG)
        assert "page numbers [3, 256] is outside guest RAM: pages [0, 256)" in str(e.value)
        assert not dm.get_dirty_flag(3 * 4096, W.MIG)      # nothing changed
    finally:
        dm.destroy()


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
