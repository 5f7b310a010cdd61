"""Byte offsets of every shared word, in one place.

Every segment opens with a 64-byte prefix (magic, layout version, kind,
size).  A change to anything in this file bumps LAYOUT_VERSION; attaching to
a segment of another version raises CorruptSegment.
"""

from __future__ import annotations

import os
import re
import secrets

from .errors import BadInput

LAYOUT_VERSION = 3   # 3: random parts in block ids and table names (issue 18.7)
MAGIC = int.from_bytes(b"SHMDIRTY", "little")
CACHE_LINE = 64
WORD = 8
PREFIX = "shmdirty-"

# Segment kinds.
KIND_HEADER = 1
KIND_TABLE = 2
KIND_BLOCK = 3
KIND_RAM = 4
KIND_NAMES = {KIND_HEADER: "header", KIND_TABLE: "table", KIND_BLOCK: "block",
              KIND_RAM: "ram"}

# --- prefix, first cache line of every segment ------------------------------
P_MAGIC = 0      # written last by the creator (release), checked on attach (acquire)
P_VERSION = 8    # written once before the magic
P_KIND = 16      # written once before the magic
P_SIZE = 24      # the segment's size in bytes, written once before the magic
P_ARG0 = 32      # kind-specific: block -> client of its table position; table -> generation
P_ARG1 = 40      # kind-specific: block -> block id
P_ARG2 = 48      # kind-specific: block -> index of its table position
# A block's position words are written by the coordinator before the table
# that places it is published, and read only by an adopter (after the writer
# died): relaxed.
PREFIX_BYTES = CACHE_LINE

# --- header segment ---------------------------------------------------------
# Immutable after creation (written before the magic, plain reads are fine).
H_PAGE_BITS = 64
H_BLOCK_PAGES = 72
H_TCG = 80
H_MAX_READERS = 88
# Each mutable word below has a cache line of its own (no false sharing).
H_GENERATION = 128   # coordinator stores (seq_cst) after the table is complete;
                     # every op loads it (seq_cst) after entering its section
H_TABLE_TAGS = 136   # two words, [generation % 2]: (generation << 32) | tag, the
                     # random part of that table's name; the coordinator stores
                     # it (release) before the generation, a reader loads it
                     # (acquire) after the generation and retries on a mismatch
H_GP = 192           # grace-period counter: synchronize fetch_adds (seq_cst),
                     # readers load it when they enter a section
H_COORD = 256        # coordinator's owner word (pid | start << 22); adopt CASes it
H_REQUEST = 320      # largest RAM size requested by request_extend (CAS max),
                     # read by the coordinator's serve loop (acquire)
H_REFUSED = 328      # the last request serve() could not grant (/dev/shm full):
                     # serve stores it (release) before withdrawing the request;
                     # a requester clears its own (CAS) before posting and raises
                     # ShmFull when it loads (acquire) its size here
H_RAM_SIZE = 384     # published RAM size: coordinator stores (release) after
                     # the table that holds it; requesters load (acquire)
H_NEXT_BLOCK = 448   # next unused block id: coordinator only (survives adoption)
H_SLOTS = 512        # reader slots start here, one cache line each
HEADER_FIXED = H_SLOTS

# --- reader slot (one cache line) -------------------------------------------
S_OWNER = 0   # 0 when free, else owner word; claimed/freed by CAS (acq_rel)
S_CTR = 8     # 0 outside a section, else the grace-period counter the reader
              # saw when it entered: reader stores it (seq_cst), waiters load it
SLOT_BYTES = CACHE_LINE


def header_size(max_readers: int) -> int:
    return H_SLOTS + SLOT_BYTES * max_readers


def slot_offset(slot: int) -> int:
    return H_SLOTS + SLOT_BYTES * slot


# --- owner word: pid and kernel start time packed so one CAS claims both ----
PID_BITS = 22  # Linux pid_max is at most 2**22


def owner_word(pid: int, start_ticks: int) -> int:
    return (start_ticks << PID_BITS) | pid


def owner_pid(word: int) -> int:
    return word & ((1 << PID_BITS) - 1)


def owner_start(word: int) -> int:
    return word >> PID_BITS


# --- table segment: immutable once its generation is published --------------
T_RAM_SIZE = 64
T_NUM_BLOCKS = 72
T_NUM_RAM_BLOCKS = 80
T_BLOCK_IDS = 128    # uint64[DIRTY_MEMORY_NUM][num_blocks], then the RAM list
                     # as uint64 (offset, size) pairs


def table_size(clients: int, num_blocks: int, num_ram_blocks: int) -> int:
    return T_BLOCK_IDS + WORD * (clients * num_blocks + 2 * num_ram_blocks)


# --- block segment: the bitmap words of one (client, block) -----------------
B_WORDS = CACHE_LINE  # bitmap word 0 starts at the second cache line


def block_size(block_pages: int) -> int:
    return B_WORDS + block_pages // 8


