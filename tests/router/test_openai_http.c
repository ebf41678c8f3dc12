/* The OpenAI HTTP front end (router/api_openai.c) against the fake core,
 * spoken to over raw sockets: every endpoint, streaming and not, the error
 * cases, slow clients, disconnects. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "api_openai.h"
#include "fake_core.h"
#include "tandem/log.h"
#include "tandem/metrics.h"
#include "tandem/net.h"

static int n_fail, n_ok;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (cond) {                                                                                \
            n_ok++;                                                                                \
            printf("ok   ");                                                                       \
        } else {                                                                                   \
            n_fail++;                                                                              \
            printf("FAIL %s:%d ", __FILE__, __LINE__);                                             \
        }                                                                                          \
        printf(__VA_ARGS__);                                                                       \
        printf("\n");                                                                              \
        fflush(stdout);                                                                            \
    } while (0)

/* ---- a small HTTP client ---- */

typedef struct resp {
    int status;
    char *head; /* status line and headers */
    char *body; /* de-chunked */
    size_t len;
    json_t *json; /* body parsed, or NULL */
} resp_t;

static void resp_free(resp_t *r)
{
    free(r->head);
    free(r->body);
    json_decref(r->json);
    memset(r, 0, sizeof(*r));
}

static int t_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int t_send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* A header's value (case-insensitive name) copied to out; false if absent. */
static bool resp_header(const resp_t *r, const char *name, char *out, size_t cap)
{
    const char *p = r->head;
    size_t nl = strlen(name);
    while (p != NULL && (p = strstr(p, "\r\n")) != NULL) {
        p += 2;
        if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (*v == ' ')
                v++;
            size_t n = strcspn(v, "\r\n");
            if (n >= cap)
                n = cap - 1;
            memcpy(out, v, n);
            out[n] = '\0';
            return true;
        }
    }
    return false;
}

static void dechunk(resp_t *r)
{
    char te[64];
    if (!resp_header(r, "Transfer-Encoding", te, sizeof(te)) || strcasecmp(te, "chunked") != 0)
        return;
    char *out = malloc(r->len + 1);
    size_t o = 0, i = 0;
    while (i < r->len) {
        size_t sz = strtoul(r->body + i, NULL, 16);
        char *eol = strstr(r->body + i, "\r\n");
        if (eol == NULL)
            break;
        i = (size_t)(eol - r->body) + 2;
        if (sz == 0 || i + sz > r->len)
            break;
        memcpy(out + o, r->body + i, sz);
        o += sz;
        i += sz + 2;
    }
    out[o] = '\0';
    free(r->body);
    r->body = out;
    r->len = o;
}

/* Reads a whole response (until the server closes). */
static int t_read_resp(int fd, resp_t *r)
{
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 4096 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
        ssize_t k = recv(fd, buf + n, cap - n - 1, 0);
        if (k <= 0)
            break;
        n += (size_t)k;
    }
    buf[n] = '\0';
    memset(r, 0, sizeof(*r));
    char *sep = strstr(buf, "\r\n\r\n");
    if (sep == NULL || sscanf(buf, "HTTP/1.%*d %d", &r->status) != 1) {
        free(buf);
        r->status = -1;
        return -1;
    }
    r->head = strndup(buf, (size_t)(sep - buf) + 2);
    r->len = n - (size_t)(sep + 4 - buf);
    r->body = malloc(r->len + 1);
    memcpy(r->body, sep + 4, r->len);
    r->body[r->len] = '\0';
    free(buf);
    dechunk(r);
    r->json = json_loadb(r->body, r->len, 0, NULL);
    return 0;
}

static int http(int port, const char *method, const char *path, const char *headers,
                const char *body, resp_t *r)
{
    int fd = t_connect(port);
    if (fd < 0) {
        memset(r, 0, sizeof(*r));
        r->status = -1;
        return -1;
    }
    size_t bl = body != NULL ? strlen(body) : 0;
    char *req = NULL;
    int n = asprintf(&req, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s%s\r\n",
                     method, path, headers != NULL ? headers : "", "");
    (void)n;
    char cl[64] = "";
    if (body != NULL)
        snprintf(cl, sizeof(cl), "Content-Length: %zu\r\n", bl);
    /* splice Content-Length before the blank line */
    size_t rl = strlen(req);
    req[rl - 2] = '\0';
    char *full = NULL;
    n = asprintf(&full, "%s%s\r\n", req, cl);
    free(req);
    int rc = t_send_all(fd, full, strlen(full));
    free(full);
    if (rc == 0 && bl > 0)
        rc = t_send_all(fd, body, bl);
    t_read_resp(fd, r);
    close(fd);
    return rc;
}

#define JSON_CT "Content-Type: application/json\r\n"

static int post(int port, const char *path, const char *body, resp_t *r)
{
    return http(port, "POST", path, JSON_CT, body, r);
}

/* The error object of a response: checks its shape and type. */
static bool is_error(const resp_t *r, int status, const char *type)
{
    json_t *e = json_object_get(r->json, "error");
    return r->status == status && json_is_object(e) &&
           json_is_string(json_object_get(e, "message")) && json_object_get(e, "param") != NULL &&
           json_object_get(e, "code") != NULL && json_is_string(json_object_get(e, "type")) &&
           strcmp(json_string_value(json_object_get(e, "type")), type) == 0;
}

static const char *err_param(const resp_t *r)
{
    const char *p = json_string_value(json_object_get(json_object_get(r->json, "error"), "param"));
    return p != NULL ? p : "";
}

static const char *err_code(const resp_t *r)
{
    const char *p = json_string_value(json_object_get(json_object_get(r->json, "error"), "code"));
    return p != NULL ? p : "";
}

static const char *err_msg(const resp_t *r)
{
    const char *p =
        json_string_value(json_object_get(json_object_get(r->json, "error"), "message"));
    return p != NULL ? p : "";
}

/* ---- SSE ---- */

typedef struct sse {
    json_t *events;  /* the JSON of each data line, [DONE] excluded */
    bool framing_ok; /* every event "data: ...\n\n", [DONE] last, nothing after */
    bool done_last;
} sse_t;

static void sse_parse(const resp_t *r, sse_t *s)
{
    s->events = json_array();
    s->framing_ok = true;
    s->done_last = false;
    const char *p = r->body, *end = r->body + r->len;
    while (p < end) {
        const char *e = strstr(p, "\n\n");
        if (e == NULL || strncmp(p, "data: ", 6) != 0 || s->done_last) {
            s->framing_ok = false;
            break;
        }
        if ((size_t)(e - p) == 12 && strncmp(p + 6, "[DONE]", 6) == 0) {
            s->done_last = true;
        } else {
            json_t *j = json_loadb(p + 6, (size_t)(e - p - 6), 0, NULL);
            if (j == NULL)
                s->framing_ok = false;
            else
                json_array_append_new(s->events, j);
        }
        p = e + 2;
    }
}

/* Joins a stream's text per choice and checks the chunk invariants. */
typedef struct stream_check {
    char text[8][4096];
    int finishes[8];
    bool role_first[8];
    bool one_id, objects_ok;
    json_t *usage;
} stream_check_t;

