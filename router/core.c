/* tandem-router: the request core (core.h, core_impl.h).
 *
 * One thread owns everything here: the UCX listener nodes register at, the
 * nodes, the requests and their state machines. Front ends hand requests
 * and cancels over through a locked inbox and tdm_net_signal.
 *
 * A request's states:
 *   QUEUED   waiting for a node of its pool (bounded by queue_timeout_ms)
 *   PREFILL  a prefill node computes the prompt and puts its blocks
 *   DECODE   a decode node pulls the blocks (or computes the prompt itself)
 *            and streams tokens
 * Admission (rt_core_submit, on the front end's thread, under the lock):
 * the tier must name a known pool (configured with --pools, or named by a
 * node that registered) or the request is refused with 400 at once, and
 * the requests held (waiting or running) must stay under three limits:
 * the router's (--max-queued), the pool's (--max-queued-per-pool) and the
 * client's (--max-queued-per-key; the client is a keyed hash of the API
 * key it presented or of its address), or it is refused with 429. Only
 * known pools get a tandem_router_pending_requests series, so made-up
 * tiers cannot use up the series a pool scaled to zero needs.
 *
 * The router keeps every token a request has produced. When a node dies
 * (endpoint error, or no heartbeat for node_timeout_ms) its requests go
 * back to QUEUED and continue on another node from the prompt plus those
 * tokens (n_prior_output), so the client's text goes on with no gap and no
 * duplicate. Text is assembled here from token ids (tdm_textstream), as
 * the engine does it, so the text is the same however it was served. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "cluster.h"
#include "core_impl.h"
#include "tandem/gguf.h"
#include "tandem/hash.h"
#include "tandem/log.h"
#include "tandem/net.h"
#include "tandem/textstream.h"

#define MOD              "router"
#define RT_MAX_POOLS     64        /* pools a router knows (configured and registered) */
#define RT_POOL_NAME_MAX 64        /* bytes of a pool's name, the NUL included */
#define RT_MAX_HELD      (1 << 20) /* the largest --max-queued */

/* Why a request was refused at admission: the label of
 * tandem_router_requests_refused_total. */
enum { REFUSE_UNKNOWN_POOL = 0, REFUSE_QUEUE, REFUSE_POOL, REFUSE_CLIENT, REFUSE_COUNT };
static const char *const refuse_reason[REFUSE_COUNT] = {"unknown_pool", "queue_full", "pool_full",
                                                        "client_full"};

enum { N_HELLO = 0, N_READY = 1, N_DEAD = 2 };

typedef struct rnode {
    struct rnode *next;
    rt_core_t *core;
    tdm_conn_t *conn;
    int state;
    Tandem__Cluster__Role role;
    char name[96];
    char model[128];
    char pool[64];
    char metrics[160];
    int64_t last_seen_ms;
    Tandem__Cluster__Heartbeat hb;
    int active_jobs;
    int64_t active_tokens;
    bool failed;
} rnode_t;

enum { R_QUEUED = 0, R_PREFILL = 1, R_DECODE = 2 };

typedef struct rreq {
    struct rreq *next;
    uint64_t id;
    rt_event_cb_t cb;
    void *user;
    char request_id[64];
    char pool[RT_POOL_NAME_MAX];
    int pool_idx;    /* in core->pools */
    uint64_t client; /* keyed hash of rt_params.client */
    const rt_model_info_t *model;
    int32_t *prompt;
    size_t n_prompt;
    int32_t *out; /* generated tokens */
    size_t n_out, cap_out;
    tdm_sampling_params_t sampling;
    int32_t max_tokens;
    int32_t *stop_ids;
    size_t n_stop_ids;
    bool ignore_eos, logprobs;
    int32_t top_logprobs;
    int64_t deadline_ms;
    tdm_textstream_t text;
    int state;
    rnode_t *node;
    uint64_t job_id;
    int attempts;
    bool prefill_done;         /* the prefill ran (or was skipped for good) */
    ProtobufCBinaryData *keys; /* blocks of the prompt in the store */
    size_t n_keys;
    int32_t n_kv_tokens;
    int32_t n_cached;
    int64_t t_submit_ms, t_queued_ms, t_last_token_ms;
    double t_submit;
} rreq_t;

/* Requests held by one client (a keyed hash of rt_params.client). */
typedef struct client_slot {
    uint64_t hash;
    int held; /* 0: the slot is free */
} client_slot_t;

typedef struct inbox_item {
    struct inbox_item *next;
    rreq_t *req;        /* a new request, or */
    uint64_t cancel_id; /* a cancel */
} inbox_item_t;

