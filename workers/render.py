"""Rendering for the command line: a migration's progress from its typed
events, its summary and verdict from its result dict, sizes (``fmt_bytes``,
the one byte formatter of the tree).

Events are the report classes of ``workers.reports``, dispatched on their
type (``Progress.HANDLERS``); results are plain dicts.  It never imports the
run itself (``workers.app``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from .guest import PAGE_BITS
from .reports import (
    DestinationLost,
    Done,
    Downtime,
    GuestHotadd,
    GuestStarted,
    Hotplug,
    HotplugRefused,
    HotplugSkipped,
    Report,
    RoundEnd,
    RoundStart,
    Sent,
    Started,
    Stopping,
    Switchover,
)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def error(out: Console, msg: str) -> None:
    """An error message, on stderr (stdout stays clean for --json and pipes);
    ``out`` only lends its width."""
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {escape(msg)}",
                                                soft_wrap=True)


def verdict(out: Console, msg: str) -> None:
    """A failed check of the run: its result, so on stdout with the summary."""
    out.print(f"[bold red]error:[/bold red] {escape(msg)}", highlight=False)


def say(out: Console, msg: str) -> None:
    """One message line, never wrapped (names and pids stay greppable)."""
    out.print(msg, highlight=False, soft_wrap=True)


# --- migrate: rendering the application's events -------------------------------------------
class Limits(Protocol):
    """What Progress reads of the run's config (``workers.config.MigrateConfig``)."""

    threshold: int
    max_rounds: int


class Progress:
    """Renders the typed events of a migration: notes, a progress bar per round."""

    def __init__(self, cfg: Limits, out: Console) -> None:
        self.cfg, self.out = cfg, out
        self.progress: RichProgress | None = None
        self.tasks: dict[int, TaskID] = {}
        self.t_go = 0.0
        self._t_round = 0.0

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __call__(self, ev: Report) -> None:
        handler = self.HANDLERS.get(type(ev))
        if handler is not None:
            handler(self, ev)

    def _bar(self) -> None:
        self.progress = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("pages {task.fields[speed]}"),
                                     TimeElapsedColumn(), console=self.out)
        self.progress.start()

    def _started(self, ev: Started) -> None:
        self.t_go = time.monotonic()
        self.out.print(f"shmdirty migrate: map {ev.map_name} started: "
                       f"{fmt_bytes(ev.ram)} guest RAM, {ev.vcpus} vCPU(s) "
                       f"({ev.dirty_mode}, {ev.pattern}, {ev.dirty_rate:g} pages/s "
                       f"each), {ev.workers} workers", highlight=False, soft_wrap=True)
        self._bar()

    def _guest_started(self, ev: GuestStarted) -> None:
        self.out.print(f"shmdirty migrate: {ev.why}\nmap {ev.map_name}: {fmt_bytes(ev.ram)} "
                       f"guest RAM, {ev.vcpus} vCPU thread(s), {ev.pattern} pattern, "
                       f"{ev.steps} steps each; destination {ev.destination}",
                       highlight=False, soft_wrap=True)
        self.t_go = time.monotonic()
        self._bar()

    def _guest_hotadd(self, ev: GuestHotadd) -> None:
        self._note(f"hot-add: +{fmt_bytes(ev.size)} at {ev.t - self.t_go:.2f} s, when a "
                   f"vCPU reached its hot-add step (steps done: {list(ev.progress)})")

    def _switchover(self, ev: Switchover) -> None:
        self._note(f"switchover check ({ev.method}): "
                   + ("identical" if ev.identical else f"{ev.n_differ} DIFFER"))

    def _destination_lost(self, ev: DestinationLost) -> None:
        self._note(f"destination lost: {ev.message}")

    def _round_end(self, ev: RoundEnd) -> None:
        pr = self.progress
        if pr is not None and ev.round in self.tasks:
            tp = ev.throughput
            pr.update(self.tasks[ev.round], completed=max(ev.sent, 1),
                      speed=f"{tp / (1 << 20):.0f} MiB/s" if tp else "")

    def _round_start(self, ev: RoundStart) -> None:
        pr = self.progress
        if pr is not None:
            self.tasks[ev.round] = pr.add_task(f"round {ev.round}", total=max(ev.dirty, 1),
                                               completed=0 if ev.dirty else 1, speed="")
            self._t_round = time.monotonic()

    def _sent(self, ev: Sent) -> None:
        pr = self.progress
        if pr is not None and ev.round in self.tasks:
            dt = time.monotonic() - self._t_round
            speed = f"{ev.sent * (1 << PAGE_BITS) / dt / (1 << 20):.0f} MiB/s" if dt else ""
            pr.update(self.tasks[ev.round], completed=ev.sent, speed=speed)

    def _hotplug(self, ev: Hotplug) -> None:
        self._note(f"hot-add: +{fmt_bytes(ev.size)} at {ev.t_done - self.t_go:.2f} s, "
                   f"RAM now {fmt_bytes(ev.ram_size)}")

    def _hotplug_skipped(self, ev: HotplugSkipped) -> None:
        self._note(f"hot-add of {fmt_bytes(ev.size)} at {ev.at:g} s skipped: "
                   "the guest is stopping")

    def _hotplug_refused(self, ev: HotplugRefused) -> None:
        self._note(f"hot-add of {fmt_bytes(ev.size)} at {ev.at:g} s refused, the guest runs "
                   f"on: {ev.why}")

    def _stopping(self, ev: Stopping) -> None:
        why = (f"converged (at most {self.cfg.threshold} dirty pages)"
               if ev.reason == "converged" else f"{self.cfg.max_rounds} rounds done")
        # ev.pending is what the last pre-copy round left, often 0; what
        # stop-and-copy sends is only known once the vCPUs stopped (Downtime).
        self._note(f"pre-copy {why}; stopping the vCPUs")

    def _downtime(self, ev: Downtime) -> None:
        self._note(f"vCPUs stopped: stop-and-copy sends {ev.pages} pages "
                   f"({fmt_bytes(ev.pages << PAGE_BITS)})")
        if self.progress is not None:
            self.tasks[0] = self.progress.add_task("stop-and-copy", total=max(ev.pages, 1),
                                                   speed="")
            self._t_round = time.monotonic()

    def _done(self, ev: Done) -> None:
        if self.progress is not None and 0 in self.tasks:
            self.progress.update(self.tasks[0], completed=max(ev.downtime.pages, 1))
        self.close()

    # The events rendered, by their exact class (a RoundEnd is not a RoundStart
    # here); every other report is not shown.
    HANDLERS: ClassVar[dict[type[Any], Callable[[Progress, Any], None]]] = {
        Started: _started, GuestStarted: _guest_started, GuestHotadd: _guest_hotadd,
        Switchover: _switchover, DestinationLost: _destination_lost, RoundEnd: _round_end,
        RoundStart: _round_start, Sent: _sent, Hotplug: _hotplug,
        HotplugSkipped: _hotplug_skipped, HotplugRefused: _hotplug_refused,
        Stopping: _stopping, Downtime: _downtime, Done: _done}

    def _note(self, text: str) -> None:
        con = self.progress.console if self.progress is not None else self.out
        con.print(text, highlight=False, soft_wrap=True)


