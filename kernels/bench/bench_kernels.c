/* Microbenchmark of the CPU kernels on SmolLM2-135M shapes.
 *
 *   bench_kernels [threads] [isa]      (isa: scalar, avx2, avx512; default best)
 *   env: BENCH_ONLY=substring of a case, BENCH_CASE=substring of a model
 *   step, BENCH_CPUTIME=1 (thread CPU time; with 1 thread on a busy machine)
 *
 * n = 1 (decode): weight GB/s (GGUF bytes per second) cycling through copies
 * of the weight that together exceed the L3, beside a plain read of the
 * same bytes with the same threads in the same run. n = 32, 64, 512: GOP/s
 * (2 ops per multiply-add) on one copy. Also the pool's run latency, the
 * act_prepare cost, attention at decode and prefill shapes, and whole
 * SmolLM2-135M-shaped steps (decode at batch 1/32/64, prefill of 512).
 *
 * Build (after configuring the tree into /tmp/build-kern):
 *   cmake --build /tmp/build-kern --target tandem_kernels
 *   gcc -std=gnu11 -O2 -march=native -Iinclude kernels/bench/bench_kernels.c \
 *       /tmp/build-kern/lib/libtandem_kernels.a /tmp/build-kern/lib/libtandem_common.a \
 *       -lpcre2-8 -lpthread -lm -o /tmp/bench_kernels
 * (-march=native only matters for the read-bandwidth loop.) */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "tandem/dtype.h"
#include "tandem/kernels.h"
#include "tandem/log.h"
#include "tandem/threadpool.h"

/* BENCH_CPUTIME=1: the calling thread's CPU time instead of the wall clock,
 * for 1-thread runs on a machine shared with other work. */
static double now_s(void)
{
    static int cputime = -1;
    if (cputime < 0)
        cputime = getenv("BENCH_CPUTIME") != NULL;
    struct timespec ts;
    clock_gettime(cputime ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* ---- plain read bandwidth over the same buffers ---- */

typedef struct read_task {
    void **bufs;
    size_t bytes;
    int nbuf;
    volatile uint64_t sink[64];
} read_task_t;

static void read_fn(void *arg, int ith, int nth)
{
    read_task_t *t = arg;
    uint64_t acc = 0;
    for (int b = 0; b < t->nbuf; b++) {
        size_t lo = t->bytes * (size_t)ith / (size_t)nth & ~(size_t)255;
        size_t hi =
            ith == nth - 1 ? t->bytes : t->bytes * (size_t)(ith + 1) / (size_t)nth & ~(size_t)255;
        const uint8_t *p = t->bufs[b];
#if defined(__AVX512F__)
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (size_t i = lo; i + 256 <= hi; i += 256) {
            a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void *)(p + i)));
            a1 = _mm512_xor_si512(a1, _mm512_load_si512((const void *)(p + i + 64)));
            a2 = _mm512_xor_si512(a2, _mm512_load_si512((const void *)(p + i + 128)));
            a3 = _mm512_xor_si512(a3, _mm512_load_si512((const void *)(p + i + 192)));
        }
        a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
        acc += (uint64_t)_mm512_reduce_add_epi64(a0);
#else
        const uint64_t *q = (const uint64_t *)(p + lo);
        for (size_t i = 0; i < (hi - lo) / 8; i++)
            acc ^= q[i];
#endif
    }
    t->sink[ith % 64] = acc;
}

/* ---- matmul ---- */

typedef struct mm_case {
    const char *name;
    uint32_t type;
    int64_t rows, k;
} mm_case_t;

