"""The command line as a user meets it (issue 13): errors on stderr with the
exit codes --help documents, options refused before anything starts (exit
2, plain words, no traceback), Ctrl-C honoured at every stage, --version,
a summary that reads at 80 columns, gc in natural order, an unreachable
dirty rate reported, and docs that name what is really there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import psutil
import pytest
from small_shm import run_in_small_shm

from shmdirty import layout, segment
from shmdirty.segment import Segment
from shmdirty.workers import app, cli
from shmdirty.workers.options import PAGE_BITS

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
# A small run: 4 MiB, no hot-add, unlimited bandwidth (a few seconds).
SMALL = ["--ram", "4M", "--block-pages", "256", "--dirty-rate", "300", "--hotplug", "none",
         "--bandwidth", "0", "--timeout", "60"]


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    got = capsys.readouterr()
    return code, got.out, got.err


def _migrate(map_name: str, *argv: str, env: dict[str, str] | None = None,
             script: str | None = None) -> subprocess.CompletedProcess[str]:
    """``shmdirty migrate`` as a user runs it (a process of its own)."""
    cmd = ([sys.executable, "-c", script] if script
           else [sys.executable, "-m", "shmdirty.workers.cli"])
    return subprocess.run([*cmd, "migrate", "--guest", "sim", "--name", map_name, *argv],
                          capture_output=True,
                          text=True, timeout=80, env=env)


# --- errors, exit codes, --help, --version ---------------------------------------------------
def test_errors_of_inspect_and_gc_go_to_stderr(capsys: pytest.CaptureFixture[str],
                                               map_name: str) -> None:
    code, out, err = _main(capsys, "inspect", map_name, "--json")
    assert (code, out) == (2, "")            # the JSON stream stays clean
    assert "is not a map" in err
    code, out, err = _main(capsys, "gc", "--yes", map_name)
    assert code == 2 and "is not a map" in err and "is not a map" not in out
    code, out, err = _main(capsys, "inspect", "no such map!")
    assert code == 2 and out == "" and "must be 1 to at most" in err


@pytest.mark.parametrize(("command", "codes"), [
    ("migrate", ("0 ", "1 ", "2 ", "3 ", "4 ", "6 ", "130/143")),
    ("receive", ("0 ", "2 ", "5 ", "9 ", "10 ", "130")),
    ("inspect", ("0 ", "2 ", "130")),
    ("ls", ("0 ", "2 ", "130")),
    ("gc", ("0 ", "2 ", "130")),
])
def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str], command: str,
                                        codes: tuple[str, ...]) -> None:
    code, out, _ = _main(capsys, command, "--help")
    assert code == 0
    listed = out[out.index("exit codes:"):]
    for c in codes:
        assert re.search(rf"^\s+{re.escape(c)}", listed, re.M), (c, listed)


def test_pattern_names_are_one_set_for_both_guests() -> None:
    args = cli.build_parser().parse_args(["migrate", "--pattern", "random"])
    assert cli._migrate_config(args, "sim", "").pattern == "uniform"   # sim's name for it
    assert cli._migrate_config(args, "kvm", "").pattern == "uniform"   # kvm maps it back


def test_a_run_longer_than_its_timeout_has_its_own_exit_code(map_name: str) -> None:
    # 16 MiB at 1 MiB/s: the bulk round alone takes 16 s; the timeout is 1 s
    r = _migrate(map_name, "--ram", "16M", "--block-pages", "1024", "--hotplug", "none",
                 "--bandwidth", "1", "--timeout", "1")
    assert r.returncode == 6, r.stdout + r.stderr
    assert "--timeout" in r.stderr and "Traceback" not in r.stderr
    assert segment.list_segments(map_name) == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main(capsys, "--version")
    assert code == 0 and out.strip() == f"shmdirty {version('shmdirty')}"


def test_option_pages_match_the_application() -> None:
    assert PAGE_BITS == app.PAGE_BITS


# --- options checked before anything starts -----------------------------------------------------
BAD_OPTIONS = [
    (["--ram", "inf"], "is not a size"),
    (["--ram", "nan"], "is not a size"),
    (["--ram", "1e400"], "is not a size"),
    (["--hotplug", "1:inf"], "is not a size"),
    (["--hotplug", "inf:4M"], "is not SECONDS:SIZE"),
    (["--hotplug", "nan:4M"], "is not SECONDS:SIZE"),
    (["--dirty-rate", "nan"], "is not a finite number"),
    (["--dirty-rate", "-1"], "must not be negative"),
    (["--ram", "-5M"], "'-5M': a size must be positive"),
    (["--ram=-5M"], "'-5M': a size must be positive"),
    (["--hotplug", "1:-4M"], "a size must be positive"),
    (["--bandwidth", "-.5"], "must not be negative"),
    (["--bandwidth", "inf"], "is not a finite number"),
    (["--timeout", "nan"], "is not a finite number"),
    (["--timeout", "inf"], "is not a finite number"),
    (["--timeout", "0"], "must be more than 0"),
    (["--hot-fraction", "5"], "is not a fraction in (0, 1]"),
    (["--hot-fraction", "0"], "is not a fraction in (0, 1]"),
    (["--vcpus", "abc"], "'abc' is not a whole number"),
    (["--seed", "1.5"], "'1.5' is not a whole number"),
    (["--max-rounds", "0"], "must be a positive whole number"),
    (["--json", "/nonexistent/dir/x.json"], "directory '/nonexistent/dir' does not exist"),
    (["--block-pages", "100"], "must be a multiple of 64"),   # checked by the application
    (["--vcpus", "62"], "at most 61"),
    (["--vcpus", "0"], "must be a positive whole number"),
    (["--plot", "/nonexistent/dir/x.png"], "directory '/nonexistent/dir' does not exist"),
    (["--hot-fraction", "nan"], "is not a finite number"),
    (["--hot-fraction", "2"], "is not a fraction in (0, 1]"),
    (["--hot-fraction", "0.1"], "--hot-fraction applies to --pattern hot only"),
    (["--steps", "5"], "--steps applies to --guest kvm only"),
    (["--dataplane-rate", "5"], "--dataplane-rate applies to --guest kvm only"),
]


@pytest.mark.parametrize(("argv", "why"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_exit_2_in_plain_words_before_anything_starts(
        capsys: pytest.CaptureFixture[str], map_name: str, argv: list[str], why: str) -> None:
    before = psutil.Process().children(recursive=True)
    code, out, err = _main(capsys, "migrate", "--guest", "sim", "--name", map_name, *argv)
    assert code == 2 and why in err, err
    assert "Traceback" not in err and out == ""
    # no internal names: argparse says "invalid <function name> value" for a
    # type function that raises ValueError
    assert not re.search(r"invalid \w+ value", err), err
    assert segment.list_segments(map_name) == []                   # no map was made
    assert psutil.Process().children(recursive=True) == before     # no worker was spawned


def test_plot_without_matplotlib_is_refused_up_front(
        capsys: pytest.CaptureFixture[str], map_name: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib fails
    png = tmp_path / "x.png"
    code, out, err = _main(capsys, "migrate", "--guest", "sim", "--name", map_name,
                           "--plot", str(png))
    assert code == 2, out + err
    assert "pip install 'shmdirty[bench]'" in err and "Traceback" not in err
    assert out == "" and not png.exists()             # nothing ran
    assert segment.list_segments(map_name) == []


def test_json_to_a_directory_is_refused(capsys: pytest.CaptureFixture[str], map_name: str,
                                        tmp_path: Path) -> None:
    code, _, err = _main(capsys, "migrate", "--name", map_name, "--json", str(tmp_path))
    assert code == 2 and "it is a directory" in err


def test_the_real_program_says_bad_options_without_a_traceback(map_name: str) -> None:
    for argv in (["--ram", "inf"], ["--hotplug", "1:inf"], ["--dirty-rate", "nan"]):
        r = _migrate(map_name, *argv)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "error: argument" in r.stderr
        assert r.stdout == ""


# --- Ctrl-C at every stage -----------------------------------------------------------------------
# Runs cli.main with one stage wrapped to deliver a real SIGINT to the
# process while that stage runs.
STAGE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from shmdirty.workers import cli, sim_run

    stage = os.environ["STAGE"]
    if stage == "compare":  # the result: the comparison with the destination
        real_result = sim_run.SimGuest.result
        def result(*args):
            os.kill(os.getpid(), signal.SIGINT)
            return real_result(*args)
        sim_run.SimGuest.result = result
    else:
        real_render = cli.summary
        def render(*args):
            os.kill(os.getpid(), signal.SIGINT)
            return real_render(*args)
        cli.summary = render
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("stage", ["compare", "summary"])
def test_ctrl_c_is_honoured_during_the_final_stages(map_name: str, stage: str,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = _migrate(map_name, *SMALL, "--json", str(out), script=STAGE_SCRIPT,
                 env={**os.environ, "STAGE": stage})
    assert r.returncode == 130, r.stdout + r.stderr
    assert "source and destination are identical" not in r.stdout   # no verdict
    assert "Traceback" not in r.stderr and "interrupted" in r.stderr
    res = json.loads(out.read_text())      # written on every exit, with its code
    assert res["exit_code"] == 130
    if stage == "compare":                 # no verdict for a run stopped before it
        assert "identical" not in res
    assert segment.list_segments(map_name) == []


# --- what a run prints -------------------------------------------------------------------------
def test_gc_lists_segments_in_natural_order(capsys: pytest.CaptureFixture[str],
                                            map_name: str) -> None:
    # leftovers of a map whose header never came to be: gc's to list
    for i in range(12):
        Segment.create(layout.block_name(map_name, i), 4096, layout.KIND_BLOCK).close()
    code, out, _ = _main(capsys, "gc", map_name)
    assert code == 0
    listed = [w for w in out.split() if w.startswith(f"shmdirty-{map_name}-b")]
    assert listed == [layout.block_name(map_name, i) for i in range(12)]   # b2 before b10
    code, out, _ = _main(capsys, "gc", "--yes", map_name)
    assert code == 0 and "removed 12 segment(s)" in out


# --- docs ----------------------------------------------------------------------------------------
def test_readme_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = {int(v) for v in re.findall(r"layout version (\d+)", readme)}
    assert shown == {layout.LAYOUT_VERSION}
    assert "SHMDIRTY_ATOMICS" in readme
    for v in ("3.11", "3.12", "3.13"):
        assert f"Python :: {v}" in (ROOT / "pyproject.toml").read_text() and v in readme


# --- issue 17.4: names whose segment names cannot exist are refused up front ---------------
def test_migrate_refuses_a_name_its_receiver_map_cannot_have(map_name: str) -> None:
    from shmdirty.workers.options import MAX_MIGRATE_NAME
    assert MAX_MIGRATE_NAME == layout.MAX_MAP_NAME - len("_dst")
    too_long = (map_name + "x" * 300)[:MAX_MIGRATE_NAME + 1]
    r = _migrate(too_long, *SMALL)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]     # argparse: the usage, then one line
    assert "Traceback" not in r.stderr
    assert last.startswith("shmdirty migrate: error: argument --name")
    assert f"at most {MAX_MIGRATE_NAME} characters" in last
    assert [n for n in segment.list_segments() if map_name in n] == []


def test_migrate_runs_with_the_longest_name_allowed(map_name: str) -> None:
    from shmdirty.workers.options import MAX_MIGRATE_NAME
    longest = (map_name + "x" * 300)[:MAX_MIGRATE_NAME]
    try:
        r = _migrate(longest, *SMALL)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for n in segment.list_segments(longest) + segment.list_segments(longest + "_dst"):
            segment.unlink(n)


def test_inspect_refuses_a_too_long_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(capsys, "inspect", "n" * (layout.MAX_MAP_NAME + 1))
    assert code == 2 and out == "" and f"at most {layout.MAX_MAP_NAME} characters" in err


# --- issues 18.7 / 17.3: a hot-add that fails fails alone; the guest runs on ---------------
HOTADD_RUN = ["--ram", "8M", "--block-pages", "256", "--dirty-rate", "50",
              "--hotplug", "1.2:1M,1.5:1M", "--bandwidth", "4", "--timeout", "60"]


def _wait_for(path: Path, proc: subprocess.Popen[str], seconds: float) -> None:
    """Until ``path`` exists (the run made it) or the run ended; bounded."""
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        psutil.Process(proc.pid).cpu_percent()   # a cheap syscall between looks
    assert path.exists(), proc.communicate()


def test_a_squatter_in_dev_shm_cannot_touch_memfd_ram(map_name: str, tmp_path: Path) -> None:
    """A stranger squats, once the run made its map, every /dev/shm name the
    next guest RAM block ever had (``ram1``, ``ram1.<tag>``): guest RAM is in
    memfds (no name in /dev/shm), so the squat touches nothing; the hot-adds
    are made and the migration ends identical."""
    out = tmp_path / "run.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmdirty.workers.cli", "migrate", "--guest", "sim", "--name",
         map_name, *HOTADD_RUN, "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(Path(segment.SHM_DIR) / layout.header_name(map_name), proc, 30)
        Segment.create(f"{layout.PREFIX}{map_name}-ram1", 4096, layout.KIND_RAM).close()
        Segment.create(f"{layout.PREFIX}{map_name}-ram1.00000000", 4096,
                       layout.KIND_RAM).close()
        stdout, stderr = proc.communicate(timeout=80)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout + stderr
    res = json.loads(out.read_text())
    assert [h["size"] for h in res["hotplug"]] == [1 << 20, 1 << 20], res["hotplug"]
    assert res["hotplug_refused"] == []


# Guest RAM is in memfds (host memory), so a small /dev/shm no longer makes a
# hot-add's RAM fail; what a hot-add still needs from /dev/shm is the bitmap's
# growth (new bitmap blocks and a new table, made by the coordinator).  Filling
# the private tmpfs completely once the destination's RAM exists, and keeping
# it full (the source's map frees its pages at the handover), makes that
# growth fail for real (ShmFull from the coordinator's room check): the
# hot-add cannot be made and must fail alone.  (A real memfd shortage would need a
# cgroup memory limit, not available here; RLIMIT_FSIZE does not apply to
# memfds.  That path, memfd.create -> ShmFull naming available memory, is
# tests/test_memfd.py's.)
FILL_SHM = """\
        import threading
        from shmdirty.workers import memfd
        deadline = time.monotonic() + 30  # the destination's RAM (a memfd) appears first
        while proc.poll() is None and time.monotonic() < deadline:
            if any(True for _ in memfd.holders("shmdirty-full_dst-ram0")):
                break
            time.sleep(0.005)
        def keep_full():   # and keeps it full: what the source frees at its end too
            with open("/dev/shm/filler", "wb") as f:
                while proc.poll() is None:
                    st = os.statvfs("/dev/shm")
                    if st.f_bavail:
                        try:
                            os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size,
                                               st.f_bavail * st.f_frsize)
                        except OSError:   # the run took some meanwhile: look again
                            pass
                    time.sleep(0.001)
        threading.Thread(target=keep_full, daemon=True).start()
