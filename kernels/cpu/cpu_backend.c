/* tandem CPU backend: the ops table, weight packing, and the split of every
 * op across the thread pool. The arithmetic lives in the per-ISA kernel
 * tables (ops_scalar.c, ops_avx2.c, ops_avx512.c); this file only decides
 * which thread computes which output elements, which never changes a
 * result (see cpu_internal.h). */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cpu_internal.h"
#include "tandem/log.h"
#include "tandem/qform.h"
#include "tandem/threadpool.h"

/* Elementwise work (elements) under which an op runs on the caller alone:
 * waking the pool costs more than the op. */
#define TDM_CPU_SMALL_OP 16384
/* Token rows per block of a many-row matmul: the block's activations stay
 * in L2 while every weight group of a thread passes over them (256 rows of
 * k = 1536 are 885 KB of int16 activations; measured as fast as 128 and
 * faster than 64). */
#define TDM_CPU_MM_TOKENS 256

/* Buffers of at least TDM_CPU_HUGE_MIN bytes get transparent huge pages
 * (see cpu_alloc). */
#define TDM_CPU_HUGE     ((size_t)2 << 20)
#define TDM_CPU_HUGE_MIN ((size_t)4 << 20)

/* (cos, sin) pairs the rope cache holds: 512 rows of 64 pairs. */
#define TDM_CPU_ROPE_CACHE 32768

typedef struct cpu_backend {
    tdm_backend_t base;
    tdm_backend_ops_t ops;
    tdm_cpu_isa_t isa;
    const tdm_cpu_kernels_t *k;
    tdm_threadpool_t *pool;
    int n_threads;
    /* The last rope call's angles: every layer's q and k rotate by the same
     * positions, so a step computes its sines and cosines once. */
    float *rope_cs;     /* [rope_n][n_rot / 2][2] cos, sin */
    int32_t *rope_pos;  /* [rope_n] the positions they are for */
    int64_t rope_n;     /* 0: nothing cached */
    int32_t rope_n_rot; /* and the parameters */
    float rope_theta;
} cpu_backend_t;

static cpu_backend_t *cpu_of(tdm_backend_t *be)
{
    return (cpu_backend_t *)be;
}

/* [*lo, *hi) of n units for thread ith of nth, contiguous. */
static void split_range(int64_t n, int ith, int nth, int64_t *lo, int64_t *hi)
{
    *lo = n * ith / nth;
    *hi = n * (ith + 1) / nth;
}

static int is_quant(uint32_t wtype)
{
    tdm_qform_t f;
    return tdm_qform_of(wtype, &f);
}

/* ---- memory ---- */

/* 64-byte aligned memory; from TDM_CPU_HUGE_MIN bytes on (a layer's KV
 * cache, packed weights) 2 MB aligned and marked for transparent huge
 * pages: the kernels stream such buffers, and 4 KB pages cost a TLB miss
 * every few K/V rows (measured ~5% of attention at 32 rows x 128
 * positions). Freed with free(). */
static void *cpu_alloc(size_t bytes)
{
    if (bytes >= TDM_CPU_HUGE_MIN) {
        size_t sz = (bytes + TDM_CPU_HUGE - 1) & ~(TDM_CPU_HUGE - 1);
        void *p = aligned_alloc(TDM_CPU_HUGE, sz);
        if (p != NULL)
            (void)madvise(p, sz, MADV_HUGEPAGE); /* a hint: fine if refused */
        return p;
    }
    size_t sz = (bytes + 63) & ~(size_t)63;
    return aligned_alloc(64, sz ? sz : 64);
}

static void *cpu_buf_alloc(tdm_backend_t *be, size_t bytes)
{
    return cpu_alloc(bytes);
}

static void cpu_buf_free(tdm_backend_t *be, void *buf)
{
    free(buf);
}

static void cpu_copy(tdm_backend_t *be, void *dst, const void *src, size_t bytes)
{
    if (bytes)
        memcpy(dst, src, bytes);
}

static void cpu_sync(tdm_backend_t *be) {}

/* ---- weights ---- */

/* k with d * k == v bit for bit, |k| < 128; 0 when there is none. */
static int int_of(float v, float d, int8_t *k)
{
    if (d == 0.0f) { /* v is a zero: +0 = d * 0, and -0 = d * -1 for d = +0 */
        *k = (int8_t)(signbit(v) != signbit(d) ? -1 : 0);
        float back = d * (float)*k;
        return memcmp(&back, &v, 4) == 0;
    }
    float q = v / d;
    if (!(q >= -128.0f && q < 128.0f))
        return 0;
    *k = (int8_t)lrintf(q);
    float back = d * (float)*k;
    return memcmp(&back, &v, 4) == 0;
}

/* Packs a quantized weight (see cpu_internal.h) from its integer form.
 * TDM_ERR_INVALID: an SC8 pack met a scale that is not its super-scale
 * times a small integer (the caller packs again with SC32). */
