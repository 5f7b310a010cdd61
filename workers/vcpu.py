"""A vCPU: writes guest pages at a steady rate, then marks them dirty.

Each batch writes real bytes into the RAM segments (a stamp naming the vCPU,
the page and a per-vCPU write counter: see ``workers.guest``), and only THEN
sets the pages' dirty bits, as a guest store reaches memory before QEMU or
KVM records it.  Two ways to mark, as in QEMU:

- ``flag``: ``set_dirty_flag`` per page for MIGRATION and VGA (what TCG's
  notdirty write path does, minus CODE);
- ``lebitmap``: the batch's pages go into a little-endian bitmap per RAM
  block, merged with ``set_dirty_lebitmap`` (what a KVM dirty-log sync does).

Where it writes: ``uniform`` (any page), ``hot`` (90% of writes in a hot set
of ``hot_fraction`` of RAM, its own for each vCPU), ``sequential`` (a cursor
per vCPU walking RAM and wrapping).  New RAM is used as soon as it appears.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from shmdirty import DIRTY_MEMORY_MIGRATION, DIRTY_MEMORY_VGA, DirtyMemory

from . import Control, Flags, worker
from .guest import TAG_VCPU, GuestRam, stamp
from .reports import VcpuDone

PATTERNS = ("uniform", "hot", "sequential")
MODES = ("flag", "lebitmap")
HOT_SHARE = 0.9        # share of a hot-pattern vCPU's writes that go to its hot set
INTERVAL = 0.01        # seconds between batches (pacing, not synchronisation)
MAX_LAG = 0.05         # a batch writes at most this many seconds' worth of pages


@dataclass(frozen=True)
class VcpuConfig:
    index: int
    vcpus: int
    rate: float                 # pages written per second
    pattern: str = "uniform"
    mode: str = "flag"
    seed: int = 0
    hot_fraction: float = 0.05


class PagePicker:
    """The pages a vCPU writes next, reproducible from (seed, index)."""

    def __init__(self, cfg: VcpuConfig) -> None:
        if cfg.pattern not in PATTERNS:
            raise ValueError(f"pattern {cfg.pattern!r} is not one of {PATTERNS}")
        self.cfg = cfg
        self.rng = np.random.default_rng([cfg.seed, cfg.index])
        self.cursor: int | None = None

    def pick(self, npages: int, count: int) -> np.ndarray[Any, np.dtype[np.int64]]:
        """``count`` page numbers in [0, npages)."""
        cfg, rng = self.cfg, self.rng
        home = cfg.index * npages // max(cfg.vcpus, 1)
        if cfg.pattern == "uniform":
            return rng.integers(0, npages, count, dtype=np.int64)
        if cfg.pattern == "hot":
            hot = max(1, int(npages * cfg.hot_fraction))
            in_hot = rng.random(count) < HOT_SHARE
            return np.where(in_hot, (home + rng.integers(0, hot, count)) % npages,
                            rng.integers(0, npages, count)).astype(np.int64)
        if self.cursor is None:
            self.cursor = home
        pages = (self.cursor + np.arange(count, dtype=np.int64)) % npages
        self.cursor = (self.cursor + count) % npages
        return pages


def write_pages(ram: GuestRam, pages: np.ndarray[Any, Any], vcpu: int, seq0: int) -> None:
    """Write the stamp of ``vcpu`` into every page of ``pages`` (write
    counter ``seq0``, ``seq0 + 1``, ...)."""
    words = ram.page_size // 8
    for b, local, sel in ram.split(pages):
        rows = np.empty((len(local), words), dtype=np.uint64)
        stamp(rows, pages[sel], TAG_VCPU | vcpu, seq0 + sel)
        ram.views[b][local] = rows


def mark_flag(dm: DirtyMemory, pages: np.ndarray[Any, Any]) -> None:
    """Mark pages dirty one by one (MIGRATION and VGA), in one read-side section."""
    bits = dm.page_bits
    with dm.read_section():
        for p in pages.tolist():
            dm.set_dirty_flag(p << bits, DIRTY_MEMORY_MIGRATION)
            dm.set_dirty_flag(p << bits, DIRTY_MEMORY_VGA)


def mark_lebitmap(dm: DirtyMemory, ram: GuestRam, pages: np.ndarray[Any, Any]) -> None:
    """Mark pages dirty KVM-style: one little-endian bitmap per RAM block."""
    for b, local, _ in ram.split(pages):
        offset, size = ram.blocks[b]
        n = size >> ram.page_bits
        log = np.zeros((n + 63) // 64, dtype=np.uint64)
        local = local.astype(np.uint64)
        np.bitwise_or.at(log, (local >> np.uint64(6)).astype(np.intp),
                         np.left_shift(np.uint64(1), local & np.uint64(63)))
        dm.set_dirty_lebitmap(log, offset, n)


def main(dm: DirtyMemory, cfg: VcpuConfig, ctl: Control) -> None:
    """Entry point: dirty pages until the STOP flag; then set this vCPU's stopped flag."""
    with worker(f"vcpu{cfg.index}", ctl):
        try:
            _run(dm, cfg, ctl)
        finally:
            # After the last write and its dirty bit: the migrator's final
            # sync waits for this.
            ctl.flags.set(Flags.VCPU_STOPPED + cfg.index)
            dm.close()


def _run(dm: DirtyMemory, cfg: VcpuConfig, ctl: Control) -> None:
    if cfg.mode not in MODES:
        raise ValueError(f"dirty mode {cfg.mode!r} is not one of {MODES}")
    ram = GuestRam(dm.name, dm.page_bits)
    picker = PagePicker(cfg)
    known = -1
    written = batches = 0
    try:
        if not ctl.start(f"vcpu{cfg.index}"):
            return
        t0 = time.monotonic()
        due_total = 0
        max_batch = max(1, int(cfg.rate * MAX_LAG))
        flags = ctl.flags
        while not flags.is_set(Flags.STOP) and not ctl.aborted():
            size = dm.ram_size
            if size != known:  # RAM was hot-added: map the new blocks
                ram.update(dm.ram_blocks())
                known = size
            due = int(cfg.rate * (time.monotonic() - t0)) - due_total
            if due > max_batch:  # fell behind (a busy machine): drop the debt
                due_total += due - max_batch
                due = max_batch
            if due > 0:
                pages = picker.pick(ram.npages, due)
                write_pages(ram, pages, cfg.index, written)   # the bytes first,
                if cfg.mode == "flag":                         # then the dirty bits
                    mark_flag(dm, pages)
                else:
                    mark_lebitmap(dm, ram, pages)
                due_total += due
                written += due
                batches += 1
            flags.wait(Flags.STOP, INTERVAL)
        ctl.report(VcpuDone(cfg.index, written, batches, time.monotonic() - t0))
    finally:
        ram.close()
