/* tandem CPU backend: the AVX2 quantized matmul, included by ops_avx2.c
 * (without AVX-VNNI) and ops_avxvnni.c (with it), each compiled with its
 * own ISA flags. QMATMUL_FN(name, vnni) defines the table's qmatmul. */
#ifndef TANDEM_QMATMUL_AVX2_H
#define TANDEM_QMATMUL_AVX2_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_internal.h"

#ifndef AI
#define AI static inline __attribute__((always_inline))
#endif

AI int32_t load32(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

AI float loadf(const void *p)
{
    float v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- quantized matmul ----
 * A tile is 8 rows (half h of a packed group of 16) times T tokens. Each
 * 32-byte half chunk (8 rows x 4 packed bytes) is widened in registers to
 * u16 pairs by in-lane vpshufb (row r stays in dword lane r) and used for
 * all T tokens: with AVX-VNNI vpdpwssd, without it vpmaddwd + vpaddd,
 * which give the same exact int32 lanes (vpmaddwd cannot saturate: the
 * weights are at most 255 and |q| <= 32767). With few tokens a token's
 * products rotate over S accumulators (shorter dependency chains). */

/* In-lane byte shuffles: row r's bytes (b0, b1) and (b2, b3) as u16 pairs. */
AI __m256i pairs01(void)
{
    return _mm256_broadcastsi128_si256(
        _mm_setr_epi8(0, -128, 1, -128, 4, -128, 5, -128, 8, -128, 9, -128, 12, -128, 13, -128));
}

AI __m256i pairs23(void)
{
    return _mm256_broadcastsi128_si256(
        _mm_setr_epi8(2, -128, 3, -128, 6, -128, 7, -128, 10, -128, 11, -128, 14, -128, 15, -128));
}

AI __m256i dp_s16(__m256i acc, __m256i w, __m256i a, const int vnni)
{
#ifdef __AVXVNNI__
    if (vnni)
        return _mm256_dpwssd_avx_epi32(acc, w, a);
#else
    (void)vnni;
#endif
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, a));
}

/* Pair vector j of a block (8 rows x 2 u16) times the 2 activations at ap
 * (+ t * astride for token t), into its accumulator of each token. */
AI void dot_pairs(__m256i acc[4][4], int j, int hf, const int S, const int sub16, const int T,
                  const int vnni, __m256i wv, const uint8_t *ap, size_t astride)
{
    const int s = tdm_cpu_acc_slot(j, hf, S, sub16);
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
        acc[t][s] = dp_s16(acc[t][s], wv, _mm256_set1_epi32(load32(ap + t * astride)), vnni);
}

/* Rows 8h..8h+7's scales (m = 0) or mins (m = 1) of block b, half hf:
 * f16, f32, or int8 times the f32 super-scale (an exact product). */
AI __m256 wscales(const tdm_bweight_t *w, const uint8_t *grp, int m, int64_t b, int hf, int h,
                  const int nsub, uint32_t pk)
{
    const size_t si = ((size_t)b * nsub + hf) * TDM_CPU_RG + 8 * (size_t)h;
    const uint8_t *t = grp + (m ? w->m_off : w->d_off);
    if (pk & TDM_CPU_PK_SC8) {
        const uint8_t *sp =
            grp + (m ? w->t_off : w->s_off) + 4 * ((size_t)(b / 8) * TDM_CPU_RG + 8 * (size_t)h);
        __m256i k = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(t + si)));
        return _mm256_mul_ps(_mm256_loadu_ps((const float *)sp), _mm256_cvtepi32_ps(k));
    }
    if (pk & TDM_CPU_PK_SC32)
        return _mm256_load_ps((const float *)(t + 4 * si));
    return _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(t + 2 * si)));
}

