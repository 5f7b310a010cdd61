"""The ``shmdirty migrate`` application: one live migration, no rendering.

    guest, why = choose_guest("auto")            # "kvm" where /dev/kvm works
    result = run(MigrateConfig(..., guest=guest, guest_why=why), on_event)

One orchestration for both guests (``workers.migration``): the simulated
guest's differences are ``workers.sim_run`` (this process is the
coordinator, vCPU, hot-plug and migrator worker processes), the KVM
guest's ``workers.kvm_run`` (a VM owner, a dataplane and a migrator
process).  Either way the migrator streams the guest over TCP
(``workers.sender``) to a receiver process the run starts on loopback (or
to ``to``), and source and destination are compared at the switchover.

``on_event`` receives every typed report of ``workers.reports`` as it
arrives (``Started`` or ``GuestStarted`` from the run, the rest from its
processes): a front end renders progress from them.  ``run`` returns the result (a JSON-ready dict)
or raises ``Usage`` (the options cannot make a map), ``Failed`` (a worker
failed, or the run timed out), ``Interrupted`` (SIGINT / SIGTERM) or
``DestinationGone`` (the destination went away before the handover); each
carries the map name and how many segments teardown removed.  Whatever
happens, every worker is stopped (asked first, then signalled) and every
segment of the run (its map, and a loopback receiver's) is removed before
``run`` returns or raises.

Guest RAM lives in memfds (``workers.memfd``), never in /dev/shm: a killed
process's RAM goes with it.  What a killed coordinator leaves is the small
bitmap of a dead map; ``run`` and ``receive`` begin with a cheap gc of
those (``collect_dead_maps``), as ``shmdirty gc`` does.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil

from shmdirty import layout, maps, segment
from shmdirty.errors import ShmDirtyError

from . import guest_kvm as gk
from . import kvm, kvm_run, migration, receive_service
from .config import MigrateConfig
from .guest import MAX_MIGRATE_NAME, PAGE_BITS
from .kvm_run import KvmGuest
from .lifecycle import (
    EXIT_STREAM,
    DestinationGone,
    Failed,
    Interrupted,
    RunError,
    Signals,
    TimedOut,
    Usage,
)
from .migration import GuestKind, OnEvent
from .plot import plot_rounds
from .receive_service import ServiceConfig
from .reports import DestinationReport
from .sender import FIRST_DIFFS  # how many differing pages a mismatch names
from .sim_run import SimGuest, vcpu_rate
from .transport import Endpoint, TransportError

__all__ = ["FIRST_DIFFS", "PAGE_BITS", "DestinationGone", "Failed", "Interrupted",
           "MigrateConfig", "RunError", "ServiceConfig", "StreamRefused", "TimedOut", "Usage",
           "choose_guest", "plot_rounds", "receive", "run", "vcpu_rate"]

MAX_READERS = 64          # reader slots of the map (DirtyMemory.create's default)
# A map that died this recently may be one someone is looking at (``shmdirty
# inspect`` after a crash, a test): the start-up gc leaves it to ``shmdirty gc``.
GC_MIN_AGE = 10.0         # seconds since the map's header was created


def collect_dead_maps(min_age: float = GC_MIN_AGE) -> list[str]:
    """The start-up gc of ``migrate`` and ``receive``: remove every map whose
    coordinator and readers are all dead (``shmdirty.maps.collect``, which
    looks once more before it unlinks) and whose header is at least
    ``min_age`` seconds old; the names removed.  Headerless leftovers are
    ``shmdirty gc``'s.  Never fails a run."""
    removed = []
    now = time.time()
    for name in segment.list_maps():
        try:
            age = now - os.stat(os.path.join(segment.SHM_DIR, layout.header_name(name))).st_ctime
            if age >= min_age and maps.collect(name)[1]:
                removed.append(name)
        except (OSError, ShmDirtyError):
            continue     # gone meanwhile, or not ours to judge
    return removed


def choose_guest(requested: str) -> tuple[str, str]:
    """("kvm" or "sim", why) for ``--guest requested`` (kvm, sim or auto)."""
    if requested == "sim":
        return "sim", "--guest sim: simulated vCPU processes"
    ok, why = kvm.usable()
    if requested == "kvm":
        if not ok:
            raise Usage(f"--guest kvm: {why}")
        return "kvm", f"--guest kvm: {why}"
    if requested != "auto":
        raise Usage(f"--guest {requested!r}: kvm, sim or auto")
    return ("kvm", f"--guest auto: {why}, a KVM guest") if ok else \
        ("sim", f"--guest auto: {why}; simulated vCPU processes instead")


