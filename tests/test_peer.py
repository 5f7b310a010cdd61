"""Bounded waits (workers.peer): a silent peer is detected within the peer
timeout, on receive and on send; heartbeats keep a busy peer audible and
are skipped by the reader; a broken heartbeat (never sent) is caught."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from shmdirty.workers import stream as s
from shmdirty.workers.peer import Heartbeat, tune

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 0.6


@pytest.fixture
def pair() -> Iterator[tuple[s.Channel, s.Channel]]:
    a, b = socket.socketpair()
    for x in (a, b):
        tune(x, TIMEOUT)
    ca, cb = s.Channel(a), s.Channel(b)
    try:
        yield ca, cb
    finally:
        ca.close()
        cb.close()


def test_a_silent_peer_is_detected_on_receive(pair: tuple[s.Channel, s.Channel]) -> None:
    _, b = pair
    t0 = time.monotonic()
    with pytest.raises(s.PeerSilent, match="peer-timeout"):
        b.recv()
    assert time.monotonic() - t0 < 10 * TIMEOUT


def test_a_peer_that_stops_reading_is_detected_on_send(
        pair: tuple[s.Channel, s.Channel]) -> None:
    a, _ = pair
    block = bytes(1 << 20)
    with pytest.raises(s.PeerSilent, match="took nothing"):
        for _ in range(1000):        # bounded: the buffers hold far less
            a.send(s.PAGES, [block])


def _late_record(ch: s.Channel, done: threading.Event) -> None:
    done.wait(3 * TIMEOUT)           # busy for longer than the peer timeout
    ch.send(s.READY)


@pytest.mark.parametrize("broken", [False, True])
def test_heartbeats_keep_a_busy_peer_alive(pair: tuple[s.Channel, s.Channel],
                                           broken: bool) -> None:
    a, b = pair
    hb = Heartbeat(a, TIMEOUT)
    if broken:                       # a heartbeat that never beats: must be caught
        hb.every = 3600.0
    done = threading.Event()
    t = threading.Thread(target=_late_record, args=(a, done))
    with hb:
        t.start()
        try:
            if broken:
                with pytest.raises(s.PeerSilent):
                    b.recv()
            else:
                rtype, _, _ = b.recv()         # the heartbeats before it are skipped
                assert rtype == s.READY
                assert b.bytes_received > s.RECORD.size   # heartbeats did arrive
        finally:
            done.set()
            t.join()
