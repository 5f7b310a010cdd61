"""Entry points of the fake processes tests/test_migration.py runs (spawned:
they must be importable by name in a child)."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection

from shmdirty.workers.reports import Ready, WorkerFailed


def exits(code: int, conn: Connection) -> None:
    """Ready, then exit with ``code`` and no report."""
    conn.send(Ready("w0"))
    raise SystemExit(code)


def fails(conn: Connection) -> None:
    """Ready, then the report a worker sends when it raises."""
    conn.send(Ready("w0"))
    conn.send(WorkerFailed("w0", "Traceback (most recent call last):\n  boom\n"))
    raise SystemExit(1)


def hangs(conn: Connection) -> None:
    """Ready, then never leaves on its own (Abort is not read)."""
    conn.send(Ready("w0"))
    while True:
        time.sleep(1)
