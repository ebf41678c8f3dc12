/* The parts of tandem quantize and tandem imatrix: mixes (quant_mix.c)
 * and importance matrices (quant_imatrix.c). */
#ifndef TANDEM_TOOLS_QUANT_TOOL_H
#define TANDEM_TOOLS_QUANT_TOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/gguf.h"
#include "tandem/status.h"

/* A tensor's name as a C string into buf (cut to cap - 1 bytes). */
void quant_tensor_name(const tdm_gguf_tensor_t *t, char *buf, size_t cap);

/* ---- mixes: which type each tensor gets ---- */

typedef enum quant_rule {
    QUANT_RULE_FLOAT, /* every tensor in the base type */
    QUANT_RULE_PURE,  /* every weight in the base type, output included */
    QUANT_RULE_PLAIN, /* the base type, the output matrix in Q6_K */
    QUANT_RULE_K_M,   /* + attn_v and ffn_down of some layers in Q6_K */
    QUANT_RULE_K_S,   /* + the first attn_v and ffn_down in Q5_K */
    QUANT_RULE_Q3_K_M,
    QUANT_RULE_Q2_K,
    QUANT_RULE_IQ4, /* + attn_v in Q5_K when 4 or more query heads share a KV head */
} quant_rule_t;

typedef struct quant_mix {
    const char *name;   /* as llama.cpp names it: "Q4_K_M" */
    uint32_t file_type; /* general.file_type (llama.cpp's llama_ftype) */
    uint32_t base;      /* tdm_dtype_t of most weights */
    quant_rule_t rule;
} quant_mix_t;

const quant_mix_t *quant_mix_find(const char *name); /* case-insensitive; NULL if unknown */
const char *quant_mix_names(void);                   /* "Q4_K_M, ..." for messages */
/* Whether an importance matrix changes how rows of type are quantized. */
bool quant_uses_imp(uint32_t type);

/* What a mix needs to know of the whole model. */
typedef struct quant_plan {
    const quant_mix_t *mix;
    bool has_output;            /* an output.weight (else token_embd is the output) */
    int32_t n_layer, n_gqa;     /* blocks; query heads per KV head */
    int32_t n_attn_v, i_attn_v; /* attn_v tensors, and how many seen so far */
    uint64_t n_elements;        /* of the 2-D weights */
} quant_plan_t;

void quant_plan_init(quant_plan_t *p, const tdm_gguf_t *g, const quant_mix_t *mix);
/* The type of tensor t (called once per tensor, in file order). *fallback
 * is set when the mix's K-quant did not fit the row length. */
uint32_t quant_plan_type(quant_plan_t *p, const tdm_gguf_tensor_t *t, const char *name,
                         int *fallback);

/* Copies g's metadata into w (general.file_type and
 * general.quantization_version set for the mix, split.* left out). */
tdm_status_t quant_copy_metadata(const tdm_gguf_t *g, tdm_gguf_writer_t *w, const quant_mix_t *mix,
                                 char *err, size_t err_len);

/* Writes w as shards PREFIX-0000i-of-0000N.gguf of at most max_bytes,
 * where path is PREFIX.gguf (or PREFIX). */
tdm_status_t quant_write_split(const tdm_gguf_writer_t *w, const char *path, uint64_t max_bytes,
                               int *n_shards, char *err, size_t err_len);

/* ---- importance matrices ----
 * A GGUF file (llama.cpp's imatrix layout): per weight NAME, the tensors
 * NAME.in_sum2 (F32, one per input column: the sum of squared
 * activations) and NAME.counts (F32 [1]: rows summed); keys
 * general.type = "imatrix", imatrix.datasets, imatrix.chunk_count,
 * imatrix.chunk_size. */
typedef struct quant_imatrix quant_imatrix_t;

tdm_status_t quant_imatrix_load(const char *path, quant_imatrix_t **out, char *err, size_t err_len);
/* The mean squared activation of each of the k columns of weight name;
 * NULL if the file has none (or of another length). */
const float *quant_imatrix_find(const quant_imatrix_t *im, const char *name, uint64_t k);
void quant_imatrix_free(quant_imatrix_t *im);

#endif
