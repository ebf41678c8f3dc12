/* tandem-kvstore with real processes over loopback (issue 3, must show 1
 * and 3):
 *   - 10,000 random blocks of varied sizes round-trip through two stores,
 *     contents checked;
 *   - LRU eviction and leases at capacity, as docs/kvstore.md says;
 *   - LOOKUP returns the leading run of present keys;
 *   - two stores with replicas 2 lose one (kill -9) without a miss;
 *   - kill -9 of the store during a batch of GETs: errors within the
 *     deadline, no hang;
 *   - kill -9 of a client mid-PUT: the store stays up, serves others, and
 *     STATS shows no leaked pool space;
 *   - SIGTERM: the store drains and exits 0.
 * Random contents come from fixed seeds; every wait is bounded. */
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>

#include "../unit/test_util.h"
#include "kv_test_util.h"
#include "tandem/kvclient.h"
#include "tandem/log.h"

#define TOKEN "test-token-3f9a"

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Payload of block i of a test: its bytes follow from (seed, i). */
static size_t fill_block(uint64_t seed, uint64_t i, uint8_t *buf, size_t max)
{
    uint64_t s = seed * 1000003u + i;
    size_t len = 1 + (size_t)(rng_next(&s) % max);
    size_t k = 0;
    for (; k + 8 <= len; k += 8) {
        uint64_t v = rng_next(&s);
        memcpy(buf + k, &v, 8);
    }
    for (; k < len; k++)
        buf[k] = (uint8_t)rng_next(&s);
    return len;
}

static tdm_hash128_t key_of(uint64_t seed, uint64_t i)
{
    return (tdm_hash128_t){seed * 0x100000001b3ULL + i, 0x7e57ull ^ seed};
}

static tdm_kvc_t *client(const char *const *addrs, size_t n, int replicas, int deadline_ms)
{
    tdm_kvc_config_t c = {.stores = addrs,
                          .n_stores = n,
                          .replicas = replicas,
                          .token = TOKEN,
                          .deadline_ms = deadline_ms,
                          .backoff_min_ms = 50,
                          .backoff_max_ms = 500,
                          .name = "test"};
    tdm_kvc_t *k = NULL;
    if (tdm_kvc_create(&c, &k) != TDM_OK)
        return NULL;
    if (tdm_kvc_wait_ready(k, 5000) != TDM_OK) {
        tdm_kvc_destroy(k);
        return NULL;
    }
    return k;
}

/* ---- 1. 10,000 blocks through two stores ---- */

