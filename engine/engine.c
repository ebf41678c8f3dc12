/* The engine: request intake, the scheduler (continuous batching with
 * chunked prefill, prefix caching, preemption by recompute), sampling and
 * the delivery of events.
 *
 * A step:
 *   1. take ops queued by other threads (new requests, cancels);
 *   2. give every running sequence its next tokens, oldest first: one token
 *      for a decoding sequence, a chunk of its prompt for one still in
 *      prefill, all under max_num_batched_tokens (prompt chunks also under
 *      the step-time bound, max_step_ms); when the pool has no block
 *      for a sequence, the newest running sequence is preempted (its blocks
 *      freed, it goes back to the head of the waiting queue and is later
 *      recomputed, from the prefix cache where its blocks survive);
 *   3. admit waiting sequences in arrival order while the token budget (and
 *      the step-time bound), max_num_seqs and free blocks allow, reusing
 *      cached prefix blocks;
 *   4. one forward over all rows; sample for every sequence whose computed
 *      tokens reach its last token; deliver events; retire finished ones. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_internal.h"
#include "tandem/log.h"
#include "tandem/utf8.h"

#define MOD "engine"

void tdm_engine_config_default(tdm_engine_config_t *c)
{
    memset(c, 0, sizeof(*c));
    c->threads = 0;
    c->max_num_seqs = 256;
    c->max_num_batched_tokens = 2048;
    c->max_model_len = 0;
    c->block_size = 16;
    c->kv_cache_bytes = 0;
    c->num_blocks = 0;
    c->enable_prefix_caching = false;
    c->isa = TDM_CPU_ISA_AUTO;
    c->device = "cpu";
    c->gpu_memory_utilization = 0.9f;
}

const char *tdm_finish_reason_str(tdm_finish_reason_t r)
{
    switch (r) {
    case TDM_FINISH_NONE: return "none";
    case TDM_FINISH_STOP: return "stop";
    case TDM_FINISH_LENGTH: return "length";
    case TDM_FINISH_CANCELLED: return "cancelled";
    case TDM_FINISH_ERROR: return "error";
    }
    return "unknown";
}

/* ------------------------------------------------------------ lifecycle */

static void *be_alloc(tdm_engine_t *e, size_t bytes, tdm_status_t *st)
{
    void *p = e->be->ops->buf_alloc(e->be, bytes > 0 ? bytes : 64);
    if (p == NULL)
        *st = TDM_ERR_NOMEM;
    return p;
}

static size_t max_act_size(const tdm_engine_t *e, int64_t rows)
{
    const tdm_model_t *m = e->model;
    const tdm_model_hparams_t *hp = &m->hp;
    int64_t kmax = hp->n_ff > hp->n_embd ? hp->n_ff : hp->n_embd;
    int64_t qd = (int64_t)hp->n_head * hp->head_dim;
    kmax = qd > kmax ? qd : kmax;
    size_t best = e->be->ops->act_size(m->output_type, rows, hp->n_embd);
    for (int32_t il = 0; il < hp->n_layer; il++) {
        const tdm_layer_weights_t *L = &m->layers[il];
        uint32_t types[] = {L->q_type,    L->k_type,  L->v_type,   L->o_type,
                            L->gate_type, L->up_type, L->down_type};
        for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
            size_t s = e->be->ops->act_size(types[i], rows, kmax);
            best = s > best ? s : best;
        }
    }
    return best;
}

static tdm_status_t alloc_buffers(tdm_engine_t *e)
{
    const tdm_model_hparams_t *hp = &e->model->hp;
    tdm_status_t st = TDM_OK;
    size_t R = (size_t)e->max_rows, L = (size_t)e->max_logits, f = sizeof(float);
    size_t d = (size_t)hp->n_embd, qd = (size_t)hp->n_head * (size_t)hp->head_dim;
    size_t kvd = (size_t)e->kv_dim, ff = (size_t)hp->n_ff, V = (size_t)hp->n_vocab;
    size_t tables = ((size_t)e->cfg.max_num_seqs + 1) * (size_t)e->max_blocks;
    size_t ilen = R > L ? R : L;
    int32_t **hs[] = {&e->h_tokens, &e->h_pos, &e->h_slot, &e->h_ctx, &e->h_table, &e->h_logit_idx};
    int32_t **ds[] = {&e->d_tokens, &e->d_pos, &e->d_slot, &e->d_ctx, &e->d_table, &e->d_logit_idx};
    for (size_t i = 0; i < 6; i++) {
        *hs[i] = malloc(ilen * sizeof(int32_t));
        if (*hs[i] == NULL)
            st = TDM_ERR_NOMEM;
        *ds[i] = be_alloc(e, ilen * sizeof(int32_t), &st);
    }
    e->h_tables = malloc(tables * sizeof(int32_t));
    if (e->h_tables == NULL)
        st = TDM_ERR_NOMEM;
    e->d_tables = be_alloc(e, tables * sizeof(int32_t), &st);
    e->x = be_alloc(e, R * d * f, &st);
    e->xn = be_alloc(e, R * d * f, &st);
    e->q = be_alloc(e, R * qd * f, &st);
    e->k = be_alloc(e, R * kvd * f, &st);
    e->v = be_alloc(e, R * kvd * f, &st);
    e->att = be_alloc(e, R * qd * f, &st);
    e->tmp = be_alloc(e, R * d * f, &st);
    e->gate = be_alloc(e, R * ff * f, &st);
    e->up = be_alloc(e, R * ff * f, &st);
    e->hid = be_alloc(e, L * d * f, &st);
    e->logits = be_alloc(e, L * V * f, &st);
    size_t act = max_act_size(e, (int64_t)R);
    e->act = be_alloc(e, act, &st);
    e->h_logits = malloc(L * V * f);
    e->h_argmax = malloc(L * sizeof(int32_t));
    e->h_srows = malloc(L * sizeof(*e->h_srows));
    e->h_slogprob = malloc(L * sizeof(float));
    if (e->h_logits == NULL || e->h_argmax == NULL || e->h_srows == NULL || e->h_slogprob == NULL)
        st = TDM_ERR_NOMEM;
    return st;
}

static void free_buffers(tdm_engine_t *e)
{
    tdm_backend_t *be = e->be;
    if (be == NULL)
        return;
    void *dev[] = {e->d_tokens,    e->d_pos,    e->d_slot, e->d_ctx, e->d_table,
                   e->d_logit_idx, e->d_tables, e->x,      e->xn,    e->q,
                   e->k,           e->v,        e->att,    e->tmp,   e->gate,
                   e->up,          e->hid,      e->logits, e->act};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
        if (dev[i] != NULL)
            be->ops->buf_free(be, dev[i]);
    free(e->h_tokens);
    free(e->h_pos);
    free(e->h_slot);
    free(e->h_ctx);
    free(e->h_table);
    free(e->h_logit_idx);
    free(e->h_tables);
    free(e->h_logits);
    free(e->h_argmax);
    free(e->h_srows);
    free(e->h_slogprob);
    free(e->h_hist_tok);
    free(e->h_hist_cnt);
    for (int i = 0; i < TDM_ENGINE_GRAPH_BUCKETS; i++)
        if (e->graphs[i] != NULL)
            be->ops->graph_free(be, e->graphs[i]);
}

/* Bytes a staging half aims at: large transfers, each a few ms of PCIe. */
#define KV_STAGE_HALF_BYTES ((size_t)8 << 20)

/* The host side of KV block transfers, when the cache is not host memory
 * (or TANDEM_ENGINE_STAGE=1 asks for the same path on the CPU). */
static tdm_status_t alloc_kv_stage(tdm_engine_t *e, char *err, size_t err_len)
{
    const tdm_backend_ops_t *ops = e->be->ops;
    const char *force = getenv("TANDEM_ENGINE_STAGE");
    e->staged = ops->device_memory != 0 || (force != NULL && strcmp(force, "1") == 0);
    if (!e->staged)
        return TDM_OK;
    if (ops->kv_out == NULL || ops->kv_in == NULL || ops->kv_wait == NULL) {
        snprintf(err, err_len, "the %s backend cannot move KV blocks (no kv_out/kv_in)", ops->name);
        return TDM_ERR_UNSUPPORTED;
    }
    size_t block = 2 * (size_t)e->model->hp.n_layer * (size_t)e->cfg.block_size *
                   (size_t)e->kv_dim * sizeof(uint16_t);
    /* On the CPU (tests only) the smallest chunks, so that every turn of
     * the two-half walk runs. */
    size_t n = ops->device_memory ? KV_STAGE_HALF_BYTES / block : 2;
    e->stage_blocks = n < 1 ? 1 : n > 1024 ? 1024 : (int32_t)n;
    size_t bytes = 2 * (size_t)e->stage_blocks * block;
    e->kv_stage = ops->host_alloc ? ops->host_alloc(e->be, bytes) : malloc(bytes);
    e->stage_ids = malloc(2 * (size_t)e->stage_blocks * sizeof(int32_t));
    e->stage_ntok = malloc(2 * (size_t)e->stage_blocks * sizeof(int32_t));
    if (e->kv_stage == NULL || e->stage_ids == NULL || e->stage_ntok == NULL) {
        snprintf(err, err_len, "could not allocate %.1f MB of host memory for KV transfers",
                 (double)bytes / 1e6);
        return TDM_ERR_NOMEM;
    }
    return TDM_OK;
}

