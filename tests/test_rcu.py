"""Cross-process RCU (shmdirty/rcu.py): grace periods against real reader
processes, crash safety, both flavors, and an rcutorture-style test that must
also catch a deliberately broken grace period.

Every test builds a bare header segment (no DirtyMemory) named after the
``map_name`` fixture, whose teardown unlinks ``shmdirty-<map_name>-*``; the
torture test also unlinks its objects itself as it goes and in ``finally``.
Readers in other processes are ``rcu_workers.client`` processes driven over a
pipe: a reader "parks" inside a section by blocking in ``recv()``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import rcu_workers as W

from shmdirty import atomic, layout, rcu, segment
from shmdirty.errors import GraceTimeout, NoReaderSlot, RcuMisuse, ShmDirtyError
from shmdirty.rcu import GracePeriods, Rcu
from shmdirty.segment import Segment

ANSWER = 30  # seconds to wait for a worker's reply before failing


class WorkerError(Exception):
    """A command raised in the worker: (exception type name, message)."""


class Client:
    """A reader in another process (rcu_workers.client) and its pipe."""

    def __init__(self, ctx: Any, children: list[Any], map_name: str, n: int,
                 flavor: str = "memb") -> None:
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=W.client, args=(map_name, n, flavor, theirs),
                                daemon=True)
        children.append(self.proc)
        self.proc.start()
        theirs.close()
        self.pid: int = self.proc.pid
        self.hello = self._recv()
        self.slot: int = self.hello[1] if self.hello[0] == "ready" else -1

    def _recv(self) -> Any:
        if not self.conn.poll(ANSWER):
            raise AssertionError(f"reader pid {self.pid} did not answer in {ANSWER} s")
        return self.conn.recv()

    def __call__(self, cmd: str) -> Any:
        """Run ``cmd`` in the worker and return its result."""
        self.conn.send(cmd)
        msg = self._recv()
        if msg[0] == "error":
            raise WorkerError(msg[1], msg[2])
        return msg[1]

    def kill(self, reap: bool = True) -> None:
        """SIGKILL; with ``reap`` join it, else leave it a zombie (not reaped)."""
        os.kill(self.pid, signal.SIGKILL)
        if reap:
            self.proc.join(ANSWER)
            assert self.proc.exitcode == -signal.SIGKILL
        else:
            # Block until it has exited, without reaping it.
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)

    def close(self) -> None:
        if self.proc.is_alive():
            self("exit")
        self.proc.join(ANSWER)


class Map:
    """A bare header segment with ``n`` reader slots, and the Rcu objects of
    this process on it (unregistered before the header is unmapped)."""

    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self.n = n
        self.hdr = Segment.create(layout.header_name(name), layout.header_size(n),
                                  layout.KIND_HEADER)
        self.hdr.words.store(layout.H_GP, 1)           # grace periods start at 1
        self.hdr.words.store(layout.H_MAX_READERS, n)
        self.hdr.seal()
        self.gp = GracePeriods(self.hdr, n)            # a view that holds no slot
        self._rcus: list[Rcu] = []

    def rcu(self, flavor: str = "memb") -> Rcu:
        r = Rcu(self.hdr, self.n, flavor)
        self._rcus.append(r)
        return r

    def owner(self, slot: int) -> int:
        return self.hdr.words.load(layout.slot_offset(slot) + layout.S_OWNER, atomic.SEQ_CST)

    def ctr(self, slot: int) -> int:
        return self.hdr.words.load(layout.slot_offset(slot) + layout.S_CTR, atomic.SEQ_CST)

    def poke(self, slot: int, word: int, value: int) -> None:
        self.hdr.words.store(layout.slot_offset(slot) + word, value, atomic.SEQ_CST)

    def claimed(self) -> dict[int, rcu.ReaderInfo]:
        return {r.slot: r for r in self.gp.readers()}

    def close(self) -> None:
        for r in self._rcus:
            while r.nesting:
                r.read_unlock()
            r.unregister()
        self.hdr.close()


@pytest.fixture
def new_map(map_name: str) -> Iterator[Callable[[int], Map]]:
    made: list[Map] = []

    def make(n: int) -> Map:
        m = Map(map_name, n)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def client(spawn_ctx: Any, children: list[Any], map_name: str) -> Callable[..., Client]:
    def make(n: int, flavor: str = "memb") -> Client:
        return Client(spawn_ctx, children, map_name, n, flavor)
    return make


# --- process identity ------------------------------------------------------------
def _proc_start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat, parsed independently of rcu.start_ticks."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat.rsplit(")", 1)[1].split()[19])


@pytest.mark.timeout(60)
def test_start_ticks_and_owner_word(spawn_ctx: Any, children: list[Any]) -> None:
    me = os.getpid()
    ticks = rcu.start_ticks(me)
    assert ticks == _proc_start_ticks(me)
    # psutil's create_time is the same field in seconds since the epoch.
    clk = os.sysconf("SC_CLK_TCK")
    assert abs(psutil.boot_time() + ticks / clk - psutil.Process().create_time()) < 0.05
    word = rcu.my_owner_word()
    assert layout.owner_pid(word) == me and layout.owner_start(word) == ticks
    assert rcu.owner_alive(word)
    assert not rcu.owner_alive(layout.owner_word(me, ticks + 1))  # pid reused
    with open("/proc/sys/kernel/pid_max") as f:
        no_such_pid = int(f.read())  # pids are below pid_max
    assert rcu.start_ticks(no_such_pid) is None
    assert not rcu.owner_alive(layout.owner_word(no_such_pid, ticks))

    # A command name with spaces and parentheses does not confuse the parser.
    recv, send = spawn_ctx.Pipe()
    p = spawn_ctx.Process(target=W.rename_self, args=("a) b (c", send), daemon=True)
    children.append(p)
    p.start()
    assert recv.poll(ANSWER)
    before, comm, after = recv.recv()
    assert comm == "a) b (c"
    assert before == after == rcu.start_ticks(p.pid) == _proc_start_ticks(p.pid)
    child_word = layout.owner_word(p.pid, before)
    assert rcu.owner_alive(child_word)
    recv.send("bye")
    p.join(ANSWER)
    assert not rcu.owner_alive(child_word)


# --- the rcutorture-style test ------------------------------------------------------
def _torture(spawn_ctx: Any, children: list[Any], map_name: str, flavor: str,
             updates: int, nreaders: int = 2, reads: int = 8) -> list[dict[str, Any]]:
    """One run: the updater (this process) publishes ``updates`` new objects;
    after each grace period it poisons the old object and unlinks it.  Returns
    the readers' reports."""
    n = nreaders + 1
    m = Map(map_name, n)
    w = m.hdr.words
    procs = []
    objects: list[Segment] = []

    def publish(gen: int) -> Segment:
        obj = Segment.create(W.object_name(map_name, gen), W.OBJ_SIZE, layout.KIND_TABLE, gen)
        obj.words.store(W.O_GEN, gen, atomic.RELAXED)   # before the seal (release)
        obj.words.store(W.O_MARK, W.LIVE, atomic.RELAXED)
        obj.seal()
        objects.append(obj)
        # seq_cst: the updater's publication, ordered before the grace
        # period's counter advance and slot loads (rcu.py module doc).
        w.store(W.PUBLISHED, gen, atomic.SEQ_CST)
        return obj

    try:
        old = publish(1)
        updater = m.rcu(flavor)
        conns = []
        for _ in range(nreaders):
            recv, send = spawn_ctx.Pipe(duplex=False)
            p = spawn_ctx.Process(target=W.torture_reader,
                                  args=(map_name, n, flavor, reads, send), daemon=True)
            children.append(p)
            procs.append(p)
            p.start()
            send.close()
            conns.append(recv)
        for c in conns:  # every reader holds a slot and is reading
            assert c.poll(ANSWER), "a torture reader did not start"
            assert c.recv()[0] == "ready"
        for gen in range(2, updates + 2):
            new = publish(gen)
            updater.synchronize(timeout=10)
            # No reader can still hold `old`: poison it, then free it.
            old.words.store(W.O_MARK, W.POISON, atomic.SEQ_CST)
            objects.remove(old)
            old.close()
            segment.unlink(old.name)
            old = new
        w.store(W.STOP, 1, atomic.RELEASE)
        reports = []
        for c in conns:
            assert c.poll(ANSWER), "a torture reader did not report"
            reports.append(c.recv())
        for p in procs:
            p.join(ANSWER)
            assert p.exitcode == 0
        return reports
    finally:
        w.store(W.STOP, 1, atomic.RELEASE)
        for p in procs:
            p.join(ANSWER)
            if p.is_alive():
                p.kill()
                p.join(ANSWER)
        for obj in objects:
            obj.close()
            segment.unlink(obj.name)
        m.close()
        for name in segment.list_segments(map_name):
            segment.unlink(name)


