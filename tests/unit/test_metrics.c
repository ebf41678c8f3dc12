/* Unit tests of the metrics registry (include/tandem/metrics.h): counters,
 * gauges and histograms with and without labels, label and help escaping,
 * float formatting that round-trips, bad registrations, bounded children,
 * exact totals from 4 updating threads while another renders, and the exact
 * exposition text of a small registry.
 *
 * `test_metrics --dump` prints the text of a registry with every kind of
 * metric and special value instead; tests/python/test_metrics_format.py
 * parses it with prometheus_client. */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tandem/log.h"
#include "tandem/metrics.h"
#include "test_util.h"

static tdm_metrics_registry_t *registry_new(void)
{
    tdm_metrics_registry_t *reg = NULL;
    if (tdm_metrics_registry_create(&reg) != TDM_OK || reg == NULL) {
        fprintf(stderr, "tdm_metrics_registry_create failed\n");
        exit(1);
    }
    return reg;
}

/* The registry's text; the caller frees it. */
static char *render(tdm_metrics_registry_t *reg)
{
    char *text = NULL;
    size_t len = 0;
    tdm_status_t st = tdm_metrics_registry_render(reg, &text, &len);
    if (st != TDM_OK || text == NULL || strlen(text) != len) {
        fprintf(stderr, "tdm_metrics_registry_render failed: %s\n", tdm_status_str(st));
        exit(1);
    }
    return text;
}

/* The value text of the sample line that starts with `series ` ("" if none). */
static const char *sample_value(const char *text, const char *series, char out[64])
{
    size_t n = strlen(series);
    out[0] = '\0';
    for (const char *line = text; *line != '\0';) {
        const char *end = strchr(line, '\n');
        size_t len = end != NULL ? (size_t)(end - line) : strlen(line);
        if (len > n && strncmp(line, series, n) == 0 && line[n] == ' ' && len - n - 1 < 64) {
            memcpy(out, line + n + 1, len - n - 1);
            out[len - n - 1] = '\0';
            return out;
        }
        line += len + (end != NULL);
    }
    return out;
}

static double bytes_used(void *arg)
{
    (void)arg;
    return 1048576.0;
}

/* ---- a small registry and its exact text ---- */

static const double ttft_bounds[] = {0.125, 0.5, 1};
static const double lat_bounds[] = {1};

