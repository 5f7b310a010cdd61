"""Process entry points of a live migration, run in a spawn pool by ``shmdirty migrate``.

- ``workers.vcpu``: a vCPU; writes guest pages, then marks them dirty.
- ``workers.migrator``: pre-copy rounds with ``sync_dirty_bitmap``, then
  stop-and-copy into a destination image.
- ``workers.hotplug``: asks the coordinator for more guest RAM at given times.
- ``workers.guest``: guest RAM and destination segments, page stamps.

The coordinator (the process that created the map: the CLI) serves RAM
requests and watches.  Everything a worker needs arrives as arguments of its
entry point: a pickled ``DirtyMemory`` handle (it attaches in the child), a
config dataclass, and a ``Control`` of multiprocessing events and one queue.
Workers report ``(kind, dict)`` tuples on the queue; an exception is reported
as ``("error", {"role", "traceback"})`` and ends the process with exit code 1.

The orderings the run depends on:

- a vCPU writes a page's bytes BEFORE it sets the page's dirty bit;
- the migrator takes a page's bit (``sync_dirty_bitmap``) BEFORE it copies
  the page, so a write that lands after the copy leaves a bit behind;
- the hot-plug worker creates and fills a new RAM segment BEFORE it asks for
  the RAM, so whoever sees the larger RAM finds the segment;
- stop-and-copy begins only after every vCPU and the hot-plug worker have
  said they stopped (their ``stopped`` events), so the final sync sees
  every write and every RAM block.
"""

from __future__ import annotations

import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

Report = tuple[str, dict[str, Any]]


@dataclass
class Control:
    """What the coordinator and the workers share besides the map."""

    queue: Queue[Report]       # worker -> coordinator reports
    go: Event                  # set by the coordinator: every worker is ready, start
    stop: Event                # set by the migrator (or the coordinator on abort): vCPUs
                               # and the hot-plug worker stop
    abort: Event               # set by the coordinator: give up, exit now
    vcpu_stopped: list[Event] = field(default_factory=list)  # one per vCPU, set on exit
    hotplug_stopped: Event | None = None                     # set on exit

    def report(self, kind: str, **data: Any) -> None:
        """Send one report to the coordinator."""
        self.queue.put((kind, data))

    def start(self, role: str) -> bool:
        """Report ``ready``, then wait for go; False if the run was aborted."""
        self.report("ready", role=role)
        self.go.wait()
        return not self.abort.is_set()


@contextmanager
def worker(role: str, ctl: Control) -> Iterator[None]:
    """Run a worker body: ignore Ctrl-C (the coordinator decides), report
    an exception on the queue and exit 1."""
    # Ctrl-C reaches the whole foreground process group; the coordinator
    # turns it into an orderly abort, so workers must not die half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    except BaseException:
        ctl.report("error", role=role, traceback=traceback.format_exc())
        raise SystemExit(1) from None
