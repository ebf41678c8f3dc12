/* tandem CUDA backend: matmul y[t][r] = sum_j W[r][j] x[t][j] and the
 * activation preparation it reads.
 *
 * Activations (act_prepare). F16 and quantized weights: x rounded to f16,
 * [n][kp] with kp = k rounded up to 32 (the pad is zeros), then for types
 * with mins (Q4_1, Q5_1, Q4_K, Q5_K: one per 32 elements; Q2_K: one per
 * 16) [n][kp/32][NXS] f32 sums of those f16 values per sub-block. F32 and
 * BF16 weights: x as is.
 *
 * The tensor-core kernel (mm_kernel), one code path for every n:
 *  - mma.m16n8k16 (f16 in, f32 accumulate) with the weights as M (16 rows)
 *    and the tokens as N (8 tokens, zero columns past n). A warp owns MT
 *    16-row tiles x NTW 8-token tiles; a block WM x WN warps, i.e. BM rows
 *    x BN tokens. Grid: x = token tiles, y = row tiles, z = K splits (or 1).
 *  - K is walked in stages of KD elements: the raw weight bytes of the
 *    block's rows (32-element blocks of the device type, quant.cuh; 16-byte
 *    cp.async granules covering the stage at whatever alignment the row
 *    has) and the f16 activations of its tokens are staged into shared
 *    memory, NST stages in flight. Each warp decodes its own A fragments
 *    from the staged bytes into f16 registers (integer codes for quantized
 *    types, see quant.cuh) and reads B fragments with 8-byte loads; the K
 *    order inside a block is permuted the same way on both sides (lane t of
 *    a quad owns elements 16s + 4t + 0..3 of step s).
 *  - Quantized: per 32-element block, p = mma(step 0) then mma(step 1) from
 *    zero; acc = fma(d, p, acc); with mins also acc = fma(m, xsum, acc).
 *    Layouts with a scale per 16 elements (SUB16: Q2_K, Q3_K, Q6_K) do this
 *    per step: p = mma(step s) from zero, acc = fma(d_s, p, acc) (then
 *    fma(m_s, xsum_s, acc)), s = 0, 1. F16: acc = mma(step) straight through.
 *  - K splits: S = mm_splits(rows, k, slots) contiguous ranges of 256-element
 *    superchunks. Each split's sum starts from zero; the result is
 *    ((p0 + p1) + p2) + ... A block either walks all splits and adds them as
 *    they finish (prefill), or computes one split into the scratch buffer and
 *    mm_reduce adds them in the same order (decode: more blocks).
 *  Configurations (same arithmetic, different tiles):
 *    n <= 8:  4 warps x (16 rows x 8 tokens), KD 256 (F16: 128), 4 stages
 *    n <= 32: 4 warps x (16 rows x 32 tokens), KD 128 (F16: 64), 4 stages
 *    larger:  2x2 warps x (32 rows x 64 tokens), KD 64, 3 stages
 *  The accumulators and the running sum of finished splits live in
 *  registers; only the prefill tile of the 4-bit types and of the repacked
 *  layouts, where ptxas would spill at 255 registers, keeps the running sum
 *  in shared memory (touched at split ends only). Shared memory per
 *  prefill block: 90 KB for F16, 81 KB for Q8_0, 75-84 KB + 32 KB of sums
 *  for the others (107-116 KB: two blocks per H100 SM except Q5_1 and Q5_K,
 *  one on an A100), where registers cap it at two anyway (128 threads x
 *  255). A is not read with ldmatrix: its K order is the permuted one above (which lets
 *  quantized blocks decode 4 codes per 32-bit load), and ldmatrix would
 *  give the standard order, whose products the tensor cores may add in
 *  another order than the decode configurations do.
 *  Bytes per call: the weights once per token tile (rows x row_bytes; once
 *  for n <= BN), activations n x kp x 2 per row tile (L2), y n x rows x 4
 *  (plus 2 x S x n x rows x 4 of split partials in scratch when split over
 *  blocks). FLOPs: 2 x n x rows x k (tensor cores compute n rounded up to
 *  BN).
 *
 * Batch invariance: every output element y[t][r] is produced by the same
 * sequence of operations whatever n, the configuration or the grid: for each
 * split in order, for each 32-element block in order, the same two mma's on
 * the same inputs (an mma's output element depends only on its own row of A
 * and column of B; the zero columns of absent tokens touch nothing else),
 * the same fma's with the same scales, then the fixed-order sum of the split
 * partials. S depends only on (rows, k) and the device (slots: its SMs x
 * the decode configuration's blocks per SM). The products fma/add are written
 * with __fmaf_rn/__fadd_rn so no configuration contracts differently.
 *
 * F32 and BF16 weights (rare, small): mm_f32_kernel on CUDA cores, one
 * warp per (row, token): lane l sums j = l, l + 32, ... with fma (BF16
 * widened to f32 in registers), then a fixed xor-butterfly. */
#include <stdint.h>

#include "cuda_internal.cuh"
#include "matmul.cuh"
#include "quant.cuh"
#include "tandem/qform.h"

/* Split rule (mm_splits): in decode a weight's row tiles alone leave most
 * SMs idle, so K is split over blocks; the count is chosen so that row
 * tiles x splits fill whole waves of the device's resident blocks. The
 * split decides the summation order, so it reads only the weight's shape
 * and the device (never n): every batch size sums alike on one GPU. */
