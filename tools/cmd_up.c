/* tandem up / status / down: a local cluster on loopback; tandem drain: a
 * node of any cluster, or of the local one by name.
 *
 * `up` checks what it can (flags, model, binaries, ports), writes the
 * cluster token and starts a supervisor: this same binary as
 * `tandem __up-supervisor` (hidden), in its own session, holding RUN/lock
 * for as long as it lives. The supervisor starts every role as its child
 * (its own process group in the supervisor's session, stdin from
 * /dev/null, stdout and stderr to RUN/NAME.log) in the order the roles
 * need each other: stores, router, nodes, printing progress on the
 * stderr of `up`, which waits for its report (one byte on a pipe). Once
 * all are ready it moves its own output to RUN/supervisor.log and stays:
 * a role that dies (a signal, or an exit status other than 0) is started
 * again with the same command line, so the same ports and token, after a
 * backoff (1 s doubling to 30 s; back to 1 s after it stayed up 60 s),
 * its log appended with a marker line. After UP_MAX_QUICK failures in a
 * row within UP_QUICK_S of their start it gives up on that role (state
 * "failed", with the reason). An exit with status 0 (a drain, SIGTERM) is
 * not restarted (state "stopped").
 *
 * Each process is recorded in RUN/cluster.json, rewritten atomically (tmp
 * + rename) by the supervisor right after every start, restart or death,
 * so `down` can always find what is running. `down` stops the supervisor
 * first (SIGTERM: it exits at once and restarts nothing more; SIGKILL if
 * it does not), then the roles, nodes to stores, then anything still
 * alive in the supervisor's session; so it works the same whether the
 * supervisor is alive, was killed, or is still starting the cluster. The
 * cluster token is random (getrandom), kept in RUN/token (0600) and handed
 * to the supervisor and the roles by environment, never on a command line.
 *
 * cluster.json (written and read only here):
 *   {"version": 1, "state": "starting" | "up", "run_dir": "...",
 *    "openai_url": "...", "grpc": "HOST:PORT",
 *    "supervisor_pid": N, "supervisor_start": N,
 *    "processes": [{"role", "name", "pid", "proc_start", "address",
 *                   "internal", "health_url", "ready_url", "metrics_url",
 *                   "log", "start_time", "state", "restarts", "last_exit",
 *                   "last_exit_time", "next_start", "error"}, ...]}
 * proc_start is field 22 of /proc/PID/stat (clock ticks since boot): a pid
 * whose start differs is a recycled one and is never signalled. state is
 * running, restarting (next_start: unix seconds of the next attempt),
 * failed (error says why) or stopped. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "httpc.h"
#include "tool.h"

#define UP_MAX_STORES  8
#define UP_MAX_NODES   16 /* per role */
#define UP_MAX_PROCS   (UP_MAX_STORES + 1 + 2 * UP_MAX_NODES)
#define UP_HOST        "127.0.0.1"
#define UP_LOG_TAIL    20 /* lines of a failed role's log shown */
#define UP_TOKEN_BYTES 32
#define UP_MAX_ARGS    24
#define UP_ARGBUF      (PATH_MAX + 1024)

/* Restarts. */
#define UP_BACKOFF_MIN_S 1  /* first restart after this */
#define UP_BACKOFF_MAX_S 30 /* doubling up to this */
#define UP_STABLE_S      60 /* up this long: the backoff starts again at the minimum */
#define UP_QUICK_S       10 /* died within this of its start: a quick failure */
#define UP_MAX_QUICK     5  /* quick failures in a row before giving up on a role */
#define UP_SUP_STOP_S    10 /* down: how long the supervisor gets to exit on SIGTERM */

typedef struct up_proc {
    char role[16]; /* kvstore, router, prefill, decode */
    char name[32]; /* ROLE-I */
    long long pid;
    unsigned long long proc_start; /* /proc/PID/stat field 22, 0 if unknown */
    char address[64];              /* what it serves (router: the HTTP API) */
    char internal[64];             /* router: where nodes register; else "" */
    char health_url[128];
    char ready_url[128];
    char metrics_url[128];
    char log[PATH_MAX + 64];
    long long start_time; /* unix seconds */
    /* Restarts, recorded by the supervisor. */
    char state[16]; /* running, restarting, failed, stopped */
    long long restarts;
    char last_exit[128]; /* how the last process ended, "" if none did */
    long long last_exit_time;
    long long next_start;       /* restarting: unix seconds of the next attempt */
    char error[PATH_MAX + 512]; /* failed: why it was given up */
    /* Not recorded: the supervisor's own. */
    bool exited;
    int wait_status;
    char bin[PATH_MAX];
    char argbuf[UP_ARGBUF];
    char *argv[UP_MAX_ARGS + 1]; /* into argbuf */
    double started_at;           /* tool_now() at the last start */
    int fails;                   /* failures since it last stayed up UP_STABLE_S */
    int quick;                   /* quick failures in a row */
    double next_try;             /* restarting: tool_now() of the next attempt */
} up_proc_t;

typedef struct up_cluster {
    char state[16];
    char run_dir[PATH_MAX];
    char openai_url[128];
    char grpc[64];
    long long supervisor_pid; /* 0: none recorded */
    unsigned long long supervisor_start;
    size_t n;
    up_proc_t procs[UP_MAX_PROCS];
} up_cluster_t;

/* ---- paths and small helpers ---------------------------------------- */

static void default_run_dir(char *buf, size_t cap)
{
    const char *home = getenv("TANDEM_HOME");
    if (home != NULL && home[0] != '\0') {
        snprintf(buf, cap, "%s/cluster", home);
        return;
    }
    const char *h = getenv("HOME");
    snprintf(buf, cap, "%s/.cache/tandem/cluster", h ? h : ".");
}

/* The directory of the role binaries: $TANDEM_BIN_DIR, else the one this
 * executable lives in. */
static bool bin_dir(char *buf, size_t cap)
{
    const char *env = getenv("TANDEM_BIN_DIR");
    if (env != NULL && env[0] != '\0') {
        snprintf(buf, cap, "%s", env);
        return true;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0) {
        fprintf(stderr, "tandem: cannot read /proc/self/exe (%s); set TANDEM_BIN_DIR\n",
                strerror(errno));
        return false;
    }
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash != NULL)
        *slash = '\0';
    snprintf(buf, cap, "%s", exe);
    return true;
}

static int mkdir_p(const char *path)
{
    char tmp[PATH_MAX];
    size_t len = (size_t)snprintf(tmp, sizeof(tmp), "%s", path);
    if (len >= sizeof(tmp)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (char *p = tmp + 1; *p != '\0'; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (mkdir(tmp, 0700) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static volatile sig_atomic_t g_interrupted;

static void on_interrupt(int sig)
{
    (void)sig;
    g_interrupted = 1;
}

/* ---- processes ------------------------------------------------------ */

/* State letter, session and start time of pid from /proc; false if there
 * is none. session may be NULL. */
static bool proc_stat_ex(long long pid, char *state, long long *session, unsigned long long *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%lld/stat", pid);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return false;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* "pid (comm) S ppid pgrp session ...": comm may hold anything, so
     * split after the last ')'. Field 3 is the state, 6 the session, 22
     * the start time. */
    char *p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ')
        return false;
    p += 2;
    *state = *p;
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (p == NULL)
            return false;
        p++;
        if (field + 1 == 6 && session != NULL)
            *session = strtoll(p, NULL, 10);
    }
    *start = strtoull(p, NULL, 10);
    return true;
}

static bool proc_stat(long long pid, char *state, unsigned long long *start)
{
    return proc_stat_ex(pid, state, NULL, start);
}

/* Alive: pid exists, is not a zombie, and started at start (0: unknown,
 * not checked). */
static bool pid_alive(long long pid, unsigned long long start)
{
    char state;
    unsigned long long now_start;
    if (pid <= 1 || !proc_stat(pid, &state, &now_start))
        return false;
    if (state == 'Z' || state == 'X' || state == 'x')
        return false;
    return start == 0 || start == now_start;
}

/* Alive: the pid exists, is not a zombie, and is the process recorded. */
static bool proc_alive(const up_proc_t *p)
{
    return pid_alive(p->pid, p->proc_start);
}

static bool supervisor_alive(const up_cluster_t *c)
{
    return c->supervisor_pid > 1 && c->supervisor_pid != (long long)getpid() &&
           pid_alive(c->supervisor_pid, c->supervisor_start);
}

/* Reaps p if it is a child of ours that ended; true if it has ended. */
static bool proc_reap(up_proc_t *p)
{
    if (p->exited)
        return true;
    int st;
    pid_t r = waitpid((pid_t)p->pid, &st, WNOHANG);
    if (r == (pid_t)p->pid) {
        p->exited = true;
        p->wait_status = st;
        return true;
    }
    return false;
}

/* How a wait status ended a process, short: "exit status 3", "signal 9
 * (Killed)". */
static void exit_cause(int wait_status, char *buf, size_t cap)
{
    if (WIFEXITED(wait_status))
        snprintf(buf, cap, "exit status %d", WEXITSTATUS(wait_status));
    else if (WIFSIGNALED(wait_status))
        snprintf(buf, cap, "signal %d (%s)%s", WTERMSIG(wait_status),
                 strsignal(WTERMSIG(wait_status)), WCOREDUMP(wait_status) ? ", core dumped" : "");
    else
        snprintf(buf, cap, "wait status 0x%x", (unsigned)wait_status);
}

static void describe_exit(const up_proc_t *p, char *buf, size_t cap)
{
    if (!p->exited)
        snprintf(buf, cap, "is gone");
    else if (WIFEXITED(p->wait_status))
        snprintf(buf, cap, "exited with status %d", WEXITSTATUS(p->wait_status));
    else if (WIFSIGNALED(p->wait_status))
        snprintf(buf, cap, "was killed by signal %d (%s)", WTERMSIG(p->wait_status),
                 strsignal(WTERMSIG(p->wait_status)));
    else
        snprintf(buf, cap, "ended");
}

/* Prints the last lines of a log file, indented. */
static void print_log_tail(const char *path, int lines)
{
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        fprintf(stderr, "  (cannot read %s: %s)\n", path, strerror(errno));
        return;
    }
    char buf[8192];
    long off = 0;
    if (fseek(f, 0, SEEK_END) == 0) {
        long size = ftell(f);
        off = size > (long)sizeof(buf) - 1 ? size - (long)sizeof(buf) + 1 : 0;
    }
    fseek(f, off, SEEK_SET);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    while (n > 0 && buf[n - 1] == '\n')
        buf[--n] = '\0';
    size_t start = n;
    int seen = 0;
    while (start > 0) {
        if (buf[start - 1] == '\n' && ++seen == lines)
            break;
        start--;
    }
    fprintf(stderr, "  --- last lines of %s ---\n", path);
    if (n == 0) {
        fprintf(stderr, "  (empty)\n");
        return;
    }
    for (char *line = buf + start; line != NULL;) {
        char *nl = strchr(line, '\n');
        if (nl != NULL)
            *nl = '\0';
        fprintf(stderr, "  | %s\n", line);
        line = nl != NULL ? nl + 1 : NULL;
    }
}

/* Starts bin with argv as a child in its own process group (in our
 * session), stdin from /dev/null, stdout+stderr to log_path (truncated,
 * or appended to when append). A failed exec is reported through a
 * close-on-exec pipe, so the caller knows at once; why into why. */
static bool spawn(const char *bin, char *const argv[], const char *log_path, bool append,
                  long long *pid_out, char *why, size_t why_cap)
{
    int log_fd =
        open(log_path, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0644);
    if (log_fd < 0) {
        snprintf(why, why_cap, "cannot open %s: %s", log_path, strerror(errno));
        return false;
    }
    int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    int pipe_fd[2];
    if (null_fd < 0 || pipe2(pipe_fd, O_CLOEXEC) != 0) {
        snprintf(why, why_cap, "cannot set up %s: %s", bin, strerror(errno));
        close(log_fd);
        if (null_fd >= 0)
            close(null_fd);
        return false;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        /* Its own group, so `down` can kill what it forks with it; our
         * session, so `down` finds it even if it was never recorded. */
        setpgid(0, 0);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        dup2(null_fd, STDIN_FILENO);
        dup2(log_fd, STDOUT_FILENO);
        dup2(log_fd, STDERR_FILENO);
        execv(bin, argv);
        int e = errno;
        ssize_t w = write(pipe_fd[1], &e, sizeof(e));
        (void)w;
        _exit(127);
    }
    int fork_errno = errno;
    close(pipe_fd[1]);
    close(log_fd);
    close(null_fd);
    if (pid < 0) {
        close(pipe_fd[0]);
        snprintf(why, why_cap, "cannot fork for %s: %s", bin, strerror(fork_errno));
        return false;
    }
    int child_errno = 0;
    ssize_t r;
    do
        r = read(pipe_fd[0], &child_errno, sizeof(child_errno));
    while (r < 0 && errno == EINTR);
    close(pipe_fd[0]);
    if (r > 0) {
        waitpid(pid, NULL, 0);
        snprintf(why, why_cap, "cannot run %s: %s", bin, strerror(child_errno));
        return false;
    }
    *pid_out = pid;
    return true;
}

/* True if HOST:port can be bound now (as a server with SO_REUSEADDR
 * would); else why not in why. */
static bool port_free(int port, char *why, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, cap, "socket: %s", strerror(errno));
        return false;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bool ok = bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
    if (!ok)
        snprintf(why, cap, "%s", strerror(errno));
    close(fd);
    return ok;
}

/* ---- HTTP checks ---------------------------------------------------- */

/* "http://HOST:PORT/PATH" into its parts. */
static bool url_split(const char *url, char *host, size_t host_cap, int *port, const char **path)
{
    const char *p = url;
    if (strncmp(p, "http://", 7) != 0)
        return false;
    p += 7;
    const char *colon = strchr(p, ':');
    if (colon == NULL || (size_t)(colon - p) >= host_cap || colon == p)
        return false;
    memcpy(host, p, (size_t)(colon - p));
    host[colon - p] = '\0';
    char *end;
    long v = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || v < 1 || v > 65535 || *end != '/')
        return false;
    *port = (int)v;
    *path = end;
    return true;
}

