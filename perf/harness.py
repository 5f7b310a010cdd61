"""Running cells: spawn worker pools, a barrier, timing, hot-plug, clean-up.

A pool of N spawn processes is started once per worker count and reused for
every cell with that count.  For each cell the parent (the creator, and so
the coordinator) creates the implementation's shared state, sends the cell
to every worker, and meets them at a barrier of N + 1 parties.  Each worker
then times its own loop with ``time.perf_counter``; ops/sec of a cell is the
total ops of all workers over the timed seconds of the slowest worker.

Hot-plug variant: while the workers run, the parent grows the RAM by
``hotplug_step`` every ``hotplug_interval`` (start to start; back to back if
one growth takes longer) until every worker has reported -- unless the
implementation says a worker does it (``Impl.workers_grow``: shmdirty's
sync cells, whose migrator worker is the coordinator; ``before_run`` /
``after_run`` hand the role over and back, see impl_shmdirty).

Workers may differ (``Impl.open_worker`` gets the worker's index): a
worker state with ``counted = False`` runs alongside (until the wall-clock
cap if ``wall_only``) and is reported per worker, but is left out of the
row's ops/sec; ``report()`` adds fields to the worker's entry.

Clean-up: every segment a run creates starts with ``shmdirty-perf<run id>``.
Each cell destroys its state in a ``finally`` and then unlinks whatever is
left under its stem; the run unlinks everything under the run's prefix at
the end, whatever happened (a worker that fails or dies included).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from . import baselines, cbaseline, impl_shmdirty  # noqa: F401  (register implementations)
from .registry import (
    IMPL_NAMES,
    IMPLS,
    OP_NAMES,
    RESETS,
    RUNS,
    Cell,
    Unavailable,
    run_prefix,
)
from .workloads import OPS, make_work, pages_per_op

GIB = 1 << 30
SETUP_TIMEOUT = 120.0  # spawn + imports + attach on a loaded machine
SHM_DIR = "/dev/shm"
FAIL_ENV = "SHMDIRTY_PERF_FAIL"  # fault injection for tests: see _maybe_fail


@dataclass
class BenchConfig:
    impls: tuple[str, ...] = IMPL_NAMES
    ops: tuple[str, ...] = OP_NAMES
    workers: tuple[int, ...] = (1, 2)
    hotplug: tuple[bool, ...] = (False, True)
    quick: bool = False
    duration: float = 1.0          # timed seconds per worker per cell
    guest_bytes: int = 64 * GIB
    page_bits: int = 12
    range_pages: int = 64
    batch_pages: int = 1024
    hotplug_step: int = 1 * GIB
    hotplug_interval: float = 0.010
    micro: bool = True
    seed: int = 1

    @classmethod
    def for_quick(cls, quick: bool, **kw: Any) -> BenchConfig:
        kw.setdefault("duration", 0.2 if quick else 1.0)
        return cls(quick=quick, **kw)


@dataclass
class Outcome:
    """What a run produced; report.document() turns it into the JSON form."""

    config: BenchConfig
    run_id: str
    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    micro: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# =============================================================================
# segments
# =============================================================================
def new_run_id() -> str:
    return "perf" + secrets.token_hex(4)


def leftover_segments(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def unlink_prefix(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with ``prefix``; return the names."""
    from .internals import unlink_segment as unlink

    gone = leftover_segments(prefix)
    for name in gone:
        unlink(name)
    return gone


