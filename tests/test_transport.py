"""Endpoints and TLS (issue 18 item 4): QEMU's tls-creds-x509 with
verify-peer, --tls-authz, unix: sockets created 0600, --insecure for a
plain non-loopback listener.  Certificates are made per test with trustme;
no key is checked in."""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)
trustme = pytest.importorskip("trustme", reason="the [test] extra's trustme makes certificates")

CLI = [sys.executable, "-m", "shmdirty.workers.cli"]


def make_creds(folder: Path, client_cn: str = "source.example", ca: Any = None) -> Path:
    """A QEMU-style credentials folder: one CA, a server certificate for
    127.0.0.1 / localhost, a client certificate named ``client_cn``."""
    ca = ca or trustme.CA()
    folder.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(folder / "ca-cert.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost", common_name="destination.example")
    server.cert_chain_pems[0].write_to_path(str(folder / "server-cert.pem"))
    server.private_key_pem.write_to_path(str(folder / "server-key.pem"))
    client = ca.issue_cert(f"{client_cn}", common_name=client_cn)
    client.cert_chain_pems[0].write_to_path(str(folder / "client-cert.pem"))
    client.private_key_pem.write_to_path(str(folder / "client-key.pem"))
    return folder


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    return make_creds(tmp_path / "pki")


