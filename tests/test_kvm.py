"""workers.kvm: struct layouts against kvm.h, and a VM that runs."""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest
from kvm_skip import needs_cc, needs_kvm

from shmdirty.workers import kvm

C_LAYOUT = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
int main(void) {
  printf("%zu %zu %zu %zu %zu %zu\n", sizeof(struct kvm_userspace_memory_region),
         sizeof(struct kvm_dirty_log), sizeof(struct kvm_regs), sizeof(struct kvm_sregs),
         sizeof(struct kvm_segment), sizeof(struct kvm_dtable));
  printf("%zu %zu %zu %zu %zu %zu\n", offsetof(struct kvm_regs, rip),
         offsetof(struct kvm_sregs, cr0), offsetof(struct kvm_sregs, efer),
         offsetof(struct kvm_sregs, interrupt_bitmap), offsetof(struct kvm_run, exit_reason),
         offsetof(struct kvm_run, io));
  printf("%lu %lu %lu %lu %lu %lu %lu\n", (unsigned long)KVM_RUN,
         (unsigned long)KVM_GET_REGS, (unsigned long)KVM_SET_REGS,
         (unsigned long)KVM_GET_SREGS, (unsigned long)KVM_SET_SREGS,
         (unsigned long)KVM_SET_USER_MEMORY_REGION, (unsigned long)KVM_GET_DIRTY_LOG);
  return 0;
}
"""


@needs_cc
def test_layouts_match_kvm_h(tmp_path: pytest.TempPathFactory) -> None:
    src = tmp_path / "layout.c"  # type: ignore[operator]
    src.write_text(C_LAYOUT)
    exe = tmp_path / "layout"  # type: ignore[operator]
    cc = subprocess.run(["cc", "-o", str(exe), str(src)], capture_output=True, text=True)
    if cc.returncode:
        pytest.skip(f"linux/kvm.h does not compile here: {cc.stderr.strip()[:200]}")
    sizes, offsets, numbers = (list(map(int, line.split()))
                               for line in subprocess.check_output([str(exe)]).splitlines())
    assert sizes == [ctypes.sizeof(t) for t in (kvm.UserspaceMemoryRegion, kvm.DirtyLog,
                                                kvm.Regs, kvm.Sregs, kvm.KvmSegment,
                                                kvm.DTable)]
    assert offsets == [kvm.Regs.rip.offset, kvm.Sregs.cr0.offset, kvm.Sregs.efer.offset,
                       kvm.Sregs.interrupt_bitmap.offset, kvm.RUN_EXIT_REASON, kvm.RUN_IO]
    assert numbers == [kvm.KVM_RUN, kvm.KVM_GET_REGS, kvm.KVM_SET_REGS, kvm.KVM_GET_SREGS,
                       kvm.KVM_SET_SREGS, kvm.KVM_SET_USER_MEMORY_REGION,
                       kvm.KVM_GET_DIRTY_LOG]


def test_page_tables_identity_map_2m_pages() -> None:
    addr, raw = kvm.page_tables(2)
    words = np.frombuffer(raw, np.uint64)
    assert addr == kvm.PML4 and len(raw) == 4 * 4096
    assert words[0] == kvm.PDPT | 7
    assert list(words[512:514]) == [kvm.PD | 7, kvm.PD + 0x1000 | 7]
    pds = words[1024:]
    assert pds[0] == 0x87 and pds[1] == (2 << 20) | 0x87 and pds[1023] == (1023 << 21) | 0x87
    with pytest.raises(ValueError):
        kvm.page_tables(0)


def test_unaligned_slot_refused_before_any_ioctl() -> None:
    vm = kvm.Vm.__new__(kvm.Vm)   # no fd needed: the check comes first
    vm.fd = -1
    with pytest.raises(ValueError, match="not 4 KiB aligned"):
        vm.set_memory_region(0, 0x1000, 0x1800, 0)


@needs_kvm
def test_a_vm_runs_user_mode_code_and_logs_its_writes() -> None:
    import mmap
    mem = mmap.mmap(-1, 4 << 20)
    ram = np.frombuffer(mem, np.uint8)
    # mov qword ptr [0x200000], rax ; out 0x11, al
    code = bytes.fromhex("48890425" "00002000") + bytes.fromhex("e611")
    ram[0x2000:0x2000 + len(code)] = np.frombuffer(code, np.uint8)
    addr, tables = kvm.page_tables(1)
    ram[addr:addr + len(tables)] = np.frombuffer(tables, np.uint8)
    try:
        with kvm.Kvm() as k, k.create_vm() as vm:
            vm.set_memory_region(0, 0, len(mem), ram.ctypes.data)
            log = np.zeros(1024 // 64, np.uint64)
            vm.get_dirty_log(0, log)            # start from a clean log
            v = vm.create_vcpu(0)
            v.set_sregs(kvm.user_mode_sregs(v))
            regs = v.get_regs()
            regs.rip, regs.rax, regs.rflags = 0x2000, 0xDEADBEEF, 0x202
            v.set_regs(regs)
            assert v.run() == kvm.EXIT_IO
            assert v.io_exit()[:2] == (True, 0x11)
            v.complete_pending_io()
            assert v.get_regs().rip == 0x2000 + len(code)
            vm.get_dirty_log(0, log)
            page = 0x200000 >> 12
            assert (int(log[page // 64]) >> (page % 64)) & 1
            assert int(np.frombuffer(mem, np.uint64)[0x200000 // 8]) == 0xDEADBEEF
    finally:
        del ram
        mem.close()


def test_usable_says_why() -> None:
    ok, why = kvm.usable()
    assert isinstance(ok, bool) and why
