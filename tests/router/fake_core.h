/* A fake router core for front-end tests: implements every function of
 * router/core.h without nodes.
 *
 * It loads a tokenizer (and chat template) from a GGUF, serves one model
 * named "tiny" (rt_core_models lists only it; rt_core_model(NULL or "")
 * gives it), and generates on its own thread, one token per step per
 * request, round robin. Output token i of a request is the first
 * non-control, non-end-of-generation id at or after
 *     (prompt_sum * 31 + seed_mix + i * 7 + 100) % n_vocab
 * where prompt_sum is the sum of the prompt's ids and seed_mix is
 * seed * 13 when the request has a seed and temperature > 0, else 0.
 * Text comes from tdm_tokenizer_token_bytes, assembled as the real core
 * does: incomplete UTF-8 held back (invalid bytes become U+FFFD), stop
 * strings cut (text that could start a stop string is held back), then
 * finish STOP. stop_token_ids end with STOP (the token is not in the
 * text). max_tokens (capped at max_model_len - n_prompt) ends with LENGTH.
 * With logprobs, every event carries its tokens with fake values
 * (logprob of output token i = -0.25 * (1 + i % 4)) and top_logprobs
 * alternatives: the chosen token first, then the following ids, each
 * 0.5 lower. Usage: n_prompt, n_output, n_cached = n_prompt / 2.
 * An absolute deadline_ms that passes ends the request with a 504 error.
 *
 * Behaviour models (accepted by rt_core_model, not listed; each has the
 * tiny model's tokenizer and limits, its own name):
 *   "fail-400", "fail-500", "fail-503", "fail-504": the first and only
 *       event is TDM_FINISH_ERROR with that http_status;
 *   "fail-mid": 3 tokens, then a 503 error event;
 *   "slow": a delay between tokens (fake_core_set_token_delay_ms,
 *       default 100 ms), for cancel / disconnect tests;
 *   "reject": rt_core_submit returns TDM_ERR_INVALID with a message.
 * The x-model-tier value "slow" (rt_params.tier) also selects the slow
 * mode with any model; "full" makes rt_core_submit return TDM_ERR_BUSY
 * (over a queue limit: 429, RESOURCE_EXHAUSTED) with the client named in
 * the message. After fake_core_destroy began, rt_core_submit returns
 * TDM_ERR_CANCELLED (draining).
 *
 * rt_core_submit also refuses (TDM_ERR_INVALID, message in err) what the
 * real core would: an unknown model, an empty prompt, an id outside the
 * vocabulary, max_tokens <= 0, more than RT_MAX_STOP stop strings,
 * top_logprobs outside 0..RT_MAX_TOP_LOGPROBS, sampling parameters that
 * tdm_sampling_params_validate refuses.
 *
 * Thread-safe like the real core: submit / cancel from any thread, events
 * on the fake core's thread; the counters below may be read from any
 * thread. */
#ifndef TANDEM_TESTS_FAKE_CORE_H
#define TANDEM_TESTS_FAKE_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core.h"

#define FAKE_CORE_MODEL         "tiny"
#define FAKE_CORE_MAX_MODEL_LEN 512        /* prompt + output tokens */
#define FAKE_CORE_CREATED       1700000000 /* rt_model_info_t.created */

/* Writes the small test model (`$TANDEM_BIN_DIR/tandem mkmodel`, or
 * build/bin/tandem) to a temp file whose path goes to out; the caller
 * unlinks it. Returns 0 on success, -1 (with a message on stderr) when the
 * tandem binary is missing or failed: tests then skip (exit 77). */
int fake_core_mkmodel(char *out, size_t cap);

/* Loads the tokenizer of the GGUF at model_path and starts the thread.
 * Errors are logged with their cause. */
tdm_status_t fake_core_create(const char *model_path, rt_core_t **out);
/* Cancels what is still running (each gets its final CANCELLED event on
 * the core thread), joins the thread, frees. Accepts NULL. */
void fake_core_destroy(rt_core_t *core);

/* What rt_core_ready answers (default: true, "ok"). */
void fake_core_set_ready(rt_core_t *core, bool ready);
/* Delay between tokens in slow mode (milliseconds). */
void fake_core_set_token_delay_ms(rt_core_t *core, int ms);

/* Counters since creation. */
uint64_t fake_core_submits(rt_core_t *core); /* accepted by rt_core_submit */
uint64_t fake_core_cancels(rt_core_t *core); /* rt_core_cancel of a request not yet final */
uint64_t fake_core_live(rt_core_t *core);    /* accepted requests without their final event */

/* A copy of the most recently accepted request's parameters. */
typedef struct fake_core_request {
    uint64_t id;
    char model[64];
    char tier[64];        /* "" when NULL */
    char client[256];     /* rt_params.client, "" when NULL */
    char request_id[128]; /* "" when NULL */
    size_t n_prompt;
    int32_t prompt[16]; /* the first min(n_prompt, 16) ids */
    tdm_sampling_params_t sampling;
    int32_t max_tokens;
    size_t n_stop;
    size_t n_stop_token_ids;
    bool ignore_eos;
    bool logprobs;
    int32_t top_logprobs;
    int64_t deadline_ms;
} fake_core_request_t;

/* false when nothing was accepted yet. */
bool fake_core_last_request(rt_core_t *core, fake_core_request_t *out);

#endif
