"""Read-copy-update across processes: reader slots and grace periods.

The protocol is QEMU's util/rcu.c and liburcu's, with processes for threads
and shared-memory words for their variables:

- ``gp`` is a 64-bit grace-period counter in the header.  It starts at 1 and
  only grows, so it never wraps and one wait per grace period suffices.
- Every reader process claims a slot: an owner word (pid and kernel start
  time, one CAS) and ``ctr``.  ``ctr`` is 0 outside a read-side section, and
  otherwise the value of ``gp`` the reader saw when its section began.
- A grace period advances ``gp`` to ``target`` and waits until every claimed
  slot holds 0 or a value >= ``target``: every section that began before the
  advance has ended.  Concurrent grace periods overlap freely.

Why it is safe (the Dekker pair): the updater publishes (seq_cst store), then
advances ``gp`` and loads each ``ctr`` (seq_cst); a reader stores its ``ctr``
(seq_cst) and only then loads the published word (seq_cst).  In the single
total order of seq_cst operations, either the updater's load sees the
reader's store (and waits for it), or the reader's load comes after the
publication (and the reader never sees the old object).

Two flavors share everything but section entry:

- ``memb``: each outermost ``read_lock`` stores into ``ctr`` the value of
  ``gp`` it saw last, then loads ``gp`` (two seq_cst operations, where QEMU
  loads first and stores second).  The load after the store tells the
  caller whether anything was published since it last looked, so a section
  reads the published table only when the counter moved; when it did, the
  fresh value is stored as well (a third atomic, only then), so grace
  periods do not wait for sections that began after them.  An old value in
  ``ctr`` is always safe: it only makes a grace period wait longer.
  ``read_unlock`` stores 0.  Nesting is process-local.
- ``qsbr``: an online reader is always inside a section, except at
  ``quiescent()`` (store the current ``gp`` if it moved) and while offline.

A reader that dies inside a section must not stall anyone: a waiter checks
the owner of a slot that holds it up, and a slot whose owner is gone, a
zombie, or a different process reusing the pid (another start time) is
reclaimed.

A Rcu object serves one process and claims a slot of its own (two Rcu
objects never share one: their nesting is separate, and one's unregister
would free the other's slot); DirtyMemory keeps one Rcu per map per process,
shared by every handle.  The state of the reader (its slot, nesting depth,
the counter value it saw, online or not) is a ``Reader`` object of its own:
one per Rcu today, and the unit a per-thread reader would multiply.  It is
not for concurrent use by several threads.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import psutil

from . import atomic, layout
from .errors import BadInput, GraceTimeout, NoReaderSlot, RcuMisuse
from .segment import Segment

FLAVORS = ("memb", "qsbr")
_SPINS = 4                 # busy checks before a waiter starts sleeping: one check
                           # reads every slot (~30 us for 64 slots through cffi), so
                           # this is ~0.1 ms; 64 (~2 ms, a scheduler slice) kept a
                           # preempted reader off the CPU it needed (perf/ RCU micro)
_SLEEP_MIN = 20e-6         # first back-off sleep (s)
_SLEEP_MAX = 2e-3          # longest back-off sleep (s)
_LIVENESS_EVERY = 5e-3     # how often a waiter checks owners of blocking slots (s)


# --- process identity --------------------------------------------------------
def start_ticks(pid: int) -> int | None:
    """The kernel start time of ``pid`` in clock ticks since boot, or None.

    Unlike psutil's create_time(), it does not move when the wall clock is
    stepped, so it identifies a process exactly.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19])  # field 22 of the whole line


_me: tuple[int, int] | None = None


def my_owner_word() -> int:
    """The owner word of this process: its pid and start time, packed."""
    global _me
    pid = os.getpid()
    if _me is None or _me[0] != pid:
        ticks = start_ticks(pid)
        assert ticks is not None
        _me = (pid, layout.owner_word(pid, ticks))
    return _me[1]


def owner_alive(word: int) -> bool:
    """Is the process recorded in an owner word still the same live process?"""
    pid = layout.owner_pid(word)
    if start_ticks(pid) != layout.owner_start(word):
        return False  # gone, or the pid now belongs to another process
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.AccessDenied:
        return True  # it exists with the right start time: never take a live slot
    except psutil.Error:
        return False


