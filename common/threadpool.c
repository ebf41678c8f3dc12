/* tandem: the worker pool behind data-parallel kernels.
 *
 * A run has n slots (ith = 0 .. n-1); slot 0 is the caller's. The caller
 * publishes a run by storing `work` = (run id << 32) | 1: the run id and
 * the next unclaimed slot. Workers claim slots with a CAS on that word and
 * run fn(arg, slot, n); the caller runs slot 0 and then claims whatever
 * slots no worker has taken yet, so a worker that is descheduled (other
 * processes, or more threads than CPUs) never holds up a run it has not
 * started. What a slot computes depends only on its ith, not on which
 * thread runs it, so results do not change. `pending` counts the slots
 * 1..n-1 not yet finished; the caller returns when it reaches 0.
 *
 * Idle workers spin on `work` with pause, then spin with sched_yield, then
 * sleep on the `wake` futex word, which the caller bumps on every publish.
 *
 * Memory ordering: fn/arg/pending are written before the release store of
 * `work`; a successful claim (acquire CAS, in that store's release
 * sequence) makes them visible. A slot's results are published by the
 * release decrement of pending, acquired by the caller's load. fn/arg are
 * rewritten only after pending reached 0, when no claimed slot is left.
 * Sleeping is the Dekker pattern on seq_cst operations: a worker
 * increments `sleepers`, reads `wake`, re-reads `work` and sleeps only if
 * no new run is there; the caller stores `work`, bumps `wake`, then reads
 * `sleepers` and wakes them if any. */
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
    pthread_t thread;
} tdm_pool_worker_t;

struct tdm_threadpool {
    int n;                      /* threads, the caller included */
    uint64_t yield_ns;          /* spin this long before yielding (0 if oversubscribed) */
    uint32_t run_id;            /* the caller's count of runs */
    tdm_pool_worker_t *workers; /* [n - 1] */
    tdm_threadpool_fn_t fn;
    void *arg;
    _Alignas(64) _Atomic uint64_t work; /* (run id << 32) | next unclaimed slot */
    _Alignas(64) atomic_uint wake;      /* futex word, bumped on every publish */
    atomic_int sleepers;
    atomic_int stop;
    _Alignas(64) atomic_int pending; /* slots 1..n-1 of the run not finished */
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

/* Claims the next slot of run `run`; -1 when that run has none left. */
static int claim(tdm_threadpool_t *pool, uint32_t run)
{
    uint64_t w = atomic_load_explicit(&pool->work, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(w >> 32) != run || (uint32_t)w >= (uint32_t)pool->n)
            return -1;
        if (atomic_compare_exchange_weak_explicit(&pool->work, &w, w + 1, memory_order_acq_rel,
                                                  memory_order_acquire))
            return (int)(uint32_t)w;
    }
}

/* Waits until a run other than `seen` is published; returns its id. */
static uint32_t wait_next(tdm_threadpool_t *pool, uint32_t seen)
{
    uint64_t t0 = 0, spun = 0;
    for (unsigned i = 1;; i++) {
        uint32_t run = (uint32_t)(atomic_load_explicit(&pool->work, memory_order_acquire) >> 32);
        if (run != seen)
            return run;
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
        unsigned v = atomic_load_explicit(&pool->wake, memory_order_seq_cst);
        uint32_t run = (uint32_t)(atomic_load_explicit(&pool->work, memory_order_seq_cst) >> 32);
        if (run == seen)
            futex_wait(&pool->wake, v);
        atomic_fetch_sub_explicit(&pool->sleepers, 1, memory_order_seq_cst);
        run = (uint32_t)(atomic_load_explicit(&pool->work, memory_order_acquire) >> 32);
        if (run != seen)
            return run;
    }
}

static void *worker_main(void *p)
{
    tdm_pool_worker_t *w = p;
    tdm_threadpool_t *pool = w->pool;
    uint32_t seen = 0;
    for (;;) {
        seen = wait_next(pool, seen);
        if (atomic_load_explicit(&pool->stop, memory_order_acquire))
            break;
        for (int slot; (slot = claim(pool, seen)) >= 0;) {
            pool->fn(pool->arg, slot, pool->n);
            atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_release);
        }
    }
    return NULL;
}

/* Publishes run `run` with its first free slot and wakes sleeping workers. */
static void publish(tdm_threadpool_t *pool, uint32_t run, uint32_t first_slot)
{
    atomic_store_explicit(&pool->work, ((uint64_t)run << 32) | first_slot, memory_order_seq_cst);
    atomic_fetch_add_explicit(&pool->wake, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&pool->sleepers, memory_order_seq_cst) > 0)
        futex_wake_all(&pool->wake);
}

/* The next run id; never 0, which is what workers start having seen. */
static uint32_t next_run(tdm_threadpool_t *pool)
{
    if (++pool->run_id == 0)
        pool->run_id = 1;
    return pool->run_id;
}

static void stop_workers(tdm_threadpool_t *pool, int started)
{
    atomic_store_explicit(&pool->stop, 1, memory_order_release);
    publish(pool, next_run(pool), (uint32_t)pool->n); /* a run with no slots: they exit */
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
    pool->run_id = 0;
    pool->fn = NULL;
    pool->arg = NULL;
    atomic_init(&pool->work, 0);
    atomic_init(&pool->wake, 0);
    atomic_init(&pool->sleepers, 0);
    atomic_init(&pool->stop, 0);
    atomic_init(&pool->pending, 0);
    pool->workers = calloc((size_t)n_threads, sizeof(*pool->workers));
    if (pool->workers == NULL)
        goto err_free_pool;
    for (; started < n_threads - 1; started++) {
        tdm_pool_worker_t *w = &pool->workers[started];
        w->pool = pool;
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
    uint32_t run = next_run(pool);
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->pending, pool->n - 1, memory_order_relaxed);
    publish(pool, run, 1);
    fn(arg, 0, pool->n);
    /* Slots no worker has started: run them here. */
    for (int slot; (slot = claim(pool, run)) >= 0;) {
        fn(arg, slot, pool->n);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_release);
    }
    /* Workers that started a slot finish about when the caller does; if one
     * does not, it was descheduled: give it the CPU. */
    for (unsigned i = 1; atomic_load_explicit(&pool->pending, memory_order_acquire) != 0; i++) {
        if (i > (pool->yield_ns ? 2048u : 16u))
            sched_yield();
        else
            cpu_relax();
    }
}
