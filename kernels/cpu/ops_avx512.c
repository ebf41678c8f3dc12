/* tandem CPU backend: AVX-512 (F/BW/VL/DQ + VNNI) kernels. Compiled with
 * those ISA flags; called only when CPUID says the CPU and OS have them.
 * Every kernel does the canonical arithmetic of cpu_internal.h, so results
 * equal the scalar kernels bit for bit. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_internal.h"

#define AI static inline __attribute__((always_inline))

/* ---- shared helpers ---- */

/* tdm_cpu_expf on 16 lanes, the same operations in the same order. */
AI __m512 exp16(__m512 x)
{
    __m512 xc = _mm512_max_ps(_mm512_set1_ps(TDM_EXP_LO), x);
    xc = _mm512_min_ps(_mm512_set1_ps(TDM_EXP_HI), xc);
    __m512 t = _mm512_mul_ps(xc, _mm512_set1_ps(TDM_EXP_LOG2E));
    __m512 nm = _mm512_add_ps(t, _mm512_set1_ps(TDM_EXP_MAGIC));
    __m512 n = _mm512_sub_ps(nm, _mm512_set1_ps(TDM_EXP_MAGIC));
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-TDM_EXP_LN2HI), xc);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-TDM_EXP_LN2LO), r);
    __m512 p = _mm512_set1_ps(TDM_EXP_C6);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(TDM_EXP_C5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(TDM_EXP_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(TDM_EXP_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(TDM_EXP_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_sub_epi32(_mm512_castps_si512(nm), _mm512_set1_epi32(0x4b400000));
    e = _mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127)), 23);
    __m512 res = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(TDM_EXP_LO), _CMP_LT_OQ);
    return _mm512_mask_blend_ps(under, res, _mm512_setzero_ps());
}

/* tdm_cpu_tree16 of one vector. */
AI float hsum16(__m512 v)
{
    __m256 b = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
    __m128 e = _mm_add_ss(d, _mm_shuffle_ps(d, d, 1));
    return _mm_cvtss_f32(e);
}

AI int32_t load32(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- quantized matmul ----
 * A tile is the 16 rows of one packed group times T tokens. Per block each
 * 64-byte chunk of packed bytes (16 rows x 4, see cpu_internal.h) is loaded
 * once and widened in registers to u16 pairs: vpshufb within 128-bit lanes
 * keeps row r in dword lane r. Each pair vector serves all T tokens:
 * vpdpwssd with a broadcast of 2 int16 activations adds each row's two
 * products into its lane; the 16 pair vectors of a block add up to the
 * exact block sum. With few tokens a token's products rotate over S
 * accumulators (shorter dependency chains; integer adds are exact). */

/* In-lane byte shuffles: row r's bytes (b0, b1) and (b2, b3) as u16 pairs. */
AI __m512i pairs01(void)
{
    return _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, -128, 1, -128, 4, -128, 5, -128, 8, -128, 9, -128, 12, -128, 13, -128));
}

AI __m512i pairs23(void)
{
    return _mm512_broadcast_i32x4(
        _mm_setr_epi8(2, -128, 3, -128, 6, -128, 7, -128, 10, -128, 11, -128, 14, -128, 15, -128));
}

/* Pair vector j of a block (16 rows x 2 u16) times the 2 activations at
 * ap (+ t * astride for token t), into its accumulator of each token. */
AI void dot_pairs(__m512i acc[8][4], int j, int hf, const int S, const int sub16, const int T,
                  __m512i wv, const uint8_t *ap, size_t astride)
{
    const int s = tdm_cpu_acc_slot(j, hf, S, sub16);
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        acc[t][s] = _mm512_dpwssd_epi32(acc[t][s], wv, _mm512_set1_epi32(load32(ap + t * astride)));
}

/* The 16 rows' scales (m = 0) or mins (m = 1) of block b, half h: f16,
 * f32, or int8 times the f32 super-scale (an exact product). */
AI __m512 wscales(const tdm_bweight_t *w, const uint8_t *grp, int m, int64_t b, int h,
                  const int nsub, uint32_t pk)
{
    const size_t si = ((size_t)b * nsub + h) * TDM_CPU_RG;
    const uint8_t *t = grp + (m ? w->m_off : w->d_off);
    if (pk & TDM_CPU_PK_SC8) {
        const uint8_t *sp = grp + (m ? w->t_off : w->s_off) + 4 * (size_t)(b / 8) * TDM_CPU_RG;
        __m512i k = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(t + si)));
        return _mm512_mul_ps(_mm512_loadu_ps((const void *)sp), _mm512_cvtepi32_ps(k));
    }
    if (pk & TDM_CPU_PK_SC32)
        return _mm512_load_ps((const void *)(t + 4 * si));
    return _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(t + 2 * si)));
}

