"""Bit operations on one block's words (shmdirty/bitmap.py), checked against
a plain-Python model of the same bits, on each atomics backend in turn
(``atomics_backend``: the kernel's C loops and the numpy + cffi twins): both
must give the same bits for the same inputs.

Blocks here are process-local numpy words (the functions take any aligned
words); ranges start and end inside words and on word edges.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shmdirty import atomic, bitmap
from shmdirty.bitmap import Block

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("atomics_backend")]

WORDS = 8                  # 512 bits a block
NBITS = WORDS * 64
SEEDS = range(40)


def block_of(bits: list[int]) -> Block:
    """A Block over fresh words holding ``bits`` (a list of 0/1)."""
    w = np.zeros(WORDS, dtype=np.uint64)
    for i, b in enumerate(bits):
        if b:
            w[i >> 6] |= np.uint64(1) << np.uint64(i & 63)
    return Block(-1, w, int(w.ctypes.data))


def bits_of(block: Block) -> list[int]:
    return [int(block.words[i >> 6] >> np.uint64(i & 63) & np.uint64(1)) for i in range(NBITS)]


def random_case(seed: int) -> tuple[list[int], int, int]:
    """Random bits (sparse, dense, empty or full) and a range [first, first+count)."""
    rng = np.random.default_rng(seed)
    density = [0.0, 0.02, 0.5, 1.0][seed % 4]
    bits = (rng.random(NBITS) < density).astype(int).tolist()
    edges = [0, 1, 63, 64, 65, 127, 128, 200, NBITS - 64, NBITS - 1]
    first = int(rng.choice(edges)) if seed % 3 else int(rng.integers(0, NBITS))
    count = int(rng.integers(1, NBITS - first + 1))
    return bits, first, count


def test_walk_covers_the_range_block_by_block() -> None:
    """The seed's walk: (idx, offset, num) pieces that tile [page, end)."""
    for page, end, bp in ((0, 0, 64), (0, 64, 64), (5, 700, 64), (63, 65, 64),
                          (128, 129, 128), (1000, 5000, 1024)):
        pieces = list(bitmap.walk(page, end, bp))
        got = [idx * bp + off + k for idx, off, num in pieces for k in range(num)]
        assert got == list(range(page, end))
        assert all(0 <= off < bp and 0 < num <= bp - off for _, off, num in pieces)


@pytest.mark.parametrize("seed", SEEDS)
def test_queries_match_the_model(seed: int) -> None:
    bits, first, count = random_case(seed)
    b = block_of(bits)
    window = bits[first:first + count]
    assert bitmap.any_set(b, first, count) == any(window)
    assert bitmap.all_set(b, first, count) == all(window)
    assert bitmap.test(b, first) == bool(bits[first])
    assert bitmap.popcount(b.words) == sum(bits)
    assert bits_of(b) == bits   # queries change nothing


@pytest.mark.parametrize("seed", SEEDS)
def test_set_range_sets_exactly_the_range(seed: int) -> None:
    bits, first, count = random_case(seed)
    b = block_of(bits)
    bitmap.set_range(b, first, count)
    want = bits[:first] + [1] * count + bits[first + count:]
    assert bits_of(b) == want


@pytest.mark.parametrize("seed", SEEDS)
def test_take_returns_the_range_and_clears_only_it(seed: int) -> None:
    bits, first, count = random_case(seed)
    b = block_of(bits)
    w0, taken = bitmap.take(b, first, count)
    assert w0 == first >> 6
    got = [int(taken[(i >> 6) - w0] >> np.uint64(i & 63) & np.uint64(1))
           for i in range(w0 * 64, (w0 + len(taken)) * 64)]
    want = [bits[i] if first <= i < first + count else 0 for i in range(w0 * 64,
                                                                        w0 * 64 + len(got))]
    assert got == want
    assert bits_of(b) == bits[:first] + [0] * count + bits[first + count:]
    # test_and_clear: the same take, answering whether anything was set.
    b2 = block_of(bits)
    assert bitmap.test_and_clear(b2, first, count) == any(bits[first:first + count])
    assert bits_of(b2) == bits_of(b)


@pytest.mark.parametrize("seed", SEEDS)
def test_or_words_and_or_bitmap_merge_a_source(seed: int) -> None:
    bits, first, count = random_case(seed)
    rng = np.random.default_rng(seed + 1000)
    src_bits = (rng.random(NBITS + 64) < 0.3).astype(int).tolist()
    src = block_of(src_bits[:NBITS]).words
    src = np.concatenate([src, np.zeros(1, np.uint64)])
    src_first = int(rng.integers(0, 64))
    count = min(count, NBITS - src_first)
    b = block_of(bits)
    bitmap.or_bitmap(b, first, count, src, src_first)
    want = list(bits)
    for k in range(count):
        want[first + k] |= src_bits[src_first + k] if src_first + k < NBITS else 0
    assert bits_of(b) == want
    # or_bitmaps: the same into several blocks at once.
    many = [block_of(bits) for _ in range(3)]
    bitmap.or_bitmaps(many, first, count, src, src_first)
    assert all(bits_of(m) == want for m in many)
    # or_words: whole words ORed in from word w0.
    w0 = first >> 6
    b3 = block_of(bits)
    extra = rng.integers(0, 2 ** 63, size=WORDS - w0, dtype=np.uint64)
    extra[0] = bitmap.ALL     # an all-ones word takes the numpy-store path
    bitmap.or_words(b3, w0, extra)
    assert np.array_equal(b3.words[w0:], block_of(bits).words[w0:] | extra)
    assert np.array_equal(b3.words[:w0], block_of(bits).words[:w0])