static void free_kv_stage(tdm_engine_t *e)
{
    if (e->kv_stage != NULL && e->be->ops->host_free != NULL)
        e->be->ops->host_free(e->be, e->kv_stage);
    else
        free(e->kv_stage);
    e->kv_stage = NULL;
    free(e->stage_ids);
    free(e->stage_ntok);
    e->stage_ids = e->stage_ntok = NULL;
}

tdm_status_t tdm_engine_create(const tdm_engine_config_t *cfg, char *err, size_t err_len,
                               tdm_engine_t **out)
{
    tdm_engine_t *e = calloc(1, sizeof(*e));
    if (e == NULL)
        return TDM_ERR_NOMEM;
    e->cfg = *cfg;
    tdm_status_t st;
    if (cfg->block_size <= 0 || cfg->block_size > 1024 || cfg->max_num_seqs <= 0 ||
        cfg->max_num_seqs > TDM_ENGINE_MAX_SEQS || cfg->max_num_batched_tokens <= 0 ||
        cfg->max_step_ms < 0) {
        snprintf(err, err_len,
                 "block size (1..1024), max_num_seqs (1..%d), max_num_batched_tokens (> 0) or "
                 "max_step_ms (>= 0) is out of range",
                 TDM_ENGINE_MAX_SEQS);
        st = TDM_ERR_INVALID;
        goto err_free;
    }
    int gpu = -1;
    if (cfg->device != NULL && strcmp(cfg->device, "cpu") != 0) {
        char *end = NULL;
        if (strcmp(cfg->device, "cuda") == 0)
            gpu = 0;
        else if (strncmp(cfg->device, "cuda:", 5) == 0)
            gpu = (int)strtol(cfg->device + 5, &end, 10);
        if (gpu < 0 || (end != NULL && (*end != '\0' || end == cfg->device + 5))) {
            snprintf(err, err_len, "unknown device '%s' (cpu, cuda or cuda:N)", cfg->device);
            st = TDM_ERR_INVALID;
            goto err_free;
        }
        if (!(cfg->gpu_memory_utilization > 0.0f && cfg->gpu_memory_utilization <= 1.0f)) {
            snprintf(err, err_len, "gpu_memory_utilization must be in (0, 1]");
            st = TDM_ERR_INVALID;
            goto err_free;
        }
    }
    st = gpu >= 0 ? tdm_backend_cuda_create(gpu, &e->be)
                  : tdm_backend_cpu_create(cfg->threads, cfg->isa, &e->be);
    if (st != TDM_OK) {
        snprintf(err, err_len, "could not create the %s backend: %s", gpu >= 0 ? "CUDA" : "CPU",
                 tdm_status_str(st));
        goto err_free;
    }
    st = tdm_model_load(cfg->model_path, e->be, err, err_len, &e->model);
    if (st != TDM_OK)
        goto err_backend;
    const tdm_model_hparams_t *hp = &e->model->hp;
    if (e->cfg.max_model_len <= 0)
        e->cfg.max_model_len = hp->n_ctx_train < 8192 ? hp->n_ctx_train : 8192;
    e->kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;
    e->max_blocks = (e->cfg.max_model_len + e->cfg.block_size - 1) / e->cfg.block_size;
    size_t block_bytes =
        (size_t)e->cfg.block_size * (size_t)e->kv_dim * 2 * 2 * (size_t)hp->n_layer;
    /* Step buffers first: on a GPU the KV cache takes what is left. */
    e->max_rows = e->cfg.max_num_batched_tokens;
    e->max_logits = e->cfg.max_num_seqs > 256 ? e->cfg.max_num_seqs : 256;
    st = alloc_buffers(e);
    if (st != TDM_OK) {
        snprintf(err, err_len, "could not allocate step buffers for %d tokens",
                 e->cfg.max_num_batched_tokens);
        goto err_buffers;
    }
    int64_t nb = e->cfg.num_blocks;
    if (nb <= 0 && e->cfg.kv_cache_bytes == 0 && gpu >= 0) {
        size_t free_b = 0, total_b = 0;
        st = tdm_backend_cuda_mem_info(e->be, &free_b, &total_b);
        if (st != TDM_OK) {
            snprintf(err, err_len, "cannot read the GPU's free memory");
            goto err_buffers;
        }
        /* what the others hold, ours so far, and headroom for the backend's
         * scratch and graphs: the rest of the budget is KV */
        double budget = (double)cfg->gpu_memory_utilization * (double)total_b -
                        (double)(total_b - free_b) - (double)(256u << 20);
        nb = budget > 0 ? (int64_t)(budget / (double)block_bytes) : 0;
        tdm_log_info(MOD,
                     "KV cache from --gpu-memory-utilization %.2f: %.1f of %.1f GiB free, "
                     "%lld blocks",
                     (double)cfg->gpu_memory_utilization, (double)free_b / (1ull << 30),
                     (double)total_b / (1ull << 30), (long long)nb);
    } else if (nb <= 0) {
        uint64_t bytes = e->cfg.kv_cache_bytes ? e->cfg.kv_cache_bytes : (1ull << 30);
        nb = (int64_t)(bytes / block_bytes);
    }
    if (nb < 2 || nb > INT32_MAX / 2) {
        snprintf(err, err_len,
                 "the KV cache would have %lld blocks of %zu bytes; give it room for "
                 "at least 2 (--kv-cache-memory, --gpu-memory-utilization)",
                 (long long)nb, block_bytes);
        st = TDM_ERR_INVALID;
        goto err_buffers;
    }
    e->cfg.num_blocks = (int32_t)nb;
    st = tdm_kv_pool_init(&e->pool, (int32_t)nb);
    if (st != TDM_OK)
        goto err_buffers;
    {
        const char *pad = getenv("TANDEM_ENGINE_PAD"), *graphs = getenv("TANDEM_GRAPHS");
        const char *dsample = getenv("TANDEM_ENGINE_DEVICE_SAMPLE");
        e->device_sample =
            e->be->ops->sample != NULL || (dsample != NULL && strcmp(dsample, "1") == 0);
        e->use_graphs =
            e->be->ops->graph_capture != NULL && !(graphs != NULL && strcmp(graphs, "0") == 0);
        e->pad_decode = e->use_graphs || (pad != NULL && strcmp(pad, "1") == 0);
        /* padding rows of decode buckets write into one block past the
         * pool's: the cache has it, the pool never hands it out */
        e->pad_block = (int32_t)nb;
    }
    e->cache_k = calloc((size_t)hp->n_layer, sizeof(*e->cache_k));
    e->cache_v = calloc((size_t)hp->n_layer, sizeof(*e->cache_v));
    e->kv_rows = calloc(2 * (size_t)hp->n_layer, sizeof(*e->kv_rows));
    st = alloc_kv_stage(e, err, err_len);
    if (st != TDM_OK)
        goto err_cache;
    if (e->cache_k == NULL || e->cache_v == NULL || e->kv_rows == NULL) {
        st = TDM_ERR_NOMEM;
        goto err_cache;
    }
    size_t layer_bytes =
        (size_t)(nb + (e->pad_decode ? 1 : 0)) * (size_t)e->cfg.block_size * (size_t)e->kv_dim * 2;
    for (int32_t il = 0; il < hp->n_layer; il++) {
        e->cache_k[il] = be_alloc(e, layer_bytes, &st);
        e->cache_v[il] = be_alloc(e, layer_bytes, &st);
    }
    if (st != TDM_OK) {
        snprintf(err, err_len, "could not allocate the KV cache (%.1f MB)",
                 (double)layer_bytes * 2 * hp->n_layer / 1e6);
        goto err_cache;
    }
    st = tdm_sampler_create(hp->n_vocab, &e->sampler);
    if (st != TDM_OK)
        goto err_cache;
    /* Block keys are seeded with the model fingerprint and the KV layout.
     * The struct has padding after its five ints: zero it all, or the seed
     * (and every store key) depends on stack garbage and differs between
     * processes of the same model. */
    struct {
        tdm_hash128_t fp;
        int32_t block_size, n_layer, n_head_kv, head_dim, dtype;
    } seed;
    memset(&seed, 0, sizeof(seed));
    seed.fp = tdm_model_fingerprint(e->model);
    seed.block_size = e->cfg.block_size;
    seed.n_layer = hp->n_layer;
    seed.n_head_kv = hp->n_head_kv;
    seed.head_dim = hp->head_dim;
    seed.dtype = TDM_DTYPE_F16;
    e->key_seed = tdm_hash128(&seed, sizeof(seed), 0x6b76);
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->wake, NULL);
    e->next_id = 1;
    e->live.num_blocks = (int32_t)nb;
    e->live.num_free_blocks = tdm_kv_pool_num_free(&e->pool);
    e->live.step_token_budget = e->cfg.max_num_batched_tokens;
    e->stats = e->live;
    tdm_log_info(MOD,
                 "engine ready: %s on %s, KV cache %d blocks x %d tokens (%.1f MB, f16), "
                 "max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d, max_step_ms %d, "
                 "prefix caching %s",
                 tdm_model_name(e->model), e->be->ops->name, (int)nb, e->cfg.block_size,
                 (double)block_bytes * (double)nb / 1e6, e->cfg.max_model_len, e->cfg.max_num_seqs,
                 e->cfg.max_num_batched_tokens, e->cfg.max_step_ms,
                 e->cfg.enable_prefix_caching ? "on" : "off");
    *out = e;
    return TDM_OK;

