/* The UCX transport (include/tandem/net.h).
 *
 * Everything runs on the thread that calls tdm_net_progress(). Work that
 * must not happen inside a UCX callback (user error callbacks, endpoint
 * closes, completions of operations that finished at once) is queued and
 * done in tdm_net_progress() after ucp_worker_progress() returns. */
#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include "tandem/log.h"
#include "tandem/net.h"

#define LOG_MOD "net"

struct tdm_conn {
    tdm_net_t *net;
    ucp_ep_h ep;
    char peer[80];
    void *owner;
    tdm_net_error_t on_error;
    tdm_status_t why;
    bool failed;                  /* UCX reported an error */
    bool error_queued;            /* in net->errored, owner not told yet */
    bool closed_by_user;          /* the handle is the transport's now */
    void *close_req;              /* ucp_ep_close_nbx in progress */
    struct tdm_conn *prev, *next; /* net->conns */
    struct tdm_conn *err_next;    /* net->errored */
    struct tdm_conn *close_next;  /* net->closing */
};

/* A send or a receive in flight, and a deferred completion. */
typedef struct net_op {
    tdm_net_t *net;
    size_t cap; /* bytes[] capacity */
    tdm_net_done_t done;
    void *user;
    tdm_status_t status;
    struct net_op *next;
    size_t header_len;
    size_t data_len;
    unsigned char bytes[]; /* copied header, then copied data */
} net_op_t;

typedef struct net_handler {
    tdm_net_handler_t fn;
    void *user;
    tdm_net_t *net;
    uint16_t id;
} net_handler_t;

/* ep -> conn, open addressing with tombstones (endpoints come and go). */
typedef struct ep_slot {
    ucp_ep_h ep; /* NULL: empty; EP_TOMB: deleted */
    tdm_conn_t *conn;
} ep_slot_t;
#define EP_TOMB ((ucp_ep_h)(uintptr_t)1)

