"""A real KVM guest migrated over TCP between processes (workers.kvm_run):
identical at switchover and resumed to the model's end state; a dataplane
that forgets to mark, or a migrator that loses a round, is caught; a
destination killed during pre-copy fails the migration with its own exit
code while the source guest runs to the right end; nothing is left in /dev/shm."""

from __future__ import annotations

from typing import Any

import pytest

from shmdirty import segment
from workers import guest_kvm as g
from workers import kvm_run

from kvm_skip import needs_kvm

pytestmark = [needs_kvm, pytest.mark.timeout(180)]

MiB = 1 << 20


def migrate(map_name: str, **kw: Any) -> dict[str, Any]:
    guest = g.GuestConfig(ram=16 * MiB, pattern=kw.pop("pattern", "random"),
                          steps=kw.pop("steps", 400_000), dataplane_pages=64,
                          hotplug=((5_000, 8 * MiB),))
    events: list[str] = []
    cfg = kvm_run.KvmRunConfig(guest=guest, name=map_name, block_pages=1024, timeout=150,
                               threshold=kw.pop("threshold", 256), **kw)
    out = kvm_run.run(cfg, lambda kind, data: events.append(kind))
    out["events"] = events
    for name in (map_name, f"{map_name}_dst"):
        assert segment.list_segments(name) == [], f"segments of {name} left behind"
    return out


def test_migrates_identical_and_resumes_to_the_models_end(map_name: str) -> None:
    out = migrate(map_name)
    assert out["exit"] == 0, out.get("errors")
    assert out["identical"] and out["check"]["method"] == "bytes"
    assert out["resumed_ok"] is True
    assert out["hotadds"] and out["hotadds"][0]["size"] == 8 * MiB
    assert out["pages_sent"] >= (16 + 8) * MiB // 4096   # the bulk stage, at least
    assert out["rounds"] >= 1 and out["downtime_ms"] > 0
    assert "receiver.resumed" in out["events"]


def test_a_dataplane_that_forgets_to_mark_fails_verification(map_name: str) -> None:
    out = migrate(map_name, dataplane_forget=True, dataplane_rate=20_000)
    assert out["exit"] == 1
    assert out["identical"] is False
    first, pages = g.GuestConfig(ram=16 * MiB, dataplane_pages=64).dataplane_region()
    assert out["check"]["differ"]
    assert all(first <= p < first + pages for p in out["check"]["differ"])


def test_a_migrator_that_loses_a_round_fails_verification(map_name: str) -> None:
    out = migrate(map_name, drop_round=2, max_rounds=3, threshold=0)
    assert out["exit"] == 1 and out["identical"] is False


def test_a_killed_destination_fails_the_migration_not_the_guest(map_name: str) -> None:
    out = migrate(map_name, kill_destination_at=2, threshold=0)
    assert out["exit"] == kvm_run.EXIT_DESTINATION_LOST
    assert "destination" in out["events"][-1] or out["failure"]
    assert out["source_ok"] is True          # the source guest ran on to the right end
