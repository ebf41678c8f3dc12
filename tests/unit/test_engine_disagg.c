/* Disaggregated serving on the engine (DESIGN.md "A request's walk", steps
 * 3 to 5, and "Same answer however served"): a request's prompt KV leaves
 * engine A through kv_export as codec payloads and enters engine B through
 * kv_import, and greedy decoding goes on byte-identically.
 *
 * For several prompts (lengths 21, 37, 48 and 90 tokens, 48 a multiple of
 * the block size):
 *   reference   greedy on A alone, 24 tokens;
 *   f16         A with max_tokens 1 exports every prompt block through the
 *               f16 codec; B (other step size, a companion request in the
 *               batch) imports them for prompt + first token: A's token and
 *               B's must equal the reference;
 *   whole       B imports all n_prompt positions of the original prompt and
 *               gives all 24 tokens itself: equal to the reference;
 *   corrupt     one payload's body is flipped: its checksum fails, B
 *               recomputes from that block, the output is still identical;
 *   q8          the lossy codec: the output is produced, matches counted.
 * On synthetic models and on the default model when present. */
#include <stdatomic.h>

#include "tandem/engine.h"
#include "tandem/kv_codec.h"
#include "tandem/log.h"
#include "test_util.h"

#define N_PROMPTS  4
#define MAX_OUT    64
#define MAX_PROMPT 256
#define MAX_BLOCKS 32
#define GEN_TOKENS 24

typedef struct out {
    int32_t toks[MAX_OUT];
    int n;
    atomic_int done;
    tdm_finish_reason_t fin;
    int n_imported;
    int n_cached;
} out_t;

static void on_event(void *user, const tdm_request_event_t *ev)
{
    out_t *o = user;
    if (ev->token >= 0 && o->n < MAX_OUT)
        o->toks[o->n++] = ev->token;
    if (ev->finish != TDM_FINISH_NONE) {
        o->fin = ev->finish;
        o->n_imported = ev->n_imported;
        o->n_cached = ev->n_cached;
        atomic_store(&o->done, 1);
    }
}

/* The payloads of one request's prompt blocks. */
typedef struct payloads {
    tdm_kv_codec_ctx_t *ctx;
    tdm_kv_codec_t codec;
    uint8_t *buf[MAX_BLOCKS];
    size_t len[MAX_BLOCKS];
    int32_t n_tokens[MAX_BLOCKS];
    int n;            /* blocks exported */
    int n_imported;   /* blocks imported */
    int order_errors; /* a block out of order or of an unexpected size */
    int fail_from;    /* import: give up at this block (-1: never) */
} payloads_t;

static tdm_status_t on_export(void *user, int32_t block, int32_t n_tokens, uint16_t *const *k,
                              uint16_t *const *v)
{
    payloads_t *p = user;
    if (block != p->n || block >= MAX_BLOCKS) {
        p->order_errors++;
        return TDM_ERR_INVALID;
    }
    size_t cap = tdm_kv_codec_max_size(tdm_kv_codec_ctx_layout(p->ctx), p->codec);
    tdm_status_t st = tdm_kv_codec_encode(p->ctx, p->codec, (const uint16_t *const *)k,
                                          (const uint16_t *const *)v, n_tokens, p->buf[block], cap,
                                          &p->len[block]);
    if (st != TDM_OK)
        return st;
    p->n_tokens[block] = n_tokens;
    p->n++;
    return TDM_OK;
}

static tdm_status_t on_import(void *user, int32_t block, int32_t n_tokens, uint16_t *const *k,
                              uint16_t *const *v)
{
    payloads_t *p = user;
    if (block >= p->n || p->n_tokens[block] != n_tokens) {
        p->order_errors++;
        return TDM_ERR_INVALID;
    }
    if (p->fail_from >= 0 && block >= p->fail_from)
        return TDM_ERR_FORMAT;
    tdm_status_t st =
        tdm_kv_codec_decode(p->ctx, p->buf[block], p->len[block], n_tokens, k, v, NULL);
    if (st == TDM_OK)
        p->n_imported++;
    return st;
}

typedef struct prompts {
    int32_t toks[N_PROMPTS][MAX_PROMPT];
    int n[N_PROMPTS];
    int32_t other[MAX_PROMPT]; /* the companion request on B */
    int n_other;
} prompts_t;

static tdm_engine_t *make_engine(const char *model, int step_tokens, bool prefix)
{
    tdm_engine_config_t c;
    tdm_engine_config_default(&c);
    c.model_path = model;
    c.max_num_seqs = 8;
    c.max_num_batched_tokens = step_tokens;
    c.max_model_len = 512;
    c.num_blocks = 128;
    c.enable_prefix_caching = prefix;
    c.threads = 2;
    tdm_engine_t *e = NULL;
    char err[256];
    tdm_status_t st = tdm_engine_create(&c, err, sizeof(err), &e);
    CHECK(st == TDM_OK, "engine create: %s", err);
    return st == TDM_OK ? e : NULL;
}

