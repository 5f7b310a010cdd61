"""What only the coordinator does: create a map, publish tables, grow RAM,
serve hot-plug requests, choose each handle's take, adopt, reap and resign.

Every header word but the grace-period counter and the reader slots (rcu.py)
is written here, and only here (docs/ARCHITECTURE.md lists them).

Invariants, kept here:

- Only the coordinator writes tables.  It builds the next one aside
  (reusing every existing block, adding zeroed blocks), publishes it by
  storing the generation, and unlinks the old table only after a grace
  period (``call_rcu``).  Blocks are never moved, and growth never frees one.
- New RAM is dirty for every client: marked before its table is published
  (so it is dirty even if the coordinator dies right after), and again
  after (a sync of the old range may have taken the bits set before).
- Which take a handle runs is decided here, once, when it is made,
  created or adopted (``taker``): the whole-block swap (take.py, bounded:
  its invariant is written there) for the handles create() and adopt()
  returned, word by word for every other one.  Accessors never ask.
  Retired and pooled blocks are retired.py's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import atomic, bitmap, layout, segment
from .bitmap import Block
from .clients import DIRTY_MEMORY_NUM, as_index
from .errors import BadInput, CoordinatorGone, GraceTimeout, NotCoordinator, ShmFull
from .grace import Reapable
from .rcu import GracePeriods, Rcu, my_owner_word, owner_alive
from .retired import Retired, give_back
from .segment import Segment
from .table import (
    CREATE_TRIES,
    EMPTY,
    Table,
    blocks_needed,
    find_ram_offset,
    record_tag,
    write_table,
)
from .take import SwapTake, Take
from .view import TableView

SERVE_POLL = 1e-3           # how often serve() looks for requests (s) ...
SERVE_POLL_IDLE = 4e-3      # ... backing off to this while none comes (s)
REQUEST_POLL = 2e-4         # how often request_extend() looks for the grant (s)


def create_map(name: str, page_bits: int, block_pages: int, max_readers: int,
               tcg: bool) -> Segment:
    """Create the header (this process is the coordinator) and the empty
    table of generation 1; return the sealed header.  FileExistsError if the
    name is taken (nothing made, the existing map untouched); on any other
    failure nothing is left behind."""
    hdr = Segment.create(layout.header_name(name), layout.header_size(max_readers),
                         layout.KIND_HEADER)
    try:
        w = hdr.words
        # Nobody can read the header before seal(): relaxed stores.
        for off, value in ((layout.H_PAGE_BITS, page_bits),
                           (layout.H_BLOCK_PAGES, block_pages),
                           (layout.H_TCG, int(bool(tcg))),
                           (layout.H_MAX_READERS, max_readers),
                           (layout.H_GENERATION, 1),
                           (layout.H_COORD, my_owner_word())):
            w.store(off, value, atomic.RELAXED)
        GracePeriods.init_counter(hdr)
        record_tag(hdr, write_table(name, Table(1, 0, EMPTY.block_ids, ())))
        hdr.seal()
    except BaseException:
        hdr.close()
        for n in segment.list_segments(name):
            segment.unlink(n)
        raise
    return hdr


class Shared:
    """Coordinator state of one map in this process, shared by its handles
    (coordinating is per process: every handle of the coordinator's process
    may publish)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # Blocks a swap retired, and the pool of zeroed ones (retired.py).
        self.retired = Retired(self.lock)
        # The handles (their Coordinator) that create() or adopt() returned:
        # only they coordinate; attach() in the same process does not.
        self.roles: set[Coordinator] = set()

    def forked(self) -> None:
        """In a forked child: the pool and the retired blocks are the
        parent's work, and so is the coordinator role (the child's handles
        take word by word from now on); a fresh lock (a parent thread may
        have held it)."""
        self.lock = threading.RLock()
        self.retired = Retired(self.lock)
        for c in self.roles:
            c.taker = c.word_take()
        self.roles = set()


