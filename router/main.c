/* tandem-router: the endpoint clients talk to (OpenAI HTTP and gRPC); the
 * nodes register at its --listen port (core.c). */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "api_grpc.h"
#include "api_openai.h"
#include "core_impl.h"
#include "tandem/flags.h"
#include "tandem/http.h"
#include "tandem/log.h"
#include "tandem/net.h"

static volatile sig_atomic_t g_stop;

/* Descriptors kept for everything but the HTTP connections: gRPC, UCX,
 * the model file, logs. */
#define ROUTER_FD_RESERVE  1024
#define ROUTER_HEALTH_CONN 64 /* connections of the --health-port server */

/* Raises the soft limit of open files to the hard one (every HTTP
 * connection is a descriptor) and returns the limit now in force. */
static rlim_t raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        tdm_log_warn("router", "cannot read the open files limit: %s", strerror(errno));
        return 1024;
    }
    rlim_t was = rl.rlim_cur, want = rl.rlim_max;
    if (want == RLIM_INFINITY) {
        /* the kernel refuses more than fs.nr_open */
        want = 1u << 20;
        FILE *f = fopen("/proc/sys/fs/nr_open", "r");
        unsigned long long v = 0;
        if (f != NULL) {
            if (fscanf(f, "%llu", &v) == 1 && v > 0)
                want = (rlim_t)v;
            fclose(f);
        }
    }
    if (was != RLIM_INFINITY && was >= want) {
        tdm_log_info("router", "open files limit: %llu", (unsigned long long)was);
        return was;
    }
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        tdm_log_warn("router",
                     "cannot raise the open files limit from %llu to %llu: %s; HTTP "
                     "connections are bounded by it (raise it: ulimit -n, LimitNOFILE=)",
                     (unsigned long long)was, (unsigned long long)want, strerror(errno));
        return was;
    }
    tdm_log_info("router", "open files limit raised from %llu to %llu (the hard limit)",
                 (unsigned long long)was, (unsigned long long)want);
    return want;
}

static bool router_ready(void *core, char *reason, size_t cap)
{
    return rt_core_ready(core, reason, cap);
}

/* The first SIGTERM/SIGINT drains; a second one stops at once. */
static void on_signal(int sig)
{
    (void)sig;
    if (g_stop < 2)
        g_stop++;
}

