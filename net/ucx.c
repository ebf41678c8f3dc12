/* The UCX transport (include/tandem/net.h).
 *
 * Everything runs on the thread that calls tdm_net_progress(). Work that
 * must not happen inside a UCX callback (user error callbacks, endpoint
 * closes, completions of operations that finished at once) is queued and
 * done in tdm_net_progress() after ucp_worker_progress() returns.
 *
 * Connections open with tandem's own handshake over TCP (net/handshake.h):
 * the listener is a plain socket that tandem accepts and reads itself, so
 * UCX never parses a byte from a peer that has not proven the cluster
 * token. After the handshake each side connects an endpoint to the other's
 * worker address, and every message carries the receiver's connection id
 * in front of its header (net_tag); a message with an unknown id is
 * dropped. Sends made before the connection is up wait in its queue. */
#define _GNU_SOURCE /* accept4 */
#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include "handshake.h"
#include "tandem/log.h"
#include "tandem/net.h"

#define LOG_MOD "net"

#define NET_TAG          8    /* bytes of the receiver's connection id before each header */
#define HS_TIMEOUT_MS    5000 /* a handshake's whole time */
#define HS_MAX_ACCEPTING 64   /* server handshakes at once; the oldest gives way */
/* "I am closing this connection": tells the peer at once, so that a
 * close never waits for a timeout on the other side. UCX's own ids above
 * the users' (TDM_NET_MAX_AM_ID). */
#define NET_AM_BYE       (TDM_NET_MAX_AM_ID + 1)
#define BYE_TIMEOUT_MS   200
#define FLUSH_TIMEOUT_MS 5000 /* a clean close waits this long for its sends */

enum conn_state {
    CONN_HANDSHAKE, /* client: the TCP handshake is running */
    CONN_UP,        /* the endpoint exists; sends go out */
};

typedef struct net_op net_op_t;

/* A TCP handshake in progress: a client's (conn set) or a server's. */
typedef struct hs_run {
    tdm_net_t *net;
    int fd;
    bool connecting; /* client: the TCP connect has not finished */
    tdm_hs_t *hs;
    uint64_t my_id;
    int64_t deadline;
    char peer[80];
    struct tdm_conn *conn; /* client side only */
    struct hs_run *next;
} hs_run_t;

struct tdm_conn {
    tdm_net_t *net;
    ucp_ep_h ep;
    uint64_t id;      /* ours: the peer puts it on its messages */
    uint64_t peer_id; /* the peer's: we put it on ours */
    enum conn_state state;
    hs_run_t *hs;                    /* while CONN_HANDSHAKE */
    net_op_t *queued, **queued_tail; /* sends before CONN_UP */
    char peer[80];
    void *owner;
    tdm_net_error_t on_error;
    tdm_status_t why;
    bool failed;    /* UCX or the handshake reported an error */
    bool ep_failed; /* UCX reported an error: no bye */
    void *wait_req; /* closing: the bye, or the flush, in flight */
    int64_t wait_deadline;
    unsigned char bye_hdr[NET_TAG];
    bool error_queued;            /* in net->errored, owner not told yet */
    bool closed_by_user;          /* the handle is the transport's now */
    void *close_req;              /* ucp_ep_close_nbx in progress */
    struct tdm_conn *prev, *next; /* net->conns */
    struct tdm_conn *err_next;    /* net->errored */
    struct tdm_conn *close_next;  /* net->closing */
};

/* A send or a receive in flight, a queued send, and a deferred completion. */
struct net_op {
    tdm_net_t *net;
    size_t cap; /* bytes[] capacity */
    tdm_net_done_t done;
    void *user;
    tdm_status_t status;
    struct net_op *next;
    uint16_t am_id;    /* queued sends */
    bool eager;        /* queued sends: copied data, sent eager */
    const void *data;  /* queued sends: the data (in bytes[] when copied) */
    size_t header_len; /* with the tag */
    size_t data_len;
    unsigned char bytes[]; /* tag and header, then copied data */
};

typedef struct net_handler {
    tdm_net_handler_t fn;
    void *user;
    tdm_net_t *net;
    uint16_t id;
} net_handler_t;

/* connection id -> conn, open addressing with tombstones. */
typedef struct id_slot {
    uint64_t id; /* 0: empty; ID_TOMB: deleted */
    tdm_conn_t *conn;
} id_slot_t;
#define ID_TOMB UINT64_MAX

struct tdm_net {
    char name[64];
    char *token; /* the cluster token, "" when none */
    ucp_context_h ctx;
    ucp_worker_h worker;
    ucp_address_t *addr; /* our worker address, sent in handshakes */
    size_t addr_len;
    int efd;
    int wake_fd; /* eventfd: tdm_net_signal from other threads */
    int listen_fd;
    int listen_port;
    tdm_net_accept_t on_accept;
    void *accept_user;
    hs_run_t *handshakes; /* clients' and servers' */
    int n_accepting;
    int64_t refused_log_ms; /* last "handshake refused" warning (rate limit) */
    int64_t failed_log_ms;  /* last "could not connect" warning (rate limit) */
    uint64_t n_refused;
    bool warned_open; /* logged that a server takes no token */
    net_handler_t handlers[TDM_NET_MAX_AM_ID + 1];
    tdm_conn_t *conns;
    tdm_conn_t *errored; /* failed, owner to be told */
    tdm_conn_t *closing; /* to close, or closing */
    net_op_t *free_ops;  /* recycled ops of OP_SMALL bytes */
    size_t n_free_ops;
    net_op_t *deferred; /* completions to deliver */
    net_op_t **deferred_tail;
    id_slot_t *ids;
    size_t ids_cap, ids_used;
    void *maps[TDM_NET_MAX_MAPS]; /* live registrations, unmapped at destroy */
    size_t n_maps;
};

int64_t tdm_net_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static tdm_status_t from_ucs(ucs_status_t s)
{
    switch (s) {
    case UCS_OK: return TDM_OK;
    case UCS_ERR_NO_MEMORY: return TDM_ERR_NOMEM;
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_ENDPOINT_TIMEOUT: return TDM_ERR_TIMEOUT;
    case UCS_ERR_CANCELED: return TDM_ERR_CANCELLED;
    case UCS_ERR_INVALID_PARAM: return TDM_ERR_INVALID;
    default: return TDM_ERR_IO;
    }
}

