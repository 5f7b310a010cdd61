/*
 * shmdirty._kernel, cores.c: the memb read-side section of the C paths, and
 * ReaderCore / ViewCore, the C bases of shmdirty.rcu.Reader and
 * shmdirty.table.TableView with the hot accessors as their methods.
 */
#include "kernel.h"

/* ---- the memb read-side section of the C paths ----------------------------------------
 *
 * The Python twin is Reader.read_lock / read_unlock in shmdirty/rcu.py.  A
 * memb section is written twice because the C fast paths must open one
 * without a Python call (that call would cost what the fast path saves);
 * both pass patomic the same orders, for the same reasons:
 *   entry: store the counter value `seen` into this reader's slot `ctr`,
 *          seq_cst, then load the grace-period counter `gp`, seq_cst: the
 *          reader's half of the Dekker pair with a grace period's advance
 *          and scan (shmdirty/grace.py): either the scan sees `seen` in the
 *          slot and waits, or this load sees the advance and the table it
 *          checked is not used;
 *   exit:  store 0 into `ctr`, release: every access of the section happens
 *          before a waiter that reads 0.
 * One difference: when `gp` moved, read_lock stores the fresh value and
 * stays inside (its caller re-reads the table), where memb_open stores 0 and
 * declines (the Python path then runs its own section).  The GIL is held
 * from entry to exit, or the section shows in the reader's nesting
 * (c_section_enter), so no other thread of this process closes the slot
 * meanwhile.  tests/test_kernel.py
 * (test_the_memb_section_passes_the_same_orders_in_c_and_python) records
 * the orders both twins pass. */

/* Open a memb read-side section of its own on slot counter `ctr` for a
 * reader whose table was checked at counter value `seen`; 0 if the counter
 * `gp` moved (the section is closed again: the caller declines). */
static int memb_open(volatile uint64_t *ctr, volatile uint64_t *gp, uint64_t seen)
{
    uint64_t now, zero = 0;
    /* seq_cst store, then seq_cst load: the reader's half of the Dekker pair
     * (above): either a grace period's scan sees `seen` in the slot and
     * waits, or this load sees its advance and the table is not used. */
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

/* memb_set_page(ctr, gp, seen, clients, client, addr, ram_size, page_bits,
 * block_pages, order) -> bool: set_page inside one memb read-side section, for a reader
 * outside any section whose table was checked against counter value `seen`.
 * The section is memb_open / memb_close (above), read_lock / read_unlock's twin:
 * store `seen` into this reader's slot counter `ctr` (seq_cst), load the
 * grace-period counter `gp` (seq_cst: the reader's half of the Dekker pair);
 * if it moved, the table may be stale: store 0 (release) and return False
 * (the caller takes the slow path, which re-reads it).  Else set_page, then
 * store 0 with release (every access of the section happens before a waiter
 * that sees 0).  The GIL is held throughout, so no other thread of this
 * process runs inside.  memb_set_in is its core. */
PyObject *k_memb_set_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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
 *     ram_prefix: RAM up to the first hole), page_bits and block_pages.
 *
 * The GIL is held from the checks to the op (a long walk or page batch
 * releases it only while its section shows in the reader's nesting), as
 * between the Python path's bytecodes.  Anything the fast path declines
 * goes to self._<op>_py(...), with the caller's arguments as they came:
 * it checks, refreshes, maps or raises.
 *
 * These fields, the methods and their Python paths are the contract
 * declared once in shmdirty/atomic.py (READER_FIELDS, VIEW_FIELDS,
 * KERNEL_SLOW_PATHS, KERNEL_ATTRIBUTES): the names this file calls or reads
 * on Python objects come from there through contract() (module.c), and
 * tests/test_kernel.py checks the members below against the table. */

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

PyTypeObject ReaderCoreType = {
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
    long long ram_end;         /* _table.ram_prefix: RAM below it, no hole (bytes) */
    PyObject *page_bits_o, *block_pages_o;
    long long page_bits, block_pages;
    char flag_in_c;           /* _flag_in_c: the handle was made on the kernel backend */
    uint64_t reader_ts;        /* the thread state id `reader` was looked up in */
    PyObject *reader;          /* that thread's Reader (a ReaderCore) */
} ViewCore;


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
    if (!named) {
        PyErr_SetString(PyExc_RuntimeError, "shmdirty._kernel: contract() was not called");
        return -1;
    }
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
    if (slow == NULL)   /* not named yet: shmdirty/atomic.py names it at load */
        return PyErr_Format(PyExc_RuntimeError, "%s(): shmdirty._kernel's contract() was "
                            "not called", name);
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
        "call (shmdirty/_kernel_src/cores.c ViewCore)."),
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

PyTypeObject ViewCoreType = {
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

