/* tdm_quantize_row (tandem/quantize.h): round trips through
 * tdm_dtype_to_f32 on rows like real weights (gaussian, std 0.02, a few
 * outliers 10x; rows of 1536 and 256), the error of each type against a
 * bound and against the types around it, the search against a naive Q4_K,
 * importance weights, edge cases (zeros, constants, denormals, 1e30, NaN),
 * exact F16/BF16, and, where the project's venv has the PyPI gguf package,
 * GGML's reference quantizers (gguf.quants.quantize). Fixed seeds. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tandem/dtype.h"
#include "tandem/quantize.h"
#include "test_util.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void) /* splitmix64 */
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double unif(void) /* (0, 1) */
{
    return ((double)(rnd() >> 11) + 0.5) * 0x1p-53;
}

static double gauss(void)
{
    return sqrt(-2.0 * log(unif())) * cos(6.283185307179586 * unif());
}

/* n values like a weight matrix's: std 0.02, one in 128 ten times larger. */
static void weights(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(0.02 * gauss() * (rnd() % 128 == 0 ? 10.0 : 1.0));
}

#define NTYPES 15
static const uint32_t all_types[NTYPES] = {
    TDM_DTYPE_F32,  TDM_DTYPE_F16,    TDM_DTYPE_BF16,   TDM_DTYPE_Q8_0, TDM_DTYPE_Q6_K,
    TDM_DTYPE_Q5_K, TDM_DTYPE_Q5_1,   TDM_DTYPE_Q5_0,   TDM_DTYPE_Q4_K, TDM_DTYPE_Q4_1,
    TDM_DTYPE_Q4_0, TDM_DTYPE_IQ4_NL, TDM_DTYPE_IQ4_XS, TDM_DTYPE_Q3_K, TDM_DTYPE_Q2_K};

/* Quantizes `rows` rows of `len` with the per-column imp (or NULL) and
 * dequantizes them into y. */
static void roundtrip(uint32_t t, const float *x, float *y, int rows, int len, const float *imp)
{
    uint8_t *q = malloc(tdm_dtype_row_bytes(t, (uint64_t)len));
    for (int r = 0; r < rows; r++) {
        int rc = tdm_quantize_row(t, x + (size_t)r * len, q, (uint64_t)len, imp);
        CHECK(rc == 0, "%s: quantize_row returned %d", tdm_dtype_name(t), rc);
        tdm_dtype_to_f32(t, q, y + (size_t)r * len, (uint64_t)len);
    }
    free(q);
}

/* sqrt(sum v (y - x)^2 / sum v x^2), v the per-column weights or 1. */
static double rel_err(const float *x, const float *y, size_t n, int len, const float *imp)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        const double v = imp != NULL ? imp[i % (size_t)len] : 1.0;
        num += v * ((double)y[i] - x[i]) * ((double)y[i] - x[i]);
        den += v * (double)x[i] * x[i];
    }
    return sqrt(num / den);
}

static int type_index(uint32_t t)
{
    for (int i = 0; i < NTYPES; i++)
        if (all_types[i] == t)
            return i;
    return -1;
}

#define ROWS_A 48
#define LEN_A  1536
#define ROWS_B 64
#define LEN_B  256

static float xa[ROWS_A * LEN_A], ya[ROWS_A * LEN_A], xb[ROWS_B * LEN_B], yb[ROWS_B * LEN_B];
static double err_a[NTYPES], err_b[NTYPES];

/* 1. Round trips: relative RMSE per type, under bounds set from the
 * measured figures (the larger of the two row lengths) with about 10%
 * margin, and in the order of the bits. */
