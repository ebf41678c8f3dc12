/* tandem: the runtime of a prefill or decode node (see node.h). */
#include "node.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "cluster.h"
#include "tandem/engine.h"
#include "tandem/flags.h"
#include "tandem/http.h"
#include "tandem/kv_codec.h"
#include "tandem/kvclient.h"
#include "tandem/log.h"
#include "tandem/metrics.h"
#include "tandem/net.h"
#include "tandem/secret.h"

#define MOD            "node"
#define MAX_ROUTERS    8
#define KV_DEADLINE_MS 3000
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 3000
#define MAX_JOBS       4096

static volatile sig_atomic_t g_term;

static void on_signal(int sig)
{
    (void)sig;
    g_term = 1;
}

typedef struct node node_t;
typedef struct job job_t;

enum { RC_DOWN = 0, RC_HELLO = 1, RC_READY = 2 };

typedef struct rconn {
    node_t *node;
    char addr[160];
    char host[128];
    int port;
    tdm_conn_t *conn;
    int state;
    bool failed;
    int64_t next_try_ms;
    int backoff_ms;
    int64_t last_heard_ms; /* the router's last message (or the connect) */
    int32_t quiet_ms;      /* heard nothing for longer: the router is lost */
} rconn_t;

enum { J_LOOKUP, J_FETCH, J_RUN, J_PUT, J_DONE };

struct job {
    struct job *next;
    node_t *node;
    rconn_t *rc;
    uint64_t id;
    Tandem__Cluster__JobKind kind;
    int state;
    char request_id[64];
    int32_t *prompt;
    size_t n_prompt;
    int32_t *stop_ids;
    size_t n_stop_ids;
    tdm_request_params_t params;
    uint64_t eng_id;
    bool in_engine;
    bool cancelled;
    bool ended;      /* the engine's final event came */
    int kvc_pending; /* store operations still referencing this job */
    /* blocks to import: keys, buffers, what came back */
    size_t n_keys;
    tdm_hash128_t *keys;
    void **bufs;
    size_t *caps, *lens;
    tdm_status_t *kst;
    size_t n_leading; /* LOOKUP answer */
    int32_t n_kv_tokens;
    /* prefill: blocks exported to the store */
    size_t n_out;
    tdm_hash128_t *out_keys;
    void **out_bufs;
    size_t *out_lens;
    tdm_status_t *out_st;
    size_t put_from; /* the first block PUT (earlier ones were in the store) */
    size_t n_put;
    /* prefill: the final event, held until the PUT is acknowledged */
    int32_t first_token;
    float first_logprob;
    tdm_token_logprob_t first_top[TDM_MAX_TOP_LOGPROBS];
    int32_t n_first_top;
    int finish;
    char error[160];
    int32_t ev_n_prompt, ev_n_cached, ev_n_imported;
};

/* What the engine thread hands the network thread (see "engine thread"
 * below): a request event, copied, or the end of a prefill's export. */
enum { NEV_EVENT, NEV_EXPORTED };

typedef struct nev {
    int kind;
    job_t *job;
    int32_t token; /* -1: none */
    float logprob;
    tdm_token_logprob_t top[TDM_MAX_TOP_LOGPROBS];
    int32_t n_top;
    int finish;
    int32_t n_prompt, n_output, n_cached, n_imported;
    char error[160];
} nev_t;

struct node {
    Tandem__Cluster__Role role;
    const char *role_name;
    const char *name;
    const char *served_name;
    const char *pool;
    const char *token;
    const char *codec_name;
    tdm_kv_codec_t codec;
    int kv_lease_s;
    tdm_engine_t *eng;
    const tdm_model_t *model;
    tdm_kv_layout_t layout;
    tdm_kv_codec_ctx_t *codec_ctx;
    size_t block_cap; /* largest payload of one block */
    int32_t bs;
    tdm_net_t *net;
    tdm_kvc_t *kvc;
    rconn_t routers[MAX_ROUTERS];
    size_t n_routers;
    job_t *jobs;
    size_t n_jobs;
    uint64_t nonce;          /* per-process: keys of partial blocks */
    atomic_bool draining;    /* written by the network thread, read by /ready too */
    atomic_int n_registered; /* routers this node is registered with, for /ready */
    atomic_bool drain_asked; /* POST /drain (tandem drain), from the HTTP thread */
    int drain_timeout_s;
    char metrics_addr[160];
    tdm_http_server_t *http;
    tdm_metrics_registry_t *reg;
    tdm_engine_stats_t last; /* stats at the last metrics update */
    struct {
        tdm_metrics_counter_t *prompt, *gen, *pq, *ph, *preempt, *imported, *jobs, *put_blocks,
            *store_hit, *computed;
        tdm_metrics_gauge_t *running, *waiting, *usage, *budget;
    } m;
    int64_t next_beat_ms;
    /* engine thread -> network thread: a ring of ev_cap items allocated at
     * start; ev_head and ev_len under ev_lock, the items [ev_head, +ev_len)
     * belong to the network thread until it advances ev_head */
    pthread_mutex_t ev_lock;
    pthread_cond_t ev_space; /* the engine thread waits here when the ring is full */
    nev_t *ev_ring;
    size_t ev_cap, ev_head, ev_len;
};

/* ---------------------------------------------------------------- jobs */

static void job_free_bufs(job_t *j)
{
    for (size_t i = 0; i < j->n_keys && j->bufs != NULL; i++)
        free(j->bufs[i]);
    free(j->bufs);
    free(j->caps);
    free(j->lens);
    free(j->kst);
    free(j->keys);
    j->bufs = NULL;
    j->caps = j->lens = NULL;
    j->kst = NULL;
    j->keys = NULL;
    j->n_keys = 0;
}

static void job_free_out(job_t *j)
{
    for (size_t i = 0; i < j->n_out && j->out_bufs != NULL; i++)
        free(j->out_bufs[i]);
    free(j->out_bufs);
    free(j->out_lens);
    free(j->out_st);
    free(j->out_keys);
    j->out_bufs = NULL;
    j->out_lens = NULL;
    j->out_st = NULL;
    j->out_keys = NULL;
    j->n_out = 0;
}

static void job_destroy(node_t *n, job_t *j)
{
    for (job_t **l = &n->jobs; *l != NULL; l = &(*l)->next) {
        if (*l == j) {
            *l = j->next;
            n->n_jobs--;
            break;
        }
    }
    job_free_bufs(j);
    job_free_out(j);
    free(j->prompt);
    free(j->stop_ids);
    free(j);
}

/* A job is gone when nothing references it: not in the engine and no store
 * operation pending. */
static void job_maybe_destroy(node_t *n, job_t *j)
{
    if (j->state == J_DONE && !j->in_engine && j->kvc_pending == 0)
        job_destroy(n, j);
}

static bool rc_usable(const rconn_t *rc)
{
    return rc != NULL && rc->state == RC_READY && rc->conn != NULL && !rc->failed;
}

static void send_event(node_t *n, job_t *j, Tandem__Cluster__JobEvent *ev)
{
    (void)n;
    if (j->cancelled || !rc_usable(j->rc))
        return;
    Tandem__Cluster__ClusterMsg msg = TANDEM__CLUSTER__CLUSTER_MSG__INIT;
    msg.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_EVENT;
    msg.event = ev;
    ev->id = j->id;
    if (tdm_cluster_send(j->rc->conn, &msg) != TDM_OK)
        tdm_log_warn(MOD, "job %llu: cannot send an event to the router at %s",
                     (unsigned long long)j->id, j->rc->addr);
}

/* A job that ends before the engine ran it (bad request, cancelled). */
/* Ends a job with an error; handoff: not a failure, the router re-sends it
 * elsewhere without counting an attempt (this node is draining). */
static void end_job(node_t *n, job_t *j, const char *why, bool handoff)
{
    Tandem__Cluster__JobEvent ev = TANDEM__CLUSTER__JOB_EVENT__INIT;
    ev.finish = TDM_FINISH_ERROR;
    ev.error = (char *)why;
    ev.handoff = handoff;
    ev.n_prompt = (int32_t)j->n_prompt;
    send_event(n, j, &ev);
    j->state = J_DONE;
}

