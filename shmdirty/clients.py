"""The seed's clients and the checks every caller's input goes through.

The dirty-memory clients (VGA, CODE, MIGRATION) and their masks, as in
QEMU; the one conversion of an integer argument (``as_index``), of a
bitmap argument (``as_words``), of a client and a client mask; and the
checks of a new map's geometry.  Pure functions over plain values: no
shared memory here.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from .errors import BadInput

DIRTY_MEMORY_VGA = 0
DIRTY_MEMORY_CODE = 1
DIRTY_MEMORY_MIGRATION = 2
DIRTY_MEMORY_NUM = 3
DIRTY_CLIENTS_ALL = (1 << DIRTY_MEMORY_NUM) - 1
DIRTY_CLIENTS_NOCODE = DIRTY_CLIENTS_ALL & ~(1 << DIRTY_MEMORY_CODE)
DIRTY_MEMORY_BLOCK_SIZE = 256 * 1024 * 8

U64 = np.dtype(np.uint64)


# --- input checks shared by the accessors and the coordinator ---------------------
def as_index(value: Any, what: str) -> int:
    """``value`` as a Python int (not a bool); BadInput naming ``what``."""
    if isinstance(value, (bool, np.bool_)):
        raise BadInput(f"{what} must be an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise BadInput(f"{what} must be an integer, not {type(value).__name__}") from None


def as_words(bits: Any, what: str) -> tuple[np.ndarray[Any, np.dtype[np.uint64]], int]:
    """A uint64 array from a uint64 array or little-endian bytes, and how
    many bits the caller gave."""
    if isinstance(bits, np.ndarray):
        if bits.dtype != U64 or bits.ndim != 1:
            raise BadInput(f"{what} must be a 1-D uint64 array, not {bits.ndim}-D {bits.dtype}")
        return np.ascontiguousarray(bits), len(bits) * 64   # a strided view is copied
    if isinstance(bits, (bytes, bytearray, memoryview)):
        raw = bytes(bits)
        nbits = len(raw) * 8
        raw += b"\0" * (-len(raw) % 8)
        return np.frombuffer(raw, dtype="<u8").astype(np.uint64), nbits
    raise BadInput(f"{what} must be a uint64 numpy array or bytes, not {type(bits).__name__}")


def check_client(client: Any) -> int:
    if client.__class__ is int and 0 <= client < DIRTY_MEMORY_NUM:
        return client
    c = as_index(client, "client")
    if not 0 <= c < DIRTY_MEMORY_NUM:
        raise BadInput(f"client {c} is not one of 0 (VGA), 1 (CODE), 2 (MIGRATION)")
    return c


def check_mask(mask: Any) -> int:
    m = as_index(mask, "mask")
    if not 0 <= m <= DIRTY_CLIENTS_ALL:
        raise BadInput(f"client mask {m:#x} is not in [0, {DIRTY_CLIENTS_ALL:#x}]")
    return m


def check_geometry(page_bits: Any, block_pages: Any, max_readers: Any,
                   ram_size: Any) -> tuple[int, int, int, int]:
    """DirtyMemory.create()'s arguments, checked; BadInput naming the bad one."""
    page_bits = as_index(page_bits, "page_bits")
    if not 6 <= page_bits <= 30:
        raise BadInput(f"page_bits {page_bits} is not in [6, 30]")
    block_pages = as_index(block_pages, "block_pages")
    if block_pages <= 0 or block_pages % 64 or block_pages > 1 << 32:
        raise BadInput(f"block_pages {block_pages} must be a positive multiple of 64, "
                       "at most 2**32")
    max_readers = as_index(max_readers, "max_readers")
    if not 1 <= max_readers <= 4096:
        raise BadInput(f"max_readers {max_readers} is not in [1, 4096]")
    ram_size = as_index(ram_size, "ram_size")
    if ram_size < 0 or ram_size % (1 << page_bits):
        raise BadInput(f"ram_size {ram_size:#x} must be a non-negative multiple of the "
                       f"page size {1 << page_bits:#x}")
    return page_bits, block_pages, max_readers, ram_size


def clients_of(mask: int) -> list[int]:
    return [c for c in range(DIRTY_MEMORY_NUM) if mask >> c & 1]
