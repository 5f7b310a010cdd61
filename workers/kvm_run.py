"""One live migration of a KVM guest, from start to verdict (``--guest kvm``).

Processes (all spawned, each with a pipe of its own to this one):

- receiver (unless the destination is elsewhere: ``to``): listens on
  loopback, builds its own VM from the stream, resumes the guest;
- VM owner: the map's coordinator, /dev/kvm, the VM and its vCPU threads;
- dataplane: writes guest RAM on its own and marks it dirty;
- migrator: ``sync_dirty_bitmap`` and the TCP stream (``workers.sender``).

The migrator's typed reports (``workers.reports``) go to ``on_event``
as they arrive; the VM owner's and the dataplane's become ``GuestHotadd``
or stay here.  The verdict: the switchover comparison (source RAM against
destination RAM, byte for byte or by digests) and the resumed guest's end
state against the model (``workers.guest_model``).  If the destination is
lost before the handover, the source guest runs to its end, its end state
is checked against the model, and ``DestinationGone`` carries that.
Nothing of the run (this side's map and a loopback receiver's) is left in
/dev/shm, whatever happens.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from shmdirty import segment

from . import dataplane, receiver, sender, vm_owner
from . import guest_kvm as g
from .guest_model import expected
from .lifecycle import DestinationGone, Failed, RunError, Signals, TimedOut, sigint_held
from .reports import (
    DestinationLost,
    Done,
    GuestHotadd,
    GuestStarted,
    Handover,
    Report,
    RoundEnd,
    RoundStart,
    Switchover,
    WorkerFailed,
)

JOIN_TIMEOUT = 10.0
POLL = 0.2

OnEvent = Callable[[Report], None]


@dataclass(frozen=True)
class KvmRunConfig:
    guest: g.GuestConfig = field(default_factory=g.GuestConfig)
    why: str = ""                          # why the KVM guest (--guest auto)
    to: tuple[str, int] | None = None      # a receiver elsewhere; None: one on loopback
    bandwidth: float = 0.0                 # bytes/s in pre-copy, 0: no limit
    threshold: int = 512
    max_rounds: int = 30
    dataplane: bool = True
    dataplane_rate: float = 1000.0
    dataplane_forget: bool = False         # testing: a dataplane that forgets to mark
    drop_round: int = 0                    # testing: a migrator that loses a round
    kill_destination_at: int = 0           # testing: SIGKILL the receiver at this round
    name: str | None = None
    block_pages: int = 1 << 15
    timeout: float = 600.0


class KvmRun:
    def __init__(self, cfg: KvmRunConfig, on_event: OnEvent, signals: Signals) -> None:
        self.cfg, self.on_event, self.signals = cfg, on_event, signals
        self.ctx = mp.get_context("spawn")
        self.map_name = cfg.name or segment.new_map_name()
        self.dst_name = f"{self.map_name}_dst"
        self.procs: dict[str, Any] = {}
        self.conns: dict[str, Connection] = {}
        self.got: dict[str, Any] = {}          # the last report of each kind
        self.hotadds: list[GuestHotadd] = []
        self.rounds: list[RoundEnd] = []
        self.removed = 0
        self.deadline = time.monotonic() + cfg.timeout

    # -- processes -----------------------------------------------------------------
    def _start(self, role: str, target: Any, *args: Any) -> None:
        mine, theirs = self.ctx.Pipe()
        p = self.ctx.Process(target=target, args=(*args, theirs), name=role, daemon=True)
        with sigint_held():
            p.start()
        theirs.close()
        self.procs[role], self.conns[role] = p, mine

    def _wait(self, cond: Callable[[], bool], what: str) -> None:
        while not cond():
            self.signals.check()
            if time.monotonic() > self.deadline:
                raise TimedOut(f"gave up waiting for {what}: the run took longer than "
                             f"--timeout {self.cfg.timeout:g} s")
            self._serve(POLL)
            for role in ("owner", "migrator", "dataplane"):
                p = self.procs.get(role)
                if p is not None and p.exitcode not in (None, 0) and role not in self.conns:
                    raise Failed(f"the {role} process (pid {p.pid}) exited with code "
                                 f"{p.exitcode}")

    def _serve(self, timeout: float) -> None:
        live = {c: r for r, c in self.conns.items()}
        for ready in wait(list(live), timeout=timeout):
            c = cast(Connection, ready)
            role = live[c]
            try:
                msg: Any = c.recv()
            except (EOFError, OSError):
                self.conns.pop(role)
                continue
            if isinstance(msg, tuple):      # the VM owner and the dataplane: (kind, data)
                self._on_owner(role, *msg)
            else:
                self._on_report(msg)

    def _on_owner(self, role: str, kind: str, data: dict[str, Any]) -> None:
        self.got[f"{role}.{kind}"] = data
        if kind == "error":
            raise Failed(f"the {data.get('role', role)} process failed:\n{data['traceback']}")
        if kind == "hotadd":
            h = GuestHotadd(data["offset"], data["size"], data["t"], tuple(data["progress"]))
            self.hotadds.append(h)
            self.on_event(h)

    def _on_report(self, report: Report) -> None:
        self.got[type(report).__name__] = report
        if isinstance(report, WorkerFailed):
            raise Failed(f"the {report.role} process failed:\n{report.traceback}")
        if isinstance(report, RoundEnd):
            self.rounds.append(report)
        elif isinstance(report, RoundStart) and report.round == self.cfg.kill_destination_at:
            p = self.procs.get("receiver")
            if p is not None and p.pid:
                os.kill(p.pid, signal.SIGKILL)   # testing: the destination dies now
        self.on_event(report)

    # -- the run -------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.monotonic()
        # Two at a time: a spawned process takes a while to import its modules.
        if cfg.to is None:
            self._start("receiver", receiver.main, "127.0.0.1", 0, self.dst_name)
        owner_mig, mig_owner = self.ctx.Pipe()
        owner_dp, dp_owner = self.ctx.Pipe() if cfg.dataplane else (None, None)
        self._start("owner", vm_owner.main,
                    vm_owner.OwnerConfig(cfg.guest, self.map_name, cfg.block_pages),
                    owner_mig, owner_dp)
        if cfg.to is None:
            self._wait(lambda: "Listening" in self.got, "the receiver to listen")
            host, port = "127.0.0.1", self.got["Listening"].port
        else:
            host, port = cfg.to
        self._wait(lambda: "owner.ready" in self.got, "the VM owner")
        if cfg.dataplane:
            first, pages = cfg.guest.dataplane_region()
            self._start("dataplane", dataplane.main,
                        dataplane.DataplaneConfig(self.map_name, first, pages,
                                                  cfg.dataplane_rate, cfg.dataplane_forget),
                        dp_owner)
        scfg = sender.SenderConfig(host, port, cfg.guest.to_json(), cfg.bandwidth,
                                   cfg.threshold, cfg.max_rounds, local=cfg.to is None,
                                   drop_round=cfg.drop_round)
        self._start("migrator", sender.main, scfg, self.map_name, mig_owner)
        for c in (owner_mig, owner_dp, mig_owner, dp_owner):
            if c is not None:
                c.close()
        self._wait(lambda: "Ready" in self.got and (not cfg.dataplane
                                                    or "dataplane.ready" in self.got),
                   "the migrator and the dataplane")
        self.conns["owner"].send("go")
        self.conns["migrator"].send("go")
        gc = cfg.guest
        self.on_event(GuestStarted(self.map_name, gc.ram, gc.vcpus, gc.pattern, gc.total_steps,
                                   cfg.why, f"{host}:{port}" + (" (loopback receiver)"
                                                                if cfg.to is None else "")))
        self._wait(lambda: not self.conns or ("Handover" in self.got
                                              and "owner" not in self.conns),
                   "the migration to finish")
        if "DestinationLost" in self.got:
            self._wait(lambda: "owner" not in self.conns, "the source guest to finish")
        self._wait(lambda: not self.conns, "every process to exit")
        return self._verdict(t0, host, port)

    def _verdict(self, t0: float, host: str, port: int) -> dict[str, Any]:
        t_model = time.monotonic()
        want = expected(self.cfg.guest)
        out: dict[str, Any] = {
            "guest": "kvm", "guest_why": self.cfg.why, "identical": False, "resumed_ok": False,
            "map": self.map_name, "config": _config(self.cfg),
            "destination": {"address": f"{host}:{port}", "local": self.cfg.to is None},
            "expected": want, "model_seconds": time.monotonic() - t_model,
            "hotplug": [], "round_log": [dict(asdict(r), t_start=0.0) for r in self.rounds],
            "rounds": len(self.rounds), "pages_sent": 0, "bytes_sent": 0,
            "throughput_mib_s": None, "downtime_ms": None}
        done: Done | None = self.got.get("Done")
        if done is not None:
            t_go = done.t_go
            out["round_log"] = [dict(asdict(r), t_start=r.t_start - t_go) for r in done.rounds]
            out.update(
                end_of_precopy=done.reason, downtime=asdict(done.downtime),
                downtime_ms=done.downtime.seconds * 1e3, precopy_seconds=done.t_stop - t_go,
                last_check=None if done.last_check is None else
                dict(asdict(done.last_check), t_start=done.last_check.t_start - t_go),
                hotplug=[dict(asdict(h), t_done=h.t - t_go, round=_round_at(done, h.t),
                              during=_phase(done, h.t)) for h in self.hotadds])
        lost: DestinationLost | None = self.got.get("DestinationLost")
        sw: Switchover | None = self.got.get("Switchover")
        ho: Handover | None = self.got.get("Handover")
        if ho is not None:
            out.update(pages_sent=ho.pages_sent, bytes_sent=ho.bytes_sent,
                       throughput_mib_s=ho.bytes_sent / ho.send_seconds / (1 << 20)
                       if ho.send_seconds else None, vcpu_states=list(ho.vcpu_states))
            if done is not None:
                out["migration_seconds"] = done.t_end - done.t_go
        if sw is not None:
            out["identical"] = sw.identical
            out["result"] = {"identical": sw.identical, "method": sw.method,
                             "compared": sw.compared, "pages_differ": sw.n_differ,
                             "first_differ": list(sw.differ), "detail": sw.detail,
                             "switchover_check_seconds": sw.seconds}
        dest = (ho.result if ho is not None and ho.result else None) or \
            (self.got["Received"].result if "Received" in self.got else None)
        got = (dest or {}).get("vcpus") or []
        out["destination_end"] = got
        out["destination_blocks"] = (dest or {}).get("blocks")
        out["destination_hotadds"] = (dest or {}).get("hotadds", [])
        out["resumed_ok"] = bool(got) and _matches(got, want)
        src = (self.got.get("owner.guest_done") or {}).get("vcpus") or []
        if src:
            out["source_end"] = src
            out["source_ok"] = _matches(src, want)
        out["checksums"] = {"expected": [w["checksum"] for w in want],
                            "destination": [v.get("checksum") for v in got],
                            "source": [v.get("checksum") for v in src]}
        out["total_s"] = out["wall_seconds"] = time.monotonic() - t0
        if lost is not None:
            out["failure"] = lost.message
            e = DestinationGone(f"the destination was lost: {lost.message}", out)
            raise e
        if sw is None or ho is None:
            raise Failed("the migrator ended without a switchover")
        return out

    def teardown(self) -> None:
        """Stop every process that is still running (asked, then killed),
        then remove every segment of both maps."""
        for role in ("migrator", "owner", "receiver"):
            c = self.conns.get(role)
            if c is not None:
                try:
                    c.send("abort")
                except OSError:
                    pass
        end = time.monotonic() + JOIN_TIMEOUT
        for p in self.procs.values():
            p.join(max(0.0, end - time.monotonic()))
        for p in self.procs.values():
            if p.exitcode is None:
                p.kill()
                p.join(2.0)
        for c in self.conns.values():
            c.close()
        self.conns.clear()
        for name in (self.map_name, self.dst_name):
            for seg in segment.list_segments(name):
                if segment.unlink(seg):
                    self.removed += 1


def _config(cfg: KvmRunConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["guest"] = asdict(cfg.guest)
    d["guest"].pop("extra", None)
    d["ram"] = cfg.guest.ram
    d["threshold"] = cfg.threshold
    return d


def _round_at(done: Done, t: float) -> int:
    """The pre-copy round during which ``t`` fell (0: before the first sync,
    len(rounds) + 1: stop-and-copy)."""
    if t >= done.t_stop:
        return len(done.rounds) + 1
    return sum(1 for r in done.rounds if r.t_start <= t)


def _phase(done: Done, t: float) -> str:
    n = _round_at(done, t)
    return "downtime" if t >= done.t_stop else f"pre-copy round {n}" if n else "pre-copy"


def _matches(got: list[dict[str, Any]], want: list[dict[str, int]]) -> bool:
    return len(got) == len(want) and all(
        all(g_.get(k) == v for k, v in w.items()) for g_, w in zip(got, want, strict=True))


def run(cfg: KvmRunConfig, on_event: OnEvent) -> dict[str, Any]:
    """One KVM migration (module doc): the result, or a ``RunError``."""
    with Signals() as signals:
        r = KvmRun(cfg, on_event, signals)
        try:
            try:
                return r.execute()
            finally:
                r.teardown()
        except RunError as e:
            e.map_name, e.removed = r.map_name, r.removed
            raise

