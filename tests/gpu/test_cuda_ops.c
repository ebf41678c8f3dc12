/* CUDA backend against the CPU backend, op by op (tests/gpu/run.sh runs it
 * on a GPU machine; elsewhere it skips with 77).
 *
 * Every op of the table runs on both backends on fresh random inputs (the
 * seed is printed; TANDEM_TEST_SEED repeats a run). Device outputs are
 * poisoned (all bytes 0xff: NaN) before each run, so an element the kernel
 * did not write fails the finiteness check. Results are compared by the
 * normalized error ||cuda - cpu|| / ||cpu|| in double, against a threshold
 * per op and weight type: f16 activations and tensor cores on the GPU
 * against int16 activations and f32 FMA on the CPU differ by rounding,
 * never by more. Batch invariance within CUDA: a row's result computed
 * alone equals, bit for bit, the same row inside a batch (matmul,
 * attention). */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../unit/test_util.h"
#include "tandem/dtype.h"
#include "tandem/kernels.h"

static tdm_backend_t *cpu, *gpu;
static uint64_t rng;

static uint64_t next_u64(void)
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float uniform(float lo, float hi)
{
    return lo + (hi - lo) * (float)((double)(next_u64() >> 11) / 9007199254740992.0);
}

static float *rand_f32(size_t n, float lo, float hi)
{
    float *x = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        x[i] = uniform(lo, hi);
    return x;
}

/* ---- device helpers: the same calls work on both backends ---- */

static void *put(tdm_backend_t *be, const void *host, size_t bytes)
{
    void *p = be->ops->buf_alloc(be, bytes);
    if (p == NULL) {
        fprintf(stderr, "FATAL: %s cannot allocate %zu bytes\n", be->ops->name, bytes);
        exit(1);
    }
    be->ops->copy_to(be, p, host, bytes);
    return p;
}

static void *poisoned(tdm_backend_t *be, size_t bytes)
{
    void *h = malloc(bytes);
    memset(h, 0xff, bytes);
    void *p = put(be, h, bytes);
    free(h);
    return p;
}

static void *get(tdm_backend_t *be, const void *dev, size_t bytes)
{
    void *h = malloc(bytes);
    be->ops->copy_from(be, h, dev, bytes);
    return h;
}

/* ||a - b|| / ||b|| over n floats; -1 when a has a non-finite value. */
static double rel_err(const float *a, const float *b, size_t n, size_t *bad)
{
    double num = 0, den = 0;
    *bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) {
            (*bad)++;
            continue;
        }
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    if (*bad)
        return -1;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int n_ops;
#define MAX_OPS 4096
static char table[MAX_OPS][160];

static void report(const char *what, double err, double limit, size_t bad)
{
    CHECK(bad == 0 && err <= limit, "%s: rel err %.3g (limit %.1g), %zu unwritten/non-finite", what,
          err, limit, bad);
    if (n_ops < MAX_OPS)
        snprintf(table[n_ops++], sizeof(table[0]), "%-58s %10.3g %8.1g %s", what, err, limit,
                 bad == 0 && err <= limit ? "ok" : "FAIL");
}

/* ---- matmul and embedding ---- */

/* The f16 fields of a block of the types tdm_dtype_from_f32 does not
 * write: their byte offsets (one or two: the scale, then the min's scale)
 * and a bound for their values that keeps weights within about +-1 (1 /
 * the largest code times integer sub-scale). Random bytes elsewhere are
 * valid codes and sub-scales; random f16 scales would be NaN or huge. */
static int f16_fields(uint32_t t, int off[2], float *amp)
{
    static const struct {
        uint32_t type;
        int nf, off0, off1;
        float amp;
    } tab[] = {
        {TDM_DTYPE_Q5_0, 1, 0, 0, 1.0f / 16},
        {TDM_DTYPE_Q5_1, 2, 0, 2, 1.0f / 31},
        {TDM_DTYPE_IQ4_NL, 1, 0, 0, 1.0f / 127},
        {TDM_DTYPE_IQ4_XS, 1, 0, 0, 1.0f / (127 * 32)},
        {TDM_DTYPE_Q2_K, 2, 80, 82, 1.0f / (15 * 3)},
        {TDM_DTYPE_Q3_K, 1, 108, 0, 1.0f / (32 * 4)},
        {TDM_DTYPE_Q4_K, 2, 0, 2, 1.0f / (63 * 15)},
        {TDM_DTYPE_Q5_K, 2, 0, 2, 1.0f / (63 * 31)},
        {TDM_DTYPE_Q6_K, 1, 208, 0, 1.0f / (128 * 32)},
    };
    for (size_t i = 0; i < sizeof(tab) / sizeof(tab[0]); i++)
        if (tab[i].type == t) {
            off[0] = tab[i].off0;
            off[1] = tab[i].off1;
            *amp = tab[i].amp;
            return tab[i].nf;
        }
    return 0;
}

/* A random [rows][k] weight of wtype (host bytes): values in about [-1, 1]
 * through tdm_dtype_from_f32 where it writes the type; BF16 truncated from
 * them; the other quantized types random bytes with small f16 scales. */