static void test_roundtrip(const char *const *addrs)
{
    enum { N = 10000, BATCH = 16, MAXB = 192 * 1024 };
    tdm_kvc_t *k = client(addrs, 2, 1, 10000);
    CHECK(k != NULL, "client connects to two stores");
    if (k == NULL)
        return;
    uint8_t *src = malloc((size_t)BATCH * MAXB), *dst = malloc((size_t)BATCH * MAXB);
    uint64_t seed = 1, total = 0;
    int put_bad = 0, get_bad = 0, corrupt = 0;
    size_t per_store[2] = {0, 0};
    for (int base = 0; base < N; base += BATCH) {
        tdm_hash128_t keys[BATCH];
        const void *bufs[BATCH];
        size_t lens[BATCH];
        tdm_status_t st[BATCH];
        for (int j = 0; j < BATCH; j++) {
            keys[j] = key_of(seed, (uint64_t)(base + j));
            lens[j] = fill_block(seed, (uint64_t)(base + j), src + (size_t)j * MAXB, MAXB);
            bufs[j] = src + (size_t)j * MAXB;
            total += lens[j];
            size_t where;
            tdm_kvc_placement(k, keys[j], &where, 1);
            per_store[where]++;
        }
        tdm_status_t rc = tdm_kvc_put_sync(k, BATCH, keys, bufs, lens, 0, st);
        for (int j = 0; j < BATCH; j++)
            put_bad += rc != TDM_OK || st[j] != TDM_OK;
    }
    for (int base = 0; base < N; base += BATCH) {
        tdm_hash128_t keys[BATCH];
        void *bufs[BATCH];
        size_t caps[BATCH], lens[BATCH];
        tdm_status_t st[BATCH];
        for (int j = 0; j < BATCH; j++) {
            keys[j] = key_of(seed, (uint64_t)(base + j));
            bufs[j] = dst + (size_t)j * MAXB;
            caps[j] = MAXB;
        }
        tdm_status_t rc = tdm_kvc_get_sync(k, BATCH, keys, bufs, caps, lens, st);
        for (int j = 0; j < BATCH; j++) {
            if (rc != TDM_OK || st[j] != TDM_OK) {
                get_bad++;
                continue;
            }
            size_t want = fill_block(seed, (uint64_t)(base + j), src, MAXB);
            corrupt += lens[j] != want || memcmp(dst + (size_t)j * MAXB, src, want) != 0;
        }
    }
    CHECK(put_bad == 0, "%d of %d PUTs failed", put_bad, N);
    CHECK(get_bad == 0, "%d of %d GETs missed", get_bad, N);
    CHECK(corrupt == 0, "%d of %d payloads differ", corrupt, N);
    CHECK(per_store[0] > N / 3 && per_store[1] > N / 3, "sharding spreads keys: %zu / %zu",
          per_store[0], per_store[1]);
    tdm_kvc_stats_t s0, s1;
    CHECK(tdm_kvc_stats_sync(k, 0, &s0) == TDM_OK && tdm_kvc_stats_sync(k, 1, &s1) == TDM_OK,
          "stats");
    CHECK(s0.blocks + s1.blocks == N, "stores hold %llu blocks",
          (unsigned long long)(s0.blocks + s1.blocks));
    CHECK(s0.bytes_in + s1.bytes_in == total && s0.bytes_out + s1.bytes_out == total,
          "bytes in/out %llu/%llu of %llu", (unsigned long long)(s0.bytes_in + s1.bytes_in),
          (unsigned long long)(s0.bytes_out + s1.bytes_out), (unsigned long long)total);
    CHECK(s0.bytes_reserved == 0 && s1.bytes_reserved == 0, "nothing reserved after the PUTs");
    printf("roundtrip: %d blocks, %.1f MB, %zu/%zu per store\n", N, (double)total / 1e6,
           per_store[0], per_store[1]);
    /* LOOKUP: the chain of the first 40 keys is present; delete key 25 */
    tdm_hash128_t chain[60];
    for (int i = 0; i < 60; i++)
        chain[i] = key_of(seed, (uint64_t)(i < 40 ? i : N + i));
    size_t lead = 0;
    CHECK(tdm_kvc_lookup_sync(k, 60, chain, &lead) == TDM_OK && lead == 40,
          "lookup leading 40, got %zu", lead);
    tdm_status_t ds[1];
    CHECK(tdm_kvc_delete_sync(k, 1, &chain[25], ds) == TDM_OK && ds[0] == TDM_OK, "delete");
    CHECK(tdm_kvc_lookup_sync(k, 60, chain, &lead) == TDM_OK && lead == 25,
          "lookup after delete: 25, got %zu", lead);
    CHECK(tdm_kvc_lookup_sync(k, 20, chain + 40, &lead) == TDM_OK && lead == 0,
          "lookup of absent keys: 0, got %zu", lead);
    CHECK(tdm_kvc_delete_sync(k, 1, &chain[25], ds) == TDM_OK && ds[0] == TDM_ERR_NOT_FOUND,
          "second delete is not found");
    tdm_kvc_destroy(k);
    free(src);
    free(dst);
}

/* ---- 2. LRU and leases at capacity ---- */

static int present(tdm_kvc_t *k, tdm_hash128_t key)
{
    size_t lead = 0;
    if (tdm_kvc_lookup_sync(k, 1, &key, &lead) != TDM_OK)
        return -1;
    return (int)lead;
}

static tdm_status_t put1(tdm_kvc_t *k, tdm_hash128_t key, uint8_t *buf, size_t len, uint32_t lease)
{
    const void *b[1] = {buf};
    tdm_status_t st[1];
    tdm_status_t rc = tdm_kvc_put_sync(k, 1, &key, b, &len, lease, st);
    return rc != TDM_OK ? rc : st[0];
}

