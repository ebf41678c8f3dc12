/* tandem-kvstore's server loop (server.h, docs/kvstore.md).
 *
 * One thread drives UCX and owns the block index (blocks.h). Clients are
 * connections that passed the transport's handshake (the cluster token,
 * net/handshake.h) and then said Hello with the protocol version; before
 * the Hello, anything else closes the connection. Any message that fails its
 * decoder (kvproto.h) closes the connection too, with the reason logged
 * once: a peer that speaks the protocol wrong cannot be trusted with the
 * next message either.
 *
 * PUT items are received by rendezvous straight into the pool extent that
 * the index reserved; the extent becomes a block when the receive
 * completes, or is freed when it fails. GET payloads are sent from the
 * pool with the block pinned until the send completes. A client struct
 * lives until its connection is gone and every transfer of it has called
 * back, so callbacks never see freed memory; only then are its leases
 * ended. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "blocks.h"
#include "kvproto.h"
#include "server.h"
#include "tandem/http.h"
#include "tandem/log.h"
#include "tandem/metrics.h"
#include "tandem/net.h"

#define LOG_MOD "kvstore"

typedef struct kvs_server kvs_server_t;
typedef struct kvs_client kvs_client_t;

typedef struct kvs_batch {
    kvs_client_t *cl;
    /* status[] has room for KVP_MAX_KEYS: batches are recycled */
    uint64_t id;
    uint32_t count, n_done;
    int64_t started_us;
    Tandem__Kv__Status *status;
    struct kvs_batch *next;
} kvs_batch_t;

typedef struct kvs_recv {
    struct kvs_recv *next_free;
    kvs_client_t *cl;
    kvs_batch_t *batch;
    uint32_t index;
    tdm_kvs_block_id_t id;
    uint64_t length;
} kvs_recv_t;

typedef struct kvs_get {
    struct kvs_get *next_free;
    kvs_client_t *cl;
    int pending;
    int64_t started_us;
} kvs_get_t;

typedef struct kvs_send {
    struct kvs_send *next_free;
    kvs_get_t *get;
    tdm_kvs_block_id_t id;
    uint64_t length;
} kvs_send_t;

enum { M_PUT, M_GET, M_LOOKUP, M_RELEASE, M_DELETE, M_STATS, M_N };

struct kvs_client {
    kvs_server_t *srv;
    tdm_conn_t *conn; /* NULL once closed */
    uint32_t owner;
    bool authed;
    char name[96];
    int refs;      /* the connection + transfers in flight */
    int inflight;  /* requests being served */
    int transfers; /* payload sends and receives in flight */
    int64_t last_progress;
    kvs_batch_t *batches;
    kvs_client_t *next;
};

struct kvs_server {
    kvs_config_t cfg;
    tdm_net_t *net;
    void *pool;
    void *pool_memh;
    tdm_kvs_blocks_t *blocks;
    kvs_client_t *clients;
    uint32_t next_owner;
    int n_clients;
    bool draining;
    /* recycled per-message records and scratch: steady traffic does not
     * malloc (they grow to the peak in flight and stay) */
    kvs_batch_t *free_batches;
    kvs_recv_t *free_recvs;
    kvs_send_t *free_sends;
    kvs_get_t *free_gets;
    uint8_t *scratch; /* a packed control message */
    size_t scratch_len;
    Tandem__Kv__Status *item_st; /* [KVP_MAX_KEYS] */
    uint64_t *item_len;          /* [KVP_MAX_KEYS] */
    tdm_kvs_block_id_t *item_id; /* [KVP_MAX_KEYS] */
    uint64_t *item_off;          /* [KVP_MAX_KEYS] */
    uint8_t present[KVP_MAX_KEYS / 8];
    uint64_t puts, gets, bytes_in, bytes_out, refused;
    uint64_t net_refused; /* handshakes the transport refused, counted in refused */
    /* metrics */
    tdm_metrics_registry_t *reg;
    tdm_http_server_t *http;
    tdm_metrics_gauge_t *g_blocks, *g_used, *g_free, *g_reserved, *g_leased, *g_pinned, *g_clients,
        *g_capacity, *g_largest;
    tdm_metrics_counter_t *c_hits, *c_misses, *c_evictions, *c_puts, *c_gets, *c_in, *c_out,
        *c_refused;
    tdm_metrics_histogram_t *h_op[M_N];
    uint64_t last_hits, last_misses, last_evictions;
};

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Microseconds the loop keeps polling after its last work before it sleeps
 * on the event fd. */
#define KVS_SPIN_US 200

/* Free lists of the per-message records. */
#define KVS_TAKE(srv, list, type)                                                                  \
    ({                                                                                             \
        type *r_ = (srv)->list;                                                                    \
        if (r_ != NULL)                                                                            \
            (srv)->list = r_->next_free;                                                           \
        else                                                                                       \
            r_ = malloc(sizeof(type));                                                             \
        r_;                                                                                        \
    })
#define KVS_GIVE(srv, list, r)                                                                     \
    do {                                                                                           \
        (r)->next_free = (srv)->list;                                                              \
        (srv)->list = (r);                                                                         \
    } while (0)

/* ---- clients ---- */

static void client_unref(kvs_client_t *cl)
{
    if (--cl->refs > 0)
        return;
    kvs_server_t *srv = cl->srv;
    /* every receive has called back: no extent of this owner is written */
    tdm_kvs_blocks_drop_owner(srv->blocks, cl->owner);
    while (cl->batches != NULL) {
        kvs_batch_t *b = cl->batches;
        cl->batches = b->next;
        free(b->status);
        free(b);
    }
    for (kvs_client_t **pp = &srv->clients; *pp != NULL; pp = &(*pp)->next)
        if (*pp == cl) {
            *pp = cl->next;
            break;
        }
    free(cl);
}

