"""The exceptions shmdirty raises; each also subclasses the matching built-in.

Every one pickles (a multiprocessing pool sends a task's exception back to
the parent): ``__reduce__`` rebuilds it by calling its class with the
arguments it was constructed with (``_ctor_args``, set by the classes whose
constructor formats a message; the plain ones were given the message), so
type, args and message come back the same.
"""

from __future__ import annotations

import errno
import math
import numbers
from collections.abc import Sequence
from typing import Any


class ShmDirtyError(Exception):
    """Base of every shmdirty error."""

    #: What the constructor was called with, when that is not ``args`` (a
    #: subclass that formats its message from its own parameters sets it).
    _ctor_args: tuple[Any, ...] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        ctor = self.args if self._ctor_args is None else self._ctor_args
        return (type(self), ctor, dict(self.__dict__))


class BadInput(ShmDirtyError, ValueError):
    """An address, length, client, mask, dtype or size outside what the map allows."""


class NotCoordinator(ShmDirtyError, PermissionError):
    """A coordinator-only call made by a process that is not the coordinator."""


class NoReaderSlot(ShmDirtyError, RuntimeError):
    """Every reader slot of the map is claimed by a live process."""


class GraceTimeout(ShmDirtyError, TimeoutError):
    """A grace period or a request did not complete in time."""


class CallbacksDropped(GraceTimeout):
    """close() or destroy() could not run ``count`` call_rcu callbacks: their
    grace period did not end within its timeout (the readers holding it up
    are named).  They will never run: the process has left the map."""

    def __init__(self, count: int, why: str) -> None:
        s, was = ("", "was") if count == 1 else ("s", "were")
        super().__init__(f"{count} call_rcu callback{s} could not run and {was} dropped: {why}")
        self._ctor_args = (count, why)
        self.count = count
        self.why = why


class CallbackFailed(ExceptionGroup[Exception], ShmDirtyError):
    """call_rcu callbacks raised: their exceptions (``exceptions``), kept by the
    process that queued them and raised from its next ``rcu.barrier()``,
    ``close()`` or ``destroy()`` (never from an unrelated ``serve_once()``).
    Also an ExceptionGroup: ``except* KeyError`` picks one kind out."""

    def __new__(cls, message: str, exceptions: Sequence[Exception]) -> CallbackFailed:
        return super().__new__(cls, message, exceptions)

    def derive(self, excs: Sequence[Exception]) -> CallbackFailed:  # type: ignore[override]
        return CallbackFailed(self.message, excs)

    @classmethod
    def of(cls, errors: Sequence[Exception], where: str) -> CallbackFailed:
        n = len(errors)
        return cls(f"{n} call_rcu callback{'' if n == 1 else 's'} of {where} raised", errors)


class CorruptSegment(ShmDirtyError, OSError):
    """A segment is missing, too small, of another layout version, or not ours."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"shared memory segment {name!r}: {why}")
        self._ctor_args = (name, why)
        self.segment = name
        self.why = why


class CoordinatorGone(ShmDirtyError, RuntimeError):
    """The map's coordinator is dead or has left: call DirtyMemory.adopt()."""


class RcuMisuse(ShmDirtyError, RuntimeError):
    """An RCU call made where its rules forbid it: an unlock without a lock,
    a grace-period wait inside a read-side section, a reader without a slot."""


class HandleClosed(ShmDirtyError, ValueError):
    """A handle, or an object it gave out (its Rcu, a read section), used after
    close() or destroy(): its mappings are gone.  Attach again."""


class MapNotFound(ShmDirtyError, FileNotFoundError):
    """No map of that name exists (its header segment is missing)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no map named {name!r} (no shared memory segment "
                         f"shmdirty-{name}-hdr): it was destroyed or never created; "
                         "`shmdirty ls` lists the live maps")
        self._ctor_args = (name,)
        self.map = name


class MapExists(ShmDirtyError, FileExistsError):
    """create(name=...) of a map that already exists (its header segment is there)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"map {name!r} already exists (segment shmdirty-{name}-hdr): "
                         "pick another name, attach to it, or remove it with "
                         "`shmdirty gc` if its processes are gone")
        self._ctor_args = (name,)
        self.map = name


class ShmFull(ShmDirtyError, OSError):
    """/dev/shm (``where``; or "memory", for guest RAM in memfds) cannot
    hold what is asked (errno ENOSPC): ``needed`` bytes, ``free`` bytes free.
    Raised before anything is written; nothing half made is left behind and
    a live map is unchanged."""

    def __init__(self, what: str, needed: int, free: int, where: str = "/dev/shm") -> None:
        hint = ("enlarge it, e.g. docker --shm-size, or free some: `shmdirty gc`"
                if where.startswith("/") else "free some, or ask for less")
        super().__init__(errno.ENOSPC,
                         f"{what}: needs {needed} bytes of {where}, only {free} bytes are "
                         f"{'free' if where.startswith('/') else 'available'} ({hint})")
        self._ctor_args = (what, needed, free, where)
        self.what, self.needed, self.free, self.where = what, needed, free, where

    def __str__(self) -> str:
        return str(self.strerror)


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """``timeout`` as given if it is None (wait for ever) or a finite number
    of seconds >= 0; else BadInput (NaN, infinities, negatives, non-numbers).
    Every public ``timeout=`` goes through here before anything changes."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise BadInput(f"{what} must be None or a number of seconds, not {timeout!r}")
    if not math.isfinite(timeout) or timeout < 0:
        raise BadInput(f"{what} must be None (no limit) or a finite number of "
                       f"seconds >= 0, not {timeout!r}")
    return timeout
