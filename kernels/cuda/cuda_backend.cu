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
#include "quant.cuh"
#include "rowops.cuh"
#include "sample.cuh"
#include "tandem/log.h"
#include "tandem/qform.h"

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

/* The device type wtype computes as (quant.cuh): float types and Q4_0,
 * Q4_1, Q8_0 as they are, other quantized types the layout of their
 * integer form (tandem/qform.h); CUDA_DEV_NONE when the kernels have none
 * (Q8_K, types tandem does not compute with). */
#define CUDA_DEV_NONE UINT32_MAX
static uint32_t cuda_dev_type(uint32_t wtype)
{
    tdm_qform_t f;
    if (wtype == TDM_DTYPE_F32 || wtype == TDM_DTYPE_F16 || wtype == TDM_DTYPE_BF16)
        return wtype;
    if (!tdm_qform_of(wtype, &f) || (f.sub != 16 && f.sub != 32))
        return CUDA_DEV_NONE;
    const uint32_t dev = tdm_cuda_type_of_layout(
        (f.nib ? TDM_CUDA_LY_NIB : 0) | (f.has_min ? TDM_CUDA_LY_MIN : 0) |
        (f.sub == 16 ? TDM_CUDA_LY_SUB16 : 0) | (f.f16 ? TDM_CUDA_LY_SC16 : 0));
    switch (dev) {
#define DEV_CASE(T)                                                                                \
    case T: return dev;
        TDM_CUDA_FOR_EACH_QDEV(DEV_CASE)
#undef DEV_CASE
    default: return CUDA_DEV_NONE;
    }
}

/* A scale or min into a block: f32, or f16 where the layout says so (the
 * form promises such values are f16; one that is not fails the load). */
static bool put_scale(uint8_t *dst, float v, int bytes)
{
    if (bytes == 4) {
        memcpy(dst, &v, 4);
        return true;
    }
    const uint16_t h = tdm_f32_to_f16(v);
    const float back = tdm_f16_to_f32(h);
    memcpy(dst, &h, 2);
    return memcmp(&back, &v, 4) == 0 || (v != v && back != back);
}

/* One row of k elements of wtype into blocks of device type dev, from the
 * row's integer form (u, sc, mn: room for k codes and k / 16 scales and
 * mins). False when a value does not fit the layout (a code past its
 * width, a scale that is not f16): never for the types tandem knows. */
static bool repack_row(uint32_t wtype, uint32_t dev, const uint8_t *src, int64_t k, uint8_t *dst,
                       uint8_t *u, float *sc, float *mn)
{
    tdm_qform_t f;
    (void)tdm_qform_of(wtype, &f);
    tdm_qform_decode(wtype, src, (uint64_t)k, u, sc, mn);
    const uint32_t ly = tdm_cuda_layout(dev);
    const int ns = tdm_cuda_nsub(dev), sb = tdm_cuda_scale_bytes(dev);
    const int mo = tdm_cuda_min_off(dev), co = tdm_cuda_code_off(dev);
    const int bb = tdm_cuda_block_bytes(dev), bias = f.has_min ? 0 : f.bias;
    bool ok = true;
    for (int64_t b = 0; b < k / 32; b++) {
        uint8_t *o = dst + b * bb;
        memset(o, 0, (size_t)bb);
        for (int h = 0; h < ns; h++) {
            ok &= put_scale(o + h * sb, sc[b * ns + h], sb);
            if (ly & TDM_CUDA_LY_MIN)
                ok &= put_scale(o + mo + h * sb, mn[b * ns + h], sb);
        }
        for (int e = 0; e < 32; e++) {
            const int c = (int)u[b * 32 + e] - bias;
            if (ly & TDM_CUDA_LY_NIB) {
                const int v = ly & TDM_CUDA_LY_MIN ? c : c + 8;
                ok &= v >= 0 && v < 16;
                o[co + e % 16] |= (uint8_t)((v & 15) << (e / 16 * 4));
            } else {
                ok &= c >= -128 && c < 128;
                o[co + e] = (uint8_t)(int8_t)c;
            }
        }
    }
    return ok;
}

/* Rows of a type the device does not keep as GGUF has them: repacked here
 * in chunks of about 64 MiB and copied up one chunk at a time. */
