/* tandem CUDA backend: sampling on the device (see sample.cu). */
#ifndef TANDEM_CUDA_SAMPLE_CUH
#define TANDEM_CUDA_SAMPLE_CUH

#include "cuda_internal.cuh"

#ifdef __cplusplus
extern "C" {
#endif
/* The table's sample: out_host[t] = the token tdm_sampler_sample() picks
 * from logits row t with rows[t]'s parameters, history and draw;
 * logprob_host (or NULL) its log-probability as the host sampler defines
 * it. The logits rows are modified (penalties). rows, hist_tokens and
 * hist_counts are host memory. Waits for the result. */
void cuda_sample(tdm_backend_t *be, float *logits, int64_t n, int64_t vocab,
                 const tdm_sample_row_t *rows, const int32_t *hist_tokens,
                 const int32_t *hist_counts, int64_t n_hist_total, int32_t *out_host,
                 float *logprob_host);
#ifdef __cplusplus
}
#endif

#endif