# =============================================================================
# the worker process
# =============================================================================
def _worker_main(index: int, conn: Connection, barrier: Any, lock: Any) -> None:
    """A pool worker: run the cells the parent sends until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and cleans up
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        cell, handle = msg
        conn.send(_run_cell_in_worker(index, cell, handle, barrier, lock))


def _run_cell_in_worker(index: int, cell: Cell, handle: Any, barrier: Any,
                        lock: Any) -> dict[str, Any]:
    state = None
    started = False
    try:
        run = RUNS[(cell.impl, cell.op)]
        reset = RESETS.get((cell.impl, cell.op))
        state = IMPLS[cell.impl].open_worker(handle, lock, index, cell)
        work = make_work(cell, index)
        barrier.wait(SETUP_TIMEOUT)
        started = True
        _maybe_fail(index, cell)
        ops, seconds, wall = _timed_loop(state, work, run, reset, cell)
        st, state = state, None
        extra = st.report() if hasattr(st, "report") else {}
        st.close()  # before reporting: a qsbr reader must not hold grace periods up
        return {"ok": True, "ops": ops, "seconds": seconds, "wall": wall, "error": None,
                "counted": getattr(st, "counted", True), **extra}
    except BaseException as exc:  # report everything to the parent
        if not started:
            barrier.abort()
        return {"ok": False, "ops": 0, "seconds": 0.0, "error": _describe(exc),
                "secondary": isinstance(exc, threading.BrokenBarrierError)}
    finally:
        if state is not None:
            try:
                state.close()
            except Exception:
                pass


def _maybe_fail(index: int, cell: Cell) -> None:
    """Tests: ``SHMDIRTY_PERF_FAIL=impl:op`` makes worker 0 of such cells
    raise after the barrier; ``impl:op:exit`` makes it die."""
    spec = os.environ.get(FAIL_ENV, "")
    if index == 0 and spec.startswith(f"{cell.impl}:{cell.op}"):
        if spec.endswith(":exit"):
            os._exit(3)
        raise RuntimeError(f"injected failure ({FAIL_ENV})")


def _timed_loop(state: Any, work: Any, run: Callable[..., int],
                reset: Callable[..., None] | None, cell: Cell) -> tuple[int, float, float]:
    """Run chunks until ``cell.duration`` timed seconds (or ``cell.cap`` of
    wall time) have passed; at least one chunk.  Only the chunk and the qsbr
    quiescent() after it are timed; the reset is not.  A state with
    ``wall_only`` (a background writer whose ops are not counted) runs until
    ``cell.cap`` of wall time, as long as the counted worker may run."""
    chunk = OPS[cell.op].chunk
    tick = state.tick
    duration = float("inf") if getattr(state, "wall_only", False) else cell.duration
    cycle = work.cycle
    clock = time.perf_counter
    ops = 0
    timed = 0.0
    j = 0
    wall0 = t1 = clock()
    while True:
        if reset is not None:
            reset(state, work)
        t0 = clock()
        ops += run(state, work, j, chunk)
        if tick is not None:
            tick()
        t1 = clock()
        timed += t1 - t0
        j = (j + chunk) % cycle
        if timed >= duration or t1 - wall0 >= cell.cap:
            return ops, timed, t1 - wall0


def _describe(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


# =============================================================================
# the pool
# =============================================================================
class PoolBroken(RuntimeError):
    """A worker died or stopped answering; the pool is discarded."""


class Pool:
    """N spawn workers and a barrier of N + 1 parties (the parent is one)."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.n = n
        self.barrier = ctx.Barrier(n + 1)
        # The lock baseline's lock, one per pool: a pool whose worker died
        # (maybe holding it) is discarded with its lock.
        self.lock = ctx.Lock()
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        try:
            for i in range(n):
                parent_end, child_end = ctx.Pipe()
                p = ctx.Process(target=_worker_main,
                                args=(i, child_end, self.barrier, self.lock),
                                name=f"perf-worker-{n}.{i}", daemon=True)
                p.start()
                child_end.close()
                self.conns.append(parent_end)
                self.procs.append(p)
            for c in self.conns:
                if not c.poll(SETUP_TIMEOUT) or c.recv() != "ready":
                    raise PoolBroken(f"a worker of the {n}-worker pool did not start")
        except BaseException:
            self.kill()
            raise

    def run(self, cell: Cell, handle: Any,
            on_tick: Callable[[], None] | None = None,
            interval: float = 0.010) -> tuple[list[dict[str, Any]], BaseException | None]:
        """Run ``cell`` on every worker; call ``on_tick`` every ``interval``
        seconds from the barrier until all have reported.  Returns the
        workers' reports and the exception on_tick raised, if any."""
        self.barrier.reset()
        for c in self.conns:
            c.send((cell, handle))
        try:
            self.barrier.wait(SETUP_TIMEOUT)
        except threading.BrokenBarrierError:
            on_tick = None  # a worker failed to start: collect the reports
        return self._collect(time.perf_counter() + cell.cap + SETUP_TIMEOUT, on_tick, interval)

    def _collect(self, deadline: float, on_tick: Callable[[], None] | None,
                 interval: float) -> tuple[list[dict[str, Any]], BaseException | None]:
        out: list[dict[str, Any]] = [{} for _ in self.conns]
        pending = {c: i for i, c in enumerate(self.conns)}
        tick_error: BaseException | None = None
        next_tick = time.perf_counter() + interval
        while pending:
            now = time.perf_counter()
            if now > deadline:
                raise PoolBroken(f"{len(pending)} worker(s) did not report in time")
            timeout = deadline - now
            if on_tick is not None:
                timeout = min(timeout, max(0.0, next_tick - now))
            for ready in wait(list(pending), timeout):
                c = cast(Connection, ready)
                try:
                    msg = c.recv()
                except (EOFError, OSError):
                    raise PoolBroken(f"worker {pending[c]} died") from None
                out[pending.pop(c)] = msg
            if on_tick is not None and pending and time.perf_counter() >= next_tick:
                start = time.perf_counter()
                try:
                    on_tick()
                except Exception as exc:  # stop ticking; report it with the cell
                    tick_error, on_tick = exc, None
                next_tick = start + interval
        return out, tick_error

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
        for c in self.conns:
            c.close()