static void bench_matmul(tdm_backend_t *be, tdm_threadpool_t *pool, mm_case_t c)
{
    const tdm_backend_ops_t *ops = be->ops;
    const size_t row_bytes = tdm_dtype_row_bytes(c.type, (uint64_t)c.k);
    const size_t wbytes = row_bytes * (size_t)c.rows;
    int copies = (int)((160u << 20) / wbytes) + 1;
    if (copies < 2)
        copies = 2;
    /* One random weight, loaded `copies` times (the backend packs each). */
    float *src = malloc((size_t)c.k * sizeof(float));
    uint8_t *host = malloc(wbytes);
    for (int64_t r = 0; r < c.rows; r++) {
        for (int64_t j = 0; j < c.k; j++)
            src[j] = frand();
        tdm_dtype_from_f32(c.type, src, host + (size_t)r * row_bytes, (uint64_t)c.k);
    }
    tdm_bweight_t **ws = calloc((size_t)copies, sizeof(*ws));
    void **raw = calloc((size_t)copies, sizeof(*raw));
    for (int i = 0; i < copies; i++) {
        raw[i] = aligned_alloc(64, (wbytes + 255) & ~(size_t)255);
        memcpy(raw[i], host, wbytes);
        if (ops->weight_load(be, raw[i], c.type, c.rows, c.k, &ws[i]) != TDM_OK) {
            printf("weight_load failed\n");
            exit(1);
        }
    }
    const int64_t nmax = 512;
    float *x = malloc((size_t)(nmax * c.k) * sizeof(float));
    for (int64_t i = 0; i < nmax * c.k; i++)
        x[i] = frand() * 3.0f;
    void *act = ops->buf_alloc(be, ops->act_size(c.type, nmax, c.k));
    float *y = ops->buf_alloc(be, (size_t)(nmax * c.rows) * sizeof(float));

    /* Plain read of the same bytes (the GGUF copies). */
    read_task_t rt = {.bufs = raw, .bytes = wbytes, .nbuf = copies};
    tdm_threadpool_run(pool, read_fn, &rt);
    double best_read = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_s();
        tdm_threadpool_run(pool, read_fn, &rt);
        double dt = now_s() - t0;
        best_read = dt < best_read ? dt : best_read;
    }
    double read_gbs = (double)wbytes * copies / best_read / 1e9;

    /* n = 1: cycle through the copies. */
    ops->act_prepare(be, c.type, x, 1, c.k, act);
    for (int i = 0; i < copies; i++)
        ops->matmul(be, ws[i], act, 1, y, c.rows);
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_s();
        for (int i = 0; i < copies; i++)
            ops->matmul(be, ws[i], act, 1, y, c.rows);
        double dt = (now_s() - t0) / copies;
        best = dt < best ? dt : best;
    }
    double mm_gbs = (double)wbytes / best / 1e9;
    printf("%-22s n=1   %8.1f us  %6.1f GB/s  (read %5.1f GB/s, %3.0f%%)\n", c.name, best * 1e6,
           mm_gbs, read_gbs, 100.0 * mm_gbs / read_gbs);

    /* n = 1 with the weight in cache (a small matrix re-read). */
    best = 1e30;
    for (int rep = 0; rep < 200; rep++) {
        double t0 = now_s();
        ops->matmul(be, ws[0], act, 1, y, c.rows);
        double dt = now_s() - t0;
        best = dt < best ? dt : best;
    }
    printf("%-22s n=1   %8.1f us  %6.1f GB/s  (weight cached)\n", c.name, best * 1e6,
           (double)wbytes / best / 1e9);

    static const int64_t ns[] = {8, 32, 64, 512};
    for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
        int64_t n = ns[ni];
        ops->act_prepare(be, c.type, x, n, c.k, act);
        int reps = n >= 512 ? 3 : 10;
        best = 1e30;
        for (int rep = 0; rep < reps; rep++) {
            double t0 = now_s();
            ops->matmul(be, ws[rep % copies], act, n, y, c.rows);
            double dt = now_s() - t0;
            best = dt < best ? dt : best;
        }
        double ops_ = 2.0 * (double)c.rows * (double)c.k * (double)n;
        printf("%-22s n=%-3lld %8.1f us  %6.1f GOP/s  %6.1f us/token\n", c.name, (long long)n,
               best * 1e6, ops_ / best / 1e9, best * 1e6 / (double)n);
    }
    /* act_prepare cost. */
    for (int64_t n = 1; n <= 512; n *= 512) {
        best = 1e30;
        for (int rep = 0; rep < 20; rep++) {
            double t0 = now_s();
            ops->act_prepare(be, c.type, x, n, c.k, act);
            double dt = now_s() - t0;
            best = dt < best ? dt : best;
        }
        printf("%-22s act_prepare n=%-3lld %8.2f us\n", c.name, (long long)n, best * 1e6);
    }
    ops->buf_free(be, y);
    ops->buf_free(be, act);
    free(x);
    for (int i = 0; i < copies; i++) {
        ops->weight_free(be, ws[i]);
        free(raw[i]);
    }
    free(raw);
    free(ws);
    free(host);
    free(src);
}

/* ---- attention ---- */

