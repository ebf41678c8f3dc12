/* Bad input to a real tandem-kvstore: peers without the token (refused in
 * the transport's handshake, net/handshake.h), malformed or
 * oversized control messages, payload lengths that do not match, unknown
 * operations and message ids. The test plays a misbehaving client over the
 * raw transport (tandem/net.h), one fresh connection per case, and checks
 * for each case that
 *   - the store closes the connection within CLOSE_BOUND_MS (our error
 *     callback fires), after a HelloReply with the right status where the
 *     refusal is an answer to a Hello;
 *   - the store's log has a new line naming the reason;
 *   - the store process is still alive;
 *   - a well-behaved client (tdm_kvc_*) still PUTs and GETs a block, and
 *     STATS shows `refused` one up and `bytes_reserved` 0.
 * At the end the store must drain and exit 0 on SIGTERM. */
#include "../unit/test_util.h"
#include "kv_test_util.h"

#include "../../kvstore/kvproto.h"
#include "tandem/net.h"

#define TOKEN          "badinput-token"
#define CLOSE_BOUND_MS 2000
#define BLOCK_BYTES    4096
#define DUP_BYTES      (256 * 1024) /* arrives by rendezvous */

/* One misbehaving connection. */
typedef struct raw_conn {
    tdm_conn_t *conn;
    bool closed;
    int64_t closed_at;
    int hello_status; /* -1: no HelloReply yet */
    int n_replies;
} raw_conn_t;

static void raw_on_error(void *user, tdm_conn_t *conn, tdm_status_t why)
{
    raw_conn_t *rc = user;
    if (!rc->closed) {
        rc->closed = true;
        rc->closed_at = tdm_net_now_ms();
    }
}

static void raw_on_hello_reply(void *user, const tdm_net_msg_t *msg)
{
    raw_conn_t *rc = tdm_conn_owner(msg->conn);
    if (rc == NULL || msg->rndv)
        return;
    Tandem__Kv__HelloReply *m;
    char err[128];
    if (!kvp_decode_hello_reply(msg->data, msg->length, &m, err, sizeof(err))) {
        fprintf(stderr, "the store's hello reply does not decode: %s\n", err);
        rc->hello_status = 1000;
        return;
    }
    rc->hello_status = (int)m->status;
    kvp_free(m);
}

static void raw_on_other(void *user, const tdm_net_msg_t *msg)
{
    raw_conn_t *rc = tdm_conn_owner(msg->conn);
    if (rc != NULL && msg->am_id == KVP_AM_REPLY)
        rc->n_replies++;
}

static void progress_for(tdm_net_t *net, int ms, const bool *until)
{
    int64_t end = tdm_net_now_ms() + ms;
    while (tdm_net_now_ms() < end && (until == NULL || !*until))
        if (tdm_net_progress(net) == 0)
            tdm_net_wait(net, 2);
}

/* ---- messages ---- */

static size_t pack_hello(uint8_t *buf, uint32_t version, const char *token)
{
    Tandem__Kv__Hello h = TANDEM__KV__HELLO__INIT;
    h.version = version;
    h.token.data = (uint8_t *)token;
    h.token.len = token != NULL ? strlen(token) : 0;
    h.name = "badinput";
    return tandem__kv__hello__pack(&h, buf);
}

/* A packed Request; the caller frees it. */
static uint8_t *pack_request(int op, size_t key_bytes, size_t *len)
{
    uint8_t *keys = calloc(key_bytes ? key_bytes : 1, 1);
    for (size_t i = 0; keys != NULL && i < key_bytes; i++)
        keys[i] = (uint8_t)(i * 31 + 7);
    Tandem__Kv__Request r = TANDEM__KV__REQUEST__INIT;
    r.id = 42;
    r.op = (Tandem__Kv__Op)op;
    r.keys.data = keys;
    r.keys.len = key_bytes;
    *len = tandem__kv__request__get_packed_size(&r);
    uint8_t *buf = malloc(*len ? *len : 1);
    if (buf != NULL && keys != NULL)
        tandem__kv__request__pack(&r, buf);
    free(keys);
    return buf;
}

