/* KV block codecs: round trips, the q8 error bound, LZ4, every corrupted
 * header field and body byte, truncations, wrong models, the one-line
 * warning, and the engine path (tdm_engine_eval_split) on a synthetic model
 * and, when present, the default model. Fixed seeds throughout. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "tandem/dtype.h"
#include "tandem/engine.h"
#include "tandem/kv_codec.h"
#include "tandem/log.h"
#include "test_util.h"

#define HDR TDM_KV_PAYLOAD_HEADER_SIZE

static uint64_t rng = 42;

static uint64_t rnd(void)
{
    rng += 0x9e3779b97f4a7c15ull;
    uint64_t z = rng;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rnd_unit(void) /* [0, 1) */
{
    return (float)(rnd() >> 40) / (float)(1ull << 24);
}

static float rnd_normal(void) /* roughly N(0, 1): sum of 4 uniforms */
{
    return (rnd_unit() + rnd_unit() + rnd_unit() + rnd_unit() - 2.0f) * 1.732f;
}

/* One block of a layout: rows [layer][K, V][block_size][kv_dim] f16. */
typedef struct blk {
    uint16_t *data;
    uint16_t **k, **v;
    size_t rows; /* block_size * kv_dim */
} blk_t;

static void blk_init(blk_t *b, const tdm_kv_layout_t *l)
{
    b->rows = (size_t)l->block_size * (size_t)l->n_head_kv * (size_t)l->head_dim;
    b->data = malloc(2 * (size_t)l->n_layer * b->rows * sizeof(uint16_t));
    b->k = malloc((size_t)l->n_layer * sizeof(*b->k));
    b->v = malloc((size_t)l->n_layer * sizeof(*b->v));
    for (int32_t il = 0; il < l->n_layer; il++) {
        b->k[il] = b->data + 2 * (size_t)il * b->rows;
        b->v[il] = b->data + (2 * (size_t)il + 1) * b->rows;
    }
}

static void blk_free(blk_t *b)
{
    free(b->data);
    free(b->k);
    free(b->v);
}

static size_t blk_count(const blk_t *b, const tdm_kv_layout_t *l)
{
    return 2 * (size_t)l->n_layer * b->rows;
}

/* KV-like values: per head a magnitude from 1e-3 to 30, a few outliers,
 * an all-zero head, and some subnormals. */
static void blk_fill(blk_t *b, const tdm_kv_layout_t *l)
{
    size_t hd = (size_t)l->head_dim, n = blk_count(b, l);
    for (size_t r = 0; r < n / hd; r++) {
        float mag = powf(10.0f, -3.0f + 4.5f * rnd_unit());
        for (size_t j = 0; j < hd; j++) {
            float x = rnd_normal() * mag;
            if (rnd() % 97 == 0)
                x *= 8.0f;
            b->data[r * hd + j] = tdm_f32_to_f16(x);
        }
        if (r % 37 == 5)
            memset(b->data + r * hd, 0, hd * sizeof(uint16_t));
        if (r % 41 == 7)
            for (size_t j = 0; j < hd; j++)
                b->data[r * hd + j] = (uint16_t)(rnd() % 0x400) | (j % 2 ? 0x8000 : 0);
    }
}

static const char *const codec_names[] = {"f16", "q8", "f16+lz4", "q8+lz4"};

static tdm_kv_codec_t codec_of(const char *name)
{
    tdm_kv_codec_t c = {0, false};
    CHECK(tdm_kv_codec_parse(name, &c) == TDM_OK, "parse %s", name);
    return c;
}

static tdm_kv_layout_t layout_make(int32_t n_layer, int32_t n_head_kv, int32_t head_dim)
{
    return (tdm_kv_layout_t){.fingerprint = {0x0123456789abcdefull, 0xfedcba9876543210ull},
                             .n_layer = n_layer,
                             .n_head_kv = n_head_kv,
                             .head_dim = head_dim,
                             .block_size = 16};
}

/* Rows 0..n_tokens-1 of every tensor equal; the rest still hold fill. */
static bool rows_equal(const blk_t *a, const blk_t *b, const tdm_kv_layout_t *l, int32_t n_tokens,
                       uint16_t fill)
{
    size_t kv_dim = (size_t)l->n_head_kv * (size_t)l->head_dim;
    size_t used = (size_t)n_tokens * kv_dim;
    for (size_t t = 0; t < 2 * (size_t)l->n_layer; t++) {
        if (memcmp(a->data + t * a->rows, b->data + t * b->rows, used * sizeof(uint16_t)) != 0)
            return false;
        for (size_t i = used; i < b->rows; i++)
            if (b->data[t * b->rows + i] != fill)
                return false;
    }
    return true;
}

