/* tandem-kvstore: the content-addressed KV block store (docs/kvstore.md).
 *
 *   tandem-kvstore --listen 0.0.0.0:7400 --capacity 4GiB --cluster-token T
 *
 * Every flag can also come from the environment (TANDEM_LISTEN, ...). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"
#include "tandem/flags.h"
#include "tandem/log.h"
#include "tandem/net.h"

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

int main(int argc, char **argv)
{
    kvs_config_t cfg = {
        .listen = "0.0.0.0:7400",
        .token = NULL,
        .capacity = 4ull << 30,
        .max_block_bytes = 4ull << 20,
        .metrics_host = "0.0.0.0",
        .metrics_port = 7401,
        .drain_timeout_ms = 10000,
        .client_timeout_ms = 10000,
        .max_inflight = 256,
        .max_clients = 1024,
    };
    const char *log_level = NULL;
    int drain_timeout_s = 10;
    tdm_flag_t flags[] = {
        {"listen", 'l', TDM_FLAG_TYPE_STR, &cfg.listen, "HOST:PORT of the UCX listener", NULL},
        {"cluster-token", 0, TDM_FLAG_TYPE_STR, &cfg.token,
         "shared secret every client must present first", NULL},
        {"insecure", 0, TDM_FLAG_TYPE_BOOL, &cfg.insecure,
         "accept clients without a cluster token (trusted networks only)", NULL},
        {"capacity", 'c', TDM_FLAG_TYPE_SIZE, &cfg.capacity,
         "bytes of the block pool, allocated and registered at start", NULL},
        {"max-block-bytes", 0, TDM_FLAG_TYPE_SIZE, &cfg.max_block_bytes,
         "largest block payload accepted", NULL},
        {"metrics-host", 0, TDM_FLAG_TYPE_STR, &cfg.metrics_host,
         "address of the HTTP /metrics and /health server", NULL},
        {"metrics-port", 0, TDM_FLAG_TYPE_INT, &cfg.metrics_port, "its port (0: none)", NULL},
        {"drain-timeout", 0, TDM_FLAG_TYPE_INT, &drain_timeout_s,
         "seconds to finish in-flight operations after SIGTERM", NULL},
        {"client-timeout", 0, TDM_FLAG_TYPE_INT, &cfg.client_timeout_ms,
         "ms a client may leave a transfer stalled before it is closed", NULL},
        {"max-inflight", 0, TDM_FLAG_TYPE_INT, &cfg.max_inflight, "requests in flight per client",
         NULL},
        {"max-clients", 0, TDM_FLAG_TYPE_INT, &cfg.max_clients, "connected clients at once", NULL},
        {"log-level", 0, TDM_FLAG_TYPE_STR, &log_level, "error, warn, info or debug", NULL},
    };
    size_t n_flags = sizeof(flags) / sizeof(flags[0]);
    bool help = false;
    char err[256];
    size_t n_pos = 0;
    if (tdm_flags_parse(flags, n_flags, argc - 1, argv + 1, NULL, 0, &n_pos, &help, err,
                        sizeof(err)) != TDM_OK) {
        fprintf(stderr, "tandem-kvstore: %s (see --help)\n", err);
        return 2;
    }
    if (help) {
        printf("usage: tandem-kvstore [flags]\n\n"
               "The KV block store of a tandem cluster: blocks in RAM, LRU eviction, leases,\n"
               "UCX active messages. Flags may also be set as TANDEM_<NAME> variables.\n\n");
        tdm_flags_usage(stdout, flags, n_flags);
        printf("\n%s", TDM_NET_HELP_ENV);
        return 0;
    }
    if (!tdm_log_set_level_name(log_level)) {
        fprintf(stderr, "tandem-kvstore: unknown --log-level %s\n", log_level);
        return 2;
    }
    if (cfg.capacity < cfg.max_block_bytes || cfg.max_block_bytes == 0 ||
        cfg.max_block_bytes > (4ull << 30) - 1) {
        fprintf(stderr, "tandem-kvstore: --capacity must hold at least one block of "
                        "--max-block-bytes (1 B .. 4 GiB)\n");
        return 2;
    }
    if (cfg.max_inflight < 1 || cfg.max_clients < 1 || drain_timeout_s < 0 ||
        drain_timeout_s > 86400 || cfg.client_timeout_ms < 100 || cfg.metrics_port < 0 ||
        cfg.metrics_port > 65535) {
        fprintf(stderr, "tandem-kvstore: a limit is out of range (see --help)\n");
        return 2;
    }
    cfg.drain_timeout_ms = drain_timeout_s * 1000;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    return kvs_run(&cfg, &g_stop);
}
