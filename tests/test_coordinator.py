"""The coordinator (shmdirty/coordinator.py): who coordinates, publishing,
growth, both ends of hot-plug requests, adopt, and the serve loop.

serve() while a call_rcu callback waits for a long reader backs off like
synchronize() (issue 10, part 8; was tests/test_bounded_sync.py): on a
virtual clock (time.monotonic / time.sleep and the stop event's wait
advance it; nothing really sleeps), it scans the slots and checks owners'
liveness no more often than synchronize() does over the same virtual
second.  CPU use itself is measured by a script, not here.

The whole-block swap is take.py's (tests/test_take.py); retired blocks are
retired.py's (tests/test_retired.py).  Every wait has a timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback
from typing import Any

import err_workers as W
import pytest
from mp_harness import ParkedReader

import shmdirty as sd
from shmdirty import grace, layout, segment

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0
PARK = 15.0          # the parked reader gives up after this long (s)

PB = 12
PS = 1 << PB
BP = 64               # block_pages: small blocks, so MAX_BLOCKS is reachable
VGA = sd.DIRTY_MEMORY_VGA


def test_attach_in_the_creating_process_is_not_coordinator(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        a = sd.DirtyMemory.attach(map_name)
        assert dm.is_coordinator and not a.is_coordinator
        for call in (lambda: a.extend(1 << 20), lambda: a.ram_block_add(4096 * 64),
                     lambda: a.ram_block_remove(0), a.destroy, lambda: a.serve(None)):
            with pytest.raises(sd.NotCoordinator):
                call()
        assert dm.ram_size == 64 * 4096 and os.path.exists(
            os.path.join(segment.SHM_DIR, f"shmdirty-{map_name}-hdr"))
        a.close()
        u = pickle.loads(pickle.dumps(dm))   # an unpickled handle attaches: no role
        assert not u.is_coordinator
        with pytest.raises(sd.NotCoordinator):
            u.extend(1 << 20)
        u.close()
        dm.extend(128 * 4096)   # the creator still coordinates
        assert dm.ram_size == 128 * 4096
        # The creator leaves first: its process resigns; an attached handle adopts.
        b = sd.DirtyMemory.attach(map_name)
        dm.close()
        assert not b.is_coordinator
        c = sd.DirtyMemory.adopt(map_name)
        assert c.is_coordinator and not b.is_coordinator
        b.close()
        c.destroy()
    finally:
        for n in segment.list_segments(map_name):
            segment.unlink(n)


def test_timed_out_request_is_withdrawn(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            got = pool.apply_async(W.timed_request, (map_name, 1 << 20, 0.2)).get(WAIT)
        assert got == "GraceTimeout"
        assert not dm.serve_once()          # nothing left to grant
        assert dm.ram_size == 64 * 4096
    finally:
        dm.destroy()


def _request_too_big(name: str, size: int, conn: Any) -> None:
    """Attach (not the coordinator) and request ``size``; report what happened."""
    try:
        dm = sd.DirtyMemory.attach(name)
        try:
            dm.request_extend(size, timeout=5.0)
            conn.send(("returned", None))
        except Exception as e:
            conn.send((type(e).__name__, isinstance(e, sd.BadInput)))
        finally:
            dm.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def test_request_beyond_max_blocks_is_refused_before_it_is_posted(
        map_name: str, spawn_ctx: Any, children: list[Any]) -> None:
    """request_extend() validated only the page size: a size needing more than
    MAX_BLOCKS blocks was posted to the header; the coordinator's serve_once()
    then raised BadInput on every call (the request is withdrawn only after
    extend() succeeds), so one bad request from any process killed serve()."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    try:
        too_big = (sd.dirty.MAX_BLOCKS + 1) * BP * PS
        parent, child = spawn_ctx.Pipe(duplex=False)
        p = spawn_ctx.Process(target=_request_too_big, args=(map_name, too_big, child))
        p.start()
        children.append(p)
        child.close()
        assert parent.poll(WAIT), "the requester never reported"
        what, is_bad_input = parent.recv()
        p.join(WAIT)
        # Nothing was posted, and the coordinator's serve loop survives.
        assert dm._shared.header.words.load(layout.H_REQUEST) == 0
        assert dm.serve_once() is False
        assert (what, is_bad_input) == ("BadInput", True)
    finally:
        dm.destroy()


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
        scan, alive = grace.GracePeriods.blockers, grace.owner_alive

        def counted_scan(gp: Any, token: int) -> Any:
            self.scans += 1
            return scan(gp, token)

        def counted_alive(word: int) -> bool:
            self.alive += 1
            return alive(word)

        monkeypatch.setattr(grace.GracePeriods, "blockers", counted_scan)
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
        reader = ParkedReader(spawn_ctx, children, map_name, PARK, "memb", 1)
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


# --- issue 18.7: segment names a stranger cannot predict or squat -------------------------
def _squat(name: str) -> None:
    segment.Segment.create(name, 64, layout.KIND_BLOCK).close()


