/* The Llama forward pass over one step's batch, through the backend table.
 *
 * Per layer, for the n rows (tokens of all sequences in the step):
 *   xn = rmsnorm(x) * attn_norm
 *   q, k, v = xn Wq^T, xn Wk^T, xn Wv^T     (n, n_head*hd) (n, kv) (n, kv)
 *   rope(q), rope(k); k, v -> cache slots (f16)
 *   att = attention(q, cache)                (reads the cache, never k/v)
 *   x += att Wo^T
 *   xn = rmsnorm(x) * ffn_norm
 *   x += (silu(xn Wgate^T) * (xn Wup^T)) Wdown^T
 * then the rows that need logits are gathered, normed, and multiplied by the
 * output matrix. Nothing is allocated here.
 *
 * Decode steps (one row per sequence, every row wants logits) are padded to
 * a power-of-two bucket of rows when the backend can replay graphs: the
 * padding rows read and write a KV block reserved for them, and since every
 * op is batch invariant they change no real row's result. The first step of
 * a bucket runs as usual (scratch buffers reach their size), the second is
 * captured into a graph (ops->graph_capture), later ones replay it: one
 * launch per step instead of hundreds. TANDEM_ENGINE_PAD=1 pads without
 * graphs (tests hold the padding to the same answers on the CPU);
 * TANDEM_GRAPHS=0 turns graphs off. */
#include <math.h>
#include <stdint.h>

#include "engine_internal.h"

/* Quantizes/copies x for weights of wtype into e->act, unless the previous
 * call left the same input prepared for the same type; shows x to the
 * activation hook as the input of matrix `which` of layer il. */
static void prepare(tdm_engine_t *e, int32_t il, tdm_matrix_t which, uint32_t wtype, const float *x,
                    int64_t n, int64_t k, uint32_t *prepared)
{
    if (e->act_hook != NULL)
        e->act_hook(e->act_user, il, which, x, n, k);
    if (*prepared == wtype)
        return;
    e->be->ops->act_prepare(e->be, wtype, x, n, k, e->act);
    *prepared = wtype;
}

/* What one forward computes, from the inputs already uploaded: the part a
 * graph captures. */
typedef struct fwd_args {
    tdm_engine_t *e;
    int64_t n;
    int32_t n_logits;
    tdm_attn_params_t ap;
} fwd_args_t;

static void forward_compute(void *arg)
{
    const fwd_args_t *a = arg;
    tdm_engine_t *e = a->e;
    tdm_backend_t *be = e->be;
    const tdm_backend_ops_t *ops = be->ops;
    const tdm_model_t *m = e->model;
    const tdm_model_hparams_t *hp = &m->hp;
    const int64_t n = a->n, d = hp->n_embd, qd = (int64_t)hp->n_head * hp->head_dim;
    const int64_t kvd = e->kv_dim, ff = hp->n_ff;
    const uint32_t none = 0xffffffffu;
    const tdm_attn_params_t *ap = &a->ap;

    ops->embed(be, m->tok_embd, e->d_tokens, n, e->x);
    for (int32_t il = 0; il < hp->n_layer; il++) {
        const tdm_layer_weights_t *L = &m->layers[il];
        uint32_t prepared = none;
        ops->rmsnorm(be, e->x, L->attn_norm, n, d, hp->norm_eps, e->xn);
        prepare(e, il, TDM_MATRIX_Q, L->q_type, e->xn, n, d, &prepared);
        ops->matmul(be, L->wq, e->act, n, e->q, qd);
        prepare(e, il, TDM_MATRIX_K, L->k_type, e->xn, n, d, &prepared);
        ops->matmul(be, L->wk, e->act, n, e->k, kvd);
        prepare(e, il, TDM_MATRIX_V, L->v_type, e->xn, n, d, &prepared);
        ops->matmul(be, L->wv, e->act, n, e->v, kvd);
        ops->rope(be, e->q, e->d_pos, n, hp->n_head, hp->head_dim, hp->n_rot, hp->rope_theta);
        ops->rope(be, e->k, e->d_pos, n, hp->n_head_kv, hp->head_dim, hp->n_rot, hp->rope_theta);
        ops->kv_write(be, e->k, e->v, e->d_slot, n, kvd, e->cache_k[il], e->cache_v[il]);
        ops->attention(be, ap, e->q, e->cache_k[il], e->cache_v[il], e->att);
        prepared = none;
        prepare(e, il, TDM_MATRIX_O, L->o_type, e->att, n, qd, &prepared);
        ops->matmul(be, L->wo, e->act, n, e->tmp, d);
        ops->add(be, e->x, e->tmp, n * d);

        prepared = none;
        ops->rmsnorm(be, e->x, L->ffn_norm, n, d, hp->norm_eps, e->xn);
        prepare(e, il, TDM_MATRIX_GATE, L->gate_type, e->xn, n, d, &prepared);
        ops->matmul(be, L->w_gate, e->act, n, e->gate, ff);
        prepare(e, il, TDM_MATRIX_UP, L->up_type, e->xn, n, d, &prepared);
        ops->matmul(be, L->w_up, e->act, n, e->up, ff);
        ops->swiglu(be, e->gate, e->up, n, ff, e->gate);
        prepared = none;
        prepare(e, il, TDM_MATRIX_DOWN, L->down_type, e->gate, n, ff, &prepared);
        ops->matmul(be, L->w_down, e->act, n, e->tmp, d);
        ops->add(be, e->x, e->tmp, n * d);
    }
    if (a->n_logits > 0) {
        uint32_t prepared = none;
        ops->gather_rows(be, e->x, e->d_logit_idx, a->n_logits, d, e->hid);
        ops->rmsnorm(be, e->hid, m->output_norm, a->n_logits, d, hp->norm_eps, e->hid);
        prepare(e, -1, TDM_MATRIX_OUTPUT, m->output_type, e->hid, a->n_logits, d, &prepared);
        ops->matmul(be, m->output, e->act, a->n_logits, e->logits, hp->n_vocab);
    }
}

