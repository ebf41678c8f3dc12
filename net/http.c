/* tandem: the HTTP server for /metrics, /health, /ready and extra GET and
 * POST routes (see include/tandem/http.h).
 *
 * tandem binds the listening socket itself and hands it to libmicrohttpd
 * (MHD_OPTION_LISTEN_SOCKET): a bind that fails then has its exact errno to
 * report, once, with what to do. libmicrohttpd runs one internal polling
 * thread (epoll where it was built with it) that calls http_access() for
 * each request; MHD_stop_daemon() closes the connections and the listening
 * socket and joins that thread. A connection guard (http_guard.c) watches
 * the connections: header deadline, per-address limit, and the oldest idle
 * connection closed for a new one at the limit; libmicrohttpd's own
 * messages go through it to tdm_log (level info, rate-limited). */
#define _GNU_SOURCE
#include "tandem/http.h"

#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tandem/log.h"

#define MOD "http"

#define HTTP_DEFAULT_MAX_CONNECTIONS 64
#define HTTP_DEFAULT_TIMEOUT_S       10
#define HTTP_DEFAULT_HEADER_S        10
#define HTTP_LISTEN_BACKLOG          1024
#define HTTP_TEXT                    "text/plain; charset=utf-8"
#define HTTP_ALLOW                   "GET, HEAD"

typedef struct http_route {
    char *path;
    tdm_http_handler_fn_t fn;
    void *arg;
    bool post; /* an action: POST only; otherwise GET and HEAD */
} http_route_t;

struct tdm_http_server {
    char *host;      /* what to bind */
    char *port_flag; /* named when binding fails */
    char *name;      /* the role, in log lines ("" if none) */
    int port;        /* asked for; 0: any */
    unsigned max_connections;
    unsigned max_per_ip;
    unsigned header_timeout_s;
    unsigned timeout_s;
    tdm_metrics_registry_t *metrics;
    tdm_http_ready_fn_t ready;
    void *ready_arg;
    http_route_t routes[TDM_HTTP_MAX_ROUTES];
    int n_routes;
    struct MHD_Daemon *daemon; /* NULL when not running */
    tdm_http_guard_t *guard;   /* while running */
    int bound_port;            /* the port listened on while running */
};

struct tdm_http_request {
    struct MHD_Connection *conn;
    const char *path;
};

static const char *const builtin_paths[] = {"/metrics", "/health", "/ready"};

const char *tdm_http_request_query(const tdm_http_request_t *req, const char *key)
{
    return MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, key);
}

const char *tdm_http_request_path(const tdm_http_request_t *req)
{
    return req->path;
}

const char *tdm_http_request_header(const tdm_http_request_t *req, const char *name)
{
    return MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, name);
}

/* ---- responses ---- */

/* Queues a response whose body is either static (owned == NULL) or a
 * malloc'd buffer that libmicrohttpd frees once sent. */
static enum MHD_Result http_respond_allow(struct MHD_Connection *conn, unsigned status,
                                          const char *content_type, const char *body, size_t len,
                                          char *owned, const char *allow)
{
    struct MHD_Response *resp;
    if (owned != NULL)
        resp = MHD_create_response_from_buffer(len, owned, MHD_RESPMEM_MUST_FREE);
    else
        resp = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_PERSISTENT);
    if (resp == NULL) {
        free(owned);
        return MHD_NO; /* libmicrohttpd closes the connection */
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
    enum MHD_Result ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result http_respond(struct MHD_Connection *conn, unsigned status,
                                    const char *content_type, const char *body, size_t len,
                                    char *owned)
{
    return http_respond_allow(conn, status, content_type, body, len, owned, HTTP_ALLOW);
}

static enum MHD_Result http_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
    return http_respond(conn, status, HTTP_TEXT, text, strlen(text), NULL);
}

static enum MHD_Result http_metrics(tdm_http_server_t *s, struct MHD_Connection *conn)
{
    char *text;
    size_t len;
    if (tdm_metrics_registry_render(s->metrics, &text, &len) != TDM_OK)
        return http_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "cannot render the metrics\n");
    return http_respond(conn, MHD_HTTP_OK, TDM_METRICS_CONTENT_TYPE, NULL, len, text);
}

