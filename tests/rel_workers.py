"""Child and pool targets for the reliability tests (issue 10): fork,
threads, pools, closed handles, syncs that no reader can stall.

Module level and free of pytest, so spawned children and pool workers
import them quickly.  Workers that report do so through a pipe: ``("ok",
value)`` or ``("error", traceback)``.  Every wait has a timeout, so a child
whose test died never hangs around.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from dirty_workers import _report

import shmdirty as sd

MIG = sd.DIRTY_MEMORY_MIGRATION
VGA = sd.DIRTY_MEMORY_VGA
WAIT = 30.0

# A handle a fork child (or fork Pool worker) inherits instead of unpickling.
INHERITED: sd.DirtyMemory | None = None


def _err(e: BaseException) -> dict[str, Any]:
    return {"error": type(e).__name__, "shmdirty": isinstance(e, sd.ShmDirtyError),
            "message": str(e)}


# --- fork --------------------------------------------------------------------------
def fork_dirty_thrice(dm: sd.DirtyMemory, go: Any, conn: Any) -> None:
    """(fork target) On ``go``, dirty MIGRATION page 0 three times with the
    inherited handle; report what happened (an error that says to attach
    is an acceptable answer too)."""

    def run() -> dict[str, Any]:
        assert go.wait(WAIT), "never told to go"
        try:
            for _ in range(3):
                dm.set_dirty_flag(0, MIG)
        except sd.ShmDirtyError as e:
            return _err(e)
        return {"pid": os.getpid(), "is_coordinator": dm.is_coordinator}

    _report(conn, run)


def fork_use_and_close(dm: sd.DirtyMemory, use: bool, with_block: bool, conn: Any) -> None:
    """(fork target) Optionally use the inherited handle, then leave it:
    ``close()``, or the end of a ``with dm:`` block.  Reports whether it
    thought it was the coordinator and what coordinator-only calls raised."""

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {"pid": os.getpid()}
        if use:
            try:
                dm.set_dirty_flag(dm.page_size, VGA)
                out["used"] = True
            except sd.ShmDirtyError as e:
                out["used"] = _err(e)
        out["is_coordinator"] = dm.is_coordinator
        for what, call in (("extend", lambda: dm.extend(dm.ram_size + dm.page_size)),
                           ("destroy", dm.destroy)):
            try:
                call()
                out[what] = None
            except sd.ShmDirtyError as e:
                out[what] = _err(e)
        if with_block:
            with dm:
                pass
        else:
            dm.close()
        return out

    _report(conn, run)


def fork_in_section(dm: sd.DirtyMemory) -> int:
    """os.fork() inside ``dm.read_section()``; the child dirties MIGRATION
    page 1 in it.  Both return the fork's result when the block has unwound."""
    with dm.read_section():
        pid = os.fork()
        if pid == 0:
            dm.set_dirty_flag(dm.page_size, MIG)
    return pid


def try_attach(name: str, conn: Any) -> None:
    """(spawn target) Attach and report "attached" or the error's type name."""

    def run() -> str:
        try:
            dm = sd.DirtyMemory.attach(name)
        except sd.ShmDirtyError as e:
            return type(e).__name__
        dm.close()
        return "attached"

    _report(conn, run)


# --- pools ---------------------------------------------------------------------------
def dirty_task(dm: sd.DirtyMemory, page: int) -> int:
    """(pool task) Dirty MIGRATION ``page`` with a pickled handle; our pid."""
    dm.set_dirty_flag(page << dm.page_bits, MIG)
    return os.getpid()


def dirty_inherited_task(page: int) -> int:
    """(fork pool task) Dirty MIGRATION ``page`` with the inherited handle."""
    assert INHERITED is not None, "no inherited handle: not a fork child"
    INHERITED.set_dirty_flag(page << INHERITED.page_bits, MIG)
    return os.getpid()


# --- a reader parked for the bounded syncs ----------------------------------------------
def parked_reader(name: str, flavor: str, entered: Any, release: Any, page: int,
                  park: float, conn: Any) -> None:
    """Attach; park "inside" for at most ``park`` seconds: memb in one
    ``read_section()``, qsbr online (one write caches the table) and never
    calling ``quiescent()``.  Then, still inside, dirty MIGRATION ``page``
    (with the table it entered with: its block may be retired by now) and
    leave.  Reports whether it was released (True) or gave up waiting."""

    def run() -> dict[str, Any]:
        dm = sd.DirtyMemory.attach(name, flavor=flavor)
        try:
            if flavor == "qsbr":
                dm.set_dirty_flag(0, VGA)   # online, with a table
                g = dm.table.generation
                entered.set()
                released = release.wait(park)
                dm.set_dirty_flag(page << dm.page_bits, MIG)
            else:
                with dm.read_section():
                    g = dm.table.generation
                    entered.set()
                    released = release.wait(park)
                    dm.set_dirty_flag(page << dm.page_bits, MIG)
            return {"released": released, "generation": g}
        finally:
            dm.close()

    _report(conn, run)


