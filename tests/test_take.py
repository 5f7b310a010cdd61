"""The RCU-native take (take.py ``Take.run``, ``SwapTake.swap_out``, issue 6).

sync_dirty_bitmap, test_and_clear_dirty and snapshot_and_clear_dirty take
the blocks a range covers whole by swapping a zeroed block in for each (a new
table), waiting one grace period (within a budget, issue 10) and reading
the retired block with plain numpy; retired blocks are zeroed and pooled
for reuse.  Past the budget the retired blocks are taken word by word and
what lands in them later is given back.  Here:

- the swap gives exactly what the per-word path gives (results, dest,
  what is left), for every kind of range; the pool recycles and hands out
  zeroed blocks;
- no bit is lost while spawned writers (memb sections, qsbr quiescent
  points) dirty pages and the coordinator swaps in a loop and hot-adds RAM;
  also when every swap runs past its budget; the same test catches a swap
  that skips the grace period, and holds with a reader parked in one
  section through every sync;
- the fallbacks: no swap inside a read-side section, below the threshold,
  or in a process that is not the coordinator;
- a reader parked in a section does not hold a swap back (its late write
  is given back and taken later), and a SIGKILLed one does not hang it;
- a qsbr reader coming back online while a swap completes writes into the
  published block, not the retired one;
- waits that no reader can stretch (issue 10, parts 5 and 8; these were
  tests/test_bounded_sync.py): the taking accessors return while another
  process sits inside one section (memb) or stays online without a
  quiescent point (qsbr), and the parked reader's late write, into a
  retired block, is found by a later sync.  "Returned in bounded time" is
  shown without timing anything: the reader is let go only after the calls
  returned, and reports whether it was let go or gave up waiting.

No sleeps stand in for synchronisation: Events, Semaphores, pipes, joins.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np
import pytest
import rel_workers
import swap_workers as workers
from mp_harness import (
    Migration,
    ParkedReader,
    Writers,
    child_result,
    run_until_caught,
    segs,
)

import shmdirty as sd
from shmdirty import layout, segment
from shmdirty.coordinator import Coordinator
from shmdirty.take import SwapTake

pytestmark = pytest.mark.timeout(60)

PB = 12
PS = 1 << PB
VGA, CODE, MIG = sd.DIRTY_MEMORY_VGA, sd.DIRTY_MEMORY_CODE, sd.DIRTY_MEMORY_MIGRATION
CLIENTS = (VGA, CODE, MIG)
FORCE = 0             # swap_min_words: every whole block is swapped
FORBID = 10 ** 12     # swap_min_words: never swap
WAIT = 30.0           # the longest any single wait may take before the test fails


# --- helpers ---------------------------------------------------------------------------
def bits_of(words: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """One bool per bit of little-endian uint64 words."""
    return np.unpackbits(np.ascontiguousarray(words).view(np.uint8),
                         bitorder="little").astype(bool)


def bitmap_of(dm: sd.DirtyMemory, client: int) -> np.ndarray[Any, Any]:
    """Every bit of ``client``'s blocks in the current table (past RAM too)."""
    with dm.read_section():
        n = dm.table.num_blocks
        return np.concatenate([bits_of(dm.block(client, i).words.copy()) for i in range(n)])


def forbid_swap(dm: sd.DirtyMemory) -> Any:
    """A context in which ``dm`` never swaps."""

    class _Ctx:
        def __enter__(self) -> None:
            self.saved = dm.swap_min_words
            dm.swap_min_words = FORBID

        def __exit__(self, *exc: object) -> None:
            dm.swap_min_words = self.saved

    return _Ctx()


def clear_all(dm: sd.DirtyMemory) -> None:
    with forbid_swap(dm):
        for c in CLIENTS:
            dm.test_and_clear_dirty(0, dm.ram_size, c)


# --- 1. the swap and the per-word path agree ---------------------------------------------
OPS = ("sync", "test_and_clear", "snapshot")
KINDS = ("whole", "part", "both", "all")