static size_t pack_put_item(uint8_t *buf, uint64_t length, uint32_t count, uint64_t key_lo)
{
    uint8_t key[KVP_KEY_BYTES];
    kvp_key_pack((tdm_hash128_t){.lo = key_lo, .hi = 0xf00d}, key);
    Tandem__Kv__PutItem m = TANDEM__KV__PUT_ITEM__INIT;
    m.id = 7;
    m.index = 0;
    m.count = count;
    m.key.data = key;
    m.key.len = sizeof(key);
    m.length = length;
    return tandem__kv__put_item__pack(&m, buf);
}

/* ---- cases ---- */

typedef struct bad_case {
    const char *name;
    bool hello_first;   /* a good Hello (and its OK reply) before the bad message */
    uint16_t am_id;     /* the bad message */
    const void *header; /* AM header (PutItem), may be NULL */
    size_t header_len;
    const void *data; /* AM data */
    size_t len;
    int repeat;            /* send it this many times (0: once) */
    bool or_answered;      /* also fine: not refused, and each copy got a Reply */
    int via;               /* 0: the raw transport with the token; 1: a wrong token; 2: none */
    int expect_hello;      /* HelloReply status the bad message gets, -1: none */
    const char *needle[3]; /* one of these is in the store's new log lines */
} bad_case_t;

typedef struct world {
    kvt_store_t store;
    tdm_net_t *raw;
    tdm_net_t *raw_wrong, *raw_none; /* a wrong token, no token */
    tdm_kvc_t *kvc;
    uint64_t refused; /* the store's count so far */
    int round;
} world_t;

/* The well-behaved client still works: PUT, GET (same bytes), STATS with
 * more_refused more refusals than before and nothing reserved. */
static void check_store_serves(world_t *w, const char *after, uint64_t more_refused)
{
    w->round++;
    static uint8_t src[BLOCK_BYTES], dst[BLOCK_BYTES];
    for (size_t i = 0; i < sizeof(src); i++)
        src[i] = (uint8_t)(i * 13 + (size_t)w->round);
    memset(dst, 0, sizeof(dst));
    tdm_hash128_t key = {.lo = 0x5eed0000u + (uint64_t)w->round, .hi = 0xc0ffee};
    const void *bufs[1] = {src};
    size_t lens[1] = {sizeof(src)};
    tdm_status_t st[1] = {TDM_ERR_INTERNAL};
    tdm_status_t s = tdm_kvc_put_sync(w->kvc, 1, &key, bufs, lens, 0, st);
    CHECK(s == TDM_OK && st[0] == TDM_OK, "after %s: PUT %s / %s", after, tdm_status_str(s),
          tdm_status_str(st[0]));
    void *dbufs[1] = {dst};
    size_t caps[1] = {sizeof(dst)}, got[1] = {0};
    st[0] = TDM_ERR_INTERNAL;
    s = tdm_kvc_get_sync(w->kvc, 1, &key, dbufs, caps, got, st);
    CHECK(s == TDM_OK && st[0] == TDM_OK && got[0] == sizeof(src) &&
              memcmp(src, dst, sizeof(src)) == 0,
          "after %s: GET %s / %s, %zu bytes", after, tdm_status_str(s), tdm_status_str(st[0]),
          got[0]);
    /* a refused PUT's receive fails with its connection, a moment after
     * the close: its reservation must be gone within a bound */
    tdm_kvc_stats_t stats;
    int64_t end = tdm_net_now_ms() + 1000;
    do {
        memset(&stats, 0, sizeof(stats));
        s = tdm_kvc_stats_sync(w->kvc, 0, &stats);
        if (s != TDM_OK || stats.bytes_reserved == 0)
            break;
        kvt_sleep_ms(10);
    } while (tdm_net_now_ms() < end);
    CHECK(s == TDM_OK, "after %s: STATS %s", after, tdm_status_str(s));
    if (s == TDM_OK) {
        CHECK(stats.refused == w->refused + more_refused, "after %s: refused %llu, want %llu",
              after, (unsigned long long)stats.refused,
              (unsigned long long)(w->refused + more_refused));
        CHECK(stats.bytes_reserved == 0, "after %s: bytes_reserved %llu after 1 s", after,
              (unsigned long long)stats.bytes_reserved);
        w->refused = stats.refused;
    }
}

