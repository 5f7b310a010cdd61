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
source hands over and the destination resumes the guest (RESUME) and
reports how it ended (RESULT).

A destination that goes away before the handover fails the migration:
the owner lets the source guest run on (``cont``), as QEMU does.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from shmdirty import DirtyMemory

from . import stream as s
from .guest import GuestRam, compare
from .migrator import MigrationBitmap
from .stream import Channel, PeerGone, StreamError

CONNECT_TIMEOUT = 10.0
RESULT_TIMEOUT = 600.0     # seconds the destination may take to run the guest to its end
REPORT_EVERY = 0.05


class Aborted(Exception):
    """The run gave up (Ctrl-C, SIGTERM, or it died)."""


class DestinationLost(Exception):
    """The destination went away or refused the stream before the handover."""


class GuestControl(Protocol):
    """What the migrator asks of the guest's owner."""

    def log_sync(self) -> tuple[int, list[int]]: ...
    def stop(self) -> tuple[list[Any], int]: ...
    def cont(self) -> None: ...
    def handover(self) -> None: ...


class OwnerControl:
    """A KVM VM owner (``workers.vm_owner``) at the other end of a pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _ask(self, msg: str, answer: str) -> tuple[Any, ...]:
        self.conn.send(msg)
        try:
            reply = self.conn.recv()
        except EOFError:
            raise RuntimeError("the VM owner process is gone") from None
        if reply[0] != answer:
            raise RuntimeError(f"the VM owner answered {reply[0]!r} to {msg!r}")
        return tuple(reply[1:])

    def log_sync(self) -> tuple[int, list[int]]:
        n, progress = self._ask("sync", "synced")
        return int(n), list(progress)

    def stop(self) -> tuple[list[Any], int]:
        states, n = self._ask("stop", "stopped")
        return list(states), int(n)

    def cont(self) -> None:
        self.conn.send("cont")

    def handover(self) -> None:
        self.conn.send("handover")


@dataclass(frozen=True)
class SenderConfig:
    host: str
    port: int
    map_name: str
    guest: str | None = None        # GuestConfig JSON (KVM); None: the simulated guest
    bandwidth: float = 0.0          # bytes per second during pre-copy; 0: no limit
    threshold: int = 1024           # dirty pages at which pre-copy has converged
    max_rounds: int = 30
    chunk_pages: int = 256          # pages per PAGES record
    local: bool = True              # the destination's segments are on this machine
    drop_round: int = 0             # testing: forget this round's dirty pages


class Sender:
    def __init__(self, cfg: SenderConfig, control: GuestControl, parent: Connection) -> None:
        self.cfg, self.control, self.parent = cfg, control, parent
        self.dm = DirtyMemory.attach(cfg.map_name)
        self.src = GuestRam(cfg.map_name, self.dm.page_bits, "ram")
        self.bitmap = MigrationBitmap()
        self.ch: Channel | None = None
        self.pages_sent = 0
        self.records = 0
        self.send_seconds = 0.0
        self._buf = np.empty((0, self.dm.page_size // 8), np.uint64)

    def report(self, kind: str, **data: Any) -> None:
        self.parent.send((kind, data))

    def check_abort(self) -> None:
        if self.parent.poll():
            try:
                msg = self.parent.recv()
            except EOFError:
                raise Aborted from None
            if msg == "abort":
                raise Aborted

    def connect(self) -> Channel:
        cfg = self.cfg
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise DestinationLost(f"cannot connect to {cfg.host}:{cfg.port}: "
                                  f"{e.strerror or e}") from None
        sock.settimeout(None)
        ch = Channel(sock)
        ch.preamble()
        ch.send_json(s.HELLO, {"page_bits": self.dm.page_bits, "guest": cfg.guest,
                               "digests": not cfg.local, "source_map": self.dm.name})
        return ch

    def sync(self) -> tuple[int, int, int]:
        """Steps 1-2: (pages newly dirty, RAM size, pages KVM logged)."""
        assert self.ch is not None
        logged, _ = self.control.log_sync()
        blocks = self.dm.ram_blocks()
        if self.src.update(blocks):
            self.ch.send(s.BLOCKS, [s.pack_blocks(self.src.blocks)], count=len(self.src.blocks))
        self.bitmap.extend(self.src.npages)
        ram_size = self.src.npages << self.dm.page_bits
        return self.dm.sync_dirty_bitmap(self.bitmap.words, 0, ram_size), ram_size, logged

    def send_pages(self, round_no: int, pages: np.ndarray[Any, Any], bandwidth: float) -> float:
        """Send ``pages`` (ascending); returns the seconds it took."""
        assert self.ch is not None
        t0 = last = time.monotonic()
        page_size = self.dm.page_size
        words = page_size // 8
        chunk = self.cfg.chunk_pages
        buf = self._buf if len(self._buf) >= chunk else np.empty((chunk, words), np.uint64)
        self._buf = buf     # reused: fresh memory costs a page fault per 4 KiB here
        for i in range(0, len(pages), chunk):
            self.check_abort()
            part = pages[i:i + chunk]
            data = buf[:len(part)]
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
                self.report("sent", round=round_no, sent=sent)
                last = now
        seconds = time.monotonic() - t0
        self.pages_sent += len(pages)
        self.send_seconds += seconds
        return seconds

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.ch = ch = self.connect()
        self.report("connected", host=cfg.host, port=cfg.port)
        t_go = last_sync = time.monotonic()
        rounds: list[dict[str, Any]] = []
        reason = "max rounds"
        round_no = 0
        stopped = False
        try:
            while round_no < cfg.max_rounds:
                round_no += 1
                t_sync = time.monotonic()
                newly, ram_size, logged = self.sync()
                elapsed, last_sync = t_sync - last_sync, t_sync
                dropped = 0
                if round_no == cfg.drop_round:
                    dropped = self.bitmap.count()
                    self.bitmap.clear()
                dirty = self.bitmap.count()
                info: dict[str, Any] = dict(
                    round=round_no, ram_size=ram_size, dirty=dirty, newly_dirty=newly,
                    logged=logged, dropped=dropped, t_start=t_sync,
                    dirty_rate=newly / elapsed if round_no > 1 and elapsed > 0 else None)
                if round_no > 1 and dirty <= cfg.threshold:
                    reason = "converged"
                    break
                ch.send(s.ROUND, [np.array([dirty], "<u8")], count=round_no)
                self.report("round", **info)
                pages = self.bitmap.dirty()
                self.bitmap.clear()
                seconds = self.send_pages(round_no, pages, cfg.bandwidth)
                info.update(sent=len(pages), seconds=seconds,
                            throughput=len(pages) * self.dm.page_size / seconds
                            if seconds else None)
                rounds.append(info)
                self.report("round_end", **info)

            # Stop-and-copy: the guest is paused from here (the downtime).
            self.check_abort()
            t_stop = time.monotonic()
            self.report("stopping", pending=self.bitmap.count(), reason=reason)
            states, logged = self.control.stop()
            stopped = True
            t_stopped = time.monotonic()
            newly, ram_size, _ = self.sync()
            pages = self.bitmap.dirty()
            self.bitmap.clear()
            seconds = self.send_pages(0, pages, 0)
            ch.send(s.VCPUS, [s.pack_vcpus(states)], count=len(states))
            ch.send(s.END_OF_STREAM, [s.END.pack(self.pages_sent, self.records)])
            _, _, payload = ch.recv_expect(s.LOADED)
            t_loaded = time.monotonic()
            loaded = json.loads(bytes(payload))
            downtime = dict(pages=len(pages), newly_dirty=newly, ram_size=ram_size,
                            seconds=t_loaded - t_stop, stop_wait=t_stopped - t_stop,
                            copy_seconds=seconds, logged=logged)
            self.report("downtime", **downtime)
            check = self.verify(loaded)
            self.control.handover()
            ch.send(s.RESUME)
        except (PeerGone, StreamError, OSError) as e:
            if stopped:
                self.control.cont()
            raise DestinationLost(f"{type(e).__name__}: {e}") from None
        except BaseException:
            if stopped:
                self.control.cont()
            raise
        self.report("handed_over", **check)
        ch.sock.settimeout(RESULT_TIMEOUT)
        try:
            _, _, payload = ch.recv_expect(s.RESULT)
            result: dict[str, Any] | None = json.loads(bytes(payload))
            error = None
        except (PeerGone, StreamError) as e:
            result, error = None, f"{type(e).__name__}: {e}"
        t_end = time.monotonic()
        return dict(rounds=rounds, reason=reason, t_go=t_go, t_stop=t_stop, t_end=t_end,
                    downtime=downtime, check=check, result=result, result_error=error,
                    pages_sent=self.pages_sent, bytes_sent=self.pages_sent * self.dm.page_size,
                    send_seconds=self.send_seconds, stream_bytes=ch.bytes_sent,
                    states=[st.reg_dict() | {"index": st.index, "done": st.done}
                            for st in states])

    def verify(self, loaded: dict[str, Any]) -> dict[str, Any]:
        """Source RAM (paused) against the destination's, while it waits for RESUME."""
        assert self.ch is not None
        t0 = time.monotonic()
        _, count, payload = self.ch.recv_expect(s.DIGESTS)
        blocks = [tuple(b) for b in loaded["blocks"]]
        if blocks != self.src.blocks:
            return dict(identical=False, method="layout", differ=[], seconds=0.0,
                        detail=f"destination RAM blocks {blocks} != source {self.src.blocks}")
        if self.cfg.local:
            dst = GuestRam(loaded["map"], self.dm.page_bits, "ram")
            try:
                dst.update(self.src.blocks)
                compared, differ, _ = compare(self.src, dst)
            finally:
                dst.close()
            return dict(identical=not differ, method="bytes", compared_pages=compared,
                        differ=differ[:20], n_differ=len(differ),
                        seconds=time.monotonic() - t0)
        theirs = [bytes(payload[i * 32:(i + 1) * 32]) for i in range(count)]
        ours = s.ram_digests(self.src.views)
        bad = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b]
        if len(ours) != len(theirs):
            bad.append(min(len(ours), len(theirs)))
        return dict(identical=not bad, method="digests", compared_chunks=len(ours),
                    chunk_bytes=s.DIGEST_CHUNK, differ=bad[:20], n_differ=len(bad),
                    seconds=time.monotonic() - t0)

    def close(self) -> None:
        if self.ch is not None:
            self.ch.close()
        self.src.close()
        self.dm.close()


def main(cfg: SenderConfig, owner: Connection, parent: Connection) -> None:
    """Process entry point: report ``done``, ``failed`` (destination lost) or ``error``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sender = None
    try:
        sender = Sender(cfg, OwnerControl(owner), parent)
        parent.send(("ready", {}))
        if parent.recv() != "go":
            return
        parent.send(("done", sender.run()))
    except Aborted:
        pass
    except DestinationLost as e:
        parent.send(("failed", {"reason": "destination lost", "message": str(e)}))
    except BaseException:
        try:
            parent.send(("error", {"role": "migrator", "traceback": traceback.format_exc()}))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        if sender is not None:
            sender.close()
        owner.close()
