/* The CUDA backend's sample op against the host sampler (tests/gpu/run.sh
 * runs it on a GPU machine; elsewhere it skips with 77).
 *
 * Rows of random logits (LLM-like peaks, flat, ties, NaN/-inf/+inf, all
 * -inf, wide, signed zeros; the seed is printed, TANDEM_TEST_SEED repeats
 * a run) with random parameters (temperature 0 and above; top-k off, 1,
 * 40, 100, past the vocabulary, 1500, 5000; top-p; min-p; penalties over
 * random prompt and output histories) are sampled by tdm_sampler_sample
 * and by ops->sample with the same draw (tdm_sample_state_next on a copy of
 * the request's generator) and the histories of tdm_sampler_history. The
 * token must be the same and the logprob within 1e-4. The device's
 * weights and sums may round differently from the host's (see
 * kernels/cuda/sample.cu), so a different token is tolerated, and counted
 * apart, only where the host's own decision lies within 1e-6 of the total
 * weight of a boundary and the two tokens are neighbours in the order.
 * Batch invariance: each row of a batch of 37, sampled alone, gives the
 * same token and logprob bits. Then the op's time for a 128256-token
 * vocabulary at batch 1 and 64 (information, no limit). */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../unit/test_util.h"
#include "tandem/kernels.h"
#include "tandem/sampler.h"

#define BATCH     37
#define HOT       24  /* high logits per row that histories favour */
#define MAX_PRMPT 200 /* prompt tokens in a history, at most */
#define MAX_OUT   60  /* output tokens in a history, at most */

static tdm_backend_t *gpu;
static uint64_t rng;
static int n_rows, n_mismatch, n_boundary;

static uint64_t next_u64(void)
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double unif(void)
{
    return (double)(next_u64() >> 11) * 0x1.0p-53;
}

static float normal(void)
{
    double a = unif(), b = unif();
    return (float)(sqrt(-2.0 * log(1.0 - a)) * cos(6.283185307179586 * b));
}

static int32_t pick_int(const int32_t *v, size_t n)
{
    return v[next_u64() % n];
}

static float pick_float(const float *v, size_t n)
{
    return v[next_u64() % n];
}

/* ---- one request: logits, parameters, history, generator ---- */

typedef enum {
    SHAPE_LLM,
    SHAPE_FLAT,
    SHAPE_TIES,
    SHAPE_SPECIAL,
    SHAPE_DEAD,
    SHAPE_WIDE,
    SHAPE_ZEROS,
    SHAPE_COUNT
} shape_t;

static const char *const shape_names[] = {"llm",  "flat", "ties", "special",
                                          "dead", "wide", "zeros"};

typedef struct req {
    shape_t shape;
    tdm_sampling_params_t p;
    tdm_sample_state_t st;
    int32_t prompt[MAX_PRMPT], output[MAX_OUT];
    size_t n_prompt, n_output;
} req_t;

static void make_logits(float *x, int32_t V, shape_t shape, int32_t *hot)
{
    for (int32_t i = 0; i < V; i++) {
        switch (shape) {
        case SHAPE_LLM:
        case SHAPE_SPECIAL: x[i] = 2.5f * normal() - 2.0f; break;
        case SHAPE_FLAT: x[i] = (float)(unif() - 0.5); break;
        case SHAPE_TIES: x[i] = 0.75f * (float)(next_u64() % 6); break;
        case SHAPE_DEAD: x[i] = i % 7 == 3 ? NAN : -INFINITY; break;
        case SHAPE_WIDE: x[i] = (float)(80.0 * unif() - 40.0); break;
        case SHAPE_ZEROS:
            x[i] = next_u64() % 3 ? (next_u64() % 2 ? 0.0f : -0.0f) : -normal();
            break;
        case SHAPE_COUNT: break;
        }
    }
    for (int j = 0; j < HOT; j++) {
        hot[j] = (int32_t)(next_u64() % (uint64_t)V);
        if (shape == SHAPE_LLM || shape == SHAPE_SPECIAL)
            x[hot[j]] = 6.0f + 10.0f * (float)unif();
    }
    if (shape == SHAPE_SPECIAL) {
        for (int32_t i = 0; i < V / 50; i++) {
            x[next_u64() % (uint64_t)V] = NAN;
            x[next_u64() % (uint64_t)V] = -INFINITY;
        }
        if (next_u64() % 2)
            for (int j = 0; j < 2; j++)
                x[hot[j]] = INFINITY;
    }
}

