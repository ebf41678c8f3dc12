/* libFuzzer target: tdm_kv_codec_decode on arbitrary bytes.
 *
 * Input: one mode byte, then the payload. Mode bit 0: write the right
 * XXH3-64 into the payload's checksum field first, so that mutated bodies
 * get past the checksum into LZ4 and q8 decoding. Bit 1: the second layout
 * (head_dim 8: the portable q8 code; the first, head_dim 32, takes the SIMD
 * code where the CPU has it). Bit 2: ask for the payload's own token count
 * instead of any.
 *
 * Checks: a refusal is TDM_ERR_FORMAT and writes nothing; a success reports
 * 1..block_size rows and writes no more (the row buffers are exactly one
 * block, so ASan sees any write past them), and those rows survive an f16
 * round trip bit for bit.
 *
 * The seeds in tests/fuzz/corpus/kv_codec/ are valid payloads of both
 * layouts (mode byte 0x01 or 0x03) for each codec, full and partial blocks,
 * made with tdm_kv_codec_encode from random f16 rows. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "tandem/kv_codec.h"
#include "tandem/log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define N_LAYER    2
#define BLOCK_SIZE 16
#define FILL       0x5a5a

typedef struct fuzz_layout {
    tdm_kv_codec_ctx_t *ctx;
    size_t rows; /* block_size * kv_dim */
    uint16_t *k[N_LAYER], *v[N_LAYER];
    uint16_t *k2[N_LAYER], *v2[N_LAYER]; /* the f16 round trip */
    uint8_t *payload;
    size_t cap;
} fuzz_layout_t;

static fuzz_layout_t layouts[2];

static void setup(void)
{
    tdm_log_set_level(TDM_LOG_LEVEL_ERROR); /* refusals are the normal case here */
    const int32_t head_dim[2] = {32, 8};
    for (int i = 0; i < 2; i++) {
        tdm_kv_layout_t l = {.fingerprint = {0x0123456789abcdefull, 0xfedcba9876543210ull},
                             .n_layer = N_LAYER,
                             .n_head_kv = 2,
                             .head_dim = head_dim[i],
                             .block_size = BLOCK_SIZE};
        fuzz_layout_t *f = &layouts[i];
        if (tdm_kv_codec_ctx_create(&l, &f->ctx) != TDM_OK)
            abort();
        f->rows = (size_t)BLOCK_SIZE * 2 * (size_t)head_dim[i];
        for (int il = 0; il < N_LAYER; il++) {
            f->k[il] = malloc(f->rows * sizeof(uint16_t));
            f->v[il] = malloc(f->rows * sizeof(uint16_t));
            f->k2[il] = malloc(f->rows * sizeof(uint16_t));
            f->v2[il] = malloc(f->rows * sizeof(uint16_t));
        }
        tdm_kv_codec_t f16 = {TDM_KV_CODEC_TYPE_F16, false};
        f->cap = tdm_kv_codec_max_size(&l, f16);
        f->payload = malloc(f->cap);
    }
}

static void fill(fuzz_layout_t *f)
{
    for (int il = 0; il < N_LAYER; il++)
        for (size_t i = 0; i < f->rows; i++)
            f->k[il][i] = f->v[il][i] = FILL;
}

static size_t rows_touched(const fuzz_layout_t *f)
{
    size_t touched = 0; /* one past the last row written */
    for (int il = 0; il < N_LAYER; il++)
        for (size_t i = 0; i < f->rows; i++)
            if (f->k[il][i] != FILL || f->v[il][i] != FILL)
                touched = i + 1 > touched ? i + 1 : touched;
    return touched;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    if (!ready) {
        setup();
        ready = 1;
    }
    if (size == 0)
        return 0;
    uint8_t mode = data[0];
    fuzz_layout_t *f = &layouts[(mode >> 1) & 1];
    size_t len = size - 1;
    uint8_t *p = malloc(len > 0 ? len : 1); /* exactly len bytes: ASan sees overreads */
    memcpy(p, data + 1, len);
    if ((mode & 1) && len >= TDM_KV_PAYLOAD_HEADER_SIZE) {
        uint64_t sum =
            XXH3_64bits(p + TDM_KV_PAYLOAD_HEADER_SIZE, len - TDM_KV_PAYLOAD_HEADER_SIZE);
        for (int i = 0; i < 8; i++)
            p[56 + i] = (uint8_t)(sum >> (8 * i));
    }
    int32_t want = 0;
    if ((mode & 4) && len >= 44)
        want = p[40] >= 1 && p[40] <= BLOCK_SIZE ? p[40] : 0;
    fill(f);
    int32_t n_tokens = -1;
    tdm_status_t st = tdm_kv_codec_decode(f->ctx, p, len, want, f->k, f->v, &n_tokens);
    if (st != TDM_OK) {
        if (st != TDM_ERR_FORMAT || n_tokens != -1 || rows_touched(f) != 0)
            abort(); /* refused: the right status, nothing written */
        free(p);
        return 0;
    }
    if (n_tokens < 1 || n_tokens > BLOCK_SIZE || (want != 0 && n_tokens != want))
        abort();
    size_t kv_dim = f->rows / BLOCK_SIZE;
    if (rows_touched(f) > (size_t)n_tokens * kv_dim)
        abort(); /* rows past n_tokens are not written */
    /* What decoded survives f16 unchanged. */
    size_t plen;
    tdm_kv_codec_t f16 = {TDM_KV_CODEC_TYPE_F16, false};
    if (tdm_kv_codec_encode(f->ctx, f16, (const uint16_t *const *)f->k,
                            (const uint16_t *const *)f->v, n_tokens, f->payload, f->cap,
                            &plen) != TDM_OK ||
        tdm_kv_codec_decode(f->ctx, f->payload, plen, n_tokens, f->k2, f->v2, NULL) != TDM_OK)
        abort();
    size_t used = (size_t)n_tokens * kv_dim * sizeof(uint16_t);
    for (int il = 0; il < N_LAYER; il++)
        if (memcmp(f->k[il], f->k2[il], used) != 0 || memcmp(f->v[il], f->v2[il], used) != 0)
            abort();
    free(p);
    return 0;
}
