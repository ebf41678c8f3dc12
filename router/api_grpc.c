/* tandem-router: the gRPC API (see api_grpc.h and proto/generation.proto).
 *
 * One thread (grpc_thread) owns the completion queue and every call's
 * state except the handoff queue. Tags are tag_t's embedded in the slot or
 * call they belong to:
 *   slot.tag       a grpc_server_request_(registered_)call came back: a new
 *                  call (one slot per registered method, one generic slot
 *                  that answers unknown methods with UNIMPLEMENTED);
 *   call.tag_close RECV_CLOSE_ON_SERVER, armed as soon as the call arrives:
 *                  it reports a client's cancel or a lost connection;
 *   call.tag_send  the one send batch in flight (a stream sends one message
 *                  at a time, coalescing the events that queued meanwhile);
 *   call.tag_wake  an empty batch started by the core's thread after it
 *                  queued an event: gRPC posts its tag at once, which wakes
 *                  grpc_completion_queue_next.
 * Every grpc_call_start_batch of a call runs under the call's mutex (gRPC
 * wants batches of one call serialized), and so does the handoff queue.
 * A call is freed when its close came back, no batch is outstanding and
 * the core gave its final event (after which the core never touches the
 * call again). The thread also checks deadlines every TICK_MS: a passed
 * deadline cancels the core request and the call (DEADLINE_EXCEEDED). */
#include "api_grpc.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "prompt.h"
#include "tandem/log.h"
#include "tandem/net.h"
#include "tandem/proto/generation.pb-c.h"
#include "tandem/secret.h"

#define MOD "grpc"

#define TICK_MS           20    /* deadline checks, lost-wakeup safety net */
#define STOP_WAIT_MS      10000 /* rt_grpc_stop: most time for the core's final events */
#define REQUEST_ID_MAX    128   /* bytes of a client's request id */
#define DEFAULT_PORT      8001
#define DEFAULT_MAX_BYTES ((size_t)4 << 20)
#define MAX_MODELS        64 /* ListModels */

typedef enum method {
    METHOD_GENERATE = 0,
    METHOD_STREAM,
    METHOD_MODELS,
    METHOD_HEALTH,
    METHOD_UNKNOWN, /* the generic slot */
    METHOD_COUNT,
} method_t;

static const char *const method_path[METHOD_UNKNOWN] = {
    "/tandem.v1.Generation/Generate",
    "/tandem.v1.Generation/GenerateStream",
    "/tandem.v1.Generation/ListModels",
    "/tandem.v1.Generation/Health",
};

typedef enum tag_kind {
    TAG_SLOT,
    TAG_CLOSE,
    TAG_SEND,
    TAG_WAKE,
    TAG_SHUTDOWN,
} tag_kind_t;

typedef struct tag {
    tag_kind_t kind;
    void *owner; /* slot_t, gcall_t or rt_grpc_t */
} tag_t;

/* A core event, copied on the core's thread (one allocation: the struct,
 * then the ids, the token infos and the text). */
typedef struct gev {
    struct gev *next;
    const char *text;
    size_t text_len;
    const int32_t *ids;
    const rt_token_info_t *info; /* NULL unless the request asked for logprobs */
    size_t n_tokens;
    tdm_finish_reason_t finish;
    int http_status;
    const char *error;
    int32_t n_prompt, n_output, n_cached;
} gev_t;

/* Text, ids and token infos gathered for one message. */
typedef struct acc {
    char *text;
    size_t len, cap;
    int32_t *ids;
    rt_token_info_t *info; /* with logprobs only */
    size_t n, ncap;
} acc_t;

typedef struct gcall {
    rt_grpc_t *srv;
    struct gcall *prev, *next; /* srv->calls */
    grpc_call *call;
    method_t method;
    tag_t tag_close, tag_send, tag_wake;
    int cancelled;       /* RECV_CLOSE_ON_SERVER's answer */
    int64_t deadline_ms; /* tdm_net_now_ms() clock; 0: none */
    char request_id[REQUEST_ID_MAX + 1];
    char *tier; /* NULL: none */
    bool want_logprobs;

    /* grpc thread only */
    bool closed;  /* tag_close came back */
    bool sending; /* tag_send outstanding */
    bool md_sent; /* initial metadata went out */
    bool status_sent;
    bool id_sent;        /* a message carried the request id */
    bool submitted;      /* the core accepted the request */
    bool final_seen;     /* the final event was consumed */
    bool core_cancelled; /* rt_core_cancel was called */
    bool deadline_hit;
    uint64_t core_id;
    acc_t acc;
    grpc_byte_buffer *send_bb;
    grpc_slice status_details;
    bool have_details;
    bool retry_after;          /* a 429: the status carries retry_md */
    grpc_metadata retry_md[2]; /* static slices: valid while the call lives */

    /* under mu */
    pthread_mutex_t mu;
    int n_ops; /* batches whose tag has not come back */
    gev_t *evq_head, *evq_tail;
    bool wake_armed;
    bool final_queued; /* the core delivered its final event */
    bool oom;          /* an event could not be copied */
    gev_t oom_final;   /* stands in for a final event that could not be copied */
} gcall_t;

typedef struct slot {
    tag_t tag;
    rt_grpc_t *srv;
    method_t method;
    bool armed;
    grpc_call *call;
    grpc_call_details details; /* generic slot */
    gpr_timespec deadline;     /* registered slots */
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
} slot_t;

struct rt_grpc {
    rt_core_t *core;
    grpc_server *server;
    grpc_completion_queue *cq;
    void *registered[METHOD_UNKNOWN];
    slot_t slots[METHOD_COUNT];
    int n_armed;
    tag_t tag_shutdown;
    bool shutdown_started, shutdown_done;
    pthread_t thread;
    bool thread_started;
    atomic_bool stopping;
    bool leaked;
    int port;
    char *api_key;
    gcall_t *calls;
    size_t n_calls;
    atomic_uint_fast64_t next_request_id;
};

/* ---- small helpers ---------------------------------------------------- */

static bool acc_reserve(acc_t *a, size_t add_len, size_t add_n, bool with_info)
{
    if (a->len + add_len + 1 > a->cap) {
        size_t cap = a->cap ? a->cap : 256;
        while (cap < a->len + add_len + 1)
            cap *= 2;
        char *t = realloc(a->text, cap);
        if (t == NULL)
            return false;
        a->text = t;
        a->cap = cap;
    }
    if (a->n + add_n > a->ncap) {
        size_t cap = a->ncap ? a->ncap : 64;
        while (cap < a->n + add_n)
            cap *= 2;
        int32_t *ids = realloc(a->ids, cap * sizeof(*ids));
        if (ids == NULL)
            return false;
        a->ids = ids;
        if (with_info) {
            rt_token_info_t *info = realloc(a->info, cap * sizeof(*info));
            if (info == NULL)
                return false;
            a->info = info;
        }
        a->ncap = cap;
    }
    return true;
}

static bool acc_add(acc_t *a, const gev_t *e, bool with_info)
{
    if (!acc_reserve(a, e->text_len, e->n_tokens, with_info))
        return false;
    memcpy(a->text + a->len, e->text, e->text_len);
    a->len += e->text_len;
    a->text[a->len] = '\0';
    if (e->n_tokens > 0) {
        memcpy(a->ids + a->n, e->ids, e->n_tokens * sizeof(int32_t));
        if (with_info && e->info != NULL)
            memcpy(a->info + a->n, e->info, e->n_tokens * sizeof(rt_token_info_t));
        else if (with_info)
            memset(a->info + a->n, 0, e->n_tokens * sizeof(rt_token_info_t));
        a->n += e->n_tokens;
    }
    return true;
}

