/* A fake router core for front-end tests (see fake_core.h). */
#define _GNU_SOURCE
#include "fake_core.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tandem/gguf.h"
#include "tandem/log.h"
#include "tandem/net.h"
#include "tandem/utf8.h"

#define MOD "fake_core"

#define FC_DEFAULT_DELAY_MS 100
#define FC_MID_FAIL_AFTER   3 /* tokens before "fail-mid" fails */

typedef enum fc_mode {
    FC_MODE_NORMAL = 0,
    FC_MODE_FAIL,     /* error event at once */
    FC_MODE_FAIL_MID, /* error after FC_MID_FAIL_AFTER tokens */
    FC_MODE_SLOW,
    FC_MODE_REJECT, /* submit refuses */
} fc_mode_t;

typedef struct fc_model {
    rt_model_info_t info;
    fc_mode_t mode;
    int fail_status; /* FC_MODE_FAIL */
    bool listed;
} fc_model_t;

static const struct {
    const char *name;
    fc_mode_t mode;
    int status;
} fc_model_table[] = {
    {FAKE_CORE_MODEL, FC_MODE_NORMAL, 0},
    {"fail-400", FC_MODE_FAIL, 400},
    {"fail-500", FC_MODE_FAIL, 500},
    {"fail-503", FC_MODE_FAIL, 503},
    {"fail-504", FC_MODE_FAIL, 504},
    {"fail-mid", FC_MODE_FAIL_MID, 503},
    {"slow", FC_MODE_SLOW, 0},
    {"reject", FC_MODE_REJECT, 0},
};
#define FC_N_MODELS (sizeof(fc_model_table) / sizeof(fc_model_table[0]))

typedef struct fc_req {
    struct fc_req *next;
    uint64_t id;
    const fc_model_t *model;
    fc_mode_t mode;
    rt_event_cb_t cb;
    void *user;
    int32_t *prompt;
    size_t n_prompt;
    uint64_t base; /* prompt_sum * 31 + seed_mix + 100 */
    int32_t max_tokens;
    char **stop;
    size_t n_stop;
    int32_t *stop_ids;
    size_t n_stop_ids;
    bool logprobs;
    int32_t top_logprobs;
    int64_t deadline_ms;
    bool cancelled; /* under the core's lock */
    int64_t next_due_ms;
    int32_t n_out;
    /* text: raw token bytes not yet converted; clean valid UTF-8; sent of
     * clean already in events */
    char *raw;
    size_t raw_len, raw_cap;
    char *clean;
    size_t clean_len, clean_cap;
    size_t sent;
} fc_req_t;

struct rt_core {
    tdm_tokenizer_t *tok;
    char default_system[1024];
    fc_model_t models[FC_N_MODELS];
    int32_t n_vocab;

    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t thread;
    fc_req_t *head, *tail; /* live requests, round robin */
    bool stopping;
    bool ready;
    int delay_ms;
    uint64_t next_id;
    uint64_t n_submits, n_cancels, n_live;
    bool have_last;
    fake_core_request_t last;
};

/* ---- helpers ---- */

static int64_t fc_now_ms(void)
{
    return tdm_net_now_ms();
}

static bool fc_append(char **buf, size_t *len, size_t *cap, const char *s, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t c = *cap ? *cap : 64;
        while (c < *len + n + 1)
            c *= 2;
        char *b = realloc(*buf, c);
        if (b == NULL)
            return false;
        *buf = b;
        *cap = c;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
    return true;
}

static void fc_req_free(fc_req_t *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    free(r->stop_ids);
    free(r->prompt);
    free(r->raw);
    free(r->clean);
    free(r);
}

static const fc_model_t *fc_find_model(const rt_core_t *c, const char *name)
{
    if (name == NULL || name[0] == '\0')
        return &c->models[0];
    for (size_t i = 0; i < FC_N_MODELS; i++)
        if (strcmp(c->models[i].info.name, name) == 0)
            return &c->models[i];
    return NULL;
}

static bool fc_skip_token(const rt_core_t *c, int32_t id)
{
    tdm_token_type_t t = tdm_tokenizer_token_type(c->tok, id);
    return t == TDM_TOKEN_TYPE_CONTROL || t == TDM_TOKEN_TYPE_UNUSED ||
           tdm_tokenizer_is_eog(c->tok, id);
}