AI void qtile(const tdm_bweight_t *w, const uint8_t *grp, const uint8_t *act, size_t astride,
              const int T, const uint32_t pk, float *y, int64_t ldy, __mmask16 smask,
              const uint8_t *pf)
{
    /* pf: where to prefetch (a later group) while this one is computed;
     * spread over the blocks, one block's share of lines per block. */
    const size_t pf_step = w->group_bytes / (size_t)w->nb;
    const int64_t nb = w->nb;
    const int nib = (pk & TDM_CPU_PK_NIB) != 0, has_min = (pk & TDM_CPU_PK_MIN) != 0;
    const int sub16 = (pk & TDM_CPU_PK_SUB16) != 0;
    const int nsub = sub16 ? 2 : 1;
    const int S = T == 1 ? 4 : T <= 4 ? 2 : 1;
    const int sh = sub16 ? (S >= 2 ? S / 2 : 1) : S; /* accumulators per half */
    const __m512i m4 = _mm512_set1_epi8(0x0f), p01 = pairs01(), p23 = pairs23();
    const size_t qbytes = nib ? 256 : 512;
    const size_t doff = TDM_CPU_ACT_D(nb);
    const size_t xoff = sub16 ? TDM_CPU_ACT_AUX16(nb) : TDM_CPU_ACT_AUX(nb);
    __m512 facc[8];
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        facc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qs = grp + (size_t)b * qbytes;
        const uint8_t *ab = act + (size_t)b * TDM_CPU_ACT_QBYTES; /* int16 q[32] */
        if (pf != NULL)
            for (size_t o = (size_t)b * pf_step & ~(size_t)63; o < (size_t)(b + 1) * pf_step;
                 o += 64)
                _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
        __m512i acc[8][4];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++)
                acc[t][s] = _mm512_setzero_si512();
            if (!has_min)
#pragma GCC unroll 2
                for (int h = 0; h < nsub; h++)
                    acc[t][h * sh] = _mm512_set1_epi32(
                        load32(act + t * astride + xoff + 4 * ((size_t)b * nsub + h)));
        }
        if (!nib) {
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                __m512i raw = _mm512_load_si512((const void *)(qs + 64 * c));
                dot_pairs(acc, 2 * c, c / 4, S, sub16, T, _mm512_shuffle_epi8(raw, p01), ab + 8 * c,
                          astride);
                dot_pairs(acc, 2 * c + 1, c / 4, S, sub16, T, _mm512_shuffle_epi8(raw, p23),
                          ab + 8 * c + 4, astride);
            }
        } else {
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                __m512i raw = _mm512_load_si512((const void *)(qs + 64 * c));
                __m512i lo = _mm512_and_si512(raw, m4);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                /* elements 4c.., then 16 + 4c.. (bytes 2 * element) */
                dot_pairs(acc, 4 * c, 0, S, sub16, T, _mm512_shuffle_epi8(lo, p01), ab + 8 * c,
                          astride);
                dot_pairs(acc, 4 * c + 1, 0, S, sub16, T, _mm512_shuffle_epi8(lo, p23),
                          ab + 8 * c + 4, astride);
                dot_pairs(acc, 4 * c + 2, 1, S, sub16, T, _mm512_shuffle_epi8(hi, p01),
                          ab + 32 + 8 * c, astride);
                dot_pairs(acc, 4 * c + 3, 1, S, sub16, T, _mm512_shuffle_epi8(hi, p23),
                          ab + 36 + 8 * c, astride);
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < nsub; h++) {
            __m512 dw = wscales(w, grp, 0, b, h, nsub, w->pk);
            __m512 mw = _mm512_setzero_ps();
            if (has_min)
                mw = wscales(w, grp, 1, b, h, nsub, w->pk);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                const uint8_t *arow = act + t * astride;
                __m512i isum;
                if (sub16) {
                    isum = acc[t][h * sh];
#pragma GCC unroll 2
                    for (int s = 1; s < sh; s++)
                        isum = _mm512_add_epi32(isum, acc[t][h * sh + s]);
                } else {
                    isum = acc[t][0];
#pragma GCC unroll 4
                    for (int s = 1; s < S; s++)
                        isum = _mm512_add_epi32(isum, acc[t][s]);
                }
                float da;
                memcpy(&da, arow + doff + 4 * b, 4);
                __m512 cc = _mm512_mul_ps(dw, _mm512_set1_ps(da));
                facc[t] = _mm512_fmadd_ps(cc, _mm512_cvtepi32_ps(isum), facc[t]);
                if (has_min) {
                    float dsa;
                    memcpy(&dsa, arow + xoff + 4 * ((size_t)b * nsub + h), 4);
                    facc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dsa), facc[t]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        _mm512_mask_storeu_ps(y + t * ldy, smask, facc[t]);
}