/* Alternatives of a token into the message (tl and tp: room for n). */
static void fill_top(Tandem__Cluster__JobToken *tok, const tdm_token_logprob_t *top, int32_t n,
                     Tandem__Cluster__TokenLogprob *tl, Tandem__Cluster__TokenLogprob **tp)
{
    for (int32_t i = 0; i < n; i++) {
        tandem__cluster__token_logprob__init(&tl[i]);
        tl[i].token = top[i].token;
        tl[i].logprob = top[i].logprob;
        tp[i] = &tl[i];
    }
    tok->top = tp;
    tok->n_top = (size_t)n;
}

/* The prefill's answer: first token and the keys of what the store holds. */
static void send_prefill_result(node_t *n, job_t *j)
{
    Tandem__Cluster__JobEvent ev = TANDEM__CLUSTER__JOB_EVENT__INIT;
    Tandem__Cluster__JobToken tok = TANDEM__CLUSTER__JOB_TOKEN__INIT;
    Tandem__Cluster__JobToken *toks[1] = {&tok};
    ProtobufCBinaryData *keys = NULL;
    size_t n_keys = 0;
    int32_t covered = 0;
    if (j->finish != TDM_FINISH_ERROR && j->n_out > 0) {
        keys = malloc(j->n_out * sizeof(*keys));
        for (size_t i = 0; keys != NULL && i < j->n_out; i++) {
            /* blocks before put_from were found in the store; later ones
             * count only if their PUT succeeded, and only up to the first
             * one that did not */
            if (i >= j->put_from && (j->out_st == NULL || j->out_st[i - j->put_from] != TDM_OK))
                break;
            keys[n_keys++] = tdm_cluster_key_bytes(&j->out_keys[i]);
            int32_t end = (int32_t)(i + 1) * n->bs;
            covered = end < (int32_t)j->n_prompt ? end : (int32_t)j->n_prompt;
        }
    }
    Tandem__Cluster__TokenLogprob tl[TDM_MAX_TOP_LOGPROBS], *tp[TDM_MAX_TOP_LOGPROBS];
    if (j->first_token >= 0) {
        tok.token = j->first_token;
        tok.logprob = j->first_logprob;
        fill_top(&tok, j->first_top, j->n_first_top, tl, tp);
        ev.n_tokens = 1;
        ev.tokens = toks;
    }
    ev.finish = j->finish;
    ev.error = j->error[0] != '\0' ? j->error : NULL;
    ev.n_prompt = j->ev_n_prompt;
    ev.n_cached = j->ev_n_cached;
    ev.n_imported = j->ev_n_imported;
    ev.block_keys = keys;
    ev.n_block_keys = n_keys;
    ev.n_kv_tokens = covered;
    send_event(n, j, &ev);
    tdm_log_debug(MOD, "job %llu (%s): prefill done, %zu of %zu blocks in the store",
                  (unsigned long long)j->id, j->request_id, n_keys, j->n_out);
    free(keys);
}

/* A request event of j, on the network thread (from drain_events). */
static void job_event(node_t *n, job_t *j, const tdm_request_event_t *e)
{
    if (e->finish != TDM_FINISH_NONE) {
        j->ended = true;
        j->in_engine = false;
        if (e->finish != TDM_FINISH_ERROR && e->finish != TDM_FINISH_CANCELLED)
            tdm_metrics_counter_add(n->m.computed,
                                    (double)(e->n_prompt - e->n_cached - e->n_imported));
    }
    if (j->kind == TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL) {
        if (e->token >= 0) {
            j->first_token = e->token;
            j->first_logprob = e->logprob;
            j->n_first_top = e->n_top;
            if (e->n_top > 0)
                memcpy(j->first_top, e->top, (size_t)e->n_top * sizeof(e->top[0]));
        }
        if (e->finish == TDM_FINISH_NONE)
            return;
        j->finish = e->finish;
        if (e->error != NULL)
            snprintf(j->error, sizeof(j->error), "%s", e->error);
        j->ev_n_prompt = e->n_prompt;
        j->ev_n_cached = e->n_cached;
        j->ev_n_imported = e->n_imported;
        if (j->state != J_PUT) { /* nothing in flight: answer now */
            send_prefill_result(n, j);
            j->state = J_DONE;
        }
    } else {
        if (e->token < 0 && e->finish == TDM_FINISH_NONE)
            return;
        Tandem__Cluster__JobEvent ev = TANDEM__CLUSTER__JOB_EVENT__INIT;
        Tandem__Cluster__JobToken tok = TANDEM__CLUSTER__JOB_TOKEN__INIT;
        Tandem__Cluster__JobToken *toks[1] = {&tok};
        Tandem__Cluster__TokenLogprob tl[TDM_MAX_TOP_LOGPROBS], *tp[TDM_MAX_TOP_LOGPROBS];
        if (e->token >= 0) {
            tok.token = e->token;
            tok.logprob = e->logprob;
            fill_top(&tok, e->top, e->n_top, tl, tp);
            ev.tokens = toks;
            ev.n_tokens = 1;
        }
        ev.finish = e->finish;
        ev.error = (char *)e->error;
        ev.n_prompt = e->n_prompt;
        ev.n_cached = e->n_cached;
        ev.n_imported = e->n_imported;
        send_event(n, j, &ev);
        if (e->n_output == 1 || e->finish != TDM_FINISH_NONE)
            job_free_bufs(j); /* kv_import is over after the first event */
        if (e->finish != TDM_FINISH_NONE)
            j->state = J_DONE;
    }
    if (e->finish != TDM_FINISH_NONE)
        tdm_log_debug(MOD, "job %llu (%s): %s, %d prompt (%d cached, %d imported), %d out",
                      (unsigned long long)j->id, j->request_id, tdm_finish_reason_str(e->finish),
                      e->n_prompt, e->n_cached, e->n_imported, e->n_output);
}

/* ------------------------------------------------------- engine thread
 *
 * The engine steps on its own thread (tdm_engine_start), so a long step
 * never delays heartbeats, router messages or store transfers: those stay
 * on the network thread (main), the only one that calls the UCX worker
 * (routers and the store client share it). Job state belongs to the
 * network thread. The engine's callbacks run on the engine thread:
 *   - events are copied into the ring and handled by drain_events, in
 *     order, on the network thread (woken by tdm_net_signal);
 *   - kv_import reads the blocks the network thread fetched before
 *     tdm_engine_add; it leaves them alone until the job's first event;
 *   - kv_export encodes into out_bufs, which the network thread allocated
 *     before tdm_engine_add and reads only once the NEV_EXPORTED item that
 *     follows the last block arrives; it then PUTs them.
 * A job stays alive while it is in the engine (until its final event is
 * drained), so the engine thread never sees a freed job. */

/* Engine thread: queues ev. A full ring makes it wait for the network
 * thread, which never waits for the engine. */
static void nev_push(node_t *n, const nev_t *ev)
{
    pthread_mutex_lock(&n->ev_lock);
    while (n->ev_len == n->ev_cap)
        pthread_cond_wait(&n->ev_space, &n->ev_lock);
    bool was_empty = n->ev_len == 0;
    n->ev_ring[(n->ev_head + n->ev_len) % n->ev_cap] = *ev;
    n->ev_len++;
    pthread_mutex_unlock(&n->ev_lock);
    if (was_empty)
        tdm_net_signal(n->net);
}

/* Engine thread: an event of a request. */
static void on_engine_event(void *user, const tdm_request_event_t *e)
{
    job_t *j = user;
    if (e->token < 0 && e->finish == TDM_FINISH_NONE)
        return; /* text only: the router makes its own text from the tokens */
    nev_t ev = {
        .kind = NEV_EVENT,
        .job = j,
        .token = e->token,
        .logprob = e->logprob,
        .n_top = e->token >= 0 && e->top != NULL ? e->n_top : 0,
        .finish = e->finish,
        .n_prompt = e->n_prompt,
        .n_output = e->n_output,
        .n_cached = e->n_cached,
        .n_imported = e->n_imported,
    };
    if (ev.n_top > TDM_MAX_TOP_LOGPROBS)
        ev.n_top = TDM_MAX_TOP_LOGPROBS;
    if (ev.n_top > 0)
        memcpy(ev.top, e->top, (size_t)ev.n_top * sizeof(e->top[0]));
    if (e->error != NULL)
        snprintf(ev.error, sizeof(ev.error), "%s", e->error);
    nev_push(j->node, &ev);
}

