"""``shmdirty receive`` as a service: listen, refuse what must be refused,
keep listening until one migration completes.

One connection at a time.  Each accepted connection goes through the TLS
handshake and the ``--tls-authz`` check (``workers.transport``), then the
stream (``workers.receiver``), each within ``Limits``.  A connection that
is refused, breaks or falls silent (``--peer-timeout``) before the
handover (exit-code-like reasons 5, the stream, and 9, this host) is
logged, the receiver's VM and segments for it are gone, and the service
accepts the next one: a stranger's idle or
garbage connection cannot take the port away from the real migration.
The service ends when one migration completed (the guest resumed and ran
to its end: 0; or failed: 10), or after the first connection whatever
happened to it when ``once`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import receiver, transport
from .lifecycle import EXIT_GUEST, EXIT_HOST, EXIT_STREAM
from .receiver import GuestFailed, HostFailure, Limits
from .reports import DestinationReport
from .stream import SOCKET_BUFFER, PeerGone, StreamError
from .transport import Endpoint, Refused

# The words of each reason a connection ended with (its code in --help).
REASONS = {EXIT_STREAM: "stream refused", EXIT_HOST: "host cannot hold the guest",
           EXIT_GUEST: "resumed guest failed"}


@dataclass(frozen=True)
class ServiceConfig:
    endpoint: Endpoint
    tls_creds: str | None = None     # QEMU's tls-creds-x509 folder (transport module doc)
    authz: tuple[str, ...] = ()      # client subjects allowed; empty: any the CA signed
    limits: Limits = field(default_factory=Limits)
    once: bool = False               # end after the first connection, whatever its fate
    map_name: str | None = None


class ConnectionFailed(Exception):
    """The last connection of a service that ends with it (``once``, or a
    resumed guest that failed): ``code`` is its exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def serve(cfg: ServiceConfig, on_event: Callable[[DestinationReport], None],
          on_listening: Callable[[Endpoint], None],
          on_refused: Callable[[int, str, str], None]) -> dict[str, Any]:
    """Serve until one migration completes; its result.  ``on_refused(code,
    peer, reason)`` for every connection refused on the way.  Raises
    ``ConnectionFailed`` (see its doc), ``transport.TransportError`` (the
    credentials), OSError (cannot listen)."""
    ctx = transport.server_context(cfg.tls_creds) if cfg.tls_creds else None
    with transport.Listener(cfg.endpoint, rcvbuf=SOCKET_BUFFER) as listener:
        on_listening(listener.address)
        while True:
            conn = receiver.accept(listener.sock, peer_timeout=cfg.limits.peer_timeout)
            assert conn is not None       # no should_stop, no timeout: a connection
            peer = _peer(conn)
            try:
                conn, _ = transport.server_handshake(conn, ctx, cfg.authz,
                                                     cfg.limits.handshake_timeout)
                result = receiver.receive(conn, on_event, cfg.map_name, cfg.limits)
            except (Refused, StreamError, PeerGone) as e:
                code, reason = EXIT_STREAM, str(e)
            except HostFailure as e:
                code, reason = EXIT_HOST, str(e)
            except GuestFailed as e:
                raise ConnectionFailed(EXIT_GUEST, str(e)) from None
            else:
                if not result.get("abandoned") or cfg.once:
                    return result
                code, reason = EXIT_STREAM, "the source abandoned the migration (kept its guest)"
            if cfg.once:
                raise ConnectionFailed(code, reason)
            on_refused(code, peer, reason)


def _peer(conn: Any) -> str:
    try:
        name = conn.getpeername()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return "a local process" if not name else str(name)