AI void qmatmul_pack(const tdm_bweight_t *w, const uint8_t *act, int64_t n, float *y, int64_t ldy,
                     int64_t g0, int64_t g1, const uint32_t pk)
{
    const size_t astride = tdm_cpu_act_stride(w->k);
    /* Weights stream from memory (decode, big matrices): prefetch about 8 KB
     * ahead (measured at n = 1: from ~60% to ~85% of a plain read's
     * bandwidth on one core). */
    const int64_t pf_groups = w->group_bytes >= 8192 ? 1 : 2;
    { /* the groups that the per-block prefetches do not cover */
        const uint8_t *start = (const uint8_t *)w->data + (size_t)g0 * w->group_bytes;
        size_t len = (size_t)(g1 - g0 < pf_groups ? g1 - g0 : pf_groups) * w->group_bytes;
        for (size_t o = 0; o < len; o += 64)
            _mm_prefetch((const char *)(start + o), _MM_HINT_T0);
    }
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *grp = (const uint8_t *)w->data + (size_t)g * w->group_bytes;
        int64_t nr = w->rows - g * TDM_CPU_RG;
        __mmask16 smask = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
        float *yg = y + g * TDM_CPU_RG;
        /* The group's first tile prefetches the group pf_groups ahead. */
        const uint8_t *pf = g + pf_groups < g1 ? grp + pf_groups * w->group_bytes : NULL;
        int64_t t = 0;
        for (; t + 8 <= n; t += 8) {
            qtile(w, grp, act + t * astride, astride, 8, pk, yg + t * ldy, ldy, smask, pf);
            pf = NULL;
        }
        /* The rest in tiles of 4, 2 and 1 tokens: fewer kernels to compile
         * than one per count, the same bits (tokens are independent). */
        if (n - t >= 4) {
            qtile(w, grp, act + t * astride, astride, 4, pk, yg + t * ldy, ldy, smask, pf);
            pf = NULL;
            t += 4;
        }
        if (n - t >= 2) {
            qtile(w, grp, act + t * astride, astride, 2, pk, yg + t * ldy, ldy, smask, pf);
            pf = NULL;
            t += 2;
        }
        if (n - t >= 1)
            qtile(w, grp, act + t * astride, astride, 1, pk, yg + t * ldy, ldy, smask, pf);
    }
}

/* One function per pack (each with its own constants folded in). */
#define PACK_FN(name, pk)                                                                          \
    static void name(const tdm_bweight_t *w, const uint8_t *act, int64_t n, float *y, int64_t ldy, \
                     int64_t g0, int64_t g1)                                                       \
    {                                                                                              \
        qmatmul_pack(w, act, n, y, ldy, g0, g1, pk);                                               \
    }
TDM_CPU_FOR_EACH_PACK(PACK_FN)

static void qmatmul_avx512(const tdm_bweight_t *w, const uint8_t *act, int64_t n, float *y,
                           int64_t ldy, int64_t g0, int64_t g1)
{
#define PACK_CASE(name, pk)                                                                        \
    case pk: name(w, act, n, y, ldy, g0, g1); break;
    switch (w->pk & TDM_CPU_PK_SHAPE) {
        TDM_CPU_FOR_EACH_PACK(PACK_CASE)
    default: break;
    }
#undef PACK_CASE
}

/* ---- float matmul: R rows x T tokens of 16-lane accumulators ---- */

/* f16: 0 for F32 weights, 1 for F16, 2 for BF16. */
AI __m512 wload(const void *base, int64_t idx, const int f16, __mmask16 m)
{
    if (f16 == 2) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + idx);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (f16)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)base + idx));
    return _mm512_maskz_loadu_ps(m, (const float *)base + idx);
}

AI void ftile(const tdm_bweight_t *w, const float *x, int64_t r, int64_t t, const int R,
              const int T, const int f16, float *y, int64_t ldy)
{
    const int64_t k = w->k;
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int u = 0; u < T; u++)
            acc[i][u] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
        __mmask16 m = k - j >= 16 ? 0xffff : (__mmask16)((1u << (k - j)) - 1);
        __m512 wv[4];