static int32_t fc_token_at(const rt_core_t *c, uint64_t pos)
{
    int32_t id = (int32_t)(pos % (uint64_t)c->n_vocab);
    for (int32_t k = 0; k < c->n_vocab && fc_skip_token(c, id); k++)
        id = (id + 1) % c->n_vocab;
    return id;
}

/* Moves the complete characters of raw into clean (invalid bytes as
 * U+FFFD); with flush, the incomplete tail too. */
static bool fc_clean_raw(fc_req_t *r, bool flush)
{
    size_t keep = flush ? 0 : tdm_utf8_incomplete_tail(r->raw, r->raw_len);
    size_t end = r->raw_len - keep, i = 0;
    while (i < end) {
        uint32_t cp;
        size_t n = tdm_utf8_decode((const uint8_t *)r->raw + i, end - i, &cp);
        if (n == 0) {
            if (!fc_append(&r->clean, &r->clean_len, &r->clean_cap, "\xEF\xBF\xBD", 3))
                return false;
            i++;
            continue;
        }
        if (!fc_append(&r->clean, &r->clean_len, &r->clean_cap, r->raw + i, n))
            return false;
        i += n;
    }
    memmove(r->raw, r->raw + end, keep);
    r->raw_len = keep;
    return true;
}

/* Finds the first stop string in clean: its offset, or -1. */
static long fc_find_stop(const fc_req_t *r)
{
    long best = -1;
    for (size_t i = 0; i < r->n_stop; i++) {
        const char *p = memmem(r->clean, r->clean_len, r->stop[i], strlen(r->stop[i]));
        if (p != NULL && (best < 0 || p - r->clean < best))
            best = p - r->clean;
    }
    return best;
}

/* How many bytes at the end of clean could begin a stop string. */
static size_t fc_stop_holdback(const fc_req_t *r)
{
    size_t hold = 0;
    for (size_t i = 0; i < r->n_stop; i++) {
        size_t sl = strlen(r->stop[i]);
        for (size_t k = sl - 1; k > hold; k--)
            if (k <= r->clean_len && memcmp(r->clean + r->clean_len - k, r->stop[i], k) == 0) {
                hold = k;
                break;
            }
    }
    return hold;
}

static void fc_emit(rt_core_t *c, fc_req_t *r, const char *text, size_t len,
                    const rt_token_info_t *ti, size_t n_ti, tdm_finish_reason_t finish, int status,
                    const char *error)
{
    (void)c;
    rt_event_t ev = {.id = r->id,
                     .text = text != NULL ? text : "",
                     .text_len = len,
                     .tokens = ti,
                     .n_tokens = n_ti,
                     .finish = finish,
                     .http_status = status,
                     .error = error,
                     .n_prompt = (int32_t)r->n_prompt,
                     .n_output = r->n_out,
                     .n_cached = (int32_t)(r->n_prompt / 2)};
    r->cb(r->user, &ev);
}

/* One step of a request, without the lock. Returns true when it sent its
 * final event. */
