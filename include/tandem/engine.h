/* tandem: the inference engine shared by prefill and decode nodes.
 *
 *   tdm_model_t   a Llama-architecture GGUF model: hyper-parameters, weights
 *                 loaded into a backend, tokenizer, fingerprint.
 *   tdm_engine_t  the paged KV cache, the prefix index, the scheduler
 *                 (continuous batching with chunked prefill) and sampling.
 *
 * Threads: the engine's steps run on one thread (the caller of
 * tdm_engine_step, or the thread started by tdm_engine_start). Requests may
 * be added and cancelled from any thread; events are delivered on the
 * stepping thread through the request's callback, which must not block and
 * must not call back into the engine except tdm_engine_cancel. */
#ifndef TANDEM_ENGINE_H
#define TANDEM_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/gguf.h"
#include "tandem/hash.h"
#include "tandem/kernels.h"
#include "tandem/kv_codec.h"
#include "tandem/sampler.h"
#include "tandem/status.h"
#include "tandem/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- model */

typedef struct tdm_model_hparams {
    int32_t n_vocab;
    int32_t n_embd; /* hidden size */
    int32_t n_ff;   /* feed-forward size */
    int32_t n_layer;
    int32_t n_head;    /* query heads */
    int32_t n_head_kv; /* key/value heads */
    int32_t head_dim;  /* n_embd / n_head */
    int32_t n_rot;     /* rotated dims per head */
    float rope_theta;
    float norm_eps;
    int32_t n_ctx_train; /* context length the model was trained for */
} tdm_model_hparams_t;

typedef struct tdm_model tdm_model_t;

/* Loads a model. Errors (bad file: TDM_ERR_FORMAT / TDM_ERR_UNSUPPORTED /
 * TDM_ERR_IO) get a message in err naming the cause. */
tdm_status_t tdm_model_load(const char *path, tdm_backend_t *be, char *err, size_t err_len,
                            tdm_model_t **out);
void tdm_model_destroy(tdm_model_t *m);
const tdm_model_hparams_t *tdm_model_hparams(const tdm_model_t *m);
const tdm_tokenizer_t *tdm_model_tokenizer(const tdm_model_t *m);
const tdm_gguf_t *tdm_model_gguf(const tdm_model_t *m);
tdm_backend_t *tdm_model_backend(const tdm_model_t *m);
/* Hash of the GGUF header, metadata and tensor table. */
tdm_hash128_t tdm_model_fingerprint(const tdm_model_t *m);
const char *tdm_model_name(const tdm_model_t *m); /* general.name or the file name */
/* Bytes of weights read per decoded token. */
uint64_t tdm_model_weight_bytes(const tdm_model_t *m);

/* --------------------------------------------------------------- engine */

/* Upper bound of max_num_seqs (sequences in one step). */
#define TDM_ENGINE_MAX_SEQS 1024

typedef struct tdm_engine_config {
    const char *model_path;
    int threads;                    /* <= 0: all available CPUs */
    int32_t max_num_seqs;           /* running sequences per step (256) */
    int32_t max_num_batched_tokens; /* tokens per step (2048) */
    int32_t max_step_ms;            /* target wall time of a step: prompt chunks are sized
                                       from measured step times to stay near it, under
                                       max_num_batched_tokens (0: no bound) */
    int32_t max_model_len;          /* prompt + output (0: min(trained, 8192)) */
    int32_t block_size;             /* tokens per KV block (16) */
    uint64_t kv_cache_bytes;        /* KV pool (0: 1 GiB on the CPU; on a GPU what
                                       gpu_memory_utilization leaves) */
    int32_t num_blocks;             /* overrides kv_cache_bytes when > 0 */
    bool enable_prefix_caching;
    tdm_cpu_isa_t isa;
    const char *device;           /* "cpu" (NULL too), "cuda" or "cuda:N" */
    float gpu_memory_utilization; /* fraction of the GPU's memory tandem may hold (0.9) */
} tdm_engine_config_t;

