/* tdm_dtype_to_f32 for every GGUF layout tandem reads, against the PyPI
 * gguf package's gguf.quants.dequantize (GGML's reference, in numpy) on
 * random blocks: every byte random, scales included (so NaN and infinite
 * f16 scales occur too), bit for bit (NaN equal to NaN). The reference is
 * computed at test time by the project's venv (make deps installs gguf);
 * without it the test skips and says so. Fixed seed. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tandem/dtype.h"
#include "tandem/qform.h"
#include "test_util.h"

/* The reference for n_blocks random blocks of type: the raw bytes, then
 * the f32 values, in one file. */
static int reference(const char *py, uint32_t type, int n_blocks, const char *out)
{
    char cmd[4096];
    snprintf(cmd, sizeof(cmd),
             "'%s' -c '\n"
             "import numpy as np, gguf, sys\n"
             "np.seterr(all=\"ignore\")\n"
             "from gguf.quants import dequantize\n"
             "t = gguf.GGMLQuantizationType(%u)\n"
             "be, bb = gguf.GGML_QUANT_SIZES[t]\n"
             "rng = np.random.default_rng(%u)\n"
             "raw = rng.integers(0, 256, size=(%d, bb), dtype=np.uint8)\n"
             "y = dequantize(raw.reshape(-1), t).astype(np.float32)\n"
             "open(sys.argv[1], \"wb\").write(raw.tobytes() + y.tobytes())\n"
             "' '%s'",
             py, type, 1000u + type, n_blocks, out);
    return system(cmd);
}

static void check_type(const char *py, uint32_t type)
{
    const size_t be = tdm_dtype_block_elems(type), bb = tdm_dtype_block_bytes(type);
    const int n_blocks = be == 1 ? 8192 : be == TDM_QK ? 4096 : 1024;
    char path[] = "/tmp/tandem-dequant-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) {
        CHECK(0, "mkstemp");
        return;
    }
    close(fd);
    int rc = reference(py, type, n_blocks, path);
    CHECK(rc == 0, "%s: the gguf reference failed (exit %d)", tdm_dtype_name(type), rc);
    const size_t n = (size_t)n_blocks * be, raw_bytes = (size_t)n_blocks * bb;
    unsigned char *buf = malloc(raw_bytes + n * sizeof(float));
    float *got = malloc(n * sizeof(float));
    FILE *f = fopen(path, "rb");
    size_t have = f != NULL ? fread(buf, 1, raw_bytes + n * sizeof(float), f) : 0;
    if (f != NULL)
        fclose(f);
    unlink(path);
    CHECK(have == raw_bytes + n * sizeof(float), "%s: reference file has %zu bytes, want %zu",
          tdm_dtype_name(type), have, raw_bytes + n * sizeof(float));
    if (rc == 0 && have == raw_bytes + n * sizeof(float)) {
        const float *want = (const float *)(buf + raw_bytes);
        tdm_dtype_to_f32(type, buf, got, n);
        size_t differ = 0, nan = 0, first = n;
        for (size_t i = 0; i < n; i++) {
            if (isnan(want[i]) && isnan(got[i])) {
                nan++;
                continue;
            }
            if (memcmp(&want[i], &got[i], sizeof(float)) != 0) {
                if (first == n)
                    first = i;
                differ++;
            }
        }
        CHECK(differ == 0,
              "%s: %zu of %zu values differ from gguf.quants (first #%zu: %.9g, want %.9g)",
              tdm_dtype_name(type), differ, n, first, first < n ? (double)got[first] : 0.0,
              first < n ? (double)want[first] : 0.0);
        printf("%-7s %5d blocks of %3zu: %zu values bit-identical to gguf.quants.dequantize (%zu "
               "NaN)\n",
               tdm_dtype_name(type), n_blocks, be, n - differ, nan);
    }
    free(buf);
    free(got);
}

/* The integer form (tandem/qform.h) of random blocks gives, evaluated in
 * its stated order, the same bits as tdm_dtype_to_f32: the kernels that
 * pack from it compute with exactly the GGUF weights. */