class Pools:
    """One pool per worker count, started on first use."""

    def __init__(self) -> None:
        self._pools: dict[int, Pool] = {}

    def get(self, n: int) -> Pool:
        if n not in self._pools:
            self._pools[n] = Pool(n)
        return self._pools[n]

    def discard(self, n: int) -> None:
        pool = self._pools.pop(n, None)
        if pool is not None:
            pool.kill()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


# =============================================================================
# cells and the run
# =============================================================================
def cells(cfg: BenchConfig, run_id: str) -> Iterator[Cell]:
    """Every cell of the run, implementations side by side (adjacent in
    time) for each (workload, pattern, workers, hot-plug)."""
    n = 0
    for op in cfg.ops:
        for pattern in OPS[op].patterns:
            for workers in cfg.workers:
                for hotplug in cfg.hotplug:
                    for impl in cfg.impls:
                        n += 1
                        yield Cell(impl=impl, op=op, pattern=pattern, workers=workers,
                                   hotplug=hotplug, duration=cfg.duration,
                                   guest_bytes=cfg.guest_bytes, page_bits=cfg.page_bits,
                                   range_pages=cfg.range_pages, batch_pages=cfg.batch_pages,
                                   seed=cfg.seed, stem=f"{run_prefix(run_id)}c{n}",
                                   hotplug_step=cfg.hotplug_step,
                                   hotplug_interval=cfg.hotplug_interval)


def _key(cell: Cell) -> dict[str, Any]:
    return {"impl": cell.impl, "op": cell.op, "pattern": cell.pattern,
            "workers": cell.workers, "hotplug": cell.hotplug}


