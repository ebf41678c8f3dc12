/* tandem ppl: perplexity over a text file in windows of --ctx tokens.
 *
 * As llama.cpp's perplexity tool does it: the text is tokenized once (with
 * BOS if the model wants one), cut into consecutive windows of ctx tokens
 * (the first token of each window replaced by BOS when the model uses one),
 * and only the second half of each window is scored, so every scored token
 * has at least ctx/2 tokens of context. PPL = exp(mean NLL).
 *
 * --kv-codec NAME simulates KV that crossed the network from a prefill
 * node to a decode node: per window, the first half is evaluated, each of
 * its KV blocks goes through the codec's encode and decode in place, and
 * the second half is evaluated attending to that KV (tdm_engine_eval_split).
 * With the lossless f16 codec the result is bit-identical to no codec. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tandem/kv_codec.h"
#include "tandem/log.h"
#include "tool.h"

/* Encode + decode of each context block, in place (tdm_engine_kv_fn_t). */
typedef struct ppl_codec {
    tdm_kv_codec_t codec;
    tdm_kv_codec_ctx_t *ctx;
    uint8_t *payload; /* tdm_kv_codec_max_size() bytes */
    size_t cap;
    uint64_t blocks, payload_bytes, f16_bytes;
} ppl_codec_t;

static tdm_status_t ppl_codec_roundtrip(void *user, int32_t block, int32_t n_tokens,
                                        uint16_t *const *k, uint16_t *const *v)
{
    ppl_codec_t *pc = user;
    size_t len;
    tdm_status_t st =
        tdm_kv_codec_encode(pc->ctx, pc->codec, (const uint16_t *const *)k,
                            (const uint16_t *const *)v, n_tokens, pc->payload, pc->cap, &len);
    if (st == TDM_OK)
        st = tdm_kv_codec_decode(pc->ctx, pc->payload, len, n_tokens, k, v, NULL);
    pc->blocks++;
    pc->payload_bytes += len;
    pc->f16_bytes += tdm_kv_layout_f16_bytes(tdm_kv_codec_ctx_layout(pc->ctx), n_tokens);
    return st;
}