static void fill_small(tdm_metrics_registry_t *reg)
{
    tdm_metrics_counter_t *prompt;
    CHECK(tdm_metrics_counter_register(reg, "vllm:prompt_tokens_total", "Prompt tokens processed.",
                                       &prompt) == TDM_OK,
          "counter");
    tdm_metrics_counter_add_u64(prompt, 42);

    tdm_metrics_gauge_t *running;
    CHECK(tdm_metrics_gauge_register(reg, "vllm:num_requests_running", "Requests running.",
                                     &running) == TDM_OK,
          "gauge");
    tdm_metrics_gauge_set(running, 3);

    const char *pool_labels[] = {"pool", "tier"};
    tdm_metrics_desc_t free_desc = {.type = TDM_METRICS_TYPE_GAUGE,
                                    .name = "tandem_pool_free_blocks",
                                    .help = "Free blocks \\ per pool.\nSecond line",
                                    .label_names = pool_labels,
                                    .n_labels = 2};
    tdm_metrics_family_t *free_fam;
    CHECK(tdm_metrics_family_register(reg, &free_desc, &free_fam) == TDM_OK, "labelled gauge");
    tdm_metrics_gauge_t *free_child;
    CHECK(tdm_metrics_family_gauge(free_fam, (const char *[]){"a\\b", "q\"x\ny"}, &free_child) ==
              TDM_OK,
          "child with escapes");
    tdm_metrics_gauge_set(free_child, 1.5);

    tdm_metrics_histogram_t *ttft;
    CHECK(tdm_metrics_histogram_register(reg, "vllm:time_to_first_token_seconds",
                                         "Time to first token.", ttft_bounds, 3, &ttft) == TDM_OK,
          "histogram");
    tdm_metrics_histogram_observe(ttft, 0.0625);
    tdm_metrics_histogram_observe(ttft, 0.125); /* on a bound: counts in that bucket */
    tdm_metrics_histogram_observe(ttft, 0.25);
    tdm_metrics_histogram_observe(ttft, 2);

    const char *tier_label[] = {"tier"};
    tdm_metrics_desc_t lat_desc = {.type = TDM_METRICS_TYPE_HISTOGRAM,
                                   .name = "tandem_lat_seconds",
                                   .help = "Latency by tier.",
                                   .label_names = tier_label,
                                   .n_labels = 1,
                                   .max_children = 2,
                                   .buckets = lat_bounds,
                                   .n_buckets = 1};
    tdm_metrics_family_t *lat_fam;
    CHECK(tdm_metrics_family_register(reg, &lat_desc, &lat_fam) == TDM_OK, "labelled histogram");
    tdm_metrics_histogram_t *lat_fast;
    CHECK(tdm_metrics_family_histogram(lat_fam, (const char *[]){"fast"}, &lat_fast) == TDM_OK,
          "histogram child");
    tdm_metrics_histogram_observe(lat_fast, 0.5);

    CHECK(tdm_metrics_gauge_register_fn(reg, "tandem_kvstore_bytes_used", "Bytes.", bytes_used,
                                        NULL) == TDM_OK,
          "callback gauge");

    const char *kind_label[] = {"kind"};
    tdm_metrics_desc_t err_desc = {.type = TDM_METRICS_TYPE_COUNTER,
                                   .name = "tandem_errors_total",
                                   .help = "Errors by kind.",
                                   .label_names = kind_label,
                                   .n_labels = 1};
    CHECK(tdm_metrics_family_register(reg, &err_desc, NULL) == TDM_OK, "family, no child yet");

    tdm_metrics_counter_t *nohelp;
    CHECK(tdm_metrics_counter_register(reg, "tandem_nohelp_total", NULL, &nohelp) == TDM_OK,
          "counter without help");
}

static const char small_expected[] =
    "# HELP vllm:prompt_tokens_total Prompt tokens processed.\n"
    "# TYPE vllm:prompt_tokens_total counter\n"
    "vllm:prompt_tokens_total 42\n"
    "# HELP vllm:num_requests_running Requests running.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    "vllm:num_requests_running 3\n"
    "# HELP tandem_pool_free_blocks Free blocks \\\\ per pool.\\nSecond line\n"
    "# TYPE tandem_pool_free_blocks gauge\n"
    "tandem_pool_free_blocks{pool=\"a\\\\b\",tier=\"q\\\"x\\ny\"} 1.5\n"
    "# HELP vllm:time_to_first_token_seconds Time to first token.\n"
    "# TYPE vllm:time_to_first_token_seconds histogram\n"
    "vllm:time_to_first_token_seconds_bucket{le=\"0.125\"} 2\n"
    "vllm:time_to_first_token_seconds_bucket{le=\"0.5\"} 3\n"
    "vllm:time_to_first_token_seconds_bucket{le=\"1\"} 3\n"
    "vllm:time_to_first_token_seconds_bucket{le=\"+Inf\"} 4\n"
    "vllm:time_to_first_token_seconds_sum 2.4375\n"
    "vllm:time_to_first_token_seconds_count 4\n"
    "# HELP tandem_lat_seconds Latency by tier.\n"
    "# TYPE tandem_lat_seconds histogram\n"
    "tandem_lat_seconds_bucket{tier=\"fast\",le=\"1\"} 1\n"
    "tandem_lat_seconds_bucket{tier=\"fast\",le=\"+Inf\"} 1\n"
    "tandem_lat_seconds_sum{tier=\"fast\"} 0.5\n"
    "tandem_lat_seconds_count{tier=\"fast\"} 1\n"
    "# HELP tandem_kvstore_bytes_used Bytes.\n"
    "# TYPE tandem_kvstore_bytes_used gauge\n"
    "tandem_kvstore_bytes_used 1048576\n"
    "# HELP tandem_errors_total Errors by kind.\n"
    "# TYPE tandem_errors_total counter\n"
    "# TYPE tandem_nohelp_total counter\n"
    "tandem_nohelp_total 0\n";