static void exported(node_t *n, job_t *j);

/* Network thread: handles what the engine queued, in order. Returns how
 * many items there were. */
static size_t drain_events(node_t *n)
{
    pthread_mutex_lock(&n->ev_lock);
    size_t head = n->ev_head, len = n->ev_len;
    pthread_mutex_unlock(&n->ev_lock);
    for (size_t i = 0; i < len; i++) {
        const nev_t *ev = &n->ev_ring[(head + i) % n->ev_cap];
        if (ev->kind == NEV_EXPORTED) {
            exported(n, ev->job);
            continue;
        }
        tdm_request_event_t e = {
            .token = ev->token,
            .logprob = ev->logprob,
            .finish = (tdm_finish_reason_t)ev->finish,
            .n_prompt = ev->n_prompt,
            .n_output = ev->n_output,
            .n_cached = ev->n_cached,
            .error = ev->error[0] != '\0' ? ev->error : NULL,
            .n_imported = ev->n_imported,
            .top = ev->n_top > 0 ? ev->top : NULL,
            .n_top = ev->n_top,
        };
        job_event(n, ev->job, &e);
    }
    if (len > 0) {
        pthread_mutex_lock(&n->ev_lock);
        n->ev_head = (head + len) % n->ev_cap;
        n->ev_len -= len;
        pthread_cond_signal(&n->ev_space);
        pthread_mutex_unlock(&n->ev_lock);
    }
    return len;
}

/* kv_import (engine thread): fills a block from the payload that came from
 * the store. */
static tdm_status_t on_kv_import(void *user, int32_t block, int32_t n_tokens, uint16_t *const *k,
                                 uint16_t *const *v)
{
    job_t *j = user;
    node_t *n = j->node;
    if ((size_t)block >= j->n_keys || j->kst[block] != TDM_OK)
        return TDM_ERR_NOT_FOUND;
    int32_t got = 0;
    tdm_status_t st =
        tdm_kv_codec_decode(n->codec_ctx, j->bufs[block], j->lens[block], n_tokens, k, v, &got);
    if (st != TDM_OK)
        tdm_log_warn(MOD, "job %llu: block %d from the store is unusable (%s); recomputing it",
                     (unsigned long long)j->id, block, tdm_status_str(st));
    return st;
}

static void on_put_done(void *user, tdm_status_t status)
{
    job_t *j = user;
    node_t *n = j->node;
    j->kvc_pending--;
    size_t ok = 0;
    for (size_t i = 0; i < j->n_put; i++)
        ok += j->out_st[i] == TDM_OK;
    if (status != TDM_OK || ok < j->n_put)
        tdm_log_warn(MOD,
                     "job %llu: %zu of %zu blocks stored (%s); the decode node recomputes "
                     "the rest",
                     (unsigned long long)j->id, ok, j->n_put, tdm_status_str(status));
    tdm_metrics_counter_add(n->m.put_blocks, (double)ok);
    if (j->ended && j->state == J_PUT) {
        send_prefill_result(n, j);
        j->state = J_DONE;
    } else if (j->state == J_PUT) {
        j->state = J_RUN;
    }
    job_maybe_destroy(n, j);
}

/* kv_export (prefill, engine thread): encodes every prompt block; once the
 * last one is in, the network thread PUTs those the store does not hold
 * yet (exported). */
static tdm_status_t on_kv_export(void *user, int32_t block, int32_t n_tokens, uint16_t *const *k,
                                 uint16_t *const *v)
{
    job_t *j = user;
    node_t *n = j->node;
    size_t n_blocks = (j->n_prompt + (size_t)n->bs - 1) / (size_t)n->bs;
    if ((size_t)block >= n_blocks || j->out_bufs == NULL)
        return TDM_ERR_INVALID;
    if ((size_t)block >= j->put_from) {
        void *buf = malloc(n->block_cap);
        if (buf == NULL)
            return TDM_ERR_NOMEM;
        size_t len = 0;
        tdm_status_t st =
            tdm_kv_codec_encode(n->codec_ctx, n->codec, (const uint16_t *const *)k,
                                (const uint16_t *const *)v, n_tokens, buf, n->block_cap, &len);
        if (st != TDM_OK) {
            free(buf);
            return st;
        }
        j->out_bufs[block] = buf;
        j->out_lens[block] = len;
    }
    if ((size_t)block + 1 == n_blocks && n_blocks > j->put_from && n->kvc != NULL) {
        nev_t ev = {.kind = NEV_EXPORTED, .job = j};
        nev_push(n, &ev);
    }
    return TDM_OK;
}

/* Network thread: every block of j's prompt is encoded; PUT the new ones.
 * The final event comes after this, so the answer waits for the PUT. */
static void exported(node_t *n, job_t *j)
{
    if (j->cancelled)
        return;
    size_t n_blocks = (j->n_prompt + (size_t)n->bs - 1) / (size_t)n->bs;
    j->n_put = n_blocks - j->put_from;
    j->out_st = calloc(j->n_put, sizeof(tdm_status_t));
    if (j->out_st == NULL) {
        tdm_log_warn(MOD, "job %llu: no memory to PUT its blocks; the decode node recomputes them",
                     (unsigned long long)j->id);
        return;
    }
    tdm_status_t st =
        tdm_kvc_put(n->kvc, j->n_put, j->out_keys + j->put_from,
                    (const void *const *)(j->out_bufs + j->put_from), j->out_lens + j->put_from,
                    (uint32_t)n->kv_lease_s * 1000u, j->out_st, on_put_done, j);
    if (st == TDM_OK) {
        j->kvc_pending++;
        j->state = J_PUT;
    } else {
        for (size_t i = 0; i < j->n_put; i++)
            j->out_st[i] = st;
    }
}

static void start_in_engine(node_t *n, job_t *j)
{
    tdm_request_params_t p = j->params;
    p.prompt = j->prompt;
    p.n_prompt = j->n_prompt;
    p.stop_token_ids = j->stop_ids;
    p.n_stop_token_ids = j->n_stop_ids;
    p.cb = on_engine_event;
    p.user = j;
    if (j->n_kv_tokens > 0 && j->n_keys > 0) {
        p.n_kv_tokens = j->n_kv_tokens;
        p.kv_import = on_kv_import;
        p.kv_import_user = j;
    }
    if (j->kind == TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL && j->out_keys != NULL) {
        p.kv_export = on_kv_export;
        p.kv_export_user = j;
    }
    tdm_status_t st = tdm_engine_add(n->eng, &p, &j->eng_id);
    if (st != TDM_OK) {
        end_job(n, j, "the node refused the request (see its log)", false);
        job_maybe_destroy(n, j);
        return;
    }
    j->in_engine = true;
    j->state = J_RUN;
}

static void on_keys_done(void *user, tdm_status_t status)
{
    (void)status; /* a lease that outlives us expires on its own */
    free(user);   /* the key copy */
}

typedef tdm_status_t (*keys_op_fn)(tdm_kvc_t *, size_t, const tdm_hash128_t *, tdm_status_t *,
                                   tdm_kvc_cb_t, void *);

/* Runs a RELEASE or DELETE of n keys on a copy the callback frees. */
static void keys_op(node_t *n, keys_op_fn fn, const tdm_hash128_t *keys, size_t cnt)
{
    if (cnt == 0)
        return;
    tdm_hash128_t *copy = malloc(cnt * sizeof(*copy));
    if (copy == NULL)
        return;
    memcpy(copy, keys, cnt * sizeof(*copy));
    if (fn(n->kvc, cnt, copy, NULL, on_keys_done, copy) != TDM_OK)
        free(copy);
}