static void test_names(void)
{
    for (int i = 0; i < 4; i++) {
        tdm_kv_codec_t c = codec_of(codec_names[i]);
        CHECK(strcmp(tdm_kv_codec_name(c), codec_names[i]) == 0, "name of %s", codec_names[i]);
    }
    tdm_kv_codec_t c;
    CHECK(tdm_kv_codec_parse("q4", &c) == TDM_ERR_INVALID, "q4 is not a codec");
    CHECK(tdm_kv_codec_parse("F16", &c) == TDM_ERR_INVALID, "names are lowercase");
    CHECK(tdm_kv_codec_parse(NULL, &c) == TDM_ERR_INVALID, "NULL name");
    tdm_kv_layout_t bad = layout_make(0, 3, 64);
    tdm_kv_codec_ctx_t *ctx = NULL;
    CHECK(tdm_kv_codec_ctx_create(&bad, &ctx) == TDM_ERR_INVALID && ctx == NULL, "0 layers");
    bad = layout_make(100000, 1000, 1000);
    CHECK(tdm_kv_codec_ctx_create(&bad, &ctx) == TDM_ERR_INVALID, "a block over 1 GiB");
    tdm_kv_layout_t l = layout_make(30, 3, 64);
    CHECK(tdm_kv_layout_f16_bytes(&l, 16) == 368640, "SmolLM2 block is %zu bytes",
          tdm_kv_layout_f16_bytes(&l, 16));
    CHECK(tdm_kv_codec_max_size(&l, codec_of("q8")) == HDR + 30 * 2 * 16 * (192 + 6),
          "q8 max size %zu", tdm_kv_codec_max_size(&l, codec_of("q8")));
}

/* Round trips of every codec, full and partial blocks. */
static void test_roundtrip(const tdm_kv_layout_t *l)
{
    tdm_kv_codec_ctx_t *ctx;
    CHECK(tdm_kv_codec_ctx_create(l, &ctx) == TDM_OK, "ctx");
    blk_t src, dst, ref;
    blk_init(&src, l);
    blk_init(&dst, l);
    blk_init(&ref, l);
    blk_fill(&src, l);
    const int32_t counts[] = {16, 1, 7, 15};
    for (int ci = 0; ci < 4; ci++) {
        tdm_kv_codec_t c = codec_of(codec_names[ci]);
        size_t cap = tdm_kv_codec_max_size(l, c);
        uint8_t *buf = malloc(cap);
        for (size_t k = 0; k < sizeof(counts) / sizeof(counts[0]); k++) {
            int32_t nt = counts[k];
            size_t len = 0;
            tdm_status_t st =
                tdm_kv_codec_encode(ctx, c, (const uint16_t *const *)src.k,
                                    (const uint16_t *const *)src.v, nt, buf, cap, &len);
            CHECK(st == TDM_OK && len <= cap && len > HDR, "%s encode %d tokens", codec_names[ci],
                  nt);
            CHECK(memcmp(buf, "TDKV", 4) == 0 && buf[4] == 1 && buf[5] == 0, "magic, version");
            for (size_t i = 0; i < blk_count(&dst, l); i++)
                dst.data[i] = 0xabcd;
            int32_t got = -1;
            st = tdm_kv_codec_decode(ctx, buf, len, nt, dst.k, dst.v, &got);
            CHECK(st == TDM_OK && got == nt, "%s decode %d tokens: %d", codec_names[ci], nt, st);
            if (c.type == TDM_KV_CODEC_TYPE_F16) {
                CHECK(rows_equal(&src, &dst, l, nt, 0xabcd), "%s %d tokens exact", codec_names[ci],
                      nt);
            } else if (!c.lz4) {
                CHECK(rows_equal(&src, &dst, l, nt, 0xabcd) == false, "q8 is lossy");
            } else {
                /* q8+lz4 decodes to exactly what q8 gives */
                tdm_kv_codec_t q8 = codec_of("q8");
                size_t len8;
                uint8_t *b8 = malloc(tdm_kv_codec_max_size(l, q8));
                for (size_t i = 0; i < blk_count(&ref, l); i++)
                    ref.data[i] = 0xabcd;
                CHECK(tdm_kv_codec_encode(ctx, q8, (const uint16_t *const *)src.k,
                                          (const uint16_t *const *)src.v, nt, b8,
                                          tdm_kv_codec_max_size(l, q8), &len8) == TDM_OK &&
                          tdm_kv_codec_decode(ctx, b8, len8, nt, ref.k, ref.v, NULL) == TDM_OK,
                      "q8");
                CHECK(rows_equal(&ref, &dst, l, nt, 0xabcd), "q8+lz4 == q8 at %d tokens", nt);
                free(b8);
            }
            /* any count is accepted with want_tokens 0 */
            st = tdm_kv_codec_decode(ctx, buf, len, 0, dst.k, dst.v, &got);
            CHECK(st == TDM_OK && got == nt, "want 0");
        }
        free(buf);
    }
    blk_free(&src);
    blk_free(&dst);
    blk_free(&ref);
    tdm_kv_codec_ctx_destroy(ctx);
}

