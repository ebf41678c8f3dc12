/* tandem CUDA backend: paged attention over the f16 KV cache, plainly.
 *
 * attention: one block of ATT_THREADS threads per (query row, query head).
 *   The row's context is walked in chunks of ATT_THREADS positions starting
 *   at position 0; in a chunk, thread j scores position c + j (q . K, f32
 *   fma over head_dim in order), the block takes the chunk's maximum and
 *   the weights exp(s - m) with a fixed tree, and thread d (< head_dim)
 *   adds sum_j w_j V[c + j][d] over j in order to its accumulator after
 *   rescaling it by exp(m_old - m) (online softmax). The chunk boundaries
 *   are fixed positions and nothing depends on the other rows, so a row's
 *   result is the same alone, in a decode batch or in a prefill: batch
 *   invariant. Bytes: each (row, kv head) reads its ctx_len K and V rows
 *   once per query head of the group (L2 absorbs the repeats). Correct,
 *   not fast: long prefills compute on CUDA cores, not tensor cores.
 * kv_write: one thread per element, f32 -> f16 round to nearest even. */
#include "attention_basic.cuh"

#include <stdlib.h>

#include "tandem/log.h"

#define ATT_THREADS 128
#define ATT_MAX_HD  256

static __device__ __forceinline__ float tree_max(float *sh, float v)
{
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = ATT_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s)
            sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

static __device__ __forceinline__ float tree_sum(float *sh, float v)
{
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = ATT_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s)
            sh[threadIdx.x] = __fadd_rn(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

static __global__ void __launch_bounds__(ATT_THREADS)
    attention_rows(const float *__restrict__ q, const __half *__restrict__ ck,
                   const __half *__restrict__ cv, const int32_t *__restrict__ ctx_len,
                   const int32_t *__restrict__ tables, const int32_t *__restrict__ table_of_row,
                   int32_t bt_stride, int32_t n_heads, int32_t group, int32_t hd, int32_t bs,
                   int64_t kv_dim, float scale, float *__restrict__ out)
{
    const int64_t row = blockIdx.x;
    const int32_t h = (int32_t)blockIdx.y, kvh = h / group;
    const int32_t ctx = ctx_len[row];
    const int32_t *table = tables + (int64_t)table_of_row[row] * bt_stride;
    __shared__ float qs[ATT_MAX_HD];
    __shared__ float w[ATT_THREADS];
    __shared__ float red[ATT_THREADS];
    for (int32_t d = threadIdx.x; d < hd; d += ATT_THREADS)
        qs[d] = q[(row * n_heads + h) * hd + d] * scale;
    __syncthreads();
    float m = -INFINITY, l = 0.0f;
    float acc[ATT_MAX_HD / ATT_THREADS] = {0.0f, 0.0f};
    for (int32_t c = 0; c < ctx; c += ATT_THREADS) {
        int32_t pos = c + (int32_t)threadIdx.x;
        float s = -INFINITY;
        if (pos < ctx) {
            int64_t slot = (int64_t)table[pos / bs] * bs + pos % bs;
            const __half *kr = ck + slot * kv_dim + (int64_t)kvh * hd;
            s = 0.0f;
            for (int32_t d = 0; d < hd; d++)
                s = __fmaf_rn(qs[d], __half2float(kr[d]), s);
        }
        float mc = tree_max(red, s);
        float mn = fmaxf(m, mc);
        float alpha = m == -INFINITY ? 0.0f : expf(m - mn);
        float e = pos < ctx ? expf(s - mn) : 0.0f;
        w[threadIdx.x] = e;
        float sum = tree_sum(red, e); /* also orders w's writes before the reads */
        l = __fadd_rn(__fmul_rn(l, alpha), sum);
        int32_t nj = ctx - c < ATT_THREADS ? ctx - c : ATT_THREADS;
#pragma unroll
        for (int32_t u = 0; u < ATT_MAX_HD / ATT_THREADS; u++) {
            int32_t d = (int32_t)threadIdx.x + u * ATT_THREADS;
            if (d >= hd)
                continue;
            float a = __fmul_rn(acc[u], alpha);
            for (int32_t j = 0; j < nj; j++) {
                int32_t pj = c + j;
                int64_t slot = (int64_t)table[pj / bs] * bs + pj % bs;
                a = __fmaf_rn(w[j], __half2float(cv[slot * kv_dim + (int64_t)kvh * hd + d]), a);
            }
            acc[u] = a;
        }
        m = mn;
        __syncthreads(); /* w is rewritten by the next chunk */
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int32_t u = 0; u < ATT_MAX_HD / ATT_THREADS; u++) {
        int32_t d = (int32_t)threadIdx.x + u * ATT_THREADS;
        if (d < hd)
            out[(row * n_heads + h) * hd + d] = __fmul_rn(acc[u], inv);
    }
}

extern "C" void cuda_attention_basic(tdm_backend_t *be, const tdm_attn_params_t *p, const float *q,
                                     const uint16_t *cache_k, const uint16_t *cache_v, float *out)
{
    if (p->n <= 0)
        return;
    if (p->head_dim > ATT_MAX_HD || p->n_kv_heads <= 0 || p->n_heads % p->n_kv_heads != 0) {
        tdm_log_error("cuda", "attention: head_dim %d (at most %d) or heads %d/%d not supported",
                      p->head_dim, ATT_MAX_HD, p->n_heads, p->n_kv_heads);
        abort();
    }
    dim3 grid((unsigned)p->n, (unsigned)p->n_heads);
    attention_rows<<<grid, ATT_THREADS, 0, tdm_cuda_of(be)->stream>>>(
        q, (const __half *)cache_k, (const __half *)cache_v, p->ctx_len, p->block_tables,
        p->table_of_row, p->bt_stride, p->n_heads, p->n_heads / p->n_kv_heads, p->head_dim,
        p->block_size, (int64_t)p->n_kv_heads * p->head_dim, p->scale, out);
    TDM_CUDA_LAUNCHED("attention_rows");
}

static __global__ void kv_write_elems(const float *__restrict__ k, const float *__restrict__ v,
                                      const int32_t *__restrict__ slot, int64_t n, int64_t kv_dim,
                                      __half *ck, __half *cv)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * kv_dim;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / kv_dim, j = i % kv_dim, at = (int64_t)slot[t] * kv_dim + j;
        ck[at] = __float2half_rn(k[i]);
        cv[at] = __float2half_rn(v[i]);
    }
}

extern "C" void cuda_kv_write_basic(tdm_backend_t *be, const float *k, const float *v,
                                    const int32_t *slot, int64_t n, int64_t kv_dim,
                                    uint16_t *cache_k, uint16_t *cache_v)
{
    int64_t count = n * kv_dim;
    if (count <= 0)
        return;
    int64_t blocks = tdm_cuda_div_up(count, 256);
    kv_write_elems<<<(unsigned)(blocks < 65535 ? blocks : 65535), 256, 0,
                     tdm_cuda_of(be)->stream>>>(k, v, slot, n, kv_dim, (__half *)cache_k,
                                                (__half *)cache_v);
    TDM_CUDA_LAUNCHED("kv_write_elems");
}
