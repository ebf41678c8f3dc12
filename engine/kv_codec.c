/* KV block codecs: f16 and q8, each optionally followed by LZ4. The payload
 * format is documented byte by byte in include/tandem/kv_codec.h.
 *
 * Speed (figures in docs/kv-codec.md): f16 is a memcpy per tensor plus the
 * XXH3 of the body. q8 has two versions that give the same bytes:
 * - portable loops over fixed groups of LANES values, which gcc -O2 (its
 *   cheap cost model vectorizes only loops without a remainder) and clang
 *   vectorize for the baseline ISA; f16 <-> f32 are the FP16 library's
 *   branch-free bit conversions, and every select is a mask or an integer
 *   min/max, because gcc keeps branches around float operations (which may
 *   trap) out of vector loops;
 * - AVX2 + F16C (vcvtph2ps / vcvtps2ph), picked at run time: about 6x
 *   faster to decode, 2x to encode than the portable code.
 * A q8 scale is computed on the f16 bits: for finite values, |x| orders as
 * the integer x & 0x7fff, so the absmax needs no conversion. */
#include "tandem/kv_codec.h"

#include <lz4.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "tandem/kernels.h" /* tdm_cpu_isa_detect */
#include "tandem/log.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kv_codec.c copies f16 rows as they lie in memory: little-endian hosts only"
#endif

#define MOD             "kvcodec"
#define HDR             TDM_KV_PAYLOAD_HEADER_SIZE
#define MAX_BLOCK_BYTES (1u << 30) /* f16 bytes of one block; keeps LZ4 sizes in int */
#define LANES           16         /* values per inner loop */
#define FLAG_LZ4        0x01u
#define Q8_MAX          127

typedef void (*q8_encode_fn)(const uint16_t *restrict x, size_t n_rows, size_t hd,
                             uint8_t *restrict q, uint8_t *restrict s);
typedef void (*q8_decode_fn)(const uint8_t *restrict q, const uint8_t *restrict s, size_t n_rows,
                             size_t hd, uint16_t *restrict y);

struct tdm_kv_codec_ctx {
    tdm_kv_layout_t layout;
    q8_encode_fn q8_encode; /* portable, or AVX2 + F16C where the CPU and head_dim allow */
    q8_decode_fn q8_decode;
    size_t kv_dim;      /* n_head_kv * head_dim */
    size_t scratch_len; /* the larger raw body of a full block */
    uint8_t *scratch;   /* LZ4 staging: the raw body before compression / after decompression */
};

static void q8_pick(tdm_kv_codec_ctx_t *c);

/* ------------------------------------------------------------ names */

tdm_status_t tdm_kv_codec_parse(const char *name, tdm_kv_codec_t *out)
{
    static const struct {
        const char *name;
        tdm_kv_codec_t codec;
    } names[] = {
        {"f16", {TDM_KV_CODEC_TYPE_F16, false}},
        {"q8", {TDM_KV_CODEC_TYPE_Q8, false}},
        {"f16+lz4", {TDM_KV_CODEC_TYPE_F16, true}},
        {"q8+lz4", {TDM_KV_CODEC_TYPE_Q8, true}},
    };
    for (size_t i = 0; name != NULL && i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(name, names[i].name) == 0) {
            *out = names[i].codec;
            return TDM_OK;
        }
    }
    return TDM_ERR_INVALID;
}

const char *tdm_kv_codec_name(tdm_kv_codec_t codec)
{
    switch (codec.type) {
    case TDM_KV_CODEC_TYPE_F16: return codec.lz4 ? "f16+lz4" : "f16";
    case TDM_KV_CODEC_TYPE_Q8: return codec.lz4 ? "q8+lz4" : "q8";
    }
    return "unknown";
}

/* ------------------------------------------------------------ sizes */

static bool type_known(uint32_t type)
{
    return type == TDM_KV_CODEC_TYPE_F16 || type == TDM_KV_CODEC_TYPE_Q8;
}

/* Bytes of the raw body (before LZ4) of n_tokens rows. */
static size_t raw_size(const tdm_kv_layout_t *l, uint32_t type, int32_t n_tokens)
{
    size_t tensors = (size_t)l->n_layer * 2 * (size_t)n_tokens; /* K and V rows */
    size_t kv_dim = (size_t)l->n_head_kv * (size_t)l->head_dim;
    if (type == TDM_KV_CODEC_TYPE_Q8)
        return tensors * (kv_dim + 2 * (size_t)l->n_head_kv);
    return tensors * kv_dim * 2;
}

