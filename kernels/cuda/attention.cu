/* tandem CUDA backend: paged KV cache write and paged attention.
 *
 * THE ROW PROGRAM. Every (query row t, head h) output is the result of one
 * fixed sequence of operations that depends only on q[t][h], on the K/V
 * rows of positions < ctx = ctx_len[t] and on head_dim:
 *  - q' = f16(q * (scale * log2 e)): scores come out in the log2 domain.
 *  - Positions are cut into key tiles of ATT_KT = 64 (tile i holds
 *    [64i, 64i + 64)); T = ceil(ctx / 64) tiles, grouped into chunks of
 *    Lt = max(4, ceil(T / 16)) tiles: at most 16 chunks, 256 positions each
 *    up to 4096 positions, longer beyond. Chunk c is tiles [c Lt, c Lt + Lt).
 *  - A chunk starts from m = -inf, l = 0, o = 0; per tile, in order:
 *    s = q'.K by mma.m16n8k16 (f16 in, f32 accumulate, head dims in steps
 *    of 16 ascending); s = -inf at positions >= ctx; mx = max of the tile;
 *    mn = max(m, mx); mu = mn, or 0 while mn is -inf; alpha = ex2(m - mu);
 *    p = f16(ex2(s - mu)); l = fma(l, alpha, sum p) (lane-local ascending,
 *    then the quad butterfly); o = o * alpha, then o += P.V by mma
 *    (positions in steps of 16 ascending); m = mn.
 *  - The chunks are folded in order 0, 1, 2, ... into M = -inf, L = 0,
 *    A = 0: Mn = max(M, m_c), mu = Mn or 0, a = ex2(M - mu),
 *    b = ex2(m_c - mu), L = fma(L, a, l_c b), A = fma(A, a, o_c b), M = Mn.
 *  - out = A / L (IEEE division); 0 when ctx <= 0.
 *
 * WHO RUNS IT. A row belongs to a "run" when at least ATT_RUN consecutive
 * rows of the batch share its table (a prefill chunk); those rows go to the
 * tile kernel, all others (decode rows) to the row kernel. Both kernels
 * compute the classification from table_of_row alone, so each row is done
 * by exactly one of them. The host launches only the kernels some row
 * needs when the params' run hints say so (a decode step: no tile kernel).
 *  - attn_tile_kernel (prefill): a block of 4 warps owns 64 mma rows: QR =
 *    64 / HG consecutive query rows x HG = min(group, 64) heads of one kv
 *    head; warp w holds mma rows 16w..16w+15 (Q fragments in registers,
 *    o in registers, the chunk fold A in shared memory, private per lane).
 *    The block streams 64-position K and V tiles of its rows' table through
 *    shared memory (cp.async; K of the next tile lands during P.V, V of the
 *    next during the next scores) up to the longest context among its
 *    rows, and folds each row at that row's own chunk ends. Rows with other
 *    tables in the same block are done in further passes (one per table;
 *    one pass in a plain prefill). Blocks start with the last rows (the
 *    longest contexts). A long context with few rows runs on few blocks:
 *    prefill does not split the KV length.
 *  - attn_row_kernel (decode): one warp per (row, kv head, 16 heads of the
 *    group, chunk lane); its 16 mma rows are the row's heads. S lanes = 1:
 *    the warp walks all tiles and folds as the tile kernel does. S > 1
 *    (few rows: more parallelism): lane k computes chunks k, k + S, ...
 *    each into (m, l, o) partials in tdm_cuda_scratch, and
 *    attn_combine_kernel folds them in chunk order; a row with one chunk is
 *    folded and written by its warp directly.
 *  S (from n, the SM count and the scratch it would take), QR and the pass
 *  structure only decide who computes which row; they never change a row's
 *  program. Partials are indexed by chunk, up to maxch per row: the most a
 *  context of bt_stride x block_size positions (what a table holds) has.
 *  Head dims other than 64 and 128 go to attention_basic.cu, whatever the
 *  batch.
 *
 * WHY THE BITS ARE THE SAME EVERYWHERE. An mma's output row depends only on
 * its own A row (the other 15 rows may be other heads, other rows, zeros);
 * the mask reads only the row's own ctx; shared K/V tiles hold the cache's
 * values at every position < ctx of the row (positions past it are masked
 * to p = 0: zeros or other rows' values, which add exact zeros as long as
 * the cache holds finite values there); a row past its last tile in a
 * longer pass keeps computing values that are never folded; the softmax
 * and fold arithmetic is one set of __device__ functions written with
 * __fmaf_rn/__fmul_rn/__fadd_rn/__fsub_rn (no contraction can differ) and
 * ex2.approx (a fixed function); the partials go through scratch as f32
 * unchanged. So a row alone (n = 1, split), in a decode batch (fold in one
 * warp) or inside a prefill tile gives identical bits. The one exception:
 * a non-finite V at a position some rows of a prefill block attend and
 * others do not makes 0 x inf = NaN in the latter (the former, and the CPU,
 * are non-finite there anyway). The last row of a prefill has the block's
 * longest context and is never such a row.
 *
 * COST. FLOPs: 4 x rows x heads x ctx x head_dim on tensor cores (mma rows
 * padded to 16: decode with group g runs 16/g times that; prefill blocks
 * compute whole 64-position tiles up to their longest row). Bytes: K and V
 * of every position once per (block, kv head) for prefill (QR rows share
 * them) and once per (row, kv head) for decode (the group's heads share
 * them): 4 x ctx x head_dim per kv head; q read and out written once
 * (4 bytes per element); decode splits add (head_dim + 2) x 4 bytes per
 * chunk and head, written and read back.
 *
 * kv_write: one block per row, f32 -> f16 round to nearest even (NaN as
 * the CPU's sign | 0x7e00), rows with slot < 0 skipped (padding). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention.cuh"
#include "attention_basic.cuh"
#include "tandem/log.h"

#define ATT_KT         64 /* positions per key tile */
#define ATT_MINT       4  /* tiles per chunk at least */
#define ATT_MAXCH      16 /* chunks per row at most */
#define ATT_RUN        4  /* rows sharing a table that make a prefill run */
#define ATT_TILE_WARPS 4
#define ATT_TILE_ROWS  (ATT_TILE_WARPS * 16) /* mma rows per tile block */
/* Decode rows are split over chunk lanes when they give fewer than
 * ATT_SPLIT_WARPS_PER_SM warps per SM, aiming at ATT_SPLIT_TARGET, if the
 * partials fit in ATT_SPLIT_BYTES of scratch (what the backend starts with,
 * so splitting never grows it). Scheduling only: the bits do not change. */
