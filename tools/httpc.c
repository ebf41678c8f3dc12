/* tandem: the tools' blocking HTTP/1.1 client (see httpc.h).
 *
 * One request per connection ("Connection: close"): connect, send the
 * request, read the header block, then the body as Content-Length bytes,
 * as chunks (decoded here), or up to the close. Every wait is a poll() on
 * what is left of the call's deadline; every length read from the server
 * is checked against a limit before it is used. */
#define _GNU_SOURCE
#include "httpc.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HTTPC_MAX_HEADER     (64u << 10)  /* bytes of the status line + headers */
#define HTTPC_MAX_BODY       (256u << 20) /* bytes of a body kept in memory */
#define HTTPC_MAX_CHUNK_LINE 1024u        /* a chunk-size or trailer line */
#define HTTPC_MAX_CHUNK      (1ull << 40) /* one chunk's declared size */
#define HTTPC_READ_BUF       (64u << 10)

static int64_t httpc_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void httpc_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void httpc_err(char *err, size_t err_len, const char *fmt, ...)
{
    if (err == NULL || err_len == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

/* Waits until fd is ready for events or the deadline passes: 1 ready,
 * 0 timed out, -1 poll failed. */
static int httpc_wait(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - httpc_now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int rc = poll(&p, 1, left > 1000000 ? 1000000 : (int)left);
        if (rc > 0)
            return 1;
        if (rc < 0 && errno != EINTR)
            return -1;
    }
}

/* A connected non-blocking socket to host:port, or -1 with err set. */
static int httpc_connect(const char *host, int port, int64_t deadline, char *err, size_t err_len)
{
    char ps[16];
    snprintf(ps, sizeof(ps), "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(host, ps, &hints, &ai);
    if (gai != 0) {
        httpc_err(err, err_len, "cannot resolve %s: %s", host, gai_strerror(gai));
        errno = EHOSTUNREACH;
        return -1;
    }
    int fd = -1, last_errno = ECONNREFUSED;
    bool timed_out = false;
    for (struct addrinfo *a = ai; a != NULL && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            last_errno = errno;
            continue;
        }
        int rc = connect(fd, a->ai_addr, a->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
            int w = httpc_wait(fd, POLLOUT, deadline);
            int soerr = 0;
            socklen_t sl = sizeof(soerr);
            if (w == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0)
                rc = 0;
            else if (w == 0) {
                timed_out = true;
                errno = ETIMEDOUT;
            } else
                errno = soerr != 0 ? soerr : errno;
        }
        if (rc != 0) {
            last_errno = errno;
            close(fd);
            fd = -1;
            if (timed_out)
                break;
        }
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        if (timed_out)
            httpc_err(err, err_len, "connect to %s:%d timed out", host, port);
        else
            httpc_err(err, err_len, "cannot connect to %s:%d: %s", host, port,
                      strerror(last_errno));
        errno = timed_out ? ETIMEDOUT : last_errno;
    }
    return fd;
}

/* Sends all of buf before the deadline: 0, or -1 with err set. */
static int httpc_send_all(int fd, const char *buf, size_t len, int64_t deadline, char *err,
                          size_t err_len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(fd, buf + off, len - off, MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int w = httpc_wait(fd, POLLOUT, deadline);
            if (w == 1)
                continue;
            httpc_err(err, err_len,
                      w == 0 ? "timed out sending the request" : "poll failed while sending");
            if (w == 0)
                errno = ETIMEDOUT;
            return -1;
        }
        httpc_err(err, err_len, "send failed: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* The body's framing and the chunked decoder's state. */
typedef enum httpc_framing {
    HTTPC_FRAMING_NONE = 0,   /* no body (HEAD, 1xx, 204, 304) */
    HTTPC_FRAMING_LENGTH = 1, /* Content-Length bytes */
    HTTPC_FRAMING_CHUNKED = 2,
    HTTPC_FRAMING_CLOSE = 3, /* up to the end of the stream */
} httpc_framing_t;

typedef enum httpc_chunk_state {
    HTTPC_CHUNK_STATE_SIZE = 0, /* reading "hex[;ext]\r\n" */
    HTTPC_CHUNK_STATE_DATA = 1,
    HTTPC_CHUNK_STATE_DATA_END = 2, /* the "\r\n" after a chunk's data */
    HTTPC_CHUNK_STATE_TRAILER = 3,  /* trailer lines up to an empty one */
    HTTPC_CHUNK_STATE_DONE = 4,
} httpc_chunk_state_t;

typedef struct httpc_body {
    httpc_data_fn on_data;
    void *user;
    char *buf; /* kept body when on_data is NULL */
    size_t len, cap;
    bool stopped; /* on_data asked to stop */
    /* chunked */
    httpc_chunk_state_t state;
    char line[HTTPC_MAX_CHUNK_LINE];
    size_t line_len;
    uint64_t chunk_left;
    /* Content-Length */
    uint64_t length_left;
} httpc_body_t;

/* Hands decoded body bytes on: 0 ok, -1 too large or out of memory. */
static int httpc_body_emit(httpc_body_t *b, const char *data, size_t len, char *err, size_t err_len)
{
    if (len == 0 || b->stopped)
        return 0;
    if (b->on_data != NULL) {
        if (b->on_data(b->user, data, len) != 0)
            b->stopped = true;
        return 0;
    }
    if (len > HTTPC_MAX_BODY - b->len) {
        httpc_err(err, err_len, "response body over %u bytes", HTTPC_MAX_BODY);
        return -1;
    }
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len + 1)
            cap *= 2;
        char *nb = realloc(b->buf, cap);
        if (nb == NULL) {
            httpc_err(err, err_len, "out of memory for a %zu-byte body", b->len + len);
            return -1;
        }
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, data, len);
    b->len += len;
    b->buf[b->len] = '\0';
    return 0;
}

/* Parses a chunk-size line (extensions after ';' ignored): 0 ok. */
static int httpc_chunk_size(const char *line, size_t len, uint64_t *out)
{
    uint64_t v = 0;
    size_t i = 0, digits = 0;
    for (; i < len; i++) {
        char c = line[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0)
            break;
        v = v * 16 + (uint64_t)d;
        if (v > HTTPC_MAX_CHUNK)
            return -1;
        digits++;
    }
    while (i < len && (line[i] == ' ' || line[i] == '\t'))
        i++;
    if (digits == 0 || (i < len && line[i] != ';'))
        return -1;
    *out = v;
    return 0;
}

/* Feeds raw chunked bytes to the decoder: 0 ok, -1 malformed. */
static int httpc_chunked_feed(httpc_body_t *b, const char *p, size_t n, char *err, size_t err_len)
{
    size_t i = 0;
    while (i < n && b->state != HTTPC_CHUNK_STATE_DONE && !b->stopped) {
        switch (b->state) {
        case HTTPC_CHUNK_STATE_SIZE:
        case HTTPC_CHUNK_STATE_TRAILER: {
            char c = p[i++];
            if (c != '\n') {
                if (b->line_len + 1 >= sizeof(b->line)) {
                    httpc_err(err, err_len, "chunk line over %u bytes", HTTPC_MAX_CHUNK_LINE);
                    return -1;
                }
                b->line[b->line_len++] = c;
                break;
            }
            size_t ll = b->line_len;
            if (ll > 0 && b->line[ll - 1] == '\r')
                ll--;
            b->line_len = 0;
            if (b->state == HTTPC_CHUNK_STATE_TRAILER) {
                if (ll == 0)
                    b->state = HTTPC_CHUNK_STATE_DONE;
                break;
            }
            if (httpc_chunk_size(b->line, ll, &b->chunk_left) != 0) {
                httpc_err(err, err_len, "bad chunk size line");
                return -1;
            }
            b->state = b->chunk_left == 0 ? HTTPC_CHUNK_STATE_TRAILER : HTTPC_CHUNK_STATE_DATA;
            break;
        }
        case HTTPC_CHUNK_STATE_DATA: {
            size_t take = n - i;
            if ((uint64_t)take > b->chunk_left)
                take = (size_t)b->chunk_left;
            if (httpc_body_emit(b, p + i, take, err, err_len) != 0)
                return -1;
            i += take;
            b->chunk_left -= take;
            if (b->chunk_left == 0)
                b->state = HTTPC_CHUNK_STATE_DATA_END;
            break;
        }
        case HTTPC_CHUNK_STATE_DATA_END: {
            /* "\r\n" (a bare "\n" is tolerated) */
            char c = p[i++];
            if (c == '\r' && b->line_len == 0) {
                b->line_len = 1;
            } else if (c == '\n') {
                b->line_len = 0;
                b->state = HTTPC_CHUNK_STATE_SIZE;
            } else {
                httpc_err(err, err_len, "chunk data longer than its size");
                return -1;
            }
            break;
        }
        case HTTPC_CHUNK_STATE_DONE: break;
        }
    }
    return 0;
}

/* Raw body bytes as they came off the socket: 0 ok, -1 error. */
static int httpc_body_feed(httpc_body_t *b, httpc_framing_t fr, const char *p, size_t n, char *err,
                           size_t err_len)
{
    switch (fr) {
    case HTTPC_FRAMING_CHUNKED: return httpc_chunked_feed(b, p, n, err, err_len);
    case HTTPC_FRAMING_LENGTH: {
        size_t take = (uint64_t)n > b->length_left ? (size_t)b->length_left : n;
        b->length_left -= take;
        return httpc_body_emit(b, p, take, err, err_len);
    }
    case HTTPC_FRAMING_CLOSE: return httpc_body_emit(b, p, n, err, err_len);
    case HTTPC_FRAMING_NONE: return 0;
    }
    return 0;
}

static bool httpc_body_complete(const httpc_body_t *b, httpc_framing_t fr)
{
    if (b->stopped)
        return true;
    switch (fr) {
    case HTTPC_FRAMING_NONE: return true;
    case HTTPC_FRAMING_LENGTH: return b->length_left == 0;
    case HTTPC_FRAMING_CHUNKED: return b->state == HTTPC_CHUNK_STATE_DONE;
    case HTTPC_FRAMING_CLOSE: return false;
    }
    return false;
}

/* Header lookup in a raw block (status line first). */
static int httpc_header_in(const char *h, const char *name, char *buf, size_t cap)
{
    if (h == NULL || buf == NULL || cap == 0)
        return -1;
    size_t nl = strlen(name);
    const char *line = strchr(h, '\n'); /* skip the status line */
    while (line != NULL) {
        line++;
        const char *end = strchr(line, '\n');
        size_t ll = end ? (size_t)(end - line) : strlen(line);
        if (ll > nl && strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
            const char *v = line + nl + 1, *ve = line + ll;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            size_t vl = (size_t)(ve - v);
            if (vl + 1 > cap)
                return -1;
            memcpy(buf, v, vl);
            buf[vl] = '\0';
            return 0;
        }
        line = end;
    }
    return -1;
}

int httpc_header(const httpc_response_t *r, const char *name, char *buf, size_t cap)
{
    return r == NULL ? -1 : httpc_header_in(r->headers, name, buf, cap);
}

void httpc_response_free(httpc_response_t *r)
{
    if (r == NULL)
        return;
    free(r->headers);
    free(r->body);
    memset(r, 0, sizeof(*r));
}

/* Parses the header block (NUL-terminated, ending at the blank line) into
 * status and framing: 0 ok, -1 malformed. */
static int httpc_parse_head(const char *h, const char *method, int *status, httpc_framing_t *fr,
                            uint64_t *length, char *err, size_t err_len)
{
    int major = 0, minor = 0, st = 0, used = 0;
    if (sscanf(h, "HTTP/%d.%d %3d%n", &major, &minor, &st, &used) != 3 || major != 1 || st < 100 ||
        st > 999 || (h[used] != ' ' && h[used] != '\r' && h[used] != '\n')) {
        httpc_err(err, err_len, "not an HTTP/1.x status line");
        return -1;
    }
    *status = st;
    char v[128];
    if (strcasecmp(method, "HEAD") == 0 || st < 200 || st == 204 || st == 304) {
        *fr = HTTPC_FRAMING_NONE;
    } else if (httpc_header_in(h, "Transfer-Encoding", v, sizeof(v)) == 0) {
        size_t vl = strlen(v);
        if (vl < 7 || strcasecmp(v + vl - 7, "chunked") != 0) {
            httpc_err(err, err_len, "unsupported Transfer-Encoding \"%s\"", v);
            return -1;
        }
        *fr = HTTPC_FRAMING_CHUNKED;
    } else if (httpc_header_in(h, "Content-Length", v, sizeof(v)) == 0) {
        uint64_t n = 0;
        if (v[0] == '\0') {
            httpc_err(err, err_len, "empty Content-Length");
            return -1;
        }
        for (const char *c = v; *c != '\0'; c++) {
            if (*c < '0' || *c > '9' || n > (UINT64_MAX - 9) / 10) {
                httpc_err(err, err_len, "bad Content-Length \"%s\"", v);
                return -1;
            }
            n = n * 10 + (uint64_t)(*c - '0');
        }
        *fr = HTTPC_FRAMING_LENGTH;
        *length = n;
    } else {
        *fr = HTTPC_FRAMING_CLOSE;
    }
    return 0;
}

/* The position just past the first blank line ("\r\n\r\n" or "\n\n") of
 * buf[0..len), or 0 if none yet. */
static size_t httpc_head_end(const char *buf, size_t len)
{
    for (size_t i = 0; i + 1 < len; i++) {
        if (buf[i] != '\n')
            continue;
        if (buf[i + 1] == '\n')
            return i + 2;
        if (buf[i + 1] == '\r' && i + 2 < len && buf[i + 2] == '\n')
            return i + 3;
    }
    return 0;
}

int httpc_request(const char *host, int port, const char *method, const char *path,
                  const char *extra_headers, const char *body, size_t body_len, int timeout_ms,
                  httpc_data_fn on_data, void *user, httpc_response_t *out, char *err,
                  size_t err_len)
{
    memset(out, 0, sizeof(*out));
    if (err != NULL && err_len > 0)
        err[0] = '\0';
    int64_t deadline = httpc_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    int rc = -1, saved_errno = EPROTO;
    char *req = NULL, *rbuf = NULL, *head = NULL;
    httpc_body_t *b = calloc(1, sizeof(*b));
    if (b == NULL) {
        httpc_err(err, err_len, "out of memory");
        errno = ENOMEM;
        return -1;
    }
    b->on_data = on_data;
    b->user = user;
    int fd = httpc_connect(host, port, deadline, err, err_len);
    if (fd < 0) {
        saved_errno = errno;
        goto out;
    }
    /* The request line and headers, then the body. */
    size_t eh = extra_headers ? strlen(extra_headers) : 0;
    size_t cap = strlen(method) + strlen(path) + strlen(host) + eh + 256;
    req = malloc(cap);
    if (req == NULL) {
        httpc_err(err, err_len, "out of memory");
        saved_errno = ENOMEM;
        goto close_fd;
    }
    /* a body length unless a GET, HEAD or DELETE carries none */
    bool no_body = body_len == 0 && (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0 ||
                                     strcmp(method, "DELETE") == 0);
    char cl[48] = "";
    if (!no_body)
        snprintf(cl, sizeof(cl), "Content-Length: %zu\r\n", body_len);
    int hl = snprintf(req, cap, "%s %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n%s%s\r\n",
                      method, path, host, port, cl, extra_headers ? extra_headers : "");
    if (hl < 0 || (size_t)hl >= cap) {
        httpc_err(err, err_len, "request head too long");
        saved_errno = EINVAL;
        goto close_fd;
    }
    if (httpc_send_all(fd, req, (size_t)hl, deadline, err, err_len) != 0 ||
        (body_len > 0 && httpc_send_all(fd, body, body_len, deadline, err, err_len) != 0)) {
        saved_errno = errno;
        goto close_fd;
    }

    /* Header block: read until a blank line, skipping 1xx responses. */
    rbuf = malloc(HTTPC_READ_BUF);
    head = malloc(HTTPC_MAX_HEADER + 1);
    if (rbuf == NULL || head == NULL) {
        httpc_err(err, err_len, "out of memory");
        saved_errno = ENOMEM;
        goto close_fd;
    }
    size_t head_len = 0, end = 0;
    httpc_framing_t fr = HTTPC_FRAMING_CLOSE;
    bool eof = false, have_head = false;
    while (!have_head) {
        end = httpc_head_end(head, head_len);
        if (end > 0) {
            char saved = head[end];
            head[end] = '\0';
            int st = 0;
            if (httpc_parse_head(head, method, &st, &fr, &b->length_left, err, err_len) != 0) {
                saved_errno = EPROTO;
                goto close_fd;
            }
            head[end] = saved;
            if (st >= 100 && st < 200) { /* interim: drop it and read on */
                memmove(head, head + end, head_len - end);
                head_len -= end;
                continue;
            }
            out->status = st;
            out->headers = malloc(end + 1);
            if (out->headers == NULL) {
                httpc_err(err, err_len, "out of memory");
                saved_errno = ENOMEM;
                goto close_fd;
            }
            memcpy(out->headers, head, end);
            out->headers[end] = '\0';
            have_head = true;
            break;
        }
        if (eof) {
            httpc_err(err, err_len,
                      head_len ? "connection closed inside the response headers"
                               : "connection closed before any response");
            saved_errno = ECONNRESET;
            goto close_fd;
        }
        if (head_len >= HTTPC_MAX_HEADER) {
            httpc_err(err, err_len, "response headers over %u bytes", HTTPC_MAX_HEADER);
            saved_errno = EPROTO;
            goto close_fd;
        }
        int w = httpc_wait(fd, POLLIN, deadline);
        if (w != 1) {
            httpc_err(err, err_len,
                      w == 0 ? "timed out waiting for the response headers" : "poll failed");
            saved_errno = w == 0 ? ETIMEDOUT : errno;
            goto close_fd;
        }
        ssize_t n = recv(fd, head + head_len, HTTPC_MAX_HEADER - head_len, 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (n < 0) {
            httpc_err(err, err_len, "recv failed: %s", strerror(errno));
            saved_errno = errno;
            goto close_fd;
        }
        if (n == 0)
            eof = true;
        head_len += (size_t)n;
    }

    /* Body: what came with the headers, then the socket. */
    if (head_len > end && httpc_body_feed(b, fr, head + end, head_len - end, err, err_len) != 0) {
        saved_errno = EPROTO;
        goto close_fd;
    }
    while (!httpc_body_complete(b, fr)) {
        if (eof) {
            if (fr == HTTPC_FRAMING_CLOSE)
                break;
            if (fr == HTTPC_FRAMING_LENGTH)
                httpc_err(err, err_len, "connection closed with %llu body bytes still to come",
                          (unsigned long long)b->length_left);
            else
                httpc_err(err, err_len, "connection closed inside a chunked body");
            saved_errno = ECONNRESET;
            goto close_fd;
        }
        int w = httpc_wait(fd, POLLIN, deadline);
        if (w != 1) {
            httpc_err(err, err_len, w == 0 ? "timed out reading the response body" : "poll failed");
            saved_errno = w == 0 ? ETIMEDOUT : errno;
            goto close_fd;
        }
        ssize_t n = recv(fd, rbuf, HTTPC_READ_BUF, 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (n < 0) {
            httpc_err(err, err_len, "recv failed: %s", strerror(errno));
            saved_errno = errno;
            goto close_fd;
        }
        if (n == 0) {
            eof = true;
            continue;
        }
        if (httpc_body_feed(b, fr, rbuf, (size_t)n, err, err_len) != 0) {
            saved_errno = EPROTO;
            goto close_fd;
        }
    }
    if (on_data == NULL) {
        if (b->buf == NULL) {
            b->buf = malloc(1);
            if (b->buf == NULL) {
                httpc_err(err, err_len, "out of memory");
                saved_errno = ENOMEM;
                goto close_fd;
            }
            b->buf[0] = '\0';
        }
        out->body = b->buf;
        out->body_len = b->len;
        b->buf = NULL;
    }
    rc = 0;
close_fd:
    close(fd);
out:
    free(b->buf);
    free(b);
    free(head);
    free(rbuf);
    free(req);
    if (rc != 0)
        errno = saved_errno;
    return rc;
}
