"""One run of ``shmdirty migrate``, either guest: its processes, their
pipes and reports, the wait loop, the teardown.  What differs between the
simulated guest (``workers.sim_run``) and the KVM guest
(``workers.kvm_run``) is behind ``GuestKind``.

    result = run(kind, on_event)

Every process is spawned with a pipe of its own to this one (a worker's
report pipe, or a duplex pipe for a KVM run's processes and a loopback
receiver, which the run also tells ``Go`` and ``Abort``: ``workers.messages``).
Their reports (``workers.reports``) go to ``on_event`` as they arrive.
``run`` returns the kind's result (a JSON-ready dict) or raises a
``RunError`` carrying the map name and how many segments teardown removed.
Whatever happens, every process is stopped (asked first, then signalled)
and every segment of the run (its map, and a loopback receiver's
``<map>_dst``) is removed before ``run`` returns or raises.  If this
process is killed, every process it spawned is killed with it
(``PR_SET_PDEATHSIG``): their guest RAM (memfds, ``workers.memfd``) goes
with them, and the small bitmap segments they leave are a dead map's, which
the next ``migrate`` / ``receive`` or ``shmdirty gc`` removes.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_reports
from multiprocessing.context import SpawnProcess
from typing import Any, Protocol

from shmdirty import segment

from . import receiver
from .guest import DST_MAP_SUFFIX
from .lifecycle import (
    DestinationGone,
    Failed,
    FateUnknown,
    RunError,
    Signals,
    TimedOut,
    sigint_held,
)
from .messages import Abort
from .reports import (
    DestinationLost,
    HandedOver,
    Handover,
    Listening,
    Ready,
    Report,
    WorkerFailed,
)

OnEvent = Callable[[Report], None]
LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1      # <linux/prctl.h>


def _tied(parent: int, target: Callable[..., None], *args: Any) -> None:
    """A spawned process's entry: die with the run (SIGKILL when the thread
    that spawned it exits: the run's main thread), then ``target(*args)``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:   # the run died before the prctl: follow it now
        os._exit(1)
    target(*args)


class GuestKind(Protocol):
    """What one guest kind decides in a run; ``Migration`` does the rest."""

    name: str            # "sim" or "kvm"
    timeout: float       # seconds the whole run may take
    peer_timeout: float  # seconds of silence after which a peer is lost (workers.peer)
    to: tuple[str, int] | None   # a receiver elsewhere; None: one on loopback
    poll: float          # seconds one step of the wait loop waits for a report
    join_timeout: float  # seconds processes get to exit when asked, before signals
    watched: frozenset[str] | None   # roles whose failing exit fails the run; None: all

    def prepare(self, run: Migration) -> str:
        """Before any process: make what this process owns; the map name."""
    def start(self, run: Migration) -> None:
        """Processes that start beside the receiver (before its port is known)."""
    def spawn(self, run: Migration, host: str, port: int) -> None:
        """The processes that need the destination's address."""
    def go(self, run: Migration) -> None:
        """Every process is ready: start the guest and the migration."""
    def serve(self) -> None:
        """One step of this process's own duty in the wait loop."""
    def on_report(self, run: Migration, role: str, report: Report) -> None:
        """A report the kind handles itself (before ``on_event`` sees it)."""
    def finished(self, run: Migration) -> bool:
        """The migration is over (the processes may still be exiting)."""
    def result(self, run: Migration, t_begin: float) -> dict[str, Any]:
        """The verdict, once every process exited; or a ``RunError``."""
    def abort(self) -> None:
        """Teardown: tell the processes to stop (besides ``Abort``)."""
    def destroy(self) -> None:
        """Teardown: remove what ``prepare`` made."""