static void acc_free(acc_t *a)
{
    free(a->text);
    free(a->ids);
    free(a->info);
    memset(a, 0, sizeof(*a));
}

/* The gRPC status for the HTTP status of a core error event. */
static grpc_status_code status_of_http(int http)
{
    switch (http) {
    case 400:
    case 422: return GRPC_STATUS_INVALID_ARGUMENT;
    case 401: return GRPC_STATUS_UNAUTHENTICATED;
    case 403: return GRPC_STATUS_PERMISSION_DENIED;
    case 404: return GRPC_STATUS_NOT_FOUND;
    case 408:
    case 504: return GRPC_STATUS_DEADLINE_EXCEEDED;
    case 413:
    case 429: return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case 499: return GRPC_STATUS_CANCELLED;
    case 502:
    case 503: return GRPC_STATUS_UNAVAILABLE;
    default: return GRPC_STATUS_INTERNAL;
    }
}

static bool slice_eq(grpc_slice s, const char *str)
{
    return grpc_slice_str_cmp(s, str) == 0;
}

/* The value of metadata key (lowercase), copied into out; false if absent. */
static bool md_get(const grpc_metadata_array *md, const char *key, char *out, size_t cap)
{
    for (size_t i = 0; i < md->count; i++) {
        if (!slice_eq(md->metadata[i].key, key))
            continue;
        size_t n = GRPC_SLICE_LENGTH(md->metadata[i].value);
        if (n >= cap)
            n = cap - 1;
        memcpy(out, GRPC_SLICE_START_PTR(md->metadata[i].value), n);
        out[n] = '\0';
        return true;
    }
    return false;
}

/* Compares the authorization metadata with "Bearer KEY" in time that does
 * not depend on where they differ. */
static bool auth_ok(const rt_grpc_t *s, const grpc_metadata_array *md)
{
    if (s->api_key == NULL)
        return true;
    for (size_t i = 0; i < md->count; i++) {
        if (!slice_eq(md->metadata[i].key, "authorization"))
            continue;
        const char *v = (const char *)GRPC_SLICE_START_PTR(md->metadata[i].value);
        size_t n = GRPC_SLICE_LENGTH(md->metadata[i].value);
        if (n < 7 || strncasecmp(v, "Bearer ", 7) != 0)
            return false;
        return tdm_secret_equal(s->api_key, v + 7, n - 7);
    }
    return false;
}

/* The deadline on the tdm_net_now_ms clock; 0: none (or over a year). */
static int64_t deadline_to_ms(gpr_timespec deadline)
{
    if (gpr_time_cmp(deadline, gpr_inf_future(deadline.clock_type)) == 0)
        return 0;
    gpr_timespec left = gpr_time_sub(deadline, gpr_now(deadline.clock_type));
    if (left.tv_sec > (int64_t)366 * 24 * 3600)
        return 0;
    int64_t ms = (int64_t)left.tv_sec * 1000 + left.tv_nsec / 1000000;
    return tdm_net_now_ms() + (ms > 0 ? ms : 0);
}

/* ---- sending ------------------------------------------------------------ */

/* Starts ops on the call under its lock; counts the batch. false (logged)
 * when gRPC refused the batch: a bug in this file; the call is cancelled
 * so that its close still comes back. */
static bool call_batch(gcall_t *c, const grpc_op *ops, size_t n, tag_t *tag)
{
    pthread_mutex_lock(&c->mu);
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);
    if (e == GRPC_CALL_OK)
        c->n_ops++;
    pthread_mutex_unlock(&c->mu);
    if (e != GRPC_CALL_OK) {
        tdm_log_error(MOD,
                      "request %s: grpc_call_start_batch refused %zu ops: %s (a bug in "
                      "api_grpc.c; the call is cancelled)",
                      c->request_id, n, grpc_call_error_to_string(e));
        grpc_call_cancel_with_status(c->call, GRPC_STATUS_INTERNAL, "internal error", NULL);
        return false;
    }
    return true;
}

/* Writes v as a protobuf varint; returns the bytes written (at most 10). */
static size_t put_varint(uint8_t *out, uint64_t v)
{
    size_t n = 0;
    do {
        uint8_t b = v & 0x7F;
        v >>= 7;
        out[n++] = (uint8_t)(b | (v ? 0x80 : 0));
    } while (v);
    return n;
}

/* Sends (in one batch) the initial metadata if not sent yet, msg if not
 * NULL, and the status if with_status. text (len bytes) is appended to msg
 * as its field 1 (GenerateResponse.text): protobuf-c packs strings up to
 * their first NUL, and generated text may hold U+0000; fields may come in
 * any order on the wire. */
static void call_send(gcall_t *c, const ProtobufCMessage *msg, const char *text, size_t text_len,
                      bool with_status, grpc_status_code code, const char *details)
{
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    if (c->sending || c->status_sent) {
        tdm_log_error(MOD, "request %s: a send while another is in flight (a bug in api_grpc.c)",
                      c->request_id);
        return;
    }
    if (!c->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].data.send_initial_metadata.count = 0;
        n++;
    }
    if (msg != NULL) {
        size_t size = protobuf_c_message_get_packed_size(msg);
        uint8_t head[11];
        size_t nh = 0;
        if (text_len > 0) {
            head[0] = (1 << 3) | 2; /* field 1, length-delimited */
            nh = 1 + put_varint(head + 1, text_len);
        }
        grpc_slice sl = grpc_slice_malloc(size + nh + text_len);
        uint8_t *out = GRPC_SLICE_START_PTR(sl);
        protobuf_c_message_pack(msg, out);
        if (nh > 0) {
            memcpy(out + size, head, nh);
            memcpy(out + size + nh, text, text_len);
        }
        c->send_bb = grpc_raw_byte_buffer_create(&sl, 1);
        grpc_slice_unref(sl);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->send_bb;
        n++;
    }
    if (with_status) {
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.trailing_metadata_count = 0;
        if (c->retry_after) {
            ops[n].data.send_status_from_server.trailing_metadata = c->retry_md;
            ops[n].data.send_status_from_server.trailing_metadata_count = 2;
        }
        ops[n].data.send_status_from_server.status = code;
        if (details != NULL && code != GRPC_STATUS_OK) {
            c->status_details = grpc_slice_from_copied_string(details);
            c->have_details = true;
            ops[n].data.send_status_from_server.status_details = &c->status_details;
        }
        n++;
    }
    if (n == 0)
        return;
    if (call_batch(c, ops, n, &c->tag_send)) {
        c->sending = true;
        c->md_sent = true;
        if (with_status)
            c->status_sent = true;
    } else {
        if (c->send_bb != NULL)
            grpc_byte_buffer_destroy(c->send_bb);
        c->send_bb = NULL;
        if (c->have_details)
            grpc_slice_unref(c->status_details);
        c->have_details = false;
    }
}

/* Answers with a status only (an error, or OK without a message). */
static void call_fail(gcall_t *c, grpc_status_code code, const char *details)
{
    if (code == GRPC_STATUS_INTERNAL)
        tdm_log_error(MOD, "request %s (%s): %s", c->request_id,
                      c->method < METHOD_UNKNOWN ? method_path[c->method] : "unknown method",
                      details);
    else
        tdm_log_debug(MOD, "request %s: status %d: %s", c->request_id, (int)code, details);
    call_send(c, NULL, NULL, 0, true, code, details);
}

/* Answers RESOURCE_EXHAUSTED (a queue limit) with when to retry in the
 * trailing metadata: "retry-after" (seconds, as HTTP's header) and
 * "grpc-retry-pushback-ms" (what gRPC's retry policy reads). */