static void client_close(kvs_client_t *cl, bool force)
{
    if (cl->conn == NULL)
        return;
    tdm_conn_close(cl->conn, force);
    cl->conn = NULL;
    cl->srv->n_clients--;
    tdm_log_debug(LOG_MOD, "client %s gone", cl->name);
    client_unref(cl);
}

static void on_client_error(void *user, tdm_conn_t *conn, tdm_status_t why)
{
    kvs_client_t *cl = user;
    tdm_log_info(LOG_MOD, "client %s disconnected (%s)", cl->name, tdm_status_str(why));
    client_close(cl, true);
}

/* Bad input: logged once, counted, connection closed (by force: nothing
 * more is read from it). */
static void refuse(kvs_client_t *cl, const char *reason)
{
    kvs_server_t *srv = cl->srv;
    tdm_log_warn(LOG_MOD, "client %s: %s; closing the connection", cl->name, reason);
    srv->refused++;
    tdm_metrics_counter_inc(srv->c_refused);
    client_close(cl, true);
}

static void on_accept(void *user, tdm_conn_t *conn)
{
    kvs_server_t *srv = user;
    if (srv->draining || srv->n_clients >= srv->cfg.max_clients) {
        tdm_log_warn(LOG_MOD, "refusing %s: %s", tdm_conn_peer(conn),
                     srv->draining ? "draining" : "too many clients (--max-clients)");
        tdm_conn_close(conn, true);
        return;
    }
    kvs_client_t *cl = calloc(1, sizeof(*cl));
    if (cl == NULL) {
        tdm_conn_close(conn, true);
        return;
    }
    cl->srv = srv;
    cl->conn = conn;
    cl->owner = ++srv->next_owner;
    cl->refs = 1;
    cl->last_progress = tdm_net_now_ms();
    snprintf(cl->name, sizeof(cl->name), "%s", tdm_conn_peer(conn));
    cl->next = srv->clients;
    srv->clients = cl;
    srv->n_clients++;
    tdm_conn_set_owner(conn, cl, on_client_error);
}

static kvs_client_t *msg_client(const tdm_net_msg_t *msg)
{
    kvs_client_t *cl = tdm_conn_owner(msg->conn);
    return cl != NULL && cl->conn == msg->conn ? cl : NULL;
}

/* ---- replies ---- */

static void send_reply(kvs_client_t *cl, Tandem__Kv__Reply *r)
{
    if (cl->conn == NULL)
        return;
    size_t len = tandem__kv__reply__get_packed_size(r);
    kvs_server_t *srv = cl->srv;
    if (len > srv->scratch_len) { /* a reply to at most KVP_MAX_KEYS keys fits */
        tdm_log_error(LOG_MOD, "a reply of %zu bytes does not fit its buffer", len);
        client_close(cl, true);
        return;
    }
    tandem__kv__reply__pack(r, srv->scratch);
    if (tdm_conn_send(cl->conn, KVP_AM_REPLY, NULL, 0, srv->scratch, len, true, NULL, NULL) !=
        TDM_OK)
        client_close(cl, true);
}

static void reply_status(kvs_client_t *cl, uint64_t id, int op, Tandem__Kv__Status st,
                         const char *message)
{
    Tandem__Kv__Reply r = TANDEM__KV__REPLY__INIT;
    r.id = id;
    r.op = (Tandem__Kv__Op)op;
    r.status = st;
    r.message = (char *)message;
    send_reply(cl, &r);
}

/* ---- hello ---- */

static void closed_after_send(void *user, tdm_status_t status)
{
    kvs_client_t *cl = user;
    client_close(cl, true);
    client_unref(cl);
}

static void on_hello(void *user, const tdm_net_msg_t *msg)
{
    kvs_server_t *srv = user;
    kvs_client_t *cl = msg_client(msg);
    if (cl == NULL)
        return;
    char err[160];
    Tandem__Kv__Hello *h;
    if (cl->authed) {
        refuse(cl, "a second hello");
        return;
    }
    if (msg->rndv || !kvp_decode_hello(msg->data, msg->length, &h, err, sizeof(err))) {
        refuse(cl, msg->rndv ? "a hello too large" : err);
        return;
    }
    Tandem__Kv__HelloReply r = TANDEM__KV__HELLO_REPLY__INIT;
    r.version = KVP_VERSION;
    bool ok = true;
    if (h->version != KVP_VERSION) {
        r.status = TANDEM__KV__STATUS__S_BAD_VERSION;
        r.message = "protocol version not spoken";
        ok = false;
    } else if (srv->draining) {
        r.status = TANDEM__KV__STATUS__S_DRAINING;
        r.message = "the store is shutting down";
        ok = false;
    }
    if (ok) {
        r.max_block_bytes = srv->cfg.max_block_bytes;
        r.max_keys = KVP_MAX_KEYS;
        r.max_inflight = (uint32_t)srv->cfg.max_inflight;
        if (h->name[0] != '\0')
            snprintf(cl->name, sizeof(cl->name), "%s (%.60s)", tdm_conn_peer(cl->conn), h->name);
    }
    kvp_free(h);
    uint8_t buf[512];
    size_t len = tandem__kv__hello_reply__pack(&r, buf);
    if (!ok) {
        tdm_log_warn(LOG_MOD, "client %s refused: %s; closing the connection", cl->name, r.message);
        srv->refused++;
        tdm_metrics_counter_inc(srv->c_refused);
        /* the refusal goes out first, then the connection closes */
        cl->refs++;
        if (tdm_conn_send(cl->conn, KVP_AM_HELLO_REPLY, NULL, 0, buf, len, true, closed_after_send,
                          cl) != TDM_OK)
            closed_after_send(cl, TDM_ERR_IO);
        return;
    }
    cl->authed = true;
    tdm_log_info(LOG_MOD, "client %s connected", cl->name);
    if (tdm_conn_send(cl->conn, KVP_AM_HELLO_REPLY, NULL, 0, buf, len, true, NULL, NULL) != TDM_OK)
        client_close(cl, true);
}

