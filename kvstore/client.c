/* The KV store client (include/tandem/kvclient.h).
 *
 * An operation (op) over n keys is split into sub-requests (subs), one per
 * store and at most max_keys keys each. A sub is queued on its store until
 * the store's connection is authenticated and a slot of its in-flight
 * budget is free, then sent. It ends when the store's reply and every
 * payload it announced are in, or when it fails: its connection dies or
 * its deadline passes. A failed sub whose payloads are still moving (GET
 * receives into the caller's buffers, PUT sends from them) closes its
 * connection by force and ends when UCX has failed those transfers, so the
 * caller gets its buffers back only when nothing writes or reads them.
 * An op ends when its last sub ends; a GET retries the keys it missed on
 * the next replica first. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "kvproto.h"
#include "tandem/kvclient.h"
#include "tandem/log.h"

#define LOG_MOD "kvclient"

enum { OP_PUT, OP_GET, OP_LOOKUP, OP_RELEASE, OP_DELETE, OP_STATS };
enum { ST_DOWN, ST_CONNECTING, ST_READY };

typedef struct kvc_store kvc_store_t;
typedef struct kvc_op kvc_op_t;

typedef struct kvc_sub {
    kvc_op_t *op;
    kvc_store_t *store;
    uint64_t id;
    uint32_t n;
    uint32_t *idx; /* key indexes into the op's arrays */
    int64_t deadline;
    bool sent, replied, failed, done;
    bool implicit; /* GET: replied by all_found payloads, a Reply may still correct it */
    tdm_status_t fail_status;
    int moving;        /* payload sends or receives in flight */
    uint32_t expected; /* GET: payloads the reply announced */
    uint32_t arrived;  /* GET: payloads received or refused */
    uint8_t *got;      /* GET: per item, 0 none, 1 seen, 2 landed */
    struct recv_ctx {
        struct kvc_sub *sub;
        uint32_t i;
    } * rctx;             /* GET: per item, for the receive callback */
    struct kvc_sub *next; /* in the store's queue or in-flight list */
} kvc_sub_t;

struct kvc_op {
    tdm_kvc_t *kvc;
    int type;
    size_t n;
    const tdm_hash128_t *keys;
    const void *const *src; /* PUT */
    const size_t *src_len;
    uint32_t lease_ms;
    void *const *dst; /* GET */
    const size_t *cap;
    size_t *len;
    tdm_status_t *status; /* caller's, or own */
    tdm_status_t *own_status;
    uint8_t *tries;   /* GET: replicas tried per key */
    uint8_t *present; /* LOOKUP: per key */
    size_t *n_leading;
    tdm_kvc_stats_t *stats;
    int64_t deadline;
    int subs_left;
    tdm_status_t first_error;
    tdm_kvc_cb_t cb;
    void *user;
};

struct kvc_store {
    tdm_kvc_t *kvc;
    size_t index;
    char addr[96];
    char host[80];
    int port;
    uint64_t seed; /* rendezvous hashing */
    tdm_conn_t *conn;
    int state;
    int64_t since;    /* state change time */
    int64_t retry_at; /* DOWN: next connect */
    int backoff_ms;
    bool denied_logged, down_logged;
    uint32_t max_keys, max_inflight;
    uint64_t max_block_bytes;
    kvc_sub_t *queue, *queue_tail; /* waiting to be sent */
    kvc_sub_t *flight;             /* sent */
    uint32_t n_flight;
};

struct tdm_kvc {
    tdm_net_t *net;
    bool own_net;
    kvc_store_t stores[TDM_KVC_MAX_STORES];
    size_t n_stores;
    int replicas;
    char token[KVP_MAX_TOKEN + 1];
    size_t token_len;
    char name[64];
    int deadline_ms, backoff_min_ms, backoff_max_ms;
    uint64_t next_id;
    kvc_sub_t *done_subs; /* ended, to finish outside callbacks */
};

/* ---- placement ---- */

static uint64_t hrw_score(uint64_t seed, tdm_hash128_t k)
{
    uint64_t x = k.lo ^ seed;
    x = (x ^ (x >> 31)) * 0x7fb5d329728ea185ULL;
    x ^= k.hi + 0x9e3779b97f4a7c15ULL + (x << 6) + (x >> 2);
    x = (x ^ (x >> 27)) * 0x81dadef4bc2dd44dULL;
    return x ^ (x >> 33);
}

size_t tdm_kvc_placement(const tdm_kvc_t *kvc, tdm_hash128_t key, size_t *out, size_t max)
{
    size_t n = 0;
    uint64_t score[TDM_KVC_MAX_STORES];
    for (size_t s = 0; s < kvc->n_stores; s++) {
        uint64_t sc = hrw_score(kvc->stores[s].seed, key);
        size_t j = n < max ? n++ : max;
        /* insertion into the top-max list */
        while (j > 0 && score[j - 1] < sc) {
            if (j < max) {
                score[j] = score[j - 1];
                out[j] = out[j - 1];
            }
            j--;
        }
        if (j < max) {
            score[j] = sc;
            out[j] = s;
        }
    }
    return n;
}

/* ---- subs and ops ---- */

static void op_finish_sub(kvc_sub_t *sub);

static tdm_status_t from_kv_status(int s)
{
    switch (s) {
    case TANDEM__KV__STATUS__S_OK:
    case TANDEM__KV__STATUS__S_EXISTS: return TDM_OK;
    case TANDEM__KV__STATUS__S_NOT_FOUND: return TDM_ERR_NOT_FOUND;
    case TANDEM__KV__STATUS__S_NO_SPACE: return TDM_ERR_NOMEM;
    case TANDEM__KV__STATUS__S_TOO_LARGE: return TDM_ERR_INVALID;
    case TANDEM__KV__STATUS__S_BUSY:
    case TANDEM__KV__STATUS__S_DRAINING: return TDM_ERR_BUSY;
    default: return TDM_ERR_IO;
    }
}

