/* tandem: the KV store's client library (prefill and decode nodes, tools).
 *
 * A client talks to one or more tandem-kvstore processes. Each block key
 * picks its stores by rendezvous (highest-random-weight) hashing over the
 * store addresses, so every client agrees on the placement without
 * coordination; with replicas = 2 a PUT writes to the two best stores and
 * a GET reads the best one and falls back to the second.
 *
 * The API is non-blocking and driven by the caller's loop: submit
 * operations, call tdm_kvc_progress() (and tdm_kvc_wait() when idle), and
 * each operation's callback runs exactly once, from progress, no later
 * than its deadline (plus the time of one progress call). The arrays and
 * buffers passed to an operation belong to the library until then.
 *
 * Per key, a status says what happened: TDM_OK, TDM_ERR_NOT_FOUND (a
 * miss), TDM_ERR_NOMEM (store full of leased blocks), TDM_ERR_INVALID
 * (payload too large for the store or the buffer), TDM_ERR_TIMEOUT or
 * TDM_ERR_IO (the store did not answer in time, died, or is unreachable).
 * For a reader every non-OK status means the same: the block is missing
 * and is recomputed. Connections are re-made with backoff. */
#ifndef TANDEM_KVCLIENT_H
#define TANDEM_KVCLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/hash.h"
#include "tandem/net.h"
#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_KVC_MAX_STORES 64

typedef struct tdm_kvc tdm_kvc_t;

typedef struct tdm_kvc_config {
    const char *const *stores; /* "host:port" of each store */
    size_t n_stores;
    int replicas;       /* 1 or 2 (default 1) */
    const char *token;  /* cluster token (NULL or "": none, for --insecure stores) */
    int deadline_ms;    /* per operation (default 3000) */
    int backoff_min_ms; /* reconnect backoff (default 100) */
    int backoff_max_ms; /* (default 5000) */
    const char *name;   /* this client, for the stores' logs */
    tdm_net_t *net;     /* share a transport (NULL: the client makes its own) */
} tdm_kvc_config_t;

typedef struct tdm_kvc_stats {
    uint64_t blocks, bytes_used, capacity, bytes_free, bytes_reserved;
    uint64_t leased, pinned, hits, misses, evictions, puts, gets;
    uint64_t bytes_in, bytes_out, clients, refused;
} tdm_kvc_stats_t;

/* Runs once per operation: TDM_OK when every key was answered (see the
 * per-key statuses), else the first error. */
typedef void (*tdm_kvc_cb_t)(void *user, tdm_status_t status);

tdm_status_t tdm_kvc_create(const tdm_kvc_config_t *cfg, tdm_kvc_t **out);
/* Fails what is still pending (callbacks run) and closes. */
void tdm_kvc_destroy(tdm_kvc_t *kvc);

int tdm_kvc_progress(tdm_kvc_t *kvc);
void tdm_kvc_wait(tdm_kvc_t *kvc, int timeout_ms);
tdm_net_t *tdm_kvc_net(tdm_kvc_t *kvc);
/* Stores with a live, authenticated connection. */
size_t tdm_kvc_num_ready(const tdm_kvc_t *kvc);
/* Progresses until every store is connected or timeout_ms passes. */
tdm_status_t tdm_kvc_wait_ready(tdm_kvc_t *kvc, int timeout_ms);

/* Registers memory used for payloads (PUT sources, GET destinations). */
tdm_status_t tdm_kvc_mem_map(tdm_kvc_t *kvc, void *buf, size_t len, void **memh);
void tdm_kvc_mem_unmap(tdm_kvc_t *kvc, void *memh);

/* PUT n blocks; lease_ms > 0 pins them in the store for that long (until
 * RELEASE). status[i]: TDM_OK (stored, or already there). */
tdm_status_t tdm_kvc_put(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                         const void *const *bufs, const size_t *lens, uint32_t lease_ms,
                         tdm_status_t *status, tdm_kvc_cb_t cb, void *user);
/* GET n blocks into bufs[i] (caps[i] bytes); lens[i] gets the length. */
tdm_status_t tdm_kvc_get(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys, void *const *bufs,
                         const size_t *caps, size_t *lens, tdm_status_t *status, tdm_kvc_cb_t cb,
                         void *user);
/* How many leading keys of a chain are stored (one round trip to each
 * store involved). */
tdm_status_t tdm_kvc_lookup(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys, size_t *n_leading,
                            tdm_kvc_cb_t cb, void *user);
/* Ends leases / deletes blocks (on every replica). status may be NULL. */
tdm_status_t tdm_kvc_release(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                             tdm_status_t *status, tdm_kvc_cb_t cb, void *user);
tdm_status_t tdm_kvc_delete(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                            tdm_status_t *status, tdm_kvc_cb_t cb, void *user);
/* Counters of one store (index into cfg->stores). */
tdm_status_t tdm_kvc_stats(tdm_kvc_t *kvc, size_t store, tdm_kvc_stats_t *out, tdm_kvc_cb_t cb,
                           void *user);

/* Blocking wrappers: submit, then progress until the callback ran. */
tdm_status_t tdm_kvc_put_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                              const void *const *bufs, const size_t *lens, uint32_t lease_ms,
                              tdm_status_t *status);
tdm_status_t tdm_kvc_get_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                              void *const *bufs, const size_t *caps, size_t *lens,
                              tdm_status_t *status);
tdm_status_t tdm_kvc_lookup_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                                 size_t *n_leading);
tdm_status_t tdm_kvc_release_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                                  tdm_status_t *status);
tdm_status_t tdm_kvc_delete_sync(tdm_kvc_t *kvc, size_t n, const tdm_hash128_t *keys,
                                 tdm_status_t *status);
tdm_status_t tdm_kvc_stats_sync(tdm_kvc_t *kvc, size_t store, tdm_kvc_stats_t *out);

/* The stores of a key, best first (rendezvous hashing): up to max indexes
 * into cfg->stores. */
size_t tdm_kvc_placement(const tdm_kvc_t *kvc, tdm_hash128_t key, size_t *stores, size_t max);

#ifdef __cplusplus
}
#endif

#endif