static tdm_status_t pack_weight(tdm_bweight_t *w, const void *data)
{
    const uint32_t pk = w->pk;
    const int64_t nb = w->k / TDM_QK, k = w->k;
    const int nsub = pk & TDM_CPU_PK_SUB16 ? 2 : 1;
    const int has_min = (pk & TDM_CPU_PK_MIN) != 0, sc8 = (pk & TDM_CPU_PK_SC8) != 0;
    const size_t qbytes = pk & TDM_CPU_PK_NIB ? 256 : 512; /* packed qs per block of 16 rows */
    const size_t ssz = sc8 ? 1 : pk & TDM_CPU_PK_SC32 ? 4 : 2;
    const size_t table = (size_t)nb * (size_t)nsub * TDM_CPU_RG * ssz;
    const size_t super = sc8 ? (size_t)(nb / 8) * TDM_CPU_RG * 4 : 0;
    w->nb = nb;
    w->n_groups = (w->rows + TDM_CPU_RG - 1) / TDM_CPU_RG;
    w->d_off = (size_t)nb * qbytes;
    w->m_off = w->d_off + table;
    w->s_off = w->m_off + (has_min ? table : 0);
    w->t_off = w->s_off + super;
    size_t end = w->t_off + (has_min ? super : 0);
    w->group_bytes = (end + 63) & ~(size_t)63;
    const size_t total = (size_t)w->n_groups * w->group_bytes;
    w->owned = cpu_alloc(total);
    uint8_t *u = malloc((size_t)k);
    float *sc = malloc((size_t)(k / 16) * sizeof(float) * 2 + (size_t)(k / 256 + 1) * 8);
    float *mn = sc != NULL ? sc + k / 16 : NULL, *sd = mn != NULL ? mn + k / 16 : NULL;
    float *sm = sd != NULL ? sd + k / 256 + 1 : NULL;
    tdm_status_t st = TDM_OK;
    if (w->owned == NULL || u == NULL || sc == NULL) {
        st = TDM_ERR_NOMEM;
        goto out;
    }
    memset(w->owned, 0, total);
    const size_t row_bytes = tdm_dtype_row_bytes(w->wtype, (uint64_t)k);
    for (int64_t r = 0; r < w->rows && st == TDM_OK; r++) {
        uint8_t *grp = (uint8_t *)w->owned + (size_t)(r / TDM_CPU_RG) * w->group_bytes;
        const int64_t i = r % TDM_CPU_RG;
        const uint8_t *src = (const uint8_t *)data + (size_t)r * row_bytes;
        tdm_qform_decode(w->wtype, src, (uint64_t)k, u, sc, mn);
        if (sc8 && !tdm_qform_super(w->wtype, src, (uint64_t)k, sd, sm)) {
            st = TDM_ERR_INVALID;
            break;
        }
        for (int64_t b = 0; b < nb && st == TDM_OK; b++) {
            uint8_t *qs = grp + (size_t)b * qbytes + (size_t)i * 4;
            const uint8_t *ub = u + b * TDM_QK;
            for (int e = 0; e < TDM_QK; e++) {
                if (pk & TDM_CPU_PK_NIB)
                    qs[(e % 16) / 4 * 64 + e % 4] |= (uint8_t)(ub[e] << (e / 16 * 4));
                else
                    qs[e / 4 * 64 + e % 4] = ub[e];
            }
            if (sc8 && b % 8 == 0) {
                const float nd = -sm[b / 8];
                memcpy(grp + w->s_off + 4 * (size_t)((b / 8) * TDM_CPU_RG + i), &sd[b / 8], 4);
                if (has_min)
                    memcpy(grp + w->t_off + 4 * (size_t)((b / 8) * TDM_CPU_RG + i), &nd, 4);
            }
            for (int h = 0; h < nsub; h++) {
                const size_t si = (size_t)((b * nsub + h) * TDM_CPU_RG + i);
                const float *pair[2] = {sc, mn};
                for (int m = 0; m < (has_min ? 2 : 1); m++) {
                    float v = pair[m][b * nsub + h];
                    uint8_t *dst = grp + (m ? w->m_off : w->d_off);
                    if (sc8) {
                        int8_t kv;
                        if (!int_of(v, m ? -sm[b / 8] : sd[b / 8], (int8_t *)&kv)) {
                            st = TDM_ERR_INVALID;
                            break;
                        }
                        dst[si] = (uint8_t)kv;
                    } else if (ssz == 4) {
                        memcpy(dst + 4 * si, &v, 4);
                    } else {
                        uint16_t hv = tdm_f32_to_f16(v); /* exact: the form says f16 */
                        memcpy(dst + 2 * si, &hv, 2);
                    }
                }
            }
        }
    }
out:
    free(u);
    free(sc);
    if (st != TDM_OK) {
        free(w->owned);
        w->owned = NULL;
        return st;
    }
    w->data = w->owned;
    return TDM_OK;
}

