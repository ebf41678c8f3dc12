/* tandem CUDA backend: greedy token choice on the device (see argmax.cu). */
#ifndef TANDEM_CUDA_ARGMAX_CUH
#define TANDEM_CUDA_ARGMAX_CUH

#include "cuda_internal.cuh"

#ifdef __cplusplus
extern "C" {
#endif
/* The table's argmax: out_host[t] = the first index of the largest logit of
 * row t (NaN never wins; a row of only -inf or NaN gives 0), as the CPU
 * sampler's greedy choice. Waits for the result. */
void cuda_argmax(tdm_backend_t *be, const float *logits, int64_t n, int64_t vocab,
                 int32_t *out_host);
#ifdef __cplusplus
}
#endif

#endif