size_t tdm_kv_layout_f16_bytes(const tdm_kv_layout_t *layout, int32_t n_tokens)
{
    return raw_size(layout, TDM_KV_CODEC_TYPE_F16, n_tokens);
}

size_t tdm_kv_codec_max_size(const tdm_kv_layout_t *layout, tdm_kv_codec_t codec)
{
    /* An LZ4 body is kept only when smaller than the raw one, so LZ4 never
     * needs LZ4_compressBound's room. */
    return HDR + raw_size(layout, codec.type, layout->block_size);
}

/* ---------------------------------------------------------- context */

tdm_status_t tdm_kv_codec_ctx_create(const tdm_kv_layout_t *layout, tdm_kv_codec_ctx_t **out)
{
    const int32_t dims[] = {layout->n_layer, layout->block_size, layout->n_head_kv,
                            layout->head_dim};
    uint64_t bytes = 2 * 2; /* K and V, 2 bytes a value */
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++) {
        if (dims[i] <= 0)
            return TDM_ERR_INVALID;
        bytes *= (uint64_t)dims[i];
        if (bytes > MAX_BLOCK_BYTES)
            return TDM_ERR_INVALID;
    }
    tdm_kv_codec_ctx_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return TDM_ERR_NOMEM;
    c->layout = *layout;
    q8_pick(c);
    c->kv_dim = (size_t)layout->n_head_kv * (size_t)layout->head_dim;
    size_t f16 = raw_size(layout, TDM_KV_CODEC_TYPE_F16, layout->block_size);
    size_t q8 = raw_size(layout, TDM_KV_CODEC_TYPE_Q8, layout->block_size);
    c->scratch_len = f16 > q8 ? f16 : q8;
    c->scratch = malloc(c->scratch_len);
    if (c->scratch == NULL) {
        free(c);
        return TDM_ERR_NOMEM;
    }
    *out = c;
    return TDM_OK;
}

void tdm_kv_codec_ctx_destroy(tdm_kv_codec_ctx_t *ctx)
{
    if (ctx == NULL)
        return;
    free(ctx->scratch);
    free(ctx);
}

const tdm_kv_layout_t *tdm_kv_codec_ctx_layout(const tdm_kv_codec_ctx_t *ctx)
{
    return &ctx->layout;
}

/* ------------------------------------------------- little-endian fields */

static void put_u16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    put_u16(p, v & 0xffff);
    put_u16(p + 2, v >> 16);
}