struct tdm_net {
    char name[64];
    ucp_context_h ctx;
    ucp_worker_h worker;
    int efd;
    int wake_fd; /* eventfd: tdm_net_signal from other threads */
    ucp_listener_h listener;
    int listen_port;
    tdm_net_accept_t on_accept;
    void *accept_user;
    net_handler_t handlers[TDM_NET_MAX_AM_ID + 1];
    tdm_conn_t *conns;
    tdm_conn_t *errored; /* failed, owner to be told */
    tdm_conn_t *closing; /* to close, or closing */
    net_op_t *free_ops;  /* recycled ops of OP_SMALL bytes */
    size_t n_free_ops;
    net_op_t *deferred; /* completions to deliver */
    net_op_t **deferred_tail;
    ep_slot_t *eps;
    size_t eps_cap, eps_used;
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

/* ---- ep map ---- */

static size_t ep_hash(ucp_ep_h ep)
{
    uint64_t x = (uint64_t)(uintptr_t)ep;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x;
}

static tdm_status_t ep_map_grow(tdm_net_t *net)
{
    size_t cap = net->eps_cap ? net->eps_cap * 2 : 64;
    ep_slot_t *n = calloc(cap, sizeof(*n));
    if (n == NULL)
        return TDM_ERR_NOMEM;
    for (size_t i = 0; i < net->eps_cap; i++) {
        ucp_ep_h ep = net->eps[i].ep;
        if (ep == NULL || ep == EP_TOMB)
            continue;
        size_t j = ep_hash(ep) & (cap - 1);
        while (n[j].ep != NULL)
            j = (j + 1) & (cap - 1);
        n[j] = net->eps[i];
    }
    free(net->eps);
    net->eps = n;
    net->eps_cap = cap;
    size_t used = 0;
    for (size_t i = 0; i < cap; i++)
        used += n[i].ep != NULL;
    net->eps_used = used;
    return TDM_OK;
}

static tdm_status_t ep_map_put(tdm_net_t *net, ucp_ep_h ep, tdm_conn_t *c)
{
    if ((net->eps_used + 1) * 2 > net->eps_cap && ep_map_grow(net) != TDM_OK)
        return TDM_ERR_NOMEM;
    size_t j = ep_hash(ep) & (net->eps_cap - 1);
    while (net->eps[j].ep != NULL && net->eps[j].ep != EP_TOMB)
        j = (j + 1) & (net->eps_cap - 1);
    if (net->eps[j].ep == NULL)
        net->eps_used++;
    net->eps[j].ep = ep;
    net->eps[j].conn = c;
    return TDM_OK;
}

static ep_slot_t *ep_map_find(tdm_net_t *net, ucp_ep_h ep)
{
    if (net->eps_cap == 0 || ep == NULL)
        return NULL;
    size_t j = ep_hash(ep) & (net->eps_cap - 1);
    while (net->eps[j].ep != NULL) {
        if (net->eps[j].ep == ep)
            return &net->eps[j];
        j = (j + 1) & (net->eps_cap - 1);
    }
    return NULL;
}

static void ep_map_del(tdm_net_t *net, ucp_ep_h ep)
{
    ep_slot_t *s = ep_map_find(net, ep);
    if (s != NULL) {
        s->ep = EP_TOMB;
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

static void ep_error_cb(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    tdm_conn_t *c = arg;
    if (c->failed)
        return;
    c->failed = true;
    c->why = from_ucs(status);
    tdm_log_debug(LOG_MOD, "%s: connection to %s failed: %s", c->net->name, c->peer,
                  ucs_status_string(status));
    if (!c->closed_by_user && !c->error_queued) {
        c->error_queued = true;
        c->err_next = c->net->errored;
        c->net->errored = c;
    }
}

static tdm_conn_t *conn_new(tdm_net_t *net, const char *peer)
{
    tdm_conn_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->net = net;
    snprintf(c->peer, sizeof(c->peer), "%s", peer);
    return c;
}

static tdm_status_t conn_attach(tdm_net_t *net, tdm_conn_t *c, ucp_ep_params_t *p)
{
    p->field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p->err_mode = UCP_ERR_HANDLING_MODE_PEER;
    p->err_handler.cb = ep_error_cb;
    p->err_handler.arg = c;
    ucs_status_t s = ucp_ep_create(net->worker, p, &c->ep);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD, "%s: cannot create an endpoint to %s: %s", net->name, c->peer,
                      ucs_status_string(s));
        return from_ucs(s);
    }
    if (ep_map_put(net, c->ep, c) != TDM_OK) {
        ucs_status_ptr_t r = ucp_ep_close_nb(c->ep, UCP_EP_CLOSE_MODE_FORCE);
        if (UCS_PTR_IS_PTR(r))
            ucp_request_free(r);
        return TDM_ERR_NOMEM;
    }
    conn_link(net, c);
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

void tdm_conn_close(tdm_conn_t *c, bool force)
{
    if (c == NULL || c->closed_by_user)
        return;
    c->closed_by_user = true;
    if (force)
        c->failed = true;
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
        if (c->close_req == NULL && c->ep != NULL) {
            ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                                       .flags = c->failed ? UCP_EP_CLOSE_FLAG_FORCE : 0};
            ucs_status_ptr_t r = ucp_ep_close_nbx(c->ep, &prm);
            if (UCS_PTR_IS_PTR(r)) {
                c->close_req = r;
                pp = &c->close_next;
                n++;
                continue;
            }
            c->close_req = NULL;
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
        if (c->ep != NULL)
            ep_map_del(net, c->ep);
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
        if (!c->closed_by_user && c->on_error != NULL)
            c->on_error(c->owner, c, c->why);
        n++;
    }
    return n;
}

/* ---- messages ---- */

static ucs_status_t am_cb(void *arg, const void *header, size_t header_length, void *data,
                          size_t length, const ucp_am_recv_param_t *param)
{
    net_handler_t *h = arg;
    tdm_net_t *net = h->net;
    tdm_conn_t *c = NULL;
    if (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) {
        ep_slot_t *s = ep_map_find(net, param->reply_ep);
        c = s != NULL ? s->conn : NULL;
    }
    if (c == NULL || c->closed_by_user || c->failed || h->fn == NULL)
        return UCS_OK; /* from a connection being closed: dropped */
    tdm_net_msg_t msg = {
        .conn = c,
        .am_id = h->id,
        .header = header,
        .header_len = header_length,
        .data = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) ? NULL : data,
        .length = length,
        .rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0,
        .desc_ = data,
    };
    h->fn(h->user, &msg);
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

tdm_status_t tdm_conn_send(tdm_conn_t *c, uint16_t am_id, const void *header, size_t header_len,
                           const void *data, size_t length, bool copy_data, tdm_net_done_t done,
                           void *user)
{
    if (c->failed || c->closed_by_user)
        return TDM_ERR_IO;
    if (header_len > TDM_NET_MAX_HEADER)
        return TDM_ERR_INVALID;
    size_t extra = header_len + (copy_data ? length : 0);
    net_op_t *op = op_get(c->net, extra);
    if (op == NULL)
        return TDM_ERR_NOMEM;
    op->done = done;
    op->user = user;
    op->header_len = header_len;
    op->data_len = length;
    if (header_len > 0)
        memcpy(op->bytes, header, header_len);
    const void *buf = data;
    if (copy_data && length > 0) {
        memcpy(op->bytes + header_len, data, length);
        buf = op->bytes + header_len;
    }
    ucp_request_param_t prm = {
        .op_attr_mask =
            UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS,
        .cb.send = send_cb,
        .user_data = op,
        .flags = UCP_AM_SEND_FLAG_REPLY | (copy_data ? UCP_AM_SEND_FLAG_EAGER : 0),
    };
    ucs_status_ptr_t r =
        ucp_am_send_nbx(c->ep, am_id, header_len ? op->bytes : NULL, header_len, buf, length, &prm);
    if (r == NULL) {
        defer_done(c->net, op, TDM_OK);
        return TDM_OK;
    }
    if (UCS_PTR_IS_ERR(r)) {
        op_put(op);
        return from_ucs(UCS_PTR_STATUS(r));
    }
    return TDM_OK;
}

static void recv_cb(void *request, ucs_status_t status, size_t length, void *user_data)
{
    net_op_t *op = user_data;
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

/* ---- addresses, listen, connect ---- */

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

static void conn_request_cb(ucp_conn_request_h req, void *arg)
{
    tdm_net_t *net = arg;
    char peer[80] = "?";
    ucp_conn_request_attr_t attr = {.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR};
    if (ucp_conn_request_query(req, &attr) == UCS_OK && attr.client_address.ss_family == AF_INET) {
        const struct sockaddr_in *sa = (const struct sockaddr_in *)&attr.client_address;
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &sa->sin_addr, ip, sizeof(ip));
        snprintf(peer, sizeof(peer), "%s:%u", ip, ntohs(sa->sin_port));
    }
    if (net->on_accept == NULL) {
        ucp_listener_reject(net->listener, req);
        return;
    }
    tdm_conn_t *c = conn_new(net, peer);
    if (c == NULL) {
        ucp_listener_reject(net->listener, req);
        return;
    }
    ucp_ep_params_t p = {.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST, .conn_request = req};
    if (conn_attach(net, c, &p) != TDM_OK) {
        free(c);
        return;
    }
    net->on_accept(net->accept_user, c);
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
    net->on_accept = on_accept;
    net->accept_user = user;
    ucp_listener_params_t p = {
        .field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER,
        .sockaddr = {.addr = (const struct sockaddr *)&sa, .addrlen = sizeof(sa)},
        .conn_handler = {.cb = conn_request_cb, .arg = net},
    };
    ucs_status_t s = ucp_listener_create(net->worker, &p, &net->listener);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD,
                      "%s: cannot listen on %s:%d: %s (is the port in use? pick another one)",
                      net->name, host, port, ucs_status_string(s));
        net->listener = NULL;
        return TDM_ERR_IO;
    }
    ucp_listener_attr_t attr = {.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR};
    net->listen_port = port;
    if (ucp_listener_query(net->listener, &attr) == UCS_OK && attr.sockaddr.ss_family == AF_INET)
        net->listen_port = ntohs(((const struct sockaddr_in *)&attr.sockaddr)->sin_port);
    return TDM_OK;
}

