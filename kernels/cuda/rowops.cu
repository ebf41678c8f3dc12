/* tandem CUDA backend: the row and elementwise ops, plainly.
 *
 * rmsnorm: one block of 256 threads per row: thread i sums the squares of
 *   elements i, i+256, ... in order, then a fixed tree (shared memory)
 *   combines the 256 partials; the order depends on d only. Bytes: x read
 *   twice (the second pass from L2), out written once.
 * rope: one thread per (row, pair): the angle pos * theta^(-2i/n_rot) in
 *   double and rounded to float once, as the CPU does, then applied to that
 *   pair of every head of the row.
 * swiglu, add: one thread per element (grid-stride). gather_rows: one
 *   thread per element of the gathered rows (dst may not alias src).
 * Nothing here reduces across rows, so every op is batch invariant. */
#include "rowops.cuh"

#define ROW_THREADS 256

static __global__ void __launch_bounds__(ROW_THREADS)
    rmsnorm_rows(const float *__restrict__ x, const float *__restrict__ w, int64_t d, float eps,
                 float *out)
{
    const float *xr = x + (int64_t)blockIdx.x * d;
    float *orow = out + (int64_t)blockIdx.x * d;
    float acc = 0.0f;
    for (int64_t j = threadIdx.x; j < d; j += ROW_THREADS)
        acc = __fmaf_rn(xr[j], xr[j], acc);
    __shared__ float part[ROW_THREADS];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = ROW_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s)
            part[threadIdx.x] = __fadd_rn(part[threadIdx.x], part[threadIdx.x + s]);
        __syncthreads();
    }
    float scale = 1.0f / sqrtf(__fadd_rn(part[0] / (float)d, eps));
    /* out may be x: every thread has read its x before the barrier above,
     * and writes only the elements it reads here */
    for (int64_t j = threadIdx.x; j < d; j += ROW_THREADS)
        orow[j] = __fmul_rn(__fmul_rn(xr[j], scale), w[j]);
}

extern "C" void cuda_rmsnorm_basic(tdm_backend_t *be, const float *x, const float *w, int64_t n,
                                   int64_t d, float eps, float *out)
{
    if (n <= 0)
        return;
    rmsnorm_rows<<<(unsigned)n, ROW_THREADS, 0, tdm_cuda_of(be)->stream>>>(x, w, d, eps, out);
    TDM_CUDA_LAUNCHED("rmsnorm_rows");
}

static __global__ void rope_rows(float *x, const int32_t *__restrict__ pos, int64_t n,
                                 int32_t n_heads, int32_t head_dim, int32_t half, float theta)
{
    int64_t id = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (id >= n * half)
        return;
    int64_t r = id / half;
    int32_t i = (int32_t)(id % half);
    double freq = pow((double)theta, -2.0 * i / (double)(2 * half));
    double a = (double)pos[r] * freq;
    float c = (float)cos(a), s = (float)sin(a);
    float *row = x + r * (int64_t)n_heads * head_dim;
    for (int32_t h = 0; h < n_heads; h++) {
        float *v = row + (int64_t)h * head_dim + 2 * i;
        float x0 = v[0], x1 = v[1];
        v[0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        v[1] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    }
}

extern "C" void cuda_rope_basic(tdm_backend_t *be, float *x, const int32_t *pos, int64_t n,
                                int32_t n_heads, int32_t head_dim, int32_t n_rot, float theta)
{
    if (n_rot > head_dim)
        n_rot = head_dim;
    int32_t half = n_rot / 2;
    if (n <= 0 || half <= 0)
        return;
    int64_t total = n * half;
    rope_rows<<<(unsigned)tdm_cuda_div_up(total, 256), 256, 0, tdm_cuda_of(be)->stream>>>(
        x, pos, n, n_heads, head_dim, half, theta);
    TDM_CUDA_LAUNCHED("rope_rows");
}

static __global__ void swiglu_elems(const float *gate, const float *__restrict__ up, int64_t count,
                                    float *out)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count;
         i += (int64_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), up[i]);
    }
}

static __global__ void add_elems(float *x, const float *__restrict__ y, int64_t count)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = __fadd_rn(x[i], y[i]);
}

static __global__ void gather_elems(const float *__restrict__ src, const int32_t *__restrict__ idx,
                                    int64_t n, int64_t d, float *__restrict__ dst)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * d;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / d, j = i % d;
        dst[i] = src[(int64_t)idx[t] * d + j];
    }
}

static unsigned grid_for(int64_t count)
{
    int64_t b = tdm_cuda_div_up(count, 256);
    return (unsigned)(b < 65535 ? (b < 1 ? 1 : b) : 65535);
}

extern "C" void cuda_swiglu_basic(tdm_backend_t *be, const float *gate, const float *up, int64_t n,
                                  int64_t f, float *out)
{
    int64_t count = n * f;
    if (count <= 0)
        return;
    swiglu_elems<<<grid_for(count), 256, 0, tdm_cuda_of(be)->stream>>>(gate, up, count, out);
    TDM_CUDA_LAUNCHED("swiglu_elems");
}

extern "C" void cuda_add_basic(tdm_backend_t *be, float *x, const float *y, int64_t count)
{
    if (count <= 0)
        return;
    add_elems<<<grid_for(count), 256, 0, tdm_cuda_of(be)->stream>>>(x, y, count);
    TDM_CUDA_LAUNCHED("add_elems");
}

extern "C" void cuda_gather_rows_basic(tdm_backend_t *be, const float *src, const int32_t *idx,
                                       int64_t n, int64_t d, float *dst)
{
    if (n <= 0 || d <= 0)
        return;
    gather_elems<<<grid_for(n * d), 256, 0, tdm_cuda_of(be)->stream>>>(src, idx, n, d, dst);
    TDM_CUDA_LAUNCHED("gather_elems");
}
