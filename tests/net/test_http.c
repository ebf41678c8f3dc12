/* Tests of the HTTP server (include/tandem/http.h) over loopback, with a
 * plain socket client written here: /metrics (body equal to the registry's
 * text, content type), /health, /ready (200, then 503 with its reason),
 * 404, 405 with Allow, HEAD, an extra route with a query argument and its
 * own status and content type, a route handler's bug answered 500, bind
 * failures (port in use, address not here, not an address), routes refused
 * after start, stop twice, restart, concurrent clients, and no descriptor
 * left open after destroy. Every port is picked by the kernel (port 0). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "../unit/test_util.h"
#include "tandem/http.h"
#include "tandem/metrics.h"

#define IO_TIMEOUT_S 5

/* ---- a minimal HTTP/1.1 client ---- */

typedef struct http_result {
    int status;       /* -1: no connection or no answer */
    char head[4096];  /* status line and headers */
    char body[65536]; /* NUL-terminated */
    size_t body_len;
    char raw[4096 + 65536]; /* the answer as read */
} http_result_t;

/* Sends one request with "Connection: close" and reads the answer to EOF. */
static int http_call(int port, const char *method, const char *path, const char *body,
                     http_result_t *r)
{
    memset(r, 0, sizeof(*r));
    r->status = -1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {.tv_sec = IO_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0) {
        close(fd);
        return -1;
    }
    char req[1024];
    int n = snprintf(req, sizeof(req),
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     method, path, body != NULL ? strlen(body) : 0, body != NULL ? body : "");
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    char *buf = r->raw;
    const size_t cap = sizeof(r->raw);
    size_t len = 0;
    for (;;) {
        ssize_t got = read(fd, buf + len, cap - 1 - len);
        if (got <= 0)
            break;
        len += (size_t)got;
        if (len == cap - 1)
            break;
    }
    close(fd);
    buf[len] = '\0';
    char *sep = strstr(buf, "\r\n\r\n");
    if (sep == NULL || sscanf(buf, "HTTP/1.%*d %d", &r->status) != 1)
        return -1;
    size_t head_len = (size_t)(sep - buf);
    if (head_len >= sizeof(r->head))
        head_len = sizeof(r->head) - 1;
    memcpy(r->head, buf, head_len);
    r->body_len = len - (size_t)(sep + 4 - buf);
    if (r->body_len >= sizeof(r->body))
        r->body_len = sizeof(r->body) - 1;
    memcpy(r->body, sep + 4, r->body_len);
    r->body[r->body_len] = '\0';
    return r->status;
}

/* The value of header `name` in r->head (case-insensitive name), or "". */
static const char *header(const http_result_t *r, const char *name, char out[256])
{
    out[0] = '\0';
    size_t n = strlen(name);
    for (const char *line = strstr(r->head, "\r\n"); line != NULL;
         line = strstr(line + 2, "\r\n")) {
        const char *p = line + 2;
        if (strncasecmp(p, name, n) == 0 && p[n] == ':') {
            p += n + 1;
            while (*p == ' ')
                p++;
            size_t len = strcspn(p, "\r\n");
            if (len > 255)
                len = 255;
            memcpy(out, p, len);
            out[len] = '\0';
            break;
        }
    }
    return out;
}

/* ---- what the server serves ---- */

typedef struct role {
    atomic_bool ready;
    atomic_int stats_calls;
} role_t;

static bool role_ready(void *arg, char *reason, size_t cap)
{
    role_t *role = arg;
    if (atomic_load(&role->ready))
        return true;
    snprintf(reason, cap, "loading model\nsecond line is dropped");
    return false;
}

static void stats_handler(void *arg, const tdm_http_request_t *req, tdm_http_reply_t *reply)
{
    role_t *role = arg;
    atomic_fetch_add(&role->stats_calls, 1);
    const char *verbose = tdm_http_request_query(req, "verbose");
    reply->status = 202;
    reply->content_type = "application/json";
    reply->body_len = (size_t)asprintf(&reply->body, "{\"path\":\"%s\",\"verbose\":\"%s\"}",
                                       tdm_http_request_path(req), verbose ? verbose : "");
}

