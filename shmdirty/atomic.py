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
from typing import Any, NamedTuple

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


class Op(NamedTuple):
    """Where one of patomic's op functions for 8-byte words is, and how each
    backend reaches it."""

    group: str   # its group in the package's Patomic.ops(8) table ("": the table
                 # itself; "arithmetic": ARITHMETIC_GROUP, per package)
    field: str   # the function pointer's field in that group
    cdecl: str   # its C type, as the cffi backend casts it (the word as uintptr_t)
    view: str    # the same op on the public backend: an atomicview method
    api: str     # the backend attribute (and kernel function) that runs it alone;
                 # "" if none ("or" serves only the batch loops and or_many)


_FETCH = "void(*)(uintptr_t, void *, int, void *)"
_VOID = "void(*)(uintptr_t, void *, int)"
_TEST = "int(*)(uintptr_t, int, int)"
# The one table of op names: patomic_ops() reads the addresses by it, the
# kernel's setup() takes exactly these names (its OP_NAMES), the kernel
# backend binds its functions by `api`, the cffi backend casts by `cdecl`, the
# public backend calls `view`.
OPS: dict[str, Op] = {
    "load": Op("", "fp_load", "void(*)(uintptr_t, int, void *)", "load", "load"),
    "store": Op("", "fp_store", _VOID, "store", "store"),
    "exchange": Op("xchg_ops", "fp_exchange", _FETCH, "exchange", "exchange"),
    "cmpxchg_strong": Op("xchg_ops", "fp_cmpxchg_strong",
                         "int(*)(uintptr_t, void *, void *, int, int)", "cmpxchg_strong",
                         "compare_exchange"),
    "or": Op("binary_ops", "fp_or", _VOID, "bin_or", ""),
    "fetch_or": Op("binary_ops", "fp_fetch_or", _FETCH, "bin_fetch_or", "fetch_or"),
    "fetch_and": Op("binary_ops", "fp_fetch_and", _FETCH, "bin_fetch_and", "fetch_and"),
    "fetch_add": Op("arithmetic", "fp_fetch_add", _FETCH, "fetch_add", "fetch_add"),
    "test_set": Op("bitwise_ops", "fp_test_set", _TEST, "bit_test_set", "bit_test_set"),
    "test_reset": Op("bitwise_ops", "fp_test_reset", _TEST, "bit_test_reset", "bit_test_reset"),
}
# The "arithmetic" group per package: atomics 1.0.3 has signed_ops /
# unsigned_ops, atomics2 1.1 one arithmetic_ops.
ARITHMETIC_GROUP = {"atomics": "unsigned_ops", "atomics2": "arithmetic_ops"}

# --- the contract between the kernel and the Python layer -------------------------------
# Declared once, here.  The kernel takes the two name tables with contract()
# when it is loaded (_kernel_bases) and refuses any other keys; the fields are
# C members of its bases; tests/test_kernel.py (test_the_kernel_contract_holds)
# checks both sides agree.
# ViewCore's C methods -> the Python path (a DirtyMemory method with the same
# signature, shmdirty/dirty.py) each hands a call it declines to, as it came.
KERNEL_SLOW_PATHS = {
    "set_dirty_flag": "_set_dirty_flag_py",
    "set_dirty_pages": "_set_dirty_pages_py",
    "get_dirty": "_get_dirty_py",
    "set_dirty_range": "_set_dirty_range_py",
    "test_and_clear_dirty": "_test_and_clear_dirty_py",
}
# What the kernel reads by name on Python objects -> the attribute.
KERNEL_ATTRIBUTES = {
    "block_base": "base",          # bitmap.Block: the int address of its first word
    "block_words": "words",        # bitmap.Block: its words (a writable buffer)
    "local_reader": "reader",      # TableView._local (a threading.local): this thread's Reader
    # TableView._table: RAM up to the first hole (table.Table.ram_prefix), in
    # bytes; the C fast paths take an address below it, hand any other to Python.
    "table_ram_size": "ram_prefix",
}
# Fields stored as C members of the kernel's bases, so that Python's stores
# to them are what the C reads: rcu.Reader's (ReaderCore) and
# view.TableView's (ViewCore; _local, _table, page_bits and block_pages are
# properties there, which cache what the C needs).  Without the kernel
# rcu.Reader lists READER_FIELDS in its own __slots__.
READER_FIELDS = ("slot", "nesting", "online", "seen", "section_words")
VIEW_FIELDS = ("_seen", "_blocks", "_flag_in_c", "_local", "_table", "page_bits", "block_pages")

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
    out = {}
    for name, op in OPS.items():
        group = ARITHMETIC_GROUP[dist] if op.group == "arithmetic" else op.group
        fp = getattr(getattr(ops, group) if group else ops, op.field)
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
        k.setup(patomic_ops())   # after _kernel_bases' contract(): at import
        self.batch = k
        for op in OPS.values():   # each single op is the kernel function of that name
            if op.api:
                setattr(self, op.api, getattr(k, op.api))
        self.fence = k.fence
        self.or_many = self._or_many
        self.take_many = self._take_many


