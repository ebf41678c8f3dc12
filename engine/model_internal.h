/* Engine-private view of a loaded model (weights as backend objects). */
#ifndef TANDEM_ENGINE_MODEL_INTERNAL_H
#define TANDEM_ENGINE_MODEL_INTERNAL_H

#include "tandem/engine.h"

typedef struct tdm_layer_weights {
    float *attn_norm;                        /* (n_embd) backend buffer */
    tdm_bweight_t *wq;                       /* (n_head*head_dim, n_embd) */
    tdm_bweight_t *wk;                       /* (n_head_kv*head_dim, n_embd) */
    tdm_bweight_t *wv;                       /* (n_head_kv*head_dim, n_embd) */
    tdm_bweight_t *wo;                       /* (n_embd, n_head*head_dim) */
    float *ffn_norm;                         /* (n_embd) */
    tdm_bweight_t *w_gate;                   /* (n_ff, n_embd) */
    tdm_bweight_t *w_up;                     /* (n_ff, n_embd) */
    tdm_bweight_t *w_down;                   /* (n_embd, n_ff) */
    uint32_t q_type, k_type, v_type, o_type; /* weight types (act_prepare needs them) */
    uint32_t gate_type, up_type, down_type;
} tdm_layer_weights_t;

struct tdm_model {
    tdm_model_hparams_t hp;
    tdm_gguf_t *gguf;
    tdm_tokenizer_t *tok;
    tdm_backend_t *be;
    tdm_bweight_t *tok_embd; /* (n_vocab, n_embd) */
    tdm_bweight_t *output;   /* (n_vocab, n_embd); == tok_embd when tied */
    uint32_t output_type;
    float *output_norm;          /* (n_embd) */
    tdm_layer_weights_t *layers; /* [n_layer] */
    tdm_hash128_t fingerprint;
    uint64_t weight_bytes;
    char name[128];
};

#endif
