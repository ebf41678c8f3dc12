/* tandem CUDA backend: the ops table, device memory, weight upload and the
 * scratch buffer. The ops themselves live in one .cu per op family
 * (matmul, embed, attention, row ops, argmax, sample, KV transfers); see
 * cuda_internal.cuh for the rules they follow. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "argmax.cuh"
#include "attention_basic.cuh"
#include "cuda_internal.cuh"
#include "embed.cuh"
#include "kv_transfer.cuh"
#include "matmul.cuh"
#include "rowops.cuh"
#include "sample.cuh"
#include "tandem/log.h"

/* The tuned attention and row ops where their files are in the tree; the
 * plain ones (attention_basic.cu, rowops.cu: correct, batch invariant, not
 * fast) otherwise. */
#if __has_include("attention.cuh")
#include "attention.cuh"
#define TDM_CUDA_ATTENTION cuda_attention
#define TDM_CUDA_KV_WRITE  cuda_kv_write
#else
#define TDM_CUDA_ATTENTION cuda_attention_basic
#define TDM_CUDA_KV_WRITE  cuda_kv_write_basic
#endif
#if __has_include("norm.cuh") && __has_include("rope.cuh") && __has_include("elementwise.cuh")
#include "elementwise.cuh"
#include "norm.cuh"
#include "rope.cuh"
#define TDM_CUDA_RMSNORM cuda_rmsnorm
#define TDM_CUDA_ROPE    cuda_rope
#define TDM_CUDA_SWIGLU  cuda_swiglu
#define TDM_CUDA_ADD     cuda_add
#define TDM_CUDA_GATHER  cuda_gather_rows
#else
#define TDM_CUDA_RMSNORM cuda_rmsnorm_basic
#define TDM_CUDA_ROPE    cuda_rope_basic
#define TDM_CUDA_SWIGLU  cuda_swiglu_basic
#define TDM_CUDA_ADD     cuda_add_basic
#define TDM_CUDA_GATHER  cuda_gather_rows_basic
#endif

#define MOD "cuda"

/* Scratch the backend starts with: split partials of a decode step of the
 * largest model we run fit several times over. */
#define TDM_CUDA_SCRATCH_INIT ((size_t)64 << 20)

/* A graph capture is open on this thread: errors are recorded in
 * tl_capture_err instead of aborting (cuda_graph_capture). */
static thread_local bool tl_capturing;
static thread_local cudaError_t tl_capture_err;
/* The device current on this thread as tandem set it; -1: none yet. */
static thread_local int tl_device = -1;

extern "C" void tdm_cuda_check_at(cudaError_t err, const char *what, const char *file, int line)
{
    if (err == cudaSuccess)
        return;
    if (tl_capturing) {
        if (tl_capture_err == cudaSuccess) {
            tl_capture_err = err;
            tdm_log_warn(MOD, "CUDA error inside a graph capture at %s:%d: %s: %s (%s)", file, line,
                         what, cudaGetErrorString(err), cudaGetErrorName(err));
        }
        return;
    }
    tdm_log_error(MOD, "CUDA error at %s:%d: %s: %s (%s); the GPU context is lost, stopping", file,
                  line, what, cudaGetErrorString(err), cudaGetErrorName(err));
    abort();
}

extern "C" void tdm_cuda_use_device(int device)
{
    if (tl_device == device)
        return;
    TDM_CUDA_CHECK(cudaSetDevice(device));
    tl_device = device;
}

static void *scratch_alloc(void *ctx, size_t bytes)
{
    (void)ctx;
    void *p = NULL;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        (void)cudaGetLastError(); /* out of memory is not sticky */
        return NULL;
    }
    return p;
}

/* after the work queued so far: no op can still be reading p */
static void scratch_release(void *ctx, void *p)
{
    tdm_cuda_backend_t *cb = (tdm_cuda_backend_t *)ctx;
    TDM_CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    TDM_CUDA_CHECK(cudaFree(p));
}

extern "C" void *tdm_cuda_scratch(tdm_cuda_backend_t *cb, size_t bytes)
{
    void *p = tdm_scratch_get(&cb->scratch, bytes);
    if (p == NULL && !cb->scratch.capturing) {
        tdm_log_error(MOD, "cannot grow the scratch buffer to %zu bytes on GPU %d: out of memory",
                      bytes, cb->device);
        abort();
    }
    return p;
}

/* ---- memory ---- */

static void *cuda_buf_alloc(tdm_backend_t *be, size_t bytes)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    void *p = NULL;
    /* cudaMalloc is 256-byte aligned, more than the table's 64 */
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        (void)cudaGetLastError(); /* out of memory is not sticky */
        tdm_log_warn(MOD, "cannot allocate %zu bytes on GPU %d: %s", bytes, cb->device,
                     cudaGetErrorString(err));
        return NULL;
    }
    return p;
}

static void cuda_buf_free(tdm_backend_t *be, void *buf)
{
    (void)tdm_cuda_of(be);
    if (buf != NULL)
        TDM_CUDA_CHECK(cudaFree(buf));
}

