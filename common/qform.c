/* The integer form of every quantized GGUF layout tandem computes with (see
 * tandem/qform.h); the bit packings are those of tdm_dtype_to_f32. */
#include "tandem/qform.h"

#include <string.h>

#include "tandem/dtype.h"

int tdm_qform_of(uint32_t type, tdm_qform_t *f)
{
    /* sub, bias, has_min, nib, f16 */
    static const struct {
        uint32_t type;
        tdm_qform_t f;
    } forms[] = {
        {TDM_DTYPE_Q4_0, {32, 8, 0, 1, 1}},   {TDM_DTYPE_Q4_1, {32, 0, 1, 1, 1}},
        {TDM_DTYPE_Q5_0, {32, 16, 0, 0, 1}},  {TDM_DTYPE_Q5_1, {32, 0, 1, 0, 1}},
        {TDM_DTYPE_Q8_0, {32, 128, 0, 0, 1}}, {TDM_DTYPE_IQ4_NL, {32, 128, 0, 0, 1}},
        {TDM_DTYPE_Q2_K, {16, 0, 1, 1, 0}},   {TDM_DTYPE_Q3_K, {16, 4, 0, 1, 0}},
        {TDM_DTYPE_Q4_K, {32, 0, 1, 1, 0}},   {TDM_DTYPE_Q5_K, {32, 0, 1, 0, 0}},
        {TDM_DTYPE_Q6_K, {16, 32, 0, 0, 0}},  {TDM_DTYPE_IQ4_XS, {32, 128, 0, 0, 0}},
    };
    for (size_t i = 0; i < sizeof(forms) / sizeof(forms[0]); i++)
        if (forms[i].type == type) {
            *f = forms[i].f;
            return 1;
        }
    return 0;
}