static uint64_t random_u64(void)
{
    uint64_t v = 0;
    while (v == 0 || v == ID_TOMB) {
        if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
            v = (uint64_t)tdm_net_now_ms() * 0x9e3779b97f4a7c15ULL ^ (uint64_t)(uintptr_t)&v;
    }
    return v;
}

/* ---- ops: recycled, so that steady traffic does not malloc ---- */

#define OP_SMALL 2048 /* inline bytes of a recycled op (headers, small control) */
#define OP_KEEP  4096 /* recycled ops kept at most */

static net_op_t *op_get(tdm_net_t *net, size_t extra)
{
    net_op_t *op;
    if (extra <= OP_SMALL && net->free_ops != NULL) {
        op = net->free_ops;
        net->free_ops = op->next;
        net->n_free_ops--;
    } else {
        size_t cap = extra <= OP_SMALL ? OP_SMALL : extra;
        op = malloc(sizeof(*op) + cap);
        if (op == NULL)
            return NULL;
        op->cap = cap;
    }
    op->net = net;
    op->next = NULL;
    return op;
}

static void op_put(net_op_t *op)
{
    tdm_net_t *net = op->net;
    if (op->cap == OP_SMALL && net->n_free_ops < OP_KEEP) {
        op->next = net->free_ops;
        net->free_ops = op;
        net->n_free_ops++;
        return;
    }
    free(op);
}

/* ---- id map ---- */

static size_t id_hash(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x;
}

static tdm_status_t id_map_grow(tdm_net_t *net)
{
    size_t cap = net->ids_cap ? net->ids_cap * 2 : 64;
    id_slot_t *n = calloc(cap, sizeof(*n));
    if (n == NULL)
        return TDM_ERR_NOMEM;
    size_t used = 0;
    for (size_t i = 0; i < net->ids_cap; i++) {
        uint64_t id = net->ids[i].id;
        if (id == 0 || id == ID_TOMB)
            continue;
        size_t j = id_hash(id) & (cap - 1);
        while (n[j].id != 0)
            j = (j + 1) & (cap - 1);
        n[j] = net->ids[i];
        used++;
    }
    free(net->ids);
    net->ids = n;
    net->ids_cap = cap;
    net->ids_used = used;
    return TDM_OK;
}

static tdm_status_t id_map_put(tdm_net_t *net, uint64_t id, tdm_conn_t *c)
{
    if ((net->ids_used + 1) * 2 > net->ids_cap && id_map_grow(net) != TDM_OK)
        return TDM_ERR_NOMEM;
    size_t j = id_hash(id) & (net->ids_cap - 1);
    while (net->ids[j].id != 0 && net->ids[j].id != ID_TOMB)
        j = (j + 1) & (net->ids_cap - 1);
    if (net->ids[j].id == 0)
        net->ids_used++;
    net->ids[j].id = id;
    net->ids[j].conn = c;
    return TDM_OK;
}

static id_slot_t *id_map_find(tdm_net_t *net, uint64_t id)
{
    if (net->ids_cap == 0 || id == 0 || id == ID_TOMB)
        return NULL;
    size_t j = id_hash(id) & (net->ids_cap - 1);
    while (net->ids[j].id != 0) {
        if (net->ids[j].id == id)
            return &net->ids[j];
        j = (j + 1) & (net->ids_cap - 1);
    }
    return NULL;
}

static void id_map_del(tdm_net_t *net, uint64_t id)
{
    id_slot_t *s = id_map_find(net, id);
    if (s != NULL) {
        s->id = ID_TOMB;
        s->conn = NULL;
    }
}

/* ---- deferred completions ---- */

static void defer_done(tdm_net_t *net, net_op_t *op, tdm_status_t status)
{
    op->status = status;
    op->next = NULL;
    *net->deferred_tail = op;
    net->deferred_tail = &op->next;
}

static int run_deferred(tdm_net_t *net)
{
    int n = 0;
    while (net->deferred != NULL) {
        net_op_t *op = net->deferred;
        net->deferred = op->next;
        if (net->deferred == NULL)
            net->deferred_tail = &net->deferred;
        if (op->done != NULL)
            op->done(op->user, op->status);
        op_put(op);
        n++;
    }
    return n;
}

/* ---- connections ---- */

static void conn_link(tdm_net_t *net, tdm_conn_t *c)
{
    c->next = net->conns;
    c->prev = NULL;
    if (net->conns != NULL)
        net->conns->prev = c;
    net->conns = c;
}

static void conn_unlink(tdm_net_t *net, tdm_conn_t *c)
{
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        net->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

/* The connection failed: its owner is told from progress. */
static void conn_fail(tdm_conn_t *c, tdm_status_t why)
{
    if (c->failed)
        return;
    c->failed = true;
    c->why = why;
    if (!c->closed_by_user && !c->error_queued) {
        c->error_queued = true;
        c->err_next = c->net->errored;
        c->net->errored = c;
    }
}

static void ep_error_cb(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    tdm_conn_t *c = arg;
    (void)ep;
    c->ep_failed = true;
    if (!c->failed)
        tdm_log_debug(LOG_MOD, "%s: connection to %s failed: %s", c->net->name, c->peer,
                      ucs_status_string(status));
    conn_fail(c, from_ucs(status));
}

/* A connection id that no connection of net has. */
static uint64_t fresh_id(tdm_net_t *net)
{
    uint64_t id;
    do
        id = random_u64();
    while (id_map_find(net, id) != NULL);
    return id;
}

/* A connection with id, known to the id map and linked. */
static tdm_conn_t *conn_new(tdm_net_t *net, const char *peer, uint64_t id)
{
    tdm_conn_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->net = net;
    c->id = id;
    c->queued_tail = &c->queued;
    snprintf(c->peer, sizeof(c->peer), "%s", peer);
    if (id_map_put(net, c->id, c) != TDM_OK) {
        free(c);
        return NULL;
    }
    conn_link(net, c);
    return c;
}

/* Fails every send that waits for the connection to come up. */
static void fail_queued(tdm_conn_t *c, tdm_status_t why)
{
    while (c->queued != NULL) {
        net_op_t *op = c->queued;
        c->queued = op->next;
        defer_done(c->net, op, why);
    }
    c->queued_tail = &c->queued;
}

static tdm_status_t op_issue(tdm_conn_t *c, net_op_t *op);

/* Connects the endpoint to the peer's worker address: the connection is
 * up and its queued sends go out, in order. */
static tdm_status_t conn_up(tdm_conn_t *c, const void *peer_addr, uint64_t peer_id)
{
    tdm_net_t *net = c->net;
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER,
        .address = peer_addr,
        .err_mode = UCP_ERR_HANDLING_MODE_PEER,
        .err_handler = {.cb = ep_error_cb, .arg = c},
    };
    ucs_status_t s = ucp_ep_create(net->worker, &p, &c->ep);
    if (s != UCS_OK) {
        c->ep = NULL;
        tdm_log_error(LOG_MOD, "%s: cannot create an endpoint to %s: %s", net->name, c->peer,
                      ucs_status_string(s));
        return from_ucs(s);
    }
    c->peer_id = peer_id;
    c->state = CONN_UP;
    while (c->queued != NULL) {
        net_op_t *op = c->queued;
        c->queued = op->next;
        op->next = NULL;
        tdm_status_t st = op_issue(c, op);
        if (st != TDM_OK)
            defer_done(net, op, st);
    }
    c->queued_tail = &c->queued;
    return TDM_OK;
}