#pragma GCC unroll 4
        for (int i = 0; i < R; i++)
            wv[i] = wload(w->data, (r + i) * k + j, f16, m);
#pragma GCC unroll 4
        for (int u = 0; u < T; u++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + (t + u) * k + j);
#pragma GCC unroll 4
            for (int i = 0; i < R; i++)
                acc[i][u] = _mm512_fmadd_ps(wv[i], xv, acc[i][u]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int u = 0; u < T; u++)
            y[(t + u) * ldy + r + i] = hsum16(acc[i][u]);
}

AI void fmatmul_type(const tdm_bweight_t *w, const float *x, int64_t n, float *y, int64_t ldy,
                     int64_t r0, int64_t r1, const int f16)
{
    /* Prefetch the rows two tiles ahead: at small n the weights stream. */
    const size_t es = f16 != 0 ? 2 : 4, tile_bytes = (size_t)w->k * es * 4;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        if (r + 3 * 4 <= r1) {
            const char *pf = (const char *)w->data + (size_t)(r + 2 * 4) * (size_t)w->k * es;
            for (size_t o = 0; o < tile_bytes; o += 64)
                _mm_prefetch(pf + o, _MM_HINT_T0);
        }
        int64_t t = 0;
        for (; t + 4 <= n; t += 4)
            ftile(w, x, r, t, 4, 4, f16, y, ldy);
        for (; t < n; t++)
            ftile(w, x, r, t, 4, 1, f16, y, ldy);
    }
    for (; r < r1; r++) {
        int64_t t = 0;
        for (; t + 4 <= n; t += 4)
            ftile(w, x, r, t, 1, 4, f16, y, ldy);
        for (; t < n; t++)
            ftile(w, x, r, t, 1, 1, f16, y, ldy);
    }
}

static void fmatmul_avx512(const tdm_bweight_t *w, const float *x, int64_t n, float *y, int64_t ldy,
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

static void act_quant_avx512(int32_t bias, int has_min, const float *x, int64_t k, uint8_t *act)
{
    const int64_t nb = k / TDM_QK;
    const __m512 qlo = _mm512_set1_ps(-TDM_CPU_ACT_QMAX), qhi = _mm512_set1_ps(TDM_CPU_ACT_QMAX);
    for (int64_t b = 0; b < nb; b++) {
        __m512 x0 = _mm512_loadu_ps(x + b * TDM_QK), x1 = _mm512_loadu_ps(x + b * TDM_QK + 16);
        /* maxps(|x|, m) from m = 0: a NaN never gets in, so the lanes' order
         * does not matter. */
        __m512 mx = _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps());
        mx = _mm512_max_ps(_mm512_abs_ps(x1), mx);
        float amax = _mm512_reduce_max_ps(mx);
        float db = amax / TDM_CPU_ACT_QMAX;
        __m512i q0 = _mm512_setzero_si512(), q1 = _mm512_setzero_si512();
        if (db != 0.0f) {
            __m512 dv = _mm512_set1_ps(db);
            __m512 r0 = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(x0, dv), qlo), qhi);
            __m512 r1 = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(x1, dv), qlo), qhi);
            q0 = _mm512_cvt_roundps_epi32(r0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q1 = _mm512_cvt_roundps_epi32(r1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        _mm256_store_si256((__m256i *)(act + b * TDM_CPU_ACT_QBYTES), _mm512_cvtepi32_epi16(q0));
        _mm256_store_si256((__m256i *)(act + b * TDM_CPU_ACT_QBYTES + 32),
                           _mm512_cvtepi32_epi16(q1));
        tdm_cpu_act_aux(act, nb, b, bias, has_min, db, _mm512_reduce_add_epi32(q0),
                        _mm512_reduce_add_epi32(q1));
    }
}

/* ---- row and elementwise ops ---- */

static float sumsq_avx512(const float *x, int64_t d)
{
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
        __mmask16 m = d - j >= 16 ? 0xffff : (__mmask16)((1u << (d - j)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(m, x + j);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return hsum16(acc);
}

static void scale_mul_avx512(const float *x, float scale, const float *w, int64_t d, float *out)
{
    __m512 s = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < d; i += 16) {
        __mmask16 m = d - i >= 16 ? 0xffff : (__mmask16)((1u << (d - i)) - 1);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), s);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i)));
    }
}

static void swiglu_avx512(const float *g, const float *u, int64_t count, float *out)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < count; i += 16) {
        __mmask16 m = count - i >= 16 ? 0xffff : (__mmask16)((1u << (count - i)) - 1);
        __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
        __m512 e = exp16(_mm512_xor_ps(gv, _mm512_set1_ps(-0.0f))); /* -g */
        __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
    }
}

