"""A handle inherited through fork() is the child's own (issue 10, part 1).

fork is the default start method on Linux before Python 3.14: a plain
``mp.Process(target=f, args=(dm,))``, a fork Pool, or ``os.fork()``.  The
child must never reuse its parent's reader slot (it takes its own on first
use, or says clearly to attach), is never the coordinator, and its close
frees only its own slot.  A fork Pool works like a spawn Pool.

These tests fork on purpose (the suite's default is spawn); every child
waits with a timeout, so none outlives its test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any

import numpy as np
import pytest
import rel_workers as W
from mp_harness import child_result

import shmdirty as sd
from shmdirty import segment

pytestmark = pytest.mark.timeout(60)

MIG = sd.DIRTY_MEMORY_MIGRATION
WAIT = 30.0
FORK = mp.get_context("fork")


def recv(conn: Any) -> Any:
    assert conn.poll(WAIT), "the child reported nothing"
    status, value = conn.recv()
    assert status == "ok", value
    return value


def my_slots(dm: sd.DirtyMemory) -> list[int]:
    return [r.slot for r in dm.rcu.readers() if r.pid == os.getpid()]


def test_forked_child_does_not_end_the_parents_grace_period(map_name: str,
                                                            children: list[Any]) -> None:
    """The parent sits in a section with a grace period started; a forked
    child dirties a page three times with the inherited handle.  The grace
    period must still wait for the parent."""
    dm = sd.DirtyMemory.create(1 << 20, name=map_name)
    try:
        mine = my_slots(dm)
        go = FORK.Event()
        theirs, child = FORK.Pipe(duplex=False)
        p = FORK.Process(target=W.fork_dirty_thrice, args=(dm, go, child))
        p.start()
        children.append(p)
        child.close()
        with dm.read_section():
            tok = dm.rcu.start_poll()
            assert not dm.rcu.poll(tok)
            go.set()
            out = recv(theirs)
            assert not dm.rcu.poll(tok), \
                f"a forked child's ops ended the parent's grace period: {out}"
            assert my_slots(dm) == mine
        p.join(WAIT)
        assert p.exitcode == 0
        if "error" in out:   # refused clearly: it must say what to do
            assert out["shmdirty"] and "attach" in out["message"], out
        else:
            assert out["is_coordinator"] is False
            assert dm.get_dirty_flag(0, MIG)
        dm.rcu.synchronize(timeout=WAIT)
        assert dm.rcu.poll(tok)
    finally:
        dm.destroy()


@pytest.mark.parametrize("use", [False, True], ids=["unused", "used"])
@pytest.mark.parametrize("with_block", [False, True], ids=["close", "with"])
def test_forked_child_close_frees_only_its_own_slot(map_name: str, spawn_ctx: Any,
                                                    children: list[Any], use: bool,
                                                    with_block: bool) -> None:
    """A forked child leaves its inherited handle (close() or a with-block).
    The parent keeps its slot, its coordinator role and its map; with
    ``max_readers=1`` a spawned process then finds no free slot."""
    dm = sd.DirtyMemory.create(1 << 20, max_readers=2 if use else 1, name=map_name)
    try:
        mine = my_slots(dm)
        assert len(mine) == 1
        theirs, child = FORK.Pipe(duplex=False)
        p = FORK.Process(target=W.fork_use_and_close, args=(dm, use, with_block, child))
        p.start()
        children.append(p)
        child.close()
        out = recv(theirs)
        p.join(WAIT)
        assert p.exitcode == 0
        assert out["is_coordinator"] is False, out
        assert out["extend"] and out["extend"]["error"] == "NotCoordinator", out
        assert out["destroy"] and out["destroy"]["error"] == "NotCoordinator", out
        if use:
            assert out["used"] is True or "attach" in out["used"]["message"], out
        # The parent is untouched.
        assert dm.is_coordinator
        assert my_slots(dm) == mine
        assert segment.list_segments(map_name), "the child's with-block destroyed the map"
        assert p.pid not in {r.pid for r in dm.rcu.readers() if r.alive}
        with dm.read_section():
            if not use:
                got = child_result(spawn_ctx, W.try_attach, map_name, timeout=WAIT,
                                   children=children)
                assert got == "NoReaderSlot", "a spawned process took the coordinator's slot"
            dm.extend(dm.ram_size + dm.page_size)  # still the coordinator, still works
    finally:
        dm.destroy()


@pytest.mark.parametrize("how", ["mp", "os.fork"])
def test_child_forked_inside_a_section_is_outside_any(map_name: str, children: list[Any],
                                                       how: str) -> None:
    """The parent forks inside a section.  The child's ops open sections of
    its own (its own slot); leaving the inherited section in the child
    (os.fork: the with-block unwinds there too) does nothing.  The parent's
    grace period still waits for the parent."""
    dm = sd.DirtyMemory.create(1 << 20, max_readers=4, name=map_name)
    try:
        mine = my_slots(dm)
        theirs, child = FORK.Pipe(duplex=False)
        go = FORK.Event()
        with dm.read_section():
            tok = dm.rcu.start_poll()
            if how == "mp":
                p = FORK.Process(target=W.fork_dirty_thrice, args=(dm, go, child))
                p.start()
                children.append(p)
                pid = p.pid
            else:
                pid = os.fork()
                if pid == 0:   # the child: still inside the parent's with-block
                    code = 1
                    try:
                        W.fork_dirty_thrice(dm, go, child)
                        code = 0
                    finally:
                        os._exit(code)   # leaves the with-block unexited, as mp does;
                                         # fork_dirty_thrice's own ops nest inside it
            child.close()
            go.set()
            out = recv(theirs)
            assert "error" not in out, out
            assert not dm.rcu.poll(tok), "the child ended the parent's grace period"
            assert my_slots(dm) == mine
        if how == "mp":
            p.join(WAIT)
            assert p.exitcode == 0
        else:
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        dm.rcu.synchronize(timeout=WAIT)
        assert dm.rcu.poll(tok)
        assert dm.get_dirty_flag(0, MIG)
    finally:
        dm.destroy()


def test_os_fork_child_unwinds_an_inherited_section(map_name: str) -> None:
    """os.fork() inside a section: in the child the section is left as the
    with-block unwinds (a no-op), after an op that opened its own section;
    one read_unlock more is still misuse.  The child always leaves by
    os._exit, whatever happens, never back into pytest."""
    dm = sd.DirtyMemory.create(1 << 20, max_readers=4, name=map_name)
    parent = os.getpid()
    try:
        try:
            pid = W.fork_in_section(dm)
        except BaseException:
            if os.getpid() != parent:
                os._exit(9)              # the with-block failed to unwind in the child
            raise
        if pid == 0:
            code = 8
            try:
                dm.rcu.read_unlock()     # no section left: misuse
            except sd.RcuMisuse:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert dm.get_dirty_flag(dm.page_size, MIG)   # the child's op landed
    finally:
        dm.destroy()


def test_forked_child_is_never_the_coordinator(map_name: str, children: list[Any]) -> None:
    """(A guard that holds today: coordinator identity is per process.)"""
    dm = sd.DirtyMemory.create(1 << 20, max_readers=4, name=map_name)
    try:
        theirs, child = FORK.Pipe(duplex=False)
        p = FORK.Process(target=W.fork_use_and_close, args=(dm, False, False, child))
        p.start()
        children.append(p)
        child.close()
        out = recv(theirs)
        p.join(WAIT)
        assert out["is_coordinator"] is False
        assert out["extend"]["error"] == out["destroy"]["error"] == "NotCoordinator"
        assert dm.is_coordinator
    finally:
        dm.destroy()


@pytest.mark.parametrize("how", ["spawn-pickled", "fork-pickled", "fork-inherited"])
def test_fork_pool_works_like_spawn_pool(map_name: str, how: str) -> None:
    """Pool workers dirty pages while the parent sits in a section with a
    grace period started: the grace period waits for the parent, every
    page arrives, and the parent keeps its slot."""
    dm = sd.DirtyMemory.create(1 << 20, max_readers=8, name=map_name)
    ctx = mp.get_context(how.split("-")[0])
    pages = list(range(3, 40, 3))
    try:
        for c in range(sd.DIRTY_MEMORY_NUM):
            dm.test_and_clear_dirty(0, dm.ram_size, c)
        mine = my_slots(dm)
        W.INHERITED = dm if how == "fork-inherited" else None
        try:
            with ctx.Pool(2) as pool:
                with dm.read_section():
                    tok = dm.rcu.start_poll()
                    if how == "fork-inherited":
                        res = pool.map_async(W.dirty_inherited_task, pages)
                    else:
                        res = pool.starmap_async(W.dirty_task, [(dm, p) for p in pages])
                    pids = res.get(WAIT)
                    assert not dm.rcu.poll(tok), \
                        "pool workers ended the parent's grace period"
                    assert my_slots(dm) == mine
                pool.close()
                pool.join()
        finally:
            W.INHERITED = None
        assert os.getpid() not in pids
        dest = np.zeros(4, dtype=np.uint64)
        assert dm.sync_dirty_bitmap(dest, 0, 256 * dm.page_size) == len(pages)
        assert my_slots(dm) == mine
        dm.rcu.synchronize(timeout=WAIT)   # the workers' slots (if any) are gone or free
    finally:
        dm.destroy()