void tdm_conn_set_owner(tdm_conn_t *conn, void *user, tdm_net_error_t on_error)
{
    conn->owner = user;
    conn->on_error = on_error;
}

void *tdm_conn_owner(const tdm_conn_t *conn)
{
    return conn->owner;
}
const char *tdm_conn_peer(const tdm_conn_t *conn)
{
    return conn->peer;
}
bool tdm_conn_failed(const tdm_conn_t *conn)
{
    return conn->failed;
}

static void hs_end(hs_run_t *h);
static void tag_put(void *header, uint64_t id);

/* A close tells the peer (the bye) and, unless forced, waits for what was
 * sent to go out (a flush); the endpoint itself is then always closed with
 * force: UCX 1.13's flushing close of an endpoint made from a worker
 * address leaves its sockets open (two per connection, found by
 * test_net_handshake's connect / close cycles). */
static void start_close(tdm_conn_t *c, bool force)
{
    tag_put(c->bye_hdr, c->peer_id);
    ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                               .flags = UCP_AM_SEND_FLAG_EAGER};
    ucs_status_ptr_t r = ucp_am_send_nbx(c->ep, NET_AM_BYE, c->bye_hdr, NET_TAG, NULL, 0, &prm);
    if (UCS_PTR_IS_PTR(r)) {
        c->wait_req = r;
        c->wait_deadline = tdm_net_now_ms() + BYE_TIMEOUT_MS;
    }
    if (force)
        return;
    ucp_request_param_t fp = {.op_attr_mask = 0};
    ucs_status_ptr_t f = ucp_ep_flush_nbx(c->ep, &fp);
    if (UCS_PTR_IS_PTR(f)) { /* covers the bye */
        if (c->wait_req != NULL)
            ucp_request_free(c->wait_req);
        c->wait_req = f;
        c->wait_deadline = tdm_net_now_ms() + FLUSH_TIMEOUT_MS;
    }
}

void tdm_conn_close(tdm_conn_t *c, bool force)
{
    if (c == NULL || c->closed_by_user)
        return;
    c->closed_by_user = true;
    if (force)
        c->failed = true;
    if (c->hs != NULL) { /* still in the handshake: nothing was sent over UCX */
        hs_end(c->hs);
        c->hs = NULL;
    }
    fail_queued(c, TDM_ERR_CANCELLED);
    id_map_del(c->net, c->id);
    if (c->ep != NULL && !c->ep_failed)
        start_close(c, force);
    c->close_next = c->net->closing;
    c->net->closing = c;
}

/* Starts or checks the closes; frees the connections whose close ended. */
static int run_closes(tdm_net_t *net)
{
    int n = 0;
    tdm_conn_t **pp = &net->closing;
    while (*pp != NULL) {
        tdm_conn_t *c = *pp;
        if (c->wait_req != NULL) { /* the bye or the flush first, for a while */
            if (ucp_request_check_status(c->wait_req) == UCS_INPROGRESS &&
                tdm_net_now_ms() < c->wait_deadline) {
                pp = &c->close_next;
                continue;
            }
            ucp_request_free(c->wait_req); /* released by UCX when it ends */
            c->wait_req = NULL;
        }
        if (c->close_req == NULL && c->ep != NULL) {
            ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                                       .flags = UCP_EP_CLOSE_FLAG_FORCE};
            ucs_status_ptr_t r = ucp_ep_close_nbx(c->ep, &prm);
            c->ep = NULL;
            if (UCS_PTR_IS_PTR(r)) {
                c->close_req = r;
                pp = &c->close_next;
                n++;
                continue;
            }
        } else if (c->close_req != NULL) {
            if (ucp_request_check_status(c->close_req) == UCS_INPROGRESS) {
                pp = &c->close_next;
                continue;
            }
            ucp_request_free(c->close_req);
            c->close_req = NULL;
        }
        /* closed */
        *pp = c->close_next;
        conn_unlink(net, c);
        free(c);
        n++;
    }
    return n;
}

static int run_errors(tdm_net_t *net)
{
    int n = 0;
    while (net->errored != NULL) {
        tdm_conn_t *c = net->errored;
        net->errored = c->err_next;
        c->error_queued = false;
        if (!c->closed_by_user) {
            fail_queued(c, c->why != TDM_OK ? c->why : TDM_ERR_IO);
            if (c->on_error != NULL)
                c->on_error(c->owner, c, c->why);
        }
        n++;
    }
    return n;
}

/* ---- messages ---- */

