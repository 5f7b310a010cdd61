/*
 * shmdirty._kernel: shmdirty's compiled atomic kernel.
 *
 * Every atomic instruction here is one of patomic's op functions, the ones
 * the `atomics` (or `atomics2`) package ships: shmdirty/atomic.py takes
 * their addresses from the package's 8-byte op table at import and hands
 * them to setup() once.  Nothing is linked against patomic; the package
 * keeps its library loaded.  What this file adds is the call: a
 * METH_FASTCALL function costs tens of ns where a cffi call costs ~1 us, and
 * the batch loops below walk a whole bitmap block in C.
 *
 * Addresses are Python ints (shmdirty.atomic.Words.ptr() checks them
 * against their buffer); here they are checked for alignment.  Batch ops
 * take the block's buffer (its numpy words), check every index, count and
 * order first and raise ValueError before touching memory, then release
 * the GIL while they hold the buffer.
 *
 * Bit b of a block is bit b % 64 of word b / 64 (KVM's little-endian
 * dirty log).  Memory orders use patomic's (C11's) numbering.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

/* patomic's explicit op signatures (include/patomic/api/ops/explicit.h). */
typedef void (*op_store_t)(volatile void *obj, const void *desired, int order);
typedef void (*op_load_t)(const volatile void *obj, int order, void *ret);
typedef void (*op_void_t)(volatile void *obj, const void *arg, int order);
typedef void (*op_fetch_t)(volatile void *obj, const void *arg, int order, void *ret);
typedef int (*op_cmpxchg_t)(volatile void *obj, void *expected, const void *desired,
                            int succ, int fail);
typedef int (*op_test_modify_t)(volatile void *obj, int offset, int order);

enum { RELAXED = 0, CONSUME = 1, ACQUIRE = 2, RELEASE = 3, ACQ_REL = 4, SEQ_CST = 5 };
#define ONES (~(uint64_t)0)
/* Batch loops over more words than this release the GIL. */
#define GIL_WORDS 64

static struct {
    op_load_t load;
    op_store_t store;
    op_fetch_t exchange;
    op_cmpxchg_t cmpxchg;
    op_void_t or_;
    op_fetch_t fetch_or;
    op_fetch_t fetch_and;
    op_fetch_t fetch_add;
    op_test_modify_t test_set;
    op_test_modify_t test_reset;
} ops;
static int ready;

/* The names setup() takes, in the order of the struct above. */
static const char *const op_names[] = {"load", "store", "exchange", "cmpxchg_strong",
                                       "or", "fetch_or", "fetch_and", "fetch_add",
                                       "test_set", "test_reset"};
#define NOPS (sizeof(op_names) / sizeof(op_names[0]))

/* A word no other process sees: a seq_cst read-modify-write on it is a full
 * fence (as shmdirty.atomic.fence does from Python). */
static uint64_t fence_word;
static PyObject *str_base, *str_words;

static void full_fence(void)
{
    uint64_t zero = 0, old;
    ops.fetch_add(&fence_word, &zero, SEQ_CST, &old);
}

/* ---- argument checks --------------------------------------------------------- */

static int not_ready(void)
{
    if (!ready) {
        PyErr_SetString(PyExc_RuntimeError, "shmdirty._kernel: setup() was not called");
        return 1;
    }
    return 0;
}

static int nargs_ok(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return 0;
    }
    return 1;
}

/* An unsigned 64-bit value: TypeError if not an int, ValueError if outside. */
static int get_u64(PyObject *o, const char *what, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(o)->tp_name);
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s %R is not an unsigned 64-bit integer", what, o);
        return 0;
    }
    *out = (uint64_t)v;
    return 1;
}

/* A non-negative index (a bit or word number, a count). */
static int get_index(PyObject *o, const char *what, Py_ssize_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(o)->tp_name);
        return 0;
    }
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        v = -1;
    }
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s %R is not a non-negative index", what, o);
        return 0;
    }
    *out = v;
    return 1;
}

/* A word address: an 8-byte aligned, non-null int. */
static int get_addr(PyObject *o, volatile uint64_t **out)
{
    uint64_t a;
    if (!get_u64(o, "address", &a))
        return 0;
    if (a == 0 || (a & 7)) {
        PyErr_Format(PyExc_ValueError, "address 0x%llx is not an 8-byte aligned word address",
                     (unsigned long long)a);
        return 0;
    }
    *out = (volatile uint64_t *)(uintptr_t)a;
    return 1;
}

enum { ORD_LOAD, ORD_STORE, ORD_RMW };

static int get_order(PyObject *o, int kind, int *out)
{
    long v = PyLong_Check(o) ? PyLong_AsLong(o) : -1;
    if (v == -1 && PyErr_Occurred())
        PyErr_Clear();
    int ok;
    switch (kind) {
    case ORD_LOAD: ok = v == RELAXED || v == CONSUME || v == ACQUIRE || v == SEQ_CST; break;
    case ORD_STORE: ok = v == RELAXED || v == RELEASE || v == SEQ_CST; break;
    default: ok = v >= RELAXED && v <= SEQ_CST; break;
    }
    if (!ok) {
        static const char *const kinds[] = {"load", "store", "read-modify-write"};
        PyErr_Format(PyExc_ValueError, "memory order %R is not valid for a %s", o, kinds[kind]);
        return 0;
    }
    *out = (int)v;
    return 1;
}

/* The order of the plain all-ones stores of a set with RMW order `order`:
 * release if the caller's order releases (the final fence then orders them
 * before what follows), relaxed otherwise. */
static int store_order(int order)
{
    return order >= RELEASE ? RELEASE : RELAXED;
}

/* The words of a block: a writable, C-contiguous, 8-byte aligned buffer. */
typedef struct {
    Py_buffer view;
    volatile uint64_t *w;
    Py_ssize_t n;  /* words */
} block_t;

static int get_block(PyObject *o, block_t *b)
{
    if (PyObject_GetBuffer(o, &b->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        if (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError,
                         "block must be a writable C-contiguous buffer, not %.100s",
                         Py_TYPE(o)->tp_name);
        }
        return 0;
    }
    if ((uintptr_t)b->view.buf & 7 || b->view.len % 8) {
        PyErr_SetString(PyExc_ValueError,
                        "block buffer is not 8-byte aligned or not a whole number of words");
        PyBuffer_Release(&b->view);
        return 0;
    }
    b->w = (volatile uint64_t *)b->view.buf;
    b->n = b->view.len / 8;
    return 1;
}

/* A read-only C-contiguous buffer of 8-byte integers. */
static int get_int64s(PyObject *o, const char *what, Py_buffer *view)
{
    if (PyObject_GetBuffer(o, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous array of 64-bit integers",
                     what);
        return 0;
    }
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    if (view->itemsize != 8 || strlen(f) != 1 || !strchr("qQlLnN", *f)) {
        PyErr_Format(PyExc_ValueError, "%s must hold 64-bit integers, not format %s", what,
                     view->format ? view->format : "B");
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

/* Bits [first, first + count) inside a block of n words. */
static int range_ok(Py_ssize_t first, Py_ssize_t count, Py_ssize_t nwords)
{
    if (first > nwords * 64 || count > nwords * 64 - first) {
        PyErr_Format(PyExc_ValueError, "bits [%zd, %zd + %zd) are outside the block's %zd bits",
                     first, first, count, nwords * 64);
        return 0;
    }
    return 1;
}

/* Mask of word w's bits inside [first, end); w0 = first / 64, w1 = (end - 1) / 64. */
static inline uint64_t word_mask(Py_ssize_t w, Py_ssize_t w0, Py_ssize_t w1, Py_ssize_t first,
                                 Py_ssize_t end)
{
    uint64_t m = ONES;
    if (w == w0)
        m &= ONES << (first & 63);
    if (w == w1)
        m &= ONES >> (63 - ((end - 1) & 63));
    return m;
}

/* ---- setup --------------------------------------------------------------------- */

static PyObject *k_setup(PyObject *self, PyObject *table)
{
    void *fp[NOPS];
    if (!PyDict_Check(table)) {
        PyErr_SetString(PyExc_TypeError, "setup() takes a dict of op name -> address");
        return NULL;
    }
    for (size_t i = 0; i < NOPS; i++) {
        PyObject *v = PyDict_GetItemString(table, op_names[i]);
        uint64_t a = 0;
        if (v == NULL) {
            PyErr_Format(PyExc_ValueError, "setup(): no address for patomic's %s", op_names[i]);
            return NULL;
        }
        if (!get_u64(v, op_names[i], &a))
            return NULL;
        if (a == 0) {
            PyErr_Format(PyExc_ValueError, "setup(): patomic has no %s for 8-byte words",
                         op_names[i]);
            return NULL;
        }
        fp[i] = (void *)(uintptr_t)a;
    }
    ops.load = (op_load_t)fp[0];
    ops.store = (op_store_t)fp[1];
    ops.exchange = (op_fetch_t)fp[2];
    ops.cmpxchg = (op_cmpxchg_t)fp[3];
    ops.or_ = (op_void_t)fp[4];
    ops.fetch_or = (op_fetch_t)fp[5];
    ops.fetch_and = (op_fetch_t)fp[6];
    ops.fetch_add = (op_fetch_t)fp[7];
    ops.test_set = (op_test_modify_t)fp[8];
    ops.test_reset = (op_test_modify_t)fp[9];
    ready = 1;
    Py_RETURN_NONE;
}

/* ---- single ops on one word (address, ..., order) -------------------------------- */

static PyObject *k_load(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    volatile uint64_t *p;
    int order;
    uint64_t out;
    if (not_ready() || !nargs_ok("load", nargs, 2) || !get_addr(args[0], &p) ||
        !get_order(args[1], ORD_LOAD, &order))
        return NULL;
    ops.load(p, order, &out);
    return PyLong_FromUnsignedLongLong(out);
}

static PyObject *k_store(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    volatile uint64_t *p;
    int order;
    uint64_t v;
    if (not_ready() || !nargs_ok("store", nargs, 3) || !get_addr(args[0], &p) ||
        !get_u64(args[1], "value", &v) || !get_order(args[2], ORD_STORE, &order))
        return NULL;
    ops.store(p, &v, order);
    Py_RETURN_NONE;
}

/* exchange / fetch_or / fetch_and (value checked as unsigned 64-bit) */
static PyObject *fetch_op(const char *name, op_fetch_t f, PyObject *const *args,
                          Py_ssize_t nargs)
{
    volatile uint64_t *p;
    int order;
    uint64_t v, out;
    if (not_ready() || !nargs_ok(name, nargs, 3) || !get_addr(args[0], &p) ||
        !get_u64(args[1], "value", &v) || !get_order(args[2], ORD_RMW, &order))
        return NULL;
    f(p, &v, order, &out);
    return PyLong_FromUnsignedLongLong(out);
}

static PyObject *k_exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return fetch_op("exchange", ops.exchange, args, nargs);
}

static PyObject *k_fetch_or(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return fetch_op("fetch_or", ops.fetch_or, args, nargs);
}

static PyObject *k_fetch_and(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return fetch_op("fetch_and", ops.fetch_and, args, nargs);
}

/* fetch_add takes any int and adds it modulo 2**64 (a negative one subtracts). */
static PyObject *k_fetch_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    volatile uint64_t *p;
    int order;
    uint64_t v, out;
    if (not_ready() || !nargs_ok("fetch_add", nargs, 3) || !get_addr(args[0], &p) ||
        !get_order(args[2], ORD_RMW, &order))
        return NULL;
    if (!PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "value must be an int");
        return NULL;
    }
    v = PyLong_AsUnsignedLongLongMask(args[1]);
    if (v == ONES && PyErr_Occurred())
        return NULL;
    ops.fetch_add(p, &v, order, &out);
    return PyLong_FromUnsignedLongLong(out);
}

