/* tandem-router: prompts from client requests to token ids, exactly as
 * `tandem generate` builds them (so the same question gets the same
 * answer whichever way it arrives). */
#ifndef TANDEM_ROUTER_PROMPT_H
#define TANDEM_ROUTER_PROMPT_H

#include <stddef.h>
#include <stdint.h>

#include "core.h"

/* A raw completion prompt: special tokens are parsed, BOS is added when the
 * model asks for it. *out is malloc'd. TDM_ERR_INVALID for text that is
 * not valid UTF-8 (err says where). */
tdm_status_t rt_prompt_text(const rt_model_info_t *m, const char *text, size_t len, int32_t **out,
                            size_t *n_out, char *err, size_t err_len);

/* Chat messages through the model's chat template, ending with the
 * assistant's turn. *out is malloc'd. TDM_ERR_INVALID for a bad role or
 * text that is not valid UTF-8. */
tdm_status_t rt_prompt_chat(const rt_model_info_t *m, const tdm_chat_msg_t *msgs, size_t n,
                            int32_t **out, size_t *n_out, char *err, size_t err_len);

/* Checks that len bytes are valid UTF-8; on failure writes the byte offset
 * of the first bad sequence to *bad_at. */
bool rt_utf8_valid(const char *s, size_t len, size_t *bad_at);

#endif