/* Decode side: the blocks are here, so their leases end (they stay in the
 * store as cache, evictable); the per-job partial block is deleted. */
static void release_blocks(node_t *n, const job_t *j, size_t n_got)
{
    if (n->kvc == NULL || n_got == 0)
        return;
    bool partial = j->n_kv_tokens % n->bs != 0 && n_got == j->n_keys;
    size_t n_full = partial ? n_got - 1 : n_got;
    keys_op(n, tdm_kvc_release, j->keys, n_full);
    if (partial)
        keys_op(n, tdm_kvc_delete, j->keys + n_full, 1);
}

/* A store operation of j ended. Returns true when j was cancelled meanwhile
 * (then it is finished here and may be gone). */
static bool store_op_ended(node_t *n, job_t *j)
{
    j->kvc_pending--;
    if (!j->cancelled)
        return false;
    j->state = J_DONE;
    job_maybe_destroy(n, j);
    return true;
}

static void on_get_done(void *user, tdm_status_t status)
{
    job_t *j = user;
    node_t *n = j->node;
    if (store_op_ended(n, j))
        return;
    size_t lead = 0;
    while (lead < j->n_keys && j->kst[lead] == TDM_OK)
        lead++;
    int32_t max_kv =
        j->kind == TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL ? (int32_t)j->n_prompt : j->n_kv_tokens;
    int32_t kv = (int32_t)lead * n->bs;
    j->n_kv_tokens = kv < max_kv ? kv : max_kv;
    if (lead < j->n_keys)
        tdm_log_info(MOD,
                     "job %llu: %zu of %zu blocks came from the store (%s); recomputing "
                     "the rest",
                     (unsigned long long)j->id, lead, j->n_keys, tdm_status_str(status));
    tdm_metrics_counter_add(n->m.imported, (double)j->n_kv_tokens);
    if (j->kind == TANDEM__CLUSTER__JOB_KIND__JOB_DECODE)
        release_blocks(n, j, lead);
    start_in_engine(n, j);
}

/* GETs keys[0 .. n_keys) into fresh buffers, then starts the job. */
static void fetch_blocks(node_t *n, job_t *j)
{
    j->bufs = calloc(j->n_keys, sizeof(void *));
    j->caps = calloc(j->n_keys, sizeof(size_t));
    j->lens = calloc(j->n_keys, sizeof(size_t));
    j->kst = calloc(j->n_keys, sizeof(tdm_status_t));
    bool ok = j->bufs != NULL && j->caps != NULL && j->lens != NULL && j->kst != NULL;
    for (size_t i = 0; ok && i < j->n_keys; i++) {
        j->bufs[i] = malloc(n->block_cap);
        j->caps[i] = n->block_cap;
        ok = j->bufs[i] != NULL;
    }
    if (ok && tdm_kvc_get(n->kvc, j->n_keys, j->keys, j->bufs, j->caps, j->lens, j->kst,
                          on_get_done, j) == TDM_OK) {
        j->kvc_pending++;
        j->state = J_FETCH;
        return;
    }
    job_free_bufs(j);
    j->n_kv_tokens = 0;
    start_in_engine(n, j);
}

static void on_lookup_done(void *user, tdm_status_t status)
{
    job_t *j = user;
    node_t *n = j->node;
    if (store_op_ended(n, j))
        return;
    if (status != TDM_OK) {
        tdm_log_info(MOD, "job %llu: the store LOOKUP failed (%s); computing the whole prompt",
                     (unsigned long long)j->id, tdm_status_str(status));
        j->n_leading = 0;
    }
    tdm_log_debug(MOD, "job %llu: the store holds %zu leading blocks", (unsigned long long)j->id,
                  j->n_leading);
    tdm_metrics_counter_add(n->m.store_hit, (double)j->n_leading * n->bs);
    j->put_from = j->n_leading;
    if (j->n_leading == 0) {
        start_in_engine(n, j);
        return;
    }
    j->n_keys = j->n_leading;
    j->keys = malloc(j->n_keys * sizeof(tdm_hash128_t));
    if (j->keys == NULL) {
        j->n_keys = 0;
        j->put_from = 0;
        start_in_engine(n, j);
        return;
    }
    memcpy(j->keys, j->out_keys, j->n_keys * sizeof(tdm_hash128_t));
    fetch_blocks(n, j);
}

/* Prefill: the keys of every prompt block (full ones chained, the partial
 * one per job), then LOOKUP. */
static void start_prefill(node_t *n, job_t *j)
{
    size_t n_blocks = (j->n_prompt + (size_t)n->bs - 1) / (size_t)n->bs;
    j->n_out = n_blocks;
    j->out_keys = calloc(n_blocks, sizeof(tdm_hash128_t));
    j->out_bufs = calloc(n_blocks, sizeof(void *));
    j->out_lens = calloc(n_blocks, sizeof(size_t));
    if (j->out_keys == NULL || j->out_bufs == NULL || j->out_lens == NULL || n->kvc == NULL) {
        job_free_out(j);
        start_in_engine(n, j);
        return;
    }
    size_t n_full = tdm_engine_block_keys(n->eng, j->prompt, j->n_prompt, j->out_keys);
    for (size_t i = 0; i < n_full; i++)
        j->out_keys[i] = tdm_cluster_store_key(j->out_keys[i], n->codec_name);
    if (n_full < n_blocks) {
        uint64_t seed[3] = {n->nonce, j->id, (uint64_t)j->n_prompt};
        j->out_keys[n_full] = tdm_hash128(seed, sizeof(seed), 0x7061727469616cull);
    }
    if (n_full == 0) {
        start_in_engine(n, j);
        return;
    }
    if (tdm_kvc_lookup(n->kvc, n_full, j->out_keys, &j->n_leading, on_lookup_done, j) == TDM_OK) {
        j->kvc_pending++;
        j->state = J_LOOKUP;
        return;
    }
    start_in_engine(n, j);
}

static void on_job(node_t *n, rconn_t *rc, const Tandem__Cluster__Job *m)
{
    if (n->draining) { /* sent before the router saw our heartbeat; it re-sends it */
        tdm_log_info(MOD, "job %llu refused: draining", (unsigned long long)m->id);
        job_t tmp = {.node = n, .rc = rc, .id = m->id};
        end_job(n, &tmp, "the node is draining", true);
        return;
    }
    if (m->n_prompt == 0 || m->sampling == NULL || n->n_jobs >= MAX_JOBS ||
        (m->kind != TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL &&
         m->kind != TANDEM__CLUSTER__JOB_KIND__JOB_DECODE) ||
        m->n_kv_tokens < 0 || (size_t)m->n_kv_tokens > m->n_prompt || m->n_prior_output < 0) {
        job_t tmp = {.node = n, .rc = rc, .id = m->id};
        end_job(n, &tmp, "malformed job", false);
        return;
    }
    job_t *j = calloc(1, sizeof(*j));
    if (j == NULL)
        return;
    j->node = n;
    j->rc = rc;
    j->id = m->id;
    j->kind = m->kind;
    j->first_token = -1;
    snprintf(j->request_id, sizeof(j->request_id), "%s", m->request_id ? m->request_id : "");
    j->prompt = malloc(m->n_prompt * sizeof(int32_t));
    j->stop_ids = m->n_stop_token_ids ? malloc(m->n_stop_token_ids * sizeof(int32_t)) : NULL;
    if (j->prompt == NULL || (m->n_stop_token_ids && j->stop_ids == NULL)) {
        free(j->prompt);
        free(j->stop_ids);
        free(j);
        return;
    }
    memcpy(j->prompt, m->prompt, m->n_prompt * sizeof(int32_t));
    j->n_prompt = m->n_prompt;
    if (m->n_stop_token_ids)
        memcpy(j->stop_ids, m->stop_token_ids, m->n_stop_token_ids * sizeof(int32_t));
    j->n_stop_ids = m->n_stop_token_ids;
    tdm_request_params_t *p = &j->params;
    const Tandem__Cluster__Sampling *s = m->sampling;
    p->sampling = (tdm_sampling_params_t){
        .temperature = s->temperature,
        .top_k = s->top_k,
        .top_p = s->top_p,
        .min_p = s->min_p,
        .repetition_penalty = s->repetition_penalty,
        .frequency_penalty = s->frequency_penalty,
        .presence_penalty = s->presence_penalty,
        .has_seed = s->has_seed,
        .seed = s->seed,
    };
    p->max_tokens = m->kind == TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL ? 1 : m->max_tokens;
    p->ignore_eos = m->ignore_eos;
    p->logprobs = m->logprobs;
    p->top_logprobs = m->top_logprobs;
    p->n_prior_output = m->n_prior_output;
    j->next = n->jobs;
    n->jobs = j;
    n->n_jobs++;
    tdm_metrics_counter_inc(n->m.jobs);
    tdm_log_debug(MOD, "job %llu (%s): %s, %zu prompt tokens, %zu keys", (unsigned long long)j->id,
                  j->request_id,
                  j->kind == TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL ? "prefill" : "decode",
                  j->n_prompt, m->n_block_keys);
    if (j->kind == TANDEM__CLUSTER__JOB_KIND__JOB_PREFILL) {
        start_prefill(n, j);
        return;
    }
    if (m->n_block_keys > 0 && m->n_kv_tokens > 0 && n->kvc != NULL) {
        j->n_keys = m->n_block_keys;
        j->keys = malloc(j->n_keys * sizeof(tdm_hash128_t));
        bool ok = j->keys != NULL;
        for (size_t i = 0; ok && i < j->n_keys; i++)
            ok = tdm_cluster_key_from(&m->block_keys[i], &j->keys[i]);
        if (ok) {
            j->n_kv_tokens = m->n_kv_tokens;
            fetch_blocks(n, j);
            return;
        }
        free(j->keys);
        j->keys = NULL;
        j->n_keys = 0;
    }
    start_in_engine(n, j);
}

