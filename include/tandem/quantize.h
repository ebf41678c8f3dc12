/* tandem: the quantizers `tandem quantize` writes GGUF rows with.
 *
 * Every layout of tandem/dtype.h that tandem computes with, written so that
 * tdm_dtype_to_f32 reads back exactly the values the quantizer chose. The
 * quantized types search their scales (and mins) per block: each candidate
 * scale rounds the block's values to codes, the codes get their weighted
 * least-squares scale (and min), and the best by weighted squared error is
 * kept and refined; the integer sub-scales of the K-quants and IQ4_XS are
 * then chosen against the f16 super-block scales by the error they give.
 *
 * The weights of that error: imp[i] * sqrt(2 * ms + x[i]^2), ms the
 * block's mean square (a K-quant's super-block, else the 32-block) and
 * imp[i] 1 without an importance vector: large weights count a little
 * more, and what the calibration text exercises is kept best.
 *
 * Q8_0, F32, F16 and BF16 are GGML's own formulas (the same bits as its
 * reference quantizers); Q4_0, Q4_1, Q5_0 and Q5_1 keep the block GGML's
 * formula gives wherever the search does not beat it. f16 scales saturate at
 * +-65504, so every finite input dequantizes to finite values (F16 itself
 * rounds overflowing values to infinity, as IEEE does). */
#ifndef TANDEM_QUANTIZE_H
#define TANDEM_QUANTIZE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Quantizes n f32 values (a multiple of the type's block) into dst, a row
 * of `type`. imp: NULL or n non-negative importance weights (per input
 * column: the mean squared activation seen on calibration text, from an
 * importance matrix); with it, each block's scale/min search minimises the
 * importance-weighted squared error (Q8_0 and the float types ignore it).
 * Returns 0, or -1 for a type it cannot write or an n that is not a
 * multiple of its block. Thread-safe: no global state, stack buffers only. */
int tdm_quantize_row(uint32_t type, const float *src, void *dst, uint64_t n, const float *imp);

/* True for the types tdm_quantize_row writes: F32, F16, BF16, Q8_0, Q4_0,
 * Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS. */
int tdm_quantize_supported(uint32_t type);

#ifdef __cplusplus
}
#endif

#endif
