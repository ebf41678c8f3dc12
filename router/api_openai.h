/* tandem-router: the OpenAI-compatible HTTP + JSON front end (vLLM's
 * shapes), written against core.h only.
 *
 *   POST /v1/completions, /v1/chat/completions   stream false or true (SSE)
 *   GET  /v1/models                               the core's models
 *   GET  /health                                  200 while the process lives
 *   GET  /ready                                   200, or 503 with the core's reason
 *   GET  /metrics                                 the registry (404 without one)
 *   POST /tokenize, /detokenize                   vLLM's shapes
 *
 * With an API key, every path but /health, /ready and /metrics needs
 * "Authorization: Bearer KEY".
 *
 * Errors are OpenAI's JSON: {"error": {"message", "type", "param", "code"}}
 * with 400 (bad request), 401 (API key: code "invalid_api_key"), 404
 * (unknown path, or model: code "model_not_found"), 405, 413 (a body over
 * the endpoint's limit: max_body_bytes for the generation endpoints; for
 * /tokenize and /detokenize 32 bytes per token of the longest model's
 * max_model_len, at least 64 KiB, at most max_body_bytes), 415 (a
 * Content-Type that is not JSON; none is accepted), 503 / 504 / 500 (from
 * the core). Once a stream has started, an
 * error from the core is sent as an SSE event `data: {"error": {...}}`
 * followed by `data: [DONE]`. Every response carries X-Request-Id: the
 * client's (when printable, at most 128 bytes) or a new one; it is passed
 * to the core as rt_params.request_id, and x-model-tier as rt_params.tier.
 *
 * Threads: libmicrohttpd runs a small pool of polling threads
 * (MHD_ALLOW_SUSPEND_RESUME); core events arrive on the core's thread and
 * are rendered there into the request's buffer, then the connection is
 * resumed. A watchdog thread looks every 100 ms at the sockets of
 * suspended connections (which libmicrohttpd does not watch): a client
 * that went away gets its core requests cancelled (rt_core_cancel) within
 * that time. Slow and idle clients are bounded by a connection guard
 * (tdm_http_guard_t, tandem/http.h): a request's headers must arrive
 * within header_timeout_s of the connection's start (or of the previous
 * answer), a body must keep 1 KiB/s on average after that grace, an
 * address holds at most max_connections_per_ip connections, and a new
 * connection over max_connections closes the oldest idle one; answers in
 * progress are never closed for others. timeout_s is libmicrohttpd's idle
 * timeout for the rest (e.g. a client that does not read its answer).
 *
 * start / stop are for one controlling thread; the core must outlive the
 * server. */
#ifndef TANDEM_ROUTER_API_OPENAI_H
#define TANDEM_ROUTER_API_OPENAI_H

#include <stddef.h>

#include "core.h"
#include "tandem/http.h"
#include "tandem/metrics.h"
#include "tandem/status.h"

typedef struct rt_openai rt_openai_t;

typedef struct rt_openai_config {
    const char *host;                /* numeric IPv4 to bind; NULL: "127.0.0.1" */
    int port;                        /* 0..65535; 0 picks a free port (rt_openai_port) */
    const char *api_key;             /* NULL or "": no auth; else "Authorization: Bearer KEY"
                                        is required on every path but /health, /ready,
                                        /metrics */
    size_t max_body_bytes;           /* 0: 4 MiB; a larger body is 413 */
    unsigned max_connections;        /* before the oldest idle one is closed; 0: 4096 */
    unsigned max_connections_per_ip; /* 0: no limit */
    unsigned header_timeout_s;       /* 0: 10 */
    unsigned timeout_s;              /* idle connection timeout; 0: 30 */
    /* rendered on GET /metrics, and holds tandem_router_http_connections and
     * tandem_router_http_connections_closed_total{reason}; NULL: 404 */
    tdm_metrics_registry_t *registry;
} rt_openai_config_t;

/* Binds host:port and starts serving. The config is copied (strings
 * included); the registry must outlive the server. A bind that fails is
 * logged with its cause: TDM_ERR_BUSY (port in use), TDM_ERR_INVALID (bad
 * address or config), TDM_ERR_IO. */
tdm_status_t rt_openai_start(rt_core_t *core, const rt_openai_config_t *cfg, rt_openai_t **out);
/* The port listened on. */
int rt_openai_port(const rt_openai_t *s);
/* HTTP requests not yet completed (answers still being sent included). */
size_t rt_openai_active(rt_openai_t *s);
/* What the connection guard has seen and closed (tests, logs). */
void rt_openai_guard_stats(rt_openai_t *s, tdm_http_guard_stats_t *out);
/* Cancels the requests in flight (rt_core_cancel), resumes suspended
 * connections, stops libmicrohttpd, waits (up to 5 s) for the core's final
 * events of those requests, frees. Accepts NULL. */
void rt_openai_stop(rt_openai_t *s);

#endif
