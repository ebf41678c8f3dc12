/* Kernel parity and invariance tests for the CPU backend.
 *
 * For every ISA this CPU has (scalar, avx2, avx512, each forced through
 * tdm_backend_cpu_create): every op against a double-precision reference
 * computed here (quantized matmuls also against the unquantized
 * activations, outliers included), outputs poisoned with NaN before each run; the ISAs
 * against each other bit for bit; batch invariance (a row computed alone,
 * in batches of 37 and 64, and with 1, 2 or 3 threads gives the same
 * bits); and the thread pool. Fixed seeds. */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tandem/dtype.h"
#include "tandem/kernels.h"
#include "tandem/log.h"
#include "tandem/threadpool.h"
#include "test_util.h"

/* ---- helpers ---- */

static uint64_t rng_state;

static void rng_seed(uint64_t s)
{
    rng_state = s * 0x9e3779b97f4a7c15ull + 1;
}

static uint32_t rng_u32(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* Uniform in [-1, 1). */
static float rng_f(void)
{
    return (float)((double)rng_u32() / 2147483648.0 - 1.0);
}

static void fill(float *x, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rng_f() * scale;
}

static void poison(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = NAN;
}

static int all_finite(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return 0;
    return 1;
}

static const uint32_t wtypes[] = {TDM_DTYPE_F32,    TDM_DTYPE_F16,  TDM_DTYPE_BF16,  TDM_DTYPE_Q4_0,
                                  TDM_DTYPE_Q4_1,   TDM_DTYPE_Q8_0, TDM_DTYPE_Q5_0,  TDM_DTYPE_Q5_1,
                                  TDM_DTYPE_IQ4_NL, TDM_DTYPE_Q2_K, TDM_DTYPE_Q3_K,  TDM_DTYPE_Q4_K,
                                  TDM_DTYPE_Q5_K,   TDM_DTYPE_Q6_K, TDM_DTYPE_IQ4_XS};
#define N_WTYPES ((int)(sizeof(wtypes) / sizeof(wtypes[0])))

static int is_quant(uint32_t t)
{
    return t != TDM_DTYPE_F32 && t != TDM_DTYPE_F16 && t != TDM_DTYPE_BF16;
}

/* Block elements of t (the row lengths a shape may use). */
static int64_t blk(uint32_t t)
{
    return (int64_t)tdm_dtype_block_elems(t);
}

/* Byte offsets of the f16 scales in a block of the types that tandem's
 * own quantizer does not write (yet): random bytes elsewhere are valid
 * codes and sub-scales, random f16 scales would be NaN or huge. *amp: the
 * scales' range that keeps weights within about +-1 (the largest code
 * times sub-scale is 1 / amp). */
static int f16_fields(uint32_t t, int off[2], float *amp)
{
    switch (t) {
    case TDM_DTYPE_Q5_0:
        *amp = 1.0f / 16;
        off[0] = 0;
        return 1;
    case TDM_DTYPE_IQ4_NL:
        *amp = 1.0f / 127;
        off[0] = 0;
        return 1;
    case TDM_DTYPE_IQ4_XS:
        *amp = 1.0f / (127 * 32);
        off[0] = 0;
        return 1;
    case TDM_DTYPE_Q5_1:
        *amp = 1.0f / 31;
        off[0] = 0, off[1] = 2;
        return 2;
    case TDM_DTYPE_Q4_K:
        *amp = 1.0f / (63 * 15);
        off[0] = 0, off[1] = 2;
        return 2;
    case TDM_DTYPE_Q5_K:
        *amp = 1.0f / (63 * 31);
        off[0] = 0, off[1] = 2;
        return 2;
    case TDM_DTYPE_Q2_K:
        *amp = 1.0f / 45;
        off[0] = 80, off[1] = 82;
        return 2;
    case TDM_DTYPE_Q3_K:
        *amp = 1.0f / 128;
        off[0] = 108;
        return 1;
    case TDM_DTYPE_Q6_K:
        *amp = 1.0f / (128 * 32);
        off[0] = 208;
        return 1;
    default: return 0;
    }
}

/* ISAs to test: the ones this CPU supports; AVX2 also without AVX-VNNI
 * where the CPU has it (TANDEM_CPU_AVXVNNI=0). */
static tdm_cpu_isa_t isas[4];
static int isa_novnni[4];
static int n_isas;
static int cur_novnni; /* make_be creates without AVX-VNNI */

static const char *isa_label(int ii)
{
    return isa_novnni[ii] ? "avx2-novnni" : tdm_cpu_isa_name(isas[ii]);
}

static tdm_backend_t *make_be(tdm_cpu_isa_t isa, int threads)
{
    tdm_backend_t *be = NULL;
    if (cur_novnni)
        setenv("TANDEM_CPU_AVXVNNI", "0", 1);
    else
        unsetenv("TANDEM_CPU_AVXVNNI");
    tdm_status_t st = tdm_backend_cpu_create(threads, isa, &be);
    if (st != TDM_OK) {
        printf("FAIL cannot create %s backend with %d threads\n", tdm_cpu_isa_name(isa), threads);
        exit(1);
    }
    return be;
}

/* A random [rows][k] weight of type wtype (host bytes) and its exact f32
 * values after (de)quantization. */
typedef struct tw {
    uint32_t type;
    int64_t rows, k;
    void *data;
    float *deq;
} tw_t;

static tw_t make_tw(uint32_t type, int64_t rows, int64_t k)
{
    tw_t w = {type, rows, k, NULL, NULL};
    size_t rb = tdm_dtype_row_bytes(type, (uint64_t)k);
    float *src = malloc((size_t)(rows * k) * sizeof(float));
    fill(src, (size_t)(rows * k), 1.0f);
    for (int64_t r = 0; r < rows; r += 7) /* some rows with a different scale */
        for (int64_t j = 0; j < k; j++)
            src[r * k + j] *= 0.01f;
    w.data = malloc(rb * (size_t)rows);
    w.deq = malloc((size_t)(rows * k) * sizeof(float));
    int off[2];
    float amp = 1.0f;
    const int nf = f16_fields(type, off, &amp);
    const size_t bb = tdm_dtype_block_bytes(type);
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *row = (uint8_t *)w.data + r * rb;
        if (type == TDM_DTYPE_BF16) {
            for (int64_t j = 0; j < k; j++) { /* truncated: any bf16 will do */
                uint32_t u;
                memcpy(&u, &src[r * k + j], 4);
                row[2 * j] = (uint8_t)(u >> 16), row[2 * j + 1] = (uint8_t)(u >> 24);
            }
        } else if (nf > 0) {
            for (size_t i = 0; i < rb; i++)
                row[i] = (uint8_t)rng_u32();
            for (size_t b = 0; b < rb / bb; b++)
                for (int f = 0; f < nf; f++) {
                    float v = rng_f() * amp * (r % 7 == 0 ? 0.01f : 1.0f);
                    uint16_t h = tdm_f32_to_f16(v);
                    memcpy(row + b * bb + (size_t)off[f], &h, 2);
                }
        } else {
            tdm_dtype_from_f32(type, src + r * k, row, (uint64_t)k);
        }
        tdm_dtype_to_f32(type, row, w.deq + r * k, (uint64_t)k);
    }
    free(src);
    return w;
}

