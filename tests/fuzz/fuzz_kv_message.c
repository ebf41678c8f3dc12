/* libFuzzer target: the KV store's message decoders (kvstore/kvproto.h) on
 * arbitrary bytes. The first byte picks the decoder (mod 6):
 *   0 Hello  1 HelloReply  2 Request  3 PutItem  4 GetItem  5 Reply
 * and the rest is the message; for a PutItem the next byte is the header
 * length and what follows the header stands for the payload (its length
 * is what the decoder checks). Every part is copied into a buffer of its
 * exact size, so ASan catches a decoder that reads past its length. A
 * message that decodes is checked against the decoder's promises (bounds,
 * key sizes, known operations; abort() if one fails), read in full,
 * packed again, and freed with kvp_free().
 *
 * Seeds (tests/fuzz/corpus/kv_message/) are valid messages of each type,
 * written by this target itself:
 *   TANDEM_FUZZ_KV_WRITE_SEEDS=DIR build-asan/bin/fuzz_kv_message */
#include "../../kvstore/kvproto.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

enum { F_HELLO, F_HELLO_REPLY, F_REQUEST, F_PUT_ITEM, F_GET_ITEM, F_REPLY, F_N };

static volatile uint64_t sink; /* keeps the reads of touch() */

/* Reads every byte of a range so ASan checks it. */
static void touch(const void *p, size_t n)
{
    const volatile uint8_t *b = p;
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += b[i];
    sink += sum;
}

static void touch_str(const char *s)
{
    if (s == NULL)
        abort(); /* protobuf-c gives "" for an absent string */
    touch(s, strlen(s) + 1);
}

/* Packs a decoded message again: what came in must go out. */
static void repack(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n ? n : 1);
    if (buf == NULL)
        return;
    if (protobuf_c_message_pack(m, buf) != n)
        abort();
    free(buf);
}

static bool op_ok(int op)
{
    return op >= TANDEM__KV__OP__OP_PUT && op <= TANDEM__KV__OP__OP_STATS;
}

