/* tandem CPU backend: the scalar kernels. They define the canonical
 * arithmetic (see cpu_internal.h) that the SIMD kernels reproduce bit for
 * bit, and they run where the CPU has no AVX2. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_internal.h"

/* ---- quantized matmul ---- */

/* Packed code of element e of row i in a block's qs. */
static int32_t wcode(const uint8_t *qs, uint32_t pk, int64_t i, int e)
{
    if (pk & TDM_CPU_PK_NIB) {
        uint8_t v = qs[(e % 16) / 4 * 64 + i * 4 + e % 4];
        return e < 16 ? v & 15 : v >> 4;
    }
    return qs[e / 4 * 64 + i * 4 + e % 4];
}

static void qmatmul_scalar(const tdm_bweight_t *w, const uint8_t *act, int64_t n, float *y,
                           int64_t ldy, int64_t g0, int64_t g1)
{
    const int64_t nb = w->nb;
    const size_t astride = tdm_cpu_act_stride(w->k);
    const uint32_t pk = w->pk;
    const int nsub = pk & TDM_CPU_PK_SUB16 ? 2 : 1, sub = TDM_QK / nsub;
    const size_t bbytes = pk & TDM_CPU_PK_NIB ? 256 : 512; /* packed qs bytes per block */
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *grp = (const uint8_t *)w->data + (size_t)g * w->group_bytes;
        int64_t nr = w->rows - g * TDM_CPU_RG;
        if (nr > TDM_CPU_RG)
            nr = TDM_CPU_RG;
        for (int64_t t = 0; t < n; t++) {
            const uint8_t *arow = act + (size_t)t * astride;
            const int16_t *aq = (const int16_t *)arow;
            const float *ad = (const float *)(arow + TDM_CPU_ACT_D(nb));
            /* per 32-block, or per half with SUB16 */
            const uint8_t *aux = arow + (nsub == 1 ? TDM_CPU_ACT_AUX(nb) : TDM_CPU_ACT_AUX16(nb));
            for (int64_t i = 0; i < nr; i++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    const uint8_t *qs = grp + (size_t)b * bbytes;
                    const int16_t *a = aq + b * TDM_QK;
                    for (int h = 0; h < nsub; h++) {
                        int32_t corr;
                        float dsa;
                        memcpy(&corr, aux + 4 * (b * nsub + h), 4);
                        memcpy(&dsa, aux + 4 * (b * nsub + h), 4);
                        int32_t isum = pk & TDM_CPU_PK_MIN ? 0 : corr;
                        for (int e = h * sub; e < (h + 1) * sub; e++)
                            isum += wcode(qs, pk, i, e) * a[e];
                        float cc = tdm_cpu_wscale(w, grp, 0, b, h, i) * ad[b];
                        acc = fmaf(cc, (float)isum, acc);
                        if (pk & TDM_CPU_PK_MIN)
                            acc = fmaf(tdm_cpu_wscale(w, grp, 1, b, h, i), dsa, acc);
                    }
                }
                y[t * ldy + g * TDM_CPU_RG + i] = acc;
            }
        }
    }
}

/* ---- float matmul ---- */

static float wval(const tdm_bweight_t *w, int64_t r, int64_t j)
{
    if (w->wtype == TDM_DTYPE_F16)
        return tdm_f16_to_f32(((const uint16_t *)w->data)[r * w->k + j]);
    if (w->wtype == TDM_DTYPE_BF16)
        return tdm_cpu_u2f((uint32_t)((const uint16_t *)w->data)[r * w->k + j] << 16);
    return ((const float *)w->data)[r * w->k + j];
}

static void fmatmul_scalar(const tdm_bweight_t *w, const float *x, int64_t n, float *y, int64_t ldy,
                           int64_t r0, int64_t r1)
{
    const int64_t k = w->k;
    for (int64_t t = 0; t < n; t++)
        for (int64_t r = r0; r < r1; r++) {
            float acc[TDM_CPU_LANES] = {0};
            for (int64_t j0 = 0; j0 < k; j0 += TDM_CPU_LANES)
                for (int l = 0; l < TDM_CPU_LANES; l++) {
                    int64_t j = j0 + l;
                    float wv = j < k ? wval(w, r, j) : 0.0f;
                    float xv = j < k ? x[t * k + j] : 0.0f;
                    acc[l] = fmaf(wv, xv, acc[l]);
                }
            y[t * ldy + r] = tdm_cpu_tree16(acc);
        }
}

/* ---- activation quantization ---- */

static void act_quant_scalar(int32_t bias, int has_min, const float *x, int64_t k, uint8_t *act)
{
    const int64_t nb = k / TDM_QK;
    int16_t *q = (int16_t *)act;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * TDM_QK;
        float amax = 0.0f;
        for (int j = 0; j < TDM_QK; j++)
            amax = tdm_cpu_maxps(fabsf(xb[j]), amax);
        float db = amax / TDM_CPU_ACT_QMAX;
        int32_t sum[2] = {0, 0};
        for (int j = 0; j < TDM_QK; j++) {
            int32_t v = 0;
            if (db != 0.0f) {
                float r = tdm_cpu_maxps(xb[j] / db, -TDM_CPU_ACT_QMAX);
                v = (int32_t)tdm_cpu_rint(tdm_cpu_minps(r, TDM_CPU_ACT_QMAX));
            }
            q[b * TDM_QK + j] = (int16_t)v;
            sum[j / 16] += v;
        }
        tdm_cpu_act_aux(act, nb, b, bias, has_min, db, sum[0], sum[1]);
    }
}
/* ---- row ops ---- */