static void test_lru_leases(const char *addr)
{
    /* capacity 16 blocks of 256 KiB */
    enum { B = 256 * 1024, CAP = 16 };
    tdm_kvc_t *k = client(&addr, 1, 1, 5000);
    CHECK(k != NULL, "client connects to the small store");
    if (k == NULL)
        return;
    uint8_t *buf = malloc(B);
    memset(buf, 0x5a, B);
    uint64_t seed = 2;
    for (int i = 0; i < CAP; i++)
        CHECK(put1(k, key_of(seed, (uint64_t)i), buf, B, 0) == TDM_OK, "fill %d", i);
    tdm_kvc_stats_t s;
    CHECK(tdm_kvc_stats_sync(k, 0, &s) == TDM_OK && s.blocks == CAP && s.bytes_free == 0,
          "full: %llu blocks, %llu free", (unsigned long long)s.blocks,
          (unsigned long long)s.bytes_free);
    /* GET of block 0 makes it the most recent: the next PUT evicts 1 */
    {
        tdm_hash128_t key = key_of(seed, 0);
        void *d[1] = {malloc(B)};
        size_t cap = B, len;
        tdm_status_t st;
        CHECK(tdm_kvc_get_sync(k, 1, &key, d, &cap, &len, &st) == TDM_OK && st == TDM_OK, "get 0");
        free(d[0]);
    }
    CHECK(put1(k, key_of(seed, 100), buf, B, 0) == TDM_OK, "put past capacity");
    CHECK(present(k, key_of(seed, 0)) == 1, "recently read block 0 stays");
    CHECK(present(k, key_of(seed, 1)) == 0, "least recently used block 1 was evicted");
    CHECK(present(k, key_of(seed, 2)) == 1, "block 2 stays");
    CHECK(tdm_kvc_stats_sync(k, 0, &s) == TDM_OK && s.evictions == 1, "one eviction, got %llu",
          (unsigned long long)s.evictions);
    /* leases: re-put every stored block with a long lease; then nothing
     * can be evicted and a new PUT gets NO_SPACE */
    int leased = 0;
    for (int i = 0; i < CAP; i++)
        if (present(k, key_of(seed, (uint64_t)i)) == 1)
            leased += put1(k, key_of(seed, (uint64_t)i), buf, B, 60000) == TDM_OK;
    leased += put1(k, key_of(seed, 100), buf, B, 60000) == TDM_OK;
    CHECK(leased == CAP, "leased %d blocks", leased);
    CHECK(tdm_kvc_stats_sync(k, 0, &s) == TDM_OK && s.leased == CAP, "leased %llu",
          (unsigned long long)s.leased);
    CHECK(put1(k, key_of(seed, 200), buf, B, 0) == TDM_ERR_NOMEM,
          "all leased: PUT is refused for space");
    CHECK(present(k, key_of(seed, 0)) == 1 && present(k, key_of(seed, 100)) == 1,
          "leased blocks survive");
    /* RELEASE one: it becomes the only evictable block */
    tdm_hash128_t rk = key_of(seed, 5);
    tdm_status_t rs;
    CHECK(tdm_kvc_release_sync(k, 1, &rk, &rs) == TDM_OK && rs == TDM_OK, "release 5");
    CHECK(put1(k, key_of(seed, 200), buf, B, 0) == TDM_OK, "PUT after a release");
    CHECK(present(k, key_of(seed, 5)) == 0, "the released block was the one evicted");
    /* a short lease expires on its own */
    CHECK(put1(k, key_of(seed, 200), buf, B, 300) == TDM_OK, "lease 300 ms on 200");
    CHECK(put1(k, key_of(seed, 201), buf, B, 0) == TDM_ERR_NOMEM, "still all leased");
    usleep(400000);
    CHECK(put1(k, key_of(seed, 201), buf, B, 0) == TDM_OK, "PUT after the lease expired");
    CHECK(present(k, key_of(seed, 200)) == 0, "the expired lease's block was evicted");
    /* too large for the store */
    uint8_t *big = malloc(B + 1);
    memset(big, 1, B + 1);
    CHECK(put1(k, key_of(seed, 300), big, B + 1, 0) == TDM_ERR_INVALID,
          "over --max-block-bytes is refused");
    free(big);
    CHECK(tdm_kvc_stats_sync(k, 0, &s) == TDM_OK && s.bytes_reserved == 0 &&
              s.bytes_used + s.bytes_free == s.capacity,
          "accounting: used %llu + free %llu = cap %llu", (unsigned long long)s.bytes_used,
          (unsigned long long)s.bytes_free, (unsigned long long)s.capacity);
    tdm_kvc_destroy(k);
    free(buf);
}

/* ---- 3. replicas 2 survive the loss of a store ---- */

