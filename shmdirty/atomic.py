"""Hardware atomics on 64-bit words of shared buffers.

This is the only module that talks to the `atomics` package.  Two backends
give identical results:

- ``fast``: patomic's compiled op table (the C functions behind every
  `atomics` view) called as cffi function pointers, with cffi pointer
  arithmetic for the address.  0.6 us per fetch_or in the `python -m perf`
  run of docs/PERFORMANCE.md.
- ``public``: the package's public ``atomicview`` API, one view per op.
  46 us per fetch_or in that run (78x the fast path); used when the
  internals are not the ones the fast path was verified on (``VERIFIED``:
  atomics 1.0.3, atomics2 1.1.x), or when ``SHMDIRTY_ATOMICS=public``.

A word is named by a cffi ``char *`` pointer (``Words.ptr(offset)``) so hot
paths do their address arithmetic once.  Every function takes an explicit
C11 memory order; callers say in a comment why they need it.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

import cffi

# C11 memory orders, with patomic's numbering (memory_order_consume unused).
RELAXED = 0
ACQUIRE = 2
RELEASE = 3
ACQ_REL = 4
SEQ_CST = 5

_ORDERS = (RELAXED, ACQUIRE, RELEASE, ACQ_REL, SEQ_CST)
WORD = 8
MASK64 = (1 << 64) - 1
# Package -> version prefix whose internal op table the fast path was
# verified on.  `atomics2` is the maintained fork (Python 3.12+ installs it
# instead of `atomics`); its 1.1 moved fetch_add into arithmetic_ops.
VERIFIED = {"atomics": "1.0.3", "atomics2": "1.1."}
VERIFIED_ATOMICS_VERSION = VERIFIED["atomics"]

ffi = cffi.FFI()

Ptr = Any  # a cffi `char *` to an 8-byte aligned word


def atomics_package() -> tuple[Any, str, str]:
    """The atomics package in use: (module, distribution name, version).

    ``atomics`` when installed, else its fork ``atomics2``; ImportError if neither."""
    for dist in VERIFIED:
        try:
            mod = importlib.import_module(dist)
        except ImportError:
            continue
        try:
            version = getattr(mod, "__version__", None) or _dist_version(dist)
        except PackageNotFoundError:
            version = "unknown"
        return mod, dist, str(version)
    raise ImportError("shmdirty needs the `atomics` package (or its fork `atomics2`)")


class _Scratch(threading.local):
    """Per-thread argument / result cells: cffi releases the GIL during a
    call, so a shared cell could be overwritten by another thread."""

    def __init__(self) -> None:
        self.cell = ffi.new("uint64_t[3]")


_scratch = _Scratch()


class _Backend:
    """One implementation of every op; each is a plain callable attribute."""

    name = "abstract"
    load: Callable[[Ptr, int], int]
    store: Callable[[Ptr, int, int], None]
    exchange: Callable[[Ptr, int, int], int]
    compare_exchange: Callable[[Ptr, int, int, int, int], tuple[bool, int]]
    fetch_or: Callable[[Ptr, int, int], int]
    fetch_and: Callable[[Ptr, int, int], int]
    fetch_add: Callable[[Ptr, int, int], int]
    bit_test_set: Callable[[Ptr, int, int], bool]
    bit_test_reset: Callable[[Ptr, int, int], bool]
    bit_test_set_raw: Callable[[Ptr, int, int], Any]  # bit_test_set minus the bool()
    # For callers that own a cell (a cffi uint64_t[1] no other thread uses):
    # store_cell(p, cell, order) stores cell[0]; load_cell(p, order, cell)
    # loads into cell[0].  On the fast backend these are the C functions.
    store_cell: Callable[[Ptr, Any, int], None]
    load_cell: Callable[[Ptr, int, Any], None]

    or_many: Callable[[Ptr, list[int], list[int], int], None]
    take_many: Callable[[Ptr, list[int], list[int], int], list[int]]

    def _or_many(self, base: Ptr, words: list[int], values: list[int], order: int) -> None:
        """OR values[i] into word words[i] after ``base``, one atomic each."""
        for w, v in zip(words, values, strict=True):
            self.fetch_or(base + (w << 3), v, order)

    def _take_many(self, base: Ptr, words: list[int], masks: list[int],
                   order: int) -> list[int]:
        """Take (return and clear) the bits masks[i] of word words[i]: an
        exchange for a full mask, a fetch_and otherwise."""
        out = []
        for w, m in zip(words, masks, strict=True):
            p = base + (w << 3)
            if m == MASK64:
                out.append(self.exchange(p, 0, order))
            else:
                out.append(self.fetch_and(p, ~m & MASK64, order) & m)
        return out


class _FastBackend(_Backend):
    """patomic's op table for 8-byte words, called through cffi."""

    name = "fast"

    def __init__(self) -> None:
        _, dist, _ = atomics_package()
        # the verified internals
        Patomic = importlib.import_module(f"{dist}._impl.patomic").Patomic
        ops = Patomic.ops(WORD)
        # atomics 1.0.3: unsigned_ops; atomics2 1.1: arithmetic_ops
        arithmetic = getattr(ops, "unsigned_ops", None) or ops.arithmetic_ops

        def fn(ctype_fp: Any, sig: str) -> Any:
            address = ctypes.cast(ctype_fp, ctypes.c_void_p).value
            if not address:
                raise RuntimeError(f"patomic has no {sig} for 8-byte words")
            return ffi.cast(sig, address)

        fetch = "void(*)(void *, void *, int, void *)"
        self._load = fn(ops.fp_load, "void(*)(void *, int, void *)")
        self._store = fn(ops.fp_store, "void(*)(void *, void *, int)")
        self._xchg = fn(ops.xchg_ops.fp_exchange, fetch)
        self._cmpxchg = fn(
            ops.xchg_ops.fp_cmpxchg_strong, "int(*)(void *, void *, void *, int, int)"
        )
        self._fetch_or = fn(ops.binary_ops.fp_fetch_or, fetch)
        self._or = fn(ops.binary_ops.fp_or, "void(*)(void *, void *, int)")
        self._fetch_and = fn(ops.binary_ops.fp_fetch_and, fetch)
        self._fetch_add = fn(arithmetic.fp_fetch_add, fetch)
        self._test_set = fn(ops.bitwise_ops.fp_test_set, "int(*)(void *, int, int)")
        self._test_reset = fn(ops.bitwise_ops.fp_test_reset, "int(*)(void *, int, int)")
        # The C functions themselves, for the hottest paths.
        self.bit_test_set_raw = self._test_set
        self.store_cell = self._store
        self.load_cell = self._load

        # Plain closures, not methods: each op is one Python call around one
        # C call.  The per-thread cell carries arguments and results.
        scratch = _scratch
        c_load, c_store, c_xchg = self._load, self._store, self._xchg
        c_cmpxchg, c_or, c_and, c_add = (self._cmpxchg, self._fetch_or,
                                         self._fetch_and, self._fetch_add)
        c_set, c_reset = self._test_set, self._test_reset

        def load(p: Ptr, order: int) -> int:
            c = scratch.cell
            c_load(p, order, c)
            return c[0]  # type: ignore[no-any-return]

        def store(p: Ptr, value: int, order: int) -> None:
            c = scratch.cell
            c[0] = value
            c_store(p, c, order)

        def fetcher(f: Any) -> Callable[[Ptr, int, int], int]:
            def op(p: Ptr, value: int, order: int) -> int:
                c = scratch.cell
                c[0] = value
                f(p, c, order, c + 1)
                return c[1]  # type: ignore[no-any-return]
            return op

        def compare_exchange(p: Ptr, expected: int, desired: int, succ: int,
                             fail: int) -> tuple[bool, int]:
            c = scratch.cell
            c[0] = expected
            c[1] = desired
            ok = c_cmpxchg(p, c, c + 1, succ, fail)
            return bool(ok), c[0]

        def fetch_add(p: Ptr, value: int, order: int) -> int:
            c = scratch.cell
            c[0] = value & MASK64
            c_add(p, c, order, c + 1)
            return c[1]  # type: ignore[no-any-return]

        def bit_test_set(p: Ptr, bit: int, order: int) -> bool:
            return bool(c_set(p, bit, order))

        def bit_test_reset(p: Ptr, bit: int, order: int) -> bool:
            return bool(c_reset(p, bit, order))

        c_or_void = self._or

        def or_many(base: Ptr, words: list[int], values: list[int], order: int) -> None:
            c = ffi.new("uint64_t[1]")
            for w, v in zip(words, values, strict=True):
                c[0] = v
                c_or_void(base + (w << 3), c, order)

        def take_many(base: Ptr, words: list[int], masks: list[int], order: int) -> list[int]:
            c = ffi.new("uint64_t[2]")
            out = []
            for w, m in zip(words, masks, strict=True):
                if m == MASK64:
                    c[0] = 0
                    c_xchg(base + (w << 3), c, order, c + 1)
                    out.append(c[1])
                else:
                    c[0] = ~m & MASK64
                    c_and(base + (w << 3), c, order, c + 1)
                    out.append(c[1] & m)
            return out

        self.or_many = or_many
        self.take_many = take_many
        self.load = load
        self.store = store
        self.exchange = fetcher(c_xchg)
        self.compare_exchange = compare_exchange
        self.fetch_or = fetcher(c_or)
        self.fetch_and = fetcher(c_and)
        self.fetch_add = fetch_add
        self.bit_test_set = bit_test_set
        self.bit_test_reset = bit_test_reset