def start_receiver(*args: str) -> tuple[subprocess.Popen[str], str]:
    """``shmdirty receive ARGS``, and the address its first line names."""
    rx = subprocess.Popen([*CLI, "receive", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    line = rx.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if not m:
        rx.kill()
        _, err = rx.communicate(timeout=30)
        pytest.fail(f"no 'listening' line: {line!r} {err!r}")
    return rx, m.group(1)


def finish(rx: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    try:
        out, err = rx.communicate(timeout=timeout)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.communicate()
    return out, err


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


# -- the transport module ------------------------------------------------------------------
def test_endpoints_parse() -> None:
    from shmdirty.workers import transport as t
    assert t.parse_endpoint("unix:/run/m.sock") == t.Endpoint(path="/run/m.sock")
    assert t.parse_endpoint("[::1]:4444") == t.Endpoint("::1", 4444)
    assert str(t.Endpoint.of("unix:/x", 0)) == "unix:/x"
    for bad in ("unix:", "host", "h:99999", ":4"):
        with pytest.raises(t.TransportError):
            t.parse_endpoint(bad)
    assert t.needs_insecure(t.Endpoint("0.0.0.0", 1), tls=False)
    assert not t.needs_insecure(t.Endpoint("0.0.0.0", 1), tls=True)
    assert not t.needs_insecure(t.Endpoint("127.0.0.1", 1), tls=False)
    assert not t.needs_insecure(t.Endpoint(path="/x"), tls=False)


def _handshake(creds: Path, client: Any, authz: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """(the server's outcome, the client's): a TLS server handshake on
    loopback against ``client(sock_address)``; each an exception or a value."""
    from shmdirty.workers import transport as t
    ctx = t.server_context(str(creds))
    out: dict[str, Any] = {}
    with t.Listener(t.Endpoint("127.0.0.1", 0)) as lst:
        def serve() -> None:
            conn, _ = lst.sock.accept()
            try:
                s, who = t.server_handshake(conn, ctx, authz, timeout=5)
                out["server"] = who
                s.sendall(b"ok")
                s.close()
            except Exception as e:  # noqa: BLE001 - the test looks at it
                out["server"] = e
        th = threading.Thread(target=serve)
        th.start()
        try:
            out["client"] = client(("127.0.0.1", lst.port))
        except Exception as e:  # noqa: BLE001
            out["client"] = e
        th.join(30)
        assert not th.is_alive()
    return out["server"], out["client"]


def _tls_client(creds: Path) -> Any:
    from shmdirty.workers import transport as t

    def go(addr: tuple[str, int]) -> bytes:
        s = t.connect(t.Endpoint(*addr), str(creds), timeout=5)
        with s:
            return s.recv(2)
    return go


def test_mutual_tls_names_the_client(creds: Path) -> None:
    server, client = _handshake(creds, _tls_client(creds))
    assert client == b"ok"
    assert server.startswith("O=trustme") and server.endswith(",CN=source.example")


def test_tls_refuses_a_plain_peer(creds: Path) -> None:
    from shmdirty.workers import stream as s
    from shmdirty.workers.transport import Refused

    def plain(addr: tuple[str, int]) -> bytes:
        with socket.create_connection(addr, timeout=5) as c:
            c.sendall(s.PREAMBLE.pack(s.MAGIC, s.VERSION, 0))
            return c.recv(100)
    server, _ = _handshake(creds, plain)
    assert isinstance(server, Refused) and "TLS handshake failed" in str(server)


def test_tls_refuses_a_client_without_a_certificate(creds: Path) -> None:
    from shmdirty.workers.transport import Refused

    def anonymous(addr: tuple[str, int]) -> bytes:
        ctx = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
        with socket.create_connection(addr, timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as c:
            return c.recv(2)   # TLS 1.3: the server's refusal arrives here
    server, client = _handshake(creds, anonymous)
    assert isinstance(server, Refused), server
    assert client != b"ok"


def test_tls_refuses_a_client_of_another_ca(creds: Path, tmp_path: Path) -> None:
    from shmdirty.workers.transport import Refused
    other = make_creds(tmp_path / "other")          # its own CA
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in ("client-cert.pem", "client-key.pem"):
        (mixed / f).write_bytes((other / f).read_bytes())
    (mixed / "ca-cert.pem").write_bytes((creds / "ca-cert.pem").read_bytes())
    server, client = _handshake(creds, _tls_client(mixed))
    assert isinstance(server, Refused), server
    assert client != b"ok"


def test_tls_authz_allow_lists_subjects(creds: Path) -> None:
    from shmdirty.workers.transport import Refused
    server, _ = _handshake(creds, _tls_client(creds), authz=("someone.else",))
    assert isinstance(server, Refused) and "CN=source.example" in str(server)
    server, client = _handshake(creds, _tls_client(creds),
                                authz=("someone.else", "source.example"))
    assert server.endswith("CN=source.example") and client == b"ok"
    dn = server                                 # the whole subject is a subject too
    server, client = _handshake(creds, _tls_client(creds), authz=(dn,))
    assert server == dn and client == b"ok"
    server, _ = _handshake(creds, _tls_client(creds), authz=(dn + "x",))
    assert isinstance(server, Refused)


def test_parse_authz_keeps_a_whole_dn() -> None:
    from shmdirty.workers.transport import parse_authz
    assert parse_authz(["a,b", "CN=x,O=y"]) == ("a", "b", "CN=x,O=y")


def test_tls_1_2_is_refused(creds: Path) -> None:
    def old(addr: tuple[str, int]) -> bytes:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(str(creds / "ca-cert.pem"))
        ctx.load_cert_chain(str(creds / "client-cert.pem"), str(creds / "client-key.pem"))
        with socket.create_connection(addr, timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as c:
            return c.recv(2)
    server, client = _handshake(creds, old)
    assert isinstance(client, ssl.SSLError) and not isinstance(server, str)


def test_a_unix_listener_is_0600_and_removed(tmp_path: Path) -> None:
    from shmdirty.workers import transport as t
    path = tmp_path / "mig.sock"
    with t.Listener(t.Endpoint(path=str(path))):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert not path.exists()
    # a stale socket of a killed receiver is replaced, anything else refused
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with t.Listener(t.Endpoint(path=str(path))):
        pass
    path.write_text("not a socket")
    with pytest.raises(t.TransportError, match="not a socket"):
        t.Listener(t.Endpoint(path=str(path)))


# -- the command line ----------------------------------------------------------------------
def test_receive_with_tls_refuses_a_plain_sender_at_the_handshake(creds: Path) -> None:
    """A plain stream at a TLS receiver is refused before a byte of it is
    read as a stream: exit 5 (--once), one line naming TLS, no traceback."""
    rx, addr = start_receiver("--listen", "127.0.0.1:0", "--tls-creds", str(creds), "--once")
    with socket.create_connection(("127.0.0.1", port_of(addr)), timeout=10) as c:
        c.sendall(b"SHMDMIG\n" + (1).to_bytes(4, "little") + bytes(4))
        try:
            c.recv(100)
        except OSError:
            pass
    out, err = finish(rx)
    assert rx.returncode == 5, (out, err)
    assert "TLS handshake failed" in err and "Traceback" not in err + out


def test_receive_on_a_unix_socket_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "rx.sock"
    rx, addr = start_receiver("--listen", f"unix:{path}", "--once")
    try:
        assert addr == f"unix:{path}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
            c.sendall(b"GARBAGE!" * 2)
        out, err = finish(rx)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    assert rx.returncode == 5 and "not a shmdirty migration stream" in err, (out, err)
    assert not path.exists()


def test_a_plain_non_loopback_listener_needs_insecure() -> None:
    rx = subprocess.run([*CLI, "receive", "--listen", "0.0.0.0:0"], capture_output=True,
                        text=True, timeout=60)
    assert rx.returncode == 2 and "--insecure" in rx.stderr and "Traceback" not in rx.stderr
    rx2 = subprocess.Popen([*CLI, "receive", "--listen", "0.0.0.0:0", "--insecure"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert rx2.stdout is not None
        assert "listening on 0.0.0.0:" in rx2.stdout.readline()
    finally:
        rx2.terminate()
        out, err = rx2.communicate(timeout=30)
    assert err.count("WARNING") == 1 and "without TLS" in err, err


def test_migrate_tls_creds_without_to_is_a_usage_error(creds: Path) -> None:
    r = subprocess.run([*CLI, "migrate", "--guest", "sim", "--tls-creds", str(creds)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--to" in r.stderr


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_a_simulated_migration_over_tls(creds: Path, tmp_path: Path, map_name: str,
                                        where: str) -> None:
    """The whole stream through TLS (and a Unix socket): identical, exit 0
    on both sides; the receiver names the client it let in."""
    listen = "127.0.0.1:0" if where == "tcp" else f"unix:{tmp_path / 'rx.sock'}"
    rx, addr = start_receiver("--listen", listen, "--tls-creds", str(creds),
                              "--tls-authz", "source.example")
    try:
        mig = subprocess.run([*CLI, "migrate", "--guest", "sim", "--ram", "8M", "--hotplug",
                              "none", "--bandwidth", "0", "--name", map_name, "--to",
                              addr, "--tls-creds", str(creds)],
                             capture_output=True, text=True, timeout=150)
        out, err = finish(rx, 60)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    assert mig.returncode == 0, mig.stdout + mig.stderr
    assert rx.returncode == 0, (out, err)
