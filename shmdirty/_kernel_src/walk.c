/*
 * shmdirty._kernel, walk.c: ops over one client's list of blocks: the
 * seed's block walk (walk), one page (set_page) and a batch of pages
 * (set_pages), and the block holders the ViewCore fast paths share.
 */
#include "kernel.h"

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
int set_page_in(PyObject *clients, PyObject *client_o, PyObject *addr_o,
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

PyObject *k_set_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (not_ready() || !nargs_ok("set_page", nargs, 7))
        return NULL;
    int r = set_page_core(args);
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


/* walk(blocks, page, end, block_pages, op, order) -> int: the seed's block
 * walk over pages [page, end) of one client's blocks (as for set_pages),
 * with op 0 any_set, 1 all_set, 2 set_range, 3 take (bits dropped) on each
 * piece, in one call.  Returns the result (any / all / any bit taken: 0 or
 * 1; set: 0), or -1 - i if block i is needed but not mapped (nothing done:
 * map it and call again).  Empty range: any 0, all 1. */
/* The walk over pages [page, end) of one client's blocks: its result (0 or
 * 1) >= 0; -1 with an exception; -2 - i if block i is needed but not mapped
 * (nothing done).  Checked by the caller: block_pages, op, page <= end. */
Py_ssize_t walk_core(PyObject *blocks, Py_ssize_t page, Py_ssize_t end,
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

PyObject *k_walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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
void set_pages_held(block_t *held, const int64_t *pages, Py_ssize_t n,
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

block_t *hold_page_blocks(PyObject *blocks, const int64_t *pages, Py_ssize_t n,
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
PyObject *k_set_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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
