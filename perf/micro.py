"""Micro numbers: what one operation costs.

Atomic section (issue 2): one 64-bit fetch_or on a shared-memory word
through ``shmdirty.atomic``'s fast path (patomic's op table through cffi),
the same through the checked ``Words`` method, through the public
``atomicview`` API (a view per op), and a numpy word update behind a
``multiprocessing.Lock``.  The fast / public ratio is the headline (goal:
at least 8x).

RCU section (filled through DirtyMemory's public surface; see the hooks
below): a memb read-side section opened and closed, a qsbr ``quiescent()``,
one raw atomic for scale, and grace-period latency (``dm.rcu.synchronize()``
in the coordinator) with 0, 1 and 2 busy readers in spawn processes.

Each per-op figure is the best of a few repetitions (least disturbed by the
other load on the machine), loop overhead included.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any

from shmdirty import atomic, layout
from shmdirty.segment import Segment
from shmdirty.segment import unlink as unlink_segment

from .registry import BUSY_READER, RCU_QUIESCENT, RCU_SECTION, Cell, Unavailable

FAST_OVER_PUBLIC_GOAL = 8.0
GP_SAMPLE_INTERVAL = 0.005


def best_ns(loop: Callable[[int], None], n: int, repeats: int = 3) -> float:
    """Best per-iteration time of ``loop(n)`` over ``repeats`` runs, in ns."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(n)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e9


def _row(section: str, name: str, ns: float, n: int, **extra: Any) -> dict[str, Any]:
    return {"section": section, "name": name, "ns_per_op": ns, "ops_per_sec": 1e9 / ns,
            "n": n, **extra}


# =============================================================================
# one atomic op
# =============================================================================
def atomic_micro(prefix: str, quick: bool) -> list[dict[str, Any]]:
    """The atomic section: fast path, checked Words, public API, numpy + Lock."""
    scale = 1 if quick else 4
    seg = Segment.create(f"{prefix}micro-atomic", 4096, layout.KIND_BLOCK)
    rows: list[dict[str, Any]] = []
    previous = atomic.backend.name
    try:
        seg.seal()
        offset = layout.PREFIX_BYTES
        ptr = seg.words.ptr(offset)
        words = seg.words
        seq = atomic.SEQ_CST

        def by_ptr(n: int) -> None:
            f = atomic.fetch_or
            for _ in range(n):
                f(ptr, 1, seq)

        def by_words(n: int) -> None:
            f = words.fetch_or
            for _ in range(n):
                f(offset, 1, seq)

        fast_note = None
        try:
            atomic.use_backend("fast")
        except Exception as exc:  # the fast path's internals are not there
            fast_note = f"fast backend unavailable: {exc}"
        n = 50_000 * scale
        rows.append(_row("atomic", "fetch_or, fast path (cffi pointer)", best_ns(by_ptr, n), n,
                         backend=atomic.backend.name, note=fast_note, key="fast"))
        rows.append(_row("atomic", "fetch_or, fast path (checked Words method)",
                         best_ns(by_words, n), n, backend=atomic.backend.name,
                         key="fast_checked"))
        atomic.use_backend("public")
        n = 1_000 * scale
        rows.append(_row("atomic", "fetch_or, public atomicview API (view per op)",
                         best_ns(by_ptr, n), n, backend="public", key="public"))
        atomic.use_backend(previous)

        n = 50_000 * scale
        rows.append(_row("atomic", "numpy word |= under multiprocessing.Lock",
                         _lock_word_ns(seg, offset + 64, n), n, key="lock"))
    finally:
        atomic.use_backend(previous)
        seg.close()
        unlink_segment(seg.name)
    by_key = {r["key"]: r for r in rows}
    ratio = by_key["public"]["ns_per_op"] / by_key["fast"]["ns_per_op"]
    for r in rows:
        r["x_fast"] = r["ns_per_op"] / by_key["fast"]["ns_per_op"]
    by_key["public"]["fast_over_public"] = ratio
    by_key["public"]["goal"] = FAST_OVER_PUBLIC_GOAL
    return rows


def _lock_word_ns(seg: Segment, offset: int, n: int) -> float:
    """ns per numpy word update behind a multiprocessing.Lock (the views die
    with this frame, before the segment is closed)."""
    lock = mp.get_context("spawn").Lock()
    arr = seg.array(offset, 8)
    one = arr.dtype.type(1)

    def under_lock(n: int) -> None:
        for _ in range(n):
            with lock:
                arr[3] |= one

    return best_ns(under_lock, n)


def fast_over_public(micro: list[dict[str, Any]]) -> float | None:
    for r in micro:
        if r.get("key") == "public" and "fast_over_public" in r:
            return float(r["fast_over_public"])
    return None