/* GET url; the HTTP status (0 when none came). */
static int http_get_status(const char *url, int timeout_ms)
{
    char host[64];
    int port;
    const char *path;
    if (!url_split(url, host, sizeof(host), &port, &path))
        return 0;
    httpc_response_t resp;
    memset(&resp, 0, sizeof(resp));
    char err[256];
    int rc = httpc_request(host, port, "GET", path, NULL, NULL, 0, timeout_ms, NULL, NULL, &resp,
                           err, sizeof(err));
    int status = rc == 0 ? resp.status : 0;
    httpc_response_free(&resp);
    return status;
}

/* ---- cluster.json: writing ------------------------------------------ */

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p == '\n')
            fputs("\\n", f);
        else if (*p < 0x20)
            fprintf(f, "\\u%04x", *p);
        else
            fputc(*p, f);
    }
    fputc('"', f);
}

static void path_in(const up_cluster_t *c, const char *file, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s/%s", c->run_dir, file);
}

/* Writes RUN/cluster.json through a temporary file and rename, so a reader
 * never sees half a file. */
static bool cluster_save(const up_cluster_t *c)
{
    char path[PATH_MAX + 32], tmp[PATH_MAX + 32];
    path_in(c, "cluster.json", path, sizeof(path));
    path_in(c, "cluster.json.tmp", tmp, sizeof(tmp));
    FILE *f = fopen(tmp, "we");
    if (f == NULL) {
        fprintf(stderr, "tandem: cannot write %s: %s\n", tmp, strerror(errno));
        return false;
    }
    fprintf(f, "{\n  \"version\": 1,\n  \"state\": ");
    json_str(f, c->state);
    fprintf(f, ",\n  \"run_dir\": ");
    json_str(f, c->run_dir);
    fprintf(f, ",\n  \"openai_url\": ");
    json_str(f, c->openai_url);
    fprintf(f, ",\n  \"grpc\": ");
    json_str(f, c->grpc);
    fprintf(f, ",\n  \"supervisor_pid\": %lld, \"supervisor_start\": %llu", c->supervisor_pid,
            c->supervisor_start);
    fprintf(f, ",\n  \"processes\": [");
    for (size_t i = 0; i < c->n; i++) {
        const up_proc_t *p = &c->procs[i];
        fprintf(f, "%s\n    {\"role\": ", i ? "," : "");
        json_str(f, p->role);
        fprintf(f, ", \"name\": ");
        json_str(f, p->name);
        fprintf(f, ", \"pid\": %lld, \"proc_start\": %llu, \"address\": ", p->pid, p->proc_start);
        json_str(f, p->address);
        fprintf(f, ", \"internal\": ");
        json_str(f, p->internal);
        fprintf(f, ",\n     \"health_url\": ");
        json_str(f, p->health_url);
        fprintf(f, ", \"ready_url\": ");
        json_str(f, p->ready_url);
        fprintf(f, ", \"metrics_url\": ");
        json_str(f, p->metrics_url);
        fprintf(f, ",\n     \"log\": ");
        json_str(f, p->log);
        fprintf(f, ", \"start_time\": %lld,\n     \"state\": ", p->start_time);
        json_str(f, p->state);
        fprintf(f, ", \"restarts\": %lld, \"last_exit\": ", p->restarts);
        json_str(f, p->last_exit);
        fprintf(f,
                ", \"last_exit_time\": %lld, \"next_start\": %lld, \"error\": ", p->last_exit_time,
                p->next_start);
        json_str(f, p->error);
        fprintf(f, "}");
    }
    fprintf(f, "\n  ]\n}\n");
    bool ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        fprintf(stderr, "tandem: cannot write %s: %s\n", path, strerror(errno));
        unlink(tmp);
        return false;
    }
    return true;
}

/* ---- cluster.json: reading (only the shapes cluster_save writes, but
 * any valid JSON is walked safely; unknown keys are skipped) ----------- */

typedef struct jp {
    const char *s;
    size_t i, n;
} jp_t;

static void jp_ws(jp_t *p)
{
    while (p->i < p->n && strchr(" \t\r\n", p->s[p->i]) != NULL && p->s[p->i] != '\0')
        p->i++;
}

static bool jp_eat(jp_t *p, char ch)
{
    jp_ws(p);
    if (p->i < p->n && p->s[p->i] == ch) {
        p->i++;
        return true;
    }
    return false;
}

/* A string into out (NULL: skip it); fails when it does not fit. */
static bool jp_string(jp_t *p, char *out, size_t cap)
{
    if (!jp_eat(p, '"'))
        return false;
    size_t o = 0;
    while (p->i < p->n) {
        char ch = p->s[p->i++];
        if (ch == '"') {
            if (out != NULL)
                out[o] = '\0';
            return true;
        }
        if ((unsigned char)ch < 0x20)
            return false;
        if (ch == '\\') {
            if (p->i >= p->n)
                return false;
            char e = p->s[p->i++];
            switch (e) {
            case 'n': ch = '\n'; break;
            case 't': ch = '\t'; break;
            case 'r': ch = '\r'; break;
            case 'b': ch = '\b'; break;
            case 'f': ch = '\f'; break;
            case '"':
            case '\\':
            case '/': ch = e; break;
            case 'u': {
                if (p->n - p->i < 4)
                    return false;
                unsigned v = 0;
                for (int k = 0; k < 4; k++) {
                    char h = p->s[p->i++];
                    v <<= 4;
                    if (h >= '0' && h <= '9')
                        v |= (unsigned)(h - '0');
                    else if (h >= 'a' && h <= 'f')
                        v |= (unsigned)(h - 'a' + 10);
                    else if (h >= 'A' && h <= 'F')
                        v |= (unsigned)(h - 'A' + 10);
                    else
                        return false;
                }
                ch = v < 0x80 && v != 0 ? (char)v : '?';
                break;
            }
            default: return false;
            }
        }
        if (out != NULL) {
            if (o + 1 >= cap)
                return false;
            out[o++] = ch;
        }
    }
    return false;
}

static bool jp_int(jp_t *p, long long *out)
{
    jp_ws(p);
    const char *start = p->s + p->i;
    char *end;
    errno = 0;
    long long v = strtoll(start, &end, 10);
    if (end == start || errno != 0 || (size_t)(end - p->s) > p->n)
        return false;
    p->i = (size_t)(end - p->s);
    /* A fraction or exponent is not expected; skip one if present. */
    while (p->i < p->n && strchr(".eE+-0123456789", p->s[p->i]) != NULL && p->s[p->i] != '\0')
        p->i++;
    *out = v;
    return true;
}

static bool jp_skip(jp_t *p, int depth);

typedef bool (*jp_member_fn)(jp_t *p, const char *key, void *user);

/* An object: calls fn for each member, which must consume the value. */
static bool jp_object(jp_t *p, jp_member_fn fn, void *user)
{
    if (!jp_eat(p, '{'))
        return false;
    if (jp_eat(p, '}'))
        return true;
    for (;;) {
        char key[64];
        if (!jp_string(p, key, sizeof(key)) || !jp_eat(p, ':') || !fn(p, key, user))
            return false;
        if (jp_eat(p, '}'))
            return true;
        if (!jp_eat(p, ','))
            return false;
    }
}

static bool jp_skip_member(jp_t *p, const char *key, void *user)
{
    (void)key;
    (void)user;
    return jp_skip(p, 1);
}

static bool jp_skip(jp_t *p, int depth)
{
    if (depth > 32)
        return false;
    jp_ws(p);
    if (p->i >= p->n)
        return false;
    char ch = p->s[p->i];
    if (ch == '"')
        return jp_string(p, NULL, 0);
    if (ch == '{')
        return jp_object(p, jp_skip_member, NULL);
    if (ch == '[') {
        p->i++;
        if (jp_eat(p, ']'))
            return true;
        do {
            if (!jp_skip(p, depth + 1))
                return false;
        } while (jp_eat(p, ','));
        return jp_eat(p, ']');
    }
    static const char *const words[] = {"true", "false", "null"};
    for (size_t w = 0; w < 3; w++) {
        size_t len = strlen(words[w]);
        if (p->n - p->i >= len && strncmp(p->s + p->i, words[w], len) == 0) {
            p->i += len;
            return true;
        }
    }
    long long v;
    return jp_int(p, &v);
}