class Migration:
    """One run of ``kind``; this process spawns and watches every other."""

    def __init__(self, kind: GuestKind, on_event: OnEvent, signals: Signals) -> None:
        self.kind, self.on_event, self.signals = kind, on_event, signals
        self.ctx = mp.get_context("spawn")
        self.procs: dict[str, SpawnProcess] = {}
        self.conns: dict[str, Connection] = {}    # each process's pipe, until its EOF
        self.duplex: dict[str, Connection] = {}   # the pipes the run talks on, too
        self.got: dict[type[Any], Any] = {}       # the last report of each kind
        self.ready: set[str] = set()
        self.map_name = ""
        self.removed = 0
        self.destination: tuple[str, int] = ("", 0)
        self.deadline = time.monotonic() + kind.timeout

    @property
    def dst_name(self) -> str:
        """The map of a loopback receiver."""
        return self.map_name + DST_MAP_SUFFIX

    # -- processes -----------------------------------------------------------------------
    def start(self, role: str, target: Callable[..., None], *args: Any, duplex: bool = True,
              wrap: Callable[[Connection], Any] | None = None) -> None:
        """Spawn ``target(*args, pipe)``: its end of a pipe of its own comes
        last (``wrap``ped, e.g. in a ``Control``); one-way unless ``duplex``."""
        mine, theirs = self.ctx.Pipe(duplex)
        p = self.ctx.Process(target=_tied, name=role, daemon=True,
                             args=(os.getpid(), target, *args, wrap(theirs) if wrap else theirs))
        self.conns[role] = mine
        if duplex:
            self.duplex[role] = mine
        try:
            with sigint_held():
                p.start()
        finally:
            theirs.close()  # the process holds the only other end: EOF when it exits
        self.procs[role] = p
        self.signals.check()

    def tell(self, role: str, msg: object) -> None:
        """Send ``msg`` (``workers.messages``) to ``role``, if it still listens."""
        c = self.duplex.get(role)
        if c is not None:
            try:
                c.send(msg)
            except OSError:
                pass

    def wait(self, cond: Callable[[], bool], what: str) -> None:
        """Serve, read reports and watch the processes until ``cond()``."""
        while not cond():
            self.signals.check()
            self.kind.serve()
            self.drain(self.kind.poll)
            if cond():
                return
            self._check_processes()
            if time.monotonic() > self.deadline:
                raise TimedOut(f"gave up waiting for {what}: the run took longer than "
                               f"--timeout {self.kind.timeout:g} s")

    def all_exited(self) -> bool:
        return not self.conns and all(p.exitcode is not None for p in self.procs.values())

    def drain(self, timeout: float, handle: bool = True) -> None:
        """Read every report that arrives within ``timeout`` seconds."""
        roles = {c: r for r, c in self.conns.items()}
        for c in wait_for_reports(list(roles), timeout):
            assert isinstance(c, Connection)
            role = roles[c]
            try:
                while c.poll():
                    report = c.recv()
                    if handle:
                        self._handle(role, report)
            except (EOFError, OSError):  # the process exited (or died mid-report)
                del self.conns[role]
                self.duplex.pop(role, None)
                c.close()

    def _check_processes(self) -> None:
        watched = self.kind.watched
        for role, p in self.procs.items():
            if p.exitcode not in (None, 0) and (watched is None or role in watched):
                self.drain(0.1)  # its error report, if it made one
                raise Failed(f"worker {role} (pid {p.pid}) exited with code {p.exitcode}")
        mig = self.procs.get("migrator")
        if (mig is not None and mig.exitcode == 0 and Handover not in self.got
                and DestinationLost not in self.got):
            self.drain(0.1)
            if Handover not in self.got and DestinationLost not in self.got:
                raise Failed("the migrator exited without finishing")

    def check_exit_codes(self) -> None:
        watched = self.kind.watched
        bad = [f"{r} ({p.exitcode})" for r, p in self.procs.items()
               if p.exitcode != 0 and (watched is None or r in watched)]
        if bad:
            raise Failed(f"workers failed: {', '.join(bad)}")

    # -- reports -------------------------------------------------------------------------
    def _handle(self, role: str, report: Report) -> None:
        self.got[type(report)] = report
        if isinstance(report, Ready):
            self.ready.add(report.role)
        elif isinstance(report, WorkerFailed):
            raise Failed(f"worker {report.role} failed:\n{report.traceback}")
        elif isinstance(report, DestinationLost) or (isinstance(report, Handover)
                                                     and report.outcome != "done"):
            self._stop_receiver()
        self.kind.on_report(self, role, report)
        self.on_event(report)

    def _stop_receiver(self) -> None:
        """The source gave up on its loopback receiver (lost before the
        commit, or silent after RESUME): a hung one (SIGSTOP) would hold the
        run for ever, and its guest must not start after the source decided
        (docs/STREAM.md), so it is killed now."""
        p = self.procs.get("receiver")
        if p is not None and p.exitcode is None:
            p.kill()

    # -- the run -------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        kind = self.kind
        t_begin = time.monotonic()
        self.map_name = kind.prepare(self)
        if kind.to is None:
            self.start("receiver", receiver.main, LOOPBACK, 0, self.dst_name,
                       kind.peer_timeout)
        kind.start(self)
        if kind.to is None:
            self.wait(lambda: Listening in self.got, "the receiver to listen")
            self.destination = (LOOPBACK, self.got[Listening].port)
        else:
            self.destination = kind.to
        kind.spawn(self, *self.destination)
        self.wait(lambda: self.ready >= set(self.procs) - {"receiver"}, "workers to start")
        kind.go(self)
        self.wait(lambda: kind.finished(self), "the migration to finish")
        self.wait(self.all_exited, "the workers to exit")
        return kind.result(self, t_begin)

    def teardown(self) -> None:
        """Stop every process (asked first, then signals), then remove every
        segment of the run: the map (header, tables, blocks, guest RAM) and
        a loopback receiver's, which could not clean up if it was killed."""
        for role in list(self.duplex):
            self.tell(role, Abort())     # a receiver stops listening, if it still does
        if any(p.exitcode is None for p in self.procs.values()):
            self.kind.abort()
            end = time.monotonic() + self.kind.join_timeout
            while time.monotonic() < end and any(p.exitcode is None
                                                 for p in self.procs.values()):
                self.kind.serve()
                self.drain(min(self.kind.poll, 0.05), handle=False)
            for sig in ("terminate", "kill"):
                for p in self.procs.values():
                    if p.exitcode is None:
                        getattr(p, sig)()
                for p in self.procs.values():
                    p.join(2.0)
        for c in self.conns.values():
            c.close()
        self.conns.clear()
        self.duplex.clear()
        if not self.map_name:
            return
        names = (self.map_name, self.dst_name)
        self.removed = sum(len(segment.list_segments(n)) for n in names)
        try:
            self.kind.destroy()
        finally:
            for n in names:  # anything created past destroy(), or by a killed process
                for seg in segment.list_segments(n):
                    segment.unlink(seg)


def run(kind: GuestKind, on_event: OnEvent) -> dict[str, Any]:
    """One migration (module doc); the result dict, or a RunError."""
    with Signals() as signals:
        m = Migration(kind, on_event, signals)
        try:
            try:
                result = m.execute()
            finally:
                m.teardown()
            signals.check()  # a signal during the comparison or the teardown still counts
            return result
        except RunError as e:
            e.map_name, e.removed = m.map_name, m.removed
            if isinstance(e, FateUnknown) and kind.to is None:
                # the source could not know; the run does: it killed its own receiver
                e.result.update(guest_on="none", receiver="the loopback receiver was killed "
                                "by the run: the guest runs nowhere")
            elif not isinstance(e, DestinationGone):
                # the source guest is torn down; after the commit, a destination
                # elsewhere holds it (a loopback receiver is torn down too)
                e.guest_on = "destination" if HandedOver in m.got and kind.to else "none"
            raise
