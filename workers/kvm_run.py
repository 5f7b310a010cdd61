"""One live migration of a KVM guest, from start to verdict.

Processes (all spawned, each with a pipe of its own to this one):

- receiver (unless the destination is elsewhere: ``to``): listens on
  loopback, builds its own VM from the stream, resumes the guest;
- VM owner: the map's coordinator, /dev/kvm, the VM and its vCPU threads;
- dataplane: writes guest RAM on its own and marks it dirty;
- migrator: ``sync_dirty_bitmap`` and the TCP stream.

The verdict: the switchover comparison (source RAM against destination
RAM, byte for byte or by digests) and the resumed guest's end state
against the model (``workers.guest_model``).  If the destination is lost
before the handover, the source guest runs to its end and its end state
is checked against the model instead.  Nothing of the run (this side's map
and a loopback receiver's) is left in /dev/shm.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from shmdirty import segment

from . import dataplane, receiver, sender, vm_owner
from . import guest_kvm as g
from .guest_model import expected

EXIT_OK, EXIT_DIFFERENT, EXIT_WORKER_FAILED, EXIT_DESTINATION_LOST = 0, 1, 3, 4
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
JOIN_TIMEOUT = 10.0

Event = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class KvmRunConfig:
    guest: g.GuestConfig = field(default_factory=g.GuestConfig)
    to: tuple[str, int] | None = None      # a receiver elsewhere; None: one on loopback
    bandwidth: float = 0.0                 # bytes/s in pre-copy, 0: no limit
    threshold: int = 1024
    max_rounds: int = 30
    dataplane: bool = True
    dataplane_rate: float = 2000.0
    dataplane_forget: bool = False         # testing: a dataplane that forgets to mark
    drop_round: int = 0                    # testing: a migrator that loses a round
    kill_destination_at: int = 0           # testing: SIGKILL the receiver at this round
    name: str | None = None
    block_pages: int = 1 << 15
    timeout: float = 600.0


class RunFailed(Exception):
    pass


class KvmRun:
    def __init__(self, cfg: KvmRunConfig, on_event: Event) -> None:
        self.cfg, self.on_event = cfg, on_event
        self.ctx = mp.get_context("spawn")
        self.name = cfg.name or segment.new_map_name()
        self.dst_name = f"{self.name}_dst"
        self.procs: dict[str, Any] = {}
        self.conns: dict[str, Connection] = {}
        self.reports: dict[str, dict[str, Any]] = {}
        self.hotadds: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.signal: int | None = None

    # -- processes -----------------------------------------------------------------
    def _start(self, role: str, target: Any, *args: Any) -> None:
        mine, theirs = self.ctx.Pipe()
        p = self.ctx.Process(target=target, args=(*args, theirs), name=f"shmdirty-{role}",
                             daemon=True)
        p.start()
        theirs.close()
        self.procs[role], self.conns[role] = p, mine

    def _await(self, role: str, kind: str) -> dict[str, Any]:
        """Serve reports until ``role`` says ``kind``."""
        deadline = time.monotonic() + self.cfg.timeout
        while kind not in self.reports.get(role, {}):
            if not self.conns.get(role):
                raise RunFailed(f"the {role} process ended before it was {kind}")
            if time.monotonic() > deadline:
                raise RunFailed(f"the {role} process was not {kind} within {self.cfg.timeout} s")
            self._serve(0.5)
        return self.reports[role][kind]  # type: ignore[no-any-return]

    def _serve(self, timeout: float) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        live = {c: r for r, c in self.conns.items() if c is not None}
        for c in wait(list(live), timeout=timeout):
            role = live[c]  # type: ignore[index]
            try:
                kind, data = c.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):
                self.conns.pop(role)
                continue
            self._on_report(role, kind, data)

    def _on_report(self, role: str, kind: str, data: dict[str, Any]) -> None:
        self.reports.setdefault(role, {})[kind] = data
        if kind == "error":
            self.errors.append(f"{data.get('role', role)} failed:\n{data.get('traceback', '')}")
        elif kind == "hotadd":
            data = dict(data, round=len(self.rounds) + 1)
            self.hotadds.append(data)
        elif kind == "round_end":
            self.rounds.append(data)
        elif kind == "round" and role == "migrator":
            if self.cfg.kill_destination_at and data["round"] == self.cfg.kill_destination_at:
                p = self.procs.get("receiver")
                if p is not None and p.pid:
                    os.kill(p.pid, signal.SIGKILL)
                    self.on_event("killed_destination", {"round": data["round"]})
        self.on_event(f"{role}.{kind}", data)

    # -- the run -------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.monotonic()
        # Two at a time: a spawned process takes a while to import its modules.
        if cfg.to is None:
            self._start("receiver", receiver.main, "127.0.0.1", 0, self.dst_name)
        owner_mig, mig_owner = self.ctx.Pipe()
        owner_dp, dp_owner = self.ctx.Pipe() if cfg.dataplane else (None, None)
        self._start("owner", vm_owner.main,
                    vm_owner.OwnerConfig(cfg.guest, self.name, cfg.block_pages),
                    owner_mig, owner_dp)
        if cfg.to is None:
            host, port = "127.0.0.1", int(self._await("receiver", "listening")["port"])
        else:
            host, port = cfg.to
        ready = self._await("owner", "ready")
        if cfg.dataplane:
            first, pages = cfg.guest.dataplane_region()
            self._start("dataplane", dataplane.main,
                        dataplane.DataplaneConfig(ready["map"], first, pages, cfg.dataplane_rate,
                                                  cfg.dataplane_forget), dp_owner)
        scfg = sender.SenderConfig(host, port, ready["map"], cfg.guest.to_json(),
                                   cfg.bandwidth, cfg.threshold, cfg.max_rounds,
                                   local=cfg.to is None, drop_round=cfg.drop_round)
        self._start("migrator", sender.main, scfg, mig_owner)
        for c in (owner_mig, owner_dp, mig_owner, dp_owner):
            if c is not None:
                c.close()
        if cfg.dataplane:
            self._await("dataplane", "ready")
        self._await("migrator", "ready")
        t_go = time.monotonic()
        self.conns["owner"].send("go")
        self.conns["migrator"].send("go")
        deadline = time.monotonic() + cfg.timeout
        while self.conns:
            if time.monotonic() > deadline:
                raise RunFailed(f"the run did not end within {cfg.timeout} s")
            self._serve(0.5)
        return self._verdict(t0, t_go)

    def _verdict(self, t0: float, t_go: float) -> dict[str, Any]:
        mig = self.reports.get("migrator", {})
        owner = self.reports.get("owner", {})
        rec = self.reports.get("receiver", {})
        done, failed = mig.get("done"), mig.get("failed")
        t_exp = time.monotonic()
        want = expected(self.cfg.guest)
        model_s = time.monotonic() - t_exp
        out: dict[str, Any] = {"guest": "kvm", "identical": False, "resumed_ok": False,
                               "expected": want, "model_seconds": model_s,
                               "hotadds": self.hotadds, "rounds_detail": self.rounds,
                               "total_s": time.monotonic() - t0, "wall_s": time.monotonic() - t0,
                               "run_s": time.monotonic() - t_go, "errors": self.errors}
        if rec.get("refused"):
            out["destination_error"] = rec["refused"]["message"]
        if done is not None:
            result = done["result"] or rec.get("finished") or {}
            got = result.get("vcpus") or []
            out.update(self._numbers(done), identical=bool(done["check"]["identical"]),
                       check=done["check"], destination=got,
                       resumed_ok=bool(got) and _matches(got, want))
            out["exit"] = (EXIT_WORKER_FAILED if self.errors else
                           EXIT_OK if out["identical"] and out["resumed_ok"] else EXIT_DIFFERENT)
        else:
            src = (owner.get("guest_done") or {}).get("vcpus") or []
            out.update(source=src, source_ok=bool(src) and _matches(src, want),
                       pages_sent=0, rounds=len(self.rounds), downtime_ms=None,
                       throughput_mib_s=None)
            if failed is not None:
                out.update(failure=failed["message"], exit=EXIT_DESTINATION_LOST)
            else:
                out["exit"] = EXIT_WORKER_FAILED
        return out

    def _numbers(self, done: dict[str, Any]) -> dict[str, Any]:
        page_bytes = done["bytes_sent"]
        return dict(rounds=len(done["rounds"]), reason=done["reason"],
                    pages_sent=done["pages_sent"], bytes_sent=page_bytes,
                    throughput_mib_s=page_bytes / done["send_seconds"] / (1 << 20)
                    if done["send_seconds"] else None,
                    downtime_ms=done["downtime"]["seconds"] * 1000,
                    downtime=done["downtime"], migration_s=done["t_end"] - done["t_go"],
                    precopy_s=done["t_stop"] - done["t_go"], final_state=done["states"])

    def close(self) -> None:
        """Stop every process that is still running, then remove every
        segment of both maps."""
        for role in ("migrator", "owner", "receiver"):
            c = self.conns.get(role)
            if c is not None:
                try:
                    c.send("abort")
                except OSError:
                    pass
        for role, p in self.procs.items():
            p.join(JOIN_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns.values():
            c.close()
        self.conns.clear()
        for name in (self.name, self.dst_name):
            for seg in segment.list_segments(name):
                segment.unlink(seg)


def _matches(got: list[dict[str, Any]], want: list[dict[str, int]]) -> bool:
    return len(got) == len(want) and all(
        all(g_.get(k) == v for k, v in w.items()) for g_, w in zip(got, want, strict=True))


def run(cfg: KvmRunConfig, on_event: Event = lambda kind, data: None) -> dict[str, Any]:
    """Run one migration; SIGINT / SIGTERM stop it cleanly (``exit`` 130 / 143)."""
    r = KvmRun(cfg, on_event)
    old = {s_: signal.getsignal(s_) for s_ in EXIT_SIGNAL}

    def on_signal(signum: int, _frame: Any) -> None:
        r.signal = signum

    for s_ in EXIT_SIGNAL:
        signal.signal(s_, on_signal)
    try:
        return r.run()
    except KeyboardInterrupt:
        return {"guest": "kvm", "exit": EXIT_SIGNAL.get(r.signal or signal.SIGINT, 130),
                "interrupted": True}
    except RunFailed as e:
        return {"guest": "kvm", "exit": EXIT_WORKER_FAILED, "errors": [str(e), *r.errors]}
    finally:
        r.close()
        for s_, h in old.items():
            signal.signal(s_, h)
