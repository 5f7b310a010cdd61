"""Fuzzing the receiver (issue 18): hypothesis writes streams, mostly
well-framed records with hostile fields and payloads, at a real
``Destination`` over a socket pair.  Whatever arrives, the receiver ends
within its timeouts with one of its documented errors (or a result), never
allocates past its bounds, and leaves no segment behind.

The suite runs a few seconds of it (``SHMDIRTY_FUZZ_EXAMPLES``, default
40); ``make fuzz`` runs thousands.  Regressions and seeds live in
``tests/data/stream_corpus/`` (one raw stream per ``.bin`` file, replayed
by ``test_the_corpus_replays``); ``write_corpus()`` below re-creates the
hand-made ones.  The corpus is stream version 2 (``stream.VERSION``), so
each file still reaches the check it was made for; ``version_1`` keeps a
version 1 stream, which must be refused cleanly at the preamble."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmdirty import segment
from shmdirty.workers import receiver
from shmdirty.workers import stream as s
from shmdirty.workers.receiver import Destination, GuestFailed, HostFailure, Limits
from shmdirty.workers.stream import Channel, PeerGone, StreamError

CORPUS = Path(__file__).parent / "data" / "stream_corpus"
EXAMPLES = int(os.environ.get("SHMDIRTY_FUZZ_EXAMPLES", "40"))
LIMITS = Limits(max_ram=64 << 20, handshake_timeout=2.0, peer_timeout=2.0, guest_timeout=5.0)
HANG = 15.0          # seconds one stream may take at most (the timeouts above, and slack)
DOCUMENTED = (StreamError, PeerGone, HostFailure, GuestFailed)
pytestmark = pytest.mark.timeout(300)


def feed(raw: bytes, map_name: str) -> tuple[Any, int]:
    """Run a Destination on ``raw``: (its result or exception, its buffer size)."""
    a, b = socket.socketpair()
    ch = Channel(b)
    dest = Destination(ch, lambda ev: None, map_name, LIMITS)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = dest.run()
        except BaseException as e:  # noqa: BLE001 - classified below
            out["result"] = e
        finally:
            out["buf"] = len(ch._buf)
            dest.close()

    def drain() -> None:          # read what the receiver answers, so it never blocks
        try:
            while a.recv(1 << 16):
                pass
        except OSError:
            pass
    th, dr = threading.Thread(target=run), threading.Thread(target=drain)
    th.start()
    dr.start()
    try:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
    except OSError:
        pass                      # the receiver hung up first
    t0 = time.monotonic()
    th.join(HANG)
    assert not th.is_alive(), f"the receiver hangs on {raw[:80]!r}"
    a.close()
    dr.join(HANG)
    assert time.monotonic() - t0 < HANG
    return out["result"], out["buf"]


def check(raw: bytes, map_name: str) -> None:
    result, buf = feed(raw, map_name)
    if isinstance(result, BaseException):
        assert isinstance(result, DOCUMENTED), repr(result)
    bound = max(1 << 20, *(v for k, v in s.MAX_LENGTH.items() if k not in (s.DIGESTS,)))
    assert buf <= bound
    assert buf <= max(1 << 20, len(raw)), "a buffer larger than what arrived"
    assert segment.list_segments(map_name) == [], "segments left behind"


# -- the strategies ----------------------------------------------------------------------
def record(rtype: int, count: int, payload: bytes, length: int | None = None) -> bytes:
    return s.RECORD.pack(rtype, 0, count, len(payload) if length is None else length) + payload


HELLOS = st.one_of(
    st.just({"page_bits": 12, "guest": None}),
    st.fixed_dictionaries({"page_bits": st.one_of(st.integers(-2, 70), st.booleans(),
                                                  st.floats(), st.text(max_size=3)),
                           "digests": st.one_of(st.booleans(), st.integers())}),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                      max_size=3),
                 max_leaves=8),
)
COUNTS = st.one_of(st.integers(0, 8), st.just(2**32 - 1), st.integers(0, 2**32 - 1))


@st.composite
def records(draw: Any) -> bytes:
    rtype = draw(st.sampled_from([*s.NAMES, 0, 9, 99, 65535]))
    count = draw(COUNTS)
    if rtype == s.BLOCKS and draw(st.booleans()):
        n = draw(st.integers(0, 4))
        blocks = [(draw(st.integers(0, 1 << 26)) & ~0xFFF, draw(st.integers(0, 1 << 25)) & ~0xFFF)
                  for _ in range(n)]
        return record(rtype, n, s.pack_blocks(blocks))
    if rtype == s.PAGES and draw(st.booleans()):
        import zlib
        n = draw(st.integers(0, 3))
        nums = b"".join(draw(st.integers(0, 1 << 14)).to_bytes(8, "little") for _ in range(n))
        body = nums + bytes(4096 * n)
        return record(rtype, n, body + s.CRC.pack(zlib.crc32(body)))
    payload = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.none(), st.none(), st.integers(0, 2**64 - 1)))
    return record(rtype, count, payload, length)


@st.composite
def streams(draw: Any) -> bytes:
    pre = draw(st.one_of(st.just(s.PREAMBLE.pack(s.MAGIC, s.VERSION, 0)),
                         st.binary(min_size=0, max_size=16)))
    hello = json.dumps(draw(HELLOS)).encode() if draw(st.booleans()) else draw(st.binary(
        max_size=40))
    body = b"".join(draw(st.lists(records(), max_size=5)))
    tail = draw(st.sampled_from([b"", s.RECORD.pack(s.END_OF_STREAM, 0, 0, 16) + bytes(16)]))
    return pre + record(s.HELLO, 0, hello) + body + tail


# -- the tests -------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=streams())
def test_any_stream_ends_in_a_documented_way(raw: bytes, map_name: str) -> None:
    check(raw, map_name)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.stem)
def test_the_corpus_replays(path: Path, map_name: str) -> None:
    check(path.read_bytes(), map_name)


def test_the_corpus_is_there() -> None:
    assert len(list(CORPUS.glob("*.bin"))) >= 10


def write_corpus(folder: Path = CORPUS) -> None:
    """The hand-made regressions of issue 18 (run by hand to re-create them)."""
    pre = s.PREAMBLE.pack(s.MAGIC, s.VERSION, 0)

    def hello(obj: Any) -> bytes:
        return pre + record(s.HELLO, 0, obj if isinstance(obj, bytes) else json.dumps(obj).encode())
    sim = hello({"page_bits": 12, "guest": None})
    cases = {
        "hello_not_json": hello(b"\xffnot json"),
        "hello_empty_object": hello({}),
        "hello_list": hello([1, 2]),
        "hello_page_bits_minus_1": hello({"page_bits": -1}),
        "hello_page_bits_62": hello({"page_bits": 62}),
        "hello_vcpus_999": hello({"page_bits": 12, "guest": json.dumps({"vcpus": 999})}),
        "header_claims_1gib": pre + s.RECORD.pack(s.HELLO, 0, 0, 1 << 30),
        "pages_claims_1gib": sim + s.RECORD.pack(s.PAGES, 0, 1, 1 << 30),
        "blocks_4gib": sim + record(s.BLOCKS, 1, s.pack_blocks([(0, 4 << 30)])),
        "blocks_5000": sim + record(s.BLOCKS, 5000, s.pack_blocks([(i << 20, 1 << 20)
                                                                   for i in range(5000)])),
        "vcpus_duplicate_index": sim + record(s.VCPUS, 2, bytes(464) * 2),
        "pages_outside_ram": sim + record(s.BLOCKS, 1, s.pack_blocks([(0, 1 << 20)])) + record(
            s.PAGES, 1, (1 << 20).to_bytes(8, "little") + bytes(4096) + s.CRC.pack(
                __import__("zlib").crc32((1 << 20).to_bytes(8, "little") + bytes(4096)))),
        "error_not_json": sim + record(s.ERROR, 0, b"\x00"),
        "unknown_type": sim + record(99, 0, b""),
        "idle_after_hello": sim,
        "tiny_complete": sim + record(s.BLOCKS, 1, s.pack_blocks([(0, 1 << 20)]))
        + record(s.VCPUS, 0, b"") + record(s.END_OF_STREAM, 0, s.END.pack(0, 0)),
        # version 2 (the commit point): a version 1 source is refused at the preamble
        "version_1": s.PREAMBLE.pack(s.MAGIC, 1, 0) + record(s.HELLO, 0, json.dumps(
            {"page_bits": 12, "guest": None}).encode()),
        "heartbeat_with_payload": sim + record(s.HEARTBEAT, 0, bytes(8)),
        "heartbeat_claims_1gib": sim + s.RECORD.pack(s.HEARTBEAT, 0, 0, 1 << 30),
        "running_to_the_receiver": sim + record(s.RUNNING, 0, b""),
        "heartbeats_then_complete": sim + record(s.HEARTBEAT, 0, b"") * 3
        + record(s.BLOCKS, 1, s.pack_blocks([(0, 1 << 20)])) + record(s.HEARTBEAT, 0, b"")
        + record(s.VCPUS, 0, b"") + record(s.END_OF_STREAM, 0, s.END.pack(0, 0)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in cases.items():
        (folder / f"{name}.bin").write_bytes(raw)


if __name__ == "__main__":
    write_corpus()
    print(f"wrote {len(list(CORPUS.glob('*.bin')))} files to {CORPUS}")
    _ = receiver  # the module under test