/* q8: the payload follows the documented layout; the scale is the smallest
 * f16 >= absmax / 127; q in [-127, 127]; decoded = f16(q * s); and
 * |x - decoded| <= s / 2 + half an f16 ulp of the decoded value. The
 * portable and SIMD code give the same bytes. */
static void test_q8_bound(const tdm_kv_layout_t *l)
{
    tdm_kv_codec_ctx_t *ctx, *ctx_scalar;
    CHECK(tdm_kv_codec_ctx_create(l, &ctx) == TDM_OK, "ctx");
    setenv("TANDEM_CPU_ISA", "scalar", 1);
    CHECK(tdm_kv_codec_ctx_create(l, &ctx_scalar) == TDM_OK, "ctx");
    unsetenv("TANDEM_CPU_ISA");
    blk_t src, dst;
    blk_init(&src, l);
    blk_init(&dst, l);
    blk_fill(&src, l);
    tdm_kv_codec_t c = codec_of("q8");
    size_t cap = tdm_kv_codec_max_size(l, c), len, len2;
    uint8_t *buf = malloc(cap), *buf2 = malloc(cap);
    int32_t nt = 13;
    CHECK(tdm_kv_codec_encode(ctx, c, (const uint16_t *const *)src.k,
                              (const uint16_t *const *)src.v, nt, buf, cap, &len) == TDM_OK,
          "encode");
    CHECK(tdm_kv_codec_encode(ctx_scalar, c, (const uint16_t *const *)src.k,
                              (const uint16_t *const *)src.v, nt, buf2, cap, &len2) == TDM_OK,
          "encode scalar");
    CHECK(len == len2 && memcmp(buf, buf2, len) == 0, "SIMD and portable q8 encode agree");
    CHECK(tdm_kv_codec_decode(ctx, buf, len, nt, dst.k, dst.v, NULL) == TDM_OK, "decode");
    blk_t dst2;
    blk_init(&dst2, l);
    memcpy(dst2.data, dst.data, blk_count(&dst, l) * sizeof(uint16_t));
    CHECK(tdm_kv_codec_decode(ctx_scalar, buf, len, nt, dst2.k, dst2.v, NULL) == TDM_OK,
          "decode scalar");
    CHECK(memcmp(dst.data, dst2.data, blk_count(&dst, l) * sizeof(uint16_t)) == 0,
          "SIMD and portable q8 decode agree");
    size_t nh = (size_t)l->n_head_kv, hd = (size_t)l->head_dim, kv_dim = nh * hd;
    size_t tensor = (size_t)nt * (kv_dim + 2 * nh);
    CHECK(len == HDR + 2 * (size_t)l->n_layer * tensor, "q8 payload length %zu", len);
    int bad_scale = 0, bad_q = 0, bad_formula = 0, bad_bound = 0;
    double worst = 0;
    for (size_t t = 0; t < 2 * (size_t)l->n_layer; t++) {
        const int8_t *q = (const int8_t *)(buf + HDR + t * tensor);
        const uint8_t *s = buf + HDR + t * tensor + (size_t)nt * kv_dim;
        for (size_t r = 0; r < (size_t)nt * nh; r++) {
            uint16_t sh = (uint16_t)(s[2 * r] | s[2 * r + 1] << 8);
            float sf = tdm_f16_to_f32(sh), amax = 0;
            const uint16_t *x = src.data + t * src.rows + r * hd;
            const uint16_t *y = dst.data + t * dst.rows + r * hd;
            for (size_t j = 0; j < hd; j++)
                amax = fmaxf(amax, fabsf(tdm_f16_to_f32(x[j])));
            float want = amax / 127.0f;
            if (sf < want || (sh > 0 && tdm_f16_to_f32((uint16_t)(sh - 1)) >= want))
                bad_scale++;
            for (size_t j = 0; j < hd; j++) {
                int qv = q[r * hd + j];
                bad_q += qv < -127 || qv > 127;
                bad_formula += y[j] != tdm_f32_to_f16((float)qv * sf);
                float xv = tdm_f16_to_f32(x[j]), yv = tdm_f16_to_f32(y[j]);
                int e;
                frexpf(fmaxf(fabsf(yv), 6.1035156e-05f), &e);
                float half_ulp = ldexpf(1.0f, e - 12); /* f16: 11-bit significand */
                float err = fabsf(xv - yv), bound = sf / 2 * (1 + 1e-4f) + half_ulp;
                bad_bound += err > bound;
                if (sf > 0 && err / sf > worst)
                    worst = err / sf;
            }
        }
    }
    CHECK(bad_scale == 0, "%d scales not the smallest f16 >= absmax/127", bad_scale);
    CHECK(bad_q == 0, "%d q out of [-127, 127]", bad_q);
    CHECK(bad_formula == 0, "%d decoded values differ from f16(q * s)", bad_formula);
    CHECK(bad_bound == 0, "%d errors over s/2 (+ f16 rounding); worst %.4f s", bad_bound, worst);
    printf("q8 (%dx%dx%d): worst |x - x'| = %.4f scale\n", l->n_layer, l->n_head_kv, l->head_dim,
           worst);

    /* Non-finite input encodes without undefined behaviour. */
    src.k[0][0] = 0x7c00;
    src.k[0][1] = 0x7e00;
    src.v[0][3] = 0xfc00;
    CHECK(tdm_kv_codec_encode(ctx, c, (const uint16_t *const *)src.k,
                              (const uint16_t *const *)src.v, nt, buf, cap, &len) == TDM_OK,
          "encode inf and NaN");
    CHECK(tdm_kv_codec_decode(ctx, buf, len, nt, dst.k, dst.v, NULL) == TDM_OK, "decode");
    free(buf);
    free(buf2);
    blk_free(&src);
    blk_free(&dst);
    blk_free(&dst2);
    tdm_kv_codec_ctx_destroy(ctx);
    tdm_kv_codec_ctx_destroy(ctx_scalar);
}

