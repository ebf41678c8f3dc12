/* tandem CUDA backend: the scratch buffer's lifetime rule, in plain C so
 * that every machine tests it (tests/unit/test_scratch.c drives it with an
 * allocator that poisons what it frees; cuda_backend.cu with cudaMalloc).
 *
 * Ops take temporary device memory from one scratch buffer that grows when
 * an op asks for more than it holds (split partials, the sampler's
 * histories). A captured CUDA graph keeps the addresses it was captured
 * with, so a buffer a live graph may read must not be freed:
 *  - growing while no graph is held frees the old buffer (after the work
 *    queued on it: the release callback's business);
 *  - growing while graphs are held retires the old buffer instead: graphs
 *    replay on it, later ops use the new one; retired buffers are released
 *    when the last graph is dropped (or at fini);
 *  - during a capture the buffer cannot grow (a graph would record an
 *    allocation): a request larger than the buffer marks the capture as
 *    failed and returns the buffer as it is, which nothing writes, since a
 *    capture queues work without running it; the caller then throws the
 *    capture away and runs the step op by op, which grows the buffer.
 * One thread uses a tdm_scratch_t at a time (the backend's caller). */
#ifndef TANDEM_CUDA_SCRATCH_H
#define TANDEM_CUDA_SCRATCH_H

#include <stdbool.h>
#include <stddef.h>

/* Doubling from 64 MiB, 40 retirements would pass any memory there is. */
#define TDM_SCRATCH_MAX_RETIRED 40

typedef struct tdm_scratch {
    /* the device's allocator: NULL when out of memory */
    void *(*alloc)(void *ctx, size_t bytes);
    /* frees p once the work queued before the call is done with it */
    void (*release)(void *ctx, void *p);
    void *ctx;
    size_t initial; /* the first allocation's size */
    void *buf;
    size_t bytes;
    void *retired[TDM_SCRATCH_MAX_RETIRED];
    int n_retired;
    int graphs;            /* graphs held that may read buf or a retired buffer */
    bool capturing;        /* a capture is open */
    bool capture_overflow; /* ... and an op asked for more than buf holds */
} tdm_scratch_t;

static inline void tdm_scratch_init(tdm_scratch_t *s, void *(*alloc)(void *, size_t),
                                    void (*release)(void *, void *), void *ctx, size_t initial)
{
    *s = (tdm_scratch_t){.alloc = alloc, .release = release, .ctx = ctx, .initial = initial};
}

static inline void tdm_scratch_release_retired(tdm_scratch_t *s)
{
    for (int i = 0; i < s->n_retired; i++)
        s->release(s->ctx, s->retired[i]);
    s->n_retired = 0;
}

/* At least bytes of scratch; NULL when the device has no memory for it.
 * During a capture, never a new buffer (see above). */
static inline void *tdm_scratch_get(tdm_scratch_t *s, size_t bytes)
{
    if (bytes <= s->bytes && s->buf != NULL)
        return s->buf;
    if (s->capturing) {
        s->capture_overflow = true;
        return s->buf;
    }
    if (s->buf != NULL && s->graphs > 0 && s->n_retired == TDM_SCRATCH_MAX_RETIRED)
        return NULL; /* cannot happen (doubling); never free under a graph */
    size_t want = s->bytes ? s->bytes : s->initial;
    if (want == 0)
        want = 1;
    while (want < bytes)
        want *= 2;
    void *nb = s->alloc(s->ctx, want);
    if (nb == NULL)
        return NULL;
    if (s->buf != NULL && s->graphs > 0)
        s->retired[s->n_retired++] = s->buf;
    else if (s->buf != NULL)
        s->release(s->ctx, s->buf);
    s->buf = nb;
    s->bytes = want;
    return nb;
}

static inline void tdm_scratch_capture_begin(tdm_scratch_t *s)
{
    s->capturing = true;
    s->capture_overflow = false;
}

/* false: an op needed more scratch than there was; discard the capture. */
static inline bool tdm_scratch_capture_end(tdm_scratch_t *s)
{
    s->capturing = false;
    bool ok = !s->capture_overflow;
    s->capture_overflow = false;
    return ok;
}

/* A graph captured since the last capture_begin is kept / was freed. */
static inline void tdm_scratch_graph_hold(tdm_scratch_t *s)
{
    s->graphs++;
}

static inline void tdm_scratch_graph_drop(tdm_scratch_t *s)
{
    if (s->graphs > 0 && --s->graphs == 0)
        tdm_scratch_release_retired(s);
}

static inline void tdm_scratch_fini(tdm_scratch_t *s)
{
    tdm_scratch_release_retired(s);
    if (s->buf != NULL)
        s->release(s->ctx, s->buf);
    s->buf = NULL;
    s->bytes = 0;
}

#endif
