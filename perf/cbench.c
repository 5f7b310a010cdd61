/*
 * cbench: the hardware limit for shmdirty's perf workloads.
 *
 * The seed's loops in C with __atomic builtins, over the same layout: per
 * client a table of block pointers (DIRTY_MEMORY_BLOCK_SIZE pages each),
 * read with an acquire load per op as atomic_rcu_read does.  No RCU
 * bookkeeping and no growth: this is what the hardware does, nothing more.
 * Threads of one process stand in for worker processes (the atomics are the
 * same).  Built by perf/cbaseline.py with `cc -O2 -pthread`.
 *
 * usage: cbench OP WORKERS SECONDS GUEST_PAGES RANGE_PAGES BATCH PATTERN SEED
 * prints: {"ops": [per thread], "seconds": [timed seconds per thread]}
 *
 * Like the Python side: one op is one call (set_dirty_pages: one batch;
 * set_dirty_lebitmap / sync_dirty_bitmap: the thread's whole slice); the
 * untimed reset before every bulk call puts the slice back.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { VGA = 0, CODE = 1, MIGRATION = 2, NUM = 3 };
#define BLOCK_PAGES (256UL * 1024 * 8)
#define BLOCK_WORDS (BLOCK_PAGES / 64)
#define ONES (~0ULL)
#define SEQ __ATOMIC_SEQ_CST

typedef struct {
    uint64_t nblocks;
    uint64_t *blocks[];
} table_t;

static table_t *tables[NUM];  /* published pointers: acquire loads per op */

static enum { FLAG, RANGE, GET, TAC, PAGES, LEBITMAP, SYNC } op;
static int workers;
static double seconds;
static uint64_t guest_pages, range_pages, batch, slice_pages;
static int dense;
static uint64_t seed;
static pthread_barrier_t barrier;

typedef struct {
    int index;
    uint64_t rng;
    uint64_t ops;
    double timed;
    uint64_t sink;
    uint64_t *le;       /* this thread's LE bitmap (bulk ops) */
    uint64_t le_pages;  /* popcount of le */
    uint64_t *dest;     /* sync destination, indexed by global page */
    int failed;
} thread_t;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t next_rand(uint64_t *s)  /* xorshift64* */
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static inline table_t *rcu_read(int client)
{
    return __atomic_load_n(&tables[client], __ATOMIC_ACQUIRE);
}

static inline uint64_t *word_of(table_t *t, uint64_t page)
{
    return &t->blocks[page / BLOCK_PAGES][(page % BLOCK_PAGES) / 64];
}

static inline uint64_t lo(unsigned b) { return b ? ONES >> (64 - b) : 0; }

/* The seed's block walk: run body for each (idx, off, num) piece of [page0, end). */
#define WALK(page0, end, body)                                            \
    for (uint64_t pg = (page0); pg < (end);) {                            \
        uint64_t idx = pg / BLOCK_PAGES, off = pg % BLOCK_PAGES;          \
        uint64_t num = (end) - pg < BLOCK_PAGES - off ? (end) - pg        \
                                                      : BLOCK_PAGES - off; \
        body;                                                             \
        pg += num;                                                        \
    }

/* bitmap_set_atomic: or the edge words, plain-store full words, fence. */
static void set_atomic(uint64_t *map, uint64_t start, uint64_t nr)
{
    uint64_t end = start + nr, w0 = start / 64, w1 = end / 64;
    unsigned b0 = start % 64, b1 = end % 64;
    if (w0 == w1) {
        __atomic_fetch_or(&map[w0], lo(b1) ^ lo(b0), SEQ);
        return;
    }
    if (b0) __atomic_fetch_or(&map[w0++], ~lo(b0), SEQ);
    for (; w0 < w1; w0++) __atomic_store_n(&map[w0], ONES, __ATOMIC_RELAXED);
    if (b1) __atomic_fetch_or(&map[w1], lo(b1), SEQ);
    else __atomic_thread_fence(SEQ);
}

static int any_set(uint64_t *map, uint64_t start, uint64_t nr)
{
    uint64_t end = start + nr, w0 = start / 64, w1 = end / 64;
    unsigned b0 = start % 64, b1 = end % 64;
    if (w0 == w1) return (__atomic_load_n(&map[w0], __ATOMIC_RELAXED) & (lo(b1) ^ lo(b0))) != 0;
    if (b0 && (__atomic_load_n(&map[w0++], __ATOMIC_RELAXED) & ~lo(b0))) return 1;
    for (; w0 < w1; w0++)
        if (__atomic_load_n(&map[w0], __ATOMIC_RELAXED)) return 1;
    return b1 && (__atomic_load_n(&map[w1], __ATOMIC_RELAXED) & lo(b1));
}

