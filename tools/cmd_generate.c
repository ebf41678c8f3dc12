/* tandem generate / tandem logits */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tandem/log.h"
#include "tool.h"

typedef struct gen_out {
    bool ids; /* print token ids instead of text */
    int32_t n_out;
    int32_t n_prompt;
    int32_t n_cached;
    tdm_finish_reason_t finish;
    double t_first; /* when the first token arrived */
    double t_last;
} gen_out_t;

static void on_event(void *user, const tdm_request_event_t *ev)
{
    gen_out_t *g = user;
    double now = tool_now();
    if (ev->token >= 0) {
        if (g->n_out == 0)
            g->t_first = now;
        g->n_out++;
        g->t_last = now;
        if (g->ids)
            printf(g->n_out == 1 ? "%d" : " %d", ev->token);
    }
    if (!g->ids && ev->text_len > 0)
        fwrite(ev->text, 1, ev->text_len, stdout);
    fflush(stdout);
    if (ev->finish != TDM_FINISH_NONE) {
        g->finish = ev->finish;
        g->n_prompt = ev->n_prompt;
        g->n_cached = ev->n_cached;
        if (ev->finish == TDM_FINISH_ERROR)
            fprintf(stderr, "tandem generate: %s\n", ev->error ? ev->error : "failed");
    }
}

/* Builds the prompt tokens: a raw prompt (special tokens parsed, BOS if the
 * model wants one) or a chat message through the model's template. */
static int build_prompt(const tdm_model_t *m, const char *prompt, const char *chat,
                        const char *system, int32_t **out, size_t *n_out)
{
    const tdm_tokenizer_t *tok = tdm_model_tokenizer(m);
    char *text = NULL;
    bool bos = false;
    if (chat != NULL) {
        tdm_chat_template_t tmpl;
        char def_sys[512] = "";
        if (tdm_chat_template_detect(tdm_model_gguf(m), &tmpl, def_sys, sizeof(def_sys)) != TDM_OK)
            tmpl = TDM_CHAT_TEMPLATE_CHATML;
        tdm_chat_msg_t msgs[2];
        size_t n = 0;
        if (system != NULL)
            msgs[n++] = (tdm_chat_msg_t){"system", system};
        msgs[n++] = (tdm_chat_msg_t){"user", chat};
        if (tdm_chat_render(tmpl, def_sys, msgs, n, true, &text) != TDM_OK) {
            fprintf(stderr, "tandem generate: cannot render the chat template\n");
            return TOOL_EXIT_FAIL;
        }
    } else {
        size_t len = strlen(prompt);
        text = malloc(len + 1);
        if (text == NULL)
            return TOOL_EXIT_FAIL;
        memcpy(text, prompt, len + 1);
        bos = tdm_tokenizer_add_bos(tok) && tdm_tokenizer_bos(tok) >= 0;
    }
    size_t len = strlen(text), cap = len + 8, n = 0;
    int32_t *ids = malloc(cap * sizeof(int32_t));
    if (ids == NULL) {
        free(text);
        return TOOL_EXIT_FAIL;
    }
    if (bos)
        ids[n++] = tdm_tokenizer_bos(tok);
    size_t got = 0;
    tdm_status_t st = tdm_tokenizer_encode(tok, text, len, true, ids + n, cap - n, &got);
    free(text);
    if (st != TDM_OK) {
        free(ids);
        fprintf(stderr, "tandem generate: cannot tokenize the prompt: %s\n", tdm_status_str(st));
        return TOOL_EXIT_FAIL;
    }
    *out = ids;
    *n_out = n + got;
    return TOOL_EXIT_OK;
}