#define MM_SPLIT_MAX 16
/* rows per block in every configuration (WM x MT x 16) */
#define MM_BM 64
/* Split boundaries fall on multiples of 8 blocks (256 elements), a multiple
 * of every configuration's stage, so every configuration sees the same
 * splits. */
#define MM_SC_BLOCKS 8

/* ---- geometry shared by host and device (and the host self-check) ---- */

TDM_HD int mm_nblocks(int64_t k)
{
    return (int)((k + 31) / 32);
}

/* The number of K splits of a [rows][k] weight on a device that holds
 * `slots` blocks of the decode configuration at once (SMs x blocks per
 * SM). With T row tiles, S splits take ceil(T S / slots) waves of work
 * 1/S each: S minimizes waves / S (the smallest such S), at least 512
 * elements per split, at most MM_SPLIT_MAX. When the row tiles alone fill
 * the device, 1. Example: 4096 rows (64 tiles), 264 slots: S = 4, 256
 * blocks in one wave (a fixed 5 would make 320: 1.2 waves). */
TDM_HD int mm_splits(int64_t rows, int64_t k, int slots)
{
    const int64_t nsc = (mm_nblocks(k) + MM_SC_BLOCKS - 1) / MM_SC_BLOCKS;
    const int64_t tiles = (rows + MM_BM - 1) / MM_BM;
    int64_t smax = nsc / 2 < MM_SPLIT_MAX ? nsc / 2 : MM_SPLIT_MAX;
    if (slots < 1)
        slots = 1;
    if (smax <= 1 || tiles >= slots)
        return 1;
    int64_t best = 1, best_w = (tiles + slots - 1) / slots;
    for (int64_t sp = 2; sp <= smax; sp++) {
        const int64_t w = (tiles * sp + slots - 1) / slots;
        if (w * best < best_w * sp) { /* w / sp < best_w / best */
            best = sp;
            best_w = w;
        }
    }
    return (int)best;
}

/* First stage (of kb blocks) of split s, and one past its last. */
TDM_HD int mm_split_stage_lo(int s, int nsc, int S, int kb)
{
    return s * nsc / S * (MM_SC_BLOCKS / kb); /* s <= 17, nsc < 2^23: no overflow */
}

TDM_HD int mm_split_stage_hi(int s, int nsc, int S, int kb, int nb)
{
    int hi = mm_split_stage_lo(s + 1, nsc, S, kb);
    int nst = (nb + kb - 1) / kb;
    return hi < nst ? hi : nst;
}

/* Granule gi of the weight bytes [start, start + len): false when the
 * range ends before it. Bytes past the weight's end are zero-filled (src
 * bytes < 16; 0 reads nothing, from a valid address). */
TDM_HD bool mm_granule(int64_t start, int len, int gi, int64_t wbytes, int64_t *goff, int *src)
{
    int64_t g = (start & ~(int64_t)15) + 16 * (int64_t)gi;
    if (g >= start + len)
        return false;
    int64_t left = wbytes - g;
    *src = left >= 16 ? 16 : left > 0 ? (int)left : 0;
    *goff = left > 0 ? g : 0;
    return true;
}

/* Smallest shared row stride >= min that spreads a warp's fragment reads
 * over the banks: quantized rows are read 4 consecutive words per row by 8
 * rows at once (stride = 4 words mod 8), F16 rows 8 consecutive words per
 * row by 4 rows per half-warp phase (stride = 8 words mod 16). */
TDM_HD constexpr int mm_pad_stride(uint32_t wt, int min)
{
    int r = min;
    if (wt == TDM_DTYPE_F16) {
        while (r % 64 != 32)
            r += 16;
    } else {
        while (r % 32 != 16)
            r += 16;
    }
    return r;
}

/* What a device type's blocks hold (quant.cuh): NXS x-sums per block
 * (the activation sums the mins multiply: one per sub-block), 0 without
 * mins. */
template <uint32_t WT> struct mm_ly {
    static constexpr bool Q = tdm_cuda_is_q(WT);
    static constexpr uint32_t L = Q ? tdm_cuda_layout(WT) : 0;
    static constexpr bool NIB = (L & TDM_CUDA_LY_NIB) != 0, MIN = (L & TDM_CUDA_LY_MIN) != 0;
    static constexpr int NS = L & TDM_CUDA_LY_SUB16 ? 2 : 1; /* scales per block */
    static constexpr int NXS = MIN ? NS : 0;
    /* repacked at load (not a GGUF layout) */
    static constexpr bool PACK = Q && WT >= TDM_CUDA_PK_BASE;
};

template <uint32_t WT, int KD> struct mm_geom {
    static constexpr int BB = tdm_cuda_block_bytes(WT); /* bytes per block */
    static constexpr int KB = KD / 32;                  /* blocks per stage */
    static constexpr int LA = KB * BB;                  /* row bytes of a full stage */
    static constexpr int GA = (LA + 30) / 16;           /* granules at any start in a granule */
    static constexpr int RA = mm_pad_stride(WT, GA * 16);
    static constexpr int RB = KD * 2 + 32; /* 8 words mod 16: 4 tokens per phase */
};