"""


def test_a_hot_add_without_room_is_refused_and_the_guest_runs_on(tmp_path: Path) -> None:
    """In a private 40 MiB /dev/shm, once the destination's RAM exists, a
    filler takes all that is left and all that is freed: the bitmap cannot grow, so both hot-adds
    are refused (ShmFull, reported), the migration still ends identical
    (exit 0)."""
    js = tmp_path / "run.json"      # outside the full tmpfs
    script = textwrap.dedent(f"""\
        import json, os, subprocess, sys, time
        from pathlib import Path
        argv = {["migrate", "--guest", "sim", "--name", "full", *HOTADD_RUN]!r}
        proc = subprocess.Popen([sys.executable, "-m", "shmdirty.workers.cli", *argv,
                                 "--json", {str(js)!r}],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    """) + textwrap.dedent(FILL_SHM) + textwrap.dedent(f"""\
        out, err = proc.communicate(timeout=80)
        res = json.loads(Path({str(js)!r}).read_text())
        print(json.dumps({{"code": proc.returncode, "out": out, "err": err,
                          "refused": res["hotplug_refused"], "hotplug": res["hotplug"]}}))
    """)
    r = run_in_small_shm(script, size="40m", timeout=100)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["code"] == 0, got["out"] + got["err"]
    assert "Traceback" not in got["err"] and "refused" in got["out"], got["out"]
    assert [h["size"] for h in got["refused"]] == [1 << 20, 1 << 20] and got["hotplug"] == []
    assert all("bytes are free" in h["why"] for h in got["refused"]), got["refused"]


def test_a_guest_that_does_not_fit_is_refused_before_anything_starts() -> None:
    """A guest whose RAM and its copy do not fit the host's available memory
    (guest RAM is in memfds, not /dev/shm) is refused with exit 2 and one
    line with the numbers; nothing is made (checked in a private /dev/shm)."""
    ram = f"{2 * psutil.virtual_memory().total >> 20}M"
    script = textwrap.dedent(f"""\
        import json, os, subprocess, sys
        r = subprocess.run([sys.executable, "-m", "shmdirty.workers.cli", "migrate", "--guest",
                            "sim", "--name", "big", *{SMALL!r}, "--ram", {ram!r}],
                           capture_output=True, text=True, timeout=60)
        print(json.dumps({{"code": r.returncode, "err": r.stderr, "shm": os.listdir("/dev/shm")}}))
    """)
    r = run_in_small_shm(script, size="4m", timeout=90)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["code"] == 2 and got["shm"] == [], got
    err = got["err"]
    assert len(err.strip().splitlines()) == 1 and "MiB is available" in err, err
