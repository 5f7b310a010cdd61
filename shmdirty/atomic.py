"""Hardware atomics on 64-bit words of shared buffers.

This is the only module that talks to the `atomics` package (or its
maintained fork `atomics2`) and to shmdirty's compiled kernel.  Every atomic
instruction is one of patomic's op functions, the ones the package ships;
``patomic_ops()`` reads their addresses from the package's 8-byte op table.
Three backends call them and give identical results:

- ``kernel``: ``shmdirty._kernel``, a small C extension built at install
  (optional: no compiler, no kernel).  A METH_FASTCALL call per op (tens of
  ns), and batch loops over a whole bitmap block (``batch``).
- ``cffi``: the same functions as cffi function pointers, about 1 us per op;
  batch work is the numpy + per-word loops of shmdirty.bitmap.
- ``public``: the package's public ``atomicview`` API, one view per op
  (about 25 us per op); used when the package is not a version whose
  internals were verified, or on request.

``SHMDIRTY_ATOMICS=kernel|cffi|public`` picks one (an unavailable choice is
an ImportError); unset, the first that works, with one RuntimeWarning at
import when that is not the kernel.  A word is named by its address, a
Python int (``Words.ptr(offset)`` checks it against its buffer), so hot
paths do their address arithmetic once and any backend can use any
address.  Every op takes an explicit C11 memory order; callers say in a
comment why they need it.
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
# Package -> version prefix whose internal op table this module was verified
# on (atomics2 1.1 renamed signed_ops / unsigned_ops to arithmetic_ops).
VERIFIED = {"atomics": "1.0.3", "atomics2": "1.1."}
VERIFIED_ATOMICS_VERSION = VERIFIED["atomics"]
BACKENDS = ("kernel", "cffi", "public")
# ns per fetch_or from Python, the micro rows of three `python -m perf --quick`
# runs on the loaded 2-core project machine (docs/PERFORMANCE.md, Results):
# the warning quotes them.
MEASURED_NS = {"kernel": (118, 201), "cffi": (1920, 2175)}

ffi = cffi.FFI()

Ptr = int  # the address of an 8-byte aligned word


def atomics_package() -> tuple[Any, str, str]:
    """The atomics package in use: (module, distribution name, version).

    ``atomics`` if installed, else its fork ``atomics2``; ImportError if neither."""
    for dist in VERIFIED:
        try:
            mod = importlib.import_module(dist)
        except ImportError:
            continue
        version = getattr(mod, "__version__", None)
        if version is None:
            try:
                version = _dist_version(dist)
            except PackageNotFoundError:
                version = "unknown"
        return mod, dist, str(version)
    raise ImportError("shmdirty needs the `atomics` package (or its fork `atomics2`)")


def patomic_ops() -> dict[str, int]:
    """Addresses of patomic's op functions for 8-byte words, from the atomics
    package's internal ``Patomic.ops(8)`` table: {name: address}.

    The one place that reads the table.  RuntimeError if the package is not a
    verified version (VERIFIED) or an op is missing.  The library stays
    loaded: the package caches it."""
    _, dist, version = atomics_package()
    if not version.startswith(VERIFIED[dist]):
        raise RuntimeError(f"{dist} {version}: the op table was verified on {dist} "
                           f"{VERIFIED[dist]}")
    patomic = importlib.import_module(f"{dist}._impl.patomic").Patomic
    ops = patomic.ops(WORD)
    # atomics 1.0.3: signed_ops / unsigned_ops; atomics2 1.1: arithmetic_ops.
    arith = ops.arithmetic_ops if hasattr(ops, "arithmetic_ops") else ops.unsigned_ops
    table = {
        "load": ops.fp_load, "store": ops.fp_store,
        "exchange": ops.xchg_ops.fp_exchange, "cmpxchg_strong": ops.xchg_ops.fp_cmpxchg_strong,
        "or": ops.binary_ops.fp_or, "fetch_or": ops.binary_ops.fp_fetch_or,
        "fetch_and": ops.binary_ops.fp_fetch_and, "fetch_add": arith.fp_fetch_add,
        "test_set": ops.bitwise_ops.fp_test_set, "test_reset": ops.bitwise_ops.fp_test_reset,
    }
    out = {}
    for name, fp in table.items():
        address = ctypes.cast(fp, ctypes.c_void_p).value
        if not address:
            raise RuntimeError(f"patomic ({dist} {version}) has no {name} for 8-byte words")
        out[name] = address
    return out


class _Scratch(threading.local):
    """Per-thread argument / result cells: cffi releases the GIL during a
    call, so a shared cell could be overwritten by another thread."""

    def __init__(self) -> None:
        self.cell = ffi.new("uint64_t[3]")


_scratch = _Scratch()


class _Backend:
    """One implementation of every op; each is a plain callable attribute."""

    name = "abstract"
    # The kernel's batch loops over one block (shmdirty.bitmap uses them),
    # or None: bitmap then uses numpy and the per-word ops below.
    batch: Any = None
    load: Callable[[Ptr, int], int]
    store: Callable[[Ptr, int, int], None]
    exchange: Callable[[Ptr, int, int], int]
    compare_exchange: Callable[[Ptr, int, int, int, int], tuple[bool, int]]
    fetch_or: Callable[[Ptr, int, int], int]
    fetch_and: Callable[[Ptr, int, int], int]
    fetch_add: Callable[[Ptr, int, int], int]
    bit_test_set: Callable[[Ptr, int, int], bool]
    bit_test_reset: Callable[[Ptr, int, int], bool]
    fence: Callable[[], None]
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

    def _fence(self) -> None:
        # A word no other process sees: a seq_cst read-modify-write on it is
        # a full fence (a locked instruction on x86-64, a barrier pair on
        # AArch64).
        self.fetch_add(_fence_ptr, 0, SEQ_CST)


class _KernelBackend(_Backend):
    """shmdirty._kernel: patomic's functions called from C."""

    name = "kernel"

    def __init__(self) -> None:
        # The compiled module, optional (ImportError when it was not built).
        k: Any = importlib.import_module(f"{__package__}._kernel")
        k.setup(patomic_ops())
        self.batch = k
        self.load = k.load
        self.store = k.store
        self.exchange = k.exchange
        self.compare_exchange = k.compare_exchange
        self.fetch_or = k.fetch_or
        self.fetch_and = k.fetch_and
        self.fetch_add = k.fetch_add
        self.bit_test_set = k.bit_test_set
        self.bit_test_reset = k.bit_test_reset
        self.fence = k.fence
        self.or_many = self._or_many
        self.take_many = self._take_many


