/* tandem bench kvstore: PUT and GET throughput and latency of one
 * tandem-kvstore over loopback, beside `ucx_perftest -t ucp_am_bw` at the
 * same message size in the same run.
 *
 * The store is started here (tandem-kvstore next to this binary) unless
 * --store HOST:PORT names one. Each phase moves --count blocks of
 * --block-bytes (368,640: one SmolLM2-135M f16 block) with a fixed number
 * of single-block operations in flight (1, then 16): GB/s = payload bytes
 * / wall time of the phase; latency = submit to callback of each op, p50
 * and p99. PUTs use fresh keys (a key already stored is not moved again);
 * GETs read the keys the PUT phase stored, each once (cold: from DRAM),
 * then 16 of them over and over (hot: in the caches, as ucx_perftest's one
 * reused buffer is). Buffers are registered with
 * UCX, as nodes register their staging memory. Built only with the
 * network roles (TANDEM_HAVE_NET). */
#ifdef TANDEM_HAVE_NET
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tandem/kvclient.h"
#include "tandem/log.h"
#include "tool.h"

extern char **environ;

typedef struct bk_slot {
    int64_t t0_us;
    bool busy;
    tdm_status_t st;
    size_t len;
} bk_slot_t;

typedef struct bk_phase {
    int in_flight;
    double gbps;
    double p50_us, p99_us;
    int errors;
} bk_phase_t;

static int64_t us_now(void)
{
    return (int64_t)(tool_now() * 1e6);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

typedef struct bk_ctx {
    tdm_kvc_t *kvc;
    bk_slot_t *slots;
    int64_t *lat;
    int n_lat;
    int done;
} bk_ctx_t;

typedef struct bk_cb {
    bk_ctx_t *ctx;
    int slot;
} bk_cb_t;

static void bk_done(void *user, tdm_status_t status)
{
    bk_cb_t *c = user;
    bk_slot_t *s = &c->ctx->slots[c->slot];
    c->ctx->lat[c->ctx->n_lat++] = us_now() - s->t0_us;
    s->busy = false;
    c->ctx->done++;
    if (status != TDM_OK)
        s->st = status;
}

/* Runs count single-block operations, in_flight at a time. */
static void bk_run(tdm_kvc_t *kvc, bool put, const tdm_hash128_t *keys, int n_keys, int count,
                   int in_flight, char *src, char **dst, size_t block, bk_phase_t *out)
{
    bk_ctx_t ctx = {.kvc = kvc};
    ctx.slots = calloc((size_t)in_flight, sizeof(bk_slot_t));
    ctx.lat = calloc((size_t)count, sizeof(int64_t));
    bk_cb_t *cbs = calloc((size_t)in_flight, sizeof(bk_cb_t));
    tdm_status_t *st = calloc((size_t)in_flight, sizeof(tdm_status_t));
    size_t *lens = calloc((size_t)in_flight, sizeof(size_t));
    size_t *caps = calloc((size_t)in_flight, sizeof(size_t));
    const void **srcs = calloc((size_t)in_flight, sizeof(void *));
    out->in_flight = in_flight;
    out->errors = 0;
    int next = 0;
    int64_t t0 = us_now();
    while (ctx.done < count) {
        for (int s = 0; s < in_flight && next < count; s++) {
            if (ctx.slots[s].busy)
                continue;
            ctx.slots[s].busy = true;
            ctx.slots[s].t0_us = us_now();
            cbs[s] = (bk_cb_t){&ctx, s};
            tdm_status_t rc;
            if (put) {
                srcs[s] = src;
                lens[s] = block;
                rc = tdm_kvc_put(kvc, 1, &keys[next], &srcs[s], &lens[s], 0, &st[s], bk_done,
                                 &cbs[s]);
            } else {
                caps[s] = block;
                rc = tdm_kvc_get(kvc, 1, &keys[next % n_keys], (void *const *)&dst[s], &caps[s],
                                 &lens[s], &st[s], bk_done, &cbs[s]);
            }
            if (rc != TDM_OK) {
                ctx.slots[s].busy = false;
                ctx.done++;
                out->errors++;
            }
            next++;
        }
        tdm_kvc_progress(kvc); /* polls, as ucx_perftest does */
        for (int s = 0; s < in_flight; s++)
            if (!ctx.slots[s].busy && st[s] != TDM_OK) {
                out->errors++;
                st[s] = TDM_OK;
            }
    }
    double secs = (double)(us_now() - t0) / 1e6;
    out->gbps = (double)count * (double)block / secs / 1e9;
    qsort(ctx.lat, (size_t)ctx.n_lat, sizeof(int64_t), cmp_i64);
    out->p50_us = ctx.n_lat ? (double)ctx.lat[ctx.n_lat / 2] : 0;
    out->p99_us = ctx.n_lat ? (double)ctx.lat[(ctx.n_lat * 99) / 100] : 0;
    free(ctx.slots);
    free(ctx.lat);
    free(cbs);
    free(st);
    free(lens);
    free(caps);
    free(srcs);
}

/* A free TCP port below 32768 (the ephemeral range starts there). */
static int free_port(int salt)
{
    for (int i = 0; i < 2000; i++) {
        int port =
            20000 + (int)(((unsigned)getpid() * 7919u + (unsigned)salt * 131u + (unsigned)i * 17u) %
                          12000u);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            return -1;
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int ok = bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
        close(fd);
        if (ok)
            return port;
    }
    return -1;
}

static pid_t spawn(char *const argv[], const char *log_path)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid;
    int rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    return rc == 0 ? pid : -1;
}

