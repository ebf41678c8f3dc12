/* tandem CUDA backend: plain row and elementwise ops (rowops.cu), used where
 * the tuned ones (norm.cu, rope.cu, elementwise.cu) are not built. */
#ifndef TANDEM_CUDA_ROWOPS_CUH
#define TANDEM_CUDA_ROWOPS_CUH

#include "cuda_internal.cuh"

#ifdef __cplusplus
extern "C" {
#endif
void cuda_rmsnorm_basic(tdm_backend_t *be, const float *x, const float *w, int64_t n, int64_t d,
                        float eps, float *out);
void cuda_rope_basic(tdm_backend_t *be, float *x, const int32_t *pos, int64_t n, int32_t n_heads,
                     int32_t head_dim, int32_t n_rot, float theta);
void cuda_swiglu_basic(tdm_backend_t *be, const float *gate, const float *up, int64_t n, int64_t f,
                       float *out);
void cuda_add_basic(tdm_backend_t *be, float *x, const float *y, int64_t count);
void cuda_gather_rows_basic(tdm_backend_t *be, const float *src, const int32_t *idx, int64_t n,
                            int64_t d, float *dst);
#ifdef __cplusplus
}
#endif

#endif
