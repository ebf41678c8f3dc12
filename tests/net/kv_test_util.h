/* Helpers for tests that run real tandem-kvstore processes (header-only).
 *
 *   kvt_store_t st;
 *   const char *extra[] = {"--max-inflight", "4", NULL};
 *   if (kvt_store_start(&st, "127.0.0.1", "secret", extra, 10000) != 0)
 *       ...                                  // st.log_path says why
 *   if (kvt_wait_client(st.addr, "secret", 5000) != TDM_OK) ...
 *   ... talk to st.addr ...
 *   int status;
 *   kvt_store_stop(&st, SIGTERM, 15000, &status);   // or SIGKILL
 *
 * Every wait has a timeout. Every process started here is recorded and
 * killed (SIGKILL) and reaped by an atexit handler, so a test that fails
 * or exits early leaves no store behind; call kvt_reap_all() yourself from
 * a signal handler path if the test installs one. A test that dies
 * without atexit (killed, aborted by a sanitizer) takes its processes
 * along: they get SIGKILL when it ends (PR_SET_PDEATHSIG). Processes that
 * a test kills itself are forgotten when reaped (kvt_wait_pid / kvt_kill).
 * Call all of these from the test's main thread: a child process is tied
 * to the thread that started it.
 *
 * Ports: listen only below 32768 (DESIGN.md "Known traps");
 * kvt_free_port() tries bind() on candidates in 20000..31999 chosen from
 * the pid, closes the socket and returns the port, so two tests that run
 * at once rarely pick the same one; kvt_store_start() retries with another
 * port when the store cannot listen.
 *
 * The store binary is $TANDEM_BIN_DIR/tandem-kvstore (build/bin when the
 * variable is unset). Its stderr and stdout go to a log file (a fresh temp
 * file; removed by kvt_store_free() unless TANDEM_KEEP_LOGS is set), which
 * kvt_log_find() searches for the reasons the store logs. */
#ifndef TANDEM_TESTS_KV_TEST_UTIL_H
#define TANDEM_TESTS_KV_TEST_UTIL_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tandem/kvclient.h"

#define KVT_MAX_CHILDREN 16

/* The processes this test started and has not reaped yet. */
static pid_t kvt_children[KVT_MAX_CHILDREN];
static bool kvt_atexit_set;

static inline int64_t kvt_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline void kvt_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline void kvt_forget(pid_t pid)
{
    for (int i = 0; i < KVT_MAX_CHILDREN; i++)
        if (kvt_children[i] == pid)
            kvt_children[i] = 0;
}

/* Kills (SIGKILL) and reaps every process still recorded; waits at most
 * 5 s in all. Safe to call more than once. */
static inline void kvt_reap_all(void)
{
    int64_t end = kvt_now_ms() + 5000;
    for (int i = 0; i < KVT_MAX_CHILDREN; i++) {
        pid_t pid = kvt_children[i];
        if (pid <= 0)
            continue;
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, WNOHANG) == 0 && kvt_now_ms() < end)
            kvt_sleep_ms(5);
        kvt_children[i] = 0;
    }
}

static inline void kvt_atexit(void)
{
    kvt_reap_all();
}

/* Records pid so that the atexit handler kills it; false when the table
 * is full (the caller kills it then). */
static inline bool kvt_track(pid_t pid)
{
    if (!kvt_atexit_set) {
        atexit(kvt_atexit);
        kvt_atexit_set = true;
    }
    for (int i = 0; i < KVT_MAX_CHILDREN; i++)
        if (kvt_children[i] == 0) {
            kvt_children[i] = pid;
            return true;
        }
    return false;
}

/* Waits up to timeout_ms for pid to exit and reaps it. Returns 1 when it
 * exited (*status: its wait status, may be NULL), 0 on timeout, -1 when it
 * is not our child (or was reaped already). */
static inline int kvt_wait_pid(pid_t pid, int timeout_ms, int *status)
{
    int64_t end = kvt_now_ms() + timeout_ms;
    for (;;) {
        int st = 0;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            kvt_forget(pid);
            if (status != NULL)
                *status = st;
            return 1;
        }
        if (r < 0 && errno != EINTR) {
            kvt_forget(pid);
            return -1;
        }
        if (kvt_now_ms() >= end)
            return 0;
        kvt_sleep_ms(5);
    }
}

/* Sends sig and reaps within timeout_ms; when the process is still there
 * then, SIGKILL and reap (up to 5 s more). Returns 1 when it exited of its
 * own after sig (status set), 0 when it had to be killed, -1 on error. */
