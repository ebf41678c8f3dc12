/* tandem: the cluster protocol between the router and its prefill and
 * decode nodes (proto/cluster.proto), shared by both sides.
 *
 * Every message is one ClusterMsg, protobuf-c packed into the data part of
 * active message TDM_CLUSTER_AM_ID (a control message: copied, eager).
 * Nodes connect to the router's listener and send Hello with the cluster
 * token first; the router answers Welcome and from then on sends Jobs and
 * Cancels on the same connection, and the node sends Heartbeats and
 * JobEvents. Decoding is checked (size, oneof, bounds), so a peer's bytes
 * can never crash the other side. */
#ifndef TANDEM_NODE_CLUSTER_H
#define TANDEM_NODE_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/hash.h"
#include "tandem/net.h"
#include "tandem/proto/cluster.pb-c.h"
#include "tandem/status.h"

#define TDM_CLUSTER_AM_ID        8
#define TDM_CLUSTER_VERSION      2
#define TDM_CLUSTER_MAX_MSG      (1u << 20) /* bytes of one message */
#define TDM_CLUSTER_MAX_KEYS     4096       /* block keys in one job */
#define TDM_CLUSTER_HEARTBEAT_MS 500
#define TDM_CLUSTER_HELLO_MS     10000 /* a node waits this long for the router's Welcome */

/* Packs and sends one message on conn (copied). */
tdm_status_t tdm_cluster_send(tdm_conn_t *conn, const Tandem__Cluster__ClusterMsg *msg);

/* Unpacks a received message: NULL (with why) for anything malformed,
 * oversized or without a body. Free with tdm_cluster_free. */
Tandem__Cluster__ClusterMsg *tdm_cluster_decode(const tdm_net_msg_t *msg, char *why, size_t cap);
void tdm_cluster_free(Tandem__Cluster__ClusterMsg *m);

/* 16-byte key <-> ProtobufCBinaryData (no copy / checked). */
ProtobufCBinaryData tdm_cluster_key_bytes(const tdm_hash128_t *key);
bool tdm_cluster_key_from(const ProtobufCBinaryData *b, tdm_hash128_t *key);

/* The key a block has in the store: the engine's chained prefix key mixed
 * with the codec, so blocks of different codecs never alias. */
tdm_hash128_t tdm_cluster_store_key(tdm_hash128_t engine_key, const char *codec_name);

#endif