static void test_small_registry(void)
{
    tdm_metrics_registry_t *reg = registry_new();
    fill_small(reg);
    char *text = render(reg);
    CHECK(strcmp(text, small_expected) == 0, "got:\n%s\nwant:\n%s", text, small_expected);
    free(text);

    /* An empty registry renders as empty text. */
    tdm_metrics_registry_t *empty = registry_new();
    text = render(empty);
    CHECK(text[0] == '\0', "empty registry: \"%s\"", text);
    free(text);
    tdm_metrics_registry_destroy(empty);
    tdm_metrics_registry_destroy(reg);
    tdm_metrics_registry_destroy(NULL);
}

/* ---- counters and gauges ---- */

static void test_counter_gauge(void)
{
    tdm_metrics_registry_t *reg = registry_new();
    tdm_metrics_counter_t *c;
    CHECK(tdm_metrics_counter_register(reg, "c_total", "c", &c) == TDM_OK, "register");
    tdm_metrics_counter_inc(c);
    tdm_metrics_counter_add_u64(c, 9);
    tdm_metrics_counter_add(c, 2.0);
    tdm_metrics_counter_add(c, 0.25);
    tdm_metrics_counter_add(c, -5.0); /* ignored: counters do not go down */
    tdm_metrics_counter_add(c, NAN);  /* ignored */
    CHECK(tdm_metrics_counter_value(c) == 12.25, "counter %g", tdm_metrics_counter_value(c));

    tdm_metrics_gauge_t *g;
    CHECK(tdm_metrics_gauge_register(reg, "g", "g", &g) == TDM_OK, "register");
    CHECK(tdm_metrics_gauge_value(g) == 0.0, "gauge starts at 0");
    tdm_metrics_gauge_set(g, 10);
    tdm_metrics_gauge_inc(g);
    tdm_metrics_gauge_dec(g);
    tdm_metrics_gauge_dec(g);
    tdm_metrics_gauge_add(g, -0.5);
    CHECK(tdm_metrics_gauge_value(g) == 8.5, "gauge %g", tdm_metrics_gauge_value(g));

    char *text = render(reg);
    char v[64];
    CHECK(strcmp(sample_value(text, "c_total", v), "12.25") == 0, "c_total %s", v);
    CHECK(strcmp(sample_value(text, "g", v), "8.5") == 0, "g %s", v);
    free(text);

    /* Floats print so that they parse back to the same double. */
    static const double vals[] = {0.1,
                                  1.0 / 3,
                                  -2.5e-7,
                                  123456789.123,
                                  1e21,
                                  5e-324,
                                  1e300,
                                  -0.0,
                                  0x1p53 + 2,
                                  2.2250738585072014e-308,
                                  1.7976931348623157e308};
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        tdm_metrics_gauge_set(g, vals[i]);
        text = render(reg);
        sample_value(text, "g", v);
        double back = strtod(v, NULL);
        CHECK(memcmp(&back, &vals[i], sizeof(double)) == 0 || (back == 0 && vals[i] == 0),
              "%.17g printed as %s", vals[i], v);
        free(text);
    }
    struct {
        double v;
        const char *want;
    } specials[] = {{INFINITY, "+Inf"}, {-INFINITY, "-Inf"}, {NAN, "NaN"}, {1e6, "1000000"}};
    for (size_t i = 0; i < sizeof(specials) / sizeof(specials[0]); i++) {
        tdm_metrics_gauge_set(g, specials[i].v);
        text = render(reg);
        CHECK(strcmp(sample_value(text, "g", v), specials[i].want) == 0, "%s printed as %s",
              specials[i].want, v);
        free(text);
    }
    tdm_metrics_registry_destroy(reg);
}

/* ---- histograms ---- */

