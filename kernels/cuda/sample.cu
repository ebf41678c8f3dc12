/* tandem CUDA backend: sampling where the logits are (ops->sample).
 *
 * The semantics are the host sampler's (engine/sampler.c defines the
 * candidate keys, the weights and the walks this file repeats). One block
 * of 1024 threads samples one row:
 *
 *  1. Penalties: the row's history tokens, one thread each, in place.
 *  2. The maximum and the first index at it; temperature 0 stops here
 *     (greedy).
 *  3. One pass over the row: the sum of all weights (without top-k), the
 *     sum for the logprob (unscaled logits), and a count of the logits in
 *     32 bands of distance from the maximum (half binades of nats, from
 *     1/64 to 768).
 *  4. The first chunk of candidates: the nearest bands that fit in 4096
 *     keys (without top-k as many as fit, with top-k the fewest that hold
 *     k), gathered into shared memory, bitonic-sorted in descending key
 *     order and weighed. Where no band boundary fits (over 4096 ties at the
 *     maximum, or top-k's k best not matching a band), a radix select over
 *     the 64-bit keys finds the smallest of the m best instead: 8-bit
 *     digits from the top, a shared histogram per digit (a warp adds its
 *     lanes of equal digit at once), stopping when a digit's bin holds
 *     exactly the keys still needed.
 *  5. The walks: top-k's total, the top-p/min-p prefix, the draw. A chunk
 *     is walked at once: prefix sums of the weights (double, a fixed tree),
 *     then a block minimum finds the first position where the walk stops.
 *     A walk that passes the end of a chunk goes on with the next one: the
 *     4096 largest keys below the chunk's smallest, by radix select. The
 *     first chunk stays in shared memory; later ones are selected again by
 *     each walk that needs them.
 *
 * Cost per row: the row is read 3 times in the common case (maximum,
 * sums, gather), plus up to 8 passes when the radix select picks the first
 * chunk; a sort of at most 4096 keys (78 barrier steps). Each further chunk
 * costs up to 9 passes, so a walk over most of a 128k vocabulary (a flat
 * distribution with neither top-k nor a small top-p) takes milliseconds;
 * that is the worst case, and it ends: every chunk holds at least one key
 * and a walk stops at its limit.
 *
 * Determinism and batch invariance: nothing crosses rows. Every sum is in
 * double in a fixed order (thread t adds elements t, t + 1024, ... in
 * order, then butterflies within and across warps; prefix sums likewise);
 * histogram counts are integers, so the order of the atomics does not
 * matter; gathered keys are distinct and then sorted, so neither does the
 * order of the gathering. A row gives the same bits alone or in any batch,
 * on every run.
 *
 * Agreement with the host: the order of the candidates, the penalties (no
 * FMA contraction), the divisions by the temperature and every comparison
 * are the host's, bit for bit. Weights within 16 nats of the maximum are
 * exp() in double rounded to float, which is what glibc's expf returns but
 * for rare inputs (CUDA's expf may be 2 ulp off); farther ones weigh under
 * 1.2e-7 each and use expf. Sums differ from the host's order by double
 * rounding. So only a draw or a top-p cut within about 1e-7 of the total
 * weight of a boundary can choose a neighbour of the host's token; the
 * logprob agrees to about 1e-6. */
#include "sample.cuh"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tandem/log.h"

#define SAMPLE_THREADS    1024
#define SAMPLE_WARPS      (SAMPLE_THREADS / 32)
#define SAMPLE_CHUNK      4096 /* candidates sorted at once, in shared memory */
#define SAMPLE_PER_THREAD (SAMPLE_CHUNK / SAMPLE_THREADS)
#define SAMPLE_BANDS      32                 /* distance bands counted for the first chunk */
#define SAMPLE_BAND_BASE  (0x3c800000 >> 22) /* float bits >> 22 of 2^-6 nats */
#define SAMPLE_NEAR_NATS  16.0f              /* weights nearer the maximum: exp in double */
#define FULL_MASK         0xffffffffu

static_assert(SAMPLE_WARPS == 32, "block reductions take one value per lane of a warp");
static_assert(SAMPLE_CHUNK % SAMPLE_THREADS == 0 && (SAMPLE_CHUNK & (SAMPLE_CHUNK - 1)) == 0,
              "a chunk is a power of two that the threads split evenly");
static_assert(SAMPLE_BANDS <= 256, "the bands share the radix histogram");