static bool fc_step(rt_core_t *c, fc_req_t *r, bool cancelled)
{
    if (cancelled) {
        fc_emit(c, r, "", 0, NULL, 0, TDM_FINISH_CANCELLED, 0, NULL);
        return true;
    }
    if (r->deadline_ms > 0 && fc_now_ms() >= r->deadline_ms) {
        fc_emit(c, r, "", 0, NULL, 0, TDM_FINISH_ERROR, 504, "the request's deadline passed");
        return true;
    }
    if (r->mode == FC_MODE_FAIL) {
        fc_emit(c, r, "", 0, NULL, 0, TDM_FINISH_ERROR, r->model->fail_status,
                "fake core: failure asked for by the model name");
        return true;
    }
    if (r->mode == FC_MODE_FAIL_MID && r->n_out >= FC_MID_FAIL_AFTER) {
        fc_emit(c, r, "", 0, NULL, 0, TDM_FINISH_ERROR, 503,
                "fake core: the node serving the request went away");
        return true;
    }

    int32_t tok = fc_token_at(c, r->base + (uint64_t)r->n_out * 7);
    r->n_out++;
    for (size_t i = 0; i < r->n_stop_ids; i++)
        if (r->stop_ids[i] == tok) {
            if (!fc_clean_raw(r, true)) {
                fc_emit(c, r, "", 0, NULL, 0, TDM_FINISH_ERROR, 500, "out of memory");
                return true;
            }
            long at = fc_find_stop(r);
            size_t end = at >= 0 ? (size_t)at : r->clean_len;
            fc_emit(c, r, r->clean + r->sent, end - r->sent, NULL, 0, TDM_FINISH_STOP, 0, NULL);
            return true;
        }

    rt_token_info_t ti;
    memset(&ti, 0, sizeof(ti));
    ti.token = tok;
    ti.logprob = -0.25f * (float)(1 + (r->n_out - 1) % 4);
    if (r->logprobs) {
        ti.n_top = r->top_logprobs;
        for (int32_t k = 0; k < ti.n_top; k++) {
            ti.top[k].token = k == 0 ? tok : fc_token_at(c, (uint64_t)tok + (uint64_t)k);
            ti.top[k].logprob = ti.logprob - 0.5f * (float)k;
        }
    }

    char bytes[256];
    size_t nb = tdm_tokenizer_token_bytes(c->tok, tok, false, bytes, sizeof(bytes));
    if (nb > sizeof(bytes))
        nb = sizeof(bytes);
    bool length = r->n_out >= r->max_tokens;
    if (!fc_append(&r->raw, &r->raw_len, &r->raw_cap, bytes, nb) || !fc_clean_raw(r, length)) {
        fc_emit(c, r, "", 0, NULL, 0, TDM_FINISH_ERROR, 500, "out of memory");
        return true;
    }
    long at = fc_find_stop(r);
    size_t end;
    tdm_finish_reason_t fin = TDM_FINISH_NONE;
    if (at >= 0) {
        end = (size_t)at;
        fin = TDM_FINISH_STOP;
    } else if (length) {
        end = r->clean_len;
        fin = TDM_FINISH_LENGTH;
    } else {
        end = r->clean_len - fc_stop_holdback(r);
    }
    if (end < r->sent)
        end = r->sent;
    size_t from = r->sent;
    r->sent = end;
    fc_emit(c, r, r->clean + from, end - from, r->logprobs ? &ti : NULL, r->logprobs ? 1 : 0, fin,
            0, NULL);
    return fin != TDM_FINISH_NONE;
}

static void fc_unlink(rt_core_t *c, fc_req_t *r)
{
    fc_req_t **pp = &c->head, *prev = NULL;
    while (*pp != NULL && *pp != r) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (*pp == NULL)
        return;
    *pp = r->next;
    if (c->tail == r)
        c->tail = prev;
    r->next = NULL;
}

static void *fc_thread(void *arg)
{
    rt_core_t *c = arg;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        if (c->head == NULL) {
            if (c->stopping)
                break;
            pthread_cond_wait(&c->wake, &c->lock);
            continue;
        }
        int64_t now = fc_now_ms(), earliest = INT64_MAX;
        fc_req_t *r = c->head;
        for (; r != NULL; r = r->next) {
            int64_t due = r->next_due_ms;
            if (r->deadline_ms > 0 && r->deadline_ms < due)
                due = r->deadline_ms;
            if (r->cancelled || due <= now)
                break;
            if (due < earliest)
                earliest = due;
        }
        if (r == NULL) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            int64_t wait = earliest - now;
            ts.tv_sec += wait / 1000;
            ts.tv_nsec += (wait % 1000) * 1000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&c->wake, &c->lock, &ts);
            continue;
        }
        /* to the tail: round robin */
        fc_unlink(c, r);
        if (c->tail != NULL)
            c->tail->next = r;
        else
            c->head = r;
        c->tail = r;
        bool cancelled = r->cancelled;
        int delay = c->delay_ms;
        pthread_mutex_unlock(&c->lock);

        bool done = fc_step(c, r, cancelled);

        pthread_mutex_lock(&c->lock);
        if (done) {
            fc_unlink(c, r);
            c->n_live--;
            fc_req_free(r);
        } else if (r->mode == FC_MODE_SLOW) {
            r->next_due_ms = fc_now_ms() + delay;
        }
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

/* ---- core.h ---- */

const rt_model_info_t *rt_core_model(rt_core_t *core, const char *name)
{
    const fc_model_t *m = fc_find_model(core, name);
    return m != NULL ? &m->info : NULL;
}