def test_or_sparse_sets_the_named_words() -> None:
    b = block_of([0] * NBITS)
    widx = np.array([0, 3, 7], dtype=np.intp)
    vals = np.array([1, 0xF0, 1 << 63], dtype=np.uint64)
    bitmap.or_sparse(b, widx, vals)
    want = np.zeros(WORDS, np.uint64)
    want[widx] = vals
    assert np.array_equal(b.words, want)


@pytest.mark.parametrize("op", [bitmap.WALK_ANY, bitmap.WALK_ALL, bitmap.WALK_SET,
                                bitmap.WALK_TAKE])
def test_walk_blocks_over_several_blocks(op: int) -> None:
    """walk_blocks across block edges: the same as the per-block functions,
    and an unmapped block it needs is named (-1 - index), nothing done."""
    bp = NBITS
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        raw = [(rng.random(NBITS) < [0.0, 0.5, 1.0][seed % 3]).astype(int).tolist()
               for _ in range(3)]
        blocks: list[Block | None] = [block_of(r) for r in raw]
        page = int(rng.integers(0, 3 * bp - 1))
        end = int(rng.integers(page + 1, 3 * bp + 1))
        flat = [x for r in raw for x in r]
        window = flat[page:end]
        got = bitmap.walk_blocks(blocks, page, end, bp, op)
        after = [x for blk in blocks if blk is not None for x in bits_of(blk)]
        if op == bitmap.WALK_ANY:
            assert got == int(any(window)) and after == flat
        elif op == bitmap.WALK_ALL:
            assert got == int(all(window)) and after == flat
        elif op == bitmap.WALK_SET:
            assert got == 0 and after == flat[:page] + [1] * (end - page) + flat[end:]
        else:
            assert got == int(any(window))
            assert after == flat[:page] + [0] * (end - page) + flat[end:]
    blocks = [block_of([1] * NBITS), None, block_of([1] * NBITS)]
    before = [bits_of(b) for b in blocks if b is not None]
    assert bitmap.walk_blocks(blocks, 0, 3 * bp, bp, op) == -2
    assert [bits_of(b) for b in blocks if b is not None] == before


def test_page_setters_set_one_page_or_decline() -> None:
    set_page, set_pages = bitmap.page_setters()
    bp, pb = NBITS, 12
    blocks: list[list[Block | None]] = [[block_of([0] * NBITS), None]]
    ram = 2 * bp << pb
    assert set_page(blocks, 0, (5 << pb) + 7, ram, pb, bp, atomic.RELEASE)
    assert bits_of(blocks[0][0]) == [1 if i == 5 else 0 for i in range(NBITS)]  # type: ignore[arg-type]
    # Declined, nothing touched: a block not mapped, an address past RAM, a bad client.
    assert not set_page(blocks, 0, (bp + 1) << pb, ram, pb, bp, atomic.RELEASE)
    assert not set_page(blocks, 0, ram, ram, pb, bp, atomic.RELEASE)
    assert not set_page(blocks, 1, 0, ram, pb, bp, atomic.RELEASE)
    pages = np.array([0, 3, 64, 3, bp - 1], dtype=np.int64)
    assert set_pages(blocks[0], pages, bp, atomic.RELEASE) == -1
    assert {i for i, x in enumerate(bits_of(blocks[0][0])) if x} == {0, 3, 5, 64, bp - 1}  # type: ignore[arg-type]
    assert set_pages(blocks[0], np.array([bp + 2], dtype=np.int64), bp, atomic.RELEASE) == 1


def test_shifted_moves_bits_and_keeps_the_window() -> None:
    src = np.array([0xFFFF_FFFF_FFFF_FFFF, 0x1], dtype=np.uint64)
    # Bit k of the result is bit k + 60 of src, only source bits in [60, 66) kept.
    out = bitmap.shifted(src, 60, 1, 60, 66)
    assert int(out[0]) == 0b11111
    assert bitmap.shifted(src, -3, 1, 0, 128)[0] == np.uint64(0xFFFF_FFFF_FFFF_FFF8)
    empty: Any = bitmap.shifted(src, 200, 2, 0, 128)
    assert not empty.any()