/* ---- PUT ---- */

static kvs_batch_t *batch_get(kvs_client_t *cl, uint64_t id, uint32_t count, bool *bad)
{
    *bad = false;
    for (kvs_batch_t *b = cl->batches; b != NULL; b = b->next)
        if (b->id == id) {
            *bad = b->count != count;
            return *bad ? NULL : b;
        }
    if (cl->inflight >= cl->srv->cfg.max_inflight)
        return NULL;
    kvs_server_t *srv = cl->srv;
    kvs_batch_t *b = srv->free_batches;
    if (b != NULL) {
        srv->free_batches = b->next;
    } else {
        b = calloc(1, sizeof(*b));
        if (b == NULL)
            return NULL;
        b->status = malloc(KVP_MAX_KEYS * sizeof(*b->status));
        if (b->status == NULL) {
            free(b);
            return NULL;
        }
    }
    b->n_done = 0;
    for (uint32_t i = 0; i < count; i++)
        b->status[i] = (Tandem__Kv__Status)-1; /* not in yet */
    b->cl = cl;
    b->id = id;
    b->count = count;
    b->started_us = now_us();
    b->next = cl->batches;
    cl->batches = b;
    cl->inflight++;
    return b;
}

static void batch_item_done(kvs_batch_t *b, uint32_t index, Tandem__Kv__Status st)
{
    kvs_client_t *cl = b->cl;
    b->status[index] = st;
    if (++b->n_done < b->count)
        return;
    Tandem__Kv__Reply r = TANDEM__KV__REPLY__INIT;
    r.id = b->id;
    r.op = TANDEM__KV__OP__OP_PUT;
    r.n_item_status = b->count;
    r.item_status = b->status;
    send_reply(cl, &r);
    tdm_metrics_histogram_observe(cl->srv->h_op[M_PUT], (double)(now_us() - b->started_us) / 1e6);
    for (kvs_batch_t **pp = &cl->batches; *pp != NULL; pp = &(*pp)->next)
        if (*pp == b) {
            *pp = b->next;
            break;
        }
    cl->inflight--;
    b->next = cl->srv->free_batches;
    cl->srv->free_batches = b;
}

static void put_landed(void *user, tdm_status_t status)
{
    kvs_recv_t *rv = user;
    kvs_client_t *cl = rv->cl;
    kvs_server_t *srv = cl->srv;
    cl->transfers--;
    cl->last_progress = tdm_net_now_ms();
    Tandem__Kv__Status st;
    if (status == TDM_OK &&
        tdm_kvs_blocks_commit(srv->blocks, rv->id, (uint64_t)tdm_net_now_ms()) == TDM_OK) {
        srv->puts++;
        srv->bytes_in += rv->length;
        tdm_metrics_counter_inc(srv->c_puts);
        tdm_metrics_counter_add_u64(srv->c_in, rv->length);
        st = TANDEM__KV__STATUS__S_OK;
    } else {
        tdm_kvs_blocks_abort(srv->blocks, rv->id);
        st = TANDEM__KV__STATUS__S_BAD_REQUEST;
    }
    if (cl->conn != NULL)
        batch_item_done(rv->batch, rv->index, st);
    KVS_GIVE(srv, free_recvs, rv);
    client_unref(cl);
}

