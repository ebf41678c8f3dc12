/* tandem CPU backend: AVX2 + FMA + F16C kernels, with and without AVX-VNNI.
 * Compiled with those ISA flags but not AVX-VNNI (a compiler may fuse
 * vpmaddwd + vpaddd into vpdpwssd where it is allowed, and many AVX2 CPUs
 * lack it); the quantized matmul with AVX-VNNI is ops_avxvnni.c. Called
 * only when CPUID says the CPU and OS have them. The canonical 16 float lanes of cpu_internal.h are
 * two ymm registers here (lanes 0-7 and 8-15), so results equal the scalar and AVX-512 kernels bit
 * for bit. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_internal.h"

#define AI static inline __attribute__((always_inline))

/* ---- shared helpers ---- */

/* tdm_cpu_expf on 8 lanes, the same operations in the same order. */
AI __m256 exp8(__m256 x)
{
    __m256 xc = _mm256_max_ps(_mm256_set1_ps(TDM_EXP_LO), x);
    xc = _mm256_min_ps(_mm256_set1_ps(TDM_EXP_HI), xc);
    __m256 t = _mm256_mul_ps(xc, _mm256_set1_ps(TDM_EXP_LOG2E));
    __m256 nm = _mm256_add_ps(t, _mm256_set1_ps(TDM_EXP_MAGIC));
    __m256 n = _mm256_sub_ps(nm, _mm256_set1_ps(TDM_EXP_MAGIC));
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-TDM_EXP_LN2HI), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-TDM_EXP_LN2LO), r);
    __m256 p = _mm256_set1_ps(TDM_EXP_C6);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(TDM_EXP_C5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(TDM_EXP_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(TDM_EXP_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(TDM_EXP_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_sub_epi32(_mm256_castps_si256(nm), _mm256_set1_epi32(0x4b400000));
    e = _mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23);
    __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(TDM_EXP_LO), _CMP_LT_OQ);
    return _mm256_blendv_ps(res, _mm256_setzero_ps(), under);
}

/* tdm_cpu_tree16 of lanes lo (0-7) and hi (8-15). */
AI float hsum16(__m256 lo, __m256 hi)
{
    __m256 b = _mm256_add_ps(lo, hi);
    __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
    __m128 e = _mm_add_ss(d, _mm_shuffle_ps(d, d, 1));
    return _mm_cvtss_f32(e);
}

/* Lane p = the rest of tdm_cpu_tree16 (quarters, pairs) of b[p], where
 * b[p] already holds the first step (lanes 0-7 + lanes 8-15). */
AI __m256 tree8x8(const __m256 b[8])
{
    __m256 f[4], g[2];
    for (int i = 0; i < 4; i++)
        f[i] = _mm256_add_ps(_mm256_permute2f128_ps(b[2 * i], b[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(b[2 * i], b[2 * i + 1], 0x31));
    for (int i = 0; i < 2; i++)
        g[i] = _mm256_add_ps(_mm256_shuffle_ps(f[2 * i], f[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(f[2 * i], f[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 h = _mm256_add_ps(_mm256_shuffle_ps(g[0], g[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm256_shuffle_ps(g[0], g[1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* Lanes hold positions 0 2 4 6 | 1 3 5 7. */
    return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

AI float hmax8(__m256 v)
{
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}

/* ---- quantized matmul: qmatmul_avx2.h, here without AVX-VNNI ---- */

#include "qmatmul_avx2.h"

#define QMATMUL_VNNI 0
QMATMUL_FN(static, qmatmul_avx2)

/* ---- float matmul: R rows x T tokens, each 16 lanes as two ymm ----
 * f16: 0 for F32 weights, 1 for F16, 2 for BF16. */

AI __m256 wload8(const void *base, int64_t idx, const int f16)
{
    if (f16 == 2) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + idx));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (f16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + idx)));
    return _mm256_loadu_ps((const float *)base + idx);
}

AI void ftile(const tdm_bweight_t *w, const float *x, int64_t r, int64_t t, const int R,
              const int T, const int f16, float *y, int64_t ldy)
{
    const int64_t k = w->k;
    __m256 acc[2][2][2];
#pragma GCC unroll 2
    for (int i = 0; i < R; i++)
#pragma GCC unroll 2
        for (int u = 0; u < T; u++)
            acc[i][u][0] = acc[i][u][1] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        __m256 wv[2][2];
#pragma GCC unroll 2
        for (int i = 0; i < R; i++) {
            wv[i][0] = wload8(w->data, (r + i) * k + j, f16);
            wv[i][1] = wload8(w->data, (r + i) * k + j + 8, f16);
        }
#pragma GCC unroll 2
        for (int u = 0; u < T; u++) {
            __m256 x0 = _mm256_loadu_ps(x + (t + u) * k + j);
            __m256 x1 = _mm256_loadu_ps(x + (t + u) * k + j + 8);
#pragma GCC unroll 2
            for (int i = 0; i < R; i++) {
                acc[i][u][0] = _mm256_fmadd_ps(wv[i][0], x0, acc[i][u][0]);
                acc[i][u][1] = _mm256_fmadd_ps(wv[i][1], x1, acc[i][u][1]);
            }
        }
    }
    if (j < k) { /* tail: missing elements are zeros, as in the scalar code */
        float wp[2][16], xp[2][16];
        for (int i = 0; i < R; i++)
            for (int l = 0; l < 16; l++) {
                int64_t jj = j + l;
                const uint16_t *h = (const uint16_t *)w->data + (r + i) * k + jj;
                wp[i][l] = jj >= k    ? 0.0f
                           : f16 == 2 ? tdm_cpu_u2f((uint32_t)*h << 16)
                           : f16      ? tdm_f16_to_f32(*h)
                                      : ((const float *)w->data)[(r + i) * k + jj];
            }
        for (int u = 0; u < T; u++)
            for (int l = 0; l < 16; l++)
                xp[u][l] = j + l < k ? x[(t + u) * k + j + l] : 0.0f;
        for (int u = 0; u < T; u++)
            for (int i = 0; i < R; i++) {
                acc[i][u][0] =
                    _mm256_fmadd_ps(_mm256_loadu_ps(wp[i]), _mm256_loadu_ps(xp[u]), acc[i][u][0]);
                acc[i][u][1] = _mm256_fmadd_ps(_mm256_loadu_ps(wp[i] + 8),
                                               _mm256_loadu_ps(xp[u] + 8), acc[i][u][1]);
            }
    }
#pragma GCC unroll 2
    for (int i = 0; i < R; i++)
#pragma GCC unroll 2
        for (int u = 0; u < T; u++)
            y[(t + u) * ldy + r + i] = hsum16(acc[i][u][0], acc[i][u][1]);
}

AI void fmatmul_type(const tdm_bweight_t *w, const float *x, int64_t n, float *y, int64_t ldy,
                     int64_t r0, int64_t r1, const int f16)
{
    /* Prefetch the rows two tiles ahead: at small n the weights stream. */
    const size_t es = f16 != 0 ? 2 : 4, tile_bytes = (size_t)w->k * es * 2;
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) {
        if (r + 3 * 2 <= r1) {
            const char *pf = (const char *)w->data + (size_t)(r + 2 * 2) * (size_t)w->k * es;
            for (size_t o = 0; o < tile_bytes; o += 64)
                _mm_prefetch(pf + o, _MM_HINT_T0);
        }
        int64_t t = 0;
        for (; t + 2 <= n; t += 2)
            ftile(w, x, r, t, 2, 2, f16, y, ldy);
        for (; t < n; t++)
            ftile(w, x, r, t, 2, 1, f16, y, ldy);
    }
    for (; r < r1; r++) {
        int64_t t = 0;
        for (; t + 2 <= n; t += 2)
            ftile(w, x, r, t, 1, 2, f16, y, ldy);
        for (; t < n; t++)
            ftile(w, x, r, t, 1, 1, f16, y, ldy);
    }
}

static void fmatmul_avx2(const tdm_bweight_t *w, const float *x, int64_t n, float *y, int64_t ldy,
                         int64_t r0, int64_t r1)
{
    if (w->wtype == TDM_DTYPE_F16)
        fmatmul_type(w, x, n, y, ldy, r0, r1, 1);
    else if (w->wtype == TDM_DTYPE_BF16)
        fmatmul_type(w, x, n, y, ldy, r0, r1, 2);
    else
        fmatmul_type(w, x, n, y, ldy, r0, r1, 0);
}

/* ---- activation quantization ---- */

/* The sum of a vector's 8 int32 lanes. */
AI int32_t hsum8i(__m256i s)
{
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s4);
}

static void act_quant_avx2(int32_t bias, int has_min, const float *x, int64_t k, uint8_t *act)
{
    const int64_t nb = k / TDM_QK;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 qlo = _mm256_set1_ps(-TDM_CPU_ACT_QMAX), qhi = _mm256_set1_ps(TDM_CPU_ACT_QMAX);
    for (int64_t b = 0; b < nb; b++) {
        __m256 xv[4];
        __m256 mx = _mm256_setzero_ps(); /* maxps(|x|, m): a NaN never gets in */
        for (int i = 0; i < 4; i++) {
            xv[i] = _mm256_loadu_ps(x + b * TDM_QK + 8 * i);
            mx = _mm256_max_ps(_mm256_and_ps(xv[i], absmask), mx);
        }
        float amax = hmax8(mx);
        float db = amax / TDM_CPU_ACT_QMAX;
        __m256i q[4];
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_setzero_si256();
        if (db != 0.0f) {
            __m256 dv = _mm256_set1_ps(db);
            for (int i = 0; i < 4; i++) {
                __m256 r = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(xv[i], dv), qlo), qhi);
                q[i] = _mm256_cvtps_epi32(
                    _mm256_round_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            }
        }
        /* packs works per 128-bit lane: 0-3 8-11 4-7 12-15 -> reorder */
        __m256i p0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xd8);
        __m256i p1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xd8);
        _mm256_store_si256((__m256i *)(act + b * TDM_CPU_ACT_QBYTES), p0);
        _mm256_store_si256((__m256i *)(act + b * TDM_CPU_ACT_QBYTES + 32), p1);
        tdm_cpu_act_aux(act, nb, b, bias, has_min, db, hsum8i(_mm256_add_epi32(q[0], q[1])),
                        hsum8i(_mm256_add_epi32(q[2], q[3])));
    }
}

/* ---- row and elementwise ops ---- */

static float sumsq_avx2(const float *x, int64_t d)
{
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
        lo = _mm256_fmadd_ps(a, a, lo);
        hi = _mm256_fmadd_ps(b, b, hi);
    }
    if (j < d) {
        float p[16];
        for (int l = 0; l < 16; l++)
            p[l] = j + l < d ? x[j + l] : 0.0f;
        __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
        lo = _mm256_fmadd_ps(a, a, lo);
        hi = _mm256_fmadd_ps(b, b, hi);
    }
    return hsum16(lo, hi);
}

static void scale_mul_avx2(const float *x, float scale, const float *w, int64_t d, float *out)
{
    __m256 s = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), s),
                                                _mm256_loadu_ps(w + i)));
    for (; i < d; i++)
        out[i] = (x[i] * scale) * w[i];
}

