"""Output: the JSON document, the table, the issue-6 targets, the PNG plot.

JSON form::

    {"results": [{"impl", "op", "pattern", "workers", "hotplug", "ops_per_sec",
                  "ratio_to_lock", "ops", "seconds", "pages_per_op", ...}],
     "skipped": [{"impl", "op", ..., "why"}], "errors": [{..., "error"}],
     "micro": [...], "targets": [...], "machine": {...}, "config": {...}}

Ratios are the point: absolute figures move with the machine's load.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .registry import IMPL_NAMES, OP_NAMES
from .workloads import OPS, PATTERNS

RESULTS_DIR = Path(__file__).with_name("results")


# =============================================================================
# the document
# =============================================================================
def document(outcome: Any, machine: dict[str, Any], command: str) -> dict[str, Any]:
    """The JSON document of a run (ratios to lock filled in)."""
    results = [dict(r) for r in outcome.results]
    lock = {_group(r): r["ops_per_sec"] for r in results if r["impl"] == "lock"}
    for r in results:
        base = lock.get(_group(r))
        r["ratio_to_lock"] = r["ops_per_sec"] / base if base else None
    cfg = dataclasses.asdict(outcome.config)
    cfg["command"] = command
    doc = {
        "results": results,
        "skipped": outcome.skipped,
        "errors": outcome.errors,
        "micro": outcome.micro,
        "notes": outcome.notes,
        "machine": machine,
        "config": cfg,
        "run_id": outcome.run_id,
        "elapsed_seconds": outcome.seconds,
    }
    doc["targets"] = targets(doc)
    doc["goals"] = goals(doc)
    return doc


def _group(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["op"], r.get("pattern"), r["workers"], r["hotplug"])


def write_json(doc: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


# =============================================================================
# issue 6's ratios (informational: no thresholds, the exit code ignores them)
# =============================================================================
def _ops(doc: dict[str, Any], impl: str, op: str, workers: int, hotplug: bool = False,
         pattern: str | None = None) -> float | None:
    for r in doc["results"]:
        if (r["impl"], r["op"], r["workers"], r["hotplug"], r.get("pattern")) == (
                impl, op, workers, hotplug, pattern):
            return float(r["ops_per_sec"])
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures issue 6 asks shmdirty to reach, as measured in this run."""
    from .micro import FAST_OVER_PUBLIC_GOAL, SECTION_GOAL_RAW, fast_over_public, section_over_raw

    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, goal: float, higher: bool = True) -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        out.append({"target": what, "value": value, "goal": goal,
                    "goal_is": "at least" if higher else "at most", "met": met})

    add("atomic fetch_or: fast path / public API", fast_over_public(doc["micro"]),
        FAST_OVER_PUBLIC_GOAL)
    add("rcu (issue 3): memb Rcu.read_lock + read_unlock, in raw atomics",
        section_over_raw(doc["micro"]), SECTION_GOAL_RAW, higher=False)
    for impl in ("shmdirty-memb", "shmdirty-qsbr"):
        f = "set_dirty_flag"
        add(f"{impl} {f}, 1 worker / lock", _ratio(_ops(doc, impl, f, 1), _ops(doc, "lock", f, 1)),
            1.5)
        add(f"{impl} {f}, 2 workers / lock",
            _ratio(_ops(doc, impl, f, 2), _ops(doc, "lock", f, 2)), 3.0)
        add(f"{impl} {f}, 1 worker / atomics-api",
            _ratio(_ops(doc, impl, f, 1), _ops(doc, "atomics-api", f, 1)), 20.0)
        for w in (1, 2):
            on, off = _ops(doc, impl, f, w, True), _ops(doc, impl, f, w, False)
            cost = 1 - on / off if on and off else None
            add(f"{impl} {f}, {w} worker(s): hot-add every 10 ms costs", cost, 0.10,
                higher=False)
        s = "sync_dirty_bitmap"
        add(f"{impl} {s} 1 % dirty, 1 worker / c",
            _ratio(_ops(doc, impl, s, 1, pattern="sparse"), _ops(doc, "c", s, 1,
                                                                   pattern="sparse")), 1.0)
        le = "set_dirty_lebitmap"
        add(f"{impl} {le} dense, 1 worker / c",
            _ratio(_ops(doc, impl, le, 1, pattern="dense"), _ops(doc, "c", le, 1,
                                                                   pattern="dense")), 0.5)
        add(f"{impl} {le} 1 % random, 1 worker / c",
            _ratio(_ops(doc, impl, le, 1, pattern="sparse"), _ops(doc, "c", le, 1,
                                                                    pattern="sparse")), 1 / 30)
    return out