static uint64_t tag_get(const void *header)
{
    const unsigned char *p = header;
    uint64_t v = 0;
    for (int i = NET_TAG - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void tag_put(void *header, uint64_t id)
{
    unsigned char *p = header;
    for (int i = 0; i < NET_TAG; i++)
        p[i] = (unsigned char)(id >> (8 * i));
}

static ucs_status_t am_cb(void *arg, const void *header, size_t header_length, void *data,
                          size_t length, const ucp_am_recv_param_t *param)
{
    net_handler_t *h = arg;
    tdm_net_t *net = h->net;
    if (header_length < NET_TAG)
        return UCS_OK; /* not from a tandem peer: dropped */
    id_slot_t *s = id_map_find(net, tag_get(header));
    tdm_conn_t *c = s != NULL ? s->conn : NULL;
    if (c == NULL || c->closed_by_user || c->failed || h->fn == NULL)
        return UCS_OK; /* unknown, or from a connection being closed: dropped */
    tdm_net_msg_t msg = {
        .conn = c,
        .am_id = h->id,
        .header = (const unsigned char *)header + NET_TAG,
        .header_len = header_length - NET_TAG,
        .data = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) ? NULL : data,
        .length = length,
        .rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0,
        .desc_ = data,
    };
    h->fn(h->user, &msg);
    return UCS_OK;
}

/* The peer closed its side: the connection fails here too. */
static ucs_status_t bye_cb(void *arg, const void *header, size_t header_length, void *data,
                           size_t length, const ucp_am_recv_param_t *param)
{
    tdm_net_t *net = arg;
    (void)data;
    (void)length;
    (void)param;
    if (header_length != NET_TAG)
        return UCS_OK;
    id_slot_t *s = id_map_find(net, tag_get(header));
    if (s != NULL && s->conn != NULL && !s->conn->closed_by_user) {
        tdm_log_debug(LOG_MOD, "%s: %s closed the connection", net->name, s->conn->peer);
        conn_fail(s->conn, TDM_ERR_IO);
    }
    return UCS_OK;
}

tdm_status_t tdm_net_set_handler(tdm_net_t *net, uint16_t am_id, tdm_net_handler_t fn, void *user)
{
    if (am_id > TDM_NET_MAX_AM_ID)
        return TDM_ERR_INVALID;
    net_handler_t *h = &net->handlers[am_id];
    h->fn = fn;
    h->user = user;
    h->net = net;
    h->id = am_id;
    ucp_am_handler_param_t p = {
        .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                      UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS,
        .id = am_id,
        .cb = am_cb,
        .arg = h,
        .flags = UCP_AM_FLAG_WHOLE_MSG,
    };
    ucs_status_t s = ucp_worker_set_am_recv_handler(net->worker, &p);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD, "%s: cannot set the handler of message %u: %s", net->name, am_id,
                      ucs_status_string(s));
        return from_ucs(s);
    }
    return TDM_OK;
}

static void send_cb(void *request, ucs_status_t status, void *user_data)
{
    net_op_t *op = user_data;
    if (op->done != NULL)
        op->done(op->user, from_ucs(status));
    op_put(op);
    ucp_request_free(request);
}

/* Sends a prepared op on an up connection (its tag is set here). On an
 * error the op is the caller's again. */
static tdm_status_t op_issue(tdm_conn_t *c, net_op_t *op)
{
    if (c->failed || c->ep == NULL)
        return TDM_ERR_IO;
    tag_put(op->bytes, c->peer_id);
    ucp_request_param_t prm = {
        .op_attr_mask =
            UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS,
        .cb.send = send_cb,
        .user_data = op,
        .flags = op->eager ? UCP_AM_SEND_FLAG_EAGER : 0,
    };
    ucs_status_ptr_t r =
        ucp_am_send_nbx(c->ep, op->am_id, op->bytes, op->header_len, op->data, op->data_len, &prm);
    if (r == NULL) {
        defer_done(c->net, op, TDM_OK);
        return TDM_OK;
    }
    if (UCS_PTR_IS_ERR(r))
        return from_ucs(UCS_PTR_STATUS(r));
    return TDM_OK;
}

tdm_status_t tdm_conn_send(tdm_conn_t *c, uint16_t am_id, const void *header, size_t header_len,
                           const void *data, size_t length, bool copy_data, tdm_net_done_t done,
                           void *user)
{
    if (c->failed || c->closed_by_user)
        return TDM_ERR_IO;
    if (header_len > TDM_NET_MAX_HEADER || am_id > TDM_NET_MAX_AM_ID)
        return TDM_ERR_INVALID;
    size_t extra = NET_TAG + header_len + (copy_data ? length : 0);
    net_op_t *op = op_get(c->net, extra);
    if (op == NULL)
        return TDM_ERR_NOMEM;
    op->done = done;
    op->user = user;
    op->am_id = am_id;
    op->eager = copy_data;
    op->header_len = NET_TAG + header_len;
    op->data_len = length;
    if (header_len > 0)
        memcpy(op->bytes + NET_TAG, header, header_len);
    op->data = data;
    if (copy_data && length > 0) {
        memcpy(op->bytes + NET_TAG + header_len, data, length);
        op->data = op->bytes + NET_TAG + header_len;
    }
    if (c->state != CONN_UP) { /* goes out when the handshake ends */
        *c->queued_tail = op;
        c->queued_tail = &op->next;
        return TDM_OK;
    }
    tdm_status_t st = op_issue(c, op);
    if (st != TDM_OK)
        op_put(op);
    return st;
}

static void recv_cb(void *request, ucs_status_t status, size_t length, void *user_data)
{
    net_op_t *op = user_data;
    (void)length;
    if (op->done != NULL)
        op->done(op->user, from_ucs(status));
    op_put(op);
    ucp_request_free(request);
}

tdm_status_t tdm_net_recv(tdm_net_t *net, const tdm_net_msg_t *msg, void *buf, tdm_net_done_t done,
                          void *user)
{
    net_op_t *op = op_get(net, 0);
    if (op == NULL)
        return TDM_ERR_NOMEM;
    op->done = done;
    op->user = user;
    if (!msg->rndv) {
        memcpy(buf, msg->data, msg->length);
        defer_done(net, op, TDM_OK);
        return TDM_OK;
    }
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.recv_am = recv_cb,
        .user_data = op,
    };
    ucs_status_ptr_t r = ucp_am_recv_data_nbx(net->worker, msg->desc_, buf, msg->length, &prm);
    if (r == NULL) {
        defer_done(net, op, TDM_OK);
        return TDM_OK;
    }
    if (UCS_PTR_IS_ERR(r)) {
        op_put(op);
        return from_ucs(UCS_PTR_STATUS(r));
    }
    return TDM_OK;
}

