"""An independent model of the guest program, in numpy.

It computes, from the ``GuestConfig`` alone, what every vCPU of a correct
run ends with: its checksum and its final registers.  It shares nothing
with the VM but the configuration and the region layout; the program's
rules are re-implemented here from the comments of ``guest_kvm.S``.
The writes of the random and hot patterns are additions, so their order
does not matter and a whole batch is one ``np.add.at``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .guest_kvm import (
    DONE,
    LCG_A,
    LCG_C,
    MAX_HOTPLUG,
    P_REGIONS,
    PAGE,
    U64,
    GuestConfig,
    params_addr,
)

BATCH = 1 << 20
_Q = PAGE // 8   # u64 per page

U64Array = np.ndarray[Any, np.dtype[np.uint64]]


def _lcg_tables(n: int) -> tuple[U64Array, U64Array]:
    """a[k] = A^(k+1), c[k] = C * (1 + A + ... + A^k) mod 2^64, k < n: then
    x after k+1 more steps is a[k] * x + c[k]."""
    powers = np.full(n, LCG_A, np.uint64)
    np.multiply.accumulate(powers, out=powers)                 # A^1 .. A^n
    prev = np.concatenate(([np.uint64(1)], powers[:-1]))        # A^0 .. A^(n-1)
    c = np.cumsum(prev * np.uint64(LCG_C), dtype=np.uint64)
    return powers, c


def expected(cfg: GuestConfig) -> list[dict[str, int]]:
    """Per vCPU: {"checksum", and the registers the program leaves}."""
    steps = cfg.total_steps
    hot_steps = [s for s, _ in cfg.hotplug if s < steps]
    a_tab, c_tab = _lcg_tables(min(BATCH, steps) or 1)
    out = []
    for v in range(cfg.vcpus):
        final = cfg.regions(v, len(hot_steps))
        sizes = [pages for _, pages in final]
        mem = np.zeros(sum(sizes) * _Q, np.uint64)     # the regions, concatenated
        x = cfg.seed_of(v)
        bounds = [0, *hot_steps, steps]
        for k in range(len(bounds) - 1):               # between two hot-adds
            lo, hi = bounds[k], bounds[k + 1]
            npages = sum(sizes[:k + 1])
            if cfg.pattern == "sequential":
                _sweep(mem, final[:k + 1], x, lo, hi)
                continue
            if cfg.pattern == "hot":
                npages = min(npages, cfg.hot_pages)
            for start in range(lo, hi, BATCH):
                n = min(BATCH, hi - start)
                xs = a_tab[:n] * np.uint64(x) + c_tab[:n]
                x = int(xs[-1])
                page = ((xs >> np.uint64(32)) * np.uint64(npages)) >> np.uint64(32)
                word = page * np.uint64(_Q) + ((xs >> np.uint64(23)) & np.uint64(511))
                np.add.at(mem, word.astype(np.intp), xs)
        checksum = 0
        pos = 0
        for first, pages in final:
            q = mem[pos:pos + pages * _Q]
            w = np.arange(first * _Q, (first + pages) * _Q, dtype=np.uint64) | np.uint64(1)
            checksum = (checksum + int((q * w).sum(dtype=np.uint64))) & U64
            pos += pages * _Q
        del mem
        last_first, last_pages = final[-1]
        nxt = cfg.hotplug[len(hot_steps)][0] if len(hot_steps) < min(
            len(cfg.hotplug), MAX_HOTPLUG) else U64
        end = (last_first + last_pages) * PAGE
        out.append({"checksum": checksum, "rax": checksum, "rbx": checksum, "rcx": 0,
                    "rdx": end, "rdi": end,
                    "rsi": params_addr(v) + P_REGIONS + 16 * len(final),
                    "r8": LCG_C, "r9": len(hot_steps), "r10": nxt, "r11": LCG_A,
                    "r12": steps, "r13": steps, "r14": x, "r15": params_addr(v),
                    "rip": DONE + 2})
    return out


def _sweep(mem: U64Array, regions: list[tuple[int, int]], x: int, lo: int, hi: int) -> None:
    """Passes [lo, hi) of the sequential pattern over ``regions`` (first page,
    pages), concatenated in ``mem``; ``x`` is the seed."""
    for n in range(lo, hi):
        pos = 0
        for first, pages in regions:
            half = pages // 2 * _Q
            a = mem[pos:pos + half]
            b = mem[pos + half:pos + 2 * half]
            if n % 2 == 0:
                addr_b = (np.arange(half, dtype=np.uint64) + np.uint64(first * _Q + half)) \
                    * np.uint64(8)
                np.add(a, np.uint64((x + n) & U64), out=b)
                b += addr_b
            else:
                np.multiply(b, np.uint64(3), out=a)
            pos += pages * _Q