static void put_u64(uint8_t *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

static uint32_t get_u16(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

static uint32_t get_u32(const uint8_t *p)
{
    return get_u16(p) | get_u16(p + 2) << 16;
}

static uint64_t get_u64(const uint8_t *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

/* ---------------------------------------------------- f16 <-> f32 */

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* Exact for every f16 (inf and NaN included): a normal's exponent and
 * mantissa are shifted into place and rebiased by a multiply by 2^-112; a
 * subnormal is built as 0.5 + m * 2^-24 (exact) and 0.5 subtracted. */
static inline float h2f(uint16_t h)
{
    uint32_t w = (uint32_t)h << 16;
    uint32_t sign = w & 0x80000000u;
    uint32_t two_w = w + w;
    float normal = bits_f32((two_w >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
    float subnormal = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    uint32_t sub = 0u - (uint32_t)(two_w < (1u << 27)); /* a mask, not a branch */
    return bits_f32(sign | (f32_bits(subnormal) & sub) | (f32_bits(normal) & ~sub));
}

/* Round to nearest even, overflow to inf, NaN to a quiet NaN: scaling by
 * 2^112 * 2^-110 and adding a power of two chosen from the exponent leaves
 * the f16 mantissa, correctly rounded, in the low bits of the float. */
static inline uint16_t f2h(float f)
{
    uint32_t w = f32_bits(f);
    float base = (bits_f32(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t shl1_w = w + w;
    uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = f32_bits(base);
    uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
    uint32_t nan = 0u - (uint32_t)(shl1_w > 0xff000000u); /* a mask, not a branch */
    return (uint16_t)((sign >> 16) | (0x7e00u & nan) | (nonsign & ~nan));
}

/* --------------------------------------------------------------- q8 */

/* Bits of max |x| over x[0..n) (inf and NaN count as the largest finite). */
static inline uint16_t absmax_bits(const uint16_t *restrict x, size_t n)
{
    int16_t lane[LANES] = {0};
    size_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int i = 0; i < LANES; i++) {
            int16_t a = (int16_t)(x[j + (size_t)i] & 0x7fff);
            lane[i] = a > lane[i] ? a : lane[i];
        }
    int16_t m = 0;
    for (int i = 0; i < LANES; i++)
        m = lane[i] > m ? lane[i] : m;
    for (; j < n; j++) {
        int16_t a = (int16_t)(x[j] & 0x7fff);
        m = a > m ? a : m;
    }
    return m > 0x7bff ? 0x7bff : (uint16_t)m;
}

/* clamp(round-to-nearest-even(x * inv), -127, 127). Adding 1.5 * 2^23 to
 * a float t with |t| < 2^22 leaves round(t) + 2^22 in the low 23 bits (in
 * the default nearest-even mode). Integer clamps, because gcc keeps float
 * compares (which may trap) out of vectorized loops; a non-finite x gives
 * some value in range, never undefined behaviour. */
static inline int8_t q8_one(uint16_t h, float inv)
{
    float t = h2f(h) * inv;
    int32_t q = (int32_t)(f32_bits(t + 0x1.8p23f) & 0x7fffffu) - 0x400000;
    q = q < -Q8_MAX ? -Q8_MAX : q;
    q = q > Q8_MAX ? Q8_MAX : q;
    return (int8_t)q;
}

/* The f16 scale of a head whose largest |x| has bits amax: the smallest
 * f16 s with s >= amax / 127, so that |x / s| <= 127 (up to rounding). */
static inline uint16_t q8_scale(uint16_t amax)
{
    float s = h2f(amax) / (float)Q8_MAX;
    uint16_t sh = f2h(s);
    if (h2f(sh) < s)
        sh++; /* the next f16 up (s is positive and far below the f16 max) */
    return sh;
}

/* n_rows head rows x[n_rows][hd] f16 -> q[n_rows][hd] int8 and their
 * scales s[n_rows] f16 (unaligned, little endian). The portable version is
 * the reference: the AVX2 one gives the same bytes for finite inputs. */
static void q8_encode_rows(const uint16_t *restrict x, size_t n_rows, size_t hd,
                           uint8_t *restrict q, uint8_t *restrict s)
{
    for (size_t r = 0; r < n_rows; r++) {
        const uint16_t *xr = x + r * hd;
        int8_t *qr = (int8_t *)q + r * hd;
        uint16_t sh = q8_scale(absmax_bits(xr, hd));
        float inv = sh != 0 ? 1.0f / h2f(sh) : 0.0f;
        size_t j = 0;
        for (; j + LANES <= hd; j += LANES)
            for (size_t i = 0; i < LANES; i++)
                qr[j + i] = q8_one(xr[j + i], inv);
        for (; j < hd; j++)
            qr[j] = q8_one(xr[j], inv);
        put_u16(s + 2 * r, sh);
    }
}

/* The inverse of q8_encode_rows; every scale is finite (checked by the caller). */
static void q8_decode_rows(const uint8_t *restrict q, const uint8_t *restrict s, size_t n_rows,
                           size_t hd, uint16_t *restrict y)
{
    for (size_t r = 0; r < n_rows; r++) {
        const int8_t *qr = (const int8_t *)q + r * hd;
        uint16_t *yr = y + r * hd;
        float sf = h2f((uint16_t)get_u16(s + 2 * r));
        size_t j = 0;
        for (; j + LANES <= hd; j += LANES)
            for (size_t i = 0; i < LANES; i++)
                yr[j + i] = f2h((float)qr[j + i] * sf);
        for (; j < hd; j++)
            yr[j] = f2h((float)qr[j] * sf);
    }
}

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_Q8_AVX2 1
#define AVX2         __attribute__((target("avx2,f16c")))

/* The same arithmetic with F16C conversions, for hd a multiple of 16:
 * vcvtps2dq and vcvtps2ph round to nearest even as the portable code does. */
AVX2 static void q8_encode_rows_avx2(const uint16_t *restrict x, size_t n_rows, size_t hd,
                                     uint8_t *restrict q, uint8_t *restrict s)
{
    const __m256i abs_mask = _mm256_set1_epi16(0x7fff);
    const __m256i qmax = _mm256_set1_epi32(Q8_MAX), qmin = _mm256_set1_epi32(-Q8_MAX);
    for (size_t r = 0; r < n_rows; r++) {
        const uint16_t *xr = x + r * hd;
        int8_t *qr = (int8_t *)q + r * hd;
        __m256i m = _mm256_setzero_si256();
        for (size_t j = 0; j < hd; j += 16)
            m = _mm256_max_epi16(
                m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(xr + j)), abs_mask));
        __m128i m8 = _mm_max_epi16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
        m8 = _mm_max_epi16(m8, _mm_srli_si128(m8, 8));
        m8 = _mm_max_epi16(m8, _mm_srli_si128(m8, 4));
        m8 = _mm_max_epi16(m8, _mm_srli_si128(m8, 2));
        int amax = _mm_extract_epi16(m8, 0);
        uint16_t sh = q8_scale(amax > 0x7bff ? 0x7bff : (uint16_t)amax);
        __m256 inv = _mm256_set1_ps(sh != 0 ? 1.0f / h2f(sh) : 0.0f);
        for (size_t j = 0; j < hd; j += 8) {
            __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(xr + j)));
            __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(f, inv));
            i = _mm256_min_epi32(_mm256_max_epi32(i, qmin), qmax);
            __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
            _mm_storel_epi64((__m128i *)(qr + j), _mm_packs_epi16(w, w));
        }
        put_u16(s + 2 * r, sh);
    }
}

AVX2 static void q8_decode_rows_avx2(const uint8_t *restrict q, const uint8_t *restrict s,
                                     size_t n_rows, size_t hd, uint16_t *restrict y)
{
    for (size_t r = 0; r < n_rows; r++) {
        const int8_t *qr = (const int8_t *)q + r * hd;
        uint16_t *yr = y + r * hd;
        __m256 sf = _mm256_set1_ps(h2f((uint16_t)get_u16(s + 2 * r)));
        for (size_t j = 0; j < hd; j += 8) {
            __m256i i = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qr + j)));
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(i), sf);
            _mm_storeu_si128((__m128i *)(yr + j), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
        }
    }
}
#endif