/* Dynamic shared memory: the first chunk of sorted candidates (kept for
 * every walk) and the current later one, each with its weights. */
struct sample_smem {
    uint64_t keys[2][SAMPLE_CHUNK];
    float w[2][SAMPLE_CHUNK];
};

/* ---- keys and weights, as engine/sampler.c ---- */

static __device__ __forceinline__ float sanitize(float x)
{
    return isnan(x) ? -INFINITY : x;
}

static __device__ __forceinline__ uint32_t float_order_bits(float x)
{
    const uint32_t u = __float_as_uint(x);
    return u ^ ((0u - (u >> 31)) | 0x80000000u);
}

static __device__ __forceinline__ float float_from_order_bits(uint32_t u)
{
    u ^= ((u >> 31) - 1u) | 0x80000000u;
    return __uint_as_float(u);
}

/* The penalized logit's order bits (-0 as +0) over the complement of the
 * id: larger key = higher logit, then lower id. Every key is above 0 and
 * below ~0ull (the order bits of -inf are 0x007fffff, of +inf 0xff800000). */
static __device__ __forceinline__ uint64_t key_make(float x, int32_t id)
{
    return ((uint64_t)float_order_bits(__fadd_rn(x, 0.0f)) << 32) | (uint32_t) ~(uint32_t)id;
}

static __device__ __forceinline__ int32_t key_id(uint64_t key)
{
    return (int32_t) ~(uint32_t)key;
}

static __device__ __forceinline__ float key_logit(uint64_t key)
{
    return float_from_order_bits((uint32_t)(key >> 32));
}

/* sampler.c's weight_of: 1 at the maximum, else e^(x - max) as a float. */
static __device__ __forceinline__ float weight_of(float x, float max)
{
    if (x == max)
        return 1.0f;
    const float d = __fsub_rn(x, max);
    return d > -SAMPLE_NEAR_NATS ? (float)exp((double)d) : expf(d);
}

/* The same for the logprob's sum, which only needs to be close. */
static __device__ __forceinline__ float weight_fast(float x, float max)
{
    return x == max ? 1.0f : expf(__fsub_rn(x, max));
}

static __device__ float log_softmax_at(float x, float max, double sum)
{
    const double d = x == max ? 0.0 : (double)x - (double)max;
    return (float)(d - log(sum));
}

/* The band of logit x (not NaN): 0 at the maximum, then one per half
 * binade of the distance (best - x) * inv_temp in nats (band 1: under
 * 1.5/64, band 2: under 2/64, ...); SAMPLE_BANDS from 768 nats on. It
 * never decreases as x decreases, so bands 0..b hold the keys above some
 * key: a prefix of the candidates' order. */
static __device__ __forceinline__ int band_of(float x, float best, float inv_temp)
{
    if (x == best)
        return 0;
    const float nats = __fmul_rn(__fsub_rn(best, x), inv_temp);
    const int b = (int)(__float_as_uint(nats) >> 22) - SAMPLE_BAND_BASE + 1;
    return min(max(b, 1), SAMPLE_BANDS);
}

/* ---- block-wide reductions, in a fixed order; every thread gets the result ---- */

