"""The migrator of the simulated guest: the stream of ``workers.sender``
over TCP, with the vCPU and hot-plug processes as the guest.

The simulated vCPUs mark their pages in the map themselves (there is no
hypervisor log to sync), so ``log_sync`` has nothing to do.  Stop-and-copy
sets the STOP flag and waits until every vCPU and the hot-plug worker has
set its stopped flag (each after its last write, dirty bit and RAM
request), so the final ``sync_dirty_bitmap`` sees all of them.  Stopped
simulated vCPUs cannot run again: a migration that fails after the stop
ends the source guest too.

``drop_round`` (testing only) discards the bitmap of that round instead of
sending it: a migration that loses dirty pages, which the switchover
comparison must catch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from shmdirty import DirtyMemory

from . import Control, Flags, worker
from .migration_bitmap import MigrationBitmap
from .reports import DestinationLost
from .sender import Aborted, Lost, Sender, SenderConfig

__all__ = ["MigrationBitmap", "MigratorConfig", "SimControl", "main"]

STOP_TIMEOUT = 30.0     # seconds to wait for the vCPUs to say they stopped


@dataclass(frozen=True)
class MigratorConfig:
    host: str = "127.0.0.1"         # the destination (``shmdirty receive``)
    port: int = 0
    local: bool = True              # its segments are on this machine
    bandwidth: float = 24 << 20     # bytes per second during pre-copy; 0: unlimited
    threshold: int = 256            # dirty pages at which pre-copy has converged
    max_rounds: int = 30
    chunk_pages: int = 64           # pages per PAGES record (between two rate-limit checks)
    drop_round: int = 0             # testing: forget this round's dirty pages
    hotplug: bool = False           # a hot-plug worker runs: wait for it to stop too
    peer_timeout: float = 5.0       # seconds of silence after which the destination is lost
    tls_creds: str | None = None    # TLS with both ends verified (workers.transport)


class SimControl:
    """The simulated guest, stopped through the run's flags."""

    def __init__(self, ctl: Control, hotplug: bool) -> None:
        self.ctl, self.hotplug = ctl, hotplug

    def log_sync(self) -> int:
        return 0        # simulated vCPUs set their dirty bits themselves

    def stop(self) -> list[Any]:
        ctl = self.ctl
        flags = ctl.flags
        flags.set(Flags.STOP)
        waiting = [Flags.VCPU_STOPPED + i for i in range(flags.vcpus)]
        if self.hotplug:
            waiting.append(Flags.HOTPLUG_STOPPED)
        deadline = time.monotonic() + STOP_TIMEOUT
        for flag in waiting:
            while not ctl.wait(flag, 0.1):
                if ctl.aborted():
                    raise Aborted
                if time.monotonic() > deadline:
                    raise TimeoutError(f"a vCPU or the hot-plug worker did not stop within "
                                       f"{STOP_TIMEOUT} s")
        return []

    def cont(self) -> None:
        pass            # stopped simulated vCPUs have exited

    def handover(self) -> None:
        pass


def main(dm: DirtyMemory, cfg: MigratorConfig, ctl: Control) -> None:
    """Entry point: migrate over TCP; the outcome is in the reports."""
    with worker("migrator", ctl):
        sender = Sender(dm, SenderConfig(cfg.host, cfg.port, None, cfg.bandwidth,
                                         cfg.threshold, cfg.max_rounds, cfg.chunk_pages,
                                         cfg.local, cfg.drop_round, cfg.peer_timeout,
                                         tls_creds=cfg.tls_creds),
                        SimControl(ctl, cfg.hotplug), ctl.report, ctl.aborted)
        try:
            if ctl.start("migrator"):
                sender.run()
        except Aborted:
            pass
        except Lost as e:
            ctl.report(DestinationLost(str(e)))
        finally:
            sender.close()
            dm.close()
