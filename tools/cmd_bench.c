/* tandem bench: `tandem bench SUBCOMMAND [flags]`, one function per
 * subcommand (the table in cmd_bench at the end).
 *
 * tandem bench engine: prefill, decode at batch 1, batched decode.
 *
 * Prompts are random token ids (fixed seed), as llama-bench does, so no
 * text or tokenizer effect enters the figures. Prefix caching is off.
 *   prefill  one request of --prompt-tokens (512) tokens and 1 output token;
 *            tok/s = prompt tokens / time to the first token; mean of --reps.
 *   decode   one request, 1 prompt token, --gen-tokens (128) outputs with
 *            end-of-text ignored; tok/s over the steps after the first.
 *   batched  N requests of --batch-prompt (64) tokens each, all admitted in
 *            the first steps, then --gen-tokens decode steps; tok/s = tokens
 *            sampled in pure decode steps / their time; p50/p99 of those
 *            steps' latency. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tandem/kv_codec.h"
#include "tandem/log.h"
#include "tool.h"

typedef struct bench_req {
    int32_t n_out;
    double t_first, t_last;
    bool done;
} bench_req_t;

static void bench_cb(void *user, const tdm_request_event_t *ev)
{
    bench_req_t *r = user;
    double now = tool_now();
    if (ev->token >= 0) {
        if (r->n_out == 0)
            r->t_first = now;
        r->t_last = now;
        r->n_out++;
    }
    if (ev->finish != TDM_FINISH_NONE)
        r->done = true;
}

static void random_prompt(int32_t *toks, int32_t n, int32_t n_vocab, uint64_t *seed)
{
    for (int32_t i = 0; i < n; i++)
        toks[i] = (int32_t)(tool_rng_next(seed) % (uint64_t)(n_vocab - 300)) + 256;
}

static tdm_status_t add_req(tdm_engine_t *e, const int32_t *toks, int32_t n, int32_t max_tokens,
                            bench_req_t *r)
{
    tdm_request_params_t rp = {0};
    rp.prompt = toks;
    rp.n_prompt = (size_t)n;
    tdm_sampling_params_default(&rp.sampling);
    rp.sampling.temperature = 0.0f;
    rp.max_tokens = max_tokens;
    rp.ignore_eos = true;
    rp.cb = bench_cb;
    rp.user = r;
    memset(r, 0, sizeof(*r));
    return tdm_engine_add(e, &rp, NULL);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct batched_result {
    int seqs;
    double tok_s, p50_ms, p99_ms;
} batched_result_t;

static int bench_engine(int argc, char **argv)
{
    tool_engine_opts_t eo;
    tool_engine_opts_default(&eo);
    int prompt_tokens = 512, gen_tokens = 128, batch_prompt = 64, reps = 3;
    bool json = false;
    const char *batches_s = "1,8,32,64";
    tdm_flag_t flags[24];
    size_t n = tool_engine_flags(&eo, flags);
    tdm_flag_t more[] = {
        {"prompt-tokens", 0, TDM_FLAG_TYPE_INT, &prompt_tokens, "prefill prompt length", NULL},
        {"gen-tokens", 0, TDM_FLAG_TYPE_INT, &gen_tokens, "tokens decoded per sequence", NULL},
        {"batch-prompt", 0, TDM_FLAG_TYPE_INT, &batch_prompt,
         "prompt length of each batched sequence", NULL},
        {"batches", 0, TDM_FLAG_TYPE_STR, &batches_s, "concurrent sequence counts", NULL},
        {"reps", 0, TDM_FLAG_TYPE_INT, &reps, "repetitions of the prefill and decode runs", NULL},
        {"json", 0, TDM_FLAG_TYPE_BOOL, &json, "print one JSON object instead of a table", NULL},
    };
    memcpy(flags + n, more, sizeof(more));
    n += sizeof(more) / sizeof(more[0]);
    const char *pos[1];
    size_t n_pos = 0;
    int rc;
    if (!tool_parse("bench engine [-m MODEL] [--threads N] [--json]",
                    "Measures prefill tok/s, decode tok/s at batch 1, and batched decode "
                    "throughput with p50/p99 step latency.",
                    flags, n, argc, argv, pos, 1, &n_pos, &rc))
        return rc;
    if (n_pos != 1 || strcmp(pos[0], "engine") != 0) {
        fprintf(stderr, "tandem bench: say what to bench: `tandem bench engine`\n");
        return TOOL_EXIT_USAGE;
    }
    int batches[16], n_batches = 0, max_batch = 1;
    for (const char *p = batches_s; *p != '\0' && n_batches < 16;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v <= 0 || v > 4096) {
            fprintf(stderr, "tandem bench: bad --batches '%s'\n", batches_s);
            return TOOL_EXIT_USAGE;
        }
        batches[n_batches++] = (int)v;
        max_batch = (int)v > max_batch ? (int)v : max_batch;
        p = *end == ',' ? end + 1 : end;
    }
    if (prompt_tokens < 1 || gen_tokens < 2 || batch_prompt < 1 || reps < 1) {
        fprintf(stderr, "tandem bench: lengths and --reps must be positive (gen >= 2)\n");
        return TOOL_EXIT_USAGE;
    }
    eo.enable_prefix_caching = false;
    if (eo.max_num_seqs < max_batch)
        eo.max_num_seqs = max_batch;
    if (eo.max_num_batched_tokens < prompt_tokens)
        eo.max_num_batched_tokens = prompt_tokens;
    tdm_engine_t *e;
    rc = tool_engine_create(&eo, &e);
    if (rc != TOOL_EXIT_OK)
        return rc;
    const tdm_model_t *m = tdm_engine_model(e);
    int32_t V = tdm_model_hparams(m)->n_vocab;
    uint64_t seed = 1234;
    size_t maxp = (size_t)(prompt_tokens > batch_prompt ? prompt_tokens : batch_prompt);
    int32_t *toks = malloc((size_t)max_batch * maxp * sizeof(int32_t));
    bench_req_t *reqs = calloc((size_t)max_batch, sizeof(bench_req_t));
    double *lat = malloc((size_t)(gen_tokens + 8) * sizeof(double));
    batched_result_t *res = calloc((size_t)n_batches, sizeof(*res));
    if (toks == NULL || reqs == NULL || lat == NULL || res == NULL) {
        fprintf(stderr, "tandem bench: out of memory\n");
        tdm_engine_destroy(e);
        return TOOL_EXIT_FAIL;
    }
    fprintf(stderr, "bench: %s, %d threads requested, backend %s\n", tdm_model_name(m), eo.threads,
            tdm_model_backend(m)->ops->name);

    /* warm-up: touches every weight once */
    random_prompt(toks, 8, V, &seed);
    add_req(e, toks, 8, 2, &reqs[0]);
    tdm_engine_run_until_idle(e);

    double pp_sum = 0, tg_sum = 0;
    for (int r = 0; r < reps; r++) {
        fprintf(stderr, "bench: prefill %d tokens, run %d/%d\n", prompt_tokens, r + 1, reps);
        random_prompt(toks, prompt_tokens, V, &seed);
        double t0 = tool_now();
        add_req(e, toks, prompt_tokens, 1, &reqs[0]);
        tdm_engine_run_until_idle(e);
        pp_sum += (double)prompt_tokens / (reqs[0].t_first - t0);
    }
    for (int r = 0; r < reps; r++) {
        fprintf(stderr, "bench: decode %d tokens at batch 1, run %d/%d\n", gen_tokens, r + 1, reps);
        random_prompt(toks, 1, V, &seed);
        add_req(e, toks, 1, gen_tokens, &reqs[0]);
        tdm_engine_run_until_idle(e);
        tg_sum += (double)(reqs[0].n_out - 1) / (reqs[0].t_last - reqs[0].t_first);
    }
    double pp = pp_sum / reps, tg = tg_sum / reps;

    for (int b = 0; b < n_batches; b++) {
        int nseq = batches[b];
        fprintf(stderr, "bench: batched decode, %d sequences x %d tokens\n", nseq, gen_tokens);
        for (int i = 0; i < nseq; i++) {
            random_prompt(toks + (size_t)i * maxp, batch_prompt, V, &seed);
            add_req(e, toks + (size_t)i * maxp, batch_prompt, gen_tokens, &reqs[i]);
        }
        /* Step until every sequence has its first token (prefill), then time
         * the decode steps in which all sequences take part. */
        int n_lat = 0;
        double t_dec = 0;
        int64_t tokens = 0;
        for (int guard = 0; guard < 100000; guard++) {
            int ready = 0, done = 0;
            for (int i = 0; i < nseq; i++) {
                ready += reqs[i].n_out > 0;
                done += reqs[i].done;
            }
            if (done == nseq)
                break;
            int32_t before = 0;
            for (int i = 0; i < nseq; i++)
                before += reqs[i].n_out;
            double t0 = tool_now();
            bool did;
            tdm_engine_step(e, &did);
            double dt = tool_now() - t0;
            int32_t after = 0;
            for (int i = 0; i < nseq; i++)
                after += reqs[i].n_out;
            if (ready == nseq && after - before == nseq && n_lat < gen_tokens + 8) {
                lat[n_lat++] = dt;
                t_dec += dt;
                tokens += after - before;
            }
        }
        qsort(lat, (size_t)n_lat, sizeof(double), cmp_double);
        res[b].seqs = nseq;
        res[b].tok_s = t_dec > 0 ? (double)tokens / t_dec : 0;
        res[b].p50_ms = n_lat ? lat[n_lat / 2] * 1e3 : 0;
        res[b].p99_ms = n_lat ? lat[(int)((n_lat - 1) * 0.99)] * 1e3 : 0;
    }
    int threads = tdm_backend_cpu_threads(tdm_model_backend(m));
    if (json) {
        printf(
            "{\"model\": \"%s\", \"backend\": \"%s\", \"threads\": %d, \"prompt_tokens\": %d, "
            "\"gen_tokens\": %d, \"prefill_tok_s\": %.2f, \"decode_tok_s\": %.2f, \"batched\": [",
            tdm_model_name(m), tdm_model_backend(m)->ops->name, threads, prompt_tokens, gen_tokens,
            pp, tg);
        for (int b = 0; b < n_batches; b++)
            printf("%s{\"seqs\": %d, \"tok_s\": %.2f, \"p50_ms\": %.3f, \"p99_ms\": %.3f}",
                   b ? ", " : "", res[b].seqs, res[b].tok_s, res[b].p50_ms, res[b].p99_ms);
        printf("]}\n");
    } else {
        printf("model    %s (%s, %d threads)\n", tdm_model_name(m), tdm_model_backend(m)->ops->name,
               threads);
        printf("prefill  %d tokens: %.1f tok/s\n", prompt_tokens, pp);
        printf("decode   batch 1, %d tokens: %.1f tok/s\n", gen_tokens, tg);
        printf("%6s %12s %10s %10s\n", "seqs", "tok/s", "p50 ms", "p99 ms");
        for (int b = 0; b < n_batches; b++)
            printf("%6d %12.1f %10.2f %10.2f\n", res[b].seqs, res[b].tok_s, res[b].p50_ms,
                   res[b].p99_ms);
    }
    free(toks);
    free(reqs);
    free(lat);
    free(res);
    tdm_engine_destroy(e);
    return TOOL_EXIT_OK;
}