static void free_tw(tw_t *w)
{
    free(w->data);
    free(w->deq);
}

/* The activations as the quantized matmul sees them: per 32-block,
 * d = amax / 32767, q = nearest-even(x / d) within +-32767, value q * d. */
static void quant_ref(const float *x, int64_t k, double *out)
{
    for (int64_t b = 0; b < k / 32; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++)
            amax = fabsf(x[b * 32 + j]) > amax ? fabsf(x[b * 32 + j]) : amax;
        float d = amax / 32767.0f;
        for (int j = 0; j < 32; j++) {
            float r = d == 0 ? 0.0f : fminf(fmaxf(x[b * 32 + j] / d, -32767.0f), 32767.0f);
            out[b * 32 + j] = (double)rintf(r) * (double)d;
        }
    }
}

/* Runs the matmul of w over x[n][k] on be into y[n][ldy] (poisoned first). */
static void run_matmul(tdm_backend_t *be, const tdm_bweight_t *bw, uint32_t type, const float *x,
                       int64_t n, int64_t k, float *y, int64_t ldy)
{
    size_t asz = be->ops->act_size(type, n, k);
    void *act = be->ops->buf_alloc(be, asz);
    be->ops->act_prepare(be, type, x, n, k, act);
    poison(y, (size_t)(n * ldy));
    be->ops->matmul(be, bw, act, n, y, ldy);
    be->ops->sync(be);
    be->ops->buf_free(be, act);
}

/* ---- matmul ---- */

