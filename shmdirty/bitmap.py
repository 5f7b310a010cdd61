"""Bit operations on the words of one bitmap block.

Bit ``b`` of a block is bit ``b % 64`` of word ``b // 64`` (the bit order of
a little-endian uint64, as KVM's dirty log has it).  A ``Block`` pairs a
numpy view of the words (bulk reads, all-ones stores) with a cffi pointer to
word 0 (atomics).  The rules every caller keeps:

- reads may be plain numpy loads: a bit seen set was set; a bit missed was
  set concurrently, which is the same as it being set just after the read;
- setting bits: an atomic fetch_or, or a numpy store of all-ones over a
  whole word (monotonic, so a racing clear orders before or after it),
  followed by a fence;
- clearing bits others may be setting: an atomic exchange or fetch_and.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import atomic

ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
U64 = np.dtype(np.uint64)
_SHIFTS = np.arange(64, dtype=np.uint64)


@dataclass(eq=False, slots=True)
class Block:
    """One mapped block: ``words`` (numpy view) and ``base`` (cffi pointer)."""

    block_id: int
    words: np.ndarray[Any, np.dtype[np.uint64]]
    base: Any


def walk(page: int, end: int, block_pages: int) -> Iterator[tuple[int, int, int]]:
    """The seed's block walk: (block index, first bit, count) over [page, end)."""
    while page < end:
        idx, offset = divmod(page, block_pages)
        num = min(end - page, block_pages - offset)
        yield idx, offset, num
        page += num


def edge_masks(first: int, count: int) -> tuple[int, int, int, int]:
    """Words [w0, w1] hold bits [first, first+count); masks of the first and
    last word (equal words when the range sits in one)."""
    last = first + count - 1
    w0, w1 = first >> 6, last >> 6
    m0 = (0xFFFF_FFFF_FFFF_FFFF << (first & 63)) & 0xFFFF_FFFF_FFFF_FFFF
    m1 = 0xFFFF_FFFF_FFFF_FFFF >> (63 - (last & 63))
    if w0 == w1:
        m0 &= m1
        m1 = m0
    return w0, w1, m0, m1


def range_masks(first: int, count: int) -> tuple[int, np.ndarray[Any, np.dtype[np.uint64]]]:
    """First word and the per-word masks of bits [first, first+count)."""
    w0, w1, m0, m1 = edge_masks(first, count)
    masks = np.full(w1 - w0 + 1, ALL, dtype=np.uint64)
    masks[0] = m0
    masks[-1] = m1 if w1 > w0 else m0
    return w0, masks


def any_set(block: Block, first: int, count: int) -> bool:
    """Is any bit of [first, first+count) set?"""
    w0, w1, m0, m1 = edge_masks(first, count)
    w = block.words
    if w0 == w1:
        return bool(int(w[w0]) & m0)
    return bool(int(w[w0]) & m0 or int(w[w1]) & m1 or w[w0 + 1:w1].any())


def all_set(block: Block, first: int, count: int) -> bool:
    """Is every bit of [first, first+count) set?"""
    w0, w1, m0, m1 = edge_masks(first, count)
    w = block.words
    if w0 == w1:
        return int(w[w0]) & m0 == m0
    return (int(w[w0]) & m0 == m0 and int(w[w1]) & m1 == m1
            and bool((w[w0 + 1:w1] == ALL).all()))


def test(block: Block, bit: int) -> bool:
    """One bit (an acquire load of its word)."""
    return bool(atomic.load(block.base + ((bit >> 6) << 3), atomic.ACQUIRE) >> (bit & 63) & 1)


def set_range(block: Block, first: int, count: int) -> None:
    """Set bits [first, first+count): atomics at the edges, all-ones inside."""
    w0, w1, m0, m1 = edge_masks(first, count)
    base = block.base
    # release: whoever takes these bits (acquire) sees what was written before.
    atomic.fetch_or(base + (w0 << 3), m0, atomic.RELEASE)
    if w1 > w0:
        if w1 > w0 + 1:
            block.words[w0 + 1:w1] = ALL
            atomic.fence()  # the stores are visible before we go on
        atomic.fetch_or(base + (w1 << 3), m1, atomic.RELEASE)


