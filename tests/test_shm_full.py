"""A /dev/shm too small for what is asked (issue 17.3): never SIGBUS.

Every segment is reserved (posix_fallocate) before it is written, so a
shortage is ShmFull (a ShmDirtyError and an OSError with errno ENOSPC)
naming the bytes needed and free; nothing half made stays; a failed
create, extend or hot-add request leaves the live map as it was and the
serve() loop serving.  Each case runs in a child with a private 4 MiB
/dev/shm (tests/small_shm.py; skipped where that cannot be made).
"""

from __future__ import annotations

import textwrap

import pytest
from small_shm import run_in_small_shm

pytestmark = pytest.mark.timeout(120)

PRELUDE = textwrap.dedent("""\
    import errno, os, threading, time
    import shmdirty as sd
    from shmdirty import layout
    from shmdirty.segment import Segment

    def shm():
        return sorted(os.listdir("/dev/shm"))

    def check(e):
        assert isinstance(e, sd.ShmDirtyError) and isinstance(e, OSError), type(e)
        assert e.errno == errno.ENOSPC, e.errno
        assert e.needed > e.free >= 0, (e.needed, e.free)
        assert f"{e.needed} bytes" in str(e) and f"{e.free} bytes" in str(e), str(e)
""")


def _run(body: str) -> str:
    r = run_in_small_shm(PRELUDE + textwrap.dedent(body))
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)   # -7 was SIGBUS
    assert "OK" in r.stdout, r.stdout
    return r.stdout


def test_a_segment_too_large_is_refused_and_not_left() -> None:
    _run("""
        try:
            Segment.create("shmdirty-big-b1", 8 << 20, layout.KIND_BLOCK)
        except sd.ShmFull as e:
            check(e)
            assert shm() == [], shm()
            print("OK", e)
    """)


def test_create_too_large_raises_shm_full_and_leaves_nothing() -> None:
    _run("""
        try:
            sd.DirtyMemory.create(64 << 30, name="full")
        except sd.ShmFull as e:
            check(e)
            assert shm() == [], shm()
            print("OK", e)
    """)


def test_extend_too_large_leaves_the_map_as_it_was() -> None:
    _run("""
        dm = sd.DirtyMemory.create(4 << 30, name="full")
        assert dm.test_and_clear_dirty(0, 4 << 30, sd.DIRTY_MEMORY_VGA)
        dm.set_dirty_flag(5 << 12, sd.DIRTY_MEMORY_VGA)
        before = (dm.generation, dm.ram_size, dm.table, shm())
        for size in (64 << 30, 48 << 30):
            try:
                dm.extend(size)
            except sd.ShmFull as e:
                check(e)
            else:
                raise SystemExit(f"extend({size:#x}) did not fail")
            assert (dm.generation, dm.ram_size, dm.table, shm()) == before
        assert dm.get_dirty_flag(5 << 12, sd.DIRTY_MEMORY_VGA)
        assert not dm.get_dirty_flag(6 << 12, sd.DIRTY_MEMORY_VGA)
        dm.extend(16 << 30)                        # what fits still grows
        assert dm.ram_size == 16 << 30 and dm.all_dirty(4 << 30, 12 << 30, 0)
        dm.destroy()
        assert shm() == [], shm()
        print("OK")
    """)


def test_a_refused_hot_add_request_is_reported_and_serve_keeps_serving() -> None:
    _run("""
        dm = sd.DirtyMemory.create(4 << 30, name="full")
        stop = threading.Event()
        failed = []
        def serve():
            try:
                dm.serve(stop)
            except BaseException as e:
                failed.append(e)
        th = threading.Thread(target=serve)
        th.start()
        other = sd.DirtyMemory.attach("full")
        t0 = time.monotonic()
        try:
            other.request_extend(64 << 30, timeout=20)
        except sd.ShmFull as e:
            check(e)
        else:
            raise SystemExit("granted?")
        assert time.monotonic() - t0 < 10        # reported, not timed out
        assert th.is_alive() and not failed, failed
        assert dm.ram_size == other.ram_size == 4 << 30
        other.request_extend(16 << 30, timeout=20)  # the loop still grants
        assert dm.ram_size == 16 << 30
        stop.set()
        th.join(20)
        assert not th.is_alive() and not failed, failed
        other.close()
        dm.destroy()
        assert shm() == [], shm()
        print("OK")
    """)


def test_a_whole_block_take_without_room_to_swap_takes_word_by_word() -> None:
    _run("""
        dm = sd.DirtyMemory.create(8 << 30, name="full")     # one block per client
        free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
        with open("/dev/shm/filler", "wb") as f:             # leave less than a block
            os.posix_fallocate(f.fileno(), 0, free - 64 * 1024)
        before = shm()
        assert dm.test_and_clear_dirty(0, 8 << 30, sd.DIRTY_MEMORY_VGA)
        assert not dm.get_dirty(0, 8 << 30, sd.DIRTY_MEMORY_VGA)
        assert dm.all_dirty(0, 8 << 30, sd.DIRTY_MEMORY_MIGRATION)
        assert shm() == before and dm.generation == 2        # nothing swapped, nothing made
        os.unlink("/dev/shm/filler")
        dm.destroy()
        print("OK")
    """)