static void test_matmul_shape(uint32_t type, int64_t rows, int64_t k)
{
    static const int64_t ns[] = {1, 2, 3, 5, 17, 37, 64, 130};
    const int64_t nmax = 130, ldy = rows + 3;
    tw_t w = make_tw(type, rows, k);
    float *x = malloc((size_t)(nmax * k) * sizeof(float));
    fill(x, (size_t)(nmax * k), 2.0f);
    for (int64_t j = 0; j < k; j++) /* an all-zero row: d = 0 blocks */
        x[3 * k + j] = 0.0f;
    for (int64_t j = 0; j < k / 2; j++) /* a row with a zero half */
        x[4 * k + j] = 0.0f;
    float *y = malloc((size_t)(nmax * ldy) * sizeof(float));
    float *y1 = malloc((size_t)(nmax * ldy) * sizeof(float));
    float *gold = malloc((size_t)(nmax * ldy) * sizeof(float)); /* scalar, n = 130 */
    double *xq = malloc((size_t)k * sizeof(double));
    char what[96];
    snprintf(what, sizeof(what), "%s %lldx%lld", tdm_dtype_name(type), (long long)rows,
             (long long)k);

    for (int ii = 0; ii < n_isas; ii++) {
        cur_novnni = isa_novnni[ii];
        tdm_backend_t *be = make_be(isas[ii], 2);
        tdm_bweight_t *bw = NULL;
        CHECK(be->ops->weight_load(be, w.data, type, rows, k, &bw) == TDM_OK, "load %s", what);
        /* Reference on the full batch. */
        run_matmul(be, bw, type, x, nmax, k, y, ldy);
        double max_err = 0, max_err_f = 0;
        int pad_ok = 1;
        for (int64_t t = 0; t < nmax; t++) {
            if (is_quant(type))
                quant_ref(x + t * k, k, xq);
            else
                for (int64_t j = 0; j < k; j++)
                    xq[j] = x[t * k + j];
            for (int64_t r = 0; r < rows; r++) {
                double ref = 0, mag = 1e-6, reff = 0;
                for (int64_t j = 0; j < k; j++) {
                    ref += (double)w.deq[r * k + j] * xq[j];
                    mag += fabs((double)w.deq[r * k + j] * xq[j]);
                    reff += (double)w.deq[r * k + j] * x[t * k + j];
                }
                double e = fabs(y[t * ldy + r] - ref) / mag;
                if (!(e <= max_err))
                    max_err = isnan(e) ? INFINITY : e;
                double ef = fabs(y[t * ldy + r] - reff) / mag;
                if (!(ef <= max_err_f))
                    max_err_f = isnan(ef) ? INFINITY : ef;
            }
            for (int64_t r = rows; r < ldy; r++)
                pad_ok &= isnan(y[t * ldy + r]);
        }
        CHECK(max_err < 2e-6, "%s matmul %s: error %g vs the double reference", isa_label(ii), what,
              max_err);
        CHECK(max_err_f < (is_quant(type) ? 1e-4 : 2e-6),
              "%s matmul %s: error %g vs f32 activations", isa_label(ii), what, max_err_f);
        CHECK(pad_ok, "%s matmul %s wrote past its rows", isa_label(ii), what);
        if (ii == 0)
            memcpy(gold, y, (size_t)(nmax * ldy) * sizeof(float));
        else
            CHECK(memcmp(gold, y, (size_t)(nmax * ldy) * sizeof(float)) == 0,
                  "%s matmul %s differs from scalar bits", isa_label(ii), what);

        /* Batch invariance: each n, each row equals the n = 130 result. */
        for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
            int64_t n = ns[ni];
            int64_t t0 = n == 1 ? 77 : 0; /* a row from the middle too */
            for (int64_t s = 0; s < (n == 1 ? 2 : 1); s++) {
                int64_t off = s == 0 ? 0 : t0;
                run_matmul(be, bw, type, x + off * k, n, k, y1, ldy);
                int same = 1;
                for (int64_t t = 0; t < n; t++)
                    same &= memcmp(y1 + t * ldy, gold + (t + off) * ldy,
                                   (size_t)rows * sizeof(float)) == 0;
                CHECK(same, "%s matmul %s: n=%lld rows differ from the n=130 batch", isa_label(ii),
                      what, (long long)n);
            }
        }
        be->ops->weight_free(be, bw);
        tdm_backend_destroy(be);

        /* Thread counts 1 and 3 give the same bits. */
        for (int th = 1; th <= 3; th += 2) {
            tdm_backend_t *b2 = make_be(isas[ii], th);
            tdm_bweight_t *bw2 = NULL;
            b2->ops->weight_load(b2, w.data, type, rows, k, &bw2);
            run_matmul(b2, bw2, type, x, nmax, k, y1, ldy);
            CHECK(memcmp(y1, gold, (size_t)(nmax * ldy) * sizeof(float)) == 0,
                  "%s matmul %s: %d threads differ", isa_label(ii), what, th);
            b2->ops->weight_free(b2, bw2);
            tdm_backend_destroy(b2);
        }
    }
    free(xq);
    free(gold);
    free(y1);
    free(y);
    free(x);
    free_tw(&w);
}

static void test_matmul(void)
{
    /* The K-quants and IQ4_XS also in the pack with f32 scales that the CPU
     * backend falls back to when scales are not an f16 times an integer. */
    setenv("TANDEM_CPU_PACK_SC32", "1", 1);
    for (int ti = 0; ti < N_WTYPES; ti++)
        if (blk(wtypes[ti]) == 256)
            test_matmul_shape(wtypes[ti], 37, 256);
    unsetenv("TANDEM_CPU_PACK_SC32");
    for (int ti = 0; ti < N_WTYPES; ti++) {
        uint32_t type = wtypes[ti];
        if (blk(type) <= 32) {
            test_matmul_shape(type, 37, 64);
            test_matmul_shape(type, 50, 576);
            test_matmul_shape(type, 5, 96);
        } else {
            test_matmul_shape(type, 37, 256);
            test_matmul_shape(type, 5, 512);
        }
        test_matmul_shape(type, 16, 1536);
        if (!is_quant(type))
            test_matmul_shape(type, 7, 50); /* a row length with a 16-lane tail */
    }
}

/* Big values, tiny values, zeros, ties, a NaN, blocks whose scale d
 * underflows to 0 or is subnormal: the act quantization of each ISA agrees
 * (checked through the matmul, whose result depends on every q and d). */
static void test_act_extremes(void)
{
    const int64_t k = 256, rows = 16, n = 5;
    float x[5 * 256];
    fill(x, (size_t)(n * k), 1.0f);
    for (int j = 0; j < 32; j++) {
        x[j] = 1e30f * (j % 2 ? 1 : -1);
        x[k + j] = 1e-30f * (float)j;
        /* d = 1 exactly, every other q a tie (nearest-even decides) */
        x[2 * k + j] = j == 0 ? 32767.0f : (float)(j - 16) + 0.5f;
        x[3 * k + j] = 0.0f;
        x[4 * k + 32 + j] = 1e-42f * (float)(j % 3); /* d underflows to 0 */
        x[4 * k + 64 + j] = 1e-36f * (float)(j - 7); /* d subnormal */
    }
    x[4 * k + 3] = NAN;        /* counts as -32767, not in amax */
    x[4 * k + 96 + 5] = 1e37f; /* one huge value in a block */
    float gold[N_WTYPES][5 * 16], y[5 * 16];
    for (int q = 0; q < N_WTYPES; q++) {
        uint32_t type = wtypes[q];
        if (!is_quant(type))
            continue;
        tw_t w = make_tw(type, rows, k);
        for (int ii = 0; ii < n_isas; ii++) {
            cur_novnni = isa_novnni[ii];
            tdm_backend_t *be = make_be(isas[ii], 1);
            tdm_bweight_t *bw = NULL;
            be->ops->weight_load(be, w.data, type, rows, k, &bw);
            run_matmul(be, bw, type, x, n, k, y, rows);
            if (ii == 0)
                memcpy(gold[q], y, sizeof(y));
            else
                CHECK(memcmp(gold[q], y, sizeof(y)) == 0, "%s act extremes %s differ from scalar",
                      isa_label(ii), tdm_dtype_name(type));
            CHECK(all_finite(y, (size_t)(n * rows)), "%s act extremes %s: non-finite output",
                  isa_label(ii), tdm_dtype_name(type));
            be->ops->weight_free(be, bw);
            tdm_backend_destroy(be);
        }
        free_tw(&w);
    }
}