static void cancel_job(node_t *n, job_t *j)
{
    if (j->cancelled)
        return;
    j->cancelled = true;
    if (j->in_engine)
        tdm_engine_cancel(n->eng, j->eng_id);
    else if (j->kvc_pending == 0)
        j->state = J_DONE;
}

static void on_cancel(node_t *n, rconn_t *rc, uint64_t id)
{
    for (job_t *j = n->jobs; j != NULL; j = j->next) {
        if (j->rc == rc && j->id == id) {
            cancel_job(n, j);
            job_maybe_destroy(n, j);
            return;
        }
    }
}

/* ------------------------------------------------------------- routers */

static void send_hello(node_t *n, rconn_t *rc)
{
    tdm_engine_stats_t st;
    tdm_engine_get_stats(n->eng, &st);
    tdm_hash128_t fp = tdm_model_fingerprint(n->model);
    Tandem__Cluster__Hello h = TANDEM__CLUSTER__HELLO__INIT;
    h.version = TDM_CLUSTER_VERSION;
    h.role = n->role;
    h.name = (char *)n->name;
    h.model = (char *)n->served_name;
    h.fingerprint = tdm_cluster_key_bytes(&fp);
    h.pool = (char *)n->pool;
    h.max_model_len = tdm_engine_max_model_len(n->eng);
    h.block_size = n->bs;
    h.total_blocks = st.num_blocks;
    h.metrics_address = n->metrics_addr;
    h.kv_codec = (char *)n->codec_name;
    Tandem__Cluster__ClusterMsg msg = TANDEM__CLUSTER__CLUSTER_MSG__INIT;
    msg.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_HELLO;
    msg.hello = &h;
    if (tdm_cluster_send(rc->conn, &msg) == TDM_OK)
        rc->state = RC_HELLO;
}

static void on_router_error(void *user, tdm_conn_t *conn, tdm_status_t why)
{
    (void)conn;
    rconn_t *rc = user;
    if (!rc->failed)
        tdm_log_warn(MOD, "lost the router at %s (%s); its jobs are dropped, reconnecting",
                     rc->addr, tdm_status_str(why));
    rc->failed = true;
}

/* Closes a router connection and drops its jobs (the router re-sends them
 * elsewhere when it notices). */
static void router_down(node_t *n, rconn_t *rc)
{
    for (job_t *j = n->jobs, *next; j != NULL; j = next) {
        next = j->next;
        if (j->rc == rc) {
            cancel_job(n, j);
            j->rc = NULL;
            job_maybe_destroy(n, j);
        }
    }
    if (rc->conn != NULL)
        tdm_conn_close(rc->conn, true);
    rc->conn = NULL;
    rc->state = RC_DOWN;
    rc->failed = false;
    rc->next_try_ms = tdm_net_now_ms() + rc->backoff_ms;
    rc->backoff_ms = rc->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : rc->backoff_ms * 2;
}

static void on_message(void *user, const tdm_net_msg_t *msg)
{
    node_t *n = user;
    rconn_t *rc = tdm_conn_owner(msg->conn);
    if (rc == NULL || rc->node != n)
        return;
    rc->last_heard_ms = tdm_net_now_ms();
    char why[160];
    Tandem__Cluster__ClusterMsg *m = tdm_cluster_decode(msg, why, sizeof(why));
    if (m == NULL) {
        tdm_log_warn(MOD, "bad message from the router at %s: %s; closing", rc->addr, why);
        rc->failed = true;
        return;
    }
    switch (m->body_case) {
    case TANDEM__CLUSTER__CLUSTER_MSG__BODY_WELCOME:
        if (m->welcome->ok) {
            rc->state = RC_READY;
            rc->backoff_ms = BACKOFF_MIN_MS;
            /* the router answers every heartbeat; silent past its own
             * node timeout (and a second), it has forgotten this node */
            rc->quiet_ms =
                (m->welcome->node_timeout_ms > 0 ? m->welcome->node_timeout_ms : 3000) + 1000;
            tdm_log_info(MOD, "registered with the router at %s as %s %s (pool %s)", rc->addr,
                         n->role_name, n->name, n->pool);
        } else {
            tdm_log_error(MOD, "the router at %s refused this node: %s", rc->addr,
                          m->welcome->error ? m->welcome->error : "no reason given");
            rc->failed = true;
            rc->backoff_ms = BACKOFF_MAX_MS;
        }
        break;
    case TANDEM__CLUSTER__CLUSTER_MSG__BODY_JOB:
        if (rc->state == RC_READY)
            on_job(n, rc, m->job);
        break;
    case TANDEM__CLUSTER__CLUSTER_MSG__BODY_CANCEL: on_cancel(n, rc, m->cancel->id); break;
    case TANDEM__CLUSTER__CLUSTER_MSG__BODY_HEARTBEAT: break; /* the answer: it is there */
    default:
        tdm_log_warn(MOD, "unexpected message %d from the router at %s; ignored", m->body_case,
                     rc->addr);
        break;
    }
    tdm_cluster_free(m);
}

static void send_heartbeat(node_t *n)
{
    tdm_engine_stats_t st;
    tdm_engine_get_stats(n->eng, &st);
    int64_t queued = 0;
    int32_t fetching = 0; /* jobs waiting for the store before the engine sees them */
    for (job_t *j = n->jobs; j != NULL; j = j->next) {
        if (j->state != J_DONE && !j->ended)
            queued += (int64_t)j->n_prompt;
        fetching += j->state == J_LOOKUP || j->state == J_FETCH;
    }
    Tandem__Cluster__Heartbeat hb = TANDEM__CLUSTER__HEARTBEAT__INIT;
    hb.queued_tokens = queued;
    hb.running = st.num_running;
    hb.waiting = st.num_waiting + fetching;
    hb.free_blocks = st.num_free_blocks;
    hb.total_blocks = st.num_blocks;
    hb.draining = n->draining;
    Tandem__Cluster__ClusterMsg msg = TANDEM__CLUSTER__CLUSTER_MSG__INIT;
    msg.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_HEARTBEAT;
    msg.heartbeat = &hb;
    for (size_t i = 0; i < n->n_routers; i++)
        if (rc_usable(&n->routers[i]))
            (void)tdm_cluster_send(n->routers[i].conn, &msg);
}

