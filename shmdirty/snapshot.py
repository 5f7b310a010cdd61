"""DirtySnapshot: dirty bits taken by snapshot_and_clear_dirty(), queried
later (current QEMU's display path).  Plain process-local memory."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import bitmap
from .bitmap import Block
from .clients import as_index
from .errors import BadInput


class DirtySnapshot:
    """Dirty bits taken by snapshot_and_clear_dirty(), queried later
    (current QEMU's display path).  Plain process-local memory."""

    def __init__(self, page_bits: int, page: int, end: int,
                 words: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
        self.page_bits = page_bits
        self.start = page << page_bits
        self.end = end << page_bits
        self._page = page
        self._words = words  # global word (page >> 6) .. of the range

    def get_dirty(self, start: int, length: int) -> bool:
        """Was any page of [start, start+length) dirty in the snapshot?"""
        start, length = as_index(start, "start"), as_index(length, "length")
        if length < 0 or start < self.start or start + length > self.end:
            raise BadInput(f"range [{start:#x}, +{length:#x}) is outside the snapshot "
                           f"[{self.start:#x}, {self.end:#x})")
        if length == 0:
            return False
        page = start >> self.page_bits
        end = -(-(start + length) >> self.page_bits)
        first = page - (self._page & ~63)
        return bitmap.any_set(Block(-1, self._words, None), first, end - page)


class Taking:
    """A snapshot being taken by snapshot_and_clear_dirty(): ``check`` and
    ``merge`` are what the take (take.py ``Take.run``) calls, inside its
    section, for the window and for each piece it took."""

    def __init__(self, page_bits: int, start: Any, length: Any) -> None:
        self.page_bits = page_bits
        self.start = start
        self.length = length
        self.snap: DirtySnapshot | None = None

    def check(self, end: int) -> None:
        # The window is the range's pages, ceil((start+length)/page) even
        # for length 0 (which takes nothing).
        first = as_index(self.start, "start")
        page = first >> self.page_bits
        end = max(end, -(-(first + as_index(self.length, "length")) >> self.page_bits))
        words = np.zeros(((max(end, page + 1) - 1) >> 6) - (page >> 6) + 1, dtype=np.uint64)
        self.snap = DirtySnapshot(self.page_bits, page, end, words)

    def merge(self, g0: int, taken: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
        snap = self.snap
        assert snap is not None   # check() runs first, inside the take's section
        g0 -= snap._page >> 6
        snap._words[g0:g0 + len(taken)] |= taken
