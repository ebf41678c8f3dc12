/* tandem: the kernel library. Ops only, no model knowledge.
 *
 * Every backend (CPU now, CUDA later) fills one table of function pointers,
 * tdm_backend_ops_t. The engine calls ops only through the table and never
 * names a backend. All tensors are row-major; "n" is the number of token
 * rows in the batch. Buffers passed to ops are backend buffers (from
 * buf_alloc); the engine moves host data in and out with copy_to/copy_from.
 * On the CPU backend a backend buffer is ordinary host memory.
 *
 * Batch invariance: every output element of every op is computed by one
 * thread in an order that depends only on the op's shapes per row (k, head
 * dims, the context length), never on n, on the other rows of the batch,
 * or on the thread count. A matmul over 1 row and over 64 rows gives
 * bit-identical rows. On the CPU the scalar, AVX2 and AVX-512 versions
 * accumulate in the same order too, so they agree bit for bit.
 *
 * Quantized matmuls (Q4_0, Q4_1, Q8_0 weights) take activations quantized
 * per token to 16 bits in blocks of 32 (act_prepare; one scale per block,
 * relative error about 2^-16 of the block's largest value, so outlier
 * activations cost no accuracy); float weights (F32, F16) take the f32
 * activations.
 *
 * Paged KV cache, per layer: K and V each [n_blocks][block_size][n_kv_heads]
 * [head_dim] f16. A token's slot is block_id * block_size + offset. */
#ifndef TANDEM_KERNELS_H
#define TANDEM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "tandem/dtype.h"
#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tdm_backend tdm_backend_t;
/* A weight matrix [rows][k] as the backend wants it (maybe repacked or in
 * device memory); made by weight_load, freed by weight_free. */
typedef struct tdm_bweight tdm_bweight_t;

typedef struct tdm_attn_params {
    int64_t n;          /* query rows */
    int32_t n_heads;    /* query heads */
    int32_t n_kv_heads; /* n_heads % n_kv_heads == 0 (grouped-query) */
    int32_t head_dim;
    int32_t block_size;          /* tokens per KV block */
    float scale;                 /* usually 1/sqrt(head_dim) */
    const int32_t *ctx_len;      /* [n]: positions 0..ctx_len-1 are attended */
    const int32_t *block_tables; /* [n_tables][bt_stride] block ids */
    const int32_t *table_of_row; /* [n]: which table each row reads */
    int32_t bt_stride;
    /* Optional hints (0: unknown), true when given: the longest and the
     * shortest run of consecutive rows reading one table (a decode step:
     * both 1; one prefill chunk: both n). A backend may skip the kernels
     * that no row needs; the result never depends on them. */
    int32_t longest_run, shortest_run;
} tdm_attn_params_t;

/* One logits row's sampling for ops->sample: a request's parameters and
 * the random number the engine drew for it from the request's generator.
 * The semantics are the host sampler's (include/tandem/sampler.h) on the
 * same logits and the same draw. */
typedef struct tdm_sample_row {
    float temperature; /* 0: greedy (after the penalties) */
    int32_t top_k;     /* <= 0 or >= vocab: off */
    float top_p;       /* >= 1: off */
    float min_p;       /* <= 0: off */
    float repetition_penalty, frequency_penalty, presence_penalty;
    /* The row's distinct history tokens: hist_tokens[hist_off ..
     * hist_off + n_hist), each with its count in the output (0: only in
     * the prompt; only the repetition penalty touches those). */
    int32_t hist_off, n_hist;
    double u; /* the draw, uniform in [0, 1); unused when temperature is 0 */
} tdm_sample_row_t;