static void test_roundtrip(void)
{
    /* type, bound (rows of 1536 and 256 alike) */
    static const struct {
        uint32_t t;
        double bound;
    } bounds[] = {
        {TDM_DTYPE_F32, 0.0},        {TDM_DTYPE_F16, 2.4e-4},  {TDM_DTYPE_BF16, 1.9e-3},
        {TDM_DTYPE_Q8_0, 1.0e-2},    {TDM_DTYPE_Q6_K, 2.9e-2}, {TDM_DTYPE_Q5_K, 4.9e-2},
        {TDM_DTYPE_Q5_1, 4.8e-2},    {TDM_DTYPE_Q5_0, 8.0e-2}, {TDM_DTYPE_Q4_K, 9.9e-2},
        {TDM_DTYPE_Q4_1, 9.8e-2},    {TDM_DTYPE_Q4_0, 1.5e-1}, {TDM_DTYPE_IQ4_NL, 1.16e-1},
        {TDM_DTYPE_IQ4_XS, 1.18e-1}, {TDM_DTYPE_Q3_K, 2.0e-1}, {TDM_DTYPE_Q2_K, 2.95e-1},
    };
    printf("\n%-7s %6s %14s %14s %9s\n", "type", "bits", "rel RMSE 1536", "rel RMSE 256", "bound");
    for (size_t i = 0; i < sizeof(bounds) / sizeof(bounds[0]); i++) {
        const uint32_t t = bounds[i].t;
        const int k = type_index(t);
        roundtrip(t, xa, ya, ROWS_A, LEN_A, NULL);
        roundtrip(t, xb, yb, ROWS_B, LEN_B, NULL);
        err_a[k] = rel_err(xa, ya, (size_t)ROWS_A * LEN_A, LEN_A, NULL);
        err_b[k] = rel_err(xb, yb, (size_t)ROWS_B * LEN_B, LEN_B, NULL);
        const double bits = 8.0 * (double)tdm_dtype_block_bytes(t) / tdm_dtype_block_elems(t);
        printf("%-7s %6.3f %14.6f %14.6f %9.2e\n", tdm_dtype_name(t), bits, err_a[k], err_b[k],
               bounds[i].bound);
        CHECK(err_a[k] <= bounds[i].bound && err_b[k] <= bounds[i].bound,
              "%s: relative RMSE %.6f / %.6f above %.1e", tdm_dtype_name(t), err_a[k], err_b[k],
              bounds[i].bound);
    }
    static const uint32_t order[] = {TDM_DTYPE_Q8_0, TDM_DTYPE_Q6_K, TDM_DTYPE_Q5_K,
                                     TDM_DTYPE_Q4_K, TDM_DTYPE_Q3_K, TDM_DTYPE_Q2_K};
    for (size_t i = 0; i + 1 < sizeof(order) / sizeof(order[0]); i++) {
        const int a = type_index(order[i]), b = type_index(order[i + 1]);
        CHECK(err_a[a] < err_a[b] && err_b[a] < err_b[b], "%s should beat %s: %.6f vs %.6f",
              tdm_dtype_name(order[i]), tdm_dtype_name(order[i + 1]), err_a[a], err_a[b]);
    }
    const int xs = type_index(TDM_DTYPE_IQ4_XS), q40 = type_index(TDM_DTYPE_Q4_0);
    CHECK(err_a[xs] <= err_a[q40] && err_b[xs] <= err_b[q40], "IQ4_XS %.6f should beat Q4_0 %.6f",
          err_a[xs], err_a[q40]);
}

/* Every field where the dequantizer reads it: blocks whose sub-blocks
 * (16 or 32 elements, as the type scales them) differ in amplitude up to
 * 8x, so that a scale or min read from another sub-block's bits shows as
 * an error of the order of the values there; and quantizing the
 * dequantized values again lands on nearly the same values. */
static void test_fields(void)
{
    enum { N = 64 * 256 };
    static float x[N], y[N], y2[N];
    for (int k = 3; k < NTYPES; k++) {
        const uint32_t t = all_types[k];
        const int sub = t == TDM_DTYPE_Q2_K || t == TDM_DTYPE_Q3_K || t == TDM_DTYPE_Q6_K ? 16 : 32;
        for (int i = 0; i < N; i++) /* amplitudes 1x .. 8x, shuffled over the sub-blocks */
            x[i] = (float)(0.02 * gauss() * (1.0 + (i / sub * 7 % 15) * 0.5));
        roundtrip(t, x, y, N / 256, 256, NULL);
        double worst = 0;
        for (int s = 0; s < N / sub; s++) {
            const double e = rel_err(x + s * sub, y + s * sub, (size_t)sub, sub, NULL);
            worst = e > worst ? e : worst;
        }
        /* the worst sub-block: a few times the type's error, far from 1 */
        CHECK(worst < 4 * err_b[k] + 0.02, "%s: a sub-block's relative error is %.4f",
              tdm_dtype_name(t), worst);
        roundtrip(t, y, y2, N / 256, 256, NULL);
        const double e1 = rel_err(x, y, N, 256, NULL), e2 = rel_err(y, y2, N, 256, NULL);
        CHECK(e2 < 0.25 * e1, "%s: quantizing its own output moves it by %.5f (first %.5f)",
              tdm_dtype_name(t), e2, e1);
        printf("%-7s worst sub-block %.4f, requantized moves %.6f (first %.6f)\n",
               tdm_dtype_name(t), worst, e2, e1);
    }
}