/* The portable q8 code, or the AVX2 one when this CPU has the kernels'
 * AVX2 level (AVX2, FMA, F16C), hd is a multiple of 16 and TANDEM_CPU_ISA
 * does not say "scalar" (as for the kernels). */
static void q8_pick(tdm_kv_codec_ctx_t *c)
{
    c->q8_encode = q8_encode_rows;
    c->q8_decode = q8_decode_rows;
#ifdef HAVE_Q8_AVX2
    const char *isa = getenv("TANDEM_CPU_ISA");
    if (c->layout.head_dim % 16 == 0 && tdm_cpu_isa_detect() >= TDM_CPU_ISA_AVX2 &&
        (isa == NULL || strcmp(isa, "scalar") != 0)) {
        c->q8_encode = q8_encode_rows_avx2;
        c->q8_decode = q8_decode_rows_avx2;
    }
#endif
}

/* ------------------------------------------------------ encode/decode */

/* Writes the raw body of n_tokens rows into body. */
static void pack_body(const tdm_kv_codec_ctx_t *c, uint32_t type, const uint16_t *const *k,
                      const uint16_t *const *v, size_t n_tokens, uint8_t *body)
{
    const tdm_kv_layout_t *l = &c->layout;
    size_t nh = (size_t)l->n_head_kv, hd = (size_t)l->head_dim;
    for (int32_t il = 0; il < l->n_layer; il++) {
        const uint16_t *src[2] = {k[il], v[il]};
        for (int t = 0; t < 2; t++) {
            if (type == TDM_KV_CODEC_TYPE_F16) {
                size_t bytes = n_tokens * c->kv_dim * 2;
                memcpy(body, src[t], bytes);
                body += bytes;
            } else {
                c->q8_encode(src[t], n_tokens * nh, hd, body, body + n_tokens * c->kv_dim);
                body += n_tokens * (c->kv_dim + 2 * nh);
            }
        }
    }
}

static void unpack_body(const tdm_kv_codec_ctx_t *c, uint32_t type, const uint8_t *body,
                        size_t n_tokens, uint16_t *const *k, uint16_t *const *v)
{
    const tdm_kv_layout_t *l = &c->layout;
    size_t nh = (size_t)l->n_head_kv, hd = (size_t)l->head_dim;
    for (int32_t il = 0; il < l->n_layer; il++) {
        uint16_t *dst[2] = {k[il], v[il]};
        for (int t = 0; t < 2; t++) {
            if (type == TDM_KV_CODEC_TYPE_F16) {
                size_t bytes = n_tokens * c->kv_dim * 2;
                memcpy(dst[t], body, bytes);
                body += bytes;
            } else {
                c->q8_decode(body, body + n_tokens * c->kv_dim, n_tokens * nh, hd, dst[t]);
                body += n_tokens * (c->kv_dim + 2 * nh);
            }
        }
    }
}