static void run_case(world_t *w, const bad_case_t *c)
{
    raw_conn_t rc = {.hello_status = -1};
    long from = kvt_file_size(w->store.log_path);
    char host[80];
    int port;
    tdm_net_parse_addr(w->store.addr, host, sizeof(host), &port);
    tdm_net_t *net = c->via == 1 ? w->raw_wrong : c->via == 2 ? w->raw_none : w->raw;
    tdm_status_t s = tdm_net_connect(net, host, port, &rc.conn);
    CHECK(s == TDM_OK, "%s: connect: %s", c->name, tdm_status_str(s));
    if (s != TDM_OK)
        return;
    tdm_conn_set_owner(rc.conn, &rc, raw_on_error);
    uint8_t hello[512];
    if (c->hello_first) {
        size_t hl = pack_hello(hello, KVP_VERSION, TOKEN);
        s = tdm_conn_send(rc.conn, KVP_AM_HELLO, NULL, 0, hello, hl, true, NULL, NULL);
        int64_t end = tdm_net_now_ms() + 3000;
        while (s == TDM_OK && rc.hello_status < 0 && !rc.closed && tdm_net_now_ms() < end)
            if (tdm_net_progress(net) == 0)
                tdm_net_wait(net, 2);
        CHECK(rc.hello_status == TANDEM__KV__STATUS__S_OK && !rc.closed,
              "%s: the good hello got status %d (closed %d)", c->name, rc.hello_status, rc.closed);
        rc.hello_status = -1;
    }
    int64_t t0 = tdm_net_now_ms();
    for (int i = 0; i < (c->repeat > 1 ? c->repeat : 1); i++) {
        s = tdm_conn_send(rc.conn, c->am_id, c->header, c->header_len, c->data, c->len, true, NULL,
                          NULL);
        CHECK(s == TDM_OK, "%s: send: %s", c->name, tdm_status_str(s));
    }
    int copies = c->repeat > 1 ? c->repeat : 1;
    int64_t end = t0 + CLOSE_BOUND_MS;
    while (!rc.closed && !(c->or_answered && rc.n_replies == copies) && tdm_net_now_ms() < end)
        if (tdm_net_progress(net) == 0)
            tdm_net_wait(net, 2);
    bool answered = c->or_answered && !rc.closed && rc.n_replies == copies;
    int64_t took = (rc.closed ? rc.closed_at : tdm_net_now_ms()) - t0;
    CHECK(rc.closed || answered, "%s: the store did not close the connection within %d ms", c->name,
          CLOSE_BOUND_MS);
    if (c->expect_hello >= 0)
        CHECK(rc.hello_status == c->expect_hello, "%s: hello reply status %d, want %d (%s)",
              c->name, rc.hello_status, c->expect_hello, kvp_status_name(c->expect_hello));
    else
        CHECK(rc.hello_status < 0, "%s: unexpected hello reply %d", c->name, rc.hello_status);
    CHECK(rc.n_replies == 0 || answered, "%s: %d replies to a refused message", c->name,
          rc.n_replies);
    tdm_conn_close(rc.conn, true);
    progress_for(net, 20, NULL);

    /* the store logs the reason before it closes */
    bool logged = false;
    end = tdm_net_now_ms() + 1000;
    for (;;) {
        for (int i = 0; i < 3 && c->needle[i] != NULL && !logged; i++)
            logged = kvt_log_find(w->store.log_path, from, c->needle[i]);
        if (logged || answered || c->needle[0] == NULL || tdm_net_now_ms() >= end ||
            !kvt_alive(w->store.pid))
            break;
        kvt_sleep_ms(10);
    }
    bool quiet = c->needle[0] == NULL;
    CHECK(logged || answered || quiet, "%s: no log line with \"%s\"", c->name, c->needle[0]);
    if (!logged && !answered && !quiet)
        kvt_log_dump(w->store.log_path, 10);
    CHECK(kvt_alive(w->store.pid), "%s: the store died", c->name);
    if (answered)
        printf("  %-34s answered (not refused): each copy got a Reply\n", c->name);
    else
        printf("  %-34s closed after %3lld ms%s\n", c->name, (long long)took,
               logged ? ", reason logged" : "");
    fflush(stdout);
    if (kvt_alive(w->store.pid))
        check_store_serves(w, c->name, answered ? 0 : 1);
}

