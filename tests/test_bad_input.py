"""Bad input to every accessor: a ShmDirtyError that is a ValueError, and nothing changes.

The map has three blocks of 64 pages, with a different pattern of clean pages
per client, so that a stray write or clear anywhere shows up in the full
snapshot (every client, every page) taken before and after.  Afterwards a
grace period must complete: a call that fails must not leave this process
inside a read-side section.  The choices behind each case are listed at the
top of tests/model.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import shmdirty as sd

# Every case on every atomics backend (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("atomics_backend")

PS = 4096
BP = 64
PAGES = 3 * BP
RAM = PAGES * PS
VGA, CODE, MIG = 0, 1, 2

# Clean stretches per client, chosen to straddle the block edges at 64 and 128.
CLEAN = {VGA: (0, 10), CODE: (60, 70), MIG: (120, 192)}


def expected_pattern() -> tuple[int, tuple[tuple[bool, ...], ...]]:
    return RAM, tuple(
        tuple(not CLEAN[c][0] <= p < CLEAN[c][1] for p in range(PAGES)) for c in range(3)
    )


def full_state(dm: Any) -> tuple[int, tuple[tuple[bool, ...], ...]]:
    """ram_size and every page's flag for every client."""
    size = dm.ram_size
    return size, tuple(
        tuple(dm.get_dirty_flag(p * PS, c) for p in range(size // PS)) for c in range(3)
    )


@pytest.fixture
def dm(map_name: str) -> Iterator[Any]:
    d = sd.DirtyMemory.create(RAM, page_bits=12, block_pages=BP, name=map_name)
    try:
        for c, (lo, hi) in CLEAN.items():
            d.test_and_clear_dirty(lo * PS, (hi - lo) * PS, c)
        yield d
    finally:
        d.destroy()
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"shmdirty-{map_name}-")]
    assert not left, f"destroy() left {left}"


def u64(n: int, value: int = (1 << 64) - 1) -> np.ndarray:
    return np.full(n, value, dtype=np.uint64)


def read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# Ranges (start, length) that are invalid on a RAM of RAM bytes.
BAD_RANGES = [
    pytest.param(RAM, 1, id="start=ram_size"),
    pytest.param(RAM + 1, 0, id="empty-range-past-end"),
    pytest.param(RAM + PS, PS, id="past-end"),
    pytest.param(RAM - PS, PS + 1, id="one-byte-too-long"),
    pytest.param(0, RAM + PS, id="longer-than-ram"),
    pytest.param(PS, -1, id="length=-1"),
    pytest.param(2 * PS, -PS, id="negative-length"),
    pytest.param(-PS, 2 * PS, id="negative-start"),
    pytest.param(PS, (1 << 64) - PS, id="length-wraps-64-bits"),
    pytest.param(0, 1 << 64, id="length=2**64"),
    pytest.param((1 << 64) + PS, PS, id="start-wraps-64-bits"),
    pytest.param(float(PS), PS, id="float-start"),
    pytest.param(0, float(PS), id="float-length"),
    pytest.param("0", PS, id="str-start"),
    pytest.param(0, None, id="None-length"),
]

BAD_CLIENTS = [3, -1, 255, 1.0, "1", None, True]
BAD_MASKS = [8, -1, 255, 1.5, "7", None, True]
BAD_ADDRS = [RAM, RAM + PS, -1, -PS, 1 << 64, (1 << 64) + PS, float(PS), "0", None, True]

RANGE_CLIENT_OPS = ["get_dirty", "all_dirty", "test_and_clear_dirty", "snapshot_and_clear_dirty"]
RANGE_MASK_OPS = ["range_includes_clean", "set_dirty_range"]


