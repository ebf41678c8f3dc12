/* Engine tests: batch invariance (DESIGN.md "Same answer however served"),
 * prefix caching, preemption, stop conditions, cancellation, seeds.
 *
 * Five prompts sharing a prefix are decoded greedily alone, all together,
 * with arrivals at random steps, with prefix-cache hits, with chunked
 * prefill of 1, 7 and 64 tokens per step, and under preemption; every run
 * must give byte-identical token sequences. It runs on synthetic models
 * (Q4_1, Q8_0, F16 weights) and on the default model when present. */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "tandem/engine.h"
#include "tandem/log.h"
#include "test_util.h"

#define N_PROMPTS  5
#define MAX_OUT    64
#define MAX_PROMPT 256

typedef struct out {
    int32_t toks[MAX_OUT];
    float lps[MAX_OUT];
    int n;
    atomic_int done;
    tdm_finish_reason_t fin;
    char text[8192];
    size_t tlen;
    int n_cached;
} out_t;

static void on_event(void *user, const tdm_request_event_t *ev)
{
    out_t *o = user;
    if (ev->token >= 0 && o->n < MAX_OUT) {
        o->lps[o->n] = ev->logprob;
        o->toks[o->n++] = ev->token;
    }
    if (ev->text_len > 0 && o->tlen + ev->text_len < sizeof(o->text)) {
        memcpy(o->text + o->tlen, ev->text, ev->text_len);
        o->tlen += ev->text_len;
    }
    if (ev->finish != TDM_FINISH_NONE) {
        o->fin = ev->finish;
        o->n_cached = ev->n_cached;
        atomic_store(&o->done, 1);
    }
}

typedef struct prompts {
    int32_t toks[N_PROMPTS][MAX_PROMPT];
    int n[N_PROMPTS];
} prompts_t;

static int gen_tokens = 24;
static int max_step_ms = 0; /* make_engine's step-time bound */

static tdm_engine_t *make_engine(const char *model, int max_seqs, int step_tokens, int num_blocks,
                                 bool prefix)
{
    tdm_engine_config_t c;
    tdm_engine_config_default(&c);
    c.model_path = model;
    c.max_num_seqs = max_seqs;
    c.max_num_batched_tokens = step_tokens;
    c.max_step_ms = max_step_ms;
    c.num_blocks = num_blocks;
    c.max_model_len = 512;
    c.enable_prefix_caching = prefix;
    c.threads = 2;
    tdm_engine_t *e = NULL;
    char err[256];
    tdm_status_t st = tdm_engine_create(&c, err, sizeof(err), &e);
    CHECK(st == TDM_OK, "engine create: %s", err);
    return st == TDM_OK ? e : NULL;
}

static void add(tdm_engine_t *e, const prompts_t *p, int i, out_t *o,
                const tdm_sampling_params_t *sp)
{
    memset(o, 0, sizeof(*o));
    tdm_request_params_t rp = {0};
    rp.prompt = p->toks[i];
    rp.n_prompt = (size_t)p->n[i];
    if (sp != NULL) {
        rp.sampling = *sp;
        rp.sampling.seed = sp->seed + (uint64_t)i;
    } else {
        tdm_sampling_params_default(&rp.sampling);
        rp.sampling.temperature = 0.0f;
    }
    rp.max_tokens = gen_tokens;
    rp.ignore_eos = true;
    rp.cb = on_event;
    rp.user = o;
    CHECK(tdm_engine_add(e, &rp, NULL) == TDM_OK, "add prompt %d", i);
}

typedef enum mode {
    MODE_ALONE,
    MODE_TOGETHER,
    MODE_RANDOM_ARRIVALS,
} mode_t_;

static void run(tdm_engine_t *e, const prompts_t *p, mode_t_ mode, out_t *outs,
                const tdm_sampling_params_t *sp)
{
    if (mode == MODE_ALONE) {
        for (int i = 0; i < N_PROMPTS; i++) {
            add(e, p, i, &outs[i], sp);
            tdm_engine_run_until_idle(e);
        }
    } else if (mode == MODE_TOGETHER) {
        for (int i = 0; i < N_PROMPTS; i++)
            add(e, p, i, &outs[i], sp);
        tdm_engine_run_until_idle(e);
    } else {
        uint64_t rng = 42;
        int next = 0;
        for (int guard = 0; guard < 100000; guard++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            if (next < N_PROMPTS && (rng >> 33) % 3 == 0) {
                add(e, p, next, &outs[next], sp);
                next++;
            }
            bool did = false;
            tdm_engine_step(e, &did);
            if (next == N_PROMPTS && !did)
                break;
        }
        tdm_engine_run_until_idle(e);
    }
}