def summary(res: dict[str, Any], out: Console) -> None:
    """The summary of a finished migration (``res``: the result dict), fit for
    an 80-column terminal: short headers, units in the header, no vertical
    rules; a long note wraps in its cell rather than being cut."""
    ps = 1 << PAGE_BITS
    table = Table(title="migration summary", title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    for col, just in (("round", "right"), ("RAM", "right"), ("dirty\npages", "right"),
                      ("sent\npages", "right"), ("time", "right"), ("dirty\npages/s", "right"),
                      ("sent\nMiB/s", "right"), ("notes", "left")):
        table.add_column(col, justify=just, no_wrap=just == "right")  # type: ignore[arg-type]
    for r in res["round_log"]:
        notes = [f"hot-add +{fmt_bytes(h['size'])}" for h in res["hotplug"]
                 if h["during"] == f"pre-copy round {r['round']}"]
        if r["round"] == 1:
            notes.append("bulk")
        if r["dropped"]:
            notes.append(f"DROPPED {r['dropped']} pages")
        rate = r["dirty_rate"]
        tp = r["throughput"]
        table.add_row(str(r["round"]), fmt_bytes(r["ram_size"]), str(r["dirty"]), str(r["sent"]),
                      f"{r['seconds']:.2f} s", f"{rate:,.0f}" if rate is not None else "-",
                      f"{tp / (1 << 20):.1f}" if tp else "-", ", ".join(notes))
    d = res["downtime"]
    tp = d["pages"] * ps / d["copy_seconds"] if d["copy_seconds"] else 0
    notes = [f"hot-add +{fmt_bytes(h['size'])}" for h in res["hotplug"]
             if h["during"] == "downtime"]
    table.add_row("downtime", fmt_bytes(d["ram_size"]), str(d["pages"]), str(d["pages"]),
                  f"{d['seconds'] * 1e3:.0f} ms", "-",
                  f"{tp / (1 << 20):.1f}" if tp else "-", ", ".join(notes))
    out.print(table)

    sent = res["pages_sent"]
    rates = [r["dirty_rate"] for r in res["round_log"] if r["dirty_rate"] is not None]
    if res["last_check"] and res["last_check"].get("dirty_rate") is not None:
        rates.append(res["last_check"]["dirty_rate"])
    kvm = res["guest"] == "kvm"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column()
    end = ("converged: " + str(res["last_check"]["dirty"]) + " dirty pages <= threshold "
           + str(res["config"]["threshold"])) if res["end_of_precopy"] == "converged" \
        else "ran out of rounds"
    grid.add_row("guest", res["guest_why"])
    grid.add_row("pre-copy", f"{res['rounds']} round(s) in {res['precopy_seconds']:.2f} s, "
                             f"{end}")
    grid.add_row("downtime", f"{d['seconds'] * 1e3:.0f} ms, {d['pages']} pages "
                             f"({fmt_bytes(d['pages'] * ps)}) sent while stopped; the vCPUs "
                             f"took {d['stop_wait'] * 1e3:.0f} ms to stop")
    tp = res["throughput_mib_s"]
    grid.add_row("sent", f"{sent} pages ({fmt_bytes(sent * ps)}) over TCP to "
                         f"{res['destination']['address']} in {res['migration_seconds']:.2f} s; "
                         f"throughput {tp or 0:.1f} MiB/s while sending")
    grid.add_row("dirty rate", (f"{sum(rates) / len(rates):,.0f} pages/s on average "
                                if rates else "-, ") + (
        f"({res['config']['guest']['vcpus']} vCPU thread(s), "
        f"{res['config']['guest']['pattern']}; KVM's dirty log + dataplane)" if kvm else
        f"({sum(v['writes'] for v in res['vcpus'])} page writes by {len(res['vcpus'])} "
        f"vCPU(s), {res['config']['dirty_mode']}, {res['config']['pattern']})"))
    vr = res.get("vcpu_rate")
    if vr is not None:
        grid.add_row("vCPU rate", f"{vr['achieved']:,.0f} pages/s each achieved, "
                                  f"{vr['requested']:,.0f} requested" + (
            "" if vr["reached"] else " [bold red]NOT REACHED[/bold red]: the machine "
            "could not keep up (try a lower --dirty-rate)"))
    hot = ", ".join(f"+{fmt_bytes(h['size'])} at {h['t_done']:.2f} s ({h['during']})"
                    for h in res["hotplug"]) or "none"
    grid.add_row("RAM", f"{fmt_bytes(res['config']['ram'])} -> "
                        f"{fmt_bytes(res['downtime']['ram_size'])}; hot-adds: {hot}")
    grid.add_row("wall time", f"{res['wall_seconds']:.2f} s (with process start-up)")
    out.print(grid)

    if kvm:
        _kvm_verdict(res, out)
        return
    r = res["result"]
    if r["identical"]:
        out.print(f"[bold green]source and destination are identical[/bold green]: "
                  f"{r['pages_compared']} pages ({fmt_bytes(r['bytes_compared'])}) compared "
                  + ("byte for byte" if r.get("method", "bytes") == "bytes"
                     else "by SHA-256 chunk digests")
                  + f", {r['pages_written_by_vcpus']} of them last written by a vCPU",
                  highlight=False)
    elif r["missing"]:
        verdict(out, f"the destination is incomplete: {r['missing']}")
    else:
        first = ", ".join(str(p) for p in r["first_differ"])
        unit = "pages" if r.get("method", "bytes") == "bytes" else "1 MiB chunks"
        verdict(out, f"source and destination DIFFER in {r['pages_differ']} {unit}; "
                   f"first: {first}")


def _kvm_verdict(res: dict[str, Any], out: Console) -> None:
    r, sums = res["result"], res["checksums"]
    what = (f"{r['compared']} pages compared byte for byte" if r["method"] == "bytes"
            else f"{r['compared']} SHA-256 chunk digests compared")
    if r["identical"]:
        out.print(f"[bold green]source and destination are identical[/bold green] at the "
                  f"switchover: {what}", highlight=False)
    else:
        verdict(out, f"source and destination DIFFER at the switchover in {r['pages_differ']} "
                    f"{'pages' if r['method'] == 'bytes' else 'chunks'}; first: "
                    f"{', '.join(map(str, r['first_differ']))}")
    for _, size in res.get("destination_hotadds") or []:
        say(out, f"hot-add of +{fmt_bytes(size)} made on the destination, after the resume")
    hexes = ", ".join(f"{c:#018x}" for c in sums["expected"])
    if res["resumed_ok"]:
        out.print(f"[bold green]the resumed guest ended as the model says[/bold green]: "
                  f"checksums {hexes} and every register the model predicts",
                  highlight=False)
    else:
        got = ", ".join(f"{c:#018x}" if c is not None else "-" for c in sums["destination"])
        verdict(out, f"the resumed guest did NOT end as the model says: checksums {got}, "
                    f"expected {hexes}")


