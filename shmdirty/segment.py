"""POSIX shared-memory segments: create, attach, unlink, list.

These are the segments ``multiprocessing.shared_memory`` makes (same
``shm_open`` objects, same names), opened through its ``_posixshmem``
primitive rather than its ``SharedMemory`` class, because on Python 3.11
(CPython gh-82300) that class

- registers every segment it creates *or attaches* with a resource tracker
  that unlinks it when the process exits: a CLI run attaching to a live map
  would destroy it, and a spawned child that unregisters removes its
  parent's entry, because the two share one tracker;
- unlinks the name when an attach fails part-way.

So nothing here is ever registered with a tracker and nothing but
``unlink()`` removes a name: exiting, crashing or failing to attach never
destroys shared state.  Leaks are reclaimed by ``DirtyMemory.destroy()`` and
``shmdirty gc``.  Our fd is closed right after ``mmap``, but Python's mmap
keeps a duplicate of it, so every mapped segment holds one descriptor: a
process maps at most 3 segments per bitmap block plus a table at a time,
well under the usual ``ulimit -n`` for guests up to terabytes.
"""

from __future__ import annotations

import _posixshmem  # type: ignore[import-not-found]
import errno
import mmap
import os
from typing import Any

import numpy as np

from . import atomic, layout
from .errors import CorruptSegment, ShmFull

SHM_DIR = "/dev/shm"


# Map names are checked and segment names parsed in layout.py (one place).
new_map_name = layout.new_map_name
check_map_name = layout.check_map_name
map_of = layout.map_of


