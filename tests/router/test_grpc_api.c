/* Tests of the router's gRPC API (router/api_grpc.c) with the fake core:
 * a client written with gRPC core's C API talks to rt_grpc over loopback
 * (port 0) and checks answers, stream chunks, every error status, deadlines,
 * client cancels (the core request is cancelled within 2 s), unknown
 * methods, authentication, the message size limit and stopping with calls
 * in flight. Every wait is bounded. Prints ok/FAIL per check; exit 0 when
 * all pass, 1 otherwise, 77 when the test model cannot be made. */
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api_grpc.h"
#include "fake_core.h"
#include "tandem/log.h"
#include "tandem/proto/generation.pb-c.h"

#define WAIT_MS 10000 /* the most any one call of the client waits */

static int n_fail;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (cond) {                                                                                \
            printf("ok   ");                                                                       \
        } else {                                                                                   \
            printf("FAIL ");                                                                       \
            n_fail++;                                                                              \
        }                                                                                          \
        printf(__VA_ARGS__);                                                                       \
        printf("\n");                                                                              \
        fflush(stdout);                                                                            \
    } while (0)

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static gpr_timespec in_ms(int64_t ms)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

/* Waits until counter() == want (or passes) for at most ms; true if so. */
static bool wait_for(rt_core_t *core, uint64_t (*counter)(rt_core_t *), uint64_t want, int ms)
{
    int64_t until = now_ms() + ms;
    while (now_ms() < until) {
        if (counter(core) == want)
            return true;
        sleep_ms(5);
    }
    return counter(core) == want;
}

/* ---- a small synchronous client -------------------------------------- */

typedef struct client {
    grpc_channel *ch;
    grpc_completion_queue *cq; /* pluck */
} client_t;

static void client_open(client_t *cl, int port)
{
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    cl->ch = grpc_channel_create(target, creds, NULL);
    grpc_channel_credentials_release(creds);
    cl->cq = grpc_completion_queue_create_for_pluck(NULL);
}

static void client_close(client_t *cl)
{
    grpc_channel_destroy(cl->ch);
    grpc_completion_queue_shutdown(cl->cq);
    while (grpc_completion_queue_pluck(cl->cq, NULL, in_ms(WAIT_MS), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cl->cq);
}

/* true when tag came back within WAIT_MS */
static bool pluck(client_t *cl, void *tag)
{
    grpc_event ev = grpc_completion_queue_pluck(cl->cq, tag, in_ms(WAIT_MS), NULL);
    return ev.type == GRPC_OP_COMPLETE;
}

typedef struct md_pair {
    const char *key, *value;
} md_pair_t;

/* A call in progress: a stream, or a unary call read to its end. */
typedef struct call {
    client_t *cl;
    grpc_call *call;
    grpc_metadata md[4];
    grpc_metadata_array initial, trailing;
    grpc_status_code status;
    grpc_slice details;
    char details_str[512];
    char trailers[256]; /* "key=value;" for each trailing metadata entry */
    grpc_byte_buffer *send;
    grpc_byte_buffer *recv;
    int tag_start, tag_status, tag_recv;
    bool status_started;
} call_t;

static grpc_byte_buffer *bb_of(const void *data, size_t len)
{
    grpc_slice sl = grpc_slice_from_copied_buffer(data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

static grpc_byte_buffer *bb_of_msg(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n ? n : 1);
    protobuf_c_message_pack(m, buf);
    grpc_byte_buffer *bb = bb_of(buf, n);
    free(buf);
    return bb;
}

static ProtobufCMessage *msg_of_bb(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d)
{
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return NULL;
    grpc_slice all = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    ProtobufCMessage *m =
        protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
    grpc_slice_unref(all);
    return m;
}

/* Field 1 (GenerateResponse.text) of a serialized message, read by hand:
 * protobuf-c's char * strings end at the first NUL, and generated text may
 * hold U+0000. Returns the length copied to out (NUL-terminated). */
static size_t text_field(grpc_byte_buffer *bb, char *out, size_t cap)
{
    grpc_byte_buffer_reader r;
    size_t got = 0;
    out[0] = '\0';
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return 0;
    grpc_slice all = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    const uint8_t *p = GRPC_SLICE_START_PTR(all), *end = p + GRPC_SLICE_LENGTH(all);
    while (p < end) {
        uint64_t key = 0, v = 0;
        for (int sh = 0; p < end; sh += 7) {
            key |= (uint64_t)(*p & 0x7F) << sh;
            if (!(*p++ & 0x80))
                break;
        }
        unsigned wt = key & 7;
        if (wt == 0 || wt == 2) {
            for (int sh = 0; p < end; sh += 7) {
                v |= (uint64_t)(*p & 0x7F) << sh;
                if (!(*p++ & 0x80))
                    break;
            }
        }
        if (wt == 1)
            p += 8;
        else if (wt == 5)
            p += 4;
        else if (wt == 2) {
            if (v > (uint64_t)(end - p))
                break;
            if (key >> 3 == 1) {
                got = v < cap - 1 ? (size_t)v : cap - 1;
                memcpy(out, p, got);
                out[got] = '\0';
            }
            p += v;
        } else if (wt != 0)
            break;
    }
    grpc_slice_unref(all);
    return got;
}

/* The text of the last unary response (text_field). */
static char last_text[8192];
static size_t last_text_len;

/* Starts method with request bytes req (NULL: no message), metadata md
 * (NULL-terminated) and a deadline (0: none). */
static bool call_start(call_t *c, client_t *cl, const char *method, grpc_byte_buffer *req,
                       const md_pair_t *md, int64_t deadline_ms)
{
    memset(c, 0, sizeof(*c));
    c->cl = cl;
    c->send = req;
    grpc_slice m = grpc_slice_from_copied_string(method);
    c->call = grpc_channel_create_call(
        cl->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cl->cq, m, NULL,
        deadline_ms > 0 ? in_ms(deadline_ms) : gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_slice_unref(m);
    size_t n_md = 0;
    for (; md != NULL && md[n_md].key != NULL && n_md < 4; n_md++) {
        c->md[n_md].key = grpc_slice_from_static_string(md[n_md].key);
        c->md[n_md].value = grpc_slice_from_static_string(md[n_md].value);
    }
    grpc_metadata_array_init(&c->initial);
    grpc_metadata_array_init(&c->trailing);
    grpc_op ops[4];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].data.send_initial_metadata.count = n_md;
    ops[n].data.send_initial_metadata.metadata = c->md;
    n++;
    if (req != NULL) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = req;
        n++;
    }
    ops[n].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    n++;
    ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[n].data.recv_initial_metadata.recv_initial_metadata = &c->initial;
    n++;
    if (grpc_call_start_batch(c->call, ops, n, &c->tag_start, NULL) != GRPC_CALL_OK)
        return false;
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].data.recv_status_on_client.trailing_metadata = &c->trailing;
    ops[0].data.recv_status_on_client.status = &c->status;
    ops[0].data.recv_status_on_client.status_details = &c->details;
    if (grpc_call_start_batch(c->call, ops, 1, &c->tag_status, NULL) != GRPC_CALL_OK)
        return false;
    c->status_started = true;
    return true;
}