err_cache:
    for (int32_t il = 0; e->cache_k != NULL && il < hp->n_layer; il++) {
        if (e->cache_k[il] != NULL)
            e->be->ops->buf_free(e->be, e->cache_k[il]);
        if (e->cache_v[il] != NULL)
            e->be->ops->buf_free(e->be, e->cache_v[il]);
    }
    free(e->cache_k);
    free(e->cache_v);
    free(e->kv_rows);
    free_kv_stage(e);
    tdm_kv_pool_fini(&e->pool);
err_buffers:
    free_buffers(e);
    tdm_model_destroy(e->model);
err_backend:
    tdm_backend_destroy(e->be);
err_free:
    free(e);
    return st;
}

static void seq_free(tdm_seq_t *s)
{
    if (s == NULL)
        return;
    tdm_textstream_free(&s->text);
    free(s->stop_ids);
    free(s->tokens);
    free(s->blocks);
    free(s->keys);
    free(s);
}

static void finish(tdm_engine_t *e, tdm_seq_t *s, tdm_finish_reason_t why, const char *error);

void tdm_engine_destroy(tdm_engine_t *e)
{
    if (e == NULL)
        return;
    tdm_engine_stop(e);
    /* Requests still queued or running end as cancelled. */
    for (tdm_op_t *op = e->ops_head, *next; op != NULL; op = next) {
        next = op->next;
        if (op->seq != NULL) {
            op->seq->state = TDM_SEQ_WAITING;
            finish(e, op->seq, TDM_FINISH_CANCELLED, NULL);
            seq_free(op->seq);
        }
        free(op);
    }
    for (tdm_seq_t *s = e->running, *next; s != NULL; s = next) {
        next = s->next;
        finish(e, s, TDM_FINISH_CANCELLED, NULL);
        seq_free(s);
    }
    for (tdm_seq_t *s = e->waiting, *next; s != NULL; s = next) {
        next = s->next;
        finish(e, s, TDM_FINISH_CANCELLED, NULL);
        seq_free(s);
    }
    const tdm_model_hparams_t *hp = &e->model->hp;
    for (int32_t il = 0; il < hp->n_layer; il++) {
        e->be->ops->buf_free(e->be, e->cache_k[il]);
        e->be->ops->buf_free(e->be, e->cache_v[il]);
    }
    free(e->cache_k);
    free(e->cache_v);
    free(e->kv_rows);
    free_kv_stage(e);
    free_buffers(e);
    tdm_sampler_destroy(e->sampler);
    tdm_kv_pool_fini(&e->pool);
    tdm_model_destroy(e->model);
    tdm_backend_destroy(e->be);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->wake);
    free(e);
}

const tdm_model_t *tdm_engine_model(const tdm_engine_t *e)
{
    return e->model;
}

/* ------------------------------------------------------------- requests */

/* Queues an op for the stepping thread and wakes it; e->lock is held. */
static void push_op_locked(tdm_engine_t *e, tdm_op_t *op)
{
    if (e->ops_tail != NULL)
        e->ops_tail->next = op;
    else
        e->ops_head = op;
    e->ops_tail = op;
    pthread_cond_signal(&e->wake);
}

tdm_status_t tdm_engine_add(tdm_engine_t *e, const tdm_request_params_t *p, uint64_t *id_out)
{
    char why[160];
    if (p->prompt == NULL || p->n_prompt == 0) {
        tdm_log_warn(MOD, "request refused: empty prompt");
        return TDM_ERR_INVALID;
    }
    if (p->n_prompt >= (size_t)e->cfg.max_model_len) {
        tdm_log_warn(MOD, "request refused: prompt of %zu tokens does not fit max_model_len %d",
                     p->n_prompt, e->cfg.max_model_len);
        return TDM_ERR_INVALID;
    }
    if (tdm_sampling_params_validate(&p->sampling, why, sizeof(why)) != TDM_OK) {
        tdm_log_warn(MOD, "request refused: %s", why);
        return TDM_ERR_INVALID;
    }
    if (p->n_prior_output < 0 || (size_t)p->n_prior_output >= p->n_prompt) {
        tdm_log_warn(MOD, "request refused: n_prior_output %d is outside 0..%zu", p->n_prior_output,
                     p->n_prompt - 1);
        return TDM_ERR_INVALID;
    }
    if (p->n_kv_tokens < 0 || (size_t)p->n_kv_tokens > p->n_prompt) {
        tdm_log_warn(MOD, "request refused: n_kv_tokens %d is outside 0..%zu (the prompt)",
                     p->n_kv_tokens, p->n_prompt);
        return TDM_ERR_INVALID;
    }
    int32_t nv = e->model->hp.n_vocab;
    for (size_t i = 0; i < p->n_prompt; i++) {
        if (p->prompt[i] < 0 || p->prompt[i] >= nv) {
            tdm_log_warn(MOD, "request refused: prompt token %d at %zu is outside the vocabulary",
                         p->prompt[i], i);
            return TDM_ERR_INVALID;
        }
    }
    tdm_seq_t *s = calloc(1, sizeof(*s));
    tdm_op_t *op = calloc(1, sizeof(*op));
    if (s == NULL || op == NULL)
        goto err_nomem;
    size_t ml = (size_t)e->cfg.max_model_len;
    s->tokens = malloc(ml * sizeof(int32_t));
    s->blocks = malloc((size_t)e->max_blocks * sizeof(int32_t));
    s->keys = malloc((size_t)e->max_blocks * sizeof(tdm_hash128_t));
    if (p->n_stop_token_ids > 0)
        s->stop_ids = malloc(p->n_stop_token_ids * sizeof(int32_t));
    if (s->tokens == NULL || s->blocks == NULL || s->keys == NULL ||
        (p->n_stop_token_ids > 0 && s->stop_ids == NULL))
        goto err_nomem;
    if (tdm_textstream_init(&s->text, p->stop, p->n_stop) != TDM_OK)
        goto err_nomem;
    if (p->n_stop_token_ids > 0)
        memcpy(s->stop_ids, p->stop_token_ids, p->n_stop_token_ids * sizeof(int32_t));
    s->n_stop_ids = p->n_stop_token_ids;
    memcpy(s->tokens, p->prompt, p->n_prompt * sizeof(int32_t));
    s->n_prompt = s->n_tokens = (int32_t)p->n_prompt;
    s->sampling = p->sampling;
    tdm_sample_state_init(&s->rng, &p->sampling);
    s->n_prior = p->n_prior_output;
    /* a seeded request continued elsewhere draws as if it had run here */
    if (p->sampling.temperature > 0.0f)
        tdm_sample_state_skip(&s->rng, (uint64_t)s->n_prior);
    s->max_tokens = p->max_tokens;
    s->ignore_eos = p->ignore_eos;
    s->logprobs = p->logprobs;
    s->top_logprobs = p->top_logprobs < 0                      ? 0
                      : p->top_logprobs > TDM_MAX_TOP_LOGPROBS ? TDM_MAX_TOP_LOGPROBS
                                                               : p->top_logprobs;
    s->cb = p->cb;
    s->user = p->user;
    s->kv_export = p->kv_export;
    s->kv_export_user = p->kv_export_user;
    if (p->kv_import != NULL && p->n_kv_tokens > 0) {
        s->kv_import = p->kv_import;
        s->kv_import_user = p->kv_import_user;
        s->n_kv_tokens = p->n_kv_tokens;
    }
    s->state = TDM_SEQ_WAITING;
    op->seq = s;
    pthread_mutex_lock(&e->lock);
    s->id = e->next_id++;
    push_op_locked(e, op);
    pthread_mutex_unlock(&e->lock);
    if (id_out != NULL)
        *id_out = s->id;
    return TDM_OK;

err_nomem:
    tdm_log_error(MOD, "request refused: out of memory");
    seq_free(s);
    free(op);
    return TDM_ERR_NOMEM;
}