int tdm_net_listen_port(const tdm_net_t *net)
{
    return net->listener ? net->listen_port : -1;
}

void tdm_net_stop_listening(tdm_net_t *net)
{
    if (net->listener != NULL) {
        ucp_listener_destroy(net->listener);
        net->listener = NULL;
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
    tdm_conn_t *c = conn_new(net, peer);
    if (c == NULL)
        return TDM_ERR_NOMEM;
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR,
        .flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER,
        .sockaddr = {.addr = (const struct sockaddr *)&sa, .addrlen = sizeof(sa)},
    };
    tdm_status_t st = conn_attach(net, c, &p);
    if (st != TDM_OK) {
        free(c);
        return st;
    }
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
    n += run_deferred(net);
    n += run_errors(net);
    n += run_closes(net);
    n += run_deferred(net);
    return n;
}

void tdm_net_wait(tdm_net_t *net, int timeout_ms)
{
    if (net->deferred != NULL || net->errored != NULL)
        return;
    if (ucp_worker_arm(net->worker) != UCS_OK)
        return; /* events are pending */
    struct pollfd pfd[2] = {{.fd = net->efd, .events = POLLIN},
                            {.fd = net->wake_fd, .events = POLLIN}};
    if (poll(pfd, 2, timeout_ms) > 0 && (pfd[1].revents & POLLIN)) {
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

tdm_status_t tdm_net_create(const tdm_net_config_t *cfg, tdm_net_t **out)
{
    tdm_net_t *net = calloc(1, sizeof(*net));
    if (net == NULL)
        return TDM_ERR_NOMEM;
    snprintf(net->name, sizeof(net->name), "%s", cfg && cfg->name ? cfg->name : "net");
    net->deferred_tail = &net->deferred;
    net->efd = -1;
    net->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (net->wake_fd < 0) {
        free(net);
        return TDM_ERR_IO;
    }
    net->listen_port = -1;
    if (cfg == NULL || !cfg->keep_ucx_defaults) {
        apply_default("TLS", "tcp");
        apply_default("TCP_CM_REUSEADDR", "y");
        apply_default("TCP_KEEPIDLE", "2s");
        apply_default("TCP_KEEPINTVL", "1s");
        apply_default("TCP_KEEPCNT", "3");
    }
    ucp_config_t *ucfg;
    ucs_status_t s = ucp_config_read(NULL, NULL, &ucfg);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD, "cannot read the UCX configuration: %s", ucs_status_string(s));
        close(net->wake_fd);
        free(net);
        return TDM_ERR_IO;
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
        close(net->wake_fd);
        free(net);
        return TDM_ERR_IO;
    }
    ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                              .thread_mode = UCS_THREAD_MODE_SINGLE};
    s = ucp_worker_create(net->ctx, &wp, &net->worker);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD, "cannot create a UCX worker: %s", ucs_status_string(s));
        ucp_cleanup(net->ctx);
        close(net->wake_fd);
        free(net);
        return TDM_ERR_IO;
    }
    s = ucp_worker_get_efd(net->worker, &net->efd);
    if (s != UCS_OK) {
        tdm_log_error(LOG_MOD, "UCX worker has no event fd: %s", ucs_status_string(s));
        ucp_worker_destroy(net->worker);
        ucp_cleanup(net->ctx);
        close(net->wake_fd);
        free(net);
        return TDM_ERR_IO;
    }
    ucp_worker_attr_t wa = {.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER};
    if (ucp_worker_query(net->worker, &wa) == UCS_OK && wa.max_am_header < TDM_NET_MAX_HEADER)
        tdm_log_warn(LOG_MOD, "%s: UCX allows AM headers of %zu bytes only (tandem needs %d)",
                     net->name, wa.max_am_header, TDM_NET_MAX_HEADER);
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
    int64_t deadline = tdm_net_now_ms() + 2000;
    while ((net->closing != NULL || net->deferred != NULL) && tdm_net_now_ms() < deadline)
        tdm_net_progress(net);
    if (net->closing != NULL)
        tdm_log_warn(LOG_MOD, "%s: some connections did not close in 2 s", net->name);
    run_deferred(net);
    /* UCX aborts at cleanup over a registration still in place */
    while (net->n_maps > 0)
        ucp_mem_unmap(net->ctx, net->maps[--net->n_maps]);
    ucp_worker_destroy(net->worker);
    ucp_cleanup(net->ctx);
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
    free(net->eps);
    if (net->wake_fd >= 0)
        close(net->wake_fd);
    free(net);
}