#define ATT_SPLIT_WARPS_PER_SM 4
#define ATT_SPLIT_TARGET       8
#define ATT_SPLIT_BYTES        ((size_t)64 << 20)

typedef struct attn_args {
    const float *q;
    const __half *ck, *cv;
    float *out;
    const int32_t *ctx_len, *block_tables, *table_of_row;
    int64_t n, kv_dim;
    int32_t n_heads, n_kv, group, bt_stride, bs, bs_shift; /* bs_shift: log2 bs, -1 if none */
    float qscale;                                          /* scale * log2(e) */
    int32_t hg, slices;                                    /* tile kernel: heads per block */
    int32_t dslices, lanes, maxch;                         /* row kernel */
    int64_t units;
    float *part, *pml; /* split partials: [n][n_heads][maxch][hd] and [..][2] */
} attn_args_t;

/* ---- small device helpers ---- */

static __device__ __forceinline__ void cp_async16(void *dst, const void *src, int bytes)
{
    uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes)
                 : "memory");
}

static __device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N> static __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

static __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const __half *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

static __device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const __half *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

/* c += a . b for one 16x8x16 step (PTX ISA fragment layouts). */
static __device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* 2^x; -inf gives +0. One fixed instruction, the same in every kernel. */
static __device__ __forceinline__ float ex2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

static __device__ __forceinline__ uint32_t h2_bits(__half2 h)
{
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
}

template <int NT> static __device__ __forceinline__ void block_sync()
{
    if (NT == 32)
        __syncwarp();
    else
        __syncthreads();
}

/* Tiles per chunk for a row of T tiles (the split rule: ctx only). */
static __host__ __device__ __forceinline__ int chunk_tiles(int T)
{
    int c = (T + ATT_MAXCH - 1) / ATT_MAXCH;
    return c > ATT_MINT ? c : ATT_MINT;
}

static __device__ __forceinline__ int tiles_of(int ctx)
{
    return ctx > 0 ? (ctx + ATT_KT - 1) / ATT_KT : 0;
}

/* Whether row t is in a run of at least ATT_RUN rows with its table. */
static __device__ bool row_in_run(const int32_t *__restrict__ tor, int64_t n, int64_t t)
{
    if (n < ATT_RUN)
        return false;
    const int32_t tb = tor[t];
    int cnt = 1;
    for (int64_t u = t - 1; u >= 0 && cnt < ATT_RUN && tor[u] == tb; u--)
        cnt++;
    for (int64_t u = t + 1; u < n && cnt < ATT_RUN && tor[u] == tb; u++)
        cnt++;
    return cnt >= ATT_RUN;
}

/* The fold of one chunk (m_c) into the running (M): the two scales. */
static __device__ __forceinline__ void fold_scales(float M, float mc, float &mn, float &fa,
                                                   float &fb)
{
    mn = fmaxf(M, mc);
    float mu = mn == -INFINITY ? 0.0f : mn;
    fa = ex2(__fsub_rn(M, mu));
    fb = ex2(__fsub_rn(mc, mu));
}

static __device__ __forceinline__ float fold_val(float acc, float fa, float x, float fb)
{
    return __fmaf_rn(acc, fa, __fmul_rn(x, fb));
}

static __device__ __forceinline__ float finish(float A, float L, int ctx)
{
    return ctx > 0 ? __fdiv_rn(A, L) : 0.0f;
}

/* ---- the tile step ---- */