static void params(tdm_request_params_t *rp, const int32_t *prompt, int n, int max_tokens, out_t *o)
{
    memset(rp, 0, sizeof(*rp));
    memset(o, 0, sizeof(*o));
    rp->prompt = prompt;
    rp->n_prompt = (size_t)n;
    tdm_sampling_params_default(&rp->sampling);
    rp->sampling.temperature = 0.0f;
    rp->max_tokens = max_tokens;
    rp->ignore_eos = true;
    rp->cb = on_event;
    rp->user = o;
}

/* B: a companion request starts first, then the imported request joins its
 * batch. prompt = the original prompt (n) plus `first` when first >= 0. */
static void run_import(tdm_engine_t *b, const prompts_t *p, int i, int32_t first, int32_t n_kv,
                       payloads_t *pl, out_t *o)
{
    static out_t other;
    tdm_request_params_t rp;
    params(&rp, p->other, p->n_other, 40, &other);
    CHECK(tdm_engine_add(b, &rp, NULL) == TDM_OK, "add companion");
    bool did;
    for (int s = 0; s < 3; s++)
        tdm_engine_step(b, &did);
    int32_t prompt[MAX_PROMPT + 1];
    int n = p->n[i];
    memcpy(prompt, p->toks[i], (size_t)n * sizeof(int32_t));
    if (first >= 0)
        prompt[n++] = first;
    params(&rp, prompt, n, GEN_TOKENS - (first >= 0 ? 1 : 0), o);
    rp.n_kv_tokens = n_kv;
    rp.kv_import = on_import;
    rp.kv_import_user = pl;
    pl->n_imported = 0;
    CHECK(tdm_engine_add(b, &rp, NULL) == TDM_OK, "add imported request");
    tdm_engine_run_until_idle(b);
    CHECK(other.fin == TDM_FINISH_LENGTH && o->done, "companion %d, imported request done %d",
          other.fin, atomic_load(&o->done));
}

/* The output of A's first token then B's tokens. */
static int matching(const out_t *ref, int32_t first, const out_t *got)
{
    int32_t all[MAX_OUT + 1];
    int n = 0;
    if (first >= 0)
        all[n++] = first;
    for (int k = 0; k < got->n && n < MAX_OUT; k++)
        all[n++] = got->toks[k];
    int m = 0;
    while (m < n && m < ref->n && all[m] == ref->toks[m])
        m++;
    return n == ref->n ? m : -1;
}

/* Positions of [0, to) past the prefix-cache hits of B's request: blocks
 * B's prefix cache serves are not imported. */
static int past_cached(int to, const out_t *got)
{
    return to > got->n_cached ? to - got->n_cached : 0;
}

