/* tandem CUDA backend: decoding weight blocks on the device, shared by the
 * matmul (kernels/cuda/matmul.cu) and the embedding lookup
 * (kernels/cuda/embed.cu).
 *
 * Quantized weights are 32-element blocks of a layout that four bits
 * describe (TDM_CUDA_LY_*; the device types built are listed below): per
 * block, the scales of its sub-blocks (one per 32 elements, or two per 16:
 * SUB16), f16 (SC16) or f32, then as many mins (MIN), then the codes: 16 bytes of 4-bit codes (NIB;
 * byte i holds element i in its low nibble and i + 16 in its high one) or 32 bytes of signed 8-bit
 * codes. An element is x = d * c (no min) or x = d * c + m, where c is the 8-bit code, the nibble
 * minus 8 (no min) or the nibble (MIN). Q4_0 (NIB|SC16), Q4_1 (NIB|MIN|SC16) and Q8_0 (SC16) are
 * such layouts as GGUF stores them and are uploaded as they are; every other quantized type is
 * repacked at load from its integer form (tandem/qform.h, kernels/cuda/cuda_backend.cu) into the
 * layout its form says: Q5_0 and IQ4_NL become Q8_0 blocks, the rest TDM_CUDA_PK(layout) blocks.
 * The scales and mins are the form's exact values, so every weight keeps its bits.
 *
 * Two kinds of helpers:
 *  - scalar decoders (one element to f32), the arithmetic of
 *    tdm_dtype_to_f32 (a rounded product, then a rounded sum; the CPU is
 *    built with -ffp-contract=off): d * c, d * c + m; F16 and BF16 exact;
 *  - fragment decoders for the tensor-core matmul: four 8-bit or 4-bit codes
 *    become two f16x2 registers holding the integer codes, exact in f16. The
 *    bit tricks are host-callable so a host program can check them; the
 *    final f16 subtraction is device-only.
 *
 * Element order inside a 32-element block, the same for every type so one
 * activation layout serves all of them: lane t of a quad (t = lane % 4)
 * owns elements 16s + 4t + {0, 1, 2, 3} of k16 step s (s = 0, 1; with
 * SUB16, step s is sub-block s). 4-bit code byte 4t + i holds element
 * 4t + i (low nibble) and 16 + 4t + i (high nibble), so one 32-bit word
 * gives both steps; 8-bit codes need the words at 4t and 16 + 4t. The "lo"
 * register of a step holds elements +0, +1 and the "hi" register +2, +3. */
#ifndef TANDEM_CUDA_QUANT_CUH
#define TANDEM_CUDA_QUANT_CUH

#include <cuda_fp16.h>
#include <stdint.h>

#include "tandem/dtype.h"

#define TDM_HD __host__ __device__ __forceinline__

/* f16 bit patterns the fragment decoders use. 0x6400 is 1024.0: or-ing an
 * integer v < 1024 into the mantissa gives exactly 1024 + v. */
#define TDM_H2_1024      0x64006400u /* 1024, 1024 */
#define TDM_H2_1032      0x64086408u /* 1024 + 8: removes the bias and Q4_0's 8 */
#define TDM_H2_1152      0x64806480u /* 1024 + 128: Q8 codes were stored + 128 */
#define TDM_H2_SIXTEENTH 0x2C002C00u /* 1/16 */
#define TDM_H2_NEG72     0xD480D480u /* -(64 + 8) */
#define TDM_H2_NEG64     0xD400D400u /* -64 */

/* Layout bits of a quantized device block (see above). */
#define TDM_CUDA_LY_NIB   1u /* 4-bit codes (else 8-bit) */
#define TDM_CUDA_LY_MIN   2u /* a min per scale */
#define TDM_CUDA_LY_SUB16 4u /* a scale per 16 elements (else per 32) */
#define TDM_CUDA_LY_SC16  8u /* scales and mins f16 (else f32) */
/* The device type of a repacked layout: ids past GGML's (below 40). */
#define TDM_CUDA_PK_BASE 48u
#define TDM_CUDA_PK(ly)  (TDM_CUDA_PK_BASE + (ly))

/* Every quantized device type the kernels are built for: X(type). The
 * repacked ones: IQ4_XS (0), Q5_K (MIN), Q6_K (SUB16), Q5_1 (MIN|SC16),
 * Q4_K (NIB|MIN), Q3_K (NIB|SUB16), Q2_K (NIB|MIN|SUB16). */
