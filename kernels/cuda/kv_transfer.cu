/* tandem CUDA backend: KV blocks between the paged cache and host memory.
 *
 * A sequence's blocks are scattered over the cache (one buffer per layer
 * for K and one for V, a block every block_elems halves). kv_out gathers
 * the first n_tok rows of each block's 2 x n_layer tensors into a
 * contiguous device staging buffer with one kernel and moves it to the
 * host with one copy; kv_in copies the host bytes up with one copy and
 * scatters them with one kernel. Per block that is two transfers of
 * 2 x n_layer x block_elems halves instead of 4 x n_layer small copies (an
 * 8B model's 16-token block: 2 MiB in 2 calls instead of 64 calls of
 * 32 KiB), and with pinned host memory they run at the link's speed.
 *
 * Both run on the backend's copy stream, ordered after the compute stream
 * by an event recorded when they are called: kv_out reads what the ops
 * queued before it wrote; ops queued after it run at once (they may write
 * other rows or other blocks, never the rows it reads: the engine does not
 * free a block while its transfer is pending). kv_in also makes the
 * compute stream wait for it, so the ops queued after it read the imported
 * rows. Each call ends with an event in a ring of TDM_CUDA_KV_TICKETS, its
 * ticket; kv_wait synchronizes on it. The copy stream is in order, so a
 * ticket's slot reused by a later ticket is waited for as the later one.
 *
 * The staging buffer starts with the call's metadata (the 2 x n_layer cache
 * pointers, the block ids and row counts, copied up from the host), then
 * the blocks in the host's layout. It grows when a call needs more, after
 * the copy stream drains; it is the copy stream's alone. */
#include <stdlib.h>
#include <string.h>

#include "kv_transfer.cuh"
#include "tandem/log.h"

#define KV_THREADS 256

typedef struct kv_meta {
    const uint16_t *const *tensors; /* [2 * n_layer]: K of layers 0.., then V */
    const int32_t *ids;             /* [n_blocks] */
    const int32_t *n_tok;           /* [n_blocks] */
} kv_meta_t;

/* One block of threads per (tensor, block): rows 0..n_tok of the block in
 * the cache <-> the same rows of that tensor in staging. 16-byte moves when
 * the row span and both ends are 16-byte aligned, 2-byte moves otherwise. */
template <bool TO_STAGE>
static __global__ void __launch_bounds__(KV_THREADS)
    kv_move(kv_meta_t m, int32_t n_tensors, int64_t block_elems, int64_t kv_dim, uint16_t *stage)
{
    const int32_t t = (int32_t)(blockIdx.x % (unsigned)n_tensors);
    const int32_t b = (int32_t)(blockIdx.x / (unsigned)n_tensors);
    uint16_t *cache = (uint16_t *)m.tensors[t] + (int64_t)m.ids[b] * block_elems;
    uint16_t *st = stage + ((int64_t)b * n_tensors + t) * block_elems;
    const int64_t count = (int64_t)m.n_tok[b] * kv_dim;
    const uint16_t *src = TO_STAGE ? cache : st;
    uint16_t *dst = TO_STAGE ? st : cache;
    if ((((uintptr_t)src | (uintptr_t)dst) & 15) == 0 && count % 8 == 0) {
        const uint4 *s4 = (const uint4 *)src;
        uint4 *d4 = (uint4 *)dst;
        for (int64_t i = threadIdx.x; i < count / 8; i += KV_THREADS)
            d4[i] = s4[i];
    } else {
        for (int64_t i = threadIdx.x; i < count; i += KV_THREADS)
            dst[i] = src[i];
    }
}

static size_t align256(size_t x)
{
    return (x + 255) & ~(size_t)255;
}

/* Staging for a call: the metadata copied up, the data area returned. */
static uint16_t *kv_stage(tdm_cuda_backend_t *cb, uint16_t *const *cache_k,
                          uint16_t *const *cache_v, int32_t n_layer, const int32_t *ids,
                          const int32_t *n_tok, int32_t n_blocks, size_t data_bytes, kv_meta_t *m)
{
    size_t ptr_bytes = (size_t)2 * (size_t)n_layer * sizeof(void *);
    size_t id_bytes = (size_t)n_blocks * sizeof(int32_t);
    size_t meta_bytes = align256(ptr_bytes + 2 * id_bytes);
    size_t need = meta_bytes + data_bytes;
    if (need > cb->kv_stage_bytes) {
        TDM_CUDA_CHECK(cudaStreamSynchronize(cb->copy)); /* queued transfers use the old one */
        if (cb->kv_stage != NULL)
            TDM_CUDA_CHECK(cudaFree(cb->kv_stage));
        cb->kv_stage = NULL;
        cb->kv_stage_bytes = 0;
        TDM_CUDA_CHECK(cudaMalloc(&cb->kv_stage, need));
        cb->kv_stage_bytes = need;
    }
    /* pageable source: staged by the driver before the call returns */
    char *meta = (char *)malloc(ptr_bytes + 2 * id_bytes);
    if (meta == NULL) {
        tdm_log_error("cuda", "out of host memory for %d KV blocks' metadata", n_blocks);
        abort();
    }
    memcpy(meta, cache_k, ptr_bytes / 2);
    memcpy(meta + ptr_bytes / 2, cache_v, ptr_bytes / 2);
    memcpy(meta + ptr_bytes, ids, id_bytes);
    memcpy(meta + ptr_bytes + id_bytes, n_tok, id_bytes);
    char *d = (char *)cb->kv_stage;
    TDM_CUDA_CHECK(
        cudaMemcpyAsync(d, meta, ptr_bytes + 2 * id_bytes, cudaMemcpyHostToDevice, cb->copy));
    free(meta);
    m->tensors = (const uint16_t *const *)d;
    m->ids = (const int32_t *)(d + ptr_bytes);
    m->n_tok = (const int32_t *)(d + ptr_bytes + id_bytes);
    return (uint16_t *)(d + meta_bytes);
}

