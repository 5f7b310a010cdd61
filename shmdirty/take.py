"""The take: read and clear a range's dirty bits for one client
(``test_and_clear_dirty``, ``sync_dirty_bitmap``,
``snapshot_and_clear_dirty``), word by word or by swapping whole blocks.

Every handle has one take object, chosen once by the coordinator's module
(``Coordinator.taker``) when the handle is made, created or adopted: a
plain ``Take`` for a handle that does not coordinate, a ``SwapTake`` for
the one create() or adopt() returned.  The accessors call it without
asking which role their handle plays.

- Word by word (``Take``): every dirty word of the range is taken with an
  atomic exchange / fetch_and, as the seed's ``bitmap_test_and_clear_atomic``.
- Whole-block swap (``SwapTake``): blocks the range covers whole, holding
  enough dirty words to pay for it, are replaced by zeroed blocks in a new
  table; after one grace period no writer can reach the old block, which
  is then read with plain numpy and zeroed for reuse: no atomics at all.
  The wait is bounded (below); the retired blocks are retired.py's.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from . import bitmap
from .bitmap import Block
from .errors import GraceTimeout, ShmFull
from .rcu import Rcu
from .retired import Retired, RetiredBlock
from .view import TableView

Words = np.ndarray[Any, np.dtype[np.uint64]]
#: ``merge(first global word, words)``: where a take hands each piece it took.
Merge = Callable[[int, Words], None]
#: ``check(end page)``: called inside the take's section before anything is taken.
Check = Callable[[int], None]

SWAP_MIN_WORDS = 512        # ~0.2 ms of per-word atomics: about what a swap costs
SWAP_GRACE_BUDGET = 0.02    # longest a swap waits for its grace period (s): a few
                            # scheduler slices, so a reader that was only preempted
                            # inside a section still lets the swap end cleanly
NEVER = sys.maxsize         # ``swap_pages`` of a take that never swaps


class Shared(Protocol):
    """The coordinator's state of the map in this process (coordinator.Shared)."""

    @property
    def lock(self) -> threading.RLock: ...

    @property
    def retired(self) -> Retired: ...


class Publisher(Protocol):
    """What a swap needs of the coordinator: publish a table with some
    blocks swapped for zeroed ones (coordinator.Coordinator.publish)."""

    def publish(self, ram_blocks: list[tuple[int, int]],
                dirty: tuple[int, int] | None = None,
                swap: list[tuple[int, int]] | tuple[()] = ()) -> list[int]: ...


class Take:
    """The take of a handle that does not coordinate: every bit word by word."""

    # A range covering at least this many pages may hold a whole block this
    # take swaps; below it (always, here) one walk takes every word.
    swap_pages = NEVER

    def __init__(self, view: TableView, rcu: Rcu, shared: Shared) -> None:
        self.view = view
        self.rcu = rcu
        self.shared = shared   # read at each use: a forked child gets new state

    def test_and_clear(self, client: int, start: Any, length: Any) -> bool:
        """test_and_clear_dirty for a range that covers ``swap_pages`` or
        more (smaller ones the accessor takes itself, in one walk)."""
        dirty = False

        def merge(g0: int, taken: Words) -> None:
            nonlocal dirty
            dirty = dirty or bool(taken.any())
        self.run(client, start, length, merge)
        return dirty

    def run(self, client: int, start: Any, length: Any, merge: Merge,
            check: Check | None = None, holes: bool = False) -> None:
        """Take (read and clear) the bits of a range for ``client``, handing
        each piece to ``merge(first global word, words)``.

        Blocks the range covers only in part lose their bits word by word
        (an atomic exchange / fetch_and per dirty word).  Blocks it covers
        whole are swapped when ``choose`` picks them (swap_out).  With
        ``holes`` the range may cross removed RAM blocks: only the RAM pages
        in it are taken (sync_dirty_bitmap); else a hole is BadInput."""
        v = self.view
        bp, bw = v.block_pages, v.block_pages >> 6
        swap: list[int] = []
        # Late bits of retired blocks first (only the coordinator's process has any).
        self.shared.retired.give_back_due(v, self.rcu)
        t, page, end = v.enter_range(start, length, holes)
        try:
            if check is not None:
                check(end)
            pieces = [p for p0, p1 in t.ram_runs(page, end, v.page_bits)
                      for p in v.walk(p0, p1)]
            whole = [idx for idx, _, num in pieces if num == bp]
            if whole:
                swap = self.choose(client, whole)
            for idx, off, num in pieces:
                if num == bp and swap:
                    continue
                w0, taken = bitmap.take(v.block(client, idx), off, num)
                merge(idx * bw + w0, taken)
        finally:
            v.end_section()
        if swap:
            try:
                out = self.swap_out(client, swap)
            except ShmFull:
                # No room for the zeroed blocks (nothing was published):
                # these blocks are taken word by word, like any other.
                self.take_words(client, swap, merge)
                return
            for idx, (words, block) in zip(swap, out, strict=True):
                merge(idx * bw, words)
                if block is not None:   # its grace period ended: zeroed and pooled
                    self.shared.retired.recycle(block)

    def take_words(self, client: int, idxs: list[int], merge: Merge) -> None:
        """Take ``client``'s whole blocks ``idxs`` word by word, in a section."""
        v = self.view
        bw = v.block_pages >> 6
        v.begin_section()
        try:
            for idx in idxs:
                w0, taken = bitmap.take(v.block(client, idx), 0, v.block_pages)
                merge(idx * bw + w0, taken)
        finally:
            v.end_section()

    def choose(self, client: int, whole: list[int]) -> list[int]:
        """Which of ``client``'s whole blocks ``whole`` to swap out: none."""
        return []

    def swap_out(self, client: int, idxs: list[int]) -> list[tuple[Words, Block | None]]:
        raise AssertionError("a Take that never chooses a block never swaps one")