template <uint32_t WT, int WM, int WN, int MT, int NTW, int KD, int NST> struct mm_cfg {
    typedef mm_geom<WT, KD> G;
    static constexpr int BM = WM * MT * 16, BN = WN * NTW * 8, NT = WM * WN * 32;
    static constexpr int A_BYTES = BM * G::RA;
    static constexpr int B_BYTES = BN * G::RB;
    static constexpr int S_BYTES = BN * G::KB * mm_ly<WT>::NXS * 4;
    static constexpr int STAGE = A_BYTES + B_BYTES + S_BYTES;
    /* the running sum of finished splits: registers, except in the
     * prefill tile of 4-bit types, where ptxas spills at 255 registers
     * with it (the smem copy is touched only at split ends) */
    static constexpr bool TOT_REG = MT * NTW <= 4 || !(mm_ly<WT>::NIB || mm_ly<WT>::PACK);
    static constexpr int TOT_SMEM = TOT_REG ? 0 : WM * WN * MT * NTW * 4 * 32 * 4;
    static constexpr int SMEM = NST * STAGE + TOT_SMEM;
    static_assert(KD % 32 == 0 && MM_SC_BLOCKS % (KD / 32) == 0, "stages must tile superchunks");
    static_assert(BM == MM_BM, "mm_splits counts row tiles of MM_BM rows");
    static_assert(A_BYTES % 16 == 0 && B_BYTES % 16 == 0 && S_BYTES % 16 == 0, "16-byte granules");
};

/* One lane's raw A data of one block row: w[step][lo/hi] (biased bits for
 * quantized types, final f16 pairs for F16), the scale d and min m of each
 * step's elements (the same for both steps without SUB16). */
struct mm_araw {
    uint32_t w[2][2];
    float d[2], m[2];
};

TDM_HD uint32_t mm_ld16(const uint8_t *p)
{
    return *(const uint16_t *)p;
}

TDM_HD uint32_t mm_ld16x2(const uint8_t *p) /* 2-byte aligned u32 */
{
    return mm_ld16(p) | (mm_ld16(p + 2) << 16);
}

/* A code word of a quantized block: blocks of a multiple of 4 bytes keep
 * 4-byte alignment (rows and stages preserve the address mod 16). */
template <uint32_t WT> TDM_HD uint32_t mm_ld_code(const uint8_t *p)
{
    if (tdm_cuda_block_bytes(WT) % 4 == 0)
        return *(const uint32_t *)p;
    return mm_ld16x2(p);
}

/* b: the block's first staged byte; t: lane % 4; al8: b is 8-byte aligned
 * (F16 only). */
template <uint32_t WT> TDM_HD void mm_read_a(const uint8_t *b, int t, int al8, mm_araw *o)
{
    if (WT == TDM_DTYPE_F16) {
        o->d[0] = o->d[1] = o->m[0] = o->m[1] = 0.0f;
        for (int s = 0; s < 2; s++) {
            const uint8_t *q = b + 32 * s + 8 * t;
            if (al8) {
                uint2 v = *(const uint2 *)q;
                o->w[s][0] = v.x;
                o->w[s][1] = v.y;
            } else {
                o->w[s][0] = mm_ld16x2(q);
                o->w[s][1] = mm_ld16x2(q + 4);
            }
        }
        return;
    }
    typedef mm_ly<WT> Y;
    constexpr int SB = tdm_cuda_scale_bytes(WT), CO = tdm_cuda_code_off(WT);
    static_assert((tdm_cuda_layout(WT) & TDM_CUDA_LY_SC16) || tdm_cuda_block_bytes(WT) % 4 == 0,
                  "f32 scales need 4-byte alignment");
    for (int s = 0; s < 2; s++) {
        const int h = Y::NS == 2 ? s : 0;
        o->d[s] = tdm_deq_scale<WT>(b + h * SB);
        o->m[s] = Y::MIN ? tdm_deq_scale<WT>(b + tdm_cuda_min_off(WT) + h * SB) : 0.0f;
    }
    if (Y::NIB) {
        const uint32_t qs = mm_ld_code<WT>(b + CO + 4 * t);
        for (int s = 0; s < 2; s++) {
            o->w[s][0] = tdm_q4_frag_bits(qs, s, 0);
            o->w[s][1] = tdm_q4_frag_bits(qs, s, 1);
        }
    } else {
        for (int s = 0; s < 2; s++) {
            const uint32_t qs = mm_ld_code<WT>(b + CO + 16 * s + 4 * t);
            o->w[s][0] = tdm_q8_frag_bits(qs, 0);
            o->w[s][1] = tdm_q8_frag_bits(qs, 1);
        }
    }
}

/* Keeps the f16 halves of a register whose block elements e, e + 1 are < kt. */
TDM_HD uint32_t mm_tail_mask(uint32_t v, int e, int kt)
{
    return v & ((e < kt ? 0x0000FFFFu : 0u) | (e + 1 < kt ? 0xFFFF0000u : 0u));
}

/* Where a lane's fragment values live (g = lane / 4, t = lane % 4); see
 * mm_mma for the register layout these follow. */
/* The block-tile row of A rows g (h = 0) and g + 8 (h = 1) of m-tile i. */
template <int MT> TDM_HD int mm_frag_row(int wm, int i, int g, int h)
{
    return wm * MT * 16 + i * 16 + g + 8 * h;
}

/* The block-tile token of column 0 of n-tile j. */
template <int NTW> TDM_HD int mm_frag_tok(int wn, int j)
{
    return wn * NTW * 8 + j * 8;
}

