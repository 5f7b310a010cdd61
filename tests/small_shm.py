"""Run Python code with a small private /dev/shm (issue 17.3).

``unshare --mount --propagation private`` gives the child a mount namespace
of its own, where a tmpfs of ``size`` is mounted on /dev/shm: the host's
/dev/shm is neither seen nor touched, and the small one vanishes with the
child, even when it is killed.  Where unshare or mount is not permitted
(no CAP_SYS_ADMIN, a container without user namespaces) the test skips.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

_UNSHARE = ["unshare", "--mount", "--propagation", "private"]


def run_in_small_shm(code: str, size: str = "4m",
                     timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with a ``size`` tmpfs on /dev/shm; skip where impossible."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed: no private /dev/shm")
    probe = subprocess.run([*_UNSHARE, "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /dev/shm"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("cannot mount a private /dev/shm here (unshare --mount / mount not "
                    f"permitted): {probe.stderr.strip()}")
    return subprocess.run(
        [*_UNSHARE, "sh", "-c",
         f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$0" -c "$1"',
         sys.executable, code],
        capture_output=True, text=True, timeout=timeout)