static void on_put_item(void *user, const tdm_net_msg_t *msg)
{
    kvs_server_t *srv = user;
    kvs_client_t *cl = msg_client(msg);
    if (cl == NULL)
        return;
    if (!cl->authed) {
        refuse(cl, "a PUT before hello");
        return;
    }
    char err[160];
    Tandem__Kv__PutItem *m;
    if (!kvp_decode_put_item(msg->header, msg->header_len, msg->length, &m, err, sizeof(err))) {
        refuse(cl, err);
        return;
    }
    bool bad;
    kvs_batch_t *b = batch_get(cl, m->id, m->count, &bad);
    if (b == NULL || b->status[m->index] != (Tandem__Kv__Status)-1) {
        uint64_t id = m->id;
        kvp_free(m);
        if (bad || b != NULL) {
            refuse(cl,
                   bad ? "PUT items of one batch disagree on its size" : "a PUT item sent twice");
            return;
        }
        /* over the in-flight budget: the payload is dropped */
        reply_status(cl, id, TANDEM__KV__OP__OP_PUT, TANDEM__KV__STATUS__S_BUSY,
                     "too many requests in flight");
        return;
    }
    cl->last_progress = tdm_net_now_ms();
    b->status[m->index] = (Tandem__Kv__Status)-2; /* arriving: a second copy is refused */
    tdm_hash128_t key = kvp_key_unpack(m->key.data);
    uint32_t index = m->index, lease = m->lease_ms;
    uint64_t len = m->length;
    kvp_free(m);
    if (srv->draining) {
        batch_item_done(b, index, TANDEM__KV__STATUS__S_DRAINING);
        return;
    }
    if (len > srv->cfg.max_block_bytes) {
        batch_item_done(b, index, TANDEM__KV__STATUS__S_TOO_LARGE);
        return;
    }
    tdm_kvs_reservation_t res;
    tdm_status_t s = tdm_kvs_blocks_reserve(srv->blocks, key, len, lease,
                                            (uint64_t)tdm_net_now_ms(), cl->owner, &res);
    if (s != TDM_OK) {
        batch_item_done(b, index,
                        s == TDM_ERR_NOMEM ? TANDEM__KV__STATUS__S_NO_SPACE
                                           : TANDEM__KV__STATUS__S_TOO_LARGE);
        return;
    }
    if (!res.created) {
        /* content-addressed: the same key is the same bytes; not moved */
        batch_item_done(b, index, TANDEM__KV__STATUS__S_EXISTS);
        return;
    }
    kvs_recv_t *rv = KVS_TAKE(srv, free_recvs, kvs_recv_t);
    if (rv == NULL) {
        tdm_kvs_blocks_abort(srv->blocks, res.id);
        batch_item_done(b, index, TANDEM__KV__STATUS__S_NO_SPACE);
        return;
    }
    *rv = (kvs_recv_t){NULL, cl, b, index, res.id, len};
    cl->refs++;
    cl->transfers++;
    if (tdm_net_recv(srv->net, msg, (char *)srv->pool + res.offset, put_landed, rv) != TDM_OK) {
        cl->refs--;
        cl->transfers--;
        KVS_GIVE(srv, free_recvs, rv);
        tdm_kvs_blocks_abort(srv->blocks, res.id);
        batch_item_done(b, index, TANDEM__KV__STATUS__S_NO_SPACE);
    }
}

/* ---- GET and the others ---- */

static void get_sent(void *user, tdm_status_t status)
{
    kvs_send_t *sd = user;
    kvs_get_t *g = sd->get;
    kvs_client_t *cl = g->cl;
    kvs_server_t *srv = cl->srv;
    tdm_kvs_blocks_unpin(srv->blocks, sd->id);
    cl->transfers--;
    cl->last_progress = tdm_net_now_ms();
    if (status == TDM_OK) {
        srv->bytes_out += sd->length;
        tdm_metrics_counter_add_u64(srv->c_out, sd->length);
    }
    KVS_GIVE(srv, free_sends, sd);
    if (--g->pending == 0) {
        tdm_metrics_histogram_observe(srv->h_op[M_GET], (double)(now_us() - g->started_us) / 1e6);
        cl->inflight--;
        KVS_GIVE(srv, free_gets, g);
    }
    client_unref(cl);
}

static void serve_get(kvs_client_t *cl, const Tandem__Kv__Request *req, size_t n)
{
    kvs_server_t *srv = cl->srv;
    Tandem__Kv__Status *st = srv->item_st;
    uint64_t *lens = srv->item_len;
    kvs_get_t *g = KVS_TAKE(srv, free_gets, kvs_get_t);
    if (g == NULL) {
        client_close(cl, true);
        return;
    }
    memset(lens, 0, n * sizeof(*lens));
    g->cl = cl;
    g->pending = 1; /* held while sending */
    g->started_us = now_us();
    cl->inflight++;
    cl->refs++;
    /* find and pin every key first: when all are here, the payloads alone
     * answer (no Reply message) */
    uint64_t now = (uint64_t)tdm_net_now_ms();
    size_t n_found = 0;
    for (size_t i = 0; i < n; i++) {
        tdm_hash128_t key = kvp_key_unpack(req->keys.data + i * KVP_KEY_BYTES);
        tdm_kvs_block_id_t id = tdm_kvs_blocks_find(srv->blocks, key, now);
        tdm_kvs_block_info_t info;
        srv->item_id[i] = -1;
        st[i] = TANDEM__KV__STATUS__S_NOT_FOUND;
        if (id < 0 || tdm_kvs_blocks_info(srv->blocks, id, &info) != TDM_OK ||
            tdm_kvs_blocks_pin(srv->blocks, id) != TDM_OK)
            continue;
        srv->item_id[i] = id;
        srv->item_off[i] = info.offset;
        lens[i] = info.length;
        n_found++;
    }
    bool all_sent = n_found == n;
    for (size_t i = 0; i < n; i++) {
        tdm_kvs_block_id_t id = srv->item_id[i];
        if (id < 0)
            continue;
        kvs_send_t *sd = KVS_TAKE(srv, free_sends, kvs_send_t);
        if (sd == NULL) {
            tdm_kvs_blocks_unpin(srv->blocks, id);
            lens[i] = 0;
            all_sent = false;
            continue;
        }
        uint8_t hdr[64];
        Tandem__Kv__GetItem gi = TANDEM__KV__GET_ITEM__INIT;
        gi.id = req->id;
        gi.index = (uint32_t)i;
        gi.all_found = n_found == n;
        size_t hl = tandem__kv__get_item__pack(&gi, hdr);
        *sd = (kvs_send_t){NULL, g, id, lens[i]};
        g->pending++;
        cl->refs++;
        cl->transfers++;
        if (cl->conn == NULL ||
            tdm_conn_send(cl->conn, KVP_AM_GET_ITEM, hdr, hl, (char *)srv->pool + srv->item_off[i],
                          lens[i], false, get_sent, sd) != TDM_OK) {
            get_sent(sd, TDM_ERR_IO);
            lens[i] = 0;
            all_sent = false;
            continue;
        }
        st[i] = TANDEM__KV__STATUS__S_OK;
        srv->gets++;
        tdm_metrics_counter_inc(srv->c_gets);
    }
    if (!all_sent) {
        Tandem__Kv__Reply r = TANDEM__KV__REPLY__INIT;
        r.id = req->id;
        r.op = TANDEM__KV__OP__OP_GET;
        r.n_item_status = n;
        r.item_status = st;
        r.n_item_length = n;
        r.item_length = lens;
        send_reply(cl, &r);
    }
    /* drop the hold: the GET ends now if nothing is being sent */
    if (--g->pending == 0) {
        tdm_metrics_histogram_observe(srv->h_op[M_GET], (double)(now_us() - g->started_us) / 1e6);
        cl->inflight--;
        KVS_GIVE(srv, free_gets, g);
    }
    client_unref(cl);
}

