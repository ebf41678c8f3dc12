/* tandem: the connection guard of a libmicrohttpd daemon (see
 * include/tandem/http.h): phases, deadlines, and shedding the oldest idle
 * connection when the limit is reached.
 *
 * Each connection libmicrohttpd accepts gets a slot (allocated with the
 * guard, one per connection libmicrohttpd may hold) through
 * MHD_OPTION_NOTIFY_CONNECTION; the slot is the connection's socket
 * context. Idle slots sit in one list and body slots in another, each in
 * the order they entered the phase, so the oldest is at the head: the
 * header deadline stops at the first slot that is not late, and the victim
 * of a shed is the head.
 *
 * Closing: the guard calls shutdown(fd, SHUT_RDWR) under its lock. The
 * connection's own thread then reads the end of the stream and closes it;
 * libmicrohttpd notifies MHD_CONNECTION_NOTIFY_CLOSED (which takes the
 * lock and frees the slot) before it closes the descriptor, so a
 * descriptor the guard shuts down is never one already reused by another
 * connection.
 *
 * Threads: the daemon's threads (notifications, the access handler's
 * reports, the logger) and the guard's own thread (deadlines, the summary
 * line every 10 s); one lock for the lists and counters, another for the
 * logger's budget. */
#define _GNU_SOURCE
#include <errno.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "tandem/http.h"
#include "tandem/log.h"
#include "tandem/net.h"

#define MOD "http"

#define GUARD_TICK_MS             100
#define GUARD_SUMMARY_MS          10000
#define GUARD_DEFAULT_HEADER_MS   10000
#define GUARD_DEFAULT_MIN_RATE    1024
#define GUARD_LOG_WINDOW_MS       10000
#define GUARD_LOG_PER_WINDOW      5
#define GUARD_MIN_ACTIVE_HEADROOM 64

typedef enum guard_phase {
    GUARD_PHASE_FREE = 0, /* the slot is unused */
    GUARD_PHASE_IDLE,     /* waiting for a request's headers */
    GUARD_PHASE_BODY,     /* reading a request's body */
    GUARD_PHASE_ACTIVE,   /* answering */
    GUARD_PHASE_CLOSING,  /* shut down by the guard; libmicrohttpd closes it */
} guard_phase_t;

typedef enum guard_reason {
    GUARD_REASON_LIMIT = 0,
    GUARD_REASON_HEADER,
    GUARD_REASON_BODY,
    GUARD_REASON_COUNT,
} guard_reason_t;

static const char *const guard_reason_names[GUARD_REASON_COUNT] = {"limit", "header_timeout",
                                                                   "body_too_slow"};

typedef struct guard_slot guard_slot_t;
struct guard_slot {
    guard_slot_t *prev, *next; /* in the list of its phase, or the free list */
    int fd;
    guard_phase_t phase;
    int64_t since_ms;    /* when the phase began */
    uint64_t body_bytes; /* body bytes in the body phase */
};

typedef struct guard_list {
    guard_slot_t *head, *tail;
} guard_list_t;

struct tdm_http_guard {
    char *name;
    unsigned max_conn;  /* shedding starts past this */
    unsigned hard_conn; /* libmicrohttpd's limit; slots allocated */
    unsigned per_ip;
    int64_t header_ms, body_grace_ms;
    uint64_t body_min_rate;

    pthread_mutex_t lock; /* everything below but the logger's budget */
    pthread_cond_t cond;
    guard_slot_t *slots; /* [hard_conn] */
    guard_slot_t *free_list;
    guard_list_t idle, body;
    uint64_t n_open, n_closing, accepted, peak;
    uint64_t closed[GUARD_REASON_COUNT];
    uint64_t logged[GUARD_REASON_COUNT]; /* counts at the last summary */
    bool stopping;
    pthread_t thread;

    tdm_metrics_gauge_t *m_open;
    tdm_metrics_counter_t *m_closed[GUARD_REASON_COUNT];

    pthread_mutex_t log_lock;
    int64_t log_window_ms; /* start of the current window */
    unsigned log_in_window, log_suppressed;
};

