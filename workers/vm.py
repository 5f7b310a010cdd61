"""A KVM virtual machine whose RAM is the map's guest RAM segments.

``GuestVM`` is used by the process that owns the VM (only the creating
process may use KVM fds): the source's VM owner, the destination
(``shmdirty receive``), and tests.  RAM block ``i`` of the map is memory
slot ``i`` over segment ``shmdirty-<map>-ram<i>`` (``workers.guest``), at
guest-physical address = its RAM offset.  Each vCPU is a thread of this
process running ``KVM_RUN`` (the GIL is released inside it).

Threads and the map: a ``DirtyMemory`` handle is not for concurrent use by
several threads, so only the thread that made the ``GuestVM`` (the main
thread) touches the map.  A vCPU thread that needs the VM owner (the guest
asked for a hot-add, a vCPU is done or parked) posts an event and wakes the
main thread through a pipe (``wakeup_fd``); the main thread handles events
in ``handle_events()``, the vCPU thread waits for the reply.

Stopping a vCPU (``pause()``): set ``immediate_exit`` in its ``kvm_run``,
then ``pthread_kill`` it with SIGUSR1 (which has a Python handler), so a
``KVM_RUN`` in progress fails with EINTR and one about to start returns at
once; the thread then lets KVM finish a pending ``out`` (so the saved rip
is past it) and parks.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from shmdirty import DIRTY_CLIENTS_ALL, DirtyMemory, ShmDirtyError

from . import guest_kvm as g
from . import kvm
from .guest import PAGE_BITS, GuestRam

STOP_SIGNAL = signal.SIGUSR1


@dataclass
class VcpuState:
    """What a vCPU needs to go on elsewhere: its registers, and whether it is done."""

    index: int
    done: bool
    regs: bytes        # struct kvm_regs, 144 bytes
    sregs: bytes       # struct kvm_sregs, 312 bytes

    def reg_dict(self) -> dict[str, int]:
        return kvm.Regs.from_buffer_copy(self.regs).as_dict()


class GuestError(RuntimeError):
    """The guest did something the program never does (a fault, an unknown exit)."""


class _VcpuThread(threading.Thread):
    def __init__(self, vm: GuestVM, vcpu: kvm.Vcpu) -> None:
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.vm, self.vcpu = vm, vcpu
        self.go = threading.Event()
        self.reply = threading.Event()

    def run(self) -> None:
        vm, vcpu = self.vm, self.vcpu
        if vm.vcpu_nice:
            # Below the migration's own processes on a host with as many cores
            # as vCPUs: a guest that computes would starve the stream.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), vm.vcpu_nice)
        try:
            while not vm.closing:
                if vm.stopping:
                    self._park()
                    continue
                try:
                    reason = vcpu.run()
                except InterruptedError:
                    continue
                if reason == kvm.EXIT_IO:
                    out, port, _, value = vcpu.io_exit()
                    if out and port == g.PORT_HOTPLUG:
                        self.reply.clear()
                        vm.post(("hotplug", vcpu.index, value & 0xFF))
                        self.reply.wait()
                        continue
                    if out and port == g.PORT_DONE:
                        vcpu.complete_pending_io()
                        vm.post(("done", vcpu.index, None))
                        return
                name = kvm.EXIT_NAMES.get(reason, str(reason))
                regs = vcpu.get_regs()
                vm.post(("error", vcpu.index, f"vCPU {vcpu.index}: unexpected exit {name} "
                                              f"at rip {regs.rip:#x}"))
                return
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            vm.post(("error", vcpu.index, f"vCPU {vcpu.index}: {e!r}"))

    def _park(self) -> None:
        self.vcpu.complete_pending_io()
        self.go.clear()
        self.vm.post(("parked", self.vcpu.index, None))
        self.go.wait()


class GuestVM:
    """A VM over the map's guest RAM; this process is the map's coordinator.

    ``log_dirty``: register slots with ``KVM_MEM_LOG_DIRTY_PAGES`` (the
    source; the destination does not log); ``vcpu_nice``: the vCPU threads'
    nice value (0: this process's)."""

    def __init__(self, dm: DirtyMemory, cfg: g.GuestConfig, *, log_dirty: bool = True,
                 vcpu_nice: int = 0) -> None:
        if dm.page_bits != PAGE_BITS:
            raise ValueError(f"the KVM guest needs 4 KiB pages, the map has {dm.page_size}")
        self.dm, self.cfg, self.log_dirty, self.vcpu_nice = dm, cfg, log_dirty, vcpu_nice
        self.ram = GuestRam(dm.name, dm.page_bits, "ram")
        self._logs: list[np.ndarray[Any, np.dtype[np.uint64]]] = []
        self._events: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()
        self.stopping = False
        self.closing = False
        self.threads: dict[int, _VcpuThread] = {}
        self.done: dict[int, float] = {}       # vCPU -> time.monotonic() it finished
        self.parked: set[int] = set()
        self.hotadds: list[tuple[int, int, float]] = []   # (offset, size, monotonic time)
        self.hotadd_counts = [0] * cfg.vcpus
        # The first hot-add that could not be made (None: none yet); it and
        # every later one are refused.  (index, bytes, why, monotonic time).
        self.refused_from: int | None = None
        self.refusals: list[tuple[int, int, str, float]] = []
        self.errors: list[str] = []
        self._kvm = kvm.Kvm()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.vm = self._kvm.create_vm()
        except BaseException:
            self.close()
            raise
        if threading.current_thread() is threading.main_thread():
            signal.signal(STOP_SIGNAL, lambda *_: None)
        self.ensure_blocks(dm.ram_blocks())

    # -- RAM -----------------------------------------------------------------
    @property
    def wakeup_fd(self) -> int:
        """Readable when a vCPU thread posted an event: call ``handle_events()``."""
        return self._wake_r

    def ensure_blocks(self, blocks: list[tuple[int, int]]) -> list[int]:
        """Make RAM ``blocks`` (offset, size), in order, exist: add the ones the
        map lacks (``ram_block_add``), create their segments, register their
        slots.  Returns the indexes of the slots added."""
        have = self.dm.ram_blocks()
        for i, blk in enumerate(blocks):
            if i < len(have):
                if tuple(have[i]) != tuple(blk):
                    raise ValueError(f"RAM block {i} is {have[i]} here, {blk} in the stream")
                continue
            offset = self.dm.ram_block_add(blk[1])
            if offset != blk[0]:
                raise ValueError(f"RAM block {i} went to {offset:#x}, expected {blk[0]:#x}")
        try:
            new = self.ram.update(self.dm.ram_blocks(), create=True)
        except BaseException:
            # No segment for the blocks just added (ShmFull...): the map
            # forgets them again, as it was.
            for offset, _ in self.dm.ram_blocks()[len(self.ram.blocks):]:
                self.dm.ram_block_remove(offset)
            raise
        for i in new:
            self.ram.preallocate(i)
            offset, size = self.ram.blocks[i]
            self.vm.set_memory_region(i, offset, size, self.ram.views[i].ctypes.data,
                                      log_dirty=self.log_dirty)
            self._logs.append(np.zeros(-(-(size >> PAGE_BITS) // 64), np.uint64))
        return new

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at guest address ``addr`` (within one block) from the
        host, and mark it dirty: KVM's log never sees host stores."""
        for i, (offset, size) in enumerate(self.ram.blocks):
            if offset <= addr and addr + len(data) <= offset + size:
                raw = self.ram.views[i].reshape(-1).view(np.uint8)
                raw[addr - offset:addr - offset + len(data)] = np.frombuffer(data, np.uint8)
                self.dm.set_dirty_range(addr, len(data), DIRTY_CLIENTS_ALL)
                return
        raise ValueError(f"guest [{addr:#x}, +{len(data)}) is not inside one RAM block")

    def log_sync(self) -> int:
        """QEMU's KVM log-sync: ``KVM_GET_DIRTY_LOG`` for every slot, merged
        into the map with ``set_dirty_lebitmap``.  Returns the pages KVM reported."""
        n = 0
        for slot, (offset, size) in enumerate(self.ram.blocks):
            log = self._logs[slot]
            self.vm.get_dirty_log(slot, log)
            if log.any():
                n += int(np.bitwise_count(log).sum())
                self.dm.set_dirty_lebitmap(log, offset, size >> PAGE_BITS)
        return n

    # -- vCPUs ---------------------------------------------------------------
    def boot(self) -> None:
        """Store the program, page tables and parameters; make the vCPUs at entry."""
        for addr, data in g.boot_image(self.cfg):
            self.write(addr, data)
        for v in range(self.cfg.vcpus):
            vcpu = self.vm.create_vcpu(v)
            vcpu.set_sregs(kvm.user_mode_sregs(vcpu))
            regs = vcpu.get_regs()
            for name, value in g.entry_regs(v).items():
                setattr(regs, name, value)
            vcpu.set_regs(regs)

    def restore(self, states: list[VcpuState], hotadds: list[int]) -> None:
        """Make the vCPUs from migrated ``states`` (special registers first);
        ``hotadds``: how many hot-adds each vCPU has made (from its region table)."""
        for st in sorted(states, key=lambda s: s.index):
            vcpu = self.vm.create_vcpu(st.index)
            vcpu.set_sregs(kvm.Sregs.from_buffer_copy(st.sregs))
            vcpu.set_regs(kvm.Regs.from_buffer_copy(st.regs))
            if st.done:
                self.done[st.index] = time.monotonic()
        self.hotadd_counts = list(hotadds)
        # Requests answered beyond the regions made were refused at the
        # source: so are they, and every later one, here.
        raw = self.ram.views[0].reshape(-1)
        for v in range(self.cfg.vcpus):
            answered = int(raw[(g.params_addr(v) + g.P_ANSWERED) // 8])
            if answered > self.hotadd_counts[v]:
                made = self.hotadd_counts[v]
                self.refused_from = made if self.refused_from is None else min(
                    made, self.refused_from)
                self.hotadd_counts[v] = answered

    def start(self) -> None:
        """Start a thread per vCPU that is not done."""
        for vcpu in self.vm.vcpus:
            if vcpu.index not in self.done:
                t = _VcpuThread(self, vcpu)
                self.threads[vcpu.index] = t
                t.start()

    def post(self, event: tuple[str, int, Any]) -> None:
        """From a vCPU thread: hand ``event`` to the main thread."""
        self._events.put(event)
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def handle_events(self, timeout: float = 0.0) -> int:
        """Main thread: handle what vCPU threads posted (waiting up to
        ``timeout`` seconds for the first).  Returns how many were handled."""
        n = 0
        try:
            while True:
                ev = self._events.get(timeout=timeout) if timeout and not n else \
                    self._events.get_nowait()
                self._handle(ev)
                n += 1
        except queue.Empty:
            pass
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        return n

    def _handle(self, ev: tuple[str, int, Any]) -> None:
        kind, v, arg = ev
        if kind == "hotplug":
            self._hotplug(v, arg)
            self.threads[v].reply.set()
        elif kind == "done":
            self.done[v] = time.monotonic()
        elif kind == "parked":
            self.parked.add(v)
        elif kind == "error":
            self.errors.append(arg)
            self.done[v] = time.monotonic()

    def _hotplug(self, vcpu: int, k: int) -> None:
        """vCPU ``vcpu`` reached hot-add ``k``: add the RAM if no vCPU did
        yet (new segment, new slot, ``ram_block_add``), then give this vCPU
        its part of it."""
        if k != self.hotadd_counts[vcpu] or k >= len(self.cfg.hotplug):
            raise GuestError(f"vCPU {vcpu} asked for hot-add {k}, expected "
                             f"{self.hotadd_counts[vcpu]} of {len(self.cfg.hotplug)}")
        want = self.cfg.block_offsets()[:k + 2]
        if self.refused_from is None and len(self.ram.blocks) < len(want):
            try:
                self.ensure_blocks(want)
                self.hotadds.append((*want[-1], time.monotonic()))
            except (ShmDirtyError, OSError) as e:
                # Fails alone (issues 17.3, 18.7): the guest runs on with the
                # RAM it has; this and every later hot-add is refused.
                self.refused_from = k
                self.refusals.append((k, want[-1][1], str(e), time.monotonic()))
        if self.refused_from is None or k < self.refused_from:
            addr, entry = g.region_entry(self.cfg, vcpu, k + 1)
            self.write(addr, entry)
            self.write(g.params_addr(vcpu) + g.P_NREG, (k + 2).to_bytes(8, "little"))
        self.write(g.params_addr(vcpu) + g.P_ANSWERED, (k + 1).to_bytes(8, "little"))
        self.hotadd_counts[vcpu] = k + 1

    @property
    def finished(self) -> bool:
        """Every vCPU is done (or failed)."""
        return len(self.done) == self.cfg.vcpus

    def pause(self) -> list[VcpuState]:
        """Stop every running vCPU (each parks past any pending ``out``) and
        return the state of every vCPU."""
        self.stopping = True
        running = [v for v, t in self.threads.items() if v not in self.done]
        for v in running:
            t = self.threads[v]
            t.vcpu.set_immediate_exit(True)
            if self.vcpu_nice:
                # Stopping is the downtime: let a niced thread park at once.
                # Lowering a nice value needs CAP_SYS_NICE; without it, best effort.
                with contextlib.suppress(PermissionError):
                    os.setpriority(os.PRIO_PROCESS, t.native_id or 0, 0)
            signal.pthread_kill(t.ident or 0, STOP_SIGNAL)
        while any(v not in self.parked and v not in self.done for v in running):
            self.handle_events(timeout=1.0)
        return self.states()

    def resume(self) -> None:
        """Let parked vCPUs run again."""
        self.stopping = False
        for v in list(self.parked):
            t = self.threads[v]
            t.vcpu.set_immediate_exit(False)
            if self.vcpu_nice:
                os.setpriority(os.PRIO_PROCESS, t.native_id or 0, self.vcpu_nice)
            self.parked.discard(v)
            t.go.set()

    def states(self) -> list[VcpuState]:
        """Every vCPU's state; only while none runs (paused, or all done)."""
        return [VcpuState(v.index, v.index in self.done, bytes(v.get_regs()),
                          bytes(v.get_sregs())) for v in self.vm.vcpus]

    def progress(self) -> list[int]:
        """Steps done so far by each vCPU (the guest's own counter)."""
        raw = self.ram.views[0].reshape(-1)
        return [int(raw[(g.params_addr(v) + g.P_STEP) // 8]) for v in range(self.cfg.vcpus)]

    def results(self) -> list[dict[str, int]]:
        """Each vCPU's registers (with ``checksum`` = rax) once it is done."""
        out = []
        for st in self.states():
            regs = st.reg_dict()
            out.append({"checksum": regs["rax"], **regs})
        return out

    def run_to_end(self, timeout: float | None = None) -> None:
        """Start the vCPUs (if not yet) and serve them until all are done."""
        if not self.threads:
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the guest did not finish within {timeout} s")
            self.handle_events(timeout=0.5)

    def close(self) -> None:
        """Stop the vCPU threads, close the VM, unmap RAM (never unlinks)."""
        if self.threads and not self.finished:
            self.pause()
        self.stopping = self.closing = True
        for t in self.threads.values():
            t.reply.set()
            t.go.set()
        for t in self.threads.values():
            if t.is_alive():
                t.vcpu.set_immediate_exit(True)
                signal.pthread_kill(t.ident or 0, STOP_SIGNAL)
                t.join(timeout=5)
        if hasattr(self, "vm"):
            self.vm.close()
        self._kvm.close()
        self.ram.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