static void make_request(req_t *q, int32_t V, shape_t shape, const int32_t *hot)
{
    static const float temps[] = {0.0f, 0.6f, 0.8f, 1.0f, 1.0f, 1.5f};
    static const float top_ps[] = {1.0f, 1.0f, 0.9f, 0.95f, 0.5f};
    static const float min_ps[] = {0.0f, 0.0f, 0.0f, 0.05f};
    const int32_t top_ks[] = {0, 0, 1, 40, 100, V + 7, 1500, 5000};
    memset(q, 0, sizeof(*q));
    q->shape = shape;
    tdm_sampling_params_default(&q->p);
    q->p.temperature = pick_float(temps, sizeof(temps) / sizeof(temps[0]));
    q->p.top_k = pick_int(top_ks, sizeof(top_ks) / sizeof(top_ks[0]));
    q->p.top_p = pick_float(top_ps, sizeof(top_ps) / sizeof(top_ps[0]));
    q->p.min_p = pick_float(min_ps, sizeof(min_ps) / sizeof(min_ps[0]));
    if (next_u64() % 2) {
        q->p.repetition_penalty = next_u64() % 3 ? 1.2f : 1.0f;
        q->p.frequency_penalty = next_u64() % 2 ? 0.4f : 0.0f;
        q->p.presence_penalty = next_u64() % 2 ? 0.5f : 0.0f;
        /* half the history from the row's high logits, so it matters; and
         * an id outside the vocabulary now and then, which is ignored */
        q->n_prompt = next_u64() % (MAX_PRMPT + 1);
        for (size_t i = 0; i < q->n_prompt; i++)
            q->prompt[i] =
                next_u64() % 2 ? hot[next_u64() % HOT] : (int32_t)(next_u64() % (uint64_t)V);
        if (q->n_prompt > 0 && next_u64() % 4 == 0)
            q->prompt[0] = V + 3;
        q->n_output = next_u64() % (MAX_OUT + 1);
        for (size_t i = 0; i < q->n_output; i++)
            q->output[i] = next_u64() % 2 ? hot[next_u64() % 8] : (int32_t)(next_u64() % 50);
    }
    q->p.has_seed = true;
    q->p.seed = next_u64();
    tdm_sample_state_init(&q->st, &q->p);
}

/* ---- a mismatch that rounding explains ---- */

static const float *order_of; /* the scaled logits qsort orders by */

static int by_logit_desc(const void *a, const void *b)
{
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    float x = order_of[i], y = order_of[j];
    if (x != y)
        return x > y ? -1 : 1;
    return (i > j) - (i < j);
}

static bool near_rel(double a, double b, double scale)
{
    return fabs(a - b) <= 1e-6 * scale;
}

/* True when the host sampler's choice on row xs (its logits after the
 * call: penalized, NaN as -inf, over the temperature) hangs on a boundary
 * that weights or sums rounded differently could move, and the two tokens
 * are at most 2 apart in the candidates' order: the draw's target, the
 * top-p mass or the min-p threshold within 1e-6 of it. */
