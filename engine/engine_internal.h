/* Engine-private state: sequences, the step's batch, scratch buffers. */
#ifndef TANDEM_ENGINE_INTERNAL_H
#define TANDEM_ENGINE_INTERNAL_H

#include <pthread.h>

#include "kv_pool.h"
#include "model_internal.h"
#include "tandem/engine.h"
#include "tandem/textstream.h"

typedef enum tdm_seq_state {
    TDM_SEQ_WAITING = 0,
    TDM_SEQ_RUNNING = 1,
    TDM_SEQ_FINISHED = 2,
} tdm_seq_state_t;

typedef struct tdm_seq {
    uint64_t id;
    tdm_seq_state_t state;
    struct tdm_seq *next; /* in the waiting or running list (arrival order) */
    int32_t *tokens;      /* (max_model_len) prompt then output */
    int32_t n_prompt;
    int32_t n_tokens;
    int32_t n_computed; /* leading tokens whose K/V are in the cache */
    int32_t n_cached;   /* prompt tokens found in the prefix cache */
    int32_t *blocks;    /* (max_blocks) block ids of positions 0.. */
    int32_t n_blocks;
    tdm_hash128_t *keys; /* (max_blocks) chained keys of full blocks */
    int32_t n_keys;
    int32_t n_registered; /* leading blocks offered to the prefix index */
    bool cancelled;
    bool counted_prompt; /* prompt tokens added to stats once */
    /* what was asked */
    tdm_sampling_params_t sampling;
    tdm_sample_state_t rng;
    int32_t max_tokens;
    int32_t *stop_ids;
    size_t n_stop_ids;
    bool ignore_eos;
    bool logprobs;
    int32_t top_logprobs;
    tdm_token_logprob_t top[TDM_MAX_TOP_LOGPROBS]; /* of the token being delivered */
    int32_t n_top;
    tdm_request_cb_t cb;
    void *user;
    /* disaggregated serving (tdm_request_params_t) */
    tdm_engine_kv_fn_t kv_export; /* NULL once done or when not asked */
    void *kv_export_user;
    tdm_engine_kv_fn_t kv_import; /* NULL once done (first admission) or not asked */
    void *kv_import_user;
    int32_t n_kv_tokens;
    int32_t n_imported; /* prompt positions filled by kv_import */
    int32_t n_prior;    /* trailing prompt tokens that are earlier output (failover) */
    /* output text not yet delivered (incomplete UTF-8, a possible stop string) */
    tdm_textstream_t text;
    /* batch bookkeeping for the current step */
    int32_t chunk;
    int32_t logit_row;
} tdm_seq_t;

#define TDM_ENGINE_GRAPH_BUCKETS 9 /* decode buckets of 1, 2, 4, ..., 256 rows */

typedef struct tdm_op {
    struct tdm_op *next;
    tdm_seq_t *seq; /* add */
    uint64_t cancel_id;
} tdm_op_t;

struct tdm_engine {
    tdm_engine_config_t cfg;
    tdm_backend_t *be;
    tdm_model_t *model;
    tdm_sampler_t *sampler;
    int32_t max_blocks; /* per sequence: ceil(max_model_len / block_size) */
    int64_t kv_dim;     /* n_head_kv * head_dim */
    tdm_hash128_t key_seed;

    /* KV cache: per layer [n_blocks][block_size][kv_dim] f16 (backend buffers) */
    tdm_kv_pool_t pool;
    uint16_t **cache_k, **cache_v;
    uint16_t **kv_rows; /* (2 * n_layer) K then V row pointers handed to a kv fn */
    /* Staged KV blocks (device backends, or TANDEM_ENGINE_STAGE=1): two
     * halves of stage_blocks blocks in host memory (pinned where the backend
     * has it), each block [2 * n_layer][block_size * kv_dim] f16, moved by
     * ops->kv_out / kv_in; stage_ids and stage_ntok (2 * stage_blocks) the
     * blocks and row counts of each half's transfer. */
    bool staged;
    int32_t stage_blocks;
    uint16_t *kv_stage;
    int32_t *stage_ids, *stage_ntok;
    int32_t *h_argmax; /* (max_logits) tokens chosen by the backend (ops->argmax, sample) */
    /* Sampling where the logits are (ops->sample; TANDEM_ENGINE_DEVICE_SAMPLE=1
     * runs the same path on the CPU through the host sampler): */
    bool device_sample;
    tdm_sample_row_t *h_srows;        /* (max_logits) */
    float *h_slogprob;                /* (max_logits) */
    int32_t *h_hist_tok, *h_hist_cnt; /* the rows' histories; grown as needed */
    size_t hist_cap;
    /* decode steps padded to power-of-two buckets, replayed as graphs
     * (forward.c) */
    bool pad_decode, use_graphs;
    int32_t pad_block; /* the KV block padding rows write into */
    void *graphs[TDM_ENGINE_GRAPH_BUCKETS];
    uint8_t graph_state[TDM_ENGINE_GRAPH_BUCKETS]; /* 0 new, 1 warmed, 2 captured, 3 failed */

    /* scheduler (stepping thread only) */
    tdm_seq_t *waiting, *running; /* singly linked, arrival order */
    int32_t n_waiting, n_running;

    /* ops from other threads */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    tdm_op_t *ops_head, *ops_tail;
    uint64_t next_id;
    pthread_t thread;
    bool thread_started;
    bool stop_thread;

    /* step buffers, host side (h_) and backend side (d_) */
    int32_t max_rows;   /* max_num_batched_tokens */
    int32_t max_logits; /* rows of logits per forward */
    int32_t *h_tokens, *h_pos, *h_slot, *h_ctx, *h_table, *h_tables, *h_logit_idx;
    int32_t *d_tokens, *d_pos, *d_slot, *d_ctx, *d_table, *d_tables, *d_logit_idx;
    float *x, *xn, *q, *k, *v, *att, *tmp, *gate, *up, *hid, *logits;
    void *act;
    float *h_logits; /* host copy of logits [max_logits][n_vocab] */

    /* tdm_engine_set_act_hook (host backends only) */
    tdm_engine_act_fn act_hook;
    void *act_user;

    /* step-time bound (cfg.max_step_ms): measured wall time per row of
     * recent steps (0: none measured yet), stepping thread only */
    double ms_per_row;

    /* stats: live is the stepping thread's, copied to stats under lock at
     * the end of each step for the other threads */
    tdm_engine_stats_t live;
    tdm_engine_stats_t stats;
};

/* engine/forward.c: one forward over the rows described by the h_ arrays.
 * Logits of the rows listed in h_logit_idx[0..n_logits) land in e->logits
 * (backend buffer) and, with to_host, in h_logits. */
tdm_status_t tdm_engine_forward(tdm_engine_t *e, int32_t n_rows, int32_t n_tables, int32_t n_logits,
                                bool to_host);

#endif