/* tandem bench codec: the KV block codecs on real KV.
 *
 * The model reads a real English text (--file, else the GPL-3 that every
 * Debian machine has, else the repository's README.md and docs/DESIGN.md)
 * in --chunks windows of --ctx tokens, as `tandem ppl` does. The full KV
 * blocks of the windows' first halves are copied out during the f16 pass;
 * on them, for each codec: payload bytes per block, the ratio to f16, and
 * encode and decode speed on one thread in GB of f16 KV per second (best of
 * 3 timed runs, each over every block, repeated to last at least 0.2 s).
 * The perplexity of each codec is `tandem ppl --kv-codec` on the same
 * windows, against the same windows without a codec. */

#define CODEC_BENCH_N 4

typedef struct codec_pass {
    tdm_kv_codec_ctx_t *ctx;
    tdm_kv_codec_t codec;
    uint8_t *payload;
    size_t cap;
    uint16_t *store; /* copies of full blocks: [block][layer][K, V][block_size][kv_dim] */
    int32_t n_stored, max_stored;
    tdm_status_t st;
} codec_pass_t;

/* Copies the block out (when there is room and it is full), then passes it
 * through encode and decode in place (tdm_engine_kv_fn_t). */
static tdm_status_t codec_pass_block(void *user, int32_t block, int32_t n_tokens,
                                     uint16_t *const *k, uint16_t *const *v)
{
    codec_pass_t *cp = user;
    const tdm_kv_layout_t *l = tdm_kv_codec_ctx_layout(cp->ctx);
    size_t rows = (size_t)l->block_size * (size_t)l->n_head_kv * (size_t)l->head_dim;
    if (cp->store != NULL && n_tokens == l->block_size && cp->n_stored < cp->max_stored) {
        uint16_t *dst = cp->store + (size_t)cp->n_stored * 2 * (size_t)l->n_layer * rows;
        for (int32_t il = 0; il < l->n_layer; il++) {
            memcpy(dst + (2 * (size_t)il) * rows, k[il], rows * sizeof(uint16_t));
            memcpy(dst + (2 * (size_t)il + 1) * rows, v[il], rows * sizeof(uint16_t));
        }
        cp->n_stored++;
    }
    size_t len;
    tdm_status_t st =
        tdm_kv_codec_encode(cp->ctx, cp->codec, (const uint16_t *const *)k,
                            (const uint16_t *const *)v, n_tokens, cp->payload, cp->cap, &len);
    if (st == TDM_OK)
        st = tdm_kv_codec_decode(cp->ctx, cp->payload, len, n_tokens, k, v, NULL);
    return st;
}

