/* tandem mkmodel: a small Llama GGUF with random weights, for tests that
 * need no real weights. Its vocabulary is byte-level BPE: three special
 * tokens, the 256 bytes in GPT-2's printable alphabet, then merges of
 * frequent English letter pairs and of earlier merges, up to --n-vocab
 * (or the vocabulary of --vocab-from). */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tandem/dtype.h"
#include "tandem/gguf.h"
#include "tool.h"

static float rng_normal(uint64_t *r)
{
    double u1 = ((double)(tool_rng_next(r) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = (double)(tool_rng_next(r) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static uint32_t parse_type(const char *s)
{
    static const struct {
        const char *name;
        uint32_t t;
    } types[] = {{"f32", TDM_DTYPE_F32},
                 {"f16", TDM_DTYPE_F16},
                 {"q4_0", TDM_DTYPE_Q4_0},
                 {"q4_1", TDM_DTYPE_Q4_1},
                 {"q8_0", TDM_DTYPE_Q8_0}};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (strcmp(s, types[i].name) == 0)
            return types[i].t;
    return UINT32_MAX;
}

/* GPT-2's byte -> printable code point, written as UTF-8 into out. */
static void byte_token(int b, char *out)
{
    int cp = b;
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    if (!printable) {
        int n = 0;
        for (int x = 0; x < b; x++)
            if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174)))
                n++;
        cp = 256 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        out[2] = 0;
    }
}

/* Tensors of at least this many values (an 8B-shaped model's) are made
 * on every CPU, with uniform values of the same mean and deviation: Box-
 * Muller on one thread would take minutes there. */
#define MK_BIG_TENSOR (1u << 22)

typedef struct fill_task {
    uint64_t seed, k, rows;
    uint32_t type;
    float std, mean;
    size_t rb;
    char *q;
    int ith, nth;
} fill_task_t;

static void *fill_rows(void *arg)
{
    fill_task_t *t = arg;
    uint64_t lo = t->rows * (uint64_t)t->ith / (uint64_t)t->nth;
    uint64_t hi = t->rows * (uint64_t)(t->ith + 1) / (uint64_t)t->nth;
    float *x = malloc((size_t)t->k * sizeof(float));
    if (x == NULL)
        return t;                     /* non-NULL: failed */
    float half = t->std * 1.7320508f; /* uniform on [-a, a] has deviation a / sqrt(3) */
    for (uint64_t row = lo; row < hi; row++) {
        uint64_t r = t->seed ^ (row * 0x9e3779b97f4a7c15ull); /* per row: any thread count */
        for (uint64_t j = 0; j < t->k; j++) {
            double u = (double)(tool_rng_next(&r) >> 11) / 9007199254740992.0;
            x[j] = t->mean + half * (float)(2.0 * u - 1.0);
        }
        tdm_dtype_from_f32(t->type, x, t->q + row * t->rb, (size_t)t->k);
    }
    free(x);
    return NULL;
}

static tdm_status_t add_random(tdm_gguf_writer_t *w, uint64_t *r, const char *name, uint64_t k,
                               uint64_t rows, uint32_t type, float std, float mean)
{
    size_t n = (size_t)(k * rows);
    size_t rb = tdm_dtype_row_bytes(type, k);
    void *q = malloc(rb * rows);
    tdm_status_t st = TDM_ERR_NOMEM;
    if (n >= MK_BIG_TENSOR && q != NULL && rb > 0) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        int nth = ncpu < 1 ? 1 : ncpu > 64 ? 64 : (int)ncpu;
        pthread_t th[64];
        fill_task_t tasks[64];
        uint64_t seed = tool_rng_next(r);
        int started = 0;
        bool ok = true;
        for (int i = 0; i < nth; i++) {
            tasks[i] = (fill_task_t){seed, k, rows, type, std, mean, rb, q, i, nth};
            if (pthread_create(&th[i], NULL, fill_rows, &tasks[i]) != 0) {
                ok = false;
                break;
            }
            started++;
        }
        for (int i = 0; i < started; i++) {
            void *ret = NULL;
            pthread_join(th[i], &ret);
            ok = ok && ret == NULL;
        }
        if (ok) {
            uint64_t ne[2] = {k, rows};
            st = tdm_gguf_writer_add_tensor(w, name, rows == 1 ? 1 : 2, ne, type, q);
        }
        free(q);
        return st;
    }
    float *x = malloc(n * sizeof(float));
    if (x != NULL && q != NULL && rb > 0) {
        for (size_t i = 0; i < n; i++)
            x[i] = mean + std * rng_normal(r);
        for (uint64_t i = 0; i < rows; i++)
            tdm_dtype_from_f32(type, x + i * k, (char *)q + i * rb, k);
        uint64_t ne[2] = {k, rows};
        st = tdm_gguf_writer_add_tensor(w, name, rows == 1 ? 1 : 2, ne, type, q);
    }
    free(x);
    free(q);
    return st;
}

