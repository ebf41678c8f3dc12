/* tandem-router: the gRPC API (proto/generation.proto, package tandem.v1).
 *
 * Service tandem.v1.Generation: Generate (unary), GenerateStream (server
 * streaming), ListModels, Health. The requests become rt_params_t for the
 * core (core.h), the core's events become GenerateResponse messages; the
 * status codes and what each one means are listed at the top of the proto.
 *
 * Threads: one thread of its own drives gRPC's completion queue; the core's
 * events arrive on the core's thread, are queued per call under a lock and
 * handed over with an empty grpc_call_start_batch, whose tag wakes the
 * completion queue. A client's cancel, a lost connection or a passed
 * deadline cancels the core request at once (rt_core_cancel).
 *
 * Limits: requests over max_message_bytes get RESOURCE_EXHAUSTED from gRPC
 * itself. HTTP/2 pings are accepted at any rate (a client's keepalive must
 * not kill a stream that waits through a long prefill). */
#ifndef TANDEM_ROUTER_API_GRPC_H
#define TANDEM_ROUTER_API_GRPC_H

#include <stddef.h>

#include "core.h"
#include "tandem/status.h"

typedef struct rt_grpc rt_grpc_t;

typedef struct rt_grpc_config {
    const char *host; /* NULL: "127.0.0.1"; "0.0.0.0" or "::" for every interface */
    int port;         /* 8001 by rt_grpc_config_default; 0: the OS picks one (rt_grpc_port) */
    /* NULL or "": no authentication; else every call but Health needs the
     * metadata "authorization: Bearer KEY" (UNAUTHENTICATED without it).
     * Copied. */
    const char *api_key;
    size_t max_message_bytes; /* largest request accepted; 0: 4 MiB */
    int max_model_len_unused; /* reserved; the models' lengths come from the core */
} rt_grpc_config_t;

/* Fills cfg with the defaults (host NULL: 127.0.0.1, port 8001, no key,
 * 4 MiB). */
void rt_grpc_config_default(rt_grpc_config_t *cfg);

/* Binds host:port and starts serving on a thread of its own. The core must
 * outlive the server. TDM_ERR_INVALID for a port outside 0..65535,
 * TDM_ERR_IO when the address cannot be bound (in use: SO_REUSEPORT is
 * off), both logged; *out is set only on success. Calls grpc_init (and
 * rt_grpc_stop grpc_shutdown). */
tdm_status_t rt_grpc_start(rt_core_t *core, const rt_grpc_config_t *cfg, rt_grpc_t **out);

/* The port bound (the one the OS picked when cfg->port was 0). */
int rt_grpc_port(const rt_grpc_t *s);

/* Cancels the calls in flight (their clients get UNAVAILABLE and their core
 * requests are cancelled), waits for the core's final events of those
 * requests (bounded: 10 s, then the server is leaked with an error logged
 * rather than freed under the core's feet), shuts the server down and frees
 * it. Accepts NULL. */
void rt_grpc_stop(rt_grpc_t *s);

#endif