static tdm_status_t upload_repacked(tdm_cuda_backend_t *cb, tdm_bweight_t *w, const void *data)
{
    const size_t src_rb = tdm_dtype_row_bytes(w->wtype, (uint64_t)w->k);
    int64_t chunk = (int64_t)(((size_t)64 << 20) / w->row_bytes);
    chunk = chunk < 1 ? 1 : chunk > w->rows ? w->rows : chunk;
    uint8_t *host = (uint8_t *)malloc((size_t)chunk * w->row_bytes);
    uint8_t *u = (uint8_t *)malloc((size_t)w->k);
    float *sc = (float *)malloc((size_t)(w->k / 16) * 2 * sizeof(float));
    tdm_status_t st = host && u && sc ? TDM_OK : TDM_ERR_NOMEM;
    for (int64_t r0 = 0; st == TDM_OK && r0 < w->rows; r0 += chunk) {
        const int64_t nr = w->rows - r0 < chunk ? w->rows - r0 : chunk;
        for (int64_t r = 0; r < nr && st == TDM_OK; r++)
            if (!repack_row(w->wtype, w->dev, (const uint8_t *)data + (size_t)(r0 + r) * src_rb,
                            w->k, host + (size_t)r * w->row_bytes, u, sc, sc + w->k / 16)) {
                tdm_log_error(MOD, "row %lld of a %s weight does not fit its GPU layout",
                              (long long)(r0 + r), tdm_dtype_name(w->wtype));
                st = TDM_ERR_INVALID;
            }
        if (st != TDM_OK)
            break;
        const size_t bytes = (size_t)nr * w->row_bytes;
        TDM_CUDA_CHECK(cudaMemcpyAsync((uint8_t *)w->data + (size_t)r0 * w->row_bytes, host, bytes,
                                       cudaMemcpyHostToDevice, cb->stream));
        TDM_CUDA_CHECK(cudaStreamSynchronize(cb->stream)); /* host is reused */
    }
    free(host);
    free(u);
    free(sc);
    return st;
}

static tdm_status_t cuda_weight_load(tdm_backend_t *be, const void *data, uint32_t wtype,
                                     int64_t rows, int64_t k, tdm_bweight_t **out)
{
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    const uint32_t dev = cuda_dev_type(wtype);
    if (dev == CUDA_DEV_NONE) {
        tdm_log_error(MOD, "weight type %s is not supported on the GPU (it computes with %s)",
                      tdm_dtype_name(wtype), tdm_dtype_supported_list());
        return TDM_ERR_UNSUPPORTED;
    }
    size_t row_bytes = tdm_dtype_row_bytes(wtype, (uint64_t)k);
    if (row_bytes == 0 || rows <= 0 || (tdm_cuda_is_q(dev) && k % 32 != 0)) {
        tdm_log_error(MOD, "%s weight of %lld x %lld: not whole blocks of the type",
                      tdm_dtype_name(wtype), (long long)rows, (long long)k);
        return TDM_ERR_UNSUPPORTED;
    }
    tdm_bweight_t *w = (tdm_bweight_t *)calloc(1, sizeof(*w));
    if (w == NULL)
        return TDM_ERR_NOMEM;
    w->wtype = wtype;
    w->dev = dev;
    w->rows = rows;
    w->k = k;
    w->row_bytes = dev == wtype ? row_bytes : (size_t)(k / 32) * (size_t)tdm_cuda_block_bytes(dev);
    size_t bytes = w->row_bytes * (size_t)rows;
    w->data = cuda_buf_alloc(be, bytes);
    if (w->data == NULL) {
        free(w);
        return TDM_ERR_NOMEM;
    }
    if (dev != wtype) {
        tdm_status_t st = upload_repacked(cb, w, data);
        if (st != TDM_OK) {
            cuda_buf_free(be, w->data);
            free(w);
            return st;
        }
        *out = w;
        return TDM_OK;
    }
    /* synchronous: the GGUF map may be unmapped after the model loads */
    TDM_CUDA_CHECK(cudaMemcpyAsync(w->data, data, bytes, cudaMemcpyHostToDevice, cb->stream));
    TDM_CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    *out = w;
    return TDM_OK;
}

/* Every weight lives in device memory: the host data is never read again. */
static int cuda_weight_uses_source(tdm_backend_t *be, const tdm_bweight_t *w)
{
    (void)be;
    (void)w;
    return 0;
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
    cb->ops.weight_uses_source = cuda_weight_uses_source;
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
