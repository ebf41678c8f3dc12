/* tandem: a small blocking HTTP/1.1 client for the tools (bench serve, up,
 * status): one request per connection, Content-Length and chunked bodies,
 * a deadline on every call. Built for simplicity, not speed; it still
 * checks every length the server sends (headers at most 64 KiB, chunk
 * sizes, Content-Length, a kept body at most 256 MiB). */
#ifndef TANDEM_TOOLS_HTTPC_H
#define TANDEM_TOOLS_HTTPC_H

#include <stddef.h>

typedef struct httpc_response {
    int status;    /* HTTP status, 0 when no response came */
    char *headers; /* raw header block (malloc'd, NUL-terminated) */
    char *body;    /* malloc'd, NUL-terminated (also when binary) */
    size_t body_len;
} httpc_response_t;

/* Body bytes as they arrive (chunked decoding done); return nonzero to
 * stop reading (the call then returns 0 with what it had). */
typedef int (*httpc_data_fn)(void *user, const char *data, size_t len);

/* One request to host:port (IPv4 or a name). extra_headers: NULL or lines
 * each ending in "\r\n" (the call adds Host, Connection: close and
 * Content-Length when there is a body or the method is not GET, HEAD or
 * DELETE). timeout_ms bounds the whole call: connect, send, headers
 * and body. With on_data the body is handed over as it arrives and
 * out->body stays NULL. Returns 0 on a complete response (any status), -1
 * on a connection error, a malformed or oversized response (headers over
 * 64 KiB, a kept body over 256 MiB), a close before the body's end, or when
 * timeout_ms passed (errno ETIMEDOUT), with a reason in err (may be NULL).
 * out is always written: on -1 out->status and out->headers hold what came
 * (status 0 when no headers came). Call httpc_response_free after either
 * outcome. Blocking; safe to call from many threads at once. A name lookup
 * (getaddrinfo) is not bounded by timeout_ms: give an IP where that
 * matters. */
int httpc_request(const char *host, int port, const char *method, const char *path,
                  const char *extra_headers, const char *body, size_t body_len, int timeout_ms,
                  httpc_data_fn on_data, void *user, httpc_response_t *out, char *err,
                  size_t err_len);
void httpc_response_free(httpc_response_t *r);
/* The value of header `name` (case-insensitive, spaces trimmed) into buf;
 * 0 if found, -1 if absent or longer than cap - 1. */
int httpc_header(const httpc_response_t *r, const char *name, char *buf, size_t cap);

#endif