/* Activations with outliers (a few values 100x the rest in a row, as in
 * SmolLM2): the quantized matmul stays close to the exact product of the
 * dequantized weights and the unquantized activations (relative L2 of each
 * output row; 8-bit activations give about 1e-2 here). */
static void test_matmul_outliers(void)
{
    const int64_t rows = 64, n = 8;
    static const int64_t ks[] = {576, 1536};
    for (size_t ki = 0; ki < sizeof(ks) / sizeof(ks[0]); ki++) {
        const int64_t k = ks[ki];
        float *x = malloc((size_t)(n * k) * sizeof(float));
        float *y = malloc((size_t)(n * rows) * sizeof(float));
        fill(x, (size_t)(n * k), 1.0f);
        for (int64_t t = 0; t < n; t++)
            for (int o = 0; o < 3; o++) /* 3 outliers per row, anywhere */
                x[t * k + (int64_t)(rng_u32() % (uint32_t)k)] = (o % 2 ? -100.0f : 100.0f);
        for (int q = 0; q < N_WTYPES; q++) {
            uint32_t type = wtypes[q];
            if (!is_quant(type) || k % blk(type) != 0)
                continue;
            tw_t w = make_tw(type, rows, k);
            for (int ii = 0; ii < n_isas; ii++) {
                cur_novnni = isa_novnni[ii];
                tdm_backend_t *be = make_be(isas[ii], 2);
                tdm_bweight_t *bw = NULL;
                be->ops->weight_load(be, w.data, type, rows, k, &bw);
                run_matmul(be, bw, type, x, n, k, y, rows);
                double worst = 0;
                for (int64_t t = 0; t < n; t++) {
                    double num = 0, den = 0;
                    for (int64_t r = 0; r < rows; r++) {
                        double ref = 0;
                        for (int64_t j = 0; j < k; j++)
                            ref += (double)w.deq[r * k + j] * (double)x[t * k + j];
                        num += (y[t * rows + r] - ref) * (y[t * rows + r] - ref);
                        den += ref * ref;
                    }
                    double e = sqrt(num / den);
                    worst = e <= worst ? worst : (isnan(e) ? INFINITY : e);
                }
                CHECK(worst < 1e-3, "%s matmul %s k=%lld with outliers: relative L2 %g",
                      isa_label(ii), tdm_dtype_name(type), (long long)k, worst);
                if (ii == 0)
                    printf("matmul %s k=%lld, activations with outliers: relative L2 %.2e\n",
                           tdm_dtype_name(type), (long long)k, worst);
                be->ops->weight_free(be, bw);
                tdm_backend_destroy(be);
            }
            free_tw(&w);
        }
        free(y);
        free(x);
    }
}

/* ---- embed ---- */

static void test_embed(void)
{
    const int64_t rows = 45, k = 512;
    int32_t ids[6] = {0, 44, 17, 16, 15, 17};
    for (int ti = 0; ti < N_WTYPES; ti++) {
        tw_t w = make_tw(wtypes[ti], rows, k);
        for (int ii = 0; ii < n_isas; ii++) {
            cur_novnni = isa_novnni[ii];
            tdm_backend_t *be = make_be(isas[ii], 2);
            tdm_bweight_t *bw = NULL;
            be->ops->weight_load(be, w.data, wtypes[ti], rows, k, &bw);
            float out[6 * 512];
            poison(out, 6 * 512);
            be->ops->embed(be, bw, ids, 6, out);
            int ok = 1;
            for (int t = 0; t < 6; t++)
                ok &= memcmp(out + t * k, w.deq + ids[t] * k, (size_t)k * sizeof(float)) == 0;
            CHECK(ok, "%s embed %s differs from the reference dequantization", isa_label(ii),
                  tdm_dtype_name(wtypes[ti]));
            be->ops->weight_free(be, bw);
            tdm_backend_destroy(be);
        }
        free_tw(&w);
    }
}

/* ---- rmsnorm, swiglu, add, gather, rope ---- */