int cmd_generate(int argc, char **argv)
{
    tool_engine_opts_t eo;
    tool_engine_opts_default(&eo);
    eo.max_num_seqs = 1;
    const char *prompt = NULL, *chat = NULL, *system = NULL;
    int n_predict = 256, top_k = 40;
    float temp = 0.8f, top_p = 0.95f, min_p = 0.05f, rep = 1.0f, freq = 0.0f, pres = 0.0f;
    uint64_t seed = 0;
    bool has_seed = false, ignore_eos = false, ids = false, verbose = false;
    tdm_flag_list_t stops = {0};
    tdm_flag_t flags[32];
    size_t n = tool_engine_flags(&eo, flags);
    tdm_flag_t more[] = {
        {"prompt", 'p', TDM_FLAG_TYPE_STR, &prompt, "raw prompt (special tokens are parsed)", NULL},
        {"chat", 0, TDM_FLAG_TYPE_STR, &chat, "a user message, sent through the chat template",
         NULL},
        {"system", 0, TDM_FLAG_TYPE_STR, &system,
         "system message for --chat (default: the model's own)", NULL},
        {"max-tokens", 'n', TDM_FLAG_TYPE_INT, &n_predict, "tokens to generate at most", NULL},
        {"temp", 0, TDM_FLAG_TYPE_FLOAT, &temp, "temperature (0: greedy)", NULL},
        {"top-k", 0, TDM_FLAG_TYPE_INT, &top_k, "top-k (0: off)", NULL},
        {"top-p", 0, TDM_FLAG_TYPE_FLOAT, &top_p, "top-p (1: off)", NULL},
        {"min-p", 0, TDM_FLAG_TYPE_FLOAT, &min_p, "min-p (0: off)", NULL},
        {"repeat-penalty", 0, TDM_FLAG_TYPE_FLOAT, &rep, "repetition penalty (1: off)", NULL},
        {"frequency-penalty", 0, TDM_FLAG_TYPE_FLOAT, &freq, "frequency penalty", NULL},
        {"presence-penalty", 0, TDM_FLAG_TYPE_FLOAT, &pres, "presence penalty", NULL},
        {"seed", 's', TDM_FLAG_TYPE_U64, &seed, "random seed (reproducible sampling)", &has_seed},
        {"stop", 0, TDM_FLAG_TYPE_LIST, &stops, "stop string (repeatable)", NULL},
        {"ignore-eos", 0, TDM_FLAG_TYPE_BOOL, &ignore_eos, "go on past end-of-text tokens", NULL},
        {"output-ids", 0, TDM_FLAG_TYPE_BOOL, &ids, "print token ids instead of text", NULL},
        {"verbose", 'v', TDM_FLAG_TYPE_BOOL, &verbose, "log at debug level", NULL},
    };
    memcpy(flags + n, more, sizeof(more));
    n += sizeof(more) / sizeof(more[0]);
    int rc;
    if (!tool_parse("generate [-m MODEL] (-p PROMPT | --chat MESSAGE) [flags]",
                    "Generates text and streams it to stdout; logs go to stderr.", flags, n, argc,
                    argv, NULL, 0, NULL, &rc))
        return rc;
    if ((prompt == NULL) == (chat == NULL)) {
        fprintf(stderr, "tandem generate: give exactly one of -p PROMPT or --chat MESSAGE\n");
        return TOOL_EXIT_USAGE;
    }
    if (verbose)
        tdm_log_set_level(TDM_LOG_LEVEL_DEBUG);
    tdm_engine_t *e;
    rc = tool_engine_create(&eo, &e);
    if (rc != TOOL_EXIT_OK)
        return rc;
    int32_t *toks = NULL;
    size_t n_toks = 0;
    rc = build_prompt(tdm_engine_model(e), prompt, chat, system, &toks, &n_toks);
    if (rc != TOOL_EXIT_OK) {
        tdm_engine_destroy(e);
        return rc;
    }
    tdm_request_params_t rp = {0};
    rp.prompt = toks;
    rp.n_prompt = n_toks;
    tdm_sampling_params_default(&rp.sampling);
    rp.sampling.temperature = temp;
    rp.sampling.top_k = top_k;
    rp.sampling.top_p = top_p;
    rp.sampling.min_p = min_p;
    rp.sampling.repetition_penalty = rep;
    rp.sampling.frequency_penalty = freq;
    rp.sampling.presence_penalty = pres;
    rp.sampling.has_seed = has_seed;
    rp.sampling.seed = seed;
    rp.max_tokens = n_predict;
    rp.stop = stops.items;
    rp.n_stop = stops.n;
    rp.ignore_eos = ignore_eos;
    gen_out_t g = {.ids = ids};
    rp.cb = on_event;
    rp.user = &g;
    double t0 = tool_now();
    tdm_status_t st = tdm_engine_add(e, &rp, NULL);
    free(toks);
    if (st != TDM_OK) {
        fprintf(stderr, "tandem generate: the request was refused (%s); see the log above\n",
                tdm_status_str(st));
        tdm_engine_destroy(e);
        return TOOL_EXIT_USAGE;
    }
    st = tdm_engine_run_until_idle(e);
    if (ids || g.n_out > 0)
        printf("\n");
    fflush(stdout); /* the text ends before the log line on stderr */
    double t_prefill = g.t_first - t0, t_decode = g.t_last - g.t_first;
    tdm_log_info("generate",
                 "prompt %d tokens (%d cached) in %.3f s (%.1f tok/s); generated %d tokens, "
                 "%.1f tok/s; finish: %s",
                 g.n_prompt, g.n_cached, t_prefill,
                 t_prefill > 0 ? (double)g.n_prompt / t_prefill : 0.0, g.n_out,
                 g.n_out > 1 && t_decode > 0 ? (double)(g.n_out - 1) / t_decode : 0.0,
                 tdm_finish_reason_str(g.finish));
    tdm_engine_destroy(e);
    return st == TDM_OK && g.finish != TDM_FINISH_ERROR ? TOOL_EXIT_OK : TOOL_EXIT_FAIL;
}