/* Accumulator element e of a lane: row and token inside the 16 x 8 tile. */
TDM_HD int mm_acc_row(int g, int e)
{
    return g + 8 * (e >> 1);
}

TDM_HD int mm_acc_tok(int t, int e)
{
    return 2 * t + (e & 1);
}

/* ---- device pieces ---- */

__device__ __forceinline__ void mm_cp16(uint32_t saddr, const void *g, int src)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(saddr), "l"(g), "r"(src)
                 : "memory");
}

__device__ __forceinline__ void mm_cp4(uint32_t saddr, const void *g, int src)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(saddr), "l"(g), "r"(src)
                 : "memory");
}

__device__ __forceinline__ void mm_cp_commit()
{
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N> __device__ __forceinline__ void mm_cp_wait()
{
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* c += A B for one m16n8k16 tile; a[0..3] = (row g, k 2t..), (row g+8, k
 * 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..); b0, b1 = (k 2t.., col g),
 * (k 2t+8.., col g); c = (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1). */
__device__ __forceinline__ void mm_mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <uint32_t WT> __device__ __forceinline__ uint32_t mm_fin(uint32_t v, int step)
{
    typedef mm_ly<WT> Y;
    if (!Y::Q)
        return v; /* F16: the weights as they are */
    if (!Y::NIB)
        return tdm_q8_0_fin(v);
    return Y::MIN ? tdm_q4_1_fin(v, step) : tdm_q4_0_fin(v, step);
}

typedef struct mm_params {
    const uint8_t *w; /* [rows][row_bytes] GGUF rows */
    int64_t rows, row_bytes, wbytes;
    const uint16_t *x; /* [n][kp] f16 */
    const float *xsum; /* [n][nb][NXS] sub-block sums (types with mins) */
    int64_t n;
    int32_t k, kp, nb, nsc, S;
    int32_t split_z; /* block z computes split z alone (into out + z * zstride) */
    int32_t al8;     /* F16 rows 8-byte aligned */
    float *out;
    int64_t ldo, zstride;
} mm_params_t;

/* Issues the cp.async copies of stage c (weights, activations, Q4_1 sums)
 * into the shared buffer at sbuf. Every thread takes slots tid, tid + NT, ... */
template <uint32_t WT, int WM, int WN, int MT, int NTW, int KD, int NST>
__device__ __forceinline__ void mm_load_stage(const mm_params_t &p, uint32_t sbuf, int c,
                                              int64_t row0, int64_t tok0)
{
    typedef mm_cfg<WT, WM, WN, MT, NTW, KD, NST> C;
    typedef typename C::G G;
    const int tid = threadIdx.x;
    const int blk0 = c * G::KB;
    const int nblk = min(G::KB, p.nb - blk0);
    const int len = nblk * G::BB;
    const int64_t soff = (int64_t)blk0 * G::BB;
#pragma unroll
    for (int it = 0; it < (C::BM * G::GA + C::NT - 1) / C::NT; it++) {
        const int idx = tid + it * C::NT;
        if (idx < C::BM * G::GA) {
            const int r = idx / G::GA, gi = idx - r * G::GA;
            int64_t row = row0 + r;
            if (row >= p.rows) /* rows past the end repeat the last one; never stored */
                row = p.rows - 1;
            int64_t goff;
            int src;
            if (mm_granule(row * p.row_bytes + soff, len, gi, p.wbytes, &goff, &src))
                mm_cp16(sbuf + r * G::RA + 16 * gi, p.w + goff, src);
        }
    }
    const uint32_t sb = sbuf + C::A_BYTES;
    constexpr int GB = G::KB * 4; /* granules per token of a full stage */
#pragma unroll
    for (int it = 0; it < (C::BN * GB + C::NT - 1) / C::NT; it++) {
        const int idx = tid + it * C::NT;
        if (idx < C::BN * GB) {
            const int r = idx / GB, gi = idx - r * GB;
            if (gi < nblk * 4) {
                const int64_t tok = tok0 + r;
                const bool ok = tok < p.n;
                const uint16_t *src = p.x + (ok ? tok : 0) * p.kp + (int64_t)blk0 * 32 + 8 * gi;
                mm_cp16(sb + r * G::RB + 16 * gi, src, ok ? 16 : 0);
            }
        }
    }
    constexpr int NXS = mm_ly<WT>::NXS;
    if (NXS > 0) {
        const uint32_t ssum = sb + C::B_BYTES;
        constexpr int SX = G::KB * (NXS > 0 ? NXS : 1); /* sums per token of a full stage */
#pragma unroll
        for (int it = 0; it < (C::BN * SX + C::NT - 1) / C::NT; it++) {
            const int idx = tid + it * C::NT;
            if (idx < C::BN * SX) {
                const int r = idx / SX, q = idx - r * SX;
                if (q < nblk * NXS) {
                    const int64_t tok = tok0 + r;
                    const bool ok = tok < p.n;
                    const float *src = p.xsum + ((ok ? tok : 0) * p.nb + blk0) * NXS + q;
                    mm_cp4(ssum + idx * 4, src, ok ? 4 : 0);
                }
            }
        }
    }
}

/* One 32-element block (block bi of the stage in shared memory at sa) of a
 * warp's MT x NTW tiles, into acc. Per sub-block (the block, or each k16
 * step with SUB16): the mma products of its codes from zero, p, then
 * acc = fma(d, p, acc) and, with mins, acc = fma(m, xsum, acc). */
template <uint32_t WT, int WM, int WN, int MT, int NTW, int KD, int NST>
__device__ __forceinline__ void mm_block(const mm_params_t &p, const uint8_t *sa, int bi, int blk0,
                                         const uint32_t (&rmis)[MT][2], uint32_t smis,
                                         float (&acc)[MT][NTW][4])
{
    typedef mm_cfg<WT, WM, WN, MT, NTW, KD, NST> C;
    typedef typename C::G G;
    typedef mm_ly<WT> Y;
    constexpr int NS = Y::NS, NXS = Y::NXS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp % WM, wn = warp / WM;
    const uint8_t *sb = sa + C::A_BYTES;
    const float *ss = (const float *)(sb + C::B_BYTES);
    uint32_t a[MT][2][4];
    float dsc[MT][2][NS], msc[MT][2][NS];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = mm_frag_row<MT>(wm, i, g, h);
            const uint8_t *ra = sa + r * G::RA + ((rmis[i][h] + smis) & 15) + bi * G::BB;
            mm_araw raw;
            mm_read_a<WT>(ra, t, p.al8, &raw);
#pragma unroll
            for (int s = 0; s < 2; s++) {
                a[i][s][h] = mm_fin<WT>(raw.w[s][0], s);
                a[i][s][2 + h] = mm_fin<WT>(raw.w[s][1], s);
            }
#pragma unroll
            for (int s = 0; s < NS; s++) {
                dsc[i][h][s] = raw.d[s];
                msc[i][h][s] = raw.m[s];
            }
        }
    if (WT == TDM_DTYPE_F16 && (p.k & 31) != 0 && blk0 + bi == p.nb - 1) {
        /* the last block runs past k: its staged bytes are the next
         * row's or zero fill; keep them out even if not finite */
        const int kt = p.k & 31;
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int s = 0; s < 2; s++)
#pragma unroll
                for (int r = 0; r < 4; r++)
                    a[i][s][r] = mm_tail_mask(a[i][s][r], 16 * s + 4 * t + 2 * (r >> 1), kt);
    }
#pragma unroll
    for (int j = 0; j < NTW; j++) {
        const int tr = mm_frag_tok<NTW>(wn, j);
        const uint8_t *rb = sb + (tr + g) * G::RB + bi * 64 + 8 * t; /* B column g */
        const uint2 b0 = *(const uint2 *)rb, b1 = *(const uint2 *)(rb + 32);
        /* x-sums of the accumulator's two tokens (e & 1), per sub-block */
        float xs[2][NS];
#pragma unroll
        for (int c = 0; c < 2; c++)
#pragma unroll
            for (int s = 0; s < NS; s++)
                xs[c][s] =
                    NXS > 0 ? ss[(tr + mm_acc_tok(t, c)) * (G::KB * NXS) + bi * NXS + s] : 0.0f;
#pragma unroll
        for (int i = 0; i < MT; i++) {
            float *ac = acc[i][j];
            if (WT == TDM_DTYPE_F16) {
                mm_mma(ac, a[i][0], b0.x, b0.y);
                mm_mma(ac, a[i][1], b1.x, b1.y);
            } else {
#pragma unroll
                for (int s = 0; s < NS; s++) {
                    float pc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    if (NS == 1 || s == 0)
                        mm_mma(pc, a[i][0], b0.x, b0.y);
                    if (NS == 1 || s == 1)
                        mm_mma(pc, a[i][1], b1.x, b1.y);
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        ac[e] = __fmaf_rn(dsc[i][e >> 1][s], pc[e], ac[e]);
                    if (NXS > 0) {
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            ac[e] = __fmaf_rn(msc[i][e >> 1][s], xs[e & 1][s], ac[e]);
                    }
                }
            }
        }
    }
}

