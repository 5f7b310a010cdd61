"""DirtyMemory across spawned processes: no dirty bit is lost while RAM is
hot-added, a coordinator that copies blocks on growth (the pre-RCU world)
is caught by the same test, a SIGKILLed coordinator is adopted and growth
goes on, a SIGKILLed reader does not stall grace periods.

How "no lost bits" is checked: the coordinator (this process) hands the
writers a page limit.  It raises the limit only after the new RAM is
published and it has taken that RAM's initial dirty bits (new RAM is dirty
for every client) into a scratch bitmap, so every MIGRATION bit below the
limit is one a writer set.  The writers record each page they set and send
the record back at the end; after one last sync, the migration bitmap below
the limit must be exactly the union of the records.  No sleeps: Events,
Semaphores, pipes and joins.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import dirty_workers as workers
import numpy as np
import pytest
from mp_harness import MIG, PB, PS, WAIT, Migration, Writers, pages_of, run_until_caught, segs

import shmdirty as sd
from shmdirty import atomic, layout, segment
from shmdirty.coordinator import Coordinator
from shmdirty.segment import Segment
from shmdirty.table import Table, record_tag, write_table


# --- the broken coordinator -----------------------------------------------------------------
class CopyingCoordinator(Coordinator):
    """The pre-RCU world (QEMU's bitmap_zero_extend): growth COPIES every
    existing block into fresh block segments and publishes a table of those;
    the old blocks go after a grace period.  A writer still in a section on
    the old table writes into blocks no table references any more."""

    def publish(self, ram_blocks: list[tuple[int, int]],
                dirty: tuple[int, int] | None = None,
                swap: Any = ()) -> list[int]:
        assert not swap, "this test never takes whole blocks by swapping"
        v = self.view
        t = v.refresh()
        ram_blocks = sorted(ram_blocks)
        ram_size = max((o + s for o, s in ram_blocks), default=0)
        need = max(t.num_blocks, -(-(ram_size >> v.page_bits) // v.block_pages))
        words = v.block_pages // 64
        ids: list[list[int]] = [[] for _ in range(sd.DIRTY_MEMORY_NUM)]
        for c in range(sd.DIRTY_MEMORY_NUM):
            for i in range(need):
                bid = layout.new_block_id(
                    atomic.fetch_add(self.next_block_ptr, 1, atomic.RELAXED))
                seg = Segment.create(layout.block_name(v.name, bid),
                                     layout.block_size(v.block_pages),
                                     layout.KIND_BLOCK, c, bid)
                if i < t.num_blocks:      # the copy: a plain read of live words
                    seg.array(layout.B_WORDS, words)[:] = v.block(c, i).words
                seg.seal()
                v.map_block(bid, seg)
                ids[c].append(bid)
        g = t.generation + 1
        record_tag(self.header, write_table(v.name, Table(g, ram_size,
                                                          tuple(tuple(c) for c in ids),
                                                          tuple(ram_blocks))))
        atomic.store(self.gen_ptr, g, atomic.SEQ_CST)
        self.rcu.gp.start_poll()
        atomic.store(self.ram_ptr, ram_size, atomic.RELEASE)
        old = [layout.table_name(v.name, t.generation, t.tag)]
        old += [layout.block_name(v.name, b) for c in t.block_ids for b in c]
        v.load_table(g)

        def free_old() -> None:
            for n in old:
                segment.unlink(n)
        self.rcu.call_rcu(free_old)
        return []


class CopyingDirtyMemory(sd.DirtyMemory):
    coordinator_class = CopyingCoordinator


# --- no lost bits ------------------------------------------------------------------------------
BLOCK_PAGES = 256
GROWTHS = 40


def grow_and_sync(map_name: str, cls: type[sd.DirtyMemory], flavor: str, ctx: Any,
                  children: list[Any], seed: int) -> dict[str, int]:
    """The test body: 2 writers, GROWTHS growths, a sync after each; returns
    how many writer pages the migration bitmap lost."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(1, 3 * BLOCK_PAGES // 2, size=GROWTHS)
    ram0 = 2 * BLOCK_PAGES + 17
    max_pages = ram0 + int(steps.sum())
    dm = cls.create(ram0 * PS, block_pages=BLOCK_PAGES, name=map_name)
    try:
        limit = ctx.Value("q", 0)
        mig = Migration(dm, limit)
        mig.open_up()
        ws = Writers(ctx, children, map_name, 2, flavor, max_pages, limit, seed)
        for i, step in enumerate(steps.tolist()):
            ws.wait(1)                       # the writers are busy in the current table
            if i % 3 == 0:
                assert dm.ram_block_add(step * PS) == dm.ram_size - step * PS
            else:
                dm.extend(dm.ram_size + step * PS)
            mig.open_up()
            mig.sync()
            if i % 8 == 7:
                # Grace periods complete with these readers (qsbr ones only
                # at their quiescent points): old tables go.
                dm.rcu.barrier(timeout=WAIT)
        ws.wait(2)
        written, ops = ws.finish(max_pages)
        mig.sync()
        assert limit.value == dm.ram_size >> PB == max_pages
        found = pages_of(mig.dest, max_pages)
        lost = np.setdiff1d(written, found)
        extra = np.setdiff1d(found, written)
        dm.rcu.barrier(timeout=WAIT)
        tables = segs(map_name, "t")
    finally:
        dm.destroy()
    assert segment.list_segments(map_name) == []
    return {"written": len(written), "lost": len(lost), "extra": len(extra),
            "ops": ops, "tables": len(tables), "syncs": mig.syncs}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
@pytest.mark.parametrize("broken", [False, True], ids=["rcu", "copying"])
def test_no_lost_bits_while_ram_grows(map_name: str, spawn_ctx: Any, children: list[Any],
                                      flavor: str, broken: bool) -> None:
    cls = CopyingDirtyMemory if broken else sd.DirtyMemory
    r = run_until_caught(
        lambda name, seed: grow_and_sync(name, cls, flavor, spawn_ctx, children, seed=seed),
        map_name, broken, f"{flavor} {'copying' if broken else 'rcu'}")
    assert r["written"] > 1000 and r["ops"] > 0
    if broken:
        # Caught: the same test fails with the copying coordinator.
        assert r["lost"] > 0, f"the copying coordinator was not caught in 3 attempts: {r}"
    else:
        assert r["lost"] == 0, r
        assert r["extra"] == 0, r          # nothing but the writers' bits below the limit
        assert r["tables"] == 1, r


# --- the coordinator dies -----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_coordinator_sigkilled_reader_adopts(map_name: str, spawn_ctx: Any,
                                             children: list[Any]) -> None:
    ctx = spawn_ctx
    bp, growths, step = 128, 400, 2 * 128
    go, created, grown, stop = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    coord = ctx.Process(target=workers.growing_coordinator,
                        args=(map_name, 3 * bp + 5, bp, growths, step, go, created, grown,
                              20, stop), name="coordinator")
    coord.start()
    children.append(coord)
    assert created.wait(WAIT)
    rd = sd.DirtyMemory.attach(map_name)
    dm = None
    try:
        assert not rd.is_coordinator
        limit = ctx.Value("q", 0)
        mig = Migration(rd, limit)
        mig.open_up()                                      # [0, ram size now)
        low = limit.value
        max_pages = 3 * bp + 5 + (growths + 10) * step
        ws = Writers(ctx, children, map_name, 1, "memb", max_pages, limit, seed=7)
        rng = np.random.default_rng(3)
        mine = rng.integers(0, low, size=300)
        rd.set_dirty_pages(mine, MIG)                      # set before the kill
        assert mig.sync() > 0

        # The coordinator is alive: nobody may adopt.
        with pytest.raises(sd.NotCoordinator) as info:
            sd.DirtyMemory.adopt(map_name)
        assert str(coord.pid) in str(info.value)
        go.set()
        assert grown.wait(WAIT)                            # it is growing now:
        os.kill(coord.pid, signal.SIGKILL)                 # kill it mid-run
        coord.join(WAIT)
        assert coord.exitcode == -signal.SIGKILL
        gen_at_kill = rd.generation
        print(f"coordinator killed at generation {gen_at_kill}, "
              f"{len(segment.list_segments(map_name))} segments")
        assert limit.value == low                          # the writer stayed below

        dm = sd.DirtyMemory.adopt(map_name)
        assert dm.is_coordinator and not rd.is_coordinator  # the adopting handle only
        # The header agrees with the table the adopter took over.
        assert dm.ram_size == max(o + s for o, s in dm.ram_blocks())
        more = rng.integers(0, low, size=300)
        dm.set_dirty_pages(more, MIG)                      # set after the kill
        mig.dm = dm
        mig.open_up()                                      # what the dead one added
        for _ in range(10):                                # growth and syncing go on
            ws.wait(1)
            dm.extend(dm.ram_size + int(rng.integers(1, step)) * PS)
            mig.open_up()
            mig.sync()
        assert dm.generation >= gen_at_kill + 10
        ws.wait(2)
        written, _ = ws.finish(max_pages)
        mig.sync()
        top = limit.value
        assert top == dm.ram_size >> PB and top > low
        found = pages_of(mig.dest, top)
        expect = np.union1d(written, np.union1d(mine, more))
        assert len(np.setdiff1d(expect, found)) == 0, "bits lost across the adoption"
        assert len(np.setdiff1d(found, expect)) == 0, "bits below the limit nobody set"
        assert np.any(written >= low)                      # it wrote in the adopter's RAM

        # What the dead coordinator left (old tables, half-made ones) goes.
        dm.rcu.barrier(timeout=WAIT)
        assert segs(map_name, "t") == [layout.table_name(map_name, dm.generation, dm.table.tag)]
        nblocks = -(-(dm.ram_size >> PB) // bp)
        assert len(segs(map_name, "b")) == 3 * nblocks
        assert {r.pid for r in dm.rcu.readers() if r.alive} == {os.getpid()}
        rd.close()
        dm.destroy()
        dm = None
        assert segment.list_segments(map_name) == []
    finally:
        if dm is not None:
            dm.close()
        rd.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("where", "flavor"), [("before_generation", "memb"),
                                               ("before_ram_size", "qsbr")])
