"""workers/stream_bench.py: the TLS-against-plain stream benchmark still
speaks the stream (a protocol change that it missed made it crash: the
commit point's RUNNING record before RESULT)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("trustme",
                    reason="the [test] extra's trustme makes the benchmark's certificates")


@pytest.mark.timeout(120)
def test_the_benchmark_streams_plain_and_tls_to_the_end() -> None:
    r = subprocess.run([sys.executable, "-m", "shmdirty.workers.stream_bench",
                        "--size", "4M", "--repeat", "1"],
                       capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr
    assert "run 1 plain 4 MiB" in r.stdout and "run 1 tls   4 MiB" in r.stdout, r.stdout
    assert "TLS costs" in r.stdout and "Traceback" not in r.stderr
