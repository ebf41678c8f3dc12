/* tandem: KV block codecs, the payload a KV block travels in between nodes.
 *
 * A KV block is block_size token positions of every layer's K and V rows,
 * each row kv_dim = n_head_kv * head_dim f16 values, as the paged cache
 * holds them (include/tandem/kernels.h). A block is encoded into one
 * self-describing payload and decoded back into cache rows on another node.
 *
 * Codecs (docs/kv-codec.md has the rationale and the measured figures):
 *   f16     the cache bytes as they are: lossless.
 *   q8      per token and per head: s = absmax / 127 rounded UP to f16,
 *           q = round-to-nearest-even(x / s) in [-127, 127] as int8;
 *           decoded x' = f16(q * s). |x - q * s| <= s / 2 (then one more
 *           f16 rounding of q * s). 2.0x smaller than f16 minus the scales
 *           (1.94x at head_dim 64).
 *   +lz4    either one followed by LZ4 (one LZ4 block over the whole body).
 *           The LZ4 body is kept only when it is smaller than the raw body;
 *           otherwise the raw body is stored and the LZ4 flag is cleared, so
 *           a payload is never larger than header + raw body.
 * Names: "f16", "q8", "f16+lz4", "q8+lz4".
 *
 * Payload format, version 1 (all integers little endian; 64-byte header):
 *
 *   off size  field
 *    0   4    magic "TDKV" (bytes 0x54 0x44 0x4b 0x56)
 *    4   2    u16 version = 1
 *    6   1    u8 codec: 1 = f16, 2 = q8
 *    7   1    u8 flags: bit 0 = body is LZ4-compressed; other bits 0
 *    8  16    model fingerprint: u64 lo, u64 hi (tdm_hash128_t)
 *   24   4    u32 n_layer
 *   28   4    u32 n_head_kv
 *   32   4    u32 head_dim
 *   36   4    u32 block_size
 *   40   4    u32 n_tokens (1..block_size; the rows in this payload)
 *   44   4    u32 body_len: bytes of the body as stored (after LZ4)
 *   48   4    u32 raw_len: bytes of the body before LZ4 (= body_len without)
 *   52   4    u32 reserved = 0
 *   56   8    u64 checksum: XXH3-64 (seed 0) of the body as stored
 *   64        body (body_len bytes); the payload is exactly 64 + body_len
 *
 * Raw body: for each layer 0..n_layer-1, K then V, each one tensor of
 * n_tokens rows of kv_dim values (rows of token 0.. in order, heads in
 * order within a row):
 *   f16: u16 x[n_tokens][kv_dim]                  (2 * n_tokens * kv_dim)
 *   q8:  i8 q[n_tokens][kv_dim], then f16 s[n_tokens][n_head_kv]
 *                                    (n_tokens * (kv_dim + 2 * n_head_kv))
 * Only n_tokens rows travel; the rows of a partial block past n_tokens are
 * neither encoded nor written by decode.
 *
 * Decode checks every header field against the expected layout (magic,
 * version, codec, flags, fingerprint, n_layer, n_head_kv, head_dim,
 * block_size, n_tokens, reserved, raw_len from the codec and n_tokens,
 * body_len, the payload length), then the checksum, then LZ4, then (q8)
 * that every scale is finite, and only then writes rows. Any mismatch is
 * TDM_ERR_FORMAT with one warning logged (module "kvcodec") naming it; the
 * rows are untouched. No input makes it read or write out of bounds.
 *
 * Threads: a context is used by one thread at a time. Encoding and decoding
 * allocate nothing; the context holds the one scratch buffer LZ4 needs. */
#ifndef TANDEM_KV_CODEC_H
#define TANDEM_KV_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/hash.h"
#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_KV_PAYLOAD_MAGIC       "TDKV"
#define TDM_KV_PAYLOAD_VERSION     1
#define TDM_KV_PAYLOAD_HEADER_SIZE 64

/* What a payload must match: the model and the shape of a block. */
typedef struct tdm_kv_layout {
    tdm_hash128_t fingerprint; /* tdm_model_fingerprint() */
    int32_t n_layer;
    int32_t n_head_kv;
    int32_t head_dim;
    int32_t block_size; /* token positions per block */
} tdm_kv_layout_t;

typedef enum tdm_kv_codec_type {
    TDM_KV_CODEC_TYPE_F16 = 1, /* lossless */
    TDM_KV_CODEC_TYPE_Q8 = 2,  /* int8, one f16 scale per token per head */
} tdm_kv_codec_type_t;

typedef struct tdm_kv_codec {
    tdm_kv_codec_type_t type;
    bool lz4; /* LZ4 after the codec */
} tdm_kv_codec_t;

/* "f16", "q8", "f16+lz4", "q8+lz4" -> codec; TDM_ERR_INVALID otherwise. */
tdm_status_t tdm_kv_codec_parse(const char *name, tdm_kv_codec_t *out);
/* The codec's name as parse takes it (a static string). */
const char *tdm_kv_codec_name(tdm_kv_codec_t codec);

/* Bytes of n_tokens rows of every layer's K and V in f16: the cache bytes
 * a block of n_tokens holds (the unit of the throughput figures). */
size_t tdm_kv_layout_f16_bytes(const tdm_kv_layout_t *layout, int32_t n_tokens);
/* Largest payload of a block of this layout with this codec (header
 * included): what a buffer given to encode needs. */
size_t tdm_kv_codec_max_size(const tdm_kv_layout_t *layout, tdm_kv_codec_t codec);

typedef struct tdm_kv_codec_ctx tdm_kv_codec_ctx_t;

/* A context for one layout (copied). TDM_ERR_INVALID if a dimension is not
 * positive or a block's f16 bytes exceed 1 GiB. */
tdm_status_t tdm_kv_codec_ctx_create(const tdm_kv_layout_t *layout, tdm_kv_codec_ctx_t **out);
void tdm_kv_codec_ctx_destroy(tdm_kv_codec_ctx_t *ctx); /* accepts NULL */
const tdm_kv_layout_t *tdm_kv_codec_ctx_layout(const tdm_kv_codec_ctx_t *ctx);

/* Encodes rows 0..n_tokens-1 (1..block_size) of a block: k[layer] and
 * v[layer] point to the block's K and V rows, [n_tokens][kv_dim] f16 each
 * (caller's memory, only read). Writes the payload into out[0..cap) and its
 * length into *out_len. TDM_ERR_INVALID (logged) if n_tokens is out of
 * range or cap is under header + raw body for n_tokens (max_size is always
 * enough). */
tdm_status_t tdm_kv_codec_encode(tdm_kv_codec_ctx_t *ctx, tdm_kv_codec_t codec,
                                 const uint16_t *const *k, const uint16_t *const *v,
                                 int32_t n_tokens, void *out, size_t cap, size_t *out_len);

/* Verifies payload[0..len) (any codec) against the context's layout and,
 * if it holds want_tokens rows (0: any count 1..block_size), writes them
 * into k[layer] and v[layer] ([n_tokens][kv_dim] f16 each) and the count
 * into *n_tokens (may be NULL). A bad payload is TDM_ERR_FORMAT, logged
 * once, with nothing written; want_tokens out of 0..block_size is
 * TDM_ERR_INVALID. */
tdm_status_t tdm_kv_codec_decode(tdm_kv_codec_ctx_t *ctx, const void *payload, size_t len,
                                 int32_t want_tokens, uint16_t *const *k, uint16_t *const *v,
                                 int32_t *n_tokens);

#ifdef __cplusplus
}
#endif

#endif
