"""The compiled kernel (shmdirty/_kernel_src/) against the Python code it replaces.

Every batch operation of shmdirty.bitmap is run, with the same random
arguments, on every available atomics backend (``kernel``: one C call;
``cffi`` / ``public``: numpy plus per-word atomics) and on a model that
holds the block as one Python int; results and the words (with guard words
around the block) must agree exactly.  Then every kernel entry point is
given bad input: a ValueError (or TypeError for a wrong type) and not one
word changed.  The C methods of ViewCore are run side by side with the
Python paths they replace (``_<op>_py``) on the same calls; one test checks
the contract between the C and Python sides (shmdirty/atomic.py declares
it), and one records the memory orders both twins of the memb read-side
section pass to patomic.
"""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import shutil
import sysconfig
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import AVAILABLE_BACKENDS, TOKEN, unlink_map, use_atomics_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmdirty import atomic, bitmap
from shmdirty.bitmap import Block

pytestmark = pytest.mark.timeout(120)

MASK64 = (1 << 64) - 1
WORDS = 7            # block words: 448 bits, so ranges cross several words
GUARD = 2
BITS = WORDS * 64


class Guarded:
    """A block of WORDS words between guard words; ``intact()`` is True if no
    word at all changed since ``snapshot()``."""

    def __init__(self, rng: random.Random, fill: str = "random") -> None:
        init = [rng.getrandbits(64) if fill == "random" else 0 for _ in range(WORDS + 2 * GUARD)]
        self.all = np.array(init, dtype=np.uint64)
        self.words = self.all[GUARD:GUARD + WORDS]
        self.block = Block(0, self.words, int(self.words.ctypes.data))
        self.snapshot()

    def snapshot(self) -> None:
        self.saved = self.all.copy()

    def intact(self) -> bool:
        return bool(np.array_equal(self.all, self.saved))

    def guards_intact(self) -> bool:
        return bool(np.array_equal(self.all[:GUARD], self.saved[:GUARD])
                    and np.array_equal(self.all[-GUARD:], self.saved[-GUARD:]))

    def as_int(self) -> int:
        return sum(int(w) << (64 * i) for i, w in enumerate(self.words))


def bits_of(value: int, first: int, count: int) -> int:
    return value >> first & ((1 << count) - 1)


def words_of(value: int, first: int, count: int) -> list[int]:
    """The words (first // 64 ..) of ``value`` restricted to [first, first+count)."""
    w0, w1 = first >> 6, (first + count - 1) >> 6
    masked = bits_of(value, first, count) << first
    return [masked >> (64 * w) & MASK64 for w in range(w0, w1 + 1)]


