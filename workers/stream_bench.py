"""The stream's throughput with TLS against without (issue 18):

    python -m shmdirty.workers.stream_bench --size 1G [--repeat 3]

A pure-stream run: no guest runs, so nothing is dirtied again and every
page is sent once (the case of a paused guest).  The source is this
process: ``size`` bytes of non-zero pages (every 64-bit word differs) sent
as the migrator sends them (PAGES records of 256 pages, CRC-32 each, after
BLOCKS and its READY); the destination is a real ``shmdirty receive``
service in another process (``workers.receive_service``: its map, its RAM
segments preallocated, every page checked and stored), on loopback TCP,
plain and then with TLS 1.3 (certificates made by ``trustme``, the [test]
extra).  The time is from the first PAGES record to LOADED: what the
downtime of a paused guest would be.  Prints one line per run and the TLS
cost as a percentage of the plain throughput.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from . import receive_service, stream, transport
from .options import page_size_arg
from .receiver import Limits

CHUNK = 256          # pages per PAGES record, as the KVM migrator sends them
PAGE_BITS = 12


def _serve(cfg: receive_service.ServiceConfig, pipe: Connection) -> None:
    def listening(ep: transport.Endpoint) -> None:
        pipe.send(ep.port)
    try:
        receive_service.serve(cfg, lambda ev: None, listening, lambda *a: None)
    finally:
        pipe.close()


def make_creds(folder: Path) -> str:
    import trustme
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / transport.CA_CERT))
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(folder / transport.SERVER_CERT))
    server.private_key_pem.write_to_path(str(folder / transport.SERVER_KEY))
    client = ca.issue_cert("bench.client")
    client.cert_chain_pems[0].write_to_path(str(folder / transport.CLIENT_CERT))
    client.private_key_pem.write_to_path(str(folder / transport.CLIENT_KEY))
    return str(folder)


def one_run(ram: np.ndarray[Any, Any], creds: str | None) -> float:
    """Seconds from the first PAGES record to LOADED for all of ``ram``."""
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    cfg = receive_service.ServiceConfig(transport.Endpoint("127.0.0.1", 0), creds,
                                        limits=Limits(max_ram=ram.nbytes), once=True)
    p = ctx.Process(target=_serve, args=(cfg, theirs), daemon=True)
    p.start()
    theirs.close()
    try:
        port = mine.recv()
        sock = transport.connect(transport.Endpoint("127.0.0.1", port), creds, 30)
        ch = stream.Channel(sock)
        ch.preamble()
        ch.send_json(stream.HELLO, {"page_bits": PAGE_BITS, "guest": None, "digests": False})
        ch.send(stream.BLOCKS, [stream.pack_blocks([(0, ram.nbytes)])], count=1)
        ch.recv_expect(stream.READY)
        npages = len(ram)
        t0 = time.monotonic()
        for first in range(0, npages, CHUNK):
            numbers = np.arange(first, min(first + CHUNK, npages), dtype=np.uint64)
            ch.send_pages(numbers, ram[first:first + CHUNK])
        ch.send(stream.VCPUS)
        ch.send(stream.END_OF_STREAM, [stream.END.pack(npages, -(-npages // CHUNK))])
        ch.recv_expect(stream.LOADED)
        seconds = time.monotonic() - t0
        ch.recv_expect(stream.DIGESTS)
        ch.send(stream.RESUME)
        ch.recv_expect(stream.RUNNING)   # the commit point (docs/STREAM.md)
        ch.recv_expect(stream.RESULT)
        ch.close()
        return seconds
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()
            p.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shmdirty.workers.stream_bench",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", type=page_size_arg, default=1 << 30, metavar="SIZE",
                    help="bytes of guest RAM to stream (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    args = ap.parse_args(argv)
    words = args.size // 8
    # non-zero RAM: every word differs (a zero page would cost the same here,
    # but a real guest's RAM is not zero)
    ram = (np.arange(words, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
           | np.uint64(1)).reshape(-1, (1 << PAGE_BITS) // 8)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        creds = make_creds(Path(tmp))
        for i in range(args.repeat):
            for name, c in (("plain", None), ("tls", creds)):
                sec = one_run(ram, c)
                mib_s = args.size / sec / 2**20
                print(f"run {i + 1} {name:5} {args.size >> 20} MiB in {sec:.3f} s: "
                      f"{mib_s:.0f} MiB/s", flush=True)
                best[name] = max(best.get(name, 0.0), mib_s)
    cost = 1 - best["tls"] / best["plain"]
    print(f"best: plain {best['plain']:.0f} MiB/s, TLS {best['tls']:.0f} MiB/s: TLS costs "
          f"{cost:.1%} of the throughput (goal: at most 30 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
