"""RAM hot-plug: at given times, add a RAM block and ask the coordinator for it.

For each ``(seconds after go, size)`` of the schedule: create and fill the
segment of the next RAM block FIRST (at the current end of RAM, where
``extend`` puts it), THEN ``request_extend`` and wait until the coordinator's
serve loop has published it.  Nothing is added once the STOP flag is set
(the guest is paused for stop-and-copy); a request already posted is seen
through before the stopped flag, so the final sync sees the block.

A hot-add that cannot be made (issues 17.3, 18.7: /dev/shm cannot hold
it, the coordinator refused it with ShmFull, or its segment's name was
taken by someone else) fails alone: ``HotplugRefused`` is reported, the
segment this worker made (if any) is removed, and the guest runs on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shmdirty import CoordinatorGone, DirtyMemory, GraceTimeout, ShmDirtyError, segment

from . import Control, Flags, worker
from .guest import GuestRam
from .reports import Hotplug, HotplugRefused, HotplugSkipped

REQUEST_POLL = 0.25   # seconds per request_extend attempt between abort checks


@dataclass(frozen=True)
class HotplugConfig:
    schedule: tuple[tuple[float, int], ...] = ()   # (seconds after go, bytes)


def main(dm: DirtyMemory, cfg: HotplugConfig, ctl: Control) -> None:
    """Entry point: hot-add RAM on schedule; then set the hot-plug stopped flag."""
    with worker("hotplug", ctl):
        try:
            _run(dm, cfg, ctl, GuestRam(dm.name, dm.page_bits))
        finally:
            ctl.flags.set(Flags.HOTPLUG_STOPPED)
            dm.close()


def _run(dm: DirtyMemory, cfg: HotplugConfig, ctl: Control, ram: GuestRam) -> None:
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
        # The bytes are in shared memory once it is sealed; unmap our view.
        try:
            seg = ram.create_segment(len(blocks), offset, size, boot_fill=True)
        except (ShmDirtyError, OSError) as e:   # no room, or the name is taken
            ctl.report(HotplugRefused(at, size, str(e)))
            continue
        seg.close()
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
        if refused is not None:
            segment.unlink(seg.name)
            ctl.report(HotplugRefused(at, size, str(refused)))
            continue
        ctl.report(Hotplug(at, size, offset, dm.ram_size, t_ask, time.monotonic()))