/* The synthetic vocabulary: specials, bytes, merges. */
static tdm_status_t write_vocab(tdm_gguf_writer_t *w, int n_vocab, uint64_t *r)
{
    char **toks = calloc((size_t)n_vocab, sizeof(char *));
    char **merges = calloc((size_t)n_vocab, sizeof(char *));
    int32_t *types = calloc((size_t)n_vocab, sizeof(int32_t));
    tdm_status_t st = TDM_ERR_NOMEM;
    int nt = 0, nm = 0;
    if (toks == NULL || merges == NULL || types == NULL)
        goto out;
    static const char *const specials[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    for (int i = 0; i < 3; i++) {
        toks[nt] = strdup(specials[i]);
        types[nt++] = 3; /* control */
    }
    for (int b = 0; b < 256; b++) {
        char buf[4];
        byte_token(b, buf);
        toks[nt] = strdup(buf);
        types[nt++] = 1;
    }
    /* Merges: English letter pairs first ("Ġ" is the space byte), then
     * random pairs of existing tokens, skipping duplicates. */
    static const char *const seeds[] = {"Ġ t", "h e", "Ġ a",   "i n", "e r", "o n", "r e", "a n",
                                        "e n", "a t", "Ġt he", "o r", "e s", "i s", "Ġ s", "Ġ w"};
    for (int guard = 0; nt < n_vocab && guard < 100 * n_vocab; guard++) {
        char a[64], b[64];
        if (nm < (int)(sizeof(seeds) / sizeof(seeds[0]))) {
            sscanf(seeds[nm], "%63s %63s", a, b);
        } else {
            int i = 3 + (int)(tool_rng_next(r) % (uint64_t)(nt - 3));
            int j = 3 + (int)(tool_rng_next(r) % (uint64_t)(nt - 3));
            if (strlen(toks[i]) + strlen(toks[j]) > 12)
                continue;
            snprintf(a, sizeof(a), "%s", toks[i]);
            snprintf(b, sizeof(b), "%s", toks[j]);
        }
        char joined[128];
        snprintf(joined, sizeof(joined), "%s%s", a, b);
        bool dup = false;
        for (int i = 0; i < nt && !dup; i++)
            dup = strcmp(toks[i], joined) == 0;
        if (dup) {
            if (nm < (int)(sizeof(seeds) / sizeof(seeds[0])))
                nm++; /* skip a seed that already exists */
            continue;
        }
        char m[130];
        snprintf(m, sizeof(m), "%s %s", a, b);
        merges[nm++] = strdup(m);
        toks[nt] = strdup(joined);
        types[nt++] = 1;
    }
    st = tdm_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_str(w, "tokenizer.ggml.pre", "smollm");
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", (const char *const *)toks,
                                           (uint64_t)nt);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_array(w, "tokenizer.ggml.token_type", TDM_GGUF_TYPE_INT32, types,
                                       (uint64_t)nt);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_str_array(w, "tokenizer.ggml.merges", (const char *const *)merges,
                                           (uint64_t)nm);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", false);
out:
    for (int i = 0; toks != NULL && i < nt; i++)
        free(toks[i]);
    for (int i = 0; merges != NULL && i < nm; i++)
        free(merges[i]);
    free(toks);
    free(merges);
    free(types);
    return st;
}

