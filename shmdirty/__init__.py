"""shmdirty: QEMU's RCU-protected dirty-page bitmap in POSIX shared memory.

The public surface, named once (README.md, "The library").
"""

from .dirty import (
    DIRTY_CLIENTS_ALL,
    DIRTY_CLIENTS_NOCODE,
    DIRTY_MEMORY_BLOCK_SIZE,
    DIRTY_MEMORY_CODE,
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_NUM,
    DIRTY_MEMORY_VGA,
    DirtyMemory,
    DirtySnapshot,
)
from .errors import (
    BadInput,
    CallbackFailed,
    CallbacksDropped,
    CoordinatorGone,
    CorruptSegment,
    GraceTimeout,
    HandleClosed,
    MapExists,
    MapNotFound,
    NoReaderSlot,
    NotCoordinator,
    RcuMisuse,
    ShmDirtyError,
    ShmFull,
)

__version__ = "0.1.0"

__all__ = [
    "DIRTY_CLIENTS_ALL",
    "DIRTY_CLIENTS_NOCODE",
    "DIRTY_MEMORY_BLOCK_SIZE",
    "DIRTY_MEMORY_CODE",
    "DIRTY_MEMORY_MIGRATION",
    "DIRTY_MEMORY_NUM",
    "DIRTY_MEMORY_VGA",
    "BadInput",
    "CoordinatorGone",
    "CorruptSegment",
    "DirtyMemory",
    "DirtySnapshot",
    "CallbackFailed",
    "CallbacksDropped",
    "GraceTimeout",
    "HandleClosed",
    "MapExists",
    "MapNotFound",
    "NoReaderSlot",
    "NotCoordinator",
    "RcuMisuse",
    "ShmDirtyError",
    "ShmFull",
]
