/* tandem: a fixed pool of worker threads for data-parallel kernels.
 *
 * tdm_threadpool_run() runs fn(arg, ith, nth) once on each of the nth
 * threads (the caller is thread 0) and returns when all have finished.
 * Workers spin briefly between runs (a decode step issues hundreds of runs),
 * then sleep on a futex, so an idle pool costs no CPU. One caller at a time:
 * a pool belongs to the thread that drives it. Nothing is allocated per run. */
#ifndef TANDEM_THREADPOOL_H
#define TANDEM_THREADPOOL_H

#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tdm_threadpool tdm_threadpool_t;
typedef void (*tdm_threadpool_fn_t)(void *arg, int ith, int nth);

/* n_threads <= 0 means the number of CPUs this process may run on. */
tdm_status_t tdm_threadpool_create(int n_threads, tdm_threadpool_t **out);
void tdm_threadpool_destroy(tdm_threadpool_t *pool);
int tdm_threadpool_size(const tdm_threadpool_t *pool);
void tdm_threadpool_run(tdm_threadpool_t *pool, tdm_threadpool_fn_t fn, void *arg);
/* CPUs available to this process (sched_getaffinity), at least 1. */
int tdm_cpu_count(void);

#ifdef __cplusplus
}
#endif

#endif
