"""The exceptions shmdirty raises; each also subclasses the matching built-in."""

from __future__ import annotations


class ShmDirtyError(Exception):
    """Base of every shmdirty error."""


class BadInput(ShmDirtyError, ValueError):
    """An address, length, client, mask, dtype or size outside what the map allows."""


class NotCoordinator(ShmDirtyError, PermissionError):
    """A coordinator-only call made by a process that is not the coordinator."""


class NoReaderSlot(ShmDirtyError, RuntimeError):
    """Every reader slot of the map is claimed by a live process."""


class GraceTimeout(ShmDirtyError, TimeoutError):
    """A grace period or a request did not complete in time."""


class CorruptSegment(ShmDirtyError, OSError):
    """A segment is missing, too small, of another layout version, or not ours."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"shared memory segment {name!r}: {why}")
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
        self.map = name
