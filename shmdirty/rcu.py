"""Read-copy-update across processes and threads: reader slots and section entry.

The protocol is QEMU's util/rcu.c and liburcu's, with shared-memory words
for their variables:

- ``gp`` is a 64-bit grace-period counter in the header.  It starts at 1 and
  only grows, so it never wraps and one wait per grace period suffices.
- Every reader claims a slot: an owner word (pid and kernel start time, one
  CAS) and ``ctr``.  ``ctr`` is 0 outside a read-side section, and otherwise
  the value of ``gp`` the reader saw when its section began.
- A grace period advances ``gp`` to ``target`` and waits until every claimed
  slot holds 0 or a value >= ``target``: every section that began before the
  advance has ended.  Concurrent grace periods overlap freely.  Waiting,
  polling and call_rcu are grace.py's, written once for every waiter.

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
  ``read_unlock`` stores 0.
- ``qsbr``: an online reader is always inside a section, except at
  ``quiescent()`` (store the current ``gp`` if it moved) and while offline.

Readers are per thread, as liburcu registers threads: an Rcu (one per map
per process) gives every thread that uses it a ``Reader`` of its own, with
its own slot (claimed on first use, freed when the thread ends, when it
calls ``unregister()``, or when the Rcu closes), nesting and counter.  So a
grace period started in one thread waits for a section in another.  A slot's
owner word names the process (threads have no start time a waiter could
check); a thread's slot is freed by the thread itself, as it ends.

fork(): a forked child inherits the parent's Readers, which point at the
parent's slots.  An at-fork handler detaches them in the child: the child's
first use claims a slot of its own, it never stores into or frees a slot of
its parent, and the parent's call_rcu callbacks are dropped (they are the
parent's work).  A child forked inside a read-side section starts outside
any section: the parent's section does not protect the child (its slot is
the parent's), so the child's next op opens a section of its own, and
leaving the inherited sections (a ``with`` block unwinding in an
``os.fork()`` child) does nothing.

A reader that dies inside a section must not stall anyone: a waiter checks
the owner of a slot that holds it up, and a slot whose owner is gone, a
zombie, or a different process reusing the pid (another start time) is
reclaimed.  Once closed, an Rcu and its GracePeriods raise HandleClosed
rather than reach the unmapped header.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import NoReturn, Protocol, cast

import numpy as np

from . import atomic
from .errors import (
    BadInput,
    CallbackFailed,
    HandleClosed,
    NoReaderSlot,
    RcuMisuse,
    check_timeout,
)
from .grace import (
    GracePeriods,
    ReaderInfo,
    my_owner_word,
    owner_alive,
    start_ticks,
)
from .segment import Segment

__all__ = ["FLAVORS", "GracePeriods", "Rcu", "Reader", "ReaderInfo", "my_owner_word",
           "owner_alive", "start_ticks"]

FLAVORS = ("memb", "qsbr")
CLOSE_TIMEOUT = 5.0  # how long close() waits for queued callbacks' grace periods (s)
_SEQ_CST, _RELEASE = atomic.SEQ_CST, atomic.RELEASE


# --- one thread's reader -----------------------------------------------------------------
# The fields DirtyMemory.set_dirty_flag reads: C members of the kernel's
# ReaderCore where it was built (its C code reads them), else slots here.
_HOT = () if atomic.READER_BASE is not object else atomic.READER_FIELDS


class Reader(atomic.READER_BASE):  # type: ignore[misc]
    """One thread's slot and state: the section entry of both flavors.

    Outside rcu.py its fields are read-only: ``nesting`` (depth of the
    current section, 0 outside), ``online`` (qsbr: inside a section except
    at quiescent points and while offline), ``seen`` (the grace-period
    counter this reader last observed; a caller that sees it move re-reads
    what it caches of published words).  Plain attributes, not properties:
    DirtyMemory's hottest path reads them per op (in C on the kernel,
    shmdirty/_kernel_src/cores.c ReaderCore).  ``slot`` is -1 until the first use
    claims one (and again once it is freed)."""

    __slots__ = _HOT + ("flavor", "inherited", "owner", "left", "_rcu", "_memb", "_store",
                        "_load", "_gp_ptr", "_ctr", "_section_online", "_own", "__weakref__")

    def __init__(self, rcu: Rcu) -> None:
        self.flavor = rcu.flavor
        self.slot = -1
        self.nesting = 0        # > 0 inside a section
        self.inherited = 0      # sections the parent was in at fork(): leaving
                                # them does nothing (see _detach)
        self.online = False
        self.seen = 0           # set when a slot is claimed
        self.owner = 0          # the owner word the slot was claimed with
        self.left = False       # unregister()ed: no slot is claimed again
        self._rcu = rcu
        self._memb = rcu.flavor == "memb"
        # Hot path: the backend's ops, bound once (on the kernel backend
        # these are the C functions themselves).
        self._store = atomic.store
        self._load = atomic.load
        self._gp_ptr = rcu.gp._gp
        # memb with a slot: (this slot's counter, the grace-period counter),
        # the two words of a read-side section run in C (shmdirty/_kernel_src/
        # cores.c memb_set_in stores and loads them exactly as read_lock /
        # read_unlock do, with the GIL held); only for a caller outside any
        # section (nesting 0).  None otherwise.
        self.section_words: tuple[int, int] | None = None
        # A private word: ``_ctr`` points here while no slot is held, so a
        # stray store never lands in somebody else's slot.
        self._own = atomic.Words(np.zeros(1, np.uint64))
        self._ctr: atomic.Ptr = self._own.ptr(0)
        self._section_online = False  # qsbr: went online for one section

    @property
    def ctr_ptr(self) -> atomic.Ptr:
        """The address of this reader's ``ctr`` word (tests hook stores to it)."""
        return self._ctr

    def _claimed(self, slot: int, ctr: atomic.Ptr, owner: int) -> None:
        self.slot = slot
        self.owner = owner
        self._ctr = ctr
        self.section_words = (ctr, self._gp_ptr) if self._memb else None
        # A dead owner may have left ctr set; nobody else writes it now.
        atomic.store(self._ctr, 0, atomic.RELEASE)
        self.seen = atomic.load(self._gp_ptr, atomic.SEQ_CST)
        if self.flavor == "qsbr":
            self.thread_online()

    def _released(self) -> None:
        # release: the slot reads 0 only after every access of ours.
        atomic.store(self._ctr, 0, atomic.RELEASE)
        self.nesting = 0
        self._detach()

    def _detach(self) -> None:
        """Forget the slot without touching it (it is not ours any more)."""
        self.slot = -1
        self._ctr = self._own.ptr(0)
        self.section_words = None
        self.online = False
        self._section_online = False
        # Forked inside a section: the child is outside any (module doc).
        self.inherited += self.nesting
        self.nesting = 0

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
            self._rcu._claim(self)   # first use in this thread (or after a fork)
        self.nesting = 1
        if self._memb:
            # The C twin is memb_open in shmdirty/_kernel_src/cores.c (the C
            # fast paths' own section, the same orders, tested side by side).
            # Store the counter value last seen, then load the counter, both
            # seq_cst: the reader's half of the Dekker pair (module doc).  The
            # value stored may be old; that only makes a grace period wait
            # for this section, and the next section stores the fresh one.
            seen = self.seen
            self._store(self._ctr, seen, _SEQ_CST)
            g = self._load(self._gp_ptr, _SEQ_CST)
            if g != seen:
                # The counter moved: store the fresh value too, so a grace
                # period that began before this section does not wait for it
                # (the caller re-reads what was published: ``seen`` moved).
                self.seen = g
                self._store(self._ctr, g, _SEQ_CST)
        elif not self.online:
            self.thread_online()
            self._section_online = True

    def read_unlock(self) -> None:
        """Leave a read-side section."""
        n = self.nesting - 1
        if n > 0:
            self.nesting = n
            return
        if n < 0:
            if not self.inherited:
                raise RcuMisuse("read_unlock without a matching read_lock")
            self.inherited -= 1   # leaving a section inherited through fork
            return
        self.nesting = 0
        if self._memb:
            # release: every access of the section happens before a waiter
            # that sees 0 (the C twin: memb_close, shmdirty/_kernel_src/cores.c).
            self._store(self._ctr, 0, _RELEASE)
        elif self._section_online:
            self._section_online = False
            self.thread_offline()

    # --- qsbr ---------------------------------------------------------------------
    def thread_online(self) -> None:
        """qsbr: become a reader that is always inside a section."""
        if self.slot < 0:
            self._rcu._claim(self)   # a qsbr claim goes online
            if self.online:
                return
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
        if self.slot < 0:
            self._rcu._check_open()
            return  # no slot: offline already
        # release: as read_unlock.
        atomic.store(self._ctr, 0, atomic.RELEASE)
        self.online = False

    def quiescent(self) -> bool:
        """qsbr: a quiescent point.  Returns True if a grace period had
        started (the caller re-reads published words); writes nothing else."""
        if self.nesting:
            raise RcuMisuse("quiescent() inside a read-side section")
        if self.slot < 0:
            # First use in this thread: a qsbr reader claims and goes online.
            if self.flavor != "qsbr":
                self._rcu._check_open()
                return False
            self._rcu._claim(self)
            return True
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