static void add_avx512(float *x, const float *y, int64_t count)
{
    for (int64_t i = 0; i < count; i += 16) {
        __mmask16 m = count - i >= 16 ? 0xffff : (__mmask16)((1u << (count - i)) - 1);
        __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i));
        _mm512_mask_storeu_ps(x + i, m, v);
    }
}

static void to_f16_avx512(const float *x, int64_t count, uint16_t *out)
{
    int64_t i = 0;
    for (; i + 16 <= count; i += 16)
        _mm256_storeu_si256(
            (__m256i *)(out + i),
            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < count; i++)
        out[i] = tdm_f32_to_f16(x[i]);
}

/* ---- attention ---- */

/* tdm_cpu_tree16 of 16 vectors at once (v[i]: position i's 16 lanes;
 * lane i of the result is tdm_cpu_tree16(v[i])) in steps that can run as
 * soon as their positions are done: e adds the halves of positions 2i and
 * 2i + 1, f the quarters of two e's, g the pairs of two f's, h the last
 * step of two g's and puts the lanes in position order. */
AI __m512 tree_e(__m512 a, __m512 b)
{
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
}
AI __m512 tree_f(__m512 a, __m512 b)
{
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
}
AI __m512 tree_g(__m512 a, __m512 b)
{
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}
AI __m512 tree_h(__m512 a, __m512 b)
{
    __m512 h = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(idx, h);
}

/* q.k of one position for one head (K row converted: kv), canonical lanes. */
AI __m512 qk_dot(const float *qh, const __m512 *kv, int nd)
{
    __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int c = 0; c < nd; c++)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), kv[c], a);
    return a;
}

/* Lane 4h (h < 4) = the largest of v[h]'s 16 lanes (without NaNs the
 * order of a max does not matter). */