class ReaderInfo(NamedTuple):
    slot: int
    pid: int
    alive: bool
    epoch: int  # the slot's ctr: 0 outside a section


# --- grace periods: shared by both flavors and by every process --------------
class GracePeriods:
    """Grace periods over the slots of one header segment."""

    def __init__(self, header: Segment, max_readers: int) -> None:
        self.header = header
        self.max_readers = max_readers
        w = header.words
        self._gp = w.ptr(layout.H_GP)
        self._owners = [w.ptr(layout.slot_offset(i) + layout.S_OWNER) for i in range(max_readers)]
        self._ctrs = [w.ptr(layout.slot_offset(i) + layout.S_CTR) for i in range(max_readers)]
        self._callbacks: deque[Callable[[], object]] = deque()
        self._batch: deque[Callable[[], object]] = deque()
        self._batch_token = 0
        self._running = False  # run_callbacks is running a batch (re-entry guard)
        # The newest token this process saw complete; every older one is
        # complete too.  Keeps poll() monotonic: a section that begins after a
        # token completed may store an older counter (memb stores the value
        # it saw last) and would otherwise make the token poll False again.
        self._completed = 0

    @staticmethod
    def init_counter(header: Segment) -> None:
        """Set a new header's counter to 1 (before the header is sealed)."""
        # relaxed: nobody reads the header before its seal (a release).
        header.words.store(layout.H_GP, 1, atomic.RELAXED)

    def counter(self) -> int:
        """The current grace-period counter."""
        return atomic.load(self._gp, atomic.SEQ_CST)

    def start_poll(self) -> int:
        """Start a grace period; the token polls True once it has elapsed."""
        # seq_cst: orders everything this process did before (an unpublish)
        # before the advance, and the advance before the slot loads that follow.
        return atomic.fetch_add(self._gp, 1, atomic.SEQ_CST) + 1

    def _blockers(self, token: int) -> list[tuple[int, int]]:
        """(slot, owner) of every claimed slot whose section began before ``token``."""
        found = []
        for i in range(self.max_readers):
            # seq_cst: the updater's half of the Dekker pair (see module doc).
            ctr = atomic.load(self._ctrs[i], atomic.SEQ_CST)
            if ctr == 0 or ctr >= token:
                continue
            # acquire: a free slot (0) means its last section's accesses are
            # done, since unregister's release CAS came after them.
            owner = atomic.load(self._owners[i], atomic.ACQUIRE)
            if owner == 0:
                continue
            found.append((i, owner))
        return found

    def reclaim(self, slot: int, owner: int) -> bool:
        """Free ``slot`` if ``owner`` still holds it and is dead. True if freed."""
        if owner_alive(owner):
            return False
        # acq_rel CAS: only one reclaimer wins, and nobody else's claim is undone.
        ok, _ = atomic.compare_exchange(
            self._owners[slot], owner, 0, atomic.ACQ_REL, atomic.ACQUIRE
        )
        return ok

    def poll(self, token: int, *, check_owners: bool = True) -> bool:
        """Has a full grace period passed since ``start_poll()`` returned ``token``?"""
        if token <= self._completed:
            return True
        if token > self.counter():
            # Never handed out: "complete" now, it would end every later
            # grace period up to it at once (see _completed).
            raise BadInput(f"grace-period token {token} was never started: the "
                           f"counter is at {self.counter()}")
        blockers = self._blockers(token)
        if blockers and check_owners:
            blockers = [(s, o) for s, o in blockers if not self.reclaim(s, o)]
        if blockers:
            return False
        self._completed = max(self._completed, token)
        return True

    def wait(self, token: int, timeout: float | None = None) -> None:
        """Block until the grace period ``token`` has elapsed (see synchronize)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        spins = 0
        sleep = _SLEEP_MIN
        next_check = time.monotonic() + _LIVENESS_EVERY
        while True:
            if token <= self._completed:
                return
            blockers = self._blockers(token)
            if not blockers:
                self._completed = max(self._completed, token)
                return
            now = time.monotonic()
            if now >= next_check or (deadline is not None and now >= deadline):
                blockers = [(s, o) for s, o in blockers if not self.reclaim(s, o)]
                next_check = now + _LIVENESS_EVERY
                if not blockers:
                    continue
                if deadline is not None and now >= deadline:
                    who = ", ".join(f"slot {s} (pid {layout.owner_pid(o)})" for s, o in blockers)
                    raise GraceTimeout(
                        f"grace period {token} not complete after {timeout} s: "
                        f"still waiting for reader {who} to leave its read-side section"
                    )
            if spins < _SPINS:
                spins += 1
                continue
            # Back-off while readers finish; progress is re-checked above.
            time.sleep(sleep)
            sleep = min(sleep * 2, _SLEEP_MAX)

    # --- call_rcu: written once for both flavors --------------------------------
    def call_rcu(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in this process after a grace period (batched)."""
        self._callbacks.append(fn)
        self.run_callbacks()

    def run_callbacks(self, block: bool = False, timeout: float | None = None) -> int:
        """Run the callbacks whose grace period has passed; start the next
        batch.  With ``block``, wait until every queued callback has run."""
        if self._running:
            # Called from a callback (its call_rcu): the pass under way starts
            # the new callback's grace period once the current batch is done.
            # Running on here would run a new batch before its grace period.
            if block:
                raise RcuMisuse("barrier() inside an RCU callback would wait for itself")
            return 0
        self._running = True
        try:
            return self._run_callbacks(block, timeout)
        finally:
            self._running = False

    def _run_callbacks(self, block: bool, timeout: float | None) -> int:
        ran = 0
        while True:
            if self._batch:
                done = self.poll(self._batch_token)
                if not done and block:
                    self.wait(self._batch_token, timeout)
                    done = True
                if not done:
                    return ran
                while self._batch:
                    self._batch.popleft()()
                    ran += 1
            if not self._callbacks:
                return ran
            # One grace period for every callback queued so far.
            self._batch, self._callbacks = self._callbacks, deque()
            self._batch_token = self.start_poll()

    def drop_callbacks(self) -> None:
        """Forget every queued callback (the map is being destroyed)."""
        self._callbacks.clear()
        self._batch.clear()

    @property
    def pending(self) -> int:
        return len(self._callbacks) + len(self._batch)

    def readers(self) -> list[ReaderInfo]:
        """Every claimed slot: slot, pid, alive, epoch."""
        out = []
        for i in range(self.max_readers):
            owner = atomic.load(self._owners[i], atomic.ACQUIRE)
            if owner:
                ctr = atomic.load(self._ctrs[i], atomic.ACQUIRE)
                out.append(ReaderInfo(i, layout.owner_pid(owner), owner_alive(owner), ctr))
        return out