static kvc_sub_t *sub_new(kvc_op_t *op, kvc_store_t *st, uint32_t n)
{
    kvc_sub_t *sub = calloc(1, sizeof(*sub));
    if (sub == NULL)
        return NULL;
    sub->idx = calloc(n ? n : 1, sizeof(uint32_t));
    sub->got = calloc(n ? n : 1, 1);
    sub->rctx = op->type == OP_GET ? calloc(n ? n : 1, sizeof(*sub->rctx)) : NULL;
    if (sub->idx == NULL || sub->got == NULL || (op->type == OP_GET && sub->rctx == NULL)) {
        free(sub->idx);
        free(sub->got);
        free(sub->rctx);
        free(sub);
        return NULL;
    }
    sub->op = op;
    sub->store = st;
    sub->id = ++op->kvc->next_id;
    sub->deadline = op->deadline;
    op->subs_left++;
    return sub;
}

static void sub_free(kvc_sub_t *sub)
{
    free(sub->rctx);
    free(sub->idx);
    free(sub->got);
    free(sub);
}

/* The sub is over for its store: take it off the in-flight list. */
static void sub_unlink(kvc_sub_t *sub)
{
    kvc_store_t *st = sub->store;
    for (kvc_sub_t **pp = &st->flight; *pp != NULL; pp = &(*pp)->next)
        if (*pp == sub) {
            *pp = sub->next;
            st->n_flight--;
            break;
        }
    sub->next = NULL;
}

/* Ends the sub when nothing of it moves any more. */
static void sub_try_end(kvc_sub_t *sub)
{
    if (sub->done || sub->moving > 0)
        return;
    bool complete = sub->failed || (sub->replied && sub->arrived >= sub->expected);
    if (!complete)
        return;
    sub->done = true;
    sub_unlink(sub);
    tdm_kvc_t *kvc = sub->op->kvc;
    sub->next = kvc->done_subs;
    kvc->done_subs = sub;
}

static void sub_fail(kvc_sub_t *sub, tdm_status_t why)
{
    if (sub->done || sub->failed)
        return;
    sub->failed = true;
    sub->fail_status = why;
    sub_try_end(sub);
}

static void store_fail_all(kvc_store_t *st, tdm_status_t why);

static void store_down(kvc_store_t *st, tdm_status_t why, const char *reason)
{
    tdm_kvc_t *kvc = st->kvc;
    if (st->conn != NULL) {
        tdm_conn_close(st->conn, true);
        st->conn = NULL;
    }
    if (!st->down_logged)
        tdm_log_warn(LOG_MOD,
                     "store %s is unreachable (%s); its blocks count as misses, "
                     "reconnecting with backoff",
                     st->addr, reason);
    st->down_logged = true;
    st->state = ST_DOWN;
    st->since = tdm_net_now_ms();
    st->backoff_ms = st->backoff_ms == 0 ? kvc->backoff_min_ms : st->backoff_ms * 2;
    if (st->backoff_ms > kvc->backoff_max_ms)
        st->backoff_ms = kvc->backoff_max_ms;
    st->retry_at = st->since + st->backoff_ms;
    store_fail_all(st, why);
}

/* Fails every sub of a store; their moving transfers fail with the
 * connection, which was closed by force. */
static void store_fail_all(kvc_store_t *st, tdm_status_t why)
{
    while (st->queue != NULL) {
        kvc_sub_t *sub = st->queue;
        st->queue = sub->next;
        sub->next = NULL;
        sub->failed = true;
        sub->fail_status = why;
        sub->done = true;
        sub->next = st->kvc->done_subs;
        st->kvc->done_subs = sub;
    }
    st->queue_tail = NULL;
    kvc_sub_t *f = st->flight;
    while (f != NULL) {
        kvc_sub_t *next = f->next;
        sub_fail(f, why);
        f = next;
    }
}

/* ---- sending ---- */

static void put_sent(void *user, tdm_status_t status)
{
    kvc_sub_t *sub = user;
    sub->moving--;
    if (status != TDM_OK && !sub->failed) {
        kvc_store_t *st = sub->store;
        sub_fail(sub, status);
        if (st->conn != NULL && st->state == ST_READY)
            store_down(st, TDM_ERR_IO, "a send failed");
    }
    sub_try_end(sub);
}