/* The next message (NULL at the end of the stream or on a timeout). */
static grpc_byte_buffer *call_next(call_t *c)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv;
    c->recv = NULL;
    if (grpc_call_start_batch(c->call, &op, 1, &c->tag_recv, NULL) != GRPC_CALL_OK)
        return NULL;
    if (!pluck(c->cl, &c->tag_recv))
        return NULL;
    return c->recv;
}

/* Waits for the status and frees the call; -1 if it did not come. */
static int call_finish(call_t *c)
{
    int code = -1;
    bool started = pluck(c->cl, &c->tag_start);
    if (c->status_started && pluck(c->cl, &c->tag_status)) {
        code = (int)c->status;
        size_t n = GRPC_SLICE_LENGTH(c->details);
        if (n >= sizeof(c->details_str))
            n = sizeof(c->details_str) - 1;
        memcpy(c->details_str, GRPC_SLICE_START_PTR(c->details), n);
        c->details_str[n] = '\0';
        grpc_slice_unref(c->details);
        size_t off = 0;
        for (size_t i = 0; i < c->trailing.count && off < sizeof(c->trailers); i++) {
            const grpc_metadata *m = &c->trailing.metadata[i];
            int w = snprintf(
                c->trailers + off, sizeof(c->trailers) - off, "%.*s=%.*s;",
                (int)GRPC_SLICE_LENGTH(m->key), (const char *)GRPC_SLICE_START_PTR(m->key),
                (int)GRPC_SLICE_LENGTH(m->value), (const char *)GRPC_SLICE_START_PTR(m->value));
            off += w > 0 ? (size_t)w : 0;
        }
    }
    (void)started;
    grpc_metadata_array_destroy(&c->initial);
    grpc_metadata_array_destroy(&c->trailing);
    if (c->send != NULL)
        grpc_byte_buffer_destroy(c->send);
    grpc_call_unref(c->call);
    return code;
}

/* A unary call: *resp gets the message (or NULL); returns the status. */
static int unary(client_t *cl, const char *method, grpc_byte_buffer *req, const md_pair_t *md,
                 int64_t deadline_ms, const ProtobufCMessageDescriptor *d, ProtobufCMessage **resp,
                 char *details, size_t details_cap)
{
    call_t c;
    if (resp != NULL)
        *resp = NULL;
    if (!call_start(&c, cl, method, req, md, deadline_ms)) {
        grpc_byte_buffer_destroy(req);
        return -1;
    }
    grpc_byte_buffer *bb = call_next(&c);
    if (bb != NULL) {
        if (resp != NULL && d != NULL)
            *resp = msg_of_bb(bb, d);
        last_text_len = text_field(bb, last_text, sizeof(last_text));
        grpc_byte_buffer_destroy(bb);
    }
    int code = call_finish(&c);
    if (details != NULL)
        snprintf(details, details_cap, "%s", c.details_str);
    return code;
}

#define M_GENERATE "/tandem.v1.Generation/Generate"
#define M_STREAM   "/tandem.v1.Generation/GenerateStream"
#define M_MODELS   "/tandem.v1.Generation/ListModels"
#define M_HEALTH   "/tandem.v1.Generation/Health"

static int generate(client_t *cl, const Tandem__V1__GenerateRequest *q, const md_pair_t *md,
                    Tandem__V1__GenerateResponse **resp, char *details, size_t cap)
{
    return unary(cl, M_GENERATE, bb_of_msg(&q->base), md, 0,
                 &tandem__v1__generate_response__descriptor, (ProtobufCMessage **)resp, details,
                 cap);
}

/* A whole stream: the chunks' text joined, how many chunks, how many had a
 * finish_reason, whether only the last had it (and usage). */
typedef struct stream_result {
    int code;
    char details[512];
    char text[8192];
    size_t text_len;
    size_t n_chunks, n_finish, n_usage, n_tokens;
    bool finish_last;
    char finish_reason[32];
    int32_t completion_tokens;
} stream_result_t;

static void stream_all(client_t *cl, const Tandem__V1__GenerateRequest *q, const md_pair_t *md,
                       int64_t deadline_ms, stream_result_t *r)
{
    memset(r, 0, sizeof(*r));
    call_t c;
    if (!call_start(&c, cl, M_STREAM, bb_of_msg(&q->base), md, deadline_ms)) {
        r->code = -1;
        return;
    }
    grpc_byte_buffer *bb;
    while ((bb = call_next(&c)) != NULL) {
        Tandem__V1__GenerateResponse *m = (Tandem__V1__GenerateResponse *)msg_of_bb(
            bb, &tandem__v1__generate_response__descriptor);
        char chunk[2048];
        size_t n = text_field(bb, chunk, sizeof(chunk));
        grpc_byte_buffer_destroy(bb);
        if (m == NULL)
            break;
        r->n_chunks++;
        r->finish_last = false;
        if (r->text_len + n < sizeof(r->text)) {
            memcpy(r->text + r->text_len, chunk, n);
            r->text_len += n;
            r->text[r->text_len] = '\0';
        }
        r->n_tokens += m->n_token_ids;
        if (m->finish_reason[0] != '\0') {
            r->n_finish++;
            r->finish_last = true;
            snprintf(r->finish_reason, sizeof(r->finish_reason), "%s", m->finish_reason);
        }
        if (m->usage != NULL) {
            r->n_usage++;
            r->completion_tokens = m->usage->completion_tokens;
        }
        protobuf_c_message_free_unpacked(&m->base, NULL);
    }
    r->code = call_finish(&c);
    snprintf(r->details, sizeof(r->details), "%s", c.details_str);
}

