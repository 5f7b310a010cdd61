"""``c``: the seed's loops in C (``cbench.c``), the hardware limit.

Built at run time with ``cc -O2 -pthread`` into a cache directory
(``$XDG_CACHE_HOME/shmdirty`` or ``~/.cache/shmdirty``, else a temporary
one), keyed by a hash of the source and the compiler, so a run rebuilds only
when ``cbench.c`` changes.  Without ``cc`` the rows are skipped with a note.
The program runs one thread per worker and reports what the Python workers
report: ops and timed seconds per worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .registry import Cell, Impl, Unavailable, register_impl

SOURCE = Path(__file__).with_name("cbench.c")
CFLAGS = ("-O2", "-pthread")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    d = Path(base) / "shmdirty"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="shmdirty-cbench-"))


def build() -> Path:
    """The cbench executable, compiled if needed; Unavailable without cc."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise Unavailable("c rows skipped: no C compiler (cc) on PATH")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + cc.encode() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    exe = cache_dir() / f"cbench-{key}"
    if exe.exists():
        return exe
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
    proc = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise Unavailable(f"c rows skipped: {cc} failed to build cbench.c:\n{proc.stderr}")
    os.replace(tmp, exe)  # atomic: concurrent runs never see half a binary
    return exe


def compiler_version() -> str | None:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.stdout else None


class CImpl(Impl):
    name = "c"
    in_pool = False

    def __init__(self) -> None:
        self.exe: Path | None = None

    def check(self) -> None:
        if self.exe is None:
            self.exe = build()

    def run_external(self, cell: Cell) -> list[dict[str, Any]]:
        self.check()
        guest_pages = cell.guest_bytes >> cell.page_bits
        guest_pages -= guest_pages % 64
        args = [str(self.exe), cell.op, str(cell.workers), repr(cell.duration),
                str(guest_pages), str(cell.range_pages), str(cell.batch_pages),
                cell.pattern or "none", str(cell.seed)]
        proc = subprocess.run(args, capture_output=True, text=True,
                              timeout=cell.cap + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"cbench exited with {proc.returncode}: {proc.stderr.strip()}")
        out = json.loads(proc.stdout)
        return [{"ok": True, "ops": ops, "seconds": sec, "error": None}
                for ops, sec in zip(out["ops"], out["seconds"], strict=True)]


register_impl(CImpl())
