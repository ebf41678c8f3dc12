/* tandem: the Prometheus metrics registry (see include/tandem/metrics.h).
 *
 * A family owns an array of max_children children, allocated when it is
 * registered together with the children's label values and histogram
 * bucket counts. A child's slot is filled under the family's lock and
 * published by a release store of n_children; lookups and rendering read
 * n_children with acquire and so see only finished children, without the
 * lock. Values are atomic uint64: a counter keeps whole increments as an
 * integer (fetch_add) and fractional adds as the bits of a double; a
 * gauge and a histogram's sum are the bits of a double, updated with CAS.
 * Children are 64-byte aligned, and so is each child's run of bucket
 * counts, so that threads updating different children do not share a
 * cache line. */
#include "tandem/metrics.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tandem/log.h"
#include "tandem/utf8.h"

#define MOD "metrics"

#define METRICS_CACHE_LINE 64

typedef struct metrics_child {
    /* counter: whole increments; gauge: the value's bits; histogram: the sum's bits */
    _Alignas(METRICS_CACHE_LINE) _Atomic uint64_t value;
    _Atomic uint64_t frac;     /* counter: fractional adds, the bits of a double */
    _Atomic uint64_t *buckets; /* histogram: [n_buckets + 1] counts per bucket, not cumulative */
    const char *values;        /* [n_labels][TDM_METRICS_LABEL_VALUE_MAX] */
    const struct tdm_metrics_family *family;
} metrics_child_t;

struct tdm_metrics_family {
    tdm_metrics_family_t *next; /* registration order */
    tdm_metrics_type_t type;
    char *name;
    char *help; /* NULL: no HELP line */
    int n_labels;
    char *label_names[TDM_METRICS_MAX_LABELS];
    int max_children;
    int n_buckets;
    double *bounds; /* [n_buckets] */
    tdm_metrics_value_fn_t fn;
    void *fn_arg;
    metrics_child_t *children; /* [max_children] */
    char *values;              /* [max_children][n_labels][TDM_METRICS_LABEL_VALUE_MAX] */
    _Atomic uint64_t *buckets; /* [max_children][bucket_stride] */
    size_t bucket_stride;      /* n_buckets + 1, rounded up to a cache line */
    atomic_int n_children;     /* children published (release) */
    atomic_bool warned_full;   /* "family full" was logged */
    pthread_mutex_t lock;      /* serializes child creation */
};

struct tdm_metrics_registry {
    pthread_mutex_t lock; /* the family list; held while rendering */
    tdm_metrics_family_t *head, *tail;
};

static const char *const type_names[] = {"counter", "gauge", "histogram"};

/* ---- doubles in atomic uint64 ---- */

static inline uint64_t double_bits(double v)
{
    uint64_t b;
    memcpy(&b, &v, sizeof(b));
    return b;
}

static inline double bits_double(uint64_t b)
{
    double v;
    memcpy(&v, &b, sizeof(v));
    return v;
}

static inline void atomic_add_double(_Atomic uint64_t *p, double v)
{
    uint64_t old = atomic_load_explicit(p, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(p, &old, double_bits(bits_double(old) + v),
                                                  memory_order_relaxed, memory_order_relaxed))
        ;
}

static inline double atomic_load_double(const _Atomic uint64_t *p)
{
    return bits_double(atomic_load_explicit((_Atomic uint64_t *)p, memory_order_relaxed));
}

/* ---- checks on names and values ---- */

