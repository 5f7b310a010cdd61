"""Micro numbers: what one operation costs.

Atomic section (issue 2): one 64-bit fetch_or on a shared-memory word
through ``shmdirty.atomic``'s fast path (patomic's op table through cffi),
the same through the checked ``Words`` method, through the public
``atomicview`` API (a view per op), and a numpy word update behind a
``multiprocessing.Lock``.  The fast / public ratio is the headline (goal:
at least 8x).

RCU section (issue 3's benchmark, through DirtyMemory's public surface): a
memb read-side section opened and closed (through ``dm.rcu`` and through
``dm.read_section()``), a qsbr quiescent point when the counter has not
moved (through ``dm.rcu`` and ``dm``), one raw atomic for scale (goal: a
section open + close costs at most 2 of them), and grace-period latency
(``dm.rcu.synchronize()`` in the coordinator, back to back and one every
5 ms) with 0, 1 and 2 busy readers in spawn processes, with ns/read and
ns/update as rcutorture reports them.

Each per-op figure is the best of a few repetitions (least disturbed by the
other load on the machine), loop overhead included.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any

from .internals import Segment, atomic, layout, unlink_segment
from .registry import (
    BUSY_READER,
    RCU_LOCK,
    RCU_QS_RAW,
    RCU_QUIESCENT,
    RCU_RAW_ATOMIC,
    RCU_SECTION,
    Cell,
    Unavailable,
    run_prefix,
)

FAST_OVER_PUBLIC_GOAL = 8.0


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

        n = 50_000 * scale
        try:
            atomic.use_backend("kernel")
        except Exception:  # not compiled at install: no kernel row
            pass
        else:
            rows.append(_row("atomic", "fetch_or, compiled kernel (C extension, address)",
                             best_ns(by_ptr, n), n, backend="kernel", key="kernel"))
        fast_note = None
        try:
            atomic.use_backend("cffi")
        except Exception as exc:  # the fast path's internals are not there
            fast_note = f"fast backend unavailable: {exc}"
        n = 50_000 * scale
        rows.append(_row("atomic", "fetch_or, cffi path (function pointer)", best_ns(by_ptr, n), n,
                         backend=atomic.backend.name, note=fast_note, key="fast"))
        rows.append(_row("atomic", "fetch_or, cffi path (checked Words method)",
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
# RCU (issue 3's benchmark), through DirtyMemory's public surface
# =============================================================================
SECTION_GOAL_RAW = 2.0  # issue 3: a memb section open + close costs at most 2 raw atomics

# (flavor, pseudo-workload, key, name) of the per-op rows, each measured in
# one spawned worker (a process reads a map in one flavor only), so that all
# of them pay the same loop and the same process conditions.
PER_OP = (
    ("memb", RCU_LOCK, "lock_unlock", "memb Rcu.read_lock() + read_unlock() (dm.rcu)"),
    ("memb", RCU_SECTION, "section", "memb `with dm.read_section(): pass`"),
    ("qsbr", RCU_QS_RAW, "qs_raw", "qsbr Rcu.quiescent(), counter not moved (dm.rcu)"),
    ("qsbr", RCU_QUIESCENT, "qs", "qsbr dm.quiescent(), counter not moved"),
    ("memb", RCU_RAW_ATOMIC, "raw", "one raw atomic: atomic.fetch_add(Words.ptr(0), SEQ_CST)"),
)
# (flavor, busy readers) of the grace-period rows; with no reader the
# flavor makes no difference: measured once.
GP_CASES = (("memb", 0), ("memb", 1), ("memb", 2), ("qsbr", 1), ("qsbr", 2))
# Grace periods back to back (rcuscale's updater: ns/update), and one every
# 5 ms (an updater that does other work or sleeps in between, as the
# migrator does: the scheduler's wake-up and placement then show).
GP_GAPS = (0.0, 0.005)


def rcu_micro(cfg: Any, pools: Any, run_id: str) -> tuple[list[dict[str, Any]], str | None]:
    """The RCU section; ([], note) while shmdirty.dirty does not exist.

    Per-op costs (a memb section through Rcu and through DirtyMemory, a
    qsbr quiescent point, one raw atomic) are measured in a pool worker with
    the harness's timed loop: chunks of 64 calls, best of ``PER_OP_REPEATS``
    cells.  Grace periods: the coordinator (this process, memb, outside any
    section) calls ``dm.rcu.synchronize()`` back to back, then once every
    5 ms, while 0, 1 or 2 spawn readers run short sections (memb: ``with dm.read_section():
    dm.get_dirty_flag(...)``; qsbr: ``dm.get_dirty_flag(...)`` then
    ``dm.quiescent()``).  As rcutorture / rcuscale report it: ns/update is
    the coordinator's time per grace period, ns/read a reader's time per
    read (section included) while the grace periods run."""
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
        dm.rcu.barrier()  # the growth's deferred frees: nothing moves the counter from here
        repeats = 1 if cfg.quick else 3
        for flavor, op, key, name in PER_OP:
            rows.append(_per_op_in_worker(cfg, pools, dm, flavor, op, key, name, stem, repeats))
        for gap in GP_GAPS:
            for flavor, readers in GP_CASES:
                rows.append(_gp_latency(cfg, pools, dm, flavor, readers, stem, gap))
    finally:
        dm.destroy()
    by_key = {r["key"]: r for r in rows if "key" in r and "ns_per_op" in r}
    raw = by_key.get("raw")
    if raw is not None:
        for r in rows:
            if "ns_per_op" in r:
                r["x_fast"] = r["ns_per_op"] / raw["ns_per_op"]
        for key in ("lock_unlock", "section"):
            if key in by_key:
                by_key[key]["goal_x_raw"] = SECTION_GOAL_RAW
    return rows, None


def section_over_raw(micro: list[dict[str, Any]], key: str = "lock_unlock") -> float | None:
    """A memb section open + close, in raw atomics (issue 3: at most 2)."""
    for r in micro:
        if r.get("section") == "rcu" and r.get("key") == key and "x_fast" in r:
            return float(r["x_fast"])
    return None


def _micro_cell(cfg: Any, flavor: str, op: str, workers: int, stem: str) -> Cell:
    return Cell(impl=f"shmdirty-{flavor}", op=op, pattern=None, workers=workers,
                hotplug=False, duration=cfg.duration, guest_bytes=cfg.guest_bytes,
                page_bits=cfg.page_bits, range_pages=cfg.range_pages,
                batch_pages=cfg.batch_pages, seed=cfg.seed, stem=stem)


def _per_op_in_worker(cfg: Any, pools: Any, dm: Any, flavor: str, op: str, key: str,
                      name: str, stem: str, repeats: int) -> dict[str, Any]:
    cell = _micro_cell(cfg, flavor, op, 1, stem)
    best: dict[str, Any] | None = None
    for _ in range(repeats):
        reports, _ = pools.get(1).run(cell, {"name": dm.name, "flavor": flavor})
        r = reports[0]
        if not r.get("ok"):
            return {"section": "rcu", "name": name, "key": key, "error": r.get("error")}
        if best is None or r["seconds"] / r["ops"] < best["seconds"] / best["ops"]:
            best = r
    assert best is not None
    return _row("rcu", name, best["seconds"] / best["ops"] * 1e9, best["ops"], key=key,
                flavor=flavor)


def _gp_latency(cfg: Any, pools: Any, dm: Any, flavor: str, readers: int,
                stem: str, gap: float) -> dict[str, Any]:
    """Grace periods in the coordinator, back to back (``gap`` 0) or one
    every ``gap`` seconds, while ``readers`` spawn processes run short
    sections in ``flavor``."""
    when = "back to back" if not gap else f"every {gap * 1e3:g} ms"
    name = (f"grace period ({when}), {readers} busy {flavor} reader(s)" if readers
            else f"grace period ({when}), no reader")
    key = f"gp_{flavor}_{readers}" + (f"_every{gap * 1e3:g}ms" if gap else "")
    samples: list[float] = []

    def sample() -> None:
        t0 = time.perf_counter()
        dm.rcu.synchronize(timeout=10.0)
        samples.append(time.perf_counter() - t0)

    ns_read = None
    if readers == 0:
        end = time.perf_counter() + cfg.duration
        while time.perf_counter() < end or not samples:
            start = time.perf_counter()
            sample()
            if gap:
                time.sleep(max(0.0, start + gap - time.perf_counter()))
    else:
        cell = _micro_cell(cfg, flavor, BUSY_READER, readers, stem)
        reports, err = pools.get(readers).run(cell, {"name": dm.name, "flavor": flavor},
                                              sample, gap)
        bad = [r["error"] for r in reports if not r.get("ok")]
        if err is not None or bad or not samples:
            return {"section": "rcu", "name": name, "key": key,
                    "error": str(err) if err else (bad[0] if bad else "no samples")}
        ns_read = statistics.mean(r["seconds"] / r["ops"] * 1e9 for r in reports)
    us = sorted(s * 1e6 for s in samples)
    # ns/update: the mean time per grace period (back to back: rcuscale's figure).
    return {"section": "rcu", "name": name, "key": key, "flavor": flavor,
            "readers": readers, "gap_s": gap, "samples": len(us),
            "median_us": statistics.median(us), "p90_us": us[int(0.9 * (len(us) - 1))],
            "max_us": us[-1], "ns_per_update": statistics.mean(samples) * 1e9,
            "ns_per_read": ns_read}
