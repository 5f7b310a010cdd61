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
