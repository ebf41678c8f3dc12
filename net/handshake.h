/* tandem: the handshake that opens every internal connection.
 *
 * Before two processes of a cluster exchange a single UCX message, the
 * one that connects (client) and the one that listens (server) talk over a
 * plain TCP connection that tandem accepts itself:
 *
 *   client -> server  HELLO   magic, version, client nonce
 *   server -> client  CHAL    magic, version, flags, server nonce
 *   client -> server  PROOF   client MAC, client connection id, client
 *                             UCX worker address
 *   server -> client  ACCEPT  server MAC, server connection id, server
 *                             UCX worker address
 *
 * A MAC is HMAC-SHA256 keyed with the cluster token over a label, both
 * nonces, the sender's id and address (and, from the server, the client's
 * id), so the token never crosses the wire, a recorded exchange cannot be
 * replayed, and neither address can be swapped in transit. The server
 * sends nothing about itself before the client has proven the token; the
 * client believes the server only when its MAC checks too. A server
 * without a token (--insecure) says so in CHAL's flags and checks no MAC;
 * a client then goes on without checking the server (and logs that).
 *
 * Then each side connects a UCX endpoint to the other's worker address,
 * and every active message carries the receiver's connection id, so a
 * message from anyone who did not pass this handshake is dropped unread.
 *
 * This file is the protocol only: bytes in, bytes out, no sockets, so the
 * fuzzer drives it (tests/fuzz/fuzz_handshake.c). net/ucx.c moves the
 * bytes. Every frame has a fixed size or a checked length, every input
 * byte is checked once, and a failed step says why. */
#ifndef TANDEM_NET_HANDSHAKE_H
#define TANDEM_NET_HANDSHAKE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_HS_NONCE    32
#define TDM_HS_MAC      32
#define TDM_HS_MAX_ADDR 16384 /* bytes of a UCX worker address we accept */
#define TDM_HS_VERSION  1

typedef struct tdm_hs tdm_hs_t;

/* A handshake for one side. token: the cluster token (NULL or "": a
 * server that checks nothing, a client that proves an empty token).
 * nonce: TDM_HS_NONCE fresh random bytes. my_id: the id the peer puts on
 * its messages to us (not 0). addr: our UCX worker address (copied). */
tdm_status_t tdm_hs_create(bool server, const char *token, const uint8_t nonce[TDM_HS_NONCE],
                           uint64_t my_id, const void *addr, size_t addr_len, tdm_hs_t **out);
void tdm_hs_destroy(tdm_hs_t *hs);

/* Bytes to send now (NULL, 0 when none); tdm_hs_sent() says how many went. */
const uint8_t *tdm_hs_output(const tdm_hs_t *hs, size_t *len);
void tdm_hs_sent(tdm_hs_t *hs, size_t n);

/* How many bytes the handshake wants to read next (0: none until the
 * output is sent, or finished). Never more than it can take. */
size_t tdm_hs_want(const tdm_hs_t *hs);

/* Takes len <= tdm_hs_want() received bytes. On a refusal returns an
 * error and writes why (for the log); the handshake is then dead. */
tdm_status_t tdm_hs_input(tdm_hs_t *hs, const void *data, size_t len, char *why, size_t why_len);

/* True when both sides are proven (or the server is open) and our last
 * frame is sent: the peer's id and address are then valid. */
bool tdm_hs_done(const tdm_hs_t *hs);
/* The server took no token (client side, after CHAL). */
bool tdm_hs_peer_open(const tdm_hs_t *hs);
uint64_t tdm_hs_peer_id(const tdm_hs_t *hs);
const void *tdm_hs_peer_addr(const tdm_hs_t *hs, size_t *len);

#ifdef __cplusplus
}
#endif

#endif
