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
 * A row's length must be a multiple of the block size. */
#ifndef TANDEM_DTYPE_H
#define TANDEM_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_QK 32

typedef enum tdm_dtype {
    TDM_DTYPE_F32 = 0,
    TDM_DTYPE_F16 = 1,
    TDM_DTYPE_Q4_0 = 2,
    TDM_DTYPE_Q4_1 = 3,
    TDM_DTYPE_Q8_0 = 8,
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

/* True for the types tandem can compute with. */
int tdm_dtype_supported(uint32_t type);
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
 * row of `type` to f32. Reference code, not for hot paths. */
void tdm_dtype_to_f32(uint32_t type, const void *src, float *dst, uint64_t n);
/* Quantizes n f32 values (a multiple of the block size) into a row of type
 * (any supported type). Used by mkmodel and tests. */
void tdm_dtype_from_f32(uint32_t type, const float *src, void *dst, uint64_t n);

#ifdef __cplusplus
}
#endif

#endif