/* bitmap_test_and_clear_atomic: fetch_and the edges, exchange full words. */
static int test_and_clear(uint64_t *map, uint64_t start, uint64_t nr)
{
    uint64_t end = start + nr, w0 = start / 64, w1 = end / 64, old = 0;
    unsigned b0 = start % 64, b1 = end % 64;
    if (w0 == w1) {
        uint64_t m = lo(b1) ^ lo(b0);
        return (__atomic_fetch_and(&map[w0], ~m, SEQ) & m) != 0;
    }
    if (b0) {
        old |= __atomic_fetch_and(&map[w0], lo(b0), SEQ) & ~lo(b0);
        w0++;
    }
    for (; w0 < w1; w0++) old |= __atomic_exchange_n(&map[w0], 0, SEQ);
    if (b1) old |= __atomic_fetch_and(&map[w1], ~lo(b1), SEQ) & lo(b1);
    return old != 0;
}

static void one_op(thread_t *t)
{
    switch (op) {
    case FLAG: {
        uint64_t page = next_rand(&t->rng) % guest_pages;
        __atomic_fetch_or(word_of(rcu_read(MIGRATION), page), 1ULL << (page % 64), SEQ);
        break;
    }
    case RANGE: {
        uint64_t start = next_rand(&t->rng) % (guest_pages - range_pages + 1);
        table_t *v = rcu_read(VGA), *m = rcu_read(MIGRATION);
        WALK(start, start + range_pages, {
            set_atomic(m->blocks[idx], off, num);
            set_atomic(v->blocks[idx], off, num);
        });
        break;
    }
    case GET: {
        uint64_t start = next_rand(&t->rng) % (guest_pages - range_pages + 1);
        table_t *v = rcu_read(VGA);
        int dirty = 0;
        WALK(start, start + range_pages, {
            if (any_set(v->blocks[idx], off, num)) { dirty = 1; break; }
        });
        t->sink += dirty;
        break;
    }
    case TAC: {
        uint64_t start = next_rand(&t->rng) % (guest_pages - range_pages + 1);
        table_t *v = rcu_read(VGA);
        int dirty = 0;
        WALK(start, start + range_pages, { dirty |= test_and_clear(v->blocks[idx], off, num); });
        t->sink += dirty;
        break;
    }
    case PAGES: {
        table_t *m = rcu_read(MIGRATION);
        for (uint64_t i = 0; i < batch; i++) {
            uint64_t page = next_rand(&t->rng) % guest_pages;
            __atomic_fetch_or(word_of(m, page), 1ULL << (page % 64), SEQ);
        }
        break;
    }
    case LEBITMAP: {  /* cpu_physical_memory_set_dirty_lebitmap, word-aligned path */
        table_t *v = rcu_read(VGA), *m = rcu_read(MIGRATION);
        uint64_t page = t->index * slice_pages, nr = slice_pages / 64;
        uint64_t idx = page / BLOCK_PAGES, offset = (page % BLOCK_PAGES) / 64;
        for (uint64_t k = 0; k < nr; k++) {
            uint64_t temp = t->le[k];
            if (temp) {
                __atomic_fetch_or(&m->blocks[idx][offset], temp, SEQ);
                __atomic_fetch_or(&v->blocks[idx][offset], temp, SEQ);
            }
            if (++offset >= BLOCK_WORDS) {
                offset = 0;
                idx++;
            }
        }
        break;
    }
    case SYNC: {  /* cpu_physical_memory_sync_dirty_bitmap, word-aligned path */
        table_t *m = rcu_read(MIGRATION);
        uint64_t page = t->index * slice_pages, k0 = page / 64, nr = slice_pages / 64;
        uint64_t idx = page / BLOCK_PAGES, offset = (page % BLOCK_PAGES) / 64, n = 0;
        for (uint64_t k = k0; k < k0 + nr; k++) {
            if (m->blocks[idx][offset]) {
                uint64_t bits = __atomic_exchange_n(&m->blocks[idx][offset], 0, SEQ);
                uint64_t new_dirty = ~t->dest[k];
                t->dest[k] |= bits;
                new_dirty &= bits;
                n += __builtin_popcountll(new_dirty);
            }
            if (++offset >= BLOCK_WORDS) {
                offset = 0;
                idx++;
            }
        }
        if (n != t->le_pages) t->failed = 1;
        break;
    }
    }
}

/* Untimed: put the thread's slice back before a bulk call. */
static void reset(thread_t *t)
{
    uint64_t page = t->index * slice_pages;
    if (op == LEBITMAP) {
        static const int clients[] = {VGA, MIGRATION};
        for (int i = 0; i < 2; i++) {
            table_t *t_c = tables[clients[i]];
            WALK(page, page + slice_pages, { memset(&t_c->blocks[idx][off / 64], 0, num / 8); });
        }
    } else if (op == SYNC) {
        memset(t->dest + page / 64, 0, slice_pages / 8);
        uint64_t *le = t->le;
        WALK(page, page + slice_pages, {
            uint64_t *w = &tables[MIGRATION]->blocks[idx][off / 64];
            for (uint64_t k = 0; k < num / 64; k++) w[k] |= *le++;
        });
    }
}

