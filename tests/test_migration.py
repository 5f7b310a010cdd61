"""workers/migration.py, the one orchestration of a run, with a fake guest
kind: a process that fails fails the run (named, with its exit code or its
traceback), a process that does not leave when told is signalled, and
whatever happens the map is removed and ``RunError`` says how much."""

from __future__ import annotations

import time
from typing import Any

import migration_workers as mw
import pytest

from shmdirty import DirtyMemory, segment
from shmdirty.workers import migration
from shmdirty.workers.lifecycle import Failed, TimedOut
from shmdirty.workers.reports import Report

pytestmark = pytest.mark.timeout(60)


class FakeKind:
    """A guest kind with one process, ``w0``, and no receiver."""

    name = "fake"
    poll = 0.01
    join_timeout = 0.5
    watched: frozenset[str] | None = None

    def __init__(self, map_name: str, target: Any, *args: Any, timeout: float = 20) -> None:
        self.map_name, self.target, self.args = map_name, target, args
        self.timeout, self.to = timeout, ("127.0.0.1", 9)   # a destination elsewhere
        self.dm: DirtyMemory | None = None
        self.destroyed = False

    def prepare(self, run: migration.Migration) -> str:
        self.dm = DirtyMemory.create(1 << 20, block_pages=64, name=self.map_name)
        return self.dm.name

    def start(self, run: migration.Migration) -> None:
        pass

    def spawn(self, run: migration.Migration, host: str, port: int) -> None:
        run.start("w0", self.target, *self.args)

    def go(self, run: migration.Migration) -> None:
        pass

    def serve(self) -> None:
        pass

    def on_report(self, run: migration.Migration, role: str, report: Report) -> None:
        pass

    def finished(self, run: migration.Migration) -> bool:
        return False            # only a failure ends this run

    def result(self, run: migration.Migration, t_begin: float) -> dict[str, Any]:
        raise AssertionError("never reached")

    def abort(self) -> None:
        pass

    def destroy(self) -> None:
        self.destroyed = True
        if self.dm is not None:
            self.dm.destroy()


def _run(kind: FakeKind) -> tuple[Exception, list[str]]:
    events: list[str] = []
    with pytest.raises((Failed, TimedOut)) as ei:
        migration.run(kind, lambda ev: events.append(type(ev).__name__))
    return ei.value, events


def test_a_process_that_exits_badly_fails_the_run_and_the_map_goes(map_name: str) -> None:
    kind = FakeKind(map_name, mw.exits, 3)
    e, events = _run(kind)
    assert "worker w0 (pid" in str(e) and "exited with code 3" in str(e)
    assert events == ["Ready"]                  # its reports reached on_event
    assert e.map_name == map_name and e.removed > 0   # type: ignore[attr-defined]
    assert kind.destroyed and segment.list_segments(map_name) == []


def test_a_failure_report_carries_the_traceback(map_name: str) -> None:
    e, _ = _run(FakeKind(map_name, mw.fails))
    assert str(e).startswith("worker w0 failed:") and "boom" in str(e)
    assert segment.list_segments(map_name) == []


def test_a_process_that_does_not_leave_is_signalled(map_name: str) -> None:
    kind = FakeKind(map_name, mw.hangs, timeout=1.0)
    t0 = time.monotonic()
    e, _ = _run(kind)
    assert isinstance(e, TimedOut) and "--timeout 1 s" in str(e)
    # the run's second, then join_timeout, then SIGTERM: well under a few seconds
    assert time.monotonic() - t0 < 10
    assert segment.list_segments(map_name) == []
