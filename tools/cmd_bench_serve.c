/* tandem bench serve: load against an OpenAI-compatible server (the
 * router), streaming, with the figures serving benchmarks report.
 *
 * Requests: POST /v1/chat/completions (or /v1/completions with --api
 * completions), "stream": true and "stream_options": {"include_usage":
 * true}; the SSE stream is read as it arrives ("data: " lines up to
 * "data: [DONE]").
 *
 * Prompts (--prompts), built from a fixed word list and --seed, so two
 * runs with the same flags send the same bytes:
 *   shared  one ~600-word system prompt for every request + a short
 *           distinct question (the prefix cache's best case);
 *   unique  a distinct ~600-word system prompt per request + a short
 *           question (same lengths, nothing shared);
 *   mix     half 1,000-word documents to summarize, half short chats
 *           (drawn per request from the seed).
 * Prompts differ between levels, so a level never hits what an earlier
 * level cached, except the shared system prompt.
 *
 * Modes: closed loop, one level per --concurrency value (N clients, each
 * sending its next request when the last one ended) for --requests
 * requests or --duration seconds; open loop, one level per --rate value:
 * --requests arrivals at exponential gaps (Poisson, from the seed), at
 * most 256 in flight (arrivals beyond are dropped and counted).
 *
 * Per request: TTFT = request sent -> first content chunk; ITL = the gaps
 * between content chunks (a chunk may carry several tokens; the gaps are
 * per chunk, as vLLM's benchmark measures them); E2E = sent -> end of the
 * stream; output tokens = usage.completion_tokens, else the content chunks.
 * Per level: p50/p99 of each; output tok/s = output tokens of the
 * successful requests / the level's wall time; requests/s likewise;
 * failures by kind (http status, api error in the stream, connect, timeout,
 * broken stream). Every request is bounded by --timeout seconds.
 *
 * --json prints the results as JSON on stdout (instead of the table),
 * --json-file FILE writes them to FILE; --svg FILE plots output tok/s
 * against p99 ITL and p99 TTFT, one point per level; --compare A.json,B.json
 * --svg FILE only plots earlier runs' JSON files, one line per run. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "httpc.h"
#include "tandem/log.h"
#include "tool.h"

#define MOD "bench"

#define SV_MAX_LEVELS      16
#define SV_MAX_IN_FLIGHT   256        /* open loop */
#define SV_LINE_MAX        (64 << 10) /* one SSE line */
#define SV_BODY_MAX        (64 << 10) /* one request body */
#define SV_DEFAULT_DUR_CAP 10000      /* requests per level with --duration */
#define SV_SYSTEM_WORDS    600
#define SV_DOC_WORDS       1000
#define SV_QUESTION_WORDS  12
#define SV_MAX_SERIES      8

typedef enum sv_prompts {
    SV_PROMPTS_SHARED = 0,
    SV_PROMPTS_UNIQUE = 1,
    SV_PROMPTS_MIX = 2,
} sv_prompts_t;

typedef enum sv_err {
    SV_ERR_NONE = 0,
    SV_ERR_HTTP = 1,    /* a status other than 200 */
    SV_ERR_API = 2,     /* an error object in the stream */
    SV_ERR_CONNECT = 3, /* no response at all */
    SV_ERR_TIMEOUT = 4, /* --timeout passed */
    SV_ERR_STREAM = 5,  /* cut, malformed, or no [DONE] */
    SV_ERR_N = 6,
} sv_err_t;

static const char *const sv_err_names[SV_ERR_N] = {"none",    "http",    "api",
                                                   "connect", "timeout", "stream"};

/* Flags and what they resolve to. */
typedef struct sv_opts {
    const char *url, *model, *api_key, *api, *prompts_s, *conc_s, *rate_s;
    const char *json_file, *svg, *label, *compare;
    int requests, max_tokens;
    float temperature, duration, timeout;
    uint64_t seed;
    bool json, requests_set;
    /* resolved */
    char host[256], path[512];
    int port;
    bool chat;
    sv_prompts_t prompts;
    int n_levels;
    double levels[SV_MAX_LEVELS]; /* concurrencies or rates */
    bool open_loop;
} sv_opts_t;

/* One request's record. Written by the thread that runs it; read by the
 * main thread after that thread is joined. */
typedef struct sv_req {
    bool ran;
    sv_err_t err;
    double t_send, t_first, t_last, t_end; /* tool_now() seconds */
    int n_chunks;                          /* content chunks */
    int n_gaps;                            /* gaps kept in gaps[] */
    float *gaps;                           /* ms; room for gaps_cap */
    int gaps_cap;
    long usage_out, usage_prompt, usage_cached; /* -1: not reported */
    char msg[160];                              /* the error */
    pthread_t thread;                           /* open loop */
} sv_req_t;

/* A level: its requests and, once run, its figures. */
typedef struct sv_stat {
    double p50, p99, mean; /* ms; NAN when no sample */
} sv_stat_t;

typedef struct sv_level {
    double x; /* concurrency or rate */
    int n_req, ok, failed, dropped;
    int errs[SV_ERR_N];
    double wall_s, tok_s, req_s;
    long out_tokens, chunks, prompt_tokens, cached_tokens;
    sv_stat_t ttft, itl, e2e;
} sv_level_t;

/* What a worker thread needs; one per closed-loop worker or open-loop
 * request. */
typedef struct sv_run sv_run_t;
typedef struct sv_worker {
    sv_run_t *run;
    sv_req_t *req; /* the request being run */
    int req_idx;
    char *body; /* SV_BODY_MAX */
    char *line; /* SV_LINE_MAX + 1: the SSE line being read */
    size_t line_len;
    char raw[256]; /* the body's first bytes (error responses) */
    size_t raw_len;
    bool done_seen, stop, api_error, bad_line;
} sv_worker_t;

struct sv_run {
    const sv_opts_t *o;
    int level_idx;
    sv_req_t *reqs;
    int cap;            /* requests of the level at most */
    atomic_int next;    /* closed loop: the next request index */
    atomic_int done;    /* requests finished */
    atomic_int running; /* closed loop workers / open loop requests in flight */
    double t_stop;      /* closed loop with --duration: no new request after */
    char headers[1024];
};

/* ---- a small JSON reader: finds one value by a path of keys/indices ---- */

static const char *js_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'))
        p++;
    return p;
}

/* p at '"': just past the closing quote, or NULL. */
static const char *js_string_end(const char *p, const char *e)
{
    for (p++; p < e; p++) {
        if (*p == '\\') {
            p++;
            continue;
        }
        if (*p == '"')
            return p + 1;
    }
    return NULL;
}

