/* Loading a Llama-architecture GGUF model into a backend. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model_internal.h"
#include "tandem/log.h"

#define MOD "model"

__attribute__((format(printf, 3, 4))) static void set_err(char *err, size_t err_len,
                                                          const char *fmt, ...)
{
    if (err == NULL || err_len == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

/* Reads an integer hyper-parameter "<arch>.<name>". */
static bool hp_u64(const tdm_gguf_t *g, const char *arch, const char *name, uint64_t *out)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, name);
    return tdm_gguf_get_u64(g, key, out);
}

static bool hp_f32(const tdm_gguf_t *g, const char *arch, const char *name, float *out)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, name);
    return tdm_gguf_get_f32(g, key, out);
}

/* Finds a tensor and checks its shape: ne0 (row length) and ne1 (rows). */
static tdm_status_t find_matrix(const tdm_gguf_t *g, const char *name, uint64_t ne0, uint64_t ne1,
                                char *err, size_t err_len, const tdm_gguf_tensor_t **out)
{
    const tdm_gguf_tensor_t *t = tdm_gguf_find_tensor(g, name);
    if (t == NULL) {
        set_err(err, err_len, "tensor '%s' is missing", name);
        return TDM_ERR_FORMAT;
    }
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1) {
        if (err != NULL)
            snprintf(err, err_len,
                     "tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%llu, %llu]", name,
                     (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                     (unsigned long long)t->ne[2], (unsigned long long)t->ne[3],
                     (unsigned long long)ne0, (unsigned long long)ne1);
        return TDM_ERR_FORMAT;
    }
    if (t->ne[0] % tdm_dtype_block_elems(t->type) != 0) {
        set_err(err, err_len, "tensor '%s': row length is not a multiple of the %s block size",
                name, tdm_dtype_name(t->type));
        return TDM_ERR_FORMAT;
    }
    /* A NaN or infinite scale (or float weight) would turn every answer
     * into NaN: refuse it with where it is. */
    uint64_t bad_at;
    char what[128];
    if (tdm_dtype_validate(t->type, t->data, t->nbytes, &bad_at, what, sizeof(what))) {
        uint64_t data_off = 0;
        uint32_t shard = tdm_gguf_n_shards(g) > 1 ? t->shard : 0;
        (void)tdm_gguf_shard_data(g, shard, NULL, &data_off);
        if (err != NULL)
            snprintf(err, err_len,
                     "tensor '%s' (%s, data at byte %" PRIu64 "%s): %s at byte %" PRIu64, name,
                     tdm_dtype_name(t->type), data_off + t->offset,
                     tdm_gguf_n_shards(g) > 1 ? " of its shard" : "", what,
                     data_off + t->offset + bad_at);
        return TDM_ERR_FORMAT;
    }
    *out = t;
    return TDM_OK;
}

static tdm_status_t load_matrix(tdm_model_t *m, const char *name, uint64_t ne0, uint64_t ne1,
                                char *err, size_t err_len, tdm_bweight_t **out, uint32_t *type)
{
    const tdm_gguf_tensor_t *t;
    tdm_status_t st = find_matrix(m->gguf, name, ne0, ne1, err, err_len, &t);
    if (st != TDM_OK)
        return st;
    st = m->be->ops->weight_load(m->be, t->data, t->type, (int64_t)ne1, (int64_t)ne0, out);
    if (st != TDM_OK) {
        set_err(err, err_len, "tensor '%s': the backend could not load it (%s)", name,
                tdm_status_str(st));
        return st;
    }
    *type = t->type;
    m->weight_bytes += t->nbytes;
    if (m->be->ops->weight_uses_source != NULL && !m->be->ops->weight_uses_source(m->be, *out))
        tdm_gguf_release_data(m->gguf, t); /* repacked: no second resident copy */
    return TDM_OK;
}