AI void qtile(const tdm_bweight_t *w, const uint8_t *grp, int h, const uint8_t *act, size_t astride,
              const int T, const uint32_t pk, const int vnni, float *y, int64_t ldy, int64_t nvalid,
              const uint8_t *pf)
{
    /* pf: a later group to prefetch, one block's share of lines per block. */
    const size_t pf_step = w->group_bytes / (size_t)w->nb;
    const int64_t nb = w->nb;
    const int nib = (pk & TDM_CPU_PK_NIB) != 0, has_min = (pk & TDM_CPU_PK_MIN) != 0;
    const int sub16 = (pk & TDM_CPU_PK_SUB16) != 0;
    const int nsub = sub16 ? 2 : 1;
    const int S = T == 1 ? 4 : T == 2 ? 2 : 1;
    const int sh = sub16 ? (S >= 2 ? S / 2 : 1) : S; /* accumulators per half */
    const __m256i m4 = _mm256_set1_epi8(0x0f), p01 = pairs01(), p23 = pairs23();
    const size_t qbytes = nib ? 256 : 512;
    const size_t doff = TDM_CPU_ACT_D(nb);
    const size_t xoff = sub16 ? TDM_CPU_ACT_AUX16(nb) : TDM_CPU_ACT_AUX(nb);
    __m256 facc[4];
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
        facc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qs = grp + (size_t)b * qbytes + 32 * h;
        const uint8_t *ab = act + (size_t)b * TDM_CPU_ACT_QBYTES; /* int16 q[32] */
        if (pf != NULL)
            for (size_t o = (size_t)b * pf_step & ~(size_t)63; o < (size_t)(b + 1) * pf_step;
                 o += 64)
                _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
        __m256i acc[4][4];
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++)
                acc[t][s] = _mm256_setzero_si256();
            if (!has_min)
#pragma GCC unroll 2
                for (int hf = 0; hf < nsub; hf++)
                    acc[t][hf * sh] = _mm256_set1_epi32(
                        load32(act + t * astride + xoff + 4 * ((size_t)b * nsub + hf)));
        }
        if (!nib) {
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                __m256i raw = _mm256_load_si256((const __m256i *)(qs + 64 * c));
                dot_pairs(acc, 2 * c, c / 4, S, sub16, T, vnni, _mm256_shuffle_epi8(raw, p01),
                          ab + 8 * c, astride);
                dot_pairs(acc, 2 * c + 1, c / 4, S, sub16, T, vnni, _mm256_shuffle_epi8(raw, p23),
                          ab + 8 * c + 4, astride);
            }
        } else {
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                __m256i raw = _mm256_load_si256((const __m256i *)(qs + 64 * c));
                __m256i lo = _mm256_and_si256(raw, m4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                /* elements 4c.., then 16 + 4c.. (bytes 2 * element) */
                dot_pairs(acc, 4 * c, 0, S, sub16, T, vnni, _mm256_shuffle_epi8(lo, p01),
                          ab + 8 * c, astride);
                dot_pairs(acc, 4 * c + 1, 0, S, sub16, T, vnni, _mm256_shuffle_epi8(lo, p23),
                          ab + 8 * c + 4, astride);
                dot_pairs(acc, 4 * c + 2, 1, S, sub16, T, vnni, _mm256_shuffle_epi8(hi, p01),
                          ab + 32 + 8 * c, astride);
                dot_pairs(acc, 4 * c + 3, 1, S, sub16, T, vnni, _mm256_shuffle_epi8(hi, p23),
                          ab + 36 + 8 * c, astride);
            }
        }
#pragma GCC unroll 2
        for (int hf = 0; hf < nsub; hf++) {
            __m256 dw = wscales(w, grp, 0, b, hf, h, nsub, w->pk);
            __m256 mw = _mm256_setzero_ps();
            if (has_min)
                mw = wscales(w, grp, 1, b, hf, h, nsub, w->pk);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                const uint8_t *arow = act + t * astride;
                __m256i isum;
                if (sub16) {
                    isum = acc[t][hf * sh];
#pragma GCC unroll 2
                    for (int s = 1; s < sh; s++)
                        isum = _mm256_add_epi32(isum, acc[t][hf * sh + s]);
                } else {
                    isum = acc[t][0];
#pragma GCC unroll 4
                    for (int s = 1; s < S; s++)
                        isum = _mm256_add_epi32(isum, acc[t][s]);
                }
                __m256 cc = _mm256_mul_ps(dw, _mm256_set1_ps(loadf(arow + doff + 4 * b)));
                facc[t] = _mm256_fmadd_ps(cc, _mm256_cvtepi32_ps(isum), facc[t]);
                if (has_min)
                    facc[t] = _mm256_fmadd_ps(
                        mw, _mm256_set1_ps(loadf(arow + xoff + 4 * ((size_t)b * nsub + hf))),
                        facc[t]);
            }
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) {
        if (nvalid >= 8) {
            _mm256_storeu_ps(y + t * ldy, facc[t]);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, facc[t]);
            memcpy(y + t * ldy, tmp, (size_t)nvalid * sizeof(float));
        }
    }
}

