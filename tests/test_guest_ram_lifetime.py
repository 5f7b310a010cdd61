"""Guest RAM cannot outlive its processes (issue 18 item 8).

kill -9 one process of a ``shmdirty migrate`` run (either guest) in
pre-copy: the migrate parent, the loopback receiver, the migrator, the VM
owner / the simulated vCPU, the dataplane; or a standalone ``shmdirty
receive``.  Afterwards no guest RAM of either side is left: none in
/dev/shm, and no process holds it (no memfd of the run in any
``/proc/<pid>/fd``).  What a killed coordinator leaves (its map's header,
tables and bitmap blocks) is collected by ``shmdirty gc`` (here the same
per-map ``collect`` it runs) and by the next ``migrate`` / ``receive``.

Roles are told apart from outside, the same way on any version of the
code: the receiver maps the destination map's RAM, the VM owner is the
source map's coordinator, the migrator holds the TCP connection.  The kill
happens at one stage: pre-copy underway (the receiver has mapped RAM and
the migrator is connected).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import shm_entries, unlink_map
from kvm_skip import needs_kvm

from shmdirty import layout, maps, segment
from shmdirty.workers import app

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "shmdirty.workers.cli"]
# Slow streams: the bulk round takes seconds, so the kill lands in pre-copy.
SIM = ["--guest", "sim", "--ram", "16M", "--bandwidth", "4", "--block-pages", "1024",
       "--hotplug", "0:4M", "--timeout", "60"]
KVM = ["--guest", "kvm", "--ram", "16M", "--steps", "4000", "--hotplug", "1:8M",
       "--threshold", "256", "--block-pages", "1024", "--bandwidth", "2", "--timeout", "60"]
STAGE_TIMEOUT = 40.0     # seconds to reach pre-copy (process start-up under load)
EXIT_TIMEOUT = 40.0      # seconds for the rest of the run to end after the kill


def _ram_re(map_names: list[str]) -> re.Pattern[str]:
    alts = "|".join(re.escape(n) for n in map_names)
    return re.compile(rf"shmdirty-(?:{alts})-(?:ram|dst)\d+")


def ram_in_shm(map_names: list[str]) -> list[str]:
    """Guest RAM segments of these maps with a name in /dev/shm."""
    pat = _ram_re(map_names)
    return sorted(n for n in shm_entries() if pat.fullmatch(n))


def ram_holders(map_names: list[str]) -> dict[int, list[str]]:
    """Live processes that map or hold (an fd) guest RAM of these maps, by
    any means: a /dev/shm name or a memfd."""
    pat = _ram_re(map_names)
    found: dict[int, list[str]] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/maps") as f:
                hits = set(pat.findall(f.read()))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    hits.update(pat.findall(os.readlink(f"/proc/{pid}/fd/{fd}")))
                except OSError:
                    continue
        except OSError:
            continue
        if hits:
            found[pid] = sorted(hits)
    return found


def _maps_ram(pid: int, map_name: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f"shmdirty-{map_name}-ram0" in f.read()
    except OSError:
        return False


def _tcp(p: psutil.Process) -> bool:
    try:
        return any(c.status == psutil.CONN_ESTABLISHED for c in p.net_connections("tcp"))
    except psutil.Error:
        return False


def _roles(parent: int, map_name: str, dst: str) -> dict[str, int] | None:
    """role -> pid once pre-copy is underway, else None."""
    kids = psutil.Process(parent).children()
    receiver = [k.pid for k in kids if _maps_ram(k.pid, dst)]
    if not receiver:
        return None
    others = [k for k in kids if k.pid != receiver[0]]
    migrator = [k.pid for k in others if _tcp(k)]
    if not migrator:
        return None
    roles = {"parent": parent, "receiver": receiver[0], "migrator": migrator[0]}
    owner = maps.map_status(map_name).coordinator_pid
    rest = [k.pid for k in others if k.pid not in (migrator[0], owner)
            and _maps_ram(k.pid, map_name)]
    if owner != parent:                       # the KVM guest: the VM owner is the coordinator
        roles["owner"] = owner
        if rest:
            roles["dataplane"] = rest[0]
    elif rest:
        roles["vcpu"] = rest[0]               # the simulated guest: a vCPU (or hot-plug) worker
    return roles


def _wait_roles(proc: subprocess.Popen[bytes], map_name: str, dst: str, out: Path,
                want: str) -> dict[str, int]:
    end = time.monotonic() + STAGE_TIMEOUT
    while time.monotonic() < end:
        assert proc.poll() is None, f"the run ended before pre-copy:\n{out.read_text()}"
        roles = _roles(proc.pid, map_name, dst)
        if roles is not None and want in roles:
            return roles
        time.sleep(0.05)   # polling an outside observation: the run gives no signal
    pytest.fail(f"pre-copy never started with a {want}:\n{out.read_text()}")


@pytest.fixture
def run_names(map_name: str) -> Iterator[list[str]]:
    names = [map_name, f"{map_name}_dst"]
    try:
        yield names
    finally:
        for n in names:
            unlink_map(n)


def _kill_and_check(argv: list[str], victim: str, names: list[str], tmp_path: Path) -> None:
    map_name, dst = names
    out = tmp_path / "out.txt"
    with out.open("wb") as f:
        proc = subprocess.Popen([*CLI, "migrate", "--name", map_name, *argv],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        roles = _wait_roles(proc, map_name, dst, out, victim)
        family = [psutil.Process(p) for p in roles.values() if p != proc.pid]
        os.kill(roles[victim], signal.SIGKILL)
        proc.wait(EXIT_TIMEOUT)
        # Whatever the run's own verdict, every process of it ends.
        _, alive = psutil.wait_procs(family, timeout=EXIT_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = out.read_text()
    assert ram_in_shm(names) == [], f"kill -9 {victim} left guest RAM in /dev/shm\n{log}"
    assert not alive, f"still running after kill -9 of the {victim}: {alive}"
    assert ram_holders(names) == {}, f"kill -9 {victim}: guest RAM still held\n{log}"
    assert "Traceback" not in log, log
    for n in names:   # what is left is a dead map's bitmap: shmdirty gc collects it
        st, _ = maps.collect(n)
        assert st.state in ("dead", "absent"), (n, st.state, st.why)
        assert segment.list_segments(n) == []


@pytest.mark.parametrize("victim", ["parent", "receiver", "migrator", "vcpu"])
def test_kill_9_in_a_sim_run_leaves_no_guest_ram(victim: str, run_names: list[str],
                                                 tmp_path: Path) -> None:
    _kill_and_check(SIM, victim, run_names, tmp_path)


@needs_kvm
@pytest.mark.parametrize("victim", ["parent", "receiver", "migrator",
                                    "owner", "dataplane"])
def test_kill_9_in_a_kvm_run_leaves_no_guest_ram(victim: str, run_names: list[str],
                                                 tmp_path: Path) -> None:
    _kill_and_check(KVM, victim, run_names, tmp_path)


def test_a_killed_standalone_receiver_leaves_no_guest_ram(map_name: str,
                                                          tmp_path: Path) -> None:
    """``shmdirty receive`` killed in pre-copy: its RAM is gone with it, and
    the next ``receive``'s start-up collection removes its dead map."""
    rlog = tmp_path / "receive.txt"
    with rlog.open("wb") as f:
        recv = subprocess.Popen([*CLI, "receive", "--listen", "127.0.0.1:0"],
                                stdout=f, stderr=subprocess.STDOUT)
    mig = None
    dst = ""
    try:
        end = time.monotonic() + STAGE_TIMEOUT
        while not (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", rlog.read_text())):
            assert recv.poll() is None and time.monotonic() < end, rlog.read_text()
            time.sleep(0.05)
        mlog = tmp_path / "migrate.txt"
        with mlog.open("wb") as f:
            mig = subprocess.Popen([*CLI, "migrate", "--name", map_name, *SIM,
                                    "--to", f"127.0.0.1:{m.group(1)}"],
                                   stdout=f, stderr=subprocess.STDOUT)
        while not dst:
            assert time.monotonic() < end, rlog.read_text() + mlog.read_text()
            with open(f"/proc/{recv.pid}/maps") as fm:
                got = re.search(r"shmdirty-([0-9A-Za-z_]+)-ram0", fm.read())
            dst = got.group(1) if got else ""
            if not dst:
                time.sleep(0.05)
        recv.kill()
        recv.wait(10)
        assert mig.wait(EXIT_TIMEOUT) == 4, mlog.read_text()   # the destination was lost
        assert ram_in_shm([dst]) == [], "the killed receiver left its guest RAM in /dev/shm"
        assert ram_holders([dst]) == {}
        assert layout.header_name(dst) in segment.list_segments(dst)  # its dead map's bitmap
        assert maps.map_status(dst).state == "dead"
        assert dst in app.collect_dead_maps(min_age=0.0)
        assert segment.list_segments(dst) == []
    finally:
        for p in (recv, mig):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if dst:
            unlink_map(dst)


def _make_and_die(name: str) -> None:
    """A coordinator that dies without cleaning up (exits without destroy)."""
    import shmdirty as sd
    sd.DirtyMemory.create(64 * 4096, block_pages=64, name=name)
    os._exit(0)


def test_the_start_up_gc_removes_dead_maps_only_old_enough_and_never_live_ones(
        map_name: str) -> None:
    import multiprocessing as mp

    import shmdirty as sd
    dead = f"{map_name}d"
    p = mp.get_context("spawn").Process(target=_make_and_die, args=(dead,))
    p.start()
    p.join(30)
    try:
        with sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name):
            assert maps.map_status(dead).state == "dead"
            assert dead not in app.collect_dead_maps(min_age=3600.0)   # too young: kept
            assert segment.list_segments(dead)
            removed = app.collect_dead_maps(min_age=0.0)
            assert dead in removed and map_name not in removed
            assert segment.list_segments(dead) == []
            assert layout.header_name(map_name) in segment.list_segments(map_name)
    finally:
        unlink_map(dead)