# --- names: every segment name is built and parsed here ---------------------
# ``shmdirty-<map>-<role><index>``: role ``hdr`` (no index), ``t`` (table of a
# generation, then ``.<tag>``: 8 random hex digits), ``b`` (bitmap block id),
# ``ram`` / ``dst`` (guest RAM block and its destination copy, workers/guest.py).
#
# Names a stranger cannot predict (issue 18.7): segments are created with
# O_EXCL in a directory every user may write, so a name known in advance
# could be squatted.  A block id carries a random part (``new_block_id``),
# the table records the ids; a table name carries a random tag, the header
# records it (``H_TABLE_TAGS``).  Creators retry on EEXIST with a fresh one.
#
# Guest RAM (``ram<index>`` / ``dst<index>``) is not in /dev/shm at all: it
# lives in memfds (workers/memfd.py), whose names nobody can squat, so it
# needs no tag; it is found through a live holder's /proc/<pid>/fd.
#
# The longest name (issue 17.4): the platform's NAME_MAX for /dev/shm minus
# ``shmdirty-``, the ``-`` and the longest role in /dev/shm: ``b`` and a
# block id below 2**63 (20 characters), or ``t``, a generation below 2**32,
# ``.`` and its tag (20).  A memfd name of the longest map
# (``dst4294967295``, 13) stays within memfd_create's 249 bytes.
BLOCK_ID_COUNTER_BITS = 32     # low bits of a block id: the header's counter
BLOCK_ID_RANDOM_BITS = 31      # high bits: random (ids stay below 2**63)
TABLE_TAG_BITS = 32
GENERATION_LIMIT = 1 << 32     # generations fit beside their tag in one word
LONGEST_ROLE = 20              # len("t4294967295.ffffffff"), len("b" + str(2**63 - 1))
MEMFD_NAME_MAX = 249           # memfd_create(2)


def _name_max() -> int:
    try:
        return min(os.pathconf("/dev/shm", "PC_NAME_MAX"), 255)
    except (OSError, ValueError):
        return 255   # Linux NAME_MAX


NAME_MAX = _name_max()
MAX_MAP_NAME = NAME_MAX - len(PREFIX) - 1 - LONGEST_ROLE
_MAP_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")
_ROLE_RE = re.compile(r"^([a-z]+)([0-9]*)(?:\.[0-9a-f]{8})?$")


def new_map_name() -> str:
    """A fresh random map name (the ``<map>`` of ``shmdirty-<map>-<role>``)."""
    return secrets.token_hex(6)


def check_map_name(name: str, max_len: int | None = None) -> str:
    """Accept ``abc`` or ``shmdirty-abc``; return ``abc``.  BadInput otherwise,
    and for a name longer than ``max_len`` (default MAX_MAP_NAME: the
    longest whose every segment name fits NAME_MAX)."""
    limit = MAX_MAP_NAME if max_len is None else max_len
    if isinstance(name, str) and name.startswith(PREFIX):
        name = name[len(PREFIX):]
    if not isinstance(name, str) or not _MAP_NAME_RE.match(name) or len(name) > limit:
        shown = name if not isinstance(name, str) or len(name) <= 40 else name[:37] + "..."
        length = f" ({len(name)} characters)" if isinstance(name, str) else ""
        raise BadInput(
            f"map name {shown!r}{length} must be 1 to at most {limit} characters of "
            f"letters, digits, '_' or '.' (its longest segment name must fit the "
            f"{NAME_MAX} characters of a /dev/shm name)"
        )
    return name


def map_prefix(map_name: str | None = None) -> str:
    """What every segment name of ``map_name`` (or of any map) starts with."""
    return PREFIX + (f"{map_name}-" if map_name is not None else "")


def map_of(segment_name: str) -> str | None:
    """The map name a segment name belongs to, or None if it is not ours."""
    if not segment_name.startswith(PREFIX):
        return None
    head, sep, _role = segment_name[len(PREFIX):].rpartition("-")
    return head if sep and head else None


def role_of(segment_name: str) -> tuple[str, int | None]:
    """(role, index) of a segment name: ``("t", 3)``, ``("hdr", None)``;
    ``("?", None)`` for a name of no known shape."""
    m = _ROLE_RE.match(segment_name.rsplit("-", 1)[-1])
    if m is None:
        return "?", None
    return m.group(1), int(m.group(2)) if m.group(2) else None


def new_block_id(counter: int) -> int:
    """A block id: the header's counter in the low bits, a random part above
    (a stranger cannot tell the next block's name)."""
    return (secrets.randbits(BLOCK_ID_RANDOM_BITS) << BLOCK_ID_COUNTER_BITS) | (
        counter & ((1 << BLOCK_ID_COUNTER_BITS) - 1))


def new_table_tag() -> int:
    """The random part of a table's name."""
    return secrets.randbits(TABLE_TAG_BITS)


def table_tag_word(generation: int, tag: int) -> int:
    """What ``H_TABLE_TAGS[generation % 2]`` holds for a published table."""
    return (generation << TABLE_TAG_BITS) | tag


def header_name(map_name: str) -> str:
    return f"{PREFIX}{map_name}-hdr"


def table_name(map_name: str, generation: int, tag: int) -> str:
    return f"{PREFIX}{map_name}-t{generation}.{tag:08x}"


def block_name(map_name: str, block_id: int) -> str:
    return f"{PREFIX}{map_name}-b{block_id}"


def ram_name(map_name: str, index: int) -> str:
    """The memfd of guest RAM block ``index`` (workers/memfd.py)."""
    return f"{PREFIX}{map_name}-ram{index}"


def dst_name(map_name: str, index: int) -> str:
    """The memfd of the destination copy of RAM block ``index``."""
    return f"{PREFIX}{map_name}-dst{index}"