def test_coordinator_killed_inside_a_growth(map_name: str, spawn_ctx: Any,
                                            children: list[Any], where: str,
                                            flavor: str) -> None:
    """Killed inside _publish: what it half made must not stop the adopter,
    even while a reader's section holds back the grace period after which
    the adopter reaps it.  The adopter already reads the map (as ``flavor``)."""
    bp = 64
    p = spawn_ctx.Process(target=workers.crash_mid_publish, args=(map_name, 70, bp, where))
    p.start()
    children.append(p)
    p.join(WAIT)
    assert p.exitcode == -signal.SIGKILL
    published = 70 + 2 * bp                       # two growths made it
    ready = spawn_ctx.Event()
    reader = spawn_ctx.Process(target=workers.parked_writer, args=(map_name, ready))
    reader.start()
    children.append(reader)
    assert ready.wait(WAIT)
    mine = sd.DirtyMemory.attach(map_name, flavor=flavor)
    try:
        dm = sd.DirtyMemory.adopt(map_name)
    except BaseException:
        mine.close()
        raise
    try:
        assert dm.flavor == flavor
        size = max(o + s for o, s in dm.ram_blocks())
        if where == "before_generation":
            assert size == published * PS
        else:
            assert size == (published + 2 * bp) * PS
        # The header's RAM size is the table's (requesters and writers read it).
        assert dm.ram_size == size
        if where == "before_ram_size":
            # Published, maybe never marked: the adopter marks it dirty.
            assert dm.all_dirty(published * PS, 2 * bp * PS, MIG)
        dm.extend(size + 3 * PS)                     # growth goes on
        dm.extend(size + 5 * bp * PS)
        assert dm.all_dirty(size, 5 * bp * PS, MIG)
        os.kill(reader.pid, signal.SIGKILL)
        reader.join(WAIT)
        dm.rcu.barrier(timeout=WAIT)
        assert segs(map_name, "t") == [layout.table_name(map_name, dm.generation, dm.table.tag)]
        assert len(segs(map_name, "b")) == 3 * -(-(dm.ram_size >> PB) // bp)
    finally:
        mine.close()
        dm.destroy()
    assert segment.list_segments(map_name) == []


@pytest.mark.timeout(60)
def test_blocks_of_an_unpublished_growth_give_nothing_back(map_name: str, spawn_ctx: Any,
                                                          children: list[Any]) -> None:
    """A growth killed before its publication made blocks and marked its new
    RAM dirty in them.  Nothing ever referenced them, so when the adopter's
    reap runs (after a grace period, here after the adopter has grown over
    the same positions) their bits must not land in the live blocks."""
    bp = 64
    p = spawn_ctx.Process(target=workers.crash_mid_publish,
                          args=(map_name, 70, bp, "before_generation"))
    p.start()
    children.append(p)
    p.join(WAIT)
    assert p.exitcode == -signal.SIGKILL
    ready = spawn_ctx.Event()
    reader = spawn_ctx.Process(target=workers.parked_writer, args=(map_name, ready))
    reader.start()          # holds back the adopter's reap until it is killed
    children.append(reader)
    assert ready.wait(WAIT)
    dm = sd.DirtyMemory.adopt(map_name)
    try:
        old = dm.ram_size >> PB                        # 198 pages: blocks 0-3
        dm.extend(dm.ram_size + 2 * bp * PS)           # blocks 4 and 5, all dirty
        for c in (sd.DIRTY_MEMORY_VGA, sd.DIRTY_MEMORY_CODE):
            dm.test_and_clear_dirty(0, dm.ram_size, c)
        os.kill(reader.pid, signal.SIGKILL)
        reader.join(WAIT)
        dm.rcu.barrier(timeout=WAIT)                   # the reap has run
        assert segs(map_name, "t") == [layout.table_name(map_name, dm.generation, dm.table.tag)]
        for c in (sd.DIRTY_MEMORY_VGA, sd.DIRTY_MEMORY_CODE):
            assert not dm.get_dirty(old * PS, dm.ram_size - old * PS, c)
    finally:
        dm.destroy()


# --- a reader dies ------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sigkilled_reader_does_not_block_grace_periods(map_name: str, spawn_ctx: Any,
                                                       children: list[Any]) -> None:
    dm = sd.DirtyMemory.create(300 * PS, block_pages=64, name=map_name)
    try:
        ready = spawn_ctx.Event()
        p = spawn_ctx.Process(target=workers.parked_writer, args=(map_name, ready))
        p.start()
        children.append(p)
        assert ready.wait(WAIT)
        slot = {r.pid: r for r in dm.rcu.readers()}[p.pid]
        assert slot.alive and slot.epoch != 0             # inside its section
        dm.extend(400 * PS)                              # the old table waits for it
        with pytest.raises(TimeoutError) as info:
            dm.rcu.barrier(timeout=0.2)
        assert f"pid {p.pid}" in str(info.value)
        assert len(segs(map_name, "t")) == 2            # the old table is still there
        token = dm.rcu.start_poll()
        assert not dm.rcu.poll(token)

        os.kill(p.pid, signal.SIGKILL)                   # killed while writing
        p.join(WAIT)
        dm.extend(500 * PS)
        dm.rcu.synchronize(timeout=10)
        dm.rcu.barrier(timeout=10)
        assert dm.rcu.poll(token)
        assert p.pid not in {r.pid for r in dm.rcu.readers()}   # its slot is reclaimed
        assert segs(map_name, "t") == [layout.table_name(map_name, dm.generation, dm.table.tag)]
        assert dm.ram_size == 500 * PS
    finally:
        dm.destroy()
    assert segment.list_segments(map_name) == []
