/* tandem: byte-level BPE tokenizer built from a GGUF vocabulary.
 *
 * Reads tokenizer.ggml.{model,pre,tokens,token_type,merges,*_token_id} of a
 * GGUF file ("gpt2" model; pre-tokenizers "gpt2", "starcoder", "smollm",
 * "llama-bpe"/"llama3" for Llama 3 models). Encoding follows llama.cpp:
 * the text is split by the pre-tokenizer's regexes, each piece is mapped to
 * GPT-2's printable byte alphabet, then merged by rank. With parse_special,
 * the text of control/user-defined tokens ("<|im_start|>") becomes that one
 * token; without it, such text is tokenized as plain text. Decoding maps the
 * byte alphabet back, so detokenize(tokenize(text)) == text for every byte
 * string (invalid UTF-8 included) made of bytes the vocabulary has a token
 * for. A byte without one cannot be represented and is dropped, as llama.cpp
 * does: StarCoder's and SmolLM2's vocabularies lack 0xC0, 0xC1, 0xF1 and
 * 0xF5..0xFF (never in assigned-character UTF-8), SmolLM2's also 0xF2 and the
 * control bytes 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D.
 *
 * A tokenizer is immutable after creation and may be used from any number
 * of threads at once. */
#ifndef TANDEM_TOKENIZER_H
#define TANDEM_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/gguf.h"
#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tdm_tokenizer tdm_tokenizer_t;

/* GGUF token types. */
typedef enum tdm_token_type {
    TDM_TOKEN_TYPE_UNDEFINED = 0,
    TDM_TOKEN_TYPE_NORMAL = 1,
    TDM_TOKEN_TYPE_UNKNOWN = 2,
    TDM_TOKEN_TYPE_CONTROL = 3,
    TDM_TOKEN_TYPE_USER_DEFINED = 4,
    TDM_TOKEN_TYPE_UNUSED = 5,
    TDM_TOKEN_TYPE_BYTE = 6,
} tdm_token_type_t;

/* Builds the tokenizer. The GGUF handle may be closed afterwards (strings
 * are copied). Errors (missing keys, unknown model or pre-tokenizer, bad
 * merges) are written to err. */
tdm_status_t tdm_tokenizer_create(const tdm_gguf_t *g, char *err, size_t err_len,
                                  tdm_tokenizer_t **out);
void tdm_tokenizer_destroy(tdm_tokenizer_t *t);

/* Tokenizes len bytes of text (no BOS is added). Writes up to cap ids to
 * tokens and the total count to *n_out; returns TDM_ERR_NOMEM (with *n_out
 * set to the count needed) when cap is too small. */
tdm_status_t tdm_tokenizer_encode(const tdm_tokenizer_t *t, const char *text, size_t len,
                                  bool parse_special, int32_t *tokens, size_t cap, size_t *n_out);

/* The bytes of one token (byte alphabet mapped back). Control tokens give
 * their text only if render_special. Returns the byte count, which may be
 * more than cap (then only cap bytes were written); 0 for a bad id. */
size_t tdm_tokenizer_token_bytes(const tdm_tokenizer_t *t, int32_t id, bool render_special,
                                 char *buf, size_t cap);
/* Detokenizes n ids into buf (up to cap bytes, NUL-terminated when room);
 * *len_out gets the full length; TDM_ERR_NOMEM if it did not fit;
 * TDM_ERR_INVALID for an id outside the vocabulary. */
tdm_status_t tdm_tokenizer_decode(const tdm_tokenizer_t *t, const int32_t *ids, size_t n,
                                  bool render_special, char *buf, size_t cap, size_t *len_out);

int32_t tdm_tokenizer_n_vocab(const tdm_tokenizer_t *t);
int32_t tdm_tokenizer_bos(const tdm_tokenizer_t *t); /* -1 if none */
int32_t tdm_tokenizer_eos(const tdm_tokenizer_t *t); /* -1 if none */
/* End-of-generation tokens: eos, eot, <|im_end|>, <|eot_id|>, <|eom_id|>
 * when present in the vocabulary. */
bool tdm_tokenizer_is_eog(const tdm_tokenizer_t *t, int32_t id);
/* Whether a generated token ends a request: an end-of-generation token
 * (unless ignore_eos) or one of stop_ids. The engine and the router decide
 * with this one rule, so a request stops at the same token wherever it runs. */
bool tdm_tokenizer_is_stop(const tdm_tokenizer_t *t, int32_t id, bool ignore_eos,
                           const int32_t *stop_ids, size_t n_stop_ids);
bool tdm_tokenizer_add_bos(const tdm_tokenizer_t *t); /* tokenizer.ggml.add_bos_token */
tdm_token_type_t tdm_tokenizer_token_type(const tdm_tokenizer_t *t, int32_t id);
/* The vocabulary string of a token (byte alphabet, not decoded). */
tdm_str_t tdm_tokenizer_token_text(const tdm_tokenizer_t *t, int32_t id);
/* Exact lookup of a vocabulary string; -1 if absent. */
int32_t tdm_tokenizer_find(const tdm_tokenizer_t *t, const char *text);

/* ---- chat templates ---- */
typedef enum tdm_chat_template {
    TDM_CHAT_TEMPLATE_CHATML = 0, /* <|im_start|>role\ncontent<|im_end|>\n */
    TDM_CHAT_TEMPLATE_LLAMA3 = 1, /* <|start_header_id|>role<|end_header_id|>\n\n... */
} tdm_chat_template_t;

typedef struct tdm_chat_msg {
    const char *role;    /* "system", "user", "assistant" */
    const char *content; /* NUL terminated */
} tdm_chat_msg_t;

/* Picks the template from tokenizer.chat_template (or, when absent, from the
 * vocabulary). The SmolLM2 ChatML template adds its default system prompt
 * when the first message is not a system message; that prompt is read from
 * the GGUF template text when present. */
tdm_status_t tdm_chat_template_detect(const tdm_gguf_t *g, tdm_chat_template_t *tmpl,
                                      char *default_system, size_t default_system_cap);
/* Renders messages; with add_generation_prompt, ends with the assistant
 * header. default_system may be NULL or "" for none; otherwise it is written
 * as a system message before the first message when that one is not a
 * system message. Output is text to be tokenized with parse_special = true.
 * The Llama 3 output already starts with "<|begin_of_text|>" (its BOS as
 * text): do not add another BOS. The result is malloc'd into *out. */
tdm_status_t tdm_chat_render(tdm_chat_template_t tmpl, const char *default_system,
                             const tdm_chat_msg_t *msgs, size_t n, bool add_generation_prompt,
                             char **out);

#ifdef __cplusplus
}
#endif

#endif