static float sumsq_scalar(const float *x, int64_t d)
{
    float acc[TDM_CPU_LANES] = {0};
    for (int64_t j0 = 0; j0 < d; j0 += TDM_CPU_LANES)
        for (int l = 0; l < TDM_CPU_LANES; l++) {
            float v = j0 + l < d ? x[j0 + l] : 0.0f;
            acc[l] = fmaf(v, v, acc[l]);
        }
    return tdm_cpu_tree16(acc);
}

static void scale_mul_scalar(const float *x, float scale, const float *w, int64_t d, float *out)
{
    for (int64_t i = 0; i < d; i++)
        out[i] = (x[i] * scale) * w[i];
}

static void swiglu_scalar(const float *g, const float *u, int64_t count, float *out)
{
    for (int64_t i = 0; i < count; i++) {
        float e = tdm_cpu_expf(-g[i]);
        float s = g[i] / (1.0f + e);
        out[i] = s * u[i];
    }
}

static void add_scalar(float *x, const float *y, int64_t count)
{
    for (int64_t i = 0; i < count; i++)
        x[i] = x[i] + y[i];
}

static void to_f16_scalar(const float *x, int64_t count, uint16_t *out)
{
    for (int64_t i = 0; i < count; i++)
        out[i] = tdm_f32_to_f16(x[i]);
}

/* ---- attention ---- */

/* q . k of one position in the canonical 16-lane order. */
static float dot_qk(const float *q, const uint16_t *k, int64_t hd)
{
    float acc[TDM_CPU_LANES] = {0};
    for (int64_t j0 = 0; j0 < hd; j0 += TDM_CPU_LANES)
        for (int l = 0; l < TDM_CPU_LANES; l++) {
            int64_t j = j0 + l;
            float qv = j < hd ? q[j] : 0.0f;
            float kv = j < hd ? tdm_f16_to_f32(k[j]) : 0.0f;
            acc[l] = fmaf(qv, kv, acc[l]);
        }
    return tdm_cpu_tree16(acc);
}

/* One (row, head): the canonical online softmax. Per chunk of 16
 * positions: s = (q.k) * scale (-inf past ctx_len); mc = max(m, max s);
 * alpha = exp(m - mc) (exactly 1 when the max did not change, 0 on the
 * first chunk), l *= alpha, acc *= alpha, m = mc (no branch: SIMD kernels
 * run several heads side by side); p = exp(s - m); l += tree16(p);
 * acc[j] = fmaf(p, v[j], acc[j]) for each valid position in order.
 * out = acc / l. ctx_len <= 0 gives zeros. */
static void attn_head(const tdm_attn_params_t *p, const float *q, const uint16_t *ck,
                      const uint16_t *cv, float *out, int64_t t, int32_t h)
{
    const int64_t hd = p->head_dim;
    const int32_t grp = p->n_heads / p->n_kv_heads;
    const int32_t kvh = h / grp;
    const int64_t ctx = p->ctx_len[t];
    const int32_t *table = p->block_tables + (int64_t)p->table_of_row[t] * p->bt_stride;
    const float *qh = q + (t * p->n_heads + h) * hd;
    float *oh = out + (t * p->n_heads + h) * hd;
    float acc[1024];
    float *a = hd <= 1024 ? acc : oh; /* head dims above 1024 accumulate in place */
    for (int64_t j = 0; j < hd; j++)
        a[j] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int64_t c0 = 0; c0 < ctx; c0 += TDM_CPU_CHUNK) {
        int64_t nv = ctx - c0 < TDM_CPU_CHUNK ? ctx - c0 : TDM_CPU_CHUNK;
        float s[TDM_CPU_CHUNK], pr[TDM_CPU_CHUNK];
        int64_t off[TDM_CPU_CHUNK];
        tdm_cpu_kv_rows(p, table, c0, (int)nv, kvh, off);
        for (int64_t i = 0; i < TDM_CPU_CHUNK; i++)
            s[i] = i < nv ? dot_qk(qh, ck + off[i], hd) * p->scale : -INFINITY;
        float cm = s[0];
        for (int i = 1; i < TDM_CPU_CHUNK; i++)
            cm = tdm_cpu_maxps(s[i], cm);
        float mc = tdm_cpu_maxps(cm, m);
        float alpha = tdm_cpu_expf(m - mc);
        l = l * alpha;
        for (int64_t j = 0; j < hd; j++)
            a[j] = a[j] * alpha;
        m = mc;
        for (int i = 0; i < TDM_CPU_CHUNK; i++)
            pr[i] = tdm_cpu_expf(s[i] - m);
        l = l + tdm_cpu_tree16(pr);
        for (int64_t i = 0; i < nv; i++) {
            const uint16_t *v = cv + off[i];
            for (int64_t j = 0; j < hd; j++)
                a[j] = fmaf(pr[i], tdm_f16_to_f32(v[j]), a[j]);
        }
    }
    for (int64_t j = 0; j < hd; j++)
        oh[j] = ctx > 0 ? a[j] / l : 0.0f;
}

void tdm_cpu_attn_scalar(const tdm_attn_params_t *p, const float *q, const uint16_t *ck,
                         const uint16_t *cv, float *out, int64_t t, int32_t h0, int32_t h1,
                         int64_t tn, int32_t hn0)
{
    for (int32_t h = h0; h < h1; h++)
        attn_head(p, q, ck, cv, out, t, h);
}

const tdm_cpu_kernels_t tdm_cpu_kernels_scalar = {
    .qmatmul = qmatmul_scalar,
    .fmatmul = fmatmul_scalar,
    .act_quant = act_quant_scalar,
    .sumsq = sumsq_scalar,
    .scale_mul = scale_mul_scalar,
    .swiglu = swiglu_scalar,
    .add = add_scalar,
    .to_f16 = to_f16_scalar,
    .attn = tdm_cpu_attn_scalar,
};