static tdm_status_t cpu_weight_load(tdm_backend_t *be, const void *data, uint32_t wtype,
                                    int64_t rows, int64_t k, tdm_bweight_t **out)
{
    if (rows <= 0 || k <= 0 || data == NULL) {
        tdm_log_error("kernels", "weight of %lld x %lld: empty shape", (long long)rows,
                      (long long)k);
        return TDM_ERR_INVALID;
    }
    if (!tdm_dtype_supported(wtype)) {
        tdm_log_error("kernels", "weight type %s is not supported", tdm_dtype_name(wtype));
        return TDM_ERR_UNSUPPORTED;
    }
    const size_t be_elems = tdm_dtype_block_elems(wtype);
    if (k % (int64_t)be_elems != 0 || (is_quant(wtype) && k % TDM_QK != 0)) {
        tdm_log_error("kernels", "%s weight row length %lld is not a multiple of its block (%zu)",
                      tdm_dtype_name(wtype), (long long)k, be_elems);
        return TDM_ERR_INVALID;
    }
    tdm_bweight_t *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return TDM_ERR_NOMEM;
    w->wtype = wtype;
    w->rows = rows;
    w->k = k;
    if (!tdm_cpu_pack_of(wtype, &w->pk, &w->bias)) {
        w->data = data;
        *out = w;
        return TDM_OK;
    }
    /* TANDEM_CPU_PACK_SC32=1: f32 scales instead of SC8 (tests run both) */
    const char *force = getenv("TANDEM_CPU_PACK_SC32");
    if ((w->pk & TDM_CPU_PK_SC8) && force != NULL && force[0] == '1')
        w->pk = (w->pk & ~TDM_CPU_PK_SC8) | TDM_CPU_PK_SC32;
    tdm_status_t st = pack_weight(w, data);
    if (st == TDM_ERR_INVALID) { /* scales that are not d times an integer */
        w->pk = (w->pk & ~TDM_CPU_PK_SC8) | TDM_CPU_PK_SC32;
        st = pack_weight(w, data);
    }
    if (st != TDM_OK) {
        free(w);
        tdm_log_error("kernels", "out of memory packing a %lld x %lld %s weight", (long long)rows,
                      (long long)k, tdm_dtype_name(wtype));
        return st;
    }
    *out = w;
    return TDM_OK;
}

static void cpu_weight_free(tdm_backend_t *be, tdm_bweight_t *w)
{
    if (w == NULL)
        return;
    free(w->owned);
    free(w);
}

static int cpu_weight_uses_source(tdm_backend_t *be, const tdm_bweight_t *w)
{
    (void)be;
    return w->owned == NULL; /* float weights are read where they are */
}

/* ---- activations ---- */

static size_t cpu_act_size(uint32_t wtype, int64_t n, int64_t k)
{
    if (is_quant(wtype))
        return (size_t)n * tdm_cpu_act_stride(k);
    return (size_t)n * (size_t)k * sizeof(float);
}

typedef struct act_task {
    const tdm_cpu_kernels_t *k;
    int32_t bias;
    int has_min;
    const float *x;
    int64_t n, kk;
    uint8_t *act;
} act_task_t;

static void act_task_fn(void *arg, int ith, int nth)
{
    const act_task_t *t = arg;
    int64_t lo, hi;
    split_range(t->n, ith, nth, &lo, &hi);
    size_t stride = tdm_cpu_act_stride(t->kk);
    for (int64_t r = lo; r < hi; r++)
        t->k->act_quant(t->bias, t->has_min, t->x + r * t->kk, t->kk, t->act + (size_t)r * stride);
}

static void cpu_act_prepare(tdm_backend_t *be, uint32_t wtype, const float *x, int64_t n, int64_t k,
                            void *act)
{
    cpu_backend_t *cb = cpu_of(be);
    if (!is_quant(wtype)) {
        if (act != (const void *)x)
            memcpy(act, x, (size_t)n * (size_t)k * sizeof(float));
        return;
    }
    tdm_qform_t f;
    tdm_qform_of(wtype, &f);
    act_task_t t = {cb->k, tdm_cpu_act_bias(wtype), f.has_min, x, n, k, act};
    if (n * k < TDM_CPU_SMALL_OP)
        act_task_fn(&t, 0, 1);
    else
        tdm_threadpool_run(cb->pool, act_task_fn, &t);
}

/* ---- matmul ---- */

typedef struct mm_task {
    const tdm_cpu_kernels_t *k;
    const tdm_bweight_t *w;
    const void *act;
    int64_t n;
    float *y;
    int64_t ldy;
} mm_task_t;

