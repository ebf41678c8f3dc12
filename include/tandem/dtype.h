/* tandem: element types of tensors and their storage layout.
 *
 * The numeric values are GGML's type ids, as stored in GGUF tensor infos.
 * Quantized types store blocks of TDM_QK (32) consecutive elements of a row:
 *
 *   Q4_0: f16 d; u8 qs[16]      x = d * (q - 8),   q = 4-bit, low nibbles are
 *                                                  elements 0..15, high 16..31
 *   Q4_1: f16 d; f16 m; u8 qs[16]  x = d * q + m   (same nibble order)
 *   Q8_0: f16 d; i8 qs[32]      x = d * q
 *
 * The other layouts tandem computes with (and Q8_K, which it only reads),
 * exactly as GGML stores them; bits of scales are GGML's packings (their
 * integer form, what kernels pack from, is in tandem/qform.h):
 *   Q5_0 (22 B / 32): f16 d; u32 qh; u8 qs[16]   x = d * (q - 16), q = nibble | bit << 4
 *   Q5_1 (24 B / 32): f16 d; f16 m; u32 qh; u8 qs[16]   x = d * q + m
 *   IQ4_NL (18 B / 32): f16 d; u8 qs[16]          x = d * kvalue[nibble]
 *   Q2_K (84 B / 256): u8 scales[16]; u8 qs[64]; f16 d; f16 dmin
 *   Q3_K (110 B / 256): u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d
 *   Q4_K (144 B / 256): f16 d; f16 dmin; u8 scales[12]; u8 qs[128]
 *   Q5_K (176 B / 256): f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]
 *   Q6_K (210 B / 256): u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d
 *   Q8_K (292 B / 256): f32 d; i8 qs[256]; i16 bsums[16]   x = d * q
 *   IQ4_XS (136 B / 256): f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]
 *   BF16 (2 B): the high half of an f32
 *
 * A row's length must be a multiple of the block size. */
#ifndef TANDEM_DTYPE_H
#define TANDEM_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_QK  32
#define TDM_QKK 256 /* elements of a K-quant or IQ4_XS super-block */

typedef enum tdm_dtype {
    TDM_DTYPE_F32 = 0,
    TDM_DTYPE_F16 = 1,
    TDM_DTYPE_Q4_0 = 2,
    TDM_DTYPE_Q4_1 = 3,
    TDM_DTYPE_Q5_0 = 6,
    TDM_DTYPE_Q5_1 = 7,
    TDM_DTYPE_Q8_0 = 8,
    TDM_DTYPE_Q2_K = 10,
    TDM_DTYPE_Q3_K = 11,
    TDM_DTYPE_Q4_K = 12,
    TDM_DTYPE_Q5_K = 13,
    TDM_DTYPE_Q6_K = 14,
    TDM_DTYPE_Q8_K = 15,
    TDM_DTYPE_IQ4_NL = 20,
    TDM_DTYPE_IQ4_XS = 23,
    TDM_DTYPE_BF16 = 30,
    TDM_DTYPE_COUNT_ = 40, /* bound for GGML ids (unknown ones are refused) */
} tdm_dtype_t;

typedef struct tdm_block_q4_0 {
    uint16_t d; /* f16 */
    uint8_t qs[TDM_QK / 2];
} tdm_block_q4_0_t;

typedef struct tdm_block_q4_1 {
    uint16_t d; /* f16 */
    uint16_t m; /* f16 */
    uint8_t qs[TDM_QK / 2];
} tdm_block_q4_1_t;

typedef struct tdm_block_q8_0 {
    uint16_t d; /* f16 */
    int8_t qs[TDM_QK];
} tdm_block_q8_0_t;

/* The 16 values an IQ4_NL or IQ4_XS nibble selects. */
extern const int8_t tdm_iq4_values[16];

/* True for the types tandem can compute with. */
int tdm_dtype_supported(uint32_t type);
/* Their names, for messages: "F32, F16, ...". */
const char *tdm_dtype_supported_list(void);
/* True for the types whose layout tandem knows: sizes and tdm_dtype_to_f32
 * (every supported type, and those listed above). */
int tdm_dtype_known(uint32_t type);
/* Name as GGML spells it ("Q4_1"), or "type#N" for ids it does not know. */
const char *tdm_dtype_name(uint32_t type);
/* Elements per block (1 for float types); 0 for unknown types. */
size_t tdm_dtype_block_elems(uint32_t type);
/* Bytes per block; 0 for unknown types. */
size_t tdm_dtype_block_bytes(uint32_t type);
/* Bytes of a row of n elements; 0 if unknown type or n not a block multiple. */
size_t tdm_dtype_row_bytes(uint32_t type, uint64_t n);

/* IEEE half <-> float, round to nearest even; exact for every f16 value. */
float tdm_f16_to_f32(uint16_t h);
uint16_t tdm_f32_to_f16(float f);

/* Dequantizes or converts n elements (a multiple of the block size) of a
 * row of any known `type` to f32, with the float operations in the order
 * GGML's reference dequantization (and the PyPI gguf package) uses, so the
 * bits are the same. Reference code, not for hot paths. */
void tdm_dtype_to_f32(uint32_t type, const void *src, float *dst, uint64_t n);
/* Checks nbytes of a tensor's data of `type` for values no weight may
 * have: a non-finite f16 scale (d, m, dmin) in a quantized block, a
 * non-finite element of a float tensor. Returns 0 when none; else 1 with
 * *bad_at the byte offset (within data) of the first and a description
 * ("block 12: scale d is not finite (f16 0x7c00)") in what. */
int tdm_dtype_validate(uint32_t type, const void *data, uint64_t nbytes, uint64_t *bad_at,
                       char *what, size_t what_len);

/* Quantizes n f32 values (a multiple of the block size) into a row of type
 * (any supported type). Used by mkmodel and tests. */
void tdm_dtype_from_f32(uint32_t type, const float *src, void *dst, uint64_t n);

#ifdef __cplusplus
}
#endif

#endif
