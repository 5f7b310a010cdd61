/*
 * shmdirty._kernel: shmdirty's compiled atomic kernel, the one header of its
 * C files (shmdirty/_kernel_src/).
 *
 * Every atomic instruction here is one of patomic's op functions, the ones
 * the `atomics` (or `atomics2`) package ships: shmdirty/atomic.py takes
 * their addresses from the package's 8-byte op table at import and hands
 * them to setup() once.  Nothing is linked against patomic; the package
 * keeps its library loaded.  What these files add is the call: a
 * METH_FASTCALL function costs tens of ns where a cffi call costs ~1 us, and
 * the batch loops of block.c walk a whole bitmap block in C.
 *
 * Addresses are Python ints (shmdirty.atomic.Words.ptr() checks them
 * against their buffer); here they are checked for alignment.  Batch ops
 * take the block's buffer (its numpy words), check every index, count and
 * order first and raise ValueError before touching memory, then release
 * the GIL while they hold the buffer.
 *
 * Bit b of a block is bit b % 64 of word b / 64 (KVM's little-endian
 * dirty log).  Memory orders use patomic's (C11's) numbering.
 *
 * The files, one idea each:
 *   ops.c     patomic's op pointers (setup), argument checks, single ops on one word
 *   block.c   batch ops over one block and the loops over one block's bits
 *   walk.c    ops over one client's list of blocks: the seed's block walk,
 *             one page, a batch of pages
 *   cores.c   the memb read-side section of the C paths; ReaderCore and
 *             ViewCore, the C bases of rcu.Reader and table.TableView, whose
 *             methods are the hot accessors
 *   module.c  the module's function table and init
 * Small helpers that were inlined when this was one file are static inline
 * here, and every name shared between the files is hidden (not exported from
 * the extension, called and read directly, never through the PLT / GOT), so
 * the compiled code is the one file's.
 */
#ifndef SHMDIRTY_KERNEL_H
#define SHMDIRTY_KERNEL_H

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

#pragma GCC visibility push(hidden)

/* patomic's op functions for 8-byte words (ops.c, filled by setup()). */
struct patomic_ops {
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
};
extern struct patomic_ops ops;
/* setup() was called (it needs contract() first: then `named` too). */
extern int ready;
/* The op names setup() takes, in the struct's order (ops.c). */
#define NOPS 10
extern const char *const op_names[NOPS];
/* A word no other process sees (ops.c): full_fence's. */
extern uint64_t fence_word;
/* The names the kernel reads or calls on Python objects, interned, from
 * contract() (module.c: shmdirty/atomic.py declares them); `named` once set. */
extern PyObject *str_base, *str_words, *str_reader, *str_ram_size;
extern PyObject *str_slow_flag, *str_slow_get, *str_slow_set, *str_slow_take, *str_slow_pages;
extern int named;

/* A full fence: a seq_cst read-modify-write on fence_word (as
 * shmdirty.atomic.fence does from Python). */
static inline void full_fence(void)
{
    uint64_t zero = 0, old;
    ops.fetch_add(&fence_word, &zero, SEQ_CST, &old);
}

/* ---- argument checks (ops.c; the small ones inline here) ---------------------- */

static inline int not_ready(void)
{
    if (!ready) {
        PyErr_SetString(PyExc_RuntimeError, "shmdirty._kernel: setup() was not called");
        return 1;
    }
    return 0;
}

static inline int nargs_ok(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return 0;
    }
    return 1;
}

int get_u64(PyObject *o, const char *what, uint64_t *out);
int get_index(PyObject *o, const char *what, Py_ssize_t *out);
int get_addr(PyObject *o, volatile uint64_t **out);

enum { ORD_LOAD, ORD_STORE, ORD_RMW };
int get_order(PyObject *o, int kind, int *out);

/* The order of the plain all-ones stores of a set with RMW order `order`:
 * release if the caller's order releases (the final fence then orders them
 * before what follows), relaxed otherwise. */
static inline int store_order(int order)
{
    return order >= RELEASE ? RELEASE : RELAXED;
}

/* The words of a block: a writable, C-contiguous, 8-byte aligned buffer. */
typedef struct {
    Py_buffer view;
    volatile uint64_t *w;
    Py_ssize_t n;  /* words */
} block_t;
int get_block(PyObject *o, block_t *b);
int get_int64s(PyObject *o, const char *what, Py_buffer *view);

/* Bits [first, first + count) inside a block of n words. */
static inline int range_ok(Py_ssize_t first, Py_ssize_t count, Py_ssize_t nwords)
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

/* ---- the loops over one block's bits (block.c) ---------------------------------- */

uint64_t loop_take(volatile uint64_t *w, Py_ssize_t first, Py_ssize_t count, uint64_t *out,
                   int order);
int loop_test(volatile uint64_t *w, Py_ssize_t first, Py_ssize_t count, int want_all);
int loop_set(volatile uint64_t *w, Py_ssize_t first, Py_ssize_t count, int order);

/* ---- ops over one client's blocks (walk.c) -------------------------------------- */

int set_page_in(PyObject *clients, PyObject *client_o, PyObject *addr_o, long long ram_size,
                long page_bits, long long block_pages, int order);

static inline int geometry_ok(long page_bits, long long block_pages)
{
    if (page_bits < 0 || page_bits > 62 || block_pages <= 0 || block_pages % 64) {
        PyErr_SetString(PyExc_ValueError, "bad page_bits or block_pages");
        return 0;
    }
    return 1;
}
enum { WALK_ANY, WALK_ALL, WALK_SET, WALK_TAKE };
Py_ssize_t walk_core(PyObject *blocks, Py_ssize_t page, Py_ssize_t end, Py_ssize_t block_pages,
                     int op, int order);
void set_pages_held(block_t *held, const int64_t *pages, Py_ssize_t n, long long bp,
                    int order);

enum { HOLD_ERROR = -1, HOLD_OUTSIDE = -2 };
static inline void release_held(block_t *held, Py_ssize_t nblocks)
{
    for (Py_ssize_t i = 0; i < nblocks; i++)
        if (held[i].w)
            PyBuffer_Release(&held[i].view);
    PyMem_Free(held);
}
block_t *hold_page_blocks(PyObject *blocks, const int64_t *pages, Py_ssize_t n, long long bp,
                          long long limit, Py_ssize_t *status, Py_ssize_t *at);

/* ---- the module's functions (module.c's table) ---------------------------------- */

#define KFUNC(name) PyObject *k_##name(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
PyObject *k_setup(PyObject *self, PyObject *table);
PyObject *k_fence(PyObject *self, PyObject *unused);
KFUNC(load); KFUNC(store); KFUNC(exchange); KFUNC(compare_exchange); KFUNC(fetch_or);
KFUNC(fetch_and); KFUNC(fetch_add); KFUNC(bit_test_set); KFUNC(bit_test_reset);
KFUNC(or_bitmap); KFUNC(or_bitmaps); KFUNC(or_sparse); KFUNC(take); KFUNC(any_set);
KFUNC(all_set); KFUNC(set_range); KFUNC(walk); KFUNC(set_page); KFUNC(set_pages);
KFUNC(memb_set_page);
#undef KFUNC
extern PyTypeObject ReaderCoreType, ViewCoreType;

#pragma GCC visibility pop

#endif