/* Past one value starting at p (after spaces), or NULL when malformed. */
static const char *js_skip(const char *p, const char *e, int depth)
{
    p = js_ws(p, e);
    if (p >= e || depth > 64)
        return NULL;
    if (*p == '"')
        return js_string_end(p, e);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = js_ws(p + 1, e);
        if (p < e && *p == close)
            return p + 1;
        for (;;) {
            if (close == '}') {
                if (p >= e || *p != '"' || (p = js_string_end(p, e)) == NULL)
                    return NULL;
                p = js_ws(p, e);
                if (p >= e || *p != ':')
                    return NULL;
                p++;
            }
            if ((p = js_skip(p, e, depth + 1)) == NULL)
                return NULL;
            p = js_ws(p, e);
            if (p < e && *p == ',') {
                p = js_ws(p + 1, e);
                continue;
            }
            return p < e && *p == close ? p + 1 : NULL;
        }
    }
    const char *s = p; /* number, true, false, null */
    while (p < e &&
           (strchr("+-.eE", *p) != NULL || (*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z')))
        p++;
    return p > s ? p : NULL;
}

/* The value at path (object keys, or decimal indices into arrays) inside
 * the value at [p, e): *vp and *ve bound it. Keys are compared as written
 * (the keys looked up here have no escapes). */
static bool js_get(const char *p, const char *e, const char *const *path, size_t np,
                   const char **vp, const char **ve)
{
    for (size_t k = 0; k <= np; k++) {
        p = js_ws(p, e);
        if (p >= e)
            return false;
        if (k == np) {
            const char *end = js_skip(p, e, 0);
            if (end == NULL)
                return false;
            *vp = p;
            *ve = end;
            return true;
        }
        bool obj = *p == '{';
        if (!obj && *p != '[')
            return false;
        char close = obj ? '}' : ']';
        long want = obj ? -1 : strtol(path[k], NULL, 10);
        size_t kl = strlen(path[k]);
        p = js_ws(p + 1, e);
        bool found = false;
        for (long idx = 0; !found && p < e && *p != close; idx++) {
            bool match = idx == want;
            if (obj) {
                const char *ks = p, *kend;
                if (*p != '"' || (kend = js_string_end(p, e)) == NULL)
                    return false;
                match = (size_t)(kend - ks) == kl + 2 && memcmp(ks + 1, path[k], kl) == 0;
                p = js_ws(kend, e);
                if (p >= e || *p != ':')
                    return false;
                p = js_ws(p + 1, e);
            }
            if (match) {
                found = true; /* descend into this value */
                break;
            }
            if ((p = js_skip(p, e, 0)) == NULL)
                return false;
            p = js_ws(p, e);
            if (p < e && *p == ',')
                p = js_ws(p + 1, e);
        }
        if (!found)
            return false;
    }
    return false;
}

static bool js_num(const char *p, const char *e, const char *const *path, size_t np, double *out)
{
    const char *v, *ve;
    if (!js_get(p, e, path, np, &v, &ve) || v >= ve || !(*v == '-' || (*v >= '0' && *v <= '9')))
        return false;
    char tmp[64];
    size_t n = (size_t)(ve - v) < sizeof(tmp) - 1 ? (size_t)(ve - v) : sizeof(tmp) - 1;
    memcpy(tmp, v, n);
    tmp[n] = '\0';
    *out = strtod(tmp, NULL);
    return true;
}

/* A string value without its quotes (escapes kept as written). */
static bool js_str(const char *p, const char *e, const char *const *path, size_t np, char *buf,
                   size_t cap)
{
    const char *v, *ve;
    if (!js_get(p, e, path, np, &v, &ve) || ve - v < 2 || *v != '"')
        return false;
    size_t n = (size_t)(ve - v - 2) < cap - 1 ? (size_t)(ve - v - 2) : cap - 1;
    memcpy(buf, v + 1, n);
    buf[n] = '\0';
    return true;
}

/* s as a JSON string body: quotes, backslashes and controls escaped. */
static void json_escape(FILE *f, const char *s)
{
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
}

/* ---- prompts ---- */

static const char *const sv_words[] = {
    "the",     "system",  "model",   "answer",  "question", "data",     "server",  "network",
    "memory",  "cache",   "token",   "request", "user",     "time",     "value",   "result",
    "simple",  "clear",   "short",   "long",    "fast",     "slow",     "good",    "best",
    "first",   "last",    "next",    "every",   "each",     "other",    "many",    "few",
    "small",   "large",   "number",  "list",    "table",    "file",     "text",    "word",
    "line",    "page",    "book",    "story",   "river",    "mountain", "city",    "house",
    "garden",  "tree",    "flower",  "water",   "fire",     "light",    "dark",    "morning",
    "evening", "winter",  "summer",  "spring",  "autumn",   "north",    "south",   "east",
    "west",    "road",    "bridge",  "train",   "ship",     "market",   "price",   "cost",
    "plan",    "build",   "write",   "read",    "learn",    "teach",    "help",    "make",
    "keep",    "give",    "take",    "find",    "show",     "tell",     "ask",     "work",
    "play",    "move",    "open",    "close",   "start",    "stop",     "turn",    "hold",
    "bring",   "carry",   "follow",  "explain", "describe", "compare",  "measure", "count",
    "history", "science", "music",   "art",     "language", "country",  "people",  "family",
    "friend",  "teacher", "student", "doctor",  "farmer",   "worker",   "leader",  "child",
    "old",     "new",     "young",   "early",   "late",     "near",     "far",     "high",
};
#define SV_N_WORDS (sizeof(sv_words) / sizeof(sv_words[0]))

typedef struct sv_buf {
    char *p;
    size_t len, cap;
    bool overflow;
} sv_buf_t;

static void buf_add(sv_buf_t *b, const char *s)
{
    size_t n = strlen(s);
    if (b->overflow || b->len + n + 1 > b->cap) {
        b->overflow = true;
        return;
    }
    memcpy(b->p + b->len, s, n + 1);
    b->len += n;
}

static void buf_words(sv_buf_t *b, uint64_t *rng, int n)
{
    for (int i = 0; i < n; i++) {
        buf_add(b, sv_words[tool_rng_next(rng) % SV_N_WORDS]);
        buf_add(b, (i % 15 == 14) ? ". " : " ");
    }
}

/* The request body of request idx of level lvl into b. */
static void sv_build_body(const sv_opts_t *o, int lvl, int idx, sv_buf_t *b)
{
    uint64_t rng = o->seed * 0x100000001b3ull + (uint64_t)lvl * 1000003ull + (uint64_t)idx;
    tool_rng_next(&rng);
    char sys[SV_SYSTEM_WORDS * 12 + 64], user[SV_DOC_WORDS * 12 + 256], tmp[64];
    sv_buf_t sb = {sys, 0, sizeof(sys), false}, ub = {user, 0, sizeof(user), false};
    sys[0] = user[0] = '\0';
    bool long_doc = o->prompts == SV_PROMPTS_MIX && (tool_rng_next(&rng) & 1) == 0;
    if (o->prompts == SV_PROMPTS_SHARED) {
        uint64_t srng = o->seed ^ 0x5eedc0ffeeull;
        buf_add(&sb, "You are a helpful assistant. Keep these notes in mind: ");
        buf_words(&sb, &srng, SV_SYSTEM_WORDS);
    } else if (o->prompts == SV_PROMPTS_UNIQUE) {
        snprintf(tmp, sizeof(tmp), "Session %d-%d. ", lvl, idx);
        buf_add(&sb, tmp);
        buf_add(&sb, "You are a helpful assistant. Keep these notes in mind: ");
        buf_words(&sb, &rng, SV_SYSTEM_WORDS);
    }
    if (long_doc) {
        snprintf(tmp, sizeof(tmp), "Document %d-%d: ", lvl, idx);
        buf_add(&ub, tmp);
        buf_words(&ub, &rng, SV_DOC_WORDS);
        buf_add(&ub, "Summarize the document above in one sentence.");
    } else {
        snprintf(tmp, sizeof(tmp), "Question %d-%d: ", lvl, idx);
        buf_add(&ub, tmp);
        buf_words(&ub, &rng, SV_QUESTION_WORDS);
        buf_add(&ub, "?");
    }
    char head[512];
    head[0] = '\0';
    if (o->model != NULL) {
        /* the name as given, quotes and controls dropped */
        char m[256];
        size_t k = 0;
        for (const char *s = o->model; *s != '\0' && k + 1 < sizeof(m); s++)
            if (*s != '"' && *s != '\\' && (unsigned char)*s >= 0x20)
                m[k++] = *s;
        m[k] = '\0';
        snprintf(head, sizeof(head), "\"model\": \"%s\", ", m);
    }
    char params[256];
    snprintf(params, sizeof(params),
             "\"max_tokens\": %d, \"temperature\": %g, \"stream\": true, "
             "\"stream_options\": {\"include_usage\": true}}",
             o->max_tokens, (double)o->temperature);
    b->len = 0;
    b->overflow = sb.overflow || ub.overflow;
    b->p[0] = '\0';
    buf_add(b, "{");
    buf_add(b, head);
    if (o->chat) {
        buf_add(b, "\"messages\": [");
        if (sys[0] != '\0') {
            buf_add(b, "{\"role\": \"system\", \"content\": \"");
            buf_add(b, sys);
            buf_add(b, "\"}, ");
        }
        buf_add(b, "{\"role\": \"user\", \"content\": \"");
        buf_add(b, user);
        buf_add(b, "\"}], ");
    } else {
        buf_add(b, "\"prompt\": \"");
        if (sys[0] != '\0') {
            buf_add(b, sys);
            buf_add(b, "\\n\\n");
        }
        buf_add(b, user);
        buf_add(b, "\", ");
    }
    buf_add(b, params);
}

/* ---- one request ---- */

static void sv_content_chunk(sv_worker_t *w)
{
    sv_req_t *r = w->req;
    double now = tool_now();
    if (r->n_chunks == 0) {
        r->t_first = now;
    } else if (r->n_gaps < r->gaps_cap) {
        r->gaps[r->n_gaps++] = (float)((now - r->t_last) * 1000.0);
    }
    r->t_last = now;
    r->n_chunks++;
}

static void sv_sse_line(sv_worker_t *w, const char *line, size_t len)
{
    if (len == 0 || line[0] == ':')
        return; /* event separator, comment */
    if (len < 5 || memcmp(line, "data:", 5) != 0)
        return; /* event:, id:, retry:, or an error response's body */
    const char *p = line + 5, *e = line + len;
    if (p < e && *p == ' ')
        p++;
    if ((size_t)(e - p) == 6 && memcmp(p, "[DONE]", 6) == 0) {
        w->done_seen = true;
        w->stop = true;
        return;
    }
    sv_req_t *r = w->req;
    const char *v, *ve;
    static const char *const err_path[] = {"error"};
    if (js_get(p, e, err_path, 1, &v, &ve) && !(ve - v == 4 && memcmp(v, "null", 4) == 0)) {
        static const char *const msg_path[] = {"error", "message"};
        char m[128];
        if (!js_str(p, e, msg_path, 2, m, sizeof(m)))
            snprintf(m, sizeof(m), "%.*s", (int)(ve - v > 100 ? 100 : ve - v), v);
        snprintf(r->msg, sizeof(r->msg), "error in the stream: %s", m);
        w->api_error = true;
        w->stop = true;
        return;
    }
    if (js_skip(p, e, 0) == NULL) {
        if (!w->bad_line)
            snprintf(r->msg, sizeof(r->msg), "malformed JSON in the stream: %.60s", p);
        w->bad_line = true;
        return;
    }
    static const char *const chat_path[] = {"choices", "0", "delta", "content"};
    static const char *const text_path[] = {"choices", "0", "text"};
    bool chat = w->run->o->chat;
    if (js_get(p, e, chat ? chat_path : text_path, chat ? 4 : 3, &v, &ve) && ve - v > 2 &&
        *v == '"')
        sv_content_chunk(w);
    static const char *const out_path[] = {"usage", "completion_tokens"};
    static const char *const in_path[] = {"usage", "prompt_tokens"};
    static const char *const cached_path[] = {"usage", "prompt_tokens_details", "cached_tokens"};
    double d;
    if (js_num(p, e, out_path, 2, &d))
        r->usage_out = (long)d;
    if (js_num(p, e, in_path, 2, &d))
        r->usage_prompt = (long)d;
    if (js_num(p, e, cached_path, 3, &d))
        r->usage_cached = (long)d;
}

/* httpc's on_data: splits the body into lines. */
static int sv_on_data(void *user, const char *data, size_t len)
{
    sv_worker_t *w = user;
    if (w->raw_len + 1 < sizeof(w->raw)) {
        size_t n = sizeof(w->raw) - 1 - w->raw_len < len ? sizeof(w->raw) - 1 - w->raw_len : len;
        memcpy(w->raw + w->raw_len, data, n);
        w->raw_len += n;
        w->raw[w->raw_len] = '\0';
    }
    while (len > 0 && !w->stop) {
        const char *nl = memchr(data, '\n', len);
        size_t take = nl ? (size_t)(nl - data) : len;
        if (w->line_len + take > SV_LINE_MAX) {
            snprintf(w->req->msg, sizeof(w->req->msg), "an SSE line over %d bytes", SV_LINE_MAX);
            w->bad_line = true;
            w->stop = true;
            break;
        }
        memcpy(w->line + w->line_len, data, take);
        w->line_len += take;
        data += take;
        len -= take;
        if (nl != NULL) {
            data++;
            len--;
            size_t ll = w->line_len;
            if (ll > 0 && w->line[ll - 1] == '\r')
                ll--;
            w->line[ll] = '\0';
            sv_sse_line(w, w->line, ll);
            w->line_len = 0;
        }
    }
    return w->stop;
}

static void sv_run_one(sv_worker_t *w, sv_req_t *r, int idx)
{
    sv_run_t *run = w->run;
    const sv_opts_t *o = run->o;
    w->req = r;
    w->line_len = 0;
    w->raw_len = 0;
    w->raw[0] = '\0';
    w->done_seen = w->stop = w->api_error = w->bad_line = false;
    r->ran = true;
    r->usage_out = r->usage_prompt = r->usage_cached = -1;
    sv_buf_t b = {w->body, 0, SV_BODY_MAX, false};
    sv_build_body(o, run->level_idx, idx, &b);
    if (b.overflow) { /* the sizes above make this a bug, not input */
        r->err = SV_ERR_STREAM;
        snprintf(r->msg, sizeof(r->msg), "request body over %d bytes", SV_BODY_MAX);
        return;
    }
    httpc_response_t resp;
    char err[256];
    r->t_send = tool_now();
    int rc = httpc_request(o->host, o->port, "POST", o->path, run->headers, b.p, b.len,
                           (int)(o->timeout * 1000.0f), sv_on_data, w, &resp, err, sizeof(err));
    int err_no = errno;
    r->t_end = tool_now();
    if (rc != 0) {
        r->err = err_no == ETIMEDOUT  ? SV_ERR_TIMEOUT
                 : resp.status == 0   ? SV_ERR_CONNECT
                 : resp.status != 200 ? SV_ERR_HTTP
                                      : SV_ERR_STREAM;
        snprintf(r->msg, sizeof(r->msg), "%.100s (HTTP %d, %d chunks)", err, resp.status,
                 r->n_chunks);
    } else if (resp.status != 200) {
        r->err = SV_ERR_HTTP;
        for (size_t i = 0; i < w->raw_len; i++)
            if (w->raw[i] == '\n' || w->raw[i] == '\r')
                w->raw[i] = ' ';
        snprintf(r->msg, sizeof(r->msg), "HTTP %d: %.120s", resp.status, w->raw);
    } else if (w->api_error) {
        r->err = SV_ERR_API;
    } else if (w->bad_line) {
        r->err = SV_ERR_STREAM;
    } else if (!w->done_seen) {
        r->err = SV_ERR_STREAM;
        snprintf(r->msg, sizeof(r->msg), "the stream ended without data: [DONE] (%d chunks)",
                 r->n_chunks);
    }
    httpc_response_free(&resp);
}

static bool sv_worker_init(sv_worker_t *w, sv_run_t *run)
{
    memset(w, 0, sizeof(*w));
    w->run = run;
    w->body = malloc(SV_BODY_MAX);
    w->line = malloc(SV_LINE_MAX + 1);
    return w->body != NULL && w->line != NULL;
}

static void sv_worker_free(sv_worker_t *w)
{
    free(w->body);
    free(w->line);
}

/* Closed loop: one client sending requests back to back. */
static void *sv_closed_main(void *arg)
{
    sv_run_t *run = arg;
    sv_worker_t w;
    if (sv_worker_init(&w, run)) {
        for (int guard = 0; guard < run->cap; guard++) {
            if (run->t_stop > 0 && tool_now() >= run->t_stop)
                break;
            int i = atomic_fetch_add(&run->next, 1);
            if (i >= run->cap)
                break;
            sv_run_one(&w, &run->reqs[i], i);
            atomic_fetch_add(&run->done, 1);
        }
    } else {
        tdm_log_error(MOD, "out of memory for a client's buffers; this client sends nothing");
    }
    sv_worker_free(&w);
    atomic_fetch_sub(&run->running, 1);
    return NULL;
}

/* Open loop: one thread per arrival. */
typedef struct sv_open_arg {
    sv_run_t *run;
    int idx;
} sv_open_arg_t;

static void *sv_open_main(void *arg)
{
    sv_open_arg_t *a = arg;
    sv_worker_t w;
    if (sv_worker_init(&w, a->run)) {
        sv_run_one(&w, &a->run->reqs[a->idx], a->idx);
    } else {
        sv_req_t *r = &a->run->reqs[a->idx];
        r->ran = true;
        r->err = SV_ERR_CONNECT;
        snprintf(r->msg, sizeof(r->msg), "out of memory for the request's buffers");
    }
    sv_worker_free(&w);
    atomic_fetch_add(&a->run->done, 1);
    atomic_fetch_sub(&a->run->running, 1);
    return NULL;
}

/* ---- figures ---- */

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* p50, p99 (nearest rank) and mean of v[0..n) (sorted here). */
static sv_stat_t sv_stat(float *v, size_t n)
{
    sv_stat_t s = {NAN, NAN, NAN};
    if (n == 0)
        return s;
    qsort(v, n, sizeof(float), cmp_float);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += v[i];
    size_t i50 = (size_t)ceil(0.50 * (double)n), i99 = (size_t)ceil(0.99 * (double)n);
    s.p50 = v[i50 > 0 ? i50 - 1 : 0];
    s.p99 = v[i99 > 0 ? i99 - 1 : 0];
    s.mean = sum / (double)n;
    return s;
}

static void sv_level_figures(const sv_run_t *run, double wall, sv_level_t *lv)
{
    size_t n_gaps = 0;
    for (int i = 0; i < run->cap; i++)
        n_gaps += run->reqs[i].ran ? (size_t)run->reqs[i].n_gaps : 0;
    float *ttft = malloc(((size_t)run->cap + 1) * sizeof(float));
    float *e2e = malloc(((size_t)run->cap + 1) * sizeof(float));
    float *itl = malloc((n_gaps + 1) * sizeof(float));
    size_t n_ttft = 0, n_e2e = 0, n_itl = 0;
    const char *first_msg[SV_ERR_N] = {0};
    lv->wall_s = wall;
    for (int i = 0; i < run->cap; i++) {
        const sv_req_t *r = &run->reqs[i];
        if (!r->ran)
            continue;
        lv->n_req++;
        if (r->err != SV_ERR_NONE) {
            lv->failed++;
            lv->errs[r->err]++;
            if (first_msg[r->err] == NULL)
                first_msg[r->err] = r->msg;
            continue;
        }
        lv->ok++;
        lv->out_tokens += r->usage_out >= 0 ? r->usage_out : r->n_chunks;
        lv->chunks += r->n_chunks;
        lv->prompt_tokens += r->usage_prompt > 0 ? r->usage_prompt : 0;
        lv->cached_tokens += r->usage_cached > 0 ? r->usage_cached : 0;
        if (ttft != NULL && r->n_chunks > 0)
            ttft[n_ttft++] = (float)((r->t_first - r->t_send) * 1000.0);
        if (e2e != NULL)
            e2e[n_e2e++] = (float)((r->t_end - r->t_send) * 1000.0);
        for (int g = 0; itl != NULL && g < r->n_gaps; g++)
            itl[n_itl++] = r->gaps[g];
    }
    lv->ttft = sv_stat(ttft, n_ttft);
    lv->e2e = sv_stat(e2e, n_e2e);
    lv->itl = sv_stat(itl, n_itl);
    lv->tok_s = wall > 0 ? (double)lv->out_tokens / wall : 0;
    lv->req_s = wall > 0 ? (double)lv->ok / wall : 0;
    free(ttft);
    free(e2e);
    free(itl);
    for (int k = 1; k < SV_ERR_N; k++)
        if (lv->errs[k] > 0)
            tdm_log_warn(MOD, "%s %g: %d request(s) failed (%s), the first: %s",
                         run->o->open_loop ? "rate" : "concurrency", lv->x, lv->errs[k],
                         sv_err_names[k], first_msg[k]);
}

static void sv_progress(const sv_run_t *run, const sv_level_t *lv, int total, double *last,
                        bool final)
{
    double now = tool_now();
    if (!final && now - *last < 1.0)
        return;
    *last = now;
    int done = atomic_load(&run->done);
    fprintf(stderr, "bench serve: %s %g: %d/%d done, %d in flight%s\n",
            run->o->open_loop ? "rate" : "concurrency", lv->x, done, total,
            atomic_load(&run->running), final ? ", level finished" : "");
}

/* Runs one level; fills lv. Returns false when it could not start. */
static bool sv_run_level(const sv_opts_t *o, int level_idx, const char *headers, sv_level_t *lv)
{
    memset(lv, 0, sizeof(*lv));
    lv->x = o->levels[level_idx];
    sv_run_t run = {.o = o, .level_idx = level_idx};
    snprintf(run.headers, sizeof(run.headers), "%s", headers);
    int cap = o->requests;
    run.cap = cap;
    run.reqs = calloc((size_t)cap, sizeof(sv_req_t));
    int gaps_cap = o->max_tokens + 8;
    float *gaps = malloc((size_t)cap * (size_t)gaps_cap * sizeof(float));
    pthread_t *th = NULL;
    sv_open_arg_t *args = NULL;
    bool ok = false;
    if (run.reqs == NULL || gaps == NULL) {
        tdm_log_error(MOD, "out of memory for %d requests' records; lower --requests", cap);
        goto out;
    }
    for (int i = 0; i < cap; i++) {
        run.reqs[i].gaps = gaps + (size_t)i * (size_t)gaps_cap;
        run.reqs[i].gaps_cap = gaps_cap;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);
    double last = 0, t0 = tool_now();
    if (!o->open_loop) {
        int c = (int)lv->x;
        th = calloc((size_t)c, sizeof(pthread_t));
        if (th == NULL) {
            pthread_attr_destroy(&attr);
            goto out;
        }
        run.t_stop = o->duration > 0 ? t0 + o->duration : 0;
        int started = 0;
        for (int i = 0; i < c; i++) {
            atomic_fetch_add(&run.running, 1);
            if (pthread_create(&th[i], &attr, sv_closed_main, &run) != 0) {
                atomic_fetch_sub(&run.running, 1);
                tdm_log_error(MOD, "cannot start client thread %d of %d: %s; running with %d", i, c,
                              strerror(errno), started);
                break;
            }
            started++;
        }
        int total = o->duration > 0 ? -1 : cap;
        while (atomic_load(&run.running) > 0) {
            usleep(20000);
            sv_progress(&run, lv, total < 0 ? atomic_load(&run.next) : total, &last, false);
        }
        for (int i = 0; i < started; i++)
            pthread_join(th[i], NULL);
    } else {
        th = calloc((size_t)cap, sizeof(pthread_t));
        args = calloc((size_t)cap, sizeof(sv_open_arg_t));
        bool *started = calloc((size_t)cap, sizeof(bool));
        if (th == NULL || args == NULL || started == NULL) {
            free(started);
            pthread_attr_destroy(&attr);
            goto out;
        }
        /* arrival times: exponential gaps of mean 1/rate, from the seed */
        uint64_t rng = o->seed ^ ((uint64_t)level_idx * 0x9e3779b97f4a7c15ull) ^ 0xa221ull;
        double t_arr = 0;
        for (int i = 0; i < cap; i++) {
            double u = ((double)(tool_rng_next(&rng) >> 11) + 1.0) / 9007199254740993.0;
            t_arr += -log(u) / lv->x;
            double wait;
            while ((wait = t0 + t_arr - tool_now()) > 0) {
                usleep(wait > 0.05 ? 50000 : (useconds_t)(wait * 1e6));
                sv_progress(&run, lv, cap, &last, false);
            }
            if (atomic_load(&run.running) >= SV_MAX_IN_FLIGHT) {
                lv->dropped++;
                continue;
            }
            args[i] = (sv_open_arg_t){&run, i};
            atomic_fetch_add(&run.running, 1);
            if (pthread_create(&th[i], &attr, sv_open_main, &args[i]) != 0) {
                atomic_fetch_sub(&run.running, 1);
                lv->dropped++;
                continue;
            }
            started[i] = true;
        }
        while (atomic_load(&run.running) > 0) {
            usleep(20000);
            sv_progress(&run, lv, cap, &last, false);
        }
        for (int i = 0; i < cap; i++)
            if (started[i])
                pthread_join(th[i], NULL);
        free(started);
        if (lv->dropped > 0)
            tdm_log_warn(MOD,
                         "rate %g: %d arrivals dropped with %d requests in flight (the "
                         "server is slower than the rate)",
                         lv->x, lv->dropped, SV_MAX_IN_FLIGHT);
    }
    pthread_attr_destroy(&attr);
    /* the level ends with its last request */
    double t_end = t0;
    for (int i = 0; i < cap; i++)
        if (run.reqs[i].ran && run.reqs[i].t_end > t_end)
            t_end = run.reqs[i].t_end;
    sv_progress(&run, lv, atomic_load(&run.done), &last, true);
    sv_level_figures(&run, t_end - t0, lv);
    ok = true;
out:
    free(args);
    free(th);
    free(gaps);
    free(run.reqs);
    return ok;
}

/* ---- output ---- */

static void json_num(FILE *f, double v)
{
    if (isfinite(v))
        fprintf(f, "%.3f", v);
    else
        fputs("null", f);
}

static void json_stat(FILE *f, const char *name, sv_stat_t s)
{
    fprintf(f, ", \"%s\": {\"p50\": ", name);
    json_num(f, s.p50);
    fputs(", \"p99\": ", f);
    json_num(f, s.p99);
    fputs(", \"mean\": ", f);
    json_num(f, s.mean);
    fputc('}', f);
}

static void sv_write_json(FILE *f, const sv_opts_t *o, const sv_level_t *lv, int n)
{
    fputs("{\"label\": \"", f);
    json_escape(f, o->label ? o->label : "");
    fputs("\", \"url\": \"", f);
    json_escape(f, o->url);
    fputs("\", \"model\": ", f);
    if (o->model != NULL) {
        fputc('"', f);
        json_escape(f, o->model);
        fputc('"', f);
    } else {
        fputs("null", f);
    }
    fprintf(f,
            ", \"api\": \"%s\", \"prompts\": \"%s\", \"mode\": \"%s\", \"max_tokens\": %d, "
            "\"temperature\": %g, \"seed\": %llu, \"timeout_s\": %g, \"levels\": [",
            o->chat ? "chat" : "completions", o->prompts_s, o->open_loop ? "open" : "closed",
            o->max_tokens, (double)o->temperature, (unsigned long long)o->seed, (double)o->timeout);
    for (int i = 0; i < n; i++) {
        const sv_level_t *l = &lv[i];
        fprintf(f,
                "%s\n  {\"%s\": %g, \"requests\": %d, \"ok\": %d, \"failed\": %d, "
                "\"dropped\": %d, \"errors\": {",
                i ? "," : "", o->open_loop ? "rate" : "concurrency", l->x, l->n_req, l->ok,
                l->failed, l->dropped);
        for (int k = 1; k < SV_ERR_N; k++)
            fprintf(f, "%s\"%s\": %d", k > 1 ? ", " : "", sv_err_names[k], l->errs[k]);
        fprintf(f,
                "}, \"wall_s\": %.3f, \"output_tokens\": %ld, \"content_chunks\": %ld, "
                "\"prompt_tokens\": %ld, \"cached_tokens\": %ld, \"output_tok_s\": %.3f, "
                "\"requests_s\": %.3f",
                l->wall_s, l->out_tokens, l->chunks, l->prompt_tokens, l->cached_tokens, l->tok_s,
                l->req_s);
        json_stat(f, "ttft_ms", l->ttft);
        json_stat(f, "itl_ms", l->itl);
        json_stat(f, "e2e_ms", l->e2e);
        fputc('}', f);
    }
    fputs("\n]}\n", f);
}

static void sv_print_table(const sv_opts_t *o, const sv_level_t *lv, int n)
{
    printf("bench serve: %s %s, prompts %s, max_tokens %d, %s loop%s%s\n", o->url,
           o->chat ? "chat" : "completions", o->prompts_s, o->max_tokens,
           o->open_loop ? "open" : "closed", o->label ? ", label " : "", o->label ? o->label : "");
    printf("%8s %6s %5s %5s %5s %8s %8s %10s %17s %17s %17s\n", o->open_loop ? "rate/s" : "conc",
           "reqs", "ok", "fail", "drop", "wall s", "req/s", "out tok/s", "TTFT p50/p99 ms",
           "ITL p50/p99 ms", "E2E p50/p99 ms");
    for (int i = 0; i < n; i++) {
        const sv_level_t *l = &lv[i];
        printf("%8g %6d %5d %5d %5d %8.2f %8.2f %10.1f %8.1f/%-8.1f %8.1f/%-8.1f %8.1f/%-8.1f\n",
               l->x, l->n_req, l->ok, l->failed, l->dropped, l->wall_s, l->req_s, l->tok_s,
               l->ttft.p50, l->ttft.p99, l->itl.p50, l->itl.p99, l->e2e.p50, l->e2e.p99);
    }
}

/* ---- the plot ---- */

typedef struct sv_point {
    double x_itl, x_ttft, y; /* p99 ms, p99 ms, tok/s */
    double level;
} sv_point_t;

typedef struct sv_series {
    char label[96];
    bool open_loop;
    int n;
    sv_point_t pts[SV_MAX_LEVELS];
} sv_series_t;

static double nice_step(double span)
{
    double raw = span / 5.0;
    if (!(raw > 0))
        return 1;
    double mag = pow(10.0, floor(log10(raw))), f = raw / mag;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

/* One panel at (px, py) of size w x h: y = tok/s against x = p99 latency. */
static void svg_panel(FILE *f, const sv_series_t *s, int ns, bool ttft, double px, double py,
                      double w, double h)
{
    static const char *const colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e",
                                         "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
    double xmax = 0, ymax = 0;
    for (int i = 0; i < ns; i++)
        for (int k = 0; k < s[i].n; k++) {
            double x = ttft ? s[i].pts[k].x_ttft : s[i].pts[k].x_itl;
            if (isfinite(x) && x > xmax)
                xmax = x;
            if (isfinite(s[i].pts[k].y) && s[i].pts[k].y > ymax)
                ymax = s[i].pts[k].y;
        }
    double xs = nice_step(xmax > 0 ? xmax * 1.05 : 1), ys = nice_step(ymax > 0 ? ymax * 1.05 : 1);
    double xtop = ceil((xmax > 0 ? xmax * 1.05 : 1) / xs) * xs;
    double ytop = ceil((ymax > 0 ? ymax * 1.05 : 1) / ys) * ys;
    double l = px + 70, r = px + w - 20, t = py + 40, b = py + h - 50;
    fprintf(f,
            "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"15\">"
            "Output tok/s against p99 %s</text>\n",
            (l + r) / 2, py + 22, ttft ? "time to first token" : "inter-token latency");
    /* grid, ticks, labels */
    for (int k = 0; k <= 40; k++) {
        double v = k * xs;
        if (v > xtop + xs * 1e-9)
            break;
        double x = l + (r - l) * v / xtop;
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e0e0e0\"/>\n"
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#000\"/>\n"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"11\">%g</text>\n",
                x, t, x, b, x, b, x, b + 5, x, b + 18, v);
    }
    for (int k = 0; k <= 40; k++) {
        double v = k * ys;
        if (v > ytop + ys * 1e-9)
            break;
        double y = b - (b - t) * v / ytop;
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e0e0e0\"/>\n"
                "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#000\"/>\n"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\" font-size=\"11\">%g</text>\n",
                l, y, r, y, l - 5, y, l, y, l - 8, y + 4, v);
    }
    fprintf(f,
            "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
            "stroke=\"#000\"/>\n",
            l, t, r - l, b - t);
    fprintf(f,
            "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"13\">p99 %s (ms)"
            "</text>\n",
            (l + r) / 2, b + 38, ttft ? "TTFT" : "ITL");
    fprintf(f,
            "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"13\" "
            "transform=\"rotate(-90 %.1f %.1f)\">output tokens/s</text>\n",
            px + 18, (t + b) / 2, px + 18, (t + b) / 2);
    /* one polyline per series, points labelled with their level */
    for (int i = 0; i < ns; i++) {
        const char *c = colors[i % 8];
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", c);
        for (int k = 0; k < s[i].n; k++) {
            double xv = ttft ? s[i].pts[k].x_ttft : s[i].pts[k].x_itl;
            if (!isfinite(xv) || !isfinite(s[i].pts[k].y))
                continue;
            fprintf(f, "%.1f,%.1f ", l + (r - l) * xv / xtop, b - (b - t) * s[i].pts[k].y / ytop);
        }
        fputs("\"/>\n", f);
        for (int k = 0; k < s[i].n; k++) {
            double xv = ttft ? s[i].pts[k].x_ttft : s[i].pts[k].x_itl;
            if (!isfinite(xv) || !isfinite(s[i].pts[k].y))
                continue;
            double x = l + (r - l) * xv / xtop, y = b - (b - t) * s[i].pts[k].y / ytop;
            fprintf(f,
                    "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\"/>\n"
                    "<text x=\"%.1f\" y=\"%.1f\" font-size=\"10\" fill=\"%s\">%s%g</text>\n",
                    x, y, c, x + 6, y - 6, c, s[i].open_loop ? "r=" : "c=", s[i].pts[k].level);
        }
    }
}

static void svg_text_escaped(FILE *f, const char *s)
{
    for (; *s != '\0'; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        case '"': fputs("&quot;", f); break;
        default:
            if ((unsigned char)*s >= 0x20)
                fputc(*s, f);
        }
    }
}