static void *rand_weight(uint32_t wtype, int64_t rows, int64_t k)
{
    const size_t rb = tdm_dtype_row_bytes(wtype, (uint64_t)k), bb = tdm_dtype_block_bytes(wtype);
    uint8_t *wq = malloc(rb * (size_t)rows);
    int off[2];
    float amp = 1.0f;
    const int nf = f16_fields(wtype, off, &amp);
    if (nf > 0) {
        for (size_t i = 0; i < rb * (size_t)rows; i++)
            wq[i] = (uint8_t)next_u64();
        for (size_t b = 0; b < rb * (size_t)rows / bb; b++)
            for (int f = 0; f < nf; f++) {
                const uint16_t h = tdm_f32_to_f16(uniform(-amp, amp));
                memcpy(wq + b * bb + (size_t)off[f], &h, 2);
            }
        return wq;
    }
    float *wf = rand_f32((size_t)rows * (size_t)k, -1.0f, 1.0f);
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *row = wq + (size_t)r * rb;
        if (wtype == TDM_DTYPE_BF16) {
            for (int64_t j = 0; j < k; j++) {
                uint32_t u;
                memcpy(&u, &wf[r * k + j], 4);
                row[2 * j] = (uint8_t)(u >> 16);
                row[2 * j + 1] = (uint8_t)(u >> 24);
            }
        } else {
            tdm_dtype_from_f32(wtype, wf + r * k, row, (uint64_t)k);
        }
    }
    free(wf);
    return wq;
}

/* The weight of the cases of one type and shape (every n), made and loaded
 * on both backends once: the 4096 x 4096 ones take a while to make and to
 * repack. weights(0, 0, 0, ...) frees the last one. */
static struct {
    uint32_t wtype;
    int64_t rows, k;
    void *wq;
    tdm_bweight_t *w[2];
} wcache;

static void *weights(uint32_t wtype, int64_t rows, int64_t k, tdm_bweight_t *w[2])
{
    tdm_backend_t *bes[2] = {cpu, gpu};
    if (wcache.wq != NULL && wcache.wtype == wtype && wcache.rows == rows && wcache.k == k) {
        w[0] = wcache.w[0];
        w[1] = wcache.w[1];
        return wcache.wq;
    }
    if (wcache.wq != NULL) {
        for (int b = 0; b < 2; b++)
            if (wcache.w[b] != NULL)
                bes[b]->ops->weight_free(bes[b], wcache.w[b]);
        free(wcache.wq);
        wcache.wq = NULL;
    }
    if (rows == 0)
        return NULL;
    wcache.wtype = wtype;
    wcache.rows = rows;
    wcache.k = k;
    wcache.wq = rand_weight(wtype, rows, k);
    for (int b = 0; b < 2; b++) {
        wcache.w[b] = NULL;
        CHECK(bes[b]->ops->weight_load(bes[b], wcache.wq, wtype, rows, k, &wcache.w[b]) == TDM_OK,
              "weight_load %s %s", bes[b]->ops->name, tdm_dtype_name(wtype));
        w[b] = wcache.w[b];
    }
    return wcache.wq;
}

static void test_matmul(uint32_t wtype, int64_t rows, int64_t k, int64_t n, double limit)
{
    size_t rb = tdm_dtype_row_bytes(wtype, (uint64_t)k);
    tdm_bweight_t *w[2];
    const void *wq = weights(wtype, rows, k, w);
    if (w[0] == NULL || w[1] == NULL)
        return;
    float *x = rand_f32((size_t)n * (size_t)k, -2.0f, 2.0f);
    for (int64_t i = 0; i < n * k; i += 97)
        x[i] *= 20.0f; /* a few outliers, as real activations have */
    tdm_backend_t *bes[2] = {cpu, gpu};
    float *y[2];
    for (int b = 0; b < 2; b++) {
        tdm_backend_t *be = bes[b];
        float *dx = put(be, x, (size_t)n * (size_t)k * sizeof(float));
        void *act = be->ops->buf_alloc(be, be->ops->act_size(wtype, n, k));
        float *dy = poisoned(be, (size_t)n * (size_t)rows * sizeof(float));
        be->ops->act_prepare(be, wtype, dx, n, k, act);
        be->ops->matmul(be, w[b], act, n, dy, rows);
        be->ops->sync(be);
        y[b] = get(be, dy, (size_t)n * (size_t)rows * sizeof(float));
        if (b == 1 && n > 1) {
            /* batch invariance: row n-1 alone gives the same bits */
            float *dx1 = put(be, x + (n - 1) * k, (size_t)k * sizeof(float));
            void *act1 = be->ops->buf_alloc(be, be->ops->act_size(wtype, 1, k));
            float *dy1 = poisoned(be, (size_t)rows * sizeof(float));
            be->ops->act_prepare(be, wtype, dx1, 1, k, act1);
            be->ops->matmul(be, w[b], act1, 1, dy1, rows);
            float *y1 = get(be, dy1, (size_t)rows * sizeof(float));
            CHECK(memcmp(y1, y[1] + (n - 1) * rows, (size_t)rows * sizeof(float)) == 0,
                  "matmul %s %lldx%lld: row %lld alone differs from the same row in a batch of "
                  "%lld (batch invariance)",
                  tdm_dtype_name(wtype), (long long)rows, (long long)k, (long long)(n - 1),
                  (long long)n);
            free(y1);
            be->ops->buf_free(be, dx1);
            be->ops->buf_free(be, act1);
            be->ops->buf_free(be, dy1);
        }
        be->ops->buf_free(be, dx);
        be->ops->buf_free(be, act);
        be->ops->buf_free(be, dy);
    }
    size_t bad;
    double err = rel_err(y[1], y[0], (size_t)n * (size_t)rows, &bad);
    char what[96];
    snprintf(what, sizeof(what), "matmul %s %lldx%lld n=%lld", tdm_dtype_name(wtype),
             (long long)rows, (long long)k, (long long)n);
    report(what, err, limit, bad);
    /* embedding: rows of the same weight, against each other and, bit for
     * bit, against tdm_dtype_to_f32 */
    if (n <= 64) {
        int32_t *ids = malloc((size_t)n * sizeof(int32_t));
        float *ref = malloc((size_t)n * (size_t)k * sizeof(float));
        for (int64_t t = 0; t < n; t++) {
            ids[t] = (int32_t)(next_u64() % (uint64_t)rows);
            tdm_dtype_to_f32(wtype, (const char *)wq + (size_t)ids[t] * rb, ref + t * k,
                             (uint64_t)k);
        }
        float *e[2];
        for (int b = 0; b < 2; b++) {
            tdm_backend_t *be = bes[b];
            int32_t *dids = put(be, ids, (size_t)n * sizeof(int32_t));
            float *de = poisoned(be, (size_t)n * (size_t)k * sizeof(float));
            be->ops->embed(be, w[b], dids, n, de);
            e[b] = get(be, de, (size_t)n * (size_t)k * sizeof(float));
            be->ops->buf_free(be, dids);
            be->ops->buf_free(be, de);
        }
        err = rel_err(e[1], e[0], (size_t)n * (size_t)k, &bad);
        snprintf(what, sizeof(what), "embed %s k=%lld n=%lld", tdm_dtype_name(wtype), (long long)k,
                 (long long)n);
        report(what, err, 1e-6, bad);
        const bool same = memcmp(e[1], ref, (size_t)n * (size_t)k * sizeof(float)) == 0;
        CHECK(same, "embed %s k=%lld n=%lld: not the bits of tdm_dtype_to_f32",
              tdm_dtype_name(wtype), (long long)k, (long long)n);
        snprintf(what, sizeof(what), "embed %s k=%lld n=%lld = tdm_dtype_to_f32 (bits)",
                 tdm_dtype_name(wtype), (long long)k, (long long)n);
        report(what, same ? 0 : 1, 0, 0);
        free(e[0]);
        free(e[1]);
        free(ref);
        free(ids);
    }
    for (int b = 0; b < 2; b++)
        free(y[b]);
    free(x);
}