static void test_replicas(kvt_store_t *stores)
{
    enum { N = 300, B = 64 * 1024 };
    const char *addrs[2] = {stores[0].addr, stores[1].addr};
    tdm_kvc_t *k = client(addrs, 2, 2, 2000);
    CHECK(k != NULL, "replicated client");
    if (k == NULL)
        return;
    uint8_t *buf = malloc(B), *out = malloc(B);
    uint64_t seed = 3;
    int bad = 0;
    uint64_t before[2];
    for (size_t i = 0; i < 2; i++) {
        tdm_kvc_stats_t s;
        before[i] = tdm_kvc_stats_sync(k, i, &s) == TDM_OK ? s.puts : 0;
    }
    for (int i = 0; i < N; i++) {
        size_t len = fill_block(seed, (uint64_t)i, buf, B);
        bad += put1(k, key_of(seed, (uint64_t)i), buf, len, 0) != TDM_OK;
    }
    CHECK(bad == 0, "%d replicated PUTs failed", bad);
    tdm_kvc_stats_t s0, s1;
    CHECK(tdm_kvc_stats_sync(k, 0, &s0) == TDM_OK && tdm_kvc_stats_sync(k, 1, &s1) == TDM_OK &&
              s0.puts == before[0] + N && s1.puts == before[1] + N,
          "both stores took every block: %llu, %llu new", (unsigned long long)(s0.puts - before[0]),
          (unsigned long long)(s1.puts - before[1]));
    kvt_store_stop(&stores[0], SIGKILL, 5000, NULL);
    int miss = 0, corrupt = 0;
    int64_t t0 = tdm_net_now_ms();
    for (int i = 0; i < N; i++) {
        tdm_hash128_t key = key_of(seed, (uint64_t)i);
        void *d[1] = {out};
        size_t cap = B, len = 0;
        tdm_status_t st = TDM_ERR_IO;
        tdm_status_t rc = tdm_kvc_get_sync(k, 1, &key, d, &cap, &len, &st);
        if (rc != TDM_OK || st != TDM_OK) {
            miss++;
            continue;
        }
        size_t want = fill_block(seed, (uint64_t)i, buf, B);
        corrupt += len != want || memcmp(out, buf, want) != 0;
    }
    size_t lead = 0;
    tdm_hash128_t chain[N];
    for (int i = 0; i < N; i++)
        chain[i] = key_of(seed, (uint64_t)i);
    CHECK(tdm_kvc_lookup_sync(k, N, chain, &lead) == TDM_OK && lead == N,
          "lookup with one store dead: %zu of %d", lead, N);
    CHECK(miss == 0 && corrupt == 0, "after kill -9 of one store: %d misses, %d corrupt", miss,
          corrupt);
    printf("replicas: %d GETs after losing a store in %lld ms\n", N,
           (long long)(tdm_net_now_ms() - t0));
    tdm_kvc_destroy(k);
    free(buf);
    free(out);
}

/* ---- 4. kill -9 of the store during a batch of GETs ---- */

typedef struct got {
    bool done;
    tdm_status_t status;
    int64_t at;
} got_t;

static void got_cb(void *user, tdm_status_t status)
{
    got_t *g = user;
    g->done = true;
    g->status = status;
    g->at = tdm_net_now_ms();
}

static void test_kill_store_mid_get(kvt_store_t *st)
{
    enum { N = 512, B = 512 * 1024, DEADLINE = 2000 };
    tdm_kvc_t *k = client((const char *const[]){st->addr}, 1, 1, DEADLINE);
    CHECK(k != NULL, "client for the kill test");
    if (k == NULL)
        return;
    uint8_t *buf = malloc(B);
    memset(buf, 0x33, B);
    tdm_hash128_t *keys = malloc(N * sizeof(*keys));
    int bad = 0;
    for (int i = 0; i < N; i++) {
        keys[i] = key_of(4, (uint64_t)i);
        bad += put1(k, keys[i], buf, B, 0) != TDM_OK;
    }
    CHECK(bad == 0, "%d PUTs failed before the kill", bad);
    uint8_t *dst = malloc((size_t)N * B);
    void **bufs = malloc(N * sizeof(void *));
    size_t *caps = malloc(N * sizeof(size_t)), *lens = malloc(N * sizeof(size_t));
    tdm_status_t *sts = malloc(N * sizeof(tdm_status_t));
    for (int i = 0; i < N; i++) {
        bufs[i] = dst + (size_t)i * B;
        caps[i] = B;
    }
    got_t g = {0};
    CHECK(tdm_kvc_get(k, N, keys, bufs, caps, lens, sts, got_cb, &g) == TDM_OK, "get submitted");
    /* let some payloads move, then kill the store */
    int64_t t_start = tdm_net_now_ms();
    while (!g.done && tdm_net_now_ms() - t_start < 15)
        tdm_kvc_progress(k);
    kill(st->pid, SIGKILL); /* reaped below: a 1 GiB process takes a while to go */
    int64_t t_kill = tdm_net_now_ms();
    while (!g.done && tdm_net_now_ms() - t_kill < DEADLINE + 3000)
        if (tdm_kvc_progress(k) == 0)
            tdm_kvc_wait(k, 2);
    kvt_store_stop(st, SIGKILL, 5000, NULL);
    CHECK(g.done, "the GET ended after the kill (status %d, first key %d)", g.status, sts[0]);
    int ok = 0, failed = 0;
    for (int i = 0; i < N; i++) {
        ok += sts[i] == TDM_OK;
        failed += sts[i] != TDM_OK;
        if (sts[i] == TDM_OK && (lens[i] != B || memcmp(bufs[i], buf, B) != 0))
            bad++;
    }
    CHECK(g.done && g.at - t_start <= DEADLINE + 500, "ended %lld ms after submit (deadline %d)",
          (long long)(g.at - t_start), DEADLINE);
    CHECK(failed > 0, "the kill failed %d of %d keys", failed, N);
    CHECK(bad == 0, "every key reported OK has its bytes");
    printf("kill store mid-GET: status %s, %d ok, %d failed, ended %lld ms after the kill\n",
           tdm_status_str(g.status), ok, failed, (long long)(g.at - t_kill));
    /* a later operation fails fast (store down), never hangs */
    int64_t t1 = tdm_net_now_ms();
    size_t lead = 99;
    tdm_kvc_lookup_sync(k, 1, keys, &lead);
    CHECK(tdm_net_now_ms() - t1 <= DEADLINE + 500 && lead == 0,
          "lookup on a dead store: %lld ms, lead %zu", (long long)(tdm_net_now_ms() - t1), lead);
    tdm_kvc_destroy(k);
    free(buf);
    free(keys);
    free(dst);
    free(bufs);
    free(caps);
    free(lens);
    free(sts);
}