/* The running sum of a lane's finished splits: registers (REG), or its
 * lane's column of the warp's slice of shared memory past the stages. */
template <bool REG, int MT, int NTW> struct mm_tot {
    float v[MT][NTW][4];
    __device__ __forceinline__ void bind(uint8_t *, int, int) {}
    __device__ __forceinline__ float &at(int i, int j, int e) { return v[i][j][e]; }
};
template <int MT, int NTW> struct mm_tot<false, MT, NTW> {
    float *p;
    __device__ __forceinline__ void bind(uint8_t *base, int warp, int lane)
    {
        p = (float *)base + warp * MT * NTW * 4 * 32 + lane;
    }
    __device__ __forceinline__ float &at(int i, int j, int e)
    {
        return p[((i * NTW + j) * 4 + e) * 32];
    }
};

template <uint32_t WT, int WM, int WN, int MT, int NTW, int KD, int NST>
__global__ void __launch_bounds__(WM *WN * 32, 2) mm_kernel(const mm_params_t p)
{
    typedef mm_cfg<WT, WM, WN, MT, NTW, KD, NST> C;
    typedef typename C::G G;
    extern __shared__ __align__(16) uint8_t mm_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp % WM, wn = warp / WM;
    const int64_t tok0 = (int64_t)blockIdx.x * C::BN, row0 = (int64_t)blockIdx.y * C::BM;
    const int s_first = p.split_z ? (int)blockIdx.z : 0;
    const int s_last = p.split_z ? (int)blockIdx.z : p.S - 1;
    const int c_begin = mm_split_stage_lo(s_first, p.nsc, p.S, G::KB);
    const int c_end = mm_split_stage_hi(s_last, p.nsc, p.S, G::KB, p.nb);
    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(mm_smem);

    /* (row * row_bytes) mod 16 of this lane's fragment rows: where a stage's
     * bytes start inside their first granule (the copy rounds down to 16). */
    uint32_t rmis[MT][2];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int64_t r = row0 + mm_frag_row<MT>(wm, i, g, h);
            if (r >= p.rows)
                r = p.rows - 1;
            rmis[i][h] = (uint32_t)((r * p.row_bytes) & 15);
        }

    float acc[MT][NTW][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NTW; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                acc[i][j][e] = 0.0f;
    mm_tot<C::TOT_REG, MT, NTW> tot;
    tot.bind(mm_smem + NST * C::STAGE, warp, lane);

#pragma unroll
    for (int i = 0; i < NST - 1; i++) {
        if (c_begin + i < c_end)
            mm_load_stage<WT, WM, WN, MT, NTW, KD, NST>(p, sbase + i * C::STAGE, c_begin + i, row0,
                                                        tok0);
        mm_cp_commit(); /* empty groups keep the wait count uniform */
    }

    int s_cur = s_first;
    int c_split_end = mm_split_stage_hi(s_cur, p.nsc, p.S, G::KB, p.nb);
    int buf = 0, lbuf = NST - 1;
    for (int c = c_begin; c < c_end; c++) {
        mm_cp_wait<NST - 2>(); /* this thread's copies of stage c landed */
        __syncthreads();       /* everyone's did, and stage c - 1's buffer is free */
        if (c + NST - 1 < c_end)
            mm_load_stage<WT, WM, WN, MT, NTW, KD, NST>(p, sbase + lbuf * C::STAGE, c + NST - 1,
                                                        row0, tok0);
        mm_cp_commit();
        lbuf = lbuf + 1 == NST ? 0 : lbuf + 1;

        const uint8_t *sa = mm_smem + buf * C::STAGE;
        buf = buf + 1 == NST ? 0 : buf + 1;
        const int blk0 = c * G::KB;
        const int nblk = min(G::KB, p.nb - blk0);
        const uint32_t smis = (uint32_t)(((int64_t)blk0 * G::BB) & 15);
        if (nblk == G::KB && MT * NTW <= 4) {
#pragma unroll
            for (int bi = 0; bi < G::KB; bi++)
                mm_block<WT, WM, WN, MT, NTW, KD, NST>(p, sa, bi, blk0, rmis, smis, acc);
        } else { /* a k tail, or the prefill tile (its registers hold acc and tot) */
#pragma unroll 1
            for (int bi = 0; bi < nblk; bi++)
                mm_block<WT, WM, WN, MT, NTW, KD, NST>(p, sa, bi, blk0, rmis, smis, acc);
        }
        if (c + 1 == c_split_end) {
            const bool first = s_cur == s_first;
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int j = 0; j < NTW; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        tot.at(i, j, e) =
                            first ? acc[i][j][e] : __fadd_rn(tot.at(i, j, e), acc[i][j][e]);
                        acc[i][j][e] = 0.0f;
                    }
            s_cur++;
            c_split_end = mm_split_stage_hi(s_cur, p.nsc, p.S, G::KB, p.nb);
        }
    }

    float *out = p.out + (p.split_z ? (int64_t)blockIdx.z * p.zstride : 0);
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NTW; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int64_t rr = row0 + mm_frag_row<MT>(wm, i, 0, 0) + mm_acc_row(g, e);
                const int64_t tt = tok0 + mm_frag_tok<NTW>(wn, j) + mm_acc_tok(t, e);
                if (rr < p.rows && tt < p.n)
                    out[tt * p.ldo + rr] = tot.at(i, j, e);
            }
        }
}