/* NLL summed over the scored half of one window's logits; adds the count. */
static double window_nll(const float *logits, const int32_t *win_next, int ctx, int32_t V,
                         size_t *count)
{
    double nll = 0;
    for (int j = ctx / 2; j < ctx - 1; j++) {
        nll -= tool_token_logprob(logits + (size_t)j * (size_t)V, V, win_next[j]);
        (*count)++;
    }
    return nll;
}

/* Perplexity over the windows; with cp, the first halves' KV go through
 * cp's codec. */
static tdm_status_t codec_ppl(tdm_engine_t *e, const int32_t *toks, int32_t bos, int n_win, int ctx,
                              int32_t *win, float *logits, codec_pass_t *cp, double *ppl)
{
    int32_t V = tdm_model_hparams(tdm_engine_model(e))->n_vocab;
    double nll = 0;
    size_t count = 0;
    for (int c = 0; c < n_win; c++) {
        const int32_t *w = toks + (size_t)c * (size_t)ctx;
        memcpy(win, w, (size_t)ctx * sizeof(int32_t));
        if (bos >= 0)
            win[0] = bos;
        tdm_status_t st = cp != NULL ? tdm_engine_eval_split(e, win, (size_t)ctx, (size_t)ctx / 2,
                                                             codec_pass_block, cp, logits)
                                     : tdm_engine_eval(e, win, (size_t)ctx, logits);
        if (st != TDM_OK)
            return st;
        nll += window_nll(logits, w + 1, ctx, V, &count);
    }
    *ppl = exp(nll / (double)count);
    return TDM_OK;
}

