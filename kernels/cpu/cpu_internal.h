/* tandem CPU backend internals: packed weight and activation layouts, the
 * canonical arithmetic every ISA reproduces bit for bit, and the per-ISA
 * kernel table.
 *
 * Canonical arithmetic (the scalar code in ops_scalar.c is the oracle; the
 * AVX2 and AVX-512 kernels do the same operations in the same order):
 *
 * - Quantized matmul, per output y[t][r]: acc = 0; for each 32-block b in
 *   increasing order, and within it each sub-block h of the weight's
 *   scales (one of 32 elements, or two of 16): isum = corr + sum_i
 *   wq[r][i] * aq[t][i] over the sub-block's elements (exact int32: wq is
 *   the packed unsigned code, at most 255, |aq| <= 32767, and the
 *   correction is at most 128 * 32767 * 32, so |isum| < 2^29 whatever the
 *   order of the terms), then
 *       acc = fmaf(dw[r][b][h] * da[t][b], (float)isum, acc)
 *   and for weights with mins also acc = fmaf(mw[r][b][h], dsa, acc).
 *   corr = -bias * sum(aq) over the sub-block (bias of the type's integer
 *   form, tandem/qform.h: 8 for Q4_0, 128 for Q8_0, ...), 0 with mins,
 *   whose dsa = da[t][b] * (float)sum(aq). The activation row carries both
 *   per 32-block and per 16-half (see below).
 *   The SIMD kernels widen the packed bytes to 16 bits in registers and
 *   use vpdpwssd (AVX-512 VNNI, AVX-VNNI) or vpmaddwd + vpaddd (plain
 *   AVX2): the same exact isum, since integer sums do not round.
 * - Float matmul, rmsnorm's sum of squares and attention's q.k: 16 lanes;
 *   lane l accumulates elements j = l (mod 16) in increasing j with fmaf
 *   (missing tail elements count as fmaf(0, 0, acc)), then tdm_cpu_tree16.
 * - exp: tdm_cpu_expf below, in every ISA; no libm in kernels.
 * - Activation quantization per 32-block, to 16 bits (8 bits lose too much
 *   on models with outlier activations): amax = maxps(|x|, amax) over the
 *   block from 0 (a NaN element does not count), d = amax / 32767, and
 *   q = nearest-even(minps(maxps(x / d, -32767), 32767)) (a NaN x / d
 *   gives -32767; never -32768), or q = 0 for the whole block when d == 0.
 * - rmsnorm: scale = 1 / sqrtf(sumsq / d + eps), out = (x * scale) * w.
 * - swiglu: out = (g / (1 + exp(-g))) * u.
 * - Attention per (row, head): chunks of 16 positions in increasing order,
 *   online softmax with an unconditional rescale (see ops_scalar.c
 *   attn_head); how the heads of a row share K and V rows, and in which
 *   order their independent steps run, is each ISA's choice.
 * - rope, embed, gather: shared scalar code in cpu_backend.c for every ISA.
 * Thread splits and tilings only decide who computes an element, never how,
 * so results do not depend on n, the batch's other rows or the threads. */
#ifndef TANDEM_KERNELS_CPU_INTERNAL_H
#define TANDEM_KERNELS_CPU_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tandem/dtype.h"
#include "tandem/kernels.h"
#include "tandem/qform.h"

#define TDM_CPU_RG          16  /* rows per packed group of a quantized weight */
#define TDM_CPU_LANES       16  /* canonical float lanes */
#define TDM_CPU_CHUNK       16  /* attention positions per softmax chunk */
#define TDM_CPU_ATTN_PF     2   /* attention prefetches this many chunks ahead */
#define TDM_CPU_MAX_HD      256 /* largest head_dim the SIMD attention takes */
#define TDM_CPU_MAX_HEADS_G 16  /* most query heads of one attention work item */

/* How a quantized weight is packed (tdm_bweight.pk): from its type's
 * integer form (tandem/qform.h). */