static void bench_attention(tdm_backend_t *be, int64_t n, int32_t ctx_max, int causal)
{
    const tdm_backend_ops_t *ops = be->ops;
    const int32_t nh = 9, nkv = 3, hd = 64, bs = 16;
    const int32_t nblk = (ctx_max + bs - 1) / bs;
    const int64_t kvd = (int64_t)nkv * hd;
    uint16_t *ck = ops->buf_alloc(be, (size_t)(nblk * bs * kvd) * 2);
    uint16_t *cv = ops->buf_alloc(be, (size_t)(nblk * bs * kvd) * 2);
    for (int64_t i = 0; i < nblk * bs * kvd; i++) {
        ck[i] = tdm_f32_to_f16(frand());
        cv[i] = tdm_f32_to_f16(frand());
    }
    int32_t *table = malloc((size_t)nblk * 4), *ctx = malloc((size_t)n * 4),
            *tor = calloc((size_t)n, 4);
    for (int i = 0; i < nblk; i++)
        table[i] = i;
    double pairs = 0;
    for (int64_t t = 0; t < n; t++) {
        ctx[t] = causal ? (int32_t)(ctx_max - n + t + 1) : ctx_max;
        pairs += ctx[t];
    }
    float *q = malloc((size_t)(n * nh * hd) * 4), *out = malloc((size_t)(n * nh * hd) * 4);
    for (int64_t i = 0; i < n * nh * hd; i++)
        q[i] = frand();
    tdm_attn_params_t p = {.n = n,
                           .n_heads = nh,
                           .n_kv_heads = nkv,
                           .head_dim = hd,
                           .block_size = bs,
                           .scale = 0.125f,
                           .ctx_len = ctx,
                           .block_tables = table,
                           .table_of_row = tor,
                           .bt_stride = nblk};
    ops->attention(be, &p, q, ck, cv, out);
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_s();
        ops->attention(be, &p, q, ck, cv, out);
        double dt = now_s() - t0;
        best = dt < best ? dt : best;
    }
    double flops = pairs * nh * hd * 4.0;
    printf("attention n=%-4lld ctx%s%-5d %9.1f us  %6.1f GFLOP/s  (x30 layers: %.2f ms)\n",
           (long long)n, causal ? "<=" : "=", ctx_max, best * 1e6, flops / best / 1e9, best * 30e3);
    free(out);
    free(q);
    free(tor);
    free(ctx);
    free(table);
    ops->buf_free(be, cv);
    ops->buf_free(be, ck);
}

/* ---- a SmolLM2-135M-shaped forward step through the ops table ----
 * 30 layers of Q4_1 weights (random), Q8_0 tied embedding/output; what the
 * engine does per step, without sampling. Decode: n sequences, one token
 * each, every one attending ctx positions; prefill: n tokens of one
 * sequence (causal), logits for the last token only. */

#define NL    30
#define D     576
#define FF    1536
#define NH    9
#define NKV   3
#define HD    64
#define VOCAB 49152

static tdm_bweight_t *rand_weight(tdm_backend_t *be, uint32_t type, int64_t rows, int64_t k,
                                  void **keep)
{
    size_t rb = tdm_dtype_row_bytes(type, (uint64_t)k);
    uint8_t *h = malloc(rb * (size_t)rows);
    float *src = malloc((size_t)k * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < k; j++)
            src[j] = frand() * 0.05f;
        tdm_dtype_from_f32(type, src, h + (size_t)r * rb, (uint64_t)k);
    }
    free(src);
    tdm_bweight_t *w = NULL;
    be->ops->weight_load(be, h, type, rows, k, &w);
    *keep = h;
    return w;
}

