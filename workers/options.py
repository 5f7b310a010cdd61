"""The command line's option types: each turns one option's text into a
value or raises argparse.ArgumentTypeError in plain words (argparse prints
``shmdirty migrate: error: argument --ram: 'inf' is not a size ...`` and
exits 2).  Numbers must be finite; sizes are whole pages.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any

from shmdirty import segment

# PAGE_BITS: the pages of `shmdirty migrate`
from .guest import DST_MAP_SUFFIX, MAX_MIGRATE_NAME, PAGE_BITS

__all__ = ["MAX_MIGRATE_NAME", "PAGE_BITS", "count", "fraction", "map_arg", "migrate_name_arg",
           "natural", "non_negative", "page_size_arg", "parse_schedule", "parse_size",
           "positive", "positive_whole", "whole", "writable_file"]

# --- sizes ------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def _finite(text: str) -> float:
    """A finite number, or an option error in plain words."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def parse_size(text: str) -> int:
    """``4096``, ``512K``, ``64M``, ``1G`` (binary units) -> bytes."""
    t = text.strip().upper()
    num = t.rstrip("BKMGI")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = math.nan
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    if unit not in _UNITS or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 512K, 64M, 1G")
    return int(value * _UNITS[unit])


def page_size_arg(text: str) -> int:
    size = parse_size(text)
    if size <= 0 or size % (1 << PAGE_BITS):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive multiple of the "
                                         f"{1 << PAGE_BITS}-byte page")
    return size


def parse_schedule(text: str) -> tuple[tuple[float, int], ...]:
    """``1:32M,2.5:16M`` -> ((1.0, 32 MiB), (2.5, 16 MiB)); ``none`` -> ()."""
    if text.strip().lower() in ("", "none", "off"):
        return ()
    out = []
    for item in text.split(","):
        at, sep, size = item.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = math.nan
        if not sep or not math.isfinite(seconds) or seconds < 0:
            raise argparse.ArgumentTypeError(
                f"hot-plug item {item!r} is not SECONDS:SIZE (e.g. 1.5:32M)")
        out.append((seconds, page_size_arg(size)))
    return tuple(sorted(out))


def whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_whole(text: str) -> int:
    v = whole(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return v


def count(text: str) -> int:
    v = whole(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def non_negative(text: str) -> float:
    v = _finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def positive(text: str) -> float:
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return v


def fraction(text: str) -> float:
    v = _finite(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return v


def writable_file(text: str) -> str:
    """A path this process can write (checked before the run starts)."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        why = "it is a directory"
    elif not folder.is_dir():
        why = f"directory {str(folder)!r} does not exist"
    elif path.exists() and not os.access(path, os.W_OK):
        why = "the file is not writable"
    elif not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        why = f"directory {str(folder)!r} is not writable"
    else:
        return text
    raise argparse.ArgumentTypeError(f"cannot write {text!r}: {why}")


def natural(name: str) -> list[Any]:
    """Sort key: digits as numbers (b2 before b10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def map_arg(text: str) -> str:
    """A map name: ``abc``, ``shmdirty-abc`` or one of its segment names."""
    try:
        return segment.check_map_name(text)
    except ValueError as e:
        m = segment.map_of(text)
        if m is not None:
            try:
                return segment.check_map_name(m)
            except ValueError:
                pass
        raise argparse.ArgumentTypeError(str(e)) from None


def migrate_name_arg(text: str) -> str:
    """``migrate --name``: a map name short enough that its loopback
    receiver's map (``<name>_dst``) has room for every segment name too."""
    name = map_arg(text)
    try:
        return segment.check_map_name(name, MAX_MIGRATE_NAME)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{e} (migrate: its receiver's map is <name>{DST_MAP_SUFFIX})") from None
