"""The destination of a migration: ``shmdirty receive --listen HOST:PORT``.

One connection, one migration.  The receiver is the coordinator of a map of
its own, whose RAM blocks it creates as the stream announces them (same
offsets and sizes as the source's, hot-added blocks included); pages land
in those segments.  For a KVM guest it also builds its own VM over them
(``GuestVM`` without dirty logging), loads the vCPU state at the end of the
stream and, once the source says RESUME, starts the guest, says RUNNING
(the commit point of docs/STREAM.md: from here the guest is this side's),
runs it to completion and sends back its result; a source that is gone by
then does not stop the guest.  For the simulated guest there is nothing to
resume (RUNNING follows RESUME at once).  Every wait for the source ends
within ``peer_timeout`` (``workers.peer``); a heartbeat thread keeps this
side audible while it loads, digests or runs the guest.

Whatever happens, the receiver's VM is closed and every segment of its map
is unlinked before ``receive()`` returns or raises: a refused or truncated
stream leaves nothing behind.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from shmdirty import DirtyMemory
from shmdirty.errors import ShmDirtyError

from . import guest_kvm as g
from . import pause
from . import stream as s
from .guest import PAGE_BITS, GuestRam
from .peer import DEFAULT_PEER_TIMEOUT, Heartbeat, tune
from .reports import (
    Abandoned,
    BlocksReady,
    DestinationReport,
    Resumed,
    RoundReceived,
    StreamHello,
)
from .stream import Channel, PeerGone, PeerSilent, StreamError

HANDSHAKE_TIMEOUT = 10.0  # seconds from the accept to a whole HELLO (TLS included)
GUEST_TIMEOUT = 600.0    # seconds the resumed guest may run (--guest-timeout)

ACCEPT_POLL = 0.2        # seconds between two looks at should_stop() while listening

Report = Callable[[DestinationReport], None]   # the destination's progress, typed


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Before listen(): accepted sockets inherit it (stream.SOCKET_BUFFER).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, s.SOCKET_BUFFER)
        sock.bind((host, port))
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def accept(listener: socket.socket, should_stop: Callable[[], bool] = lambda: False,
           timeout: float | None = None, peer_timeout: float = DEFAULT_PEER_TIMEOUT
           ) -> socket.socket | None:
    """Wait for the source; None if ``should_stop()`` or ``timeout`` first."""
    listener.settimeout(ACCEPT_POLL)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not should_stop():
        if deadline is not None and time.monotonic() > deadline:
            return None
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        tune(conn, peer_timeout)
        return conn
    return None


class HostFailure(ShmDirtyError, OSError):
    """This host cannot hold the guest: KVM, memory (guest RAM's memfds) or
    /dev/shm (the map's bitmap) failed after the accept, or the guest needs
    more RAM than ``--max-ram``."""


class GuestFailed(ShmDirtyError, RuntimeError):
    """The resumed guest did not run to its end (a vCPU fault such as HLT
    at CPL 3, a shutdown, or ``--guest-timeout``)."""


@dataclass(frozen=True)
class Limits:
    """What one connection may make this receiver do."""

    max_ram: int = 0                    # bytes of guest RAM; 0: what this host can hold
    handshake_timeout: float = HANDSHAKE_TIMEOUT   # accept to HELLO
    peer_timeout: float = DEFAULT_PEER_TIMEOUT  # then: seconds of silence (--peer-timeout)
    guest_timeout: float = GUEST_TIMEOUT  # the resumed guest's run


def host_ram_limit() -> tuple[int, str]:
    """(bytes, why): the guest RAM this host can hold now: its available
    memory (guest RAM is in memfds, workers.memfd, not in /dev/shm)."""
    import psutil
    mem = int(psutil.virtual_memory().available)
    return mem, f"{mem >> 20} MiB of memory available"


def check_ram(need: int, limits: Limits) -> None:
    """HostFailure, before anything is allocated, if ``need`` bytes of guest
    RAM are more than ``--max-ram`` or than this host can hold."""
    have, why = host_ram_limit()
    if limits.max_ram and limits.max_ram < have:
        have, why = limits.max_ram, f"--max-ram {limits.max_ram >> 20} MiB"
    if need > have:
        raise HostFailure(f"the guest needs {need >> 20} MiB of RAM, more than this receiver "
                          f"may hold ({why})")


def parse_hello(payload: memoryview) -> tuple[int, g.GuestConfig | None, bool]:
    """(page bits, the KVM guest's config or None, digests) of a HELLO;
    StreamError for anything else than docs/STREAM.md describes."""
    try:
        hello = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError) as e:
        raise StreamError(f"HELLO is not JSON: {e}") from None
    if not isinstance(hello, dict):
        raise StreamError(f"HELLO is a JSON {type(hello).__name__}, not an object")
    bits = hello.get("page_bits")
    if type(bits) is not int or not s.MIN_PAGE_BITS <= bits <= s.MAX_PAGE_BITS:
        raise StreamError(f"HELLO: page_bits {bits!r}, not a whole number from "
                          f"{s.MIN_PAGE_BITS} to {s.MAX_PAGE_BITS}")
    digests = hello.get("digests", True)
    if not isinstance(digests, bool):
        raise StreamError(f"HELLO: digests {digests!r}, not true or false")
    guest = hello.get("guest")
    if guest is None:
        return bits, None, digests
    if bits != PAGE_BITS:
        raise StreamError(f"HELLO: a KVM guest has page_bits {PAGE_BITS}, not {bits}")
    if not isinstance(guest, str):
        raise StreamError("HELLO: guest is not the JSON text of a guest configuration")
    try:
        return bits, g.GuestConfig.from_json(guest), digests
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise StreamError(f"HELLO: bad guest configuration: {e}") from None


class Destination:
    """The receiving side of one connection: its map, RAM and (KVM) VM."""

    def __init__(self, ch: Channel, report: Report, map_name: str | None,
                 limits: Limits = Limits()) -> None:
        self.ch, self.report, self.map_name, self.limits = ch, report, map_name, limits
        self.dm: DirtyMemory | None = None
        self.ram: GuestRam | None = None
        self.vm: Any = None                 # workers.vm.GuestVM for a KVM guest
        self.cfg: g.GuestConfig | None = None
        self.pages = 0
        self.records = 0

    def run(self) -> dict[str, Any]:
        with Heartbeat(self.ch, self.limits.peer_timeout):
            return self._run(self.ch)

    def _run(self, ch: Channel) -> dict[str, Any]:
        ch.sock.settimeout(self.limits.handshake_timeout)   # accept to HELLO
        ch.expect_preamble()
        _, _, payload = ch.recv_expect(s.HELLO)
        bits, self.cfg, digests = parse_hello(payload)
        ch.sock.settimeout(self.limits.peer_timeout)     # then: bounded waits (workers.peer)
        self.page_size = 1 << bits
        ch.limits[s.PAGES] = s.MAX_CHUNK_PAGES * (8 + self.page_size) + s.CRC.size
        if self.cfg is not None:
            check_ram(self.cfg.ram_total, self.limits)
        self.report(StreamHello(json.loads(bytes(payload))))
        self.dm = DirtyMemory.create(0, page_bits=bits, name=self.map_name)
        if self.cfg is not None:
            from .vm import GuestVM  # only a KVM destination needs /dev/kvm
            self.vm = GuestVM(self.dm, self.cfg, log_dirty=False)
            self.ram = self.vm.ram
        else:
            self.ram = GuestRam(self.dm.name, self.dm.page_bits, "ram")
        states = self._load()
        pause.at("end")
        t_loaded = time.monotonic()
        ch.send_json(s.LOADED, {"map": self.dm.name, "blocks": self.ram.blocks,
                                "pages": self.pages})
        digest_list = s.ram_digests(self.ram.views) if digests else []
        ch.send(s.DIGESTS, [b"".join(digest_list)], count=len(digest_list))
        pause.at("digests")
        rtype, _, _ = ch.recv_expect(s.RESUME, s.ABANDON)
        result: dict[str, Any] = {"map": self.dm.name, "pages": self.pages,
                                  "blocks": list(self.ram.blocks), "resumed": False}
        if rtype == s.ABANDON:
            self.report(Abandoned())
            return dict(result, abandoned=True)
        pause.at("resumed")
        if self.vm is not None:
            raw = self.ram.views[0].reshape(-1)
            hotadds = [int(raw[(g.params_addr(v) + g.P_NREG) // 8]) - 1
                       for v in range(self.cfg.vcpus)] if self.cfg else []
            self.vm.restore(states, hotadds)
            self.vm.start()
        ch.send(s.RUNNING)     # the commit point: the guest is ours from here
        pause.at("running")
        if self.vm is not None:
            self.report(Resumed(len(states)))
            t0 = time.monotonic()
            try:
                self.vm.run_to_end(timeout=self.limits.guest_timeout)
            except TimeoutError as e:
                raise GuestFailed(f"the resumed guest failed: {e} (--guest-timeout)") from None
            if self.vm.errors:
                raise GuestFailed("the resumed guest failed: " + "; ".join(self.vm.errors))
            result.update(resumed=True, vcpus=self.vm.results(), run_seconds=time.monotonic() - t0,
                          hotadds=[(o, z) for o, z, _ in self.vm.hotadds],
                          blocks=list(self.ram.blocks), loaded_at=t_loaded)
        try:
            ch.send_json(s.RESULT, {k: v for k, v in result.items() if k != "loaded_at"})
        except PeerGone as e:      # the guest ran here all the same: it was ours
            result["source_gone"] = str(e)
        return result

    def _load(self) -> list[Any]:
        """Records up to END: RAM blocks, pages, rounds, vCPU state."""
        from .vm import VcpuState
        states: list[VcpuState] = []
        while True:
            try:
                rtype, count, payload = self.ch.recv_expect(s.BLOCKS, s.PAGES, s.ROUND,
                                                            s.VCPUS, s.END_OF_STREAM)
            except PeerSilent:
                raise
            except PeerGone as e:
                raise StreamError(f"stream truncated before its end marker: {e}") from None
            if rtype == s.PAGES:
                assert self.ram is not None
                numbers, data = s.unpack_pages(count, payload, self.page_size)
                try:
                    for b, local, sel in self.ram.split(numbers):
                        self.ram.views[b][local] = data if len(sel) == count else data[sel]
                except ValueError as e:
                    raise StreamError(f"PAGES record: {e}") from None
                self.pages += count
                self.records += 1
            elif rtype == s.BLOCKS:
                self._blocks(s.unpack_blocks(count, payload))
            elif rtype == s.ROUND:
                self.report(RoundReceived(count, self.pages))
                pause.at("precopy")
            elif rtype == s.VCPUS:
                states = [VcpuState(i, d, r, sr) for i, d, r, sr in s.unpack_vcpus(count, payload)]
                n = self.cfg.vcpus if self.cfg is not None else 0
                if sorted(st.index for st in states) != list(range(len(states))) or \
                        len(states) not in (0, n):
                    raise StreamError(f"VCPUS record: indexes {[st.index for st in states]}, "
                                      f"expected 0 to {n - 1} once each")
            else:
                pages, records = s.END.unpack(payload)
                if (pages, records) != (self.pages, self.records):
                    raise StreamError(f"END says {pages} pages in {records} records, "
                                      f"{self.pages} in {self.records} arrived")
                if self.vm is not None and len(states) != self.vm.cfg.vcpus:
                    raise StreamError(f"{len(states)} vCPU states for {self.vm.cfg.vcpus} vCPUs")
                return states

    def _blocks(self, blocks: list[tuple[int, int]]) -> None:
        assert self.dm is not None and self.ram is not None
        # refused before anything is allocated
        s.check_ram_layout(blocks, available=1 << 62)
        check_ram(sum(size for _, size in blocks), self.limits)
        try:
            if self.vm is not None:
                self.vm.ensure_blocks(blocks)
            else:
                have = self.dm.ram_blocks()
                for i, (offset, size) in enumerate(blocks[len(have):], len(have)):
                    if self.dm.ram_block_add(size) != offset:
                        raise ValueError(f"RAM block {i} does not go to {offset:#x} here")
                for i in self.ram.update(self.dm.ram_blocks(), create=True):
                    self.ram.preallocate(i)
        except ValueError as e:
            raise StreamError(f"BLOCKS record: {e}") from None
        self.ch.send(s.READY)       # their memory is allocated: pages may come
        self.report(BlocksReady(tuple(self.ram.blocks)))

    def close(self) -> None:
        """Tear everything down: VM, mappings, every segment of the map."""
        if self.vm is not None:
            self.vm.close()
        elif self.ram is not None:
            self.ram.close()
        if self.dm is not None:
            self.dm.destroy()
        self.ch.close()


def receive(conn: socket.socket, report: Report, map_name: str | None = None,
            limits: Limits = Limits()) -> dict[str, Any]:
    """Receive one migration on ``conn`` and resume it.  StreamError /
    PeerGone (the stream; PeerSilent: nothing for ``limits.peer_timeout``),
    HostFailure (this host), GuestFailed (the resumed guest); the source is
    sent an ERROR record first where it still listens."""
    dest = Destination(Channel(conn), report, map_name, limits)
    try:
        return dest.run()
    except PeerGone:
        raise
    except BaseException as e:
        err: BaseException = e
        if isinstance(e, (OSError, MemoryError)) and not isinstance(e, (StreamError,
                                                                        HostFailure)):
            err = HostFailure(f"this host cannot hold the guest: {type(e).__name__}: {e}")
        try:
            dest.ch.send_json(s.ERROR, {"message": f"{type(err).__name__}: {err}"})
        except (OSError, PeerGone):
            pass
        if err is not e:
            raise err from None
        raise
    finally:
        dest.close()


def main(host: str, port: int, map_name: str | None, peer_timeout: float,
         parent: Connection) -> None:
    """Process entry point of a receiver started by ``shmdirty migrate``:
    reports ``Listening`` (with the bound port), then ``Received``, or
    ``DestinationLost`` (the stream was refused) or ``WorkerFailed``.  It
    stops listening when its parent says anything or goes away."""
    import signal
    import traceback

    from .reports import DestinationLost, Listening, Received, WorkerFailed
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with listen(host, port) as listener:
            parent.send(Listening(host, listener.getsockname()[1]))
            conn = accept(listener, should_stop=parent.poll, peer_timeout=peer_timeout)
        if conn is not None:
            parent.send(Received(receive(conn, lambda ev: None, map_name,
                                         Limits(peer_timeout=peer_timeout))))
    except (StreamError, PeerGone) as e:
        parent.send(DestinationLost(f"the destination refused the stream: {e}"))
        raise SystemExit(1) from None
    except BaseException:
        try:
            parent.send(WorkerFailed("receiver", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