static void test_disagg(const char *model, const prompts_t *p, const char *label, bool b_prefix)
{
    printf("disaggregated serving on %s, prefix caching on B %s\n", label, b_prefix ? "on" : "off");
    tdm_engine_t *a = make_engine(model, 256, false);
    tdm_engine_t *b = make_engine(model, 7, b_prefix);
    if (a == NULL || b == NULL) {
        tdm_engine_destroy(a);
        tdm_engine_destroy(b);
        return;
    }
    tdm_kv_layout_t la, lb;
    tdm_engine_kv_layout(a, &la);
    tdm_engine_kv_layout(b, &lb);
    CHECK(memcmp(&la, &lb, sizeof(la)) == 0, "layouts of A and B differ");
    static payloads_t pl;
    memset(&pl, 0, sizeof(pl));
    CHECK(tdm_kv_codec_ctx_create(&la, &pl.ctx) == TDM_OK, "codec ctx");
    size_t cap = tdm_kv_codec_max_size(&la, (tdm_kv_codec_t){TDM_KV_CODEC_TYPE_F16, false});
    for (int k = 0; k < MAX_BLOCKS; k++) {
        pl.buf[k] = malloc(cap);
        CHECK(pl.buf[k] != NULL, "payload buffer");
    }
    int32_t bs = la.block_size;
    for (int i = 0; i < N_PROMPTS; i++) {
        int n = p->n[i], nb = (n + bs - 1) / bs;
        static out_t ref, pre, got;
        tdm_request_params_t rp;
        params(&rp, p->toks[i], n, GEN_TOKENS, &ref);
        tdm_engine_add(a, &rp, NULL);
        tdm_engine_run_until_idle(a);
        CHECK(ref.n == GEN_TOKENS && ref.fin == TDM_FINISH_LENGTH, "reference: %d tokens", ref.n);

        /* f16: A exports, B imports prompt + first token. */
        pl.codec = (tdm_kv_codec_t){TDM_KV_CODEC_TYPE_F16, false};
        pl.n = pl.order_errors = 0;
        pl.fail_from = -1;
        params(&rp, p->toks[i], n, 1, &pre);
        rp.kv_export = on_export;
        rp.kv_export_user = &pl;
        tdm_engine_add(a, &rp, NULL);
        tdm_engine_run_until_idle(a);
        CHECK(pre.n == 1 && pre.toks[0] == ref.toks[0], "prefill's first token %d, reference %d",
              pre.toks[0], ref.toks[0]);
        CHECK(pl.n == nb && pl.order_errors == 0, "exported %d blocks of %d (%d out of order)",
              pl.n, nb, pl.order_errors);
        CHECK(pl.n_tokens[nb - 1] == n - (nb - 1) * bs, "last block holds %d tokens",
              pl.n_tokens[nb - 1]);
        run_import(b, p, i, pre.toks[0], n, &pl, &got);
        int m = matching(&ref, pre.toks[0], &got);
        CHECK(m == GEN_TOKENS && got.n_imported == past_cached(n, &got) &&
                  pl.n_imported == nb - got.n_cached / bs && pl.order_errors == 0,
              "prompt %d (%d tokens), f16: %d of %d tokens match, %d imported, %d cached", i, n, m,
              GEN_TOKENS, got.n_imported, got.n_cached);
        printf("  prompt of %d tokens, f16: %d of %d tokens match, %d positions imported, %d "
               "from B's prefix cache\n",
               n, m, GEN_TOKENS, got.n_imported, got.n_cached);

        /* whole: the import covers the whole prompt B gets. */
        run_import(b, p, i, -1, n, &pl, &got);
        m = matching(&ref, -1, &got);
        CHECK(m == GEN_TOKENS && got.n_imported == past_cached(n, &got),
              "prompt %d, whole prompt imported: %d of %d match, %d imported", i, m, GEN_TOKENS,
              got.n_imported);

        /* corrupt: the middle block's checksum fails; B recomputes from it. */
        int bad = nb / 2;
        pl.buf[bad][pl.len[bad] - 1] ^= 0x5a;
        tdm_log_level_t lvl = tdm_log_get_level();
        tdm_log_set_level(TDM_LOG_LEVEL_ERROR); /* the codec warns about the bad payload */
        run_import(b, p, i, pre.toks[0], n, &pl, &got);
        tdm_log_set_level(lvl);
        pl.buf[bad][pl.len[bad] - 1] ^= 0x5a;
        m = matching(&ref, pre.toks[0], &got);
        CHECK(m == GEN_TOKENS && got.n_imported == past_cached(bad * bs, &got) &&
                  pl.n_imported == past_cached(bad * bs, &got) / bs,
              "prompt %d, block %d corrupt: %d of %d match, %d imported", i, bad, m, GEN_TOKENS,
              got.n_imported);

        /* The import function gives up at block 1: recomputed from there. */
        pl.fail_from = 1;
        run_import(b, p, i, pre.toks[0], n, &pl, &got);
        pl.fail_from = -1;
        m = matching(&ref, pre.toks[0], &got);
        CHECK(m == GEN_TOKENS && got.n_imported == past_cached(bs, &got),
              "prompt %d, import failing at block 1: %d of %d match, %d imported", i, m, GEN_TOKENS,
              got.n_imported);

        /* q8: lossy; produced, matches counted. */
        pl.codec = (tdm_kv_codec_t){TDM_KV_CODEC_TYPE_Q8, false};
        pl.n = 0;
        params(&rp, p->toks[i], n, 1, &pre);
        rp.kv_export = on_export;
        rp.kv_export_user = &pl;
        tdm_engine_add(a, &rp, NULL);
        tdm_engine_run_until_idle(a);
        CHECK(pl.n == nb, "q8: exported %d blocks of %d", pl.n, nb);
        run_import(b, p, i, pre.toks[0], n, &pl, &got);
        m = matching(&ref, pre.toks[0], &got);
        CHECK(got.n == GEN_TOKENS - 1 && got.fin == TDM_FINISH_LENGTH &&
                  got.n_imported == past_cached(n, &got),
              "q8: %d tokens, finish %d, %d imported", got.n, got.fin, got.n_imported);
        printf("  prompt of %d tokens, q8: %d of %d leading tokens match (%d positions imported)\n",
               n, m < 0 ? 0 : m, GEN_TOKENS, got.n_imported);
    }
    /* Nothing leaked: every block is free again on both engines. */
    tdm_engine_stats_t sa, sb;
    tdm_engine_get_stats(a, &sa);
    tdm_engine_get_stats(b, &sb);
    CHECK(sa.num_free_blocks == sa.num_blocks && sb.num_free_blocks == sb.num_blocks,
          "blocks leaked: A %d of %d free, B %d of %d", sa.num_free_blocks, sa.num_blocks,
          sb.num_free_blocks, sb.num_blocks);
    /* Bad n_kv_tokens is refused. */
    tdm_request_params_t rp;
    static out_t o;
    params(&rp, p->toks[0], p->n[0], 4, &o);
    rp.kv_import = on_import;
    rp.kv_import_user = &pl;
    rp.n_kv_tokens = p->n[0] + 1;
    tdm_log_set_level(TDM_LOG_LEVEL_ERROR);
    CHECK(tdm_engine_add(b, &rp, NULL) == TDM_ERR_INVALID, "n_kv_tokens past the prompt accepted");
    rp.n_kv_tokens = -1;
    CHECK(tdm_engine_add(b, &rp, NULL) == TDM_ERR_INVALID, "negative n_kv_tokens accepted");
    tdm_log_set_level(TDM_LOG_LEVEL_WARN);
    for (int k = 0; k < MAX_BLOCKS; k++)
        free(pl.buf[k]);
    tdm_kv_codec_ctx_destroy(pl.ctx);
    tdm_engine_destroy(a);
    tdm_engine_destroy(b);
}