static bool sv_write_svg(const char *path, const sv_series_t *s, int ns)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        tdm_log_error(MOD, "cannot write the plot %s: %s", path, strerror(errno));
        return false;
    }
    double W = 1000, H = 440 + 20.0 * ns;
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
            "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\">\n"
            "<rect width=\"100%%\" height=\"100%%\" fill=\"#fff\"/>\n",
            W, H, W, H);
    svg_panel(f, s, ns, false, 0, 0, W / 2, 420);
    svg_panel(f, s, ns, true, W / 2, 0, W / 2, 420);
    static const char *const colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e",
                                         "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
    for (int i = 0; i < ns; i++) {
        double y = 440 + 20.0 * i;
        fprintf(f,
                "<line x1=\"80\" y1=\"%.1f\" x2=\"110\" y2=\"%.1f\" stroke=\"%s\" "
                "stroke-width=\"3\"/>\n<text x=\"118\" y=\"%.1f\" font-size=\"12\">",
                y - 4, y - 4, colors[i % 8], y);
        svg_text_escaped(f, s[i].label);
        fputs("</text>\n", f);
    }
    fputs("</svg>\n", f);
    bool ok = ferror(f) == 0;
    if (fclose(f) != 0 || !ok) {
        tdm_log_error(MOD, "writing the plot %s failed (disk full?)", path);
        return false;
    }
    return true;
}