/* y[t][r] = ((part[0] + part[1]) + part[2]) + ..., the order a block that
 * walks all splits uses. */
__global__ void mm_reduce(const float *part, int S, int64_t n, int64_t rows, float *y, int64_t ldy)
{
    const int64_t total = n * rows, step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        float v = part[i];
        for (int s = 1; s < S; s++)
            v = __fadd_rn(v, part[(int64_t)s * total + i]);
        const int64_t t = i / rows, r = i - t * rows;
        y[t * ldy + r] = v;
    }
}

/* F32 and BF16 weights (f32 activations): warp w of the block owns row
 * blockIdx.x * 8 + w; tokens blockIdx.y, + gridDim.y, ... BF16 weights
 * become f32 in registers (a 16-bit shift, exact). */
template <uint32_t WT>
__global__ void __launch_bounds__(256)
    mm_f32_kernel(const uint8_t *w, int64_t rows, int64_t k, const float *x, int64_t n, float *y,
                  int64_t ldy)
{
    const int lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (r >= rows)
        return;
    const uint8_t *wr = w + r * k * (WT == TDM_DTYPE_BF16 ? 2 : 4);
    for (int64_t t = blockIdx.y; t < n; t += gridDim.y) {
        const float *xr = x + t * k;
        float a = 0.0f;
        for (int64_t j = lane; j < k; j += 32)
            a = __fmaf_rn(tdm_deq_elem<WT>(wr, j), xr[j], a);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            a = __fadd_rn(a, __shfl_xor_sync(0xffffffffu, a, o));
        if (lane == 0)
            y[t * ldy + r] = a;
    }
}