FLAVORS = ("shmdirty-memb", "shmdirty-qsbr")


def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 11's goals (the compiled kernel), as measured in this run: ops/s
    ratios to lock ("x lock"), or time per call as a multiple of c's ("x c's
    time"), best flavor unless one is named.  Same shape as targets()."""
    out: list[dict[str, Any]] = []

    def best(op: str, workers: int, pattern: str | None = None,
             hotplug: bool = False) -> float | None:
        got = [v for f in FLAVORS if (v := _ops(doc, f, op, workers, hotplug, pattern))]
        return max(got) if got else None

    def add(what: str, value: float | None, goal: float, higher: bool = True) -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        out.append({"goal": what, "value": value, "want": goal,
                    "want_is": "at least" if higher else "at most", "met": met,
                    "unit": "x c's time" if "time" in what else ("%" if "costs" in what
                                                                 else "x lock")})

    f = "set_dirty_flag"
    add(f"{f}, 1 worker / lock", _ratio(best(f, 1), _ops(doc, "lock", f, 1)), 3.0)
    add(f"{f}, 2 workers / lock", _ratio(best(f, 2), _ops(doc, "lock", f, 2)), 6.0)
    add(f"{f}, memb, 1 worker / lock",
        _ratio(_ops(doc, "shmdirty-memb", f, 1), _ops(doc, "lock", f, 1)), 1.5)
    for op in ("set_dirty_range", "get_dirty", "test_and_clear_dirty", "set_dirty_pages"):
        for w, want in ((1, 1.0), (2, 2.0)):
            add(f"{op}, {w} worker{'s' if w > 1 else ''} / lock",
                _ratio(best(op, w), _ops(doc, "lock", op, w)), want)
    for op, pattern, want, workers in (("set_dirty_lebitmap", "dense", 1.3, (1, 2)),
                                       ("set_dirty_lebitmap", "sparse", 1.3, (1, 2)),
                                       ("set_dirty_pages", None, 3.0, (1, 2)),
                                       ("sync_dirty_bitmap", "sparse", 1.0, (1,))):
        for w in workers:
            name = op + (f" {pattern}" if pattern else "")
            add(f"{name}, {w} worker{'s' if w > 1 else ''}: time per call / c's time",
                _ratio(_ops(doc, "c", op, w, pattern=pattern), best(op, w, pattern)), want,
                higher=False)
    for impl in FLAVORS:
        for w in (1, 2):
            on, off = _ops(doc, impl, f, w, True), _ops(doc, impl, f, w, False)
            add(f"{impl} {f}, {w} worker{'s' if w > 1 else ''}: a hot-add every 10 ms costs",
                1 - on / off if on and off else None, 0.10, higher=False)
    return out