/* ---- addresses ---- */

tdm_status_t tdm_net_parse_addr(const char *s, char *host, size_t host_len, int *port)
{
    const char *colon = s != NULL ? strrchr(s, ':') : NULL;
    if (colon == NULL || colon == s || (size_t)(colon - s) >= host_len)
        return TDM_ERR_INVALID;
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (*end != '\0' || end == colon + 1 || p < 0 || p > 65535)
        return TDM_ERR_INVALID;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    *port = (int)p;
    return TDM_OK;
}

static tdm_status_t resolve(const char *host, int port, struct sockaddr_in *sa)
{
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)port);
    if (host == NULL || host[0] == '\0' || strcmp(host, "*") == 0) {
        sa->sin_addr.s_addr = htonl(INADDR_ANY);
        return TDM_OK;
    }
    if (inet_pton(AF_INET, host, &sa->sin_addr) == 1)
        return TDM_OK;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
    if (getaddrinfo(host, NULL, &hints, &res) != 0 || res == NULL)
        return TDM_ERR_NOT_FOUND;
    sa->sin_addr = ((struct sockaddr_in *)res->ai_addr)->sin_addr;
    freeaddrinfo(res);
    return TDM_OK;
}

tdm_status_t tdm_net_device_of(const char *host, char *dev, size_t dev_len)
{
    struct sockaddr_in sa;
    if (resolve(host, 0, &sa) != TDM_OK)
        return TDM_ERR_NOT_FOUND;
    if (sa.sin_addr.s_addr == htonl(INADDR_ANY))
        return TDM_ERR_NOT_FOUND;
    bool loopback = (ntohl(sa.sin_addr.s_addr) >> 24) == 127;
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs) != 0)
        return TDM_ERR_IO;
    tdm_status_t st = TDM_ERR_NOT_FOUND;
    for (struct ifaddrs *i = ifs; i != NULL; i = i->ifa_next) {
        if (i->ifa_addr == NULL || i->ifa_addr->sa_family != AF_INET)
            continue;
        const struct sockaddr_in *a = (const struct sockaddr_in *)i->ifa_addr;
        bool match =
            a->sin_addr.s_addr == sa.sin_addr.s_addr || (loopback && (i->ifa_flags & IFF_LOOPBACK));
        if (match && strlen(i->ifa_name) < dev_len) {
            snprintf(dev, dev_len, "%s", i->ifa_name);
            st = TDM_OK;
            break;
        }
    }
    freeifaddrs(ifs);
    return st;
}

/* ---- handshakes (net/handshake.h) over TCP ---- */

static void hs_end(hs_run_t *h)
{
    tdm_net_t *net = h->net;
    for (hs_run_t **pp = &net->handshakes; *pp != NULL; pp = &(*pp)->next)
        if (*pp == h) {
            *pp = h->next;
            break;
        }
    if (h->conn == NULL)
        net->n_accepting--;
    else
        h->conn->hs = NULL;
    if (h->fd >= 0)
        close(h->fd);
    tdm_hs_destroy(h->hs);
    free(h);
}

static hs_run_t *hs_start(tdm_net_t *net, int fd, bool server, const char *peer, uint64_t my_id)
{
    hs_run_t *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return NULL;
    uint8_t nonce[TDM_HS_NONCE];
    if (getrandom(nonce, sizeof(nonce), 0) != (ssize_t)sizeof(nonce)) {
        free(h);
        return NULL;
    }
    h->net = net;
    h->fd = fd;
    h->my_id = my_id;
    h->deadline = tdm_net_now_ms() + HS_TIMEOUT_MS;
    snprintf(h->peer, sizeof(h->peer), "%s", peer);
    if (tdm_hs_create(server, net->token, nonce, h->my_id, net->addr, net->addr_len, &h->hs) !=
        TDM_OK) {
        free(h);
        return NULL;
    }
    h->next = net->handshakes;
    net->handshakes = h;
    return h;
}

/* A peer failed the handshake: one warning per 10 s, the rest at debug. */
static void hs_refused(tdm_net_t *net, const char *peer, const char *why)
{
    net->n_refused++;
    int64_t now = tdm_net_now_ms();
    if (now - net->refused_log_ms >= 10000) {
        net->refused_log_ms = now;
        tdm_log_warn(LOG_MOD,
                     "%s: refused a connection from %s: %s (%llu refused so far; check that "
                     "every role has the same --cluster-token)",
                     net->name, peer, why, (unsigned long long)net->n_refused);
    } else {
        tdm_log_debug(LOG_MOD, "%s: refused a connection from %s: %s", net->name, peer, why);
    }
}

/* The handshake failed; a client's connection fails with it. */
static void hs_fail(hs_run_t *h, tdm_status_t why, const char *msg)
{
    tdm_conn_t *c = h->conn;
    if (c != NULL) {
        tdm_net_t *net = h->net;
        int64_t now = tdm_net_now_ms();
        if (why != TDM_ERR_IO || now - net->failed_log_ms >= 10000) {
            if (why == TDM_ERR_IO)
                net->failed_log_ms = now;
            tdm_log_warn(LOG_MOD, "%s: connecting to %s failed: %s", net->name, h->peer, msg);
        } else {
            tdm_log_debug(LOG_MOD, "%s: connecting to %s failed: %s", net->name, h->peer, msg);
        }
        hs_end(h);
        conn_fail(c, why);
    } else {
        hs_refused(h->net, h->peer, msg);
        hs_end(h);
    }
}

/* The handshake succeeded: the connection comes up. */
static void hs_finish(hs_run_t *h)
{
    tdm_net_t *net = h->net;
    size_t alen;
    const void *addr = tdm_hs_peer_addr(h->hs, &alen);
    uint64_t peer_id = tdm_hs_peer_id(h->hs);
    tdm_conn_t *c = h->conn;
    if (c != NULL) { /* client */
        if (tdm_hs_peer_open(h->hs) && net->token[0] != '\0' && !net->warned_open) {
            net->warned_open = true;
            tdm_log_warn(LOG_MOD, "%s: %s takes no cluster token (--insecure): it was not checked",
                         net->name, h->peer);
        }
        tdm_status_t st = conn_up(c, addr, peer_id);
        hs_end(h);
        if (st != TDM_OK)
            conn_fail(c, st);
        return;
    }
    /* server: a new connection with the id the client already uses */
    c = conn_new(net, h->peer, h->my_id);
    if (c == NULL) {
        hs_end(h);
        return;
    }
    tdm_status_t st = conn_up(c, addr, peer_id);
    hs_end(h);
    if (st != TDM_OK) {
        tdm_conn_close(c, true);
        return;
    }
    if (net->on_accept != NULL)
        net->on_accept(net->accept_user, c);
    else
        tdm_conn_close(c, true);
}