/* Q4_K as a naive quantizer writes it: per sub-block scale (max - min) / 15
 * and min, 6-bit sub-scales against d = max scale / 63, dmin likewise. */
static void naive_q4_k(const float *x, uint8_t *b)
{
    float sc[8], mn[8], smax = 0, mmax = 0;
    for (int j = 0; j < 8; j++) {
        float lo = 0, hi = x[j * 32];
        for (int i = 0; i < 32; i++) {
            lo = x[j * 32 + i] < lo ? x[j * 32 + i] : lo;
            hi = x[j * 32 + i] > hi ? x[j * 32 + i] : hi;
        }
        sc[j] = (hi - lo) / 15;
        mn[j] = -lo;
        smax = sc[j] > smax ? sc[j] : smax;
        mmax = mn[j] > mmax ? mn[j] : mmax;
    }
    const uint16_t dh = tdm_f32_to_f16(smax / 63), mh = tdm_f32_to_f16(mmax / 63);
    const float d = tdm_f16_to_f32(dh), dm = tdm_f16_to_f32(mh);
    int ls[8], lm[8];
    memset(b, 0, 144);
    b[0] = (uint8_t)dh;
    b[1] = (uint8_t)(dh >> 8);
    b[2] = (uint8_t)mh;
    b[3] = (uint8_t)(mh >> 8);
    for (int j = 0; j < 8; j++) {
        ls[j] = d > 0 ? (int)lrintf(sc[j] / d) : 0;
        lm[j] = dm > 0 ? (int)lrintf(mn[j] / dm) : 0;
        ls[j] = ls[j] > 63 ? 63 : ls[j];
        lm[j] = lm[j] > 63 ? 63 : lm[j];
        const float S = d * (float)ls[j], M = dm * (float)lm[j];
        for (int i = 0; i < 32; i++) {
            long q = S > 0 ? lrintf((x[j * 32 + i] + M) / S) : 0;
            q = q < 0 ? 0 : q > 15 ? 15 : q;
            b[16 + j / 2 * 32 + i] |= (uint8_t)(q << (j % 2 * 4));
        }
    }
    for (int i = 0; i < 4; i++) { /* GGML's packing of the 6-bit pairs */
        b[4 + i] = (uint8_t)(ls[i] | (ls[i + 4] >> 4) << 6);
        b[8 + i] = (uint8_t)(lm[i] | (lm[i + 4] >> 4) << 6);
        b[12 + i] = (uint8_t)((ls[i + 4] & 15) | (lm[i + 4] & 15) << 4);
    }
}

/* 2. The search beats the formula. */
static void test_search_beats_naive(void)
{
    const size_t n = (size_t)ROWS_A * LEN_A;
    uint8_t *q = malloc(tdm_dtype_row_bytes(TDM_DTYPE_Q4_K, n));
    for (size_t i = 0; i < n; i += 256)
        naive_q4_k(xa + i, q + i / 256 * 144);
    tdm_dtype_to_f32(TDM_DTYPE_Q4_K, q, ya, n);
    const double naive = rel_err(xa, ya, n, LEN_A, NULL);
    const double ours = err_a[type_index(TDM_DTYPE_Q4_K)];
    printf("\nQ4_K: naive min/max quantization %.6f, search %.6f (%.1f%% lower)\n", naive, ours,
           100 * (1 - ours / naive));
    CHECK(ours < 0.97 * naive, "Q4_K search %.6f should beat the naive %.6f", ours, naive);
    free(q);
}