static void random_prompts(prompts_t *p, int n_vocab, uint64_t seed)
{
    static const int lens[N_PROMPTS] = {21, 37, 48, 90};
    for (int i = 0; i <= N_PROMPTS; i++) {
        int n = i < N_PROMPTS ? lens[i] : 30;
        int32_t *t = i < N_PROMPTS ? p->toks[i] : p->other;
        for (int j = 0; j < n; j++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            t[j] = 3 + (int32_t)((seed >> 33) % (uint64_t)(n_vocab - 3));
        }
        if (i < N_PROMPTS)
            p->n[i] = n;
        else
            p->n_other = n;
    }
}

static void text_prompts(prompts_t *p, const char *model)
{
    tdm_gguf_t *g;
    tdm_tokenizer_t *tok;
    char err[256];
    if (tdm_gguf_open(model, true, err, sizeof(err), &g) != TDM_OK ||
        tdm_tokenizer_create(g, err, sizeof(err), &tok) != TDM_OK) {
        CHECK(0, "tokenizer of %s: %s", model, err);
        return;
    }
    static const char *const q[N_PROMPTS + 1] = {
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain in two sentences why the sky is blue.",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "List three prime numbers.",
    };
    for (int i = 0; i <= N_PROMPTS; i++) {
        char text[1024];
        snprintf(text, sizeof(text),
                 "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n",
                 q[i]);
        size_t n = 0;
        int32_t *t = i < N_PROMPTS ? p->toks[i] : p->other;
        tdm_tokenizer_encode(tok, text, strlen(text), true, t, MAX_PROMPT, &n);
        if (i < N_PROMPTS)
            p->n[i] = (int)n;
        else
            p->n_other = (int)n;
    }
    tdm_tokenizer_destroy(tok);
    tdm_gguf_close(g);
}

/* AddressSanitizer makes the real model's forward passes minutes long. */
static bool sanitized(void)
{
#if defined(__SANITIZE_ADDRESS__)
    return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
    return true;
#endif
#endif
    return t_sanitized() != 0;
}

int main(void)
{
    tdm_log_set_level(TDM_LOG_LEVEL_WARN);
    static prompts_t p;
    static const char *const types[] = {"q4_1", "f16"};
    for (int t = 0; t < 2; t++) {
        char path[256], args[256];
        snprintf(args, sizeof(args),
                 "--n-embd 128 --n-ff 256 --n-layer 3 --n-head 4 --n-head-kv 2 --n-vocab 600 "
                 "--type %s --seed %d",
                 types[t], 21 + t);
        if (t_mkmodel(path, sizeof(path), args) != 0) {
            CHECK(0, "mkmodel %s failed", types[t]);
            continue;
        }
        random_prompts(&p, 600, 7 + (uint64_t)t);
        char label[64];
        snprintf(label, sizeof(label), "synthetic %s model", types[t]);
        test_disagg(path, &p, label, t == 0);
        unlink(path);
    }
    const char *model = t_default_model();
    if (model != NULL && sanitized()) {
        printf("sanitized build: real-model disaggregation skipped (too slow; the synthetic "
               "models cover the same paths)\n");
    } else if (model != NULL) {
        text_prompts(&p, model);
        /* The prompts share a system prompt with the companion: with the
         * prefix cache on, B serves leading blocks itself. */
        test_disagg(model, &p, "SmolLM2-135M-Instruct Q4_1", false);
        test_disagg(model, &p, "SmolLM2-135M-Instruct Q4_1", true);
    } else {
        printf("default model not present: real-model disaggregation skipped (run `make model`)\n");
    }
    return t_finish();
}