void tdm_engine_config_default(tdm_engine_config_t *c);

typedef enum tdm_finish_reason {
    TDM_FINISH_NONE = 0,      /* not finished: more tokens will come */
    TDM_FINISH_STOP = 1,      /* end-of-generation token or a stop string/token */
    TDM_FINISH_LENGTH = 2,    /* max_tokens or the model length */
    TDM_FINISH_CANCELLED = 3, /* tdm_engine_cancel */
    TDM_FINISH_ERROR = 4,     /* could not be served (e.g. prompt too long) */
} tdm_finish_reason_t;

const char *tdm_finish_reason_str(tdm_finish_reason_t r); /* "stop", "length", ... */

#define TDM_MAX_TOP_LOGPROBS 20

typedef struct tdm_token_logprob {
    int32_t token;
    float logprob;
} tdm_token_logprob_t;

typedef struct tdm_request_event {
    uint64_t id;
    int32_t token;    /* the new token, or -1 with a final event without one */
    float logprob;    /* of the token (0 unless asked for) */
    const char *text; /* bytes ready to show: complete UTF-8, stop strings cut */
    size_t text_len;
    tdm_finish_reason_t finish; /* != NONE on the last event of a request */
    int32_t n_prompt;           /* prompt tokens */
    int32_t n_output;           /* output tokens so far */
    int32_t n_cached;           /* prompt tokens served from the prefix cache */
    const char *error;          /* with TDM_FINISH_ERROR: why */
    int32_t n_imported;         /* prompt tokens whose K/V came from kv_import */
    /* with top_logprobs > 0: the most likely tokens at this position, best
     * first (log-softmax of the logits before penalties and temperature) */
    const tdm_token_logprob_t *top;
    int32_t n_top;
} tdm_request_event_t;

typedef void (*tdm_request_cb_t)(void *user, const tdm_request_event_t *ev);

/* Hands a caller the K and V rows of block `block` of a sequence
 * (positions block * block_size ..), which holds n_tokens positions:
 * k[layer] and v[layer] point to its rows, [n_tokens][kv_dim] f16, host
 * memory valid during the call only. Used by tdm_engine_eval_split (what
 * the function leaves there is what later positions attend to; a status
 * other than TDM_OK stops the evaluation and is returned) and by a
 * request's kv_export and kv_import (tdm_request_params_t). */
typedef tdm_status_t (*tdm_engine_kv_fn_t)(void *user, int32_t block, int32_t n_tokens,
                                           uint16_t *const *k, uint16_t *const *v);

/* Disaggregated serving (DESIGN.md "A request's walk", steps 3 to 5): a
 * request's KV leaves one engine as block payloads (kv_export, e.g. through
 * tdm_kv_codec_encode) and enters another (kv_import, e.g. through
 * tdm_kv_codec_decode). Attention reads the cache as stored (f16), so KV
 * imported through a lossless codec gives the same tokens as computing it.
 *
 * kv_export (prefill side): once all prompt positions are in the cache, in
 *   the step that computed the last of them and before its first token is
 *   delivered, the stepping thread calls kv_export for every block of the
 *   prompt in order, 0 .. ceil(n_prompt / block_size) - 1, the last one
 *   partial (n_tokens = n_prompt % block_size) when n_prompt is not a
 *   multiple of the block size. Exactly once per request, even if it is
 *   later preempted and recomputed; never for a request cancelled or
 *   failed before its prompt was computed. The function must only read the
 *   rows. A status other than TDM_OK stops the export there (later blocks
 *   are not offered); the request goes on. Typical use: max_tokens = 1, the
 *   first token comes with the usual events.
 *
 * kv_import (decode side): n_kv_tokens (0 .. n_prompt; 0 or kv_import NULL:
 *   no import) leading prompt positions whose K/V the caller provides. When
 *   the request is first admitted, its blocks are allocated and the
 *   stepping thread calls kv_import for each block holding positions
 *   [0, n_kv_tokens) in order (the last one partial when n_kv_tokens is not
 *   a multiple of the block size; blocks already served by the prefix cache
 *   are skipped); the function fills the rows k[layer], v[layer]
 *   ([n_tokens][kv_dim] f16). A status other than TDM_OK means that block
 *   and all later ones are missing: kv_import is not called again and the
 *   engine computes the prompt from the start of that block itself
 *   (DESIGN.md step 5); whatever the function wrote there is overwritten.
 *   The engine computes the rest of the prompt as usual, at least the last
 *   prompt position (its logits give the next token), so n_kv_tokens =
 *   n_prompt re-computes the last position over the imported rows. kv_import
 *   is called only before the request's first event, at most once per block:
 *   what it reads may be freed once the first event arrives. If the request
 *   is preempted later it is recomputed locally. Imported blocks are not
 *   offered to the prefix index (lossy codecs must not leak into other
 *   requests); blocks computed after them are.
 *   Typical use: prompt = the prefill's prompt + its first token,
 *   n_kv_tokens = the prefill's n_prompt. */