/* ---- lists (lock held) ---- */

static void list_push(guard_list_t *l, guard_slot_t *s)
{
    s->next = NULL;
    s->prev = l->tail;
    if (l->tail != NULL)
        l->tail->next = s;
    else
        l->head = s;
    l->tail = s;
}

static void list_remove(guard_list_t *l, guard_slot_t *s)
{
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        l->head = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    else
        l->tail = s->prev;
    s->prev = s->next = NULL;
}

static guard_list_t *phase_list(tdm_http_guard_t *g, guard_phase_t phase)
{
    switch (phase) {
    case GUARD_PHASE_IDLE: return &g->idle;
    case GUARD_PHASE_BODY: return &g->body;
    case GUARD_PHASE_FREE:
    case GUARD_PHASE_ACTIVE:
    case GUARD_PHASE_CLOSING: return NULL;
    }
    return NULL;
}

/* Moves a tracked slot to another phase (lock held); a closing slot stays
 * closing. */
static void slot_enter(tdm_http_guard_t *g, guard_slot_t *s, guard_phase_t phase, int64_t now)
{
    if (s->phase == GUARD_PHASE_CLOSING || s->phase == GUARD_PHASE_FREE)
        return;
    guard_list_t *from = phase_list(g, s->phase);
    if (from != NULL)
        list_remove(from, s);
    s->phase = phase;
    s->since_ms = now;
    s->body_bytes = 0;
    guard_list_t *to = phase_list(g, phase);
    if (to != NULL)
        list_push(to, s);
}

/* Shuts the connection down (lock held): its thread closes it. */
static void slot_close(tdm_http_guard_t *g, guard_slot_t *s, guard_reason_t why)
{
    guard_list_t *from = phase_list(g, s->phase);
    if (from != NULL)
        list_remove(from, s);
    s->phase = GUARD_PHASE_CLOSING;
    g->n_closing++;
    g->closed[why]++;
    if (g->m_closed[why] != NULL)
        tdm_metrics_counter_inc(g->m_closed[why]);
    if (shutdown(s->fd, SHUT_RDWR) != 0 && errno != ENOTCONN)
        tdm_log_debug(MOD, "%s: shutdown of connection %d: %s", g->name, s->fd, strerror(errno));
}

/* ---- libmicrohttpd callbacks ---- */

static guard_slot_t *conn_slot(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci != NULL ? ci->socket_context : NULL;
}

static void guard_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                         enum MHD_ConnectionNotificationCode code)
{
    tdm_http_guard_t *g = cls;
    int64_t now = tdm_net_now_ms();
    pthread_mutex_lock(&g->lock);
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        g->accepted++;
        g->n_open++;
        if (g->n_open > g->peak)
            g->peak = g->n_open;
        guard_slot_t *s = g->free_list;
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (s == NULL || ci == NULL) {
            /* cannot happen while libmicrohttpd keeps its limit; such a
             * connection has only libmicrohttpd's idle timeout */
            s = NULL;
            *socket_context = NULL;
        } else {
            g->free_list = s->next;
            s->fd = ci->connect_fd;
            s->phase = GUARD_PHASE_IDLE;
            s->since_ms = now;
            s->body_bytes = 0;
            list_push(&g->idle, s);
            *socket_context = s;
        }
        /* over the limit: the oldest idle connection makes room (never the
         * new one: with nothing else to close, libmicrohttpd's own limit
         * decides) */
        while (g->n_open - g->n_closing > g->max_conn) {
            guard_slot_t *victim = g->idle.head;
            if (victim == s)
                victim = victim->next;
            if (victim == NULL)
                victim = g->body.head;
            if (victim == NULL)
                break;
            slot_close(g, victim, GUARD_REASON_LIMIT);
        }
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        guard_slot_t *s = *socket_context;
        if (s != NULL) {
            if (s->phase == GUARD_PHASE_CLOSING) {
                g->n_closing--;
            } else {
                guard_list_t *from = phase_list(g, s->phase);
                if (from != NULL)
                    list_remove(from, s);
            }
            s->phase = GUARD_PHASE_FREE;
            s->fd = -1;
            s->next = g->free_list;
            g->free_list = s;
            *socket_context = NULL;
        }
        g->n_open--;
    }
    if (g->m_open != NULL)
        tdm_metrics_gauge_set(g->m_open, (double)g->n_open);
    pthread_mutex_unlock(&g->lock);
}