/* A copy of n bytes in a buffer of exactly n bytes (NULL when n is 0). */
static uint8_t *exact(const uint8_t *p, size_t n)
{
    if (n == 0)
        return NULL;
    uint8_t *c = malloc(n);
    if (c == NULL)
        abort();
    memcpy(c, p, n);
    return c;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    int which = data[0] % F_N;
    const uint8_t *rest = data + 1;
    size_t n = size - 1;
    char err[160];
    if (which == F_PUT_ITEM) {
        size_t hl = n > 0 ? rest[0] : 0;
        if (hl > (n > 0 ? n - 1 : 0))
            hl = n > 0 ? n - 1 : 0;
        size_t payload_len = n > 0 ? n - 1 - hl : 0;
        uint8_t *hdr = exact(rest + 1, hl);
        Tandem__Kv__PutItem *m;
        if (kvp_decode_put_item(hdr, hl, payload_len, &m, err, sizeof(err))) {
            if (m->key.len != KVP_KEY_BYTES || m->count == 0 || m->count > KVP_MAX_KEYS ||
                m->index >= m->count || m->length != payload_len || payload_len == 0)
                abort();
            touch(m->key.data, m->key.len);
            (void)kvp_key_unpack(m->key.data);
            repack(&m->base);
            kvp_free(m);
        }
        free(hdr);
        return 0;
    }
    uint8_t *buf = exact(rest, n);
    switch (which) {
    case F_HELLO: {
        Tandem__Kv__Hello *m;
        if (kvp_decode_hello(buf, n, &m, err, sizeof(err))) {
            if (m->token.len > KVP_MAX_TOKEN || strlen(m->name) > 128)
                abort();
            touch(m->token.data, m->token.len);
            touch_str(m->name);
            repack(&m->base);
            kvp_free(m);
        }
        break;
    }
    case F_HELLO_REPLY: {
        Tandem__Kv__HelloReply *m;
        if (kvp_decode_hello_reply(buf, n, &m, err, sizeof(err))) {
            if (m->status == TANDEM__KV__STATUS__S_OK &&
                (m->max_keys == 0 || m->max_inflight == 0 || m->max_block_bytes == 0))
                abort();
            touch_str(m->message);
            (void)kvp_status_name((int)m->status);
            repack(&m->base);
            kvp_free(m);
        }
        break;
    }
    case F_REQUEST: {
        Tandem__Kv__Request *m;
        if (kvp_decode_request(buf, n, &m, err, sizeof(err))) {
            size_t nk = m->keys.len / KVP_KEY_BYTES;
            if (!op_ok((int)m->op) || m->op == TANDEM__KV__OP__OP_PUT ||
                m->keys.len % KVP_KEY_BYTES != 0 || nk > KVP_MAX_KEYS ||
                (m->op == TANDEM__KV__OP__OP_STATS) != (nk == 0))
                abort();
            for (size_t i = 0; i < nk; i++)
                (void)kvp_key_unpack(m->keys.data + i * KVP_KEY_BYTES);
            touch(m->keys.data, m->keys.len);
            (void)kvp_op_name((int)m->op);
            repack(&m->base);
            kvp_free(m);
        }
        break;
    }
    case F_GET_ITEM: {
        Tandem__Kv__GetItem *m;
        if (kvp_decode_get_item(buf, n, &m, err, sizeof(err))) {
            if (m->index >= KVP_MAX_KEYS)
                abort();
            repack(&m->base);
            kvp_free(m);
        }
        break;
    }
    case F_REPLY: {
        Tandem__Kv__Reply *m;
        if (kvp_decode_reply(buf, n, &m, err, sizeof(err))) {
            if (!op_ok((int)m->op) || m->n_item_status > KVP_MAX_KEYS ||
                m->n_item_length > KVP_MAX_KEYS || m->present.len * 8 > KVP_MAX_KEYS + 7)
                abort();
            touch(m->item_status, m->n_item_status * sizeof(*m->item_status));
            touch(m->item_length, m->n_item_length * sizeof(*m->item_length));
            touch(m->present.data, m->present.len);
            touch_str(m->message);
            if (m->stats != NULL)
                touch(m->stats, sizeof(*m->stats));
            for (size_t i = 0; i < m->n_item_status; i++)
                (void)kvp_status_name((int)m->item_status[i]);
            repack(&m->base);
            kvp_free(m);
        }
        break;
    }
    default: break;
    }
    free(buf);
    return 0;
}

/* ---- seeds ---- */

static void write_seed(const char *dir, const char *name, int which, const uint8_t *msg, size_t len,
                       size_t payload_len)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fputc(which, f);
    if (which == F_PUT_ITEM)
        fputc((int)len, f);
    fwrite(msg, 1, len, f);
    for (size_t i = 0; i < payload_len; i++)
        fputc((int)(i * 7 + 1) & 0xff, f);
    fclose(f);
}

