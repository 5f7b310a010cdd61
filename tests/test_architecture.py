"""The rooms of docs/ARCHITECTURE.md, checked: who imports whom, no import
circle, no symlink in the tree, module sizes in code lines, and every public
error a ShmDirtyError.

The import graph is read with ``ast`` (every ``import`` statement, also
those inside functions and under ``TYPE_CHECKING``), so a lazy import
cannot hide a circle or an upward import.
"""

from __future__ import annotations

import ast
import io
import subprocess
import tokenize
from pathlib import Path

import pytest

import shmdirty as sd

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shmdirty", "workers", "perf")

# shmdirty's layers, lowest first (docs/ARCHITECTURE.md): a module imports
# only modules before it.  errors, layout and atomic are the ground.
LAYERS = ("errors", "layout", "atomic", "segment", "grace", "rcu", "bitmap", "clients", "table",
          "view", "snapshot", "retired", "take", "coordinator", "handles", "dirty", "maps")
# Module size caps: code lines of a .py under shmdirty/ or workers/ (blank
# lines, comments and docstrings do not count: reaching the cap means a
# split, never a trimmed comment), lines of a C file under shmdirty/.
MAX_CODE_LINES = 400
MAX_C_LINES = 700

pytestmark = pytest.mark.timeout(60)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(project module, line) of every import statement of ``path``."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = _repo_name(f"{mod}.{a.name}")
                found.append((sub if sub in known else mod, node.lineno))
    found = [(_repo_name(m), line) for m, line in found]
    return [(m, line) for m, line in found if m in known and m != name]


def _repo_name(module: str) -> str:
    """workers/ and perf/ are installed as shmdirty.workers and shmdirty.perf
    (pyproject's package-dir): name them by their folders."""
    for installed, folder in (("shmdirty.workers", "workers"), ("shmdirty.perf", "perf")):
        if module == installed or module.startswith(installed + "."):
            return folder + module[len(installed):]
    return module


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_no_import_circle() -> None:
    g = {m: sorted({d for d, _ in deps}) for m, deps in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in g[m]:
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):]
                                                                    + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m)


def test_the_checker_sees_a_circle(tmp_path: Path) -> None:
    """The circle check is not vacuous: perf/harness.py <-> perf/micro.py
    (the circle issue 9 removed) is found, also as a lazy import."""
    code = "def f():\n    from .harness import run_prefix\n"
    known = {"perf.harness", "perf.micro"}
    p = tmp_path / "micro.py"
    p.write_text(code)
    assert imports_of("perf.micro", p, known) == [("perf.harness", 2)]


def test_library_layers_import_downward_only() -> None:
    g = graph()
    for i, low in enumerate(LAYERS):
        for dep, line in g[f"shmdirty.{low}"]:
            if dep == "shmdirty" or not dep.startswith("shmdirty."):
                continue
            other = dep.split(".", 1)[1]
            assert other in LAYERS[:i], (f"shmdirty/{low}.py:{line} imports {dep}, "
                                         "a layer at or above its own")
    assert set(LAYERS) | {"__init__"} == {p.stem for p in (ROOT / "shmdirty").glob("*.py")
                                          if p.stem != "py"}


def test_the_library_never_imports_workers_or_perf() -> None:
    """shmdirty/ is the library and nothing else: no import of workers/ or
    perf/ (by folder or installed name, lazy imports included), and the
    application's modules never reach the command line's."""
    g = graph()
    for name, deps in g.items():
        if name.split(".")[0] == "shmdirty":
            upward = [(d, line) for d, line in deps if d.split(".")[0] in ("workers", "perf")]
            assert upward == [], f"{name} imports {upward}"
    front = {"workers.cli", "workers.maps_cli", "workers.render", "workers.options"}
    for name, deps in g.items():  # perf/ and the run never reach the command line
        if name.startswith("perf") or (name.startswith("workers") and name not in front):
            assert not {d for d, _ in deps} & {"workers.cli", "workers.maps_cli"}, name
    assert [(d, line) for d, line in g["workers.cli"] if d == "workers.app"], \
        "the command line reaches the application through workers.app"