static void bench_model(tdm_backend_t *be)
{
    const tdm_backend_ops_t *ops = be->ops;
    tdm_bweight_t *W[NL][7];
    void *keep[NL * 7 + 1];
    static const int64_t shp[7][2] = {{D, D},  {NKV * HD, D}, {NKV * HD, D}, {D, D},
                                      {FF, D}, {FF, D},       {D, FF}};
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < 7; i++)
            W[l][i] = rand_weight(be, TDM_DTYPE_Q4_1, shp[i][0], shp[i][1], &keep[l * 7 + i]);
    tdm_bweight_t *out_w = rand_weight(be, TDM_DTYPE_Q8_0, VOCAB, D, &keep[NL * 7]);
    float *norm = malloc(D * sizeof(float));
    for (int i = 0; i < D; i++)
        norm[i] = 1.0f;
    const int64_t R = 512, bs = 16, max_ctx = 1024, n_seq_max = 64;
    const int32_t bt_stride = (int32_t)(max_ctx / bs);
    const int64_t n_blocks = n_seq_max * bt_stride;
    uint16_t *ck[NL], *cv[NL];
    for (int l = 0; l < NL; l++) {
        ck[l] = ops->buf_alloc(be, (size_t)(n_blocks * bs * NKV * HD) * 2);
        cv[l] = ops->buf_alloc(be, (size_t)(n_blocks * bs * NKV * HD) * 2);
        memset(ck[l], 0x11, (size_t)(n_blocks * bs * NKV * HD) * 2);
        memset(cv[l], 0x11, (size_t)(n_blocks * bs * NKV * HD) * 2);
    }
    float *x = malloc((size_t)(R * D) * 4), *xn = malloc((size_t)(R * D) * 4);
    float *q = malloc((size_t)(R * D) * 4), *k = malloc((size_t)(R * NKV * HD) * 4);
    float *v = malloc((size_t)(R * NKV * HD) * 4), *att = malloc((size_t)(R * D) * 4);
    float *tmp = malloc((size_t)(R * D) * 4), *gate = malloc((size_t)(R * FF) * 4);
    float *up = malloc((size_t)(R * FF) * 4);
    float *logits = malloc((size_t)n_seq_max * VOCAB * 4);
    void *act = ops->buf_alloc(be, ops->act_size(TDM_DTYPE_Q4_1, R, FF));
    int32_t *ids = malloc(R * 4), *pos = malloc(R * 4), *slot = malloc(R * 4);
    int32_t *ctx = malloc(R * 4), *tor = malloc(R * 4), *lidx = malloc(R * 4);
    int32_t *tables = malloc((size_t)(n_seq_max * bt_stride) * 4);
    for (int64_t i = 0; i < n_seq_max * bt_stride; i++)
        tables[i] = (int32_t)i;

    struct {
        const char *name;
        int64_t n;   /* rows in the step */
        int prefill; /* one sequence, causal */
        int32_t ctx; /* decode: context length */
    } cases[] = {{"decode batch 1, ctx 128", 1, 0, 128},
                 {"decode batch 1, ctx 1024", 1, 0, 1024},
                 {"decode batch 32, ctx 128", 32, 0, 128},
                 {"decode batch 64, ctx 128", 64, 0, 128},
                 {"prefill 512", 512, 1, 0}};
    const char *only_case = getenv("BENCH_CASE");
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        if (only_case != NULL && strstr(cases[ci].name, only_case) == NULL)
            continue;
        const int64_t n = cases[ci].n;
        int64_t n_logits = cases[ci].prefill ? 1 : n;
        for (int64_t t = 0; t < n; t++) {
            ids[t] = (int32_t)(t * 7919 % VOCAB);
            if (cases[ci].prefill) {
                pos[t] = (int32_t)t;
                ctx[t] = (int32_t)t + 1;
                tor[t] = 0;
            } else {
                pos[t] = cases[ci].ctx - 1;
                ctx[t] = cases[ci].ctx;
                tor[t] = (int32_t)t;
            }
            slot[t] = tor[t] * bt_stride * (int32_t)bs + pos[t];
        }
        for (int64_t t = 0; t < n_logits; t++)
            lidx[t] = (int32_t)(cases[ci].prefill ? n - 1 : t);
        tdm_attn_params_t ap = {.n = n,
                                .n_heads = NH,
                                .n_kv_heads = NKV,
                                .head_dim = HD,
                                .block_size = (int32_t)bs,
                                .scale = 0.125f,
                                .ctx_len = ctx,
                                .block_tables = tables,
                                .table_of_row = tor,
                                .bt_stride = bt_stride};
        double best = 1e30, best_attn = 0;
        int reps = cases[ci].prefill ? 3 : 10;
        for (int rep = 0; rep < reps + 1; rep++) {
            double t_attn = 0;
            double t0 = now_s();
            ops->embed(be, out_w, ids, n, x);
            for (int l = 0; l < NL; l++) {
                ops->rmsnorm(be, x, norm, n, D, 1e-5f, xn);
                ops->act_prepare(be, TDM_DTYPE_Q4_1, xn, n, D, act);
                ops->matmul(be, W[l][0], act, n, q, D);
                ops->matmul(be, W[l][1], act, n, k, NKV * HD);
                ops->matmul(be, W[l][2], act, n, v, NKV * HD);
                ops->rope(be, q, pos, n, NH, HD, HD, 10000.0f);
                ops->rope(be, k, pos, n, NKV, HD, HD, 10000.0f);
                ops->kv_write(be, k, v, slot, n, NKV * HD, ck[l], cv[l]);
                double ta = now_s();
                ops->attention(be, &ap, q, ck[l], cv[l], att);
                t_attn += now_s() - ta;
                ops->act_prepare(be, TDM_DTYPE_Q4_1, att, n, D, act);
                ops->matmul(be, W[l][3], act, n, tmp, D);
                ops->add(be, x, tmp, n * D);
                ops->rmsnorm(be, x, norm, n, D, 1e-5f, xn);
                ops->act_prepare(be, TDM_DTYPE_Q4_1, xn, n, D, act);
                ops->matmul(be, W[l][4], act, n, gate, FF);
                ops->matmul(be, W[l][5], act, n, up, FF);
                ops->swiglu(be, gate, up, n, FF, gate);
                ops->act_prepare(be, TDM_DTYPE_Q4_1, gate, n, FF, act);
                ops->matmul(be, W[l][6], act, n, tmp, D);
                ops->add(be, x, tmp, n * D);
            }
            ops->gather_rows(be, x, lidx, n_logits, D, xn);
            ops->rmsnorm(be, xn, norm, n_logits, D, 1e-5f, xn);
            ops->act_prepare(be, TDM_DTYPE_Q8_0, xn, n_logits, D, act);
            ops->matmul(be, out_w, act, n_logits, logits, VOCAB);
            ops->sync(be);
            double dt = now_s() - t0;
            if (rep > 0 && dt < best) {
                best = dt;
                best_attn = t_attn;
            }
        }
        printf("%-26s %8.2f ms/step  %8.1f tok/s  (attention %.2f ms)\n", cases[ci].name,
               best * 1e3, (double)n / best, best_attn * 1e3);
    }
    free(tables);
    free(lidx);
    free(tor);
    free(ctx);
    free(slot);
    free(pos);
    free(ids);
    ops->buf_free(be, act);
    free(logits);
    free(up);
    free(gate);
    free(tmp);
    free(att);
    free(v);
    free(k);
    free(q);
    free(xn);
    free(x);
    for (int l = 0; l < NL; l++) {
        ops->buf_free(be, ck[l]);
        ops->buf_free(be, cv[l]);
        for (int i = 0; i < 7; i++)
            ops->weight_free(be, W[l][i]);
    }
    ops->weight_free(be, out_w);
    for (int i = 0; i < NL * 7 + 1; i++)
        free(keep[i]);
    free(norm);
}