/* LZ4: a compressible block is stored compressed, a noisy one raw (flag
 * cleared); both decode exactly. */
static void test_lz4(const tdm_kv_layout_t *l)
{
    tdm_kv_codec_ctx_t *ctx;
    CHECK(tdm_kv_codec_ctx_create(l, &ctx) == TDM_OK, "ctx");
    blk_t src, dst;
    blk_init(&src, l);
    blk_init(&dst, l);
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 0)
            for (size_t i = 0; i < blk_count(&src, l); i++)
                src.data[i] = tdm_f32_to_f16((float)(i % 7) * 0.25f);
        else
            for (size_t i = 0; i < blk_count(&src, l); i++)
                src.data[i] = (uint16_t)(rnd() & 0x7bff);
        for (int ci = 2; ci < 4; ci++) {
            tdm_kv_codec_t c = codec_of(codec_names[ci]);
            size_t cap = tdm_kv_codec_max_size(l, c), len;
            uint8_t *buf = malloc(cap);
            CHECK(tdm_kv_codec_encode(ctx, c, (const uint16_t *const *)src.k,
                                      (const uint16_t *const *)src.v, 16, buf, cap, &len) == TDM_OK,
                  "encode");
            uint32_t raw_len = (uint32_t)buf[48] | (uint32_t)buf[49] << 8 |
                               (uint32_t)buf[50] << 16 | (uint32_t)buf[51] << 24;
            if (pass == 0)
                CHECK(buf[7] == 1 && len < HDR + raw_len / 4, "%s compressed: %zu of %u",
                      codec_names[ci], len, raw_len);
            else if (ci == 2)
                CHECK(buf[7] == 0 && len == HDR + raw_len, "noise stored raw: flags %u", buf[7]);
            CHECK(buf[7] == 1 ? len < HDR + raw_len : len == HDR + raw_len,
                  "LZ4 only when smaller");
            CHECK(tdm_kv_codec_decode(ctx, buf, len, 16, dst.k, dst.v, NULL) == TDM_OK, "decode");
            if (c.type == TDM_KV_CODEC_TYPE_F16)
                CHECK(memcmp(src.data, dst.data, blk_count(&src, l) * 2) == 0, "%s exact",
                      codec_names[ci]);
            free(buf);
        }
    }
    blk_free(&src);
    blk_free(&dst);
    tdm_kv_codec_ctx_destroy(ctx);
}