static PyObject *k_compare_exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    volatile uint64_t *p;
    int succ, fail;
    uint64_t expected, desired;
    if (not_ready() || !nargs_ok("compare_exchange", nargs, 5) || !get_addr(args[0], &p) ||
        !get_u64(args[1], "expected", &expected) || !get_u64(args[2], "desired", &desired) ||
        !get_order(args[3], ORD_RMW, &succ) || !get_order(args[4], ORD_LOAD, &fail))
        return NULL;
    if (fail > succ) {  /* C11: the failure order is no stronger than the success order */
        PyErr_Format(PyExc_ValueError, "failure order %d is stronger than success order %d",
                     fail, succ);
        return NULL;
    }
    int ok = ops.cmpxchg(p, &expected, &desired, succ, fail);
    return Py_BuildValue("(NK)", PyBool_FromLong(ok), (unsigned long long)expected);
}

static PyObject *bit_op(const char *name, op_test_modify_t f, PyObject *const *args,
                        Py_ssize_t nargs)
{
    volatile uint64_t *p;
    int order;
    Py_ssize_t bit;
    if (not_ready() || !nargs_ok(name, nargs, 3) || !get_addr(args[0], &p) ||
        !get_index(args[1], "bit", &bit) || !get_order(args[2], ORD_RMW, &order))
        return NULL;
    if (bit > 63) {
        PyErr_Format(PyExc_ValueError, "bit %zd is not in [0, 63]", bit);
        return NULL;
    }
    return PyBool_FromLong(f(p, (int)bit, order));
}

static PyObject *k_bit_test_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return bit_op("bit_test_set", ops.test_set, args, nargs);
}

static PyObject *k_bit_test_reset(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return bit_op("bit_test_reset", ops.test_reset, args, nargs);
}

static PyObject *k_fence(PyObject *self, PyObject *unused)
{
    if (not_ready())
        return NULL;
    full_fence();
    Py_RETURN_NONE;
}

/* ---- batch ops over one block (block, ...) ---------------------------------------- */

/* Word k (64 bits from bit 64k) of a little-endian source of nbytes bytes;
 * bits outside the source read as 0. */
static inline uint64_t src_word(const unsigned char *src, Py_ssize_t nbytes, Py_ssize_t k)
{
    uint64_t v = 0;
    Py_ssize_t at = k * 8;
    if (k < 0 || at >= nbytes)
        return 0;
    if (nbytes - at >= 8) {
        memcpy(&v, src + at, 8);
    } else {
        for (Py_ssize_t i = 0; i < nbytes - at; i++)
            v |= (uint64_t)src[at + i] << (8 * i);
    }
    return v;  /* little-endian machines only (checked at import) */
}

/* 64 source bits from bit s (s may be negative: those bits read as 0). */
static inline uint64_t src_bits(const unsigned char *src, Py_ssize_t nbytes, Py_ssize_t s)
{
    Py_ssize_t k = s >= 0 ? s / 64 : -((63 - s) / 64);  /* floor(s / 64) */
    unsigned r = (unsigned)(s - k * 64);
    uint64_t v = src_word(src, nbytes, k) >> r;
    if (r)
        v |= src_word(src, nbytes, k + 1) << (64 - r);
    return v;
}

static inline uint64_t load_le(const unsigned char *at)
{
    uint64_t v;
    memcpy(&v, at, 8);
    return v;  /* little-endian machines only (checked at import) */
}

/* OR m into word i of each of the nb blocks w[0..nb): nothing for 0 (the
 * source word, the caller's private input, was only loaded), an all-ones
 * store with `sorder` (then *stored: the caller fences once), else a
 * fetch-or with `order`.  shmdirty passes release: whoever takes a bit with
 * acquire (sync, test_and_clear) sees the page written before it was set;
 * the all-ones stores are release too (store_order) and the fence after the
 * loop makes them visible before the caller goes on, as a fetch-or would.
 * or_ and store are patomic's, passed in so the loop keeps them in registers. */
static inline __attribute__((always_inline)) void
or_word(volatile uint64_t *const *w, const int nb, Py_ssize_t i, uint64_t m, op_void_t or_,
        op_store_t store, int order, int sorder, int *stored)
{
    if (!m)
        return;
    if (m == ONES) {
        for (int j = 0; j < nb; j++)
            store(&w[j][i], &m, sorder);
        *stored = 1;
    } else {
        for (int j = 0; j < nb; j++)
            or_(&w[j][i], &m, order);
    }
}

/* The loop of or_bitmap / or_bitmaps: OR source bits [src_first, src_first +
 * count) of `src` (nbytes bytes, little-endian) into bits [first, first +
 * count) of each of the nb blocks w[0..nb), reading each source word once.
 * count > 0 and every range checked by the caller; needs no GIL.  Nonzero if
 * it stored (the caller then fences).  Inlined with nb a constant (below):
 * the per-block loop unrolls and the sparse case's cost is the ORs. */
static inline __attribute__((always_inline)) int
loop_or_bitmap_n(volatile uint64_t *const *bw, const int nb, Py_ssize_t first, Py_ssize_t count,
                 const unsigned char *src, Py_ssize_t nbytes, Py_ssize_t src_first, int order)
{
    op_void_t or_ = ops.or_;
    op_store_t store = ops.store;
    Py_ssize_t end = first + count;
    Py_ssize_t w0 = first >> 6, w1 = (end - 1) >> 6;
    Py_ssize_t delta = src_first - first;  /* source bit of block bit 0 */
    int sorder = store_order(order), stored = 0;
    /* The edge words: masked, from any bit offset. */
    or_word(bw, nb, w0, src_bits(src, nbytes, w0 * 64 + delta) &
            word_mask(w0, w0, w1, first, end), or_, store, order, sorder, &stored);
    if (w1 > w0)
        or_word(bw, nb, w1, src_bits(src, nbytes, w1 * 64 + delta) &
                word_mask(w1, w0, w1, first, end), or_, store, order, sorder, &stored);
    /* The words between: all their source bits lie inside the source.
     * Block word w's bits start at source bit 64 w + delta = 64 (w + q) + r. */
    Py_ssize_t q = delta >= 0 ? delta / 64 : -((63 - delta) / 64);
    unsigned r = (unsigned)(delta - q * 64);
    Py_ssize_t last = w1 - 1;
    if (r && last > w0 && (w1 - 1 + q + 1) * 8 + 8 > nbytes)
        last--;  /* its upper source word may run past a bytes source: below */
    if (r == 0) {
        for (Py_ssize_t w = w0 + 1; w <= last; w++)
            or_word(bw, nb, w, load_le(src + (w + q) * 8), or_, store, order, sorder, &stored);
    } else {
        for (Py_ssize_t w = w0 + 1; w <= last; w++) {
            const unsigned char *at = src + (w + q) * 8;
            or_word(bw, nb, w, load_le(at) >> r | load_le(at + 8) << (64 - r), or_, store,
                    order, sorder, &stored);
        }
    }
    for (Py_ssize_t w = last + 1; w < w1; w++)
        or_word(bw, nb, w, src_bits(src, nbytes, w * 64 + delta), or_, store, order, sorder,
                &stored);
    return stored;
}

static int loop_or_bitmap(volatile uint64_t *const *bw, int nb, Py_ssize_t first,
                          Py_ssize_t count, const unsigned char *src, Py_ssize_t nbytes,
                          Py_ssize_t src_first, int order)
{
    switch (nb) {  /* 2: VGA and MIGRATION (KVM); 3: with CODE (tcg) */
    case 1: return loop_or_bitmap_n(bw, 1, first, count, src, nbytes, src_first, order);
    case 2: return loop_or_bitmap_n(bw, 2, first, count, src, nbytes, src_first, order);
    case 3: return loop_or_bitmap_n(bw, 3, first, count, src, nbytes, src_first, order);
    default: return loop_or_bitmap_n(bw, nb, first, count, src, nbytes, src_first, order);
    }
}