static float h2f(const uint8_t *p) /* little-endian f16 at p */
{
    return tdm_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

/* Element e of a 32-block's nibbles: low halves are 0..15, high 16..31. */
static int nib32(const uint8_t *qs, int e)
{
    return (qs[e % 16] >> (e / 16 * 4)) & 0x0f;
}

/* One block of each layout: u[block elems], scale and min per sub-block. */
static void blk_q4_0(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    (void)mn;
    sc[0] = h2f(b);
    for (int e = 0; e < 32; e++)
        u[e] = (uint8_t)nib32(b + 2, e);
}

static void blk_q4_1(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    sc[0] = h2f(b);
    mn[0] = h2f(b + 2);
    for (int e = 0; e < 32; e++)
        u[e] = (uint8_t)nib32(b + 4, e);
}

static void blk_q5(const uint8_t *b, uint8_t *u, float *sc, float *mn, int has_min)
{
    sc[0] = h2f(b);
    if (has_min)
        mn[0] = h2f(b + 2);
    const uint8_t *qhp = b + (has_min ? 4 : 2), *qs = qhp + 4;
    const uint32_t qh =
        (uint32_t)qhp[0] | (uint32_t)qhp[1] << 8 | (uint32_t)qhp[2] << 16 | (uint32_t)qhp[3] << 24;
    for (int e = 0; e < 32; e++)
        u[e] = (uint8_t)(nib32(qs, e) | (int)((qh >> e) & 1) << 4);
}

static void blk_q5_0(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    blk_q5(b, u, sc, mn, 0);
}

static void blk_q5_1(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    blk_q5(b, u, sc, mn, 1);
}

static void blk_q8_0(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    (void)mn;
    sc[0] = h2f(b);
    for (int e = 0; e < 32; e++)
        u[e] = (uint8_t)(b[2 + e] ^ 0x80);
}

static void blk_iq4_nl(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    (void)mn;
    sc[0] = h2f(b);
    for (int e = 0; e < 32; e++)
        u[e] = (uint8_t)(tdm_iq4_values[nib32(b + 2, e)] + 128);
}

static void blk_q2_k(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    const uint8_t *scales = b, *qs = b + 16;
    const float d = h2f(b + 80), dmin = h2f(b + 82);
    for (int g = 0; g < 16; g++) {
        sc[g] = d * (float)(scales[g] & 0x0f);
        mn[g] = -(dmin * (float)(scales[g] >> 4));
    }
    for (int e = 0; e < 256; e++)
        u[e] = (uint8_t)((qs[e / 128 * 32 + e % 32] >> (2 * (e / 32 % 4))) & 3);
}

static void blk_q3_k(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    (void)mn;
    const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
    const float d = h2f(b + 108);
    for (int i = 0; i < 16; i++) {
        const int lo = (s[i % 8] >> (i / 8 * 4)) & 0x0f, hi = (s[8 + i % 4] >> (i / 4 * 2)) & 3;
        sc[i] = d * (float)((int8_t)(lo | hi << 4) - 32);
    }
    for (int e = 0; e < 256; e++) {
        const int j = e % 32;
        const int ql = (qs[e / 128 * 32 + j] >> (2 * (e / 32 % 4))) & 3;
        u[e] = (uint8_t)(ql | ((hmask[j] >> (e / 32)) & 1) << 2); /* code = u - 4 */
    }
}

/* The 6-bit scales and mins of Q4_K and Q5_K, 8 of each. */
static void k_scale_min(const uint8_t *s, int i, int *scale, int *min)
{
    if (i < 4) {
        *scale = s[i] & 0x3f;
        *min = s[4 + i] & 0x3f;
    } else {
        *scale = (s[8 + i - 4] & 0x0f) | ((s[i - 4] >> 2) & 0x30);
        *min = (s[8 + i - 4] >> 4) | ((s[i] >> 2) & 0x30);
    }
}

static void blk_q45_k(const uint8_t *b, uint8_t *u, float *sc, float *mn, int five)
{
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t *s = b + 4, *qh = b + 16, *qs = b + (five ? 48 : 16);
    for (int sb = 0; sb < 8; sb++) {
        int scale, min;
        k_scale_min(s, sb, &scale, &min);
        sc[sb] = d * (float)scale;
        mn[sb] = -(dmin * (float)min);
        for (int j = 0; j < 32; j++) {
            int q = (qs[sb / 2 * 32 + j] >> (sb % 2 * 4)) & 0x0f;
            if (five)
                q |= ((qh[j] >> sb) & 1) << 4;
            u[sb * 32 + j] = (uint8_t)q;
        }
    }
}

static void blk_q4_k(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    blk_q45_k(b, u, sc, mn, 0);
}

static void blk_q5_k(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    blk_q45_k(b, u, sc, mn, 1);
}

static void blk_q6_k(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    (void)mn;
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    const float d = h2f(b + 208);
    for (int g = 0; g < 16; g++)
        sc[g] = d * (float)scales[g];
    for (int e = 0; e < 256; e++) {
        const int h = e / 128, r = e % 128;
        const int lo = (ql[h * 64 + r % 64] >> (r / 64 * 4)) & 0x0f;
        const int hi = (qh[h * 32 + r % 32] >> (r / 32 * 2)) & 3;
        u[e] = (uint8_t)(lo | hi << 4); /* code = u - 32 */
    }
}

static void blk_iq4_xs(const uint8_t *b, uint8_t *u, float *sc, float *mn)
{
    (void)mn;
    const float d = h2f(b);
    const unsigned scales_h = (unsigned)(b[2] | b[3] << 8);
    const uint8_t *scales_l = b + 4, *qs = b + 8;
    for (int ib = 0; ib < 8; ib++) {
        const int lo = (scales_l[ib / 2] >> (ib % 2 * 4)) & 0x0f;
        const int hi = (scales_h >> (2 * ib)) & 3;
        sc[ib] = d * (float)((int8_t)(lo | hi << 4) - 32);
        for (int j = 0; j < 32; j++)
            u[ib * 32 + j] = (uint8_t)(tdm_iq4_values[nib32(qs + ib * 16, j)] + 128);
    }
}

typedef void (*blk_fn)(const uint8_t *b, uint8_t *u, float *sc, float *mn);

static blk_fn blk_of(uint32_t type)
{
    switch (type) {
    case TDM_DTYPE_Q4_0: return blk_q4_0;
    case TDM_DTYPE_Q4_1: return blk_q4_1;
    case TDM_DTYPE_Q5_0: return blk_q5_0;
    case TDM_DTYPE_Q5_1: return blk_q5_1;
    case TDM_DTYPE_Q8_0: return blk_q8_0;
    case TDM_DTYPE_IQ4_NL: return blk_iq4_nl;
    case TDM_DTYPE_Q2_K: return blk_q2_k;
    case TDM_DTYPE_Q3_K: return blk_q3_k;
    case TDM_DTYPE_Q4_K: return blk_q4_k;
    case TDM_DTYPE_Q5_K: return blk_q5_k;
    case TDM_DTYPE_Q6_K: return blk_q6_k;
    case TDM_DTYPE_IQ4_XS: return blk_iq4_xs;
    default: return NULL;
    }
}

void tdm_qform_decode(uint32_t type, const void *row, uint64_t n, uint8_t *u, float *scale,
                      float *min)
{
    tdm_qform_t f;
    blk_fn fn = blk_of(type);
    if (fn == NULL || !tdm_qform_of(type, &f))
        return;
    const size_t be = tdm_dtype_block_elems(type), bb = tdm_dtype_block_bytes(type);
    const size_t ns = be / f.sub; /* scales per block */
    float dummy[16];
    for (uint64_t i = 0; i < n / be; i++)
        fn((const uint8_t *)row + i * bb, u + i * be, scale + i * ns,
           f.has_min ? min + i * ns : dummy);
}

int tdm_qform_super(uint32_t type, const void *row, uint64_t n, float *d, float *dmin)
{
    int d_at, m_at = -1;
    switch (type) {
    case TDM_DTYPE_Q2_K: d_at = 80, m_at = 82; break;
    case TDM_DTYPE_Q3_K: d_at = 108; break;
    case TDM_DTYPE_Q4_K:
    case TDM_DTYPE_Q5_K: d_at = 0, m_at = 2; break;
    case TDM_DTYPE_Q6_K: d_at = 208; break;
    case TDM_DTYPE_IQ4_XS: d_at = 0; break;
    default: return 0;
    }
    const size_t bb = tdm_dtype_block_bytes(type);
    for (uint64_t i = 0; i < n / 256; i++) {
        const uint8_t *b = (const uint8_t *)row + i * bb;
        d[i] = h2f(b + d_at);
        if (dmin != NULL)
            dmin[i] = m_at >= 0 ? h2f(b + m_at) : 0.0f;
    }
    return 1;
}
