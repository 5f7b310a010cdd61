/*
 * shmdirty._kernel, module.c: the module's function table and its init.
 */
#include "kernel.h"

PyObject *str_base, *str_words, *str_reader, *str_ram_size;
PyObject *str_slow_flag, *str_slow_get, *str_slow_set, *str_slow_take, *str_slow_pages;

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