static void call_fail_retry(gcall_t *c, const char *details)
{
#define RETRY_STR_(x) #x
#define RETRY_STR(x)  RETRY_STR_(x)
    c->retry_md[0].key = grpc_slice_from_static_string("retry-after");
    c->retry_md[0].value = grpc_slice_from_static_string(RETRY_STR(RT_RETRY_AFTER_S));
    c->retry_md[1].key = grpc_slice_from_static_string("grpc-retry-pushback-ms");
    c->retry_md[1].value = grpc_slice_from_static_string(RETRY_STR(RT_RETRY_AFTER_S) "000");
#undef RETRY_STR
#undef RETRY_STR_
    c->retry_after = true;
    call_fail(c, GRPC_STATUS_RESOURCE_EXHAUSTED, details);
}

/* Who sent the call, for the core's per-client queue limit
 * (rt_params.client): the API key it presented where keys are checked,
 * else its IP address (the peer "ipv4:1.2.3.4:5678", "ipv6:[::1]:5678" or
 * "ipv6:%5B::1%5D:5678" without the port). */
static void call_client(const gcall_t *c, const grpc_metadata_array *md, char *out, size_t cap)
{
    out[0] = '\0';
    if (c->srv->api_key != NULL) {
        if (md_get(md, "authorization", out, cap) && strlen(out) > 7)
            memmove(out, out + 7, strlen(out + 7) + 1); /* past "Bearer " (checked) */
        else
            out[0] = '\0';
        return;
    }
    char *peer = grpc_call_get_peer(c->call);
    if (peer == NULL)
        return;
    const char *a = peer;
    const char *colon = strchr(a, ':');
    if (colon != NULL && (strncmp(a, "ipv4:", 5) == 0 || strncmp(a, "ipv6:", 5) == 0)) {
        a = colon + 1;
        size_t n;
        if (a[0] == '[') {
            a++;
            n = strcspn(a, "]");
        } else if (strncmp(a, "%5B", 3) == 0) { /* newer gRPC percent-encodes the brackets */
            a += 3;
            const char *end = strstr(a, "%5D");
            n = end != NULL ? (size_t)(end - a) : strlen(a);
        } else {
            const char *port = strrchr(a, ':');
            n = port != NULL ? (size_t)(port - a) : strlen(a);
        }
        snprintf(out, cap, "%.*s", (int)n, a);
    } else {
        snprintf(out, cap, "%s", a);
    }
    gpr_free(peer);
}

/* Builds and sends a GenerateResponse from text, ids and infos; final (NULL
 * for a stream chunk) adds finish_reason and usage and the OK status. With
 * fail_code != OK, the message (a stream's last text) goes with that
 * status instead. */
static void send_generate(gcall_t *c, const acc_t *a, const gev_t *final,
                          grpc_status_code fail_code, const char *fail_details)
{
    Tandem__V1__GenerateResponse r = TANDEM__V1__GENERATE_RESPONSE__INIT;
    Tandem__V1__Usage usage = TANDEM__V1__USAGE__INIT;
    Tandem__V1__TokenLogprob *lp = NULL, **lpp = NULL;
    Tandem__V1__TopLogprob *top = NULL, **topp = NULL;
    /* r.text stays empty: call_send appends the text, NULs included */
    r.n_token_ids = a->n;
    r.token_ids = a->ids;
    if (c->want_logprobs && a->n > 0 && a->info != NULL) {
        size_t n_top = 0;
        for (size_t i = 0; i < a->n; i++)
            n_top += (size_t)(a->info[i].n_top > 0 ? a->info[i].n_top : 0);
        lp = calloc(a->n, sizeof(*lp));
        lpp = calloc(a->n, sizeof(*lpp));
        top = calloc(n_top > 0 ? n_top : 1, sizeof(*top));
        topp = calloc(n_top > 0 ? n_top : 1, sizeof(*topp));
        if (lp == NULL || lpp == NULL || top == NULL || topp == NULL) {
            free(lp);
            free(lpp);
            free(top);
            free(topp);
            call_fail(c, GRPC_STATUS_INTERNAL, "out of memory building the logprobs");
            return;
        }
        size_t k = 0;
        for (size_t i = 0; i < a->n; i++) {
            const rt_token_info_t *ti = &a->info[i];
            tandem__v1__token_logprob__init(&lp[i]);
            lp[i].token = ti->token;
            lp[i].logprob = ti->logprob;
            int32_t nt = ti->n_top < 0 ? 0 : ti->n_top;
            if (nt > RT_MAX_TOP_LOGPROBS)
                nt = RT_MAX_TOP_LOGPROBS;
            lp[i].n_top_logprobs = (size_t)nt;
            lp[i].top_logprobs = &topp[k];
            for (int32_t j = 0; j < nt; j++, k++) {
                tandem__v1__top_logprob__init(&top[k]);
                top[k].token = ti->top[j].token;
                top[k].logprob = ti->top[j].logprob;
                topp[k] = &top[k];
            }
            lpp[i] = &lp[i];
        }
        r.n_logprobs = a->n;
        r.logprobs = lpp;
    }
    if (!c->id_sent || final != NULL || fail_code != GRPC_STATUS_OK)
        r.request_id = c->request_id; /* on the first and the last message */
    c->id_sent = true;
    if (final != NULL && fail_code == GRPC_STATUS_OK) {
        r.finish_reason = (char *)tdm_finish_reason_str(final->finish);
        usage.prompt_tokens = final->n_prompt;
        usage.completion_tokens = final->n_output;
        usage.cached_tokens = final->n_cached;
        r.usage = &usage;
    }
    if (fail_code != GRPC_STATUS_OK)
        tdm_log_debug(MOD, "request %s: status %d: %s", c->request_id, (int)fail_code,
                      fail_details);
    call_send(c, &r.base, a->text, a->len, final != NULL || fail_code != GRPC_STATUS_OK, fail_code,
              fail_details);
    free(lp);
    free(lpp);
    free(top);
    free(topp);
}

/* ---- the core's side ---------------------------------------------------- */

static gev_t *gev_copy(const rt_event_t *ev, bool with_info)
{
    size_t n = ev->n_tokens, tl = ev->text != NULL ? ev->text_len : 0;
    size_t el = ev->error != NULL ? strlen(ev->error) : 0;
    size_t size = sizeof(gev_t) + n * sizeof(int32_t);
    size_t info_at = (size + _Alignof(rt_token_info_t) - 1) & ~(_Alignof(rt_token_info_t) - 1);
    size = info_at + (with_info ? n * sizeof(rt_token_info_t) : 0);
    size_t text_at = size;
    size += tl + 1 + el + 1;
    char *mem = malloc(size);
    if (mem == NULL)
        return NULL;
    gev_t *e = (gev_t *)mem;
    memset(e, 0, sizeof(*e));
    int32_t *ids = (int32_t *)(mem + sizeof(gev_t));
    for (size_t i = 0; i < n; i++)
        ids[i] = ev->tokens[i].token;
    e->ids = ids;
    if (with_info && n > 0) {
        memcpy(mem + info_at, ev->tokens, n * sizeof(rt_token_info_t));
        e->info = (const rt_token_info_t *)(mem + info_at);
    }
    char *text = mem + text_at;
    if (tl > 0)
        memcpy(text, ev->text, tl);
    text[tl] = '\0';
    e->text = text;
    e->text_len = tl;
    char *err = text + tl + 1;
    if (el > 0)
        memcpy(err, ev->error, el);
    err[el] = '\0';
    e->error = ev->error != NULL ? err : NULL;
    e->n_tokens = n;
    e->finish = ev->finish;
    e->http_status = ev->http_status;
    e->n_prompt = ev->n_prompt;
    e->n_output = ev->n_output;
    e->n_cached = ev->n_cached;
    return e;
}

/* The core's callback (core thread): queue a copy, wake the grpc thread.
 * After the final event is queued (under mu) nothing here touches c. */
