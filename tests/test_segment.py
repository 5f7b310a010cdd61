"""shmdirty.segment: create / attach / close / unlink, names, and refusals.

The central promise: nothing but ``unlink()`` removes a name.  A process
that attaches and exits (spawned, started on its own, or SIGKILLed), and an
attach that fails, leave the segment exactly as it was.
"""

from __future__ import annotations

import gc
import os
import re
import select
import signal
import stat
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

from shmdirty import atomic, layout, segment
from shmdirty.errors import CorruptSegment, ShmDirtyError
from shmdirty.segment import Segment

SIZE = 4096
COUNTER = layout.B_WORDS       # a word the children bump
TOKEN = layout.B_WORDS + 8     # a word the creator writes and nobody changes
TOKEN_VALUE = 0x5EED_F00D_CAFE_0001


def _path(name: str) -> str:
    return f"{segment.SHM_DIR}/{name}"


def _mapped(name: str, pid: int | str = "self") -> bool:
    """Whether process ``pid`` maps /dev/shm/<name> right now."""
    with open(f"/proc/{pid}/maps") as f:
        return any(line.rstrip("\n").endswith(" " + _path(name)) for line in f)


def _raw(name: str) -> bytes:
    with open(_path(name), "rb") as f:
        return f.read()


def _sealed(map_name: str, role: str = "b0", kind: int = layout.KIND_BLOCK) -> Segment:
    seg = Segment.create(f"shmdirty-{map_name}-{role}", SIZE, kind, arg0=2, arg1=5)
    seg.words.store(TOKEN, TOKEN_VALUE)
    seg.seal()
    return seg


# -- create / attach ---------------------------------------------------------------
def test_create_attach_round_trip(map_name: str) -> None:
    name = layout.block_name(map_name, 3)
    seg = Segment.create(name, SIZE, layout.KIND_BLOCK, arg0=2, arg1=3)
    view = seg.array(layout.B_WORDS, 16)
    view[:] = np.arange(16, dtype=np.uint64) * 0x1_0000_0001
    seg.seal()
    other = Segment.attach(name, layout.KIND_BLOCK, min_size=SIZE)
    assert other.size == seg.size == SIZE
    w = other.words
    assert w.load(layout.P_MAGIC) == layout.MAGIC
    assert w.load(layout.P_VERSION) == layout.LAYOUT_VERSION
    assert w.load(layout.P_KIND) == layout.KIND_BLOCK
    assert w.load(layout.P_SIZE) == SIZE
    assert (w.load(layout.P_ARG0), w.load(layout.P_ARG1)) == (2, 3)
    assert np.array_equal(other.array(layout.B_WORDS, 16), view)
    # one memory, two mappings: a write through one is read through the other
    other.words.fetch_add(layout.B_WORDS, 7)
    assert int(view[0]) == 7
    assert seg.read_word(layout.B_WORDS) == 7
    del view
    other.close()
    seg.close()
    assert seg.closed and other.closed
    seg.close()  # idempotent
    assert segment.unlink(name) is True
    assert segment.unlink(name) is False
    with pytest.raises(CorruptSegment, match="does not exist"):
        Segment.attach(name, layout.KIND_BLOCK)


def test_create_rounds_up_to_the_prefix(map_name: str) -> None:
    seg = Segment.create(f"shmdirty-{map_name}-tiny", 8, layout.KIND_TABLE)
    seg.seal()
    assert seg.size == layout.PREFIX_BYTES == os.stat(_path(seg.name)).st_size
    assert seg.words.load(layout.P_SIZE) == layout.PREFIX_BYTES
    seg.close()
    Segment.attach(seg.name, layout.KIND_TABLE).close()


def test_create_is_exclusive(map_name: str) -> None:
    seg = _sealed(map_name)
    with pytest.raises(FileExistsError):
        Segment.create(seg.name, SIZE, layout.KIND_BLOCK)
    # the failed create neither unlinked nor re-initialised it
    assert seg.words.load(TOKEN) == TOKEN_VALUE
    assert Segment.attach(seg.name, layout.KIND_BLOCK).read_word(TOKEN) == TOKEN_VALUE
    seg.close()