static void write_seeds(const char *dir)
{
    uint8_t buf[4096], keys[3 * KVP_KEY_BYTES];
    for (int i = 0; i < 3; i++)
        kvp_key_pack((tdm_hash128_t){.lo = 0x1111u * (uint64_t)(i + 1), .hi = 0xabcdefu},
                     keys + i * KVP_KEY_BYTES);

    Tandem__Kv__Hello h = TANDEM__KV__HELLO__INIT;
    h.version = KVP_VERSION;
    h.token.data = (uint8_t *)"cluster-secret";
    h.token.len = 14;
    h.name = "prefill-0";
    write_seed(dir, "hello", F_HELLO, buf, tandem__kv__hello__pack(&h, buf), 0);

    Tandem__Kv__HelloReply hr = TANDEM__KV__HELLO_REPLY__INIT;
    hr.version = KVP_VERSION;
    hr.max_block_bytes = 4u << 20;
    hr.max_keys = KVP_MAX_KEYS;
    hr.max_inflight = 256;
    write_seed(dir, "hello_reply_ok", F_HELLO_REPLY, buf, tandem__kv__hello_reply__pack(&hr, buf),
               0);
    Tandem__Kv__HelloReply hd = TANDEM__KV__HELLO_REPLY__INIT;
    hd.version = KVP_VERSION;
    hd.status = TANDEM__KV__STATUS__S_DENIED;
    hd.message = "wrong cluster token";
    write_seed(dir, "hello_reply_denied", F_HELLO_REPLY, buf,
               tandem__kv__hello_reply__pack(&hd, buf), 0);

    Tandem__Kv__Request rq = TANDEM__KV__REQUEST__INIT;
    rq.id = 17;
    rq.op = TANDEM__KV__OP__OP_GET;
    rq.keys.data = keys;
    rq.keys.len = sizeof(keys);
    write_seed(dir, "request_get", F_REQUEST, buf, tandem__kv__request__pack(&rq, buf), 0);
    rq.op = TANDEM__KV__OP__OP_LOOKUP;
    write_seed(dir, "request_lookup", F_REQUEST, buf, tandem__kv__request__pack(&rq, buf), 0);
    rq.op = TANDEM__KV__OP__OP_STATS;
    rq.keys.len = 0;
    write_seed(dir, "request_stats", F_REQUEST, buf, tandem__kv__request__pack(&rq, buf), 0);

    Tandem__Kv__PutItem pi = TANDEM__KV__PUT_ITEM__INIT;
    pi.id = 18;
    pi.index = 1;
    pi.count = 3;
    pi.key.data = keys + KVP_KEY_BYTES;
    pi.key.len = KVP_KEY_BYTES;
    pi.length = 64;
    pi.lease_ms = 30000;
    write_seed(dir, "put_item", F_PUT_ITEM, buf, tandem__kv__put_item__pack(&pi, buf), 64);

    Tandem__Kv__GetItem gi = TANDEM__KV__GET_ITEM__INIT;
    gi.id = 17;
    gi.index = 2;
    write_seed(dir, "get_item", F_GET_ITEM, buf, tandem__kv__get_item__pack(&gi, buf), 0);

    Tandem__Kv__Status st[3] = {TANDEM__KV__STATUS__S_OK, TANDEM__KV__STATUS__S_NOT_FOUND,
                                TANDEM__KV__STATUS__S_OK};
    uint64_t lens[3] = {65536, 0, 4096};
    Tandem__Kv__Reply rg = TANDEM__KV__REPLY__INIT;
    rg.id = 17;
    rg.op = TANDEM__KV__OP__OP_GET;
    rg.n_item_status = 3;
    rg.item_status = st;
    rg.n_item_length = 3;
    rg.item_length = lens;
    write_seed(dir, "reply_get", F_REPLY, buf, tandem__kv__reply__pack(&rg, buf), 0);
    uint8_t present = 0x5;
    Tandem__Kv__Reply rl = TANDEM__KV__REPLY__INIT;
    rl.id = 19;
    rl.op = TANDEM__KV__OP__OP_LOOKUP;
    rl.n_leading = 1;
    rl.present.data = &present;
    rl.present.len = 1;
    write_seed(dir, "reply_lookup", F_REPLY, buf, tandem__kv__reply__pack(&rl, buf), 0);
    Tandem__Kv__Stats ss = TANDEM__KV__STATS__INIT;
    ss.blocks = 12;
    ss.bytes_used = 1u << 20;
    ss.capacity = 1u << 30;
    ss.bytes_free = (1u << 30) - (1u << 20);
    ss.puts = 12;
    ss.refused = 2;
    Tandem__Kv__Reply rs = TANDEM__KV__REPLY__INIT;
    rs.id = 20;
    rs.op = TANDEM__KV__OP__OP_STATS;
    rs.stats = &ss;
    write_seed(dir, "reply_stats", F_REPLY, buf, tandem__kv__reply__pack(&rs, buf), 0);
    Tandem__Kv__Reply rb = TANDEM__KV__REPLY__INIT;
    rb.id = 21;
    rb.op = TANDEM__KV__OP__OP_PUT;
    rb.status = TANDEM__KV__STATUS__S_BAD_REQUEST;
    rb.message = "put item says 1000 bytes but carries 500";
    write_seed(dir, "reply_bad_request", F_REPLY, buf, tandem__kv__reply__pack(&rb, buf), 0);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *dir = getenv("TANDEM_FUZZ_KV_WRITE_SEEDS");
    if (dir != NULL && dir[0] != '\0') {
        write_seeds(dir);
        fprintf(stderr, "seeds written to %s\n", dir);
        exit(0);
    }
    return 0;
}