class SwapTake(Take):
    """The coordinator's take: whole blocks are swapped out, bounded.

    Invariant (the bounded swap): a swap waits for its grace period at most
    ``view.swap_grace_budget`` seconds, so no reader can stall a take.  Past
    the budget the take clears the retired blocks word by word (atomic
    exchanges, as for a partial block) and leaves them in
    ``shared.retired``; once their grace period has ended, whatever a late
    writer put there meanwhile goes back into the live block at the same
    position (``Retired.give_back_due``, run at once by the give-back
    thread, ``Retired.watch``), so no bit is lost or stays hidden.  While a block
    is retired no new swap is made (``choose``): at most one take's worth of
    blocks waits."""

    def __init__(self, view: TableView, rcu: Rcu, shared: Shared, coordinator: Publisher) -> None:
        super().__init__(view, rcu, shared)
        self.coordinator = coordinator
        # Ranges this long may cover a block whole: they go through run().
        self.swap_pages = view.block_pages

    def choose(self, client: int, whole: list[int]) -> list[int]:
        """All of ``whole`` when the take is outside any other section, no
        block is retired, and they hold at least ``view.swap_min_words``
        dirty words; else none (inside the take's section)."""
        if self.rcu.nesting != 1 or self.shared.retired:
            return []
        v = self.view
        dirty_words = sum(int(np.count_nonzero(v.block(client, i).words)) for i in whole)
        return whole if dirty_words >= v.swap_min_words else []

    def swap_out(self, client: int, idxs: list[int]) -> list[tuple[Words, Block | None]]:
        """Put zeroed blocks in place of ``client``'s blocks ``idxs``; return,
        for each, the bits taken from the old block, and the block itself
        when its grace period has ended (nobody can reach it: the words are
        its plain contents; the caller merges them, then recycles it).  The
        wait is bounded by the handle's ``swap_grace_budget``: past it,
        writers may still set bits in the old block, so they are taken with
        atomics here and the block stays retired until give_back_due()
        returns what lands there later."""
        v, retired = self.view, self.shared.retired
        retired.give_back_due(v, self.rcu)
        with self.shared.lock:
            t = v.refresh()
            old = self.coordinator.publish(list(t.ram_blocks),
                                           swap=[(client, i) for i in idxs])
            # A token taken now (after the publication) ends once every
            # section that could have found the old blocks has ended.
            token = self.rcu.gp.start_poll()
        blocks = [v.map_block(b) for b in old]
        pending = [RetiredBlock(client, i, b, token) for i, b in zip(idxs, old, strict=True)]
        try:
            # The wait: the readers' bit sets happen before our plain reads
            # (the waiter's seq_cst slot loads pair with their release unlocks).
            self.rcu.synchronize(timeout=v.swap_grace_budget)
        except BaseException as e:
            late = isinstance(e, GraceTimeout)
            # Taken before they are listed: no other thread gives them back
            # (and pools them) under our feet.  An interrupted wait takes
            # nothing: every bit goes back.
            taken = [bitmap.take(b, 0, v.block_pages)[1] for b in blocks] if late else []
            # Given back as soon as their grace period ends (retired.py).
            retired.retire(pending, v, self.rcu)
            if not late:
                raise
            return [(w, None) for w in taken]
        return [(b.words, b) for b in blocks]
