"""``shmdirty-memb`` and ``shmdirty-qsbr``: the workloads over DirtyMemory.

Written against the public API (shmdirty/__init__.py) only:

- parent: ``DirtyMemory.create(0, page_bits=..., name=...)`` then
  ``dm.extend(guest_bytes)`` (grown RAM is clean, as QEMU's
  dirty_memory_extend leaves it; ``prepare`` clears it anyway if not);
  hot-plug calls ``dm.extend(bigger)`` every 10 ms; ``dm.destroy()``.
- workers: ``DirtyMemory.attach(name, flavor=...)``; memb workers just run
  (each op opens its own read-side section); qsbr workers call
  ``dm.quiescent()`` after every chunk of 64 ops (one call for batch and bulk
  workloads); ``dm.close()`` as soon as the timed loop ends, so a grace
  period never waits for a worker that has stopped.

sync_dirty_bitmap cells model QEMU's migration thread, which owns the sync
and, here, the map: only the coordinator may take whole blocks by swapping
in zeroed ones (the whole-block swap of shmdirty/coordinator.py), so

- the parent creates and prepares the map, then resigns the coordinator
  role with ``dm.close()`` (the map and its segments stay);
- worker 0, the *migrator*, becomes the coordinator with
  ``DirtyMemory.adopt(name)`` and syncs its slice of the guest; in the
  hot-plug variant it also does the hot-adds itself, ``dm.extend(+1 GiB)``
  every 10 ms, time-checked between syncs and between the pieces of its
  untimed reset (never inside a timed call); its ``close()`` at the end
  resigns the role again;
- workers 1..N-1 are *vCPU writers*: attached readers that
  ``set_dirty_flag`` random pages of their own slices (MIGRATION) back to
  back for as long as the migrator may run; their sections hold up the
  migrator's grace periods, their calls are not counted in the row;
- the parent ``adopt``s the map back and destroys it.

A sync row of shmdirty is therefore ONE migrator's calls/s over a slice of
1/N of the guest, where the lock and c rows with N workers are N syncers'
total: only the 1-worker rows compare like with like.

The migrator's first (untimed) reset warms the swap path up: one sync of a
few dirty words swaps every block of its slice once, so the timed syncs
reuse retired blocks (steady state) instead of creating segments.  The swap
threshold is the library's default ``dm.swap_min_words``.

Until ``shmdirty.dirty`` exists these rows are skipped with a note.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from .internals import atomic, segment
from .registry import (
    BUSY_READER,
    RCU_LOCK,
    RCU_QS_RAW,
    RCU_QUIESCENT,
    RCU_RAW_ATOMIC,
    RCU_SECTION,
    Cell,
    Created,
    Impl,
    Unavailable,
    register_impl,
    reset,
    workload,
)
from .workloads import (
    DISPLAY_CLIENT,
    FLAG_CLIENT,
    LEBITMAP_CLIENTS,
    RANGE_MASK,
    Work,
)

FLAVORS = ("memb", "qsbr")
QSBR_EVERY = 64  # ops between quiescent() calls (= the chunk of cheap workloads)


def dirty_memory() -> Any:
    """The DirtyMemory class, or Unavailable while shmdirty.dirty is not written."""
    try:
        from shmdirty import DirtyMemory
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("shmdirty"):
            raise Unavailable(f"shmdirty rows skipped: {exc.name} does not exist yet") from None
        raise
    return DirtyMemory


def map_name(stem: str) -> str:
    """A DirtyMemory name whose segments all start with ``stem``."""
    return segment.check_map_name(stem)


class ShmdirtyState:
    """A worker attached to the map in one flavor."""

    role = "worker"
    counted = True      # its ops are in the row
    wall_only = False   # runs for cell.duration timed seconds

    raw: Any = None     # RCU micro: a private word for the raw atomic

    def __init__(self, handle: dict[str, Any]) -> None:
        self.dm = dirty_memory().attach(handle["name"], flavor=handle["flavor"])
        self.tick = self.dm.quiescent if handle["flavor"] == "qsbr" else None

    def close(self) -> None:
        if self.raw is not None:
            self.raw.release()
            self.raw = None
        self.dm.close()

    def report(self) -> dict[str, Any]:
        return {"role": self.role}


class WriterState(ShmdirtyState):
    """A vCPU writer of a sync cell: set_dirty_flag in its own slice, not counted."""

    role = "writer"
    counted = False
    wall_only = True   # as long as the migrator may run (cell.cap)

    def __init__(self, handle: dict[str, Any]) -> None:
        super().__init__(handle)
        self.cursor = 0


class MigratorState(ShmdirtyState):
    """Worker 0 of a sync cell: the migration thread, and the map's coordinator."""

    role = "migrator"

    def __init__(self, handle: dict[str, Any], cell: Cell) -> None:
        cls = dirty_memory()
        # Attach first so that adopt() keeps the cell's flavor (a process
        # that already reads a map adopts in the flavor it reads in).
        att = cls.attach(handle["name"], flavor=handle["flavor"])
        try:
            self.dm = cls.adopt(handle["name"])
        finally:
            att.close()
        if not self.dm.is_coordinator:
            self.dm.close()
            raise AssertionError("the migrator did not become the coordinator")
        self.tick = self.dm.quiescent if handle["flavor"] == "qsbr" else None
        self.hotplug = cell.hotplug
        self.step = cell.hotplug_step
        self.interval = cell.hotplug_interval
        self.next_grow = 0.0
        self.grows = 0
        self.warm = False
        self.gen_start = self.dm.generation
        self.gen_timed = 0   # generations published inside timed sync calls
        self.call_seconds: list[float] = []

    def maybe_grow(self) -> None:
        """A hot-add if ``interval`` has passed since the last one began."""
        if not self.hotplug:
            return
        now = time.perf_counter()
        if now >= self.next_grow:
            self.next_grow = now + self.interval
            self.dm.extend(self.dm.ram_size + self.step)
            self.grows += 1

    def report(self) -> dict[str, Any]:
        out = {"role": self.role, "generation_start": self.gen_start,
               "generation_end": self.dm.generation,
               "generations_in_timed_syncs": self.gen_timed,
               "swap_min_words": self.dm.swap_min_words}
        if self.call_seconds:
            ms = sorted(x * 1e3 for x in self.call_seconds)
            out["call_ms"] = {"min": ms[0], "median": statistics.median(ms), "max": ms[-1]}
        if self.hotplug:
            out["hotplug_events"] = self.grows
            out["ram_final_bytes"] = self.dm.ram_size
        return out


