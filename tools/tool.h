/* Shared pieces of the `tandem` subcommands. */
#ifndef TANDEM_TOOLS_TOOL_H
#define TANDEM_TOOLS_TOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/engine.h"
#include "tandem/flags.h"

/* Exit statuses: 0 ok, 1 failure at run time, 2 bad input (flags, model
 * file), as the issue and common CLI practice want. */
#define TOOL_EXIT_OK    0
#define TOOL_EXIT_FAIL  1
#define TOOL_EXIT_USAGE 2

#define DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"

/* Engine flags shared by generate, bench, ppl. */
typedef struct tool_engine_opts {
    const char *model;
    int threads;
    int max_num_seqs;
    int max_num_batched_tokens;
    int max_model_len;
    int block_size;
    uint64_t kv_cache_memory;
    bool enable_prefix_caching;
    const char *cpu_isa;
    const char *device;
    float gpu_memory_utilization;
} tool_engine_opts_t;

void tool_engine_opts_default(tool_engine_opts_t *o);
/* Writes the engine flags into out (room for 9); returns how many. */
size_t tool_engine_flags(tool_engine_opts_t *o, tdm_flag_t *out);
/* Resolves the model path (-m, else $TANDEM_HOME/models/DEFAULT_MODEL_FILE)
 * and fills an engine config. Prints the error and returns false when the
 * default model is missing. */
bool tool_engine_config(const tool_engine_opts_t *o, tdm_engine_config_t *cfg);
/* Default model path into buf. */
void tool_default_model_path(char *buf, size_t cap);
/* Creates the engine; prints the error; returns the exit status to use. */
int tool_engine_create(const tool_engine_opts_t *o, tdm_engine_t **out);

/* Parses flags; prints usage on --help (returns 0 via *exit_now) or errors
 * (returns 2). Returns true to continue. */
bool tool_parse(const char *cmd, const char *summary, const tdm_flag_t *flags, size_t n, int argc,
                char **argv, const char **pos, size_t max_pos, size_t *n_pos, int *exit_code);

/* A document's tokens as perplexity tools score it: the model's BOS first
 * when it asks for one (*bos gets its id, or -1), then text tokenized
 * without parsing special tokens. malloc'd (*n tokens); NULL when out of
 * memory or the text does not tokenize. */
int32_t *tool_tokenize_text(const tdm_tokenizer_t *tok, const char *text, size_t len, size_t *n,
                            int32_t *bos);

/* Reads all of a stream into a malloc'd buffer (NUL-terminated). */
char *tool_read_all(FILE *f, size_t *len);
double tool_now(void); /* monotonic seconds */
/* splitmix64: the next number of a seeded sequence (benchmark prompts,
 * synthetic weights); the same seed always gives the same sequence. */
uint64_t tool_rng_next(uint64_t *state);
/* log p(token) from one row of logits (n_vocab floats), in double. */
double tool_token_logprob(const float *logits, int32_t n_vocab, int32_t token);

int cmd_generate(int argc, char **argv);
int cmd_logits(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_detokenize(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_bench_kvstore(int argc, char **argv); /* built with the network roles */
int cmd_bench_serve(int argc, char **argv);   /* tools/cmd_bench_serve.c */
int cmd_up(int argc, char **argv);            /* tools/cmd_up.c: local cluster */
int cmd_up_supervisor(int argc, char **argv); /* hidden: what `up` leaves behind */
int cmd_status(int argc, char **argv);
int cmd_down(int argc, char **argv);
int cmd_drain(int argc, char **argv);
int cmd_ppl(int argc, char **argv);
int cmd_mkmodel(int argc, char **argv);
int cmd_quantize(int argc, char **argv); /* tools/cmd_quantize.c */
int cmd_imatrix(int argc, char **argv);  /* tools/cmd_imatrix.c */

#endif