static void test_histogram(void)
{
    tdm_metrics_registry_t *reg = registry_new();
    static const double bounds[] = {-1, 0, 0.5, 1, 10};
    tdm_metrics_histogram_t *h;
    CHECK(tdm_metrics_histogram_register(reg, "h_seconds", "h", bounds, 5, &h) == TDM_OK, "reg");
    static const double obs[] = {-3, -1, 0, 0.25, 0.5, 0.75, 1, 5, 10, 11, INFINITY, NAN};
    /* Non-cumulative counts per bucket: le=-1: -3,-1; 0: 0; 0.5: .25,.5;
     * 1: .75,1; 10: 5,10; +Inf: 11,Inf,NaN. */
    static const uint64_t per_bucket[] = {2, 1, 2, 2, 2, 3};
    for (size_t i = 0; i < sizeof(obs) / sizeof(obs[0]); i++)
        tdm_metrics_histogram_observe(h, obs[i]);
    CHECK(tdm_metrics_histogram_count(h) == 12, "count %llu",
          (unsigned long long)tdm_metrics_histogram_count(h));
    CHECK(isnan(tdm_metrics_histogram_sum(h)), "a NaN observation makes the sum NaN");

    char *text = render(reg);
    char series[128], v[64];
    static const char *const les[] = {"-1", "0", "0.5", "1", "10", "+Inf"};
    uint64_t cum = 0, prev = 0;
    for (int i = 0; i < 6; i++) {
        cum += per_bucket[i];
        snprintf(series, sizeof(series), "h_seconds_bucket{le=\"%s\"}", les[i]);
        uint64_t got = strtoull(sample_value(text, series, v), NULL, 10);
        CHECK(got == cum, "%s = %s, want %llu", series, v, (unsigned long long)cum);
        CHECK(got >= prev, "buckets are cumulative");
        prev = got;
    }
    CHECK(strcmp(sample_value(text, "h_seconds_count", v), "12") == 0, "count %s", v);
    CHECK(strcmp(sample_value(text, "h_seconds_sum", v), "NaN") == 0, "sum %s", v);
    free(text);

    /* No bounds at all: just +Inf. */
    tdm_metrics_histogram_t *h0;
    CHECK(tdm_metrics_histogram_register(reg, "h0", NULL, NULL, 0, &h0) == TDM_OK, "no bounds");
    tdm_metrics_histogram_observe(h0, 7);
    text = render(reg);
    CHECK(strcmp(sample_value(text, "h0_bucket{le=\"+Inf\"}", v), "1") == 0, "h0 +Inf %s", v);
    CHECK(strcmp(sample_value(text, "h0_sum", v), "7") == 0, "h0 sum %s", v);
    free(text);
    tdm_metrics_registry_destroy(reg);
}

/* ---- labels: children, bounds, escaping, bad input ---- */