static bool same(const out_t *a, const out_t *b, int n_prompts, const char *what)
{
    bool ok = true;
    for (int i = 0; i < n_prompts; i++) {
        bool eq =
            a[i].n == b[i].n && memcmp(a[i].toks, b[i].toks, sizeof(int32_t) * (size_t)a[i].n) == 0;
        if (!eq) {
            printf("  %s: prompt %d differs (%d vs %d tokens):\n   ", what, i, a[i].n, b[i].n);
            for (int k = 0; k < a[i].n; k++)
                printf(" %d", a[i].toks[k]);
            printf("\n   ");
            for (int k = 0; k < b[i].n; k++)
                printf(" %d", b[i].toks[k]);
            printf("\n");
        }
        ok = ok && eq;
    }
    CHECK(ok, "%s: token sequences differ from the alone run", what);
    if (ok)
        printf("  ok %s\n", what);
    return ok;
}

static void test_invariance(const char *model, const prompts_t *p, const char *label)
{
    printf("batch invariance on %s\n", label);
    static out_t ref[N_PROMPTS], got[N_PROMPTS];
    tdm_engine_t *e = make_engine(model, 8, 256, 0, false);
    if (e == NULL)
        return;
    run(e, p, MODE_ALONE, ref, NULL);
    for (int i = 0; i < N_PROMPTS; i++)
        CHECK(ref[i].n == gen_tokens && ref[i].fin == TDM_FINISH_LENGTH,
              "alone: prompt %d gave %d tokens, finish %d", i, ref[i].n, ref[i].fin);
    run(e, p, MODE_TOGETHER, got, NULL);
    same(ref, got, N_PROMPTS, "all together");
    run(e, p, MODE_RANDOM_ARRIVALS, got, NULL);
    same(ref, got, N_PROMPTS, "arrivals at random steps");
    tdm_engine_destroy(e);

    /* Prefix cache: the first pass fills it, the second hits it. */
    e = make_engine(model, 8, 256, 0, true);
    if (e != NULL) {
        run(e, p, MODE_ALONE, got, NULL);
        same(ref, got, N_PROMPTS, "prefix caching on, first pass");
        run(e, p, MODE_TOGETHER, got, NULL);
        same(ref, got, N_PROMPTS, "prefix-cache hits, together");
        int cached = 0;
        for (int i = 0; i < N_PROMPTS; i++)
            cached += got[i].n_cached;
        tdm_engine_stats_t st;
        tdm_engine_get_stats(e, &st);
        CHECK(cached > 0 && st.prefix_hits > 0, "no prefix-cache hits (%d cached tokens)", cached);
        printf("  prefix cache: %d prompt tokens served from cache in the second pass\n", cached);
        tdm_engine_destroy(e);
    }
    int chunks[] = {1, 7, 64};
    for (int c = 0; c < 3; c++) {
        e = make_engine(model, 8, chunks[c], 0, false);
        if (e == NULL)
            continue;
        char what[64];
        snprintf(what, sizeof(what), "chunked prefill of %d tokens per step", chunks[c]);
        run(e, p, MODE_TOGETHER, got, NULL);
        same(ref, got, N_PROMPTS, what);
        tdm_engine_destroy(e);
    }
    /* The step-time bound: prompt chunks sized from measured step times.
     * A 1 ms target holds a step to about a block of prompt. */
    max_step_ms = 1;
    e = make_engine(model, 8, 256, 0, false);
    max_step_ms = 0;
    if (e != NULL) {
        run(e, p, MODE_TOGETHER, got, NULL);
        tdm_engine_stats_t st;
        tdm_engine_get_stats(e, &st);
        char what[128];
        snprintf(what, sizeof(what),
                 "step-time bound of 1 ms (%llu steps, %.3f ms per row, budget %d tokens)",
                 (unsigned long long)st.steps, (double)st.step_ms_per_row, st.step_token_budget);
        same(ref, got, N_PROMPTS, what);
        CHECK(st.step_ms_per_row > 0.0f, "%s: no step was measured", what);
        /* 256 rows of a 135M-parameter model are about 70 GFLOP: never 1 ms
         * on a CPU (the synthetic models are too small to say) */
        if (strstr(label, "SmolLM2") != NULL)
            CHECK(st.step_token_budget < 256, "%s: the bound did not shrink the step", what);
        tdm_engine_destroy(e);
    }
    /* Too few blocks for all five at once: sequences are preempted and
     * recomputed, with and without the prefix cache. */
    int longest = 0;
    for (int i = 0; i < N_PROMPTS; i++) {
        int blocks = (p->n[i] + gen_tokens + 15) / 16;
        longest = blocks > longest ? blocks : longest;
    }
    for (int pc = 0; pc < 2; pc++) {
        /* Room for the longest request and a little more: never all five. */
        int nb = longest + 2;
        e = make_engine(model, 8, 256, nb, pc == 1);
        if (e == NULL)
            continue;
        run(e, p, MODE_TOGETHER, got, NULL);
        tdm_engine_stats_t st;
        tdm_engine_get_stats(e, &st);
        char what[96];
        snprintf(what, sizeof(what), "preemption with %d blocks%s (%llu preemptions)", nb,
                 pc ? ", prefix caching" : "", (unsigned long long)st.preemptions);
        same(ref, got, N_PROMPTS, what);
        CHECK(st.preemptions > 0, "%s: no preemption happened", what);
        tdm_engine_destroy(e);
    }
    /* Seeded sampling is reproducible, alone or in a batch. */
    tdm_sampling_params_t sp;
    tdm_sampling_params_default(&sp);
    sp.temperature = 0.9f;
    sp.top_p = 0.9f;
    sp.top_k = 40;
    sp.has_seed = true;
    sp.seed = 7;
    e = make_engine(model, 8, 256, 0, false);
    if (e != NULL) {
        run(e, p, MODE_ALONE, ref, &sp);
        run(e, p, MODE_RANDOM_ARRIVALS, got, &sp);
        same(ref, got, N_PROMPTS, "seeded sampling, alone vs random arrivals");
        tdm_engine_destroy(e);
    }
}