struct rt_core {
    rt_core_config_t cfg;
    char served_name[128];
    tdm_gguf_t *gguf;
    tdm_tokenizer_t *tok;
    rt_model_info_t model;
    char default_system[1024];
    tdm_net_t *net;
    pthread_t thread;
    bool started;
    atomic_bool stop;
    pthread_mutex_t lock;
    inbox_item_t *inbox, **inbox_tail;
    atomic_uint_fast64_t next_id;
    uint64_t next_job;
    rnode_t *nodes;
    rreq_t *reqs, **reqs_tail;
    size_t n_reqs;
    /* Known pools. A pool is never forgotten, so one scaled to zero keeps
     * taking requests; name and gauge are set once, when it is added under
     * the lock (n_pools only grows; only the core thread adds after
     * rt_core_create). */
    struct {
        char name[RT_POOL_NAME_MAX];
        tdm_metrics_gauge_t *pending;
        int count; /* core thread: waiting for a node, this pass */
        int held;  /* under lock: admitted, final event not sent */
    } pools[RT_MAX_POOLS];
    int n_pools;
    /* Requests held per client, under lock: open addressing with linear
     * probing, an entry lives while held > 0; clients_cap is a power of two
     * over twice max_queued, so the table never fills. */
    client_slot_t *clients;
    size_t clients_cap;
    int n_held;           /* under lock: every admitted request not yet ended */
    uint64_t client_seed; /* random: client hashes cannot be precomputed */
    tdm_metrics_family_t *pending_family;
    tdm_metrics_counter_t *refused[REFUSE_COUNT];
    atomic_int n_queued;
    atomic_bool draining;      /* rt_core_drain: no new requests */
    atomic_size_t n_in_flight; /* submitted, final event not yet sent */
    struct {
        tdm_metrics_counter_t *requests, *failed, *failovers, *handoffs, *cancelled;
        tdm_metrics_gauge_t *waiting, *running, *nodes_prefill, *nodes_decode;
        tdm_metrics_histogram_t *ttft, *itl, *e2e;
    } m;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------- public API */

const rt_model_info_t *rt_core_model(rt_core_t *core, const char *name)
{
    if (name == NULL || name[0] == '\0' || strcmp(name, core->model.name) == 0)
        return &core->model;
    return NULL;
}

size_t rt_core_models(rt_core_t *core, const rt_model_info_t **out, size_t cap)
{
    if (cap > 0)
        out[0] = &core->model;
    return 1;
}

bool rt_core_ready(rt_core_t *core, char *reason, size_t cap)
{
    /* An empty pool does not make the router unready: it holds requests
     * while the pool scales from zero (tandem_router_decode_nodes says how
     * many nodes it has). */
    if (atomic_load(&core->draining)) {
        snprintf(reason, cap, "draining");
        return false;
    }
    return true;
}

int rt_core_listen_port(rt_core_t *core)
{
    return tdm_net_listen_port(core->net);
}

void rt_core_drain(rt_core_t *core)
{
    atomic_store(&core->draining, true);
}

size_t rt_core_in_flight(rt_core_t *core)
{
    return atomic_load(&core->n_in_flight);
}

static void req_free(rreq_t *r)
{
    if (r == NULL)
        return;
    free(r->prompt);
    free(r->out);
    free(r->stop_ids);
    for (size_t i = 0; i < r->n_keys; i++)
        free(r->keys[i].data);
    free(r->keys);
    tdm_textstream_free(&r->text);
    free(r);
}

static void inbox_push(rt_core_t *c, inbox_item_t *it)
{
    pthread_mutex_lock(&c->lock);
    *c->inbox_tail = it;
    c->inbox_tail = &it->next;
    pthread_mutex_unlock(&c->lock);
    tdm_net_signal(c->net);
}

/* ----------------------------------------------------------- admission */

/* A pool's name: 1..RT_POOL_NAME_MAX-1 printable ASCII bytes, no comma (it
 * is a header value, a label value and an item of --pools). */
static bool pool_name_ok(const char *s, size_t n)
{
    if (n == 0 || n >= RT_POOL_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e || s[i] == ',')
            return false;
    return true;
}

/* Under the lock (or before the core thread runs): the pool's index, or -1. */
static int pool_find(const rt_core_t *c, const char *name)
{
    for (int i = 0; i < c->n_pools; i++)
        if (strcmp(c->pools[i].name, name) == 0)
            return i;
    return -1;
}

/* Under the lock: the pool's index, added (with its pending series) if new;
 * -1 when RT_MAX_POOLS pools are known already. name is valid (pool_name_ok). */
static int pool_add(rt_core_t *c, const char *name)
{
    int i = pool_find(c, name);
    if (i >= 0 || c->n_pools == RT_MAX_POOLS)
        return i;
    i = c->n_pools;
    snprintf(c->pools[i].name, sizeof(c->pools[i].name), "%s", name);
    const char *values[1] = {c->pools[i].name};
    if (tdm_metrics_family_gauge(c->pending_family, values, &c->pools[i].pending) != TDM_OK)
        return -1;
    c->pools[i].count = 0;
    c->pools[i].held = 0;
    c->n_pools++;
    return i;
}

/* Under the lock: where the client's entry is (found) or would go. */
static size_t client_slot(const rt_core_t *c, uint64_t hash, bool *found)
{
    size_t mask = c->clients_cap - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        if (c->clients[i].held == 0) {
            *found = false;
            return i;
        }
        if (c->clients[i].hash == hash) {
            *found = true;
            return i;
        }
    }
}

/* Under the lock: one request of the client ended; the entry goes when its
 * last one does (backward-shift deletion keeps every probe run whole). */
static void client_release(rt_core_t *c, uint64_t hash)
{
    bool found;
    size_t i = client_slot(c, hash, &found);
    if (!found || --c->clients[i].held > 0)
        return;
    size_t mask = c->clients_cap - 1;
    for (size_t j = (i + 1) & mask; c->clients[j].held > 0; j = (j + 1) & mask) {
        size_t home = c->clients[j].hash & mask;
        bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (stays)
            continue;
        c->clients[i] = c->clients[j];
        i = j;
    }
    c->clients[i].held = 0;
    c->clients[i].hash = 0;
}

/* Takes a place for a request of `client` in pool `tier`, or says why not
 * (TDM_ERR_INVALID: unknown pool; TDM_ERR_BUSY: a limit). */
static tdm_status_t admit(rt_core_t *c, const char *tier, uint64_t client, int *pool_out, char *err,
                          size_t err_len)
{
    const char *name = tier != NULL && tier[0] != '\0' ? tier : "default";
    int reason = -1;
    pthread_mutex_lock(&c->lock);
    int p = pool_find(c, name);
    bool found = false;
    size_t slot = 0;
    if (p < 0) {
        reason = REFUSE_UNKNOWN_POOL;
        size_t n = strlen(name);
        int off;
        if (pool_name_ok(name, n))
            off = snprintf(err, err_len,
                           "unknown tier '%s': this router has no such pool; its pools are", name);
        else
            off = snprintf(err, err_len, "unknown tier (%zu bytes, not a pool name): its pools are",
                           n);
        for (int i = 0; i < c->n_pools && off > 0 && (size_t)off < err_len; i++)
            off += snprintf(err + off, err_len - (size_t)off, "%s %s", i > 0 ? "," : "",
                            c->pools[i].name);
        if (c->n_pools == 0 && off > 0 && (size_t)off < err_len)
            snprintf(err + off, err_len - (size_t)off, " none yet");
    } else {
        /* the most particular limit first: a flooder is told it is the one */
        slot = client_slot(c, client, &found);
        if (found && c->clients[slot].held >= c->cfg.max_queued_per_client) {
            reason = REFUSE_CLIENT;
            snprintf(err, err_len,
                     "this client (API key or address) holds %d requests, its limit "
                     "(--max-queued-per-key); retry in %d s",
                     c->clients[slot].held, RT_RETRY_AFTER_S);
        } else if (c->pools[p].held >= c->cfg.max_queued_per_pool) {
            reason = REFUSE_POOL;
            snprintf(
                err, err_len,
                "pool '%s' holds %d requests, its limit (--max-queued-per-pool); retry in %d s",
                c->pools[p].name, c->pools[p].held, RT_RETRY_AFTER_S);
        } else if (c->n_held >= c->cfg.max_queued) {
            reason = REFUSE_QUEUE;
            snprintf(err, err_len,
                     "the router holds %d requests, its limit (--max-queued); retry in %d s",
                     c->n_held, RT_RETRY_AFTER_S);
        }
    }
    if (reason < 0) {
        c->clients[slot].hash = client;
        c->clients[slot].held++;
        c->pools[p].held++;
        c->n_held++;
    }
    pthread_mutex_unlock(&c->lock);
    if (reason >= 0) {
        tdm_metrics_counter_inc(c->refused[reason]);
        return reason == REFUSE_UNKNOWN_POOL ? TDM_ERR_INVALID : TDM_ERR_BUSY;
    }
    *pool_out = p;
    return TDM_OK;
}

/* A request's place is free again (its final event went out, or it was
 * never queued). */
static void release(rt_core_t *c, int pool, uint64_t client)
{
    pthread_mutex_lock(&c->lock);
    c->pools[pool].held--;
    client_release(c, client);
    c->n_held--;
    pthread_mutex_unlock(&c->lock);
}

