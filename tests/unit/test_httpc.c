/* tools/httpc.c against a scripted server in a thread: Content-Length and
 * chunked bodies cut at odd places (one byte per write included), 1xx
 * interim responses, bodies read up to the close, on_data streaming and
 * stopping, and the failures: a stall (deadline), an early close, a bad
 * chunk size, oversized headers, a refused connection.
 *
 * The client is compiled in from tools/ (it is part of the tandem binary,
 * not of a library). */
#include "../../tools/httpc.c"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>

#include "test_util.h"

typedef enum srv_end {
    SRV_END_CLOSE = 0, /* close after the pieces */
    SRV_END_STALL = 1, /* keep the connection open until the client closes */
} srv_end_t;

typedef struct srv {
    int listen_fd;
    int port;
    const char *const *pieces; /* written one by one, 2 ms apart */
    size_t n_pieces;
    const char *big; /* written after the pieces when not NULL */
    bool bytewise;   /* every byte its own write */
    srv_end_t end;
    char request[4096]; /* what the client sent (head + body) */
    size_t request_len;
} srv_t;

static void srv_write(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

static void *srv_main(void *arg)
{
    srv_t *s = arg;
    struct pollfd pl = {.fd = s->listen_fd, .events = POLLIN};
    if (poll(&pl, 1, 5000) != 1)
        return NULL;
    int fd = accept(s->listen_fd, NULL, NULL);
    if (fd < 0)
        return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    /* the request: head, then Content-Length bytes */
    size_t want = 0;
    while (s->request_len < sizeof(s->request) - 1) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 5000) != 1)
            break;
        ssize_t n =
            recv(fd, s->request + s->request_len, sizeof(s->request) - 1 - s->request_len, 0);
        if (n <= 0)
            break;
        s->request_len += (size_t)n;
        s->request[s->request_len] = '\0';
        char *e = strstr(s->request, "\r\n\r\n");
        if (e != NULL) {
            char *cl = strcasestr(s->request, "Content-Length:");
            want = (size_t)(e + 4 - s->request) + (cl ? strtoul(cl + 15, NULL, 10) : 0);
            if (s->request_len >= want)
                break;
        }
    }
    for (size_t i = 0; i < s->n_pieces; i++) {
        const char *p = s->pieces[i];
        size_t n = strlen(p);
        if (s->bytewise) {
            for (size_t k = 0; k < n; k++) {
                srv_write(fd, p + k, 1);
                usleep(300);
            }
        } else {
            srv_write(fd, p, n);
            usleep(2000);
        }
    }
    if (s->big != NULL)
        srv_write(fd, s->big, strlen(s->big));
    if (s->end == SRV_END_STALL) {
        char tmp[256];
        for (int i = 0; i < 50; i++) { /* 5 s at most */
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, 100) == 1 && recv(fd, tmp, sizeof(tmp), 0) <= 0)
                break;
        }
    }
    close(fd);
    return NULL;
}

static int srv_listen(srv_t *s)
{
    s->listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sa);
    if (s->listen_fd < 0 || bind(s->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
        listen(s->listen_fd, 4) != 0 || getsockname(s->listen_fd, (struct sockaddr *)&sa, &sl) != 0)
        return -1;
    s->port = ntohs(sa.sin_port);
    return 0;
}

typedef struct collect {
    char buf[4096];
    size_t len;
    int calls;
    int stop_after; /* 0: never */
} collect_t;

static int collect_fn(void *user, const char *data, size_t len)
{
    collect_t *c = user;
    if (c->len + len < sizeof(c->buf)) {
        memcpy(c->buf + c->len, data, len);
        c->len += len;
        c->buf[c->len] = '\0';
    }
    c->calls++;
    return c->stop_after > 0 && c->calls >= c->stop_after;
}

typedef struct result {
    int rc;
    int err_no;
    double secs;
    httpc_response_t resp;
    char err[256];
    srv_t srv;
} result_t;

/* Runs one request against a server that plays `pieces`. */
static void run_case(result_t *r, const char *const *pieces, size_t n, bool bytewise, srv_end_t end,
                     const char *big, int timeout_ms, collect_t *c)
{
    memset(r, 0, sizeof(*r));
    r->srv.pieces = pieces;
    r->srv.n_pieces = n;
    r->srv.bytewise = bytewise;
    r->srv.end = end;
    r->srv.big = big;
    if (srv_listen(&r->srv) != 0) {
        r->rc = -2;
        return;
    }
    pthread_t th;
    pthread_create(&th, NULL, srv_main, &r->srv);
    int64_t t0 = httpc_now_ms();
    r->rc =
        httpc_request("127.0.0.1", r->srv.port, "POST", "/v1/x", "X-Test: yes\r\n", "{\"a\":1}", 7,
                      timeout_ms, c ? collect_fn : NULL, c, &r->resp, r->err, sizeof(r->err));
    r->err_no = errno;
    r->secs = (double)(httpc_now_ms() - t0) / 1000.0;
    pthread_join(th, NULL);
    close(r->srv.listen_fd);
}

