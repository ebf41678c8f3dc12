/* tandem CUDA backend: decoding GGUF weight blocks (include/tandem/dtype.h),
 * shared by the matmul (kernels/cuda/matmul.cu) and the embedding lookup
 * (kernels/cuda/embed.cu).
 *
 * Two kinds of helpers:
 *  - scalar decoders (one element to f32), the same arithmetic as the CPU
 *    backend's embed_row: d * (q - 8), d * q + m (a rounded product, then a
 *    rounded sum: the CPU is built with -ffp-contract=off), d * q;
 *  - fragment decoders for the tensor-core matmul: four 8-bit or 4-bit codes
 *    become two f16x2 registers holding the integer codes (q - 8, q, or the
 *    signed q), exact in f16. The bit tricks are host-callable so a host
 *    program can check them; the final f16 subtraction is device-only.
 *
 * Element order inside a 32-element block, the same for every type so one
 * activation layout serves all of them: lane t of a quad (t = lane % 4)
 * owns elements 16s + 4t + {0, 1, 2, 3} of k16 step s (s = 0, 1). Q4 qs
 * byte 4t + i holds element 4t + i (low nibble) and 16 + 4t + i (high
 * nibble), so one 32-bit word of qs gives both steps; Q8 needs the words at
 * qs + 4t and qs + 16 + 4t. The "lo" register of a step holds elements
 * +0, +1 and the "hi" register +2, +3. */
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

/* Bytes of one 32-element block of wtype as stored in a GGUF row. */
TDM_HD constexpr int tdm_cuda_block_bytes(uint32_t wt)
{
    return wt == TDM_DTYPE_Q4_0   ? 18
           : wt == TDM_DTYPE_Q4_1 ? 20
           : wt == TDM_DTYPE_Q8_0 ? 34
           : wt == TDM_DTYPE_F16  ? 64
                                  : 128;
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

/* Q4 (either kind): the f16x2 register of step `step`, half `hi`, from the
 * qs word (bytes 4t..4t+3) with the 1024 bias still in: step 0 as 1024 + q,
 * step 1 as 1024 + 16 q (the high nibble left in place saves a shift). */
TDM_HD uint32_t tdm_q4_frag_bits(uint32_t qs, int step, int hi)
{
    /* qs bytes 2 hi and 2 hi + 1 into the low bytes of the two halves */
    uint32_t v = tdm_prmt(qs, 0, hi ? 0x4342u : 0x4140u);
    return (v & (step ? 0x00F000F0u : 0x000F000Fu)) | TDM_H2_1024;
}

/* Q8_0: the f16x2 register of half `hi` from a qs word of signed codes, as
 * 1024 + (q + 128). */
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
 * integer, so nothing rounds. */
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

/* Element j of a row of wtype as f32, the CPU's arithmetic. Row pointers of
 * quantized types are 2-byte aligned (blocks are 18, 20, 34 bytes). */
TDM_HD float tdm_deq_elem(uint32_t wt, const uint8_t *row, int64_t j)
{
    if (wt == TDM_DTYPE_F32)
        return ((const float *)row)[j];
    if (wt == TDM_DTYPE_F16)
        return tdm_h2f(((const uint16_t *)row)[j]);
    const int e = (int)(j & 31);
    const uint8_t *b = row + (j >> 5) * tdm_cuda_block_bytes(wt);
    const float d = tdm_h2f(*(const uint16_t *)b);
    if (wt == TDM_DTYPE_Q8_0)
        return tdm_mul_rn(d, (float)(int8_t)b[2 + e]);
    if (wt == TDM_DTYPE_Q4_0) {
        uint8_t v = b[2 + (e & 15)];
        int q = e < 16 ? (v & 15) : (v >> 4);
        return tdm_mul_rn(d, (float)(q - 8));
    }
    /* Q4_1 */
    uint8_t v = b[4 + (e & 15)];
    int q = e < 16 ? (v & 15) : (v >> 4);
    return tdm_add_rn(tdm_mul_rn(d, (float)q), tdm_h2f(*(const uint16_t *)(b + 2)));
}

#endif