tdm_status_t rt_core_submit(rt_core_t *core, const rt_params_t *p, rt_event_cb_t cb, void *user,
                            uint64_t *id_out, char *err, size_t err_len)
{
    if (atomic_load(&core->draining)) {
        snprintf(err, err_len, "this router is shutting down; send the request to another replica");
        return TDM_ERR_CANCELLED;
    }
    const rt_model_info_t *m = rt_core_model(core, p->model);
    if (m == NULL) {
        snprintf(err, err_len, "The model `%s` does not exist.", p->model ? p->model : "");
        return TDM_ERR_NOT_FOUND;
    }
    if (p->n_prompt == 0) {
        snprintf(err, err_len, "the prompt is empty");
        return TDM_ERR_INVALID;
    }
    if (p->max_tokens <= 0) {
        snprintf(err, err_len, "max_tokens must be at least 1, got %d", p->max_tokens);
        return TDM_ERR_INVALID;
    }
    if ((int64_t)p->n_prompt + 1 > m->max_model_len) {
        snprintf(err, err_len,
                 "This model's maximum context length is %d tokens. However, your prompt has "
                 "%zu tokens (no room for any output).",
                 m->max_model_len, p->n_prompt);
        return TDM_ERR_INVALID;
    }
    if (p->n_stop > RT_MAX_STOP || p->top_logprobs < 0 || p->top_logprobs > RT_MAX_TOP_LOGPROBS) {
        snprintf(err, err_len, "at most %d stop strings and 0..%d top_logprobs", RT_MAX_STOP,
                 RT_MAX_TOP_LOGPROBS);
        return TDM_ERR_INVALID;
    }
    int32_t n_vocab = tdm_tokenizer_n_vocab(m->tok);
    for (size_t i = 0; i < p->n_prompt; i++) {
        if (p->prompt[i] < 0 || p->prompt[i] >= n_vocab) {
            snprintf(err, err_len,
                     "prompt token %d at position %zu is not in the vocabulary "
                     "(0..%d)",
                     p->prompt[i], i, n_vocab - 1);
            return TDM_ERR_INVALID;
        }
    }
    char why[160];
    if (tdm_sampling_params_validate(&p->sampling, why, sizeof(why)) != TDM_OK) {
        snprintf(err, err_len, "%s", why);
        return TDM_ERR_INVALID;
    }
    const char *who = p->client != NULL ? p->client : "";
    uint64_t client = tdm_hash128(who, strlen(who), core->client_seed).lo;
    int pool = -1;
    tdm_status_t st = admit(core, p->tier, client, &pool, err, err_len);
    if (st != TDM_OK)
        return st;
    rreq_t *r = calloc(1, sizeof(*r));
    inbox_item_t *it = calloc(1, sizeof(*it));
    if (r == NULL || it == NULL) {
        free(r);
        free(it);
        release(core, pool, client);
        snprintf(err, err_len, "out of memory");
        return TDM_ERR_NOMEM;
    }
    r->pool_idx = pool;
    r->client = client;
    r->prompt = malloc(p->n_prompt * sizeof(int32_t));
    r->cap_out = 64;
    r->out = malloc(r->cap_out * sizeof(int32_t));
    r->stop_ids = p->n_stop_token_ids ? malloc(p->n_stop_token_ids * sizeof(int32_t)) : NULL;
    if (r->prompt == NULL || r->out == NULL || (p->n_stop_token_ids && r->stop_ids == NULL) ||
        tdm_textstream_init(&r->text, p->stop, p->n_stop) != TDM_OK) {
        release(core, pool, client);
        req_free(r);
        free(it);
        snprintf(err, err_len, "out of memory");
        return TDM_ERR_NOMEM;
    }
    memcpy(r->prompt, p->prompt, p->n_prompt * sizeof(int32_t));
    r->n_prompt = p->n_prompt;
    if (p->n_stop_token_ids)
        memcpy(r->stop_ids, p->stop_token_ids, p->n_stop_token_ids * sizeof(int32_t));
    r->n_stop_ids = p->n_stop_token_ids;
    r->model = m;
    snprintf(r->pool, sizeof(r->pool), "%s", core->pools[pool].name);
    snprintf(r->request_id, sizeof(r->request_id), "%s", p->request_id ? p->request_id : "");
    r->sampling = p->sampling;
    int64_t room = (int64_t)m->max_model_len - (int64_t)p->n_prompt;
    r->max_tokens = p->max_tokens < room ? p->max_tokens : (int32_t)room;
    r->ignore_eos = p->ignore_eos;
    r->logprobs = p->logprobs || p->top_logprobs > 0;
    r->top_logprobs = p->top_logprobs;
    r->deadline_ms = p->deadline_ms;
    r->cb = cb;
    r->user = user;
    r->id = atomic_fetch_add(&core->next_id, 1);
    r->t_submit = now_s();
    it->req = r;
    if (id_out != NULL)
        *id_out = r->id;
    atomic_fetch_add(&core->n_in_flight, 1);
    inbox_push(core, it);
    return TDM_OK;
}

void rt_core_cancel(rt_core_t *core, uint64_t id)
{
    inbox_item_t *it = calloc(1, sizeof(*it));
    if (it == NULL)
        return; /* the request runs to its end; its events are still delivered */
    it->cancel_id = id;
    inbox_push(core, it);
}

/* ------------------------------------------------------------ requests */

static void send_msg(rnode_t *n, Tandem__Cluster__ClusterMsg *msg)
{
    if (n->conn != NULL && !n->failed && tdm_cluster_send(n->conn, msg) != TDM_OK)
        n->failed = true;
}

static void node_cancel_job(rnode_t *n, uint64_t job)
{
    Tandem__Cluster__Cancel c = TANDEM__CLUSTER__CANCEL__INIT;
    c.id = job;
    Tandem__Cluster__ClusterMsg msg = TANDEM__CLUSTER__CLUSTER_MSG__INIT;
    msg.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_CANCEL;
    msg.cancel = &c;
    send_msg(n, &msg);
}

/* Detaches a request from its node (the job is over or abandoned). */
static void req_leave_node(rreq_t *r, bool cancel)
{
    rnode_t *n = r->node;
    if (n == NULL)
        return;
    if (cancel && n->state == N_READY)
        node_cancel_job(n, r->job_id);
    n->active_jobs--;
    n->active_tokens -= (int64_t)(r->n_prompt + r->n_out);
    r->node = NULL;
}

static void req_unlink(rt_core_t *c, rreq_t *r)
{
    for (rreq_t **l = &c->reqs; *l != NULL; l = &(*l)->next) {
        if (*l == r) {
            *l = r->next;
            if (c->reqs_tail == &r->next)
                c->reqs_tail = l;
            c->n_reqs--;
            return;
        }
    }
}

