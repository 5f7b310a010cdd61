"""The handover's commit point and bounded waits (docs/STREAM.md, issue 18
items 1-3), as a user runs `shmdirty migrate --guest kvm`: the loopback
receiver is stopped at a named stage (``workers.pause``), then killed
(SIGKILL) or hung (SIGSTOP).  Each case asserts the exit code, which side
holds the guest (the JSON's ``guest``) and the guest's fate, never timings;
the JSON is written on every exit; nothing is left in /dev/shm."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from kvm_skip import KVM_OK, KVM_WHY

from shmdirty import segment
from shmdirty.workers import app, cli, pause

pytestmark = pytest.mark.timeout(150)

CLI = [sys.executable, "-m", "shmdirty.workers.cli"]
PEER_TIMEOUT = "2"
# Enough guest steps that the source guest is still running at the stage.
SMALL = ["--guest", "kvm", "--ram", "16M", "--steps", "20000", "--hotplug", "1:8M",
         "--threshold", "256", "--block-pages", "1024", "--timeout", "90",
         "--peer-timeout", PEER_TIMEOUT]
REACH_TIMEOUT = 60.0      # seconds for the receiver to reach the stage


class PausedRun:
    """`shmdirty migrate` whose receiver stops at ``stage``."""

    def __init__(self, map_name: str, tmp: Path, stage: str, *extra: str) -> None:
        assert stage in pause.STAGES
        self.map_name, self.tmp = map_name, tmp
        os.mkfifo(tmp / "reached")
        os.mkfifo(tmp / "go")
        self.json = tmp / "r.json"
        env = dict(os.environ, **{pause.ENV: f"{stage}:{tmp}"})
        self.proc = subprocess.Popen(
            [*CLI, "migrate", "--name", map_name, *SMALL, "--json", str(self.json), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)

    def reached(self) -> int:
        """The receiver's pid once it stands at the stage."""
        fd = os.open(self.tmp / "reached", os.O_RDONLY | os.O_NONBLOCK)
        try:
            end = time.monotonic() + REACH_TIMEOUT
            data = b""
            while not data.endswith(b"\n"):
                left = end - time.monotonic()
                assert left > 0 and self.proc.poll() is None, \
                    f"the receiver never reached the stage: {self.output()}"
                r, _, _ = select.select([fd], [], [], min(left, 1.0))
                if r:
                    data += os.read(fd, 64)
            return int(data.split()[1])
        finally:
            os.close(fd)

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stdout is not None
        return self.proc.stdout.read()

    def finish(self) -> tuple[int, str, dict[str, Any]]:
        code = self.proc.wait(timeout=120)
        out = self.output()
        res = json.loads(self.json.read_text()) if self.json.exists() else {}
        return code, out, res

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                p.kill()
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for name in (self.map_name, f"{self.map_name}_dst"):
            assert segment.list_segments(name) == [], f"segments of {name} left behind"


@pytest.fixture
def paused(map_name: str, tmp_path: Path) -> Iterator[Any]:
    if not KVM_OK:
        pytest.skip(f"needs a usable /dev/kvm: {KVM_WHY}")
    runs: list[PausedRun] = []

    def start(stage: str, *extra: str) -> PausedRun:
        runs.append(PausedRun(map_name, tmp_path, stage, *extra))
        return runs[-1]
    try:
        yield start
    finally:
        for r in runs:
            r.cleanup()


def kill_and_finish(run: PausedRun, sig: int) -> tuple[int, str, dict[str, Any]]:
    pid = run.reached()
    os.kill(pid, sig)
    try:
        return run.finish()
    finally:
        if sig == signal.SIGSTOP:    # a stopped receiver the run could not end
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_receiver_killed_between_digests_and_resume_the_source_guest_resumes(
        paused: Any) -> None:
    code, out, res = kill_and_finish(paused("digests"), signal.SIGKILL)
    assert code == 4, out
    assert res["exit_code"] == 4 and res["guest_on"] == "source", out
    assert res["source_ok"] is True, out     # the paused source guest ran on to the right end


def test_receiver_stopped_in_precopy_is_detected_the_source_guest_runs_on(paused: Any) -> None:
    code, out, res = kill_and_finish(paused("precopy"), signal.SIGSTOP)
    assert code == 4, out
    assert res["guest_on"] == "source" and res["source_ok"] is True, out
    assert "peer-timeout" in out


def test_receiver_stopped_at_the_switchover_resumes_the_source_not_exit_0(paused: Any) -> None:
    # everything loaded, LOADED not sent: the source waits with its guest paused
    code, out, res = kill_and_finish(paused("end"), signal.SIGSTOP)
    assert code == 4, out
    assert res["guest_on"] == "source" and res["source_ok"] is True, out
    assert "downtime" not in res or res.get("downtime_ms") is None, out


@pytest.mark.parametrize("stage", ["digests", "resumed"])
def test_receiver_stopped_once_resume_is_sent_the_fate_is_unknown(paused: Any,
                                                                  stage: str) -> None:
    # RESUME is sent (in its buffer, or read): it may run the guest when it goes on
    code, out, res = kill_and_finish(paused(stage), signal.SIGSTOP)
    assert code == 7, out
    # the source cannot know; the run killed its own loopback receiver: nowhere
    assert res["exit_code"] == 7 and res["guest_on"] == "none", out
    assert "killed by the run" in res["receiver"]
    assert "unknown" in out.lower()


def test_receiver_killed_after_the_commit_the_guest_was_on_the_destination(
        paused: Any) -> None:
    code, out, res = kill_and_finish(paused("running"), signal.SIGKILL)
    assert code == 8, out
    assert res["exit_code"] == 8 and res["guest_on"] == "destination", out
    assert "checksums ," not in out


def test_json_is_written_on_a_timeout(paused: Any) -> None:
    # the receiver hangs in pre-copy; the peer timeout is longer than the run's
    run = paused("precopy", "--timeout", "15", "--peer-timeout", "60")
    code, out, res = kill_and_finish(run, signal.SIGSTOP)
    assert code == 6, out
    assert res["exit_code"] == 6 and res["guest_on"] in ("none", "source"), out


def test_json_is_written_on_ctrl_c(paused: Any) -> None:
    run = paused("precopy", "--peer-timeout", "60")
    run.reached()
    run.proc.send_signal(signal.SIGINT)
    code, out, res = run.finish()
    assert code == 130, out
    assert res["exit_code"] == 130 and res["guest_on"] == "none", out


def test_json_is_written_when_a_worker_fails(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(cfg: Any, on_event: Any) -> dict[str, Any]:
        e = app.Failed("worker owner (pid 1) exited with code -9")
        e.map_name = "m"
        raise e
    monkeypatch.setattr(app, "run", failing)
    js = tmp_path / "r.json"
    assert cli.main(["migrate", "--guest", "sim", "--json", str(js)]) == 3
    res = json.loads(js.read_text())
    assert res["exit_code"] == 3 and res["guest_on"] == "none" and "owner" in res["error"]
