/* tandem quantize: a GGUF model into another weight type or mix.
 *
 *   tandem quantize IN.gguf OUT.gguf --type Q4_K_M [--imatrix FILE] [--split-max-size SIZE]
 *
 * Every tensor is read through tandem's exact dequantization (any type
 * tandem reads), and each 2-D weight is written in the type the mix picks
 * for it (quant_mix.c: the tensors llama.cpp's recipes keep at higher
 * precision, and its fallbacks for rows that are not a multiple of 256);
 * 1-D tensors (norms) are copied as they are. Metadata is carried over,
 * with general.file_type set to the mix. --type F32 of a quantized file is
 * an exact dequantized copy. With --imatrix, each row's quantization
 * weights its rounding error by the mean squared activation of each input
 * column (tandem imatrix writes such files; see quant_imatrix.c). Rows are
 * quantized by a thread pool; a line per tensor shows the progress. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quant_tool.h"
#include "tandem/dtype.h"
#include "tandem/gguf.h"
#include "tandem/quantize.h"
#include "tandem/threadpool.h"
#include "tool.h"

/* One tensor's rows, quantized by the pool. */
typedef struct qjob {
    const tdm_gguf_tensor_t *t;
    uint32_t type;
    const float *imp; /* NULL or ne[0] importance weights */
    uint64_t rows;
    size_t row_bytes;
    uint8_t *out;
    int failed;
} qjob_t;

static void qjob_fn(void *arg, int ith, int nth)
{
    qjob_t *j = arg;
    const uint64_t k = j->t->ne[0];
    const size_t in_row = tdm_dtype_row_bytes(j->t->type, k);
    float *x = malloc(k * sizeof(float));
    if (x == NULL) {
        j->failed = 1;
        return;
    }
    const uint64_t lo = j->rows * (uint64_t)ith / (uint64_t)nth;
    const uint64_t hi = j->rows * (uint64_t)(ith + 1) / (uint64_t)nth;
    for (uint64_t r = lo; r < hi; r++) {
        tdm_dtype_to_f32(j->t->type, (const uint8_t *)j->t->data + r * in_row, x, k);
        if (tdm_quantize_row(j->type, x, j->out + r * j->row_bytes, k, j->imp) != 0)
            j->failed = 1;
    }
    free(x);
}

