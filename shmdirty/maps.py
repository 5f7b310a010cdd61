"""Looking at maps without attaching: status, who maps them, what gc may remove.

``map_status`` reads a map's header words directly: it claims no reader
slot and blocks nobody.  ``inspect_map`` attaches (one reader slot) only for
as long as it takes to count dirty pages.  ``collect`` removes the segments
of a map whose coordinator and readers are all dead, after a last look.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import atomic, layout, segment
from .dirty import (
    DIRTY_MEMORY_CODE,
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_NUM,
    DIRTY_MEMORY_VGA,
    DirtyMemory,
)
from .errors import CorruptSegment, NoReaderSlot, ShmDirtyError
from .rcu import GracePeriods, ReaderInfo, owner_alive
from .segment import Segment

CLIENT_NAMES = {DIRTY_MEMORY_VGA: "VGA", DIRTY_MEMORY_CODE: "CODE",
                DIRTY_MEMORY_MIGRATION: "MIGRATION"}


def mappers(names: Sequence[str]) -> dict[str, set[int]]:
    """For each /dev/shm name, the pids of live processes that map it."""
    paths = {f"{segment.SHM_DIR}/{n}": n for n in names}
    found: dict[str, set[int]] = {n: set() for n in names}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(segment.SHM_DIR + "/")
                    if i >= 0:
                        path = line[i:].rstrip("\n").removesuffix(" (deleted)")
                        if path in paths:
                            found[paths[path]].add(int(pid))
        except OSError:
            continue
    return found


@dataclass
class MapStatus:
    """What the header of a map says, read without claiming a reader slot."""

    name: str
    state: str                        # live | dead | unreadable | in use | absent
    why: str = ""
    segments: list[str] = field(default_factory=list)
    coordinator_pid: int = 0          # 0: none (it left)
    coordinator_alive: bool = False
    readers: list[ReaderInfo] = field(default_factory=list)
    max_readers: int = 0
    generation: int = 0
    grace_period: int = 0
    ram_size: int = 0
    request: int = 0
    page_bits: int = 0
    block_pages: int = 0
    tcg: bool = False
    error: ShmDirtyError | None = None  # why an unreadable header could not be read

    @property
    def garbage(self) -> bool:
        return self.state == "dead"


def _raw_prefix(name: str) -> tuple[int, int]:
    """(magic, layout version) of a segment, read as plain bytes."""
    try:
        with open(f"{segment.SHM_DIR}/{name}", "rb") as f:
            head = f.read(16)
    except OSError:
        return 0, 0
    head = head.ljust(16, b"\0")
    return int.from_bytes(head[:8], "little"), int.from_bytes(head[8:16], "little")


def map_status(name: str) -> MapStatus:
    """Classify a map: live (its coordinator or a reader is alive), dead
    (all gone: garbage), unreadable (another layout version, not ours...),
    in use (no readable header but a live process maps a segment), absent."""
    st = MapStatus(name, "absent", segments=segment.list_segments(name))
    if not st.segments:
        st.why = "no segments in /dev/shm"
        return st
    hdr_name = layout.header_name(name)
    if hdr_name not in st.segments:
        return _headerless(st, "has no header segment")
    try:
        hdr = Segment.attach(hdr_name, layout.KIND_HEADER, layout.HEADER_FIXED)
    except CorruptSegment as e:
        magic, _version = _raw_prefix(hdr_name)
        if magic == 0:  # creation never finished: garbage unless someone is at it
            return _headerless(st, "header was never completed")
        st.state, st.why, st.error = "unreadable", str(e), e
        return st
    try:
        w = hdr.words
        # The header's geometry is immutable after creation: relaxed loads.
        st.max_readers = w.load(layout.H_MAX_READERS, atomic.RELAXED)
        st.page_bits = w.load(layout.H_PAGE_BITS, atomic.RELAXED)
        st.block_pages = w.load(layout.H_BLOCK_PAGES, atomic.RELAXED)
        st.tcg = bool(w.load(layout.H_TCG, atomic.RELAXED))
        if hdr.size < layout.header_size(st.max_readers):
            st.state = "unreadable"
            st.why = f"header {hdr_name} is too small for {st.max_readers} reader slots"
            return st
        # acquire: the words the coordinator published with release / seq_cst.
        coord = w.load(layout.H_COORD, atomic.ACQUIRE)
        st.generation = w.load(layout.H_GENERATION, atomic.ACQUIRE)
        st.grace_period = w.load(layout.H_GP, atomic.ACQUIRE)
        st.ram_size = w.load(layout.H_RAM_SIZE, atomic.ACQUIRE)
        st.request = w.load(layout.H_REQUEST, atomic.ACQUIRE)
        st.readers = GracePeriods(hdr, st.max_readers).readers()
    finally:
        hdr.close()
    st.coordinator_pid = layout.owner_pid(coord) if coord else 0
    st.coordinator_alive = bool(coord) and owner_alive(coord)
    live = st.coordinator_alive or any(r.alive for r in st.readers)
    st.state = "live" if live else "dead"
    if not live:
        st.why = "coordinator and every reader are gone"
    return st


def _headerless(st: MapStatus, why: str) -> MapStatus:
    users = sorted(set().union(*mappers(st.segments).values()))
    if users:
        st.state, st.why = "in use", f"{why}; mapped by pid {', '.join(map(str, users))}"
    else:
        st.state, st.why = "dead", f"{why}; nobody maps it"
    return st


def segment_kinds(names: Sequence[str]) -> dict[str, int]:
    """How many segments of each role (``hdr``, ``t``, ``b``, ``ram``...)."""
    kinds: dict[str, int] = {}
    for n in names:
        role = layout.role_of(n)[0]
        kinds[role] = kinds.get(role, 0) + 1
    return kinds


# --- inspect ----------------------------------------------------------------------------
def inspect_map(name: str) -> dict[str, Any]:
    """Everything ``shmdirty inspect`` shows, as a dict.  Attaches (one
    reader slot) only while counting dirty pages; changes nothing else."""
    st = map_status(name)
    if st.state == "absent":
        raise LookupError(f"{name!r} is not a map: no shmdirty-{name}-* segment in "
                          f"{segment.SHM_DIR} (`shmdirty ls --all` lists the maps)")
    if st.state == "unreadable":
        raise st.error or ShmDirtyError(f"map {name}: {st.why}")
    info: dict[str, Any] = {
        "map": name, "state": st.state, "segments": st.segments,
        "segment_kinds": segment_kinds(st.segments),
    }
    if layout.header_name(name) not in st.segments or not st.max_readers:
        info["why"] = st.why
        return info
    info.update(
        layout_version=layout.LAYOUT_VERSION, page_bits=st.page_bits,
        page_size=1 << st.page_bits, block_pages=st.block_pages, tcg=st.tcg,
        max_readers=st.max_readers, generation=st.generation,
        grace_period_counter=st.grace_period, ram_size=st.ram_size, request=st.request,
        coordinator={"pid": st.coordinator_pid, "alive": st.coordinator_alive},
        readers=[r._asdict() for r in st.readers],
    )
    try:
        dm = DirtyMemory.attach(name)
    except NoReaderSlot as e:
        info["table_error"] = str(e)
        return info
    try:
        t = dm.table
        info.update(
            table_generation=t.generation,
            ram_blocks=[list(b) for b in dm.ram_blocks()],
            bitmap_blocks=t.num_blocks,
            dirty_pages={CLIENT_NAMES[c]: dm.dirty_pages(c) for c in range(DIRTY_MEMORY_NUM)},
        )
    finally:
        dm.close()
    return info


def collect(name: str) -> tuple[MapStatus, int]:
    """Remove every segment of map ``name`` if a last look (did anyone adopt
    it meanwhile?) still finds it dead; its status then and how many
    segments were removed."""
    st = map_status(name)
    if not st.garbage:
        return st, 0
    return st, sum(segment.unlink(n) for n in segment.list_segments(name))