static bool rounding_boundary(const float *xs, int32_t V, const tdm_sampling_params_t *p, double u,
                              int32_t tok_host, int32_t tok_gpu)
{
    if (!(p->temperature > 0.0f))
        return false;
    int32_t *ord = malloc((size_t)V * sizeof(int32_t));
    float *w = malloc((size_t)V * sizeof(float));
    for (int32_t i = 0; i < V; i++)
        ord[i] = i;
    order_of = xs;
    qsort(ord, (size_t)V, sizeof(int32_t), by_logit_desc);
    const float max_s = xs[ord[0]];
    for (int32_t j = 0; j < V; j++)
        w[j] = xs[ord[j]] == max_s ? 1.0f : expf(xs[ord[j]] - max_s);
    const int32_t cand = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    double total = 0.0;
    for (int32_t j = 0; j < cand; j++)
        total += (double)w[j];
    const double mass = (double)p->top_p * total;
    const float min_w = p->min_p * w[0];
    int32_t keep = cand;
    double cum = 0.0;
    bool near = false;
    if (p->top_p < 1.0f || p->min_p > 0.0f)
        for (int32_t j = 0; j < cand; j++) {
            if (p->min_p > 0.0f && j > 0 && near_rel(w[j], min_w, 1.0))
                near = true;
            if (p->min_p > 0.0f && j > 0 && w[j] < min_w) {
                keep = j;
                break;
            }
            cum += (double)w[j];
            if (p->top_p < 1.0f && near_rel(cum, mass, total))
                near = true;
            if (p->top_p < 1.0f && cum >= mass) {
                keep = j + 1;
                break;
            }
        }
    if (p->top_p < 1.0f || p->min_p > 0.0f)
        total = cum;
    int32_t r_host = -1, r_gpu = -1;
    for (int32_t j = 0; j < V; j++) {
        if (ord[j] == tok_host)
            r_host = j;
        if (ord[j] == tok_gpu)
            r_gpu = j;
    }
    const double target = u * total;
    cum = 0.0;
    for (int32_t j = 0; j < keep; j++) {
        cum += (double)w[j];
        if (near_rel(cum, target, total) && r_host >= 0 && abs(j - r_host) <= 2)
            near = true;
    }
    free(ord);
    free(w);
    return near && r_gpu >= 0 && abs(r_gpu - r_host) <= 2;
}

/* ---- the comparison ---- */

static void *dev_put(const void *host, size_t bytes)
{
    void *d = gpu->ops->buf_alloc(gpu, bytes);
    if (d == NULL) {
        fprintf(stderr, "FATAL: cannot allocate %zu bytes on the GPU\n", bytes);
        exit(1);
    }
    gpu->ops->copy_to(gpu, d, host, bytes);
    return d;
}

/* Samples nb rows (logits x, requests q) on the host and on the GPU and
 * compares; then, once per vocabulary, each row alone against the batch. */