/* Moves a handshake's bytes as far as the socket allows. Returns whether
 * anything happened. */
static bool hs_drive(hs_run_t *h, short revents)
{
    char why[160];
    if (h->connecting) {
        if (!(revents & (POLLOUT | POLLERR | POLLHUP)))
            return false;
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(h->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
            snprintf(why, sizeof(why), "cannot connect: %s", strerror(err));
            hs_fail(h, TDM_ERR_IO, why);
            return true;
        }
        h->connecting = false;
    }
    bool moved = false;
    for (;;) {
        size_t n;
        const uint8_t *out = tdm_hs_output(h->hs, &n);
        if (n > 0) {
            ssize_t w = send(h->fd, out, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                return moved;
            if (w <= 0) {
                snprintf(why, sizeof(why), "send: %s", strerror(errno));
                hs_fail(h, TDM_ERR_IO, why);
                return true;
            }
            tdm_hs_sent(h->hs, (size_t)w);
            moved = true;
            continue;
        }
        if (tdm_hs_done(h->hs)) {
            hs_finish(h);
            return true;
        }
        size_t want = tdm_hs_want(h->hs);
        if (want == 0) { /* cannot happen: neither output, input nor done */
            hs_fail(h, TDM_ERR_INTERNAL, "handshake stalled");
            return true;
        }
        uint8_t buf[4096];
        ssize_t r = recv(h->fd, buf, want < sizeof(buf) ? want : sizeof(buf), MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return moved;
        if (r <= 0) {
            hs_fail(h, TDM_ERR_IO,
                    r == 0 ? (h->conn != NULL ? "the peer closed the handshake (a different "
                                                "cluster token, or not a tandem peer?)"
                                              : "the peer closed the handshake")
                           : strerror(errno));
            return true;
        }
        moved = true;
        if (tdm_hs_input(h->hs, buf, (size_t)r, why, sizeof(why)) != TDM_OK) {
            hs_fail(h, TDM_ERR_INVALID, why);
            return true;
        }
    }
}

static int accept_all(tdm_net_t *net)
{
    int n = 0;
    for (int k = 0; k < 64 && net->listen_fd >= 0; k++) {
        struct sockaddr_in sa;
        socklen_t sl = sizeof(sa);
        int fd = accept4(net->listen_fd, (struct sockaddr *)&sa, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            break;
        n++;
        char ip[INET_ADDRSTRLEN] = "?", peer[80];
        if (sa.sin_family == AF_INET)
            inet_ntop(AF_INET, &sa.sin_addr, ip, sizeof(ip));
        snprintf(peer, sizeof(peer), "%s:%u", ip, ntohs(sa.sin_port));
        if (net->n_accepting >= HS_MAX_ACCEPTING) {
            /* the oldest gives way: a real peer finishes in a round trip,
             * so idle connections cannot keep peers out */
            hs_run_t *oldest = NULL;
            for (hs_run_t *h = net->handshakes; h != NULL; h = h->next)
                if (h->conn == NULL && (oldest == NULL || h->deadline < oldest->deadline))
                    oldest = h;
            if (oldest != NULL)
                hs_fail(oldest, TDM_ERR_BUSY, "too many handshakes at once; the oldest gave way");
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        hs_run_t *h = hs_start(net, fd, true, peer, fresh_id(net));
        if (h == NULL) {
            close(fd);
            continue;
        }
        net->n_accepting++;
    }
    return n;
}

/* Drives every handshake: accepts, moves bytes, enforces deadlines. */
static int run_handshakes(tdm_net_t *net)
{
    int n = accept_all(net);
    if (net->handshakes == NULL)
        return n;
    size_t cnt = 0;
    for (hs_run_t *h = net->handshakes; h != NULL; h = h->next)
        cnt++;
    struct pollfd *pf = calloc(cnt, sizeof(*pf));
    hs_run_t **hv = calloc(cnt, sizeof(*hv));
    if (pf == NULL || hv == NULL) {
        free(pf);
        free(hv);
        return n;
    }
    size_t i = 0;
    for (hs_run_t *h = net->handshakes; h != NULL; h = h->next, i++) {
        hv[i] = h;
        pf[i].fd = h->fd;
        pf[i].events = POLLIN | POLLOUT;
    }
    if (poll(pf, cnt, 0) < 0)
        memset(pf, 0, cnt * sizeof(*pf));
    int64_t now = tdm_net_now_ms();
    for (i = 0; i < cnt; i++) { /* hs_drive may end only its own run */
        hs_run_t *h = hv[i];
        if (hs_drive(h, pf[i].revents)) {
            n++;
            continue;
        }
        if (now > h->deadline) {
            hs_fail(h, TDM_ERR_TIMEOUT, "no handshake in time");
            n++;
        }
    }
    free(pf);
    free(hv);
    return n;
}

tdm_status_t tdm_net_listen(tdm_net_t *net, const char *host, int port, tdm_net_accept_t on_accept,
                            void *user)
{
    struct sockaddr_in sa;
    if (resolve(host, port, &sa) != TDM_OK) {
        tdm_log_error(LOG_MOD, "%s: cannot resolve listen address %s: give an IPv4 address",
                      net->name, host);
        return TDM_ERR_INVALID;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        tdm_log_error(LOG_MOD, "%s: cannot create a socket: %s", net->name, strerror(errno));
        return TDM_ERR_IO;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 256) != 0) {
        tdm_log_error(LOG_MOD,
                      "%s: cannot listen on %s:%d: %s (is the port in use? pick another one)",
                      net->name, host, port, strerror(errno));
        close(fd);
        return TDM_ERR_IO;
    }
    socklen_t sl = sizeof(sa);
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    net->listen_fd = fd;
    net->listen_port = ntohs(sa.sin_port);
    net->on_accept = on_accept;
    net->accept_user = user;
    return TDM_OK;
}

uint64_t tdm_net_refused(const tdm_net_t *net)
{
    return net->n_refused;
}

int tdm_net_listen_port(const tdm_net_t *net)
{
    return net->listen_fd >= 0 ? net->listen_port : -1;
}

void tdm_net_stop_listening(tdm_net_t *net)
{
    if (net->listen_fd >= 0) {
        close(net->listen_fd);
        net->listen_fd = -1;
    }
    hs_run_t *h = net->handshakes;
    while (h != NULL) { /* servers' handshakes end with the listener */
        hs_run_t *next = h->next;
        if (h->conn == NULL)
            hs_end(h);
        h = next;
    }
}

tdm_status_t tdm_net_connect(tdm_net_t *net, const char *host, int port, tdm_conn_t **out)
{
    struct sockaddr_in sa;
    if (resolve(host, port, &sa) != TDM_OK) {
        tdm_log_error(LOG_MOD, "%s: cannot resolve %s", net->name, host);
        return TDM_ERR_NOT_FOUND;
    }
    char peer[80];
    snprintf(peer, sizeof(peer), "%s:%d", host, port);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        tdm_log_error(LOG_MOD, "%s: cannot create a socket: %s", net->name, strerror(errno));
        return TDM_ERR_IO;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    bool connecting = false;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        /* a refusal at once shows as the socket's error in progress */
        if (errno != EINPROGRESS)
            tdm_log_debug(LOG_MOD, "%s: cannot connect to %s: %s", net->name, peer,
                          strerror(errno));
        connecting = true;
    }
    tdm_conn_t *c = conn_new(net, peer, fresh_id(net));
    if (c == NULL) {
        close(fd);
        return TDM_ERR_NOMEM;
    }
    hs_run_t *h = hs_start(net, fd, false, peer, c->id);
    if (h == NULL) {
        conn_unlink(net, c);
        id_map_del(net, c->id);
        free(c);
        close(fd);
        return TDM_ERR_NOMEM;
    }
    h->conn = c;
    h->connecting = connecting;
    c->hs = h;
    *out = c;
    return TDM_OK;
}

/* ---- memory ---- */

tdm_status_t tdm_net_mem_map(tdm_net_t *net, void *buf, size_t len, void **memh)
{
    ucp_mem_map_params_t p = {
        .field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH,
        .address = buf,
        .length = len,
    };
    if (net->n_maps == TDM_NET_MAX_MAPS) {
        tdm_log_error(LOG_MOD, "%s: more than %d memory registrations", net->name,
                      TDM_NET_MAX_MAPS);
        return TDM_ERR_NOMEM;
    }
    ucp_mem_h h;
    ucs_status_t s = ucp_mem_map(net->ctx, &p, &h);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD, "%s: cannot register %zu bytes: %s", net->name, len,
                      ucs_status_string(s));
        return from_ucs(s);
    }
    net->maps[net->n_maps++] = h;
    *memh = h;
    return TDM_OK;
}