static bool proc_member(jp_t *p, const char *key, void *user)
{
    up_proc_t *pr = user;
    static const struct {
        const char *key;
        size_t off, cap;
    } strs[] = {
        {"role", offsetof(up_proc_t, role), sizeof(pr->role)},
        {"name", offsetof(up_proc_t, name), sizeof(pr->name)},
        {"address", offsetof(up_proc_t, address), sizeof(pr->address)},
        {"internal", offsetof(up_proc_t, internal), sizeof(pr->internal)},
        {"health_url", offsetof(up_proc_t, health_url), sizeof(pr->health_url)},
        {"ready_url", offsetof(up_proc_t, ready_url), sizeof(pr->ready_url)},
        {"metrics_url", offsetof(up_proc_t, metrics_url), sizeof(pr->metrics_url)},
        {"log", offsetof(up_proc_t, log), sizeof(pr->log)},
        {"state", offsetof(up_proc_t, state), sizeof(pr->state)},
        {"last_exit", offsetof(up_proc_t, last_exit), sizeof(pr->last_exit)},
        {"error", offsetof(up_proc_t, error), sizeof(pr->error)},
    };
    for (size_t k = 0; k < sizeof(strs) / sizeof(strs[0]); k++)
        if (strcmp(key, strs[k].key) == 0)
            return jp_string(p, (char *)pr + strs[k].off, strs[k].cap);
    long long v;
    if (strcmp(key, "pid") == 0)
        return jp_int(p, &pr->pid);
    if (strcmp(key, "start_time") == 0)
        return jp_int(p, &pr->start_time);
    if (strcmp(key, "restarts") == 0)
        return jp_int(p, &pr->restarts);
    if (strcmp(key, "last_exit_time") == 0)
        return jp_int(p, &pr->last_exit_time);
    if (strcmp(key, "next_start") == 0)
        return jp_int(p, &pr->next_start);
    if (strcmp(key, "proc_start") == 0) {
        if (!jp_int(p, &v) || v < 0)
            return false;
        pr->proc_start = (unsigned long long)v;
        return true;
    }
    return jp_skip(p, 1);
}

static bool cluster_member(jp_t *p, const char *key, void *user)
{
    up_cluster_t *c = user;
    if (strcmp(key, "state") == 0)
        return jp_string(p, c->state, sizeof(c->state));
    if (strcmp(key, "run_dir") == 0)
        return jp_string(p, c->run_dir, sizeof(c->run_dir));
    if (strcmp(key, "openai_url") == 0)
        return jp_string(p, c->openai_url, sizeof(c->openai_url));
    if (strcmp(key, "grpc") == 0)
        return jp_string(p, c->grpc, sizeof(c->grpc));
    if (strcmp(key, "supervisor_pid") == 0)
        return jp_int(p, &c->supervisor_pid);
    if (strcmp(key, "supervisor_start") == 0) {
        long long v;
        if (!jp_int(p, &v) || v < 0)
            return false;
        c->supervisor_start = (unsigned long long)v;
        return true;
    }
    if (strcmp(key, "processes") != 0)
        return jp_skip(p, 1);
    if (!jp_eat(p, '['))
        return false;
    if (jp_eat(p, ']'))
        return true;
    do {
        if (c->n >= UP_MAX_PROCS)
            return false;
        up_proc_t *pr = &c->procs[c->n];
        memset(pr, 0, sizeof(*pr));
        if (!jp_object(p, proc_member, pr))
            return false;
        /* Never let a damaged record make us signal pid 0, 1, -1 or us. */
        if (pr->pid <= 1 || pr->pid > INT_MAX || pr->pid == (long long)getpid())
            return false;
        c->n++;
    } while (jp_eat(p, ','));
    return jp_eat(p, ']');
}

/* Loads RUN/cluster.json. 1: loaded, 0: none recorded, -1: unreadable
 * (printed). */
