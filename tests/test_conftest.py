"""The suite's own guarantees (tests/conftest.py): spawn, per-test cleanup,
and a session-wide leak check that really fails a run."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from shmdirty import layout, segment
from shmdirty.segment import Segment

HERE = Path(__file__).resolve().parent


def test_start_method_is_spawn(spawn_ctx: Any) -> None:
    assert mp.get_start_method() == "spawn"
    assert spawn_ctx.get_start_method() == "spawn"


def test_unlink_map_takes_exactly_one_map(map_name: str, leak_check: Any) -> None:
    neighbour = map_name + "x"  # its names start with ours, minus the dash
    names = [layout.header_name(map_name), layout.block_name(map_name, 0),
             layout.header_name(neighbour)]
    for n in names:
        Segment.create(n, 64, layout.KIND_BLOCK).close()
    try:
        assert sorted(leak_check.unlink_map(map_name)) == sorted(names[:2])
        assert segment.list_segments(map_name) == []
        assert segment.list_segments(neighbour) == [names[2]]
    finally:
        segment.unlink(names[2])


def test_leak_check_finds_and_removes_a_leftover(map_name: str, leak_check: Any) -> None:
    assert map_name.startswith(leak_check.token)
    mine = f"shmdirty-{map_name}-leftover"             # a map this session named
    stray = f"shmdirty-{segment.new_map_name()}-hdr"  # a map named elsewhere
    for n in (mine, stray):
        Segment.create(n, 64, layout.KIND_BLOCK).close()
    try:
        before = leak_check.entries() - {mine, stray}  # as if the session began just now
        # alone on the machine: every new unmapped entry is a leak
        leaks, unsure = leak_check.classify(before)
        assert {mine, stray} <= set(leaks) and unsure == []
        # another session ran meanwhile: only what this session named is surely ours
        leaks, unsure = leak_check.classify(before, token=leak_check.token)
        assert mine in leaks and stray not in leaks and stray in unsure
        leaks, unsure = leak_check.reap(before, token=leak_check.token)
        assert mine in leaks
        assert not os.path.exists(f"/dev/shm/{mine}")
        assert os.path.exists(f"/dev/shm/{stray}")  # unsure ones are left alone
        assert mine not in leak_check.classify(before)[0]
    finally:
        segment.unlink(stray)


@pytest.mark.timeout(60)
def test_leak_check_spares_segments_another_session_maps(
    map_name: str, leak_check: Any
) -> None:
    """A segment a live process outside the session maps is not our leak,
    nor is any other segment of the same map (an old table, say)."""
    seg = Segment.create(f"shmdirty-{map_name}-theirs", 64, layout.KIND_BLOCK)
    seg.close()
    sibling = f"shmdirty-{map_name}-t9"
    Segment.create(sibling, 64, layout.KIND_TABLE).close()
    script = textwrap.dedent(f"""
        import mmap, os, sys
        fd = os.open("/dev/shm/{seg.name}", os.O_RDWR)
        m = mmap.mmap(fd, 64)
        os.close(fd)
        print("mapped", flush=True)
        sys.stdin.read()
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline() == "mapped\n"
            before = leak_check.entries() - {seg.name, sibling}
            assert leak_check.mappers([seg.name, sibling]) == {seg.name: {holder.pid},
                                                               sibling: set()}
            # seen from a session that does not own the holder: someone else's
            found = sum(leak_check.classify(before, ours={os.getpid()}), [])
            assert seg.name not in found and sibling not in found
            # seen from this session, which started the holder: ours, so leaks
            assert {seg.name, sibling} <= set(leak_check.classify(before)[0])
            holder.stdin.close()
            assert holder.wait(30) == 0
            found = leak_check.classify(before, ours={os.getpid()})[0]
            assert {seg.name, sibling} <= set(found)
        finally:
            if holder.poll() is None:
                holder.kill()


def test_sessions_see_each_other(tmp_path: Path, leak_check: Any) -> None:
    since = time.time()
    me = leak_check.register(tmp_path, "aaaa")
    assert leak_check.overlapping(me, since) == []
    # a live session without an end time, one that ended after we started,
    # one that ended long before, one long dead that never said so
    (tmp_path / f"bbbb.{os.getpid()}").write_text(f"{since - 5}\n")
    (tmp_path / "cccc.1").write_text(f"{since - 50}\n{since + 0.001}\n")
    old = tmp_path / "dddd.1"
    old.write_text(f"{since - 3 * 86400}\n{since - 2 * 86400}\n")
    dead = tmp_path / f"eeee.{_dead_pid()}"
    dead.write_text(f"{since - 3 * 86400}\n")
    assert sorted(leak_check.overlapping(me, since)) == ["bbbb." + str(os.getpid()), "cccc.1"]
    assert not old.exists() and not dead.exists()  # pruned
    leak_check.end(me)
    assert len(me.read_text().split()) == 2


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.timeout(90)
def test_session_check_fails_a_leaky_run(map_name: str, tmp_path: Path) -> None:
    """An inner pytest run with this conftest, while (as far as it can tell)
    another session runs: a failing test's segments are still cleaned by its
    fixture; a leak in a map it named fails the run and is removed; a new
    segment it cannot attribute is only warned about, and left."""
    registry = tmp_path / "registry"
    registry.mkdir()
    # this test's own process stands in for the other, concurrent session
    (registry / f"ffff.{os.getpid()}").write_text(f"{time.time()!r}\n")
    stray = f"shmdirty-{map_name}-stray"  # our token, not the inner session's
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text((HERE / "conftest.py").read_text())
    (inner / "test_leaky.py").write_text(textwrap.dedent(f"""
        from shmdirty import layout
        from shmdirty.segment import Segment

        def test_fails_after_making_a_segment(map_name):
            Segment.create(layout.header_name(map_name), 64, layout.KIND_HEADER)
            print("FAILING-MAP", map_name)
            assert False, "on purpose"

        def test_leaks(map_name):
            # a map this session named, but not through the fixture's cleanup
            Segment.create(f"shmdirty-{{map_name}}x-leaked", 64, layout.KIND_BLOCK).close()
            print("LEAKED", f"shmdirty-{{map_name}}x-leaked")
            Segment.create({stray!r}, 64, layout.KIND_BLOCK).close()
    """))
    env = {**os.environ, "SHMDIRTY_TEST_SESSIONS": str(registry)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
         "--rootdir", str(inner), str(inner)],
        capture_output=True, text=True, timeout=80, cwd=inner, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "1 failed" in out and "1 passed" in out and "1 error" in out, out
    leaked = out.split("LEAKED ", 1)[1].split()[0]
    assert f"left 1 shmdirty segment(s) in /dev/shm (now removed): {leaked}" in out, out
    assert not os.path.exists(f"/dev/shm/{leaked}")
    failing_map = out.split("FAILING-MAP ", 1)[1].split()[0]
    assert segment.list_segments(failing_map) == []
    # the unattributable one: warned about, left for its owner (our fixture)
    assert "may be theirs" in out and stray in out, out
    assert os.path.exists(f"/dev/shm/{stray}")
    # the inner session registered itself, and recorded its end
    (inner_file,) = [f for f in registry.iterdir() if not f.name.startswith("ffff.")]
    assert len(inner_file.read_text().split()) == 2
