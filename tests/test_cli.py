"""The command line: migrate end to end, its failure check, its clean-up on
SIGTERM / Ctrl-C, and inspect / ls / gc on live, killed and bogus maps.

``migrate`` runs as a subprocess (as a user runs it: its own signal
handlers, its own spawned workers); inspect / ls / gc run in-process
through ``main(argv)``, against maps made by spawned children.
"""

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

import shmdirty as sd
from shmdirty import atomic, layout, segment
from shmdirty.segment import Segment
from shmdirty.workers import app, cli

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
# A small migration: 4 MiB + a 2 MiB hot-add, bitmap blocks of 256 pages so
# both cross block edges; 8 MiB/s makes the bulk round last >= 0.5 s, so the
# hot-add at 0.05 s lands in pre-copy; 2 x 300 pages/s converges.
SMALL = ["--guest", "sim", "--ram", "4M", "--vcpus", "2", "--dirty-rate", "300",
         "--hotplug", "0.05:2M", "--bandwidth", "8", "--block-pages", "256", "--threshold", "32",
         "--max-rounds", "20", "--timeout", "45"]
SMALL_PAGES = (6 << 20) // PAGE


def _migrate(map_name: str, *extra: str, json_path: Path | None = None,
             timeout: float = 50) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    argv = [sys.executable, "-m", "shmdirty.workers.cli", "migrate", "--name", map_name, *SMALL,
            *extra]
    if json_path is not None:
        argv += ["--json", str(json_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    res = json.loads(json_path.read_text()) if json_path is not None and json_path.exists() \
        else {}
    return proc, res


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


# --- migrate ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["flag", "lebitmap"])
def test_migrate_end_to_end(map_name: str, tmp_path: Path, mode: str) -> None:
    proc, res = _migrate(map_name, "--dirty-mode", mode, json_path=tmp_path / "r.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert segment.list_segments(map_name) == []       # the CLI removed everything itself
    assert "source and destination are identical" in proc.stdout
    r = res["result"]
    assert r["identical"] and r["pages_differ"] == 0
    assert r["pages_compared"] == SMALL_PAGES           # the hot-added RAM was compared too
    # the vCPUs really wrote while pre-copy ran, so the check compared live data
    assert r["pages_written_by_vcpus"] > 0
    assert all(v["writes"] > 0 for v in res["vcpus"]) and len(res["vcpus"]) == 2
    assert [h["during"].startswith("pre-copy") for h in res["hotplug"]] == [True]
    assert res["round_log"][0]["sent"] == 1024             # the bulk round sent every page
    assert res["rounds"] >= 2
    assert res["downtime"]["ram_size"] == 6 << 20
    assert res["config"]["dirty_mode"] == mode and res["exit_code"] == 0
    assert "migration summary" in proc.stdout and "downtime" in proc.stdout


def test_migrate_that_never_converges_ends_identical_after_stop_and_copy(
        map_name: str, tmp_path: Path) -> None:
    # 2 x 3000 pages/s against 8 MiB/s (2048 pages/s): pre-copy cannot
    # converge, so the rounds run out and the final sync has real work.
    proc, res = _migrate(map_name, "--dirty-rate", "3000", "--max-rounds", "3",
                         "--pattern", "sequential", json_path=tmp_path / "r.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert segment.list_segments(map_name) == []
    assert res["end_of_precopy"] == "max rounds" and res["rounds"] == 3
    assert res["downtime"]["newly_dirty"] > 100 and res["downtime"]["pages"] > 100
    assert res["result"]["identical"] and res["result"]["pages_compared"] == SMALL_PAGES


def test_migrate_with_a_migrator_that_drops_a_round_fails(map_name: str, tmp_path: Path) -> None:
    proc, res = _migrate(map_name, "--drop-round", "1", json_path=tmp_path / "r.json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert segment.list_segments(map_name) == []
    r = res["result"]
    assert not r["identical"]
    # round 1 dropped every page of the RAM it saw (4 MiB, or 6 MiB when the
    # hot-add at 0.05 s landed before its sync on a busy machine)
    round1 = res["round_log"][0]
    assert round1["dropped"] == round1["ram_size"] // PAGE >= 1024 and round1["sent"] == 0
    # nearly all of the initial RAM was never sent: the vCPUs rewrote few pages
    assert r["pages_differ"] > 512
    first = r["first_differ"]
    assert first == sorted(first) and len(first) == app.FIRST_DIFFS
    assert all(0 <= p < SMALL_PAGES for p in first)
    assert "DIFFER" in proc.stdout
    assert "first: " + ", ".join(map(str, first)) in proc.stdout.replace("\n", "")


def test_migrate_without_the_kernel_warns_once_for_all_its_processes(
        map_name: str, tmp_path: Path) -> None:
    """As after `CC=/bin/false pip install .`: no process of the run can
    import shmdirty._kernel (a sitecustomize on PYTHONPATH hides it, in the
    spawned workers too).  The command warns once, in its own process, and
    its workers run on the backend it fell back to, without repeating it."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['shmdirty._kernel'] = None  # not built\n")
    env = {k: v for k, v in os.environ.items() if k != "SHMDIRTY_ATOMICS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "shmdirty.workers.cli", "migrate", "--name", map_name, *SMALL]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=50, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert segment.list_segments(map_name) == []
    assert "source and destination are identical" in proc.stdout
    warned = [line for line in proc.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warned) == 1, proc.stderr
    assert "compiled kernel is unavailable" in warned[0] and "cffi backend" in warned[0]


def _read_line_with(proc: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    """Read the child's stdout until a line contains ``needle``."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"no line with {needle!r} within {timeout} s: {lines}")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_stops_workers_and_removes_every_segment(
        map_name: str, sig: signal.Signals, code: int) -> None:
    # 16 MiB at 4 MiB/s: the bulk round alone takes 4 s, so the signal lands mid-run.
    argv = [sys.executable, "-m", "shmdirty.workers.cli", "migrate", "--guest", "sim",
            "--name", map_name,
            "--ram", "16M", "--bandwidth", "4", "--block-pages", "1024", "--hotplug", "0:4M",
            "--timeout", "45"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = _read_line_with(proc, f"map {map_name} started", 30)
        workers = psutil.Process(proc.pid).children()
        assert len([w for w in workers if w.is_running()]) >= 4  # 2 vCPUs, hotplug, migrator
        segs = segment.list_segments(map_name)
        # Guest RAM is a memfd (workers.memfd): only the bitmap has names here.
        assert layout.header_name(map_name) in segs
        assert not any(layout.role_of(n)[0] in ("ram", "dst") for n in segs)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, "".join(lines) + out
    assert f"interrupted by {sig.name}" in out
    assert segment.list_segments(map_name) == []
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []


def test_a_worker_killed_mid_run_fails_the_run_and_removes_everything(map_name: str) -> None:
    argv = [sys.executable, "-m", "shmdirty.workers.cli", "migrate", "--guest", "sim",
            "--name", map_name,
            "--ram", "16M", "--bandwidth", "4", "--block-pages", "1024", "--timeout", "45"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = _read_line_with(proc, f"map {map_name} started", 30)
        workers = [c for c in psutil.Process(proc.pid).children()
                   if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 5  # the receiver, 2 vCPUs, hotplug, migrator
        workers = workers[1:]     # in start order: the receiver first, then vcpu0
        workers[0].kill()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, "".join(lines) + out
    assert f"worker vcpu0 (pid {workers[0].pid}) exited with code -9" in out
    assert segment.list_segments(map_name) == []
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []


def test_workers_leave_when_the_coordinator_is_sigkilled(
        capsys: pytest.CaptureFixture[str], map_name: str) -> None:
    argv = [sys.executable, "-m", "shmdirty.workers.cli", "migrate", "--guest", "sim",
            "--name", map_name,
            "--ram", "16M", "--bandwidth", "4", "--block-pages", "1024", "--timeout", "45"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _read_line_with(proc, f"map {map_name} started", 30)
        workers = [c for c in psutil.Process(proc.pid).children()
                   if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 5  # the receiver, 2 vCPUs, hotplug, migrator
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    # Nobody will set their stop flag: they die with their parent.
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert alive == []
    # What is left is two dead maps' bitmaps (the workers die with the run:
    # PR_SET_PDEATHSIG), gc's job; no guest RAM (memfds went with them).
    # (The receiver makes its map at the stream's HELLO: maybe not yet.)
    assert cli.map_status(map_name).state == "dead"
    for name in (map_name, f"{map_name}_dst"):
        assert not [n for n in segment.list_segments(name) if "-ram" in n]
        if cli.map_status(name).state == "dead":
            code, out = _run(capsys, "gc", "--yes", name)
            assert code == 0 and "removed" in out
        assert segment.list_segments(name) == []


# --- maps made by spawned children, for inspect / ls / gc ----------------------------------------
RAM = 256 * PAGE         # 256 pages in bitmap blocks of 64 pages: 4 blocks per client
VGA_PAGES, MIGRATION_PAGES = 5, 3


def coordinator_child(name: str, ready: Any, leave: Any) -> None:
    """Create the map, leave a known dirty state, wait until told to leave
    (a pipe, not an Event: killing a process blocked on an Event would hang
    the Event's next set())."""
    dm = sd.DirtyMemory.create(RAM, block_pages=64, name=name)
    for c in range(sd.DIRTY_MEMORY_NUM):
        dm.test_and_clear_dirty(0, RAM, c)
    dm.set_dirty_range(0, VGA_PAGES * PAGE, 1 << sd.DIRTY_MEMORY_VGA)
    for p in (1, 70, 255):
        dm.set_dirty_flag(p * PAGE, sd.DIRTY_MEMORY_MIGRATION)
    ready.set()
    leave.poll(50)
    dm.destroy()


def reader_child(name: str, ready: Any, leave: Any) -> None:
    """Attach, and wait inside a read-side section."""
    dm = sd.DirtyMemory.attach(name)
    with dm.read_section():
        ready.set()
        leave.poll(50)
    dm.close()


@pytest.fixture
def live_map(map_name: str, spawn_ctx: Any, children: list[Any]) -> Iterator[dict[str, Any]]:
    """A map with a live coordinator and a live reader inside a section."""
    procs, tell = {}, []
    for role, target in (("coordinator", coordinator_child), ("reader", reader_child)):
        ready = spawn_ctx.Event()
        leave, send = spawn_ctx.Pipe(duplex=False)
        p = spawn_ctx.Process(target=target, args=(map_name, ready, leave))
        children.append(p)
        p.start()
        leave.close()
        tell.append(send)
        assert ready.wait(30), f"{role} child did not get ready"
        procs[role] = p

    def leave_all() -> None:
        for conn in tell:
            conn.close()  # the child's poll() sees end-of-file

    yield {"name": map_name, "leave": leave_all, **procs}
    leave_all()
    for p in procs.values():
        p.join(20)


def _slots(name: str) -> list[tuple[int, int, bool, int]]:
    return [tuple(r) for r in cli.map_status(name).readers]  # type: ignore[misc]


def _inspect_json(capsys: pytest.CaptureFixture[str], name: str) -> dict[str, Any]:
    code, out = _run(capsys, "inspect", name, "--json")
    assert code == 0, out
    info: dict[str, Any] = json.loads(out)
    return info


def _check_inspect(info: dict[str, Any], m: dict[str, Any], alive: bool) -> None:
    assert info["state"] == ("live" if alive else "dead")
    assert info["coordinator"] == {"pid": m["coordinator"].pid, "alive": alive}
    readers = {r["pid"]: r for r in info["readers"]}
    assert set(readers) == {m["coordinator"].pid, m["reader"].pid}  # not inspect's own slot
    assert all(r["alive"] is alive for r in readers.values())
    assert readers[m["reader"].pid]["epoch"] > 0          # inside its section
    assert readers[m["coordinator"].pid]["epoch"] == 0
    assert info["dirty_pages"] == {"VGA": VGA_PAGES, "CODE": 0, "MIGRATION": MIGRATION_PAGES}
    assert info["ram_size"] == RAM and info["ram_blocks"] == [[0, RAM]]
    assert info["bitmap_blocks"] == 4 and info["block_pages"] == 64


def test_inspect_ls_gc_on_a_live_map(capsys: pytest.CaptureFixture[str],
                                     live_map: dict[str, Any]) -> None:
    name = live_map["name"]
    segs, slots = segment.list_segments(name), _slots(name)
    _check_inspect(_inspect_json(capsys, name), live_map, alive=True)
    # inspect gave its slot back and touched nothing
    assert _slots(name) == slots and segment.list_segments(name) == segs
    code, out = _run(capsys, "inspect", name)
    assert code == 0 and "live" in out and f"pid {live_map['coordinator'].pid}, alive" in out
    assert "VGA 5, CODE 0, MIGRATION 3" in out

    code, out = _run(capsys, "ls")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    assert "live" in row and f"pid {live_map['coordinator'].pid}" in row and "2/2 alive" in row

    code, out = _run(capsys, "gc", "--yes", name)
    assert code == 0 and "live" in out and "left alone" in out
    assert segment.list_segments(name) == segs
    # the map still works for its owners: the reader leaves, the coordinator destroys it
    live_map["leave"]()
    live_map["reader"].join(20)
    live_map["coordinator"].join(20)
    assert live_map["coordinator"].exitcode == 0 and live_map["reader"].exitcode == 0
    assert segment.list_segments(name) == []


def test_inspect_ls_gc_on_a_map_whose_processes_were_all_sigkilled(
        capsys: pytest.CaptureFixture[str], live_map: dict[str, Any]) -> None:
    name = live_map["name"]
    for role in ("reader", "coordinator"):
        live_map[role].kill()
        live_map[role].join(20)
        assert live_map[role].exitcode == -signal.SIGKILL
    segs, slots = segment.list_segments(name), _slots(name)
    assert len(segs) == 1 + 1 + 3 * 4  # header, table, 4 blocks per client

    _check_inspect(_inspect_json(capsys, name), live_map, alive=False)
    code, out = _run(capsys, "inspect", name)
    assert code == 0 and "DEAD" in out
    # looking did not reclaim the dead slots, nor remove anything
    assert _slots(name) == slots and segment.list_segments(name) == segs

    code, out = _run(capsys, "ls")
    assert code == 0 and name not in out
    code, out = _run(capsys, "ls", "--all")
    assert code == 0 and f"{name} " in out and "dead" in out

    code, out = _run(capsys, "gc", name)
    assert code == 0
    assert all(s in out for s in segs) and "--yes" in out
    assert segment.list_segments(name) == segs           # listing removes nothing
    code, out = _run(capsys, "gc", "--yes", name)
    assert code == 0 and f"removed {len(segs)} segment(s)" in out
    assert segment.list_segments(name) == []


# --- things that are not maps --------------------------------------------------------------
def test_names_that_are_not_maps(capsys: pytest.CaptureFixture[str], map_name: str) -> None:
    code, out = _run(capsys, "inspect", map_name)
    assert code == 2 and "is not a map" in out
    code, out = _run(capsys, "inspect", "no such map!")
    assert code == 2 and "must be 1 to at most" in out
    code, out = _run(capsys, "gc", "--yes", map_name)
    assert code == 2 and "is not a map" in out
    code, out = _run(capsys, "ls", "--all")
    assert code == 0 and map_name not in out


def test_a_header_of_another_layout_version(capsys: pytest.CaptureFixture[str],
                                            map_name: str) -> None:
    hdr = Segment.create(layout.header_name(map_name), layout.header_size(4),
                         layout.KIND_HEADER)
    hdr.words.store(layout.P_VERSION, layout.LAYOUT_VERSION + 98, atomic.RELAXED)
    hdr.seal()
    hdr.close()
    code, out = _run(capsys, "inspect", map_name)
    assert code == 2
    assert f"layout version {layout.LAYOUT_VERSION + 98}" in out and "shmdirty-" in out
    code, out = _run(capsys, "gc", "--yes", map_name)
    assert code == 0 and "unreadable" in out and "left alone" in out
    assert segment.list_segments(map_name) == [layout.header_name(map_name)]
    code, out = _run(capsys, "ls", "--all")
    assert code == 0 and "unreadable" in out


def test_gc_of_leftovers_without_a_usable_header(capsys: pytest.CaptureFixture[str],
                                                 map_name: str) -> None:
    # a header whose creator died before sealing it, and a stray block
    Segment.create(layout.header_name(map_name), layout.header_size(4),
                   layout.KIND_HEADER).close()
    Segment.create(layout.block_name(map_name, 0), 4096, layout.KIND_BLOCK).close()
    # while this process maps one of them, it is somebody's work in progress
    held = Segment.create(f"shmdirty-{map_name}-b1", 4096, layout.KIND_BLOCK)
    try:
        code, out = _run(capsys, "gc", "--yes", map_name)
        assert code == 0 and "in use" in out and str(os.getpid()) in out
        assert len(segment.list_segments(map_name)) == 3
    finally:
        held.close()
    code, out = _run(capsys, "gc", "--yes", map_name)
    assert code == 0 and "never completed" in out and "removed 3 segment(s)" in out
    assert segment.list_segments(map_name) == []