static void check_qform(uint32_t type)
{
    tdm_qform_t f;
    CHECK(tdm_qform_of(type, &f), "%s has an integer form", tdm_dtype_name(type));
    const size_t be = tdm_dtype_block_elems(type), bb = tdm_dtype_block_bytes(type);
    const size_t nblk = 512, n = nblk * be;
    uint8_t *raw = malloc(nblk * bb), *u = malloc(n);
    float *want = malloc(n * sizeof(float)), *sc = malloc(n / 16 * sizeof(float));
    float *mn = malloc(n / 16 * sizeof(float));
    uint64_t st = 0x51ed270b27ull + type;
    for (size_t i = 0; i < nblk * bb; i++) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        raw[i] = (uint8_t)(st >> 56);
    }
    tdm_dtype_to_f32(type, raw, want, n);
    tdm_qform_decode(type, raw, n, u, sc, mn);
    size_t differ = 0, big = 0;
    for (size_t e = 0; e < n; e++) {
        volatile float v = sc[e / f.sub] * (float)((int)u[e] - f.bias);
        float got = f.has_min ? v + mn[e / f.sub] : v;
        if (f.nib && u[e] > 15)
            big++;
        if (!(isnan(got) && isnan(want[e])) && memcmp(&got, &want[e], 4) != 0)
            differ++;
    }
    CHECK(differ == 0 && big == 0, "%s integer form: %zu of %zu values differ, %zu codes too big",
          tdm_dtype_name(type), differ, n, big);
    free(raw);
    free(u);
    free(want);
    free(sc);
    free(mn);
}

int main(void)
{
    static const uint32_t qtypes[] = {TDM_DTYPE_Q4_0, TDM_DTYPE_Q4_1, TDM_DTYPE_Q8_0,
                                      TDM_DTYPE_Q5_0, TDM_DTYPE_Q5_1, TDM_DTYPE_IQ4_NL,
                                      TDM_DTYPE_Q2_K, TDM_DTYPE_Q3_K, TDM_DTYPE_Q4_K,
                                      TDM_DTYPE_Q5_K, TDM_DTYPE_Q6_K, TDM_DTYPE_IQ4_XS};
    for (size_t i = 0; i < sizeof(qtypes) / sizeof(qtypes[0]); i++)
        check_qform(qtypes[i]);
    tdm_qform_t f;
    CHECK(!tdm_qform_of(TDM_DTYPE_Q8_K, &f) && !tdm_qform_of(TDM_DTYPE_F16, &f),
          "Q8_K and float types have no integer form");
    CHECK(!tdm_dtype_supported(TDM_DTYPE_Q8_K) && tdm_dtype_supported(TDM_DTYPE_Q4_K) &&
              tdm_dtype_supported(TDM_DTYPE_BF16),
          "supported: every integer form and BF16, not Q8_K");
    if (n_fail > 0)
        return t_finish();
    const char *py = t_python();
    char probe[1200];
    snprintf(probe, sizeof(probe), "'%s' -c 'import gguf, numpy' 2>/dev/null", py ? py : "false");
    if (py == NULL || system(probe) != 0) {
        printf("SKIP: no Python with the gguf package (make deps makes .venv; or set "
               "TANDEM_PYTHON)\n");
        return 77;
    }
    static const uint32_t types[] = {
        TDM_DTYPE_Q4_0,   TDM_DTYPE_Q4_1,   TDM_DTYPE_Q8_0, TDM_DTYPE_Q5_0, TDM_DTYPE_Q5_1,
        TDM_DTYPE_IQ4_NL, TDM_DTYPE_Q2_K,   TDM_DTYPE_Q3_K, TDM_DTYPE_Q4_K, TDM_DTYPE_Q5_K,
        TDM_DTYPE_Q6_K,   TDM_DTYPE_IQ4_XS, TDM_DTYPE_BF16, TDM_DTYPE_F16};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        CHECK(tdm_dtype_known(types[i]), "%s known", tdm_dtype_name(types[i]));
        check_type(py, types[i]);
    }
    CHECK(!tdm_dtype_known(9), "Q8_1 is not a layout tandem reads");
    return t_finish();
}