typedef struct tdm_request_params {
    const int32_t *prompt; /* copied */
    size_t n_prompt;
    tdm_sampling_params_t sampling;
    int32_t max_tokens;      /* <= 0: up to the model length */
    const char *const *stop; /* stop strings (copied); the match is cut from the text */
    size_t n_stop;
    const int32_t *stop_token_ids; /* copied */
    size_t n_stop_token_ids;
    bool ignore_eos;      /* keep going past end-of-generation tokens */
    bool logprobs;        /* fill ev->logprob */
    int32_t top_logprobs; /* 0..TDM_MAX_TOP_LOGPROBS alternatives per token (ev->top) */
    tdm_request_cb_t cb;
    void *user;
    /* optional: disaggregated serving (see above); zero-initialize to skip */
    tdm_engine_kv_fn_t kv_export; /* prompt blocks out, once computed */
    void *kv_export_user;
    int32_t n_kv_tokens;          /* leading prompt positions provided by kv_import */
    tdm_engine_kv_fn_t kv_import; /* fills those positions' blocks at admission */
    void *kv_import_user;
    /* optional: the last n_prior_output prompt tokens are output that this
     * request generated elsewhere (a decode node taking over a prefill's
     * first token, or failover): they count as output for the penalties and
     * a seeded generator skips their draws, so the continuation is what one
     * engine would have produced. Events count only the new tokens. */
    int32_t n_prior_output;
} tdm_request_params_t;

typedef struct tdm_engine tdm_engine_t;

typedef struct tdm_engine_stats {
    int32_t num_running;
    int32_t num_waiting;
    int32_t num_blocks;
    int32_t num_free_blocks;   /* free, including cached-prefix blocks */
    int32_t num_cached_blocks; /* free blocks that still hold a cached prefix */
    uint64_t prompt_tokens;    /* totals since start */
    uint64_t generation_tokens;
    uint64_t prefix_queries; /* prompt tokens looked up */
    uint64_t prefix_hits;    /* prompt tokens found */
    uint64_t preemptions;
    uint64_t steps;
    /* rows the next step may hold: max_num_batched_tokens, or fewer prompt
     * rows under max_step_ms (decode rows are never held back) */
    int32_t step_token_budget;
    float step_ms_per_row; /* measured wall time per row of recent steps (0: none yet) */
} tdm_engine_stats_t;

tdm_status_t tdm_engine_create(const tdm_engine_config_t *cfg, char *err, size_t err_len,
                               tdm_engine_t **out);
void tdm_engine_destroy(tdm_engine_t *e); /* stops the thread; cancels requests */
const tdm_model_t *tdm_engine_model(const tdm_engine_t *e);

/* Queues a request (any thread). TDM_ERR_INVALID if the prompt is empty,
 * longer than the model length, the sampling parameters are bad or
 * n_kv_tokens is outside 0..n_prompt. */