static void sv_series_from_levels(const sv_opts_t *o, const sv_level_t *lv, int n, sv_series_t *s)
{
    memset(s, 0, sizeof(*s));
    snprintf(s->label, sizeof(s->label), "%s (%s, %s)", o->label ? o->label : "run", o->prompts_s,
             o->open_loop ? "open loop" : "closed loop");
    s->open_loop = o->open_loop;
    for (int i = 0; i < n && i < SV_MAX_LEVELS; i++)
        s->pts[s->n++] = (sv_point_t){lv[i].itl.p99, lv[i].ttft.p99, lv[i].tok_s, lv[i].x};
}

/* Reads a --json-file of an earlier run into a series. */
static bool sv_series_load(const char *path, sv_series_t *s)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        tdm_log_error(MOD, "cannot open %s: %s", path, strerror(errno));
        return false;
    }
    size_t len = 0;
    char *t = tool_read_all(f, &len);
    fclose(f);
    if (t == NULL) {
        tdm_log_error(MOD, "cannot read %s", path);
        return false;
    }
    memset(s, 0, sizeof(*s));
    const char *e = t + len;
    static const char *const lp[] = {"label"}, *const pp[] = {"prompts"}, *const mp[] = {"mode"};
    char label[64] = "", prompts[32] = "", mode[16] = "";
    js_str(t, e, lp, 1, label, sizeof(label));
    js_str(t, e, pp, 1, prompts, sizeof(prompts));
    js_str(t, e, mp, 1, mode, sizeof(mode));
    s->open_loop = strcmp(mode, "open") == 0;
    snprintf(s->label, sizeof(s->label), "%s (%s, %s loop)", label[0] ? label : path, prompts,
             mode);
    for (int i = 0; i < SV_MAX_LEVELS; i++) {
        char idx[8];
        snprintf(idx, sizeof(idx), "%d", i);
        const char *lvp[] = {"levels", idx, s->open_loop ? "rate" : "concurrency"};
        const char *tp[] = {"levels", idx, "output_tok_s"};
        const char *ip[] = {"levels", idx, "itl_ms", "p99"};
        const char *fp[] = {"levels", idx, "ttft_ms", "p99"};
        sv_point_t p = {NAN, NAN, NAN, NAN};
        if (!js_num(t, e, lvp, 3, &p.level))
            break;
        js_num(t, e, tp, 3, &p.y);
        js_num(t, e, ip, 4, &p.x_itl);
        js_num(t, e, fp, 4, &p.x_ttft);
        s->pts[s->n++] = p;
    }
    free(t);
    if (s->n == 0) {
        tdm_log_error(MOD, "%s holds no levels: is it a `tandem bench serve --json-file` output?",
                      path);
        return false;
    }
    return true;
}

