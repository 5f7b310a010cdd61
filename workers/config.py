"""The options of one ``shmdirty migrate`` run, as the command line hands
them to the application (``workers.app``); each guest kind reads its own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MigrateConfig:
    ram: int
    vcpus: int = 2
    dirty_rate: float = 2000
    pattern: str = "uniform"
    hot_fraction: float = 0.05
    dirty_mode: str = "flag"
    hotplug: tuple[tuple[float, int], ...] = ((1.0, 32 << 20),)
    block_pages: int = 4096
    bandwidth: float = 24.0     # MiB/s, 0: unlimited
    threshold: int = 256
    max_rounds: int = 30
    seed: int = 1
    timeout: float = 300.0
    drop_round: int = 0
    name: str | None = None
    guest: str = "sim"          # "sim" or "kvm": choose_guest() resolves --guest auto
    guest_why: str = ""
    to: tuple[str, int] | None = None   # a receiver elsewhere (host "unix:PATH": a Unix
                                        # socket); None: one on loopback
    tls_creds: str | None = None        # TLS with both ends verified (workers.transport)
    steps: int = 0              # KVM: guest steps per vCPU, 0: the pattern's default
    dataplane_rate: float = 1000.0      # KVM: dataplane requests/s, 0: no dataplane
    dataplane_forget: bool = False      # testing: a dataplane that forgets to mark
    kill_destination_at: int = 0        # testing: SIGKILL the loopback receiver at round N
    peer_timeout: float = 5.0   # seconds of silence after which a peer is lost (workers.peer)
