/* The transport's connection handshake (net/handshake.h) over real
 * sockets, both ends in this process on loopback, one thread driving both:
 *   - a connection comes up both ways; sends made before it is up arrive,
 *     in order; data both ways;
 *   - a wrong token, no token, and bytes that are not tandem's are refused
 *     (the client's connection fails, the listener counts a refusal) and
 *     the listener keeps accepting;
 *   - a connection that says nothing is closed at the handshake deadline;
 *   - a close on one side fails the connection on the other at once (the
 *     bye), not at a timeout;
 *   - 300 connect / close cycles leave no file descriptor behind. */
#include "../unit/test_util.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "tandem/net.h"

#define TOKEN "handshake-test-token"
#define AM_ID 3

typedef struct side {
    tdm_conn_t *accepted[8];
    int n_accepted;
    int n_msgs;
    uint32_t last_seq;
    bool in_order;
    int n_errors;
    tdm_conn_t *last_conn;
} side_t;

static void on_accept(void *user, tdm_conn_t *conn)
{
    side_t *s = user;
    if (s->n_accepted < 8)
        s->accepted[s->n_accepted] = conn;
    s->n_accepted++;
}

static void on_msg(void *user, const tdm_net_msg_t *msg)
{
    side_t *s = user;
    uint32_t seq = 0;
    if (msg->length == sizeof(seq) && msg->data != NULL)
        memcpy(&seq, msg->data, sizeof(seq));
    if (s->n_msgs > 0 && seq != s->last_seq + 1)
        s->in_order = false;
    s->last_seq = seq;
    s->n_msgs++;
    s->last_conn = msg->conn;
}

static void on_error(void *user, tdm_conn_t *conn, tdm_status_t why)
{
    (void)conn;
    (void)why;
    ((side_t *)user)->n_errors++;
}

static void pump(tdm_net_t *a, tdm_net_t *b, int ms, bool (*done)(void *), void *arg)
{
    int64_t end = tdm_net_now_ms() + ms;
    while (tdm_net_now_ms() < end) {
        int n = tdm_net_progress(a) + tdm_net_progress(b);
        if (done != NULL && done(arg))
            return;
        if (n == 0)
            tdm_net_wait(a, 1);
    }
}

static bool got_errors(void *arg)
{
    return ((side_t *)arg)->n_errors > 0;
}
static int want_msgs;
static bool got_msgs(void *arg)
{
    return ((side_t *)arg)->n_msgs >= want_msgs;
}

static tdm_net_t *make_net(const char *name, const char *token, side_t *s)
{
    tdm_net_config_t nc = {.name = name, .token = token, .local_addr = "127.0.0.1"};
    tdm_net_t *net = NULL;
    CHECK(tdm_net_create(&nc, &net) == TDM_OK, "%s: create", name);
    if (net != NULL)
        CHECK(tdm_net_set_handler(net, AM_ID, on_msg, s) == TDM_OK, "%s: handler", name);
    return net;
}

static void send_seq(tdm_conn_t *c, uint32_t seq)
{
    CHECK(tdm_conn_send(c, AM_ID, NULL, 0, &seq, sizeof(seq), true, NULL, NULL) == TDM_OK,
          "send %u", seq);
}

/* A client of the given token against the server: refused or not. */
static void try_token(tdm_net_t *server, side_t *ss, int port, const char *token, bool ok)
{
    side_t cs = {.in_order = true};
    tdm_net_t *cn = make_net("client", token, &cs);
    if (cn == NULL)
        return;
    uint64_t refused0 = tdm_net_refused(server);
    int acc0 = ss->n_accepted;
    tdm_conn_t *c = NULL;
    CHECK(tdm_net_connect(cn, "127.0.0.1", port, &c) == TDM_OK, "connect");
    tdm_conn_set_owner(c, &cs, on_error);
    send_seq(c, 1);
    want_msgs = ss->n_msgs + 1;
    pump(server, cn, 3000, ok ? got_msgs : got_errors, ok ? (void *)ss : (void *)&cs);
    if (ok) {
        CHECK(ss->n_accepted == acc0 + 1 && cs.n_errors == 0, "token %s: not accepted",
              token ? token : "(none)");
    } else {
        CHECK(cs.n_errors == 1, "token %s: the client's connection did not fail",
              token ? token : "(none)");
        CHECK(ss->n_accepted == acc0, "token %s: accepted", token ? token : "(none)");
        CHECK(tdm_net_refused(server) == refused0 + 1, "token %s: refused %llu, want %llu",
              token ? token : "(none)", (unsigned long long)tdm_net_refused(server),
              (unsigned long long)(refused0 + 1));
    }
    tdm_conn_close(c, true);
    tdm_net_destroy(cn);
}

