/* tandem-router: the OpenAI-compatible HTTP front end (see api_openai.h).
 *
 * Life of a request (oa_req_t, one per HTTP request, refcounted):
 *   1. First access-handler call (headers): route, API key, method,
 *      Content-Type and Content-Length are checked; GET endpoints answer.
 *   2. Body calls append to r->body (bounded by max_body_bytes).
 *   3. Last call: UTF-8 check, JSON parse, validation, prompt building,
 *      one rt_core_submit per choice (prompts x n), then oa_deliver():
 *      queue what is ready or MHD_suspend_connection.
 *   4. Core events (core thread) render into the request under its lock:
 *      SSE chunks into r->out, or the whole answer into r->final_body when
 *      the last choice ends; then MHD_resume_connection. The resumed
 *      connection calls the access handler again (non-streamed: queue the
 *      answer) or the stream reader (returns buffered bytes, suspends when
 *      it has none).
 *   5. The request is freed when libmicrohttpd is done with it (request
 *      completed callback, and the stream response's free callback) and
 *      every core request had its final event.
 * A stream's HTTP status is decided by the first event: an error before
 * any output answers with the core's status, later ones go into the
 * stream.
 *
 * Disconnects: libmicrohttpd reports a closed connection it is reading or
 * writing through the completed callback (its core requests are then
 * cancelled). It does not watch suspended connections, so the watchdog
 * thread peeks (MSG_PEEK | MSG_DONTWAIT) at their sockets every
 * OA_WATCH_MS: 0 bytes or an error other than EAGAIN means the client
 * left; its core requests are cancelled and the connection resumed so
 * that libmicrohttpd closes it. (A client that half-closes its sending
 * side while waiting is taken as gone too.)
 *
 * Locks: the server's lock (request list, stopping) is taken before a
 * request's lock, never after. rt_core_cancel is called without either. */
#define _GNU_SOURCE
#include "api_openai.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "prompt.h"
#include "tandem/http.h"
#include "tandem/log.h"
#include "tandem/net.h"
#include "tandem/secret.h"

#define MOD "openai"

#define OA_DEFAULT_HOST        "127.0.0.1"
#define OA_DEFAULT_PORT        8000
#define OA_DEFAULT_MAX_BODY    (4u << 20)
#define OA_DEFAULT_MAX_CONN    4096
#define OA_DEFAULT_TIMEOUT_S   30
#define OA_DEFAULT_HEADER_S    10
#define OA_LISTEN_BACKLOG      4096 /* the kernel caps it at net.core.somaxconn */
#define OA_TOKENIZE_MIN_BODY   (64u << 10)
#define OA_TOKENIZE_BYTES_PER  32  /* body bytes per token of max_model_len (JSON escapes) */
#define OA_POOL_THREADS        4   /* libmicrohttpd polling threads */
#define OA_WATCH_MS            100 /* disconnect checks of suspended connections */
#define OA_STOP_WAIT_MS        5000
#define OA_STREAM_BLOCK        16384
#define OA_MAX_N               16
#define OA_MAX_CHOICES         128 /* prompts x n */
#define OA_MAX_STOP_TOKEN_IDS  64
#define OA_MAX_COMPLETION_TOPS 5
#define OA_MAX_DROPPED_BODIES  16 /* an oversized body is read up to this many limits */
#define OA_MAX_MODELS          64
#define OA_REQUEST_ID_MAX      128
#define OA_JSON                "application/json"
#define OA_SSE                 "text/event-stream"
#define OA_MIN_LOGPROB         -9999.0

typedef enum oa_route {
    OA_ROUTE_NONE = 0,
    OA_ROUTE_COMPLETIONS,
    OA_ROUTE_CHAT,
    OA_ROUTE_MODELS,
    OA_ROUTE_HEALTH,
    OA_ROUTE_READY,
    OA_ROUTE_METRICS,
    OA_ROUTE_TOKENIZE,
    OA_ROUTE_DETOKENIZE,
} oa_route_t;

static const struct {
    const char *path;
    oa_route_t route;
    bool post; /* else GET (and HEAD) */
} oa_routes[] = {
    {"/v1/completions", OA_ROUTE_COMPLETIONS, true},
    {"/v1/chat/completions", OA_ROUTE_CHAT, true},
    {"/v1/models", OA_ROUTE_MODELS, false},
    {"/health", OA_ROUTE_HEALTH, false},
    {"/ready", OA_ROUTE_READY, false},
    {"/metrics", OA_ROUTE_METRICS, false},
    {"/tokenize", OA_ROUTE_TOKENIZE, true},
    {"/detokenize", OA_ROUTE_DETOKENIZE, true},
};

typedef struct oa_buf {
    char *p;
    size_t len, cap;
} oa_buf_t;

typedef struct oa_req oa_req_t;

typedef struct oa_choice {
    oa_req_t *req;
    uint64_t core_id; /* 0 until rt_core_submit returned */
    bool live;        /* submitted, final event not yet here */
    bool role_sent;   /* chat stream: the role delta went out */
    tdm_finish_reason_t finish;
    oa_buf_t text;     /* non-streamed: the whole text */
    size_t text_bytes; /* bytes of text so far (completions text_offset) */
    json_t *lp;        /* non-streamed logprobs, built as events come */
    int32_t n_prompt, n_output, n_cached;
} oa_choice_t;

typedef enum oa_phase {
    OA_PHASE_BODY = 0, /* reading the body */
    OA_PHASE_WAIT,     /* submitted; waiting for the answer (or a stream's start) */
    OA_PHASE_STREAM,   /* stream response queued */
    OA_PHASE_DONE,     /* a response is queued */
} oa_phase_t;

struct oa_req {
    oa_req_t *prev, *next; /* the server's list */
    rt_openai_t *s;
    struct MHD_Connection *conn;
    int fd;
    pthread_mutex_t lock;
    int refs; /* MHD's request, the stream response, each live core request */

    oa_route_t route;
    bool is_post;
    char *url;
    char method[16];
    char request_id[OA_REQUEST_ID_MAX + 1];
    char *tier;
    int64_t start_ms;
    unsigned status; /* sent, for the log line */
    oa_phase_t phase;
    oa_buf_t body;
    size_t max_body;     /* the route's limit */
    bool body_over;      /* over max_body: dropped */
    size_t body_dropped; /* bytes dropped */

    /* generation */
    const rt_model_info_t *model;
    bool chat, stream, include_usage;
    bool want_logprobs;
    int top_logprobs;
    int n; /* choices per prompt */
    char id[64];
    int64_t created;
    oa_choice_t *choices;
    size_t n_choices, n_live;

    bool suspended;   /* MHD_suspend_connection in effect */
    bool started;     /* stream: the 200 response may go out */
    bool complete;    /* stream: [DONE] is in out */
    bool fixed;       /* the outcome is decided: later events are only counted */
    bool client_gone; /* disconnect seen */
    bool aborting;    /* server stopping */
    bool mhd_done;    /* request completed callback ran */
    oa_buf_t out;     /* stream bytes not yet read by MHD */
    size_t out_off;
    char *final_body; /* non-streamed answer or error, queued by oa_deliver */
    size_t final_len;
    unsigned final_status;
};

struct rt_openai {
    rt_core_t *core;
    char *host;
    char *api_key;
    size_t max_body;          /* generation endpoints */
    size_t max_body_tokenize; /* /tokenize, /detokenize */
    unsigned max_conn, max_per_ip, header_timeout_s, timeout_s;
    tdm_metrics_registry_t *registry;
    tdm_http_guard_t *guard;
    struct MHD_Daemon *daemon;
    int port;

    pthread_mutex_t lock;
    pthread_cond_t cond; /* watchdog sleeps; stop waits for requests to end */
    oa_req_t *reqs;
    size_t n_reqs;
    bool stopping;
    pthread_t watchdog;
    bool watchdog_started;
};

typedef struct oa_err {
    unsigned status;
    const char *type;
    const char *code;
    char param[96];
    char msg[640];
} oa_err_t;

/* ---- small helpers ---- */

static bool oa_buf_add(oa_buf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->len + n + 1)
            c *= 2;
        char *p = realloc(b->p, c);
        if (p == NULL)
            return false;
        b->p = p;
        b->cap = c;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return true;
}

static void oa_buf_free(oa_buf_t *b)
{
    free(b->p);
    *b = (oa_buf_t){0};
}

static void oa_random_hex(char *out, size_t n_hex)
{
    static uint64_t counter;
    uint8_t raw[32];
    size_t nb = (n_hex + 1) / 2;
    if (nb > sizeof(raw))
        nb = sizeof(raw);
    if (getrandom(raw, nb, GRND_NONBLOCK) != (ssize_t)nb) {
        uint64_t x = (uint64_t)time(NULL) ^
                     __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED) * 0x9E3779B97F4A7C15ull;
        for (size_t i = 0; i < nb; i++) {
            x ^= x >> 33;
            x *= 0xff51afd7ed558ccdull;
            raw[i] = (uint8_t)x;
        }
    }
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n_hex; i++)
        out[i] = hex[(raw[i / 2] >> ((i % 2) ? 0 : 4)) & 15];
    out[n_hex] = '\0';
}

/* A JSON string of len bytes; invalid UTF-8 becomes U+FFFD. */
static json_t *oa_json_text(const char *s, size_t len)
{
    size_t bad;
    if (rt_utf8_valid(s, len, &bad))
        return json_stringn(s, len);
    oa_buf_t b = {0};
    size_t i = 0;
    while (i < len) {
        size_t rest;
        if (rt_utf8_valid(s + i, len - i, &rest)) {
            rest = len - i;
        }
        if (rest > 0 && !oa_buf_add(&b, s + i, rest))
            goto err;
        i += rest;
        if (i < len) {
            if (!oa_buf_add(&b, "\xEF\xBF\xBD", 3))
                goto err;
            i++;
        }
    }
    json_t *j = json_stringn(b.p != NULL ? b.p : "", b.len);
    oa_buf_free(&b);
    return j;
err:
    oa_buf_free(&b);
    return NULL;
}

static bool oa_printable(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e)
            return false;
    return true;
}

/* Who sent r, for the core's per-client queue limit (rt_params.client):
 * the API key it presented where keys are checked, else its IP address
 * (buf, cap >= INET6_ADDRSTRLEN). */