# =============================================================================
# the table
# =============================================================================
def human(x: float | None) -> str:
    if x is None or not math.isfinite(x) or x <= 0:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def print_report(doc: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    _print_micro(doc, console)

    impls = [i for i in IMPL_NAMES if i in doc["config"]["impls"]]
    table = Table(title="ops/sec (x ratio to lock in the same row)", title_justify="left")
    for col in ("workload", "workers", "hot-plug"):
        table.add_column(col, no_wrap=True)
    for impl in impls:
        table.add_column(impl, justify="right", no_wrap=True)
    cells: dict[tuple[Any, ...], dict[str, str]] = {}
    for r in doc["results"]:
        ratio = r.get("ratio_to_lock")
        text = human(r["ops_per_sec"])
        if ratio is not None and r["impl"] != "lock":
            text += f" x{ratio:.3g}"
        cells.setdefault(_group(r), {})[r["impl"]] = text
    for r in doc["skipped"]:
        cells.setdefault(_group(r), {}).setdefault(r["impl"], "[dim]skip[/]")
    for r in doc["errors"]:
        if r["op"] in OP_NAMES:  # micro-section errors are listed below the table
            cells.setdefault(_group(r), {})[r["impl"]] = "[red]error[/]"
    order = {op: i for i, op in enumerate(OP_NAMES)}
    for g in sorted(cells, key=lambda g: (order.get(g[0], 99), str(g[1]), g[2], g[3])):
        op, pattern, workers, hotplug = g
        name = op + (f" ({pattern})" if pattern else "")
        table.add_row(name, str(workers), "yes" if hotplug else "",
                      *(cells[g].get(i, "") for i in impls))
    console.print(table)

    targets_table = Table(title="issue 6 (and 3) targets (informational; rows this run could not "
                          "measure are omitted)", title_justify="left")
    for col in ("target", "measured", "goal", ""):
        targets_table.add_column(col)
    shown_targets = [t for t in doc["targets"] if t["value"] is not None]
    for t in shown_targets:
        v = t["value"]
        shown = "-" if v is None else (f"{v:.1%}" if "costs" in t["target"] else f"{v:.3g}x")
        goal = f"{t['goal']:.0%}" if "costs" in t["target"] else f"{t['goal']:.3g}x"
        mark = {True: "[green]met[/]", False: "[yellow]not met[/]", None: "[dim]n/a[/]"}
        targets_table.add_row(t["target"], shown, f"{t['goal_is']} {goal}", mark[t["met"]])
    if shown_targets:  # the JSON keeps every target, measured or not
        console.print(targets_table)
    _print_goals(doc.get("goals", []), console)

    notes = list(dict.fromkeys(doc["notes"] + [s["why"] for s in doc["skipped"]]))
    for n in notes:
        console.print(f"[dim]note:[/] {n}", highlight=False)
    for e in doc["errors"]:
        console.print(f"[red]error:[/] {e['impl']} {e['op']} workers={e['workers']}"
                      f"{' hot-plug' if e['hotplug'] else ''}: {e['error']}", highlight=False)
    console.print(_legend(doc["config"]), highlight=False)


def _print_goals(rows: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    shown = [g for g in rows if g["value"] is not None]
    if not shown:
        return
    t = Table(title="issue 11 goals (the compiled kernel; best flavor unless named)",
              title_justify="left")
    for col in ("goal", "measured", "want", ""):
        t.add_column(col)
    mark = {True: "[green]met[/]", False: "[yellow]not met[/]", None: "[dim]n/a[/]"}
    for g in shown:
        pct = g["unit"] == "%"
        v = f"{g['value']:.1%}" if pct else f"{g['value']:.3g}x"
        want = f"{g['want']:.0%}" if pct else f"{g['want']:.3g}x"
        t.add_row(g["goal"], v, f"{g['want_is']} {want}", mark[g["met"]])
    console.print(t)
    console.print("[dim]note:[/] a hot-add cost compares two cells run one after the other; "
                  "a cell moves by up to 2x between runs on a loaded machine, so a negative "
                  "cost (the hot-plug cell was faster) or a single miss is noise: repeat with "
                  "--duration 1 (docs/PERFORMANCE.md, Results)", highlight=False)


def _print_micro(doc: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    if not doc["micro"]:
        return
    t = Table(title="micro: one operation", title_justify="left")
    for col, just in (("section", "left"), ("operation", "left"), ("ns/op", "right"),
                      ("x fast path", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in doc["micro"]:
        if "ns_per_op" in r:
            x = r.get("x_fast")
            t.add_row(r["section"], r["name"], f"{r['ns_per_op']:.0f}",
                      f"{x:.3g}" if x is not None else "")
        elif "median_us" in r:
            read = r.get("ns_per_read")
            t.add_row(r["section"], r["name"], f"median {r['median_us']:.0f} us, p90 "
                      f"{r['p90_us']:.0f} us, max {r['max_us']:.0f} us ({r['samples']}); "
                      f"{r['ns_per_update']:.0f} ns/update"
                      + (f", {read:.0f} ns/read" if read else ""), "")
        else:
            t.add_row(r["section"], r["name"], f"[red]{r.get('error')}[/]", "")
    console.print(t)
    from .micro import FAST_OVER_PUBLIC_GOAL, SECTION_GOAL_RAW, fast_over_public, section_over_raw

    ratio = fast_over_public(doc["micro"])
    if ratio is not None:
        ok = "[green]met[/]" if ratio >= FAST_OVER_PUBLIC_GOAL else "[red]not met[/]"
        console.print(f"fast path / public API: [bold]{ratio:.1f}x[/] "
                      f"(goal at least {FAST_OVER_PUBLIC_GOAL:g}x: {ok})")
    for key, what in (("lock_unlock", "Rcu.read_lock + read_unlock"),
                      ("section", "with dm.read_section()")):
        x = section_over_raw(doc["micro"], key)
        if x is not None:
            ok = "[green]met[/]" if x <= SECTION_GOAL_RAW else "[red]not met[/]"
            console.print(f"memb section open + close ({what}) = [bold]{x:.2f}[/] raw atomics "
                          f"(issue 3 goal at most {SECTION_GOAL_RAW:g}: {ok})")


def _legend(cfg: dict[str, Any]) -> str:
    lines = [f"workloads (one op = one call; guest {cfg['guest_bytes'] >> 30} GiB, "
             f"{cfg['duration']} s per cell):"]
    for name in OP_NAMES:
        what = OPS[name].what.replace("range_pages", str(cfg["range_pages"]))
        lines.append(f"  {name}: {what.replace('batch_pages', str(cfg['batch_pages']))}")
    for p, what in PATTERNS.items():
        lines.append(f"  pattern {p}: {what}")
    lines.extend(SYNC_LEGEND)
    return "\n".join(lines)


SYNC_LEGEND = (
    "  shmdirty sync_dirty_bitmap rows model QEMU's migration thread: worker 0 is the",
    "    migrator and the map's coordinator (the parent resigns with close(), the worker",
    "    adopt()s), so whole blocks are taken by swap + one grace period; it also does the",
    "    hot-adds of the hot-plug rows (every 10 ms, between syncs). With N > 1 workers the",
    "    other N-1 are uncounted vCPU writers (set_dirty_flag in their own slices): the row",
    "    is ONE migrator's calls/s over 1/N of the guest, where lock and c rows are N",
    "    syncers' total. Only the 1-worker rows compare like with like.",
)


# =============================================================================
# the plot
# =============================================================================
def plot(doc: dict[str, Any], path: str | Path) -> Path | None:
    """Grouped bars of ops/sec (log scale), one panel per workload; None
    without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    order = {op: i for i, op in enumerate(OP_NAMES)}
    panels = sorted({(r["op"], r.get("pattern")) for r in rows},
                    key=lambda k: (order.get(k[0], 99), str(k[1])))
    if not panels:
        return None
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False)
    impls = [i for i in IMPL_NAMES if any(r["impl"] == i for r in rows)]
    colors = {i: c for i, c in zip(IMPL_NAMES, ("C0", "C1", "C3", "C2", "C7"), strict=True)}
    for ax, (op, pattern) in zip(axes.flat, panels, strict=False):
        mine = [r for r in rows if (r["op"], r.get("pattern")) == (op, pattern)]
        groups = sorted({(r["workers"], r["hotplug"]) for r in mine})
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            vals = {(r["workers"], r["hotplug"]): r["ops_per_sec"] for r in mine
                    if r["impl"] == impl}
            xs = [g + k * width for g in range(len(groups))]
            ax.bar(xs, [vals.get(g, 0) for g in groups], width, label=impl, color=colors[impl])
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))],
                      [f"{w}w{' +hp' if hp else ''}" for w, hp in groups])
        ax.set_yscale("log")
        ax.set_title(op + (f" ({pattern})" if pattern else ""), fontsize=10)
        ax.set_ylabel("ops/sec")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(impls), frameon=False)
    m = doc.get("machine", {})
    fig.suptitle(f"shmdirty perf: ops/sec ({m.get('cpus', '?')} cpus, load "
                 f"{m.get('loadavg_start', ['?'])[0]}; +hp = hot-add every 10 ms)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
