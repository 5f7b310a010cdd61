"""The migration thread of QEMU, as a process that streams over TCP.

It attaches the map and the source's guest RAM, connects to the
destination and sends the stream of docs/STREAM.md.  Its migration bitmap
(``MigrationBitmap``: one bit per page, all ones at first: the bulk stage;
new RAM starts dirty) is filled by ``sync_dirty_bitmap``.  Each round:

1. ask the guest's owner to log-sync (for KVM: ``KVM_GET_DIRTY_LOG`` merged
   into the map), then announce new RAM blocks (BLOCKS) and grow the bitmap;
2. ``sync_dirty_bitmap``: take the MIGRATION bits into the bitmap;
3. from the second round on, at most ``threshold`` dirty pages means
   pre-copy has converged;
4. send every dirty page (PAGES records of ``chunk_pages``), taking its bit
   before reading it, at most ``bandwidth`` bytes per second (0: no limit);

until ``max_rounds``.  Stop-and-copy: the owner pauses the guest (and the
dataplane), syncs once more; the last dirty pages, the vCPU state and the
end marker follow.  The destination answers LOADED (the downtime ends
there) and its RAM digests; the source RAM, still paused, is compared with
the destination's: byte for byte when the destination's segments are on
this machine (``local``), else chunk digest by chunk digest.  Then the
handover with its commit point (docs/STREAM.md): the source sends RESUME
and keeps its paused guest until the destination answers RUNNING (its
guest runs there: the commit); only then is the source guest discarded
(``handover``), and the destination reports how the guest ended (RESULT).

A destination that goes away (or refuses) before the commit fails the
migration: the owner lets the source guest run on (``cont``), as QEMU
does.  Every wait is bounded by ``peer_timeout`` (``workers.peer``).  The
one case that cannot be decided: RESUME sent, then silence (no RUNNING, no
close) for ``peer_timeout``: the destination may be running the guest, so
the source discards its copy (never two running) and reports the guest's
fate as unknown (``Handover.outcome``).
"""

from __future__ import annotations

import json
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol, TypeVar

import numpy as np

from shmdirty import DirtyMemory

from . import stream as s
from .guest import GuestRam, compare
from .messages import Cont, Go, HandOver, LogSync, Stop, Stopped, Synced
from .migration_bitmap import MigrationBitmap
from .peer import DEFAULT_PEER_TIMEOUT, Heartbeat, tune
from .reports import (
    Connected,
    DestinationLost,
    Done,
    Downtime,
    DowntimeDone,
    Handover,
    Ready,
    Report,
    RoundEnd,
    RoundStart,
    Sent,
    Stopping,
    Switchover,
    WorkerFailed,
)
from .stream import Channel, PeerGone, PeerSilent, StreamError
from .transport import Endpoint, connect

__all__ = ["DEFAULT_PEER_TIMEOUT", "Lost", "Sender", "SenderConfig"]

CONNECT_TIMEOUT = 10.0
REPORT_EVERY = 0.05
STOP_AND_COPY = -1       # drop_round value that drops the stop-and-copy set (testing)
FIRST_DIFFS = 10         # how many differing pages (or chunks) a mismatch names


_Answer = TypeVar("_Answer", Synced, Stopped)


class Aborted(Exception):
    """The run gave up (Ctrl-C, SIGTERM, or it died)."""


class Lost(Exception):
    """The destination went away or refused the stream before the handover."""


class GuestControl(Protocol):
    """What the migrator asks of whoever runs the guest."""

    def log_sync(self) -> int:
        """Put every store made so far into the map's dirty bits; returns
        the pages the hypervisor's log held (0 where there is none)."""
    def stop(self) -> list[Any]:
        """Pause the guest and every writer, log-sync once more; returns the
        vCPU states (``workers.vm.VcpuState``; none for the simulated guest)."""
    def cont(self) -> None:
        """The migration failed after ``stop()``: let the source guest run on."""
    def handover(self) -> None:
        """The destination takes over: the source guest is discarded."""