static const char *oa_client(const oa_req_t *r, char *buf, size_t cap)
{
    if (r->s->api_key != NULL) {
        const char *h =
            MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
        return h != NULL && strlen(h) > 7 ? h + 7 : ""; /* past "Bearer " (checked) */
    }
    buf[0] = '\0';
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    const struct sockaddr *sa = ci != NULL ? ci->client_addr : NULL;
    if (sa != NULL && sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, buf,
                  (socklen_t)cap);
    else if (sa != NULL && sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr, buf,
                  (socklen_t)cap);
    return buf;
}

static bool oa_bad(oa_err_t *e, unsigned status, const char *param, const char *code,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static bool oa_bad(oa_err_t *e, unsigned status, const char *param, const char *code,
                   const char *fmt, ...)
{
    e->status = status;
    e->type = status >= 500 ? "server_error" : "invalid_request_error";
    e->code = code;
    snprintf(e->param, sizeof(e->param), "%s", param != NULL ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
    va_end(ap);
    return false;
}

/* {"error": {...}} as a malloc'd string. */
static char *oa_error_json(const char *msg, const char *type, const char *param, const char *code,
                           size_t *len)
{
    json_t *m = oa_json_text(msg, strlen(msg));
    json_t *o = json_pack("{s:{s:o*,s:s,s:o,s:o}}", "error", "message", m, "type", type, "param",
                          param != NULL && param[0] != '\0' ? json_string(param) : json_null(),
                          "code", code != NULL ? json_string(code) : json_null());
    char *s = o != NULL ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (s == NULL)
        s = strdup("{\"error\":{\"message\":\"internal error\",\"type\":\"server_error\","
                   "\"param\":null,\"code\":null}}");
    if (s != NULL)
        *len = strlen(s);
    return s;
}

static const char *oa_code_for_status(int status)
{
    switch (status) {
    case 503: return "service_unavailable";
    case 504: return "timeout";
    default: return NULL;
    }
}

static const char *oa_finish_str(tdm_finish_reason_t f)
{
    return f == TDM_FINISH_LENGTH ? "length" : "stop";
}

/* ---- responses (MHD threads) ---- */

static enum MHD_Result oa_queue(oa_req_t *r, unsigned status, const char *ctype, char *body,
                                size_t len)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(
        len, body != NULL ? body : (void *)"",
        body != NULL ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (resp == NULL) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    MHD_add_response_header(resp, "X-Request-Id", r->request_id);
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, r->is_post ? "POST" : "GET, HEAD");
    if (status == MHD_HTTP_UNAUTHORIZED)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    if (status == MHD_HTTP_TOO_MANY_REQUESTS) {
        char ra[16];
        snprintf(ra, sizeof(ra), "%d", RT_RETRY_AFTER_S);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, ra);
    }
    enum MHD_Result ret = MHD_queue_response(r->conn, status, resp);
    MHD_destroy_response(resp);
    r->status = status;
    r->phase = OA_PHASE_DONE;
    return ret;
}

static void oa_log_error(const oa_req_t *r, unsigned status, const char *msg)
{
    if (status >= 500)
        tdm_log_warn(MOD, "%s %s (request %s): %u: %s", r->method, r->url, r->request_id, status,
                     msg);
    else
        tdm_log_info(MOD, "%s %s (request %s): %u: %s", r->method, r->url, r->request_id, status,
                     msg);
}

static enum MHD_Result oa_reply_err(oa_req_t *r, const oa_err_t *e)
{
    oa_log_error(r, e->status, e->msg);
    size_t len = 0;
    char *body = oa_error_json(e->msg, e->type, e->param, e->code, &len);
    return oa_queue(r, e->status, OA_JSON, body, len);
}

static enum MHD_Result oa_fail(oa_req_t *r, unsigned status, const char *param, const char *code,
                               const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static enum MHD_Result oa_fail(oa_req_t *r, unsigned status, const char *param, const char *code,
                               const char *fmt, ...)
{
    oa_err_t e;
    oa_bad(&e, status, param, code, "%s", "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.msg, sizeof(e.msg), fmt, ap);
    va_end(ap);
    return oa_reply_err(r, &e);
}

static enum MHD_Result oa_reply_json(oa_req_t *r, unsigned status, json_t *o)
{
    char *s = o != NULL ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (s == NULL)
        return oa_fail(r, 500, NULL, NULL, "out of memory rendering the answer");
    return oa_queue(r, status, OA_JSON, s, strlen(s));
}

/* ---- request state ---- */

static void oa_req_free(oa_req_t *r)
{
    rt_openai_t *s = r->s;
    pthread_mutex_lock(&s->lock);
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        s->reqs = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    s->n_reqs--;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);

    for (size_t i = 0; i < r->n_choices; i++) {
        oa_buf_free(&r->choices[i].text);
        json_decref(r->choices[i].lp);
    }
    free(r->choices);
    oa_buf_free(&r->body);
    oa_buf_free(&r->out);
    free(r->final_body);
    free(r->tier);
    free(r->url);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

/* Drops one reference; call without r->lock. */
static void oa_req_unref(oa_req_t *r)
{
    pthread_mutex_lock(&r->lock);
    int left = --r->refs;
    pthread_mutex_unlock(&r->lock);
    if (left == 0)
        oa_req_free(r);
}

/* Collects the ids of live core requests (r->lock held). */
static size_t oa_live_ids(const oa_req_t *r, uint64_t *ids, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < r->n_choices && n < cap; i++)
        if (r->choices[i].live && r->choices[i].core_id != 0)
            ids[n++] = r->choices[i].core_id;
    return n;
}

static void oa_cancel_ids(rt_openai_t *s, const uint64_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++)
        rt_core_cancel(s->core, ids[i]);
}

/* ---- rendering (core thread, r->lock held) ---- */

/* The text of a token for logprobs: its bytes, or "bytes:\xNN..." when
 * they are not valid UTF-8 (as OpenAI writes partial characters). */
static json_t *oa_token_json(const oa_req_t *r, int32_t id, json_t **bytes_out)
{
    char buf[256];
    size_t n = tdm_tokenizer_token_bytes(r->model->tok, id, true, buf, sizeof(buf));
    if (n > sizeof(buf))
        n = sizeof(buf);
    if (bytes_out != NULL) {
        json_t *a = json_array();
        for (size_t i = 0; a != NULL && i < n; i++)
            json_array_append_new(a, json_integer((unsigned char)buf[i]));
        *bytes_out = a;
    }
    size_t bad;
    if (rt_utf8_valid(buf, n, &bad))
        return json_stringn(buf, n);
    char esc[6 + 4 * sizeof(buf) + 1];
    size_t k = (size_t)snprintf(esc, sizeof(esc), "bytes:");
    for (size_t i = 0; i < n; i++)
        k += (size_t)snprintf(esc + k, sizeof(esc) - k, "\\x%02x", (unsigned char)buf[i]);
    return json_stringn(esc, k);
}

static json_t *oa_logprob(float lp)
{
    double v = lp;
    if (!(v > OA_MIN_LOGPROB)) /* -inf and NaN too */
        v = OA_MIN_LOGPROB;
    return json_real(v);
}

/* Completions: appends tokens to {tokens, token_logprobs, top_logprobs,
 * text_offset}. */
static void oa_lp_completion_add(oa_req_t *r, oa_choice_t *c, json_t *lp, const rt_token_info_t *t,
                                 size_t n)
{
    json_t *tokens = json_object_get(lp, "tokens");
    json_t *lps = json_object_get(lp, "token_logprobs");
    json_t *tops = json_object_get(lp, "top_logprobs");
    json_t *offs = json_object_get(lp, "text_offset");
    for (size_t i = 0; i < n; i++) {
        json_array_append_new(tokens, oa_token_json(r, t[i].token, NULL));
        json_array_append_new(lps, oa_logprob(t[i].logprob));
        json_t *top = json_object();
        int32_t nt = t[i].n_top < r->top_logprobs ? t[i].n_top : r->top_logprobs;
        for (int32_t k = 0; k < nt; k++) {
            json_t *key = oa_token_json(r, t[i].top[k].token, NULL);
            if (key != NULL && json_object_get(top, json_string_value(key)) == NULL)
                json_object_set_new(top, json_string_value(key), oa_logprob(t[i].top[k].logprob));
            json_decref(key);
        }
        if (nt == 0) {
            json_t *key = oa_token_json(r, t[i].token, NULL);
            if (key != NULL)
                json_object_set_new(top, json_string_value(key), oa_logprob(t[i].logprob));
            json_decref(key);
        }
        json_array_append_new(tops, top);
        json_array_append_new(offs, json_integer((json_int_t)c->text_bytes));
        char buf[256];
        size_t nb = tdm_tokenizer_token_bytes(r->model->tok, t[i].token, false, buf, sizeof(buf));
        c->text_bytes += nb;
    }
}

static json_t *oa_lp_completion_new(void)
{
    return json_pack("{s:[],s:[],s:[],s:[]}", "tokens", "token_logprobs", "top_logprobs",
                     "text_offset");
}

/* Chat: appends {token, logprob, bytes, top_logprobs} entries to content. */
static void oa_lp_chat_add(oa_req_t *r, json_t *content, const rt_token_info_t *t, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        json_t *bytes = NULL;
        json_t *tok = oa_token_json(r, t[i].token, &bytes);
        json_t *tops = json_array();
        int32_t nt = t[i].n_top < r->top_logprobs ? t[i].n_top : r->top_logprobs;
        for (int32_t k = 0; k < nt; k++) {
            json_t *tb = NULL;
            json_t *tt = oa_token_json(r, t[i].top[k].token, &tb);
            json_array_append_new(tops, json_pack("{s:o*,s:o*,s:o*}", "token", tt, "logprob",
                                                  oa_logprob(t[i].top[k].logprob), "bytes", tb));
        }
        json_array_append_new(content, json_pack("{s:o*,s:o*,s:o*,s:o*}", "token", tok, "logprob",
                                                 oa_logprob(t[i].logprob), "bytes", bytes,
                                                 "top_logprobs", tops));
    }
}