/* The source of or_bitmap / or_bitmaps: any C-contiguous buffer holding bits
 * [src_first, src_first + count). */
static int get_src(PyObject *o, Py_ssize_t src_first, Py_ssize_t count, Py_buffer *sv)
{
    if (PyObject_GetBuffer(o, sv, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "src must be a C-contiguous buffer (bytes or array)");
        return 0;
    }
    if (src_first > sv->len * 8 || count > sv->len * 8 - src_first) {
        PyErr_Format(PyExc_ValueError, "source bits [%zd, %zd + %zd) are outside its %zd bits",
                     src_first, src_first, count, sv->len * 8);
        PyBuffer_Release(sv);
        return 0;
    }
    return 1;
}

/* Most blocks or_bitmaps takes: one per client (DIRTY_MEMORY_NUM is 3). */
#define MAX_CLIENTS 8

/* The body of or_bitmap / or_bitmaps once the blocks are held: the loop,
 * without the GIL for big ranges, then one fence if it stored. */
static void or_bitmap_held(block_t *b, int nb, Py_ssize_t first, Py_ssize_t count,
                           Py_buffer *sv, Py_ssize_t src_first, int order)
{
    volatile uint64_t *w[MAX_CLIENTS];
    if (!count)
        return;
    for (int j = 0; j < nb; j++)
        w[j] = b[j].w;
    Py_ssize_t nwords = ((first + count - 1) >> 6) - (first >> 6);
    PyThreadState *ts = nwords >= GIL_WORDS ? PyEval_SaveThread() : NULL;
    if (loop_or_bitmap(w, nb, first, count, sv->buf, sv->len, src_first, order))
        full_fence();  /* the all-ones stores are visible before the caller goes on */
    if (ts)
        PyEval_RestoreThread(ts);
}

/* or_bitmap(block, first, count, src, src_first, order): OR bits
 * [src_first, src_first + count) of the little-endian bitmap `src` (any
 * C-contiguous buffer: bytes, a uint64 array) into bits [first, first + count)
 * of the block.  Zero source words cost a load; whole all-ones words are
 * stored (setting dirty bits is monotonic: no other writer clears them here) and one fence
 * follows; other words get one fetch-or with `order`. */
static PyObject *k_or_bitmap(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t first, count, src_first;
    int order;
    block_t b;
    Py_buffer sv;
    if (not_ready() || !nargs_ok("or_bitmap", nargs, 6) || !get_index(args[1], "first", &first) ||
        !get_index(args[2], "count", &count) || !get_index(args[4], "src_first", &src_first) ||
        !get_order(args[5], ORD_RMW, &order) || !get_src(args[3], src_first, count, &sv))
        return NULL;
    if (!get_block(args[0], &b)) {
        PyBuffer_Release(&sv);
        return NULL;
    }
    if (!range_ok(first, count, b.n)) {
        PyBuffer_Release(&b.view);
        PyBuffer_Release(&sv);
        return NULL;
    }
    or_bitmap_held(&b, 1, first, count, &sv, src_first, order);
    PyBuffer_Release(&b.view);
    PyBuffer_Release(&sv);
    Py_RETURN_NONE;
}

/* or_bitmaps(blocks, first, count, src, src_first, order): or_bitmap into
 * every block of `blocks` (a list or tuple of 1 to MAX_CLIENTS block
 * buffers, one per client) in one pass over the source: each source word is
 * loaded once and, if nonzero, ORed (or stored, all ones) into the same word
 * of every block, as QEMU's cpu_physical_memory_set_dirty_lebitmap does.
 * Every block is checked before any is touched. */
static PyObject *k_or_bitmaps(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t first, count, src_first;
    int order, nb = 0, ok = 1;
    block_t b[MAX_CLIENTS];
    Py_buffer sv;
    if (not_ready() || !nargs_ok("or_bitmaps", nargs, 6) ||
        !get_index(args[1], "first", &first) || !get_index(args[2], "count", &count) ||
        !get_index(args[4], "src_first", &src_first) || !get_order(args[5], ORD_RMW, &order))
        return NULL;
    if (!PyList_Check(args[0]) && !PyTuple_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "or_bitmaps(): blocks must be a list or tuple, not %.100s",
                     Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    /* A tuple of our own: getting a buffer may run code that changes a list. */
    PyObject *blocks = PySequence_Tuple(args[0]);
    if (blocks == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(blocks);
    if (n < 1 || n > MAX_CLIENTS) {
        PyErr_Format(PyExc_ValueError, "or_bitmaps(): %zd blocks, not 1 to %d", n, MAX_CLIENTS);
        Py_DECREF(blocks);
        return NULL;
    }
    if (!get_src(args[3], src_first, count, &sv)) {
        Py_DECREF(blocks);
        return NULL;
    }
    /* Hold every block and check the range in each before touching any. */
    while (ok && nb < n) {
        ok = get_block(PyTuple_GET_ITEM(blocks, nb), &b[nb]);
        if (ok)
            ok = range_ok(first, count, b[nb++].n);
    }
    if (ok)
        or_bitmap_held(b, nb, first, count, &sv, src_first, order);
    while (nb-- > 0)
        PyBuffer_Release(&b[nb].view);
    PyBuffer_Release(&sv);
    Py_DECREF(blocks);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* or_sparse(block, words, masks, order): OR masks[i] into word words[i] (two
 * arrays of 64-bit integers of one length); every index is checked first. */
static PyObject *k_or_sparse(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int order;
    block_t b;
    Py_buffer wv, mv;
    if (not_ready() || !nargs_ok("or_sparse", nargs, 4) || !get_order(args[3], ORD_RMW, &order))
        return NULL;
    if (!get_int64s(args[1], "words", &wv))
        return NULL;
    if (!get_int64s(args[2], "masks", &mv)) {
        PyBuffer_Release(&wv);
        return NULL;
    }
    if (!get_block(args[0], &b)) {
        PyBuffer_Release(&wv);
        PyBuffer_Release(&mv);
        return NULL;
    }
    Py_ssize_t n = wv.len / 8;
    const int64_t *idx = wv.buf;
    const uint64_t *mask = mv.buf;
    PyObject *res = Py_None;
    if (mv.len != wv.len) {
        PyErr_Format(PyExc_ValueError, "%zd words but %zd masks", n, mv.len / 8);
        res = NULL;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (idx[i] < 0 || idx[i] >= b.n) {
                PyErr_Format(PyExc_ValueError, "word %lld is outside the block's %zd words",
                             (long long)idx[i], b.n);
                res = NULL;
                break;
            }
        }
    }
    if (res) {
        PyThreadState *ts = n >= GIL_WORDS ? PyEval_SaveThread() : NULL;
        for (Py_ssize_t i = 0; i < n; i++)
            if (mask[i])
                ops.or_(&b.w[idx[i]], &mask[i], order);
        if (ts)
            PyEval_RestoreThread(ts);
        Py_INCREF(res);
    }
    PyBuffer_Release(&b.view);
    PyBuffer_Release(&wv);
    PyBuffer_Release(&mv);
    return res;
}

/* The loops of take, any_set / all_set and set_range over bits
 * [first, first + count) of words w; count > 0, checked by the caller.  They
 * touch only those words and need no GIL. */

/* Take the bits; out[i] (or nothing if out is NULL) gets word first / 64 + i's.
 * A word read as clean is skipped (a bit set after that read stays for the
 * next taker); whole words are taken with an exchange, edge words with a
 * fetch-and.  Nonzero if any bit was taken. */
static uint64_t loop_take(volatile uint64_t *w, Py_ssize_t first, Py_ssize_t count,
                          uint64_t *out, int order)
{
    Py_ssize_t end = first + count, w0 = first >> 6, w1 = (end - 1) >> 6;
    uint64_t any = 0;
    for (Py_ssize_t i = w0; i <= w1; i++) {
        uint64_t m = word_mask(i, w0, w1, first, end), cur, got = 0;
        ops.load(&w[i], RELAXED, &cur);
        if (cur & m) {
            if (m == ONES) {
                uint64_t zero = 0;
                ops.exchange(&w[i], &zero, order, &got);
            } else {
                uint64_t keep = ~m;
                ops.fetch_and(&w[i], &keep, order, &got);
                got &= m;
            }
        }
        any |= got;
        if (out)
            out[i - w0] = got;
    }
    return any;
}

/* Relaxed loads (a bit seen set was set; one missed was set
 * concurrently).  any: is a bit set?  all: is every bit set? */
static int loop_test(volatile uint64_t *w, Py_ssize_t first, Py_ssize_t count, int want_all)
{
    Py_ssize_t end = first + count, w0 = first >> 6, w1 = (end - 1) >> 6;
    for (Py_ssize_t i = w0; i <= w1; i++) {
        uint64_t m = word_mask(i, w0, w1, first, end), cur;
        ops.load(&w[i], RELAXED, &cur);
        if (want_all ? (cur & m) != m : (cur & m) != 0)
            return !want_all;
    }
    return want_all;
}

/* QEMU's bitmap_set_atomic: a fetch-or with `order` on each edge word,
 * all-ones stores inside; nonzero if it stored (the caller then fences). */
static int loop_set(volatile uint64_t *w, Py_ssize_t first, Py_ssize_t count, int order)
{
    Py_ssize_t end = first + count, w0 = first >> 6, w1 = (end - 1) >> 6;
    int sorder = store_order(order), stored = 0;
    for (Py_ssize_t i = w0; i <= w1; i++) {
        uint64_t m = word_mask(i, w0, w1, first, end);
        if (m == ONES && i != w0 && i != w1) {
            ops.store(&w[i], &m, sorder);
            stored = 1;
        } else {
            ops.or_(&w[i], &m, order);
        }
    }
    return stored;
}

/* take(block, first, count, out, order) -> bool: take (read and clear) bits
 * [first, first + count) (loop_take).  out: a writable uint64 buffer of at
 * least (first + count - 1) / 64 - first / 64 + 1 words, or None.  True if
 * any bit was taken. */
static PyObject *k_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t first, count;
    int order;
    block_t b;
    Py_buffer ov;
    uint64_t *out = NULL;
    if (not_ready() || !nargs_ok("take", nargs, 5) || !get_index(args[1], "first", &first) ||
        !get_index(args[2], "count", &count) || !get_order(args[4], ORD_RMW, &order))
        return NULL;
    if (!get_block(args[0], &b))
        return NULL;
    if (!range_ok(first, count, b.n)) {
        PyBuffer_Release(&b.view);
        return NULL;
    }
    Py_ssize_t w0 = first >> 6, w1 = count ? (first + count - 1) >> 6 : w0 - 1;
    if (args[3] != Py_None) {
        if (PyObject_GetBuffer(args[3], &ov, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "out must be a writable C-contiguous buffer");
            PyBuffer_Release(&b.view);
            return NULL;
        }
        if ((uintptr_t)ov.buf & 7 || ov.len / 8 < w1 - w0 + 1) {
            PyErr_Format(PyExc_ValueError, "out must be aligned and hold %zd words (has %zd)",
                         w1 - w0 + 1, ov.len / 8);
            PyBuffer_Release(&ov);
            PyBuffer_Release(&b.view);
            return NULL;
        }
        out = ov.buf;
    }
    uint64_t any = 0;
    if (count) {
        PyThreadState *ts = w1 - w0 >= GIL_WORDS ? PyEval_SaveThread() : NULL;
        any = loop_take(b.w, first, count, out, order);
        if (ts)
            PyEval_RestoreThread(ts);
    }
    if (out)
        PyBuffer_Release(&ov);
    PyBuffer_Release(&b.view);
    return PyBool_FromLong(any != 0);
}

/* any_set / all_set(block, first, count) -> bool (loop_test).  Empty: False / True. */
static PyObject *test_range(const char *name, int want_all, PyObject *const *args,
                            Py_ssize_t nargs)
{
    Py_ssize_t first, count;
    block_t b;
    if (not_ready() || !nargs_ok(name, nargs, 3) || !get_index(args[1], "first", &first) ||
        !get_index(args[2], "count", &count))
        return NULL;
    if (!get_block(args[0], &b))
        return NULL;
    if (!range_ok(first, count, b.n)) {
        PyBuffer_Release(&b.view);
        return NULL;
    }
    int result = want_all;
    if (count) {
        PyThreadState *ts = count >= 64 * GIL_WORDS ? PyEval_SaveThread() : NULL;
        result = loop_test(b.w, first, count, want_all);
        if (ts)
            PyEval_RestoreThread(ts);
    }
    PyBuffer_Release(&b.view);
    return PyBool_FromLong(result);
}

static PyObject *k_any_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return test_range("any_set", 0, args, nargs);
}

