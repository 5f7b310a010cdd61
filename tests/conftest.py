"""Suite-wide set-up: spawn start method, per-test map names, and the leak check.

Every test that makes segments should take ``map_name`` and name them
``shmdirty-<map_name>-<role>`` (``DirtyMemory.create(name=map_name)``); the
fixture's teardown unlinks whatever is left of that map, pass or fail.

On top of that a session-wide check looks, at the end of the run, at every
``/dev/shm/shmdirty*`` entry that was not there when the session started.
One of a map that a live process outside this session maps (any segment of
it) belongs to someone else.  Of the rest:

- if no other test session ran at any moment during this one (the usual
  case, and always so in CI), every one is a leak of ours: the run fails and
  they are removed;
- if another session did (several people testing on one machine), only the
  entries of maps named by this session's ``map_name`` fixture (they start
  with this session's token) or mapped by this session's processes are
  surely ours: those fail the run and are removed; the others are reported
  as a warning and left alone, since removing them could break the other run.

Sessions find each other through a small registry directory
(``$SHMDIRTY_TEST_SESSIONS``, default ``/tmp/shmdirty-test-sessions``): one
file per session holding its start and end times.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from shmdirty import atomic, segment

SHM_DIR = "/dev/shm"
SHM_PREFIX = "shmdirty"
REGISTRY_TTL = 24 * 3600  # registry files of sessions that ended longer ago are pruned


def pytest_configure(config: pytest.Config) -> None:
    # Workers are spawned, never forked: that is how shmdirty is used, and a
    # fork would share the parent's mappings and hide attach bugs.
    mp.set_start_method("spawn", force=True)


# The atomics backends the accessor suites run on (tests/test_atomic.py adds
# `public`, whose batch work is the same Python code as `cffi`'s).
SUITE_BACKENDS = ("kernel", "cffi")
AVAILABLE_BACKENDS = atomic.available()


def use_atomics_backend(name: str) -> str:
    """Switch this process to backend ``name`` (skip if unavailable); returns
    the one to switch back to."""
    if name not in AVAILABLE_BACKENDS:
        pytest.skip(f"the {name} atomics backend is not available here "
                    "(kernel: not compiled at install)")
    before = atomic.backend.name
    atomic.use_backend(name)
    return before


@pytest.fixture(params=SUITE_BACKENDS)
def atomics_backend(request: pytest.FixtureRequest,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test on one atomics backend, in this process and (through
    SHMDIRTY_ATOMICS) in the processes it spawns."""
    before = use_atomics_backend(request.param)
    monkeypatch.setenv("SHMDIRTY_ATOMICS", request.param)
    try:
        yield request.param
    finally:
        atomic.use_backend(before)


@pytest.fixture
def spawn_ctx() -> Any:
    """The multiprocessing context every multiprocess test uses."""
    return mp.get_context("spawn")


@pytest.fixture
def children() -> Iterator[list[Any]]:
    """Append started processes here; any still alive at teardown is killed."""
    procs: list[Any] = []
    yield procs
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)


# -- names ------------------------------------------------------------------------
def _registry() -> Path:
    return Path(os.environ.get("SHMDIRTY_TEST_SESSIONS")
                or Path(tempfile.gettempdir()) / "shmdirty-test-sessions")


def _new_token(registry: Path) -> str:
    taken = {f.name.split(".")[0] for f in registry.iterdir()} if registry.exists() else set()
    while (token := secrets.token_hex(2)) in taken:
        pass
    return token


TOKEN = _new_token(_registry())  # starts every map name this session hands out


def unlink_map(name: str) -> list[str]:
    """Unlink every ``shmdirty-<name>-*`` segment; return their names."""
    prefix = f"{SHM_PREFIX}-{name}-"
    return [e for e in sorted(shm_entries()) if e.startswith(prefix) and segment.unlink(e)]


@pytest.fixture
def map_name() -> Iterator[str]:
    """A fresh map name (12 hex digits, this session's token first); every
    ``shmdirty-<name>-*`` segment is unlinked at teardown."""
    name = TOKEN + secrets.token_hex(4)
    try:
        yield name
    finally:
        unlink_map(name)


# -- what is in /dev/shm, and whose ------------------------------------------------
def shm_entries() -> set[str]:
    """Every /dev/shm entry whose name starts with ``shmdirty``."""
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()


def session_pids() -> set[int]:
    """This process and all its descendants (spawned workers, trackers, CLIs)."""
    me = psutil.Process()
    return {me.pid} | {c.pid for c in me.children(recursive=True)}


