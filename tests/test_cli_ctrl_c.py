"""Ctrl-C in the first seconds of ``shmdirty migrate`` (issue 13): the
terminal sends SIGINT to the whole process group, workers still starting
included; only the one "interrupted" line shows, the exit code is 130 and
no segment of the run is left.

The test sends SIGINT to the process group of a migrate started in a
session of its own, once its first worker process exists (so workers are
still starting); a run whose workers do not hold SIGINT back while they
start (``lifecycle.sigint_held`` made a no-op) is shown to fail it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from kvm_skip import needs_kvm

from shmdirty import segment

pytestmark = pytest.mark.timeout(120)

SCRIPT = textwrap.dedent("""
    import contextlib, os, sys
    from shmdirty.workers import cli
    from shmdirty.workers import migration
    if os.environ.get("BREAK_SIGINT_HELD"):   # the deliberately broken variant
        migration.sigint_held = contextlib.nullcontext
    sys.exit(cli.main(sys.argv[1:]))
""")
SIM = ["--guest", "sim", "--ram", "4M", "--block-pages", "256", "--hotplug", "none",
       "--timeout", "60"]


def _importing(p: psutil.Process) -> bool:
    try:
        return ("spawn_main" in " ".join(p.cmdline())
                and any("numpy" in m.path for m in p.memory_maps()))
    except psutil.Error:        # gone, or not readable yet
        return False


def _ctrl_c_while_workers_start(map_name: str, argv: list[str],
                                broken: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"BREAK_SIGINT_HELD": "1"} if broken else {})}
    cmd = [sys.executable, "-c", SCRIPT, "migrate", "--name", map_name, *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        # Wait (polling the process table) for a spawned worker that is
        # importing: numpy mapped (the application imports it), so Python's
        # own SIGINT handler is in place (earlier, SIGINT's default action
        # ends the interpreter silently) and the worker's code not yet run.
        while not any(_importing(c) for c in me.children(recursive=True)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)            # what the terminal does on Ctrl-C
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _assert_only_interrupted(r: subprocess.CompletedProcess[str], map_name: str) -> None:
    assert r.returncode == 130, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "Fatal Python error" not in r.stderr, r.stderr
    assert "KeyboardInterrupt" not in r.stderr, r.stderr
    assert "interrupted by SIGINT" in r.stderr, r.stderr
    assert segment.list_segments(map_name) == []


def test_ctrl_c_while_sim_workers_start_says_only_interrupted(map_name: str) -> None:
    _assert_only_interrupted(_ctrl_c_while_workers_start(map_name, SIM), map_name)


@needs_kvm
def test_ctrl_c_while_kvm_workers_start_says_only_interrupted(map_name: str) -> None:
    _assert_only_interrupted(_ctrl_c_while_workers_start(map_name, ["--guest", "kvm"]),
                             map_name)


def test_workers_that_do_not_hold_sigint_while_starting_are_caught(map_name: str) -> None:
    r = _ctrl_c_while_workers_start(map_name, SIM, broken=True)
    assert "Traceback" in r.stderr or "Fatal Python error" in r.stderr, r.stderr
    assert segment.list_segments(map_name) == []