/* A norm weight as an f32 backend buffer (converted if stored as F16). */
static tdm_status_t load_vector(tdm_model_t *m, const char *name, uint64_t n, char *err,
                                size_t err_len, float **out)
{
    const tdm_gguf_tensor_t *t;
    tdm_status_t st = find_matrix(m->gguf, name, n, 1, err, err_len, &t);
    if (st != TDM_OK)
        return st;
    if (t->type != TDM_DTYPE_F32 && t->type != TDM_DTYPE_F16) {
        set_err(err, err_len, "tensor '%s' has type %s; norm weights must be F32 or F16", name,
                tdm_dtype_name(t->type));
        return TDM_ERR_UNSUPPORTED;
    }
    float *host = malloc(n * sizeof(float));
    float *buf = m->be->ops->buf_alloc(m->be, n * sizeof(float));
    if (host == NULL || buf == NULL) {
        free(host);
        if (buf != NULL)
            m->be->ops->buf_free(m->be, buf);
        set_err(err, err_len, "out of memory loading '%s'", name);
        return TDM_ERR_NOMEM;
    }
    tdm_dtype_to_f32(t->type, t->data, host, n);
    m->be->ops->copy_to(m->be, buf, host, n * sizeof(float));
    free(host);
    m->weight_bytes += t->nbytes;
    *out = buf;
    return TDM_OK;
}

static tdm_status_t read_hparams(tdm_model_t *m, char *err, size_t err_len)
{
    const tdm_gguf_t *g = m->gguf;
    tdm_str_t arch_s;
    if (!tdm_gguf_get_str(g, "general.architecture", &arch_s)) {
        set_err(err, err_len, "metadata 'general.architecture' is missing");
        return TDM_ERR_FORMAT;
    }
    char arch[32];
    snprintf(arch, sizeof(arch), "%.*s", (int)(arch_s.len < 31 ? arch_s.len : 31), arch_s.ptr);
    if (strcmp(arch, "llama") != 0) {
        set_err(err, err_len, "architecture '%s' is not supported (tandem runs 'llama')", arch);
        return TDM_ERR_UNSUPPORTED;
    }
    static const char *const req[] = {"block_count", "embedding_length", "feed_forward_length",
                                      "attention.head_count"};
    uint64_t v[4];
    for (int i = 0; i < 4; i++) {
        if (!hp_u64(g, arch, req[i], &v[i]) || v[i] == 0 || v[i] > (1u << 20)) {
            set_err(err, err_len, "metadata '%s.%s' is missing or out of range", arch, req[i]);
            return TDM_ERR_FORMAT;
        }
    }
    tdm_model_hparams_t *hp = &m->hp;
    hp->n_layer = (int32_t)v[0];
    hp->n_embd = (int32_t)v[1];
    hp->n_ff = (int32_t)v[2];
    hp->n_head = (int32_t)v[3];
    uint64_t x;
    hp->n_head_kv = hp_u64(g, arch, "attention.head_count_kv", &x) ? (int32_t)x : hp->n_head;
    if (hp->n_head_kv <= 0 || hp->n_head % hp->n_head_kv != 0 || hp->n_embd % hp->n_head != 0) {
        set_err(err, err_len, "head counts do not divide: check '%s.attention.head_count_kv'",
                arch);
        return TDM_ERR_FORMAT;
    }
    hp->head_dim = hp->n_embd / hp->n_head;
    if (hp_u64(g, arch, "attention.key_length", &x) && x != (uint64_t)hp->head_dim) {
        set_err(err, err_len, "'%s.attention.key_length' differs from n_embd / n_head", arch);
        return TDM_ERR_UNSUPPORTED;
    }
    hp->n_rot = hp_u64(g, arch, "rope.dimension_count", &x) ? (int32_t)x : hp->head_dim;
    if (hp->n_rot <= 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2 != 0) {
        set_err(err, err_len, "'%s.rope.dimension_count' is out of range", arch);
        return TDM_ERR_FORMAT;
    }
    if (!hp_f32(g, arch, "rope.freq_base", &hp->rope_theta))
        hp->rope_theta = 10000.0f;
    if (!hp_f32(g, arch, "attention.layer_norm_rms_epsilon", &hp->norm_eps))
        hp->norm_eps = 1e-5f;
    hp->n_ctx_train = hp_u64(g, arch, "context_length", &x) && x < (1u << 24) ? (int32_t)x : 2048;
    const tdm_gguf_tensor_t *emb = tdm_gguf_find_tensor(g, "token_embd.weight");
    if (emb == NULL) {
        set_err(err, err_len, "tensor 'token_embd.weight' is missing");
        return TDM_ERR_FORMAT;
    }
    if (emb->ne[1] == 0 || emb->ne[1] > (1u << 24)) {
        set_err(err, err_len, "tensor 'token_embd.weight' has a bad vocabulary size");
        return TDM_ERR_FORMAT;
    }
    hp->n_vocab = (int32_t)emb->ne[1];
    return TDM_OK;
}