/* An action: echoes the Host header and a query argument. */
static void action_handler(void *arg, const tdm_http_request_t *req, tdm_http_reply_t *reply)
{
    const char *host = tdm_http_request_header(req, "host"); /* any case */
    const char *why = tdm_http_request_query(req, "why");
    reply->status = 202;
    reply->body_len =
        (size_t)asprintf(&reply->body, "host=%s why=%s missing=%s", host ? host : "-",
                         why ? why : "-", tdm_http_request_header(req, "X-None") ? "no" : "yes");
}

static void empty_handler(void *arg, const tdm_http_request_t *req, tdm_http_reply_t *reply)
{
    reply->status = 204;
}

static void buggy_handler(void *arg, const tdm_http_request_t *req, tdm_http_reply_t *reply)
{
    reply->status = 1000;
    reply->body = strdup("leaks unless the server frees it");
    reply->body_len = strlen(reply->body);
}

static double blocks_in_store(void *arg)
{
    return 7;
}

typedef struct client_arg {
    int port;
    int ok;
} client_arg_t;

static void *client_main(void *arg)
{
    client_arg_t *c = arg;
    http_result_t *r = malloc(sizeof(*r));
    for (int i = 0; r != NULL && i < 25; i++) {
        const char *path = (i % 3 == 0) ? "/metrics" : (i % 3 == 1) ? "/health" : "/ready";
        if (http_call(c->port, "GET", path, NULL, r) == 200)
            c->ok++;
    }
    free(r);
    return NULL;
}