class _CffiBackend(_Backend):
    """patomic's op functions called through cffi (no compiler needed)."""

    name = "cffi"

    def __init__(self) -> None:
        table = patomic_ops()

        def fn(name: str, sig: str) -> Any:
            # The word is passed as uintptr_t: an address in an integer
            # register, as a `void *` is on every ABI patomic supports.
            return ffi.cast(sig, table[name])

        fetch = "void(*)(uintptr_t, void *, int, void *)"
        c_load = fn("load", "void(*)(uintptr_t, int, void *)")
        c_store = fn("store", "void(*)(uintptr_t, void *, int)")
        c_xchg = fn("exchange", fetch)
        c_cmpxchg = fn("cmpxchg_strong", "int(*)(uintptr_t, void *, void *, int, int)")
        c_or = fn("fetch_or", fetch)
        c_or_void = fn("or", "void(*)(uintptr_t, void *, int)")
        c_and = fn("fetch_and", fetch)
        c_add = fn("fetch_add", fetch)
        c_set = fn("test_set", "int(*)(uintptr_t, int, int)")
        c_reset = fn("test_reset", "int(*)(uintptr_t, int, int)")

        # Plain closures, not methods: each op is one Python call around one
        # C call.  The per-thread cell carries arguments and results.
        scratch = _scratch

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
        self.fence = self._fence


class _PublicBackend(_Backend):
    """The same operations through ``atomicview``, one view per op."""

    name = "public"

    def __init__(self) -> None:
        self._atomics, _, _ = atomics_package()
        self._orders = {o: self._atomics.MemoryOrder(o) for o in _ORDERS}
        self.load = self._load
        self.store = self._store
        self.exchange = self._exchange
        self.compare_exchange = self._compare_exchange
        self.fetch_or = self._fetch_or
        self.fetch_and = self._fetch_and
        self.fetch_add = self._fetch_add
        self.bit_test_set = self._bit_test_set
        self.bit_test_reset = self._bit_test_reset
        self.or_many = self._or_many
        self.take_many = self._take_many
        self.fence = self._fence

    def _view(self, p: Ptr) -> Any:
        return self._atomics.atomicview(buffer=ffi.buffer(ffi.cast("char *", p), WORD),
                                        atype=self._atomics.UINT)

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