def test_names_and_mode(map_name: str) -> None:
    names = [layout.header_name(map_name), layout.table_name(map_name, 4, 0xabc),
             layout.block_name(map_name, 11), layout.ram_name(map_name, 2)]
    old = os.umask(0)  # the mode must come from create(), not from the umask
    try:
        segs = [Segment.create(n, SIZE, layout.KIND_BLOCK) for n in names]
    finally:
        os.umask(old)
    pattern = re.compile(r"^shmdirty-[0-9a-f]{12}-"
                         r"(hdr|t\d+\.[0-9a-f]{8}|b\d+|ram\d+)$")
    for seg in segs:
        assert pattern.match(seg.name), seg.name
        st = os.stat(_path(seg.name))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert segment.map_of(seg.name) == map_name
        seg.close()
    fresh = {segment.new_map_name() for _ in range(200)}
    assert len(fresh) == 200
    assert all(re.fullmatch(r"[0-9a-f]{12}", n) for n in fresh)


def test_check_map_name() -> None:
    assert segment.check_map_name("abc_1.x") == "abc_1.x"
    assert segment.check_map_name("shmdirty-abc") == "abc"
    for bad in ["", "a-b", "../x", "a/b", "x" * (layout.MAX_MAP_NAME + 1), "shmdirty-", None, 7]:
        with pytest.raises(ValueError):
            segment.check_map_name(bad)  # type: ignore[arg-type]


def test_list_segments_list_maps_map_of(map_name: str) -> None:
    other = segment.new_map_name()
    mine = [layout.header_name(map_name), layout.table_name(map_name, 0, 0xabc),
            layout.block_name(map_name, 0), layout.block_name(map_name, 1)]
    theirs = [layout.header_name(other)]
    segs = [Segment.create(n, SIZE, layout.KIND_BLOCK) for n in mine + theirs]
    try:
        assert segment.list_segments(map_name) == sorted(mine)
        assert segment.list_segments(other) == theirs
        every = segment.list_segments()
        assert set(mine + theirs) <= set(every)
        assert all(n.startswith("shmdirty-") for n in every)
        assert {map_name, other} <= set(segment.list_maps())
        assert segment.map_of(layout.block_name(map_name, 1)) == map_name
        assert segment.map_of(f"shmdirty-{map_name}-t12") == map_name
        for not_ours in ["psm_1234", "shmdirty-", "shmdirty-abc", "xshmdirty-a-b", "sem.x"]:
            assert segment.map_of(not_ours) is None
    finally:
        for s in segs:
            s.close()
            segment.unlink(s.name)
    assert segment.list_segments(map_name) == []
    assert map_name not in segment.list_maps()


# -- processes that attach and exit leave the segment alone ------------------------
def attach_and_exit_worker(name: str, how: str, conn: Any) -> None:
    """Attach, check the token, bump the counter, report, then leave by ``how``."""
    seg = Segment.attach(name, layout.KIND_BLOCK, min_size=SIZE)
    view = seg.array(TOKEN, 1)  # a live numpy view, as a real worker would hold
    conn.send((int(view[0]), seg.words.fetch_add(COUNTER, 1)))
    conn.close()
    if how == "close":
        del view
        seg.close()
    elif how == "os._exit":
        os._exit(0)
    # "return": leave with the segment open and the view alive


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close", "return", "os._exit"])
def test_spawned_child_attach_and_exit_leaves_segment(
    spawn_ctx: Any, children: list[Any], map_name: str, how: str
) -> None:
    seg = _sealed(map_name)
    seg.close()
    recv, send = spawn_ctx.Pipe(duplex=False)
    p = spawn_ctx.Process(target=attach_and_exit_worker, args=(seg.name, how, send))
    children.append(p)
    p.start()
    send.close()
    assert recv.recv() == (TOKEN_VALUE, 0)
    p.join(30)
    assert p.exitcode == 0
    assert os.path.exists(_path(seg.name))
    again = Segment.attach(seg.name, layout.KIND_BLOCK, min_size=SIZE)
    assert again.read_word(TOKEN) == TOKEN_VALUE
    assert again.read_word(COUNTER) == 1  # the child's write is still there
    again.close()


STANDALONE = textwrap.dedent("""
    import sys
    from multiprocessing import resource_tracker
    # A process started on its own gets its own resource tracker, which
    # unlinks at exit whatever was registered with it: start it on purpose.
    resource_tracker.ensure_running()
    print(resource_tracker._resource_tracker._pid, flush=True)
    sys.stdin.readline()  # the test has the tracker's pidfd now
    name, how = sys.argv[1], sys.argv[2]
    if how == "SharedMemory":  # the stdlib attach, to show the trap is real
        from multiprocessing.shared_memory import SharedMemory
        shm = SharedMemory(name)
        value = int.from_bytes(shm.buf[{token}:{token} + 8], "little")
        shm.close()
    else:
        from shmdirty import layout
        from shmdirty.segment import Segment
        seg = Segment.attach(name, layout.KIND_BLOCK)
        value = seg.read_word({token})
        seg.words.fetch_add({counter}, 1)
        if how == "close":
            seg.close()
    print(value, flush=True)
""").format(token=TOKEN, counter=COUNTER)