static void test_labels(void)
{
    tdm_metrics_registry_t *reg = registry_new();
    const char *labels[] = {"model", "tier"};
    tdm_metrics_desc_t d = {.type = TDM_METRICS_TYPE_COUNTER,
                            .name = "vllm:generation_tokens_total",
                            .help = "Generated tokens.",
                            .label_names = labels,
                            .n_labels = 2,
                            .max_children = 3};
    tdm_metrics_family_t *fam;
    CHECK(tdm_metrics_family_register(reg, &d, &fam) == TDM_OK, "register");
    tdm_metrics_counter_t *a, *a2, *b, *e, *x = NULL;
    CHECK(tdm_metrics_family_counter(fam, (const char *[]){"m", "fast"}, &a) == TDM_OK, "a");
    CHECK(tdm_metrics_family_counter(fam, (const char *[]){"m", "quality"}, &b) == TDM_OK, "b");
    CHECK(tdm_metrics_family_counter(fam, (const char *[]){"m", "fast"}, &a2) == TDM_OK, "a2");
    CHECK(a == a2 && a != b, "one child per tuple");
    /* Escaping: backslash, quote, newline; UTF-8 passes as it is. */
    CHECK(tdm_metrics_family_counter(fam, (const char *[]){"x\\y\"z\nw", "caf\xc3\xa9"}, &e) ==
              TDM_OK,
          "escaped child");
    tdm_metrics_counter_add_u64(a, 5);
    tdm_metrics_counter_inc(b);
    tdm_metrics_counter_add_u64(e, 7);
    /* The family is full (3 tuples): a fourth is refused, known ones still work. */
    CHECK(tdm_metrics_family_counter(fam, (const char *[]){"m", "other"}, &x) == TDM_ERR_BUSY,
          "full family");
    CHECK(x == NULL, "output untouched on failure");
    CHECK(tdm_metrics_family_counter(fam, (const char *[]){"m", "quality"}, &x) == TDM_OK && x == b,
          "existing child in a full family");

    /* Bad values: NULL, too long, not UTF-8; a family of another type. */
    char long_value[TDM_METRICS_LABEL_VALUE_MAX + 1];
    memset(long_value, 'v', sizeof(long_value) - 1);
    long_value[sizeof(long_value) - 1] = '\0';
    x = NULL;
    CHECK(tdm_metrics_family_counter(fam, NULL, &x) == TDM_ERR_INVALID, "no values");
    CHECK(tdm_metrics_family_counter(fam, (const char *[]){"m", NULL}, &x) == TDM_ERR_INVALID,
          "NULL value");
    CHECK(tdm_metrics_family_counter(fam, (const char *[]){"m", long_value}, &x) == TDM_ERR_INVALID,
          "long value");
    CHECK(tdm_metrics_family_counter(fam, (const char *[]){"m", "\xff\xfe"}, &x) == TDM_ERR_INVALID,
          "bad UTF-8");
    tdm_metrics_gauge_t *gx = NULL;
    CHECK(tdm_metrics_family_gauge(fam, (const char *[]){"m", "fast"}, &gx) == TDM_ERR_INVALID,
          "wrong type");
    CHECK(x == NULL && gx == NULL, "outputs untouched");

    char *text = render(reg);
    static const char want[] =
        "# HELP vllm:generation_tokens_total Generated tokens.\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        "vllm:generation_tokens_total{model=\"m\",tier=\"fast\"} 5\n"
        "vllm:generation_tokens_total{model=\"m\",tier=\"quality\"} 1\n"
        "vllm:generation_tokens_total{model=\"x\\\\y\\\"z\\nw\",tier=\"caf\xc3\xa9\"} 7\n";
    CHECK(strcmp(text, want) == 0, "got:\n%s\nwant:\n%s", text, want);
    free(text);
    tdm_metrics_registry_destroy(reg);
}

static double zero_fn(void *arg)
{
    (void)arg;
    return 0;
}

static void test_bad_registrations(void)
{
    tdm_metrics_registry_t *reg = registry_new();
    tdm_metrics_counter_t *c;
    CHECK(tdm_metrics_counter_register(reg, "ok:name_1", "x", &c) == TDM_OK, "ok name");
    static const char *const bad_names[] = {"", "1abc", "a-b", "a b", "caf\xc3\xa9", "a{b"};
    for (size_t i = 0; i < sizeof(bad_names) / sizeof(bad_names[0]); i++)
        CHECK(tdm_metrics_counter_register(reg, bad_names[i], "x", &c) == TDM_ERR_INVALID,
              "name \"%s\"", bad_names[i]);
    CHECK(tdm_metrics_counter_register(reg, NULL, "x", &c) == TDM_ERR_INVALID, "NULL name");
    CHECK(tdm_metrics_counter_register(reg, "ok:name_1", "x", &c) == TDM_ERR_INVALID, "taken");
    CHECK(tdm_metrics_counter_register(reg, "badhelp", "\xc3", &c) == TDM_ERR_INVALID, "help");

    static const double unsorted[] = {1, 0.5}, dup[] = {1, 1}, inf[] = {1, INFINITY};
    tdm_metrics_histogram_t *h;
    CHECK(tdm_metrics_histogram_register(reg, "h1", "x", unsorted, 2, &h) == TDM_ERR_INVALID,
          "unsorted bounds");
    CHECK(tdm_metrics_histogram_register(reg, "h2", "x", dup, 2, &h) == TDM_ERR_INVALID,
          "equal bounds");
    CHECK(tdm_metrics_histogram_register(reg, "h3", "x", inf, 2, &h) == TDM_ERR_INVALID,
          "explicit +Inf bound");
    CHECK(tdm_metrics_histogram_register(reg, "h4", "x", NULL, 2, &h) == TDM_ERR_INVALID,
          "NULL bounds");

    const char *le[] = {"le"}, *reserved[] = {"__name"}, *twice[] = {"a", "a"}, *dash[] = {"a-b"},
               *colon[] = {"a:b"};
    struct {
        tdm_metrics_type_t type;
        const char *const *labels;
        int n;
    } bad_labels[] = {{TDM_METRICS_TYPE_HISTOGRAM, le, 1},
                      {TDM_METRICS_TYPE_COUNTER, reserved, 1},
                      {TDM_METRICS_TYPE_GAUGE, twice, 2},
                      {TDM_METRICS_TYPE_GAUGE, dash, 1},
                      {TDM_METRICS_TYPE_GAUGE, colon, 1},
                      {TDM_METRICS_TYPE_GAUGE, NULL, 1},
                      {TDM_METRICS_TYPE_GAUGE, twice, TDM_METRICS_MAX_LABELS + 1}};
    for (size_t i = 0; i < sizeof(bad_labels) / sizeof(bad_labels[0]); i++) {
        tdm_metrics_desc_t d = {.type = bad_labels[i].type,
                                .name = "labelled",
                                .label_names = bad_labels[i].labels,
                                .n_labels = bad_labels[i].n};
        CHECK(tdm_metrics_family_register(reg, &d, NULL) == TDM_ERR_INVALID, "bad labels %zu", i);
    }
    const char *one[] = {"a"};
    tdm_metrics_desc_t d = {.type = TDM_METRICS_TYPE_GAUGE,
                            .name = "labelled",
                            .label_names = one,
                            .n_labels = 1,
                            .max_children = TDM_METRICS_MAX_CHILDREN + 1};
    CHECK(tdm_metrics_family_register(reg, &d, NULL) == TDM_ERR_INVALID, "too many children");
    d.max_children = 0;
    d.fn = zero_fn;
    CHECK(tdm_metrics_family_register(reg, &d, NULL) == TDM_ERR_INVALID, "callback with labels");
    d.fn = NULL;
    d.type = (tdm_metrics_type_t)7;
    CHECK(tdm_metrics_family_register(reg, &d, NULL) == TDM_ERR_INVALID, "unknown type");
    d.type = TDM_METRICS_TYPE_COUNTER;
    d.n_buckets = 1;
    d.buckets = inf;
    CHECK(tdm_metrics_family_register(reg, &d, NULL) == TDM_ERR_INVALID, "counter with buckets");

    /* A callback family has no child to update. */
    CHECK(tdm_metrics_gauge_register_fn(reg, "cb", "x", zero_fn, NULL) == TDM_OK, "cb");
    tdm_metrics_desc_t cbd = {.type = TDM_METRICS_TYPE_COUNTER, .name = "cb_total", .fn = zero_fn};
    tdm_metrics_family_t *cbf;
    CHECK(tdm_metrics_family_register(reg, &cbd, &cbf) == TDM_OK, "callback counter");
    c = NULL;
    CHECK(tdm_metrics_family_counter(cbf, NULL, &c) == TDM_ERR_INVALID && c == NULL,
          "no child in a callback family");

    /* Nothing of the failed registrations shows. */
    char *text = render(reg);
    static const char want[] = "# HELP ok:name_1 x\n"
                               "# TYPE ok:name_1 counter\n"
                               "ok:name_1 0\n"
                               "# HELP cb x\n"
                               "# TYPE cb gauge\n"
                               "cb 0\n"
                               "# TYPE cb_total counter\n"
                               "cb_total 0\n";
    CHECK(strcmp(text, want) == 0, "got:\n%s", text);
    free(text);
    tdm_metrics_registry_destroy(reg);
}

/* ---- 4 threads updating, one rendering ---- */

#define N_THREADS 4
#define N_ITERS   100000

typedef struct shared {
    tdm_metrics_counter_t *ints, *halves;
    tdm_metrics_gauge_t *gauge;
    tdm_metrics_histogram_t *hist;
    tdm_metrics_family_t *by_thread; /* counter family, label "parity" */
    atomic_int running;
    atomic_int renders;
    atomic_int bad_renders;
} shared_t;

typedef struct worker {
    shared_t *s;
    int id;
} worker_t;

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    shared_t *s = w->s;
    /* Two threads create each child, racing. */
    tdm_metrics_counter_t *mine = NULL;
    const char *parity = (w->id & 1) ? "odd" : "even";
    if (tdm_metrics_family_counter(s->by_thread, (const char *[]){parity}, &mine) != TDM_OK)
        return (void *)1;
    for (int i = 0; i < N_ITERS; i++) {
        tdm_metrics_counter_inc(s->ints);
        tdm_metrics_counter_add(s->halves, 0.5);
        tdm_metrics_gauge_add(s->gauge, (i & 1) ? -1.0 : 2.0);
        tdm_metrics_histogram_observe(s->hist, (double)(i % 3));
        tdm_metrics_counter_inc(mine);
    }
    return NULL;
}

