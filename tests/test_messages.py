"""Every pipe of a run carries typed messages (workers/messages.py) or
reports (workers/reports.py), never bare strings or tuples: checked on the
sources of workers/ (every ``.send(...)`` argument), and the messages are
frozen, picklable dataclasses."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest

from shmdirty.workers import messages, reports

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(30)


def _classes(module: object) -> list[type]:
    return [c for c in vars(module).values()
            if isinstance(c, type) and c.__module__ == getattr(module, "__name__", "")]


def test_messages_and_reports_are_frozen_picklable_dataclasses() -> None:
    for c in _classes(messages) + _classes(reports):
        assert dataclasses.is_dataclass(c), c
        params = getattr(c, "__dataclass_params__", None)
        assert params is not None and params.frozen, f"{c.__name__} is not frozen"
    for msg in (messages.Go(), messages.Abort(), messages.LogSync(), messages.Synced(3, (1, 2)),
                messages.Stop(), messages.Stopped((), 0), messages.Cont(),
                messages.HandOver(), messages.Quit()):
        assert pickle.loads(pickle.dumps(msg)) == msg


def _sent_literals(path: Path) -> list[tuple[int, str]]:
    """(line, source) of every ``x.send(arg)`` whose argument is a string,
    a tuple, a dict or a number written in place: a message without a type."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "send" and len(node.args) == 1
                and isinstance(node.args[0], ast.Constant | ast.Tuple | ast.Dict | ast.JoinedStr)):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_pipe_carries_a_bare_string() -> None:
    # stream.Channel.send (the TCP stream of docs/STREAM.md) takes a record
    # type and payloads, never one bare argument: it is not matched here.
    bare = {str(p.relative_to(ROOT)): hits for p in sorted((ROOT / "workers").glob("*.py"))
            if (hits := _sent_literals(p))}
    assert bare == {}


def test_the_bare_string_check_sees_one(tmp_path: Path) -> None:
    p = tmp_path / "w.py"
    p.write_text('def f(conn):\n    conn.send("go")\n    conn.send(("ready", {}))\n')
    assert [line for line, _ in _sent_literals(p)] == [2, 3]