tdm_status_t tdm_engine_add(tdm_engine_t *e, const tdm_request_params_t *p, uint64_t *id_out);
/* Cancels (any thread); its callback gets a final CANCELLED event. */
tdm_status_t tdm_engine_cancel(tdm_engine_t *e, uint64_t id);

/* One scheduler step: admits queued requests, runs one forward over the
 * batch, samples, delivers events. *did_work is false when idle. */
tdm_status_t tdm_engine_step(tdm_engine_t *e, bool *did_work);
/* Steps until no request is left. */
tdm_status_t tdm_engine_run_until_idle(tdm_engine_t *e);
/* A thread that steps while there is work and sleeps otherwise. */
tdm_status_t tdm_engine_start(tdm_engine_t *e);
void tdm_engine_stop(tdm_engine_t *e);

void tdm_engine_get_stats(tdm_engine_t *e, tdm_engine_stats_t *s);

/* Forward over a whole token sequence without the scheduler: logits of
 * every position into logits[n][n_vocab] (for perplexity and tests). Uses
 * a private sequence of the cache; chunked by max_num_batched_tokens. */
tdm_status_t tdm_engine_eval(tdm_engine_t *e, const int32_t *tokens, size_t n, float *logits);

/* The matrices of a layer, and the output matrix, as an activation hook
 * names them. */
typedef enum tdm_matrix {
    TDM_MATRIX_Q,
    TDM_MATRIX_K,
    TDM_MATRIX_V,
    TDM_MATRIX_O,
    TDM_MATRIX_GATE,
    TDM_MATRIX_UP,
    TDM_MATRIX_DOWN,
    TDM_MATRIX_OUTPUT, /* layer -1 */
} tdm_matrix_t;

/* Sees the input of each matmul of a forward: x is [n][k] f32 in host
 * memory, read-only, valid during the call. */
typedef void (*tdm_engine_act_fn)(void *user, int32_t layer, tdm_matrix_t which, const float *x,
                                  int64_t n, int64_t k);

/* Installs (fn != NULL) or removes an activation hook, called on the thread
 * that runs the forward (tandem imatrix collects importance matrices with
 * it). TDM_ERR_UNSUPPORTED on a backend whose buffers are device memory. */
tdm_status_t tdm_engine_set_act_hook(tdm_engine_t *e, tdm_engine_act_fn fn, void *user);

/* The chained keys of the full blocks of tokens[0, n) (as the prefix cache
 * computes them: seeded with the model fingerprint and the KV layout):
 * writes n / block_size keys to keys (room for that many) and returns how
 * many. */
size_t tdm_engine_block_keys(const tdm_engine_t *e, const int32_t *tokens, size_t n,
                             tdm_hash128_t *keys);
int32_t tdm_engine_block_size(const tdm_engine_t *e);
int32_t tdm_engine_max_model_len(const tdm_engine_t *e); /* as configured or defaulted */

/* What a KV block payload of this engine must match (kv_codec.h). */
void tdm_engine_kv_layout(const tdm_engine_t *e, tdm_kv_layout_t *out);

/* tdm_engine_eval in two halves, to simulate KV that crossed the network
 * (e.g. through a KV codec): evaluates tokens [0, n_ctx), calls fn for
 * every block holding those positions in order (the last one partial when
 * n_ctx is not a multiple of the block size), then evaluates [n_ctx, n)
 * attending to that KV. Logits of all n positions, as tdm_engine_eval
 * gives them; with a fn that changes nothing they are bit-identical to
 * tdm_engine_eval's. n_ctx == 0 or n or fn == NULL: tdm_engine_eval. */
tdm_status_t tdm_engine_eval_split(tdm_engine_t *e, const int32_t *tokens, size_t n, size_t n_ctx,
                                   tdm_engine_kv_fn_t fn, void *user, float *logits);

#ifdef __cplusplus
}
#endif

#endif