def run_cell(cell: Cell, cfg: BenchConfig, pools: Pools) -> dict[str, Any]:
    """Measure one cell; returns its result row.  Raises on failure."""
    impl = IMPLS[cell.impl]
    after_error: Exception | None = None
    events = 0
    ram = cell.guest_bytes
    if not impl.in_pool:
        reports = impl.run_external(cell)
    else:
        pool = pools.get(cell.workers)
        try:
            created = impl.create(cell, pool.lock)
            try:
                spec = OPS[cell.op]
                impl.prepare(created, spec.clean, spec.dirty)

                def grow() -> None:
                    nonlocal events, ram
                    ram += cfg.hotplug_step
                    impl.grow(created, ram)
                    events += 1

                parent_grows = cell.hotplug and not impl.workers_grow(cell)
                impl.before_run(created, cell)
                reports, tick_error = pool.run(cell, created.handle,
                                               grow if parent_grows else None,
                                               cfg.hotplug_interval)
            finally:
                try:
                    impl.after_run(created, cell)
                except Exception as exc:  # reported below, unless the pool broke
                    after_error = exc
                finally:
                    impl.destroy(created)
        except PoolBroken:
            pools.discard(cell.workers)
            raise
        finally:
            unlink_prefix(cell.stem)
        failed = [r for r in reports if not r.get("ok")]
        if failed:
            primary = [r for r in failed if not r.get("secondary")] or failed
            raise RuntimeError(primary[0]["error"])
        if tick_error is not None:
            raise RuntimeError(f"hot-plug coordinator: {_describe(tick_error)}")
        if after_error is not None:
            raise RuntimeError(f"after the run: {_describe(after_error)}")
    # Workers whose state says counted=False (background writers of the
    # shmdirty sync cells) load the machine but are not in the figure.
    counted = [r for r in reports if r.get("counted", True)] or reports
    total = sum(r["ops"] for r in counted)
    slowest = max(r["seconds"] for r in counted)
    row = _key(cell)
    row.update({
        "ops_per_sec": total / slowest if slowest > 0 else 0.0,
        "ops": total,
        "seconds": slowest,
        "pages_per_op": pages_per_op(cell),
        "guest_bytes": cell.guest_bytes,
        "per_worker": [{k: v for k, v in r.items() if k not in ("ok", "error", "wall")}
                       for r in reports],
    })
    if len(counted) != len(reports):
        row["counted_workers"] = len(counted)
    if cell.hotplug:
        grown = [r for r in reports if "hotplug_events" in r]
        if grown:  # a worker (the coordinator) did the hot-adds
            events = sum(r["hotplug_events"] for r in grown)
            ram = max(r["ram_final_bytes"] for r in grown)
            row["hotplug_by"] = "worker"
        row["hotplug_events"] = events
        row["ram_final_bytes"] = ram
    return row


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None,
              run_id: str | None = None) -> Outcome:
    """Run every cell of ``cfg`` (and the micro section); never leaves segments."""
    from . import micro

    log = log or (lambda _msg: None)
    run_id = run_id or new_run_id()
    out = Outcome(config=cfg, run_id=run_id)
    t0 = time.perf_counter()
    unavailable: dict[str, str] = {}
    for name in cfg.impls:
        try:
            IMPLS[name].check()
        except Unavailable as exc:
            unavailable[name] = str(exc)
            out.notes.append(str(exc))
    pools = Pools()
    try:
        if cfg.micro:
            log("micro: one atomic op")
            _guarded(out, "atomic", lambda: out.micro.extend(
                micro.atomic_micro(run_prefix(run_id), cfg.quick)))
        all_cells = list(cells(cfg, run_id))
        for i, cell in enumerate(all_cells, 1):
            why = unavailable.get(cell.impl) or IMPLS[cell.impl].skip(cell, cfg.quick)
            if why is not None:
                out.skipped.append({**_key(cell), "why": why})
                continue
            log(f"[{i}/{len(all_cells)}] {cell.op}{'/' + cell.pattern if cell.pattern else ''}"
                f" {cell.impl} workers={cell.workers}{' hot-plug' if cell.hotplug else ''}")
            try:
                out.results.append(run_cell(cell, cfg, pools))
            except Exception as exc:
                out.errors.append({**_key(cell), "error": _describe(exc)
                                   if not isinstance(exc, RuntimeError) else str(exc)})
                log(f"    failed: {out.errors[-1]['error']}")
        if cfg.micro:
            log("micro: RCU")

            def rcu() -> None:
                rows, note = micro.rcu_micro(cfg, pools, run_id)
                out.micro.extend(rows)
                if note:
                    out.notes.append(note)

            _guarded(out, "rcu", rcu)
    finally:
        pools.close()
        left = unlink_prefix(run_prefix(run_id))
        if left:
            out.notes.append(f"removed {len(left)} leftover segment(s): {', '.join(left[:5])}")
        out.seconds = time.perf_counter() - t0
    return out


def _guarded(out: Outcome, section: str, fn: Callable[[], None]) -> None:
    """Run a micro section; a failure becomes an error entry, not a lost run."""
    try:
        fn()
    except PoolBroken as exc:
        out.errors.append({"impl": "micro", "op": section, "pattern": None, "workers": 0,
                           "hotplug": False, "error": str(exc)})
    except Exception as exc:
        out.errors.append({"impl": "micro", "op": section, "pattern": None, "workers": 0,
                           "hotplug": False, "error": _describe(exc)})


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so ``finally`` clean-up runs."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
