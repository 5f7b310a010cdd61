"""The clients and the input checks (shmdirty/clients.py): the seed's
constants, and every conversion of a caller's argument, each refusing bad
input with a BadInput that names the argument."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import shmdirty as sd
from shmdirty import clients as c


def test_the_seeds_constants() -> None:
    assert (c.DIRTY_MEMORY_VGA, c.DIRTY_MEMORY_CODE, c.DIRTY_MEMORY_MIGRATION) == (0, 1, 2)
    assert c.DIRTY_MEMORY_NUM == 3
    assert c.DIRTY_CLIENTS_ALL == 0b111 and c.DIRTY_CLIENTS_NOCODE == 0b101
    assert c.DIRTY_MEMORY_BLOCK_SIZE == 256 * 1024 * 8
    assert sd.DIRTY_CLIENTS_NOCODE == c.DIRTY_CLIENTS_NOCODE   # the public names


@pytest.mark.parametrize("value", [0, 5, np.int64(7), np.uint32(3), 1 << 70])
def test_as_index_takes_integers(value: Any) -> None:
    got = c.as_index(value, "start")
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize("value", [True, np.bool_(False), 1.0, "3", None, [1]])
def test_as_index_refuses_the_rest_naming_the_argument(value: Any) -> None:
    with pytest.raises(sd.BadInput, match="^start must be an integer"):
        c.as_index(value, "start")


def test_as_words_from_an_array_or_bytes() -> None:
    a = np.arange(4, dtype=np.uint64)
    w, n = c.as_words(a, "bitmap")
    assert n == 256 and np.array_equal(w, a)
    strided = np.arange(8, dtype=np.uint64)[::2]
    w, n = c.as_words(strided, "bitmap")
    assert w.flags.c_contiguous and np.array_equal(w, strided) and n == 256
    w, n = c.as_words(b"\x01\x00\x00\x00\x00\x00\x00\x00\x80", "bitmap")
    assert n == 72 and w.tolist() == [1, 0x80]        # padded to whole words, little-endian
    for bad in (np.zeros(2, np.uint32), np.zeros((2, 2), np.uint64), [1, 2], "ab"):
        with pytest.raises(sd.BadInput, match="^bitmap must be"):
            c.as_words(bad, "bitmap")


def test_client_and_mask_checks() -> None:
    assert [c.check_client(x) for x in (0, 1, 2, np.int8(2))] == [0, 1, 2, 2]
    for bad in (-1, 3, 100):
        with pytest.raises(sd.BadInput, match=f"client {bad} is not one of"):
            c.check_client(bad)
    with pytest.raises(sd.BadInput):
        c.check_client(True)
    assert [c.check_mask(m) for m in (0, 5, 7)] == [0, 5, 7]
    for bad in (-1, 8):
        with pytest.raises(sd.BadInput, match="client mask"):
            c.check_mask(bad)
    assert c.clients_of(0) == [] and c.clients_of(0b101) == [0, 2] and c.clients_of(7) == [0, 1, 2]


def test_geometry_checks() -> None:
    assert c.check_geometry(12, 64, 1, 0) == (12, 64, 1, 0)
    assert c.check_geometry(np.int32(16), 1 << 32, 4096, 3 << 16) == (16, 1 << 32, 4096, 3 << 16)
    bad = [((5, 64, 1, 0), "page_bits 5"), ((31, 64, 1, 0), "page_bits 31"),
           ((12, 0, 1, 0), "block_pages 0"), ((12, 100, 1, 0), "block_pages 100"),
           ((12, (1 << 32) + 64, 1, 0), "block_pages"), ((12, 64, 0, 0), "max_readers 0"),
           ((12, 64, 4097, 0), "max_readers 4097"), ((12, 64, 1, -4096), "ram_size"),
           ((12, 64, 1, 100), "ram_size 0x64")]
    for args, what in bad:
        with pytest.raises(sd.BadInput, match=what):
            c.check_geometry(*args)