static void test_batch(tdm_sampler_t *s, int32_t V, int nb, req_t *q, const float *x,
                       bool check_alone)
{
    const size_t row = (size_t)V, bytes = (size_t)nb * row * sizeof(float);
    float *host_x = malloc(bytes);
    memcpy(host_x, x, bytes);
    tdm_sample_row_t *rows = calloc((size_t)nb, sizeof(*rows));
    int32_t *htok = malloc((size_t)nb * (MAX_PRMPT + MAX_OUT) * sizeof(int32_t));
    int32_t *hcnt = malloc((size_t)nb * (MAX_PRMPT + MAX_OUT) * sizeof(int32_t));
    int32_t *tok_host = malloc((size_t)nb * sizeof(int32_t));
    int32_t *tok_gpu = malloc((size_t)nb * sizeof(int32_t));
    float *lp_host = malloc((size_t)nb * sizeof(float));
    float *lp_gpu = malloc((size_t)nb * sizeof(float));
    size_t used = 0;
    for (int t = 0; t < nb; t++) {
        const tdm_sampling_params_t *p = &q[t].p;
        tdm_sample_state_t st = q[t].st;
        size_t nh = tdm_sampler_history(s, p, q[t].prompt, q[t].n_prompt, q[t].output,
                                        q[t].n_output, htok + used, hcnt + used);
        rows[t] = tdm_sample_row_make(p, p->temperature > 0.0f ? tdm_sample_state_next(&st) : 0.0,
                                      used, nh);
        used += nh;
        st = q[t].st;
        tok_host[t] = tdm_sampler_sample(s, p, &st, host_x + (size_t)t * row, q[t].prompt,
                                         q[t].n_prompt, q[t].output, q[t].n_output, &lp_host[t]);
    }
    float *dx = dev_put(x, bytes);
    gpu->ops->sample(gpu, dx, nb, V, rows, htok, hcnt, (int64_t)used, tok_gpu, lp_gpu);
    for (int t = 0; t < nb; t++) {
        const tdm_sampling_params_t *p = &q[t].p;
        n_rows++;
        bool lp_ok =
            isfinite(lp_host[t]) ? fabsf(lp_gpu[t] - lp_host[t]) <= 1e-4f : !isfinite(lp_gpu[t]);
        if (tok_gpu[t] == tok_host[t]) {
            CHECK(lp_ok, "V=%d row %d (%s): logprob %.7g on the GPU, %.7g on the host", V, t,
                  shape_names[q[t].shape], (double)lp_gpu[t], (double)lp_host[t]);
            continue;
        }
        if (rounding_boundary(host_x + (size_t)t * row, V, p, rows[t].u, tok_host[t], tok_gpu[t])) {
            n_boundary++;
            printf("  at a rounding boundary: V=%d row %d: GPU %d, host %d\n", V, t, tok_gpu[t],
                   tok_host[t]);
            continue;
        }
        n_mismatch++;
        CHECK(false,
              "V=%d row %d (%s): GPU token %d, host %d (T=%g top_k=%d top_p=%g min_p=%g "
              "rep=%g freq=%g pres=%g history %d, u=%.17g)",
              V, t, shape_names[q[t].shape], tok_gpu[t], tok_host[t], (double)p->temperature,
              p->top_k, (double)p->top_p, (double)p->min_p, (double)p->repetition_penalty,
              (double)p->frequency_penalty, (double)p->presence_penalty, rows[t].n_hist, rows[t].u);
    }
    if (check_alone) {
        /* batch invariance: every row alone, its history at offset 0 */
        float *d1 = gpu->ops->buf_alloc(gpu, row * sizeof(float));
        for (int t = 0; t < nb; t++) {
            tdm_sample_row_t r1 = rows[t];
            r1.hist_off = 0;
            int32_t tok1;
            float lp1;
            gpu->ops->copy_to(gpu, d1, x + (size_t)t * row, row * sizeof(float));
            gpu->ops->sample(gpu, d1, 1, V, &r1, htok + rows[t].hist_off, hcnt + rows[t].hist_off,
                             rows[t].n_hist, &tok1, &lp1);
            CHECK(tok1 == tok_gpu[t] && memcmp(&lp1, &lp_gpu[t], sizeof(float)) == 0,
                  "V=%d row %d alone: token %d logprob %.9g, in a batch of %d: %d %.9g "
                  "(batch invariance)",
                  V, t, tok1, (double)lp1, nb, tok_gpu[t], (double)lp_gpu[t]);
        }
        gpu->ops->buf_free(gpu, d1);
    }
    gpu->ops->buf_free(gpu, dx);
    free(host_x);
    free(rows);
    free(htok);
    free(hcnt);
    free(tok_host);
    free(tok_gpu);
    free(lp_host);
    free(lp_gpu);
}

static void test_vocab(int32_t V, int n_batches)
{
    static const shape_t mix[] = {SHAPE_LLM,  SHAPE_LLM,  SHAPE_LLM,  SHAPE_LLM,     SHAPE_FLAT,
                                  SHAPE_FLAT, SHAPE_TIES, SHAPE_TIES, SHAPE_SPECIAL, SHAPE_SPECIAL,
                                  SHAPE_DEAD, SHAPE_WIDE, SHAPE_ZEROS};
    tdm_sampler_t *s = NULL;
    if (tdm_sampler_create(V, &s) != TDM_OK) {
        fprintf(stderr, "FATAL: tdm_sampler_create(%d)\n", V);
        exit(1);
    }
    float *x = malloc((size_t)BATCH * (size_t)V * sizeof(float));
    req_t *q = malloc(BATCH * sizeof(req_t));
    int32_t hot[HOT];
    for (int b = 0; b < n_batches; b++) {
        for (int t = 0; t < BATCH; t++) {
            shape_t shape = mix[next_u64() % (sizeof(mix) / sizeof(mix[0]))];
            make_logits(x + (size_t)t * (size_t)V, V, shape, hot);
            make_request(&q[t], V, shape, hot);
        }
        test_batch(s, V, BATCH, q, x, b == 0);
    }
    free(x);
    free(q);
    tdm_sampler_destroy(s);
}

