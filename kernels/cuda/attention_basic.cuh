/* tandem CUDA backend: plain paged attention and the KV cache write (attention_basic.cu), used
 * where the tuned kernels (attention.cu) are not built. */
#ifndef TANDEM_CUDA_ATTENTION_BASIC_CUH
#define TANDEM_CUDA_ATTENTION_BASIC_CUH

#include "cuda_internal.cuh"

#ifdef __cplusplus
extern "C" {
#endif
void cuda_kv_write_basic(tdm_backend_t *be, const float *k, const float *v, const int32_t *slot,
                         int64_t n, int64_t kv_dim, uint16_t *cache_k, uint16_t *cache_v);
void cuda_attention_basic(tdm_backend_t *be, const tdm_attn_params_t *p, const float *q,
                          const uint16_t *cache_k, const uint16_t *cache_v, float *out);
#ifdef __cplusplus
}
#endif

#endif