typedef struct tdm_backend_ops {
    const char *name; /* "cpu-avx512", "cpu-avx2", "cpu-scalar", "cuda" */
    void (*destroy)(tdm_backend_t *be);

    /* ---- memory ---- */
    void *(*buf_alloc)(tdm_backend_t *be, size_t bytes); /* 64-byte aligned; NULL if out */
    void (*buf_free)(tdm_backend_t *be, void *buf);
    void (*copy_to)(tdm_backend_t *be, void *dst_buf, const void *src_host, size_t bytes);
    void (*copy_from)(tdm_backend_t *be, void *dst_host, const void *src_buf, size_t bytes);
    void (*sync)(tdm_backend_t *be); /* waits until all queued ops are done */

    /* ---- weights ---- */
    /* data: [rows][k] of wtype in host memory (the GGUF map; must outlive the
     * weight if the backend keeps a pointer to it). */
    tdm_status_t (*weight_load)(tdm_backend_t *be, const void *data, uint32_t wtype, int64_t rows,
                                int64_t k, tdm_bweight_t **out);
    void (*weight_free)(tdm_backend_t *be, tdm_bweight_t *w);
    /* Optional (NULL: always): whether w still reads the data weight_load
     * was given; when not, the engine drops the file's pages of it. */
    int (*weight_uses_source)(tdm_backend_t *be, const tdm_bweight_t *w);

    /* ---- matmul: y[t][r] = sum_j W[r][j] * x[t][j], y row stride ldy ---- */
    size_t (*act_size)(uint32_t wtype, int64_t n, int64_t k);
    void (*act_prepare)(tdm_backend_t *be, uint32_t wtype, const float *x, int64_t n, int64_t k,
                        void *act);
    void (*matmul)(tdm_backend_t *be, const tdm_bweight_t *w, const void *act, int64_t n, float *y,
                   int64_t ldy);

    /* ---- elementwise and row ops ---- */
    /* out[t] = W.row(ids[t]) as f32 (the embedding lookup), row length k. */
    void (*embed)(tdm_backend_t *be, const tdm_bweight_t *w, const int32_t *ids, int64_t n,
                  float *out);
    /* out[t][i] = x[t][i] / sqrt(mean(x[t]^2) + eps) * w[i]; out may be x. */
    void (*rmsnorm)(tdm_backend_t *be, const float *x, const float *w, int64_t n, int64_t d,
                    float eps, float *out);
    /* In place on x[n][n_heads*head_dim]: rotates adjacent pairs (x[2i],
     * x[2i+1]) of the first n_rot dims of each head by pos[t] * theta^(-2i/n_rot). */
    void (*rope)(tdm_backend_t *be, float *x, const int32_t *pos, int64_t n, int32_t n_heads,
                 int32_t head_dim, int32_t n_rot, float theta);
    /* out[t][i] = silu(gate[t][i]) * up[t][i]; out may alias gate. */
    void (*swiglu)(tdm_backend_t *be, const float *gate, const float *up, int64_t n, int64_t f,
                   float *out);
    /* x[i] += y[i] for i < count. */
    void (*add)(tdm_backend_t *be, float *x, const float *y, int64_t count);
    /* dst[t] = src[idx[t]] for rows of d floats. */
    void (*gather_rows)(tdm_backend_t *be, const float *src, const int32_t *idx, int64_t n,
                        int64_t d, float *dst);

    /* ---- paged attention ---- */
    /* Stores k[t], v[t] ([n][n_kv_heads*head_dim] f32) as f16 at slot[t]. */
    void (*kv_write)(tdm_backend_t *be, const float *k, const float *v, const int32_t *slot,
                     int64_t n, int64_t kv_dim, uint16_t *cache_k, uint16_t *cache_v);
    /* out[t][h*head_dim..] = softmax(q_h . K[0..ctx_len)) * scale) . V, reading
     * K and V from the cache (f16), positions in increasing order. */
    void (*attention)(tdm_backend_t *be, const tdm_attn_params_t *p, const float *q,
                      const uint16_t *cache_k, const uint16_t *cache_v, float *out);

    /* Optional (NULL: the engine copies the logits to the host and samples
     * there). out_host[t] = the first index of the largest of logits row t
     * ([n][vocab]); NaN never wins; a row without a finite maximum gives 0.
     * The greedy choice, without moving the logits. Waits for the result. */
    void (*argmax)(tdm_backend_t *be, const float *logits, int64_t n, int64_t vocab,
                   int32_t *out_host);

    /* Optional (NULL: the engine samples on the host). out_host[t] = the
     * token tdm_sampler_sample() picks from logits row t ([n][vocab]) with
     * rows[t]'s parameters and draw: penalties over the row's history,
     * temperature, top-k, top-p, min-p, one draw walking the candidates by
     * descending logit (lowest id on ties). logprob_host (or NULL) gets the
     * chosen token's log-probability as the host sampler defines it. The
     * logits rows are modified. rows, hist_tokens and hist_counts
     * ([n_hist_total]) are host memory. Waits for the result. */
    void (*sample)(tdm_backend_t *be, float *logits, int64_t n, int64_t vocab,
                   const tdm_sample_row_t *rows, const int32_t *hist_tokens,
                   const int32_t *hist_counts, int64_t n_hist_total, int32_t *out_host,
                   float *logprob_host);

    /* Optional (device backends; NULL: the engine copies row by row). Moves
     * the first n_tok[i] rows of whole KV blocks between the cache and host
     * memory on the backend's copy stream, so a transfer overlaps the ops
     * queued after it. host holds the blocks one after another, each
     * [2 * n_layer][block_size * kv_dim] f16: K of layers 0.., then V of
     * layers 0.. (rows past n_tok[i] are not moved: after kv_out their host
     * bytes mean nothing, after kv_in the cache's are unchanged). The CPU
     * backend copies at once (for tests: its cache is host memory, which
     * the engine reaches directly). cache_k/cache_v are
     * host arrays of n_layer cache pointers; ids and n_tok host arrays of
     * n_blocks. kv_out reads the cache as the ops queued before it left
     * it; kv_in writes it before any op queued after it runs. Both return
     * a ticket at once; kv_wait(ticket) waits until that transfer (and the
     * ones before it) are done and host may be reused. */
    uint64_t (*kv_out)(tdm_backend_t *be, uint16_t *const *cache_k, uint16_t *const *cache_v,
                       int32_t n_layer, int64_t block_elems, const int32_t *ids,
                       const int32_t *n_tok, int32_t n_blocks, int64_t kv_dim, uint16_t *host);
    uint64_t (*kv_in)(tdm_backend_t *be, uint16_t *const *cache_k, uint16_t *const *cache_v,
                      int32_t n_layer, int64_t block_elems, const int32_t *ids,
                      const int32_t *n_tok, int32_t n_blocks, int64_t kv_dim, const uint16_t *host);
    void (*kv_wait)(tdm_backend_t *be, uint64_t ticket);

    /* Optional (NULL: no graphs). graph_capture runs fn(arg), which queues
     * ops, and records them into a graph instead of running them; NULL when
     * that failed (logged once). graph_launch replays a graph with the
     * buffers' current contents; graph_free frees it. */
    void *(*graph_capture)(tdm_backend_t *be, void (*fn)(void *arg), void *arg);
    void (*graph_launch)(tdm_backend_t *be, void *graph);
    void (*graph_free)(tdm_backend_t *be, void *graph);

    /* Optional (NULL: malloc/free): host memory the backend copies to and
     * from fastest (pinned), for staging KV blocks. */
    void *(*host_alloc)(tdm_backend_t *be, size_t bytes);
    void (*host_free)(tdm_backend_t *be, void *p);

    /* Buffers live in device memory: the host reaches them only through
     * copy_to / copy_from (the engine stages KV blocks it hands out). */
    int device_memory;
} tdm_backend_ops_t;