static json_t *oa_usage(const oa_req_t *r)
{
    int64_t prompt = 0, cached = 0, out = 0;
    for (size_t i = 0; i < r->n_choices; i++) {
        const oa_choice_t *c = &r->choices[i];
        if (i % (size_t)r->n == 0) { /* each prompt once */
            prompt += c->n_prompt;
            cached += c->n_cached;
        }
        out += c->n_output;
    }
    return json_pack("{s:I,s:I,s:I,s:{s:I}}", "prompt_tokens", (json_int_t)prompt,
                     "completion_tokens", (json_int_t)out, "total_tokens",
                     (json_int_t)(prompt + out), "prompt_tokens_details", "cached_tokens",
                     (json_int_t)cached);
}

static json_t *oa_chunk_head(const oa_req_t *r)
{
    return json_pack("{s:s,s:s,s:I,s:s}", "id", r->id, "object",
                     r->chat ? "chat.completion.chunk" : "text_completion", "created",
                     (json_int_t)r->created, "model", r->model->name);
}

static void oa_sse_add(oa_req_t *r, json_t *o)
{
    char *s = o != NULL ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (s == NULL) {
        tdm_log_warn(MOD, "request %s: out of memory rendering a stream chunk; chunk dropped",
                     r->request_id);
        return;
    }
    if (!oa_buf_add(&r->out, "data: ", 6) || !oa_buf_add(&r->out, s, strlen(s)) ||
        !oa_buf_add(&r->out, "\n\n", 2))
        tdm_log_warn(MOD, "request %s: out of memory buffering the stream", r->request_id);
    free(s);
}

static void oa_sse_chunk(oa_req_t *r, json_t *choice)
{
    json_t *o = oa_chunk_head(r);
    if (o == NULL) {
        json_decref(choice);
        return;
    }
    json_object_set_new(o, "choices", json_pack("[o]", choice));
    if (r->include_usage)
        json_object_set_new(o, "usage", json_null());
    oa_sse_add(r, o);
}

/* One event of a choice into the stream. */
static void oa_stream_event(oa_req_t *r, oa_choice_t *c, const rt_event_t *ev)
{
    size_t idx = (size_t)(c - r->choices);
    bool fin = ev->finish == TDM_FINISH_STOP || ev->finish == TDM_FINISH_LENGTH;
    bool lp = r->want_logprobs && ev->n_tokens > 0 && ev->tokens != NULL;
    if (r->chat && !c->role_sent) {
        c->role_sent = true;
        oa_sse_chunk(r, json_pack("{s:I,s:{s:s,s:s},s:n,s:n}", "index", (json_int_t)idx, "delta",
                                  "role", "assistant", "content", "", "logprobs", "finish_reason"));
    }
    if (ev->text_len == 0 && !fin && !lp)
        return;
    json_t *logprobs = json_null();
    if (lp) {
        if (r->chat) {
            json_t *content = json_array();
            oa_lp_chat_add(r, content, ev->tokens, ev->n_tokens);
            logprobs = json_pack("{s:o}", "content", content);
        } else {
            logprobs = oa_lp_completion_new();
            oa_lp_completion_add(r, c, logprobs, ev->tokens, ev->n_tokens);
        }
    }
    json_t *text = oa_json_text(ev->text, ev->text_len);
    json_t *finish = fin ? json_string(oa_finish_str(ev->finish)) : json_null();
    json_t *choice;
    if (r->chat) {
        json_t *delta = ev->text_len > 0 ? json_pack("{s:o*}", "content", text) : json_object();
        if (ev->text_len == 0)
            json_decref(text);
        choice = json_pack("{s:I,s:o*,s:o*,s:o*}", "index", (json_int_t)idx, "delta", delta,
                           "logprobs", logprobs, "finish_reason", finish);
    } else {
        choice = json_pack("{s:I,s:o*,s:o*,s:o*}", "index", (json_int_t)idx, "text", text,
                           "logprobs", logprobs, "finish_reason", finish);
    }
    oa_sse_chunk(r, choice);
}

static void oa_collect_event(oa_req_t *r, oa_choice_t *c, const rt_event_t *ev)
{
    if (ev->text_len > 0 && !oa_buf_add(&c->text, ev->text, ev->text_len))
        tdm_log_warn(MOD, "request %s: out of memory collecting the answer", r->request_id);
    if (!r->want_logprobs || ev->n_tokens == 0 || ev->tokens == NULL)
        return;
    if (c->lp == NULL)
        c->lp = r->chat ? json_array() : oa_lp_completion_new();
    if (r->chat)
        oa_lp_chat_add(r, c->lp, ev->tokens, ev->n_tokens);
    else
        oa_lp_completion_add(r, c, c->lp, ev->tokens, ev->n_tokens);
}

static void oa_set_final(oa_req_t *r, unsigned status, char *body, size_t len)
{
    free(r->final_body);
    r->final_body = body;
    r->final_len = len;
    r->final_status = status;
}

static void oa_render_final(oa_req_t *r)
{
    json_t *choices = json_array();
    for (size_t i = 0; i < r->n_choices; i++) {
        oa_choice_t *c = &r->choices[i];
        json_t *text = oa_json_text(c->text.p != NULL ? c->text.p : "", c->text.len);
        json_t *lp = json_null();
        if (r->want_logprobs) {
            if (c->lp == NULL)
                c->lp = r->chat ? json_array() : oa_lp_completion_new();
            lp = r->chat ? json_pack("{s:O}", "content", c->lp) : json_incref(c->lp);
        }
        json_t *ch;
        if (r->chat)
            ch = json_pack("{s:I,s:{s:s,s:o*},s:o*,s:s}", "index", (json_int_t)i, "message", "role",
                           "assistant", "content", text, "logprobs", lp, "finish_reason",
                           oa_finish_str(c->finish));
        else
            ch = json_pack("{s:I,s:o*,s:o*,s:s}", "index", (json_int_t)i, "text", text, "logprobs",
                           lp, "finish_reason", oa_finish_str(c->finish));
        json_array_append_new(choices, ch);
    }
    json_t *o = json_pack("{s:s,s:s,s:I,s:s,s:o*,s:o*}", "id", r->id, "object",
                          r->chat ? "chat.completion" : "text_completion", "created",
                          (json_int_t)r->created, "model", r->model->name, "choices", choices,
                          "usage", oa_usage(r));
    char *s = o != NULL ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (s == NULL) {
        size_t len = 0;
        tdm_log_warn(MOD, "request %s: out of memory rendering the answer", r->request_id);
        char *e =
            oa_error_json("out of memory rendering the answer", "server_error", NULL, NULL, &len);
        oa_set_final(r, 500, e, len);
        return;
    }
    oa_set_final(r, 200, s, strlen(s));
}

/* One fewer choice (or the submission hold) running; the last one ends
 * the answer (r->lock held). */
static void oa_live_dec(oa_req_t *r)
{
    r->n_live--;
    if (r->n_live > 0 || r->fixed)
        return;
    r->fixed = true;
    if (r->stream) {
        if (r->include_usage) {
            json_t *o = oa_chunk_head(r);
            if (o != NULL) {
                json_object_set_new(o, "choices", json_array());
                json_object_set_new(o, "usage", oa_usage(r));
            }
            oa_sse_add(r, o);
        }
        oa_buf_add(&r->out, "data: [DONE]\n\n", 14);
        r->complete = true;
    } else {
        oa_render_final(r);
    }
}

/* The core's event callback (core thread). */
static void oa_on_event(void *user, const rt_event_t *ev)
{
    oa_choice_t *c = user;
    oa_req_t *r = c->req;
    rt_openai_t *s = r->s;
    uint64_t cancel[OA_MAX_CHOICES];
    size_t n_cancel = 0;
    bool final = ev->finish != TDM_FINISH_NONE;

    pthread_mutex_lock(&r->lock);
    c->n_prompt = ev->n_prompt;
    c->n_output = ev->n_output;
    c->n_cached = ev->n_cached;
    if (!r->fixed && !r->client_gone && !r->aborting) {
        if (ev->finish == TDM_FINISH_ERROR || ev->finish == TDM_FINISH_CANCELLED) {
            /* CANCELLED that the front end did not ask for: the router
             * gave the request up (e.g. draining) */
            int status = ev->finish == TDM_FINISH_ERROR ? ev->http_status : 503;
            if (status < 400 || status > 599)
                status = 500;
            const char *msg = ev->finish == TDM_FINISH_ERROR && ev->error != NULL
                                  ? ev->error
                                  : "the request was cancelled by the router; retry";
            oa_log_error(r, (unsigned)status, msg);
            size_t len = 0;
            char *body =
                oa_error_json(msg, status >= 500 ? "server_error" : "invalid_request_error", NULL,
                              oa_code_for_status(status), &len);
            if (r->stream && r->started) {
                if (body != NULL) {
                    oa_buf_add(&r->out, "data: ", 6);
                    oa_buf_add(&r->out, body, len);
                    oa_buf_add(&r->out, "\n\n", 2);
                }
                oa_buf_add(&r->out, "data: [DONE]\n\n", 14);
                free(body);
                r->complete = true;
            } else {
                oa_set_final(r, (unsigned)status, body, len);
            }
            r->fixed = true;
            c->live = false; /* not to be cancelled */
            n_cancel = oa_live_ids(r, cancel, OA_MAX_CHOICES);
        } else if (r->stream) {
            r->started = true;
            oa_stream_event(r, c, ev);
        } else {
            oa_collect_event(r, c, ev);
        }
    }
    if (final) {
        c->live = false;
        c->finish = ev->finish;
        oa_live_dec(r);
    }
    bool wake = r->final_body != NULL || (r->stream && r->started);
    if (wake && r->suspended && !r->mhd_done && !r->aborting) {
        r->suspended = false;
        MHD_resume_connection(r->conn);
    }
    int left = final ? --r->refs : r->refs;
    pthread_mutex_unlock(&r->lock);
    oa_cancel_ids(s, cancel, n_cancel);
    if (left == 0)
        oa_req_free(r);
}

/* ---- the stream reader (MHD threads) ---- */