/* ---- flags ---- */

/* "1,2,4" into out; false on a bad list. */
static bool sv_parse_list(const char *s, double *out, int *n, bool integers)
{
    *n = 0;
    const char *p = s;
    while (*p != '\0') {
        char *end;
        errno = 0;
        double v = strtod(p, &end);
        if (end == p || errno != 0 || !(v > 0) || v > 1e6 || *n >= SV_MAX_LEVELS ||
            (integers && v != floor(v)))
            return false;
        out[(*n)++] = v;
        p = end;
        if (*p == ',')
            p++;
        else if (*p != '\0')
            return false;
    }
    return *n > 0;
}

static bool sv_parse_url(sv_opts_t *o)
{
    const char *u = o->url;
    if (strncmp(u, "http://", 7) != 0) {
        fprintf(stderr, "tandem bench serve: --url must start with http:// (got %s)\n", u);
        return false;
    }
    u += 7;
    const char *slash = strchr(u, '/');
    size_t hl = slash ? (size_t)(slash - u) : strlen(u);
    char hp[sizeof(o->host)];
    if (hl == 0 || hl >= sizeof(hp)) {
        fprintf(stderr, "tandem bench serve: no host in --url %s\n", o->url);
        return false;
    }
    memcpy(hp, u, hl);
    hp[hl] = '\0';
    o->port = 80;
    char *colon = strrchr(hp, ':');
    if (colon != NULL) {
        char *end;
        long port = strtol(colon + 1, &end, 10);
        if (*end != '\0' || port < 1 || port > 65535) {
            fprintf(stderr, "tandem bench serve: bad port in --url %s\n", o->url);
            return false;
        }
        o->port = (int)port;
        *colon = '\0';
    }
    snprintf(o->host, sizeof(o->host), "%s", hp);
    /* a path prefix (a proxy's), without its trailing slash */
    char prefix[256] = "";
    if (slash != NULL) {
        size_t pl = strlen(slash);
        while (pl > 0 && slash[pl - 1] == '/')
            pl--;
        if (pl >= sizeof(prefix)) {
            fprintf(stderr, "tandem bench serve: the path of --url is too long\n");
            return false;
        }
        memcpy(prefix, slash, pl);
        prefix[pl] = '\0';
    }
    snprintf(o->path, sizeof(o->path), "%s%s", prefix,
             o->chat ? "/v1/chat/completions" : "/v1/completions");
    return true;
}