/* Q fragments (A operand, rows g and g + 8 of the warp's 16) from f32 rows
 * q0 / q1 (NULL: a padding row of zeros), scaled and rounded to f16. */
template <int HD>
static __device__ __forceinline__ void load_q(uint32_t (&qf)[HD / 16][4], const float *q0,
                                              const float *q1, float sc)
{
    const int c = threadIdx.x & 3;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const int d = 16 * kk + 2 * c;
        float2 z = make_float2(0.0f, 0.0f);
        float2 a0 = q0 ? *(const float2 *)(q0 + d) : z, a2 = q0 ? *(const float2 *)(q0 + d + 8) : z;
        float2 a1 = q1 ? *(const float2 *)(q1 + d) : z, a3 = q1 ? *(const float2 *)(q1 + d + 8) : z;
        qf[kk][0] = h2_bits(__floats2half2_rn(__fmul_rn(a0.x, sc), __fmul_rn(a0.y, sc)));
        qf[kk][1] = h2_bits(__floats2half2_rn(__fmul_rn(a1.x, sc), __fmul_rn(a1.y, sc)));
        qf[kk][2] = h2_bits(__floats2half2_rn(__fmul_rn(a2.x, sc), __fmul_rn(a2.y, sc)));
        qf[kk][3] = h2_bits(__floats2half2_rn(__fmul_rn(a3.x, sc), __fmul_rn(a3.y, sc)));
    }
}

/* Stages the K or V rows of positions [pos0, pos0 + 64) of kv head kvh into
 * dst ([64][HD + 8] f16); positions >= limit are zero-filled, their table
 * entries never read. */
template <int HD, int NT>
static __device__ __forceinline__ void load_tile(__half *dst, const __half *cache,
                                                 const attn_args_t &a, const int32_t *table,
                                                 int kvh, int pos0, int limit)
{
    constexpr int PR = HD / 8, SROW = HD + 8, RSTEP = NT / PR;
    static_assert(NT % PR == 0, "whole rows per thread step");
    const int pc = (int)threadIdx.x % PR;
#pragma unroll(NT == 32 ? 8 : 4)
    for (int r = (int)threadIdx.x / PR; r < ATT_KT; r += RSTEP) {
        const int pos = pos0 + r;
        const __half *src = cache;
        int bytes = 0;
        if (pos < limit) {
            int blk, off;
            if (a.bs_shift >= 0) {
                blk = pos >> a.bs_shift;
                off = pos & (a.bs - 1);
            } else {
                blk = pos / a.bs;
                off = pos - blk * a.bs;
            }
            int64_t slot = (int64_t)table[blk] * a.bs + off;
            src = cache + slot * a.kv_dim + (int64_t)kvh * HD + pc * 8;
            bytes = 16;
        }
        cp_async16(dst + r * SROW + pc * 8, src, bytes);
    }
}

/* s = q'.K^T for the warp's 16 rows and the 64 staged positions. */
template <int HD>
static __device__ __forceinline__ void tile_scores(const uint32_t (&qf)[HD / 16][4],
                                                   const __half *ks, float (&s)[ATT_KT / 8][4])
{
    constexpr int SROW = HD + 8;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < ATT_KT / 8; j++)
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int k2 = 0; k2 < HD / 32; k2++)
#pragma unroll
        for (int j = 0; j < ATT_KT / 8; j++) {
            /* matrices: positions 8j.., dims 32k2 + 0/8/16/24 */
            uint32_t b[4];
            ldsm_x4(b, ks + (8 * j + (lane & 7)) * SROW + 32 * k2 + 8 * (lane >> 3));
            mma_16816(s[j], qf[2 * k2], b[0], b[1]);
            mma_16816(s[j], qf[2 * k2 + 1], b[2], b[3]);
        }
}

/* The online-softmax step of one tile: masks s, updates m and l, rescales
 * o, leaves P as f16 A fragments in ph ([n-tile][row half]). */
template <int HD>
static __device__ __forceinline__ void
tile_softmax(float (&s)[ATT_KT / 8][4], uint32_t (&ph)[ATT_KT / 8][2], float (&m)[2], float (&l)[2],
             float (&o)[HD / 8][4], int pos0, const int (&ctx)[2])
{
    const int c = threadIdx.x & 3;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < ATT_KT / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int pos = pos0 + 8 * j + 2 * c + (e & 1), r = e >> 1;
            const float v = pos < ctx[r] ? s[j][e] : -INFINITY;
            s[j][e] = v;
            mx[r] = fmaxf(mx[r], v);
        }
    float mu[2], alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float mn = fmaxf(m[r], mx[r]);
        mu[r] = mn == -INFINITY ? 0.0f : mn;
        alpha[r] = ex2(__fsub_rn(m[r], mu[r]));
        m[r] = mn;
    }