static int cluster_load(const char *run_dir, up_cluster_t *c)
{
    memset(c, 0, sizeof(*c));
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/cluster.json", run_dir);
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        if (errno == ENOENT)
            return 0;
        fprintf(stderr, "tandem: cannot read %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t len = 0;
    char *text = tool_read_all(f, &len);
    fclose(f);
    if (text == NULL) {
        fprintf(stderr, "tandem: cannot read %s: out of memory\n", path);
        return -1;
    }
    jp_t p = {text, 0, len};
    bool ok = jp_object(&p, cluster_member, c);
    jp_ws(&p);
    ok = ok && p.i == p.n;
    free(text);
    if (!ok) {
        fprintf(stderr,
                "tandem: %s is damaged; stop its processes by hand (see the *.log files "
                "there), then remove it\n",
                path);
        return -1;
    }
    /* A supervisor pid we would never signal is treated as none. */
    if (c->supervisor_pid <= 1 || c->supervisor_pid > INT_MAX ||
        c->supervisor_pid == (long long)getpid())
        c->supervisor_pid = 0;
    snprintf(c->run_dir, sizeof(c->run_dir), "%s", run_dir);
    return 1;
}

static void cluster_forget(const up_cluster_t *c)
{
    char path[PATH_MAX + 32];
    path_in(c, "cluster.json", path, sizeof(path));
    unlink(path);
    path_in(c, "token", path, sizeof(path));
    unlink(path);
}

/* ---- stopping ------------------------------------------------------- */

/* Nodes first (they drain towards the router), then the router, then the
 * stores the nodes were using. */
static int role_rank(const char *role)
{
    if (strcmp(role, "router") == 0)
        return 1;
    if (strcmp(role, "kvstore") == 0)
        return 2;
    return 0;
}

/* SIGTERM, rank by rank; SIGKILL whatever is left after timeout_s per
 * rank. Returns how many processes could not be stopped. */
static int cluster_stop(up_cluster_t *c, int timeout_s)
{
    int left = 0;
    for (int rank = 0; rank < 3; rank++) {
        size_t n_sent = 0;
        for (size_t i = 0; i < c->n; i++) {
            up_proc_t *p = &c->procs[i];
            if (role_rank(p->role) != rank || proc_reap(p) || !proc_alive(p))
                continue;
            fprintf(stderr, "stopping %s (pid %lld)\n", p->name, p->pid);
            if (kill((pid_t)p->pid, SIGTERM) == 0)
                n_sent++;
            else if (errno != ESRCH)
                fprintf(stderr, "tandem: cannot signal %s (pid %lld): %s\n", p->name, p->pid,
                        strerror(errno));
        }
        if (n_sent == 0)
            continue;
        double deadline = tool_now() + timeout_s;
        for (int pass = 0; pass < 2; pass++) {
            for (;;) {
                bool any = false;
                for (size_t i = 0; i < c->n; i++) {
                    up_proc_t *p = &c->procs[i];
                    if (role_rank(p->role) == rank && !proc_reap(p) && proc_alive(p))
                        any = true;
                }
                if (!any || tool_now() >= deadline)
                    break;
                sleep_ms(50);
            }
            if (pass == 1)
                break;
            /* Past the drain time: kill what is left, with its group. */
            bool killed = false;
            for (size_t i = 0; i < c->n; i++) {
                up_proc_t *p = &c->procs[i];
                if (role_rank(p->role) != rank || proc_reap(p) || !proc_alive(p))
                    continue;
                fprintf(stderr, "%s (pid %lld) did not exit within %d s; sending SIGKILL\n",
                        p->name, p->pid, timeout_s);
                kill(-(pid_t)p->pid, SIGKILL);
                kill((pid_t)p->pid, SIGKILL);
                killed = true;
            }
            if (!killed)
                break;
            deadline = tool_now() + 5;
        }
        for (size_t i = 0; i < c->n; i++) {
            up_proc_t *p = &c->procs[i];
            if (role_rank(p->role) == rank && !proc_reap(p) && proc_alive(p)) {
                fprintf(stderr, "tandem: %s (pid %lld) is still running\n", p->name, p->pid);
                left++;
            }
        }
    }
    return left;
}

/* Waits up to secs for the supervisor to be gone, or, when stopping is
 * set, to have recorded state "stopping" (it restarts nothing more). */
static bool wait_supervisor(const up_cluster_t *c, double secs, bool stopping)
{
    up_cluster_t *now = stopping ? calloc(1, sizeof(*now)) : NULL;
    double deadline = tool_now() + secs;
    bool done = false;
    while (!done) {
        done = !supervisor_alive(c);
        if (!done && now != NULL) {
            int r = cluster_load(c->run_dir, now);
            done = r == 0 || (r > 0 && strcmp(now->state, "stopping") == 0);
        }
        if (done || tool_now() >= deadline)
            break;
        sleep_ms(50);
    }
    free(now);
    return done;
}

/* SIGKILL to the supervisor; true when it is gone within 5 s. */
static bool kill_supervisor(const up_cluster_t *c, const char *why)
{
    fprintf(stderr, "the supervisor (pid %lld) %s; sending SIGKILL\n", c->supervisor_pid, why);
    kill((pid_t)c->supervisor_pid, SIGKILL);
    if (wait_supervisor(c, 5, false))
        return true;
    fprintf(stderr, "tandem: the supervisor (pid %lld) is still running\n", c->supervisor_pid);
    return false;
}

/* Tells the supervisor to restart nothing more (SIGTERM): it records
 * state "stopping" and then only reaps its roles as they exit, and exits
 * when none is left; while it is still starting the cluster, it stops
 * what it started and exits. SIGKILL when it does neither within
 * wait_s. True when it restarts nothing more. */
static bool stop_supervisor(const up_cluster_t *c, int wait_s)
{
    if (!supervisor_alive(c))
        return true;
    /* Told already (a second SIGTERM would make it exit at once, leaving
     * its roles to be reaped by no one). */
    if (strcmp(c->state, "stopping") == 0) {
        fprintf(stderr, "supervisor (pid %lld): already restarts nothing more\n",
                c->supervisor_pid);
        return true;
    }
    fprintf(stderr, "supervisor (pid %lld): told to restart nothing more\n", c->supervisor_pid);
    if (kill((pid_t)c->supervisor_pid, SIGTERM) != 0 && errno != ESRCH)
        fprintf(stderr, "tandem: cannot signal the supervisor (pid %lld): %s\n", c->supervisor_pid,
                strerror(errno));
    if (wait_supervisor(c, wait_s, true))
        return true;
    char why[64];
    snprintf(why, sizeof(why), "did not answer within %d s", wait_s);
    return kill_supervisor(c, why);
}

/* Kills whatever is still alive in the supervisor's session: a process a
 * role started, or a role started just before the supervisor was killed
 * and so never recorded. Returns how many are still alive after that. */
static int sweep_session(const up_cluster_t *c)
{
    long long sid = c->supervisor_pid;
    if (sid <= 1)
        return 0;
    char state;
    unsigned long long start;
    long long sess;
    /* Another process under the supervisor's pid: the number was recycled
     * and the session is someone else's. */
    if (proc_stat_ex(sid, &state, &sess, &start) && c->supervisor_start != 0 &&
        start != c->supervisor_start)
        return 0;
    long long found[256];
    size_t n = 0;
    DIR *d = opendir("/proc");
    if (d == NULL) {
        fprintf(stderr,
                "tandem: cannot list /proc (%s); processes of the cluster's session %lld "
                "were not looked for\n",
                strerror(errno), sid);
        return 0;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < sizeof(found) / sizeof(found[0])) {
        char *end;
        long long pid = strtoll(e->d_name, &end, 10);
        if (*end != '\0' || pid <= 1 || pid == sid || pid == (long long)getpid())
            continue;
        if (!proc_stat_ex(pid, &state, &sess, &start) || sess != sid || state == 'Z' ||
            state == 'X' || state == 'x' || start < c->supervisor_start)
            continue;
        found[n++] = pid;
    }
    closedir(d);
    for (size_t i = 0; i < n; i++) {
        fprintf(stderr, "pid %lld was left in the cluster's session; sending SIGKILL\n", found[i]);
        kill((pid_t)found[i], SIGKILL);
    }
    double deadline = tool_now() + 5;
    int left;
    for (;;) {
        left = 0;
        for (size_t i = 0; i < n; i++)
            if (pid_alive(found[i], 0))
                left++;
        if (left == 0 || tool_now() >= deadline)
            break;
        sleep_ms(50);
    }
    for (size_t i = 0; i < n; i++)
        if (pid_alive(found[i], 0))
            fprintf(stderr, "tandem: pid %lld is still running\n", found[i]);
    return left;
}

/* What `tandem down` does: the supervisor first, then the roles (nodes,
 * router, stores), then what is left in the supervisor's session; the
 * record is removed once nothing runs. Returns the exit status. */
static int down_cluster(const char *dir, int timeout_s)
{
    up_cluster_t *c = calloc(1, sizeof(*c));
    up_cluster_t *now = calloc(1, sizeof(*now));
    if (c == NULL || now == NULL) {
        fprintf(stderr, "tandem down: out of memory\n");
        free(c);
        free(now);
        return TOOL_EXIT_FAIL;
    }
    int rc = TOOL_EXIT_FAIL;
    int loaded = cluster_load(dir, c);
    if (loaded <= 0) {
        if (loaded == 0) {
            printf("no cluster recorded in %s; nothing to stop\n", dir);
            rc = TOOL_EXIT_OK;
        }
        goto out;
    }
    /* A supervisor still starting the cluster stops what it started
     * (10 s per group) before it exits. */
    bool starting = strcmp(c->state, "starting") == 0;
    int left = stop_supervisor(c, starting ? 60 : UP_SUP_STOP_S) ? 0 : 1;
    /* It may have restarted a role meanwhile, or, stopping a start,
     * stopped all and removed the record. */
    loaded = cluster_load(dir, now);
    if (loaded < 0)
        goto out;
    up_cluster_t *use = loaded > 0 ? now : c;
    left += cluster_stop(use, timeout_s);
    /* It exits once it has reaped its roles. */
    if (!wait_supervisor(use, UP_SUP_STOP_S, false) &&
        !kill_supervisor(use, "did not exit after its roles"))
        left++;
    left += sweep_session(use);
    if (left == 0) {
        cluster_forget(use);
        printf("cluster stopped (%zu processes); logs kept in %s\n", use->n, dir);
        rc = TOOL_EXIT_OK;
    } else {
        fprintf(stderr, "tandem down: %d processes could not be stopped; %s/cluster.json kept\n",
                left, dir);
    }
out:
    free(c);
    free(now);
    return rc;
}

/* ---- starting the roles ---------------------------------------------- */

typedef struct up_opts {
    int n_prefill, n_decode, n_kvstore;
    const char *run_dir;
    const char *model;
    int port, grpc_port, port_base;
    const char *api_key;
    uint64_t kv_capacity;
    int threads;
    int timeout_s;
} up_opts_t;

static up_proc_t *add_proc(up_cluster_t *c, const char *role, int index, const char *bin_dir_path)
{
    up_proc_t *p = &c->procs[c->n];
    memset(p, 0, sizeof(*p));
    snprintf(p->role, sizeof(p->role), "%s", role);
    char name[sizeof(p->name)];
    snprintf(name, sizeof(name), "%s-%d", role, index);
    memcpy(p->name, name, sizeof(name));
    snprintf(p->log, sizeof(p->log), "%s/%s.log", c->run_dir, name);
    snprintf(p->bin, sizeof(p->bin), "%s/tandem-%s", bin_dir_path, role);
    return p;
}

/* Keeps a copy of argv (NULL-terminated) in p, for restarts. */
static bool set_argv(up_proc_t *p, char *const argv[])
{
    size_t off = 0;
    int k = 0;
    for (; argv[k] != NULL; k++) {
        size_t len = strlen(argv[k]) + 1;
        if (k >= UP_MAX_ARGS || off + len > sizeof(p->argbuf))
            return false;
        memcpy(p->argbuf + off, argv[k], len);
        p->argv[k] = p->argbuf + off;
        off += len;
    }
    p->argv[k] = NULL;
    return true;
}

/* p has just been started as pid. */
static void note_start(up_proc_t *p)
{
    char state;
    if (!proc_stat(p->pid, &state, &p->proc_start))
        p->proc_start = 0;
    p->start_time = (long long)time(NULL);
    p->started_at = tool_now();
    p->exited = false;
    p->wait_status = 0;
    p->next_start = 0;
    snprintf(p->state, sizeof(p->state), "running");
}

/* Starts p (already filled in) and records it. */
static bool start_proc(up_cluster_t *c, up_proc_t *p, char *const argv[])
{
    if (!set_argv(p, argv)) {
        fprintf(stderr, "tandem up: the command line of %s is too long (model path?)\n", p->name);
        return false;
    }
    char why[PATH_MAX + 160];
    if (!spawn(p->bin, p->argv, p->log, false, &p->pid, why, sizeof(why))) {
        fprintf(stderr, "tandem up: %s: %s\n", p->name, why);
        return false;
    }
    note_start(p);
    c->n++;
    return cluster_save(c);
}

/* Any of our children that ended: the first one, or NULL. */
static up_proc_t *first_dead(up_cluster_t *c)
{
    for (size_t i = 0; i < c->n; i++)
        if (proc_reap(&c->procs[i]))
            return &c->procs[i];
    return NULL;
}

/* Polls url until it answers 200. Fails when a process of ours ends, on an
 * interrupt, or at the deadline; says why and shows the guilty log. */
static bool wait_for(up_cluster_t *c, up_proc_t *p, const char *url, const char *doing,
                     double deadline, double t0)
{
    fprintf(stderr, "waiting for %s (%s)...\n", p->name, doing);
    double next_note = tool_now() + 10;
    int last = 0;
    for (;;) {
        up_proc_t *dead = first_dead(c);
        if (dead != NULL) {
            char how[96];
            describe_exit(dead, how, sizeof(how));
            fprintf(stderr, "tandem up: %s %s while the cluster was starting\n", dead->name, how);
            print_log_tail(dead->log, UP_LOG_TAIL);
            return false;
        }
        if (g_interrupted) {
            fprintf(stderr, "tandem up: interrupted\n");
            return false;
        }
        double now = tool_now();
        if (now >= deadline) {
            char seen[32] = "no answer";
            if (last != 0)
                snprintf(seen, sizeof(seen), "last answer HTTP %d", last);
            fprintf(stderr,
                    "tandem up: %s not ready after %.0f s (%s: %s); raise --timeout if it is "
                    "just slow\n",
                    p->name, now - t0, url, seen);
            print_log_tail(p->log, UP_LOG_TAIL);
            return false;
        }
        int ms = (int)((deadline - now) * 1000);
        last = http_get_status(url, ms < 1000 ? (ms < 1 ? 1 : ms) : 1000);
        if (last == 200)
            return true;
        if (tool_now() >= next_note) {
            fprintf(stderr, "  still waiting for %s (%.0f s)\n", p->name, tool_now() - t0);
            next_note += 10;
        }
        sleep_ms(100);
    }
}

/* Every port the cluster needs, with what it is for; all checked before
 * anything starts. */
static bool check_ports(const up_opts_t *o)
{
    typedef struct {
        int port;
        char what[48];
    } use_t;
    use_t uses[UP_MAX_PROCS * 2 + 2];
    size_t n = 0;
    snprintf(uses[n].what, sizeof(uses[n].what), "router HTTP API, --port");
    uses[n++].port = o->port;
    if (o->grpc_port >= 0) {
        snprintf(uses[n].what, sizeof(uses[n].what), "router gRPC API, --grpc-port");
        uses[n++].port = o->grpc_port;
    }
    int next = o->port_base;
    snprintf(uses[n].what, sizeof(uses[n].what), "router internal listener");
    uses[n++].port = next++;
    for (int i = 0; i < o->n_kvstore; i++) {
        snprintf(uses[n].what, sizeof(uses[n].what), "kvstore-%d listener", i);
        uses[n++].port = next++;
        snprintf(uses[n].what, sizeof(uses[n].what), "kvstore-%d metrics", i);
        uses[n++].port = next++;
    }
    for (int i = 0; i < o->n_prefill; i++) {
        snprintf(uses[n].what, sizeof(uses[n].what), "prefill-%d metrics", i);
        uses[n++].port = next++;
    }
    for (int i = 0; i < o->n_decode; i++) {
        snprintf(uses[n].what, sizeof(uses[n].what), "decode-%d metrics", i);
        uses[n++].port = next++;
    }
    bool ok = true;
    for (size_t i = 0; i < n; i++) {
        char why[128];
        if (uses[i].port < 1 || uses[i].port > 65535) {
            fprintf(stderr, "tandem up: port %d (%s) is out of range; choose other ports\n",
                    uses[i].port, uses[i].what);
            ok = false;
            continue;
        }
        for (size_t j = 0; j < i; j++)
            if (uses[j].port == uses[i].port) {
                fprintf(stderr, "tandem up: port %d is wanted for both %s and %s\n", uses[i].port,
                        uses[j].what, uses[i].what);
                ok = false;
            }
        if (!port_free(uses[i].port, why, sizeof(why))) {
            fprintf(stderr, "tandem up: port %d (%s) is taken: %s\n", uses[i].port, uses[i].what,
                    why);
            ok = false;
        }
    }
    if (!ok)
        fprintf(stderr, "  stop what uses it, or choose --port, --grpc-port or --port-base "
                        "(internal ports are --port-base upward)\n");
    return ok;
}

static bool write_token(const up_cluster_t *c, char *hex, size_t hex_cap)
{
    unsigned char raw[UP_TOKEN_BYTES];
    size_t got = 0;
    while (got < sizeof(raw)) {
        ssize_t r = getrandom(raw + got, sizeof(raw) - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            fprintf(stderr, "tandem up: getrandom: %s\n", strerror(errno));
            return false;
        }
        got += (size_t)r;
    }
    if (hex_cap < 2 * sizeof(raw) + 1)
        return false;
    for (size_t i = 0; i < sizeof(raw); i++)
        snprintf(hex + 2 * i, 3, "%02x", raw[i]);
    char path[PATH_MAX + 32], tmp[PATH_MAX + 32];
    path_in(c, "token", path, sizeof(path));
    path_in(c, "token.tmp", tmp, sizeof(tmp));
    unlink(tmp);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    bool ok = fd >= 0;
    if (ok) {
        size_t len = strlen(hex);
        ok = fchmod(fd, 0600) == 0 && write(fd, hex, len) == (ssize_t)len &&
             write(fd, "\n", 1) == 1 && fsync(fd) == 0;
        ok = close(fd) == 0 && ok;
        ok = ok && rename(tmp, path) == 0;
    }
    if (!ok) {
        fprintf(stderr, "tandem up: cannot write %s: %s\n", path, strerror(errno));
        unlink(tmp);
    }
    return ok;
}

static int default_threads(int nodes)
{
    cpu_set_t set;
    int cpus = 0;
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        cpus = CPU_COUNT(&set);
    if (cpus < 1)
        cpus = 1;
    int t = cpus / (nodes > 0 ? nodes : 1);
    return t < 1 ? 1 : t;
}

/* The whole start-up, once options are checked; false when the cluster
 * could not be brought up (the caller stops what was started). */
static bool up_start(up_cluster_t *c, const up_opts_t *o, const char *bins, const char *model,
                     double t0)
{
    double deadline = t0 + o->timeout_s;
    char a[8][160];
    int next = o->port_base;
    char router_listen[64];
    snprintf(router_listen, sizeof(router_listen), UP_HOST ":%d", next++);
    char stores[UP_MAX_STORES * 24] = "";

    for (int i = 0; i < o->n_kvstore; i++) {
        up_proc_t *p = add_proc(c, "kvstore", i, bins);
        int listen = next++, metrics = next++;
        snprintf(p->address, sizeof(p->address), UP_HOST ":%d", listen);
        snprintf(p->health_url, sizeof(p->health_url), "http://" UP_HOST ":%d/health", metrics);
        snprintf(p->ready_url, sizeof(p->ready_url), "%s", p->health_url);
        snprintf(p->metrics_url, sizeof(p->metrics_url), "http://" UP_HOST ":%d/metrics", metrics);
        size_t len = strlen(stores);
        snprintf(stores + len, sizeof(stores) - len, "%s%s", i ? "," : "", p->address);
        snprintf(a[0], sizeof(a[0]), "%llu", (unsigned long long)o->kv_capacity);
        snprintf(a[1], sizeof(a[1]), "%d", metrics);
        char *argv[] = {p->bin,           "--listen", p->address,       "--capacity", a[0],
                        "--metrics-host", UP_HOST,    "--metrics-port", a[1],         NULL};
        if (!start_proc(c, p, argv))
            return false;
    }
    for (size_t i = 0; i < c->n; i++)
        if (!wait_for(c, &c->procs[i], c->procs[i].health_url, "starting", deadline, t0))
            return false;

    up_proc_t *router = add_proc(c, "router", 0, bins);
    snprintf(router->address, sizeof(router->address), UP_HOST ":%d", o->port);
    snprintf(router->internal, sizeof(router->internal), "%s", router_listen);
    snprintf(router->health_url, sizeof(router->health_url), "http://" UP_HOST ":%d/health",
             o->port);
    snprintf(router->ready_url, sizeof(router->ready_url), "http://" UP_HOST ":%d/ready", o->port);
    snprintf(router->metrics_url, sizeof(router->metrics_url), "http://" UP_HOST ":%d/metrics",
             o->port);
    snprintf(a[0], sizeof(a[0]), "%d", o->port);
    snprintf(a[1], sizeof(a[1]), "%d", o->grpc_port);
    {
        char *argv[] = {router->bin, "--model",  (char *)model, "--host", UP_HOST,
                        "--port",    a[0],       "--grpc-host", UP_HOST,  "--grpc-port",
                        a[1],        "--listen", router_listen, NULL};
        if (!start_proc(c, router, argv))
            return false;
    }
    size_t router_i = c->n - 1;
    if (!wait_for(c, &c->procs[router_i], c->procs[router_i].health_url, "loading the tokenizer",
                  deadline, t0))
        return false;

    int threads = o->threads > 0 ? o->threads : default_threads(o->n_prefill + o->n_decode);
    size_t first_node = c->n;
    for (int r = 0; r < 2; r++) {
        const char *role = r == 0 ? "prefill" : "decode";
        int count = r == 0 ? o->n_prefill : o->n_decode;
        for (int i = 0; i < count; i++) {
            up_proc_t *p = add_proc(c, role, i, bins);
            int metrics = next++;
            snprintf(p->address, sizeof(p->address), UP_HOST ":%d", metrics);
            snprintf(p->health_url, sizeof(p->health_url), "http://" UP_HOST ":%d/health", metrics);
            snprintf(p->ready_url, sizeof(p->ready_url), "http://" UP_HOST ":%d/ready", metrics);
            snprintf(p->metrics_url, sizeof(p->metrics_url), "http://" UP_HOST ":%d/metrics",
                     metrics);
            snprintf(a[0], sizeof(a[0]), "%d", metrics);
            snprintf(a[1], sizeof(a[1]), "%d", threads);
            char *argv[20];
            int k = 0;
            argv[k++] = p->bin;
            argv[k++] = "--model";
            argv[k++] = (char *)model;
            argv[k++] = "--router";
            argv[k++] = router_listen;
            if (stores[0] != '\0') {
                argv[k++] = "--kvstore";
                argv[k++] = stores;
            }
            argv[k++] = "--metrics-host";
            argv[k++] = UP_HOST;
            argv[k++] = "--metrics-port";
            argv[k++] = a[0];
            argv[k++] = "--threads";
            argv[k++] = a[1];
            argv[k++] = "--name";
            argv[k++] = p->name;
            argv[k] = NULL;
            if (!start_proc(c, p, argv))
                return false;
        }
    }
    for (size_t i = first_node; i < c->n; i++)
        if (!wait_for(c, &c->procs[i], c->procs[i].ready_url, "loading model", deadline, t0))
            return false;
    if (!wait_for(c, &c->procs[router_i], c->procs[router_i].ready_url, "a decode node to register",
                  deadline, t0))
        return false;
    snprintf(c->state, sizeof(c->state), "up");
    return cluster_save(c);
}

static void print_endpoints(const up_cluster_t *c, const up_opts_t *o, bool default_dir,
                            double secs)
{
    char dir_flag[PATH_MAX + 16] = "";
    if (!default_dir)
        snprintf(dir_flag, sizeof(dir_flag), " --run-dir %s", c->run_dir);
    printf("tandem cluster is up in %.1f s: %d kvstore, %d prefill, %d decode%s\n", secs,
           o->n_kvstore, o->n_prefill, o->n_decode,
           o->n_prefill == 0 ? " (colocated: decode nodes serve whole requests)" : "");
    printf("  OpenAI API  %s   (curl %s/models)\n", c->openai_url, c->openai_url);
    if (o->grpc_port >= 0)
        printf("  gRPC        %s\n", c->grpc);
    printf("  metrics     ");
    for (size_t i = 0; i < c->n; i++)
        printf("%s%-10s %s\n", i ? "              " : "", c->procs[i].name,
               c->procs[i].metrics_url);
    if (o->api_key != NULL && o->api_key[0] != '\0')
        printf("  API key     required (Authorization: Bearer ...)\n");
    printf("  run dir     %s   (logs: NAME.log, supervisor.log, cluster.json)\n", c->run_dir);
    printf("  restarts    a role that dies is restarted by the supervisor (pid %lld)\n",
           c->supervisor_pid);
    printf("  status      tandem status%s\n", dir_flag);
    printf("  stop        tandem down%s\n", dir_flag);
}

/* The flags `up` and the supervisor share; n_out gets how many. */
static size_t up_flags(up_opts_t *o, tdm_flag_t *f)
{
    size_t n = 0;
    f[n++] = (tdm_flag_t){
        "prefill", 0, TDM_FLAG_TYPE_INT, &o->n_prefill, "prefill nodes (0: colocated cluster)",
        NULL};
    f[n++] = (tdm_flag_t){"decode", 0, TDM_FLAG_TYPE_INT, &o->n_decode, "decode nodes", NULL};
    f[n++] = (tdm_flag_t){"kvstore", 0, TDM_FLAG_TYPE_INT, &o->n_kvstore, "KV stores", NULL};
    f[n++] = (tdm_flag_t){"run-dir",
                          0,
                          TDM_FLAG_TYPE_STR,
                          &o->run_dir,
                          "logs, token and cluster.json (default: $TANDEM_HOME/cluster)",
                          NULL};
    f[n++] = (tdm_flag_t){"model",
                          'm',
                          TDM_FLAG_TYPE_STR,
                          &o->model,
                          "GGUF model file (default: $TANDEM_HOME/models/" DEFAULT_MODEL_FILE ")",
                          NULL};
    f[n++] =
        (tdm_flag_t){"port", 'p', TDM_FLAG_TYPE_INT, &o->port, "router's OpenAI HTTP port", NULL};
    f[n++] = (tdm_flag_t){
        "grpc-port", 0, TDM_FLAG_TYPE_INT, &o->grpc_port, "router's gRPC port (-1: none)", NULL};
    f[n++] = (tdm_flag_t){"port-base",
                          0,
                          TDM_FLAG_TYPE_INT,
                          &o->port_base,
                          "first internal port (router listener, stores, node metrics)",
                          NULL};
    f[n++] = (tdm_flag_t){
        "kv-capacity", 0, TDM_FLAG_TYPE_SIZE, &o->kv_capacity, "bytes of each KV store", NULL};
    f[n++] = (tdm_flag_t){"threads",
                          't',
                          TDM_FLAG_TYPE_INT,
                          &o->threads,
                          "CPU threads per node (0: the cores divided among the nodes)",
                          NULL};
    f[n++] = (tdm_flag_t){"timeout",
                          0,
                          TDM_FLAG_TYPE_INT,
                          &o->timeout_s,
                          "seconds to wait for every process to be ready",
                          NULL};
    return n;
}

static const up_opts_t up_defaults = {
    .n_prefill = 1,
    .n_decode = 1,
    .n_kvstore = 1,
    .port = 8000,
    .grpc_port = 8001,
    .port_base = 7400,
    .kv_capacity = 1ull << 30,
    .timeout_s = 180,
};

static bool up_opts_ok(const up_opts_t *o, const char *cmd)
{
    if (o->n_prefill < 0 || o->n_prefill > UP_MAX_NODES || o->n_decode < 1 ||
        o->n_decode > UP_MAX_NODES || o->n_kvstore < 0 || o->n_kvstore > UP_MAX_STORES ||
        o->timeout_s < 1 || o->threads < 0 || o->kv_capacity == 0 || o->grpc_port < -1) {
        fprintf(stderr,
                "tandem %s: --prefill 0..%d, --decode 1..%d, --kvstore 0..%d, --timeout >= 1, "
                "--threads >= 0, --kv-capacity > 0 and --grpc-port >= -1, please\n",
                cmd, UP_MAX_NODES, UP_MAX_NODES, UP_MAX_STORES);
        return false;
    }
    if (o->n_prefill > 0 && o->n_kvstore == 0) {
        fprintf(stderr,
                "tandem %s: prefill nodes hand KV to decode through a store; give "
                "--kvstore 1 or more, or --prefill 0 for a colocated cluster\n",
                cmd);
        return false;
    }
    return true;
}

/* ---- the supervisor --------------------------------------------------- */

static void iso_now(char *buf, size_t cap)
{
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* A line of the supervisor's log (its stderr: RUN/supervisor.log). */
static void sup_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sup_log(const char *fmt, ...)
{
    char ts[32];
    iso_now(ts, sizeof(ts));
    fprintf(stderr, "%s tandem up: ", ts);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
}

/* The index in a name ROLE-I. */
static int proc_index(const up_proc_t *p)
{
    const char *dash = strrchr(p->name, '-');
    return dash != NULL ? atoi(dash + 1) : 0;
}

/* p failed (it ran up_s seconds, or could not be started at all): the
 * next attempt after a backoff, or give up after UP_MAX_QUICK quick
 * failures in a row. */
static void schedule_restart(up_proc_t *p, double now, double up_s)
{
    if (up_s >= UP_STABLE_S)
        p->fails = 0;
    p->quick = up_s < UP_QUICK_S ? p->quick + 1 : 0;
    p->fails++;
    if (p->quick >= UP_MAX_QUICK) {
        snprintf(p->state, sizeof(p->state), "failed");
        p->next_start = 0;
        snprintf(p->error, sizeof(p->error),
                 "gave up after %d failures in a row, each within %d s of its start (last: %s); "
                 "see %s, fix the cause, then tandem down and tandem up",
                 p->quick, UP_QUICK_S, p->last_exit, p->log);
        sup_log("%s (role %s, index %d): %s", p->name, p->role, proc_index(p), p->error);
        return;
    }
    int delay = UP_BACKOFF_MIN_S;
    for (int k = 1; k < p->fails && delay < UP_BACKOFF_MAX_S; k++)
        delay *= 2;
    if (delay > UP_BACKOFF_MAX_S)
        delay = UP_BACKOFF_MAX_S;
    p->next_try = now + delay;
    p->next_start = (long long)time(NULL) + delay;
    snprintf(p->state, sizeof(p->state), "restarting");
    sup_log("%s (role %s, index %d, pid %lld) ended after %.1f s: %s; restart %lld in %d s",
            p->name, p->role, proc_index(p), p->pid, up_s, p->last_exit, p->restarts + 1, delay);
}

/* A child of ours ended: record how; restart it later unless it exited 0
 * (a drain, or SIGTERM from someone), which is a wanted stop. */
static void on_death(up_proc_t *p, double now)
{
    double up_s = now - p->started_at;
    exit_cause(p->wait_status, p->last_exit, sizeof(p->last_exit));
    p->last_exit_time = (long long)time(NULL);
    if (WIFEXITED(p->wait_status) && WEXITSTATUS(p->wait_status) == 0) {
        snprintf(p->state, sizeof(p->state), "stopped");
        p->next_start = 0;
        sup_log("%s (role %s, index %d, pid %lld) exited with status 0 after %.1f s (a drain or "
                "SIGTERM ends so); not restarted: tandem down, then tandem up brings it back",
                p->name, p->role, proc_index(p), p->pid, up_s);
        return;
    }
    schedule_restart(p, now, up_s);
}

/* The next attempt of p: same binary, same command line (so the same
 * ports), same environment (the same token), its log appended to. */
static void restart_proc(up_proc_t *p, double now)
{
    char ts[32];
    iso_now(ts, sizeof(ts));
    FILE *f = fopen(p->log, "ae");
    if (f != NULL) {
        fprintf(f,
                "\n==== tandem up: restart %lld of %s at %s (the previous process, pid %lld, "
                "ended: %s) ====\n",
                p->restarts + 1, p->name, ts, p->pid, p->last_exit);
        fclose(f);
    }
    char why[PATH_MAX + 160];
    long long pid;
    if (!spawn(p->bin, p->argv, p->log, true, &pid, why, sizeof(why))) {
        snprintf(p->last_exit, sizeof(p->last_exit), "could not be started: %.100s", why);
        p->last_exit_time = (long long)time(NULL);
        sup_log("%s: %s", p->name, why);
        schedule_restart(p, now, 0);
        return;
    }
    p->pid = pid;
    p->restarts++;
    note_start(p);
    sup_log("%s restarted as pid %lld (restart %lld)", p->name, p->pid, p->restarts);
}

/* Until a signal: restarts what dies, records every change. */
static void supervise(up_cluster_t *c)
{
    while (!g_interrupted) {
        double now = tool_now();
        bool changed = false;
        for (size_t i = 0; i < c->n && !g_interrupted; i++) {
            up_proc_t *p = &c->procs[i];
            if (strcmp(p->state, "running") == 0 && proc_reap(p)) {
                on_death(p, now);
                changed = true;
            } else if (strcmp(p->state, "restarting") == 0 && now >= p->next_try) {
                restart_proc(p, now);
                changed = true;
            }
        }
        if (changed)
            cluster_save(c);
        sleep_ms(100);
    }
}

static void report(int fd, char what)
{
    if (fd < 0)
        return;
    ssize_t w;
    do
        w = write(fd, &what, 1);
    while (w < 0 && errno == EINTR);
    close(fd);
}

/* tandem __up-supervisor: started by `up` (never by hand) with the options
 * `up` resolved, RUN/lock held on --lock-fd and a pipe to `up` on
 * --report-fd: starts the cluster, reports 'U' (up) or 'F' (failed, what
 * was started is stopped again), and supervises until SIGTERM. */
int cmd_up_supervisor(int argc, char **argv)
{
    up_opts_t o = up_defaults;
    const char *bins = NULL;
    int lock_fd = -1, report_fd = -1;
    tdm_flag_t flags[16];
    size_t n = up_flags(&o, flags);
    flags[n++] = (tdm_flag_t){"bin-dir", 0, TDM_FLAG_TYPE_STR, &bins, "the role binaries", NULL};
    flags[n++] = (tdm_flag_t){"lock-fd", 0, TDM_FLAG_TYPE_INT, &lock_fd, "RUN/lock, held", NULL};
    flags[n++] = (tdm_flag_t){"report-fd", 0, TDM_FLAG_TYPE_INT, &report_fd, "pipe to up", NULL};
    int rc;
    if (!tool_parse("__up-supervisor [flags]",
                    "Internal: the supervisor `tandem up` leaves behind; not for use by hand.",
                    flags, n, argc, argv, NULL, 0, NULL, &rc))
        return rc;
    if (!up_opts_ok(&o, "__up-supervisor"))
        return TOOL_EXIT_USAGE;
    if (o.run_dir == NULL || o.model == NULL || bins == NULL || lock_fd < 0 || report_fd < 0) {
        fprintf(stderr, "tandem __up-supervisor: is started by `tandem up`, not by hand\n");
        return TOOL_EXIT_USAGE;
    }
    /* The roles inherit neither. */
    fcntl(lock_fd, F_SETFD, FD_CLOEXEC);
    fcntl(report_fd, F_SETFD, FD_CLOEXEC);

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    /* `up` may be gone while we still write to its stderr. */
    signal(SIGPIPE, SIG_IGN);

    up_cluster_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        fprintf(stderr, "tandem up: out of memory\n");
        report(report_fd, 'F');
        return TOOL_EXIT_FAIL;
    }
    snprintf(c->run_dir, sizeof(c->run_dir), "%s", o.run_dir);
    snprintf(c->state, sizeof(c->state), "starting");
    snprintf(c->openai_url, sizeof(c->openai_url), "http://" UP_HOST ":%d/v1", o.port);
    if (o.grpc_port >= 0)
        snprintf(c->grpc, sizeof(c->grpc), UP_HOST ":%d", o.grpc_port);
    c->supervisor_pid = (long long)getpid();
    char st;
    if (!proc_stat(c->supervisor_pid, &st, &c->supervisor_start))
        c->supervisor_start = 0;

    if (!up_start(c, &o, bins, o.model, tool_now())) {
        fprintf(stderr, "tandem up: stopping what was started\n");
        if (cluster_stop(c, 10) == 0)
            cluster_forget(c);
        else
            fprintf(stderr, "tandem up: some processes are still running; see %s/cluster.json\n",
                    c->run_dir);
        fflush(stderr);
        report(report_fd, 'F');
        free(c);
        close(lock_fd);
        return TOOL_EXIT_FAIL;
    }

    /* Up: our output moves to RUN/supervisor.log, so that nothing of
     * `up`'s (a terminal, a pipe a caller reads to its end) stays open. */
    char path[PATH_MAX + 32];
    path_in(c, "supervisor.log", path, sizeof(path));
    int log_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) {
        fprintf(stderr,
                "tandem up: cannot open %s (%s); the supervisor logs nothing from here on\n", path,
                strerror(errno));
        log_fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
    }
    fflush(stdout);
    fflush(stderr);
    if (log_fd >= 0) {
        dup2(log_fd, STDOUT_FILENO);
        dup2(log_fd, STDERR_FILENO);
        close(log_fd);
    }
    sup_log("supervising %zu processes in %s (supervisor pid %lld); a role that dies is "
            "restarted after %d s, doubling to %d s; %d quick failures in a row give up",
            c->n, c->run_dir, c->supervisor_pid, UP_BACKOFF_MIN_S, UP_BACKOFF_MAX_S, UP_MAX_QUICK);
    report(report_fd, 'U');

    supervise(c);

    /* Told to stop (by `tandem down`): restart nothing more, say so, and
     * reap the roles as they are stopped; a second signal ends at once. */
    snprintf(c->state, sizeof(c->state), "stopping");
    cluster_save(c);
    sup_log("stopping on a signal: nothing is restarted any more; exiting once the roles have "
            "exited (tandem down stops them)");
    g_interrupted = 0;
    for (;;) {
        size_t running = 0;
        for (size_t i = 0; i < c->n; i++)
            if (!proc_reap(&c->procs[i]) && proc_alive(&c->procs[i]))
                running++;
        if (running == 0) {
            sup_log("all roles have exited; the supervisor exits");
            break;
        }
        if (g_interrupted) {
            sup_log("a second signal: exiting with %zu roles still running", running);
            break;
        }
        sleep_ms(100);
    }
    free(c);
    close(lock_fd);
    return TOOL_EXIT_OK;
}

