"""The migration stream and the receiver: records round-trip; another
version, a truncated stream, a corrupted chunk or pages outside RAM are
refused with a clear error, and the receiver leaves no segment behind."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from shmdirty import segment
from shmdirty.workers import receiver
from shmdirty.workers import stream as s
from shmdirty.workers.stream import Channel, StreamError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair() -> Iterator[tuple[Channel, socket.socket]]:
    """(source channel, the receiver's accepted socket) over loopback TCP."""
    with receiver.listen("127.0.0.1", 0) as lst:
        src = socket.create_connection(lst.getsockname())
        dst, _ = lst.accept()
    yield Channel(src), dst
    src.close()
    dst.close()


def run_receiver(conn: socket.socket, name: str) -> dict[str, Any]:
    """receive() in a thread; returns a dict that gets 'result' or 'error'."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = receiver.receive(conn, lambda *a, **k: None, name)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    out["thread"] = t
    return out


def sim_hello(ch: Channel) -> None:
    ch.preamble()
    ch.send_json(s.HELLO, {"page_bits": 12, "guest": None, "digests": True})


def pages(numbers: list[int]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    n = np.array(numbers, np.int64)
    data = (n[:, None] * 1000 + np.arange(512)).astype(np.uint64)
    return n, data


def test_records_round_trip(pair: tuple[Channel, socket.socket]) -> None:
    ch, dst = pair
    rx = Channel(dst)
    n, data = pages([3, 9, 10])
    ch.send(s.BLOCKS, [s.pack_blocks([(0, 1 << 20), (1 << 20, 2 << 20)])], count=2)
    ch.send_pages(n, data)
    rtype, count, payload = rx.recv()
    assert (rtype, s.unpack_blocks(count, payload)) == (s.BLOCKS, [(0, 1 << 20),
                                                                    (1 << 20, 2 << 20)])
    rtype, count, payload = rx.recv()
    got_n, got = s.unpack_pages(count, payload, 4096)
    assert rtype == s.PAGES and got_n.tolist() == [3, 9, 10] and np.array_equal(got, data)


def test_a_corrupted_chunk_is_caught(pair: tuple[Channel, socket.socket]) -> None:
    ch, dst = pair
    n, data = pages([1])
    idx = n.astype("<u8")
    good = s.CRC.pack(__import__("zlib").crc32(data, __import__("zlib").crc32(idx)))
    data[0, 5] ^= 1                                    # flipped after the digest
    ch.send(s.PAGES, [idx, data, good], count=1)
    _, count, payload = Channel(dst).recv()
    with pytest.raises(StreamError, match="digest mismatch"):
        s.unpack_pages(count, payload, 4096)


def send_sim_ram(ch: Channel, n_pages: int = 64) -> None:
    ch.send(s.BLOCKS, [s.pack_blocks([(0, n_pages << 12)])], count=1)
    n, data = pages(list(range(n_pages)))
    ch.send_pages(n, data)


def test_a_whole_sim_stream_is_loaded_then_cleaned_up(
        pair: tuple[Channel, socket.socket], map_name: str) -> None:
    ch, dst = pair
    out = run_receiver(dst, map_name)
    sim_hello(ch)
    ch.send(s.BLOCKS, [s.pack_blocks([(0, 64 << 12)])], count=1)
    ch.recv_expect(s.READY)                    # the receiver allocated the block
    assert segment.list_segments(map_name)     # its RAM exists meanwhile
    ch.send_pages(*pages(list(range(64))))
    ch.send(s.END_OF_STREAM, [s.END.pack(64, 1)])
    _, _, payload = ch.recv_expect(s.LOADED)
    loaded = json.loads(bytes(payload))
    assert loaded["pages"] == 64 and loaded["map"] == map_name
    _, count, payload = ch.recv_expect(s.DIGESTS)
    n, data = pages(list(range(64)))
    ours = s.ram_digests([data])
    assert count == len(ours) and bytes(payload) == b"".join(ours)
    ch.send(s.RESUME)
    ch.recv_expect(s.RUNNING)   # the commit point (docs/STREAM.md)
    ch.recv_expect(s.RESULT)
    out["thread"].join(30)
    assert "error" not in out and out["result"]["pages"] == 64
    assert segment.list_segments(map_name) == []


def refused(ch: Channel, dst: socket.socket, map_name: str, send: Any,
            kind: type[Exception] = StreamError) -> Exception:
    out = run_receiver(dst, map_name)
    send(ch)
    try:
        ch.sock.shutdown(socket.SHUT_WR)   # the source stops here
    except OSError:
        pass                               # the receiver hung up first
    out["thread"].join(30)
    assert not out["thread"].is_alive()
    assert segment.list_segments(map_name) == [], "the receiver left segments behind"
    err = out.get("error")
    assert isinstance(err, kind), out
    return err


def test_another_version_is_refused(pair: tuple[Channel, socket.socket], map_name: str) -> None:
    ch, dst = pair
    err = refused(ch, dst, map_name,
                  lambda c: c._sendall([s.PREAMBLE.pack(s.MAGIC, s.VERSION + 1, 0)]))
    assert f"version {s.VERSION + 1}" in str(err) and f"version {s.VERSION} only" in str(err)


def test_not_a_stream_is_refused(pair: tuple[Channel, socket.socket], map_name: str) -> None:
    ch, dst = pair
    err = refused(ch, dst, map_name, lambda c: c._sendall([b"GET / HTTP/1.1\r\n\r\n"]))
    assert "not a shmdirty migration stream" in str(err)


def test_a_stream_cut_in_a_page_record_is_refused(
        pair: tuple[Channel, socket.socket], map_name: str) -> None:
    ch, dst = pair

    def send(c: Channel) -> None:
        sim_hello(c)
        send_sim_ram(c)
        c._sendall([s.RECORD.pack(s.PAGES, 0, 4, 4 * (8 + 4096) + 4), b"\0" * 5000])

    err = refused(ch, dst, map_name, send)
    assert "truncated" in str(err) and "PAGES" in str(err)


def test_a_stream_without_end_marker_is_refused(
        pair: tuple[Channel, socket.socket], map_name: str) -> None:
    ch, dst = pair

    def send(c: Channel) -> None:
        sim_hello(c)
        send_sim_ram(c)

    assert "truncated before its end marker" in str(refused(ch, dst, map_name, send))


def test_a_lost_record_is_caught_by_the_end_marker(
        pair: tuple[Channel, socket.socket], map_name: str) -> None:
    ch, dst = pair

    def send(c: Channel) -> None:
        sim_hello(c)
        send_sim_ram(c)
        c.send(s.END_OF_STREAM, [s.END.pack(65, 2)])    # one record went missing

    assert "END says 65 pages in 2 records" in str(refused(ch, dst, map_name, send))


def test_pages_outside_ram_are_refused(pair: tuple[Channel, socket.socket],
                                       map_name: str) -> None:
    ch, dst = pair

    def send(c: Channel) -> None:
        sim_hello(c)
        send_sim_ram(c)
        c.send_pages(*pages([64]))

    assert "outside" in str(refused(ch, dst, map_name, send))


def test_record_header_layout() -> None:
    assert s.PREAMBLE.size == 16 and s.RECORD.size == 16 and s.VCPU.size == 464
    assert struct.unpack("<8s", s.MAGIC)[0] == b"SHMDMIG\n"


def test_too_many_ram_blocks_are_refused(pair: tuple[Channel, socket.socket],
                                         map_name: str) -> None:
    """A crafted BLOCKS record (issue 13: 5000 x 1 MiB made the receiver
    allocate 5 GiB) is refused before anything is allocated."""
    ch, dst = pair
    n = s.MAX_RAM_BLOCKS + 1
    blocks = [(i << 16, 1 << 16) for i in range(n)]

    def send(c: Channel) -> None:
        sim_hello(c)
        c.send(s.BLOCKS, [s.pack_blocks(blocks)], count=n)

    err = refused(ch, dst, map_name, send)
    assert f"{n} RAM blocks" in str(err) and str(s.MAX_RAM_BLOCKS) in str(err)


def test_more_ram_than_available_is_refused(pair: tuple[Channel, socket.socket],
                                            map_name: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: real._replace(available=2 << 20))   # 2 MiB "available"
    ch, dst = pair

    def send(c: Channel) -> None:
        sim_hello(c)
        c.send(s.BLOCKS, [s.pack_blocks([(0, 2 << 20), (2 << 20, 2 << 20)])], count=2)

    # This host cannot hold it (receive's exit 9, issue 18), with the numbers.
    err = refused(ch, dst, map_name, send, receiver.HostFailure)
    assert "needs 4 MiB of RAM" in str(err) and "2 MiB of memory available" in str(err)


def test_check_ram_layout_takes_what_fits() -> None:
    s.check_ram_layout([(0, 1 << 20)] * 3, available=3 << 20)
    with pytest.raises(StreamError, match="more than"):
        s.check_ram_layout([(0, 1 << 20)] * 3, available=(3 << 20) - 1)


def test_shmdirty_receive_refuses_a_crafted_layout_with_exit_5() -> None:
    """The reported case end to end: 5000 x 1 MiB RAM blocks to `shmdirty
    receive` exit 5 (the stream was refused) with a clear message, at once,
    before any RAM is allocated (the session's leak check sees no segment)."""
    import re
    import subprocess
    import sys
    rx = subprocess.Popen([sys.executable, "-m", "shmdirty.workers.cli", "receive", "--listen",
                           "127.0.0.1:0", "--once"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        assert rx.stdout is not None
        line = rx.stdout.readline()
        port = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert port, line
        with socket.create_connection(("127.0.0.1", int(port.group(1))), timeout=30) as sock:
            ch = Channel(sock)
            sim_hello(ch)
            blocks = [(i << 20, 1 << 20) for i in range(5000)]
            ch.send(s.BLOCKS, [s.pack_blocks(blocks)], count=len(blocks))
            out, _ = rx.communicate(timeout=30)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    assert rx.returncode == 5, out
    assert "5000 RAM blocks" in out and "Traceback" not in out, out
