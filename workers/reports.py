"""What the processes of a migration tell the application, one class per kind.

Workers send these through their report pipe (``Control.report``, or the
pipe a KVM run's process got); the run (``workers.migration``) handles some
itself (``Ready``, ``WorkerFailed``, ``Done``, ...) and hands every one to
its ``on_event`` callback, with ``Started`` or ``GuestStarted`` of its own,
so a front end (the CLI) can render progress.  The commands the processes
send each other are ``workers.messages``.
All are frozen dataclasses: picklable, and ``dataclasses.asdict`` gives the
JSON of a run's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ready:
    """A worker is set up and waits for GO."""

    role: str


@dataclass(frozen=True)
class WorkerFailed:
    """A worker raised; it exits with code 1 after sending this."""

    role: str
    traceback: str


@dataclass(frozen=True)
class Started:
    """The application: every worker is ready, GO is set (not sent by a worker)."""

    map_name: str
    ram: int
    vcpus: int
    dirty_mode: str
    pattern: str
    dirty_rate: float
    workers: int


@dataclass(frozen=True)
class RoundStart:
    """The migrator synced a pre-copy round's dirty bits and will send them."""

    round: int
    ram_size: int
    dirty: int
    newly_dirty: int
    dirty_rate: float | None     # pages/s since the last sync; None in round 1
    dropped: int                 # testing: pages forgotten in this round
    t_start: float               # monotonic seconds


@dataclass(frozen=True)
class RoundEnd(RoundStart):
    """A pre-copy round's pages are sent."""

    sent: int
    seconds: float
    throughput: float | None     # bytes/s


@dataclass(frozen=True)
class Sent:
    """Progress inside a round (``round`` 0: stop-and-copy)."""

    round: int
    sent: int


@dataclass(frozen=True)
class Hotplug:
    """The hot-plug worker's RAM request was granted."""

    at: float
    size: int
    offset: int
    ram_size: int
    t_ask: float
    t_done: float


@dataclass(frozen=True)
class HotplugSkipped:
    """A scheduled hot-add fell after STOP: the guest is stopping."""

    at: float
    size: int


@dataclass(frozen=True)
class HotplugRefused:
    """A scheduled hot-add could not be made (/dev/shm full, its segment's
    name taken by someone else...): it failed alone, the guest runs on
    with the RAM it has."""

    at: float
    size: int
    why: str


@dataclass(frozen=True)
class Stopping:
    """Pre-copy ended (``reason``: converged | max rounds); the vCPUs stop."""

    pending: int
    reason: str
    t_stop: float


@dataclass(frozen=True)
class Downtime:
    """Stop-and-copy: every writer stopped, ``pages`` are left to send."""

    pages: int
    ram_size: int


@dataclass(frozen=True)
class VcpuDone:
    """A vCPU stopped: what it wrote."""

    index: int
    writes: int
    batches: int
    seconds: float


@dataclass(frozen=True)
class DowntimeDone:
    pages: int
    newly_dirty: int
    ram_size: int
    seconds: float
    stop_wait: float
    copy_seconds: float


@dataclass(frozen=True)
class Done:
    """The migrator finished: the whole run, as it saw it."""

    rounds: tuple[RoundEnd, ...]
    reason: str
    last_check: RoundStart | None   # the last round's sync (a RoundEnd if it was sent)
    t_go: float
    t_stop: float
    t_end: float
    downtime: DowntimeDone


# --- the migration stream (workers.sender) and the KVM guest (workers.kvm_run) ---------
@dataclass(frozen=True)
class Connected:
    """The migrator reached the destination and sent the stream's HELLO."""

    host: str
    port: int


@dataclass(frozen=True)
class Switchover:
    """Source RAM (paused) against the destination's, before the handover:
    ``method`` "bytes" (same machine) or "digests" (SHA-256 per chunk)."""

    identical: bool
    method: str
    compared: int               # pages (bytes) or chunks (digests)
    differ: tuple[int, ...]     # the first differing pages or chunks
    n_differ: int
    seconds: float
    detail: str = ""


