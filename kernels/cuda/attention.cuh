/* tandem CUDA backend: the paged KV cache write and paged attention
 * (attention.cu): flash-attention tiles on tensor cores for prefill runs,
 * split-KV (flash-decoding) for decode rows, bit-identical per row. */
#ifndef TANDEM_CUDA_ATTENTION_CUH
#define TANDEM_CUDA_ATTENTION_CUH

#include "cuda_internal.cuh"

#ifdef __cplusplus
extern "C" {
#endif
void cuda_kv_write(tdm_backend_t *be, const float *k, const float *v, const int32_t *slot,
                   int64_t n, int64_t kv_dim, uint16_t *cache_k, uint16_t *cache_v);
void cuda_attention(tdm_backend_t *be, const tdm_attn_params_t *p, const float *q,
                    const uint16_t *cache_k, const uint16_t *cache_v, float *out);
#ifdef __cplusplus
}
#endif

#endif