static uint64_t kv_ticket(tdm_cuda_backend_t *cb)
{
    uint64_t t = ++cb->kv_ticket;
    TDM_CUDA_CHECK(cudaEventRecord(cb->kv_done[t % TDM_CUDA_KV_TICKETS], cb->copy));
    return t;
}

static void kv_after_compute(tdm_cuda_backend_t *cb)
{
    TDM_CUDA_CHECK(cudaEventRecord(cb->kv_after_compute, cb->stream));
    TDM_CUDA_CHECK(cudaStreamWaitEvent(cb->copy, cb->kv_after_compute, 0));
}

/* kv_out (out = true) or kv_in: see the top of this file. */
static uint64_t kv_transfer(tdm_backend_t *be, uint16_t *const *cache_k, uint16_t *const *cache_v,
                            int32_t n_layer, int64_t block_elems, const int32_t *ids,
                            const int32_t *n_tok, int32_t n_blocks, int64_t kv_dim, void *host,
                            bool out)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    if (n_blocks <= 0)
        return cb->kv_ticket;
    size_t bytes = (size_t)n_blocks * 2 * (size_t)n_layer * (size_t)block_elems * sizeof(uint16_t);
    kv_after_compute(cb);
    kv_meta_t m;
    uint16_t *stage = kv_stage(cb, cache_k, cache_v, n_layer, ids, n_tok, n_blocks, bytes, &m);
    const unsigned grid = (unsigned)n_blocks * 2u * (unsigned)n_layer;
    if (out) {
        kv_move<true>
            <<<grid, KV_THREADS, 0, cb->copy>>>(m, 2 * n_layer, block_elems, kv_dim, stage);
        TDM_CUDA_LAUNCHED("kv_move (out)");
        TDM_CUDA_CHECK(cudaMemcpyAsync(host, stage, bytes, cudaMemcpyDeviceToHost, cb->copy));
        return kv_ticket(cb);
    }
    TDM_CUDA_CHECK(cudaMemcpyAsync(stage, host, bytes, cudaMemcpyHostToDevice, cb->copy));
    kv_move<false><<<grid, KV_THREADS, 0, cb->copy>>>(m, 2 * n_layer, block_elems, kv_dim, stage);
    TDM_CUDA_LAUNCHED("kv_move (in)");
    uint64_t t = kv_ticket(cb);
    /* the ops queued after kv_in read what it wrote */
    TDM_CUDA_CHECK(cudaStreamWaitEvent(cb->stream, cb->kv_done[t % TDM_CUDA_KV_TICKETS], 0));
    return t;
}

extern "C" uint64_t cuda_kv_out(tdm_backend_t *be, uint16_t *const *cache_k,
                                uint16_t *const *cache_v, int32_t n_layer, int64_t block_elems,
                                const int32_t *ids, const int32_t *n_tok, int32_t n_blocks,
                                int64_t kv_dim, uint16_t *host)
{
    return kv_transfer(be, cache_k, cache_v, n_layer, block_elems, ids, n_tok, n_blocks, kv_dim,
                       host, true);
}

extern "C" uint64_t cuda_kv_in(tdm_backend_t *be, uint16_t *const *cache_k,
                               uint16_t *const *cache_v, int32_t n_layer, int64_t block_elems,
                               const int32_t *ids, const int32_t *n_tok, int32_t n_blocks,
                               int64_t kv_dim, const uint16_t *host)
{
    return kv_transfer(be, cache_k, cache_v, n_layer, block_elems, ids, n_tok, n_blocks, kv_dim,
                       (void *)host, false);
}

extern "C" void cuda_kv_wait(tdm_backend_t *be, uint64_t ticket)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    if (ticket == 0 || ticket > cb->kv_ticket)
        return;
    TDM_CUDA_CHECK(cudaEventSynchronize(cb->kv_done[ticket % TDM_CUDA_KV_TICKETS]));
}

extern "C" void tdm_cuda_kv_transfer_init(tdm_cuda_backend_t *cb)
{
    TDM_CUDA_CHECK(cudaEventCreateWithFlags(&cb->kv_after_compute, cudaEventDisableTiming));
    for (int i = 0; i < TDM_CUDA_KV_TICKETS; i++)
        TDM_CUDA_CHECK(cudaEventCreateWithFlags(&cb->kv_done[i], cudaEventDisableTiming));
}

extern "C" void tdm_cuda_kv_transfer_fini(tdm_cuda_backend_t *cb)
{
    (void)cudaStreamSynchronize(cb->copy);
    if (cb->kv_stage != NULL)
        (void)cudaFree(cb->kv_stage);
    cb->kv_stage = NULL;
    (void)cudaEventDestroy(cb->kv_after_compute);
    for (int i = 0; i < TDM_CUDA_KV_TICKETS; i++)
        (void)cudaEventDestroy(cb->kv_done[i]);
}
