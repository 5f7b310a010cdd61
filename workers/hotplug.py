"""RAM hot-plug: at given times, add a RAM block and ask the coordinator for it.

For each ``(seconds after go, size)`` of the schedule: create and fill the
segment of the next RAM block FIRST (at the current end of RAM, where
``extend`` puts it), THEN ``request_extend`` and wait until the coordinator's
serve loop has published it, and keep the block's memfd mapped until
the run's coordinator (its parent) holds it too: the coordinator maps
every block it is told of (``workers.memfd``).  Nothing is added once the STOP flag is set
(the guest is paused for stop-and-copy); a request already posted is seen
through before the stopped flag, so the final sync sees the block.

A hot-add that cannot be made (issues 17.3, 18.7: the host's memory cannot
hold its memfd, or the coordinator refused it with ShmFull because
/dev/shm cannot hold the bitmap's growth) fails alone: ``HotplugRefused``
is reported, the memfd this worker made (if any) is unmapped, which frees
it, and the guest runs on.  (Its name cannot be squatted: a memfd has no
name in /dev/shm.)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from shmdirty import CoordinatorGone, DirtyMemory, GraceTimeout, ShmDirtyError
from shmdirty.segment import Segment

from . import Control, Flags, memfd, worker
from .guest import GuestRam
from .reports import Hotplug, HotplugRefused, HotplugSkipped

REQUEST_POLL = 0.25   # seconds per request_extend attempt between abort checks
HOLDER_TIMEOUT = 30.0  # seconds a new block waits for another holder (the coordinator)


@dataclass(frozen=True)
class HotplugConfig:
    schedule: tuple[tuple[float, int], ...] = ()   # (seconds after go, bytes)


def main(dm: DirtyMemory, cfg: HotplugConfig, ctl: Control) -> None:
    """Entry point: hot-add RAM on schedule; then set the hot-plug stopped flag."""
    held: list[Segment] = []
    with worker("hotplug", ctl):
        try:
            _run(dm, cfg, ctl, GuestRam(dm.name, dm.page_bits), held)
            ctl.flags.set(Flags.HOTPLUG_STOPPED)
            # Keep every block made here mapped until the guest stops (or the
            # run ends): a vCPU or the migrator opening one always finds a
            # holder, whatever the coordinator's pace.
            ctl.wait(Flags.STOP)
        finally:
            ctl.flags.set(Flags.HOTPLUG_STOPPED)
            for seg in held:
                seg.close()
            dm.close()


def _run(dm: DirtyMemory, cfg: HotplugConfig, ctl: Control, ram: GuestRam,
         held: list[Segment]) -> None:
    if not ctl.start("hotplug"):
        return
    t0 = time.monotonic()
    for at, size in sorted(cfg.schedule):
        if ctl.wait(Flags.STOP, max(0.0, t0 + at - time.monotonic())):
            ctl.report(HotplugSkipped(at, size))
            continue
        if ctl.aborted():
            return
        blocks = dm.ram_blocks()
        offset = max(o + s for o, s in blocks)
        t_ask = time.monotonic()
        try:
            seg = ram.create_segment(len(blocks), offset, size, boot_fill=True)
        except (ShmDirtyError, OSError) as e:   # no memory for the memfd (ShmFull)
            ctl.report(HotplugRefused(at, size, str(e)))
            continue
        held.append(seg)
        refused = None
        while True:
            try:
                dm.request_extend(offset + size, timeout=REQUEST_POLL)
                break
            except GraceTimeout:
                if ctl.aborted():
                    return
            except CoordinatorGone:
                return  # it died: nothing to finish
            except ShmDirtyError as e:          # refused (ShmFull): the map is as it was
                refused = e
                break
        if refused is not None:   # unmapping our memfd frees the block's memory
            held.remove(seg)
            seg.close()
            ctl.report(HotplugRefused(at, size, str(refused)))
            continue
        ctl.report(Hotplug(at, size, offset, dm.ram_size, t_ask, time.monotonic()))
        # The coordinator (our parent) maps the block when it reads the
        # report and keeps it to the end; until it does, unmapping here
        # could free the memfd under a vCPU about to open it.
        memfd.wait_for_holder(seg.name, os.getppid(), HOLDER_TIMEOUT, ctl.aborted)