typedef struct render_arg {
    shared_t *s;
    tdm_metrics_registry_t *reg;
} render_arg_t;

static void *scraper_main(void *arg)
{
    render_arg_t *ra = arg;
    double last = 0;
    while (atomic_load(&ra->s->running)) {
        char *text = NULL;
        size_t len;
        if (tdm_metrics_registry_render(ra->reg, &text, &len) != TDM_OK) {
            atomic_fetch_add(&ra->s->bad_renders, 1);
            break;
        }
        char v[64];
        double now = strtod(sample_value(text, "ints_total", v), NULL);
        if (now < last) /* a counter never goes down between scrapes */
            atomic_fetch_add(&ra->s->bad_renders, 1);
        last = now;
        free(text);
        atomic_fetch_add(&ra->s->renders, 1);
    }
    return NULL;
}

static void test_threads(void)
{
    tdm_metrics_registry_t *reg = registry_new();
    shared_t s = {0};
    static const double bounds[] = {0.5, 1.5};
    CHECK(tdm_metrics_counter_register(reg, "ints_total", "x", &s.ints) == TDM_OK, "reg");
    CHECK(tdm_metrics_counter_register(reg, "halves_total", "x", &s.halves) == TDM_OK, "reg");
    CHECK(tdm_metrics_gauge_register(reg, "gauge", "x", &s.gauge) == TDM_OK, "reg");
    CHECK(tdm_metrics_histogram_register(reg, "hist", "x", bounds, 2, &s.hist) == TDM_OK, "reg");
    const char *parity[] = {"parity"};
    tdm_metrics_desc_t d = {.type = TDM_METRICS_TYPE_COUNTER,
                            .name = "by_parity_total",
                            .label_names = parity,
                            .n_labels = 1,
                            .max_children = 2};
    CHECK(tdm_metrics_family_register(reg, &d, &s.by_thread) == TDM_OK, "reg");
    atomic_store(&s.running, 1);

    render_arg_t ra = {&s, reg};
    pthread_t scraper, threads[N_THREADS];
    worker_t workers[N_THREADS];
    CHECK(pthread_create(&scraper, NULL, scraper_main, &ra) == 0, "scraper");
    for (int t = 0; t < N_THREADS; t++) {
        workers[t] = (worker_t){&s, t};
        CHECK(pthread_create(&threads[t], NULL, worker_main, &workers[t]) == 0, "thread %d", t);
    }
    for (int t = 0; t < N_THREADS; t++) {
        void *ret;
        pthread_join(threads[t], &ret);
        CHECK(ret == NULL, "worker %d could not get its child", t);
    }
    atomic_store(&s.running, 0);
    pthread_join(scraper, NULL);
    CHECK(atomic_load(&s.bad_renders) == 0, "renders failed or went backwards");

    const double n = (double)N_THREADS * N_ITERS;
    CHECK(tdm_metrics_counter_value(s.ints) == n, "ints %.17g", tdm_metrics_counter_value(s.ints));
    CHECK(tdm_metrics_counter_value(s.halves) == n / 2, "halves %.17g",
          tdm_metrics_counter_value(s.halves));
    CHECK(tdm_metrics_gauge_value(s.gauge) == n / 2, "gauge %.17g",
          tdm_metrics_gauge_value(s.gauge));
    CHECK(tdm_metrics_histogram_count(s.hist) == (uint64_t)n, "hist count");

    /* i % 3 over 0..N_ITERS-1, per thread: zeros, ones and twos. */
    uint64_t k[3] = {0, 0, 0};
    for (int i = 0; i < N_ITERS; i++)
        k[i % 3]++;
    char *text = render(reg);
    char v[64], want[64];
    snprintf(want, sizeof(want), "%llu", (unsigned long long)(N_THREADS * k[0]));
    CHECK(strcmp(sample_value(text, "hist_bucket{le=\"0.5\"}", v), want) == 0, "le 0.5: %s", v);
    snprintf(want, sizeof(want), "%llu", (unsigned long long)(N_THREADS * (k[0] + k[1])));
    CHECK(strcmp(sample_value(text, "hist_bucket{le=\"1.5\"}", v), want) == 0, "le 1.5: %s", v);
    snprintf(want, sizeof(want), "%llu", (unsigned long long)(N_THREADS * (k[1] + 2 * k[2])));
    CHECK(strcmp(sample_value(text, "hist_sum", v), want) == 0, "sum: %s", v);
    snprintf(want, sizeof(want), "%d", N_THREADS / 2 * N_ITERS);
    CHECK(strcmp(sample_value(text, "by_parity_total{parity=\"even\"}", v), want) == 0, "even: %s",
          v);
    CHECK(strcmp(sample_value(text, "by_parity_total{parity=\"odd\"}", v), want) == 0, "odd: %s",
          v);
    free(text);
    printf("threads: %d renders while %d threads updated\n", atomic_load(&s.renders), N_THREADS);
    tdm_metrics_registry_destroy(reg);
}

