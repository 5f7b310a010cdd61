"""The command line: ``shmdirty migrate | inspect NAME | ls | gc``.

``migrate`` is a live migration: this process creates the map and the
guest RAM, becomes the coordinator (it grants hot-plug requests with
``serve_once()`` in its loop), and runs the workers of ``workers/`` in
spawned processes.  It ends by comparing source and destination byte for
byte.  Exit codes: 0 identical, 1 different, 2 bad usage or not a map,
3 a worker failed, 128 + signal number when interrupted (130 Ctrl-C,
143 SIGTERM), after stopping the workers and removing every segment.

The application lives in the repository's ``workers/`` folder, installed
as ``shmdirty._workers``.

``inspect``, ``ls`` and ``gc`` only look, except ``gc --yes``.  ``ls`` and
``gc`` never attach a map: they read the header's owner words directly, so
they claim no reader slot and block nobody.  ``inspect`` attaches (a reader
slot) only for as long as it takes to count dirty pages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from . import layout, segment

# The application: the one import of workers/ (shmdirty._workers, a symlink
# to it) from the library, the layer above it (docs/ARCHITECTURE.md).
from ._workers import app, reports
from .errors import ShmDirtyError
from .maps import CLIENT_NAMES, MapStatus, collect, inspect_map, map_status
from .options import (
    count,
    fmt_bytes,
    fraction,
    map_arg,
    natural,
    non_negative,
    page_size_arg,
    parse_schedule,
    positive,
    positive_whole,
    whole,
    writable_file,
)

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130    # 128 + SIGINT; SIGTERM gives 143

MIGRATE_EXITS = """\
exit codes:
  0        source and destination are identical
  1        they differ (the summary names the first differing pages)
  2        bad options, or the map cannot be made (nothing was started)
  3        a worker failed, the run timed out, or the --json file could not be written
  130/143  interrupted by Ctrl-C / SIGTERM: workers stopped, every segment removed"""
INSPECT_EXITS = """\
exit codes:
  0    shown
  2    bad options, or NAME is not a readable map (the reason goes to stderr)
  130  interrupted by Ctrl-C"""
LS_EXITS = """\
exit codes:
  0    listed (also when there is no map)
  2    bad options
  130  interrupted by Ctrl-C"""
GC_EXITS = """\
exit codes:
  0    listed or removed (maps that are in use are left alone and named)
  2    bad options, or a NAME is not a map (the others are still handled)
  130  interrupted by Ctrl-C"""

PAGE_BITS = app.PAGE_BITS
FIRST_DIFFS = app.FIRST_DIFFS
__all__ = ["CLIENT_NAMES", "inspect_map", "main", "map_status"]


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
        _error(str(e))
        return EXIT_USAGE
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _render_inspect(info, out)
    return EXIT_OK


# --- ls and gc ------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace, out: Console) -> int:
    statuses = [map_status(m) for m in sorted(segment.list_maps(), key=natural)]
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
    names = args.names or sorted(segment.list_maps(), key=natural)
    code = EXIT_OK
    garbage: list[MapStatus] = []
    for name in names:
        st = map_status(name)
        if st.state == "absent":
            if args.names:  # (a map that vanished since list_maps() is no error)
                _error(f"{name!r} is not a map: no shmdirty-{name}-* segment in "
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
        for n in sorted(st.segments, key=natural):
            _say(out, f"    {n}")
    if not args.yes:
        _say(out, "run `shmdirty gc --yes` to remove them")
        return code
    removed = 0
    for st in garbage:
        again, gone = collect(st.name)
        if not again.garbage:
            _say(out, f"map {st.name} is {again.state} now; left alone")
        removed += gone
    _say(out, f"removed {removed} segment(s)")
    return code


def _error(msg: str) -> None:
    """An error message, on stderr (stdout stays clean for --json and pipes)."""
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {escape(msg)}",
                                                soft_wrap=True)


def _say(out: Console, msg: str) -> None:
    """One message line, never wrapped (names and pids stay greppable)."""
    out.print(msg, highlight=False, soft_wrap=True)


# --- migrate: rendering the application's events -------------------------------------------
class _Progress:
    """Renders the typed events of a migration: notes, a progress bar per round."""

    def __init__(self, cfg: app.MigrateConfig, out: Console) -> None:
        self.cfg, self.out = cfg, out
        self.progress: Progress | None = None
        self.tasks: dict[int, TaskID] = {}
        self.t_go = 0.0
        self._t_round = 0.0

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __call__(self, ev: reports.Report) -> None:
        pr = self.progress
        if isinstance(ev, reports.Started):
            self.t_go = time.monotonic()
            self.out.print(f"shmdirty migrate: map {ev.map_name} started: "
                           f"{fmt_bytes(ev.ram)} guest RAM, {ev.vcpus} vCPU(s) "
                           f"({ev.dirty_mode}, {ev.pattern}, {ev.dirty_rate:g} pages/s "
                           f"each), {ev.workers} workers", highlight=False)
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("pages {task.fields[speed]}"),
                                     TimeElapsedColumn(), console=self.out)
            self.progress.start()
        elif isinstance(ev, reports.RoundEnd):
            if pr is not None and ev.round in self.tasks:
                tp = ev.throughput
                pr.update(self.tasks[ev.round], completed=max(ev.sent, 1),
                          speed=f"{tp / (1 << 20):.0f} MiB/s" if tp else "")
        elif isinstance(ev, reports.RoundStart) and pr is not None:
            self.tasks[ev.round] = pr.add_task(f"round {ev.round}", total=max(ev.dirty, 1),
                                               completed=0 if ev.dirty else 1, speed="")
            self._t_round = time.monotonic()
        elif isinstance(ev, reports.Sent) and pr is not None and ev.round in self.tasks:
            dt = time.monotonic() - self._t_round
            speed = f"{ev.sent * (1 << app.PAGE_BITS) / dt / (1 << 20):.0f} MiB/s" if dt else ""
            pr.update(self.tasks[ev.round], completed=ev.sent, speed=speed)
        elif isinstance(ev, reports.Hotplug):
            self._note(f"hot-add: +{fmt_bytes(ev.size)} at {ev.t_done - self.t_go:.2f} s, "
                       f"RAM now {fmt_bytes(ev.ram_size)}")
        elif isinstance(ev, reports.HotplugSkipped):
            self._note(f"hot-add of {fmt_bytes(ev.size)} at {ev.at:g} s skipped: "
                       "the guest is stopping")
        elif isinstance(ev, reports.Stopping):
            # What is known now: the last check's count when pre-copy
            # converged.  After the last round was sent nothing is counted
            # yet: the final sync, once the vCPUs stop, finds what is dirty.
            if ev.reason == "converged":
                self._note(f"pre-copy converged: {ev.pending} dirty pages <= threshold "
                           f"{self.cfg.threshold}; stopping the vCPUs")
            else:
                self._note(f"pre-copy ran out of rounds ({self.cfg.max_rounds}); stopping "
                           "the vCPUs, then syncing what they dirtied")
        elif isinstance(ev, reports.Downtime):
            self._note(f"stop-and-copy: {ev.pages} pages to send with the vCPUs stopped")
            if pr is not None:
                self.tasks[0] = pr.add_task("stop-and-copy", total=max(ev.pages, 1), speed="")
            self._t_round = time.monotonic()
        elif isinstance(ev, reports.Done):
            if pr is not None and 0 in self.tasks:
                pr.update(self.tasks[0], completed=max(ev.downtime.pages, 1))
            self.close()

    def _note(self, text: str) -> None:
        con = self.progress.console if self.progress is not None else self.out
        con.print(text, highlight=False)  # wrapped at the terminal's width


def _render_summary(res: dict[str, Any], out: Console) -> None:
    """The rounds as a table that fits 80 columns (numbers never wrap, notes
    do), then the totals and the verdict."""
    ps = 1 << PAGE_BITS
    table = Table(title=f"migration summary (pages of {fmt_bytes(ps)})", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for col in ("round", "RAM", "dirty", "time", "dirty/s", "MiB/s"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("notes", overflow="fold")
    for r in res["rounds"]:
        notes = [f"hot-add +{fmt_bytes(h['size'])}" for h in res["hotplug"]
                 if h["during"] == f"pre-copy round {r['round']}"]
        if r["round"] == 1:
            notes.append("bulk")
        if r["dropped"]:
            notes.append(f"DROPPED {r['dropped']} pages")
        elif r["sent"] != r["dirty"]:
            notes.append(f"{r['sent']} pages sent")
        rate = r["dirty_rate"]
        tp = r["throughput"]
        table.add_row(str(r["round"]), fmt_bytes(r["ram_size"]), str(r["dirty"]),
                      f"{r['seconds']:.2f} s",
                      f"{rate:,.0f}" if rate is not None else "-",
                      f"{tp / (1 << 20):.1f}" if tp else "-", ", ".join(notes))
    d = res["downtime"]
    tp = d["pages"] * ps / d["copy_seconds"] if d["copy_seconds"] else 0
    notes = [f"hot-add +{fmt_bytes(h['size'])}" for h in res["hotplug"]
             if h["during"] == "downtime"]
    table.add_row("downtime", fmt_bytes(d["ram_size"]), str(d["pages"]),
                  f"{d['seconds'] * 1e3:.0f} ms", "-",
                  f"{tp / (1 << 20):.1f}" if tp else "-",
                  ", ".join(notes + [f"vCPUs stopped in {d['stop_wait'] * 1e3:.0f} ms"]))
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
    asked, reached = res["config"]["dirty_rate"], vcpu_rate(res)
    if reached is not None:
        short = reached < RATE_REACHED * asked
        grid.add_row("vCPU rate", f"{reached:,.0f} pages/s per vCPU of {asked:,.0f} requested"
                     + ("[bold red] — NOT REACHED: this machine could not keep up[/]"
                        if short else ""))
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
                  highlight=False)
    elif r["missing"]:
        _verdict(out, f"the destination is incomplete: {r['missing']}")
    else:
        first = ", ".join(str(p) for p in r["first_differ"])
        _verdict(out, f"source and destination DIFFER in {r['pages_differ']} of "
                      f"{r['pages_compared']} pages; first: {first}")


RATE_REACHED = 0.9  # a vCPU rate below this share of --dirty-rate is reported


def vcpu_rate(res: dict[str, Any]) -> float | None:
    """Pages/s one vCPU wrote on average (None: no vCPU ran)."""
    rates = [v["writes"] / v["seconds"] for v in res["vcpus"] if v["seconds"] > 0]
    return sum(rates) / len(rates) if rates else None


def _verdict(out: Console, msg: str) -> None:
    """A failed comparison: the run's result, so on stdout with the summary."""
    out.print(f"[bold red]error:[/bold red] {escape(msg)}", highlight=False)


