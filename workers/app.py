"""The ``shmdirty migrate`` application: one live migration, no rendering.

This process creates the map and the guest RAM, becomes the coordinator
(it grants hot-plug requests with ``serve_once()`` in its loop), and runs
the workers of this package in spawned processes.  It ends by comparing
source and destination byte for byte.

    result = run(MigrateConfig(...), on_event)

``on_event`` receives every typed report of ``workers.reports`` as it
arrives (``Started`` from here, the rest from the workers): a front end
renders progress from them.  ``run`` returns the result (a JSON-ready dict)
or raises ``Usage`` (the options cannot make a map), ``Failed`` (a worker
failed, or the run timed out) or ``Interrupted`` (SIGINT / SIGTERM); each
carries the map name and how many segments teardown removed.  Whatever
happens, every worker is stopped (asked first, then signalled) and every
segment of the map is removed before ``run`` returns or raises.

Where the guest comes from is ``_jobs()``: the simulated vCPUs today; a
KVM guest (``--guest kvm``) would add its VM owner and
dataplane processes there, beside them.
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
from types import FrameType
from typing import Any

from shmdirty import DirtyMemory, ShmDirtyError, segment
from shmdirty.errors import CorruptSegment

from . import Control, Flags, hotplug, migrator, vcpu
from .guest import GuestRam, compare
from .reports import (
    Done,
    Hotplug,
    Ready,
    Report,
    Started,
    VcpuDone,
    WorkerFailed,
)

PAGE_BITS = 12
FIRST_DIFFS = 10          # how many differing pages a mismatch names
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


# --- how a run ends early -------------------------------------------------------------
class RunError(Exception):
    """A run that did not finish; ``map_name`` and ``removed`` (segments
    removed by teardown) are set once teardown is done."""

    map_name = ""
    removed = 0


class Interrupted(RunError):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Failed(RunError):
    """A worker failed, or the run could not go on."""


class Usage(RunError):
    """The options asked for a map that cannot be made."""


class Signals:
    """Ctrl-C and SIGTERM become a flag the run's loop checks, so the
    interruption never lands half-way through a library call."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> Signals:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def check(self) -> None:
        if self.signum:
            raise Interrupted(self.signum)


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
        dst = GuestRam(self.map_name, PAGE_BITS, "dst")
        try:
            src.update(self.dm.ram_blocks(), create=True, boot_fill=True)
            self._spawn()
            self._wait(lambda: len(self.ready) == len(self.procs), "workers to start")
            self.flags.set(self.flags.GO)
            self.on_event(Started(self.map_name, cfg.ram, cfg.vcpus, cfg.dirty_mode,
                                  cfg.pattern, cfg.dirty_rate, len(self.procs)))
            self._wait(lambda: self.done is not None, "the migration to finish")
            self._wait(lambda: not self.conns and all(p.exitcode is not None
                                                      for p in self.procs.values()),
                       "the workers to exit")
            self._check_exit_codes()
            # Every worker has exited: the RAM and the destination are final.
            blocks = self.dm.ram_blocks()
            src.update(blocks)
            return self._result(src, dst, blocks, t_begin)
        finally:
            src.close()
            dst.close()

    def _result(self, src: GuestRam, dst: GuestRam, blocks: list[tuple[int, int]],
                t_begin: float) -> dict[str, Any]:
        assert self.done is not None
        missing = ""
        try:
            dst.update(blocks)
        except CorruptSegment as e:
            missing = str(e)
        differ: list[int] = []
        written = 0
        if missing:
            compared = src.npages
        else:  # block by block, honouring Ctrl-C / SIGTERM between blocks
            compared, differ, written = compare(src, dst, self.signals.check)
        d = self.done
        t0 = d.t_go
        hotplugs = []
        for h in self.hotplugs:
            row = asdict(h)
            row.update(during=self._phase(h.t_done), t_done=h.t_done - t0, t_ask=h.t_ask - t0)
            hotplugs.append(row)
        rounds = [dict(asdict(r), t_start=r.t_start - t0) for r in d.rounds]
        last = None if d.last_check is None else dict(asdict(d.last_check),
                                                      t_start=d.last_check.t_start - t0)
        return {
            "map": self.map_name,
            "config": asdict(self.cfg),
            "rounds": rounds,
            "end_of_precopy": d.reason,
            "last_check": last,
            "downtime": asdict(d.downtime),
            "hotplug": hotplugs,
            "vcpus": [asdict(v) for v in sorted(self.vcpu_stats, key=lambda v: v.index)],
            "precopy_seconds": d.t_stop - t0,
            "migration_seconds": d.t_end - t0,
            "wall_seconds": time.monotonic() - t_begin,
            "result": {
                "identical": not differ and not missing,
                "pages_compared": compared,
                "bytes_compared": compared << PAGE_BITS,
                "pages_differ": len(differ),
                "first_differ": differ[:FIRST_DIFFS],
                "missing": missing,
                "pages_written_by_vcpus": written,
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
        jobs.append(("migrator", migrator.main, migrator.MigratorConfig(
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
                raise Failed(f"gave up waiting for {what}: the run took longer than "
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
        if mig is not None and mig.exitcode == 0 and self.done is None:
            self._drain(0.1)
            if self.done is None:
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
        self.on_event(report)

    # -- teardown ------------------------------------------------------------------------
    def teardown(self) -> None:
        """Stop every worker (asking first, then signals), then remove every
        segment of the map: header, tables, blocks, guest RAM, destination."""
        flags = self.flags
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
            self.removed = before
