"""The one place perf/ reaches past shmdirty's public API, and why.

Everything else in perf/ measures shmdirty through ``import shmdirty`` (the
API of README.md).  The baselines and the micro rows are built from the
same parts shmdirty is built of, so that a ratio compares the locking
scheme, not two different ways to touch memory; these are those parts.
``tests/test_architecture.py`` checks that no other perf module imports a
shmdirty submodule.
"""

from __future__ import annotations

# The hardware atomics shmdirty uses: the `lock` and `atomics-api` baselines
# and the micro rows call the same op functions, and ``use_backend`` picks
# the backend (kernel, cffi, public) a row measures.
# The segment prefix and kinds: a baseline's bitmap sits where shmdirty's
# block words sit (same offset, same alignment); ``map_prefix`` names every
# perf segment like a map's, so `shmdirty gc` finds what a killed run left.
# Creating, attaching and unlinking segments: the baselines' own bitmaps are
# mapped by the same code as shmdirty's; ``check_map_name`` checks run names.
from shmdirty import atomic, layout, segment
from shmdirty.segment import Segment
from shmdirty.segment import unlink as unlink_segment

__all__ = ["Segment", "atomic", "layout", "segment", "unlink_segment"]