static void noop(void *arg, int ith, int nth) {}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    tdm_cpu_isa_t isa = TDM_CPU_ISA_AUTO;
    if (argc > 2)
        isa = strcmp(argv[2], "scalar") == 0 ? TDM_CPU_ISA_SCALAR
              : strcmp(argv[2], "avx2") == 0 ? TDM_CPU_ISA_AVX2
                                             : TDM_CPU_ISA_AVX512;
    tdm_backend_t *be = NULL;
    if (tdm_backend_cpu_create(threads, isa, &be) != TDM_OK)
        return 1;
    tdm_threadpool_t *pool = NULL;
    tdm_threadpool_create(tdm_backend_cpu_threads(be), &pool);
    printf("backend %s, %d threads\n", be->ops->name, tdm_backend_cpu_threads(be));

    /* Pool latency. */
    for (int i = 0; i < 1000; i++)
        tdm_threadpool_run(pool, noop, NULL);
    double t0 = now_s();
    for (int i = 0; i < 100000; i++)
        tdm_threadpool_run(pool, noop, NULL);
    printf("threadpool run (hot): %.2f us\n", (now_s() - t0) / 100000 * 1e6);

    mm_case_t cases[] = {
        {"ffn_up Q4_1 1536x576", TDM_DTYPE_Q4_1, 1536, 576},
        {"ffn_down Q4_1 576x1536", TDM_DTYPE_Q4_1, 576, 1536},
        {"attn_q Q4_1 576x576", TDM_DTYPE_Q4_1, 576, 576},
        {"attn_k Q4_1 192x576", TDM_DTYPE_Q4_1, 192, 576},
        {"output Q8_0 49152x576", TDM_DTYPE_Q8_0, 49152, 576},
        {"Q4_0 1536x576", TDM_DTYPE_Q4_0, 1536, 576},
        {"F16 1536x576", TDM_DTYPE_F16, 1536, 576},
    };
    const char *only = getenv("BENCH_ONLY");
    if (only == NULL || strstr("model", only) != NULL)
        bench_model(be);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        if (only == NULL || strstr(cases[i].name, only) != NULL)
            bench_matmul(be, pool, cases[i]);
    if (only == NULL || strstr("attention", only) != NULL) {
        bench_attention(be, 1, 512, 0);
        bench_attention(be, 1, 8192, 0);
        bench_attention(be, 32, 512, 0);
        bench_attention(be, 512, 512, 1);
    }
    tdm_threadpool_destroy(pool);
    tdm_backend_destroy(be);
    return 0;
}