/* What every backend object starts with. */
struct tdm_backend {
    const tdm_backend_ops_t *ops;
};

typedef enum tdm_cpu_isa {
    TDM_CPU_ISA_AUTO = 0, /* best this CPU has (CPUID), or TANDEM_CPU_ISA */
    TDM_CPU_ISA_SCALAR = 1,
    TDM_CPU_ISA_AVX2 = 2,   /* AVX2 + FMA + F16C (+ AVX-VNNI when present) */
    TDM_CPU_ISA_AVX512 = 3, /* AVX-512 F/BW/VL + VNNI */
} tdm_cpu_isa_t;

/* The CPU backend with n_threads workers (<= 0: all available CPUs). The
 * ISA can be forced with TANDEM_CPU_ISA=scalar|avx2|avx512; asking for one
 * the CPU lacks is TDM_ERR_UNSUPPORTED. */
tdm_status_t tdm_backend_cpu_create(int n_threads, tdm_cpu_isa_t isa, tdm_backend_t **out);
/* Best ISA of this CPU. */
tdm_cpu_isa_t tdm_cpu_isa_detect(void);
const char *tdm_cpu_isa_name(tdm_cpu_isa_t isa);
/* The CUDA backend on GPU `device` (compute capability 8.0 or newer).
 * TDM_ERR_UNSUPPORTED when tandem was built without CUDA (no nvcc) or the
 * GPU is too old, TDM_ERR_NOT_FOUND when the machine has no usable GPU or
 * driver, TDM_ERR_INVALID for a device number it lacks; each logged once
 * with what to do. */
tdm_status_t tdm_backend_cuda_create(int device, tdm_backend_t **out);
/* True when this build has the CUDA backend (whether or not a GPU is here). */
int tdm_backend_cuda_built(void);
/* Free and total device memory of a CUDA backend's GPU. */
tdm_status_t tdm_backend_cuda_mem_info(tdm_backend_t *be, size_t *free_bytes, size_t *total_bytes);
/* Calls be->ops->destroy; accepts NULL. */
void tdm_backend_destroy(tdm_backend_t *be);
int tdm_backend_cpu_threads(const tdm_backend_t *be);

#ifdef __cplusplus
}
#endif

#endif
