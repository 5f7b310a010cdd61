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

import numpy as np
import pytest
import rel_workers as W

import shmdirty as sd

pytestmark = pytest.mark.timeout(90)

WAIT = 20.0
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
