/* tandem CUDA backend: KV blocks between the cache and host memory on the
 * copy stream (kv_transfer.cu): kv_out, kv_in and kv_wait of the table. */
#ifndef TANDEM_CUDA_KV_TRANSFER_CUH
#define TANDEM_CUDA_KV_TRANSFER_CUH

#include "cuda_internal.cuh"

#ifdef __cplusplus
extern "C" {
#endif

uint64_t cuda_kv_out(tdm_backend_t *be, uint16_t *const *cache_k, uint16_t *const *cache_v,
                     int32_t n_layer, int64_t block_elems, const int32_t *ids, const int32_t *n_tok,
                     int32_t n_blocks, int64_t kv_dim, uint16_t *host);
uint64_t cuda_kv_in(tdm_backend_t *be, uint16_t *const *cache_k, uint16_t *const *cache_v,
                    int32_t n_layer, int64_t block_elems, const int32_t *ids, const int32_t *n_tok,
                    int32_t n_blocks, int64_t kv_dim, const uint16_t *host);
void cuda_kv_wait(tdm_backend_t *be, uint64_t ticket);
/* Creates the transfer events (at backend creation) and frees them and the
 * staging buffer (at destruction, after the streams are idle). */
void tdm_cuda_kv_transfer_init(tdm_cuda_backend_t *cb);
void tdm_cuda_kv_transfer_fini(tdm_cuda_backend_t *cb);

#ifdef __cplusplus
}
#endif

#endif