static enum MHD_Result http_ready(tdm_http_server_t *s, struct MHD_Connection *conn)
{
    char reason[256] = "";
    if (s->ready == NULL || s->ready(s->ready_arg, reason, sizeof(reason)))
        return http_text(conn, MHD_HTTP_OK, "ready\n");
    reason[sizeof(reason) - 1] = '\0';
    reason[strcspn(reason, "\r\n")] = '\0'; /* one line */
    char *body = NULL;
    int n = asprintf(&body, "not ready: %s\n", reason[0] != '\0' ? reason : "no reason given");
    if (n < 0)
        return http_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "not ready\n");
    return http_respond(conn, MHD_HTTP_SERVICE_UNAVAILABLE, HTTP_TEXT, NULL, (size_t)n, body);
}

static enum MHD_Result http_route(const http_route_t *r, struct MHD_Connection *conn,
                                  const char *url)
{
    tdm_http_request_t req = {.conn = conn, .path = url};
    tdm_http_reply_t reply = {.status = MHD_HTTP_OK, .content_type = HTTP_TEXT};
    r->fn(r->arg, &req, &reply);
    if (reply.status < 100 || reply.status > 599 || reply.content_type == NULL ||
        (reply.body == NULL && reply.body_len != 0)) {
        tdm_log_error(MOD,
                      "the handler of %s answered status %d, content type %s, %zu bytes "
                      "at %p: a bug in the handler",
                      r->path, reply.status, reply.content_type ? reply.content_type : "NULL",
                      reply.body_len, (void *)reply.body);
        free(reply.body);
        return http_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal error\n");
    }
    if (reply.body == NULL)
        return http_respond(conn, (unsigned)reply.status, reply.content_type, "", 0, NULL);
    return http_respond(conn, (unsigned)reply.status, reply.content_type, NULL, reply.body_len,
                        reply.body);
}

/* libmicrohttpd's access handler: one call per request (the body, if any, is
 * not read: every answer is queued on the first call). */
static enum MHD_Result http_access(void *cls, struct MHD_Connection *conn, const char *url,
                                   const char *method, const char *version, const char *upload_data,
                                   size_t *upload_data_size, void **con_cls)
{
    tdm_http_server_t *s = cls;
    const http_route_t *route = NULL;
    int builtin = -1;
    tdm_http_guard_headers(s->guard, conn, false); /* answered now; a body is not read */
    for (int i = 0; i < (int)(sizeof(builtin_paths) / sizeof(builtin_paths[0])); i++)
        if (strcmp(url, builtin_paths[i]) == 0)
            builtin = i;
    for (int i = 0; builtin < 0 && i < s->n_routes; i++)
        if (strcmp(url, s->routes[i].path) == 0)
            route = &s->routes[i];
    if ((builtin < 0 && route == NULL) || (builtin == 0 && s->metrics == NULL))
        return http_text(conn, MHD_HTTP_NOT_FOUND, "not found\n");
    bool get =
        strcmp(method, MHD_HTTP_METHOD_GET) == 0 || strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    if (route != NULL && route->post) {
        if (strcmp(method, MHD_HTTP_METHOD_POST) != 0)
            return http_respond_allow(conn, MHD_HTTP_METHOD_NOT_ALLOWED, HTTP_TEXT,
                                      "method not allowed\n", 19, NULL, "POST");
    } else if (!get) {
        return http_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n");
    }

    switch (builtin) {
    case 0: return http_metrics(s, conn);
    case 1: return http_text(conn, MHD_HTTP_OK, "ok\n");
    case 2: return http_ready(s, conn);
    default: return http_route(route, conn, url);
    }
}

static void http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                           enum MHD_RequestTerminationCode toe)
{
    tdm_http_server_t *s = cls;
    tdm_http_guard_request_done(s->guard, conn);
}

/* ---- life cycle ---- */

tdm_status_t tdm_http_server_create(const tdm_http_config_t *config, tdm_http_server_t **out)
{
    if (config == NULL || config->port < 0 || config->port > 65535) {
        tdm_log_error(MOD, "HTTP port %d is out of 0..65535", config != NULL ? config->port : -1);
        return TDM_ERR_INVALID;
    }
    tdm_http_server_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return TDM_ERR_NOMEM;
    s->host = strdup(config->host != NULL ? config->host : "0.0.0.0");
    if (s->host == NULL)
        goto err_free_server;
    s->port_flag = strdup(config->port_flag != NULL ? config->port_flag : "the port flag");
    if (s->port_flag == NULL)
        goto err_free_host;
    s->name = strdup(config->name != NULL ? config->name : "");
    if (s->name == NULL)
        goto err_free_port_flag;
    s->port = config->port;
    s->max_connections =
        config->max_connections != 0 ? config->max_connections : HTTP_DEFAULT_MAX_CONNECTIONS;
    s->max_per_ip = config->max_connections_per_ip;
    s->header_timeout_s =
        config->header_timeout_s != 0 ? config->header_timeout_s : HTTP_DEFAULT_HEADER_S;
    s->timeout_s = config->timeout_s != 0 ? config->timeout_s : HTTP_DEFAULT_TIMEOUT_S;
    s->metrics = config->registry;
    s->ready = config->ready;
    s->ready_arg = config->ready_arg;
    *out = s;
    return TDM_OK;

err_free_port_flag:
    free(s->port_flag);
err_free_host:
    free(s->host);
err_free_server:
    free(s);
    return TDM_ERR_NOMEM;
}