/* ---- up --------------------------------------------------------------- */

/* Starts the supervisor (this binary, in its own session) and waits for
 * its report; true when the cluster is up. Forwards an interrupt (the
 * supervisor then stops what it started). */
static bool run_supervisor(const up_cluster_t *c, const up_opts_t *o, const char *model,
                           const char *bins, int threads, int lock_fd)
{
    char self[PATH_MAX];
    ssize_t sn = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (sn <= 0) {
        fprintf(stderr, "tandem up: cannot read /proc/self/exe (%s)\n", strerror(errno));
        return false;
    }
    self[sn] = '\0';
    int rep[2];
    if (pipe2(rep, O_CLOEXEC) != 0) {
        fprintf(stderr, "tandem up: pipe: %s\n", strerror(errno));
        return false;
    }
    char a[10][32];
    snprintf(a[0], sizeof(a[0]), "%d", o->n_prefill);
    snprintf(a[1], sizeof(a[1]), "%d", o->n_decode);
    snprintf(a[2], sizeof(a[2]), "%d", o->n_kvstore);
    snprintf(a[3], sizeof(a[3]), "%d", o->port);
    snprintf(a[4], sizeof(a[4]), "%d", o->grpc_port);
    snprintf(a[5], sizeof(a[5]), "%d", o->port_base);
    snprintf(a[6], sizeof(a[6]), "%llu", (unsigned long long)o->kv_capacity);
    snprintf(a[7], sizeof(a[7]), "%d", threads);
    snprintf(a[8], sizeof(a[8]), "%d", o->timeout_s);
    char lock_s[16], rep_s[16];
    snprintf(lock_s, sizeof(lock_s), "%d", lock_fd);
    snprintf(rep_s, sizeof(rep_s), "%d", rep[1]);
    static const char *const names[] = {"--prefill",     "--decode",    "--kvstore",
                                        "--port",        "--grpc-port", "--port-base",
                                        "--kv-capacity", "--threads",   "--timeout"};
    char *argv[40];
    int k = 0;
    argv[k++] = self;
    argv[k++] = "__up-supervisor";
    argv[k++] = "--run-dir";
    argv[k++] = (char *)c->run_dir;
    argv[k++] = "--model";
    argv[k++] = (char *)model;
    argv[k++] = "--bin-dir";
    argv[k++] = (char *)bins;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        argv[k++] = (char *)names[i];
        argv[k++] = a[i];
    }
    argv[k++] = "--lock-fd";
    argv[k++] = lock_s;
    argv[k++] = "--report-fd";
    argv[k++] = rep_s;
    argv[k] = NULL;
    fflush(stdout);
    fflush(stderr);
    pid_t sup = fork();
    if (sup == 0) {
        setsid();
        int null_fd = open("/dev/null", O_RDONLY);
        if (null_fd >= 0 && null_fd != STDIN_FILENO) {
            dup2(null_fd, STDIN_FILENO);
            close(null_fd);
        }
        fcntl(lock_fd, F_SETFD, 0);
        fcntl(rep[1], F_SETFD, 0);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execv(self, argv);
        fprintf(stderr, "tandem up: cannot run the supervisor %s: %s\n", self, strerror(errno));
        _exit(127);
    }
    int fork_errno = errno;
    close(rep[1]);
    if (sup < 0) {
        close(rep[0]);
        fprintf(stderr, "tandem up: cannot fork the supervisor: %s\n", strerror(fork_errno));
        return false;
    }
    /* Bounded even if the supervisor hangs: its start is bounded by
     * --timeout, stopping a failed start by about a minute. */
    double deadline = tool_now() + o->timeout_s + 120;
    bool forwarded = false;
    char got = 0;
    for (;;) {
        if (g_interrupted && !forwarded) {
            fprintf(stderr, "tandem up: interrupted; the supervisor stops what it started\n");
            kill(sup, SIGTERM);
            forwarded = true;
        }
        if (tool_now() >= deadline) {
            fprintf(stderr,
                    "tandem up: the supervisor (pid %d) did not report within %d s; "
                    "stopping the cluster\n",
                    (int)sup, o->timeout_s + 120);
            break;
        }
        struct pollfd pfd = {rep[0], POLLIN, 0};
        int r = poll(&pfd, 1, 200);
        if (r < 0 && errno != EINTR) {
            fprintf(stderr, "tandem up: poll: %s\n", strerror(errno));
            break;
        }
        if (r <= 0)
            continue;
        ssize_t rd = read(rep[0], &got, 1);
        if (rd < 0 && errno == EINTR)
            continue;
        if (rd <= 0)
            got = 0;
        break;
    }
    close(rep[0]);
    if (got == 'U' && !forwarded)
        return true;
    if (got == 'U') {
        /* Up just as it was interrupted: take it down again. */
        down_cluster(c->run_dir, 10);
    } else if (got != 'F') {
        /* Died, hung or never reported: whatever it recorded goes. */
        int st = 0;
        pid_t w = 0;
        for (int i = 0; i < 20 && (w = waitpid(sup, &st, WNOHANG)) == 0; i++)
            sleep_ms(50);
        if (w == sup) {
            char cause[96];
            exit_cause(st, cause, sizeof(cause));
            fprintf(stderr, "tandem up: the supervisor ended before the cluster was up (%s)\n",
                    cause);
        } else {
            kill(sup, SIGKILL);
        }
        down_cluster(c->run_dir, 10);
    }
    /* 'F': it said why, stopped what it started, and exits now. */
    for (int i = 0; i < 100 && waitpid(sup, NULL, WNOHANG) == 0; i++)
        sleep_ms(50);
    return false;
}