/* ---- 4b. a hung store (SIGSTOP): errors by the deadline, then back ---- */

static void test_hung_store(kvt_store_t *st)
{
    enum { N = 12, B = 256 * 1024, DEADLINE = 1500 };
    tdm_kvc_t *k = client((const char *const[]){st->addr}, 1, 1, DEADLINE);
    CHECK(k != NULL, "client for the hung-store test");
    if (k == NULL)
        return;
    uint8_t *buf = malloc(B), *dst = malloc((size_t)N * B);
    memset(buf, 0x5c, B);
    tdm_hash128_t keys[N];
    void *bufs[N];
    size_t caps[N], lens[N];
    tdm_status_t sts[N];
    int bad = 0;
    for (int i = 0; i < N; i++) {
        keys[i] = key_of(11, (uint64_t)i);
        bufs[i] = dst + (size_t)i * B;
        caps[i] = B;
        bad += put1(k, keys[i], buf, B, 0) != TDM_OK;
    }
    CHECK(bad == 0, "PUTs before the hang");
    kill(st->pid, SIGSTOP);
    got_t g = {0};
    int64_t t0 = tdm_net_now_ms();
    CHECK(tdm_kvc_get(k, N, keys, bufs, caps, lens, sts, got_cb, &g) == TDM_OK, "get submitted");
    while (!g.done && tdm_net_now_ms() - t0 < DEADLINE + 3000)
        if (tdm_kvc_progress(k) == 0)
            tdm_kvc_wait(k, 2);
    CHECK(g.done && g.status != TDM_OK && g.at - t0 <= DEADLINE + 300,
          "GET from a hung store failed in %lld ms (deadline %d)", (long long)(g.at - t0),
          DEADLINE);
    kill(st->pid, SIGCONT);
    /* the client reconnects (backoff) and the store serves it again */
    int64_t t1 = tdm_net_now_ms();
    tdm_status_t rc = TDM_ERR_IO, s1 = TDM_ERR_IO;
    while (tdm_net_now_ms() - t1 < 10000) {
        rc = tdm_kvc_get_sync(k, 1, keys, bufs, caps, lens, &s1);
        if (rc == TDM_OK && s1 == TDM_OK)
            break;
        usleep(50000);
    }
    CHECK(rc == TDM_OK && s1 == TDM_OK && memcmp(bufs[0], buf, B) == 0,
          "served again after SIGCONT");
    printf("hung store: GET failed after %lld ms; served again %lld ms after SIGCONT\n",
           (long long)(g.at - t0), (long long)(tdm_net_now_ms() - t1));
    tdm_kvc_destroy(k);
    free(buf);
    free(dst);
}

/* ---- 5. kill -9 of a client mid-PUT ---- */

static void client_putter(const char *addr, int ready_fd)
{
    enum { B = 1024 * 1024, BATCH = 32 };
    tdm_kvc_t *k = client(&addr, 1, 1, 20000);
    if (k == NULL)
        _exit(3);
    uint8_t *buf = malloc((size_t)B);
    memset(buf, 0x77, B);
    tdm_hash128_t keys[BATCH];
    const void *bufs[BATCH];
    size_t lens[BATCH];
    tdm_status_t st[BATCH];
    for (uint64_t round = 0; round < 100000; round++) {
        for (int j = 0; j < BATCH; j++) {
            keys[j] = key_of(5, round * BATCH + (uint64_t)j);
            bufs[j] = buf;
            lens[j] = B;
        }
        if (round == 1 && write(ready_fd, "r", 1) != 1)
            _exit(4);
        tdm_kvc_put_sync(k, BATCH, keys, bufs, lens, 60000, st);
    }
    _exit(0);
}