static void stream_summarize(const sse_t *s, bool chat, stream_check_t *c)
{
    memset(c, 0, sizeof(*c));
    c->one_id = true;
    c->objects_ok = true;
    bool seen[8] = {false};
    const char *id0 = NULL;
    size_t i;
    json_t *ev;
    json_array_foreach(s->events, i, ev)
    {
        const char *id = json_string_value(json_object_get(ev, "id"));
        if (id0 == NULL)
            id0 = id;
        if (id == NULL || strcmp(id, id0) != 0)
            c->one_id = false;
        const char *obj = json_string_value(json_object_get(ev, "object"));
        if (obj == NULL || strcmp(obj, chat ? "chat.completion.chunk" : "text_completion") != 0 ||
            !json_is_integer(json_object_get(ev, "created")) ||
            !json_is_string(json_object_get(ev, "model")))
            c->objects_ok = false;
        json_t *u = json_object_get(ev, "usage");
        if (json_is_object(u))
            c->usage = u;
        size_t j;
        json_t *ch;
        json_array_foreach(json_object_get(ev, "choices"), j, ch)
        {
            json_int_t idx = json_integer_value(json_object_get(ch, "index"));
            if (idx < 0 || idx >= 8)
                continue;
            const char *t;
            if (chat) {
                json_t *d = json_object_get(ch, "delta");
                if (!seen[idx])
                    c->role_first[idx] =
                        json_is_string(json_object_get(d, "role")) &&
                        strcmp(json_string_value(json_object_get(d, "role")), "assistant") == 0;
                t = json_string_value(json_object_get(d, "content"));
            } else {
                t = json_string_value(json_object_get(ch, "text"));
            }
            seen[idx] = true;
            if (t != NULL)
                strncat(c->text[idx], t, sizeof(c->text[idx]) - strlen(c->text[idx]) - 1);
            if (!json_is_null(json_object_get(ch, "finish_reason")))
                c->finishes[idx]++;
        }
    }
}

static bool resp_header_is(const resp_t *r, const char *name, const char *want)
{
    char v[256];
    return resp_header(r, name, v, sizeof(v)) && strncasecmp(v, want, strlen(want)) == 0;
}

static int64_t now_ms(void)
{
    return tdm_net_now_ms();
}

/* ---- the checks ---- */

static rt_core_t *core;
static int port;  /* no auth, registry */
static int port2; /* api key, small body limit, short timeout */
static const char *choice_text(const resp_t *r, size_t i, bool chat)
{
    json_t *ch = json_array_get(json_object_get(r->json, "choices"), i);
    if (chat)
        return json_string_value(json_object_get(json_object_get(ch, "message"), "content"));
    return json_string_value(json_object_get(ch, "text"));
}

static const char *choice_finish(const resp_t *r, size_t i)
{
    json_t *ch = json_array_get(json_object_get(r->json, "choices"), i);
    return json_string_value(json_object_get(ch, "finish_reason"));
}

static json_int_t usage_of(const resp_t *r, const char *k)
{
    return json_integer_value(json_object_get(json_object_get(r->json, "usage"), k));
}