size_t rt_core_models(rt_core_t *core, const rt_model_info_t **out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < FC_N_MODELS; i++)
        if (core->models[i].listed) {
            if (n < cap)
                out[n] = &core->models[i].info;
            n++;
        }
    return n;
}

tdm_status_t rt_core_submit(rt_core_t *core, const rt_params_t *p, rt_event_cb_t cb, void *user,
                            uint64_t *id_out, char *err, size_t err_len)
{
    const fc_model_t *m = fc_find_model(core, p->model);
    if (m == NULL) {
        snprintf(err, err_len, "the model `%s` does not exist", p->model);
        return TDM_ERR_INVALID;
    }
    if (m->mode == FC_MODE_REJECT) {
        snprintf(err, err_len, "fake core: request rejected by the model name");
        return TDM_ERR_INVALID;
    }
    if (p->tier != NULL && strcmp(p->tier, "full") == 0) {
        snprintf(err, err_len, "fake core: over a queue limit (client %s)",
                 p->client != NULL ? p->client : "");
        return TDM_ERR_BUSY;
    }
    if (p->n_prompt == 0 || p->prompt == NULL) {
        snprintf(err, err_len, "the prompt is empty");
        return TDM_ERR_INVALID;
    }
    for (size_t i = 0; i < p->n_prompt; i++)
        if (p->prompt[i] < 0 || p->prompt[i] >= core->n_vocab) {
            snprintf(err, err_len, "prompt token %zu (%d) is outside the vocabulary (0..%d)", i,
                     p->prompt[i], core->n_vocab - 1);
            return TDM_ERR_INVALID;
        }
    if (p->max_tokens <= 0) {
        snprintf(err, err_len, "max_tokens must be at least 1, got %d", p->max_tokens);
        return TDM_ERR_INVALID;
    }
    if (p->n_stop > RT_MAX_STOP) {
        snprintf(err, err_len, "at most %d stop strings", RT_MAX_STOP);
        return TDM_ERR_INVALID;
    }
    if (p->top_logprobs < 0 || p->top_logprobs > RT_MAX_TOP_LOGPROBS) {
        snprintf(err, err_len, "top_logprobs must be in 0..%d", RT_MAX_TOP_LOGPROBS);
        return TDM_ERR_INVALID;
    }
    if (tdm_sampling_params_validate(&p->sampling, err, err_len) != TDM_OK)
        return TDM_ERR_INVALID;

    fc_req_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        goto err_nomem;
    r->prompt = malloc(p->n_prompt * sizeof(int32_t));
    r->stop = calloc(p->n_stop + 1, sizeof(char *));
    r->stop_ids = malloc((p->n_stop_token_ids + 1) * sizeof(int32_t));
    if (r->prompt == NULL || r->stop == NULL || r->stop_ids == NULL ||
        !fc_append(&r->raw, &r->raw_len, &r->raw_cap, "", 0) ||
        !fc_append(&r->clean, &r->clean_len, &r->clean_cap, "", 0))
        goto err_free_req;
    memcpy(r->prompt, p->prompt, p->n_prompt * sizeof(int32_t));
    r->n_prompt = p->n_prompt;
    for (size_t i = 0; i < p->n_stop; i++) {
        if (p->stop[i] == NULL || p->stop[i][0] == '\0')
            continue;
        r->stop[r->n_stop] = strdup(p->stop[i]);
        if (r->stop[r->n_stop] == NULL)
            goto err_free_req;
        r->n_stop++;
    }
    if (p->n_stop_token_ids > 0)
        memcpy(r->stop_ids, p->stop_token_ids, p->n_stop_token_ids * sizeof(int32_t));
    r->n_stop_ids = p->n_stop_token_ids;
    uint64_t sum = 0;
    for (size_t i = 0; i < p->n_prompt; i++)
        sum += (uint64_t)p->prompt[i];
    uint64_t seed_mix =
        p->sampling.has_seed && p->sampling.temperature > 0 ? p->sampling.seed * 13 : 0;
    r->base = sum * 31 + seed_mix + 100;
    int32_t room = m->info.max_model_len - (int32_t)p->n_prompt;
    r->max_tokens = p->max_tokens < room ? p->max_tokens : room;
    if (r->max_tokens < 1)
        r->max_tokens = 1;
    r->model = m;
    r->mode = m->mode;
    if (p->tier != NULL && strcmp(p->tier, "slow") == 0 && r->mode == FC_MODE_NORMAL)
        r->mode = FC_MODE_SLOW;
    r->logprobs = p->logprobs || p->top_logprobs > 0;
    r->top_logprobs = p->top_logprobs;
    r->deadline_ms = p->deadline_ms;
    r->cb = cb;
    r->user = user;

    pthread_mutex_lock(&core->lock);
    if (core->stopping) {
        pthread_mutex_unlock(&core->lock);
        snprintf(err, err_len, "the core is stopping");
        fc_req_free(r);
        return TDM_ERR_CANCELLED;
    }
    r->id = ++core->next_id;
    r->next_due_ms = r->mode == FC_MODE_SLOW ? fc_now_ms() + core->delay_ms : 0;
    if (core->tail != NULL)
        core->tail->next = r;
    else
        core->head = r;
    core->tail = r;
    core->n_submits++;
    core->n_live++;
    fake_core_request_t *l = &core->last;
    memset(l, 0, sizeof(*l));
    l->id = r->id;
    snprintf(l->model, sizeof(l->model), "%s", m->info.name);
    snprintf(l->tier, sizeof(l->tier), "%s", p->tier != NULL ? p->tier : "");
    snprintf(l->client, sizeof(l->client), "%s", p->client != NULL ? p->client : "");
    snprintf(l->request_id, sizeof(l->request_id), "%s",
             p->request_id != NULL ? p->request_id : "");
    l->n_prompt = p->n_prompt;
    for (size_t i = 0; i < p->n_prompt && i < 16; i++)
        l->prompt[i] = p->prompt[i];
    l->sampling = p->sampling;
    l->max_tokens = p->max_tokens;
    l->n_stop = p->n_stop;
    l->n_stop_token_ids = p->n_stop_token_ids;
    l->ignore_eos = p->ignore_eos;
    l->logprobs = p->logprobs;
    l->top_logprobs = p->top_logprobs;
    l->deadline_ms = p->deadline_ms;
    core->have_last = true;
    uint64_t id = r->id;
    pthread_cond_signal(&core->wake);
    pthread_mutex_unlock(&core->lock);
    *id_out = id;
    return TDM_OK;

err_free_req:
    fc_req_free(r);
err_nomem:
    snprintf(err, err_len, "out of memory");
    return TDM_ERR_NOMEM;
}