#define TDM_CPU_PK_NIB   1u  /* 4-bit codes (else one byte each) */
#define TDM_CPU_PK_MIN   2u  /* a min per scale */
#define TDM_CPU_PK_SC32  4u  /* scales and mins as f32 (else f16) */
#define TDM_CPU_PK_SUB16 8u  /* a scale per 16 elements (else per 32) */
#define TDM_CPU_PK_SC8   16u /* int8 sub-scales (and mins) times f32 per 256 elements */

/* A weight as the CPU backend keeps it.
 *
 * F32/F16/BF16: the caller's [rows][k] data, not copied.
 * Quantized types: groups of 16 rows (the last one padded with zero rows),
 * group g at packed + g * group_bytes (64-byte aligned), laid out as
 *   NIB: qs [nb][4 chunks][16 rows][4 bytes]: chunk c of row i holds the
 *       codes of elements 4c..4c+3 in the low nibbles and 16+4c..16+4c+3
 *       in the high nibbles (for Q4_0/Q4_1 the GGUF bytes qs[4c..4c+3]);
 *   bytes: qs [nb][8 chunks][16 rows][4 bytes], elements 4c..4c+3;
 *   then the scales [nb][S][16] at d_off (S = 2 with SUB16, else 1; f16,
 *   f32 with SC32, int8 with SC8) and, with MIN, the mins in the same shape
 *   at m_off. With SC8 the f32 super-scales [nb / 8][16] follow at s_off
 *   (d) and t_off (-dmin): a scale is d * (float)k, a min -dmin * (float)k,
 *   products that are exact in f32 (an f16 times |k| < 128), so kernels
 *   form them in registers and get the integer form's bits. The codes are
 *   the integer form's u (code + bias).
 * One 64-byte chunk is one zmm (or two ymm): 16 rows x 4 bytes; an in-lane
 * byte shuffle makes it two zmm of 16 rows x 2 u16 (elements 4c, 4c+1 and
 * 4c+2, 4c+3), the shape vpdpwssd wants with a broadcast of 2 activations. */
struct tdm_bweight {
    uint32_t wtype;
    int64_t rows, k;
    int64_t nb;          /* 32-blocks per row (quantized) */
    int64_t n_groups;    /* ceil(rows / 16) (quantized) */
    uint32_t pk;         /* TDM_CPU_PK_* (quantized) */
    int32_t bias;        /* of the integer form (for embed) */
    size_t group_bytes;  /* stride between packed groups */
    size_t d_off, m_off; /* offsets of the scales and mins in a group */
    size_t s_off, t_off; /* SC8: of the super-scales d and -dmin */
    const void *data;    /* F32/F16/BF16 rows, or the packed groups */
    void *owned;         /* what weight_free frees (the packed groups) */
};

/* The flags that shape a kernel's inner loop; how scales are stored (f16,
 * SC32, SC8) is a branch per block instead, so that there are fewer
 * kernels to compile. */
#define TDM_CPU_PK_SHAPE (TDM_CPU_PK_NIB | TDM_CPU_PK_MIN | TDM_CPU_PK_SUB16)

/* Every shape some type has, for the SIMD kernels' one function per
 * shape: X(name, shape). Q4_0; Q4_1 and Q4_K; Q8_0, Q5_0, IQ4_NL and
 * IQ4_XS; Q5_1 and Q5_K; Q6_K; Q3_K; Q2_K. */
#define TDM_CPU_FOR_EACH_PACK(X)                                                                   \
    X(qmm_pk1, 1)                                                                                  \
    X(qmm_pk3, 3)                                                                                  \
    X(qmm_pk0, 0)                                                                                  \
    X(qmm_pk2, 2)                                                                                  \
    X(qmm_pk8, 8)                                                                                  \
    X(qmm_pk9, 9)                                                                                  \
    X(qmm_pk11, 11)

/* The SIMD kernels' accumulator of pair vector j (in half hf of a block)
 * of a token with S accumulators: with one scale per block the pairs
 * rotate over all S; with one per half each half has its own S / 2 (at
 * least 1). Integer sums are exact, so this only shortens dependency
 * chains. */
static inline int tdm_cpu_acc_slot(int j, int hf, int S, int sub16)
{
    if (!sub16)
        return j % S;
    const int sh = S >= 2 ? S / 2 : 1;
    return hf * sh + j % sh;
}