class ShmdirtyImpl(Impl):
    grows = True

    def __init__(self, flavor: str) -> None:
        self.flavor = flavor
        self.name = f"shmdirty-{flavor}"

    def check(self) -> None:
        dirty_memory()

    def create(self, cell: Cell, lock: Any) -> Created:
        dm = dirty_memory().create(0, page_bits=cell.page_bits, name=map_name(cell.stem))
        try:
            dm.extend(cell.guest_bytes)
        except BaseException:
            dm.destroy()
            raise
        return Created(handle={"name": dm.name, "flavor": self.flavor}, obj=dm)

    def prepare(self, created: Created, clean: tuple[int, ...], dirty: tuple[int, ...]) -> None:
        # New RAM may start dirty (QEMU's ram_block_add marks it): clear only
        # the clients the workload needs clean, since a clear walks it all.
        dm = created.obj
        size = dm.ram_size
        for c in clean:
            if dm.get_dirty(0, size, c):
                dm.test_and_clear_dirty(0, size, c)
        for c in dirty:
            if not dm.all_dirty(0, size, c):
                dm.set_dirty_range(0, size, 1 << c)

    def grow(self, created: Created, new_bytes: int) -> None:
        created.obj.extend(new_bytes)

    def destroy(self, created: Created) -> None:
        if created.obj is not None:  # None: not taken back (the harness unlinks the stem)
            created.obj.destroy()

    def open(self, handle: Any, lock: Any) -> ShmdirtyState:
        return ShmdirtyState(handle)

    # --- sync cells: the migrator is the coordinator (see the module doc) -------
    @staticmethod
    def handoff(cell: Cell) -> bool:
        return cell.op == "sync_dirty_bitmap"

    def workers_grow(self, cell: Cell) -> bool:
        return self.handoff(cell)

    def open_worker(self, handle: Any, lock: Any, index: int, cell: Cell) -> ShmdirtyState:
        if not self.handoff(cell):
            return ShmdirtyState(handle)
        return MigratorState(handle, cell) if index == 0 else WriterState(handle)

    def before_run(self, created: Created, cell: Cell) -> None:
        if self.handoff(cell):
            dm, created.obj = created.obj, None
            dm.close()  # a coordinator's close() resigns the role; the map stays

    def after_run(self, created: Created, cell: Cell) -> None:
        if self.handoff(cell) and created.obj is None:
            # The migrator resigned when it closed (or died: adopt takes a
            # dead coordinator's role too).  If it is alive and still holds
            # the role this raises; the cell's segments go with its stem.
            created.obj = dirty_memory().adopt(created.handle["name"])