/* libmicrohttpd's messages, at most GUARD_LOG_PER_WINDOW per window: under
 * a flood it writes one per refused connection. */
static void guard_log(void *cls, const char *fmt, va_list ap)
{
    tdm_http_guard_t *g = cls;
    int64_t now = tdm_net_now_ms();
    unsigned suppressed = 0;
    bool show;
    pthread_mutex_lock(&g->log_lock);
    if (now - g->log_window_ms >= GUARD_LOG_WINDOW_MS) {
        suppressed = g->log_suppressed;
        g->log_window_ms = now;
        g->log_in_window = 0;
        g->log_suppressed = 0;
    }
    show = g->log_in_window < GUARD_LOG_PER_WINDOW;
    if (show)
        g->log_in_window++;
    else
        g->log_suppressed++;
    pthread_mutex_unlock(&g->log_lock);
    /* info: what libmicrohttpd reports at run time is about one client
     * (a closed connection, a limit reached); failures to start are
     * logged as errors by the caller */
    if (suppressed > 0)
        tdm_log_info(MOD, "%s: libmicrohttpd: %u more message(s) in the last %d s not shown",
                     g->name, suppressed, GUARD_LOG_WINDOW_MS / 1000);
    if (!show)
        return;
    char line[512];
    vsnprintf(line, sizeof(line), fmt, ap);
    line[strcspn(line, "\n")] = '\0';
    tdm_log_info(MOD, "%s: libmicrohttpd: %s", g->name, line);
}

/* ---- reports from the access handler ---- */

void tdm_http_guard_headers(tdm_http_guard_t *g, struct MHD_Connection *conn, bool with_body)
{
    guard_slot_t *s = conn_slot(conn);
    if (g == NULL || s == NULL)
        return;
    int64_t now = tdm_net_now_ms();
    pthread_mutex_lock(&g->lock);
    slot_enter(g, s, with_body ? GUARD_PHASE_BODY : GUARD_PHASE_ACTIVE, now);
    pthread_mutex_unlock(&g->lock);
}

void tdm_http_guard_body(tdm_http_guard_t *g, struct MHD_Connection *conn, size_t n)
{
    guard_slot_t *s = conn_slot(conn);
    if (g == NULL || s == NULL)
        return;
    pthread_mutex_lock(&g->lock);
    if (s->phase == GUARD_PHASE_BODY)
        s->body_bytes += n;
    pthread_mutex_unlock(&g->lock);
}

void tdm_http_guard_active(tdm_http_guard_t *g, struct MHD_Connection *conn)
{
    guard_slot_t *s = conn_slot(conn);
    if (g == NULL || s == NULL)
        return;
    int64_t now = tdm_net_now_ms();
    pthread_mutex_lock(&g->lock);
    if (s->phase != GUARD_PHASE_ACTIVE)
        slot_enter(g, s, GUARD_PHASE_ACTIVE, now);
    pthread_mutex_unlock(&g->lock);
}

void tdm_http_guard_request_done(tdm_http_guard_t *g, struct MHD_Connection *conn)
{
    guard_slot_t *s = conn_slot(conn);
    if (g == NULL || s == NULL)
        return;
    int64_t now = tdm_net_now_ms();
    pthread_mutex_lock(&g->lock);
    slot_enter(g, s, GUARD_PHASE_IDLE, now);
    pthread_mutex_unlock(&g->lock);
}

/* ---- the guard's thread ---- */

