/* tandem: the small HTTP server every role runs for /metrics, /health and
 * /ready (libmicrohttpd, its own polling thread).
 *
 *   GET /metrics  200, the registry in the Prometheus text format 0.0.4
 *                 (Content-Type TDM_METRICS_CONTENT_TYPE); 404 without one
 *   GET /health   200 "ok\n" while the process lives
 *   GET /ready    200 "ready\n" when the readiness callback says so (or
 *                 there is none), else 503 "not ready: REASON\n"
 *   GET PATH      a route the role added (e.g. /stats)
 *   POST PATH     an action the role added (e.g. /drain); the body is not
 *                 read, so actions take their arguments from the query
 *
 * HEAD works wherever GET does (headers only). Any other method on one of
 * these paths is 405 with an Allow header; any other path is 404. Request
 * bodies are not read. This server is for operators and scrapers, not for
 * clients' API traffic (the router has its own).
 *
 * Threads: callbacks (readiness, routes, metric callbacks inside the
 * registry) run on the server's thread, one request at a time; they must be
 * thread-safe against the role's own threads, quick, and must not call
 * tdm_http_server_stop() or _destroy(). The registry, the callbacks and
 * their args must stay valid until the server is stopped. Create, route,
 * start, stop and destroy are for one controlling thread. */
#ifndef TANDEM_HTTP_H
#define TANDEM_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#include "tandem/metrics.h"
#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_HTTP_MAX_ROUTES 16 /* extra routes per server */

typedef struct tdm_http_server tdm_http_server_t;

/* Returns true when the role takes work. When it does not, it writes a short
 * reason (one line, e.g. "loading model", "draining") into reason[cap]. */
typedef bool (*tdm_http_ready_fn_t)(void *arg, char *reason, size_t cap);

/* What a route handler answers. The server sets status 200, content type
 * "text/plain; charset=utf-8" and an empty body before the call. */
typedef struct tdm_http_reply {
    int status;               /* an HTTP status code, 100..599 */
    const char *content_type; /* copied by the server after the call */
    char *body;               /* NULL, or malloc'd: the server takes it and frees it */
    size_t body_len;          /* bytes of body */
} tdm_http_reply_t;

/* An opaque request, valid during the handler's call. */
typedef struct tdm_http_request tdm_http_request_t;

/* A route handler. A handler that fails answers 500 itself; its body is
 * sent as it is. */
typedef void (*tdm_http_handler_fn_t)(void *arg, const tdm_http_request_t *req,
                                      tdm_http_reply_t *reply);

/* The value of query argument `key` ("/stats?verbose=1"), or NULL. */
const char *tdm_http_request_query(const tdm_http_request_t *req, const char *key);
/* The request's path, without the query. */
const char *tdm_http_request_path(const tdm_http_request_t *req);
/* The value of request header `name` (case-insensitive), or NULL. */
const char *tdm_http_request_header(const tdm_http_request_t *req, const char *name);

typedef struct tdm_http_config {
    const char *host;                 /* the IPv4 address to bind, numeric ("0.0.0.0", "127.0.0.1");
                                         NULL: "0.0.0.0" */
    int port;                         /* 0..65535; 0 picks a free port (see tdm_http_server_port) */
    unsigned max_connections;         /* open connections at once; 0: 64 */
    unsigned timeout_s;               /* an idle connection is closed after this; 0: 10 */
    tdm_metrics_registry_t *registry; /* served on /metrics; NULL: /metrics is 404 */
    tdm_http_ready_fn_t ready;        /* NULL: always ready */
    void *ready_arg;
    /* The flag that sets the port, named in the message when binding fails
     * (e.g. "--metrics-port"); NULL: "the port flag". */
    const char *port_flag;
    const char *name; /* the role ("kvstore"), in log lines; NULL: none; copied */
} tdm_http_config_t;

/* A listening, non-blocking IPv4 TCP socket on host:port (numeric; port 0
 * picks one) for an MHD daemon (MHD_OPTION_LISTEN_SOCKET); the bound port
 * goes to *port_out. A failure is logged once with its cause and what to do
 * (naming port_flag): TDM_ERR_BUSY (port in use), TDM_ERR_INVALID (bad or
 * foreign address, privileged port) or TDM_ERR_IO. */
tdm_status_t tdm_http_listen_socket(const char *host, int port, const char *port_flag, int backlog,
                                    int *fd_out, int *port_out);

/* Makes a server from config (copied, host included); nothing listens yet.
 * TDM_ERR_INVALID for a bad port. */
tdm_status_t tdm_http_server_create(const tdm_http_config_t *config, tdm_http_server_t **out);
/* Adds a GET route at an exact path ("/stats"), before start. The path must
 * start with '/' and not be one of the built-in ones or added twice:
 * TDM_ERR_INVALID; TDM_ERR_BUSY when the server is running or
 * TDM_HTTP_MAX_ROUTES routes are there. The path is copied. */
tdm_status_t tdm_http_server_route(tdm_http_server_t *server, const char *path,
                                   tdm_http_handler_fn_t fn, void *arg);
/* The same for a POST route: an action ("/drain"), answered 405 with
 * "Allow: POST" to any other method. */
tdm_status_t tdm_http_server_route_post(tdm_http_server_t *server, const char *path,
                                        tdm_http_handler_fn_t fn, void *arg);
/* Binds host:port, starts the server's thread and logs the address. A bind
 * that fails is logged once with its cause and returns TDM_ERR_BUSY (port
 * in use), TDM_ERR_INVALID (bad host or address) or TDM_ERR_IO; a server
 * already running is TDM_ERR_BUSY. A stopped server may be started again. */
tdm_status_t tdm_http_server_start(tdm_http_server_t *server);
/* The port it listens on (the one picked when config.port was 0); 0 when
 * not running. */
int tdm_http_server_port(const tdm_http_server_t *server);
/* Closes the listening socket and every connection and joins the server's
 * thread: no callback runs after it returns. Safe to call twice, or on a
 * server never started. */
void tdm_http_server_stop(tdm_http_server_t *server);
/* Stops the server if it runs and frees it. Accepts NULL. */
void tdm_http_server_destroy(tdm_http_server_t *server);

#ifdef __cplusplus
}
#endif

#endif