static inline int kvt_kill(pid_t pid, int sig, int timeout_ms, int *status)
{
    if (pid <= 0)
        return -1;
    if (kill(pid, sig) != 0 && errno != ESRCH)
        return -1;
    int r = kvt_wait_pid(pid, timeout_ms, status);
    if (r != 0)
        return r;
    kill(pid, SIGKILL);
    kvt_wait_pid(pid, 5000, status);
    return 0;
}

/* True while pid runs (not exited; an exit is reaped and forgotten). */
static inline bool kvt_alive(pid_t pid)
{
    int st;
    if (pid <= 0)
        return false;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid || (r < 0 && errno == ECHILD)) {
        kvt_forget(pid);
        return false;
    }
    return kill(pid, 0) == 0;
}

/* Starts argv[0] (a path or a name on PATH) with stdin from /dev/null and
 * stdout and stderr appended to log_path (NULL: inherited). Returns the
 * pid, recorded for the atexit handler, or -1. */
static inline pid_t kvt_spawn(char *const argv[], const char *log_path)
{
    fflush(NULL);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        /* dies with the test, even one killed or aborted before atexit */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(125);
        int in = open("/dev/null", O_RDONLY);
        if (in >= 0) {
            dup2(in, 0);
            close(in);
        }
        if (log_path != NULL) {
            int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
            if (fd < 0)
                _exit(126);
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execvp(argv[0], argv);
        fprintf(stderr, "kv_test_util: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    if (!kvt_track(pid)) {
        kill(pid, SIGKILL);
        kvt_wait_pid(pid, 5000, NULL);
        return -1;
    }
    return pid;
}

/* A TCP port in 20000..31999 that host (IPv4, NULL: 127.0.0.1) could
 * bind just now, starting from a candidate chosen from the pid and salt;
 * -1 if none of 200 candidates is free. */
static inline int kvt_free_port(const char *host, unsigned salt)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    if (inet_pton(AF_INET, host ? host : "127.0.0.1", &sa.sin_addr) != 1)
        return -1;
    unsigned start = ((unsigned)getpid() * 7919u + salt * 104729u) % 12000u;
    for (unsigned i = 0; i < 200; i++) {
        int port = 20000 + (int)((start + i * 61u) % 12000u);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            return -1;
        sa.sin_port = htons((uint16_t)port);
        int ok = bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
        close(fd);
        if (ok)
            return port;
    }
    return -1;
}

/* The directory of the tandem binaries. */
static inline const char *kvt_bin_dir(void)
{
    const char *d = getenv("TANDEM_BIN_DIR");
    return d != NULL && d[0] != '\0' ? d : "build/bin";
}

/* Size of a file, or -1. */
static inline long kvt_file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

/* True when the file has a line, at or after byte offset from, that
 * contains needle. */
static inline bool kvt_log_find(const char *path, long from, const char *needle)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    if (from > 0 && fseek(f, from, SEEK_SET) != 0) {
        fclose(f);
        return false;
    }
    char line[4096];
    bool found = false;
    while (!found && fgets(line, sizeof(line), f) != NULL)
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* Waits up to timeout_ms for such a line; false on timeout, or at once
 * when pid (> 0) exits first. */
static inline bool kvt_log_wait(const char *path, long from, const char *needle, pid_t pid,
                                int timeout_ms)
{
    int64_t end = kvt_now_ms() + timeout_ms;
    for (;;) {
        if (kvt_log_find(path, from, needle))
            return true;
        if (pid > 0 && !kvt_alive(pid))
            return kvt_log_find(path, from, needle);
        if (kvt_now_ms() >= end)
            return false;
        kvt_sleep_ms(10);
    }
}

/* Prints the last lines of a log to stderr (for failure messages). */
static inline void kvt_log_dump(const char *path, int max_lines)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    char ring[40][512];
    int n = 0;
    if (max_lines > 40)
        max_lines = 40;
    while (fgets(ring[n % 40], sizeof(ring[0]), f) != NULL)
        n++;
    fclose(f);
    int first = n > max_lines ? n - max_lines : 0;
    fprintf(stderr, "--- last lines of %s\n", path);
    for (int i = first; i < n; i++)
        fputs(ring[i % 40], stderr);
    fprintf(stderr, "---\n");
}

/* One tandem-kvstore process. */
typedef struct kvt_store {
    pid_t pid;          /* 0 once stopped */
    int port;           /* UCX listener */
    char addr[96];      /* "host:port", for tdm_kvc_config_t.stores */
    char log_path[256]; /* its stdout and stderr */
} kvt_store_t;

/* Starts `[prefix...] tandem-kvstore --listen host:port --metrics-port 0
 * --capacity 256MiB [--cluster-token token | --insecure] [extra...]`
 * (extra: NULL-terminated, may be NULL; a later --capacity overrides),
 * with prefix a NULL-terminated command that execs its arguments, such as
 * {"ip", "netns", "exec", "ns1", NULL} (may be NULL), and waits up to
 * timeout_ms for its "listening on" log line. port 0 picks one with
 * kvt_free_port() (host must then be bindable here) and tries another one
 * when the store cannot listen. Returns 0, or -1 with the store stopped
 * (its log stays for the failure message). */