int cmd_up(int argc, char **argv)
{
    up_opts_t o = up_defaults;
    tdm_flag_t flags[16];
    size_t n_flags = up_flags(&o, flags);
    flags[n_flags++] = (tdm_flag_t){"api-key",
                                    0,
                                    TDM_FLAG_TYPE_STR,
                                    &o.api_key,
                                    "key clients must send (handed to the router by environment)",
                                    NULL};
    int rc;
    if (!tool_parse("up [flags]",
                    "Starts a local cluster on 127.0.0.1: stores, router, prefill and decode "
                    "nodes, and a supervisor that restarts a role that dies (with backoff; "
                    "`tandem status` counts the restarts); waits until all are ready. "
                    "`tandem down` stops it.",
                    flags, n_flags, argc, argv, NULL, 0, NULL, &rc))
        return rc;
    if (!up_opts_ok(&o, "up"))
        return TOOL_EXIT_USAGE;

    char model[PATH_MAX];
    if (o.model != NULL) {
        snprintf(model, sizeof(model), "%s", o.model);
    } else {
        tool_default_model_path(model, sizeof(model));
    }
    char model_abs[PATH_MAX];
    if (realpath(model, model_abs) == NULL) {
        if (o.model == NULL)
            fprintf(stderr,
                    "tandem up: no model given and the default model is not at %s\n"
                    "  fetch it with `make model`, or pass -m MODEL.gguf\n",
                    model);
        else
            fprintf(stderr, "tandem up: cannot use model %s: %s\n", model, strerror(errno));
        return TOOL_EXIT_USAGE;
    }

    char bins[PATH_MAX];
    if (!bin_dir(bins, sizeof(bins)))
        return TOOL_EXIT_FAIL;
    static const char *const roles[] = {"kvstore", "router", "prefill", "decode"};
    for (size_t r = 0; r < 4; r++) {
        if ((r == 0 && o.n_kvstore == 0) || (r == 2 && o.n_prefill == 0))
            continue;
        char path[PATH_MAX + 32];
        snprintf(path, sizeof(path), "%s/tandem-%s", bins, roles[r]);
        if (access(path, X_OK) != 0) {
            fprintf(stderr,
                    "tandem up: %s: %s\n  build the roles (make), or point TANDEM_BIN_DIR at "
                    "the directory that holds them\n",
                    path, strerror(errno));
            return TOOL_EXIT_FAIL;
        }
    }

    char dir[PATH_MAX];
    bool default_dir = o.run_dir == NULL;
    if (default_dir)
        default_run_dir(dir, sizeof(dir));
    else
        snprintf(dir, sizeof(dir), "%s", o.run_dir);
    if (mkdir_p(dir) != 0) {
        fprintf(stderr, "tandem up: cannot create the run dir %s: %s\n", dir, strerror(errno));
        return TOOL_EXIT_FAIL;
    }
    up_cluster_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        fprintf(stderr, "tandem up: out of memory\n");
        return TOOL_EXIT_FAIL;
    }
    rc = TOOL_EXIT_FAIL;
    int lock_fd = -1;
    if (realpath(dir, c->run_dir) == NULL) {
        fprintf(stderr, "tandem up: cannot resolve %s: %s\n", dir, strerror(errno));
        goto out_free;
    }
    if (strlen(c->run_dir) + 64 > sizeof(c->run_dir)) {
        fprintf(stderr, "tandem up: the run dir path %s is too long\n", c->run_dir);
        goto out_free;
    }
    char down_hint[PATH_MAX + 32];
    snprintf(down_hint, sizeof(down_hint), "tandem down%s%s", default_dir ? "" : " --run-dir ",
             default_dir ? "" : c->run_dir);
    /* One cluster per run dir: its supervisor holds the lock for as long
     * as it lives (and `up` while it checks); the roles never inherit it. */
    char lock_path[PATH_MAX + 32];
    path_in(c, "lock", lock_path, sizeof(lock_path));
    lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0) {
        fprintf(stderr, "tandem up: cannot open %s: %s\n", lock_path, strerror(errno));
        goto out_free;
    }
    if (flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK)
            fprintf(stderr,
                    "tandem up: a cluster is already running or starting in %s (its supervisor "
                    "holds %s)\n  stop it first: %s\n",
                    c->run_dir, lock_path, down_hint);
        else
            fprintf(stderr, "tandem up: cannot lock %s: %s\n", lock_path, strerror(errno));
        goto out_lock;
    }

    up_cluster_t *old = calloc(1, sizeof(*old));
    if (old == NULL) {
        fprintf(stderr, "tandem up: out of memory\n");
        goto out_lock;
    }
    int loaded = cluster_load(c->run_dir, old);
    size_t alive = 0;
    const up_proc_t *some = NULL;
    for (size_t i = 0; loaded > 0 && i < old->n; i++)
        if (proc_alive(&old->procs[i])) {
            alive++;
            some = &old->procs[i];
        }
    if (loaded < 0 || alive > 0) {
        if (alive > 0)
            fprintf(stderr,
                    "tandem up: a cluster recorded in %s is still running (%zu processes, e.g. "
                    "%s pid %lld)\n  stop it first: %s\n",
                    c->run_dir, alive, some->name, some->pid, down_hint);
        free(old);
        goto out_lock;
    }
    if (loaded > 0) {
        fprintf(stderr, "tandem up: forgetting the stopped cluster recorded in %s\n", c->run_dir);
        cluster_forget(old);
    }
    free(old);

    if (!check_ports(&o))
        goto out_lock;

    char token[2 * UP_TOKEN_BYTES + 1];
    if (!write_token(c, token, sizeof(token)))
        goto out_lock;
    /* Secrets reach the supervisor and the roles by environment only:
     * never on a command line, where `ps` shows them. */
    setenv("TANDEM_CLUSTER_TOKEN", token, 1);
    if (o.api_key != NULL && o.api_key[0] != '\0')
        setenv("TANDEM_API_KEY", o.api_key, 1);
    else
        unsetenv("TANDEM_API_KEY");
    memset(token, 0, sizeof(token));

    struct sigaction sa, old_int, old_term, old_hup;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGHUP, &sa, &old_hup);

    double t0 = tool_now();
    fprintf(stderr, "starting a tandem cluster in %s (model %s)\n", c->run_dir, model_abs);
    int threads = o.threads > 0 ? o.threads : default_threads(o.n_prefill + o.n_decode);
    if (run_supervisor(c, &o, model_abs, bins, threads, lock_fd)) {
        up_cluster_t *now = calloc(1, sizeof(*now));
        if (now != NULL && cluster_load(c->run_dir, now) > 0) {
            print_endpoints(now, &o, default_dir, tool_now() - t0);
            rc = TOOL_EXIT_OK;
        } else if (now != NULL) {
            fprintf(stderr,
                    "tandem up: the cluster is up but %s/cluster.json cannot be read; "
                    "see tandem status\n",
                    c->run_dir);
        }
        free(now);
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    sigaction(SIGHUP, &old_hup, NULL);
out_lock:
    if (lock_fd >= 0)
        close(lock_fd);
out_free:
    free(c);
    return rc;
}