static void maintain_routers(node_t *n, int64_t now)
{
    for (size_t i = 0; i < n->n_routers; i++) {
        rconn_t *rc = &n->routers[i];
        if (!rc->failed && (rc->state == RC_HELLO || rc->state == RC_READY) &&
            now - rc->last_heard_ms > rc->quiet_ms) {
            tdm_log_warn(MOD,
                         "the router at %s has said nothing for %lld ms (%s); taking it as "
                         "lost, reconnecting",
                         rc->addr, (long long)(now - rc->last_heard_ms),
                         rc->state == RC_HELLO ? "no answer to Hello"
                                               : "no answer to the heartbeats");
            rc->failed = true;
        }
        if (rc->failed)
            router_down(n, rc);
        if (rc->state == RC_DOWN && now >= rc->next_try_ms && !n->draining) {
            if (tdm_net_connect(n->net, rc->host, rc->port, &rc->conn) != TDM_OK) {
                rc->conn = NULL;
                rc->next_try_ms = now + rc->backoff_ms;
                continue;
            }
            tdm_conn_set_owner(rc->conn, rc, on_router_error);
            rc->last_heard_ms = now;
            rc->quiet_ms = TDM_CLUSTER_HELLO_MS;
            send_hello(n, rc);
            if (rc->state != RC_HELLO)
                rc->failed = true;
        }
    }
    int registered = 0;
    for (size_t i = 0; i < n->n_routers; i++)
        registered += n->routers[i].state == RC_READY;
    atomic_store(&n->n_registered, registered);
    if (now >= n->next_beat_ms) {
        send_heartbeat(n);
        n->next_beat_ms = now + TDM_CLUSTER_HEARTBEAT_MS;
    }
}

/* ------------------------------------------------------------- metrics */

static void update_metrics(node_t *n)
{
    tdm_engine_stats_t st;
    tdm_engine_get_stats(n->eng, &st);
    tdm_metrics_counter_add(n->m.prompt, (double)(st.prompt_tokens - n->last.prompt_tokens));
    tdm_metrics_counter_add(n->m.gen, (double)(st.generation_tokens - n->last.generation_tokens));
    tdm_metrics_counter_add(n->m.pq, (double)(st.prefix_queries - n->last.prefix_queries));
    tdm_metrics_counter_add(n->m.ph, (double)(st.prefix_hits - n->last.prefix_hits));
    tdm_metrics_counter_add(n->m.preempt, (double)(st.preemptions - n->last.preemptions));
    tdm_metrics_gauge_set(n->m.running, st.num_running);
    tdm_metrics_gauge_set(n->m.waiting, st.num_waiting);
    double used = st.num_blocks > 0 ? 1.0 - (double)st.num_free_blocks / st.num_blocks : 0.0;
    tdm_metrics_gauge_set(n->m.usage, used);
    tdm_metrics_gauge_set(n->m.budget, st.step_token_budget);
    n->last = st;
}

static tdm_status_t setup_metrics(node_t *n)
{
    tdm_status_t st = tdm_metrics_registry_create(&n->reg);
    if (st != TDM_OK)
        return st;
    struct {
        const char *name, *help;
        tdm_metrics_counter_t **c;
    } counters[] = {
        {"vllm:prompt_tokens_total", "Prompt tokens processed (computed or from a cache).",
         &n->m.prompt},
        {"vllm:generation_tokens_total", "Tokens generated.", &n->m.gen},
        {"vllm:prefix_cache_queries_total", "Prompt tokens looked up in the local prefix cache.",
         &n->m.pq},
        {"vllm:prefix_cache_hits_total", "Prompt tokens found in the local prefix cache.",
         &n->m.ph},
        {"vllm:num_preemptions_total", "Requests preempted (recomputed later).", &n->m.preempt},
        {"tandem_node_kv_imported_tokens_total",
         "Prompt tokens whose KV came from the KV store instead of being computed.",
         &n->m.imported},
        {"tandem_node_kv_store_hit_tokens_total",
         "Prompt tokens the KV store already held when a prefill looked them up.", &n->m.store_hit},
        {"tandem_node_kv_put_blocks_total", "KV blocks put to the store.", &n->m.put_blocks},
        {"tandem_node_jobs_total", "Jobs received from routers.", &n->m.jobs},
        {"tandem_node_prompt_tokens_computed_total",
         "Prompt tokens computed here (not from the prefix cache or the KV store).",
         &n->m.computed},
    };
    for (size_t i = 0; i < sizeof(counters) / sizeof(counters[0]); i++)
        if ((st = tdm_metrics_counter_register(n->reg, counters[i].name, counters[i].help,
                                               counters[i].c)) != TDM_OK)
            return st;
    if ((st = tdm_metrics_gauge_register(n->reg, "vllm:num_requests_running",
                                         "Requests in the running batch.", &n->m.running)) !=
            TDM_OK ||
        (st = tdm_metrics_gauge_register(n->reg, "vllm:num_requests_waiting",
                                         "Requests waiting for a place in the batch.",
                                         &n->m.waiting)) != TDM_OK ||
        (st = tdm_metrics_gauge_register(n->reg, "vllm:kv_cache_usage_perc",
                                         "Fraction of KV cache blocks in use (0..1).",
                                         &n->m.usage)) != TDM_OK ||
        (st = tdm_metrics_gauge_register(
             n->reg, "tandem_node_step_token_budget",
             "Tokens the next engine step may hold: --max-num-batched-tokens, or fewer prompt "
             "tokens under --max-step-ms.",
             &n->m.budget)) != TDM_OK)
        return st;
    return TDM_OK;
}

static bool node_ready(void *arg, char *reason, size_t cap)
{
    node_t *n = arg;
    if (atomic_load(&n->draining)) {
        snprintf(reason, cap, "draining");
        return false;
    }
    if (atomic_load(&n->n_registered) > 0)
        return true;
    snprintf(reason, cap, "not registered with a router");
    return false;
}

/* POST /drain: what SIGTERM does, asked over HTTP (`tandem drain`, a
 * spot-interruption watcher, a preStop hook). With a cluster token the
 * caller must present it as a bearer token. */
static void on_drain_request(void *arg, const tdm_http_request_t *req, tdm_http_reply_t *reply)
{
    node_t *n = arg;
    char text[256];
    if (n->token != NULL &&
        !tdm_bearer_matches(tdm_http_request_header(req, "Authorization"), n->token)) {
        reply->status = 401;
        snprintf(text, sizeof(text),
                 "unauthorized: send Authorization: Bearer <cluster token> (tandem drain reads "
                 "TANDEM_CLUSTER_TOKEN)\n");
    } else {
        bool again = atomic_exchange(&n->drain_asked, true);
        if (!again)
            tdm_log_info(MOD, "drain asked over HTTP");
        reply->status = 202;
        snprintf(text, sizeof(text), "%s: %s %s finishes what it holds within %d s, then exits\n",
                 again ? "already draining" : "draining", n->role_name, n->name,
                 n->drain_timeout_s);
    }
    reply->body = strdup(text);
    reply->body_len = reply->body != NULL ? strlen(text) : 0;
}

/* At the drain deadline: every job that has not ended goes back to its
 * router, which re-sends it elsewhere with the tokens so far. */
static void hand_off_jobs(node_t *n)
{
    char why[200];
    snprintf(why, sizeof(why), "%s %s drained before the job ended (--drain-timeout %d s)",
             n->role_name, n->name, n->drain_timeout_s);
    size_t handed = 0;
    for (job_t *j = n->jobs; j != NULL; j = j->next) {
        if (j->state == J_DONE || j->cancelled)
            continue;
        end_job(n, j, why, true);
        handed++;
    }
    if (handed > 0)
        tdm_log_warn(MOD, "drain timeout: handed %zu unfinished job(s) back to the router(s)",
                     handed);
}

/* ---------------------------------------------------------------- main */