static void test_kill_client_mid_put(kvt_store_t *st)
{
    int fds[2];
    CHECK(pipe(fds) == 0, "pipe");
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        client_putter(st->addr, fds[1]);
    }
    close(fds[1]);
    char c;
    struct pollfd pfd = {.fd = fds[0], .events = POLLIN};
    bool started = poll(&pfd, 1, 10000) == 1 && read(fds[0], &c, 1) == 1;
    close(fds[0]);
    CHECK(started, "the putting client started");
    usleep(20000); /* inside a batch of 32 MiB */
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status), "client killed");
    /* the store lets go of what the dead client held */
    tdm_kvc_t *k = client((const char *const[]){st->addr}, 1, 1, 3000);
    CHECK(k != NULL, "the store serves another client after the kill");
    if (k == NULL)
        return;
    tdm_kvc_stats_t s = {0};
    int64_t t0 = tdm_net_now_ms();
    do {
        if (tdm_kvc_stats_sync(k, 0, &s) != TDM_OK)
            break;
        if (s.bytes_reserved == 0 && s.leased == 0 && s.clients == 1)
            break;
        usleep(20000);
    } while (tdm_net_now_ms() - t0 < 5000);
    CHECK(s.bytes_reserved == 0, "no reserved bytes left: %llu",
          (unsigned long long)s.bytes_reserved);
    CHECK(s.leased == 0, "the dead client's leases ended: %llu", (unsigned long long)s.leased);
    CHECK(s.clients == 1, "one client: %llu", (unsigned long long)s.clients);
    CHECK(s.bytes_used + s.bytes_free == s.capacity, "used + free = capacity");
    /* delete what the dead client stored: the pool is whole again */
    enum { MAXK = 4096 };
    tdm_hash128_t *keys = malloc(MAXK * sizeof(*keys));
    for (int i = 0; i < MAXK; i++)
        keys[i] = key_of(5, (uint64_t)i);
    tdm_kvc_delete_sync(k, MAXK, keys, NULL);
    CHECK(tdm_kvc_stats_sync(k, 0, &s) == TDM_OK && s.blocks == 0 && s.bytes_used == 0 &&
              s.bytes_free == s.capacity,
          "after deleting everything: %llu blocks, %llu used", (unsigned long long)s.blocks,
          (unsigned long long)s.bytes_used);
    printf("kill client mid-PUT: store up, %llu refused, pool whole\n",
           (unsigned long long)s.refused);
    uint8_t b[100] = {1};
    CHECK(put1(k, key_of(6, 1), b, sizeof(b), 0) == TDM_OK, "PUT after the client died");
    tdm_kvc_destroy(k);
    free(keys);
}

/* ---- 5b. a client that stops reading (SIGSTOP) blocks nobody ---- */

static void client_getter(const char *addr, int ready_fd)
{
    enum { N = 256, B = 1024 * 1024 };
    tdm_kvc_t *k = client(&addr, 1, 1, 60000);
    if (k == NULL)
        _exit(3);
    uint8_t *buf = malloc(B), *dst = malloc((size_t)N * B);
    memset(buf, 0x11, B);
    tdm_hash128_t keys[N];
    void *bufs[N];
    size_t caps[N], lens[N];
    tdm_status_t sts[N];
    for (int i = 0; i < N; i++) {
        keys[i] = key_of(8, (uint64_t)i);
        bufs[i] = dst + (size_t)i * B;
        caps[i] = B;
        if (put1(k, keys[i], buf, B, 0) != TDM_OK)
            _exit(4);
    }
    got_t g = {0};
    if (tdm_kvc_get(k, N, keys, bufs, caps, lens, sts, got_cb, &g) != TDM_OK)
        _exit(5);
    for (int i = 0; i < 3; i++)
        tdm_kvc_progress(k);
    if (write(ready_fd, "r", 1) != 1) /* the parent stops this process now */
        _exit(6);
    while (!g.done)
        if (tdm_kvc_progress(k) == 0)
            tdm_kvc_wait(k, 2);
    _exit(0);
}

