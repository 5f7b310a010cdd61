"""Grace periods across processes: the counter, the slots as waiters see
them, polling, call_rcu, and who owns a slot.

Written once for both reader flavors (rcu.py) and for every waiter
(synchronize, barrier, serve, the coordinator's swap), as liburcu writes
call_rcu and polling once for every flavor.  The protocol, and why it is
safe, is in rcu.py's module doc.

A GracePeriods object belongs to one process and is shared by its threads:
its callback queue and its completed-token mark are guarded by locks; the
slot words are touched only with atomics.  Once ``close()`` is called (the
header is about to be unmapped) every method raises ShmDirtyError instead
of reaching unmapped memory.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import psutil

from . import atomic, layout
from .errors import (
    BadInput,
    CallbackFailed,
    CallbacksDropped,
    GraceTimeout,
    HandleClosed,
    RcuMisuse,
    check_timeout,
)
from .segment import Segment

_SPINS = 4                 # busy checks before a waiter starts sleeping: one check
                           # reads every slot (~30 us for 64 slots through cffi), so
                           # this is ~0.1 ms; 64 (~2 ms, a scheduler slice) kept a
                           # preempted reader off the CPU it needed (perf/ RCU micro)
_SLEEP_MIN = 20e-6         # first back-off sleep (s)
_SLEEP_MAX = 2e-3          # longest back-off sleep (s)
_LIVENESS_EVERY = 5e-3     # how often a waiter checks owners of blocking slots (s)
_CALLBACK_POLL_MAX = 10e-3  # longest gap between two looks at a callback batch's
                            # grace period (s): callbacks free memory, nobody waits
                            # on them, so serve() looks 100 times a second at most,
_CALLBACK_LIVENESS = 50e-3  # and checks the blocking owners' liveness (a /proc read
                            # and a psutil call each) 20 times a second at most


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


class Reapable:
    """A library callback (the swap's old-table unlink, an adoption's reap)
    that an adopter, ``destroy()`` or ``shmdirty gc`` redoes if it never runs:
    teardown may leave it without a report.  Every other callback is the
    caller's work, and teardown runs it or says it could not."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn

    def __call__(self) -> object:
        return self.fn()


class ReaderInfo(NamedTuple):
    slot: int
    pid: int
    alive: bool
    epoch: int  # the slot's ctr: 0 outside a section