/* Sends one event to the front end; a final one ends the request. */
static void emit(rt_core_t *c, rreq_t *r, const char *text, size_t len, const rt_token_info_t *tok,
                 tdm_finish_reason_t finish, int http_status, const char *error)
{
    rt_event_t ev = {
        .id = r->id,
        .text = text,
        .text_len = len,
        .tokens = tok,
        .n_tokens = tok != NULL ? 1 : 0,
        .finish = finish,
        .http_status = http_status,
        .error = error,
        .n_prompt = (int32_t)r->n_prompt,
        .n_output = (int32_t)r->n_out,
        .n_cached = r->n_cached,
    };
    r->cb(r->user, &ev);
    if (finish == TDM_FINISH_NONE)
        return;
    double e2e = now_s() - r->t_submit;
    if (finish == TDM_FINISH_ERROR)
        tdm_metrics_counter_inc(c->m.failed);
    else if (finish == TDM_FINISH_CANCELLED)
        tdm_metrics_counter_inc(c->m.cancelled);
    else
        tdm_metrics_histogram_observe(c->m.e2e, e2e);
    tdm_log_debug(MOD, "request %llu (%s): %s after %.3f s, %zu prompt, %zu out",
                  (unsigned long long)r->id, r->request_id, tdm_finish_reason_str(finish), e2e,
                  r->n_prompt, r->n_out);
    req_leave_node(r, true);
    req_unlink(c, r);
    release(c, r->pool_idx, r->client);
    req_free(r);
    atomic_fetch_sub(&c->n_in_flight, 1);
}

static void fail(rt_core_t *c, rreq_t *r, int http_status, const char *why)
{
    const char *text;
    size_t len;
    tdm_textstream_flush(&r->text, &text, &len);
    emit(c, r, text, len, NULL, TDM_FINISH_ERROR, http_status, why);
}

/* One new token of r. Returns true when the request ended. */
static bool push_token(rt_core_t *c, rreq_t *r, const Tandem__Cluster__JobToken *jt)
{
    if (r->n_out == r->cap_out) {
        int32_t *p = realloc(r->out, r->cap_out * 2 * sizeof(int32_t));
        if (p == NULL) {
            fail(c, r, 500, "out of memory");
            return true;
        }
        r->out = p;
        r->cap_out *= 2;
    }
    int32_t tok = jt->token;
    r->out[r->n_out++] = tok;
    int64_t now = tdm_net_now_ms();
    if (r->n_out == 1)
        tdm_metrics_histogram_observe(c->m.ttft, now_s() - r->t_submit);
    else
        tdm_metrics_histogram_observe(c->m.itl, (double)(now - r->t_last_token_ms) / 1000.0);
    r->t_last_token_ms = now;
    rt_token_info_t info = {.token = tok, .logprob = jt->logprob};
    for (size_t i = 0; i < jt->n_top && i < RT_MAX_TOP_LOGPROBS; i++) {
        info.top[i].token = jt->top[i]->token;
        info.top[i].logprob = jt->top[i]->logprob;
        info.n_top = (int32_t)i + 1;
    }
    const rt_token_info_t *ti = r->logprobs ? &info : NULL;
    if (tdm_tokenizer_is_stop(r->model->tok, tok, r->ignore_eos, r->stop_ids,
                              r->n_stop_ids)) { /* its text is not shown */
        const char *text;
        size_t len;
        tdm_textstream_flush(&r->text, &text, &len);
        emit(c, r, text, len, ti, TDM_FINISH_STOP, 0, NULL);
        return true;
    }
    bool length = (int32_t)r->n_out >= r->max_tokens ||
                  (int64_t)(r->n_prompt + r->n_out) >= r->model->max_model_len;
    char piece[256];
    size_t plen = tdm_tokenizer_token_bytes(r->model->tok, tok, false, piece, sizeof(piece));
    plen = plen > sizeof(piece) ? sizeof(piece) : plen;
    const char *text;
    size_t len;
    if (tdm_textstream_push(&r->text, piece, plen, length, &text, &len)) {
        emit(c, r, text, len, ti, TDM_FINISH_STOP, 0, NULL);
        return true;
    }
    emit(c, r, text, len, ti, length ? TDM_FINISH_LENGTH : TDM_FINISH_NONE, 0, NULL);
    return length;
}

/* --------------------------------------------------------- scheduling */

static rnode_t *pick_node(rt_core_t *c, const rreq_t *r, Tandem__Cluster__Role role)
{
    rnode_t *best = NULL;
    for (rnode_t *n = c->nodes; n != NULL; n = n->next) {
        if (n->state != N_READY || n->failed || n->role != role || n->hb.draining ||
            strcmp(n->pool, r->pool) != 0 || strcmp(n->model, r->model->name) != 0)
            continue;
        if (best == NULL) {
            best = n;
            continue;
        }
        if (role == TANDEM__CLUSTER__ROLE__ROLE_PREFILL) {
            /* fewest prompt tokens queued */
            if (n->active_tokens + n->hb.queued_tokens <
                best->active_tokens + best->hb.queued_tokens)
                best = n;
        } else {
            /* fewest requests, then most free KV blocks */
            if (n->active_jobs < best->active_jobs ||
                (n->active_jobs == best->active_jobs && n->hb.free_blocks > best->hb.free_blocks))
                best = n;
        }
    }
    return best;
}

static void fill_sampling(const rreq_t *r, Tandem__Cluster__Sampling *s)
{
    s->temperature = r->sampling.temperature;
    s->top_k = r->sampling.top_k;
    s->top_p = r->sampling.top_p;
    s->min_p = r->sampling.min_p;
    s->repetition_penalty = r->sampling.repetition_penalty;
    s->frequency_penalty = r->sampling.frequency_penalty;
    s->presence_penalty = r->sampling.presence_penalty;
    s->has_seed = r->sampling.has_seed;
    s->seed = r->sampling.seed;
}

/* Sends r to n as a prefill or a decode job. */
static bool send_job(rt_core_t *c, rreq_t *r, rnode_t *n, Tandem__Cluster__JobKind kind)
{
    Tandem__Cluster__Job job = TANDEM__CLUSTER__JOB__INIT;
    Tandem__Cluster__Sampling samp = TANDEM__CLUSTER__SAMPLING__INIT;
    fill_sampling(r, &samp);
    size_t n_tok = r->n_prompt + (kind == TANDEM__CLUSTER__JOB_KIND__JOB_DECODE ? r->n_out : 0);
    int32_t *toks = malloc(n_tok * sizeof(int32_t));
    if (toks == NULL)
        return false;
    memcpy(toks, r->prompt, r->n_prompt * sizeof(int32_t));
    if (n_tok > r->n_prompt)
        memcpy(toks + r->n_prompt, r->out, r->n_out * sizeof(int32_t));
    job.id = ++c->next_job;
    job.kind = kind;
    job.prompt = toks;
    job.n_prompt = n_tok;
    job.sampling = &samp;
    job.max_tokens = r->max_tokens - (int32_t)r->n_out;
    job.stop_token_ids = r->stop_ids;
    job.n_stop_token_ids = r->n_stop_ids;
    job.ignore_eos = r->ignore_eos;
    job.logprobs = r->logprobs;
    job.top_logprobs = r->top_logprobs;
    job.request_id = r->request_id;
    if (kind == TANDEM__CLUSTER__JOB_KIND__JOB_DECODE) {
        job.n_prior_output = (int32_t)r->n_out;
        job.n_kv_tokens = r->n_kv_tokens;
        job.block_keys = r->keys;
        job.n_block_keys = r->n_keys;
    }
    Tandem__Cluster__ClusterMsg msg = TANDEM__CLUSTER__CLUSTER_MSG__INIT;
    msg.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_JOB;
    msg.job = &job;
    send_msg(n, &msg);
    free(toks);
    if (n->failed)
        return false;
    r->node = n;
    r->job_id = job.id;
    r->state = kind == TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL ? R_PREFILL : R_DECODE;
    n->active_jobs++;
    n->active_tokens += (int64_t)n_tok;
    tdm_log_debug(MOD, "request %llu (%s): job %llu, %s on %s (%zu tokens, %zu keys)",
                  (unsigned long long)r->id, r->request_id, (unsigned long long)job.id,
                  kind == TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL ? "prefill" : "decode", n->name,
                  n_tok, r->n_keys);
    return true;
}