static void random_prompts(prompts_t *p, int n_vocab, uint64_t seed)
{
    static const int lens[N_PROMPTS] = {21, 37, 50, 64, 90};
    int32_t common[48];
    for (int j = 0; j < 48; j++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        common[j] = 3 + (int32_t)((seed >> 33) % (uint64_t)(n_vocab - 3));
    }
    for (int i = 0; i < N_PROMPTS; i++) {
        p->n[i] = lens[i];
        for (int j = 0; j < lens[i]; j++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            /* prompts 1..4 share the first 40 tokens (prefix cache hits) */
            p->toks[i][j] =
                i > 0 && j < 40 ? common[j] : 3 + (int32_t)((seed >> 33) % (uint64_t)(n_vocab - 3));
        }
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
    static const char *const q[N_PROMPTS] = {
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain in two sentences why the sky is blue.",
        "List three prime numbers.",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    };
    for (int i = 0; i < N_PROMPTS; i++) {
        char text[1024];
        snprintf(text, sizeof(text),
                 "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n",
                 q[i]);
        size_t n = 0;
        tdm_tokenizer_encode(tok, text, strlen(text), true, p->toks[i], MAX_PROMPT, &n);
        p->n[i] = (int)n;
    }
    tdm_tokenizer_destroy(tok);
    tdm_gguf_close(g);
}

static void test_stops_and_limits(const char *model, const prompts_t *p)
{
    printf("stop strings, stop tokens, max tokens\n");
    tdm_engine_t *e = make_engine(model, 4, 256, 0, false);
    if (e == NULL)
        return;
    static out_t base, o;
    add(e, p, 0, &base, NULL);
    tdm_engine_run_until_idle(e);
    CHECK(base.n == gen_tokens && base.fin == TDM_FINISH_LENGTH, "max_tokens: %d tokens", base.n);
    /* A stop string from the middle of the text cuts it there. */
    if (base.tlen >= 12) {
        char stop[8];
        size_t at = base.tlen / 2;
        memcpy(stop, base.text + at, 4);
        stop[4] = '\0';
        size_t first = (size_t)(strstr(base.text, stop) - base.text);
        const char *stops[] = {stop};
        tdm_request_params_t rp = {0};
        rp.prompt = p->toks[0];
        rp.n_prompt = (size_t)p->n[0];
        tdm_sampling_params_default(&rp.sampling);
        rp.sampling.temperature = 0;
        rp.max_tokens = gen_tokens;
        rp.ignore_eos = true;
        rp.stop = stops;
        rp.n_stop = 1;
        rp.cb = on_event;
        rp.user = &o;
        memset(&o, 0, sizeof(o));
        tdm_engine_add(e, &rp, NULL);
        tdm_engine_run_until_idle(e);
        CHECK(o.fin == TDM_FINISH_STOP, "stop string: finish %d", o.fin);
        CHECK(o.tlen == first && memcmp(o.text, base.text, first) == 0,
              "stop string: text of %zu bytes, expected the %zu before the stop", o.tlen, first);
        /* A stop token. */
        int32_t stop_id = base.toks[5];
        int first_at = 0;
        while (base.toks[first_at] != stop_id)
            first_at++;
        rp.stop = NULL;
        rp.n_stop = 0;
        rp.stop_token_ids = &stop_id;
        rp.n_stop_token_ids = 1;
        memset(&o, 0, sizeof(o));
        tdm_engine_add(e, &rp, NULL);
        tdm_engine_run_until_idle(e);
        CHECK(o.fin == TDM_FINISH_STOP && o.n == first_at + 1,
              "stop token: finish %d after %d tokens, expected %d", o.fin, o.n, first_at + 1);
    }
    /* Requests that cannot be served are refused at once. */
    tdm_request_params_t bad = {0};
    tdm_sampling_params_default(&bad.sampling);
    CHECK(tdm_engine_add(e, &bad, NULL) == TDM_ERR_INVALID, "empty prompt accepted");
    int32_t big[600] = {0};
    bad.prompt = big;
    bad.n_prompt = 600;
    CHECK(tdm_engine_add(e, &bad, NULL) == TDM_ERR_INVALID, "prompt over max_model_len accepted");
    int32_t oov = 1 << 30;
    bad.prompt = &oov;
    bad.n_prompt = 1;
    CHECK(tdm_engine_add(e, &bad, NULL) == TDM_ERR_INVALID, "token outside vocabulary accepted");
    bad.prompt = big;
    bad.n_prompt = 4;
    bad.sampling.top_p = 2.0f;
    CHECK(tdm_engine_add(e, &bad, NULL) == TDM_ERR_INVALID, "top_p 2 accepted");
    tdm_engine_destroy(e);
}

static void test_cancel(const char *model, const prompts_t *p)
{
    printf("cancel from another thread\n");
    tdm_engine_t *e = make_engine(model, 4, 256, 0, false);
    if (e == NULL)
        return;
    CHECK(tdm_engine_start(e) == TDM_OK, "start thread");
    static out_t o;
    memset(&o, 0, sizeof(o));
    tdm_request_params_t rp = {0};
    rp.prompt = p->toks[1];
    rp.n_prompt = (size_t)p->n[1];
    tdm_sampling_params_default(&rp.sampling);
    rp.sampling.temperature = 0;
    rp.max_tokens = 400;
    rp.ignore_eos = true;
    rp.cb = on_event;
    rp.user = &o;
    uint64_t id;
    CHECK(tdm_engine_add(e, &rp, &id) == TDM_OK, "add");
    struct timespec ts = {0, 1000000};
    for (int i = 0; i < 20000 && o.n < 3 && !atomic_load(&o.done); i++)
        nanosleep(&ts, NULL);
    CHECK(tdm_engine_cancel(e, id) == TDM_OK, "cancel");
    for (int i = 0; i < 20000 && !atomic_load(&o.done); i++)
        nanosleep(&ts, NULL);
    CHECK(atomic_load(&o.done) && o.fin == TDM_FINISH_CANCELLED,
          "cancelled request: done %d finish %d", atomic_load(&o.done), o.fin);
    tdm_engine_stats_t st;
    for (int i = 0; i < 2000; i++) {
        tdm_engine_get_stats(e, &st);
        if (st.num_free_blocks == st.num_blocks)
            break;
        nanosleep(&ts, NULL);
    }
    CHECK(st.num_free_blocks == st.num_blocks, "blocks leaked after cancel: %d of %d free",
          st.num_free_blocks, st.num_blocks);
    tdm_engine_stop(e);
    tdm_engine_destroy(e);
}

/* Sampling where the logits are (ops->sample; on the CPU the same path
 * through TANDEM_ENGINE_DEVICE_SAMPLE=1) gives the host sampler's tokens
 * and log-probabilities: every mix of parameters, penalties over prompt
 * and output, seeds, prior output, greedy rows among sampled ones, and a
 * request asking top log-probabilities (that step goes to the host). */
static void test_device_sample(const char *model, const prompts_t *p, float temp_scale)
{
    static out_t ref[N_PROMPTS], got[N_PROMPTS];
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1)
            setenv("TANDEM_ENGINE_DEVICE_SAMPLE", "1", 1);
        tdm_engine_t *e = make_engine(model, 8, 256, 0, false);
        unsetenv("TANDEM_ENGINE_DEVICE_SAMPLE");
        if (e == NULL)
            return;
        out_t *outs = pass == 0 ? ref : got;
        for (int i = 0; i < N_PROMPTS; i++) {
            memset(&outs[i], 0, sizeof(outs[i]));
            tdm_request_params_t rp = {0};
            rp.prompt = p->toks[i];
            rp.n_prompt = (size_t)p->n[i];
            tdm_sampling_params_t *sp = &rp.sampling;
            tdm_sampling_params_default(sp);
            sp->has_seed = true;
            sp->seed = 1000 + (uint64_t)i;
            sp->temperature = i == 1 ? 0.0f : temp_scale * (0.6f + 0.2f * (float)i);
            sp->top_k = i == 2 ? 5 : i == 4 ? 1000 : 0;
            sp->top_p = i == 3 ? 0.8f : 1.0f;
            sp->min_p = i == 0 ? 0.05f : 0.0f;
            sp->repetition_penalty = i % 2 ? 1.3f : 1.0f;
            sp->frequency_penalty = i == 2 ? 0.5f : i == 4 ? -0.3f : 0.0f;
            sp->presence_penalty = i == 0 ? 0.4f : 0.0f;
            rp.n_prior_output = i == 3 ? 2 : 0;
            rp.logprobs = i != 2;
            rp.top_logprobs = i == 4 ? 2 : 0;
            /* the top-logprobs request ends early: its steps go to the
             * host, the later ones to the device path */
            rp.max_tokens = i == 4 ? 3 : gen_tokens;
            rp.ignore_eos = true;
            rp.cb = on_event;
            rp.user = &outs[i];
            CHECK(tdm_engine_add(e, &rp, NULL) == TDM_OK, "add prompt %d", i);
        }
        tdm_engine_run_until_idle(e);
        tdm_engine_destroy(e);
    }
    char what[96];
    snprintf(what, sizeof(what), "device sampling vs host sampling, temperature x%g", temp_scale);
    same(ref, got, N_PROMPTS, what);
    /* the draws mattered: sampled requests do not repeat one token */
    int distinct = 0;
    for (int k = 1; k < ref[0].n; k++)
        distinct += ref[0].toks[k] != ref[0].toks[0];
    CHECK(distinct > 0, "%s: prompt 0 only ever drew token %d", what, ref[0].toks[0]);
    int lp_same = 0, lp_all = 0;
    for (int i = 0; i < N_PROMPTS; i++)
        for (int k = 0; k < ref[i].n && k < got[i].n; k++) {
            lp_all++;
            lp_same += ref[i].lps[k] == got[i].lps[k];
            if (ref[i].lps[k] != got[i].lps[k])
                printf("  prompt %d token %d: logprob %.9g vs %.9g\n", i, k, (double)ref[i].lps[k],
                       (double)got[i].lps[k]);
        }
    CHECK(lp_same == lp_all, "device sampling: %d of %d log-probabilities differ", lp_all - lp_same,
          lp_all);
}

