#include "tandem/dtype.h"
#include "tandem/qform.h"

#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

int tdm_dtype_supported(uint32_t type)
{
    tdm_qform_t f;
    return type == TDM_DTYPE_F32 || type == TDM_DTYPE_F16 || type == TDM_DTYPE_BF16 ||
           tdm_qform_of(type, &f);
}

const char *tdm_dtype_supported_list(void)
{
    return "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, "
           "IQ4_XS";
}

int tdm_dtype_known(uint32_t type)
{
    return tdm_dtype_block_bytes(type) != 0;
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
    case TDM_DTYPE_F16:
    case TDM_DTYPE_BF16: return 1;
    case TDM_DTYPE_Q4_0:
    case TDM_DTYPE_Q4_1:
    case TDM_DTYPE_Q5_0:
    case TDM_DTYPE_Q5_1:
    case TDM_DTYPE_Q8_0:
    case TDM_DTYPE_IQ4_NL: return TDM_QK;
    case TDM_DTYPE_Q2_K:
    case TDM_DTYPE_Q3_K:
    case TDM_DTYPE_Q4_K:
    case TDM_DTYPE_Q5_K:
    case TDM_DTYPE_Q6_K:
    case TDM_DTYPE_Q8_K:
    case TDM_DTYPE_IQ4_XS: return TDM_QKK;
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
    case TDM_DTYPE_BF16: return 2;
    case TDM_DTYPE_Q5_0: return 22;
    case TDM_DTYPE_Q5_1: return 24;
    case TDM_DTYPE_IQ4_NL: return 18;
    case TDM_DTYPE_Q2_K: return 84;
    case TDM_DTYPE_Q3_K: return 110;
    case TDM_DTYPE_Q4_K: return 144;
    case TDM_DTYPE_Q5_K: return 176;
    case TDM_DTYPE_Q6_K: return 210;
    case TDM_DTYPE_Q8_K: return 292;
    case TDM_DTYPE_IQ4_XS: return 136;
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

/* ---- dequantization of the layouts tandem reads (dtype.h) ----
 * Each computes in the order of GGML's reference (and gguf.quants):
 * products of two floats rounded to f32 one at a time, never fused
 * (-ffp-contract=off). */

static float h2f(const uint8_t *p) /* little-endian f16 at p */
{
    return tdm_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

const int8_t tdm_iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                   1,    13,   25,  38,  53,  69,  89,  113};

static void deq_q5(const uint8_t *b, float *y, bool has_min)
{
    const float d = h2f(b), m = has_min ? h2f(b + 2) : 0.0f;
    const uint8_t *qhp = b + (has_min ? 4 : 2), *qs = qhp + 4;
    const uint32_t qh =
        (uint32_t)qhp[0] | (uint32_t)qhp[1] << 8 | (uint32_t)qhp[2] << 16 | (uint32_t)qhp[3] << 24;
    for (int e = 0; e < TDM_QK; e++) {
        int q = ((qs[e % 16] >> (e / 16 * 4)) & 0x0f) | (int)((qh >> e) & 1) << 4;
        y[e] = has_min ? d * (float)q + m : d * (float)(q - 16);
    }
}

static void deq_iq4_nl(const uint8_t *b, float *y)
{
    const float d = h2f(b);
    for (int e = 0; e < TDM_QK; e++)
        y[e] = d * (float)tdm_iq4_values[(b[2 + e % 16] >> (e / 16 * 4)) & 0x0f];
}

static void deq_q2_k(const uint8_t *b, float *y)
{
    const uint8_t *scales = b, *qs = b + 16;
    const float d = h2f(b + 80), dmin = h2f(b + 82);
    for (int e = 0; e < TDM_QKK; e++) {
        const int h = e / 128, s = e / 32 % 4, j = e % 32, g = e / 16;
        const float dl = d * (float)(scales[g] & 0x0f), ml = dmin * (float)(scales[g] >> 4);
        const float q = (float)((qs[h * 32 + j] >> (2 * s)) & 3);
        y[e] = dl * q - ml;
    }
}

static void deq_q3_k(const uint8_t *b, float *y)
{
    const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
    const float d = h2f(b + 108);
    float dl[16];
    for (int i = 0; i < 16; i++) {
        const int lo = (sc[i % 8] >> (i / 8 * 4)) & 0x0f, hi = (sc[8 + i % 4] >> (i / 4 * 2)) & 3;
        dl[i] = d * (float)((int8_t)(lo | hi << 4) - 32);
    }
    for (int e = 0; e < TDM_QKK; e++) {
        const int h = e / 128, s = e / 32 % 4, j = e % 32;
        const int ql = (qs[h * 32 + j] >> (2 * s)) & 3;
        const int qh = ((hmask[j] >> (e / 32)) & 1) ^ 1;
        y[e] = dl[e / 16] * (float)(ql - (qh << 2));
    }
}

/* The 6-bit scales and mins of Q4_K and Q5_K, 8 of each. */
static void k_scale_min(const uint8_t *sc, int i, int *scale, int *min)
{
    if (i < 4) {
        *scale = sc[i] & 0x3f;
        *min = sc[4 + i] & 0x3f;
    } else {
        *scale = (sc[8 + i - 4] & 0x0f) | ((sc[i - 4] >> 2) & 0x30);
        *min = (sc[8 + i - 4] >> 4) | ((sc[i] >> 2) & 0x30);
    }
}

static void deq_q45_k(const uint8_t *b, float *y, bool five)
{
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t *sc = b + 4, *qh = b + 16, *qs = b + (five ? 48 : 16);
    for (int sb = 0; sb < 8; sb++) {
        int scale, min;
        k_scale_min(sc, sb, &scale, &min);
        const float ds = d * (float)scale, dm = dmin * (float)min;
        for (int j = 0; j < 32; j++) {
            const int e = sb * 32 + j;
            int q = (qs[sb / 2 * 32 + j] >> (sb % 2 * 4)) & 0x0f;
            if (five)
                q |= ((qh[j] >> sb) & 1) << 4;
            y[e] = ds * (float)q - dm;
        }
    }
}

static void deq_q6_k(const uint8_t *b, float *y)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    const float d = h2f(b + 208);
    for (int e = 0; e < TDM_QKK; e++) {
        const int h = e / 128, r = e % 128;
        const int lo = (ql[h * 64 + r % 64] >> (r / 64 * 4)) & 0x0f;
        const int hi = (qh[h * 32 + r % 32] >> (r / 32 * 2)) & 3;
        const float dl = d * (float)scales[e / 16];
        y[e] = dl * (float)((int8_t)(lo | hi << 4) - 32);
    }
}