class _PublicBackend(_Backend):
    """The same operations through ``atomics.atomicview``, one view per op."""

    name = "public"

    def __init__(self) -> None:
        atomics, _, _ = atomics_package()
        self._atomics = atomics
        self._orders = {o: atomics.MemoryOrder(o) for o in _ORDERS}
        self.load = self._load
        self.store = self._store
        self.exchange = self._exchange
        self.compare_exchange = self._compare_exchange
        self.fetch_or = self._fetch_or
        self.fetch_and = self._fetch_and
        self.fetch_add = self._fetch_add
        self.bit_test_set = self._bit_test_set
        self.bit_test_reset = self._bit_test_reset
        self.bit_test_set_raw = self._bit_test_set
        self.or_many = self._or_many
        self.take_many = self._take_many
        self.store_cell = lambda p, cell, order: self._store(p, int(cell[0]), order)

        def load_cell(p: Ptr, order: int, cell: Any) -> None:
            cell[0] = self._load(p, order)
        self.load_cell = load_cell

    def _view(self, p: Ptr) -> Any:
        return self._atomics.atomicview(buffer=ffi.buffer(p, WORD), atype=self._atomics.UINT)

    def _load(self, p: Ptr, order: int) -> int:
        with self._view(p) as v:
            return int(v.load(self._orders[order]))

    def _store(self, p: Ptr, value: int, order: int) -> None:
        with self._view(p) as v:
            v.store(value, self._orders[order])

    def _exchange(self, p: Ptr, value: int, order: int) -> int:
        with self._view(p) as v:
            return int(v.exchange(value, self._orders[order]))

    def _compare_exchange(
        self, p: Ptr, expected: int, desired: int, succ: int, fail: int
    ) -> tuple[bool, int]:
        with self._view(p) as v:
            r = v.cmpxchg_strong(expected, desired, self._orders[succ], self._orders[fail])
            return bool(r.success), int(r.expected)

    def _fetch_or(self, p: Ptr, value: int, order: int) -> int:
        with self._view(p) as v:
            return int(v.bin_fetch_or(value, self._orders[order]))

    def _fetch_and(self, p: Ptr, value: int, order: int) -> int:
        with self._view(p) as v:
            return int(v.bin_fetch_and(value, self._orders[order]))

    def _fetch_add(self, p: Ptr, value: int, order: int) -> int:
        with self._view(p) as v:
            return int(v.fetch_add(value & MASK64, self._orders[order]))

    def _bit_test_set(self, p: Ptr, bit: int, order: int) -> bool:
        with self._view(p) as v:
            return bool(v.bit_test_set(bit, self._orders[order]))

    def _bit_test_reset(self, p: Ptr, bit: int, order: int) -> bool:
        with self._view(p) as v:
            return bool(v.bit_test_reset(bit, self._orders[order]))