static tdm_status_t load_weights(tdm_model_t *m, char *err, size_t err_len)
{
    const tdm_model_hparams_t *hp = &m->hp;
    uint64_t d = (uint64_t)hp->n_embd, q = (uint64_t)hp->n_head * (uint64_t)hp->head_dim;
    uint64_t kv = (uint64_t)hp->n_head_kv * (uint64_t)hp->head_dim, ff = (uint64_t)hp->n_ff;
    uint32_t t_emb;
    tdm_status_t st = load_matrix(m, "token_embd.weight", d, (uint64_t)hp->n_vocab, err, err_len,
                                  &m->tok_embd, &t_emb);
    if (st != TDM_OK)
        return st;
    if (tdm_gguf_find_tensor(m->gguf, "output.weight") != NULL) {
        st = load_matrix(m, "output.weight", d, (uint64_t)hp->n_vocab, err, err_len, &m->output,
                         &m->output_type);
        if (st != TDM_OK)
            return st;
    } else {
        m->output = m->tok_embd; /* tied embeddings */
        m->output_type = t_emb;
    }
    st = load_vector(m, "output_norm.weight", d, err, err_len, &m->output_norm);
    if (st != TDM_OK)
        return st;
    m->layers = calloc((size_t)hp->n_layer, sizeof(*m->layers));
    if (m->layers == NULL)
        return TDM_ERR_NOMEM;
    char name[96];
    for (int32_t il = 0; il < hp->n_layer; il++) {
        tdm_layer_weights_t *L = &m->layers[il];
        struct {
            const char *suffix;
            uint64_t ne0, ne1;
            tdm_bweight_t **w;
            uint32_t *type;
        } mats[] = {
            {"attn_q", d, q, &L->wq, &L->q_type},
            {"attn_k", d, kv, &L->wk, &L->k_type},
            {"attn_v", d, kv, &L->wv, &L->v_type},
            {"attn_output", q, d, &L->wo, &L->o_type},
            {"ffn_gate", d, ff, &L->w_gate, &L->gate_type},
            {"ffn_up", d, ff, &L->w_up, &L->up_type},
            {"ffn_down", ff, d, &L->w_down, &L->down_type},
        };
        for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++) {
            snprintf(name, sizeof(name), "blk.%d.%s.weight", il, mats[i].suffix);
            st = load_matrix(m, name, mats[i].ne0, mats[i].ne1, err, err_len, mats[i].w,
                             mats[i].type);
            if (st != TDM_OK)
                return st;
        }
        snprintf(name, sizeof(name), "blk.%d.attn_norm.weight", il);
        st = load_vector(m, name, d, err, err_len, &L->attn_norm);
        if (st != TDM_OK)
            return st;
        snprintf(name, sizeof(name), "blk.%d.ffn_norm.weight", il);
        st = load_vector(m, name, d, err, err_len, &L->ffn_norm);
        if (st != TDM_OK)
            return st;
    }
    return TDM_OK;
}