static void mm_task_fn(void *arg, int ith, int nth)
{
    const mm_task_t *t = arg;
    const tdm_bweight_t *w = t->w;
    if (!is_quant(w->wtype)) {
        /* Rows in blocks of 4 (the kernels' row tile). */
        int64_t lo, hi, nblk = (w->rows + 3) / 4;
        split_range(nblk, ith, nth, &lo, &hi);
        lo *= 4;
        hi = hi * 4 < w->rows ? hi * 4 : w->rows;
        if (lo < hi)
            t->k->fmatmul(w, t->act, t->n, t->y, t->ldy, lo, hi);
        return;
    }
    const size_t astride = tdm_cpu_act_stride(w->k);
    const uint8_t *act = t->act;
    const int64_t ntb = (t->n + TDM_CPU_MM_TOKENS - 1) / TDM_CPU_MM_TOKENS;
    if (w->n_groups >= 2 * nth || ntb < 2 * nth) {
        /* Split the row groups; walk token blocks inside. */
        int64_t g0, g1;
        split_range(w->n_groups, ith, nth, &g0, &g1);
        if (g0 >= g1)
            return;
        for (int64_t t0 = 0; t0 < t->n; t0 += TDM_CPU_MM_TOKENS) {
            int64_t nt = t->n - t0 < TDM_CPU_MM_TOKENS ? t->n - t0 : TDM_CPU_MM_TOKENS;
            t->k->qmatmul(w, act + (size_t)t0 * astride, nt, t->y + t0 * t->ldy, t->ldy, g0, g1);
        }
    } else {
        /* Few rows, many tokens: split the token blocks. */
        int64_t b0, b1;
        split_range(ntb, ith, nth, &b0, &b1);
        for (int64_t b = b0; b < b1; b++) {
            int64_t t0 = b * TDM_CPU_MM_TOKENS;
            int64_t nt = t->n - t0 < TDM_CPU_MM_TOKENS ? t->n - t0 : TDM_CPU_MM_TOKENS;
            t->k->qmatmul(w, act + (size_t)t0 * astride, nt, t->y + t0 * t->ldy, t->ldy, 0,
                          w->n_groups);
        }
    }
}

static void cpu_matmul(tdm_backend_t *be, const tdm_bweight_t *w, const void *act, int64_t n,
                       float *y, int64_t ldy)
{
    cpu_backend_t *cb = cpu_of(be);
    if (n <= 0)
        return;
    mm_task_t t = {cb->k, w, act, n, y, ldy};
    if (w->rows * w->k * n < TDM_CPU_SMALL_OP)
        mm_task_fn(&t, 0, 1);
    else
        tdm_threadpool_run(cb->pool, mm_task_fn, &t);
}

/* ---- embed ---- */

/* Row r of w as f32; the same scalar code for every ISA (it is cheap). */
static void embed_row(const tdm_bweight_t *w, int64_t r, float *out)
{
    const int64_t k = w->k;
    if (r < 0 || r >= w->rows) { /* ids are checked by the engine; never read outside */
        memset(out, 0, (size_t)k * sizeof(float));
        return;
    }
    if (w->wtype == TDM_DTYPE_F32) {
        memcpy(out, (const float *)w->data + r * k, (size_t)k * sizeof(float));
        return;
    }
    if (w->wtype == TDM_DTYPE_F16) {
        const uint16_t *s = (const uint16_t *)w->data + r * k;
        for (int64_t j = 0; j < k; j++)
            out[j] = tdm_f16_to_f32(s[j]);
        return;
    }
    if (w->wtype == TDM_DTYPE_BF16) {
        const uint16_t *s = (const uint16_t *)w->data + r * k;
        for (int64_t j = 0; j < k; j++)
            out[j] = tdm_cpu_u2f((uint32_t)s[j] << 16);
        return;
    }
    /* The integer form's order (tandem/qform.h): the same bits as the
     * GGUF dequantization. */
    const uint32_t pk = w->pk;
    const int nsub = pk & TDM_CPU_PK_SUB16 ? 2 : 1;
    const uint8_t *grp = (const uint8_t *)w->data + (size_t)(r / TDM_CPU_RG) * w->group_bytes;
    const int64_t i = r % TDM_CPU_RG;
    for (int64_t b = 0; b < w->nb; b++) {
        const uint8_t *qs = grp + (size_t)b * (pk & TDM_CPU_PK_NIB ? 256 : 512) + (size_t)i * 4;
        for (int e = 0; e < TDM_QK; e++) {
            const int h = e / (TDM_QK / nsub);
            float d = tdm_cpu_wscale(w, grp, 0, b, h, i);
            float m = pk & TDM_CPU_PK_MIN ? tdm_cpu_wscale(w, grp, 1, b, h, i) : 0.0f;
            int32_t u;
            if (pk & TDM_CPU_PK_NIB)
                u = (qs[(e % 16) / 4 * 64 + e % 4] >> (e / 16 * 4)) & 15;
            else
                u = qs[e / 4 * 64 + e % 4];
            float v = d * (float)(u - w->bias);
            out[b * TDM_QK + e] = pk & TDM_CPU_PK_MIN ? v + m : v;
        }
    }
}

typedef struct embed_task {
    const tdm_bweight_t *w;
    const int32_t *ids;
    int64_t n;
    float *out;
} embed_task_t;

static void embed_task_fn(void *arg, int ith, int nth)
{
    const embed_task_t *t = arg;
    int64_t lo, hi;
    split_range(t->n, ith, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++)
        embed_row(t->w, t->ids[r], t->out + r * t->w->k);
}

static void cpu_embed(tdm_backend_t *be, const tdm_bweight_t *w, const int32_t *ids, int64_t n,
                      float *out)
{
    embed_task_t t = {w, ids, n, out};
    if (n * w->k < TDM_CPU_SMALL_OP)
        embed_task_fn(&t, 0, 1);
    else
        tdm_threadpool_run(cpu_of(be)->pool, embed_task_fn, &t);
}

/* ---- rmsnorm ---- */

