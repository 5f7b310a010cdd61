"""Spawn targets for tests/test_rcu.py (module level, so spawn can import them).

Two kinds of worker:

- ``client``: owns one Rcu and obeys commands sent over a pipe, one reply per
  command.  Between commands it blocks in ``recv()``: that is how a reader
  "parks" inside a read-side section without any sleep.
- ``torture_reader``: the reader half of the rcutorture-style test.
"""

from __future__ import annotations

import os
from typing import Any

from shmdirty import atomic, layout, rcu
from shmdirty.errors import CorruptSegment
from shmdirty.segment import Segment

# --- the torture test's object and the header words it uses ------------------
# The published "pointer" is the header's generation word: the updater stores
# it (seq_cst) after the object is sealed; readers load it (seq_cst) inside a
# section.  The stop flag borrows the request word, which nothing else in a
# bare RCU header uses: the updater stores 1 (release), readers load (acquire).
PUBLISHED = layout.H_GENERATION
STOP = layout.H_REQUEST
O_GEN = 64      # the object's generation: written once, before the seal
O_MARK = 72     # LIVE while published or in its grace period, POISON after
OBJ_SIZE = 128
LIVE = 0x4C495645_4C495645
POISON = 0xDEADDEAD_DEADDEAD
PIPE_LEN = 10   # histogram bins: pipe age 0..8, and 9 for "9 or more"


def object_name(map_name: str, generation: int) -> str:
    return layout.table_name(map_name, generation, 0)


def attach_header(map_name: str, max_readers: int) -> Segment:
    return Segment.attach(layout.header_name(map_name), layout.KIND_HEADER,
                          layout.header_size(max_readers))


def torture_reader(map_name: str, max_readers: int, flavor: str, reads: int,
                   conn: Any) -> None:
    """Read the published object in short sections until told to stop.

    memb: each section is read_lock .. read_unlock.  qsbr: the reader is
    always online and a section is the stretch between two quiescent() calls.
    In a section: load the published generation, map its object (mappings are
    cached by generation), check its own generation and ``reads`` times its
    marker, then load the published generation again: pipe age is the
    difference.  Reports {"reads", "sections", "violations", "hist",
    "examples"} on ``conn``.
    """
    hdr = attach_header(map_name, max_readers)
    r = rcu.Rcu(hdr, max_readers, flavor)
    conn.send(("ready", r.slot, os.getpid()))
    report = torture_loop(hdr, r, map_name, flavor, reads)
    r.unregister()
    hdr.close()
    conn.send(report)
    conn.close()


def torture_loop(hdr: Segment, r: rcu.Rcu, map_name: str, flavor: str,
                 reads: int) -> dict[str, Any]:
    """The reading of ``torture_reader`` with an Rcu the caller owns (which
    several threads may share); returns the report."""
    w = hdr.words
    pub = w.ptr(PUBLISHED)
    stop = w.ptr(STOP)
    cache: dict[int, tuple[Segment, Any, Any]] = {}
    hist = [0] * PIPE_LEN
    violations = 0
    examples: list[str] = []
    sections = nreads = 0
    memb = flavor == "memb"
    load, SEQ_CST = atomic.load, atomic.SEQ_CST

    def violation(what: str) -> None:
        nonlocal violations
        violations += 1
        if len(examples) < 5:
            examples.append(what)

    while not load(stop, atomic.ACQUIRE):
        if memb:
            r.read_lock()
        g = load(pub, SEQ_CST)
        obj = cache.get(g)
        if obj is None:
            try:
                seg = Segment.attach(object_name(map_name, g), layout.KIND_TABLE, OBJ_SIZE)
            except CorruptSegment as exc:
                # The object was published when we loaded the pointer inside
                # this section: it may not be gone yet.
                violation(f"generation {g}: attach failed inside a section: {exc.why}")
                seg = None
            obj = cache[g] = (seg, seg and seg.words.ptr(O_GEN), seg and seg.words.ptr(O_MARK))
        seg, p_gen, p_mark = obj
        if seg is not None:
            got = load(p_gen, SEQ_CST)
            if got != g:
                violation(f"generation {g}: object holds generation {got}")
            for _ in range(reads):
                mark = load(p_mark, SEQ_CST)
                nreads += 1
                if mark != LIVE:
                    violation(f"generation {g}: marker {mark:#x}"
                              + (" (poisoned)" if mark == POISON else ""))
                    break
        age = load(pub, SEQ_CST) - g   # sampled before the section ends
        if memb:
            r.read_unlock()
        else:
            r.quiescent()
        sections += 1
        hist[min(age, PIPE_LEN - 1)] += 1
        # Unmap objects two or more generations old: outside any section (or
        # at a quiescent point) nothing of ours refers to them.
        if len(cache) > 4:
            for old in [k for k in cache if k < g - 1]:
                s = cache.pop(old)[0]
                if s is not None:
                    s.close()
    for s, _, _ in cache.values():
        if s is not None:
            s.close()
    return {"reads": nreads, "sections": sections, "violations": violations,
            "hist": hist, "examples": examples, "pid": os.getpid()}


# --- a reader that obeys commands ---------------------------------------------
def client(map_name: str, max_readers: int, flavor: str, conn: Any) -> None:
    """Claim a slot, report ("ready", slot, pid) or ("error", type, message),
    then obey commands until "exit" or EOF.  Replies ("ok", result) or
    ("error", type, message)."""
    hdr = attach_header(map_name, max_readers)
    try:
        r = rcu.Rcu(hdr, max_readers, flavor)
    except Exception as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
        hdr.close()
        return
    conn.send(("ready", r.slot, os.getpid()))
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            break
        if cmd == "exit":
            conn.send(("ok", None))
            break
        try:
            result = {
                "lock": r.read_lock,
                "unlock": r.read_unlock,
                "quiescent": r.quiescent,
                "offline": r.thread_offline,
                "online": r.thread_online,
                "unregister": r.unregister,
                "slot": lambda: r.slot,
            }[cmd]()
            conn.send(("ok", result))
        except Exception as exc:
            conn.send(("error", type(exc).__name__, str(exc)))
    r.unregister()
    hdr.close()


def rename_self(comm: str, conn: Any) -> None:
    """Report our start ticks, rename our comm, report them again, then wait."""
    before = rcu.start_ticks(os.getpid())
    with open("/proc/self/comm", "w") as f:
        f.write(comm)
    with open("/proc/self/comm") as f:
        now = f.read().rstrip("\n")
    conn.send((before, now, rcu.start_ticks(os.getpid())))
    try:
        conn.recv()
    except EOFError:
        pass


def close_with_callback_due(map_name: str, conn: Any) -> None:
    """issue 17.2: an attached process queues a callback while another reader
    of its own is inside a section, lets that reader leave (the grace period
    can now end), closes its last handle and reports whether it ran."""
    import shmdirty as sd

    ran: list[str] = []
    try:
        dm = sd.DirtyMemory.attach(map_name)
        hdr = attach_header(map_name, dm.max_readers)
        other = rcu.Rcu(hdr, dm.max_readers, "memb")
        other.read_lock()
        dm.rcu.call_rcu(lambda: ran.append("ran"))
        queued = dm.rcu.gp.pending
        other.read_unlock()
        other.close()
        hdr.close()
        dm.close()
        conn.send(("ok", (queued, ran)))
    except BaseException as e:  # reported to the test, which fails on it
        conn.send(("error", repr(e)))
