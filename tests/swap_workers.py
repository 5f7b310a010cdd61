"""Spawn targets for tests/test_take.py (the RCU-native take: whole blocks
swapped out and read after a grace period).

Module level and free of pytest, so spawned children import them quickly.
Each worker that has something to say reports through a pipe: ``("ok",
value)`` or ``("error", traceback)``.  Every wait has a timeout, so a child
whose test died never hangs around.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dirty_workers import _report

import shmdirty as sd

MIGRATION = sd.DIRTY_MEMORY_MIGRATION
WAIT = 60.0


def parked_reader(name: str, go_in: Any, entered: Any, release: Any, page: int,
                  conn: Any) -> None:
    """Attach (memb); on ``go_in`` enter one read-side section and set
    ``entered``; block there until ``release``; then dirty MIGRATION
    ``page`` (still in the section, so with the table it entered with) and
    leave.  Reports the generation it entered with."""

    def run() -> dict[str, Any]:
        dm = sd.DirtyMemory.attach(name)
        try:
            assert go_in.wait(WAIT), "never told to enter"
            with dm.read_section():
                seen = dm.table.generation
                entered.set()
                assert release.wait(WAIT), "never released"
                dm.set_dirty_flag(page << dm.page_bits, MIGRATION)
            return {"generation": seen}
        finally:
            dm.close()

    _report(conn, run)


def non_coordinator_take(name: str, pages: Any, conn: Any) -> None:
    """Attach (not the coordinator), force the swap threshold to 0, dirty
    ``pages`` and take them back with each taking accessor over all RAM.
    Reports the results and the generation around each call."""

    def run() -> dict[str, Any]:
        dm = sd.DirtyMemory.attach(name)
        try:
            dm.swap_min_words = 0
            out: dict[str, Any] = {"is_coordinator": dm.is_coordinator}
            ram = dm.ram_size
            gens = [dm.generation]
            dm.set_dirty_pages(pages, MIGRATION)
            dest = np.zeros(-(-(ram >> dm.page_bits) // 64), dtype=np.uint64)
            out["synced"] = dm.sync_dirty_bitmap(dest, 0, ram)
            out["dest"] = dest
            gens.append(dm.generation)
            dm.set_dirty_pages(pages, MIGRATION)
            out["cleared"] = dm.test_and_clear_dirty(0, ram, MIGRATION)
            gens.append(dm.generation)
            dm.set_dirty_pages(pages, MIGRATION)
            snap = dm.snapshot_and_clear_dirty(0, ram, MIGRATION)
            out["snap_any"] = [snap.get_dirty(int(p) << dm.page_bits, dm.page_size)
                               for p in pages]
            gens.append(dm.generation)
            out["left"] = dm.dirty_pages(MIGRATION)
            out["generations"] = gens
            return out
        finally:
            dm.close()

    _report(conn, run)


def online_after_swap(name: str, page: int, loaded: Any, go: Any, conn: Any) -> None:
    """A qsbr reader goes offline, then comes back online for one write of
    MIGRATION ``page``.  Coming back online is held between its load of the
    grace-period counter and its store into its slot (``loaded`` is set
    there, it goes on at ``go``): the coordinator swaps a block out and
    completes the grace period in that window.  The write must land in the
    block now published, not in the retired one."""
    from shmdirty import rcu

    def run() -> dict[str, Any]:
        dm = sd.DirtyMemory.attach(name, flavor="qsbr")
        try:
            dm.set_dirty_flag(0, sd.DIRTY_MEMORY_VGA)  # a table is cached
            r = dm.rcu
            before = dm.table.generation
            r.thread_offline()
            ctr = r.reader.ctr_ptr
            real = rcu.atomic
            held = []

            class HoldOnline:
                """rcu.atomic, but the first non-zero store into our slot
                waits for the test."""

                def __getattr__(self, attr: str) -> Any:
                    return getattr(real, attr)

                @staticmethod
                def store(ptr: Any, value: int, order: Any) -> None:
                    if ptr == ctr and value and not held:
                        held.append(value)
                        loaded.set()
                        assert go.wait(WAIT), "never let go"
                    real.store(ptr, value, order)

            rcu.atomic = HoldOnline()  # type: ignore[assignment]
            try:
                dm.set_dirty_flag(page << dm.page_bits, MIGRATION)  # goes online
            finally:
                rcu.atomic = real
            assert held, "coming online did not store into the slot"
            return {"before": before, "after": dm.table.generation}
        finally:
            dm.close()

    _report(conn, run)


def die_mid_swap(name: str, block_pages: int, pages: list[int], ready: Any) -> None:
    """Create the map, leave only ``pages`` dirty for MIGRATION, then start a
    swapping sync and SIGKILL this process right after the swap table is
    published, before the retired blocks are read: their bits were taken by
    nobody."""
    import os
    import signal

    dm = sd.DirtyMemory.create(4 * block_pages << 12, block_pages=block_pages, name=name)
    for c in range(sd.DIRTY_MEMORY_NUM):
        dm.test_and_clear_dirty(0, dm.ram_size, c)
    for p in pages:
        dm.set_dirty_flag(p << 12, MIGRATION)
    dm.swap_min_words = 0
    ready.set()

    def die(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    dm.rcu.synchronize = die  # type: ignore[method-assign]
    dm.sync_dirty_bitmap(np.zeros(4 * block_pages // 64, np.uint64), 0, dm.ram_size)


def late_writer(name: str, page: int, client: int, entered: Any, go: Any, conn: Any) -> None:
    """Issue 17 item 1: attach (memb), enter one read-side section, set
    ``entered``, wait for ``go`` (the coordinator has taken the whole block
    meanwhile), set ``client``'s bit of ``page`` still inside, leave the
    section and report ``time.monotonic()`` taken just after leaving (the
    clock is system-wide: the parent compares it with its own)."""
    import time

    def run() -> float:
        dm = sd.DirtyMemory.attach(name)
        try:
            with dm.read_section():
                entered.set()
                assert go.wait(WAIT), "never told to write"
                dm.set_dirty_flag(page << dm.page_bits, client)
            return time.monotonic()
        finally:
            dm.close()

    _report(conn, run)


def observe_page(name: str, page: int, client: int, conn: Any) -> None:
    """A fresh process: attach and report what get_dirty_flag, get_dirty and
    dirty_pages say about ``client``'s ``page``."""

    def run() -> tuple[bool, bool, int]:
        dm = sd.DirtyMemory.attach(name)
        try:
            addr = page << dm.page_bits
            return (dm.get_dirty_flag(addr, client), dm.get_dirty(addr, dm.page_size, client),
                    dm.dirty_pages(client))
        finally:
            dm.close()

    _report(conn, run)
