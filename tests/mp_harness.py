"""What the multiprocess DirtyMemory tests share: a coordinator-side
migration with a writers' page limit, and spawned writer processes.

The limit protocol: new RAM starts dirty for every client, so the writers'
page limit is raised only after the new RAM is published and its initial
MIGRATION bits are taken into a scratch bitmap.  Every MIGRATION bit below
the limit is then one a writer set, and "no lost bits" is exact.
"""

from __future__ import annotations

from typing import Any

import dirty_workers as workers
import numpy as np
import rel_workers

import shmdirty as sd
from shmdirty import layout, segment

PB = 12
PS = 1 << PB
MIG = sd.DIRTY_MEMORY_MIGRATION
WAIT = 30.0          # the longest any single wait may take before the test fails


def segs(name: str, role: str) -> list[str]:
    return [n for n in segment.list_segments(name)
            if layout.role_of(n)[0] == role and layout.role_of(n)[1] is not None]


def pages_of(dest: np.ndarray[Any, Any], limit: int) -> np.ndarray[Any, Any]:
    """The pages below ``limit`` set in a bitmap indexed by page."""
    bits = np.unpackbits(dest.view(np.uint8), bitorder="little")[:limit]
    return np.flatnonzero(bits)


class Migration:
    """The coordinator's side: a migration bitmap that grows with RAM, a
    scratch bitmap for the initial dirty bits of new RAM, and the writers'
    page limit."""

    def __init__(self, dm: sd.DirtyMemory, limit: Any) -> None:
        self.dm = dm
        self.limit = limit
        self.dest = np.zeros(0, dtype=np.uint64)
        self.scratch = np.zeros(0, dtype=np.uint64)
        self.syncs = 0

    def _fit(self, ram_size: int) -> None:
        words = -(-(ram_size >> PB) // 64)
        if len(self.dest) < words:
            self.dest = np.concatenate([self.dest, np.zeros(words - len(self.dest), np.uint64)])
            self.scratch = np.zeros(words, dtype=np.uint64)

    def open_up(self) -> None:
        """Take the initial dirty bits of RAM above the limit (new RAM is
        dirty for every client), then let the writers write there."""
        lo, hi = self.limit.value << PB, self.dm.ram_size
        self._fit(hi)
        if hi > lo:
            self.dm.sync_dirty_bitmap(self.scratch, lo, hi - lo)
            self.limit.value = hi >> PB

    def sync(self) -> int:
        """Take the MIGRATION bits of the opened RAM into the migration bitmap."""
        hi = self.limit.value << PB
        self._fit(hi)
        self.syncs += 1
        return self.dm.sync_dirty_bitmap(self.dest, 0, hi)


class Writers:
    """Spawned writer processes and the primitives they share with us."""

    def __init__(self, ctx: Any, children: list[Any], name: str, n: int, flavor: str,
                 max_pages: int, limit: Any, seed: int, batch: int = 40,
                 quiescent_every: int = 8) -> None:
        self.stop = ctx.Event()
        self.progress = ctx.Semaphore(0)
        self.conns = []
        self.procs = []
        for i in range(n):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=workers.writer,
                            args=(name, flavor, seed * 100 + i, max_pages, batch,
                                  quiescent_every, limit, self.stop, self.progress, child),
                            name=f"writer-{i}")
            p.start()
            children.append(p)
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.wait(1)  # every writer has attached

    def wait(self, batches: int = 1) -> None:
        """Until each writer (on average) did ``batches`` more batches."""
        for _ in range(batches * len(self.procs)):
            if not self.progress.acquire(timeout=WAIT):
                dead = [(p.name, p.exitcode) for p in self.procs if not p.is_alive()]
                # Surface a writer's traceback if it has one.
                for c in self.conns:
                    if c.poll():
                        status, value = c.recv()
                        assert status == "ok", value
                raise AssertionError(f"writers made no progress in {WAIT} s; dead: {dead}")

    def finish(self, max_pages: int) -> tuple[np.ndarray[Any, Any], int]:
        """Stop the writers; the union of the pages they set, and their op count."""
        self.stop.set()
        union = np.zeros(max_pages, dtype=bool)
        ops = 0
        for c, p in zip(self.conns, self.procs, strict=True):
            assert c.poll(WAIT), f"{p.name} sent nothing"
            status, value = c.recv()
            assert status == "ok", value
            n, packed = value
            ops += n
            union |= np.unpackbits(packed, count=max_pages).astype(bool)
            p.join(WAIT)
            assert p.exitcode == 0, (p.name, p.exitcode)
        return np.flatnonzero(union), ops


def child_result(ctx: Any, target: Any, *args: Any, timeout: float = 30,
                 children: list[Any] | None = None) -> Any:
    """Run ``target(*args, conn)`` in a spawned child; its reported value."""
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, child))
    p.start()
    if children is not None:
        children.append(p)
    child.close()
    assert parent.poll(timeout), f"{target.__name__} reported nothing in {timeout} s"
    status, value = parent.recv()
    p.join(timeout)
    assert status == "ok", value
    assert p.exitcode == 0
    return value


def run_until_caught(body: Any, map_name: str, broken: bool, label: str) -> dict[str, Any]:
    """Run ``body(name, seed)`` once; for a deliberately broken variant, up
    to 3 times (fresh map names) until it loses bits.  Every map is removed.
    Returns the last attempt's result."""
    r: dict[str, Any] = {}
    for attempt in range(3 if broken else 1):
        name = map_name if attempt == 0 else f"{map_name}r{attempt}"
        try:
            r = body(name, attempt + 1)
        finally:
            for n in segment.list_segments(name):
                segment.unlink(n)
        print(f"{label} attempt {attempt}: {r}")
        if broken and r["lost"]:
            break
    return r


class ParkedReader:
    """A spawned rel_workers.parked_reader, inside once constructed (it gives
    up after ``park`` seconds)."""

    def __init__(self, ctx: Any, children: list[Any], name: str, park: float, flavor: str,
                 page: int) -> None:
        self.entered, self.release = ctx.Event(), ctx.Event()
        self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=rel_workers.parked_reader,
                                args=(name, flavor, self.entered, self.release, page, park,
                                      child))
        self.proc.start()
        children.append(self.proc)
        child.close()
        assert self.entered.wait(WAIT), "the reader never got in"

    def let_go(self) -> dict[str, Any]:
        self.release.set()
        assert self.conn.poll(WAIT), "the parked reader reported nothing"
        status, value = self.conn.recv()
        assert status == "ok", value
        self.proc.join(WAIT)
        assert self.proc.exitcode == 0
        return dict(value)