static void cuda_copy_to(tdm_backend_t *be, void *dst, const void *src, size_t bytes)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    /* pageable source: the copy is staged before the call returns, so the
     * caller may reuse src at once */
    TDM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cb->stream));
}

static void cuda_copy_from(tdm_backend_t *be, void *dst, const void *src, size_t bytes)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    TDM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cb->stream));
    /* the table promises host data after copy_from */
    TDM_CUDA_CHECK(cudaStreamSynchronize(cb->stream));
}

static void cuda_sync(tdm_backend_t *be)
{
    TDM_CUDA_CHECK(cudaStreamSynchronize(tdm_cuda_of(be)->stream));
}

/* Pinned host memory: copies from and to it run at full PCIe speed and can
 * overlap compute. */
static void *cuda_host_alloc(tdm_backend_t *be, size_t bytes)
{
    (void)tdm_cuda_of(be);
    void *p = NULL;
    if (cudaMallocHost(&p, bytes ? bytes : 1) != cudaSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return p;
}

static void cuda_host_free(tdm_backend_t *be, void *p)
{
    (void)tdm_cuda_of(be);
    if (p != NULL)
        (void)cudaFreeHost(p);
}

/* ---- weights ---- */

static tdm_status_t cuda_weight_load(tdm_backend_t *be, const void *data, uint32_t wtype,
                                     int64_t rows, int64_t k, tdm_bweight_t **out)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    size_t row_bytes = tdm_dtype_row_bytes(wtype, (uint64_t)k);
    if (row_bytes == 0 || rows <= 0 ||
        (wtype != TDM_DTYPE_F32 && wtype != TDM_DTYPE_F16 && wtype != TDM_DTYPE_Q4_0 &&
         wtype != TDM_DTYPE_Q4_1 && wtype != TDM_DTYPE_Q8_0))
        return TDM_ERR_UNSUPPORTED;
    tdm_bweight_t *w = (tdm_bweight_t *)calloc(1, sizeof(*w));
    if (w == NULL)
        return TDM_ERR_NOMEM;
    w->wtype = wtype;
    w->rows = rows;
    w->k = k;
    w->row_bytes = row_bytes;
    size_t bytes = row_bytes * (size_t)rows;
    w->data = cuda_buf_alloc(be, bytes);
    if (w->data == NULL) {
        free(w);
        return TDM_ERR_NOMEM;
    }
    /* synchronous: the GGUF map may be unmapped after the model loads */
    TDM_CUDA_CHECK(cudaMemcpyAsync(w->data, data, bytes, cudaMemcpyHostToDevice, cb->stream));
    TDM_CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    *out = w;
    return TDM_OK;
}

static void cuda_weight_free(tdm_backend_t *be, tdm_bweight_t *w)
{
    if (w == NULL)
        return;
    cuda_buf_free(be, w->data);
    free(w);
}

/* ---- graphs ---- */

/* Captures fn's ops into a graph. Anything that goes wrong inside (an op
 * that needs more scratch than exists, a call capture does not allow, a
 * launch error) fails the capture, never the process: the caller runs the
 * step op by op and this shape is never captured again. */
static void *cuda_graph_capture(tdm_backend_t *be, void (*fn)(void *arg), void *arg)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    cudaError_t err = cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeThreadLocal);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        tdm_log_warn(MOD, "cannot start a CUDA graph capture (%s); steps run op by op",
                     cudaGetErrorString(err));
        return NULL;
    }
    tdm_scratch_capture_begin(&cb->scratch);
    tl_capturing = true;
    tl_capture_err = cudaSuccess;
    fn(arg);
    tl_capturing = false;
    const bool scratch_ok = tdm_scratch_capture_end(&cb->scratch);
    cudaGraph_t g = NULL;
    err = cudaStreamEndCapture(cb->stream, &g);
    if (err == cudaSuccess)
        err = tl_capture_err;
    cudaGraphExec_t x = NULL;
    if (err == cudaSuccess && scratch_ok)
        err = cudaGraphInstantiate(&x, g, 0);
    if (g != NULL)
        (void)cudaGraphDestroy(g);
    if (err != cudaSuccess || !scratch_ok) {
        (void)cudaGetLastError();
        if (x != NULL)
            (void)cudaGraphExecDestroy(x);
        tdm_log_warn(MOD, "cannot capture a decode step into a CUDA graph (%s); it runs op by op",
                     !scratch_ok ? "an op needed more scratch than exists"
                                 : cudaGetErrorString(err));
        return NULL;
    }
    tdm_scratch_graph_hold(&cb->scratch);
    return (void *)x;
}

static void cuda_graph_launch(tdm_backend_t *be, void *graph)
{
    TDM_CUDA_CHECK(cudaGraphLaunch((cudaGraphExec_t)graph, tdm_cuda_of(be)->stream));
}