/* ---- status and down ------------------------------------------------ */

static const char *run_dir_arg(const char *flag, char *buf, size_t cap)
{
    if (flag != NULL)
        snprintf(buf, cap, "%s", flag);
    else
        default_run_dir(buf, cap);
    return buf;
}

/* What a process is now: the supervisor's record where it still holds
 * (restarting, failed, stopped), else running or dead as seen. */
static const char *proc_state(const up_proc_t *p, bool alive, bool supervised)
{
    if (strcmp(p->state, "failed") == 0 || strcmp(p->state, "stopped") == 0)
        return p->state;
    if (alive)
        return "running";
    if (supervised && strcmp(p->state, "restarting") == 0)
        return "restarting";
    return "dead";
}

int cmd_status(int argc, char **argv)
{
    const char *run_dir = NULL;
    bool json = false;
    tdm_flag_t flags[] = {
        {"run-dir", 0, TDM_FLAG_TYPE_STR, &run_dir,
         "the cluster's run dir (default: $TANDEM_HOME/cluster)", NULL},
        {"json", 0, TDM_FLAG_TYPE_BOOL, &json, "a JSON list of the processes", NULL},
    };
    int rc;
    if (!tool_parse("status [flags]",
                    "Lists the local cluster's processes: alive, healthy (GET /health), "
                    "restarts and how the last one ended, and whether the supervisor runs. "
                    "Exit 0: all healthy, 1: not, 2: no cluster recorded.",
                    flags, sizeof(flags) / sizeof(flags[0]), argc, argv, NULL, 0, NULL, &rc))
        return rc;
    char dir[PATH_MAX];
    run_dir_arg(run_dir, dir, sizeof(dir));
    up_cluster_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        fprintf(stderr, "tandem status: out of memory\n");
        return TOOL_EXIT_FAIL;
    }
    int loaded = cluster_load(dir, c);
    if (loaded <= 0) {
        if (loaded == 0)
            fprintf(stderr, "tandem status: no cluster recorded in %s (start one: tandem up)\n",
                    dir);
        free(c);
        if (json && loaded == 0)
            printf("[]\n");
        return loaded == 0 ? TOOL_EXIT_USAGE : TOOL_EXIT_FAIL;
    }
    bool supervised = supervisor_alive(c);
    bool all = c->n > 0;
    if (json)
        printf("[");
    else
        printf("%-8s %-11s %-8s %-21s %-6s %-8s %-9s %s\n", "ROLE", "NAME", "PID", "ADDRESS",
               "ALIVE", "HEALTHY", "RESTARTS", "LAST EXIT");
    long long now = (long long)time(NULL);
    for (size_t i = 0; i < c->n; i++) {
        const up_proc_t *p = &c->procs[i];
        bool alive = proc_alive(p);
        bool healthy = alive && http_get_status(p->health_url, 1000) == 200;
        all = all && healthy;
        const char *state = proc_state(p, alive, supervised);
        if (json) {
            printf("%s\n  {\"role\": ", i ? "," : "");
            json_str(stdout, p->role);
            printf(", \"name\": ");
            json_str(stdout, p->name);
            printf(", \"pid\": %lld, \"address\": ", p->pid);
            json_str(stdout, p->address);
            printf(", \"alive\": %s, \"healthy\": %s, \"health_url\": ", alive ? "true" : "false",
                   healthy ? "true" : "false");
            json_str(stdout, p->health_url);
            printf(", \"metrics_url\": ");
            json_str(stdout, p->metrics_url);
            printf(", \"log\": ");
            json_str(stdout, p->log);
            printf(",\n   \"state\": ");
            json_str(stdout, state);
            printf(", \"restarts\": %lld, \"last_exit\": ", p->restarts);
            if (p->last_exit[0] != '\0')
                json_str(stdout, p->last_exit);
            else
                printf("null");
            printf(", \"last_exit_time\": %lld, \"next_start\": %lld, \"error\": ",
                   p->last_exit_time, strcmp(state, "restarting") == 0 ? p->next_start : 0);
            if (p->error[0] != '\0' && strcmp(state, "failed") == 0)
                json_str(stdout, p->error);
            else
                printf("null");
            printf(", \"supervised\": %s}", supervised ? "true" : "false");
        } else {
            char last[192] = "-";
            if (p->last_exit[0] != '\0')
                snprintf(last, sizeof(last), "%s", p->last_exit);
            char extra[64] = "";
            if (strcmp(state, "restarting") == 0)
                snprintf(extra, sizeof(extra), " (restarting in %lld s)",
                         p->next_start > now ? p->next_start - now : 0);
            else if (strcmp(state, "failed") == 0)
                snprintf(extra, sizeof(extra), " (FAILED, not restarted)");
            else if (strcmp(state, "stopped") == 0)
                snprintf(extra, sizeof(extra), " (stopped, not restarted)");
            printf("%-8s %-11s %-8lld %-21s %-6s %-8s %-9lld %s%s\n", p->role, p->name, p->pid,
                   p->address, alive ? "yes" : "no", healthy ? "yes" : "no", p->restarts, last,
                   extra);
        }
    }
    if (json) {
        printf("%s]\n", c->n ? "\n" : "");
    } else {
        for (size_t i = 0; i < c->n; i++)
            if (strcmp(proc_state(&c->procs[i], proc_alive(&c->procs[i]), supervised), "failed") ==
                0)
                printf("%s: %s\n", c->procs[i].name, c->procs[i].error);
        if (supervised)
            printf("supervisor pid %lld: restarts a role that dies (log: %s/supervisor.log)\n",
                   c->supervisor_pid, c->run_dir);
        else
            printf("supervisor NOT running%s: a role that dies stays down; tandem down still "
                   "stops the rest (see %s/supervisor.log)\n",
                   c->supervisor_pid > 1 ? " (it was killed?)" : "", c->run_dir);
        if (c->n > 0 && c->openai_url[0] != '\0')
            printf("OpenAI API %s%s%s; %s\n", c->openai_url, c->grpc[0] ? ", gRPC " : "", c->grpc,
                   all ? "all healthy" : "NOT all healthy (see the logs in the run dir)");
    }
    free(c);
    return all ? TOOL_EXIT_OK : TOOL_EXIT_FAIL;
}