static bool name_valid(const char *s, bool colons)
{
    if (s == NULL || s[0] == '\0')
        return false;
    for (const char *p = s; *p != '\0'; p++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                  (colons && c == ':') || (p != s && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

static bool utf8_valid(const char *s, size_t n)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        size_t len = tdm_utf8_decode(u + i, n - i, &cp);
        if (len == 0)
            return false;
        i += len;
    }
    return true;
}

static tdm_status_t desc_check(const tdm_metrics_desc_t *d)
{
    const char *name = d->name != NULL ? d->name : "(null)";
    if (!name_valid(d->name, true)) {
        tdm_log_error(MOD, "metric name \"%s\" is not valid: use [a-zA-Z_:][a-zA-Z0-9_:]*", name);
        return TDM_ERR_INVALID;
    }
    if ((int)d->type < 0 || (int)d->type > TDM_METRICS_TYPE_HISTOGRAM) {
        tdm_log_error(MOD, "metric %s: unknown type %d", name, (int)d->type);
        return TDM_ERR_INVALID;
    }
    if (d->help != NULL && !utf8_valid(d->help, strlen(d->help))) {
        tdm_log_error(MOD, "metric %s: help text is not valid UTF-8", name);
        return TDM_ERR_INVALID;
    }
    if (d->n_labels < 0 || d->n_labels > TDM_METRICS_MAX_LABELS) {
        tdm_log_error(MOD, "metric %s: %d label names (at most %d)", name, d->n_labels,
                      TDM_METRICS_MAX_LABELS);
        return TDM_ERR_INVALID;
    }
    if (d->n_labels > 0 && d->label_names == NULL) {
        tdm_log_error(MOD, "metric %s: %d label names announced, none given", name, d->n_labels);
        return TDM_ERR_INVALID;
    }
    for (int i = 0; i < d->n_labels; i++) {
        const char *l = d->label_names[i];
        if (!name_valid(l, false) || strncmp(l, "__", 2) == 0 ||
            (d->type == TDM_METRICS_TYPE_HISTOGRAM && strcmp(l, "le") == 0)) {
            tdm_log_error(MOD,
                          "metric %s: label name \"%s\" is not valid: use [a-zA-Z_][a-zA-Z0-9_]*, "
                          "not starting with __ (and not le for a histogram)",
                          name, l != NULL ? l : "(null)");
            return TDM_ERR_INVALID;
        }
        for (int j = 0; j < i; j++)
            if (strcmp(l, d->label_names[j]) == 0) {
                tdm_log_error(MOD, "metric %s: label name %s given twice", name, l);
                return TDM_ERR_INVALID;
            }
    }
    if (d->n_labels > 0 && (d->max_children < 0 || d->max_children > TDM_METRICS_MAX_CHILDREN)) {
        tdm_log_error(MOD, "metric %s: max_children %d is out of 0..%d", name, d->max_children,
                      TDM_METRICS_MAX_CHILDREN);
        return TDM_ERR_INVALID;
    }
    if (d->type == TDM_METRICS_TYPE_HISTOGRAM) {
        if (d->n_buckets < 0 || d->n_buckets > TDM_METRICS_MAX_BUCKETS) {
            tdm_log_error(MOD, "metric %s: %d bucket bounds (at most %d)", name, d->n_buckets,
                          TDM_METRICS_MAX_BUCKETS);
            return TDM_ERR_INVALID;
        }
        if (d->n_buckets > 0 && d->buckets == NULL) {
            tdm_log_error(MOD, "metric %s: %d bucket bounds announced, none given", name,
                          d->n_buckets);
            return TDM_ERR_INVALID;
        }
        for (int i = 0; i < d->n_buckets; i++)
            if (!isfinite(d->buckets[i]) || (i > 0 && !(d->buckets[i] > d->buckets[i - 1]))) {
                tdm_log_error(MOD,
                              "metric %s: bucket bounds must be finite and strictly increasing "
                              "(bound %d is %g)",
                              name, i, d->buckets[i]);
                return TDM_ERR_INVALID;
            }
    } else if (d->n_buckets != 0) {
        tdm_log_error(MOD, "metric %s: only histograms have buckets", name);
        return TDM_ERR_INVALID;
    }
    if (d->fn != NULL && (d->type == TDM_METRICS_TYPE_HISTOGRAM || d->n_labels > 0)) {
        tdm_log_error(MOD, "metric %s: only counters and gauges without labels take a callback",
                      name);
        return TDM_ERR_INVALID;
    }
    return TDM_OK;
}

/* ---- registry and families ---- */

tdm_status_t tdm_metrics_registry_create(tdm_metrics_registry_t **out)
{
    tdm_metrics_registry_t *reg = calloc(1, sizeof(*reg));
    if (reg == NULL)
        return TDM_ERR_NOMEM;
    if (pthread_mutex_init(&reg->lock, NULL) != 0) {
        free(reg);
        return TDM_ERR_NOMEM;
    }
    *out = reg;
    return TDM_OK;
}

/* Frees what family_register allocated; fields it did not reach are NULL. */
static void family_free(tdm_metrics_family_t *fam)
{
    free(fam->buckets);
    free(fam->values);
    free(fam->children);
    free(fam->bounds);
    for (int i = 0; i < fam->n_labels; i++)
        free(fam->label_names[i]);
    free(fam->help);
    free(fam->name);
    free(fam);
}

void tdm_metrics_registry_destroy(tdm_metrics_registry_t *reg)
{
    if (reg == NULL)
        return;
    tdm_metrics_family_t *fam = reg->head;
    while (fam != NULL) {
        tdm_metrics_family_t *next = fam->next;
        pthread_mutex_destroy(&fam->lock);
        family_free(fam);
        fam = next;
    }
    pthread_mutex_destroy(&reg->lock);
    free(reg);
}

static void *alloc_lines(size_t bytes)
{
    bytes = (bytes + METRICS_CACHE_LINE - 1) / METRICS_CACHE_LINE * METRICS_CACHE_LINE;
    void *p = aligned_alloc(METRICS_CACHE_LINE, bytes);
    if (p != NULL)
        memset(p, 0, bytes);
    return p;
}

static char *strdup_or_null(const char *s, bool *failed)
{
    if (s == NULL)
        return NULL;
    char *c = strdup(s);
    if (c == NULL)
        *failed = true;
    return c;
}

tdm_status_t tdm_metrics_family_register(tdm_metrics_registry_t *reg,
                                         const tdm_metrics_desc_t *desc, tdm_metrics_family_t **out)
{
    if (reg == NULL || desc == NULL)
        return TDM_ERR_INVALID;
    tdm_status_t st = desc_check(desc);
    if (st != TDM_OK)
        return st;

    tdm_metrics_family_t *fam = calloc(1, sizeof(*fam));
    if (fam == NULL)
        return TDM_ERR_NOMEM;
    bool failed = false;
    fam->type = desc->type;
    fam->name = strdup_or_null(desc->name, &failed);
    fam->help =
        desc->help != NULL && desc->help[0] != '\0' ? strdup_or_null(desc->help, &failed) : NULL;
    fam->n_labels = desc->n_labels;
    for (int i = 0; i < desc->n_labels; i++)
        fam->label_names[i] = strdup_or_null(desc->label_names[i], &failed);
    fam->max_children = desc->n_labels == 0  ? 1
                        : desc->max_children ? desc->max_children
                                             : TDM_METRICS_DEFAULT_CHILDREN;
    fam->n_buckets = desc->type == TDM_METRICS_TYPE_HISTOGRAM ? desc->n_buckets : 0;
    fam->fn = desc->fn;
    fam->fn_arg = desc->fn_arg;
    if (failed)
        goto err_free_family;

    size_t n_children = (size_t)fam->max_children;
    if (fam->n_buckets > 0) {
        fam->bounds = malloc((size_t)fam->n_buckets * sizeof(double));
        if (fam->bounds == NULL)
            goto err_free_family;
        memcpy(fam->bounds, desc->buckets, (size_t)fam->n_buckets * sizeof(double));
    }
    fam->children = alloc_lines(n_children * sizeof(metrics_child_t));
    if (fam->children == NULL)
        goto err_free_family;
    if (fam->n_labels > 0) {
        fam->values = calloc(n_children * (size_t)fam->n_labels, TDM_METRICS_LABEL_VALUE_MAX);
        if (fam->values == NULL)
            goto err_free_family;
    }
    if (fam->type == TDM_METRICS_TYPE_HISTOGRAM) {
        const size_t per_line = METRICS_CACHE_LINE / sizeof(uint64_t);
        fam->bucket_stride = ((size_t)fam->n_buckets + 1 + per_line - 1) / per_line * per_line;
        fam->buckets = alloc_lines(n_children * fam->bucket_stride * sizeof(uint64_t));
        if (fam->buckets == NULL)
            goto err_free_family;
    }
    for (size_t i = 0; i < n_children; i++) {
        metrics_child_t *c = &fam->children[i];
        atomic_init(&c->value, 0);
        atomic_init(&c->frac, 0);
        c->family = fam;
        c->buckets = fam->buckets != NULL ? fam->buckets + i * fam->bucket_stride : NULL;
        c->values = fam->values != NULL
                        ? fam->values + i * (size_t)fam->n_labels * TDM_METRICS_LABEL_VALUE_MAX
                        : NULL;
    }
    /* Without labels the one child exists from the start. */
    atomic_init(&fam->n_children, fam->n_labels == 0 ? 1 : 0);
    atomic_init(&fam->warned_full, false);
    if (pthread_mutex_init(&fam->lock, NULL) != 0)
        goto err_free_family;

    pthread_mutex_lock(&reg->lock);
    for (tdm_metrics_family_t *f = reg->head; f != NULL; f = f->next)
        if (strcmp(f->name, fam->name) == 0) {
            pthread_mutex_unlock(&reg->lock);
            tdm_log_error(MOD, "metric %s is already registered", fam->name);
            st = TDM_ERR_INVALID;
            goto err_destroy_lock;
        }
    if (reg->tail != NULL)
        reg->tail->next = fam;
    else
        reg->head = fam;
    reg->tail = fam;
    pthread_mutex_unlock(&reg->lock);
    if (out != NULL)
        *out = fam;
    return TDM_OK;

err_destroy_lock:
    pthread_mutex_destroy(&fam->lock);
    family_free(fam);
    return st;
err_free_family:
    family_free(fam);
    return TDM_ERR_NOMEM;
}

/* ---- children ---- */

static const char *child_value(const metrics_child_t *c, int i)
{
    return c->values + (size_t)i * TDM_METRICS_LABEL_VALUE_MAX;
}

static metrics_child_t *child_find(tdm_metrics_family_t *fam, const char *const *values, int from,
                                   int to)
{
    for (int k = from; k < to; k++) {
        metrics_child_t *c = &fam->children[k];
        int i = 0;
        while (i < fam->n_labels && strcmp(child_value(c, i), values[i]) == 0)
            i++;
        if (i == fam->n_labels)
            return c;
    }
    return NULL;
}

static tdm_status_t family_child(tdm_metrics_family_t *fam, tdm_metrics_type_t type,
                                 const char *const *values, metrics_child_t **out)
{
    if (fam == NULL || fam->type != type || fam->fn != NULL) {
        tdm_log_error(MOD, "metric %s: not a %s with children to update",
                      fam != NULL ? fam->name : "(null)", type_names[type]);
        return TDM_ERR_INVALID;
    }
    if (fam->n_labels == 0) {
        *out = &fam->children[0];
        return TDM_OK;
    }
    if (values == NULL) {
        tdm_log_error(MOD, "metric %s: %d label values needed, none given", fam->name,
                      fam->n_labels);
        return TDM_ERR_INVALID;
    }
    for (int i = 0; i < fam->n_labels; i++) {
        size_t len = values[i] != NULL ? strlen(values[i]) : 0;
        if (values[i] == NULL || len >= TDM_METRICS_LABEL_VALUE_MAX ||
            !utf8_valid(values[i], len)) {
            tdm_log_error(MOD,
                          "metric %s: the value of label %s is missing, not UTF-8 or longer "
                          "than %d bytes",
                          fam->name, fam->label_names[i], TDM_METRICS_LABEL_VALUE_MAX - 1);
            return TDM_ERR_INVALID;
        }
    }

    int n = atomic_load_explicit(&fam->n_children, memory_order_acquire);
    metrics_child_t *c = child_find(fam, values, 0, n);
    if (c != NULL) {
        *out = c;
        return TDM_OK;
    }
    pthread_mutex_lock(&fam->lock);
    int n_now = atomic_load_explicit(&fam->n_children, memory_order_relaxed);
    c = child_find(fam, values, n, n_now); /* made by another thread meanwhile? */
    if (c == NULL && n_now < fam->max_children) {
        c = &fam->children[n_now];
        for (int i = 0; i < fam->n_labels; i++)
            strcpy((char *)child_value(c, i), values[i]);
        atomic_store_explicit(&fam->n_children, n_now + 1, memory_order_release);
    }
    pthread_mutex_unlock(&fam->lock);
    if (c == NULL) {
        if (!atomic_exchange(&fam->warned_full, true))
            tdm_log_warn(MOD,
                         "metric %s holds its %d label-value tuples; new ones are not counted "
                         "(raise max_children, or use fewer distinct label values)",
                         fam->name, fam->max_children);
        return TDM_ERR_BUSY;
    }
    *out = c;
    return TDM_OK;
}

tdm_status_t tdm_metrics_family_counter(tdm_metrics_family_t *fam, const char *const *values,
                                        tdm_metrics_counter_t **out)
{
    metrics_child_t *c;
    tdm_status_t st = family_child(fam, TDM_METRICS_TYPE_COUNTER, values, &c);
    if (st == TDM_OK)
        *out = (tdm_metrics_counter_t *)c;
    return st;
}

tdm_status_t tdm_metrics_family_gauge(tdm_metrics_family_t *fam, const char *const *values,
                                      tdm_metrics_gauge_t **out)
{
    metrics_child_t *c;
    tdm_status_t st = family_child(fam, TDM_METRICS_TYPE_GAUGE, values, &c);
    if (st == TDM_OK)
        *out = (tdm_metrics_gauge_t *)c;
    return st;
}

tdm_status_t tdm_metrics_family_histogram(tdm_metrics_family_t *fam, const char *const *values,
                                          tdm_metrics_histogram_t **out)
{
    metrics_child_t *c;
    tdm_status_t st = family_child(fam, TDM_METRICS_TYPE_HISTOGRAM, values, &c);
    if (st == TDM_OK)
        *out = (tdm_metrics_histogram_t *)c;
    return st;
}

/* ---- shortcuts ---- */

tdm_status_t tdm_metrics_counter_register(tdm_metrics_registry_t *reg, const char *name,
                                          const char *help, tdm_metrics_counter_t **out)
{
    tdm_metrics_desc_t d = {.type = TDM_METRICS_TYPE_COUNTER, .name = name, .help = help};
    tdm_metrics_family_t *fam;
    tdm_status_t st = tdm_metrics_family_register(reg, &d, &fam);
    if (st != TDM_OK)
        return st;
    return tdm_metrics_family_counter(fam, NULL, out);
}

tdm_status_t tdm_metrics_gauge_register(tdm_metrics_registry_t *reg, const char *name,
                                        const char *help, tdm_metrics_gauge_t **out)
{
    tdm_metrics_desc_t d = {.type = TDM_METRICS_TYPE_GAUGE, .name = name, .help = help};
    tdm_metrics_family_t *fam;
    tdm_status_t st = tdm_metrics_family_register(reg, &d, &fam);
    if (st != TDM_OK)
        return st;
    return tdm_metrics_family_gauge(fam, NULL, out);
}

tdm_status_t tdm_metrics_gauge_register_fn(tdm_metrics_registry_t *reg, const char *name,
                                           const char *help, tdm_metrics_value_fn_t fn, void *arg)
{
    if (fn == NULL)
        return TDM_ERR_INVALID;
    tdm_metrics_desc_t d = {
        .type = TDM_METRICS_TYPE_GAUGE, .name = name, .help = help, .fn = fn, .fn_arg = arg};
    return tdm_metrics_family_register(reg, &d, NULL);
}

tdm_status_t tdm_metrics_histogram_register(tdm_metrics_registry_t *reg, const char *name,
                                            const char *help, const double *buckets, int n_buckets,
                                            tdm_metrics_histogram_t **out)
{
    tdm_metrics_desc_t d = {.type = TDM_METRICS_TYPE_HISTOGRAM,
                            .name = name,
                            .help = help,
                            .buckets = buckets,
                            .n_buckets = n_buckets};
    tdm_metrics_family_t *fam;
    tdm_status_t st = tdm_metrics_family_register(reg, &d, &fam);
    if (st != TDM_OK)
        return st;
    return tdm_metrics_family_histogram(fam, NULL, out);
}

/* ---- updates ---- */

/* A handle is a metrics_child_t; its family is known to the caller. */
#define CHILD(h) ((metrics_child_t *)(h))

void tdm_metrics_counter_inc(tdm_metrics_counter_t *c)
{
    atomic_fetch_add_explicit(&CHILD(c)->value, 1, memory_order_relaxed);
}

void tdm_metrics_counter_add_u64(tdm_metrics_counter_t *c, uint64_t n)
{
    atomic_fetch_add_explicit(&CHILD(c)->value, n, memory_order_relaxed);
}

void tdm_metrics_counter_add(tdm_metrics_counter_t *c, double v)
{
    if (!(v > 0)) /* negative, zero or NaN */
        return;
    double whole = floor(v);
    if (whole == v && v < 0x1p63) { /* the common case: a whole number, no CAS loop */
        atomic_fetch_add_explicit(&CHILD(c)->value, (uint64_t)v, memory_order_relaxed);
        return;
    }
    atomic_add_double(&CHILD(c)->frac, v);
}

void tdm_metrics_gauge_set(tdm_metrics_gauge_t *g, double v)
{
    atomic_store_explicit(&CHILD(g)->value, double_bits(v), memory_order_relaxed);
}

void tdm_metrics_gauge_add(tdm_metrics_gauge_t *g, double v)
{
    atomic_add_double(&CHILD(g)->value, v);
}

void tdm_metrics_gauge_inc(tdm_metrics_gauge_t *g)
{
    atomic_add_double(&CHILD(g)->value, 1.0);
}

void tdm_metrics_gauge_dec(tdm_metrics_gauge_t *g)
{
    atomic_add_double(&CHILD(g)->value, -1.0);
}

double tdm_metrics_counter_value(const tdm_metrics_counter_t *c)
{
    const metrics_child_t *ch = (const metrics_child_t *)c;
    return (double)atomic_load_explicit((_Atomic uint64_t *)&ch->value, memory_order_relaxed) +
           atomic_load_double(&ch->frac);
}

double tdm_metrics_gauge_value(const tdm_metrics_gauge_t *g)
{
    return atomic_load_double(&((const metrics_child_t *)g)->value);
}

void tdm_metrics_histogram_observe(tdm_metrics_histogram_t *h, double v)
{
    metrics_child_t *c = CHILD(h);
    const double *bounds = c->family->bounds;
    /* The first bound >= v; NaN compares false everywhere and lands in +Inf. */
    int lo = 0, hi = c->family->n_buckets;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (v <= bounds[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    if (isnan(v))
        lo = c->family->n_buckets;
    atomic_fetch_add_explicit(&c->buckets[lo], 1, memory_order_relaxed);
    atomic_add_double(&c->value, v);
}

uint64_t tdm_metrics_histogram_count(const tdm_metrics_histogram_t *h)
{
    const metrics_child_t *c = (const metrics_child_t *)h;
    uint64_t n = 0;
    for (int i = 0; i <= c->family->n_buckets; i++)
        n += atomic_load_explicit(&c->buckets[i], memory_order_relaxed);
    return n;
}

double tdm_metrics_histogram_sum(const tdm_metrics_histogram_t *h)
{
    return atomic_load_double(&((const metrics_child_t *)h)->value);
}

/* ---- rendering ---- */

typedef struct metrics_buf {
    char *p;
    size_t len, cap;
    bool failed; /* an allocation failed; the text is incomplete */
} metrics_buf_t;

static bool buf_reserve(metrics_buf_t *b, size_t n)
{
    if (b->failed)
        return false;
    if (b->len + n + 1 <= b->cap)
        return true;
    size_t cap = b->cap != 0 ? b->cap : 4096;
    while (cap < b->len + n + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL) {
        b->failed = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

static void buf_put(metrics_buf_t *b, const char *s, size_t n)
{
    if (!buf_reserve(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_puts(metrics_buf_t *b, const char *s)
{
    buf_put(b, s, strlen(s));
}

static void buf_putc(metrics_buf_t *b, char c)
{
    buf_put(b, &c, 1);
}

/* HELP text escapes \ and newline; label values also escape ". */
static void buf_put_escaped(metrics_buf_t *b, const char *s, bool quote)
{
    const char *run = s;
    for (const char *p = s;; p++) {
        const char *esc = NULL;
        if (*p == '\\')
            esc = "\\\\";
        else if (*p == '\n')
            esc = "\\n";
        else if (*p == '"' && quote)
            esc = "\\\"";
        else if (*p != '\0')
            continue;
        buf_put(b, run, (size_t)(p - run));
        if (esc == NULL)
            return;
        buf_puts(b, esc);
        run = p + 1;
    }
}

/* The shortest of %.15g, %.16g, %.17g that parses back to v (Go's 'g', -1
 * gives the same digits), or +Inf, -Inf, NaN. out holds 32 bytes. The C
 * locale's decimal point is assumed: tandem never calls setlocale(). */
static void format_double(double v, char out[32])
{
    if (isnan(v)) {
        strcpy(out, "NaN");
        return;
    }
    if (isinf(v)) {
        strcpy(out, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(out, 32, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            return;
    }
}

static void buf_put_double(metrics_buf_t *b, double v)
{
    char s[32];
    format_double(v, s);
    buf_puts(b, s);
}

static void buf_put_u64(metrics_buf_t *b, uint64_t v)
{
    char s[24];
    snprintf(s, sizeof(s), "%" PRIu64, v);
    buf_puts(b, s);
}

/* name{labels,le="..."} — the braces only when there is a label. */
static void buf_put_series(metrics_buf_t *b, const tdm_metrics_family_t *fam,
                           const metrics_child_t *c, const char *suffix, const char *le)
{
    buf_puts(b, fam->name);
    if (suffix != NULL)
        buf_puts(b, suffix);
    if (fam->n_labels == 0 && le == NULL) {
        buf_putc(b, ' ');
        return;
    }
    buf_putc(b, '{');
    for (int i = 0; i < fam->n_labels; i++) {
        if (i > 0)
            buf_putc(b, ',');
        buf_puts(b, fam->label_names[i]);
        buf_puts(b, "=\"");
        buf_put_escaped(b, child_value(c, i), true);
        buf_putc(b, '"');
    }
    if (le != NULL) {
        buf_puts(b, fam->n_labels > 0 ? ",le=\"" : "le=\"");
        buf_puts(b, le);
        buf_putc(b, '"');
    }
    buf_puts(b, "} ");
}

static void render_histogram(metrics_buf_t *b, const tdm_metrics_family_t *fam,
                             const metrics_child_t *c)
{
    /* Buckets first, then the sum: a concurrent observation shows in the
     * sum before it shows in the buckets, never the other way round. */
    uint64_t counts[TDM_METRICS_MAX_BUCKETS + 1];
    for (int i = 0; i <= fam->n_buckets; i++)
        counts[i] = atomic_load_explicit(&c->buckets[i], memory_order_relaxed);
    double sum = atomic_load_double(&c->value);
    uint64_t cum = 0;
    for (int i = 0; i <= fam->n_buckets; i++) {
        char le[32];
        if (i < fam->n_buckets)
            format_double(fam->bounds[i], le);
        else
            strcpy(le, "+Inf");
        cum += counts[i];
        buf_put_series(b, fam, c, "_bucket", le);
        buf_put_u64(b, cum);
        buf_putc(b, '\n');
    }
    buf_put_series(b, fam, c, "_sum", NULL);
    buf_put_double(b, sum);
    buf_putc(b, '\n');
    buf_put_series(b, fam, c, "_count", NULL);
    buf_put_u64(b, cum);
    buf_putc(b, '\n');
}

static void render_family(metrics_buf_t *b, const tdm_metrics_family_t *fam)
{
    if (fam->help != NULL) {
        buf_puts(b, "# HELP ");
        buf_puts(b, fam->name);
        buf_putc(b, ' ');
        buf_put_escaped(b, fam->help, false);
        buf_putc(b, '\n');
    }
    buf_puts(b, "# TYPE ");
    buf_puts(b, fam->name);
    buf_putc(b, ' ');
    buf_puts(b, type_names[fam->type]);
    buf_putc(b, '\n');

    if (fam->fn != NULL) {
        buf_put_series(b, fam, NULL, NULL, NULL);
        buf_put_double(b, fam->fn(fam->fn_arg));
        buf_putc(b, '\n');
        return;
    }
    int n = atomic_load_explicit((atomic_int *)&fam->n_children, memory_order_acquire);
    for (int k = 0; k < n; k++) {
        const metrics_child_t *c = &fam->children[k];
        switch (fam->type) {
        case TDM_METRICS_TYPE_COUNTER:
            buf_put_series(b, fam, c, NULL, NULL);
            buf_put_double(b, tdm_metrics_counter_value((const tdm_metrics_counter_t *)c));
            buf_putc(b, '\n');
            break;
        case TDM_METRICS_TYPE_GAUGE:
            buf_put_series(b, fam, c, NULL, NULL);
            buf_put_double(b, atomic_load_double(&c->value));
            buf_putc(b, '\n');
            break;
        case TDM_METRICS_TYPE_HISTOGRAM: render_histogram(b, fam, c); break;
        }
    }
}

tdm_status_t tdm_metrics_registry_render(tdm_metrics_registry_t *reg, char **out, size_t *out_len)
{
    if (reg == NULL || out == NULL || out_len == NULL)
        return TDM_ERR_INVALID;
    metrics_buf_t b = {0};
    buf_reserve(&b, 0);
    pthread_mutex_lock(&reg->lock);
    for (const tdm_metrics_family_t *fam = reg->head; fam != NULL; fam = fam->next)
        render_family(&b, fam);
    pthread_mutex_unlock(&reg->lock);
    if (b.failed) {
        free(b.p);
        tdm_log_error(MOD, "out of memory while rendering metrics");
        return TDM_ERR_NOMEM;
    }
    b.p[b.len] = '\0';
    *out = b.p;
    *out_len = b.len;
    return TDM_OK;
}