/* ---- the checks --------------------------------------------------------- */

static void test_models_health(client_t *cl, rt_core_t *core)
{
    Tandem__V1__ListModelsRequest lq = TANDEM__V1__LIST_MODELS_REQUEST__INIT;
    Tandem__V1__ListModelsResponse *lr = NULL;
    int code =
        unary(cl, M_MODELS, bb_of_msg(&lq.base), NULL, 0,
              &tandem__v1__list_models_response__descriptor, (ProtobufCMessage **)&lr, NULL, 0);
    CHECK(code == GRPC_STATUS_OK && lr != NULL && lr->n_models == 1 &&
              strcmp(lr->models[0]->name, FAKE_CORE_MODEL) == 0 &&
              lr->models[0]->max_model_len == FAKE_CORE_MAX_MODEL_LEN &&
              lr->models[0]->created == FAKE_CORE_CREATED,
          "ListModels: status %d, %zu models, first \"%s\"", code, lr ? lr->n_models : 0,
          lr && lr->n_models ? lr->models[0]->name : "");
    if (lr != NULL)
        protobuf_c_message_free_unpacked(&lr->base, NULL);

    Tandem__V1__HealthRequest hq = TANDEM__V1__HEALTH_REQUEST__INIT;
    Tandem__V1__HealthResponse *hr = NULL;
    code = unary(cl, M_HEALTH, bb_of_msg(&hq.base), NULL, 0,
                 &tandem__v1__health_response__descriptor, (ProtobufCMessage **)&hr, NULL, 0);
    CHECK(code == GRPC_STATUS_OK && hr != NULL &&
              hr->status == TANDEM__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING,
          "Health: status %d, serving %d", code, hr ? (int)hr->status : -1);
    if (hr != NULL)
        protobuf_c_message_free_unpacked(&hr->base, NULL);

    fake_core_set_ready(core, false);
    hr = NULL;
    code = unary(cl, M_HEALTH, bb_of_msg(&hq.base), NULL, 0,
                 &tandem__v1__health_response__descriptor, (ProtobufCMessage **)&hr, NULL, 0);
    CHECK(code == GRPC_STATUS_OK && hr != NULL &&
              hr->status == TANDEM__V1__HEALTH_RESPONSE__SERVING_STATUS__NOT_SERVING,
          "Health when the core is not ready: NOT_SERVING (\"%s\")", hr ? hr->reason : "");
    if (hr != NULL)
        protobuf_c_message_free_unpacked(&hr->base, NULL);
    fake_core_set_ready(core, true);
}