static __device__ __forceinline__ double warp_sum(double v)
{
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

static __device__ double block_sum(double v)
{
    __shared__ double part[SAMPLE_WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0)
        part[warp] = v;
    __syncthreads();
    v = warp_sum(part[lane]);
    __syncthreads();
    return v;
}

template <bool MIN> static __device__ int block_extreme(int v)
{
    __shared__ int part[SAMPLE_WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int off = 16; off > 0; off >>= 1) {
        const int o = __shfl_xor_sync(FULL_MASK, v, off);
        v = MIN ? min(v, o) : max(v, o);
    }
    if (lane == 0)
        part[warp] = v;
    __syncthreads();
    v = part[lane];
    for (int off = 16; off > 0; off >>= 1) {
        const int o = __shfl_xor_sync(FULL_MASK, v, off);
        v = MIN ? min(v, o) : max(v, o);
    }
    __syncthreads();
    return v;
}

/* The exclusive prefix sum of v over the threads in index order, and the
 * total: scans within the warps, then over the warps' sums. */
static __device__ double block_scan(double v, double *total)
{
    __shared__ double part[SAMPLE_WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    double incl = v;
    for (int off = 1; off < 32; off <<= 1) {
        const double o = __shfl_up_sync(FULL_MASK, incl, off);
        if (lane >= off)
            incl += o;
    }
    const double excl = __shfl_up_sync(FULL_MASK, incl, 1);
    if (lane == 31)
        part[warp] = incl;
    __syncthreads();
    double warps = part[lane];
    for (int off = 1; off < 32; off <<= 1) {
        const double o = __shfl_up_sync(FULL_MASK, warps, off);
        if (lane >= off)
            warps += o;
    }
    const double before = __shfl_sync(FULL_MASK, warps, max(warp - 1, 0));
    *total = __shfl_sync(FULL_MASK, warps, 31);
    __syncthreads();
    if (warp == 0)
        return lane == 0 ? 0.0 : excl;
    return lane == 0 ? before : before + excl;
}

static __device__ __forceinline__ void better(float &v, int &i, float ov, int oi)
{
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

/* The largest of x[0..n) (NaN ignored; -inf if none) and the first index
 * holding it. */
static __device__ void block_argmax(const float *x, int n, float *max_out, int *idx_out)
{
    __shared__ float part_v[SAMPLE_WARPS];
    __shared__ int part_i[SAMPLE_WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float v = -INFINITY;
    int idx = INT_MAX;
    for (int i = threadIdx.x; i < n; i += SAMPLE_THREADS) {
        const float y = x[i];
        if (y > v || (y == v && idx == INT_MAX)) { /* NaN compares false: never taken */
            v = y;
            idx = i;
        }
    }
    for (int off = 16; off > 0; off >>= 1)
        better(v, idx, __shfl_xor_sync(FULL_MASK, v, off), __shfl_xor_sync(FULL_MASK, idx, off));
    if (lane == 0) {
        part_v[warp] = v;
        part_i[warp] = idx;
    }
    __syncthreads();
    v = part_v[lane];
    idx = part_i[lane];
    for (int off = 16; off > 0; off >>= 1)
        better(v, idx, __shfl_xor_sync(FULL_MASK, v, off), __shfl_xor_sync(FULL_MASK, idx, off));
    __syncthreads();
    *max_out = v;
    *idx_out = idx;
}

/* ---- penalties ---- */

/* sampler.c's order per token: repetition, then frequency (count times
 * the penalty), then presence; prompt-only tokens (count 0) get the
 * repetition penalty alone. The tokens are distinct, so no two threads
 * touch one logit. */
static __device__ void penalize(float *x, int n, const tdm_sample_row_t &r, const int32_t *tok,
                                const int32_t *cnt, int64_t n_total)
{
    const int64_t off = r.hist_off, nh = r.n_hist;
    if (off < 0 || nh <= 0 || off + nh > n_total)
        return;
    const bool has_rep = r.repetition_penalty != 1.0f;
    for (int64_t h = threadIdx.x; h < nh; h += SAMPLE_THREADS) {
        const int32_t t = tok[off + h], count = cnt[off + h];
        if ((uint32_t)t >= (uint32_t)n || (count <= 0 && !has_rep))
            continue;
        float v = x[t];
        if (has_rep)
            v = v > 0.0f ? __fdiv_rn(v, r.repetition_penalty) : __fmul_rn(v, r.repetition_penalty);
        if (count > 0)
            v = __fsub_rn(__fsub_rn(v, __fmul_rn((float)count, r.frequency_penalty)),
                          r.presence_penalty);
        x[t] = v;
    }
}

/* ---- chunks of sorted candidates ---- */

/* The smallest key of the m largest keys below hi (at least m lie below
 * it), by radix select from the top digit: a pass per 8-bit digit counts,
 * among the keys below hi that share the digits chosen so far, how many
 * have each value of the next one; the digit where the count from the top
 * reaches the keys still needed is chosen. When its bin holds exactly
 * those, every key from the chosen prefix up to hi is one of the m. Uses
 * hist[256] and pick[2] (shared). */
static __device__ uint64_t radix_select(const float *x, int n, uint64_t hi, int m, int *hist,
                                        int *pick)
{
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint64_t prefix = 0, mask = 0;
    int need = m;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += SAMPLE_THREADS)
            hist[b] = 0;
        if (threadIdx.x == 0) {
            pick[0] = 0;
            pick[1] = 0;
        }
        __syncthreads();
        /* i0 is the same for the whole warp, so every lane reaches the match */
        for (int i0 = warp * 32; i0 < n; i0 += SAMPLE_THREADS) {
            const int i = i0 + lane;
            int digit = 256;
            if (i < n) {
                const uint64_t k = key_make(sanitize(x[i]), i);
                if (k < hi && (k & mask) == prefix)
                    digit = (int)(k >> shift) & 0xff;
            }
            const unsigned peers = __match_any_sync(FULL_MASK, digit);
            if (digit < 256 && lane == __ffs(peers) - 1)
                atomicAdd(&hist[digit], __popc(peers));
        }
        __syncthreads();
        if (warp == 0) {
            /* lane l holds bins 255 - 8l down to 248 - 8l */
            int c[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                c[j] = hist[255 - 8 * lane - j];
                sum += c[j];
            }
            int incl = sum;
            for (int off = 1; off < 32; off <<= 1) {
                const int o = __shfl_up_sync(FULL_MASK, incl, off);
                if (lane >= off)
                    incl += o;
            }
            int above = incl - sum, found = -1;
            if (above < need && need <= incl) {
#pragma unroll
                for (int j = 0; j < 8; j++)
                    if (found < 0) {
                        if (above + c[j] >= need)
                            found = j;
                        else
                            above += c[j];
                    }
                pick[0] = 255 - 8 * lane - found;
                pick[1] = above;
            }
        }
        __syncthreads();
        const int bin = pick[0];
        need -= pick[1];
        prefix |= (uint64_t)bin << shift;
        mask |= (uint64_t)0xff << shift;
        const int in_bin = hist[bin];
        __syncthreads(); /* hist and pick are cleared next */
        if (in_bin == need)
            break;
    }
    return prefix;
}

/* Gathers the keys that take(logit, key) accepts (a prefix of the
 * candidates' order that the caller counted: at most SAMPLE_CHUNK) into
 * keys[], sorts them in descending order (bitonic, padded with key 0, below
 * every key) and weighs them into w[]. Returns how many there are. The
 * gathering's order (atomics) does not matter: the keys are distinct. */
template <typename Take>
static __device__ int chunk_fill(const float *x, int n, Take take, float temp, float max_s,
                                 uint64_t *keys, float *w, int *counter)
{
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (threadIdx.x == 0)
        *counter = 0;
    __syncthreads();
    for (int i0 = warp * 32; i0 < n; i0 += SAMPLE_THREADS) {
        const int i = i0 + lane;
        uint64_t k = 0;
        bool taken = false;
        if (i < n) {
            const float v = sanitize(x[i]);
            k = key_make(v, i);
            taken = take(v, k);
        }
        const unsigned who = __ballot_sync(FULL_MASK, taken);
        int at = 0;
        if (lane == 0 && who != 0)
            at = atomicAdd(counter, __popc(who));
        at = __shfl_sync(FULL_MASK, at, 0) + __popc(who & ((1u << lane) - 1u));
        if (taken && at < SAMPLE_CHUNK)
            keys[at] = k;
    }
    __syncthreads();
    const int len = min(*counter, SAMPLE_CHUNK);
    int p2 = 1;
    while (p2 < len)
        p2 <<= 1;
    for (int i = len + threadIdx.x; i < p2; i += SAMPLE_THREADS)
        keys[i] = 0;
    __syncthreads();
    for (int size = 2; size <= p2; size <<= 1)
        for (int j = size >> 1; j > 0; j >>= 1) {
            for (int t = threadIdx.x; t < p2 / 2; t += SAMPLE_THREADS) {
                const int a = ((t & ~(j - 1)) << 1) | (t & (j - 1)), b = a + j;
                const uint64_t ka = keys[a], kb = keys[b];
                if ((ka < kb) == ((a & size) == 0)) { /* descending where a & size is 0 */
                    keys[a] = kb;
                    keys[b] = ka;
                }
            }
            __syncthreads();
        }
    for (int i = threadIdx.x; i < len; i += SAMPLE_THREADS)
        w[i] = weight_of(__fdiv_rn(key_logit(keys[i]), temp), max_s);
    __syncthreads();
    return len;
}

/* What the walks share; every thread holds the same copy. */
struct row_ctx {
    const float *x;
    int n;
    float temp, max_s;
    sample_smem *sm;
    int len0;       /* keys in the first chunk */
    int *hist;      /* shared [256] */
    int *scal;      /* shared: [0] gather counter, [1..2] radix pick */
    double *shared; /* shared: a walk's broadcast */
};

/* The next chunk after one whose smallest key is hi: the m largest keys
 * below it, into the second buffer. Its first barrier comes after every
 * thread's last read of the buffer it overwrites. */
static __device__ int chunk_next(const row_ctx &c, uint64_t hi, int m)
{
    const uint64_t lo = radix_select(c.x, c.n, hi, m, c.hist, c.scal + 1);
    return chunk_fill(
        c.x, c.n, [=](float, uint64_t k) { return k >= lo && k < hi; }, c.temp, c.max_s,
        c.sm->keys[1], c.sm->w[1], c.scal);
}

enum walk_kind {
    WALK_SUM,  /* the total weight of positions < limit (top-k) */
    WALK_CUT,  /* top-p and min-p: how many survive, and their total */
    WALK_DRAW, /* the first position whose cumulative weight passes target */
};

struct walk_params {
    bool top_p, min_p;
    double mass;        /* top-p: the weight to reach */
    float min_p_weight; /* min-p: positions > 0 weighing less stop the walk */
    double target;      /* the draw */
};

struct walk_end {
    int n;        /* CUT: the survivors (a prefix) */
    double sum;   /* SUM: the total; CUT: the survivors' total */
    uint64_t key; /* DRAW: the chosen candidate */
};

/* Walks the sorted candidates from position 0 to limit (at most), a chunk
 * at a time, as the loops of tdm_sampler_sample do one position at a time.
 * Each thread holds SAMPLE_PER_THREAD consecutive positions of a chunk; a
 * stop is the smallest position where one happens. */
static __device__ walk_end walk(const row_ctx &c, walk_kind kind, int limit, const walk_params &p)
{
    int buf = 0, base = 0, len = c.len0;
    double carry = 0.0; /* the total of the chunks before */
    /* the draw's last position with weight > 0, for a walk that rounding
     * leaves short of the target; position 0 while there is none */
    uint64_t last_key = c.sm->keys[0][0];
    const int first = threadIdx.x * SAMPLE_PER_THREAD;
    while (len > 0) {
        const uint64_t *keys = c.sm->keys[buf];
        const float *w = c.sm->w[buf];
        const int lim = min(len, limit - base);
        float wt[SAMPLE_PER_THREAD];
        double cum[SAMPLE_PER_THREAD], local = 0.0;
#pragma unroll
        for (int r = 0; r < SAMPLE_PER_THREAD; r++) {
            wt[r] = first + r < lim ? w[first + r] : 0.0f;
            local += (double)wt[r];
            cum[r] = local;
        }
        double chunk_sum;
        const double before = carry + block_scan(local, &chunk_sum);
        int stop = INT_MAX, last = -1;
#pragma unroll
        for (int r = 0; r < SAMPLE_PER_THREAD; r++) {
            const int pos = base + first + r;
            cum[r] = before + cum[r];
            if (first + r >= lim)
                continue;
            if (kind == WALK_CUT) {
                if (p.min_p && pos > 0 && wt[r] < p.min_p_weight)
                    stop = min(stop, pos); /* pos is left out */
                else if (p.top_p && cum[r] >= p.mass)
                    stop = min(stop, pos + 1); /* pos is kept */
            } else if (kind == WALK_DRAW && wt[r] > 0.0f) {
                last = pos;
                if (cum[r] > p.target)
                    stop = min(stop, pos);
            }
        }
        if (kind == WALK_CUT) {
            stop = block_extreme<true>(stop);
            if (stop != INT_MAX) {
                /* the survivors' total is the cumulative weight at stop - 1,
                 * in this chunk unless stop is its first position */
#pragma unroll
                for (int r = 0; r < SAMPLE_PER_THREAD; r++)
                    if (first + r < lim && base + first + r == stop - 1)
                        *c.shared = cum[r];
                __syncthreads();
                const walk_end end = {stop, stop == base ? carry : *c.shared, 0};
                __syncthreads(); /* *c.shared is read before anyone writes it again */
                return end;
            }
        } else if (kind == WALK_DRAW) {
            stop = block_extreme<true>(stop);
            if (stop != INT_MAX)
                return {stop, 0.0, keys[stop - base]};
            last = block_extreme<false>(last);
            if (last >= 0)
                last_key = keys[last - base];
        }
        carry += chunk_sum;
        if (base + len >= limit)
            break;
        const uint64_t hi = keys[len - 1];
        const int m = min(SAMPLE_CHUNK, c.n - (base + len));
        base += len;
        buf = 1;
        len = chunk_next(c, hi, m);
    }
    return {limit, carry, last_key};
}

/* ---- the kernel: one block per row ---- */

static __global__ void __launch_bounds__(SAMPLE_THREADS, 1)
    sample_rows(float *logits, int n, const tdm_sample_row_t *rows, const int32_t *hist_tok,
                const int32_t *hist_cnt, int64_t n_hist_total, int32_t *out_id, float *out_lp)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    sample_smem *sm = reinterpret_cast<sample_smem *>(smem_raw);
    __shared__ int hist[256];
    __shared__ int scal[4];
    __shared__ double broadcast;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const tdm_sample_row_t r = rows[blockIdx.x];
    float *x = logits + (int64_t)blockIdx.x * n;
    const bool want_lp = out_lp != nullptr;

    penalize(x, n, r, hist_tok, hist_cnt, n_hist_total);
    __syncthreads();
    float best_logit;
    int best;
    block_argmax(x, n, &best_logit, &best);

    /* !(t > 0) also takes a NaN temperature, as the host does */
    if (!(r.temperature > 0.0f)) {
        const int id = best_logit > -INFINITY ? best : 0;
        double sum = 0.0;
        if (want_lp) {
            double part = 0.0;
            for (int i = threadIdx.x; i < n; i += SAMPLE_THREADS)
                part += (double)weight_fast(sanitize(x[i]), best_logit);
            sum = block_sum(part);
        }
        if (threadIdx.x == 0) {
            out_id[blockIdx.x] = id;
            if (want_lp)
                out_lp[blockIdx.x] = log_softmax_at(sanitize(x[id]), best_logit, sum);
        }
        return;
    }

    const float temp = r.temperature;
    const float max_s = __fdiv_rn(best_logit, temp);
    const float inv_temp = __frcp_rn(temp); /* only shapes the bands */
    const bool has_top_k = r.top_k > 0 && r.top_k < n;
    const int cand_n = has_top_k ? r.top_k : n;
    /* the logprob is under the distribution before temperature */
    const bool lp_own = want_lp && (has_top_k || temp != 1.0f);

    if (threadIdx.x < SAMPLE_BANDS)
        hist[threadIdx.x] = 0;
    __syncthreads();
    double part_w = 0.0, part_lp = 0.0;
    for (int i0 = warp * 32; i0 < n; i0 += SAMPLE_THREADS) {
        const int i = i0 + lane;
        int band = SAMPLE_BANDS;
        if (i < n) {
            const float v = sanitize(x[i]);
            if (!has_top_k)
                part_w += (double)weight_of(__fdiv_rn(v, temp), max_s);
            if (lp_own)
                part_lp += (double)weight_fast(v, best_logit);
            band = band_of(v, best_logit, inv_temp);
        }
        const unsigned peers = __match_any_sync(FULL_MASK, band);
        if (band < SAMPLE_BANDS && lane == __ffs(peers) - 1)
            atomicAdd(&hist[band], __popc(peers));
    }
    __syncthreads();
    const double total_all = has_top_k ? 0.0 : block_sum(part_w);
    const double lp_sum = lp_own ? block_sum(part_lp) : total_all;

    /* The first chunk: the nearest bands within SAMPLE_CHUNK keys; with
     * top-k the fewest that hold its k best (or SAMPLE_CHUNK of them). */
    if (threadIdx.x == 0) {
        const int want = has_top_k ? min(cand_n, SAMPLE_CHUNK) : 1;
        int count = 0, pick = -1;
        for (int b = 0; b < SAMPLE_BANDS && count + hist[b] <= SAMPLE_CHUNK; b++) {
            count += hist[b];
            pick = b;
            if (count >= want && has_top_k)
                break;
        }
        scal[3] = count >= want ? pick : -1;
    }
    __syncthreads();
    const int pick = scal[3];
    row_ctx c = {x, n, temp, max_s, sm, 0, hist, scal, &broadcast};
    if (pick >= 0) {
        c.len0 = chunk_fill(
            x, n, [=](float v, uint64_t) { return band_of(v, best_logit, inv_temp) <= pick; }, temp,
            max_s, sm->keys[0], sm->w[0], scal);
    } else {
        const uint64_t lo = radix_select(x, n, ~0ull, min(cand_n, SAMPLE_CHUNK), hist, scal + 1);
        c.len0 = chunk_fill(
            x, n, [=](float, uint64_t k) { return k >= lo; }, temp, max_s, sm->keys[0], sm->w[0],
            scal);
    }

    walk_params wp = {};
    double total = total_all;
    if (has_top_k)
        total = walk(c, WALK_SUM, cand_n, wp).sum;
    int n_keep = cand_n;
    wp.top_p = r.top_p < 1.0f;
    wp.min_p = r.min_p > 0.0f;
    if (wp.top_p || wp.min_p) {
        wp.mass = (double)r.top_p * total;
        wp.min_p_weight = __fmul_rn(r.min_p, sm->w[0][0]); /* the best one's weight, 1 */
        const walk_end cut = walk(c, WALK_CUT, cand_n, wp);
        n_keep = cut.n;
        total = cut.sum;
    }
    wp.target = r.u * total;
    const uint64_t key = walk(c, WALK_DRAW, n_keep, wp).key;
    if (threadIdx.x == 0) {
        out_id[blockIdx.x] = key_id(key);
        if (want_lp)
            out_lp[blockIdx.x] = log_softmax_at(key_logit(key), best_logit, lp_sum);
    }
}

static size_t align16(size_t bytes)
{
    return (bytes + 15) & ~(size_t)15;
}

extern "C" void cuda_sample(tdm_backend_t *be, float *logits, int64_t n, int64_t vocab,
                            const tdm_sample_row_t *rows, const int32_t *hist_tokens,
                            const int32_t *hist_counts, int64_t n_hist_total, int32_t *out_host,
                            float *logprob_host)
{
    if (n <= 0 || vocab <= 0)
        return;
    tdm_cuda_backend_t *cb = tdm_cuda_of(be);
    if (n_hist_total < 0)
        n_hist_total = 0;
    /* one host buffer, one copy in: rows, history tokens, history counts;
     * the same buffer takes the ids and logprobs back */
    const size_t rows_b = align16((size_t)n * sizeof(tdm_sample_row_t));
    const size_t hist_b = align16((size_t)n_hist_total * sizeof(int32_t));
    const size_t in_b = rows_b + 2 * hist_b;
    const size_t out_b = (size_t)n * (sizeof(int32_t) + sizeof(float));
    unsigned char *host = (unsigned char *)malloc(in_b > out_b ? in_b : out_b);
    if (host == NULL) {
        tdm_log_error("cuda", "sample: out of host memory for %lld rows", (long long)n);
        abort();
    }
    memcpy(host, rows, (size_t)n * sizeof(tdm_sample_row_t));
    if (n_hist_total > 0) {
        memcpy(host + rows_b, hist_tokens, (size_t)n_hist_total * sizeof(int32_t));
        memcpy(host + rows_b + hist_b, hist_counts, (size_t)n_hist_total * sizeof(int32_t));
    }
    unsigned char *dev = (unsigned char *)tdm_cuda_scratch(cb, in_b + out_b);
    int32_t *d_id = (int32_t *)(dev + in_b);
    float *d_lp = (float *)(d_id + n);
    TDM_CUDA_CHECK(cudaMemcpyAsync(dev, host, in_b, cudaMemcpyHostToDevice, cb->stream));
    TDM_CUDA_CHECK(cudaFuncSetAttribute(sample_rows, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)sizeof(sample_smem)));
    sample_rows<<<(unsigned)n, SAMPLE_THREADS, sizeof(sample_smem), cb->stream>>>(
        logits, (int)vocab, (const tdm_sample_row_t *)dev, (const int32_t *)(dev + rows_b),
        (const int32_t *)(dev + rows_b + hist_b), n_hist_total, d_id,
        logprob_host != NULL ? d_lp : NULL);
    TDM_CUDA_LAUNCHED("sample_rows");
    const size_t back = (size_t)n * (logprob_host != NULL ? 2 : 1) * sizeof(int32_t);
    TDM_CUDA_CHECK(cudaMemcpyAsync(host, d_id, back, cudaMemcpyDeviceToHost, cb->stream));
    TDM_CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    memcpy(out_host, host, (size_t)n * sizeof(int32_t));
    if (logprob_host != NULL)
        memcpy(logprob_host, host + (size_t)n * sizeof(int32_t), (size_t)n * sizeof(float));
    free(host);
}