def random_pattern(rng: np.random.Generator, nblocks: int, bp: int,
                   ram_pages: int) -> np.ndarray[Any, Any]:
    """Per client and block: clean, a few pages, 30 %, all, or random whole words."""
    pat = np.zeros((len(CLIENTS), nblocks * bp), dtype=bool)
    for c in CLIENTS:
        for i in range(nblocks):
            sl = pat[c, i * bp:(i + 1) * bp]
            kind = int(rng.integers(5))
            if kind == 1:
                sl[rng.integers(bp, size=int(rng.integers(1, 4)))] = True
            elif kind == 2:
                sl[:] = rng.random(bp) < 0.3
            elif kind == 3:
                sl[:] = True
            elif kind == 4:
                sl[:] = np.repeat(rng.random(bp // 64) < 0.5, 64)
    pat[:, ram_pages:] = False
    return pat


def random_range(rng: np.random.Generator, kind: str, bp: int,
                 ram_pages: int) -> tuple[int, int, int, int]:
    """(start, length) in bytes, not page aligned, and its page range [page, end):
    ``whole`` blocks only, ``part`` of one block, ``both`` (from inside one
    block over at least one whole block, to a block edge or into a partial
    block), or ``all`` of RAM (whose last block is partial)."""
    nwhole = ram_pages // bp
    if kind == "whole":
        k0 = int(rng.integers(nwhole))
        page, end = k0 * bp, int(rng.integers(k0 + 1, nwhole + 1)) * bp
    elif kind == "part":
        k = int(rng.integers(-(-ram_pages // bp)))
        lo, hi = k * bp, min((k + 1) * bp, ram_pages)
        page = int(rng.integers(lo, hi))
        end = int(rng.integers(page + 1, hi + 1))
        if end - page == bp:       # that would be the whole block
            end -= 1 if rng.random() < 0.5 else 0
            page += 1 if end - page == bp else 0
    elif kind == "both":
        k0 = int(rng.integers(nwhole - 1))
        page = k0 * bp + int(rng.integers(1, bp))
        end = int(rng.integers((k0 + 2) * bp, ram_pages + 1))
    else:
        page, end = 0, ram_pages
    # Bytes inside the first and last page still take the whole page.
    start = page * PS + int(rng.integers(PS))
    stop = max(end * PS - int(rng.integers(PS)), start + 1)
    return start, stop - start, page, end


def whole_blocks(page: int, end: int, bp: int) -> int:
    return max(0, end // bp - -(-page // bp))


@pytest.mark.parametrize("bp", [64, 256, 1024])
def test_swap_and_per_word_take_agree(map_name: str, bp: int) -> None:
    """Two maps with the same dirty bits, one always swapping and one never:
    every taking accessor gives the same result, dest and remaining bitmaps,
    equal to a plain model, over whole blocks, parts, and both."""
    rng = np.random.default_rng(bp)
    ram_pages = 4 * bp + 37            # 4 whole blocks and a partial fifth
    nblocks = -(-ram_pages // bp)
    dest_words = -(-ram_pages // 64) + 1
    swap = sd.DirtyMemory.create(ram_pages * PS, block_pages=bp, name=map_name + "s")
    try:
        word = sd.DirtyMemory.create(ram_pages * PS, block_pages=bp, name=map_name + "w")
    except BaseException:
        swap.destroy()
        raise
    swap.swap_min_words, word.swap_min_words = FORCE, FORBID
    cases = [(op, kind) for _ in range(5) for op in OPS for kind in KINDS]
    try:
        for trial, (op, kind) in enumerate(cases):
            pat = random_pattern(rng, nblocks, bp, ram_pages)
            for dm in (swap, word):
                for c in CLIENTS:
                    dm.test_and_clear_dirty(0, dm.ram_size, c)   # swaps in `swap`
                    if pat[c].any():
                        dm.set_dirty_pages(np.flatnonzero(pat[c]), c)
                    assert np.array_equal(bitmap_of(dm, c), pat[c]), (trial, dm.name, c)
            client = MIG if op == "sync" else int(rng.choice(CLIENTS))
            start, length, page, end = random_range(rng, kind, bp, ram_pages)
            why = (trial, op, kind, client, hex(start), hex(length), page, end)
            dest0 = rng.integers(0, 1 << 63, size=dest_words, dtype=np.uint64)
            dest0 &= rng.integers(0, 1 << 63, size=dest_words, dtype=np.uint64)

            # The model.
            taken = pat[client, page:end].copy()
            expect_dest = bits_of(dest0)
            newly = int(np.count_nonzero(taken & ~expect_dest[page:end]))
            expect_dest[page:end] |= taken
            pat[client, page:end] = False

            out = {}
            for dm in (swap, word):
                g0 = dm.generation
                if op == "sync":
                    dest = dest0.copy()
                    out[dm.name] = (dm.sync_dirty_bitmap(dest, start, length), dest)
                elif op == "test_and_clear":
                    out[dm.name] = (dm.test_and_clear_dirty(start, length, client), None)
                else:
                    snap = dm.snapshot_and_clear_dirty(start, length, client)
                    out[dm.name] = (snap, snap._words.copy())
                moved = dm.generation - g0
                if dm is swap and whole_blocks(page, end, bp):
                    assert moved == 1, why                      # it did swap
                else:
                    assert moved == 0, why
                for c in CLIENTS:
                    assert np.array_equal(bitmap_of(dm, c), pat[c]), (why, dm.name, c)

            (a, a_words), (b, b_words) = out[swap.name], out[word.name]
            if op == "sync":
                assert a == b == newly, why
                assert np.array_equal(a_words, b_words), why
                assert np.array_equal(bits_of(a_words), expect_dest), why
            elif op == "test_and_clear":
                assert a is b is bool(taken.any()), why
            else:
                assert np.array_equal(a_words, b_words), why
                held = bits_of(a_words)
                off = page - (page & ~63)
                assert np.array_equal(held[off:off + end - page], taken), why
                assert not held[:off].any() and not held[off + end - page:].any(), why
                for s in rng.integers(page, end, size=6).tolist():
                    e = int(rng.integers(s + 1, end + 1))
                    q = (s * PS + int(rng.integers(PS)), (e - s) * PS - PS + 1)
                    exp = bool(taken[s - page:e - page].any())
                    assert a.get_dirty(*q) is b.get_dirty(*q) is exp, (why, s, e)
                assert a.get_dirty(start, length) is bool(taken.any()), why

        # Length 0 takes nothing and swaps nothing.
        for dm in (swap, word):
            g0 = dm.generation
            assert dm.sync_dirty_bitmap(np.zeros(dest_words, np.uint64), bp * PS, 0) == 0
            assert dm.test_and_clear_dirty(bp * PS, 0, VGA) is False
            assert dm.generation == g0
    finally:
        swap.destroy()
        word.destroy()
    assert segment.list_segments(map_name + "s") == segment.list_segments(map_name + "w") == []


@pytest.mark.timeout(30)
def test_pool_recycles_zeroed_blocks(map_name: str) -> None:
    """Many swapping takes (MIGRATION and VGA share the pool) leave at most
    the table's blocks plus one take's worth of retired ones in /dev/shm;
    retired blocks come back zeroed: a take after no writes finds nothing,
    and blocks that growth takes from the pool hold only the new RAM's bits."""
    bp, nwhole = 64, 8
    ram_pages = nwhole * bp + 10
    nblocks = nwhole + 1
    rng = np.random.default_rng(5)
    dm = sd.DirtyMemory.create(ram_pages * PS, block_pages=bp, name=map_name)
    try:
        clear_all(dm)
        dm.swap_min_words = FORCE
        dest = np.zeros(-(-ram_pages // 64), dtype=np.uint64)
        shadow = np.zeros(ram_pages, dtype=bool)
        g0 = dm.generation
        most = 0
        for i in range(40):
            pages = rng.integers(0, ram_pages, size=int(rng.integers(1, 200)))
            dm.set_dirty_pages(pages, MIG)
            dm.set_dirty_pages(pages[::2], VGA)
            new = np.unique(pages[~shadow[pages]])
            shadow[pages] = True
            assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == len(new), i
            if i % 3 == 0:
                assert dm.test_and_clear_dirty(0, dm.ram_size, VGA)
            n = len(segs(map_name, "b"))
            most = max(most, n)
            assert n <= 3 * nblocks + nwhole, (i, n)
            assert len(dm._coordinator.pool) <= nwhole
            for bid in dm._coordinator.pool:
                assert not dm.map_block(bid).words.any(), f"pooled block {bid} is dirty"
        assert dm.generation - g0 >= 40 + 14                # every take swapped
        assert most == 3 * nblocks + nwhole                 # one take's worth, no more
        assert np.array_equal(bits_of(dest)[:ram_pages], shadow)

        # No writes since: a swapping take finds nothing, in any client.
        g1 = dm.generation
        assert dm.sync_dirty_bitmap(np.zeros_like(dest), 0, dm.ram_size) == 0
        assert dm.generation == g1 + 1
        for c in CLIENTS:
            assert not dm.test_and_clear_dirty(0, dm.ram_size, c)
            assert not bitmap_of(dm, c).any()

        # Growth takes its blocks from the pool (2 for each client: no new
        # segment); they hold the new RAM's bits only, none past its end.
        assert len(dm._coordinator.pool) == nwhole
        dm.extend((ram_pages + 2 * bp) * PS)
        assert len(dm._coordinator.pool) == nwhole - 6
        assert len(segs(map_name, "b")) == 3 * (nblocks + 2) + nwhole - 6
        for c in CLIENTS:
            got = np.flatnonzero(bitmap_of(dm, c))
            assert np.array_equal(got, np.arange(ram_pages, ram_pages + 2 * bp)), c
        # The tables of all those generations go too.
        dm.rcu.barrier(timeout=WAIT)
        assert segs(map_name, "t") == [layout.table_name(map_name, dm.generation, dm.table.tag)]
    finally:
        dm.destroy()
    assert segment.list_segments(map_name) == []


# --- 2 and 3. no lost bits while writers write and the coordinator swaps -----------------
class NoGraceTake(SwapTake):
    """BROKEN on purpose: publishes the swap table, then reads, zeroes and
    pools the retired blocks at once, without waiting for a grace period.
    A writer still in a section on the old table writes into a block that
    was already read (its bit is zeroed, or pooled and handed out again as
    some other block)."""

    def swap_out(self, client: int, idxs: list[int]) -> list[Any]:
        """(words, block to recycle), as SwapTake.swap_out: no grace period."""
        with self.shared.lock:
            t = self.view.refresh()
            retired = self.coordinator.publish(list(t.ram_blocks),
                                               swap=[(client, i) for i in idxs])
        return [(b.words, b) for b in map(self.view.map_block, retired)]


class NoGraceCoordinator(Coordinator):
    take_class = NoGraceTake


class NoGraceSwap(sd.DirtyMemory):
    coordinator_class = NoGraceCoordinator


# Enough pages that most are written once or twice: a write lost in one
# place is rarely hidden by another write of the same page.
BP = 1024
SYNCS = 40
ADDS = (6, 15, 24, 33)       # a hot-add before these syncs
BATCH, QUIESCENT_EVERY = 60, 20


PARK = 30.0                  # the parked reader gives up after this long (s)


def swap_and_sync(name: str, cls: type[sd.DirtyMemory], flavor: str, ctx: Any,
                  children: list[Any], seed: int, parked: bool = False,
                  budget: float | None = None) -> dict[str, int]:
    """The test body: 2 writers; the coordinator syncs SYNCS times with the
    swap forced and hot-adds RAM a few times; returns what the migration
    bitmap lost (and holds extra) below the limit.  With ``parked``, a
    third reader (of ``flavor``) sits inside one section (qsbr: online,
    never quiescent) through every sync, and writes one page with the
    table it entered with when it is let go at the end."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(1, 2 * BP, size=len(ADDS))
    ram0 = 48 * BP + 17
    max_pages = ram0 + int(steps.sum())
    dm = cls.create(ram0 * PS, block_pages=BP, name=name)
    park: dict[str, Any] = {}
    try:
        dm.swap_min_words = FORCE
        if budget is not None:
            dm.swap_grace_budget = budget
        limit = ctx.Value("q", 0)
        mig = Migration(dm, limit)
        mig.open_up()
        ws = Writers(ctx, children, name, 2, flavor, max_pages, limit, seed,
                     batch=BATCH, quiescent_every=QUIESCENT_EVERY)
        if parked:
            park["page"] = int(rng.integers(BP, 2 * BP))   # in a block every sync takes whole
            park["entered"], park["release"] = ctx.Event(), ctx.Event()
            park["conn"], child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=rel_workers.parked_reader,
                            args=(name, flavor, park["entered"], park["release"],
                                  park["page"], PARK, child), name="parked")
            p.start()
            children.append(p)
            child.close()
            park["proc"] = p
            assert park["entered"].wait(WAIT), "the parked reader never got in"
        g0 = dm.generation
        most_blocks = 0
        for i in range(SYNCS):
            ws.wait(1)                            # the writers are busy
            if i in ADDS:
                step = int(steps[ADDS.index(i)]) * PS
                if i % 2:
                    assert dm.ram_block_add(step) == dm.ram_size - step
                else:
                    dm.extend(dm.ram_size + step)
                mig.open_up()
            mig.sync()
            most_blocks = max(most_blocks, len(segs(name, "b")))
        swaps = dm.generation - g0 - len(ADDS)
        if parked:
            park["release"].set()
            assert park["conn"].poll(WAIT), "the parked reader reported nothing"
            status, value = park["conn"].recv()
            assert status == "ok", value
            park.update(value)
            park["proc"].join(WAIT)
        ws.wait(2)
        written, ops = ws.finish(max_pages)
        if parked:
            written = np.union1d(written, [park["page"]])
        mig.sync()
        assert limit.value == dm.ram_size >> PB == max_pages
        found = np.flatnonzero(bits_of(mig.dest)[:max_pages])
        lost = np.setdiff1d(written, found)
        extra = np.setdiff1d(found, written)
        nblocks = -(-max_pages // BP)
    finally:
        if "release" in park:
            park["release"].set()
        dm.destroy()
    assert segment.list_segments(name) == []
    return {"written": len(written), "lost": len(lost), "extra": len(extra), "ops": ops,
            "swaps": swaps, "blocks_max": most_blocks, "blocks_bound": 3 * nblocks + nblocks,
            "parked_released": park.get("released")}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
@pytest.mark.parametrize("how", ["grace", "late", "no-grace"])
def test_no_lost_bits_while_swapping(map_name: str, spawn_ctx: Any, children: list[Any],
                                     flavor: str, how: str) -> None:
    """``grace``: the default budget; ``late``: a budget of 0, so a swap
    whose grace period is not over at once takes its retired blocks word by
    word and gives back later what lands there (issue 10); ``no-grace``:
    broken on purpose, must lose bits."""
    broken = how == "no-grace"
    cls = NoGraceSwap if broken else sd.DirtyMemory
    budget = 0.0 if how == "late" else None
    r = run_until_caught(
        lambda name, seed: swap_and_sync(name, cls, flavor, spawn_ctx, children, seed=seed,
                                         budget=budget),
        map_name, broken, f"{flavor} {how}")
    assert r["written"] > 500 and r["ops"] > 0, r
    # The syncs did swap.  A swap whose grace period outlasts its budget
    # leaves its blocks retired, and takes go word by word until they are
    # given back: with budget 0 that is most takes, with the default a few.
    assert r["swaps"] >= {"grace": SYNCS // 2, "late": 1, "no-grace": SYNCS}[how], r
    if broken:
        assert r["lost"] > 0, f"the swap without a grace period was not caught in 3 attempts: {r}"
    else:
        assert r["lost"] == 0, r
        assert r["extra"] == 0, r                  # nothing but the writers' bits below the limit
        assert r["blocks_max"] <= r["blocks_bound"], r


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
def test_no_lost_bits_while_swapping_with_a_parked_reader(
        map_name: str, spawn_ctx: Any, children: list[Any], flavor: str) -> None:
    """The same run with a reader parked inside one section through every
    sync: no sync waits for it (it is let go only after the last one), and
    its late write into a block retired long before is not lost."""
    r = swap_and_sync(map_name, sd.DirtyMemory, flavor, spawn_ctx, children, seed=7,
                      parked=True)
    print(r)
    assert r["parked_released"] is True, f"a sync waited for the parked reader: {r}"
    assert r["written"] > 500 and r["ops"] > 0, r
    assert r["swaps"] >= 1, r
    assert r["lost"] == 0, r
    assert r["extra"] == 0, r
    assert r["blocks_max"] <= r["blocks_bound"], r


# --- 4. the fallbacks -----------------------------------------------------------------------
def test_no_swap_inside_a_section_or_below_the_threshold(map_name: str) -> None:
    bp = 1024                                       # 16 words a block
    ram_pages = 4 * bp + 10
    dm = sd.DirtyMemory.create(ram_pages * PS, block_pages=bp, name=map_name)
    try:
        clear_all(dm)
        dm.swap_min_words = FORCE
        rng = np.random.default_rng(11)
        pages = np.unique(rng.integers(0, ram_pages, size=150))
        words = -(-ram_pages // 64)
        g0 = dm.generation

        # Inside a section (nested too) the coordinator takes word by word.
        with dm.read_section():
            dm.set_dirty_pages(pages, MIG)
            dest = np.zeros(words, dtype=np.uint64)
            assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == len(pages)
            assert np.array_equal(np.flatnonzero(bits_of(dest)), pages)
            with dm.read_section():
                dm.set_dirty_pages(pages, MIG)
                assert dm.test_and_clear_dirty(0, dm.ram_size, MIG)
                dm.set_dirty_pages(pages, MIG)
                snap = dm.snapshot_and_clear_dirty(0, dm.ram_size, MIG)
                assert all(snap.get_dirty(int(p) * PS, PS) for p in pages)
                assert dm.dirty_pages(MIG) == 0
            assert dm.generation == g0
        assert dm.generation == g0

        # Outside, the same call swaps.
        dm.set_dirty_pages(pages, MIG)
        dest = np.zeros(words, dtype=np.uint64)
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == len(pages)
        assert dm.generation == g0 + 1
        assert np.array_equal(np.flatnonzero(bits_of(dest)), pages)

        # The threshold counts dirty words of the whole blocks only.
        dm.swap_min_words = 10
        tail = np.arange(4 * bp, ram_pages)          # the partial block: not counted
        for n, swaps in ((9, False), (10, True)):
            first = rng.choice(4 * bp // 64, size=n, replace=False) * 64
            mine = np.concatenate([first, first + 1, tail])
            dm.set_dirty_pages(mine, MIG)
            g = dm.generation
            dest = np.zeros(words, dtype=np.uint64)
            assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == len(mine)
            assert dm.generation == g + swaps, n
            assert np.array_equal(np.flatnonzero(bits_of(dest)), np.sort(mine))
            assert dm.dirty_pages(MIG) == 0
    finally:
        dm.destroy()


@pytest.mark.timeout(30)
def test_non_coordinator_never_swaps(map_name: str, spawn_ctx: Any,
                                     children: list[Any]) -> None:
    bp = 64
    ram_pages = 4 * bp + 10
    dm = sd.DirtyMemory.create(ram_pages * PS, block_pages=bp, name=map_name)
    try:
        clear_all(dm)
        dm.swap_min_words = FORCE
        g0 = dm.generation
        pages = np.unique(np.random.default_rng(2).integers(0, ram_pages, size=200))
        r = child_result(spawn_ctx, workers.non_coordinator_take, map_name, pages,
                         timeout=WAIT, children=children)
        assert r["is_coordinator"] is False
        assert r["generations"] == [g0] * 4, r["generations"]
        assert r["synced"] == len(pages)
        assert np.array_equal(np.flatnonzero(bits_of(r["dest"])), pages)
        assert r["cleared"] is True and all(r["snap_any"]) and r["left"] == 0
        assert dm.generation == g0
        assert dm.dirty_pages(MIG) == 0
    finally:
        dm.destroy()


# --- 5. a reader parked in a section --------------------------------------------------------
class Parked:
    """A spawned ``parked_reader`` and its Events."""

    def __init__(self, ctx: Any, children: list[Any], name: str, page: int) -> None:
        self.go_in, self.entered, self.release = ctx.Event(), ctx.Event(), ctx.Event()
        self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=workers.parked_reader,
                                args=(name, self.go_in, self.entered, self.release, page, child))
        self.proc.start()
        children.append(self.proc)
        child.close()

    def park(self) -> None:
        self.go_in.set()
        assert self.entered.wait(WAIT), "the reader never entered its section"


@pytest.mark.timeout(45)
def test_coordinator_killed_mid_swap_loses_no_bit(map_name: str, spawn_ctx: Any,
                                                  children: list[Any]) -> None:
    """The coordinator publishes a swap and dies before it reads the retired
    blocks: the adopter gives their bits back to the live blocks (after a
    grace period), so the next sync still finds every page."""
    bp = 64
    pages = [0, 5, 63, 64, 130, 200, 255]
    ready = spawn_ctx.Event()
    p = spawn_ctx.Process(target=workers.die_mid_swap, args=(map_name, bp, pages, ready))
    p.start()
    children.append(p)
    p.join(30)
    assert ready.is_set() and p.exitcode == -signal.SIGKILL
    dm = sd.DirtyMemory.adopt(map_name)
    try:
        assert dm.generation == 3  # created (1), first RAM (2), the swap (3)
        dm.rcu.barrier(timeout=10)  # the reap: bits given back, stale blocks unlinked
        dest = np.zeros(4 * bp // 64, np.uint64)
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == len(pages)
        assert np.flatnonzero(bits_of(dest)).tolist() == pages
        assert len(segs(map_name, "b")) == 3 * 4  # only the table's blocks remain
    finally:
        dm.destroy()


@pytest.mark.timeout(45)
def test_parked_reader_does_not_hold_the_swap_back(map_name: str, spawn_ctx: Any,
                                                   children: list[Any]) -> None:
    """(issue 10) A reader parked inside a section does not hold a swapping
    sync back: the swap waits for its grace period only within the budget,
    then takes the retired blocks word by word.  The reader's late write,
    into the block it entered with (retired by then), is given back to the
    live block once it leaves, and the next sync has it.  A reader SIGKILLed
    inside its section is reclaimed and its retired blocks are pooled."""
    bp = 64
    ram_pages = 4 * bp
    late_a, late_b = 5, 2 * bp + 9             # pages in blocks the sync covers whole
    dm = sd.DirtyMemory.create(ram_pages * PS, block_pages=bp, name=map_name)
    try:
        clear_all(dm)
        dm.swap_min_words = FORCE
        a = Parked(spawn_ctx, children, map_name, late_a)
        b = Parked(spawn_ctx, children, map_name, late_b)
        dest = np.zeros(ram_pages // 64, dtype=np.uint64)

        a.park()
        g0 = dm.generation
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == 0   # returns, a still inside
        assert dm.generation == g0 + 1                            # it did swap
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == 0   # word by word meanwhile
        assert dm.generation == g0 + 1
        a.release.set()
        assert a.conn.poll(WAIT)
        status, value = a.conn.recv()
        assert status == "ok", value
        assert value["generation"] == g0         # it did write with the old table
        a.proc.join(WAIT)
        assert a.proc.exitcode == 0
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == 1   # given back, then taken
        assert np.flatnonzero(bits_of(dest)).tolist() == [late_a]

        # A reader SIGKILLed inside its section: its slot is reclaimed and
        # the blocks retired while it was inside are given back and pooled.
        b.park()
        dest[:] = 0
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == 0
        os.kill(b.proc.pid, signal.SIGKILL)
        b.proc.join(WAIT)
        assert b.proc.exitcode == -signal.SIGKILL
        dm.rcu.synchronize(timeout=WAIT)        # reclaims the dead reader's slot
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == 0
        assert not dest.any()
        assert b.proc.pid not in {r.pid for r in dm.rcu.readers()}
        assert dm.dirty_pages(MIG) == 0
        assert not dm.get_dirty_flag(late_b * PS, MIG)
        g = dm.generation
        dm.sync_dirty_bitmap(dest, 0, dm.ram_size)   # nothing retired: it may swap again
        assert dm.generation == g + 1
    finally:
        dm.destroy()
    assert segment.list_segments(map_name) == []


# --- a qsbr reader coming back online --------------------------------------------------------
@pytest.mark.timeout(30)
def test_qsbr_reader_back_online_does_not_write_a_retired_block(
        map_name: str, spawn_ctx: Any, children: list[Any]) -> None:
    """A qsbr reader that goes online loads the grace-period counter, then
    stores it into its slot.  A swap that publishes and completes its grace
    period between the two (the slot still reads 0: offline) must not leave
    the reader on the old table: it would write into the retired block,
    which was already read and pooled.  The write must be found."""
    bp = 64
    ram_pages = 4 * bp
    page = bp + 3
    dm = sd.DirtyMemory.create(ram_pages * PS, block_pages=bp, name=map_name)
    try:
        clear_all(dm)
        ctx = spawn_ctx
        loaded, go = ctx.Event(), ctx.Event()
        conn, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=workers.online_after_swap,
                        args=(map_name, page, loaded, go, child))
        p.start()
        children.append(p)
        child.close()
        assert loaded.wait(WAIT)                 # between its load and its store
        dm.swap_min_words = FORCE
        g0 = dm.generation
        dest = np.zeros(ram_pages // 64, dtype=np.uint64)
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == 0   # swaps, grace period over
        assert dm.generation == g0 + 1
        go.set()
        assert conn.poll(WAIT)
        status, value = conn.recv()
        assert status == "ok", value
        p.join(WAIT)
        assert p.exitcode == 0
        print("qsbr reader back online:", value)
        dm.swap_min_words = FORBID
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == 1, (
            f"the write went into a retired block: {value}")
        assert np.flatnonzero(bits_of(dest)).tolist() == [page]
        for bid in dm._coordinator.pool:
            assert not dm.map_block(bid).words.any(), f"pooled block {bid} was written"
    finally:
        dm.destroy()
    assert segment.list_segments(map_name) == []


# --- the bounded wait: no reader can stretch a take (from test_bounded_sync.py) -----------
SYNC_BP = 32768      # pages a block: 512 words, what a swap pays off for
SYNC_PARK = 15.0     # the parked reader gives up after this long (s)


@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
def test_taking_accessors_return_while_a_reader_is_parked(
        map_name: str, spawn_ctx: Any, children: list[Any], flavor: str) -> None:
    ram = 2 * SYNC_BP * PS                       # two blocks, all dirty (new RAM is)
    late = SYNC_BP + 12345                       # the parked reader's late page, block 1
    dm = sd.DirtyMemory.create(ram, block_pages=SYNC_BP, name=map_name)
    reader = None
    try:
        reader = ParkedReader(spawn_ctx, children, map_name, SYNC_PARK, flavor, late)
        g0 = dm.generation
        dest = np.zeros(2 * SYNC_BP // 64, dtype=np.uint64)
        assert dm.sync_dirty_bitmap(dest, 0, ram) == 2 * SYNC_BP
        assert dm.generation > g0, "the sync did not swap (nothing to bound)"
        dm.swap_min_words = 0                # later takes would swap too, if they may
        assert dm.test_and_clear_dirty(0, ram, VGA) is True
        assert dm.dirty_pages(VGA) == 0
        snap = dm.snapshot_and_clear_dirty(0, ram, CODE)
        assert snap.get_dirty(0, ram) and snap.get_dirty(ram - PS, PS)
        assert dm.dirty_pages(CODE) == 0
        dm.set_dirty_range(0, ram, 1 << MIG)
        assert dm.sync_dirty_bitmap(np.zeros_like(dest), 0, ram) == 2 * SYNC_BP
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


# --- the take object: chosen by the coordinator, never asked about roles ------------------
def test_the_coordinator_chooses_each_handles_take(map_name: str) -> None:
    """create() and adopt() give a SwapTake (ranges of a block or more may
    swap); attach() a word-by-word Take (no range ever swaps), even in the
    coordinator's process; the role leaves with the handle."""
    from shmdirty.take import NEVER, SwapTake, Take

    dm = sd.DirtyMemory.create(4 * 64 * PS, block_pages=64, name=map_name)
    try:
        a = sd.DirtyMemory.attach(map_name)
        try:
            assert type(dm._coordinator.taker) is SwapTake
            assert dm._coordinator.taker.swap_pages == 64
            assert type(a._coordinator.taker) is Take and a._coordinator.taker.swap_pages == NEVER
            # An attached handle's take goes word by word: no table is published.
            g = dm.generation
            dest = np.zeros(4, np.uint64)
            a.swap_min_words = FORCE
            assert a.sync_dirty_bitmap(dest, 0, 4 * 64 * PS) == 4 * 64
            assert dm.generation == g
            # The coordinator's, forced, swaps: a new table.
            dm.set_dirty_range(0, 4 * 64 * PS, sd.DIRTY_CLIENTS_ALL)
            dm.swap_min_words = FORCE
            dm.swap_grace_budget = WAIT
            assert dm.sync_dirty_bitmap(np.zeros(4, np.uint64), 0, 4 * 64 * PS) == 4 * 64
            assert dm.generation > g
        finally:
            a.close()
        coord = dm._coordinator
    finally:
        dm.destroy()
    assert type(coord.taker) is Take   # dropped with the role


def test_swap_take_chooses_only_when_it_pays_and_outside_other_sections(
        map_name: str) -> None:
    """SwapTake.choose: every whole block when they hold at least
    swap_min_words dirty words and the take's section is the outermost;
    none inside another section or below the threshold."""
    dm = sd.DirtyMemory.create(2 * 64 * PS, block_pages=64, name=map_name)
    try:
        taker = dm._coordinator.taker
        clear_all(dm)
        dm.set_dirty_range(0, 3 * PS, 1 << MIG)          # 3 pages: 1 word dirty
        dm.set_dirty_range(64 * PS, PS, 1 << MIG)        # 1 more word
        with dm.read_section():                          # the take's own section
            dm.swap_min_words = 2
            assert taker.choose(MIG, [0, 1]) == [0, 1]
            dm.swap_min_words = 3
            assert taker.choose(MIG, [0, 1]) == []
            dm.swap_min_words = 0
            with dm.read_section():                      # nested: never
                assert taker.choose(MIG, [0, 1]) == []
    finally:
        dm.destroy()


def test_a_forked_child_takes_word_by_word(map_name: str) -> None:
    """The role stays with the parent: in a child forked from the
    coordinator, the inherited handle's take is a plain Take (Shared.forked),
    and its takes publish no table."""
    import json

    dm = sd.DirtyMemory.create(2 * 64 * PS, block_pages=64, name=map_name)
    try:
        dm.swap_min_words = FORCE
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: one report, then _exit
            out = {}
            try:
                g = dm.generation
                out["take"] = type(dm._coordinator.taker).__name__
                out["synced"] = dm.sync_dirty_bitmap(np.zeros(2, np.uint64), 0, 2 * 64 * PS)
                out["published"] = dm.generation != g
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out["error"] = repr(e)
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        got = json.loads(os.read(r, 4096))
        os.close(r)
        assert status == 0 and got == {"take": "Take", "synced": 2 * 64, "published": False}
        assert type(dm._coordinator.taker).__name__ == "SwapTake"   # the parent keeps it
    finally:
        dm.destroy()
