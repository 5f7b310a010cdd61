/*
 * shmdirty._kernel, module.c: the contract with the Python layer, the
 * module's function table and its init.
 */
#include "kernel.h"

/* ---- the contract with the Python layer ---------------------------------------------
 *
 * The names the kernel reads or calls on Python objects are not spelled
 * here: shmdirty/atomic.py declares them once (KERNEL_SLOW_PATHS,
 * KERNEL_ATTRIBUTES) and hands them over with contract() when it loads the
 * kernel, before setup().  Each table must hold exactly the keys below;
 * tests/test_kernel.py checks the rest of the contract (the C members
 * against READER_FIELDS / VIEW_FIELDS, the slow paths' signatures). */
PyObject *str_base, *str_words, *str_reader, *str_ram_size;
PyObject *str_slow_flag, *str_slow_get, *str_slow_set, *str_slow_take, *str_slow_pages;
int named;

struct contract_name {
    const char *key;
    PyObject **name;
};

/* ViewCore's methods -> the Python path each hands a declined call to (cores.c). */
static const struct contract_name slow_paths[] = {
    {"set_dirty_flag", &str_slow_flag}, {"set_dirty_pages", &str_slow_pages},
    {"get_dirty", &str_slow_get}, {"set_dirty_range", &str_slow_set},
    {"test_and_clear_dirty", &str_slow_take},
};
/* What the kernel reads by name -> the attribute's name. */
static const struct contract_name attributes[] = {
    {"block_base", &str_base}, {"block_words", &str_words}, {"local_reader", &str_reader},
    {"table_ram_size", &str_ram_size},
};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* Check one table ({key: attribute name}, exactly the keys of `want`); 0 on error. */
static int check_names(PyObject *table, const char *what, const struct contract_name *want,
                       size_t n)
{
    if (!PyDict_Check(table)) {
        PyErr_Format(PyExc_TypeError, "contract(): %s must be a dict, not %.100s", what,
                     Py_TYPE(table)->tp_name);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        PyObject *v = PyDict_GetItemString(table, want[i].key);
        if (v == NULL || !PyUnicode_Check(v)) {
            PyErr_Format(PyExc_ValueError, "contract(): %s has no name (a str) for %s", what,
                         want[i].key);
            return 0;
        }
    }
    if ((size_t)PyDict_GET_SIZE(table) != n) {
        PyErr_Format(PyExc_ValueError, "contract(): %s holds %zd names; the kernel reads %zu",
                     what, PyDict_GET_SIZE(table), n);
        return 0;
    }
    return 1;
}

static void take_names(PyObject *table, const struct contract_name *want, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        PyObject *v = PyUnicode_FromObject(PyDict_GetItemString(table, want[i].key));
        PyUnicode_InternInPlace(&v);
        Py_XSETREF(*want[i].name, v);
    }
}

/* contract(slow_paths, attributes): the names, from shmdirty/atomic.py. */
static PyObject *k_contract(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!nargs_ok("contract", nargs, 2) ||
        !check_names(args[0], "slow_paths", slow_paths, COUNT(slow_paths)) ||
        !check_names(args[1], "attributes", attributes, COUNT(attributes)))
        return NULL;
    take_names(args[0], slow_paths, COUNT(slow_paths));
    take_names(args[1], attributes, COUNT(attributes));
    named = 1;
    Py_RETURN_NONE;
}

/* ---- the module ------------------------------------------------------------------ */

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))k_##name, METH_FASTCALL, doc}

static PyMethodDef methods[] = {
    {"contract", (PyCFunction)(void (*)(void))k_contract, METH_FASTCALL,
     "contract(slow_paths, attributes): the Python names the kernel uses (atomic.py)."},
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
    if (PyType_Ready(&ReaderCoreType) < 0 || PyType_Ready(&ViewCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *names = PyTuple_New((Py_ssize_t)NOPS);
    for (size_t i = 0; names != NULL && i < NOPS; i++)
        PyTuple_SET_ITEM(names, (Py_ssize_t)i, PyUnicode_FromString(op_names[i]));
    /* OP_NAMES: the op names setup() takes (atomic.OPS must hold exactly these). */
    int bad = names == NULL || PyModule_AddObjectRef(m, "OP_NAMES", names) < 0;
    Py_XDECREF(names);
    if (bad || PyModule_AddObjectRef(m, "ReaderCore", (PyObject *)&ReaderCoreType) < 0 ||
        PyModule_AddObjectRef(m, "ViewCore", (PyObject *)&ViewCoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
