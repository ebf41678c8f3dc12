/* tandem CUDA backend: what the op files share (internal to kernels/cuda).
 *
 * The backend fills the same tdm_backend_ops_t table as the CPU backend
 * (include/tandem/kernels.h). Every op is a host function with the table's
 * exact signature, named cuda_<op>, declared in the op's own .cuh and
 * defined in its .cu; cuda_backend.cu puts them in the table. An op only
 * enqueues work on the backend's compute stream (cb->stream): no host
 * synchronization, no allocation (use the scratch buffer), so a decode step
 * can be captured into a CUDA graph. Pointers an op receives are device
 * pointers from buf_alloc (or inside one), including the int32 index
 * arrays of tdm_attn_params_t.
 *
 * Batch invariance (DESIGN.md; include/tandem/kernels.h): every output
 * element is computed in an order that depends only on the op's per-row
 * shapes (k, head_dim, the context length), never on n, on the other rows
 * of the batch, on the grid size or on the device's SM count. A kernel may
 * split a reduction (split-K, split over the KV length) only by a rule that
 * reads those per-row shapes, and combines the parts in a fixed order.
 * Tensor-core tiles are fine: an mma's result for one output depends only
 * on its own row and column.
 *
 * Numerics: activations enter quantized matmuls as f16 (act_prepare), the
 * weights are dequantized in registers, products accumulate in f32. KV
 * cache is f16 like the CPU backend's.
 *
 * Errors: a failed launch or CUDA call is a dead context; tdm_cuda_check
 * logs it once with file and line and aborts (the node's supervisor
 * restarts it; requests fail over). Inside a graph capture an error only
 * fails the capture: the step then runs op by op, where a real fault
 * aborts as above.
 *
 * Threads: CUDA's current device is per thread, so every entry point goes
 * through tdm_cuda_of, which makes the backend's device current. */
#ifndef TANDEM_CUDA_INTERNAL_CUH
#define TANDEM_CUDA_INTERNAL_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "scratch.h"
#include "tandem/dtype.h"
#include "tandem/kernels.h"

#define TDM_CUDA_KV_TICKETS 16

typedef struct tdm_cuda_backend {
    tdm_backend_t base;
    tdm_backend_ops_t ops;
    int device;
    int n_sm; /* multiprocessors */
    int cc_major, cc_minor;
    size_t smem_optin;     /* max dynamic shared memory per block (opt-in) */
    cudaStream_t stream;   /* every op runs here, in order */
    cudaStream_t copy;     /* KV block transfers (kv_out, kv_in: kv_transfer.cu) */
    tdm_scratch_t scratch; /* device scratch (tdm_cuda_scratch; lifetime rule in scratch.h) */
    int mm_slots[64];      /* matmul.cu: decode CTAs resident at once, by device type; 0: unknown */
    /* kv_transfer.cu: the copy stream's own device staging, the event that
     * orders it after the compute stream, and one event per ticket (a ring:
     * a slot reused by a later ticket is waited for as that one). */
    void *kv_stage;
    size_t kv_stage_bytes;
    cudaEvent_t kv_after_compute;
    cudaEvent_t kv_done[TDM_CUDA_KV_TICKETS];
    uint64_t kv_ticket; /* the last ticket handed out; 0: none yet */
} tdm_cuda_backend_t;

/* A weight on the device, 256-byte aligned: [rows][k] of the device type
 * dev (quant.cuh): F32, F16, BF16, Q4_0, Q4_1 and Q8_0 rows as GGUF has
 * them (dev == wtype), the other quantized types repacked at load from
 * their integer form into 32-element blocks of a quant.cuh layout. */
struct tdm_bweight {
    uint32_t wtype; /* the GGUF type */
    uint32_t dev;   /* the device type the kernels read */
    int64_t rows, k;
    size_t row_bytes; /* of dev */
    void *data;
};

#ifdef __cplusplus
extern "C" {
#endif
/* Logs "CUDA error at FILE:LINE: what" and aborts when err != cudaSuccess;
 * inside a graph capture on this thread it records the first error
 * instead, and the capture falls back to running op by op. */
void tdm_cuda_check_at(cudaError_t err, const char *what, const char *file, int line);
/* Device scratch of at least bytes, valid until the next call on this
 * backend (ops use it within one launch sequence). Never freed under a
 * live graph; inside a capture it does not grow, and a larger request
 * fails the capture (scratch.h). */
void *tdm_cuda_scratch(tdm_cuda_backend_t *cb, size_t bytes);
/* Makes device the current one of the calling thread (CUDA's current
 * device is per thread: the node's stepping thread and the network thread
 * both issue work). Cheap when it already is. */
void tdm_cuda_use_device(int device);
#ifdef __cplusplus
}
#endif

/* Every op and table function starts here: the backend of the table, with
 * its device made current on the calling thread. */
static inline tdm_cuda_backend_t *tdm_cuda_of(tdm_backend_t *be)
{
    tdm_cuda_backend_t *cb = (tdm_cuda_backend_t *)be;
    tdm_cuda_use_device(cb->device);
    return cb;
}

#define TDM_CUDA_CHECK(call) tdm_cuda_check_at((call), #call, __FILE__, __LINE__)
/* After a kernel launch: the launch's own error (bad configuration). */
#define TDM_CUDA_LAUNCHED(name) tdm_cuda_check_at(cudaGetLastError(), name, __FILE__, __LINE__)

static inline int64_t tdm_cuda_div_up(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

#endif