tdm_status_t tdm_kv_codec_encode(tdm_kv_codec_ctx_t *ctx, tdm_kv_codec_t codec,
                                 const uint16_t *const *k, const uint16_t *const *v,
                                 int32_t n_tokens, void *out, size_t cap, size_t *out_len)
{
    const tdm_kv_layout_t *l = &ctx->layout;
    if (!type_known((uint32_t)codec.type) || n_tokens < 1 || n_tokens > l->block_size) {
        tdm_log_warn(MOD, "encode: codec %d or %d tokens (1..%d) out of range", (int)codec.type,
                     n_tokens, l->block_size);
        return TDM_ERR_INVALID;
    }
    size_t raw = raw_size(l, (uint32_t)codec.type, n_tokens);
    if (cap < HDR + raw) {
        tdm_log_warn(MOD, "encode: a buffer of %zu bytes is under the %zu a %s payload may need",
                     cap, HDR + raw, tdm_kv_codec_name(codec));
        return TDM_ERR_INVALID;
    }
    uint8_t *o = out;
    size_t body_len = raw;
    uint32_t flags = 0;
    if (codec.lz4) {
        pack_body(ctx, (uint32_t)codec.type, k, v, (size_t)n_tokens, ctx->scratch);
        /* Kept only if smaller: LZ4 gives up when the output reaches raw. */
        int c = LZ4_compress_default((const char *)ctx->scratch, (char *)o + HDR, (int)raw,
                                     (int)raw - 1);
        if (c > 0) {
            body_len = (size_t)c;
            flags |= FLAG_LZ4;
        } else {
            memcpy(o + HDR, ctx->scratch, raw);
        }
    } else {
        pack_body(ctx, (uint32_t)codec.type, k, v, (size_t)n_tokens, o + HDR);
    }
    memcpy(o, TDM_KV_PAYLOAD_MAGIC, 4);
    put_u16(o + 4, TDM_KV_PAYLOAD_VERSION);
    o[6] = (uint8_t)codec.type;
    o[7] = (uint8_t)flags;
    put_u64(o + 8, l->fingerprint.lo);
    put_u64(o + 16, l->fingerprint.hi);
    put_u32(o + 24, (uint32_t)l->n_layer);
    put_u32(o + 28, (uint32_t)l->n_head_kv);
    put_u32(o + 32, (uint32_t)l->head_dim);
    put_u32(o + 36, (uint32_t)l->block_size);
    put_u32(o + 40, (uint32_t)n_tokens);
    put_u32(o + 44, (uint32_t)body_len);
    put_u32(o + 48, (uint32_t)raw);
    put_u32(o + 52, 0);
    put_u64(o + 56, XXH3_64bits(o + HDR, body_len));
    *out_len = HDR + body_len;
    return TDM_OK;
}

/* Logs why a payload is refused, once; returns TDM_ERR_FORMAT. */
__attribute__((format(printf, 1, 2))) static tdm_status_t refuse(const char *fmt, ...)
{
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    tdm_log_warn(MOD, "KV payload refused: %s", why);
    return TDM_ERR_FORMAT;
}

