/* tandem imatrix: an importance matrix from calibration text.
 *
 *   tandem imatrix -m MODEL -f TEXT -o FILE [--ctx 512] [--chunks N]
 *
 * The text is tokenized and cut into windows of --ctx tokens (BOS first
 * when the model wants one), each evaluated by tandem's own forward
 * (tdm_engine_eval) with an activation hook: for every weight matrix, the
 * sum over all rows (tokens) of the square of each input column, and the
 * number of rows. tandem quantize --imatrix divides one by the other: the
 * mean squared activation that each column of the weight multiplies, which
 * is how much a rounding error in that column costs on average. Written
 * as a GGUF in llama.cpp's imatrix layout (quant_tool.h). The CPU backend
 * only (the hook reads host memory). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant_tool.h"
#include "tandem/dtype.h"
#include "tandem/log.h"
#include "tool.h"

#define N_MATRIX 8 /* tdm_matrix_t values */

typedef struct imat_acc {
    int32_t n_layer;
    int64_t k[N_MATRIX];      /* input columns of each matrix kind */
    double *sum[N_MATRIX];    /* [(n_layer + 1) * k]: layer il at il * k; the output at n_layer */
    uint64_t *rows[N_MATRIX]; /* [(n_layer + 1)] */
    int failed;
} imat_acc_t;

static void imat_hook(void *user, int32_t layer, tdm_matrix_t which, const float *x, int64_t n,
                      int64_t k)
{
    imat_acc_t *a = user;
    if ((int)which < 0 || which >= N_MATRIX || k != a->k[which] || a->sum[which] == NULL) {
        a->failed = 1;
        return;
    }
    const int32_t slot = layer < 0 ? a->n_layer : layer;
    double *s = a->sum[which] + (size_t)slot * (size_t)k;
    for (int64_t t = 0; t < n; t++)
        for (int64_t j = 0; j < k; j++) {
            const double v = x[t * k + j];
            s[j] += v * v;
        }
    a->rows[which][slot] += (uint64_t)n;
}

static const char *const matrix_names[N_MATRIX] = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output",
};

/* Writes the sums as NAME.in_sum2 / NAME.counts for every weight seen. */
static tdm_status_t imat_write(const imat_acc_t *a, const char *out_name, const char *path,
                               const char *dataset, uint64_t chunks, int ctx)
{
    tdm_gguf_writer_t *w = NULL;
    tdm_status_t st = tdm_gguf_writer_create(&w);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_str(w, "general.type", "imatrix");
    const char *ds[1] = {dataset};
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_str_array(w, "imatrix.datasets", ds, 1);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_u32(w, "imatrix.chunk_count", (uint32_t)chunks);
    if (st == TDM_OK)
        st = tdm_gguf_writer_set_u32(w, "imatrix.chunk_size", (uint32_t)ctx);
    for (int m = 0; m < N_MATRIX && st == TDM_OK; m++) {
        const int64_t k = a->k[m];
        float *v = malloc((size_t)k * sizeof(float));
        if (v == NULL) {
            st = TDM_ERR_NOMEM;
            break;
        }
        for (int32_t l = m == TDM_MATRIX_OUTPUT ? a->n_layer : 0;
             l < (m == TDM_MATRIX_OUTPUT ? a->n_layer + 1 : a->n_layer) && st == TDM_OK; l++) {
            if (a->rows[m][l] == 0)
                continue;
            char name[160];
            if (m == TDM_MATRIX_OUTPUT)
                snprintf(name, sizeof(name), "%s", out_name);
            else
                snprintf(name, sizeof(name), "blk.%d.%s.weight", l, matrix_names[m]);
            const double *s = a->sum[m] + (size_t)l * (size_t)k;
            for (int64_t j = 0; j < k; j++)
                v[j] = (float)s[j];
            char tn[192];
            uint64_t ne[1] = {(uint64_t)k};
            snprintf(tn, sizeof(tn), "%s.in_sum2", name);
            st = tdm_gguf_writer_add_tensor(w, tn, 1, ne, TDM_DTYPE_F32, v);
            float cnt = (float)a->rows[m][l];
            uint64_t one[1] = {1};
            snprintf(tn, sizeof(tn), "%s.counts", name);
            if (st == TDM_OK)
                st = tdm_gguf_writer_add_tensor(w, tn, 1, one, TDM_DTYPE_F32, &cnt);
        }
        free(v);
    }
    if (st == TDM_OK)
        st = tdm_gguf_writer_write(w, path);
    tdm_gguf_writer_destroy(w);
    return st;
}

