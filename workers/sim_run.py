"""The simulated guest of ``shmdirty migrate`` (``--guest sim``): what its
run does beyond ``workers.migration``.

This process creates the map and the guest RAM, becomes the coordinator (it
grants hot-plug requests with ``serve_once()`` in the run's wait loop), and
runs the vCPU, hot-plug and migrator workers of this package in spawned
processes, each with a ``Control`` (the run's ``Flags`` and its report
pipe); the migrator streams the guest over TCP (``workers.sender``) to the
receiver and compares source and destination at the switchover.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from shmdirty import DirtyMemory, ShmDirtyError

from . import Control, Flags, hotplug, migrator, vcpu
from .config import MigrateConfig
from .guest import PAGE_BITS, TAG_MASK, TAG_VCPU, GuestRam
from .lifecycle import DestinationGone, Usage, after_resume
from .migration import Migration
from .reports import (
    DestinationLost,
    Done,
    Handover,
    Hotplug,
    HotplugRefused,
    Report,
    Started,
    Switchover,
    VcpuDone,
)

JOIN_TIMEOUT = 5.0        # seconds workers get to exit after an abort before SIGTERM
POLL = 0.01               # seconds the coordinator loop waits for a report

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


class SimGuest:
    """The simulated guest's side of a run (``workers.migration.GuestKind``)."""

    name = "sim"
    poll = POLL
    join_timeout = JOIN_TIMEOUT
    watched: frozenset[str] | None = None   # every process: a failing one fails the run

    def __init__(self, cfg: MigrateConfig) -> None:
        self.cfg = cfg
        self.timeout, self.to, self.peer_timeout = cfg.timeout, cfg.to, cfg.peer_timeout
        self.flags: Flags | None = None
        self.dm: DirtyMemory | None = None
        self.src: GuestRam | None = None
        self.hotplugs: list[Hotplug] = []
        self.refused: list[HotplugRefused] = []   # hot-adds that failed alone
        self.vcpu_stats: list[VcpuDone] = []

    def prepare(self, run: Migration) -> str:
        cfg = self.cfg
        self.flags = Flags(run.ctx, cfg.vcpus)
        try:
            self.dm = DirtyMemory.create(cfg.ram, page_bits=PAGE_BITS,
                                         block_pages=cfg.block_pages, name=cfg.name)
        except (ShmDirtyError, ValueError, FileExistsError) as e:
            raise Usage(f"cannot create the map: {e}") from None
        self.src = GuestRam(self.dm.name, PAGE_BITS)
        self.src.update(self.dm.ram_blocks(), create=True, boot_fill=True)
        return self.dm.name

    def start(self, run: Migration) -> None:
        pass    # every worker needs the destination's address

    def _jobs(self, host: str, port: int) -> list[tuple[str, Callable[..., None], Any]]:
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
            host=host, port=port, local=cfg.to is None,
            bandwidth=cfg.bandwidth * (1 << 20), threshold=cfg.threshold,
            max_rounds=cfg.max_rounds, drop_round=cfg.drop_round,
            hotplug=bool(cfg.hotplug), peer_timeout=cfg.peer_timeout,
            tls_creds=cfg.tls_creds)))
        return jobs

    def spawn(self, run: Migration, host: str, port: int) -> None:
        flags = self.flags
        assert flags is not None
        for role, target, wcfg in self._jobs(host, port):
            run.start(role, target, self.dm, wcfg, duplex=False,
                      wrap=lambda conn: Control(flags, conn))

    def go(self, run: Migration) -> None:
        assert self.flags is not None
        cfg = self.cfg
        self.flags.set(Flags.GO)
        run.on_event(Started(run.map_name, cfg.ram, cfg.vcpus, cfg.dirty_mode,
                             cfg.pattern, cfg.dirty_rate, len(run.procs)))

    def serve(self) -> None:
        if self.dm is not None:
            self.dm.serve_once()    # the coordinator grants hot-plug requests

    def on_report(self, run: Migration, role: str, report: Report) -> None:
        if isinstance(report, Hotplug):
            self.hotplugs.append(report)
            # Hold the new block's memfd (workers.memfd): its creator waits for that.
            if self.dm is not None and self.src is not None:
                self.src.update(self.dm.ram_blocks())
        elif isinstance(report, HotplugRefused):
            self.refused.append(report)
        elif isinstance(report, VcpuDone):
            self.vcpu_stats.append(report)
        elif isinstance(report, DestinationLost):
            run.on_event(report)
            raise DestinationGone(f"the destination was lost: {report.message}",
                                  {"guest": "sim", "identical": False, "resumed_ok": None})

    def finished(self, run: Migration) -> bool:
        return Handover in run.got

    def abort(self) -> None:
        if self.flags is not None:
            for flag in (Flags.ABORT, Flags.STOP, Flags.GO):
                self.flags.set(flag)

    def destroy(self) -> None:
        if self.src is not None:
            self.src.close()
        if self.dm is not None:
            self.dm.destroy()

    # -- the result ----------------------------------------------------------------------
    def result(self, run: Migration, t_begin: float) -> dict[str, Any]:
        run.check_exit_codes()
        assert self.dm is not None and self.src is not None
        src = self.src
        src.update(self.dm.ram_blocks())
        d: Done = run.got[Done]
        sw: Switchover = run.got[Switchover]
        ho: Handover = run.got[Handover]
        after_resume(ho.outcome, ho.error, {"guest": "sim", "identical": sw.identical,
                                            "resumed_ok": None, "outcome": ho.outcome})
        t0 = d.t_go
        written = sum(int(np.count_nonzero(v[:, 0] & np.uint64(TAG_MASK) == np.uint64(TAG_VCPU)))
                      for v in src.views)
        hotplugs = []
        for h in self.hotplugs:
            row = asdict(h)
            row.update(during=_phase(d, h.t_done), t_done=h.t_done - t0, t_ask=h.t_ask - t0,
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
            "guest_on": "destination",
            "outcome": ho.outcome,
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
            "map": run.map_name,
            "destination": {"address": "{}:{}".format(*run.destination),
                            "local": self.cfg.to is None},
            "config": asdict(self.cfg),
            "end_of_precopy": d.reason,
            "last_check": last,
            "downtime": asdict(d.downtime),
            "hotplug": hotplugs,
            "hotplug_refused": [asdict(r) for r in self.refused],
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


def _phase(done: Done, t: float) -> str:
    if t >= done.t_stop:
        return "downtime"
    n = 0
    for r in done.rounds:
        if r.t_start <= t:
            n = r.round
    return f"pre-copy round {n}" if n else "pre-copy"