/* ---- --dump: text for the Python parser test ---- */

static int dump(void)
{
    tdm_metrics_registry_t *reg = registry_new();
    fill_small(reg);
    const char *v_label[] = {"v"};
    tdm_metrics_desc_t d = {.type = TDM_METRICS_TYPE_GAUGE,
                            .name = "tandem_special",
                            .help = "Special values.",
                            .label_names = v_label,
                            .n_labels = 1};
    tdm_metrics_family_t *fam;
    if (tdm_metrics_family_register(reg, &d, &fam) != TDM_OK)
        return 1;
    struct {
        const char *name;
        double v;
    } specials[] = {{"nan", NAN},
                    {"inf", INFINITY},
                    {"ninf", -INFINITY},
                    {"tenth", 0.1},
                    {"third", 1.0 / 3},
                    {"tiny", 5e-324},
                    {"big", 1.7976931348623157e308},
                    {"neg", -2.5e-7},
                    {"e21", 1e21}};
    for (size_t i = 0; i < sizeof(specials) / sizeof(specials[0]); i++) {
        tdm_metrics_gauge_t *g;
        if (tdm_metrics_family_gauge(fam, (const char *[]){specials[i].name}, &g) != TDM_OK)
            return 1;
        tdm_metrics_gauge_set(g, specials[i].v);
    }
    char *text = render(reg);
    fputs(text, stdout);
    free(text);
    tdm_metrics_registry_destroy(reg);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--dump") == 0)
        return dump();
    test_small_registry();
    test_counter_gauge();
    test_histogram();
    test_labels();
    test_bad_registrations();
    test_threads();
    return t_finish();
}