static void test_generate(client_t *cl, rt_core_t *core)
{
    Tandem__V1__GenerateRequest q = TANDEM__V1__GENERATE_REQUEST__INIT;
    q.prompt = "Hello, world. Tell me a story";
    q.max_tokens = 24;
    q.temperature_opt_case = TANDEM__V1__GENERATE_REQUEST__TEMPERATURE_OPT_TEMPERATURE;
    q.temperature = 0.0f;
    q.request_id = "req-unary-1";
    Tandem__V1__GenerateResponse *r = NULL;
    char details[512] = "";
    int code = generate(cl, &q, NULL, &r, details, sizeof(details));
    CHECK(code == GRPC_STATUS_OK && r != NULL && r->text[0] != '\0' &&
              strcmp(r->finish_reason, "length") == 0 && r->usage != NULL &&
              r->usage->completion_tokens == 24 && r->usage->prompt_tokens > 0 &&
              strcmp(r->request_id, "req-unary-1") == 0,
          "Generate: status %d (%s), finish \"%s\", %d tokens, request_id \"%s\"", code, details,
          r ? r->finish_reason : "", r && r->usage ? r->usage->completion_tokens : -1,
          r ? r->request_id : "");
    fake_core_request_t last;
    bool have = fake_core_last_request(core, &last);
    CHECK(have && last.max_tokens == 24 && last.sampling.temperature == 0.0f &&
              strcmp(last.request_id, "req-unary-1") == 0 && last.deadline_ms == 0 &&
              strcmp(last.model, FAKE_CORE_MODEL) == 0,
          "Generate: the core got max_tokens 24, temperature 0, the request id, no deadline");

    char unary_text[8192];
    size_t unary_len = last_text_len;
    memcpy(unary_text, last_text, last_text_len + 1);
    CHECK(unary_len > strlen(unary_text),
          "Generate: the text holds a U+0000 and comes through whole (%zu bytes)", unary_len);
    /* the same request streamed, a token every 10 ms so that the chunks
     * do not all queue up (queued events are sent as one message) */
    stream_result_t s;
    md_pair_t slow[] = {{"x-model-tier", "slow"}, {NULL, NULL}};
    fake_core_set_token_delay_ms(core, 10);
    stream_all(cl, &q, slow, 0, &s);
    fake_core_set_token_delay_ms(core, 100);
    CHECK(s.code == GRPC_STATUS_OK && s.text_len == unary_len &&
              memcmp(s.text, unary_text, unary_len) == 0 && s.n_chunks > 1 && s.n_finish == 1 &&
              s.finish_last && s.n_usage == 1 && strcmp(s.finish_reason, "length") == 0 &&
              s.completion_tokens == 24,
          "GenerateStream: status %d, %zu chunks joined == unary text, finish_reason once and "
          "last (%zu, \"%s\"), usage once (%zu), %d tokens, %zu vs %zu bytes",
          s.code, s.n_chunks, s.n_finish, s.finish_reason, s.n_usage, s.completion_tokens,
          s.text_len, unary_len);
    if (r != NULL)
        protobuf_c_message_free_unpacked(&r->base, NULL);

    /* token ids as given, max_tokens 0: up to the model's length; sampling */
    Tandem__V1__GenerateRequest t = TANDEM__V1__GENERATE_REQUEST__INIT;
    int32_t ids[5] = {10, 20, 30, 40, 50};
    t.n_prompt_token_ids = 5;
    t.prompt_token_ids = ids;
    t.top_p_opt_case = TANDEM__V1__GENERATE_REQUEST__TOP_P_OPT_TOP_P;
    t.top_p = 0.5f;
    t.top_k = 7;
    t.seed_opt_case = TANDEM__V1__GENERATE_REQUEST__SEED_OPT_SEED;
    t.seed = 1234;
    t.ignore_eos = true;
    md_pair_t tier_md[] = {
        {"x-model-tier", "quality"}, {"x-request-id", "from-metadata"}, {NULL, NULL}};
    r = NULL;
    code = generate(cl, &t, tier_md, &r, details, sizeof(details));
    have = fake_core_last_request(core, &last);
    CHECK(code == GRPC_STATUS_OK && r != NULL && r->usage != NULL &&
              r->usage->completion_tokens == FAKE_CORE_MAX_MODEL_LEN - 5 && have &&
              last.n_prompt == 5 && last.prompt[0] == 10 && last.prompt[4] == 50 &&
              last.max_tokens == FAKE_CORE_MAX_MODEL_LEN - 5 && last.sampling.top_p == 0.5f &&
              last.sampling.top_k == 7 && last.sampling.has_seed && last.sampling.seed == 1234 &&
              last.sampling.temperature == 1.0f && last.ignore_eos &&
              strcmp(last.tier, "quality") == 0 && strcmp(last.request_id, "from-metadata") == 0,
          "Generate with prompt_token_ids: ids as given, max_tokens 0 -> %d, sampling, tier "
          "\"%s\" and request id \"%s\" from the metadata (status %d %s)",
          last.max_tokens, last.tier, last.request_id, code, details);
    if (r != NULL)
        protobuf_c_message_free_unpacked(&r->base, NULL);

    /* chat messages */
    Tandem__V1__ChatMessage m0 = TANDEM__V1__CHAT_MESSAGE__INIT, m1 = m0;
    m0.role = "system";
    m0.content = "You are terse.";
    m1.role = "user";
    m1.content = "Name a colour.";
    Tandem__V1__ChatMessage *msgs[2] = {&m0, &m1};
    Tandem__V1__GenerateRequest cq = TANDEM__V1__GENERATE_REQUEST__INIT;
    cq.n_messages = 2;
    cq.messages = msgs;
    cq.max_tokens = 8;
    r = NULL;
    code = generate(cl, &cq, NULL, &r, details, sizeof(details));
    have = fake_core_last_request(core, &last);
    CHECK(code == GRPC_STATUS_OK && r != NULL && r->usage && r->usage->completion_tokens == 8 &&
              have && last.n_prompt > 10,
          "Generate with messages: status %d, %zu prompt tokens through the template", code,
          have ? last.n_prompt : 0);
    if (r != NULL)
        protobuf_c_message_free_unpacked(&r->base, NULL);

    /* logprobs */
    Tandem__V1__GenerateRequest lq = q;
    lq.top_logprobs = 3;
    lq.max_tokens = 6;
    r = NULL;
    code = generate(cl, &lq, NULL, &r, details, sizeof(details));
    bool lp_ok = code == GRPC_STATUS_OK && r != NULL && r->n_logprobs == 6 && r->n_token_ids == 6;
    for (size_t i = 0; lp_ok && i < r->n_logprobs; i++) {
        const Tandem__V1__TokenLogprob *l = r->logprobs[i];
        lp_ok = l->token == r->token_ids[i] && l->n_top_logprobs == 3 &&
                l->top_logprobs[0]->token == l->token && l->logprob < 0.0f &&
                l->top_logprobs[1]->logprob < l->top_logprobs[0]->logprob;
    }
    CHECK(lp_ok, "Generate with top_logprobs 3: %zu tokens, each with 3 alternatives (status %d)",
          r ? r->n_logprobs : 0, code);
    if (r != NULL)
        protobuf_c_message_free_unpacked(&r->base, NULL);

    /* a stop string: cut from the text */
    Tandem__V1__GenerateRequest sq = q;
    char *stop_str[1];
    r = NULL;
    generate(cl, &q, NULL, &r, details, sizeof(details));
    if (r != NULL && strlen(r->text) > 6) {
        /* two whole characters from the middle of the text */
        char stop[16];
        const unsigned char *tx = (const unsigned char *)r->text;
        size_t at0 = strlen(r->text) / 2, end = at0;
        while ((tx[at0] & 0xC0) == 0x80)
            at0++;
        end = at0;
        for (int k = 0; k < 2 && tx[end] != 0; k++) {
            end++;
            while ((tx[end] & 0xC0) == 0x80)
                end++;
        }
        memcpy(stop, tx + at0, end - at0);
        stop[end - at0] = '\0';
        const char *at = strstr(r->text, stop);
        size_t want = at != NULL ? (size_t)(at - r->text) : 0;
        stop_str[0] = stop;
        sq.n_stop = 1;
        sq.stop = stop_str;
        Tandem__V1__GenerateResponse *r2 = NULL;
        code = generate(cl, &sq, NULL, &r2, details, sizeof(details));
        CHECK(code == GRPC_STATUS_OK && r2 != NULL && strlen(r2->text) == want &&
                  strncmp(r2->text, r->text, want) == 0 && strcmp(r2->finish_reason, "stop") == 0,
              "Generate with a stop string \"%s\": text cut before it (%zu bytes), finish "
              "\"%s\" (status %d %s)",
              stop, want, r2 ? r2->finish_reason : "", code, details);
        if (r2 != NULL)
            protobuf_c_message_free_unpacked(&r2->base, NULL);
    } else {
        CHECK(false, "Generate for the stop string test gave no text");
    }
    if (r != NULL)
        protobuf_c_message_free_unpacked(&r->base, NULL);
}

