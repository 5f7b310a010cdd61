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
- No bit stays hidden (issue 17): while a block waits, this process runs
  a give-back thread (``watch``) that polls the grace period and gives
  back as soon as it ends, without waiting for another take.  The grace
  period ends when the last writer that could reach the retired block
  leaves its section, so a bit it wrote there is in the live block, seen
  by every accessor of every process, at most ``GIVE_BACK_POLL_MAX`` plus
  the give-back itself after the writer left (docs/ARCHITECTURE.md, "Late
  bits", has the measured bound).  Nothing is added to the accessors.
- A pooled block is all zeroes and in no table: the coordinator may place
  it anywhere as a fresh block.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from . import atomic, bitmap, layout
from .bitmap import Block
from .clients import DIRTY_MEMORY_NUM
from .errors import CorruptSegment, GraceTimeout, ShmDirtyError
from .rcu import Rcu
from .view import TableView

GIVE_BACK_POLL_MIN = 2e-4   # the give-back thread polls a grace period this often (s) ...
GIVE_BACK_POLL_MAX = 2e-3   # ... backing off to this while a reader stays inside (s):
                            # the bound on how long a late bit stays hidden after its
                            # writer left, give or take a scheduler slice
LIVENESS_POLLS = 64         # every this many polls it also checks the blockers' owners


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
        # The give-back thread (``watch``) and what stops it; it runs only
        # while blocks wait, with the view of the handle whose swap retired them.
        self._helper: threading.Thread | None = None
        self._helper_view: TableView | None = None
        self._stop = threading.Event()

    def __bool__(self) -> bool:
        """True while some block waits for its grace period."""
        return bool(self.waiting)

    def recycle(self, block: Block) -> None:
        """Zero ``block`` (nobody can reach it any more) and pool it."""
        block.words[:] = 0  # nobody can reach it: plain stores
        self.pool.append(block.block_id)

    def retire(self, entries: list[RetiredBlock], view: TableView | None = None,
               rcu: Rcu | None = None) -> None:
        """List blocks a swap could not read in its grace budget; with
        ``view`` and ``rcu``, give them back as soon as their grace period
        ends (``watch``)."""
        with self.lock:
            self.waiting.extend(entries)
        if view is not None and rcu is not None:
            self.watch(view, rcu)

    def clear(self) -> None:
        """destroy(): the segments are gone; nothing to give back."""
        self.stop()
        self.waiting.clear()

    # --- the give-back thread ------------------------------------------------------------
    def watch(self, view: TableView, rcu: Rcu) -> None:
        """Start the give-back thread, unless it runs: it polls the grace
        period of the waiting blocks and gives them back once it has ended
        (a reader of its own: it claims a slot for the give-back's section
        and frees it when it ends, once nothing waits)."""
        with self.lock:
            if self._helper is not None and self._helper.is_alive():
                return
            self._stop = threading.Event()
            self._helper_view = view
            self._helper = threading.Thread(target=self._give_back_soon,
                                            args=(view, rcu, self._stop),
                                            name=f"shmdirty-give-back-{view.name}", daemon=True)
            self._helper.start()

    def stop(self, view: TableView | None = None) -> None:
        """Stop the give-back thread (only if it works for ``view``, when
        given) and wait for it: a handle closes, the map is destroyed.
        What still waits is given back by the next take or by resign()."""
        with self.lock:
            t = self._helper
            if t is None or (view is not None and self._helper_view is not view):
                return
            self._stop.set()
            self._helper = self._helper_view = None
        if t is not threading.current_thread():
            t.join()

    def _give_back_soon(self, view: TableView, rcu: Rcu, stop: threading.Event) -> None:
        polls, pause = 0, GIVE_BACK_POLL_MIN
        try:
            while not stop.is_set():
                with self.lock:
                    if not self.waiting:
                        return
                    token = min(e.token for e in self.waiting)
                polls += 1
                # The slots every poll (loads only); the blockers' owners (a
                # /proc read each) now and then, so a dead reader is reclaimed.
                if rcu.gp.poll(token, check_owners=polls % LIVENESS_POLLS == 0):
                    self.give_back_due(view, rcu)
                    polls, pause = 0, GIVE_BACK_POLL_MIN
                    continue
                stop.wait(pause)
                pause = min(pause * 2, GIVE_BACK_POLL_MAX)
        except ShmDirtyError:
            pass  # closed, destroyed, no reader slot: the next take or resign gives back
        finally:
            try:
                rcu.unregister()   # this thread's slot, if it claimed one, is free now
            except ShmDirtyError:
                pass

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