static PyObject *k_all_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return test_range("all_set", 1, args, nargs);
}

/* set_range(block, first, count, order): loop_set, then a fence if it stored. */
static PyObject *k_set_range(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t first, count;
    int order;
    block_t b;
    if (not_ready() || !nargs_ok("set_range", nargs, 4) || !get_index(args[1], "first", &first) ||
        !get_index(args[2], "count", &count) || !get_order(args[3], ORD_RMW, &order))
        return NULL;
    if (!get_block(args[0], &b))
        return NULL;
    if (!range_ok(first, count, b.n)) {
        PyBuffer_Release(&b.view);
        return NULL;
    }
    if (count) {
        PyThreadState *ts = count >= 64 * GIL_WORDS ? PyEval_SaveThread() : NULL;
        if (loop_set(b.w, first, count, order))
            full_fence();  /* the stores are visible before the caller goes on */
        if (ts)
            PyEval_RestoreThread(ts);
    }
    PyBuffer_Release(&b.view);
    Py_RETURN_NONE;
}

/* ---- ops over one client's blocks (the hot accessors) ------------------------------ */

/* set_page(clients, client, addr, ram_size, page_bits, block_pages, order)
 * -> bool: set_dirty_flag past its RCU check.  clients[client] is that
 * client's list of mapped blocks (None where not mapped yet); block.base is
 * the int address of its first word, block_pages bits long.  Sets the bit
 * of the page holding `addr` with a test-and-set and returns True; returns
 * False, touching nothing, when the caller must take the slow path (which
 * checks, refreshes or maps): client or addr not an exact int in range
 * ([0, len(clients)), [0, ram_size)), or the block not in the list or not
 * mapped. */
static int set_page_in(PyObject *clients, PyObject *client_o, PyObject *addr_o,
                       long long ram_size, long page_bits, long long block_pages, int order)
{   /* 1 done, 0 declined (nothing touched), -1 error */
    int overflow;
    if (!PyList_CheckExact(clients) || !PyLong_CheckExact(client_o) || !PyLong_CheckExact(addr_o))
        return 0;
    long client = PyLong_AsLongAndOverflow(client_o, &overflow);
    if (overflow || client < 0 || client >= PyList_GET_SIZE(clients))
        return 0;
    PyObject *blocks = PyList_GET_ITEM(clients, client);
    if (!PyList_CheckExact(blocks))
        return 0;
    long long addr = PyLong_AsLongLongAndOverflow(addr_o, &overflow);
    if (overflow || addr < 0 || addr >= ram_size)
        return 0;
    long long page = addr >> page_bits, idx = page / block_pages, bit = page - idx * block_pages;
    if (idx >= PyList_GET_SIZE(blocks))
        return 0;
    PyObject *blk = PyList_GET_ITEM(blocks, idx);
    if (blk == Py_None)
        return 0;
    PyObject *base = PyObject_GetAttr(blk, str_base);
    if (base == NULL)
        return -1;
    volatile uint64_t *w;
    int ok = get_addr(base, &w);
    Py_DECREF(base);
    if (!ok)
        return -1;
    ops.test_set(w + (bit >> 6), (int)(bit & 63), order);
    return 1;
}

static int geometry_ok(long page_bits, long long block_pages)
{
    if (page_bits < 0 || page_bits > 62 || block_pages <= 0 || block_pages % 64) {
        PyErr_SetString(PyExc_ValueError, "bad page_bits or block_pages");
        return 0;
    }
    return 1;
}

static int set_page_core(PyObject *const *args)  /* 1 done, 0 declined, -1 error */
{
    int order;
    long long ram_size = PyLong_AsLongLong(args[3]);
    long page_bits = PyLong_AsLong(args[4]);
    long long block_pages = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred() || !get_order(args[6], ORD_RMW, &order) ||
        !geometry_ok(page_bits, block_pages))
        return -1;
    return set_page_in(args[0], args[1], args[2], ram_size, page_bits, block_pages, order);
}

static PyObject *k_set_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (not_ready() || !nargs_ok("set_page", nargs, 7))
        return NULL;
    int r = set_page_core(args);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

/* memb_set_page(ctr, gp, seen, clients, client, addr, ram_size, page_bits,
 * block_pages, order) -> bool: set_page inside one memb read-side section, for a reader
 * outside any section whose table was checked against counter value `seen`.
 * The section is shmdirty.rcu.Rcu.read_lock / read_unlock's, word for word:
 * store `seen` into this reader's slot counter `ctr` (seq_cst), load the
 * grace-period counter `gp` (seq_cst: the reader's half of the Dekker pair);
 * if it moved, the table may be stale: store 0 (release) and return False
 * (the caller takes the slow path, which re-reads it).  Else set_page, then
 * store 0 with release (every access of the section happens before a waiter
 * that sees 0).  The GIL is held throughout, so no other thread of this
 * process runs inside.  memb_set_in is its core. */
/* Open a memb read-side section of its own on slot counter `ctr` for a
 * reader whose table was checked at counter value `seen`; 0 if the counter
 * `gp` moved (the section is closed again: the caller declines). */
static int memb_open(volatile uint64_t *ctr, volatile uint64_t *gp, uint64_t seen)
{
    uint64_t now, zero = 0;
    /* seq_cst store, then seq_cst load: the reader's half of the Dekker pair
     * (shmdirty/rcu.py): either a grace period's scan sees `seen` in the slot
     * and waits, or this load sees its advance and the table is not used. */
    ops.store(ctr, &seen, SEQ_CST);
    ops.load(gp, SEQ_CST, &now);
    if (now == seen)
        return 1;
    ops.store(ctr, &zero, RELEASE);  /* as memb_close */
    return 0;
}

static void memb_close(volatile uint64_t *ctr)
{
    uint64_t zero = 0;
    /* release: the section's accesses happen before a waiter that reads 0. */
    ops.store(ctr, &zero, RELEASE);
}

static int memb_set_in(volatile uint64_t *ctr, volatile uint64_t *gp, uint64_t seen,
                       PyObject *clients, PyObject *client_o, PyObject *addr_o,
                       long long ram_size, long page_bits, long long block_pages, int order)
{
    if (!memb_open(ctr, gp, seen))
        return 0;
    int r = set_page_in(clients, client_o, addr_o, ram_size, page_bits, block_pages, order);
    memb_close(ctr);
    return r;
}

static PyObject *k_memb_set_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    volatile uint64_t *ctr, *gp;
    uint64_t seen;
    int order;
    if (not_ready() || !nargs_ok("memb_set_page", nargs, 10) || !get_addr(args[0], &ctr) ||
        !get_addr(args[1], &gp) || !get_u64(args[2], "seen", &seen))
        return NULL;
    long long ram_size = PyLong_AsLongLong(args[6]);
    long page_bits = PyLong_AsLong(args[7]);
    long long block_pages = PyLong_AsLongLong(args[8]);
    if (PyErr_Occurred() || !get_order(args[9], ORD_RMW, &order) ||
        !geometry_ok(page_bits, block_pages))
        return NULL;
    int r = memb_set_in(ctr, gp, seen, args[3], args[4], args[5], ram_size, page_bits,
                        block_pages, order);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

