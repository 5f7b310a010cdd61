"""One live migration of a KVM guest, from start to verdict (``--guest kvm``):
what its run does beyond ``workers.migration``.

Processes (all spawned, each with a pipe of its own to this one):

- receiver (unless the destination is elsewhere: ``to``): listens on
  loopback, builds its own VM from the stream, resumes the guest;
- VM owner: the map's coordinator, /dev/kvm, the VM and its vCPU threads;
- dataplane: writes guest RAM on its own and marks it dirty;
- migrator: ``sync_dirty_bitmap`` and the TCP stream (``workers.sender``).

Every process's typed reports (``workers.reports``) go to ``on_event`` as
they arrive; the VM owner's ``GuestHotadd`` and the migrator's rounds are
also kept for the result.  The verdict: the switchover comparison (source
RAM against destination RAM, byte for byte or by digests) and the resumed
guest's end state against the model (``workers.guest_model``).  If the destination is
lost before the handover, the source guest runs to its end, its end state
is checked against the model, and ``DestinationGone`` carries that.
Nothing of the run (this side's map and a loopback receiver's) is left in
/dev/shm, whatever happens.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from shmdirty import segment

from . import dataplane, migration, sender, vm_owner
from . import guest_kvm as g
from .guest_model import expected
from .lifecycle import DestinationGone, Failed, after_resume
from .messages import Go
from .migration import Migration, OnEvent
from .reports import (
    DestinationLost,
    Done,
    GuestDone,
    GuestHotadd,
    GuestStarted,
    Handover,
    HotplugRefused,
    Received,
    Report,
    RoundEnd,
    RoundStart,
    Switchover,
)

JOIN_TIMEOUT = 10.0       # seconds the processes get to exit after Abort before signals
POLL = 0.2                # seconds one step of the run's wait loop waits for a report


@dataclass(frozen=True)
class KvmRunConfig:
    guest: g.GuestConfig = field(default_factory=g.GuestConfig)
    why: str = ""                          # why the KVM guest (--guest auto)
    to: tuple[str, int] | None = None      # a receiver elsewhere; None: one on loopback
    tls_creds: str | None = None           # TLS with both ends verified (workers.transport)
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
    peer_timeout: float = sender.DEFAULT_PEER_TIMEOUT


class KvmGuest:
    """The KVM guest's side of a run (``workers.migration.GuestKind``)."""

    name = "kvm"
    poll = POLL
    join_timeout = JOIN_TIMEOUT
    # The receiver may die on purpose (``kill_destination_at``): the run
    # then ends in DestinationGone, not in a failed worker.
    watched: frozenset[str] | None = frozenset({"owner", "migrator", "dataplane"})

    def __init__(self, cfg: KvmRunConfig) -> None:
        self.cfg = cfg
        self.timeout, self.to, self.peer_timeout = cfg.timeout, cfg.to, cfg.peer_timeout
        self.hotadds: list[GuestHotadd] = []
        self.refused: list[HotplugRefused] = []   # hot-adds that failed alone
        self.rounds: list[RoundEnd] = []
        self._pipes: list[Connection] = []
        self._mig_owner: Connection | None = None   # the migrator's end of its pipe to the owner
        self._dp_owner: Connection | None = None    # the dataplane's end of its pipe to the owner

    def prepare(self, run: Migration) -> str:
        return self.cfg.name or segment.new_map_name()   # the VM owner creates it

    def start(self, run: Migration) -> None:
        """The VM owner, beside the receiver (a spawned process takes a
        while to import its modules: two at a time)."""
        cfg = self.cfg
        owner_mig, self._mig_owner = run.ctx.Pipe()
        owner_dp, self._dp_owner = run.ctx.Pipe() if cfg.dataplane else (None, None)
        run.start("owner", vm_owner.main,
                  vm_owner.OwnerConfig(cfg.guest, run.map_name, cfg.block_pages),
                  owner_mig, owner_dp)
        self._pipes = [c for c in (owner_mig, owner_dp, self._mig_owner, self._dp_owner)
                       if c is not None]

    def spawn(self, run: Migration, host: str, port: int) -> None:
        cfg = self.cfg
        run.wait(lambda: "owner" in run.ready, "the VM owner")
        if cfg.dataplane:
            first, pages = cfg.guest.dataplane_region()
            run.start("dataplane", dataplane.main,
                      dataplane.DataplaneConfig(run.map_name, first, pages,
                                                cfg.dataplane_rate, cfg.dataplane_forget),
                      self._dp_owner)
        scfg = sender.SenderConfig(host, port, cfg.guest.to_json(), cfg.bandwidth,
                                   cfg.threshold, cfg.max_rounds, local=cfg.to is None,
                                   drop_round=cfg.drop_round, peer_timeout=cfg.peer_timeout,
                                   tls_creds=cfg.tls_creds)
        run.start("migrator", sender.main, scfg, run.map_name, self._mig_owner)
        for c in self._pipes:     # the VM owner, the migrator and the dataplane hold them
            c.close()

    def go(self, run: Migration) -> None:
        run.tell("owner", Go())
        run.tell("migrator", Go())
        gc, (host, port) = self.cfg.guest, run.destination
        run.on_event(GuestStarted(run.map_name, gc.ram, gc.vcpus, gc.pattern, gc.total_steps,
                                  self.cfg.why, f"{host}:{port}" + (" (loopback receiver)"
                                                                    if self.cfg.to is None
                                                                    else "")))

    def serve(self) -> None:
        pass    # the VM owner is the coordinator

    def on_report(self, run: Migration, role: str, report: Report) -> None:
        if isinstance(report, GuestHotadd):
            self.hotadds.append(report)
        elif isinstance(report, HotplugRefused):
            self.refused.append(report)
        elif isinstance(report, RoundEnd):
            self.rounds.append(report)
        elif isinstance(report, RoundStart) and report.round == self.cfg.kill_destination_at:
            p = run.procs.get("receiver")
            if p is not None and p.pid:
                os.kill(p.pid, signal.SIGKILL)   # testing: the destination dies now

    def finished(self, run: Migration) -> bool:
        """The handover is done and the source guest discarded; or every
        process left (the destination lost: the source guest ran to its end)."""
        return not run.conns or (Handover in run.got and "owner" not in run.conns)

    def abort(self) -> None:
        pass    # every process was told Abort

    def destroy(self) -> None:
        pass    # the VM owner destroys its map; the run unlinks what is left

    def result(self, run: Migration, t0: float) -> dict[str, Any]:
        return _verdict(self, run, t0)