static void expect_status(client_t *cl, const Tandem__V1__GenerateRequest *q, const md_pair_t *md,
                          int want, const char *want_in_msg, const char *what)
{
    char details[512] = "";
    int code = generate(cl, q, md, NULL, details, sizeof(details));
    CHECK(code == want && (want_in_msg == NULL || strstr(details, want_in_msg) != NULL),
          "%s: status %d (want %d): \"%s\"", what, code, want, details);
}

static void test_errors(client_t *cl)
{
    Tandem__V1__GenerateRequest q = TANDEM__V1__GENERATE_REQUEST__INIT;
    q.max_tokens = 4;
    expect_status(cl, &q, NULL, GRPC_STATUS_INVALID_ARGUMENT, "prompt", "no input");

    Tandem__V1__GenerateRequest two = q;
    int32_t ids[2] = {1, 2};
    two.prompt = "hi";
    two.n_prompt_token_ids = 2;
    two.prompt_token_ids = ids;
    expect_status(cl, &two, NULL, GRPC_STATUS_INVALID_ARGUMENT, "only one", "two inputs");

    Tandem__V1__GenerateRequest neg = q;
    neg.prompt = "hi";
    neg.max_tokens = -1;
    expect_status(cl, &neg, NULL, GRPC_STATUS_INVALID_ARGUMENT, "max_tokens", "max_tokens -1");

    static int32_t long_ids[FAKE_CORE_MAX_MODEL_LEN];
    for (int i = 0; i < FAKE_CORE_MAX_MODEL_LEN; i++)
        long_ids[i] = 100 + i % 50;
    Tandem__V1__GenerateRequest lng = q;
    lng.n_prompt_token_ids = FAKE_CORE_MAX_MODEL_LEN;
    lng.prompt_token_ids = long_ids;
    expect_status(cl, &lng, NULL, GRPC_STATUS_INVALID_ARGUMENT, "at most",
                  "a prompt as long as the model");

    int32_t bad_id[1] = {1 << 30};
    Tandem__V1__GenerateRequest vocab = q;
    vocab.n_prompt_token_ids = 1;
    vocab.prompt_token_ids = bad_id;
    expect_status(cl, &vocab, NULL, GRPC_STATUS_INVALID_ARGUMENT, "prompt_token_ids[0]",
                  "a token id outside the vocabulary");

    Tandem__V1__GenerateRequest utf = q;
    utf.prompt = "bad \xff\xfe bytes";
    expect_status(cl, &utf, NULL, GRPC_STATUS_INVALID_ARGUMENT, "UTF-8", "invalid UTF-8 in prompt");

    Tandem__V1__GenerateRequest ustop = q;
    char *stops[1] = {"\xc3("};
    ustop.prompt = "hi";
    ustop.n_stop = 1;
    ustop.stop = stops;
    expect_status(cl, &ustop, NULL, GRPC_STATUS_INVALID_ARGUMENT, "stop[0]",
                  "invalid UTF-8 in a stop string");

    Tandem__V1__ChatMessage m = TANDEM__V1__CHAT_MESSAGE__INIT;
    m.role = "wizard";
    m.content = "hi";
    Tandem__V1__ChatMessage *msgs[1] = {&m};
    Tandem__V1__GenerateRequest role = q;
    role.n_messages = 1;
    role.messages = msgs;
    expect_status(cl, &role, NULL, GRPC_STATUS_INVALID_ARGUMENT, "messages[0].role",
                  "an unknown role");

    Tandem__V1__ChatMessage m2 = TANDEM__V1__CHAT_MESSAGE__INIT;
    m2.role = "user";
    m2.content = "\xed\xa0\x80 surrogate";
    Tandem__V1__ChatMessage *msgs2[1] = {&m2};
    Tandem__V1__GenerateRequest content = q;
    content.n_messages = 1;
    content.messages = msgs2;
    expect_status(cl, &content, NULL, GRPC_STATUS_INVALID_ARGUMENT, "messages[0].content",
                  "invalid UTF-8 in a message");

    Tandem__V1__GenerateRequest temp = q;
    temp.prompt = "hi";
    temp.temperature_opt_case = TANDEM__V1__GENERATE_REQUEST__TEMPERATURE_OPT_TEMPERATURE;
    temp.temperature = -1.0f;
    expect_status(cl, &temp, NULL, GRPC_STATUS_INVALID_ARGUMENT, "temperature", "temperature -1");

    Tandem__V1__GenerateRequest tl = q;
    tl.prompt = "hi";
    tl.top_logprobs = 21;
    expect_status(cl, &tl, NULL, GRPC_STATUS_INVALID_ARGUMENT, "top_logprobs", "top_logprobs 21");

    /* the HTTP API's seeds are 0..2^63-1: the rest is what its negative
     * ones would wrap to */
    Tandem__V1__GenerateRequest sd = q;
    sd.prompt = "hi";
    sd.seed_opt_case = TANDEM__V1__GENERATE_REQUEST__SEED_OPT_SEED;
    sd.seed = (uint64_t)INT64_MAX + 1;
    expect_status(cl, &sd, NULL, GRPC_STATUS_INVALID_ARGUMENT, "seed", "seed 2^63");

    Tandem__V1__GenerateRequest model = q;
    model.prompt = "hi";
    model.model = "no-such-model";
    expect_status(cl, &model, NULL, GRPC_STATUS_NOT_FOUND, "no-such-model", "an unknown model");

    struct {
        const char *model;
        int want;
    } fails[] = {
        {"reject", GRPC_STATUS_INVALID_ARGUMENT}, {"fail-400", GRPC_STATUS_INVALID_ARGUMENT},
        {"fail-503", GRPC_STATUS_UNAVAILABLE},    {"fail-504", GRPC_STATUS_DEADLINE_EXCEEDED},
        {"fail-500", GRPC_STATUS_INTERNAL},
    };
    for (size_t i = 0; i < sizeof(fails) / sizeof(fails[0]); i++) {
        Tandem__V1__GenerateRequest f = q;
        f.prompt = "hi";
        f.model = (char *)fails[i].model;
        char what[64];
        snprintf(what, sizeof(what), "model %s", fails[i].model);
        expect_status(cl, &f, NULL, fails[i].want, NULL, what);
    }

    /* an error in the middle of a stream: the chunks so far, then the status */
    Tandem__V1__GenerateRequest mid = q;
    mid.prompt = "hi";
    mid.model = "fail-mid";
    mid.max_tokens = 20;
    stream_result_t s;
    stream_all(cl, &mid, NULL, 0, &s);
    CHECK(s.code == GRPC_STATUS_UNAVAILABLE && s.n_finish == 0 && s.n_chunks >= 1 &&
              s.text[0] != '\0',
          "GenerateStream failing mid-way: the text so far (\"%s\", %zu chunks), then status %d "
          "without finish_reason (\"%s\")",
          s.text, s.n_chunks, s.code, s.details);

    /* bytes that are no GenerateRequest */
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f};
    char details[512] = "";
    int code = unary(cl, M_GENERATE, bb_of(junk, sizeof(junk)), NULL, 0, NULL, NULL, details,
                     sizeof(details));
    CHECK(code == GRPC_STATUS_INVALID_ARGUMENT, "a malformed message: status %d \"%s\"", code,
          details);

    /* U+0000 in a string: protobuf-c would cut it short, so it is refused */
    static const uint8_t nul_prompt[] = {0x12, 3, 'a', 0, 'b', 0x28, 4};
    code = unary(cl, M_GENERATE, bb_of(nul_prompt, sizeof(nul_prompt)), NULL, 0, NULL, NULL,
                 details, sizeof(details));
    CHECK(code == GRPC_STATUS_INVALID_ARGUMENT && strstr(details, "prompt") != NULL,
          "U+0000 in the prompt: status %d \"%s\"", code, details);
    static const uint8_t nul_msg[] = {0x22, 11, 0x0a, 4, 'u', 's',  'e', 'r',
                                      0x12, 3,  'x',  0, 'y', 0x28, 4};
    code = unary(cl, M_GENERATE, bb_of(nul_msg, sizeof(nul_msg)), NULL, 0, NULL, NULL, details,
                 sizeof(details));
    CHECK(code == GRPC_STATUS_INVALID_ARGUMENT && strstr(details, "messages[0].content") != NULL,
          "U+0000 in a message: status %d \"%s\"", code, details);

    /* unknown methods, of this service and of another */
    code = unary(cl, "/tandem.v1.Generation/Nope", bb_of("", 0), NULL, 0, NULL, NULL, details,
                 sizeof(details));
    CHECK(code == GRPC_STATUS_UNIMPLEMENTED, "an unknown method: status %d \"%s\"", code, details);
    code = unary(cl, "/grpc.health.v1.Health/Check", bb_of("", 0), NULL, 2000, NULL, NULL, details,
                 sizeof(details));
    CHECK(code == GRPC_STATUS_UNIMPLEMENTED, "another service's method: status %d", code);
}