def _run_standalone(name: str, how: str) -> str:
    """Run STANDALONE as a process of its own; return once it and its
    resource tracker have both exited (so any tracker cleanup has run)."""
    with subprocess.Popen([sys.executable, "-c", STANDALONE, name, how],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            tracker = int(proc.stdout.readline())
            try:
                pidfd: int | None = os.pidfd_open(tracker)
            except ProcessLookupError:
                pidfd = None
            out, err = proc.communicate("go\n", timeout=30)
            assert proc.returncode == 0, err
            if pidfd is not None:  # readable once the tracker has exited
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                exited = poller.poll(30_000)
                os.close(pidfd)
                assert exited, "the standalone process's resource tracker did not exit"
            return out
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close", "exit"])
def test_standalone_process_attach_and_exit_leaves_segment(map_name: str, how: str) -> None:
    seg = _sealed(map_name)
    out = _run_standalone(seg.name, how)
    assert out.split() == [str(TOKEN_VALUE)]
    assert os.path.exists(_path(seg.name))
    assert seg.read_word(COUNTER) == 1
    again = Segment.attach(seg.name, layout.KIND_BLOCK)
    assert again.read_word(TOKEN) == TOKEN_VALUE
    again.close()
    seg.close()


@pytest.mark.timeout(60)
def test_standalone_sharedmemory_attach_is_the_trap(map_name: str) -> None:
    """Control for the test above: the same run attaching with the stdlib's
    SharedMemory destroys the segment (CPython gh-82300), so the test above
    would catch a Segment that attached the same way."""
    seg = _sealed(map_name)
    out = _run_standalone(seg.name, "SharedMemory")
    assert out.split() == [str(TOKEN_VALUE)]
    assert not os.path.exists(_path(seg.name))
    seg.close()


def killed_worker(name: str, conn: Any) -> None:
    """Attach, report ready, then fetch_add until killed (or told to stop)."""
    seg = Segment.attach(name, layout.KIND_BLOCK)
    p = seg.words.ptr(COUNTER)
    atomic.fetch_add(p, 1, atomic.ACQ_REL)
    conn.send(os.getpid())
    while seg.words.load(TOKEN + 8) == 0:  # the test never sets it; a backstop
        atomic.fetch_add(p, 1, atomic.ACQ_REL)


@pytest.mark.timeout(60)
def test_sigkilled_child_leaves_segment_then_nothing(
    spawn_ctx: Any, children: list[Any], map_name: str, leak_check: Any
) -> None:
    seg = _sealed(map_name)
    recv, send = spawn_ctx.Pipe(duplex=False)
    p = spawn_ctx.Process(target=killed_worker, args=(seg.name, send))
    children.append(p)
    p.start()
    send.close()
    pid = recv.recv()
    assert _mapped(seg.name, pid)  # it really had the segment mapped
    p.kill()  # SIGKILL, mid fetch_add loop
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert os.path.exists(_path(seg.name))
    again = Segment.attach(seg.name, layout.KIND_BLOCK, min_size=SIZE)
    assert again.read_word(TOKEN) == TOKEN_VALUE
    assert again.read_word(COUNTER) >= 1
    again.close()
    seg.close()
    # nothing of the dead child holds it, and the test's cleanup removes all
    assert leak_check.mappers([seg.name]) == {seg.name: set()}
    assert leak_check.unlink_map(map_name) == [seg.name]
    assert segment.list_segments(map_name) == []
    assert not os.path.exists(_path(seg.name))


# -- refusals: CorruptSegment naming the segment, nothing unlinked -----------------
def _write_raw(name: str, data: bytes, size: int) -> None:
    fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def _bad_segment(case: str, map_name: str) -> tuple[str, dict[str, Any], str]:
    """Make a segment that attach must refuse: (name, attach kwargs, reason regex)."""
    name = f"shmdirty-{map_name}-bad"
    kwargs: dict[str, Any] = {"kind": layout.KIND_BLOCK}
    prefix = (layout.MAGIC.to_bytes(8, "little")
              + layout.LAYOUT_VERSION.to_bytes(8, "little"))
    if case == "missing":
        return name, kwargs, "does not exist"
    if case == "empty":  # shm_open'ed, never sized: creation in progress
        _write_raw(name, b"", 0)
        return name, kwargs, "0 bytes"
    if case == "too small":
        _write_raw(name, prefix, 16)
        return name, kwargs, "16 bytes"
    if case == "short for min_size":
        _sealed(map_name, "bad").close()
        return name, {**kwargs, "min_size": 2 * SIZE}, f"{SIZE} bytes"
    if case == "unsealed":
        Segment.create(name, SIZE, layout.KIND_BLOCK).close()
        return name, kwargs, "no shmdirty magic"
    if case == "other version":
        seg = _sealed(map_name, "bad")
        seg.words.store(layout.P_VERSION, layout.LAYOUT_VERSION + 1)
        seg.close()
        return name, kwargs, f"layout version {layout.LAYOUT_VERSION + 1}"
    if case == "other kind":
        _sealed(map_name, "bad", kind=layout.KIND_TABLE).close()
        return name, kwargs, "table segment, expected a block"
    if case == "size word lies":
        seg = _sealed(map_name, "bad")
        seg.words.store(layout.P_SIZE, 2 * SIZE)
        seg.close()
        return name, kwargs, f"records size {2 * SIZE}"
    if case == "SharedMemory":
        from multiprocessing import resource_tracker
        from multiprocessing.shared_memory import SharedMemory

        shm = SharedMemory(name, create=True, size=SIZE)
        # the test unlinks it (through the map_name fixture, without the
        # tracker), so the tracker must not try again at exit
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        shm.buf[:16] = b"not shmdirty!!!!"
        shm.close()
        return name, kwargs, "no shmdirty magic"
    if case == "other uid":
        if os.geteuid() != 0:
            pytest.skip("chown to another uid needs root")
        _sealed(map_name, "bad").close()
        fd = os.open(_path(name), os.O_RDWR)
        try:
            os.fchown(fd, 65534, 65534)
        finally:
            os.close(fd)
        return name, kwargs, "owned by uid 65534"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing", "empty", "too small", "short for min_size", "unsealed", "other version",
    "other kind", "size word lies", "SharedMemory", "other uid",
])
def test_attach_refuses_with_corrupt_segment(map_name: str, case: str) -> None:
    name, kwargs, why = _bad_segment(case, map_name)
    exists = os.path.exists(_path(name))
    before = _raw(name) if exists else None
    with pytest.raises(CorruptSegment, match=why) as info:
        Segment.attach(name, **kwargs)
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, ShmDirtyError)
    assert err.segment == name and name in str(err)
    # the failed attach neither unlinked, changed, nor kept a mapping of it
    assert os.path.exists(_path(name)) is exists
    if exists:
        assert _raw(name) == before
        assert not _mapped(name)


