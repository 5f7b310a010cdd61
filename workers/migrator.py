"""The migration thread of QEMU, as a process: pre-copy, then stop-and-copy.

It keeps a process-local migration bitmap (one bit per guest page, uint64
words indexed by global page, as ``sync_dirty_bitmap`` wants).  It starts
all ones (the bulk stage: every page is sent once) and grows with RAM; new
pages start dirty, like ``migration_bitmap_extend``.  Each round:

1. map new RAM blocks (source and destination), grow the bitmap;
2. ``sync_dirty_bitmap``: take the MIGRATION bits into the bitmap;
3. if this is not the first round and at most ``threshold`` pages are
   dirty, pre-copy has converged: go to stop-and-copy;
4. copy every dirty page into the destination image (taking the bit before
   copying the page: a write after the copy leaves a bit for the next
   round), at most ``bandwidth`` bytes per second;

until ``max_rounds`` rounds are done.  Stop-and-copy sets the STOP flag,
waits until every vCPU and the hot-plug worker has stopped, syncs once more
and copies what is left without a rate limit.

``drop_round`` (testing only) discards the bitmap of that round instead of
sending it: a migration that loses dirty pages, which the final comparison
must catch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from shmdirty import DirtyMemory

from . import Control, Flags, worker
from .guest import GuestRam
from .reports import Done, Downtime, DowntimeDone, RoundEnd, RoundStart, Sent, Stopping

STOP_TIMEOUT = 30.0     # seconds to wait for the vCPUs to say they stopped
REPORT_EVERY = 0.05     # seconds between progress reports


@dataclass(frozen=True)
class MigratorConfig:
    bandwidth: float = 24 << 20     # bytes per second during pre-copy; 0: unlimited
    threshold: int = 256            # dirty pages at which pre-copy has converged
    max_rounds: int = 30
    chunk_pages: int = 64           # pages copied between two rate-limit checks
    drop_round: int = 0             # testing: forget this round's dirty pages
    hotplug: bool = False           # a hot-plug worker runs: wait for it to stop too


class Aborted(Exception):
    """The coordinator gave up on the run."""


class MigrationBitmap:
    """One bit per guest page, little-endian uint64 words."""

    def __init__(self) -> None:
        self.pages = 0
        self.words = np.zeros(0, dtype=np.uint64)

    def extend(self, pages: int) -> int:
        """Grow to ``pages``; the new pages start dirty.  Returns how many were added."""
        old = self.pages
        if pages <= old:
            return 0
        words = np.zeros((pages + 63) // 64, dtype=np.uint64)
        words[:len(self.words)] = self.words
        bits = np.zeros(len(words) * 64, dtype=bool)
        bits[old:pages] = True
        words |= np.packbits(bits, bitorder="little").view(np.uint64)
        self.words, self.pages = words, pages
        return pages - old

    def dirty(self) -> np.ndarray[Any, np.dtype[np.intp]]:
        """The dirty page numbers, ascending."""
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little", count=self.pages)
        return np.flatnonzero(bits)

    def count(self) -> int:
        return int(np.bitwise_count(self.words).sum())

    def clear(self) -> None:
        self.words[:] = 0


class Migrator:
    def __init__(self, dm: DirtyMemory, cfg: MigratorConfig, ctl: Control) -> None:
        self.dm, self.cfg, self.ctl = dm, cfg, ctl
        self.src = GuestRam(dm.name, dm.page_bits, "ram")
        self.dst = GuestRam(dm.name, dm.page_bits, "dst")
        self.bitmap = MigrationBitmap()
        self.last_sync = 0.0

    def close(self) -> None:
        self.src.close()
        self.dst.close()

    def sync(self) -> tuple[int, int]:
        """Steps 1 and 2: (pages newly dirty, RAM size synced)."""
        blocks = self.dm.ram_blocks()
        self.src.update(blocks)
        self.dst.update(blocks, create=True)
        self.bitmap.extend(self.src.npages)
        ram_size = self.src.npages << self.dm.page_bits
        newly = self.dm.sync_dirty_bitmap(self.bitmap.words, 0, ram_size)
        return newly, ram_size

    def send(self, round_no: int, pages: np.ndarray[Any, Any], bandwidth: float) -> float:
        """Copy ``pages`` source -> destination; returns the seconds it took."""
        t0 = last = time.monotonic()
        chunk = self.cfg.chunk_pages
        page_size = self.dm.page_size
        for i in range(0, len(pages), chunk):
            if self.ctl.aborted():
                raise Aborted
            part = pages[i:i + chunk]
            for b, local, _ in self.src.split(part):
                self.dst.views[b][local] = self.src.views[b][local]
            sent = i + len(part)
            now = time.monotonic()
            if bandwidth:
                ahead = t0 + sent * page_size / bandwidth - now
                if ahead > 0:  # the rate limit (like QEMU's max-bandwidth)
                    self.ctl.wait(Flags.ABORT, ahead)
            if now - last >= REPORT_EVERY:
                self.ctl.report(Sent(round_no, sent))
                last = now
        return time.monotonic() - t0

    def run(self) -> None:
        cfg, ctl = self.cfg, self.ctl
        if not ctl.start("migrator"):
            return
        t_go = self.last_sync = time.monotonic()
        rounds: list[RoundEnd] = []
        reason = "max rounds"
        round_no = 0
        check: RoundStart | None = None
        while round_no < cfg.max_rounds:
            round_no += 1
            t_sync = time.monotonic()
            newly, ram_size = self.sync()
            elapsed, self.last_sync = t_sync - self.last_sync, t_sync
            dropped = 0
            if round_no == cfg.drop_round:
                dropped = self.bitmap.count()
                self.bitmap.clear()
            dirty = self.bitmap.count()
            check = RoundStart(
                round=round_no, ram_size=ram_size, dirty=dirty, newly_dirty=newly,
                dirty_rate=newly / elapsed if round_no > 1 and elapsed > 0 else None,
                dropped=dropped, t_start=t_sync)
            if round_no > 1 and dirty <= cfg.threshold:
                reason = "converged"
                break
            ctl.report(check)
            pages = self.bitmap.dirty()
            self.bitmap.clear()  # process-local: the pages are in `pages` now
            seconds = self.send(round_no, pages, cfg.bandwidth)
            check = RoundEnd(
                **vars(check), sent=len(pages), seconds=seconds,
                throughput=len(pages) * self.dm.page_size / seconds if seconds else None)
            rounds.append(check)
            ctl.report(check)

        # Stop-and-copy: the guest is paused for all of this (the downtime).
        t_stop = time.monotonic()
        ctl.report(Stopping(self.bitmap.count(), reason, t_stop))
        flags = ctl.flags
        flags.set(Flags.STOP)
        waiting = [Flags.VCPU_STOPPED + i for i in range(flags.vcpus)]
        if self.cfg.hotplug:
            waiting.append(Flags.HOTPLUG_STOPPED)
        deadline = t_stop + STOP_TIMEOUT
        for flag in waiting:
            while not ctl.wait(flag, 0.1):
                if ctl.aborted():
                    raise Aborted
                if time.monotonic() > deadline:
                    raise TimeoutError(f"a vCPU or the hot-plug worker did not stop within "
                                       f"{STOP_TIMEOUT} s")
        t_stopped = time.monotonic()
        newly, ram_size = self.sync()
        pages = self.bitmap.dirty()
        self.bitmap.clear()
        ctl.report(Downtime(len(pages), ram_size))
        seconds = self.send(0, pages, 0)
        t_end = time.monotonic()
        ctl.report(Done(tuple(rounds), reason, check, t_go, t_stop, t_end, DowntimeDone(
            pages=len(pages), newly_dirty=newly, ram_size=ram_size, seconds=t_end - t_stop,
            stop_wait=t_stopped - t_stop, copy_seconds=seconds)))


def main(dm: DirtyMemory, cfg: MigratorConfig, ctl: Control) -> None:
    """Entry point: migrate, report ``Done`` (or ``WorkerFailed``)."""
    with worker("migrator", ctl):
        m = Migrator(dm, cfg, ctl)
        try:
            m.run()
        except Aborted:
            pass
        finally:
            m.close()
            dm.close()