static void schedule(rt_core_t *c, int64_t now)
{
    int queued = 0;
    for (int i = 0; i < c->n_pools; i++)
        c->pools[i].count = 0;
    for (rreq_t *r = c->reqs, *next; r != NULL; r = next) {
        next = r->next;
        if (r->deadline_ms > 0 && now >= r->deadline_ms) {
            fail(c, r, 504, "the request's deadline passed before it finished");
            continue;
        }
        if (r->state != R_QUEUED)
            continue;
        bool want_prefill =
            !r->prefill_done && r->n_out == 0 && (int)r->n_prompt >= c->cfg.disagg_min_tokens;
        rnode_t *n = NULL;
        if (want_prefill) {
            n = pick_node(c, r, TANDEM__CLUSTER__ROLE__ROLE_PREFILL);
            if (n != NULL && send_job(c, r, n, TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL))
                continue;
        }
        n = pick_node(c, r, TANDEM__CLUSTER__ROLE__ROLE_DECODE);
        if (n != NULL && send_job(c, r, n, TANDEM__CLUSTER__JOB_KIND__JOB_DECODE))
            continue;
        if (now - r->t_queued_ms >= c->cfg.queue_timeout_ms) {
            char why[200];
            snprintf(why, sizeof(why),
                     "no node of pool '%s' could take the request within %d ms; retry later",
                     r->pool, c->cfg.queue_timeout_ms);
            fail(c, r, 503, why);
            continue;
        }
        queued++;
        c->pools[r->pool_idx].count++;
    }
    for (int i = 0; i < c->n_pools; i++)
        tdm_metrics_gauge_set(c->pools[i].pending, c->pools[i].count);
    atomic_store(&c->n_queued, queued);
    tdm_metrics_gauge_set(c->m.waiting, queued);
    tdm_metrics_gauge_set(c->m.running, (double)c->n_reqs - queued);
}

/* The node of r is gone, failed its job or handed it back while draining:
 * back to the queue, with every token so far, or an error when it failed
 * too often (a hand-off is not a failure and is not counted). */
static void requeue(rt_core_t *c, rreq_t *r, const char *why, bool handoff)
{
    req_leave_node(r, false);
    if (!handoff)
        r->attempts++;
    if (r->attempts > c->cfg.max_retries) {
        char msg[256];
        snprintf(msg, sizeof(msg), "the request failed on %d nodes; last: %s", r->attempts, why);
        fail(c, r, 503, msg);
        return;
    }
    if (r->state == R_PREFILL && r->attempts >= 2)
        r->prefill_done = true; /* prefill keeps failing: let a decode node compute it */
    if (r->state == R_DECODE && !handoff)
        tdm_metrics_counter_inc(c->m.failovers);
    if (handoff)
        tdm_metrics_counter_inc(c->m.handoffs);
    tdm_log_info(MOD, "request %llu (%s): %s; re-sending with %zu tokens generated so far",
                 (unsigned long long)r->id, r->request_id, why, r->n_out);
    r->state = R_QUEUED;
    r->t_queued_ms = tdm_net_now_ms();
}

static void keep_keys(rreq_t *r, const Tandem__Cluster__JobEvent *ev)
{
    r->keys = calloc(ev->n_block_keys ? ev->n_block_keys : 1, sizeof(ProtobufCBinaryData));
    if (r->keys == NULL)
        return;
    for (size_t i = 0; i < ev->n_block_keys; i++) {
        if (ev->block_keys[i].len != sizeof(tdm_hash128_t))
            break;
        r->keys[i].data = malloc(ev->block_keys[i].len);
        if (r->keys[i].data == NULL)
            break;
        memcpy(r->keys[i].data, ev->block_keys[i].data, ev->block_keys[i].len);
        r->keys[i].len = ev->block_keys[i].len;
        r->n_keys = i + 1;
    }
    r->n_kv_tokens = ev->n_kv_tokens;
    if (r->n_keys < ev->n_block_keys || r->n_kv_tokens < 0 || r->n_kv_tokens > (int32_t)r->n_prompt)
        r->n_kv_tokens = 0; /* the decode node computes the prompt itself */
}

static void on_job_event(rt_core_t *c, rnode_t *n, const Tandem__Cluster__JobEvent *ev)
{
    n->last_seen_ms = tdm_net_now_ms();
    rreq_t *r = NULL;
    for (rreq_t *x = c->reqs; x != NULL; x = x->next)
        if (x->node == n && x->job_id == ev->id) {
            r = x;
            break;
        }
    if (r == NULL)
        return; /* a job the router gave up on */
    if (r->state == R_PREFILL) {
        if (ev->finish == TDM_FINISH_NONE)
            return;
        if (ev->finish == TDM_FINISH_ERROR || ev->n_tokens != 1) {
            char why[200];
            snprintf(why, sizeof(why), "prefill node %s %s: %s", n->name,
                     ev->handoff ? "handed it back" : "failed", ev->error ? ev->error : "no token");
            requeue(c, r, why, ev->handoff);
            return;
        }
        req_leave_node(r, false);
        r->prefill_done = true;
        r->n_cached = ev->n_cached + ev->n_imported;
        keep_keys(r, ev);
        r->state = R_QUEUED;
        r->t_queued_ms = tdm_net_now_ms();
        push_token(c, r, ev->tokens[0]); /* may end the request (max_tokens 1, a stop) */
        return;
    }
    if (r->n_out == 0 && r->n_cached == 0)
        r->n_cached = ev->n_cached;
    for (size_t i = 0; i < ev->n_tokens; i++)
        if (push_token(c, r, ev->tokens[i]))
            return;
    if (ev->finish == TDM_FINISH_ERROR) {
        char why[200];
        snprintf(why, sizeof(why), "decode node %s %s: %s", n->name,
                 ev->handoff ? "handed it back" : "failed", ev->error ? ev->error : "unknown");
        requeue(c, r, why, ev->handoff);
    } else if (ev->finish != TDM_FINISH_NONE) {
        /* the node ended it (model length): close the text */
        const char *text;
        size_t len;
        tdm_textstream_flush(&r->text, &text, &len);
        emit(c, r, text, len, NULL, (tdm_finish_reason_t)ev->finish, 0, NULL);
    }
}

/* --------------------------------------------------------------- nodes */

static void count_nodes(rt_core_t *c)
{
    int pre = 0, dec = 0;
    for (rnode_t *n = c->nodes; n != NULL; n = n->next) {
        if (n->state != N_READY || n->failed)
            continue;
        if (n->role == TANDEM__CLUSTER__ROLE__ROLE_PREFILL)
            pre++;
        else if (!n->hb.draining)
            dec++;
    }
    tdm_metrics_gauge_set(c->m.nodes_prefill, pre);
    tdm_metrics_gauge_set(c->m.nodes_decode, dec);
}