/* Splits "a,b,c" items of a repeatable flag into out (up to max). */
static size_t split_list(const tdm_flag_list_t *l, char *storage, size_t cap, const char **out,
                         size_t max)
{
    size_t n = 0, used = 0;
    for (size_t i = 0; i < l->n; i++) {
        const char *s = l->items[i];
        while (*s != '\0' && n < max) {
            const char *e = strchr(s, ',');
            size_t len = e ? (size_t)(e - s) : strlen(s);
            if (len > 0 && used + len + 1 <= cap) {
                memcpy(storage + used, s, len);
                storage[used + len] = '\0';
                out[n++] = storage + used;
                used += len + 1;
            }
            s += len + (e ? 1 : 0);
        }
    }
    return n;
}

int tdm_node_main(int argc, char **argv, Tandem__Cluster__Role role)
{
    static node_t node;
    node_t *n = &node;
    n->role = role;
    n->role_name = role == TANDEM__CLUSTER__ROLE__ROLE_PREFILL ? "prefill" : "decode";
    const char *prog =
        role == TANDEM__CLUSTER__ROLE__ROLE_PREFILL ? "tandem-prefill" : "tandem-decode";
    tdm_engine_config_t ec;
    tdm_engine_config_default(&ec);
    ec.max_step_ms = 500;
    const char *model = NULL, *log_level = NULL, *metrics_host = "0.0.0.0";
    int metrics_port = role == TANDEM__CLUSTER__ROLE__ROLE_PREFILL ? 7600 : 7700;
    int kv_replicas = 1, drain_timeout = 90;
    uint64_t kv_cache_memory = 0;
    bool no_prefix_caching = false;
    tdm_flag_list_t routers = {0}, stores = {0};
    char hostname[64] = "node";
    (void)gethostname(hostname, sizeof(hostname));
    char default_name[96];
    snprintf(default_name, sizeof(default_name), "%s-%s-%d", n->role_name, hostname, (int)getpid());
    n->name = default_name;
    n->served_name = NULL;
    n->pool = "default";
    n->token = NULL;
    n->codec_name = "f16";
    n->kv_lease_s = 60;
    tdm_flag_t flags[] = {
        {"model", 'm', TDM_FLAG_TYPE_STR, &model, "GGUF model file", NULL},
        {"served-model-name", 0, TDM_FLAG_TYPE_STR, &n->served_name,
         "the model's name in the API (default: the GGUF's general.name)", NULL},
        {"router", 'r', TDM_FLAG_TYPE_LIST, &routers,
         "HOST:PORT of a router's --listen (repeat or comma-separate for several)", NULL},
        {"kvstore", 0, TDM_FLAG_TYPE_LIST, &stores,
         "HOST:PORT of a tandem-kvstore (repeat or comma-separate); none: no KV transfer", NULL},
        {"kv-replicas", 0, TDM_FLAG_TYPE_INT, &kv_replicas, "stores each block is written to",
         NULL},
        {"kv-codec", 0, TDM_FLAG_TYPE_STR, &n->codec_name,
         "KV block codec on the wire: f16 (lossless), q8, f16+lz4, q8+lz4", NULL},
        {"kv-lease", 0, TDM_FLAG_TYPE_INT, &n->kv_lease_s,
         "seconds the store keeps a prefill's blocks pinned", NULL},
        {"cluster-token", 0, TDM_FLAG_TYPE_STR, &n->token,
         "shared secret of the cluster (prefer the TANDEM_CLUSTER_TOKEN variable)", NULL},
        {"name", 0, TDM_FLAG_TYPE_STR, &n->name, "this node's name in logs and the router", NULL},
        {"pool", 0, TDM_FLAG_TYPE_STR, &n->pool,
         "the pool (tier) this node serves; requests pick it by x-model-tier", NULL},
        {"metrics-host", 0, TDM_FLAG_TYPE_STR, &metrics_host,
         "address of the HTTP /metrics, /health, /ready server", NULL},
        {"metrics-port", 0, TDM_FLAG_TYPE_INT, &metrics_port, "its port", NULL},
        {"threads", 't', TDM_FLAG_TYPE_INT, &ec.threads, "CPU threads (0: all available)", NULL},
        {"max-num-seqs", 0, TDM_FLAG_TYPE_INT, &ec.max_num_seqs, "sequences per step", NULL},
        {"max-num-batched-tokens", 0, TDM_FLAG_TYPE_INT, &ec.max_num_batched_tokens,
         "tokens per step (chunked prefill)", NULL},
        {"max-step-ms", 0, TDM_FLAG_TYPE_INT, &ec.max_step_ms,
         "target wall time of one engine step: prompt chunks are sized from measured step "
         "times to stay near it, under --max-num-batched-tokens (0: no bound)",
         NULL},
        {"max-model-len", 0, TDM_FLAG_TYPE_INT, &ec.max_model_len,
         "prompt + output tokens (0: the model's, at most 8192)", NULL},
        {"kv-cache-memory", 0, TDM_FLAG_TYPE_SIZE, &kv_cache_memory,
         "bytes of the KV cache (0: 1 GiB on the CPU, what --gpu-memory-utilization leaves on "
         "a GPU)",
         NULL},
        {"device", 0, TDM_FLAG_TYPE_STR, &ec.device, "cpu, cuda or cuda:N", NULL},
        {"gpu-memory-utilization", 0, TDM_FLAG_TYPE_FLOAT, &ec.gpu_memory_utilization,
         "fraction of the GPU's memory for weights, buffers and KV cache", NULL},
        {"no-enable-prefix-caching", 0, TDM_FLAG_TYPE_BOOL, &no_prefix_caching,
         "turn the local prefix cache off", NULL},
        {"drain-timeout", 0, TDM_FLAG_TYPE_INT, &drain_timeout,
         "seconds to finish held requests after SIGTERM", NULL},
        {"log-level", 0, TDM_FLAG_TYPE_STR, &log_level, "error, warn, info or debug", NULL},
    };
    size_t n_flags = sizeof(flags) / sizeof(flags[0]);
    bool help = false;
    char err[256];
    size_t n_pos = 0;
    if (tdm_flags_parse(flags, n_flags, argc - 1, argv + 1, NULL, 0, &n_pos, &help, err,
                        sizeof(err)) != TDM_OK) {
        fprintf(stderr, "%s: %s (see --help)\n", prog, err);
        return 2;
    }
    if (help) {
        printf("usage: %s --model GGUF --router HOST:PORT [--kvstore HOST:PORT] [flags]\n\n"
               "A %s node of a tandem cluster. Flags may also be set as TANDEM_<NAME>\n"
               "variables (TANDEM_CLUSTER_TOKEN for the token).\n\n",
               prog, n->role_name);
        tdm_flags_usage(stdout, flags, n_flags);
        printf("\n%s", TDM_NET_HELP_ENV);
        return 0;
    }
    if (!tdm_log_set_level_name(log_level)) {
        fprintf(stderr, "%s: unknown --log-level %s\n", prog, log_level);
        return 2;
    }
    if (n->token == NULL)
        n->token = getenv("TANDEM_CLUSTER_TOKEN");
    if (model == NULL || routers.n == 0 || n->token == NULL || n->token[0] == '\0') {
        fprintf(stderr,
                "%s: --model, --router and a cluster token (--cluster-token or "
                "TANDEM_CLUSTER_TOKEN) are required (see --help)\n",
                prog);
        return 2;
    }
    if (tdm_kv_codec_parse(n->codec_name, &n->codec) != TDM_OK || kv_replicas < 1 ||
        kv_replicas > 2 || n->kv_lease_s < 1 || metrics_port < 0 || metrics_port > 65535 ||
        drain_timeout < 0) {
        fprintf(stderr,
                "%s: bad --kv-codec, --kv-replicas (1 or 2), --kv-lease, "
                "--metrics-port or --drain-timeout (see --help)\n",
                prog);
        return 2;
    }
    n->drain_timeout_s = drain_timeout;
    static char router_storage[2048], store_storage[2048];
    const char *router_addrs[MAX_ROUTERS], *store_addrs[TDM_KVC_MAX_STORES];
    n->n_routers =
        split_list(&routers, router_storage, sizeof(router_storage), router_addrs, MAX_ROUTERS);
    size_t n_stores =
        split_list(&stores, store_storage, sizeof(store_storage), store_addrs, TDM_KVC_MAX_STORES);
    for (size_t i = 0; i < n->n_routers; i++) {
        rconn_t *rc = &n->routers[i];
        rc->node = n;
        snprintf(rc->addr, sizeof(rc->addr), "%s", router_addrs[i]);
        if (tdm_net_parse_addr(router_addrs[i], rc->host, sizeof(rc->host), &rc->port) != TDM_OK) {
            fprintf(stderr, "%s: --router %s is not HOST:PORT\n", prog, router_addrs[i]);
            return 2;
        }
        rc->backoff_ms = BACKOFF_MIN_MS;
    }
    ec.model_path = model;
    ec.kv_cache_bytes = kv_cache_memory;
    ec.enable_prefix_caching = !no_prefix_caching;
    tdm_log_info(MOD, "%s %s starting: model %s, routers %zu, stores %zu, codec %s, pool %s",
                 n->role_name, n->name, model, n->n_routers, n_stores, n->codec_name, n->pool);
    if (tdm_engine_create(&ec, err, sizeof(err), &n->eng) != TDM_OK) {
        tdm_log_error(MOD, "cannot load the model: %s", err);
        return 1;
    }
    n->model = tdm_engine_model(n->eng);
    if (n->served_name == NULL)
        n->served_name = tdm_model_name(n->model);
    n->bs = tdm_engine_block_size(n->eng);
    tdm_engine_kv_layout(n->eng, &n->layout);
    n->block_cap = tdm_kv_codec_max_size(&n->layout, n->codec);
    if (tdm_kv_codec_ctx_create(&n->layout, &n->codec_ctx) != TDM_OK ||
        getrandom(&n->nonce, sizeof(n->nonce), 0) != (ssize_t)sizeof(n->nonce)) {
        tdm_log_error(MOD, "cannot set up the KV codec");
        return 1;
    }
    n->ev_cap = 2 * (size_t)ec.max_num_seqs + 16; /* a step's events fit twice */
    n->ev_ring = calloc(n->ev_cap, sizeof(nev_t));
    if (n->ev_ring == NULL) {
        tdm_log_error(MOD, "no memory for the engine's event queue");
        return 1;
    }
    pthread_mutex_init(&n->ev_lock, NULL);
    pthread_cond_init(&n->ev_space, NULL);
    /* the handshake proves the token; UCX stays on the device toward the router */
    tdm_net_config_t nc = {.name = n->name, .token = n->token, .local_addr = n->routers[0].host};
    if (tdm_net_create(&nc, &n->net) != TDM_OK) {
        tdm_log_error(MOD, "cannot start UCX (see the UCX messages above)");
        return 1;
    }
    if (tdm_net_set_handler(n->net, TDM_CLUSTER_AM_ID, on_message, n) != TDM_OK)
        return 1;
    if (n_stores > 0) {
        tdm_kvc_config_t kc = {
            .stores = store_addrs,
            .n_stores = n_stores,
            .replicas = kv_replicas,
            .token = n->token,
            .deadline_ms = KV_DEADLINE_MS,
            .name = n->name,
            .net = n->net,
        };
        if (tdm_kvc_create(&kc, &n->kvc) != TDM_OK) {
            tdm_log_error(MOD, "cannot set up the KV store client");
            return 1;
        }
    }
    if (setup_metrics(n) != TDM_OK)
        return 1;
    snprintf(n->metrics_addr, sizeof(n->metrics_addr), "%s:%d",
             strcmp(metrics_host, "0.0.0.0") == 0 ? hostname : metrics_host, metrics_port);
    if (metrics_port > 0) {
        tdm_http_config_t hc = {.host = metrics_host,
                                .port = metrics_port,
                                .registry = n->reg,
                                .ready = node_ready,
                                .ready_arg = n,
                                .port_flag = "--metrics-port",
                                .name = n->role_name};
        if (tdm_http_server_create(&hc, &n->http) != TDM_OK ||
            tdm_http_server_route_post(n->http, "/drain", on_drain_request, n) != TDM_OK ||
            tdm_http_server_start(n->http) != TDM_OK) {
            tdm_log_error(MOD, "cannot serve /metrics on %s:%d (see above)", metrics_host,
                          metrics_port);
            return 1;
        }
    }
    const tdm_model_hparams_t *hp = tdm_model_hparams(n->model);
    tdm_engine_stats_t st0;
    tdm_engine_get_stats(n->eng, &st0);
    tdm_log_info(MOD,
                 "%s %s ready to register: model '%s' (%d layers), %d KV blocks of %d tokens "
                 "(%.0f MiB), max model len %d, block payload <= %zu bytes",
                 n->role_name, n->name, n->served_name, hp->n_layer, st0.num_blocks, n->bs,
                 (double)st0.num_blocks * n->bs * hp->n_head_kv * hp->head_dim * 4.0 * hp->n_layer /
                     (1 << 20),
                 tdm_engine_max_model_len(n->eng), n->block_cap);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (tdm_engine_start(n->eng) != TDM_OK)
        return 1; /* logged */
    int64_t drain_deadline = 0, next_metrics = 0;
    for (;;) {
        int64_t now = tdm_net_now_ms();
        if ((g_term || atomic_load(&n->drain_asked)) && !n->draining) {
            n->draining = true;
            drain_deadline = now + (int64_t)drain_timeout * 1000;
            tdm_log_info(MOD, "%s: draining (no new jobs; %zu held; up to %d s)",
                         g_term ? "SIGTERM" : "drain asked", n->n_jobs, drain_timeout);
            send_heartbeat(n);
        }
        if (n->draining && (n->n_jobs == 0 || now >= drain_deadline))
            break;
        if (n->kvc != NULL)
            tdm_kvc_progress(n->kvc);
        else
            tdm_net_progress(n->net);
        maintain_routers(n, now);
        bool did = drain_events(n) > 0;
        for (job_t *j = n->jobs, *next; j != NULL; j = next) {
            next = j->next;
            job_maybe_destroy(n, j);
        }
        if (now >= next_metrics) {
            update_metrics(n);
            next_metrics = now + 100;
        }
        if (!did) {
            if (n->kvc != NULL)
                tdm_kvc_wait(n->kvc, 20);
            else
                tdm_net_wait(n->net, 20);
        }
    }
    tdm_log_info(MOD, "%s %s stopping (%zu jobs left)", n->role_name, n->name, n->n_jobs);
    hand_off_jobs(n);
    for (job_t *j = n->jobs; j != NULL; j = j->next)
        cancel_job(n, j);
    /* The engine ends what it holds (cancelled) at its next step; its final
     * events are drained here, then the engine thread has nothing to say. */
    for (;;) {
        size_t in_engine = 0;
        for (job_t *j = n->jobs; j != NULL; j = j->next)
            in_engine += j->in_engine;
        if (in_engine == 0)
            break;
        if (n->kvc != NULL)
            tdm_kvc_progress(n->kvc);
        else
            tdm_net_progress(n->net);
        if (drain_events(n) == 0) {
            if (n->kvc != NULL)
                tdm_kvc_wait(n->kvc, 20);
            else
                tdm_net_wait(n->net, 20);
        }
    }
    tdm_engine_stop(n->eng);
    if (n->http != NULL)
        tdm_http_server_destroy(n->http);
    if (n->kvc != NULL)
        tdm_kvc_destroy(n->kvc);
    tdm_engine_destroy(n->eng); /* holds no request: no event comes */
    while (n->jobs != NULL)
        job_destroy(n, n->jobs);
    for (size_t i = 0; i < n->n_routers; i++)
        if (n->routers[i].conn != NULL)
            tdm_conn_close(n->routers[i].conn, true);
    tdm_net_destroy(n->net);
    tdm_kv_codec_ctx_destroy(n->codec_ctx);
    tdm_metrics_registry_destroy(n->reg);
    free(n->ev_ring);
    pthread_mutex_destroy(&n->ev_lock);
    pthread_cond_destroy(&n->ev_space);
    return 0;
}