/* 3. Importance: the importance-weighted error is lower with it. */
static void test_importance(void)
{
    static float imp[LEN_A];
    for (int i = 0; i < LEN_A; i++)
        imp[i] = (float)((0.2 + unif()) * (rnd() % 10 == 0 ? 100.0 : 1.0));
    static const uint32_t must[] = {TDM_DTYPE_Q4_K, TDM_DTYPE_Q6_K,   TDM_DTYPE_Q3_K,
                                    TDM_DTYPE_Q2_K, TDM_DTYPE_IQ4_XS, TDM_DTYPE_Q5_K};
    printf("\n%-7s %14s %14s\n", "type", "imp-err plain", "imp-err imp");
    const size_t n = (size_t)ROWS_A * LEN_A;
    for (int k = 3; k < NTYPES; k++) {
        const uint32_t t = all_types[k];
        roundtrip(t, xa, ya, ROWS_A, LEN_A, NULL);
        const double plain = rel_err(xa, ya, n, LEN_A, imp);
        roundtrip(t, xa, ya, ROWS_A, LEN_A, imp);
        const double with = rel_err(xa, ya, n, LEN_A, imp);
        printf("%-7s %14.6f %14.6f (%.1f%% lower)\n", tdm_dtype_name(t), plain, with,
               100 * (1 - with / plain));
        int required = 0;
        for (size_t i = 0; i < sizeof(must) / sizeof(must[0]); i++)
            required |= must[i] == t;
        if (required)
            CHECK(with < 0.97 * plain, "%s: importance-weighted error %.6f with imp, %.6f without",
                  tdm_dtype_name(t), with, plain);
        else if (t != TDM_DTYPE_Q8_0)
            CHECK(with < plain, "%s: importance-weighted error %.6f with imp, %.6f without",
                  tdm_dtype_name(t), with, plain);
    }
}

static int all_finite(const float *y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(y[i]))
            return 0;
    return 1;
}

/* 4. Edge cases. */
static void test_edges(void)
{
    enum { N = 1536 };
    static float x[N], y[N];
    uint8_t q[N * 4];
    for (int k = 0; k < NTYPES; k++) {
        const uint32_t t = all_types[k];
        const char *name = tdm_dtype_name(t);
        memset(x, 0, sizeof(x));
        roundtrip(t, x, y, 1, N, NULL);
        int nz = 0;
        for (int i = 0; i < N; i++)
            nz += y[i] != 0;
        CHECK(nz == 0, "%s: zeros come back with %d non-zero values", name, nz);
        static const float consts[] = {0.37f, -0.37f, 1e-3f, -2.5f};
        for (size_t c = 0; c < sizeof(consts) / sizeof(consts[0]); c++) {
            for (int i = 0; i < N; i++)
                x[i] = consts[c];
            roundtrip(t, x, y, 1, N, NULL);
            double worst = 0;
            for (int i = 0; i < N; i++)
                worst = fmax(worst, fabs((double)y[i] - x[i]) / fabs((double)x[i]));
            /* f16 scales of a block of 1e-3 are subnormal (steps of 2^-24); BF16 keeps 8 bits */
            const double tol = t == TDM_DTYPE_BF16 ? 4e-3 : consts[c] == 1e-3f ? 5e-3 : 2e-3;
            CHECK(all_finite(y, N) && worst < tol, "%s: constant %g comes back off by %.2e", name,
                  (double)consts[c], worst);
        }
        /* denormals: nothing to keep, but nothing to break */
        for (int i = 0; i < N; i++)
            x[i] = (float)(gauss() * 1e-40);
        roundtrip(t, x, y, 1, N, NULL);
        double ymax = 0;
        for (int i = 0; i < N; i++)
            ymax = fmax(ymax, fabs(y[i]));
        CHECK(all_finite(y, N) && ymax < 1e-30, "%s: denormals come back as %g", name, ymax);
        /* huge values: f16 scales saturate, F16 itself is IEEE (infinite) */
        if (t != TDM_DTYPE_F16) {
            for (int i = 0; i < N; i++)
                x[i] = (float)(gauss() * 1e30);
            roundtrip(t, x, y, 1, N, NULL);
            CHECK(all_finite(y, N), "%s: values of 1e30 come back not finite", name);
            weights(x, N);
            x[77] = 1e30f;
            x[1000] = -3e38f;
            roundtrip(t, x, y, 1, N, NULL);
            CHECK(all_finite(y, N), "%s: a row with outliers of 1e30 comes back not finite", name);
        }
        /* not finite input: defined behaviour (the sanitizers watch), and the
         * blocks without it still right */
        weights(x, N);
        x[5] = NAN;
        x[300] = INFINITY;
        x[700] = -INFINITY;
        static float imp[N];
        for (int i = 0; i < N; i++)
            imp[i] = i % 3 == 0 ? 0.0f : i % 3 == 1 ? NAN : -1.0f;
        CHECK(tdm_quantize_row(t, x, q, N, NULL) == 0 && tdm_quantize_row(t, x, q, N, imp) == 0,
              "%s: NaN input", name);
        for (int i = 0; i < N; i++)
            imp[i] = 0.0f; /* no importance anywhere: the default weights */
        static uint8_t q0[N * 4];
        weights(x, N);
        tdm_quantize_row(t, x, q, N, imp);
        tdm_quantize_row(t, x, q0, N, NULL);
        CHECK(memcmp(q, q0, tdm_dtype_row_bytes(t, N)) == 0,
              "%s: all-zero importance is no importance", name);
    }
    CHECK(tdm_quantize_supported(TDM_DTYPE_Q4_K) && !tdm_quantize_supported(TDM_DTYPE_Q8_K) &&
              !tdm_quantize_supported(9) && !tdm_quantize_supported(99),
          "supported types");
    CHECK(tdm_quantize_row(TDM_DTYPE_Q8_K, x, q, 256, NULL) == -1 &&
              tdm_quantize_row(9, x, q, 32, NULL) == -1 &&
              tdm_quantize_row(1000, x, q, 32, NULL) == -1,
          "types it cannot write are refused");
    CHECK(tdm_quantize_row(TDM_DTYPE_Q4_K, x, q, 100, NULL) == -1 &&
              tdm_quantize_row(TDM_DTYPE_Q4_0, x, q, 31, NULL) == -1 &&
              tdm_quantize_row(TDM_DTYPE_Q4_0, x, q, 0, NULL) == 0,
          "rows that are not whole blocks are refused");
}