static tdm_status_t add_route(tdm_http_server_t *server, const char *path, tdm_http_handler_fn_t fn,
                              void *arg, bool post)
{
    if (server == NULL || path == NULL || path[0] != '/' || strchr(path, '?') != NULL ||
        fn == NULL) {
        tdm_log_error(MOD, "route \"%s\": a path starting with / (no query) and a handler needed",
                      path != NULL ? path : "(null)");
        return TDM_ERR_INVALID;
    }
    for (size_t i = 0; i < sizeof(builtin_paths) / sizeof(builtin_paths[0]); i++)
        if (strcmp(path, builtin_paths[i]) == 0) {
            tdm_log_error(MOD, "route %s: the server serves it already", path);
            return TDM_ERR_INVALID;
        }
    for (int i = 0; i < server->n_routes; i++)
        if (strcmp(path, server->routes[i].path) == 0) {
            tdm_log_error(MOD, "route %s: added twice", path);
            return TDM_ERR_INVALID;
        }
    if (server->daemon != NULL || server->n_routes == TDM_HTTP_MAX_ROUTES) {
        tdm_log_error(MOD, "route %s: routes are added before start, at most %d", path,
                      TDM_HTTP_MAX_ROUTES);
        return TDM_ERR_BUSY;
    }
    char *copy = strdup(path);
    if (copy == NULL)
        return TDM_ERR_NOMEM;
    server->routes[server->n_routes++] =
        (http_route_t){.path = copy, .fn = fn, .arg = arg, .post = post};
    return TDM_OK;
}

tdm_status_t tdm_http_server_route(tdm_http_server_t *server, const char *path,
                                   tdm_http_handler_fn_t fn, void *arg)
{
    return add_route(server, path, fn, arg, false);
}

tdm_status_t tdm_http_server_route_post(tdm_http_server_t *server, const char *path,
                                        tdm_http_handler_fn_t fn, void *arg)
{
    return add_route(server, path, fn, arg, true);
}

tdm_status_t tdm_http_listen_socket(const char *host, int port, const char *port_flag, int backlog,
                                    int *fd_out, int *port_out)
{
    struct addrinfo hints = {.ai_family = AF_INET,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    char port_s[8];
    snprintf(port_s, sizeof(port_s), "%d", port);
    int rc = getaddrinfo(host, port_s, &hints, &ai);
    if (rc != 0) {
        tdm_log_error(MOD,
                      "cannot listen on %s:%d: %s; give an IPv4 address such as 0.0.0.0 "
                      "or 127.0.0.1",
                      host, port, rc == EAI_NONAME ? "not an IPv4 address" : gai_strerror(rc));
        return TDM_ERR_INVALID;
    }
    tdm_status_t st = TDM_OK;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        tdm_log_error(MOD, "cannot listen on %s:%d: socket: %s", host, port, strerror(errno));
        st = TDM_ERR_IO;
        goto err_free_addr;
    }
    /* Restarts may bind while old connections sit in TIME_WAIT; a port that
     * another socket listens on is still refused (EADDRINUSE). */
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        int e = errno;
        if (e == EADDRINUSE) {
            tdm_log_error(MOD, "cannot listen on %s:%d: port in use; choose another with %s", host,
                          port, port_flag);
            st = TDM_ERR_BUSY;
        } else if (e == EACCES) {
            tdm_log_error(MOD,
                          "cannot listen on %s:%d: %s (ports below 1024 need privileges); "
                          "choose another with %s",
                          host, port, strerror(e), port_flag);
            st = TDM_ERR_INVALID;
        } else if (e == EADDRNOTAVAIL) {
            tdm_log_error(MOD,
                          "cannot listen on %s:%d: %s; give an address of this machine, "
                          "or 0.0.0.0",
                          host, port, strerror(e));
            st = TDM_ERR_INVALID;
        } else {
            tdm_log_error(MOD, "cannot listen on %s:%d: bind: %s", host, port, strerror(e));
            st = TDM_ERR_IO;
        }
        goto err_close;
    }
    if (listen(fd, backlog) != 0) {
        int e = errno;
        tdm_log_error(MOD, "cannot listen on %s:%d: %s%s%s", host, port, strerror(e),
                      e == EADDRINUSE ? "; choose another port with " : "",
                      e == EADDRINUSE ? port_flag : "");
        st = e == EADDRINUSE ? TDM_ERR_BUSY : TDM_ERR_IO;
        goto err_close;
    }
    struct sockaddr_in sin;
    socklen_t sin_len = sizeof(sin);
    if (getsockname(fd, (struct sockaddr *)&sin, &sin_len) != 0) {
        tdm_log_error(MOD, "cannot listen on %s:%d: getsockname: %s", host, port, strerror(errno));
        st = TDM_ERR_IO;
        goto err_close;
    }
    freeaddrinfo(ai);
    *fd_out = fd;
    *port_out = ntohs(sin.sin_port);
    return TDM_OK;