def mappers(names: Iterable[str]) -> dict[str, set[int]]:
    """For each name, the pids of live processes that map /dev/shm/<name>."""
    paths = {f"{SHM_DIR}/{n}": n for n in names}
    found: dict[str, set[int]] = {n: set() for n in paths.values()}
    if not paths:
        return found
    for pid_dir in os.listdir("/proc"):
        if not pid_dir.isdigit():
            continue
        try:
            with open(f"/proc/{pid_dir}/maps") as f:
                for line in f:
                    i = line.find(SHM_DIR + "/")
                    if i < 0:
                        continue
                    path = line[i:].rstrip("\n").removesuffix(" (deleted)")
                    if path in paths:
                        found[paths[path]].add(int(pid_dir))
        except OSError:  # gone, or a kernel thread
            continue
    return found


def classify(
    before: set[str], *, ours: set[int] | None = None, token: str | None = None
) -> tuple[list[str], list[str]]:
    """(leaks, unsure) among the entries new since ``before``.

    An entry of a map of which a live process outside ``ours`` (default:
    this session's processes) maps any segment is someone else's: in neither
    list.  With ``token`` None every other entry is a leak; with a token only
    those whose map name starts with it, or that ``ours`` map, are; the rest
    are unsure."""
    ours = session_pids() if ours is None else ours
    mapped = mappers(shm_entries())

    def map_of(name: str) -> str:
        return segment.map_of(name) or name[len(SHM_PREFIX) + 1:]

    theirs = {map_of(n) for n, pids in mapped.items() if pids - ours}
    leaks, unsure = [], []
    for name in sorted(set(mapped) - before):
        if map_of(name) in theirs:
            continue
        if token is None or map_of(name).startswith(token) or mapped[name]:
            leaks.append(name)
        else:
            unsure.append(name)
    return leaks, unsure


def reap_leaks(
    before: set[str], *, ours: set[int] | None = None, token: str | None = None
) -> tuple[list[str], list[str]]:
    """``classify``, then unlink the leaks."""
    leaks, unsure = classify(before, ours=ours, token=token)
    for name in leaks:
        segment.unlink(name)
    return leaks, unsure


# -- who else was testing -------------------------------------------------------------
def register_session(registry: Path, token: str) -> Path:
    """Record this session's start; returns its registry file."""
    registry.mkdir(parents=True, exist_ok=True)
    me = registry / f"{token}.{os.getpid()}"
    me.write_text(f"{time.time()!r}\n")
    return me


def end_session(me: Path) -> None:
    with open(me, "a") as f:
        f.write(f"{time.time()!r}\n")


def overlapping_sessions(me: Path, since: float) -> list[str]:
    """Registry files of other sessions that were running at some moment
    after ``since`` (pruning those that ended long ago)."""
    now = time.time()
    found = []
    for f in me.parent.iterdir():
        if f == me:
            continue
        try:
            times = [float(t) for t in f.read_text().split()]
            pid = int(f.name.split(".")[1])
        except (OSError, ValueError, IndexError):
            continue
        if not times:  # being written: it is starting right now
            found.append(f.name)
            continue
        if len(times) >= 2:  # ended
            ran = times[1] >= since
            last = times[1]
        else:  # still running, or died without saying so
            ran = psutil.pid_exists(pid) or times[0] >= since
            last = times[0]
        if ran:
            found.append(f.name)
        elif last < now - REGISTRY_TTL:
            f.unlink(missing_ok=True)
    return found


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_segments() -> Iterator[None]:
    """Fail the run if this session leaves any shmdirty segment in /dev/shm."""
    before = shm_entries()
    since = time.time()
    me = register_session(_registry(), TOKEN)
    try:
        yield
    finally:
        others = overlapping_sessions(me, since)
        leaks, unsure = reap_leaks(before, token=TOKEN if others else None)
        end_session(me)
    if unsure:
        warnings.warn(
            f"{len(unsure)} shmdirty segment(s) appeared in {SHM_DIR} during this session "
            f"and nobody maps them, but other test sessions ran meanwhile "
            f"({', '.join(others)}), so they may be theirs; left alone: {', '.join(unsure)}",
            stacklevel=1,
        )
    if leaks:
        pytest.fail(
            f"this test session left {len(leaks)} shmdirty segment(s) in {SHM_DIR} "
            f"(now removed): {', '.join(leaks)}",
            pytrace=False,
        )


@pytest.fixture
def leak_check() -> Any:
    """The leak-check functions themselves, for tests of the suite's guarantees."""

    class LeakCheck:
        token = TOKEN
        entries = staticmethod(shm_entries)
        classify = staticmethod(classify)
        reap = staticmethod(reap_leaks)
        mappers = staticmethod(mappers)
        session_pids = staticmethod(session_pids)
        unlink_map = staticmethod(unlink_map)
        register = staticmethod(register_session)
        end = staticmethod(end_session)
        overlapping = staticmethod(overlapping_sessions)

    return LeakCheck