static inline int kvt_store_start_in(kvt_store_t *st, const char *const *prefix, const char *host,
                                     int port, const char *token, const char *const *extra,
                                     int timeout_ms)
{
    memset(st, 0, sizeof(*st));
    snprintf(st->log_path, sizeof(st->log_path), "/tmp/tandem-kvstore-test-%d-XXXXXX",
             (int)getpid());
    int fd = mkstemp(st->log_path);
    if (fd < 0)
        return -1;
    close(fd);
    char bin[1024], listen[128];
    snprintf(bin, sizeof(bin), "%s/tandem-kvstore", kvt_bin_dir());
    for (unsigned attempt = 0; attempt < 4; attempt++) {
        int p = port > 0 ? port : kvt_free_port(host, attempt);
        if (p < 0)
            return -1;
        snprintf(listen, sizeof(listen), "%s:%d", host, p);
        const char *argv[64];
        int n = 0;
        for (int i = 0; prefix != NULL && prefix[i] != NULL && n < 16; i++)
            argv[n++] = prefix[i];
        argv[n++] = bin;
        argv[n++] = "--listen";
        argv[n++] = listen;
        argv[n++] = "--metrics-port";
        argv[n++] = "0";
        argv[n++] = "--capacity";
        argv[n++] = "256MiB";
        if (token != NULL && token[0] != '\0') {
            argv[n++] = "--cluster-token";
            argv[n++] = token;
        } else {
            argv[n++] = "--insecure";
        }
        for (int i = 0; extra != NULL && extra[i] != NULL && n < 62; i++)
            argv[n++] = extra[i];
        argv[n] = NULL;
        long from = kvt_file_size(st->log_path);
        pid_t pid = kvt_spawn((char *const *)argv, st->log_path);
        if (pid < 0)
            return -1;
        if (kvt_log_wait(st->log_path, from, "listening on", pid, timeout_ms) && kvt_alive(pid)) {
            st->pid = pid;
            st->port = p;
            snprintf(st->addr, sizeof(st->addr), "%s:%d", host, p);
            return 0;
        }
        kvt_kill(pid, SIGKILL, 5000, NULL);
        /* another process took the port: try the next one */
        if (port > 0 || !kvt_log_find(st->log_path, from, "cannot listen"))
            return -1;
    }
    return -1;
}

static inline int kvt_store_start(kvt_store_t *st, const char *host, const char *token,
                                  const char *const *extra, int timeout_ms)
{
    return kvt_store_start_in(st, NULL, host, 0, token, extra, timeout_ms);
}

/* Connects a client to addr with token, waits until it is authenticated
 * (the store accepts clients), and closes it. Retries until timeout_ms
 * passes. Makes UCX objects in this process: in a test that forks after
 * this, the child must not use them. */
static inline tdm_status_t kvt_wait_client(const char *addr, const char *token, int timeout_ms)
{
    const char *stores[1] = {addr};
    tdm_kvc_config_t cfg = {
        .stores = stores,
        .n_stores = 1,
        .token = token,
        .deadline_ms = timeout_ms,
        .backoff_min_ms = 20,
        .backoff_max_ms = 200,
        .name = "kv_test_util",
    };
    tdm_kvc_t *kvc;
    tdm_status_t s = tdm_kvc_create(&cfg, &kvc);
    if (s != TDM_OK)
        return s;
    s = tdm_kvc_wait_ready(kvc, timeout_ms);
    tdm_kvc_destroy(kvc);
    return s;
}

/* Stops the store: sig (SIGTERM drains, SIGKILL does not), reaped within
 * timeout_ms, else SIGKILL. Returns what kvt_kill() returns; *status (may
 * be NULL) gets the wait status. */
static inline int kvt_store_stop(kvt_store_t *st, int sig, int timeout_ms, int *status)
{
    if (st->pid <= 0)
        return -1;
    int r = kvt_kill(st->pid, sig, timeout_ms, status);
    st->pid = 0;
    return r;
}

/* Stops the store if it still runs (SIGKILL) and removes its log unless
 * TANDEM_KEEP_LOGS is set. */
static inline void kvt_store_free(kvt_store_t *st)
{
    if (st->pid > 0)
        kvt_store_stop(st, SIGKILL, 5000, NULL);
    if (st->log_path[0] != '\0' && getenv("TANDEM_KEEP_LOGS") == NULL)
        unlink(st->log_path);
}

#endif