/* Copies the tokenizer.* keys of another GGUF (e.g. a real vocabulary). */
static tdm_status_t copy_vocab(tdm_gguf_writer_t *w, const char *path, int *n_vocab)
{
    tdm_gguf_t *g;
    char err[256];
    tdm_status_t st = tdm_gguf_open(path, true, err, sizeof(err), &g);
    if (st != TDM_OK) {
        fprintf(stderr, "tandem mkmodel: cannot read %s: %s\n", path, err);
        return st;
    }
    for (uint64_t i = 0; i < tdm_gguf_n_kv(g) && st == TDM_OK; i++) {
        const tdm_gguf_kv_t *kv = tdm_gguf_kv(g, i);
        char key[256];
        if (kv->key.len >= sizeof(key) || strncmp(kv->key.ptr, "tokenizer.", 10) != 0)
            continue;
        memcpy(key, kv->key.ptr, kv->key.len);
        key[kv->key.len] = 0;
        if (kv->type == TDM_GGUF_TYPE_STRING) {
            const tdm_str_t *s = &kv->strs[0];
            char *v = strndup(s->ptr, s->len);
            st = v ? tdm_gguf_writer_set_str(w, key, v) : TDM_ERR_NOMEM;
            free(v);
        } else if (kv->type == TDM_GGUF_TYPE_ARRAY && kv->arr_type == TDM_GGUF_TYPE_STRING) {
            char **v = calloc(kv->arr_len + 1, sizeof(char *));
            for (uint64_t j = 0; v != NULL && j < kv->arr_len; j++)
                v[j] = strndup(kv->strs[j].ptr, kv->strs[j].len);
            st = v ? tdm_gguf_writer_set_str_array(w, key, (const char *const *)v, kv->arr_len)
                   : TDM_ERR_NOMEM;
            if (strcmp(key, "tokenizer.ggml.tokens") == 0)
                *n_vocab = (int)kv->arr_len;
            for (uint64_t j = 0; v != NULL && j < kv->arr_len; j++)
                free(v[j]);
            free(v);
        } else if (kv->type == TDM_GGUF_TYPE_ARRAY) {
            st = tdm_gguf_writer_set_array(w, key, kv->arr_type, kv->data, kv->arr_len);
        } else if (kv->type == TDM_GGUF_TYPE_BOOL) {
            st = tdm_gguf_writer_set_bool(w, key, *(const uint8_t *)kv->data != 0);
        } else {
            uint64_t u;
            if (tdm_gguf_get_u64(g, key, &u))
                st = tdm_gguf_writer_set_u32(w, key, (uint32_t)u);
        }
    }
    tdm_gguf_close(g);
    return st;
}