for _flavor in FLAVORS:
    register_impl(ShmdirtyImpl(_flavor))

BOTH = tuple(f"shmdirty-{f}" for f in FLAVORS)


@workload("set_dirty_flag", *BOTH)
def _flag(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    f = s.dm.set_dirty_flag
    for a in w.addrs[j:j + n]:
        f(a, FLAG_CLIENT)
    return n


@workload("set_dirty_range", *BOTH)
def _range(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    f, length = s.dm.set_dirty_range, w.range_bytes
    for a in w.start_addrs[j:j + n]:
        f(a, length, RANGE_MASK)
    return n


@workload("get_dirty", *BOTH)
def _get(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    f, length = s.dm.get_dirty, w.range_bytes
    for a in w.start_addrs[j:j + n]:
        f(a, length, DISPLAY_CLIENT)
    return n


@workload("test_and_clear_dirty", *BOTH)
def _tac(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    f, length = s.dm.test_and_clear_dirty, w.range_bytes
    for a in w.start_addrs[j:j + n]:
        f(a, length, DISPLAY_CLIENT)
    return n


@workload("set_dirty_pages", *BOTH)
def _pages(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    for b in w.batches[j:j + n]:
        s.dm.set_dirty_pages(b, FLAG_CLIENT)
    return n


@workload("set_dirty_lebitmap", *BOTH)
def _lebitmap(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    s.dm.set_dirty_lebitmap(w.lebitmap, w.slice_start, w.slice_pages)
    return 1


@reset("set_dirty_lebitmap", *BOTH)
def _lebitmap_reset(s: ShmdirtyState, w: Work) -> None:
    for c in LEBITMAP_CLIENTS:
        s.dm.test_and_clear_dirty(w.slice_start, w.slice_bytes, c)


WRITER_CHUNK = 64  # set_dirty_flag calls per chunk of a sync cell's writer


@workload("sync_dirty_bitmap", *BOTH)
def _sync(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    if isinstance(s, WriterState):
        f, k = s.dm.set_dirty_flag, s.cursor
        for a in w.addrs[k:k + WRITER_CHUNK]:
            f(a, FLAG_CLIENT)
        s.cursor = (k + WRITER_CHUNK) % (len(w.addrs) - WRITER_CHUNK)
        return WRITER_CHUNK
    if isinstance(s, MigratorState):
        g0, t0 = s.dm.generation, time.perf_counter()
        got = s.dm.sync_dirty_bitmap(w.dest, w.slice_start, w.slice_bytes)
        s.call_seconds.append(time.perf_counter() - t0)
        s.gen_timed += s.dm.generation - g0
    else:
        got = s.dm.sync_dirty_bitmap(w.dest, w.slice_start, w.slice_bytes)
    if got != w.lebitmap_pages:
        raise AssertionError(f"sync_dirty_bitmap counted {got} new pages, "
                             f"expected {w.lebitmap_pages}")
    return 1


@reset("sync_dirty_bitmap", *BOTH)
def _sync_reset(s: ShmdirtyState, w: Work) -> None:
    if isinstance(s, WriterState):
        return
    if not isinstance(s, MigratorState):
        w.dest[:] = 0
        s.dm.set_dirty_lebitmap(w.lebitmap, w.slice_start, w.slice_pages)
        return
    dm = s.dm
    if not s.warm:
        # Swap every whole block of the slice once (a few dirty words are
        # enough when the range's total reaches swap_min_words), so the
        # timed syncs reuse retired blocks as a migration in steady state does.
        s.warm = True
        words = min(dm.swap_min_words + 64, w.slice_pages // 64)
        dm.set_dirty_range(w.slice_start, (words * 64) << w.page_bits, 1 << FLAG_CLIENT)
        dm.sync_dirty_bitmap(w.dest, w.slice_start, w.slice_bytes)
    w.dest[:] = 0
    # The slice back to 1 % dirty, a quarter of a bitmap block (2 GiB of
    # guest, a few ms) at a time, with the hot-add check between pieces: the
    # migrator hot-adds about every 10 ms even while it resets.
    step = max(64, dm.block_pages // 4 // 64 * 64)
    for p in range(0, w.slice_pages, step):
        s.maybe_grow()
        num = min(step, w.slice_pages - p)
        dm.set_dirty_lebitmap(w.lebitmap[p // 64:(p + num) // 64],
                              w.slice_start + (p << w.page_bits), num)
    s.maybe_grow()


@workload(BUSY_READER, "shmdirty-memb")
def _busy_memb(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    # rcutorture's reader: a short section around one read, back to back.
    f, section = s.dm.get_dirty_flag, s.dm.read_section
    for a in w.addrs[j:j + n]:
        with section():
            f(a, FLAG_CLIENT)
    return n


@workload(BUSY_READER, "shmdirty-qsbr")
def _busy_qsbr(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    # The qsbr reader: one read, then a quiescent point.
    f, quiescent = s.dm.get_dirty_flag, s.dm.quiescent
    for a in w.addrs[j:j + n]:
        f(a, FLAG_CLIENT)
        quiescent()
    return n


@workload(RCU_SECTION, "shmdirty-memb")
def _section(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    section = s.dm.read_section
    for _ in range(n):
        with section():
            pass
    return n


@workload(RCU_LOCK, "shmdirty-memb")
def _lock_unlock(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    r = s.dm.rcu
    lock, unlock = r.read_lock, r.read_unlock
    for _ in range(n):
        lock()
        unlock()
    return n


@workload(RCU_QUIESCENT, "shmdirty-qsbr")
def _quiescent(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    quiescent = s.dm.quiescent
    for _ in range(n):
        quiescent()
    return n + 1  # and the harness's quiescent() after the chunk


@workload(RCU_QS_RAW, "shmdirty-qsbr")
def _quiescent_raw(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    # The harness's dm.quiescent() after each chunk adds about 1/64 of one.
    quiescent = s.dm.rcu.quiescent
    for _ in range(n):
        quiescent()
    return n


@workload(RCU_RAW_ATOMIC, *BOTH)
def _raw_atomic(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    # One seq_cst fetch_add through the module-level fast path, on a word of
    # this process's own (uncontended, like a reader's slot).
    if s.raw is None:
        s.raw = atomic.Words(np.zeros(8, dtype=np.uint64))
    f, ptr, seq = atomic.fetch_add, s.raw.ptr(0), atomic.SEQ_CST
    for _ in range(n):
        f(ptr, 1, seq)
    return n
