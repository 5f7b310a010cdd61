"""Waits that no reader can stretch (issue 10, parts 5 and 8).

- sync_dirty_bitmap, test_and_clear_dirty and snapshot_and_clear_dirty
  return while another process sits inside one read-side section (memb) or
  stays online without a quiescent point (qsbr).  The whole-block swap may
  wait for its grace period only within a small budget; then it takes the
  retired blocks word by word and gives back whatever lands in them later:
  the parked reader's late write (with the table it entered with, into a
  retired block) is found by a later sync.  "Returned in bounded time" is
  shown without timing anything: the reader is let go only after the calls
  returned, and reports whether it was let go or gave up waiting.
- serve() while a call_rcu callback waits for a long reader backs off like
  synchronize(): on a virtual clock (time.monotonic / time.sleep and the
  stop event's wait advance it; nothing really sleeps), it scans the slots
  and checks owners' liveness no more often than synchronize() does over
  the same virtual second.  CPU use itself is measured by a script, not here.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import rel_workers as W

import shmdirty as sd
from shmdirty import grace

pytestmark = pytest.mark.timeout(90)

PS = 4096
BP = 32768           # pages a block: 512 words, what a swap pays off for
PARK = 15.0          # the parked reader gives up after this long (s)
WAIT = 30.0
VGA, CODE, MIG = sd.DIRTY_MEMORY_VGA, sd.DIRTY_MEMORY_CODE, sd.DIRTY_MEMORY_MIGRATION


class ParkedReader:
    """A spawned rel_workers.parked_reader, inside once constructed."""

    def __init__(self, ctx: Any, children: list[Any], name: str, flavor: str,
                 page: int) -> None:
        self.entered, self.release = ctx.Event(), ctx.Event()
        self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=W.parked_reader,
                                args=(name, flavor, self.entered, self.release, page, PARK,
                                      child))
        self.proc.start()
        children.append(self.proc)
        child.close()
        assert self.entered.wait(WAIT), "the reader never got in"

    def let_go(self) -> dict[str, Any]:
        self.release.set()
        assert self.conn.poll(WAIT), "the parked reader reported nothing"
        status, value = self.conn.recv()
        assert status == "ok", value
        self.proc.join(WAIT)
        assert self.proc.exitcode == 0
        return dict(value)


@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
def test_taking_accessors_return_while_a_reader_is_parked(
        map_name: str, spawn_ctx: Any, children: list[Any], flavor: str) -> None:
    ram = 2 * BP * PS                       # two blocks, all dirty (new RAM is)
    late = BP + 12345                       # the parked reader's late page, block 1
    dm = sd.DirtyMemory.create(ram, block_pages=BP, name=map_name)
    reader = None
    try:
        reader = ParkedReader(spawn_ctx, children, map_name, flavor, late)
        g0 = dm.generation
        dest = np.zeros(2 * BP // 64, dtype=np.uint64)
        assert dm.sync_dirty_bitmap(dest, 0, ram) == 2 * BP
        assert dm.generation > g0, "the sync did not swap (nothing to bound)"
        dm.swap_min_words = 0                # later takes would swap too, if they may
        assert dm.test_and_clear_dirty(0, ram, VGA) is True
        assert dm.dirty_pages(VGA) == 0
        snap = dm.snapshot_and_clear_dirty(0, ram, CODE)
        assert snap.get_dirty(0, ram) and snap.get_dirty(ram - PS, PS)
        assert dm.dirty_pages(CODE) == 0
        dm.set_dirty_range(0, ram, 1 << MIG)
        assert dm.sync_dirty_bitmap(np.zeros_like(dest), 0, ram) == 2 * BP
        out = reader.let_go()
        assert out["released"] is True, "the calls waited for the parked reader"
        assert out["generation"] == g0, out   # it wrote with the table it entered with
        # Its late write landed in a retired block; it is given back, not lost.
        dest[:] = 0
        assert dm.sync_dirty_bitmap(dest, 0, ram) == 1
        assert np.flatnonzero(np.unpackbits(dest.view(np.uint8), bitorder="little")).tolist() \
            == [late]
        assert dm.dirty_pages(MIG) == 0
    finally:
        if reader is not None:
            reader.release.set()
        dm.destroy()


# --- serve() backs off --------------------------------------------------------------------
class VirtualClock:
    """time.monotonic and time.sleep, on a clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = time.monotonic()   # deadlines taken before the patch stay meaningful

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


class StopAfter:
    """A stop event for serve(): set once the virtual clock passes ``until``
    (or ``done()`` says so); its wait() advances the clock."""

    def __init__(self, clock: VirtualClock, until: float, done: Any = None) -> None:
        self.clock, self.until, self.done = clock, until, done

    def is_set(self) -> bool:
        return self.clock.now >= self.until or bool(self.done and self.done())

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.sleep(1e-3 if timeout is None else timeout)
        return self.is_set()


class Counts:
    """How often slots are scanned and owners checked for liveness."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scans = self.alive = 0
        scan, alive = grace.GracePeriods._blockers, grace.owner_alive

        def counted_scan(gp: Any, token: int) -> Any:
            self.scans += 1
            return scan(gp, token)

        def counted_alive(word: int) -> bool:
            self.alive += 1
            return alive(word)

        monkeypatch.setattr(grace.GracePeriods, "_blockers", counted_scan)
        monkeypatch.setattr(grace, "owner_alive", counted_alive)

    def take(self) -> tuple[int, int]:
        out = (self.scans, self.alive)
        self.scans = self.alive = 0
        return out


def test_serve_backs_off_like_synchronize(map_name: str, spawn_ctx: Any, children: list[Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dm = sd.DirtyMemory.create(1 << 20, name=map_name)
    reader = None
    try:
        reader = ParkedReader(spawn_ctx, children, map_name, "memb", 1)
        ran: list[int] = []
        dm.rcu.call_rcu(lambda: ran.append(1))
        clock = VirtualClock()
        monkeypatch.setattr(time, "monotonic", clock.monotonic)
        monkeypatch.setattr(time, "sleep", clock.sleep)
        counts = Counts(monkeypatch)

        # One virtual second of synchronize() waiting for the reader ...
        with pytest.raises(sd.GraceTimeout):
            dm.rcu.synchronize(timeout=1.0)
        sync_scans, sync_alive = counts.take()
        # ... and one of serve() with a callback waiting for it.
        dm.serve(StopAfter(clock, clock.now + 1.0))
        serve_scans, serve_alive = counts.take()
        print(f"one virtual second: synchronize {sync_scans} scans, {sync_alive} liveness "
              f"checks; serve {serve_scans} scans, {serve_alive} liveness checks")
        assert not ran, "the callback ran inside the reader's section"
        assert serve_alive <= sync_alive + 1, (serve_alive, sync_alive)
        assert serve_scans <= sync_scans + 1, (serve_scans, sync_scans)
        assert serve_scans >= 1          # it did look

        # Once the reader leaves, serve() runs the callback.
        assert reader.let_go()["released"] is True
        reader = None
        dm.serve(StopAfter(clock, clock.now + 5.0, done=lambda: ran))
        assert ran == [1]
    finally:
        if reader is not None:
            reader.release.set()
        monkeypatch.undo()
        dm.destroy()