# =============================================================================
# RCU (through DirtyMemory's public surface; the lead may add rcu.py-level rows)
# =============================================================================
def rcu_micro(cfg: Any, pools: Any, run_id: str) -> tuple[list[dict[str, Any]], str | None]:
    """The RCU section; ([], note) while shmdirty.dirty does not exist.

    A process reads a map in one flavor only, so the section and quiescent()
    costs are measured in a pool worker; the coordinator (this process, memb)
    measures grace periods."""
    from .harness import run_prefix
    from .impl_shmdirty import dirty_memory, map_name

    try:
        dm_class = dirty_memory()
    except Unavailable as exc:
        return [], f"RCU micro numbers skipped: {exc}"
    stem = f"{run_prefix(run_id)}micro"
    dm = dm_class.create(0, page_bits=cfg.page_bits, name=map_name(stem))
    rows: list[dict[str, Any]] = []
    try:
        dm.extend(cfg.guest_bytes)
        for flavor, op, name in (
                ("memb", RCU_SECTION, "memb read-side section, open + close"),
                ("qsbr", RCU_QUIESCENT, "qsbr quiescent()")):
            rows.append(_per_op_in_worker(cfg, pools, dm, flavor, op, name, stem))
        rows.append(_raw_atomic(200_000 if cfg.quick else 1_000_000))
        # With no readers the flavor makes no difference: measured once.
        for flavor, readers in (("memb", 0), ("memb", 1), ("memb", 2),
                                ("qsbr", 1), ("qsbr", 2)):
            rows.append(_gp_latency(cfg, pools, dm, flavor, readers, stem))
    finally:
        dm.destroy()
    raw = next(r["ns_per_op"] for r in rows if r.get("key") == "raw")
    for r in rows:
        if "ns_per_op" in r:
            r["x_fast"] = r["ns_per_op"] / raw
    return rows, None


def _micro_cell(cfg: Any, flavor: str, op: str, workers: int, stem: str) -> Cell:
    return Cell(impl=f"shmdirty-{flavor}", op=op, pattern=None, workers=workers,
                hotplug=False, duration=cfg.duration, guest_bytes=cfg.guest_bytes,
                page_bits=cfg.page_bits, range_pages=cfg.range_pages,
                batch_pages=cfg.batch_pages, seed=cfg.seed, stem=stem)


def _per_op_in_worker(cfg: Any, pools: Any, dm: Any, flavor: str, op: str, name: str,
                      stem: str) -> dict[str, Any]:
    cell = _micro_cell(cfg, flavor, op, 1, stem)
    reports, _ = pools.get(1).run(cell, {"name": dm.name, "flavor": flavor})
    r = reports[0]
    if not r.get("ok"):
        return {"section": "rcu", "name": name, "error": r.get("error")}
    return _row("rcu", name, r["seconds"] / r["ops"] * 1e9, r["ops"])


def _raw_atomic(n: int) -> dict[str, Any]:
    word = atomic.ffi.new("uint64_t[1]")  # process-private: no contention
    ptr = atomic.ffi.cast("char *", word)

    def raw(n: int) -> None:
        f, seq = atomic.fetch_or, atomic.SEQ_CST
        for _ in range(n):
            f(ptr, 1, seq)

    return _row("rcu", "one raw atomic (fetch_or, fast path)", best_ns(raw, n), n, key="raw")


def _gp_latency(cfg: Any, pools: Any, dm: Any, flavor: str, readers: int,
                stem: str) -> dict[str, Any]:
    """Grace-period latency seen by the coordinator while ``readers`` spawn
    processes run get_dirty_flag back to back in ``flavor`` (qsbr readers
    call quiescent() every 64 ops)."""
    name = f"grace period, {flavor}, {readers} busy reader(s)"
    samples: list[float] = []

    def sample() -> None:
        t0 = time.perf_counter()
        dm.rcu.synchronize(timeout=10.0)
        samples.append(time.perf_counter() - t0)

    if readers == 0:
        end = time.perf_counter() + cfg.duration
        while time.perf_counter() < end or not samples:
            sample()
    else:
        cell = _micro_cell(cfg, flavor, BUSY_READER, readers, stem)
        reports, err = pools.get(readers).run(cell, {"name": dm.name, "flavor": flavor},
                                              sample, GP_SAMPLE_INTERVAL)
        bad = [r["error"] for r in reports if not r.get("ok")]
        if err is not None or bad or not samples:
            return {"section": "rcu", "name": name,
                    "error": str(err) if err else (bad[0] if bad else "no samples")}
    us = sorted(s * 1e6 for s in samples)
    return {"section": "rcu", "name": name, "flavor": flavor, "readers": readers,
            "samples": len(us), "median_us": statistics.median(us),
            "p90_us": us[int(0.9 * (len(us) - 1))], "max_us": us[-1]}