def kvm_config(cfg: MigrateConfig) -> kvm_run.KvmRunConfig:
    """The KVM run of ``cfg``: ``hotplug`` times are percent of the guest's steps."""
    pattern = "random" if cfg.pattern == "uniform" else cfg.pattern
    steps = cfg.steps or gk.DEFAULT_STEPS.get(pattern, 0)
    try:
        guest = gk.GuestConfig(
            ram=cfg.ram, vcpus=cfg.vcpus, pattern=pattern, steps=steps, seed=cfg.seed,
            hotplug=tuple((max(1, int(steps * at / 100)), size) for at, size in cfg.hotplug),
            dataplane_pages=256 if cfg.dataplane_rate else 0)
    except ValueError as e:
        raise Usage(f"the KVM guest: {e}") from None
    return kvm_run.KvmRunConfig(
        guest=guest, why=cfg.guest_why, to=cfg.to, bandwidth=cfg.bandwidth * (1 << 20),
        threshold=cfg.threshold, max_rounds=cfg.max_rounds,
        dataplane=bool(cfg.dataplane_rate), dataplane_rate=cfg.dataplane_rate,
        dataplane_forget=cfg.dataplane_forget, drop_round=cfg.drop_round,
        kill_destination_at=cfg.kill_destination_at, name=cfg.name,
        block_pages=cfg.block_pages, timeout=cfg.timeout, peer_timeout=cfg.peer_timeout,
        tls_creds=cfg.tls_creds)


class StreamRefused(RunError):
    """``shmdirty receive``: the last connection failed; ``code`` is the
    command's exit code for it (5 the stream, 9 this host, 10 the resumed guest)."""

    def __init__(self, message: str, code: int = EXIT_STREAM) -> None:
        super().__init__(message)
        self.code = code


def receive(cfg: ServiceConfig, on_event: Callable[[DestinationReport], None],
            on_listening: Callable[[Endpoint], None],
            on_refused: Callable[[int, str, str], None]) -> dict[str, Any]:
    """``shmdirty receive``: serve ``cfg`` until one migration is resumed to
    its end (``workers.receive_service``); its result.  ``StreamRefused``
    (the connection that ended the service), ``Usage`` (the TLS
    credentials), OSError (cannot listen), or ``Interrupted`` on SIGINT /
    SIGTERM; the receiver's VM and segments are gone either way."""
    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)    # unwinds receive(), whose finally tears down

    collect_dead_maps()
    old = {s_: signal.signal(s_, interrupt) for s_ in Signals.SIGNALS}
    try:
        return receive_service.serve(cfg, on_event, on_listening, on_refused)
    except receive_service.ConnectionFailed as e:
        raise StreamRefused(str(e), e.code) from None
    except TransportError as e:
        raise Usage(str(e)) from None
    finally:
        for s_, h in old.items():
            signal.signal(s_, h)


def check_config(cfg: MigrateConfig) -> None:
    """Usage if the options cannot make a run on this machine."""
    if cfg.block_pages % 64:
        raise Usage(f"--block-pages {cfg.block_pages} must be a multiple of 64")
    if cfg.vcpus + 3 > MAX_READERS:
        raise Usage(f"--vcpus {cfg.vcpus}: at most {MAX_READERS - 3} (the map has "
                    f"{MAX_READERS} reader slots)")
    # Guest RAM and its copy are memfds (workers.memfd): host memory, not /dev/shm.
    need = 2 * (cfg.ram + sum(size for _, size in cfg.hotplug))  # source + destination
    free = psutil.virtual_memory().available
    if need > free * 0.9:
        raise Usage(f"guest RAM and its copy need {need >> 20} MiB of memory, "
                    f"only {free >> 20} MiB is available")
    if cfg.name is not None:
        try:   # <name>_dst, the loopback receiver's map, must fit too (issue 17.4)
            segment.check_map_name(cfg.name, MAX_MIGRATE_NAME)
        except ValueError as e:
            raise Usage(f"--name: {e}") from None
    if cfg.name is not None and segment.list_segments(cfg.name):
        raise Usage(f"map {cfg.name} already exists")


def run(cfg: MigrateConfig, on_event: OnEvent) -> dict[str, Any]:
    """One migration (module doc); the result dict, or a RunError."""
    collect_dead_maps()
    check_config(cfg)
    kind: GuestKind = KvmGuest(kvm_config(cfg)) if cfg.guest == "kvm" else SimGuest(cfg)
    return migration.run(kind, on_event)
