/* tandem quantize's mixes: the type each tensor of a model gets.
 *
 * The rules are llama.cpp's, so that a Q4_K_M from tandem is what people
 * mean by Q4_K_M: the output matrix (the token embedding when the model
 * ties them) in Q6_K; in the _M mixes attn_v and ffn_down of the first and
 * last eighth of the layers and of every third layer between in Q6_K; and
 * a K-quant (or IQ4_XS) whose rows are not a multiple of 256 falls back to
 * a 32-block type of about the same size: Q2_K, Q3_K, IQ4_XS -> IQ4_NL,
 * Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "quant_tool.h"
#include "tandem/dtype.h"

static const quant_mix_t mixes[] = {
    {"F32", 0, TDM_DTYPE_F32, QUANT_RULE_FLOAT},
    {"F16", 1, TDM_DTYPE_F16, QUANT_RULE_FLOAT},
    {"BF16", 32, TDM_DTYPE_BF16, QUANT_RULE_FLOAT},
    {"Q8_0", 7, TDM_DTYPE_Q8_0, QUANT_RULE_PURE},
    {"Q4_0", 2, TDM_DTYPE_Q4_0, QUANT_RULE_PLAIN},
    {"Q4_1", 3, TDM_DTYPE_Q4_1, QUANT_RULE_PLAIN},
    {"Q5_0", 8, TDM_DTYPE_Q5_0, QUANT_RULE_PLAIN},
    {"Q5_1", 9, TDM_DTYPE_Q5_1, QUANT_RULE_PLAIN},
    {"Q2_K", 10, TDM_DTYPE_Q2_K, QUANT_RULE_Q2_K},
    {"Q3_K_M", 12, TDM_DTYPE_Q3_K, QUANT_RULE_Q3_K_M},
    {"Q4_K_S", 14, TDM_DTYPE_Q4_K, QUANT_RULE_K_S},
    {"Q4_K_M", 15, TDM_DTYPE_Q4_K, QUANT_RULE_K_M},
    {"Q5_K_S", 16, TDM_DTYPE_Q5_K, QUANT_RULE_PLAIN},
    {"Q5_K_M", 17, TDM_DTYPE_Q5_K, QUANT_RULE_K_M},
    {"Q6_K", 18, TDM_DTYPE_Q6_K, QUANT_RULE_PLAIN},
    {"IQ4_NL", 25, TDM_DTYPE_IQ4_NL, QUANT_RULE_IQ4},
    {"IQ4_XS", 30, TDM_DTYPE_IQ4_XS, QUANT_RULE_IQ4},
};

const quant_mix_t *quant_mix_find(const char *name)
{
    for (size_t i = 0; i < sizeof(mixes) / sizeof(mixes[0]); i++)
        if (strcasecmp(mixes[i].name, name) == 0)
            return &mixes[i];
    return NULL;
}

const char *quant_mix_names(void)
{
    return "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_S, "
           "Q5_K_M, Q6_K, IQ4_NL, IQ4_XS";
}

bool quant_uses_imp(uint32_t type)
{
    return type != TDM_DTYPE_F32 && type != TDM_DTYPE_F16 && type != TDM_DTYPE_BF16 &&
           type != TDM_DTYPE_Q8_0;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* The layer of "blk.N.*", or -1. */
static int32_t layer_of(const char *name)
{
    if (strncmp(name, "blk.", 4) != 0)
        return -1;
    char *end;
    long v = strtol(name + 4, &end, 10);
    return end != name + 4 && *end == '.' && v >= 0 && v < 1 << 20 ? (int32_t)v : -1;
}

static uint64_t meta_u32(const tdm_gguf_t *g, const char *arch, const char *suffix)
{
    char key[128];
    uint64_t v = 0;
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    return tdm_gguf_get_u64(g, key, &v) ? v : 0;
}

void quant_plan_init(quant_plan_t *p, const tdm_gguf_t *g, const quant_mix_t *mix)
{
    memset(p, 0, sizeof(*p));
    p->mix = mix;
    p->has_output = tdm_gguf_find_tensor(g, "output.weight") != NULL;
    tdm_str_t arch_s;
    char arch[64] = "llama";
    if (tdm_gguf_get_str(g, "general.architecture", &arch_s) && arch_s.len < sizeof(arch)) {
        memcpy(arch, arch_s.ptr, arch_s.len);
        arch[arch_s.len] = '\0';
    }
    p->n_layer = (int32_t)meta_u32(g, arch, "block_count");
    uint64_t nh = meta_u32(g, arch, "attention.head_count");
    uint64_t nkv = meta_u32(g, arch, "attention.head_count_kv");
    p->n_gqa = nh > 0 && nkv > 0 ? (int32_t)(nh / nkv) : 1;
    for (uint64_t i = 0; i < tdm_gguf_n_tensors(g); i++) {
        const tdm_gguf_tensor_t *t = tdm_gguf_tensor(g, i);
        char name[128];
        quant_tensor_name(t, name, sizeof(name));
        if (ends_with(name, "attn_v.weight"))
            p->n_attn_v++;
        if (t->n_dims >= 2)
            p->n_elements += t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
    }
}