/* 5. F16 and BF16: exact where representable, round to nearest even. */
static void test_floats(void)
{
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00)
            continue;
        const float f = tdm_f16_to_f32((uint16_t)h);
        uint16_t got;
        tdm_quantize_row(TDM_DTYPE_F16, &f, &got, 1, NULL);
        bad += got != h;
    }
    CHECK(bad == 0, "F16: %d of the finite halves do not come back", bad);
    bad = 0;
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)(rnd() & 0xffff) << 16;
        if ((u & 0x7f800000u) == 0x7f800000u)
            continue;
        float f, back;
        memcpy(&f, &u, 4);
        uint16_t got;
        tdm_quantize_row(TDM_DTYPE_BF16, &f, &got, 1, NULL);
        tdm_dtype_to_f32(TDM_DTYPE_BF16, &got, &back, 1);
        bad += memcmp(&f, &back, 4) != 0;
    }
    CHECK(bad == 0, "BF16: %d of the bf16 values do not come back", bad);
    static const struct {
        uint32_t in;
        uint16_t want;
    } cases[] = {
        {0x3f808000u, 0x3f80}, /* tie: even stays */
        {0x3f818000u, 0x3f82}, /* tie: odd rounds up */
        {0x3f808001u, 0x3f81}, {0xbf807fffu, 0xbf80}, {0x7f7fffffu, 0x7f80}, /* to infinity */
        {0x7fc00001u, 0x7fc0}, {0xff800001u, 0xffc0}, /* NaN stays NaN (quiet), sign kept */
        {0x00000001u, 0x0000},                        /* denormal, rounded */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        float f;
        memcpy(&f, &cases[i].in, 4);
        uint16_t got;
        tdm_quantize_row(TDM_DTYPE_BF16, &f, &got, 1, NULL);
        CHECK(got == cases[i].want, "BF16 of 0x%08x: 0x%04x, want 0x%04x", cases[i].in, got,
              cases[i].want);
    }
    const float nanf = NAN;
    uint16_t h;
    tdm_quantize_row(TDM_DTYPE_F16, &nanf, &h, 1, NULL);
    CHECK((h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0, "F16 of NaN is NaN (0x%04x)", h);
    float back[4];
    uint8_t raw[16];
    const float in[4] = {1.5f, -0.0f, 1e-45f, 3.4e38f};
    tdm_quantize_row(TDM_DTYPE_F32, in, raw, 4, NULL);
    tdm_dtype_to_f32(TDM_DTYPE_F32, raw, back, 4);
    CHECK(memcmp(in, back, sizeof(in)) == 0, "F32 is a copy");
}

