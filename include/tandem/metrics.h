/* tandem: a Prometheus metrics registry.
 *
 * Every role (KV store, prefill, decode, router) keeps one registry of
 * counters, gauges and histograms and serves it on GET /metrics (see
 * http.h) in the Prometheus text exposition format, version 0.0.4:
 *
 *   # HELP vllm:num_requests_running Requests in the running batch.
 *   # TYPE vllm:num_requests_running gauge
 *   vllm:num_requests_running{model_name="smollm2"} 3
 *
 * A family is one metric name with its help, type and label names; it has
 * one child per tuple of label values (one child and no labels for a plain
 * metric). Children are the handles that code updates. Histograms have
 * fixed upper bounds given at registration and render cumulative
 * `_bucket{le="..."}` samples (the last is le="+Inf"), `_sum` and `_count`.
 * Names are the caller's, whole: a counter is not given a `_total` suffix.
 *
 * Threads: updates (inc, add, set, observe) are lock-free C11 atomics,
 * cheap from any thread; they neither allocate nor lock. Registration and
 * child lookup may run on any thread; rendering runs on another (the HTTP
 * server's) and reads each value atomically, so a scrape never sees a torn
 * value, though a histogram's `_sum` may include an observation that its
 * buckets do not show yet (`_count` always equals the +Inf bucket).
 *
 * Memory: the registry owns every family and child; each family allocates
 * all it will ever need (room for max_children children, their label values
 * and bucket counts) when it is registered. Updates never allocate;
 * rendering allocates the output text. Handles stay valid until
 * tdm_metrics_registry_destroy(), which must not race with anything else. */
#ifndef TANDEM_METRICS_H
#define TANDEM_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_METRICS_MAX_LABELS       8    /* label names per family */
#define TDM_METRICS_LABEL_VALUE_MAX  128  /* bytes of one label value, the NUL included */
#define TDM_METRICS_MAX_BUCKETS      64   /* histogram bounds, +Inf not counted */
#define TDM_METRICS_MAX_CHILDREN     4096 /* the largest max_children */
#define TDM_METRICS_DEFAULT_CHILDREN 64   /* max_children when 0 is given */

/* What GET /metrics answers with. */
#define TDM_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

typedef enum tdm_metrics_type {
    TDM_METRICS_TYPE_COUNTER = 0,   /* only goes up (a restart resets it) */
    TDM_METRICS_TYPE_GAUGE = 1,     /* goes up and down */
    TDM_METRICS_TYPE_HISTOGRAM = 2, /* counts observations into fixed buckets */
} tdm_metrics_type_t;

typedef struct tdm_metrics_registry tdm_metrics_registry_t;
typedef struct tdm_metrics_family tdm_metrics_family_t;
/* Children, by type; each belongs to one family. */
typedef struct tdm_metrics_counter tdm_metrics_counter_t;
typedef struct tdm_metrics_gauge tdm_metrics_gauge_t;
typedef struct tdm_metrics_histogram tdm_metrics_histogram_t;

/* A value read at scrape time on the rendering thread: must be thread-safe,
 * quick, and must not call into the registry. */
typedef double (*tdm_metrics_value_fn_t)(void *arg);

typedef struct tdm_metrics_desc {
    tdm_metrics_type_t type;
    const char *name; /* [a-zA-Z_:][a-zA-Z0-9_:]*, unique in the registry; copied */
    const char *help; /* one line of UTF-8 (NULL: none); copied */
    /* Label names, [a-zA-Z_][a-zA-Z0-9_]*, not starting with "__", distinct,
     * and not "le" for a histogram; copied. NULL when n_labels is 0. */
    const char *const *label_names;
    int n_labels;     /* 0 .. TDM_METRICS_MAX_LABELS */
    int max_children; /* label-value tuples the family can hold, 1 .. TDM_METRICS_MAX_CHILDREN
                         (0: TDM_METRICS_DEFAULT_CHILDREN); ignored without labels */
    /* Histograms: finite, strictly increasing upper bounds (le); +Inf is
     * implied. n_buckets 0 .. TDM_METRICS_MAX_BUCKETS; copied. */
    const double *buckets;
    int n_buckets;
    /* Counters and gauges without labels may read their value from fn(fn_arg)
     * at scrape time instead of holding one (e.g. bytes in use); such a family
     * has no child to update. fn and fn_arg must stay valid while the
     * registry may be rendered. NULL: the value is held and updated. */
    tdm_metrics_value_fn_t fn;
    void *fn_arg;
} tdm_metrics_desc_t;