def cmd_migrate(args: argparse.Namespace, out: Console) -> int:
    cfg = app.MigrateConfig(
        ram=args.ram, vcpus=args.vcpus, dirty_rate=args.dirty_rate, pattern=args.pattern,
        hot_fraction=args.hot_fraction, dirty_mode=args.dirty_mode, hotplug=args.hotplug,
        block_pages=args.block_pages, bandwidth=args.bandwidth, threshold=args.threshold,
        max_rounds=args.max_rounds, seed=args.seed, timeout=args.timeout,
        drop_round=args.drop_round, name=args.name)
    progress = _Progress(cfg, out)
    try:
        try:
            res = app.run(cfg, progress)
        finally:
            progress.close()
    except app.Interrupted as e:
        _error(f"interrupted by {e}: workers stopped, map {e.map_name} removed "
               f"({e.removed} segments)")
        return 128 + e.signum
    except app.Failed as e:
        _error(f"{e}\nmap {e.map_name} removed ({e.removed} segments)")
        return EXIT_FAILED
    except app.Usage as e:
        _error(str(e))
        return EXIT_USAGE
    _render_summary(res, out)
    code = EXIT_OK if res["result"]["identical"] else EXIT_MISMATCH
    res["exit_code"] = code
    reached = vcpu_rate(res)
    res["vcpu_rate"] = {"requested": cfg.dirty_rate, "reached": reached,
                        "short": reached is not None and reached < RATE_REACHED * cfg.dirty_rate}
    if args.json:
        text = json.dumps(res, indent=2)  # whole before the file is touched
        try:
            with open(args.json, "w") as f:
                f.write(text)
        except OSError as e:  # checked up front; this is a race or a full disk
            _error(f"could not write --json {args.json}: {e.strerror or e}")
            return EXIT_FAILED
    return code