static ssize_t oa_stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    oa_req_t *r = cls;
    pthread_mutex_lock(&r->lock);
    ssize_t ret;
    if (r->client_gone || r->aborting) {
        ret = MHD_CONTENT_READER_END_WITH_ERROR;
    } else if (r->out_off < r->out.len) {
        size_t n = r->out.len - r->out_off;
        if (n > max)
            n = max;
        memcpy(buf, r->out.p + r->out_off, n);
        r->out_off += n;
        if (r->out_off == r->out.len)
            r->out.len = r->out_off = 0;
        ret = (ssize_t)n;
    } else if (r->complete) {
        ret = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        /* nothing buffered: wait for the core (oa_on_event resumes) */
        r->suspended = true;
        MHD_suspend_connection(r->conn);
        ret = 0;
    }
    pthread_mutex_unlock(&r->lock);
    return ret;
}

static void oa_stream_free(void *cls)
{
    oa_req_unref(cls);
}

/* Queues what is ready, or suspends until the core has it (MHD thread,
 * access handler). The response is made and queued without r->lock:
 * libmicrohttpd holds a response's mutex while it calls the stream reader,
 * which takes r->lock. */
static enum MHD_Result oa_deliver(oa_req_t *r)
{
    pthread_mutex_lock(&r->lock);
    if (r->client_gone || r->aborting) {
        pthread_mutex_unlock(&r->lock);
        return MHD_NO;
    }
    if (r->final_body != NULL) {
        char *body = r->final_body;
        r->final_body = NULL;
        pthread_mutex_unlock(&r->lock);
        return oa_queue(r, r->final_status, OA_JSON, body, r->final_len);
    }
    if (!(r->stream && r->started)) {
        r->suspended = true;
        MHD_suspend_connection(r->conn);
        pthread_mutex_unlock(&r->lock);
        return MHD_YES;
    }
    r->refs++; /* the stream response's; dropped in oa_stream_free */
    pthread_mutex_unlock(&r->lock);
    struct MHD_Response *resp = MHD_create_response_from_callback(
        MHD_SIZE_UNKNOWN, OA_STREAM_BLOCK, oa_stream_read, r, oa_stream_free);
    if (resp == NULL) {
        oa_req_unref(r); /* MHD's reference is still held: r lives */
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, OA_SSE);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(resp, "X-Request-Id", r->request_id);
    r->status = MHD_HTTP_OK;
    r->phase = OA_PHASE_STREAM;
    enum MHD_Result ret = MHD_queue_response(r->conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* ---- request parsing ---- */

/* 0: absent or null; 1: a number in *out; -1: wrong type (error set). */
static int oa_get_num(json_t *root, const char *key, double *out, oa_err_t *e)
{
    json_t *v = json_object_get(root, key);
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_number(v)) {
        oa_bad(e, 400, key, NULL, "'%s' must be a number", key);
        return -1;
    }
    *out = json_number_value(v);
    return 1;
}

static int oa_get_int(json_t *root, const char *key, json_int_t *out, oa_err_t *e)
{
    json_t *v = json_object_get(root, key);
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_integer(v)) {
        oa_bad(e, 400, key, NULL, "'%s' must be an integer", key);
        return -1;
    }
    *out = json_integer_value(v);
    return 1;
}

static int oa_get_bool(json_t *root, const char *key, bool *out, oa_err_t *e)
{
    json_t *v = json_object_get(root, key);
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_boolean(v)) {
        oa_bad(e, 400, key, NULL, "'%s' must be a boolean", key);
        return -1;
    }
    *out = json_is_true(v);
    return 1;
}

static bool oa_range(oa_err_t *e, const char *key, double v, double lo, double hi, bool lo_open)
{
    if (v != v || v < lo || v > hi || (lo_open && v == lo))
        return oa_bad(e, 400, key, NULL, "'%s' must be in %s%g, %g], got %g", key,
                      lo_open ? "(" : "[", lo, hi, v);
    return true;
}

typedef struct oa_prompts {
    int32_t *ids[OA_MAX_CHOICES];
    size_t n_ids[OA_MAX_CHOICES];
    size_t n;
} oa_prompts_t;

static void oa_prompts_free(oa_prompts_t *p)
{
    for (size_t i = 0; i < p->n; i++)
        free(p->ids[i]);
    p->n = 0;
}

static bool oa_prompt_ids(const rt_model_info_t *m, json_t *arr, const char *param, oa_prompts_t *p,
                          oa_err_t *e)
{
    size_t n = json_array_size(arr);
    if (n == 0)
        return oa_bad(e, 400, param, NULL, "'%s' is an empty list of token ids", param);
    if (p->n == OA_MAX_CHOICES)
        return oa_bad(e, 400, "prompt", NULL, "at most %d prompts", OA_MAX_CHOICES);
    int32_t *ids = malloc(n * sizeof(int32_t));
    if (ids == NULL)
        return oa_bad(e, 500, NULL, NULL, "out of memory");
    int32_t n_vocab = tdm_tokenizer_n_vocab(m->tok);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= n_vocab) {
            free(ids);
            return oa_bad(e, 400, param, NULL,
                          "'%s' must hold token ids in 0..%d; item %zu is not one", param,
                          n_vocab - 1, i);
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    p->ids[p->n] = ids;
    p->n_ids[p->n++] = n;
    return true;
}

static bool oa_prompt_string(const rt_model_info_t *m, json_t *v, const char *param,
                             oa_prompts_t *p, oa_err_t *e)
{
    size_t len = json_string_length(v);
    if (len == 0)
        return oa_bad(e, 400, param, NULL, "'%s' is empty", param);
    if (p->n == OA_MAX_CHOICES)
        return oa_bad(e, 400, "prompt", NULL, "at most %d prompts", OA_MAX_CHOICES);
    char err[256] = "";
    tdm_status_t st = rt_prompt_text(m, json_string_value(v), len, &p->ids[p->n], &p->n_ids[p->n],
                                     err, sizeof(err));
    if (st != TDM_OK)
        return oa_bad(e, st == TDM_ERR_NOMEM ? 500 : 400, param, NULL, "%s", err);
    p->n++;
    if (p->n_ids[p->n - 1] == 0)
        return oa_bad(e, 400, param, NULL, "'%s' gives no tokens", param);
    return true;
}

/* "prompt": a string, a list of strings, a list of ids or a list of lists. */
static bool oa_parse_prompt(const rt_model_info_t *m, json_t *root, oa_prompts_t *p, oa_err_t *e)
{
    json_t *v = json_object_get(root, "prompt");
    if (v == NULL || json_is_null(v))
        return oa_bad(e, 400, "prompt", NULL, "'prompt' is required");
    if (json_is_string(v))
        return oa_prompt_string(m, v, "prompt", p, e);
    if (!json_is_array(v) || json_array_size(v) == 0)
        return oa_bad(e, 400, "prompt", NULL,
                      "'prompt' must be a string, a list of strings, a list of token ids or a "
                      "list of lists of token ids, and not empty");
    json_t *first = json_array_get(v, 0);
    if (json_is_integer(first))
        return oa_prompt_ids(m, v, "prompt", p, e);
    size_t i;
    json_t *item;
    json_array_foreach(v, i, item)
    {
        char param[64];
        snprintf(param, sizeof(param), "prompt[%zu]", i);
        if (json_is_string(first) && json_is_string(item)) {
            if (!oa_prompt_string(m, item, param, p, e))
                return false;
        } else if (json_is_array(first) && json_is_array(item)) {
            if (!oa_prompt_ids(m, item, param, p, e))
                return false;
        } else {
            return oa_bad(e, 400, param, NULL,
                          "'%s' must be of the same kind as prompt[0] (a string or a list of "
                          "token ids)",
                          param);
        }
    }
    return true;
}

/* "messages" to chat messages; content strings joined from text parts go
 * to owned[] (freed by the caller). */
static bool oa_parse_messages(json_t *root, tdm_chat_msg_t **msgs_out, size_t *n_out,
                              char ***owned_out, oa_err_t *e)
{
    json_t *arr = json_object_get(root, "messages");
    if (arr == NULL || json_is_null(arr))
        return oa_bad(e, 400, "messages", NULL, "'messages' is required");
    if (!json_is_array(arr) || json_array_size(arr) == 0)
        return oa_bad(e, 400, "messages", NULL, "'messages' must be a non-empty list");
    size_t n = json_array_size(arr);
    tdm_chat_msg_t *msgs = calloc(n, sizeof(*msgs));
    char **owned = calloc(n, sizeof(char *));
    if (msgs == NULL || owned == NULL) {
        free(msgs);
        free(owned);
        return oa_bad(e, 500, NULL, NULL, "out of memory");
    }
    *msgs_out = msgs;
    *owned_out = owned;
    *n_out = n;
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(arr, i);
        char param[80];
        if (!json_is_object(m)) {
            snprintf(param, sizeof(param), "messages[%zu]", i);
            return oa_bad(e, 400, param, NULL, "'%s' must be an object", param);
        }
        json_t *role = json_object_get(m, "role");
        if (!json_is_string(role)) {
            snprintf(param, sizeof(param), "messages[%zu].role", i);
            return oa_bad(e, 400, param, NULL, "'%s' must be a string", param);
        }
        msgs[i].role = json_string_value(role);
        json_t *content = json_object_get(m, "content");
        snprintf(param, sizeof(param), "messages[%zu].content", i);
        if (content == NULL || json_is_null(content)) {
            msgs[i].content = "";
        } else if (json_is_string(content)) {
            if (strlen(json_string_value(content)) != json_string_length(content))
                return oa_bad(e, 400, param, NULL, "'%s' holds a NUL character", param);
            msgs[i].content = json_string_value(content);
        } else if (json_is_array(content)) {
            oa_buf_t b = {0};
            size_t j;
            json_t *part;
            json_array_foreach(content, j, part)
            {
                json_t *type = json_object_get(part, "type");
                json_t *text = json_object_get(part, "text");
                if (!json_is_object(part) || !json_is_string(type) ||
                    strcmp(json_string_value(type), "text") != 0 || !json_is_string(text)) {
                    oa_buf_free(&b);
                    char pp[112];
                    snprintf(pp, sizeof(pp), "%s[%zu]", param, j);
                    return oa_bad(e, 400, pp, NULL,
                                  "'%s' must be {\"type\": \"text\", \"text\": ...}: only text "
                                  "parts are supported",
                                  pp);
                }
                if ((j > 0 && !oa_buf_add(&b, "\n", 1)) ||
                    !oa_buf_add(&b, json_string_value(text), strlen(json_string_value(text)))) {
                    oa_buf_free(&b);
                    return oa_bad(e, 500, NULL, NULL, "out of memory");
                }
            }
            owned[i] = b.p != NULL ? b.p : strdup("");
            if (owned[i] == NULL)
                return oa_bad(e, 500, NULL, NULL, "out of memory");
            msgs[i].content = owned[i];
        } else {
            return oa_bad(e, 400, param, NULL, "'%s' must be a string or a list of text parts",
                          param);
        }
    }
    return true;
}

