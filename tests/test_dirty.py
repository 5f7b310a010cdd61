"""DirtyMemory's own behaviour, one process at a time (plus a few spawned
helpers where another process is the point): life cycle, RAM block
placement and reuse, growth across block edges, the coordinator's rights,
request_extend / serve, the tcg flag, snapshots, and what stays in /dev/shm.

The accessors' semantics against a reference model are tests/test_dirty_model.py;
bad input is tests/test_bad_input.py.  Blocks are small (64 to 1024 pages)
so that growth and ranges cross block edges.
"""

from __future__ import annotations

import os
import pickle
import threading
from typing import Any

import dirty_workers as workers
import err_workers as W
import numpy as np
import pytest
from mp_harness import child_result, segs

import shmdirty as sd
from shmdirty import layout, segment
from shmdirty.segment import Segment

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("atomics_backend")]

PB = 12
PS = 1 << PB
VGA, CODE, MIG = sd.DIRTY_MEMORY_VGA, sd.DIRTY_MEMORY_CODE, sd.DIRTY_MEMORY_MIGRATION
CLIENTS = (VGA, CODE, MIG)


# --- helpers ---------------------------------------------------------------------------
def clear_all(dm: sd.DirtyMemory) -> None:
    """Make every page clean for every client."""
    if dm.ram_size:
        for c in CLIENTS:
            dm.test_and_clear_dirty(0, dm.ram_size, c)


@pytest.fixture
def make(map_name: str) -> Any:
    """create(..., name=map_name); destroyed (or closed) at teardown."""
    made: list[sd.DirtyMemory] = []

    def _make(ram_pages: int = 0, **kw: Any) -> sd.DirtyMemory:
        dm = sd.DirtyMemory.create(ram_pages * PS, name=map_name, **kw)
        made.append(dm)
        return dm

    yield _make
    for dm in made:
        try:
            if not dm._closed and dm.is_coordinator:
                dm.destroy()
            else:
                dm.close()
        except Exception:
            dm.close()


# --- life cycle ------------------------------------------------------------------------
def test_create_attach_close_destroy(make: Any, map_name: str) -> None:
    dm = make(5, block_pages=64)
    assert (dm.name, dm.ram_size, dm.page_size, dm.block_pages) == (map_name, 5 * PS, PS, 64)
    assert dm.is_coordinator
    assert dm.ram_blocks() == [(0, 5 * PS)]
    assert dm.all_dirty(0, 5 * PS, VGA)  # the first RAM block is new RAM
    names = segment.list_segments(map_name)
    assert layout.header_name(map_name) in names
    assert len(segs(map_name, "b")) == 3            # one block per client
    assert len(segs(map_name, "t")) >= 1

    # A second handle in this process shares the slot and sees the same bits.
    other = sd.DirtyMemory.attach(map_name)
    assert other.name == map_name and other.ram_size == 5 * PS
    dm.test_and_clear_dirty(0, 5 * PS, VGA)
    other.set_dirty_flag(3 * PS + 7, VGA)
    assert dm.get_dirty_flag(3 * PS, VGA) and not dm.get_dirty_flag(2 * PS, VGA)
    assert len(dm.rcu.readers()) == 1
    other.close()
    other.close()  # idempotent
    with pytest.raises(sd.ShmDirtyError):
        other.get_dirty_flag(0, VGA)
    assert dm.get_dirty_flag(3 * PS, VGA)          # the other handle is unaffected

    # The accepted spelling "shmdirty-<name>" attaches to the same map.
    again = sd.DirtyMemory.attach(layout.PREFIX + map_name)
    assert again.name == map_name and again.get_dirty_flag(3 * PS, VGA)
    again.close()

    dm.destroy()
    assert segment.list_segments(map_name) == []
    with pytest.raises(sd.MapNotFound):
        sd.DirtyMemory.attach(map_name)


def test_close_inside_a_section_refuses_and_keeps_the_handle(make: Any) -> None:
    dm = make(4, block_pages=64)
    other = sd.DirtyMemory.attach(dm.name)
    with other.read_section(), pytest.raises(sd.ShmDirtyError):
        other.close()
    other.set_dirty_flag(0, VGA)          # still open: the failed close changed nothing
    other.close()
    assert len(dm.rcu.readers()) == 1


def test_missing_map_is_map_not_found_naming_it(map_name: str) -> None:
    """(issue 10: not "corrupt"; tests/test_lifecycle.py checks the message.)"""
    for call in (lambda: sd.DirtyMemory.attach(map_name),
                 lambda: sd.DirtyMemory.attach(map_name, flavor="qsbr"),
                 lambda: sd.DirtyMemory.adopt(map_name)):
        with pytest.raises(sd.MapNotFound) as info:
            call()
        assert info.value.map == map_name
        assert layout.header_name(map_name) in str(info.value)
        assert isinstance(info.value, FileNotFoundError)
        assert not isinstance(info.value, sd.CorruptSegment)
    assert segment.list_segments(map_name) == []    # a failed attach creates nothing


