/* tandem bench engine: prefill, decode at batch 1, batched decode.
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

int cmd_bench(int argc, char **argv)
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