/* 6. GGML's reference formulas (gguf.quants.quantize), where there is a
 * Python with the gguf package. */

static void test_gguf(void)
{
    const char *py = t_python();
    char cmd[4096];
    snprintf(cmd, sizeof(cmd), "'%s' -c 'import gguf, numpy' 2>/dev/null", py ? py : "false");
    if (py == NULL || system(cmd) != 0) {
        printf("\ngguf comparison skipped: no Python with the gguf package (make deps makes "
               ".venv; or set TANDEM_PYTHON)\n");
        return;
    }
    static const uint32_t types[] = {TDM_DTYPE_Q8_0, TDM_DTYPE_BF16, TDM_DTYPE_Q4_0,
                                     TDM_DTYPE_Q4_1, TDM_DTYPE_Q5_0, TDM_DTYPE_Q5_1};
    enum { ROWS = 32, LEN = 1536, NT = sizeof(types) / sizeof(types[0]) };
    char path[] = "/tmp/tandem-quantize-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) {
        CHECK(0, "mkstemp");
        return;
    }
    close(fd);
    snprintf(cmd, sizeof(cmd),
             "'%s' -c '\n"
             "import numpy as np, gguf, sys\n"
             "rng = np.random.default_rng(20240611)\n"
             "x = (0.02 * rng.standard_normal((%d, %d))).astype(np.float32)\n"
             "x *= np.where(rng.integers(0, 128, x.shape) == 0, 10, 1).astype(np.float32)\n"
             "out = [x.tobytes()]\n"
             "for t in (%u, %u, %u, %u, %u, %u):\n"
             "    out.append(gguf.quants.quantize(x, gguf.GGMLQuantizationType(t)).tobytes())\n"
             "open(sys.argv[1], \"wb\").write(b\"\".join(out))\n"
             "' '%s'",
             py, ROWS, LEN, types[0], types[1], types[2], types[3], types[4], types[5], path);
    const int rc = system(cmd);
    CHECK(rc == 0, "the gguf reference failed (exit %d)", rc);
    size_t total = (size_t)ROWS * LEN * 4;
    for (int k = 0; k < NT; k++)
        total += tdm_dtype_row_bytes(types[k], (uint64_t)ROWS * LEN);
    uint8_t *buf = malloc(total), *mine = malloc((size_t)ROWS * LEN * 4);
    FILE *f = fopen(path, "rb");
    const size_t have = f != NULL ? fread(buf, 1, total, f) : 0;
    if (f != NULL)
        fclose(f);
    unlink(path);
    CHECK(have == total, "reference file has %zu bytes, want %zu", have, total);
    if (rc == 0 && have == total) {
        const float *x = (const float *)buf;
        const uint8_t *ref = buf + (size_t)ROWS * LEN * 4;
        printf("\n%-7s %s\n", "type", "blocks bit-identical to gguf.quants.quantize");
        for (int k = 0; k < NT; k++) {
            const uint32_t t = types[k];
            const size_t rb = tdm_dtype_row_bytes(t, LEN), bb = tdm_dtype_block_bytes(t);
            for (int r = 0; r < ROWS; r++)
                tdm_quantize_row(t, x + (size_t)r * LEN, mine + r * rb, LEN, NULL);
            const size_t nb = (size_t)ROWS * rb / bb;
            size_t same = 0;
            for (size_t b = 0; b < nb; b++)
                same += memcmp(mine + b * bb, ref + b * bb, bb) == 0;
            printf("%-7s %zu of %zu\n", tdm_dtype_name(t), same, nb);
            if (t == TDM_DTYPE_Q8_0 || t == TDM_DTYPE_BF16)
                CHECK(same == nb, "%s: %zu of %zu blocks differ from GGML's", tdm_dtype_name(t),
                      nb - same, nb);
            ref += (size_t)ROWS * rb;
        }
    }
    free(buf);
    free(mine);
}

int main(void)
{
    weights(xa, sizeof(xa) / sizeof(xa[0]));
    weights(xb, sizeof(xb) / sizeof(xb[0]));
    test_roundtrip();
    test_fields();
    test_search_beats_naive();
    test_importance();
    test_edges();
    test_floats();
    test_gguf();
    return t_finish();
}
