"""Where a migration stream goes, and how it is protected: endpoints and TLS.

An endpoint is ``HOST:PORT`` (TCP) or ``unix:PATH`` (a Unix socket, as
QEMU's ``unix:`` URIs): ``parse_endpoint`` reads both, ``listen`` and
``connect`` open them.  A Unix socket is created mode 0600 (the umask is
narrowed around ``bind``, so no other user can connect even for an
instant) and unlinked when its listener closes.

TLS follows QEMU's ``tls-creds-x509`` with ``verify-peer=on``: one folder
holds ``ca-cert.pem`` (the authority both sides trust),
``server-cert.pem`` / ``server-key.pem`` (the receiver) and
``client-cert.pem`` / ``client-key.pem`` (the sender).  Both contexts
require TLS 1.3 and a certificate from the other end signed by the CA; a
TCP client also checks that the server's certificate names the host it
dialled.  ``authorize`` is QEMU's ``tls-authz``: the client certificate's
subject (its common name, or its whole distinguished name ``CN=..,O=..``)
must be on the receiver's list.

Without TLS, a TCP listener on an address other than loopback must be
asked for explicitly (``--insecure``): ``needs_insecure`` says when.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from shmdirty.errors import ShmDirtyError

UNIX = "unix:"
CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
SOCKET_MODE = 0o600
# Short names OpenSSL gives the attributes of a subject (RFC 4514 order).
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "localityName": "L", "stateOrProvinceName": "ST", "countryName": "C",
          "emailAddress": "emailAddress", "domainComponent": "DC"}


class TransportError(ShmDirtyError, ValueError):
    """An endpoint or a credentials folder that cannot be used (a usage error)."""


class Refused(ShmDirtyError, ConnectionError):
    """A peer refused at the handshake: not TLS, no or an untrusted
    certificate, a subject not on the ``--tls-authz`` list."""


@dataclass(frozen=True)
class Endpoint:
    host: str = ""           # TCP: host name or address
    port: int = 0
    path: str | None = None  # unix: the socket's path

    def __str__(self) -> str:
        if self.path is not None:
            return f"{UNIX}{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def of(cls, host: str, port: int) -> Endpoint:
        """The endpoint a (host, port) pair stands for: host ``unix:PATH`` is a Unix socket."""
        return cls(path=host[len(UNIX):]) if host.startswith(UNIX) else cls(host, port)


def parse_endpoint(text: str) -> Endpoint:
    """``HOST:PORT``, ``[V6ADDR]:PORT`` or ``unix:PATH``; TransportError otherwise."""
    if text.startswith(UNIX):
        path = text[len(UNIX):]
        if not path or "\0" in path:
            raise TransportError(f"{text!r}: unix: needs a socket path (unix:/run/mig.sock)")
        if len(os.fsencode(path)) > 107:
            raise TransportError(f"{text!r}: a Unix socket path has at most 107 bytes")
        return Endpoint(path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise TransportError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:4444) or unix:PATH")
    return Endpoint(host.strip("[]"), int(port))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def needs_insecure(ep: Endpoint, tls: bool) -> bool:
    """A plain TCP listener others can reach: only with ``--insecure``."""
    return not tls and ep.path is None and not is_loopback(ep.host)


# -- TLS -----------------------------------------------------------------------------------
def _files(creds: str, *names: str) -> list[str]:
    paths = [os.path.join(creds, n) for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if not os.path.isfile(p)]
    if missing:
        raise TransportError(f"--tls-creds {creds}: missing {', '.join(missing)}")
    return paths


def _context(purpose: ssl.Purpose, creds: str, cert: str, key: str) -> ssl.SSLContext:
    ca, cert_path, key_path = _files(creds, CA_CERT, cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED        # verify-peer=on, both ways
    try:
        ctx.load_verify_locations(cafile=ca)
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as e:
        raise TransportError(f"--tls-creds {creds}: {e}") from None
    return ctx


def server_context(creds: str) -> ssl.SSLContext:
    """The receiver's context: its certificate, and a client certificate required."""
    return _context(ssl.Purpose.CLIENT_AUTH, creds, SERVER_CERT, SERVER_KEY)


