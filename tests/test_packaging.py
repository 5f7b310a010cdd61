"""The wheel: one top-level package (shmdirty) with the data files it runs
on, dependency markers that pick the atomics package per Python, and a
``shmdirty migrate`` that runs from the installed wheel outside the checkout.

The wheel is built offline from a copy of the source tree (pip's
``--no-build-isolation`` with the [test] extra's setuptools), so the
checkout gets no build/ or egg-info from it.  .ci/run also does a plain
``pip install .`` into a fresh venv, dependencies and all.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS_NEEDED = 77  # pyproject's build-system: SPDX license strings


def _setuptools_major() -> int:
    try:
        return int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if _setuptools_major() < SETUPTOOLS_NEEDED:
        pytest.skip(f"an offline wheel build needs setuptools >= {SETUPTOOLS_NEEDED} in this "
                    "environment (pip install -e '.[test]')")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".*_cache",
        ".hypothesis", "results"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(tmp), str(src)],
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = tmp.glob("shmdirty-*.whl")
    yield whl


def test_the_wheel_holds_only_the_shmdirty_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = email.message_from_bytes(z.read(next(n for n in names
                                                    if n.endswith(".dist-info/METADATA"))))
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    dist_info = f"shmdirty-{meta['Version']}.dist-info"
    assert {n.split("/")[0] for n in names} == {"shmdirty", dist_info}
    # workers/ (the command line and the application) and perf/ ship inside
    # shmdirty as shmdirty.workers and shmdirty.perf (pyproject's package-dir),
    # perf with the C source its `c` baseline compiles
    for f in ("shmdirty/py.typed", "shmdirty/workers/cli.py", "shmdirty/workers/render.py",
              "shmdirty/workers/options.py", "shmdirty/workers/app.py",
              "shmdirty/workers/vcpu.py", "shmdirty/workers/guest_kvm.S",
              "shmdirty/perf/__main__.py", "shmdirty/perf/cbench.c"):
        assert f in names
    # the library folder holds the library only
    for f in ("shmdirty/cli.py", "shmdirty/render.py", "shmdirty/options.py"):
        assert f not in names
    assert not [n for n in names if "/_workers/" in n or "/_perf/" in n]
    assert b"shmdirty = shmdirty.workers.cli:main" in entry_points


def test_the_wheel_holds_no_symlink(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        links = [i.filename for i in z.infolist()
                 if (i.external_attr >> 16) & 0o170000 == 0o120000]
    assert links == []


def test_markers_pick_atomics_per_python(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(
            z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
    requires = {r.split(";")[0].split("=")[0].split("<")[0].split(">")[0].strip():
                r.replace(" ", "") for r in meta.get_all("Requires-Dist")}
    assert requires["atomics"] == 'atomics==1.0.3;python_version<"3.12"'
    assert requires["atomics2"] == 'atomics2<1.2,>=1.1;python_version>="3.12"'
    assert meta["Requires-Python"] == ">=3.11"
    # `pip install .` / `make demo` get only what running needs; the test
    # tools come with the [test] extra, matplotlib with [bench] (and [test])
    plain = {name for name, req in requires.items() if "extra==" not in req}
    assert plain == {"numpy", "psutil", "atomics", "atomics2", "cffi", "rich"}
    for tool in ("pytest", "pytest-timeout", "hypothesis", "mypy", "ruff"):
        assert "extra==\"test\"" in requires[tool], requires[tool]
    plot = [r.replace(" ", "") for r in meta.get_all("Requires-Dist") if r.startswith("matplotlib")]
    assert {p.split("extra==")[1] for p in plot} == {'"test"', '"bench"'}  # --plot is tested
    classifiers = meta.get_all("Classifier")
    for v in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {v}" in classifiers


def test_installed_wheel_migrates_outside_the_checkout(wheel: Path, tmp_path: Path,
                                                       map_name: str) -> None:
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # Dependencies come from this environment; shmdirty only from the wheel.
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u, shmdirty, shmdirty.perf; "
         "print(shmdirty.__file__); print(u.find_spec('perf'), u.find_spec('workers'))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    module_file, perf_spec = where.stdout.split("\n")[:2]
    assert Path(module_file).is_relative_to(target)
    assert perf_spec == "None None"  # no top-level `perf` or `workers` from the wheel
    bench = subprocess.run([sys.executable, "-m", "shmdirty.perf", "--help"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
    assert bench.returncode == 0 and "--quick" in bench.stdout, bench.stderr
    out = tmp_path / "run.json"
    run = subprocess.run(
        [str(target / "bin" / "shmdirty"), "migrate", "--guest", "sim", "--name", map_name,
         "--ram", "4M",
         "--hotplug", "0.05:2M", "--block-pages", "256", "--dirty-rate", "300",
         "--bandwidth", "0", "--timeout", "60", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(out.read_text())["result"]["identical"] is True