/* Closes what missed its deadline (lock held). */
static void guard_sweep(tdm_http_guard_t *g, int64_t now)
{
    /* idle: oldest first, so the first one in time ends the walk */
    while (g->idle.head != NULL && now - g->idle.head->since_ms >= g->header_ms)
        slot_close(g, g->idle.head, GUARD_REASON_HEADER);
    guard_slot_t *next;
    for (guard_slot_t *s = g->body.head; s != NULL; s = next) {
        next = s->next;
        int64_t late = now - s->since_ms - g->body_grace_ms;
        if (late > 0 && s->body_bytes < (uint64_t)late * g->body_min_rate / 1000)
            slot_close(g, s, GUARD_REASON_BODY);
    }
}

static void guard_summary(tdm_http_guard_t *g)
{
    uint64_t d[GUARD_REASON_COUNT];
    bool any = false;
    for (int i = 0; i < GUARD_REASON_COUNT; i++) {
        d[i] = g->closed[i] - g->logged[i];
        g->logged[i] = g->closed[i];
        any = any || d[i] > 0;
    }
    if (!any)
        return;
    tdm_log_info(MOD,
                 "%s: closed in the last %d s: %llu idle for new connections (limit %u), "
                 "%llu without headers in %lld ms, %llu with a body under %llu bytes/s; "
                 "%llu open",
                 g->name, GUARD_SUMMARY_MS / 1000, (unsigned long long)d[GUARD_REASON_LIMIT],
                 g->max_conn, (unsigned long long)d[GUARD_REASON_HEADER], (long long)g->header_ms,
                 (unsigned long long)d[GUARD_REASON_BODY], (unsigned long long)g->body_min_rate,
                 (unsigned long long)g->n_open);
}

static void *guard_main(void *arg)
{
    tdm_http_guard_t *g = arg;
    int64_t next_summary = tdm_net_now_ms() + GUARD_SUMMARY_MS;
    pthread_mutex_lock(&g->lock);
    while (!g->stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += GUARD_TICK_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&g->cond, &g->lock, &ts);
        if (g->stopping)
            break;
        int64_t now = tdm_net_now_ms();
        guard_sweep(g, now);
        if (now >= next_summary) {
            guard_summary(g);
            next_summary = now + GUARD_SUMMARY_MS;
        }
    }
    pthread_mutex_unlock(&g->lock);
    return NULL;
}

/* ---- life cycle ---- */

static tdm_status_t guard_metrics(tdm_http_guard_t *g, const tdm_http_guard_config_t *cfg)
{
    if (cfg->registry == NULL || cfg->metrics_prefix == NULL)
        return TDM_OK;
    char name[160], help[160];
    snprintf(name, sizeof(name), "%s_connections", cfg->metrics_prefix);
    snprintf(help, sizeof(help), "Open connections of the %s.", g->name);
    tdm_status_t st = tdm_metrics_gauge_register(cfg->registry, name, help, &g->m_open);
    if (st != TDM_OK)
        return st;
    snprintf(name, sizeof(name), "%s_connections_closed_total", cfg->metrics_prefix);
    snprintf(help, sizeof(help),
             "Connections of the %s closed by tandem: for a new one over the limit, "
             "without headers in time, or with a body under the minimum rate.",
             g->name);
    static const char *const labels[] = {"reason"};
    tdm_metrics_desc_t desc = {.type = TDM_METRICS_TYPE_COUNTER,
                               .name = name,
                               .help = help,
                               .label_names = labels,
                               .n_labels = 1,
                               .max_children = GUARD_REASON_COUNT};
    tdm_metrics_family_t *fam = NULL;
    st = tdm_metrics_family_register(cfg->registry, &desc, &fam);
    for (int i = 0; st == TDM_OK && i < GUARD_REASON_COUNT; i++)
        st = tdm_metrics_family_counter(fam, &guard_reason_names[i], &g->m_closed[i]);
    return st;
}

