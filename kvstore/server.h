/* tandem-kvstore: the store server (docs/kvstore.md). One thread drives
 * the UCX worker; the HTTP metrics server has its own. */
#ifndef TANDEM_KVSTORE_SERVER_H
#define TANDEM_KVSTORE_SERVER_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct kvs_config {
    const char *listen; /* HOST:PORT */
    const char *token;  /* cluster token; NULL or "" needs insecure */
    bool insecure;
    uint64_t capacity;        /* bytes of the payload pool */
    uint64_t max_block_bytes; /* largest payload */
    const char *metrics_host; /* HTTP /metrics and /health */
    int metrics_port;         /* 0: none */
    int drain_timeout_ms;     /* SIGTERM: finish in-flight work this long */
    int client_timeout_ms;    /* a client that stops reading is closed after this */
    int max_inflight;         /* requests in flight per connection */
    int max_clients;
} kvs_config_t;

/* Runs until *stop is set (by a signal handler) and the drain ends.
 * Returns the process exit code: 0 after a clean drain, 1 when the store
 * cannot start. */
int kvs_run(const kvs_config_t *cfg, volatile sig_atomic_t *stop);

#endif