void tdm_net_mem_unmap(tdm_net_t *net, void *memh)
{
    if (memh == NULL)
        return;
    for (size_t i = 0; i < net->n_maps; i++)
        if (net->maps[i] == memh) {
            net->maps[i] = net->maps[--net->n_maps];
            ucp_mem_unmap(net->ctx, memh);
            return;
        }
}

/* ---- life cycle and progress ---- */

int tdm_net_progress(tdm_net_t *net)
{
    int n = 0;
    for (int i = 0; i < 64; i++) {
        unsigned k = ucp_worker_progress(net->worker);
        n += (int)k;
        if (k == 0)
            break;
    }
    n += run_handshakes(net);
    n += run_deferred(net);
    n += run_errors(net);
    n += run_closes(net);
    n += run_deferred(net);
    return n;
}

#define WAIT_FDS 256 /* handshake sockets polled by tdm_net_wait; the rest wait 10 ms */

void tdm_net_wait(tdm_net_t *net, int timeout_ms)
{
    if (net->deferred != NULL || net->errored != NULL)
        return;
    if (ucp_worker_arm(net->worker) != UCS_OK)
        return; /* events are pending */
    struct pollfd pfd[WAIT_FDS + 3] = {{.fd = net->efd, .events = POLLIN},
                                       {.fd = net->wake_fd, .events = POLLIN}};
    nfds_t n = 2;
    if (net->listen_fd >= 0)
        pfd[n++] = (struct pollfd){.fd = net->listen_fd, .events = POLLIN};
    int64_t now = tdm_net_now_ms();
    for (hs_run_t *h = net->handshakes; h != NULL; h = h->next) {
        if (n == WAIT_FDS + 3) {
            timeout_ms = timeout_ms < 10 ? timeout_ms : 10;
            break;
        }
        size_t out_len;
        tdm_hs_output(h->hs, &out_len);
        short ev = (h->connecting || out_len > 0) ? POLLOUT : POLLIN;
        pfd[n++] = (struct pollfd){.fd = h->fd, .events = ev};
        int64_t left = h->deadline - now + 1;
        if (left < timeout_ms)
            timeout_ms = left > 0 ? (int)left : 0;
    }
    if (poll(pfd, n, timeout_ms) > 0 && (pfd[1].revents & POLLIN)) {
        uint64_t v;
        ssize_t r = read(net->wake_fd, &v, sizeof(v)); /* reset the counter */
        (void)r;
    }
}

void tdm_net_signal(tdm_net_t *net)
{
    uint64_t one = 1;
    ssize_t r = write(net->wake_fd, &one, sizeof(one)); /* EAGAIN: already signalled */
    (void)r;
}

/* UCX reads transport settings (UCX_TCP_*) from the environment only, so
 * defaults go there, never over a value the operator set. */
static void apply_default(const char *name, const char *value)
{
    char env[64];
    snprintf(env, sizeof(env), "UCX_%s", name);
    setenv(env, value, 0);
}