# --- grace periods: shared by both flavors, every thread and every process --------------
class GracePeriods:
    """Grace periods over the slots of one header segment, for one process."""

    def __init__(self, header: Segment, max_readers: int) -> None:
        self.header = header
        self.max_readers = max_readers
        w = header.words
        self._gp = w.ptr(layout.H_GP)
        self._owners = [w.ptr(layout.slot_offset(i) + layout.S_OWNER) for i in range(max_readers)]
        self._ctrs = [w.ptr(layout.slot_offset(i) + layout.S_CTR) for i in range(max_readers)]
        self._closed = False
        self._callbacks: deque[Callable[[], object]] = deque()
        self._batch: deque[Callable[[], object]] = deque()
        self._batch_token = 0
        # Exceptions raised by callbacks, kept for their owner: the next
        # barrier() or close() of this process raises them (take_errors), an
        # unrelated caller that happened to run them (serve_once) never does.
        self._errors: list[Exception] = []
        # Callbacks run in one thread at a time; _running_in is that thread
        # (a callback that calls call_rcu re-enters: see run_callbacks).
        self._cb_lock = threading.Lock()
        self._running_in = 0
        # When a batch's grace period is looked at next, and the back-off to
        # the look after (run_callbacks without ``block``).
        self._next_look = 0.0
        self._look_every = _SLEEP_MIN
        self._next_liveness = 0.0
        # The newest token this process saw complete; every older one is
        # complete too.  Keeps poll() monotonic: a section that begins after a
        # token completed may store an older counter (memb stores the value
        # it saw last) and would otherwise make the token poll False again.
        # Invariant: only grows (written under _completed_lock).
        self._completed = 0
        self._completed_lock = threading.Lock()

    @staticmethod
    def init_counter(header: Segment) -> None:
        """Set a new header's counter to 1 (before the header is sealed)."""
        # relaxed: nobody reads the header before its seal (a release).
        header.words.store(layout.H_GP, 1, atomic.RELAXED)

    # --- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """The header is about to be unmapped: every later call raises
        HandleClosed.  Queued callbacks are dropped (nobody will run them):
        run drain() first, and report what it left."""
        self._closed = True
        self.drop_callbacks()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise HandleClosed(f"{self.header.name}: this map's handle is closed in this "
                               "process (its header is unmapped): attach again")

    def forked(self) -> None:
        """In a forked child: the parent's callbacks are the parent's work
        (run here they would free what the parent still uses); fresh locks
        (a thread of the parent may have held them at the fork)."""
        self.drop_callbacks()
        self._cb_lock = threading.Lock()
        self._completed_lock = threading.Lock()
        self._running_in = 0

    # --- the counter and polling ------------------------------------------------------
    def counter(self) -> int:
        """The current grace-period counter."""
        self._check_open()
        return atomic.load(self._gp, atomic.SEQ_CST)

    def start_poll(self) -> int:
        """Start a grace period; the token polls True once it has elapsed."""
        self._check_open()
        # seq_cst: orders everything this process did before (an unpublish)
        # before the advance, and the advance before the slot loads that follow.
        return atomic.fetch_add(self._gp, 1, atomic.SEQ_CST) + 1

    def blockers(self, token: int) -> list[tuple[int, int]]:
        """(slot, owner) of every claimed slot whose section began before ``token``
        (the scan every waiter runs; tests count it)."""
        self._check_open()
        found = []
        for i in range(self.max_readers):
            # seq_cst: the updater's half of the Dekker pair (see rcu.py).
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

    def _complete(self, token: int) -> None:
        with self._completed_lock:
            if token > self._completed:
                self._completed = token

    def reclaim(self, slot: int, owner: int) -> bool:
        """Free ``slot`` if ``owner`` still holds it and is dead. True if freed."""
        self._check_open()
        if owner_alive(owner):
            return False
        # acq_rel CAS: only one reclaimer wins, and nobody else's claim is undone.
        ok, _ = atomic.compare_exchange(
            self._owners[slot], owner, 0, atomic.ACQ_REL, atomic.ACQUIRE
        )
        return ok

    def poll(self, token: int, *, check_owners: bool = True) -> bool:
        """Has a full grace period passed since ``start_poll()`` returned ``token``?"""
        self._check_open()
        if token <= self._completed:
            return True
        if token > self.counter():
            # Never handed out: "complete" now, it would end every later
            # grace period up to it at once (see _completed).
            raise BadInput(f"grace-period token {token} was never started: the "
                           f"counter is at {self.counter()}")
        blockers = self.blockers(token)
        if blockers and check_owners:
            blockers = [(s, o) for s, o in blockers if not self.reclaim(s, o)]
        if blockers:
            return False
        self._complete(token)
        return True

    def wait(self, token: int, timeout: float | None = None) -> None:
        """Block until the grace period ``token`` has elapsed (see synchronize).

        Spins a little, then sleeps, doubling from 20 us to 2 ms; checks the
        liveness of blocking owners every 5 ms.  GraceTimeout (naming the
        slots and pids) after ``timeout`` seconds (BadInput unless None or
        a finite number >= 0)."""
        timeout = check_timeout(timeout)
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        spins = 0
        sleep = _SLEEP_MIN
        next_check = time.monotonic() + _LIVENESS_EVERY
        while True:
            if token <= self._completed:
                return
            blockers = self.blockers(token)
            if not blockers:
                self._complete(token)
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
        self._check_open()
        self._callbacks.append(fn)  # deque.append: safe between threads
        self.run_callbacks()

    def run_callbacks(self, block: bool = False, timeout: float | None = None) -> int:
        """Run the callbacks whose grace period has passed; start the next
        batch.  With ``block``, wait until every queued callback has run.

        Without ``block`` it is cheap to call often (serve(), quiescent()):
        a batch still waiting is looked at again only after a back-off that
        doubles up to 10 ms, and its owners' liveness is checked at most
        every 50 ms, so a long reader costs a waiting caller little CPU."""
        timeout = check_timeout(timeout)
        self._check_open()
        me = threading.get_ident()
        if self._running_in == me:
            # Called from a callback (its call_rcu): the pass under way starts
            # the new callback's grace period once the current batch is done.
            # Running on here would run a new batch before its grace period.
            if block:
                raise RcuMisuse("barrier() inside an RCU callback would wait for itself")
            return 0
        if not self._cb_lock.acquire(blocking=block,
                                     timeout=-1 if timeout is None or not block else timeout):
            if block:
                raise GraceTimeout(f"callbacks still running in another thread after "
                                   f"{timeout} s")
            return 0  # another thread is running them
        self._running_in = me
        try:
            return self._run_callbacks(block, timeout)
        finally:
            self._running_in = 0
            self._cb_lock.release()

    def _run_callbacks(self, block: bool, timeout: float | None) -> int:
        ran = 0
        while True:
            if self._batch:
                if block:
                    self.wait(self._batch_token, timeout)
                elif not self._batch_done():
                    return ran
                while self._batch:
                    fn = self._batch.popleft()
                    ran += 1
                    try:
                        fn()
                    except Exception as e:  # the owner's, not this caller's
                        self._errors.append(e)
            if not self._callbacks:
                return ran
            # One grace period for every callback queued so far.
            self._batch, self._callbacks = self._callbacks, deque()
            self._batch_token = self.start_poll()
            self._next_look = 0.0
            self._look_every = _SLEEP_MIN

    def _batch_done(self) -> bool:
        """Poll the batch's grace period, with the back-off of run_callbacks."""
        now = time.monotonic()
        if now < self._next_look:
            return False
        liveness = now >= self._next_liveness
        if liveness:
            self._next_liveness = now + _CALLBACK_LIVENESS
        if self.poll(self._batch_token, check_owners=liveness):
            return True
        self._next_look = now + self._look_every
        self._look_every = min(self._look_every * 2, _CALLBACK_POLL_MAX)
        return False

    def drop_callbacks(self, reapable_only: bool = False) -> None:
        """Forget queued callbacks: every one (a forked child's copy of its
        parent's, or after drain()), or only the library's (destroy(): the
        segments they would unlink are gone)."""
        if not reapable_only:
            self._callbacks.clear()
            self._batch.clear()
            return
        for q in (self._callbacks, self._batch):
            keep = [fn for fn in q if not isinstance(fn, Reapable)]
            q.clear()
            q.extend(keep)

    @property
    def pending(self) -> int:
        """How many callbacks wait for their grace period."""
        return len(self._callbacks) + len(self._batch)

    @property
    def pending_owned(self) -> int:
        """How many of them are the caller's (not Reapable): what teardown
        must run or report."""
        return sum(1 for q in (self._callbacks, self._batch)
                   for fn in q if not isinstance(fn, Reapable))

    def take_errors(self) -> list[Exception]:
        """The exceptions callbacks raised since the last call (and forget them)."""
        errors, self._errors = self._errors, []
        return errors

    def drain(self, timeout: float | None = 0.0) -> GraceTimeout | None:
        """Teardown's rcu_barrier: run every callback whose grace period ends
        within ``timeout`` seconds (callbacks they queue included).  Never
        raises a callback's error (take_errors has them); returns the
        GraceTimeout that stopped it, or None.  Waits only while callbacks of
        the caller's are queued: the library's alone are left to an adopter."""
        self._check_open()
        self.run_callbacks()
        if not self.pending_owned:
            return None
        try:
            self.run_callbacks(block=True, timeout=timeout)
        except GraceTimeout as e:
            return e
        return None

    def report(self, where: str = "", stopped: GraceTimeout | None = None) -> None:
        """After drain(): raise what the owner must hear (the callbacks' errors
        as CallbackFailed, those that could not run as CallbacksDropped;
        both: a CallbackFailed holding the CallbacksDropped too)."""
        self._check_open()
        errors: list[Exception] = self.take_errors()
        left = self.pending_owned
        if left:
            why = f"{where}: {stopped}" if stopped is not None else where
            errors.append(CallbacksDropped(left, why))
        if len(errors) == 1 and isinstance(errors[0], CallbacksDropped):
            raise errors[0]
        if errors:
            raise CallbackFailed.of(errors, where)

    def readers(self) -> list[ReaderInfo]:
        """Every claimed slot: slot, pid, alive, epoch."""
        self._check_open()
        out = []
        for i in range(self.max_readers):
            owner = atomic.load(self._owners[i], atomic.ACQUIRE)
            if owner:
                ctr = atomic.load(self._ctrs[i], atomic.ACQUIRE)
                out.append(ReaderInfo(i, layout.owner_pid(owner), owner_alive(owner), ctr))
        return out