static tdm_status_t sub_send(kvc_sub_t *sub)
{
    kvc_store_t *st = sub->store;
    kvc_op_t *op = sub->op;
    sub->sent = true;
    sub->next = st->flight;
    st->flight = sub;
    st->n_flight++;
    if (op->type == OP_PUT) {
        uint8_t hdr[KVP_MAX_HEADER];
        for (uint32_t i = 0; i < sub->n; i++) {
            uint32_t k = sub->idx[i];
            uint8_t key[KVP_KEY_BYTES];
            kvp_key_pack(op->keys[k], key);
            Tandem__Kv__PutItem m = TANDEM__KV__PUT_ITEM__INIT;
            m.id = sub->id;
            m.index = i;
            m.count = sub->n;
            m.key.data = key;
            m.key.len = sizeof(key);
            m.length = op->src_len[k];
            m.lease_ms = op->lease_ms;
            size_t hl = tandem__kv__put_item__pack(&m, hdr);
            tdm_status_t s = tdm_conn_send(st->conn, KVP_AM_PUT_ITEM, hdr, hl, op->src[k],
                                           op->src_len[k], false, put_sent, sub);
            if (s != TDM_OK)
                return s;
            sub->moving++;
        }
        return TDM_OK;
    }
    static const int ops[] = {
        [OP_GET] = TANDEM__KV__OP__OP_GET,         [OP_LOOKUP] = TANDEM__KV__OP__OP_LOOKUP,
        [OP_RELEASE] = TANDEM__KV__OP__OP_RELEASE, [OP_DELETE] = TANDEM__KV__OP__OP_DELETE,
        [OP_STATS] = TANDEM__KV__OP__OP_STATS,
    };
    Tandem__Kv__Request r = TANDEM__KV__REQUEST__INIT;
    r.id = sub->id;
    r.op = (Tandem__Kv__Op)ops[op->type];
    uint8_t *keys = NULL;
    if (sub->n > 0) {
        keys = malloc((size_t)sub->n * KVP_KEY_BYTES);
        if (keys == NULL)
            return TDM_ERR_NOMEM;
        for (uint32_t i = 0; i < sub->n; i++)
            kvp_key_pack(op->keys[sub->idx[i]], keys + (size_t)i * KVP_KEY_BYTES);
    }
    r.keys.data = keys;
    r.keys.len = (size_t)sub->n * KVP_KEY_BYTES;
    size_t len = tandem__kv__request__get_packed_size(&r);
    uint8_t *buf = malloc(len ? len : 1);
    tdm_status_t s = TDM_ERR_NOMEM;
    if (buf != NULL) {
        tandem__kv__request__pack(&r, buf);
        s = tdm_conn_send(st->conn, KVP_AM_REQUEST, NULL, 0, buf, len, true, NULL, NULL);
    }
    free(buf);
    free(keys);
    return s;
}

static void store_pump(kvc_store_t *st)
{
    while (st->state == ST_READY && st->queue != NULL && st->n_flight < st->max_inflight) {
        kvc_sub_t *sub = st->queue;
        st->queue = sub->next;
        if (st->queue == NULL)
            st->queue_tail = NULL;
        sub->next = NULL;
        tdm_status_t s = sub_send(sub);
        if (s != TDM_OK) {
            sub_fail(sub, s);
            store_down(st, TDM_ERR_IO, "a send failed");
            return;
        }
    }
}

static void store_enqueue(kvc_store_t *st, kvc_sub_t *sub)
{
    if (st->state == ST_DOWN) {
        sub->failed = true;
        sub->fail_status = TDM_ERR_IO;
        sub->done = true;
        sub->next = st->kvc->done_subs;
        st->kvc->done_subs = sub;
        return;
    }
    sub->next = NULL;
    if (st->queue_tail != NULL)
        st->queue_tail->next = sub;
    else
        st->queue = sub;
    st->queue_tail = sub;
    store_pump(st);
}

/* ---- connections ---- */

static void on_conn_error(void *user, tdm_conn_t *conn, tdm_status_t why)
{
    kvc_store_t *st = user;
    if (st->conn != conn)
        return;
    store_down(st, TDM_ERR_IO, st->state == ST_READY ? "connection lost" : "cannot connect");
}

static void store_connect(kvc_store_t *st)
{
    tdm_kvc_t *kvc = st->kvc;
    st->since = tdm_net_now_ms();
    if (tdm_net_connect(kvc->net, st->host, st->port, &st->conn) != TDM_OK) {
        st->conn = NULL;
        store_down(st, TDM_ERR_IO, "connect failed");
        return;
    }
    tdm_conn_set_owner(st->conn, st, on_conn_error);
    st->state = ST_CONNECTING;
    Tandem__Kv__Hello h = TANDEM__KV__HELLO__INIT;
    h.version = KVP_VERSION; /* the token was proven by the transport's handshake */
    h.name = kvc->name;
    uint8_t buf[KVP_MAX_TOKEN + 256];
    size_t len = tandem__kv__hello__pack(&h, buf);
    if (tdm_conn_send(st->conn, KVP_AM_HELLO, NULL, 0, buf, len, true, NULL, NULL) != TDM_OK)
        store_down(st, TDM_ERR_IO, "cannot send hello");
}

static kvc_store_t *msg_store(tdm_kvc_t *kvc, const tdm_net_msg_t *msg)
{
    kvc_store_t *st = tdm_conn_owner(msg->conn);
    if (st == NULL || st < kvc->stores || st >= kvc->stores + kvc->n_stores ||
        st->conn != msg->conn)
        return NULL;
    return st;
}

static void protocol_error(kvc_store_t *st, const char *what)
{
    tdm_log_error(LOG_MOD, "store %s sent a bad message (%s); closing the connection", st->addr,
                  what);
    store_down(st, TDM_ERR_IO, "protocol error");
}

static void on_hello_reply(void *user, const tdm_net_msg_t *msg)
{
    tdm_kvc_t *kvc = user;
    kvc_store_t *st = msg_store(kvc, msg);
    if (st == NULL)
        return;
    char err[128];
    Tandem__Kv__HelloReply *m;
    if (msg->rndv || !kvp_decode_hello_reply(msg->data, msg->length, &m, err, sizeof(err))) {
        protocol_error(st, msg->rndv ? "hello reply by rendezvous" : err);
        return;
    }
    if (m->status != TANDEM__KV__STATUS__S_OK) {
        if (!st->denied_logged)
            tdm_log_error(LOG_MOD,
                          "store %s refused this client: %s (%s); set the same cluster token "
                          "(--cluster-token or TANDEM_CLUSTER_TOKEN) on both sides",
                          st->addr, kvp_status_name(m->status), m->message);
        st->denied_logged = true;
        kvp_free(m);
        st->backoff_ms = kvc->backoff_max_ms / 2;
        store_down(st, TDM_ERR_IO, "refused");
        return;
    }
    st->max_keys = m->max_keys < KVP_MAX_KEYS ? m->max_keys : KVP_MAX_KEYS;
    st->max_inflight = m->max_inflight;
    st->max_block_bytes = m->max_block_bytes;
    kvp_free(m);
    st->state = ST_READY;
    st->since = tdm_net_now_ms();
    st->backoff_ms = 0;
    if (st->down_logged)
        tdm_log_info(LOG_MOD, "store %s is reachable again", st->addr);
    else
        tdm_log_debug(LOG_MOD, "connected to store %s", st->addr);
    st->down_logged = false;
    st->denied_logged = false;
    store_pump(st);
}

