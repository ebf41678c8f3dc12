/* A cut link between a client and tandem-kvstore, for real: two network
 * namespaces joined by a veth pair, made by the test itself (skipped, exit
 * 77, where it lacks the rights: root and `ip netns`). The store runs in
 * ns1; the client runs in a forked child that enters ns2 (setns, and its
 * own /sys, see child_main) before it makes any UCX object. The child
 *   1. connects, PUTs 64 blocks of 512 KiB;
 *   2. starts a GET of all 64, progresses until the first payload starts,
 *      then stops progressing while the parent sets the ns2 end of the
 *      veth down (`ip link set down`: its route goes and nothing crosses
 *      either way, while both TCP sockets stay open, as with a pulled
 *      cable; `tc ... netem loss 100%` would do too but netem is not in
 *      every kernel). The child not reading meanwhile keeps the payloads
 *      on the store's side of the cut;
 *   3. waits for the GET's callback: it must run within the deadline
 *      (2 s) + 1 s of the GET's start, with every key that did not arrive
 *      non-OK (a miss, never a hang) and every key that did intact;
 *   4. PUTs a block while the link is down: it must fail within the
 *      deadline;
 *   5. asks the parent to set the link up again and GETs one block in a
 *      bounded loop (15 s) until it succeeds: the client reconnected.
 * The child sends its measurements to the parent, which checks and prints
 * them. The store, the child and both namespaces are removed on every exit
 * path (atexit, and on SIGINT/SIGTERM/SIGHUP; the processes also die with
 * the test when it is killed), and namespaces left by an earlier run that
 * was killed (its pid gone) are removed at start. */
#define _GNU_SOURCE /* setns */
#include "../unit/test_util.h"
#include "kv_test_util.h"

#include <dirent.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <sys/mount.h>

#define TOKEN       "netns-token"
#define N_BLOCKS    64
#define BLOCK_BYTES (512 * 1024)
#define DEADLINE_MS 2000
#define RECONNECT_S 15
#define NS_PREFIX   "tdmkv"

static char ns1[64], ns2[64], veth1[16], veth2[16], subnet[32];
static bool ns1_made, ns2_made;
static kvt_store_t store;
static pid_t child_pid;

/* Runs a shell command; returns its exit code (-1: could not run). Its
 * output goes to our stderr only when it fails. */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[1024], full[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    char out[64];
    snprintf(out, sizeof(out), "/tmp/tdmkv-sh-%d.out", (int)getpid());
    snprintf(full, sizeof(full), "%s >%s 2>&1", cmd, out);
    int st = system(full);
    int rc = st == -1 ? -1 : WIFEXITED(st) ? WEXITSTATUS(st) : 128;
    if (rc != 0) {
        fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
        FILE *f = fopen(out, "r");
        char line[512];
        while (f != NULL && fgets(line, sizeof(line), f) != NULL)
            fprintf(stderr, "  %s", line);
        if (f != NULL)
            fclose(f);
    }
    unlink(out);
    return rc;
}

static void cleanup(void)
{
    if (child_pid > 0) {
        kvt_kill(child_pid, SIGKILL, 5000, NULL);
        child_pid = 0;
    }
    kvt_store_free(&store);
    if (ns1_made && sh("ip netns del %s", ns1) == 0)
        ns1_made = false;
    if (ns2_made && sh("ip netns del %s", ns2) == 0)
        ns2_made = false;
}

