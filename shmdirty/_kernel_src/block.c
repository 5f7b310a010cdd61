/*
 * shmdirty._kernel, block.c: the batch ops over one bitmap block (block,
 * ...): or_bitmap(s), or_sparse, take, any_set / all_set, set_range, and
 * the loops over one block's bits that walk.c reuses.
 */
#include "kernel.h"

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
PyObject *k_or_bitmap(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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
PyObject *k_or_bitmaps(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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
PyObject *k_or_sparse(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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
uint64_t loop_take(volatile uint64_t *w, Py_ssize_t first, Py_ssize_t count,
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
int loop_test(volatile uint64_t *w, Py_ssize_t first, Py_ssize_t count, int want_all)
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
int loop_set(volatile uint64_t *w, Py_ssize_t first, Py_ssize_t count, int order)
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
PyObject *k_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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

PyObject *k_any_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return test_range("any_set", 0, args, nargs);
}

PyObject *k_all_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return test_range("all_set", 1, args, nargs);
}

/* set_range(block, first, count, order): loop_set, then a fence if it stored. */
PyObject *k_set_range(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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