static void test_simple_endpoints(void)
{
    resp_t r;
    http(port, "GET", "/health", NULL, NULL, &r);
    CHECK(r.status == 200, "GET /health: %d", r.status);
    resp_free(&r);
    http(port, "GET", "/ready", NULL, NULL, &r);
    CHECK(r.status == 200, "GET /ready: %d", r.status);
    resp_free(&r);
    fake_core_set_ready(core, false);
    http(port, "GET", "/ready", NULL, NULL, &r);
    CHECK(is_error(&r, 503, "server_error"), "GET /ready when the core is not: %d %s", r.status,
          r.body);
    resp_free(&r);
    fake_core_set_ready(core, true);

    http(port, "GET", "/v1/models", NULL, NULL, &r);
    json_t *m = json_array_get(json_object_get(r.json, "data"), 0);
    CHECK(r.status == 200 && resp_header_is(&r, "Content-Type", "application/json") &&
              strcmp(json_string_value(json_object_get(r.json, "object")), "list") == 0 &&
              json_array_size(json_object_get(r.json, "data")) == 1 &&
              strcmp(json_string_value(json_object_get(m, "id")), "tiny") == 0 &&
              strcmp(json_string_value(json_object_get(m, "object")), "model") == 0 &&
              strcmp(json_string_value(json_object_get(m, "owned_by")), "tandem") == 0 &&
              json_integer_value(json_object_get(m, "created")) == FAKE_CORE_CREATED &&
              json_integer_value(json_object_get(m, "max_model_len")) == FAKE_CORE_MAX_MODEL_LEN,
          "GET /v1/models: %s", r.body);
    resp_free(&r);

    http(port, "GET", "/metrics", NULL, NULL, &r);
    CHECK(r.status == 200 && strstr(r.body, "test_openai_scrapes_total") != NULL,
          "GET /metrics renders the registry (%d)", r.status);
    resp_free(&r);
    http(port2, "GET", "/metrics", NULL, NULL, &r);
    CHECK(is_error(&r, 404, "invalid_request_error"), "GET /metrics without a registry: 404");
    resp_free(&r);

    /* tokenize / detokenize */
    post(port, "/tokenize", "{\"model\":\"tiny\",\"prompt\":\"Hello world\"}", &r);
    json_t *toks = json_object_get(r.json, "tokens");
    CHECK(r.status == 200 && json_array_size(toks) > 0 &&
              json_integer_value(json_object_get(r.json, "count")) ==
                  (json_int_t)json_array_size(toks) &&
              json_integer_value(json_object_get(r.json, "max_model_len")) ==
                  FAKE_CORE_MAX_MODEL_LEN,
          "POST /tokenize: %s", r.body);
    char *tj = json_dumps(toks, JSON_COMPACT);
    char body[1024];
    snprintf(body, sizeof(body), "{\"tokens\":%s}", tj != NULL ? tj : "[]");
    free(tj);
    resp_free(&r);
    post(port, "/detokenize", body, &r);
    CHECK(r.status == 200 &&
              strcmp(json_string_value(json_object_get(r.json, "prompt")), "Hello world") == 0,
          "POST /detokenize round trip: %s", r.body);
    resp_free(&r);
    post(port, "/tokenize", "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &r);
    CHECK(r.status == 200 && json_integer_value(json_object_get(r.json, "count")) > 3,
          "POST /tokenize with messages: %s", r.body);
    resp_free(&r);
    post(port, "/detokenize", "{\"tokens\":[99999]}", &r);
    CHECK(is_error(&r, 400, "invalid_request_error"), "detokenize of a bad id: 400");
    resp_free(&r);
    post(port, "/tokenize", "{\"model\":\"nope\",\"prompt\":\"x\"}", &r);
    CHECK(is_error(&r, 404, "invalid_request_error") &&
              strcmp(err_code(&r), "model_not_found") == 0,
          "tokenize with an unknown model: 404");
    resp_free(&r);
}

/* Non-streamed and streamed completions agree; SSE invariants hold. */
static void test_generate_pair(const char *what, const char *path, const char *fields, bool chat,
                               int n_choices)
{
    char body[4096];
    resp_t a, b;
    snprintf(body, sizeof(body), "{%s}", fields);
    post(port, path, body, &a);
    json_t *choices = json_object_get(a.json, "choices");
    const char *id = json_string_value(json_object_get(a.json, "id"));
    CHECK(a.status == 200 && json_array_size(choices) == (size_t)n_choices && id != NULL &&
              strncmp(id, chat ? "chatcmpl-" : "cmpl-", chat ? 9 : 5) == 0 &&
              strcmp(json_string_value(json_object_get(a.json, "object")),
                     chat ? "chat.completion" : "text_completion") == 0 &&
              json_is_integer(json_object_get(a.json, "created")) &&
              json_is_string(json_object_get(a.json, "model")),
          "%s: whole answer, %d choice(s): %.300s", what, n_choices, a.body);
    bool idx_ok = true, finish_ok = true;
    for (int i = 0; i < n_choices; i++) {
        json_t *ch = json_array_get(choices, (size_t)i);
        idx_ok &= json_integer_value(json_object_get(ch, "index")) == i;
        const char *f = choice_finish(&a, (size_t)i);
        finish_ok &= f != NULL && (strcmp(f, "length") == 0 || strcmp(f, "stop") == 0);
        if (chat)
            idx_ok &=
                strcmp(json_string_value(json_object_get(json_object_get(ch, "message"), "role")),
                       "assistant") == 0;
    }
    CHECK(idx_ok && finish_ok, "%s: indexes in order, finish_reason set", what);
    CHECK(usage_of(&a, "prompt_tokens") > 0 && usage_of(&a, "completion_tokens") > 0 &&
              usage_of(&a, "total_tokens") ==
                  usage_of(&a, "prompt_tokens") + usage_of(&a, "completion_tokens") &&
              json_is_integer(json_object_get(
                  json_object_get(json_object_get(a.json, "usage"), "prompt_tokens_details"),
                  "cached_tokens")),
          "%s: usage %lld + %lld", what, (long long)usage_of(&a, "prompt_tokens"),
          (long long)usage_of(&a, "completion_tokens"));

    snprintf(body, sizeof(body), "{%s,\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
             fields);
    post(port, path, body, &b);
    sse_t s;
    sse_parse(&b, &s);
    stream_check_t c;
    stream_summarize(&s, chat, &c);
    CHECK(b.status == 200 && resp_header_is(&b, "Content-Type", "text/event-stream") &&
              s.framing_ok && s.done_last && json_array_size(s.events) > 1,
          "%s: SSE framing, [DONE] last (%zu events)", what, json_array_size(s.events));
    CHECK(c.one_id && c.objects_ok, "%s: one id, object/created/model in every chunk", what);
    bool same = true, once = true, role = true;
    for (int i = 0; i < n_choices; i++) {
        const char *t = choice_text(&a, (size_t)i, chat);
        same &= t != NULL && strcmp(t, c.text[i]) == 0;
        once &= c.finishes[i] == 1;
        role &= !chat || c.role_first[i];
    }
    CHECK(same, "%s: joined stream text == whole text (\"%.60s\")", what, c.text[0]);
    CHECK(once, "%s: finish_reason exactly once per choice", what);
    if (chat)
        CHECK(role, "%s: role assistant in the first delta of each choice", what);
    json_t *last = json_array_get(s.events, json_array_size(s.events) - 1);
    CHECK(json_array_size(json_object_get(last, "choices")) == 0 && c.usage != NULL &&
              json_equal(json_object_get(a.json, "usage"), json_object_get(last, "usage")),
          "%s: include_usage chunk last, same usage as the whole answer", what);
    json_decref(s.events);
    resp_free(&a);
    resp_free(&b);
}

static void test_generation(void)
{
    test_generate_pair("completions", "/v1/completions",
                       "\"model\":\"tiny\",\"prompt\":\"Hello world\",\"max_tokens\":12", false, 1);
    test_generate_pair("chat", "/v1/chat/completions",
                       "\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi "
                       "there\"}],\"max_tokens\":10",
                       true, 1);
    test_generate_pair(
        "chat, text parts", "/v1/chat/completions",
        "\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":"
        "\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hi\"},{\"type\":"
        "\"text\",\"text\":\"there\"}]}],\"max_completion_tokens\":6,\"user\":\"u1\","
        "\"some_unknown_field\":{\"x\":1}",
        true, 1);
    test_generate_pair("completions n=2", "/v1/completions",
                       "\"prompt\":\"abc\",\"max_tokens\":8,\"n\":2,\"seed\":7,\"temperature\":0.8",
                       false, 2);
    test_generate_pair("chat n=2", "/v1/chat/completions",
                       "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":5,"
                       "\"n\":2,\"seed\":1,\"temperature\":1",
                       true, 2);
    test_generate_pair("list of prompts", "/v1/completions",
                       "\"prompt\":[\"one two\",\"three four\",\"five\"],\"max_tokens\":6", false,
                       3);
    test_generate_pair("token-id prompt", "/v1/completions",
                       "\"prompt\":[10,20,30,40],\"max_tokens\":7", false, 1);
    test_generate_pair("list of token-id prompts", "/v1/completions",
                       "\"prompt\":[[10,20],[30,40,50]],\"max_tokens\":5", false, 2);

    resp_t a, b, c;
    /* n=2 with a seed: seeds seed+i differ */
    post(port, "/v1/completions",
         "{\"prompt\":\"abc\",\"max_tokens\":8,\"n\":2,\"seed\":7,\"temperature\":0.8}", &a);
    CHECK(a.status == 200 && strcmp(choice_text(&a, 0, false), choice_text(&a, 1, false)) != 0,
          "n=2 with a seed: the two choices differ");
    resp_free(&a);
    /* a list of prompts answers as each prompt alone, in order */
    post(port, "/v1/completions", "{\"prompt\":[\"one two\",\"three four\"],\"max_tokens\":6}", &a);
    post(port, "/v1/completions", "{\"prompt\":\"one two\",\"max_tokens\":6}", &b);
    post(port, "/v1/completions", "{\"prompt\":\"three four\",\"max_tokens\":6}", &c);
    CHECK(a.status == 200 && strcmp(choice_text(&a, 0, false), choice_text(&b, 0, false)) == 0 &&
              strcmp(choice_text(&a, 1, false), choice_text(&c, 0, false)) == 0 &&
              usage_of(&a, "prompt_tokens") ==
                  usage_of(&b, "prompt_tokens") + usage_of(&c, "prompt_tokens"),
          "list prompts: choice i is prompt i's answer; prompt tokens summed");
    resp_free(&a);
    resp_free(&b);
    resp_free(&c);
    /* absent max_tokens: up to the model length */
    post(port, "/v1/completions", "{\"prompt\":[1,2,3,4,5,6,7,8,9,10]}", &a);
    CHECK(a.status == 200 && usage_of(&a, "completion_tokens") == FAKE_CORE_MAX_MODEL_LEN - 10 &&
              strcmp(choice_finish(&a, 0), "length") == 0,
          "no max_tokens: %lld tokens (max_model_len - prompt)",
          (long long)usage_of(&a, "completion_tokens"));
    resp_free(&a);

    /* stop strings */
    post(port, "/v1/completions", "{\"prompt\":\"Hello stop\",\"max_tokens\":40}", &a);
    const char *full = choice_text(&a, 0, false);
    char stop[2] = "";
    size_t at = 0;
    for (size_t i = 3; full != NULL && full[i] != '\0'; i++)
        if (full[i] >= 'a' && full[i] <= 'z') {
            stop[0] = full[i];
            at = strchr(full, full[i]) - full;
            break;
        }
    char body[256];
    snprintf(body, sizeof(body),
             "{\"prompt\":\"Hello stop\",\"max_tokens\":40,\"stop\":[\"%s\",\"#never#\"]}", stop);
    post(port, "/v1/completions", body, &b);
    CHECK(stop[0] != '\0' && b.status == 200 && strlen(choice_text(&b, 0, false)) == at &&
              strncmp(choice_text(&b, 0, false), full, at) == 0 &&
              strcmp(choice_finish(&b, 0), "stop") == 0,
          "stop \"%s\": text cut before it (%zu bytes), finish stop", stop, at);
    resp_free(&b);
    snprintf(body, sizeof(body),
             "{\"prompt\":\"Hello stop\",\"max_tokens\":40,\"stop\":\"%s\",\"stream\":true}", stop);
    post(port, "/v1/completions", body, &b);
    sse_t s;
    sse_parse(&b, &s);
    stream_check_t sc;
    stream_summarize(&s, false, &sc);
    CHECK(s.done_last && strlen(sc.text[0]) == at && sc.finishes[0] == 1,
          "stop string in a stream: same cut");
    json_decref(s.events);
    resp_free(&b);
    resp_free(&a);

    /* sampling fields reach the core */
    post(port, "/v1/completions",
         "{\"prompt\":\"x\",\"max_tokens\":3,\"temperature\":0.5,\"top_p\":0.9,\"top_k\":40,"
         "\"min_p\":0.05,\"presence_penalty\":0.5,\"frequency_penalty\":-0.5,"
         "\"repetition_penalty\":1.1,\"seed\":42,\"ignore_eos\":true,\"stop_token_ids\":[5,6],"
         "\"echo\":false}",
         &a);
    fake_core_request_t last;
    bool have = fake_core_last_request(core, &last);
    CHECK(a.status == 200 && have && last.sampling.temperature == 0.5f &&
              last.sampling.top_p == 0.9f && last.sampling.top_k == 40 &&
              last.sampling.min_p == 0.05f && last.sampling.presence_penalty == 0.5f &&
              last.sampling.frequency_penalty == -0.5f &&
              last.sampling.repetition_penalty == 1.1f && last.sampling.has_seed &&
              last.sampling.seed == 42 && last.ignore_eos && last.n_stop_token_ids == 2 &&
              last.max_tokens == 3,
          "sampling fields passed to the core");
    resp_free(&a);
}

static void test_logprobs(void)
{
    resp_t a, b;
    post(port, "/v1/completions", "{\"prompt\":\"lp\",\"max_tokens\":6,\"logprobs\":2}", &a);
    json_t *lp = json_object_get(json_array_get(json_object_get(a.json, "choices"), 0), "logprobs");
    json_t *tokens = json_object_get(lp, "tokens"), *tl = json_object_get(lp, "token_logprobs");
    json_t *tops = json_object_get(lp, "top_logprobs"), *off = json_object_get(lp, "text_offset");
    bool ok = a.status == 200 && json_array_size(tokens) == 6 && json_array_size(tl) == 6 &&
              json_array_size(tops) == 6 && json_array_size(off) == 6;
    json_int_t prev = -1;
    for (size_t i = 0; ok && i < 6; i++) {
        ok &= json_is_string(json_array_get(tokens, i)) && json_is_number(json_array_get(tl, i)) &&
              json_is_object(json_array_get(tops, i)) &&
              json_object_size(json_array_get(tops, i)) >= 1 &&
              json_object_size(json_array_get(tops, i)) <= 2 &&
              json_integer_value(json_array_get(off, i)) >= prev;
        prev = json_integer_value(json_array_get(off, i));
    }
    CHECK(ok, "completions logprobs=2: tokens, token_logprobs, top_logprobs, text_offset: %.300s",
          a.body);
    resp_free(&a);

    post(port, "/v1/completions",
         "{\"prompt\":\"lp\",\"max_tokens\":6,\"logprobs\":1,\"stream\":true}", &b);
    sse_t s;
    sse_parse(&b, &s);
    size_t n_tok = 0, i;
    json_t *ev;
    json_array_foreach(s.events, i, ev)
    {
        json_t *l = json_object_get(json_array_get(json_object_get(ev, "choices"), 0), "logprobs");
        n_tok += json_array_size(json_object_get(l, "tokens"));
    }
    CHECK(s.done_last && n_tok == 6, "streamed completions logprobs: %zu tokens over the chunks",
          n_tok);
    json_decref(s.events);
    resp_free(&b);

    post(port, "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"}],\"max_tokens\":5,\"logprobs\":true,"
         "\"top_logprobs\":3}",
         &a);
    json_t *content = json_object_get(
        json_object_get(json_array_get(json_object_get(a.json, "choices"), 0), "logprobs"),
        "content");
    ok = a.status == 200 && json_array_size(content) == 5;
    json_array_foreach(content, i, ev)
    {
        json_t *t = json_object_get(ev, "top_logprobs");
        ok &= json_is_string(json_object_get(ev, "token")) &&
              json_is_number(json_object_get(ev, "logprob")) &&
              json_is_array(json_object_get(ev, "bytes")) && json_array_size(t) == 3 &&
              json_is_string(json_object_get(json_array_get(t, 0), "token")) &&
              json_is_number(json_object_get(json_array_get(t, 0), "logprob")) &&
              json_is_array(json_object_get(json_array_get(t, 0), "bytes"));
    }
    CHECK(ok, "chat logprobs + top_logprobs 3: content entries with token/logprob/bytes/tops");
    resp_free(&a);
    post(port, "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"}],\"max_tokens\":4,\"logprobs\":true,"
         "\"stream\":true}",
         &b);
    sse_parse(&b, &s);
    size_t n_entries = 0;
    json_array_foreach(s.events, i, ev)
    {
        json_t *l = json_object_get(json_array_get(json_object_get(ev, "choices"), 0), "logprobs");
        n_entries += json_array_size(json_object_get(l, "content"));
    }
    CHECK(s.done_last && n_entries == 4, "streamed chat logprobs: %zu entries", n_entries);
    json_decref(s.events);
    resp_free(&b);
    post(port, "/v1/completions", "{\"prompt\":\"lp\",\"max_tokens\":3}", &a);
    CHECK(json_is_null(
              json_object_get(json_array_get(json_object_get(a.json, "choices"), 0), "logprobs")),
          "no logprobs asked: logprobs null");
    resp_free(&a);
}

