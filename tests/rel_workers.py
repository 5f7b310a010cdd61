"""Child and pool targets for the reliability tests (issue 10): fork,
threads, pools, closed handles, syncs that no reader can stall.

Module level and free of pytest, so spawned children and pool workers
import them quickly.  Workers that report do so through a pipe: ``("ok",
value)`` or ``("error", traceback)``.  Every wait has a timeout, so a child
whose test died never hangs around.
"""

from __future__ import annotations

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