#pragma unroll
    for (int j = 0; j < ATT_KT / 8; j++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            __half2 h = __floats2half2_rn(ex2(__fsub_rn(s[j][2 * r], mu[r])),
                                          ex2(__fsub_rn(s[j][2 * r + 1], mu[r])));
            sum[r] = __fadd_rn(__fadd_rn(sum[r], __low2float(h)), __high2float(h));
            ph[j][r] = h2_bits(h);
        }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        sum[r] = __fadd_rn(sum[r], __shfl_xor_sync(0xffffffffu, sum[r], 1));
        sum[r] = __fadd_rn(sum[r], __shfl_xor_sync(0xffffffffu, sum[r], 2));
        l[r] = __fmaf_rn(l[r], alpha[r], sum[r]);
    }
#pragma unroll
    for (int dn = 0; dn < HD / 8; dn++) {
        o[dn][0] = __fmul_rn(o[dn][0], alpha[0]);
        o[dn][1] = __fmul_rn(o[dn][1], alpha[0]);
        o[dn][2] = __fmul_rn(o[dn][2], alpha[1]);
        o[dn][3] = __fmul_rn(o[dn][3], alpha[1]);
    }
}

/* o += P.V for the 64 staged positions. */
template <int HD>
static __device__ __forceinline__ void tile_pv(const uint32_t (&ph)[ATT_KT / 8][2],
                                               const __half *vs, float (&o)[HD / 8][4])
{
    constexpr int SROW = HD + 8;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kp = 0; kp < ATT_KT / 16; kp++) {
        const uint32_t pa[4] = {ph[2 * kp][0], ph[2 * kp][1], ph[2 * kp + 1][0], ph[2 * kp + 1][1]};
#pragma unroll
        for (int d2 = 0; d2 < HD / 16; d2++) {
            /* matrices: positions 16kp + 0/8, dims 16d2 + 0/8 (transposed) */
            uint32_t b[4];
            ldsm_x4_t(b, vs + (16 * kp + (lane & 7) + 8 * ((lane >> 3) & 1)) * SROW + 16 * d2 +
                             8 * (lane >> 4));
            mma_16816(o[2 * d2], pa, b[0], b[1]);
            mma_16816(o[2 * d2 + 1], pa, b[2], b[3]);
        }
    }
}

/* Tiles [kt0, kt1) of one table for the block's NT threads (every warp runs
 * it with the same arguments but its own rows). FOLD: rows fold at their
 * chunk ends into (M, L) and the lane's A slots `as`; otherwise (one chunk)
 * (m, l, o) are left for the caller. */
template <int HD, int NT, bool FOLD>
static __device__ __forceinline__ void
attn_pass(const attn_args_t &a, const int32_t *table, int kvh, int kt0, int kt1, int limit,
          const uint32_t (&qf)[HD / 16][4], const int (&ctx)[2], __half *ks, __half *vs, float *as,
          float (&o)[HD / 8][4], float (&m)[2], float (&l)[2], float (&M)[2], float (&L)[2])
{
    const int lane = threadIdx.x & 31;
    int T[2], Lt[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        T[r] = tiles_of(ctx[r]);
        Lt[r] = chunk_tiles(T[r]);
        m[r] = -INFINITY;
        l[r] = 0.0f;
        M[r] = -INFINITY;
        L[r] = 0.0f;
    }
#pragma unroll
    for (int dn = 0; dn < HD / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            o[dn][e] = 0.0f;
            if (FOLD)
                as[(dn * 4 + e) * 32 + lane] = 0.0f;
        }
    block_sync<NT>(); /* the previous pass is done with ks / vs */
    if (kt0 >= kt1)
        return;
    load_tile<HD, NT>(ks, a.ck, a, table, kvh, kt0 * ATT_KT, limit);
    cp_async_commit();
    load_tile<HD, NT>(vs, a.cv, a, table, kvh, kt0 * ATT_KT, limit);
    cp_async_commit();
    /* Groups in flight at each wait: {K(kt), V(kt)} then {V(kt), K(kt+1)};
     * an empty group is committed where there is no next tile. */
    for (int kt = kt0; kt < kt1; kt++) {
        float s[ATT_KT / 8][4];
        uint32_t ph[ATT_KT / 8][2];
        cp_async_wait<1>();
        block_sync<NT>(); /* K(kt) visible to all */
        tile_scores<HD>(qf, ks, s);
        tile_softmax<HD>(s, ph, m, l, o, kt * ATT_KT, ctx);
        block_sync<NT>(); /* everyone is done reading ks */
        if (kt + 1 < kt1)
            load_tile<HD, NT>(ks, a.ck, a, table, kvh, (kt + 1) * ATT_KT, limit);
        cp_async_commit();
        cp_async_wait<1>();
        block_sync<NT>(); /* V(kt) visible to all */
        tile_pv<HD>(ph, vs, o);
        block_sync<NT>(); /* everyone is done reading vs */
        if (kt + 1 < kt1)
            load_tile<HD, NT>(vs, a.cv, a, table, kvh, (kt + 1) * ATT_KT, limit);
        cp_async_commit();
        if (FOLD) {
#pragma unroll
            for (int r = 0; r < 2; r++)
                if (kt < T[r] && (kt + 1 == T[r] || (kt + 1) % Lt[r] == 0)) {
                    float mn, fa, fb;
                    fold_scales(M[r], m[r], mn, fa, fb);
                    L[r] = fold_val(L[r], fa, l[r], fb);
                    M[r] = mn;
#pragma unroll
                    for (int dn = 0; dn < HD / 8; dn++)
#pragma unroll
                        for (int e = 2 * r; e < 2 * r + 2; e++) {
                            float *ap = as + (dn * 4 + e) * 32 + lane;
                            *ap = fold_val(*ap, fa, o[dn][e], fb);
                            o[dn][e] = 0.0f;
                        }
                    m[r] = -INFINITY;
                    l[r] = 0.0f;
                }
        }
    }
    cp_async_wait<0>();
}

