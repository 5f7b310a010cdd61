"""This process's maps: what every handle of one map shares, counted, and
what becomes of it across fork().

One ``MapState`` per map per process: the header mapping, the Rcu (one
reader per thread, rcu.py) and the coordinator's state.  Handles take a
reference (``acquire``) and give it back (``release``); the last one out
closes the Rcu (every thread's slot) and unmaps the header.

fork(): a child inherits the states and its handles stay usable (its
threads' readers claim slots of their own, rcu.py); an at-fork handler
gives the child fresh locks and drops the parent's coordinator work.
"""

from __future__ import annotations

import os
import threading

from . import atomic, layout, segment
from .coordinator import Shared
from .errors import BadInput, CorruptSegment, MapNotFound
from .rcu import Closed, Rcu
from .segment import Segment


class MapState:
    """What every handle of one map in this process shares."""

    def __init__(self, header: Segment, rcu: Rcu) -> None:
        self.header = header
        self.rcu = rcu
        self.refs = 0          # open handles (guarded by ``lock``)
        self.coord = Shared()


states: dict[str, MapState] = {}
# Guards ``states`` and every MapState's refs.  Referenced as
# ``handles.lock``, never imported by value: a forked child gets a new one.
lock = threading.Lock()
# Held while an unpickled handle attaches on its first use (dirty.py
# _Unattached); another thread's first use waits for it.  Likewise renewed.
attach_lock = threading.RLock()


def open_header(name: str) -> Segment:
    """Map the header of ``name``: MapNotFound if there is none,
    CorruptSegment if it is not a whole header of this layout."""
    hname = layout.header_name(name)
    try:
        hdr = Segment.attach(hname, layout.KIND_HEADER, layout.HEADER_FIXED)
    except CorruptSegment:
        if hname not in segment.list_segments(name):
            raise MapNotFound(name) from None
        raise
    readers = hdr.words.load(layout.H_MAX_READERS, atomic.RELAXED)
    if hdr.size < layout.header_size(readers):
        hdr.close()
        raise CorruptSegment(hname, f"is {hdr.size} bytes, too small for "
                             f"{readers} reader slots")
    return hdr


def acquire(name: str, flavor: str, header: Segment | None = None) -> MapState:
    """A reference to this process's state of ``name``, made (from
    ``header``, or by attaching it) if this process has none yet."""
    with lock:
        st = states.get(name)
        if st is not None:
            if header is not None:
                header.close()
            if st.rcu.flavor != flavor:
                raise BadInput(f"this process already reads map {name} as {st.rcu.flavor}")
            st.refs += 1
            return st
    hdr = open_header(name) if header is None else header
    readers = hdr.words.load(layout.H_MAX_READERS, atomic.RELAXED)
    with lock:
        st = states.get(name)
        if st is not None:  # another thread attached meanwhile
            hdr.close()
            st.refs += 1
            return st
        try:
            st = states[name] = MapState(hdr, Rcu(hdr, readers, flavor))
        except BaseException:
            hdr.close()
            raise
        st.refs += 1
        return st


def release(name: str, st: MapState) -> bool:
    """Give a reference back (call with ``lock`` held).  The last one frees
    every thread's slot and returns True: the caller then calls finish()
    (without ``lock``: callbacks may attach maps)."""
    st.refs -= 1
    if st.refs:
        return False
    if states.get(name) is st:
        del states[name]
    st.rcu.leave()   # every thread's slot
    return True


def finish(st: MapState, timeout: float | None) -> None:
    """After the last release(): run the callbacks that can run (Rcu.finish:
    CallbackFailed, CallbacksDropped), unmap the header."""
    try:
        st.rcu.finish(timeout)
    finally:
        st.header.close()


def known(name: str) -> MapState | None:
    """This process's state of ``name``, if it has one."""
    with lock:
        return states.get(name)


# Stands in for the Rcu, the thread-local readers and the Coordinator of a
# closed handle (rcu.Closed): every use fails clearly.
CLOSED = Closed()


def _after_fork_in_child() -> None:
    """The parent's lock may have been held by a thread the child has not
    got; its coordinator work (pooled and retired blocks) is the parent's."""
    global lock, attach_lock
    lock = threading.Lock()
    attach_lock = threading.RLock()
    for st in states.values():
        st.coord.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
