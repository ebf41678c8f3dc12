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
 * Slow and idle clients cannot take the server down: its connections are
 * watched by a connection guard (tdm_http_guard_t, below): headers must
 * arrive within header_timeout_s, an address holds at most
 * max_connections_per_ip connections, and a new connection over
 * max_connections closes the oldest idle one.
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
#include <stdint.h>

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
    unsigned max_connections;         /* open connections before the oldest idle one is
                                         closed for a new one (tdm_http_guard_config_t); 0: 64 */
    unsigned max_connections_per_ip;  /* connections from one address; 0: no limit */
    unsigned header_timeout_s;        /* a request's headers must be in within this; 0: 10 */
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

/* ---- the connection guard of a libmicrohttpd daemon ----
 *
 * libmicrohttpd alone refuses connections once its limit is reached, and
 * its idle timeout restarts with every byte, so a few hundred clients that
 * send a byte now and then (slowloris), or a few thousand that connect and
 * send nothing, keep the limit full and the server unreachable. The guard
 * tracks each connection in one of these phases:
 *
 *   idle    no request yet, or one whose headers are not complete; the
 *           phase starts at accept and again when an answer has been sent
 *   body    headers in, the body being read
 *   active  the request is being answered (suspended, streaming)
 *
 * and closes (shutdown(2); libmicrohttpd then sees the end of the stream
 * and frees the connection):
 *   - an idle connection after header_timeout_ms (a request's headers must
 *     arrive within it, and a kept-alive connection waits that long for the
 *     next request);
 *   - a body that, after body_grace_ms, has arrived at less than
 *     body_min_rate bytes per second on average;
 *   - for each new connection that finds max_connections open, the oldest
 *     idle connection (the slowest to send its headers), or the oldest one
 *     still sending its body when none is idle. Active connections are
 *     never closed by the guard, so libmicrohttpd's own limit is set higher
 *     (max_connections plus a quarter, at least 64) for them and for those
 *     being closed.
 * max_connections_per_ip is libmicrohttpd's per-address limit (a
 * connection over it is closed at accept). libmicrohttpd's messages go to
 * the log through the guard, at most 5 per 10 s (a flood makes one per
 * connection), at level info; what the guard closed is logged once per
 * 10 s as counts.
 *
 * Use: tdm_http_guard_create, pass tdm_http_guard_options() to
 * MHD_start_daemon (MHD_OPTION_ARRAY), report the request's progress from
 * the access handler (_headers, _body, _active) and from the
 * MHD_OPTION_NOTIFY_COMPLETED callback (_request_done), and destroy the
 * guard after MHD_stop_daemon. Every function may be called from any of
 * the daemon's threads; the guard runs one thread of its own that checks
 * the deadlines every 100 ms. */

struct MHD_Connection;
struct MHD_OptionItem;

#define TDM_HTTP_GUARD_OPTIONS 5 /* items tdm_http_guard_options writes, END included */

typedef struct tdm_http_guard tdm_http_guard_t;

typedef struct tdm_http_guard_config {
    unsigned max_connections;        /* 1..; see above */
    unsigned max_connections_per_ip; /* 0: no limit */
    unsigned header_timeout_ms;      /* 0: 10000 */
    unsigned body_grace_ms;          /* 0: header_timeout_ms */
    unsigned body_min_rate;          /* bytes per second; 0: 1024 */
    const char *name; /* the server ("OpenAI API"), in log lines; NULL: "HTTP"; copied */
    /* With a registry: <metrics_prefix>_connections (gauge: open now) and
     * <metrics_prefix>_connections_closed_total{reason="limit" |
     * "header_timeout" | "body_too_slow"}. NULL registry or prefix: none. */
    tdm_metrics_registry_t *registry;
    const char *metrics_prefix;
} tdm_http_guard_config_t;

/* What the guard has closed, and what is open, since it was created. */
typedef struct tdm_http_guard_stats {
    uint64_t open;          /* connections open now (those being closed included) */
    uint64_t closed_limit;  /* closed for a new connection over max_connections */
    uint64_t closed_header; /* closed without complete headers in time */
    uint64_t closed_body;   /* closed for a body under the minimum rate */
    uint64_t accepted;      /* connections seen */
    uint64_t peak;          /* the most open at once */
} tdm_http_guard_stats_t;

/* Makes a guard and starts its thread. TDM_ERR_INVALID for max_connections
 * 0 or a metric name the registry refuses (logged). */
tdm_status_t tdm_http_guard_create(const tdm_http_guard_config_t *config, tdm_http_guard_t **out);
/* Writes the options for MHD_start_daemon into items[TDM_HTTP_GUARD_OPTIONS]
 * (connection notification, connection limit, per-address limit, logger;
 * MHD_OPTION_END last); pass them as MHD_OPTION_ARRAY, items. The caller
 * must not set those options itself. */
void tdm_http_guard_options(tdm_http_guard_t *guard, struct MHD_OptionItem *items);
/* The request's headers are complete (the access handler's first call):
 * with_body, its body is read next (phase body); otherwise it is being
 * answered (phase active). */
void tdm_http_guard_headers(tdm_http_guard_t *guard, struct MHD_Connection *conn, bool with_body);
/* n more bytes of the body arrived. */
void tdm_http_guard_body(tdm_http_guard_t *guard, struct MHD_Connection *conn, size_t n);
/* The body is complete: the request is being answered (phase active). */
void tdm_http_guard_active(tdm_http_guard_t *guard, struct MHD_Connection *conn);
/* The request ended (MHD_OPTION_NOTIFY_COMPLETED): the connection is idle
 * until its next request's headers. */
void tdm_http_guard_request_done(tdm_http_guard_t *guard, struct MHD_Connection *conn);
void tdm_http_guard_stats(tdm_http_guard_t *guard, tdm_http_guard_stats_t *out);
/* Stops the guard's thread and frees it: after MHD_stop_daemon. Accepts
 * NULL. */
void tdm_http_guard_destroy(tdm_http_guard_t *guard);

#ifdef __cplusplus
}
#endif

#endif
