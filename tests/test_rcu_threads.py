"""rcu.py's readers per thread: one handle shared between threads (issue 10, part 2).

As liburcu registers threads, every thread that uses a map is a reader of
its own: its own slot (claimed on first use, freed when the thread ends or
the handle closes), its own nesting and table view.  NoReaderSlot when the
slots run out.  Here:

- a grace period started in one thread waits for a section in another;
- each thread holds its own slot while it lives, and gives it back when it
  ends, or when the handle closes;
- slots run out per thread, and come back when a thread ends;
- an rcutorture-style run with reader threads sharing one Rcu, a reader
  in another process and the updater in this process's main thread; the
  same test with a grace period that does not wait must be caught.

Threads wait on threading.Events with timeouts; no sleeps.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import rcu_workers as RW

import shmdirty as sd
from shmdirty import atomic, layout, segment
from shmdirty.rcu import GracePeriods, Rcu
from shmdirty.segment import Segment

pytestmark = pytest.mark.timeout(90)

MIG = sd.DIRTY_MEMORY_MIGRATION
WAIT = 30.0


class Parked:
    """A thread that runs ``enter`` (which uses the handle), sets
    ``inside``, waits for ``leave``, then runs ``exit_`` and ends."""

    def __init__(self, enter: Callable[[], Any], exit_: Callable[[], Any] = lambda: None,
                 name: str = "parked") -> None:
        self.inside, self.leave = threading.Event(), threading.Event()
        self.error: list[str] = []

        def run() -> None:
            try:
                enter()
                self.inside.set()
                assert self.leave.wait(WAIT), "never told to leave"
                exit_()
            except BaseException:
                self.error.append(traceback.format_exc())
                self.inside.set()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        assert self.inside.wait(WAIT), "the thread never got in"
        assert not self.error, self.error[0]

    def stop(self) -> None:
        """Teardown: let it leave, whatever state the test left it in."""
        self.leave.set()
        self.thread.join(WAIT)

    def end(self) -> None:
        self.leave.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        assert not self.error, self.error[0]


def slots_of_pid(dm: sd.DirtyMemory) -> list[int]:
    return sorted(r.slot for r in dm.rcu.readers() if r.pid == os.getpid())


@contextmanager
def outside_view(name: str) -> Iterator[Any]:
    """The map's reader slots, seen through a header mapping that holds no slot."""
    hdr = Segment.attach(layout.header_name(name), layout.KIND_HEADER)
    n = hdr.words.load(layout.H_MAX_READERS, atomic.RELAXED)
    try:
        yield GracePeriods(hdr, n)
    finally:
        hdr.close()


@pytest.fixture
def bare_header(map_name: str) -> Iterator[Segment]:
    """A header segment with 8 reader slots and no DirtyMemory."""
    hdr = Segment.create(layout.header_name(map_name), layout.header_size(8),
                         layout.KIND_HEADER)
    hdr.words.store(layout.H_GP, 1)
    hdr.words.store(layout.H_MAX_READERS, 8)
    hdr.seal()
    try:
        yield hdr
    finally:
        hdr.close()
        segment.unlink(hdr.name)


@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
def test_grace_period_in_one_thread_waits_for_a_reader_in_another(
        bare_header: Segment, flavor: str) -> None:
    """One Rcu: a thread parks inside a section (memb) or online between
    quiescent points (qsbr); the main thread's grace period waits for it."""
    r = Rcu(bare_header, 8, flavor)
    t = None
    try:
        if flavor == "memb":
            t = Parked(r.read_lock, r.read_unlock)
        else:
            t = Parked(r.thread_online, r.quiescent)
        tok = r.start_poll()
        assert not r.poll(tok), "the grace period did not wait for the other thread"
        with pytest.raises(sd.GraceTimeout, match=f"pid {os.getpid()}"):
            r.synchronize(timeout=0.2)
        t.end()
        r.synchronize(timeout=WAIT)
        assert r.poll(tok)
    finally:
        if t is not None:
            t.stop()
        r.unregister()


def test_sync_in_one_thread_waits_for_a_section_in_another(map_name: str) -> None:
    """The same through one DirtyMemory handle and read_section()."""
    dm = sd.DirtyMemory.create(1 << 20, name=map_name)
    t = None
    try:
        sec = dm.read_section()
        t = Parked(lambda: (sec.__enter__(), dm.set_dirty_flag(0, MIG)),
                   lambda: sec.__exit__(None, None, None))
        tok = dm.rcu.start_poll()
        assert not dm.rcu.poll(tok), "the grace period did not wait for the other thread"
        with pytest.raises(sd.GraceTimeout, match=f"pid {os.getpid()}"):
            dm.rcu.synchronize(timeout=0.2)
        assert dm.get_dirty_flag(0, MIG)    # this thread's own sections still work
        t.end()
        dm.rcu.synchronize(timeout=WAIT)
        assert dm.rcu.poll(tok)
    finally:
        if t is not None:
            t.stop()
        dm.destroy()