/* Decodes a copy of exactly len bytes (so ASan sees any read past it). */
static tdm_status_t decode_copy(tdm_kv_codec_ctx_t *ctx, const uint8_t *p, size_t len, int32_t want,
                                blk_t *dst)
{
    uint8_t *copy = malloc(len > 0 ? len : 1);
    memcpy(copy, p, len);
    tdm_status_t st = tdm_kv_codec_decode(ctx, copy, len, want, dst->k, dst->v, NULL);
    free(copy);
    return st;
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Corruptions: every bit of the header, bytes of the body, truncations,
 * extensions, other models, a non-finite scale, bad arguments. */
static void test_corrupt(const tdm_kv_layout_t *l)
{
    tdm_kv_codec_ctx_t *ctx;
    CHECK(tdm_kv_codec_ctx_create(l, &ctx) == TDM_OK, "ctx");
    blk_t src, dst;
    blk_init(&src, l);
    blk_init(&dst, l);
    blk_fill(&src, l);
    memset(src.data, 0, src.rows * sizeof(uint16_t)); /* layer 0 K: LZ4 compresses it */
    tdm_log_level_t level = tdm_log_get_level();
    tdm_log_set_level(TDM_LOG_LEVEL_ERROR); /* hundreds of refusals follow */
    for (int ci = 0; ci < 4; ci++) {
        tdm_kv_codec_t c = codec_of(codec_names[ci]);
        size_t cap = tdm_kv_codec_max_size(l, c), len;
        uint8_t *buf = malloc(cap + 1);
        int32_t nt = ci % 2 ? 16 : 5;
        CHECK(tdm_kv_codec_encode(ctx, c, (const uint16_t *const *)src.k,
                                  (const uint16_t *const *)src.v, nt, buf, cap, &len) == TDM_OK,
              "encode");
        CHECK(!c.lz4 || buf[7] == 1, "%s really compressed", codec_names[ci]);
        CHECK(decode_copy(ctx, buf, len, nt, &dst) == TDM_OK, "intact payload decodes");
        int missed = 0;
        for (size_t byte = 0; byte < HDR; byte++)
            for (int bit = 0; bit < 8; bit++) {
                buf[byte] ^= (uint8_t)(1u << bit);
                if (decode_copy(ctx, buf, len, 0, &dst) != TDM_ERR_FORMAT) {
                    missed++;
                    fprintf(stderr, "  %s: header byte %zu bit %d not caught\n", codec_names[ci],
                            byte, bit);
                }
                buf[byte] ^= (uint8_t)(1u << bit);
            }
        CHECK(missed == 0, "%s: %d header bit flips accepted", codec_names[ci], missed);
        missed = 0;
        for (size_t byte = HDR; byte < len; byte += 1 + (len - HDR) / 97) {
            buf[byte] ^= 0x10;
            missed += decode_copy(ctx, buf, len, nt, &dst) != TDM_ERR_FORMAT;
            buf[byte] ^= 0x10;
        }
        CHECK(missed == 0, "%s: %d body flips accepted (checksum)", codec_names[ci], missed);
        missed = 0;
        size_t step = ci == 0 ? 1 : 7; /* every length for one codec, a sample for the others */
        for (size_t n = 0; n < len; n += step)
            missed += decode_copy(ctx, buf, n, 0, &dst) != TDM_ERR_FORMAT;
        CHECK(missed == 0, "%s: %d truncations accepted", codec_names[ci], missed);
        buf[len] = 0;
        CHECK(decode_copy(ctx, buf, len + 1, 0, &dst) == TDM_ERR_FORMAT, "one byte too many");
        CHECK(decode_copy(ctx, buf, len, nt == 16 ? 5 : 16, &dst) == TDM_ERR_FORMAT,
              "other token count");
        CHECK(tdm_kv_codec_decode(ctx, buf, len, 17, dst.k, dst.v, NULL) == TDM_ERR_INVALID,
              "want_tokens over block_size");
        CHECK(tdm_kv_codec_decode(ctx, buf, len, -1, dst.k, dst.v, NULL) == TDM_ERR_INVALID,
              "negative want_tokens");
        /* The same header fields changed consistently, checksum fixed up:
         * still refused (a field is checked, not only the hash). */
        uint8_t *b2 = malloc(len);
        memcpy(b2, buf, len);
        b2[6] = 3;
        CHECK(decode_copy(ctx, b2, len, 0, &dst) == TDM_ERR_FORMAT, "codec 3");
        memcpy(b2, buf, len);
        b2[6] = c.type == TDM_KV_CODEC_TYPE_F16 ? 2 : 1;
        CHECK(decode_copy(ctx, b2, len, 0, &dst) == TDM_ERR_FORMAT, "the other codec");
        free(b2);
        /* Other models and layouts. */
        const tdm_kv_layout_t others[] = {
            {{l->fingerprint.lo ^ 1, l->fingerprint.hi}, l->n_layer, l->n_head_kv, l->head_dim, 16},
            {{l->fingerprint.lo, l->fingerprint.hi ^ 8}, l->n_layer, l->n_head_kv, l->head_dim, 16},
            {l->fingerprint, l->n_layer + 1, l->n_head_kv, l->head_dim, 16},
            {l->fingerprint, l->n_layer, l->n_head_kv * 2, l->head_dim / 2, 16},
            {l->fingerprint, l->n_layer, l->n_head_kv, l->head_dim, 32},
        };
        for (size_t o = 0; o < sizeof(others) / sizeof(others[0]); o++) {
            tdm_kv_codec_ctx_t *octx;
            blk_t odst;
            CHECK(tdm_kv_codec_ctx_create(&others[o], &octx) == TDM_OK, "other ctx");
            blk_init(&odst, &others[o]);
            CHECK(decode_copy(octx, buf, len, 0, &odst) == TDM_ERR_FORMAT,
                  "%s: layout %zu accepted", codec_names[ci], o);
            blk_free(&odst);
            tdm_kv_codec_ctx_destroy(octx);
        }
        /* Encode argument errors. */
        size_t out_len = 12345;
        CHECK(tdm_kv_codec_encode(ctx, c, (const uint16_t *const *)src.k,
                                  (const uint16_t *const *)src.v, 0, buf, cap,
                                  &out_len) == TDM_ERR_INVALID &&
                  out_len == 12345,
              "0 tokens");
        CHECK(tdm_kv_codec_encode(ctx, c, (const uint16_t *const *)src.k,
                                  (const uint16_t *const *)src.v, 17, buf, cap,
                                  &out_len) == TDM_ERR_INVALID,
              "17 tokens");
        CHECK(tdm_kv_codec_encode(ctx, c, (const uint16_t *const *)src.k,
                                  (const uint16_t *const *)src.v, 16, buf, HDR + 10,
                                  &out_len) == TDM_ERR_INVALID,
              "small buffer");
        free(buf);
    }

    /* A q8 scale that is not finite, with a correct checksum. */
    tdm_kv_codec_t q8 = codec_of("q8");
    size_t cap = tdm_kv_codec_max_size(l, q8), len;
    uint8_t *buf = malloc(cap);
    CHECK(tdm_kv_codec_encode(ctx, q8, (const uint16_t *const *)src.k,
                              (const uint16_t *const *)src.v, 4, buf, cap, &len) == TDM_OK,
          "encode");
    size_t kv_dim = (size_t)l->n_head_kv * (size_t)l->head_dim;
    size_t tensor = 4 * (kv_dim + 2 * (size_t)l->n_head_kv);
    uint8_t *scale = buf + HDR + 3 * tensor + 4 * kv_dim + 2; /* layer 1 V, second scale */
    scale[0] = 0x00;
    scale[1] = 0x7c; /* +inf */
    put64(buf + 56, XXH3_64bits(buf + HDR, len - HDR));
    for (size_t i = 0; i < blk_count(&dst, l); i++)
        dst.data[i] = 0x1234;
    CHECK(decode_copy(ctx, buf, len, 4, &dst) == TDM_ERR_FORMAT, "infinite scale");
    bool untouched = true;
    for (size_t i = 0; i < blk_count(&dst, l); i++)
        untouched &= dst.data[i] == 0x1234;
    CHECK(untouched, "a refused payload writes nothing");
    /* A consistent header for 3 tokens with a 4-token body: refused. */
    put32(buf + 40, 3);
    CHECK(decode_copy(ctx, buf, len, 0, &dst) == TDM_ERR_FORMAT, "n_tokens 3 with 4 rows");
    free(buf);
    tdm_log_set_level(level);
    blk_free(&src);
    blk_free(&dst);
    tdm_kv_codec_ctx_destroy(ctx);
}

/* A refusal logs exactly one warning line, from "kvcodec". */
static void test_one_line(const tdm_kv_layout_t *l)
{
    tdm_kv_codec_ctx_t *ctx;
    CHECK(tdm_kv_codec_ctx_create(l, &ctx) == TDM_OK, "ctx");
    blk_t src;
    blk_init(&src, l);
    blk_fill(&src, l);
    tdm_kv_codec_t c = codec_of("q8+lz4");
    size_t cap = tdm_kv_codec_max_size(l, c), len;
    uint8_t *buf = malloc(cap);
    CHECK(tdm_kv_codec_encode(ctx, c, (const uint16_t *const *)src.k,
                              (const uint16_t *const *)src.v, 16, buf, cap, &len) == TDM_OK,
          "encode");
    buf[HDR + 3] ^= 1; /* checksum */
    tdm_log_level_t level = tdm_log_get_level();
    tdm_log_set_level(TDM_LOG_LEVEL_WARN);
    char path[] = "/tmp/tandem-kvcodec-log-XXXXXX";
    int fd = mkstemp(path);
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    tdm_status_t st = tdm_kv_codec_decode(ctx, buf, len, 16, src.k, src.v, NULL);
    buf[HDR + 3] ^= 1;
    buf[0] = 'X';
    tdm_status_t st2 = tdm_kv_codec_decode(ctx, buf, len, 16, src.k, src.v, NULL);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    tdm_log_set_level(level);
    char log[2048] = "";
    ssize_t n = pread(fd, log, sizeof(log) - 1, 0);
    close(fd);
    unlink(path);
    log[n > 0 ? n : 0] = '\0';
    int lines = 0;
    for (char *p = log; *p; p++)
        lines += *p == '\n';
    CHECK(st == TDM_ERR_FORMAT && st2 == TDM_ERR_FORMAT, "refused");
    CHECK(lines == 2 && strstr(log, "kvcodec") != NULL && strstr(log, "checksum") != NULL &&
              strstr(log, "magic") != NULL,
          "one line per refusal, naming the cause:\n%s", log);
    free(buf);
    blk_free(&src);
    tdm_kv_codec_ctx_destroy(ctx);
}

/* ------------------------------------------------------------- engine */

typedef struct hook {
    tdm_kv_codec_ctx_t *ctx;
    tdm_kv_codec_t codec;
    bool codec_on;
    uint8_t *buf;
    size_t cap;
    int calls;
    int32_t seen[64];  /* n_tokens per block */
    tdm_status_t fail; /* returned from the second call when not OK */
} hook_t;

static tdm_status_t hook_fn(void *user, int32_t block, int32_t n_tokens, uint16_t *const *k,
                            uint16_t *const *v)
{
    hook_t *h = user;
    if (block < 64)
        h->seen[block] = n_tokens;
    h->calls++;
    if (h->fail != TDM_OK && h->calls == 2)
        return h->fail;
    if (!h->codec_on)
        return TDM_OK;
    size_t len;
    tdm_status_t st =
        tdm_kv_codec_encode(h->ctx, h->codec, (const uint16_t *const *)k,
                            (const uint16_t *const *)v, n_tokens, h->buf, h->cap, &len);
    return st != TDM_OK ? st : tdm_kv_codec_decode(h->ctx, h->buf, len, n_tokens, k, v, NULL);
}

static double rel_l2(const float *a, const float *b, size_t n)
{
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        r += (double)b[i] * b[i];
    }
    return r > 0 ? sqrt(d / r) : 0;
}

