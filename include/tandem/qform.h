/* tandem: the integer form of a quantized row, the one description of a
 * GGUF block layout that kernels pack from.
 *
 * Every quantized type tandem computes with is, per sub-block of `sub`
 * elements (16 or 32), a float scale, an optional float min and one small
 * unsigned integer u per element:
 *     x[e] = scale[e / sub] * (float)((int)u[e] - bias)                  (no min)
 *     x[e] = scale[e / sub] * (float)((int)u[e] - bias) + min[e / sub]   (has_min; bias 0)
 * with the product and the sum each rounded to f32 (never fused), which is
 * bit for bit what tdm_dtype_to_f32 (GGML's reference order) gives. The
 * scales and mins are exact products of the block's f16 and its integer
 * sub-scales, so kernels may fold them as they like without changing a
 * weight. u < 16 where `nib` says so (packs of 4 bits), else u < 256. */
#ifndef TANDEM_QFORM_H
#define TANDEM_QFORM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tdm_qform {
    uint8_t sub;     /* elements per scale: 16 or 32 */
    uint8_t bias;    /* code = u - bias */
    uint8_t has_min; /* a min per sub-block (then bias is 0) */
    uint8_t nib;     /* every u < 16 */
    uint8_t f16;     /* every scale and min is an f16 value */
} tdm_qform_t;

/* The form of `type`; 0 for types without one (float types, Q8_K). */
int tdm_qform_of(uint32_t type, tdm_qform_t *f);

/* n elements (a multiple of the type's block) of a row into u[n],
 * scale[n / sub] and, with has_min, min[n / sub] (min may be NULL
 * otherwise). Nothing is checked: the caller sized the row. */
void tdm_qform_decode(uint32_t type, const void *row, uint64_t n, uint8_t *u, float *scale,
                      float *min);

/* The super-block scales of the types with 256-element blocks (K-quants,
 * IQ4_XS): for each block of the row, d and (for types with mins) the
 * dmin whose negation times a small integer is each min; every scale of
 * the integer form is d times an integer (|k| < 128) and every min is
 * -dmin times one, exactly. Returns 0 for other types. dmin may be NULL. */
int tdm_qform_super(uint32_t type, const void *row, uint64_t n, float *d, float *dmin);

#ifdef __cplusplus
}
#endif

#endif