/* out rows (g, g + 8 of the warp) from the folded A in `as`. */
template <int HD>
static __device__ __forceinline__ void write_folded(const float *as, const float (&L)[2],
                                                    const int (&ctx)[2], float *o0, float *o1)
{
    const int lane = threadIdx.x & 31, c = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float *op = r ? o1 : o0;
        if (op == NULL)
            continue;
#pragma unroll
        for (int dn = 0; dn < HD / 8; dn++) {
            float2 v;
            v.x = finish(as[(dn * 4 + 2 * r) * 32 + lane], L[r], ctx[r]);
            v.y = finish(as[(dn * 4 + 2 * r + 1) * 32 + lane], L[r], ctx[r]);
            *(float2 *)(op + 8 * dn + 2 * c) = v;
        }
    }
}

/* ---- kernels ---- */

template <int HD> static constexpr size_t tile_smem()
{
    return (size_t)2 * ATT_KT * (HD + 8) * sizeof(__half) +
           (size_t)ATT_TILE_WARPS * 16 * HD * sizeof(float);
}

template <int HD> static constexpr size_t row_smem()
{
    return (size_t)2 * ATT_KT * (HD + 8) * sizeof(__half) + (size_t)16 * HD * sizeof(float);
}

/* Prefill runs. Grid: x = blocks of QR rows, y = kv head x head slice. */
template <int HD>
static __global__ void __launch_bounds__(ATT_TILE_WARPS * 32) attn_tile_kernel(attn_args_t a)
{
    extern __shared__ __align__(16) unsigned char att_smem[];
    __shared__ int32_t tor_s[ATT_TILE_ROWS], ctx_s[ATT_TILE_ROWS];
    __shared__ int32_t run_s[ATT_TILE_ROWS];
    __half *ks = (__half *)att_smem, *vs = ks + ATT_KT * (HD + 8);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2;
    float *as = (float *)(vs + ATT_KT * (HD + 8)) + warp * 16 * HD;
    const int hg = a.hg, qr = ATT_TILE_ROWS / hg;
    /* the last rows of a prefill have the longest contexts: start them first */
    const int64_t t0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * qr;
    const int kvh = (int)blockIdx.y / a.slices, slice = (int)blockIdx.y % a.slices;
    if (tid < qr) {
        const int64_t t = t0 + tid;
        const bool in = t < a.n;
        tor_s[tid] = in ? a.table_of_row[t] : -1;
        ctx_s[tid] = in ? a.ctx_len[t] : 0;
        run_s[tid] = in && row_in_run(a.table_of_row, a.n, t);
    }
    __syncthreads();
    uint64_t left = 0;
    for (int r = 0; r < qr; r++)
        if (run_s[r])
            left |= 1ull << r;
    if (left == 0)
        return; /* the whole block agrees */

    int rr[2], head[2];
    bool ok[2];
    const float *qp[2];
#pragma unroll
    for (int e = 0; e < 2; e++) {
        const int i = warp * 16 + g + 8 * e, hh = slice * hg + i % hg;
        rr[e] = i / hg;
        ok[e] = i < qr * hg && hh < a.group && t0 + rr[e] < a.n;
        head[e] = kvh * a.group + hh;
        qp[e] = ok[e] ? a.q + ((t0 + rr[e]) * a.n_heads + head[e]) * HD : NULL;
    }
    uint32_t qf[HD / 16][4];
    load_q<HD>(qf, qp[0], qp[1], a.qscale);

    while (left != 0) {
        const int32_t tbl = tor_s[__ffsll((long long)left) - 1];
        uint64_t act = 0;
        int limit = 0;
        for (int r = 0; r < qr; r++)
            if (((left >> r) & 1) && tor_s[r] == tbl) {
                act |= 1ull << r;
                limit = ctx_s[r] > limit ? ctx_s[r] : limit;
            }
        left &= ~act;
        int ctx[2];
        float *op[2];
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const bool on = ok[e] && ((act >> rr[e]) & 1);
            ctx[e] = on ? ctx_s[rr[e]] : 0;
            op[e] = on ? a.out + ((t0 + rr[e]) * a.n_heads + head[e]) * HD : NULL;
        }
        float o[HD / 8][4], m[2], l[2], M[2], L[2];
        attn_pass<HD, ATT_TILE_WARPS * 32, true>(a, a.block_tables + (int64_t)tbl * a.bt_stride,
                                                 kvh, 0, tiles_of(limit), limit, qf, ctx, ks, vs,
                                                 as, o, m, l, M, L);
        write_folded<HD>(as, L, ctx, op[0], op[1]);
    }
}