class OwnerControl:
    """A KVM VM owner (``workers.vm_owner``) at the other end of a pipe,
    asked in ``workers.messages``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _ask(self, msg: LogSync | Stop, answer: type[_Answer]) -> _Answer:
        self.conn.send(msg)
        try:
            reply = self.conn.recv()
        except EOFError:
            raise RuntimeError("the VM owner process is gone") from None
        if not isinstance(reply, answer):
            raise RuntimeError(f"the VM owner answered {reply!r} to {msg!r}")
        return reply

    def log_sync(self) -> int:
        return self._ask(LogSync(), Synced).pages

    def stop(self) -> list[Any]:
        return list(self._ask(Stop(), Stopped).states)

    def cont(self) -> None:
        self.conn.send(Cont())

    def handover(self) -> None:
        self.conn.send(HandOver())


@dataclass(frozen=True)
class SenderConfig:
    host: str
    port: int
    guest: str | None = None        # GuestConfig JSON (KVM); None: the simulated guest
    bandwidth: float = 0.0          # bytes per second during pre-copy; 0: no limit
    threshold: int = 512            # dirty pages at which pre-copy has converged
    max_rounds: int = 30
    chunk_pages: int = 256          # pages per PAGES record
    local: bool = True              # the destination's segments are on this machine
    drop_round: int = 0             # testing: forget this round's dirty pages
                                    # (STOP_AND_COPY: the final set)
    peer_timeout: float = DEFAULT_PEER_TIMEOUT   # seconds of silence that mean the peer is lost
    tls_creds: str | None = None    # TLS with both ends verified (workers.transport)


class Sender:
    """One migration over one connection (module doc)."""

    def __init__(self, dm: DirtyMemory, cfg: SenderConfig, control: GuestControl,
                 report: Callable[[Report], None], aborted: Callable[[], bool]) -> None:
        self.dm, self.cfg, self.control = dm, cfg, control
        self.report, self.aborted = report, aborted
        self.src = GuestRam(dm.name, dm.page_bits, "ram")
        self.bitmap = MigrationBitmap()
        self.ch: Channel | None = None
        self.pages_sent = 0
        self.records = 0
        self.send_seconds = 0.0
        self._buf = np.empty((0, dm.page_size // 8), np.uint64)

    def check_abort(self) -> None:
        if self.aborted():
            raise Aborted

    def connect(self) -> Channel:
        cfg = self.cfg
        ep = Endpoint.of(cfg.host, cfg.port)
        try:
            sock = connect(ep, cfg.tls_creds, CONNECT_TIMEOUT)
        except OSError as e:    # Refused (the TLS handshake) included
            raise Lost(f"cannot connect to {ep}: {e.strerror or e}") from None
        tune(sock, cfg.peer_timeout)
        ch = Channel(sock)
        try:
            ch.preamble()
            ch.send_json(s.HELLO, {"page_bits": self.dm.page_bits, "guest": cfg.guest,
                                   "digests": not cfg.local, "source_map": self.dm.name})
        except PeerGone as e:
            raise Lost(str(e)) from None
        return ch

    def sync(self) -> tuple[int, int]:
        """Steps 1-2: (pages newly dirty, RAM size)."""
        assert self.ch is not None
        self.control.log_sync()
        blocks = self.dm.ram_blocks()
        new = self.src.update(blocks)
        if new:
            self.ch.send(s.BLOCKS, [s.pack_blocks(self.src.blocks)], count=len(self.src.blocks))
            for i in new:                  # map them here while the destination allocates
                self.src.populate(i)
            self.ch.recv_expect(s.READY)   # its RAM for them is allocated
        self.bitmap.extend(self.src.npages)
        ram_size = self.src.npages << self.dm.page_bits
        return self.dm.sync_dirty_bitmap(self.bitmap.words, 0, ram_size), ram_size

    def send_pages(self, round_no: int, pages: np.ndarray[Any, Any], bandwidth: float) -> float:
        """Send ``pages`` (ascending); returns the seconds it took."""
        assert self.ch is not None
        t0 = last = time.monotonic()
        page_size = self.dm.page_size
        chunk = self.cfg.chunk_pages
        if len(self._buf) < chunk:  # reused: fresh memory costs a page fault per 4 KiB here
            self._buf = np.empty((chunk, page_size // 8), np.uint64)
        for i in range(0, len(pages), chunk):
            self.check_abort()
            part = pages[i:i + chunk]
            data = self._buf[:len(part)]
            for b, local, sel in self.src.split(part):
                if len(sel) == len(part):
                    np.take(self.src.views[b], local, axis=0, out=data)
                else:
                    data[sel] = self.src.views[b][local]
            self.ch.send_pages(part, data)
            self.records += 1
            sent = i + len(part)
            now = time.monotonic()
            if bandwidth:
                ahead = t0 + sent * page_size / bandwidth - now
                if ahead > 0:       # the rate limit (QEMU's max-bandwidth)
                    time.sleep(ahead)
            if now - last >= REPORT_EVERY:
                self.report(Sent(round_no, sent))
                last = now
        seconds = time.monotonic() - t0
        self.pages_sent += len(pages)
        self.send_seconds += seconds
        return seconds

    def run(self) -> None:
        """Migrate; the outcome is reported (``Done``, ``Switchover``, ``Handover``).
        Raises ``Lost`` if the destination goes away before the commit."""
        self.ch = self.connect()
        with Heartbeat(self.ch, self.cfg.peer_timeout):
            self._run(self.ch)

    def _run(self, ch: Channel) -> None:
        cfg = self.cfg
        self.report(Connected(cfg.host, cfg.port))
        t_go = last_sync = time.monotonic()
        rounds: list[RoundEnd] = []
        reason = "max rounds"
        round_no = 0
        check: RoundStart | None = None
        stopped = resume_sent = False
        try:
            while round_no < cfg.max_rounds:
                round_no += 1
                t_sync = time.monotonic()
                newly, ram_size = self.sync()
                elapsed, last_sync = t_sync - last_sync, t_sync
                dropped = 0
                if round_no == cfg.drop_round:
                    dropped = self.bitmap.count()
                    self.bitmap.clear()
                dirty = self.bitmap.count()
                check = RoundStart(
                    round=round_no, ram_size=ram_size, dirty=dirty, newly_dirty=newly,
                    dirty_rate=newly / elapsed if round_no > 1 and elapsed > 0 else None,
                    dropped=dropped, t_start=t_sync)
                if round_no > 1 and dirty <= cfg.threshold:
                    reason = "converged"
                    break
                ch.send(s.ROUND, [np.array([dirty], "<u8")], count=round_no)
                self.report(check)
                pages = self.bitmap.dirty()
                self.bitmap.clear()   # process-local: the pages are in `pages` now
                seconds = self.send_pages(round_no, pages, cfg.bandwidth)
                check = RoundEnd(
                    **vars(check), sent=len(pages), seconds=seconds,
                    throughput=len(pages) * self.dm.page_size / seconds if seconds else None)
                rounds.append(check)
                self.report(check)

            # Stop-and-copy: the guest is paused from here (the downtime).
            self.check_abort()
            t_stop = time.monotonic()
            self.report(Stopping(self.bitmap.count(), reason, t_stop))
            states = self.control.stop()
            stopped = True
            t_stopped = time.monotonic()
            newly, ram_size = self.sync()
            pages = self.bitmap.dirty()
            self.bitmap.clear()
            self.report(Downtime(len(pages), ram_size))
            if cfg.drop_round == STOP_AND_COPY:
                # testing: the guest is paused, so nothing can dirty these pages again
                pages = pages[:0]
            seconds = self.send_pages(0, pages, 0)
            ch.send(s.VCPUS, [s.pack_vcpus(states)], count=len(states))
            ch.send(s.END_OF_STREAM, [s.END.pack(self.pages_sent, self.records)])
            _, _, payload = ch.recv_expect(s.LOADED)
            t_loaded = time.monotonic()    # the destination holds everything: downtime ends
            self.report(Done(tuple(rounds), reason, check, t_go, t_stop, t_loaded, DowntimeDone(
                pages=len(pages), newly_dirty=newly, ram_size=ram_size,
                seconds=t_loaded - t_stop, stop_wait=t_stopped - t_stop,
                copy_seconds=seconds)))
            self.report(self.verify(json.loads(bytes(payload))))
            ch.send(s.RESUME)      # the source guest stays paused: not committed yet
            resume_sent = True
            ch.recv_expect(s.RUNNING)   # the commit point: the guest runs there
        except PeerSilent as e:
            if resume_sent:        # it may be running there, or not: never run it twice
                self.control.handover()
                self._handover(states, None, "unknown", f"{e}")
                return
            if stopped:
                self.control.cont()
            raise Lost(f"{e}") from None
        except (PeerGone, StreamError, OSError) as e:
            # closed, reset or refused before RUNNING: its guest died with it or never ran
            if stopped:
                self.control.cont()
            raise Lost(f"{e}") from None
        except BaseException:
            if stopped:
                self.control.cont()
            if self.ch is not None:
                try:
                    ch.send(s.ABANDON)
                except (PeerGone, OSError):
                    pass
            raise
        self.control.handover()    # committed: the source guest is discarded
        try:   # the destination's heartbeats bound each wait; --timeout the whole
            _, _, payload = ch.recv_expect(s.RESULT)
            self._handover(states, json.loads(bytes(payload)), "done", None)
        except (PeerGone, StreamError, OSError) as e:
            self._handover(states, None, "lost after commit", f"{e}")

    def _handover(self, states: list[Any], result: dict[str, Any] | None, outcome: str,
                  error: str | None) -> None:
        assert self.ch is not None
        self.report(Handover(self.pages_sent, self.pages_sent * self.dm.page_size,
                             self.send_seconds, self.ch.bytes_sent, result, error,
                             tuple(dict(st.reg_dict(), index=st.index, done=st.done)
                                   for st in states), outcome))

    def verify(self, loaded: dict[str, Any]) -> Switchover:
        """Source RAM (paused) against the destination's, while it waits for RESUME."""
        assert self.ch is not None
        t0 = time.monotonic()
        _, count, payload = self.ch.recv_expect(s.DIGESTS)
        blocks = [tuple(b) for b in loaded["blocks"]]
        if blocks != self.src.blocks:
            return Switchover(False, "layout", 0, (), 0, 0.0,
                              f"destination RAM blocks {blocks} != source {self.src.blocks}")
        if self.cfg.local:
            dst = GuestRam(loaded["map"], self.dm.page_bits, "ram")
            try:
                dst.update(self.src.blocks)
                compared, differ, _ = compare(self.src, dst)
            finally:
                dst.close()
            return Switchover(not differ, "bytes", compared, tuple(differ[:FIRST_DIFFS]),
                              len(differ), time.monotonic() - t0)
        theirs = [bytes(payload[i * 32:(i + 1) * 32]) for i in range(count)]
        ours = s.ram_digests(self.src.views)
        bad = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b]
        if len(ours) != len(theirs):
            bad.append(min(len(ours), len(theirs)))
        return Switchover(not bad, "digests", len(ours), tuple(bad[:FIRST_DIFFS]), len(bad),
                          time.monotonic() - t0, f"SHA-256 per {s.DIGEST_CHUNK >> 20} MiB")

    def close(self) -> None:
        if self.ch is not None:
            self.ch.close()
        self.src.close()


def main(cfg: SenderConfig, map_name: str, owner: Connection, parent: Connection) -> None:
    """Process entry point of the KVM run's migrator: the typed reports go
    to ``parent``; ``DestinationLost`` if the destination went away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sender = None
    dm = None

    def aborted() -> bool:      # the run said Abort, or is gone (EOF)
        return parent.poll()

    try:
        dm = DirtyMemory.attach(map_name)
        sender = Sender(dm, cfg, OwnerControl(owner), parent.send, aborted)
        parent.send(Ready("migrator"))
        if not isinstance(parent.recv(), Go):
            return
        sender.run()
    except (Aborted, EOFError):
        pass
    except Lost as e:
        parent.send(DestinationLost(str(e)))
    except BaseException:
        try:
            parent.send(WorkerFailed("migrator", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        if sender is not None:
            sender.close()
        if dm is not None:
            dm.close()
        owner.close()