/* ---- row ops ---- */

typedef enum { ROW_RMSNORM, ROW_ROPE, ROW_SWIGLU, ROW_ADD, ROW_GATHER } row_op_t;

static void test_row_op(row_op_t op, int64_t n, int64_t d, double limit)
{
    static const char *const names[] = {"rmsnorm", "rope", "swiglu", "add", "gather_rows"};
    float *x = rand_f32((size_t)n * (size_t)d, -3.0f, 3.0f);
    float *y = rand_f32((size_t)n * (size_t)d, -3.0f, 3.0f);
    float *wn = rand_f32((size_t)d, 0.5f, 1.5f);
    int32_t *pos = malloc((size_t)n * sizeof(int32_t));
    for (int64_t t = 0; t < n; t++)
        pos[t] = (int32_t)(next_u64() % 8192);
    int32_t head_dim = 64, n_heads = (int32_t)(d / head_dim);
    tdm_backend_t *bes[2] = {cpu, gpu};
    float *out[2];
    size_t bytes = (size_t)n * (size_t)d * sizeof(float);
    for (int b = 0; b < 2; b++) {
        tdm_backend_t *be = bes[b];
        float *dx = put(be, x, bytes), *dy = put(be, y, bytes), *dw = put(be, wn, (size_t)d * 4);
        int32_t *dp = put(be, pos, (size_t)n * sizeof(int32_t));
        float *dout = poisoned(be, bytes);
        switch (op) {
        case ROW_RMSNORM: be->ops->rmsnorm(be, dx, dw, n, d, 1e-5f, dout); break;
        case ROW_ROPE:
            be->ops->rope(be, dx, dp, n, n_heads, head_dim, head_dim, 500000.0f);
            be->ops->buf_free(be, dout);
            dout = dx;
            dx = NULL;
            break;
        case ROW_SWIGLU: be->ops->swiglu(be, dx, dy, n, d, dout); break;
        case ROW_ADD:
            be->ops->add(be, dx, dy, n * d);
            be->ops->buf_free(be, dout);
            dout = dx;
            dx = NULL;
            break;
        case ROW_GATHER: {
            int32_t *idx = malloc((size_t)n * sizeof(int32_t));
            for (int64_t t = 0; t < n; t++)
                idx[t] = (int32_t)((t * 7 + 3) % n);
            int32_t *di = put(be, idx, (size_t)n * sizeof(int32_t));
            be->ops->gather_rows(be, dx, di, n, d, dout);
            be->ops->sync(be);
            be->ops->buf_free(be, di);
            free(idx);
            break;
        }
        }
        be->ops->sync(be);
        out[b] = get(be, dout, bytes);
        if (dx != NULL)
            be->ops->buf_free(be, dx);
        be->ops->buf_free(be, dy);
        be->ops->buf_free(be, dw);
        be->ops->buf_free(be, dp);
        be->ops->buf_free(be, dout);
    }
    size_t bad;
    double err = rel_err(out[1], out[0], (size_t)n * (size_t)d, &bad);
    char what[96];
    snprintf(what, sizeof(what), "%s n=%lld d=%lld", names[op], (long long)n, (long long)d);
    report(what, err, limit, bad);
    free(out[0]);
    free(out[1]);
    free(x);
    free(y);
    free(wn);
    free(pos);
}