# -- random operations, the same on every backend and on the model ---------------------
def random_ops(seed: int, n: int) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    ops: list[tuple[Any, ...]] = []

    def span() -> tuple[int, int]:
        first = rng.choice([0, 1, 63, 64, 65, 127, rng.randrange(BITS)])
        first = min(first, BITS - 1)
        count = rng.choice([1, 2, 63, 64, 65, 128, rng.randrange(1, BITS - first + 1)])
        return first, min(count, BITS - first)

    for _ in range(n):
        kind = rng.choice(["set_range", "or_bitmap", "or_bitmap_bytes", "or_words",
                           "or_sparse", "take", "test_and_clear", "any_set", "all_set",
                           "set_page", "set_pages", "test", "walk"])
        first, count = span()
        if kind in ("or_bitmap", "or_bitmap_bytes"):
            src_first = rng.randrange(0, 200)
            nbits = src_first + count + rng.randrange(0, 70)
            density = rng.choice([0.0, 0.01, 0.5, 1.0])
            src = 0
            run = rng.random() < 0.3
            for b in range(nbits):
                if (run and (b // 64) % 2 == 0) or rng.random() < density:
                    src |= 1 << b
            ops.append((kind, first, count, src, nbits, src_first))
        elif kind == "or_words":
            w0 = rng.randrange(WORDS)
            vals = [rng.choice([0, MASK64, rng.getrandbits(64), 1 << rng.randrange(64)])
                    for _ in range(rng.randrange(1, WORDS - w0 + 1))]
            ops.append((kind, w0, vals))
        elif kind == "or_sparse":
            widx = rng.sample(range(WORDS), rng.randrange(0, WORDS + 1))
            ops.append((kind, widx, [rng.getrandbits(64) for _ in widx]))
        elif kind in ("set_page", "set_pages"):
            pages = [rng.randrange(BITS) for _ in range(rng.randrange(1, 20))]
            ops.append((kind, pages))
        elif kind == "test":
            ops.append((kind, rng.randrange(BITS)))
        elif kind == "walk":
            # the block list holds the same block twice: pages [0, 2 BITS)
            page = rng.randrange(2 * BITS)
            end = rng.choice([page, min(2 * BITS, page + rng.randrange(1, 2 * BITS))])
            ops.append((kind, page, end, rng.randrange(4)))
        else:
            ops.append((kind, first, count))
    return ops


def src_array(src: int, nbits: int, as_bytes: bool) -> Any:
    nbytes = (nbits + 7) // 8
    raw = src.to_bytes(nbytes, "little")
    if as_bytes:
        return raw  # bytes of any length: the kernel reads them little-endian
    return np.frombuffer(raw + b"\0" * (-nbytes % 8), dtype="<u8").astype(np.uint64)


def run_real(ops: list[tuple[Any, ...]], g: Guarded) -> list[Any]:
    out: list[Any] = []
    blocks: list[Block | None] = [g.block]
    set_page, set_pages = bitmap.page_setters()
    for kind, *a in ops:
        if kind == "set_range":
            out.append(bitmap.set_range(g.block, *a))
        elif kind in ("or_bitmap", "or_bitmap_bytes"):
            first, count, src, nbits, src_first = a
            arr = src_array(src, nbits, kind == "or_bitmap_bytes")
            if kind == "or_bitmap_bytes":
                if atomic.batch is None:
                    continue  # bytes are a kernel-only input (dirty.py converts them)
                atomic.batch.or_bitmap(g.words, first, count, arr, src_first, atomic.RELEASE)
            else:
                bitmap.or_bitmap(g.block, first, count, arr, src_first)
            out.append(None)
        elif kind == "or_words":
            out.append(bitmap.or_words(g.block, a[0], np.array(a[1], dtype=np.uint64)))
        elif kind == "or_sparse":
            out.append(bitmap.or_sparse(g.block, np.array(a[0], dtype=np.intp),
                                        np.array(a[1], dtype=np.uint64)))
        elif kind == "take":
            w0, taken = bitmap.take(g.block, *a)
            out.append((w0, [int(x) for x in taken]))
        elif kind == "test_and_clear":
            out.append(bitmap.test_and_clear(g.block, *a))
        elif kind == "any_set":
            out.append(bitmap.any_set(g.block, *a))
        elif kind == "all_set":
            out.append(bitmap.all_set(g.block, *a))
        elif kind == "set_page":
            # page_bits 12: byte address of the page; ram_size = the block
            out.append([set_page([[], blocks], 1, p << 12, BITS << 12, 12, BITS, atomic.RELEASE)
                        for p in a[0]])
        elif kind == "set_pages":
            out.append(set_pages(blocks, np.array(a[0], dtype=np.int64), BITS, atomic.RELEASE))
        elif kind == "test":
            out.append(bitmap.test(g.block, a[0]))
        elif kind == "walk":
            out.append(bitmap.walk_blocks([g.block, g.block], a[0], a[1], BITS, a[2]))
    return out


def run_model(ops: list[tuple[Any, ...]], mem: int, kernel: bool) -> tuple[list[Any], int]:
    out: list[Any] = []
    for kind, *a in ops:
        if kind == "set_range":
            first, count = a
            mem |= ((1 << count) - 1) << first
            out.append(None)
        elif kind in ("or_bitmap", "or_bitmap_bytes"):
            if kind == "or_bitmap_bytes" and not kernel:
                continue
            first, count, src, _, src_first = a
            mem |= bits_of(src, src_first, count) << first
            out.append(None)
        elif kind == "or_words":
            w0, vals = a
            for i, v in enumerate(vals):
                mem |= v << (64 * (w0 + i))
            out.append(None)
        elif kind == "or_sparse":
            for w, v in zip(a[0], a[1], strict=True):
                mem |= v << (64 * w)
            out.append(None)
        elif kind in ("take", "test_and_clear"):
            first, count = a
            got = words_of(mem, first, count)
            mem &= ~(((1 << count) - 1) << first)
            out.append((first >> 6, got) if kind == "take" else any(got))
        elif kind == "any_set":
            out.append(bits_of(mem, *a) != 0)
        elif kind == "all_set":
            out.append(bits_of(mem, *a) == (1 << a[1]) - 1)
        elif kind == "set_page":
            for p in a[0]:
                mem |= 1 << p
            out.append([True] * len(a[0]))
        elif kind == "set_pages":
            for p in a[0]:
                mem |= 1 << p
            out.append(-1)
        elif kind == "test":
            out.append(bool(mem >> a[0] & 1))
        elif kind == "walk":
            page, end, op = a
            result = op == bitmap.WALK_ALL
            for lo, hi in ((page, min(end, BITS)), (max(page, BITS) - BITS, end - BITS)):
                if hi <= lo:
                    continue
                piece = bits_of(mem, lo, hi - lo)
                if op == bitmap.WALK_ANY:
                    result = result or piece != 0
                elif op == bitmap.WALK_ALL:
                    result = result and piece == (1 << (hi - lo)) - 1
                elif op == bitmap.WALK_SET:
                    mem |= ((1 << (hi - lo)) - 1) << lo
                else:
                    result = result or piece != 0
                    mem &= ~(((1 << (hi - lo)) - 1) << lo)
            out.append(int(result))
    return out, mem


@pytest.mark.parametrize("seed", range(6))
def test_every_backend_agrees_with_the_model(seed: int) -> None:
    ops = random_ops(seed, 400 if seed < 5 else 60)
    results: dict[str, tuple[list[Any], int]] = {}
    for name in ("kernel", "cffi", "public"):
        if name not in AVAILABLE_BACKENDS or (name == "public" and seed < 5):
            continue  # public: one short sequence (each op is ~25 us per word)
        before = use_atomics_backend(name)
        try:
            g = Guarded(random.Random(seed), fill="random" if seed % 2 else "zero")
            results[name] = (run_real(ops, g), g.as_int())
            assert g.guards_intact(), f"{name} wrote outside the block"
        finally:
            atomic.use_backend(before)
    assert results, "no backend ran"
    for name, (out, mem) in results.items():
        start = Guarded(random.Random(seed), fill="random" if seed % 2 else "zero").as_int()
        want, want_mem = run_model(ops, start, kernel=name == "kernel")
        assert out == want, name
        assert mem == want_mem, name


def test_set_pages_and_walk_name_an_unmapped_block_and_set_nothing() -> None:
    for name in ("kernel", "cffi"):
        before = use_atomics_backend(name)
        try:
            g = Guarded(random.Random(1), fill="zero")
            _, set_pages = bitmap.page_setters()
            blocks: list[Block | None] = [g.block, None]
            pages = np.array([3, BITS + 5, 7], dtype=np.int64)
            assert set_pages(blocks, pages, BITS, atomic.RELEASE) == 1
            assert bitmap.walk_blocks(blocks, 0, BITS + 5, BITS, bitmap.WALK_SET) == -2
            assert g.intact()
            blocks[1] = g.block  # "mapped" (the same words: both bits land in it)
            assert set_pages(blocks, pages, BITS, atomic.RELEASE) == -1
            assert g.as_int() == (1 << 3) | (1 << 5) | (1 << 7)
        finally:
            atomic.use_backend(before)


# -- or_bitmaps: one pass over the source into every client's block ----------------------
@st.composite
def _or_bitmaps_case(draw: st.DrawFn) -> tuple[int, int, int, int, int, list[int], bool]:
    first = draw(st.integers(0, BITS - 1))
    count = draw(st.integers(0, BITS - first))
    src_first = draw(st.integers(0, 200))
    nbits = src_first + count + draw(st.integers(0, 70))
    kind = draw(st.sampled_from(["random", "sparse", "runs", "ones", "zero"]))
    rnd = draw(st.randoms(use_true_random=False))
    if kind == "random":
        src = rnd.getrandbits(nbits) if nbits else 0
    elif kind == "sparse":
        src = sum(1 << rnd.randrange(nbits) for _ in range(nbits // 50)) if nbits else 0
    elif kind == "runs":  # whole all-ones words every other word (the store path)
        src = sum(MASK64 << (128 * i) for i in range(nbits // 128 + 1)) & ((1 << nbits) - 1)
    else:
        src = (1 << nbits) - 1 if kind == "ones" else 0
    seeds = draw(st.lists(st.integers(0, 1 << 30), min_size=1, max_size=3))
    return first, count, src, nbits, src_first, seeds, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(case=_or_bitmaps_case())
def test_or_bitmaps_agrees_on_every_backend(case: tuple[Any, ...]) -> None:
    """Kernel and twin: each block ends as if or_bitmap had run on it alone,
    and nothing outside the blocks changes (bytes sources: kernel only)."""
    first, count, src, nbits, src_first, seeds, as_bytes = case
    want_or = bits_of(src, src_first, count) << first
    ran = []
    for name in ("kernel", "cffi"):
        if name not in AVAILABLE_BACKENDS or (as_bytes and name != "kernel"):
            continue
        before = use_atomics_backend(name)
        try:
            gs = [Guarded(random.Random(s), fill="random" if s % 2 else "zero") for s in seeds]
            starts = [g.as_int() for g in gs]
            arr = src_array(src, nbits, as_bytes)
            if as_bytes:
                atomic.batch.or_bitmaps([g.words for g in gs], first, count, arr, src_first,
                                        atomic.RELEASE)
            else:
                bitmap.or_bitmaps([g.block for g in gs], first, count, arr, src_first)
            for g, start in zip(gs, starts, strict=True):
                assert g.guards_intact(), f"{name} wrote outside a block"
                assert g.as_int() == start | want_or, name
            ran.append(name)
        finally:
            atomic.use_backend(before)
    assert ran or as_bytes


def test_or_bitmaps_on_the_public_backend() -> None:
    """The public backend's twin (one short case: ~25 us per atomic word)."""
    before = use_atomics_backend("public")
    try:
        gs = [Guarded(random.Random(s)) for s in (1, 2)]
        starts = [g.as_int() for g in gs]
        src = np.array([0, MASK64, 0x8000_0000_0000_0001, 5], dtype=np.uint64)
        bitmap.or_bitmaps([g.block for g in gs], 70, 200, src, 3)
        for g, start in zip(gs, starts, strict=True):
            assert g.as_int() == start | bits_of(int.from_bytes(src.tobytes(), "little"),
                                                 3, 200) << 70
    finally:
        atomic.use_backend(before)


# -- bad input: refused before memory is touched ------------------------------------------
@pytest.fixture
def kernel() -> Iterator[Any]:
    before = use_atomics_backend("kernel")
    try:
        yield atomic.batch
    finally:
        atomic.use_backend(before)


def _bad_calls(g: Guarded) -> Iterator[tuple[str, Callable[[Any], Any]]]:
    w, R = g.words, atomic.RELEASE
    src = np.full(4, MASK64, dtype=np.uint64)
    ro = w.copy()
    ro.flags.writeable = False
    strided = g.all[::2]
    odd = memoryview(g.all).cast("B")[4:4 + 8 * WORDS]
    for first, count in ((-1, 1), (0, BITS + 1), (BITS, 1), (BITS - 3, 4), (1 << 70, 1),
                         (0, -5)):
        yield f"set_range({first}, {count})", lambda k, f=first, c=count: k.set_range(w, f, c, R)
        yield f"any_set({first}, {count})", lambda k, f=first, c=count: k.any_set(w, f, c)
        yield f"take({first}, {count})", lambda k, f=first, c=count: k.take(
            w, f, c, np.zeros(WORDS + 2, np.uint64), R)
        yield f"or_bitmap({first}, {count})", lambda k, f=first, c=count: k.or_bitmap(
            w, f, c, np.full(20, MASK64, np.uint64), 0, R)
    for order in (-1, 1 << 40, 6, 7, "3", None):
        yield f"set_range order {order!r}", lambda k, o=order: k.set_range(w, 0, 70, o)
        yield f"or_bitmap order {order!r}", lambda k, o=order: k.or_bitmap(w, 0, 70, src, 0, o)
    yield "or_bitmap: source too short", lambda k: k.or_bitmap(w, 0, 200, src, 100, R)
    yield "or_bitmap: bytes too short", lambda k: k.or_bitmap(w, 0, 17, b"\xff\xff", 0, R)
    yield "or_bitmap: negative src_first", lambda k: k.or_bitmap(w, 0, 10, src, -1, R)
    for blocks, what in (([], "no blocks"), ([w] * 9, "nine blocks"),
                         ([w, ro], "a read-only second block"),
                         ([w, w[:2]], "a second block too short for the range"),
                         ([w, None], "None as a block"), ([w, strided], "a strided block")):
        yield f"or_bitmaps: {what}", lambda k, b=blocks: k.or_bitmaps(b, 0, 200, src, 0, R)
    yield "or_bitmaps: blocks not a list", lambda k: k.or_bitmaps(w, 0, 70, src, 0, R)
    yield "or_bitmaps: source too short", lambda k: k.or_bitmaps([w, w], 0, 200, src, 100, R)
    yield "or_bitmaps: range past the block", lambda k: k.or_bitmaps(
        [w], BITS - 3, 4, np.full(20, MASK64, np.uint64), 0, R)
    yield "or_bitmaps: negative first", lambda k: k.or_bitmaps([w], -1, 4, src, 0, R)
    yield "or_bitmaps: bad order", lambda k: k.or_bitmaps([w], 0, 70, src, 0, 6)
    yield "or_bitmaps: wrong argument count", lambda k: k.or_bitmaps([w], 0, 70, src, 0)
    yield "take: out too small", lambda k: k.take(w, 0, 129, np.zeros(2, np.uint64), R)
    yield "take: read-only out", lambda k: k.take(w, 0, 64, b"\0" * 8, R)
    for name, blk in (("read-only", ro), ("strided", strided), ("misaligned", odd),
                      ("bytes", bytes(64)), ("list", [0] * 8)):
        yield f"set_range on a {name} block", lambda k, b=blk: k.set_range(b, 0, 70, R)
        yield f"or_bitmap on a {name} block", lambda k, b=blk: k.or_bitmap(b, 0, 70, src, 0, R)
    idx = np.array([0, WORDS], dtype=np.int64)
    masks = np.array([1, 1], dtype=np.uint64)
    yield "or_sparse: word past the end", lambda k: k.or_sparse(w, idx, masks, R)
    yield "or_sparse: negative word", lambda k: k.or_sparse(
        w, np.array([1, -1], np.int64), masks, R)
    yield "or_sparse: lengths differ", lambda k: k.or_sparse(
        w, np.array([1], np.int64), masks, R)
    yield "or_sparse: int32 words", lambda k: k.or_sparse(
        w, np.array([1, 2], np.int32), masks, R)
    blocks = [g.block]
    for pages in ([0, BITS], [-1], [5, 1 << 62]):
        yield f"set_pages({pages})", lambda k, p=pages: k.set_pages(
            blocks, np.array(p, np.int64), BITS, R)
    yield "set_pages: float pages", lambda k: k.set_pages(blocks, np.zeros(2), BITS, R)
    yield "set_pages: block_pages 0", lambda k: k.set_pages(blocks, np.zeros(2, np.int64), 0, R)
    yield "set_pages: short block", lambda k: k.set_pages(
        [Block(0, w[:2], 0)], np.array([1], np.int64), BITS, R)
    yield "set_page: bad order", lambda k: k.set_page([blocks], 0, 4096, BITS << 12, 12, BITS, 9)
    for page, end, op in ((0, BITS + 1, 0), (5, 3, 0), (0, 8, 4), (-1, 8, 0), (0, 8, -1)):
        yield f"walk({page}, {end}, op {op})", lambda k, p=page, e=end, o=op: k.walk(
            blocks, p, e, BITS, o, R)
    yield "walk: short block", lambda k: k.walk([Block(0, w[:2], 0)], 0, 8, BITS, 2, R)
    yield "walk: block_pages 0", lambda k: k.walk(blocks, 0, 8, 0, 2, R)
    yield "set_page: block_pages 0", lambda k: k.set_page([blocks], 0, 4096, BITS << 12, 12, 0, R)
    p = int(g.words.ctypes.data)
    for addr in (p + 1, p + 4, 0, -8, 1 << 64, 8.0):
        for op, args in (("load", (5,)), ("store", (1, 5)), ("fetch_or", (1, 5)),
                         ("exchange", (0, 5)), ("fetch_and", (0, 5)), ("fetch_add", (1, 5)),
                         ("bit_test_set", (1, 5)), ("compare_exchange", (0, 1, 5, 5))):
            yield f"{op} at {addr!r}", lambda k, o=op, a=addr, x=args: getattr(k, o)(a, *x)
    for value in (-1, 1 << 64, 1.0):
        yield f"store {value!r}", lambda k, v=value: k.store(p, v, R)
        yield f"fetch_or {value!r}", lambda k, v=value: k.fetch_or(p, v, R)
    for bit in (-1, 64, 1 << 70):
        yield f"bit_test_set bit {bit}", lambda k, b=bit: k.bit_test_set(p, b, R)
    yield "load with a release order", lambda k: k.load(p, atomic.RELEASE)
    yield "store with an acquire order", lambda k: k.store(p, 1, atomic.ACQUIRE)
    yield "cmpxchg fail > succ", lambda k: k.compare_exchange(
        p, 0, 1, atomic.RELAXED, atomic.SEQ_CST)
    yield "cmpxchg fail release", lambda k: k.compare_exchange(
        p, 0, 1, atomic.SEQ_CST, atomic.RELEASE)
    yield "wrong argument count", lambda k: k.fetch_or(p, 1)


def test_kernel_refuses_bad_input_before_touching_memory(kernel: Any) -> None:
    g = Guarded(random.Random(7))
    calls = list(_bad_calls(g))
    assert len(calls) > 80
    for what, call in calls:
        g.snapshot()
        with pytest.raises((ValueError, TypeError)) as info:
            call(kernel)
        assert str(info.value), what
        assert g.intact(), f"{what} touched memory before refusing"


def test_kernel_bad_values_are_value_errors(kernel: Any) -> None:
    """Out of range is ValueError (not OverflowError); only a wrong type is TypeError."""
    g = Guarded(random.Random(8))
    p = int(g.words.ctypes.data)
    for call in (lambda: kernel.fetch_or(p, -1, 5), lambda: kernel.load(p + 3, 5),
                 lambda: kernel.set_range(g.words, 0, BITS + 1, 5),
                 lambda: kernel.load(p, 9)):
        with pytest.raises(ValueError):
            call()
    assert g.intact()


def test_set_page_declines_what_the_slow_path_must_handle(kernel: Any) -> None:
    """False, with nothing set: the caller checks, refreshes or maps."""
    g = Guarded(random.Random(9), fill="zero")
    R = atomic.RELEASE
    ok = [g.block]
    for clients, client, addr in (
            ([ok], 0, BITS << 12), ([ok], 0, -1), ([ok], 0, 1 << 80), ([ok], 0, np.int64(4096)),
            ([ok], 0, True), ([ok], 1, 0), ([ok], -1, 0), ([ok], True, 0), ([ok], 1 << 70, 0),
            ([ok], np.int64(0), 0), ([ok], None, 0), ([[None]], 0, 0), ([[]], 0, 0),
            ([(g.block,)], 0, 0), ((ok,), 0, 0)):
        assert kernel.set_page(clients, client, addr, BITS << 12, 12, BITS, R) is False
    assert g.intact()
    assert kernel.set_page([[], ok], 1, (BITS - 1) << 12, BITS << 12, 12, BITS, R) is True
    assert g.as_int() == 1 << (BITS - 1)
    # memb_set_page: the same, inside a section on two private counter words
    cells = np.zeros(4, dtype=np.uint64)
    ctr, gp = int(cells.ctypes.data), int(cells.ctypes.data) + 16
    cells[2] = 7
    assert kernel.memb_set_page(ctr, gp, 7, [ok], 0, 3 << 12, BITS << 12, 12, BITS, R) is True
    assert g.as_int() == (1 << (BITS - 1)) | (1 << 3)
    # the counter moved: nothing set; the section is closed either way
    assert kernel.memb_set_page(ctr, gp, 6, [ok], 0, 5 << 12, BITS << 12, 12, BITS, R) is False
    assert g.as_int() == (1 << (BITS - 1)) | (1 << 3)
    assert cells[0] == 0


def test_the_kernel_is_built_where_there_is_a_compiler() -> None:
    """`make install` / CI: with a C compiler the optional extension must have
    been built (a silent fallback to cffi would hide a broken build).

    ``SHMDIRTY_TEST_KERNEL=absent`` says this install was made without a
    compiler on purpose (.ci/run's ``CC=/bin/false pip install .`` step,
    where gcc is still on PATH): then the kernel must be missing and the
    default backend cffi.  Unset, the compiler on this machine decides."""
    expect = os.environ.get("SHMDIRTY_TEST_KERNEL", "")
    assert expect in ("", "absent"), f"SHMDIRTY_TEST_KERNEL={expect!r} (only 'absent')"
    if expect == "absent":
        assert "kernel" not in AVAILABLE_BACKENDS, (
            "SHMDIRTY_TEST_KERNEL=absent, but shmdirty._kernel imports "
            f"(from {atomic.__file__}): the install compiled it after all")
        assert atomic.available()[0] == "cffi"
        return
    if os.environ.get("SHMDIRTY_ATOMICS", "kernel") != "kernel":
        pytest.skip("SHMDIRTY_ATOMICS chooses another backend (an install without the kernel)")
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None or not sysconfig.get_paths().get("include"):
        pytest.skip(f"no C compiler ({cc}) here: the kernel is optional")
    assert "kernel" in AVAILABLE_BACKENDS, (
        f"{cc} exists but shmdirty._kernel is not importable: reinstall "
        "(`make install` or `pip install -e .`) and read the build log")


def test_memb_set_dirty_flag_inside_a_section_leaves_it_open(kernel: Any,
                                                             map_name: str) -> None:
    """set_dirty_flag runs its own memb section in C only outside any
    section: inside ``read_section()`` it must not store 0 into the slot
    (that would end the caller's section early, and a grace period would
    stop waiting for it).  The broken variant, the C section run anyway,
    is shown to end it."""
    import shmdirty as sd

    dm = sd.DirtyMemory.create(4 << 20, name=map_name)
    try:
        assert dm.flavor == "memb"
        dm.set_dirty_flag(0, 2)             # this thread's first op claims its slot
        r = dm._rcu.reader                  # this thread's reader
        slot = r.slot
        assert slot >= 0

        def epoch() -> int:
            return next(r.epoch for r in dm.rcu.readers() if r.slot == slot)

        dm.set_dirty_flag(4096, 2)          # outside: the C section, closed again
        assert dm.get_dirty_flag(4096, 2) and epoch() == 0
        with dm.read_section():
            assert epoch() != 0
            dm.set_dirty_flag(8192, 2)
            assert epoch() != 0, "set_dirty_flag ended the caller's section"
            # the broken variant: the compiled section although nesting is 1
            assert r.section_words is not None
            kernel.memb_set_page(*r.section_words, r.seen, dm._blocks, 2, 12288,
                                 dm.ram_size, dm.page_bits, dm.block_pages, atomic.RELEASE)
            assert epoch() == 0            # caught: the outer section was ended
        assert dm.get_dirty_flag(8192, 2) and dm.get_dirty_flag(12288, 2)
    finally:
        dm.destroy()


# --- set_dirty_flag as the kernel's method (ViewCore) ---------------------------------------
def test_set_dirty_flag_runs_in_c_on_the_kernel(kernel: Any, map_name: str) -> None:
    """On the kernel backend DirtyMemory.set_dirty_flag is ViewCore's C
    method and a handle made there runs its fast path; bad input still
    reaches the Python path's errors, keywords included."""
    import shmdirty as sd

    assert sd.DirtyMemory.set_dirty_flag is atomic.VIEW_BASE.set_dirty_flag
    with sd.DirtyMemory.create(4 << 20, name=map_name) as dm:
        assert dm._flag_in_c
        dm.test_and_clear_dirty(0, 4 << 20, 2)   # new RAM starts dirty
        dm.set_dirty_flag(5 << 12, 2)
        dm.set_dirty_flag(addr=6 << 12, client=2)
        assert dm.get_dirty_flag(5 << 12, 2) and dm.get_dirty_flag(6 << 12, 2)
        for args, kwargs in (((4 << 20, 2), {}), ((0, 3), {}), ((-1, 2), {}),
                             (("0", 2), {}), ((0,), {"client": 9})):
            with pytest.raises(sd.BadInput):
                dm.set_dirty_flag(*args, **kwargs)
        with pytest.raises(TypeError):
            dm.set_dirty_flag(0, 2, 3)
        with pytest.raises(TypeError):
            dm.set_dirty_flag(0, 2, client=2)
        assert dm.dirty_pages(2) == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
def test_set_dirty_flag_in_c_from_many_threads(kernel: Any, map_name: str, flavor: str) -> None:
    """Each thread's op runs in its own reader's section (ViewCore caches
    the reader per thread state): threads that interleave, and threads
    started after others ended, all set their bits; no slot is left."""
    import threading

    import shmdirty as sd

    c = sd.DirtyMemory.create(16 << 20, name=map_name)
    c.test_and_clear_dirty(0, 16 << 20, 2)   # new RAM starts dirty
    c.close()                                # resigns; the map stays (map_name unlinks it)
    dm = sd.DirtyMemory.attach(map_name, flavor=flavor)
    try:
        pages = 16 << 20 >> 12
        rng = np.random.default_rng(5)
        mine = [rng.choice(pages, 300, replace=False) for _ in range(8)]
        turn = threading.Barrier(4)

        def run(i: int) -> None:
            for k, p in enumerate(mine[i]):
                dm.set_dirty_flag(int(p) << 12, 2)
                if k % 50 == 0:
                    turn.wait(10)   # interleave the threads' ops
                if flavor == "qsbr" and k % 64 == 0:
                    dm.quiescent()
            dm.rcu.unregister()

        for wave in (range(4), range(4, 8)):   # the second wave after the first ended
            ts = [threading.Thread(target=run, args=(i,)) for i in wave]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
            assert not any(t.is_alive() for t in ts)
        dest = np.zeros(pages // 64, dtype=np.uint64)
        found = dm.sync_dirty_bitmap(dest, 0, 16 << 20)
        expect = np.unique(np.concatenate(mine))
        got = np.flatnonzero(np.unpackbits(dest.view(np.uint8), bitorder="little"))
        assert found == len(expect) and np.array_equal(got, expect)
        assert len(dm.rcu.readers()) == 1   # only this thread's slot is left
    finally:
        dm.close()


def _page_in_sync(c: Any, dest: Any, page: int, bp: int) -> bool:
    """Does a sync of block 0 (word by word: no swap) find ``page`` dirty?"""
    dest[:] = 0
    c.swap_min_words = 1 << 30
    c.sync_dirty_bitmap(dest, 0, bp << 12)
    c.swap_min_words = 1
    return bool(dest[page >> 6] >> np.uint64(page & 63) & np.uint64(1))


@pytest.mark.parametrize("op", ["set_dirty_flag", "set_dirty_range", "set_dirty_pages",
                                "get_dirty", "test_and_clear_dirty"])
def test_the_c_path_declines_a_stale_table(kernel: Any, map_name: str, op: str) -> None:
    """After a block swap the handle's table is stale: the C path must see
    that its reader's counter moved (``seen`` != ``_seen``) and leave the op
    to the Python path, which re-reads the table, so the op reaches the
    block in use.  The broken variant, a view that claims its stale table is
    current, is shown to reach the retired block instead: the check is what
    keeps a bit from being lost (a write) or missed (a test or take)."""
    import shmdirty as sd

    bp = 4096
    with sd.DirtyMemory.create(4 * bp << 12, block_pages=bp, name=map_name) as c:
        c.swap_min_words = 1
        c.test_and_clear_dirty(0, 4 * bp << 12, 2)   # new RAM starts dirty
        dest = np.zeros(4 * bp // 64, dtype=np.uint64)

        def after_a_swap(page: int, broken: bool) -> bool:
            _page_in_sync(c, dest, 0, bp)         # block 0 starts clean
            a = sd.DirtyMemory.attach(map_name)   # its own view, this thread's reader
            try:
                a.set_dirty_flag(7 << 12, 2)       # a maps block 0 of today's table
                dest[:] = 0
                assert c.sync_dirty_bitmap(dest, 0, bp << 12) == 1   # swapped out
                assert c.generation > a.table.generation   # a's table is stale now
                if op in ("get_dirty", "test_and_clear_dirty"):
                    c.set_dirty_flag(page << 12, 2)   # in the block in use
                c.get_dirty_flag(0, 2)   # the thread's reader (a's too) sees the new counter
                assert a.rcu.reader.seen == a.rcu.gp.counter()
                if broken:
                    a._seen = a.rcu.reader.seen     # pretend it was re-read
                if op == "set_dirty_flag":
                    a.set_dirty_flag(page << 12, 2)
                elif op == "set_dirty_range":
                    a.set_dirty_range(page << 12, 4096, 1 << 2)
                elif op == "set_dirty_pages":
                    a.set_dirty_pages(np.array([page, page], dtype=np.int64), 2)
                else:
                    return bool(getattr(a, op)(page << 12, 4096, 2))
                return _page_in_sync(c, dest, page, bp)
            finally:
                a.close()

        assert after_a_swap(9, broken=False)
        assert not after_a_swap(11, broken=True), "the op used a stale table"


_OPS = ("set_dirty_flag", "set_dirty_pages", "get_dirty", "set_dirty_range",
        "test_and_clear_dirty")


def test_the_c_methods_keep_the_python_paths_signatures(kernel: Any, map_name: str) -> None:
    """help(), inspect.signature and IDEs see the C methods as they saw
    the Python methods: the same parameters (self first, unbound), and a
    docstring without the text-signature block."""
    import inspect

    import shmdirty as sd

    with sd.DirtyMemory.create(1 << 20, name=map_name) as dm:
        for op in _OPS:
            py = inspect.signature(getattr(dm, f"_{op}_py"))
            assert list(inspect.signature(getattr(dm, op)).parameters) == list(py.parameters)
            unbound = inspect.signature(getattr(sd.DirtyMemory, op))
            assert list(unbound.parameters) == ["self", *py.parameters]
            doc = getattr(sd.DirtyMemory, op).__doc__
            assert "\n--\n" not in doc and "BadInput" in doc and "HandleClosed" in doc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
@pytest.mark.parametrize("op", ["get_dirty", "set_dirty_range", "test_and_clear_dirty",
                                "set_dirty_pages"])
def test_a_thread_inside_a_c_range_op_is_inside_a_section(kernel: Any, map_name: str,
                                                          flavor: str, op: str) -> None:
    """Another thread that looks while an op runs (a range of >= 4096 pages:
    the walk releases the GIL) sees that thread inside a read-side section,
    as it does on the Python path: close() and Rcu.close() rely on
    sections_open() to refuse rather than unmap the header and slot the
    op's section still uses (a crash, or a store into a slot another
    process may own by then)."""
    import threading

    import shmdirty as sd

    ram = 64 << 20            # 16384 pages
    c = sd.DirtyMemory.create(ram, name=map_name)
    c.close()                 # resigns; the map stays (map_name unlinks it)
    dm = sd.DirtyMemory.attach(map_name, flavor=flavor)
    stop, started = threading.Event(), threading.Event()
    args = {"get_dirty": (0, ram, 2), "set_dirty_range": (0, ram, 1 << 2),
            "test_and_clear_dirty": (4096, ram - 8192, 2),
            "set_dirty_pages": (np.arange(0, ram >> 12, 2, dtype=np.int64), 2)}[op]
    fn = getattr(dm, op)

    def run() -> None:
        fn(*args)             # claims the slot, maps the blocks: the next ones run in C
        started.set()
        while not stop.is_set():
            fn(*args)
        dm.rcu.unregister()

    t = threading.Thread(target=run)
    t.start()
    try:
        assert started.wait(30)
        seen = 0
        for _ in range(20000):
            if dm.rcu.sections_open():
                seen += 1
                break
    finally:
        stop.set()
        t.join(30)
        dm.close()
    assert seen, "no look found the thread inside a section"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flavor", ["memb", "qsbr"])
def test_the_c_methods_hold_no_reference_they_should_not(kernel: Any, map_name: str,
                                                         flavor: str) -> None:
    """Each path of the C methods (done in C, handed to the Python path,
    bad input, keywords, a wrong count) gives back every reference it takes:
    the arguments' and the handle's fields' counts do not move over many
    calls.  The reader ViewCore caches per thread keeps no handle alive: a
    closed handle, and one dropped unclosed, are freed by gc."""
    import gc
    import sys
    import threading
    import weakref

    import shmdirty as sd

    ram = 4 << 20
    c = sd.DirtyMemory.create(ram, name=map_name)
    c.close()                 # resigns; the map stays (map_name unlinks it)
    dm = sd.DirtyMemory.attach(map_name, flavor=flavor)
    big, addr, length = 1 << 100, 5 << 12, 3 << 12
    pages = np.arange(5, 200, 3, dtype=np.int64)

    def calls() -> None:
        dm.set_dirty_flag(addr, 2)
        dm.set_dirty_flag(addr=addr, client=2)
        dm.get_dirty(addr, length, 2)
        dm.set_dirty_range(addr, length, 5)
        dm.test_and_clear_dirty(addr, length, 0)
        dm.set_dirty_pages(pages, 2)
        for op, args in (("set_dirty_flag", (big, 2)), ("get_dirty", (addr, big, 2)),
                         ("set_dirty_pages", (pages, big)),
                         ("set_dirty_range", (addr, length, big)),
                         ("test_and_clear_dirty", (addr, length, 2, big))):
            with pytest.raises((sd.ShmDirtyError, TypeError)):
                getattr(dm, op)(*args)

    try:
        for _ in range(200):
            calls()
        watched = (big, addr, length, pages, dm, dm._local, dm._table, dm._blocks,
                   dm.rcu.reader)
        before = [sys.getrefcount(o) for o in watched]
        for _ in range(2000):
            calls()
        assert [sys.getrefcount(o) for o in watched] == before
        for _ in range(3):    # threads that end: the view caches a dead thread's reader
            t = threading.Thread(target=calls)
            t.start()
            t.join(30)
        other = sd.DirtyMemory.attach(map_name, flavor=flavor)
        other.set_dirty_flag(addr, 2)
        other.get_dirty(addr, length, 2)
        gone = weakref.ref(other)
        other.close()
        del other
        unclosed = sd.DirtyMemory.attach(map_name, flavor=flavor)
        unclosed.get_dirty(addr, length, 2)
        dropped = weakref.ref(unclosed)
        del unclosed
        gc.collect()
        assert gone() is None and dropped() is None
    finally:
        dm.close()


def test_set_dirty_pages_in_c_agrees_with_the_python_path(kernel: Any, map_name: str) -> None:
    """Every kind of ``pages`` the C fast path takes or declines ends as the
    Python path ends: the same bits, or the same error, nothing set."""
    import shmdirty as sd

    n = 4 * 4096
    big = np.arange(0, n, 7, dtype=np.int64)
    cases: list[Any] = [
        big, big.astype(np.uint64), big.astype(np.int32), big[::3], big.reshape(-1, 1),
        np.array([], dtype=np.int64), np.array([n], dtype=np.int64),
        np.array([-1, 3], dtype=np.int64), np.array([1 << 63], dtype=np.uint64),
        np.array([2.0]), [1, 2], b"\x01" * 8, np.array([True]), big[:5].copy(order="F"),
    ]
    with sd.DirtyMemory.create(n << 12, block_pages=4096, name=map_name) as dm:
        def run(pages: Any, client: Any) -> tuple[str, int]:
            dm.test_and_clear_dirty(0, n << 12, 2)
            try:
                dm.set_dirty_pages(pages, client)
                out = "ok"
            except Exception as e:  # noqa: BLE001 - the outcome is compared
                out = type(e).__name__
            dest = np.zeros(n // 64, dtype=np.uint64)
            dm.sync_dirty_bitmap(dest, 0, n << 12)
            return out, int(np.bitwise_count(dest).sum())

        for client in (2, 3, np.int64(2)):
            for pages in cases:
                dm._flag_in_c = True
                fast = run(pages, client)
                dm._flag_in_c = False    # the Python path alone
                slow = run(pages, client)
                assert fast == slow, (pages, client, fast, slow)
        dm._flag_in_c = True
        assert run(big, 2) == ("ok", len(big))


# --- the contract between the C and the Python layer (shmdirty/atomic.py) -------------------
def _c_fields(t: type) -> set[str]:
    return {n for n, v in vars(t).items() if not n.startswith("__")
            and isinstance(v, (types.MemberDescriptorType, types.GetSetDescriptorType))}


def test_the_kernel_contract_holds(kernel: Any, map_name: str) -> None:
    """The one check that the C and Python sides of the kernel agree, on the
    one table that declares it (atomic.OPS, KERNEL_SLOW_PATHS,
    KERNEL_ATTRIBUTES, READER_FIELDS, VIEW_FIELDS): the C bases hold exactly
    the declared fields; ViewCore's methods are exactly the slow-path table's
    keys, each with a Python path of the same signature; the attributes the C
    reads by name are there on a live handle; and the kernel takes exactly the
    declared names (contract(), setup())."""
    import inspect

    import shmdirty as sd
    from shmdirty import rcu

    k = kernel
    # The mirrored fields: C members (or properties) of the bases, not slots too.
    assert _c_fields(k.ReaderCore) == set(atomic.READER_FIELDS)
    assert _c_fields(k.ViewCore) == set(atomic.VIEW_FIELDS)
    assert not set(rcu.Reader.__slots__) & set(atomic.READER_FIELDS)
    assert issubclass(rcu.Reader, k.ReaderCore) and issubclass(sd.DirtyMemory, k.ViewCore)
    # The C methods and their Python paths.
    methods = {n for n, v in vars(k.ViewCore).items()
               if isinstance(v, types.MethodDescriptorType)}
    assert methods == set(atomic.KERNEL_SLOW_PATHS)
    for op, slow in atomic.KERNEL_SLOW_PATHS.items():
        assert getattr(sd.DirtyMemory, op) is getattr(k.ViewCore, op)
        py = inspect.signature(getattr(sd.DirtyMemory, slow))
        assert list(inspect.signature(getattr(k.ViewCore, op)).parameters) == list(py.parameters)
    # The attributes the C reads by name, on a live handle.
    names = atomic.KERNEL_ATTRIBUTES
    with sd.DirtyMemory.create(1 << 20, name=map_name) as dm:
        dm.set_dirty_flag(0, 2)
        block = next(b for b in dm._blocks[2] if b is not None)
        assert isinstance(getattr(block, names["block_base"]), int)
        assert memoryview(getattr(block, names["block_words"])).nbytes * 8 >= dm.block_pages
        assert isinstance(getattr(dm._local, names["local_reader"]), k.ReaderCore)
        assert getattr(dm._table, names["table_ram_size"]) == dm.ram_size
        for field in atomic.VIEW_FIELDS:
            getattr(dm, field)
        for field in atomic.READER_FIELDS:
            getattr(dm._local.reader, field)
    # The kernel takes exactly the declared names: one missing or one more is refused.
    paths, attrs = dict(atomic.KERNEL_SLOW_PATHS), dict(atomic.KERNEL_ATTRIBUTES)
    for bad in ({k: v for k, v in paths.items() if k != "get_dirty"}, {**paths, "extra": "x"}):
        with pytest.raises(ValueError, match="slow_paths"):
            k.contract(bad, attrs)
    with pytest.raises(ValueError, match="attributes"):
        k.contract(paths, {k: v for k, v in attrs.items() if k != "block_words"})
    k.contract(paths, attrs)
    # One table of op names: the kernel's, the cffi and the public backends'.
    assert set(k.OP_NAMES) == set(atomic.OPS)
    table = atomic.patomic_ops()
    assert set(table) == set(atomic.OPS)
    for bad in ({n: a for n, a in table.items() if n != "or"}, {**table, "xor": table["or"]}):
        with pytest.raises(ValueError):
            k.setup(bad)
    k.setup(table)
    for name in AVAILABLE_BACKENDS:
        b = atomic._CLASSES[name]()
        assert all(callable(getattr(b, op.api)) for op in atomic.OPS.values() if op.api)


# --- the memb section's memory orders, C and Python twins ------------------------------------
_P = ctypes.c_void_p
_PROTOS = {  # patomic's op signatures (the kernel's kernel.h), by the kernel's op name
    "load": ctypes.CFUNCTYPE(None, _P, ctypes.c_int, _P),
    "store": ctypes.CFUNCTYPE(None, _P, _P, ctypes.c_int),
    "or": ctypes.CFUNCTYPE(None, _P, _P, ctypes.c_int),
    "exchange": ctypes.CFUNCTYPE(None, _P, _P, ctypes.c_int, _P),
    "fetch_or": ctypes.CFUNCTYPE(None, _P, _P, ctypes.c_int, _P),
    "fetch_and": ctypes.CFUNCTYPE(None, _P, _P, ctypes.c_int, _P),
    "fetch_add": ctypes.CFUNCTYPE(None, _P, _P, ctypes.c_int, _P),
    "cmpxchg_strong": ctypes.CFUNCTYPE(ctypes.c_int, _P, _P, _P, ctypes.c_int, ctypes.c_int),
    "test_set": ctypes.CFUNCTYPE(ctypes.c_int, _P, ctypes.c_int, ctypes.c_int),
    "test_reset": ctypes.CFUNCTYPE(ctypes.c_int, _P, ctypes.c_int, ctypes.c_int),
}


def _recording_ops(log: list[tuple[str, int, int, int]]) -> tuple[dict[str, int], list[Any]]:
    """A patomic op table for the kernel's setup() whose loads and stores log
    (op, word address, value, order) and then run patomic's own function;
    the other ops only forward.  Returns the table and the callbacks (keep
    them alive while the table is in use)."""
    real = {name: _PROTOS[name](address) for name, address in atomic.patomic_ops().items()}

    def load(obj: int, order: int, ret: int) -> None:
        real["load"](obj, order, ret)
        log.append(("load", obj, ctypes.c_uint64.from_address(ret).value, order))

    def store(obj: int, desired: int, order: int) -> None:
        log.append(("store", obj, ctypes.c_uint64.from_address(desired).value, order))
        real["store"](obj, desired, order)

    def forward(name: str) -> Any:
        return lambda *args: real[name](*args)

    keep = [_PROTOS[n](load if n == "load" else store if n == "store" else forward(n))
            for n in _PROTOS]
    table = {n: ctypes.cast(cb, _P).value or 0 for n, cb in zip(_PROTOS, keep, strict=True)}
    return table, keep


def test_the_memb_section_passes_the_same_orders_in_c_and_python(kernel: Any,
                                                                 map_name: str) -> None:
    """A memb read-side section is written twice: Reader.read_lock /
    read_unlock (shmdirty/rcu.py) and memb_open / memb_close
    (shmdirty/_kernel_src/cores.c), which the C fast paths open for a caller
    outside any section.  With a recording op table handed to the kernel,
    each path must pass patomic: a seq_cst store of the slot counter, a
    seq_cst load of the grace-period counter (the reader's half of the
    Dekker pair: a grace period either sees the slot or this load sees it
    advance), then a release store of 0 (the section's accesses happen
    before a waiter that reads 0).  A weaker order on any of them (say the
    entry store as release) breaks the pair and fails here."""
    import shmdirty as sd

    log: list[tuple[str, int, int, int]] = []
    with sd.DirtyMemory.create(4 << 20, block_pages=512, name=map_name) as dm:
        dm.set_dirty_flag(0, 2)                # claims this thread's slot
        r = dm._local.reader
        assert r.section_words is not None and r.nesting == 0
        ctr, gp = r.section_words
        seen = r.seen
        expect = [("store", ctr, seen, atomic.SEQ_CST), ("load", gp, seen, atomic.SEQ_CST),
                  ("store", ctr, 0, atomic.RELEASE)]
        table, keep = _recording_ops(log)
        paths: dict[str, Callable[[], Any]] = {
            "python read_lock / read_unlock": lambda: (r.read_lock(), r.read_unlock()),
            "C set_dirty_flag": lambda: dm.set_dirty_flag(4096, 2),
            "C get_dirty (a walk)": lambda: dm.get_dirty(0, 3 << 20, 2),
            "C set_dirty_range": lambda: dm.set_dirty_range(0, 8192, 0b101),
            "C test_and_clear_dirty": lambda: dm.test_and_clear_dirty(0, 8192, 2),
            "C set_dirty_pages": lambda: dm.set_dirty_pages(np.array([3, 700], np.int64), 2),
        }
        kernel.setup(table)
        try:
            for what, run in paths.items():
                log.clear()
                run()
                got = [e for e in log if e[1] in (ctr, gp)]
                assert got == expect, (what, got)
        finally:
            kernel.setup(atomic.patomic_ops())
            del keep
        assert dm.get_dirty_flag(700 << 12, 2) and r.nesting == 0


# --- each C method against its Python path, on the same inputs --------------------------------
_PAGES = 5 * 128 + 40   # RAM pages: five blocks of 128 pages and part of a sixth
_ADDR = st.one_of(st.integers(-2, (_PAGES + 2) << 12), st.sampled_from([0, (_PAGES << 12) - 1]))
_CALL = st.one_of(
    st.tuples(st.just("set_dirty_flag"), _ADDR, st.integers(-1, 3)),
    st.tuples(st.just("set_dirty_pages"),
              st.lists(st.integers(-1, _PAGES), max_size=40).map(
                  lambda p: np.array(p, dtype=np.int64)), st.integers(-1, 3)),
    *[st.tuples(st.just(op), _ADDR, st.integers(-4096, 3 * 128 << 12), st.integers(-1, 3))
      for op in ("get_dirty", "test_and_clear_dirty")],
    st.tuples(st.just("set_dirty_range"), _ADDR, st.integers(-4096, 3 * 128 << 12),
              st.integers(-1, 8)),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(_CALL, min_size=1, max_size=10), flavor=st.sampled_from(["memb", "qsbr"]))
def test_each_c_method_agrees_with_its_python_path(kernel: Any, calls: list[tuple[Any, ...]],
                                                   flavor: str) -> None:
    """The same calls (valid and not: addresses and ranges past RAM,
    negative lengths, bad clients and masks, pages outside RAM), on two maps
    alike: one through ViewCore's C methods, one through the Python paths
    ``_<op>_py`` they replace.  Every result or error and the final bitmaps
    of every client agree."""
    import shmdirty as sd

    names = [TOKEN + secrets.token_hex(4) for _ in range(2)]
    maps = []
    try:
        for name in names:
            c = sd.DirtyMemory.create(_PAGES << 12, block_pages=128, name=name)
            c.test_and_clear_dirty(0, _PAGES << 12, 2)   # new RAM starts dirty: VGA, CODE too
            c.test_and_clear_dirty(0, _PAGES << 12, 1)
            c.test_and_clear_dirty(0, _PAGES << 12, 0)
            if flavor == "qsbr":   # a reader of its own (this process read it as memb)
                c.close()          # resigns; the map stays (unlinked below)
                c = sd.DirtyMemory.attach(name, flavor="qsbr")
            maps.append(c)
        fast, slow = maps
        assert fast._flag_in_c and sd.DirtyMemory.set_dirty_flag is kernel.ViewCore.set_dirty_flag

        def outcome(dm: Any, op: str, args: tuple[Any, ...]) -> Any:
            try:
                return getattr(dm, op)(*args)
            except Exception as e:  # noqa: BLE001 - the outcome is compared
                return type(e), str(e)

        for op, *args in calls:
            assert outcome(fast, op, tuple(args)) == outcome(slow, f"_{op}_py", tuple(args)), op
        for client in range(3):
            bits = [[m._get_dirty_py(p << 12, 4096, client) for p in range(_PAGES)]
                    for m in maps]
            assert bits[0] == bits[1], client
    finally:
        for m in maps:
            m.close()
        for name in names:
            unlink_map(name)