/* Reads the first of the candidate files that exists; *which names it. */
static char *codec_text(const char *file, size_t *len, char *which, size_t which_len)
{
    if (file != NULL) {
        FILE *f = fopen(file, "rb");
        char *t = f != NULL ? tool_read_all(f, len) : NULL;
        if (f != NULL)
            fclose(f);
        snprintf(which, which_len, "%s", file);
        return t;
    }
    const char *gpl = "/usr/share/common-licenses/GPL-3";
    FILE *f = fopen(gpl, "rb");
    if (f != NULL) {
        char *t = tool_read_all(f, len);
        fclose(f);
        snprintf(which, which_len, "%s", gpl);
        return t;
    }
    /* The repository: the working directory, or two levels above the
     * binary (build/bin/tandem). */
    char roots[2][1024] = {".", ""};
    ssize_t n = readlink("/proc/self/exe", roots[1], sizeof(roots[1]) - 8);
    if (n > 0) {
        roots[1][n] = '\0';
        strcpy(strrchr(roots[1], '/'), "/../.."); /* readlink gives an absolute path */
    }
    for (int r = 0; r < 2; r++) {
        char a[1100], b[1100];
        if (snprintf(a, sizeof(a), "%s/README.md", roots[r]) >= (int)sizeof(a) ||
            snprintf(b, sizeof(b), "%s/docs/DESIGN.md", roots[r]) >= (int)sizeof(b))
            continue;
        FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
        char *ta = NULL, *tb = NULL, *t = NULL;
        size_t la = 0, lb = 0;
        if (fa != NULL && fb != NULL) {
            ta = tool_read_all(fa, &la);
            tb = tool_read_all(fb, &lb);
            t = ta != NULL && tb != NULL ? malloc(la + lb + 2) : NULL;
        }
        if (t != NULL) {
            memcpy(t, ta, la);
            t[la] = '\n';
            memcpy(t + la + 1, tb, lb + 1);
            *len = la + 1 + lb;
            if (snprintf(which, which_len, "%s + %s", a, b) >= (int)which_len)
                which[0] = '\0';
        }
        free(ta);
        free(tb);
        if (fa != NULL)
            fclose(fa);
        if (fb != NULL)
            fclose(fb);
        if (t != NULL)
            return t;
    }
    return NULL;
}