static void deq_q8_k(const uint8_t *b, float *y)
{
    float d;
    memcpy(&d, b, sizeof(d));
    for (int e = 0; e < TDM_QKK; e++)
        y[e] = d * (float)(int8_t)b[4 + e];
}

static void deq_iq4_xs(const uint8_t *b, float *y)
{
    const float d = h2f(b);
    const unsigned scales_h = (unsigned)(b[2] | b[3] << 8);
    const uint8_t *scales_l = b + 4, *qs = b + 8;
    for (int ib = 0; ib < 8; ib++) {
        const int lo = (scales_l[ib / 2] >> (ib % 2 * 4)) & 0x0f;
        const int hi = (scales_h >> (2 * ib)) & 3;
        const float dl = d * (float)((int8_t)(lo | hi << 4) - 32);
        for (int j = 0; j < 32; j++)
            y[ib * 32 + j] =
                dl * (float)tdm_iq4_values[(qs[ib * 16 + j % 16] >> (j / 16 * 4)) & 0x0f];
    }
}

static void deq_q5_0(const uint8_t *b, float *y)
{
    deq_q5(b, y, false);
}

static void deq_q5_1(const uint8_t *b, float *y)
{
    deq_q5(b, y, true);
}

static void deq_q4_k(const uint8_t *b, float *y)
{
    deq_q45_k(b, y, false);
}

static void deq_q5_k(const uint8_t *b, float *y)
{
    deq_q45_k(b, y, true);
}