static bool oa_chat_prompt(const rt_model_info_t *m, json_t *root, oa_prompts_t *p, oa_err_t *e)
{
    tdm_chat_msg_t *msgs = NULL;
    char **owned = NULL;
    size_t n = 0;
    bool ok = oa_parse_messages(root, &msgs, &n, &owned, e);
    if (ok) {
        char err[256] = "";
        tdm_status_t st = rt_prompt_chat(m, msgs, n, &p->ids[0], &p->n_ids[0], err, sizeof(err));
        if (st != TDM_OK)
            ok = oa_bad(e, st == TDM_ERR_NOMEM ? 500 : 400, "messages", NULL, "%s", err);
        else
            p->n = 1;
    }
    for (size_t i = 0; owned != NULL && i < n; i++)
        free(owned[i]);
    free(owned);
    free(msgs);
    return ok;
}

/* The model a body names: 404 model_not_found for an unknown one. */
static const rt_model_info_t *oa_model(rt_openai_t *s, json_t *root, oa_err_t *e)
{
    json_t *v = json_object_get(root, "model");
    if (v != NULL && !json_is_null(v) && !json_is_string(v)) {
        oa_bad(e, 400, "model", NULL, "'model' must be a string");
        return NULL;
    }
    const char *name = json_is_string(v) ? json_string_value(v) : NULL;
    const rt_model_info_t *m = rt_core_model(s->core, name);
    if (m == NULL) {
        oa_bad(e, 404, "model", "model_not_found", "The model `%s` does not exist.", name);
        return NULL;
    }
    return m;
}

/* Sampling and limits shared by both generation endpoints. */
static bool oa_parse_params(oa_req_t *r, json_t *root, rt_params_t *p, const char **stops,
                            int32_t *stop_ids, json_int_t *max_tokens, oa_err_t *e)
{
    double d;
    json_int_t k;
    int rc;
    tdm_sampling_params_default(&p->sampling);
    if ((rc = oa_get_num(root, "temperature", &d, e)) < 0)
        return false;
    if (rc > 0) {
        if (!oa_range(e, "temperature", d, 0, 2, false))
            return false;
        p->sampling.temperature = (float)d;
    }
    if ((rc = oa_get_num(root, "top_p", &d, e)) < 0)
        return false;
    if (rc > 0) {
        if (!oa_range(e, "top_p", d, 0, 1, true))
            return false;
        p->sampling.top_p = (float)d;
    }
    if ((rc = oa_get_num(root, "min_p", &d, e)) < 0)
        return false;
    if (rc > 0) {
        if (!oa_range(e, "min_p", d, 0, 1, false))
            return false;
        p->sampling.min_p = (float)d;
    }
    static const char *const pen[] = {"presence_penalty", "frequency_penalty"};
    for (int i = 0; i < 2; i++) {
        if ((rc = oa_get_num(root, pen[i], &d, e)) < 0)
            return false;
        if (rc > 0) {
            if (!oa_range(e, pen[i], d, -2, 2, false))
                return false;
            if (i == 0)
                p->sampling.presence_penalty = (float)d;
            else
                p->sampling.frequency_penalty = (float)d;
        }
    }
    if ((rc = oa_get_num(root, "repetition_penalty", &d, e)) < 0)
        return false;
    if (rc > 0) {
        if (!oa_range(e, "repetition_penalty", d, 0, 2, true))
            return false;
        p->sampling.repetition_penalty = (float)d;
    }
    if ((rc = oa_get_int(root, "top_k", &k, e)) < 0)
        return false;
    if (rc > 0) {
        if (k < -1 || k > INT32_MAX)
            return oa_bad(e, 400, "top_k", NULL, "'top_k' must be -1 (off), 0 (off) or more");
        p->sampling.top_k = k < 0 ? 0 : (int32_t)k;
    }
    if ((rc = oa_get_int(root, "seed", &k, e)) < 0)
        return false;
    if (rc > 0) {
        if (k < 0)
            return oa_bad(e, 400, "seed", NULL, "'seed' must be in 0..%lld, got %lld",
                          (long long)INT64_MAX, (long long)k);
        p->sampling.has_seed = true;
        p->sampling.seed = (uint64_t)k;
    }
    r->n = 1;
    if ((rc = oa_get_int(root, "n", &k, e)) < 0)
        return false;
    if (rc > 0) {
        if (k < 1 || k > OA_MAX_N)
            return oa_bad(e, 400, "n", NULL, "'n' must be in 1..%d, got %lld", OA_MAX_N,
                          (long long)k);
        r->n = (int)k;
    }
    /* best_of: OpenAI's server-side sampling of best_of candidates, of
     * which the n best are returned; at least n. Only best_of == n == 1
     * (or no best_of) is what tandem does. */
    if ((rc = oa_get_int(root, "best_of", &k, e)) < 0)
        return false;
    if (rc > 0) {
        if (k < r->n)
            return oa_bad(e, 400, "best_of", NULL, "'best_of' (%lld) must be at least 'n' (%d)",
                          (long long)k, r->n);
        if (k > 1)
            return oa_bad(e, 400, "best_of", NULL,
                          "'best_of' > 1 is not supported: tandem returns each choice as it was "
                          "sampled; ask for several with 'n' and pick on the client");
    }
    /* max_tokens: max_completion_tokens is OpenAI's newer name */
    *max_tokens = 0;
    static const char *const mt[] = {"max_tokens", "max_completion_tokens"};
    for (int i = 0; i < 2; i++) {
        if ((rc = oa_get_int(root, mt[i], &k, e)) < 0)
            return false;
        if (rc > 0) {
            if (k <= 0)
                return oa_bad(e, 400, mt[i], NULL, "'%s' must be at least 1, got %lld", mt[i],
                              (long long)k);
            *max_tokens = k;
        }
    }
    /* stop */
    json_t *stop = json_object_get(root, "stop");
    if (json_is_string(stop)) {
        if (json_string_length(stop) > 0)
            stops[p->n_stop++] = json_string_value(stop);
    } else if (json_is_array(stop)) {
        if (json_array_size(stop) > RT_MAX_STOP)
            return oa_bad(e, 400, "stop", NULL, "'stop' holds at most %d strings", RT_MAX_STOP);
        size_t i;
        json_t *v;
        json_array_foreach(stop, i, v)
        {
            if (!json_is_string(v))
                return oa_bad(e, 400, "stop", NULL, "'stop' must be a string or a list of strings");
            if (json_string_length(v) > 0)
                stops[p->n_stop++] = json_string_value(v);
        }
    } else if (stop != NULL && !json_is_null(stop)) {
        return oa_bad(e, 400, "stop", NULL, "'stop' must be a string or a list of strings");
    }
    p->stop = stops;
    json_t *sti = json_object_get(root, "stop_token_ids");
    if (json_is_array(sti)) {
        if (json_array_size(sti) > OA_MAX_STOP_TOKEN_IDS)
            return oa_bad(e, 400, "stop_token_ids", NULL, "'stop_token_ids' holds at most %d ids",
                          OA_MAX_STOP_TOKEN_IDS);
        int32_t n_vocab = tdm_tokenizer_n_vocab(r->model->tok);
        size_t i;
        json_t *v;
        json_array_foreach(sti, i, v)
        {
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) >= n_vocab)
                return oa_bad(e, 400, "stop_token_ids", NULL,
                              "'stop_token_ids' must be a list of token ids in 0..%d", n_vocab - 1);
            stop_ids[p->n_stop_token_ids++] = (int32_t)json_integer_value(v);
        }
    } else if (sti != NULL && !json_is_null(sti)) {
        return oa_bad(e, 400, "stop_token_ids", NULL, "'stop_token_ids' must be a list of ids");
    }
    p->stop_token_ids = stop_ids;
    bool b = false;
    if ((rc = oa_get_bool(root, "ignore_eos", &b, e)) < 0)
        return false;
    p->ignore_eos = b;
    b = false;
    if ((rc = oa_get_bool(root, "echo", &b, e)) < 0)
        return false;
    if (b)
        return oa_bad(e, 400, "echo", NULL, "'echo' is not supported");
    b = false;
    if ((rc = oa_get_bool(root, "stream", &b, e)) < 0)
        return false;
    r->stream = b;
    json_t *so = json_object_get(root, "stream_options");
    if (so != NULL && !json_is_null(so)) {
        if (!json_is_object(so))
            return oa_bad(e, 400, "stream_options", NULL, "'stream_options' must be an object");
        b = false;
        if ((rc = oa_get_bool(so, "include_usage", &b, e)) < 0) {
            snprintf(e->param, sizeof(e->param), "stream_options.include_usage");
            return false;
        }
        r->include_usage = b && r->stream;
    }
    /* logprobs: an integer (completions) or a boolean plus top_logprobs
     * (chat) */
    r->want_logprobs = false;
    r->top_logprobs = 0;
    if (r->chat) {
        if ((rc = oa_get_bool(root, "logprobs", &b, e)) < 0)
            return false;
        r->want_logprobs = rc > 0 && b;
        if ((rc = oa_get_int(root, "top_logprobs", &k, e)) < 0)
            return false;
        if (rc > 0) {
            if (k < 0 || k > RT_MAX_TOP_LOGPROBS)
                return oa_bad(e, 400, "top_logprobs", NULL, "'top_logprobs' must be in 0..%d",
                              RT_MAX_TOP_LOGPROBS);
            if (k > 0 && !r->want_logprobs)
                return oa_bad(e, 400, "top_logprobs", NULL,
                              "'top_logprobs' needs 'logprobs' set to true");
            r->top_logprobs = (int)k;
        }
    } else {
        if ((rc = oa_get_int(root, "logprobs", &k, e)) < 0)
            return false;
        if (rc > 0) {
            if (k < 0 || k > OA_MAX_COMPLETION_TOPS)
                return oa_bad(e, 400, "logprobs", NULL, "'logprobs' must be in 0..%d",
                              OA_MAX_COMPLETION_TOPS);
            r->want_logprobs = true;
            r->top_logprobs = (int)k;
        }
    }
    p->logprobs = r->want_logprobs;
    p->top_logprobs = r->top_logprobs;
    char err[256] = "";
    if (tdm_sampling_params_validate(&p->sampling, err, sizeof(err)) != TDM_OK)
        return oa_bad(e, 400, NULL, NULL, "%s", err);
    return true;
}

