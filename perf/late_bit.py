"""``python -m perf.late_bit``: how long a late bit stays hidden (issue 17 item 1).

The issue's scenario, repeated ``--tries`` times on one map: one block of
32768 pages, all dirty for VGA; a memb writer process enters a read-side
section and parks; this process (the coordinator) takes the whole block
with ``test_and_clear_dirty``, whose swap cannot end its grace period within
its budget, so the block is retired; the writer, still inside, sets page
1234 and leaves its section, noting ``time.monotonic()`` just after; an
observer process, polling ``get_dirty_flag`` of that page since before the
write, notes when it first reads it dirty.  The clock is system-wide, so
the difference is the time from the writer leaving its section to the bit
being visible in another process.  Prints its median and maximum (and the
90th percentile).  Numbers, not a test: no threshold.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import shmdirty as sd

from .machine import machine_info

PAGE = 1234
BLOCK = 32768
VGA = sd.DIRTY_MEMORY_VGA
WAIT = 30.0


def _writer(name: str, conn: Any) -> None:
    """Per try: enter a section, say so, wait for the word, write, leave, send the time."""
    dm = sd.DirtyMemory.attach(name)
    try:
        while conn.recv() == "enter":
            with dm.read_section():
                conn.send("in")
                conn.recv()                      # "write"
                dm.set_dirty_flag(PAGE << dm.page_bits, VGA)
            conn.send(time.monotonic())
    finally:
        dm.close()


def _observer(name: str, conn: Any) -> None:
    """Per try: say it watches, then poll the page until it reads dirty; send the time."""
    dm = sd.DirtyMemory.attach(name)
    addr = PAGE << dm.page_bits
    try:
        while conn.recv() == "watch":
            deadline = time.monotonic() + WAIT
            conn.send("watching")
            while not dm.get_dirty_flag(addr, VGA):
                if time.monotonic() > deadline:
                    break
                os.sched_yield()
            conn.send(time.monotonic())
    finally:
        dm.close()


def measure(tries: int) -> tuple[list[float], int]:
    """Latencies (s) of ``tries`` tries, and how many tries did not swap."""
    ctx = mp.get_context("spawn")
    dm = sd.DirtyMemory.create(BLOCK * 4096, block_pages=BLOCK)
    w_conn, w_child = ctx.Pipe()
    o_conn, o_child = ctx.Pipe()
    procs = [ctx.Process(target=_writer, args=(dm.name, w_child)),
             ctx.Process(target=_observer, args=(dm.name, o_child))]
    lat: list[float] = []
    no_swap = 0
    try:
        for p in procs:
            p.start()
        while len(lat) < tries:
            dm.set_dirty_range(0, dm.ram_size, 1 << VGA)    # all dirty: the swap pays
            w_conn.send("enter")
            assert w_conn.poll(WAIT) and w_conn.recv() == "in"
            g = dm.generation
            assert dm.test_and_clear_dirty(0, dm.ram_size, VGA)
            swapped = dm.generation == g + 1
            o_conn.send("watch")
            assert o_conn.poll(WAIT) and o_conn.recv() == "watching"
            w_conn.send("write")
            assert w_conn.poll(WAIT) and o_conn.poll(WAIT)
            left, seen = w_conn.recv(), o_conn.recv()
            if not swapped:                  # the last give-back was still finishing
                no_swap += 1
                continue
            lat.append(seen - left)
    finally:
        for c in (w_conn, o_conn):
            c.send("stop")
        for p in procs:
            p.join(WAIT)
            if p.is_alive():
                p.kill()
        dm.destroy()
    return lat, no_swap


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.late_bit", description=__doc__.split("\n")[0])
    ap.add_argument("--tries", type=int, default=100)
    args = ap.parse_args()
    lat, no_swap = measure(args.tries)
    ms = sorted(x * 1e3 for x in lat)
    backend = machine_info()["atomic_backend"]
    print(f"backend {backend}: {len(ms)} tries ({no_swap} skipped: no swap)")
    print(f"writer left -> bit visible in another process: median {statistics.median(ms):.3f} ms, "
          f"p90 {ms[int(0.9 * (len(ms) - 1))]:.3f} ms, max {ms[-1]:.3f} ms")


if __name__ == "__main__":
    main()