/* A slow stream, cancelled by the client after two chunks; other calls
 * work meanwhile; the core request is cancelled within 2 s. */
/* Admission: a core that refuses a request over a queue limit
 * (TDM_ERR_BUSY; the fake core does it for the tier "full") gives
 * RESOURCE_EXHAUSTED with when to retry in the trailing metadata; the core
 * learns who the client is (its IP address without an API key). */
static void test_admission(client_t *cl, rt_core_t *core)
{
    Tandem__V1__GenerateRequest q = TANDEM__V1__GENERATE_REQUEST__INIT;
    q.prompt = "hi";
    q.max_tokens = 2;
    q.tier = "full";
    call_t c;
    bool started = call_start(&c, cl, M_GENERATE, bb_of_msg(&q.base), NULL, 0);
    grpc_byte_buffer *bb = started ? call_next(&c) : NULL;
    if (bb != NULL)
        grpc_byte_buffer_destroy(bb);
    int code = started ? call_finish(&c) : -1;
    CHECK(code == GRPC_STATUS_RESOURCE_EXHAUSTED && bb == NULL &&
              strstr(c.details_str, "client 127.0.0.1") != NULL,
          "over a queue limit: status %d (want %d), details \"%s\"", code,
          GRPC_STATUS_RESOURCE_EXHAUSTED, c.details_str);
    CHECK(strstr(c.trailers, "retry-after=1;") != NULL &&
              strstr(c.trailers, "grpc-retry-pushback-ms=1000;") != NULL,
          "its trailing metadata says when to retry: %s", c.trailers);

    md_pair_t md[] = {{"x-model-tier", "full"}, {NULL, NULL}};
    q.tier = "";
    expect_status(cl, &q, md, GRPC_STATUS_RESOURCE_EXHAUSTED, "queue limit",
                  "over a queue limit, tier in the metadata");
    expect_status(cl, &q, NULL, GRPC_STATUS_OK, NULL, "a request without that tier");
    fake_core_request_t last;
    CHECK(fake_core_last_request(core, &last) && strcmp(last.client, "127.0.0.1") == 0,
          "the core's client is the peer's address: \"%s\"", last.client);
}

