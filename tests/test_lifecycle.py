"""Leaving a map, and the error for a map that is not there (issue 10,
parts 6 and 7).

- ``with sd.DirtyMemory.create(...) as dm:`` destroys the map on exit (it
  used to close, leaving every segment in /dev/shm); an attached handle's
  with-block closes it, and the map lives on.
- ``DirtyMemory.attach("nosuchmap")`` raises MapNotFound, a ShmDirtyError
  and a FileNotFoundError naming the map and suggesting ``shmdirty ls``
  (it used to say "corrupt").
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest

import shmdirty as sd
from shmdirty import segment

pytestmark = pytest.mark.timeout(60)


def test_with_create_destroys_on_exit(map_name: str) -> None:
    with sd.DirtyMemory.create(1 << 20, name=map_name) as dm:
        dm.set_dirty_flag(0, sd.DIRTY_MEMORY_VGA)
        assert segment.list_segments(map_name)
    assert segment.list_segments(map_name) == []
    with pytest.raises(sd.ShmDirtyError):
        dm.get_dirty_flag(0, sd.DIRTY_MEMORY_VGA)


def test_with_create_destroys_when_the_block_raises(map_name: str) -> None:
    with pytest.raises(KeyError), sd.DirtyMemory.create(1 << 20, name=map_name):
        raise KeyError("boom")
    assert segment.list_segments(map_name) == []


def test_with_attach_closes_and_the_map_lives_on(map_name: str) -> None:
    """(A guard that holds today.)"""
    coord = sd.DirtyMemory.create(1 << 20, name=map_name)
    try:
        with sd.DirtyMemory.attach(map_name) as dm:
            dm.set_dirty_flag(0, sd.DIRTY_MEMORY_VGA)
        with pytest.raises(sd.ShmDirtyError):
            dm.get_dirty_flag(0, sd.DIRTY_MEMORY_VGA)
        assert coord.get_dirty_flag(0, sd.DIRTY_MEMORY_VGA)
        assert segment.list_segments(map_name)
        # A handle unpickled in this process is an attached one: it closes too.
        with pickle.loads(pickle.dumps(coord)) as again:
            assert again.get_dirty_flag(0, sd.DIRTY_MEMORY_VGA)
        assert coord.is_coordinator and segment.list_segments(map_name)
    finally:
        coord.destroy()


@pytest.mark.parametrize("how", ["attach", "attach-qsbr", "adopt", "prefixed"])
def test_missing_map_raises_map_not_found(map_name: str, how: str) -> None:
    name = "shmdirty-" + map_name if how == "prefixed" else map_name
    calls: dict[str, Any] = {
        "attach": lambda: sd.DirtyMemory.attach(name),
        "attach-qsbr": lambda: sd.DirtyMemory.attach(name, flavor="qsbr"),
        "adopt": lambda: sd.DirtyMemory.adopt(name),
        "prefixed": lambda: sd.DirtyMemory.attach(name),
    }
    with pytest.raises(sd.MapNotFound) as info:
        calls[how]()
    e = info.value
    assert isinstance(e, sd.ShmDirtyError) and isinstance(e, FileNotFoundError)
    assert map_name in str(e) and "shmdirty ls" in str(e), str(e)
    assert "corrupt" not in str(e).lower()
    assert segment.list_segments(map_name) == []       # nothing was made