static void test_rowops(void)
{
    const int64_t n = 33, dims[2] = {576, 50};
    float *gold[8] = {0};
    for (int ii = 0; ii < n_isas; ii++) {
        cur_novnni = isa_novnni[ii];
        const char *isa = isa_label(ii);
        tdm_backend_t *be = make_be(isas[ii], 2);
        int slot = 0;
        for (int di = 0; di < 2; di++) {
            const int64_t d = dims[di];
            float *x = malloc((size_t)(n * d) * sizeof(float));
            float *w = malloc((size_t)d * sizeof(float));
            float *out = malloc((size_t)(n * d) * sizeof(float));
            rng_seed(100 + (uint64_t)di);
            fill(x, (size_t)(n * d), 3.0f);
            fill(w, (size_t)d, 1.5f);

            /* rmsnorm */
            poison(out, (size_t)(n * d));
            be->ops->rmsnorm(be, x, w, n, d, 1e-5f, out);
            double err = 0;
            for (int64_t t = 0; t < n; t++) {
                double ss = 0;
                for (int64_t i = 0; i < d; i++)
                    ss += (double)x[t * d + i] * x[t * d + i];
                double sc = 1.0 / sqrt(ss / (double)d + 1e-5);
                for (int64_t i = 0; i < d; i++) {
                    double ref = x[t * d + i] * sc * w[i];
                    double e = fabs(out[t * d + i] - ref) / (fabs(ref) + 1e-6);
                    err = e <= err ? err : (isnan(e) ? INFINITY : e);
                }
            }
            CHECK(err < 2e-6, "%s rmsnorm d=%lld: error %g", isa, (long long)d, err);
            /* in place gives the same bits */
            float *xi = malloc((size_t)(n * d) * sizeof(float));
            memcpy(xi, x, (size_t)(n * d) * sizeof(float));
            be->ops->rmsnorm(be, xi, w, n, d, 1e-5f, xi);
            CHECK(memcmp(xi, out, (size_t)(n * d) * sizeof(float)) == 0,
                  "%s rmsnorm in place differs", isa);
            free(xi);
            if (ii == 0)
                gold[slot] = memcpy(malloc((size_t)(n * d) * 4), out, (size_t)(n * d) * 4);
            else
                CHECK(memcmp(gold[slot], out, (size_t)(n * d) * 4) == 0,
                      "%s rmsnorm differs from scalar bits", isa);
            slot++;

            /* swiglu, with some large gates */
            float *u = malloc((size_t)(n * d) * sizeof(float));
            fill(u, (size_t)(n * d), 2.0f);
            float *g = malloc((size_t)(n * d) * sizeof(float));
            memcpy(g, x, (size_t)(n * d) * sizeof(float));
            g[0] = 100.0f;
            g[1] = -100.0f;
            g[2] = 87.5f;
            g[3] = -87.5f;
            g[4] = 0.0f;
            g[5] = -0.0f;
            poison(out, (size_t)(n * d));
            be->ops->swiglu(be, g, u, n, d, out);
            err = 0;
            for (int64_t i = 0; i < n * d; i++) {
                double ref = (double)g[i] / (1.0 + exp(-(double)g[i])) * u[i];
                double e = fabs(out[i] - ref) / (fabs(ref) + 1e-30);
                if (fabs(ref) < 1e-30)
                    e = fabs(out[i]) < 1e-30 ? 0 : 1;
                err = e <= err ? err : (isnan(e) ? INFINITY : e);
            }
            CHECK(err < 2e-6, "%s swiglu d=%lld: error %g", isa, (long long)d, err);
            if (ii == 0)
                gold[slot] = memcpy(malloc((size_t)(n * d) * 4), out, (size_t)(n * d) * 4);
            else
                CHECK(memcmp(gold[slot], out, (size_t)(n * d) * 4) == 0,
                      "%s swiglu differs from scalar bits", isa);
            slot++;
            /* in place (out aliases gate) */
            be->ops->swiglu(be, g, u, n, d, g);
            CHECK(memcmp(g, out, (size_t)(n * d) * 4) == 0, "%s swiglu in place differs", isa);

            /* add */
            memcpy(out, x, (size_t)(n * d) * sizeof(float));
            be->ops->add(be, out, u, n * d);
            int ok = 1;
            for (int64_t i = 0; i < n * d; i++)
                ok &= out[i] == x[i] + u[i];
            CHECK(ok, "%s add", isa);

            /* gather_rows */
            int32_t idx[4] = {32, 0, 5, 5};
            poison(out, (size_t)(4 * d));
            be->ops->gather_rows(be, x, idx, 4, d, out);
            ok = 1;
            for (int t = 0; t < 4; t++)
                ok &= memcmp(out + t * d, x + idx[t] * d, (size_t)d * 4) == 0;
            CHECK(ok, "%s gather_rows", isa);
            free(g);
            free(u);
            free(out);
            free(w);
            free(x);
        }

        /* rope: 5 heads of 64, n_rot 64 and 32 (partial) */
        for (int nr = 0; nr < 2; nr++) {
            const int32_t heads = 5, hd = 64, n_rot = nr == 0 ? 64 : 32;
            const int64_t nn = 40;
            float *x = malloc((size_t)(nn * heads * hd) * sizeof(float));
            float *xr = malloc((size_t)(nn * heads * hd) * sizeof(float));
            int32_t pos[40];
            for (int t = 0; t < nn; t++)
                pos[t] = t * 211 % 8192;
            rng_seed(7);
            fill(x, (size_t)(nn * heads * hd), 1.0f);
            memcpy(xr, x, (size_t)(nn * heads * hd) * sizeof(float));
            be->ops->rope(be, xr, pos, nn, heads, hd, n_rot, 10000.0f);
            double err = 0;
            for (int t = 0; t < nn; t++)
                for (int h = 0; h < heads; h++)
                    for (int i = 0; i < hd / 2; i++) {
                        const float *v = x + (t * heads + h) * hd;
                        const float *o = xr + (t * heads + h) * hd;
                        double r0 = v[2 * i], r1 = v[2 * i + 1];
                        if (2 * i < n_rot) {
                            double a = pos[t] * pow(10000.0, -2.0 * i / n_rot);
                            r0 = v[2 * i] * cos(a) - v[2 * i + 1] * sin(a);
                            r1 = v[2 * i] * sin(a) + v[2 * i + 1] * cos(a);
                        }
                        double e = fmax(fabs(o[2 * i] - r0), fabs(o[2 * i + 1] - r1));
                        err = e <= err ? err : (isnan(e) ? INFINITY : e);
                    }
            CHECK(err < 1e-6, "%s rope n_rot=%d: error %g", isa, n_rot, err);
            /* Again with the same positions (the backend's cached angles), then
             * with one position changed (the cache must notice). */
            float *x2 = malloc((size_t)(nn * heads * hd) * sizeof(float));
            memcpy(x2, x, (size_t)(nn * heads * hd) * sizeof(float));
            be->ops->rope(be, x2, pos, nn, heads, hd, n_rot, 10000.0f);
            CHECK(memcmp(x2, xr, (size_t)(nn * heads * hd) * 4) == 0,
                  "%s rope with cached angles differs", isa);
            memcpy(x2, x, (size_t)(nn * heads * hd) * sizeof(float));
            pos[nn - 1] += 1;
            be->ops->rope(be, x2, pos, nn, heads, hd, n_rot, 10000.0f);
            double a = pos[nn - 1] * pow(10000.0, -2.0 / n_rot); /* pair i = 1 of the last row */
            const float *v = x + ((nn - 1) * heads) * hd;
            double r0 = v[2] * cos(a) - v[3] * sin(a);
            CHECK(fabs(x2[((nn - 1) * heads) * hd + 2] - r0) < 1e-6,
                  "%s rope reused angles of other positions", isa);
            pos[nn - 1] -= 1;
            free(x2);
            if (ii == 0)
                gold[slot] = memcpy(malloc((size_t)(nn * heads * hd) * 4), xr,
                                    (size_t)(nn * heads * hd) * 4);
            else
                CHECK(memcmp(gold[slot], xr, (size_t)(nn * heads * hd) * 4) == 0,
                      "%s rope differs from scalar bits", isa);
            slot++;
            free(xr);
            free(x);
        }
        tdm_backend_destroy(be);
    }
    for (int i = 0; i < 8; i++)
        free(gold[i]);
}