#define TDM_CUDA_FOR_EACH_QDEV(X)                                                                  \
    X(TDM_DTYPE_Q4_0)                                                                              \
    X(TDM_DTYPE_Q4_1)                                                                              \
    X(TDM_DTYPE_Q8_0)                                                                              \
    X(TDM_CUDA_PK(0))                                                                              \
    X(TDM_CUDA_PK(TDM_CUDA_LY_MIN))                                                                \
    X(TDM_CUDA_PK(TDM_CUDA_LY_SUB16))                                                              \
    X(TDM_CUDA_PK(TDM_CUDA_LY_MIN | TDM_CUDA_LY_SC16))                                             \
    X(TDM_CUDA_PK(TDM_CUDA_LY_NIB | TDM_CUDA_LY_MIN))                                              \
    X(TDM_CUDA_PK(TDM_CUDA_LY_NIB | TDM_CUDA_LY_SUB16))                                            \
    X(TDM_CUDA_PK(TDM_CUDA_LY_NIB | TDM_CUDA_LY_MIN | TDM_CUDA_LY_SUB16))

/* True for quantized device types (the GGUF three and the packs). */
TDM_HD constexpr bool tdm_cuda_is_q(uint32_t wt)
{
    return wt == TDM_DTYPE_Q4_0 || wt == TDM_DTYPE_Q4_1 || wt == TDM_DTYPE_Q8_0 ||
           (wt >= TDM_CUDA_PK_BASE && wt < TDM_CUDA_PK_BASE + 16);
}

/* The layout bits of a quantized device type. */
TDM_HD constexpr uint32_t tdm_cuda_layout(uint32_t wt)
{
    return wt == TDM_DTYPE_Q4_0   ? TDM_CUDA_LY_NIB | TDM_CUDA_LY_SC16
           : wt == TDM_DTYPE_Q4_1 ? TDM_CUDA_LY_NIB | TDM_CUDA_LY_MIN | TDM_CUDA_LY_SC16
           : wt == TDM_DTYPE_Q8_0 ? TDM_CUDA_LY_SC16
                                  : wt - TDM_CUDA_PK_BASE;
}

/* The device type of layout bits: the GGUF type where it is one. */
TDM_HD constexpr uint32_t tdm_cuda_type_of_layout(uint32_t ly)
{
    return ly == (TDM_CUDA_LY_NIB | TDM_CUDA_LY_SC16)                     ? TDM_DTYPE_Q4_0
           : ly == (TDM_CUDA_LY_NIB | TDM_CUDA_LY_MIN | TDM_CUDA_LY_SC16) ? TDM_DTYPE_Q4_1
           : ly == TDM_CUDA_LY_SC16                                       ? TDM_DTYPE_Q8_0
                                                                          : TDM_CUDA_PK(ly);
}

/* Parts of a quantized block: scales (or mins) per block, bytes per scale,
 * the byte offset of the mins and of the codes. */
TDM_HD constexpr int tdm_cuda_nsub(uint32_t wt)
{
    return tdm_cuda_layout(wt) & TDM_CUDA_LY_SUB16 ? 2 : 1;
}

TDM_HD constexpr int tdm_cuda_scale_bytes(uint32_t wt)
{
    return tdm_cuda_layout(wt) & TDM_CUDA_LY_SC16 ? 2 : 4;
}

TDM_HD constexpr int tdm_cuda_min_off(uint32_t wt)
{
    return tdm_cuda_nsub(wt) * tdm_cuda_scale_bytes(wt);
}

TDM_HD constexpr int tdm_cuda_code_off(uint32_t wt)
{
    return tdm_cuda_min_off(wt) * (tdm_cuda_layout(wt) & TDM_CUDA_LY_MIN ? 2 : 1);
}

/* Bytes of one 32-element block of a device type (F32, F16, BF16: 32
 * elements too). */
TDM_HD constexpr int tdm_cuda_block_bytes(uint32_t wt)
{
    if (wt == TDM_DTYPE_F16 || wt == TDM_DTYPE_BF16)
        return 64;
    if (wt == TDM_DTYPE_F32)
        return 128;
    return tdm_cuda_code_off(wt) + (tdm_cuda_layout(wt) & TDM_CUDA_LY_NIB ? 16 : 32);
}

/* PTX prmt (the default mode): byte i of the result is byte s[4i+2:4i] of
 * the eight bytes {y, x}. */
TDM_HD uint32_t tdm_prmt(uint32_t x, uint32_t y, uint32_t s)
{
#ifdef __CUDA_ARCH__
    return __byte_perm(x, y, s);
#else
    uint64_t v = ((uint64_t)y << 32) | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; i++)
        r |= (uint32_t)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
    return r;
#endif
}

/* 4-bit codes (any layout): the f16x2 register of step `step`, half `hi`,
 * from the code word (bytes 4t..4t+3) with the 1024 bias still in: step 0 as 1024 + q,
 * step 1 as 1024 + 16 q (the high nibble left in place saves a shift). */