int main(int argc, char **argv)
{
    rt_core_config_t cc = {
        .listen = "0.0.0.0:7500",
        .queue_timeout_ms = 0,
        .disagg_min_tokens = 32,
        .node_timeout_ms = 3000,
        .max_retries = 3,
        .max_queued = 4096,
        .pools = "default",
        .max_queued_per_pool = 2048,
        .max_queued_per_client = 1024,
    };
    const char *host = "127.0.0.1", *grpc_host = "127.0.0.1", *api_key = NULL;
    const char *log_level = NULL;
    int port = 8000, grpc_port = 8001, queue_timeout_s = 30, drain_timeout_s = 30;
    uint64_t max_body = 4ull << 20;
    int health_port = -1, max_conn = 4096, max_conn_per_ip = 1024, header_timeout_s = 10;
    tdm_flag_t flags[] = {
        {"model", 'm', TDM_FLAG_TYPE_STR, &cc.model_path,
         "GGUF model file (the router reads its tokenizer and chat template only)", NULL},
        {"served-model-name", 0, TDM_FLAG_TYPE_STR, &cc.served_model_name,
         "the model's name in the API (default: the GGUF's general.name)", NULL},
        {"host", 0, TDM_FLAG_TYPE_STR, &host, "address of the OpenAI HTTP API", NULL},
        {"port", 'p', TDM_FLAG_TYPE_INT, &port, "its port", NULL},
        {"grpc-host", 0, TDM_FLAG_TYPE_STR, &grpc_host, "address of the gRPC API", NULL},
        {"grpc-port", 0, TDM_FLAG_TYPE_INT, &grpc_port, "its port (-1: no gRPC)", NULL},
        {"listen", 'l', TDM_FLAG_TYPE_STR, &cc.listen, "HOST:PORT nodes register at (UCX)", NULL},
        {"cluster-token", 0, TDM_FLAG_TYPE_STR, &cc.token,
         "shared secret of the cluster (prefer the TANDEM_CLUSTER_TOKEN variable)", NULL},
        {"api-key", 0, TDM_FLAG_TYPE_STR, &api_key,
         "clients must send Authorization: Bearer KEY (prefer TANDEM_API_KEY)", NULL},
        {"max-model-len", 0, TDM_FLAG_TYPE_INT, &cc.max_model_len,
         "prompt + output tokens (0: the model's, at most 8192)", NULL},
        {"queue-timeout", 0, TDM_FLAG_TYPE_INT, &queue_timeout_s,
         "seconds a request waits for a node before a 503", NULL},
        {"disagg-min-tokens", 0, TDM_FLAG_TYPE_INT, &cc.disagg_min_tokens,
         "prompts shorter than this skip the prefill pool", NULL},
        {"node-timeout", 0, TDM_FLAG_TYPE_INT, &cc.node_timeout_ms,
         "ms without a heartbeat after which a node is taken as lost", NULL},
        {"max-retries", 0, TDM_FLAG_TYPE_INT, &cc.max_retries,
         "times a request is re-sent after its node failed", NULL},
        {"max-queued", 0, TDM_FLAG_TYPE_INT, &cc.max_queued,
         "requests held at once (waiting for a node or running); over it: 429", NULL},
        {"pools", 0, TDM_FLAG_TYPE_STR, &cc.pools,
         "comma-separated pools (x-model-tier values) that take requests also with no node "
         "(scale from zero); pools of registered nodes join them, other tiers get 400",
         NULL},
        {"max-queued-per-pool", 0, TDM_FLAG_TYPE_INT, &cc.max_queued_per_pool,
         "requests one pool holds at once; over it: 429 with Retry-After", NULL},
        {"max-queued-per-key", 0, TDM_FLAG_TYPE_INT, &cc.max_queued_per_client,
         "requests one client holds at once (client: its API key, or its IP address "
         "without --api-key); over it: 429 with Retry-After",
         NULL},
        {"max-body-bytes", 0, TDM_FLAG_TYPE_SIZE, &max_body,
         "largest HTTP request body of /v1/completions and /v1/chat/completions", NULL},
        {"health-port", 0, TDM_FLAG_TYPE_INT, &health_port,
         "also serve /health, /ready and /metrics on this port of --host, by a server of its "
         "own that a flood of the API port cannot reach (-1: none)",
         NULL},
        {"max-connections", 0, TDM_FLAG_TYPE_INT, &max_conn,
         "open HTTP API connections; past it each new one closes the oldest idle one", NULL},
        {"max-connections-per-ip", 0, TDM_FLAG_TYPE_INT, &max_conn_per_ip,
         "HTTP API connections from one address (0: no limit); raise it behind a proxy "
         "that all clients share",
         NULL},
        {"header-timeout", 0, TDM_FLAG_TYPE_INT, &header_timeout_s,
         "seconds an HTTP connection may take to send a request's headers (also how long "
         "an idle kept-alive connection stays open)",
         NULL},
        {"drain-timeout", 0, TDM_FLAG_TYPE_INT, &drain_timeout_s,
         "seconds in-flight requests may take to finish after SIGTERM", NULL},
        {"log-level", 0, TDM_FLAG_TYPE_STR, &log_level, "error, warn, info or debug", NULL},
    };
    size_t n_flags = sizeof(flags) / sizeof(flags[0]);
    bool help = false;
    char err[512];
    size_t n_pos = 0;
    if (tdm_flags_parse(flags, n_flags, argc - 1, argv + 1, NULL, 0, &n_pos, &help, err,
                        sizeof(err)) != TDM_OK) {
        fprintf(stderr, "tandem-router: %s (see --help)\n", err);
        return 2;
    }
    if (help) {
        printf("usage: tandem-router --model GGUF [flags]\n\n"
               "The client endpoint of a tandem cluster: OpenAI-compatible HTTP and gRPC.\n"
               "Prefill and decode nodes register at --listen. Flags may also be set as\n"
               "TANDEM_<NAME> variables (TANDEM_CLUSTER_TOKEN, TANDEM_API_KEY).\n\n");
        tdm_flags_usage(stdout, flags, n_flags);
        printf("\n%s", TDM_NET_HELP_ENV);
        return 0;
    }
    if (!tdm_log_set_level_name(log_level)) {
        fprintf(stderr, "tandem-router: unknown --log-level %s\n", log_level);
        return 2;
    }
    if (cc.token == NULL)
        cc.token = getenv("TANDEM_CLUSTER_TOKEN");
    if (api_key == NULL)
        api_key = getenv("TANDEM_API_KEY");
    if (cc.model_path == NULL || cc.token == NULL || cc.token[0] == '\0') {
        fprintf(stderr, "tandem-router: --model and a cluster token (--cluster-token or "
                        "TANDEM_CLUSTER_TOKEN) are required (see --help)\n");
        return 2;
    }
    if (port < 0 || port > 65535 || grpc_port < -1 || grpc_port > 65535 || queue_timeout_s < 0 ||
        cc.node_timeout_ms < 500 || cc.max_retries < 0 || cc.max_queued < 1 ||
        cc.max_queued_per_pool < 1 || cc.max_queued_per_client < 1 || cc.disagg_min_tokens < 0 ||
        cc.max_model_len < 0 || drain_timeout_s < 0) {
        fprintf(stderr, "tandem-router: a flag is out of range (see --help)\n");
        return 2;
    }
    if (health_port < -1 || health_port > 65535 || (health_port == port && port != 0) ||
        max_conn < 1 || max_conn > (1 << 24) || max_conn_per_ip < 0 || header_timeout_s < 1 ||
        header_timeout_s > 3600) {
        fprintf(stderr, "tandem-router: --health-port (-1..65535, not --port), "
                        "--max-connections (1..16777216), --max-connections-per-ip (0..) or "
                        "--header-timeout (1..3600) is out of range\n");
        return 2;
    }
    cc.queue_timeout_ms = queue_timeout_s * 1000;
    signal(SIGPIPE, SIG_IGN);
    /* every HTTP connection is a descriptor: the API server's limit and the
     * guard's headroom over it (a quarter, at least 64: answers in progress,
     * connections being closed), the same for the health server, and the
     * rest of the process */
    rlim_t nofile = raise_nofile();
    rlim_t fixed = 2 * ROUTER_HEALTH_CONN + ROUTER_FD_RESERVE + 64;
    rlim_t need = (rlim_t)max_conn + (rlim_t)max_conn / 4 + fixed;
    if (nofile != RLIM_INFINITY && nofile < need) {
        rlim_t room = nofile > fixed + 80 ? (nofile - fixed) * 4 / 5 : 64;
        tdm_log_warn("router",
                     "--max-connections %d lowered to %llu: the open files limit is %llu "
                     "(raise it with ulimit -n or LimitNOFILE=)",
                     max_conn, (unsigned long long)room, (unsigned long long)nofile);
        max_conn = (int)room;
    }
    tdm_metrics_registry_t *reg = NULL;
    if (tdm_metrics_registry_create(&reg) != TDM_OK)
        return 1;
    cc.registry = reg;
    rt_core_t *core = NULL;
    if (rt_core_create(&cc, err, sizeof(err), &core) != TDM_OK) {
        tdm_log_error("router", "cannot start: %s", err);
        tdm_metrics_registry_destroy(reg);
        return 1;
    }
    /* /health, /ready and /metrics on a server of their own: its own
     * thread, connection limit and guard, so probes answer whatever the
     * API port is going through */
    tdm_http_server_t *health = NULL;
    if (health_port >= 0) {
        tdm_http_config_t hc = {.host = host,
                                .port = health_port,
                                .max_connections = ROUTER_HEALTH_CONN,
                                .header_timeout_s = (unsigned)header_timeout_s,
                                .registry = reg,
                                .ready = router_ready,
                                .ready_arg = core,
                                .port_flag = "--health-port",
                                .name = "router"};
        if (tdm_http_server_create(&hc, &health) != TDM_OK ||
            tdm_http_server_start(health) != TDM_OK) {
            tdm_log_error("router", "cannot serve /health on %s:%d (see above)", host, health_port);
            tdm_http_server_destroy(health);
            rt_core_destroy(core);
            tdm_metrics_registry_destroy(reg);
            return 1;
        }
    }
    rt_openai_config_t oc = {
        .host = host,
        .port = port,
        .api_key = api_key,
        .max_body_bytes = (size_t)max_body,
        .max_connections = (unsigned)max_conn,
        .max_connections_per_ip = (unsigned)max_conn_per_ip,
        .header_timeout_s = (unsigned)header_timeout_s,
        .registry = reg,
    };
    rt_openai_t *http = NULL;
    if (rt_openai_start(core, &oc, &http) != TDM_OK) {
        tdm_log_error("router", "cannot serve HTTP on %s:%d (see above); is --port in use?", host,
                      port);
        tdm_http_server_destroy(health);
        rt_core_destroy(core);
        tdm_metrics_registry_destroy(reg);
        return 1;
    }
    rt_grpc_t *grpc = NULL;
    if (grpc_port >= 0) {
        rt_grpc_config_t gc;
        rt_grpc_config_default(&gc);
        gc.host = grpc_host;
        gc.port = grpc_port;
        gc.api_key = api_key;
        if (rt_grpc_start(core, &gc, &grpc) != TDM_OK) {
            tdm_log_error("router",
                          "cannot serve gRPC on %s:%d (see above); is --grpc-port in "
                          "use?",
                          grpc_host, grpc_port);
            rt_openai_stop(http);
            tdm_http_server_destroy(health);
            rt_core_destroy(core);
            tdm_metrics_registry_destroy(reg);
            return 1;
        }
    }
    char health_at[64] = "";
    if (health != NULL)
        snprintf(health_at, sizeof(health_at), ", /health, /ready, /metrics also on port %d",
                 tdm_http_server_port(health));
    tdm_log_info("router", "OpenAI API on http://%s:%d/v1%s, gRPC on %s:%d%s; nodes register at %s",
                 host, rt_openai_port(http), api_key ? " (API key required)" : "", grpc_host,
                 grpc != NULL ? rt_grpc_port(grpc) : -1, health_at, cc.listen);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    while (!g_stop)
        pause();
    /* Drain: readiness turns 503 (load balancers stop sending), new requests
     * get 503 (clients retry on another replica), those in flight finish. */
    rt_core_drain(core);
    int64_t deadline = tdm_net_now_ms() + (int64_t)drain_timeout_s * 1000;
    tdm_log_info("router", "draining: no new requests; %zu in flight, up to %d s",
                 rt_core_in_flight(core), drain_timeout_s);
    while (g_stop < 2 && tdm_net_now_ms() < deadline &&
           (rt_core_in_flight(core) > 0 || rt_openai_active(http) > 0))
        usleep(20 * 1000);
    size_t left = rt_core_in_flight(core);
    if (left > 0)
        tdm_log_warn("router", "stopping with %zu request(s) in flight (%s); they end with 503",
                     left, g_stop >= 2 ? "a second signal" : "--drain-timeout passed");
    else
        tdm_log_info("router", "drained: no request in flight; stopping");
    rt_grpc_stop(grpc);
    rt_openai_stop(http);
    tdm_http_server_destroy(health);
    rt_core_destroy(core);
    tdm_metrics_registry_destroy(reg);
    return 0;
}