/* Holds the buffers (`words`) of blocks [i0, i1] of a client's list; fills
 * *unmapped with the first index whose block is None (then holds nothing). */
static block_t *hold_blocks(PyObject *blocks, Py_ssize_t i0, Py_ssize_t i1,
                            Py_ssize_t block_pages, Py_ssize_t *unmapped)
{
    Py_ssize_t n = i1 - i0 + 1;
    *unmapped = -1;
    if (i1 >= PyList_GET_SIZE(blocks)) {
        PyErr_Format(PyExc_ValueError, "block %zd is outside the table's %zd blocks", i1,
                     PyList_GET_SIZE(blocks));
        return NULL;
    }
    for (Py_ssize_t i = i0; i <= i1; i++) {
        if (PyList_GET_ITEM(blocks, i) == Py_None) {
            *unmapped = i;
            return NULL;
        }
    }
    block_t *held = PyMem_Calloc(n, sizeof(block_t));
    if (held == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *words = PyObject_GetAttr(PyList_GET_ITEM(blocks, i0 + i), str_words);
        int ok = words != NULL && get_block(words, &held[i]);
        Py_XDECREF(words);
        if (ok && held[i].n * 64 < block_pages) {
            PyErr_Format(PyExc_ValueError, "block %zd holds %zd words, fewer than %zd pages",
                         i0 + i, held[i].n, block_pages);
            PyBuffer_Release(&held[i].view);
            ok = 0;
        }
        if (!ok) {
            while (i-- > 0)
                PyBuffer_Release(&held[i].view);
            PyMem_Free(held);
            return NULL;
        }
    }
    return held;
}

static void release_blocks(block_t *held, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&held[i].view);
    PyMem_Free(held);
}

enum { WALK_ANY, WALK_ALL, WALK_SET, WALK_TAKE };

/* walk(blocks, page, end, block_pages, op, order) -> int: the seed's block
 * walk over pages [page, end) of one client's blocks (as for set_pages),
 * with op 0 any_set, 1 all_set, 2 set_range, 3 take (bits dropped) on each
 * piece, in one call.  Returns the result (any / all / any bit taken: 0 or
 * 1; set: 0), or -1 - i if block i is needed but not mapped (nothing done:
 * map it and call again).  Empty range: any 0, all 1. */
/* The walk over pages [page, end) of one client's blocks: its result (0 or
 * 1) >= 0; -1 with an exception; -2 - i if block i is needed but not mapped
 * (nothing done).  Checked by the caller: block_pages, op, page <= end. */
static Py_ssize_t walk_core(PyObject *blocks, Py_ssize_t page, Py_ssize_t end,
                            Py_ssize_t block_pages, int op, int order)
{
    Py_ssize_t unmapped;
    if (end == page)
        return op == WALK_ALL;
    Py_ssize_t i0 = page / block_pages, i1 = (end - 1) / block_pages;
    block_t *held = hold_blocks(blocks, i0, i1, block_pages, &unmapped);
    if (held == NULL)
        return unmapped >= 0 ? -2 - unmapped : -1;
    int result = op == WALK_ALL, stored = 0;
    PyThreadState *ts = end - page >= 64 * GIL_WORDS ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t pg = page; pg < end;) {
        Py_ssize_t idx = pg / block_pages, off = pg % block_pages;
        Py_ssize_t num = end - pg < block_pages - off ? end - pg : block_pages - off;
        volatile uint64_t *w = held[idx - i0].w;
        pg += num;
        if (op == WALK_ANY || op == WALK_ALL) {
            if (loop_test(w, off, num, op == WALK_ALL) != (op == WALK_ALL)) {
                result = op != WALK_ALL;
                break;
            }
        } else if (op == WALK_SET) {
            stored |= loop_set(w, off, num, order);
        } else {
            result |= loop_take(w, off, num, NULL, order) != 0;
        }
    }
    if (stored)
        full_fence();
    if (ts)
        PyEval_RestoreThread(ts);
    release_blocks(held, i1 - i0 + 1);
    return result;
}

static PyObject *k_walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t page, end, block_pages, op;
    int order;
    if (not_ready() || !nargs_ok("walk", nargs, 6) || !get_index(args[1], "page", &page) ||
        !get_index(args[2], "end", &end) || !get_index(args[3], "block_pages", &block_pages) ||
        !get_index(args[4], "op", &op) || !get_order(args[5], ORD_RMW, &order))
        return NULL;
    PyObject *blocks = args[0];
    if (!PyList_Check(blocks)) {
        PyErr_SetString(PyExc_TypeError, "walk(): blocks must be a list");
        return NULL;
    }
    if (block_pages == 0 || block_pages % 64 || op > WALK_TAKE || end < page) {
        PyErr_SetString(PyExc_ValueError, "walk(): bad block_pages, op or range");
        return NULL;
    }
    Py_ssize_t r = walk_core(blocks, page, end, block_pages, (int)op, order);
    if (r == -1)
        return NULL;
    return PyLong_FromSsize_t(r >= 0 ? r : -1 - (-2 - r));
}

/* The set pass of a page batch: one patomic `or` per page, with `order`.
 * Each locked instruction waits for its own cache miss, so the word
 * PAGES_AHEAD pages on is prefetched for writing first: the misses overlap
 * instead of queueing (a cache hint, not an access: the words themselves
 * are only touched by patomic's op). */
#define PAGES_AHEAD 8
static void set_pages_held(block_t *held, const int64_t *pages, Py_ssize_t n,
                           long long bp, int order)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PAGES_AHEAD < n) {
            int64_t p = pages[i + PAGES_AHEAD];
            Py_ssize_t j = (Py_ssize_t)(p / bp);
            __builtin_prefetch((const void *)&held[j].w[(p - (int64_t)j * bp) >> 6], 1, 3);
        }
        Py_ssize_t idx = (Py_ssize_t)(pages[i] / bp);
        Py_ssize_t bit = (Py_ssize_t)(pages[i] - (int64_t)idx * bp);
        uint64_t m = (uint64_t)1 << (bit & 63);
        ops.or_(&held[idx].w[bit >> 6], &m, order);
    }
}

/* Hold the buffer (`words`) of every block of one client's list `blocks`
 * that pages[0..n) fall in.  Returns the held array (one entry per listed
 * block, .w NULL where not needed; free it with release_held), or NULL,
 * holding nothing, with *status: the index of a needed block that is not
 * mapped (>= 0), HOLD_OUTSIDE (page *at is outside [0, limit)) or
 * HOLD_ERROR (an exception is set). */
enum { HOLD_ERROR = -1, HOLD_OUTSIDE = -2 };

static void release_held(block_t *held, Py_ssize_t nblocks)
{
    for (Py_ssize_t i = 0; i < nblocks; i++)
        if (held[i].w)
            PyBuffer_Release(&held[i].view);
    PyMem_Free(held);
}

static block_t *hold_page_blocks(PyObject *blocks, const int64_t *pages, Py_ssize_t n,
                                 long long bp, long long limit, Py_ssize_t *status,
                                 Py_ssize_t *at)
{
    Py_ssize_t nblocks = PyList_GET_SIZE(blocks);
    block_t *held = PyMem_Calloc(nblocks ? (size_t)nblocks : 1, sizeof(block_t));
    if (held == NULL) {
        PyErr_NoMemory();
        *status = HOLD_ERROR;
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (pages[i] < 0 || pages[i] >= limit) {
            *status = HOLD_OUTSIDE;
            *at = i;
            goto fail;
        }
        Py_ssize_t idx = (Py_ssize_t)(pages[i] / bp);
        if (held[idx].w)
            continue;
        PyObject *blk = PyList_GET_ITEM(blocks, idx);
        if (blk == Py_None) {
            *status = idx;
            goto fail;
        }
        PyObject *words = PyObject_GetAttr(blk, str_words);
        int ok = words != NULL && get_block(words, &held[idx]);
        Py_XDECREF(words);
        if (ok && held[idx].n * 64 < bp) {
            PyErr_Format(PyExc_ValueError, "block %zd holds %zd words, fewer than %lld pages",
                         idx, held[idx].n, bp);
            PyBuffer_Release(&held[idx].view);
            held[idx].w = NULL;
            ok = 0;
        }
        if (!ok) {
            *status = HOLD_ERROR;
            goto fail;
        }
    }
    return held;
fail:
    release_held(held, nblocks);
    return NULL;
}

/* set_pages(blocks, pages, block_pages, order) -> int: set_dirty_pages past
 * its RCU and range checks.  pages: a C-contiguous array of 64-bit page
 * numbers; blocks as for set_page, each with `words`, its writable buffer.
 * Every page is checked first (ValueError outside the list's blocks).
 * Returns the index of a block that is needed but not mapped (nothing set:
 * map it and call again), or -1 once every page's bit is set (a fetch-or
 * with `order` each). */