void rt_core_cancel(rt_core_t *core, uint64_t id)
{
    pthread_mutex_lock(&core->lock);
    for (fc_req_t *r = core->head; r != NULL; r = r->next)
        if (r->id == id) {
            if (!r->cancelled) {
                r->cancelled = true;
                core->n_cancels++;
                pthread_cond_signal(&core->wake);
            }
            break;
        }
    pthread_mutex_unlock(&core->lock);
}

bool rt_core_ready(rt_core_t *core, char *reason, size_t cap)
{
    pthread_mutex_lock(&core->lock);
    bool ready = core->ready;
    pthread_mutex_unlock(&core->lock);
    snprintf(reason, cap, "%s", ready ? "ok" : "fake core: no node (set by the test)");
    return ready;
}

/* ---- fake_core.h ---- */

int fake_core_mkmodel(char *out, size_t cap)
{
    static unsigned counter;
    const char *dir = getenv("TANDEM_BIN_DIR");
    char bin[1024];
    snprintf(bin, sizeof(bin), "%s/tandem", dir != NULL ? dir : "build/bin");
    if (access(bin, X_OK) != 0) {
        fprintf(stderr,
                "fake_core: %s not found (%s); build the tandem tool or set TANDEM_BIN_DIR\n", bin,
                strerror(errno));
        return -1;
    }
    snprintf(out, cap, "/tmp/tandem-fake-core-%d-%u.gguf", (int)getpid(),
             __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED));
    char cmd[2300];
    snprintf(cmd, sizeof(cmd), "'%s' mkmodel -o '%s' >/dev/null 2>&1", bin, out);
    int rc = system(cmd);
    struct stat sb;
    if (rc != 0 || stat(out, &sb) != 0) {
        fprintf(stderr, "fake_core: `%s` failed (status %d)\n", cmd, rc);
        unlink(out);
        return -1;
    }
    return 0;
}