/* ---- time ---- */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* The op on LLM-like rows of a 128256-token vocabulary, no penalties (so
 * the logits stay as they are and every call does the same work). */
static void time_op(const char *what, float temp, int32_t top_k, float top_p)
{
    const int32_t V = 128256;
    static const int batches[] = {1, 64};
    int32_t hot[HOT];
    for (size_t b = 0; b < sizeof(batches) / sizeof(batches[0]); b++) {
        const int nb = batches[b];
        float *x = malloc((size_t)nb * (size_t)V * sizeof(float));
        tdm_sample_row_t *rows = calloc((size_t)nb, sizeof(*rows));
        for (int t = 0; t < nb; t++) {
            make_logits(x + (size_t)t * (size_t)V, V, SHAPE_LLM, hot);
            rows[t] = (tdm_sample_row_t){.temperature = temp,
                                         .top_k = top_k,
                                         .top_p = top_p,
                                         .min_p = 0.0f,
                                         .repetition_penalty = 1.0f,
                                         .u = unif()};
        }
        float *dx = dev_put(x, (size_t)nb * (size_t)V * sizeof(float));
        int32_t *tok = malloc((size_t)nb * sizeof(int32_t));
        float *lp = malloc((size_t)nb * sizeof(float));
        gpu->ops->sample(gpu, dx, nb, V, rows, NULL, NULL, 0, tok, lp); /* warm up */
        const int reps = 10;
        double t0 = now_ms();
        for (int i = 0; i < reps; i++)
            gpu->ops->sample(gpu, dx, nb, V, rows, NULL, NULL, 0, tok, lp);
        double ms = (now_ms() - t0) / reps;
        printf("time: %-34s V=%d batch %2d: %8.3f ms per call, %7.4f ms per row\n", what, V, nb, ms,
               ms / nb);
        gpu->ops->buf_free(gpu, dx);
        free(x);
        free(rows);
        free(tok);
        free(lp);
    }
}

int main(void)
{
    tdm_status_t st = tdm_backend_cuda_create(0, &gpu);
    if (st != TDM_OK) {
        printf("SKIP: no CUDA backend here (%s: %s)\n", tdm_status_str(st),
               tdm_backend_cuda_built() ? "no usable GPU" : "built without CUDA");
        return 77;
    }
    if (gpu->ops->sample == NULL) {
        fprintf(stderr, "FAIL: the CUDA backend's table has no sample op\n");
        tdm_backend_destroy(gpu);
        return 1;
    }
    rng = t_seed("test_cuda_sample");

    /* TANDEM_TEST_QUICK: a few rows, no timing (for compute-sanitizer) */
    if (getenv("TANDEM_TEST_QUICK") != NULL) {
        test_vocab(1000, 2);
        test_vocab(49152, 1);
        printf("test_cuda_sample: %d rows, %d mismatches (quick)\n", n_rows, n_mismatch);
        tdm_backend_destroy(gpu);
        return t_finish();
    }
    test_vocab(1000, 12);
    test_vocab(49152, 4);
    test_vocab(128256, 3);

    time_op("T=0.8 top_k=40 top_p=0.95", 0.8f, 40, 0.95f);
    time_op("T=0.7 top_p=0.9", 0.7f, 0, 0.9f);
    time_op("T=1 (whole distribution)", 1.0f, 0, 1.0f);
    time_op("T=0 (greedy)", 0.0f, 0, 1.0f);

    if (n_boundary > 0)
        printf("%d rows at a rounding boundary (tolerated)\n", n_boundary);
    printf("test_cuda_sample: %d rows, %d mismatches\n", n_rows, n_mismatch);
    tdm_backend_destroy(gpu);
    return t_finish();
}