err_close:
    close(fd);
err_free_addr:
    freeaddrinfo(ai);
    return st;
}

tdm_status_t tdm_http_server_start(tdm_http_server_t *server)
{
    if (server == NULL)
        return TDM_ERR_INVALID;
    if (server->daemon != NULL)
        return TDM_ERR_BUSY;
    int fd, port;
    tdm_status_t st = tdm_http_listen_socket(server->host, server->port, server->port_flag,
                                             HTTP_LISTEN_BACKLOG, &fd, &port);
    if (st != TDM_OK)
        return st;
    char gname[96];
    snprintf(gname, sizeof(gname), "%s%sHTTP server", server->name,
             server->name[0] != '\0' ? " " : "");
    tdm_http_guard_config_t gc = {.max_connections = server->max_connections,
                                  .max_connections_per_ip = server->max_per_ip,
                                  .header_timeout_ms = server->header_timeout_s * 1000,
                                  .name = gname};
    st = tdm_http_guard_create(&gc, &server->guard);
    if (st != TDM_OK) {
        close(fd);
        return st;
    }
    struct MHD_OptionItem guard_opts[TDM_HTTP_GUARD_OPTIONS];
    tdm_http_guard_options(server->guard, guard_opts);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG | MHD_USE_ITC;
    flags |= MHD_is_feature_supported(MHD_FEATURE_EPOLL) == MHD_YES ? MHD_USE_EPOLL : MHD_USE_POLL;
    /* The port argument is unused: the socket is ours. */
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, 0, NULL, NULL, http_access, server, MHD_OPTION_ARRAY, guard_opts,
        MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd, MHD_OPTION_CONNECTION_TIMEOUT, server->timeout_s,
        MHD_OPTION_NOTIFY_COMPLETED, http_completed, server, MHD_OPTION_END);
    if (d == NULL) {
        tdm_log_error(MOD,
                      "cannot start the HTTP server on %s:%d (libmicrohttpd refused; see "
                      "its message above)",
                      server->host, port);
        close(fd);
        tdm_http_guard_destroy(server->guard);
        server->guard = NULL;
        return TDM_ERR_IO;
    }
    server->daemon = d;
    server->bound_port = port;
    tdm_log_info(MOD, "%s%sserving /metrics, /health, /ready on http://%s:%d", server->name,
                 server->name[0] != '\0' ? ": " : "", server->host, port);
    return TDM_OK;
}

int tdm_http_server_port(const tdm_http_server_t *server)
{
    return server != NULL && server->daemon != NULL ? server->bound_port : 0;
}

void tdm_http_server_stop(tdm_http_server_t *server)
{
    if (server == NULL || server->daemon == NULL)
        return;
    MHD_stop_daemon(server->daemon); /* joins the thread, closes the socket */
    server->daemon = NULL;
    tdm_http_guard_destroy(server->guard);
    server->guard = NULL;
    server->bound_port = 0;
}

void tdm_http_server_destroy(tdm_http_server_t *server)
{
    if (server == NULL)
        return;
    tdm_http_server_stop(server);
    for (int i = 0; i < server->n_routes; i++)
        free(server->routes[i].path);
    free(server->name);
    free(server->port_flag);
    free(server->host);
    free(server);
}