tdm_status_t tdm_engine_cancel(tdm_engine_t *e, uint64_t id)
{
    tdm_op_t *op = calloc(1, sizeof(*op));
    if (op == NULL)
        return TDM_ERR_NOMEM;
    op->cancel_id = id;
    pthread_mutex_lock(&e->lock);
    push_op_locked(e, op);
    pthread_mutex_unlock(&e->lock);
    return TDM_OK;
}

/* --------------------------------------------------------------- events */

static void emit(tdm_seq_t *s, int32_t token, float logprob, const char *text, size_t len,
                 tdm_finish_reason_t why, const char *error)
{
    if (s->cb == NULL)
        return;
    tdm_request_event_t ev = {
        .id = s->id,
        .token = token,
        .logprob = logprob,
        .text = text,
        .text_len = len,
        .finish = why,
        .n_prompt = s->n_prompt,
        .n_output = s->n_tokens - s->n_prompt,
        .n_cached = s->n_cached,
        .error = error,
        .n_imported = s->n_imported,
        .top = token >= 0 && s->n_top > 0 ? s->top : NULL,
        .n_top = token >= 0 ? s->n_top : 0,
    };
    s->cb(s->user, &ev);
}

static void seq_release_blocks(tdm_engine_t *e, tdm_seq_t *s)
{
    for (int32_t i = 0; i < s->n_blocks; i++)
        tdm_kv_pool_release(&e->pool, s->blocks[i]);
    s->n_blocks = 0;
    s->n_computed = 0;
    s->n_registered = 0;
}

/* Ends a request: its last token (or -1) and the pending text go out with
 * the final event. */
static void finish_with(tdm_engine_t *e, tdm_seq_t *s, int32_t token, float logprob,
                        tdm_finish_reason_t why, const char *error)
{
    seq_release_blocks(e, s);
    s->state = TDM_SEQ_FINISHED;
    const char *text;
    size_t len;
    tdm_textstream_flush(&s->text, &text, &len);
    emit(s, token, logprob, text, len, why, error);
}

static void finish(tdm_engine_t *e, tdm_seq_t *s, tdm_finish_reason_t why, const char *error)
{
    finish_with(e, s, -1, 0.0f, why, error);
}

/* Appends a new token's text and delivers what is safe to show. Returns
 * true if a stop string matched (the text from the match on is dropped). */
static bool push_text(tdm_seq_t *s, int32_t token, float logprob, const char *piece, size_t len,
                      tdm_finish_reason_t why)
{
    const char *text;
    size_t n;
    if (tdm_textstream_push(&s->text, piece, len, why != TDM_FINISH_NONE, &text, &n)) {
        emit(s, token, logprob, text, n, TDM_FINISH_NONE, NULL);
        return true;
    }
    if (why != TDM_FINISH_NONE) {
        /* the final event carries everything: give it back to the stream */
        s->text.consumed = 0;
        return false;
    }
    emit(s, token, logprob, text, n, TDM_FINISH_NONE, NULL);
    return false;
}

/* ------------------------------------------------------------ scheduler */

static void list_remove(tdm_seq_t **head, tdm_seq_t *s)
{
    for (tdm_seq_t **link = head; *link != NULL; link = &(*link)->next) {
        if (*link == s) {
            *link = s->next;
            s->next = NULL;
            return;
        }
    }
}

static void list_append(tdm_seq_t **head, tdm_seq_t *s)
{
    tdm_seq_t **link = head;
    while (*link != NULL)
        link = &(*link)->next;
    s->next = NULL;
    *link = s;
}

static void take_ops(tdm_engine_t *e)
{
    pthread_mutex_lock(&e->lock);
    tdm_op_t *ops = e->ops_head;
    e->ops_head = e->ops_tail = NULL;
    pthread_mutex_unlock(&e->lock);
    for (tdm_op_t *op = ops, *next; op != NULL; op = next) {
        next = op->next;
        if (op->seq != NULL) {
            list_append(&e->waiting, op->seq);
            e->n_waiting++;
        } else {
            tdm_seq_t *lists[] = {e->running, e->waiting};
            for (int l = 0; l < 2; l++)
                for (tdm_seq_t *s = lists[l]; s != NULL; s = s->next)
                    if (s->id == op->cancel_id)
                        s->cancelled = true;
        }
        free(op);
    }
}

static void retire(tdm_engine_t *e, tdm_seq_t *s, bool running)
{
    if (running) {
        list_remove(&e->running, s);
        e->n_running--;
    } else {
        list_remove(&e->waiting, s);
        e->n_waiting--;
    }
    seq_free(s);
}

static void handle_cancels(tdm_engine_t *e)
{
    for (int l = 0; l < 2; l++) {
        tdm_seq_t *s = l == 0 ? e->running : e->waiting;
        while (s != NULL) {
            tdm_seq_t *next = s->next;
            if (s->cancelled) {
                finish(e, s, TDM_FINISH_CANCELLED, NULL);
                retire(e, s, l == 0);
            }
            s = next;
        }
    }
}

/* Chained keys of the sequence's full blocks up to n_full. */
static void compute_keys(tdm_engine_t *e, tdm_seq_t *s, int32_t n_full)
{
    int32_t bs = e->cfg.block_size;
    for (int32_t i = s->n_keys; i < n_full; i++) {
        tdm_hash128_t prev = i == 0 ? e->key_seed : s->keys[i - 1];
        s->keys[i] = tdm_hash128_chain(prev, s->tokens + (size_t)i * (size_t)bs,
                                       (size_t)bs * sizeof(int32_t));
    }
    if (n_full > s->n_keys)
        s->n_keys = n_full;
}

size_t tdm_engine_block_keys(const tdm_engine_t *e, const int32_t *tokens, size_t n,
                             tdm_hash128_t *keys)
{
    size_t bs = (size_t)e->cfg.block_size, n_full = n / bs;
    for (size_t i = 0; i < n_full; i++)
        keys[i] = tdm_hash128_chain(i == 0 ? e->key_seed : keys[i - 1], tokens + i * bs,
                                    bs * sizeof(int32_t));
    return n_full;
}

int32_t tdm_engine_block_size(const tdm_engine_t *e)
{
    return e->cfg.block_size;
}

int32_t tdm_engine_max_model_len(const tdm_engine_t *e)
{
    return e->cfg.max_model_len;
}

/* Grows the sequence's block list to cover positions [0, upto). */
static bool ensure_blocks(tdm_engine_t *e, tdm_seq_t *s, int32_t upto)
{
    int32_t need = (upto + e->cfg.block_size - 1) / e->cfg.block_size;
    while (s->n_blocks < need) {
        int32_t b = tdm_kv_pool_alloc(&e->pool);
        if (b < 0)
            return false;
        s->blocks[s->n_blocks++] = b;
    }
    return true;
}

/* Hands fn the K and V rows of blocks[first ..] holding positions
 * [first * block_size, n_pos), in order, until fn fails. fn reads them
 * (KV_READ: export), fills them (KV_WRITE: import) or both. The number of
 * blocks fn accepted goes into *n_done. */
enum { KV_READ = 1, KV_WRITE = 2 };

/* Points rows (K of every layer, then V) at block i of a staging half. */
static void stage_rows(tdm_engine_t *e, int32_t half, int32_t i, uint16_t **rows)
{
    int32_t nl = e->model->hp.n_layer;
    size_t block_elems = (size_t)e->cfg.block_size * (size_t)e->kv_dim;
    uint16_t *b = e->kv_stage + ((size_t)half * (size_t)e->stage_blocks + (size_t)i) * 2 *
                                    (size_t)nl * block_elems;
    for (int32_t t = 0; t < 2 * nl; t++)
        rows[t] = b + (size_t)t * block_elems;
}

/* Fills a staging half's block list with the chunk of blocks from `from`
 * (at most stage_blocks, up to the last of nb) of a sequence of n_pos
 * positions; returns how many. */
static int32_t stage_fill(tdm_engine_t *e, int32_t half, const int32_t *blocks, int32_t from,
                          int32_t nb, int32_t n_pos)
{
    int32_t bs = e->cfg.block_size;
    int32_t count = nb - from < e->stage_blocks ? nb - from : e->stage_blocks;
    for (int32_t i = 0; i < count; i++) {
        int32_t left = n_pos - (from + i) * bs;
        e->stage_ids[half * e->stage_blocks + i] = blocks[from + i];
        e->stage_ntok[half * e->stage_blocks + i] = left < bs ? left : bs;
    }
    return count;
}