static void on_signal(int sig)
{
    /* not async-signal-safe, but the process is ending anyway and the
     * namespaces must not outlive it */
    cleanup();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* True while pid is a live (not zombie) instance of this test. */
static bool test_running(int pid)
{
    char path[64], stat[256] = "";
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    size_t n = fread(stat, 1, sizeof(stat) - 1, f);
    fclose(f);
    stat[n] = '\0';
    /* "pid (comm) state ...": comm is cut to 15 bytes */
    const char *close = strrchr(stat, ')');
    return strstr(stat, "(test_kvstore_ne") != NULL && close != NULL && close[1] == ' ' &&
           close[2] != 'Z';
}

/* Namespaces NS_PREFIX-{a,b}-PID whose PID is gone: an earlier run killed
 * before its cleanup. */
static void remove_stale(void)
{
    DIR *d = opendir("/var/run/netns");
    if (d == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        char side;
        int pid;
        if (sscanf(e->d_name, NS_PREFIX "-%c-%d", &side, &pid) != 2 || pid <= 0)
            continue;
        if (!test_running(pid)) {
            fprintf(stderr, "removing the stale namespace %s\n", e->d_name);
            sh("ip netns del %s", e->d_name);
        }
    }
    closedir(d);
}

/* A command that succeeds when dev in ns is up with a carrier. */
static const char *wait_cmd(const char *ns, const char *dev)
{
    static char cmd[256];
    snprintf(cmd, sizeof(cmd), "ip -n %s link show dev %s 2>/dev/null | grep -q 'state UP'", ns,
             dev);
    return cmd;
}

/* 0, or the reason in why. */
static int make_topology(char *why, size_t why_len)
{
    int pid = (int)getpid();
    snprintf(ns1, sizeof(ns1), NS_PREFIX "-a-%d", pid);
    snprintf(ns2, sizeof(ns2), NS_PREFIX "-b-%d", pid);
    snprintf(veth1, sizeof(veth1), "tkva%d", pid % 10000000);
    snprintf(veth2, sizeof(veth2), "tkvb%d", pid % 10000000);
    snprintf(subnet, sizeof(subnet), "10.231.%d", pid % 250 + 1);
    if (sh("ip netns add %s", ns1) != 0) {
        snprintf(why, why_len, "`ip netns add` failed");
        return -1;
    }
    ns1_made = true;
    if (sh("ip netns add %s", ns2) != 0) {
        snprintf(why, why_len, "`ip netns add` failed");
        return -1;
    }
    ns2_made = true;
    /* both ends are made inside their namespaces: nothing is left in
     * ours, and deleting the namespaces deletes the pair */
    if (sh("ip link add %s netns %s type veth peer name %s netns %s", veth1, ns1, veth2, ns2) !=
        0) {
        snprintf(why, why_len, "cannot make a veth pair");
        return -1;
    }
    if (sh("ip -n %s addr add %s.1/24 dev %s", ns1, subnet, veth1) != 0 ||
        sh("ip -n %s addr add %s.2/24 dev %s", ns2, subnet, veth2) != 0 ||
        sh("ip -n %s link set lo up", ns1) != 0 || sh("ip -n %s link set lo up", ns2) != 0 ||
        sh("ip -n %s link set %s up", ns1, veth1) != 0 ||
        sh("ip -n %s link set %s up", ns2, veth2) != 0) {
        snprintf(why, why_len, "cannot configure the veth pair");
        return -1;
    }
    /* UCX uses only devices that are running when it starts: wait for the
     * carrier on both ends */
    int64_t end = kvt_now_ms() + 5000;
    while (system(wait_cmd(ns1, veth1)) != 0 || system(wait_cmd(ns2, veth2)) != 0) {
        if (kvt_now_ms() >= end) {
            snprintf(why, why_len, "the veth pair did not come up in 5 s");
            return -1;
        }
        kvt_sleep_ms(20);
    }
    return 0;
}

/* ---- the client, in ns2 ---- */

typedef struct result {
    int stage; /* how far the child got: 5 = all */
    tdm_status_t ready;
    int64_t ready_ms;
    int put_ok;
    int64_t put_ms;
    /* the GET cut mid-transfer */
    bool get_cb;
    tdm_status_t get_status;
    int64_t first_payload_ms; /* after the GET's start, -1: none seen */
    int64_t cut_ms;           /* link down, after the GET's start */
    int64_t get_cb_ms;        /* callback, after the GET's start */
    int get_ok, get_bad, get_corrupt, get_statuses_ok;
    /* a PUT while the link is down */
    bool put_down_cb;
    tdm_status_t put_down_status, put_down_key;
    int64_t put_down_ms;
    /* after the link is back */
    bool reconnected;
    int64_t reconnect_ms;
    int attempts;
} result_t;

typedef struct cb_state {
    bool done;
    tdm_status_t status;
    int64_t at;
} cb_state_t;

static void on_done(void *user, tdm_status_t status)
{
    cb_state_t *c = user;
    c->done = true;
    c->status = status;
    c->at = tdm_net_now_ms();
}

static tdm_hash128_t key_of(int i)
{
    return (tdm_hash128_t){.lo = 0x6e65746e73ull + (uint64_t)i, .hi = 0x74616e64656dull};
}

static void fill(uint8_t *p, int i)
{
    for (size_t j = 0; j < BLOCK_BYTES; j += 8) {
        uint64_t v = (uint64_t)i * 0x9e3779b97f4a7c15ull ^ j;
        memcpy(p + j, &v, 8);
    }
}

/* Progresses until *done or timeout_ms passes. */
static void progress_until(tdm_kvc_t *kvc, const bool *done, int timeout_ms)
{
    int64_t end = tdm_net_now_ms() + timeout_ms;
    while (!*done && tdm_net_now_ms() < end)
        if (tdm_kvc_progress(kvc) == 0 && !*done)
            tdm_kvc_wait(kvc, 2);
}

/* Asks the parent to run a link change; true when it was done. */
static bool ask_parent(int to_parent, int from_parent, char cmd)
{
    if (write(to_parent, &cmd, 1) != 1)
        return false;
    struct pollfd p = {.fd = from_parent, .events = POLLIN};
    char ack = 0;
    return poll(&p, 1, 10000) == 1 && read(from_parent, &ack, 1) == 1 && ack == 'y';
}

static int child_main(const char *addr, int to_parent, int from_parent)
{
    result_t r;
    memset(&r, 0, sizeof(r));
    r.first_payload_ms = -1;
    char path[128];
    snprintf(path, sizeof(path), "/var/run/netns/%s", ns2);
    int fd = open(path, O_RDONLY);
    if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
        fprintf(stderr, "child: cannot enter %s: %s\n", ns2, strerror(errno));
        return 2;
    }
    close(fd);
    /* UCX finds its network devices in /sys/class/net, which shows the
     * namespace that mounted /sys: remount it in a mount namespace of our
     * own, as `ip netns exec` does, or UCX sees the devices of the
     * namespace we came from and none of ns2's */
    if (unshare(CLONE_NEWNS) != 0 || mount("", "/", NULL, MS_SLAVE | MS_REC, NULL) != 0) {
        fprintf(stderr, "child: cannot make a mount namespace: %s\n", strerror(errno));
        return 2;
    }
    umount2("/sys", MNT_DETACH);
    if (mount(ns2, "/sys", "sysfs", 0, NULL) != 0) {
        fprintf(stderr, "child: cannot mount /sys for %s: %s\n", ns2, strerror(errno));
        return 2;
    }

    uint8_t *src = malloc((size_t)N_BLOCKS * BLOCK_BYTES);
    uint8_t *dst = malloc((size_t)N_BLOCKS * BLOCK_BYTES);
    const char *stores[1] = {addr};
    tdm_kvc_config_t cfg = {
        .stores = stores,
        .n_stores = 1,
        .token = TOKEN,
        .deadline_ms = DEADLINE_MS,
        .backoff_min_ms = 100,
        .backoff_max_ms = 1000,
        .name = "netns-client",
    };
    tdm_kvc_t *kvc = NULL;
    if (src == NULL || dst == NULL || tdm_kvc_create(&cfg, &kvc) != TDM_OK)
        goto send;
    int64_t t0 = tdm_net_now_ms();
    r.ready = tdm_kvc_wait_ready(kvc, 10000);
    r.ready_ms = tdm_net_now_ms() - t0;
    r.stage = 1;
    if (r.ready != TDM_OK)
        goto send;

    tdm_hash128_t keys[N_BLOCKS + 1];
    const void *sbufs[N_BLOCKS];
    void *dbufs[N_BLOCKS];
    size_t lens[N_BLOCKS], caps[N_BLOCKS], got[N_BLOCKS];
    tdm_status_t st[N_BLOCKS];
    for (int i = 0; i < N_BLOCKS; i++) {
        keys[i] = key_of(i);
        fill(src + (size_t)i * BLOCK_BYTES, i);
        sbufs[i] = src + (size_t)i * BLOCK_BYTES;
        dbufs[i] = dst + (size_t)i * BLOCK_BYTES;
        lens[i] = caps[i] = BLOCK_BYTES;
    }
    keys[N_BLOCKS] = key_of(N_BLOCKS);
    t0 = tdm_net_now_ms();
    tdm_status_t s = tdm_kvc_put_sync(kvc, N_BLOCKS, keys, sbufs, lens, 0, st);
    r.put_ms = tdm_net_now_ms() - t0;
    for (int i = 0; i < N_BLOCKS; i++)
        r.put_ok += s == TDM_OK && st[i] == TDM_OK;
    r.stage = 2;
    if (r.put_ok != N_BLOCKS)
        goto send;

    /* GET everything, cut the link once the first payload started */
    memset(dst, 0, (size_t)N_BLOCKS * BLOCK_BYTES);
    cb_state_t get_cb = {0};
    t0 = tdm_net_now_ms();
    if (tdm_kvc_get(kvc, N_BLOCKS, keys, dbufs, caps, got, st, on_done, &get_cb) != TDM_OK)
        goto send;
    /* progress until the first payload started (its GetItem is in; the
     * payloads land in a burst, so waiting for one to land would let them
     * all in), at most 1 s */
    while (!get_cb.done && tdm_net_now_ms() - t0 < 1000 && r.first_payload_ms < 0) {
        if (tdm_kvc_progress(kvc) == 0)
            tdm_kvc_wait(kvc, 1);
        for (int i = 0; i < N_BLOCKS && r.first_payload_ms < 0; i++)
            if (got[i] != 0)
                r.first_payload_ms = tdm_net_now_ms() - t0;
    }
    /* no progress from here until the link is down */
    if (!ask_parent(to_parent, from_parent, 'd'))
        goto send;
    r.cut_ms = tdm_net_now_ms() - t0;
    progress_until(kvc, &get_cb.done, 10000);
    r.get_cb = get_cb.done;
    r.get_status = get_cb.status;
    r.get_cb_ms = (get_cb.done ? get_cb.at : tdm_net_now_ms()) - t0;
    for (int i = 0; get_cb.done && i < N_BLOCKS; i++) {
        if (st[i] != TDM_OK) {
            r.get_bad++;
            continue;
        }
        r.get_ok++;
        if (got[i] != BLOCK_BYTES || memcmp(dbufs[i], sbufs[i], BLOCK_BYTES) != 0)
            r.get_corrupt++;
    }
    r.get_statuses_ok = r.get_ok + r.get_bad == N_BLOCKS;
    r.stage = 3;
    if (!get_cb.done)
        goto send; /* the buffers may still be written: keep them */

    /* a PUT while the link is down */
    cb_state_t put_cb = {0};
    tdm_status_t put_st = TDM_ERR_INTERNAL;
    t0 = tdm_net_now_ms();
    if (tdm_kvc_put(kvc, 1, &keys[N_BLOCKS], sbufs, lens, 0, &put_st, on_done, &put_cb) == TDM_OK)
        progress_until(kvc, &put_cb.done, 10000);
    r.put_down_cb = put_cb.done;
    r.put_down_status = put_cb.status;
    r.put_down_key = put_st;
    r.put_down_ms = (put_cb.done ? put_cb.at : tdm_net_now_ms()) - t0;
    r.stage = 4;
    if (!put_cb.done)
        goto send;

    /* the link comes back: small GETs until one succeeds */
    if (!ask_parent(to_parent, from_parent, 'u'))
        goto send;
    t0 = tdm_net_now_ms();
    while (tdm_net_now_ms() - t0 < RECONNECT_S * 1000) {
        r.attempts++;
        tdm_status_t one = TDM_ERR_INTERNAL;
        size_t one_len = 0;
        memset(dbufs[0], 0, BLOCK_BYTES);
        s = tdm_kvc_get_sync(kvc, 1, keys, dbufs, caps, &one_len, &one);
        if (s == TDM_OK && one == TDM_OK && one_len == BLOCK_BYTES &&
            memcmp(dbufs[0], sbufs[0], BLOCK_BYTES) == 0) {
            r.reconnected = true;
            break;
        }
        /* wait a little, progressing, before the next try */
        bool never = false;
        progress_until(kvc, &never, 50);
    }
    r.reconnect_ms = tdm_net_now_ms() - t0;
    r.stage = 5;

send:
    if (write(to_parent, "r", 1) != 1 || write(to_parent, &r, sizeof(r)) != (ssize_t)sizeof(r))
        fprintf(stderr, "child: cannot send the result\n");
    tdm_kvc_destroy(kvc);
    free(src);
    free(dst);
    return 0;
}

