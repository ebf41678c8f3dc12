/* tandem: the internal transport, UCX active messages between peers.
 *
 * One tdm_net_t is one UCX context and worker, driven by one thread: every
 * call and every callback happens on the thread that calls
 * tdm_net_progress(). Peers are tdm_conn_t endpoints in UCX's peer
 * (error-handling) mode, made by tdm_net_connect() or accepted by a
 * listener.
 *
 * Messages are active messages: an id (one handler per id), a header of
 * up to TDM_NET_MAX_HEADER bytes and a data part. Small data arrives with
 * the message (eager); large data arrives as rendezvous: the handler sees
 * a descriptor and either receives it into memory of its choice with
 * tdm_net_recv() during the callback, or does not, and the data is
 * dropped (the sender still sees success).
 *
 * UCX does not notice a hung peer or a cut link on its own: callers put a
 * deadline on every request and close the connection (force) when it
 * passes. Closing fails every operation still pending on the connection:
 * their callbacks run with an error status before the close completes.
 * See DESIGN.md "Transport" for what was measured and the traps. */
#ifndef TANDEM_NET_H
#define TANDEM_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_NET_MAX_HEADER 1024 /* bytes of AM header a tandem message may carry */
#define TDM_NET_MAX_AM_ID  31
#define TDM_NET_MAX_MAPS   64 /* memory registrations at once */

/* The end of --help of every role that speaks UCX: the UCX variables an
 * operator sets most (firewalls, NIC choice). */
#define TDM_NET_HELP_ENV                                                                           \
    "UCX reads its own variables too; the ones deployments set most:\n"                            \
    "  UCX_TCP_PORT_RANGE=LO-HI   ports UCX's TCP transport listens on besides the\n"              \
    "                             listener (open them between tandem hosts)\n"                     \
    "  UCX_NET_DEVICES=DEV,...    network devices to use (e.g. eth0, mlx5_0:1)\n"                  \
    "  UCX_TLS=tcp|rc,...         transports to use (default: all that work)\n"

typedef struct tdm_net tdm_net_t;
typedef struct tdm_conn tdm_conn_t;

/* One received message, valid during the handler call only. */
typedef struct tdm_net_msg {
    tdm_conn_t *conn;
    uint16_t am_id;
    const void *header;
    size_t header_len;
    const void *data; /* eager data, or NULL when rndv */
    size_t length;    /* data length (also for rndv) */
    bool rndv;        /* receive with tdm_net_recv() during the call, or it is dropped */
    void *desc_;      /* private: the rendezvous descriptor */
} tdm_net_msg_t;

typedef void (*tdm_net_handler_t)(void *user, const tdm_net_msg_t *msg);
/* A listener accepted a connection; it is usable at once. */
typedef void (*tdm_net_accept_t)(void *user, tdm_conn_t *conn);
/* The connection failed (peer gone, link reset, closed by the peer). Runs
 * once per connection; the owner still calls tdm_conn_close(). */
typedef void (*tdm_net_error_t)(void *user, tdm_conn_t *conn, tdm_status_t why);
/* A send or receive finished: TDM_OK, or an error when it failed or its
 * connection was closed first. */
typedef void (*tdm_net_done_t)(void *user, tdm_status_t status);

typedef struct tdm_net_config {
    const char *name; /* for logs */
    /* The cluster token both ends of every connection prove. NULL or "":
     * a listener takes anyone (--insecure), a client proves "". */
    const char *token;
    /* The IPv4 address (or name) this process uses for cluster traffic:
     * UCX's TCP transport then listens on that address's device only
     * (UCX_NET_DEVICES, unless the operator set it; only with UCX_TLS=tcp).
     * NULL or a wildcard: every device. */
    const char *local_addr;
    /* Defaults for UCX, applied unless the UCX_* variable is set: TLS
     * tcp, short TCP keepalive. */
    bool keep_ucx_defaults; /* true: apply none of them */
} tdm_net_config_t;

tdm_status_t tdm_net_create(const tdm_net_config_t *cfg, tdm_net_t **out);
/* Closes every connection (force) and the listener, then frees. */
void tdm_net_destroy(tdm_net_t *net);

