"""Process entry points of a live migration, run in a spawn pool by ``shmdirty migrate``.

- ``workers.vcpu``: a vCPU; writes guest pages, then marks them dirty.
- ``workers.migrator``: the simulated guest's migrator: the TCP stream of
  ``workers.sender`` (pre-copy rounds with ``sync_dirty_bitmap``, then
  stop-and-copy) to a ``workers.receiver``.
- ``workers.hotplug``: asks the coordinator for more guest RAM at given times.
- ``workers.guest``: guest RAM segments, page stamps.

The KVM guest's processes (VM owner, dataplane, migrator, receiver) are
started by the same run (``workers.migration``, as ``workers.kvm_run``
says) with pipes of their own instead of the flags below, carrying the
typed messages of ``workers.messages``: only the VM owner may use the VM,
so it answers the others.

The coordinator (the process that created the map: the CLI) serves RAM
requests and watches.  Everything a worker needs arrives as arguments of its
entry point: a pickled ``DirtyMemory`` handle (it attaches in the child), a
config dataclass, and a ``Control``: the run's shared ``Flags`` and this
worker's own report pipe.  Workers send the typed reports of
``workers.reports``; an exception is reported as ``WorkerFailed`` and ends
the process with exit code 1.  The run (``workers.migration`` with
``workers.sim_run``) starts them, serves as coordinator and reads their
reports.

Why not ``multiprocessing.Event`` and one ``Queue``: any process of the run
may be SIGKILLed (that is a case the CLI handles), and a killed process
wedges both.  ``Event.set()`` waits for every process sleeping in
``wait()`` to wake up, and a killed sleeper never does; a writer killed
while holding a ``Queue``'s shared write lock blocks every other writer.
A flag word cannot be held by anyone, and a pipe of one's own just reads
end-of-file when its writer dies.

The orderings the run depends on:

- a vCPU writes a page's bytes BEFORE it sets the page's dirty bit;
- the migrator takes a page's bit (``sync_dirty_bitmap``) BEFORE it copies
  the page, so a write that lands after the copy leaves a bit behind;
- the hot-plug worker creates and fills a new RAM segment BEFORE it asks for
  the RAM, so whoever sees the larger RAM finds the segment;
- stop-and-copy begins only after every vCPU and the hot-plug worker have
  set their stopped flags, each after its last write, dirty bit and RAM
  request, so the final sync sees every one of them.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from shmdirty import atomic

from .reports import Ready, Report, WorkerFailed

FLAG_POLL = 0.002   # seconds between two looks at a flag while waiting for it
PARENT_POLL = 0.05  # seconds between two looks at the coordinator while waiting


class Flags:
    """One-word flags shared by the coordinator and the workers of a run.

    Each flag starts 0 and is set once to 1: a release store by the setter,
    acquire loads by the waiters, so a waiter that sees a flag sees
    everything its setter did before setting it."""

    GO = 0               # coordinator: every worker is ready, start
    STOP = 1             # migrator (or coordinator on abort): vCPUs and hot-plug stop
    ABORT = 2            # coordinator: give up, exit now
    HOTPLUG_STOPPED = 3  # hot-plug worker: no RAM request will follow
    VCPU_STOPPED = 4     # + vCPU index: that vCPU wrote and marked its last page

    def __init__(self, ctx: Any, vcpus: int) -> None:
        """``ctx``: the spawn context whose children will share the flags."""
        self.vcpus = vcpus
        self._raw = ctx.RawArray(ctypes.c_uint64, self.VCPU_STOPPED + vcpus)
        self._words: atomic.Words | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"vcpus": self.vcpus, "_raw": self._raw}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _words=None)

    def _ptr(self, flag: int) -> atomic.Ptr:
        if self._words is None:
            self._words = atomic.Words(self._raw)
        return self._words.ptr(flag * atomic.WORD)

    def set(self, flag: int) -> None:
        atomic.store(self._ptr(flag), 1, atomic.RELEASE)

    def is_set(self, flag: int) -> bool:
        return bool(atomic.load(self._ptr(flag), atomic.ACQUIRE))

    def wait(self, flag: int, timeout: float | None = None) -> bool:
        """Wait until ``flag`` is set (True) or ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set(flag):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            time.sleep(FLAG_POLL if deadline is None else min(FLAG_POLL, deadline - now))
        return True


@dataclass
class Control:
    """What one worker shares with the coordinator besides the map.

    The coordinator is the worker's parent.  If it dies (SIGKILL), nobody
    will ever set STOP or ABORT: ``aborted()`` is then true as well, so
    orphaned workers leave instead of keeping the dead map's slots alive."""

    flags: Flags
    conn: Connection     # this worker -> coordinator, its own pipe

    def report(self, report: Report) -> None:
        """Send one report to the coordinator."""
        self.conn.send(report)

    def aborted(self) -> bool:
        """The coordinator gave up on the run, or died."""
        if self.flags.is_set(Flags.ABORT):
            return True
        parent = mp.parent_process()  # in a spawned child: watches a pipe to the parent
        return parent is not None and not parent.is_alive()

    def wait(self, flag: int, timeout: float | None = None) -> bool:
        """Wait for ``flag``; False on timeout or once ``aborted()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = PARENT_POLL if deadline is None else min(PARENT_POLL,
                                                            deadline - time.monotonic())
            if self.flags.wait(flag, max(step, 0.0)):
                return True
            if self.aborted() or (deadline is not None and time.monotonic() >= deadline):
                return False

    def start(self, role: str) -> bool:
        """Report ``ready``, then wait for go; False if the run was aborted."""
        self.report(Ready(role))
        self.wait(Flags.GO)
        return not self.aborted()


@contextmanager
def worker(role: str, ctl: Control) -> Iterator[None]:
    """Run a worker body: ignore Ctrl-C (the coordinator decides), report
    an exception and exit 1."""
    # Ctrl-C reaches the whole foreground process group; the coordinator
    # turns it into an orderly abort, so workers must not die half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    except BaseException:
        try:
            ctl.report(WorkerFailed(role, traceback.format_exc()))
        except OSError:
            pass  # the coordinator is gone
        raise SystemExit(1) from None
    finally:
        ctl.conn.close()
