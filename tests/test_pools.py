"""Process pools never hang on a handle that cannot attach (issue 10, part 4).

A handle is pickled by name.  If unpickling it in a pool worker fails (the
map was destroyed while tasks were queued: CorruptSegment is an OSError,
which a multiprocessing.Pool worker takes for end of input; or every reader
slot is taken), the worker used to die quietly: ``pool.map`` never returned
and ProcessPoolExecutor broke every future.  Expected: the error surfaces
inside the task (unpickling records the name; the handle attaches on first
use), where the pool reports it for that task alone.

Every wait has a timeout: a hang fails the test instead of the run.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from typing import Any

import err_workers as EW
import numpy as np
import pytest
import rel_workers as W

import shmdirty as sd

pytestmark = pytest.mark.timeout(90)

WAIT = 20.0
ERR_WAIT = 30.0   # the error-pool tests (from test_libfix.py)
SPAWN = mp.get_context("spawn")


@pytest.mark.parametrize("why", ["destroyed", "no-slot"])
def test_pool_reports_a_handle_that_cannot_attach(map_name: str, why: str) -> None:
    dm = sd.DirtyMemory.create(1 << 20, max_readers=1, name=map_name)
    live = sd.DirtyMemory.create(1 << 20, name=map_name + "l")
    try:
        if why == "destroyed":
            dm.destroy()
        with SPAWN.Pool(1) as pool:
            bad = pool.apply_async(W.dirty_task, (dm, 1))
            try:
                bad.get(WAIT)
            except mp.TimeoutError:
                pytest.fail("the pool never answered: its worker died unpickling the handle")
            except sd.ShmDirtyError as e:
                if why == "destroyed":
                    assert isinstance(e, FileNotFoundError) and map_name in str(e), e
                else:
                    assert isinstance(e, sd.NoReaderSlot), e
            else:
                pytest.fail("a task with a handle that cannot attach succeeded")
            # The pool still works for good tasks.
            assert pool.apply_async(W.dirty_task, (live, 2)).get(WAIT) > 0
        assert live.get_dirty_flag(2 * live.page_size, W.MIG)
    finally:
        if why != "destroyed":
            dm.destroy()
        live.destroy()


def test_executor_fails_only_the_task_whose_handle_cannot_attach(map_name: str) -> None:
    gone = sd.DirtyMemory.create(1 << 20, name=map_name)
    live = sd.DirtyMemory.create(1 << 20, name=map_name + "l")
    try:
        gone.destroy()
        with cf.ProcessPoolExecutor(1, mp_context=SPAWN) as ex:
            good = [ex.submit(W.dirty_task, live, p) for p in (1, 2)]
            bad = ex.submit(W.dirty_task, gone, 3)
            more = ex.submit(W.dirty_task, live, 4)
            err = bad.exception(WAIT)
            assert isinstance(err, sd.ShmDirtyError) and isinstance(err, FileNotFoundError), \
                repr(err)
            for f in (*good, more):
                assert f.result(WAIT) > 0
        dest = np.zeros(4, dtype=np.uint64)
        for c in range(sd.DIRTY_MEMORY_NUM):
            if c != W.MIG:
                live.test_and_clear_dirty(0, live.ram_size, c)
        live.sync_dirty_bitmap(dest, 0, live.ram_size)
        assert all(int(dest[0]) >> p & 1 for p in (1, 2, 4))
    finally:
        live.destroy()


def test_spawn_pool_with_a_live_handle(map_name: str) -> None:
    """(A guard that holds today.)"""
    dm = sd.DirtyMemory.create(1 << 20, name=map_name)
    try:
        dm.test_and_clear_dirty(0, dm.ram_size, W.MIG)
        with SPAWN.Pool(2) as pool:
            pids: Any = pool.starmap_async(W.dirty_task, [(dm, p) for p in range(10)]).get(WAIT)
        assert len(pids) == 10
        assert all(dm.get_dirty_flag(p * dm.page_size, W.MIG) for p in range(10))
    finally:
        dm.destroy()


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_pool_gets_errors_back(method: str) -> None:
    with mp.get_context(method).Pool(1) as pool:
        for cls in EW.ERRORS:
            e = EW.example(cls)
            r = pool.apply_async(EW.raise_error, (cls.__name__, e.args if "__init__" not in
                                                 vars(cls) else e._ctor_args))
            with pytest.raises(cls) as got:
                r.get(ERR_WAIT)
            assert str(got.value) == str(e)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_pool_survives_a_map_destroyed_between_tasks(map_name: str, method: str) -> None:
    bp = 64
    dm = sd.DirtyMemory.create(4 * bp * 4096, block_pages=bp, name=map_name)
    live = sd.DirtyMemory.create(bp * 4096, block_pages=bp, name=map_name + "l")
    try:
        with mp.get_context(method).Pool(1) as pool:
            # The worker attaches and keeps its handle (mapping block 0 only).
            assert pool.apply_async(EW.attach_and_dirty, (map_name, 1)).get(ERR_WAIT) == 1
            dm.destroy()
            # Its next task needs a block (and table) that is gone with the map.
            bad = pool.apply_async(EW.attach_and_dirty, (map_name, 3 * bp))
            try:
                bad.get(ERR_WAIT)
            except mp.TimeoutError:
                pytest.fail("the pool hung: the task's error did not come back")
            except sd.MapNotFound as e:
                assert map_name in str(e)
            else:
                pytest.fail("a task on a destroyed map succeeded")
            assert pool.apply_async(EW.attach_and_dirty, (map_name + "l", 2)).get(ERR_WAIT) == 2
        assert live.get_dirty_flag(2 * live.page_size, EW.MIG)
    finally:
        if not dm.__dict__.get("_closed"):
            dm.destroy()
        live.destroy()