class Local(Protocol):
    """An Rcu's per-thread slot (a plain ``threading.local``: a subclass
    makes every lookup slower): this thread's Reader and its _ThreadExit,
    both missing (AttributeError) until the thread's first use.  The view
    reads ``reader`` once per op (in C on the kernel, by that name)."""

    reader: Reader
    exit: _ThreadExit


class Closed:
    """Stands in for the Rcu, the thread-local readers and the Coordinator
    of a closed handle (handles.CLOSED): every use fails clearly.  Reading
    any attribute it lacks raises HandleClosed (typed NoReturn: an
    ``Rcu | Closed`` field reads as the Rcu's type)."""

    nesting = 0
    online = False
    seen = -2
    flavor = "closed"

    def read_lock(self) -> None:
        raise HandleClosed("this DirtyMemory handle is closed: attach again")

    def __getattr__(self, name: str) -> NoReturn:
        raise HandleClosed("this DirtyMemory handle is closed: attach again")


class _ThreadExit:
    """Kept in a thread's slot of ``Rcu._local`` next to its Reader: when the
    thread ends, Python drops both and this frees the reader's slot."""

    __slots__ = ("rcu", "reader")

    def __init__(self, rcu: Rcu, reader: Reader) -> None:
        self.rcu = weakref.ref(rcu)
        self.reader = reader

    def __del__(self) -> None:
        rcu = self.rcu()
        if rcu is not None:
            rcu._thread_ended(self.reader)


