/* Checked decoders of the KV store's messages (kvproto.h). */
#include <stdio.h>
#include <string.h>

#include <stdlib.h>

#include "kvproto.h"

/* Decoding without malloc: protobuf-c unpacks into a per-thread arena that
 * is reset when no decoded message is outstanding. A message that does
 * not fit (none should: control messages are at most KVP_MAX_CONTROL
 * bytes) falls back to malloc. */
#define KVP_ARENA (3 * KVP_MAX_CONTROL)
static _Thread_local struct {
    size_t used;
    int outstanding;
    _Alignas(16) unsigned char buf[KVP_ARENA];
} arena;

/* Under AddressSanitizer every decoded field gets its own malloc, so that
 * a read past a field is caught (the fuzzer relies on it). */
#if defined(__SANITIZE_ADDRESS__)
#define KVP_ARENA_OFF 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVP_ARENA_OFF 1
#endif
#endif

static void *arena_alloc(void *ud, size_t size)
{
    (void)ud;
#ifdef KVP_ARENA_OFF
    return malloc(size);
#endif
    size = (size + 15) & ~(size_t)15;
    if (size <= KVP_ARENA - arena.used) {
        void *p = arena.buf + arena.used;
        arena.used += size;
        return p;
    }
    return malloc(size);
}

static void arena_free(void *ud, void *p)
{
    (void)ud;
    unsigned char *c = p;
    if (c != NULL && (c < arena.buf || c >= arena.buf + KVP_ARENA))
        free(p);
}

static ProtobufCAllocator kvp_allocator = {arena_alloc, arena_free, NULL};

static ProtobufCAllocator *arena_begin(void)
{
    if (arena.outstanding == 0)
        arena.used = 0;
    return &kvp_allocator;
}

void kvp_free(void *msg)
{
    if (msg == NULL)
        return;
    protobuf_c_message_free_unpacked(msg, &kvp_allocator);
    if (arena.outstanding > 0)
        arena.outstanding--;
}

/* Counts a decoded message as outstanding until kvp_free(). */
static void *arena_keep(void *m)
{
    arena.outstanding++;
    return m;
}

void kvp_key_pack(tdm_hash128_t k, uint8_t out[KVP_KEY_BYTES])
{
    for (int i = 0; i < 8; i++) {
        out[i] = (uint8_t)(k.lo >> (8 * i));
        out[8 + i] = (uint8_t)(k.hi >> (8 * i));
    }
}

tdm_hash128_t kvp_key_unpack(const uint8_t in[KVP_KEY_BYTES])
{
    tdm_hash128_t k = {0, 0};
    for (int i = 0; i < 8; i++) {
        k.lo |= (uint64_t)in[i] << (8 * i);
        k.hi |= (uint64_t)in[8 + i] << (8 * i);
    }
    return k;
}

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        snprintf(err, err_len, __VA_ARGS__);                                                       \
        goto fail;                                                                                 \
    } while (0)

bool kvp_decode_hello(const void *data, size_t len, Tandem__Kv__Hello **out, char *err,
                      size_t err_len)
{
    Tandem__Kv__Hello *m = NULL;
    if (data == NULL || len == 0 || len > KVP_MAX_CONTROL)
        FAIL("hello of %zu bytes (limit %d)", len, KVP_MAX_CONTROL);
    m = tandem__kv__hello__unpack(arena_begin(), len, data);
    if (m == NULL)
        FAIL("hello does not parse");
    if (m->token.len > KVP_MAX_TOKEN)
        FAIL("hello token of %zu bytes (limit %d)", m->token.len, KVP_MAX_TOKEN);
    if (strlen(m->name) > 128)
        FAIL("hello name longer than 128 bytes");
    *out = arena_keep(m);
    return true;
fail:
    if (m != NULL)
        protobuf_c_message_free_unpacked((ProtobufCMessage *)m, &kvp_allocator);
    return false;
}

bool kvp_decode_hello_reply(const void *data, size_t len, Tandem__Kv__HelloReply **out, char *err,
                            size_t err_len)
{
    Tandem__Kv__HelloReply *m = NULL;
    if (data == NULL || len > KVP_MAX_CONTROL)
        FAIL("hello reply of %zu bytes (limit %d)", len, KVP_MAX_CONTROL);
    m = tandem__kv__hello_reply__unpack(arena_begin(), len, data);
    if (m == NULL)
        FAIL("hello reply does not parse");
    if (m->status == TANDEM__KV__STATUS__S_OK &&
        (m->max_keys == 0 || m->max_inflight == 0 || m->max_block_bytes == 0))
        FAIL("hello reply without limits");
    *out = arena_keep(m);
    return true;
fail:
    if (m != NULL)
        protobuf_c_message_free_unpacked((ProtobufCMessage *)m, &kvp_allocator);
    return false;
}

static bool op_known(int op)
{
    return op >= TANDEM__KV__OP__OP_PUT && op <= TANDEM__KV__OP__OP_STATS;
}