def test_destroy_leaves_nothing(make: Any, map_name: str, spawn_ctx: Any,
                                children: list[Any]) -> None:
    dm = make(70, block_pages=64)
    for size in (3, 130, 1):
        dm.ram_block_add(size * PS)
    dm.ram_block_remove(70 * PS)
    reader = sd.DirtyMemory.attach(map_name, flavor="memb")
    reader.set_dirty_flag(0, VGA)
    # A reader in another process that already left does not matter either.
    workers_seen = child_result(spawn_ctx, workers.pickled_handle_child, dm, 1,
                                children=children)
    assert workers_seen["name"] == map_name
    assert len(segs(map_name, "b")) == 3 * 4
    dm.destroy()
    assert segment.list_segments(map_name) == []
    reader.close()
    assert segment.list_segments(map_name) == []


# --- RAM blocks --------------------------------------------------------------------------
def test_ram_block_add_placement(make: Any) -> None:
    """QEMU's find_ram_offset: the smallest gap that fits, else the end."""
    dm = make(block_pages=64)
    assert dm.ram_size == 0 and dm.ram_blocks() == []
    sizes = {"A": 4, "B": 4, "C": 8, "D": 2, "E": 12}
    at = {k: dm.ram_block_add(v * PS) for k, v in sizes.items()}
    assert at == {"A": 0, "B": 4 * PS, "C": 8 * PS, "D": 16 * PS, "E": 18 * PS}
    assert dm.ram_size == 30 * PS

    dm.ram_block_remove(at["B"])        # gap [4, 8): 4 pages
    dm.ram_block_remove(at["D"])        # gap [16, 18): 2 pages
    assert dm.ram_size == 30 * PS
    assert dm.ram_block_add(2 * PS) == 16 * PS      # fits both gaps: the smaller one
    assert dm.ram_block_add(3 * PS) == 4 * PS       # only the 4-page gap fits
    assert dm.ram_block_add(5 * PS) == 30 * PS      # no gap fits: the end
    assert dm.ram_block_add(PS) == 7 * PS           # what is left of the 4-page gap
    dm.ram_block_remove(0)                          # the space before the first block
    assert dm.ram_block_add(4 * PS) == 0
    assert dm.ram_blocks() == [(0, 4 * PS), (4 * PS, 3 * PS), (7 * PS, PS), (8 * PS, 8 * PS),
                               (16 * PS, 2 * PS), (18 * PS, 12 * PS), (30 * PS, 5 * PS)]
    assert dm.ram_size == 35 * PS

    with pytest.raises(sd.BadInput):
        dm.ram_block_remove(PS)                     # no RAM block starts there
    with pytest.raises(ValueError):
        dm.ram_block_add(PS + 1)                    # not a page multiple
    assert dm.ram_size == 35 * PS and len(dm.ram_blocks()) == 7