int cmd_imatrix(int argc, char **argv)
{
    tool_engine_opts_t eo;
    tool_engine_opts_default(&eo);
    const char *file = NULL, *out = NULL;
    int ctx = 512, max_chunks = 0;
    tdm_flag_t flags[24];
    size_t n = tool_engine_flags(&eo, flags);
    tdm_flag_t more[] = {
        {"file", 'f', TDM_FLAG_TYPE_STR, &file, "calibration text", NULL},
        {"output", 'o', TDM_FLAG_TYPE_STR, &out, "importance matrix to write (GGUF)", NULL},
        {"ctx", 'c', TDM_FLAG_TYPE_INT, &ctx, "window length in tokens", NULL},
        {"chunks", 0, TDM_FLAG_TYPE_INT, &max_chunks, "use at most this many windows (0: all)",
         NULL},
    };
    memcpy(flags + n, more, sizeof(more));
    n += sizeof(more) / sizeof(more[0]);
    int rc;
    if (!tool_parse("imatrix [-m MODEL] -f TEXT -o FILE [--ctx N]",
                    "Collects an importance matrix (mean squared activation of every weight's "
                    "input columns) on calibration text, for tandem quantize --imatrix.",
                    flags, n, argc, argv, NULL, 0, NULL, &rc))
        return rc;
    if (file == NULL || out == NULL || ctx < 16) {
        fprintf(stderr, "tandem imatrix: give -f TEXT, -o FILE and a --ctx of at least 16\n");
        return TOOL_EXIT_USAGE;
    }
    FILE *f = fopen(file, "rb");
    if (f == NULL) {
        fprintf(stderr, "tandem imatrix: cannot open %s\n", file);
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
    const tdm_model_hparams_t *hp = tdm_model_hparams(m);
    const tdm_tokenizer_t *tok = tdm_model_tokenizer(m);
    imat_acc_t acc = {.n_layer = hp->n_layer};
    const int64_t d = hp->n_embd, qd = (int64_t)hp->n_head * hp->head_dim;
    const int64_t ks[N_MATRIX] = {d, d, d, qd, d, d, hp->n_ff, d};
    bool ok = true;
    for (int i = 0; i < N_MATRIX; i++) {
        acc.k[i] = ks[i];
        acc.sum[i] = calloc((size_t)(hp->n_layer + 1) * (size_t)ks[i], sizeof(double));
        acc.rows[i] = calloc((size_t)hp->n_layer + 1, sizeof(uint64_t));
        ok = ok && acc.sum[i] != NULL && acc.rows[i] != NULL;
    }
    size_t nt = 0;
    int32_t bos;
    int32_t *toks = tool_tokenize_text(tok, text, len, &nt, &bos);
    int32_t *win = malloc((size_t)ctx * sizeof(int32_t));
    float *logits = malloc((size_t)ctx * (size_t)hp->n_vocab * sizeof(float));
    rc = TOOL_EXIT_FAIL;
    if (!ok || toks == NULL || win == NULL || logits == NULL) {
        fprintf(stderr, "tandem imatrix: out of memory or cannot tokenize\n");
        goto out;
    }
    size_t n_chunks = nt / (size_t)ctx;
    if (max_chunks > 0 && n_chunks > (size_t)max_chunks)
        n_chunks = (size_t)max_chunks;
    if (n_chunks == 0) {
        fprintf(stderr, "tandem imatrix: the text has %zu tokens, fewer than one window of %d\n",
                nt, ctx);
        rc = TOOL_EXIT_USAGE;
        goto out;
    }
    if (tdm_engine_set_act_hook(e, imat_hook, &acc) != TDM_OK) {
        fprintf(stderr, "tandem imatrix: runs on the CPU backend only (use --device cpu)\n");
        rc = TOOL_EXIT_USAGE;
        goto out;
    }
    fprintf(stderr, "imatrix: %zu tokens, %zu windows of %d\n", nt, n_chunks, ctx);
    const double t0 = tool_now();
    for (size_t c = 0; c < n_chunks; c++) {
        memcpy(win, toks + c * (size_t)ctx, (size_t)ctx * sizeof(int32_t));
        if (bos >= 0)
            win[0] = bos;
        if (tdm_engine_eval(e, win, (size_t)ctx, logits) != TDM_OK || acc.failed) {
            fprintf(stderr, "tandem imatrix: evaluation of window %zu failed\n", c + 1);
            goto out;
        }
        fprintf(stderr, "\rimatrix: window %zu/%zu (%.1f s)", c + 1, n_chunks, tool_now() - t0);
    }
    fprintf(stderr, "\n");
    /* the output matrix's name: output.weight, or the tied token embedding */
    const char *out_name = tdm_gguf_find_tensor(tdm_model_gguf(m), "output.weight") != NULL
                               ? "output.weight"
                               : "token_embd.weight";
    const char *base = strrchr(file, '/');
    tdm_status_t st = imat_write(&acc, out_name, out, base ? base + 1 : file, n_chunks, ctx);
    if (st != TDM_OK) {
        fprintf(stderr, "tandem imatrix: writing %s failed (%s)\n", out, tdm_status_str(st));
        goto out;
    }
    fprintf(stderr, "imatrix: wrote %s (%zu windows of %d tokens)\n", out, n_chunks, ctx);
    rc = TOOL_EXIT_OK;
out:
    for (int i = 0; i < N_MATRIX; i++) {
        free(acc.sum[i]);
        free(acc.rows[i]);
    }
    free(logits);
    free(win);
    free(toks);
    free(text);
    tdm_engine_destroy(e);
    return rc;
}