def _summary(reports: list[dict[str, Any]]) -> tuple[int, list[int], int]:
    hist = [sum(r["hist"][i] for r in reports) for i in range(W.PIPE_LEN)]
    return sum(r["violations"] for r in reports), hist, sum(r["reads"] for r in reports)


# Pipe age is (published generation just before the section ends) minus
# (generation this section read).  The guarantee: a reader that read
# generation g began its section before g+1 was published (else it would
# have read g+1), so the updater's grace period after publishing g+1 waits
# for this section to end; the updater publishes g+2 only after that grace
# period.  So while the section lasts the published generation is g or g+1:
# pipe age is 0 or 1, never more.  (Sampled after read_unlock it could be
# anything.)  In qsbr a "section" runs from one quiescent() to the next and
# the same argument holds, since the reader's slot keeps the counter it
# stored at its last quiescent point.
@pytest.mark.timeout(90)
@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
def test_torture(spawn_ctx: Any, children: list[Any], map_name: str, flavor: str) -> None:
    reports = _torture(spawn_ctx, children, map_name, flavor, updates=2000)
    violations, hist, reads = _summary(reports)
    print(f"\n{flavor} torture, correct grace periods: pipe-age histogram {hist}, "
          f"{reads} reads, {violations} violations")
    assert violations == 0, [r["examples"] for r in reports]
    assert hist[2:] == [0] * (W.PIPE_LEN - 2), f"pipe age above 1: {hist}"
    # The run proves something only if updates landed inside sections.
    assert hist[1] > 0, f"no section ever overlapped an update: {hist}"
    for r in reports:
        assert r["sections"] >= 100, f"reader {r['pid']} barely ran: {r}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
