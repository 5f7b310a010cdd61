"""`make mutation` (issue 17.6): mutmut over the protocol code, bounded.

mutmut (configured in pyproject.toml, [tool.mutmut]) copies the tree to
mutants/, runs the test selection once to learn which tests reach which
function, then runs each mutant against only the tests that reach its
function (`pytest -x -q -p no:cacheprovider`).  This driver picks the
mutants: every mutant of MODULES' functions listed (all of a module's if
the list is None), a seeded random sample of at most ``--per-module`` of
each module's (``--per-module 0``: all), runs them in chunks until
``--budget`` seconds are spent, and prints the score per module
(killed / tried; a timeout or a crash counts as killed: the test did not pass).
docs/TESTING.md records a run and argues the survivors.

    .venv/bin/python tests/mutation_run.py [--per-module N] [--seed S] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

MUTMUT = str(Path(sys.executable).with_name("mutmut"))
# module -> the functions (methods by name) that are protocol code; None: all.
MODULES: dict[str, list[str] | None] = {
    "grace": None,
    "rcu": None,
    "coordinator": ["publish", "grow", "adopt", "resign", "forget", "take_role", "drop_role",
                    "serve_once", "withdraw", "post", "reap_unreachable", "reap"],
    "take": None,
    "retired": None,
    "handles": ["acquire", "release", "finish", "_after_fork_in_child"],
}
# A timeout or a crash (mutmut: "segfault") is a kill too: the tests did not pass.
KILLED = {"killed", "timeout", "segfault"}
LINE = re.compile(r"^\s*(shmdirty\.(\w+)\.(\S+?)__mutmut_\d+): (.+)$")


def results() -> dict[str, str]:
    out = subprocess.run([MUTMUT, "results", "--all", "true"], capture_output=True, text=True,
                         check=False).stdout
    return {m.group(1): m.group(4).strip() for m in map(LINE.match, out.splitlines()) if m}


def function_of(name: str) -> str:
    # shmdirty.grace.xǁGracePeriodsǁwait__mutmut_3 -> wait; shmdirty.handles.x_acquire__mutmut_1
    # -> acquire
    tail = name.split(".", 2)[2].rsplit("__mutmut_", 1)[0]
    return tail.split("ǁ")[-1] if "ǁ" in tail else tail.removeprefix("x_")


def module_of(name: str) -> str:
    return name.split(".")[1]


def pick(all_names: list[str], per_module: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    chosen: list[str] = []
    for mod, funcs in MODULES.items():
        names = sorted(n for n in all_names if module_of(n) == mod
                       and (funcs is None or function_of(n) in funcs))
        if per_module and len(names) > per_module:
            names = sorted(rng.sample(names, per_module))
        chosen += names
    return chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-module", type=int, default=25)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--budget", type=float, default=1500.0)
    ap.add_argument("--chunk", type=int, default=10_000)
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: the score of the chosen mutants so far")
    args = ap.parse_args()
    t0 = time.monotonic()
    if args.report_only:
        return report(pick(sorted(results()), args.per_module, args.seed), t0)
    # Generates the mutants, learns which tests reach which function, checks
    # the selection passes unmutated; runs no mutant (no name matches).
    subprocess.run([MUTMUT, "run", "shmdirty.none.x_none__mutmut_0"], check=False,
                   stdout=subprocess.DEVNULL)
    chosen = pick(sorted(results()), args.per_module, args.seed)
    print(f"{len(chosen)} mutants chosen (seed {args.seed}, at most {args.per_module} "
          f"per module)", flush=True)
    for i in range(0, len(chosen), args.chunk):
        left = args.budget - (time.monotonic() - t0)
        if left <= 0:
            print(f"budget of {args.budget:.0f} s spent: {len(chosen) - i} mutants not run")
            break
        todo = [n for n, s in results().items() if n in set(chosen[i:i + args.chunk])
                and s == "not checked"]
        if todo:
            subprocess.run([MUTMUT, "run", *todo], check=False, stdout=subprocess.DEVNULL,
                           timeout=max(left, 60.0))
    return report(chosen, t0)


def report(chosen: list[str], t0: float) -> int:
    """Print and save (mutants/score.json) the score of ``chosen``."""
    res = results()
    score: dict[str, Counter[str]] = {}
    for n in chosen:
        c = score.setdefault(module_of(n), Counter())
        c[res.get(n, "missing")] += 1
    table = {m: {"killed": sum(v for k, v in c.items() if k in KILLED),
                 "tried": sum(v for k, v in c.items() if k != "not checked"), **c}
             for m, c in score.items()}
    survivors = sorted(n for n in chosen if res.get(n) == "survived")
    Path("mutants").mkdir(exist_ok=True)
    Path("mutants/score.json").write_text(json.dumps(
        {"table": table, "survivors": survivors, "seconds": time.monotonic() - t0}, indent=1))
    for m, row in table.items():
        print(f"{m:12s} killed {row['killed']:4d} / {row['tried']:4d}   {dict(score[m])}")
    print(f"{len(survivors)} survivors: `mutmut show NAME` for each; mutants/score.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