static void on_node_error(void *user, tdm_conn_t *conn, tdm_status_t why)
{
    (void)conn;
    rnode_t *n = user;
    if (!n->failed && n->state == N_READY)
        tdm_log_warn(MOD, "lost node %s (%s)", n->name, tdm_status_str(why));
    n->failed = true;
}

static void on_accept(void *user, tdm_conn_t *conn)
{
    rt_core_t *c = user;
    rnode_t *n = calloc(1, sizeof(*n));
    if (n == NULL) {
        tdm_conn_close(conn, true);
        return;
    }
    n->core = c;
    n->conn = conn;
    n->state = N_HELLO;
    n->last_seen_ms = tdm_net_now_ms();
    snprintf(n->name, sizeof(n->name), "%s", tdm_conn_peer(conn));
    tdm_conn_set_owner(conn, n, on_node_error);
    n->next = c->nodes;
    c->nodes = n;
}

static void welcome(rnode_t *n, bool ok, const char *error)
{
    Tandem__Cluster__Welcome w = TANDEM__CLUSTER__WELCOME__INIT;
    w.ok = ok;
    w.error = (char *)error;
    w.node_timeout_ms = (int32_t)n->core->cfg.node_timeout_ms;
    Tandem__Cluster__ClusterMsg msg = TANDEM__CLUSTER__CLUSTER_MSG__INIT;
    msg.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_WELCOME;
    msg.welcome = &w;
    send_msg(n, &msg);
}

/* The answer to a node's heartbeat (an empty Heartbeat): this router still
 * knows it. A node that stops hearing these reconnects (proto/cluster.proto). */
static void send_heartbeat_answer(rnode_t *n)
{
    Tandem__Cluster__Heartbeat hb = TANDEM__CLUSTER__HEARTBEAT__INIT;
    Tandem__Cluster__ClusterMsg msg = TANDEM__CLUSTER__CLUSTER_MSG__INIT;
    msg.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_HEARTBEAT;
    msg.heartbeat = &hb;
    send_msg(n, &msg);
}

static void on_hello(rt_core_t *c, rnode_t *n, const Tandem__Cluster__Hello *h)
{
    const char *why = NULL;
    const char *pool = h->pool != NULL && h->pool[0] != '\0' ? h->pool : "default";
    /* the cluster token was proven by the transport's handshake */
    if (h->version != TDM_CLUSTER_VERSION)
        why = "protocol version differs from the router's";
    else if (h->role != TANDEM__CLUSTER__ROLE__ROLE_PREFILL &&
             h->role != TANDEM__CLUSTER__ROLE__ROLE_DECODE)
        why = "unknown role";
    else if (h->model == NULL || strcmp(h->model, c->model.name) != 0)
        why = "the node serves a model this router does not";
    else if (h->max_model_len < c->model.max_model_len)
        why = "the node's --max-model-len is below the router's";
    else if (!pool_name_ok(pool, strlen(pool)))
        why = "its --pool is not a pool name (1-63 printable ASCII characters, no comma)";
    if (why == NULL) {
        pthread_mutex_lock(&c->lock);
        bool known = pool_find(c, pool) >= 0;
        bool added = pool_add(c, pool) >= 0;
        pthread_mutex_unlock(&c->lock);
        if (!added)
            why = "the router knows as many pools as it can (64); give this node a pool it "
                  "has already";
        else if (!known)
            tdm_log_info(MOD,
                         "pool %s is new: it takes requests from now on, also once it "
                         "has no node",
                         pool);
    }
    if (why != NULL) {
        tdm_log_warn(MOD, "refused node %s (%s, model '%s'): %s", h->name ? h->name : "?",
                     tdm_conn_peer(n->conn), h->model ? h->model : "", why);
        welcome(n, false, why);
        n->failed = true;
        return;
    }
    n->role = h->role;
    snprintf(n->name, sizeof(n->name), "%s", h->name && h->name[0] ? h->name : "node");
    snprintf(n->model, sizeof(n->model), "%s", h->model);
    snprintf(n->pool, sizeof(n->pool), "%s", pool);
    snprintf(n->metrics, sizeof(n->metrics), "%s", h->metrics_address ? h->metrics_address : "");
    n->hb.free_blocks = h->total_blocks;
    n->hb.total_blocks = h->total_blocks;
    n->state = N_READY;
    welcome(n, true, NULL);
    tdm_log_info(MOD, "node %s registered: %s, pool %s, %d KV blocks, codec %s, metrics %s",
                 n->name, n->role == TANDEM__CLUSTER__ROLE__ROLE_PREFILL ? "prefill" : "decode",
                 n->pool, h->total_blocks, h->kv_codec ? h->kv_codec : "?", n->metrics);
    count_nodes(c);
}

static void on_message(void *user, const tdm_net_msg_t *msg)
{
    rt_core_t *c = user;
    rnode_t *n = tdm_conn_owner(msg->conn);
    if (n == NULL || n->core != c || n->failed)
        return;
    char why[160];
    Tandem__Cluster__ClusterMsg *m = tdm_cluster_decode(msg, why, sizeof(why));
    if (m == NULL) {
        tdm_log_warn(MOD, "bad message from %s: %s; closing it", n->name, why);
        n->failed = true;
        return;
    }
    if (n->state == N_HELLO && m->body_case != TANDEM__CLUSTER__CLUSTER_MSG__BODY_HELLO) {
        tdm_log_warn(MOD, "%s sent message %d before Hello; closing it", n->name, m->body_case);
        n->failed = true;
    } else {
        switch (m->body_case) {
        case TANDEM__CLUSTER__CLUSTER_MSG__BODY_HELLO:
            if (n->state == N_HELLO)
                on_hello(c, n, m->hello);
            break;
        case TANDEM__CLUSTER__CLUSTER_MSG__BODY_HEARTBEAT: {
            bool was = n->hb.draining;
            n->hb = *m->heartbeat;
            n->hb.base.descriptor = NULL;
            n->last_seen_ms = tdm_net_now_ms();
            if (n->hb.draining && !was) {
                tdm_log_info(MOD, "node %s is draining: no new work goes to it", n->name);
                count_nodes(c);
            }
            if (n->state == N_READY)
                send_heartbeat_answer(n);
            break;
        }
        case TANDEM__CLUSTER__CLUSTER_MSG__BODY_EVENT: on_job_event(c, n, m->event); break;
        default:
            tdm_log_warn(MOD, "unexpected message %d from %s; ignored", m->body_case, n->name);
            break;
        }
    }
    tdm_cluster_free(m);
}

