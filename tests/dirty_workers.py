"""Spawn targets for tests/test_dirty.py and tests/test_dirty_mp.py.

Module level (and free of pytest) so spawned children import them quickly.
Every worker reports through a pipe: ``("ok", value)`` or ``("error",
traceback)``, so a failure in a child shows up in the test that started it.
Writers never write above the page limit the coordinator hands them (an
``mp.Value`` it raises only after the RAM is published and its initial dirty
bits are taken), so every MIGRATION bit below the limit is a writer's.
"""

from __future__ import annotations

import os
import pickle
import signal
import traceback
from typing import Any

import numpy as np

import shmdirty as sd

MIGRATION = sd.DIRTY_MEMORY_MIGRATION


def _report(conn: Any, fn: Any, *args: Any) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# --- helpers for test_dirty.py --------------------------------------------------------
def probe_not_coordinator(name: str, conn: Any) -> None:
    """Attach and try every coordinator-only call; report what each raised."""

    def run() -> dict[str, Any]:
        dm = sd.DirtyMemory.attach(name)
        try:
            out: dict[str, Any] = {"is_coordinator": dm.is_coordinator,
                                   "ram_size": dm.ram_size, "pid": os.getpid()}
            first = dm.ram_blocks()[0][0]
            calls = {
                "ram_block_add": lambda: dm.ram_block_add(dm.page_size),
                "ram_block_remove": lambda: dm.ram_block_remove(first),
                "extend": lambda: dm.extend(dm.ram_size + dm.page_size),
                "serve": lambda: dm.serve(),
                "destroy": lambda: dm.destroy(),
            }
            for what, call in calls.items():
                try:
                    call()
                    out[what] = None
                except Exception as e:  # noqa: BLE001 - reported to the test
                    out[what] = (type(e).__name__, isinstance(e, sd.NotCoordinator),
                                 isinstance(e, PermissionError), str(e))
            out["ram_size_after"] = dm.ram_size
            return out
        finally:
            dm.close()

    _report(conn, run)


def pickled_handle_child(dm: sd.DirtyMemory, page: int, conn: Any) -> None:
    """``dm`` arrives pickled: unpickling attached it.  Dirty ``page``."""

    def run() -> dict[str, Any]:
        try:
            dm.set_dirty_flag(page << dm.page_bits, sd.DIRTY_MEMORY_VGA)
            again = pickle.loads(pickle.dumps(dm))
            seen = again.get_dirty_flag(page << dm.page_bits, sd.DIRTY_MEMORY_VGA)
            again.close()
            return {"name": dm.name, "ram_size": dm.ram_size,
                    "is_coordinator": dm.is_coordinator, "flavor": dm.flavor,
                    "seen": seen, "readers": [r.pid for r in dm.rcu.readers()]}
        finally:
            dm.close()

    _report(conn, run)