typedef struct norm_task {
    const tdm_cpu_kernels_t *k;
    const float *x, *w;
    int64_t n, d;
    float eps;
    float *out;
} norm_task_t;

static void norm_task_fn(void *arg, int ith, int nth)
{
    const norm_task_t *t = arg;
    int64_t lo, hi;
    split_range(t->n, ith, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        const float *x = t->x + r * t->d;
        float mean = t->k->sumsq(x, t->d) / (float)t->d;
        float scale = 1.0f / sqrtf(mean + t->eps);
        t->k->scale_mul(x, scale, t->w, t->d, t->out + r * t->d);
    }
}

static void cpu_rmsnorm(tdm_backend_t *be, const float *x, const float *w, int64_t n, int64_t d,
                        float eps, float *out)
{
    cpu_backend_t *cb = cpu_of(be);
    norm_task_t t = {cb->k, x, w, n, d, eps, out};
    if (n * d < TDM_CPU_SMALL_OP)
        norm_task_fn(&t, 0, 1);
    else
        tdm_threadpool_run(cb->pool, norm_task_fn, &t);
}

/* ---- rope ---- */

typedef struct rope_task {
    float *x;
    const int32_t *pos;
    int64_t n;
    int32_t n_heads, head_dim, n_rot;
    const double *freq; /* [n_rot / 2] */
    float *cs;          /* [n][n_rot / 2][2], or NULL: no table */
    int fill;           /* compute cs (else it holds these positions' values) */
} rope_task_t;

/* The angles are computed in double (pow, sin, cos of libm) and rounded to
 * float once, so they do not depend on the ISA, and hardly on the libm. */
static void rope_angles(const rope_task_t *t, int64_t r, float *cs)
{
    for (int32_t i = 0; i < t->n_rot / 2; i++) {
        double a = (double)t->pos[r] * t->freq[i];
        cs[2 * i] = (float)cos(a);
        cs[2 * i + 1] = (float)sin(a);
    }
}

static void rope_task_fn(void *arg, int ith, int nth)
{
    const rope_task_t *t = arg;
    int64_t lo, hi;
    split_range(t->n, ith, nth, &lo, &hi);
    const int32_t half = t->n_rot / 2;
    float local[1024];
    for (int64_t r = lo; r < hi; r++) {
        float *cs = t->cs != NULL ? t->cs + r * 2 * half : local;
        if (t->cs == NULL || t->fill)
            rope_angles(t, r, cs);
        float *row = t->x + r * (int64_t)t->n_heads * t->head_dim;
        for (int32_t h = 0; h < t->n_heads; h++) {
            float *v = row + (int64_t)h * t->head_dim;
            for (int32_t i = 0; i < half; i++) {
                float x0 = v[2 * i], x1 = v[2 * i + 1];
                v[2 * i] = x0 * cs[2 * i] - x1 * cs[2 * i + 1];
                v[2 * i + 1] = x0 * cs[2 * i + 1] + x1 * cs[2 * i];
            }
        }
    }
}

static void cpu_rope(tdm_backend_t *be, float *x, const int32_t *pos, int64_t n, int32_t n_heads,
                     int32_t head_dim, int32_t n_rot, float theta)
{
    cpu_backend_t *cb = cpu_of(be);
    double freq[512];
    if (n_rot > head_dim)
        n_rot = head_dim;
    if (n_rot > 1024)
        n_rot = 1024; /* the engine checks head dims; never overrun the tables */
    for (int32_t i = 0; i < n_rot / 2; i++)
        freq[i] = pow((double)theta, -2.0 * i / (double)n_rot);
    rope_task_t t = {x, pos, n, n_heads, head_dim, n_rot, freq, NULL, 1};
    if (n * (n_rot / 2) <= TDM_CPU_ROPE_CACHE) {
        t.cs = cb->rope_cs;
        t.fill = !(cb->rope_n == n && cb->rope_n_rot == n_rot && cb->rope_theta == theta &&
                   memcmp(cb->rope_pos, pos, (size_t)n * sizeof(int32_t)) == 0);
        if (t.fill) {
            memcpy(cb->rope_pos, pos, (size_t)n * sizeof(int32_t));
            cb->rope_n = n;
            cb->rope_n_rot = n_rot;
            cb->rope_theta = theta;
        }
    }
    if (n * n_heads * head_dim < TDM_CPU_SMALL_OP)
        rope_task_fn(&t, 0, 1);
    else
        tdm_threadpool_run(cb->pool, rope_task_fn, &t);
}

/* ---- elementwise ---- */

typedef struct ew_task {
    const tdm_cpu_kernels_t *k;
    int op; /* 0 swiglu, 1 add */
    const float *a, *b;
    float *out;
    int64_t count;
} ew_task_t;

static void ew_task_fn(void *arg, int ith, int nth)
{
    const ew_task_t *t = arg;
    int64_t lo, hi;
    split_range((t->count + 63) / 64, ith, nth, &lo, &hi);
    lo *= 64;
    hi = hi * 64 < t->count ? hi * 64 : t->count;
    if (lo >= hi)
        return;
    if (t->op == 0)
        t->k->swiglu(t->a + lo, t->b + lo, hi - lo, t->out + lo);
    else
        t->k->add(t->out + lo, t->b + lo, hi - lo);
}