static void serve_small(kvs_client_t *cl, const Tandem__Kv__Request *req, size_t n)
{
    kvs_server_t *srv = cl->srv;
    int64_t t0 = now_us();
    Tandem__Kv__Reply r = TANDEM__KV__REPLY__INIT;
    r.id = req->id;
    r.op = req->op;
    Tandem__Kv__Status *st = NULL;
    uint8_t *present = NULL;
    Tandem__Kv__Stats stats = TANDEM__KV__STATS__INIT;
    int m = M_STATS;
    if (req->op == TANDEM__KV__OP__OP_LOOKUP) {
        m = M_LOOKUP;
        present = srv->present;
        memset(present, 0, (n + 7) / 8);
        uint32_t lead = 0;
        bool run = true;
        for (size_t i = 0; i < n; i++) {
            tdm_hash128_t key = kvp_key_unpack(req->keys.data + i * KVP_KEY_BYTES);
            bool here = tdm_kvs_blocks_peek(srv->blocks, key) >= 0;
            if (here)
                present[i / 8] |= (uint8_t)(1u << (i % 8));
            run = run && here;
            lead += run;
        }
        r.n_leading = lead;
        r.present.data = present;
        r.present.len = (n + 7) / 8;
    } else if (req->op == TANDEM__KV__OP__OP_RELEASE || req->op == TANDEM__KV__OP__OP_DELETE) {
        m = req->op == TANDEM__KV__OP__OP_RELEASE ? M_RELEASE : M_DELETE;
        st = srv->item_st;
        for (size_t i = 0; i < n; i++) {
            tdm_hash128_t key = kvp_key_unpack(req->keys.data + i * KVP_KEY_BYTES);
            tdm_status_t s = req->op == TANDEM__KV__OP__OP_RELEASE
                                 ? tdm_kvs_blocks_release_lease(srv->blocks, key)
                                 : tdm_kvs_blocks_delete(srv->blocks, key);
            st[i] = s == TDM_OK ? TANDEM__KV__STATUS__S_OK : TANDEM__KV__STATUS__S_NOT_FOUND;
        }
        r.n_item_status = n;
        r.item_status = st;
    } else {
        tdm_kvs_blocks_stats_t bs;
        tdm_kvs_blocks_stats(srv->blocks, &bs);
        stats.blocks = bs.blocks;
        stats.bytes_used = bs.bytes_used;
        stats.capacity = bs.capacity;
        stats.bytes_free = bs.bytes_free;
        stats.bytes_reserved = bs.bytes_reserved;
        stats.leased = bs.leased;
        stats.pinned = bs.pinned;
        stats.hits = bs.hits;
        stats.misses = bs.misses;
        stats.evictions = bs.evictions;
        stats.puts = srv->puts;
        stats.gets = srv->gets;
        stats.bytes_in = srv->bytes_in;
        stats.bytes_out = srv->bytes_out;
        stats.clients = (uint64_t)srv->n_clients;
        stats.refused = srv->refused;
        r.stats = &stats;
    }
    send_reply(cl, &r);
    tdm_metrics_histogram_observe(srv->h_op[m], (double)(now_us() - t0) / 1e6);
}

static void on_request(void *user, const tdm_net_msg_t *msg)
{
    kvs_server_t *srv = user;
    kvs_client_t *cl = msg_client(msg);
    if (cl == NULL)
        return;
    if (!cl->authed) {
        refuse(cl, "a request before hello");
        return;
    }
    char err[160];
    Tandem__Kv__Request *req;
    if (msg->rndv || !kvp_decode_request(msg->data, msg->length, &req, err, sizeof(err))) {
        refuse(cl, msg->rndv ? "a request too large" : err);
        return;
    }
    cl->last_progress = tdm_net_now_ms();
    size_t n = req->keys.len / KVP_KEY_BYTES;
    /* Draining, the store still serves reads (its connected clients' GETs
     * and LOOKUPs: a client's GET may arrive as several requests, and a
     * decode node waiting for blocks should get them rather than recompute)
     * but takes no new blocks. The drain ends when nothing is in flight or
     * at --drain-timeout. */
    if (srv->draining && req->op != TANDEM__KV__OP__OP_STATS && req->op != TANDEM__KV__OP__OP_GET &&
        req->op != TANDEM__KV__OP__OP_LOOKUP) {
        reply_status(cl, req->id, req->op, TANDEM__KV__STATUS__S_DRAINING,
                     "the store is shutting down");
    } else if (req->op == TANDEM__KV__OP__OP_GET) {
        if (cl->inflight >= srv->cfg.max_inflight)
            reply_status(cl, req->id, req->op, TANDEM__KV__STATUS__S_BUSY,
                         "too many requests in flight");
        else
            serve_get(cl, req, n);
    } else {
        serve_small(cl, req, n);
    }
    kvp_free(req);
}

