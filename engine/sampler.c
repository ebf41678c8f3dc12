/* tandem: token sampling from logits (contract in include/tandem/sampler.h).
 *
 * Candidates are 64-bit keys: the penalized logit (before temperature) as
 * order-preserving bits in the high half, the bitwise complement of the
 * token id in the low half. Larger key = higher logit, then lower id, so
 * every order below is total and deterministic (it is the order of
 * descending probability, lowest id first on ties, except that two logits
 * whose exp() rounds to the same float stay in logit order), and the k best
 * are found by comparing integers. top-k = 1 is then exactly greedy.
 *
 * The candidates are never sorted whole unless a walk needs them all: a
 * prefix is selected (quickselect) and sorted, 64 keys at first, then at
 * least doubled (by as much as the weight still missing requires) while
 * top-p, min-p or the draw walk further down the order; large stretches are
 * sorted by radix. Keys within SAMPLER_NEAR_NATS of the best are kept apart
 * from the others, so the selections usually scan a few hundred keys, not
 * the vocabulary.
 *
 * Float operations run in a fixed order, so a seeded request gets the same
 * tokens on every run: penalties per token (repetition, then frequency, then
 * presence); sums over the vocabulary in SAMPLER_LANES interleaved partial
 * sums added pairwise (lanes_total); over the top-k, the nucleus and the
 * draw, in sorted order; all sums in double. NaN logits count as -inf. Token
 * ids in the history outside [0, n_vocab) are ignored. */
#include "tandem/sampler.h"

#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "tandem/log.h"

#define SAMPLER_FIRST_SORTED  64   /* candidates sorted before the first doubling */
#define SAMPLER_RADIX_MIN     2048 /* sort at least this many at once by radix */
#define SAMPLER_LANES         8    /* partial sums and maxima over the vocabulary */
#define SAMPLER_INSERTION_MAX 16
/* Candidates within this many nats of the best one (after temperature) are
 * searched first; those below weigh under e^-16 each, so the walks rarely
 * reach them (and are still exact when they do). */
#define SAMPLER_NEAR_NATS 16.0f

struct tdm_sampler {
    int32_t n_vocab;
    uint32_t generation; /* value of stamp[] that marks a token in the current call */
    uint32_t *stamp;     /* (n_vocab) generation that last met the token in the history */
    uint32_t *count;     /* (n_vocab) occurrences in the output; all 0 between calls */
    uint64_t *keys;      /* (n_vocab) candidate keys, see the top of this file */
    uint64_t *keys_tmp;  /* (n_vocab) the other buffer of the radix sort */
    float *prob;         /* (n_vocab) unnormalized probability of keys[j], for sorted j */
    float *weight;       /* (n_vocab) unnormalized probability by token id, without top-k */
};

/* ---- parameters ---- */

void tdm_sampling_params_default(tdm_sampling_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->repetition_penalty = 1.0f;
    p->frequency_penalty = 0.0f;
    p->presence_penalty = 0.0f;
    p->has_seed = false;
    p->seed = 0;
}

static tdm_status_t sampling_params_reject(char *err, size_t err_len, const char *name,
                                           const char *range, float got)
{
    if (err != NULL && err_len > 0)
        snprintf(err, err_len, "%s must be %s, got %g", name, range, (double)got);
    return TDM_ERR_INVALID;
}

tdm_status_t tdm_sampling_params_validate(const tdm_sampling_params_t *p, char *err, size_t err_len)
{
    if (p == NULL) {
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "no sampling parameters");
        return TDM_ERR_INVALID;
    }
    /* Written as !(in range) so that NaN fails every check. */
    if (!(p->temperature >= 0.0f && isfinite(p->temperature)))
        return sampling_params_reject(err, err_len, "temperature", "finite and >= 0",
                                      p->temperature);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return sampling_params_reject(err, err_len, "top_p", "in (0, 1]", p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return sampling_params_reject(err, err_len, "min_p", "in [0, 1]", p->min_p);
    if (!(p->repetition_penalty > 0.0f && isfinite(p->repetition_penalty)))
        return sampling_params_reject(err, err_len, "repetition_penalty", "finite and > 0",
                                      p->repetition_penalty);
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return sampling_params_reject(err, err_len, "frequency_penalty", "in [-2, 2]",
                                      p->frequency_penalty);
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return sampling_params_reject(err, err_len, "presence_penalty", "in [-2, 2]",
                                      p->presence_penalty);
    if (err != NULL && err_len > 0)
        err[0] = '\0';
    return TDM_OK;
}

