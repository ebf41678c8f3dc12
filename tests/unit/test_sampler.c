/* Unit tests of the sampler (include/tandem/sampler.h).
 *
 * Besides the behaviour tests on tiny vocabularies, a naive oracle (full
 * sort of the vocabulary, the spec's steps written out plainly) must pick
 * the same token and logprob, bit for bit, as the sampler on random logits
 * of up to 49152 tokens. Everything runs from fixed seeds. */
#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tandem/sampler.h"

static int n_passed, n_failed;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (cond) {                                                                                \
            n_passed++;                                                                            \
        } else {                                                                                   \
            n_failed++;                                                                            \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                        \
        }                                                                                          \
    } while (0)

/* ---- test data: a generator of its own, independent of the sampler's ---- */

static uint64_t test_rng = 0x5eed5eed5eedull;

static uint64_t test_next(void)
{
    uint64_t z = (test_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double test_uniform(void)
{
    return (double)(test_next() >> 11) * 0x1.0p-53;
}

static float test_gauss(void)
{
    double u1 = test_uniform(), u2 = test_uniform();
    return (float)(sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * M_PI * u2));
}

static tdm_sampling_params_t params_seeded(float temperature, uint64_t seed)
{
    tdm_sampling_params_t p;
    tdm_sampling_params_default(&p);
    p.temperature = temperature;
    p.has_seed = true;
    p.seed = seed;
    return p;
}

static tdm_sampler_t *sampler_new(int32_t n_vocab)
{
    tdm_sampler_t *s = NULL;
    tdm_status_t st = tdm_sampler_create(n_vocab, &s);
    if (st != TDM_OK || s == NULL) {
        fprintf(stderr, "tdm_sampler_create(%d) failed: %s\n", n_vocab, tdm_status_str(st));
        exit(1);
    }
    return s;
}

static int32_t sample_copy(tdm_sampler_t *s, const tdm_sampling_params_t *p, tdm_sample_state_t *st,
                           const float *logits, int32_t n, float *logprob)
{
    float buf[64];
    assert(n <= 64);
    memcpy(buf, logits, (size_t)n * sizeof(float));
    return tdm_sampler_sample(s, p, st, buf, NULL, 0, NULL, 0, logprob);
}

/* ---- the oracle ---- */

static uint64_t ref_rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static double ref_uniform(uint64_t s[4])
{
    uint64_t r = ref_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = ref_rotl(s[3], 45);
    return (double)(r >> 11) * 0x1.0p-53;
}

static float ref_weight(float x, float max)
{
    return x == max ? 1.0f : expf(x - max);
}

/* Sums over the vocabulary go in 8 lanes (i mod 8), added pairwise. */
static double ref_sum(const float *x, int32_t n, float max)
{
    double l[8] = {0};
    for (int32_t i = 0; i < n; i++)
        l[i % 8] += (double)ref_weight(x[i], max);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

static const float *ref_sort_logits;

static int ref_cmp(const void *a, const void *b)
{
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    float x = ref_sort_logits[i], y = ref_sort_logits[j];
    if (x != y)
        return x > y ? -1 : 1;
    return i < j ? -1 : 1;
}

/* The spec step by step; logits[] is modified like the sampler's. */
static int32_t ref_sample(const tdm_sampling_params_t *p, uint64_t rng[4], float *logits, int32_t n,
                          const int32_t *prompt, size_t n_prompt, const int32_t *output,
                          size_t n_output, float *logprob)
{
    uint32_t *cnt = calloc((size_t)n, sizeof(*cnt));
    char *seen = calloc((size_t)n, 1);
    float *x = malloc((size_t)n * sizeof(*x));
    int32_t *order = malloc((size_t)n * sizeof(*order));
    assert(cnt && seen && x && order);
    for (size_t i = 0; i < n_output; i++) {
        cnt[output[i]]++;
        seen[output[i]] = 1;
    }
    for (size_t i = 0; i < n_prompt; i++)
        seen[prompt[i]] = 1;
    for (int32_t i = 0; i < n; i++) {
        float v = logits[i];
        if (seen[i] && p->repetition_penalty != 1.0f)
            v = v > 0.0f ? v / p->repetition_penalty : v * p->repetition_penalty;
        if (cnt[i] > 0) {
            v -= (float)cnt[i] * p->frequency_penalty;
            v -= p->presence_penalty;
        }
        logits[i] = v;
        x[i] = isnan(v) ? -INFINITY : v;
    }
    float max = -INFINITY;
    int32_t best = 0;
    for (int32_t i = 0; i < n; i++)
        if (x[i] > max) {
            max = x[i];
            best = i;
        }
    double lse = ref_sum(x, n, max);
    int32_t token = best;
    if (p->temperature > 0.0f) {
        double u = ref_uniform(rng);
        float max_s = max / p->temperature;
        for (int32_t i = 0; i < n; i++) {
            logits[i] = x[i] / p->temperature;
            order[i] = i;
        }
        ref_sort_logits = x;
        qsort(order, (size_t)n, sizeof(*order), ref_cmp);
        int32_t n_cand = (p->top_k > 0 && p->top_k < n) ? p->top_k : n;
        double total = 0.0;
        if (n_cand < n)
            for (int32_t j = 0; j < n_cand; j++)
                total += (double)ref_weight(logits[order[j]], max_s);
        else
            total = ref_sum(logits, n, max_s);
        int32_t n_keep = n_cand;
        if (p->top_p < 1.0f || p->min_p > 0.0f) {
            double cum = 0.0;
            for (n_keep = 0; n_keep < n_cand; n_keep++) {
                float w = ref_weight(logits[order[n_keep]], max_s);
                if (p->min_p > 0.0f && n_keep > 0 && w < p->min_p * 1.0f)
                    break;
                cum += (double)w;
                if (p->top_p < 1.0f && cum >= (double)p->top_p * total) {
                    n_keep++;
                    break;
                }
            }
            total = cum;
        }
        double cum = 0.0, target = u * total;
        token = order[0];
        for (int32_t j = 0; j < n_keep; j++) {
            float w = ref_weight(logits[order[j]], max_s);
            if (w > 0.0f)
                token = order[j];
            cum += (double)w;
            if (cum > target)
                break;
        }
    }
    if (logprob != NULL) {
        double d = x[token] == max ? 0.0 : (double)x[token] - (double)max;
        *logprob = (float)(d - log(lse));
    }
    free(order);
    free(x);
    free(seen);
    free(cnt);
    return token;
}

/* ---- tests ---- */

static void test_params(void)
{
    tdm_sampling_params_t p;
    char err[128];
    tdm_sampling_params_default(&p);
    CHECK(p.temperature == 1.0f && p.top_k <= 0 && p.top_p >= 1.0f && p.min_p <= 0.0f);
    CHECK(p.repetition_penalty == 1.0f && p.frequency_penalty == 0.0f);
    CHECK(p.presence_penalty == 0.0f && !p.has_seed);
    CHECK(tdm_sampling_params_validate(&p, err, sizeof(err)) == TDM_OK);
    p.temperature = 0.0f;
    p.top_k = 1000000;
    p.top_p = 1.0f;
    p.min_p = 1.0f;
    p.frequency_penalty = -2.0f;
    p.presence_penalty = 2.0f;
    p.repetition_penalty = 0.01f;
    CHECK(tdm_sampling_params_validate(&p, err, sizeof(err)) == TDM_OK);

    struct {
        const char *field;
        float value;
        const char *message;
    } bad[] = {
        {"temperature", -0.5f, "temperature must be finite and >= 0, got -0.5"},
        {"temperature", NAN, "temperature must be finite and >= 0, got nan"},
        {"temperature", INFINITY, "temperature must be finite and >= 0, got inf"},
        {"top_p", 1.5f, "top_p must be in (0, 1], got 1.5"},
        {"top_p", 0.0f, "top_p must be in (0, 1], got 0"},
        {"top_p", NAN, "top_p must be in (0, 1], got nan"},
        {"min_p", -0.25f, "min_p must be in [0, 1], got -0.25"},
        {"min_p", 2.0f, "min_p must be in [0, 1], got 2"},
        {"repetition_penalty", 0.0f, "repetition_penalty must be finite and > 0, got 0"},
        {"repetition_penalty", -1.0f, "repetition_penalty must be finite and > 0, got -1"},
        {"frequency_penalty", 2.5f, "frequency_penalty must be in [-2, 2], got 2.5"},
        {"presence_penalty", -3.0f, "presence_penalty must be in [-2, 2], got -3"},
        {"presence_penalty", NAN, "presence_penalty must be in [-2, 2], got nan"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        tdm_sampling_params_default(&p);
        float *f = strcmp(bad[i].field, "temperature") == 0          ? &p.temperature
                   : strcmp(bad[i].field, "top_p") == 0              ? &p.top_p
                   : strcmp(bad[i].field, "min_p") == 0              ? &p.min_p
                   : strcmp(bad[i].field, "repetition_penalty") == 0 ? &p.repetition_penalty
                   : strcmp(bad[i].field, "frequency_penalty") == 0  ? &p.frequency_penalty
                                                                     : &p.presence_penalty;
        *f = bad[i].value;
        err[0] = '\0';
        CHECK(tdm_sampling_params_validate(&p, err, sizeof(err)) == TDM_ERR_INVALID);
        if (strcmp(err, bad[i].message) != 0) {
            fprintf(stderr, "  message '%s', expected '%s'\n", err, bad[i].message);
            n_failed++;
        } else {
            n_passed++;
        }
    }
    /* No room for the message, or none asked for: still rejected. */
    tdm_sampling_params_default(&p);
    p.top_p = 1.5f;
    CHECK(tdm_sampling_params_validate(&p, NULL, 0) == TDM_ERR_INVALID);
    char tiny[8];
    CHECK(tdm_sampling_params_validate(&p, tiny, sizeof(tiny)) == TDM_ERR_INVALID);
    CHECK(strlen(tiny) == sizeof(tiny) - 1);
    CHECK(tdm_sampling_params_validate(NULL, err, sizeof(err)) == TDM_ERR_INVALID);
}

static void test_create(void)
{
    tdm_sampler_t *s = NULL;
    CHECK(tdm_sampler_create(0, &s) == TDM_ERR_INVALID);
    CHECK(s == NULL); /* output untouched on failure */
    CHECK(tdm_sampler_create(-3, &s) == TDM_ERR_INVALID);
    tdm_sampler_destroy(NULL);
    s = sampler_new(1);
    tdm_sampling_params_t p = params_seeded(1.0f, 1);
    tdm_sample_state_t st;
    tdm_sample_state_init(&st, &p);
    float x = 3.0f, lp = 1.0f;
    CHECK(tdm_sampler_sample(s, &p, &st, &x, NULL, 0, NULL, 0, &lp) == 0);
    CHECK(lp == 0.0f);
    tdm_sampler_destroy(s);
}

/* One call on a sampler of exactly n tokens. */
static int32_t sample_n(const tdm_sampling_params_t *p, tdm_sample_state_t *st, const float *logits,
                        int32_t n, float *logprob)
{
    tdm_sampler_t *s = sampler_new(n);
    int32_t t = sample_copy(s, p, st, logits, n, logprob);
    tdm_sampler_destroy(s);
    return t;
}

static void test_greedy(void)
{
    tdm_sampling_params_t p = params_seeded(0.0f, 7);
    tdm_sample_state_t st, before;
    tdm_sample_state_init(&st, &p);
    before = st;

    const float a[8] = {0.1f, -2.0f, 3.5f, 3.4f, 0.0f, -1.0f, 2.0f, 1.0f};
    float lp;
    CHECK(sample_n(&p, &st, a, 8, &lp) == 2);
    double lse = 0.0;
    for (int i = 0; i < 8; i++)
        lse += exp((double)a[i] - 3.5);
    CHECK(fabs((double)lp + log(lse)) < 1e-6);

    const float ties[8] = {1.0f, 5.0f, -1.0f, 5.0f, 5.0f, 0.0f, 2.0f, 5.0f};
    CHECK(sample_n(&p, &st, ties, 8, NULL) == 1);
    const float zeros[4] = {-0.0f, 0.0f, -0.0f, 0.0f};
    CHECK(sample_n(&p, &st, zeros, 4, NULL) == 0);

    const float nan_first[8] = {NAN, 1.0f, NAN, 4.0f, NAN, 4.0f, -INFINITY, NAN};
    CHECK(sample_n(&p, &st, nan_first, 8, &lp) == 3);
    CHECK(fabs((double)lp + log(2.0 + exp(-3.0))) < 1e-6);
    const float nan_after[4] = {-5.0f, NAN, -6.0f, NAN};
    CHECK(sample_n(&p, &st, nan_after, 4, NULL) == 0);
    const float all_nan[4] = {NAN, NAN, NAN, NAN};
    CHECK(sample_n(&p, &st, all_nan, 4, &lp) == 0);
    CHECK(fabsf(lp - logf(0.25f)) < 1e-6f); /* all -inf: uniform */
    /* NaN counts as -inf: tied with -inf, the lowest id wins. */
    const float nan_ninf[3] = {NAN, -INFINITY, -INFINITY};
    CHECK(sample_n(&p, &st, nan_ninf, 3, NULL) == 0);
    const float ninf_nan[3] = {-INFINITY, NAN, 7.0f};
    CHECK(sample_n(&p, &st, ninf_nan, 3, &lp) == 2);
    CHECK(lp == 0.0f);
    const float pinf[4] = {1.0f, INFINITY, 2.0f, INFINITY};
    CHECK(sample_n(&p, &st, pinf, 4, &lp) == 1);
    CHECK(fabsf(lp - logf(0.5f)) < 1e-6f);

    /* Greedy draws nothing from the generator. */
    CHECK(memcmp(&st, &before, sizeof(st)) == 0);

    /* With a temperature, NaN and infinities behave the same way. */
    p = params_seeded(1.0f, 8);
    tdm_sample_state_init(&st, &p);
    int ok = 1;
    for (int d = 0; d < 200; d++) {
        ok &= sample_n(&p, &st, ninf_nan, 3, &lp) == 2 && lp == 0.0f;
        int32_t t = sample_n(&p, &st, pinf, 4, &lp);
        ok &= (t == 1 || t == 3) && fabsf(lp - logf(0.5f)) < 1e-6f;
        t = sample_n(&p, &st, nan_first, 8, NULL);
        ok &= t == 1 || t == 3 || t == 5;
    }
    CHECK(ok);
}

static void test_seeds(void)
{
    enum { N = 50, DRAWS = 1000 };
    tdm_sampler_t *s = sampler_new(N);
    tdm_sampling_params_t p = params_seeded(0.9f, 1234);
    p.top_p = 0.95f;
    tdm_sample_state_t a, b, c;
    tdm_sample_state_init(&a, &p);
    tdm_sample_state_init(&b, &p);
    p.seed = 1235;
    tdm_sample_state_init(&c, &p);
    CHECK(memcmp(&a, &b, sizeof(a)) == 0);
    CHECK(memcmp(&a, &c, sizeof(a)) != 0);
    /* The state is splitmix64's stream from the seed: from 0, its first
     * output is 0xe220a8397b1dcdaf. */
    tdm_sampling_params_t z = params_seeded(1.0f, 0);
    tdm_sample_state_t sz;
    tdm_sample_state_init(&sz, &z);
    CHECK(sz.rng[0] == 0xe220a8397b1dcdafull);

    int same_ab = 0, same_ac = 0;
    for (int d = 0; d < DRAWS; d++) {
        float base[N], la[N], lb[N], lc[N];
        for (int i = 0; i < N; i++)
            base[i] = 1.5f * test_gauss();
        memcpy(la, base, sizeof(base));
        memcpy(lb, base, sizeof(base));
        memcpy(lc, base, sizeof(base));
        int32_t ta = tdm_sampler_sample(s, &p, &a, la, NULL, 0, NULL, 0, NULL);
        int32_t tb = tdm_sampler_sample(s, &p, &b, lb, NULL, 0, NULL, 0, NULL);
        int32_t tc = tdm_sampler_sample(s, &p, &c, lc, NULL, 0, NULL, 0, NULL);
        same_ab += ta == tb;
        same_ac += ta == tc;
    }
    CHECK(same_ab == DRAWS);
    CHECK(same_ac < DRAWS / 2);

    /* Without a seed, two states differ. */
    tdm_sampling_params_t q;
    tdm_sampling_params_default(&q);
    tdm_sample_state_init(&a, &q);
    tdm_sample_state_init(&b, &q);
    CHECK(memcmp(&a, &b, sizeof(a)) != 0);
    tdm_sampler_destroy(s);
}

/* Draws `draws` tokens and returns the chi-square statistic of the counts
 * against expected[] (only where expected > 0); counts go to counts[]. */
static double chi_square(tdm_sampler_t *s, const tdm_sampling_params_t *p, const float *logits,
                         int32_t n, const double *expected, int draws, int *counts)
{
    tdm_sample_state_t st;
    tdm_sample_state_init(&st, p);
    memset(counts, 0, (size_t)n * sizeof(*counts));
    for (int d = 0; d < draws; d++)
        counts[sample_copy(s, p, &st, logits, n, NULL)]++;
    double chi2 = 0.0;
    for (int32_t i = 0; i < n; i++)
        if (expected[i] > 0.0) {
            double e = expected[i] * draws;
            chi2 += (counts[i] - e) * (counts[i] - e) / e;
        }
    return chi2;
}

static void softmax_ref(const float *logits, int32_t n, double temperature, double *out)
{
    double max = -INFINITY, sum = 0.0;
    for (int32_t i = 0; i < n; i++)
        max = fmax(max, (double)logits[i]);
    for (int32_t i = 0; i < n; i++)
        sum += out[i] = exp(((double)logits[i] - max) / temperature);
    for (int32_t i = 0; i < n; i++)
        out[i] /= sum;
}

static void test_distribution(void)
{
    enum { N = 6, DRAWS = 200000 };
    tdm_sampler_t *s = sampler_new(N);
    const float logits[N] = {1.0f, 0.5f, 0.0f, -0.5f, -1.0f, 2.0f};
    double expected[N];
    int counts[N];

    /* 5 degrees of freedom: P(chi2 > 25) is about 1.4e-4. */
    tdm_sampling_params_t p = params_seeded(1.0f, 99);
    softmax_ref(logits, N, 1.0, expected);
    double chi2 = chi_square(s, &p, logits, N, expected, DRAWS, counts);
    printf("distribution at temperature 1: chi2 = %.2f (5 dof)\n", chi2);
    CHECK(chi2 < 25.0);

    p = params_seeded(0.5f, 100);
    softmax_ref(logits, N, 0.5, expected);
    chi2 = chi_square(s, &p, logits, N, expected, DRAWS, counts);
    printf("distribution at temperature 0.5: chi2 = %.2f (5 dof)\n", chi2);
    CHECK(chi2 < 25.0);
    tdm_sampler_destroy(s);
}

static void test_top_k(void)
{
    enum { N = 10, DRAWS = 100000 };
    tdm_sampler_t *s = sampler_new(N);
    /* top-k = 1 is greedy, ties and NaN included. */
    tdm_sampling_params_t p = params_seeded(1.3f, 5), g = params_seeded(0.0f, 5);
    p.top_k = 1;
    tdm_sample_state_t st;
    tdm_sample_state_init(&st, &p);
    int agree = 0;
    for (int d = 0; d < 1000; d++) {
        float l[N];
        for (int i = 0; i < N; i++) {
            l[i] = (float)(int)(3.0f * test_gauss()); /* many ties */
            if (test_next() % 10 == 0)
                l[i] = NAN;
        }
        if (d % 100 == 0)
            for (int i = 0; i < N; i++)
                l[i] = (i & 1) ? -0.0f : 0.0f;
        agree += sample_copy(s, &p, &st, l, N, NULL) == sample_copy(s, &g, &st, l, N, NULL);
    }
    CHECK(agree == 1000);

    /* top-k = 3 restricts the support to the three best and keeps their
     * renormalized proportions. */
    const float l[N] = {0.0f, 2.0f, -1.0f, 1.5f, 0.3f, 1.9f, -3.0f, 0.2f, 1.0f, 0.9f};
    double full[N], expected[N] = {0};
    int counts[N];
    softmax_ref(l, N, 1.0, full);
    double z = full[1] + full[3] + full[5];
    expected[1] = full[1] / z;
    expected[3] = full[3] / z;
    expected[5] = full[5] / z;
    p = params_seeded(1.0f, 6);
    p.top_k = 3;
    double chi2 = chi_square(s, &p, l, N, expected, DRAWS, counts);
    int outside = 0;
    for (int i = 0; i < N; i++)
        if (expected[i] == 0.0)
            outside += counts[i];
    CHECK(outside == 0);
    CHECK(chi2 < 20.0); /* 2 dof */
    /* top-k at or beyond the vocabulary is off. */
    p.top_k = N;
    softmax_ref(l, N, 1.0, expected);
    chi2 = chi_square(s, &p, l, N, expected, DRAWS, counts);
    CHECK(chi2 < 35.0); /* 9 dof */
    tdm_sampler_destroy(s);
}

static void test_top_p(void)
{
    enum { N = 5, DRAWS = 50000 };
    tdm_sampler_t *s = sampler_new(N);
    /* Probabilities 0.05 0.2 0.5 0.1 0.15: sorted 0.5 0.2 0.15 0.1 0.05,
     * cumulative 0.5 0.7 0.85 0.95 1. */
    const float l[N] = {logf(0.05f), logf(0.2f), logf(0.5f), logf(0.1f), logf(0.15f)};
    const struct {
        float top_p;
        int support[N];
    } cases[] = {
        {0.3f, {0, 0, 1, 0, 0}},  {0.69f, {0, 1, 1, 0, 0}}, {0.71f, {0, 1, 1, 0, 1}},
        {0.84f, {0, 1, 1, 0, 1}}, {0.9f, {0, 1, 1, 1, 1}},  {0.99f, {1, 1, 1, 1, 1}},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        tdm_sampling_params_t p = params_seeded(1.0f, 10 + c);
        p.top_p = cases[c].top_p;
        double expected[N], z = 0.0;
        int counts[N];
        softmax_ref(l, N, 1.0, expected);
        for (int i = 0; i < N; i++)
            z += expected[i] *= cases[c].support[i];
        for (int i = 0; i < N; i++)
            expected[i] /= z;
        double chi2 = chi_square(s, &p, l, N, expected, DRAWS, counts);
        int ok = chi2 < 25.0;
        for (int i = 0; i < N; i++)
            ok &= (counts[i] > 0) == (cases[c].support[i] != 0);
        if (!ok)
            fprintf(stderr, "  top_p %.2f: chi2 %.2f\n", (double)cases[c].top_p, chi2);
        CHECK(ok);
    }
    tdm_sampler_destroy(s);

    /* A big vocabulary whose nucleus needs several doublings of the sorted
     * prefix: 300 equal tokens at scattered ids, the rest -inf. With
     * top_p 0.905 the nucleus is the 272 lowest ids of the 300 (ties go to
     * the lower id). */
    enum { V = 49152, EQUAL = 300, NUCLEUS = 272 };
    s = sampler_new(V);
    float *big = malloc(V * sizeof(*big)), *buf = malloc(V * sizeof(*buf));
    char *in_nucleus = calloc(V, 1), *hit = calloc(V, 1);
    int32_t *ids = malloc(EQUAL * sizeof(*ids));
    for (int i = 0; i < V; i++)
        big[i] = -INFINITY;
    for (int k = 0; k < EQUAL; k++) {
        ids[k] = (int32_t)(((uint64_t)k * 16411u + 77u) % V);
        big[ids[k]] = 4.0f;
    }
    int below = 0;
    for (int k = 0; k < EQUAL; k++) {
        int rank = 0;
        for (int j = 0; j < EQUAL; j++)
            rank += ids[j] < ids[k];
        in_nucleus[ids[k]] = rank < NUCLEUS;
        below += rank < NUCLEUS;
    }
    CHECK(below == NUCLEUS);
    tdm_sampling_params_t p = params_seeded(0.7f, 21);
    p.top_p = 0.905f;
    tdm_sample_state_t st;
    tdm_sample_state_init(&st, &p);
    int outside = 0, n_hit = 0;
    for (int d = 0; d < 5000; d++) {
        memcpy(buf, big, V * sizeof(*buf));
        int32_t t = tdm_sampler_sample(s, &p, &st, buf, NULL, 0, NULL, 0, NULL);
        outside += !in_nucleus[t];
        n_hit += !hit[t];
        hit[t] = 1;
    }
    CHECK(outside == 0);
    CHECK(n_hit == NUCLEUS);
    free(ids);
    free(hit);
    free(in_nucleus);
    free(buf);
    free(big);
    tdm_sampler_destroy(s);
}

static void test_min_p(void)
{
    enum { N = 6, DRAWS = 50000 };
    tdm_sampler_t *s = sampler_new(N);
    /* Probabilities 0.05 0.4 0.1 0.05 0.3 0.1; min_p 0.2 keeps p >= 0.08. */
    const float l[N] = {logf(0.05f), logf(0.4f), logf(0.1f), logf(0.05f), logf(0.3f), logf(0.1f)};
    const int support[N] = {0, 1, 1, 0, 1, 1};
    tdm_sampling_params_t p = params_seeded(1.0f, 31);
    p.min_p = 0.2f;
    double expected[N], z = 0.0;
    int counts[N];
    softmax_ref(l, N, 1.0, expected);
    for (int i = 0; i < N; i++)
        z += expected[i] *= support[i];
    for (int i = 0; i < N; i++)
        expected[i] /= z;
    double chi2 = chi_square(s, &p, l, N, expected, DRAWS, counts);
    int ok = chi2 < 20.0;
    for (int i = 0; i < N; i++)
        ok &= (counts[i] > 0) == (support[i] != 0);
    CHECK(ok);
    /* Relative to the best after temperature: at 0.5 the weights are the
     * squares, 0.16 for the best, 0.09, then 0.01 and 0.0025; min_p 0.2
     * keeps 0.16 and 0.09 only (0.01 / 0.16 < 0.2). */
    p = params_seeded(0.5f, 32);
    p.min_p = 0.2f;
    tdm_sample_state_t st;
    tdm_sample_state_init(&st, &p);
    int seen[N] = {0};
    for (int d = 0; d < 20000; d++)
        seen[sample_copy(s, &p, &st, l, N, NULL)]++;
    CHECK(seen[1] > 0 && seen[4] > 0);
    CHECK(seen[0] + seen[2] + seen[3] + seen[5] == 0);
    /* min_p 1 keeps only the best. */
    p.min_p = 1.0f;
    int best = 0;
    for (int d = 0; d < 1000; d++)
        best += sample_copy(s, &p, &st, l, N, NULL) == 1;
    CHECK(best == 1000);
    tdm_sampler_destroy(s);
}

static int logits_equal(const float *a, const float *b, int n)
{
    for (int i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0) {
            fprintf(stderr, "  logit %d: %.9g, expected %.9g\n", i, (double)a[i], (double)b[i]);
            return 0;
        }
    return 1;
}

static void test_penalties(void)
{
    enum { N = 6 };
    tdm_sampler_t *s = sampler_new(N);
    const float base[N] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 1.0f};
    const int32_t prompt[] = {0, 1, 0, -1, 99};
    const int32_t output[] = {2, 3, 3, 1, 77};
    tdm_sampling_params_t p = params_seeded(0.0f, 1);
    tdm_sample_state_t st;
    tdm_sample_state_init(&st, &p);
    float l[N];

    /* Repetition 2 over prompt + output {0, 1, 2, 3}: positive divided,
     * negative multiplied; out-of-range ids ignored. */
    p.repetition_penalty = 2.0f;
    memcpy(l, base, sizeof(l));
    tdm_sampler_sample(s, &p, &st, l, prompt, 5, output, 5, NULL);
    CHECK(logits_equal(l, (const float[N]){1.0f, -2.0f, 0.25f, 1.5f, -2.0f, 1.0f}, N));

    /* Frequency 0.5 per occurrence in the output only: 1 once, 2 once, 3 twice. */
    p.repetition_penalty = 1.0f;
    p.frequency_penalty = 0.5f;
    memcpy(l, base, sizeof(l));
    tdm_sampler_sample(s, &p, &st, l, prompt, 5, output, 5, NULL);
    CHECK(logits_equal(l, (const float[N]){2.0f, -1.5f, 0.0f, 2.0f, -2.0f, 1.0f}, N));

    /* Presence 0.25 once per distinct output token. */
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.25f;
    memcpy(l, base, sizeof(l));
    tdm_sampler_sample(s, &p, &st, l, prompt, 5, output, 5, NULL);
    CHECK(logits_equal(l, (const float[N]){2.0f, -1.25f, 0.25f, 2.75f, -2.0f, 1.0f}, N));

    /* All three, in the order repetition, frequency, presence. */
    p.repetition_penalty = 2.0f;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    memcpy(l, base, sizeof(l));
    tdm_sampler_sample(s, &p, &st, l, prompt, 5, output, 5, NULL);
    CHECK(logits_equal(l, (const float[N]){1.0f, -2.75f, -0.5f, 0.25f, -2.0f, 1.0f}, N));

    /* Negative penalties reward; a second call sees only its own history
     * (the marks of the last call do not leak). */
    p.repetition_penalty = 0.5f;
    p.frequency_penalty = -1.0f;
    p.presence_penalty = -0.5f;
    memcpy(l, base, sizeof(l));
    const int32_t out2[] = {4, 4, 4};
    tdm_sampler_sample(s, &p, &st, l, (const int32_t[]){5}, 1, out2, 3, NULL);
    CHECK(logits_equal(l, (const float[N]){2.0f, -1.0f, 0.5f, 3.0f, 2.5f, 2.0f}, N));

    /* No history: nothing changes. */
    memcpy(l, base, sizeof(l));
    tdm_sampler_sample(s, &p, &st, l, NULL, 0, NULL, 0, NULL);
    CHECK(logits_equal(l, base, N));

    /* Penalties then greedy: token 3 (3.0) loses to token 0 (2 / 2 = 1)
     * and token 5 (1.0, untouched): the lowest id wins the tie, and the
     * logprob is under the penalized logits. */
    p.repetition_penalty = 2.0f;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    float lp;
    memcpy(l, base, sizeof(l));
    int32_t t = tdm_sampler_sample(s, &p, &st, l, prompt, 5, output, 5, &lp);
    CHECK(t == 0);
    const float pen[N] = {1.0f, -2.75f, -0.5f, 0.25f, -2.0f, 1.0f};
    double lse = 0.0;
    for (int i = 0; i < N; i++)
        lse += exp((double)pen[i] - 1.0);
    CHECK(fabs((double)lp + log(lse)) < 1e-6);

    /* With a temperature: logits[] ends up penalized / temperature, and the
     * logprob stays before the temperature. */
    p.temperature = 0.5f;
    memcpy(l, base, sizeof(l));
    t = tdm_sampler_sample(s, &p, &st, l, prompt, 5, output, 5, &lp);
    float scaled[N];
    for (int i = 0; i < N; i++)
        scaled[i] = pen[i] / 0.5f;
    CHECK(logits_equal(l, scaled, N));
    CHECK(fabs((double)lp - ((double)pen[t] - 1.0 - log(lse))) < 1e-6);
    tdm_sampler_destroy(s);
}

/* One call of the sampler and of the oracle on copies of base[] from the
 * same generator state: same token, same logprob bits, same logits[]
 * after, same generator state after. st advances. */
static int oracle_agrees(tdm_sampler_t *s, const tdm_sampling_params_t *p, tdm_sample_state_t *st,
                         const float *base, int32_t n, const int32_t *hist, size_t n_prompt,
                         size_t n_output, float *a, float *b, int verbose, int32_t *token)
{
    uint64_t rng[4];
    memcpy(rng, st->rng, sizeof(rng));
    memcpy(a, base, (size_t)n * sizeof(float));
    memcpy(b, base, (size_t)n * sizeof(float));
    float lpa = 0.0f, lpb = 0.0f;
    int32_t ta = tdm_sampler_sample(s, p, st, a, hist, n_prompt, hist ? hist + n_prompt : NULL,
                                    n_output, &lpa);
    int32_t tb =
        ref_sample(p, rng, b, n, hist, n_prompt, hist ? hist + n_prompt : NULL, n_output, &lpb);
    int ok = ta == tb && memcmp(&lpa, &lpb, sizeof(float)) == 0 &&
             memcmp(rng, st->rng, sizeof(rng)) == 0 && memcmp(a, b, (size_t)n * sizeof(float)) == 0;
    if (!ok && verbose)
        fprintf(stderr,
                "  oracle n=%d t=%.2f k=%d p=%.5f minp=%.3g: token %d vs %d, logprob %.9g vs "
                "%.9g\n",
                n, (double)p->temperature, p->top_k, (double)p->top_p, (double)p->min_p, ta, tb,
                (double)lpa, (double)lpb);
    if (token != NULL)
        *token = ta;
    return ok;
}

/* The sampler against the oracle on random logits: same token, same
 * logprob bits, same generator state after. */
static void test_oracle(void)
{
    static const int32_t sizes[] = {1, 2, 17, 100, 1000, 49152};
    int mismatches = 0, cases = 0;
    for (size_t zi = 0; zi < sizeof(sizes) / sizeof(sizes[0]); zi++) {
        int32_t n = sizes[zi];
        tdm_sampler_t *s = sampler_new(n);
        float *base = malloc((size_t)n * sizeof(float)), *a = malloc((size_t)n * sizeof(float)),
              *b = malloc((size_t)n * sizeof(float));
        int32_t hist[64];
        int rounds = n > 10000 ? 60 : 300;
        for (int r = 0; r < rounds; r++) {
            tdm_sampling_params_t p = params_seeded(0.0f, test_next());
            const float temps[] = {0.0f, 0.3f, 0.8f, 1.0f, 1.7f};
            p.temperature = temps[test_next() % 5];
            p.top_k = (int32_t)(test_next() % 3 == 0 ? test_next() % (uint64_t)(n + 2) : 0);
            p.top_p = test_next() % 2 ? (float)(0.05 + 0.95 * test_uniform()) : 1.0f;
            p.min_p = test_next() % 3 == 0 ? (float)(0.3 * test_uniform()) : 0.0f;
            if (test_next() % 3 == 0) {
                p.repetition_penalty = 1.3f;
                p.frequency_penalty = 0.4f;
                p.presence_penalty = -0.2f;
            }
            float scale = (float)(0.5 + 6.0 * test_uniform());
            int shape = (int)(test_next() % 4);
            for (int32_t i = 0; i < n; i++) {
                float v = scale * test_gauss();
                if (shape == 1)
                    v = (float)(int)v; /* ties */
                if (shape == 2 && test_next() % 50 == 0)
                    v = test_next() % 2 ? NAN : -INFINITY;
                base[i] = v;
            }
            if (shape == 3) /* a few dominant tokens, like a trained model */
                for (int k = 0; k < 5; k++)
                    base[test_next() % (uint64_t)n] += 12.0f;
            size_t n_hist = test_next() % 64;
            for (size_t i = 0; i < n_hist; i++)
                hist[i] = (int32_t)(test_next() % (uint64_t)n);
            size_t n_prompt = n_hist / 2;

            tdm_sample_state_t st;
            tdm_sample_state_init(&st, &p);
            int ok = oracle_agrees(s, &p, &st, base, n, hist, n_prompt, n_hist - n_prompt, a, b,
                                   mismatches < 5, NULL);
            mismatches += !ok;
            cases++;
        }
        free(b);
        free(a);
        free(base);
        tdm_sampler_destroy(s);
    }
    printf("oracle: %d cases, %d mismatches\n", cases, mismatches);
    CHECK(mismatches == 0);
}

/* Tokens more than 16 nats under the best are searched only when a walk
 * runs out of the others: one token 16.01 above 49151 at 0 puts 0.55% of
 * the mass out there. */
static void test_far_tail(void)
{
    enum { V = 49152, TOP = 777 };
    tdm_sampler_t *s = sampler_new(V);
    float *base = malloc(V * sizeof(float)), *a = malloc(V * sizeof(float)),
          *b = malloc(V * sizeof(float));
    for (int i = 0; i < V; i++)
        base[i] = 0.0f;
    base[TOP] = 16.01f;
    int ok = 1;

    /* top-p over the tail: the nucleus takes most of it. */
    tdm_sampling_params_t p = params_seeded(1.0f, 41);
    p.top_p = 0.9999f;
    tdm_sample_state_t st;
    tdm_sample_state_init(&st, &p);
    for (int d = 0; d < 4; d++)
        ok &= oracle_agrees(s, &p, &st, base, V, NULL, 0, 0, a, b, 1, NULL);
    /* min-p under the tail's weight keeps it all. */
    p = params_seeded(1.0f, 42);
    p.min_p = 1e-8f;
    tdm_sample_state_init(&st, &p);
    for (int d = 0; d < 4; d++)
        ok &= oracle_agrees(s, &p, &st, base, V, NULL, 0, 0, a, b, 1, NULL);
    CHECK(ok);

    /* No truncation: the draws that land in the tail agree with the
     * oracle too. */
    p = params_seeded(1.0f, 43);
    tdm_sample_state_init(&st, &p);
    int tail = 0;
    for (int d = 0; d < 4000; d++) {
        tdm_sample_state_t saved = st;
        memcpy(a, base, V * sizeof(float));
        int32_t t = tdm_sampler_sample(s, &p, &st, a, NULL, 0, NULL, 0, NULL);
        if (t != TOP) {
            tail++;
            ok &= oracle_agrees(s, &p, &saved, base, V, NULL, 0, 0, a, b, 1, NULL);
        }
    }
    printf("far tail: %d of 4000 draws in the tail\n", tail);
    CHECK(ok && tail > 5 && tail < 60);
    free(b);
    free(a);
    free(base);
    tdm_sampler_destroy(s);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Time per call on a 49152 vocabulary (printed, not asserted). */
static void bench_one(tdm_sampler_t *s, const char *name, float scale, int peaked, float top_p,
                      int32_t top_k, bool want_logprob)
{
    enum { V = 49152, CALLS = 200 };
    float *base = malloc(V * sizeof(float)), *buf = malloc(V * sizeof(float));
    int32_t hist[256];
    for (int i = 0; i < 256; i++)
        hist[i] = (int32_t)(test_next() % V);
    tdm_sampling_params_t p = params_seeded(0.8f, 77);
    p.top_p = top_p;
    p.top_k = top_k;
    p.repetition_penalty = 1.1f;
    tdm_sample_state_t st;
    tdm_sample_state_init(&st, &p);
    double total = 0.0, best = 1e9;
    float lp;
    for (int c = 0; c < CALLS; c++) {
        if (c % 20 == 0) {
            for (int i = 0; i < V; i++)
                base[i] = scale * test_gauss();
            if (peaked)
                for (int k = 0; k < 8; k++)
                    base[test_next() % V] += 10.0f + (float)k;
        }
        memcpy(buf, base, V * sizeof(float));
        double t0 = now_s();
        tdm_sampler_sample(s, &p, &st, buf, hist, 200, hist + 200, 56, want_logprob ? &lp : NULL);
        double dt = now_s() - t0;
        total += dt;
        if (dt < best)
            best = dt;
    }
    printf("speed %-36s %7.1f us/call (best %.1f)\n", name, 1e6 * total / CALLS, 1e6 * best);
    free(buf);
    free(base);
}

static void test_speed(void)
{
    tdm_sampler_t *s = sampler_new(49152);
    printf("sample() on 49152 logits, temperature 0.8, repetition penalty 1.1:\n");
    bench_one(s, "top_p 0.9, peaked logits", 2.0f, 1, 0.9f, 0, false);
    bench_one(s, "top_p 0.9, peaked logits, logprob", 2.0f, 1, 0.9f, 0, true);
    bench_one(s, "top_p 0.9, N(0, 3^2) logits", 3.0f, 0, 0.9f, 0, false);
    bench_one(s, "top_p 0.9, N(0, 1) logits (flat)", 1.0f, 0, 0.9f, 0, false);
    bench_one(s, "top_k 50, top_p 0.9, N(0, 1) logits", 1.0f, 0, 0.9f, 50, false);
    bench_one(s, "no truncation, N(0, 3^2) logits", 3.0f, 0, 1.0f, 0, false);
    tdm_sampler_destroy(s);
}

/* The history a device sampler gets (tdm_sampler_history), with the
 * penalties applied from it the way ops->sample does, leaves the logits
 * bit for bit as the sampler's own penalties; and tdm_sample_state_next is
 * the draw a sampled token takes. */
static void test_history(void)
{
    enum { N = 300, ROWS = 200, MAXH = 64 };
    tdm_sampler_t *s = sampler_new(N);
    int32_t prompt[MAXH], output[MAXH], tok[2 * MAXH], cnt[2 * MAXH];
    float a[N], b[N];
    int same = 0;
    for (int r = 0; r < ROWS; r++) {
        size_t np = test_next() % MAXH, no = test_next() % MAXH;
        for (size_t i = 0; i < np; i++)
            prompt[i] = (int32_t)(test_next() % (N + 10)) - 5; /* some out of range */
        for (size_t i = 0; i < no; i++)
            output[i] = (int32_t)(test_next() % 40); /* repeats */
        tdm_sampling_params_t p = params_seeded(0.0f, (uint64_t)r);
        int kind = r % 4;
        p.repetition_penalty = kind == 1 ? 1.0f : 0.5f + (float)test_uniform() * 1.5f;
        p.frequency_penalty = kind == 2 ? 0.0f : (float)test_uniform() * 2.0f - 1.0f;
        p.presence_penalty = kind == 3 ? 0.0f : (float)test_uniform() * 2.0f - 1.0f;
        if (r % 17 == 0)
            p.repetition_penalty = 1.0f, p.frequency_penalty = 0.0f, p.presence_penalty = 0.0f;
        for (int i = 0; i < N; i++)
            a[i] = b[i] = test_gauss() * 3.0f;
        tdm_sample_state_t st;
        tdm_sample_state_init(&st, &p);
        tdm_sampler_sample(s, &p, &st, a, prompt, np, output, no, NULL);
        size_t nh = tdm_sampler_history(s, &p, prompt, np, output, no, tok, cnt);
        tdm_sampler_penalize_history(&p, b, tok, cnt, nh);
        same += logits_equal(a, b, N);
    }
    CHECK(same == ROWS);

    /* A seeded token at temperature 1 takes exactly one draw, the one
     * tdm_sample_state_next gives, and sample_draw with it picks the same. */
    tdm_sampling_params_t p = params_seeded(1.0f, 42);
    p.top_k = 40;
    p.top_p = 0.9f;
    tdm_sample_state_t s1, s2;
    int agree = 0;
    for (int r = 0; r < 50; r++) {
        tdm_sample_state_init(&s1, &p);
        tdm_sample_state_init(&s2, &p);
        for (int i = 0; i < N; i++)
            a[i] = b[i] = test_gauss() * 2.0f;
        float la = 0, lb = 1;
        int32_t ta = tdm_sampler_sample(s, &p, &s1, a, NULL, 0, NULL, 0, &la);
        int32_t tb = tdm_sampler_sample_draw(s, &p, tdm_sample_state_next(&s2), b, &lb);
        agree += ta == tb && la == lb && tdm_sample_state_next(&s1) == tdm_sample_state_next(&s2);
        p.seed++;
    }
    CHECK(agree == 50);
    tdm_sampler_destroy(s);
}

int main(void)
{
    test_params();
    test_create();
    test_greedy();
    test_seeds();
    test_distribution();
    test_top_k();
    test_top_p();
    test_min_p();
    test_penalties();
    test_history();
    test_oracle();
    test_far_tail();
    test_speed();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed == 0 ? 0 : 1;
}
