"""The ``shmdirty migrate`` application: one live migration, no rendering.

    guest, why = choose_guest("auto")            # "kvm" where /dev/kvm works
    result = run(MigrateConfig(..., guest=guest, guest_why=why), on_event)

The simulated guest (``guest="sim"``): this process creates the map and
the guest RAM, becomes the coordinator (it grants hot-plug requests with
``serve_once()`` in its loop), and runs the vCPU, hot-plug and migrator
workers of this package in spawned processes; the migrator streams the
guest over TCP (``workers.sender``) to a receiver process it starts on
loopback (or to ``to``), and compares source and destination at the
switchover.  The KVM guest (``guest="kvm"``) is ``workers.kvm_run``.

``on_event`` receives every typed report of ``workers.reports`` as it
arrives (``Started`` from here, the rest from the workers): a front end
renders progress from them.  ``run`` returns the result (a JSON-ready dict)
or raises ``Usage`` (the options cannot make a map), ``Failed`` (a worker
failed, or the run timed out), ``Interrupted`` (SIGINT / SIGTERM) or
``DestinationGone`` (the destination went away before the handover); each
carries the map name and how many segments teardown removed.  Whatever
happens, every worker is stopped (asked first, then signalled) and every
segment of the run (its map, and a loopback receiver's) is removed before
``run`` returns or raises.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_reports
from multiprocessing.context import SpawnProcess
from typing import Any

import numpy as np

from shmdirty import DirtyMemory, ShmDirtyError, segment

from . import Control, Flags, hotplug, kvm, kvm_run, migrator, receiver, vcpu
from . import guest_kvm as gk
from .guest import PAGE_BITS, TAG_MASK, TAG_VCPU, GuestRam
from .lifecycle import (
    DestinationGone,
    Failed,
    Interrupted,
    RunError,
    Signals,
    TimedOut,
    Usage,
    sigint_held,
)
from .plot import plot_rounds
from .reports import (
    DestinationLost,
    Done,
    Handover,
    Hotplug,
    Listening,
    Ready,
    Received,
    Report,
    Started,
    Switchover,
    VcpuDone,
    WorkerFailed,
)
from .sender import FIRST_DIFFS  # how many differing pages a mismatch names
from .stream import PeerGone, StreamError

__all__ = ["FIRST_DIFFS", "PAGE_BITS", "DestinationGone", "Failed", "Interrupted",
           "MigrateConfig", "RunError", "StreamRefused", "TimedOut", "Usage", "choose_guest",
           "plot_rounds", "receive", "run"]

JOIN_TIMEOUT = 5.0        # seconds workers get to exit after an abort before SIGTERM
POLL = 0.01               # seconds the coordinator loop waits for a report
MAX_READERS = 64          # reader slots of the map (DirtyMemory.create's default)

OnEvent = Callable[[Report], None]


@dataclass
class MigrateConfig:
    ram: int
    vcpus: int = 2
    dirty_rate: float = 2000
    pattern: str = "uniform"
    hot_fraction: float = 0.05
    dirty_mode: str = "flag"
    hotplug: tuple[tuple[float, int], ...] = ((1.0, 32 << 20),)
    block_pages: int = 4096
    bandwidth: float = 24.0     # MiB/s, 0: unlimited
    threshold: int = 256
    max_rounds: int = 30
    seed: int = 1
    timeout: float = 300.0
    drop_round: int = 0
    name: str | None = None
    guest: str = "sim"          # "sim" or "kvm": choose_guest() resolves --guest auto
    guest_why: str = ""
    to: tuple[str, int] | None = None   # a receiver elsewhere; None: one on loopback
    steps: int = 0              # KVM: guest steps per vCPU, 0: the pattern's default
    dataplane_rate: float = 1000.0      # KVM: dataplane requests/s, 0: no dataplane
    dataplane_forget: bool = False      # testing: a dataplane that forgets to mark
    kill_destination_at: int = 0        # testing: SIGKILL the loopback receiver at round N


def choose_guest(requested: str) -> tuple[str, str]:
    """("kvm" or "sim", why) for ``--guest requested`` (kvm, sim or auto)."""
    if requested == "sim":
        return "sim", "--guest sim: simulated vCPU processes"
    ok, why = kvm.usable()
    if requested == "kvm":
        if not ok:
            raise Usage(f"--guest kvm: {why}")
        return "kvm", f"--guest kvm: {why}"
    if requested != "auto":
        raise Usage(f"--guest {requested!r}: kvm, sim or auto")
    return ("kvm", f"--guest auto: {why}, a KVM guest") if ok else \
        ("sim", f"--guest auto: {why}; simulated vCPU processes instead")


def kvm_config(cfg: MigrateConfig) -> kvm_run.KvmRunConfig:
    """The KVM run of ``cfg``: ``hotplug`` times are percent of the guest's steps."""
    pattern = "random" if cfg.pattern == "uniform" else cfg.pattern
    steps = cfg.steps or gk.DEFAULT_STEPS.get(pattern, 0)
    try:
        guest = gk.GuestConfig(
            ram=cfg.ram, vcpus=cfg.vcpus, pattern=pattern, steps=steps, seed=cfg.seed,
            hotplug=tuple((max(1, int(steps * at / 100)), size) for at, size in cfg.hotplug),
            dataplane_pages=256 if cfg.dataplane_rate else 0)
    except ValueError as e:
        raise Usage(f"the KVM guest: {e}") from None
    return kvm_run.KvmRunConfig(
        guest=guest, why=cfg.guest_why, to=cfg.to, bandwidth=cfg.bandwidth * (1 << 20),
        threshold=cfg.threshold, max_rounds=cfg.max_rounds,
        dataplane=bool(cfg.dataplane_rate), dataplane_rate=cfg.dataplane_rate,
        dataplane_forget=cfg.dataplane_forget, drop_round=cfg.drop_round,
        kill_destination_at=cfg.kill_destination_at, name=cfg.name,
        block_pages=cfg.block_pages, timeout=cfg.timeout)