/* ---- kv_write ---- */

static void test_kv_write(void)
{
    const int64_t n = 9, kv_dim = 3 * 64 + 8, n_slots = 32; /* 200: a 16- and 8-lane tail */
    float *k = malloc((size_t)(n * kv_dim) * 4), *v = malloc((size_t)(n * kv_dim) * 4);
    rng_seed(11);
    fill(k, (size_t)(n * kv_dim), 4.0f);
    fill(v, (size_t)(n * kv_dim), 70000.0f); /* some overflow to inf */
    const float special[] = {
        0.0f,     -0.0f,    65504.0f, 65520.0f, 65519.0f,  1e-8f,          -3e-7f,         6.1e-5f,
        5.96e-8f, 2.98e-8f, 1e-10f,   INFINITY, -INFINITY, 1.00048828125f, 1.00146484375f, 2049.0f};
    for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); i++)
        k[i] = special[i];
    int32_t slot[9] = {3, 7, -1, 0, 31, 12, 13, 14, 1};
    uint16_t *ck = malloc((size_t)(n_slots * kv_dim) * 2),
             *cv = malloc((size_t)(n_slots * kv_dim) * 2);
    for (int ii = 0; ii < n_isas; ii++) {
        cur_novnni = isa_novnni[ii];
        tdm_backend_t *be = make_be(isas[ii], 2);
        memset(ck, 0xAB, (size_t)(n_slots * kv_dim) * 2);
        memset(cv, 0xAB, (size_t)(n_slots * kv_dim) * 2);
        be->ops->kv_write(be, k, v, slot, n, kv_dim, ck, cv);
        int ok = 1, untouched = 1;
        for (int64_t t = 0; t < n; t++) {
            if (slot[t] < 0)
                continue;
            for (int64_t j = 0; j < kv_dim; j++) {
                ok &= ck[slot[t] * kv_dim + j] == tdm_f32_to_f16(k[t * kv_dim + j]);
                ok &= cv[slot[t] * kv_dim + j] == tdm_f32_to_f16(v[t * kv_dim + j]);
            }
        }
        for (int64_t s = 0; s < n_slots; s++) {
            int used = 0;
            for (int t = 0; t < n; t++)
                used |= slot[t] == s;
            if (!used)
                for (int64_t j = 0; j < kv_dim; j++)
                    untouched &= ck[s * kv_dim + j] == 0xABAB && cv[s * kv_dim + j] == 0xABAB;
        }
        CHECK(ok, "%s kv_write differs from tdm_f32_to_f16", isa_label(ii));
        CHECK(untouched, "%s kv_write touched other slots", isa_label(ii));
        tdm_backend_destroy(be);
    }
    free(ck);
    free(cv);
    free(k);
    free(v);
}

/* ---- attention ---- */

typedef struct attn_case {
    int32_t n_heads, n_kv, hd, bs;
} attn_case_t;

