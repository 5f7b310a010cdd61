"""Names, the Impl interface, and the workload registry.

A workload is one small function per implementation::

    @workload("set_dirty_flag", "lock")
    def _(s: LockState, w: Work, j: int, n: int) -> int:
        ...   # do n calls using inputs w.addrs[j:j+n]; return the ops done

``s`` is what ``Impl.open`` returned in the worker process, ``w`` the
worker's precomputed inputs (``workloads.Work``).  An optional ``@reset``
function of the same (workload, implementation) runs before every timed
chunk and is not timed (bulk workloads use it to put the bitmap back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .internals import layout

IMPL_NAMES = ("shmdirty-memb", "shmdirty-qsbr", "lock", "atomics-api", "c")
OP_NAMES = (
    "set_dirty_flag",
    "set_dirty_range",
    "get_dirty",
    "test_and_clear_dirty",
    "set_dirty_pages",
    "set_dirty_lebitmap",
    "sync_dirty_bitmap",
)
# Pseudo-workloads of the RCU micro section (shmdirty implementations only).
BUSY_READER = "rcu_busy_reader"      # short sections around get_dirty_flag, back to back
RCU_SECTION = "rcu_section"          # memb: an empty ``with dm.read_section()``
RCU_LOCK = "rcu_lock_unlock"         # memb: dm.rcu.read_lock(); dm.rcu.read_unlock()
RCU_QUIESCENT = "rcu_quiescent"      # qsbr: dm.quiescent()
RCU_QS_RAW = "rcu_quiescent_raw"     # qsbr: dm.rcu.quiescent()
RCU_RAW_ATOMIC = "rcu_raw_atomic"    # atomic.fetch_add on a Words.ptr pointer
RCU_MICRO_OPS = (BUSY_READER, RCU_SECTION, RCU_LOCK, RCU_QUIESCENT, RCU_QS_RAW, RCU_RAW_ATOMIC)

# QEMU's client numbers (include/exec/memory.h), fixed by the seed.
DIRTY_MEMORY_VGA = 0
DIRTY_MEMORY_CODE = 1
DIRTY_MEMORY_MIGRATION = 2
DIRTY_MEMORY_NUM = 3
DIRTY_CLIENTS_NOCODE = (1 << DIRTY_MEMORY_VGA) | (1 << DIRTY_MEMORY_MIGRATION)
DIRTY_MEMORY_BLOCK_SIZE = 256 * 1024 * 8


class Unavailable(Exception):
    """An implementation cannot run here; the message says why (printed as a note)."""


@dataclass(frozen=True)
class Cell:
    """One measurement: an implementation running a workload with N workers.

    Picklable: the harness sends it to every worker of the pool.
    """

    impl: str
    op: str
    pattern: str | None
    workers: int
    hotplug: bool
    duration: float        # seconds of timed work per worker
    guest_bytes: int       # RAM size when the cell starts
    page_bits: int
    range_pages: int       # pages per set_dirty_range / get_dirty / test_and_clear_dirty
    batch_pages: int       # pages per set_dirty_pages call
    seed: int
    stem: str              # unique per cell: every segment of the cell starts with it
    hotplug_step: int = 1 << 30       # bytes added per hot-add
    hotplug_interval: float = 0.010   # seconds between hot-adds (start to start)

    @property
    def cap(self) -> float:
        """Wall-clock bound of a worker's loop (bulk workloads spend untimed
        time in resets); at least one chunk always runs."""
        return 3 * self.duration + 0.3


@dataclass
class Created:
    """What ``Impl.create`` made in the parent: ``handle`` goes to the
    workers (picklable), ``obj`` stays in the parent."""

    handle: Any
    obj: Any = None


class Impl:
    """One implementation.  Parent side: check / create / prepare / grow /
    destroy, and before_run / after_run around the workers' run.  Worker
    side: open_worker (returns a state with ``tick`` and ``close``, and
    optionally ``wall_only``, ``counted`` and ``report()``: see harness)."""

    name = ""
    grows = False      # has a hot-plug variant (grow() during the run)
    in_pool = True     # False: runs its own processes (the C program)

    def check(self) -> None:
        """Raise Unavailable if this implementation cannot run here."""

    def skip(self, cell: Cell, quick: bool) -> str | None:
        """A note if this cell is not measured (the cell still appears in the JSON)."""
        if cell.hotplug and not self.grows:
            return f"{self.name}: no hot-plug variant"
        return None

    def create(self, cell: Cell, lock: Any) -> Created:
        raise NotImplementedError

    def prepare(self, created: Created, clean: tuple[int, ...], dirty: tuple[int, ...]) -> None:
        """Start the whole guest clean for the clients of ``clean`` and dirty
        for those of ``dirty`` (the others are left as created)."""

    def grow(self, created: Created, new_bytes: int) -> None:
        raise NotImplementedError

    def destroy(self, created: Created) -> None:
        raise NotImplementedError

    def open(self, handle: Any, lock: Any) -> Any:
        raise NotImplementedError

    def open_worker(self, handle: Any, lock: Any, index: int, cell: Cell) -> Any:
        """Worker ``index``'s state for ``cell``; by default every worker is alike."""
        return self.open(handle, lock)

    def workers_grow(self, cell: Cell) -> bool:
        """True if a worker, not the parent, does the hot-adds of ``cell``."""
        return False

    def before_run(self, created: Created, cell: Cell) -> None:
        """Parent, after prepare, just before the workers start the cell."""

    def after_run(self, created: Created, cell: Cell) -> None:
        """Parent, once every worker has reported (or failed), before destroy."""

    def run_external(self, cell: Cell) -> list[dict[str, Any]]:
        """For in_pool = False: measure the cell, return per-worker results."""
        raise NotImplementedError


Run = Callable[[Any, Any, int, int], int]
Reset = Callable[[Any, Any], None]

IMPLS: dict[str, Impl] = {}
RUNS: dict[tuple[str, str], Run] = {}
RESETS: dict[tuple[str, str], Reset] = {}


def register_impl(impl: Impl) -> Impl:
    IMPLS[impl.name] = impl
    return impl


def workload(op: str, *impls: str) -> Callable[[Run], Run]:
    """Register the decorated function as ``op`` for each of ``impls``."""

    def deco(fn: Run) -> Run:
        for impl in impls:
            RUNS[(impl, op)] = fn
        return fn

    return deco


def reset(op: str, *impls: str) -> Callable[[Reset], Reset]:
    """Register the decorated function as the untimed reset of ``op``."""

    def deco(fn: Reset) -> Reset:
        for impl in impls:
            RESETS[(impl, op)] = fn
        return fn

    return deco


def run_prefix(run_id: str) -> str:
    """What every segment name of a run starts with (``shmdirty-<run id>``)."""
    return layout.map_prefix() + run_id