static void test_stalled_client(kvt_store_t *st)
{
    int fds[2];
    CHECK(pipe(fds) == 0, "pipe");
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        client_getter(st->addr, fds[1]);
    }
    close(fds[1]);
    char c;
    struct pollfd pfd = {.fd = fds[0], .events = POLLIN};
    bool started = poll(&pfd, 1, 20000) == 1 && read(fds[0], &c, 1) == 1;
    close(fds[0]);
    CHECK(started, "the reading client started its GET");
    kill(pid, SIGSTOP);
    /* another client is served at once, while the stalled one holds a
     * 256 MiB GET */
    tdm_kvc_t *k = client((const char *const[]){st->addr}, 1, 1, 3000);
    CHECK(k != NULL, "a second client connects while the first is stalled");
    int bad = 0;
    int64_t t0 = tdm_net_now_ms(), worst = 0;
    uint8_t buf[4096], out[4096];
    memset(buf, 0x21, sizeof(buf));
    for (int i = 0; k != NULL && i < 50; i++) {
        int64_t t = tdm_net_now_ms();
        tdm_hash128_t key = key_of(9, (uint64_t)i);
        bad += put1(k, key, buf, sizeof(buf), 0) != TDM_OK;
        void *d[1] = {out};
        size_t cap = sizeof(out), len;
        tdm_status_t s;
        bad += tdm_kvc_get_sync(k, 1, &key, d, &cap, &len, &s) != TDM_OK || s != TDM_OK;
        if (tdm_net_now_ms() - t > worst)
            worst = tdm_net_now_ms() - t;
    }
    CHECK(bad == 0, "%d operations of the second client failed", bad);
    printf("stalled client: 50 PUT+GET of another client in %lld ms (worst %lld ms)\n",
           (long long)(tdm_net_now_ms() - t0), (long long)worst);
    /* after --client-timeout the store lets the stalled client go */
    tdm_kvc_stats_t s = {0};
    int64_t t1 = tdm_net_now_ms();
    while (k != NULL && tdm_net_now_ms() - t1 < 10000) {
        if (tdm_kvc_stats_sync(k, 0, &s) == TDM_OK && s.clients == 1 && s.pinned == 0)
            break;
        usleep(50000);
    }
    CHECK(s.clients == 1 && s.pinned == 0,
          "the stalled client was disconnected: %llu clients, %llu pinned blocks",
          (unsigned long long)s.clients, (unsigned long long)s.pinned);
    CHECK(kvt_log_find(st->log_path, 0, "client-timeout"), "the store logged why");
    kill(pid, SIGKILL);
    kill(pid, SIGCONT);
    waitpid(pid, NULL, 0);
    if (k != NULL)
        tdm_kvc_destroy(k);
}

/* ---- 6. SIGTERM drains: a GET in flight completes, then exit 0 ---- */

static void test_sigterm(kvt_store_t *st)
{
    enum { N = 64, B = 1024 * 1024 };
    tdm_kvc_t *k = client((const char *const[]){st->addr}, 1, 1, 10000);
    CHECK(k != NULL, "client for the drain test");
    uint8_t *buf = malloc(B), *dst = malloc((size_t)N * B);
    tdm_hash128_t keys[N];
    void *bufs[N];
    size_t caps[N], lens[N];
    tdm_status_t sts[N];
    memset(buf, 0x42, B);
    int bad = 0;
    for (int i = 0; k != NULL && i < N; i++) {
        keys[i] = key_of(7, (uint64_t)i);
        bufs[i] = dst + (size_t)i * B;
        caps[i] = B;
        bad += put1(k, keys[i], buf, B, 0) != TDM_OK;
    }
    CHECK(bad == 0, "drain test PUTs");
    got_t g = {0};
    if (k != NULL)
        CHECK(tdm_kvc_get(k, N, keys, bufs, caps, lens, sts, got_cb, &g) == TDM_OK, "get");
    int64_t t0 = tdm_net_now_ms();
    kill(st->pid, SIGTERM);
    while (k != NULL && !g.done && tdm_net_now_ms() - t0 < 15000)
        if (tdm_kvc_progress(k) == 0)
            tdm_kvc_wait(k, 2);
    int ok = 0;
    for (int i = 0; k != NULL && i < N; i++)
        ok += sts[i] == TDM_OK && lens[i] == B && memcmp(bufs[i], buf, B) == 0;
    CHECK(g.done && g.status == TDM_OK && ok == N,
          "the GET in flight at SIGTERM completed: %d of %d", ok, N);
    int status = -1;
    kvt_store_stop(st, SIGTERM, 15000, &status);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "SIGTERM: wait status %d", status);
    CHECK(kvt_log_find(st->log_path, 0, "drained"), "the store logged its drain");
    printf("sigterm: a %d MiB GET finished during the drain; exit 0 after %lld ms\n", N,
           (long long)(tdm_net_now_ms() - t0));
    if (k != NULL)
        tdm_kvc_destroy(k);
    free(buf);
    free(dst);
}

/* ---- 7. start-up refusal and /metrics ---- */

/* GET http://127.0.0.1:port/path into buf; returns the body or NULL. */
static const char *http_get(int port, const char *path, char *buf, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    char req[256];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.0\r\nHost: x\r\n\r\n", path);
    size_t got = 0;
    if (write(fd, req, (size_t)n) == n) {
        ssize_t r;
        while (got + 1 < cap && (r = read(fd, buf + got, cap - 1 - got)) > 0)
            got += (size_t)r;
    }
    close(fd);
    buf[got] = '\0';
    char *body = strstr(buf, "\r\n\r\n");
    return body != NULL ? body + 4 : NULL;
}

