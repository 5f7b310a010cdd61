"""``python -m perf.waiting``: CPU a waiter burns while a reader holds it up.

One spawned reader sits inside a read-side section for the whole run.  This
process then waits on it three ways, each for ``--seconds``, and reports
the share of one core it used (user + system time from psutil, over wall
time): ``synchronize(timeout)``; ``serve()`` with a call_rcu callback
queued behind the reader; and ``serve()`` with nothing queued (its idle
cost).  Issue 10 asks serve() with a waiting callback to back off like
synchronize() does: under 5 % of a core.  Numbers, not a test: no threshold.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from typing import Any

import psutil

import shmdirty as sd


def _parked(name: str, entered: Any, release: Any) -> None:
    dm = sd.DirtyMemory.attach(name)
    try:
        with dm.read_section():
            entered.set()
            release.wait(600)
    finally:
        dm.close()


def _cpu_share(fn: Any, seconds: float) -> float:
    me = psutil.Process()
    c0, t0 = me.cpu_times(), time.monotonic()
    fn(seconds)
    c1, t1 = me.cpu_times(), time.monotonic()
    used = (c1.user - c0.user) + (c1.system - c0.system)
    return float(100.0 * used / (t1 - t0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    dm = sd.DirtyMemory.create(1 << 20)
    entered, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_parked, args=(dm.name, entered, release))
    p.start()
    try:
        assert entered.wait(60), "the reader never got in"

        def sync(s: float) -> None:
            try:
                dm.rcu.synchronize(timeout=s)
            except sd.GraceTimeout:
                pass

        def serve(s: float) -> None:
            stop = threading.Event()
            threading.Timer(s, stop.set).start()
            dm.serve(stop)

        rows = [("synchronize(), reader in a section", _cpu_share(sync, args.seconds))]
        dm.rcu.call_rcu(lambda: None)
        rows.append(("serve(), a callback waits on the reader",
                     _cpu_share(serve, args.seconds)))
        release.set()
        p.join(60)
        dm.rcu.barrier(timeout=60)
        rows.append(("serve(), nothing queued", _cpu_share(serve, args.seconds)))
        for what, pct in rows:
            print(f"{what:45s} {pct:6.1f} % of a core")
    finally:
        release.set()
        p.join(60)
        dm.destroy()


if __name__ == "__main__":
    main()