static kvc_sub_t *find_sub(kvc_store_t *st, uint64_t id)
{
    for (kvc_sub_t *s = st->flight; s != NULL; s = s->next)
        if (s->id == id)
            return s;
    return NULL;
}

static void get_landed(void *user, tdm_status_t status)
{
    struct recv_ctx *rc = user;
    kvc_sub_t *sub = rc->sub;
    sub->moving--;
    sub->arrived++;
    if (status == TDM_OK) {
        sub->got[rc->i] = 2;
        sub->op->status[sub->idx[rc->i]] = TDM_OK;
    } else
        sub_fail(sub, status);
    sub_try_end(sub);
}

static void on_get_item(void *user, const tdm_net_msg_t *msg)
{
    tdm_kvc_t *kvc = user;
    kvc_store_t *st = msg_store(kvc, msg);
    if (st == NULL)
        return;
    char err[128];
    Tandem__Kv__GetItem *m;
    if (!kvp_decode_get_item(msg->header, msg->header_len, &m, err, sizeof(err))) {
        protocol_error(st, err);
        return;
    }
    kvc_sub_t *sub = find_sub(st, m->id);
    uint32_t i = m->index;
    bool all_found = m->all_found;
    kvp_free(m);
    if (sub == NULL || sub->failed)
        return; /* ended (deadline): the payload is dropped */
    if (sub->op->type != OP_GET || i >= sub->n || sub->got[i]) {
        protocol_error(st, "payload for no such key");
        return;
    }
    sub->got[i] = 1;
    if (all_found && !sub->replied) {
        /* every key was found: the payloads are the whole answer */
        sub->replied = true;
        sub->implicit = true;
        sub->expected = sub->n;
    }
    kvc_op_t *op = sub->op;
    uint32_t k = sub->idx[i];
    if (msg->length > op->cap[k]) {
        op->status[k] = TDM_ERR_INVALID;
        sub->arrived++;
        sub_try_end(sub);
        return;
    }
    op->len[k] = msg->length;
    sub->moving++;
    sub->rctx[i].sub = sub;
    sub->rctx[i].i = i;
    if (tdm_net_recv(kvc->net, msg, op->dst[k], get_landed, &sub->rctx[i]) != TDM_OK) {
        sub->moving--;
        sub->arrived++;
        op->status[k] = TDM_ERR_IO;
        sub_try_end(sub);
    }
}

static void apply_reply(kvc_sub_t *sub, const Tandem__Kv__Reply *m)
{
    kvc_op_t *op = sub->op;
    if (op->type == OP_STATS) {
        if (m->stats != NULL && op->stats != NULL) {
            const Tandem__Kv__Stats *s = m->stats;
            *op->stats =
                (tdm_kvc_stats_t){s->blocks,         s->bytes_used, s->capacity, s->bytes_free,
                                  s->bytes_reserved, s->leased,     s->pinned,   s->hits,
                                  s->misses,         s->evictions,  s->puts,     s->gets,
                                  s->bytes_in,       s->bytes_out,  s->clients,  s->refused};
        }
        return;
    }
    for (uint32_t i = 0; i < sub->n; i++) {
        uint32_t k = sub->idx[i];
        if (op->type == OP_LOOKUP) {
            if (i / 8 < m->present.len && (m->present.data[i / 8] >> (i % 8)) & 1)
                op->present[k] = 1;
            continue;
        }
        tdm_status_t s = from_kv_status(m->item_status[i]);
        if (op->type == OP_GET) {
            if (s == TDM_OK) {
                sub->expected++; /* its status becomes OK when it lands */
            } else if (!sub->got[i]) {
                op->status[k] = s;
            }
        } else if (op->type == OP_PUT || op->type == OP_RELEASE || op->type == OP_DELETE) {
            /* with replicas, one success is enough */
            if (op->status[k] != TDM_OK || s == TDM_OK)
                op->status[k] = s;
        }
    }
}

static void on_reply(void *user, const tdm_net_msg_t *msg)
{
    tdm_kvc_t *kvc = user;
    kvc_store_t *st = msg_store(kvc, msg);
    if (st == NULL)
        return;
    char err[128];
    Tandem__Kv__Reply *m;
    if (msg->rndv || !kvp_decode_reply(msg->data, msg->length, &m, err, sizeof(err))) {
        protocol_error(st, msg->rndv ? "reply by rendezvous" : err);
        return;
    }
    kvc_sub_t *sub = find_sub(st, m->id);
    if (sub != NULL && sub->implicit && !sub->failed) {
        /* the store could not send every payload it announced */
        sub->implicit = false;
        sub->replied = false;
        sub->expected = 0;
    }
    if (sub == NULL || sub->failed || sub->replied) {
        kvp_free(m);
        return;
    }
    bool per_item = sub->op->type != OP_STATS && sub->op->type != OP_LOOKUP;
    if (per_item && m->n_item_status != sub->n && m->status == TANDEM__KV__STATUS__S_OK) {
        kvp_free(m);
        protocol_error(st, "reply with the wrong number of statuses");
        return;
    }
    sub->replied = true;
    if (m->status != TANDEM__KV__STATUS__S_OK) {
        tdm_status_t why = from_kv_status(m->status);
        if (m->status == TANDEM__KV__STATUS__S_BAD_REQUEST)
            tdm_log_error(LOG_MOD, "store %s refused a %s: %s", st->addr, kvp_op_name(m->op),
                          m->message);
        for (uint32_t i = 0; i < sub->n; i++)
            if (sub->op->type != OP_LOOKUP && sub->op->status[sub->idx[i]] != TDM_OK)
                sub->op->status[sub->idx[i]] = why;
        sub_fail(sub, why);
    } else {
        apply_reply(sub, m);
    }
    kvp_free(m);
    sub_try_end(sub);
}