/* ---- the parent ---- */

/* Serves the child's link requests until its result arrives (or 60 s). */
static bool serve_child(int from_child, int to_child, result_t *r)
{
    int64_t end = kvt_now_ms() + 60000;
    while (kvt_now_ms() < end) {
        struct pollfd p = {.fd = from_child, .events = POLLIN};
        if (poll(&p, 1, 100) != 1)
            continue;
        char cmd;
        if (read(from_child, &cmd, 1) != 1)
            return false; /* the child ended */
        if (cmd == 'r') {
            size_t have = 0;
            while (have < sizeof(*r)) {
                ssize_t n = read(from_child, (char *)r + have, sizeof(*r) - have);
                if (n <= 0)
                    return false;
                have += (size_t)n;
            }
            return true;
        }
        const char *how = cmd == 'd' ? "down" : "up";
        int64_t t = kvt_now_ms();
        bool ok = sh("ip -n %s link set %s %s", ns2, veth2, how) == 0;
        printf("link %s (%s in %s): %s in %lld ms\n", how, veth2, ns2, ok ? "done" : "FAILED",
               (long long)(kvt_now_ms() - t));
        fflush(stdout);
        char ack = ok ? 'y' : 'n';
        if (write(to_child, &ack, 1) != 1)
            return false;
    }
    fprintf(stderr, "the client did not finish in 60 s\n");
    return false;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* a closed stdout must not skip the cleanup */
    if (geteuid() != 0) {
        printf("skipped: needs root and ip netns (not root)\n");
        return 77;
    }
    if (system("ip netns list >/dev/null 2>&1") != 0) {
        printf("skipped: needs root and ip netns (no `ip netns` here)\n");
        return 77;
    }
    atexit(cleanup);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGHUP, on_signal);
    remove_stale();
    char why[128];
    if (make_topology(why, sizeof(why)) != 0) {
        printf("skipped: needs root and ip netns (%s)\n", why);
        cleanup();
        return 77;
    }
    printf("%s (%s.1, %s) <-> %s (%s.2, %s)\n", ns1, subnet, veth1, ns2, subnet, veth2);

    char host[48];
    snprintf(host, sizeof(host), "%s.1", subnet);
    int port = 20000 + (int)getpid() % 12000; /* ns1 is new: every port is free */
    const char *prefix[] = {"ip", "netns", "exec", ns1, NULL};
    if (kvt_store_start_in(&store, prefix, host, port, TOKEN, NULL, 15000) != 0) {
        CHECK(false, "cannot start tandem-kvstore in %s", ns1);
        kvt_log_dump(store.log_path, 20);
        return t_finish();
    }
    printf("store %s in %s (pid %d)\n", store.addr, ns1, (int)store.pid);
    fflush(stdout);

    int c2p[2], p2c[2];
    if (pipe(c2p) != 0 || pipe(p2c) != 0) {
        CHECK(false, "pipe: %s", strerror(errno));
        return t_finish();
    }
    pid_t parent = getpid();
    child_pid = fork();
    if (child_pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* ends with the test, however it ends */
        if (getppid() != parent)
            _exit(3);
        close(c2p[0]);
        close(p2c[1]);
        _exit(child_main(store.addr, c2p[1], p2c[0]));
    }
    CHECK(child_pid > 0, "fork: %s", strerror(errno));
    close(c2p[1]);
    close(p2c[0]);
    result_t r;
    memset(&r, 0, sizeof(r));
    bool got = child_pid > 0 && serve_child(c2p[0], p2c[1], &r);
    close(c2p[0]);
    close(p2c[1]);
    int status = 0;
    int w = child_pid > 0 ? kvt_wait_pid(child_pid, 10000, &status) : -1;
    if (w == 0)
        kvt_kill(child_pid, SIGKILL, 5000, &status);
    child_pid = 0;
    CHECK(got, "the client sent no result");
    CHECK(w == 1 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "the client did not exit cleanly (wait %d, status 0x%x)", w, status);

    printf("connect: %s in %lld ms\n", tdm_status_str(r.ready), (long long)r.ready_ms);
    CHECK(r.stage >= 1 && r.ready == TDM_OK, "the client did not connect: %s",
          tdm_status_str(r.ready));
    if (r.stage >= 2)
        printf("PUT %d x %d KiB: %d OK in %lld ms\n", N_BLOCKS, BLOCK_BYTES / 1024, r.put_ok,
               (long long)r.put_ms);
    CHECK(r.stage >= 2 && r.put_ok == N_BLOCKS, "PUT: %d of %d", r.put_ok, N_BLOCKS);
    if (r.stage >= 3) {
        printf("GET %d blocks: first payload at %lld ms, link down at %lld ms, callback at %lld ms "
               "(%lld ms after the cut): %s, %d arrived intact, %d missing\n",
               N_BLOCKS, (long long)r.first_payload_ms, (long long)r.cut_ms, (long long)r.get_cb_ms,
               (long long)(r.get_cb_ms - r.cut_ms), tdm_status_str(r.get_status),
               r.get_ok - r.get_corrupt, r.get_bad);
        CHECK(r.get_cb, "the GET's callback did not run within 10 s of the cut");
        CHECK(r.get_cb_ms <= DEADLINE_MS + 1000, "the GET ended %lld ms after its start (limit %d)",
              (long long)r.get_cb_ms, DEADLINE_MS + 1000);
        CHECK(r.first_payload_ms >= 0, "no payload had started before the cut");
        CHECK(r.get_status != TDM_OK, "the cut GET reported OK");
        CHECK(r.get_bad > 0, "every block arrived: the cut was not mid-transfer");
        CHECK(r.get_corrupt == 0, "%d blocks reported OK with wrong bytes", r.get_corrupt);
        CHECK(r.get_statuses_ok, "statuses do not add up");
    } else {
        CHECK(false, "the child stopped before the GET (stage %d)", r.stage);
    }
    if (r.stage >= 4) {
        printf("PUT while the link is down: %s (key %s) in %lld ms\n",
               tdm_status_str(r.put_down_status), tdm_status_str(r.put_down_key),
               (long long)r.put_down_ms);
        CHECK(r.put_down_cb && r.put_down_status != TDM_OK && r.put_down_key != TDM_OK,
              "the PUT over a cut link did not fail: %s", tdm_status_str(r.put_down_status));
        CHECK(r.put_down_ms <= DEADLINE_MS + 250, "the PUT failed after %lld ms (deadline %d)",
              (long long)r.put_down_ms, DEADLINE_MS);
    }
    if (r.stage >= 5)
        printf("link up: %s after %lld ms (%d GETs)\n",
               r.reconnected ? "reconnected, GET OK" : "NOT reconnected", (long long)r.reconnect_ms,
               r.attempts);
    CHECK(r.stage >= 5 && r.reconnected, "the client did not reconnect within %d s", RECONNECT_S);

    CHECK(kvt_alive(store.pid), "the store died");
    int r_stop = kvt_store_stop(&store, SIGTERM, 20000, &status);
    CHECK(r_stop == 1 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "the store did not exit 0 on SIGTERM (stop %d, status 0x%x)", r_stop, status);
    if (n_fail > 0)
        kvt_log_dump(store.log_path, 30);
    cleanup();
    CHECK(!ns1_made && !ns2_made, "the namespaces were not removed");
    return t_finish();
}
