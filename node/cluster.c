/* tandem: cluster protocol helpers (see cluster.h). */
#include "cluster.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

tdm_status_t tdm_cluster_send(tdm_conn_t *conn, const Tandem__Cluster__ClusterMsg *msg)
{
    size_t len = tandem__cluster__cluster_msg__get_packed_size(msg);
    if (len > TDM_CLUSTER_MAX_MSG)
        return TDM_ERR_INVALID;
    uint8_t stack[4096];
    uint8_t *buf = len <= sizeof(stack) ? stack : malloc(len);
    if (buf == NULL)
        return TDM_ERR_NOMEM;
    tandem__cluster__cluster_msg__pack(msg, buf);
    tdm_status_t st = tdm_conn_send(conn, TDM_CLUSTER_AM_ID, NULL, 0, buf, len, true, NULL, NULL);
    if (buf != stack)
        free(buf);
    return st;
}

Tandem__Cluster__ClusterMsg *tdm_cluster_decode(const tdm_net_msg_t *msg, char *why, size_t cap)
{
    if (msg->rndv || msg->data == NULL) {
        snprintf(why, cap, "message of %zu bytes arrived by rendezvous (too large)", msg->length);
        return NULL;
    }
    if (msg->length > TDM_CLUSTER_MAX_MSG) {
        snprintf(why, cap, "message of %zu bytes is over the %u-byte limit", msg->length,
                 TDM_CLUSTER_MAX_MSG);
        return NULL;
    }
    Tandem__Cluster__ClusterMsg *m =
        tandem__cluster__cluster_msg__unpack(NULL, msg->length, msg->data);
    if (m == NULL) {
        snprintf(why, cap, "malformed protobuf (%zu bytes)", msg->length);
        return NULL;
    }
    if (m->body_case == TANDEM__CLUSTER__CLUSTER_MSG__BODY__NOT_SET) {
        snprintf(why, cap, "message without a body");
        tandem__cluster__cluster_msg__free_unpacked(m, NULL);
        return NULL;
    }
    size_t n_keys = 0;
    if (m->body_case == TANDEM__CLUSTER__CLUSTER_MSG__BODY_JOB)
        n_keys = m->job->n_block_keys;
    if (m->body_case == TANDEM__CLUSTER__CLUSTER_MSG__BODY_EVENT)
        n_keys = m->event->n_block_keys;
    if (n_keys > TDM_CLUSTER_MAX_KEYS) {
        snprintf(why, cap, "%zu block keys (at most %d)", n_keys, TDM_CLUSTER_MAX_KEYS);
        tandem__cluster__cluster_msg__free_unpacked(m, NULL);
        return NULL;
    }
    return m;
}

void tdm_cluster_free(Tandem__Cluster__ClusterMsg *m)
{
    if (m != NULL)
        tandem__cluster__cluster_msg__free_unpacked(m, NULL);
}

ProtobufCBinaryData tdm_cluster_key_bytes(const tdm_hash128_t *key)
{
    return (ProtobufCBinaryData){.len = sizeof(*key), .data = (uint8_t *)key};
}

bool tdm_cluster_key_from(const ProtobufCBinaryData *b, tdm_hash128_t *key)
{
    if (b->len != sizeof(*key))
        return false;
    memcpy(key, b->data, sizeof(*key));
    return true;
}

tdm_hash128_t tdm_cluster_store_key(tdm_hash128_t engine_key, const char *codec_name)
{
    return tdm_hash128_chain(engine_key, codec_name, strlen(codec_name));
}
