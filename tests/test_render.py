"""The command line's rendering (issue 13): the migration summary reads at
80 columns with no cell cut to an ellipsis, the progress line at the stop
says what stop-and-copy sends, and an unreachable --dirty-rate is reported.

The results are real ``--json`` outputs of ``shmdirty migrate --guest sim``
and ``--guest kvm`` (tests/data/), and a copy with every number grown.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from shmdirty.workers import app, render, reports

pytestmark = pytest.mark.timeout(30)

DATA = Path(__file__).resolve().parent / "data"


def _result(guest: str) -> dict[str, Any]:
    res: dict[str, Any] = json.loads((DATA / f"result_{guest}.json").read_text())
    return res


def _grown(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` with the widest numbers and notes a real run could show."""
    big = copy.deepcopy(res)
    for r in big["round_log"]:
        r.update(ram_size=(64 << 30) + (512 << 20), dirty=16_777_216, sent=16_777_216,
                 seconds=1234.56, dirty_rate=12_345_678.0, throughput=12345.6 * (1 << 20),
                 dropped=1_234_567)
    big["downtime"].update(pages=16_777_216, ram_size=64 << 30, seconds=123.456,
                           stop_wait=12.3, copy_seconds=1.0)
    big["hotplug"] = [{"size": 1536 << 20, "during": "pre-copy round 1", "t_done": 1234.5},
                      {"size": 1536 << 20, "during": "downtime", "t_done": 2345.6}]
    big["pages_sent"] = 1 << 34
    return big


def _render(res: dict[str, Any]) -> str:
    buf = io.StringIO()
    render.summary(res, Console(file=buf, width=80, color_system=None))
    return buf.getvalue()


def _check_80_columns(text: str) -> None:
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert not wide, wide
    assert "…" not in text, text  # no cell cut short


@pytest.mark.parametrize("guest", ["sim", "kvm"])
def test_summary_reads_at_80_columns(guest: str) -> None:
    text = _render(_result(guest))
    _check_80_columns(text)
    assert "downtime" in text and "identical" in text


@pytest.mark.parametrize("guest", ["sim", "kvm"])
def test_summary_with_the_widest_numbers_still_reads_at_80_columns(guest: str) -> None:
    text = _render(_grown(_result(guest)))
    _check_80_columns(text)
    for shown in ("16777216", "12,345,678", "1234.56 s", "12345.6", "64.5 GiB",
                  "DROPPED 1234567 pages"):
        assert shown in text.replace("\n", " ") or shown.split()[0] in text, shown


def test_the_stop_says_what_stop_and_copy_sends() -> None:
    buf = io.StringIO()
    cfg = SimpleNamespace(threshold=256, max_rounds=30)
    progress = render.Progress(cfg, Console(file=buf, width=80, color_system=None))
    progress(reports.Stopping(pending=0, reason="converged", t_stop=0.0))
    progress(reports.Downtime(pages=4321, ram_size=64 << 20))
    text = buf.getvalue()
    assert "stop-and-copy sends 4321 pages" in text, text
    assert "0 pages pending" not in text, text


def _stats(writes: int, seconds: float) -> list[reports.VcpuDone]:
    return [reports.VcpuDone(index=i, writes=writes, batches=1, seconds=seconds)
            for i in range(2)]


def test_an_unreachable_dirty_rate_is_reported() -> None:
    low = app.vcpu_rate(100_000, _stats(writes=500_000, seconds=10.0))
    assert low == {"requested": 100_000, "achieved": 50_000.0, "reached": False}
    ok = app.vcpu_rate(2000, _stats(writes=19_990, seconds=10.0))
    assert ok["reached"] and ok["achieved"] == pytest.approx(1999.0)

    res = _result("sim")
    res["vcpu_rate"] = low
    text = _render(res).replace("\n", " ")
    assert "NOT REACHED" in text and "50,000" in text and "100,000 requested" in text
    res["vcpu_rate"] = ok
    assert "NOT REACHED" not in _render(res)


def test_the_json_carries_requested_and_achieved_rate() -> None:
    vr = _result("sim")["vcpu_rate"]      # a real run's --json
    assert set(vr) == {"requested", "achieved", "reached"}
    assert vr["requested"] == 100_000 and not vr["reached"]


def test_progress_dispatches_on_the_report_classes() -> None:
    """Progress renders by the report's class (not its name): every class
    it handles is a report of workers.reports, a RoundEnd is not rendered as
    the RoundStart it extends, and a report it does not show is ignored."""
    kinds = {c for c in vars(reports).values() if isinstance(c, type)
             and c.__module__ == reports.__name__}
    assert set(render.Progress.HANDLERS) <= kinds
    assert {reports.Started, reports.GuestStarted, reports.RoundStart, reports.RoundEnd,
            reports.Sent, reports.Downtime, reports.Done} <= set(render.Progress.HANDLERS)
    buf = io.StringIO()
    cfg = SimpleNamespace(threshold=256, max_rounds=30)
    progress = render.Progress(cfg, Console(file=buf, width=80, color_system=None))
    progress(reports.Started("m", 64 << 20, 2, "flag", "uniform", 2000.0, 4))
    assert progress.progress is not None
    progress(reports.RoundStart(round=1, ram_size=64 << 20, dirty=10, newly_dirty=10,
                                dirty_rate=None, dropped=0, t_start=0.0))
    assert list(progress.tasks) == [1]
    progress(reports.RoundEnd(round=2, ram_size=64 << 20, dirty=5, newly_dirty=5,
                              dirty_rate=None, dropped=0, t_start=0.0, sent=5, seconds=0.1,
                              throughput=None))
    assert list(progress.tasks) == [1]       # no task for round 2: it was never started
    progress(reports.Ready("vcpu0"))         # not shown
    progress(reports.HandedOver((1, 2)))
    progress.close()
    assert "map m started: 64 MiB guest RAM" in buf.getvalue()
