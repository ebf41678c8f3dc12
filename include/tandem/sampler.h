/* tandem: token sampling from logits.
 *
 * A tdm_sampler_t holds the scratch that sampling needs (candidate arrays of
 * the vocabulary size, allocated once); one per thread that samples. The
 * state of one request (its random generator) lives in tdm_sample_state_t,
 * which the request owns. Penalties are computed from the request's token
 * history, so nothing per request is vocabulary-sized.
 *
 * Order of operations (as vLLM and llama.cpp do it):
 *   1. repetition penalty over the distinct tokens of prompt + output
 *      (logit > 0: divided by it, else multiplied), frequency penalty
 *      (count in the output times frequency_penalty subtracted) and
 *      presence penalty (subtracted once for each distinct output token);
 *   2. temperature == 0: the argmax (lowest id on ties); stop here;
 *   3. logits / temperature, then top-k, top-p (smallest set whose
 *      probability reaches top_p), min-p (drop tokens whose probability is
 *      under min_p times the best one's);
 *   4. one draw from the renormalized distribution with the request's
 *      generator.
 * With a seed, a request's draws depend only on the seed and its logits,
 * never on its companions in the batch. */
#ifndef TANDEM_SAMPLER_H
#define TANDEM_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/kernels.h"
#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tdm_sampling_params {
    float temperature;        /* 0: greedy */
    int32_t top_k;            /* <= 0: off */
    float top_p;              /* >= 1: off */
    float min_p;              /* <= 0: off */
    float repetition_penalty; /* 1: off */
    float frequency_penalty;  /* 0: off */
    float presence_penalty;   /* 0: off */
    bool has_seed;
    uint64_t seed;
} tdm_sampling_params_t;

/* temperature 1, everything else off, no seed. */
void tdm_sampling_params_default(tdm_sampling_params_t *p);
/* Checks ranges (temperature >= 0, top_p in (0,1], min_p in [0,1],
 * repetition_penalty > 0, penalties in [-2, 2]); writes why to err. */
tdm_status_t tdm_sampling_params_validate(const tdm_sampling_params_t *p, char *err,
                                          size_t err_len);

typedef struct tdm_sample_state {
    uint64_t rng[4]; /* xoshiro256** state */
} tdm_sample_state_t;

/* Seeds the state from p->seed, or from the OS's random source without one. */
void tdm_sample_state_init(tdm_sample_state_t *st, const tdm_sampling_params_t *p);

/* Advances the state past n draws (one draw per token sampled at a
 * temperature above 0), as if n tokens had been sampled with it. */
void tdm_sample_state_skip(tdm_sample_state_t *st, uint64_t n);

/* The state's next draw, uniform in [0, 1): the one tdm_sampler_sample
 * takes for a token sampled at a temperature above 0 (a device sampler
 * gets it from here, so a seeded request draws the same numbers there). */
double tdm_sample_state_next(tdm_sample_state_t *st);

typedef struct tdm_sampler tdm_sampler_t;

tdm_status_t tdm_sampler_create(int32_t n_vocab, tdm_sampler_t **out);
void tdm_sampler_destroy(tdm_sampler_t *s);

/* Samples one token. logits[n_vocab] is modified (penalties, temperature).
 * prompt[n_prompt] and output[n_output] are the request's tokens so far.
 * If logprob is not NULL, the log-probability (under the distribution
 * after penalties, before temperature) of the
 * sampled token go to *logprob. */
int32_t tdm_sampler_sample(tdm_sampler_t *s, const tdm_sampling_params_t *p, tdm_sample_state_t *st,
                           float *logits, const int32_t *prompt, size_t n_prompt,
                           const int32_t *output, size_t n_output, float *logprob);

/* The history the penalties of p act on, for a device sampler
 * (tdm_sample_row_t in include/tandem/kernels.h): each distinct token of
 * output and (with a repetition penalty) of prompt once, with its count in
 * the output (0: only in the prompt) into tokens[] and counts[], which hold
 * n_prompt + n_output entries. Returns how many were written: 0 when p has
 * no penalty. Ids outside the vocabulary are left out, as sample does. */
size_t tdm_sampler_history(tdm_sampler_t *s, const tdm_sampling_params_t *p, const int32_t *prompt,
                           size_t n_prompt, const int32_t *output, size_t n_output, int32_t *tokens,
                           int32_t *counts);

/* What a device sampler does with that history (the reference of
 * ops->sample): for each entry, the repetition penalty, then (count > 0)
 * count * frequency_penalty and presence_penalty subtracted. Gives the
 * logits bit for bit as tdm_sampler_sample's penalties. */
void tdm_sampler_penalize_history(const tdm_sampling_params_t *p, float *logits,
                                  const int32_t *tokens, const int32_t *counts, size_t n);

/* A logits row's sampling for ops->sample: p's parameters, the draw u and
 * the row's history at hist_tokens[hist_off .. hist_off + n_hist). */
tdm_sample_row_t tdm_sample_row_make(const tdm_sampling_params_t *p, double u, size_t hist_off,
                                     size_t n_hist);
/* The parameters a row samples with (no seed: its draw is in the row). */
tdm_sampling_params_t tdm_sample_row_params(const tdm_sample_row_t *r);

/* tdm_sampler_sample after its penalties, with the draw u given (what
 * tdm_sample_state_next returned; ignored at temperature 0). */
int32_t tdm_sampler_sample_draw(tdm_sampler_t *s, const tdm_sampling_params_t *p, double u,
                                float *logits, float *logprob);

#ifdef __cplusplus
}
#endif

#endif