AI __m512 max4x16(const __m512 v[4])
{
    __m512 a = _mm512_max_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44),
                             _mm512_shuffle_f32x4(v[0], v[1], 0xee));
    __m512 b = _mm512_max_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44),
                             _mm512_shuffle_f32x4(v[2], v[3], 0xee));
    __m512 c = _mm512_max_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
    c = _mm512_max_ps(c, _mm512_permute_ps(c, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_max_ps(c, _mm512_permute_ps(c, _MM_SHUFFLE(2, 3, 0, 1)));
}

/* Lane 4h (h < 4) = tdm_cpu_tree16(v[h]): halves, quarters, pairs. */
AI __m512 sum4x16(const __m512 v[4])
{
    __m512 c = tree_f(tree_e(v[0], v[1]), tree_e(v[2], v[3]));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_add_ps(c, _mm512_permute_ps(c, _MM_SHUFFLE(2, 3, 0, 1)));
}

/* Lane 4h of v in every lane. */
AI __m512 lane4(__m512 v, int h)
{
    return _mm512_permutexvar_ps(_mm512_set1_epi32(4 * h), v);
}

/* Rows to prefetch: n (<= 16) K and V rows at k + off[i], v + off[i],
 * head_dim elements each. */
typedef struct attn_pf {
    const uint16_t *k, *v;
    const int64_t *off;
    int n;
} attn_pf_t;

/* The softmax half of one chunk of nv (<= 16) positions for HG (<= 4)
 * query heads of one kv head, in the canonical arithmetic of
 * tdm_cpu_attn_scalar. q: the first head's q (heads hd apart); off: the
 * chunk's K rows (16 of them: rows past nv repeat a valid one, their
 * lanes become -inf); m and l: the heads' running max and sum in lanes
 * 4h; leaves p (the chunk's weights) in pr and alpha in lanes 4h; pf: K
 * and V rows to prefetch, two per pair of positions (spread out: a burst
 * of prefetches fills the L1 miss buffers and stalls the loads behind
 * it, measured 1.7x slower at 32 rows x 128 positions from DRAM).
 * Each K row is converted once, by pairs of positions, and used by every
 * head; the heads' tree sums advance as their positions complete. The
 * heads' maxima, alphas (no branch: alpha = exp(m - mc) is exactly 1 when
 * the max did not change) and sums are computed side by side in lanes. */
AI void attn_softmax(const float *q, const uint16_t *ck, const int64_t *off, int64_t hd, int nv,
                     float scale, __m512 *m, __m512 *l, float pr[][TDM_CPU_CHUNK], __m512 *alpha,
                     const attn_pf_t *pf, const int ND, const int HG)
{
    const int nd = ND ? ND : (int)(hd / 16);
    const __mmask16 valid = (__mmask16)((1u << nv) - 1);
    __m512 sv[4], g[4][2], f[4][2], e[4][2];
#pragma GCC unroll 2
    for (int i8 = 0; i8 < 2; i8++) {
#pragma GCC unroll 2
        for (int i4 = 0; i4 < 2; i4++) {
#pragma GCC unroll 2
            for (int i2 = 0; i2 < 2; i2++) {
                const int i = 8 * i8 + 4 * i4 + 2 * i2;
                /* GCC would hoist all 16 rows' loads here and spill
                 * them; a base it cannot see through keeps them here. */
                const uint16_t *kb = ck;
                __asm__ volatile("" : "+r"(kb));
                for (int r = i; r < i + 2 && r < pf->n; r++)
                    for (int64_t o = 0; o < hd * 2; o += 64) {
                        _mm_prefetch((const char *)(pf->k + pf->off[r]) + o, _MM_HINT_T0);
                        _mm_prefetch((const char *)(pf->v + pf->off[r]) + o, _MM_HINT_T0);
                    }
                __m512 k0[TDM_CPU_MAX_HD / 16], k1[TDM_CPU_MAX_HD / 16];
                if (!ND) /* a runtime nd: GCC cannot see that k stays within it */
                    for (int c = 0; c < TDM_CPU_MAX_HD / 16; c++)
                        k0[c] = k1[c] = _mm512_setzero_ps();
#pragma GCC unroll 16
                for (int c = 0; c < nd; c++) {
                    k0[c] = _mm512_cvtph_ps(
                        _mm256_loadu_si256((const __m256i *)(kb + off[i] + 16 * c)));
                    k1[c] = _mm512_cvtph_ps(
                        _mm256_loadu_si256((const __m256i *)(kb + off[i + 1] + 16 * c)));
                }
#pragma GCC unroll 4
                for (int h = 0; h < HG; h++)
                    e[h][i2] = tree_e(qk_dot(q + h * hd, k0, nd), qk_dot(q + h * hd, k1, nd));
            }
#pragma GCC unroll 4
            for (int h = 0; h < HG; h++)
                f[h][i4] = tree_f(e[h][0], e[h][1]);
        }
#pragma GCC unroll 4
        for (int h = 0; h < HG; h++)
            g[h][i8] = tree_g(f[h][0], f[h][1]);
    }
#pragma GCC unroll 4
    for (int h = 0; h < 4; h++)
        sv[h] = h < HG ? _mm512_mask_blend_ps(
                             valid, _mm512_set1_ps(-INFINITY),
                             _mm512_mul_ps(tree_h(g[h][0], g[h][1]), _mm512_set1_ps(scale)))
                       : _mm512_set1_ps(-INFINITY);
    const __m512 mc = _mm512_max_ps(max4x16(sv), *m);
    *alpha = exp16(_mm512_sub_ps(*m, mc));
    *m = mc;
    __m512 pv[4];
#pragma GCC unroll 4
    for (int h = 0; h < 4; h++) {
        pv[h] = h < HG ? exp16(_mm512_sub_ps(sv[h], lane4(mc, h))) : _mm512_setzero_ps();
        if (h < HG)
            _mm512_store_ps(pr[h], pv[h]);
    }
    *l = _mm512_add_ps(_mm512_mul_ps(*l, *alpha), sum4x16(pv));
}

/* The P.V half: acc = acc * alpha, then acc += p_i * v_i for the chunk's
 * positions in order; position by position for all HG heads at once
 * (HG * ND independent FMA chains: one head alone has too few to hide the
 * FMA latency). */
AI void attn_pv(const uint16_t *cv, const int64_t *off, int64_t hd, int nv,
                const float pr[][TDM_CPU_CHUNK], __m512 alpha, float *acc, const int ND,
                const int HG)
{
    if (ND) {
        __m512 a[4][TDM_CPU_MAX_HD / 16];
#pragma GCC unroll 4
        for (int h = 0; h < HG; h++)
#pragma GCC unroll 16
            for (int64_t c = 0; c < ND; c++)
                a[h][c] = _mm512_mul_ps(_mm512_load_ps(acc + h * hd + 16 * c), lane4(alpha, h));
        for (int i = 0; i < nv; i++) {
            __m512 vv[TDM_CPU_MAX_HD / 16];
#pragma GCC unroll 16
            for (int64_t c = 0; c < ND; c++)
                vv[c] =
                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(cv + off[i] + 16 * c)));
#pragma GCC unroll 4
            for (int h = 0; h < HG; h++) {
                __m512 pb = _mm512_set1_ps(pr[h][i]);
#pragma GCC unroll 16
                for (int64_t c = 0; c < ND; c++)
                    a[h][c] = _mm512_fmadd_ps(pb, vv[c], a[h][c]);
            }
        }
#pragma GCC unroll 4
        for (int h = 0; h < HG; h++)
#pragma GCC unroll 16
            for (int64_t c = 0; c < ND; c++)
                _mm512_store_ps(acc + h * hd + 16 * c, a[h][c]);
    } else {
        for (int64_t c = 0; c < hd / 16; c++) {
            __m512 a = _mm512_mul_ps(_mm512_load_ps(acc + 16 * c), lane4(alpha, 0));
            for (int i = 0; i < nv; i++)
                a = _mm512_fmadd_ps(
                    _mm512_set1_ps(pr[0][i]),
                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(cv + off[i] + 16 * c))),
                    a);
            _mm512_store_ps(acc + 16 * c, a);
        }
    }
}