def _verdict(kind: KvmGuest, run: Migration, t0: float) -> dict[str, Any]:
    """The switchover comparison and the resumed guest against the model."""
    cfg, got = kind.cfg, run.got
    host, port = run.destination
    t_model = time.monotonic()
    # The model with the hot-adds really made (a refused one fails alone);
    # the destination's own are counted once its result is in, below.
    want = expected(cfg.guest, None if not kind.refused else len(kind.hotadds))
    out: dict[str, Any] = {
        "guest": "kvm", "guest_why": cfg.why, "identical": False, "resumed_ok": False,
        "map": run.map_name, "config": _config(cfg),
        "destination": {"address": f"{host}:{port}", "local": cfg.to is None},
        "expected": want, "model_seconds": time.monotonic() - t_model,
        "hotplug": [], "hotplug_refused": [asdict(r) for r in kind.refused],
        "round_log": [dict(asdict(r), t_start=0.0) for r in kind.rounds],
        "rounds": len(kind.rounds), "pages_sent": 0, "bytes_sent": 0,
        "throughput_mib_s": None, "downtime_ms": None}
    done: Done | None = got.get(Done)
    if done is not None:
        t_go = done.t_go
        out["round_log"] = [dict(asdict(r), t_start=r.t_start - t_go) for r in done.rounds]
        out.update(
            end_of_precopy=done.reason, downtime=asdict(done.downtime),
            downtime_ms=done.downtime.seconds * 1e3, precopy_seconds=done.t_stop - t_go,
            last_check=None if done.last_check is None else
            dict(asdict(done.last_check), t_start=done.last_check.t_start - t_go),
            hotplug=[dict(asdict(h), t_done=h.t - t_go, round=_round_at(done, h.t),
                          during=_phase(done, h.t)) for h in kind.hotadds])
    lost: DestinationLost | None = got.get(DestinationLost)
    sw: Switchover | None = got.get(Switchover)
    ho: Handover | None = got.get(Handover)
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
    received: Received | None = got.get(Received)
    dest = (ho.result if ho is not None and ho.result else None) or \
        (received.result if received is not None else None)
    dst_end = (dest or {}).get("vcpus") or []
    out["destination_end"] = dst_end
    out["destination_blocks"] = (dest or {}).get("blocks")
    out["destination_hotadds"] = (dest or {}).get("hotadds", [])
    # Hot-adds that failed alone (at the source: nothing later is made on
    # either side; at the destination: fewer made there than asked for).
    asked = sum(1 for step, _ in cfg.guest.hotplug if step < cfg.guest.total_steps)
    made = len(kind.hotadds) + (0 if kind.refused else len(out["destination_hotadds"]))
    if kind.refused or (dest is not None and made < asked):
        out["expected"] = want = expected(cfg.guest, made)
    out["resumed_ok"] = bool(dst_end) and _matches(dst_end, want)
    guest_done: GuestDone | None = got.get(GuestDone)
    src = list(guest_done.vcpus) if guest_done is not None else []
    if src:
        out["source_end"] = src
        out["source_ok"] = _matches(src, want)
    out["checksums"] = {"expected": [w["checksum"] for w in want],
                        "destination": [v.get("checksum") for v in dst_end],
                        "source": [v.get("checksum") for v in src]}
    out["total_s"] = out["wall_seconds"] = time.monotonic() - t0
    if lost is not None:
        raise DestinationGone(f"the destination was lost before the commit: {lost.message}",
                              out)
    if sw is None or ho is None:
        raise Failed("the migrator ended without a switchover")
    out["outcome"] = ho.outcome
    after_resume(ho.outcome, ho.error, out)
    out["guest_on"] = "destination"
    return out


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
    return migration.run(KvmGuest(cfg), on_event)