/* Drops nodes that failed or went silent; their requests go elsewhere. */
static void check_nodes(rt_core_t *c, int64_t now)
{
    bool changed = false;
    for (rnode_t **l = &c->nodes; *l != NULL;) {
        rnode_t *n = *l;
        int64_t silent = now - n->last_seen_ms;
        if (!n->failed && silent > c->cfg.node_timeout_ms) {
            tdm_log_warn(MOD, "node %s sent nothing for %lld ms; taking its requests elsewhere",
                         n->name, (long long)silent);
            n->failed = true;
        }
        if (!n->failed) {
            l = &n->next;
            continue;
        }
        char why[160];
        snprintf(why, sizeof(why), "node %s was lost", n->name);
        for (rreq_t *r = c->reqs, *next; r != NULL; r = next) {
            next = r->next;
            if (r->node == n)
                requeue(c, r, why, false);
        }
        *l = n->next;
        tdm_conn_close(n->conn, true);
        free(n);
        changed = true;
    }
    if (changed)
        count_nodes(c);
}

/* -------------------------------------------------------------- thread */

static void drain_inbox(rt_core_t *c)
{
    pthread_mutex_lock(&c->lock);
    inbox_item_t *it = c->inbox;
    c->inbox = NULL;
    c->inbox_tail = &c->inbox;
    pthread_mutex_unlock(&c->lock);
    while (it != NULL) {
        inbox_item_t *next = it->next;
        if (it->req != NULL) {
            /* admitted by rt_core_submit: its place is taken already */
            rreq_t *r = it->req;
            r->t_queued_ms = tdm_net_now_ms();
            r->state = R_QUEUED;
            *c->reqs_tail = r;
            c->reqs_tail = &r->next;
            c->n_reqs++;
            tdm_metrics_counter_inc(c->m.requests);
        } else {
            for (rreq_t *r = c->reqs; r != NULL; r = r->next) {
                if (r->id == it->cancel_id) {
                    const char *text;
                    size_t len;
                    tdm_textstream_flush(&r->text, &text, &len);
                    emit(c, r, text, len, NULL, TDM_FINISH_CANCELLED, 0, NULL);
                    break;
                }
            }
        }
        free(it);
        it = next;
    }
}

static void *core_thread(void *arg)
{
    rt_core_t *c = arg;
    while (!atomic_load(&c->stop)) {
        tdm_net_progress(c->net);
        drain_inbox(c);
        int64_t now = tdm_net_now_ms();
        check_nodes(c, now);
        schedule(c, now);
        tdm_net_wait(c->net, 10);
    }
    return NULL;
}

/* ------------------------------------------------------------ lifetime */

static tdm_status_t setup_metrics(rt_core_t *c)
{
    tdm_metrics_registry_t *reg = c->cfg.registry;
    if (reg == NULL)
        return TDM_ERR_INVALID;
    static const double lat[] = {0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25, 0.5,
                                 0.75,  1.0,  2.5,  5.0,  7.5,  10.0, 20.0, 40.0, 80.0};
    static const double itl[] = {0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                                 0.15,  0.2,   0.3,  0.4,  0.5,  0.75, 1.0,  2.5};
    static const char *const pool_label[1] = {"pool"};
    tdm_metrics_desc_t pd = {
        .type = TDM_METRICS_TYPE_GAUGE,
        .name = "tandem_router_pending_requests",
        .help = "Requests waiting for a node of their pool (the scale-from-zero signal).",
        .label_names = pool_label,
        .n_labels = 1,
        .max_children = RT_MAX_POOLS,
    };
    tdm_status_t st = tdm_metrics_family_register(reg, &pd, &c->pending_family);
    if (st != TDM_OK)
        return st;
    static const char *const reason_label[1] = {"reason"};
    tdm_metrics_desc_t rd = {
        .type = TDM_METRICS_TYPE_COUNTER,
        .name = "tandem_router_requests_refused_total",
        .help = "Requests refused at admission: unknown_pool (400), queue_full, pool_full, "
                "client_full (429).",
        .label_names = reason_label,
        .n_labels = 1,
        .max_children = REFUSE_COUNT,
    };
    tdm_metrics_family_t *refused = NULL;
    if ((st = tdm_metrics_family_register(reg, &rd, &refused)) != TDM_OK)
        return st;
    for (int i = 0; i < REFUSE_COUNT; i++) {
        const char *values[1] = {refuse_reason[i]};
        if ((st = tdm_metrics_family_counter(refused, values, &c->refused[i])) != TDM_OK)
            return st;
    }
    if ((st = tdm_metrics_counter_register(reg, "tandem_router_requests_total",
                                           "Requests accepted by the router.", &c->m.requests)) !=
            TDM_OK ||
        (st = tdm_metrics_counter_register(reg, "tandem_router_requests_failed_total",
                                           "Requests that ended with an error.", &c->m.failed)) !=
            TDM_OK ||
        (st = tdm_metrics_counter_register(reg, "tandem_router_requests_cancelled_total",
                                           "Requests cancelled by their client.",
                                           &c->m.cancelled)) != TDM_OK ||
        (st = tdm_metrics_counter_register(reg, "tandem_router_failovers_total",
                                           "Requests moved to another decode node mid-stream.",
                                           &c->m.failovers)) != TDM_OK ||
        (st = tdm_metrics_counter_register(
             reg, "tandem_router_handoffs_total",
             "Requests a draining node handed back at its drain timeout, re-sent elsewhere.",
             &c->m.handoffs)) != TDM_OK ||
        (st = tdm_metrics_gauge_register(reg, "vllm:num_requests_waiting",
                                         "Requests waiting for a node (router view).",
                                         &c->m.waiting)) != TDM_OK ||
        (st = tdm_metrics_gauge_register(reg, "vllm:num_requests_running",
                                         "Requests on a node (router view).", &c->m.running)) !=
            TDM_OK ||
        (st = tdm_metrics_gauge_register(reg, "tandem_router_prefill_nodes",
                                         "Registered prefill nodes.", &c->m.nodes_prefill)) !=
            TDM_OK ||
        (st = tdm_metrics_gauge_register(reg, "tandem_router_decode_nodes",
                                         "Registered decode nodes taking work.",
                                         &c->m.nodes_decode)) != TDM_OK ||
        (st = tdm_metrics_histogram_register(reg, "vllm:time_to_first_token_seconds",
                                             "Time to first token, from arrival at the router.",
                                             lat, (int)(sizeof(lat) / sizeof(lat[0])),
                                             &c->m.ttft)) != TDM_OK ||
        (st = tdm_metrics_histogram_register(
             reg, "vllm:inter_token_latency_seconds", "Time between tokens of a request.", itl,
             (int)(sizeof(itl) / sizeof(itl[0])), &c->m.itl)) != TDM_OK ||
        (st = tdm_metrics_histogram_register(
             reg, "vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.",
             lat, (int)(sizeof(lat) / sizeof(lat[0])), &c->m.e2e)) != TDM_OK)
        return st;
    return TDM_OK;
}

