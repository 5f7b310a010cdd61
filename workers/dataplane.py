"""The dataplane process: guest RAM written from outside the VM (the seed's case).

Like virtio-blk completing requests in an IOThread, it writes into guest
RAM on its own, without the VM owner, and marks what it wrote with
``set_dirty_range``: KVM's dirty log never sees host stores, so a page it
forgot to mark would be lost by the migration.  ``forget_marks`` (testing)
is that bug, which the switchover comparison must catch; ``late_after_stop``
(testing) makes its last request finish only after ``Stop``.

Request ``k`` fills page ``first + k % pages`` of its region (a part of RAM
block 0 that no vCPU touches) with words derived from ``k`` and the page,
THEN marks the page dirty.  It completes ``rate`` requests per second until
the VM owner says ``Stop`` (it answers ``Stopped`` after its last mark),
then waits for ``Cont`` or ``Quit`` (``workers.messages``).  It reports
``Ready``, ``DataplaneDone`` or ``WorkerFailed`` to the run.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from shmdirty import DIRTY_CLIENTS_ALL, DirtyMemory

from .guest import GuestRam
from .messages import Quit, Stop, Stopped
from .reports import DataplaneDone, Ready, WorkerFailed

TICK = 0.005      # seconds between two batches of requests
_MIX = np.uint64(0x9E37_79B9_7F4A_7C15)


@dataclass(frozen=True)
class DataplaneConfig:
    map_name: str
    first_page: int
    pages: int
    rate: float = 2000.0          # requests (pages) per second
    forget_marks: bool = False    # testing: write without marking dirty
    # testing (tests/test_kvm_run.py): an Event.  On ``Stop``, wait for it
    # (30 s at most), then write and mark one page of the region, THEN answer
    # ``Stopped``: a dataplane slow to finish its last request.  The VM owner
    # must not answer the migrator's ``Stop`` before that last mark is in.
    late_after_stop: Any = None


def fill(row: np.ndarray[Any, Any], k: int, page: int) -> None:
    """The contents of request ``k`` on guest page ``page``."""
    row[:] = (np.arange(len(row), dtype=np.uint64) + np.uint64(k)) * _MIX ^ np.uint64(page)


def run(cfg: DataplaneConfig, owner: Connection, parent: Connection) -> int:
    """Complete requests until told to quit; returns how many were completed."""
    dm = DirtyMemory.attach(cfg.map_name)
    ram = GuestRam(cfg.map_name, dm.page_bits, "ram")
    block0 = None
    try:
        ram.update(dm.ram_blocks()[:1])
        block0 = ram.views[0]
        if cfg.first_page + cfg.pages > len(block0):
            raise ValueError(f"dataplane pages [{cfg.first_page}, +{cfg.pages}) are not in "
                             f"RAM block 0 ({len(block0)} pages)")
        parent.send(Ready("dataplane"))
        k = 0
        t0 = time.monotonic()
        while True:
            if owner.poll(TICK):
                msg = owner.recv()
                if isinstance(msg, Stop):
                    if cfg.late_after_stop is not None and cfg.pages:
                        cfg.late_after_stop.wait(30.0)
                        page = cfg.first_page
                        fill(block0[page], k, page)
                        dm.set_dirty_range(page << dm.page_bits, dm.page_size,
                                           DIRTY_CLIENTS_ALL)
                        k += 1
                    owner.send(Stopped())
                    msg = owner.recv()
                    t0 = time.monotonic() - k / cfg.rate if cfg.rate else t0
                if isinstance(msg, Quit):
                    break
                continue
            due = int((time.monotonic() - t0) * cfg.rate) if cfg.rate else 0
            while k < due:
                page = cfg.first_page + k % cfg.pages if cfg.pages else 0
                if cfg.pages:
                    fill(block0[page], k, page)         # the data first ...
                    if not cfg.forget_marks:            # ... then its dirty bit
                        dm.set_dirty_range(page << dm.page_bits, dm.page_size,
                                           DIRTY_CLIENTS_ALL)
                k += 1
        parent.send(DataplaneDone(k))
        return k
    finally:
        del block0
        ram.close()
        dm.close()


def main(cfg: DataplaneConfig, owner: Connection, parent: Connection) -> None:
    """Process entry point."""
    import traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run(cfg, owner, parent)
    except EOFError:
        pass                     # the VM owner is gone: nothing left to serve
    except BaseException:
        try:
            parent.send(WorkerFailed("dataplane", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