static void attn_ref(const tdm_attn_params_t *p, const float *q, const uint16_t *ck,
                     const uint16_t *cv, int64_t t, int32_t h, double *out)
{
    const int64_t hd = p->head_dim, ctx = p->ctx_len[t];
    const int32_t kvh = h / (p->n_heads / p->n_kv_heads);
    const int32_t *table = p->block_tables + p->table_of_row[t] * p->bt_stride;
    double *s = malloc((size_t)ctx * sizeof(double));
    double mx = -INFINITY, sum = 0;
    for (int64_t i = 0; i < ctx; i++) {
        int64_t slot = (int64_t)table[i / p->block_size] * p->block_size + i % p->block_size;
        const uint16_t *kr = ck + slot * p->n_kv_heads * hd + kvh * hd;
        double d = 0;
        for (int64_t j = 0; j < hd; j++)
            d += (double)q[(t * p->n_heads + h) * hd + j] * tdm_f16_to_f32(kr[j]);
        s[i] = d * p->scale;
        mx = s[i] > mx ? s[i] : mx;
    }
    for (int64_t j = 0; j < hd; j++)
        out[j] = 0;
    for (int64_t i = 0; i < ctx; i++) {
        int64_t slot = (int64_t)table[i / p->block_size] * p->block_size + i % p->block_size;
        const uint16_t *vr = cv + slot * p->n_kv_heads * hd + kvh * hd;
        double e = exp(s[i] - mx);
        sum += e;
        for (int64_t j = 0; j < hd; j++)
            out[j] += e * tdm_f16_to_f32(vr[j]);
    }
    for (int64_t j = 0; j < hd; j++)
        out[j] /= sum;
    free(s);
}

static void test_attention_case(attn_case_t c)
{
    const int32_t n_tables = 3, max_ctx = 300;
    const int32_t bt_stride = (max_ctx + c.bs - 1) / c.bs;
    const int32_t n_blocks = n_tables * bt_stride + 2;
    const int64_t kv_dim = (int64_t)c.n_kv * c.hd, qd = (int64_t)c.n_heads * c.hd;
    uint16_t *ck = malloc((size_t)(n_blocks * c.bs * kv_dim) * 2);
    uint16_t *cv = malloc((size_t)(n_blocks * c.bs * kv_dim) * 2);
    rng_seed((uint64_t)(c.hd * 100 + c.bs));
    for (int64_t i = 0; i < n_blocks * c.bs * kv_dim; i++) {
        ck[i] = tdm_f32_to_f16(rng_f() * 2.0f);
        cv[i] = tdm_f32_to_f16(rng_f() * 3.0f);
    }
    /* Tables: a shuffled permutation of the blocks. */
    int32_t *tables = malloc((size_t)(n_tables * bt_stride) * 4);
    int32_t *perm = malloc((size_t)n_blocks * 4);
    for (int i = 0; i < n_blocks; i++)
        perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        int j = (int)(rng_u32() % (uint32_t)(i + 1));
        int32_t tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    for (int i = 0; i < n_tables * bt_stride; i++)
        tables[i] = perm[i];
    /* Rows: assorted context lengths over the tables. */
    static const int32_t ctxs[] = {1, 2, 15, 16, 17, 31, 33, 100, 255, 300, 64, 5};
    const int64_t n = 40;
    int32_t ctx[40], tor[40];
    for (int t = 0; t < n; t++) {
        ctx[t] = ctxs[t % 12];
        tor[t] = t % n_tables;
    }
    float *q = malloc((size_t)(n * qd) * 4);
    fill(q, (size_t)(n * qd), 2.0f);
    for (int64_t j = 0; j < qd; j++)
        q[5 * qd + j] *= 8.0f; /* a peaky softmax */
    tdm_attn_params_t p = {.n = n,
                           .n_heads = c.n_heads,
                           .n_kv_heads = c.n_kv,
                           .head_dim = c.hd,
                           .block_size = c.bs,
                           .scale = 1.0f / sqrtf((float)c.hd),
                           .ctx_len = ctx,
                           .block_tables = tables,
                           .table_of_row = tor,
                           .bt_stride = bt_stride};
    float *out = malloc((size_t)(n * qd) * 4), *gold = malloc((size_t)(n * qd) * 4);
    float *o1 = malloc((size_t)qd * 4);
    double *ref = malloc((size_t)c.hd * sizeof(double));
    char what[64];
    snprintf(what, sizeof(what), "heads %d/%d hd %d bs %d", c.n_heads, c.n_kv, c.hd, c.bs);
    for (int ii = 0; ii < n_isas; ii++) {
        cur_novnni = isa_novnni[ii];
        const char *isa = isa_label(ii);
        for (int th = 1; th <= 3; th++) {
            tdm_backend_t *be = make_be(isas[ii], th);
            poison(out, (size_t)(n * qd));
            p.n = n;
            be->ops->attention(be, &p, q, ck, cv, out);
            if (ii == 0 && th == 1) {
                double err = 0;
                for (int64_t t = 0; t < n; t++)
                    for (int32_t h = 0; h < c.n_heads; h++) {
                        attn_ref(&p, q, ck, cv, t, h, ref);
                        for (int j = 0; j < c.hd; j++) {
                            double e = fabs(out[(t * c.n_heads + h) * c.hd + j] - ref[j]) / 3.0;
                            err = e <= err ? err : (isnan(e) ? INFINITY : e);
                        }
                    }
                CHECK(err < 2e-6, "%s attention %s: error %g", isa, what, err);
                memcpy(gold, out, (size_t)(n * qd) * 4);
            } else {
                CHECK(memcmp(gold, out, (size_t)(n * qd) * 4) == 0,
                      "%s attention %s, %d threads: differs from scalar/1-thread bits", isa, what,
                      th);
            }
            /* Each row alone (decode-style split) gives the batch's bits. */
            if (th == 2) {
                int same = 1;
                for (int64_t t = 0; t < n; t++) {
                    tdm_attn_params_t p1 = p;
                    p1.n = 1;
                    p1.ctx_len = ctx + t;
                    p1.table_of_row = tor + t;
                    poison(o1, (size_t)qd);
                    be->ops->attention(be, &p1, q + t * qd, ck, cv, o1);
                    same &= memcmp(o1, gold + t * qd, (size_t)qd * 4) == 0;
                }
                CHECK(same, "%s attention %s: a row alone differs from the batch", isa, what);
            }
            tdm_backend_destroy(be);
        }
    }
    free(ref);
    free(o1);
    free(gold);
    free(out);
    free(q);
    free(perm);
    free(tables);
    free(cv);
    free(ck);
}