static int sv_compare(const sv_opts_t *o)
{
    if (o->svg == NULL) {
        fprintf(stderr, "tandem bench serve: --compare needs --svg FILE\n");
        return TOOL_EXIT_USAGE;
    }
    sv_series_t *s = calloc(SV_MAX_SERIES, sizeof(sv_series_t));
    if (s == NULL)
        return TOOL_EXIT_FAIL;
    int ns = 0, rc = TOOL_EXIT_OK;
    char list[4096];
    snprintf(list, sizeof(list), "%s", o->compare);
    char *save = NULL;
    for (char *f = strtok_r(list, ",", &save); f != NULL; f = strtok_r(NULL, ",", &save)) {
        if (ns == SV_MAX_SERIES) {
            fprintf(stderr, "tandem bench serve: --compare takes at most %d files\n",
                    SV_MAX_SERIES);
            rc = TOOL_EXIT_USAGE;
            break;
        }
        if (!sv_series_load(f, &s[ns])) {
            rc = TOOL_EXIT_USAGE;
            break;
        }
        printf("%s\n", s[ns].label);
        for (int k = 0; k < s[ns].n; k++)
            printf("  %s%-6g %10.1f tok/s  p99 ITL %8.1f ms  p99 TTFT %8.1f ms\n",
                   s[ns].open_loop ? "rate " : "conc ", s[ns].pts[k].level, s[ns].pts[k].y,
                   s[ns].pts[k].x_itl, s[ns].pts[k].x_ttft);
        ns++;
    }
    if (rc == TOOL_EXIT_OK && !sv_write_svg(o->svg, s, ns))
        rc = TOOL_EXIT_FAIL;
    if (rc == TOOL_EXIT_OK)
        fprintf(stderr, "bench serve: wrote %s (%d runs)\n", o->svg, ns);
    free(s);
    return rc;
}