/* With f16 (and f16+lz4, and a hook that does nothing) the logits equal
 * tdm_engine_eval's bit for bit; with q8 they are close. */
static void test_engine(const char *model, const int32_t *toks, size_t n, size_t n_ctx,
                        double q8_bound, const char *label)
{
    tdm_engine_config_t c;
    tdm_engine_config_default(&c);
    c.model_path = model;
    c.max_model_len = 256;
    c.num_blocks = 40;
    c.threads = 2;
    c.max_num_batched_tokens = 64; /* the halves are evaluated in several chunks */
    tdm_engine_t *e = NULL;
    char err[256];
    CHECK(tdm_engine_create(&c, err, sizeof(err), &e) == TDM_OK, "engine: %s", err);
    if (e == NULL)
        return;
    const tdm_model_hparams_t *hp = tdm_model_hparams(tdm_engine_model(e));
    tdm_kv_layout_t l;
    tdm_engine_kv_layout(e, &l);
    tdm_hash128_t fp = tdm_model_fingerprint(tdm_engine_model(e));
    CHECK(l.n_layer == hp->n_layer && l.n_head_kv == hp->n_head_kv && l.head_dim == hp->head_dim &&
              l.block_size == 16 && l.fingerprint.lo == fp.lo && l.fingerprint.hi == fp.hi,
          "engine layout");
    size_t V = (size_t)hp->n_vocab;
    float *ref = malloc(n * V * sizeof(float)), *got = malloc(n * V * sizeof(float));
    hook_t h = {0};
    CHECK(tdm_kv_codec_ctx_create(&l, &h.ctx) == TDM_OK, "ctx");
    h.cap = tdm_kv_codec_max_size(&l, codec_of("q8")) + tdm_kv_codec_max_size(&l, codec_of("f16"));
    h.buf = malloc(h.cap);
    CHECK(tdm_engine_eval(e, toks, n, ref) == TDM_OK, "eval");

    CHECK(tdm_engine_eval_split(e, toks, n, n_ctx, hook_fn, &h, got) == TDM_OK, "split, no-op");
    CHECK(memcmp(ref, got, n * V * sizeof(float)) == 0, "%s: split without codec == eval", label);
    int32_t nb = (int32_t)((n_ctx + 15) / 16);
    CHECK(h.calls == nb, "%d blocks visited, expected %d", h.calls, nb);
    for (int32_t b = 0; b < nb && b < 64; b++) {
        int32_t want = b < nb - 1 || n_ctx % 16 == 0 ? 16 : (int32_t)(n_ctx % 16);
        CHECK(h.seen[b] == want, "block %d: %d tokens, expected %d", b, h.seen[b], want);
    }
    const char *lossless[] = {"f16", "f16+lz4"};
    for (int i = 0; i < 2; i++) {
        h.codec = codec_of(lossless[i]);
        h.codec_on = true;
        memset(got, 0, n * V * sizeof(float));
        CHECK(tdm_engine_eval_split(e, toks, n, n_ctx, hook_fn, &h, got) == TDM_OK, "split");
        CHECK(memcmp(ref, got, n * V * sizeof(float)) == 0, "%s: %s logits == no codec", label,
              lossless[i]);
    }
    const char *lossy[] = {"q8", "q8+lz4"};
    double rel[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        h.codec = codec_of(lossy[i]);
        CHECK(tdm_engine_eval_split(e, toks, n, n_ctx, hook_fn, &h, got) == TDM_OK, "split");
        CHECK(memcmp(ref, got, n_ctx * V * sizeof(float)) == 0, "first half unchanged");
        rel[i] = rel_l2(got + n_ctx * V, ref + n_ctx * V, (n - n_ctx) * V);
        CHECK(rel[i] > 0 && rel[i] < q8_bound, "%s: %s logits rel L2 %.3g (bound %.3g)", label,
              lossy[i], rel[i], q8_bound);
    }
    CHECK(rel[0] == rel[1], "q8 and q8+lz4 give the same logits");
    printf("%s: q8 KV on the first %zu of %zu tokens: logits rel L2 %.3g\n", label, n_ctx, n,
           rel[0]);

    /* A failing hook stops the evaluation, returns its status, leaks nothing. */
    h.fail = TDM_ERR_FORMAT;
    h.calls = 0;
    CHECK(tdm_engine_eval_split(e, toks, n, n_ctx, hook_fn, &h, got) == TDM_ERR_FORMAT,
          "hook error returned");
    CHECK(h.calls == 2, "stopped after the failing call (%d)", h.calls);
    tdm_engine_stats_t st;
    tdm_engine_get_stats(e, &st);
    CHECK(st.num_free_blocks == st.num_blocks, "blocks released: %d of %d", st.num_free_blocks,
          st.num_blocks);
    CHECK(tdm_engine_eval_split(e, toks, n, n + 1, hook_fn, &h, got) == TDM_ERR_INVALID,
          "n_ctx > n");
    free(h.buf);
    tdm_kv_codec_ctx_destroy(h.ctx);
    free(ref);
    free(got);
    tdm_engine_destroy(e);
}

