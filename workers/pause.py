"""A test hook: stop a process at a named stage of the migration protocol.

``SHMDIRTY_TEST_PAUSE_AT=STAGE:DIR`` (testing only; unset in real use,
where ``at()`` costs one dictionary look-up).  When the process reaches
``STAGE``, ``at(STAGE)`` writes ``"STAGE PID\\n"`` into the FIFO
``DIR/reached`` (its open blocks until the test opens it to read), then
blocks until the test opens ``DIR/go`` to write and closes it.  Between the
two the test acts "at just the wrong moment", deterministically: SIGKILL or
SIGSTOP the process, cut the link.  Other threads of the process (its
heartbeat) run on meanwhile, so the paused process still looks alive to
its peer, as a slow one would.

Stages of ``shmdirty receive`` (``workers.receiver``): ``precopy`` (the
first ROUND record arrived), ``end`` (END read: everything is loaded,
LOADED not sent yet; the source waits, its guest paused), ``digests`` (LOADED and DIGESTS sent: the
source compares; before RESUME is read), ``resumed`` (RESUME read, the
guest not started yet), ``running`` (RUNNING sent: after the commit).
"""

from __future__ import annotations

import os

ENV = "SHMDIRTY_TEST_PAUSE_AT"
STAGES = ("precopy", "end", "digests", "resumed", "running")
_passed: set[str] = set()     # each stage pauses once (``precopy`` is met every round)


def at(stage: str) -> None:
    """Pause here if the environment names ``stage`` (module doc)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, folder = spec.partition(":")
    if want != stage or not folder or stage in _passed:
        return
    _passed.add(stage)
    fd = os.open(os.path.join(folder, "reached"), os.O_WRONLY)  # blocks until the test reads
    try:
        os.write(fd, f"{stage} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    fd = os.open(os.path.join(folder, "go"), os.O_RDONLY)  # blocks until the test writes
    try:
        while os.read(fd, 64):     # until the test closes its end
            pass
    finally:
        os.close(fd)
