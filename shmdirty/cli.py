"""The command line: ``shmdirty migrate | inspect NAME | ls | gc``.

``migrate`` is a live migration: this process creates the map and the
guest RAM, becomes the coordinator (it grants hot-plug requests with
``serve_once()`` in its loop), and runs the workers of ``workers/`` in
spawned processes.  It ends by comparing source and destination byte for
byte.  Exit codes: 0 identical, 1 different, 2 bad usage or not a map,
3 a worker failed, 128 + signal number when interrupted (130 Ctrl-C,
143 SIGTERM), after stopping the workers and removing every segment.

The worker processes live in the top-level ``workers`` package; only the
migrate path imports it (lazily), so ``inspect`` / ``ls`` / ``gc`` load
nothing but the library.

``inspect``, ``ls`` and ``gc`` only look, except ``gc --yes``.  ``ls`` and
``gc`` never attach a map: they read the header's owner words directly, so
they claim no reader slot and block nobody.  ``inspect`` attaches (a reader
slot) only for as long as it takes to count dirty pages.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_reports
from multiprocessing.context import SpawnProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from . import atomic, layout, segment
from .dirty import (
    DIRTY_MEMORY_CODE,
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_NUM,
    DIRTY_MEMORY_VGA,
    DirtyMemory,
)
from .errors import CorruptSegment, NoReaderSlot, ShmDirtyError
from .rcu import GracePeriods, ReaderInfo, owner_alive
from .segment import Segment

if TYPE_CHECKING:
    from workers.guest import GuestRam

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_FAILED = 3

CLIENT_NAMES = {DIRTY_MEMORY_VGA: "VGA", DIRTY_MEMORY_CODE: "CODE",
                DIRTY_MEMORY_MIGRATION: "MIGRATION"}
PAGE_BITS = 12
FIRST_DIFFS = 10          # how many differing pages a mismatch names
JOIN_TIMEOUT = 5.0        # seconds workers get to exit after an abort before SIGTERM
POLL = 0.01               # seconds the coordinator loop waits for a report


# --- sizes ------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    """``4096``, ``512K``, ``64M``, ``1G`` (binary units) -> bytes."""
    t = text.strip().upper()
    num = t.rstrip("BKMGI")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 512K, 64M, 1G") \
            from None
    if unit not in _UNITS or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 512K, 64M, 1G")
    return int(value * _UNITS[unit])


def page_size_arg(text: str) -> int:
    size = parse_size(text)
    if size <= 0 or size % (1 << PAGE_BITS):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive multiple of the "
                                         f"{1 << PAGE_BITS}-byte page")
    return size


def parse_schedule(text: str) -> tuple[tuple[float, int], ...]:
    """``1:32M,2.5:16M`` -> ((1.0, 32 MiB), (2.5, 16 MiB)); ``none`` -> ()."""
    if text.strip().lower() in ("", "none", "off"):
        return ()
    out = []
    for item in text.split(","):
        at, sep, size = item.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1.0
        if not sep or seconds < 0:
            raise argparse.ArgumentTypeError(
                f"hot-plug item {item!r} is not SECONDS:SIZE (e.g. 1.5:32M)")
        out.append((seconds, page_size_arg(size)))
    return tuple(sorted(out))


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return v


def _count(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def _non_negative(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def map_arg(text: str) -> str:
    """A map name: ``abc``, ``shmdirty-abc`` or one of its segment names."""
    try:
        return segment.check_map_name(text)
    except ValueError as e:
        m = segment.map_of(text)
        if m is not None:
            try:
                return segment.check_map_name(m)
            except ValueError:
                pass
        raise argparse.ArgumentTypeError(str(e)) from None


def _render_inspect(info: dict[str, Any], out: Console) -> None:
    name = info["map"]
    out.print(f"[bold]map {name}[/bold] — {info['state']}", highlight=False)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column()
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(info["segment_kinds"].items()))
    if "page_bits" not in info:
        grid.add_row("status", info.get("why", ""))
        grid.add_row("segments", f"{len(info['segments'])} in {segment.SHM_DIR} ({kinds})")
        out.print(grid)
        return
    coord = info["coordinator"]
    ps = info["page_size"]
    grid.add_row("header", f"{layout.header_name(name)}, layout version "
                           f"{info['layout_version']}, {info['max_readers']} reader slots")
    grid.add_row("coordinator", f"pid {coord['pid']}, {'alive' if coord['alive'] else 'DEAD'}"
                 if coord["pid"] else "none (it left; DirtyMemory.adopt() can take over)")
    grid.add_row("pages", f"{fmt_bytes(ps)} (page_bits {info['page_bits']}); bitmap blocks of "
                          f"{info['block_pages']} pages ({fmt_bytes(info['block_pages'] * ps)} "
                          f"of RAM each); tcg {'yes' if info['tcg'] else 'no'}")
    grid.add_row("generation", f"{info['generation']} (grace-period counter "
                               f"{info['grace_period_counter']})")
    ram = info["ram_size"]
    blocks = info.get("ram_blocks")
    where = (" in " + str(len(blocks)) + " block(s): " + " ".join(
        f"[{o:#x}, +{fmt_bytes(s)})" for o, s in blocks)) if blocks is not None else ""
    grid.add_row("RAM", f"{fmt_bytes(ram)} ({ram // ps} pages){where}")
    if "bitmap_blocks" in info:
        grid.add_row("bitmap", f"{info['bitmap_blocks']} block(s) per client")
        grid.add_row("dirty pages", ", ".join(f"{k} {v}" for k, v in info["dirty_pages"].items()))
    else:
        grid.add_row("dirty pages", f"unavailable: {info.get('table_error', '')}")
    req = info["request"]
    grid.add_row("requests", "none pending" if req <= ram else f"RAM size {fmt_bytes(req)} "
                 "requested, not granted yet")
    grid.add_row("segments", f"{len(info['segments'])} in {segment.SHM_DIR} ({kinds})")
    out.print(grid)
    readers = info["readers"]
    table = Table(title=f"reader slots: {len(readers)} claimed of {info['max_readers']}",
                  title_justify="left")
    for col in ("slot", "pid", "alive", "epoch / counter"):
        table.add_column(col, no_wrap=True)
    for r in readers:
        epoch = "0 (outside a section)" if not r["epoch"] else f"{r['epoch']} (in a section)"
        table.add_row(str(r["slot"]), str(r["pid"]), "yes" if r["alive"] else "DEAD", epoch)
    out.print(table)


def cmd_inspect(args: argparse.Namespace, out: Console) -> int:
    try:
        info = inspect_map(args.name)
    except (LookupError, ShmDirtyError) as e:
        _error(out, str(e))
        return EXIT_USAGE
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _render_inspect(info, out)
    return EXIT_OK


# --- ls and gc ------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace, out: Console) -> int:
    statuses = [map_status(m) for m in segment.list_maps()]
    shown = [s for s in statuses if args.all or s.state == "live"]
    if not shown:
        _say(out, "no live shmdirty maps" if not args.all else "no shmdirty maps")
        return EXIT_OK
    table = Table(box=None, pad_edge=False)
    table.add_column("map", no_wrap=True, min_width=max(len(s.name) for s in shown))
    for col in ("state", "coordinator", "readers", "RAM", "generation", "segments"):
        table.add_column(col, no_wrap=True)
    table.add_column("why", overflow="fold")
    for s in shown:
        alive = sum(r.alive for r in s.readers)
        coord = (f"pid {s.coordinator_pid}" + ("" if s.coordinator_alive else " (dead)")
                 if s.coordinator_pid else "-")
        table.add_row(s.name, s.state, coord, f"{alive}/{len(s.readers)} alive",
                      fmt_bytes(s.ram_size) if s.max_readers else "-",
                      str(s.generation) if s.max_readers else "-", str(len(s.segments)),
                      "" if s.state == "live" else s.why)
    out.print(table)
    return EXIT_OK


def cmd_gc(args: argparse.Namespace, out: Console) -> int:
    names = args.names or segment.list_maps()
    code = EXIT_OK
    garbage: list[MapStatus] = []
    for name in names:
        st = map_status(name)
        if st.state == "absent":
            if args.names:  # (a map that vanished since list_maps() is no error)
                _error(out, f"{name!r} is not a map: no shmdirty-{name}-* segment in "
                            f"{segment.SHM_DIR}")
                code = EXIT_USAGE
        elif st.garbage:
            garbage.append(st)
        elif args.names or st.state != "live":
            _say(out, f"map {name}: {st.state}" + (f" ({st.why})" if st.why else "")
                 + "; left alone")
    if not garbage:
        _say(out, "nothing to collect")
        return code
    total = sum(len(s.segments) for s in garbage)
    _say(out, f"{len(garbage)} dead map(s), {total} segment(s):")
    for st in garbage:
        _say(out, f"  {st.name}: {st.why}")
        for n in st.segments:
            _say(out, f"    {n}")
    if not args.yes:
        _say(out, "run `shmdirty gc --yes` to remove them")
        return code
    removed = 0
    for st in garbage:
        again = map_status(st.name)  # a last look: did anyone adopt it meanwhile?
        if not again.garbage:
            _say(out, f"map {st.name} is {again.state} now; left alone")
            continue
        removed += sum(segment.unlink(n) for n in segment.list_segments(st.name))
    _say(out, f"removed {removed} segment(s)")
    return code


def _error(out: Console, msg: str) -> None:
    out.print(f"[bold red]error:[/bold red] {msg}", highlight=False, soft_wrap=True)


def _say(out: Console, msg: str) -> None:
    """One message line, never wrapped (names and pids stay greppable)."""
    out.print(msg, highlight=False, soft_wrap=True)


# --- migrate ------------------------------------------------------------------------------
class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Failed(Exception):
    """A worker failed, or the run could not go on."""


class _Usage(Exception):
    """The options asked for a map that cannot be made."""


class _Signals:
    """Ctrl-C and SIGTERM become a flag the migrate loop checks, so the
    interruption never lands half-way through a library call."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> _Signals:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def check(self) -> None:
        if self.signum:
            raise _Interrupted(self.signum)