/* Query heads [h0, h1) of row t: a part of one kv head's group, or whole
 * groups of consecutive kv heads; ng heads per kv head, HG of them at a
 * time (ng is a multiple of HG). K and V are converted from f16 where
 * they are used; per position the item's kv heads are adjacent in the
 * cache, so whole rows read memory in order. Software-pipelined: the
 * softmax half of chunk c + 1 comes before the P.V half of chunk c in
 * program order, so that the out-of-order core has the one's independent
 * work beside the other's dependency chains. */
AI void attn_core(const tdm_attn_params_t *p, const float *q, const uint16_t *ck,
                  const uint16_t *cv, float *out, int64_t t, int32_t h0, int32_t h1, int64_t tn,
                  int32_t hn0, const int ND, const int HG)
{
    const int64_t hd = p->head_dim;
    const int32_t grp = p->n_heads / p->n_kv_heads;
    const int32_t ng = h1 - h0 < grp ? h1 - h0 : grp, nkv = (h1 - h0) / ng;
    const int32_t kv0 = h0 / grp;
    const int64_t ctx = p->ctx_len[t];
    const int32_t *table = p->block_tables + (int64_t)p->table_of_row[t] * p->bt_stride;
    const float *qrow = q + (t * p->n_heads + h0) * hd;
    float *orow = out + (t * p->n_heads + h0) * hd;
    _Alignas(64) float acc[TDM_CPU_MAX_HEADS_G * TDM_CPU_MAX_HD];
    _Alignas(64) float pr[2][TDM_CPU_MAX_HEADS_G][TDM_CPU_CHUNK];
    /* per group of HG heads: max and sum in lanes 4h, and the alphas of
     * the last two chunks */
    __m512 m[TDM_CPU_MAX_HEADS_G], l[TDM_CPU_MAX_HEADS_G], alpha[2][TDM_CPU_MAX_HEADS_G];
    int64_t off[3][TDM_CPU_CHUNK];
    for (int32_t h = 0; h < h1 - h0; h++) {
        m[h] = _mm512_set1_ps(-INFINITY);
        l[h] = _mm512_setzero_ps();
        for (int64_t j = 0; j < hd; j++)
            acc[h * hd + j] = 0.0f;
    }
    int nv_prev = 0;
    for (int64_t c0 = 0, ci = 0; c0 < ctx + TDM_CPU_CHUNK; c0 += TDM_CPU_CHUNK, ci++) {
        const int cur = (int)(ci & 1), prev = cur ^ 1;
        const int nv = c0 >= ctx ? 0 : ctx - c0 < TDM_CPU_CHUNK ? (int)(ctx - c0) : TDM_CPU_CHUNK;
        if (nv > 0) {
            tdm_cpu_kv_rows(p, table, c0, nv, kv0, off[cur]);
            for (int i = nv; i < TDM_CPU_CHUNK; i++)
                off[cur][i] = off[cur][0];
            /* K and V rows come from memory (a long or cold cache): the
             * chunk TDM_CPU_ATTN_PF ahead, or past the end the next
             * item's first chunks, are prefetched while this one runs. */
            int64_t pt = t, pc = c0 + TDM_CPU_ATTN_PF * TDM_CPU_CHUNK;
            int32_t pkv = kv0;
            if (pc >= ctx) {
                pc -= (ctx + TDM_CPU_CHUNK - 1) / TDM_CPU_CHUNK * TDM_CPU_CHUNK;
                pt = tn;
                pkv = hn0 / grp;
            }
            int npf = 0;
            if (pt >= 0 && pc < p->ctx_len[pt]) {
                npf = p->ctx_len[pt] - pc < TDM_CPU_CHUNK ? (int)(p->ctx_len[pt] - pc)
                                                          : TDM_CPU_CHUNK;
                tdm_cpu_kv_rows(p, p->block_tables + (int64_t)p->table_of_row[pt] * p->bt_stride,
                                pc, npf, pkv, off[2]);
            }
            for (int32_t j = 0; j < nkv; j++)
                for (int32_t hs = 0; hs < ng; hs += HG) {
                    /* the first group of each kv head prefetches its rows */
                    const attn_pf_t pf = {ck + j * hd, cv + j * hd, off[2], hs == 0 ? npf : 0};
                    attn_softmax(qrow + (j * ng + hs) * hd, ck + j * hd, off[cur], hd, nv, p->scale,
                                 &m[(j * ng + hs) / HG], &l[(j * ng + hs) / HG],
                                 pr[cur] + j * ng + hs, &alpha[cur][(j * ng + hs) / HG], &pf, ND,
                                 HG);
                }
        }
        if (nv_prev > 0)
            for (int32_t j = 0; j < nkv; j++)
                for (int32_t hs = 0; hs < ng; hs += HG)
                    attn_pv(cv + j * hd, off[prev], hd, nv_prev, pr[prev] + j * ng + hs,
                            alpha[prev][(j * ng + hs) / HG], acc + (j * ng + hs) * hd, ND, HG);
        nv_prev = nv;
    }
    for (int32_t h = 0; h < h1 - h0; h++) {
        float *oh = orow + h * hd;
        const __m512 lh = lane4(l[h / HG], h % HG);
        for (int64_t c = 0; c < hd / 16; c++) {
            __m512 o = ctx > 0 ? _mm512_div_ps(_mm512_load_ps(acc + h * hd + 16 * c), lh)
                               : _mm512_setzero_ps();
            _mm512_storeu_ps(oh + 16 * c, o);
        }
    }
}

