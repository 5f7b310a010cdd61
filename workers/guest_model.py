"""An independent model of the guest program, in numpy.

It computes, from the ``GuestConfig`` alone, what every vCPU of a correct
run ends with: its checksum and its final registers.  It shares nothing
with the VM but the configuration and the region layout; the program's
rules are re-implemented here from the comments of ``guest_kvm.S``.

- random and hot: a step runs the LCG ``spin`` times, i.e. one step of the
  LCG x -> A^spin x + C (1 + A + ... + A^(spin-1)); a batch of steps is then
  a jump-ahead table, and the writes are additions, so their order does not
  matter and a whole batch is one ``np.add.at``;
- sequential: every word of a half-region holds c + d * B (B: the guest
  address of the word's b-half partner) with scalars c and d that every
  pass changes the same way, so passes cost O(1) each and only the final
  contents are built.
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


def _lcg_step(spin: int) -> tuple[int, int]:
    """(a, c): ``spin`` LCG iterations as one, x -> a x + c (mod 2^64)."""
    a, c = 1, 0
    for _ in range(spin):
        a, c = (a * LCG_A) & U64, (c * LCG_A + LCG_C) & U64
    return a, c


def _lcg_tables(n: int, step: tuple[int, int]) -> tuple[U64Array, U64Array]:
    """a[k] = A^(k+1), c[k] = C * (1 + A + ... + A^k) mod 2^64 for the LCG
    ``step`` = (A, C), k < n: x after k+1 more steps is a[k] * x + c[k]."""
    powers = np.full(n, step[0], np.uint64)
    np.multiply.accumulate(powers, out=powers)                 # A^1 .. A^n
    prev = np.concatenate(([np.uint64(1)], powers[:-1]))        # A^0 .. A^(n-1)
    c = np.cumsum(prev * np.uint64(step[1]), dtype=np.uint64)
    return powers, c


def expected(cfg: GuestConfig, made: int | None = None) -> list[dict[str, int]]:
    """Per vCPU: {"checksum", and the registers the program leaves}.
    ``made``: how many hot-adds were made (None: every one the guest asks
    for); the ones asked for after a refused one are refused too, and a
    refused hot-add leaves the guest's region table as it was."""
    steps = cfg.total_steps
    hot_steps = [s for s, _ in cfg.hotplug if s < steps]
    made = len(hot_steps) if made is None else min(made, len(hot_steps))
    a_tab, c_tab = _lcg_tables(min(BATCH, steps) or 1, _lcg_step(cfg.total_spin))
    out = []
    for v in range(cfg.vcpus):
        final = cfg.regions(v, made)
        sizes = [pages for _, pages in final]
        mem = np.zeros(sum(sizes) * _Q, np.uint64)     # the regions, concatenated
        x = cfg.seed_of(v)
        bounds = [0, *hot_steps, steps]
        for k in range(len(bounds) - 1):               # between two hot-adds
            lo, hi = bounds[k], bounds[k + 1]
            npages = sum(sizes[:min(k, made) + 1])
            if cfg.pattern == "sequential":
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
        if cfg.pattern == "sequential":
            _sweep(mem, final, x, [*bounds[:made + 1], steps])
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


def _sweep(mem: U64Array, regions: list[tuple[int, int]], x: int, bounds: list[int]) -> None:
    """The sequential pattern's end contents of ``regions`` (first page,
    pages), concatenated in ``mem``; region k joins at pass ``bounds[k]``;
    ``x`` is the seed.  Per half-region, word = c + d * B (module doc)."""
    end = bounds[-1]
    pos = 0
    for k, (first, pages) in enumerate(regions):
        ac = ad = bc = bd = 0              # a = ac + ad * B, b = bc + bd * B
        for n in range(bounds[k], end):
            if n % 2 == 0:                 # copy: b = a + x + n + B
                bc, bd = (ac + x + n) & U64, (ad + 1) & U64
            else:                          # scale: a = 3 b
                ac, ad = (3 * bc) & U64, (3 * bd) & U64
        half = pages // 2 * _Q
        addr_b = (np.arange(half, dtype=np.uint64) + np.uint64(first * _Q + half)) \
            * np.uint64(8)
        mem[pos:pos + half] = addr_b * np.uint64(ad) + np.uint64(ac)
        mem[pos + half:pos + 2 * half] = addr_b * np.uint64(bd) + np.uint64(bc)
        pos += pages * _Q
