"""Pool tasks of tests/test_errors.py, test_pools.py and test_coordinator.py
(importable by spawned workers), and the error classes they raise."""

from __future__ import annotations

import inspect
from typing import Any

import shmdirty as sd

MIG = sd.DIRTY_MEMORY_MIGRATION
KEPT: dict[str, sd.DirtyMemory] = {}   # handles a pool worker keeps between tasks


def attach_and_dirty(name: str, page: int) -> int:
    """(pool task) Attach ``name`` once per worker, keep the handle, dirty ``page``."""
    dm = KEPT.get(name)
    if dm is None:
        dm = KEPT[name] = sd.DirtyMemory.attach(name)
    dm.set_dirty_flag(page << dm.page_bits, MIG)
    return page


def raise_error(cls_name: str, args: tuple[Any, ...]) -> None:
    """(pool task) Raise ``shmdirty.<cls_name>(*args)``."""
    raise getattr(sd, cls_name)(*args)


def timed_request(name: str, size: int, timeout: float) -> str:
    """(pool task) request_extend with nobody serving: the error's class name."""
    dm = sd.DirtyMemory.attach(name)
    try:
        dm.request_extend(size, timeout=timeout)
    except sd.ShmDirtyError as e:
        return type(e).__name__
    finally:
        dm.close()
    return "granted"


ERRORS = [getattr(sd, n) for n in sd.__all__
          if isinstance(getattr(sd, n), type) and issubclass(getattr(sd, n), sd.ShmDirtyError)]


def example(cls: type[sd.ShmDirtyError]) -> sd.ShmDirtyError:
    """An instance built the way the library builds it (its own parameters)."""
    if issubclass(cls, BaseExceptionGroup):   # CallbackFailed: what callbacks raised
        return cls("2 call_rcu callbacks raised", [KeyError("k"), ValueError("v")])
    if "__init__" in vars(cls):
        params = list(inspect.signature(cls).parameters)
        return cls(*[f"{p}-value" for p in params])
    return cls("something went wrong")