static void swiglu_avx2(const float *g, const float *u, int64_t count, float *out)
{
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_xor_ps(gv, sign));
        __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    for (; i < count; i++) {
        float e = tdm_cpu_expf(-g[i]);
        float s = g[i] / (1.0f + e);
        out[i] = s * u[i];
    }
}

static void add_avx2(float *x, const float *y, int64_t count)
{
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < count; i++)
        x[i] = x[i] + y[i];
}

static void to_f16_avx2(const float *x, int64_t count, uint16_t *out)
{
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < count; i++)
        out[i] = tdm_f32_to_f16(x[i]);
}

/* ---- attention ---- */

/* Query heads [h0, h1) of row t: a part of one kv head's group, or whole
 * groups of consecutive kv heads (ng heads per kv head). Per chunk of 16
 * positions and kv head, K and V are converted to f32 once and used by
 * every head of the group; the item's kv heads are adjacent in the cache,
 * so a whole row reads each position's K (and V) in one run. ND =
 * head_dim / 16 when known at compile time, 0 for any multiple of 16. */
AI void attn_core(const tdm_attn_params_t *p, const float *q, const uint16_t *ck,
                  const uint16_t *cv, float *out, int64_t t, int32_t h0, int32_t h1, int64_t tn,
                  int32_t hn0, const int ND)
{
    const int64_t hd = p->head_dim;
    const int64_t nd = ND ? 2 * ND : hd / 8; /* ymm per head row */
    const int32_t grp = p->n_heads / p->n_kv_heads;
    const int32_t nh = h1 - h0, ng = nh < grp ? nh : grp, nkv = nh / ng;
    const int32_t kv0 = h0 / grp;
    const int64_t ctx = p->ctx_len[t];
    const int32_t *table = p->block_tables + (int64_t)p->table_of_row[t] * p->bt_stride;
    const float *qrow = q + (t * p->n_heads + h0) * hd;
    float *orow = out + (t * p->n_heads + h0) * hd;
    _Alignas(32) float kf[TDM_CPU_CHUNK * TDM_CPU_MAX_HD];
    _Alignas(32) float vf[TDM_CPU_CHUNK * TDM_CPU_MAX_HD];
    _Alignas(32) float acc[TDM_CPU_MAX_HEADS_G * TDM_CPU_MAX_HD];
    _Alignas(32) float pr[TDM_CPU_CHUNK];
    float m[TDM_CPU_MAX_HEADS_G], l[TDM_CPU_MAX_HEADS_G];
    for (int32_t h = 0; h < nh; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
        for (int64_t j = 0; j < hd; j++)
            acc[h * hd + j] = 0.0f;
    }
    const __m256 ninf = _mm256_set1_ps(-INFINITY), sc = _mm256_set1_ps(p->scale);
    const __m256i iota0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i iota1 = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    int64_t off[TDM_CPU_CHUNK], off_pf[TDM_CPU_CHUNK];
    for (int64_t c0 = 0; c0 < ctx; c0 += TDM_CPU_CHUNK) {
        const int nv = ctx - c0 < TDM_CPU_CHUNK ? (int)(ctx - c0) : TDM_CPU_CHUNK;
        tdm_cpu_kv_rows(p, table, c0, nv, kv0, off);
        /* K and V rows come from memory (a long or cold cache): the chunk
         * TDM_CPU_ATTN_PF ahead, or past the end the next item's first
         * chunks, are prefetched while this one runs, a few rows at a time
         * (a burst of prefetches fills the L1 miss buffers and stalls the
         * loads behind it). */
        int64_t pt = t, pc = c0 + TDM_CPU_ATTN_PF * TDM_CPU_CHUNK;
        int32_t pkv = kv0;
        if (pc >= ctx) {
            pc -= (ctx + TDM_CPU_CHUNK - 1) / TDM_CPU_CHUNK * TDM_CPU_CHUNK;
            pt = tn;
            pkv = hn0 / grp;
        }
        int npf = 0;
        if (pt >= 0 && pc < p->ctx_len[pt]) {
            npf = p->ctx_len[pt] - pc < TDM_CPU_CHUNK ? (int)(p->ctx_len[pt] - pc) : TDM_CPU_CHUNK;
            tdm_cpu_kv_rows(p, p->block_tables + (int64_t)p->table_of_row[pt] * p->bt_stride, pc,
                            npf, pkv, off_pf);
        }
        const __m256i nvv = _mm256_set1_epi32(nv);
        const __m256 valid0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nvv, iota0));
        const __m256 valid1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nvv, iota1));
        for (int32_t kj = 0; kj < nkv; kj++) {
            for (int i = 0; i < nv; i++) {
                const uint16_t *kr = ck + off[i] + kj * hd, *vr = cv + off[i] + kj * hd;
                if (i < npf)
                    for (int64_t o = 0; o < hd * 2; o += 64) {
                        _mm_prefetch((const char *)(ck + off_pf[i] + kj * hd) + o, _MM_HINT_T0);
                        _mm_prefetch((const char *)(cv + off_pf[i] + kj * hd) + o, _MM_HINT_T0);
                    }
#pragma GCC unroll 16
                for (int64_t c = 0; c < nd; c++) {
                    _mm256_store_ps(kf + i * hd + 8 * c, _mm256_cvtph_ps(_mm_loadu_si128(
                                                             (const __m128i *)(kr + 8 * c))));
                    _mm256_store_ps(vf + i * hd + 8 * c, _mm256_cvtph_ps(_mm_loadu_si128(
                                                             (const __m128i *)(vr + 8 * c))));
                }
            }
            for (int32_t hg = 0; hg < ng; hg++) {
                const int32_t h = kj * ng + hg;
                const float *qh = qrow + (int64_t)h * hd;
                __m256 b[16];
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++) {
                    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
                    if (i < nv) {
#pragma GCC unroll 16
                        for (int64_t c = 0; c < nd; c += 2) {
                            lo = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c),
                                                 _mm256_load_ps(kf + i * hd + 8 * c), lo);
                            hi = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c + 8),
                                                 _mm256_load_ps(kf + i * hd + 8 * c + 8), hi);
                        }
                    }
                    b[i] = _mm256_add_ps(lo, hi);
                }
                __m256 s0 = _mm256_blendv_ps(ninf, _mm256_mul_ps(tree8x8(b), sc), valid0);
                __m256 s1 = _mm256_blendv_ps(ninf, _mm256_mul_ps(tree8x8(b + 8), sc), valid1);
                /* no branch on a new max: alpha is exactly 1 when there is none */
                float mc = tdm_cpu_maxps(hmax8(_mm256_max_ps(s0, s1)), m[h]);
                float alpha = tdm_cpu_expf(m[h] - mc);
                l[h] = l[h] * alpha;
                m[h] = mc;
                __m256 mv = _mm256_set1_ps(mc), av = _mm256_set1_ps(alpha);
                __m256 p0 = exp8(_mm256_sub_ps(s0, mv)), p1 = exp8(_mm256_sub_ps(s1, mv));
                l[h] = l[h] + hsum16(p0, p1);
                _mm256_store_ps(pr, p0);
                _mm256_store_ps(pr + 8, p1);
                float *ah = acc + h * hd;
                if (ND) { /* the head's accumulator in registers (hd 64: 8 ymm) */
                    __m256 a[2 * (TDM_CPU_MAX_HD / 16)];
#pragma GCC unroll 16
                    for (int64_t c = 0; c < nd; c++)
                        a[c] = _mm256_mul_ps(_mm256_load_ps(ah + 8 * c), av);
                    for (int i = 0; i < nv; i++) {
                        __m256 pb = _mm256_set1_ps(pr[i]);
#pragma GCC unroll 16
                        for (int64_t c = 0; c < nd; c++)
                            a[c] = _mm256_fmadd_ps(pb, _mm256_load_ps(vf + i * hd + 8 * c), a[c]);
                    }
#pragma GCC unroll 16
                    for (int64_t c = 0; c < nd; c++)
                        _mm256_store_ps(ah + 8 * c, a[c]);
                } else {
                    for (int64_t c = 0; c < nd; c++) {
                        __m256 a = _mm256_mul_ps(_mm256_load_ps(ah + 8 * c), av);
                        for (int i = 0; i < nv; i++)
                            a = _mm256_fmadd_ps(_mm256_set1_ps(pr[i]),
                                                _mm256_load_ps(vf + i * hd + 8 * c), a);
                        _mm256_store_ps(ah + 8 * c, a);
                    }
                }
            }
        }
    }
    for (int32_t h = 0; h < nh; h++) {
        float *oh = orow + (int64_t)h * hd;
        for (int64_t c = 0; c < nd; c++) {
            __m256 o =
                ctx > 0 ? _mm256_div_ps(_mm256_load_ps(acc + h * hd + 8 * c), _mm256_set1_ps(l[h]))
                        : _mm256_setzero_ps();
            _mm256_storeu_ps(oh + 8 * c, o);
        }
    }
}

