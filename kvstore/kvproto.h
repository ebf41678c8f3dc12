/* The KV store's wire protocol (proto/kvstore.proto): message ids, limits,
 * and the checked decoders both sides use. Every byte from the network
 * goes through a decoder here before anything else looks at it; a decoder
 * returns false with the reason in err and never reads past len. */
#ifndef TANDEM_KVSTORE_KVPROTO_H
#define TANDEM_KVSTORE_KVPROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/hash.h"
#include "tandem/proto/kvstore.pb-c.h"

#define KVP_VERSION 1

/* Active message ids. */
enum {
    KVP_AM_HELLO = 1,       /* client -> store, data: Hello */
    KVP_AM_HELLO_REPLY = 2, /* store -> client, data: HelloReply */
    KVP_AM_REQUEST = 3,     /* client -> store, data: Request */
    KVP_AM_PUT_ITEM = 4,    /* client -> store, header: PutItem, data: payload */
    KVP_AM_GET_ITEM = 5,    /* store -> client, header: GetItem, data: payload */
    KVP_AM_REPLY = 6,       /* store -> client, data: Reply */
};
#define KVP_AM_MAX 6

#define KVP_MAX_CONTROL 65536 /* bytes of a control message (Hello, Request, Reply) */
#define KVP_MAX_HEADER  256   /* bytes of a PutItem or GetItem header */
#define KVP_MAX_KEYS    2048  /* keys or PUT items in one request */
#define KVP_MAX_TOKEN   256   /* bytes of a cluster token */
#define KVP_KEY_BYTES   16

void kvp_key_pack(tdm_hash128_t k, uint8_t out[KVP_KEY_BYTES]);
tdm_hash128_t kvp_key_unpack(const uint8_t in[KVP_KEY_BYTES]);

/* Decoders: each checks the size bound, unpacks and validates fields (key
 * lengths, counts, index ranges, known operations). On success the caller
 * frees the message with kvp_free() (not protobuf-c's free: messages are
 * decoded into a per-thread arena, so decoding does not malloc). */
bool kvp_decode_hello(const void *data, size_t len, Tandem__Kv__Hello **out, char *err,
                      size_t err_len);
bool kvp_decode_hello_reply(const void *data, size_t len, Tandem__Kv__HelloReply **out, char *err,
                            size_t err_len);
bool kvp_decode_request(const void *data, size_t len, Tandem__Kv__Request **out, char *err,
                        size_t err_len);
/* payload_len: the AM data length, which must equal the item's length. */
bool kvp_decode_put_item(const void *hdr, size_t len, size_t payload_len, Tandem__Kv__PutItem **out,
                         char *err, size_t err_len);
bool kvp_decode_get_item(const void *hdr, size_t len, Tandem__Kv__GetItem **out, char *err,
                         size_t err_len);
bool kvp_decode_reply(const void *data, size_t len, Tandem__Kv__Reply **out, char *err,
                      size_t err_len);

void kvp_free(void *msg);

const char *kvp_op_name(int op);
const char *kvp_status_name(int status);

#endif
