/* Quantizers of the GGUF layouts tandem computes with (tandem/quantize.h).
 *
 * Each block is searched in double precision (so no finite float input
 * overflows the sums), against per-element weights w:
 *   fit_sym:  x ~ s * g[idx], g a grid of values (uniform or IQ4's);
 *   fit_min:  x ~ s * q + b, q in 0..nmax (b <= 0 where the layout's min
 *             is subtracted);
 * each tries a sweep of candidate scales, gives every candidate's codes
 * their weighted least-squares scale (and min), keeps the best and then
 * alternates rounding and least squares from it while the error drops.
 * K-quants and IQ4_XS fit each sub-block so, quantize the sub-block scales
 * with fit_sym against the f16 super-block scale(s), then improve the
 * integer sub-scales one step at a time and refit the f16 scales by least
 * squares, every move judged by the error of the codes it re-rounds.
 * Finally the fields are packed as GGML stores them (tandem/dtype.h). */
#include "tandem/quantize.h"

#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "tandem/dtype.h"

#define F16_MAX 65504.0
/* The weights' floor, in the block's mean squares: w = imp * sqrt(SIGMA2 * ms + x^2). */
#define SIGMA2 2.0

/* ---- small helpers ---- */

static uint16_t f16_sat(double v) /* f16 of v, saturating at +-65504 (NaN stays NaN) */
{
    if (v > F16_MAX)
        v = F16_MAX;
    else if (v < -F16_MAX)
        v = -F16_MAX;
    return tdm_f32_to_f16((float)v);
}