static void test_attention(void)
{
    test_attention_case((attn_case_t){9, 3, 64, 16}); /* SmolLM2 */
    test_attention_case((attn_case_t){4, 4, 32, 8});  /* MHA, blocks smaller than a chunk */
    test_attention_case((attn_case_t){4, 1, 40, 16}); /* head dim the SIMD code does not take */
    test_attention_case((attn_case_t){8, 2, 128, 32});
    test_attention_case((attn_case_t){8, 2, 64, 16});  /* 4 heads per kv head */
    test_attention_case((attn_case_t){10, 2, 64, 16}); /* 5 heads per kv head */
    test_attention_case((attn_case_t){6, 2, 96, 16});  /* a head dim without its own code */
    test_attention_case((attn_case_t){32, 8, 64, 16}); /* items of 4 of the 8 kv heads */
}

/* ---- weight_load refusals ---- */

static void test_weight_errors(void)
{
    cur_novnni = 0;
    tdm_backend_t *be = make_be(TDM_CPU_ISA_SCALAR, 1);
    tdm_bweight_t *bw = NULL;
    uint8_t buf[1024] = {0};
    tdm_log_set_level(TDM_LOG_LEVEL_ERROR + 0); /* the refusals log errors; expected */
    CHECK(be->ops->weight_load(be, buf, TDM_DTYPE_Q4_1, 2, 48, &bw) != TDM_OK && bw == NULL,
          "k not a multiple of 32 accepted");
    CHECK(be->ops->weight_load(be, buf, TDM_DTYPE_Q4_K, 2, 128, &bw) != TDM_OK && bw == NULL,
          "Q4_K row of 128 (not a multiple of 256) accepted");
    CHECK(be->ops->weight_load(be, buf, TDM_DTYPE_Q8_K, 2, 256, &bw) != TDM_OK && bw == NULL,
          "Q8_K (not a weight type) accepted");
    CHECK(be->ops->weight_load(be, buf, 16 /* IQ2_XXS */, 2, 256, &bw) != TDM_OK && bw == NULL,
          "unsupported type accepted");
    CHECK(be->ops->weight_load(be, buf, TDM_DTYPE_F32, 0, 16, &bw) != TDM_OK && bw == NULL,
          "empty weight accepted");
    tdm_log_set_level(TDM_LOG_LEVEL_INFO);
    tdm_backend_destroy(be);
    tdm_backend_destroy(NULL);
}

/* ---- thread pool ---- */

typedef struct pool_arg {
    atomic_int calls[8];
    int nth_seen;
    long long sum[8];
} pool_arg_t;

static void pool_fn(void *p, int ith, int nth)
{
    pool_arg_t *a = p;
    atomic_fetch_add(&a->calls[ith], 1);
    a->sum[ith] += ith + 1;
    if (ith == 0)
        a->nth_seen = nth;
}

static void test_threadpool(void)
{
    for (int n = 1; n <= 4; n++) {
        tdm_threadpool_t *pool = NULL;
        CHECK(tdm_threadpool_create(n, &pool) == TDM_OK, "pool of %d", n);
        CHECK(tdm_threadpool_size(pool) == n, "pool size %d", n);
        pool_arg_t a;
        memset(&a, 0, sizeof(a));
        const int runs = 20000;
        for (int r = 0; r < runs; r++) {
            tdm_threadpool_run(pool, pool_fn, &a);
            if (r % 5000 == 4999) { /* let workers fall asleep: the futex path */
                struct timespec ts = {0, 5 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
        }
        int ok = a.nth_seen == n;
        for (int i = 0; i < n; i++)
            ok &= atomic_load(&a.calls[i]) == runs && a.sum[i] == (long long)runs * (i + 1);
        CHECK(ok, "pool of %d: every thread ran every run once", n);
        tdm_threadpool_destroy(pool);
    }
    tdm_threadpool_destroy(NULL);
    CHECK(tdm_cpu_count() >= 1, "cpu count");
}

int main(void)
{
    tdm_cpu_isa_t best = tdm_cpu_isa_detect();
    isas[n_isas++] = TDM_CPU_ISA_SCALAR;
    if (best >= TDM_CPU_ISA_AVX2)
        isas[n_isas++] = TDM_CPU_ISA_AVX2;
    if (best >= TDM_CPU_ISA_AVX512)
        isas[n_isas++] = TDM_CPU_ISA_AVX512;
    if (best >= TDM_CPU_ISA_AVX2) {
        isa_novnni[n_isas] = 1;
        isas[n_isas++] = TDM_CPU_ISA_AVX2;
    }
    tdm_log_set_level(TDM_LOG_LEVEL_WARN); /* one line per backend created is noise here */
    printf("ISAs under test:");
    for (int i = 0; i < n_isas; i++)
        printf(" %s", isa_label(i));
    printf("\n");

    rng_seed(1);
    test_threadpool();
    test_weight_errors();
    tdm_log_set_level(TDM_LOG_LEVEL_WARN);
    rng_seed(2);
    test_matmul();
    rng_seed(3);
    test_act_extremes();
    test_matmul_outliers();
    rng_seed(4);
    test_embed();
    test_rowops();
    test_kv_write();
    test_attention();
    return t_finish();
}