def client_context(creds: str, check_hostname: bool = True) -> ssl.SSLContext:
    """The sender's context: its certificate, and the server's checked
    against the CA (and, over TCP, against the host name it dialled)."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, creds, CLIENT_CERT, CLIENT_KEY)
    ctx.check_hostname = check_hostname
    return ctx


def subject(cert: dict[str, Any]) -> str:
    """A peer certificate's subject as ``CN=..,O=..`` (as ``getpeercert()`` lists it)."""
    parts = [f"{_SHORT.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts)


def common_name(cert: dict[str, Any]) -> str | None:
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v)
    return None


def parse_authz(values: Sequence[str]) -> tuple[str, ...]:
    """``--tls-authz`` values: each a whole DN (it has ``=``) or a comma list of CNs."""
    out: list[str] = []
    for v in values:
        out.extend([v] if "=" in v else [x.strip() for x in v.split(",") if x.strip()])
    return tuple(out)


def authorize(sock: ssl.SSLSocket, allowed: Sequence[str]) -> str:
    """The client's subject; Refused unless it (or its CN) is in ``allowed``
    (an empty list allows every certificate the CA signed)."""
    cert = sock.getpeercert() or {}
    dn = subject(cert)
    if allowed and dn not in allowed and common_name(cert) not in allowed:
        raise Refused(f"client certificate {dn!r} is not in --tls-authz")
    return dn


# -- sockets -------------------------------------------------------------------------------
@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _unlink_stale(path: str) -> None:
    """Remove a Unix socket nobody listens on (left by a killed receiver);
    TransportError for anything else at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"unix:{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as e:
        raise TransportError(f"unix:{path}: {e.strerror}") from None
    finally:
        probe.close()
    raise TransportError(f"unix:{path}: another process listens there")


class Listener:
    """A listening socket of an endpoint; closing it unlinks a Unix socket."""

    def __init__(self, ep: Endpoint, backlog: int = 4, rcvbuf: int = 0) -> None:
        self.ep = ep
        if ep.path is not None:
            _unlink_stale(ep.path)
            sock = socket.socket(socket.AF_UNIX)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in ep.host else socket.AF_INET)
        try:
            if ep.path is None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if rcvbuf:   # before listen(): accepted sockets inherit it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if ep.path is not None:
                with _umask(0o177):     # born 0600: no instant where others may connect
                    sock.bind(ep.path)
                os.chmod(ep.path, SOCKET_MODE)
            else:
                sock.bind((ep.host, ep.port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    @property
    def port(self) -> int:
        return 0 if self.ep.path is not None else int(self.sock.getsockname()[1])

    @property
    def address(self) -> Endpoint:
        """The endpoint as bound (port 0 replaced by the port the system chose)."""
        return self.ep if self.ep.path is not None else Endpoint(self.ep.host, self.port)

    def close(self) -> None:
        self.sock.close()
        if self.ep.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ep.path)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_handshake(conn: socket.socket, ctx: ssl.SSLContext | None,
                     allowed: Sequence[str], timeout: float) -> tuple[socket.socket, str]:
    """(the connection to use, the peer's subject or '') after the TLS
    handshake and the authz check, within ``timeout`` seconds; Refused (the
    connection closed) if the peer fails either."""
    if ctx is None:
        return conn, ""
    conn.settimeout(timeout)
    try:
        tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    except (ssl.SSLError, OSError) as e:
        conn.close()
        raise Refused(f"TLS handshake failed: {e}") from None
    try:
        tls.do_handshake()
        return tls, authorize(tls, allowed)
    except TimeoutError:
        tls.close()
        raise Refused(f"no TLS handshake within {timeout:g} s") from None
    except (ssl.SSLError, OSError) as e:
        tls.close()
        raise Refused(f"TLS handshake failed: {getattr(e, 'reason', None) or e}") from None
    except Refused:
        tls.close()
        raise


def connect(ep: Endpoint, creds: str | None, timeout: float) -> socket.socket:
    """A connected (and, with ``creds``, TLS-protected) socket to ``ep``.
    OSError if it cannot be reached, Refused if the handshake fails,
    TransportError if the credentials cannot be read."""
    ctx = None if creds is None else client_context(creds, check_hostname=ep.path is None)
    if ep.path is not None:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        try:
            sock.connect(ep.path)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
    if ctx is None:
        return sock
    try:
        tls = ctx.wrap_socket(sock, server_hostname=ep.host if ep.path is None else None)
    except ssl.SSLError as e:
        sock.close()
        raise Refused(f"TLS handshake with {ep} failed: {e.reason or e}") from None
    except BaseException:
        sock.close()
        raise
    return tls