/* Scale (m = 0) or min (m = 1) h of block b of row i of a packed group. */
static inline float tdm_cpu_wscale(const tdm_bweight_t *w, const uint8_t *grp, int m, int64_t b,
                                   int h, int64_t i)
{
    const int nsub = w->pk & TDM_CPU_PK_SUB16 ? 2 : 1;
    const size_t si = (size_t)((b * nsub + h) * TDM_CPU_RG + i);
    const uint8_t *t = grp + (m ? w->m_off : w->d_off);
    if (w->pk & TDM_CPU_PK_SC8) {
        float sup;
        memcpy(&sup, grp + (m ? w->t_off : w->s_off) + 4 * (size_t)((b / 8) * TDM_CPU_RG + i), 4);
        return sup * (float)(int8_t)t[si];
    }
    if (w->pk & TDM_CPU_PK_SC32) {
        float v;
        memcpy(&v, t + 4 * si, 4);
        return v;
    }
    uint16_t hv;
    memcpy(&hv, t + 2 * si, 2);
    return tdm_f16_to_f32(hv);
}

/* The pack of a quantized type and its bias; 0 for types not packed. The
 * types without f16 scales get SC8 (pack_weight falls back to SC32 when a
 * weight's scales are not its super-scale times an integer). */
static inline int tdm_cpu_pack_of(uint32_t wtype, uint32_t *pk, int32_t *bias)
{
    tdm_qform_t f;
    if (!tdm_qform_of(wtype, &f))
        return 0;
    *pk = (f.nib ? TDM_CPU_PK_NIB : 0) | (f.has_min ? TDM_CPU_PK_MIN : 0) |
          (f.f16 ? 0 : TDM_CPU_PK_SC8) | (f.sub == 16 ? TDM_CPU_PK_SUB16 : 0);
    *bias = f.bias;
    return 1;
}

#define TDM_CPU_ACT_QMAX   32767.0f /* largest |q| of a quantized activation */
#define TDM_CPU_ACT_QBYTES 64       /* bytes of q per 32-block: int16 */

/* Quantized activation row, stride tdm_cpu_act_stride(k) bytes (a multiple
 * of 64): int16 q[nb][32] (64-byte aligned blocks), then f32 d[nb], then
 * aux[nb], then aux16[nb][2] (the same per half of 16 elements), each
 * 4 bytes: int32 corr for weights without mins, f32 dsa for weights with
 * them (see above; written by tdm_cpu_act_aux for the weight type). */
static inline size_t tdm_cpu_act_stride(int64_t k)
{
    size_t nb = (size_t)(k / TDM_QK);
    return (nb * (TDM_CPU_ACT_QBYTES + 16) + 63) & ~(size_t)63;
}

/* The byte offsets of d, aux and aux16 in an activation row. */
#define TDM_CPU_ACT_D(nb)     ((size_t)(nb)*TDM_CPU_ACT_QBYTES)
#define TDM_CPU_ACT_AUX(nb)   ((size_t)(nb) * (TDM_CPU_ACT_QBYTES + 4))
#define TDM_CPU_ACT_AUX16(nb) ((size_t)(nb) * (TDM_CPU_ACT_QBYTES + 8))

/* What act_quant needs of the weight type: its bias and whether it has
 * mins (-1: not a quantized type). */
static inline int32_t tdm_cpu_act_bias(uint32_t wtype)
{
    tdm_qform_t f;
    if (!tdm_qform_of(wtype, &f))
        return -1;
    return f.has_min ? 0 : f.bias;
}

/* Block b's d and corrections from its scale db and the sums s0, s1 of its
 * two halves' q; bias from tdm_cpu_act_bias (0 with mins: then dsa). Every
 * ISA's act_quant ends with this. */