/* tandem logits: raw float32 logits of the last position (or all). */
int cmd_logits(int argc, char **argv)
{
    tool_engine_opts_t eo;
    tool_engine_opts_default(&eo);
    const char *prompt = NULL, *ids_text = NULL, *out_path = NULL;
    bool all = false;
    tdm_flag_t flags[24];
    size_t n = tool_engine_flags(&eo, flags);
    tdm_flag_t more[] = {
        {"prompt", 'p', TDM_FLAG_TYPE_STR, &prompt, "prompt text (special tokens parsed)", NULL},
        {"ids", 0, TDM_FLAG_TYPE_STR, &ids_text, "prompt as space-separated token ids", NULL},
        {"out", 'o', TDM_FLAG_TYPE_STR, &out_path, "output file of float32 logits", NULL},
        {"all", 0, TDM_FLAG_TYPE_BOOL, &all, "every position, not only the last", NULL},
    };
    memcpy(flags + n, more, sizeof(more));
    n += sizeof(more) / sizeof(more[0]);
    int rc;
    if (!tool_parse("logits [-m MODEL] (-p PROMPT | --ids IDS) -o FILE",
                    "Writes the logits of the prompt's last position as float32 and prints the "
                    "prompt's token ids.",
                    flags, n, argc, argv, NULL, 0, NULL, &rc))
        return rc;
    if ((prompt == NULL) == (ids_text == NULL) || out_path == NULL) {
        fprintf(stderr, "tandem logits: give -o FILE and one of -p or --ids\n");
        return TOOL_EXIT_USAGE;
    }
    tdm_engine_t *e;
    rc = tool_engine_create(&eo, &e);
    if (rc != TOOL_EXIT_OK)
        return rc;
    const tdm_model_t *m = tdm_engine_model(e);
    size_t cap = 1 << 16, nt = 0;
    int32_t *toks = malloc(cap * sizeof(int32_t));
    if (prompt != NULL) {
        tdm_tokenizer_encode(tdm_model_tokenizer(m), prompt, strlen(prompt), true, toks, cap, &nt);
    } else {
        char *end;
        for (const char *p = ids_text; nt < cap;) {
            long v = strtol(p, &end, 10);
            if (end == p)
                break;
            toks[nt++] = (int32_t)v;
            p = end;
        }
    }
    int32_t V = tdm_model_hparams(m)->n_vocab;
    float *logits = malloc(nt * (size_t)V * sizeof(float));
    tdm_status_t st = nt > 0 && logits ? tdm_engine_eval(e, toks, nt, logits) : TDM_ERR_INVALID;
    if (st == TDM_OK) {
        FILE *f = fopen(out_path, "wb");
        size_t first = all ? 0 : nt - 1;
        if (f == NULL || fwrite(logits + first * (size_t)V, sizeof(float), (nt - first) * (size_t)V,
                                f) != (nt - first) * (size_t)V) {
            fprintf(stderr, "tandem logits: cannot write %s\n", out_path);
            st = TDM_ERR_IO;
        }
        if (f != NULL)
            fclose(f);
        for (size_t i = 0; i < nt; i++)
            printf(i ? " %d" : "%d", toks[i]);
        printf("\n");
    } else {
        fprintf(stderr, "tandem logits: evaluation failed: %s\n", tdm_status_str(st));
    }
    free(logits);
    free(toks);
    tdm_engine_destroy(e);
    return st == TDM_OK ? TOOL_EXIT_OK : TOOL_EXIT_FAIL;
}