/* The largest of 4, 3, 2, 1 heads that divides nh with at most 16
 * accumulator registers (HG * head_dim / 16). */
static int attn_heads_together(int32_t nh, int nd)
{
    for (int g = 4; g > 1; g--)
        if (nh % g == 0 && g * nd <= 16)
            return g;
    return 1;
}

static void attn_avx512(const tdm_attn_params_t *p, const float *q, const uint16_t *ck,
                        const uint16_t *cv, float *out, int64_t t, int32_t h0, int32_t h1,
                        int64_t tn, int32_t hn0)
{
    const int64_t hd = p->head_dim;
    const int32_t grp = p->n_heads / p->n_kv_heads, ng = h1 - h0 < grp ? h1 - h0 : grp;
    if (hd % 16 != 0 || hd > TDM_CPU_MAX_HD || h1 - h0 > TDM_CPU_MAX_HEADS_G) {
        tdm_cpu_attn_scalar(p, q, ck, cv, out, t, h0, h1, tn, hn0);
    } else if (hd == 64) {
        switch (attn_heads_together(ng, 4)) {
        case 4: attn_core(p, q, ck, cv, out, t, h0, h1, tn, hn0, 4, 4); break;
        case 3: attn_core(p, q, ck, cv, out, t, h0, h1, tn, hn0, 4, 3); break;
        case 2: attn_core(p, q, ck, cv, out, t, h0, h1, tn, hn0, 4, 2); break;
        default: attn_core(p, q, ck, cv, out, t, h0, h1, tn, hn0, 4, 1); break;
        }
    } else if (hd == 128) {
        if (attn_heads_together(ng, 8) == 2)
            attn_core(p, q, ck, cv, out, t, h0, h1, tn, hn0, 8, 2);
        else
            attn_core(p, q, ck, cv, out, t, h0, h1, tn, hn0, 8, 1);
    } else {
        attn_core(p, q, ck, cv, out, t, h0, h1, tn, hn0, 0, 1);
    }
}

const tdm_cpu_kernels_t tdm_cpu_kernels_avx512 = {
    .qmatmul = qmatmul_avx512,
    .fmatmul = fmatmul_avx512,
    .act_quant = act_quant_avx512,
    .sumsq = sumsq_avx512,
    .scale_mul = scale_mul_avx512,
    .swiglu = swiglu_avx512,
    .add = add_avx512,
    .to_f16 = to_f16_avx512,
    .attn = attn_avx512,
};