static PyObject *k_set_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t block_pages;
    int order;
    Py_buffer pv;
    if (not_ready() || !nargs_ok("set_pages", nargs, 4) ||
        !get_index(args[2], "block_pages", &block_pages) || !get_order(args[3], ORD_RMW, &order))
        return NULL;
    PyObject *blocks = args[0];
    if (!PyList_Check(blocks)) {
        PyErr_SetString(PyExc_TypeError, "set_pages(): blocks must be a list");
        return NULL;
    }
    if (block_pages == 0 || block_pages % 64) {
        PyErr_SetString(PyExc_ValueError, "set_pages(): block_pages must be a multiple of 64");
        return NULL;
    }
    if (!get_int64s(args[1], "pages", &pv))
        return NULL;
    Py_ssize_t n = pv.len / 8, nblocks = PyList_GET_SIZE(blocks), status, at;
    const int64_t *pages = pv.buf;
    long long limit = (long long)nblocks * block_pages;
    PyObject *res = NULL;
    /* 1: check every page and hold the blocks it needs. */
    block_t *held = hold_page_blocks(blocks, pages, n, block_pages, limit, &status, &at);
    if (held == NULL) {
        if (status >= 0)
            res = PyLong_FromSsize_t(status);   /* map it and call again */
        else if (status == HOLD_OUTSIDE)
            PyErr_Format(PyExc_ValueError, "page %lld is outside the table's %lld pages",
                         (long long)pages[at], limit);
        PyBuffer_Release(&pv);
        return res;
    }
    /* 2: set the bits, holding every buffer. */
    {
        PyThreadState *ts = n >= GIL_WORDS ? PyEval_SaveThread() : NULL;
        set_pages_held(held, pages, n, block_pages, order);
        if (ts)
            PyEval_RestoreThread(ts);
    }
    release_held(held, nblocks);
    PyBuffer_Release(&pv);
    return PyLong_FromLong(-1);   /* every bit set */
}

/* ---- the hot accessors as methods: the C bases of Reader and TableView -----------
 *
 * The hottest accessors cost one Python-to-C call with no Python frame:
 * DirtyMemory.set_dirty_flag, get_dirty, set_dirty_range,
 * test_and_clear_dirty and set_dirty_pages are ViewCore's methods.  They
 * read the same fields the Python paths read (shmdirty/dirty.py,
 * DirtyMemory._<op>_py), which live here as C members so that Python's
 * stores to them are what C reads:
 *
 *   ReaderCore (the base of shmdirty.rcu.Reader): slot, nesting, online,
 *     seen, section_words;
 *   ViewCore (the base of shmdirty.table.TableView): _seen, _blocks,
 *     _flag_in_c, and the properties _local (this handle's threading.local;
 *     setting it forgets the cached reader), _table (setting it caches its
 *     ram_size), page_bits and block_pages.
 *
 * The GIL is held from the checks to the op (a long walk or page batch
 * releases it only while its section shows in the reader's nesting), as
 * between the Python path's bytecodes.  Anything the fast path declines
 * goes to self._<op>_py(...), with the caller's arguments as they came:
 * it checks, refreshes, maps or raises. */

typedef struct {
    PyObject_HEAD
    long long slot;            /* -1 while no slot is held */
    long long nesting;         /* > 0 inside a read-side section */
    unsigned long long seen;   /* the grace-period counter last observed */
    char online;               /* qsbr: inside a section (bool) */
    PyObject *section_words;   /* memb with a slot: (ctr address, gp address); else None */
} ReaderCore;

static void reader_dealloc(ReaderCore *self)
{
    Py_CLEAR(self->section_words);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef reader_members[] = {
    {"slot", T_LONGLONG, offsetof(ReaderCore, slot), 0, "this thread's slot, -1 if none"},
    {"nesting", T_LONGLONG, offsetof(ReaderCore, nesting), 0, "section depth, 0 outside"},
    {"seen", T_ULONGLONG, offsetof(ReaderCore, seen), 0, "grace-period counter last seen"},
    {"online", T_BOOL, offsetof(ReaderCore, online), 0, "qsbr: inside a section"},
    {"section_words", T_OBJECT, offsetof(ReaderCore, section_words), 0,
     "memb with a slot: (ctr, gp) word addresses; else None"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ReaderCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmdirty._kernel.ReaderCore",
    .tp_basicsize = sizeof(ReaderCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The fields of shmdirty.rcu.Reader that ViewCore.set_dirty_flag reads.",
    .tp_members = reader_members,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_new = PyType_GenericNew,
};

typedef struct {
    PyObject_HEAD
    long long seen;            /* _seen: the counter value the table was checked at */
    PyObject *blocks;          /* _blocks: per client, the mapped blocks (None: not yet) */
    PyObject *local;           /* _local: threading.local whose .reader is this thread's */
    PyObject *table;           /* _table */
    long long ram_end;         /* _table.ram_size, bytes */
    PyObject *page_bits_o, *block_pages_o;
    long long page_bits, block_pages;
    char flag_in_c;           /* _flag_in_c: the handle was made on the kernel backend */
    uint64_t reader_ts;        /* the thread state id `reader` was looked up in */
    PyObject *reader;          /* that thread's Reader (a ReaderCore) */
} ViewCore;

static PyObject *str_reader, *str_ram_size;

static int view_traverse(ViewCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->blocks);
    Py_VISIT(self->local);
    Py_VISIT(self->table);
    Py_VISIT(self->reader);
    return 0;
}

static int view_clear(ViewCore *self)
{
    Py_CLEAR(self->blocks);
    Py_CLEAR(self->local);
    Py_CLEAR(self->table);
    Py_CLEAR(self->reader);
    Py_CLEAR(self->page_bits_o);
    Py_CLEAR(self->block_pages_o);
    return 0;
}

static void view_dealloc(ViewCore *self)
{
    PyObject_GC_UnTrack(self);
    view_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A property stored as an object; NULL (never set) reads as AttributeError,
 * so an unattached handle's __getattr__ still runs (dirty.py _Unattached). */
static PyObject *got(PyObject *o, const char *name)
{
    if (o == NULL)
        return PyErr_Format(PyExc_AttributeError, "%s", name);
    return Py_NewRef(o);
}

static int no_delete(PyObject *value, const char *name)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "%s cannot be deleted", name);
        return 1;
    }
    return 0;
}

static PyObject *view_get_local(ViewCore *self, void *c) { return got(self->local, "_local"); }
static int view_set_local(ViewCore *self, PyObject *value, void *c)
{
    if (no_delete(value, "_local"))
        return -1;
    Py_XSETREF(self->local, Py_NewRef(value));
    Py_CLEAR(self->reader);  /* a new threading.local: readers are looked up again */
    return 0;
}

static PyObject *view_get_table(ViewCore *self, void *c) { return got(self->table, "_table"); }
static int view_set_table(ViewCore *self, PyObject *value, void *c)
{
    if (no_delete(value, "_table"))
        return -1;
    PyObject *rs = PyObject_GetAttr(value, str_ram_size);
    if (rs == NULL)
        return -1;
    long long ram_end = PyLong_AsLongLong(rs);
    Py_DECREF(rs);
    if (ram_end == -1 && PyErr_Occurred())
        return -1;
    Py_XSETREF(self->table, Py_NewRef(value));
    self->ram_end = ram_end;
    return 0;
}

static int set_geometry(ViewCore *self, PyObject *value, PyObject **obj, long long *out,
                        const char *name)
{
    if (no_delete(value, name))
        return -1;
    long long v = PyLong_Check(value) ? PyLong_AsLongLong(value) : -1;
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be an int >= 0, not %R", name, value);
        return -1;
    }
    Py_XSETREF(*obj, Py_NewRef(value));
    *out = v;
    return 0;
}

static PyObject *view_get_page_bits(ViewCore *self, void *c)
{
    return got(self->page_bits_o, "page_bits");
}
static int view_set_page_bits(ViewCore *self, PyObject *value, void *c)
{
    return set_geometry(self, value, &self->page_bits_o, &self->page_bits, "page_bits");
}
static PyObject *view_get_block_pages(ViewCore *self, void *c)
{
    return got(self->block_pages_o, "block_pages");
}
static int view_set_block_pages(ViewCore *self, PyObject *value, void *c)
{
    return set_geometry(self, value, &self->block_pages_o, &self->block_pages, "block_pages");
}

/* This thread's Reader (borrowed), or NULL (nothing raised): none yet, or
 * _local is not a threading.local any more (a closed handle).  Cached per
 * thread state id, which CPython never reuses; a thread's Reader is never
 * replaced (rcu.Rcu.reader), so a cached one is this thread's. */
static ReaderCore *this_reader(ViewCore *self)
{
    uint64_t ts = PyThreadState_GetID(PyThreadState_Get());
    if (self->reader != NULL && self->reader_ts == ts)
        return (ReaderCore *)self->reader;
    PyObject *local = self->local;
    if (local == NULL)
        return NULL;
    Py_INCREF(local);   /* the lookup may run Python code that replaces it */
    PyObject *r = PyObject_GetAttr(local, str_reader);
    Py_DECREF(local);
    if (r == NULL) {
        PyErr_Clear();  /* the slow path makes it, or raises what is wrong */
        return NULL;
    }
    if (!PyObject_TypeCheck(r, &ReaderCoreType)) {
        Py_DECREF(r);
        return NULL;
    }
    Py_XSETREF(self->reader, r);
    self->reader_ts = ts;
    return (ReaderCore *)r;
}

/* How an op of this thread may run on the view's table (the Python twin's
 * checks, read for read): 0 it may not (the Python path); 1 inside a
 * section already (qsbr online, or any flavor nested) whose table was
 * checked at `seen`; 2 memb outside any section: open one on *ctr / *gp
 * with memb_open (-1: an exception). */
enum { NO_SECTION, IN_SECTION, OPEN_SECTION };

static int section_mode(ViewCore *self, ReaderCore **rp, volatile uint64_t **ctr,
                        volatile uint64_t **gp)
{
    if (!ready || !self->flag_in_c)
        return NO_SECTION;
    /* First: a lookup that misses the cache may run Python code (gc, a
     * finalizer) that changes this view; every field is read after it, and
     * the callers read the view's lists only after this returns. */
    ReaderCore *r = this_reader(self);
    if (r == NULL || self->blocks == NULL || self->local == NULL ||
        self->page_bits_o == NULL || self->block_pages_o == NULL || self->table == NULL ||
        self->page_bits > 62 || self->block_pages <= 0 || self->block_pages % 64)
        return NO_SECTION;
    if (r->slot < 0 || (long long)r->seen != self->seen)
        return NO_SECTION;
    *rp = r;
    if (r->online || r->nesting > 0)
        return IN_SECTION;
    PyObject *w = r->section_words;
    if (w == NULL || !PyTuple_CheckExact(w) || PyTuple_GET_SIZE(w) != 2)
        return NO_SECTION;
    if (!get_addr(PyTuple_GET_ITEM(w, 0), ctr) || !get_addr(PyTuple_GET_ITEM(w, 1), gp))
        return -1;
    return OPEN_SECTION;
}