static void attn_avx2(const tdm_attn_params_t *p, const float *q, const uint16_t *ck,
                      const uint16_t *cv, float *out, int64_t t, int32_t h0, int32_t h1, int64_t tn,
                      int32_t hn0)
{
    const int64_t hd = p->head_dim;
    if (hd % 16 != 0 || hd > TDM_CPU_MAX_HD || h1 - h0 > TDM_CPU_MAX_HEADS_G)
        tdm_cpu_attn_scalar(p, q, ck, cv, out, t, h0, h1, tn, hn0);
    else if (hd == 64)
        attn_core(p, q, ck, cv, out, t, h0, h1, tn, hn0, 4);
    else
        attn_core(p, q, ck, cv, out, t, h0, h1, tn, hn0, 0);
}

#define AVX2_TABLE(qmm)                                                                            \
    {                                                                                              \
        .qmatmul = qmm, .fmatmul = fmatmul_avx2, .act_quant = act_quant_avx2, .sumsq = sumsq_avx2, \
        .scale_mul = scale_mul_avx2, .swiglu = swiglu_avx2, .add = add_avx2,                       \
        .to_f16 = to_f16_avx2, .attn = attn_avx2,                                                  \
    }

const tdm_cpu_kernels_t tdm_cpu_kernels_avx2 = AVX2_TABLE(qmatmul_avx2);
const tdm_cpu_kernels_t tdm_cpu_kernels_avx2_vnni = AVX2_TABLE(tdm_cpu_qmatmul_avx2_vnni);