static void cuda_graph_free(tdm_backend_t *be, void *graph)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    if (graph == NULL)
        return;
    /* a launch of it may still run: buffers retired under it go after */
    TDM_CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    (void)cudaGraphExecDestroy((cudaGraphExec_t)graph);
    tdm_scratch_graph_drop(&cb->scratch);
}

/* ---- life cycle ---- */

static void cuda_destroy(tdm_backend_t *be)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    (void)cudaStreamSynchronize(cb->stream);
    tdm_cuda_kv_transfer_fini(cb);
    tdm_scratch_fini(&cb->scratch);
    (void)cudaStreamDestroy(cb->copy);
    (void)cudaStreamDestroy(cb->stream);
    free(cb);
}

extern "C" tdm_status_t tdm_backend_cuda_create(int device, tdm_backend_t **out)
{
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        (void)cudaGetLastError();
        tdm_log_error(MOD, "no CUDA device (%s); run on a GPU machine or use --device cpu",
                      err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
        return TDM_ERR_NOT_FOUND;
    }
    if (device < 0 || device >= count) {
        tdm_log_error(MOD, "GPU %d does not exist (this machine has %d)", device, count);
        return TDM_ERR_INVALID;
    }
    tdm_cuda_use_device(device);
    cudaDeviceProp prop;
    TDM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    if (prop.major < 8) {
        tdm_log_error(MOD, "GPU %d (%s) is compute capability %d.%d; tandem needs 8.0 or newer",
                      device, prop.name, prop.major, prop.minor);
        return TDM_ERR_UNSUPPORTED;
    }
    tdm_cuda_backend_t *cb = (tdm_cuda_backend_t *)calloc(1, sizeof(*cb));
    if (cb == NULL)
        return TDM_ERR_NOMEM;
    cb->device = device;
    cb->n_sm = prop.multiProcessorCount;
    cb->cc_major = prop.major;
    cb->cc_minor = prop.minor;
    cb->smem_optin = prop.sharedMemPerBlockOptin;
    tdm_scratch_init(&cb->scratch, scratch_alloc, scratch_release, cb, TDM_CUDA_SCRATCH_INIT);
    TDM_CUDA_CHECK(cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking));
    TDM_CUDA_CHECK(cudaStreamCreateWithFlags(&cb->copy, cudaStreamNonBlocking));
    tdm_cuda_kv_transfer_init(cb);
    /* the table, field by field (no designated initializers in C++17) */
    cb->ops.name = "cuda";
    cb->ops.destroy = cuda_destroy;
    cb->ops.buf_alloc = cuda_buf_alloc;
    cb->ops.buf_free = cuda_buf_free;
    cb->ops.copy_to = cuda_copy_to;
    cb->ops.copy_from = cuda_copy_from;
    cb->ops.sync = cuda_sync;
    cb->ops.weight_load = cuda_weight_load;
    cb->ops.weight_free = cuda_weight_free;
    cb->ops.act_size = cuda_act_size;
    cb->ops.act_prepare = cuda_act_prepare;
    cb->ops.matmul = cuda_matmul;
    cb->ops.embed = cuda_embed;
    cb->ops.rmsnorm = TDM_CUDA_RMSNORM;
    cb->ops.rope = TDM_CUDA_ROPE;
    cb->ops.swiglu = TDM_CUDA_SWIGLU;
    cb->ops.add = TDM_CUDA_ADD;
    cb->ops.gather_rows = TDM_CUDA_GATHER;
    cb->ops.kv_write = TDM_CUDA_KV_WRITE;
    cb->ops.attention = TDM_CUDA_ATTENTION;
    cb->ops.argmax = cuda_argmax;
    cb->ops.sample = cuda_sample;
    cb->ops.kv_out = cuda_kv_out;
    cb->ops.kv_in = cuda_kv_in;
    cb->ops.kv_wait = cuda_kv_wait;
    cb->ops.graph_capture = cuda_graph_capture;
    cb->ops.graph_launch = cuda_graph_launch;
    cb->ops.graph_free = cuda_graph_free;
    cb->ops.host_alloc = cuda_host_alloc;
    cb->ops.host_free = cuda_host_free;
    cb->ops.device_memory = 1;
    cb->base.ops = &cb->ops;
    (void)tdm_cuda_scratch(cb, TDM_CUDA_SCRATCH_INIT);
    size_t free_b = 0, total_b = 0;
    TDM_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    tdm_log_info(MOD, "GPU %d: %s, compute capability %d.%d, %d SMs, %.1f GiB (%.1f GiB free)",
                 device, prop.name, prop.major, prop.minor, prop.multiProcessorCount,
                 (double)total_b / (1ull << 30), (double)free_b / (1ull << 30));
    *out = &cb->base;
    return TDM_OK;
}

extern "C" tdm_status_t tdm_backend_cuda_mem_info(tdm_backend_t *be, size_t *free_bytes,
                                                  size_t *total_bytes)
{
    (void)tdm_cuda_of(be);
    return cudaMemGetInfo(free_bytes, total_bytes) == cudaSuccess ? TDM_OK : TDM_ERR_IO;
}
