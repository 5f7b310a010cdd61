"""Retired blocks: the blocks a whole-block swap took out of a table, until
their grace period has ended; the pool of zeroed blocks for reuse; and the
give-back of bits that landed in a retired block after the take.

One ``Retired`` per map per process (the coordinator's state in handles.py's
MapState, ``coordinator.Shared``), shared by every handle of the map in the
process and guarded by the coordinator lock.  take.py retires blocks and
pools them; the coordinator hands pooled ids out again (``publish``) and,
after adopting a map, gives back what a dead coordinator left retired
(``give_back``).

Invariants, kept here:

- A retired block is read with plain loads and zeroed only after a grace
  period that began after the table without it was published: until then a
  writer still inside a section on the old table may set bits in it.
- No bit is lost: a bit set in a retired block after its take goes back
  into the live block at the same (client, index) once the grace period
  has ended (``give_back_due``), before the block is pooled.
- A pooled block is all zeroes and in no table: the coordinator may place
  it anywhere as a fresh block.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from . import atomic, bitmap, layout
from .bitmap import Block
from .clients import DIRTY_MEMORY_NUM
from .errors import CorruptSegment, GraceTimeout
from .rcu import Rcu
from .view import TableView


class RetiredBlock(NamedTuple):
    """A block a swap took out of the table and nobody has emptied yet."""

    client: int
    position: int   # its index in the client's table, where its bits go back
    block_id: int
    token: int      # the grace period (rcu ``start_poll`` token) that frees it


class Retired:
    """This process's retired and pooled blocks of one map."""

    def __init__(self, lock: threading.RLock) -> None:
        # The coordinator lock (coordinator.Shared.lock): threads of this
        # process take, publish and give back one at a time.
        self.lock = lock
        # Invariant: every id here names a sealed, all-zero block that no
        # table of this map lists; ``publish`` pops them before it makes new
        # segments.
        self.pool: list[int] = []
        # Invariant: at most one take's worth of blocks (take.py never swaps
        # while this is not empty); each stays here until its token's grace
        # period has ended and its bits went back into the live block.
        self.waiting: list[RetiredBlock] = []

    def __bool__(self) -> bool:
        """True while some block waits for its grace period."""
        return bool(self.waiting)

    def recycle(self, block: Block) -> None:
        """Zero ``block`` (nobody can reach it any more) and pool it."""
        block.words[:] = 0  # nobody can reach it: plain stores
        self.pool.append(block.block_id)

    def retire(self, entries: list[RetiredBlock]) -> None:
        """List blocks a swap could not read in its grace budget."""
        with self.lock:
            self.waiting.extend(entries)

    def clear(self) -> None:
        """destroy(): the segments are gone; nothing to give back."""
        self.waiting.clear()

    def give_back_due(self, view: TableView, rcu: Rcu, timeout: float = 0.0) -> None:
        """OR the bits of retired blocks whose grace period has ended back
        into the live blocks at their positions, and pool them.  Waits for
        those grace periods up to ``timeout`` seconds (0: only polls)."""
        waiting = self.waiting
        if not waiting:
            return
        gp = rcu.gp
        if timeout:
            try:
                with rcu.offline():
                    gp.wait(max(e.token for e in waiting), timeout)
            except GraceTimeout:
                pass
        bw = view.block_pages >> 6
        with self.lock:  # threads of this process take at once: one gives back
            due = [e for e in waiting if gp.poll(e.token)]
            if not due:
                return
            t = view.begin_section()
            try:
                for e in due:
                    old = view.map_block(e.block_id)
                    if e.position < t.num_blocks and old.words.any():
                        bitmap.or_words(view.block(e.client, e.position), 0,
                                        old.words[:bw].copy())
                    waiting.remove(e)
                    self.recycle(old)
            finally:
                view.end_section()


def give_back(view: TableView, block_ids: list[int], published: int) -> None:
    """After a grace period: OR the bits of blocks no table references
    (retired by a take whose coordinator died before reading them) back
    into the live block at the position they were taken from.  A block
    whose position is at or past ``published`` (the number of blocks when
    this process adopted) was made by a growth that never got published:
    its bits (new RAM marked dirty early) belong to nobody."""
    view.begin_section()
    try:
        for bid in block_ids:
            try:
                old = view.map_block(bid)
            except CorruptSegment:
                continue  # never sealed: created by a growth that died
            w = view.block_segment(bid).words
            # relaxed: written before the table that placed the block
            # was published, by a coordinator that is dead now.
            c = w.load(layout.P_ARG0, atomic.RELAXED)
            idx = w.load(layout.P_ARG2, atomic.RELAXED)
            if c < DIRTY_MEMORY_NUM and idx < published and old.words.any():
                bitmap.or_words(view.block(c, idx), 0, old.words.copy())
    finally:
        view.end_section()
    view.unmap_blocks(block_ids)