def or_words(block: Block, w0: int, bits: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
    """OR ``bits`` into words w0.. of the block.  Words whose bits are
    already all set cost nothing; whole-word sets are numpy stores."""
    cur = block.words[w0:w0 + len(bits)]
    missing = bits & ~cur
    todo = np.flatnonzero(missing)
    if not len(todo):
        return
    full = todo[bits[todo] == ALL]
    if len(full):
        cur[full] = ALL
        atomic.fence()
    part = todo[bits[todo] != ALL]
    # release: as set_range.
    atomic.or_many(block.base + (w0 << 3), part.tolist(), bits[part].tolist(), atomic.RELEASE)


def or_sparse(block: Block, widx: np.ndarray[Any, np.dtype[np.intp]],
              bits: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
    """OR ``bits[i]`` into word ``widx[i]`` (distinct words); words whose
    bits are already set cost nothing."""
    todo = np.flatnonzero(bits & ~block.words[widx])
    # release: as set_range.
    atomic.or_many(block.base, widx[todo].tolist(), bits[todo].tolist(), atomic.RELEASE)


def take(block: Block, first: int, count: int) -> tuple[int, np.ndarray[Any, np.dtype[np.uint64]]]:
    """Atomically take (read and clear) bits [first, first+count).

    Returns the first word index and the taken bits per word.  Words read as
    clean are skipped: a bit set after that read stays for the next taker."""
    w0, masks = range_masks(first, count)
    view = block.words[w0:w0 + len(masks)]
    taken = np.zeros(len(masks), dtype=np.uint64)
    todo = np.flatnonzero(view & masks)
    if len(todo):
        # acq_rel: acquire pairs with the setters' release (the taker sees the
        # data written before the bit); release orders our earlier reads.
        taken[todo] = atomic.take_many(block.base + (w0 << 3), todo.tolist(),
                                       masks[todo].tolist(), atomic.ACQ_REL)
    return w0, taken


def popcount(words: np.ndarray[Any, np.dtype[np.uint64]]) -> int:
    """Number of set bits."""
    return int(np.bitwise_count(words).sum())


def shifted(src: np.ndarray[Any, np.dtype[np.uint64]], first_bit: int, nwords: int,
            lo: int, hi: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """``nwords`` words whose bit k is bit ``first_bit + k`` of ``src``
    (``first_bit`` may be negative), keeping only the source bits in
    [lo, hi); every other bit is 0."""
    out = np.zeros(nwords, dtype=np.uint64)
    lo = max(lo, first_bit, 0)
    hi = min(hi, first_bit + nwords * 64, len(src) * 64)
    if hi <= lo:
        return out
    # Work on the source words covering [lo, hi), then shift into place.
    s0 = lo >> 6
    s1 = (hi - 1) >> 6
    seg = src[s0:s1 + 1].astype(np.uint64, copy=True)
    seg[0] &= np.uint64((0xFFFF_FFFF_FFFF_FFFF << (lo & 63)) & 0xFFFF_FFFF_FFFF_FFFF)
    seg[-1] &= np.uint64(0xFFFF_FFFF_FFFF_FFFF >> (63 - ((hi - 1) & 63)))
    # Bit j of seg is source bit s0*64 + j, which goes to output bit
    # s0*64 + j - first_bit.
    delta = s0 * 64 - first_bit          # output bit of seg bit 0
    wshift, bshift = delta >> 6, delta & 63  # floor division, also for negatives
    if bshift:
        lo_part = seg << np.uint64(bshift)
        hi_part = seg >> np.uint64(64 - bshift)
        spread = np.zeros(len(seg) + 1, dtype=np.uint64)
        spread[:-1] |= lo_part
        spread[1:] |= hi_part
    else:
        spread = seg
    # spread[i] is output word wshift + i.
    a = max(wshift, 0)
    b = min(wshift + len(spread), nwords)
    if b > a:
        out[a:b] = spread[a - wshift:b - wshift]
    return out