def test_each_thread_has_its_own_slot_until_it_ends(map_name: str) -> None:
    dm = sd.DirtyMemory.create(1 << 20, max_readers=8, name=map_name)
    try:
        main = slots_of_pid(dm)
        assert len(main) == 1
        a = Parked(lambda: dm.set_dirty_flag(0, MIG), name="a")
        b = Parked(lambda: dm.get_dirty_flag(0, MIG), name="b")
        held = slots_of_pid(dm)
        assert len(held) == 3 and set(main) <= set(held), held
        a.end()
        assert len(slots_of_pid(dm)) == 2, "an ended thread kept its slot"
        b.end()
        assert slots_of_pid(dm) == main
    finally:
        dm.destroy()


def test_threads_run_out_of_slots_and_get_them_back(map_name: str) -> None:
    dm = sd.DirtyMemory.create(1 << 20, max_readers=2, name=map_name)
    try:
        a = Parked(lambda: dm.set_dirty_flag(0, MIG), name="a")   # the second slot
        err: list[BaseException] = []

        def third() -> None:
            try:
                dm.set_dirty_flag(0, MIG)
            except BaseException as e:
                err.append(e)

        t = threading.Thread(target=third)
        t.start()
        t.join(WAIT)
        assert err and isinstance(err[0], sd.NoReaderSlot), err
        a.end()
        err.clear()
        t = threading.Thread(target=third)
        t.start()
        t.join(WAIT)
        assert not err, err
    finally:
        dm.destroy()


def test_close_frees_every_threads_slot(map_name: str) -> None:
    """An attached handle used by two threads: closing it (in the main
    thread, the other thread alive and outside any section) frees both
    slots; the other thread's next op raises ShmDirtyError."""
    coord = sd.DirtyMemory.create(1 << 20, max_readers=8, name=map_name)
    err: list[BaseException] = []

    def again() -> None:
        try:
            dm.set_dirty_flag(0, MIG)
        except BaseException as e:
            err.append(e)

    t = None
    try:
        with outside_view(map_name) as view:
            dm = sd.DirtyMemory.attach(map_name)   # shares this process's slots
            dm.set_dirty_flag(0, MIG)
            coord.close()                           # dm is the last handle now
            t = Parked(lambda: dm.set_dirty_flag(0, MIG))
            during = {r.slot for r in view.readers()}
            assert len(during) == 2, during
            dm.close()
            assert {r.slot for r in view.readers()} == set(), "close left a thread's slot"
            t.leave.set()
            t2 = threading.Thread(target=again)
            t2.start()
            t2.join(WAIT)
            assert err and isinstance(err[0], sd.ShmDirtyError), err
    finally:
        if t is not None:
            t.stop()
        for n in segment.list_segments(map_name):
            segment.unlink(n)


# --- torture: reader threads sharing one Rcu, another process, and the updater ------------
NTHREADS = 3