#define N(a) (sizeof(a) / sizeof((a)[0]))

int main(void)
{
    result_t r;
    char v[64];

    /* Content-Length, the request as sent */
    static const char *const cl[] = {"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Mixed-Case: Yes "
                                     "\r\n\r\nhello",
                                     " world"};
    run_case(&r, cl, N(cl), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == 0 && r.resp.status == 200, "rc %d status %d: %s", r.rc, r.resp.status, r.err);
    CHECK(r.resp.body != NULL && r.resp.body_len == 11 && strcmp(r.resp.body, "hello world") == 0,
          "body %s", r.resp.body ? r.resp.body : "(null)");
    CHECK(httpc_header(&r.resp, "x-mixed-case", v, sizeof(v)) == 0 && strcmp(v, "Yes") == 0,
          "header lookup");
    CHECK(httpc_header(&r.resp, "x-absent", v, sizeof(v)) == -1, "absent header");
    CHECK(httpc_header(&r.resp, "x-mixed-case", v, 3) == -1, "header longer than the buffer");
    CHECK(strncmp(r.srv.request, "POST /v1/x HTTP/1.1\r\n", 21) == 0 &&
              strstr(r.srv.request, "X-Test: yes\r\n") != NULL &&
              strstr(r.srv.request, "Content-Length: 7\r\n") != NULL && r.srv.request_len >= 7 &&
              memcmp(r.srv.request + r.srv.request_len - 7, "{\"a\":1}", 7) == 0,
          "request as sent: %s", r.srv.request);
    httpc_response_free(&r.resp);
    printf("ok   Content-Length body, headers, request\n");

    /* chunked, cut inside the size line, the data, the CRLFs and the trailer */
    static const char *const ch[] = {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r",
                                     "\nhel",
                                     "lo\r\n",
                                     "6;name=val\r\n wor",
                                     "ld\r",
                                     "\n1",
                                     "0\r\n0123456789abcdef\r\n0\r\n",
                                     "X-Trailer: 1\r\n",
                                     "\r\n"};
    const char *want = "hello world0123456789abcdef";
    run_case(&r, ch, N(ch), false, SRV_END_STALL, NULL, 2000, NULL);
    CHECK(r.rc == 0 && r.resp.body && strcmp(r.resp.body, want) == 0, "chunked: rc %d %s body %s",
          r.rc, r.err, r.resp.body ? r.resp.body : "(null)");
    CHECK(r.secs < 1.0, "chunked body ends at the last chunk, not the close (%.2f s)", r.secs);
    httpc_response_free(&r.resp);
    /* the same, one byte per write, streamed */
    collect_t c = {0};
    run_case(&r, ch, N(ch), true, SRV_END_CLOSE, NULL, 5000, &c);
    CHECK(r.rc == 0 && r.resp.body == NULL && strcmp(c.buf, want) == 0 && c.calls >= 20,
          "bytewise chunked: rc %d %s, %d calls, %s", r.rc, r.err, c.calls, c.buf);
    httpc_response_free(&r.resp);
    printf("ok   chunked bodies cut at odd places (also one byte per write, streamed)\n");

    /* on_data asks to stop: a complete call with what it had */
    memset(&c, 0, sizeof(c));
    c.stop_after = 1;
    run_case(&r, ch, N(ch), false, SRV_END_STALL, NULL, 3000, &c);
    CHECK(r.rc == 0 && c.calls == 1 && r.secs < 1.0, "stop: rc %d calls %d %.2f s", r.rc, c.calls,
          r.secs);
    httpc_response_free(&r.resp);
    printf("ok   on_data stops the read\n");

    /* 100 Continue, then the answer; a body up to the close */
    static const char *const cont[] = {"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\n",
                                       "Content-Type: text/plain\r\n\r\nnot here", " at all"};
    run_case(&r, cont, N(cont), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == 0 && r.resp.status == 404 && strcmp(r.resp.body, "not here at all") == 0,
          "continue/close: rc %d status %d %s", r.rc, r.resp.status, r.err);
    httpc_response_free(&r.resp);
    printf("ok   1xx skipped, body read to the close\n");

    /* a server that stalls mid-body: the deadline, ETIMEDOUT */
    static const char *const stall[] = {"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"};
    run_case(&r, stall, N(stall), false, SRV_END_STALL, NULL, 300, NULL);
    CHECK(r.rc == -1 && r.err_no == ETIMEDOUT && r.secs >= 0.25 && r.secs < 2.0,
          "stall: rc %d errno %d %.2f s %s", r.rc, r.err_no, r.secs, r.err);
    CHECK(r.resp.status == 200, "the status of a timed-out response is kept (%d)", r.resp.status);
    httpc_response_free(&r.resp);
    /* ... and one that never answers */
    run_case(&r, NULL, 0, false, SRV_END_STALL, NULL, 300, NULL);
    CHECK(r.rc == -1 && r.err_no == ETIMEDOUT && r.secs < 2.0 && r.resp.status == 0,
          "silent: rc %d errno %d %.2f s", r.rc, r.err_no, r.secs);
    httpc_response_free(&r.resp);
    printf("ok   stalled servers time out (%s)\n", r.err);

    /* early closes */
    run_case(&r, stall, N(stall), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == -1 && r.secs < 1.0 && strstr(r.err, "closed") != NULL, "short body: rc %d %s",
          r.rc, r.err);
    httpc_response_free(&r.resp);
    static const char *const chshort[] = {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                          "10\r\nonly a few"};
    run_case(&r, chshort, N(chshort), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == -1 && strstr(r.err, "closed") != NULL, "short chunk: rc %d %s", r.rc, r.err);
    httpc_response_free(&r.resp);
    run_case(&r, NULL, 0, false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == -1 && r.resp.status == 0 && strstr(r.err, "closed") != NULL,
          "no response: rc %d %s", r.rc, r.err);
    httpc_response_free(&r.resp);
    static const char *const headshort[] = {"HTTP/1.1 200 OK\r\nContent-"};
    run_case(&r, headshort, N(headshort), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == -1 && r.resp.status == 0, "cut headers: rc %d %s", r.rc, r.err);
    httpc_response_free(&r.resp);
    printf("ok   early closes are errors (%s)\n", r.err);

    /* malformed framing */
    static const char *const badsize[] = {
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"};
    run_case(&r, badsize, N(badsize), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == -1 && strstr(r.err, "chunk") != NULL, "bad chunk size: rc %d %s", r.rc, r.err);
    httpc_response_free(&r.resp);
    static const char *const hugesize[] = {
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nab"};
    run_case(&r, hugesize, N(hugesize), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == -1 && strstr(r.err, "chunk") != NULL, "huge chunk: rc %d %s", r.rc, r.err);
    httpc_response_free(&r.resp);
    static const char *const overrun[] = {
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n"};
    run_case(&r, overrun, N(overrun), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == -1, "chunk longer than its size: rc %d %s", r.rc, r.err);
    httpc_response_free(&r.resp);
    static const char *const badlen[] = {"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\nabc"};
    run_case(&r, badlen, N(badlen), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == -1 && strstr(r.err, "Content-Length") != NULL, "bad length: rc %d %s", r.rc,
          r.err);
    httpc_response_free(&r.resp);
    static const char *const notthttp[] = {"SSH-2.0-OpenSSH\r\n\r\n"};
    run_case(&r, notthttp, N(notthttp), false, SRV_END_CLOSE, NULL, 2000, NULL);
    CHECK(r.rc == -1 && strstr(r.err, "status line") != NULL, "not http: rc %d %s", r.rc, r.err);
    httpc_response_free(&r.resp);
    /* headers without end: refused at 64 KiB, before the deadline */
    size_t big_n = 100000;
    char *big = malloc(big_n + 1);
    for (size_t i = 0; i < big_n; i++)
        big[i] = (i % 50 == 49) ? '\n' : 'h';
    big[big_n] = '\0';
    static const char *const bighead[] = {"HTTP/1.1 200 OK\r\n"};
    run_case(&r, bighead, N(bighead), false, SRV_END_STALL, big, 3000, NULL);
    CHECK(r.rc == -1 && strstr(r.err, "headers over") != NULL && r.secs < 2.0,
          "big headers: rc %d %s %.2f s", r.rc, r.err, r.secs);
    httpc_response_free(&r.resp);
    free(big);
    printf("ok   malformed responses are refused\n");

    /* nobody listening */
    srv_t s = {0};
    CHECK(srv_listen(&s) == 0, "listen");
    close(s.listen_fd);
    httpc_response_t resp;
    char err[256];
    int rc = httpc_request("127.0.0.1", s.port, "GET", "/", NULL, NULL, 0, 1000, NULL, NULL, &resp,
                           err, sizeof(err));
    CHECK(rc == -1 && errno == ECONNREFUSED && resp.status == 0, "refused: rc %d %s", rc, err);
    httpc_response_free(&resp);
    printf("ok   refused connection (%s)\n", err);
    return t_finish();
}