# -- close with numpy views alive ---------------------------------------------------
def test_close_with_a_live_view_does_not_raise(map_name: str) -> None:
    seg = _sealed(map_name)
    view = seg.array(layout.B_WORDS, 4)
    view[:] = [1, 2, 3, 4]
    seg.close()  # no BufferError
    assert seg.closed
    # the mapping lives on with the view, and the view still works
    assert _mapped(seg.name)
    assert view.tolist() == [1, 2, 3, 4]
    del view
    gc.collect()
    assert not _mapped(seg.name)
    # without views, close() unmaps at once
    seg = Segment.attach(seg.name, layout.KIND_BLOCK)
    seg.array(layout.B_WORDS, 4)  # handed out and dropped
    assert _mapped(seg.name)
    seg.close()
    assert not _mapped(seg.name)


@pytest.mark.timeout(60)
def test_exit_with_live_views_is_clean(map_name: str) -> None:
    seg = _sealed(map_name)
    code = textwrap.dedent(f"""
        from shmdirty import layout
        from shmdirty.segment import Segment
        kept = []
        for _ in range(3):
            s = Segment.attach({seg.name!r}, layout.KIND_BLOCK)
            kept.append((s, s.array({TOKEN}, 1)))
        kept[0][0].close()  # closed with its view alive; the others never closed
        print(int(kept[0][1][0]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(TOKEN_VALUE)]
    assert r.stderr == ""  # no BufferError, no "Exception ignored", no tracker warning
    assert seg.read_word(TOKEN) == TOKEN_VALUE
    seg.close()