/* ---- paged KV: kv_write and attention ---- */

typedef struct attn_case {
    const char *name;
    int32_t n_heads, n_kv_heads, head_dim;
    int32_t n_seqs;  /* decode: one row per sequence, first */
    int32_t prefill; /* > 0: then one sequence of this many rows after ... */
    int32_t past;    /* ... this many positions already in the cache */
    int32_t max_ctx; /* decode contexts are random in [1, max_ctx] */
} attn_case_t;

/* The run hints of tdm_attn_params_t, counted here on the host. */
static void runs_of(const int32_t *tor, int32_t n, int32_t *longest, int32_t *shortest)
{
    *longest = 0;
    *shortest = n;
    for (int32_t t = 0, u; t < n; t = u) {
        for (u = t + 1; u < n && tor[u] == tor[t]; u++) {
        }
        *longest = u - t > *longest ? u - t : *longest;
        *shortest = u - t < *shortest ? u - t : *shortest;
    }
}

static void test_attention(const attn_case_t *c)
{
    const int32_t bs = 16;
    int32_t n_rows = c->n_seqs + c->prefill;
    int32_t n_tables = c->n_seqs + (c->prefill > 0);
    int32_t *ctx = malloc((size_t)n_rows * sizeof(int32_t));
    int32_t *tor = malloc((size_t)n_rows * sizeof(int32_t));
    int32_t longest = 0;
    for (int32_t t = 0; t < n_rows; t++) {
        if (t >= c->n_seqs) {
            ctx[t] = c->past + (t - c->n_seqs) + 1;
            tor[t] = c->n_seqs;
        } else {
            ctx[t] = 1 + (int32_t)(next_u64() % (uint64_t)c->max_ctx);
            tor[t] = t;
        }
        longest = ctx[t] > longest ? ctx[t] : longest;
    }
    int32_t stride = (longest + bs - 1) / bs;
    int32_t n_blocks = stride * n_tables + 3;
    /* every table gets distinct blocks in shuffled order */
    int32_t *perm = malloc((size_t)n_blocks * sizeof(int32_t));
    for (int32_t i = 0; i < n_blocks; i++)
        perm[i] = i;
    for (int32_t i = n_blocks - 1; i > 0; i--) {
        int32_t j = (int32_t)(next_u64() % (uint64_t)(i + 1)), tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    int32_t *tables = malloc((size_t)n_tables * (size_t)stride * sizeof(int32_t));
    for (int32_t i = 0; i < n_tables * stride; i++)
        tables[i] = perm[i];
    int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim, qd = (int64_t)c->n_heads * c->head_dim;
    size_t cache_elems = (size_t)n_blocks * bs * (size_t)kvd;
    uint16_t *ck = malloc(cache_elems * 2), *cv = malloc(cache_elems * 2);
    for (size_t i = 0; i < cache_elems; i++) {
        ck[i] = tdm_f32_to_f16(uniform(-2, 2));
        cv[i] = tdm_f32_to_f16(uniform(-2, 2));
    }
    float *q = rand_f32((size_t)n_rows * (size_t)qd, -1.5f, 1.5f);
    /* kv_write of the rows' own K/V (prefill: their slots; decode: the last position) */
    float *kn = rand_f32((size_t)n_rows * (size_t)kvd, -2, 2);
    float *vn = rand_f32((size_t)n_rows * (size_t)kvd, -2, 2);
    int32_t *slot = malloc((size_t)n_rows * sizeof(int32_t));
    for (int32_t t = 0; t < n_rows; t++) {
        int32_t p = ctx[t] - 1;
        slot[t] = tables[tor[t] * stride + p / bs] * bs + p % bs;
    }
    tdm_backend_t *bes[2] = {cpu, gpu};
    float *out[2];
    uint16_t *kout[2];
    size_t obytes = (size_t)n_rows * (size_t)qd * sizeof(float);
    for (int b = 0; b < 2; b++) {
        tdm_backend_t *be = bes[b];
        uint16_t *dk = put(be, ck, cache_elems * 2), *dv = put(be, cv, cache_elems * 2);
        float *dkn = put(be, kn, (size_t)n_rows * (size_t)kvd * 4);
        float *dvn = put(be, vn, (size_t)n_rows * (size_t)kvd * 4);
        int32_t *ds = put(be, slot, (size_t)n_rows * 4);
        int32_t *dctx = put(be, ctx, (size_t)n_rows * 4), *dtor = put(be, tor, (size_t)n_rows * 4);
        int32_t *dtab = put(be, tables, (size_t)n_tables * (size_t)stride * 4);
        float *dq = put(be, q, obytes);
        float *dout = poisoned(be, obytes);
        be->ops->kv_write(be, dkn, dvn, ds, n_rows, kvd, dk, dv);
        tdm_attn_params_t p = {.n = n_rows,
                               .n_heads = c->n_heads,
                               .n_kv_heads = c->n_kv_heads,
                               .head_dim = c->head_dim,
                               .block_size = bs,
                               .scale = 1.0f / sqrtf((float)c->head_dim),
                               .ctx_len = dctx,
                               .block_tables = dtab,
                               .table_of_row = dtor,
                               .bt_stride = stride};
        runs_of(tor, n_rows, &p.longest_run, &p.shortest_run);
        be->ops->attention(be, &p, dq, dk, dv, dout);
        be->ops->sync(be);
        out[b] = get(be, dout, obytes);
        kout[b] = get(be, dk, cache_elems * 2);
        if (b == 1) {
            /* the run hints only skip kernels no row needs: without them
             * (0: unknown) every kernel runs, with the same bits */
            float *dout0 = poisoned(be, obytes);
            tdm_attn_params_t p0 = p;
            p0.longest_run = p0.shortest_run = 0;
            be->ops->attention(be, &p0, dq, dk, dv, dout0);
            float *o0 = get(be, dout0, obytes);
            CHECK(memcmp(o0, out[1], obytes) == 0,
                  "attention %s: the run hints (%d, %d) change the result", c->name, p.longest_run,
                  p.shortest_run);
            free(o0);
            be->ops->buf_free(be, dout0);
        }
        if (b == 1) {
            /* batch invariance: the last row alone */
            int32_t last = n_rows - 1;
            float *dq1 = put(be, q + (size_t)last * (size_t)qd, (size_t)qd * 4);
            int32_t *dctx1 = put(be, ctx + last, 4), *dtor1 = put(be, tor + last, 4);
            float *dout1 = poisoned(be, (size_t)qd * 4);
            tdm_attn_params_t p1 = p;
            p1.n = 1;
            p1.longest_run = p1.shortest_run = 1;
            p1.ctx_len = dctx1;
            p1.table_of_row = dtor1;
            be->ops->attention(be, &p1, dq1, dk, dv, dout1);
            float *o1 = get(be, dout1, (size_t)qd * 4);
            CHECK(memcmp(o1, out[1] + (size_t)last * (size_t)qd, (size_t)qd * 4) == 0,
                  "attention %s: the last row alone differs from the same row among %d "
                  "(batch invariance)",
                  c->name, n_rows);
            free(o1);
            be->ops->buf_free(be, dq1);
            be->ops->buf_free(be, dctx1);
            be->ops->buf_free(be, dtor1);
            be->ops->buf_free(be, dout1);
        }
        void *bufs[] = {dk, dv, dkn, dvn, ds, dctx, dtor, dtab, dq, dout};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
            be->ops->buf_free(be, bufs[i]);
    }
    size_t bad;
    double err = rel_err(out[1], out[0], (size_t)n_rows * (size_t)qd, &bad);
    char what[96];
    snprintf(what, sizeof(what), "attention %s", c->name);
    report(what, err, 2e-3, bad);
    CHECK(memcmp(kout[0], kout[1], cache_elems * 2) == 0, "kv_write %s: caches differ", c->name);
    snprintf(what, sizeof(what), "kv_write %s (bits equal)", c->name);
    report(what, memcmp(kout[0], kout[1], cache_elems * 2) == 0 ? 0 : 1, 0, 0);
    free(out[0]);
    free(out[1]);
    free(kout[0]);
    free(kout[1]);
    free(ctx);
    free(tor);
    free(perm);
    free(tables);
    free(ck);
    free(cv);
    free(q);
    free(kn);
    free(vn);
    free(slot);
}

/* ---- KV block transfers (kv_out, kv_in) ----
 * Byte for byte against the CPU backend's copies: blocks out to host (two
 * transfers in flight, the second waited for only), then host rows in
 * over other blocks; rows past n_tok must stay as they were. */
static void test_kv_transfer(int32_t n_layer, int32_t bs, int64_t kv_dim, int32_t n_blocks)
{
    const int64_t be_elems = (int64_t)bs * kv_dim;
    const size_t layer_bytes = (size_t)n_blocks * (size_t)be_elems * sizeof(uint16_t);
    const int32_t n_move = n_blocks / 3, half = n_move / 2;
    uint16_t **ck[2], **cv[2];
    uint16_t *hcache = malloc(layer_bytes);
    int32_t *ids = malloc((size_t)n_move * sizeof(int32_t));
    int32_t *ntok = malloc((size_t)n_move * sizeof(int32_t));
    for (int32_t i = 0; i < n_move; i++) {
        ids[i] = (int32_t)(next_u64() % (uint64_t)n_blocks);
        for (int32_t j = 0; j < i; j++)
            if (ids[j] == ids[i]) { /* distinct blocks */
                ids[i] = (ids[i] + 1) % n_blocks;
                j = -1;
            }
        ntok[i] = i % 4 == 3 ? 1 + (int32_t)(next_u64() % (uint64_t)bs) : bs;
    }
    tdm_backend_t *bes[2] = {cpu, gpu};
    uint64_t seed = next_u64();
    for (int b = 0; b < 2; b++) {
        ck[b] = malloc((size_t)n_layer * sizeof(*ck[b]));
        cv[b] = malloc((size_t)n_layer * sizeof(*cv[b]));
        uint64_t saved = rng;
        rng = seed; /* the same cache on both */
        for (int32_t l = 0; l < 2 * n_layer; l++) {
            for (size_t i = 0; i < layer_bytes / 2; i++)
                hcache[i] = (uint16_t)next_u64();
            (l < n_layer ? ck[b] : cv[b])[l % n_layer] = put(bes[b], hcache, layer_bytes);
        }
        rng = saved;
    }
    const size_t host_elems = (size_t)n_move * 2 * (size_t)n_layer * (size_t)be_elems;
    uint16_t *out[2], *in = malloc(host_elems * sizeof(uint16_t));
    for (size_t i = 0; i < host_elems; i++)
        in[i] = (uint16_t)next_u64();
    for (int b = 0; b < 2; b++) {
        tdm_backend_t *be = bes[b];
        out[b] = malloc(host_elems * sizeof(uint16_t));
        memset(out[b], 0xff, host_elems * sizeof(uint16_t));
        size_t second = (size_t)half * 2 * (size_t)n_layer * (size_t)be_elems;
        (void)be->ops->kv_out(be, ck[b], cv[b], n_layer, be_elems, ids, ntok, half, kv_dim, out[b]);
        uint64_t t = be->ops->kv_out(be, ck[b], cv[b], n_layer, be_elems, ids + half, ntok + half,
                                     n_move - half, kv_dim, out[b] + second);
        be->ops->kv_wait(be, t);
    }
    size_t diff = 0;
    for (int32_t i = 0; i < n_move; i++)
        for (int32_t t = 0; t < 2 * n_layer; t++) {
            size_t off = ((size_t)i * 2 * (size_t)n_layer + (size_t)t) * (size_t)be_elems;
            diff += memcmp(out[0] + off, out[1] + off,
                           (size_t)ntok[i] * (size_t)kv_dim * sizeof(uint16_t)) != 0;
        }
    char what[160];
    snprintf(what, sizeof(what), "kv_out %d layers, %d x %lld, %d blocks", n_layer, bs,
             (long long)kv_dim, n_move);
    report(what, diff ? 1.0 : 0.0, 0, 0);

    /* in: the same host rows into the blocks in reverse order */
    for (int32_t i = 0; i < n_move / 2; i++) {
        int32_t x = ids[i];
        ids[i] = ids[n_move - 1 - i];
        ids[n_move - 1 - i] = x;
    }
    diff = 0;
    for (int b = 0; b < 2; b++) {
        tdm_backend_t *be = bes[b];
        uint64_t t =
            be->ops->kv_in(be, ck[b], cv[b], n_layer, be_elems, ids, ntok, n_move, kv_dim, in);
        be->ops->kv_wait(be, t);
    }
    for (int32_t l = 0; l < 2 * n_layer; l++) {
        uint16_t *a = get(cpu, (l < n_layer ? ck[0] : cv[0])[l % n_layer], layer_bytes);
        uint16_t *g = get(gpu, (l < n_layer ? ck[1] : cv[1])[l % n_layer], layer_bytes);
        diff += memcmp(a, g, layer_bytes) != 0;
        free(a);
        free(g);
    }
    snprintf(what, sizeof(what), "kv_in %d layers, %d x %lld, %d blocks", n_layer, bs,
             (long long)kv_dim, n_move);
    report(what, diff ? 1.0 : 0.0, 0, 0);

    for (int b = 0; b < 2; b++) {
        for (int32_t l = 0; l < n_layer; l++) {
            bes[b]->ops->buf_free(bes[b], ck[b][l]);
            bes[b]->ops->buf_free(bes[b], cv[b][l]);
        }
        free(ck[b]);
        free(cv[b]);
        free(out[b]);
    }
    free(in);
    free(hcache);
    free(ids);
    free(ntok);
}

/* ---- graphs: capture, replay after scratch growth, capture failure ---- */

typedef struct graph_step {
    tdm_backend_t *be;
    tdm_bweight_t *w;
    int64_t rows;
    void *act;
    float *y;
    int64_t n;
    bool bad; /* also call something a capture does not allow */
    float *logits;
} graph_step_t;

static void graph_step(void *arg)
{
    graph_step_t *g = arg;
    /* n = 1 on 4096 rows: a split over blocks, partials in scratch */
    g->be->ops->matmul(g->be, g->w, g->act, g->n, g->y, g->rows);
    if (g->bad) {
        int32_t tok;
        tdm_sample_row_t row = {.temperature = 0.0f, .top_p = 1.0f, .repetition_penalty = 1.0f};
        /* waits for its result: not allowed while capturing */
        g->be->ops->sample(g->be, g->logits, 1, 1000, &row, NULL, NULL, 0, &tok, NULL);
    }
}

static void test_graphs(void)
{
    tdm_backend_t *be = gpu;
    if (be->ops->graph_capture == NULL) {
        printf("graphs: %s has none (the CPU stand-in): skipped here; tests/unit/test_scratch "
               "holds the scratch rule they rely on\n",
               be->ops->name);
        return;
    }
    const int64_t rows = 4096, k = 4096;
    const uint32_t wt = TDM_DTYPE_Q4_1;
    float *wf = rand_f32((size_t)rows * (size_t)k, -1.0f, 1.0f);
    size_t rb = tdm_dtype_row_bytes(wt, (uint64_t)k);
    void *wq = malloc(rb * (size_t)rows);
    for (int64_t r = 0; r < rows; r++)
        tdm_dtype_from_f32(wt, wf + r * k, (char *)wq + (size_t)r * rb, (uint64_t)k);
    float *x = rand_f32((size_t)k, -2.0f, 2.0f);
    graph_step_t g = {.be = be, .rows = rows, .n = 1};
    CHECK(be->ops->weight_load(be, wq, wt, rows, k, &g.w) == TDM_OK, "graphs: weight_load");
    float *dx = put(be, x, (size_t)k * sizeof(float));
    g.act = be->ops->buf_alloc(be, be->ops->act_size(wt, 1, k));
    be->ops->act_prepare(be, wt, dx, 1, k, g.act);
    g.y = poisoned(be, (size_t)rows * sizeof(float));
    float *lg = rand_f32(1000, -5.0f, 5.0f);
    g.logits = put(be, lg, 1000 * sizeof(float));
    const size_t yb = (size_t)rows * sizeof(float);

    graph_step(&g); /* eager first: the scratch reaches its size */
    float *eager = get(be, g.y, yb);
    void *graph = be->ops->graph_capture(be, graph_step, &g);
    CHECK(graph != NULL, "graphs: capture of a matmul step failed");
    if (graph != NULL) {
        be->ops->copy_to(be, g.y, lg, sizeof(float)); /* scribble over the output */
        be->ops->graph_launch(be, graph);
        float *r1 = get(be, g.y, yb);
        CHECK(memcmp(r1, eager, yb) == 0, "graphs: the replay differs from eager execution");
        free(r1);
        /* grow the scratch past what the graph was captured with: the
         * sampler's history alone takes 2 x 48 MB */
        const int64_t n_hist = 12 << 20;
        int32_t *ht = calloc((size_t)n_hist, sizeof(int32_t));
        int32_t *hc = calloc((size_t)n_hist, sizeof(int32_t));
        int32_t tok = -1;
        tdm_sample_row_t row = {.temperature = 0.0f, .top_p = 1.0f, .repetition_penalty = 1.0f};
        be->ops->sample(be, g.logits, 1, 1000, &row, ht, hc, n_hist, &tok, NULL);
        CHECK(tok >= 0 && tok < 1000, "graphs: sample with a long history");
        free(ht);
        free(hc);
        /* the old scratch must still be there for the graph (under
         * compute-sanitizer a freed one is an invalid access) */
        be->ops->copy_to(be, g.y, lg, sizeof(float));
        be->ops->graph_launch(be, graph);
        float *r2 = get(be, g.y, yb);
        CHECK(memcmp(r2, eager, yb) == 0, "graphs: the replay after scratch growth differs");
        free(r2);
        graph_step(&g); /* eager on the new scratch */
        float *r3 = get(be, g.y, yb);
        CHECK(memcmp(r3, eager, yb) == 0, "graphs: eager after scratch growth differs");
        free(r3);
        be->ops->graph_free(be, graph);
        report("graph replay = eager, before and after scratch growth", 0, 0, 0);
    }
    /* a capture that fails inside returns NULL (a warning), and the
     * process goes on: the step runs op by op with the same result */
    g.bad = true;
    void *bad = be->ops->graph_capture(be, graph_step, &g);
    CHECK(bad == NULL, "graphs: a capture with a synchronizing op should fail");
    if (bad != NULL)
        be->ops->graph_free(be, bad);
    g.bad = false;
    graph_step(&g);
    float *r4 = get(be, g.y, yb);
    CHECK(memcmp(r4, eager, yb) == 0, "graphs: eager after a failed capture differs");
    report("failed capture falls back to eager", memcmp(r4, eager, yb) == 0 ? 0 : 1, 0, 0);
    free(r4);
    free(eager);
    be->ops->buf_free(be, dx);
    be->ops->buf_free(be, g.act);
    be->ops->buf_free(be, g.y);
    be->ops->buf_free(be, g.logits);
    be->ops->weight_free(be, g.w);
    free(wf);
    free(wq);
    free(x);
    free(lg);
}

int main(void)
{
    /* TANDEM_TEST_SCALAR_AS_GPU=1: the scalar CPU backend stands in for the
     * GPU, to check this harness itself on a machine without one */
    bool stand_in = getenv("TANDEM_TEST_SCALAR_AS_GPU") != NULL;
    tdm_status_t st = stand_in ? tdm_backend_cpu_create(1, TDM_CPU_ISA_SCALAR, &gpu)
                               : tdm_backend_cuda_create(0, &gpu);
    if (st != TDM_OK) {
        printf("SKIP: no CUDA backend here (%s)\n", tdm_status_str(st));
        return 77;
    }
    if (tdm_backend_cpu_create(0, TDM_CPU_ISA_AUTO, &cpu) != TDM_OK) {
        fprintf(stderr, "FATAL: no CPU backend\n");
        return 1;
    }
    rng = t_seed("test_cuda_ops");

    /* every type the backend computes with: the float types, the GGUF
     * layouts it keeps (Q8_0, Q4_0, Q4_1) and, from N_FIRST on, BF16 and
     * the types it repacks at load */
    static const uint32_t types[] = {
        TDM_DTYPE_F16,  TDM_DTYPE_Q8_0, TDM_DTYPE_Q4_0, TDM_DTYPE_Q4_1,   TDM_DTYPE_F32,
        TDM_DTYPE_BF16, TDM_DTYPE_Q5_0, TDM_DTYPE_Q5_1, TDM_DTYPE_IQ4_NL, TDM_DTYPE_Q2_K,
        TDM_DTYPE_Q3_K, TDM_DTYPE_Q4_K, TDM_DTYPE_Q5_K, TDM_DTYPE_Q6_K,   TDM_DTYPE_IQ4_XS};
    /* rows x k: model shapes, then tails: rows not a multiple of the 64-row
     * tile (77, 100, 200), k not a multiple of a 256-element superchunk
     * (608: 19 blocks), and for float types k not a multiple of 32 (100:
     * the k-tail mask); quantized types need k in whole blocks of 32
     * (shapes) or 256 (the K-quants and IQ4_XS: shapes256, the same kinds
     * of shapes and tails where 256 allows) */
    static const int64_t shapes[][2] = {{576, 576}, {1536, 576}, {576, 1536}, {4096, 4096},
                                        {77, 576},  {200, 608},  {100, 100}};
    static const int64_t shapes256[][2] = {{576, 512},   {1536, 512}, {576, 1536},
                                           {4096, 4096}, {77, 768},   {200, 512}};
    /* n: decode (1, 3, 8), the 9..32 configuration (17), the prefill
     * tile (33, 64, 300), each with token tails */
    static const int64_t ns[] = {1, 3, 8, 17, 33, 64, 300};
    const size_t N_FIRST = 5;
    /* TANDEM_TEST_QUICK: fewer, smaller cases (compute-sanitizer runs
     * kernels tens of times slower), but every configuration and tail:
     * n = 1, 3, 17, 33 and one prefill-sized n = 300 on small rows */
    /* (the types from N_FIRST on, which share the kernels' code: each
     * configuration once, with row tails, and a decode split over blocks:
     * rows 77 with n = 1, 17, 300; rows 200 with n = 3, 33; 576 x 1536
     * with n = 1) */
    /* TANDEM_TEST_QUICK=2 (racecheck, synccheck: slower still): one small
     * case per kernel configuration (from N_FIRST on: the decode and the
     * prefill tile on rows 77) */
    const char *qenv = getenv("TANDEM_TEST_QUICK");
    bool quick = qenv != NULL, quick2 = quick && strcmp(qenv, "2") == 0;
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        const bool b256 = tdm_dtype_block_elems(types[t]) == 256;
        const size_t nshapes =
            b256 ? sizeof(shapes256) / sizeof(shapes256[0]) : sizeof(shapes) / sizeof(shapes[0]);
        for (size_t s = 0; s < nshapes; s++)
            for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++) {
                const int64_t rows = b256 ? shapes256[s][0] : shapes[s][0];
                const int64_t k = b256 ? shapes256[s][1] : shapes[s][1], n = ns[i];
                if (tdm_dtype_row_bytes(types[t], (uint64_t)k) == 0)
                    continue; /* k not in whole blocks of this type */
                if (rows == 4096 && (n > 64 || quick))
                    continue; /* the CPU reference would take long */
                if (quick && (n == 8 || n == 64 || (n == 300 && rows * k > 600 * 600)))
                    continue;
                if (quick && t >= N_FIRST && !(rows == 77 && (n == 1 || n == 17 || n == 300)) &&
                    !(rows == 200 && (n == 3 || n == 33)) && !(rows == 576 && k == 1536 && n == 1))
                    continue;
                if (quick2 && (rows > 200 || (n != 1 && n != 17 && n != 33)))
                    continue;
                if (quick2 && t >= N_FIRST && (rows != 77 || n == 17))
                    continue;
                test_matmul(types[t], rows, k, n, 3e-3);
            }
    }
    (void)weights(0, 0, 0, NULL);
    test_row_op(ROW_RMSNORM, 1, 100, 1e-5);
    test_row_op(ROW_SWIGLU, 3, 33, 1e-5);
    test_row_op(ROW_ADD, 17, 33, 1e-7);
    test_row_op(ROW_GATHER, 33, 100, 0);
    test_row_op(ROW_RMSNORM, 37, 4096, 1e-5);
    test_row_op(ROW_RMSNORM, 5, 576, 1e-5);
    test_row_op(ROW_ROPE, 37, 4096, 1e-4);
    test_row_op(ROW_ROPE, 300, 576, 1e-4);
    test_row_op(ROW_SWIGLU, 37, 14336, 1e-5);
    test_row_op(ROW_ADD, 37, 4096, 1e-7);
    test_row_op(ROW_GATHER, 37, 4096, 0);

    static const attn_case_t cases[] = {
        {"decode 9/3x64, 8 seqs up to 700", 9, 3, 64, 8, 0, 0, 700},
        {"decode 32/8x128, 16 seqs up to 5000", 32, 8, 128, 16, 0, 0, 5000},
        {"decode 32/8x128, 1 seq", 32, 8, 128, 1, 0, 0, 3000},
        {"prefill 9/3x64, 300 rows after 37", 9, 3, 64, 0, 300, 37, 0},
        {"prefill 32/8x128, 512 rows after 1500", 32, 8, 128, 0, 512, 1500, 0},
        {"mixed 9/3x64, 3 decode + 70 prefill after 5", 9, 3, 64, 3, 70, 5, 300},
        {"mixed 32/8x128, 2 decode + 33 prefill after 100", 32, 8, 128, 2, 33, 100, 900},
        {"prefill 8/8x64, 17 rows after 0", 8, 8, 64, 0, 17, 0, 0},
        {"decode 16/16x128, 3 seqs up to 70", 16, 16, 128, 3, 0, 0, 70},
    };
    /* quick: the small cases, every kernel (the row kernel split and not,
     * the tile kernel at head dims 64 and 128, mixed batches) */
    static const bool in_quick[] = {true, false, true, false, false, true, true, true, true};
    _Static_assert(sizeof(in_quick) / sizeof(in_quick[0]) == sizeof(cases) / sizeof(cases[0]),
                   "one quick flag per case");
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        if ((!quick || in_quick[i]) &&
            (!quick2 || strncmp(cases[i].name, "mixed", 5) == 0 || i == 0))
            test_attention(&cases[i]);

    if (!quick2) {
        test_graphs();
        test_kv_transfer(32, 16, 1024, 64); /* 8B-shaped: 16-byte moves */
    }
    test_kv_transfer(3, 5, 20, 30); /* odd rows: 2-byte moves */

    printf("\n%-58s %10s %8s\n", "op", "rel err", "limit");
    for (int i = 0; i < n_ops; i++)
        printf("%s\n", table[i]);
    tdm_backend_destroy(cpu);
    tdm_backend_destroy(gpu);
    return t_finish();
}