def test_torture_catches_busted_grace_period(
    spawn_ctx: Any, children: list[Any], map_name: str, flavor: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same run with a grace period that does not wait must be caught."""
    monkeypatch.setattr(GracePeriods, "wait", lambda self, token, timeout=None: None)
    seen = []
    for _attempt in range(5):
        reports = _torture(spawn_ctx, children, map_name, flavor, updates=2000)
        violations, hist, reads = _summary(reports)
        seen.append((violations, hist))
        print(f"\n{flavor} torture, busted grace periods: pipe-age histogram {hist}, "
              f"{reads} reads, {violations} violations, e.g. {reports[0]['examples'][:2]}")
        if violations:
            break
    assert violations > 0, f"a grace period that does not wait went unnoticed: {seen}"


# --- crash safety -----------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("reap", [True, False], ids=["dead", "zombie"])
def test_killed_reader_inside_section_is_reclaimed(
    new_map: Callable[[int], Map], client: Callable[..., Client], reap: bool
) -> None:
    m = new_map(2)
    updater = m.rcu()
    c = client(2)
    assert c.slot == 1 - updater.slot
    c("lock")
    info = m.claimed()[c.slot]
    assert info.pid == c.pid and info.alive and info.epoch != 0
    tok = m.gp.start_poll()
    assert not m.gp.poll(tok, check_owners=False)
    c.kill(reap)
    if not reap:
        assert psutil.Process(c.pid).status() == psutil.STATUS_ZOMBIE
    assert not m.claimed()[c.slot].alive
    t = time.monotonic()
    updater.synchronize(timeout=10)  # must not wait for the dead reader
    assert time.monotonic() - t < 5
    if not reap:  # the premise held all along: it was still an unreaped zombie
        assert psutil.Process(c.pid).status() == psutil.STATUS_ZOMBIE
    assert c.slot not in m.claimed()
    assert m.owner(c.slot) == 0
    assert m.gp.poll(tok)
    # The slot can be claimed again, and its stale counter does not block.
    again = client(2)
    assert again.slot == c.slot
    assert m.ctr(again.slot) == 0
    updater.synchronize(timeout=10)
    again("lock")
    with pytest.raises(TimeoutError):
        updater.synchronize(timeout=0.2)
    again("unlock")
    updater.synchronize(timeout=10)
    again.close()


@pytest.mark.timeout(60)
def test_live_parked_reader_times_out_naming_pid_and_slot(
    new_map: Callable[[int], Map], client: Callable[..., Client]
) -> None:
    m = new_map(3)
    updater = m.rcu()
    c = client(3)
    c("lock")
    t = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        updater.synchronize(timeout=0.5)
    took = time.monotonic() - t
    assert 0.5 <= took < 5
    assert isinstance(ei.value, GraceTimeout) and isinstance(ei.value, ShmDirtyError)
    msg = str(ei.value)
    assert f"pid {c.pid}" in msg and f"slot {c.slot}" in msg, msg
    assert m.claimed()[c.slot].alive          # a live reader is never reclaimed
    assert m.owner(c.slot) != 0
    c("unlock")
    updater.synchronize(timeout=10)
    c.close()


@pytest.mark.timeout(60)
def test_reused_pid_counts_as_dead(new_map: Callable[[int], Map]) -> None:
    """A slot whose owner word names a live pid with another start time (the
    pid now belongs to someone else) is reclaimed; the right start time blocks."""
    m = new_map(2)
    updater = m.rcu()
    other = 1 - updater.slot
    me, ticks = os.getpid(), rcu.start_ticks(os.getpid())
    assert ticks is not None
    # A right owner word that is not our Rcu's slot: a live reader in grace period 1.
    m.poke(other, layout.S_CTR, 1)
    m.poke(other, layout.S_OWNER, layout.owner_word(me, ticks))
    with pytest.raises(TimeoutError, match=f"slot {other} \\(pid {me}\\)"):
        updater.synchronize(timeout=0.3)
    # Same pid, another start time: the process that owned the slot is gone.
    m.poke(other, layout.S_OWNER, layout.owner_word(me, ticks - 1))
    info = m.claimed()[other]
    assert info.pid == me and not info.alive
    updater.synchronize(timeout=10)
    assert m.owner(other) == 0


# --- memb sections --------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_nesting_is_one_section(
    new_map: Callable[[int], Map], client: Callable[..., Client]
) -> None:
    m = new_map(2)
    c = client(2)
    c("lock")                    # begins a section
    c("lock")                    # nested
    epoch = m.ctr(c.slot)
    assert epoch != 0
    c("unlock")                  # inner: the section goes on
    assert m.ctr(c.slot) == epoch
    tok = m.gp.start_poll()
    for _ in range(3):
        assert not m.gp.poll(tok)
    c("unlock")                  # outer: the section ends
    assert m.ctr(c.slot) == 0
    assert m.gp.poll(tok)
    with pytest.raises(WorkerError, match="RcuMisuse"):
        c("unlock")
    c.close()


@pytest.mark.timeout(30)
def test_misuse_raises(new_map: Callable[[int], Map]) -> None:
    m = new_map(2)
    r = m.rcu()
    with pytest.raises(RuntimeError, match="read_unlock"):
        r.read_unlock()
    with r.read_section():
        with pytest.raises(RuntimeError, match="synchronize"):
            r.synchronize(timeout=1)
        with pytest.raises(RuntimeError, match="barrier"):
            r.barrier(timeout=1)
        with pytest.raises(RuntimeError):
            r.quiescent()
    assert r.nesting == 0 and m.ctr(r.slot) == 0
    r.synchronize(timeout=10)
    q = m.rcu("qsbr")
    q.read_lock()  # an online qsbr reader is inside a section already
    with pytest.raises(RuntimeError, match="quiescent"):
        q.quiescent()
    with pytest.raises(RuntimeError, match="synchronize"):
        q.synchronize(timeout=1)
    q.read_unlock()
    q.synchronize(timeout=10)   # goes offline to wait for others, then back online
    assert q.online and m.ctr(q.slot) == m.gp.counter()
    with pytest.raises(ValueError, match="flavor"):
        Rcu(m.hdr, m.n, "urcu-bp")


# --- qsbr ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_qsbr_online_offline_quiescent(
    new_map: Callable[[int], Map], client: Callable[..., Client]
) -> None:
    m = new_map(3)
    updater = m.rcu()               # memb: holds up no grace period between calls
    c = client(3, "qsbr")           # registers online: inside a section
    assert m.ctr(c.slot) != 0
    tok = m.gp.start_poll()
    assert not m.gp.poll(tok)
    with pytest.raises(TimeoutError, match=f"pid {c.pid}"):
        updater.synchronize(timeout=0.3)
    assert c("quiescent") is True   # the counter moved: it announces it
    assert m.gp.poll(tok)
    assert c("quiescent") is False  # ... and not again until it moves again

    c("offline")                    # an offline reader blocks nothing
    assert m.ctr(c.slot) == 0
    t = time.monotonic()
    updater.synchronize(timeout=10)
    assert time.monotonic() - t < 5
    assert m.gp.poll(m.gp.start_poll())
    assert c("quiescent") is False  # offline: a quiescent point is a no-op
    assert m.ctr(c.slot) == 0

    c("lock")                       # offline -> online for one section
    tok = m.gp.start_poll()
    assert not m.gp.poll(tok)
    c("unlock")                     # ... and offline again
    assert m.ctr(c.slot) == 0 and m.gp.poll(tok)

    c("online")                     # back online: blocks until quiescent()
    tok = m.gp.start_poll()
    assert not m.gp.poll(tok)
    c("quiescent")
    assert m.gp.poll(tok)
    c.close()


@pytest.mark.timeout(30)
def test_quiescent_writes_only_when_the_counter_moved(new_map: Callable[[int], Map]) -> None:
    m = new_map(2)
    q = m.rcu("qsbr")
    g = m.gp.counter()
    assert m.ctr(q.slot) == g
    # Mark the slot word with a value quiescent() would never write: if it is
    # still there afterwards, quiescent() wrote nothing at all.
    mark = g + 0x5EED
    m.poke(q.slot, layout.S_CTR, mark)
    for _ in range(3):
        assert q.quiescent() is False
        assert m.ctr(q.slot) == mark
    m.gp.start_poll()  # the counter moves
    assert q.quiescent() is True
    assert m.ctr(q.slot) == m.gp.counter() == g + 1
    m.poke(q.slot, layout.S_CTR, mark)
    assert q.quiescent() is False
    assert m.ctr(q.slot) == mark


# --- polled grace periods --------------------------------------------------------
@pytest.mark.timeout(60)
def test_polled_tokens(new_map: Callable[[int], Map], client: Callable[..., Client]) -> None:
    m = new_map(3)
    r = m.rcu()
    assert r.poll(r.start_poll())   # nobody reading: a grace period is immediate
    a, b = client(3), client(3)
    a("lock")
    tok = r.start_poll()
    for _ in range(3):
        assert not r.poll(tok)      # a's section began before the token
    a("unlock")
    assert r.poll(tok)
    # (A section begun after the token may hold it up too -- memb stores the
    # counter value it saw last -- which only makes the grace period longer.)
    b("lock")
    tok2 = r.start_poll()
    assert tok2 > tok
    assert not r.poll(tok2)
    assert r.poll(tok)              # an elapsed token stays elapsed
    b("unlock")
    assert r.poll(tok2)
    a.close()
    b.close()


# --- call_rcu -----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_call_rcu_order_and_barrier(
    new_map: Callable[[int], Map], client: Callable[..., Client]
) -> None:
    m = new_map(3)
    r = m.rcu()
    ran: list[int] = []
    c = client(3)
    c("lock")
    for i in range(3):
        r.call_rcu(lambda i=i: ran.append(i))
    assert r.gp.run_callbacks() == 0
    assert ran == [] and r.gp.pending == 3
    with pytest.raises(TimeoutError, match=f"pid {c.pid}"):
        r.barrier(timeout=0.3)
    assert ran == []
    c("unlock")
    r.call_rcu(lambda: ran.append(3))  # finds the first batch's grace period over
    assert ran[:3] == [0, 1, 2]
    c("lock")
    r.call_rcu(lambda: ran.append(4))  # waits for the new section
    assert 4 not in ran
    with pytest.raises(TimeoutError):
        r.barrier(timeout=0.3)
    c("unlock")
    r.barrier(timeout=10)
    assert ran == [0, 1, 2, 3, 4] and r.gp.pending == 0
    c.close()


@pytest.mark.timeout(60)
def test_call_rcu_from_a_callback_waits_for_its_own_grace_period(
    new_map: Callable[[int], Map], client: Callable[..., Client]
) -> None:
    """A callback that queues another (a chained free) must not have the
    second one run in the same pass, before its own grace period."""
    m = new_map(3)
    r = m.rcu()
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        r.call_rcu(lambda: ran.append("second"))

    c = client(3)
    c("lock")
    r.call_rcu(first)          # its grace period waits for c
    d = client(3)              # registers (reads the counter) after first's
    d("lock")                  # grace period started: does not hold it up
    c("unlock")
    r.gp.run_callbacks()       # first's grace period is over: it runs
    assert ran == ["first"]    # second's grace period must wait for d
    tok = m.gp.start_poll()
    assert not m.gp.poll(tok)
    d("unlock")
    r.barrier(timeout=10)
    assert ran == ["first", "second"]
    c.close()
    d.close()


# --- slots ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_slot_exhaustion_and_release(
    new_map: Callable[[int], Map], client: Callable[..., Client]
) -> None:
    m = new_map(3)
    cs = [client(3) for _ in range(3)]
    assert sorted(c.slot for c in cs) == [0, 1, 2]
    assert {i.slot: i.pid for i in m.gp.readers()} == {c.slot: c.pid for c in cs}
    late = client(3)
    assert late.hello[0] == "error" and late.hello[1] == "NoReaderSlot", late.hello
    assert all(str(c.pid) in late.hello[2] for c in cs), late.hello
    late.proc.join(ANSWER)
    with pytest.raises(NoReaderSlot) as ei:
        m.rcu()
    assert isinstance(ei.value, ShmDirtyError) and isinstance(ei.value, RuntimeError)
    assert sorted(m.claimed()) == [0, 1, 2]   # a failed claim leaves nothing behind

    cs[0]("unregister")                       # released by its owner ...
    assert cs[0].slot not in m.claimed()
    r = m.rcu()
    assert r.slot == cs[0].slot
    cs[1].kill()                              # ... or by its owner's death
    again = client(3)
    assert again.slot == cs[1].slot
    assert {i.slot: i.pid for i in m.gp.readers()} == {
        r.slot: os.getpid(), again.slot: again.pid, cs[2].slot: cs[2].pid}
    r.unregister()
    r.unregister()                            # idempotent
    assert r.slot not in m.claimed()
    for c in (cs[0], cs[2], again):
        c.close()
    assert m.claimed() == {}


@pytest.mark.timeout(30)
def test_each_rcu_gets_its_own_slot(new_map: Callable[[int], Map]) -> None:
    """Two Rcu objects of one process must not share a slot: their nesting is
    separate, and one's unregister would free the slot the other still uses."""
    m = new_map(4)
    r1 = m.rcu()
    r1.read_lock()
    r2 = m.rcu()
    assert r2.slot != r1.slot
    r2.unregister()
    tok = m.gp.start_poll()
    assert not m.gp.poll(tok)                 # r1's section still counts
    r1.read_unlock()
    assert m.gp.poll(tok)


@pytest.mark.timeout(60)
def test_no_section_after_unregister(
    new_map: Callable[[int], Map], client: Callable[..., Client]
) -> None:
    """An Rcu that left must not write the slot, now someone else's."""
    m = new_map(1)
    r = m.rcu()
    r.unregister()
    q = m.rcu("qsbr")
    q.unregister()
    c = client(1)
    assert c.slot == 0
    c("lock")
    with pytest.raises(RuntimeError, match="unregister"):
        r.read_lock()
    with pytest.raises(RuntimeError, match="unregister"):
        q.thread_online()
    assert r.nesting == 0
    tok = m.gp.start_poll()
    assert not m.gp.poll(tok)                 # c's section is intact
    c("unlock")
    assert m.gp.poll(tok)
    c.close()


# --- misuse names the call (issue 17.6: mutants of the messages) ------------------------------
def test_each_misuse_error_names_its_call(new_map: Callable[[int], Map]) -> None:
    """The misuse errors say which call was misused, word for word (the
    looser ``match`` of test_misuse_raises lets a garbled name through)."""
    m = new_map(2)
    r = m.rcu()
    with r.read_section():
        with pytest.raises(RcuMisuse, match=r"^barrier\(\) inside a read-side section "
                                            r"would wait for itself$"):
            r.barrier(timeout=1)
        with pytest.raises(RcuMisuse,
                           match=r"^thread_offline\(\) inside a read-side section$"):
            r.thread_offline()
    r.synchronize(timeout=10)


def test_leave_counts_the_threads_inside_and_refuses(new_map: Callable[[int], Map]) -> None:
    """sections_open() counts this process's threads inside a section of
    the map; leave() refuses while any is, saying how many and where."""
    import threading
    m = new_map(4)
    r = m.rcu()
    inside, out = threading.Event(), threading.Event()

    def park() -> None:
        with r.read_section():
            inside.set()
            out.wait(ANSWER)

    t = threading.Thread(target=park, name="parked")
    t.start()
    try:
        assert inside.wait(ANSWER)
        assert r.sections_open() == 1
        with r.read_section():
            assert r.sections_open() == 2
        assert r.sections_open() == 1
        with pytest.raises(RcuMisuse, match=rf"^1 thread\(s\) of this process are inside a "
                                            rf"read-side section of {m.hdr.name}$"):
            r.leave()
    finally:
        out.set()
        t.join(ANSWER)
    assert not t.is_alive() and r.sections_open() == 0