class Segment:
    """One mapped segment.  ``words`` does atomics on it; ``array`` gives
    numpy views; ``close()`` unmaps (views first), never unlinks."""

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        self.name = name
        self.size = len(mm)
        self._mmap: mmap.mmap | None = mm
        self.words = atomic.Words(mm)
        self._arrays: list[np.ndarray[Any, Any]] = []

    # -- creation / attach ----------------------------------------------------
    @classmethod
    def create(cls, name: str, size: int, kind: int, arg0: int = 0, arg1: int = 0) -> Segment:
        """Create ``name`` exclusively (mode 0600), zeroed, with its prefix
        written; FileExistsError if the name is taken.  Its pages are
        reserved before anything is written: a /dev/shm too small raises
        ShmFull (and the name is gone again) instead of a SIGBUS later, at
        the first store to a page tmpfs cannot give."""
        size = max(size, layout.PREFIX_BYTES)
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
            reserve(fd, size, f"segment {name}")
            return cls.create_fd(name, fd, size, kind, arg0, arg1)
        except BaseException:
            _unlink_quietly(name)
            raise
        finally:
            os.close(fd)

    @classmethod
    def create_fd(cls, name: str, fd: int, size: int, kind: int, arg0: int = 0,
                  arg1: int = 0) -> Segment:
        """Map the first ``size`` bytes of the open, zeroed file ``fd`` (a
        segment, or a memfd that has no name in /dev/shm) as a segment called
        ``name`` and write its prefix; the caller still closes ``fd``."""
        size = max(size, layout.PREFIX_BYTES)
        seg = cls(name, mmap.mmap(fd, size))
        w = seg.words
        # Plain-order stores: nobody reads these before the magic (seal()).
        w.store(layout.P_VERSION, layout.LAYOUT_VERSION, atomic.RELAXED)
        w.store(layout.P_KIND, kind, atomic.RELAXED)
        w.store(layout.P_SIZE, size, atomic.RELAXED)
        w.store(layout.P_ARG0, arg0, atomic.RELAXED)
        w.store(layout.P_ARG1, arg1, atomic.RELAXED)
        return seg

    def seal(self) -> None:
        """Write the magic (release): the segment's contents are complete."""
        # Release: an attacher that sees the magic (acquire) sees every word
        # the creator wrote before it.
        self.words.store(layout.P_MAGIC, layout.MAGIC, atomic.RELEASE)

    @classmethod
    def attach(cls, name: str, kind: int, min_size: int = layout.PREFIX_BYTES) -> Segment:
        """Map an existing segment and check it is a sealed shmdirty segment of
        this layout version, of ``kind``, at least ``min_size`` bytes, ours."""
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except FileNotFoundError:
            raise CorruptSegment(name, "does not exist (removed, or never created)") from None
        except PermissionError:
            raise CorruptSegment(name, "is not accessible to this user") from None
        try:
            return cls.attach_fd(name, fd, kind, min_size)
        finally:
            os.close(fd)

    @classmethod
    def attach_fd(cls, name: str, fd: int, kind: int,
                  min_size: int = layout.PREFIX_BYTES) -> Segment:
        """``attach()`` over an open file ``fd`` (a segment, or a memfd
        another process holds): the same owner, size and prefix checks; the
        caller still closes ``fd``."""
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise CorruptSegment(name, f"is owned by uid {st.st_uid}, not {os.geteuid()}")
        if st.st_size < max(min_size, layout.PREFIX_BYTES):
            raise CorruptSegment(
                name, f"is {st.st_size} bytes, smaller than {max(min_size, 64)}"
            )
        seg = cls(name, mmap.mmap(fd, st.st_size))
        try:
            seg._check(kind, min_size)
        except BaseException:
            seg.close()
            raise
        return seg

    def _check(self, kind: int, min_size: int) -> None:
        w = self.words
        # Acquire: pairs with seal()'s release, so the prefix is complete.
        magic = w.load(layout.P_MAGIC, atomic.ACQUIRE)
        if magic != layout.MAGIC:
            raise CorruptSegment(self.name, "has no shmdirty magic (not ours, or creation "
                                 "did not finish)")
        version = w.load(layout.P_VERSION, atomic.RELAXED)
        if version != layout.LAYOUT_VERSION:
            raise CorruptSegment(self.name, f"has layout version {version}, this shmdirty "
                                 f"reads version {layout.LAYOUT_VERSION}")
        got = w.load(layout.P_KIND, atomic.RELAXED)
        if got != kind:
            raise CorruptSegment(self.name, f"is a {layout.KIND_NAMES.get(got, got)} segment, "
                                 f"expected a {layout.KIND_NAMES[kind]} segment")
        size = w.load(layout.P_SIZE, atomic.RELAXED)
        if size > self.size or size < min_size:
            raise CorruptSegment(self.name, f"records size {size}, mapped {self.size}, "
                                 f"need at least {min_size}")

    # -- access ------------------------------------------------------------------
    def array(self, offset: int, count: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
        """A uint64 numpy view of ``count`` words at byte ``offset``."""
        assert self._mmap is not None, f"{self.name} is closed"
        a = np.frombuffer(self._mmap, dtype=np.uint64, count=count, offset=offset)
        self._arrays.append(a)
        return a

    def read_word(self, offset: int) -> int:
        """An acquire load of the word at ``offset``."""
        return self.words.load(offset, atomic.ACQUIRE)

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unmap.  Views handed out by array() must be dropped by their users
        first; if one is still alive the mapping stays until it goes."""
        if self._mmap is None:
            return
        self.words.release()
        self._arrays.clear()
        mm, self._mmap = self._mmap, None
        try:
            mm.close()
        except BufferError:
            pass  # a caller still holds a view: the mapping goes with it

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.size} bytes"
        return f"<Segment {self.name} {state}>"


def free_bytes() -> int:
    """Bytes /dev/shm can still give (0 if it cannot be asked)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def reserve(fd: int, size: int, what: str) -> None:
    """posix_fallocate the first ``size`` bytes of ``fd``: ShmFull if tmpfs
    cannot hold them (the caller removes what it made)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise ShmFull(what, size, free_bytes(), SHM_DIR) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # A file system that cannot reserve (not tmpfs, where /dev/shm
        # lives on Linux): nothing to reserve with; the check_room of the
        # caller is the only guard left.


def shm_bytes(size: int) -> int:
    """What a segment of ``size`` bytes takes of tmpfs: whole pages."""
    page = mmap.PAGESIZE
    return -(-max(size, layout.PREFIX_BYTES) // page) * page


def check_room(what: str, needed: int) -> None:
    """ShmFull up front if ``needed`` bytes (of whole segments: shm_bytes)
    do not fit (the exact check is each segment's reserve(); this one names
    the whole amount before the first is made)."""
    free = free_bytes()
    if needed > free:
        raise ShmFull(what, needed, free, SHM_DIR)


def unlink(name: str) -> bool:
    """Remove ``name``; True if it existed and was removed.  A segment of
    another user under our prefix (a squatter's: /dev/shm is sticky, so
    only its owner may remove it) is not ours: False, no error."""
    try:
        _posixshmem.shm_unlink("/" + name)
        return True
    except (FileNotFoundError, PermissionError):
        return False


def _unlink_quietly(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except OSError:
        pass


def list_segments(map_name: str | None = None) -> list[str]:
    """Names in /dev/shm of one map's segments (or of every shmdirty map)."""
    prefix = layout.map_prefix(map_name)
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def list_maps() -> list[str]:
    """Every map name that has at least one segment in /dev/shm."""
    return sorted({m for n in list_segments() if (m := map_of(n)) is not None})