_CLASSES: dict[str, type[_Backend]] = {
    "kernel": _KernelBackend, "cffi": _CffiBackend, "public": _PublicBackend,
}


def available() -> list[str]:
    """The backends this process can use, fastest first."""
    out = []
    for name in BACKENDS:
        try:
            _CLASSES[name]()
        except Exception:
            continue
        out.append(name)
    return out


def _pick_backend() -> _Backend:
    want = os.environ.get("SHMDIRTY_ATOMICS", "")
    if want:
        if want not in _CLASSES:
            raise ImportError(f"SHMDIRTY_ATOMICS={want!r} is not one of {', '.join(BACKENDS)}")
        try:
            return _CLASSES[want]()
        except Exception as exc:
            raise ImportError(f"SHMDIRTY_ATOMICS={want}: that backend is unavailable "
                              f"({exc})") from exc
    try:
        return _KernelBackend()
    except ImportError:
        why: Exception | str = "shmdirty._kernel was not built at install (no C compiler?)"
    except Exception as exc:
        why = exc
    try:
        chosen: _Backend = _CffiBackend()
        (k_lo, k_hi), (c_lo, c_hi) = MEASURED_NS["kernel"], MEASURED_NS["cffi"]
        slower = (f"{c_lo // k_hi}-{c_hi // k_lo}x slower per atomic op (measured "
                  f"{c_lo}-{c_hi} ns per fetch_or against {k_lo}-{k_hi} ns on the kernel, "
                  "docs/PERFORMANCE.md), and bulk calls lose the kernel's C loops")
    except Exception as exc:  # internals moved: stay correct, get slower
        why = exc
        chosen = _PublicBackend()
        slower = "about 300x slower per atomic op"
    warnings.warn(
        f"shmdirty: the compiled kernel is unavailable ({why}); using the {chosen.name} "
        f"backend, {slower}.  Reinstall with a C compiler (gcc and the Python headers) "
        "for the kernel.",
        RuntimeWarning,
        stacklevel=2,
    )
    return chosen


def _kernel_bases() -> tuple[Any, Any]:
    """(ReaderCore, ViewCore): the kernel's C bases of rcu.Reader and
    table.TableView, whose set_dirty_flag runs in C; (object, object) where
    the kernel was not built.  Whether a handle uses it is decided when it is
    made, by the backend in use then (DirtyMemory._flag_in_c)."""
    try:
        k = importlib.import_module(f"{__package__}._kernel")
    except ImportError:
        return object, object
    return k.ReaderCore, k.ViewCore


READER_BASE, VIEW_BASE = _kernel_bases()


# A private word for _Backend._fence (its address stays fixed: cffi owns it).
_fence_cell = ffi.new("uint64_t[2]")
_fence_ptr: Ptr = int(ffi.cast("uintptr_t", _fence_cell))

backend: _Backend = _pick_backend()


def use_backend(name: str) -> _Backend:
    """Switch this process to backend ``name`` (tests, perf); ``fast`` is the
    cffi backend's old name.  Objects made before keep the ops they bound."""
    global backend
    name = "cffi" if name == "fast" else name
    if name not in _CLASSES:
        raise ValueError(f"atomics backend {name!r} is not one of {', '.join(BACKENDS)}")
    backend = _CLASSES[name]()
    _bind()
    return backend


def _bind() -> None:
    global load, store, exchange, compare_exchange, or_many, take_many, batch
    global fetch_or, fetch_and, fetch_add, bit_test_set, bit_test_reset, fence
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
    fence = backend.fence
    batch = backend.batch


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
fence: Callable[[], None]
"""A full memory fence (sequentially consistent)."""
batch: Any
"""The kernel's batch loops (shmdirty/_kernel.c), or None on other backends."""
_bind()


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
        self.base: Ptr = int(ffi.cast("uintptr_t", self._cbuf))
        if self.base % WORD:
            self.release()
            raise ValueError("buffer is not 8-byte aligned")

    def ptr(self, offset: int) -> Ptr:
        """The address of the word at ``offset``; ValueError if unaligned or outside."""
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
            self.base = 0


def _u64(value: int) -> int:
    if not isinstance(value, int) or not 0 <= value <= MASK64:
        raise ValueError(f"value {value!r} is not an unsigned 64-bit integer")
    return value


def _bit(bit: int) -> int:
    if not isinstance(bit, int) or not 0 <= bit < 64:
        raise ValueError(f"bit {bit!r} is not in [0, 63]")
    return bit
