/* The connection guard of the HTTP server (tdm_http_guard_t in
 * include/tandem/http.h), through tdm_http_server: idle connections over
 * max_connections are closed oldest first while /health keeps answering,
 * the per-address limit closes a connection over it at once and leaves
 * other addresses alone, a header sent a few bytes at a time is cut off at
 * the header deadline, and no descriptor is left after destroy. Loopback
 * only (127.0.0.1 and 127.0.0.2), ports picked by the kernel, every wait
 * bounded. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "../unit/test_util.h"
#include "tandem/http.h"
#include "tandem/log.h"

#define MAX_CONN      16
#define N_IDLE        100
#define PER_IP        4
#define HEADER_S      2
#define IO_TIMEOUT_MS 5000

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A connection from src (a loopback address) to port; -1 on failure. */
static int dial(const char *src, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {.tv_sec = IO_TIMEOUT_MS / 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    struct sockaddr_in a = {.sin_family = AF_INET};
    inet_pton(AF_INET, src, &a.sin_addr);
    struct sockaddr_in b = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    b.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        connect(fd, (struct sockaddr *)&b, sizeof(b)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The server closed fd (within ms): true. Data is not expected. */
static bool closed_within(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, ms) <= 0)
        return false;
    char b[256];
    ssize_t n = recv(fd, b, sizeof(b), MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
}

/* GET /health from src: the status, -1 without an answer; *ms its time. */
static int get_health(const char *src, int port, int64_t *ms)
{
    int64_t t0 = now_ms();
    int fd = dial(src, port);
    if (fd < 0)
        return -1;
    const char *req = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    int status = -1;
    if (send(fd, req, strlen(req), MSG_NOSIGNAL) == (ssize_t)strlen(req)) {
        char buf[512];
        ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
        if (n > 0) {
            buf[n] = '\0';
            if (sscanf(buf, "HTTP/1.%*d %d", &status) != 1)
                status = -1;
        }
    }
    close(fd);
    *ms = now_ms() - t0;
    return status;
}

static tdm_http_server_t *start(unsigned max_conn, unsigned per_ip, int *port)
{
    tdm_http_config_t cfg = {.host = "127.0.0.1",
                             .port = 0,
                             .max_connections = max_conn,
                             .max_connections_per_ip = per_ip,
                             .header_timeout_s = HEADER_S,
                             .timeout_s = 30,
                             .name = "guard-test"};
    tdm_http_server_t *s = NULL;
    if (tdm_http_server_create(&cfg, &s) != TDM_OK || tdm_http_server_start(s) != TDM_OK) {
        tdm_http_server_destroy(s);
        return NULL;
    }
    *port = tdm_http_server_port(s);
    return s;
}

/* N_IDLE idle connections against a limit of MAX_CONN: the oldest are
 * closed as new ones come, /health answers meanwhile. */
static void test_shed_idle(void)
{
    int port = 0;
    tdm_http_server_t *s = start(MAX_CONN, 0, &port);
    CHECK(s != NULL, "server with max_connections %d", MAX_CONN);
    if (s == NULL)
        return;
    int fds[N_IDLE];
    int n_open = 0;
    for (int i = 0; i < N_IDLE; i++) {
        fds[i] = dial("127.0.0.1", port);
        n_open += fds[i] >= 0;
        usleep(1000); /* in order: the oldest is the first */
    }
    CHECK(n_open == N_IDLE, "%d of %d idle connections made", n_open, N_IDLE);
    int64_t ms = 0;
    int st = get_health("127.0.0.1", port, &ms);
    CHECK(st == 200, "/health with %d idle connections open against a limit of %d: %d in %lld ms",
          N_IDLE, MAX_CONN, st, (long long)ms);
    printf("/health with %d idle connections open against a limit of %d: %d in %lld ms\n", N_IDLE,
           MAX_CONN, st, (long long)ms);
    /* the first ones were closed for the later ones, the last MAX_CONN - 1
     * stay (one slot went to /health) */
    int first_closed = 0, last_open = 0;
    for (int i = 0; i < N_IDLE; i++) {
        if (fds[i] < 0)
            continue;
        bool closed = closed_within(fds[i], i < N_IDLE - MAX_CONN ? 1000 : 0);
        if (i < N_IDLE - MAX_CONN)
            first_closed += closed;
        else if (i >= N_IDLE - MAX_CONN + 1)
            last_open += !closed;
    }
    CHECK(first_closed == N_IDLE - MAX_CONN, "the oldest %d were closed (%d)", N_IDLE - MAX_CONN,
          first_closed);
    CHECK(last_open == MAX_CONN - 1, "the newest %d stay open (%d)", MAX_CONN - 1, last_open);
    for (int i = 0; i < N_IDLE; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    tdm_http_server_destroy(s);
}

/* One address gets PER_IP connections, the next is closed at accept;
 * another address is served. */
static void test_per_address(void)
{
    int port = 0;
    tdm_http_server_t *s = start(MAX_CONN, PER_IP, &port);
    CHECK(s != NULL, "server with %d connections per address", PER_IP);
    if (s == NULL)
        return;
    int fds[PER_IP + 2];
    for (int i = 0; i < PER_IP + 2; i++)
        fds[i] = dial("127.0.0.1", port);
    int closed = 0;
    for (int i = 0; i < PER_IP + 2; i++)
        closed += fds[i] >= 0 && closed_within(fds[i], i < PER_IP ? 0 : 1000);
    CHECK(closed == 2, "%d connections from one address: 2 closed at once (%d)", PER_IP + 2,
          closed);
    int64_t ms = 0;
    int st = get_health("127.0.0.2", port, &ms);
    CHECK(st == 200, "another address is served: %d in %lld ms", st, (long long)ms);
    for (int i = 0; i < PER_IP + 2; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    tdm_http_server_destroy(s);
}

/* A header that trickles in is cut off at the deadline, counted from the
 * connection's start, whatever bytes arrive meanwhile. */
static void test_header_deadline(void)
{
    int port = 0;
    tdm_http_server_t *s = start(MAX_CONN, 0, &port);
    CHECK(s != NULL, "server with headers within %d s", HEADER_S);
    if (s == NULL)
        return;
    int fd = dial("127.0.0.1", port);
    int64_t t0 = now_ms();
    const char *line = "GET /health HTTP/1.1\r\n";
    send(fd, line, strlen(line), MSG_NOSIGNAL);
    bool closed = false;
    while (!closed && now_ms() - t0 < (HEADER_S + 3) * 1000) {
        send(fd, "X-a: b\r\n", 8, MSG_NOSIGNAL);
        closed = closed_within(fd, 300);
    }
    int64_t took = now_ms() - t0;
    CHECK(closed && took >= HEADER_S * 1000 - 200 && took <= HEADER_S * 1000 + 1000,
          "8 bytes every 300 ms: closed after %lld ms (deadline %d s)", (long long)took, HEADER_S);
    printf("a header sent 8 bytes every 300 ms: closed after %lld ms (deadline %d s)\n",
           (long long)took, HEADER_S);
    close(fd);
    /* a whole request within the deadline is answered */
    int64_t ms = 0;
    int st = get_health("127.0.0.1", port, &ms);
    CHECK(st == 200, "a prompt request: %d in %lld ms", st, (long long)ms);
    tdm_http_server_destroy(s);
}

int main(void)
{
    tdm_log_set_level(getenv("TEST_DEBUG") != NULL ? TDM_LOG_LEVEL_DEBUG : TDM_LOG_LEVEL_INFO);
    int fds0 = t_count_fds();
    test_shed_idle();
    test_per_address();
    test_header_deadline();
    int fds1 = t_count_fds();
    CHECK(fds1 == fds0, "no descriptor left: %d before, %d after", fds0, fds1);
    return t_finish();
}