/* ---- endpoints ---- */

static void oa_cancel_all(oa_req_t *r)
{
    uint64_t ids[OA_MAX_CHOICES];
    pthread_mutex_lock(&r->lock);
    size_t n = oa_live_ids(r, ids, OA_MAX_CHOICES);
    pthread_mutex_unlock(&r->lock);
    oa_cancel_ids(r->s, ids, n);
}

static enum MHD_Result oa_generate(oa_req_t *r, json_t *root)
{
    rt_openai_t *s = r->s;
    oa_err_t e = {0};
    oa_prompts_t prompts = {0};
    const char *stops[RT_MAX_STOP];
    int32_t stop_ids[OA_MAX_STOP_TOKEN_IDS];
    json_int_t max_tokens = 0;
    rt_params_t p;
    memset(&p, 0, sizeof(p));

    r->model = oa_model(s, root, &e);
    if (r->model == NULL)
        return oa_reply_err(r, &e);
    if (!oa_parse_params(r, root, &p, stops, stop_ids, &max_tokens, &e))
        return oa_reply_err(r, &e);
    bool ok = r->chat ? oa_chat_prompt(r->model, root, &prompts, &e)
                      : oa_parse_prompt(r->model, root, &prompts, &e);
    if (!ok)
        goto err_reply;
    if (prompts.n * (size_t)r->n > OA_MAX_CHOICES) {
        oa_bad(&e, 400, "n", NULL, "prompts times n must be at most %d", OA_MAX_CHOICES);
        goto err_reply;
    }
    int32_t mml = r->model->max_model_len;
    const char *what = r->chat ? "messages" : "prompt";
    for (size_t i = 0; i < prompts.n; i++) {
        int64_t np = (int64_t)prompts.n_ids[i];
        if (max_tokens > 0 && np + max_tokens > mml) {
            oa_bad(&e, 400, what, NULL,
                   "This model's maximum context length is %d tokens. However, you requested "
                   "%lld tokens (%lld in the %s, %lld in the completion). Please reduce the "
                   "length of the %s or completion.",
                   mml, (long long)(np + max_tokens), (long long)np, what, (long long)max_tokens,
                   what);
            goto err_reply;
        }
        if (max_tokens == 0 && np >= mml) {
            oa_bad(&e, 400, what, NULL,
                   "This model's maximum context length is %d tokens. However, you requested "
                   "%lld tokens in the %s. Please reduce the length of the %s.",
                   mml, (long long)np, what, what);
            goto err_reply;
        }
    }

    r->n_choices = prompts.n * (size_t)r->n;
    r->choices = calloc(r->n_choices, sizeof(oa_choice_t));
    if (r->choices == NULL) {
        oa_bad(&e, 500, NULL, NULL, "out of memory");
        goto err_reply;
    }
    snprintf(r->id, sizeof(r->id), "%s", r->chat ? "chatcmpl-" : "cmpl-");
    oa_random_hex(r->id + strlen(r->id), 32);
    r->created = (int64_t)time(NULL);
    p.model = r->model->name;
    p.tier = r->tier;
    p.request_id = r->request_id;
    char client[INET6_ADDRSTRLEN];
    p.client = oa_client(r, client, sizeof(client));
    uint64_t seed = p.sampling.seed;
    size_t n_submitted = 0;
    /* a hold on n_live while submitting: a choice that ends before its
     * siblings are submitted must not end the answer */
    pthread_mutex_lock(&r->lock);
    r->n_live = 1;
    pthread_mutex_unlock(&r->lock);
    for (size_t i = 0; i < r->n_choices; i++) {
        oa_choice_t *c = &r->choices[i];
        size_t pi = i / (size_t)r->n, j = i % (size_t)r->n;
        c->req = r;
        p.prompt = prompts.ids[pi];
        p.n_prompt = prompts.n_ids[pi];
        p.max_tokens = max_tokens > 0 ? (int32_t)max_tokens : mml - (int32_t)prompts.n_ids[pi];
        p.sampling.seed = seed + j;
        pthread_mutex_lock(&r->lock);
        c->live = true;
        r->n_live++;
        r->refs++;
        pthread_mutex_unlock(&r->lock);
        char err[256] = "";
        uint64_t id = 0;
        tdm_status_t st = rt_core_submit(s->core, &p, oa_on_event, c, &id, err, sizeof(err));
        if (st != TDM_OK) {
            pthread_mutex_lock(&r->lock);
            c->live = false;
            r->n_live -= 2; /* this choice and the hold */
            r->refs--;
            r->fixed = true; /* events of those already submitted are only counted */
            pthread_mutex_unlock(&r->lock);
            oa_cancel_all(r);
            if (st == TDM_ERR_INVALID)
                oa_bad(&e, 400, NULL, NULL, "%s", err);
            else if (st == TDM_ERR_BUSY)
                oa_bad(&e, 429, NULL, "rate_limit_exceeded", "%s", err[0] ? err : "busy; retry");
            else if (st == TDM_ERR_CANCELLED || st == TDM_ERR_NOMEM)
                oa_bad(&e, 503, NULL, "service_unavailable", "%s", err[0] ? err : "busy; retry");
            else
                oa_bad(&e, 500, NULL, NULL, "cannot queue the request: %s",
                       err[0] ? err : tdm_status_str(st));
            goto err_reply;
        }
        pthread_mutex_lock(&r->lock);
        if (c->live)
            c->core_id = id;
        pthread_mutex_unlock(&r->lock);
        n_submitted++;
    }
    oa_prompts_free(&prompts);
    tdm_log_debug(MOD, "request %s: %zu choice(s) submitted (%s, %s)", r->request_id, n_submitted,
                  r->model->name, r->stream ? "stream" : "whole");

    pthread_mutex_lock(&r->lock);
    oa_live_dec(r); /* the hold */
    r->phase = OA_PHASE_WAIT;
    bool gone = r->client_gone || r->aborting; /* stop ran meanwhile */
    pthread_mutex_unlock(&r->lock);
    if (gone)
        oa_cancel_all(r);
    return oa_deliver(r);

err_reply:
    oa_prompts_free(&prompts);
    return oa_reply_err(r, &e);
}

static enum MHD_Result oa_models(oa_req_t *r)
{
    const rt_model_info_t *ms[OA_MAX_MODELS];
    size_t n = rt_core_models(r->s->core, ms, OA_MAX_MODELS);
    if (n > OA_MAX_MODELS)
        n = OA_MAX_MODELS;
    json_t *data = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(
            data, json_pack("{s:s,s:s,s:I,s:s,s:s,s:I}", "id", ms[i]->name, "object", "model",
                            "created", (json_int_t)ms[i]->created, "owned_by", "tandem", "root",
                            ms[i]->name, "max_model_len", (json_int_t)ms[i]->max_model_len));
    return oa_reply_json(r, 200, json_pack("{s:s,s:o}", "object", "list", "data", data));
}

static enum MHD_Result oa_tokenize(oa_req_t *r, json_t *root)
{
    oa_err_t e = {0};
    oa_prompts_t p = {0};
    const rt_model_info_t *m = oa_model(r->s, root, &e);
    if (m == NULL)
        return oa_reply_err(r, &e);
    r->model = m;
    bool add_special = true;
    if (oa_get_bool(root, "add_special_tokens", &add_special, &e) < 0)
        return oa_reply_err(r, &e);
    json_t *prompt = json_object_get(root, "prompt");
    bool ok;
    if (json_object_get(root, "messages") != NULL) {
        ok = oa_chat_prompt(m, root, &p, &e);
    } else if (json_is_string(prompt)) {
        char err[256] = "";
        tdm_status_t st = rt_prompt_text(m, json_string_value(prompt), json_string_length(prompt),
                                         &p.ids[0], &p.n_ids[0], err, sizeof(err));
        ok = st == TDM_OK ? true
                          : oa_bad(&e, st == TDM_ERR_NOMEM ? 500 : 400, "prompt", NULL, "%s", err);
        if (ok) {
            p.n = 1;
            int32_t bos = tdm_tokenizer_bos(m->tok);
            if (!add_special && p.n_ids[0] > 0 && p.ids[0][0] == bos &&
                tdm_tokenizer_add_bos(m->tok)) {
                memmove(p.ids[0], p.ids[0] + 1, (p.n_ids[0] - 1) * sizeof(int32_t));
                p.n_ids[0]--;
            }
        }
    } else {
        ok = oa_bad(&e, 400, "prompt", NULL, "'prompt' (a string) or 'messages' is required");
    }
    if (!ok) {
        oa_prompts_free(&p);
        return oa_reply_err(r, &e);
    }
    json_t *tokens = json_array();
    for (size_t i = 0; i < p.n_ids[0]; i++)
        json_array_append_new(tokens, json_integer(p.ids[0][i]));
    json_t *o = json_pack("{s:I,s:I,s:o}", "count", (json_int_t)p.n_ids[0], "max_model_len",
                          (json_int_t)m->max_model_len, "tokens", tokens);
    oa_prompts_free(&p);
    return oa_reply_json(r, 200, o);
}