static float f16_round(double v)
{
    return tdm_f16_to_f32(f16_sat(v));
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

/* v rounded to the nearest integer in [lo, hi] (NaN gives lo). */
static int round_clamp(double v, int lo, int hi)
{
    if (!(v > lo))
        return lo;
    if (v >= hi)
        return hi;
    return lo + (int)(v - lo + 0.5);
}

/* The weights of a block of n (sub-blocks of `sub`) described in the
 * header: imp[i] * sqrt(SIGMA2 * mean square + x[i]^2), imp 1 without it.
 * A sub-block the importance vector gives no weight at all gets the
 * default weights scaled far below the others' (it must fit something,
 * but not at their cost); an all-zero block gets equal weights. */
static void make_weights(const double *x, const float *imp, int n, int sub, double *w)
{
    double ss = 0, isum = 0;
    for (int i = 0; i < n; i++) {
        ss += x[i] * x[i];
        if (imp != NULL) {
            double v = imp[i] > 0 ? (double)imp[i] : 0.0; /* NaN and negatives: 0 */
            isum += v < FLT_MAX ? v : FLT_MAX;
        }
    }
    const double s2 = SIGMA2 * ss / n, floor = isum > 0 ? 1e-3 * isum / n : 1.0;
    for (int g = 0; g < n; g += sub) {
        double sum = 0;
        for (int i = g; i < g + sub; i++) {
            w[i] = s2 > 0 ? sqrt(s2 + x[i] * x[i]) : 1.0;
            if (imp != NULL) {
                double v = imp[i] > 0 ? (double)imp[i] : 0.0;
                w[i] *= v < FLT_MAX ? v : FLT_MAX;
                sum += w[i];
            }
        }
        if (imp != NULL && !(sum > 0))
            for (int i = g; i < g + sub; i++)
                w[i] = floor * (s2 > 0 ? sqrt(s2 + x[i] * x[i]) : 1.0);
    }
}

static void to_double(const float *x, int n, double *y)
{
    for (int i = 0; i < n; i++)
        y[i] = x[i];
}

/* ---- grids of code values ---- */

typedef struct grid {
    int n;              /* values */
    int lo;             /* uniform grids: lo, lo + 1, ..., lo + n - 1 */
    const int8_t *v;    /* else these n ascending values (int8, at least 1 apart) */
    const uint8_t *lut; /* and the index nearest each integer -128..127 (grid_lut) */
} grid_t;

static double gval(const grid_t *g, int i)
{
    return g->v != NULL ? g->v[i] : g->lo + i;
}

/* Index of the grid value nearest t (the lower one on a tie). */
static int gnear(const grid_t *g, double t)
{
    if (g->v == NULL)
        return round_clamp(t, g->lo, g->lo + g->n - 1) - g->lo;
    if (!(t > -128.0))
        return 0;
    if (t >= 127.0)
        return g->n - 1;
    /* the nearest to floor(t), or the next value past the midpoint between */
    int i = g->lut[(int)(t + 128.0)];
    return i + 1 < g->n && 2 * t > g->v[i] + g->v[i + 1] ? i + 1 : i;
}

/* The lookup table of a table grid: lut[k + 128] nearest to k. */
static void grid_lut(const int8_t *v, int n, uint8_t *lut)
{
    for (int k = -128; k < 128; k++) {
        int i = 0; /* midpoints below k */
        while (i + 1 < n && 2 * k > v[i] + v[i + 1])
            i++;
        lut[k + 128] = (uint8_t)i;
    }
}

/* A sweep of candidates: offsets t = -r .. r in 2 * steps + 1 steps. */
typedef struct sweep {
    double r;
    int steps;
} sweep_t;

/* ---- the symmetric search: x ~ s * g[idx] ----
 * Candidates map the largest |x| to either end of the grid, moved by t of
 * that end's grid step. Returns the weighted squared error of the best;
 * *scale and idx[n] (n <= 32) get it. */
static double fit_sym(const double *x, const double *w, int n, const grid_t *g, sweep_t sw,
                      double *scale, uint8_t *idx)
{
    double xm = 0, swx2 = 0;
    for (int i = 0; i < n; i++) {
        xm = fabs(x[i]) > fabs(xm) ? x[i] : xm;
        swx2 += w[i] * x[i] * x[i];
    }
    const uint8_t z = (uint8_t)gnear(g, 0.0);
    for (int i = 0; i < n; i++)
        idx[i] = z;
    *scale = 0;
    if (xm == 0)
        return swx2;
    double best = 0, s = 0; /* best = (sum w x v)^2 / sum w v^2, the error it removes */
    uint8_t tmp[32];
    for (int end = 0; end < 2; end++) {
        const int ie = end ? g->n - 1 : 0;
        const double e = gval(g, ie), step = fabs(gval(g, end ? ie - 1 : 1) - e);
        if (e == 0)
            continue;
        for (int k = -sw.steps; k <= sw.steps; k++) {
            const double t = sw.steps > 0 ? sw.r * k / sw.steps : 0.0;
            const double is = (e + (e < 0 ? -t : t) * step) / xm;
            double sxv = 0, svv = 0;
            for (int i = 0; i < n; i++) {
                const int q = gnear(g, x[i] * is);
                const double v = gval(g, q);
                tmp[i] = (uint8_t)q;
                sxv += w[i] * x[i] * v;
                svv += w[i] * v * v;
            }
            if (svv > 0 && sxv * sxv / svv > best) {
                best = sxv * sxv / svv;
                s = sxv / svv;
                memcpy(idx, tmp, (size_t)n);
            }
        }
    }
    for (int it = 0; it < 8 && s != 0; it++) { /* round to s, refit s: never worse */
        double sxv = 0, svv = 0;
        for (int i = 0; i < n; i++) {
            const int q = gnear(g, x[i] / s);
            const double v = gval(g, q);
            tmp[i] = (uint8_t)q;
            sxv += w[i] * x[i] * v;
            svv += w[i] * v * v;
        }
        if (!(svv > 0) || !(sxv * sxv / svv > best))
            break;
        best = sxv * sxv / svv;
        s = sxv / svv;
        memcpy(idx, tmp, (size_t)n);
    }
    *scale = s;
    return swx2 - best > 0 ? swx2 - best : 0.0;
}

/* Error of x ~ S * g[idx] with idx rounded to S (S as the dequantizer has it). */
static double err_sym(const double *x, const double *w, int n, const grid_t *g, double S,
                      uint8_t *idx)
{
    const int z = gnear(g, 0.0);
    double err = 0;
    for (int i = 0; i < n; i++) {
        const int q = S != 0 ? gnear(g, x[i] / S) : z;
        const double r = x[i] - S * gval(g, q);
        idx[i] = (uint8_t)q;
        err += w[i] * r * r;
    }
    return err;
}

/* ---- the search with a min: x ~ s * q + b, q in 0..nmax ---- */

typedef struct msums {
    double w, wx, wx2, wl, wl2, wlx;
} msums_t;

/* The least-squares s >= 0 and b (b <= 0 with neg_min) for the codes
 * summed in m; returns their error. */
static double lsq_min(const msums_t *m, bool neg_min, double *s, double *b)
{
    const double det = m->w * m->wl2 - m->wl * m->wl;
    *s = 0;
    *b = m->wx / m->w;
    if (det > 1e-12 * m->w * m->wl2) {
        *s = (m->w * m->wlx - m->wl * m->wx) / det;
        *b = (m->wl2 * m->wx - m->wl * m->wlx) / det;
    }
    if (neg_min && *b > 0) {
        *b = 0;
        *s = m->wl2 > 0 ? m->wlx / m->wl2 : 0.0;
    }
    if (!(*s > 0)) {
        *s = 0;
        *b = neg_min && m->wx > 0 ? 0.0 : m->wx / m->w;
    }
    const double e = m->wx2 + *s * *s * m->wl2 + *b * *b * m->w - 2 * *s * m->wlx - 2 * *b * m->wx +
                     2 * *s * *b * m->wl;
    return e > 0 ? e : 0.0;
}

static void msums_codes(msums_t *m, const double *x, const double *w, int n, const uint8_t *l)
{
    m->wl = m->wl2 = m->wlx = 0;
    for (int i = 0; i < n; i++) {
        m->wl += w[i] * l[i];
        m->wl2 += w[i] * l[i] * l[i];
        m->wlx += w[i] * l[i] * x[i];
    }
}

/* Candidates put min(x) (or 0 with neg_min, if lower) at code 0 and
 * max(x) at code nmax + t. Returns the error; *scale, *offset, l[n]. Needs
 * a positive sum of weights. */
static double fit_min(const double *x, const double *w, int n, int nmax, bool neg_min, sweep_t sw,
                      double *scale, double *offset, uint8_t *l)
{
    msums_t m = {0};
    double mn = x[0], mx = x[0];
    for (int i = 0; i < n; i++) {
        mn = x[i] < mn ? x[i] : mn;
        mx = x[i] > mx ? x[i] : mx;
        m.w += w[i];
        m.wx += w[i] * x[i];
        m.wx2 += w[i] * x[i] * x[i];
    }
    if (neg_min && mn > 0)
        mn = 0;
    for (int i = 0; i < n; i++)
        l[i] = 0;
    if (!(mx > mn)) { /* constant (or not finite) */
        *scale = 0;
        *offset = mn;
        return 0;
    }
    double best = -1, s = 0, b = 0, cs, cb;
    uint8_t tmp[32];
    for (int k = -sw.steps; k <= sw.steps; k++) {
        const double t = sw.steps > 0 ? sw.r * k / sw.steps : 0.0;
        const double is = (nmax + t) / (mx - mn);
        for (int i = 0; i < n; i++)
            tmp[i] = (uint8_t)round_clamp((x[i] - mn) * is, 0, nmax);
        msums_codes(&m, x, w, n, tmp);
        const double e = lsq_min(&m, neg_min, &cs, &cb);
        if (best < 0 || e < best) {
            best = e;
            s = cs;
            b = cb;
            memcpy(l, tmp, (size_t)n);
        }
    }
    for (int it = 0; it < 8 && s > 0; it++) {
        for (int i = 0; i < n; i++)
            tmp[i] = (uint8_t)round_clamp((x[i] - b) / s, 0, nmax);
        msums_codes(&m, x, w, n, tmp);
        const double e = lsq_min(&m, neg_min, &cs, &cb);
        if (!(e < best))
            break;
        best = e;
        s = cs;
        b = cb;
        memcpy(l, tmp, (size_t)n);
    }
    *scale = s;
    *offset = b;
    return best;
}

/* Error of x ~ S * q - M with q rounded to S and M. */
static double err_min(const double *x, const double *w, int n, int nmax, double S, double M,
                      uint8_t *q)
{
    double err = 0;
    for (int i = 0; i < n; i++) {
        q[i] = (uint8_t)(S != 0 ? round_clamp((x[i] + M) / S, 0, nmax) : 0);
        const double r = x[i] - (S * q[i] - M);
        err += w[i] * r * r;
    }
    return err;
}

/* ---- super-blocks with signed sub-scales: x ~ d * l[j] * g[idx] ---- */

typedef struct sym_layout {
    int sub, nsub;  /* sub-blocks of sub elements */
    grid_t g;       /* codes */
    int lmin, lmax; /* sub-scale integers */
    sweep_t sw;
} sym_layout_t;

static const sweep_t scale_sweep = {1.0, 10}; /* for the sub-scales */

/* Error of sub-block j at sub-scale l; idx gets its codes. */
static double sym_sub(const double *x, const double *w, const sym_layout_t *k, float d, int l,
                      uint8_t *idx)
{
    return err_sym(x, w, k->sub, &k->g, (double)(d * (float)l), idx);
}

/* Each sub-scale moved by one while that lowers its sub-block's error. */
static void sym_polish(const double *x, const double *w, const sym_layout_t *k, float d, int *l,
                       double *e, uint8_t *idx)
{
    uint8_t tmp[32];
    for (int j = 0; j < k->nsub; j++) {
        const int o = j * k->sub;
        for (int moved = 1, it = 0; moved && it < 8; it++) {
            moved = 0;
            for (int dl = -1; dl <= 1; dl += 2) {
                const int c = l[j] + dl;
                if (c < k->lmin || c > k->lmax)
                    continue;
                const double ec = sym_sub(x + o, w + o, k, d, c, tmp);
                if (ec < e[j]) {
                    e[j] = ec;
                    l[j] = c;
                    memcpy(idx + o, tmp, (size_t)k->sub);
                    moved = 1;
                }
            }
        }
    }
}

/* The f16 value k steps (of its magnitude's bits) from f16(D); 0 past
 * the ends. Where D is subnormal (below 2^-14) a step is 2^-24, coarse. */
static float f16_step(double D, int k)
{
    const uint16_t h0 = f16_sat(D);
    const int h = (h0 & 0x7fff) + k;
    if (h <= 0 || h >= 0x7c00)
        return 0.0f;
    return tdm_f16_to_f32((uint16_t)(h | (h0 & 0x8000)));
}

/* The f16 super-block scale for sub-scales v (curvatures W) found as D:
 * f16(D) or one of the f16 values a few steps around it, whichever rounds
 * v to integers in [lmin, lmax] with the least sum W (d l - v)^2. */
static float pick_f16(const double *v, const double *W, int n, int lmin, int lmax, double D)
{
    float best_d = f16_round(D);
    double best = INFINITY;
    for (int k = -4; k <= 8 && D != 0; k++) {
        const float d = f16_step(D, k);
        if (d == 0)
            continue;
        double e = 0;
        for (int j = 0; j < n; j++) {
            const double r = d * (double)round_clamp(v[j] / d, lmin, lmax) - v[j];
            e += W[j] * r * r;
        }
        if (e < best) {
            best = e;
            best_d = d;
        }
    }
    return best_d;
}

static double sum_of(const double *e, int n)
{
    double s = 0;
    for (int i = 0; i < n; i++)
        s += e[i];
    return s;
}

static void sym_super(const double *x, const double *w, const sym_layout_t *k, float *dp, int *l,
                      uint8_t *idx)
{
    double s[16], W[16], e[16], e2[16], D;
    uint8_t li[16], idx2[256];
    int l2[16];
    for (int j = 0; j < k->nsub; j++) {
        const int o = j * k->sub;
        fit_sym(x + o, w + o, k->sub, &k->g, k->sw, &s[j], idx + o);
        W[j] = 0;
        for (int i = o; i < o + k->sub; i++)
            W[j] += w[i] * gval(&k->g, idx[i]) * gval(&k->g, idx[i]);
    }
    const grid_t lg = {k->lmax - k->lmin + 1, k->lmin, NULL, NULL};
    fit_sym(s, W, k->nsub, &lg, scale_sweep, &D, li);
    float d = pick_f16(s, W, k->nsub, k->lmin, k->lmax, D);
    for (int j = 0; j < k->nsub; j++) {
        l[j] = d != 0 ? k->lmin + gnear(&lg, s[j] / d) : 0;
        e[j] = sym_sub(x + j * k->sub, w + j * k->sub, k, d, l[j], idx + j * k->sub);
    }
    sym_polish(x, w, k, d, l, e, idx);
    for (int pass = 0; pass < 3; pass++) { /* refit d to the codes, keep it if better */
        double num = 0, den = 0;
        for (int i = 0; i < k->nsub * k->sub; i++) {
            const double a = l[i / k->sub] * gval(&k->g, idx[i]);
            num += w[i] * x[i] * a;
            den += w[i] * a * a;
        }
        const float d2 = den > 0 ? f16_round(num / den) : d;
        if (d2 == d || !(d2 != 0))
            break;
        memcpy(l2, l, sizeof(int) * (size_t)k->nsub);
        for (int j = 0; j < k->nsub; j++)
            e2[j] = sym_sub(x + j * k->sub, w + j * k->sub, k, d2, l2[j], idx2 + j * k->sub);
        sym_polish(x, w, k, d2, l2, e2, idx2);
        if (!(sum_of(e2, k->nsub) < sum_of(e, k->nsub)))
            break;
        d = d2;
        memcpy(l, l2, sizeof(int) * (size_t)k->nsub);
        memcpy(e, e2, sizeof(e2));
        memcpy(idx, idx2, (size_t)(k->nsub * k->sub));
    }
    *dp = d;
}

/* ---- super-blocks with mins: x ~ d * ls[j] * q - dmin * lm[j] ---- */

typedef struct asym_layout {
    int sub, nsub, nmax; /* codes 0..nmax */
    int lmax;            /* sub-scales and sub-mins 0..lmax */
    sweep_t sw;
} asym_layout_t;

static double asym_sub(const double *x, const double *w, const asym_layout_t *k, float d, float dm,
                       int ls, int lm, uint8_t *q)
{
    return err_min(x, w, k->sub, k->nmax, (double)(d * (float)ls), (double)(dm * (float)lm), q);
}

/* Each (sub-scale, sub-min) pair moved to a neighbour while that lowers
 * its sub-block's error. */
static void asym_polish(const double *x, const double *w, const asym_layout_t *k, float d, float dm,
                        int *ls, int *lm, double *e, uint8_t *q)
{
    uint8_t tmp[32];
    for (int j = 0; j < k->nsub; j++) {
        const int o = j * k->sub;
        for (int moved = 1, it = 0; moved && it < 8; it++) {
            moved = 0;
            const int s0 = ls[j], m0 = lm[j];
            for (int a = s0 - 1; a <= s0 + 1; a++)
                for (int b = m0 - 1; b <= m0 + 1; b++) {
                    if (a < 0 || a > k->lmax || b < 0 || b > k->lmax || (a == s0 && b == m0))
                        continue;
                    const double ec = asym_sub(x + o, w + o, k, d, dm, a, b, tmp);
                    if (ec < e[j]) {
                        e[j] = ec;
                        ls[j] = a;
                        lm[j] = b;
                        memcpy(q + o, tmp, (size_t)k->sub);
                        moved = 1;
                    }
                }
        }
    }
}

static void asym_super(const double *x, const double *w, const asym_layout_t *k, float *dp,
                       float *dmp, int *ls, int *lm, uint8_t *q)
{
    double s[16], m[16], Ws[16], Wm[16], e[16], e2[16], D, Dm, b;
    uint8_t li[16], q2[256];
    int ls2[16], lm2[16];
    for (int j = 0; j < k->nsub; j++) {
        const int o = j * k->sub;
        fit_min(x + o, w + o, k->sub, k->nmax, true, k->sw, &s[j], &b, q + o);
        m[j] = -b;
        Ws[j] = Wm[j] = 0;
        for (int i = o; i < o + k->sub; i++) {
            Ws[j] += w[i] * q[i] * q[i];
            Wm[j] += w[i];
        }
    }
    const grid_t lg = {k->lmax + 1, 0, NULL, NULL};
    fit_sym(s, Ws, k->nsub, &lg, scale_sweep, &D, li);
    fit_sym(m, Wm, k->nsub, &lg, scale_sweep, &Dm, li);
    float d = pick_f16(s, Ws, k->nsub, 0, k->lmax, D),
          dm = pick_f16(m, Wm, k->nsub, 0, k->lmax, Dm);
    for (int j = 0; j < k->nsub; j++) {
        ls[j] = d > 0 ? gnear(&lg, s[j] / d) : 0;
        lm[j] = dm > 0 ? gnear(&lg, m[j] / dm) : 0;
        e[j] = asym_sub(x + j * k->sub, w + j * k->sub, k, d, dm, ls[j], lm[j], q + j * k->sub);
    }
    asym_polish(x, w, k, d, dm, ls, lm, e, q);
    for (int pass = 0; pass < 3; pass++) { /* refit d and dmin to the codes */
        double aa = 0, ab = 0, bb = 0, ax = 0, bx = 0;
        for (int i = 0; i < k->nsub * k->sub; i++) {
            const double a = ls[i / k->sub] * (double)q[i], c = -lm[i / k->sub];
            aa += w[i] * a * a;
            ab += w[i] * a * c;
            bb += w[i] * c * c;
            ax += w[i] * a * x[i];
            bx += w[i] * c * x[i];
        }
        const double det = aa * bb - ab * ab;
        double nd = d, ndm = dm;
        if (det > 1e-12 * aa * bb) {
            nd = (bb * ax - ab * bx) / det;
            ndm = (aa * bx - ab * ax) / det;
        }
        if (!(ndm > 0)) {
            ndm = 0;
            nd = aa > 0 ? ax / aa : d;
        }
        const float d2 = f16_round(nd > 0 ? nd : 0.0), dm2 = f16_round(ndm);
        if (d2 == d && dm2 == dm)
            break;
        memcpy(ls2, ls, sizeof(int) * (size_t)k->nsub);
        memcpy(lm2, lm, sizeof(int) * (size_t)k->nsub);
        for (int j = 0; j < k->nsub; j++)
            e2[j] = asym_sub(x + j * k->sub, w + j * k->sub, k, d2, dm2, ls2[j], lm2[j],
                             q2 + j * k->sub);
        asym_polish(x, w, k, d2, dm2, ls2, lm2, e2, q2);
        if (!(sum_of(e2, k->nsub) < sum_of(e, k->nsub)))
            break;
        d = d2;
        dm = dm2;
        memcpy(ls, ls2, sizeof(int) * (size_t)k->nsub);
        memcpy(lm, lm2, sizeof(int) * (size_t)k->nsub);
        memcpy(e, e2, sizeof(e2));
        memcpy(q, q2, (size_t)(k->nsub * k->sub));
    }
    *dp = d;
    *dmp = dm;
}

/* ---- the layouts ---- */

/* Nibbles of a 32-block: elements 0..15 low, 16..31 high. */
static void pack_nib32(uint8_t *qs, const uint8_t *u)
{
    for (int j = 0; j < 16; j++)
        qs[j] = (uint8_t)((u[j] & 0x0f) | (u[j + 16] & 0x0f) << 4);
}

static void put_qh32(uint8_t *p, const uint8_t *u) /* bit 4 of each of 32 codes, LE u32 */
{
    uint32_t qh = 0;
    for (int j = 0; j < 32; j++)
        qh |= (uint32_t)(u[j] >> 4 & 1) << j;
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(qh >> (8 * i));
}

/* float -> int code as GGML's reference formulas: trunc, clamped. */
static int trunc_clamp(float v, int lo, int hi)
{
    if (!(v >= (float)lo))
        return lo;
    if (v >= (float)hi)
        return hi;
    return (int)v;
}

/* Q4_0, Q5_0 (half = 8, 16) and IQ4_NL (half = 0): x = d * g[u]. Q4_0 and
 * Q5_0 keep GGML's formula's block unless the search's is better. */
static void blk_sym32(const float *xf, const float *imp, uint8_t *b, const grid_t *g, int half,
                      int five)
{
    double x[32], w[32], s;
    uint8_t u[32], ur[32];
    to_double(xf, 32, x);
    make_weights(x, imp, 32, 32, w);
    fit_sym(x, w, 32, g, (sweep_t){2.0, 10}, &s, u);
    float d = f16_round(s);
    double e = err_sym(x, w, 32, g, d, u);
    for (int k = -4; k <= 8 && fabsf(d) < 0x1p-14f; k++) { /* subnormal: try its neighbours */
        const float dk = f16_step(s, k);
        const double ek = dk != 0 ? err_sym(x, w, 32, g, dk, ur) : INFINITY;
        if (ek < e) {
            e = ek;
            d = dk;
            memcpy(u, ur, sizeof(u));
        }
    }
    if (half > 0) { /* GGML: d = max / -half, u = trunc(x / d + half + 0.5) */
        float mx = 0;
        for (int j = 0; j < 32; j++)
            mx = fabsf(xf[j]) > fabsf(mx) ? xf[j] : mx;
        const float dr = mx / (float)-half, id = dr != 0 ? 1.0f / dr : 0.0f;
        const float dq = f16_round(dr);
        double er = 0;
        for (int j = 0; j < 32; j++) {
            ur[j] =
                (uint8_t)(dq != 0 ? trunc_clamp(xf[j] * id + ((float)half + 0.5f), 0, 2 * half - 1)
                                  : half);
            const double r = x[j] - (double)(dq * (float)(ur[j] - half));
            er += w[j] * r * r;
        }
        if (er <= e) {
            d = dq;
            memcpy(u, ur, sizeof(u));
        }
    }
    put16(b, tdm_f32_to_f16(d));
    if (five) {
        put_qh32(b + 2, u);
        pack_nib32(b + 6, u);
    } else {
        pack_nib32(b + 2, u);
    }
}

/* Q4_1, Q5_1: x = d * u + m; GGML's formula's block unless the search's
 * is better. */
static void blk_min32(const float *xf, const float *imp, uint8_t *b, int nmax)
{
    double x[32], w[32], s, o;
    uint8_t u[32], ur[32];
    to_double(xf, 32, x);
    make_weights(x, imp, 32, 32, w);
    fit_min(x, w, 32, nmax, false, (sweep_t){2.0, 10}, &s, &o, u);
    float d = f16_round(s), m = f16_round(o);
    double e = err_min(x, w, 32, nmax, d, -(double)m, u);
    for (int k = -4; k <= 8 && d < 0x1p-14f; k++) { /* subnormal: try its neighbours */
        const float dk = f16_step(s, k);
        const double ek = dk != 0 ? err_min(x, w, 32, nmax, dk, -(double)m, ur) : INFINITY;
        if (ek < e) {
            e = ek;
            d = dk;
            memcpy(u, ur, sizeof(u));
        }
    }
    { /* GGML: d = (max - min) / nmax, m = min, u = trunc((x - min) / d + 0.5) */
        float mn = xf[0], mx = xf[0];
        for (int j = 1; j < 32; j++) {
            mn = xf[j] < mn ? xf[j] : mn;
            mx = xf[j] > mx ? xf[j] : mx;
        }
        const float dr = (mx - mn) / (float)nmax, id = dr != 0 ? 1.0f / dr : 0.0f;
        const float dq = f16_round(dr), mq = f16_round(mn);
        double er = 0;
        for (int j = 0; j < 32; j++) {
            ur[j] = (uint8_t)(dq != 0 ? trunc_clamp((xf[j] - mn) * id + 0.5f, 0, nmax) : 0);
            const double r = x[j] - (double)(dq * (float)ur[j] + mq);
            er += w[j] * r * r;
        }
        if (er <= e) {
            d = dq;
            m = mq;
            memcpy(u, ur, sizeof(u));
        }
    }
    put16(b, tdm_f32_to_f16(d));
    put16(b + 2, tdm_f32_to_f16(m));
    if (nmax == 31) {
        put_qh32(b + 4, u);
        pack_nib32(b + 8, u);
    } else {
        pack_nib32(b + 4, u);
    }
}

static void blk_q8_0(const float *x, uint8_t *b) /* GGML's: d = amax / 127, round(x / d) */
{
    float amax = 0;
    for (int j = 0; j < 32; j++)
        amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    const float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    put16(b, f16_sat(d));
    for (int j = 0; j < 32; j++) {
        const float v = isfinite(id) ? roundf(x[j] * id) : 0.0f;
        b[2 + j] = (uint8_t)(int8_t)round_clamp(v, -127, 127);
    }
}

static void blk_q2_k(const double *x, const double *w, uint8_t *b)
{
    static const asym_layout_t k = {16, 16, 3, 15, {1.5, 5}};
    float d, dm;
    int ls[16], lm[16];
    uint8_t q[256];
    asym_super(x, w, &k, &d, &dm, ls, lm, q);
    memset(b, 0, 84);
    for (int j = 0; j < 16; j++)
        b[j] = (uint8_t)(ls[j] | lm[j] << 4);
    for (int e = 0; e < 256; e++)
        b[16 + e / 128 * 32 + e % 32] |= (uint8_t)(q[e] << (2 * (e / 32 % 4)));
    put16(b + 80, tdm_f32_to_f16(d));
    put16(b + 82, tdm_f32_to_f16(dm));
}

static void blk_q3_k(const double *x, const double *w, uint8_t *b)
{
    static const sym_layout_t k = {16, 16, {8, -4, NULL, NULL}, -32, 31, {2.0, 10}};
    float d;
    int l[16];
    uint8_t u[256]; /* code + 4 */
    sym_super(x, w, &k, &d, l, u);
    memset(b, 0, 110);
    for (int e = 0; e < 256; e++) {
        b[e % 32] |= (uint8_t)((u[e] >> 2) << (e / 32));
        b[32 + e / 128 * 32 + e % 32] |= (uint8_t)((u[e] & 3) << (2 * (e / 32 % 4)));
    }
    for (int i = 0; i < 16; i++) {
        const int v = l[i] + 32;
        b[96 + i % 8] |= (uint8_t)((v & 0x0f) << (4 * (i / 8)));
        b[96 + 8 + i % 4] |= (uint8_t)((v >> 4) << (2 * (i / 4)));
    }
    put16(b + 108, tdm_f32_to_f16(d));
}

/* The 12 bytes of Q4_K's and Q5_K's eight 6-bit scales and mins. */
static void pack_k_scales(uint8_t *sc, const int *ls, const int *lm)
{
    for (int i = 0; i < 4; i++) {
        sc[i] = (uint8_t)(ls[i] | (ls[i + 4] >> 4) << 6);
        sc[4 + i] = (uint8_t)(lm[i] | (lm[i + 4] >> 4) << 6);
        sc[8 + i] = (uint8_t)((ls[i + 4] & 0x0f) | (lm[i + 4] & 0x0f) << 4);
    }
}

static void blk_q45_k(const double *x, const double *w, uint8_t *b, int five)
{
    static const asym_layout_t k4 = {32, 8, 15, 63, {2.0, 10}};
    static const asym_layout_t k5 = {32, 8, 31, 63, {2.0, 10}};
    float d, dm;
    int ls[8], lm[8];
    uint8_t q[256];
    asym_super(x, w, five ? &k5 : &k4, &d, &dm, ls, lm, q);
    memset(b, 0, five ? 176 : 144);
    put16(b, tdm_f32_to_f16(d));
    put16(b + 2, tdm_f32_to_f16(dm));
    pack_k_scales(b + 4, ls, lm);
    uint8_t *qs = b + (five ? 48 : 16);
    for (int e = 0; e < 256; e++) {
        const int sb = e / 32, j = e % 32;
        qs[sb / 2 * 32 + j] |= (uint8_t)((q[e] & 0x0f) << (sb % 2 * 4));
        if (five)
            b[16 + j] |= (uint8_t)((q[e] >> 4) << sb);
    }
}

static void blk_q6_k(const double *x, const double *w, uint8_t *b)
{
    static const sym_layout_t k = {16, 16, {64, -32, NULL, NULL}, -128, 127, {3.0, 15}};
    float d;
    int l[16];
    uint8_t u[256]; /* code + 32 */
    sym_super(x, w, &k, &d, l, u);
    memset(b, 0, 210);
    for (int e = 0; e < 256; e++) {
        const int h = e / 128, r = e % 128;
        b[h * 64 + r % 64] |= (uint8_t)((u[e] & 0x0f) << (r / 64 * 4));
        b[128 + h * 32 + r % 32] |= (uint8_t)((u[e] >> 4) << (r / 32 * 2));
    }
    for (int j = 0; j < 16; j++)
        b[192 + j] = (uint8_t)(int8_t)l[j];
    put16(b + 208, tdm_f32_to_f16(d));
}

static void blk_iq4_xs(const double *x, const double *w, const grid_t *iq4, uint8_t *b)
{
    const sym_layout_t k = {32, 8, *iq4, -32, 31, {2.0, 10}};
    float d;
    int l[8];
    uint8_t u[256];
    sym_super(x, w, &k, &d, l, u);
    memset(b, 0, 136);
    put16(b, tdm_f32_to_f16(d));
    unsigned sh = 0;
    for (int ib = 0; ib < 8; ib++) {
        const int v = l[ib] + 32;
        sh |= (unsigned)(v >> 4) << (2 * ib);
        b[4 + ib / 2] |= (uint8_t)((v & 0x0f) << (4 * (ib % 2)));
        pack_nib32(b + 8 + ib * 16, u + ib * 32);
    }
    put16(b + 2, (uint16_t)sh);
}

/* ---- rows ---- */

static uint16_t f32_to_bf16(float f) /* round to nearest even; NaN stays (quiet) NaN */
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)(u >> 16 | 0x40);
    return (uint16_t)((u + 0x7fffu + (u >> 16 & 1)) >> 16);
}