/* f16 activations: warp w of the block converts block blockIdx.x * 8 + w
 * (32 elements, one per lane) of tokens blockIdx.y, + gridDim.y, ...; the
 * sums for weights with mins (nxs per block: of 32 or of 16 elements) are
 * fixed xor-butterflies over the f16 values. */
__global__ void __launch_bounds__(256)
    mm_act_kernel(const float *x, int64_t n, int32_t k, int32_t kp, int32_t nb, uint16_t *xh,
                  float *xsum, int32_t nxs)
{
    const int lane = threadIdx.x & 31;
    const int32_t b = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (b >= nb)
        return;
    const int32_t j = b * 32 + lane;
    for (int64_t t = blockIdx.y; t < n; t += gridDim.y) {
        const float v = j < k ? x[t * k + j] : 0.0f;
        const __half h = __float2half_rn(v);
        xh[t * kp + j] = __half_as_ushort(h);
        if (xsum != NULL) {
            float s = __half2float(h);
            for (int o = nxs == 2 ? 8 : 16; o > 0; o >>= 1)
                s = __fadd_rn(s, __shfl_xor_sync(0xffffffffu, s, o));
            if ((lane & (32 / nxs - 1)) == 0)
                xsum[(t * nb + b) * nxs + lane / (32 / nxs)] = s;
        }
    }
}

/* ---- host side ---- */

/* The activations a weight type (GGUF's) takes: 0: f32; 1: f16 (F16 and
 * the quantized types), with *nxs sums per 32-element block (0 without
 * mins); -1: none (a type the backend does not compute). */
static int mm_act_kind(uint32_t wtype, int32_t *nxs)
{
    tdm_qform_t f;
    *nxs = 0;
    if (wtype == TDM_DTYPE_F32 || wtype == TDM_DTYPE_BF16)
        return 0;
    if (wtype == TDM_DTYPE_F16)
        return 1;
    if (!tdm_qform_of(wtype, &f))
        return -1;
    *nxs = f.has_min ? 32 / f.sub : 0;
    return 1;
}

extern "C" size_t cuda_act_size(uint32_t wtype, int64_t n, int64_t k)
{
    int32_t nxs;
    const int kind = mm_act_kind(wtype, &nxs);
    if (n <= 0 || k <= 0 || kind < 0)
        return 0;
    if (kind == 0)
        return (size_t)n * (size_t)k * sizeof(float);
    const size_t nb = (size_t)mm_nblocks(k);
    return (size_t)n * nb * (32 * sizeof(uint16_t) + (size_t)nxs * sizeof(float));
}

extern "C" void cuda_act_prepare(tdm_backend_t *be, uint32_t wtype, const float *x, int64_t n,
                                 int64_t k, void *act)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    int32_t nxs;
    const int kind = mm_act_kind(wtype, &nxs);
    if (n <= 0 || k <= 0 || kind < 0)
        return;
    if (kind == 0) {
        if (act != (const void *)x)
            TDM_CUDA_CHECK(cudaMemcpyAsync(act, x, (size_t)n * (size_t)k * sizeof(float),
                                           cudaMemcpyDeviceToDevice, cb->stream));
        return;
    }
    const int32_t nb = mm_nblocks(k), kp = nb * 32;
    uint16_t *xh = (uint16_t *)act;
    float *xsum = nxs > 0 ? (float *)(xh + (size_t)n * (size_t)kp) : NULL;
    dim3 grid((unsigned)((nb + 7) / 8), (unsigned)(n < 65535 ? n : 65535));
    mm_act_kernel<<<grid, 256, 0, cb->stream>>>(x, n, (int32_t)k, kp, nb, xh, xsum, nxs);
    TDM_CUDA_LAUNCHED("mm_act_kernel");
}

/* Sets a kernel's dynamic shared memory limit once per device. */
static void mm_smem_optin(const void *fn, int bytes, int device, unsigned long long *done)
{
    const unsigned long long bit = 1ull << (device & 63);
    if (__atomic_load_n(done, __ATOMIC_ACQUIRE) & bit)
        return;
    TDM_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    __atomic_fetch_or(done, bit, __ATOMIC_RELEASE);
}

template <uint32_t WT, int WM, int WN, int MT, int NTW, int KD, int NST>
static void mm_optin(int device)
{
    static unsigned long long done;
    mm_smem_optin((const void *)mm_kernel<WT, WM, WN, MT, NTW, KD, NST>,
                  mm_cfg<WT, WM, WN, MT, NTW, KD, NST>::SMEM, device, &done);
}