/* ---- ops ---- */

static kvc_op_t *op_new(tdm_kvc_t *kvc, int type, size_t n, const tdm_hash128_t *keys,
                        tdm_status_t *status, tdm_kvc_cb_t cb, void *user)
{
    kvc_op_t *op = calloc(1, sizeof(*op));
    if (op == NULL)
        return NULL;
    op->kvc = kvc;
    op->type = type;
    op->n = n;
    op->keys = keys;
    op->cb = cb;
    op->user = user;
    op->deadline = tdm_net_now_ms() + kvc->deadline_ms;
    op->status = status;
    if (op->status == NULL && n > 0) {
        op->own_status = calloc(n, sizeof(tdm_status_t));
        if (op->own_status == NULL) {
            free(op);
            return NULL;
        }
        op->status = op->own_status;
    }
    for (size_t i = 0; i < n; i++)
        op->status[i] = type == OP_GET ? TDM_ERR_NOT_FOUND : TDM_ERR_IO;
    return op;
}

static void op_free(kvc_op_t *op)
{
    free(op->own_status);
    free(op->tries);
    free(op->present);
    free(op);
}

static void op_complete(kvc_op_t *op)
{
    if (op->type == OP_LOOKUP && op->n_leading != NULL) {
        size_t k = 0;
        while (k < op->n && op->present[k])
            k++;
        *op->n_leading = k;
    }
    tdm_status_t st = op->first_error;
    if (op->cb != NULL)
        op->cb(op->user, st);
    op_free(op);
}

/* Sends the keys listed in sel (n_sel of them) to store s as subs of at
 * most max_keys keys. */
static tdm_status_t op_dispatch(kvc_op_t *op, size_t s, const uint32_t *sel, size_t n_sel)
{
    tdm_kvc_t *kvc = op->kvc;
    kvc_store_t *st = &kvc->stores[s];
    size_t chunk = st->max_keys > 0 ? st->max_keys : 256;
    if (op->type == OP_STATS) {
        kvc_sub_t *sub = sub_new(op, st, 0);
        if (sub == NULL)
            return TDM_ERR_NOMEM;
        store_enqueue(st, sub);
        return TDM_OK;
    }
    for (size_t off = 0; off < n_sel; off += chunk) {
        size_t m = n_sel - off < chunk ? n_sel - off : chunk;
        kvc_sub_t *sub = sub_new(op, st, (uint32_t)m);
        if (sub == NULL)
            return TDM_ERR_NOMEM;
        sub->n = (uint32_t)m;
        memcpy(sub->idx, sel + off, m * sizeof(uint32_t));
        store_enqueue(st, sub);
    }
    return TDM_OK;
}

/* Sends each key to its stores of rank lo..hi-1 (GET: the rank in tries). */
static tdm_status_t op_route(kvc_op_t *op, const uint8_t *want)
{
    tdm_kvc_t *kvc = op->kvc;
    uint32_t *sel = malloc((op->n ? op->n : 1) * sizeof(uint32_t));
    if (sel == NULL)
        return TDM_ERR_NOMEM;
    tdm_status_t rc = TDM_OK;
    size_t place[2];
    int reps = kvc->replicas;
    /* a pass per store keeps each sub's keys in the op's order */
    for (size_t s = 0; s < kvc->n_stores && rc == TDM_OK; s++) {
        size_t n_sel = 0;
        for (size_t k = 0; k < op->n; k++) {
            if (want != NULL && !want[k])
                continue;
            size_t np = tdm_kvc_placement(kvc, op->keys[k], place, (size_t)reps);
            bool mine = false;
            if (op->type == OP_GET)
                mine = op->tries[k] < np && place[op->tries[k]] == s;
            else
                for (size_t r = 0; r < np; r++)
                    mine |= place[r] == s;
            if (mine)
                sel[n_sel++] = (uint32_t)k;
        }
        if (n_sel > 0)
            rc = op_dispatch(op, s, sel, n_sel);
    }
    free(sel);
    return rc;
}

/* A sub ended: fold it into its op; retry a GET's misses on the next
 * replica; complete the op after its last sub. */