/* Enter the section of a fast path that may release the GIL: open memb's
 * own (0 if the counter moved: declined) and show it in the reader's
 * nesting while it runs, as read_lock does on the Python path, so that
 * another thread's close() (Rcu.sections_open, Rcu.close) sees this thread
 * inside and refuses rather than free the slot and unmap the header the
 * section still stores into.  `r` is held until c_section_leave (that close
 * may drop it); *outermost says whether nesting was raised. */
static int c_section_enter(int mode, ReaderCore *r, volatile uint64_t *ctr,
                           volatile uint64_t *gp, int *outermost)
{
    if (mode == OPEN_SECTION && !memb_open(ctr, gp, r->seen))
        return 0;
    Py_INCREF(r);
    *outermost = r->nesting == 0;
    if (*outermost)
        r->nesting = 1;
    return 1;
}

static void c_section_leave(int mode, ReaderCore *r, volatile uint64_t *ctr, int outermost)
{
    if (outermost)
        r->nesting = 0;
    if (mode == OPEN_SECTION)
        memb_close(ctr);
    Py_DECREF(r);
}

/* 1 done, 0 declined, -1 error. */
static int view_fast_flag(ViewCore *self, PyObject *addr, PyObject *client)
{
    ReaderCore *r;
    volatile uint64_t *ctr, *gp;
    int mode = section_mode(self, &r, &ctr, &gp);
    /* release on the bit: whoever takes it (acquire) sees the page written before it. */
    if (mode == IN_SECTION)
        return set_page_in(self->blocks, client, addr, self->ram_end, (long)self->page_bits,
                           self->block_pages, RELEASE);
    if (mode == OPEN_SECTION)
        return memb_set_in(ctr, gp, r->seen, self->blocks, client, addr, self->ram_end,
                           (long)self->page_bits, self->block_pages, RELEASE);
    return mode;  /* 0 or -1 */
}

/* The range accessors' fast path: (start, length) exact ints inside RAM,
 * `who` a client (WALK_ANY, WALK_TAKE) or a nonzero client mask (WALK_SET),
 * every block needed mapped, and for WALK_TAKE no block covered whole (the
 * Python path decides whether to swap it).  Returns the result + 1 (1 or
 * 2), 0 if declined, -1 on error. */
static int view_fast_range(ViewCore *self, PyObject *start_o, PyObject *length_o,
                           PyObject *who_o, int op)
{
    int overflow, o2, o3;
    if (!PyLong_CheckExact(start_o) || !PyLong_CheckExact(length_o) || !PyLong_CheckExact(who_o))
        return 0;
    long long start = PyLong_AsLongLongAndOverflow(start_o, &overflow);
    long long length = PyLong_AsLongLongAndOverflow(length_o, &o2);
    long who = PyLong_AsLongAndOverflow(who_o, &o3);
    if (overflow || o2 || o3 || start < 0 || length <= 0 || who < 0)
        return 0;
    ReaderCore *r;
    volatile uint64_t *ctr, *gp;
    int mode = section_mode(self, &r, &ctr, &gp);   /* first: it may run Python code */
    if (mode <= 0)
        return mode;
    if (length > self->ram_end - start || !PyList_Check(self->blocks))
        return 0;
    Py_ssize_t nclients = PyList_GET_SIZE(self->blocks);
    unsigned mask;
    if (nclients > 8)
        return 0;
    if (op == WALK_SET) {
        if (who == 0 || who >= (1L << nclients))
            return 0;
        mask = (unsigned)who;
    } else {
        if (who >= nclients)
            return 0;
        mask = 1u << who;
    }
    long long pb = self->page_bits, bp = self->block_pages;
    long long page = start >> pb, end = (start + length + (1LL << pb) - 1) >> pb;
    if (op == WALK_TAKE && end - page >= bp)
        return 0;
    /* Every block needed is listed and mapped: else the Python path maps it. */
    Py_ssize_t i0 = (Py_ssize_t)(page / bp), i1 = (Py_ssize_t)((end - 1) / bp);
    for (Py_ssize_t c = 0; c < nclients; c++) {
        if (!(mask >> c & 1))
            continue;
        PyObject *blocks = PyList_GET_ITEM(self->blocks, c);
        if (!PyList_CheckExact(blocks) || i1 >= PyList_GET_SIZE(blocks))
            return 0;
        for (Py_ssize_t i = i0; i <= i1; i++)
            if (PyList_GET_ITEM(blocks, i) == Py_None)
                return 0;
    }
    int outermost;
    if (!c_section_enter(mode, r, ctr, gp, &outermost))
        return 0;
    /* Orders as shmdirty.bitmap._WALK_ORDER: tests relaxed (a racing set may
     * or may not be seen, as in QEMU); set release (a taker sees the page);
     * take acq_rel (it sees that page, and orders its earlier reads). */
    int order = op == WALK_SET ? RELEASE : op == WALK_TAKE ? ACQ_REL : RELAXED;
    PyObject *clients = Py_NewRef(self->blocks);  /* another thread may replace it */
    Py_ssize_t res = 0;
    for (Py_ssize_t c = 0; c < nclients && res >= 0; c++)
        if (mask >> c & 1)
            res = walk_core(PyList_GET_ITEM(clients, c), (Py_ssize_t)page, (Py_ssize_t)end,
                            (Py_ssize_t)bp, op, order);
    Py_DECREF(clients);
    c_section_leave(mode, r, ctr, outermost);
    if (res == -1)
        return -1;
    return res >= 0 ? 1 + (int)res : 0;  /* unmapped meanwhile: the Python path maps it */
}

static PyObject *ndarray_type;  /* numpy.ndarray, looked up on first use */

/* set_dirty_pages' fast path: `pages` a 1-D C-contiguous numpy array of
 * 64-bit integers (not empty), every page inside RAM and its block mapped,
 * `client` an exact int.  One pass checks every page and holds the blocks'
 * buffers, the section opens, a second pass sets the bits (one patomic `or`
 * each, release: a taker sees the page), the section closes.  1 done, 0
 * declined (nothing set), -1 error. */
static int view_fast_pages(ViewCore *self, PyObject *pages_o, PyObject *client_o)
{
    int overflow, res = 0;
    if (!PyLong_CheckExact(client_o))
        return 0;
    long client = PyLong_AsLongAndOverflow(client_o, &overflow);
    if (overflow || client < 0)
        return 0;
    if (ndarray_type == NULL) {
        PyObject *np = PyImport_ImportModule("numpy");
        ndarray_type = np ? PyObject_GetAttrString(np, "ndarray") : NULL;
        Py_XDECREF(np);
        if (ndarray_type == NULL || !PyType_Check(ndarray_type)) {
            Py_CLEAR(ndarray_type);
            PyErr_Clear();
            return 0;
        }
    }
    if (!PyObject_TypeCheck(pages_o, (PyTypeObject *)ndarray_type))
        return 0;
    Py_buffer pv;
    if (PyObject_GetBuffer(pages_o, &pv, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return 0;
    }
    const char *f = pv.format ? pv.format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    Py_ssize_t n = pv.len / 8;
    ReaderCore *r;
    volatile uint64_t *ctr, *gp;
    /* After everything that may run Python code (the import, the buffer),
     * before the view's lists are read. */
    int mode = pv.ndim == 1 && pv.itemsize == 8 && strlen(f) == 1 && strchr("qQlLnN", *f) &&
               n > 0 ? section_mode(self, &r, &ctr, &gp) : NO_SECTION;
    PyObject *blocks = mode > 0 && PyList_Check(self->blocks) &&
                       client < PyList_GET_SIZE(self->blocks)
                       ? PyList_GET_ITEM(self->blocks, client) : NULL;
    if (blocks == NULL || !PyList_CheckExact(blocks)) {
        PyBuffer_Release(&pv);
        return mode < 0 ? -1 : 0;
    }
    Py_INCREF(blocks);   /* another thread may replace the view's lists meanwhile */
    Py_INCREF(r);        /* and close() may drop the reader */
    const int64_t *pages = pv.buf;
    long long bp = self->block_pages, nblocks = PyList_GET_SIZE(blocks);
    long long limit = self->ram_end >> self->page_bits;
    if (nblocks * bp < limit)
        limit = nblocks * bp;
    /* 1: every page inside RAM, its block mapped (else the Python path). */
    Py_ssize_t status, at;
    block_t *held = hold_page_blocks(blocks, pages, n, bp, limit, &status, &at);
    int outermost;
    if (held == NULL)
        res = status == HOLD_ERROR ? -1 : 0;
    else if (c_section_enter(mode, r, ctr, gp, &outermost)) {
        /* 2: the bits, with the GIL released for a long batch. */
        PyThreadState *ts = n >= GIL_WORDS ? PyEval_SaveThread() : NULL;
        set_pages_held(held, pages, n, bp, RELEASE);
        if (ts)
            PyEval_RestoreThread(ts);
        c_section_leave(mode, r, ctr, outermost);
        res = 1;
    }
    if (held)
        release_held(held, (Py_ssize_t)nblocks);
    Py_DECREF(r);
    Py_DECREF(blocks);
    PyBuffer_Release(&pv);
    return res;
}

enum { OP_FLAG = -1, OP_PAGES = -2 };  /* view_call's ops besides the walks */

/* Run the fast path `fast` (an op) or hand the call, as it came, to the
 * Python path `slow`.  The result: None for WALK_SET, else a bool. */
static PyObject *view_call(ViewCore *self, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames, int op, Py_ssize_t want, const char *name,
                           PyObject *slow)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs == want && kwnames == NULL) {
        int r = op == OP_FLAG  ? view_fast_flag(self, args[0], args[1])
              : op == OP_PAGES ? view_fast_pages(self, args[0], args[1])
                               : view_fast_range(self, args[0], args[1], args[2], op);
        if (r < 0)
            return NULL;
        if (r > 0) {
            if (op < 0 || op == WALK_SET)
                Py_RETURN_NONE;
            return PyBool_FromLong(r - 1);
        }
    }
    /* The Python path binds the arguments and words any TypeError itself
     * (its __qualname__ is the public name: shmdirty/dirty.py). */
    PyObject *stack[8];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 7)
        return PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name,
                            want, nargs + nkw);
    stack[0] = (PyObject *)self;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++)
        stack[1 + i] = args[i];
    return PyObject_VectorcallMethod(slow, stack, (size_t)(1 + nargs), kwnames);
}