/* Messages that only the store sends, or ids that tandem never uses. */
static void on_unexpected(void *user, const tdm_net_msg_t *msg)
{
    kvs_client_t *cl = msg_client(msg);
    if (cl == NULL)
        return;
    char why[64];
    snprintf(why, sizeof(why), "unknown message id %u", msg->am_id);
    refuse(cl, why);
}

/* ---- metrics ---- */

static const double op_buckets[] = {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
                                    25e-3, 50e-3,  0.1,    0.25,   0.5,  1,      2.5,  5};

static tdm_status_t metrics_init(kvs_server_t *srv)
{
    tdm_metrics_registry_t *reg;
    if (tdm_metrics_registry_create(&reg) != TDM_OK)
        return TDM_ERR_NOMEM;
    srv->reg = reg;
    struct {
        const char *name, *help;
        tdm_metrics_gauge_t **g;
    } gauges[] = {
        {"tandem_kvstore_blocks", "Blocks stored (ready to GET).", &srv->g_blocks},
        {"tandem_kvstore_bytes_used", "Pool bytes held by blocks, arriving ones included.",
         &srv->g_used},
        {"tandem_kvstore_bytes_free", "Pool bytes free.", &srv->g_free},
        {"tandem_kvstore_bytes_reserved", "Pool bytes of PUTs still arriving.", &srv->g_reserved},
        {"tandem_kvstore_capacity_bytes", "Pool capacity in bytes.", &srv->g_capacity},
        {"tandem_kvstore_largest_free_bytes", "Largest free extent of the pool.", &srv->g_largest},
        {"tandem_kvstore_leased_blocks", "Blocks pinned by a lease.", &srv->g_leased},
        {"tandem_kvstore_pinned_blocks", "Blocks being sent.", &srv->g_pinned},
        {"tandem_kvstore_clients", "Connected clients.", &srv->g_clients},
    };
    for (size_t i = 0; i < sizeof(gauges) / sizeof(gauges[0]); i++)
        if (tdm_metrics_gauge_register(reg, gauges[i].name, gauges[i].help, gauges[i].g) != TDM_OK)
            return TDM_ERR_INTERNAL;
    struct {
        const char *name, *help;
        tdm_metrics_counter_t **c;
    } counters[] = {
        {"tandem_kvstore_hits_total", "GET keys found.", &srv->c_hits},
        {"tandem_kvstore_misses_total", "GET keys not found.", &srv->c_misses},
        {"tandem_kvstore_evictions_total", "Blocks evicted to make room.", &srv->c_evictions},
        {"tandem_kvstore_puts_total", "Blocks stored by PUT.", &srv->c_puts},
        {"tandem_kvstore_gets_total", "Blocks sent by GET.", &srv->c_gets},
        {"tandem_kvstore_bytes_in_total", "Payload bytes received.", &srv->c_in},
        {"tandem_kvstore_bytes_out_total", "Payload bytes sent.", &srv->c_out},
        {"tandem_kvstore_refused_total", "Connections closed for bad input or a bad token.",
         &srv->c_refused},
    };
    for (size_t i = 0; i < sizeof(counters) / sizeof(counters[0]); i++)
        if (tdm_metrics_counter_register(reg, counters[i].name, counters[i].help, counters[i].c) !=
            TDM_OK)
            return TDM_ERR_INTERNAL;
    const char *label = "op";
    tdm_metrics_desc_t d = {
        .type = TDM_METRICS_TYPE_HISTOGRAM,
        .name = "tandem_kvstore_op_seconds",
        .help = "Time to serve an operation, from its request to its last payload sent or "
                "received.",
        .label_names = &label,
        .n_labels = 1,
        .max_children = M_N,
        .buckets = op_buckets,
        .n_buckets = (int)(sizeof(op_buckets) / sizeof(op_buckets[0])),
    };
    tdm_metrics_family_t *fam;
    if (tdm_metrics_family_register(reg, &d, &fam) != TDM_OK)
        return TDM_ERR_INTERNAL;
    static const char *names[M_N] = {"put", "get", "lookup", "release", "delete", "stats"};
    for (int i = 0; i < M_N; i++) {
        const char *v[1] = {names[i]};
        if (tdm_metrics_family_histogram(fam, v, &srv->h_op[i]) != TDM_OK)
            return TDM_ERR_INTERNAL;
    }
    tdm_metrics_gauge_set(srv->g_capacity, (double)srv->cfg.capacity);
    return TDM_OK;
}

