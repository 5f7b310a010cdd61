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

On the ``kernel`` atomics backend each function below is one call into
shmdirty/_kernel_src/block.c, which keeps these rules word by word in C; on the other
backends it is numpy plus one atomic per word that needs one.  Both give the
same bits (tests/test_bitmap.py runs them side by side).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import atomic

ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
U64 = np.dtype(np.uint64)
_SHIFTS = np.arange(64, dtype=np.uint64)


@dataclass(eq=False, slots=True)
class Block:
    """One mapped block: ``words`` (numpy view) and ``base`` (the int address
    of word 0, for atomics)."""

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
    k = atomic.batch
    if k is not None:
        return bool(k.any_set(block.words, first, count))
    w0, w1, m0, m1 = edge_masks(first, count)
    w = block.words
    if w0 == w1:
        return bool(int(w[w0]) & m0)
    return bool(int(w[w0]) & m0 or int(w[w1]) & m1 or w[w0 + 1:w1].any())


def all_set(block: Block, first: int, count: int) -> bool:
    """Is every bit of [first, first+count) set?"""
    k = atomic.batch
    if k is not None:
        return bool(k.all_set(block.words, first, count))
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
    k = atomic.batch
    if k is not None:
        # release: as below.
        k.set_range(block.words, first, count, atomic.RELEASE)
        return
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
    k = atomic.batch
    if k is not None:
        # release: as set_range.
        k.or_bitmap(block.words, w0 << 6, len(bits) << 6, np.ascontiguousarray(bits), 0,
                    atomic.RELEASE)
        return
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
    k = atomic.batch
    if k is not None:
        # release: as set_range.
        k.or_sparse(block.words, np.ascontiguousarray(widx, dtype=np.int64),
                    np.ascontiguousarray(bits, dtype=np.uint64), atomic.RELEASE)
        return
    todo = np.flatnonzero(bits & ~block.words[widx])
    # release: as set_range.
    atomic.or_many(block.base, widx[todo].tolist(), bits[todo].tolist(), atomic.RELEASE)


def take(block: Block, first: int, count: int) -> tuple[int, np.ndarray[Any, np.dtype[np.uint64]]]:
    """Atomically take (read and clear) bits [first, first+count).

    Returns the first word index and the taken bits per word.  Words read as
    clean are skipped: a bit set after that read stays for the next taker."""
    k = atomic.batch
    if k is not None:
        w0 = first >> 6
        taken = np.empty(((first + count - 1) >> 6) - w0 + 1, dtype=np.uint64)
        # acq_rel: as below.
        k.take(block.words, first, count, taken, atomic.ACQ_REL)
        return w0, taken
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


def test_and_clear(block: Block, first: int, count: int) -> bool:
    """Take bits [first, first+count) as ``take`` does; True if any was set."""
    k = atomic.batch
    if k is not None:
        return bool(k.take(block.words, first, count, None, atomic.ACQ_REL))
    return bool(take(block, first, count)[1].any())


def or_bitmap(block: Block, first: int, count: int,
              src: np.ndarray[Any, np.dtype[np.uint64]], src_first: int) -> None:
    """OR bits [src_first, src_first+count) of the little-endian bitmap
    ``src`` into bits [first, first+count) of the block (any bit offsets)."""
    k = atomic.batch
    if k is not None:
        # release: as set_range.
        k.or_bitmap(block.words, first, count, src, src_first, atomic.RELEASE)
        return
    if count:
        w0 = first >> 6
        nwords = ((first + count - 1) >> 6) - w0 + 1
        or_words(block, w0, shifted(src, src_first - (first & 63), nwords,
                                    src_first, src_first + count))


def or_bitmaps(blocks: list[Block], first: int, count: int,
               src: np.ndarray[Any, np.dtype[np.uint64]], src_first: int) -> None:
    """``or_bitmap`` into every block of ``blocks`` (one per client, at most
    8) in one pass over the source, as QEMU's set_dirty_lebitmap loop ORs
    each nonzero word into every client.  The Python twin of the kernel's
    or_bitmaps: the source is shifted once and ORed into each block."""
    k = atomic.batch
    if k is not None:
        # release: as set_range.
        k.or_bitmaps([b.words for b in blocks], first, count, src, src_first, atomic.RELEASE)
        return
    if count:
        w0 = first >> 6
        nwords = ((first + count - 1) >> 6) - w0 + 1
        bits = shifted(src, src_first - (first & 63), nwords, src_first, src_first + count)
        for b in blocks:
            or_words(b, w0, bits)  # release ORs, all-ones stores + fence: as set_range