int cmd_bench_serve(int argc, char **argv)
{
    sv_opts_t o = {
        .url = "http://127.0.0.1:8000",
        .api = "chat",
        .prompts_s = "shared",
        .conc_s = "1,2,4,8",
        .requests = 32,
        .max_tokens = 64,
        .temperature = 0,
        .timeout = 60,
        .seed = 1,
    };
    tdm_flag_t flags[] = {
        {"url", 0, TDM_FLAG_TYPE_STR, &o.url, "the server's base URL (http://HOST:PORT)", NULL},
        {"model", 0, TDM_FLAG_TYPE_STR, &o.model, "model name to ask for (default: the server's)",
         NULL},
        {"api-key", 0, TDM_FLAG_TYPE_STR, &o.api_key, "sent as Authorization: Bearer KEY", NULL},
        {"api", 0, TDM_FLAG_TYPE_STR, &o.api, "chat (/v1/chat/completions) or completions", NULL},
        {"prompts", 0, TDM_FLAG_TYPE_STR, &o.prompts_s,
         "shared (one system prompt), unique, or mix (1,000-word documents and short chats)", NULL},
        {"max-tokens", 0, TDM_FLAG_TYPE_INT, &o.max_tokens, "output tokens per request", NULL},
        {"temperature", 0, TDM_FLAG_TYPE_FLOAT, &o.temperature, "sampling temperature", NULL},
        {"concurrency", 'c', TDM_FLAG_TYPE_STR, &o.conc_s,
         "closed loop: clients per level, a list (1,2,4,8)", NULL},
        {"rate", 0, TDM_FLAG_TYPE_STR, &o.rate_s,
         "open loop instead: Poisson arrivals per second, a list (e.g. 2,4)", NULL},
        {"requests", 'n', TDM_FLAG_TYPE_INT, &o.requests,
         "requests per level (with --duration: the most per level; default then 10000)",
         &o.requests_set},
        {"duration", 0, TDM_FLAG_TYPE_FLOAT, &o.duration,
         "closed loop: seconds per level instead of a request count (0: off)", NULL},
        {"timeout", 0, TDM_FLAG_TYPE_FLOAT, &o.timeout, "seconds per request at most", NULL},
        {"seed", 0, TDM_FLAG_TYPE_U64, &o.seed, "seed of the prompts and arrivals", NULL},
        {"label", 0, TDM_FLAG_TYPE_STR, &o.label, "a name for this run (JSON, plot legend)", NULL},
        {"json", 0, TDM_FLAG_TYPE_BOOL, &o.json, "print JSON on stdout instead of the table", NULL},
        {"json-file", 0, TDM_FLAG_TYPE_STR, &o.json_file, "also write the JSON to FILE", NULL},
        {"svg", 0, TDM_FLAG_TYPE_STR, &o.svg, "plot tok/s against p99 ITL and TTFT into FILE",
         NULL},
        {"compare", 0, TDM_FLAG_TYPE_STR, &o.compare,
         "A.json,B.json: only plot these earlier runs (with --svg)", NULL},
    };
    int rc;
    const char *pos[2];
    size_t n_pos = 0;
    if (!tool_parse("bench serve [--url URL] [-c 1,2,4,8 | --rate R] [-n N] [--json]",
                    "Load against an OpenAI-compatible server, streaming: TTFT, inter-token "
                    "latency, end-to-end latency (p50, p99), output tok/s per level.",
                    flags, sizeof(flags) / sizeof(flags[0]), argc, argv, pos, 2, &n_pos, &rc))
        return rc;
    if (n_pos != 1 || strcmp(pos[0], "serve") != 0) {
        fprintf(stderr, "tandem bench serve: unexpected argument %s\n",
                n_pos > 1 ? pos[1] : "(none)");
        return TOOL_EXIT_USAGE;
    }
    if (o.compare != NULL)
        return sv_compare(&o);
    if (strcmp(o.api, "chat") == 0)
        o.chat = true;
    else if (strcmp(o.api, "completions") != 0) {
        fprintf(stderr, "tandem bench serve: --api must be chat or completions\n");
        return TOOL_EXIT_USAGE;
    }
    if (strcmp(o.prompts_s, "shared") == 0)
        o.prompts = SV_PROMPTS_SHARED;
    else if (strcmp(o.prompts_s, "unique") == 0)
        o.prompts = SV_PROMPTS_UNIQUE;
    else if (strcmp(o.prompts_s, "mix") == 0)
        o.prompts = SV_PROMPTS_MIX;
    else {
        fprintf(stderr, "tandem bench serve: --prompts must be shared, unique or mix\n");
        return TOOL_EXIT_USAGE;
    }
    if (o.duration > 0 && !o.requests_set)
        o.requests = SV_DEFAULT_DUR_CAP;
    if (o.max_tokens < 1 || o.max_tokens > 100000 || o.requests < 1 || o.requests > 1000000 ||
        !(o.timeout > 0) || o.timeout > 86400 || o.duration < 0 || o.temperature < 0) {
        fprintf(stderr, "tandem bench serve: --max-tokens 1..100000, --requests 1..1000000, "
                        "--timeout > 0, --duration >= 0, --temperature >= 0\n");
        return TOOL_EXIT_USAGE;
    }
    o.open_loop = o.rate_s != NULL;
    if (o.open_loop && o.duration > 0) {
        fprintf(stderr, "tandem bench serve: --duration is for the closed loop; with --rate "
                        "give --requests\n");
        return TOOL_EXIT_USAGE;
    }
    if (!sv_parse_list(o.open_loop ? o.rate_s : o.conc_s, o.levels, &o.n_levels, !o.open_loop)) {
        fprintf(stderr, "tandem bench serve: %s must be a list of up to %d positive %s, e.g. %s\n",
                o.open_loop ? "--rate" : "--concurrency", SV_MAX_LEVELS,
                o.open_loop ? "numbers" : "integers", o.open_loop ? "2,4" : "1,2,4,8");
        return TOOL_EXIT_USAGE;
    }
    for (int i = 0; !o.open_loop && i < o.n_levels; i++)
        if (o.levels[i] > 4096) {
            fprintf(stderr, "tandem bench serve: a concurrency of at most 4096\n");
            return TOOL_EXIT_USAGE;
        }
    if (!sv_parse_url(&o))
        return TOOL_EXIT_USAGE;
    char headers[1024];
    int hl = snprintf(headers, sizeof(headers),
                      "Content-Type: application/json\r\nAccept: text/event-stream\r\n");
    if (o.api_key != NULL) {
        if (strpbrk(o.api_key, "\r\n") != NULL ||
            snprintf(headers + hl, sizeof(headers) - (size_t)hl, "Authorization: Bearer %s\r\n",
                     o.api_key) >= (int)sizeof(headers) - hl) {
            fprintf(stderr, "tandem bench serve: --api-key too long or with a line break\n");
            return TOOL_EXIT_USAGE;
        }
    }

    sv_level_t lv[SV_MAX_LEVELS];
    int n_done = 0, failed = 0;
    fprintf(stderr, "bench serve: %s%s, %s prompts, %s loop, %d level(s) of %s%d requests\n", o.url,
            o.path, o.prompts_s, o.open_loop ? "open" : "closed", o.n_levels,
            o.duration > 0 ? "at most " : "", o.requests);
    for (int i = 0; i < o.n_levels; i++) {
        if (!sv_run_level(&o, i, headers, &lv[i]))
            return TOOL_EXIT_FAIL;
        failed += lv[i].failed;
        n_done++;
    }
    rc = TOOL_EXIT_OK;
    if (o.json)
        sv_write_json(stdout, &o, lv, n_done);
    else
        sv_print_table(&o, lv, n_done);
    if (o.json_file != NULL) {
        FILE *f = fopen(o.json_file, "w");
        if (f == NULL) {
            tdm_log_error(MOD, "cannot write %s: %s", o.json_file, strerror(errno));
            rc = TOOL_EXIT_FAIL;
        } else {
            sv_write_json(f, &o, lv, n_done);
            if (fclose(f) != 0) {
                tdm_log_error(MOD, "writing %s failed (disk full?)", o.json_file);
                rc = TOOL_EXIT_FAIL;
            }
        }
    }
    if (o.svg != NULL) {
        sv_series_t s;
        sv_series_from_levels(&o, lv, n_done, &s);
        if (!sv_write_svg(o.svg, &s, 1))
            rc = TOOL_EXIT_FAIL;
    }
    if (failed > 0) {
        tdm_log_error(MOD, "%d request(s) failed (see the warnings above); exit status 1", failed);
        rc = TOOL_EXIT_FAIL;
    }
    return rc;
}