def _pick_backend() -> _Backend:
    if os.environ.get("SHMDIRTY_ATOMICS") == "public":
        return _PublicBackend()
    try:
        _, dist, version = atomics_package()
        if not version.startswith(VERIFIED[dist]):
            raise RuntimeError(f"{dist} {version}, fast path verified on "
                               f"{VERIFIED[dist].rstrip('.')}")
        return _FastBackend()
    except Exception as exc:  # internals moved: stay correct, get slower
        warnings.warn(
            f"shmdirty: atomics fast path unavailable ({exc}); using the public "
            "atomicview API (78x slower per fetch_or in the `python -m perf` run of "
            "docs/PERFORMANCE.md)",
            RuntimeWarning,
            stacklevel=2,
        )
        return _PublicBackend()


backend: _Backend = _pick_backend()


def use_backend(name: str) -> _Backend:
    """Switch this process to the ``fast`` or ``public`` backend (tests, perf)."""
    global backend, load, store, exchange, compare_exchange
    global fetch_or, fetch_and, fetch_add, bit_test_set, bit_test_reset
    if name not in ("fast", "public"):
        raise ValueError(f"atomics backend {name!r} is not 'fast' or 'public'")
    backend = _FastBackend() if name == "fast" else _PublicBackend()
    _bind()
    return backend


def _bind() -> None:
    global load, store, exchange, compare_exchange, or_many, take_many
    global fetch_or, fetch_and, fetch_add, bit_test_set, bit_test_reset
    load = backend.load
    store = backend.store
    or_many = backend.or_many
    take_many = backend.take_many
    exchange = backend.exchange
    compare_exchange = backend.compare_exchange
    fetch_or = backend.fetch_or
    fetch_and = backend.fetch_and
    fetch_add = backend.fetch_add
    bit_test_set = backend.bit_test_set
    bit_test_reset = backend.bit_test_reset


