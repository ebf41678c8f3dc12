#include "tandem/dtype.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

int tdm_dtype_supported(uint32_t type)
{
    switch (type) {
    case TDM_DTYPE_F32:
    case TDM_DTYPE_F16:
    case TDM_DTYPE_Q4_0:
    case TDM_DTYPE_Q4_1:
    case TDM_DTYPE_Q8_0: return 1;
    default: return 0;
    }
}

const char *tdm_dtype_name(uint32_t type)
{
    /* GGML's names for every id it has used, so refusals can name the type. */
    static const char *const names[] = {
        "F32",      "F16",      "Q4_0",    "Q4_1",  "Q4_2",   "Q4_3",  "Q5_0",  "Q5_1",
        "Q8_0",     "Q8_1",     "Q2_K",    "Q3_K",  "Q4_K",   "Q5_K",  "Q6_K",  "Q8_K",
        "IQ2_XXS",  "IQ2_XS",   "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
        "I8",       "I16",      "I32",     "I64",   "F64",    "IQ1_M", "BF16",  "Q4_0_4_4",
        "Q4_0_4_8", "Q4_0_8_8", "TQ1_0",   "TQ2_0",
    };
    if (type < sizeof(names) / sizeof(names[0]))
        return names[type];
    static _Thread_local char buf[24];
    snprintf(buf, sizeof(buf), "type#%u", type);
    return buf;
}

size_t tdm_dtype_block_elems(uint32_t type)
{
    switch (type) {
    case TDM_DTYPE_F32:
    case TDM_DTYPE_F16: return 1;
    case TDM_DTYPE_Q4_0:
    case TDM_DTYPE_Q4_1:
    case TDM_DTYPE_Q8_0: return TDM_QK;
    default: return 0;
    }
}

size_t tdm_dtype_block_bytes(uint32_t type)
{
    switch (type) {
    case TDM_DTYPE_F32: return 4;
    case TDM_DTYPE_F16: return 2;
    case TDM_DTYPE_Q4_0: return sizeof(tdm_block_q4_0_t);
    case TDM_DTYPE_Q4_1: return sizeof(tdm_block_q4_1_t);
    case TDM_DTYPE_Q8_0: return sizeof(tdm_block_q8_0_t);
    default: return 0;
    }
}

size_t tdm_dtype_row_bytes(uint32_t type, uint64_t n)
{
    size_t be = tdm_dtype_block_elems(type);
    if (be == 0 || n % be != 0)
        return 0;
    return (size_t)(n / be) * tdm_dtype_block_bytes(type);
}

float tdm_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do {
                e++;
                mant <<= 1;
            } while ((mant & 0x400) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t tdm_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00);
    if (absx < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        float a;
        memcpy(&a, &absx, 4);
        /* 2^-24 is the subnormal step; rint rounds to nearest even. */
        uint32_t m = (uint32_t)rintf(a * 16777216.0f);
        return (uint16_t)(sign | m);
    }
    uint32_t mant = absx & 0x7fffff;
    uint32_t exp = (absx >> 23) - 127 + 15;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1)))
        h++; /* may carry into the exponent, which is right */
    return (uint16_t)(sign | h);
}