static void op_finish_sub(kvc_sub_t *sub)
{
    kvc_op_t *op = sub->op;
    if (sub->failed) {
        if (op->type == OP_GET) {
            for (uint32_t i = 0; i < sub->n; i++) {
                uint32_t k = sub->idx[i];
                /* a payload that had landed stays; the others are misses */
                if (!(sub->got[i] == 2 && op->status[k] == TDM_OK))
                    op->status[k] = sub->fail_status;
            }
        } else if (op->type != OP_LOOKUP) {
            for (uint32_t i = 0; i < sub->n; i++)
                if (op->status[sub->idx[i]] != TDM_OK)
                    op->status[sub->idx[i]] = sub->fail_status;
        }
        if (op->type == OP_STATS || op->kvc->replicas == 1)
            if (op->first_error == TDM_OK)
                op->first_error = sub->fail_status;
    } else if (op->type == OP_GET) {
        for (uint32_t i = 0; i < sub->n; i++)
            if (sub->got[i] != 2 && op->status[sub->idx[i]] == TDM_OK)
                op->status[sub->idx[i]] = TDM_ERR_IO; /* announced, never came */
    }
    op->subs_left--;
    sub_free(sub);
    if (op->subs_left > 0)
        return;
    if (op->type == OP_GET && op->kvc->replicas > 1 && tdm_net_now_ms() < op->deadline) {
        uint8_t *want = calloc(op->n, 1);
        size_t n_want = 0;
        for (size_t k = 0; want != NULL && k < op->n; k++)
            if (op->status[k] != TDM_OK && op->tries[k] + 1 < (uint8_t)op->kvc->replicas &&
                op->kvc->n_stores > (size_t)op->tries[k] + 1) {
                op->tries[k]++;
                want[k] = 1;
                n_want++;
            }
        if (n_want > 0) {
            op->first_error = TDM_OK;
            tdm_status_t rc = op_route(op, want);
            free(want);
            if (rc == TDM_OK && op->subs_left > 0)
                return;
        } else {
            free(want);
        }
    }
    if (op->type == OP_PUT && op->kvc->replicas > 1 && op->first_error == TDM_OK)
        for (size_t k = 0; k < op->n; k++)
            if (op->status[k] != TDM_OK) {
                op->first_error = op->status[k];
                break;
            }
    op_complete(op);
}

static tdm_status_t op_start(kvc_op_t *op)
{
    if (op->type == OP_GET) {
        op->tries = calloc(op->n ? op->n : 1, 1);
        if (op->tries == NULL) {
            op_free(op);
            return TDM_ERR_NOMEM;
        }
    }
    if (op->type == OP_LOOKUP) {
        op->present = calloc(op->n ? op->n : 1, 1);
        if (op->present == NULL) {
            op_free(op);
            return TDM_ERR_NOMEM;
        }
    }
    op->subs_left++; /* held while routing */
    tdm_status_t rc = op_route(op, NULL);
    op->subs_left--;
    if (rc != TDM_OK && op->first_error == TDM_OK)
        op->first_error = rc;
    if (op->subs_left == 0) /* nothing was routed (routing ran out of memory) */
        op_complete(op);
    return TDM_OK;
}

static int finish_done(tdm_kvc_t *kvc)
{
    int n = 0;
    while (kvc->done_subs != NULL) {
        kvc_sub_t *sub = kvc->done_subs;
        kvc->done_subs = sub->next;
        op_finish_sub(sub);
        n++;
    }
    return n;
}

static bool check_keys(size_t n, const tdm_hash128_t *keys)
{
    return n > 0 && keys != NULL && n <= (size_t)KVP_MAX_KEYS * 64;
}

tdm_status_t tdm_kvc_put(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                         const void *const *bufs, const size_t *lens, uint32_t lease_ms,
                         tdm_status_t *status, tdm_kvc_cb_t cb, void *user)
{
    if (!check_keys(n, keys) || bufs == NULL || lens == NULL)
        return TDM_ERR_INVALID;
    for (size_t i = 0; i < n; i++)
        if (lens[i] == 0 || bufs[i] == NULL)
            return TDM_ERR_INVALID;
    kvc_op_t *op = op_new(kvc, OP_PUT, n, keys, status, cb, user);
    if (op == NULL)
        return TDM_ERR_NOMEM;
    op->src = bufs;
    op->src_len = lens;
    op->lease_ms = lease_ms;
    return op_start(op);
}

tdm_status_t tdm_kvc_get(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys, void *const *bufs,
                         const size_t *caps, size_t *lens, tdm_status_t *status, tdm_kvc_cb_t cb,
                         void *user)
{
    if (!check_keys(n, keys) || bufs == NULL || caps == NULL || lens == NULL)
        return TDM_ERR_INVALID;
    kvc_op_t *op = op_new(kvc, OP_GET, n, keys, status, cb, user);
    if (op == NULL)
        return TDM_ERR_NOMEM;
    for (size_t i = 0; i < n; i++)
        lens[i] = 0;
    op->dst = bufs;
    op->cap = caps;
    op->len = lens;
    return op_start(op);
}

tdm_status_t tdm_kvc_lookup(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys, size_t *n_leading,
                            tdm_kvc_cb_t cb, void *user)
{
    if (!check_keys(n, keys) || n_leading == NULL)
        return TDM_ERR_INVALID;
    kvc_op_t *op = op_new(kvc, OP_LOOKUP, n, keys, NULL, cb, user);
    if (op == NULL)
        return TDM_ERR_NOMEM;
    op->n_leading = n_leading;
    return op_start(op);
}

static tdm_status_t keyed(tdm_kvc_t *kvc, int type, size_t n, const tdm_hash128_t *keys,
                          tdm_status_t *status, tdm_kvc_cb_t cb, void *user)
{
    if (!check_keys(n, keys))
        return TDM_ERR_INVALID;
    kvc_op_t *op = op_new(kvc, type, n, keys, status, cb, user);
    if (op == NULL)
        return TDM_ERR_NOMEM;
    return op_start(op);
}

tdm_status_t tdm_kvc_release(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                             tdm_status_t *status, tdm_kvc_cb_t cb, void *user)
{
    return keyed(kvc, OP_RELEASE, n, keys, status, cb, user);
}

tdm_status_t tdm_kvc_delete(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                            tdm_status_t *status, tdm_kvc_cb_t cb, void *user)
{
    return keyed(kvc, OP_DELETE, n, keys, status, cb, user);
}