static uint64_t stage_move(tdm_engine_t *e, int32_t half, int32_t count, bool out)
{
    tdm_backend_t *be = e->be;
    int32_t nl = e->model->hp.n_layer;
    int64_t block_elems = (int64_t)e->cfg.block_size * e->kv_dim;
    uint16_t *host =
        e->kv_stage + (size_t)half * (size_t)e->stage_blocks * 2 * (size_t)nl * (size_t)block_elems;
    const int32_t *ids = e->stage_ids + half * e->stage_blocks;
    const int32_t *ntok = e->stage_ntok + half * e->stage_blocks;
    return out ? be->ops->kv_out(be, e->cache_k, e->cache_v, nl, block_elems, ids, ntok, count,
                                 e->kv_dim, host)
               : be->ops->kv_in(be, e->cache_k, e->cache_v, nl, block_elems, ids, ntok, count,
                                e->kv_dim, host);
}

/* The staged walk: blocks travel in chunks of stage_blocks through the two
 * halves of the stage. Reading, the next chunk's transfer (on the
 * backend's copy stream) runs while fn works on this one; writing, a
 * chunk goes up while fn fills the other half. */
static tdm_status_t visit_staged(tdm_engine_t *e, const int32_t *blocks, int32_t first,
                                 int32_t n_pos, unsigned how, tdm_engine_kv_fn_t fn, void *user,
                                 int32_t *n_done)
{
    tdm_backend_t *be = e->be;
    int32_t bs = e->cfg.block_size, nl = e->model->hp.n_layer, S = e->stage_blocks;
    int32_t nb = (n_pos + bs - 1) / bs;
    uint16_t **rows = e->kv_rows;
    uint64_t out_ticket[2] = {0, 0}, in_ticket[2] = {0, 0};
    tdm_status_t st = TDM_OK;
    int32_t done = 0;
    int32_t count[2] = {0, 0}; /* blocks in each half's current chunk */
    if ((how & KV_READ) && first < nb) {
        count[0] = stage_fill(e, 0, blocks, first, nb, n_pos);
        out_ticket[0] = stage_move(e, 0, count[0], true);
    }
    for (int32_t c = 0, from = first; from < nb && st == TDM_OK; c++, from += S) {
        int32_t half = c & 1, next = from + S;
        if ((how & KV_READ) && next < nb) {
            /* the other half's upload (if any) is queued before this read */
            count[half ^ 1] = stage_fill(e, half ^ 1, blocks, next, nb, n_pos);
            out_ticket[half ^ 1] = stage_move(e, half ^ 1, count[half ^ 1], true);
        }
        if (how & KV_READ)
            be->ops->kv_wait(be, out_ticket[half]);
        else {
            be->ops->kv_wait(be, in_ticket[half]); /* its last upload read this half */
            count[half] = stage_fill(e, half, blocks, from, nb, n_pos);
        }
        int32_t accepted = 0;
        for (; accepted < count[half]; accepted++) {
            stage_rows(e, half, accepted, rows);
            st = fn(user, from + accepted, e->stage_ntok[half * S + accepted], rows, rows + nl);
            if (st != TDM_OK)
                break;
        }
        if ((how & KV_WRITE) && accepted > 0)
            in_ticket[half] = stage_move(e, half, accepted, false);
        done += accepted;
    }
    /* nothing may still read or fill the stage when it is next used */
    be->ops->kv_wait(be, out_ticket[0] > out_ticket[1] ? out_ticket[0] : out_ticket[1]);
    be->ops->kv_wait(be, in_ticket[0] > in_ticket[1] ? in_ticket[0] : in_ticket[1]);
    *n_done = done;
    return st;
}

static tdm_status_t visit_blocks(tdm_engine_t *e, const int32_t *blocks, int32_t first,
                                 int32_t n_pos, unsigned how, tdm_engine_kv_fn_t fn, void *user,
                                 int32_t *n_done)
{
    if (e->staged)
        return visit_staged(e, blocks, first, n_pos, how, fn, user, n_done);
    /* The CPU backend's cache is host memory: fn works on it in place. */
    int32_t bs = e->cfg.block_size, nl = e->model->hp.n_layer;
    uint16_t **rows = e->kv_rows; /* K rows, then V rows */
    size_t block_elems = (size_t)bs * (size_t)e->kv_dim;
    e->be->ops->sync(e->be);
    tdm_status_t st = TDM_OK;
    int32_t nb = (n_pos + bs - 1) / bs, i;
    for (i = first; i < nb; i++) {
        size_t off = (size_t)blocks[i] * block_elems;
        for (int32_t il = 0; il < nl; il++) {
            rows[il] = e->cache_k[il] + off;
            rows[nl + il] = e->cache_v[il] + off;
        }
        int32_t left = n_pos - i * bs, n_tok = left < bs ? left : bs;
        st = fn(user, i, n_tok, rows, rows + nl);
        if (st != TDM_OK)
            break;
    }
    *n_done = i - first;
    return st;
}

/* Offers the prompt's blocks to the request's kv_export, once. */
static void export_prompt(tdm_engine_t *e, tdm_seq_t *s)
{
    int32_t n_done;
    tdm_status_t st = visit_blocks(e, s->blocks, 0, s->n_prompt, KV_READ, s->kv_export,
                                   s->kv_export_user, &n_done);
    if (st != TDM_OK)
        tdm_log_debug(MOD, "request %llu: KV export stopped at block %d: %s",
                      (unsigned long long)s->id, n_done, tdm_status_str(st));
    s->kv_export = NULL;
}

/* Fills the blocks of positions [n_computed, n_kv_tokens) through the
 * request's kv_import (its blocks are allocated) and advances n_computed
 * over what arrived, leaving at least the last token to compute. Imported
 * blocks are kept out of the prefix index. Only once per request. */
static void import_prompt(tdm_engine_t *e, tdm_seq_t *s)
{
    int32_t bs = e->cfg.block_size;
    int32_t first = s->n_computed / bs, n_done = 0;
    tdm_status_t st = TDM_OK;
    if (s->n_kv_tokens > s->n_computed)
        st = visit_blocks(e, s->blocks, first, s->n_kv_tokens, KV_WRITE, s->kv_import,
                          s->kv_import_user, &n_done);
    if (n_done > 0) {
        int32_t upto = (first + n_done) * bs;
        upto = upto < s->n_kv_tokens ? upto : s->n_kv_tokens;
        s->n_imported = upto - first * bs;
        s->n_computed = upto < s->n_tokens - 1 ? upto : s->n_tokens - 1;
        /* not registered: the touched blocks count as offered */
        s->n_registered = (upto + bs - 1) / bs;
    }
    if (st != TDM_OK)
        tdm_log_info(MOD, "request %llu: KV block %d not imported (%s); computing from position %d",
                     (unsigned long long)s->id, first + n_done, tdm_status_str(st),
                     (first + n_done) * bs);
    s->kv_import = NULL;
}

/* Moves a running sequence back to the head of the waiting queue; its
 * blocks are freed (cached ones stay findable) and it will be recomputed. */
static void preempt(tdm_engine_t *e, tdm_seq_t *s)
{
    list_remove(&e->running, s);
    e->n_running--;
    seq_release_blocks(e, s);
    s->state = TDM_SEQ_WAITING;
    s->next = e->waiting;
    e->waiting = s;
    e->n_waiting++;
    e->live.preemptions++;
    tdm_log_debug(MOD, "preempted request %llu (%d tokens) for lack of KV blocks",
                  (unsigned long long)s->id, s->n_tokens);
}

static tdm_seq_t *newest_running(tdm_engine_t *e)
{
    tdm_seq_t *last = NULL;
    for (tdm_seq_t *s = e->running; s != NULL; s = s->next)
        last = s;
    return last;
}

/* Reuses cached blocks for the leading full blocks of the sequence's tokens.
 * At least one token is always left to compute, for its logits. */
static void match_prefix(tdm_engine_t *e, tdm_seq_t *s)
{
    int32_t bs = e->cfg.block_size;
    int32_t n_full = (s->n_tokens - 1) / bs;
    compute_keys(e, s, n_full);
    int32_t hit = 0;
    while (hit < n_full) {
        int32_t b = tdm_kv_pool_acquire_cached(&e->pool, s->keys[hit]);
        if (b < 0)
            break;
        s->blocks[s->n_blocks++] = b;
        hit++;
    }
    s->n_computed = hit * bs;
    s->n_registered = hit;
    if (!s->counted_prompt)
        s->n_cached = s->n_computed < s->n_prompt ? s->n_computed : s->n_prompt;
}

