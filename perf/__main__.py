"""``python -m perf``: ops/sec of shmdirty against lock, atomics-api and c.

Exit status 0 when every measured cell ran, 1 if any failed (skipped cells
and missed ratio targets do not count: there are no thresholds).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any

from .harness import GIB, BenchConfig, run_bench, sigterm_as_exit
from .registry import IMPL_NAMES, OP_NAMES

# How this was started: ``python -m perf`` in a checkout, ``python -m
# shmdirty.perf`` from an install (the same files, package-dir maps them).
PROG = f"python -m {__package__ or 'perf'}"


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(bad) or repr(text)}; choose from {', '.join(known)}")
    return tuple(n for n in known if n in names)  # canonical order


def _workers(text: str) -> tuple[int, ...]:
    """``N`` means 1..N; ``1,4`` means exactly those."""
    try:
        nums = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: a number or a list") from None
    if any(n < 1 for n in nums):
        raise argparse.ArgumentTypeError("--workers: counts start at 1")
    if len(nums) == 1:
        return tuple(range(1, nums[0] + 1))
    return tuple(sorted(set(nums)))


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="ops/sec of shmdirty's dirty-bitmap workloads against a lock, the "
                    "public atomics API and C, side by side in one run.")
    p.add_argument("--quick", action="store_true",
                   help="short cells (under 3 minutes on 2 cores): the CI smoke run")
    p.add_argument("--json", metavar="PATH", help="also write the JSON document to PATH")
    p.add_argument("--workers", type=_workers, default=(1, 2), metavar="N",
                   help="worker processes: N means 1..N, or a list like 1,4 (default 1..2)")
    p.add_argument("--only", type=lambda t: _names(t, IMPL_NAMES, "implementation"),
                   default=IMPL_NAMES, metavar="IMPL[,IMPL]",
                   help=f"implementations ({', '.join(IMPL_NAMES)})")
    p.add_argument("--ops", type=lambda t: _names(t, OP_NAMES, "workload"),
                   default=OP_NAMES, metavar="OP[,OP]", help=f"workloads ({', '.join(OP_NAMES)})")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-micro", action="store_true", help="skip the micro section")
    p.add_argument("--no-hotplug", action="store_true", help="skip the hot-plug variants")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="timed seconds per worker per cell (default 1, --quick 0.2)")
    p.add_argument("--guest-gib", type=_positive, default=64, metavar="GIB",
                   help="guest RAM when a cell starts (default 64)")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> BenchConfig:
    kw: dict[str, Any] = {
        "impls": args.only, "ops": args.ops, "workers": args.workers,
        "hotplug": (False,) if args.no_hotplug else (False, True),
        "micro": not args.no_micro, "guest_bytes": args.guest_gib * GIB,
    }
    if args.duration is not None:
        kw["duration"] = args.duration
    return BenchConfig.for_quick(args.quick, **kw)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from .machine import machine_info
    from .report import RESULTS_DIR, document, plot, print_report, write_json

    args = parse_args(argv)
    cfg = config_from(args)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # logs and CI: do not squeeze the table to 80 columns
    err = Console(stderr=True)
    command = f"{PROG} " + shlex.join(sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    # Workers are spawned: they run on the backend this process picked.
    os.environ["SHMDIRTY_ATOMICS"] = machine["atomic_backend"]
    backend_line = (f"atomics backend: {machine['atomic_backend']} "
                    f"(patomic from {machine['atomics_package']})")
    err.print(backend_line, highlight=False)
    try:
        with sigterm_as_exit():
            outcome = run_bench(cfg, log=lambda m: err.print(f"[dim]{m}[/]", highlight=False))
    except KeyboardInterrupt:
        err.print("interrupted: workers stopped, segments removed, no report written")
        return 130
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = document(outcome, machine, command)
    print_report(doc, console)
    console.print(backend_line, highlight=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = [write_json(doc, RESULTS_DIR / "bench.json")]
    if args.json:
        paths.append(write_json(doc, args.json))
    if not args.no_plot:
        png = plot(doc, RESULTS_DIR / "bench.png")
        if png is None:
            console.print("[dim]note:[/] no plot (matplotlib missing: pip install "
                          "'shmdirty\\[bench]', or no results)")
        else:
            paths.append(png)
    console.print(f"{len(doc['results'])} results, {len(doc['skipped'])} skipped, "
                  f"{len(doc['errors'])} errors in {outcome.seconds:.0f} s ({stamp}); wrote "
                  + ", ".join(str(p) for p in paths), highlight=False)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