static int raw_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int main(void)
{
    side_t ss = {.in_order = true}, cs = {.in_order = true};
    tdm_net_t *server = make_net("server", TOKEN, &ss);
    tdm_net_t *client = make_net("client", TOKEN, &cs);
    if (server == NULL || client == NULL)
        return t_finish();
    CHECK(tdm_net_listen(server, "127.0.0.1", 0, on_accept, &ss) == TDM_OK, "listen");
    int port = tdm_net_listen_port(server);
    CHECK(port > 0, "port %d", port);

    /* up both ways; sends queued before the handshake ends arrive in order */
    tdm_conn_t *c = NULL;
    CHECK(tdm_net_connect(client, "127.0.0.1", port, &c) == TDM_OK, "connect");
    tdm_conn_set_owner(c, &cs, on_error);
    for (uint32_t i = 1; i <= 50; i++)
        send_seq(c, i);
    want_msgs = 50;
    pump(server, client, 5000, got_msgs, &ss);
    CHECK(ss.n_accepted == 1 && ss.n_msgs == 50 && ss.in_order,
          "server: %d accepted, %d messages, in order %d", ss.n_accepted, ss.n_msgs, ss.in_order);
    CHECK(ss.last_conn == ss.accepted[0], "messages come on the accepted connection");
    if (ss.n_accepted == 1) {
        tdm_conn_set_owner(ss.accepted[0], &ss, on_error);
        for (uint32_t i = 1; i <= 20; i++)
            send_seq(ss.accepted[0], i);
        want_msgs = 20;
        pump(server, client, 5000, got_msgs, &cs);
        CHECK(cs.n_msgs == 20 && cs.in_order && cs.last_conn == c,
              "client: %d messages, in order %d", cs.n_msgs, cs.in_order);
    }

    /* a close on the server side fails the client's connection at once */
    if (ss.n_accepted == 1) {
        int64_t t0 = tdm_net_now_ms();
        tdm_conn_close(ss.accepted[0], true);
        ss.n_accepted = 0;
        pump(server, client, 3000, got_errors, &cs);
        int64_t took = tdm_net_now_ms() - t0;
        CHECK(cs.n_errors == 1 && took < 1000, "the client saw the close after %lld ms (%d)",
              (long long)took, cs.n_errors);
        printf("close seen by the peer after %lld ms\n", (long long)took);
    }
    tdm_conn_close(c, true);
    pump(server, client, 50, NULL, NULL);

    /* refusals */
    try_token(server, &ss, port, "not-the-token", false);
    try_token(server, &ss, port, NULL, false);
    try_token(server, &ss, port, TOKEN, true);
    for (int i = 0; i < ss.n_accepted && i < 8; i++)
        tdm_conn_close(ss.accepted[i], true);
    ss.n_accepted = 0;

    /* bytes that are not tandem's, and a peer that says nothing */
    uint64_t r0 = tdm_net_refused(server);
    int fd = raw_connect(port);
    static const char junk[17];
    CHECK(fd >= 0 && write(fd, junk, sizeof(junk)) == (ssize_t)sizeof(junk), "junk");
    close(fd);
    int fd_idle = raw_connect(port);
    CHECK(fd_idle >= 0, "idle connect");
    int64_t t0 = tdm_net_now_ms();
    while (tdm_net_refused(server) < r0 + 2 && tdm_net_now_ms() - t0 < 8000) {
        tdm_net_progress(server);
        tdm_net_wait(server, 10);
    }
    int64_t took = tdm_net_now_ms() - t0;
    CHECK(tdm_net_refused(server) == r0 + 2, "junk and idle: %llu refused",
          (unsigned long long)(tdm_net_refused(server) - r0));
    CHECK(took >= 4000 && took < 7000, "the idle connection closed after %lld ms", (long long)took);
    char b;
    CHECK(fd_idle >= 0 && read(fd_idle, &b, 1) == 0, "the idle connection is closed");
    if (fd_idle >= 0)
        close(fd_idle);

    /* connect / close cycles leave nothing behind */
    int cycles = t_sanitized() ? 100 : 300;
    int fds0 = t_count_fds();
    int ok = 0;
    for (int i = 0; i < cycles; i++) {
        side_t s2 = {.in_order = true};
        tdm_conn_t *cc = NULL;
        if (tdm_net_connect(client, "127.0.0.1", port, &cc) != TDM_OK)
            continue;
        tdm_conn_set_owner(cc, &s2, on_error);
        ss.n_accepted = 0;
        ss.n_msgs = 0;
        send_seq(cc, 1);
        want_msgs = 1;
        pump(server, client, 3000, got_msgs, &ss);
        if (ss.n_accepted == 1 && ss.n_msgs == 1)
            ok++;
        if (ss.n_accepted == 1) /* clean and forced closes, on either side first */
            tdm_conn_close(ss.accepted[0], i % 2 == 0);
        tdm_conn_close(cc, i % 3 == 0);
        pump(server, client, 5, NULL, NULL);
    }
    pump(server, client, 500, NULL, NULL);
    int fds1 = t_count_fds();
    CHECK(ok == cycles, "%d of %d cycles worked", ok, cycles);
    CHECK(fds1 <= fds0 + 4, "file descriptors: %d before %d cycles, %d after", fds0, cycles, fds1);
    printf("%d connect/close cycles: fds %d -> %d\n", cycles, fds0, fds1);

    tdm_net_destroy(client);
    tdm_net_destroy(server);
    return t_finish();
}
