"""perf: the harness runs end to end on a tiny configuration.

A smoke test, not a benchmark: it checks that every baseline produces a
result row of the documented JSON shape with ops_per_sec > 0, that skipped
cells say why, and that no segment is left behind.  No timing thresholds.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from shmdirty import atomic
from shmdirty.perf import harness, micro, report
from shmdirty.perf.registry import IMPL_NAMES, OP_NAMES
from shmdirty.perf.workloads import OPS

pytestmark = pytest.mark.timeout(300)

GIB = 1 << 30
ROW_KEYS = {"impl", "op", "pattern", "workers", "hotplug", "ops_per_sec", "ratio_to_lock",
            "ops", "seconds", "pages_per_op", "guest_bytes", "per_worker"}


def _tiny(impls: tuple[str, ...], ops: tuple[str, ...] = OP_NAMES,
          workers: tuple[int, ...] = (1, 2)) -> harness.BenchConfig:
    return harness.BenchConfig(impls=impls, ops=ops, workers=workers,
                               hotplug=(False, True), duration=0.02, guest_bytes=1 * GIB,
                               hotplug_step=GIB // 4, micro=False)


def _document(outcome: harness.Outcome, tmp_path: Any) -> dict[str, Any]:
    doc = report.document(outcome, {"cpus": 0}, "test")
    path = report.write_json(doc, tmp_path / "bench.json")
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _expected_cells(cfg: harness.BenchConfig) -> set[tuple[Any, ...]]:
    return {(impl, op, pattern, w, hp) for op in cfg.ops for pattern in OPS[op].patterns
            for w in cfg.workers for hp in cfg.hotplug for impl in cfg.impls}


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["impl"], r["op"], r["pattern"], r["workers"], r["hotplug"])


def test_baselines_produce_rows_of_the_documented_shape(map_name: str, tmp_path: Any) -> None:
    impls = ("lock", "atomics-api") + (("c",) if shutil.which("cc") else ())
    cfg = _tiny(impls)
    outcome = harness.run_bench(cfg, run_id=map_name)
    doc = _document(outcome, tmp_path)

    assert set(doc) >= {"results", "skipped", "errors", "micro", "targets", "goals",
                        "machine", "config"}
    assert doc["errors"] == []
    for r in doc["results"]:
        assert set(r) >= ROW_KEYS, r
        assert r["impl"] in IMPL_NAMES and r["op"] in OP_NAMES
        assert r["ops_per_sec"] > 0 and r["ops"] > 0 and r["seconds"] > 0
        assert len(r["per_worker"]) == r["workers"]
        if r["impl"] == "lock":
            assert r["ratio_to_lock"] == pytest.approx(1.0)
        if r["hotplug"]:
            assert r["hotplug_events"] >= 0 and r["ram_final_bytes"] >= r["guest_bytes"]
    for s in doc["skipped"]:
        assert s["why"]
    # Every cell is either measured or skipped with a reason, never lost.
    measured = {_key(r) for r in doc["results"]}
    skipped = {_key(s) for s in doc["skipped"]}
    assert measured | skipped == _expected_cells(cfg)
    assert not measured & skipped
    # Every baseline measured every workload without hot-plug.
    for impl in impls:
        for op in OP_NAMES:
            assert (impl, op, OPS[op].patterns[0], 1, False) in measured
    # lock is the one baseline with a hot-plug variant.
    assert ("lock", "set_dirty_flag", None, 2, True) in measured
    assert harness.leftover_segments(harness.run_prefix(map_name)) == []


def test_shmdirty_rows_are_measured_or_skipped_with_a_note(map_name: str,
                                                            tmp_path: Any) -> None:
    cfg = _tiny(("shmdirty-memb", "shmdirty-qsbr"),
                ops=("set_dirty_flag", "sync_dirty_bitmap"), workers=(1,))
    outcome = harness.run_bench(cfg, run_id=map_name)
    doc = _document(outcome, tmp_path)

    assert doc["errors"] == []
    measured = {_key(r) for r in doc["results"]}
    skipped = {_key(s) for s in doc["skipped"]}
    assert measured | skipped == _expected_cells(cfg)
    if skipped:  # shmdirty.dirty not importable yet: every row says so
        assert not measured
        assert all("shmdirty" in s["why"] for s in doc["skipped"])
    else:
        assert all(r["ops_per_sec"] > 0 for r in doc["results"])
    assert harness.leftover_segments(harness.run_prefix(map_name)) == []


def test_atomic_micro_reports_the_fast_over_public_ratio(map_name: str) -> None:
    rows = micro.atomic_micro(harness.run_prefix(map_name), quick=True)
    keys = {r["key"] for r in rows}
    kernel = {"kernel"} if "kernel" in atomic.available() else set()
    assert keys == {"fast", "fast_checked", "public", "lock"} | kernel
    assert all(r["ns_per_op"] > 0 for r in rows)
    assert micro.fast_over_public(rows) is not None
    assert harness.leftover_segments(harness.run_prefix(map_name)) == []


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failing_worker_is_reported_and_leaves_no_segment(map_name: str, monkeypatch: Any,
                                                            how: str) -> None:
    """A worker that raises (or dies) in one cell makes that cell an error
    row; the run goes on (with a fresh pool after a death) and removes every
    segment.  The failure is injected through an environment variable the
    spawned workers inherit."""
    monkeypatch.setenv("SHMDIRTY_PERF_FAIL", "lock:get_dirty" + (":exit" if how == "exit" else ""))
    cfg = _tiny(("lock",), ops=("get_dirty", "set_dirty_flag"), workers=(2,))
    outcome = harness.run_bench(cfg, run_id=map_name)
    assert {(e["op"], e["hotplug"]) for e in outcome.errors} == {("get_dirty", False),
                                                                 ("get_dirty", True)}
    if how == "raise":
        assert all("injected" in e["error"] for e in outcome.errors)
    else:
        assert all("died" in e["error"] for e in outcome.errors)
    assert {(r["op"], r["hotplug"]) for r in outcome.results} == {("set_dirty_flag", False),
                                                                  ("set_dirty_flag", True)}
    assert harness.leftover_segments(harness.run_prefix(map_name)) == []


def test_shmdirty_sync_rows_model_a_coordinator_migrator(map_name: str, tmp_path: Any) -> None:
    """sync_dirty_bitmap cells of shmdirty hand the coordinator role to
    worker 0 (the migrator), which then takes whole blocks by swap (a new
    table per call) with the library's default threshold; with 2 workers the
    other is an uncounted writer; in the hot-plug variant the migrator does
    the hot-adds; the parent takes the map back and destroys it."""
    from shmdirty.dirty import SWAP_MIN_WORDS

    cfg = harness.BenchConfig(impls=("shmdirty-memb", "shmdirty-qsbr"),
                              ops=("sync_dirty_bitmap",), workers=(1, 2),
                              hotplug=(False, True), duration=0.02,
                              guest_bytes=16 * GIB,  # a whole bitmap block per worker
                              hotplug_step=GIB // 4, micro=False)
    outcome = harness.run_bench(cfg, run_id=map_name)
    doc = _document(outcome, tmp_path)
    assert doc["errors"] == []
    assert {_key(r) for r in doc["results"]} == _expected_cells(cfg)
    for r in doc["results"]:
        roles = [w["role"] for w in r["per_worker"]]
        assert roles == ["migrator"] + ["writer"] * (r["workers"] - 1), r
        mig = r["per_worker"][0]
        assert mig["swap_min_words"] == SWAP_MIN_WORDS
        # One table published per timed sync: the swap path ran every time.
        assert mig["generations_in_timed_syncs"] == mig["ops"] > 0
        assert mig["generation_end"] > mig["generation_start"]
        assert r["ops"] == mig["ops"] and r["seconds"] == mig["seconds"]
        if r["workers"] > 1:
            assert r["counted_workers"] == 1
            assert all(w["ops"] > 0 and not w["counted"] for w in r["per_worker"][1:])
        if r["hotplug"]:
            assert r["hotplug_by"] == "worker" and r["hotplug_events"] >= 1
            assert r["ram_final_bytes"] > r["guest_bytes"]
    assert harness.leftover_segments(harness.run_prefix(map_name)) == []


def test_rcu_micro_reports_sections_quiescent_and_grace_periods(map_name: str) -> None:
    cfg = harness.BenchConfig(duration=0.05, guest_bytes=1 * GIB, quick=True)
    pools = harness.Pools()
    try:
        rows, note = micro.rcu_micro(cfg, pools, map_name)
    finally:
        pools.close()
    assert note is None
    assert not [r for r in rows if "error" in r], rows
    keys = {r["key"] for r in rows}
    assert {"lock_unlock", "section", "qs_raw", "qs", "raw"} <= keys
    gp = {"gp_memb_0", "gp_memb_1", "gp_memb_2", "gp_qsbr_1", "gp_qsbr_2"}
    assert gp | {f"{k}_every5ms" for k in gp} <= keys
    assert micro.section_over_raw(rows) is not None
    for r in rows:
        if "median_us" in r:
            assert r["samples"] > 0 and r["ns_per_update"] > 0
            assert (r["ns_per_read"] is None) == (r["readers"] == 0)
    assert harness.leftover_segments(harness.run_prefix(map_name)) == []


def test_issue_11_goals_are_computed_from_the_rows() -> None:
    """Best flavor over lock, c's time over ours, hot-add cost; a goal whose
    rows are missing is None (not met, not failed)."""
    def row(impl: str, op: str, ops: float, workers: int = 1, hotplug: bool = False,
            pattern: str | None = None) -> dict[str, Any]:
        return {"impl": impl, "op": op, "workers": workers, "hotplug": hotplug,
                "pattern": pattern, "ops_per_sec": ops}

    doc = {"results": [
        row("shmdirty-memb", "set_dirty_flag", 2e6), row("shmdirty-qsbr", "set_dirty_flag", 4e6),
        row("lock", "set_dirty_flag", 1e6), row("shmdirty-memb", "set_dirty_flag", 1.9e6,
                                                hotplug=True),
        row("shmdirty-qsbr", "set_dirty_lebitmap", 800, pattern="sparse"),
        row("c", "set_dirty_lebitmap", 1000, pattern="sparse"),
    ]}
    got = {g["goal"]: g for g in report.goals(doc)}
    flag = got["set_dirty_flag, 1 worker / lock"]
    assert flag["value"] == 4.0 and flag["met"] is True
    memb = got["set_dirty_flag, memb, 1 worker / lock"]
    assert memb["value"] == 2.0 and memb["met"] is True
    le = got["set_dirty_lebitmap sparse, 1 worker: time per call / c's time"]
    assert le["value"] == pytest.approx(1.25) and le["met"] is True and le["unit"] == "x c's time"
    hot = got["shmdirty-memb set_dirty_flag, 1 worker: a hot-add every 10 ms costs"]
    assert hot["value"] == pytest.approx(0.05) and hot["met"] is True
    assert got["set_dirty_flag, 2 workers / lock"]["met"] is None