static PyObject *str_slow_flag, *str_slow_get, *str_slow_set, *str_slow_take, *str_slow_pages;

static PyObject *view_set_dirty_flag(ViewCore *self, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames)
{
    return view_call(self, args, nargsf, kwnames, OP_FLAG, 2, "set_dirty_flag", str_slow_flag);
}

static PyObject *view_set_dirty_pages(ViewCore *self, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames)
{
    return view_call(self, args, nargsf, kwnames, OP_PAGES, 2, "set_dirty_pages",
                     str_slow_pages);
}

static PyObject *view_get_dirty(ViewCore *self, PyObject *const *args, size_t nargsf,
                                PyObject *kwnames)
{
    return view_call(self, args, nargsf, kwnames, WALK_ANY, 3, "get_dirty", str_slow_get);
}

static PyObject *view_set_dirty_range(ViewCore *self, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames)
{
    return view_call(self, args, nargsf, kwnames, WALK_SET, 3, "set_dirty_range",
                     str_slow_set);
}

static PyObject *view_test_and_clear_dirty(ViewCore *self, PyObject *const *args,
                                           size_t nargsf, PyObject *kwnames)
{
    return view_call(self, args, nargsf, kwnames, WALK_TAKE, 3, "test_and_clear_dirty",
                     str_slow_take);
}

static PyMemberDef view_members[] = {
    {"_seen", T_LONGLONG, offsetof(ViewCore, seen), 0,
     "the reader's counter value this view's table was checked against (-1: re-read)"},
    {"_blocks", T_OBJECT_EX, offsetof(ViewCore, blocks), 0,
     "per client, per table index: the mapped block (None until first use)"},
    {"_flag_in_c", T_BOOL, offsetof(ViewCore, flag_in_c), 0,
     "the fast paths run here (else every call goes to the Python path _<op>_py)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef view_getset[] = {
    {"_local", (getter)view_get_local, (setter)view_set_local,
     "this handle's threading.local (.reader: this thread's Reader)", NULL},
    {"_table", (getter)view_get_table, (setter)view_set_table,
     "the table this process uses now", NULL},
    {"page_bits", (getter)view_get_page_bits, (setter)view_set_page_bits,
     "log2 of the page size in bytes", NULL},
    {"block_pages", (getter)view_get_block_pages, (setter)view_set_block_pages,
     "pages per bitmap block", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef view_methods[] = {
#define VIEW_METHOD(name, doc) \
    {#name, (PyCFunction)(void (*)(void))view_##name, METH_FASTCALL | METH_KEYWORDS, doc}
    VIEW_METHOD(set_dirty_flag,
        "set_dirty_flag($self, addr, client)\n--\n\n"
        "Mark the page holding byte address ``addr`` (int, bytes) dirty for\n"
        "``client`` (0 VGA, 1 CODE, 2 MIGRATION): QEMU's\n"
        "cpu_physical_memory_set_dirty_flag.  BadInput for an address outside\n"
        "RAM or a bad client; HandleClosed once closed.  On the kernel one C\n"
        "call (shmdirty/_kernel.c ViewCore)."),
    VIEW_METHOD(set_dirty_pages,
        "set_dirty_pages($self, pages, client)\n--\n\n"
        "Mark a batch of pages dirty for ``client``: ``pages`` a 1-D numpy array\n"
        "of integer page numbers (any int dtype), each as QEMU's\n"
        "cpu_physical_memory_set_dirty_flag would.  BadInput for another type, a\n"
        "page outside RAM or a bad client; HandleClosed once closed."),
    VIEW_METHOD(get_dirty,
        "get_dirty($self, start, length, client)\n--\n\n"
        "True (a bool) if any page of bytes [start, start+length) is dirty for\n"
        "``client``: QEMU's cpu_physical_memory_get_dirty.  BadInput for a range\n"
        "outside RAM, a negative length or a bad client; HandleClosed once closed."),
    VIEW_METHOD(set_dirty_range,
        "set_dirty_range($self, start, length, mask)\n--\n\n"
        "Mark the pages of bytes [start, start+length) dirty for every client of\n"
        "``mask`` (bit c: client c): QEMU's cpu_physical_memory_set_dirty_range.\n"
        "BadInput for a range outside RAM, a negative length or a bad mask;\n"
        "HandleClosed once closed."),
    VIEW_METHOD(test_and_clear_dirty,
        "test_and_clear_dirty($self, start, length, client)\n--\n\n"
        "Clear the pages of bytes [start, start+length) for ``client``; True (a\n"
        "bool) if any was dirty: QEMU's cpu_physical_memory_test_and_clear_dirty.\n"
        "BadInput for a range outside RAM, a negative length or a bad client;\n"
        "HandleClosed once closed."),
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ViewCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmdirty._kernel.ViewCore",
    .tp_basicsize = sizeof(ViewCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields of shmdirty.table.TableView that set_dirty_flag reads, and it.",
    .tp_members = view_members,
    .tp_getset = view_getset,
    .tp_methods = view_methods,
    .tp_traverse = (traverseproc)view_traverse,
    .tp_clear = (inquiry)view_clear,
    .tp_dealloc = (destructor)view_dealloc,
    .tp_new = PyType_GenericNew,
};

/* ---- the module ------------------------------------------------------------------ */

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))k_##name, METH_FASTCALL, doc}

static PyMethodDef methods[] = {
    {"setup", k_setup, METH_O, "setup({op name: address}): patomic's 8-byte op functions."},
    {"fence", k_fence, METH_NOARGS, "fence(): a full (seq_cst) fence."},
    FAST(load, "load(addr, order) -> int"),
    FAST(store, "store(addr, value, order)"),
    FAST(exchange, "exchange(addr, value, order) -> old"),
    FAST(compare_exchange, "compare_exchange(addr, expected, desired, succ, fail) -> (ok, seen)"),
    FAST(fetch_or, "fetch_or(addr, value, order) -> old"),
    FAST(fetch_and, "fetch_and(addr, value, order) -> old"),
    FAST(fetch_add, "fetch_add(addr, value, order) -> old (value taken modulo 2**64)"),
    FAST(bit_test_set, "bit_test_set(addr, bit, order) -> old bit"),
    FAST(bit_test_reset, "bit_test_reset(addr, bit, order) -> old bit"),
    FAST(or_bitmap, "or_bitmap(block, first, count, src, src_first, order)"),
    FAST(or_bitmaps, "or_bitmaps(blocks, first, count, src, src_first, order)"),
    FAST(or_sparse, "or_sparse(block, words, masks, order)"),
    FAST(take, "take(block, first, count, out, order) -> any taken"),
    FAST(any_set, "any_set(block, first, count) -> bool"),
    FAST(all_set, "all_set(block, first, count) -> bool"),
    FAST(set_range, "set_range(block, first, count, order)"),
    FAST(walk, "walk(blocks, page, end, block_pages, op, order) -> result or -1 - unmapped"),
    FAST(set_page, "set_page(clients, client, addr, ram_size, page_bits, block_pages, order) "
                   "-> done"),
    FAST(set_pages, "set_pages(blocks, pages, block_pages, order) -> -1 or unmapped block"),
    FAST(memb_set_page, "memb_set_page(ctr, gp, seen, clients, client, addr, ram_size, "
                        "page_bits, block_pages, order) -> done"),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shmdirty._kernel",
    "shmdirty's compiled kernel over patomic's op functions (see shmdirty/atomic.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void)
{
    const uint16_t one = 1;
    if (*(const unsigned char *)&one != 1) {
        PyErr_SetString(PyExc_ImportError, "shmdirty._kernel needs a little-endian machine");
        return NULL;
    }
    str_base = PyUnicode_InternFromString("base");
    str_words = PyUnicode_InternFromString("words");
    str_reader = PyUnicode_InternFromString("reader");
    str_ram_size = PyUnicode_InternFromString("ram_size");
    str_slow_flag = PyUnicode_InternFromString("_set_dirty_flag_py");
    str_slow_get = PyUnicode_InternFromString("_get_dirty_py");
    str_slow_set = PyUnicode_InternFromString("_set_dirty_range_py");
    str_slow_take = PyUnicode_InternFromString("_test_and_clear_dirty_py");
    str_slow_pages = PyUnicode_InternFromString("_set_dirty_pages_py");
    if (!str_base || !str_words || !str_reader || !str_ram_size || !str_slow_flag ||
        !str_slow_get || !str_slow_set || !str_slow_take || !str_slow_pages)
        return NULL;
    if (PyType_Ready(&ReaderCoreType) < 0 || PyType_Ready(&ViewCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "ReaderCore", (PyObject *)&ReaderCoreType) < 0 ||
        PyModule_AddObjectRef(m, "ViewCore", (PyObject *)&ViewCoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