static void test_startup_and_metrics(void)
{
    /* no token and no --insecure: the store refuses to start */
    kvt_store_t st;
    CHECK(kvt_store_start(&st, "127.0.0.1", NULL, (const char *[]){"--no-insecure", NULL}, 5000) !=
              0,
          "a store without a token does not start");
    CHECK(kvt_log_find(st.log_path, 0, "no cluster token"), "and says why");
    kvt_store_free(&st);
    int mport = kvt_free_port("127.0.0.1", 77);
    char ps[16];
    snprintf(ps, sizeof(ps), "%d", mport);
    const char *extra[] = {"--metrics-host", "127.0.0.1", "--metrics-port", ps, NULL};
    if (kvt_store_start(&st, "127.0.0.1", TOKEN, extra, 20000) != 0) {
        CHECK(0, "start a store with metrics");
        return;
    }
    tdm_kvc_t *k = client((const char *const[]){st.addr}, 1, 1, 3000);
    uint8_t b[5000];
    memset(b, 3, sizeof(b));
    for (int i = 0; k != NULL && i < 3; i++)
        put1(k, key_of(10, (uint64_t)i), b, sizeof(b), 0);
    usleep(150000); /* gauges are refreshed every 50 ms */
    static char buf[65536];
    const char *body = http_get(mport, "/metrics", buf, sizeof(buf));
    CHECK(body != NULL && strstr(body, "\ntandem_kvstore_blocks 3\n") != NULL,
          "/metrics counts 3 blocks");
    CHECK(body != NULL && strstr(body, "tandem_kvstore_puts_total 3") != NULL &&
              strstr(body, "tandem_kvstore_bytes_in_total 15000") != NULL &&
              strstr(body, "tandem_kvstore_op_seconds_count{op=\"put\"} 3") != NULL &&
              strstr(body, "# TYPE tandem_kvstore_op_seconds histogram") != NULL,
          "/metrics has the counters and the latency histogram");
    body = http_get(mport, "/health", buf, sizeof(buf));
    CHECK(body != NULL && strncmp(buf, "HTTP/1.", 7) == 0 && strncmp(buf + 8, " 200", 4) == 0,
          "/health is 200");
    if (k != NULL)
        tdm_kvc_destroy(k);
    kvt_store_free(&st);
}

int main(void)
{
    tdm_log_set_level(TDM_LOG_LEVEL_ERROR);
    kvt_store_t a, b, small;
    const char *big[] = {"--capacity", "1GiB", "--max-block-bytes", "1MiB", NULL};
    const char *tiny[] = {"--capacity", "4MiB", "--max-block-bytes", "256KiB", NULL};
    if (kvt_store_start(&a, "127.0.0.1", TOKEN, big, 20000) != 0 ||
        kvt_store_start(&b, "127.0.0.1", TOKEN, big, 20000) != 0 ||
        kvt_store_start(&small, "127.0.0.1", TOKEN, tiny, 20000) != 0) {
        fprintf(stderr, "cannot start tandem-kvstore (TANDEM_BIN_DIR?)\n");
        return 1;
    }
    test_startup_and_metrics();
    const char *addrs[2] = {a.addr, b.addr};
    test_roundtrip(addrs);
    test_lru_leases(small.addr);
    kvt_store_t stores[2] = {a, b};
    test_replicas(stores);
    kvt_store_free(&stores[0]);
    kvt_store_free(&stores[1]);
    kvt_store_free(&small);

    kvt_store_t c;
    if (kvt_store_start(&c, "127.0.0.1", TOKEN, big, 20000) == 0)
        test_kill_store_mid_get(&c);
    else
        CHECK(0, "start store c");
    kvt_store_free(&c);
    kvt_store_t h;
    if (kvt_store_start(&h, "127.0.0.1", TOKEN, tiny, 20000) == 0)
        test_hung_store(&h);
    else
        CHECK(0, "start store h");
    kvt_store_free(&h);
    kvt_store_t e;
    const char *impatient[] = {
        "--capacity", "512MiB", "--max-block-bytes", "1MiB", "--client-timeout", "1000", NULL};
    if (kvt_store_start(&e, "127.0.0.1", TOKEN, impatient, 20000) == 0)
        test_stalled_client(&e);
    else
        CHECK(0, "start store e");
    kvt_store_free(&e);
    kvt_store_t d;
    if (kvt_store_start(&d, "127.0.0.1", TOKEN, big, 20000) == 0) {
        test_kill_client_mid_put(&d);
        test_sigterm(&d);
    } else {
        CHECK(0, "start store d");
    }
    kvt_store_free(&d);
    return t_finish();
}