static inline void tdm_cpu_act_aux(uint8_t *act, int64_t nb, int64_t b, int32_t bias, int has_min,
                                   float db, int32_t s0, int32_t s1)
{
    float *d = (float *)(act + TDM_CPU_ACT_D(nb));
    uint8_t *aux = act + TDM_CPU_ACT_AUX(nb) + 4 * b, *aux16 = act + TDM_CPU_ACT_AUX16(nb) + 8 * b;
    d[b] = db;
    if (has_min) {
        float v = db * (float)(s0 + s1), v0 = db * (float)s0, v1 = db * (float)s1;
        memcpy(aux, &v, 4);
        memcpy(aux16, &v0, 4);
        memcpy(aux16 + 4, &v1, 4);
    } else {
        int32_t c = -bias * (s0 + s1), c0 = -bias * s0, c1 = -bias * s1;
        memcpy(aux, &c, 4);
        memcpy(aux16, &c0, 4);
        memcpy(aux16 + 4, &c1, 4);
    }
}

static inline uint32_t tdm_cpu_f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float tdm_cpu_u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x86 maxps/minps semantics: the second operand when unordered. */
static inline float tdm_cpu_maxps(float a, float b)
{
    return a > b ? a : b;
}
static inline float tdm_cpu_minps(float a, float b)
{
    return a < b ? a : b;
}

/* Constants of tdm_cpu_expf. */
#define TDM_EXP_LO    -87.0f
#define TDM_EXP_HI    88.0f
#define TDM_EXP_LOG2E 1.44269504088896341f
#define TDM_EXP_MAGIC 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer */
#define TDM_EXP_LN2HI 0.693359375f
#define TDM_EXP_LN2LO -2.12194440e-4f
#define TDM_EXP_C6    (1.0f / 720.0f)
#define TDM_EXP_C5    (1.0f / 120.0f)
#define TDM_EXP_C4    (1.0f / 24.0f)
#define TDM_EXP_C3    (1.0f / 6.0f)
#define TDM_EXP_C2    0.5f

/* e^x: 0 below -87 (and for -inf), x clamped to 88 above, NaN stays NaN.
 * n = nearest(x * log2e), r = x - n ln2 (Cody-Waite, two FMAs), degree-6
 * Taylor polynomial by Horner with FMAs, times 2^n built in the exponent.
 * About 2 ulp; exact 1 at 0. SIMD versions do exactly these operations. */
static inline float tdm_cpu_expf(float x)
{
    float xc = tdm_cpu_maxps(TDM_EXP_LO, x);
    xc = tdm_cpu_minps(TDM_EXP_HI, xc);
    float t = xc * TDM_EXP_LOG2E;
    float nm = t + TDM_EXP_MAGIC;
    float n = nm - TDM_EXP_MAGIC;
    float r = fmaf(n, -TDM_EXP_LN2HI, xc);
    r = fmaf(n, -TDM_EXP_LN2LO, r);
    float p = TDM_EXP_C6;
    p = fmaf(p, r, TDM_EXP_C5);
    p = fmaf(p, r, TDM_EXP_C4);
    p = fmaf(p, r, TDM_EXP_C3);
    p = fmaf(p, r, TDM_EXP_C2);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    /* bits(nm) = 0x4b400000 + n for |n| < 2^22: 2^n = (n + 127) << 23. */
    uint32_t e = (tdm_cpu_f2u(nm) - 0x4b400000u + 127u) << 23;
    float res = p * tdm_cpu_u2f(e);
    return x < TDM_EXP_LO ? 0.0f : res;
}

/* The canonical horizontal sum of 16 lanes: halves, quarters, pairs. */
static inline float tdm_cpu_tree16(const float a[16])
{
    float b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++)
        c[i] = b[i] + b[i + 4];
    for (int i = 0; i < 2; i++)
        d[i] = c[i] + c[i + 2];
    return d[0] + d[1];
}

/* Nearest-even integer of v for |v| < 2^22, as a float. */
static inline float tdm_cpu_rint(float v)
{
    return (v + TDM_EXP_MAGIC) - TDM_EXP_MAGIC;
}

/* Element offsets into the paged cache of the K/V rows of kv head kvh for
 * positions c0 .. c0+nv-1 (one division per chunk, not per position). */