AI void qmatmul_pack(const tdm_bweight_t *w, const uint8_t *act, int64_t n, float *y, int64_t ldy,
                     int64_t g0, int64_t g1, const uint32_t pk, const int vnni)
{
    const size_t astride = tdm_cpu_act_stride(w->k);
    /* Weights stream from memory (decode, big matrices): prefetch about 8 KB
     * ahead. */
    const int64_t pf_groups = w->group_bytes >= 8192 ? 1 : 2;
    {
        const uint8_t *start = (const uint8_t *)w->data + (size_t)g0 * w->group_bytes;
        size_t len = (size_t)(g1 - g0 < pf_groups ? g1 - g0 : pf_groups) * w->group_bytes;
        for (size_t o = 0; o < len; o += 64)
            _mm_prefetch((const char *)(start + o), _MM_HINT_T0);
    }
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *grp = (const uint8_t *)w->data + (size_t)g * w->group_bytes;
        const int64_t nr = w->rows - g * TDM_CPU_RG;
        for (int h = 0; h < 2 && nr > 8 * h; h++) {
            float *yg = y + g * TDM_CPU_RG + 8 * h;
            const int64_t nvalid = nr - 8 * h;
            /* The group's first tile prefetches the group pf_groups ahead. */
            const uint8_t *pf =
                h == 0 && g + pf_groups < g1 ? grp + pf_groups * w->group_bytes : NULL;
            int64_t t = 0;
            for (; t + 4 <= n; t += 4) {
                qtile(w, grp, h, act + t * astride, astride, 4, pk, vnni, yg + t * ldy, ldy, nvalid,
                      pf);
                pf = NULL;
            }
            /* the rest in tiles of 2 and 1 (fewer kernels to compile; the
             * same bits: tokens are independent) */
            if (n - t >= 2) {
                qtile(w, grp, h, act + t * astride, astride, 2, pk, vnni, yg + t * ldy, ldy, nvalid,
                      pf);
                pf = NULL;
                t += 2;
            }
            if (n - t >= 1)
                qtile(w, grp, h, act + t * astride, astride, 1, pk, vnni, yg + t * ldy, ldy, nvalid,
                      pf);
        }
    }
}

/* QMATMUL_FN(storage, name): one function per pack, then the table's
 * qmatmul `name` that picks it; QMATMUL_VNNI says whether to use AVX-VNNI. */
#define QMATMUL_PACK_FN(fname, pk)                                                                 \
    static void fname(const tdm_bweight_t *w, const uint8_t *act, int64_t n, float *y,             \
                      int64_t ldy, int64_t g0, int64_t g1)                                         \
    {                                                                                              \
        qmatmul_pack(w, act, n, y, ldy, g0, g1, pk, QMATMUL_VNNI);                                 \
    }
#define QMATMUL_PACK_CASE(fname, pk)                                                               \
    case pk:                                                                                       \
        fname(w, act, n, y, ldy, g0, g1);                                                          \
        break;
#define QMATMUL_FN(storage, name)                                                                  \
    TDM_CPU_FOR_EACH_PACK(QMATMUL_PACK_FN)                                                         \
    storage void name(const tdm_bweight_t *w, const uint8_t *act, int64_t n, float *y,             \
                      int64_t ldy, int64_t g0, int64_t g1)                                         \
    {                                                                                              \
        switch (w->pk & TDM_CPU_PK_SHAPE) {                                                        \
            TDM_CPU_FOR_EACH_PACK(QMATMUL_PACK_CASE)                                               \
        default: break;                                                                            \
        }                                                                                          \
    }

#endif