def test_growth_survives_squatters_of_every_name_a_counter_would_use(map_name: str) -> None:
    """A stranger who lists /dev/shm pre-creates the next names a counter
    would give (next block ids, next generation): growth goes on, the map
    is intact, and the squatters' segments are left alone."""
    with sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name) as dm:
        dm.set_dirty_flag(0, VGA)
        listed = segment.list_segments(map_name)
        ids = [i for n in listed if (r := layout.role_of(n))[0] == "b" and (i := r[1]) is not None]
        squatted = [f"{layout.PREFIX}{map_name}-b{i}" for i in range(max(ids) + 1, max(ids) + 13)]
        squatted += [f"{layout.PREFIX}{map_name}-b{i}" for i in range(12)]
        squatted += [f"{layout.PREFIX}{map_name}-t{dm.generation + k}" for k in (1, 2)]
        for n in squatted:
            if n not in listed:
                _squat(n)
        dm.extend(4 * BP * PS)          # three new blocks per client and a new table
        assert dm.ram_size == 4 * BP * PS and dm.all_dirty(BP * PS, 3 * BP * PS, VGA)
        assert dm.get_dirty_flag(0, VGA)
        for n in squatted:
            assert os.path.exists(os.path.join(segment.SHM_DIR, n)), n


def test_a_guessed_name_is_retried_with_a_fresh_random_part(
        map_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a name guessed right (EEXIST) only costs a retry: the block id
    and the table's tag are drawn again."""
    with sd.DirtyMemory.create(0, block_pages=BP, name=map_name) as dm:
        real_id, real_tag = layout.new_block_id, layout.new_table_tag
        first_id = real_id(1)
        first_tag = real_tag()
        _squat(layout.block_name(map_name, first_id))
        _squat(layout.table_name(map_name, dm.generation + 1, first_tag))
        ids = iter([first_id])
        tags = iter([first_tag])
        monkeypatch.setattr(layout, "new_block_id", lambda c: next(ids, None) or real_id(c))
        monkeypatch.setattr(layout, "new_table_tag", lambda: next(tags, None) or real_tag())
        dm.extend(BP * PS)
        assert dm.all_dirty(0, BP * PS, VGA) and first_id not in dm.table.block_ids[VGA]
        assert dm.table.tag != first_tag


def test_two_maps_made_alike_have_different_segment_names() -> None:
    names = []
    for _ in range(2):
        with sd.DirtyMemory.create(BP * PS, block_pages=BP) as dm:
            names.append({n.split("-", 2)[2] for n in segment.list_segments(dm.name)} - {"hdr"})
    assert names[0] and not names[0] & names[1]


def test_the_old_table_outlives_every_section_that_may_read_it(map_name: str) -> None:
    """issue 17.6(d): a reader parked in a section (a reader of its own in this
    process, so nothing races); the coordinator grows the map (a new table
    published).  The old table's segment stays until the reader leaves:
    serve_once() and a barrier that times out do not unlink it; after the
    reader leaves, the next barrier does."""
    from shmdirty.rcu import Rcu
    from shmdirty.segment import Segment

    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    hdr = Segment.attach(layout.header_name(map_name), layout.KIND_HEADER, layout.HEADER_FIXED)
    reader = Rcu(hdr, dm.max_readers, "memb")
    try:
        old = layout.table_name(map_name, dm.generation, dm.table.tag)
        reader.read_lock()                      # may be reading the old table
        dm.extend(4 * BP * PS)                  # publishes a new one
        assert layout.table_name(map_name, dm.generation, dm.table.tag) != old
        for _ in range(3):
            dm.serve_once()
            assert old in segment.list_segments(map_name), "unlinked under a reader"
        with pytest.raises(sd.GraceTimeout):
            dm.rcu.barrier(timeout=0.05)
        assert old in segment.list_segments(map_name), "unlinked under a reader"
        reader.read_unlock()
        dm.rcu.barrier(timeout=10.0)
        assert old not in segment.list_segments(map_name), "never unlinked"
    finally:
        while reader.nesting:         # a failed assertion left it inside
            reader.read_unlock()
        reader.close()
        hdr.close()
        dm.destroy()


# --- issue 17.6: mutants of publish and reap_unreachable ----------------------------------------
def test_removing_the_last_ram_block_leaves_no_ram(map_name: str) -> None:
    """A table of no RAM blocks has RAM size 0: every address is outside."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    try:
        dm.ram_block_remove(0)
        assert dm.ram_blocks() == [] and dm.ram_size == 0 and dm.table.ram_size == 0
        with pytest.raises(sd.BadInput, match="outside guest RAM"):
            dm.set_dirty_flag(0, VGA)
    finally:
        dm.destroy()


def test_an_adopter_reaps_every_stale_table(map_name: str) -> None:
    """Tables a coordinator left behind: one newer than the published
    generation (never published: unlinked at once) and an older one (a
    reader may still hold it: unlinked after a grace period).  The adopter
    reaps both and keeps the published table."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    g = dm.generation
    dm.close()                                       # resigns; the map stays
    older = layout.table_name(map_name, g - 1, 0x5EED)
    newer = layout.table_name(map_name, g + 1, 0x5EED)
    for n in (older, newer):
        segment.Segment.create(n, 4096, layout.KIND_TABLE).close()
    ad = sd.DirtyMemory.adopt(map_name)
    try:
        assert ad.generation == g
        names = segment.list_segments(map_name)
        assert newer not in names, "a table that was never published outlived the adoption"
        ad.rcu.barrier(timeout=WAIT)                 # the reap, after a grace period
        names = segment.list_segments(map_name)
        assert older not in names, "a stale table outlived the adopter's reap"
        assert [n for n in names if layout.role_of(n)[0] == "t"] == [
            layout.table_name(map_name, g, ad.table.tag)]
    finally:
        ad.destroy()