bool kvp_decode_request(const void *data, size_t len, Tandem__Kv__Request **out, char *err,
                        size_t err_len)
{
    Tandem__Kv__Request *m = NULL;
    if (data == NULL || len == 0 || len > KVP_MAX_CONTROL)
        FAIL("request of %zu bytes (limit %d)", len, KVP_MAX_CONTROL);
    m = tandem__kv__request__unpack(arena_begin(), len, data);
    if (m == NULL)
        FAIL("request does not parse");
    if (!op_known((int)m->op) || m->op == TANDEM__KV__OP__OP_PUT)
        FAIL("unknown operation %d in a request", (int)m->op);
    if (m->keys.len % KVP_KEY_BYTES != 0)
        FAIL("request keys of %zu bytes, not a multiple of %d", m->keys.len, KVP_KEY_BYTES);
    size_t n = m->keys.len / KVP_KEY_BYTES;
    if (n > KVP_MAX_KEYS)
        FAIL("request with %zu keys (limit %d)", n, KVP_MAX_KEYS);
    if (m->op == TANDEM__KV__OP__OP_STATS ? n != 0 : n == 0)
        FAIL("%s request with %zu keys", kvp_op_name((int)m->op), n);
    *out = arena_keep(m);
    return true;
fail:
    if (m != NULL)
        protobuf_c_message_free_unpacked((ProtobufCMessage *)m, &kvp_allocator);
    return false;
}

bool kvp_decode_put_item(const void *hdr, size_t len, size_t payload_len, Tandem__Kv__PutItem **out,
                         char *err, size_t err_len)
{
    Tandem__Kv__PutItem *m = NULL;
    if (hdr == NULL || len == 0 || len > KVP_MAX_HEADER)
        FAIL("put item header of %zu bytes (limit %d)", len, KVP_MAX_HEADER);
    m = tandem__kv__put_item__unpack(arena_begin(), len, hdr);
    if (m == NULL)
        FAIL("put item header does not parse");
    if (m->key.len != KVP_KEY_BYTES)
        FAIL("put item key of %zu bytes", m->key.len);
    if (m->count == 0 || m->count > KVP_MAX_KEYS || m->index >= m->count)
        FAIL("put item %u of %u", m->index, m->count);
    if (m->length != payload_len)
        FAIL("put item says %llu bytes but carries %zu", (unsigned long long)m->length,
             payload_len);
    if (payload_len == 0)
        FAIL("put item without payload");
    *out = arena_keep(m);
    return true;
fail:
    if (m != NULL)
        protobuf_c_message_free_unpacked((ProtobufCMessage *)m, &kvp_allocator);
    return false;
}

bool kvp_decode_get_item(const void *hdr, size_t len, Tandem__Kv__GetItem **out, char *err,
                         size_t err_len)
{
    Tandem__Kv__GetItem *m = NULL;
    if (hdr == NULL || len == 0 || len > KVP_MAX_HEADER)
        FAIL("get item header of %zu bytes (limit %d)", len, KVP_MAX_HEADER);
    m = tandem__kv__get_item__unpack(arena_begin(), len, hdr);
    if (m == NULL)
        FAIL("get item header does not parse");
    if (m->index >= KVP_MAX_KEYS)
        FAIL("get item index %u", m->index);
    *out = arena_keep(m);
    return true;
fail:
    if (m != NULL)
        protobuf_c_message_free_unpacked((ProtobufCMessage *)m, &kvp_allocator);
    return false;
}

bool kvp_decode_reply(const void *data, size_t len, Tandem__Kv__Reply **out, char *err,
                      size_t err_len)
{
    Tandem__Kv__Reply *m = NULL;
    if (data == NULL || len > KVP_MAX_CONTROL)
        FAIL("reply of %zu bytes (limit %d)", len, KVP_MAX_CONTROL);
    m = tandem__kv__reply__unpack(arena_begin(), len, data);
    if (m == NULL)
        FAIL("reply does not parse");
    if (!op_known((int)m->op))
        FAIL("reply to unknown operation %d", (int)m->op);
    if (m->n_item_status > KVP_MAX_KEYS || m->n_item_length > KVP_MAX_KEYS)
        FAIL("reply with %zu statuses", m->n_item_status);
    if (m->present.len * 8 > KVP_MAX_KEYS + 7)
        FAIL("reply presence map of %zu bytes", m->present.len);
    *out = arena_keep(m);
    return true;
fail:
    if (m != NULL)
        protobuf_c_message_free_unpacked((ProtobufCMessage *)m, &kvp_allocator);
    return false;
}

const char *kvp_op_name(int op)
{
    switch (op) {
    case TANDEM__KV__OP__OP_PUT: return "PUT";
    case TANDEM__KV__OP__OP_GET: return "GET";
    case TANDEM__KV__OP__OP_LOOKUP: return "LOOKUP";
    case TANDEM__KV__OP__OP_RELEASE: return "RELEASE";
    case TANDEM__KV__OP__OP_DELETE: return "DELETE";
    case TANDEM__KV__OP__OP_STATS: return "STATS";
    default: return "unknown";
    }
}

const char *kvp_status_name(int status)
{
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&tandem__kv__status__descriptor, status);
    return v != NULL ? v->name : "unknown";
}
