/* tandem CUDA backend: the embedding lookup (embed.cu). */
#ifndef TANDEM_CUDA_EMBED_CUH
#define TANDEM_CUDA_EMBED_CUH

#include "cuda_internal.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* out[t][0..k) = row ids[t] of w as f32; an id outside [0, rows) gives a
 * zero row (as the CPU backend). ids are device int32. */
void cuda_embed(tdm_backend_t *be, const tdm_bweight_t *w, const int32_t *ids, int64_t n,
                float *out);

#ifdef __cplusplus
}
#endif

#endif