void quant_tensor_name(const tdm_gguf_tensor_t *t, char *buf, size_t cap)
{
    size_t n = t->name.len < cap - 1 ? (size_t)t->name.len : cap - 1;
    memcpy(buf, t->name.ptr, n);
    buf[n] = '\0';
}

/* llama.cpp's "use more bits" layers: the first and last eighth, and every
 * third layer between. */
static bool more_bits(int32_t i, int32_t n)
{
    return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

static bool is_kquant(uint32_t t)
{
    return t == TDM_DTYPE_Q2_K || t == TDM_DTYPE_Q3_K || t == TDM_DTYPE_Q4_K ||
           t == TDM_DTYPE_Q5_K || t == TDM_DTYPE_Q6_K || t == TDM_DTYPE_IQ4_XS;
}

uint32_t quant_plan_type(quant_plan_t *p, const tdm_gguf_tensor_t *t, const char *name,
                         int *fallback)
{
    const quant_mix_t *mix = p->mix;
    *fallback = 0;
    if (t->n_dims < 2 || !ends_with(name, ".weight")) {
        /* norms and other vectors: as they are, in F32 for an F32 copy */
        if (mix->base == TDM_DTYPE_F32 && (t->type == TDM_DTYPE_F16 || t->type == TDM_DTYPE_BF16))
            return TDM_DTYPE_F32;
        return t->type;
    }
    if (mix->rule == QUANT_RULE_FLOAT)
        return mix->base;
    const bool is_output = strcmp(name, "output.weight") == 0 ||
                           (!p->has_output && strcmp(name, "token_embd.weight") == 0);
    const int32_t il = layer_of(name);
    uint32_t type = mix->base;
    if (mix->rule == QUANT_RULE_PURE) {
        /* every weight in the base type */
    } else if (is_output) {
        type = TDM_DTYPE_Q6_K;
    } else if (ends_with(name, "attn_v.weight")) {
        const int32_t i = p->i_attn_v++;
        switch (mix->rule) {
        case QUANT_RULE_K_M:
            if (more_bits(i, p->n_attn_v))
                type = TDM_DTYPE_Q6_K;
            break;
        case QUANT_RULE_K_S:
            if (i < 4)
                type = TDM_DTYPE_Q5_K;
            break;
        case QUANT_RULE_Q3_K_M: type = i < 2 ? TDM_DTYPE_Q5_K : TDM_DTYPE_Q4_K; break;
        case QUANT_RULE_Q2_K: type = p->n_gqa >= 4 ? TDM_DTYPE_Q4_K : TDM_DTYPE_Q3_K; break;
        case QUANT_RULE_IQ4:
            if (p->n_gqa >= 4)
                type = TDM_DTYPE_Q5_K;
            break;
        default: break;
        }
    } else if (ends_with(name, "ffn_down.weight") && il >= 0) {
        switch (mix->rule) {
        case QUANT_RULE_K_M:
            if (more_bits(il, p->n_layer))
                type = TDM_DTYPE_Q6_K;
            break;
        case QUANT_RULE_K_S:
            if (il < p->n_layer / 8)
                type = TDM_DTYPE_Q5_K;
            break;
        case QUANT_RULE_Q3_K_M:
            type = il < p->n_layer / 16        ? TDM_DTYPE_Q5_K
                   : more_bits(il, p->n_layer) ? TDM_DTYPE_Q4_K
                                               : TDM_DTYPE_Q3_K;
            break;
        case QUANT_RULE_Q2_K: type = TDM_DTYPE_Q3_K; break;
        default: break;
        }
    } else if (ends_with(name, "attn_output.weight")) {
        if (mix->rule == QUANT_RULE_Q3_K_M)
            type = TDM_DTYPE_Q4_K;
        else if (mix->rule == QUANT_RULE_Q2_K)
            type = TDM_DTYPE_Q3_K;
    }
    if (is_kquant(type) && t->ne[0] % 256 != 0) {
        *fallback = 1;
        switch (type) {
        case TDM_DTYPE_Q4_K: type = TDM_DTYPE_Q5_0; break;
        case TDM_DTYPE_Q5_K: type = TDM_DTYPE_Q5_1; break;
        case TDM_DTYPE_Q6_K: type = TDM_DTYPE_Q8_0; break;
        default: type = TDM_DTYPE_IQ4_NL; break;
        }
    }
    if (t->ne[0] % tdm_dtype_block_elems(type) != 0) { /* no 32-block either: keep it */
        *fallback = 1;
        type = t->type == TDM_DTYPE_F32 ? TDM_DTYPE_F32 : TDM_DTYPE_F16;
    }
    return type;
}

/* A NUL-terminated copy of a GGUF string. */
static char *str_dup(tdm_str_t s)
{
    char *p = malloc(s.len + 1);
    if (p != NULL) {
        memcpy(p, s.ptr, s.len);
        p[s.len] = '\0';
    }
    return p;
}

static tdm_status_t copy_kv(const tdm_gguf_kv_t *kv, const char *key, tdm_gguf_writer_t *w,
                            char *err, size_t err_len)
{
    switch (kv->type) {
    case TDM_GGUF_TYPE_UINT32: {
        uint32_t v;
        memcpy(&v, kv->data, 4);
        return tdm_gguf_writer_set_u32(w, key, v);
    }
    case TDM_GGUF_TYPE_INT32: {
        int32_t v;
        memcpy(&v, kv->data, 4);
        return tdm_gguf_writer_set_i32(w, key, v);
    }
    case TDM_GGUF_TYPE_UINT64: {
        uint64_t v;
        memcpy(&v, kv->data, 8);
        return tdm_gguf_writer_set_u64(w, key, v);
    }
    case TDM_GGUF_TYPE_FLOAT32: {
        float v;
        memcpy(&v, kv->data, 4);
        return tdm_gguf_writer_set_f32(w, key, v);
    }
    case TDM_GGUF_TYPE_BOOL: return tdm_gguf_writer_set_bool(w, key, *(const uint8_t *)kv->data);
    case TDM_GGUF_TYPE_STRING: {
        char *v = str_dup(kv->strs[0]);
        tdm_status_t st = v != NULL ? tdm_gguf_writer_set_str(w, key, v) : TDM_ERR_NOMEM;
        free(v);
        return st;
    }
    case TDM_GGUF_TYPE_ARRAY:
        if (kv->arr_type == TDM_GGUF_TYPE_STRING) {
            char **v = calloc(kv->arr_len ? kv->arr_len : 1, sizeof(char *));
            tdm_status_t st = v != NULL ? TDM_OK : TDM_ERR_NOMEM;
            for (uint64_t i = 0; st == TDM_OK && i < kv->arr_len; i++)
                if ((v[i] = str_dup(kv->strs[i])) == NULL)
                    st = TDM_ERR_NOMEM;
            if (st == TDM_OK)
                st = tdm_gguf_writer_set_str_array(w, key, (const char *const *)v, kv->arr_len);
            for (uint64_t i = 0; v != NULL && i < kv->arr_len; i++)
                free(v[i]);
            free(v);
            return st;
        }
        return tdm_gguf_writer_set_array(w, key, kv->arr_type, kv->data, kv->arr_len);
    default:
        snprintf(err, err_len,
                 "metadata key '%s' has a scalar type (%d) that tandem's writer cannot copy yet",
                 key, (int)kv->type);
        return TDM_ERR_UNSUPPORTED;
    }
}

tdm_status_t quant_copy_metadata(const tdm_gguf_t *g, tdm_gguf_writer_t *w, const quant_mix_t *mix,
                                 char *err, size_t err_len)
{
    for (uint64_t i = 0; i < tdm_gguf_n_kv(g); i++) {
        const tdm_gguf_kv_t *kv = tdm_gguf_kv(g, i);
        char *key = str_dup(kv->key);
        if (key == NULL)
            return TDM_ERR_NOMEM;
        tdm_status_t st = TDM_OK;
        if (strcmp(key, "general.file_type") != 0 &&
            strcmp(key, "general.quantization_version") != 0 && strncmp(key, "split.", 6) != 0) {
            snprintf(err, err_len, "metadata key '%s' could not be copied", key);
            st = copy_kv(kv, key, w, err, err_len);
        }
        free(key);
        if (st != TDM_OK)
            return st;
    }
    tdm_status_t st = tdm_gguf_writer_set_u32(w, "general.file_type", mix->file_type);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_u32(w, "general.quantization_version", 2);
    if (st != TDM_OK)
        snprintf(err, err_len, "out of memory writing metadata");
    return st;
}

tdm_status_t quant_write_split(const tdm_gguf_writer_t *w, const char *path, uint64_t max_bytes,
                               int *n_shards, char *err, size_t err_len)
{
    char prefix[1024];
    size_t n = strlen(path);
    if (n >= 5 && strcmp(path + n - 5, ".gguf") == 0)
        n -= 5;
    if (n == 0 || n >= sizeof(prefix)) {
        snprintf(err, err_len, "output name '%s' gives no shard prefix", path);
        return TDM_ERR_INVALID;
    }
    memcpy(prefix, path, n);
    prefix[n] = '\0';
    return tdm_gguf_writer_write_split(w, prefix, max_bytes, n_shards, err, err_len);
}
