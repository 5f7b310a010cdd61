"""DirtySnapshot (shmdirty/snapshot.py): the bits snapshot_and_clear_dirty
took, queried later from process-local memory, over exactly its window."""

from __future__ import annotations

import numpy as np
import pytest

import shmdirty as sd
from shmdirty.snapshot import DirtySnapshot

PB = 12
PS = 1 << PB


def test_get_dirty_over_the_window() -> None:
    # Pages [70, 200): words (page >> 6) 1 .. 3; pages 100 and 130 dirty.
    words = np.zeros(3, np.uint64)
    for p in (100, 130):
        words[(p >> 6) - 1] |= np.uint64(1) << np.uint64(p & 63)
    s = DirtySnapshot(PB, 70, 200, words)
    assert (s.start, s.end) == (70 * PS, 200 * PS)
    assert s.get_dirty(100 * PS, 1)
    assert s.get_dirty(70 * PS, 130 * PS)
    assert not s.get_dirty(101 * PS, 29 * PS)
    assert s.get_dirty(101 * PS, 29 * PS + 1)            # reaches into page 130
    assert not s.get_dirty(100 * PS, 0)                  # length 0: False
    for start, length in ((69 * PS, PS), (199 * PS, 2 * PS), (100 * PS, -1)):
        with pytest.raises(sd.BadInput, match="outside the snapshot"):
            s.get_dirty(start, length)


def test_snapshot_and_clear_dirty_takes_into_a_snapshot(map_name: str) -> None:
    with sd.DirtyMemory.create(256 * PS, block_pages=64, name=map_name) as dm:
        dm.test_and_clear_dirty(0, 256 * PS, sd.DIRTY_MEMORY_VGA)
        for p in (3, 64, 200):
            dm.set_dirty_flag(p * PS, sd.DIRTY_MEMORY_VGA)
        s = dm.snapshot_and_clear_dirty(2 * PS, 250 * PS, sd.DIRTY_MEMORY_VGA)
        assert not dm.get_dirty(0, 256 * PS, sd.DIRTY_MEMORY_VGA)   # taken
        dm.set_dirty_flag(3 * PS, sd.DIRTY_MEMORY_VGA)              # later: not in it
        assert [s.get_dirty(p * PS, PS) for p in (3, 4, 64, 200, 201)] == [
            True, False, True, True, False]
        assert (s.start, s.end) == (2 * PS, 252 * PS)