static void metrics_update(kvs_server_t *srv)
{
    tdm_kvs_blocks_stats_t bs;
    tdm_kvs_blocks_stats(srv->blocks, &bs);
    tdm_metrics_gauge_set(srv->g_blocks, (double)bs.blocks);
    tdm_metrics_gauge_set(srv->g_used, (double)bs.bytes_used);
    tdm_metrics_gauge_set(srv->g_free, (double)bs.bytes_free);
    tdm_metrics_gauge_set(srv->g_reserved, (double)bs.bytes_reserved);
    tdm_metrics_gauge_set(srv->g_capacity, (double)bs.capacity);
    tdm_metrics_gauge_set(srv->g_largest, (double)bs.largest_free);
    tdm_metrics_gauge_set(srv->g_leased, (double)bs.leased);
    tdm_metrics_gauge_set(srv->g_pinned, (double)bs.pinned);
    tdm_metrics_gauge_set(srv->g_clients, (double)srv->n_clients);
    tdm_metrics_counter_add_u64(srv->c_hits, bs.hits - srv->last_hits);
    tdm_metrics_counter_add_u64(srv->c_misses, bs.misses - srv->last_misses);
    tdm_metrics_counter_add_u64(srv->c_evictions, bs.evictions - srv->last_evictions);
    srv->last_hits = bs.hits;
    srv->last_misses = bs.misses;
    srv->last_evictions = bs.evictions;
}

/* ---- the loop ---- */

static void check_clients(kvs_server_t *srv, int64_t now)
{
    kvs_client_t *cl = srv->clients;
    while (cl != NULL) {
        kvs_client_t *next = cl->next;
        /* a PUT batch whose items stopped coming holds a slot: the
         * client is as stuck as one that stopped reading */
        bool stale_batch = false;
        for (kvs_batch_t *b = cl->batches; b != NULL; b = b->next)
            stale_batch |= now * 1000 - b->started_us > (int64_t)srv->cfg.client_timeout_ms * 1000;
        if (cl->conn != NULL && cl->transfers == 0 && stale_batch) {
            tdm_log_warn(LOG_MOD,
                         "client %s left a PUT batch incomplete for %d ms; closing it "
                         "(--client-timeout)",
                         cl->name, srv->cfg.client_timeout_ms);
            client_close(cl, true);
        } else if (cl->conn != NULL && cl->transfers > 0 &&
                   now - cl->last_progress > srv->cfg.client_timeout_ms) {
            tdm_log_warn(LOG_MOD,
                         "client %s moved no data for %d ms with %d transfers pending; closing "
                         "it (--client-timeout)",
                         cl->name, srv->cfg.client_timeout_ms, cl->transfers);
            client_close(cl, true);
        }
        cl = next;
    }
}

static int total_inflight(const kvs_server_t *srv)
{
    int n = 0;
    for (const kvs_client_t *cl = srv->clients; cl != NULL; cl = cl->next)
        n += cl->transfers + cl->inflight;
    return n;
}

/* The pool is mapped, asked for huge pages, and touched once at start, so
 * that no PUT pays for page faults (they cost PUT throughput 2.5x). */
static void *pool_alloc(uint64_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED)
        return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    for (uint64_t off = 0; off < bytes; off += 4096)
        ((volatile char *)p)[off] = 0;
    return p;
}

static bool ready_fn(void *arg, char *reason, size_t reason_len)
{
    const kvs_server_t *srv = arg;
    if (srv->draining) {
        snprintf(reason, reason_len, "draining");
        return false;
    }
    return true;
}

static void server_fini(kvs_server_t *srv)
{
    tdm_http_server_destroy(srv->http);
    if (srv->net != NULL) {
        for (kvs_client_t *cl = srv->clients; cl != NULL; cl = cl->next)
            if (cl->conn != NULL) {
                tdm_conn_close(cl->conn, true);
                cl->conn = NULL;
            }
        tdm_net_mem_unmap(srv->net, srv->pool_memh);
        tdm_net_destroy(srv->net);
    }
    while (srv->clients != NULL) {
        kvs_client_t *cl = srv->clients;
        srv->clients = cl->next;
        while (cl->batches != NULL) {
            kvs_batch_t *b = cl->batches;
            cl->batches = b->next;
            free(b->status);
            free(b);
        }
        free(cl);
    }
    tdm_kvs_blocks_destroy(srv->blocks);
    while (srv->free_batches != NULL) {
        kvs_batch_t *b = srv->free_batches;
        srv->free_batches = b->next;
        free(b->status);
        free(b);
    }
#define KVS_DRAIN(list, type)                                                                      \
    while (srv->list != NULL) {                                                                    \
        type *r_ = srv->list;                                                                      \
        srv->list = r_->next_free;                                                                 \
        free(r_);                                                                                  \
    }
    KVS_DRAIN(free_recvs, kvs_recv_t)
    KVS_DRAIN(free_sends, kvs_send_t)
    KVS_DRAIN(free_gets, kvs_get_t)
#undef KVS_DRAIN
    free(srv->scratch);
    free(srv->item_st);
    free(srv->item_len);
    free(srv->item_id);
    free(srv->item_off);
    if (srv->pool != NULL)
        munmap(srv->pool, srv->cfg.capacity);
    tdm_metrics_registry_destroy(srv->reg);
}