tdm_status_t tdm_http_guard_create(const tdm_http_guard_config_t *cfg, tdm_http_guard_t **out)
{
    if (cfg == NULL || cfg->max_connections == 0 || cfg->max_connections > (1u << 24)) {
        tdm_log_error(MOD, "HTTP connection guard: max_connections must be in 1..%u", 1u << 24);
        return TDM_ERR_INVALID;
    }
    tdm_status_t st = TDM_ERR_NOMEM;
    tdm_http_guard_t *g = calloc(1, sizeof(*g));
    if (g == NULL)
        return TDM_ERR_NOMEM;
    g->name = strdup(cfg->name != NULL ? cfg->name : "HTTP");
    if (g->name == NULL)
        goto err_free_guard;
    g->max_conn = cfg->max_connections;
    unsigned headroom = g->max_conn / 4;
    if (headroom < GUARD_MIN_ACTIVE_HEADROOM)
        headroom = GUARD_MIN_ACTIVE_HEADROOM;
    g->hard_conn = g->max_conn + headroom;
    g->per_ip = cfg->max_connections_per_ip;
    g->header_ms = cfg->header_timeout_ms != 0 ? cfg->header_timeout_ms : GUARD_DEFAULT_HEADER_MS;
    g->body_grace_ms = cfg->body_grace_ms != 0 ? cfg->body_grace_ms : g->header_ms;
    g->body_min_rate = cfg->body_min_rate != 0 ? cfg->body_min_rate : GUARD_DEFAULT_MIN_RATE;
    g->slots = calloc(g->hard_conn, sizeof(guard_slot_t));
    if (g->slots == NULL)
        goto err_free_name;
    for (unsigned i = 0; i < g->hard_conn; i++) {
        g->slots[i].fd = -1;
        g->slots[i].next = i + 1 < g->hard_conn ? &g->slots[i + 1] : NULL;
    }
    g->free_list = &g->slots[0];
    st = guard_metrics(g, cfg);
    if (st != TDM_OK)
        goto err_free_slots;
    pthread_mutex_init(&g->lock, NULL);
    pthread_mutex_init(&g->log_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->cond, &ca);
    pthread_condattr_destroy(&ca);
    g->log_window_ms = tdm_net_now_ms();
    if (pthread_create(&g->thread, NULL, guard_main, g) != 0) {
        tdm_log_error(MOD, "%s: cannot start the connection guard's thread", g->name);
        st = TDM_ERR_INTERNAL;
        goto err_destroy_sync;
    }
    *out = g;
    return TDM_OK;

err_destroy_sync:
    pthread_cond_destroy(&g->cond);
    pthread_mutex_destroy(&g->log_lock);
    pthread_mutex_destroy(&g->lock);
err_free_slots:
    free(g->slots);
err_free_name:
    free(g->name);
err_free_guard:
    free(g);
    return st;
}

void tdm_http_guard_options(tdm_http_guard_t *g, struct MHD_OptionItem *items)
{
    size_t i = 0;
    /* the logger first, or libmicrohttpd prints what comes before to stderr */
    items[i++] = (struct MHD_OptionItem){MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)guard_log, g};
    items[i++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)guard_notify, g};
    items[i++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_LIMIT, (intptr_t)g->hard_conn, NULL};
    items[i++] =
        (struct MHD_OptionItem){MHD_OPTION_PER_IP_CONNECTION_LIMIT, (intptr_t)g->per_ip, NULL};
    items[i++] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
}

void tdm_http_guard_stats(tdm_http_guard_t *g, tdm_http_guard_stats_t *out)
{
    pthread_mutex_lock(&g->lock);
    *out = (tdm_http_guard_stats_t){.open = g->n_open,
                                    .closed_limit = g->closed[GUARD_REASON_LIMIT],
                                    .closed_header = g->closed[GUARD_REASON_HEADER],
                                    .closed_body = g->closed[GUARD_REASON_BODY],
                                    .accepted = g->accepted,
                                    .peak = g->peak};
    pthread_mutex_unlock(&g->lock);
}

void tdm_http_guard_destroy(tdm_http_guard_t *g)
{
    if (g == NULL)
        return;
    pthread_mutex_lock(&g->lock);
    g->stopping = true;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
    pthread_join(g->thread, NULL);
    pthread_mutex_lock(&g->lock);
    guard_summary(g);
    pthread_mutex_unlock(&g->lock);
    pthread_cond_destroy(&g->cond);
    pthread_mutex_destroy(&g->log_lock);
    pthread_mutex_destroy(&g->lock);
    free(g->slots);
    free(g->name);
    free(g);
}