int cmd_quantize(int argc, char **argv)
{
    const char *type_name = NULL, *imatrix = NULL;
    uint64_t split_max = 0;
    int threads = 0;
    tdm_flag_t flags[] = {
        {"type", 't', TDM_FLAG_TYPE_STR, &type_name,
         "Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q3_K_M, Q2_K, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
         "IQ4_NL, IQ4_XS, BF16, F16 or F32",
         NULL},
        {"imatrix", 0, TDM_FLAG_TYPE_STR, &imatrix,
         "importance matrix (tandem imatrix) weighting each column's rounding error", NULL},
        {"split-max-size", 0, TDM_FLAG_TYPE_SIZE, &split_max,
         "write shards of at most this size (NAME-00001-of-0000N.gguf), e.g. 2GiB", NULL},
        {"threads", 0, TDM_FLAG_TYPE_INT, &threads, "threads (0: all available)", NULL},
    };
    const char *pos[2];
    size_t n_pos = 0;
    int rc;
    if (!tool_parse(
            "quantize IN.gguf OUT.gguf --type TYPE [--imatrix FILE] [--split-max-size SIZE]",
            "Writes a GGUF model in another weight type or mix (llama.cpp's mixes; "
            "--type F32 of a quantized file is an exact dequantized copy).",
            flags, sizeof(flags) / sizeof(flags[0]), argc, argv, pos, 2, &n_pos, &rc))
        return rc;
    if (n_pos != 2 || type_name == NULL) {
        fprintf(stderr, "tandem quantize: give IN.gguf OUT.gguf and --type (see --help)\n");
        return TOOL_EXIT_USAGE;
    }
    const quant_mix_t *mix = quant_mix_find(type_name);
    if (mix == NULL) {
        fprintf(stderr, "tandem quantize: unknown --type '%s' (known: %s)\n", type_name,
                quant_mix_names());
        return TOOL_EXIT_USAGE;
    }
    char err[512];
    tdm_gguf_t *g = NULL;
    tdm_status_t st = tdm_gguf_open(pos[0], false, err, sizeof(err), &g);
    if (st != TDM_OK) {
        fprintf(stderr, "tandem quantize: %s: %s\n", pos[0], err);
        return TOOL_EXIT_USAGE;
    }
    quant_imatrix_t *im = NULL;
    if (imatrix != NULL && quant_imatrix_load(imatrix, &im, err, sizeof(err)) != TDM_OK) {
        fprintf(stderr, "tandem quantize: --imatrix %s: %s\n", imatrix, err);
        tdm_gguf_close(g);
        return TOOL_EXIT_USAGE;
    }
    if (im != NULL && !quant_uses_imp(mix->base))
        fprintf(stderr,
                "quantize: note: --imatrix has no effect on %s (its types round to nearest "
                "without a search)\n",
                mix->name);
    if (threads <= 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        threads = nc < 1 ? 1 : nc > 64 ? 64 : (int)nc;
    }
    tdm_threadpool_t *pool = NULL;
    tdm_gguf_writer_t *w = NULL;
    rc = TOOL_EXIT_FAIL;
    if (tdm_threadpool_create(threads, &pool) != TDM_OK || tdm_gguf_writer_create(&w) != TDM_OK) {
        fprintf(stderr, "tandem quantize: out of memory\n");
        goto out;
    }
    st = quant_copy_metadata(g, w, mix, err, sizeof(err));
    if (st != TDM_OK) {
        fprintf(stderr, "tandem quantize: %s\n", err);
        goto out;
    }
    quant_plan_t plan;
    quant_plan_init(&plan, g, mix);
    fprintf(stderr, "quantize: %s -> %s as %s, %" PRIu64 " tensors, %d threads%s%s\n", pos[0],
            pos[1], mix->name, tdm_gguf_n_tensors(g), threads, im ? ", importance matrix " : "",
            im ? imatrix : "");
    const double t0 = tool_now();
    uint64_t bytes_in = 0, bytes_out = 0, n_fallback = 0, n_imp = 0, n_no_imp = 0;
    for (uint64_t i = 0; i < tdm_gguf_n_tensors(g); i++) {
        const tdm_gguf_tensor_t *t = tdm_gguf_tensor(g, i);
        char name[128];
        quant_tensor_name(t, name, sizeof(name));
        int fallback = 0;
        uint32_t type = quant_plan_type(&plan, t, name, &fallback);
        n_fallback += (uint64_t)fallback;
        const uint64_t k = t->ne[0], rows = t->nbytes / tdm_dtype_row_bytes(t->type, k);
        const size_t row_bytes = tdm_dtype_row_bytes(type, k);
        uint8_t *out = malloc(row_bytes * rows);
        if (out == NULL) {
            fprintf(stderr, "tandem quantize: out of memory for '%s'\n", name);
            goto out;
        }
        const float *imp = NULL;
        if (im != NULL && type != t->type && quant_uses_imp(type)) {
            imp = quant_imatrix_find(im, name, k);
            if (imp != NULL)
                n_imp++;
            else
                n_no_imp++;
        }
        if (type == t->type) {
            memcpy(out, t->data, row_bytes * rows); /* as it is */
        } else {
            qjob_t job = {t, type, imp, rows, row_bytes, out, 0};
            tdm_threadpool_run(pool, qjob_fn, &job);
            if (job.failed) {
                fprintf(stderr, "tandem quantize: '%s': cannot write type %s\n", name,
                        tdm_dtype_name(type));
                free(out);
                goto out;
            }
        }
        st = tdm_gguf_writer_add_tensor(w, name, t->n_dims, t->ne, type, out);
        free(out);
        if (st != TDM_OK) {
            fprintf(stderr, "tandem quantize: '%s': the writer refused it (%s)\n", name,
                    tdm_status_str(st));
            goto out;
        }
        bytes_in += t->nbytes;
        bytes_out += row_bytes * rows;
        fprintf(stderr,
                "[%4" PRIu64 "/%4" PRIu64 "] %-32s %6" PRIu64 " x %-6" PRIu64 " %-6s -> %-6s%s%s\n",
                i + 1, tdm_gguf_n_tensors(g), name, k, rows, tdm_dtype_name(t->type),
                tdm_dtype_name(type), fallback ? " (row not a multiple of 256: fallback)" : "",
                imp != NULL ? " (imatrix)" : "");
    }
    if (im != NULL && n_no_imp > 0)
        fprintf(stderr,
                "quantize: warning: %" PRIu64 " quantized tensors had no importance data in "
                "%s (quantized without it)\n",
                n_no_imp, imatrix);
    if (split_max > 0) {
        int n_shards = 0;
        st = quant_write_split(w, pos[1], split_max, &n_shards, err, sizeof(err));
        if (st == TDM_OK)
            fprintf(stderr, "quantize: wrote %d shards from %s\n", n_shards, pos[1]);
    } else {
        st = tdm_gguf_writer_write(w, pos[1]);
        snprintf(err, sizeof(err), "%s", tdm_status_str(st));
    }
    if (st != TDM_OK) {
        fprintf(stderr, "tandem quantize: writing %s failed: %s\n", pos[1], err);
        goto out;
    }
    fprintf(stderr,
            "quantize: %.1f MB -> %.1f MB (%.2f bits per weight of the tensors), %" PRIu64
            " fallbacks, %" PRIu64 " tensors with importance data, %.1f s\n",
            (double)bytes_in / 1e6, (double)bytes_out / 1e6,
            8.0 * (double)bytes_out / (double)(plan.n_elements ? plan.n_elements : 1), n_fallback,
            n_imp, tool_now() - t0);
    rc = TOOL_EXIT_OK;
out:
    tdm_gguf_writer_destroy(w);
    tdm_threadpool_destroy(pool);
    quant_imatrix_free(im);
    tdm_gguf_close(g);
    return rc;
}
