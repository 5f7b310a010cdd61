"""``shmdirty-memb`` and ``shmdirty-qsbr``: the workloads over DirtyMemory.

Written against the public contract (DESIGN.md section 3) only:

- parent: ``DirtyMemory.create(0, page_bits=..., name=...)`` then
  ``dm.extend(guest_bytes)`` (grown RAM is clean, as QEMU's
  dirty_memory_extend leaves it; ``prepare`` clears it anyway if not);
  hot-plug calls ``dm.extend(bigger)`` every 10 ms; ``dm.destroy()``.
- workers: ``DirtyMemory.attach(name, flavor=...)``; memb workers just run
  (each op opens its own read-side section); qsbr workers call
  ``dm.quiescent()`` after every chunk of 64 ops (one call for batch and bulk
  workloads); ``dm.close()`` as soon as the timed loop ends, so a grace
  period never waits for a worker that has stopped.

Until ``shmdirty.dirty`` exists these rows are skipped with a note.
"""

from __future__ import annotations

from typing import Any

from shmdirty import segment

from .registry import (
    BUSY_READER,
    RCU_QUIESCENT,
    RCU_SECTION,
    Cell,
    Created,
    Impl,
    Unavailable,
    register_impl,
    reset,
    workload,
)
from .workloads import (
    DISPLAY_CLIENT,
    FLAG_CLIENT,
    LEBITMAP_CLIENTS,
    RANGE_MASK,
    Work,
)

FLAVORS = ("memb", "qsbr")
QSBR_EVERY = 64  # ops between quiescent() calls (= the chunk of cheap workloads)


def dirty_memory() -> Any:
    """The DirtyMemory class, or Unavailable while shmdirty.dirty is not written."""
    try:
        from shmdirty.dirty import DirtyMemory
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("shmdirty"):
            raise Unavailable(f"shmdirty rows skipped: {exc.name} does not exist yet") from None
        raise
    return DirtyMemory


def map_name(stem: str) -> str:
    """A DirtyMemory name whose segments all start with ``stem``."""
    return segment.check_map_name(stem)


class ShmdirtyState:
    """A worker attached to the map in one flavor."""

    def __init__(self, handle: dict[str, Any]) -> None:
        self.dm = dirty_memory().attach(handle["name"], flavor=handle["flavor"])
        self.tick = self.dm.quiescent if handle["flavor"] == "qsbr" else None

    def close(self) -> None:
        self.dm.close()


class ShmdirtyImpl(Impl):
    grows = True

    def __init__(self, flavor: str) -> None:
        self.flavor = flavor
        self.name = f"shmdirty-{flavor}"

    def check(self) -> None:
        dirty_memory()

    def create(self, cell: Cell, lock: Any) -> Created:
        dm = dirty_memory().create(0, page_bits=cell.page_bits, name=map_name(cell.stem))
        try:
            dm.extend(cell.guest_bytes)
        except BaseException:
            dm.destroy()
            raise
        return Created(handle={"name": dm.name, "flavor": self.flavor}, obj=dm)

    def prepare(self, created: Created, clean: tuple[int, ...], dirty: tuple[int, ...]) -> None:
        # New RAM may start dirty (QEMU's ram_block_add marks it): clear only
        # the clients the workload needs clean, since a clear walks it all.
        dm = created.obj
        size = dm.ram_size
        for c in clean:
            if dm.get_dirty(0, size, c):
                dm.test_and_clear_dirty(0, size, c)
        for c in dirty:
            if not dm.all_dirty(0, size, c):
                dm.set_dirty_range(0, size, 1 << c)

    def grow(self, created: Created, new_bytes: int) -> None:
        created.obj.extend(new_bytes)

    def destroy(self, created: Created) -> None:
        created.obj.destroy()

    def open(self, handle: Any, lock: Any) -> ShmdirtyState:
        return ShmdirtyState(handle)


for _flavor in FLAVORS:
    register_impl(ShmdirtyImpl(_flavor))

BOTH = tuple(f"shmdirty-{f}" for f in FLAVORS)


@workload("set_dirty_flag", *BOTH)
def _flag(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    f = s.dm.set_dirty_flag
    for a in w.addrs[j:j + n]:
        f(a, FLAG_CLIENT)
    return n


@workload("set_dirty_range", *BOTH)
def _range(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    f, length = s.dm.set_dirty_range, w.range_bytes
    for a in w.start_addrs[j:j + n]:
        f(a, length, RANGE_MASK)
    return n


@workload("get_dirty", *BOTH)
def _get(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    f, length = s.dm.get_dirty, w.range_bytes
    for a in w.start_addrs[j:j + n]:
        f(a, length, DISPLAY_CLIENT)
    return n


@workload("test_and_clear_dirty", *BOTH)
def _tac(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    f, length = s.dm.test_and_clear_dirty, w.range_bytes
    for a in w.start_addrs[j:j + n]:
        f(a, length, DISPLAY_CLIENT)
    return n


@workload("set_dirty_pages", *BOTH)
def _pages(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    for b in w.batches[j:j + n]:
        s.dm.set_dirty_pages(b, FLAG_CLIENT)
    return n


@workload("set_dirty_lebitmap", *BOTH)
def _lebitmap(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    s.dm.set_dirty_lebitmap(w.lebitmap, w.slice_start, w.slice_pages)
    return 1


@reset("set_dirty_lebitmap", *BOTH)
def _lebitmap_reset(s: ShmdirtyState, w: Work) -> None:
    for c in LEBITMAP_CLIENTS:
        s.dm.test_and_clear_dirty(w.slice_start, w.slice_bytes, c)


@workload("sync_dirty_bitmap", *BOTH)
def _sync(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    got = s.dm.sync_dirty_bitmap(w.dest, w.slice_start, w.slice_bytes)
    if got != w.lebitmap_pages:
        raise AssertionError(f"sync_dirty_bitmap counted {got} new pages, "
                             f"expected {w.lebitmap_pages}")
    return 1


@reset("sync_dirty_bitmap", *BOTH)
def _sync_reset(s: ShmdirtyState, w: Work) -> None:
    w.dest[:] = 0
    s.dm.set_dirty_lebitmap(w.lebitmap, w.slice_start, w.slice_pages)


@workload(BUSY_READER, *BOTH)
def _busy(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    f = s.dm.get_dirty_flag
    for a in w.addrs[j:j + n]:
        f(a, FLAG_CLIENT)
    return n


@workload(RCU_SECTION, "shmdirty-memb")
def _section(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    section = s.dm.read_section
    for _ in range(n):
        with section():
            pass
    return n


@workload(RCU_QUIESCENT, "shmdirty-qsbr")
def _quiescent(s: ShmdirtyState, w: Work, j: int, n: int) -> int:
    quiescent = s.dm.quiescent
    for _ in range(n):
        quiescent()
    return n + 1  # and the harness's quiescent() after the chunk