/* Decode rows. One warp per unit (row, kv head, 16-head slice, chunk lane),
 * units walked grid-stride. */
template <int HD> static __global__ void __launch_bounds__(32) attn_row_kernel(attn_args_t a)
{
    extern __shared__ __align__(16) unsigned char att_smem[];
    __half *ks = (__half *)att_smem, *vs = ks + ATT_KT * (HD + 8);
    float *as = (float *)(vs + ATT_KT * (HD + 8));
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    for (int64_t u = blockIdx.x; u < a.units; u += gridDim.x) {
        const int cl = (int)(u % a.lanes);
        int64_t rest = u / a.lanes;
        const int slice = (int)(rest % a.dslices);
        rest /= a.dslices;
        const int kvh = (int)(rest % a.n_kv);
        const int64_t t = rest / a.n_kv;
        if (row_in_run(a.table_of_row, a.n, t))
            continue;
        const int ctxt = a.ctx_len[t], T = tiles_of(ctxt), Lt = chunk_tiles(T);
        const int nch = (T + Lt - 1) / Lt;
        if (cl > 0 && cl >= nch)
            continue;
        const int32_t *table = a.block_tables + (int64_t)a.table_of_row[t] * a.bt_stride;
        int ctx[2], head[2];
        bool ok[2];
        const float *qp[2];
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int hh = slice * 16 + g + 8 * e;
            ok[e] = hh < a.group;
            head[e] = kvh * a.group + hh;
            ctx[e] = ok[e] ? ctxt : 0;
            qp[e] = ok[e] ? a.q + (t * a.n_heads + head[e]) * HD : NULL;
        }
        uint32_t qf[HD / 16][4];
        load_q<HD>(qf, qp[0], qp[1], a.qscale);
        float o[HD / 8][4], m[2], l[2], M[2], L[2];
        if (a.lanes == 1) {
            attn_pass<HD, 32, true>(a, table, kvh, 0, T, ctxt, qf, ctx, ks, vs, as, o, m, l, M, L);
            float *op[2];
#pragma unroll
            for (int e = 0; e < 2; e++)
                op[e] = ok[e] ? a.out + (t * a.n_heads + head[e]) * HD : NULL;
            write_folded<HD>(as, L, ctx, op[0], op[1]);
        } else if (nch <= 1) {
            /* one chunk: fold it into the empty state here, as the combine would */
            attn_pass<HD, 32, false>(a, table, kvh, 0, T, ctxt, qf, ctx, ks, vs, as, o, m, l, M, L);
#pragma unroll
            for (int r = 0; r < 2; r++) {
                if (!ok[r])
                    continue;
                float mn, fa, fb;
                fold_scales(-INFINITY, m[r], mn, fa, fb);
                const float Lr = fold_val(0.0f, fa, l[r], fb);
                float *op = a.out + (t * a.n_heads + head[r]) * HD;
#pragma unroll
                for (int dn = 0; dn < HD / 8; dn++) {
                    float2 v;
                    v.x = finish(fold_val(0.0f, fa, o[dn][2 * r], fb), Lr, ctx[r]);
                    v.y = finish(fold_val(0.0f, fa, o[dn][2 * r + 1], fb), Lr, ctx[r]);
                    *(float2 *)(op + 8 * dn + 2 * c) = v;
                }
            }
        } else {
            for (int ch = cl; ch < nch; ch += a.lanes) {
                const int k0 = ch * Lt, k1 = k0 + Lt < T ? k0 + Lt : T;
                attn_pass<HD, 32, false>(a, table, kvh, k0, k1, ctxt, qf, ctx, ks, vs, as, o, m, l,
                                         M, L);
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    if (!ok[r])
                        continue;
                    const int64_t pi = (t * a.n_heads + head[r]) * a.maxch + ch;
                    float *pp = a.part + pi * HD;
#pragma unroll
                    for (int dn = 0; dn < HD / 8; dn++)
                        *(float2 *)(pp + 8 * dn + 2 * c) =
                            make_float2(o[dn][2 * r], o[dn][2 * r + 1]);
                    if (c == 0) {
                        a.pml[2 * pi] = m[r];
                        a.pml[2 * pi + 1] = l[r];
                    }
                }
            }
        }
    }
}

/* Folds the split partials of decode rows with more than one chunk, in
 * chunk order. One block per row (grid-stride), a thread per (head, dim). */
