"""The KVM guest: its program (assembled from ``guest_kvm.S``), its RAM
layout, its configuration, and the bytes the VM owner stores at boot.

Guest-physical addresses are RAM offsets (``DirtyMemory.ram_blocks()``),
identity-mapped with 2 MiB pages, so the guest's page ``p`` is the map's
page ``p``.  The first megabyte of RAM block 0 is reserved:

```
0x1000  parameter blocks, 256 bytes per vCPU (layout in guest_kvm.S)
0x2000  the program (CODE)
0x3000  PML4, then the PDPT, then one page directory per GiB (workers.kvm)
```

then come ``dataplane_pages`` pages that only the dataplane process writes
(virtio-blk buffers), then the vCPUs' parts: the rest of block 0 split in
``vcpus`` equal parts, vCPU i working on part i.  A hot-added block is split
the same way, and vCPU i's part of it is appended to vCPU i's region table
when that vCPU reaches the hot-add step (the guest asks with ``out 0x10``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import kvm
from .guest import PAGE_BITS

PAGE = 1 << PAGE_BITS
PARAMS = 0x1000
PARAM_BYTES = 256
CODE_ADDR = 0x2000
RESERVED = 1 << 20          # [0, 1 MiB) of block 0: parameters, code, page tables
MAX_VCPUS = PAGE // PARAM_BYTES
MAX_HOTPLUG = 4
MAX_REGIONS = 8
MAX_GIB = 64                # page tables map [0, 64 GiB): they must fit under RESERVED

PORT_HOTPLUG = 0x10
PORT_DONE = 0x11

# offsets in a parameter block (guest_kvm.S)
P_PATTERN, P_STEPS, P_SEED, P_HOT, P_NREG, P_STEP, P_CHECKSUM = 0, 8, 16, 24, 32, 40, 48
P_HOTPLUG, P_SPIN, P_REGIONS = 56, 88, 96
# Written by the VM owner only (the program never reads it): how many of
# this vCPU's hot-add requests were answered, made or refused.  It travels
# with guest RAM, so a destination knows which were refused (nregions - 1
# of them were made).
P_ANSWERED = 224

PATTERNS = {"random": 0, "sequential": 1, "hot": 2}
LCG_A = 6364136223846793005
LCG_C = 1442695040888963407
U64 = (1 << 64) - 1

# `as --64 guest_kvm.S; objcopy -O binary -j .text` (tests/test_guest_kvm.py
# re-assembles it and compares); DONE is the address of the `out 0x11` loop.
CODE = bytes.fromhex(
    "4989ff4d8b77104d8b67084d31ed4d31c949bb2d7f954c2df4515849b84f8167"
    "f77e7b051449c7c2ffffffff4983f904730d4b8b44cf384885c074034989c248"
    "31db498b4f20498d77604885c9740d48035e084883c61048ffc9ebee49833f02"
    "750c498b47184839d873034889c34d39e50f83ee0000004d39d50f84d8000000"
    "49833f01744f498b4f584d0faff34d01c648ffc975f44c89f048c1e820480faf"
    "c348c1e820498d7760488b4e084839c872094829c84883c610ebee48030648c1"
    "e00c4c89f148c1e91781e1ff0100004c0134c8eb774b8d5c3500498d7760498b"
    "4f204885c97465488b0648c1e00c488b560848d1ea48c1e20c488d3c1049f7c5"
    "01000000751f4885d27438488b284801dd4801fd48892f4883c0084883c70848"
    "83ea08ebe14885d27419488b2f488d6c6d004889284883c0084883c7084883ea"
    "08ebe24883c61048ffc9eb9649ffc54d896f28e916ffffff4489c8e61049ffc1"
    "e9c0feffff4831db498b4f20498d77604885c97438488b3e48c1e70c488b5608"
    "48c1e20c4801fa4839d773184889f848c1e8034883c801480faf074801c34883"
    "c708ebe34883c61048ffc9ebc349895f304889d8e611ebfc")
DONE = CODE_ADDR + 0x1B4


@dataclass(frozen=True)
class GuestConfig:
    """What the guest does; the stream header carries it to the destination.

    ``ram``: bytes of RAM block 0; ``steps``: page writes (random, hot) or
    passes (sequential) per vCPU; ``hotplug``: (step, bytes) pairs, the step
    of each vCPU's progress at which that RAM is hot-added (increasing,
    below ``steps``); ``dataplane_pages``: pages of block 0 reserved for the
    dataplane process."""

    ram: int = 128 << 20
    vcpus: int = 2
    pattern: str = "random"
    steps: int = 0                  # 0: the pattern's default (DEFAULT_STEPS)
    seed: int = 1
    hot_pages: int = 64
    spin: int = 0                   # LCG iterations per step (random, hot); 0: DEFAULT_SPIN
    hotplug: tuple[tuple[int, int], ...] = ()
    dataplane_pages: int = 256
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern {self.pattern!r}: one of {', '.join(PATTERNS)}")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ValueError(f"{self.vcpus} vCPUs: 1 to {MAX_VCPUS}")
        if min(self.steps, self.seed, self.spin, self.dataplane_pages) < 0 or self.hot_pages < 1:
            raise ValueError("steps, seed and dataplane pages must be >= 0, hot pages >= 1")
        if self.ram % (2 << 20) or self.ram < 4 << 20:
            raise ValueError(f"RAM {self.ram} bytes: a multiple of 2 MiB, at least 4 MiB")
        part = (self.ram - RESERVED) // PAGE - self.dataplane_pages
        if part < 2 * self.vcpus:
            raise ValueError(f"RAM {self.ram >> 20} MiB leaves no pages for {self.vcpus} "
                             "vCPU(s) after the reserved MiB and the dataplane pages")
        if len(self.hotplug) > MAX_HOTPLUG:
            raise ValueError(f"at most {MAX_HOTPLUG} hot-adds")
        last = 0
        for step, size in self.hotplug:
            if not last < step < self.total_steps:
                raise ValueError(f"hot-add steps must increase, from 1 to below "
                                 f"{self.total_steps} steps: {step}")
            if size % (2 << 20) or size // PAGE < 2 * self.vcpus:
                raise ValueError(f"hot-add size {size}: a multiple of 2 MiB")
            last = step
        if self.ram_total > MAX_GIB << 30:
            raise ValueError(f"guest RAM {self.ram_total >> 30} GiB: at most {MAX_GIB} GiB")

    @property
    def total_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.pattern]

    @property
    def total_spin(self) -> int:
        return self.spin or DEFAULT_SPIN

    @property
    def ram_total(self) -> int:
        """Bytes of RAM once every hot-add is done."""
        return self.ram + sum(size for _, size in self.hotplug)

    def block_offsets(self) -> list[tuple[int, int]]:
        """(offset, size) of block 0 and of each hot-added block, appended in order."""
        blocks = [(0, self.ram)]
        for _, size in self.hotplug:
            blocks.append((blocks[-1][0] + blocks[-1][1], size))
        return blocks

    def regions(self, vcpu: int, hotadds: int) -> list[tuple[int, int]]:
        """vCPU ``vcpu``'s region table after ``hotadds`` hot-adds: (first page, pages)."""
        out = []
        for b, (offset, size) in enumerate(self.block_offsets()[:hotadds + 1]):
            first = offset // PAGE
            pages = size // PAGE
            if b == 0:
                first += RESERVED // PAGE + self.dataplane_pages
                pages -= RESERVED // PAGE + self.dataplane_pages
            part = pages // self.vcpus
            out.append((first + vcpu * part, part))
        return out

    def dataplane_region(self) -> tuple[int, int]:
        """(first page, pages) of the dataplane's part of block 0."""
        return RESERVED // PAGE, self.dataplane_pages

    def seed_of(self, vcpu: int) -> int:
        return ((self.seed + vcpu) * 0x9E3779B97F4A7C15 + 1) & U64

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("extra")
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GuestConfig:
        d = json.loads(text)
        d["hotplug"] = tuple((int(s), int(z)) for s, z in d.get("hotplug", ()))
        return cls(**d)