tdm_status_t tdm_kvc_stats(tdm_kvc_t *kvc, size_t store, tdm_kvc_stats_t *out, tdm_kvc_cb_t cb,
                           void *user)
{
    if (store >= kvc->n_stores || out == NULL)
        return TDM_ERR_INVALID;
    kvc_op_t *op = op_new(kvc, OP_STATS, 0, NULL, NULL, cb, user);
    if (op == NULL)
        return TDM_ERR_NOMEM;
    op->stats = out;
    op->subs_left++;
    tdm_status_t rc = op_dispatch(op, store, NULL, 0);
    op->subs_left--;
    if (rc != TDM_OK)
        op->first_error = rc;
    if (op->subs_left == 0)
        op_complete(op);
    return TDM_OK;
}

/* ---- progress ---- */

static void check_timers(tdm_kvc_t *kvc, int64_t now)
{
    for (size_t s = 0; s < kvc->n_stores; s++) {
        kvc_store_t *st = &kvc->stores[s];
        if (st->state == ST_DOWN && now >= st->retry_at) {
            store_connect(st);
            continue;
        }
        if (st->state == ST_CONNECTING && now - st->since > kvc->deadline_ms) {
            store_down(st, TDM_ERR_TIMEOUT, "no answer to hello in time");
            continue;
        }
        /* queued subs past their deadline */
        kvc_sub_t **pp = &st->queue;
        st->queue_tail = NULL;
        while (*pp != NULL) {
            kvc_sub_t *sub = *pp;
            if (now >= sub->deadline) {
                *pp = sub->next;
                sub->failed = true;
                sub->fail_status = TDM_ERR_TIMEOUT;
                sub->done = true;
                sub->next = kvc->done_subs;
                kvc->done_subs = sub;
            } else {
                st->queue_tail = sub;
                pp = &sub->next;
            }
        }
        /* a sent sub past its deadline: the store is hung or the link is
         * cut; UCX would not tell, so the connection goes */
        for (kvc_sub_t *sub = st->flight; sub != NULL; sub = sub->next)
            if (!sub->failed && now >= sub->deadline) {
                store_down(st, TDM_ERR_TIMEOUT, "a request passed its deadline");
                break;
            }
    }
}

int tdm_kvc_progress(tdm_kvc_t *kvc)
{
    int n = tdm_net_progress(kvc->net);
    check_timers(kvc, tdm_net_now_ms());
    n += finish_done(kvc);
    return n;
}

void tdm_kvc_wait(tdm_kvc_t *kvc, int timeout_ms)
{
    if (kvc->done_subs != NULL)
        return;
    tdm_net_wait(kvc->net, timeout_ms);
}

tdm_net_t *tdm_kvc_net(tdm_kvc_t *kvc)
{
    return kvc->net;
}

size_t tdm_kvc_num_ready(const tdm_kvc_t *kvc)
{
    size_t n = 0;
    for (size_t s = 0; s < kvc->n_stores; s++)
        n += kvc->stores[s].state == ST_READY;
    return n;
}

tdm_status_t tdm_kvc_wait_ready(tdm_kvc_t *kvc, int timeout_ms)
{
    int64_t end = tdm_net_now_ms() + timeout_ms;
    while (tdm_kvc_num_ready(kvc) < kvc->n_stores) {
        if (tdm_net_now_ms() >= end)
            return TDM_ERR_TIMEOUT;
        if (tdm_kvc_progress(kvc) == 0)
            tdm_kvc_wait(kvc, 5);
    }
    return TDM_OK;
}

tdm_status_t tdm_kvc_mem_map(tdm_kvc_t *kvc, void *buf, size_t len, void **memh)
{
    return tdm_net_mem_map(kvc->net, buf, len, memh);
}

void tdm_kvc_mem_unmap(tdm_kvc_t *kvc, void *memh)
{
    tdm_net_mem_unmap(kvc->net, memh);
}

/* ---- blocking wrappers ---- */

typedef struct sync_wait {
    bool done;
    tdm_status_t status;
} sync_wait_t;

static void sync_cb(void *user, tdm_status_t status)
{
    sync_wait_t *w = user;
    w->done = true;
    w->status = status;
}

static tdm_status_t sync_run(tdm_kvc_t *kvc, sync_wait_t *w, tdm_status_t submitted)
{
    if (submitted != TDM_OK)
        return submitted;
    /* poll while replies come quickly, sleep on the event fd after 200 us
     * without work (the store's loop does the same) */
    int64_t idle_since = 0;
    while (!w->done) {
        if (tdm_kvc_progress(kvc) > 0 || w->done) {
            idle_since = 0;
            continue;
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t us = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
        if (idle_since == 0)
            idle_since = us;
        else if (us - idle_since > 200)
            tdm_kvc_wait(kvc, 2);
    }
    return w->status;
}

tdm_status_t tdm_kvc_put_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                              const void *const *bufs, const size_t *lens, uint32_t lease_ms,
                              tdm_status_t *status)
{
    sync_wait_t w = {0};
    return sync_run(kvc, &w, tdm_kvc_put(kvc, n, keys, bufs, lens, lease_ms, status, sync_cb, &w));
}

tdm_status_t tdm_kvc_get_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                              void *const *bufs, const size_t *caps, size_t *lens,
                              tdm_status_t *status)
{
    sync_wait_t w = {0};
    return sync_run(kvc, &w, tdm_kvc_get(kvc, n, keys, bufs, caps, lens, status, sync_cb, &w));
}

tdm_status_t tdm_kvc_lookup_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                                 size_t *n_leading)
{
    sync_wait_t w = {0};
    return sync_run(kvc, &w, tdm_kvc_lookup(kvc, n, keys, n_leading, sync_cb, &w));
}

tdm_status_t tdm_kvc_release_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                                  tdm_status_t *status)
{
    sync_wait_t w = {0};
    return sync_run(kvc, &w, tdm_kvc_release(kvc, n, keys, status, sync_cb, &w));
}