@pytest.mark.parametrize("block_pages", [64, 256, 1024])
def test_readd_within_the_size_reuses_blocks(make: Any, map_name: str,
                                             block_pages: int) -> None:
    """The bitmap never shrinks, and RAM removed and added again within the
    blocks it has makes no new block segment (QEMU's 2024 leak fix: the
    number of blocks, not the old RAM size, decides what to allocate)."""
    bp = block_pages
    dm = make(bp + bp // 2, block_pages=bp)          # two blocks per client
    tail = dm.ram_block_add(bp * PS)                 # [1.5, 2.5) blocks: three
    assert len(segs(map_name, "b")) == 3 * 3
    before = segs(map_name, "b")

    dm.ram_block_remove(tail)                        # the RAM size shrinks ...
    assert dm.ram_size == (bp + bp // 2) * PS
    assert segs(map_name, "b") == before             # ... the bitmap does not
    clear_all(dm)
    assert dm.ram_block_add(bp * PS) == tail         # the same place again
    assert segs(map_name, "b") == before             # no new block segment
    for c in CLIENTS:                                # and it is new RAM: dirty
        assert dm.all_dirty(tail, bp * PS, c)
        assert not dm.get_dirty(0, tail, c)

    dm.ram_block_remove(0)                           # a hole at the start
    assert dm.ram_block_add(bp * PS) == 0            # fits the hole
    assert dm.ram_block_add((bp // 2) * PS) == bp * PS
    assert segs(map_name, "b") == before

    # Past the blocks it has, only the missing blocks are made.
    dm.ram_block_add(bp * PS)                        # ends at 3.5 blocks: four
    after = segs(map_name, "b")
    assert set(before) < set(after) and len(after) == 3 * 4


@pytest.mark.parametrize("block_pages", [64, 128, 1024])
def test_growth_across_block_edges(make: Any, map_name: str, block_pages: int) -> None:
    bp = block_pages
    dm = make(bp - 3, block_pages=bp)
    clear_all(dm)
    marks = {VGA: [0, bp - 5], CODE: [bp - 4], MIG: [1, bp - 4]}
    for c, pages in marks.items():
        for p in pages:
            dm.set_dirty_flag(p * PS, c)
    size = bp - 3
    for new in (bp + 7, 2 * bp, 2 * bp + 1, 4 * bp + 63):   # across one, onto, past edges
        gen = dm.generation
        dm.extend(new * PS)
        assert dm.generation > gen
        assert dm.ram_size == new * PS
        assert len(segs(map_name, "b")) == 3 * -(-new // bp)
        for c in CLIENTS:
            # The new RAM is dirty for every client, across the block edges ...
            assert dm.all_dirty(size * PS, (new - size) * PS, c)
            assert dm.range_includes_clean(size * PS, (new - size) * PS,
                                           sd.DIRTY_CLIENTS_ALL) == 0
            # ... and the old RAM kept exactly its bits (blocks did not move).
            for p in range(bp - 3):
                assert dm.get_dirty_flag(p * PS, c) == (p in marks[c]), (c, p)
        clear_all(dm)
        for c, pages in marks.items():
            for p in pages:
                dm.set_dirty_flag(p * PS, c)
        size = new

    # Ranges across edges: set, test, sync and clear.
    lo, hi = bp - 2, 3 * bp + 2                       # spans four blocks
    dm.set_dirty_range(lo * PS, (hi - lo) * PS, 1 << MIG | 1 << VGA)
    assert dm.all_dirty(lo * PS, (hi - lo) * PS, MIG)
    assert not dm.all_dirty((lo - 1) * PS, (hi - lo) * PS, MIG)
    assert dm.range_includes_clean(lo * PS, (hi - lo) * PS, sd.DIRTY_CLIENTS_ALL) == 1 << CODE
    dest = np.zeros(-(-dm.ram_size // PS) // 64 + 1, dtype=np.uint64)
    newly = dm.sync_dirty_bitmap(dest, 0, dm.ram_size)
    expect = set(range(lo, hi)) | set(marks[MIG])
    assert newly == len(expect)
    got = np.flatnonzero(np.unpackbits(dest.view(np.uint8), bitorder="little"))
    assert set(got.tolist()) == expect
    assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == 0   # taken: nothing new
    assert not dm.get_dirty(0, dm.ram_size, MIG)
    assert dm.test_and_clear_dirty((lo + 1) * PS, (hi - lo - 2) * PS, VGA)
    assert dm.get_dirty_flag(lo * PS, VGA) and dm.get_dirty_flag((hi - 1) * PS, VGA)
    assert not dm.get_dirty((lo + 1) * PS, (hi - lo - 2) * PS, VGA)


def test_new_ram_is_dirty_for_all_clients(make: Any) -> None:
    dm = make(64 + 10, block_pages=64)
    clear_all(dm)
    off = dm.ram_block_add(70 * PS)
    assert off == 74 * PS
    for c in CLIENTS:
        assert dm.all_dirty(off, 70 * PS, c)
        assert not dm.get_dirty(0, off, c)
    assert dm.range_includes_clean(off, 70 * PS, sd.DIRTY_CLIENTS_ALL) == 0
    assert dm.range_includes_clean(0, off + PS, sd.DIRTY_CLIENTS_ALL) == sd.DIRTY_CLIENTS_ALL
    dest = np.zeros(4, dtype=np.uint64)
    assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == 70


def test_extend_is_grow_only(make: Any, map_name: str) -> None:
    dm = make(100, block_pages=64)
    gen, blocks = dm.generation, segs(map_name, "b")
    for smaller in (100 * PS, 99 * PS, PS):
        dm.extend(smaller)
        assert dm.ram_size == 100 * PS
    assert dm.generation == gen and segs(map_name, "b") == blocks
    assert dm.ram_blocks() == [(0, 100 * PS)]
    with pytest.raises(ValueError):
        dm.extend(0)
    with pytest.raises(ValueError):
        dm.extend(200 * PS + 1)
    dm.extend(101 * PS)
    assert dm.ram_size == 101 * PS and dm.ram_blocks() == [(0, 100 * PS), (100 * PS, PS)]


# --- the coordinator's rights --------------------------------------------------------------
@pytest.mark.timeout(60)
def test_coordinator_calls_refused_elsewhere(make: Any, spawn_ctx: Any,
                                             children: list[Any]) -> None:
    dm = make(10, block_pages=64)
    gen = dm.generation
    got = child_result(spawn_ctx, workers.probe_not_coordinator, dm.name, children=children)
    assert got["is_coordinator"] is False and got["ram_size"] == 10 * PS
    for what in ("ram_block_add", "ram_block_remove", "extend", "serve", "destroy"):
        assert got[what] is not None, f"{what} succeeded in a non-coordinator"
        cls, not_coord, perm, msg = got[what]
        assert not_coord and perm, (what, cls, msg)
        assert f"pid {os.getpid()}" in msg, (what, msg)
    assert got["ram_size_after"] == 10 * PS
    # Nothing changed, nothing was removed.
    assert dm.generation == gen and dm.ram_blocks() == [(0, 10 * PS)]
    assert dm.get_dirty_flag(0, VGA) is True
    assert len(segs(dm.name, "b")) == 3


@pytest.mark.timeout(60)
def test_pickled_handle_attaches_in_a_spawned_child(make: Any, spawn_ctx: Any,
                                                    children: list[Any]) -> None:
    dm = make(200, block_pages=64)
    clear_all(dm)
    got = child_result(spawn_ctx, workers.pickled_handle_child, dm, 130, children=children)
    assert got["name"] == dm.name and got["ram_size"] == 200 * PS
    assert got["is_coordinator"] is False and got["flavor"] == "memb"
    assert got["seen"] is True
    assert len(set(got["readers"])) == 2                 # the child had its own slot
    assert dm.get_dirty_flag(130 * PS, VGA)
    assert not dm.get_dirty(0, 130 * PS, VGA)
    assert [r.pid for r in dm.rcu.readers()] == [os.getpid()]  # it left
    # In this process unpickling gives another handle on the same map.
    again = pickle.loads(pickle.dumps(dm))
    assert again.name == dm.name and again.get_dirty_flag(130 * PS, VGA)
    again.close()


# --- request_extend and serve ----------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fixed", [True, False])
def test_a_repost_after_the_grant_is_withdrawn(make: Any, monkeypatch: pytest.MonkeyPatch,
                                               fixed: bool) -> None:
    """The waiter re-posts its request every 50 ms; a re-post that lands
    just after serve granted it and cleared the word must not stay there, or
    the coordinator grows RAM back to it once RAM shrinks (this interleaving
    made test_request_extend_granted_by_serve fail about once in 15 runs).
    The interleaving is forced: the wait re-posts once more after the grant.
    The broken variant, a granted request not withdrawn, regrows RAM."""
    from shmdirty.coordinator import Coordinator

    dm = make(64)
    want = 64 * 3 + 5
    wait, withdraw = Coordinator.await_ram_size, Coordinator.withdraw

    def wait_then_repost(self: Coordinator, size: int, *args: Any) -> None:
        wait(self, size, *args)
        stop.set()         # serve looks no more (it would clear a met request)
        server.join(10)
        self.post(size)   # the waiter's re-post, landing after the grant

    monkeypatch.setattr(Coordinator, "await_ram_size", wait_then_repost)
    if not fixed:   # the waiter never withdraws; serve (the coordinator) still does
        monkeypatch.setattr(Coordinator, "withdraw", lambda self, size: (
            withdraw(self, size) if self.is_coordinator() else None))
    a = sd.DirtyMemory.attach(dm.name)   # not the coordinator: it posts and waits
    stop = threading.Event()
    server = threading.Thread(target=dm.serve, args=(stop,))
    server.start()
    try:
        a.request_extend(want * PS, timeout=30)
    finally:
        stop.set()
        server.join(10)
        a.close()
    assert dm.ram_size == want * PS
    dm.ram_block_remove(64 * PS)
    dm.serve_once()
    assert (dm.ram_size == 64 * PS) == fixed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("event", ["multiprocessing", "threading"])
def test_request_extend_granted_by_serve(make: Any, spawn_ctx: Any, children: list[Any],
                                         event: str) -> None:
    dm = make(64, block_pages=64)
    clear_all(dm)
    want = 64 * 3 + 5
    parent, child = spawn_ctx.Pipe(duplex=False)
    if event == "multiprocessing":
        stop = spawn_ctx.Event()       # the child sets it when its request returned
        p = spawn_ctx.Process(target=workers.request_extend_child,
                              args=(dm.name, want * PS, 30.0, child, stop))
        p.start()
        children.append(p)
        dm.serve(stop)                 # in this thread, until the child is done
    else:
        stop = threading.Event()
        server = threading.Thread(target=dm.serve, args=(stop,))
        server.start()
        try:
            p = spawn_ctx.Process(target=workers.request_extend_child,
                                  args=(dm.name, want * PS, 30.0, child))
            p.start()
            children.append(p)
            p.join(30)
        finally:
            stop.set()
            server.join(10)
        assert not server.is_alive()
    child.close()
    status, got = parent.recv()
    p.join(10)
    assert status == "ok", got
    assert "error" not in got, got
    assert got["ram_size"] >= want * PS
    assert dm.ram_size == want * PS
    # The grant is new RAM: dirty for all clients.
    assert dm.all_dirty(64 * PS, (want - 64) * PS, MIG)
    assert not dm.get_dirty(0, 64 * PS, MIG)
    # A granted request is not granted again after the RAM shrinks.
    dm.ram_block_remove(64 * PS)
    assert dm.ram_size == 64 * PS
    dm.serve_once()
    assert dm.ram_size == 64 * PS


@pytest.mark.timeout(60)
def test_request_extend_times_out_naming_the_coordinator(make: Any, spawn_ctx: Any,
                                                         children: list[Any]) -> None:
    dm = make(64, block_pages=64)
    got = child_result(spawn_ctx, workers.request_extend_child, dm.name, 200 * PS, 0.3,
                       children=children)
    assert got["timeout"] is True, got
    assert got["error"] == "GraceTimeout"
    assert f"pid {os.getpid()}" in got["message"], got["message"]
    assert dm.ram_size == 64 * PS          # nobody served: nothing grew
    # The request that raised was withdrawn: the error changed nothing, and
    # no later serve grows RAM behind the caller's back (issue 13).
    assert dm.serve_once() is False
    assert dm.ram_size == 64 * PS


def test_request_extend_by_the_coordinator_extends(make: Any) -> None:
    dm = make(64, block_pages=64)
    dm.request_extend(65 * PS, timeout=0)
    assert dm.ram_size == 65 * PS


# --- the tcg flag, snapshots ---------------------------------------------------------------------
@pytest.mark.parametrize("tcg", [False, True])
def test_lebitmap_sets_code_only_under_tcg(make: Any, tcg: bool) -> None:
    dm = make(200, block_pages=64, tcg=tcg)
    clear_all(dm)
    bits = np.zeros(3, dtype=np.uint64)
    bits[0] = 1 | 1 << 63
    bits[2] = 1 << 5
    dm.set_dirty_lebitmap(bits, 60 * PS, 140)          # pages 60, 123 and 193
    for c in CLIENTS:
        want = c != CODE or tcg
        for p in (60, 123, 193):
            assert dm.get_dirty_flag(p * PS, c) is want, (c, p)
        assert not dm.get_dirty(0, 60 * PS, c)
        assert not dm.get_dirty(61 * PS, 62 * PS, c)
        assert not dm.get_dirty(194 * PS, 6 * PS, c)
    dm.set_dirty_lebitmap(b"\x01", 0, 1)               # bytes are little-endian too
    assert dm.get_dirty_flag(0, VGA) and dm.get_dirty_flag(0, CODE) is tcg


def test_snapshot_and_clear_dirty(make: Any) -> None:
    dm = make(300, block_pages=64)
    clear_all(dm)
    for p in (10, 63, 64, 130, 250):
        dm.set_dirty_flag(p * PS, VGA)
    dm.set_dirty_flag(130 * PS, MIG)
    snap = dm.snapshot_and_clear_dirty(60 * PS, 80 * PS, VGA)     # pages [60, 140)
    # The range is clean now for VGA; outside it and other clients untouched.
    assert not dm.get_dirty(60 * PS, 80 * PS, VGA)
    assert dm.get_dirty_flag(10 * PS, VGA) and dm.get_dirty_flag(250 * PS, VGA)
    assert dm.get_dirty_flag(130 * PS, MIG)
    # The snapshot answers for its range, across block edges.
    assert snap.get_dirty(60 * PS, 80 * PS)
    assert snap.get_dirty(63 * PS, PS) and snap.get_dirty(64 * PS, PS)
    assert snap.get_dirty(130 * PS, PS)
    assert not snap.get_dirty(65 * PS, 65 * PS)
    assert not snap.get_dirty(131 * PS, 9 * PS)
    assert not snap.get_dirty(60 * PS, 0)
    with pytest.raises(ValueError):
        snap.get_dirty(10 * PS, PS)                    # outside the snapshot
    # Later writes do not change a snapshot.
    dm.set_dirty_flag(100 * PS, VGA)
    assert not snap.get_dirty(100 * PS, PS)
    assert dm.snapshot_and_clear_dirty(60 * PS, 80 * PS, VGA).get_dirty(100 * PS, PS)


# --- what stays in /dev/shm ---------------------------------------------------------------------
def test_old_tables_unlinked_after_a_grace_period(make: Any, map_name: str) -> None:
    dm = make(10, block_pages=64)
    reader = sd.DirtyMemory.attach(map_name)
    for i in range(12):
        dm.extend(dm.ram_size + (37 + i) * PS)
        off = dm.ram_block_add(3 * PS)
        with reader.read_section():          # a reader keeps up with the tables
            reader.set_dirty_flag(dm.ram_size - PS, VGA)
        dm.ram_block_remove(off)
    dm.rcu.barrier(timeout=10)
    assert segs(map_name, "t") == [layout.table_name(map_name, dm.generation, dm.table.tag)]
    nblocks = -(-(dm.ram_size // PS + 3) // 64)
    assert len(segs(map_name, "b")) == 3 * nblocks   # no block was lost or duplicated
    reader.close()
    assert segs(map_name, "t") == [layout.table_name(map_name, dm.generation, dm.table.tag)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["set_dirty_flag", "get_dirty", "set_dirty_range",
                                "test_and_clear_dirty"])
def test_a_threads_first_use_waits_for_an_attach_under_way(make: Any, op: str,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """An unpickled handle attaches on first use (dirty.py _Unattached).  A
    thread whose first use comes while another thread's attach is under way
    must wait for it and then run, not find the handle half made.  The
    attach is held (handles.acquire patched) until the other thread is done
    or has had half a second to be: it either waits on the attach (then runs
    once it is let go) or fails at once."""
    from shmdirty import dirty, handles

    dm = make(64, block_pages=64)
    clear_all(dm)
    u = pickle.loads(pickle.dumps(dm))
    args = {"set_dirty_flag": (5 * PS, MIG), "set_dirty_range": (5 * PS, PS, 1 << MIG),
            "get_dirty": (0, 64 * PS, MIG), "test_and_clear_dirty": (0, 64 * PS, VGA)}[op]
    errors: list[BaseException] = []

    def second_use() -> None:
        try:
            getattr(u, op)(*args)
        except BaseException as e:   # noqa: BLE001 - the test reports it
            errors.append(e)

    second = threading.Thread(target=second_use)
    real_acquire = handles.acquire

    def held_acquire(*a: Any, **kw: Any) -> Any:
        monkeypatch.setattr(dirty.handles, "acquire", real_acquire)
        second.start()          # its first use comes while this attach is under way
        second.join(0.5)        # it fails at once, or waits for this attach
        return real_acquire(*a, **kw)

    monkeypatch.setattr(dirty.handles, "acquire", held_acquire)
    try:
        u.get_dirty_flag(0, VGA)   # the first use: attaches
        second.join(30)
        assert not second.is_alive()
        assert not errors, f"the second thread's first use failed: {errors[0]!r}"
        assert type(u) is sd.DirtyMemory
        if op.startswith("set"):
            assert dm.get_dirty_flag(5 * PS, MIG)
    finally:
        second.join(30)
        u.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["get_dirty", "set_dirty_range", "test_and_clear_dirty",
                                "all_dirty"])
def test_a_range_op_mapping_a_block_survives_a_refresh_by_another_thread(
        make: Any, map_name: str, op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A range op whose block is not mapped yet maps it and walks again
    (TableView.over).  While it maps (segment attach: the GIL is free),
    another thread of the process may refresh the same handle to a newer
    table, which replaces the handle's block lists: the op must walk the
    new list it mapped the block into, and finish."""
    from shmdirty import bitmap
    from shmdirty.view import TableView

    bp = 64
    c = make(2 * bp, block_pages=bp)
    clear_all(c)
    dm = sd.DirtyMemory.attach(map_name)
    try:
        dm.get_dirty(0, PS, MIG)                  # dm's table: 2 blocks
        c.extend(4 * bp * PS)                     # blocks 2, 3: dm has not mapped them
        real_map, real_walk = TableView.map_block, bitmap.walk_blocks
        walks, published = [0], []

        def map_block(self: Any, *a: Any, **kw: Any) -> Any:
            b = real_map(self, *a, **kw)
            if self is dm and not published:
                published.append(True)                # once
                c.extend(6 * bp * PS)                 # the coordinator publishes again
                t = threading.Thread(target=dm.get_dirty_flag, args=(0, MIG))
                t.start()                             # another thread of dm refreshes it
                t.join(30)
            return b

        def walk_blocks(*a: Any) -> int:
            walks[0] += 1
            if walks[0] > 100:
                raise RuntimeError("the walk never ends: its block list was replaced")
            return real_walk(*a)

        monkeypatch.setattr(TableView, "map_block", map_block)
        monkeypatch.setattr(bitmap, "walk_blocks", walk_blocks)
        args = (3 * bp * PS, PS, 1 << MIG if op == "set_dirty_range" else MIG)
        got = getattr(dm, op)(*args)
        assert got is (None if op == "set_dirty_range" else True)   # new RAM is dirty
        assert dm.table.generation == c.generation
    finally:
        dm.close()


@pytest.mark.timeout(60)
def test_a_block_mapped_while_another_thread_refreshes_goes_to_its_own_table(
        make: Any, map_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a thread maps a block of the table it read (TableView.block:
    the GIL is free), the coordinator swaps that block out (a take of it
    whole; no grace wait: the budget is 0) and another thread refreshes the
    same handle to the new table.  The mapping must not be filed under the
    new table's index, where a fresh block is now: every later write of
    this handle to that block would land in the retired one, which the
    coordinator gives back once and then pools.  Writes after the swap
    must all be found by syncs."""
    from shmdirty.view import TableView

    bp = 64
    c = make(4 * bp, block_pages=bp)
    clear_all(c)
    c.swap_min_words, c.swap_grace_budget = 1, 0.0
    dm = sd.DirtyMemory.attach(map_name)

    def in_thread(fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args)
        t.start()
        t.join(30)
        assert not t.is_alive()

    def swap_block_2() -> None:
        c.set_dirty_flag((2 * bp + 1) * PS, MIG)
        assert c.sync_dirty_bitmap(np.zeros(4, dtype=np.uint64), 2 * bp * PS, bp * PS) == 1

    real_map = TableView.map_block
    swapped: list[int] = []

    def map_block(self: Any, *a: Any, **kw: Any) -> Any:
        b = real_map(self, *a, **kw)
        if self is dm and not swapped:
            swapped.append(c.generation)
            in_thread(swap_block_2)                   # the coordinator swaps block 2 out
            in_thread(dm.get_dirty_flag, 0, MIG)      # another thread of dm refreshes it
        return b

    found: list[bool] = []

    def sync_finds(page: int) -> None:   # word by word: no swap now
        dest = np.zeros(4, dtype=np.uint64)
        c.sync_dirty_bitmap(dest, 2 * bp * PS, bp * PS)
        found.append(bool(dest[page >> 6] >> np.uint64(page & 63) & np.uint64(1)))

    try:
        dm.get_dirty(0, PS, MIG)                      # dm maps block 0, not 2
        monkeypatch.setattr(TableView, "map_block", map_block)
        assert dm.get_dirty(2 * bp * PS, PS, MIG) is False   # maps block 2
        monkeypatch.setattr(TableView, "map_block", real_map)
        assert c.generation > swapped[0]
        c.swap_min_words = 1 << 30
        for page in (2 * bp + 10, 2 * bp + 20, 2 * bp + 30):
            dm.set_dirty_flag(page * PS, MIG)
            in_thread(sync_finds, page)
        assert found == [True, True, True], "a write after the swap was lost"
    finally:
        dm.close()


def test_argument_errors_name_the_public_method(make: Any) -> None:
    """The hot accessors (C methods on the kernel) hand odd calls to their
    Python paths; a TypeError still names the method the caller called."""
    dm = make(16)
    for call, words in ((lambda: dm.set_dirty_flag(PS), "set_dirty_flag() missing"),
                        (lambda: dm.get_dirty(0, PS), "get_dirty() missing"),
                        (lambda: dm.test_and_clear_dirty(0, PS, clinet=MIG),
                         "test_and_clear_dirty() got an unexpected keyword argument 'clinet'"),
                        (lambda: dm.set_dirty_flag(PS, MIG, client=MIG),
                         "set_dirty_flag() got multiple values for argument 'client'"),
                        (lambda: dm.set_dirty_range(0, PS), "set_dirty_range() missing"),
                        (lambda: dm.set_dirty_pages(np.array([1])), "set_dirty_pages() missing")):
        with pytest.raises(TypeError) as info:
            call()
        assert words in str(info.value) and "_py" not in str(info.value)


def test_a_strided_lebitmap_is_merged_like_a_contiguous_one(make: Any) -> None:
    dm = make(256)
    src = np.arange(8, dtype=np.uint64)
    dm.test_and_clear_dirty(0, 256 * PS, MIG)
    dm.set_dirty_lebitmap(src[::2], 0, 256)
    strided = [p for p in range(256) if dm.get_dirty_flag(p * PS, MIG)]
    dm.test_and_clear_dirty(0, 256 * PS, MIG)
    dm.set_dirty_lebitmap(src[::2].copy(), 0, 256)
    assert strided == [p for p in range(256) if dm.get_dirty_flag(p * PS, MIG)] == [65, 130,
                                                                                   193, 194]


def test_create_of_an_existing_name_is_map_exists(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        before = segment.list_segments(map_name)
        with pytest.raises(sd.MapExists) as e:
            sd.DirtyMemory.create(128 * 4096, name=map_name)
        assert isinstance(e.value, FileExistsError) and isinstance(e.value, sd.ShmDirtyError)
        assert map_name in str(e.value) and "shmdirty gc" in str(e.value)
        assert segment.list_segments(map_name) == before
        dm.set_dirty_flag(0, W.MIG)          # the existing map is untouched
        assert dm.ram_size == 64 * 4096 and dm.is_coordinator
    finally:
        dm.destroy()


def test_set_dirty_pages_error_counts_pages(map_name: str) -> None:
    import numpy as np
    dm = sd.DirtyMemory.create(256 * 4096, block_pages=64, name=map_name)
    try:
        dm.test_and_clear_dirty(0, 256 * 4096, W.MIG)   # new RAM starts dirty
        with pytest.raises(sd.BadInput) as e:
            dm.set_dirty_pages(np.array([3, 256]), W.MIG)
        assert "page numbers [3, 256] is outside guest RAM: pages [0, 256)" in str(e.value)
        assert not dm.get_dirty_flag(3 * 4096, W.MIG)      # nothing changed
    finally:
        dm.destroy()


def test_destroy_inside_a_section_refuses_before_unlinking(map_name: str) -> None:
    """destroy() unlinked every segment and dropped the pending callbacks,
    and only then did close() refuse (inside a read-side section): the call
    failed, the handle stayed open, and the map was gone for everyone."""
    dm = sd.DirtyMemory.create(64 * PS, block_pages=64, name=map_name)
    before = segment.list_segments(map_name)
    with dm.read_section(), pytest.raises(sd.ShmDirtyError):
        dm.destroy()
    assert segment.list_segments(map_name) == before
    other = sd.DirtyMemory.attach(map_name)     # the map is still there
    assert other.get_dirty_flag(0, VGA)
    other.close()
    dm.destroy()
    assert segment.list_segments(map_name) == []


# --- issue 17 item 5: a removed RAM block is outside RAM --------------------------------
def test_a_removed_ram_block_is_outside_ram(map_name: str) -> None:
    """After ram_block_remove the hole is outside guest RAM: every accessor
    refuses an address or range in it with BadInput (the error past the end
    gives), on the C fast paths too, and changes nothing; dirty_pages and
    sync_dirty_bitmap count RAM pages only; RAM after the hole still works."""
    bp = 64
    dm = sd.DirtyMemory.create(bp * PS, block_pages=bp, name=map_name)
    try:
        assert dm.ram_block_add(bp * PS) == bp * PS           # [64, 128): the hole-to-be
        assert dm.ram_block_add(bp * PS) == 2 * bp * PS       # [128, 192)
        dm.ram_block_remove(bp * PS)
        assert dm.ram_size == 3 * bp * PS
        hole, after = (bp + 5) * PS, (2 * bp + 7) * PS
        clear_all_ram = [(0, bp * PS), (2 * bp * PS, bp * PS)]
        for c in CLIENTS:
            for s, n in clear_all_ram:
                dm.test_and_clear_dirty(s, n, c)
        for c in CLIENTS:
            assert dm.dirty_pages(c) == 0
        calls = [
            ("set_dirty_flag", (hole, VGA)), ("get_dirty_flag", (hole, VGA)),
            ("get_dirty", (hole, PS, VGA)), ("all_dirty", (hole, PS, VGA)),
            ("range_includes_clean", (hole, PS, 7)), ("set_dirty_range", (hole, PS, 7)),
            ("test_and_clear_dirty", (hole, PS, VGA)),
            ("test_and_clear_dirty", (0, dm.ram_size, VGA)),       # spans the hole
            ("get_dirty", ((bp - 1) * PS, 2 * PS, VGA)),           # RAM, then the hole
            ("set_dirty_range", (0, dm.ram_size, 7)),
            ("set_dirty_pages", (np.array([bp + 5], np.int64), VGA)),
            ("set_dirty_pages", (np.array([3, bp + 5], np.int64), VGA)),
            ("set_dirty_lebitmap", (np.array([1], np.uint64), hole, 1)),
            ("snapshot_and_clear_dirty", (hole, PS, VGA)),
        ]
        for op, args in calls:
            for _ in range(2):            # the second call runs with every block mapped
                with pytest.raises(sd.ShmDirtyError, match="outside guest RAM") as e:
                    getattr(dm, op)(*args)
                assert isinstance(e.value, ValueError), op
        for c in CLIENTS:                  # nothing changed
            assert dm.dirty_pages(c) == 0
        # RAM after the hole: the accessors work there.
        dm.set_dirty_flag(after, VGA)
        assert dm.get_dirty_flag(after, VGA) and dm.get_dirty(after, PS, VGA)
        dm.set_dirty_pages(np.array([2 * bp + 9], np.int64), MIG)
        dm.set_dirty_range(0, PS, 1 << MIG)
        assert dm.dirty_pages(VGA) == 1 and dm.dirty_pages(MIG) == 2
        # Bits in the hole (from before the removal) are never counted.
        dm.set_dirty_range(0, bp * PS, 7)
        assert dm.dirty_pages(MIG) == bp + 1
        dest = np.zeros(3 * bp // 64, np.uint64)
        assert dm.sync_dirty_bitmap(dest, 0, dm.ram_size) == bp + 1   # RAM pages only
        assert not dest[1].any()
        assert dm.test_and_clear_dirty(after, PS, VGA) is True
        # The hole filled again is RAM again, dirty for every client.
        assert dm.ram_block_add(bp * PS) == bp * PS
        dm.set_dirty_flag(hole, VGA)
        assert dm.dirty_pages(CODE) == 2 * bp
    finally:
        dm.destroy()


# --- issue 18.7: a stranger's segment under our map's prefix does not break teardown ---------
def test_destroy_leaves_a_strangers_segment_and_succeeds(map_name: str) -> None:
    """Run as uid 65534 (nobody), the coordinator destroys its map while a
    segment of another user (root) sits under the map's prefix: destroy
    removes the map's own segments and leaves the stranger's, no error."""
    import shutil
    import subprocess
    import sys
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run a second user")
    code = (f"import shmdirty as sd, sys\n"
            f"dm = sd.DirtyMemory.create(1 << 20, block_pages=64, name={map_name!r})\n"
            f"print('made', flush=True)\n"
            f"sys.stdin.readline()\n"
            f"dm.destroy()\n"
            f"print('destroyed', flush=True)\n")
    proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline()
        if first != "made\n":
            proc.kill()
            pytest.skip(f"uid 65534 cannot run this interpreter here: {proc.communicate()}")
        stranger = f"{layout.PREFIX}{map_name}-b7"
        Segment.create(stranger, 64, layout.KIND_BLOCK).close()    # root's
        out, err = proc.communicate("\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and out == "destroyed\n", (out, err)
    assert segment.list_segments(map_name) == [stranger]
