"""A partition, as links really fail: source and destination in two network
namespaces this test creates, joined by a veth pair (addresses assigned
inside them only); the link is taken down while the receiver stands at a
stage (``workers.pause``), then the receiver goes on.  Before the commit
the source guest resumes (exit 4); after it the guest is the
destination's (exit 8) and the receiver runs it to its end (exit 0).
Skipped without iproute2, CAP_NET_ADMIN or /dev/kvm."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvm_skip import needs_kvm
from test_handover import SMALL, PausedRun  # the same run, its receiver stopped at a stage

from shmdirty import segment
from shmdirty.workers import pause

CLI = [sys.executable, "-m", "shmdirty.workers.cli"]


def _can_make_namespaces() -> tuple[bool, str]:
    if not shutil.which("ip"):
        return False, "needs iproute2 (ip)"
    name = f"shmdprobe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode:
        return False, f"needs CAP_NET_ADMIN to make a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True, ""


NETNS_OK, NETNS_WHY = _can_make_namespaces()
pytestmark = [needs_kvm, pytest.mark.timeout(150),
              pytest.mark.skipif(not NETNS_OK, reason=NETNS_WHY)]


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


@pytest.fixture
def link() -> Iterator[tuple[str, str, str]]:
    """(source namespace, destination namespace, source's link): 10.218.0.1 <-> .2."""
    tag = secrets.token_hex(3)
    src, dst, va, vb = f"shmds{tag}", f"shmdd{tag}", f"va{tag}", f"vb{tag}"
    sh("ip", "netns", "add", src)
    try:
        sh("ip", "netns", "add", dst)
        sh("ip", "-n", src, "link", "add", va, "type", "veth", "peer", "name", vb, "netns", dst)
        for ns, dev, addr in ((src, va, "10.218.0.1/24"), (dst, vb, "10.218.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield src, dst, va
    finally:
        subprocess.run(["ip", "netns", "del", dst], capture_output=True)
        subprocess.run(["ip", "netns", "del", src], capture_output=True)


@pytest.mark.parametrize(("stage", "code", "guest_on"),
                         [("precopy", 4, "source"), ("end", 4, "source"),
                          ("running", 8, "destination")])
def test_a_partition_at_each_stage(link: tuple[str, str, str], map_name: str, tmp_path: Path,
                                   stage: str, code: int, guest_on: str) -> None:
    src, dst, dev = link
    os.mkfifo(tmp_path / "reached")
    os.mkfifo(tmp_path / "go")
    rjs, js = tmp_path / "recv.json", tmp_path / "r.json"
    env = dict(os.environ, **{pause.ENV: f"{stage}:{tmp_path}"})
    rx = subprocess.Popen(["ip", "netns", "exec", dst, *CLI, "receive", "--listen",
                           "10.218.0.2:4444", "--insecure", "--once", "--peer-timeout", "2",
                           "--json", str(rjs)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert rx.stdout is not None
    line = rx.stdout.readline()          # "receive: listening on ..." (bounded: pytest timeout)
    assert "listening on" in line, line
    run = PausedRun.__new__(PausedRun)    # the source: migrate in its namespace
    run.map_name, run.tmp, run.json = map_name, tmp_path, js
    run.proc = subprocess.Popen(
        ["ip", "netns", "exec", src, *CLI, "migrate", "--name", map_name, *SMALL,
         "--to", "10.218.0.2:4444", "--json", str(js)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        run.reached()
        sh("ip", "-n", src, "link", "set", dev, "down")      # the partition, for good
        fd = os.open(tmp_path / "go", os.O_WRONLY | os.O_NONBLOCK)  # the receiver goes on
        os.close(fd)
        got, out, res = run.finish()
        assert got == code, out
        assert res["exit_code"] == code and res["guest_on"] == guest_on, out
        if guest_on == "source":
            assert res["source_ok"] is True, out
        rcode = rx.wait(timeout=60)
        rres = json.loads(rjs.read_text()) if rjs.exists() else {}
        if guest_on == "destination":   # the guest was the receiver's: it ran to its end
            assert rcode == 0 and rres.get("resumed") is True
        else:
            assert rcode != 0
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait(10)
        run.cleanup()
        assert segment.list_segments(f"{map_name}_dst") == []
