"""Bounded waits on a migration connection: every wait for the peer ends
within ``--peer-timeout`` seconds (docs/STREAM.md, "Bounded waits").

Three layers, each for a failure the others miss:

- the socket's timeout (``settimeout``): a ``recv`` that gets nothing, or a
  ``send`` the peer does not take (its buffers full: it stopped reading),
  for ``peer_timeout`` seconds raises ``stream.PeerSilent``;
- an application heartbeat (``Heartbeat``): a thread sends a HEARTBEAT
  record whenever this side has sent nothing for a third of the timeout,
  so a peer that is busy (computing digests, running the guest, syncing a
  large log) is never taken for a hung one, while a stopped (SIGSTOP) or
  dead process, whose threads stop with it, falls silent;
- TCP keepalive and ``TCP_USER_TIMEOUT``: the kernel gives up on a peer
  whose host no longer answers (a partition) even while unsent data waits,
  and reports ETIMEDOUT (a ``PeerSilent`` as well).
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

from .stream import Channel, PeerGone

DEFAULT_PEER_TIMEOUT = 5.0    # seconds (``--peer-timeout``)
HEARTBEATS_PER_TIMEOUT = 3    # a heartbeat when idle for a third of the timeout


def tune(sock: socket.socket, peer_timeout: float) -> None:
    """The socket's timeout, keepalive and user timeout for ``peer_timeout``."""
    sock.settimeout(peer_timeout)
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(peer_timeout / HEARTBEATS_PER_TIMEOUT))
    for opt, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", idle), ("TCP_KEEPCNT", 3),
                       ("TCP_USER_TIMEOUT", int(peer_timeout * 1000))):
        if hasattr(socket, opt):      # Linux has them all
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


class Heartbeat:
    """``with Heartbeat(ch, peer_timeout):`` a thread keeps ``ch`` from
    being silent for longer than a third of ``peer_timeout`` (module doc).
    A failed send ends the thread quietly: the main thread meets the same
    failure on its next send or receive."""

    def __init__(self, ch: Channel, peer_timeout: float) -> None:
        self.ch = ch
        self.every = peer_timeout / HEARTBEATS_PER_TIMEOUT
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every / 2):
            if time.monotonic() - self.ch.last_sent < self.every:
                continue
            try:
                self.ch.heartbeat()
            except (PeerGone, OSError):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