template <int HD> static __global__ void __launch_bounds__(128) attn_combine_kernel(attn_args_t a)
{
    for (int64_t t = blockIdx.x; t < a.n; t += gridDim.x) {
        if (row_in_run(a.table_of_row, a.n, t))
            continue;
        const int ctxt = a.ctx_len[t], T = tiles_of(ctxt), Lt = chunk_tiles(T);
        const int nch = (T + Lt - 1) / Lt;
        if (nch <= 1)
            continue;
        for (int idx = threadIdx.x; idx < a.n_heads * HD; idx += blockDim.x) {
            const int h = idx / HD, d = idx % HD;
            const int64_t p0 = (t * a.n_heads + h) * a.maxch;
            float M = -INFINITY, L = 0.0f, A = 0.0f;
            for (int ch = 0; ch < nch; ch++) {
                float mn, fa, fb;
                fold_scales(M, a.pml[2 * (p0 + ch)], mn, fa, fb);
                L = fold_val(L, fa, a.pml[2 * (p0 + ch) + 1], fb);
                A = fold_val(A, fa, a.part[(p0 + ch) * HD + d], fb);
                M = mn;
            }
            a.out[(t * a.n_heads + h) * HD + d] = finish(A, L, ctxt);
        }
    }
}

/* ---- host ---- */