static void on_core_event(void *user, const rt_event_t *ev)
{
    gcall_t *c = user;
    gev_t *e = gev_copy(ev, c->want_logprobs);
    pthread_mutex_lock(&c->mu);
    if (e == NULL && ev->finish != TDM_FINISH_NONE) {
        e = &c->oom_final;
        memset(e, 0, sizeof(*e));
        e->text = "";
        e->finish = TDM_FINISH_ERROR;
        e->http_status = 500;
        e->error = "out of memory in the router";
    }
    if (e == NULL) {
        c->oom = true;
    } else {
        if (c->evq_tail != NULL)
            c->evq_tail->next = e;
        else
            c->evq_head = e;
        c->evq_tail = e;
    }
    if (!c->wake_armed) {
        if (grpc_call_start_batch(c->call, NULL, 0, &c->tag_wake, NULL) == GRPC_CALL_OK) {
            c->wake_armed = true;
            c->n_ops++;
        }
        /* else: the grpc thread's tick finds the queue (TICK_MS later) */
    }
    if (ev->finish != TDM_FINISH_NONE)
        c->final_queued = true;
    pthread_mutex_unlock(&c->mu);
}

static void gev_free(gcall_t *c, gev_t *e)
{
    if (e != &c->oom_final)
        free(e);
}

static void core_cancel(gcall_t *c)
{
    if (c->submitted && !c->final_seen && !c->core_cancelled) {
        c->core_cancelled = true;
        rt_core_cancel(c->srv->core, c->core_id);
    }
}

/* Turns the queued events into messages (grpc thread). */
static void call_pump(gcall_t *c)
{
    if (!c->submitted || c->final_seen)
        return;
    if (c->sending && !c->closed)
        return; /* one send at a time; the send's completion pumps again */
    pthread_mutex_lock(&c->mu);
    gev_t *list = c->evq_head;
    bool oom = c->oom;
    c->evq_head = c->evq_tail = NULL;
    pthread_mutex_unlock(&c->mu);
    if (list == NULL && !oom)
        return;

    const gev_t *final = NULL;
    bool failed = oom;
    if (c->method == METHOD_STREAM) {
        c->acc.len = 0;
        c->acc.n = 0;
    }
    for (gev_t *e = list; e != NULL; e = e->next) {
        if (e->finish != TDM_FINISH_NONE)
            final = e; /* its text and tokens count too */
        if (!c->closed && !failed && !acc_add(&c->acc, e, c->want_logprobs))
            failed = true;
    }
    if (final != NULL)
        c->final_seen = true;

    if (c->closed || c->status_sent) {
        /* nobody to tell: just consume */
    } else if (failed) {
        core_cancel(c);
        call_fail(c, GRPC_STATUS_INTERNAL, "out of memory in the router");
    } else if (final != NULL && final->finish == TDM_FINISH_ERROR) {
        grpc_status_code code = status_of_http(final->http_status);
        const char *why =
            final->error != NULL && final->error[0] ? final->error : "the request failed";
        if (c->method == METHOD_STREAM && (c->acc.len > 0 || c->acc.n > 0)) {
            if (code == GRPC_STATUS_INTERNAL)
                tdm_log_error(MOD, "request %s: %s", c->request_id, why);
            send_generate(c, &c->acc, NULL, code, why); /* the text so far */
        } else {
            call_fail(c, code, why);
        }
    } else if (final != NULL && final->finish == TDM_FINISH_CANCELLED) {
        if (c->deadline_hit)
            call_fail(c, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline exceeded");
        else if (atomic_load(&c->srv->stopping))
            call_fail(c, GRPC_STATUS_UNAVAILABLE, "the router is shutting down");
        else
            call_fail(c, GRPC_STATUS_CANCELLED, "the request was cancelled");
    } else if (final != NULL) {
        send_generate(c, &c->acc, final, GRPC_STATUS_OK, NULL);
    } else if (c->method == METHOD_STREAM && (c->acc.len > 0 || c->acc.n > 0)) {
        send_generate(c, &c->acc, NULL, GRPC_STATUS_OK, NULL);
    }
    while (list != NULL) {
        gev_t *next = list->next;
        gev_free(c, list);
        list = next;
    }
}

/* ---- calls ------------------------------------------------------------- */

static void call_maybe_free(gcall_t *c)
{
    pthread_mutex_lock(&c->mu);
    bool done = c->closed && c->n_ops == 0 && (!c->submitted || c->final_queued);
    pthread_mutex_unlock(&c->mu);
    if (!done)
        return;
    rt_grpc_t *s = c->srv;
    for (gev_t *e = c->evq_head; e != NULL;) {
        gev_t *next = e->next;
        gev_free(c, e);
        e = next;
    }
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        s->calls = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    s->n_calls--;
    if (c->send_bb != NULL)
        grpc_byte_buffer_destroy(c->send_bb);
    if (c->have_details)
        grpc_slice_unref(c->status_details);
    grpc_call_unref(c->call);
    acc_free(&c->acc);
    free(c->tier);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Reads a varint at *p (< end); false when truncated or too long. */
static bool get_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return true;
        }
    }
    return false;
}

/* protobuf-c gives strings as char * that end at their first NUL, so a
 * string field holding U+0000 would be cut short without a word. This
 * walks the serialized GenerateRequest (buf, len: already unpacked, so
 * well formed) and names the first string field holding a NUL byte. */
static bool find_nul_field(const uint8_t *p, const uint8_t *end, bool in_message, char *field,
                           size_t cap)
{
    size_t index[32] = {0};
    while (p < end) {
        uint64_t key, v = 0;
        if (!get_varint(&p, end, &key))
            return false;
        uint32_t num = (uint32_t)(key >> 3);
        switch (key & 7) {
        case 0:
            if (!get_varint(&p, end, &v))
                return false;
            break;
        case 1: p += 8; break;
        case 5: p += 4; break;
        case 2: {
            if (!get_varint(&p, end, &v) || v > (uint64_t)(end - p))
                return false;
            size_t i = num < 32 ? index[num]++ : 0;
            if (in_message && (num == 1 || num == 2) && memchr(p, 0, v) != NULL) {
                snprintf(field, cap, "%s", num == 1 ? "role" : "content");
                return true;
            }
            if (!in_message && num == 4) {
                char sub[16];
                if (find_nul_field(p, p + v, true, sub, sizeof(sub))) {
                    snprintf(field, cap, "messages[%zu].%s", i, sub);
                    return true;
                }
            }
            static const char *const names[20] = {
                [1] = "model", [2] = "prompt", [10] = "stop", [18] = "tier", [19] = "request_id"};
            if (!in_message && num < 20 && names[num] != NULL && memchr(p, 0, v) != NULL) {
                if (num == 10)
                    snprintf(field, cap, "stop[%zu]", i);
                else
                    snprintf(field, cap, "%s", names[num]);
                return true;
            }
            p += v;
            break;
        }
        default: return false;
        }
    }
    return false;
}

/* Reads the request message of a registered call into a protobuf-c
 * message; NULL (and the call answered) when absent or malformed. */
static ProtobufCMessage *call_read(gcall_t *c, grpc_byte_buffer *payload,
                                   const ProtobufCMessageDescriptor *desc)
{
    if (payload == NULL) {
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, "the request message is missing");
        return NULL;
    }
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, payload)) {
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, "the request message cannot be read");
        return NULL;
    }
    grpc_slice all = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    const uint8_t *data = GRPC_SLICE_START_PTR(all);
    size_t len = GRPC_SLICE_LENGTH(all);
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, len, data);
    char field[48];
    if (m == NULL) {
        char err[160];
        snprintf(err, sizeof(err), "the request is not a valid %s message", desc->name);
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, err);
    } else if (desc == &tandem__v1__generate_request__descriptor &&
               find_nul_field(data, data + len, false, field, sizeof(field))) {
        char err[160];
        snprintf(err, sizeof(err), "%s holds U+0000, which is not accepted", field);
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, err);
        protobuf_c_message_free_unpacked(m, NULL);
        m = NULL;
    }
    grpc_slice_unref(all);
    return m;
}

