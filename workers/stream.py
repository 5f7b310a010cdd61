"""The migration stream: framing, records, and both ends' reads and writes.

The format is documented in docs/STREAM.md (version 2).  In short: a
16-byte preamble (magic, version), then records, each a 16-byte header
(type u16, flags u16, count u32, payload length u64, little-endian) and its
payload.  Page records carry a CRC-32 of their payload (the per-chunk
digest), so a corrupted chunk is caught where it lands.

``Channel`` wraps one connected socket (TCP, TLS or Unix:
``workers.transport``).  A peer that goes away shows up as ``PeerGone``
(EOF, reset, broken pipe), one that says nothing for the socket's timeout
(hung, or unreachable: ``workers.peer``) as ``PeerSilent``; a stream that
breaks its own rules (other version, bad record, truncated, a TLS record
that does not decrypt) as ``StreamError``.  HEARTBEAT records (either
direction) are skipped by ``recv``: they only prove the peer alive.
Records are sent whole under a lock, so a heartbeat thread may send
between two records of the main thread.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from shmdirty.errors import ShmDirtyError

MAGIC = b"SHMDMIG\n"
VERSION = 2
PREAMBLE = struct.Struct("<8sII")     # magic, version, reserved (0)
RECORD = struct.Struct("<HHIQ")       # type, flags, count, payload length
CRC = struct.Struct("<I")
BLOCK = struct.Struct("<QQ")          # RAM block: offset, size
VCPU = struct.Struct("<II144s312s")   # index, done, kvm_regs, kvm_sregs
END = struct.Struct("<QQ")            # pages sent, page records sent
DIGEST_CHUNK = 1 << 20                # bytes of RAM per switchover digest
MAX_PAYLOAD = 1 << 30
MAX_RAM_BLOCKS = 1024                 # RAM blocks a receiver accepts (QEMU has far fewer)
MAX_CHUNK_PAGES = 1024                # pages per PAGES record a receiver accepts
MIN_PAGE_BITS, MAX_PAGE_BITS = 12, 16  # 4 KiB to 64 KiB pages
MAX_VCPUS = 256
MAX_JSON = 1 << 20                    # HELLO, LOADED, RESULT, ERROR
# Socket buffers of each end.  Small on purpose: what sits in buffers has
# not arrived, so big buffers would hide a slow destination from the
# throughput the source measures and add their backlog to the downtime.
SOCKET_BUFFER = 1 << 20

# source -> destination
HELLO, BLOCKS, PAGES, ROUND, VCPUS, END_OF_STREAM, RESUME, ABANDON = 1, 2, 3, 4, 5, 6, 7, 8
# destination -> source
LOADED, DIGESTS, RESULT, ERROR, READY, RUNNING = 16, 17, 18, 19, 20, 21
# either direction
HEARTBEAT = 32
NAMES = {HELLO: "HELLO", BLOCKS: "BLOCKS", PAGES: "PAGES", ROUND: "ROUND", VCPUS: "VCPUS",
         END_OF_STREAM: "END", RESUME: "RESUME", ABANDON: "ABANDON", LOADED: "LOADED",
         DIGESTS: "DIGESTS", RESULT: "RESULT", ERROR: "ERROR", READY: "READY",
         RUNNING: "RUNNING", HEARTBEAT: "HEARTBEAT"}


# The largest payload of each record type, checked against the header before
# a byte of the payload is read or a buffer allocated for it (a header that
# claims 1 GiB costs nothing).  A receiver narrows PAGES once HELLO gave the
# page size (``Channel.limits``).
MAX_LENGTH = {HELLO: MAX_JSON, BLOCKS: MAX_RAM_BLOCKS * 16, ROUND: 8,
              PAGES: MAX_CHUNK_PAGES * (8 + (1 << MAX_PAGE_BITS)) + 4, VCPUS: MAX_VCPUS * 464,
              END_OF_STREAM: 16,
              RESUME: 0, ABANDON: 0, LOADED: MAX_JSON, DIGESTS: MAX_PAYLOAD, RESULT: MAX_JSON,
              ERROR: MAX_JSON, READY: 0, RUNNING: 0, HEARTBEAT: 0}


# Records whose payload has one size only: anything else is refused from the header.
EXACT_LENGTH = {ROUND: 8, END_OF_STREAM: END.size, RESUME: 0, ABANDON: 0, READY: 0,
                RUNNING: 0, HEARTBEAT: 0}


class StreamError(ShmDirtyError, ValueError):
    """The stream is not one this version reads: wrong magic or version,
    an unknown or malformed record, a bad digest, or it ended early."""


class PeerGone(ShmDirtyError, ConnectionError):
    """The other end closed or reset the connection."""


class PeerSilent(PeerGone):
    """Nothing from the other end, or nothing it took, for the socket's
    timeout (``--peer-timeout``): hung or unreachable, its state unknown."""


class Channel:
    """One end of a migration connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self._buf = bytearray(1 << 20)
        self._send_lock = threading.Lock()   # one record at a time (module doc)
        self.last_sent = time.monotonic()    # when a record last went out
        self.limits = dict(MAX_LENGTH)       # per record type; see MAX_LENGTH
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- writing ---------------------------------------------------------------
    def _sendall(self, bufs: Sequence[Any]) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        views = [v for v in views if len(v)]
        try:
            if isinstance(self.sock, ssl.SSLSocket):   # TLS has no sendmsg: one write each
                for v in views:
                    self.sock.sendall(v)
                    self.bytes_sent += len(v)
                views = []
            while views:
                n = self.sock.sendmsg(views)
                self.bytes_sent += n
                while n:
                    if n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
        except TimeoutError:
            raise PeerSilent(f"the other end took nothing for {self.sock.gettimeout()} s "
                             "(--peer-timeout): hung or unreachable") from None
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
            raise PeerGone(f"the other end went away while sending: {e.strerror}") from None
        except ssl.SSLError as e:
            raise PeerGone(f"the TLS session broke while sending: {e.reason or e}") from None

    def preamble(self) -> None:
        self._sendall([PREAMBLE.pack(MAGIC, VERSION, 0)])

    def send(self, rtype: int, payload: Sequence[Any] = (), count: int = 0) -> None:
        """One record: header, then the payload buffers in order."""
        length = sum(memoryview(b).nbytes for b in payload)
        with self._send_lock:
            self._sendall([RECORD.pack(rtype, 0, count, length), *payload])
            self.last_sent = time.monotonic()

    def heartbeat(self) -> bool:
        """Send a HEARTBEAT unless a record is being sent (then that one
        proves us alive); False if the lock was busy."""
        if not self._send_lock.acquire(blocking=False):
            return False
        try:
            self._sendall([RECORD.pack(HEARTBEAT, 0, 0, 0)])
            self.last_sent = time.monotonic()
        finally:
            self._send_lock.release()
        return True

    def send_json(self, rtype: int, obj: Any) -> None:
        self.send(rtype, [json.dumps(obj).encode()])

    def send_pages(self, numbers: np.ndarray[Any, Any], data: np.ndarray[Any, Any]) -> None:
        """A PAGES record: ``numbers`` (global page numbers) and ``data``
        (their contents, C-contiguous, one row per page), then CRC-32."""
        idx = np.ascontiguousarray(numbers, dtype="<u8")
        crc = zlib.crc32(data.data, zlib.crc32(idx.data))
        self.send(PAGES, [idx, data, CRC.pack(crc)], count=len(idx))

    # -- reading ---------------------------------------------------------------
    def _recv_into(self, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except (ConnectionResetError, ConnectionAbortedError) as e:
                raise PeerGone(f"the other end reset the connection during {what}: "
                               f"{e.strerror}") from None
            except TimeoutError:
                raise PeerSilent(f"nothing from the other end for {self.sock.gettimeout()} s "
                                 f"(--peer-timeout) during {what}: hung or unreachable"
                                 ) from None
            except ssl.SSLError as e:     # a TLS record that does not decrypt: broken
                raise StreamError(f"TLS error during {what}: {e.reason or e}") from None
            if n == 0:
                if got == 0 and what == "a record header":
                    raise PeerGone("the other end closed the connection")
                raise StreamError(f"stream truncated: {what} ended after {got} of "
                                  f"{len(view)} bytes")
            got += n
        self.bytes_received += got

    def expect_preamble(self) -> None:
        """Read the preamble; ``StreamError`` unless it is this format and version."""
        raw = bytearray(PREAMBLE.size)
        try:
            self._recv_into(memoryview(raw), "the preamble")
        except PeerGone:
            raise StreamError("stream truncated: no preamble") from None
        magic, version, _ = PREAMBLE.unpack(raw)
        if magic != MAGIC:
            raise StreamError(f"not a shmdirty migration stream (magic {bytes(magic)!r})")
        if version != VERSION:
            raise StreamError(f"stream version {version}, this receiver reads version "
                              f"{VERSION} only")

    def recv(self, types: tuple[int, ...] = ()) -> tuple[int, int, memoryview]:
        """The next record but heartbeats: (type, count, payload).  The
        payload view is only valid until the next ``recv``.  With ``types``,
        a record of another type (ERROR aside) is refused from its header,
        before its payload is read or a buffer allocated for it."""
        head = bytearray(RECORD.size)
        while True:
            self._recv_into(memoryview(head), "a record header")
            rtype, _, count, length = RECORD.unpack(head)
            if rtype != HEARTBEAT or length:
                break
        if rtype not in NAMES:
            raise StreamError(f"unknown record type {rtype}")
        if types and rtype not in types and rtype != ERROR:
            raise StreamError(f"expected {'/'.join(NAMES[t] for t in types)}, got "
                              f"{NAMES[rtype]}")
        if rtype == BLOCKS and count > MAX_RAM_BLOCKS:
            raise StreamError(f"BLOCKS record: {count} RAM blocks, more than the "
                              f"{MAX_RAM_BLOCKS} a receiver accepts")
        if EXACT_LENGTH.get(rtype, length) != length:
            raise StreamError(f"{NAMES[rtype]} record of {length} bytes, it has "
                              f"{EXACT_LENGTH[rtype]}")
        if length > self.limits.get(rtype, MAX_PAYLOAD):
            raise StreamError(f"{NAMES[rtype]} record of {length} bytes, more than the "
                              f"{self.limits.get(rtype, MAX_PAYLOAD)} it may have")
        if length > len(self._buf):
            self._buf = bytearray(length)
        view = memoryview(self._buf)[:length]
        self._recv_into(view, f"a {NAMES[rtype]} record")
        return rtype, count, view

    def recv_expect(self, *types: int) -> tuple[int, int, memoryview]:
        rtype, count, payload = self.recv(types)
        if rtype == ERROR and ERROR not in types:
            raise StreamError(f"the other end failed: {error_message(payload)}")
        if rtype not in types:
            raise StreamError(f"expected {'/'.join(NAMES[t] for t in types)}, got "
                              f"{NAMES[rtype]}")
        return rtype, count, payload

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- payloads ------------------------------------------------------------------

def error_message(payload: memoryview) -> str:
    """The ``message`` of an ERROR record, whatever the peer put there."""
    try:
        obj = json.loads(bytes(payload))
        return str(obj["message"]) if isinstance(obj, dict) and "message" in obj else repr(obj)
    except (ValueError, UnicodeDecodeError):
        return repr(bytes(payload[:200]))


def pack_blocks(blocks: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(BLOCK.pack(o, s) for o, s in blocks)


def unpack_blocks(count: int, payload: memoryview) -> list[tuple[int, int]]:
    if len(payload) != count * BLOCK.size:
        raise StreamError(f"BLOCKS record: {len(payload)} bytes for {count} blocks")
    return [BLOCK.unpack_from(payload, i * BLOCK.size) for i in range(count)]


def check_ram_layout(blocks: Sequence[tuple[int, int]], available: int | None = None) -> None:
    """StreamError, before anything is allocated, if a peer's RAM layout
    (offset, size in bytes) has more than MAX_RAM_BLOCKS blocks or needs more
    bytes than ``available`` (default: the machine's available memory,
    psutil.virtual_memory().available): a crafted BLOCKS record must not make
    the receiver allocate what it cannot hold."""
    if len(blocks) > MAX_RAM_BLOCKS:
        raise StreamError(f"BLOCKS record: {len(blocks)} RAM blocks, more than the "
                          f"{MAX_RAM_BLOCKS} a receiver accepts")
    total = sum(size for _, size in blocks)
    if available is None:
        import psutil
        available = int(psutil.virtual_memory().available)
    if total > available:
        raise StreamError(f"BLOCKS record: {total / 2**20:.0f} MiB of guest RAM in "
                          f"{len(blocks)} blocks, more than the {available / 2**20:.0f} MiB "
                          "of memory available here")


def unpack_pages(count: int, payload: memoryview, page_size: int
                 ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(page numbers, rows of page data) of a PAGES record, its CRC checked."""
    want = count * (8 + page_size) + CRC.size
    if len(payload) != want:
        raise StreamError(f"PAGES record: {len(payload)} bytes, expected {want} for "
                          f"{count} pages")
    body = payload[:-CRC.size]
    (crc,) = CRC.unpack(payload[-CRC.size:])
    if zlib.crc32(body) != crc:
        raise StreamError(f"PAGES record of {count} pages: digest mismatch (corrupted)")
    numbers = np.frombuffer(body, "<u8", count).astype(np.int64)
    data = np.frombuffer(body, np.uint64, count * page_size // 8, count * 8)
    return numbers, data.reshape(count, page_size // 8)


def pack_vcpus(states: Iterable[Any]) -> bytes:
    return b"".join(VCPU.pack(s.index, int(s.done), s.regs, s.sregs) for s in states)


def unpack_vcpus(count: int, payload: memoryview) -> list[tuple[int, bool, bytes, bytes]]:
    if len(payload) != count * VCPU.size:
        raise StreamError(f"VCPUS record: {len(payload)} bytes for {count} vCPUs")
    out = []
    for i in range(count):
        index, done, regs, sregs = VCPU.unpack_from(payload, i * VCPU.size)
        out.append((index, bool(done), regs, sregs))
    return out


def ram_digests(views: Sequence[np.ndarray[Any, Any]]) -> list[bytes]:
    """SHA-256 of every ``DIGEST_CHUNK`` bytes of each RAM block, in order."""
    out = []
    for v in views:
        raw = v.reshape(-1).view(np.uint8)
        for i in range(0, len(raw), DIGEST_CHUNK):
            out.append(hashlib.sha256(raw[i:i + DIGEST_CHUNK].data).digest())
    return out