tdm_status_t fake_core_create(const char *model_path, rt_core_t **out)
{
    char err[512] = "";
    tdm_gguf_t *g = NULL;
    tdm_status_t st = tdm_gguf_open(model_path, true, err, sizeof(err), &g);
    if (st != TDM_OK) {
        tdm_log_error(MOD, "cannot open %s: %s", model_path, err);
        return st;
    }
    rt_core_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        st = TDM_ERR_NOMEM;
        goto err_close_gguf;
    }
    st = tdm_tokenizer_create(g, err, sizeof(err), &c->tok);
    if (st != TDM_OK) {
        tdm_log_error(MOD, "cannot load the tokenizer of %s: %s", model_path, err);
        goto err_free_core;
    }
    tdm_chat_template_t tmpl = TDM_CHAT_TEMPLATE_CHATML;
    st = tdm_chat_template_detect(g, &tmpl, c->default_system, sizeof(c->default_system));
    if (st != TDM_OK) {
        tdm_log_error(MOD, "cannot find the chat template of %s: %s", model_path,
                      tdm_status_str(st));
        goto err_destroy_tok;
    }
    c->n_vocab = tdm_tokenizer_n_vocab(c->tok);
    for (size_t i = 0; i < FC_N_MODELS; i++) {
        fc_model_t *m = &c->models[i];
        m->info = (rt_model_info_t){.name = fc_model_table[i].name,
                                    .tok = c->tok,
                                    .tmpl = tmpl,
                                    .default_system = c->default_system,
                                    .max_model_len = FAKE_CORE_MAX_MODEL_LEN,
                                    .created = FAKE_CORE_CREATED};
        m->mode = fc_model_table[i].mode;
        m->fail_status = fc_model_table[i].status;
        m->listed = i == 0;
    }
    c->ready = true;
    c->delay_ms = FC_DEFAULT_DELAY_MS;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->wake, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&c->lock, NULL);
    if (pthread_create(&c->thread, NULL, fc_thread, c) != 0) {
        tdm_log_error(MOD, "cannot start the fake core's thread");
        st = TDM_ERR_INTERNAL;
        goto err_destroy_sync;
    }
    tdm_gguf_close(g);
    *out = c;
    return TDM_OK;

err_destroy_sync:
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->wake);
err_destroy_tok:
    tdm_tokenizer_destroy(c->tok);
err_free_core:
    free(c);
err_close_gguf:
    tdm_gguf_close(g);
    return st;
}

void fake_core_destroy(rt_core_t *core)
{
    if (core == NULL)
        return;
    pthread_mutex_lock(&core->lock);
    core->stopping = true;
    for (fc_req_t *r = core->head; r != NULL; r = r->next)
        r->cancelled = true;
    pthread_cond_signal(&core->wake);
    pthread_mutex_unlock(&core->lock);
    pthread_join(core->thread, NULL);
    pthread_mutex_destroy(&core->lock);
    pthread_cond_destroy(&core->wake);
    tdm_tokenizer_destroy(core->tok);
    free(core);
}

void fake_core_set_ready(rt_core_t *core, bool ready)
{
    pthread_mutex_lock(&core->lock);
    core->ready = ready;
    pthread_mutex_unlock(&core->lock);
}

void fake_core_set_token_delay_ms(rt_core_t *core, int ms)
{
    pthread_mutex_lock(&core->lock);
    core->delay_ms = ms < 0 ? 0 : ms;
    pthread_mutex_unlock(&core->lock);
}

static uint64_t fc_read(rt_core_t *core, const uint64_t *field)
{
    pthread_mutex_lock(&core->lock);
    uint64_t v = *field;
    pthread_mutex_unlock(&core->lock);
    return v;
}

uint64_t fake_core_submits(rt_core_t *core)
{
    return fc_read(core, &core->n_submits);
}

uint64_t fake_core_cancels(rt_core_t *core)
{
    return fc_read(core, &core->n_cancels);
}

uint64_t fake_core_live(rt_core_t *core)
{
    return fc_read(core, &core->n_live);
}

bool fake_core_last_request(rt_core_t *core, fake_core_request_t *out)
{
    pthread_mutex_lock(&core->lock);
    bool have = core->have_last;
    if (have)
        *out = core->last;
    pthread_mutex_unlock(&core->lock);
    return have;
}