void tdm_dtype_to_f32(uint32_t type, const void *src, float *dst, uint64_t n)
{
    switch (type) {
    case TDM_DTYPE_F32: memcpy(dst, src, n * sizeof(float)); break;
    case TDM_DTYPE_F16: {
        const uint16_t *s = src;
        for (uint64_t i = 0; i < n; i++)
            dst[i] = tdm_f16_to_f32(s[i]);
        break;
    }
    case TDM_DTYPE_Q4_0: {
        const tdm_block_q4_0_t *b = src;
        for (uint64_t i = 0; i < n / TDM_QK; i++) {
            float d = tdm_f16_to_f32(b[i].d);
            for (int j = 0; j < TDM_QK / 2; j++) {
                dst[i * TDM_QK + j] = d * (float)((b[i].qs[j] & 0x0f) - 8);
                dst[i * TDM_QK + j + TDM_QK / 2] = d * (float)((b[i].qs[j] >> 4) - 8);
            }
        }
        break;
    }
    case TDM_DTYPE_Q4_1: {
        const tdm_block_q4_1_t *b = src;
        for (uint64_t i = 0; i < n / TDM_QK; i++) {
            float d = tdm_f16_to_f32(b[i].d), m = tdm_f16_to_f32(b[i].m);
            for (int j = 0; j < TDM_QK / 2; j++) {
                dst[i * TDM_QK + j] = d * (float)(b[i].qs[j] & 0x0f) + m;
                dst[i * TDM_QK + j + TDM_QK / 2] = d * (float)(b[i].qs[j] >> 4) + m;
            }
        }
        break;
    }
    case TDM_DTYPE_Q8_0: {
        const tdm_block_q8_0_t *b = src;
        for (uint64_t i = 0; i < n / TDM_QK; i++) {
            float d = tdm_f16_to_f32(b[i].d);
            for (int j = 0; j < TDM_QK; j++)
                dst[i * TDM_QK + j] = d * (float)b[i].qs[j];
        }
        break;
    }
    default: memset(dst, 0, n * sizeof(float)); break;
    }
}

void tdm_dtype_from_f32(uint32_t type, const float *src, void *dst, uint64_t n)
{
    switch (type) {
    case TDM_DTYPE_F32: memcpy(dst, src, n * sizeof(float)); break;
    case TDM_DTYPE_F16: {
        uint16_t *d = dst;
        for (uint64_t i = 0; i < n; i++)
            d[i] = tdm_f32_to_f16(src[i]);
        break;
    }
    case TDM_DTYPE_Q4_0: {
        tdm_block_q4_0_t *b = dst;
        for (uint64_t i = 0; i < n / TDM_QK; i++) {
            const float *x = src + i * TDM_QK;
            float amax = 0, max = 0;
            for (int j = 0; j < TDM_QK; j++)
                if (fabsf(x[j]) > amax) {
                    amax = fabsf(x[j]);
                    max = x[j];
                }
            float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            b[i].d = tdm_f32_to_f16(d);
            for (int j = 0; j < TDM_QK / 2; j++) {
                int q0 = (int)(x[j] * id + 8.5f), q1 = (int)(x[j + TDM_QK / 2] * id + 8.5f);
                q0 = q0 > 15 ? 15 : q0 < 0 ? 0 : q0;
                q1 = q1 > 15 ? 15 : q1 < 0 ? 0 : q1;
                b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
            }
        }
        break;
    }
    case TDM_DTYPE_Q4_1: {
        tdm_block_q4_1_t *b = dst;
        for (uint64_t i = 0; i < n / TDM_QK; i++) {
            const float *x = src + i * TDM_QK;
            float mn = x[0], mx = x[0];
            for (int j = 1; j < TDM_QK; j++) {
                mn = x[j] < mn ? x[j] : mn;
                mx = x[j] > mx ? x[j] : mx;
            }
            float d = (mx - mn) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            b[i].d = tdm_f32_to_f16(d);
            b[i].m = tdm_f32_to_f16(mn);
            for (int j = 0; j < TDM_QK / 2; j++) {
                int q0 = (int)((x[j] - mn) * id + 0.5f);
                int q1 = (int)((x[j + TDM_QK / 2] - mn) * id + 0.5f);
                q0 = q0 > 15 ? 15 : q0 < 0 ? 0 : q0;
                q1 = q1 > 15 ? 15 : q1 < 0 ? 0 : q1;
                b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
            }
        }
        break;
    }
    case TDM_DTYPE_Q8_0: {
        tdm_block_q8_0_t *b = dst;
        for (uint64_t i = 0; i < n / TDM_QK; i++) {
            const float *x = src + i * TDM_QK;
            float amax = 0;
            for (int j = 0; j < TDM_QK; j++)
                amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
            float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            b[i].d = tdm_f32_to_f16(d);
            for (int j = 0; j < TDM_QK; j++)
                b[i].qs[j] = (int8_t)roundf(x[j] * id);
        }
        break;
    }
    default: break;
    }
}