int cmd_down(int argc, char **argv)
{
    const char *run_dir = NULL;
    int timeout_s = 30;
    tdm_flag_t flags[] = {
        {"run-dir", 0, TDM_FLAG_TYPE_STR, &run_dir,
         "the cluster's run dir (default: $TANDEM_HOME/cluster)", NULL},
        {"timeout", 0, TDM_FLAG_TYPE_INT, &timeout_s,
         "seconds each group gets to drain after SIGTERM before SIGKILL", NULL},
    };
    int rc;
    if (!tool_parse("down [flags]",
                    "Stops the local cluster: its supervisor (so nothing is restarted), then "
                    "nodes, then the router, then the stores (SIGTERM, SIGKILL after "
                    "--timeout). Logs are kept.",
                    flags, sizeof(flags) / sizeof(flags[0]), argc, argv, NULL, 0, NULL, &rc))
        return rc;
    if (timeout_s < 0) {
        fprintf(stderr, "tandem down: --timeout must be >= 0\n");
        return TOOL_EXIT_USAGE;
    }
    char dir[PATH_MAX];
    run_dir_arg(run_dir, dir, sizeof(dir));
    return down_cluster(dir, timeout_s);
}

/* ---- drain ------------------------------------------------------------ */

/* "HOST:PORT" into its parts (port 1..65535). */
static bool hostport_split(const char *s, char *host, size_t host_cap, int *port)
{
    const char *colon = strrchr(s, ':');
    if (colon == NULL || colon == s || (size_t)(colon - s) >= host_cap)
        return false;
    char *end;
    long v = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end != '\0' || v < 1 || v > 65535)
        return false;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    *port = (int)v;
    return true;
}

/* Reads RUN/token (the local cluster's) into buf; false when absent. */
static bool read_local_token(const up_cluster_t *c, char *buf, size_t cap)
{
    char path[PATH_MAX + 32];
    path_in(c, "token", path, sizeof(path));
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return false;
    bool ok = fgets(buf, (int)cap, f) != NULL;
    fclose(f);
    buf[strcspn(buf, "\r\n")] = '\0';
    return ok && buf[0] != '\0';
}

int cmd_drain(int argc, char **argv)
{
    const char *run_dir = NULL, *token = NULL;
    bool wait = false;
    int timeout_s = 120;
    tdm_flag_t flags[] = {
        {"wait", 'w', TDM_FLAG_TYPE_BOOL, &wait,
         "return when the node has exited (its /health no longer answers)", NULL},
        {"timeout", 0, TDM_FLAG_TYPE_INT, &timeout_s,
         "seconds --wait waits before it gives up (exit 1)", NULL},
        {"cluster-token", 0, TDM_FLAG_TYPE_STR, &token,
         "the node's cluster token (prefer TANDEM_CLUSTER_TOKEN; a local cluster's is read "
         "from its run dir)",
         NULL},
        {"run-dir", 0, TDM_FLAG_TYPE_STR, &run_dir,
         "the local cluster's run dir, for NODE given by name (default: $TANDEM_HOME/cluster)",
         NULL},
    };
    const char *pos[1];
    size_t n_pos = 0;
    int rc;
    if (!tool_parse("drain NODE [flags]",
                    "Drains a prefill or decode node, as SIGTERM does: it stops taking work at "
                    "once, finishes what it holds within its --drain-timeout, hands the rest "
                    "back to the router and exits 0. NODE is HOST:PORT of the node's metrics "
                    "server (its --metrics-port: 7600 prefill, 7700 decode) or a name from "
                    "`tandem status`. Exit 0: drain started (with --wait: the node exited), "
                    "1: failed.",
                    flags, sizeof(flags) / sizeof(flags[0]), argc, argv, pos, 1, &n_pos, &rc))
        return rc;
    if (n_pos != 1 || timeout_s < 0) {
        fprintf(stderr, "tandem drain: give one NODE (HOST:PORT or a local node's name) and "
                        "--timeout >= 0 (see --help)\n");
        return TOOL_EXIT_USAGE;
    }
    char host[256], tok_buf[256] = "";
    int port = 0;
    const up_proc_t *local = NULL;
    up_cluster_t *c = NULL;
    if (!hostport_split(pos[0], host, sizeof(host), &port)) {
        char dir[PATH_MAX];
        run_dir_arg(run_dir, dir, sizeof(dir));
        c = calloc(1, sizeof(*c));
        if (c == NULL || cluster_load(dir, c) != 1) {
            fprintf(stderr,
                    "tandem drain: '%s' is not HOST:PORT and no local cluster is recorded in "
                    "%s\n",
                    pos[0], dir);
            free(c);
            return TOOL_EXIT_USAGE;
        }
        for (size_t i = 0; i < c->n && local == NULL; i++)
            if (strcmp(c->procs[i].name, pos[0]) == 0)
                local = &c->procs[i];
        const char *path;
        if (local == NULL ||
            (strcmp(local->role, "prefill") != 0 && strcmp(local->role, "decode") != 0)) {
            fprintf(stderr,
                    "tandem drain: no prefill or decode node '%s' in the local cluster (see "
                    "tandem status; routers and stores drain on SIGTERM)\n",
                    pos[0]);
            free(c);
            return TOOL_EXIT_USAGE;
        }
        if (!url_split(local->health_url, host, sizeof(host), &port, &path)) {
            fprintf(stderr, "tandem drain: %s has no usable metrics address (%s)\n", local->name,
                    local->health_url);
            free(c);
            return TOOL_EXIT_FAIL;
        }
        if (token == NULL && getenv("TANDEM_CLUSTER_TOKEN") == NULL &&
            read_local_token(c, tok_buf, sizeof(tok_buf)))
            token = tok_buf;
    }
    if (token == NULL)
        token = getenv("TANDEM_CLUSTER_TOKEN");
    char auth[320] = "";
    if (token != NULL && token[0] != '\0')
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s\r\n", token);
    httpc_response_t resp;
    char err[256];
    int r = httpc_request(host, port, "POST", "/drain", auth[0] ? auth : NULL, NULL, 0, 10000, NULL,
                          NULL, &resp, err, sizeof(err));
    memset(auth, 0, sizeof(auth));
    memset(tok_buf, 0, sizeof(tok_buf));
    int status = r == 0 ? resp.status : 0;
    if (status != 202) {
        if (r != 0)
            fprintf(stderr,
                    "tandem drain: no answer from %s:%d (%s); is it a node's metrics "
                    "address (--metrics-port)?\n",
                    host, port, err);
        else if (status == 401)
            fprintf(stderr,
                    "tandem drain: %s:%d wants the cluster token: set "
                    "TANDEM_CLUSTER_TOKEN or --cluster-token\n",
                    host, port);
        else
            fprintf(stderr, "tandem drain: %s:%d answered %d: %s", host, port, status,
                    resp.body != NULL ? resp.body : "\n");
        httpc_response_free(&resp);
        free(c);
        return TOOL_EXIT_FAIL;
    }
    printf("%s:%d: %s", host, port, resp.body != NULL ? resp.body : "draining\n");
    httpc_response_free(&resp);
    fflush(stdout);
    if (!wait) {
        free(c);
        return TOOL_EXIT_OK;
    }
    /* The node has exited when its /health stops answering (and, for a
     * local node, its process is gone). */
    char url[300];
    snprintf(url, sizeof(url), "http://%s:%d/health", host, port);
    double t0 = tool_now(), deadline = t0 + timeout_s;
    for (;;) {
        bool gone = http_get_status(url, 1000) == 0 && (local == NULL || !proc_alive(local));
        if (gone) {
            printf("%s:%d: drained and exited after %.1f s\n", host, port, tool_now() - t0);
            free(c);
            return TOOL_EXIT_OK;
        }
        if (tool_now() >= deadline) {
            fprintf(stderr, "tandem drain: %s:%d still runs after %d s (--timeout)\n", host, port,
                    timeout_s);
            free(c);
            return TOOL_EXIT_FAIL;
        }
        sleep_ms(200);
    }
}