static void handle_models(gcall_t *c)
{
    const rt_model_info_t *infos[MAX_MODELS];
    size_t n = rt_core_models(c->srv->core, infos, MAX_MODELS);
    if (n > MAX_MODELS)
        n = MAX_MODELS;
    Tandem__V1__ModelInfo mi[MAX_MODELS];
    Tandem__V1__ModelInfo *mp[MAX_MODELS];
    for (size_t i = 0; i < n; i++) {
        tandem__v1__model_info__init(&mi[i]);
        mi[i].name = (char *)infos[i]->name;
        mi[i].max_model_len = infos[i]->max_model_len;
        mi[i].created = infos[i]->created;
        mp[i] = &mi[i];
    }
    Tandem__V1__ListModelsResponse r = TANDEM__V1__LIST_MODELS_RESPONSE__INIT;
    r.n_models = n;
    r.models = mp;
    call_send(c, &r.base, NULL, 0, true, GRPC_STATUS_OK, NULL);
}

static void handle_health(gcall_t *c)
{
    char reason[256] = "";
    bool ready = rt_core_ready(c->srv->core, reason, sizeof(reason));
    Tandem__V1__HealthResponse r = TANDEM__V1__HEALTH_RESPONSE__INIT;
    r.status = ready ? TANDEM__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING
                     : TANDEM__V1__HEALTH_RESPONSE__SERVING_STATUS__NOT_SERVING;
    size_t bad;
    if (!ready && rt_utf8_valid(reason, strlen(reason), &bad))
        r.reason = reason;
    call_send(c, &r.base, NULL, 0, true, GRPC_STATUS_OK, NULL);
}

static bool check_utf8(const char *field, const char *s, char *err, size_t err_len)
{
    size_t bad;
    if (rt_utf8_valid(s, strlen(s), &bad))
        return true;
    snprintf(err, err_len, "%s is not valid UTF-8 (at byte %zu)", field, bad);
    return false;
}

static bool check_finite(const char *field, float v, char *err, size_t err_len)
{
    if (isfinite(v))
        return true;
    snprintf(err, err_len, "%s must be a finite number", field);
    return false;
}

/* Checks the request and builds the prompt and parameters; on failure
 * writes the message and returns the status code for the client. */