def set_page(clients: list[list[Block | None]], client: Any, addr: Any, ram_size: int,
             page_bits: int, block_pages: int, order: int) -> bool:
    """Set the bit of the page holding byte ``addr`` in ``clients[client]``'s
    blocks (None where not mapped) and return True; return False, touching
    nothing, if ``client`` or ``addr`` is not an int in range ([0,
    len(clients)), [0, ram_size)) or the block is not mapped (the caller's
    slow path).  The Python twin of the kernel's set_page."""
    if (client.__class__ is not int or not 0 <= client < len(clients)
            or addr.__class__ is not int or not 0 <= addr < ram_size):
        return False
    blocks = clients[client]
    page = addr >> page_bits
    idx = page // block_pages
    b = blocks[idx] if idx < len(blocks) else None
    if b is None:
        return False
    bit = page - idx * block_pages
    atomic.bit_test_set(b.base + ((bit >> 6) << 3), bit & 63, order)
    return True


def set_pages(blocks: list[Block | None], pages: np.ndarray[Any, np.dtype[np.int64]],
              block_pages: int, order: int) -> int:
    """Set the bits of ``pages`` (int64 page numbers) in one client's blocks.
    Returns -1, or the index of a block that is needed but not mapped
    (nothing was set: map it and call again).  ValueError for a page
    outside the blocks.  The Python twin of the kernel's set_pages."""
    if not len(pages):
        return -1
    if int(pages.min()) < 0 or int(pages.max()) >= len(blocks) * block_pages:
        raise ValueError(f"pages outside the table's {len(blocks) * block_pages} pages")
    p = pages.astype(np.uint64)
    bw = block_pages >> 6
    gword = p >> np.uint64(6)
    bits = np.left_shift(np.uint64(1), p & np.uint64(63))
    sort = np.argsort(gword, kind="stable")
    gword, bits = gword[sort], bits[sort]
    uniq, starts = np.unique(gword, return_index=True)
    merged = np.bitwise_or.reduceat(bits, starts)
    blk = uniq // np.uint64(bw)
    for idx in np.unique(blk).tolist():
        if blocks[idx] is None:
            return int(idx)
    cuts = np.flatnonzero(np.diff(blk)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(uniq)], strict=True):
        idx = int(blk[lo])
        b = blocks[idx]
        assert b is not None
        words = (uniq[lo:hi] - np.uint64(idx * bw)).astype(np.intp)
        todo = np.flatnonzero(merged[lo:hi] & ~b.words[words])
        atomic.or_many(b.base, words[todo].tolist(), merged[lo:hi][todo].tolist(), order)
    return -1


# walk_blocks' operations, with the kernel's numbering.
WALK_ANY, WALK_ALL, WALK_SET, WALK_TAKE = 0, 1, 2, 3
# release: whoever takes a bit sees what was written before it was set;
# acq_rel: a taker sees that data, and orders its earlier reads (as take).
_WALK_ORDER = (atomic.RELAXED, atomic.RELAXED, atomic.RELEASE, atomic.ACQ_REL)


def walk_blocks(blocks: list[Block | None], page: int, end: int, block_pages: int,
                op: int) -> int:
    """The seed's block walk over pages [page, end) of one client's blocks
    with one operation per piece: WALK_ANY (any_set), WALK_ALL (all_set),
    WALK_SET (set_range) or WALK_TAKE (test_and_clear).  Returns the result
    (0 or 1; WALK_SET 0), or -1 - i if block i is needed but not mapped
    (nothing done: map it and call again).  On the kernel, one C call."""
    k = atomic.batch
    if k is not None:
        return int(k.walk(blocks, page, end, block_pages, op, _WALK_ORDER[op]))
    pieces = list(walk(page, end, block_pages))
    for idx, _, _ in pieces:
        if idx >= len(blocks):
            raise ValueError(f"block {idx} is outside the table's {len(blocks)} blocks")
        if blocks[idx] is None:
            return -1 - idx
    result = op == WALK_ALL
    for idx, off, num in pieces:
        b = blocks[idx]
        assert b is not None
        if op == WALK_ANY and any_set(b, off, num):
            return 1
        if op == WALK_ALL and not all_set(b, off, num):
            return 0
        if op == WALK_SET:
            set_range(b, off, num)
        elif op == WALK_TAKE:
            result = test_and_clear(b, off, num) or result
    return int(result)


def page_setters() -> tuple[Callable[..., bool], Callable[..., int]]:
    """(set_page, set_pages) of the current atomics backend: the kernel's C
    functions, or the Python twins above."""
    k = atomic.batch
    if k is not None:
        return k.set_page, k.set_pages
    return set_page, set_pages


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