static void test_cancel(client_t *cl, rt_core_t *core)
{
    uint64_t cancels = fake_core_cancels(core), live = fake_core_live(core);
    Tandem__V1__GenerateRequest q = TANDEM__V1__GENERATE_REQUEST__INIT;
    q.prompt = "a slow one";
    q.model = "slow";
    q.max_tokens = 200;
    call_t c;
    bool started = call_start(&c, cl, M_STREAM, bb_of_msg(&q.base), NULL, 0);
    size_t got = 0;
    for (int i = 0; started && i < 2; i++) {
        grpc_byte_buffer *bb = call_next(&c);
        if (bb == NULL)
            break;
        grpc_byte_buffer_destroy(bb);
        got++;
    }
    CHECK(got == 2 && fake_core_live(core) == live + 1, "a slow stream is running (%zu chunks)",
          got);

    /* meanwhile */
    Tandem__V1__GenerateRequest u = TANDEM__V1__GENERATE_REQUEST__INIT;
    u.prompt = "quick";
    u.max_tokens = 5;
    Tandem__V1__GenerateResponse *r = NULL;
    int code = generate(cl, &u, NULL, &r, NULL, 0);
    CHECK(code == GRPC_STATUS_OK && r != NULL && r->usage && r->usage->completion_tokens == 5,
          "Generate works while the slow stream runs");
    if (r != NULL)
        protobuf_c_message_free_unpacked(&r->base, NULL);
    Tandem__V1__HealthRequest hq = TANDEM__V1__HEALTH_REQUEST__INIT;
    code = unary(cl, M_HEALTH, bb_of_msg(&hq.base), NULL, 0, NULL, NULL, NULL, 0);
    CHECK(code == GRPC_STATUS_OK, "Health works while the slow stream runs");

    int64_t t0 = now_ms();
    grpc_call_cancel(c.call, NULL);
    bool cancelled = wait_for(core, fake_core_cancels, cancels + 1, 2000);
    int64_t dt = now_ms() - t0;
    CHECK(cancelled, "client cancel mid-stream: the core request was cancelled in %lld ms",
          (long long)dt);
    CHECK(wait_for(core, fake_core_live, live, 2000),
          "client cancel mid-stream: the core request ended");
    if (started) {
        for (grpc_byte_buffer *bb; (bb = call_next(&c)) != NULL;)
            grpc_byte_buffer_destroy(bb);
        code = call_finish(&c);
        CHECK(code == GRPC_STATUS_CANCELLED, "the cancelled stream ends CANCELLED (%d)", code);
    }
}

/* A deadline that passes mid-stream: DEADLINE_EXCEEDED, and the core
 * request stops (cancelled by the front end, or ended by the core's own
 * check of the deadline the front end passed on, whichever is first). */
static void test_deadline(client_t *cl, rt_core_t *core)
{
    uint64_t cancels = fake_core_cancels(core), live = fake_core_live(core);
    Tandem__V1__GenerateRequest q = TANDEM__V1__GENERATE_REQUEST__INIT;
    q.prompt = "slow with a deadline";
    q.model = "slow";
    q.max_tokens = 200;
    stream_result_t s;
    int64_t t0 = now_ms();
    stream_all(cl, &q, NULL, 700, &s);
    int64_t dt = now_ms() - t0;
    fake_core_request_t last;
    bool have = fake_core_last_request(core, &last);
    CHECK(s.code == GRPC_STATUS_DEADLINE_EXCEEDED && s.n_chunks >= 2 && dt < 3000,
          "deadline mid-stream: status %d after %zu chunks and %lld ms", s.code, s.n_chunks,
          (long long)dt);
    CHECK(have && last.deadline_ms > 0, "the call's deadline went to the core (deadline_ms %lld)",
          have ? (long long)last.deadline_ms : 0LL);
    bool ended = wait_for(core, fake_core_live, live, 2000);
    CHECK(ended, "deadline mid-stream: the core request stopped (%s)",
          fake_core_cancels(core) > cancels ? "rt_core_cancel" : "the core's own deadline");

    /* the front end's own cancel at the deadline: a core that would not
     * notice the deadline itself is told by rt_core_cancel. The tier "slow"
     * with a unary call: no chunk, so nothing but the deadline ends it. */
    cancels = fake_core_cancels(core);
    fake_core_set_token_delay_ms(core, 5000);
    Tandem__V1__GenerateRequest u = TANDEM__V1__GENERATE_REQUEST__INIT;
    u.prompt = "unary slow";
    u.max_tokens = 100;
    md_pair_t md[] = {{"x-model-tier", "slow"}, {NULL, NULL}};
    char details[256];
    t0 = now_ms();
    int code =
        unary(cl, M_GENERATE, bb_of_msg(&u.base), md, 300, NULL, NULL, details, sizeof(details));
    dt = now_ms() - t0;
    CHECK(code == GRPC_STATUS_DEADLINE_EXCEEDED && dt < 2000,
          "deadline of a unary call: status %d after %lld ms", code, (long long)dt);
    CHECK(wait_for(core, fake_core_live, live, 2000),
          "deadline of a unary call: core request "
          "ended (%s)",
          fake_core_cancels(core) > cancels ? "rt_core_cancel" : "the core's own deadline");
    fake_core_set_token_delay_ms(core, 100);
}

/* A client with a 100 ms keepalive (gRPC sends about one ping a second)
 * during a 5 s call that sends nothing, as a long prefill does: the server
 * must not count the pings as abuse. With gRPC's default server policy (2
 * strikes, 5 min) this call dies after about 4 s, UNAVAILABLE "Too many
 * pings". */
static void test_keepalive(int port, rt_core_t *core)
{
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    grpc_arg args[4];
    memset(args, 0, sizeof(args));
    const char *keys[4] = {GRPC_ARG_KEEPALIVE_TIME_MS, GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                           GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA,
                           GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS};
    int values[4] = {100, 5000, 0, 1};
    for (int i = 0; i < 4; i++) {
        args[i].type = GRPC_ARG_INTEGER;
        args[i].key = (char *)keys[i];
        args[i].value.integer = values[i];
    }
    grpc_channel_args chargs = {.num_args = 4, .args = args};
    client_t cl;
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    cl.ch = grpc_channel_create(target, creds, &chargs);
    grpc_channel_credentials_release(creds);
    cl.cq = grpc_completion_queue_create_for_pluck(NULL);

    fake_core_set_token_delay_ms(core, 2500);
    Tandem__V1__GenerateRequest q = TANDEM__V1__GENERATE_REQUEST__INIT;
    q.prompt = "a long prefill";
    q.max_tokens = 2;
    md_pair_t md[] = {{"x-model-tier", "slow"}, {NULL, NULL}};
    char details[256] = "";
    int64_t t0 = now_ms();
    int code =
        unary(&cl, M_GENERATE, bb_of_msg(&q.base), md, 0, NULL, NULL, details, sizeof(details));
    CHECK(code == GRPC_STATUS_OK,
          "a %lld ms call without data while the client sends keepalive pings: status %d %s",
          (long long)(now_ms() - t0), code, details);
    fake_core_set_token_delay_ms(core, 100);
    client_close(&cl);
}