# Every live Rcu of this process, for the at-fork handler.
_all: weakref.WeakSet[Rcu] = weakref.WeakSet()


class Rcu:
    """One map's readers in this process (one per thread) and its grace periods."""

    def __init__(self, header: Segment, max_readers: int, flavor: str = "memb") -> None:
        if flavor not in FLAVORS:
            raise BadInput(f"flavor {flavor!r} is not one of {FLAVORS}")
        self.flavor = flavor
        self.gp = GracePeriods(header, max_readers)
        self._lock = threading.Lock()        # guards _claimed and slot claims
        self._local = cast(Local, threading.local())  # .reader, .exit: this thread's
        self._claimed: set[Reader] = set()   # readers holding a slot
        self._closed = False
        self._pid = os.getpid()
        _all.add(self)
        self._claim(self.reader)  # the creating thread: NoReaderSlot now, not later

    # --- this thread's reader ---------------------------------------------------------
    @property
    def reader(self) -> Reader:
        """This thread's Reader (a new one, without a slot yet, on first use)."""
        try:
            return self._local.reader
        except AttributeError:
            return self._new_reader()

    def _new_reader(self) -> Reader:
        self._check_open()
        r = Reader(self)
        self._local.reader = r
        self._local.exit = _ThreadExit(self, r)
        return r

    @property
    def slot(self) -> int:
        """This thread's slot index, -1 before its first use or once freed."""
        return self.reader.slot

    @property
    def nesting(self) -> int:
        """Depth of this thread's current read-side section (0 outside)."""
        return self.reader.nesting

    @property
    def online(self) -> bool:
        """qsbr: this thread is inside a section except at quiescent points."""
        return self.reader.online

    @property
    def seen(self) -> int:
        """The grace-period counter value this thread last observed."""
        return self.reader.seen

    def read_lock(self) -> None:
        """Enter a read-side section in this thread (see Reader.read_lock)."""
        self.reader.read_lock()

    def read_unlock(self) -> None:
        """Leave this thread's read-side section."""
        self.reader.read_unlock()

    def thread_online(self) -> None:
        """qsbr: this thread becomes a reader that is always inside a section."""
        self.reader.thread_online()

    def thread_offline(self) -> None:
        """qsbr: this thread stops being a reader until thread_online()."""
        self.reader.thread_offline()

    def quiescent(self) -> bool:
        """qsbr: a quiescent point of this thread (see Reader.quiescent)."""
        return self.reader.quiescent()

    def offline(self) -> AbstractContextManager[None]:
        """``with rcu.offline():`` wait offline (see Reader.offline)."""
        self._check_open()
        return self.reader.offline()

    @contextmanager
    def read_section(self) -> Iterator[None]:
        """``with rcu.read_section():`` one read-side section."""
        r = self.reader
        r.read_lock()
        try:
            yield
        finally:
            r.read_unlock()

    # --- slots ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise HandleClosed(f"{self.gp.header.name}: this Rcu is closed (its handle "
                               "was closed or destroyed): attach again")

    def _claim(self, r: Reader) -> None:
        """Give ``r`` (this thread's reader) a slot of its own."""
        self._check_open()
        if r.left:
            raise RcuMisuse("this thread unregister()ed from the map: it has no slot")
        gp = self.gp
        n = gp.max_readers
        owner = my_owner_word()
        with self._lock:
            start = (os.getpid() + len(self._claimed)) % n
            for attempt in range(2):
                for k in range(n):
                    i = (start + k) % n
                    # acq_rel: a claim orders after the previous owner's release.
                    ok, _ = atomic.compare_exchange(gp._owners[i], 0, owner,
                                                    atomic.ACQ_REL, atomic.ACQUIRE)
                    if ok:
                        self._claimed.add(r)
                        r._claimed(i, gp._ctrs[i], owner)
                        return
                if attempt == 0:
                    for i in range(n):
                        o = atomic.load(gp._owners[i], atomic.ACQUIRE)
                        if o:
                            gp.reclaim(i, o)
        pids = sorted({x.pid for x in gp.readers()})
        raise NoReaderSlot(
            f"all {n} reader slots of {gp.header.name} are claimed by live processes "
            f"{pids} (one slot per thread that uses the map); close a handle, end a "
            "thread, or create the map with a larger max_readers")

    def _release(self, r: Reader) -> None:
        """Free ``r``'s slot (called with _lock held)."""
        self._claimed.discard(r)
        slot = r.slot
        if slot < 0:
            return
        if r.owner != my_owner_word():
            r._detach()  # the parent's slot, seen from a forked child: not ours
            return
        r._released()
        atomic.compare_exchange(self.gp._owners[slot], r.owner, 0,
                                atomic.ACQ_REL, atomic.RELAXED)

    def _thread_ended(self, r: Reader) -> None:
        if self._closed or os.getpid() != self._pid or r.slot < 0:
            return  # freed already, or a forked child cleaning up the parent's threads
        with self._lock:
            self._release(r)

    def unregister(self) -> None:
        """This thread leaves: its slot is freed and it claims none again
        (idempotent).  Must be outside any section."""
        try:
            r = self._local.reader
        except AttributeError:
            return
        if r.nesting > 0:
            raise RcuMisuse("unregister() inside a read-side section")
        if not self._closed:
            with self._lock:
                self._release(r)
        r.left = True

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Free every thread's slot, run the callbacks that can run (see
        finish); every later use raises HandleClosed (idempotent).
        RcuMisuse if a thread is inside a section."""
        self.leave()
        self.finish(timeout)

    def finish(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """After leave(): liburcu's rcu_barrier at exit.  Runs every queued
        callback whose grace period ends within ``timeout`` seconds (this
        process's slots are free, so none waits for this process), then
        closes the grace periods.  Raises CallbackFailed with the callbacks'
        errors, CallbacksDropped naming how many could not run (idempotent)."""
        timeout = check_timeout(timeout)
        gp = self.gp
        if gp.closed:
            return
        try:
            stopped = gp.drain(timeout)
        finally:
            # report() reads the queue: close (drop it) only after.
            try:
                gp.report(f"{gp.header.name} (closing)", stopped)
            finally:
                gp.close()

    def leave(self) -> None:
        """Free every thread's slot; no reader of this Rcu claims one again
        (idempotent).  RcuMisuse if a thread is inside a section."""
        if self._closed:
            return
        with self._lock:
            inside = [r for r in self._claimed if r.nesting > 0]
            if inside:
                raise RcuMisuse(f"{len(inside)} thread(s) of this process are inside a "
                                f"read-side section of {self.gp.header.name}")
            for r in list(self._claimed):
                self._release(r)
            self._closed = True

    def sections_open(self) -> int:
        """How many of this process's threads are inside a read-side section."""
        with self._lock:
            return sum(1 for r in self._claimed if r.nesting > 0)

    def _forked(self) -> None:
        """In a forked child (see the module doc)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        for r in self._claimed:
            r._detach()
        self._claimed = set()
        self.gp.forked()

    @property
    def closed(self) -> bool:
        return self._closed

    # --- grace periods ------------------------------------------------------------
    def synchronize(self, timeout: float | None = None) -> None:
        """Wait for a full grace period: every section begun before, in any
        thread or process, has ended.

        TimeoutError (naming the slots and pids) after ``timeout`` seconds;
        BadInput unless ``timeout`` is None or a finite number >= 0."""
        timeout = check_timeout(timeout)
        r = self.reader
        r.check_outside("synchronize()")
        with r.offline():
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
        """Wait until every callback queued by this process has run (liburcu's
        rcu_barrier).  GraceTimeout after ``timeout`` seconds; BadInput unless
        it is None or a finite number >= 0.  CallbackFailed (an ExceptionGroup)
        if callbacks raised since the last barrier, wherever they ran (a
        serve_once(), a quiescent()): errors go to the owner, not to the
        unrelated call that happened to run them."""
        timeout = check_timeout(timeout)
        r = self.reader
        r.check_outside("barrier()")
        with r.offline():
            self.gp.run_callbacks(block=True, timeout=timeout)
        errors = self.gp.take_errors()
        if errors:
            raise CallbackFailed.of(errors, self.gp.header.name)

    def readers(self) -> list[ReaderInfo]:
        """slot, pid, alive, epoch for every claimed slot."""
        return self.gp.readers()


def _after_fork_in_child() -> None:
    for rcu in list(_all):
        rcu._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