def test_perf_uses_the_public_api_but_for_its_internals_module() -> None:
    """perf/ measures shmdirty through ``import shmdirty``; the internals it
    measures are imported in one place, perf/internals.py, each with why."""
    for name, deps in graph().items():
        if name.startswith("perf") and name != "perf.internals":
            inner = [(d, line) for d, line in deps if d.startswith("shmdirty.")]
            assert inner == [], f"{name} imports {inner}: add it to perf/internals.py"


def test_the_upward_check_sees_installed_names(tmp_path: Path) -> None:
    """An import of the installed name (shmdirty.workers, shmdirty.perf) is
    seen as an import of the folder, also when it is lazy."""
    p = tmp_path / "dirty.py"
    p.write_text("def f():\n    from shmdirty.workers import app\n"
                 "    import shmdirty.perf.harness\n")
    known = {"shmdirty.dirty", "workers.app", "perf.harness"}
    assert imports_of("shmdirty.dirty", p, known) == [("workers.app", 2), ("perf.harness", 3)]


def test_no_symlink_in_the_tree() -> None:
    """No symlink is tracked by git (mode 120000) or lies in the source folders."""
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-s"], capture_output=True,
                       text=True, timeout=30)
    if r.returncode == 0:
        links = [line.split("\t")[1] for line in r.stdout.splitlines()
                 if line.startswith("120000 ")]
        assert links == [], f"symlinks tracked by git: {links}"
    for pkg in (*PACKAGES, "tests"):
        links = [str(p.relative_to(ROOT)) for p in (ROOT / pkg).rglob("*") if p.is_symlink()]
        assert links == [], f"symlinks in the tree: {links}"


def code_lines(text: str) -> int:
    """Lines holding code: blank lines, comments and docstrings (any string
    statement) do not count; a line of code that holds a string does."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER, tokenize.STRING}
    return len({t.start[0] for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type not in skip})


def test_code_lines_are_counted_as_code() -> None:
    text = '"""doc\n\nmore"""\n\n# a comment\nx = 1  # counted\ny = (\n    "s"\n)\n'
    assert code_lines(text) == 3   # x = 1, y = (, )


def test_modules_stay_small() -> None:
    """No module under shmdirty/ or workers/ over MAX_CODE_LINES code lines,
    no C file under shmdirty/ over MAX_C_LINES lines."""
    big = []
    for pkg in ("shmdirty", "workers"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            n = code_lines(path.read_text())
            if n > MAX_CODE_LINES:
                big.append(f"{path.relative_to(ROOT)}: {n} code lines")
    for path in sorted((ROOT / "shmdirty").rglob("*.c")):
        n = len(path.read_text().splitlines())
        if n > MAX_C_LINES:
            big.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert big == [], "split these by idea: " + "; ".join(big)


def test_every_library_module_has_its_test_file() -> None:
    """tests/ mirrors the modules: shmdirty/<m>.py is tested in tests/test_<m>.py."""
    missing = [p.name for p in sorted((ROOT / "shmdirty").glob("*.py"))
               if p.stem != "__init__" and not (ROOT / "tests" / f"test_{p.stem}.py").exists()]
    assert missing == [], f"library modules without tests/test_<module>.py: {missing}"


def test_bad_map_name_is_a_shmdirty_error() -> None:
    with pytest.raises(sd.ShmDirtyError) as ei:
        sd.DirtyMemory.attach("bad name!")
    assert isinstance(ei.value, sd.BadInput) and isinstance(ei.value, ValueError)
    with pytest.raises(sd.BadInput):
        sd.DirtyMemory.create(0, name="no/slashes")
    with pytest.raises(sd.BadInput):
        sd.DirtyMemory.adopt("")


def test_every_public_error_is_a_shmdirty_error() -> None:
    from shmdirty import errors

    classes = [v for v in vars(errors).values()
               if isinstance(v, type) and issubclass(v, Exception)]
    assert {c.__name__ for c in classes} >= {"CoordinatorGone", "RcuMisuse", "BadInput"}
    for c in classes:
        assert issubclass(c, sd.ShmDirtyError), c
    assert issubclass(sd.RcuMisuse, RuntimeError)
    assert sd.CoordinatorGone.__module__ == "shmdirty.errors"