static enum MHD_Result oa_detokenize(oa_req_t *r, json_t *root)
{
    oa_err_t e = {0};
    oa_prompts_t p = {0};
    const rt_model_info_t *m = oa_model(r->s, root, &e);
    if (m == NULL)
        return oa_reply_err(r, &e);
    json_t *tokens = json_object_get(root, "tokens");
    if (!json_is_array(tokens))
        return oa_fail(r, 400, "tokens", NULL, "'tokens' must be a list of token ids");
    size_t n = json_array_size(tokens);
    char *text = NULL;
    size_t len = 0;
    if (n > 0) {
        if (!oa_prompt_ids(m, tokens, "tokens", &p, &e))
            return oa_reply_err(r, &e);
        size_t cap = n * 16 + 16;
        for (int tries = 0; tries < 2; tries++) {
            text = malloc(cap);
            if (text == NULL)
                break;
            tdm_status_t st =
                tdm_tokenizer_decode(m->tok, p.ids[0], p.n_ids[0], true, text, cap, &len);
            if (st == TDM_OK)
                break;
            free(text);
            text = NULL;
            if (st != TDM_ERR_NOMEM)
                break;
            cap = len + 1;
        }
        oa_prompts_free(&p);
        if (text == NULL)
            return oa_fail(r, 500, NULL, NULL, "cannot decode the tokens");
    }
    json_t *o = json_pack("{s:o*}", "prompt", oa_json_text(text != NULL ? text : "", len));
    free(text);
    return oa_reply_json(r, 200, o);
}

/* The body is complete: parse and dispatch. */
static enum MHD_Result oa_handle_body(oa_req_t *r)
{
    size_t bad = 0;
    const char *body = r->body.p != NULL ? r->body.p : "";
    if (!rt_utf8_valid(body, r->body.len, &bad))
        return oa_fail(r, 400, NULL, NULL, "the request body is not valid UTF-8 (at byte %zu)",
                       bad);
    json_error_t jerr;
    json_t *root = json_loadb(body, r->body.len, 0, &jerr);
    if (root == NULL)
        return oa_fail(r, 400, NULL, NULL,
                       "the request body is not valid JSON: %s (line %d, column %d)", jerr.text,
                       jerr.line, jerr.column);
    if (!json_is_object(root)) {
        json_decref(root);
        return oa_fail(r, 400, NULL, NULL, "the request body must be a JSON object");
    }
    enum MHD_Result ret;
    switch (r->route) {
    case OA_ROUTE_COMPLETIONS:
    case OA_ROUTE_CHAT:
        r->chat = r->route == OA_ROUTE_CHAT;
        ret = oa_generate(r, root);
        break;
    case OA_ROUTE_TOKENIZE: ret = oa_tokenize(r, root); break;
    case OA_ROUTE_DETOKENIZE: ret = oa_detokenize(r, root); break;
    default: ret = oa_fail(r, 500, NULL, NULL, "no handler for %s", r->url); break;
    }
    json_decref(root);
    return ret;
}

static enum MHD_Result oa_handle_get(oa_req_t *r)
{
    rt_openai_t *s = r->s;
    switch (r->route) {
    case OA_ROUTE_MODELS: return oa_models(r);
    case OA_ROUTE_HEALTH: return oa_queue(r, 200, OA_JSON, NULL, 0);
    case OA_ROUTE_READY: {
        char reason[256] = "";
        if (rt_core_ready(s->core, reason, sizeof(reason)))
            return oa_queue(r, 200, OA_JSON, NULL, 0);
        reason[sizeof(reason) - 1] = '\0';
        return oa_fail(r, 503, NULL, "service_unavailable", "not ready: %s", reason);
    }
    case OA_ROUTE_METRICS: {
        if (s->registry == NULL)
            return oa_fail(r, 404, NULL, NULL, "no metrics on this server");
        char *text = NULL;
        size_t len = 0;
        if (tdm_metrics_registry_render(s->registry, &text, &len) != TDM_OK)
            return oa_fail(r, 500, NULL, NULL, "cannot render the metrics");
        return oa_queue(r, 200, TDM_METRICS_CONTENT_TYPE, text, len);
    }
    default: return oa_fail(r, 500, NULL, NULL, "no handler for %s", r->url);
    }
}

static bool oa_auth_ok(const rt_openai_t *s, struct MHD_Connection *conn)
{
    if (s->api_key == NULL)
        return true;
    return tdm_bearer_matches(
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION),
        s->api_key);
}

static oa_req_t *oa_req_create(rt_openai_t *s, struct MHD_Connection *conn, const char *url,
                               const char *method)
{
    oa_req_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->url = strdup(url);
    if (r->url == NULL) {
        free(r);
        return NULL;
    }
    pthread_mutex_init(&r->lock, NULL);
    r->s = s;
    r->conn = conn;
    r->refs = 1; /* MHD's, dropped in oa_completed */
    r->start_ms = tdm_net_now_ms();
    snprintf(r->method, sizeof(r->method), "%s", method);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    r->fd = ci != NULL ? ci->connect_fd : -1;
    const char *rid = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Request-Id");
    if (rid != NULL && oa_printable(rid, OA_REQUEST_ID_MAX)) {
        snprintf(r->request_id, sizeof(r->request_id), "%s", rid);
    } else {
        memcpy(r->request_id, "req-", 4);
        oa_random_hex(r->request_id + 4, 24);
    }
    /* any value: the core refuses one that names no pool (400) */
    const char *tier = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "x-model-tier");
    if (tier != NULL && tier[0] != '\0')
        r->tier = strdup(tier);

    pthread_mutex_lock(&s->lock);
    r->aborting = s->stopping;
    r->next = s->reqs;
    if (s->reqs != NULL)
        s->reqs->prev = r;
    s->reqs = r;
    s->n_reqs++;
    pthread_mutex_unlock(&s->lock);
    return r;
}

/* libmicrohttpd's access handler. */
static enum MHD_Result oa_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **con_cls)
{
    (void)version;
    rt_openai_t *s = cls;
    oa_req_t *r = *con_cls;
    if (r == NULL) {
        bool has_body =
            strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0;
        tdm_http_guard_headers(s->guard, conn, has_body);
        r = oa_req_create(s, conn, url, method);
        if (r == NULL) {
            tdm_log_warn(MOD, "out of memory for a request to %s; connection closed", url);
            return MHD_NO;
        }
        *con_cls = r;
        if (r->aborting)
            return oa_fail(r, 503, NULL, "service_unavailable", "the server is stopping");
        bool is_get =
            strcmp(method, MHD_HTTP_METHOD_GET) == 0 || strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
        bool is_post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
        for (size_t i = 0; i < sizeof(oa_routes) / sizeof(oa_routes[0]); i++)
            if (strcmp(url, oa_routes[i].path) == 0) {
                r->route = oa_routes[i].route;
                r->is_post = oa_routes[i].post;
            }
        if (r->route == OA_ROUTE_NONE)
            return oa_fail(r, 404, NULL, NULL, "Invalid URL (%s %s)", method, url);
        bool open_route = r->route == OA_ROUTE_HEALTH || r->route == OA_ROUTE_READY ||
                          r->route == OA_ROUTE_METRICS;
        if (!open_route && !oa_auth_ok(s, conn))
            return oa_fail(r, 401, NULL, "invalid_api_key",
                           "Incorrect or missing API key: send \"Authorization: Bearer KEY\"");
        if (r->is_post ? !is_post : !is_get)
            return oa_fail(r, 405, NULL, NULL, "Method %s is not allowed on %s (use %s)", method,
                           url, r->is_post ? "POST" : "GET");
        if (!r->is_post)
            return oa_handle_get(r);
        const char *ct =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
        if (ct != NULL) {
            while (*ct == ' ')
                ct++;
            size_t jl = strlen(OA_JSON);
            if (strncasecmp(ct, OA_JSON, jl) != 0 ||
                (ct[jl] != '\0' && ct[jl] != ';' && ct[jl] != ' '))
                return oa_fail(r, 415, NULL, NULL,
                               "Content-Type must be application/json, got \"%.64s\"", ct);
        }
        r->max_body = r->route == OA_ROUTE_TOKENIZE || r->route == OA_ROUTE_DETOKENIZE
                          ? s->max_body_tokenize
                          : s->max_body;
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl != NULL && strtoull(cl, NULL, 10) > r->max_body)
            return oa_fail(r, 413, NULL, NULL,
                           "the request body (%.24s bytes) is over the limit of %zu bytes for %s",
                           cl, r->max_body, url);
        r->phase = OA_PHASE_BODY;
        return MHD_YES;
    }

    if (r->phase == OA_PHASE_BODY) {
        if (*upload_data_size > 0) {
            size_t n = *upload_data_size;
            *upload_data_size = 0;
            tdm_http_guard_body(s->guard, conn, n);
            if (r->body_over || r->body.len + n > r->max_body) {
                /* a body without Content-Length over the limit: read on and
                 * drop it (libmicrohttpd cannot answer mid-body), answer 413
                 * at its end; close the connection if it goes on and on */
                r->body_over = true;
                r->body_dropped += n;
                oa_buf_free(&r->body);
                if (r->body_dropped > OA_MAX_DROPPED_BODIES * r->max_body) {
                    tdm_log_info(MOD,
                                 "%s %s (request %s): a body of more than %zu bytes is still "
                                 "coming; connection closed",
                                 r->method, r->url, r->request_id, r->body_dropped);
                    return MHD_NO;
                }
                return MHD_YES;
            }
            if (!oa_buf_add(&r->body, upload_data, n))
                return oa_fail(r, 500, NULL, NULL, "out of memory reading the body");
            return MHD_YES;
        }
        r->phase = OA_PHASE_WAIT;
        tdm_http_guard_active(s->guard, conn);
        if (r->body_over)
            return oa_fail(r, 413, NULL, NULL,
                           "the request body is over the limit of %zu bytes for %s", r->max_body,
                           r->url);
        return oa_handle_body(r);
    }
    if (r->phase == OA_PHASE_DONE || r->phase == OA_PHASE_STREAM) {
        /* body after an early answer: dropped (the guard still times it) */
        tdm_http_guard_body(s->guard, conn, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    /* resumed */
    return oa_deliver(r);
}

/* libmicrohttpd: the request ended (answered, failed, or the client left). */
static void oa_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    rt_openai_t *s = cls;
    tdm_http_guard_request_done(s->guard, conn);
    oa_req_t *r = *con_cls;
    if (r == NULL)
        return;
    *con_cls = NULL;
    uint64_t ids[OA_MAX_CHOICES];
    pthread_mutex_lock(&r->lock);
    r->mhd_done = true;
    r->suspended = false;
    size_t n = oa_live_ids(r, ids, OA_MAX_CHOICES);
    if (n > 0 && !r->client_gone && !r->aborting) {
        r->client_gone = true;
        tdm_log_info(MOD,
                     "request %s: the connection ended (libmicrohttpd code %d) before the "
                     "answer; %zu core request(s) cancelled",
                     r->request_id, (int)toe, n);
    }
    tdm_log_debug(MOD, "%s %s %u %" PRId64 " ms (request %s)", r->method, r->url, r->status,
                  tdm_net_now_ms() - r->start_ms, r->request_id);
    pthread_mutex_unlock(&r->lock);
    oa_cancel_ids(r->s, ids, n);
    oa_req_unref(r);
}

