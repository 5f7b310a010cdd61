"""shmdirty.atomic: every op and order on every backend, input checks, real races.

The single-process tests run each op on the ``kernel`` (when built), ``cffi``
and ``public`` backends and check it against plain integer arithmetic.  A
random op sequence is run on every backend and on a pure-Python model of the
word array, which must agree exactly.  The multiprocess tests put one word in a
real shared-memory segment and hammer it from spawned processes.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from array import array
from typing import Any

import numpy as np
import pytest

from shmdirty import atomic, layout
from shmdirty.segment import Segment

MASK64 = (1 << 64) - 1
LOAD_ORDERS = (atomic.RELAXED, atomic.ACQUIRE, atomic.SEQ_CST)
STORE_ORDERS = (atomic.RELAXED, atomic.RELEASE, atomic.SEQ_CST)
RMW_ORDERS = (atomic.RELAXED, atomic.ACQUIRE, atomic.RELEASE, atomic.ACQ_REL, atomic.SEQ_CST)
# C11 (and atomics' check): the failure order is a load order no stronger
# than the success order.
CAS_ORDERS = [(s, f) for s in RMW_ORDERS for f in LOAD_ORDERS if f <= s]
EDGE_VALUES = (0, 1, 1 << 63, MASK64, MASK64 - 1, 0x5555_5555_5555_5555)


AVAILABLE = atomic.available()


def _need(name: str) -> None:
    if name not in AVAILABLE:
        pytest.skip(f"the {name} atomics backend is not available here "
                    "(kernel: not compiled at install)")


@pytest.fixture(params=atomic.BACKENDS)
def backend(request: pytest.FixtureRequest) -> Any:
    """Run the test on one backend, then restore the one the process had."""
    _need(request.param)
    before = atomic.backend.name
    atomic.use_backend(request.param)
    try:
        yield request.param
    finally:
        atomic.use_backend(before)


class Guarded:
    """8 words under test between guard words, in one aligned numpy array;
    ``intact()`` says whether anything at all changed since ``snapshot()``."""

    WORDS = 8
    GUARD = 2

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.all = rng.integers(0, MASK64, size=self.WORDS + 2 * self.GUARD,
                                dtype=np.uint64, endpoint=True)
        self.mem = self.all[self.GUARD:self.GUARD + self.WORDS]
        self.words = atomic.Words(self.mem)
        self.snapshot()

    def snapshot(self) -> None:
        self.saved = self.all.copy()

    def intact(self) -> bool:
        return bool(np.array_equal(self.all, self.saved))

    def word(self, offset: int) -> int:
        return int(self.mem[offset // 8])

    def set(self, offset: int, value: int) -> None:
        self.mem[offset // 8] = value


@pytest.fixture
def g() -> Any:
    buf = Guarded()
    yield buf
    buf.words.release()


# -- every op, every order -------------------------------------------------------
@pytest.mark.parametrize("store_order", STORE_ORDERS)
@pytest.mark.parametrize("load_order", LOAD_ORDERS)
def test_store_load(backend: str, g: Guarded, store_order: int, load_order: int) -> None:
    for i, value in enumerate(EDGE_VALUES):
        off = 8 * (i % Guarded.WORDS)
        g.words.store(off, value, store_order)
        assert g.word(off) == value  # numpy sees the stored bits
        assert g.words.load(off, load_order) == value
        # the unchecked pointer functions are the same operations
        p = g.words.ptr(off)
        atomic.store(p, value ^ MASK64, store_order)
        assert atomic.load(p, load_order) == value ^ MASK64 == g.word(off)
    assert np.array_equal(g.all[:Guarded.GUARD], g.saved[:Guarded.GUARD])
    assert np.array_equal(g.all[-Guarded.GUARD:], g.saved[-Guarded.GUARD:])


@pytest.mark.parametrize("order", RMW_ORDERS)
def test_exchange(backend: str, g: Guarded, order: int) -> None:
    rng = random.Random(order)
    for off in range(0, 64, 8):
        old, new = g.word(off), rng.getrandbits(64)
        assert g.words.exchange(off, new, order) == old
        assert g.word(off) == new


@pytest.mark.parametrize(("succ", "fail"), CAS_ORDERS)
def test_compare_exchange(backend: str, g: Guarded, succ: int, fail: int) -> None:
    rng = random.Random(succ * 10 + fail)
    for off in range(0, 64, 8):
        cur, new = g.word(off), rng.getrandbits(64)
        # success: stores desired, returns the value it found (== expected)
        assert g.words.compare_exchange(off, cur, new, succ, fail) == (True, cur)
        assert g.word(off) == new
        # failure: stores nothing, returns the current value
        wrong = new ^ (1 << rng.randrange(64))
        assert g.words.compare_exchange(off, wrong, cur, succ, fail) == (False, new)
        assert g.word(off) == new


@pytest.mark.parametrize("order", RMW_ORDERS)
def test_fetch_or_fetch_and(backend: str, g: Guarded, order: int) -> None:
    rng = random.Random(100 + order)
    for off in range(0, 64, 8):
        old, v = g.word(off), rng.getrandbits(64)
        assert g.words.fetch_or(off, v, order) == old
        assert g.word(off) == old | v
        old, v = g.word(off), rng.getrandbits(64)
        assert g.words.fetch_and(off, v, order) == old
        assert g.word(off) == old & v
    g.set(0, 0)
    assert g.words.fetch_or(0, MASK64, order) == 0 and g.word(0) == MASK64
    assert g.words.fetch_and(0, 0, order) == MASK64 and g.word(0) == 0


@pytest.mark.parametrize("order", RMW_ORDERS)
def test_fetch_add_wraps_at_2_64(backend: str, g: Guarded, order: int) -> None:
    cases = [(MASK64, 1), (MASK64 - 2, 5), (1 << 63, 1 << 63), (5, MASK64), (0, MASK64),
             (12345, 0), (random.Random(order).getrandbits(64), MASK64 // 3)]
    for start, add in cases:
        g.set(8, start)
        assert g.words.fetch_add(8, add, order) == start
        assert g.word(8) == (start + add) % (1 << 64)
    # the unchecked pointer function takes any int modulo 2**64 (a decrement is -1)
    p = g.words.ptr(16)
    g.set(16, 0)
    assert atomic.fetch_add(p, -1, order) == 0
    assert g.word(16) == MASK64
    assert atomic.fetch_add(p, (1 << 64) + 2, order) == MASK64
    assert g.word(16) == 1


@pytest.mark.parametrize("order", RMW_ORDERS)
def test_bit_test_set_reset(backend: str, g: Guarded, order: int) -> None:
    for bit in range(64):
        off = 8 * (bit % Guarded.WORDS)
        before = g.word(off)
        was = bool(before >> bit & 1)
        assert g.words.bit_test_set(off, bit, order) is was
        assert g.word(off) == before | (1 << bit)
        assert g.words.bit_test_set(off, bit, order) is True
        assert g.words.bit_test_reset(off, bit, order) is True
        assert g.word(off) == before & ~(1 << bit) & MASK64
        assert g.words.bit_test_reset(off, bit, order) is False
        assert g.word(off) == before & ~(1 << bit) & MASK64


def test_or_many_and_take_many(backend: str, g: Guarded) -> None:
    """The batch loops: or_many ORs each value into its word; take_many
    returns and clears the masked bits (an exchange for a full mask)."""
    base = g.words.ptr(0)
    before = [g.word(8 * i) for i in range(Guarded.WORDS)]
    words, values = [1, 3, 6], [0b1010, MASK64, 1 << 63]
    atomic.or_many(base, words, values, atomic.RELEASE)
    for i in range(Guarded.WORDS):
        want = before[i] | dict(zip(words, values, strict=True)).get(i, 0)
        assert g.word(8 * i) == want
    now = [g.word(8 * i) for i in range(Guarded.WORDS)]
    masks = [MASK64, 0xFF00, 1]
    got = atomic.take_many(base, [1, 2, 7], masks, atomic.ACQ_REL)
    assert got == [now[1], now[2] & 0xFF00, now[7] & 1]
    assert g.word(8) == 0 and g.word(16) == now[2] & ~0xFF00 and g.word(56) == now[7] & ~1
    assert g.all[:Guarded.GUARD].tolist() == g.saved[:Guarded.GUARD].tolist()
    assert g.all[-Guarded.GUARD:].tolist() == g.saved[-Guarded.GUARD:].tolist()


def test_fence(backend: str, g: Guarded) -> None:
    assert atomic.fence() is None
    assert g.intact()
    # the fence is a seq_cst RMW of +0 on a private word: it stays 0
    assert atomic._fence_cell[0] == 0


# -- bad input is refused before memory is touched ------------------------------------
BAD_OFFSETS = [-8, -1, 1, 4, 7, 60, 64, 72, 1 << 64, 8.0, "8", None]
BAD_BITS = [-1, 64, 65, 1 << 64, 1.0, None, "3"]
BAD_VALUES = [-1, 1 << 64, (1 << 64) + 1, -(1 << 63), 1.5, None, "1"]

# method -> a call with a valid offset / bit / value, as (offset, *args)
CALLS: dict[str, tuple[Any, ...]] = {
    "load": (8,),
    "store": (8, 1),
    "exchange": (8, 1),
    "compare_exchange": (8, 0, 1),
    "fetch_or": (8, MASK64),
    "fetch_and": (8, 0),
    "fetch_add": (8, 1),
    "bit_test_set": (8, 0),
    "bit_test_reset": (8, 0),
    "ptr": (8,),
}


def _refused(g: Guarded, method: str, args: tuple[Any, ...]) -> None:
    # make the valid form of the call change memory if it ran
    g.set(8, 0x0123_4567_89AB_CDEE)
    g.snapshot()
    with pytest.raises(ValueError):
        getattr(g.words, method)(*args)
    assert g.intact(), f"{method}{args} touched memory before refusing"


@pytest.mark.parametrize("method", CALLS)
def test_bad_offset_refused(backend: str, g: Guarded, method: str) -> None:
    for off in BAD_OFFSETS:
        _refused(g, method, (off, *CALLS[method][1:]))


@pytest.mark.parametrize("method", ["bit_test_set", "bit_test_reset"])
def test_bad_bit_refused(backend: str, g: Guarded, method: str) -> None:
    for bit in BAD_BITS:
        _refused(g, method, (8, bit))


@pytest.mark.parametrize(("method", "arg"), [
    ("store", 1), ("exchange", 1), ("fetch_or", 1), ("fetch_and", 1), ("fetch_add", 1),
    ("compare_exchange", 1), ("compare_exchange", 2),
])
def test_bad_value_refused(backend: str, g: Guarded, method: str, arg: int) -> None:
    for value in BAD_VALUES:
        args = list(CALLS[method])
        args[arg] = value
        _refused(g, method, tuple(args))


def test_words_needs_a_writable_aligned_buffer() -> None:
    with pytest.raises(ValueError, match="writable"):
        atomic.Words(bytes(64))
    backing = np.zeros(9, dtype=np.uint64)
    with pytest.raises(ValueError, match="aligned"):
        atomic.Words(memoryview(backing).cast("B")[4:68])
    w = atomic.Words(backing)
    assert w.size == 72 and w.ptr(64) is not None
    w.release()
    w.release()  # idempotent
    with pytest.raises(ValueError, match="after release"):
        w.load(0)
    small = atomic.Words(np.zeros(4, dtype=np.uint64))
    assert small.ptr(24) is not None
    with pytest.raises(ValueError, match=r"\[0, 24\]"):
        small.ptr(32)
    small.release()


# -- the two backends and a model agree --------------------------------------------
def _random_ops(seed: int, n: int) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)

    def val() -> int:
        return rng.choice([rng.getrandbits(64), rng.getrandbits(3), MASK64, 1 << 63])

    ops: list[tuple[Any, ...]] = []
    for _ in range(n):
        off = 8 * rng.randrange(Guarded.WORDS)
        kind = rng.choice(["load", "store", "exchange", "cas_hit", "cas_miss", "fetch_or",
                           "fetch_and", "fetch_add", "bit_test_set", "bit_test_reset"])
        if kind == "load":
            ops.append((kind, off, rng.choice(LOAD_ORDERS)))
        elif kind == "store":
            ops.append((kind, off, val(), rng.choice(STORE_ORDERS)))
        elif kind in ("cas_hit", "cas_miss"):
            ops.append((kind, off, val(), *rng.choice(CAS_ORDERS)))
        elif kind.startswith("bit"):
            ops.append((kind, off, rng.randrange(64), rng.choice(RMW_ORDERS)))
        else:
            ops.append((kind, off, val(), rng.choice(RMW_ORDERS)))
    return ops


def _run_real(ops: list[tuple[Any, ...]], w: atomic.Words) -> list[Any]:
    out: list[Any] = []
    for kind, off, *a in ops:
        if kind == "cas_hit":  # expected = what is there now
            cur = w.load(off, atomic.RELAXED)
            out.append(w.compare_exchange(off, cur, a[0], a[1], a[2]))
        elif kind == "cas_miss":  # expected = what is there, one bit off
            cur = w.load(off, atomic.RELAXED)
            out.append(w.compare_exchange(off, cur ^ 1, a[0], a[1], a[2]))
        else:
            out.append(getattr(w, kind)(off, *a))
    return out


def _run_model(ops: list[tuple[Any, ...]], mem: list[int]) -> list[Any]:
    out: list[Any] = []
    for kind, off, *a in ops:
        i = off // 8
        old = mem[i]
        if kind == "load":
            out.append(old)
        elif kind == "store":
            mem[i] = a[0]
            out.append(None)
        elif kind == "exchange":
            mem[i] = a[0]
            out.append(old)
        elif kind == "cas_hit":
            mem[i] = a[0]
            out.append((True, old))
        elif kind == "cas_miss":
            out.append((False, old))
        elif kind == "fetch_or":
            mem[i] = old | a[0]
            out.append(old)
        elif kind == "fetch_and":
            mem[i] = old & a[0]
            out.append(old)
        elif kind == "fetch_add":
            mem[i] = (old + a[0]) & MASK64
            out.append(old)
        elif kind == "bit_test_set":
            mem[i] = old | (1 << a[0])
            out.append(bool(old >> a[0] & 1))
        else:
            mem[i] = old & ~(1 << a[0])
            out.append(bool(old >> a[0] & 1))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_backends_and_model_agree(seed: int) -> None:
    ops = _random_ops(seed, 1500)
    before = atomic.backend.name
    results: dict[str, tuple[list[Any], list[int]]] = {}
    try:
        for name in AVAILABLE:
            atomic.use_backend(name)
            assert atomic.backend.name == name
            g = Guarded(seed)
            results[name] = (_run_real(ops, g.words), [int(x) for x in g.mem])
            assert np.array_equal(g.all[:Guarded.GUARD], g.saved[:Guarded.GUARD])
            assert np.array_equal(g.all[-Guarded.GUARD:], g.saved[-Guarded.GUARD:])
            g.words.release()
    finally:
        atomic.use_backend(before)
    mem = [int(x) for x in Guarded(seed).mem]
    model = (_run_model(ops, mem), mem)
    assert set(results) == set(AVAILABLE)
    for name in AVAILABLE:
        assert results[name] == model, name


def test_default_backend_is_the_fastest_and_env_selects() -> None:
    code = ("import shmdirty.atomic as a; w = a.Words(bytearray(16)); "
            "w.store(8, 2**64-1); print(a.backend.name, w.fetch_add(8, 3), w.load(8))")
    env = {k: v for k, v in os.environ.items() if k != "SHMDIRTY_ATOMICS"}
    got = {}
    for choice in (None, *AVAILABLE):
        if choice:
            env["SHMDIRTY_ATOMICS"] = choice
        # an explicit choice never warns; the default warns only without the kernel
        strict = ["-W", "error::RuntimeWarning"] if choice or "kernel" in AVAILABLE else []
        r = subprocess.run([sys.executable, *strict, "-c", code],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        got[choice] = r.stdout.split()
    # atomics is pinned to the version the fast path was verified on: no warning
    wrapped = str((MASK64 + 3) % (1 << 64))
    assert got[None] == [AVAILABLE[0], str(MASK64), wrapped]
    for name in AVAILABLE:
        assert got[name] == [name, str(MASK64), wrapped]


def test_without_the_kernel_import_warns_once_and_uses_cffi() -> None:
    # As after `CC=/bin/false pip install .`: shmdirty._kernel cannot be imported.
    code = ("import sys, warnings; sys.modules['shmdirty._kernel'] = None\n"
            "with warnings.catch_warnings(record=True) as got:\n"
            "    warnings.simplefilter('always')\n"
            "    import shmdirty.atomic as a, shmdirty.dirty, shmdirty.bitmap\n"
            "print(a.backend.name, a.batch, len(got))\n"
            "print(got[0].message)")
    env = {k: v for k, v in os.environ.items() if k != "SHMDIRTY_ATOMICS"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    first, message = r.stdout.splitlines()[:2]
    assert first == "cffi None 1"
    assert "compiled kernel is unavailable" in message and "slower" in message
    # what happened and what to do; the measurements are in docs/PERFORMANCE.md, not here
    assert "Reinstall with a C compiler" in message and "docs/PERFORMANCE.md" in message
    assert not re.search(r"\d\s*(ns|us|µs)\b", message), message


def test_env_asking_for_a_missing_backend_fails_at_import() -> None:
    code = "import shmdirty.atomic"
    for bad, why in (("fsat", "not one of"), ("kernel", "unavailable")):
        if bad == "kernel" and "kernel" in AVAILABLE:
            continue
        env = {**os.environ, "SHMDIRTY_ATOMICS": bad}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and why in r.stderr, r.stderr


def test_fallback_warns_when_internals_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    atomics, dist, real = atomic.atomics_package()  # atomics 1.0.3 or atomics2 1.1
    patomic = importlib.import_module(f"{dist}._impl.patomic").Patomic

    monkeypatch.delenv("SHMDIRTY_ATOMICS", raising=False)
    monkeypatch.setattr(atomics, "__version__", "9.9.9", raising=False)
    with pytest.warns(RuntimeWarning, match="9.9.9"):
        assert atomic._pick_backend().name == "public"
    monkeypatch.setattr(atomics, "__version__", real, raising=False)
    if "kernel" in AVAILABLE:
        assert atomic._pick_backend().name == "kernel"
    else:  # an install without the kernel (.ci/run's no-compiler step)
        with pytest.warns(RuntimeWarning, match="not built at install"):
            assert atomic._pick_backend().name == "cffi"

    def moved(*args: Any) -> Any:
        raise AttributeError("op table moved")

    monkeypatch.setattr(patomic, "ops", moved)
    with pytest.warns(RuntimeWarning, match="op table moved"):
        assert atomic._pick_backend().name == "public"


def test_one_op_table_drives_every_backend() -> None:
    """atomic.OPS is the one list of patomic ops: patomic_ops() reads exactly
    those, and every backend here has each op's single-op function (built
    from the table: the kernel's function, the cffi pointer, the atomicview
    method)."""
    assert set(atomic.patomic_ops()) == set(atomic.OPS)
    for name in AVAILABLE:
        b = atomic._CLASSES[name]()
        for op in atomic.OPS.values():
            assert not op.api or callable(getattr(b, op.api)), (name, op)


def test_use_backend_rejects_unknown_names() -> None:
    before = atomic.backend
    with pytest.raises(ValueError, match="fsat"):
        atomic.use_backend("fsat")
    assert atomic.backend is before


# -- real races between spawned processes ----------------------------------------
WORD_OFF = layout.B_WORDS          # the contended word
NEIGHBOUR_OFF = layout.B_WORDS + 8  # must stay untouched


def fetch_add_worker(name: str, backend: str, n: int, barrier: Any, conn: Any) -> None:
    """Attach by name, wait for the others, fetch_add 1 n times; send back
    every value fetch_add returned."""
    atomic.use_backend(backend)
    seg = Segment.attach(name, layout.KIND_BLOCK)
    p = seg.words.ptr(WORD_OFF)
    fa, order = atomic.fetch_add, atomic.ACQ_REL
    seen = array("Q")
    barrier.wait(60)
    for _ in range(n):
        seen.append(fa(p, 1, order))
    seg.close()
    conn.send_bytes(seen.tobytes())
    conn.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("backend_name", "n"),
                         [("kernel", 100_000), ("cffi", 100_000), ("public", 3_000)])
def test_fetch_add_from_4_processes_is_exact(
    spawn_ctx: Any, children: list[Any], map_name: str, backend_name: str, n: int
) -> None:
    _need(backend_name)
    nproc = 4
    seg = Segment.create(layout.block_name(map_name, 0), 4096, layout.KIND_BLOCK)
    seg.words.store(NEIGHBOUR_OFF, 0xDEAD_BEEF)
    seg.seal()
    barrier = spawn_ctx.Barrier(nproc)
    conns = []
    for _ in range(nproc):
        recv, send = spawn_ctx.Pipe(duplex=False)
        p = spawn_ctx.Process(target=fetch_add_worker,
                              args=(seg.name, backend_name, n, barrier, send))
        children.append(p)
        p.start()
        send.close()
        conns.append(recv)
    per_proc = [np.frombuffer(c.recv_bytes(), dtype=np.uint64) for c in conns]
    for p in children:
        p.join(60)
        assert p.exitcode == 0
    total = nproc * n
    assert seg.words.load(WORD_OFF, atomic.SEQ_CST) == total
    # stronger than the total: every intermediate value was returned exactly
    # once, so no two increments ever read the same old value
    everything = np.sort(np.concatenate(per_proc))
    assert np.array_equal(everything, np.arange(total, dtype=np.uint64))
    assert seg.words.load(NEIGHBOUR_OFF) == 0xDEAD_BEEF
    # the processes really overlapped (else the test proved nothing): some
    # process saw another's increment between two of its own
    assert any(bool(np.any(np.diff(s) != 1)) for s in per_proc)
    seg.close()


OWNED = {0: list(range(0, 48, 2)), 1: list(range(1, 48, 2))}  # bits 48..63: nobody's
UNOWNED_MASK = MASK64 & ~((1 << 48) - 1)


def bit_race_worker(name: str, who: int, n: int, start: int, barrier: Any, conn: Any) -> None:
    """Toggle this process's own bits at random with bit_test_set / _reset.
    Each result must match the process's private model of its bits (no one
    else touches them); count the successful transitions per bit."""
    seg = Segment.attach(name, layout.KIND_BLOCK)
    p = seg.words.ptr(WORD_OFF)
    bts, btr, order = atomic.bit_test_set, atomic.bit_test_reset, atomic.ACQ_REL
    load = atomic.load
    rng = random.Random(who)
    bits = OWNED[who]
    mine = sum(1 << b for b in bits)
    theirs = sum(1 << b for b in OWNED[1 - who])
    model = {b: bool(start >> b & 1) for b in bits}
    expect = start & mine  # the model as a word
    flips = dict.fromkeys(bits, 0)
    wrong = 0
    others_moved = 0  # times the other process's bits changed under us
    last_theirs = start & theirs
    plan = [(rng.choice(bits), rng.random() < 0.5) for _ in range(n)]
    barrier.wait(60)
    for bit, setting in plan:
        if setting:
            was = bts(p, bit, order)
            flips[bit] += not was
            expect |= 1 << bit
        else:
            was = btr(p, bit, order)
            flips[bit] += was
            expect &= ~(1 << bit)
        wrong += was is not model[bit]
        model[bit] = setting
        now = load(p, atomic.ACQUIRE)
        wrong += now & mine != expect
        others_moved += now & theirs != last_theirs
        last_theirs = now & theirs
    seg.close()
    conn.send((model, flips, wrong, others_moved))
    conn.close()


@pytest.mark.timeout(90)
def test_bit_set_racing_bit_reset(spawn_ctx: Any, children: list[Any], map_name: str) -> None:
    n = 60_000
    start = random.Random(7).getrandbits(64)
    seg = Segment.create(layout.block_name(map_name, 0), 4096, layout.KIND_BLOCK)
    seg.words.store(WORD_OFF, start)
    seg.words.store(NEIGHBOUR_OFF, 0)
    seg.seal()
    barrier = spawn_ctx.Barrier(2)
    conns = []
    for who in (0, 1):
        recv, send = spawn_ctx.Pipe(duplex=False)
        p = spawn_ctx.Process(target=bit_race_worker,
                              args=(seg.name, who, n, start, barrier, send))
        children.append(p)
        p.start()
        send.close()
        conns.append(recv)
    results = [c.recv() for c in conns]
    for p in children:
        p.join(60)
        assert p.exitcode == 0
    final = seg.words.load(WORD_OFF, atomic.SEQ_CST)
    for who, (model, flips, wrong, _) in enumerate(results):
        assert wrong == 0, f"process {who}: {wrong} results disagreed with its own bits"
        assert sum(flips.values()) > 0
        for bit in OWNED[who]:
            initial = bool(start >> bit & 1)
            assert bool(final >> bit & 1) is model[bit]
            assert model[bit] is (initial ^ (flips[bit] % 2 == 1))
    assert final & UNOWNED_MASK == start & UNOWNED_MASK
    assert seg.words.load(NEIGHBOUR_OFF) == 0
    # the two really raced on the word (else the test proved nothing)
    assert sum(r[3] for r in results) > 0
    seg.close()
