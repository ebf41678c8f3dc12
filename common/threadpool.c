/* tandem: the worker pool behind data-parallel kernels.
 *
 * A run is published by bumping `gen` (the futex word) after writing fn,
 * arg and pending. Workers wait for gen to change: first spinning with
 * pause for about TDM_POOL_SPIN_NS, then sleeping in FUTEX_WAIT. Each
 * worker runs fn once and decrements `pending`; the caller runs its share
 * as thread 0 and spins until pending is 0.
 *
 * Memory ordering: fn/arg/pending are written before the seq_cst bump of
 * gen and read after an acquire load of it; each worker's results are
 * published by its release decrement of pending and acquired by the
 * caller's load. Sleeping uses the Dekker pattern: a worker increments
 * `sleepers` and then re-reads gen (inside FUTEX_WAIT, atomically); the
 * caller bumps gen and then reads sleepers, all seq_cst, so either the
 * worker sees the new gen or the caller sees the sleeper and wakes it. */
#define _GNU_SOURCE
#include "tandem/threadpool.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "tandem/log.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define TDM_POOL_SPIN_NS  2000000 /* how long an idle worker spins before sleeping */
#define TDM_POOL_YIELD_NS 20000   /* after this much spinning, yield the CPU between checks */

typedef struct tdm_pool_worker {
    tdm_threadpool_t *pool;
    int ith;
    pthread_t thread;
} tdm_pool_worker_t;

struct tdm_threadpool {
    int n;                      /* threads, the caller included */
    uint64_t yield_ns;          /* spin this long before yielding (0 if oversubscribed) */
    tdm_pool_worker_t *workers; /* [n - 1] */
    tdm_threadpool_fn_t fn;
    void *arg;
    _Alignas(64) atomic_uint gen; /* run generation; the futex word */
    atomic_int sleepers;
    atomic_int stop;
    _Alignas(64) atomic_int pending; /* workers still running the current run */
};

int tdm_cpu_count(void)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int c = CPU_COUNT(&set);
        if (c > 0)
            return c;
    }
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c > 0 ? (int)c : 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void futex_wait(atomic_uint *addr, unsigned expected)
{
    /* Returns at once (EAGAIN) if *addr != expected; spurious wakeups are
     * handled by the caller's loop. */
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake_all(atomic_uint *addr)
{
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Waits until pool->gen differs from seen; returns the new value. Spins
 * for TDM_POOL_YIELD_NS, then spins with sched_yield (so that oversubscribed
 * or busy CPUs still run the thread that has work), then sleeps. */
static unsigned wait_next(tdm_threadpool_t *pool, unsigned seen)
{
    uint64_t t0 = 0, spun = 0;
    for (unsigned i = 1;; i++) {
        unsigned g = atomic_load_explicit(&pool->gen, memory_order_acquire);
        if (g != seen)
            return g;
        if ((i & 63) == 0) {
            uint64_t t = now_ns();
            if (t0 == 0)
                t0 = t;
            spun = t - t0;
            if (spun > TDM_POOL_SPIN_NS)
                break;
        }
        if (spun >= pool->yield_ns)
            sched_yield();
        else
            cpu_relax();
    }
    for (;;) {
        atomic_fetch_add_explicit(&pool->sleepers, 1, memory_order_seq_cst);
        if (atomic_load_explicit(&pool->gen, memory_order_seq_cst) == seen)
            futex_wait(&pool->gen, seen);
        atomic_fetch_sub_explicit(&pool->sleepers, 1, memory_order_seq_cst);
        unsigned g = atomic_load_explicit(&pool->gen, memory_order_acquire);
        if (g != seen)
            return g;
    }
}

static void *worker_main(void *p)
{
    tdm_pool_worker_t *w = p;
    tdm_threadpool_t *pool = w->pool;
    unsigned seen = 0;
    for (;;) {
        seen = wait_next(pool, seen);
        if (atomic_load_explicit(&pool->stop, memory_order_relaxed))
            break;
        pool->fn(pool->arg, w->ith, pool->n);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_release);
    }
    return NULL;
}

/* Wakes every worker for a new generation (a run or the stop). */
static void publish(tdm_threadpool_t *pool)
{
    atomic_fetch_add_explicit(&pool->gen, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&pool->sleepers, memory_order_seq_cst) > 0)
        futex_wake_all(&pool->gen);
}

static void stop_workers(tdm_threadpool_t *pool, int started)
{
    atomic_store_explicit(&pool->stop, 1, memory_order_relaxed);
    publish(pool);
    for (int i = 0; i < started; i++)
        pthread_join(pool->workers[i].thread, NULL);
}

tdm_status_t tdm_threadpool_create(int n_threads, tdm_threadpool_t **out)
{
    if (n_threads <= 0)
        n_threads = tdm_cpu_count();
    int started = 0;
    tdm_threadpool_t *pool = aligned_alloc(64, (sizeof(*pool) + 63) & ~(size_t)63);
    if (pool == NULL)
        return TDM_ERR_NOMEM;
    pool->n = n_threads;
    pool->yield_ns = n_threads > tdm_cpu_count() ? 0 : TDM_POOL_YIELD_NS;
    pool->fn = NULL;
    pool->arg = NULL;
    atomic_init(&pool->gen, 0);
    atomic_init(&pool->sleepers, 0);
    atomic_init(&pool->stop, 0);
    atomic_init(&pool->pending, 0);
    pool->workers = calloc((size_t)n_threads, sizeof(*pool->workers));
    if (pool->workers == NULL)
        goto err_free_pool;
    for (; started < n_threads - 1; started++) {
        tdm_pool_worker_t *w = &pool->workers[started];
        w->pool = pool;
        w->ith = started + 1;
        int rc = pthread_create(&w->thread, NULL, worker_main, w);
        if (rc != 0) {
            tdm_log_error("threadpool", "cannot start worker thread %d of %d: error %d",
                          started + 1, n_threads, rc);
            goto err_stop_workers;
        }
    }
    *out = pool;
    return TDM_OK;

err_stop_workers:
    stop_workers(pool, started);
    free(pool->workers);
err_free_pool:
    free(pool);
    return TDM_ERR_NOMEM;
}

void tdm_threadpool_destroy(tdm_threadpool_t *pool)
{
    if (pool == NULL)
        return;
    stop_workers(pool, pool->n - 1);
    free(pool->workers);
    free(pool);
}

int tdm_threadpool_size(const tdm_threadpool_t *pool)
{
    return pool->n;
}

void tdm_threadpool_run(tdm_threadpool_t *pool, tdm_threadpool_fn_t fn, void *arg)
{
    if (pool->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->pending, pool->n - 1, memory_order_relaxed);
    publish(pool);
    fn(arg, 0, pool->n);
    /* Workers finish about when the caller does; if one does not, it was
     * descheduled or is starved: give it the CPU. */
    for (unsigned i = 1; atomic_load_explicit(&pool->pending, memory_order_acquire) != 0; i++) {
        if (i > (pool->yield_ns ? 2048u : 16u))
            sched_yield();
        else
            cpu_relax();
    }
}
