"""The VM owner process of a KVM migration: QEMU's main loop, as a process.

It creates the map (so it is the coordinator) and the guest's RAM, owns
/dev/kvm, the VM and the vCPU threads, and answers three peers over pipes:

- the run (its parent): ``Go``, ``Abort`` (``workers.messages``); it
  reports ``Ready``, ``GuestHotadd``, ``HandedOver``, ``GuestDone`` and
  ``WorkerFailed`` (``workers.reports``);
- the migrator: ``LogSync`` (QEMU's log-sync: ``KVM_GET_DIRTY_LOG`` for
  every slot merged with ``set_dirty_lebitmap``, answered ``Synced`` once
  the map holds every bit KVM had), ``Stop`` (quiesce the dataplane, pause
  the vCPUs, sync once more, answer ``Stopped`` with every vCPU's state),
  ``Cont`` (migration failed: run again) and ``HandOver`` (the destination
  took over: this guest is discarded);
- the dataplane (if any): ``Stop`` / ``Cont`` / ``Quit``, answered
  ``Stopped`` after its last write and dirty mark.

The orderings: a vCPU's stores are in KVM's log before ``LogSync`` is
answered; the dataplane marks each page after writing it and answers
``Stopped`` after its last mark; so the migrator's ``sync_dirty_bitmap``
after ``Stopped`` sees every store made before the pause.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from shmdirty import DirtyMemory

from . import guest_kvm as g
from .messages import Abort, Cont, Go, HandOver, LogSync, Quit, Stop, Stopped, Synced
from .reports import (
    GuestDone,
    GuestHotadd,
    HandedOver,
    HotplugRefused,
    Ready,
    Report,
    WorkerFailed,
)
from .vm import GuestVM


@dataclass(frozen=True)
class OwnerConfig:
    guest: g.GuestConfig
    name: str | None = None
    block_pages: int = 1 << 15
    vcpu_nice: int = 10         # the vCPU threads yield the cores to the migration


class VmOwner:
    def __init__(self, cfg: OwnerConfig, parent: Connection, migrator: Connection | None,
                 dataplane: Connection | None) -> None:
        self.cfg, self.parent, self.migrator, self.dataplane = cfg, parent, migrator, dataplane
        self.dm = DirtyMemory.create(cfg.guest.ram, block_pages=cfg.block_pages, name=cfg.name)
        self.vm: GuestVM | None = None
        self.paused = False
        self.handed_over = False
        self.reported_hotadds = 0
        self.reported_refusals = 0
        self.syncs = 0
        self.logged = 0

    def report(self, report: Report) -> None:
        try:
            self.parent.send(report)
        except OSError:
            pass

    def run(self) -> None:
        self.vm = vm = GuestVM(self.dm, self.cfg.guest, log_dirty=True,
                               vcpu_nice=self.cfg.vcpu_nice)
        vm.boot()
        self.report(Ready("owner"))
        if not isinstance(self.parent.recv(), Go):
            return
        t0 = time.monotonic()
        vm.start()
        while not self.handed_over:
            conns: list[Any] = [self.parent, vm.wakeup_fd]
            if self.migrator is not None:
                conns.append(self.migrator)
            for c in wait(conns, timeout=1.0):
                if c is self.parent:
                    if isinstance(self._parent_says(), Abort):
                        return
                elif c is self.migrator:
                    self._migrator_says()
                else:
                    vm.handle_events()
            self._report_progress()
            if vm.errors:
                raise RuntimeError("; ".join(vm.errors))
            if vm.finished and self.migrator is None:
                self.report(GuestDone(tuple(vm.results()), time.monotonic() - t0,
                                      self.syncs, self.logged))
                return

    def _parent_says(self) -> object:
        try:
            msg: object = self.parent.recv()
            return msg
        except (EOFError, OSError):
            return Abort()     # the run is gone: leave

    def _migrator_says(self) -> None:
        vm = self.vm
        assert vm is not None and self.migrator is not None
        try:
            msg = self.migrator.recv()
        except (EOFError, OSError):
            # The migrator is gone (failed, or done with us): this guest
            # goes on to the end on its own.
            self.migrator = None
            self._cont()
            return
        if isinstance(msg, LogSync):
            n = vm.log_sync()
            self.syncs += 1
            self.logged += n
            self.migrator.send(Synced(n, tuple(vm.progress())))
        elif isinstance(msg, Stop):
            self._dataplane(Stop(), wait=False)    # both stop at once ...
            states = vm.pause()
            self._dataplane_stopped()              # ... then its last mark is in
            self.paused = True
            n = vm.log_sync()
            self.migrator.send(Stopped(tuple(states), n))
        elif isinstance(msg, Cont):
            self._cont()
        elif isinstance(msg, HandOver):
            self.handed_over = True
            self.report(HandedOver(tuple(vm.progress())))

    def _cont(self) -> None:
        if self.paused and self.vm is not None:
            self.vm.resume()
            self._dataplane(Cont())
            self.paused = False

    def _dataplane(self, msg: Stop | Cont, wait: bool = True) -> None:
        """Tell the dataplane ``msg``; for ``Stop`` (and ``wait``), wait
        until it stopped."""
        if self.dataplane is None:
            return
        try:
            self.dataplane.send(msg)
        except OSError:
            self.dataplane = None
            raise RuntimeError("the dataplane process is gone") from None
        if isinstance(msg, Stop) and wait:
            self._dataplane_stopped()

    def _dataplane_stopped(self) -> None:
        """Wait for the dataplane's ``Stopped``: sent after its last write and mark."""
        if self.dataplane is None:
            return
        try:
            while not isinstance(self.dataplane.recv(), Stopped):
                pass
        except (EOFError, OSError):
            self.dataplane = None
            raise RuntimeError("the dataplane process is gone") from None

    def _report_progress(self) -> None:
        vm = self.vm
        assert vm is not None
        while self.reported_hotadds < len(vm.hotadds):
            offset, size, t = vm.hotadds[self.reported_hotadds]
            self.reported_hotadds += 1
            self.report(GuestHotadd(offset, size, t, tuple(vm.progress())))
        while self.reported_refusals < len(vm.refusals):
            k, size, why, _t = vm.refusals[self.reported_refusals]
            self.reported_refusals += 1
            self.report(HotplugRefused(float(k), size, why))

    def close(self) -> None:
        if self.dataplane is not None:
            try:
                self.dataplane.send(Quit())
                while True:
                    self.dataplane.recv()  # until it closes its end
            except (EOFError, OSError):
                pass
        if self.vm is not None:
            self.vm.close()
        self.dm.destroy()


def main(cfg: OwnerConfig, migrator: Connection | None, dataplane: Connection | None,
         parent: Connection) -> None:
    """Process entry point; reports ``WorkerFailed`` (with the traceback) on failure."""
    import traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run decides on Ctrl-C
    owner = None
    try:
        owner = VmOwner(cfg, parent, migrator, dataplane)
        owner.run()
    except BaseException:
        try:
            parent.send(WorkerFailed("vm-owner", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        if owner is not None:
            owner.close()