# A vCPU that falls behind drops its debt (workers.vcpu); a mean under this
# share of the requested rate is reported as not reached.
RATE_REACHED = 0.95


def vcpu_rate(requested: float, stats: list[VcpuDone]) -> dict[str, Any]:
    """Requested against achieved dirty rate, pages/s per vCPU (the mean over
    the vCPUs' whole runs); ``reached`` is False when the machine could not
    keep up."""
    seconds = sum(v.seconds for v in stats)
    achieved = sum(v.writes for v in stats) / seconds if seconds else 0.0
    return {"requested": requested, "achieved": achieved,
            "reached": achieved >= RATE_REACHED * requested}


class StreamRefused(RunError):
    """``shmdirty receive``: the stream was refused or broke (docs/STREAM.md)."""


def receive(host: str, port: int, on_event: Callable[..., None],
            on_listening: Callable[[int], None]) -> dict[str, Any]:
    """``shmdirty receive``: one migration on ``host:port``, resumed to its
    end; its result.  ``StreamRefused``, or ``Interrupted`` on SIGINT /
    SIGTERM; the receiver's VM and segments are gone either way."""
    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)    # unwinds receive(), whose finally tears down

    old = {s_: signal.signal(s_, interrupt) for s_ in Signals.SIGNALS}
    try:
        with receiver.listen(host, port) as listener:
            on_listening(listener.getsockname()[1])
            conn = receiver.accept(listener)
        assert conn is not None
        try:
            return receiver.receive(conn, on_event)
        except (StreamError, PeerGone) as e:
            raise StreamRefused(str(e)) from None
    finally:
        for s_, h in old.items():
            signal.signal(s_, h)