class _CffiBackend(_Backend):
    """patomic's op functions called through cffi (no compiler needed)."""

    name = "cffi"

    def __init__(self) -> None:
        table = patomic_ops()
        # Every op of OPS as a cffi function pointer of its `cdecl`.  The word
        # is passed as uintptr_t: an address in an integer register, as a
        # `void *` is on every ABI patomic supports.
        c = {name: ffi.cast(op.cdecl, table[name]) for name, op in OPS.items()}
        c_load, c_store, c_xchg, c_cmpxchg = c["load"], c["store"], c["exchange"], \
            c["cmpxchg_strong"]
        c_or, c_or_void, c_and, c_add = c["fetch_or"], c["or"], c["fetch_and"], c["fetch_add"]
        c_set, c_reset = c["test_set"], c["test_reset"]

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
        for op in OPS.values():
            if op.api:
                setattr(self, op.api, self._op(op))
        self.or_many = self._or_many
        self.take_many = self._take_many
        self.fence = self._fence

    def _view(self, p: Ptr) -> Any:
        return self._atomics.atomicview(buffer=ffi.buffer(ffi.cast("char *", p), WORD),
                                        atype=self._atomics.UINT)

    def _op(self, op: Op) -> Callable[..., Any]:
        """The backend function ``op.api``: atomicview's ``op.view`` on a view of the word."""
        call, orders, view = op.view, self._orders, self._view
        if op.api == "load":
            def load(p: Ptr, order: int) -> int:
                with view(p) as v:
                    return int(getattr(v, call)(orders[order]))
            return load
        if op.api == "compare_exchange":
            def compare_exchange(p: Ptr, expected: int, desired: int, succ: int,
                                 fail: int) -> tuple[bool, int]:
                with view(p) as v:
                    r = getattr(v, call)(expected, desired, orders[succ], orders[fail])
                    return bool(r.success), int(r.expected)
            return compare_exchange
        # (word, value or bit, order): the value of fetch_add is taken modulo 2**64.
        mask = MASK64 if op.api == "fetch_add" else -1
        result: Callable[[Any], Any] = (bool if call.startswith("bit_test") else
                                        (lambda r: None) if op.api == "store" else int)

        def run(p: Ptr, arg: int, order: int) -> Any:
            with view(p) as v:
                return result(getattr(v, call)(arg & mask, orders[order]))
        return run


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
        slower = ("each atomic op is then a cffi call instead of a C call, many times slower, "
                  "and bulk calls lose the kernel's C loops")
    except Exception as exc:  # internals moved: stay correct, get slower
        why = exc
        chosen = _PublicBackend()
        slower = ("each atomic op then goes through the package's public API, hundreds of "
                  "times slower")
    warnings.warn(
        f"shmdirty: the compiled kernel is unavailable ({why}); using the {chosen.name} "
        f"backend: {slower} (docs/PERFORMANCE.md has the measurements).  Reinstall with a "
        "C compiler (gcc and the Python headers) for the kernel.",
        RuntimeWarning,
        stacklevel=2,
    )
    return chosen


def _kernel_bases() -> tuple[Any, Any]:
    """(ReaderCore, ViewCore): the kernel's C bases of rcu.Reader and
    view.TableView, whose set_dirty_flag runs in C; (object, object) where
    the kernel was not built.  Whether a handle uses it is decided when it is
    made, by the backend in use then (DirtyMemory._flag_in_c)."""
    try:
        k = importlib.import_module(f"{__package__}._kernel")
    except ImportError:
        return object, object
    # The names the C reads and calls, before anything can use it (setup too).
    k.contract(KERNEL_SLOW_PATHS, KERNEL_ATTRIBUTES)
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
"""The kernel's batch loops (shmdirty/_kernel_src/block.c, walk.c), or None on other
backends."""
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