typedef struct codec_result {
    tdm_kv_codec_t codec;
    double bytes;   /* mean payload bytes per block */
    double enc_gbs; /* GB of f16 KV per second */
    double dec_gbs;
    double ppl;
    double kv_rel_err; /* ||decoded - f16|| / ||f16|| over all blocks */
} codec_result_t;

/* Best of 3 timed runs of encoding (decode false) or decoding every block;
 * each run repeats the pass until 0.2 s have gone. Returns GB/s of f16 KV. */
static double codec_time(tdm_kv_codec_ctx_t *ctx, tdm_kv_codec_t codec, bool decode, uint16_t **kp,
                         uint16_t **vp, uint16_t **okp, uint16_t **ovp, int nb, uint8_t *payloads,
                         size_t cap, size_t *lens)
{
    const tdm_kv_layout_t *l = tdm_kv_codec_ctx_layout(ctx);
    size_t nl = (size_t)l->n_layer;
    double best = 0;
    for (int trial = 0; trial < 3; trial++) {
        double t0 = tool_now(), t;
        int64_t passes = 0;
        do {
            for (int b = 0; b < nb; b++) {
                if (decode)
                    tdm_kv_codec_decode(ctx, payloads + (size_t)b * cap, lens[b], l->block_size,
                                        okp + (size_t)b * nl, ovp + (size_t)b * nl, NULL);
                else
                    tdm_kv_codec_encode(ctx, codec, (const uint16_t *const *)kp + (size_t)b * nl,
                                        (const uint16_t *const *)vp + (size_t)b * nl, l->block_size,
                                        payloads + (size_t)b * cap, cap, &lens[b]);
            }
            passes++;
            t = tool_now() - t0;
        } while (t < 0.2);
        double gbs =
            (double)passes * nb * (double)tdm_kv_layout_f16_bytes(l, l->block_size) / t / 1e9;
        best = gbs > best ? gbs : best;
    }
    return best;
}

/* The model name as a JSON string body (quotes and controls dropped). */
static void json_safe(const char *in, char *out, size_t cap)
{
    size_t o = 0;
    for (; *in != '\0' && o + 1 < cap; in++)
        if (*in != '"' && *in != '\\' && (unsigned char)*in >= 0x20)
            out[o++] = *in;
    out[o] = '\0';
}