/* A server with an API key and a small message limit. */
static void test_auth_and_limits(rt_core_t *core)
{
    rt_grpc_config_t cfg;
    rt_grpc_config_default(&cfg);
    cfg.port = 0;
    cfg.api_key = "sekret";
    cfg.max_message_bytes = 64 * 1024;
    rt_grpc_t *srv = NULL;
    tdm_status_t st = rt_grpc_start(core, &cfg, &srv);
    CHECK(st == TDM_OK, "a second server with an API key starts (port %d)",
          st == TDM_OK ? rt_grpc_port(srv) : 0);
    if (st != TDM_OK)
        return;
    client_t cl;
    client_open(&cl, rt_grpc_port(srv));
    Tandem__V1__GenerateRequest q = TANDEM__V1__GENERATE_REQUEST__INIT;
    q.prompt = "hi";
    q.max_tokens = 3;
    expect_status(&cl, &q, NULL, GRPC_STATUS_UNAUTHENTICATED, "authorization", "no API key");
    md_pair_t wrong[] = {{"authorization", "Bearer sekreT"}, {NULL, NULL}};
    expect_status(&cl, &q, wrong, GRPC_STATUS_UNAUTHENTICATED, NULL, "a wrong API key");
    md_pair_t right[] = {{"authorization", "Bearer sekret"}, {NULL, NULL}};
    expect_status(&cl, &q, right, GRPC_STATUS_OK, NULL, "the right API key");
    fake_core_request_t last;
    CHECK(fake_core_last_request(core, &last) && strcmp(last.client, "sekret") == 0,
          "with API keys the core's client is the key presented");
    Tandem__V1__ListModelsRequest lq = TANDEM__V1__LIST_MODELS_REQUEST__INIT;
    int code = unary(&cl, M_MODELS, bb_of_msg(&lq.base), NULL, 0, NULL, NULL, NULL, 0);
    CHECK(code == GRPC_STATUS_UNAUTHENTICATED, "ListModels without the key: status %d", code);
    Tandem__V1__HealthRequest hq = TANDEM__V1__HEALTH_REQUEST__INIT;
    code = unary(&cl, M_HEALTH, bb_of_msg(&hq.base), NULL, 0, NULL, NULL, NULL, 0);
    CHECK(code == GRPC_STATUS_OK, "Health needs no key: status %d", code);

    size_t big_len = 100 * 1024;
    char *big = malloc(big_len + 1);
    memset(big, 'a', big_len);
    big[big_len] = '\0';
    Tandem__V1__GenerateRequest bq = q;
    bq.prompt = big;
    char details[256] = "";
    code = generate(&cl, &bq, right, NULL, details, sizeof(details));
    CHECK(code == GRPC_STATUS_RESOURCE_EXHAUSTED,
          "a request over max_message_bytes: status %d \"%s\"", code, details);
    free(big);
    expect_status(&cl, &q, right, GRPC_STATUS_OK, NULL, "the server still works after that");

    /* the port is taken: a server on it does not start */
    rt_grpc_config_t again = cfg;
    again.port = rt_grpc_port(srv);
    rt_grpc_t *srv2 = NULL;
    st = rt_grpc_start(core, &again, &srv2);
    CHECK(st == TDM_ERR_IO && srv2 == NULL, "a server on a port in use fails (%s)",
          tdm_status_str(st));
    if (srv2 != NULL)
        rt_grpc_stop(srv2);

    /* stopping with a stream in flight: it ends UNAVAILABLE, the core
     * request is cancelled, nothing waits */
    uint64_t live = fake_core_live(core);
    Tandem__V1__GenerateRequest sq = q;
    sq.model = "slow";
    sq.max_tokens = 200;
    call_t c;
    bool started = call_start(&c, &cl, M_STREAM, bb_of_msg(&sq.base), right, 0);
    grpc_byte_buffer *bb = started ? call_next(&c) : NULL;
    CHECK(bb != NULL, "a slow stream runs before the stop");
    if (bb != NULL)
        grpc_byte_buffer_destroy(bb);
    int64_t t0 = now_ms();
    rt_grpc_stop(srv);
    int64_t dt = now_ms() - t0;
    CHECK(fake_core_live(core) == live && dt < 3000,
          "rt_grpc_stop with a stream in flight: the core request ended, stop took %lld ms",
          (long long)dt);
    if (started) {
        while ((bb = call_next(&c)) != NULL)
            grpc_byte_buffer_destroy(bb);
        code = call_finish(&c);
        CHECK(code == GRPC_STATUS_UNAVAILABLE || code == GRPC_STATUS_CANCELLED,
              "the stream in flight ends with status %d (%s)", code, c.details_str);
    }
    client_close(&cl);
}

int main(void)
{
    char model[512];
    if (fake_core_mkmodel(model, sizeof(model)) != 0) {
        printf("skip: the test model cannot be made (build the tandem tool first)\n");
        return 77;
    }
    rt_core_t *core = NULL;
    if (fake_core_create(model, &core) != TDM_OK) {
        unlink(model);
        printf("FAIL fake_core_create\n");
        return 1;
    }
    grpc_init();
    rt_grpc_config_t cfg;
    rt_grpc_config_default(&cfg);
    cfg.port = 0;
    rt_grpc_t *srv = NULL;
    tdm_status_t st = rt_grpc_start(core, &cfg, &srv);
    CHECK(st == TDM_OK && rt_grpc_port(srv) > 0, "rt_grpc_start on port 0 -> port %d",
          st == TDM_OK ? rt_grpc_port(srv) : 0);
    if (st == TDM_OK) {
        client_t cl;
        client_open(&cl, rt_grpc_port(srv));
        test_models_health(&cl, core);
        test_generate(&cl, core);
        test_errors(&cl);
        test_admission(&cl, core);
        test_cancel(&cl, core);
        test_deadline(&cl, core);
        client_close(&cl);
        test_keepalive(rt_grpc_port(srv), core);
        test_auth_and_limits(core);
        rt_grpc_stop(srv);
        CHECK(fake_core_live(core) == 0, "no core request left after the stop");
    }
    fake_core_destroy(core);
    unlink(model);
    grpc_shutdown_blocking();
    if (n_fail > 0) {
        printf("FAIL: %d checks failed\n", n_fail);
        return 1;
    }
    printf("ok: all checks passed\n");
    return 0;
}
