/* tandem CUDA backend: matmul and its activation preparation (matmul.cu).
 * The table's act_size / act_prepare / matmul; see include/tandem/kernels.h
 * for the contract and matmul.cu for the activation layout. */
#ifndef TANDEM_CUDA_MATMUL_CUH
#define TANDEM_CUDA_MATMUL_CUH

#include "cuda_internal.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* F16 and quantized weights (wtype: the GGUF type): n * kp * 2 bytes (kp =
 * k rounded up to 32); types with mins add n * kp / 32 floats of block
 * sums (Q2_K: n * kp / 16, per half block); F32, BF16: n * k * 4; types
 * the backend does not compute with: 0. */
size_t cuda_act_size(uint32_t wtype, int64_t n, int64_t k);
void cuda_act_prepare(tdm_backend_t *be, uint32_t wtype, const float *x, int64_t n, int64_t k,
                      void *act);
/* act must come from act_prepare for the same wtype, n and k, 16-byte
 * aligned (buf_alloc gives 256). Uses scratch (at most 16 MiB, so the
 * backend's initial 64 MiB never grows) when it splits K over blocks. */
void cuda_matmul(tdm_backend_t *be, const tdm_bweight_t *w, const void *act, int64_t n, float *y,
                 int64_t ldy);

#ifdef __cplusplus
}
#endif

#endif