TDM_HD uint32_t tdm_q4_frag_bits(uint32_t qs, int step, int hi)
{
    /* qs bytes 2 hi and 2 hi + 1 into the low bytes of the two halves */
    uint32_t v = tdm_prmt(qs, 0, hi ? 0x4342u : 0x4140u);
    return (v & (step ? 0x00F000F0u : 0x000F000Fu)) | TDM_H2_1024;
}

/* 8-bit codes (any layout): the f16x2 register of half `hi` from a word of
 * signed codes, as 1024 + (q + 128). */
TDM_HD uint32_t tdm_q8_frag_bits(uint32_t qs, int hi)
{
    return tdm_prmt(qs ^ 0x80808080u, 0x64646464u, hi ? 0x4342u : 0x4140u);
}

__device__ __forceinline__ uint32_t tdm_h2_sub(uint32_t a, uint32_t b)
{
    uint32_t d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ uint32_t tdm_h2_fma(uint32_t a, uint32_t b, uint32_t c)
{
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

/* The codes as f16 from the biased bits of tdm_q4_frag_bits /
 * tdm_q8_frag_bits, exact: every operation's exact result is a small
 * integer, so nothing rounds. q4_0: nibble - 8 (4-bit layouts without
 * mins), q4_1: the nibble (with mins), q8_0: the signed byte. */
__device__ __forceinline__ uint32_t tdm_q4_0_fin(uint32_t v, int step)
{
    return step ? tdm_h2_fma(v, TDM_H2_SIXTEENTH, TDM_H2_NEG72) : tdm_h2_sub(v, TDM_H2_1032);
}

__device__ __forceinline__ uint32_t tdm_q4_1_fin(uint32_t v, int step)
{
    return step ? tdm_h2_fma(v, TDM_H2_SIXTEENTH, TDM_H2_NEG64) : tdm_h2_sub(v, TDM_H2_1024);
}

__device__ __forceinline__ uint32_t tdm_q8_0_fin(uint32_t v)
{
    return tdm_h2_sub(v, TDM_H2_1152);
}

/* f16 bits to f32, exact for every value (subnormals, inf, NaN included). */
TDM_HD float tdm_h2f(uint16_t h)
{
    __half_raw r;
    r.x = h;
    return __half2float(__half(r));
}

/* a * b (+ c), each rounded on its own (the CPU is built without
 * contraction) */
TDM_HD float tdm_mul_rn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    volatile float p = a * b;
    return p;
#endif
}

TDM_HD float tdm_add_rn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    volatile float s = a + b;
    return s;
#endif
}

/* Bit casts, host and device. */
TDM_HD float tdm_u2f(uint32_t u)
{
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
#endif
}

/* A scale or min of a quantized block at p: f16 (2-byte aligned) or f32
 * (4-byte aligned: blocks with f32 scales are multiples of 4 bytes). */
template <uint32_t WT> TDM_HD float tdm_deq_scale(const uint8_t *p)
{
    if (tdm_cuda_layout(WT) & TDM_CUDA_LY_SC16)
        return tdm_h2f(*(const uint16_t *)p);
    return *(const float *)p;
}

/* Element j of a row of device type WT as f32, tdm_dtype_to_f32's
 * arithmetic: d * c, or the rounded d * c plus m. Row pointers of
 * quantized types are 2-byte aligned (4 with f32 scales). */
template <uint32_t WT> TDM_HD float tdm_deq_elem(const uint8_t *row, int64_t j)
{
    if (WT == TDM_DTYPE_F32)
        return ((const float *)row)[j];
    if (WT == TDM_DTYPE_F16)
        return tdm_h2f(((const uint16_t *)row)[j]);
    if (WT == TDM_DTYPE_BF16)
        return tdm_u2f((uint32_t)((const uint16_t *)row)[j] << 16);
    constexpr uint32_t L = tdm_cuda_layout(WT);
    const int e = (int)(j & 31);
    const uint8_t *b = row + (j >> 5) * tdm_cuda_block_bytes(WT);
    const int h = L & TDM_CUDA_LY_SUB16 ? e >> 4 : 0;
    const float d = tdm_deq_scale<WT>(b + h * tdm_cuda_scale_bytes(WT));
    const uint8_t *qs = b + tdm_cuda_code_off(WT);
    int c;
    if (L & TDM_CUDA_LY_NIB) {
        const uint8_t v = qs[e & 15];
        c = e < 16 ? (v & 15) : (v >> 4);
        if (!(L & TDM_CUDA_LY_MIN))
            c -= 8;
    } else {
        c = (int8_t)qs[e];
    }
    const float x = tdm_mul_rn(d, (float)c);
    if (!(L & TDM_CUDA_LY_MIN))
        return x;
    return tdm_add_rn(x,
                      tdm_deq_scale<WT>(b + tdm_cuda_min_off(WT) + h * tdm_cuda_scale_bytes(WT)));
}

#endif