/* Adds rows for the chunk [n_computed, n_computed + chunk) of s. */
static void add_rows(tdm_engine_t *e, tdm_seq_t *s, int32_t table, int32_t *n_rows,
                     int32_t *n_logits)
{
    int32_t bs = e->cfg.block_size;
    memcpy(e->h_tables + (size_t)table * (size_t)e->max_blocks, s->blocks,
           (size_t)s->n_blocks * sizeof(int32_t));
    for (int32_t i = 0; i < s->chunk; i++) {
        int32_t pos = s->n_computed + i, r = *n_rows + i;
        e->h_tokens[r] = s->tokens[pos];
        e->h_pos[r] = pos;
        e->h_slot[r] = s->blocks[pos / bs] * bs + pos % bs;
        e->h_ctx[r] = pos + 1;
        e->h_table[r] = table;
    }
    *n_rows += s->chunk;
    s->logit_row = -1;
    if (s->n_computed + s->chunk == s->n_tokens) {
        e->h_logit_idx[*n_logits] = *n_rows - 1;
        s->logit_row = (*n_logits)++;
    }
}

/* The k most likely tokens of a logits row with their log-softmax values
 * (ties: the lower id first). */
static int32_t top_logprobs(const float *logits, int32_t n_vocab, int32_t k,
                            tdm_token_logprob_t *out)
{
    float max = logits[0];
    for (int32_t i = 1; i < n_vocab; i++)
        max = logits[i] > max ? logits[i] : max;
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; i++)
        sum += exp((double)(logits[i] - max));
    double lse = (double)max + log(sum);
    int32_t n = 0;
    for (int32_t i = 0; i < n_vocab; i++) {
        if (n == k && logits[i] <= out[n - 1].logprob)
            continue;
        int32_t at = n < k ? n++ : k - 1;
        while (at > 0 && out[at - 1].logprob < logits[i]) {
            out[at] = out[at - 1];
            at--;
        }
        out[at] = (tdm_token_logprob_t){i, logits[i]};
    }
    for (int32_t i = 0; i < n; i++)
        out[i].logprob = (float)((double)out[i].logprob - lse);
    return n;
}

/* True when s's next token is the plain argmax of its logits: greedy, no
 * penalties, no log-probabilities asked. The backend may then choose it
 * where the logits are (ops->argmax) and the logits need not move. */
static bool plain_greedy(const tdm_seq_t *s)
{
    const tdm_sampling_params_t *p = &s->sampling;
    return !(p->temperature > 0.0f) && p->repetition_penalty == 1.0f &&
           p->frequency_penalty == 0.0f && p->presence_penalty == 0.0f && !s->logprobs &&
           s->top_logprobs == 0;
}

/* True when s's next token can be chosen where the logits are by
 * ops->sample: anything but the top log-probabilities, which need the
 * whole distribution on the host. */
static bool device_sampleable(const tdm_seq_t *s)
{
    return s->top_logprobs == 0;
}

/* Room for n history entries. */
static bool hist_reserve(tdm_engine_t *e, size_t n)
{
    if (n <= e->hist_cap)
        return true;
    size_t cap = e->hist_cap ? e->hist_cap : 4096;
    while (cap < n)
        cap *= 2;
    int32_t *t = realloc(e->h_hist_tok, cap * sizeof(int32_t));
    if (t != NULL)
        e->h_hist_tok = t;
    int32_t *c = realloc(e->h_hist_cnt, cap * sizeof(int32_t));
    if (c != NULL)
        e->h_hist_cnt = c;
    if (t == NULL || c == NULL)
        return false;
    e->hist_cap = cap;
    return true;
}

/* ops->sample on the CPU (TANDEM_ENGINE_DEVICE_SAMPLE=1): the host sampler
 * fed with exactly what a device sampler gets (the rows' parameters, draws
 * and histories), so the engine's side of device sampling runs in every
 * test. */
static void host_sample_rows(tdm_engine_t *e, int32_t n, const tdm_sample_row_t *rows, int32_t *out,
                             float *logprob)
{
    const size_t V = (size_t)e->model->hp.n_vocab;
    e->be->ops->copy_from(e->be, e->h_logits, e->logits, (size_t)n * V * sizeof(float));
    for (int32_t t = 0; t < n; t++) {
        const tdm_sample_row_t *r = &rows[t];
        tdm_sampling_params_t p = tdm_sample_row_params(r);
        float *l = e->h_logits + (size_t)t * V;
        tdm_sampler_penalize_history(&p, l, e->h_hist_tok + r->hist_off,
                                     e->h_hist_cnt + r->hist_off, (size_t)r->n_hist);
        out[t] = tdm_sampler_sample_draw(e->sampler, &p, r->u, l, logprob ? &logprob[t] : NULL);
    }
}

/* Chooses the next token of every sequence of the batch with a logits
 * row where the logits are: their parameters, draws (from each request's
 * generator, as the host sampler would take them) and penalty histories go
 * to ops->sample; the tokens and log-probabilities land in h_argmax and
 * h_slogprob. False when the histories found no memory (then the host
 * samples). */
static bool sample_on_device(tdm_engine_t *e, tdm_seq_t *const *batch, int32_t n_batch,
                             int32_t n_logits)
{
    size_t used = 0, most = 0;
    bool want_lp = false;
    for (int32_t i = 0; i < n_batch; i++)
        most += batch[i]->logit_row >= 0 ? (size_t)batch[i]->n_tokens : 0;
    if (!hist_reserve(e, most))
        return false; /* before any draw: the host sampler takes them */
    for (int32_t i = 0; i < n_batch; i++) {
        tdm_seq_t *s = batch[i];
        if (s->logit_row < 0)
            continue;
        int32_t n_in = s->n_prompt - s->n_prior; /* prior output counts as output */
        const tdm_sampling_params_t *p = &s->sampling;
        size_t nh = tdm_sampler_history(e->sampler, p, s->tokens, (size_t)n_in, s->tokens + n_in,
                                        (size_t)(s->n_tokens - n_in), e->h_hist_tok + used,
                                        e->h_hist_cnt + used);
        double u = p->temperature > 0.0f ? tdm_sample_state_next(&s->rng) : 0.0;
        e->h_srows[s->logit_row] = tdm_sample_row_make(p, u, used, nh);
        used += nh;
        want_lp = want_lp || s->logprobs;
    }
    float *lp = want_lp ? e->h_slogprob : NULL;
    if (e->be->ops->sample != NULL)
        e->be->ops->sample(e->be, e->logits, n_logits, e->model->hp.n_vocab, e->h_srows,
                           e->h_hist_tok, e->h_hist_cnt, (int64_t)used, e->h_argmax, lp);
    else
        host_sample_rows(e, n_logits, e->h_srows, e->h_argmax, lp);
    return true;
}

/* Samples the next token of s from its logits row (or takes the backend's
 * choice when chosen >= 0, with chosen_lp its log-probability) and
 * delivers it. Returns true when the request is finished. */
static bool sample_and_deliver(tdm_engine_t *e, tdm_seq_t *s, int32_t chosen, float chosen_lp)
{
    const tdm_model_hparams_t *hp = &e->model->hp;
    float lp = chosen_lp;
    int32_t tok = chosen;
    s->n_top = 0;
    if (tok < 0) {
        float *logits = e->h_logits + (size_t)s->logit_row * (size_t)hp->n_vocab;
        if (s->top_logprobs > 0)
            s->n_top = top_logprobs(logits, hp->n_vocab, s->top_logprobs, s->top);
        int32_t n_in = s->n_prompt - s->n_prior; /* prior output counts as output */
        tok = tdm_sampler_sample(e->sampler, &s->sampling, &s->rng, logits, s->tokens, (size_t)n_in,
                                 s->tokens + n_in, (size_t)(s->n_tokens - n_in),
                                 s->logprobs ? &lp : NULL);
    }
    s->tokens[s->n_tokens++] = tok;
    e->live.generation_tokens++;
    int32_t n_out = s->n_tokens - s->n_prompt;
    tdm_finish_reason_t why = TDM_FINISH_NONE;
    bool stop_tok =
        tdm_tokenizer_is_stop(e->model->tok, tok, s->ignore_eos, s->stop_ids, s->n_stop_ids);
    if (stop_tok)
        why = TDM_FINISH_STOP;
    else if ((s->max_tokens > 0 && n_out >= s->max_tokens) || s->n_tokens >= e->cfg.max_model_len)
        why = TDM_FINISH_LENGTH;
    char piece[256];
    size_t len = 0;
    if (!stop_tok) { /* the text of a stop token is not shown */
        len = tdm_tokenizer_token_bytes(e->model->tok, tok, false, piece, sizeof(piece));
        len = len > sizeof(piece) ? sizeof(piece) : len;
    }
    if (push_text(s, tok, lp, piece, len, why)) {
        finish(e, s, TDM_FINISH_STOP, NULL);
        return true;
    }
    if (why != TDM_FINISH_NONE) {
        finish_with(e, s, tok, lp, why, NULL);
        return true;
    }
    return false;
}