static int bench_codec(int argc, char **argv)
{
    tool_engine_opts_t eo;
    tool_engine_opts_default(&eo);
    const char *file = NULL;
    int ctx = 512, chunks = 8;
    bool json = false;
    tdm_flag_t flags[24];
    size_t n = tool_engine_flags(&eo, flags);
    tdm_flag_t more[] = {
        {"file", 'f', TDM_FLAG_TYPE_STR, &file,
         "English text (default: /usr/share/common-licenses/GPL-3, else README.md + "
         "docs/DESIGN.md)",
         NULL},
        {"ctx", 'c', TDM_FLAG_TYPE_INT, &ctx, "window length in tokens", NULL},
        {"chunks", 0, TDM_FLAG_TYPE_INT, &chunks, "windows to run (at most)", NULL},
        {"json", 0, TDM_FLAG_TYPE_BOOL, &json, "print one JSON object instead of a table", NULL},
    };
    memcpy(flags + n, more, sizeof(more));
    n += sizeof(more) / sizeof(more[0]);
    const char *pos[1];
    size_t n_pos = 0;
    int rc;
    if (!tool_parse("bench codec [-m MODEL] [-f TEXT] [--json]",
                    "KV block codecs on the model's KV of a real text: payload size, encode and "
                    "decode GB/s, perplexity change.",
                    flags, n, argc, argv, pos, 1, &n_pos, &rc))
        return rc;
    if (n_pos != 1 || strcmp(pos[0], "codec") != 0 || ctx < 32 || chunks < 1) {
        fprintf(stderr, "tandem bench codec: a --ctx of at least 32 and --chunks >= 1\n");
        return TOOL_EXIT_USAGE;
    }
    char which[2400];
    size_t len = 0;
    char *text = codec_text(file, &len, which, sizeof(which));
    if (text == NULL) {
        fprintf(stderr, "tandem bench codec: no text to read (%s); give -f TEXT\n",
                file ? file : "GPL-3, README.md, docs/DESIGN.md");
        return TOOL_EXIT_USAGE;
    }
    eo.enable_prefix_caching = false;
    if (eo.max_model_len < ctx)
        eo.max_model_len = ctx;
    tdm_engine_t *e;
    rc = tool_engine_create(&eo, &e);
    if (rc != TOOL_EXIT_OK) {
        free(text);
        return rc;
    }
    const tdm_model_t *m = tdm_engine_model(e);
    const tdm_tokenizer_t *tok = tdm_model_tokenizer(m);
    int32_t V = tdm_model_hparams(m)->n_vocab;
    tdm_kv_layout_t layout;
    tdm_engine_kv_layout(e, &layout);
    size_t nl = (size_t)layout.n_layer,
           f16_block = tdm_kv_layout_f16_bytes(&layout, layout.block_size);
    static const char *const names[CODEC_BENCH_N] = {"f16", "f16+lz4", "q8", "q8+lz4"};
    codec_result_t res[CODEC_BENCH_N];
    memset(res, 0, sizeof(res));
    int32_t bos;
    size_t nt = 0;
    int32_t *toks = tool_tokenize_text(tok, text, len, &nt, &bos);
    int32_t *win = malloc((size_t)ctx * sizeof(int32_t));
    float *logits = malloc((size_t)ctx * (size_t)V * sizeof(float));
    codec_pass_t cp = {0};
    uint16_t **ptrs = NULL, *out_blocks = NULL;
    uint8_t *payloads = NULL;
    size_t *lens = NULL;
    rc = TOOL_EXIT_FAIL;
    if (toks == NULL) {
        fprintf(stderr, "tandem bench codec: cannot tokenize %s (or out of memory)\n", which);
        goto out;
    }
    if (win == NULL || logits == NULL || tdm_kv_codec_ctx_create(&layout, &cp.ctx) != TDM_OK) {
        fprintf(stderr, "tandem bench codec: out of memory\n");
        goto out;
    }
    int n_win = (int)(nt / (size_t)ctx) < chunks ? (int)(nt / (size_t)ctx) : chunks;
    if (n_win < 1) {
        fprintf(stderr, "tandem bench codec: %s has %zu tokens, under one window of %d\n", which,
                nt, ctx);
        rc = TOOL_EXIT_USAGE;
        goto out;
    }
    /* Room for every full block of the windows' first halves. */
    cp.max_stored = n_win * (ctx / 2 / layout.block_size);
    cp.cap = tdm_kv_codec_max_size(&layout, (tdm_kv_codec_t){TDM_KV_CODEC_TYPE_F16, false});
    {
        tdm_kv_codec_t q8 = {TDM_KV_CODEC_TYPE_Q8, false};
        size_t c2 = tdm_kv_codec_max_size(&layout, q8);
        cp.cap = c2 > cp.cap ? c2 : cp.cap;
    }
    cp.payload = malloc(cp.cap);
    cp.store = malloc((size_t)cp.max_stored * f16_block + 1);
    out_blocks = malloc((size_t)cp.max_stored * f16_block + 1);
    payloads = malloc((size_t)cp.max_stored * cp.cap + 1);
    lens = calloc((size_t)cp.max_stored + 1, sizeof(size_t));
    ptrs = malloc(4 * nl * ((size_t)cp.max_stored + 1) * sizeof(*ptrs));
    if (cp.payload == NULL || cp.store == NULL || out_blocks == NULL || payloads == NULL ||
        lens == NULL || ptrs == NULL) {
        fprintf(stderr, "tandem bench codec: out of memory for %d blocks\n", cp.max_stored);
        goto out;
    }
    fprintf(stderr, "bench codec: %s, text %s (%zu tokens), %d windows of %d\n", tdm_model_name(m),
            which, nt, n_win, ctx);

    /* Perplexity: no codec, then each codec (the f16 pass keeps the blocks). */
    double ppl_base;
    fprintf(stderr, "bench codec: perplexity without a codec\n");
    if (codec_ppl(e, toks, bos, n_win, ctx, win, logits, NULL, &ppl_base) != TDM_OK)
        goto eval_failed;
    for (int c = 0; c < CODEC_BENCH_N; c++) {
        tdm_kv_codec_parse(names[c], &res[c].codec);
        cp.codec = res[c].codec;
        fprintf(stderr, "bench codec: perplexity with %s\n", names[c]);
        if (codec_ppl(e, toks, bos, n_win, ctx, win, logits, &cp, &res[c].ppl) != TDM_OK)
            goto eval_failed;
        if (c == 0)
            cp.max_stored = cp.n_stored; /* the f16 pass kept them; later passes do not */
    }
    int nb = cp.n_stored;
    size_t rows = f16_block / sizeof(uint16_t) / (2 * nl);
    uint16_t **kp = ptrs, **vp = ptrs + nl * (size_t)nb, **okp = ptrs + 2 * nl * (size_t)nb,
             **ovp = ptrs + 3 * nl * (size_t)nb;
    for (int b = 0; b < nb; b++)
        for (size_t il = 0; il < nl; il++) {
            size_t o = ((size_t)b * 2 * nl + 2 * il) * rows;
            kp[(size_t)b * nl + il] = cp.store + o;
            vp[(size_t)b * nl + il] = cp.store + o + rows;
            okp[(size_t)b * nl + il] = out_blocks + o;
            ovp[(size_t)b * nl + il] = out_blocks + o + rows;
        }

    /* Sizes, speed and KV error on the stored blocks, one thread. */
    for (int c = 0; c < CODEC_BENCH_N; c++) {
        fprintf(stderr, "bench codec: %s on %d blocks of %zu bytes\n", names[c], nb, f16_block);
        res[c].enc_gbs =
            codec_time(cp.ctx, res[c].codec, false, kp, vp, okp, ovp, nb, payloads, cp.cap, lens);
        res[c].dec_gbs =
            codec_time(cp.ctx, res[c].codec, true, kp, vp, okp, ovp, nb, payloads, cp.cap, lens);
        double bytes = 0, err2 = 0, ref2 = 0;
        for (int b = 0; b < nb; b++) {
            bytes += (double)lens[b];
            if (tdm_kv_codec_decode(cp.ctx, payloads + (size_t)b * cp.cap, lens[b],
                                    layout.block_size, okp + (size_t)b * nl, ovp + (size_t)b * nl,
                                    NULL) != TDM_OK)
                goto eval_failed;
        }
        size_t count = (size_t)nb * f16_block / sizeof(uint16_t);
        for (size_t i = 0; i < count; i++) {
            double x = tdm_f16_to_f32(cp.store[i]), y = tdm_f16_to_f32(out_blocks[i]);
            err2 += (y - x) * (y - x);
            ref2 += x * x;
        }
        res[c].bytes = bytes / nb;
        res[c].kv_rel_err = ref2 > 0 ? sqrt(err2 / ref2) : 0;
    }

    char name[256];
    json_safe(tdm_model_name(m), name, sizeof(name));
    if (json) {
        char text_s[sizeof(which)];
        json_safe(which, text_s, sizeof(text_s));
        printf("{\"model\": \"%s\", \"text\": \"%s\", \"text_tokens\": %zu, \"ctx\": %d, "
               "\"windows\": %d, \"blocks\": %d, \"block_size\": %d, \"f16_block_bytes\": %zu, "
               "\"threads\": 1, \"ppl_no_codec\": %.4f, \"codecs\": [",
               name, text_s, nt, ctx, n_win, nb, layout.block_size, f16_block, ppl_base);
        for (int c = 0; c < CODEC_BENCH_N; c++)
            printf("%s{\"codec\": \"%s\", \"bytes_per_block\": %.0f, \"ratio_vs_f16\": %.4f, "
                   "\"encode_gb_s\": %.3f, \"decode_gb_s\": %.3f, \"ppl\": %.4f, "
                   "\"ppl_change_pct\": %.4f, \"kv_rel_err\": %.3g}",
                   c ? ", " : "", names[c], res[c].bytes, res[0].bytes / res[c].bytes,
                   res[c].enc_gbs, res[c].dec_gbs, res[c].ppl,
                   100.0 * (res[c].ppl / ppl_base - 1.0), res[c].kv_rel_err);
        printf("]}\n");
    } else {
        printf("model   %s: %d layers x %d KV heads x %d dims, blocks of %d tokens (%zu bytes "
               "in f16)\n",
               name, layout.n_layer, layout.n_head_kv, layout.head_dim, layout.block_size,
               f16_block);
        printf("text    %s: %zu tokens; %d windows of %d; %d full blocks measured, 1 thread\n",
               which, nt, n_win, ctx, nb);
        printf("ppl     %.4f without a codec; with one, each window's first-half KV goes "
               "through encode + decode before the second half is scored\n",
               ppl_base);
        printf("%-8s %12s %8s %12s %12s %10s %9s %11s\n", "codec", "bytes/block", "vs f16",
               "encode GB/s", "decode GB/s", "ppl", "ppl chg", "KV rel err");
        for (int c = 0; c < CODEC_BENCH_N; c++)
            printf("%-8s %12.0f %7.3fx %12.2f %12.2f %10.4f %8.3f%% %11.2e\n", names[c],
                   res[c].bytes, res[0].bytes / res[c].bytes, res[c].enc_gbs, res[c].dec_gbs,
                   res[c].ppl, 100.0 * (res[c].ppl / ppl_base - 1.0), res[c].kv_rel_err);
    }
    rc = TOOL_EXIT_OK;
    goto out;
eval_failed:
    fprintf(stderr, "tandem bench codec: evaluation or a codec failed\n");
out:
    free(ptrs);
    free(lens);
    free(payloads);
    free(out_blocks);
    free(cp.store);
    free(cp.payload);
    tdm_kv_codec_ctx_destroy(cp.ctx);
    free(logits);
    free(win);
    free(toks);
    free(text);
    tdm_engine_destroy(e);
    return rc;
}