tdm_status_t tdm_kvc_delete_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                                 tdm_status_t *status)
{
    sync_wait_t w = {0};
    return sync_run(kvc, &w, tdm_kvc_delete(kvc, n, keys, status, sync_cb, &w));
}

tdm_status_t tdm_kvc_stats_sync(tdm_kvc_t *kvc, size_t store, tdm_kvc_stats_t *out)
{
    sync_wait_t w = {0};
    return sync_run(kvc, &w, tdm_kvc_stats(kvc, store, out, sync_cb, &w));
}

/* ---- life cycle ---- */

tdm_status_t tdm_kvc_create(const tdm_kvc_config_t *cfg, tdm_kvc_t **out)
{
    if (cfg == NULL || cfg->n_stores == 0 || cfg->n_stores > TDM_KVC_MAX_STORES) {
        tdm_log_error(LOG_MOD, "give between 1 and %d stores", TDM_KVC_MAX_STORES);
        return TDM_ERR_INVALID;
    }
    if (cfg->replicas < 0 || cfg->replicas > 2) {
        tdm_log_error(LOG_MOD, "replicas must be 1 or 2, not %d", cfg->replicas);
        return TDM_ERR_INVALID;
    }
    size_t tl = cfg->token ? strlen(cfg->token) : 0;
    if (tl > KVP_MAX_TOKEN) {
        tdm_log_error(LOG_MOD, "the cluster token is longer than %d bytes", KVP_MAX_TOKEN);
        return TDM_ERR_INVALID;
    }
    tdm_kvc_t *kvc = calloc(1, sizeof(*kvc));
    if (kvc == NULL)
        return TDM_ERR_NOMEM;
    kvc->n_stores = cfg->n_stores;
    kvc->replicas = cfg->replicas ? cfg->replicas : 1;
    if ((size_t)kvc->replicas > kvc->n_stores)
        kvc->replicas = (int)kvc->n_stores;
    memcpy(kvc->token, cfg->token ? cfg->token : "", tl);
    kvc->token_len = tl;
    snprintf(kvc->name, sizeof(kvc->name), "%s", cfg->name ? cfg->name : "client");
    kvc->deadline_ms = cfg->deadline_ms > 0 ? cfg->deadline_ms : 3000;
    kvc->backoff_min_ms = cfg->backoff_min_ms > 0 ? cfg->backoff_min_ms : 100;
    kvc->backoff_max_ms = cfg->backoff_max_ms > 0 ? cfg->backoff_max_ms : 5000;
    for (size_t s = 0; s < cfg->n_stores; s++) {
        kvc_store_t *st = &kvc->stores[s];
        st->kvc = kvc;
        st->index = s;
        snprintf(st->addr, sizeof(st->addr), "%s", cfg->stores[s]);
        if (tdm_net_parse_addr(cfg->stores[s], st->host, sizeof(st->host), &st->port) != TDM_OK ||
            st->port == 0) {
            tdm_log_error(LOG_MOD, "store address '%s' is not HOST:PORT", cfg->stores[s]);
            free(kvc);
            return TDM_ERR_INVALID;
        }
        st->seed = XXH3_64bits(st->addr, strlen(st->addr));
        st->max_inflight = 1;
    }
    if (cfg->net != NULL) {
        kvc->net = cfg->net;
    } else {
        tdm_net_config_t nc = {.name = kvc->name, .token = kvc->token};
        tdm_status_t s = tdm_net_create(&nc, &kvc->net);
        if (s != TDM_OK) {
            free(kvc);
            return s;
        }
        kvc->own_net = true;
    }
    if (tdm_net_set_handler(kvc->net, KVP_AM_HELLO_REPLY, on_hello_reply, kvc) != TDM_OK ||
        tdm_net_set_handler(kvc->net, KVP_AM_GET_ITEM, on_get_item, kvc) != TDM_OK ||
        tdm_net_set_handler(kvc->net, KVP_AM_REPLY, on_reply, kvc) != TDM_OK) {
        if (kvc->own_net)
            tdm_net_destroy(kvc->net);
        free(kvc);
        return TDM_ERR_IO;
    }
    for (size_t s = 0; s < kvc->n_stores; s++)
        store_connect(&kvc->stores[s]);
    *out = kvc;
    return TDM_OK;
}

void tdm_kvc_destroy(tdm_kvc_t *kvc)
{
    if (kvc == NULL)
        return;
    for (size_t s = 0; s < kvc->n_stores; s++) {
        kvc_store_t *st = &kvc->stores[s];
        if (st->conn != NULL) {
            tdm_conn_close(st->conn, true);
            st->conn = NULL;
        }
        st->state = ST_DOWN;
        store_fail_all(st, TDM_ERR_CANCELLED);
    }
    /* let the failed transfers come back before the buffers go */
    int64_t end = tdm_net_now_ms() + 2000;
    for (;;) {
        tdm_net_progress(kvc->net);
        finish_done(kvc);
        bool busy = false;
        for (size_t s = 0; s < kvc->n_stores; s++)
            busy |= kvc->stores[s].flight != NULL;
        if (!busy || tdm_net_now_ms() > end)
            break;
        tdm_net_wait(kvc->net, 2);
    }
    if (kvc->own_net)
        tdm_net_destroy(kvc->net);
    else {
        tdm_net_set_handler(kvc->net, KVP_AM_HELLO_REPLY, NULL, NULL);
        tdm_net_set_handler(kvc->net, KVP_AM_GET_ITEM, NULL, NULL);
        tdm_net_set_handler(kvc->net, KVP_AM_REPLY, NULL, NULL);
    }
    finish_done(kvc);
    free(kvc);
}