tdm_status_t tdm_model_load(const char *path, tdm_backend_t *be, char *err, size_t err_len,
                            tdm_model_t **out)
{
    tdm_model_t *m = calloc(1, sizeof(*m));
    if (m == NULL)
        return TDM_ERR_NOMEM;
    m->be = be;
    tdm_status_t st = tdm_gguf_open(path, false, err, err_len, &m->gguf);
    if (st != TDM_OK)
        goto err_free;
    st = read_hparams(m, err, err_len);
    if (st != TDM_OK)
        goto err_free;
    st = tdm_tokenizer_create(m->gguf, err, err_len, &m->tok);
    if (st != TDM_OK)
        goto err_free;
    if (tdm_tokenizer_n_vocab(m->tok) > m->hp.n_vocab) {
        set_err(err, err_len, "the vocabulary has more tokens than 'token_embd.weight' has rows");
        st = TDM_ERR_FORMAT;
        goto err_free;
    }
    st = load_weights(m, err, err_len);
    if (st != TDM_OK)
        goto err_free;
    /* The fingerprint covers the header, metadata and tensor table. */
    size_t flen;
    const void *file = tdm_gguf_file_data(m->gguf, &flen);
    m->fingerprint = tdm_hash128(file, (size_t)tdm_gguf_data_offset(m->gguf), 0x74616e64656d);
    tdm_str_t nm;
    const char *base = strrchr(path, '/');
    if (tdm_gguf_get_str(m->gguf, "general.name", &nm) && nm.len > 0)
        snprintf(m->name, sizeof(m->name), "%.*s", (int)(nm.len < 127 ? nm.len : 127), nm.ptr);
    else
        snprintf(m->name, sizeof(m->name), "%s", base ? base + 1 : path);
    const tdm_model_hparams_t *hp = &m->hp;
    tdm_log_info(MOD,
                 "loaded %s: llama, %d layers, hidden %d, ffn %d, heads %d/%d (kv), head dim %d, "
                 "vocab %d, rope theta %.0f, %.1f MB of weights",
                 path, hp->n_layer, hp->n_embd, hp->n_ff, hp->n_head, hp->n_head_kv, hp->head_dim,
                 hp->n_vocab, hp->rope_theta, (double)m->weight_bytes / 1e6);
    *out = m;
    return TDM_OK;

err_free:
    tdm_model_destroy(m);
    return st;
}

void tdm_model_destroy(tdm_model_t *m)
{
    if (m == NULL)
        return;
    tdm_backend_t *be = m->be;
    if (m->layers != NULL) {
        for (int32_t il = 0; il < m->hp.n_layer; il++) {
            tdm_layer_weights_t *L = &m->layers[il];
            tdm_bweight_t *ws[] = {L->wq, L->wk, L->wv, L->wo, L->w_gate, L->w_up, L->w_down};
            for (size_t i = 0; i < sizeof(ws) / sizeof(ws[0]); i++)
                if (ws[i] != NULL)
                    be->ops->weight_free(be, ws[i]);
            if (L->attn_norm != NULL)
                be->ops->buf_free(be, L->attn_norm);
            if (L->ffn_norm != NULL)
                be->ops->buf_free(be, L->ffn_norm);
        }
        free(m->layers);
    }
    if (m->output != NULL && m->output != m->tok_embd)
        be->ops->weight_free(be, m->output);
    if (m->tok_embd != NULL)
        be->ops->weight_free(be, m->tok_embd);
    if (m->output_norm != NULL)
        be->ops->buf_free(be, m->output_norm);
    tdm_tokenizer_destroy(m->tok);
    tdm_gguf_close(m->gguf);
    free(m);
}

const tdm_model_hparams_t *tdm_model_hparams(const tdm_model_t *m)
{
    return &m->hp;
}
const tdm_tokenizer_t *tdm_model_tokenizer(const tdm_model_t *m)
{
    return m->tok;
}
const tdm_gguf_t *tdm_model_gguf(const tdm_model_t *m)
{
    return m->gguf;
}
tdm_backend_t *tdm_model_backend(const tdm_model_t *m)
{
    return m->be;
}
tdm_hash128_t tdm_model_fingerprint(const tdm_model_t *m)
{
    return m->fingerprint;
}
const char *tdm_model_name(const tdm_model_t *m)
{
    return m->name;
}
uint64_t tdm_model_weight_bytes(const tdm_model_t *m)
{
    return m->weight_bytes;
}