static void run_ew(cpu_backend_t *cb, ew_task_t *t)
{
    if (t->count < TDM_CPU_SMALL_OP)
        ew_task_fn(t, 0, 1);
    else
        tdm_threadpool_run(cb->pool, ew_task_fn, t);
}

static void cpu_swiglu(tdm_backend_t *be, const float *gate, const float *up, int64_t n, int64_t f,
                       float *out)
{
    ew_task_t t = {cpu_of(be)->k, 0, gate, up, out, n * f};
    run_ew(cpu_of(be), &t);
}

static void cpu_add(tdm_backend_t *be, float *x, const float *y, int64_t count)
{
    ew_task_t t = {cpu_of(be)->k, 1, x, y, x, count};
    run_ew(cpu_of(be), &t);
}

static void cpu_gather_rows(tdm_backend_t *be, const float *src, const int32_t *idx, int64_t n,
                            int64_t d, float *dst)
{
    for (int64_t t = 0; t < n; t++)
        memmove(dst + t * d, src + (int64_t)idx[t] * d, (size_t)d * sizeof(float));
}

/* The greedy choice of each row: the first maximum, as the sampler's. The
 * CPU backend has it too so the engine's device-side greedy path is
 * exercised (and held to the sampler's answer) on every machine. */
static void cpu_argmax(tdm_backend_t *be, const float *logits, int64_t n, int64_t vocab,
                       int32_t *out)
{
    for (int64_t t = 0; t < n; t++) {
        const float *x = logits + t * vocab;
        float best = -INFINITY;
        int32_t at = 0;
        for (int64_t j = 0; j < vocab; j++)
            if (x[j] > best) { /* NaN never wins */
                best = x[j];
                at = (int32_t)j;
            }
        out[t] = at;
    }
}

/* ---- KV blocks to and from host memory (the table's kv_out / kv_in) ----
 * The CPU's cache is host memory and the engine reads it in place; these
 * copy at once so that the engine's staged path (what a GPU takes) runs
 * and is tested on every machine (TANDEM_ENGINE_STAGE=1). */

static void cpu_kv_move(uint16_t *const *cache_k, uint16_t *const *cache_v, int32_t n_layer,
                        int64_t block_elems, const int32_t *ids, const int32_t *n_tok,
                        int32_t n_blocks, int64_t kv_dim, uint16_t *host, bool out)
{
    for (int32_t b = 0; b < n_blocks; b++)
        for (int32_t t = 0; t < 2 * n_layer; t++) {
            uint16_t *cache =
                (t < n_layer ? cache_k[t] : cache_v[t - n_layer]) + (int64_t)ids[b] * block_elems;
            uint16_t *h = host + ((int64_t)b * 2 * n_layer + t) * block_elems;
            size_t bytes = (size_t)n_tok[b] * (size_t)kv_dim * sizeof(uint16_t);
            memcpy(out ? h : cache, out ? cache : h, bytes);
        }
}

static uint64_t cpu_kv_out(tdm_backend_t *be, uint16_t *const *cache_k, uint16_t *const *cache_v,
                           int32_t n_layer, int64_t block_elems, const int32_t *ids,
                           const int32_t *n_tok, int32_t n_blocks, int64_t kv_dim, uint16_t *host)
{
    (void)be;
    cpu_kv_move(cache_k, cache_v, n_layer, block_elems, ids, n_tok, n_blocks, kv_dim, host, true);
    return 1; /* done already */
}

static uint64_t cpu_kv_in(tdm_backend_t *be, uint16_t *const *cache_k, uint16_t *const *cache_v,
                          int32_t n_layer, int64_t block_elems, const int32_t *ids,
                          const int32_t *n_tok, int32_t n_blocks, int64_t kv_dim,
                          const uint16_t *host)
{
    (void)be;
    cpu_kv_move(cache_k, cache_v, n_layer, block_elems, ids, n_tok, n_blocks, kv_dim,
                (uint16_t *)host, false);
    return 1;
}

static void cpu_kv_wait(tdm_backend_t *be, uint64_t ticket)
{
    (void)be;
    (void)ticket;
}

/* ---- KV cache ---- */

typedef struct kvw_task {
    const tdm_cpu_kernels_t *k;
    const float *kx, *vx;
    const int32_t *slot;
    int64_t n, kv_dim;
    uint16_t *ck, *cv;
} kvw_task_t;

static void kvw_task_fn(void *arg, int ith, int nth)
{
    const kvw_task_t *t = arg;
    int64_t lo, hi;
    split_range(t->n, ith, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        if (t->slot[r] < 0)
            continue; /* a padding row */
        size_t off = (size_t)t->slot[r] * (size_t)t->kv_dim;
        t->k->to_f16(t->kx + r * t->kv_dim, t->kv_dim, t->ck + off);
        t->k->to_f16(t->vx + r * t->kv_dim, t->kv_dim, t->cv + off);
    }
}