/* Checks the header fields of p[0..len) against c's layout. */
static tdm_status_t check_header(const tdm_kv_codec_ctx_t *c, const uint8_t *p, size_t len,
                                 int32_t want_tokens)
{
    const tdm_kv_layout_t *l = &c->layout;
    if (len < HDR)
        return refuse("%zu bytes, shorter than the %d-byte header", len, HDR);
    if (memcmp(p, TDM_KV_PAYLOAD_MAGIC, 4) != 0)
        return refuse("bad magic %02x%02x%02x%02x (want \"TDKV\")", p[0], p[1], p[2], p[3]);
    uint32_t version = get_u16(p + 4), type = p[6], flags = p[7];
    if (version != TDM_KV_PAYLOAD_VERSION)
        return refuse("version %u (this build reads %d)", version, TDM_KV_PAYLOAD_VERSION);
    if (!type_known(type))
        return refuse("unknown codec %u", type);
    if ((flags & ~FLAG_LZ4) != 0)
        return refuse("unknown flags 0x%02x", flags);
    tdm_hash128_t fp = {.lo = get_u64(p + 8), .hi = get_u64(p + 16)};
    if (fp.lo != l->fingerprint.lo || fp.hi != l->fingerprint.hi) {
        char got[33], want[33];
        tdm_hash128_hex(fp, got);
        tdm_hash128_hex(l->fingerprint, want);
        return refuse("model fingerprint %s is not this model's (%s)", got, want);
    }
    const char *names[] = {"n_layer", "n_head_kv", "head_dim", "block_size"};
    const int32_t mine[] = {l->n_layer, l->n_head_kv, l->head_dim, l->block_size};
    for (int i = 0; i < 4; i++) {
        uint32_t got = get_u32(p + 24 + 4 * i);
        if (got != (uint32_t)mine[i])
            return refuse("%s %u, expected %d", names[i], got, mine[i]);
    }
    uint32_t n_tokens = get_u32(p + 40), body_len = get_u32(p + 44), raw_len = get_u32(p + 48);
    if (n_tokens == 0 || n_tokens > (uint32_t)l->block_size)
        return refuse("n_tokens %u out of 1..%d", n_tokens, l->block_size);
    if (want_tokens != 0 && n_tokens != (uint32_t)want_tokens)
        return refuse("n_tokens %u, expected %d", n_tokens, want_tokens);
    if (get_u32(p + 52) != 0)
        return refuse("reserved field 0x%08x is not 0", get_u32(p + 52));
    size_t raw = raw_size(l, type, (int32_t)n_tokens);
    if (raw_len != raw)
        return refuse("raw_len %u, but %u %s rows take %zu", raw_len, n_tokens,
                      type == TDM_KV_CODEC_TYPE_Q8 ? "q8" : "f16", raw);
    if ((flags & FLAG_LZ4) ? body_len >= raw_len : body_len != raw_len)
        return refuse("body_len %u does not fit raw_len %u%s", body_len, raw_len,
                      (flags & FLAG_LZ4) ? " with LZ4 (must be smaller)" : "");
    if (len - HDR != body_len)
        return refuse("%zu bytes, but the header says %d + %u", len, HDR, body_len);
    return TDM_OK;
}

tdm_status_t tdm_kv_codec_decode(tdm_kv_codec_ctx_t *ctx, const void *payload, size_t len,
                                 int32_t want_tokens, uint16_t *const *k, uint16_t *const *v,
                                 int32_t *n_tokens)
{
    const tdm_kv_layout_t *l = &ctx->layout;
    if (want_tokens < 0 || want_tokens > l->block_size) {
        tdm_log_warn(MOD, "decode: want_tokens %d out of 0..%d", want_tokens, l->block_size);
        return TDM_ERR_INVALID;
    }
    const uint8_t *p = payload;
    tdm_status_t st = check_header(ctx, p, len, want_tokens);
    if (st != TDM_OK)
        return st;
    uint32_t type = p[6], flags = p[7], nt = get_u32(p + 40);
    uint32_t body_len = get_u32(p + 44), raw_len = get_u32(p + 48);
    const uint8_t *body = p + HDR;
    uint64_t sum = XXH3_64bits(body, body_len);
    if (sum != get_u64(p + 56))
        return refuse("checksum %016llx, the body hashes to %016llx",
                      (unsigned long long)get_u64(p + 56), (unsigned long long)sum);
    if (flags & FLAG_LZ4) {
        /* raw_len <= scratch_len: it matched raw_size() for <= block_size rows */
        int got = LZ4_decompress_safe((const char *)body, (char *)ctx->scratch, (int)body_len,
                                      (int)raw_len);
        if (got != (int)raw_len)
            return refuse("LZ4 body does not decompress to %u bytes (%d)", raw_len, got);
        body = ctx->scratch;
    }
    if (type == TDM_KV_CODEC_TYPE_Q8) {
        size_t nh = (size_t)l->n_head_kv, tensor = nt * (ctx->kv_dim + 2 * nh);
        for (size_t t = 0; t < 2 * (size_t)l->n_layer; t++) {
            const uint8_t *s = body + t * tensor + nt * ctx->kv_dim;
            for (size_t i = 0; i < nt * nh; i++)
                if ((get_u16(s + 2 * i) & 0x7c00) == 0x7c00)
                    return refuse("q8 scale %zu of tensor %zu is not finite", i, t);
        }
    }
    unpack_body(ctx, type, body, nt, k, v);
    if (n_tokens != NULL)
        *n_tokens = (int32_t)nt;
    return TDM_OK;
}