# --- closed handles: every public method, each in a forked grandchild -------------------
def _probe_args(kind: str, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments that would be valid on an open handle."""
    import threading

    import numpy as np

    from shmdirty.table import Table

    ps = 4096
    t1 = Table(1, ps, ((0,),) * 3, ((0, ps),))
    table: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
        "set_dirty_flag": ((0, VGA), {}),
        "get_dirty_flag": ((0, VGA), {}),
        "get_dirty": (((0, ps) if kind == "snapshot" else (0, ps, VGA)), {}),
        "all_dirty": ((0, ps, VGA), {}),
        "range_includes_clean": ((0, ps, sd.DIRTY_CLIENTS_ALL), {}),
        "set_dirty_range": ((0, ps, sd.DIRTY_CLIENTS_ALL), {}),
        "test_and_clear_dirty": ((0, ps, VGA), {}),
        "set_dirty_lebitmap": ((np.ones(1, np.uint64), 0, 64), {}),
        "sync_dirty_bitmap": ((np.zeros(4, np.uint64), 0, ps), {}),
        "set_dirty_pages": ((np.array([0, 1]), VGA), {}),
        "snapshot_and_clear_dirty": ((0, ps, VGA), {}),
        "dirty_pages": ((VGA,), {}),
        "blockers": ((1,), {}),
        # the view's interface (view.INTERFACE): public names the library calls
        "enter_range": ((0, ps), {}),
        "block": ((VGA, 0), {}),
        "map_block": ((0,), {}),
        "block_segment": ((0,), {}),
        "unmap_blocks": (([0],), {}),
        "walk": ((0, 1), {}),
        "over": ((0, VGA, 0, 1), {}),
        "page_of": ((t1, 0), {}),
        "reaching": ((t1, 0, ps, "a page"), {}),
        "set_table": ((t1,), {}),
        "load_table": ((1,), {}),
        "ram_block_add": ((ps,), {}),
        "ram_block_remove": ((0,), {}),
        "extend": ((2 << 20,), {}),
        "request_extend": ((2 << 20,), {"timeout": 1.0}),
        "serve": ((threading.Event(),), {}),
        "synchronize": ((), {"timeout": 1.0}),
        "barrier": ((), {"timeout": 1.0}),
        "poll": ((1,), {}),
        "wait": ((1,), {"timeout": 1.0}),
        "call_rcu": ((lambda: None,), {}),
        "reclaim": ((0, 1), {}),
    }
    return table.get(name, ((), {}))


SKIP = {"create", "attach", "adopt"}   # classmethods: they use no handle


def _call_in_grandchild(obj: Any, kind: str, attr: str, timeout: float) -> str:
    """Call ``obj.attr`` (or read it, for a property) in a forked child;
    "returned <type>", "raised <Type> shmdirty=<bool>", "signal <n>" or "hung"."""
    import json
    import select
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the grandchild: one call, then _exit
        os.close(r)
        try:
            static = getattr(type(obj), attr, None)
            # A property, or a C type's getset (the kernel's ViewCore fields).
            if isinstance(static, property) or inspect.isgetsetdescriptor(static):
                value = getattr(obj, attr)
            else:
                args, kwargs = _probe_args(kind, attr)
                value = getattr(obj, attr)(*args, **kwargs)
                if hasattr(value, "__enter__"):
                    value = value.__enter__()
            out = f"returned {type(value).__name__}"
        except BaseException as e:  # noqa: BLE001 - the outcome is the report
            out = f"raised {type(e).__name__} shmdirty={isinstance(e, sd.ShmDirtyError)}"
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], timeout)
    data = os.read(r, 4096) if ready else b""
    os.close(r)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and ready and not data:
        return f"signal {os.WTERMSIG(status)}"
    if not ready:
        return "hung"
    return str(json.loads(data)) if data else f"signal {os.WTERMSIG(status)}"


def probe_closed(name: str, scenario: str, conn: Any) -> None:
    """(spawn target) Make the objects the API hands out, then close or
    destroy the handle (``scenario``), then try every public method and
    property of each object, each in its own forked grandchild (a SIGSEGV
    there kills only the grandchild).  Reports {object: {attr: outcome}}."""

    def run() -> dict[str, dict[str, str]]:
        if scenario in ("destroy", "close-coordinator"):
            dm = sd.DirtyMemory.create(1 << 20, name=name)
        else:
            dm = sd.DirtyMemory.attach(name, flavor=scenario.rsplit("-", 1)[1])
        objs: dict[str, Any] = {
            "DirtyMemory": dm, "Rcu": dm.rcu, "GracePeriods": dm.rcu.gp,
            "read_section": dm.read_section(),
            "snapshot": dm.snapshot_and_clear_dirty(0, 1 << 16, VGA),
        }
        if scenario == "destroy":
            dm.destroy()
        else:
            dm.close()
        out: dict[str, dict[str, str]] = {}
        for kind, obj in objs.items():
            names = [n for n in dir(type(obj)) if not n.startswith("_") and n not in SKIP
                     # class attributes that are classes, and static methods,
                     # use no handle
                     and not isinstance(getattr(type(obj), n), type)
                     and not isinstance(type(obj).__dict__.get(n), staticmethod)]
            if kind == "read_section":
                names = ["__enter__"]
            out[kind] = {n: _call_in_grandchild(obj, kind, n, 10.0) for n in names}
        return out

    _report(conn, run)