tdm_status_t tdm_metrics_registry_create(tdm_metrics_registry_t **out);
/* Frees the registry, its families and children. Accepts NULL. Nothing may
 * use the registry or its handles any more (stop the HTTP server first). */
void tdm_metrics_registry_destroy(tdm_metrics_registry_t *reg);

/* Registers a family; families render in registration order. An invalid
 * description or a name already taken is TDM_ERR_INVALID (logged with the
 * cause); TDM_ERR_NOMEM if allocation fails. *out may be NULL when the
 * caller wants no handle (callback-backed metrics). */
tdm_status_t tdm_metrics_family_register(tdm_metrics_registry_t *reg,
                                         const tdm_metrics_desc_t *desc,
                                         tdm_metrics_family_t **out);

/* The child for one tuple of label values (n_labels strings, in the order of
 * the label names; each valid UTF-8 shorter than TDM_METRICS_LABEL_VALUE_MAX
 * bytes, escaped when rendered), created at its first lookup. Lookup
 * compares strings: do it once and keep the handle. TDM_ERR_BUSY when the
 * family already holds max_children other tuples, TDM_ERR_INVALID for a bad
 * value, a callback-backed family or a family of another type. For a family
 * without labels, values may be NULL. */
tdm_status_t tdm_metrics_family_counter(tdm_metrics_family_t *fam, const char *const *values,
                                        tdm_metrics_counter_t **out);
tdm_status_t tdm_metrics_family_gauge(tdm_metrics_family_t *fam, const char *const *values,
                                      tdm_metrics_gauge_t **out);
tdm_status_t tdm_metrics_family_histogram(tdm_metrics_family_t *fam, const char *const *values,
                                          tdm_metrics_histogram_t **out);

/* Shortcuts for metrics without labels: register the family, return its one
 * child. */
tdm_status_t tdm_metrics_counter_register(tdm_metrics_registry_t *reg, const char *name,
                                          const char *help, tdm_metrics_counter_t **out);
tdm_status_t tdm_metrics_gauge_register(tdm_metrics_registry_t *reg, const char *name,
                                        const char *help, tdm_metrics_gauge_t **out);
tdm_status_t tdm_metrics_gauge_register_fn(tdm_metrics_registry_t *reg, const char *name,
                                           const char *help, tdm_metrics_value_fn_t fn, void *arg);
tdm_status_t tdm_metrics_histogram_register(tdm_metrics_registry_t *reg, const char *name,
                                            const char *help, const double *buckets, int n_buckets,
                                            tdm_metrics_histogram_t **out);

/* Updates: lock-free, any thread. A counter ignores negative and NaN
 * amounts (a counter that goes down breaks rate()). */
void tdm_metrics_counter_inc(tdm_metrics_counter_t *c);
void tdm_metrics_counter_add_u64(tdm_metrics_counter_t *c, uint64_t n);
void tdm_metrics_counter_add(tdm_metrics_counter_t *c, double v);
void tdm_metrics_gauge_set(tdm_metrics_gauge_t *g, double v);
void tdm_metrics_gauge_add(tdm_metrics_gauge_t *g, double v); /* v may be negative */
void tdm_metrics_gauge_inc(tdm_metrics_gauge_t *g);
void tdm_metrics_gauge_dec(tdm_metrics_gauge_t *g);
/* Counts v in the first bucket whose bound is >= v (+Inf for NaN). */
void tdm_metrics_histogram_observe(tdm_metrics_histogram_t *h, double v);

/* Current values, as a scrape would see them. */
double tdm_metrics_counter_value(const tdm_metrics_counter_t *c);
double tdm_metrics_gauge_value(const tdm_metrics_gauge_t *g);
uint64_t tdm_metrics_histogram_count(const tdm_metrics_histogram_t *h);
double tdm_metrics_histogram_sum(const tdm_metrics_histogram_t *h);

/* Renders every family in the text exposition format 0.0.4 into a new
 * NUL-terminated buffer (*out, *out_len bytes without the NUL) that the
 * caller frees with free(). Floats are printed so that they parse back to
 * the same double ("+Inf", "-Inf", "NaN" where they apply). A family with
 * labels but no child yet renders only its HELP and TYPE lines. Takes the
 * registry's lock (registration waits); calls the value callbacks. */
tdm_status_t tdm_metrics_registry_render(tdm_metrics_registry_t *reg, char **out, size_t *out_len);

#ifdef __cplusplus
}
#endif

#endif