static void *thread_main(void *arg)
{
    thread_t *t = arg;
    int bulk = op == LEBITMAP || op == SYNC;
    uint64_t chunk = (bulk || op == PAGES) ? 1 : 256;
    pthread_barrier_wait(&barrier);
    double wall0 = now(), cap = 4 * seconds + 0.5, t1 = wall0;
    while (t->timed < seconds && t1 - wall0 < cap) {
        if (bulk) reset(t);
        double t0 = now();
        for (uint64_t i = 0; i < chunk; i++) one_op(t);
        t1 = now();
        t->timed += t1 - t0;
        t->ops += chunk;
    }
    return NULL;
}

static uint64_t *zalloc(uint64_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64)) {
        perror("cbench: posix_memalign");
        exit(2);
    }
    memset(p, 0, bytes);
    return p;
}

int main(int argc, char **argv)
{
    static const char *names[] = {"set_dirty_flag", "set_dirty_range", "get_dirty",
                                  "test_and_clear_dirty", "set_dirty_pages",
                                  "set_dirty_lebitmap", "sync_dirty_bitmap"};
    if (argc != 9) {
        fprintf(stderr, "usage: cbench OP WORKERS SECONDS GUEST_PAGES RANGE_PAGES BATCH "
                        "PATTERN SEED\n");
        return 2;
    }
    int found = 0;
    for (int i = 0; i < 7; i++)
        if (!strcmp(argv[1], names[i])) op = i, found = 1;
    workers = atoi(argv[2]);
    seconds = atof(argv[3]);
    guest_pages = strtoull(argv[4], NULL, 10);
    range_pages = strtoull(argv[5], NULL, 10);
    batch = strtoull(argv[6], NULL, 10);
    dense = !strcmp(argv[7], "dense");
    seed = strtoull(argv[8], NULL, 10);
    if (!found || workers < 1 || seconds <= 0 || guest_pages < 64 || guest_pages % 64 ||
        range_pages < 1 || range_pages > guest_pages) {
        fprintf(stderr, "cbench: bad arguments\n");
        return 2;
    }
    slice_pages = guest_pages / workers / 64 * 64;

    uint64_t nblocks = (guest_pages + BLOCK_PAGES - 1) / BLOCK_PAGES;
    for (int c = 0; c < NUM; c++) {
        table_t *t = malloc(sizeof(table_t) + nblocks * sizeof(uint64_t *));
        t->nblocks = nblocks;
        for (uint64_t b = 0; b < nblocks; b++) {
            t->blocks[b] = zalloc(BLOCK_WORDS * 8);
            if (op == TAC && c == VGA) memset(t->blocks[b], 0xff, BLOCK_WORDS * 8);
        }
        __atomic_store_n(&tables[c], t, __ATOMIC_RELEASE);
    }

    thread_t *th = calloc(workers, sizeof(thread_t));
    pthread_t *tid = calloc(workers, sizeof(pthread_t));
    pthread_barrier_init(&barrier, NULL, workers);
    for (int i = 0; i < workers; i++) {
        thread_t *t = &th[i];
        t->index = i;
        t->rng = (seed + 1) * 0x9E3779B97F4A7C15ULL + (uint64_t)i * 0xBF58476D1CE4E5B9ULL + 1;
        if (op == LEBITMAP || op == SYNC) {
            uint64_t nw = slice_pages / 64;
            t->le = zalloc(nw * 8);
            if (dense) {
                for (uint64_t k = 0; k < nw; k++) t->le[k] = (k / 64) % 2 == 0 ? ONES : 0;
            } else {
                uint64_t n = nw * 64 / 100 ? nw * 64 / 100 : 1;
                for (uint64_t k = 0; k < n; k++) {
                    uint64_t p = next_rand(&t->rng) % (nw * 64);
                    t->le[p / 64] |= 1ULL << (p % 64);
                }
            }
            for (uint64_t k = 0; k < nw; k++) t->le_pages += __builtin_popcountll(t->le[k]);
            if (op == SYNC) t->dest = zalloc((i + 1) * slice_pages / 8);
        }
        pthread_create(&tid[i], NULL, thread_main, t);
    }
    int failed = 0;
    for (int i = 0; i < workers; i++) {
        pthread_join(tid[i], NULL);
        failed |= th[i].failed;
    }
    if (failed) {
        fprintf(stderr, "cbench: sync_dirty_bitmap counted the wrong number of pages\n");
        return 3;
    }
    printf("{\"ops\": [");
    for (int i = 0; i < workers; i++) printf("%s%llu", i ? ", " : "", (unsigned long long)th[i].ops);
    printf("], \"seconds\": [");
    for (int i = 0; i < workers; i++) printf("%s%.9f", i ? ", " : "", th[i].timed);
    printf("], \"sink\": %llu}\n", (unsigned long long)th[0].sink);
    return 0;
}
