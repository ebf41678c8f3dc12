/* libFuzzer target: the cluster protocol's decoder (node/cluster.h), which
 * every router and node runs on bytes from peers. Any input must either be
 * refused with a reason or decode into a message whose every field can be
 * read (ASan checks the reads) and packed again. The bytes are copied into
 * a buffer of their exact size so a read past the end is caught.
 * Seeds: tests/fuzz/corpus/cluster (valid messages of each kind, written by
 * TANDEM_FUZZ_CLUSTER_WRITE_SEEDS=DIR build-asan/bin/fuzz_cluster_message). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static volatile uint64_t sink;

static void touch(const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        sink += b[i];
}

static void check(const Tandem__Cluster__ClusterMsg *m)
{
    switch (m->body_case) {
    case TANDEM__CLUSTER__CLUSTER_MSG__BODY_HELLO:
        touch(m->hello->token.data, m->hello->token.len);
        if (m->hello->name)
            touch(m->hello->name, strlen(m->hello->name));
        break;
    case TANDEM__CLUSTER__CLUSTER_MSG__BODY_JOB:
        if (m->job->n_block_keys > TDM_CLUSTER_MAX_KEYS)
            abort();
        touch(m->job->prompt, m->job->n_prompt * sizeof(int32_t));
        for (size_t i = 0; i < m->job->n_block_keys; i++) {
            tdm_hash128_t k;
            if (tdm_cluster_key_from(&m->job->block_keys[i], &k))
                sink += k.lo;
        }
        break;
    case TANDEM__CLUSTER__CLUSTER_MSG__BODY_EVENT:
        if (m->event->n_block_keys > TDM_CLUSTER_MAX_KEYS)
            abort();
        for (size_t i = 0; i < m->event->n_tokens; i++)
            sink += (uint64_t)m->event->tokens[i]->token + m->event->tokens[i]->n_top;
        break;
    default: break;
    }
    size_t len = tandem__cluster__cluster_msg__get_packed_size(m);
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL)
        abort();
    if (tandem__cluster__cluster_msg__pack(m, buf) != len)
        abort();
    free(buf);
}

static void write_seed(const char *dir, const char *name, const Tandem__Cluster__ClusterMsg *m)
{
    size_t len = tandem__cluster__cluster_msg__get_packed_size(m);
    uint8_t *buf = malloc(len ? len : 1);
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = buf ? fopen(path, "wb") : NULL;
    if (f != NULL) {
        tandem__cluster__cluster_msg__pack(m, buf);
        fwrite(buf, 1, len, f);
        fclose(f);
    }
    free(buf);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *dir = getenv("TANDEM_FUZZ_CLUSTER_WRITE_SEEDS");
    if (dir == NULL)
        return 0;
    Tandem__Cluster__ClusterMsg m = TANDEM__CLUSTER__CLUSTER_MSG__INIT;
    Tandem__Cluster__Hello h = TANDEM__CLUSTER__HELLO__INIT;
    h.version = TDM_CLUSTER_VERSION;
    h.token = (ProtobufCBinaryData){.len = 5, .data = (uint8_t *)"token"};
    h.role = TANDEM__CLUSTER__ROLE__ROLE_DECODE;
    h.name = "decode-0";
    h.model = "SmolLM2";
    m.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_HELLO;
    m.hello = &h;
    write_seed(dir, "hello", &m);
    int32_t prompt[5] = {1, 2, 3, 4, 5};
    tdm_hash128_t keys[2] = {{1, 2}, {3, 4}};
    ProtobufCBinaryData kb[2] = {tdm_cluster_key_bytes(&keys[0]), tdm_cluster_key_bytes(&keys[1])};
    Tandem__Cluster__Sampling s = TANDEM__CLUSTER__SAMPLING__INIT;
    Tandem__Cluster__Job j = TANDEM__CLUSTER__JOB__INIT;
    j.id = 7;
    j.kind = TANDEM__CLUSTER__JOB_KIND__JOB_DECODE;
    j.prompt = prompt;
    j.n_prompt = 5;
    j.sampling = &s;
    j.block_keys = kb;
    j.n_block_keys = 2;
    j.n_kv_tokens = 4;
    m.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_JOB;
    m.job = &j;
    write_seed(dir, "job", &m);
    Tandem__Cluster__JobToken t = TANDEM__CLUSTER__JOB_TOKEN__INIT;
    Tandem__Cluster__JobToken *tp[1] = {&t};
    Tandem__Cluster__JobEvent e = TANDEM__CLUSTER__JOB_EVENT__INIT;
    e.id = 7;
    e.tokens = tp;
    e.n_tokens = 1;
    e.block_keys = kb;
    e.n_block_keys = 2;
    m.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_EVENT;
    m.event = &e;
    write_seed(dir, "event", &m);
    Tandem__Cluster__Heartbeat hb = TANDEM__CLUSTER__HEARTBEAT__INIT;
    hb.running = 3;
    m.body_case = TANDEM__CLUSTER__CLUSTER_MSG__BODY_HEARTBEAT;
    m.heartbeat = &hb;
    write_seed(dir, "heartbeat", &m);
    exit(0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy = malloc(size ? size : 1);
    if (copy == NULL)
        return 0;
    memcpy(copy, data, size);
    tdm_net_msg_t msg = {.data = size ? copy : NULL, .length = size};
    char why[160] = "";
    Tandem__Cluster__ClusterMsg *m = tdm_cluster_decode(&msg, why, sizeof(why));
    if (m != NULL) {
        check(m);
        tdm_cluster_free(m);
    } else if (why[0] == '\0') {
        abort(); /* a refusal always says why */
    }
    free(copy);
    return 0;
}
