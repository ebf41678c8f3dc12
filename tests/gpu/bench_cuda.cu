/* bench_cuda: the two ceilings tandem's GPU figures are held to, measured on
 * the machine the figures come from (tests/gpu/run.sh).
 *
 *   copy   device-to-device cudaMemcpy of a buffer much larger than L2;
 *          bandwidth counts bytes read plus bytes written
 *   gemm   cuBLAS f16 x f16 -> f32-accumulated GEMM (cublasGemmEx) of the
 *          shapes a prefill of `tokens` tokens runs on a Llama-3-8B layer:
 *          q (4096x4096), k/v (1024x4096), o (4096x4096), gate/up
 *          (14336x4096), down (4096x14336); TFLOP/s = 2*M*N*K / time
 *
 * Timing: CUDA events around each run after warm-ups, median of --reps
 * runs; inputs are random (never zeros), several buffers rotated so the
 * weights do not sit in L2. Prints one JSON object on stdout.
 *
 * usage: bench_cuda [--copy-gib G] [--tokens N] [--reps R] */
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "bench_cuda: %s failed: %s\n", #call, cudaGetErrorString(e_));         \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)
#define CB(call)                                                                                   \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                         \
            fprintf(stderr, "bench_cuda: %s failed: status %d\n", #call, (int)s_);                 \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

__global__ void fill_random(__half *p, size_t n, unsigned long long seed)
{
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned long long z = seed + i * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        float u = (float)(z >> 40) / 16777216.0f; /* [0, 1) */
        p[i] = __float2half(u * 2.0f - 1.0f);
    }
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static float median(float *v, int n)
{
    qsort(v, (size_t)n, sizeof(float), cmp_float);
    return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv)
{
    double copy_gib = 4;
    int tokens = 2048, reps = 20;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--copy-gib") == 0)
            copy_gib = atof(argv[i + 1]);
        else if (strcmp(argv[i], "--tokens") == 0)
            tokens = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--reps") == 0)
            reps = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench_cuda [--copy-gib G] [--tokens N] [--reps R]\n");
            return 2;
        }
    }
    if (reps < 3 || reps > 1000 || tokens < 1 || copy_gib <= 0) {
        fprintf(stderr, "bench_cuda: bad arguments\n");
        return 2;
    }
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        fprintf(stderr, "bench_cuda: no CUDA device\n");
        return 77;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    float *t = (float *)malloc((size_t)reps * sizeof(float));

    /* ---- copy ---- */
    size_t bytes = (size_t)(copy_gib * (1ull << 30)) & ~(size_t)255;
    void *src, *dst;
    CK(cudaMalloc(&src, bytes));
    CK(cudaMalloc(&dst, bytes));
    fill_random<<<1024, 256>>>((__half *)src, bytes / 2, 1);
    CK(cudaGetLastError());
    for (int i = 0; i < 3; i++)
        CK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(a));
        CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        CK(cudaEventElapsedTime(&t[i], a, b));
    }
    float copy_ms = median(t, reps);
    double copy_gbs = 2.0 * (double)bytes / (copy_ms * 1e-3) / 1e9;
    CK(cudaFree(src));
    CK(cudaFree(dst));

    /* ---- cuBLAS GEMM: y[N tokens][M] = x[N][K] . W[M][K]^T ---- */
    cublasHandle_t h;
    CB(cublasCreate(&h));
    static const struct {
        const char *name;
        int m, k;
    } shapes[] = {{"q", 4096, 4096},    {"k", 1024, 4096},     {"v", 1024, 4096},
                  {"o", 4096, 4096},    {"gate", 14336, 4096}, {"up", 14336, 4096},
                  {"down", 4096, 14336}};
    const int n_shapes = (int)(sizeof(shapes) / sizeof(shapes[0]));
    const int n_sets = 3; /* rotated weight sets: 3 x 117 MB for gate: past L2 */
    double total_flop = 0, total_ms = 0;
    printf("{\"device\": \"%s\", \"sm\": %d, \"copy_bytes\": %zu, \"copy_ms\": %.4f, "
           "\"copy_gbps\": %.1f, \"tokens\": %d, \"gemm\": [",
           prop.name, prop.multiProcessorCount, bytes, copy_ms, copy_gbs, tokens);
    for (int s = 0; s < n_shapes; s++) {
        int M = shapes[s].m, K = shapes[s].k, N = tokens;
        __half *w[n_sets], *x;
        float *y;
        for (int i = 0; i < n_sets; i++) {
            CK(cudaMalloc(&w[i], (size_t)M * K * sizeof(__half)));
            fill_random<<<1024, 256>>>(w[i], (size_t)M * K, 100 + (unsigned long long)i);
        }
        CK(cudaMalloc(&x, (size_t)N * K * sizeof(__half)));
        CK(cudaMalloc(&y, (size_t)N * M * sizeof(float)));
        fill_random<<<1024, 256>>>(x, (size_t)N * K, 7);
        CK(cudaGetLastError());
        const float one = 1.0f, zero = 0.0f;
        /* column-major view: Y^T[M][N] = W[M][K] . X^T[K][N] */
        for (int i = 0; i < 3 + reps; i++) {
            if (i >= 3)
                CK(cudaEventRecord(a));
            CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, &one, w[i % n_sets], CUDA_R_16F,
                            K, x, CUDA_R_16F, K, &zero, y, CUDA_R_32F, M, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
            if (i >= 3) {
                CK(cudaEventRecord(b));
                CK(cudaEventSynchronize(b));
                CK(cudaEventElapsedTime(&t[i - 3], a, b));
            }
        }
        float ms = median(t, reps);
        double flop = 2.0 * M * (double)N * K;
        total_flop += flop;
        total_ms += ms;
        printf("%s{\"name\": \"%s\", \"m\": %d, \"n\": %d, \"k\": %d, \"ms\": %.4f, "
               "\"tflops\": %.1f}",
               s ? ", " : "", shapes[s].name, M, N, K, ms, flop / (ms * 1e-3) / 1e12);
        for (int i = 0; i < n_sets; i++)
            CK(cudaFree(w[i]));
        CK(cudaFree(x));
        CK(cudaFree(y));
    }
    printf("], \"gemm_layer_tflops\": %.1f}\n", total_flop / (total_ms * 1e-3) / 1e12);
    CB(cublasDestroy(h));
    free(t);
    return 0;
}