typedef struct bad_case {
    const char *what, *path, *body;
    int status;
    const char *param; /* NULL: not checked */
    const char *code;  /* NULL: not checked */
} bad_case_t;

static void test_errors(void)
{
    static const bad_case_t cases[] = {
        {"invalid JSON", "/v1/completions", "{\"prompt\": ", 400, NULL, NULL},
        {"not an object", "/v1/completions", "[1,2]", 400, NULL, NULL},
        {"empty body", "/v1/chat/completions", "", 400, NULL, NULL},
        {"max_tokens a string", "/v1/completions", "{\"prompt\":\"x\",\"max_tokens\":\"5\"}", 400,
         "max_tokens", NULL},
        {"max_tokens 0", "/v1/completions", "{\"prompt\":\"x\",\"max_tokens\":0}", 400,
         "max_tokens", NULL},
        {"max_tokens -3", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":-3}", 400,
         "max_tokens", NULL},
        {"max_completion_tokens 0", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_completion_tokens\":0}", 400,
         "max_completion_tokens", NULL},
        {"temperature a string", "/v1/completions", "{\"prompt\":\"x\",\"temperature\":\"hot\"}",
         400, "temperature", NULL},
        {"temperature 3", "/v1/completions", "{\"prompt\":\"x\",\"temperature\":3}", 400,
         "temperature", NULL},
        {"top_p 0", "/v1/completions", "{\"prompt\":\"x\",\"top_p\":0}", 400, "top_p", NULL},
        {"n 17", "/v1/completions", "{\"prompt\":\"x\",\"n\":17}", 400, "n", NULL},
        {"n 1.5", "/v1/completions", "{\"prompt\":\"x\",\"n\":1.5}", 400, "n", NULL},
        {"presence_penalty 3", "/v1/completions", "{\"prompt\":\"x\",\"presence_penalty\":3}", 400,
         "presence_penalty", NULL},
        {"frequency_penalty -2.5", "/v1/completions",
         "{\"prompt\":\"x\",\"frequency_penalty\":-2.5}", 400, "frequency_penalty", NULL},
        {"stop a number", "/v1/completions", "{\"prompt\":\"x\",\"stop\":5}", 400, "stop", NULL},
        {"17 stop strings", "/v1/completions",
         "{\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\",\"j\","
         "\"k\",\"l\",\"m\",\"n\",\"o\",\"p\",\"q\"]}",
         400, "stop", NULL},
        {"seed a string", "/v1/completions", "{\"prompt\":\"x\",\"seed\":\"1\"}", 400, "seed",
         NULL},
        {"seed -1", "/v1/completions", "{\"prompt\":\"x\",\"seed\":-1}", 400, "seed", NULL},
        {"seed -1 (chat)", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"seed\":-1}", 400, "seed", NULL},
        {"best_of 2", "/v1/completions", "{\"prompt\":\"x\",\"best_of\":2}", 400, "best_of", NULL},
        {"best_of under n", "/v1/completions", "{\"prompt\":\"x\",\"n\":2,\"best_of\":1}", 400,
         "best_of", NULL},
        {"best_of 0", "/v1/completions", "{\"prompt\":\"x\",\"best_of\":0}", 400, "best_of", NULL},
        {"best_of 1.5", "/v1/completions", "{\"prompt\":\"x\",\"best_of\":1.5}", 400, "best_of",
         NULL},
        {"best_of 3 (chat)", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":3,\"best_of\":3}", 400,
         "best_of", NULL},
        {"stream a string", "/v1/completions", "{\"prompt\":\"x\",\"stream\":\"yes\"}", 400,
         "stream", NULL},
        {"completions logprobs 6", "/v1/completions", "{\"prompt\":\"x\",\"logprobs\":6}", 400,
         "logprobs", NULL},
        {"completions logprobs true", "/v1/completions", "{\"prompt\":\"x\",\"logprobs\":true}",
         400, "logprobs", NULL},
        {"chat top_logprobs 21", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,\"top_logprobs\""
         ":21}",
         400, "top_logprobs", NULL},
        {"chat top_logprobs without logprobs", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":2}", 400,
         "top_logprobs", NULL},
        {"echo", "/v1/completions", "{\"prompt\":\"x\",\"echo\":true}", 400, "echo", NULL},
        {"model a number", "/v1/completions", "{\"model\":5,\"prompt\":\"x\"}", 400, "model", NULL},
        {"unknown model", "/v1/completions", "{\"model\":\"gpt-9\",\"prompt\":\"x\"}", 404, "model",
         "model_not_found"},
        {"unknown model (chat)", "/v1/chat/completions",
         "{\"model\":\"gpt-9\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 404, "model",
         "model_not_found"},
        {"empty prompt", "/v1/completions", "{\"prompt\":\"\"}", 400, "prompt", NULL},
        {"empty prompt list", "/v1/completions", "{\"prompt\":[]}", 400, "prompt", NULL},
        {"no prompt", "/v1/completions", "{\"max_tokens\":3}", 400, "prompt", NULL},
        {"prompt a number", "/v1/completions", "{\"prompt\":5}", 400, "prompt", NULL},
        {"mixed prompt list", "/v1/completions", "{\"prompt\":[\"a\",[1,2]]}", 400, "prompt[1]",
         NULL},
        {"token id outside the vocabulary", "/v1/completions", "{\"prompt\":[1,2,100000]}", 400,
         "prompt", NULL},
        {"negative token id", "/v1/completions", "{\"prompt\":[[1,-2]]}", 400, "prompt[0]", NULL},
        {"no messages", "/v1/chat/completions", "{\"max_tokens\":3}", 400, "messages", NULL},
        {"empty messages", "/v1/chat/completions", "{\"messages\":[]}", 400, "messages", NULL},
        {"message not an object", "/v1/chat/completions", "{\"messages\":[\"hi\"]}", 400,
         "messages[0]", NULL},
        {"message role a number", "/v1/chat/completions",
         "{\"messages\":[{\"role\":1,\"content\":\"x\"}]}", 400, "messages[0].role", NULL},
        {"bad role", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}", 400, NULL, NULL},
        {"image part", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{"
         "\"url\":\"http://x\"}}]}]}",
         400, "messages[0].content[0]", NULL},
        {"content a number", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":7}]}", 400, "messages[0].content", NULL},
        {"stop_token_ids bad", "/v1/completions", "{\"prompt\":\"x\",\"stop_token_ids\":[\"a\"]}",
         400, "stop_token_ids", NULL},
        {"core refuses (fake reject model)", "/v1/completions",
         "{\"model\":\"reject\",\"prompt\":\"x\"}", 400, NULL, NULL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const bad_case_t *c = &cases[i];
        resp_t r;
        post(port, c->path, c->body, &r);
        bool ok = is_error(&r, c->status, "invalid_request_error") &&
                  (c->param == NULL || strcmp(err_param(&r), c->param) == 0) &&
                  (c->code == NULL || strcmp(err_code(&r), c->code) == 0);
        CHECK(ok, "%s: %d, param \"%s\": %s", c->what, r.status, err_param(&r), err_msg(&r));
        resp_free(&r);
    }

    resp_t r;
    /* too long: prompt + max_tokens over max_model_len (vLLM's words) */
    post(port, "/v1/completions", "{\"prompt\":\"Hello\",\"max_tokens\":600}", &r);
    CHECK(is_error(&r, 400, "invalid_request_error") &&
              strstr(err_msg(&r), "This model's maximum context length is 512 tokens. However, "
                                  "you requested") != NULL,
          "prompt + max_tokens too long: %s", err_msg(&r));
    resp_free(&r);
    char *big = malloc(8192);
    strcpy(big, "{\"prompt\":[");
    for (int i = 0; i < 600; i++)
        strcat(big, i ? ",7" : "7");
    strcat(big, "]}");
    post(port, "/v1/completions", big, &r);
    CHECK(is_error(&r, 400, "invalid_request_error") &&
              strstr(err_msg(&r), "maximum context length is 512") != NULL,
          "600-token prompt without max_tokens: %s", err_msg(&r));
    resp_free(&r);
    free(big);
    /* invalid UTF-8 in the body */
    post(port, "/v1/completions", "{\"prompt\":\"caf\xC3\x28 \xFF\"}", &r);
    CHECK(is_error(&r, 400, "invalid_request_error") && strstr(err_msg(&r), "UTF-8") != NULL,
          "invalid UTF-8: %s", err_msg(&r));
    resp_free(&r);
    /* paths, methods, content types */
    post(port, "/v1/nothing", "{}", &r);
    CHECK(is_error(&r, 404, "invalid_request_error"), "unknown path: %d", r.status);
    resp_free(&r);
    http(port, "GET", "/nope", NULL, NULL, &r);
    CHECK(is_error(&r, 404, "invalid_request_error"), "GET unknown path: %d", r.status);
    resp_free(&r);
    http(port, "GET", "/v1/completions", NULL, NULL, &r);
    char allow[64] = "";
    resp_header(&r, "Allow", allow, sizeof(allow));
    CHECK(is_error(&r, 405, "invalid_request_error") && strcmp(allow, "POST") == 0,
          "GET /v1/completions: 405, Allow %s", allow);
    resp_free(&r);
    http(port, "DELETE", "/v1/models", NULL, NULL, &r);
    CHECK(is_error(&r, 405, "invalid_request_error"), "DELETE /v1/models: 405");
    resp_free(&r);
    http(port, "POST", "/v1/completions", "Content-Type: text/plain\r\n", "{\"prompt\":\"x\"}", &r);
    CHECK(is_error(&r, 415, "invalid_request_error"), "Content-Type text/plain: 415");
    resp_free(&r);
    http(port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":2}", &r);
    CHECK(r.status == 200, "no Content-Type: accepted (%d)", r.status);
    resp_free(&r);
    http(port, "POST", "/v1/completions", "Content-Type: application/json; charset=utf-8\r\n",
         "{\"prompt\":\"x\",\"max_tokens\":2}", &r);
    CHECK(r.status == 200, "Content-Type with charset: accepted (%d)", r.status);
    resp_free(&r);

    /* errors from the core */
    static const struct {
        const char *model;
        int status;
    } fails[] = {{"fail-503", 503}, {"fail-504", 504}, {"fail-500", 500}, {"fail-400", 400}};
    for (size_t i = 0; i < sizeof(fails) / sizeof(fails[0]); i++) {
        char body[256];
        for (int stream = 0; stream < 2; stream++) {
            snprintf(body, sizeof(body), "{\"model\":\"%s\",\"prompt\":\"x\",\"stream\":%s}",
                     fails[i].model, stream ? "true" : "false");
            post(port, "/v1/completions", body, &r);
            CHECK(is_error(&r, fails[i].status,
                           fails[i].status >= 500 ? "server_error" : "invalid_request_error"),
                  "core error %s (%s): %d %s", fails[i].model, stream ? "stream" : "whole",
                  r.status, err_msg(&r));
            resp_free(&r);
        }
    }
    /* an error after the stream started: an error event, then [DONE] */
    post(port, "/v1/chat/completions",
         "{\"model\":\"fail-mid\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
         "\"stream\":true}",
         &r);
    sse_t s;
    sse_parse(&r, &s);
    json_t *last = json_array_get(s.events, json_array_size(s.events) - 1);
    json_t *err = json_object_get(last, "error");
    CHECK(r.status == 200 && s.framing_ok && s.done_last && json_array_size(s.events) >= 2 &&
              json_is_object(err) && json_is_string(json_object_get(err, "message")) &&
              json_is_string(json_object_get(err, "type")),
          "error mid-stream: SSE error event then [DONE]: %.200s", r.body);
    json_decref(s.events);
    resp_free(&r);
    post(port, "/v1/chat/completions",
         "{\"model\":\"fail-mid\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &r);
    CHECK(is_error(&r, 503, "server_error"), "error after tokens, not streamed: 503");
    resp_free(&r);
}

static void test_auth_and_limits(void)
{
    resp_t r;
    const char *body = "{\"prompt\":\"x\",\"max_tokens\":2}";
    http(port2, "POST", "/v1/completions", JSON_CT, body, &r);
    CHECK(is_error(&r, 401, "invalid_request_error") &&
              strcmp(err_code(&r), "invalid_api_key") == 0,
          "no API key: 401 invalid_api_key");
    resp_free(&r);
    http(port2, "POST", "/v1/completions", JSON_CT "Authorization: Bearer wrong\r\n", body, &r);
    CHECK(is_error(&r, 401, "invalid_request_error") &&
              strcmp(err_code(&r), "invalid_api_key") == 0,
          "wrong API key: 401");
    resp_free(&r);
    http(port2, "POST", "/v1/completions", JSON_CT "Authorization: Bearer sekret-\r\n", body, &r);
    CHECK(r.status == 401, "a longer key: 401");
    resp_free(&r);
    http(port2, "GET", "/v1/models", "Authorization: Bearer sekret\r\n", NULL, &r);
    CHECK(r.status == 200, "right API key: 200");
    resp_free(&r);
    http(port2, "POST", "/v1/completions", JSON_CT "Authorization: Bearer sekret\r\n", body, &r);
    CHECK(r.status == 200, "right API key, completions: 200");
    resp_free(&r);
    http(port2, "GET", "/health", NULL, NULL, &r);
    CHECK(r.status == 200, "/health needs no key");
    resp_free(&r);

    /* a declared body over the limit: 413 before it is sent */
    int fd = t_connect(port2);
    const char *hdr = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      "Authorization: Bearer sekret\r\nContent-Type: application/json\r\n"
                      "Content-Length: 100000\r\n\r\n{\"prompt\":\"";
    t_send_all(fd, hdr, strlen(hdr));
    t_read_resp(fd, &r);
    close(fd);
    CHECK(is_error(&r, 413, "invalid_request_error"), "Content-Length over the limit: %d",
          r.status);
    resp_free(&r);
    /* a chunked body over the limit */
    fd = t_connect(port2);
    const char *ch = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     "Authorization: Bearer sekret\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n";
    t_send_all(fd, ch, strlen(ch));
    char *chunk = malloc(40000);
    memset(chunk, 'a', 40000);
    char sz[32];
    snprintf(sz, sizeof(sz), "%x\r\n", 40000);
    for (int i = 0; i < 3; i++) {
        if (i == 2 && t_send_all(fd, "0\r\n\r\n", 5) == 0)
            break;
        if (t_send_all(fd, sz, strlen(sz)) != 0 || t_send_all(fd, chunk, 40000) != 0 ||
            t_send_all(fd, "\r\n", 2) != 0)
            break;
    }
    free(chunk);
    t_read_resp(fd, &r);
    close(fd);
    CHECK(is_error(&r, 413, "invalid_request_error"), "chunked body over the limit: %d", r.status);
    resp_free(&r);
}

/* Issue 13: the API key guards every path but /health, /ready and
 * /metrics; /tokenize and /detokenize take what a context needs, not the
 * generation endpoints' 4 MiB; best_of and seed are checked. */
static void test_key_everywhere_and_endpoint_limits(void)
{
    resp_t r;
    static const char *const open_paths[] = {"/health", "/ready"};
    for (size_t i = 0; i < 2; i++) {
        http(port2, "GET", open_paths[i], NULL, NULL, &r);
        CHECK(r.status == 200, "%s needs no key: %d", open_paths[i], r.status);
        resp_free(&r);
    }
    static const char *const tok_paths[] = {"/tokenize", "/detokenize"};
    static const char *const tok_bodies[] = {"{\"prompt\":\"Hello\"}", "{\"tokens\":[100,200]}"};
    for (size_t i = 0; i < 2; i++) {
        http(port2, "POST", tok_paths[i], JSON_CT, tok_bodies[i], &r);
        CHECK(is_error(&r, 401, "invalid_request_error") &&
                  strcmp(err_code(&r), "invalid_api_key") == 0,
              "%s without the key: %d", tok_paths[i], r.status);
        resp_free(&r);
        http(port2, "POST", tok_paths[i], JSON_CT "Authorization: Bearer wrong\r\n", tok_bodies[i],
             &r);
        CHECK(r.status == 401, "%s with a wrong key: %d", tok_paths[i], r.status);
        resp_free(&r);
        http(port2, "POST", tok_paths[i], JSON_CT "Authorization: Bearer sekret\r\n", tok_bodies[i],
             &r);
        CHECK(r.status == 200, "%s with the key: %d", tok_paths[i], r.status);
        resp_free(&r);
    }

    /* port: 4 MiB for generation; the fake model's 512 tokens give the
     * 64 KiB floor to /tokenize and /detokenize */
    for (size_t i = 0; i < 2; i++) {
        int fd = t_connect(port);
        char hdr[256];
        snprintf(hdr, sizeof(hdr),
                 "POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
                 "application/json\r\nContent-Length: 70000\r\n\r\n",
                 tok_paths[i]);
        t_send_all(fd, hdr, strlen(hdr));
        t_read_resp(fd, &r);
        close(fd);
        CHECK(is_error(&r, 413, "invalid_request_error") && strstr(err_msg(&r), tok_paths[i]) &&
                  strstr(err_msg(&r), "65536"),
              "%s: a 70000-byte body is 413: %s", tok_paths[i], err_msg(&r));
        resp_free(&r);
    }
    /* the same size is fine on /v1/completions (then too long a prompt) */
    size_t n = 70000;
    char *big = malloc(n + 64);
    int k = snprintf(big, n + 64, "{\"max_tokens\":1,\"prompt\":\"");
    for (size_t i = (size_t)k; i < n - 2; i++)
        big[i] = (i % 6 == 5) ? ' ' : 'a';
    memcpy(big + n - 2, "\"}", 3);
    post(port, "/v1/completions", big, &r);
    CHECK(is_error(&r, 400, "invalid_request_error") && strcmp(err_param(&r), "prompt") == 0,
          "a 70000-byte completion body is read (then 400 for the prompt's length): %d %s",
          r.status, err_msg(&r));
    resp_free(&r);
    /* and under its limit, /tokenize reads it */
    memcpy(big, "{\"prompt\":\"", 11);
    for (size_t i = 11; i < 60000; i++)
        big[i] = (i % 6 == 5) ? ' ' : 'a';
    memcpy(big + 60000, "\"}", 3);
    post(port, "/tokenize", big, &r);
    CHECK(r.status == 200 && json_integer_value(json_object_get(r.json, "count")) > 1000,
          "a 60000-byte /tokenize body: %d, %lld tokens", r.status,
          (long long)json_integer_value(json_object_get(r.json, "count")));
    resp_free(&r);
    free(big);

    /* best_of 1 (or n) and the largest seed are what tandem does */
    post(port, "/v1/completions", "{\"prompt\":\"x\",\"max_tokens\":2,\"best_of\":1}", &r);
    CHECK(r.status == 200, "best_of 1: %d %s", r.status, err_msg(&r));
    resp_free(&r);
    post(port, "/v1/completions",
         "{\"prompt\":\"x\",\"max_tokens\":2,\"seed\":9223372036854775807,\"temperature\":1}", &r);
    fake_core_request_t last;
    CHECK(r.status == 200 && fake_core_last_request(core, &last) && last.sampling.has_seed &&
              last.sampling.seed == 9223372036854775807ull,
          "seed 2^63-1: %d", r.status);
    resp_free(&r);
    post(port, "/v1/completions", "{\"prompt\":\"x\",\"best_of\":2}", &r);
    CHECK(r.status == 400 && strstr(err_msg(&r), "not supported") != NULL,
          "best_of 2 says it is not supported: %s", err_msg(&r));
    resp_free(&r);
}

static void test_request_id(void)
{
    resp_t r;
    char v[256] = "";
    http(port, "POST", "/v1/completions",
         JSON_CT "X-Request-Id: my-req-123\r\nx-model-tier: fast\r\n",
         "{\"prompt\":\"x\",\"max_tokens\":2}", &r);
    resp_header(&r, "X-Request-Id", v, sizeof(v));
    fake_core_request_t last;
    fake_core_last_request(core, &last);
    CHECK(r.status == 200 && strcmp(v, "my-req-123") == 0 &&
              strcmp(last.request_id, "my-req-123") == 0 && strcmp(last.tier, "fast") == 0,
          "X-Request-Id echoed and passed to the core (%s / %s), tier %s", v, last.request_id,
          last.tier);
    resp_free(&r);
    v[0] = '\0';
    post(port, "/v1/completions", "{\"prompt\":\"x\",\"max_tokens\":2}", &r);
    resp_header(&r, "X-Request-Id", v, sizeof(v));
    fake_core_last_request(core, &last);
    CHECK(strlen(v) > 4 && strcmp(v, last.request_id) == 0 && last.tier[0] == '\0',
          "X-Request-Id made when absent: %s", v);
    resp_free(&r);
    v[0] = '\0';
    post(port, "/v1/nothing", "{}", &r);
    CHECK(resp_header(&r, "X-Request-Id", v, sizeof(v)) && strlen(v) > 4,
          "X-Request-Id on errors too: %s", v);
    resp_free(&r);
}

/* A client that sends half its headers, one that trickles its body: the
 * others are served meanwhile, and the idle timeout closes them. */
static void test_slow_clients(void)
{
    int slow = t_connect(port2);
    const char *half = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthori";
    t_send_all(slow, half, strlen(half));
    int slow2 = t_connect(port2);
    const char *part =
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
        "Content-Length: 100\r\n\r\n{\"prompt\":";
    t_send_all(slow2, part, strlen(part));
    int64_t t0 = now_ms();
    bool all_ok = true;
    for (int i = 0; i < 3; i++) {
        resp_t r;
        http(port2, "POST", "/v1/completions", JSON_CT "Authorization: Bearer sekret\r\n",
             "{\"prompt\":\"y\",\"max_tokens\":3}", &r);
        all_ok &= r.status == 200;
        resp_free(&r);
    }
    int64_t dt = now_ms() - t0;
    CHECK(all_ok && dt < 1500, "3 requests served in %lld ms while two clients trickle",
          (long long)dt);
    /* the server's idle timeout (2 s) closes both */
    int closed = 0;
    int fds[2] = {slow, slow2};
    for (int i = 0; i < 2; i++) {
        struct pollfd p = {.fd = fds[i], .events = POLLIN};
        int64_t until = t0 + 6000;
        while (now_ms() < until) {
            if (poll(&p, 1, 100) > 0) {
                char b[512];
                ssize_t n = recv(fds[i], b, sizeof(b), MSG_DONTWAIT);
                if (n <= 0) {
                    closed++;
                    break;
                }
            }
        }
    }
    CHECK(closed == 2, "idle slow clients closed by the timeout (%d of 2) after %lld ms", closed,
          (long long)(now_ms() - t0));
    close(slow);
    close(slow2);
}

static bool wait_cancels(uint64_t want, int64_t ms, int64_t *took)
{
    int64_t t0 = now_ms();
    while (now_ms() - t0 < ms) {
        if (fake_core_cancels(core) >= want) {
            *took = now_ms() - t0;
            return true;
        }
        usleep(10000);
    }
    *took = now_ms() - t0;
    return false;
}

static bool wait_idle(int64_t ms)
{
    int64_t t0 = now_ms();
    while (now_ms() - t0 < ms) {
        if (fake_core_live(core) == 0)
            return true;
        usleep(10000);
    }
    return false;
}

static void test_disconnects(void)
{
    fake_core_set_token_delay_ms(core, 50);
    /* mid-stream */
    uint64_t c0 = fake_core_cancels(core);
    int fd = t_connect(port);
    const char *body = "{\"model\":\"slow\",\"prompt\":\"bye\",\"max_tokens\":200,\"stream\":true}";
    char req[512];
    snprintf(req, sizeof(req),
             "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             "Content-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    t_send_all(fd, req, strlen(req));
    char buf[4096];
    size_t got = 0;
    int64_t t0 = now_ms();
    while (now_ms() - t0 < 5000 && got < sizeof(buf) - 1) {
        ssize_t n = recv(fd, buf + got, sizeof(buf) - 1 - got, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
        buf[got] = '\0';
        if (strstr(buf, "data: ") != NULL && strstr(strstr(buf, "data: ") + 6, "data: ") != NULL)
            break;
    }
    CHECK(strstr(buf, "200 OK") != NULL && strstr(buf, "data: ") != NULL,
          "slow stream started (%zu bytes)", got);
    close(fd);
    int64_t took;
    bool ok = wait_cancels(c0 + 1, 2000, &took);
    CHECK(ok, "client gone mid-stream: cancel in %lld ms", (long long)took);
    CHECK(wait_idle(2000), "no core request left");

    /* non-streamed, suspended while the core works */
    c0 = fake_core_cancels(core);
    fd = t_connect(port);
    body = "{\"model\":\"slow\",\"prompt\":\"bye\",\"max_tokens\":200}";
    snprintf(req, sizeof(req),
             "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             "Content-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    t_send_all(fd, req, strlen(req));
    usleep(300000);
    close(fd);
    ok = wait_cancels(c0 + 1, 2000, &took);
    CHECK(ok, "client gone while waiting for a whole answer: cancel in %lld ms", (long long)took);
    CHECK(wait_idle(2000), "no core request left");

    /* tier "slow" streams with n=3, client leaves: three cancels */
    c0 = fake_core_cancels(core);
    fd = t_connect(port);
    body = "{\"prompt\":\"bye\",\"max_tokens\":200,\"n\":3,\"stream\":true}";
    snprintf(req, sizeof(req),
             "POST /v1/completions HTTP/1.1\r\nHost: x\r\nx-model-tier: slow\r\n"
             "Content-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    t_send_all(fd, req, strlen(req));
    usleep(200000);
    close(fd);
    ok = wait_cancels(c0 + 3, 2000, &took);
    CHECK(ok, "n=3 stream, client gone: 3 cancels in %lld ms", (long long)took);
    CHECK(wait_idle(2000), "no core request left");
    fake_core_set_token_delay_ms(core, 100);
}

typedef struct par_arg {
    int ok;
} par_arg_t;

static void *par_client(void *arg)
{
    par_arg_t *a = arg;
    for (int i = 0; i < 5; i++) {
        resp_t r;
        post(port, "/v1/chat/completions",
             "{\"messages\":[{\"role\":\"user\",\"content\":\"par\"}],\"max_tokens\":20,"
             "\"stream\":true}",
             &r);
        sse_t s;
        sse_parse(&r, &s);
        a->ok += r.status == 200 && s.done_last && s.framing_ok;
        json_decref(s.events);
        resp_free(&r);
    }
    return NULL;
}

static void test_parallel(void)
{
    pthread_t th[6];
    par_arg_t args[6] = {{0}};
    for (int i = 0; i < 6; i++)
        pthread_create(&th[i], NULL, par_client, &args[i]);
    int ok = 0;
    for (int i = 0; i < 6; i++) {
        pthread_join(th[i], NULL);
        ok += args[i].ok;
    }
    CHECK(ok == 30, "6 clients x 5 streams at once: %d of 30 complete", ok);
}

/* Idle connections over max_connections: the oldest are closed for new
 * ones, and a streamed completion is answered meanwhile (issue 13; the
 * full-size flood against a real router is
 * tests/python/test_router_http_flood.py). */
static void test_idle_flood(void)
{
    enum { LIMIT = 32, IDLE = 300 };
    rt_openai_config_t cfg = {.port = 0, .max_connections = LIMIT, .header_timeout_s = 5};
    rt_openai_t *s4 = NULL;
    if (rt_openai_start(core, &cfg, &s4) != TDM_OK) {
        CHECK(false, "flood server starts");
        return;
    }
    int p4 = rt_openai_port(s4);
    int *fds = malloc(IDLE * sizeof(int));
    int n_open = 0;
    for (int i = 0; i < IDLE; i++) {
        fds[i] = t_connect(p4);
        n_open += fds[i] >= 0;
    }
    int64_t t0 = now_ms();
    resp_t r;
    post(p4, "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":8,"
         "\"stream\":true}",
         &r);
    int64_t dt = now_ms() - t0;
    sse_t e;
    sse_parse(&r, &e);
    CHECK(r.status == 200 && e.done_last && e.framing_ok,
          "a streamed completion with %d idle connections open against a limit of %d: %d in "
          "%lld ms",
          n_open, LIMIT, r.status, (long long)dt);
    json_decref(e.events);
    resp_free(&r);
    tdm_http_guard_stats_t st;
    rt_openai_guard_stats(s4, &st);
    CHECK(st.closed_limit >= (uint64_t)(IDLE - LIMIT) && st.peak <= LIMIT + 64,
          "the guard closed %llu idle connections for new ones, at most %llu open at once",
          (unsigned long long)st.closed_limit, (unsigned long long)st.peak);
    for (int i = 0; i < IDLE; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(fds);
    rt_openai_stop(s4);
}

/* Stopping the server with a request in flight cancels it. */
static void test_stop_in_flight(void)
{
    rt_openai_config_t cfg = {.port = 0};
    rt_openai_t *s3 = NULL;
    if (rt_openai_start(core, &cfg, &s3) != TDM_OK) {
        CHECK(false, "third server starts");
        return;
    }
    int p3 = rt_openai_port(s3);
    uint64_t c0 = fake_core_cancels(core);
    int fd1 = t_connect(p3), fd2 = t_connect(p3);
    const char *b1 = "{\"model\":\"slow\",\"prompt\":\"z\",\"max_tokens\":300,\"stream\":true}";
    const char *b2 = "{\"model\":\"slow\",\"prompt\":\"z\",\"max_tokens\":300}";
    char req[512];
    snprintf(req, sizeof(req),
             "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
             strlen(b1), b1);
    t_send_all(fd1, req, strlen(req));
    snprintf(req, sizeof(req),
             "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
             strlen(b2), b2);
    t_send_all(fd2, req, strlen(req));
    usleep(400000);
    int64_t t0 = now_ms();
    rt_openai_stop(s3);
    int64_t dt = now_ms() - t0;
    CHECK(fake_core_cancels(core) >= c0 + 2 && dt < 3000,
          "stop with a stream and a whole answer in flight: both cancelled, stopped in %lld ms",
          (long long)dt);
    CHECK(wait_idle(2000), "no core request left after stop");
    close(fd1);
    close(fd2);
}

int main(void)
{
    tdm_log_set_level(getenv("TEST_DEBUG") != NULL ? TDM_LOG_LEVEL_DEBUG : TDM_LOG_LEVEL_ERROR);
    char model[512];
    if (fake_core_mkmodel(model, sizeof(model)) != 0) {
        printf("skip: no tandem binary to make the test model\n");
        return 77;
    }
    if (fake_core_create(model, &core) != TDM_OK) {
        unlink(model);
        printf("FAIL fake core\n");
        return 1;
    }
    unlink(model);
    tdm_metrics_registry_t *reg = NULL;
    tdm_metrics_counter_t *scrapes = NULL;
    tdm_metrics_registry_create(&reg);
    tdm_metrics_counter_register(reg, "test_openai_scrapes_total", "a test counter", &scrapes);
    tdm_metrics_counter_inc(scrapes);

    rt_openai_config_t cfg = {.host = "127.0.0.1", .port = 0, .registry = reg};
    rt_openai_t *s1 = NULL, *s2 = NULL;
    rt_openai_config_t cfg2 = {
        .port = 0, .api_key = "sekret", .max_body_bytes = 65536, .timeout_s = 2};
    if (rt_openai_start(core, &cfg, &s1) != TDM_OK || rt_openai_start(core, &cfg2, &s2) != TDM_OK) {
        printf("FAIL servers start\n");
        return 1;
    }
    port = rt_openai_port(s1);
    port2 = rt_openai_port(s2);
    CHECK(port > 0 && port2 > 0 && port != port2, "servers on ports %d and %d", port, port2);

    test_simple_endpoints();
    test_generation();
    test_logprobs();
    test_errors();
    test_auth_and_limits();
    test_key_everywhere_and_endpoint_limits();
    test_request_id();
    test_slow_clients();
    test_disconnects();
    test_parallel();
    test_idle_flood();
    test_stop_in_flight();

    rt_openai_stop(s1);
    rt_openai_stop(s2);
    CHECK(fake_core_live(core) == 0, "every core request ended (%llu live)",
          (unsigned long long)fake_core_live(core));
    fake_core_destroy(core);
    tdm_metrics_registry_destroy(reg);
    printf("%d ok, %d failed\n", n_ok, n_fail);
    return n_fail == 0 ? 0 : 1;
}