# Steps per vCPU when --steps is not given, and LCG iterations per step:
# about 5-8 s of guest work on this machine (2 vCPUs, 128 MiB + 64 MiB),
# longer than its migration, so the destination resumes a running guest.
# The spin keeps the random pattern's page writes (~6,000/s per vCPU) below
# what the stream carries, so its pre-copy can converge; sequential sweeps
# dirty whole arrays per pass and never converge (QEMU would throttle).
DEFAULT_STEPS = {"random": 40_000, "sequential": 200, "hot": 40_000}
DEFAULT_SPIN = 20_000


def params_addr(vcpu: int) -> int:
    return PARAMS + vcpu * PARAM_BYTES


def boot_image(cfg: GuestConfig) -> list[tuple[int, bytes]]:
    """(guest address, bytes) to store in RAM block 0 before the first run:
    the parameter blocks, the program and the page tables."""
    out: list[tuple[int, bytes]] = []
    gib = max(1, -(-cfg.ram_total // (1 << 30)))
    for v in range(cfg.vcpus):
        p = np.zeros(PARAM_BYTES // 8, np.uint64)
        p[P_PATTERN // 8] = PATTERNS[cfg.pattern]
        p[P_STEPS // 8] = cfg.total_steps
        p[P_SEED // 8] = cfg.seed_of(v)
        p[P_HOT // 8] = cfg.hot_pages
        p[P_SPIN // 8] = cfg.total_spin
        for k, (step, _) in enumerate(cfg.hotplug):
            p[P_HOTPLUG // 8 + k] = step
        regions = cfg.regions(v, 0)
        p[P_NREG // 8] = len(regions)
        for r, (first, pages) in enumerate(regions):
            p[P_REGIONS // 8 + 2 * r:P_REGIONS // 8 + 2 * r + 2] = (first, pages)
        out.append((params_addr(v), p.tobytes()))
    out.append((CODE_ADDR, CODE))
    out.append(kvm.page_tables(gib))
    return out


def region_entry(cfg: GuestConfig, vcpu: int, hotadds: int) -> tuple[int, bytes]:
    """(guest address, bytes) the VM owner stores when vCPU ``vcpu`` has made
    its ``hotadds``-th hot-add: the new region entry and the new count.
    The two are adjacent only through the parameter block, so two writes."""
    first, pages = cfg.regions(vcpu, hotadds)[hotadds]
    entry = np.array([first, pages], np.uint64).tobytes()
    return params_addr(vcpu) + P_REGIONS + 16 * hotadds, entry


def entry_regs(vcpu: int) -> dict[str, int]:
    """General registers at boot."""
    return {"rip": CODE_ADDR, "rdi": params_addr(vcpu), "rflags": 0x202}