/* `tandem bench SUBCOMMAND`: the first argument naming a subcommand picks
 * it; the subcommand parses all the arguments (its name included). */
int cmd_bench(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*fn)(int, char **);
        const char *help;
    } subs[] = {
        {"engine", bench_engine, "prefill, decode and batched decode throughput"},
        {"codec", bench_codec, "KV block codecs: size, GB/s, perplexity change on real KV"},
        {"serve", cmd_bench_serve, "load against a router's OpenAI API: TTFT, ITL, tok/s"},
#ifdef TANDEM_HAVE_NET
        {"kvstore", cmd_bench_kvstore, "tandem-kvstore PUT/GET over loopback beside ucx_perftest"},
#endif
    };
    const size_t n_subs = sizeof(subs) / sizeof(subs[0]);
    for (int i = 0; i < argc; i++)
        for (size_t s = 0; s < n_subs; s++)
            if (strcmp(argv[i], subs[s].name) == 0)
                return subs[s].fn(argc, argv);
    bool help = argc > 0 && (strcmp(argv[0], "-h") == 0 || strcmp(argv[0], "--help") == 0);
    FILE *f = help ? stdout : stderr;
    fprintf(f, "usage: tandem bench SUBCOMMAND [flags]   (tandem bench SUBCOMMAND --help)\n\n");
    for (size_t s = 0; s < n_subs; s++)
        fprintf(f, "  %-8s %s\n", subs[s].name, subs[s].help);
    return help ? TOOL_EXIT_OK : TOOL_EXIT_USAGE;
}