class Coordinator:
    """The coordinator's side of one DirtyMemory handle.  A DirtyMemory
    subclass swaps in another one through its ``coordinator_class``, and a
    Coordinator subclass another swap through its ``take_class``."""

    #: The take of a coordinating handle (tests swap in broken variants).
    take_class: type[SwapTake] = SwapTake

    def __init__(self, view: TableView, rcu: Rcu, header: Segment, shared: Shared) -> None:
        self.view = view
        self.rcu = rcu
        self.shared = shared
        # The handle's take, chosen here and nowhere else: word by word
        # until create() or adopt() gives the handle the role (take_role),
        # and again in a forked child (Shared.forked).
        self.taker: Take = self.word_take()
        self.header = header
        w = header.words
        self.gen_ptr = w.ptr(layout.H_GENERATION)
        self.coord_ptr = w.ptr(layout.H_COORD)
        self.req_ptr = w.ptr(layout.H_REQUEST)
        self.ram_ptr = w.ptr(layout.H_RAM_SIZE)
        self.next_block_ptr = w.ptr(layout.H_NEXT_BLOCK)
        self.refused_ptr = w.ptr(layout.H_REFUSED)

    @property
    def pool(self) -> list[int]:
        """Ids of zeroed blocks for reuse (retired.py)."""
        return self.shared.retired.pool

    def word_take(self) -> Take:
        """The take of a handle that does not coordinate: word by word."""
        return Take(self.view, self.rcu, self.shared)

    # --- who coordinates --------------------------------------------------------------
    # The role is a handle's: the one create() or adopt() returned, while its
    # process owns the header's coordinator word.  A handle attach() gives
    # is not the coordinator, even in the coordinator's own process.
    def process_coordinates(self) -> bool:
        """Does this process own the header's coordinator word (whatever the handle)?"""
        return atomic.load(self.coord_ptr, atomic.ACQUIRE) == my_owner_word()

    def is_coordinator(self) -> bool:
        """Is this handle the coordinator's (create(), adopt()) and does its
        process still coordinate the map?"""
        return self in self.shared.roles and self.process_coordinates()

    def take_role(self) -> None:
        """create() and adopt(): this handle coordinates; its takes may swap."""
        self.shared.roles.add(self)
        self.taker = self.take_class(self.view, self.rcu, self.shared, self)

    def drop_role(self) -> bool:
        """This handle closes: True if it was the process's last coordinating one."""
        had = self in self.shared.roles
        self.shared.roles.discard(self)
        self.taker = self.word_take()
        return had and not self.shared.roles

    def require(self, what: str) -> None:
        """NotCoordinator unless this handle is the coordinator's (create(),
        adopt()) and its process still coordinates the map."""
        coord = atomic.load(self.coord_ptr, atomic.ACQUIRE)
        if coord != my_owner_word():
            who = f"pid {layout.owner_pid(coord)}" if coord else "no process"
            raise NotCoordinator(f"{what} is for the coordinator of map {self.view.name} "
                                 f"({who}); this is pid {os.getpid()}: use request_extend() "
                                 "or adopt()")
        if self not in self.shared.roles:
            raise NotCoordinator(f"{what} is for the coordinator of map {self.view.name}: "
                                 "this handle came from attach(), which never coordinates "
                                 "(use the handle create() or adopt() returned, or "
                                 "request_extend())")

    def adopt(self) -> None:
        """Become the coordinator if the old one is dead or has left, then
        finish what it left half done.  NotCoordinator if it is alive or
        another process won."""
        mine = my_owner_word()
        coord = atomic.load(self.coord_ptr, atomic.ACQUIRE)
        if coord == mine:
            self.take_role()
            return
        name = self.view.name
        if coord and owner_alive(coord):
            raise NotCoordinator(f"map {name}: coordinator pid {layout.owner_pid(coord)} "
                                 "is alive")
        # acq_rel: exactly one adopter wins; it sees everything the old
        # coordinator published.
        ok, now = atomic.compare_exchange(self.coord_ptr, coord, mine,
                                          atomic.ACQ_REL, atomic.ACQUIRE)
        if not ok:
            raise NotCoordinator(f"map {name}: pid {layout.owner_pid(now)} adopted it first")
        self.take_role()
        self.reap_unreachable()

    def resign(self) -> None:
        """Leave as coordinator (the last handle of this process closes):
        give retired blocks back, run deferred frees, clear the owner word."""
        if not self.process_coordinates():
            return
        try:
            self.shared.retired.give_back_due(self.view, self.rcu, timeout=1.0)
        except GraceTimeout:
            pass  # an adopter reaps what is left
        # Deferred frees run while this process is still the coordinator (a
        # reap gives blocks back to its pools).  Their errors, and the
        # callers' callbacks still queued, are close()'s to report (Rcu.finish).
        r = self.rcu.reader
        with r.offline():
            self.rcu.gp.drain(1.0)
        # release: the next coordinator sees all we published.
        atomic.compare_exchange(self.coord_ptr, my_owner_word(), 0,
                                atomic.ACQ_REL, atomic.RELAXED)

    def leave(self) -> None:
        """This handle closes: stop the give-back thread working with its view."""
        self.shared.retired.stop(self.view)

    def forget(self) -> None:
        """destroy(): every segment is gone; drop the library's deferred work
        on them (the callers' callbacks still run, at close)."""
        self.rcu.gp.drop_callbacks(reapable_only=True)
        self.shared.retired.clear()

    # --- marking new RAM dirty: the one place -----------------------------------------
    def mark_dirty(self, block: Callable[[int, int], Block], offset: int, size: int) -> None:
        """Set every client's bits of [offset, offset+size) in the blocks
        ``block(client, index)`` gives."""
        pb = self.view.page_bits
        for idx, off, num in self.view.walk(offset >> pb, (offset + size) >> pb):
            for c in range(DIRTY_MEMORY_NUM):
                bitmap.set_range(block(c, idx), off, num)

    def mark_published(self, offset: int, size: int) -> None:
        """mark_dirty in the published table, inside a read-side section
        (a swap by another thread of this process cannot retire the block
        under us)."""
        v = self.view
        v.begin_section()
        try:
            self.mark_dirty(v.block, offset, size)
        finally:
            v.end_section()

    # --- publishing -----------------------------------------------------------------------
    def publish(self, ram_blocks: list[tuple[int, int]],
                dirty: tuple[int, int] | None = None,
                swap: list[tuple[int, int]] | tuple[()] = ()) -> list[int]:
        """Build and publish the next table for ``ram_blocks``; the old one is
        unlinked after a grace period.  ``dirty`` (offset, size) is marked
        dirty for every client before the table is published.  Each (client,
        index) of ``swap`` gets a zeroed block; the ids of the blocks it
        replaced are returned.  Nothing changes if this fails."""
        v = self.view
        t = v.refresh()
        ram_blocks = sorted(ram_blocks)
        ram_size = max((o + s for o, s in ram_blocks), default=0)
        need = max(t.num_blocks, blocks_needed(ram_size, v.page_bits, v.block_pages))
        ids = [list(t.block_ids[c]) for c in range(DIRTY_MEMORY_NUM)]
        made: list[tuple[int, Segment]] = []
        g = t.generation + 1
        pool = self.shared.retired.pool
        # Room for it all, before anything is made (each segment is reserved
        # on its own too: segment.reserve); a shortage changes nothing.
        fresh_blocks = max(0, (need - t.num_blocks) * DIRTY_MEMORY_NUM + len(swap) - len(pool))
        segment.check_room(
            f"map {v.name}: RAM size {ram_size:#x}",
            fresh_blocks * segment.shm_bytes(layout.block_size(v.block_pages))
            + segment.shm_bytes(layout.table_size(DIRTY_MEMORY_NUM, need, len(ram_blocks))))
        taken_from_pool: list[int] = []
        retired: list[int] = []

        def fresh(c: int) -> int:
            if pool:
                taken_from_pool.append(pool.pop())
                return taken_from_pool[-1]
            # relaxed: only the coordinator allocates ids; the word lives in
            # the header so an adopter goes on from it.
            counter = atomic.fetch_add(self.next_block_ptr, 1, atomic.RELAXED)
            for attempt in range(CREATE_TRIES):
                # A random part in every id: nobody can squat the next name;
                # a name taken anyway (EEXIST) gets a fresh one.
                bid = layout.new_block_id(counter)
                try:
                    seg = Segment.create(layout.block_name(v.name, bid),
                                         layout.block_size(v.block_pages), layout.KIND_BLOCK,
                                         c, bid)
                    break
                except FileExistsError:
                    if attempt == CREATE_TRIES - 1:
                        raise
            made.append((bid, seg))
            seg.seal()
            return bid

        placed: list[tuple[int, int]] = []
        try:
            for c in range(DIRTY_MEMORY_NUM):
                for idx in range(t.num_blocks, need):
                    ids[c].append(fresh(c))
                    placed.append((c, idx))
            for c, idx in swap:
                retired.append(ids[c][idx])
                ids[c][idx] = fresh(c)
                placed.append((c, idx))
            for bid, seg in made:
                v.map_block(bid, seg)
            for c, idx in placed:
                # Where the block sits, for an adopter that finds it retired
                # but not yet taken (reap_unreachable gives its bits back).
                w = v.block_segment(ids[c][idx]).words
                w.store(layout.P_ARG0, c, atomic.RELAXED)
                w.store(layout.P_ARG2, idx, atomic.RELAXED)
            if dirty is not None:
                # Before the publication: no reader can see the new blocks
                # yet, and setting bits in blocks they can see is harmless.
                self.mark_dirty(lambda c, idx: v.map_block(ids[c][idx]), *dirty)
            new = Table(g, ram_size, tuple(tuple(c) for c in ids), tuple(ram_blocks))
            new = write_table(v.name, new)  # cleans up after itself; gives the tag
            record_tag(self.header, new)    # before the generation, below
        except BaseException:
            pool.extend(taken_from_pool)
            v.unmap_blocks([bid for bid, _ in made])
            for _bid, seg in made:
                seg.close()
                segment.unlink(seg.name)
            raise
        # The publication.  seq_cst: the updater's half of the Dekker pair; a
        # reader that loads g finds the sealed table and its sealed blocks.
        atomic.store(self.gen_ptr, g, atomic.SEQ_CST)
        # Advance the grace-period counter: readers re-read the generation
        # only when it moved (see TableView.begin_section).
        self.rcu.gp.start_poll()
        # release: request_extend() waiters that see the size see the table.
        atomic.store(self.ram_ptr, ram_size, atomic.RELEASE)
        v.set_table(new)
        old = layout.table_name(v.name, t.generation, t.tag)
        self.rcu.call_rcu(Reapable(lambda: segment.unlink(old)))
        return retired

    def _size(self, size: Any, what: str) -> int:
        n = as_index(size, what)
        if n <= 0 or n % self.view.page_size:
            raise BadInput(f"{what} {n:#x} must be a positive multiple of the page size "
                           f"{self.view.page_size:#x}")
        return n

    def grow(self, ram_blocks: list[tuple[int, int]], added: tuple[int, int]) -> None:
        """Publish ``ram_blocks``, of which ``added`` is new: dirty for every client."""
        self.publish(ram_blocks, dirty=added)
        # Again after the publication: a sync of the old range may have
        # taken the bits set before it.
        self.mark_published(*added)

    def ram_block_add(self, size: Any) -> int:
        self.require("ram_block_add()")
        size = self._size(size, "RAM block size")
        with self.shared.lock:
            blocks = list(self.view.refresh().ram_blocks)
            offset = find_ram_offset(blocks, size)
            self.grow(blocks + [(offset, size)], (offset, size))
        return offset

    def ram_block_remove(self, offset: Any) -> None:
        self.require("ram_block_remove()")
        offset = as_index(offset, "offset")
        with self.shared.lock:
            blocks = list(self.view.refresh().ram_blocks)
            found = [b for b in blocks if b[0] == offset]
            if not found:
                raise BadInput(f"no RAM block starts at {offset:#x}; blocks start at "
                               f"{[hex(o) for o, _ in blocks]}")
            blocks.remove(found[0])
            self.publish(blocks)

    def extend(self, new_ram_size: Any) -> None:
        self.require("extend()")
        new_ram_size = self._size(new_ram_size, "RAM size")
        with self.shared.lock:
            t = self.view.refresh()
            if new_ram_size <= t.ram_size:
                return
            added = (t.ram_size, new_ram_size - t.ram_size)
            self.grow(list(t.ram_blocks) + [added], added)

    # --- the hot-plug request word: both ends -------------------------------------------
    def request_extend(self, new_ram_size: Any, timeout: float | None) -> None:
        v = self.view
        new_ram_size = self._size(new_ram_size, "RAM size")
        # Never posted if too large: the coordinator could not grant it.
        blocks_needed(new_ram_size, v.page_bits, v.block_pages)
        if self.is_coordinator():
            self.extend(new_ram_size)
            return
        # A refusal of this size from before is not about this request.
        # acq_rel / relaxed: as withdraw().
        atomic.compare_exchange(self.refused_ptr, new_ram_size, 0, atomic.ACQ_REL,
                                atomic.RELAXED)
        self.post(new_ram_size)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self.rcu.offline():  # a qsbr reader must not hold up grace periods
                self.await_ram_size(new_ram_size, timeout, deadline)
        except BaseException as e:
            # A request that raised is withdrawn (the error changes nothing):
            # the word goes back to 0 only if it still holds our value (a
            # larger one is another caller's).
            self.withdraw(new_ram_size)
            # Remaining race, accepted: a grant that lands just as the timeout
            # fires is reported as success (checked here, acquire: pairs with
            # publish()'s release); a coordinator that loaded the request
            # before the withdrawal but publishes after this check still
            # grows RAM after the caller got its error.  Another caller
            # waiting for the same size re-posts it (await_ram_size).
            if (not isinstance(e, GraceTimeout)
                    or atomic.load(self.ram_ptr, atomic.ACQUIRE) < new_ram_size):
                raise
        else:  # granted: a re-post may have landed after the grant cleared the word
            self.withdraw(new_ram_size)
        v.invalidate()  # re-read the table at the next op

    def withdraw(self, new_ram_size: int) -> None:
        """The request word back to 0 if it still holds ours (a larger one is
        another caller's).  acq_rel on success, ordered with serve's acquire
        load and CAS to 0; relaxed on failure (nothing touched)."""
        atomic.compare_exchange(self.req_ptr, new_ram_size, 0, atomic.ACQ_REL, atomic.RELAXED)

    def post(self, new_ram_size: int) -> None:
        """Post the largest request: a CAS-max (acq_rel; the serve loop loads
        it with acquire)."""
        cur = atomic.load(self.req_ptr, atomic.ACQUIRE)
        while cur < new_ram_size:
            ok, cur = atomic.compare_exchange(self.req_ptr, cur, new_ram_size,
                                              atomic.ACQ_REL, atomic.ACQUIRE)
            if ok:
                break

    def await_ram_size(self, new_ram_size: int, timeout: float | None,
                        deadline: float | None) -> None:
        name = self.view.name
        next_check = 0.0
        coord = 0
        # acquire: pairs with publish()'s release of the size.
        while atomic.load(self.ram_ptr, atomic.ACQUIRE) < new_ram_size:
            now = time.monotonic()
            # acquire: pairs with serve_once's release store of a refusal.
            if atomic.load(self.refused_ptr, atomic.ACQUIRE) == new_ram_size:
                raise ShmFull(f"map {name}: the coordinator cannot grow to RAM size "
                              f"{new_ram_size:#x}", self.growth_bytes(new_ram_size),
                              segment.free_bytes(), segment.SHM_DIR)
            if now >= next_check:
                coord = atomic.load(self.coord_ptr, atomic.ACQUIRE)
                if not coord or not owner_alive(coord):
                    raise CoordinatorGone(
                        f"map {name}: no live coordinator to grant RAM size "
                        f"{new_ram_size:#x}; call DirtyMemory.adopt({name!r})")
                # Still ours to ask for: another caller of the same size that
                # timed out may have withdrawn the word it shared with us.
                self.post(new_ram_size)
                next_check = now + 0.05
            if deadline is not None and now >= deadline:
                raise GraceTimeout(
                    f"map {name}: coordinator pid {layout.owner_pid(coord)} did not grant "
                    f"RAM size {new_ram_size:#x} within {timeout} s (is it calling serve()?)")
            time.sleep(REQUEST_POLL)

    def serve(self, stop_event: Any) -> None:
        self.require("serve()")
        poll = SERVE_POLL
        while stop_event is None or not stop_event.is_set():
            asked = atomic.load(self.req_ptr, atomic.RELAXED) != 0  # a hint only
            self.serve_once()
            # Idle, it looks less often (a request is granted within 4 ms);
            # callbacks waiting on a long reader back off on their own
            # (GracePeriods.run_callbacks): it never polls hot.
            poll = SERVE_POLL if asked else min(poll * 2, SERVE_POLL_IDLE)
            if stop_event is not None and hasattr(stop_event, "wait"):
                stop_event.wait(poll)
            else:
                time.sleep(poll)

    def growth_bytes(self, new_ram_size: int) -> int:
        """What of /dev/shm growing to ``new_ram_size`` takes (new blocks and
        the table, whole pages; the pool of zeroed blocks not counted), as
        this view's table says (a requester's may be behind: an estimate)."""
        v = self.view
        t = v.table
        need = max(t.num_blocks, blocks_needed(new_ram_size, v.page_bits, v.block_pages))
        return ((need - t.num_blocks) * DIRTY_MEMORY_NUM
                * segment.shm_bytes(layout.block_size(v.block_pages))
                + segment.shm_bytes(layout.table_size(DIRTY_MEMORY_NUM, need,
                                                      len(t.ram_blocks) + 1)))

    def serve_once(self) -> bool:
        grew = False
        req = atomic.load(self.req_ptr, atomic.ACQUIRE)
        if req > atomic.load(self.ram_ptr, atomic.ACQUIRE):
            try:
                self.extend(req)
                grew = True
            except ShmFull:
                # Refused, the map unchanged: told to the requester (release:
                # it loads the word with acquire), the request withdrawn, and
                # the loop goes on serving.
                atomic.store(self.refused_ptr, req, atomic.RELEASE)
        if req:
            # Granted (or already met): withdraw it, so that RAM removed later
            # is not grown back by a stale request.  A CAS: a larger request
            # posted meanwhile stays for the next round.
            self.withdraw(req)
        if self.rcu.gp.pending:
            self.rcu.gp.run_callbacks()
        return grew

    # --- adoption: reaping what a dead coordinator left -----------------------------------
    def reap_unreachable(self) -> None:
        """After adoption: finish what the old coordinator left half done.

        - A table newer than the published generation was never published,
          so no reader can hold it: unlinked now (the next table takes its name).
        - A generation published before the header's RAM size was stored: the
          old coordinator may have died before marking that RAM dirty too; mark
          it for every client (a spurious dirty page costs a copy, a missing one
          loses data), then store the size.
        - Older tables and blocks in no table go after a grace period."""
        v = self.view
        t = v.refresh()
        # acquire / release: as in publish.
        shown = atomic.load(self.ram_ptr, atomic.ACQUIRE)
        if shown != t.ram_size:
            if shown < t.ram_size:
                self.mark_published(shown, t.ram_size - shown)
            atomic.store(self.ram_ptr, t.ram_size, atomic.RELEASE)
        keep = {layout.table_name(v.name, t.generation, t.tag)}
        keep.update(layout.block_name(v.name, b) for ids in t.block_ids for b in ids)
        stale: list[str] = []
        stale_blocks: list[int] = []
        for n in segment.list_segments(v.name):
            role, index = layout.role_of(n)
            if n in keep or role not in ("t", "b") or index is None:
                continue
            if role == "t" and index > t.generation:
                segment.unlink(n)
                continue
            stale.append(n)
            if role == "b":
                stale_blocks.append(index)

        published = t.num_blocks  # positions a block could have been retired from

        def reap() -> None:
            give_back(v, stale_blocks, published)
            for n in stale:
                segment.unlink(n)
        self.rcu.call_rcu(Reapable(reap))
