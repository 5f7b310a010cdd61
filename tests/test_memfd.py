"""workers/memfd.py and GuestRam over it: guest RAM blocks as memfds, opened
through a live holder, gone with the last one."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from multiprocessing.connection import Connection

import numpy as np
import psutil
import pytest
from conftest import shm_entries

from shmdirty import layout
from shmdirty.errors import CorruptSegment, ShmDirtyError, ShmFull
from shmdirty.segment import Segment
from shmdirty.workers import memfd
from shmdirty.workers.guest import RAM_DATA, TAG_BOOT, GuestRam

pytestmark = pytest.mark.timeout(60)
PAGE = 4096


def holder_child(map_name: str, conn: Connection) -> None:
    """Create block 0 (4 pages at 0) stamped as booted, say so, hold it
    until told to leave."""
    ram = GuestRam(map_name, 12)
    ram.update([(0, 4 * PAGE)], create=True, boot_fill=True)
    conn.send(os.getpid())
    conn.recv()
    ram.close()


@pytest.fixture
def held(map_name: str) -> Iterator[tuple[str, int, Connection]]:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=holder_child, args=(map_name, theirs), daemon=True)
    p.start()
    theirs.close()
    try:
        assert mine.poll(30), "the holder did not start"
        yield map_name, mine.recv(), mine
    finally:
        try:
            mine.send("leave")
        except OSError:
            pass        # killed by the test
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


def test_a_block_is_a_memfd_with_no_name_in_dev_shm(map_name: str) -> None:
    ram = GuestRam(map_name, 12)
    try:
        ram.update([(0, 4 * PAGE)], create=True, boot_fill=True)
        assert not [n for n in shm_entries() if map_name in n]
        name = layout.ram_name(map_name, 0)
        assert [pid for pid, _ in memfd.holders(name)] == [os.getpid()]
        assert int(ram.views[0][2, 0]) == TAG_BOOT
    finally:
        ram.close()
    assert list(memfd.holders(layout.ram_name(map_name, 0))) == []


def test_another_process_opens_a_held_block_and_sees_its_bytes(
        held: tuple[str, int, Connection]) -> None:
    map_name, pid, _ = held
    name = layout.ram_name(map_name, 0)
    assert pid in [p for p, _ in memfd.holders(name)]
    ram = GuestRam(map_name, 12)
    try:
        assert ram.update([(0, 4 * PAGE)]) == [0]
        assert [int(ram.views[0][k, 1]) for k in range(4)] == [0, 1, 2, 3]
        ram.views[0][3, 5] = 77        # shared: the holder's file, not a copy
        fd = memfd.open_block(name)
        try:
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                f.seek(RAM_DATA + 3 * PAGE + 5 * 8)
                assert int.from_bytes(f.read(8), "little") == 77
        finally:
            os.close(fd)
    finally:
        ram.close()


def test_the_block_goes_when_its_last_holder_is_killed(
        held: tuple[str, int, Connection]) -> None:
    map_name, pid, _ = held
    name = layout.ram_name(map_name, 0)
    proc = psutil.Process(pid)
    os.kill(pid, signal.SIGKILL)
    # The kernel drops a killed process's descriptors as it exits: wait for
    # that exit (bounded), then nobody holds the block and it cannot be opened.
    _, alive = psutil.wait_procs([proc], timeout=10)
    assert not alive
    assert list(memfd.holders(name)) == []
    with pytest.raises(CorruptSegment, match="held by no live process"):
        memfd.open_block(name)


def test_a_block_of_the_wrong_place_or_unsealed_is_refused(map_name: str) -> None:
    ram = GuestRam(map_name, 12)
    name = layout.ram_name(map_name, 0)
    fd = memfd.create(name, RAM_DATA + 4 * PAGE)
    try:
        seg = Segment.create_fd(name, fd, RAM_DATA + 4 * PAGE, layout.KIND_RAM, 0, 4 * PAGE)
    finally:
        os.close(fd)
    try:
        with pytest.raises(CorruptSegment, match="no shmdirty magic"):
            ram.update([(0, 4 * PAGE)])        # creation has not finished (not sealed)
        seg.seal()
        with pytest.raises(CorruptSegment, match="holds RAM"):
            ram.update([(4 * PAGE, 4 * PAGE)])  # the stream places it elsewhere
        assert ram.update([(0, 4 * PAGE)]) == [0]
        assert np.all(ram.views[0] == 0)
    finally:
        ram.close()
        seg.close()


def test_create_reserves_the_whole_block() -> None:
    fd = memfd.create("shmdirty-reserve-test-ram0", 64 * PAGE)
    try:
        st = os.fstat(fd)
        assert st.st_size == 64 * PAGE
        assert st.st_blocks * 512 >= 64 * PAGE    # allocated now, not at first store
    finally:
        os.close(fd)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.ENOMEM])
def test_a_memfd_that_cannot_be_reserved_raises_shmfull_naming_memory(
        map_name: str, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """Issue 17.3 for guest RAM in memfds: posix_fallocate's ENOSPC / ENOMEM
    becomes ShmFull (a ShmDirtyError, errno ENOSPC) naming the bytes needed
    and the memory available (not /dev/shm), before anything is written;
    nothing is left open.  The kernel's refusal is simulated: a real one
    needs a memory cgroup limit (RLIMIT_FSIZE does not apply to memfds, and
    an unlimited memfd fallocate runs the host out of memory)."""
    def refuse(fd: int, offset: int, size: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(memfd.os, "posix_fallocate", refuse)
    fds = len(os.listdir("/proc/self/fd"))
    ram = GuestRam(map_name, 12)
    with pytest.raises(ShmFull) as ei:
        ram.update([(0, 4 * PAGE)], create=True)
    e = ei.value
    assert isinstance(e, ShmDirtyError) and e.errno == errno.ENOSPC
    assert e.needed == RAM_DATA + 4 * PAGE and e.where == "memory" and e.free > 0
    assert f"needs {e.needed} bytes of memory" in str(e) and "available" in str(e)
    assert ram.blocks == [] and len(os.listdir("/proc/self/fd")) == fds
    assert list(memfd.holders(layout.ram_name(map_name, 0))) == []