@dataclass
class MigrateConfig:
    ram: int
    vcpus: int
    dirty_rate: float
    pattern: str
    hot_fraction: float
    dirty_mode: str
    hotplug: tuple[tuple[float, int], ...]
    block_pages: int
    bandwidth: float        # MiB/s, 0: unlimited
    threshold: int
    max_rounds: int
    seed: int
    timeout: float
    drop_round: int
    name: str | None


class _Migration:
    """One ``shmdirty migrate`` run; this process is the coordinator."""

    def __init__(self, cfg: MigrateConfig, out: Console, signals: _Signals) -> None:
        from workers import Flags

        self.cfg, self.out, self.signals = cfg, out, signals
        self.ctx = mp.get_context("spawn")
        self.flags = Flags(self.ctx, cfg.vcpus)
        self.procs: dict[str, SpawnProcess] = {}
        self.conns: dict[Connection, str] = {}   # each worker's report pipe -> its role
        self.dm: DirtyMemory | None = None
        self.map_name = ""
        self.removed = 0
        self.ready: set[str] = set()
        self.hotplugs: list[dict[str, Any]] = []
        self.vcpu_stats: list[dict[str, Any]] = []
        self.done: dict[str, Any] | None = None
        self.t_go = 0.0
        self._t_round = 0.0
        self.deadline = time.monotonic() + cfg.timeout
        self.progress: Progress | None = None
        self.tasks: dict[int, TaskID] = {}

    # -- the run ------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        from workers.guest import GuestRam

        cfg = self.cfg
        t_begin = time.monotonic()
        try:
            self.dm = DirtyMemory.create(cfg.ram, page_bits=PAGE_BITS,
                                         block_pages=cfg.block_pages, name=cfg.name)
        except (ShmDirtyError, ValueError, FileExistsError) as e:
            raise _Usage(f"cannot create the map: {e}") from None
        self.map_name = self.dm.name
        src = GuestRam(self.map_name, PAGE_BITS)
        dst = GuestRam(self.map_name, PAGE_BITS, "dst")
        try:
            src.update(self.dm.ram_blocks(), create=True, boot_fill=True)
            self._spawn()
            self._wait(lambda: len(self.ready) == len(self.procs), "workers to start")
            self.out.print(f"shmdirty migrate: map {self.map_name} started: "
                           f"{fmt_bytes(cfg.ram)} guest RAM, {cfg.vcpus} vCPU(s) "
                           f"({cfg.dirty_mode}, {cfg.pattern}, {cfg.dirty_rate:g} pages/s "
                           f"each), {len(self.procs)} workers", highlight=False, soft_wrap=True)
            self.flags.set(self.flags.GO)
            self.t_go = time.monotonic()
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("pages {task.fields[speed]}"), TimeElapsedColumn(),
                          console=self.out) as progress:
                self.progress = progress
                self._wait(lambda: self.done is not None, "the migration to finish")
            self.progress = None
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
        from workers.guest import compare

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
        else:
            compared, differ, written = compare(src, dst)
        d = self.done
        t0 = d["t_go"]
        for h in self.hotplugs:
            h["during"] = self._phase(h["t_done"])
            h["t_done"] -= t0
            h["t_ask"] -= t0
        for r in d["rounds"]:
            r["t_start"] -= t0
        if d["last_check"]:
            d["last_check"]["t_start"] -= t0
        return {
            "map": self.map_name,
            "config": asdict(self.cfg),
            "rounds": d["rounds"],
            "end_of_precopy": d["reason"],
            "last_check": d["last_check"],
            "downtime": d["downtime"],
            "hotplug": self.hotplugs,
            "vcpus": sorted(self.vcpu_stats, key=lambda v: v["index"]),
            "precopy_seconds": d["t_stop"] - t0,
            "migration_seconds": d["t_end"] - t0,
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
        if t >= self.done["t_stop"]:
            return "downtime"
        n = 0
        for r in self.done["rounds"]:
            if r["t_start"] <= t:
                n = r["round"]
        return f"pre-copy round {n}" if n else "pre-copy"

    # -- workers ---------------------------------------------------------------------------
    def _spawn(self) -> None:
        from workers import Control, hotplug, migrator, vcpu

        cfg, dm = self.cfg, self.dm
        jobs: list[tuple[str, Any, Any]] = [
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
        for role, target, wcfg in jobs:
            recv, send = self.ctx.Pipe(duplex=False)
            p = self.ctx.Process(target=target, args=(dm, wcfg, Control(self.flags, send)),
                                 name=role, daemon=True)
            self.conns[recv] = role
            try:
                p.start()
            finally:
                send.close()  # the worker holds the only write end: EOF when it exits
            self.procs[role] = p
            self.signals.check()

    def _wait(self, cond: Any, what: str) -> None:
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
                raise _Failed(f"gave up waiting for {what}: the run took longer than "
                              f"--timeout {self.cfg.timeout:g} s")

    def _drain(self, timeout: float, handle: bool = True) -> None:
        """Read every report that arrives within ``timeout`` seconds."""
        for c in wait_for_reports(list(self.conns), timeout):
            assert isinstance(c, Connection)
            try:
                while c.poll():
                    kind, data = c.recv()
                    if handle:
                        self._handle(kind, data)
            except (EOFError, OSError):  # the worker exited (or died mid-report)
                del self.conns[c]
                c.close()

    def _check_workers(self) -> None:
        for role, p in self.procs.items():
            if p.exitcode not in (None, 0):
                self._drain(0.1)  # its error report, if it made one
                raise _Failed(f"worker {role} (pid {p.pid}) exited with code {p.exitcode}")
        mig = self.procs.get("migrator")
        if mig is not None and mig.exitcode == 0 and self.done is None:
            self._drain(0.1)
            if self.done is None:
                raise _Failed("the migrator exited without finishing")

    def _check_exit_codes(self) -> None:
        bad = [f"{r} ({p.exitcode})" for r, p in self.procs.items() if p.exitcode != 0]
        if bad:
            raise _Failed(f"workers failed: {', '.join(bad)}")

    # -- reports ---------------------------------------------------------------------------
    def _handle(self, kind: str, data: dict[str, Any]) -> None:
        pr = self.progress
        if kind == "ready":
            self.ready.add(data["role"])
        elif kind == "error":
            raise _Failed(f"worker {data['role']} failed:\n{data['traceback']}")
        elif kind == "round" and pr is not None:
            self.tasks[data["round"]] = pr.add_task(
                f"round {data['round']}", total=max(data["dirty"], 1),
                completed=0 if data["dirty"] else 1, speed="")
            self._t_round = time.monotonic()
        elif kind == "sent" and pr is not None and data["round"] in self.tasks:
            dt = time.monotonic() - self._t_round
            speed = f"{data['sent'] * (1 << PAGE_BITS) / dt / (1 << 20):.0f} MiB/s" if dt else ""
            pr.update(self.tasks[data["round"]], completed=data["sent"], speed=speed)
        elif kind == "round_end":
            if pr is not None and data["round"] in self.tasks:
                tp = data["throughput"]
                pr.update(self.tasks[data["round"]], completed=max(data["sent"], 1),
                          speed=f"{tp / (1 << 20):.0f} MiB/s" if tp else "")
        elif kind == "hotplug":
            self.hotplugs.append(data)
            self._note(f"hot-add: +{fmt_bytes(data['size'])} at "
                       f"{data['t_done'] - self.t_go:.2f} s, RAM now {fmt_bytes(data['ram_size'])}")
        elif kind == "hotplug_skipped":
            self._note(f"hot-add of {fmt_bytes(data['size'])} at {data['at']:g} s skipped: "
                       "the guest is stopping")
        elif kind == "stopping":
            why = (f"converged (at most {self.cfg.threshold} dirty pages)"
                   if data["reason"] == "converged" else f"{self.cfg.max_rounds} rounds done")
            self._note(f"pre-copy {why}; stopping the vCPUs, {data['pending']} pages pending")
        elif kind == "downtime" and pr is not None:
            self.tasks[0] = pr.add_task("stop-and-copy", total=max(data["pages"], 1), speed="")
            self._t_round = time.monotonic()
        elif kind == "vcpu":
            self.vcpu_stats.append(data)
        elif kind == "done":
            self.done = data
            if pr is not None and 0 in self.tasks:
                pr.update(self.tasks[0], completed=max(data["downtime"]["pages"], 1))

    def _note(self, text: str) -> None:
        con = self.progress.console if self.progress is not None else self.out
        con.print(text, highlight=False, soft_wrap=True)

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


def _render_summary(res: dict[str, Any], out: Console) -> None:
    ps = 1 << PAGE_BITS
    table = Table(title="migration summary", title_justify="left")
    for col, just in (("round", "right"), ("RAM", "right"), ("dirty pages", "right"),
                      ("sent pages", "right"), ("sent", "right"), ("time", "right"),
                      ("dirty rate", "right"), ("throughput", "right"), ("notes", "left")):
        table.add_column(col, justify=just, no_wrap=just == "right")  # type: ignore[arg-type]
    for r in res["rounds"]:
        notes = [f"hot-add +{fmt_bytes(h['size'])}" for h in res["hotplug"]
                 if h["during"] == f"pre-copy round {r['round']}"]
        if r["round"] == 1:
            notes.append("bulk")
        if r["dropped"]:
            notes.append(f"DROPPED {r['dropped']} pages")
        rate = r["dirty_rate"]
        tp = r["throughput"]
        table.add_row(str(r["round"]), fmt_bytes(r["ram_size"]), str(r["dirty"]), str(r["sent"]),
                      fmt_bytes(r["sent"] * ps), f"{r['seconds']:.2f} s",
                      f"{rate:,.0f} pages/s" if rate is not None else "-",
                      f"{tp / (1 << 20):.1f} MiB/s" if tp else "-", ", ".join(notes))
    d = res["downtime"]
    tp = d["pages"] * ps / d["copy_seconds"] if d["copy_seconds"] else 0
    notes = [f"hot-add +{fmt_bytes(h['size'])}" for h in res["hotplug"]
             if h["during"] == "downtime"]
    table.add_row("downtime", fmt_bytes(d["ram_size"]), str(d["pages"]), str(d["pages"]),
                  fmt_bytes(d["pages"] * ps), f"{d['seconds'] * 1e3:.0f} ms", "-",
                  f"{tp / (1 << 20):.1f} MiB/s" if tp else "-",
                  ", ".join(notes + [f"vCPUs stopped: {d['stop_wait'] * 1e3:.0f} ms"]))
    out.print(table)

    sent = sum(r["sent"] for r in res["rounds"]) + d["pages"]
    rates = [r["dirty_rate"] for r in res["rounds"] if r["dirty_rate"] is not None]
    if res["last_check"] and res["last_check"].get("dirty_rate") is not None:
        rates.append(res["last_check"]["dirty_rate"])
    writes = sum(v["writes"] for v in res["vcpus"])
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column()
    end = ("converged: " + str(res["last_check"]["dirty"]) + " dirty pages <= threshold "
           + str(res["config"]["threshold"])) if res["end_of_precopy"] == "converged" \
        else "ran out of rounds"
    grid.add_row("pre-copy", f"{len(res['rounds'])} round(s) in {res['precopy_seconds']:.2f} s, "
                             f"{end}")
    grid.add_row("downtime", f"{d['seconds'] * 1e3:.0f} ms, {d['pages']} pages "
                             f"({fmt_bytes(d['pages'] * ps)}) sent while stopped")
    grid.add_row("sent", f"{sent} pages ({fmt_bytes(sent * ps)}) in "
                         f"{res['migration_seconds']:.2f} s: "
                         f"{sent * ps / res['migration_seconds'] / (1 << 20):.1f} MiB/s")
    grid.add_row("dirty rate", (f"{sum(rates) / len(rates):,.0f} pages/s on average "
                                if rates else "-, ")
                 + f"({writes} page writes by {len(res['vcpus'])} vCPU(s), "
                 f"{res['config']['dirty_mode']}, {res['config']['pattern']})")
    hot = ", ".join(f"+{fmt_bytes(h['size'])} at {h['t_done']:.2f} s ({h['during']})"
                    for h in res["hotplug"]) or "none"
    grid.add_row("RAM", f"{fmt_bytes(res['config']['ram'])} -> "
                        f"{fmt_bytes(res['downtime']['ram_size'])}; hot-adds: {hot}")
    grid.add_row("wall time", f"{res['wall_seconds']:.2f} s (with process start-up)")
    out.print(grid)

    r = res["result"]
    if r["identical"]:
        out.print(f"[bold green]source and destination are identical[/bold green]: "
                  f"{r['pages_compared']} pages ({fmt_bytes(r['bytes_compared'])}) compared "
                  f"byte for byte, {r['pages_written_by_vcpus']} of them last written by a vCPU",
                  highlight=False, soft_wrap=True)
    elif r["missing"]:
        _error(out, f"the destination is incomplete: {r['missing']}")
    else:
        first = ", ".join(str(p) for p in r["first_differ"])
        _error(out, f"source and destination DIFFER in {r['pages_differ']} of "
                    f"{r['pages_compared']} pages; first: {first}")


def cmd_migrate(args: argparse.Namespace, out: Console) -> int:
    cfg = MigrateConfig(
        ram=args.ram, vcpus=args.vcpus, dirty_rate=args.dirty_rate, pattern=args.pattern,
        hot_fraction=args.hot_fraction, dirty_mode=args.dirty_mode, hotplug=args.hotplug,
        block_pages=args.block_pages, bandwidth=args.bandwidth, threshold=args.threshold,
        max_rounds=args.max_rounds, seed=args.seed, timeout=args.timeout,
        drop_round=args.drop_round, name=args.name)
    if cfg.block_pages % 64:
        _error(out, f"--block-pages {cfg.block_pages} must be a multiple of 64")
        return EXIT_USAGE
    if cfg.vcpus + 3 > 64:
        _error(out, f"--vcpus {cfg.vcpus}: at most 61 (the map has 64 reader slots)")
        return EXIT_USAGE
    need = 2 * (cfg.ram + sum(size for _, size in cfg.hotplug))  # source + destination
    st = os.statvfs(segment.SHM_DIR)
    if need > st.f_bavail * st.f_frsize * 0.9:
        _error(out, f"guest RAM and its copy need {fmt_bytes(need)} of {segment.SHM_DIR}, "
                    f"only {fmt_bytes(st.f_bavail * st.f_frsize)} is free")
        return EXIT_USAGE
    if cfg.name is not None and segment.list_segments(cfg.name):
        _error(out, f"map {cfg.name} already exists")
        return EXIT_USAGE
    with _Signals() as signals:
        run = _Migration(cfg, out, signals)
        res: dict[str, Any] | None = None
        try:
            try:
                res = run.execute()
            finally:
                run.teardown()
        except _Interrupted as e:
            out.print(f"interrupted by {e}: workers stopped, map {run.map_name} removed "
                      f"({run.removed} segments)", highlight=False, soft_wrap=True)
            return 128 + e.signum
        except _Failed as e:
            _error(out, f"{e}\nmap {run.map_name} removed ({run.removed} segments)")
            return EXIT_FAILED
        except _Usage as e:
            _error(out, str(e))
            return EXIT_USAGE
    _render_summary(res, out)
    code = EXIT_OK if res["result"]["identical"] else EXIT_MISMATCH
    res["exit_code"] = code
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return code


# --- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmdirty",
        description="QEMU's RCU dirty-memory bitmap in POSIX shared memory: a live "
                    "migration demo and tools to look at maps.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("migrate", help="run a live migration with RAM hot-add, check it "
                       "byte for byte", description="vCPU processes dirty guest RAM while a "
                       "migrator pre-copies it round by round and RAM is hot-added; then "
                       "stop-and-copy, then the destination is compared with the source. "
                       "Exit 0 if identical, 1 if not.")
    m.add_argument("--ram", type=page_size_arg, default=64 << 20, metavar="SIZE",
                   help="initial guest RAM (default 64M)")
    m.add_argument("--vcpus", type=_count, default=2, metavar="N", help="vCPU processes "
                   "(default 2)")
    m.add_argument("--dirty-rate", type=_non_negative, default=2000, metavar="PAGES",
                   help="pages each vCPU writes per second (default 2000)")
    m.add_argument("--pattern", choices=("uniform", "hot", "sequential"), default="uniform",
                   help="where vCPUs write (default uniform)")
    m.add_argument("--hot-fraction", type=_non_negative, default=0.05, metavar="F",
                   help="hot pattern: share of RAM in each vCPU's hot set (default 0.05)")
    m.add_argument("--dirty-mode", choices=("flag", "lebitmap"), default="flag",
                   help="flag: set_dirty_flag per page; lebitmap: KVM-style bitmaps merged "
                        "with set_dirty_lebitmap (default flag)")
    m.add_argument("--hotplug", type=parse_schedule, default=((1.0, 32 << 20),),
                   metavar="SCHEDULE", help="RAM hot-adds as SECONDS:SIZE[,...] after the "
                   "start, or 'none' (default 1:32M)")
    m.add_argument("--block-pages", type=_positive_int, default=4096, metavar="N",
                   help="pages per dirty-bitmap block (default 4096 = 16 MiB of RAM; QEMU "
                        "uses 2097152)")
    m.add_argument("--bandwidth", type=_non_negative, default=24.0, metavar="MIB",
                   help="pre-copy bandwidth in MiB/s, 0 = unlimited (default 24)")
    m.add_argument("--threshold", type=_count, default=256, metavar="PAGES",
                   help="pre-copy ends when at most this many pages are dirty (default 256)")
    m.add_argument("--max-rounds", type=_positive_int, default=30, metavar="N",
                   help="pre-copy rounds at most (default 30)")
    m.add_argument("--seed", type=int, default=1, help="random seed of the vCPUs (default 1)")
    m.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    m.add_argument("--name", type=map_arg, default=None, help="map name (default: random)")
    m.add_argument("--timeout", type=_non_negative, default=300.0, metavar="SECONDS",
                   help="give up after this long (default 300)")
    # Testing: the migrator forgets the dirty pages of this round, so the
    # final comparison must fail.
    m.add_argument("--drop-round", type=int, default=0, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_migrate)

    i = sub.add_parser("inspect", help="show a map: header, RAM, dirty counts, reader slots")
    i.add_argument("name", type=map_arg, metavar="NAME", help="map name (see `shmdirty ls`)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    ls = sub.add_parser("ls", help="list live maps")
    ls.add_argument("-a", "--all", action="store_true", help="also dead and unreadable maps")
    ls.set_defaults(func=cmd_ls)

    g = sub.add_parser("gc", help="remove segments of maps whose processes are all dead")
    g.add_argument("names", nargs="*", type=map_arg, metavar="NAME",
                   help="only these maps (default: every map)")
    g.add_argument("--yes", action="store_true", help="remove them (default: only list)")
    g.set_defaults(func=cmd_gc)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    # Logs and pipes get a wide console (COLUMNS still wins): the summary
    # table has nine columns.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 140
    out = Console(highlight=False, width=wide)
    code: int = args.func(args, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
