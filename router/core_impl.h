/* tandem-router: making the real core (core.c) — its nodes, pools and
 * failover. The front ends see only core.h. */
#ifndef TANDEM_ROUTER_CORE_IMPL_H
#define TANDEM_ROUTER_CORE_IMPL_H

#include "core.h"
#include "tandem/metrics.h"

typedef struct rt_core_config {
    const char *model_path;        /* GGUF: the router loads its tokenizer only */
    const char *served_model_name; /* NULL: the GGUF's general.name */
    const char *listen;            /* HOST:PORT nodes register at */
    const char *token;             /* cluster token */
    int32_t max_model_len;         /* 0: the nodes' (at most the model's, 8192) */
    int queue_timeout_ms;          /* how long a request waits for a node */
    int disagg_min_tokens;         /* shorter prompts skip the prefill pool */
    int node_timeout_ms;           /* no heartbeat or job progress: the node is gone */
    int max_retries;               /* failovers per request */
    int max_queued;                /* requests held (waiting or running), at most */
    /* Pools that exist without a node, comma-separated ("default"): they
     * hold requests while they scale from zero. Pools of registered nodes
     * join them; any other tier is refused (400). */
    const char *pools;
    int max_queued_per_pool;   /* requests one pool holds, at most */
    int max_queued_per_client; /* requests one client (rt_params.client) holds, at most */
    tdm_metrics_registry_t *registry;
} rt_core_config_t;

tdm_status_t rt_core_create(const rt_core_config_t *cfg, char *err, size_t err_len,
                            rt_core_t **out);
/* Fails what is in flight (503), closes node connections, stops the thread. */
void rt_core_destroy(rt_core_t *core);
/* The internal port nodes register at (useful with port 0). */
int rt_core_listen_port(rt_core_t *core);

#endif