static void cpu_kv_write(tdm_backend_t *be, const float *k, const float *v, const int32_t *slot,
                         int64_t n, int64_t kv_dim, uint16_t *cache_k, uint16_t *cache_v)
{
    kvw_task_t t = {cpu_of(be)->k, k, v, slot, n, kv_dim, cache_k, cache_v};
    if (n * kv_dim < TDM_CPU_SMALL_OP)
        kvw_task_fn(&t, 0, 1);
    else
        tdm_threadpool_run(cpu_of(be)->pool, kvw_task_fn, &t);
}

/* ---- attention ---- */

typedef struct attn_task {
    const tdm_cpu_kernels_t *k;
    const tdm_attn_params_t *p;
    const float *q;
    const uint16_t *ck, *cv;
    float *out;
    int32_t heads_per_item; /* query heads done together (see cpu_attention) */
    int64_t n_items;
    atomic_llong next; /* items are taken in runs: causal rows differ in cost */
} attn_task_t;

static void attn_task_fn(void *arg, int ith, int nth)
{
    attn_task_t *t = arg;
    const int32_t items_per_row = t->p->n_heads / t->heads_per_item;
    /* Runs of up to 4 items: a kernel knows the item it computes next and
     * prefetches its first positions; short runs still balance rows of
     * different lengths. */
    int64_t run = t->n_items / (4 * (int64_t)nth);
    run = run < 1 ? 1 : run > 4 ? 4 : run;
    for (;;) {
        int64_t i0 = atomic_fetch_add_explicit(&t->next, run, memory_order_relaxed);
        if (i0 >= t->n_items)
            break;
        int64_t i1 = i0 + run < t->n_items ? i0 + run : t->n_items;
        for (int64_t i = i0; i < i1; i++) {
            int64_t row = i / items_per_row, nrow = -1;
            int32_t h0 = (int32_t)(i % items_per_row) * t->heads_per_item, nh0 = 0;
            if (i + 1 < i1) {
                nrow = (i + 1) / items_per_row;
                nh0 = (int32_t)((i + 1) % items_per_row) * t->heads_per_item;
            }
            t->k->attn(t->p, t->q, t->ck, t->cv, t->out, row, h0, h0 + t->heads_per_item, nrow,
                       nh0);
        }
    }
}

static void cpu_attention(tdm_backend_t *be, const tdm_attn_params_t *p, const float *q,
                          const uint16_t *cache_k, const uint16_t *cache_v, float *out)
{
    cpu_backend_t *cb = cpu_of(be);
    if (p->n <= 0)
        return;
    int32_t grp = p->n_heads / p->n_kv_heads;
    /* An item is one row's heads of one kv head (they share the K/V rows
     * and overlap their softmax chains: 1.5x faster per head, measured);
     * single heads when there are fewer such items than threads; with
     * rows to spare, several kv heads (up to TDM_CPU_MAX_HEADS_G heads),
     * whose K/V rows are adjacent in the cache: each position is one
     * contiguous read, which the hardware prefetchers follow better
     * (measured 10-15% faster at 32 rows x 128 positions). Any split gives
     * the same bits. */
    int32_t hpi = p->n * p->n_kv_heads >= cb->n_threads ? grp : 1;
    if (hpi > TDM_CPU_MAX_HEADS_G)
        hpi = 1;
    if (hpi == grp && p->n >= 2 * cb->n_threads)
        for (int32_t g = p->n_kv_heads; g > 1; g--)
            if (p->n_kv_heads % g == 0 && g * grp <= TDM_CPU_MAX_HEADS_G) {
                hpi = g * grp;
                break;
            }
    attn_task_t t;
    t.k = cb->k;
    t.p = p;
    t.q = q;
    t.ck = cache_k;
    t.cv = cache_v;
    t.out = out;
    t.heads_per_item = hpi;
    t.n_items = p->n * (p->n_heads / hpi);
    atomic_init(&t.next, 0);
    if (t.n_items == 1)
        attn_task_fn(&t, 0, 1);
    else
        tdm_threadpool_run(cb->pool, attn_task_fn, &t);
}

/* ---- creation ---- */

static void cpu_destroy(tdm_backend_t *be)
{
    if (be == NULL)
        return;
    cpu_backend_t *cb = cpu_of(be);
    tdm_threadpool_destroy(cb->pool);
    free(cb->rope_pos);
    free(cb->rope_cs);
    free(cb);
}

const char *tdm_cpu_isa_name(tdm_cpu_isa_t isa)
{
    switch (isa) {
    case TDM_CPU_ISA_AUTO: return "auto";
    case TDM_CPU_ISA_SCALAR: return "scalar";
    case TDM_CPU_ISA_AVX2: return "avx2";
    case TDM_CPU_ISA_AVX512: return "avx512";
    }
    return "unknown";
}

tdm_cpu_isa_t tdm_cpu_isa_detect(void)
{
    tdm_cpu_features_t f;
    tdm_cpu_features_get(&f);
    return f.avx512 ? TDM_CPU_ISA_AVX512 : f.avx2 ? TDM_CPU_ISA_AVX2 : TDM_CPU_ISA_SCALAR;
}

int tdm_backend_cpu_threads(const tdm_backend_t *be)
{
    if (be == NULL || be->ops->destroy != cpu_destroy)
        return 0;
    return ((const cpu_backend_t *)be)->n_threads;
}

