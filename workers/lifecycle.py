"""How a run of ``shmdirty migrate`` ends early, its signal handling and
the command line's exit codes; used by the run of either guest
(``workers.migration``) and by the command line."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

# The command line's exit codes (each command's --help lists its own).
EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_DESTINATION_LOST = 4
EXIT_STREAM = 5
EXIT_TIMEOUT = 6
EXIT_FATE_UNKNOWN = 7     # RESUME sent, then silence: the guest may or may not run there
EXIT_LOST_AFTER_COMMIT = 8   # the destination committed (ran the guest), then was lost
# ``shmdirty receive``'s own codes (besides 0, 2, 5 and 128 + signal), apart
# from migrate's 7 and 8 so that no number means two things:
EXIT_HOST = 9       # this host cannot hold the guest: KVM, /dev/shm, --max-ram
EXIT_GUEST = 10     # the resumed guest did not run to its end (a fault, --guest-timeout)
EXIT_INTERRUPTED = 130    # 128 + SIGINT; SIGTERM gives 143


# --- how a run ends early -------------------------------------------------------------
class RunError(Exception):
    """A run that did not finish; ``map_name`` and ``removed`` (segments
    removed by teardown) are set once teardown is done; ``guest_on``: which
    side holds the guest (``source``, ``destination``, ``unknown``, or
    ``none``: teardown destroyed it)."""

    map_name = ""
    removed = 0
    guest_on = "none"


class Interrupted(RunError):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Failed(RunError):
    """A worker failed, or the run could not go on."""


class TimedOut(Failed):
    """The run took longer than its ``timeout``."""


class Usage(RunError):
    """The options asked for a map that cannot be made."""


class Signals:
    """Ctrl-C and SIGTERM become a flag the run's loop checks, so the
    interruption never lands half-way through a library call."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> Signals:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def check(self) -> None:
        if self.signum:
            raise Interrupted(self.signum)


@contextmanager
def sigint_held() -> Iterator[None]:
    """Ignore SIGINT while a worker process starts (in ``with``).

    The terminal sends Ctrl-C's SIGINT to the whole process group: a worker
    still importing would die of it with a KeyboardInterrupt traceback (or
    "Fatal Python error: init_import_site"). An ignored signal stays ignored
    across fork and exec (POSIX; a blocked mask does not survive Python's
    start), and Python leaves an ignored SIGINT alone, so the worker ignores
    it from its first instruction, as workers do anyway (the run stops
    them). The cost: a Ctrl-C landing inside ``Process.start()`` (a fork
    and an exec, milliseconds) is not seen by this process either.
    """
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class DestinationGone(RunError):
    """The destination went away (or refused the stream) before the commit
    point; ``result`` holds what the run knows (for KVM: how the source
    guest, which ran on, ended).  Its subclasses are the outcomes after
    RESUME (docs/STREAM.md), each with its own exit code."""

    exit_code = EXIT_DESTINATION_LOST
    guest_on = "source"

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result
        result.update(exit_code=self.exit_code, guest_on=self.guest_on, failure=message)


class FateUnknown(DestinationGone):
    """RESUME was sent, then the destination fell silent before RUNNING:
    it may be running the guest or not; the source discarded its copy so
    that the guest never runs twice."""

    exit_code = EXIT_FATE_UNKNOWN
    guest_on = "unknown"


class LostAfterCommit(DestinationGone):
    """The destination said RUNNING (the commit), then died or fell silent
    before its RESULT: the guest was on the destination, its end unknown here."""

    exit_code = EXIT_LOST_AFTER_COMMIT
    guest_on = "destination"


def after_resume(outcome: str, error: str | None, result: dict[str, Any]) -> None:
    """Raise the outcome of a handover (``reports.Handover.outcome``) that is not ``done``."""
    if outcome == "unknown":
        raise FateUnknown(f"the guest's fate is UNKNOWN: RESUME was sent, then {error}; the "
                          "destination may be running it; the source's paused copy was "
                          "discarded so that it never runs twice", result)
    if outcome != "done":
        raise LostAfterCommit(f"the destination committed (its guest was running), then: "
                              f"{error}", result)