/* The bucket a decode step of n rows is padded to (0: not a decode step,
 * or no room for the bucket): one table and one logits row per row. */
static int32_t decode_bucket(const tdm_engine_t *e, int32_t n_rows, int32_t n_tables,
                             int32_t n_logits)
{
    if (!e->pad_decode || n_rows != n_tables || n_rows != n_logits || n_rows <= 0)
        return 0;
    for (int32_t i = 0; i < n_rows; i++)
        if (e->h_table[i] != i || e->h_logit_idx[i] != i)
            return 0;
    int32_t b = 1, slot = 0;
    while (b < n_rows) {
        b <<= 1;
        slot++;
    }
    if (b > e->cfg.max_num_seqs || b > e->max_rows || b > e->max_logits ||
        slot >= TDM_ENGINE_GRAPH_BUCKETS)
        return 0;
    return b;
}

/* The longest and shortest runs of consecutive rows reading one table:
 * the attention hints (a decode step: 1 and 1; a lone prefill chunk: n). */
static void table_runs(const int32_t *table_of_row, int64_t n, int32_t *longest, int32_t *shortest)
{
    int32_t lo = INT32_MAX, hi = 0;
    for (int64_t t = 0; t < n;) {
        int64_t u = t + 1;
        while (u < n && table_of_row[u] == table_of_row[t])
            u++;
        int32_t len = (int32_t)(u - t);
        lo = len < lo ? len : lo;
        hi = len > hi ? len : hi;
        t = u;
    }
    *longest = hi;
    *shortest = n > 0 ? lo : 0;
}

tdm_status_t tdm_engine_forward(tdm_engine_t *e, int32_t n_rows, int32_t n_tables, int32_t n_logits,
                                bool to_host)
{
    tdm_backend_t *be = e->be;
    const tdm_backend_ops_t *ops = be->ops;
    const tdm_model_hparams_t *hp = &e->model->hp;

    int32_t bucket = decode_bucket(e, n_rows, n_tables, n_logits);
    if (bucket > n_rows) {
        int32_t bs = e->cfg.block_size;
        for (int32_t r = n_rows; r < bucket; r++) {
            e->h_tokens[r] = 0;
            e->h_pos[r] = 0;
            e->h_slot[r] = e->pad_block * bs;
            e->h_ctx[r] = 1;
            e->h_table[r] = r;
            e->h_logit_idx[r] = r;
            e->h_tables[(size_t)r * (size_t)e->max_blocks] = e->pad_block;
        }
        n_rows = n_tables = n_logits = bucket;
    }
    const int64_t n = n_rows;
    ops->copy_to(be, e->d_tokens, e->h_tokens, (size_t)n * sizeof(int32_t));
    ops->copy_to(be, e->d_pos, e->h_pos, (size_t)n * sizeof(int32_t));
    ops->copy_to(be, e->d_slot, e->h_slot, (size_t)n * sizeof(int32_t));
    ops->copy_to(be, e->d_ctx, e->h_ctx, (size_t)n * sizeof(int32_t));
    ops->copy_to(be, e->d_table, e->h_table, (size_t)n * sizeof(int32_t));
    ops->copy_to(be, e->d_tables, e->h_tables,
                 (size_t)n_tables * (size_t)e->max_blocks * sizeof(int32_t));
    ops->copy_to(be, e->d_logit_idx, e->h_logit_idx, (size_t)n_logits * sizeof(int32_t));

    fwd_args_t args = {
        .e = e,
        .n = n,
        .n_logits = n_logits,
        .ap =
            {
                .n = n,
                .n_heads = hp->n_head,
                .n_kv_heads = hp->n_head_kv,
                .head_dim = hp->head_dim,
                .block_size = e->cfg.block_size,
                .scale = 1.0f / sqrtf((float)hp->head_dim),
                .ctx_len = e->d_ctx,
                .block_tables = e->d_tables,
                .table_of_row = e->d_table,
                .bt_stride = e->max_blocks,
            },
    };
    table_runs(e->h_table, n, &args.ap.longest_run, &args.ap.shortest_run);
    int slot = -1;
    if (bucket > 0 && e->use_graphs)
        for (slot = 0; (1 << slot) < bucket; slot++) {
        }
    if (slot >= 0 && e->graphs[slot] == NULL && e->graph_state[slot] == 1) {
        e->graphs[slot] = ops->graph_capture(be, forward_compute, &args);
        e->graph_state[slot] = e->graphs[slot] != NULL ? 2 : 3; /* 3: capture failed, never again */
    }
    if (slot >= 0 && e->graphs[slot] != NULL) {
        ops->graph_launch(be, e->graphs[slot]);
    } else {
        forward_compute(&args);
        if (slot >= 0 && e->graph_state[slot] == 0)
            e->graph_state[slot] = 1; /* warmed up: capture next time */
    }
    if (n_logits > 0 && to_host)
        ops->copy_from(be, e->h_logits, e->logits,
                       (size_t)n_logits * (size_t)hp->n_vocab * sizeof(float));
    ops->sync(be);
    return TDM_OK;
}
