"""The coordinator (shmdirty/coordinator.py): who coordinates, publishing,
growth, both ends of hot-plug requests, adopt, and the serve loop.

The whole-block swap is take.py's (tests/test_take.py); retired blocks are
retired.py's (tests/test_retired.py).  Every wait has a timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from typing import Any

import err_workers as W
import pytest

import shmdirty as sd
from shmdirty import layout, segment

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0

PB = 12
PS = 1 << PB
BP = 64               # block_pages: small blocks, so MAX_BLOCKS is reachable
VGA = sd.DIRTY_MEMORY_VGA


def test_attach_in_the_creating_process_is_not_coordinator(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        a = sd.DirtyMemory.attach(map_name)
        assert dm.is_coordinator and not a.is_coordinator
        for call in (lambda: a.extend(1 << 20), lambda: a.ram_block_add(4096 * 64),
                     lambda: a.ram_block_remove(0), a.destroy, lambda: a.serve(None)):
            with pytest.raises(sd.NotCoordinator):
                call()
        assert dm.ram_size == 64 * 4096 and os.path.exists(
            os.path.join(segment.SHM_DIR, f"shmdirty-{map_name}-hdr"))
        a.close()
        u = pickle.loads(pickle.dumps(dm))   # an unpickled handle attaches: no role
        assert not u.is_coordinator
        with pytest.raises(sd.NotCoordinator):
            u.extend(1 << 20)
        u.close()
        dm.extend(128 * 4096)   # the creator still coordinates
        assert dm.ram_size == 128 * 4096
        # The creator leaves first: its process resigns; an attached handle adopts.
        b = sd.DirtyMemory.attach(map_name)
        dm.close()
        assert not b.is_coordinator
        c = sd.DirtyMemory.adopt(map_name)
        assert c.is_coordinator and not b.is_coordinator
        b.close()
        c.destroy()
    finally:
        for n in segment.list_segments(map_name):
            segment.unlink(n)


def test_timed_out_request_is_withdrawn(map_name: str) -> None:
    dm = sd.DirtyMemory.create(64 * 4096, block_pages=64, name=map_name)
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            got = pool.apply_async(W.timed_request, (map_name, 1 << 20, 0.2)).get(WAIT)
        assert got == "GraceTimeout"
        assert not dm.serve_once()          # nothing left to grant
        assert dm.ram_size == 64 * 4096
    finally:
        dm.destroy()


def _request_too_big(name: str, size: int, conn: Any) -> None:
    """Attach (not the coordinator) and request ``size``; report what happened."""
    try:
        dm = sd.DirtyMemory.attach(name)
        try:
            dm.request_extend(size, timeout=5.0)
            conn.send(("returned", None))
        except Exception as e:
            conn.send((type(e).__name__, isinstance(e, sd.BadInput)))
        finally:
            dm.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def test_request_beyond_max_blocks_is_refused_before_it_is_posted(
        map_name: str, spawn_ctx: Any, children: list[Any]) -> None:
    """request_extend() validated only the page size: a size needing more than
    MAX_BLOCKS blocks was posted to the header; the coordinator's serve_once()
    then raised BadInput on every call (the request is withdrawn only after
    extend() succeeds), so one bad request from any process killed serve()."""
    dm = sd.DirtyMemory.create(BP * PS, block_pages=BP, name=map_name)
    try:
        too_big = (sd.dirty.MAX_BLOCKS + 1) * BP * PS
        parent, child = spawn_ctx.Pipe(duplex=False)
        p = spawn_ctx.Process(target=_request_too_big, args=(map_name, too_big, child))
        p.start()
        children.append(p)
        child.close()
        assert parent.poll(WAIT), "the requester never reported"
        what, is_bad_input = parent.recv()
        p.join(WAIT)
        # Nothing was posted, and the coordinator's serve loop survives.
        assert dm._shared.header.words.load(layout.H_REQUEST) == 0
        assert dm.serve_once() is False
        assert (what, is_bad_input) == ("BadInput", True)
    finally:
        dm.destroy()