/* Offers newly full blocks of s to the prefix index. */
static void register_blocks(tdm_engine_t *e, tdm_seq_t *s)
{
    if (!e->cfg.enable_prefix_caching)
        return;
    int32_t n_full = s->n_computed / e->cfg.block_size;
    if (n_full <= s->n_registered)
        return;
    compute_keys(e, s, n_full);
    for (int32_t i = s->n_registered; i < n_full; i++)
        tdm_kv_pool_register(&e->pool, s->blocks[i], s->keys[i]);
    s->n_registered = n_full;
}

/* ------------------------------------------- step-time bound (max_step_ms)
 *
 * A step's wall time grows with its rows (the matmuls of every row, the
 * attention of every row over its context). With cfg.max_step_ms set, the
 * engine keeps the measured wall time per row of recent steps and gives
 * prompt chunks only the rows that keep a step near the target: decode
 * rows (one per sequence) are never held back, and the first prompt chunk
 * of a step gets at least one block, so every prompt progresses. Before
 * any step was measured, prompt chunks take PROBE_ROWS rows. Chunk
 * boundaries never change a result (attention reads K/V back from the
 * cache), so a bound that follows the clock changes timing only. */
#define PROBE_ROWS 64

/* Rows the next step may hold (at least a block). */
static int32_t step_rows(const tdm_engine_t *e)
{
    int32_t max = e->cfg.max_num_batched_tokens;
    if (e->cfg.max_step_ms <= 0)
        return max;
    if (e->ms_per_row <= 0.0)
        return PROBE_ROWS < max ? PROBE_ROWS : max;
    double rows = (double)e->cfg.max_step_ms / e->ms_per_row;
    int32_t min_rows = e->cfg.block_size < max ? e->cfg.block_size : max;
    return rows >= (double)max ? max : rows <= (double)min_rows ? min_rows : (int32_t)rows;
}

/* Feeds a step's wall time into the per-row estimate: up fast (a slow step
 * is what the bound is for), down slowly. Steps of less than a block are
 * mostly fixed cost (reading the weights) and are left out. */
static void measure_step(tdm_engine_t *e, int32_t n_rows, double ms)
{
    if (e->cfg.max_step_ms <= 0 || n_rows < e->cfg.block_size)
        return;
    double sample = ms / (double)n_rows;
    if (e->ms_per_row <= 0.0)
        e->ms_per_row = sample;
    else
        e->ms_per_row += (sample > e->ms_per_row ? 0.5 : 0.2) * (sample - e->ms_per_row);
}

/* Whether a prompt chunk may still join a step that holds n_rows rows
 * (prompt_in: one already did). */
static bool prompt_room(const tdm_engine_t *e, int32_t n_rows, int32_t rows_cap, bool prompt_in)
{
    return !prompt_in || rows_cap - n_rows > 0 || e->cfg.max_step_ms <= 0;
}

/* A chunk of more than one token is a prompt chunk: it gets the rows left
 * under rows_cap, the first of a step at least a block. 0: not this step. */
static int32_t bound_chunk(const tdm_engine_t *e, int32_t chunk, int32_t n_rows, int32_t rows_cap,
                           bool *prompt_in)
{
    if (chunk <= 1)
        return chunk;
    int32_t room = rows_cap - n_rows;
    if (!*prompt_in && room < e->cfg.block_size)
        room = e->cfg.block_size;
    if (room <= 0)
        return 0;
    *prompt_in = true;
    return chunk < room ? chunk : room;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Copies the scheduler's counts where other threads read them. */
static void publish_stats(tdm_engine_t *e)
{
    e->live.num_running = e->n_running;
    e->live.num_waiting = e->n_waiting;
    e->live.num_free_blocks = tdm_kv_pool_num_free(&e->pool);
    e->live.num_cached_blocks = e->pool.n_lru;
    e->live.step_token_budget = step_rows(e);
    e->live.step_ms_per_row = (float)e->ms_per_row;
    pthread_mutex_lock(&e->lock);
    e->stats = e->live;
    pthread_mutex_unlock(&e->lock);
}

tdm_status_t tdm_engine_step(tdm_engine_t *e, bool *did_work)
{
    take_ops(e);
    handle_cancels(e);
    int32_t budget = e->cfg.max_num_batched_tokens;
    int32_t rows_cap = step_rows(e); /* under max_step_ms */
    int32_t n_rows = 0, n_logits = 0, n_tables = 0;
    bool preempted = false, prompt_in = false;
    tdm_seq_t *batch[TDM_ENGINE_MAX_SEQS];
    int32_t n_batch = 0;
    const int32_t max_batch = (int32_t)(sizeof(batch) / sizeof(batch[0]));

    /* 1. running sequences, oldest first */
    for (tdm_seq_t *s = e->running, *next; s != NULL && budget > 0; s = next) {
        next = s->next;
        if (n_logits >= e->max_logits || n_batch >= max_batch)
            break;
        int32_t chunk = s->n_tokens - s->n_computed;
        chunk = chunk < budget ? chunk : budget;
        chunk = bound_chunk(e, chunk, n_rows, rows_cap, &prompt_in);
        if (chunk == 0)
            continue; /* a prompt chunk, and the step is full under max_step_ms */
        bool self_preempted = false;
        while (!ensure_blocks(e, s, s->n_computed + chunk)) {
            tdm_seq_t *victim = newest_running(e);
            preempted = true;
            if (victim == s) {
                preempt(e, s);
                self_preempted = true;
                break;
            }
            if (victim == next)
                next = NULL; /* the rest of the list is gone */
            preempt(e, victim);
        }
        if (self_preempted)
            break;
        s->chunk = chunk;
        add_rows(e, s, n_tables++, &n_rows, &n_logits);
        batch[n_batch++] = s;
        budget -= chunk;
    }

    /* 2. admit waiting sequences while budget, slots and blocks allow */
    while (!preempted && e->waiting != NULL && budget > 0 && e->n_running < e->cfg.max_num_seqs &&
           n_logits < e->max_logits && n_batch < max_batch) {
        tdm_seq_t *s = e->waiting;
        int32_t bs = e->cfg.block_size;
        if ((s->n_tokens + bs - 1) / bs > e->pool.n_blocks) {
            list_remove(&e->waiting, s);
            e->n_waiting--;
            finish(e, s, TDM_FINISH_ERROR, "the prompt needs more KV blocks than the cache has");
            seq_free(s);
            continue;
        }
        if (s->n_tokens > 1 && !prompt_room(e, n_rows, rows_cap, prompt_in))
            break; /* the step is full under max_step_ms */
        if (e->cfg.enable_prefix_caching)
            match_prefix(e, s);
        int32_t chunk = s->n_tokens - s->n_computed;
        chunk = chunk < budget ? chunk : budget;
        /* Admit only if the whole remaining prompt fits (so admitted prefills
         * do not preempt each other), keeping a block per running sequence. */
        int32_t need = (s->n_tokens + bs - 1) / bs - s->n_blocks;
        if (need + e->n_running > tdm_kv_pool_num_free(&e->pool)) {
            seq_release_blocks(e, s); /* undo the prefix match */
            break;
        }
        if (s->kv_import != NULL) {
            /* The need check above leaves room for every block of the prompt. */
            if (!ensure_blocks(e, s, s->n_kv_tokens)) {
                seq_release_blocks(e, s);
                break;
            }
            import_prompt(e, s);
            chunk = s->n_tokens - s->n_computed;
            chunk = chunk < budget ? chunk : budget;
        }
        chunk = bound_chunk(e, chunk, n_rows, rows_cap, &prompt_in); /* >= 1: room was checked */
        if (!ensure_blocks(e, s, s->n_computed + chunk)) {
            seq_release_blocks(e, s);
            break;
        }
        if (!s->counted_prompt) {
            e->live.prompt_tokens += (uint64_t)s->n_prompt;
            if (e->cfg.enable_prefix_caching) {
                e->live.prefix_queries += (uint64_t)s->n_prompt;
                e->live.prefix_hits += (uint64_t)s->n_cached;
            }
            s->counted_prompt = true;
        }
        list_remove(&e->waiting, s);
        e->n_waiting--;
        list_append(&e->running, s);
        e->n_running++;
        s->state = TDM_SEQ_RUNNING;
        s->chunk = chunk;
        add_rows(e, s, n_tables++, &n_rows, &n_logits);
        batch[n_batch++] = s;
        budget -= chunk;
    }

    tdm_status_t st = TDM_OK;
    double t0 = n_rows > 0 ? now_ms() : 0.0;
    if (n_rows > 0) {
        /* The backend picks the tokens where the logits are when no request
         * of the step needs them on the host: the argmax when all are plain
         * greedy, its sampler otherwise. */
        bool greedy = e->be->ops->argmax != NULL && n_logits > 0;
        bool sampled = e->device_sample && n_logits > 0;
        for (int32_t i = 0; i < n_batch; i++) {
            if (batch[i]->logit_row < 0)
                continue;
            greedy = greedy && plain_greedy(batch[i]);
            sampled = sampled && device_sampleable(batch[i]);
        }
        sampled = sampled && !greedy;
        st = tdm_engine_forward(e, n_rows, n_tables, n_logits, !greedy && !sampled);
        if (st == TDM_OK && greedy)
            e->be->ops->argmax(e->be, e->logits, n_logits, e->model->hp.n_vocab, e->h_argmax);
        if (st == TDM_OK && sampled && !sample_on_device(e, batch, n_batch, n_logits)) {
            tdm_log_warn(MOD, "no memory for the penalty histories; sampling on the host");
            sampled = false;
            e->be->ops->copy_from(e->be, e->h_logits, e->logits,
                                  (size_t)n_logits * (size_t)e->model->hp.n_vocab * sizeof(float));
        }
        bool on_device = greedy || sampled;
        if (st == TDM_OK) {
            e->live.steps++;
            for (int32_t i = 0; i < n_batch; i++) {
                tdm_seq_t *s = batch[i];
                s->n_computed += s->chunk;
                if (s->kv_export != NULL && s->n_computed >= s->n_prompt)
                    export_prompt(e, s);
                register_blocks(e, s);
                if (s->logit_row >= 0 &&
                    sample_and_deliver(e, s, on_device ? e->h_argmax[s->logit_row] : -1,
                                       sampled && s->logprobs ? e->h_slogprob[s->logit_row] : 0.0f))
                    retire(e, s, true);
            }
            measure_step(e, n_rows, now_ms() - t0);
        }
    }
    publish_stats(e);
    *did_work = n_rows > 0;
    return st;
}

static bool has_work(tdm_engine_t *e)
{
    pthread_mutex_lock(&e->lock);
    bool queued = e->ops_head != NULL;
    pthread_mutex_unlock(&e->lock);
    return queued || e->running != NULL || e->waiting != NULL;
}

tdm_status_t tdm_engine_run_until_idle(tdm_engine_t *e)
{
    while (has_work(e)) {
        bool did;
        tdm_status_t st = tdm_engine_step(e, &did);
        if (st != TDM_OK)
            return st;
        if (!did && e->waiting != NULL && e->running == NULL) {
            /* Nothing runs and the head of the queue cannot be admitted. */
            tdm_seq_t *s = e->waiting;
            list_remove(&e->waiting, s);
            e->n_waiting--;
            finish(e, s, TDM_FINISH_ERROR, "not enough KV cache for this request");
            seq_free(s);
        }
    }
    return TDM_OK;
}

static void *engine_thread(void *arg)
{
    tdm_engine_t *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->lock);
        bool stop = e->stop_thread;
        pthread_mutex_unlock(&e->lock);
        if (stop)
            break;
        bool did = false;
        if (tdm_engine_step(e, &did) != TDM_OK)
            tdm_log_error(MOD, "a step failed; the engine goes on with the next one");
        if (!did) {
            pthread_mutex_lock(&e->lock);
            if (e->ops_head == NULL && !e->stop_thread) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 50 * 1000000L;
                if (ts.tv_nsec >= 1000000000L) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000L;
                }
                pthread_cond_timedwait(&e->wake, &e->lock, &ts);
            }
            pthread_mutex_unlock(&e->lock);
        }
    }
    return NULL;
}