static inline void tdm_cpu_kv_rows(const tdm_attn_params_t *p, const int32_t *table, int64_t c0,
                                   int nv, int32_t kvh, int64_t *off)
{
    const int64_t bs = p->block_size, kvd = (int64_t)p->n_kv_heads * p->head_dim;
    int64_t bi = c0 / bs, o = c0 % bs;
    for (int i = 0; i < nv; i++) {
        off[i] = ((int64_t)table[bi] * bs + o) * kvd + (int64_t)kvh * p->head_dim;
        if (++o == bs) {
            o = 0;
            bi++;
        }
    }
}

/* What each ISA provides. Ranges are half-open; all functions are pure and
 * thread-safe on disjoint outputs. */
typedef struct tdm_cpu_kernels {
    /* y[t][r] for r in packed groups [g0, g1), t in [0, n). act: rows of
     * tdm_cpu_act_stride(w->k) bytes. */
    void (*qmatmul)(const tdm_bweight_t *w, const uint8_t *act, int64_t n, float *y, int64_t ldy,
                    int64_t g0, int64_t g1);
    /* F32/F16/BF16 weights: y[t][r] for r in [r0, r1), x is [n][k] f32. */
    void (*fmatmul)(const tdm_bweight_t *w, const float *x, int64_t n, float *y, int64_t ldy,
                    int64_t r0, int64_t r1);
    /* One activation row of k floats into the quantized row layout, for
     * weights of bias and mins as tdm_cpu_act_bias says. */
    void (*act_quant)(int32_t bias, int has_min, const float *x, int64_t k, uint8_t *act);
    /* Sum of squares of x[0..d) in the canonical 16-lane order. */
    float (*sumsq)(const float *x, int64_t d);
    /* out[i] = (x[i] * scale) * w[i]. */
    void (*scale_mul)(const float *x, float scale, const float *w, int64_t d, float *out);
    void (*swiglu)(const float *g, const float *u, int64_t count, float *out);
    void (*add)(float *x, const float *y, int64_t count);
    void (*to_f16)(const float *x, int64_t count, uint16_t *out);
    /* Query heads [h0, h1) of row t: a part of one kv head's group, or
     * whole groups (h0 and h1 multiples of n_heads / n_kv_heads), at most
     * TDM_CPU_MAX_HEADS_G heads. (tn, hn0): the row and first head of the
     * item of as many heads that this thread computes next, tn < 0 if
     * none; a hint for prefetching only. */
    void (*attn)(const tdm_attn_params_t *p, const float *q, const uint16_t *ck, const uint16_t *cv,
                 float *out, int64_t t, int32_t h0, int32_t h1, int64_t tn, int32_t hn0);
} tdm_cpu_kernels_t;

extern const tdm_cpu_kernels_t tdm_cpu_kernels_scalar;
extern const tdm_cpu_kernels_t tdm_cpu_kernels_avx2;      /* AVX2 without VNNI */
extern const tdm_cpu_kernels_t tdm_cpu_kernels_avx2_vnni; /* AVX2 with AVX-VNNI */
/* ops_avxvnni.c: the AVX-VNNI quantized matmul of tdm_cpu_kernels_avx2_vnni */
void tdm_cpu_qmatmul_avx2_vnni(const tdm_bweight_t *w, const uint8_t *act, int64_t n, float *y,
                               int64_t ldy, int64_t g0, int64_t g1);
extern const tdm_cpu_kernels_t tdm_cpu_kernels_avx512;

/* The scalar attention of one head; SIMD kernels fall back to it for head
 * dims they do not take (same arithmetic). */
void tdm_cpu_attn_scalar(const tdm_attn_params_t *p, const float *q, const uint16_t *ck,
                         const uint16_t *cv, float *out, int64_t t, int32_t h0, int32_t h1,
                         int64_t tn, int32_t hn0);

/* CPUID. */
typedef struct tdm_cpu_features {
    int avx2;     /* AVX2 + FMA + F16C, OS saves ymm */
    int avx_vnni; /* AVX-VNNI (VEX vpdpbusd, vpdpwssd) */
    int avx512;   /* AVX-512 F/BW/VL/DQ + VNNI, OS saves zmm */
} tdm_cpu_features_t;
void tdm_cpu_features_get(tdm_cpu_features_t *f);

#endif
