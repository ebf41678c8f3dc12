/* tandem-router: the request core, independent of the client API.
 *
 * The front ends (openai.c: HTTP + JSON; grpc_api.c: gRPC) turn a client's
 * request into an rt_params_t (prompt tokens and sampling), submit it, and
 * turn the events back into their wire format. The core picks the pool,
 * the prefill and decode nodes, follows the request through them, fails
 * over when a node dies, and assembles the text from the token ids (UTF-8
 * held back at character boundaries, stop strings cut), so a client sees
 * the same text however the request was served.
 *
 * Threads: rt_core_submit / rt_core_cancel may be called from any thread.
 * Events run on the core's own thread, in order, one request at a time;
 * the callback must not block and must not call rt_core_* except
 * rt_core_cancel. Every submitted request gets exactly one final event
 * (finish != TDM_FINISH_NONE), also after rt_core_cancel (then CANCELLED,
 * unless it finished first); after it the core never touches `user`
 * again, so the front end frees its state there. */
#ifndef TANDEM_ROUTER_CORE_H
#define TANDEM_ROUTER_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/engine.h"
#include "tandem/sampler.h"
#include "tandem/status.h"
#include "tandem/tokenizer.h"

typedef struct rt_core rt_core_t;

#define RT_MAX_TOP_LOGPROBS 20
#define RT_MAX_STOP         16 /* stop strings per request */

/* What the front ends need of a model the router serves. Valid while the
 * core lives. */
typedef struct rt_model_info {
    const char *name;           /* the id clients put in "model" */
    const tdm_tokenizer_t *tok; /* the router loads only the tokenizer */
    tdm_chat_template_t tmpl;   /* chat template of the GGUF */
    const char *default_system; /* the template's default system prompt, or "" */
    int32_t max_model_len;      /* prompt + output tokens */
    int64_t created;            /* unix seconds, for /v1/models */
} rt_model_info_t;

/* The model a request names (NULL or "": the default one). NULL when the
 * router serves no model of that name. */
const rt_model_info_t *rt_core_model(rt_core_t *core, const char *name);
/* Every model, for /v1/models. */
size_t rt_core_models(rt_core_t *core, const rt_model_info_t **out, size_t cap);

typedef struct rt_params {
    const char *model; /* the model's name (rt_core_model) */
    const char *tier;  /* the pool: the x-model-tier header; NULL or "": "default" */
    /* Who sent the request, for the per-client queue limit: the API key it
     * presented, or its IP address where the router checks no key. Only a
     * keyed hash of it is kept; it is never logged. NULL or "": one
     * anonymous client. */
    const char *client;
    const char *request_id; /* for logs (copied) */
    const int32_t *prompt;  /* copied */
    size_t n_prompt;
    tdm_sampling_params_t sampling;
    int32_t max_tokens;      /* > 0; prompt + max_tokens is capped at max_model_len */
    const char *const *stop; /* stop strings (copied), at most RT_MAX_STOP */
    size_t n_stop;
    const int32_t *stop_token_ids; /* copied */
    size_t n_stop_token_ids;
    bool ignore_eos;
    bool logprobs;        /* the chosen token's log-probability */
    int32_t top_logprobs; /* 0..RT_MAX_TOP_LOGPROBS alternatives per token */
    int64_t deadline_ms;  /* absolute, tdm_net_now_ms(); 0: none */
} rt_params_t;

typedef struct rt_logprob {
    int32_t token;
    float logprob;
} rt_logprob_t;

/* One token of an event, when logprobs were asked for. */
typedef struct rt_token_info {
    int32_t token;
    float logprob;
    int32_t n_top;
    rt_logprob_t top[RT_MAX_TOP_LOGPROBS];
} rt_token_info_t;

typedef struct rt_event {
    uint64_t id;
    const char *text; /* new text, complete UTF-8, stop strings cut; may be empty */
    size_t text_len;
    const rt_token_info_t *tokens; /* the tokens behind this text (with logprobs asked) */
    size_t n_tokens;
    tdm_finish_reason_t finish; /* != NONE on the last event */
    /* with TDM_FINISH_ERROR: the HTTP status that says why (400 bad
     * request, 503 no node / queue timeout, 504 deadline, 500 internal)
     * and a message for the client */
    int http_status;
    const char *error;
    int32_t n_prompt; /* usage */
    int32_t n_output;
    int32_t n_cached; /* prompt tokens served from a prefix cache */
} rt_event_t;

typedef void (*rt_event_cb_t)(void *user, const rt_event_t *ev);

/* Seconds a client refused with 429 is told to wait (Retry-After). */
#define RT_RETRY_AFTER_S 1

/* Queues a request, or refuses it at once with a message in err for the
 * client:
 *   TDM_ERR_INVALID    bad parameters, or a tier that names no pool this
 *                      router knows (400; gRPC INVALID_ARGUMENT);
 *   TDM_ERR_NOT_FOUND  no model of that name (404);
 *   TDM_ERR_BUSY       over a queue limit: the router's, the pool's or the
 *                      client's (429 with Retry-After RT_RETRY_AFTER_S;
 *                      gRPC RESOURCE_EXHAUSTED);
 *   TDM_ERR_CANCELLED  the router is draining (503: another replica);
 *   TDM_ERR_NOMEM      out of memory (503).
 * Otherwise every outcome arrives as events. A pool is known when the
 * router was configured with it or a node of it has registered (since the
 * router started); a known pool with no node holds its requests while it
 * scales from zero. */
tdm_status_t rt_core_submit(rt_core_t *core, const rt_params_t *p, rt_event_cb_t cb, void *user,
                            uint64_t *id_out, char *err, size_t err_len);
/* The client went away or cancelled: stops the request on its nodes. */
void rt_core_cancel(rt_core_t *core, uint64_t id);

/* Readiness of the router: true unless draining. A pool without nodes
 * does not count: requests wait for one (scale from zero). */
bool rt_core_ready(rt_core_t *core, char *reason, size_t cap);
/* Stops taking requests (rt_core_submit answers TDM_ERR_CANCELLED, readiness
 * says "draining"); those in flight go on to their end. */
void rt_core_drain(rt_core_t *core);
/* Requests submitted whose final event has not been sent yet. */
size_t rt_core_in_flight(rt_core_t *core);

#endif