# --- the reader side ---------------------------------------------------------
class Reader:
    """One reader's slot and state: the section entry of both flavors.

    Outside rcu.py its fields are read-only: ``nesting`` (depth of the
    current section, 0 outside), ``online`` (qsbr: inside a section except
    at quiescent points and while offline), ``seen`` (the grace-period
    counter this reader last observed; a caller that sees it move re-reads
    what it caches of published words).  Plain attributes, not properties:
    DirtyMemory's hottest path reads two of them per op."""

    __slots__ = ("flavor", "slot", "nesting", "online", "seen", "_memb", "_cell", "_zero",
                 "_store_cell", "_load_cell", "_gp_ptr", "_ctr", "_section_online")

    def __init__(self, gp: GracePeriods, flavor: str) -> None:
        self.flavor = flavor
        self.slot = -1
        self.nesting = 0
        self.online = False
        self.seen = 0          # set on register
        self._memb = flavor == "memb"
        # Hot path: this reader's own cells and the C functions, called
        # without a wrapper.
        self._cell = atomic.new_cell()
        self._zero = atomic.new_cell()
        self._store_cell = atomic.backend.store_cell
        self._load_cell = atomic.backend.load_cell
        self._gp_ptr = gp._gp
        self._ctr = gp._gp     # replaced by the slot's ctr on claim
        self._section_online = False  # qsbr: went online for one section

    @property
    def ctr_ptr(self) -> atomic.Ptr:
        """The address of this reader's ``ctr`` word (tests hook stores to it)."""
        return self._ctr

    def _claimed(self, slot: int, ctr: atomic.Ptr) -> None:
        self.slot = slot
        self._ctr = ctr
        # A dead owner may have left ctr set; nobody else writes it now.
        atomic.store(self._ctr, 0, atomic.RELEASE)
        self.seen = atomic.load(self._gp_ptr, atomic.SEQ_CST)
        if self.flavor == "qsbr":
            self.thread_online()

    def _released(self) -> None:
        # release: the slot reads 0 only after every access of ours.
        atomic.store(self._ctr, 0, atomic.RELEASE)
        self.slot = -1
        self.nesting = 0
        self.online = False

    def check_outside(self, what: str) -> None:
        """RcuMisuse if this reader is inside a section (``what`` would wait for itself)."""
        if self.nesting > 0:
            raise RcuMisuse(f"{what} inside a read-side section would wait for itself")

    # --- memb ---------------------------------------------------------------------
    def read_lock(self) -> None:
        """Enter a read-side section; sections nest.  In qsbr an online reader
        is already inside one; an offline one goes online for the section.
        Afterwards ``seen`` is the counter value this reader last observed."""
        n = self.nesting
        if n:
            self.nesting = n + 1
            return
        if self.slot < 0:
            raise RcuMisuse("read_lock() after unregister(): this Rcu has no slot")
        self.nesting = 1
        if self._memb:
            # Store the counter value last seen, then load the counter, both
            # seq_cst: the reader's half of the Dekker pair (module doc).  The
            # value stored may be old; that only makes a grace period wait
            # for this section, and the next section stores the fresh one.
            c = self._cell
            c[0] = self.seen
            self._store_cell(self._ctr, c, atomic.SEQ_CST)
            self._load_cell(self._gp_ptr, atomic.SEQ_CST, c)
            if c[0] != self.seen:
                # The counter moved: store the fresh value too, so a grace
                # period that began before this section does not wait for it
                # (the caller re-reads what was published: ``seen`` moved).
                self.seen = c[0]
                self._store_cell(self._ctr, c, atomic.SEQ_CST)
        elif not self.online:
            self.thread_online()
            self._section_online = True

    def read_unlock(self) -> None:
        """Leave a read-side section."""
        if self.nesting <= 0:
            raise RcuMisuse("read_unlock without a matching read_lock")
        self.nesting -= 1
        if self.nesting == 0:
            if self._memb:
                # release: every access of the section happens before a
                # waiter that sees 0.
                self._store_cell(self._ctr, self._zero, atomic.RELEASE)
            elif self._section_online:
                self._section_online = False
                self.thread_offline()

    # --- qsbr ---------------------------------------------------------------------
    def thread_online(self) -> None:
        """qsbr: become a reader that is always inside a section."""
        if self.slot < 0:
            raise RcuMisuse("thread_online() after unregister(): this Rcu has no slot")
        g = atomic.load(self._gp_ptr, atomic.RELAXED)
        while True:
            # seq_cst: as read_lock, so loads of published words come after it.
            atomic.store(self._ctr, g, atomic.SEQ_CST)
            # seq_cst, after the store: as read_lock, ``seen`` must be a value
            # loaded after it.  A grace period that advanced the counter
            # between the load above and the store may have found the slot
            # at 0 and ended; the caller must then see ``seen`` move and
            # re-read what was published (a table may have retired blocks).
            now = atomic.load(self._gp_ptr, atomic.SEQ_CST)
            if now == g:
                break
            g = now
        self.seen = g
        self.online = True

    def thread_offline(self) -> None:
        """qsbr: stop being a reader until thread_online()."""
        if self.nesting > 0:
            raise RcuMisuse("thread_offline() inside a read-side section")
        # release: as read_unlock.
        atomic.store(self._ctr, 0, atomic.RELEASE)
        self.online = False

    def quiescent(self) -> bool:
        """qsbr: a quiescent point.  Returns True if a grace period had
        started (the caller re-reads published words); writes nothing else."""
        if self.nesting:
            raise RcuMisuse("quiescent() inside a read-side section")
        g = atomic.load(self._gp_ptr, atomic.SEQ_CST)
        if g == self.seen or not self.online:
            return False
        # seq_cst: announce we hold no old reference, before re-reading
        # published words.
        atomic.store(self._ctr, g, atomic.SEQ_CST)
        self.seen = g
        return True

    @contextmanager
    def offline(self) -> Iterator[None]:
        """Wait offline: an online qsbr reader outside any section goes
        offline for the block (it must not hold up grace periods while it
        waits) and comes back online after it; anything else is unchanged.
        Every waiter (synchronize, barrier, request_extend) uses this."""
        away = not self._memb and self.online and self.nesting == 0
        if away:
            self.thread_offline()
        try:
            yield
        finally:
            if away:
                self.thread_online()