int tdm_quantize_supported(uint32_t type)
{
    switch (type) {
    case TDM_DTYPE_F32:
    case TDM_DTYPE_F16:
    case TDM_DTYPE_BF16:
    case TDM_DTYPE_Q8_0:
    case TDM_DTYPE_Q4_0:
    case TDM_DTYPE_Q4_1:
    case TDM_DTYPE_Q5_0:
    case TDM_DTYPE_Q5_1:
    case TDM_DTYPE_IQ4_NL:
    case TDM_DTYPE_Q2_K:
    case TDM_DTYPE_Q3_K:
    case TDM_DTYPE_Q4_K:
    case TDM_DTYPE_Q5_K:
    case TDM_DTYPE_Q6_K:
    case TDM_DTYPE_IQ4_XS: return 1;
    default: return 0;
    }
}

int tdm_quantize_row(uint32_t type, const float *src, void *dst, uint64_t n, const float *imp)
{
    const uint64_t be = tdm_dtype_block_elems(type), bb = tdm_dtype_block_bytes(type);
    if (!tdm_quantize_supported(type) || n % be != 0)
        return -1;
    uint8_t *out = dst;
    if (be == 1) {
        for (uint64_t i = 0; i < n; i++) {
            if (type == TDM_DTYPE_F32)
                memcpy(out + 4 * i, src + i, 4);
            else
                put16(out + 2 * i,
                      type == TDM_DTYPE_F16 ? tdm_f32_to_f16(src[i]) : f32_to_bf16(src[i]));
        }
        return 0;
    }
    uint8_t lut[256];
    const grid_t iq4 = {16, 0, tdm_iq4_values, lut};
    if (type == TDM_DTYPE_IQ4_NL || type == TDM_DTYPE_IQ4_XS)
        grid_lut(tdm_iq4_values, 16, lut);
    const int sub16 = type == TDM_DTYPE_Q2_K || type == TDM_DTYPE_Q3_K || type == TDM_DTYPE_Q6_K;
    for (uint64_t i = 0; i < n; i += be) {
        const float *x = src + i, *im = imp != NULL ? imp + i : NULL;
        uint8_t *b = out + i / be * bb;
        double xd[TDM_QKK], w[TDM_QKK];
        if (be == TDM_QKK) {
            to_double(x, TDM_QKK, xd);
            make_weights(xd, im, TDM_QKK, sub16 ? 16 : 32, w);
        }
        switch (type) {
        case TDM_DTYPE_Q8_0: blk_q8_0(x, b); break;
        case TDM_DTYPE_Q4_0: blk_sym32(x, im, b, &(grid_t){16, -8, NULL, NULL}, 8, 0); break;
        case TDM_DTYPE_Q5_0: blk_sym32(x, im, b, &(grid_t){32, -16, NULL, NULL}, 16, 1); break;
        case TDM_DTYPE_IQ4_NL: blk_sym32(x, im, b, &iq4, 0, 0); break;
        case TDM_DTYPE_Q4_1: blk_min32(x, im, b, 15); break;
        case TDM_DTYPE_Q5_1: blk_min32(x, im, b, 31); break;
        case TDM_DTYPE_Q2_K: blk_q2_k(xd, w, b); break;
        case TDM_DTYPE_Q3_K: blk_q3_k(xd, w, b); break;
        case TDM_DTYPE_Q4_K: blk_q45_k(xd, w, b, 0); break;
        case TDM_DTYPE_Q5_K: blk_q45_k(xd, w, b, 1); break;
        case TDM_DTYPE_Q6_K: blk_q6_k(xd, w, b); break;
        case TDM_DTYPE_IQ4_XS: blk_iq4_xs(xd, w, &iq4, b); break;
        default: return -1;
        }
    }
    return 0;
}
