"""Guest RAM that cannot outlive its processes: one memfd per RAM block.

QEMU's ``memory-backend-memfd``: a RAM block's memory is an anonymous file
(``memfd_create``) with no name in /dev/shm, freed by the kernel when the
last process that holds it (an open descriptor, or a mapping: Python's mmap
keeps a duplicate descriptor of the file it maps) exits, however it exits.
A kill -9 of any process of a run leaves no guest RAM behind.

The memfd carries the segment name it would have had in /dev/shm
(``shmdirty-<map>-ram<i>``); the kernel shows it as the link
``/memfd:<name> (deleted)`` in ``/proc/<pid>/fd``.  A process that needs a
block another process created (the migrator, the dataplane, vCPU workers,
the parent's comparison, a loopback sender looking at its receiver's RAM)
finds a live holder there and opens ``/proc/<holder>/fd/<n>``: a new
descriptor of the same file (the kernel allows it to the holder's own user,
like ``ptrace`` read access, and checks it again at open).  So a block is
reachable exactly while some process of the run holds it, and its creator
keeps it mapped until the process that keeps it for the rest of the run
does (``wait_for_holder``).

A memfd is also where the ``posix_fallocate`` reservation of a block goes
(``create``): its pages are allocated before anything is written, so a
host short of memory fails the creation with ``ShmFull`` (bytes needed,
memory available), not a later store with SIGBUS.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator

from shmdirty.errors import CorruptSegment, ShmFull

PROC = "/proc"
HOLDER_POLL = 0.01    # seconds between looks for another holder


def _link(name: str) -> str:
    return f"/memfd:{name} (deleted)"


def create(name: str, size: int) -> int:
    """A new memfd called ``name`` of ``size`` bytes, zeroed and reserved
    (``posix_fallocate``) before anything is written: a host short of memory
    raises ``ShmFull`` now, naming the bytes needed and the memory available
    (never a SIGBUS at a later store); close-on-exec.  The caller maps it
    and closes the descriptor.  Nothing is left behind on failure."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise ShmFull(f"guest RAM {name}", size, available(), "memory") from None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def available() -> int:
    """Bytes of memory available for new guest RAM (MemAvailable)."""
    import psutil
    return int(psutil.virtual_memory().available)


def _pids() -> Iterator[int]:
    """Every pid, this process's parent first (it usually holds the RAM)."""
    ppid = os.getppid()
    yield ppid
    for entry in os.listdir(PROC):
        if entry.isdigit() and int(entry) != ppid:
            yield int(entry)


def holders(name: str, exclude: int = 0) -> Iterator[tuple[int, int]]:
    """(pid, fd number) of every descriptor of memfd ``name`` this user can
    see, in any process but ``exclude`` (0: none)."""
    want = _link(name)
    for pid in _pids():
        if pid == exclude:
            continue
        try:
            fds = os.listdir(f"{PROC}/{pid}/fd")
        except OSError:      # gone, or another user's process
            continue
        for fd in fds:
            try:
                if os.readlink(f"{PROC}/{pid}/fd/{fd}") == want:
                    yield pid, int(fd)
            except OSError:
                continue


def open_block(name: str) -> int:
    """A descriptor of memfd ``name``, opened through a live holder;
    ``CorruptSegment`` when no process of this user holds it."""
    me = os.getpid()
    tried: list[str] = []
    for pid, n in holders(name):     # this process too: a second mapping of its own block
        try:
            fd = os.open(f"{PROC}/{pid}/fd/{n}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            tried.append(f"pid {pid}: {e.strerror}")
            continue         # the holder closed it, or exited, meanwhile
        # The number may have been reused between readlink and open: check
        # that what we opened is that memfd.
        if os.readlink(f"{PROC}/{me}/fd/{fd}") == _link(name):
            return fd
        tried.append(f"pid {pid}: fd {n} is another file now")
        os.close(fd)
    raise CorruptSegment(name, "is held by no live process (guest RAM lives in memfds, "
                         "freed when the last process holding it exits)"
                         + (f"; tried {', '.join(tried)}" if tried else ""))


def wait_for_holder(name: str, pid: int, timeout: float,
                    give_up: Callable[[], bool] = lambda: False) -> bool:
    """Wait until process ``pid`` holds memfd ``name`` (or ``give_up()``,
    or ``timeout`` seconds); True if it does.  A creator hands a block over
    this way: it keeps its own mapping until the process that keeps the
    block for the rest of the run (the coordinator) has one."""
    end = time.monotonic() + timeout
    while True:
        if any(p == pid for p, _ in holders(name)):
            return True
        if give_up() or time.monotonic() > end:
            return False
        time.sleep(HOLDER_POLL)