tdm_status_t tdm_backend_cpu_create(int n_threads, tdm_cpu_isa_t isa, tdm_backend_t **out)
{
    tdm_cpu_features_t f;
    tdm_cpu_features_get(&f);
    const char *vnni_env = getenv("TANDEM_CPU_AVXVNNI"); /* "0": test the AVX2 path without it */
    if (vnni_env != NULL && strcmp(vnni_env, "0") == 0)
        f.avx_vnni = 0;
    tdm_cpu_isa_t best = f.avx512 ? TDM_CPU_ISA_AVX512
                         : f.avx2 ? TDM_CPU_ISA_AVX2
                                  : TDM_CPU_ISA_SCALAR;
    if (isa == TDM_CPU_ISA_AUTO) {
        const char *env = getenv("TANDEM_CPU_ISA");
        if (env == NULL || env[0] == '\0' || strcmp(env, "auto") == 0)
            isa = best;
        else if (strcmp(env, "scalar") == 0)
            isa = TDM_CPU_ISA_SCALAR;
        else if (strcmp(env, "avx2") == 0)
            isa = TDM_CPU_ISA_AVX2;
        else if (strcmp(env, "avx512") == 0)
            isa = TDM_CPU_ISA_AVX512;
        else {
            tdm_log_error("kernels", "TANDEM_CPU_ISA=%s: expected scalar, avx2 or avx512", env);
            return TDM_ERR_INVALID;
        }
    }
    const tdm_cpu_kernels_t *k;
    switch (isa) {
    case TDM_CPU_ISA_SCALAR: k = &tdm_cpu_kernels_scalar; break;
    case TDM_CPU_ISA_AVX2:
        if (!f.avx2) {
            tdm_log_error("kernels", "this CPU lacks AVX2/FMA/F16C (asked for the avx2 kernels)");
            return TDM_ERR_UNSUPPORTED;
        }
        k = f.avx_vnni ? &tdm_cpu_kernels_avx2_vnni : &tdm_cpu_kernels_avx2;
        break;
    case TDM_CPU_ISA_AVX512:
        if (!f.avx512) {
            tdm_log_error("kernels",
                          "this CPU lacks AVX-512 F/BW/VL/DQ/VNNI (asked for the avx512 kernels)");
            return TDM_ERR_UNSUPPORTED;
        }
        k = &tdm_cpu_kernels_avx512;
        break;
    default: tdm_log_error("kernels", "unknown CPU ISA %d", (int)isa); return TDM_ERR_INVALID;
    }

    cpu_backend_t *cb = calloc(1, sizeof(*cb));
    if (cb == NULL)
        return TDM_ERR_NOMEM;
    tdm_status_t st = TDM_ERR_NOMEM;
    cb->rope_cs = malloc(TDM_CPU_ROPE_CACHE * 2 * sizeof(float));
    cb->rope_pos = malloc(TDM_CPU_ROPE_CACHE * sizeof(int32_t));
    if (cb->rope_cs == NULL || cb->rope_pos == NULL)
        goto err_free_rope;
    st = tdm_threadpool_create(n_threads, &cb->pool);
    if (st != TDM_OK)
        goto err_free_rope;
    cb->n_threads = tdm_threadpool_size(cb->pool);
    cb->isa = isa;
    cb->k = k;
    cb->ops = (tdm_backend_ops_t){
        .name = isa == TDM_CPU_ISA_AVX512 ? "cpu-avx512"
                : isa == TDM_CPU_ISA_AVX2 ? "cpu-avx2"
                                          : "cpu-scalar",
        .destroy = cpu_destroy,
        .buf_alloc = cpu_buf_alloc,
        .buf_free = cpu_buf_free,
        .copy_to = cpu_copy,
        .copy_from = cpu_copy,
        .sync = cpu_sync,
        .weight_load = cpu_weight_load,
        .weight_free = cpu_weight_free,
        .weight_uses_source = cpu_weight_uses_source,
        .act_size = cpu_act_size,
        .act_prepare = cpu_act_prepare,
        .matmul = cpu_matmul,
        .embed = cpu_embed,
        .rmsnorm = cpu_rmsnorm,
        .rope = cpu_rope,
        .swiglu = cpu_swiglu,
        .add = cpu_add,
        .gather_rows = cpu_gather_rows,
        .kv_write = cpu_kv_write,
        .attention = cpu_attention,
        .argmax = cpu_argmax,
        .kv_out = cpu_kv_out,
        .kv_in = cpu_kv_in,
        .kv_wait = cpu_kv_wait,
    };
    cb->base.ops = &cb->ops;
    tdm_log_info("kernels", "cpu backend: %s kernels%s, %d threads", tdm_cpu_isa_name(isa),
                 isa == TDM_CPU_ISA_AVX2 ? (f.avx_vnni ? " (with AVX-VNNI)" : " (no VNNI)") : "",
                 cb->n_threads);
    *out = &cb->base;
    return TDM_OK;

err_free_rope:
    free(cb->rope_pos);
    free(cb->rope_cs);
    free(cb);
    return st;
}