tdm_status_t tdm_engine_start(tdm_engine_t *e)
{
    if (e->thread_started)
        return TDM_OK;
    e->stop_thread = false;
    if (pthread_create(&e->thread, NULL, engine_thread, e) != 0) {
        tdm_log_error(MOD, "could not start the engine thread: %s", strerror(errno));
        return TDM_ERR_NOMEM;
    }
    e->thread_started = true;
    return TDM_OK;
}

void tdm_engine_stop(tdm_engine_t *e)
{
    if (!e->thread_started)
        return;
    pthread_mutex_lock(&e->lock);
    e->stop_thread = true;
    pthread_cond_signal(&e->wake);
    pthread_mutex_unlock(&e->lock);
    pthread_join(e->thread, NULL);
    e->thread_started = false;
}

void tdm_engine_get_stats(tdm_engine_t *e, tdm_engine_stats_t *s)
{
    pthread_mutex_lock(&e->lock);
    *s = e->stats;
    pthread_mutex_unlock(&e->lock);
}

/* ----------------------------------------------------------------- eval */

void tdm_engine_kv_layout(const tdm_engine_t *e, tdm_kv_layout_t *out)
{
    const tdm_model_hparams_t *hp = &e->model->hp;
    *out = (tdm_kv_layout_t){.fingerprint = tdm_model_fingerprint(e->model),
                             .n_layer = hp->n_layer,
                             .n_head_kv = hp->n_head_kv,
                             .head_dim = hp->head_dim,
                             .block_size = e->cfg.block_size};
}

/* Forward over positions [from, to) of the private sequence whose blocks
 * are `blocks` (table 0); their logits into logits[from..to). */
static tdm_status_t eval_range(tdm_engine_t *e, const int32_t *tokens, size_t from, size_t to,
                               const int32_t *blocks, float *logits)
{
    int32_t bs = e->cfg.block_size;
    const int32_t V = e->model->hp.n_vocab;
    int32_t step = e->max_rows < e->max_logits ? e->max_rows : e->max_logits;
    tdm_status_t st = TDM_OK;
    for (size_t done = from; done < to && st == TDM_OK;) {
        int32_t chunk = (int32_t)((to - done) < (size_t)step ? (to - done) : (size_t)step);
        for (int32_t i = 0; i < chunk; i++) {
            int32_t pos = (int32_t)done + i;
            e->h_tokens[i] = tokens[pos];
            e->h_pos[i] = pos;
            e->h_slot[i] = blocks[pos / bs] * bs + pos % bs;
            e->h_ctx[i] = pos + 1;
            e->h_table[i] = 0;
            e->h_logit_idx[i] = i;
        }
        st = tdm_engine_forward(e, chunk, 1, chunk, true);
        memcpy(logits + done * (size_t)V, e->h_logits, (size_t)chunk * (size_t)V * sizeof(float));
        done += (size_t)chunk;
    }
    return st;
}

tdm_status_t tdm_engine_eval_split(tdm_engine_t *e, const int32_t *tokens, size_t n, size_t n_ctx,
                                   tdm_engine_kv_fn_t fn, void *user, float *logits)
{
    int32_t bs = e->cfg.block_size;
    if (n == 0 || n > (size_t)e->cfg.max_model_len || n_ctx > n)
        return TDM_ERR_INVALID;
    if (e->running != NULL || e->waiting != NULL || e->thread_started)
        return TDM_ERR_BUSY;
    int32_t nb = ((int32_t)n + bs - 1) / bs;
    if (nb > tdm_kv_pool_num_free(&e->pool))
        return TDM_ERR_NOMEM;
    int32_t *blocks = e->h_tables; /* table 0 */
    for (int32_t i = 0; i < nb; i++)
        blocks[i] = tdm_kv_pool_alloc(&e->pool);
    tdm_status_t st;
    int32_t n_done;
    if (fn == NULL || n_ctx == 0 || n_ctx == n) {
        st = eval_range(e, tokens, 0, n, blocks, logits);
    } else {
        st = eval_range(e, tokens, 0, n_ctx, blocks, logits);
        if (st == TDM_OK)
            st = visit_blocks(e, blocks, 0, (int32_t)n_ctx, KV_READ | KV_WRITE, fn, user, &n_done);
        if (st == TDM_OK)
            st = eval_range(e, tokens, n_ctx, n, blocks, logits);
    }
    for (int32_t i = 0; i < nb; i++)
        tdm_kv_pool_release(&e->pool, blocks[i]);
    return st;
}

tdm_status_t tdm_engine_set_act_hook(tdm_engine_t *e, tdm_engine_act_fn fn, void *user)
{
    if (fn != NULL && e->be->ops->device_memory)
        return TDM_ERR_UNSUPPORTED;
    e->act_hook = fn;
    e->act_user = user;
    return TDM_OK;
}

tdm_status_t tdm_engine_eval(tdm_engine_t *e, const int32_t *tokens, size_t n, float *logits)
{
    return tdm_engine_eval_split(e, tokens, n, 0, NULL, NULL, logits);
}