int main(void)
{
    int fds_before = t_count_fds();
    static http_result_t r;
    char h[256];

    tdm_metrics_registry_t *reg = NULL;
    CHECK(tdm_metrics_registry_create(&reg) == TDM_OK, "registry");
    tdm_metrics_counter_t *requests;
    CHECK(tdm_metrics_counter_register(reg, "vllm:num_requests_total", "Requests.", &requests) ==
              TDM_OK,
          "counter");
    CHECK(tdm_metrics_gauge_register_fn(reg, "tandem_kvstore_blocks", "Blocks in the store.",
                                        blocks_in_store, NULL) == TDM_OK,
          "callback gauge");
    tdm_metrics_counter_add_u64(requests, 3);

    role_t role;
    atomic_init(&role.ready, true);
    atomic_init(&role.stats_calls, 0);
    tdm_http_config_t cfg = {.host = "127.0.0.1",
                             .port = 0,
                             .max_connections = 16,
                             .timeout_s = 5,
                             .registry = reg,
                             .ready = role_ready,
                             .ready_arg = &role,
                             .port_flag = "--metrics-port",
                             .name = "test"};
    tdm_http_server_t *srv = NULL;
    CHECK(tdm_http_server_create(&cfg, &srv) == TDM_OK && srv != NULL, "create");
    CHECK(tdm_http_server_port(srv) == 0, "no port before start");
    CHECK(tdm_http_server_route(srv, "/stats", stats_handler, &role) == TDM_OK, "route");
    CHECK(tdm_http_server_route(srv, "/empty", empty_handler, NULL) == TDM_OK, "route");
    CHECK(tdm_http_server_route(srv, "/buggy", buggy_handler, NULL) == TDM_OK, "route");
    CHECK(tdm_http_server_route_post(srv, "/drain", action_handler, NULL) == TDM_OK, "post route");
    CHECK(tdm_http_server_route_post(srv, "/stats", action_handler, NULL) == TDM_ERR_INVALID,
          "a path is GET or POST, not both");
    CHECK(tdm_http_server_route(srv, "/stats", stats_handler, &role) == TDM_ERR_INVALID, "twice");
    CHECK(tdm_http_server_route(srv, "/metrics", stats_handler, &role) == TDM_ERR_INVALID,
          "built-in");
    CHECK(tdm_http_server_route(srv, "stats", stats_handler, &role) == TDM_ERR_INVALID, "no /");
    CHECK(tdm_http_server_route(srv, "/x", NULL, NULL) == TDM_ERR_INVALID, "no handler");
    CHECK(tdm_http_server_start(srv) == TDM_OK, "start");
    int port = tdm_http_server_port(srv);
    CHECK(port > 0 && port < 65536, "port %d", port);
    CHECK(tdm_http_server_start(srv) == TDM_ERR_BUSY, "start twice");
    CHECK(tdm_http_server_route(srv, "/late", stats_handler, &role) == TDM_ERR_BUSY,
          "route after start");

    /* /metrics: the registry's text, with the exposition content type. */
    char *want = NULL;
    size_t want_len = 0;
    CHECK(tdm_metrics_registry_render(reg, &want, &want_len) == TDM_OK, "render");
    CHECK(http_call(port, "GET", "/metrics", NULL, &r) == 200, "/metrics: %d", r.status);
    CHECK(r.body_len == want_len && strcmp(r.body, want) == 0, "/metrics body:\n%s\nwant:\n%s",
          r.body, want);
    CHECK(strcmp(header(&r, "Content-Type", h), "text/plain; version=0.0.4; charset=utf-8") == 0,
          "content type %s", h);
    CHECK(strstr(r.body, "vllm:num_requests_total 3\n") != NULL, "counter in body");
    CHECK(strstr(r.body, "tandem_kvstore_blocks 7\n") != NULL, "callback in body");
    free(want);
    tdm_metrics_counter_inc(requests);
    CHECK(http_call(port, "GET", "/metrics?x=1", NULL, &r) == 200, "query ignored: %d", r.status);
    CHECK(strstr(r.body, "vllm:num_requests_total 4\n") != NULL, "scrape sees updates");

    /* /health and /ready. */
    CHECK(http_call(port, "GET", "/health", NULL, &r) == 200 && strcmp(r.body, "ok\n") == 0,
          "/health: %d %s", r.status, r.body);
    CHECK(http_call(port, "GET", "/ready", NULL, &r) == 200 && strcmp(r.body, "ready\n") == 0,
          "/ready: %d %s", r.status, r.body);
    atomic_store(&role.ready, false);
    CHECK(http_call(port, "GET", "/ready", NULL, &r) == 503 &&
              strcmp(r.body, "not ready: loading model\n") == 0,
          "/ready while not ready: %d %s", r.status, r.body);
    CHECK(http_call(port, "GET", "/health", NULL, &r) == 200, "/health while not ready");
    atomic_store(&role.ready, true);
    CHECK(http_call(port, "GET", "/ready", NULL, &r) == 200, "/ready again: %d", r.status);

    /* 404, 405, HEAD. */
    CHECK(http_call(port, "GET", "/nope", NULL, &r) == 404 && strcmp(r.body, "not found\n") == 0,
          "404: %d %s", r.status, r.body);
    CHECK(http_call(port, "GET", "/", NULL, &r) == 404, "/: %d", r.status);
    CHECK(http_call(port, "GET", "/metrics/", NULL, &r) == 404, "/metrics/: %d", r.status);
    CHECK(http_call(port, "POST", "/nope", "x", &r) == 404, "POST unknown: %d", r.status);
    CHECK(http_call(port, "POST", "/metrics", "{\"a\":1}", &r) == 405, "POST: %d", r.status);
    CHECK(strcmp(header(&r, "Allow", h), "GET, HEAD") == 0, "Allow: %s", h);
    CHECK(http_call(port, "DELETE", "/health", NULL, &r) == 405, "DELETE: %d", r.status);
    CHECK(http_call(port, "PUT", "/stats", "x", &r) == 405, "PUT route: %d", r.status);
    CHECK(http_call(port, "HEAD", "/metrics", NULL, &r) == 200 && r.body_len == 0,
          "HEAD: %d, %zu body bytes", r.status, r.body_len);
    CHECK(strncmp(header(&r, "Content-Type", h), "text/plain; version=0.0.4", 25) == 0,
          "HEAD content type %s", h);

    /* Extra routes. */
    CHECK(http_call(port, "GET", "/stats?verbose=1", NULL, &r) == 202, "route: %d", r.status);
    CHECK(strcmp(r.body, "{\"path\":\"/stats\",\"verbose\":\"1\"}") == 0, "route body %s", r.body);
    CHECK(strcmp(header(&r, "Content-Type", h), "application/json") == 0, "route type %s", h);
    CHECK(atomic_load(&role.stats_calls) == 1, "handler called once");
    CHECK(http_call(port, "GET", "/empty", NULL, &r) == 204 && r.body_len == 0, "204: %d",
          r.status);
    CHECK(http_call(port, "GET", "/buggy", NULL, &r) == 500, "buggy handler: %d", r.status);
    CHECK(http_call(port, "POST", "/drain?why=spot", NULL, &r) == 202 &&
              strcmp(r.body, "host=127.0.0.1 why=spot missing=yes") == 0,
          "POST route: %d %s", r.status, r.body);
    CHECK(http_call(port, "GET", "/drain", NULL, &r) == 405, "GET on a POST route: %d", r.status);
    CHECK(strcmp(header(&r, "Allow", h), "POST") == 0, "Allow: %s", h);

    /* Concurrent clients. */
    pthread_t clients[4];
    client_arg_t cargs[4];
    for (int i = 0; i < 4; i++) {
        cargs[i] = (client_arg_t){.port = port};
        pthread_create(&clients[i], NULL, client_main, &cargs[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(clients[i], NULL);
        CHECK(cargs[i].ok == 25, "client %d: %d of 25 answered 200", i, cargs[i].ok);
    }

    /* Binding failures: the port is taken; an address not on this machine;
     * not an address. */
    tdm_http_config_t cfg2 = cfg;
    cfg2.port = port;
    tdm_http_server_t *other = NULL;
    CHECK(tdm_http_server_create(&cfg2, &other) == TDM_OK, "create second");
    CHECK(tdm_http_server_start(other) == TDM_ERR_BUSY, "port in use");
    CHECK(tdm_http_server_port(other) == 0, "not running");
    tdm_http_server_destroy(other);
    cfg2.port = 0;
    cfg2.host = "192.0.2.1"; /* TEST-NET-1: on no machine */
    CHECK(tdm_http_server_create(&cfg2, &other) == TDM_OK, "create");
    CHECK(tdm_http_server_start(other) == TDM_ERR_INVALID, "address not here");
    tdm_http_server_destroy(other);
    cfg2.host = "localhost.invalid";
    CHECK(tdm_http_server_create(&cfg2, &other) == TDM_OK, "create");
    CHECK(tdm_http_server_start(other) == TDM_ERR_INVALID, "not an address");
    tdm_http_server_destroy(other);
    cfg2.port = 65536;
    other = NULL;
    CHECK(tdm_http_server_create(&cfg2, &other) == TDM_ERR_INVALID && other == NULL, "bad port");

    /* Stop (twice), then nothing listens; a restart serves again. */
    tdm_http_server_stop(srv);
    tdm_http_server_stop(srv);
    CHECK(tdm_http_server_port(srv) == 0, "no port after stop");
    CHECK(http_call(port, "GET", "/health", NULL, &r) == -1, "stopped: %d", r.status);
    CHECK(tdm_http_server_start(srv) == TDM_OK, "restart");
    int port2 = tdm_http_server_port(srv);
    CHECK(http_call(port2, "GET", "/health", NULL, &r) == 200, "after restart: %d", r.status);
    tdm_http_server_destroy(srv);
    tdm_http_server_destroy(NULL);

    /* Without a registry /metrics is 404; a never-started server stops fine. */
    tdm_http_config_t cfg3 = {.host = "127.0.0.1"};
    CHECK(tdm_http_server_create(&cfg3, &srv) == TDM_OK, "create bare");
    tdm_http_server_stop(srv);
    CHECK(tdm_http_server_start(srv) == TDM_OK, "start bare");
    port = tdm_http_server_port(srv);
    CHECK(http_call(port, "GET", "/metrics", NULL, &r) == 404, "no registry: %d", r.status);
    CHECK(http_call(port, "GET", "/ready", NULL, &r) == 200, "no readiness callback: %d", r.status);
    tdm_http_server_destroy(srv);

    tdm_metrics_registry_destroy(reg);
    int fds_after = t_count_fds();
    CHECK(fds_after == fds_before, "descriptors: %d before, %d after", fds_before, fds_after);
    return t_finish();
}