int cmd_mkmodel(int argc, char **argv)
{
    const char *out = NULL, *type_s = "q4_1", *embd_type_s = "q8_0", *vocab_from = NULL;
    const char *preset = NULL;
    int n_embd = 64, n_ff = 128, n_layer = 2, n_head = 4, n_head_kv = 2, n_vocab = 512;
    int ctx = 2048;
    uint64_t seed = 1;
    float theta = 10000.0f;
    tdm_flag_t flags[] = {
        {"out", 'o', TDM_FLAG_TYPE_STR, &out, "output GGUF path", NULL},
        {"n-embd", 0, TDM_FLAG_TYPE_INT, &n_embd, "hidden size (multiple of 32)", NULL},
        {"n-ff", 0, TDM_FLAG_TYPE_INT, &n_ff, "feed-forward size (multiple of 32)", NULL},
        {"n-layer", 0, TDM_FLAG_TYPE_INT, &n_layer, "layers", NULL},
        {"n-head", 0, TDM_FLAG_TYPE_INT, &n_head, "query heads", NULL},
        {"n-head-kv", 0, TDM_FLAG_TYPE_INT, &n_head_kv, "key/value heads", NULL},
        {"n-vocab", 0, TDM_FLAG_TYPE_INT, &n_vocab, "vocabulary size (>= 259)", NULL},
        {"ctx", 0, TDM_FLAG_TYPE_INT, &ctx, "context length", NULL},
        {"rope-theta", 0, TDM_FLAG_TYPE_FLOAT, &theta, "RoPE base", NULL},
        {"type", 0, TDM_FLAG_TYPE_STR, &type_s, "matrix type: f32 f16 q4_0 q4_1 q8_0", NULL},
        {"embd-type", 0, TDM_FLAG_TYPE_STR, &embd_type_s, "token embedding type", NULL},
        {"vocab-from", 0, TDM_FLAG_TYPE_STR, &vocab_from,
         "copy the tokenizer (and vocabulary size) from this GGUF", NULL},
        {"seed", 's', TDM_FLAG_TYPE_U64, &seed, "random seed", NULL},
        {"preset", 0, TDM_FLAG_TYPE_STR, &preset,
         "a known shape: llama3-8b (32 layers, hidden 4096, ffn 14336, 32/8 heads, vocab 128256) "
         "or smollm2-135m; flags given after it do not override it",
         NULL},
    };
    int rc;
    if (!tool_parse("mkmodel -o OUT.gguf [flags]",
                    "Writes a Llama GGUF with random weights (deterministic for a seed).", flags,
                    sizeof(flags) / sizeof(flags[0]), argc, argv, NULL, 0, NULL, &rc))
        return rc;
    if (preset != NULL) {
        if (strcmp(preset, "llama3-8b") == 0) {
            n_embd = 4096, n_ff = 14336, n_layer = 32, n_head = 32, n_head_kv = 8;
            n_vocab = 128256, ctx = 8192, theta = 500000.0f;
        } else if (strcmp(preset, "smollm2-135m") == 0) {
            n_embd = 576, n_ff = 1536, n_layer = 30, n_head = 9, n_head_kv = 3;
            n_vocab = 49152, ctx = 8192, theta = 100000.0f;
        } else {
            fprintf(stderr, "tandem mkmodel: unknown --preset %s (llama3-8b, smollm2-135m)\n",
                    preset);
            return TOOL_EXIT_USAGE;
        }
    }
    uint32_t type = parse_type(type_s), etype = parse_type(embd_type_s);
    if (out == NULL || type == UINT32_MAX || etype == UINT32_MAX || n_embd % 32 || n_ff % 32 ||
        n_embd <= 0 || n_ff <= 0 || n_layer <= 0 || n_head <= 0 || n_head_kv <= 0 ||
        n_head % n_head_kv || n_embd % n_head || (n_embd / n_head) % 2 || n_vocab < 259) {
        fprintf(stderr, "tandem mkmodel: bad arguments (see --help): dims must be multiples of 32, "
                        "heads must divide, types f32/f16/q4_0/q4_1/q8_0, -o required\n");
        return TOOL_EXIT_USAGE;
    }
    tdm_gguf_writer_t *w;
    if (tdm_gguf_writer_create(&w) != TDM_OK)
        return TOOL_EXIT_FAIL;
    uint64_t r = seed;
    tdm_status_t st =
        vocab_from ? copy_vocab(w, vocab_from, &n_vocab) : write_vocab(w, n_vocab, &r);
    int head_dim = n_embd / n_head;
    struct {
        const char *k;
        uint32_t v;
    } u32s[] = {{"llama.block_count", (uint32_t)n_layer},
                {"llama.context_length", (uint32_t)ctx},
                {"llama.embedding_length", (uint32_t)n_embd},
                {"llama.feed_forward_length", (uint32_t)n_ff},
                {"llama.attention.head_count", (uint32_t)n_head},
                {"llama.attention.head_count_kv", (uint32_t)n_head_kv},
                {"llama.rope.dimension_count", (uint32_t)head_dim},
                {"llama.vocab_size", (uint32_t)n_vocab}};
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_str(w, "general.architecture", "llama");
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_str(w, "general.name", "tandem synthetic");
    for (size_t i = 0; i < sizeof(u32s) / sizeof(u32s[0]) && st == TDM_OK; i++)
        st = tdm_gguf_writer_set_u32(w, u32s[i].k, u32s[i].v);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_f32(w, "llama.rope.freq_base", theta);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    uint64_t d = (uint64_t)n_embd, kv = (uint64_t)(n_head_kv * head_dim), ff = (uint64_t)n_ff;
    float wstd = 1.0f / sqrtf((float)n_embd);
    if (st == TDM_OK)
        st = add_random(w, &r, "token_embd.weight", d, (uint64_t)n_vocab, etype, 1.0f, 0.0f);
    if (st == TDM_OK)
        st = add_random(w, &r, "output_norm.weight", d, 1, TDM_DTYPE_F32, 0.1f, 1.0f);
    char name[64];
    for (int il = 0; il < n_layer && st == TDM_OK; il++) {
        struct {
            const char *s;
            uint64_t k, rows;
            uint32_t t;
            float std, mean;
        } ts[] = {
            {"attn_norm", d, 1, TDM_DTYPE_F32, 0.1f, 1.0f},
            {"attn_q", d, d, type, wstd, 0},
            {"attn_k", d, kv, type, wstd, 0},
            {"attn_v", d, kv, type, wstd, 0},
            {"attn_output", d, d, type, wstd, 0},
            {"ffn_norm", d, 1, TDM_DTYPE_F32, 0.1f, 1.0f},
            {"ffn_gate", d, ff, type, wstd, 0},
            {"ffn_up", d, ff, type, wstd, 0},
            {"ffn_down", ff, d, type, 1.0f / sqrtf((float)n_ff), 0},
        };
        for (size_t i = 0; i < sizeof(ts) / sizeof(ts[0]) && st == TDM_OK; i++) {
            snprintf(name, sizeof(name), "blk.%d.%s.weight", il, ts[i].s);
            st = add_random(w, &r, name, ts[i].k, ts[i].rows, ts[i].t, ts[i].std, ts[i].mean);
        }
    }
    if (st == TDM_OK)
        st = tdm_gguf_writer_write(w, out);
    tdm_gguf_writer_destroy(w);
    if (st != TDM_OK) {
        fprintf(stderr, "tandem mkmodel: could not write %s: %s\n", out, tdm_status_str(st));
        return TOOL_EXIT_FAIL;
    }
    fprintf(stderr, "mkmodel: wrote %s (%d layers, hidden %d, ffn %d, heads %d/%d, vocab %d, %s)\n",
            out, n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, type_s);
    return TOOL_EXIT_OK;
}