int main(void)
{
    world_t w;
    memset(&w, 0, sizeof(w));
    if (kvt_store_start(&w.store, "127.0.0.1", TOKEN, NULL, 15000) != 0) {
        fprintf(stderr, "FAIL: cannot start tandem-kvstore from %s\n", kvt_bin_dir());
        kvt_log_dump(w.store.log_path, 20);
        kvt_store_free(&w.store);
        return 1;
    }
    printf("store %s (pid %d), log %s\n", w.store.addr, (int)w.store.pid, w.store.log_path);

    tdm_net_config_t nc = {.name = "badinput", .token = TOKEN};
    CHECK(tdm_net_create(&nc, &w.raw) == TDM_OK, "raw transport");
    tdm_net_config_t nc_wrong = {.name = "wrong-token", .token = "not-the-token"};
    CHECK(tdm_net_create(&nc_wrong, &w.raw_wrong) == TDM_OK, "raw transport, wrong token");
    tdm_net_config_t nc_none = {.name = "no-token"};
    CHECK(tdm_net_create(&nc_none, &w.raw_none) == TDM_OK, "raw transport, no token");
    const char *stores[1] = {w.store.addr};
    tdm_kvc_config_t kc = {
        .stores = stores, .n_stores = 1, .token = TOKEN, .deadline_ms = 3000, .name = "good"};
    CHECK(tdm_kvc_create(&kc, &w.kvc) == TDM_OK, "client");
    if (w.raw == NULL || w.raw_wrong == NULL || w.raw_none == NULL || w.kvc == NULL)
        goto out;
    CHECK(tdm_net_set_handler(w.raw, KVP_AM_HELLO_REPLY, raw_on_hello_reply, NULL) == TDM_OK &&
              tdm_net_set_handler(w.raw, KVP_AM_REPLY, raw_on_other, NULL) == TDM_OK &&
              tdm_net_set_handler(w.raw, KVP_AM_GET_ITEM, raw_on_other, NULL) == TDM_OK,
          "handlers");
    CHECK(tdm_kvc_wait_ready(w.kvc, 10000) == TDM_OK, "the good client connects");
    w.round = 0;
    w.refused = 0;

    uint8_t hello_v99[512], hello_good[512];
    size_t l_v99 = pack_hello(hello_v99, 99, TOKEN);
    size_t l_good = pack_hello(hello_good, KVP_VERSION, TOKEN);
    size_t l_get, l_big, l_op99, l_keys17;
    uint8_t *get = pack_request(TANDEM__KV__OP__OP_GET, 2 * KVP_KEY_BYTES, &l_get);
    uint8_t *big = pack_request(TANDEM__KV__OP__OP_GET, 100 * 1024, &l_big);
    uint8_t *op99 = pack_request(99, KVP_KEY_BYTES, &l_op99);
    uint8_t *keys17 = pack_request(TANDEM__KV__OP__OP_GET, 17, &l_keys17);
    uint8_t *big_hello = calloc(100 * 1024, 1);
    static const uint8_t garbage[] = {0x0f, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff};
    uint8_t put_hdr[KVP_MAX_HEADER];
    size_t l_put_hdr = pack_put_item(put_hdr, 1000, 1, 0xbad);
    static uint8_t payload[1000];
    uint8_t dup_hdr[KVP_MAX_HEADER], dup1_hdr[KVP_MAX_HEADER];
    size_t l_dup_hdr = pack_put_item(dup_hdr, DUP_BYTES, 2, 0xd0b2);
    size_t l_dup1_hdr = pack_put_item(dup1_hdr, DUP_BYTES, 1, 0xd0b1);
    uint8_t *dup_payload = calloc(DUP_BYTES, 1);
    CHECK(get && big && op99 && keys17 && big_hello && dup_payload && l_big > KVP_MAX_CONTROL,
          "messages");
    if (!(get && big && op99 && keys17 && big_hello && dup_payload))
        goto free_msgs;
    memcpy(big_hello, hello_good, l_good); /* a hello, then 100 KiB of zeros */

#define MSG(am, d, l) .am_id = (am), .data = (d), .len = (l)
#define PUT(h, hl, d, l)                                                                           \
    .am_id = KVP_AM_PUT_ITEM, .header = (h), .header_len = (hl), .data = (d), .len = (l)
    const bad_case_t cases[] = {
        {"a) request before hello", MSG(KVP_AM_REQUEST, get, l_get), .expect_hello = -1,
         .needle = {"before hello"}},
        {"a') PUT item before hello", PUT(put_hdr, l_put_hdr, payload, 1000), .expect_hello = -1,
         .needle = {"before hello"}},
        /* the token is proven in the handshake: these never reach a Hello */
        {"b) a wrong token", MSG(KVP_AM_HELLO, hello_good, l_good), .via = 1, .expect_hello = -1,
         .needle = {"wrong cluster token"}},
        /* refusals are logged at most once per 10 s: only the count shows it */
        {"c) no token", MSG(KVP_AM_HELLO, hello_good, l_good), .via = 2, .expect_hello = -1,
         .needle = {NULL}},
        {"d) hello version 99", MSG(KVP_AM_HELLO, hello_v99, l_v99),
         .expect_hello = TANDEM__KV__STATUS__S_BAD_VERSION, .needle = {"version"}},
        {"d') hello of 100 KiB", MSG(KVP_AM_HELLO, big_hello, 100 * 1024), .expect_hello = -1,
         .needle = {"limit", "too large"}},
        {"e) garbage as a request", .hello_first = true,
         MSG(KVP_AM_REQUEST, garbage, sizeof(garbage)), .expect_hello = -1,
         .needle = {"does not parse"}},
        {"f) request of 100 KiB", .hello_first = true, MSG(KVP_AM_REQUEST, big, l_big),
         .expect_hello = -1, .needle = {"limit", "too large"}},
        {"g) request with op 99", .hello_first = true, MSG(KVP_AM_REQUEST, op99, l_op99),
         .expect_hello = -1, .needle = {"unknown operation"}},
        {"g') request with 17 bytes of keys", .hello_first = true,
         MSG(KVP_AM_REQUEST, keys17, l_keys17), .expect_hello = -1, .needle = {"multiple of"}},
        {"h) PUT item says 1000, carries 500", .hello_first = true,
         PUT(put_hdr, l_put_hdr, payload, 500), .expect_hello = -1, .needle = {"carries"}},
        {"i) PUT item header is garbage", .hello_first = true,
         PUT(garbage, sizeof(garbage), payload, 500), .expect_hello = -1,
         .needle = {"does not parse"}},
        {"j) message id 17", .hello_first = true, MSG(17, garbage, sizeof(garbage)),
         .expect_hello = -1, .needle = {"unknown message id 17"}},
        {"j') a Reply sent to the store", .hello_first = true,
         MSG(KVP_AM_REPLY, garbage, sizeof(garbage)), .expect_hello = -1,
         .needle = {"unknown message id 6"}},
        {"k) a second hello", .hello_first = true, MSG(KVP_AM_HELLO, hello_good, l_good),
         .expect_hello = -1, .needle = {"second hello"}},
        {"l) item 0 of 2 sent twice", .hello_first = true,
         PUT(dup_hdr, l_dup_hdr, dup_payload, DUP_BYTES), .repeat = 2, .expect_hello = -1,
         .needle = {"sent twice"}},
        /* the second copy arrives while the first one's payload is still
         * arriving (refused), or after it landed and ended its batch (a
         * new batch with the same id: answered); the store must survive
         * either way */
        {"l') item 0 of 1 sent twice", .hello_first = true,
         PUT(dup1_hdr, l_dup1_hdr, dup_payload, DUP_BYTES), .repeat = 2, .or_answered = true,
         .expect_hello = -1, .needle = {"sent twice"}},
    };
#undef MSG
#undef PUT
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        run_case(&w, &cases[i]);
        if (!kvt_alive(w.store.pid))
            break;
    }

free_msgs:
    free(get);
    free(big);
    free(op99);
    free(keys17);
    free(big_hello);
    free(dup_payload);
out:
    tdm_kvc_destroy(w.kvc);
    tdm_net_destroy(w.raw);
    tdm_net_destroy(w.raw_wrong);
    tdm_net_destroy(w.raw_none);
    /* a clean drain: exit code 0 (under ASan: no error, no leak) */
    int status = 0;
    int r = kvt_store_stop(&w.store, SIGTERM, 15000, &status);
    CHECK(r == 1 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "the store did not exit 0 on SIGTERM (stop %d, status 0x%x)", r, status);
    if (n_fail > 0)
        kvt_log_dump(w.store.log_path, 30);
    kvt_store_free(&w.store);
    return t_finish();
}