int kvs_run(const kvs_config_t *cfg, volatile sig_atomic_t *stop)
{
    kvs_server_t srv_, *srv = &srv_;
    memset(srv, 0, sizeof(*srv));
    srv->cfg = *cfg;
    char host[80];
    int port;
    if (tdm_net_parse_addr(cfg->listen, host, sizeof(host), &port) != TDM_OK) {
        tdm_log_error(LOG_MOD, "--listen '%s' is not HOST:PORT", cfg->listen);
        return 1;
    }
    if (!cfg->insecure && (cfg->token == NULL || cfg->token[0] == '\0')) {
        tdm_log_error(LOG_MOD, "no cluster token: set --cluster-token or TANDEM_CLUSTER_TOKEN "
                               "(or --insecure on a trusted network)");
        return 1;
    }
    if (cfg->token != NULL && strlen(cfg->token) > KVP_MAX_TOKEN) {
        tdm_log_error(LOG_MOD, "the cluster token is longer than %d bytes", KVP_MAX_TOKEN);
        return 1;
    }
    int rc = 1;
    srv->scratch_len = 2 * KVP_MAX_CONTROL;
    srv->scratch = malloc(srv->scratch_len);
    srv->item_st = malloc(KVP_MAX_KEYS * sizeof(*srv->item_st));
    srv->item_len = malloc(KVP_MAX_KEYS * sizeof(*srv->item_len));
    srv->item_id = malloc(KVP_MAX_KEYS * sizeof(*srv->item_id));
    srv->item_off = malloc(KVP_MAX_KEYS * sizeof(*srv->item_off));
    if (srv->scratch == NULL || srv->item_st == NULL || srv->item_len == NULL ||
        srv->item_id == NULL || srv->item_off == NULL)
        goto out;
    if (tdm_kvs_blocks_create(cfg->capacity, cfg->max_block_bytes, 0, &srv->blocks) != TDM_OK)
        goto out;
    srv->pool = pool_alloc(cfg->capacity);
    if (srv->pool == NULL) {
        tdm_log_error(LOG_MOD, "cannot map a pool of %llu bytes: lower --capacity",
                      (unsigned long long)cfg->capacity);
        goto out;
    }
    if (metrics_init(srv) != TDM_OK) {
        tdm_log_error(LOG_MOD, "cannot set up the metrics");
        goto out;
    }
    tdm_net_config_t nc = {
        .name = "kvstore", .token = cfg->insecure ? NULL : cfg->token, .local_addr = host};
    if (tdm_net_create(&nc, &srv->net) != TDM_OK)
        goto out;
    if (tdm_net_mem_map(srv->net, srv->pool, cfg->capacity, &srv->pool_memh) != TDM_OK)
        goto out;
    for (uint16_t id = 0; id <= TDM_NET_MAX_AM_ID; id++) {
        tdm_net_handler_t fn = on_unexpected;
        if (id == KVP_AM_HELLO)
            fn = on_hello;
        else if (id == KVP_AM_REQUEST)
            fn = on_request;
        else if (id == KVP_AM_PUT_ITEM)
            fn = on_put_item;
        if (tdm_net_set_handler(srv->net, id, fn, srv) != TDM_OK)
            goto out;
    }
    if (tdm_net_listen(srv->net, host, port, on_accept, srv) != TDM_OK)
        goto out;
    if (cfg->metrics_port > 0) {
        tdm_http_config_t hc = {
            .host = cfg->metrics_host,
            .port = cfg->metrics_port,
            .registry = srv->reg,
            .ready = ready_fn,
            .ready_arg = srv,
            .name = "kvstore",
        };
        hc.port_flag = "--metrics-port";
        if (tdm_http_server_create(&hc, &srv->http) != TDM_OK ||
            tdm_http_server_start(srv->http) != TDM_OK)
            goto out;
    }
    tdm_log_info(LOG_MOD,
                 "role kvstore: listening on %s:%d (UCX), pool %.2f GiB, blocks up to %llu "
                 "bytes, metrics on %s:%d, %s",
                 host, tdm_net_listen_port(srv->net), (double)cfg->capacity / (1 << 30),
                 (unsigned long long)cfg->max_block_bytes, cfg->metrics_host, cfg->metrics_port,
                 cfg->insecure ? "INSECURE (no token)" : "cluster token set");
    int64_t last_tick = 0, drain_end = 0, idle_since = 0;
    for (;;) {
        int work = tdm_net_progress(srv->net);
        int64_t now = tdm_net_now_ms();
        uint64_t nr = tdm_net_refused(srv->net);
        if (nr != srv->net_refused) { /* a wrong token or a peer that is not tandem */
            srv->refused += nr - srv->net_refused;
            tdm_metrics_counter_add_u64(srv->c_refused, nr - srv->net_refused);
            srv->net_refused = nr;
        }
        if (*stop && !srv->draining) {
            srv->draining = true;
            drain_end = now + cfg->drain_timeout_ms;
            tdm_net_stop_listening(srv->net);
            tdm_log_info(LOG_MOD,
                         "draining: stopped listening; %d operations in flight, waiting up to "
                         "%d ms",
                         total_inflight(srv), cfg->drain_timeout_ms);
        }
        if (now - last_tick >= 50) {
            last_tick = now;
            tdm_kvs_blocks_expire(srv->blocks, (uint64_t)now);
            check_clients(srv, now);
            metrics_update(srv);
        }
        if (srv->draining) {
            int left = total_inflight(srv);
            if (left == 0 || now >= drain_end) {
                if (left > 0)
                    tdm_log_warn(LOG_MOD, "drain timeout: %d operations still in flight", left);
                else
                    tdm_log_info(LOG_MOD, "drained: no operation in flight");
                break;
            }
        }
        /* Spin a little before sleeping: a wakeup through the event fd
         * costs more than the gap between the messages of a busy client. */
        if (work > 0)
            idle_since = 0;
        else if (idle_since == 0)
            idle_since = now_us();
        else if (now_us() - idle_since > KVS_SPIN_US)
            tdm_net_wait(srv->net, 20);
    }
    rc = 0;
out:
    server_fini(srv);
    if (rc == 0)
        tdm_log_info(LOG_MOD, "stopped");
    return rc;
}