static void stop_child(pid_t pid, int sig)
{
    if (pid <= 0)
        return;
    kill(pid, sig);
    for (int i = 0; i < 500; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* ucx_perftest ucp_am_bw over loopback TCP at one message size: MB/s of
 * its "Final:" line (overall bandwidth), or a negative value. */
static double run_perftest(size_t size, int iters)
{
    int port = free_port(99);
    char ps[16], ss[32], ns[16], ws[16];
    snprintf(ps, sizeof(ps), "%d", port);
    snprintf(ss, sizeof(ss), "%zu", size);
    snprintf(ns, sizeof(ns), "%d", iters);
    snprintf(ws, sizeof(ws), "%d", iters / 10 + 1);
    setenv("UCX_TLS", "tcp", 0);
    char srv_log[] = "/tmp/tandem-perftest-srv-XXXXXX";
    int fd = mkstemp(srv_log);
    if (fd >= 0)
        close(fd);
    char *sargv[] = {"ucx_perftest", "-p", ps, NULL};
    pid_t srv = spawn(sargv, srv_log);
    if (srv < 0) {
        unlink(srv_log);
        return -1;
    }
    usleep(300000);
    char cli_log[] = "/tmp/tandem-perftest-cli-XXXXXX";
    fd = mkstemp(cli_log);
    if (fd >= 0)
        close(fd);
    char *cargv[] = {"ucx_perftest", "127.0.0.1", "-p", ps, "-t", "ucp_am_bw", "-s", ss,
                     "-n",           ns,          "-w", ws, NULL};
    double mbs = -1;
    pid_t cli = spawn(cargv, cli_log);
    if (cli > 0) {
        int status = 0;
        for (int i = 0; i < 6000; i++) { /* 60 s */
            if (waitpid(cli, &status, WNOHANG) == cli) {
                cli = 0;
                break;
            }
            usleep(10000);
        }
        if (cli > 0)
            stop_child(cli, SIGKILL);
        FILE *f = fopen(cli_log, "r");
        char line[512];
        while (f != NULL && fgets(line, sizeof(line), f) != NULL) {
            double v[7];
            long it;
            if (sscanf(line, "Final: %ld %lf %lf %lf %lf %lf", &it, &v[0], &v[1], &v[2], &v[3],
                       &v[4]) == 6)
                mbs = v[4];
        }
        if (f != NULL)
            fclose(f);
    }
    stop_child(srv, SIGTERM);
    unlink(srv_log);
    unlink(cli_log);
    return mbs;
}

int cmd_bench_kvstore(int argc, char **argv)
{
    const char *store = NULL, *token = NULL;
    uint64_t block = 368640;
    int count = 2000;
    bool json = false, no_perftest = false;
    tdm_flag_t flags[] = {
        {"store", 0, TDM_FLAG_TYPE_STR, &store, "HOST:PORT of a running store (default: start one)",
         NULL},
        {"cluster-token", 0, TDM_FLAG_TYPE_STR, &token, "its token (with --store)", NULL},
        {"block-bytes", 0, TDM_FLAG_TYPE_SIZE, &block, "bytes per block", NULL},
        {"count", 'n', TDM_FLAG_TYPE_INT, &count, "blocks per phase", NULL},
        {"json", 0, TDM_FLAG_TYPE_BOOL, &json, "print one JSON object", NULL},
        {"no-perftest", 0, TDM_FLAG_TYPE_BOOL, &no_perftest, "skip ucx_perftest", NULL},
    };
    int rc;
    const char *pos[2];
    size_t n_pos = 0;
    if (!tool_parse("bench kvstore [--store HOST:PORT] [--json]",
                    "PUT/GET throughput and latency of tandem-kvstore beside ucx_perftest.", flags,
                    sizeof(flags) / sizeof(flags[0]), argc, argv, pos, 2, &n_pos, &rc))
        return rc;
    if (count < 16 || block == 0 || block > (1ull << 30)) {
        fprintf(stderr, "tandem bench kvstore: --count of at least 16 and a sane --block-bytes\n");
        return TOOL_EXIT_USAGE;
    }
    pid_t srv = -1;
    char addr[64], log_path[] = "/tmp/tandem-bench-kvstore-XXXXXX", tok[40];
    if (store == NULL) {
        char exe[4096];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 32);
        if (n <= 0) {
            fprintf(stderr, "tandem bench kvstore: cannot find this binary's folder\n");
            return TOOL_EXIT_FAIL;
        }
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        strcpy(slash + 1, "tandem-kvstore");
        int port = free_port(1);
        snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
        uint64_t seed = (uint64_t)us_now();
        snprintf(tok, sizeof(tok), "%016llx", (unsigned long long)tool_rng_next(&seed));
        token = tok;
        char cap[32];
        snprintf(cap, sizeof(cap), "%llu",
                 (unsigned long long)((uint64_t)count * 2 * ((block + 4095) & ~4095ull) +
                                      (64ull << 20)));
        char bs[32];
        snprintf(bs, sizeof(bs), "%llu", (unsigned long long)block);
        int fd = mkstemp(log_path);
        if (fd >= 0)
            close(fd);
        char *sargv[] = {exe, "--listen",       addr, "--capacity",      cap, "--max-block-bytes",
                         bs,  "--metrics-port", "0",  "--cluster-token", tok, NULL};
        srv = spawn(sargv, log_path);
        if (srv < 0) {
            fprintf(stderr, "tandem bench kvstore: cannot start %s\n", exe);
            return TOOL_EXIT_FAIL;
        }
        store = addr;
        fprintf(stderr, "bench kvstore: started tandem-kvstore on %s (log %s)\n", addr, log_path);
    }
    const char *stores[1] = {store};
    tdm_kvc_config_t kc = {
        .stores = stores, .n_stores = 1, .token = token, .deadline_ms = 10000, .name = "bench"};
    tdm_kvc_t *kvc = NULL;
    rc = TOOL_EXIT_FAIL;
    char *src = NULL, *dst_mem = NULL;
    char **dst = NULL;
    tdm_hash128_t *keys = NULL;
    void *mh_src = NULL, *mh_dst = NULL;
    if (tdm_kvc_create(&kc, &kvc) != TDM_OK)
        goto out;
    tdm_status_t ready = TDM_ERR_TIMEOUT;
    for (int i = 0; i < 50 && ready != TDM_OK; i++)
        ready = tdm_kvc_wait_ready(kvc, 200);
    if (ready != TDM_OK) {
        fprintf(stderr, "tandem bench kvstore: the store at %s did not answer\n", store);
        goto out;
    }
    src = aligned_alloc(4096, (block + 4095) & ~4095ull);
    dst_mem = aligned_alloc(4096, 16 * ((block + 4095) & ~4095ull));
    dst = calloc(16, sizeof(char *));
    keys = calloc((size_t)count * 4, sizeof(tdm_hash128_t));
    if (src == NULL || dst_mem == NULL || dst == NULL || keys == NULL)
        goto out;
    uint64_t seed = 42;
    for (uint64_t i = 0; i < block; i++)
        src[i] = (char)tool_rng_next(&seed);
    memset(dst_mem, 0, 16 * ((block + 4095) & ~4095ull));
    for (int i = 0; i < 16; i++)
        dst[i] = dst_mem + (size_t)i * ((block + 4095) & ~4095ull);
    tdm_kvc_mem_map(kvc, src, block, &mh_src);
    tdm_kvc_mem_map(kvc, dst_mem, 16 * ((block + 4095) & ~4095ull), &mh_dst);
    uint64_t base = (uint64_t)us_now();
    for (int i = 0; i < count * 4; i++)
        keys[i] = (tdm_hash128_t){base + (uint64_t)i, 0xbe7c4u};

    bk_phase_t put1, put16, get1, get16;
    fprintf(stderr, "bench kvstore: %d blocks of %llu bytes per phase\n", count,
            (unsigned long long)block);
    bk_run(kvc, true, keys, count, count, 1, src, dst, block, &put1);
    fprintf(stderr, "  put, 1 in flight:  %.2f GB/s\n", put1.gbps);
    bk_run(kvc, true, keys + count, count, count, 16, src, dst, block, &put16);
    fprintf(stderr, "  put, 16 in flight: %.2f GB/s\n", put16.gbps);
    bk_run(kvc, false, keys, count, count, 1, src, dst, block, &get1);
    fprintf(stderr, "  get, 1 in flight:  %.2f GB/s\n", get1.gbps);
    bk_run(kvc, false, keys + count, count, count, 16, src, dst, block, &get16);
    fprintf(stderr, "  get, 16 in flight: %.2f GB/s\n", get16.gbps);
    /* the same with 16 blocks read over and over: warm in the caches, as
     * ucx_perftest's one reused buffer is */
    bk_phase_t hot16;
    bk_run(kvc, false, keys + count, 16, count, 16, src, dst, block, &hot16);
    fprintf(stderr, "  get, 16 in flight, 16 hot blocks: %.2f GB/s\n", hot16.gbps);
    /* the last GETs' payloads must be the bytes that were put */
    int bad = 0;
    for (int i = 0; i < 16; i++)
        bad += memcmp(dst[i], src, block) != 0;
    double pt = -1;
    if (!no_perftest) {
        fprintf(stderr, "  ucx_perftest ucp_am_bw -s %llu ...\n", (unsigned long long)block);
        pt = run_perftest(block, count);
        if (pt < 0)
            fprintf(stderr, "  ucx_perftest did not run (is ucx-utils installed?)\n");
    }
    double pt_gbps = pt > 0 ? pt * 1048576.0 / 1e9 : 0;
    int errors = put1.errors + put16.errors + get1.errors + get16.errors + hot16.errors;
    if (json) {
        printf("{\"block_bytes\": %llu, \"count\": %d, \"put_gbps\": %.4f, \"get_gbps\": %.4f, "
               "\"put1_gbps\": %.4f, \"get1_gbps\": %.4f, "
               "\"put_p50_us\": %.1f, \"put_p99_us\": %.1f, \"get_p50_us\": %.1f, "
               "\"get_p99_us\": %.1f, \"put1_p50_us\": %.1f, \"put1_p99_us\": %.1f, "
               "\"get1_p50_us\": %.1f, \"get1_p99_us\": %.1f, \"perftest_am_gbps\": %.4f, "
               "\"get_vs_perftest\": %.3f, \"get_hot_gbps\": %.4f, \"get_hot_vs_perftest\": %.3f, "
               "\"errors\": %d, \"corrupt\": %d}\n",
               (unsigned long long)block, count, put16.gbps, get16.gbps, put1.gbps, get1.gbps,
               put16.p50_us, put16.p99_us, get16.p50_us, get16.p99_us, put1.p50_us, put1.p99_us,
               get1.p50_us, get1.p99_us, pt_gbps, pt_gbps > 0 ? get16.gbps / pt_gbps : 0,
               hot16.gbps, pt_gbps > 0 ? hot16.gbps / pt_gbps : 0, errors, bad);
    } else {
        printf("%-22s %10s %10s %10s\n", "", "GB/s", "p50 us", "p99 us");
        bk_phase_t *ph[5] = {&put1, &put16, &get1, &get16, &hot16};
        const char *names[5] = {"PUT, 1 in flight", "PUT, 16 in flight", "GET, 1 in flight",
                                "GET, 16 in flight", "GET, 16, hot blocks"};
        for (int i = 0; i < 5; i++)
            printf("%-22s %10.2f %10.1f %10.1f\n", names[i], ph[i]->gbps, ph[i]->p50_us,
                   ph[i]->p99_us);
        if (pt_gbps > 0)
            printf("%-22s %10.2f   (GET 16 / perftest = %.2f, hot %.2f; target >= 0.8)\n",
                   "ucx_perftest am_bw", pt_gbps, get16.gbps / pt_gbps, hot16.gbps / pt_gbps);
        printf("errors %d, corrupt payloads %d\n", errors, bad);
    }
    rc = errors == 0 && bad == 0 ? TOOL_EXIT_OK : TOOL_EXIT_FAIL;
out:
    if (kvc != NULL) {
        tdm_kvc_mem_unmap(kvc, mh_src);
        tdm_kvc_mem_unmap(kvc, mh_dst);
        tdm_kvc_destroy(kvc);
    }
    free(src);
    free(dst_mem);
    free(dst);
    free(keys);
    if (srv > 0) {
        stop_child(srv, SIGTERM);
        unlink(log_path);
    }
    return rc;
}

#endif /* TANDEM_HAVE_NET */