@dataclass(frozen=True)
class Handover:
    """The source handed the guest over.  ``outcome``: ``done`` (the
    destination committed, ran the guest and reported how it ended:
    ``result``, its RESULT record), ``lost after commit`` (it committed,
    then died or fell silent: ``error``; the guest was there), ``unknown``
    (RESUME sent, then silence: it may or may not run the guest; the source
    discarded its copy)."""

    pages_sent: int
    bytes_sent: int
    send_seconds: float         # seconds spent sending pages (throughput's denominator)
    stream_bytes: int           # every byte of the stream, headers included
    result: dict[str, Any] | None
    error: str | None
    vcpu_states: tuple[dict[str, int], ...]   # registers at the switchover
    outcome: str = "done"


@dataclass(frozen=True)
class DestinationLost:
    """The destination went away (or refused the stream) before the handover."""

    message: str


@dataclass(frozen=True)
class GuestHotadd:
    """The VM owner hot-added RAM when a vCPU of the guest reached the hot-add step."""

    offset: int
    size: int
    t: float                    # monotonic seconds
    progress: tuple[int, ...]   # steps done by each vCPU then


@dataclass(frozen=True)
class GuestDone:
    """The VM owner: the source guest ran to its end on its own (the
    destination was lost, or there was no migrator)."""

    vcpus: tuple[dict[str, int], ...]   # each vCPU's registers, ``checksum`` = rax
    t: float                    # seconds since the guest started
    syncs: int                  # log-syncs made for the migrator
    logged: int                 # pages KVM's dirty log held over them


@dataclass(frozen=True)
class HandedOver:
    """The VM owner: the destination took over; the source guest stops here."""

    progress: tuple[int, ...]   # steps done by each vCPU then


@dataclass(frozen=True)
class DataplaneDone:
    """The dataplane left: how many requests it completed."""

    requests: int


@dataclass(frozen=True)
class GuestStarted:
    """A KVM run is set up: every process is ready and the vCPUs run."""

    map_name: str
    ram: int
    vcpus: int
    pattern: str
    steps: int
    why: str                    # why this guest (``--guest auto``)
    destination: str            # host:port, and whether migrate started it


@dataclass(frozen=True)
class Listening:
    """A receiver started by the run listens on ``host:port``."""

    host: str
    port: int


@dataclass(frozen=True)
class Received:
    """A receiver started by the run is done: its ``result`` (map, pages, and
    for KVM the resumed guest's end)."""

    result: dict[str, Any]


# --- the destination's own progress (workers.receiver -> `shmdirty receive`) --------------
@dataclass(frozen=True)
class StreamHello:
    """The source's HELLO record (docs/STREAM.md): page size, guest, digests."""

    hello: dict[str, Any]


@dataclass(frozen=True)
class BlocksReady:
    """The RAM blocks the stream announced are allocated here."""

    blocks: tuple[tuple[int, int], ...]   # (offset, size) of every block so far


@dataclass(frozen=True)
class RoundReceived:
    """A pre-copy round's ROUND record arrived."""

    round: int
    pages: int                  # pages received so far


@dataclass(frozen=True)
class Abandoned:
    """The source gave up (ABANDON): nothing is resumed."""


@dataclass(frozen=True)
class Resumed:
    """The destination resumed the guest (KVM)."""

    vcpus: int


DestinationReport = StreamHello | BlocksReady | RoundReceived | Abandoned | Resumed

Report = (Ready | WorkerFailed | Started | RoundStart | Sent | Hotplug | HotplugSkipped
          | HotplugRefused
          | Stopping | Downtime | VcpuDone | Done | Connected | Switchover | Handover
          | DestinationLost | GuestHotadd | GuestDone | HandedOver | DataplaneDone
          | GuestStarted | Listening | Received)