static void deq_q4_0(const uint8_t *b, float *y)
{
    const float d = h2f(b);
    for (int j = 0; j < TDM_QK / 2; j++) {
        y[j] = d * (float)((b[2 + j] & 0x0f) - 8);
        y[j + TDM_QK / 2] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

static void deq_q4_1(const uint8_t *b, float *y)
{
    const float d = h2f(b), m = h2f(b + 2);
    for (int j = 0; j < TDM_QK / 2; j++) {
        y[j] = d * (float)(b[4 + j] & 0x0f) + m;
        y[j + TDM_QK / 2] = d * (float)(b[4 + j] >> 4) + m;
    }
}

static void deq_q8_0(const uint8_t *b, float *y)
{
    const float d = h2f(b);
    for (int j = 0; j < TDM_QK; j++)
        y[j] = d * (float)(int8_t)b[2 + j];
}

/* The block dequantizer of a layout above; NULL for the others. */
static void (*block_dequant(uint32_t type))(const uint8_t *b, float *y)
{
    switch (type) {
    case TDM_DTYPE_Q4_0: return deq_q4_0;
    case TDM_DTYPE_Q4_1: return deq_q4_1;
    case TDM_DTYPE_Q8_0: return deq_q8_0;
    case TDM_DTYPE_Q5_0: return deq_q5_0;
    case TDM_DTYPE_Q5_1: return deq_q5_1;
    case TDM_DTYPE_IQ4_NL: return deq_iq4_nl;
    case TDM_DTYPE_Q2_K: return deq_q2_k;
    case TDM_DTYPE_Q3_K: return deq_q3_k;
    case TDM_DTYPE_Q4_K: return deq_q4_k;
    case TDM_DTYPE_Q5_K: return deq_q5_k;
    case TDM_DTYPE_Q6_K: return deq_q6_k;
    case TDM_DTYPE_Q8_K: return deq_q8_k;
    case TDM_DTYPE_IQ4_XS: return deq_iq4_xs;
    default: return NULL;
    }
}

void tdm_dtype_to_f32(uint32_t type, const void *src, float *dst, uint64_t n)
{
    const uint8_t *s8 = src;
    switch (type) {
    case TDM_DTYPE_F32: memcpy(dst, src, n * sizeof(float)); break;
    case TDM_DTYPE_F16: /* bytes: the data may sit at any address */
        for (uint64_t i = 0; i < n; i++)
            dst[i] = h2f(s8 + 2 * i);
        break;
    case TDM_DTYPE_BF16:
        for (uint64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)(s8[2 * i] | s8[2 * i + 1] << 8) << 16;
            memcpy(&dst[i], &u, sizeof(u));
        }
        break;
    default: {
        void (*deq)(const uint8_t *, float *) = block_dequant(type);
        const size_t bb = tdm_dtype_block_bytes(type), be = tdm_dtype_block_elems(type);
        if (deq == NULL) {
            memset(dst, 0, n * sizeof(float));
            break;
        }
        for (uint64_t i = 0; i < n / be; i++)
            deq(s8 + i * bb, dst + i * be);
        break;
    }
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

/* The f16 fields of a block of each quantized layout: byte offset and name
 * (GGML's field names). */
typedef struct f16_field {
    uint16_t off;
    const char *name;
} f16_field_t;

static int f16_fields(uint32_t type, f16_field_t f[2])
{
    switch (type) {
    case TDM_DTYPE_Q4_0:
    case TDM_DTYPE_Q5_0:
    case TDM_DTYPE_Q8_0:
    case TDM_DTYPE_IQ4_NL:
    case TDM_DTYPE_IQ4_XS: f[0] = (f16_field_t){0, "d"}; return 1;
    case TDM_DTYPE_Q4_1:
    case TDM_DTYPE_Q5_1: f[0] = (f16_field_t){0, "d"}, f[1] = (f16_field_t){2, "m"}; return 2;
    case TDM_DTYPE_Q4_K:
    case TDM_DTYPE_Q5_K: f[0] = (f16_field_t){0, "d"}, f[1] = (f16_field_t){2, "dmin"}; return 2;
    case TDM_DTYPE_Q2_K: f[0] = (f16_field_t){80, "d"}, f[1] = (f16_field_t){82, "dmin"}; return 2;
    case TDM_DTYPE_Q3_K: f[0] = (f16_field_t){108, "d"}; return 1;
    case TDM_DTYPE_Q6_K: f[0] = (f16_field_t){208, "d"}; return 1;
    default: return 0;
    }
}

int tdm_dtype_validate(uint32_t type, const void *data, uint64_t nbytes, uint64_t *bad_at,
                       char *what, size_t what_len)
{
    const uint8_t *p = data;
    if (type == TDM_DTYPE_F32 || type == TDM_DTYPE_F16 || type == TDM_DTYPE_BF16) {
        const uint64_t es = type == TDM_DTYPE_F32 ? 4 : 2;
        for (uint64_t i = 0; i + es <= nbytes; i += es) {
            uint32_t u = es == 4 ? (uint32_t)p[i] | (uint32_t)p[i + 1] << 8 |
                                       (uint32_t)p[i + 2] << 16 | (uint32_t)p[i + 3] << 24
                                 : (uint32_t)(p[i] | p[i + 1] << 8);
            bool bad = type == TDM_DTYPE_F32   ? (u & 0x7f800000u) == 0x7f800000u
                       : type == TDM_DTYPE_F16 ? (u & 0x7c00u) == 0x7c00u
                                               : (u & 0x7f80u) == 0x7f80u;
            if (bad) {
                *bad_at = i;
                snprintf(what, what_len, "element %" PRIu64 " is not finite (bits 0x%0*x)", i / es,
                         (int)(2 * es), u);
                return 1;
            }
        }
        return 0;
    }
    f16_field_t f[2];
    const int nf = f16_fields(type, f);
    const size_t bb = tdm_dtype_block_bytes(type);
    for (uint64_t b = 0; nf > 0 && bb > 0 && (b + 1) * bb <= nbytes; b++)
        for (int j = 0; j < nf; j++) {
            const uint64_t at = b * bb + f[j].off;
            const unsigned h = (unsigned)(p[at] | p[at + 1] << 8);
            if ((h & 0x7c00u) == 0x7c00u) {
                *bad_at = at;
                snprintf(what, what_len, "block %" PRIu64 ": scale %s is not finite (f16 0x%04x)",
                         b, f[j].name, h);
                return 1;
            }
        }
    return 0;
}