def _thread_torture(spawn_ctx: Any, children: list[Any], map_name: str, flavor: str,
                    updates: int) -> list[dict[str, Any]]:
    """One run: NTHREADS reader threads share this process's Rcu ``r``; one
    reader process has its own; the main thread is the updater, with the
    same ``r``.  After each grace period the old object is poisoned and
    unlinked.  Returns the readers' reports (a thread that raised reports
    one violation per exception)."""
    n = NTHREADS + 3
    hdr = Segment.create(layout.header_name(map_name), layout.header_size(n),
                         layout.KIND_HEADER)
    hdr.words.store(layout.H_GP, 1)
    hdr.words.store(layout.H_MAX_READERS, n)
    hdr.seal()
    w = hdr.words
    objects: list[Segment] = []
    threads: list[threading.Thread] = []
    reports: list[dict[str, Any]] = []
    procs = []

    def publish(gen: int) -> Segment:
        obj = Segment.create(RW.object_name(map_name, gen), RW.OBJ_SIZE, layout.KIND_TABLE, gen)
        obj.words.store(RW.O_GEN, gen, atomic.RELAXED)
        obj.words.store(RW.O_MARK, RW.LIVE, atomic.RELAXED)
        obj.seal()
        objects.append(obj)
        w.store(RW.PUBLISHED, gen, atomic.SEQ_CST)   # the publication (seq_cst)
        return obj

    r = None
    old_switch = sys.getswitchinterval()
    try:
        old = publish(1)
        r = Rcu(hdr, n, flavor)
        started = threading.Semaphore(0)

        def reader() -> None:
            try:
                assert r is not None
                if flavor == "qsbr":
                    r.thread_online()
                started.release()
                reports.append(RW.torture_loop(hdr, r, map_name, flavor, 8))
            except BaseException:
                reports.append({"violations": 1, "sections": 0, "reads": 0,
                                "hist": [0] * RW.PIPE_LEN,
                                "examples": [traceback.format_exc()], "pid": os.getpid()})
                started.release()

        recv, send = spawn_ctx.Pipe(duplex=False)
        p = spawn_ctx.Process(target=RW.torture_reader, args=(map_name, n, flavor, 8, send),
                              daemon=True)
        children.append(p)
        procs.append(p)
        p.start()
        send.close()
        assert recv.poll(WAIT) and recv.recv()[0] == "ready"
        for i in range(NTHREADS):
            t = threading.Thread(target=reader, name=f"reader-{i}", daemon=True)
            threads.append(t)
            t.start()
        for _ in threads:
            assert started.acquire(timeout=WAIT)
        sys.setswitchinterval(1e-4)   # threads interleave often
        for gen in range(2, updates + 2):
            new = publish(gen)
            try:
                r.synchronize(timeout=10)
            except sd.RcuMisuse as e:
                # Only a broken variant (threads sharing one reader) gets
                # here: the updater found "itself" inside a reader's section.
                reports.append({"violations": 1, "sections": 0, "reads": 0,
                                "hist": [0] * RW.PIPE_LEN, "examples": [repr(e)],
                                "pid": os.getpid()})
                break
            old.words.store(RW.O_MARK, RW.POISON, atomic.SEQ_CST)
            objects.remove(old)
            old.close()
            segment.unlink(old.name)
            old = new
        w.store(RW.STOP, 1, atomic.RELEASE)
        for t in threads:
            t.join(WAIT)
            assert not t.is_alive()
        assert recv.poll(WAIT), "the reader process did not report"
        reports.append(recv.recv())
        p.join(WAIT)
        assert p.exitcode == 0
        return reports
    finally:
        sys.setswitchinterval(old_switch)
        w.store(RW.STOP, 1, atomic.RELEASE)
        for t in threads:
            t.join(WAIT)
        for p in procs:
            p.join(WAIT)
            if p.is_alive():
                p.kill()
                p.join(WAIT)
        if r is not None:
            r.unregister()
        for obj in objects:
            obj.close()
            segment.unlink(obj.name)
        hdr.close()
        for name in segment.list_segments(map_name):
            segment.unlink(name)


@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
@pytest.mark.parametrize("how", ["grace", "busted", "one-reader"])
def test_thread_torture(spawn_ctx: Any, children: list[Any], map_name: str, flavor: str,
                        how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``busted``: a grace period that does not wait; ``one-reader``: every
    thread of the process shares the first thread's reader (one slot, one
    nesting: the bug issue 10 fixed).  Both must be caught."""
    broken = how != "grace"
    if how == "busted":
        monkeypatch.setattr(GracePeriods, "wait", lambda self, token, timeout=None: None)
    elif how == "one-reader":
        first: dict[Rcu, Any] = {}

        def one_reader(self: Rcu) -> Any:
            if self not in first:
                first[self] = self._new_reader()   # the creating thread's, for all
            return first[self]

        monkeypatch.setattr(Rcu, "reader", property(one_reader))
    seen = []
    for _attempt in range(5 if broken else 1):
        reports = _thread_torture(spawn_ctx, children, map_name, flavor, updates=1000)
        violations = sum(x["violations"] for x in reports)
        hist = [sum(x["hist"][i] for x in reports) for i in range(RW.PIPE_LEN)]
        seen.append((violations, hist))
        print(f"\n{flavor} thread torture, {how}: pipe-age histogram {hist}, "
              f"{violations} violations")
        if broken and violations:
            break
    if broken:
        assert violations > 0, f"the broken variant {how} went unnoticed: {seen}"
        return
    assert violations == 0, [x["examples"] for x in reports if x["violations"]]
    assert hist[2:] == [0] * (RW.PIPE_LEN - 2), f"pipe age above 1: {hist}"
    assert hist[1] > 0, f"no section ever overlapped an update: {hist}"
    for x in reports:
        assert x["sections"] >= 50, f"a reader barely ran: {x}"