load: Callable[[Ptr, int], int]
store: Callable[[Ptr, int, int], None]
or_many: Callable[[Ptr, list[int], list[int], int], None]
take_many: Callable[[Ptr, list[int], list[int], int], list[int]]
exchange: Callable[[Ptr, int, int], int]
compare_exchange: Callable[[Ptr, int, int, int, int], tuple[bool, int]]
fetch_or: Callable[[Ptr, int, int], int]
fetch_and: Callable[[Ptr, int, int], int]
fetch_add: Callable[[Ptr, int, int], int]
bit_test_set: Callable[[Ptr, int, int], bool]
bit_test_reset: Callable[[Ptr, int, int], bool]
_bind()

# A word no other process sees: a seq_cst read-modify-write on it is a full
# fence (a locked instruction on x86-64, a barrier pair on AArch64).
_fence_cell = ffi.new("uint64_t[2]")
_fence_ptr = ffi.cast("char *", _fence_cell)


def new_cell() -> Any:
    """A private cffi uint64_t[1] for store_cell / load_cell."""
    return ffi.new("uint64_t[1]")


def fence() -> None:
    """A full memory fence (sequentially consistent)."""
    backend.fetch_add(_fence_ptr, 0, SEQ_CST)


class Words:
    """The 64-bit words of one writable buffer, addressed by byte offset.

    Holds a cffi reference to the buffer: call ``release()`` before the
    buffer's owner is closed, or the close raises BufferError.
    """

    def __init__(self, buffer: Any) -> None:
        mv = memoryview(buffer)
        if mv.readonly:
            raise ValueError("atomic words need a writable buffer")
        self.size = mv.nbytes
        mv.release()
        self._cbuf: Any = ffi.from_buffer("char[]", buffer, True)
        self.base: Ptr = ffi.cast("char *", self._cbuf)
        if int(ffi.cast("uintptr_t", self.base)) % WORD:
            self.release()
            raise ValueError("buffer is not 8-byte aligned")

    def ptr(self, offset: int) -> Ptr:
        """A pointer to the word at ``offset``; ValueError if unaligned or outside."""
        if self._cbuf is None:
            raise ValueError("atomic words used after release()")
        if not isinstance(offset, int) or offset % WORD or not 0 <= offset <= self.size - WORD:
            raise ValueError(
                f"word offset {offset!r} is not an 8-byte aligned offset in [0, {self.size - WORD}]"
            )
        return self.base + offset

    # Checked conveniences: each validates the offset before touching memory.
    def load(self, offset: int, order: int = ACQUIRE) -> int:
        return load(self.ptr(offset), order)

    def store(self, offset: int, value: int, order: int = RELEASE) -> None:
        store(self.ptr(offset), _u64(value), order)

    def exchange(self, offset: int, value: int, order: int = ACQ_REL) -> int:
        return exchange(self.ptr(offset), _u64(value), order)

    def compare_exchange(
        self, offset: int, expected: int, desired: int,
        succ: int = ACQ_REL, fail: int = ACQUIRE,
    ) -> tuple[bool, int]:
        return compare_exchange(self.ptr(offset), _u64(expected), _u64(desired), succ, fail)

    def fetch_or(self, offset: int, value: int, order: int = ACQ_REL) -> int:
        return fetch_or(self.ptr(offset), _u64(value), order)

    def fetch_and(self, offset: int, value: int, order: int = ACQ_REL) -> int:
        return fetch_and(self.ptr(offset), _u64(value), order)

    def fetch_add(self, offset: int, value: int, order: int = ACQ_REL) -> int:
        return fetch_add(self.ptr(offset), _u64(value), order)

    def bit_test_set(self, offset: int, bit: int, order: int = ACQ_REL) -> bool:
        return bit_test_set(self.ptr(offset), _bit(bit), order)

    def bit_test_reset(self, offset: int, bit: int, order: int = ACQ_REL) -> bool:
        return bit_test_reset(self.ptr(offset), _bit(bit), order)

    def release(self) -> None:
        """Drop the reference to the buffer (idempotent)."""
        if self._cbuf is not None:
            ffi.release(self._cbuf)
            self._cbuf = None
            self.base = None


def _u64(value: int) -> int:
    if not isinstance(value, int) or not 0 <= value <= MASK64:
        raise ValueError(f"value {value!r} is not an unsigned 64-bit integer")
    return value


def _bit(bit: int) -> int:
    if not isinstance(bit, int) or not 0 <= bit < 64:
        raise ValueError(f"bit {bit!r} is not in [0, 63]")
    return bit