static void net_free(tdm_net_t *net)
{
    if (net->addr != NULL)
        ucp_worker_release_address(net->worker, net->addr);
    if (net->worker != NULL)
        ucp_worker_destroy(net->worker);
    if (net->ctx != NULL)
        ucp_cleanup(net->ctx);
    if (net->wake_fd >= 0)
        close(net->wake_fd);
    free(net->token);
    free(net);
}

tdm_status_t tdm_net_create(const tdm_net_config_t *cfg, tdm_net_t **out)
{
    tdm_net_t *net = calloc(1, sizeof(*net));
    if (net == NULL)
        return TDM_ERR_NOMEM;
    snprintf(net->name, sizeof(net->name), "%s", cfg && cfg->name ? cfg->name : "net");
    net->deferred_tail = &net->deferred;
    net->efd = -1;
    net->listen_fd = -1;
    net->listen_port = -1;
    net->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    net->token = strdup(cfg && cfg->token ? cfg->token : "");
    if (net->wake_fd < 0 || net->token == NULL) {
        tdm_status_t st = net->wake_fd < 0 ? TDM_ERR_IO : TDM_ERR_NOMEM;
        net_free(net);
        return st;
    }
    if (cfg == NULL || !cfg->keep_ucx_defaults) {
        apply_default("TLS", "tcp");
        apply_default("TCP_KEEPIDLE", "2s");
        apply_default("TCP_KEEPINTVL", "1s");
        apply_default("TCP_KEEPCNT", "3");
    }
    ucp_config_t *ucfg;
    ucs_status_t s = ucp_config_read(NULL, NULL, &ucfg);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD, "cannot read the UCX configuration: %s", ucs_status_string(s));
        net_free(net);
        return TDM_ERR_IO;
    }
    /* UCX's own TCP ports listen on every device it uses: keep them on the
     * device of the configured address (loopback for a local cluster). */
    const char *tls = getenv("UCX_TLS");
    char dev[IF_NAMESIZE + 1];
    if (cfg != NULL && cfg->local_addr != NULL && getenv("UCX_NET_DEVICES") == NULL &&
        tls != NULL && strcmp(tls, "tcp") == 0 &&
        tdm_net_device_of(cfg->local_addr, dev, sizeof(dev)) == TDM_OK) {
        s = ucp_config_modify(ucfg, "NET_DEVICES", dev);
        if (s != UCS_OK)
            tdm_log_warn(LOG_MOD, "%s: cannot keep UCX on device %s: %s", net->name, dev,
                         ucs_status_string(s));
        else
            tdm_log_debug(LOG_MOD, "%s: UCX uses device %s (of %s) only", net->name, dev,
                          cfg->local_addr);
    }
    ucp_params_t params = {
        .field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME,
        .features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP,
        .name = net->name,
    };
    s = ucp_init(&params, ucfg, &net->ctx);
    ucp_config_release(ucfg);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD, "cannot start UCX: %s (check the UCX_* settings)",
                      ucs_status_string(s));
        net->ctx = NULL;
        net_free(net);
        return TDM_ERR_IO;
    }
    ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                              .thread_mode = UCS_THREAD_MODE_SINGLE};
    s = ucp_worker_create(net->ctx, &wp, &net->worker);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD, "cannot create a UCX worker: %s", ucs_status_string(s));
        net->worker = NULL;
        net_free(net);
        return TDM_ERR_IO;
    }
    s = ucp_worker_get_efd(net->worker, &net->efd);
    if (s == UCS_OK)
        s = ucp_worker_get_address(net->worker, &net->addr, &net->addr_len);
    if (s != UCS_OK || net->addr_len > TDM_HS_MAX_ADDR) {
        tdm_log_error(LOG_MOD, "UCX worker has no event fd or address: %s", ucs_status_string(s));
        if (s != UCS_OK)
            net->addr = NULL;
        net_free(net);
        return TDM_ERR_IO;
    }
    ucp_am_handler_param_t bp = {
        .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                      UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS,
        .id = NET_AM_BYE,
        .cb = bye_cb,
        .arg = net,
        .flags = UCP_AM_FLAG_WHOLE_MSG,
    };
    if (ucp_worker_set_am_recv_handler(net->worker, &bp) != UCS_OK) {
        tdm_log_error(LOG_MOD, "%s: cannot set UCX's message handler", net->name);
        net_free(net);
        return TDM_ERR_IO;
    }
    ucp_worker_attr_t wa = {.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER};
    if (ucp_worker_query(net->worker, &wa) == UCS_OK &&
        wa.max_am_header < TDM_NET_MAX_HEADER + NET_TAG)
        tdm_log_warn(LOG_MOD, "%s: UCX allows AM headers of %zu bytes only (tandem needs %d)",
                     net->name, wa.max_am_header, TDM_NET_MAX_HEADER + NET_TAG);
    *out = net;
    return TDM_OK;
}

void tdm_net_destroy(tdm_net_t *net)
{
    if (net == NULL)
        return;
    tdm_net_stop_listening(net);
    for (tdm_conn_t *c = net->conns; c != NULL; c = c->next)
        if (!c->closed_by_user)
            tdm_conn_close(c, true);
    while (net->handshakes != NULL)
        hs_end(net->handshakes);
    int64_t deadline = tdm_net_now_ms() + 2000;
    while ((net->closing != NULL || net->deferred != NULL) && tdm_net_now_ms() < deadline)
        tdm_net_progress(net);
    if (net->closing != NULL)
        tdm_log_warn(LOG_MOD, "%s: some connections did not close in 2 s", net->name);
    run_deferred(net);
    /* UCX aborts at cleanup over a registration still in place */
    while (net->n_maps > 0)
        ucp_mem_unmap(net->ctx, net->maps[--net->n_maps]);
    ucp_worker_release_address(net->worker, net->addr);
    net->addr = NULL;
    ucp_worker_destroy(net->worker);
    net->worker = NULL;
    ucp_cleanup(net->ctx);
    net->ctx = NULL;
    /* Connections whose close did not finish are freed with the worker. */
    while (net->conns != NULL) {
        tdm_conn_t *c = net->conns;
        conn_unlink(net, c);
        free(c);
    }
    while (net->free_ops != NULL) {
        net_op_t *op = net->free_ops;
        net->free_ops = op->next;
        free(op);
    }
    free(net->ids);
    net_free(net);
}