/* ---- random numbers: xoshiro256** seeded through splitmix64 ---- */

static uint64_t splitmix64_next(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro256ss_next(uint64_t s[4])
{
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* Uniform in [0, 1) from the top 53 bits. */
static double sample_state_uniform(tdm_sample_state_t *st)
{
    return (double)(xoshiro256ss_next(st->rng) >> 11) * 0x1.0p-53;
}

double tdm_sample_state_next(tdm_sample_state_t *st)
{
    return sample_state_uniform(st);
}

void tdm_sample_state_skip(tdm_sample_state_t *st, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        (void)sample_state_uniform(st);
}

static uint64_t sample_state_os_seed(const tdm_sample_state_t *st)
{
    uint64_t seed;
    size_t got = 0;
    while (got < sizeof(seed)) {
        ssize_t r = getrandom((char *)&seed + got, sizeof(seed) - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    if (got == sizeof(seed))
        return seed;
    /* No getrandom(2): mix the clock, the pid and the state's address;
     * unseeded requests only need to differ, not to be unpredictable. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t x = ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^
                 ((uint64_t)getpid() << 32) ^ ((uint64_t)(uintptr_t)st * 0x9e3779b97f4a7c15ull);
    return splitmix64_next(&x);
}

void tdm_sample_state_init(tdm_sample_state_t *st, const tdm_sampling_params_t *p)
{
    uint64_t x = (p != NULL && p->has_seed) ? p->seed : sample_state_os_seed(st);
    /* splitmix64 never yields four zero words in a row, so the state is valid. */
    for (int i = 0; i < 4; i++)
        st->rng[i] = splitmix64_next(&x);
}

/* ---- candidate keys ---- */

/* Bits of x that compare as unsigned integers the way x compares as a float
 * (x not NaN; -0 and +0 made equal by the caller): negative floats get all
 * bits flipped, the others the sign bit. Branch-free, since logits' signs
 * are a coin toss to the branch predictor. */
static inline uint32_t float_order_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    return u ^ (-(u >> 31) | 0x80000000u);
}

static inline float float_from_order_bits(uint32_t u)
{
    u ^= ((u >> 31) - 1) | 0x80000000u;
    float x;
    memcpy(&x, &u, sizeof(x));
    return x;
}

static inline uint64_t key_make(float logit, int32_t id)
{
    return ((uint64_t)float_order_bits(logit + 0.0f) << 32) | (uint32_t) ~(uint32_t)id;
}

static inline int32_t key_id(uint64_t key)
{
    return (int32_t) ~(uint32_t)key;
}

static inline float key_logit(uint64_t key)
{
    return float_from_order_bits((uint32_t)(key >> 32));
}

static inline void keys_swap(uint64_t *a, size_t i, size_t j)
{
    uint64_t t = a[i];
    a[i] = a[j];
    a[j] = t;
}

/* Partitions a[0..n) (n >= 3, keys distinct) around the median of the first,
 * middle and last keys: on return a[0..p) > a[p] > a[p+1..n); returns p. */
static size_t keys_partition(uint64_t *a, size_t n)
{
    size_t mid = n / 2, last = n - 1;
    if (a[mid] > a[0])
        keys_swap(a, mid, 0);
    if (a[last] > a[0])
        keys_swap(a, last, 0);
    if (a[last] > a[mid])
        keys_swap(a, last, mid);
    /* a[0] >= a[mid] >= a[last]: the median goes to the end as the pivot. */
    keys_swap(a, mid, last);
    uint64_t pivot = a[last];
    size_t store = 0;
    for (size_t i = 0; i < last; i++) {
        /* Branchless Lomuto: always swap, advance only past larger keys. */
        uint64_t v = a[i];
        a[i] = a[store];
        a[store] = v;
        store += v > pivot;
    }
    keys_swap(a, store, last);
    return store;
}

static void keys_insertion_sort(uint64_t *a, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        uint64_t v = a[i];
        size_t j = i;
        for (; j > 0 && a[j - 1] < v; j--)
            a[j] = a[j - 1];
        a[j] = v;
    }
}

static void keys_sift_down(uint64_t *a, size_t n, size_t i)
{
    /* Min-heap, so that popping to the end leaves a descending array. */
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            return;
        if (c + 1 < n && a[c + 1] < a[c])
            c++;
        if (a[i] <= a[c])
            return;
        keys_swap(a, i, c);
        i = c;
    }
}

static void keys_heapsort(uint64_t *a, size_t n)
{
    for (size_t i = n / 2; i-- > 0;)
        keys_sift_down(a, n, i);
    for (size_t end = n; end-- > 1;) {
        keys_swap(a, 0, end);
        keys_sift_down(a, end, 0);
    }
}

/* Sorts a[0..n) in descending order (introsort). */
static void keys_sort(uint64_t *a, size_t n, int depth)
{
    while (n > SAMPLER_INSERTION_MAX) {
        if (depth-- <= 0) {
            keys_heapsort(a, n);
            return;
        }
        size_t p = keys_partition(a, n);
        /* Recurse on the smaller side, loop on the larger. */
        if (p < n - p - 1) {
            keys_sort(a, p, depth);
            a += p + 1;
            n -= p + 1;
        } else {
            keys_sort(a + p + 1, n - p - 1, depth);
            n = p;
        }
    }
    keys_insertion_sort(a, n);
}

static int keys_depth_limit(size_t n)
{
    int depth = 0;
    while (n > 1) {
        n >>= 1;
        depth += 2;
    }
    return depth;
}

/* Moves the k largest keys of a[0..n) to a[0..k), in no particular order. */
static void keys_select(uint64_t *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n;
    int depth = keys_depth_limit(n);
    if (k >= n)
        return;
    while (hi - lo > SAMPLER_INSERTION_MAX) {
        if (depth-- <= 0) {
            keys_heapsort(a + lo, hi - lo);
            return;
        }
        size_t p = lo + keys_partition(a + lo, hi - lo);
        if (p == k || p + 1 == k)
            return;
        if (p > k)
            hi = p;
        else
            lo = p + 1;
    }
    keys_insertion_sort(a + lo, hi - lo);
}

/* Sorts a[0..n) in descending order by LSD radix on bytes, through
 * tmp[0..n); bytes that every key shares are skipped (the high bytes of
 * the id half, usually). */
static void keys_radix_sort(uint64_t *a, uint64_t *tmp, size_t n)
{
    uint64_t all_and = ~0ull, all_or = 0;
    for (size_t i = 0; i < n; i++) {
        all_and &= a[i];
        all_or |= a[i];
    }
    int digits[8], n_digits = 0;
    for (int d = 0; d < 8; d++)
        if (((all_and ^ all_or) >> (8 * d)) & 0xff)
            digits[n_digits++] = 8 * d;

    size_t hist[8][256];
    memset(hist, 0, sizeof(hist));
    for (size_t i = 0; i < n; i++) {
        uint64_t k = ~a[i]; /* ascending in ~key is descending in key */
        for (int d = 0; d < n_digits; d++)
            hist[d][(k >> digits[d]) & 0xff]++;
    }
    uint64_t *src = a, *dst = tmp;
    for (int d = 0; d < n_digits; d++) {
        size_t *h = hist[d], sum = 0;
        const int shift = digits[d];
        for (int b = 0; b < 256; b++) {
            size_t c = h[b];
            h[b] = sum;
            sum += c;
        }
        for (size_t i = 0; i < n; i++) {
            uint64_t k = src[i];
            dst[h[(~k >> shift) & 0xff]++] = k;
        }
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof(*a));
}

/* ---- the sampler ---- */

tdm_status_t tdm_sampler_create(int32_t n_vocab, tdm_sampler_t **out)
{
    if (n_vocab <= 0) {
        tdm_log_error("sampler", "vocabulary size must be > 0, got %d", n_vocab);
        return TDM_ERR_INVALID;
    }
    size_t n = (size_t)n_vocab;
    tdm_sampler_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        goto err_log;
    s->n_vocab = n_vocab;
    s->stamp = calloc(n, sizeof(*s->stamp));
    if (s->stamp == NULL)
        goto err_free_sampler;
    s->count = calloc(n, sizeof(*s->count));
    if (s->count == NULL)
        goto err_free_stamp;
    s->keys = malloc(n * sizeof(*s->keys));
    if (s->keys == NULL)
        goto err_free_count;
    s->keys_tmp = malloc(n * sizeof(*s->keys_tmp));
    if (s->keys_tmp == NULL)
        goto err_free_keys;
    s->prob = malloc(n * sizeof(*s->prob));
    if (s->prob == NULL)
        goto err_free_keys_tmp;
    s->weight = malloc(n * sizeof(*s->weight));
    if (s->weight == NULL)
        goto err_free_prob;
    *out = s;
    return TDM_OK;

err_free_prob:
    free(s->prob);
err_free_keys_tmp:
    free(s->keys_tmp);
err_free_keys:
    free(s->keys);
err_free_count:
    free(s->count);
err_free_stamp:
    free(s->stamp);
err_free_sampler:
    free(s);
err_log:
    tdm_log_error("sampler", "out of memory for the scratch of a %d-token vocabulary", n_vocab);
    return TDM_ERR_NOMEM;
}

void tdm_sampler_destroy(tdm_sampler_t *s)
{
    if (s == NULL)
        return;
    free(s->weight);
    free(s->prob);
    free(s->keys_tmp);
    free(s->keys);
    free(s->count);
    free(s->stamp);
    free(s);
}

static inline float penalize_repetition(float x, float penalty)
{
    return x > 0.0f ? x / penalty : x * penalty;
}

/* The penalty of one history token: repetition, then (count > 0: it is in
 * the output count times) frequency and presence. */
static inline float penalize(const tdm_sampling_params_t *p, float x, uint32_t count)
{
    if (p->repetition_penalty != 1.0f)
        x = penalize_repetition(x, p->repetition_penalty);
    if (count > 0) {
        x -= (float)count * p->frequency_penalty;
        x -= p->presence_penalty;
    }
    return x;
}

/* Calls visit(ctx, token, count in the output) once for each distinct
 * token the penalties of p touch: the output's tokens at their first
 * occurrence, then (with a repetition penalty) the prompt's tokens not in
 * the output, count 0. Ids outside the vocabulary are skipped. Nothing
 * when p has no penalty. */
static void history_walk(tdm_sampler_t *s, const tdm_sampling_params_t *p, const int32_t *prompt,
                         size_t n_prompt, const int32_t *output, size_t n_output,
                         void (*visit)(void *ctx, int32_t token, uint32_t count), void *ctx)
{
    const bool has_rep = p->repetition_penalty != 1.0f;
    const uint32_t n_vocab = (uint32_t)s->n_vocab;
    if (!has_rep && p->frequency_penalty == 0.0f && p->presence_penalty == 0.0f)
        return;
    if (++s->generation == 0) {
        memset(s->stamp, 0, (size_t)n_vocab * sizeof(*s->stamp));
        s->generation = 1;
    }
    const uint32_t gen = s->generation;

    for (size_t i = 0; i < n_output; i++)
        if ((uint32_t)output[i] < n_vocab)
            s->count[output[i]]++;
    /* count[] goes back to 0 as it is used */
    for (size_t i = 0; i < n_output; i++) {
        uint32_t t = (uint32_t)output[i];
        if (t >= n_vocab || s->count[t] == 0)
            continue;
        visit(ctx, (int32_t)t, s->count[t]);
        s->count[t] = 0;
        s->stamp[t] = gen;
    }
    if (!has_rep)
        return;
    for (size_t i = 0; i < n_prompt; i++) {
        uint32_t t = (uint32_t)prompt[i];
        if (t >= n_vocab || s->stamp[t] == gen)
            continue;
        s->stamp[t] = gen;
        visit(ctx, (int32_t)t, 0);
    }
}

typedef struct penalize_ctx {
    const tdm_sampling_params_t *p;
    float *logits;
} penalize_ctx_t;

static void penalize_visit(void *ctx, int32_t token, uint32_t count)
{
    penalize_ctx_t *c = ctx;
    c->logits[token] = penalize(c->p, c->logits[token], count);
}

static void sampler_apply_penalties(tdm_sampler_t *s, const tdm_sampling_params_t *p, float *logits,
                                    const int32_t *prompt, size_t n_prompt, const int32_t *output,
                                    size_t n_output)
{
    penalize_ctx_t c = {p, logits};
    history_walk(s, p, prompt, n_prompt, output, n_output, penalize_visit, &c);
}

typedef struct history_ctx {
    int32_t *tokens, *counts;
    size_t n;
} history_ctx_t;

static void history_visit(void *ctx, int32_t token, uint32_t count)
{
    history_ctx_t *c = ctx;
    c->tokens[c->n] = token;
    c->counts[c->n++] = (int32_t)count;
}

size_t tdm_sampler_history(tdm_sampler_t *s, const tdm_sampling_params_t *p, const int32_t *prompt,
                           size_t n_prompt, const int32_t *output, size_t n_output, int32_t *tokens,
                           int32_t *counts)
{
    history_ctx_t c = {tokens, counts, 0};
    history_walk(s, p, prompt, n_prompt, output, n_output, history_visit, &c);
    return c.n;
}

void tdm_sampler_penalize_history(const tdm_sampling_params_t *p, float *logits,
                                  const int32_t *tokens, const int32_t *counts, size_t n)
{
    for (size_t i = 0; i < n; i++)
        logits[tokens[i]] = penalize(p, logits[tokens[i]], (uint32_t)counts[i]);
}

static inline float sanitize(float x)
{
    return isnan(x) ? -INFINITY : x;
}

/* The unnormalized probability of a logit x: e^(x - max), and 1 at the
 * maximum itself, so that a +inf maximum or an all -inf vocabulary weighs
 * the tokens at the maximum 1 each instead of NaN. */
static inline float weight_of(float x, float max)
{
    return x == max ? 1.0f : expf(x - max);
}

/* log-softmax at x given the maximum and sum of weight_of() over all. */
static float log_softmax_at(float x, float max, double sum)
{
    double d = x == max ? 0.0 : (double)x - (double)max;
    return (float)(d - log(sum));
}

/* The largest of x[0..n), NaN ignored (-inf if all are), in interleaved
 * lanes so that the comparisons do not wait on one another. */
static float max_logit(const float *x, size_t n)
{
    float m[SAMPLER_LANES];
    for (int j = 0; j < SAMPLER_LANES; j++)
        m[j] = -INFINITY;
    size_t i = 0;
    for (; i + SAMPLER_LANES <= n; i += SAMPLER_LANES)
        for (int j = 0; j < SAMPLER_LANES; j++)
            m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
    for (; i < n; i++)
        m[0] = x[i] > m[0] ? x[i] : m[0];
    float max = m[0];
    for (int j = 1; j < SAMPLER_LANES; j++)
        max = m[j] > max ? m[j] : max;
    return max;
}

/* The fixed order of every sum over the vocabulary: lane j adds the terms
 * i = j mod SAMPLER_LANES in index order, then the lanes add pairwise. */
_Static_assert(SAMPLER_LANES == 8, "lanes_total adds 8 lanes");
static double lanes_total(const double *part)
{
    return ((part[0] + part[1]) + (part[2] + part[3])) +
           ((part[4] + part[5]) + (part[6] + part[7]));
}

/* Sum of weight_of(x[i], max) over x[0..n), NaN as -inf. */
static double sum_weights(const float *x, size_t n, float max)
{
    double part[SAMPLER_LANES] = {0};
    for (size_t i = 0; i < n; i++) {
        part[i % SAMPLER_LANES] += (double)weight_of(sanitize(x[i]), max);
    }
    return lanes_total(part);
}

/* logits[i] = logits[i] / temp (NaN as -inf) and weight[i] its weight;
 * returns the sum of the weights. */
static double sampler_scale_and_weigh(float *logits, float *weight, size_t n, float temp,
                                      float max_scaled)
{
    double part[SAMPLER_LANES] = {0};
    for (size_t i = 0; i < n; i++) {
        float xs = sanitize(logits[i]) / temp;
        float w = weight_of(xs, max_scaled);
        logits[i] = xs;
        weight[i] = w;
        part[i % SAMPLER_LANES] += (double)w;
    }
    return lanes_total(part);
}

static int32_t sampler_greedy(const tdm_sampler_t *s, const float *logits, float *logprob)
{
    int32_t n = s->n_vocab, best = 0;
    float max = max_logit(logits, (size_t)n);
    /* The first at the maximum. With every logit -inf or NaN, all tie at
     * -inf: token 0. */
    if (max > -INFINITY)
        while (!(logits[best] == max))
            best++;
    if (logprob != NULL) {
        *logprob = log_softmax_at(sanitize(logits[best]), max, sum_weights(logits, (size_t)n, max));
    }
    return best;
}

/* The candidates of one call: keys[0..n_near) are every key whose logit is
 * within SAMPLER_NEAR_NATS (after temperature) of the best, keys[n_near..n)
 * the others, so the sorted prefix is selected among the near ones until it
 * outgrows them. keys[0..n_sorted) are the largest keys in descending order,
 * prob[0..n_sorted) their weights. */
typedef struct sampler_cands {
    size_t n, n_near, n_sorted;
    const float *scaled; /* (n) logits / temperature, by token id */
    const float *weight; /* (n) their weights by token id, or NULL: computed as sorted */
    float max_scaled;
} sampler_cands_t;

/* Extends the sorted prefix to at least want keys (capped at n). When that
 * is most of what is left in the range, all of it gets sorted; large
 * stretches are sorted by radix. */
static void sampler_sort_more(tdm_sampler_t *s, sampler_cands_t *c, size_t want)
{
    size_t have = c->n_sorted;
    if (want > c->n)
        want = c->n;
    if (want <= have)
        return;
    size_t end = want <= c->n_near ? c->n_near : c->n;
    if (2 * (want - have) >= end - have)
        want = end;
    else
        keys_select(s->keys + have, end - have, want - have);
    if (want - have >= SAMPLER_RADIX_MIN)
        keys_radix_sort(s->keys + have, s->keys_tmp, want - have);
    else
        keys_sort(s->keys + have, want - have, keys_depth_limit(want - have));
    for (size_t j = have; j < want; j++)
        s->prob[j] = c->weight != NULL ? c->weight[key_id(s->keys[j])]
                                       : weight_of(c->scaled[key_id(s->keys[j])], c->max_scaled);
    c->n_sorted = want;
}

/* Makes sure the sorted prefix holds position j, when a walk still misses
 * `missing` weight: the prefix at least doubles, and grows at least by as
 * many keys as that weight needs if each weighed as much as the last sorted
 * one (none weighs more). */
static inline void sampler_sort_through(tdm_sampler_t *s, sampler_cands_t *c, size_t j,
                                        double missing)
{
    size_t have = c->n_sorted;
    if (j < have)
        return;
    size_t want = have < SAMPLER_FIRST_SORTED ? SAMPLER_FIRST_SORTED : 2 * have;
    /* The best weight is 1: weight_of(max, max). */
    float last = have > 0 ? s->prob[have - 1] : 1.0f;
    if (last > 0.0f) {
        double more = missing / (double)last;
        if (more > (double)(c->n - have))
            more = (double)(c->n - have);
        if (more > (double)(want - have))
            want = have + (size_t)more;
    }
    sampler_sort_more(s, c, want);
}

tdm_sample_row_t tdm_sample_row_make(const tdm_sampling_params_t *p, double u, size_t hist_off,
                                     size_t n_hist)
{
    bool hot = p->temperature > 0.0f;
    return (tdm_sample_row_t){
        .temperature = hot ? p->temperature : 0.0f,
        .top_k = p->top_k,
        .top_p = p->top_p,
        .min_p = p->min_p,
        .repetition_penalty = p->repetition_penalty,
        .frequency_penalty = p->frequency_penalty,
        .presence_penalty = p->presence_penalty,
        .hist_off = (int32_t)hist_off,
        .n_hist = (int32_t)n_hist,
        .u = hot ? u : 0.0,
    };
}

tdm_sampling_params_t tdm_sample_row_params(const tdm_sample_row_t *r)
{
    tdm_sampling_params_t p;
    tdm_sampling_params_default(&p);
    p.temperature = r->temperature;
    p.top_k = r->top_k;
    p.top_p = r->top_p;
    p.min_p = r->min_p;
    p.repetition_penalty = r->repetition_penalty;
    p.frequency_penalty = r->frequency_penalty;
    p.presence_penalty = r->presence_penalty;
    return p;
}

int32_t tdm_sampler_sample(tdm_sampler_t *s, const tdm_sampling_params_t *p, tdm_sample_state_t *st,
                           float *logits, const int32_t *prompt, size_t n_prompt,
                           const int32_t *output, size_t n_output, float *logprob)
{
    assert(s != NULL && p != NULL && st != NULL && logits != NULL);
    assert(n_prompt == 0 || prompt != NULL);
    assert(n_output == 0 || output != NULL);
    sampler_apply_penalties(s, p, logits, prompt, n_prompt, output, n_output);
    /* !(t > 0) also sends a NaN temperature here; validate rejects it. */
    double u = p->temperature > 0.0f ? sample_state_uniform(st) : 0.0;
    return tdm_sampler_sample_draw(s, p, u, logits, logprob);
}

int32_t tdm_sampler_sample_draw(tdm_sampler_t *s, const tdm_sampling_params_t *p, double u,
                                float *logits, float *logprob)
{
    const size_t n = (size_t)s->n_vocab;
    const float temp = p->temperature;
    if (!(temp > 0.0f))
        return sampler_greedy(s, logits, logprob);

    const float max = max_logit(logits, n);
    /* Division by a positive number preserves order, so this is the
     * maximum of the scaled logits. */
    const float max_scaled = max / temp;
    /* Any threshold keeps the order right; this one only decides speed. */
    const float near = max - SAMPLER_NEAR_NATS * temp;

    /* Keys of the penalized logits, the near ones from the front, the others
     * from the back (branch-free: both slots are written, the one not taken
     * is overwritten later). */
    size_t front = 0, back = n;
    for (size_t i = 0; i < n; i++) {
        float x = sanitize(logits[i]);
        uint64_t key = key_make(x, (int32_t)i);
        bool is_near = x >= near;
        s->keys[front] = key;
        s->keys[back - 1] = key;
        front += is_near;
        back -= !is_near;
    }
    assert(front == back);

    /* The logprob is under the distribution before temperature. */
    const bool has_top_k = p->top_k > 0 && (size_t)p->top_k < n;
    const bool same_scale = temp == 1.0f;
    double logprob_sum = 0.0;
    if (logprob != NULL && (has_top_k || !same_scale))
        logprob_sum = sum_weights(logits, n, max);

    /* logits[] becomes logits / temperature; without top-k, the weights of
     * all tokens are kept and summed. */
    double total = 0.0;
    if (has_top_k) {
        for (size_t i = 0; i < n; i++)
            logits[i] = sanitize(logits[i]) / temp;
    } else {
        total = sampler_scale_and_weigh(logits, s->weight, n, temp, max_scaled);
        if (same_scale)
            logprob_sum = total;
    }
    sampler_cands_t c = {
        .n = n,
        .n_near = front,
        .n_sorted = 0,
        .scaled = logits,
        .weight = has_top_k ? NULL : s->weight,
        .max_scaled = max_scaled,
    };

    /* top-k: the candidates shrink to the k best, sorted, and their weights
     * are summed in sorted order. */
    if (has_top_k) {
        sampler_sort_more(s, &c, (size_t)p->top_k);
        c.n = c.n_sorted = (size_t)p->top_k; /* it may have sorted more */
        for (size_t j = 0; j < c.n; j++)
            total += (double)s->prob[j];
    }

    /* top-p and min-p keep a prefix of the sorted candidates. */
    const bool has_top_p = p->top_p < 1.0f;
    const bool has_min_p = p->min_p > 0.0f;
    size_t n_keep = c.n;
    if (has_top_p || has_min_p) {
        const double mass = (double)p->top_p * total;
        double cum = 0.0;
        size_t j = 0;
        for (; j < c.n; j++) {
            sampler_sort_through(s, &c, j, has_top_p ? mass - cum : 0.0);
            /* prob[0] is the best one's weight, 1 */
            if (has_min_p && j > 0 && s->prob[j] < p->min_p * s->prob[0])
                break;
            cum += (double)s->prob[j];
            if (has_top_p && cum >= mass) {
                j++;
                break;
            }
        }
        n_keep = j;
        total = cum;
    }

    /* The draw: the first survivor, in sorted order, whose cumulative weight
     * passes u * total. Rounding can leave the walk short of the target;
     * then the last survivor with weight wins. */
    const double target = u * total;
    double cum = 0.0;
    size_t chosen = 0;
    for (size_t j = 0; j < n_keep; j++) {
        sampler_sort_through(s, &c, j, target - cum);
        if (s->prob[j] > 0.0f)
            chosen = j;
        cum += (double)s->prob[j];
        if (cum > target)
            break;
    }
    assert(n_keep >= 1 && chosen < c.n_sorted);

    uint64_t key = s->keys[chosen];
    if (logprob != NULL)
        *logprob = log_softmax_at(key_logit(key), max, logprob_sum);
    return key_id(key);
}