/* The configured pools (cfg.pools) and the per-client table. */
static tdm_status_t setup_admission(rt_core_t *c, char *err, size_t err_len)
{
    const rt_core_config_t *cfg = &c->cfg;
    if (cfg->max_queued < 1 || cfg->max_queued > RT_MAX_HELD || cfg->max_queued_per_pool < 1 ||
        cfg->max_queued_per_client < 1) {
        snprintf(err, err_len,
                 "--max-queued must be 1..%d and --max-queued-per-pool, --max-queued-per-key at "
                 "least 1",
                 RT_MAX_HELD);
        return TDM_ERR_INVALID;
    }
    c->clients_cap = 16;
    while (c->clients_cap < 2 * (size_t)cfg->max_queued)
        c->clients_cap *= 2;
    c->clients = calloc(c->clients_cap, sizeof(c->clients[0]));
    if (c->clients == NULL) {
        snprintf(err, err_len, "out of memory for the per-client queue limits");
        return TDM_ERR_NOMEM;
    }
    if (getrandom(&c->client_seed, sizeof(c->client_seed), 0) != sizeof(c->client_seed))
        c->client_seed = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)c;
    const char *list = cfg->pools != NULL ? cfg->pools : "default";
    for (const char *p = list; *p != '\0';) {
        while (*p == ' ')
            p++;
        size_t n = strcspn(p, ",");
        size_t m = n;
        while (m > 0 && p[m - 1] == ' ')
            m--;
        char name[RT_POOL_NAME_MAX];
        if (!pool_name_ok(p, m)) {
            snprintf(err, err_len,
                     "--pools '%s': '%.*s' is not a pool name (1-63 printable ASCII characters, "
                     "comma-separated)",
                     list, (int)m, p);
            return TDM_ERR_INVALID;
        }
        memcpy(name, p, m);
        name[m] = '\0';
        if (pool_add(c, name) < 0) {
            snprintf(err, err_len, "--pools names more than %d pools", RT_MAX_POOLS);
            return TDM_ERR_INVALID;
        }
        p += n;
        if (*p == ',')
            p++;
    }
    return TDM_OK;
}

tdm_status_t rt_core_create(const rt_core_config_t *cfg, char *err, size_t err_len, rt_core_t **out)
{
    rt_core_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return TDM_ERR_NOMEM;
    c->cfg = *cfg;
    pthread_mutex_init(&c->lock, NULL);
    c->inbox_tail = &c->inbox;
    c->reqs_tail = &c->reqs;
    atomic_store(&c->next_id, 1);
    tdm_status_t st = tdm_gguf_open(cfg->model_path, true, err, err_len, &c->gguf);
    if (st != TDM_OK)
        goto fail;
    if ((st = tdm_tokenizer_create(c->gguf, err, err_len, &c->tok)) != TDM_OK)
        goto fail;
    if (tdm_chat_template_detect(c->gguf, &c->model.tmpl, c->default_system,
                                 sizeof(c->default_system)) != TDM_OK)
        c->model.tmpl = TDM_CHAT_TEMPLATE_CHATML;
    tdm_str_t nm;
    if (cfg->served_model_name != NULL)
        snprintf(c->served_name, sizeof(c->served_name), "%s", cfg->served_model_name);
    else if (tdm_gguf_get_str(c->gguf, "general.name", &nm) && nm.len > 0)
        snprintf(c->served_name, sizeof(c->served_name), "%.*s", (int)nm.len, nm.ptr);
    else
        snprintf(c->served_name, sizeof(c->served_name), "model");
    uint64_t trained = 0;
    tdm_str_t arch;
    char key[128];
    if (tdm_gguf_get_str(c->gguf, "general.architecture", &arch)) {
        snprintf(key, sizeof(key), "%.*s.context_length", (int)arch.len, arch.ptr);
        (void)tdm_gguf_get_u64(c->gguf, key, &trained);
    }
    int32_t mml = cfg->max_model_len > 0
                      ? cfg->max_model_len
                      : (int32_t)(trained > 0 && trained < 8192 ? trained : 8192);
    c->model = (rt_model_info_t){
        .name = c->served_name,
        .tok = c->tok,
        .tmpl = c->model.tmpl,
        .default_system = c->default_system,
        .max_model_len = mml,
        .created = (int64_t)time(NULL),
    };
    if ((st = setup_metrics(c)) != TDM_OK) {
        snprintf(err, err_len, "cannot register the router's metrics");
        goto fail;
    }
    if ((st = setup_admission(c, err, err_len)) != TDM_OK)
        goto fail;
    char host[128];
    int port = 0;
    if ((st = tdm_net_parse_addr(cfg->listen, host, sizeof(host), &port)) != TDM_OK) {
        snprintf(err, err_len, "--listen %s is not HOST:PORT", cfg->listen);
        goto fail;
    }
    /* nodes prove the cluster token in the transport's handshake */
    tdm_net_config_t nc = {.name = "router", .token = cfg->token, .local_addr = host};
    if ((st = tdm_net_create(&nc, &c->net)) != TDM_OK) {
        snprintf(err, err_len, "cannot start UCX (see the messages above)");
        goto fail;
    }
    if ((st = tdm_net_set_handler(c->net, TDM_CLUSTER_AM_ID, on_message, c)) != TDM_OK ||
        (st = tdm_net_listen(c->net, host, port, on_accept, c)) != TDM_OK) {
        snprintf(err, err_len, "cannot listen for nodes on %s (%s): is the port in use?",
                 cfg->listen, tdm_status_str(st));
        goto fail;
    }
    if (pthread_create(&c->thread, NULL, core_thread, c) != 0) {
        st = TDM_ERR_IO;
        snprintf(err, err_len, "cannot start the router's thread");
        goto fail;
    }
    c->started = true;
    char pools[256] = "";
    for (int i = 0, off = 0; i < c->n_pools && off >= 0 && (size_t)off < sizeof(pools); i++)
        off += snprintf(pools + off, sizeof(pools) - (size_t)off, "%s%s", i > 0 ? "," : "",
                        c->pools[i].name);
    tdm_log_info(MOD,
                 "serving model '%s' (max model len %d, template %s); nodes register at %s "
                 "(port %d); queue timeout %d ms, prompts under %d tokens skip prefill; pools "
                 "%s (and those nodes name); holds at most %d requests, %d per pool, %d per "
                 "client",
                 c->served_name, mml,
                 c->model.tmpl == TDM_CHAT_TEMPLATE_LLAMA3 ? "llama3" : "chatml", cfg->listen,
                 tdm_net_listen_port(c->net), cfg->queue_timeout_ms, cfg->disagg_min_tokens,
                 pools[0] ? pools : "(none)", cfg->max_queued, cfg->max_queued_per_pool,
                 cfg->max_queued_per_client);
    *out = c;
    return TDM_OK;
fail:
    rt_core_destroy(c);
    return st;
}

void rt_core_destroy(rt_core_t *c)
{
    if (c == NULL)
        return;
    if (c->started) {
        atomic_store(&c->stop, true);
        tdm_net_signal(c->net);
        pthread_join(c->thread, NULL);
    }
    drain_inbox(c);
    while (c->reqs != NULL)
        fail(c, c->reqs, 503, "the router is shutting down");
    while (c->nodes != NULL) {
        rnode_t *n = c->nodes;
        c->nodes = n->next;
        tdm_conn_close(n->conn, true);
        free(n);
    }
    if (c->net != NULL)
        tdm_net_destroy(c->net);
    tdm_tokenizer_destroy(c->tok);
    if (c->gguf != NULL)
        tdm_gguf_close(c->gguf);
    pthread_mutex_destroy(&c->lock);
    free(c->clients);
    free(c);
}