def _calls() -> Iterator[Any]:
    """Every bad call as pytest.param(fn(dm)), named op/what."""
    for op in ("set_dirty_flag", "get_dirty_flag"):
        for a in BAD_ADDRS:
            yield pytest.param(lambda d, op=op, a=a: getattr(d, op)(a, MIG), id=f"{op}/addr={a!r}")
        for c in BAD_CLIENTS:
            yield pytest.param(lambda d, op=op, c=c: getattr(d, op)(0, c), id=f"{op}/client={c!r}")
    for op in RANGE_CLIENT_OPS:
        for p in BAD_RANGES:
            s, n = p.values
            yield pytest.param(lambda d, op=op, s=s, n=n: getattr(d, op)(s, n, MIG),
                               id=f"{op}/{p.id}")
        for c in BAD_CLIENTS:
            yield pytest.param(lambda d, op=op, c=c: getattr(d, op)(0, PS, c),
                               id=f"{op}/client={c!r}")
    for op in RANGE_MASK_OPS:
        for p in BAD_RANGES:
            s, n = p.values
            yield pytest.param(lambda d, op=op, s=s, n=n: getattr(d, op)(s, n, 7),
                               id=f"{op}/{p.id}")
        for m in BAD_MASKS:
            yield pytest.param(lambda d, op=op, m=m: getattr(d, op)(0, PS, m),
                               id=f"{op}/mask={m!r}")

    lebitmap: list[tuple[str, Callable[[], Any], Any, Any]] = [
        ("int64-array", lambda: np.ones(1, np.int64), 0, 3),
        ("uint32-array", lambda: np.ones(2, np.uint32), 0, 3),
        ("float-array", lambda: np.ones(1, np.float64), 0, 3),
        ("list", lambda: [1], 0, 3),
        ("str", lambda: "\xff", 0, 3),
        ("2d-array", lambda: u64(1).reshape(1, 1), 0, 3),
        ("short-array", lambda: u64(1), 0, 65),
        ("short-bytes", lambda: b"\xff", 0, 9),
        ("pages-past-end", lambda: u64(4), (PAGES - 10) * PS, 11),
        ("start=ram_size", lambda: u64(1), RAM, 1),
        ("start-past-end-0-pages", lambda: u64(1), RAM + PS, 0),
        ("negative-start", lambda: u64(1), -PS, 1),
        ("start-wraps-64-bits", lambda: u64(1), (1 << 64) + PS, 1),
        ("negative-pages", lambda: u64(1), 0, -1),
        ("float-pages", lambda: u64(1), 0, 1.0),
        ("float-start", lambda: u64(1), 0.0, 1),
    ]
    for what, bitmap, s, n in lebitmap:
        yield pytest.param(lambda d, b=bitmap, s=s, n=n: d.set_dirty_lebitmap(b(), s, n),
                           id=f"set_dirty_lebitmap/{what}")

    pages: list[tuple[str, Callable[[], Any], Any]] = [
        ("page=ram_pages", lambda: np.array([PAGES], np.int64), MIG),
        ("good-pages-then-one-past-end", lambda: np.arange(PAGES + 1, dtype=np.uint32), MIG),
        ("page=-1", lambda: np.array([5, -1], np.int64), MIG),
        ("page=2**40", lambda: np.array([5, 1 << 40], np.int64), MIG),
        ("page=2**64-1", lambda: np.array([5, (1 << 64) - 1], np.uint64), MIG),
        ("float-array", lambda: np.array([1.0, 2.0]), MIG),
        ("bool-array", lambda: np.array([True, False]), MIG),
        ("object-array", lambda: np.array([1, 2], dtype=object), MIG),
        ("list", lambda: [1, 2], MIG),
        ("2d-array", lambda: np.array([[1, 2]], np.int64), MIG),
        ("client=3", lambda: np.array([1], np.int64), 3),
        ("client=-1", lambda: np.array([1], np.int64), -1),
        ("client=None", lambda: np.array([1], np.int64), None),
    ]
    for what, arr, c in pages:
        yield pytest.param(lambda d, a=arr, c=c: d.set_dirty_pages(a(), c),
                           id=f"set_dirty_pages/{what}")

    sizes = [0, -PS, PS + 1, PS // 2, float(PS), str(PS), None, True]
    for size in sizes:
        yield pytest.param(lambda d, z=size: d.ram_block_add(z), id=f"ram_block_add/{size!r}")
        yield pytest.param(lambda d, z=size: d.extend(z), id=f"extend/{size!r}")
    yield pytest.param(lambda d: d.extend(RAM + PS + 1), id="extend/unaligned-larger")
    yield pytest.param(lambda d: d.extend(RAM + 1), id="extend/ram_size+1")
    for off in (PS, RAM, RAM - PS, -1, 1.0, None):
        yield pytest.param(lambda d, o=off: d.ram_block_remove(o), id=f"ram_block_remove/{off!r}")


@pytest.mark.parametrize("call", list(_calls()))
def test_bad_input_raises_and_changes_nothing(dm: Any, call: Callable[[Any], Any]) -> None:
    before = full_state(dm)
    assert before == expected_pattern()
    with pytest.raises(sd.ShmDirtyError) as info:
        call(dm)
    assert isinstance(info.value, ValueError), f"{info.value!r} is not a ValueError"
    assert str(info.value), "the error says nothing"
    assert full_state(dm) == before
    dm.rcu.synchronize(timeout=10)      # no read-side section left open by the failure


SYNC_DESTS: list[Any] = [
    pytest.param(lambda: np.zeros(PAGES // 64, np.int64), 0, PS, id="int64-dest"),
    pytest.param(lambda: np.zeros(2 * PAGES // 64, np.uint32), 0, PS, id="uint32-dest"),
    pytest.param(lambda: np.zeros(PAGES // 64, np.float64), 0, PS, id="float-dest"),
    pytest.param(lambda: np.zeros((PAGES // 64, 1), np.uint64), 0, PS, id="2d-dest"),
    pytest.param(lambda: read_only(np.zeros(PAGES // 64, np.uint64)), 0, PS, id="read-only-dest"),
    pytest.param(lambda: np.zeros(1, np.uint64), 0, 65 * PS, id="dest-one-page-short"),
    pytest.param(lambda: np.zeros(2, np.uint64), 100 * PS, 28 * PS + 1, id="dest-one-byte-short"),
    pytest.param(lambda: np.zeros(0, np.uint64), 0, PS, id="empty-dest"),
] + [
    pytest.param(lambda: np.zeros(PAGES // 64, np.uint64), *p.values, id=f"dest-ok/{p.id}")
    for p in BAD_RANGES
]


@pytest.mark.parametrize(("make_dest", "start", "length"), SYNC_DESTS)
def test_bad_sync_raises_and_changes_nothing(
    dm: Any, make_dest: Callable[[], Any], start: Any, length: Any
) -> None:
    dest = make_dest()
    dest_before = np.array(dest, copy=True)
    before = full_state(dm)
    with pytest.raises(sd.ShmDirtyError) as info:
        dm.sync_dirty_bitmap(dest, start, length)
    assert isinstance(info.value, ValueError)
    assert full_state(dm) == before
    assert np.array_equal(np.asarray(dest), dest_before), "a rejected sync wrote into dest"
    dm.rcu.synchronize(timeout=10)


def test_bad_sync_list_dest(dm: Any) -> None:
    dest = [0, 0, 0]
    before = full_state(dm)
    with pytest.raises(sd.ShmDirtyError) as info:
        dm.sync_dirty_bitmap(dest, 0, PS)
    assert isinstance(info.value, ValueError)
    assert full_state(dm) == before and dest == [0, 0, 0]


@pytest.mark.parametrize(
    ("start", "length"),
    [
        pytest.param(63 * PS - 1, 1, id="one-byte-before"),
        pytest.param(66 * PS, 1, id="one-byte-after"),
        pytest.param(64 * PS, 2 * PS + 1, id="one-byte-too-long"),
        pytest.param(64 * PS, -1, id="negative-length"),
        pytest.param(66 * PS + 1, 0, id="empty-past-window"),
        pytest.param(float(64 * PS), PS, id="float-start"),
    ],
)
def test_bad_snapshot_query(dm: Any, start: Any, length: Any) -> None:
    # pages 63..65: CODE is clean on 60..69, so dirty it again on page 64 first
    dm.set_dirty_flag(64 * PS, CODE)
    snap = dm.snapshot_and_clear_dirty(63 * PS + 5, 3 * PS - 10, CODE)   # window: pages 63..65
    before = full_state(dm)
    with pytest.raises(sd.ShmDirtyError) as info:
        snap.get_dirty(start, length)
    assert isinstance(info.value, ValueError)
    assert full_state(dm) == before
    assert snap.get_dirty(63 * PS, 3 * PS) is True          # the snapshot still answers
    assert snap.get_dirty(65 * PS, PS) is False


@pytest.mark.parametrize(
    "ram_size", [PS + 1, -PS, PS // 2, float(PS), "4096"], ids=repr
)
def test_bad_create_leaves_nothing(map_name: str, ram_size: Any) -> None:
    with pytest.raises(sd.ShmDirtyError) as info:
        sd.DirtyMemory.create(ram_size, page_bits=12, block_pages=BP, name=map_name)
    assert isinstance(info.value, ValueError)
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"shmdirty-{map_name}-")]
    assert not left, f"a failed create left {left}"


# -- the controls: the fixture is what we think, and the valid neighbours pass -------------
def test_fixture_pattern_and_snapshot_see_a_change(dm: Any) -> None:
    assert full_state(dm) == expected_pattern()
    dm.set_dirty_flag(65 * PS, CODE)
    assert full_state(dm) != expected_pattern()


def test_boundary_inputs_are_accepted(dm: Any) -> None:
    """The valid side of each bad case above: none of these may raise."""
    assert dm.get_dirty_flag(RAM - 1, MIG) is False
    assert dm.get_dirty_flag(np.int64(RAM - PS), np.uint8(CODE)) is True
    assert dm.get_dirty(RAM, 0, 2) is False
    assert dm.all_dirty(RAM, 0, 2) is True
    assert dm.get_dirty(RAM - PS, PS, MIG) is False
    assert dm.range_includes_clean(0, RAM, 7) == 7
    assert dm.range_includes_clean(10 * PS, 50 * PS, 7) == 0
    assert dm.test_and_clear_dirty(RAM - 1, 1, VGA) is True
    dm.set_dirty_range(0, RAM, 0)
    dm.set_dirty_lebitmap(b"\x01", RAM - PS, 1)            # 1 byte for 1 page is enough
    dm.set_dirty_lebitmap(u64(1), RAM, 0)
    dest = np.zeros(2, np.uint64)
    # MIGRATION is clean from page 120 on: pages 100..119 are taken
    assert dm.sync_dirty_bitmap(dest, 100 * PS, 28 * PS) == 20
    assert dest.tolist() == [0, ((1 << 20) - 1) << 36]
    dm.set_dirty_pages(np.array([PAGES - 1], np.uint16), VGA)
    dm.set_dirty_pages(np.array([], np.int64), VGA)
    snap = dm.snapshot_and_clear_dirty(RAM, 0, VGA)
    assert snap.get_dirty(RAM, 0) is False
    assert dm.get_dirty_flag(RAM - 1, VGA) is True
    assert dm.get_dirty_flag(RAM - 1, MIG) is True           # from the lebitmap
    off = dm.ram_block_add(PS)
    assert off == RAM and dm.ram_size == RAM + PS
    dm.ram_block_remove(off)
    assert dm.ram_size == RAM
    dm.extend(PS)                                            # smaller: a no-op
    assert dm.ram_size == RAM


@pytest.mark.timeout(60)
def test_closed_handle_refuses_coordinator_calls(map_name: str) -> None:
    """A closed handle's coordinator methods fail with a ShmDirtyError before
    touching the header (which may be unmapped), and change nothing."""
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        other = sd.DirtyMemory.attach(map_name)
        other.close()
        for call in (lambda: other.extend(128 * 4096),
                     lambda: other.request_extend(128 * 4096, timeout=1),
                     lambda: other.ram_block_add(4096),
                     lambda: other.ram_block_remove(0),
                     lambda: other.serve_once(),
                     lambda: other.destroy()):
            with pytest.raises(sd.ShmDirtyError):
                call()
        assert dm.ram_size == 64 * 4096 and dm.ram_blocks() == [(0, 64 * 4096)]
    finally:
        dm.destroy()