def check_config(cfg: MigrateConfig) -> None:
    """Usage if the options cannot make a run on this machine."""
    if cfg.block_pages % 64:
        raise Usage(f"--block-pages {cfg.block_pages} must be a multiple of 64")
    if cfg.vcpus + 3 > MAX_READERS:
        raise Usage(f"--vcpus {cfg.vcpus}: at most {MAX_READERS - 3} (the map has "
                    f"{MAX_READERS} reader slots)")
    need = 2 * (cfg.ram + sum(size for _, size in cfg.hotplug))  # source + destination
    st = os.statvfs(segment.SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if need > free * 0.9:
        raise Usage(f"guest RAM and its copy need {need >> 20} MiB of {segment.SHM_DIR}, "
                    f"only {free >> 20} MiB is free")
    if cfg.name is not None and segment.list_segments(cfg.name):
        raise Usage(f"map {cfg.name} already exists")


def run(cfg: MigrateConfig, on_event: OnEvent) -> dict[str, Any]:
    """One migration (module doc); the result dict, or a RunError."""
    check_config(cfg)
    if cfg.guest == "kvm":
        return kvm_run.run(kvm_config(cfg), on_event)
    with Signals() as signals:
        m = Migration(cfg, on_event, signals)
        try:
            try:
                result = m.execute()
            finally:
                m.teardown()
            signals.check()  # a signal during the comparison or the teardown still counts
            return result
        except RunError as e:
            e.map_name, e.removed = m.map_name, m.removed
            raise


class Migration:
    """One run; this process is the coordinator."""

    def __init__(self, cfg: MigrateConfig, on_event: OnEvent, signals: Signals) -> None:
        self.cfg, self.on_event, self.signals = cfg, on_event, signals
        self.ctx = mp.get_context("spawn")
        self.flags = Flags(self.ctx, cfg.vcpus)
        self.procs: dict[str, SpawnProcess] = {}
        self.conns: dict[Connection, str] = {}   # each worker's report pipe -> its role
        self.dm: DirtyMemory | None = None
        self.map_name = ""
        self.removed = 0
        self.ready: set[str] = set()
        self.hotplugs: list[Hotplug] = []
        self.vcpu_stats: list[VcpuDone] = []
        self.done: Done | None = None
        self.switchover: Switchover | None = None
        self.handover: Handover | None = None
        self.listening: Listening | None = None
        self.destination: tuple[str, int] = ("", 0)
        self.receiver_conn: Connection | None = None
        self.deadline = time.monotonic() + cfg.timeout

    # -- the run ------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        cfg = self.cfg
        t_begin = time.monotonic()
        try:
            self.dm = DirtyMemory.create(cfg.ram, page_bits=PAGE_BITS,
                                         block_pages=cfg.block_pages, name=cfg.name)
        except (ShmDirtyError, ValueError, FileExistsError) as e:
            raise Usage(f"cannot create the map: {e}") from None
        self.map_name = self.dm.name
        src = GuestRam(self.map_name, PAGE_BITS)
        try:
            src.update(self.dm.ram_blocks(), create=True, boot_fill=True)
            if cfg.to is None:
                self._spawn_receiver()
                self._wait(lambda: self.listening is not None, "the receiver to listen")
                assert self.listening is not None
                self.destination = ("127.0.0.1", self.listening.port)
            else:
                self.destination = cfg.to
            self._spawn()
            self._wait(lambda: self.ready >= set(self.procs) - {"receiver"}, "workers to start")
            self.flags.set(self.flags.GO)
            self.on_event(Started(self.map_name, cfg.ram, cfg.vcpus, cfg.dirty_mode,
                                  cfg.pattern, cfg.dirty_rate, len(self.procs)))
            self._wait(lambda: self.handover is not None, "the migration to finish")
            self._wait(lambda: not self.conns and all(p.exitcode is not None
                                                      for p in self.procs.values()),
                       "the workers to exit")
            self._check_exit_codes()
            src.update(self.dm.ram_blocks())
            return self._result(src, t_begin)
        finally:
            src.close()

    def _spawn_receiver(self) -> None:
        recv, send = self.ctx.Pipe()
        p = self.ctx.Process(target=receiver.main, name="receiver", daemon=True,
                             args=("127.0.0.1", 0, f"{self.map_name}_dst", send))
        with sigint_held():
            p.start()
        send.close()
        self.procs["receiver"], self.conns[recv] = p, "receiver"
        self.receiver_conn = recv

    def _result(self, src: GuestRam, t_begin: float) -> dict[str, Any]:
        assert self.done is not None and self.switchover is not None
        assert self.handover is not None
        d, sw, ho = self.done, self.switchover, self.handover
        t0 = d.t_go
        written = sum(int(np.count_nonzero(v[:, 0] & np.uint64(TAG_MASK) == np.uint64(TAG_VCPU)))
                      for v in src.views)
        hotplugs = []
        for h in self.hotplugs:
            row = asdict(h)
            row.update(during=self._phase(h.t_done), t_done=h.t_done - t0, t_ask=h.t_ask - t0,
                       round=sum(1 for r in d.rounds if r.t_start <= h.t_done)
                       + (h.t_done >= d.t_stop))
            hotplugs.append(row)
        rounds = [dict(asdict(r), t_start=r.t_start - t0) for r in d.rounds]
        last = None if d.last_check is None else dict(asdict(d.last_check),
                                                      t_start=d.last_check.t_start - t0)
        wall = time.monotonic() - t_begin
        return {
            "guest": "sim",
            "guest_why": self.cfg.guest_why,
            "identical": sw.identical,
            "resumed_ok": None,
            "downtime_ms": d.downtime.seconds * 1e3,
            "total_s": wall,
            "pages_sent": ho.pages_sent,
            "bytes_sent": ho.bytes_sent,
            "throughput_mib_s": ho.bytes_sent / ho.send_seconds / (1 << 20)
            if ho.send_seconds else None,
            "rounds": len(rounds),
            "round_log": rounds,
            "map": self.map_name,
            "destination": {"address": "{}:{}".format(*self.destination),
                            "local": self.cfg.to is None},
            "config": asdict(self.cfg),
            "end_of_precopy": d.reason,
            "last_check": last,
            "downtime": asdict(d.downtime),
            "hotplug": hotplugs,
            "vcpus": [asdict(v) for v in sorted(self.vcpu_stats, key=lambda v: v.index)],
            "vcpu_rate": vcpu_rate(self.cfg.dirty_rate, self.vcpu_stats),
            "precopy_seconds": d.t_stop - t0,
            "migration_seconds": d.t_end - t0,
            "wall_seconds": wall,
            "result": {
                "identical": sw.identical,
                "method": sw.method,
                "pages_compared": sw.compared if sw.method == "bytes" else src.npages,
                "bytes_compared": src.npages << PAGE_BITS,
                "pages_differ": sw.n_differ,
                "first_differ": list(sw.differ),
                "missing": sw.detail if sw.method == "layout" else "",
                "pages_written_by_vcpus": written,
                "switchover_check_seconds": sw.seconds,
            },
        }

    def _phase(self, t: float) -> str:
        assert self.done is not None
        if t >= self.done.t_stop:
            return "downtime"
        n = 0
        for r in self.done.rounds:
            if r.t_start <= t:
                n = r.round
        return f"pre-copy round {n}" if n else "pre-copy"

    # -- workers ---------------------------------------------------------------------------
    def _jobs(self) -> list[tuple[str, Callable[..., None], Any]]:
        """(role, entry point, its config) of every worker process of the run."""
        cfg = self.cfg
        jobs: list[tuple[str, Callable[..., None], Any]] = [
            (f"vcpu{i}", vcpu.main, vcpu.VcpuConfig(
                index=i, vcpus=cfg.vcpus, rate=cfg.dirty_rate, pattern=cfg.pattern,
                mode=cfg.dirty_mode, seed=cfg.seed, hot_fraction=cfg.hot_fraction))
            for i in range(cfg.vcpus)]
        if cfg.hotplug:
            jobs.append(("hotplug", hotplug.main, hotplug.HotplugConfig(cfg.hotplug)))
        host, port = self.destination
        jobs.append(("migrator", migrator.main, migrator.MigratorConfig(
            host=host, port=port, local=cfg.to is None,
            bandwidth=cfg.bandwidth * (1 << 20), threshold=cfg.threshold,
            max_rounds=cfg.max_rounds, drop_round=cfg.drop_round,
            hotplug=bool(cfg.hotplug))))
        return jobs

    def _spawn(self) -> None:
        for role, target, wcfg in self._jobs():
            recv, send = self.ctx.Pipe(duplex=False)
            p = self.ctx.Process(target=target, args=(self.dm, wcfg, Control(self.flags, send)),
                                 name=role, daemon=True)
            self.conns[recv] = role
            try:
                with sigint_held():
                    p.start()
            finally:
                send.close()  # the worker holds the only write end: EOF when it exits
            self.procs[role] = p
            self.signals.check()

    def _wait(self, cond: Callable[[], bool], what: str) -> None:
        """Be the coordinator (serve requests, read reports) until ``cond()``."""
        assert self.dm is not None
        while not cond():
            self.signals.check()
            self.dm.serve_once()
            self._drain(POLL)
            if cond():
                return
            self._check_workers()
            if time.monotonic() > self.deadline:
                raise TimedOut(f"gave up waiting for {what}: the run took longer than "
                             f"--timeout {self.cfg.timeout:g} s")

    def _drain(self, timeout: float, handle: bool = True) -> None:
        """Read every report that arrives within ``timeout`` seconds."""
        for c in wait_for_reports(list(self.conns), timeout):
            assert isinstance(c, Connection)
            try:
                while c.poll():
                    report = c.recv()
                    if handle:
                        self._handle(report)
            except (EOFError, OSError):  # the worker exited (or died mid-report)
                del self.conns[c]
                c.close()

    def _check_workers(self) -> None:
        for role, p in self.procs.items():
            if p.exitcode not in (None, 0):
                self._drain(0.1)  # its error report, if it made one
                raise Failed(f"worker {role} (pid {p.pid}) exited with code {p.exitcode}")
        mig = self.procs.get("migrator")
        if mig is not None and mig.exitcode == 0 and self.handover is None:
            self._drain(0.1)
            if self.handover is None:
                raise Failed("the migrator exited without finishing")

    def _check_exit_codes(self) -> None:
        bad = [f"{r} ({p.exitcode})" for r, p in self.procs.items() if p.exitcode != 0]
        if bad:
            raise Failed(f"workers failed: {', '.join(bad)}")

    # -- reports ---------------------------------------------------------------------------
    def _handle(self, report: Report) -> None:
        if isinstance(report, Ready):
            self.ready.add(report.role)
        elif isinstance(report, WorkerFailed):
            raise Failed(f"worker {report.role} failed:\n{report.traceback}")
        elif isinstance(report, Hotplug):
            self.hotplugs.append(report)
        elif isinstance(report, VcpuDone):
            self.vcpu_stats.append(report)
        elif isinstance(report, Done):
            self.done = report
        elif isinstance(report, Switchover):
            self.switchover = report
        elif isinstance(report, Handover):
            self.handover = report
        elif isinstance(report, Listening):
            self.listening = report
        elif isinstance(report, Received):
            pass
        elif isinstance(report, DestinationLost):
            self.on_event(report)
            raise DestinationGone(f"the destination was lost: {report.message}",
                                  {"guest": "sim", "identical": False, "resumed_ok": None})
        self.on_event(report)

    # -- teardown ------------------------------------------------------------------------
    def teardown(self) -> None:
        """Stop every worker (asking first, then signals), then remove every
        segment of the map: header, tables, blocks, guest RAM, destination."""
        flags = self.flags
        if self.receiver_conn is not None:
            try:
                self.receiver_conn.send("stop")   # stop listening, if it still does
            except OSError:
                pass
        if any(p.exitcode is None for p in self.procs.values()):
            for flag in (flags.ABORT, flags.STOP, flags.GO):
                flags.set(flag)
            end = time.monotonic() + JOIN_TIMEOUT
            while time.monotonic() < end and any(p.exitcode is None
                                                 for p in self.procs.values()):
                if self.dm is not None:
                    self.dm.serve_once()
                self._drain(POLL, handle=False)
            for sig in ("terminate", "kill"):
                for p in self.procs.values():
                    if p.exitcode is None:
                        getattr(p, sig)()
                for p in self.procs.values():
                    p.join(2.0)
        for c in self.conns:
            c.close()
        self.conns.clear()
        if self.dm is not None:
            name = self.dm.name
            before = len(segment.list_segments(name))
            try:
                self.dm.destroy()
            finally:
                for n in segment.list_segments(name):  # anything created past destroy()
                    segment.unlink(n)
                # a loopback receiver that was killed could not clean up after itself
                for n in segment.list_segments(f"{name}_dst"):
                    segment.unlink(n)
            self.removed = before