int main(void)
{
    tdm_log_set_level(TDM_LOG_LEVEL_WARN);
    static prompts_t p;
    static const char *const types[] = {"q4_1", "q8_0", "f16"};
    for (int t = 0; t < 3; t++) {
        char path[256], args[256];
        snprintf(args, sizeof(args),
                 "--n-embd 128 --n-ff 256 --n-layer 3 --n-head 4 --n-head-kv 2 --n-vocab 600 "
                 "--type %s --seed %d",
                 types[t], 11 + t);
        if (t_mkmodel(path, sizeof(path), args) != 0) {
            CHECK(0, "mkmodel %s failed", types[t]);
            continue;
        }
        random_prompts(&p, 600, 99 + (uint64_t)t);
        char label[64];
        snprintf(label, sizeof(label), "synthetic %s model", types[t]);
        test_invariance(path, &p, label);
        if (t == 0) {
            /* random weights give logits hundreds apart: hot enough to draw */
            test_device_sample(path, &p, 100.0f);
            test_stops_and_limits(path, &p);
            test_cancel(path, &p);
        }
        unlink(path);
    }
    const char *model = t_default_model();
    if (model != NULL) {
        gen_tokens = 32;
        text_prompts(&p, model);
        test_invariance(model, &p, "SmolLM2-135M-Instruct Q4_1");
        test_device_sample(model, &p, 1.0f);
    } else {
        printf("default model not present: real-model invariance skipped (run `make model`)\n");
    }
    return t_finish();
}