static grpc_status_code build_params(gcall_t *c, const Tandem__V1__GenerateRequest *q,
                                     const rt_model_info_t **model_out, int32_t **prompt_out,
                                     size_t *n_prompt_out, rt_params_t *p, char *err,
                                     size_t err_len)
{
    if (!check_utf8("model", q->model, err, err_len))
        return GRPC_STATUS_INVALID_ARGUMENT;
    const rt_model_info_t *m = rt_core_model(c->srv->core, q->model);
    if (m == NULL) {
        snprintf(err, err_len, "model \"%.100s\" is not served here (ListModels names the models)",
                 q->model);
        return GRPC_STATUS_NOT_FOUND;
    }
    if (!check_utf8("tier", q->tier, err, err_len) ||
        !check_utf8("request_id", q->request_id, err, err_len))
        return GRPC_STATUS_INVALID_ARGUMENT;
    int n_inputs = (q->prompt[0] != '\0') + (q->n_prompt_token_ids > 0) + (q->n_messages > 0);
    if (n_inputs == 0) {
        snprintf(err, err_len,
                 "the request has no input: set one of prompt, prompt_token_ids "
                 "or messages");
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    if (n_inputs > 1) {
        snprintf(err, err_len, "set only one of prompt, prompt_token_ids and messages");
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    if (q->max_tokens < 0) {
        snprintf(err, err_len,
                 "max_tokens must be > 0 (or 0 for up to the model's length), "
                 "not %d",
                 (int)q->max_tokens);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    if (q->top_k < 0) {
        snprintf(err, err_len, "top_k must be >= 0 (0: off), not %d", (int)q->top_k);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    if (q->top_logprobs < 0 || q->top_logprobs > RT_MAX_TOP_LOGPROBS) {
        snprintf(err, err_len, "top_logprobs must be in 0..%d, not %d", RT_MAX_TOP_LOGPROBS,
                 (int)q->top_logprobs);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    if (q->n_stop > RT_MAX_STOP) {
        snprintf(err, err_len, "at most %d stop strings, not %zu", RT_MAX_STOP, q->n_stop);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    for (size_t i = 0; i < q->n_stop; i++) {
        char field[32];
        snprintf(field, sizeof(field), "stop[%zu]", i);
        if (q->stop[i][0] == '\0') {
            snprintf(err, err_len, "%s is empty", field);
            return GRPC_STATUS_INVALID_ARGUMENT;
        }
        if (!check_utf8(field, q->stop[i], err, err_len))
            return GRPC_STATUS_INVALID_ARGUMENT;
    }
    int32_t n_vocab = tdm_tokenizer_n_vocab(m->tok);
    for (size_t i = 0; i < q->n_stop_token_ids; i++) {
        if (q->stop_token_ids[i] < 0 || q->stop_token_ids[i] >= n_vocab) {
            snprintf(err, err_len, "stop_token_ids[%zu] = %d is outside the vocabulary (0..%d)", i,
                     (int)q->stop_token_ids[i], (int)n_vocab - 1);
            return GRPC_STATUS_INVALID_ARGUMENT;
        }
    }

    tdm_sampling_params_t *sp = &p->sampling;
    tdm_sampling_params_default(sp);
    if (q->temperature_opt_case == TANDEM__V1__GENERATE_REQUEST__TEMPERATURE_OPT_TEMPERATURE)
        sp->temperature = q->temperature;
    if (q->top_p_opt_case == TANDEM__V1__GENERATE_REQUEST__TOP_P_OPT_TOP_P)
        sp->top_p = q->top_p;
    if (q->repetition_penalty_opt_case ==
        TANDEM__V1__GENERATE_REQUEST__REPETITION_PENALTY_OPT_REPETITION_PENALTY)
        sp->repetition_penalty = q->repetition_penalty;
    if (q->seed_opt_case == TANDEM__V1__GENERATE_REQUEST__SEED_OPT_SEED) {
        /* the HTTP API's range: its negative seeds are refused, and these
         * are what they would wrap to */
        if (q->seed > (uint64_t)INT64_MAX) {
            snprintf(err, err_len, "seed must be in 0..%lld, not %llu", (long long)INT64_MAX,
                     (unsigned long long)q->seed);
            return GRPC_STATUS_INVALID_ARGUMENT;
        }
        sp->has_seed = true;
        sp->seed = q->seed;
    }
    sp->top_k = q->top_k;
    sp->min_p = q->min_p;
    sp->presence_penalty = q->presence_penalty;
    sp->frequency_penalty = q->frequency_penalty;
    if (!check_finite("temperature", sp->temperature, err, err_len) ||
        !check_finite("top_p", sp->top_p, err, err_len) ||
        !check_finite("min_p", sp->min_p, err, err_len) ||
        !check_finite("repetition_penalty", sp->repetition_penalty, err, err_len) ||
        !check_finite("presence_penalty", sp->presence_penalty, err, err_len) ||
        !check_finite("frequency_penalty", sp->frequency_penalty, err, err_len))
        return GRPC_STATUS_INVALID_ARGUMENT;
    if (tdm_sampling_params_validate(sp, err, err_len) != TDM_OK)
        return GRPC_STATUS_INVALID_ARGUMENT;

    int32_t *prompt = NULL;
    size_t n_prompt = 0;
    tdm_status_t st = TDM_OK;
    if (q->prompt[0] != '\0') {
        st = rt_prompt_text(m, q->prompt, strlen(q->prompt), &prompt, &n_prompt, err, err_len);
    } else if (q->n_messages > 0) {
        tdm_chat_msg_t *msgs = malloc(q->n_messages * sizeof(*msgs));
        if (msgs == NULL) {
            snprintf(err, err_len, "out of memory");
            return GRPC_STATUS_RESOURCE_EXHAUSTED;
        }
        for (size_t i = 0; i < q->n_messages; i++) {
            msgs[i].role = q->messages[i]->role;
            msgs[i].content = q->messages[i]->content;
        }
        st = rt_prompt_chat(m, msgs, q->n_messages, &prompt, &n_prompt, err, err_len);
        free(msgs);
    } else {
        for (size_t i = 0; i < q->n_prompt_token_ids; i++) {
            if (q->prompt_token_ids[i] < 0 || q->prompt_token_ids[i] >= n_vocab) {
                snprintf(err, err_len,
                         "prompt_token_ids[%zu] = %d is outside the vocabulary (0..%d)", i,
                         (int)q->prompt_token_ids[i], (int)n_vocab - 1);
                return GRPC_STATUS_INVALID_ARGUMENT;
            }
        }
        prompt = malloc(q->n_prompt_token_ids * sizeof(int32_t));
        if (prompt == NULL) {
            snprintf(err, err_len, "out of memory");
            return GRPC_STATUS_RESOURCE_EXHAUSTED;
        }
        memcpy(prompt, q->prompt_token_ids, q->n_prompt_token_ids * sizeof(int32_t));
        n_prompt = q->n_prompt_token_ids;
    }
    if (st == TDM_ERR_NOMEM)
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    if (st != TDM_OK)
        return GRPC_STATUS_INVALID_ARGUMENT;
    if (n_prompt == 0) {
        free(prompt);
        snprintf(err, err_len, "the prompt has no tokens");
        return GRPC_STATUS_INVALID_ARGUMENT;
    }
    if (n_prompt >= (size_t)m->max_model_len) {
        free(prompt);
        snprintf(err, err_len,
                 "the prompt is %zu tokens; model \"%s\" takes at most %d tokens in all "
                 "(prompt + output)",
                 n_prompt, m->name, (int)m->max_model_len);
        return GRPC_STATUS_INVALID_ARGUMENT;
    }

    p->model = m->name;
    p->tier = c->tier;
    p->request_id = c->request_id;
    p->prompt = prompt;
    p->n_prompt = n_prompt;
    p->max_tokens = q->max_tokens > 0 ? q->max_tokens : m->max_model_len - (int32_t)n_prompt;
    p->stop = (const char *const *)q->stop;
    p->n_stop = q->n_stop;
    p->stop_token_ids = q->stop_token_ids;
    p->n_stop_token_ids = q->n_stop_token_ids;
    p->ignore_eos = q->ignore_eos;
    p->logprobs = q->logprobs || q->top_logprobs > 0;
    p->top_logprobs = q->top_logprobs;
    p->deadline_ms = c->deadline_ms;
    *model_out = m;
    *prompt_out = prompt;
    *n_prompt_out = n_prompt;
    return GRPC_STATUS_OK;
}

static void handle_generate(gcall_t *c, const grpc_metadata_array *md, grpc_byte_buffer *payload)
{
    Tandem__V1__GenerateRequest *q = (Tandem__V1__GenerateRequest *)call_read(
        c, payload, &tandem__v1__generate_request__descriptor);
    if (q == NULL)
        return;
    /* request id and tier: the fields first, then the metadata */
    if (q->request_id[0] != '\0') {
        if (strlen(q->request_id) > REQUEST_ID_MAX) {
            char err[96];
            snprintf(err, sizeof(err), "request_id is longer than %d bytes", REQUEST_ID_MAX);
            call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, err);
            goto free_request;
        }
        snprintf(c->request_id, sizeof(c->request_id), "%s", q->request_id);
    }
    char tier[128]; /* longer than a pool name can be: the core refuses it */
    if (q->tier[0] != '\0')
        c->tier = strdup(q->tier);
    else if (md_get(md, "x-model-tier", tier, sizeof(tier)) && tier[0] != '\0')
        c->tier = strdup(tier);
    if (c->tier != NULL && !rt_utf8_valid(c->tier, strlen(c->tier), NULL)) {
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, "x-model-tier is not valid UTF-8");
        goto free_request;
    }
    c->want_logprobs = q->logprobs || q->top_logprobs > 0;

    char err[512] = "";
    rt_params_t p;
    memset(&p, 0, sizeof(p));
    const rt_model_info_t *m = NULL;
    int32_t *prompt = NULL;
    size_t n_prompt = 0;
    grpc_status_code code = build_params(c, q, &m, &prompt, &n_prompt, &p, err, sizeof(err));
    if (code != GRPC_STATUS_OK) {
        call_fail(c, code, err);
        goto free_request;
    }
    uint64_t id = 0;
    char client[256];
    call_client(c, md, client, sizeof(client));
    p.client = client;
    tdm_status_t st = rt_core_submit(c->srv->core, &p, on_core_event, c, &id, err, sizeof(err));
    free(prompt);
    if (st == TDM_ERR_INVALID) {
        call_fail(c, GRPC_STATUS_INVALID_ARGUMENT, err[0] ? err : "invalid request");
    } else if (st == TDM_ERR_NOT_FOUND) {
        call_fail(c, GRPC_STATUS_NOT_FOUND, err[0] ? err : "no such model");
    } else if (st == TDM_ERR_BUSY) {
        call_fail_retry(c, err[0] ? err : "over a queue limit; retry later");
    } else if (st == TDM_ERR_CANCELLED || st == TDM_ERR_NOMEM) {
        call_fail(c, GRPC_STATUS_UNAVAILABLE, err[0] ? err : "the router is overloaded");
    } else if (st != TDM_OK) {
        char msg[640];
        snprintf(msg, sizeof(msg), "the core refused the request: %s%s%s", tdm_status_str(st),
                 err[0] ? ": " : "", err);
        call_fail(c, GRPC_STATUS_INTERNAL, msg);
    } else {
        c->submitted = true;
        c->core_id = id;
        tdm_log_debug(MOD, "request %s: submitted as %llu (%zu prompt tokens, max_tokens %d)",
                      c->request_id, (unsigned long long)id, n_prompt, (int)p.max_tokens);
        if (c->method == METHOD_STREAM) {
            /* the stream's headers go out now, so the client sees it open
             * during a long prefill */
            call_send(c, NULL, NULL, 0, false, GRPC_STATUS_OK, NULL);
        }
        call_pump(c);
    }
free_request:
    protobuf_c_message_free_unpacked(&q->base, NULL);
}

static bool slot_arm(rt_grpc_t *s, slot_t *sl)
{
    grpc_call_error e;
    sl->call = NULL;
    sl->payload = NULL;
    grpc_metadata_array_init(&sl->md);
    if (sl->method == METHOD_UNKNOWN) {
        grpc_call_details_init(&sl->details);
        e = grpc_server_request_call(s->server, &sl->call, &sl->details, &sl->md, s->cq, s->cq,
                                     &sl->tag);
    } else {
        e = grpc_server_request_registered_call(s->server, s->registered[sl->method], &sl->call,
                                                &sl->deadline, &sl->md, &sl->payload, s->cq, s->cq,
                                                &sl->tag);
    }
    if (e != GRPC_CALL_OK) {
        tdm_log_error(MOD, "cannot wait for calls of %s: %s (the method stops answering)",
                      sl->method < METHOD_UNKNOWN ? method_path[sl->method] : "unknown methods",
                      grpc_call_error_to_string(e));
        grpc_metadata_array_destroy(&sl->md);
        if (sl->method == METHOD_UNKNOWN)
            grpc_call_details_destroy(&sl->details);
        return false;
    }
    sl->armed = true;
    s->n_armed++;
    return true;
}

/* A new call arrived on slot sl: take it over, re-arm the slot, answer. */
static void call_accept(rt_grpc_t *s, slot_t *sl)
{
    grpc_call *call = sl->call;
    grpc_metadata_array md = sl->md;
    grpc_byte_buffer *payload = sl->payload;
    gpr_timespec deadline = sl->method == METHOD_UNKNOWN ? sl->details.deadline : sl->deadline;
    char unknown[200] = "";
    if (sl->method == METHOD_UNKNOWN) {
        size_t n = GRPC_SLICE_LENGTH(sl->details.method);
        if (n >= sizeof(unknown))
            n = sizeof(unknown) - 1;
        memcpy(unknown, GRPC_SLICE_START_PTR(sl->details.method), n);
        unknown[n] = '\0';
        grpc_call_details_destroy(&sl->details);
    }
    method_t method = sl->method;
    if (!atomic_load(&s->stopping))
        slot_arm(s, sl);

    gcall_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        tdm_log_error(MOD, "out of memory accepting a call; it is cancelled");
        grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL);
        grpc_call_unref(call);
        goto free_slot_data;
    }
    c->srv = s;
    c->call = call;
    c->method = method;
    c->tag_close = (tag_t){TAG_CLOSE, c};
    c->tag_send = (tag_t){TAG_SEND, c};
    c->tag_wake = (tag_t){TAG_WAKE, c};
    c->deadline_ms = deadline_to_ms(deadline);
    pthread_mutex_init(&c->mu, NULL);
    if (!md_get(&md, "x-request-id", c->request_id, sizeof(c->request_id)) ||
        !rt_utf8_valid(c->request_id, strlen(c->request_id), NULL) || c->request_id[0] == '\0')
        snprintf(c->request_id, sizeof(c->request_id), "grpc-%llu",
                 (unsigned long long)atomic_fetch_add(&s->next_request_id, 1));
    c->next = s->calls;
    if (s->calls != NULL)
        s->calls->prev = c;
    s->calls = c;
    s->n_calls++;

    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    if (!call_batch(c, &op, 1, &c->tag_close)) {
        /* no close will come back: nothing can free c but this */
        c->closed = true;
        goto free_slot_data;
    }

    if (method == METHOD_UNKNOWN) {
        char msg[256];
        snprintf(msg, sizeof(msg),
                 "unknown method %s (tandem.v1.Generation has Generate, "
                 "GenerateStream, ListModels, Health)",
                 unknown);
        call_fail(c, GRPC_STATUS_UNIMPLEMENTED, msg);
    } else if (atomic_load(&s->stopping)) {
        call_fail(c, GRPC_STATUS_UNAVAILABLE, "the router is shutting down");
    } else if (c->deadline_ms != 0 && tdm_net_now_ms() >= c->deadline_ms) {
        call_fail(c, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline exceeded before the call arrived");
    } else if (method != METHOD_HEALTH && !auth_ok(s, &md)) {
        call_fail(c, GRPC_STATUS_UNAUTHENTICATED,
                  "this router needs an API key: send the metadata "
                  "\"authorization: Bearer <key>\"");
    } else if (method == METHOD_GENERATE || method == METHOD_STREAM) {
        handle_generate(c, &md, payload);
    } else {
        const ProtobufCMessageDescriptor *d = method == METHOD_MODELS
                                                  ? &tandem__v1__list_models_request__descriptor
                                                  : &tandem__v1__health_request__descriptor;
        ProtobufCMessage *q = call_read(c, payload, d);
        if (q != NULL) {
            protobuf_c_message_free_unpacked(q, NULL);
            if (method == METHOD_MODELS)
                handle_models(c);
            else
                handle_health(c);
        }
    }
free_slot_data:
    grpc_metadata_array_destroy(&md);
    if (payload != NULL)
        grpc_byte_buffer_destroy(payload);
    if (c != NULL)
        call_maybe_free(c);
}

/* ---- the completion queue's thread ------------------------------------ */

static void on_tag(rt_grpc_t *s, tag_t *t, int success)
{
    switch (t->kind) {
    case TAG_SLOT: {
        slot_t *sl = t->owner;
        sl->armed = false;
        s->n_armed--;
        if (success && sl->call != NULL) {
            call_accept(s, sl);
        } else {
            /* the server shuts down */
            grpc_metadata_array_destroy(&sl->md);
            if (sl->method == METHOD_UNKNOWN)
                grpc_call_details_destroy(&sl->details);
            if (sl->payload != NULL)
                grpc_byte_buffer_destroy(sl->payload);
            if (!atomic_load(&s->stopping)) {
                tdm_log_error(MOD, "waiting for calls failed outside shutdown; trying again");
                slot_arm(s, sl);
            }
        }
        return;
    }
    case TAG_SHUTDOWN: s->shutdown_done = true; return;
    case TAG_CLOSE:
    case TAG_SEND:
    case TAG_WAKE: break;
    }
    gcall_t *c = t->owner;
    pthread_mutex_lock(&c->mu);
    c->n_ops--;
    if (t->kind == TAG_WAKE)
        c->wake_armed = false;
    pthread_mutex_unlock(&c->mu);
    if (t->kind == TAG_CLOSE) {
        c->closed = true;
        if (c->cancelled) {
            /* the client cancelled, went away, or its deadline passed */
            if (!c->deadline_hit && c->deadline_ms != 0 && tdm_net_now_ms() >= c->deadline_ms)
                c->deadline_hit = true;
            tdm_log_debug(MOD, "request %s: the call ended early (%s)", c->request_id,
                          c->deadline_hit ? "deadline" : "cancelled or disconnected");
            core_cancel(c);
        }
    } else if (t->kind == TAG_SEND) {
        c->sending = false;
        if (c->send_bb != NULL)
            grpc_byte_buffer_destroy(c->send_bb);
        c->send_bb = NULL;
        if (c->have_details)
            grpc_slice_unref(c->status_details);
        c->have_details = false;
        if (!success && !c->closed)
            core_cancel(c); /* the stream broke: stop generating */
    }
    call_pump(c);
    call_maybe_free(c);
}

/* Every TICK_MS: deadlines, events whose wakeup could not be started, and
 * cancelling everything once stopping. */
static void on_tick(rt_grpc_t *s, int64_t now)
{
    bool stopping = atomic_load(&s->stopping);
    if (stopping && !s->shutdown_started) {
        s->shutdown_started = true;
        for (gcall_t *c = s->calls; c != NULL; c = c->next) {
            core_cancel(c);
            if (!c->closed)
                grpc_call_cancel_with_status(c->call, GRPC_STATUS_UNAVAILABLE,
                                             "the router is shutting down", NULL);
        }
        grpc_server_shutdown_and_notify(s->server, s->cq, &s->tag_shutdown);
        grpc_server_cancel_all_calls(s->server);
    }
    for (gcall_t *c = s->calls, *next; c != NULL; c = next) {
        next = c->next;
        if (c->deadline_ms != 0 && now >= c->deadline_ms && !c->deadline_hit && !c->final_seen &&
            !c->status_sent) {
            c->deadline_hit = true;
            tdm_log_debug(MOD, "request %s: deadline passed; cancelling", c->request_id);
            core_cancel(c);
            grpc_call_cancel_with_status(c->call, GRPC_STATUS_DEADLINE_EXCEEDED,
                                         "deadline exceeded", NULL);
        }
        pthread_mutex_lock(&c->mu);
        bool lost = c->evq_head != NULL && !c->wake_armed;
        pthread_mutex_unlock(&c->mu);
        if (lost) {
            call_pump(c);
            call_maybe_free(c);
        }
    }
}

static void *grpc_thread(void *arg)
{
    rt_grpc_t *s = arg;
    int64_t last_tick = 0, stop_by = 0;
    for (;;) {
        gpr_timespec dl =
            gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(TICK_MS, GPR_TIMESPAN));
        grpc_event ev = grpc_completion_queue_next(s->cq, dl, NULL);
        if (ev.type == GRPC_OP_COMPLETE)
            on_tag(s, ev.tag, ev.success);
        else if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break; /* not before rt_grpc_stop: cannot happen */
        int64_t now = tdm_net_now_ms();
        if (now - last_tick >= TICK_MS || (atomic_load(&s->stopping) && !s->shutdown_started)) {
            last_tick = now;
            on_tick(s, now);
        }
        if (s->shutdown_started) {
            if (stop_by == 0)
                stop_by = now + STOP_WAIT_MS;
            if (s->shutdown_done && s->n_calls == 0 && s->n_armed == 0)
                break;
            if (now >= stop_by) {
                tdm_log_error(MOD,
                              "stopping: %zu calls still wait for their core requests' "
                              "final events after %d ms (a bug in the core); the gRPC "
                              "server is leaked rather than freed under them",
                              s->n_calls, STOP_WAIT_MS);
                s->leaked = true;
                break;
            }
        }
    }
    return NULL;
}

/* ---- start / stop ------------------------------------------------------- */

void rt_grpc_config_default(rt_grpc_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->port = DEFAULT_PORT;
    cfg->max_message_bytes = DEFAULT_MAX_BYTES;
}

tdm_status_t rt_grpc_start(rt_core_t *core, const rt_grpc_config_t *cfg, rt_grpc_t **out)
{
    const char *host = cfg->host != NULL && cfg->host[0] ? cfg->host : "127.0.0.1";
    if (cfg->port < 0 || cfg->port > 65535) {
        tdm_log_error(MOD, "gRPC port %d is out of range: give 1..65535, or 0 to let the OS pick",
                      cfg->port);
        return TDM_ERR_INVALID;
    }
    size_t max_bytes = cfg->max_message_bytes ? cfg->max_message_bytes : DEFAULT_MAX_BYTES;
    if (max_bytes > INT_MAX)
        max_bytes = INT_MAX;

    rt_grpc_t *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        tdm_log_error(MOD, "out of memory starting the gRPC server");
        return TDM_ERR_NOMEM;
    }
    s->core = core;
    atomic_init(&s->stopping, false);
    atomic_init(&s->next_request_id, 1);
    s->tag_shutdown = (tag_t){TAG_SHUTDOWN, s};
    if (cfg->api_key != NULL && cfg->api_key[0] != '\0') {
        s->api_key = strdup(cfg->api_key);
        if (s->api_key == NULL) {
            tdm_log_error(MOD, "out of memory starting the gRPC server");
            free(s);
            return TDM_ERR_NOMEM;
        }
    }

    grpc_init();
    grpc_arg args[6];
    memset(args, 0, sizeof(args));
    size_t n_args = 0;
#define ARG_INT(key_, val_)                                                                        \
    do {                                                                                           \
        args[n_args].type = GRPC_ARG_INTEGER;                                                      \
        args[n_args].key = (char *)(key_);                                                         \
        args[n_args].value.integer = (val_);                                                       \
        n_args++;                                                                                  \
    } while (0)
    ARG_INT(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, (int)max_bytes);
    ARG_INT(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
    ARG_INT(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 1000);
    ARG_INT(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    ARG_INT(GRPC_ARG_ALLOW_REUSEPORT, 0); /* a port in use must fail, not be shared */
#undef ARG_INT
    grpc_channel_args chargs = {.num_args = n_args, .args = args};
    s->server = grpc_server_create(&chargs, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    for (int m = 0; m < METHOD_UNKNOWN; m++) {
        s->registered[m] = grpc_server_register_method(
            s->server, method_path[m], NULL, GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
        if (s->registered[m] == NULL) {
            tdm_log_error(MOD, "cannot register gRPC method %s (a bug in api_grpc.c)",
                          method_path[m]);
            goto destroy_server;
        }
    }

    char addr[300];
    if (strchr(host, ':') != NULL && host[0] != '[')
        snprintf(addr, sizeof(addr), "[%s]:%d", host, cfg->port);
    else
        snprintf(addr, sizeof(addr), "%s:%d", host, cfg->port);
    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    s->port = grpc_server_add_http2_port(s->server, addr, creds);
    grpc_server_credentials_release(creds);
    if (s->port == 0) {
        tdm_log_error(MOD,
                      "cannot listen for gRPC on %s: the address is in use or not local; "
                      "pick another --grpc-port or host",
                      addr);
        goto destroy_server;
    }
    grpc_server_start(s->server);

    for (int m = 0; m < METHOD_COUNT; m++) {
        s->slots[m].tag = (tag_t){TAG_SLOT, &s->slots[m]};
        s->slots[m].srv = s;
        s->slots[m].method = (method_t)m;
        if (!slot_arm(s, &s->slots[m]))
            goto shutdown_server;
    }
    if (pthread_create(&s->thread, NULL, grpc_thread, s) != 0) {
        tdm_log_error(MOD, "cannot start the gRPC thread (out of threads?)");
        goto shutdown_server;
    }
    s->thread_started = true;
    tdm_log_info(MOD, "gRPC API (tandem.v1.Generation) on %s:%d%s", host, s->port,
                 s->api_key != NULL ? " (API key required)" : "");
    *out = s;
    return TDM_OK;

shutdown_server:
    /* no thread: drain the queue here */
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->tag_shutdown);
    while (!s->shutdown_done || s->n_armed > 0) {
        grpc_event ev =
            grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            break;
        tag_t *t = ev.tag;
        if (t->kind == TAG_SHUTDOWN) {
            s->shutdown_done = true;
        } else if (t->kind == TAG_SLOT) {
            slot_t *sl = t->owner;
            s->n_armed--;
            grpc_metadata_array_destroy(&sl->md);
            if (sl->method == METHOD_UNKNOWN)
                grpc_call_details_destroy(&sl->details);
            if (sl->payload != NULL)
                grpc_byte_buffer_destroy(sl->payload);
            if (sl->call != NULL)
                grpc_call_unref(sl->call);
        }
    }
destroy_server:
    if (!s->shutdown_done) {
        grpc_server_shutdown_and_notify(s->server, s->cq, &s->tag_shutdown);
        for (;;) {
            grpc_event ev =
                grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
            if (ev.type != GRPC_OP_COMPLETE || ev.tag == &s->tag_shutdown)
                break;
        }
    }
    grpc_server_destroy(s->server);
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(s->cq);
    grpc_shutdown();
    tdm_status_t st = s->port == 0 ? TDM_ERR_IO : TDM_ERR_INTERNAL;
    free(s->api_key);
    free(s);
    return st;
}

int rt_grpc_port(const rt_grpc_t *s)
{
    return s->port;
}

void rt_grpc_stop(rt_grpc_t *s)
{
    if (s == NULL)
        return;
    atomic_store(&s->stopping, true);
    pthread_join(s->thread, NULL);
    if (s->leaked)
        return;
    grpc_server_destroy(s->server);
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(s->cq);
    free(s->api_key);
    free(s);
    grpc_shutdown();
}
