/* tandem CUDA backend: the embedding lookup out[t] = W.row(ids[t]) as f32.
 *
 * Decomposition: thread j of block (x, y) writes element x * 256 + j of
 * tokens y, y + gridDim.y, ...; it decodes that one element (quant.cuh,
 * tdm_dtype_to_f32's arithmetic: d * c, or d * c then + m, each rounded;
 * F16 and BF16 exact), so a warp reads one 32-element block (18..128
 * bytes) and writes 128 contiguous bytes. Bytes per call: n * (row_bytes
 * + k * 4). No reduction, so nothing depends on n beyond which rows are
 * read. */
#include "cuda_internal.cuh"
#include "embed.cuh"
#include "quant.cuh"

template <uint32_t WT>
__global__ void __launch_bounds__(256)
    embed_kernel(const uint8_t *w, int64_t rows, int64_t k, int64_t row_bytes, const int32_t *ids,
                 int64_t n, float *out)
{
    const int64_t j = (int64_t)blockIdx.x * 256 + threadIdx.x;
    if (j >= k)
        return;
    for (int64_t t = blockIdx.y; t < n; t += gridDim.y) {
        const int64_t r = ids[t];
        float v = 0.0f; /* ids are checked by the engine; never read outside */
        if (r >= 0 && r < rows)
            v = tdm_deq_elem<WT>(w + r * row_bytes, j);
        out[t * k + j] = v;
    }
}

extern "C" void cuda_embed(tdm_backend_t *be, const tdm_bweight_t *w, const int32_t *ids, int64_t n,
                           float *out)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    if (n <= 0 || w->k <= 0)
        return;
    dim3 grid((unsigned)tdm_cuda_div_up(w->k, 256), (unsigned)(n < 65535 ? n : 65535));
    const uint8_t *data = (const uint8_t *)w->data;
    const int64_t rb = (int64_t)w->row_bytes;
    switch (w->dev) {
#define EMBED_CASE(T)                                                                              \
    case T:                                                                                        \
        embed_kernel<T><<<grid, 256, 0, cb->stream>>>(data, w->rows, w->k, rb, ids, n, out);       \
        break;
        EMBED_CASE(TDM_DTYPE_F32)
        EMBED_CASE(TDM_DTYPE_F16)
        EMBED_CASE(TDM_DTYPE_BF16)
        TDM_CUDA_FOR_EACH_QDEV(EMBED_CASE)
#undef EMBED_CASE
    default: return; /* weight_load refuses other types */
    }
    TDM_CUDA_LAUNCHED("embed_kernel");
}