int main(void)
{
    tdm_log_set_level(TDM_LOG_LEVEL_WARN);
    test_names();
    /* head_dim 64 (SmolLM2's; the SIMD q8 path where the CPU has it) and
     * 24 (portable code with a remainder) */
    const tdm_kv_layout_t layouts[] = {layout_make(3, 3, 64), layout_make(2, 2, 24)};
    for (size_t i = 0; i < 2; i++) {
        test_roundtrip(&layouts[i]);
        test_q8_bound(&layouts[i]);
        test_lz4(&layouts[i]);
        test_corrupt(&layouts[i]);
    }
    test_one_line(&layouts[0]);

    char path[256];
    if (t_mkmodel(path, sizeof(path),
                  "--n-embd 128 --n-ff 256 --n-layer 3 --n-head 4 --n-head-kv 2 --n-vocab 600 "
                  "--type q8_0 --seed 7") != 0) {
        CHECK(0, "mkmodel failed");
    } else {
        int32_t toks[120];
        rng = 7;
        for (int i = 0; i < 120; i++)
            toks[i] = (int32_t)(rnd() % 600);
        test_engine(path, toks, 120, 40, 0.05, "synthetic model, split at 40");
        test_engine(path, toks, 100, 64, 0.05, "synthetic model, split at 64");
        unlink(path);
    }

    const char *model = t_default_model();
    if (model != NULL) {
        /* Real KV from real text: the model's own tokenizer on a paragraph. */
        tdm_backend_t *be = NULL;
        tdm_model_t *m = NULL;
        char err[256];
        CHECK(tdm_backend_cpu_create(1, TDM_CPU_ISA_AUTO, &be) == TDM_OK, "backend");
        CHECK(tdm_model_load(model, be, err, sizeof(err), &m) == TDM_OK, "load: %s", err);
        const char *text =
            "The GNU General Public License is a free, copyleft license for software and other "
            "kinds of works. The licenses for most software and other practical works are "
            "designed to take away your freedom to share and change the works. By contrast, the "
            "GNU General Public License is intended to guarantee your freedom to share and change "
            "all versions of a program, to make sure it remains free software for all its users.";
        int32_t toks[256];
        size_t nt = 0;
        CHECK(m != NULL &&
                  tdm_tokenizer_encode(tdm_model_tokenizer(m), text, strlen(text), false, toks, 256,
                                       &nt) == TDM_OK &&
                  nt >= 64,
              "tokenize: %zu", nt);
        tdm_model_destroy(m);
        tdm_backend_destroy(be);
        if (nt >= 64)
            test_engine(model, toks, nt, 48, 0.02, "SmolLM2-135M-Instruct Q4_1");
    } else {
        printf("default model not present: the real-model check is skipped (run `make model`)\n");
    }
    return t_finish();
}