class Rcu:
    """This process's reader slot in one map, and its grace periods."""

    def __init__(self, header: Segment, max_readers: int, flavor: str = "memb") -> None:
        if flavor not in FLAVORS:
            raise BadInput(f"flavor {flavor!r} is not one of {FLAVORS}")
        self.flavor = flavor
        self.gp = GracePeriods(header, max_readers)
        self.reader = Reader(self.gp, flavor)
        self._owner = my_owner_word()
        r = self.reader
        # The section entry points, bound once: no wrapper call per section.
        self.read_lock = r.read_lock
        self.read_unlock = r.read_unlock
        self.thread_online = r.thread_online
        self.thread_offline = r.thread_offline
        self.quiescent = r.quiescent
        self.offline = r.offline
        self._register()

    # --- the reader's state, read-only ----------------------------------------------
    @property
    def slot(self) -> int:
        """This reader's slot index, -1 once unregistered."""
        return self.reader.slot

    @property
    def nesting(self) -> int:
        """Depth of the current read-side section (0 outside)."""
        return self.reader.nesting

    @property
    def online(self) -> bool:
        """qsbr: inside a section except at quiescent points and while offline."""
        return self.reader.online

    @property
    def seen(self) -> int:
        """The grace-period counter value this reader last observed."""
        return self.reader.seen

    # --- slots ------------------------------------------------------------------
    def _register(self) -> None:
        n = self.gp.max_readers
        start = os.getpid() % n
        for attempt in range(2):
            for k in range(n):
                i = (start + k) % n
                # acq_rel: a claim orders after the previous owner's release.
                ok, _ = atomic.compare_exchange(
                    self.gp._owners[i], 0, self._owner, atomic.ACQ_REL, atomic.ACQUIRE
                )
                if ok:
                    self.reader._claimed(i, self.gp._ctrs[i])
                    return
            if attempt == 0:
                for i in range(n):
                    owner = atomic.load(self.gp._owners[i], atomic.ACQUIRE)
                    if owner:
                        self.gp.reclaim(i, owner)
        pids = sorted({r.pid for r in self.gp.readers()})
        raise NoReaderSlot(
            f"all {n} reader slots are claimed by live processes {pids}; "
            "close a handle or create the map with a larger max_readers"
        )

    def unregister(self) -> None:
        """Leave: free the slot (idempotent).  Must be outside any section."""
        r = self.reader
        if r.slot < 0:
            return
        if r.nesting > 0:
            raise RcuMisuse("unregister() inside a read-side section")
        slot = r.slot
        r._released()
        atomic.compare_exchange(
            self.gp._owners[slot], self._owner, 0, atomic.ACQ_REL, atomic.RELAXED
        )

    @contextmanager
    def read_section(self) -> Iterator[None]:
        """``with rcu.read_section():`` one read-side section."""
        self.read_lock()
        try:
            yield
        finally:
            self.read_unlock()

    # --- grace periods ------------------------------------------------------------
    def synchronize(self, timeout: float | None = None) -> None:
        """Wait for a full grace period: every section begun before has ended.

        TimeoutError (naming the slots and pids) after ``timeout`` seconds."""
        self.reader.check_outside("synchronize()")
        with self.offline():
            self.gp.wait(self.gp.start_poll(), timeout)

    def start_poll(self) -> int:
        """Start a grace period without waiting; see poll()."""
        return self.gp.start_poll()

    def poll(self, token: int) -> bool:
        """True once a full grace period has passed since start_poll()."""
        return self.gp.poll(token)

    def call_rcu(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in this process after a grace period, in batches; queued
        callbacks run as later calls find their grace period over, or at barrier()."""
        self.gp.call_rcu(fn)

    def barrier(self, timeout: float | None = None) -> None:
        """Wait until every callback queued by this process has run."""
        self.reader.check_outside("barrier()")
        with self.offline():
            self.gp.run_callbacks(block=True, timeout=timeout)

    def readers(self) -> list[ReaderInfo]:
        """slot, pid, alive, epoch for every claimed slot."""
        return self.gp.readers()