int cmd_ppl(int argc, char **argv)
{
    tool_engine_opts_t eo;
    tool_engine_opts_default(&eo);
    const char *file = NULL, *kv_codec = NULL;
    int ctx = 512, max_chunks = 0;
    tdm_flag_t flags[24];
    size_t n = tool_engine_flags(&eo, flags);
    tdm_flag_t more[] = {
        {"file", 'f', TDM_FLAG_TYPE_STR, &file, "text file to score", NULL},
        {"ctx", 'c', TDM_FLAG_TYPE_INT, &ctx, "window length in tokens", NULL},
        {"chunks", 0, TDM_FLAG_TYPE_INT, &max_chunks, "score at most this many windows (0: all)",
         NULL},
        {"kv-codec", 0, TDM_FLAG_TYPE_STR, &kv_codec,
         "pass the first half's KV through this codec (f16, q8, f16+lz4, q8+lz4)", NULL},
    };
    memcpy(flags + n, more, sizeof(more));
    n += sizeof(more) / sizeof(more[0]);
    int rc;
    if (!tool_parse("ppl [-m MODEL] -f TEXT [--ctx N] [--kv-codec NAME]",
                    "Perplexity of a text file, scored in windows as llama.cpp's perplexity does.",
                    flags, n, argc, argv, NULL, 0, NULL, &rc))
        return rc;
    if (file == NULL || ctx < 16) {
        fprintf(stderr, "tandem ppl: give -f TEXT and a --ctx of at least 16\n");
        return TOOL_EXIT_USAGE;
    }
    ppl_codec_t pc = {0};
    if (kv_codec != NULL && tdm_kv_codec_parse(kv_codec, &pc.codec) != TDM_OK) {
        fprintf(stderr, "tandem ppl: --kv-codec must be f16, q8, f16+lz4 or q8+lz4\n");
        return TOOL_EXIT_USAGE;
    }
    FILE *f = fopen(file, "rb");
    if (f == NULL) {
        fprintf(stderr, "tandem ppl: cannot open %s\n", file);
        return TOOL_EXIT_USAGE;
    }
    size_t len;
    char *text = tool_read_all(f, &len);
    fclose(f);
    if (text == NULL)
        return TOOL_EXIT_FAIL;
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
    if (kv_codec != NULL) {
        tdm_kv_layout_t layout;
        tdm_engine_kv_layout(e, &layout);
        if (tdm_kv_codec_ctx_create(&layout, &pc.ctx) == TDM_OK) {
            pc.cap = tdm_kv_codec_max_size(&layout, pc.codec);
            pc.payload = malloc(pc.cap);
        }
        if (pc.payload == NULL) {
            fprintf(stderr, "tandem ppl: out of memory for the KV codec\n");
            tdm_kv_codec_ctx_destroy(pc.ctx);
            tdm_engine_destroy(e);
            free(text);
            return TOOL_EXIT_FAIL;
        }
    }
    size_t nt = 0;
    int32_t bos;
    int32_t *toks = tool_tokenize_text(tok, text, len, &nt, &bos);
    float *logits = malloc((size_t)ctx * (size_t)V * sizeof(float));
    int32_t *win = malloc((size_t)ctx * sizeof(int32_t));
    if (toks == NULL || logits == NULL || win == NULL) {
        fprintf(stderr, "tandem ppl: out of memory or cannot tokenize\n");
        rc = TOOL_EXIT_FAIL;
        goto out;
    }
    size_t n_chunks = nt / (size_t)ctx;
    if (max_chunks > 0 && n_chunks > (size_t)max_chunks)
        n_chunks = (size_t)max_chunks;
    if (n_chunks == 0) {
        fprintf(stderr, "tandem ppl: the text has %zu tokens, fewer than one window of %d\n", nt,
                ctx);
        rc = TOOL_EXIT_USAGE;
        goto out;
    }
    fprintf(stderr, "ppl: %zu tokens, %zu windows of %d, scoring the second half of each%s%s\n", nt,
            n_chunks, ctx, kv_codec ? ", first half's KV through codec " : "",
            kv_codec ? tdm_kv_codec_name(pc.codec) : "");
    double nll = 0, nll2 = 0;
    size_t count = 0;
    int first = ctx / 2;
    double t0 = tool_now();
    for (size_t c = 0; c < n_chunks; c++) {
        memcpy(win, toks + c * (size_t)ctx, (size_t)ctx * sizeof(int32_t));
        if (bos >= 0)
            win[0] = bos;
        tdm_status_t st = kv_codec != NULL
                              ? tdm_engine_eval_split(e, win, (size_t)ctx, (size_t)first,
                                                      ppl_codec_roundtrip, &pc, logits)
                              : tdm_engine_eval(e, win, (size_t)ctx, logits);
        if (st != TDM_OK) {
            fprintf(stderr, "tandem ppl: evaluation failed\n");
            rc = TOOL_EXIT_FAIL;
            goto out;
        }
        for (int j = first; j < ctx - 1; j++) {
            double lp = tool_token_logprob(logits + (size_t)j * (size_t)V, V,
                                           toks[c * (size_t)ctx + (size_t)j + 1]);
            nll -= lp;
            nll2 += lp * lp;
            count++;
        }
        printf("[%zu]%.4f%s", c + 1, exp(nll / (double)count), c + 1 < n_chunks ? "," : "\n");
        fflush(stdout);
    }
    double mean = nll / (double)count;
    double var = nll2 / (double)count - mean * mean;
    double err = count > 1 && var > 0 ? sqrt(var / (double)(count - 1)) : 0;
    printf("Final estimate: PPL = %.4f +/- %.5f\n", exp(mean), exp(mean) * err);
    fprintf(stderr, "ppl: %zu tokens scored in %.1f s\n", count, tool_now() - t0);
    if (pc.blocks > 0)
        fprintf(stderr,
                "ppl: KV codec %s: %llu blocks, %.0f payload bytes per block, %.3fx smaller "
                "than f16\n",
                tdm_kv_codec_name(pc.codec), (unsigned long long)pc.blocks,
                (double)pc.payload_bytes / (double)pc.blocks,
                (double)pc.f16_bytes / (double)pc.payload_bytes);
    rc = TOOL_EXIT_OK;
out:
    free(win);
    free(logits);
    free(toks);
    free(text);
    free(pc.payload);
    tdm_kv_codec_ctx_destroy(pc.ctx);
    tdm_engine_destroy(e);
    return rc;
}