def request_extend_child(name: str, new_size: int, timeout: float | None, conn: Any,
                         done: Any = None) -> None:
    """request_extend(new_size, timeout); report the size seen or the error."""

    def run() -> dict[str, Any]:
        dm = sd.DirtyMemory.attach(name)
        try:
            try:
                dm.request_extend(new_size, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - reported to the test
                return {"error": type(e).__name__, "timeout": isinstance(e, TimeoutError),
                        "message": str(e)}
            # The grant is published: this process can use the new RAM.
            last = new_size - dm.page_size
            dm.set_dirty_flag(last, sd.DIRTY_MEMORY_VGA)
            return {"ram_size": dm.ram_size, "pid": os.getpid()}
        finally:
            dm.close()
            if done is not None:
                done.set()

    _report(conn, run)


# --- writers for test_dirty_mp.py -------------------------------------------------------
def _one_op(dm: sd.DirtyMemory, rng: np.random.Generator, limit: int,
            mine: np.ndarray[Any, Any]) -> None:
    """One random write below page ``limit``, recorded in ``mine``."""
    pb = dm.page_bits
    op = rng.integers(3)
    if op == 0:
        p = int(rng.integers(limit))
        dm.set_dirty_flag((p << pb) + int(rng.integers(1 << pb)), MIGRATION)
        mine[p] = True
    elif op == 1:
        pages = rng.integers(0, limit, size=int(rng.integers(1, 12)))
        dm.set_dirty_pages(pages, MIGRATION)
        mine[pages] = True
    else:
        n = int(min(limit, rng.integers(1, 200)))
        first = int(rng.integers(0, limit - n + 1))
        words = rng.integers(0, 1 << 63, size=(n + 63) // 64, dtype=np.uint64)
        words &= rng.integers(0, 1 << 63, size=len(words), dtype=np.uint64)  # sparser
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:n].astype(bool)
        dm.set_dirty_lebitmap(words, first << pb, n)
        mine[first + np.flatnonzero(bits)] = True


def writer(name: str, flavor: str, seed: int, max_pages: int, batch: int,
           quiescent_every: int, limit: Any, stop: Any, progress: Any, conn: Any) -> None:
    """Dirty random MIGRATION pages below ``limit`` until ``stop``; send back
    (packed) every page set.

    memb: each batch is one read-side section, so a section spans many ops
    and outlives any growth that happens meanwhile.  qsbr: no sections; a
    quiescent point every ``quiescent_every`` ops.  ``progress`` is released
    once after attaching and once per batch."""

    def run() -> Any:
        dm = sd.DirtyMemory.attach(name, flavor=flavor)
        rng = np.random.default_rng(seed)
        mine = np.zeros(max_pages, dtype=bool)
        ops = 0
        try:
            progress.release()
            while not stop.is_set():
                lim = limit.value
                if flavor == "memb":
                    with dm.read_section():
                        for _ in range(batch):
                            _one_op(dm, rng, lim, mine)
                else:
                    for i in range(1, batch + 1):
                        _one_op(dm, rng, lim, mine)
                        if i % quiescent_every == 0:
                            dm.quiescent()
                ops += batch
                progress.release()
        finally:
            dm.close()
        return ops, np.packbits(mine)

    _report(conn, run)


def parked_writer(name: str, ready: Any) -> None:
    """Enter one read-side section and write in it until killed."""
    dm = sd.DirtyMemory.attach(name)
    rng = np.random.default_rng(os.getpid())
    with dm.read_section():
        pages = dm.ram_size >> dm.page_bits
        dm.set_dirty_flag(0, MIGRATION)
        ready.set()
        while True:
            dm.set_dirty_flag(int(rng.integers(pages)) << dm.page_bits, MIGRATION)


def growing_coordinator(name: str, ram_pages: int, block_pages: int, growths: int,
                        step_pages: int, go: Any, created: Any, grown: Any,
                        grown_after: int, stop: Any) -> None:
    """Create the map; on ``go`` grow it ``growths`` times (``grown`` is set
    after ``grown_after`` of them), then wait for ``stop``.  The test kills
    it mid-run."""
    dm = sd.DirtyMemory.create(ram_pages << 12, block_pages=block_pages, name=name)
    created.set()
    go.wait()
    rng = np.random.default_rng(os.getpid())
    for i in range(1, growths + 1):
        dm.extend(dm.ram_size + (int(rng.integers(1, step_pages)) << dm.page_bits))
        if i == grown_after:
            grown.set()
    stop.wait()


def crash_mid_publish(name: str, ram_pages: int, block_pages: int, where: str) -> None:
    """Create the map, grow it twice, then SIGKILL this process inside the
    third growth: ``before_generation`` (table and blocks made and sealed,
    nothing published) or ``before_ram_size`` (generation published, the
    header's RAM size not yet stored, new RAM not yet marked dirty)."""
    from shmdirty import coordinator

    dm = sd.DirtyMemory.create(ram_pages << 12, block_pages=block_pages, name=name)
    for _ in range(2):
        dm.extend(dm.ram_size + (block_pages << 12))
    coord = dm._coordinator
    target = coord.gen_ptr if where == "before_generation" else coord.ram_ptr
    real = coordinator.atomic

    class KillOnStore:
        def __getattr__(self, attr: str) -> Any:
            return getattr(real, attr)

        @staticmethod
        def store(ptr: Any, value: int, order: Any) -> None:
            if ptr == target:
                os.kill(os.getpid(), signal.SIGKILL)
            real.store(ptr, value, order)

    coordinator.atomic = KillOnStore()  # type: ignore[assignment]
    dm.extend(dm.ram_size + (2 * block_pages << 12))
    raise AssertionError("not killed")