template <int HD>
static void attention_launch(tdm_cuda_backend_t *cb, attn_args_t a, const tdm_attn_params_t *p)
{
    const int n_sm = cb->n_sm > 0 ? cb->n_sm : 132;
    /* the hints, where given, say which kernel has no row: a decode step
     * launches no tile kernel, a lone prefill chunk no row kernel */
    const bool no_runs = p->longest_run > 0 && p->longest_run < ATT_RUN;
    const bool all_runs = p->shortest_run >= ATT_RUN;
    if (a.n >= ATT_RUN && !no_runs) {
        a.hg = a.group < ATT_TILE_ROWS ? a.group : ATT_TILE_ROWS;
        a.slices = (a.group + a.hg - 1) / a.hg;
        const int qr = ATT_TILE_ROWS / a.hg;
        const size_t smem = tile_smem<HD>();
        if (smem > cb->smem_optin) {
            tdm_log_error("cuda",
                          "attention: %zu bytes of shared memory per block needed, %zu here", smem,
                          cb->smem_optin);
            abort();
        }
        static unsigned long long optin_done; /* one bit per device */
        const unsigned long long bit = 1ull << (cb->device & 63);
        if (!(__atomic_load_n(&optin_done, __ATOMIC_ACQUIRE) & bit)) {
            TDM_CUDA_CHECK(cudaFuncSetAttribute(
                attn_tile_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
            __atomic_fetch_or(&optin_done, bit, __ATOMIC_RELEASE);
        }
        dim3 grid((unsigned)tdm_cuda_div_up(a.n, qr), (unsigned)(a.n_kv * a.slices));
        attn_tile_kernel<HD><<<grid, ATT_TILE_WARPS * 32, smem, cb->stream>>>(a);
        TDM_CUDA_LAUNCHED("attn_tile_kernel");
    }

    if (all_runs)
        return;

    /* Chunk lanes for decode rows: only where the rows alone leave SMs idle.
     * The partials are indexed by chunk, at most maxch per row (the longest
     * context a table can hold), so S never changes what is computed. */
    a.dslices = (a.group + 15) / 16;
    const int64_t units1 = a.n * a.n_kv * a.dslices;
    const int64_t tmax = tdm_cuda_div_up((int64_t)p->bt_stride * p->block_size, ATT_KT);
    const int64_t mc = tdm_cuda_div_up(tmax, ATT_MINT);
    a.maxch = (int32_t)(mc < ATT_MAXCH ? (mc > 0 ? mc : 1) : ATT_MAXCH);
    a.lanes = 1;
    if (units1 < (int64_t)ATT_SPLIT_WARPS_PER_SM * n_sm && a.maxch > 1) {
        int64_t want = tdm_cuda_div_up((int64_t)ATT_SPLIT_TARGET * n_sm, units1);
        size_t bytes = (size_t)a.n * a.n_heads * a.maxch * (HD + 2) * sizeof(float);
        if (bytes <= ATT_SPLIT_BYTES) {
            a.lanes = (int32_t)(want < a.maxch ? want : a.maxch);
            a.part = (float *)tdm_cuda_scratch(cb, bytes);
            a.pml = a.part + (size_t)a.n * a.n_heads * a.maxch * HD;
        }
    }
    a.units = units1 * a.lanes;
    const int64_t cap = (int64_t)64 * n_sm;
    const size_t smem = row_smem<HD>();
    static_assert(row_smem<HD>() <= 48 * 1024, "the row kernel runs without an opt-in");
    attn_row_kernel<HD><<<(unsigned)(a.units < cap ? a.units : cap), 32, smem, cb->stream>>>(a);
    TDM_CUDA_LAUNCHED("attn_row_kernel");
    if (a.lanes > 1) {
        const int64_t blocks = a.n < cap ? a.n : cap;
        attn_combine_kernel<HD><<<(unsigned)blocks, 128, 0, cb->stream>>>(a);
        TDM_CUDA_LAUNCHED("attn_combine_kernel");
    }
}

extern "C" void cuda_attention(tdm_backend_t *be, const tdm_attn_params_t *p, const float *q,
                               const uint16_t *cache_k, const uint16_t *cache_v, float *out)
{
    if (p->n <= 0)
        return;
    if (p->n_kv_heads <= 0 || p->n_heads <= 0 || p->n_heads % p->n_kv_heads != 0 ||
        p->block_size <= 0) {
        tdm_log_error("cuda", "attention: heads %d/%d or block size %d not supported", p->n_heads,
                      p->n_kv_heads, p->block_size);
        abort();
    }
    if (p->head_dim != 64 && p->head_dim != 128) {
        /* other head sizes: the plain kernel, the same for every batch */
        cuda_attention_basic(be, p, q, cache_k, cache_v, out);
        return;
    }
    if (((uintptr_t)q | (uintptr_t)out | (uintptr_t)cache_k | (uintptr_t)cache_v) & 15) {
        tdm_log_error("cuda", "attention: q, out and the KV cache must be 16-byte aligned");
        abort();
    }
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    attn_args_t a;
    memset(&a, 0, sizeof(a));
    a.q = q;
    a.ck = (const __half *)cache_k;
    a.cv = (const __half *)cache_v;
    a.out = out;
    a.ctx_len = p->ctx_len;
    a.block_tables = p->block_tables;
    a.table_of_row = p->table_of_row;
    a.n = p->n;
    a.n_heads = p->n_heads;
    a.n_kv = p->n_kv_heads;
    a.group = p->n_heads / p->n_kv_heads;
    a.kv_dim = (int64_t)p->n_kv_heads * p->head_dim;
    a.bt_stride = p->bt_stride;
    a.bs = p->block_size;
    a.bs_shift = -1;
    if ((p->block_size & (p->block_size - 1)) == 0)
        for (a.bs_shift = 0; (1 << a.bs_shift) < p->block_size; a.bs_shift++) {
        }
    a.qscale = (float)((double)p->scale * 1.4426950408889634);
    if (p->head_dim == 64)
        attention_launch<64>(cb, a, p);
    else
        attention_launch<128>(cb, a, p);
}

/* ---- kv_write ---- */

/* f32 -> f16 bits as the CPU backend converts: round to nearest even, NaN
 * as sign | 0x7e00. */
static __device__ __forceinline__ unsigned short to_f16_bits(float x)
{
    if (isnan(x))
        return (unsigned short)(((__float_as_uint(x) >> 16) & 0x8000u) | 0x7e00u);
    return __half_as_ushort(__float2half_rn(x));
}

/* Block per row (grid-stride); VEC: 4 elements per thread step. */
template <bool VEC>
static __global__ void __launch_bounds__(128)
    kv_write_kernel(const float *__restrict__ k, const float *__restrict__ v,
                    const int32_t *__restrict__ slot, int64_t n, int64_t kv_dim,
                    unsigned short *__restrict__ ck, unsigned short *__restrict__ cv)
{
    for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
        const int32_t s = slot[t];
        if (s < 0)
            continue; /* a padding row */
        const float *kr = k + t * kv_dim, *vr = v + t * kv_dim;
        unsigned short *kd = ck + (int64_t)s * kv_dim, *vd = cv + (int64_t)s * kv_dim;
        if (VEC) {
            for (int64_t j = 4 * (int64_t)threadIdx.x; j < kv_dim; j += 4 * (int64_t)blockDim.x) {
                const float4 x = *(const float4 *)(kr + j), y = *(const float4 *)(vr + j);
                ushort4 hx, hy;
                hx.x = to_f16_bits(x.x);
                hx.y = to_f16_bits(x.y);
                hx.z = to_f16_bits(x.z);
                hx.w = to_f16_bits(x.w);
                hy.x = to_f16_bits(y.x);
                hy.y = to_f16_bits(y.y);
                hy.z = to_f16_bits(y.z);
                hy.w = to_f16_bits(y.w);
                *(ushort4 *)(kd + j) = hx;
                *(ushort4 *)(vd + j) = hy;
            }
        } else {
            for (int64_t j = threadIdx.x; j < kv_dim; j += blockDim.x) {
                kd[j] = to_f16_bits(kr[j]);
                vd[j] = to_f16_bits(vr[j]);
            }
        }
    }
}

extern "C" void cuda_kv_write(tdm_backend_t *be, const float *k, const float *v,
                              const int32_t *slot, int64_t n, int64_t kv_dim, uint16_t *cache_k,
                              uint16_t *cache_v)
{
    if (n <= 0 || kv_dim <= 0)
        return;
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    const int64_t cap = (int64_t)1 << 20;
    const unsigned blocks = (unsigned)(n < cap ? n : cap);
    const bool vec = kv_dim % 4 == 0 && (((uintptr_t)k | (uintptr_t)v) & 15) == 0 &&
                     (((uintptr_t)cache_k | (uintptr_t)cache_v) & 7) == 0;
    if (vec)
        kv_write_kernel<true><<<blocks, 128, 0, cb->stream>>>(
            k, v, slot, n, kv_dim, (unsigned short *)cache_k, (unsigned short *)cache_v);
    else
        kv_write_kernel<false><<<blocks, 128, 0, cb->stream>>>(
            k, v, slot, n, kv_dim, (unsigned short *)cache_k, (unsigned short *)cache_v);
    TDM_CUDA_LAUNCHED("kv_write_kernel");
}