/* ---- the watchdog: disconnects of suspended connections ---- */

static bool oa_peer_closed(int fd)
{
    char b;
    ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0)
        return true;
    return n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

static void *oa_watchdog(void *arg)
{
    rt_openai_t *s = arg;
    enum { CAP = 512 };
    uint64_t *ids = malloc(CAP * sizeof(uint64_t));
    pthread_mutex_lock(&s->lock);
    while (!s->stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += OA_WATCH_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&s->cond, &s->lock, &ts);
        if (s->stopping || ids == NULL)
            continue;
        size_t n = 0;
        for (oa_req_t *r = s->reqs; r != NULL && n + OA_MAX_CHOICES <= CAP; r = r->next) {
            pthread_mutex_lock(&r->lock);
            if (r->suspended && !r->client_gone && r->fd >= 0 && oa_peer_closed(r->fd)) {
                r->client_gone = true;
                size_t k = oa_live_ids(r, ids + n, OA_MAX_CHOICES);
                n += k;
                tdm_log_info(MOD,
                             "request %s: the client closed the connection; %zu core "
                             "request(s) cancelled",
                             r->request_id, k);
                r->suspended = false;
                MHD_resume_connection(r->conn);
            }
            pthread_mutex_unlock(&r->lock);
        }
        if (n > 0) {
            pthread_mutex_unlock(&s->lock);
            oa_cancel_ids(s, ids, n);
            pthread_mutex_lock(&s->lock);
        }
    }
    pthread_mutex_unlock(&s->lock);
    free(ids);
    return NULL;
}

/* ---- life cycle ---- */

tdm_status_t rt_openai_start(rt_core_t *core, const rt_openai_config_t *cfg, rt_openai_t **out)
{
    if (core == NULL || cfg == NULL || cfg->port < 0 || cfg->port > 65535) {
        tdm_log_error(MOD, "rt_openai_start: a core and a port in 0..65535 are needed (port %d)",
                      cfg != NULL ? cfg->port : -1);
        return TDM_ERR_INVALID;
    }
    tdm_status_t st = TDM_ERR_NOMEM;
    rt_openai_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return TDM_ERR_NOMEM;
    s->core = core;
    s->host = strdup(cfg->host != NULL && cfg->host[0] != '\0' ? cfg->host : OA_DEFAULT_HOST);
    if (s->host == NULL)
        goto err_free_server;
    if (cfg->api_key != NULL && cfg->api_key[0] != '\0') {
        s->api_key = strdup(cfg->api_key);
        if (s->api_key == NULL)
            goto err_free_host;
    }
    s->max_body = cfg->max_body_bytes != 0 ? cfg->max_body_bytes : OA_DEFAULT_MAX_BODY;
    /* /tokenize and /detokenize: what the longest model's context needs */
    const rt_model_info_t *ms[OA_MAX_MODELS];
    size_t n_models = rt_core_models(core, ms, OA_MAX_MODELS);
    size_t tok_body = OA_TOKENIZE_MIN_BODY;
    for (size_t i = 0; i < n_models && i < OA_MAX_MODELS; i++)
        if (ms[i]->max_model_len > 0 &&
            (size_t)ms[i]->max_model_len * OA_TOKENIZE_BYTES_PER > tok_body)
            tok_body = (size_t)ms[i]->max_model_len * OA_TOKENIZE_BYTES_PER;
    s->max_body_tokenize = tok_body < s->max_body ? tok_body : s->max_body;
    s->max_conn = cfg->max_connections != 0 ? cfg->max_connections : OA_DEFAULT_MAX_CONN;
    s->max_per_ip = cfg->max_connections_per_ip;
    s->header_timeout_s = cfg->header_timeout_s != 0 ? cfg->header_timeout_s : OA_DEFAULT_HEADER_S;
    s->timeout_s = cfg->timeout_s != 0 ? cfg->timeout_s : OA_DEFAULT_TIMEOUT_S;
    s->registry = cfg->registry;
    pthread_mutex_init(&s->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);

    tdm_http_guard_config_t gc = {.max_connections = s->max_conn,
                                  .max_connections_per_ip = s->max_per_ip,
                                  .header_timeout_ms = s->header_timeout_s * 1000,
                                  .name = "OpenAI API",
                                  .registry = s->registry,
                                  .metrics_prefix = "tandem_router_http"};
    st = tdm_http_guard_create(&gc, &s->guard);
    if (st != TDM_OK)
        goto err_destroy_sync;
    int fd = -1, port = 0;
    st = tdm_http_listen_socket(s->host, cfg->port, "--port", OA_LISTEN_BACKLOG, &fd, &port);
    if (st != TDM_OK)
        goto err_destroy_guard;
    unsigned threads = OA_POOL_THREADS;
    if (s->max_conn < threads)
        threads = 1;
    struct MHD_OptionItem guard_opts[TDM_HTTP_GUARD_OPTIONS];
    tdm_http_guard_options(s->guard, guard_opts);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG | MHD_ALLOW_SUSPEND_RESUME;
    flags |= MHD_is_feature_supported(MHD_FEATURE_EPOLL) == MHD_YES ? MHD_USE_EPOLL : MHD_USE_POLL;
    s->daemon = MHD_start_daemon(
        flags, 0, NULL, NULL, oa_access, s, MHD_OPTION_ARRAY, guard_opts, MHD_OPTION_LISTEN_SOCKET,
        (MHD_socket)fd, MHD_OPTION_CONNECTION_TIMEOUT, s->timeout_s, MHD_OPTION_NOTIFY_COMPLETED,
        oa_completed, s, MHD_OPTION_THREAD_POOL_SIZE, threads, MHD_OPTION_END);
    if (s->daemon == NULL) {
        tdm_log_error(MOD,
                      "cannot start the API server on %s:%d (libmicrohttpd refused; see its "
                      "message above)",
                      s->host, port);
        close(fd);
        st = TDM_ERR_IO;
        goto err_destroy_guard;
    }
    s->port = port;
    if (pthread_create(&s->watchdog, NULL, oa_watchdog, s) != 0) {
        tdm_log_error(MOD, "cannot start the API server's watchdog thread");
        st = TDM_ERR_INTERNAL;
        goto err_stop_daemon;
    }
    s->watchdog_started = true;
    char per_ip[32] = "no limit";
    if (s->max_per_ip > 0)
        snprintf(per_ip, sizeof(per_ip), "%u", s->max_per_ip);
    tdm_log_info(MOD,
                 "OpenAI API on http://%s:%d (%s, body limit %zu bytes, %zu for /tokenize and "
                 "/detokenize, %u connections before the oldest idle one is closed, %s per "
                 "address, headers within %u s, idle timeout %u s)",
                 s->host, port, s->api_key != NULL ? "API key required" : "no API key", s->max_body,
                 s->max_body_tokenize, s->max_conn, per_ip, s->header_timeout_s, s->timeout_s);
    *out = s;
    return TDM_OK;

err_stop_daemon:
    MHD_stop_daemon(s->daemon);
err_destroy_guard:
    tdm_http_guard_destroy(s->guard);
err_destroy_sync:
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    free(s->api_key);
err_free_host:
    free(s->host);
err_free_server:
    free(s);
    return st;
}

int rt_openai_port(const rt_openai_t *s)
{
    return s != NULL ? s->port : 0;
}

void rt_openai_guard_stats(rt_openai_t *s, tdm_http_guard_stats_t *out)
{
    tdm_http_guard_stats(s->guard, out);
}

size_t rt_openai_active(rt_openai_t *s)
{
    if (s == NULL)
        return 0;
    pthread_mutex_lock(&s->lock);
    size_t n = s->n_reqs;
    pthread_mutex_unlock(&s->lock);
    return n;
}

void rt_openai_stop(rt_openai_t *s)
{
    if (s == NULL)
        return;
    /* 1. no request suspends again; every suspended one is resumed */
    pthread_mutex_lock(&s->lock);
    s->stopping = true;
    size_t cap = 0, n = 0;
    for (oa_req_t *r = s->reqs; r != NULL; r = r->next)
        cap += OA_MAX_CHOICES;
    uint64_t *ids = cap > 0 ? malloc(cap * sizeof(uint64_t)) : NULL;
    for (oa_req_t *r = s->reqs; r != NULL; r = r->next) {
        pthread_mutex_lock(&r->lock);
        r->aborting = true;
        if (ids != NULL)
            n += oa_live_ids(r, ids + n, OA_MAX_CHOICES);
        if (r->suspended && !r->mhd_done) {
            r->suspended = false;
            MHD_resume_connection(r->conn);
        }
        pthread_mutex_unlock(&r->lock);
    }
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    /* 2. the core stops them */
    oa_cancel_ids(s, ids, n);
    free(ids);
    if (s->watchdog_started)
        pthread_join(s->watchdog, NULL);
    /* 3. connections closed, MHD's threads joined */
    MHD_stop_daemon(s->daemon);
    tdm_http_guard_destroy(s->guard);
    s->guard = NULL;
    /* 4. the core's final events free what is left */
    pthread_mutex_lock(&s->lock);
    int64_t until = tdm_net_now_ms() + OA_STOP_WAIT_MS;
    while (s->n_reqs > 0 && tdm_net_now_ms() < until) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += 20 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&s->cond, &s->lock, &ts);
    }
    size_t left = s->n_reqs;
    pthread_mutex_unlock(&s->lock);
    if (left > 0) {
        /* the core never sent their final events: leak them rather than
         * free what its thread may still touch */
        tdm_log_warn(MOD,
                     "API server stopped with %zu request(s) the core did not finish in %d "
                     "ms; their memory is left",
                     left, OA_STOP_WAIT_MS);
        return;
    }
    tdm_log_info(MOD, "OpenAI API on %s:%d stopped", s->host, s->port);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    free(s->api_key);
    free(s->host);
    free(s);
}
