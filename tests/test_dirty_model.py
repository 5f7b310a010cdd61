"""The real shared-memory map against the reference model, driven by hypothesis.

Every rule makes the same call on ``shmdirty.DirtyMemory`` and on
``model.RefDirtyMemory`` and asserts the same result, or ValueError from both
(the map's also a ShmDirtyError) and nothing changed.  Blocks are small (64 to
1024 pages) and ranges are drawn near block edges, so every accessor walks
across blocks; RAM blocks are added, removed and extended between accesses,
so the bitmap grows while the accessors go on.  After every step the whole
bitmap of every client is compared: each maximal run of equal bits in the
model is checked with one all_dirty / get_dirty call plus get_dirty_flag on
its first and last page.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from model import DIRTY_MEMORY_NUM, RefDirtyMemory

import shmdirty as sd
from shmdirty import atomic

# A passing run takes seconds; a failing one spends up to 5 minutes shrinking
# (hypothesis' own limit), and the minimal example is the useful output, so
# the suite-wide timeout must not cut it short.
pytestmark = pytest.mark.timeout(900)

PAGE_BITS = 12
PS = 1 << PAGE_BITS
U64_MAX = (1 << 64) - 1
DTYPES = [np.int64, np.uint64, np.int32, np.uint32, np.intp]


def _short(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"<{x.dtype} array of {x.size}>"
    if isinstance(x, (bytes, bytearray)):
        return f"<{len(x)} bytes>"
    return repr(x)


class DirtyMachine(RuleBasedStateMachine):
    """One map and one model, the same operations on both, on the atomics
    backend BACKEND."""

    BACKEND = "kernel"

    def __init__(self) -> None:
        super().__init__()
        self.before = ""
        self.dm: Any = None
        self.model: RefDirtyMemory | None = None
        self.name = ""
        self.snaps: list[tuple[Any, Any]] = []   # (model snapshot, real snapshot)

    # -- set-up and tear-down ---------------------------------------------------------
    @initialize(
        block_pages=st.sampled_from([64, 128, 256, 1024]),
        tcg=st.booleans(),
        data=st.data(),
    )
    def create(self, block_pages: int, tcg: bool, data: st.DataObject) -> None:
        self.bp = block_pages
        self.max_pages = min(12 * block_pages, 4096)     # cap on ram, so on the bitmap
        ram_pages = data.draw(
            st.one_of(
                st.integers(1, 3 * block_pages),
                st.sampled_from([block_pages, 2 * block_pages, 0]),
            ),
            label="ram_pages",
        )
        self.name = "hm" + secrets.token_hex(6)
        self.before = atomic.backend.name
        atomic.use_backend(self.BACKEND)
        self.model = RefDirtyMemory(ram_pages * PS, page_bits=PAGE_BITS,
                                    block_pages=block_pages, tcg=tcg)
        self.dm = sd.DirtyMemory.create(ram_pages * PS, page_bits=PAGE_BITS,
                                        block_pages=block_pages, tcg=tcg, name=self.name)
        assert self.dm.page_size == PS
        assert self.dm.block_pages == block_pages
        assert self.dm.is_coordinator
        words = self.max_pages // 64 + 1
        self.dest_m = np.zeros(words, np.uint64)         # the migration bitmaps
        self.dest_r = np.zeros(words, np.uint64)

    def teardown(self) -> None:
        if self.before:
            atomic.use_backend(self.before)
        if self.dm is None:
            return
        self.dm.destroy()
        left = [n for n in os.listdir("/dev/shm") if n.startswith(f"shmdirty-{self.name}-")]
        assert not left, f"destroy() left {left} in /dev/shm"

    # -- the comparison --------------------------------------------------------------------
    def same(self, op: str, *args: Any, real_args: tuple[Any, ...] | None = None,
             on: tuple[Any, Any] | None = None) -> tuple[Any, Any] | None:
        """Call ``op`` on the model and on the map; same result or both ValueError.

        Returns (model result, map result), or None when both raised."""
        assert self.model is not None
        model, real = on if on is not None else (self.model, self.dm)
        rargs = args if real_args is None else real_args
        shown = f"{op}({', '.join(_short(a) for a in rargs)})"
        before = self.model.state()
        want_err: ValueError | None = None
        got_err: ValueError | None = None
        want = got = None
        try:
            want = getattr(model, op)(*args)
        except ValueError as e:
            want_err = e
        try:
            got = getattr(real, op)(*rargs)
        except ValueError as e:
            got_err = e
        event(f"{op}: {'rejected' if want_err is not None else 'done'}")
        if want_err is not None:
            assert self.model.state() == before, f"model bug: {shown} failed half-way"
            assert got_err is not None, (
                f"{shown}: the model rejects it ({want_err}); the map returned {got!r}"
            )
            assert isinstance(got_err, sd.ShmDirtyError), f"{shown}: {got_err!r}"
            return None
        assert got_err is None, f"{shown}: the map raised {got_err!r}; the model gives {want!r}"
        if isinstance(want, bool):
            assert type(got) is bool, f"{shown} returned {type(got)!r}, not bool"
            assert got == want, f"{shown}: map {got}, model {want}"
        elif isinstance(want, int):
            assert type(got) is int, f"{shown} returned {type(got)!r}, not int"
            assert got == want, f"{shown}: map {got}, model {want}"
        elif want is None:
            assert got is None, f"{shown} returned {got!r}, expected None"
        return want, got

    # -- strategies (drawn against the current ram_size) -------------------------------------
    @property
    def ram(self) -> int:
        assert self.model is not None
        return self.model.ram_size

    def draw_start(self, data: st.DataObject, label: str = "start", end: bool = True) -> int:
        """An address in [0, ram_size), often near a block edge or the end of RAM;
        sometimes ram_size itself (valid only for an empty range)."""
        pages = self.ram // PS
        last = max(self.ram - 1, 0)
        edges = [k * self.bp * PS for k in range(pages // self.bp + 1)] + [self.ram]
        near_edge = st.tuples(st.sampled_from(edges), st.integers(-2 * PS, 2 * PS)).map(
            lambda t: min(max(0, t[0] + t[1]), last)
        )
        anywhere = st.integers(0, last)
        aligned = st.integers(0, max(pages - 1, 0)).map(lambda p: p * PS)
        choices = [near_edge, anywhere, aligned, near_edge] + ([st.just(self.ram)] if end else [])
        return data.draw(st.one_of(*choices), label=label)

    def draw_client(self, data: st.DataObject) -> Any:
        return data.draw(st.sampled_from([0, 1, 2] * 5 + [3, -1]), label="client")

    def draw_mask(self, data: st.DataObject) -> Any:
        return data.draw(st.sampled_from(list(range(8)) * 2 + [8]), label="mask")

    def draw_range(self, data: st.DataObject) -> tuple[Any, Any]:
        """(start, length), mostly valid, often crossing a block edge."""
        start = self.draw_start(data)
        room = max(self.ram - start, 0)
        block_bytes = self.bp * PS
        to_edge = block_bytes - start % block_bytes
        length = data.draw(
            st.one_of(
                st.just(0),
                st.integers(1, 3 * PS),
                st.integers(0, room),
                st.just(room),
                st.integers(1, 2 * PS).map(lambda d: to_edge + d),   # crosses the next edge
                st.integers(0, 2 * block_bytes),
            ),
            label="length",
        )
        if data.draw(st.integers(0, 2), label="clip") > 0:
            length = min(length, room)
        bad = data.draw(
            st.sampled_from(["ok"] * 30 + ["past_end", "negative", "wraps", "huge",
                                           "start_past_end", "numpy", "float"]),
            label="mangle",
        )
        if bad == "past_end":
            length = room + 1
        elif bad == "negative":
            length = -data.draw(st.integers(1, 2 * PS))
        elif bad == "wraps":
            length = (1 << 64) - start
        elif bad == "huge":
            length = 1 << 64
        elif bad == "start_past_end":
            start = self.ram + data.draw(st.integers(1, 2 * PS))
        elif bad == "numpy":
            return np.int64(start), np.uint64(length)   # numpy scalars are valid too
        elif bad == "float":
            return float(start), length
        return start, length

    def draw_addr(self, data: st.DataObject) -> Any:
        bad = data.draw(st.sampled_from(["ok"] * 20 + ["end", "past", "neg", "wraps"]),
                        label="addr kind")
        return {
            "ok": lambda: self.draw_start(data, "addr", end=False),
            "end": lambda: self.ram,
            "past": lambda: self.ram + PS,
            "neg": lambda: -1,
            "wraps": lambda: (1 << 64) + self.draw_start(data, "addr"),
        }[bad]()

    # -- accessors ---------------------------------------------------------------------------
    @rule(data=st.data())
    def set_dirty_flag(self, data: st.DataObject) -> None:
        self.same("set_dirty_flag", self.draw_addr(data), self.draw_client(data))

    @rule(data=st.data())
    def get_dirty_flag(self, data: st.DataObject) -> None:
        self.same("get_dirty_flag", self.draw_addr(data), self.draw_client(data))

    @rule(data=st.data(), op=st.sampled_from(["get_dirty", "all_dirty", "test_and_clear_dirty"]))
    def range_op_client(self, data: st.DataObject, op: str) -> None:
        self.same(op, *self.draw_range(data), self.draw_client(data))

    @rule(data=st.data(), op=st.sampled_from(["set_dirty_range", "range_includes_clean"]))
    def range_op_mask(self, data: st.DataObject, op: str) -> None:
        self.same(op, *self.draw_range(data), self.draw_mask(data))

    @rule(data=st.data())
    def set_dirty_lebitmap(self, data: st.DataObject) -> None:
        rp = self.ram // PS
        start = self.draw_start(data)
        first = start >> PAGE_BITS
        room = max(rp - first, 0)
        pages = data.draw(st.one_of(st.integers(0, room), st.just(room),
                                    st.integers(0, min(room, 130))), label="pages")
        if data.draw(st.integers(0, 12), label="past") == 0:
            pages = room + 1
        nwords = -(-pages // 64)
        word = st.one_of(st.sampled_from([0, U64_MAX, 1, 1 << 63, 0x5555555555555555]),
                         st.integers(0, U64_MAX))
        words = np.array(data.draw(st.lists(word, min_size=nwords, max_size=nwords),
                                   label="words"), dtype=np.uint64)
        form = data.draw(st.sampled_from(["array", "array", "bytes", "exact bytes",
                                          "short", "int64"]), label="form")
        if form == "bytes":
            bitmap: Any = words.astype("<u8").tobytes()
        elif form == "exact bytes":
            bitmap = words.astype("<u8").tobytes()[: -(-pages // 8)]
        elif form == "short":
            bitmap = words[:-1] if nwords else words
        elif form == "int64":
            bitmap = words.view(np.int64)
        else:
            bitmap = words
        self.same("set_dirty_lebitmap", bitmap, start, pages)

    @rule(data=st.data())
    def sync_dirty_bitmap(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 5), label="new round") == 0:
            self.dest_m[:] = 0
            self.dest_r[:] = 0
        start, length = self.draw_range(data)
        if data.draw(st.integers(0, 8), label="short dest") == 0:
            # too short for any non-empty range that reaches past its first word
            dm, dr = np.zeros(1, np.uint64), np.zeros(1, np.uint64)
        else:
            dm, dr = self.dest_m, self.dest_r
        before = dr.copy()
        res = self.same("sync_dirty_bitmap", dm, start, length, real_args=(dr, start, length))
        assert np.array_equal(dm, dr), "sync_dirty_bitmap: the two dest bitmaps differ"
        if res is None:
            assert np.array_equal(dr, before), "a rejected sync_dirty_bitmap wrote into dest"

    @rule(data=st.data())
    def set_dirty_pages(self, data: st.DataObject) -> None:
        rp = self.ram // PS
        page = st.integers(0, max(rp - 1, 0))
        if rp > self.bp:
            edge = st.integers(1, (rp - 1) // self.bp).map(lambda k: k * self.bp)
            page = st.one_of(page, edge, edge.map(lambda p: p - 1))
        values = data.draw(st.lists(page, max_size=20) if rp else st.just([]), label="pages")
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        bad = data.draw(st.sampled_from(["ok"] * 10 + ["end", "neg", "float", "list", "2d"]),
                        label="bad")
        if bad == "end":
            values = values + [rp]
        elif bad == "neg":
            values, dtype = values + [-1], np.int64
        pages: Any = np.array(values, dtype=dtype)
        if bad == "float":
            pages = pages.astype(np.float64)
        elif bad == "list":
            pages = values
        elif bad == "2d":
            pages = pages.reshape(1, -1)
        self.same("set_dirty_pages", pages, self.draw_client(data))

    @rule(data=st.data())
    def take_snapshot(self, data: st.DataObject) -> None:
        start, length = self.draw_range(data)
        res = self.same("snapshot_and_clear_dirty", start, length, self.draw_client(data))
        if res is not None:
            self.snaps = (self.snaps + [res])[-4:]

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def query_snapshot(self, data: st.DataObject) -> None:
        msnap, rsnap = data.draw(st.sampled_from(self.snaps), label="snapshot")
        lo, hi = msnap.lo, msnap.hi
        s = data.draw(st.one_of(st.integers(lo, hi), st.integers(lo - PS, hi + PS)), label="s")
        n = data.draw(st.one_of(st.integers(0, max(hi - s, 0)), st.integers(-PS, hi - lo + PS)),
                      label="n")
        self.same("get_dirty", s, n, on=(msnap, rsnap))

    @rule(data=st.data())
    def ops_in_one_read_section(self, data: st.DataObject) -> None:
        with self.dm.read_section():
            self.same("set_dirty_range", *self.draw_range(data), self.draw_mask(data))
            self.same("get_dirty", *self.draw_range(data), self.draw_client(data))
            self.same("test_and_clear_dirty", *self.draw_range(data), self.draw_client(data))

    # -- RAM hot-plug -------------------------------------------------------------------------
    def fits(self, offset: int, size: int) -> bool:
        return offset + size <= self.max_pages * PS

    @rule(data=st.data())
    def ram_block_add(self, data: st.DataObject) -> None:
        assert self.model is not None
        size = data.draw(st.one_of(st.integers(1, 8), st.integers(1, 2 * self.bp)),
                         label="size pages") * PS
        bad = data.draw(st.sampled_from(["ok"] * 8 + ["unaligned", "zero", "neg", "float"]),
                        label="bad")
        if bad == "ok" and not self.fits(self.model.find_ram_offset(size), size):
            return                                         # would pass the test's cap
        arg = {"ok": size, "unaligned": size + PS // 2, "zero": 0, "neg": -size,
               "float": float(size)}[bad]
        self.same("ram_block_add", arg)

    @precondition(lambda self: self.model is not None and bool(self.model.blocks))
    @rule(data=st.data())
    def ram_block_remove(self, data: st.DataObject) -> None:
        assert self.model is not None
        offsets = sorted(self.model.blocks)
        offset = data.draw(st.sampled_from(offsets), label="offset")
        bad = data.draw(st.sampled_from(["ok"] * 6 + ["inside", "end"]), label="bad")
        if bad == "inside":
            offset += PS // 2 if self.model.blocks[offset] == PS else PS
        elif bad == "end":
            offset = self.ram
        self.same("ram_block_remove", offset)

    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        rp = self.ram // PS
        new = data.draw(st.integers(max(rp - self.bp, 1), min(rp + 2 * self.bp, self.max_pages)),
                        label="new pages") * PS
        bad = data.draw(st.sampled_from(["ok"] * 8 + ["unaligned", "zero", "neg"]), label="bad")
        arg = {"ok": new, "unaligned": new + 1, "zero": 0, "neg": -new}[bad]
        self.same("extend", arg)

    @rule(data=st.data())
    def hotplug_churn(self, data: st.DataObject) -> None:
        """Several adds and removes in a row: gaps of several sizes, best fit."""
        assert self.model is not None
        for _ in range(data.draw(st.integers(2, 6), label="churn steps")):
            blocks = sorted(self.model.blocks)
            if blocks and data.draw(st.booleans(), label="remove?"):
                self.same("ram_block_remove", data.draw(st.sampled_from(blocks), label="offset"))
                continue
            size = data.draw(st.integers(1, 6), label="size pages") * PS
            if self.fits(self.model.find_ram_offset(size), size):
                self.same("ram_block_add", size)

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def same_ram_size(self) -> None:
        if self.dm is not None:
            assert self.dm.ram_size == self.ram

    @invariant()
    def same_bitmaps(self) -> None:
        if self.dm is None:
            return
        assert self.model is not None
        for c in range(DIRTY_MEMORY_NUM):
            for first, n, dirty in self.model.runs(c):
                where = f"client {c}, pages [{first}, {first + n})"
                if dirty:
                    assert self.dm.all_dirty(first * PS, n * PS, c), f"{where} not all dirty"
                else:
                    assert not self.dm.get_dirty(first * PS, n * PS, c), f"{where} not clean"
                assert self.dm.get_dirty_flag(first * PS, c) == dirty, f"{where}: first page"
                last = (first + n - 1) * PS + PS - 1
                assert self.dm.get_dirty_flag(last, c) == dirty, f"{where}: last page"


class CffiMachine(DirtyMachine):
    BACKEND = "cffi"


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DirtyMachine.TestCase.settings = SETTINGS
CffiMachine.TestCase.settings = SETTINGS


def _on(machine: type[DirtyMachine]) -> Any:
    """The machine's TestCase, skipped where its backend is unavailable: each
    backend must agree with the model, hence with the others."""
    missing = machine.BACKEND not in atomic.available()
    return pytest.mark.skipif(missing, reason=f"the {machine.BACKEND} atomics backend is "
                              "not available here (kernel: not compiled at install)")(
        machine.TestCase)


TestDirtyMemoryAgainstModel = _on(DirtyMachine)             # the kernel backend
TestDirtyMemoryAgainstModelCffi = _on(CffiMachine)