tdm_status_t tdm_net_set_handler(tdm_net_t *net, uint16_t am_id, tdm_net_handler_t fn, void *user);

/* Listens on host:port (IPv4 or a name; port 0 picks one) for the
 * handshake; a peer that completes it is accepted. */
tdm_status_t tdm_net_listen(tdm_net_t *net, const char *host, int port, tdm_net_accept_t on_accept,
                            void *user);
int tdm_net_listen_port(const tdm_net_t *net); /* the bound port, or -1 */
/* Connections the listener refused so far: failed handshakes (a wrong
 * token, bytes that are not tandem's, a peer too slow) and connections
 * over the limit of handshakes at once. */
uint64_t tdm_net_refused(const tdm_net_t *net);
void tdm_net_stop_listening(tdm_net_t *net);

/* Starts connecting to host:port; the connection is usable at once (sends
 * queue until it is up). Failure to reach the peer arrives as an error
 * callback. */
tdm_status_t tdm_net_connect(tdm_net_t *net, const char *host, int port, tdm_conn_t **out);

void tdm_conn_set_owner(tdm_conn_t *conn, void *user, tdm_net_error_t on_error);
void *tdm_conn_owner(const tdm_conn_t *conn);
const char *tdm_conn_peer(const tdm_conn_t *conn); /* "host:port" */
bool tdm_conn_failed(const tdm_conn_t *conn);
/* Closes (force when the connection failed or force is set; otherwise a
 * clean close that flushes). The handle is invalid after the call; pending
 * operations fail. */
void tdm_conn_close(tdm_conn_t *conn, bool force);

/* Sends an active message. header and (if copy_data) data are copied; with
 * copy_data false the data must stay valid until done runs (zero copy for
 * large payloads). Copied data is a control message and always goes eager,
 * so the receiver has it whole in its handler; the other data goes by
 * rendezvous when UCX finds it large. done may be NULL. Returns an error at once when the
 * connection has failed. */
tdm_status_t tdm_conn_send(tdm_conn_t *conn, uint16_t am_id, const void *header, size_t header_len,
                           const void *data, size_t length, bool copy_data, tdm_net_done_t done,
                           void *user);

/* Receives a rendezvous message's data into buf (length bytes, the whole
 * message); only during the handler call. done runs on completion or
 * failure, never inside this call. */
tdm_status_t tdm_net_recv(tdm_net_t *net, const tdm_net_msg_t *msg, void *buf, tdm_net_done_t done,
                          void *user);

/* Registers memory for zero-copy transfers (payload pools, receive
 * buffers). Optional: unregistered memory works through UCX's cache.
 * Registrations still in place are removed by tdm_net_destroy(). */
tdm_status_t tdm_net_mem_map(tdm_net_t *net, void *buf, size_t len, void **memh);
void tdm_net_mem_unmap(tdm_net_t *net, void *memh);

/* Drives the transport: runs callbacks. Returns how much work was done. */
int tdm_net_progress(tdm_net_t *net);
/* Sleeps until the transport has events or timeout_ms passes (it may
 * return early). Call tdm_net_progress() after it. */
void tdm_net_wait(tdm_net_t *net, int timeout_ms);

/* Wakes the thread sleeping in tdm_net_wait (the only call that may come
 * from any thread), e.g. after queueing work for it. */
void tdm_net_signal(tdm_net_t *net);

/* Monotonic clock in milliseconds, for deadlines. */
int64_t tdm_net_now_ms(void);

/* The network device that holds the IPv4 address host (any loopback
 * device for 127.0.0.0/8); TDM_ERR_NOT_FOUND for a wildcard or an address
 * of no local device. */
tdm_status_t tdm_net_device_of(const char *host, char *dev, size_t dev_len);

/* Parses "host:port" (port required) into host (NUL-terminated) and port. */
tdm_status_t tdm_net_parse_addr(const char *s, char *host, size_t host_len, int *port);

#ifdef __cplusplus
}
#endif

#endif
