"""The migrator's own bitmap: QEMU's ``RAMBlock.bmap`` for the whole RAM.

One bit per guest page (uint64 words indexed by global page, as
``sync_dirty_bitmap`` wants), process-local.  It starts all ones (the bulk
stage: every page is sent once) and grows with RAM; new pages start dirty,
like ``migration_bitmap_extend``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