template <uint32_t WT, int WM, int WN, int MT, int NTW, int KD, int NST>
static void mm_launch(tdm_cuda_backend_t *cb, mm_params_t p, float *y, int64_t ldy, int slots)
{
    typedef mm_cfg<WT, WM, WN, MT, NTW, KD, NST> C;
    const int64_t ttiles = tdm_cuda_div_up(p.n, C::BN), rtiles = tdm_cuda_div_up(p.rows, C::BM);
    /* Split over blocks (partials in scratch, then mm_reduce) when the
     * tiles alone leave resident blocks idle and the partials are small
     * next to the work (few tokens); the sum is the same either way. */
    const size_t part_bytes = (size_t)p.S * (size_t)p.n * (size_t)p.rows * sizeof(float);
    const bool split_z = p.S > 1 && ttiles * rtiles < slots && part_bytes <= ((size_t)16 << 20);
    float *part = NULL;
    if (split_z) {
        part = (float *)tdm_cuda_scratch(cb, part_bytes);
        p.out = part;
        p.ldo = p.rows;
        p.zstride = p.n * p.rows;
        p.split_z = 1;
    } else {
        p.out = y;
        p.ldo = ldy;
        p.zstride = 0;
        p.split_z = 0;
    }
    void (*fn)(const mm_params_t) = mm_kernel<WT, WM, WN, MT, NTW, KD, NST>;
    dim3 grid((unsigned)ttiles, (unsigned)rtiles, split_z ? (unsigned)p.S : 1u);
    fn<<<grid, C::NT, C::SMEM, cb->stream>>>(p);
    TDM_CUDA_LAUNCHED("mm_kernel");
    if (split_z) {
        int64_t total = p.n * p.rows, nblk = tdm_cuda_div_up(total, 256);
        if (nblk > 8 * (int64_t)cb->n_sm)
            nblk = 8 * (int64_t)cb->n_sm;
        mm_reduce<<<(unsigned)nblk, 256, 0, cb->stream>>>(part, p.S, p.n, p.rows, y, ldy);
        TDM_CUDA_LAUNCHED("mm_reduce");
    }
}

template <uint32_t WT>
static void mm_run(tdm_cuda_backend_t *cb, const tdm_bweight_t *w, const void *act, int64_t n,
                   float *y, int64_t ldy)
{
    constexpr bool F16 = WT == TDM_DTYPE_F16;
    constexpr int KD_D = F16 ? 128 : 256, KD_M = F16 ? 64 : 128, KD_P = 64, NST_P = 3;
    /* all three on the first use, so that a graph capture later never
     * meets a configuration for the first time */
    mm_optin<WT, 4, 1, 1, 1, KD_D, 4>(cb->device);
    mm_optin<WT, 4, 1, 1, 4, KD_M, 4>(cb->device);
    mm_optin<WT, 2, 2, 2, 8, KD_P, NST_P>(cb->device);
    /* the device's resident decode blocks, which the split count fits */
    int slots = cb->mm_slots[WT & 63];
    if (slots == 0) {
        int per_sm = 0;
        TDM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, mm_kernel<WT, 4, 1, 1, 1, KD_D, 4>, 128,
            (size_t)mm_cfg<WT, 4, 1, 1, 1, KD_D, 4>::SMEM));
        slots = (per_sm > 0 ? per_sm : 1) * (cb->n_sm > 0 ? cb->n_sm : 1);
        cb->mm_slots[WT & 63] = slots;
    }
    mm_params_t p;
    p.w = (const uint8_t *)w->data;
    p.rows = w->rows;
    p.row_bytes = (int64_t)w->row_bytes;
    p.wbytes = w->rows * (int64_t)w->row_bytes;
    p.k = (int32_t)w->k;
    p.nb = mm_nblocks(w->k);
    p.kp = p.nb * 32;
    p.nsc = (p.nb + MM_SC_BLOCKS - 1) / MM_SC_BLOCKS;
    p.S = mm_splits(w->rows, w->k, slots);
    p.x = (const uint16_t *)act;
    p.xsum = mm_ly<WT>::NXS > 0 ? (const float *)(p.x + (size_t)n * (size_t)p.kp) : NULL;
    p.n = n;
    p.al8 = (w->row_bytes & 7) == 0;
    p.out = y;
    p.ldo = ldy;
    p.zstride = 0;
    p.split_z = 0;
    if (n <= 8)
        mm_launch<WT, 4, 1, 1, 1, KD_D, 4>(cb, p, y, ldy, slots);
    else if (n <= 32)
        mm_launch<WT, 4, 1, 1, 4, KD_M, 4>(cb, p, y, ldy, slots);
    else
        mm_launch<WT, 2, 2, 2, 8, KD_P, NST_P>(cb, p, y, ldy, slots);
}

extern "C" void cuda_matmul(tdm_backend_t *be, const tdm_bweight_t *w, const void *act, int64_t n,
                            float *y, int64_t ldy)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    if (n <= 0 || w->rows <= 0)
        return;
    const dim3 fgrid((unsigned)tdm_cuda_div_up(w->rows, 8), (unsigned)(n < 1024 ? n : 1024));
    const uint8_t *wd = (const uint8_t *)w->data;
    switch (w->dev) {
    case TDM_DTYPE_F16: mm_run<TDM_DTYPE_F16>(cb, w, act, n, y, ldy); break;
#define MM_CASE(T)                                                                                 \
    case T: mm_run<T>(cb, w, act, n, y, ldy); break;
        TDM_CUDA_FOR_EACH_QDEV(MM_CASE)
#undef MM_CASE
    case TDM_DTYPE_F32:
        mm_f32_kernel<TDM_DTYPE_F32>
            <<<fgrid, 256, 0, cb->stream>>>(wd, w->rows, w->k, (const float *)act, n, y, ldy);
        TDM_CUDA_LAUNCHED("mm_f32_kernel");
        break;
    case TDM_DTYPE_BF16:
        mm_f32_kernel<TDM_DTYPE_BF16>
            <<<fgrid, 256, 0, cb->stream>>>(wd, w->rows, w->k, (const float *)act, n, y, ldy);
        TDM_CUDA_LAUNCHED("mm_f32_kernel");
        break;
    default: break; /* weight_load refuses other types */
    }
}
