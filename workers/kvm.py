"""A thin ctypes layer over the KVM ioctls a live migration needs.

Only what ``workers.vm`` uses: create a VM, memory slots with dirty
logging (``KVM_SET_USER_MEMORY_REGION``, ``KVM_GET_DIRTY_LOG``), vCPUs
(``KVM_RUN``, the mapped ``kvm_run`` area, ``KVM_GET/SET_REGS``,
``KVM_GET/SET_SREGS``) and the 64-bit user-mode set-up that runs natively
on this machine's KVM.  Numbers and layouts are x86_64's, from
``/usr/include/linux/kvm.h`` (``tests/test_kvm.py`` compiles a C program
that prints them, where ``cc`` exists); the facts behind the set-up are in
``docs/KVM_GUEST.md`` and the kernel's Documentation/virt/kvm/api.rst.

Rules from KVM itself:

- only the process that created a VM may use its fds (a fork or a process
  that received the fds gets EIO), so one process owns the VM;
- ``KVM_RUN`` blocks in the kernel with the GIL released (ctypes drops it
  for every foreign call); a signal with a Python handler, sent to the
  vCPU thread with ``signal.pthread_kill``, makes it fail with EINTR
  (``InterruptedError``), and ``immediate_exit`` makes the next one return
  EINTR at once, so a stop request cannot be missed between two checks;
- guest RAM stores made by host processes are not in KVM's dirty log.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Any

import numpy as np

from shmdirty.errors import ShmDirtyError

DEV_KVM = "/dev/kvm"
API_VERSION = 12

# ioctl numbers (x86_64, _IO/_IOR/_IOW/_IOWR of KVMIO 0xAE)
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_GET_DIRTY_LOG = 0x4010AE42
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84

KVM_CAP_NR_MEMSLOTS = 10
KVM_MEM_LOG_DIRTY_PAGES = 1

EXIT_IO = 2
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17
EXIT_NAMES = {EXIT_IO: "IO", EXIT_HLT: "HLT", EXIT_MMIO: "MMIO", EXIT_SHUTDOWN: "SHUTDOWN",
              EXIT_FAIL_ENTRY: "FAIL_ENTRY", EXIT_INTR: "INTR",
              EXIT_INTERNAL_ERROR: "INTERNAL_ERROR"}

# kvm_run: offsets into the vCPU fd's mapping
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IO = 32          # direction u8, size u8, port u16, count u32, data_offset u64


class KvmError(ShmDirtyError, OSError):
    """A KVM ioctl failed, or /dev/kvm is not usable here."""


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class DirtyLog(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                ("bitmap", ctypes.c_uint64)]


REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in REG_NAMES]

    def as_dict(self) -> dict[str, int]:
        return {n: int(getattr(self, n)) for n in REG_NAMES}


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment),
                ("fs", KvmSegment), ("gs", KvmSegment), ("ss", KvmSegment),
                ("tr", KvmSegment), ("ldt", KvmSegment), ("gdt", DTable), ("idt", DTable),
                ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
                ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
                ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4)]


# The layouts kvm.h gives (checked against a compiled program by the tests).
STRUCT_SIZES = {"kvm_userspace_memory_region": 32, "kvm_dirty_log": 16, "kvm_regs": 144,
                "kvm_sregs": 312, "kvm_segment": 24, "kvm_dtable": 16}
for _s, _n in ((UserspaceMemoryRegion, 32), (DirtyLog, 16), (Regs, 144), (Sregs, 312),
               (KvmSegment, 24), (DTable, 16)):
    assert ctypes.sizeof(_s) == _n, (_s, ctypes.sizeof(_s))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """``ioctl(fd, request, arg)`` through libc with the GIL released;
    ``arg`` is None, an int, or a ctypes object passed by pointer.
    Raises ``InterruptedError`` on EINTR (never retried), ``KvmError`` otherwise."""
    if arg is None:
        ptr: Any = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = int(_libc.ioctl(fd, request, ptr))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            raise InterruptedError(err, "KVM_RUN interrupted")
        raise KvmError(err, f"ioctl {request:#x} on fd {fd}: {os.strerror(err)}")
    return ret


def usable() -> tuple[bool, str]:
    """Whether a VM with a vCPU can be made here: (ok, why) in one line."""
    if not os.path.exists(DEV_KVM):
        return False, f"{DEV_KVM} does not exist (no KVM on this machine)"
    try:
        with Kvm() as kvm, kvm.create_vm() as vm:
            vm.create_vcpu(0).close()
    except OSError as e:
        return False, f"{DEV_KVM} is not usable: {e.strerror or e}"
    return True, f"{DEV_KVM} works (API version {API_VERSION})"


class Kvm:
    """The open /dev/kvm."""

    def __init__(self) -> None:
        try:
            self.fd = os.open(DEV_KVM, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(e.errno, f"cannot open {DEV_KVM}: {e.strerror}") from None
        try:
            version = ioctl(self.fd, KVM_GET_API_VERSION)
            if version != API_VERSION:
                raise KvmError(errno.ENOTSUP, f"KVM API version {version}, expected "
                               f"{API_VERSION}")
            self.vcpu_mmap_size = ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def create_vm(self) -> Vm:
        return Vm(self, ioctl(self.fd, KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm:
    """A VM: memory slots and vCPUs.  Closing it closes its vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm, self.fd = kvm, fd
        self.vcpus: list[Vcpu] = []

    def set_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                          userspace_addr: int, *, log_dirty: bool = True) -> None:
        """Register (or, with ``size`` 0, delete) memory slot ``slot``: guest
        physical [addr, addr+size) backed by host memory at ``userspace_addr``.
        All three 4 KiB aligned.  Slots cannot be resized in place (EINVAL)
        nor overlap (EEXIST)."""
        for what, v in (("guest address", guest_phys_addr), ("size", size),
                        ("host address", userspace_addr)):
            if v % 4096:
                raise ValueError(f"slot {slot}: {what} {v:#x} is not 4 KiB aligned")
        region = UserspaceMemoryRegion(slot, KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
                                       guest_phys_addr, size, userspace_addr)
        ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, bitmap: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
        """``KVM_GET_DIRTY_LOG``: fill ``bitmap`` (uint64, ceil(pages/64)
        words: bit i = page i of the slot, little-endian words) and re-arm
        logging.  The kernel writes the whole slot's bitmap: ``bitmap``
        must be at least that long (there is no length field)."""
        if bitmap.dtype != np.uint64 or not bitmap.flags.c_contiguous:
            raise ValueError("the dirty-log bitmap must be a contiguous uint64 array")
        ioctl(self.fd, KVM_GET_DIRTY_LOG, DirtyLog(slot, 0, bitmap.ctypes.data))

    def create_vcpu(self, index: int) -> Vcpu:
        vcpu = Vcpu(self, index, ioctl(self.fd, KVM_CREATE_VCPU, index))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vcpu:
    """One vCPU: its fd and its mapped ``kvm_run`` area."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.index, self.fd = index, fd
        try:
            self._run = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise

    def run(self) -> int:
        """``KVM_RUN`` until the next exit; returns the exit reason.
        ``InterruptedError`` when a signal (or ``immediate_exit``) stopped it."""
        ioctl(self.fd, KVM_RUN, 0)
        return int.from_bytes(self._run[RUN_EXIT_REASON:RUN_EXIT_REASON + 4], "little")

    def set_immediate_exit(self, on: bool) -> None:
        """While set, ``run()`` returns EINTR at once (before or inside the guest)."""
        self._run[RUN_IMMEDIATE_EXIT] = 1 if on else 0

    def io_exit(self) -> tuple[bool, int, int, int]:
        """The last IO exit: (out?, port, size, value of its first element)."""
        d, size = self._run[RUN_IO], self._run[RUN_IO + 1]
        port = int.from_bytes(self._run[RUN_IO + 2:RUN_IO + 4], "little")
        off = int.from_bytes(self._run[RUN_IO + 8:RUN_IO + 16], "little")
        return d == 1, port, size, int.from_bytes(self._run[off:off + size], "little")

    def complete_pending_io(self) -> None:
        """Let KVM finish a pending ``out`` without running guest code, so
        the saved registers are past it (docs/KVM_GUEST.md: ``immediate_exit``, one ``KVM_RUN``)."""
        self.set_immediate_exit(True)
        try:
            ioctl(self.fd, KVM_RUN, 0)
        except InterruptedError:
            pass
        finally:
            self.set_immediate_exit(False)

    def get_regs(self) -> Regs:
        r = Regs()
        ioctl(self.fd, KVM_GET_REGS, r)
        return r

    def set_regs(self, r: Regs) -> None:
        ioctl(self.fd, KVM_SET_REGS, r)

    def get_sregs(self) -> Sregs:
        s = Sregs()
        ioctl(self.fd, KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: Sregs) -> None:
        ioctl(self.fd, KVM_SET_SREGS, s)

    def close(self) -> None:
        if self.fd >= 0:
            self._run.close()
            os.close(self.fd)
            self.fd = -1


# -- 64-bit user mode (the only mode that runs natively under this KVM) -------

PML4 = 0x3000
PDPT = 0x4000
PD = 0x5000            # one page directory per GiB of guest-physical space
PTE_USER_RW = 0x7      # present, writable, user
PDE_2M = 0x80


def page_tables(gib: int) -> tuple[int, bytes]:
    """Identity-map [0, gib GiB) with 2 MiB user pages: (guest address, bytes)
    of the PML4, PDPT and ``gib`` page directories, to be stored at ``PML4``."""
    if not 1 <= gib <= 512:
        raise ValueError(f"page tables for {gib} GiB: 1 to 512 GiB")
    pml4 = np.zeros(512, np.uint64)
    pml4[0] = PDPT | PTE_USER_RW
    pdpt = np.zeros(512, np.uint64)
    pdpt[:gib] = PD + 0x1000 * np.arange(gib, dtype=np.uint64) | PTE_USER_RW
    pds = (np.arange(gib * 512, dtype=np.uint64) << np.uint64(21)) | np.uint64(
        PTE_USER_RW | PDE_2M)
    return PML4, pml4.tobytes() + pdpt.tobytes() + pds.tobytes()


def user_mode_sregs(vcpu: Vcpu) -> Sregs:
    """The vCPU's special registers set for 64-bit CPL 3 with paging at
    ``PML4``: flat code (selector 0x33) and data (0x2B) segments, no GDT."""
    s = vcpu.get_sregs()
    s.cs = KvmSegment(0, 0xFFFFFFFF, 0x33, 11, 1, 3, 0, 1, 1, 1, 0, 0, 0)
    data = KvmSegment(0, 0xFFFFFFFF, 0x2B, 3, 1, 3, 1, 1, 0, 1, 0, 0, 0)
    s.ds = s.es = s.fs = s.gs = s.ss = data
    s.cr3 = PML4
    s.cr4 = 0x10020      # PAE, FSGSBASE
    s.efer = 0x501       # SCE, LME, LMA
    s.cr0 = 0x80050033   # PG, AM, WP, NE, ET, MP, PE
    return s
