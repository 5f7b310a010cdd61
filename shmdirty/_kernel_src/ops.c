/*
 * shmdirty._kernel, ops.c: patomic's op pointers, argument checks, setup()
 * and the single ops on one word (shmdirty/_kernel_src/kernel.h has the
 * whole picture).
 */
#include "kernel.h"

/* patomic's op functions for 8-byte words, filled by setup(). */
struct patomic_ops ops;
int ready;

/* The names setup() takes, in the order of struct patomic_ops (shmdirty/atomic.py's
 * OPS holds exactly these: the one table of op names). */
const char *const op_names[] = {"load", "store", "exchange", "cmpxchg_strong",
                                       "or", "fetch_or", "fetch_and", "fetch_add",
                                       "test_set", "test_reset"};

/* A word no other process sees: a seq_cst read-modify-write on it is a full
 * fence (as shmdirty.atomic.fence does from Python). */
uint64_t fence_word;

/* ---- argument checks --------------------------------------------------------- */

/* An unsigned 64-bit value: TypeError if not an int, ValueError if outside. */
int get_u64(PyObject *o, const char *what, uint64_t *out)
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
int get_index(PyObject *o, const char *what, Py_ssize_t *out)
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
int get_addr(PyObject *o, volatile uint64_t **out)
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

/* A memory order valid for a load, a store or a read-modify-write (ORD_*). */
int get_order(PyObject *o, int kind, int *out)
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

/* The words of a block: a writable, C-contiguous, 8-byte aligned buffer (block_t). */
int get_block(PyObject *o, block_t *b)
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
int get_int64s(PyObject *o, const char *what, Py_buffer *view)
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


/* ---- setup --------------------------------------------------------------------- */

PyObject *k_setup(PyObject *self, PyObject *table)
{
    void *fp[NOPS];
    if (!PyDict_Check(table)) {
        PyErr_SetString(PyExc_TypeError, "setup() takes a dict of op name -> address");
        return NULL;
    }
    if (!named) {  /* so that `ready` implies the names are there too */
        PyErr_SetString(PyExc_RuntimeError, "shmdirty._kernel: contract() must come first");
        return NULL;
    }
    if ((size_t)PyDict_GET_SIZE(table) != NOPS) {
        PyErr_Format(PyExc_ValueError, "setup(): %zd ops; the kernel takes exactly %zu "
                     "(OP_NAMES)", PyDict_GET_SIZE(table), NOPS);
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

PyObject *k_load(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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

PyObject *k_store(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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

PyObject *k_exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return fetch_op("exchange", ops.exchange, args, nargs);
}

PyObject *k_fetch_or(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return fetch_op("fetch_or", ops.fetch_or, args, nargs);
}

PyObject *k_fetch_and(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return fetch_op("fetch_and", ops.fetch_and, args, nargs);
}

/* fetch_add takes any int and adds it modulo 2**64 (a negative one subtracts). */
PyObject *k_fetch_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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

PyObject *k_compare_exchange(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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

PyObject *k_bit_test_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return bit_op("bit_test_set", ops.test_set, args, nargs);
}

PyObject *k_bit_test_reset(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return bit_op("bit_test_reset", ops.test_reset, args, nargs);
}

PyObject *k_fence(PyObject *self, PyObject *unused)
{
    if (not_ready())
        return NULL;
    full_fence();
    Py_RETURN_NONE;
}
