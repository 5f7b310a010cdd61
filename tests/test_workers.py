"""workers/: the pieces a migration is made of, in one process.

The end-to-end run (spawned workers, hot-add, stop-and-copy) is in
test_cli.py; here each piece is checked against what it must do: the page
patterns, the stamps, both ways of marking pages dirty (they must mark the
same bits, across bitmap-block and RAM-block edges), the migration bitmap,
and the byte-for-byte comparison.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import shmdirty as sd
from shmdirty import segment
from shmdirty.workers.guest import TAG_BOOT, TAG_VCPU, GuestRam, compare
from shmdirty.workers.migrator import MigrationBitmap
from shmdirty.workers.vcpu import PagePicker, VcpuConfig, mark_flag, mark_lebitmap, write_pages

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
BLOCK_PAGES = 64          # small bitmap blocks: RAM blocks straddle them


@pytest.fixture
def guest(map_name: str) -> Iterator[tuple[sd.DirtyMemory, GuestRam]]:
    """A map with two RAM blocks (100 and 60 pages, the second one hot-added
    as the hot-plug worker does it) and their segments, all pages clean."""
    dm = sd.DirtyMemory.create(100 * PAGE, block_pages=BLOCK_PAGES, name=map_name)
    ram = GuestRam(map_name, dm.page_bits)
    try:
        ram.update(dm.ram_blocks(), create=True, boot_fill=True)
        # As the hot-plug worker: the creator holds the memfd until another
        # mapping of it exists (here this process's second one).
        seg = ram.create_segment(1, 100 * PAGE, 60 * PAGE, boot_fill=True)
        dm.extend(160 * PAGE)
        ram.update(dm.ram_blocks())
        seg.close()
        for c in range(sd.DIRTY_MEMORY_NUM):
            dm.test_and_clear_dirty(0, 160 * PAGE, c)
        yield dm, ram
    finally:
        ram.close()
        dm.destroy()
    assert segment.list_segments(map_name) == []


def _dirty(dm: sd.DirtyMemory, client: int) -> list[int]:
    return [p for p in range(dm.ram_size // PAGE) if dm.get_dirty_flag(p * PAGE, client)]


@pytest.mark.parametrize("pattern", ["uniform", "hot", "sequential"])
def test_page_picker_is_reproducible_and_in_range(pattern: str) -> None:
    cfg = VcpuConfig(index=1, vcpus=2, rate=100, pattern=pattern, seed=7, hot_fraction=0.1)
    a = PagePicker(cfg).pick(1000, 500)
    b = PagePicker(cfg).pick(1000, 500)
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() < 1000
    other = PagePicker(VcpuConfig(index=0, vcpus=2, rate=100, pattern=pattern, seed=7)).pick(
        1000, 500)
    assert not np.array_equal(a, other)  # each vCPU has its own stream / region


def test_page_picker_patterns_have_their_shape() -> None:
    hot = PagePicker(VcpuConfig(index=1, vcpus=2, rate=1, pattern="hot", seed=1,
                                hot_fraction=0.1)).pick(1000, 5000)
    in_hot_set = np.count_nonzero((hot >= 500) & (hot < 600))  # vCPU 1 of 2: home 500
    assert in_hot_set > 0.85 * len(hot)
    seq = PagePicker(VcpuConfig(index=1, vcpus=2, rate=1, pattern="sequential"))
    first, second = seq.pick(1000, 600), seq.pick(1000, 10)
    assert first.tolist() == [(500 + i) % 1000 for i in range(600)]
    assert second.tolist() == list(range(100, 110))  # the cursor wraps and goes on
    uni = PagePicker(VcpuConfig(index=0, vcpus=1, rate=1, pattern="uniform")).pick(1000, 5000)
    assert len(np.unique(uni)) > 900


@pytest.mark.parametrize("mode", ["flag", "lebitmap"])
def test_vcpu_writes_the_bytes_and_marks_exactly_those_pages(
        guest: tuple[sd.DirtyMemory, GuestRam], mode: str) -> None:
    dm, ram = guest
    # Both RAM blocks, both edges of bitmap blocks (63/64, 127/128) and the
    # RAM block edge (99/100), the last page, and a page twice.
    pages = np.array([0, 63, 64, 99, 100, 127, 128, 159, 64], dtype=np.int64)
    write_pages(ram, pages, vcpu=3, seq0=40)
    if mode == "flag":
        mark_flag(dm, pages)
    else:
        mark_lebitmap(dm, ram, pages)
    want = sorted(set(pages.tolist()))
    assert _dirty(dm, sd.DIRTY_MEMORY_MIGRATION) == want
    assert _dirty(dm, sd.DIRTY_MEMORY_VGA) == want
    assert _dirty(dm, sd.DIRTY_MEMORY_CODE) == []  # not a tcg map
    for i, p in enumerate(pages.tolist()):
        b = 0 if p < 100 else 1
        row = ram.views[b][p - (0 if b == 0 else 100)]
        assert int(row[0]) == TAG_VCPU | 3 and int(row[1]) == p
        if p != 64:
            assert int(row[2]) == 40 + i
    assert int(ram.views[0][64][2]) == 48  # the later write of the page won
    assert int(ram.views[0][1][0]) == TAG_BOOT and int(ram.views[0][1][1]) == 1


def test_migration_bitmap_grows_dirty_like_migration_bitmap_extend() -> None:
    bm = MigrationBitmap()
    assert bm.extend(70) == 70
    assert bm.dirty().tolist() == list(range(70))
    bm.clear()
    bm.words[0] |= np.uint64(1 << 5)
    assert bm.extend(130) == 60
    assert bm.extend(100) == 0
    assert bm.dirty().tolist() == [5] + list(range(70, 130))
    assert bm.count() == 61


def test_migrator_sync_then_copy_and_compare(guest: tuple[sd.DirtyMemory, GuestRam],
                                             map_name: str) -> None:
    dm, ram = guest
    dst = GuestRam(map_name, dm.page_bits, "dst")
    try:
        dst.update(dm.ram_blocks(), create=True)
        compared, differ, written = compare(ram, dst)
        assert compared == 160 and differ == list(range(160)) and written == 0
        bm = MigrationBitmap()
        bm.extend(160)
        bm.clear()
        pages = np.array([3, 99, 100, 150], dtype=np.int64)
        write_pages(ram, pages, vcpu=0, seq0=0)
        mark_lebitmap(dm, ram, pages)
        assert dm.sync_dirty_bitmap(bm.words, 0, dm.ram_size) == 4
        assert bm.dirty().tolist() == [3, 99, 100, 150]
        assert _dirty(dm, sd.DIRTY_MEMORY_MIGRATION) == []  # taken
        for b, local, _ in ram.split(bm.dirty()):
            dst.views[b][local] = ram.views[b][local]
        compared, differ, written = compare(ram, dst)
        assert differ == [p for p in range(160) if p not in (3, 99, 100, 150)]
        assert written == 4
        # one byte in the middle of a page is enough to differ
        dst.views[1][50][100] ^= np.uint64(1 << 9)
        assert 150 in compare(ram, dst)[1]
    finally:
        dst.close()