# --- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmdirty",
        description="QEMU's RCU dirty-memory bitmap in POSIX shared memory: a live "
                    "migration demo and tools to look at maps.",
        epilog="Each command lists its exit codes in its --help.  Bad options exit 2.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    m = sub.add_parser("migrate", help="run a live migration with RAM hot-add, check it "
                       "byte for byte", description="vCPU processes dirty guest RAM while a "
                       "migrator pre-copies it round by round and RAM is hot-added; then "
                       "stop-and-copy, then the destination is compared with the source.",
                       epilog=MIGRATE_EXITS, formatter_class=raw)
    m.add_argument("--ram", type=page_size_arg, default=64 << 20, metavar="SIZE",
                   help="initial guest RAM (default 64M)")
    m.add_argument("--vcpus", type=count, default=2, metavar="N", help="vCPU processes "
                   "(default 2)")
    m.add_argument("--dirty-rate", type=non_negative, default=2000, metavar="PAGES",
                   help="pages each vCPU writes per second (default 2000)")
    m.add_argument("--pattern", choices=("uniform", "hot", "sequential"), default="uniform",
                   help="where vCPUs write (default uniform)")
    m.add_argument("--hot-fraction", type=fraction, default=0.05, metavar="F",
                   help="hot pattern: share of RAM in each vCPU's hot set (default 0.05)")
    m.add_argument("--dirty-mode", choices=("flag", "lebitmap"), default="flag",
                   help="flag: set_dirty_flag per page; lebitmap: KVM-style bitmaps merged "
                        "with set_dirty_lebitmap (default flag)")
    m.add_argument("--hotplug", type=parse_schedule, default=((1.0, 32 << 20),),
                   metavar="SCHEDULE", help="RAM hot-adds as SECONDS:SIZE[,...] after the "
                   "start, or 'none' (default 1:32M)")
    m.add_argument("--block-pages", type=positive_whole, default=4096, metavar="N",
                   help="pages per dirty-bitmap block (default 4096 = 16 MiB of RAM; QEMU "
                        "uses 2097152)")
    m.add_argument("--bandwidth", type=non_negative, default=24.0, metavar="MIB",
                   help="pre-copy bandwidth in MiB/s, 0 = unlimited (default 24)")
    m.add_argument("--threshold", type=count, default=256, metavar="PAGES",
                   help="pre-copy ends when at most this many pages are dirty (default 256)")
    m.add_argument("--max-rounds", type=positive_whole, default=30, metavar="N",
                   help="pre-copy rounds at most (default 30)")
    m.add_argument("--seed", type=whole, default=1, help="random seed of the vCPUs (default 1)")
    m.add_argument("--json", type=writable_file, metavar="PATH",
                   help="write the results as JSON to PATH")
    m.add_argument("--name", type=map_arg, default=None, help="map name (default: random)")
    m.add_argument("--timeout", type=positive, default=300.0, metavar="SECONDS",
                   help="give up after this long (default 300)")
    # Testing: the migrator forgets the dirty pages of this round, so the
    # final comparison must fail.
    m.add_argument("--drop-round", type=count, default=0, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_migrate)

    i = sub.add_parser("inspect", help="show a map: header, RAM, dirty counts, reader slots",
                       epilog=INSPECT_EXITS, formatter_class=raw)
    i.add_argument("name", type=map_arg, metavar="NAME", help="map name (see `shmdirty ls`)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    ls = sub.add_parser("ls", help="list live maps", epilog=LS_EXITS, formatter_class=raw)
    ls.add_argument("-a", "--all", action="store_true", help="also dead and unreadable maps")
    ls.set_defaults(func=cmd_ls)

    g = sub.add_parser("gc", help="remove segments of maps whose processes are all dead",
                       epilog=GC_EXITS, formatter_class=raw)
    g.add_argument("names", nargs="*", type=map_arg, metavar="NAME",
                   help="only these maps (default: every map)")
    g.add_argument("--yes", action="store_true", help="remove them (default: only list)")
    g.set_defaults(func=cmd_gc)
    return p


def version() -> str:
    try:
        return _dist_version("shmdirty")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (each command's --help
    lists them).  Ctrl-C at any point exits 130 without a traceback; during a
    migration the run stops its workers and removes its segments first."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, or a usage error (argparse printed it)
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        # Logs and pipes get a wide console (COLUMNS still wins).
        wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 140
        out = Console(highlight=False, width=wide)
        code: int = args.func(args, out)
        return code
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
