"""What the processes of a KVM run tell each other: the run's commands and
the VM owner's conversations with the migrator and the dataplane, one frozen
dataclass per kind (what workers report to the run is ``workers.reports``).

Every pipe of a run carries these or reports, never bare strings: a
receiver checks a message with ``isinstance``, so a typo is a type error
that mypy sees, not a command nobody answers.

    run -> VM owner, migrator, receiver   Go, Abort
    migrator -> VM owner                  LogSync (answered Synced), Stop
                                          (answered Stopped), Cont, HandOver
    VM owner -> dataplane                 Stop (answered Stopped), Cont, Quit
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Go:
    """The run: every process is ready, start the guest (or the migration)."""


@dataclass(frozen=True)
class Abort:
    """The run gives up or tears down: stop and leave (a receiver stops listening)."""


@dataclass(frozen=True)
class LogSync:
    """QEMU's log-sync: put every store the guest made so far into the map."""


@dataclass(frozen=True)
class Synced:
    """The answer to ``LogSync``: the map holds every bit KVM's log had."""

    pages: int                  # pages KVM's dirty log held
    progress: tuple[int, ...]   # steps done by each vCPU then


@dataclass(frozen=True)
class Stop:
    """Stop writing guest RAM: the VM owner pauses the vCPUs (and the
    dataplane) and log-syncs once more; the dataplane stops after its last
    mark."""


@dataclass(frozen=True)
class Stopped:
    """The answer to ``Stop``: the VM owner's carries every vCPU's state
    (``workers.vm.VcpuState``) and the pages of its last log-sync; the
    dataplane's carries nothing."""

    states: tuple[Any, ...] = ()
    pages: int = 0


@dataclass(frozen=True)
class Cont:
    """The migration failed after ``Stop``: run again."""


@dataclass(frozen=True)
class HandOver:
    """The destination took over: the source guest is discarded."""


@dataclass(frozen=True)
class Quit:
    """The VM owner to the dataplane: leave (the run is over)."""
