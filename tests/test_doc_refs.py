"""Docs and docstrings name only files the repository has (issue 13): the
project's notes outside it (its design and style notes, the measured facts
about kernels and KVM, the workplace's ``shared/`` folder) are not shipped,
so a reader is told what they mean instead (e.g. "the seed patch",
"QEMU's ...") or pointed at a ``docs/`` file that exists.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
PLACES = ("shmdirty", "workers", "perf", "docs", "README.md")
SUFFIXES = {".py", ".md", ".c", ".S", ".toml"}
MD_NAME = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")


def _files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", *PLACES], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return [ROOT / f for f in listed if Path(f).suffix in SUFFIXES]


def _missing_refs(text: str, repo: set[str]) -> list[str]:
    """``.md`` names and ``shared/`` paths in ``text`` the repository lacks
    (a bare name counts if a file of that name exists anywhere in it)."""
    names = {Path(f).name for f in repo}
    bad = [m for m in MD_NAME.findall(text)
           if m.lstrip("./") not in repo and Path(m).name not in names]
    bad += re.findall(r"(?<![\w.-])shared/[\w./-]*", text)
    return bad


def test_docs_name_only_files_in_the_repository() -> None:
    repo = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.split())
    files = _files()
    assert any(f.name == "README.md" for f in files) and len(files) > 20
    bad = {str(f.relative_to(ROOT)): refs for f in files
           if (refs := _missing_refs(f.read_text(errors="replace"), repo))}
    assert not bad, bad


def test_a_missing_file_name_is_caught() -> None:
    repo = {"README.md", "docs/KVM_GUEST.md"}
    for text in ("see DESIGN.md section 2", "(KVM.md: immediate_exit)", "STYLE.md says",
                 "as KERNELS.md measured", "in /work/shared/seed/", "docs/NOPE.md"):
        assert _missing_refs(text, repo), text
    assert not _missing_refs("see docs/KVM_GUEST.md and README.md", repo)
