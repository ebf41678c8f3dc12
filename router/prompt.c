/* tandem-router: prompts to token ids (see prompt.h). */
#include "prompt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tandem/utf8.h"

bool rt_utf8_valid(const char *s, size_t len, size_t *bad_at)
{
    size_t i = 0;
    while (i < len) {
        uint32_t cp;
        size_t n = tdm_utf8_decode((const uint8_t *)s + i, len - i, &cp);
        if (n == 0 || cp == 0) {
            if (bad_at != NULL)
                *bad_at = i;
            return false;
        }
        i += n;
    }
    return true;
}

static tdm_status_t tokenize(const rt_model_info_t *m, const char *text, size_t len, bool bos,
                             int32_t **out, size_t *n_out, char *err, size_t err_len)
{
    size_t cap = len + 8, n = 0, got = 0;
    int32_t *ids = malloc(cap * sizeof(int32_t));
    if (ids == NULL) {
        snprintf(err, err_len, "out of memory tokenizing %zu bytes", len);
        return TDM_ERR_NOMEM;
    }
    if (bos)
        ids[n++] = tdm_tokenizer_bos(m->tok);
    tdm_status_t st = tdm_tokenizer_encode(m->tok, text, len, true, ids + n, cap - n, &got);
    if (st != TDM_OK) {
        free(ids);
        snprintf(err, err_len, "cannot tokenize the prompt: %s", tdm_status_str(st));
        return st == TDM_ERR_NOMEM ? st : TDM_ERR_INVALID;
    }
    *out = ids;
    *n_out = n + got;
    return TDM_OK;
}

tdm_status_t rt_prompt_text(const rt_model_info_t *m, const char *text, size_t len, int32_t **out,
                            size_t *n_out, char *err, size_t err_len)
{
    size_t bad;
    if (!rt_utf8_valid(text, len, &bad)) {
        snprintf(err, err_len, "the prompt is not valid UTF-8 (at byte %zu)", bad);
        return TDM_ERR_INVALID;
    }
    bool bos = tdm_tokenizer_add_bos(m->tok) && tdm_tokenizer_bos(m->tok) >= 0;
    return tokenize(m, text, len, bos, out, n_out, err, err_len);
}

tdm_status_t rt_prompt_chat(const rt_model_info_t *m, const tdm_chat_msg_t *msgs, size_t n,
                            int32_t **out, size_t *n_out, char *err, size_t err_len)
{
    for (size_t i = 0; i < n; i++) {
        const char *r = msgs[i].role;
        if (r == NULL ||
            (strcmp(r, "system") != 0 && strcmp(r, "user") != 0 && strcmp(r, "assistant") != 0 &&
             strcmp(r, "developer") != 0 && strcmp(r, "tool") != 0)) {
            snprintf(err, err_len,
                     "messages[%zu].role must be system, user, assistant, "
                     "developer or tool",
                     i);
            return TDM_ERR_INVALID;
        }
        size_t bad;
        const char *c = msgs[i].content != NULL ? msgs[i].content : "";
        if (!rt_utf8_valid(c, strlen(c), &bad)) {
            snprintf(err, err_len, "messages[%zu].content is not valid UTF-8 (at byte %zu)", i,
                     bad);
            return TDM_ERR_INVALID;
        }
    }
    /* "developer" is OpenAI's newer name for the system role. */
    tdm_chat_msg_t *copy = malloc((n > 0 ? n : 1) * sizeof(*copy));
    if (copy == NULL) {
        snprintf(err, err_len, "out of memory");
        return TDM_ERR_NOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        copy[i] = msgs[i];
        if (strcmp(copy[i].role, "developer") == 0)
            copy[i].role = "system";
        if (copy[i].content == NULL)
            copy[i].content = "";
    }
    char *text = NULL;
    tdm_status_t st = tdm_chat_render(m->tmpl, m->default_system, copy, n, true, &text);
    free(copy);
    if (st != TDM_OK) {
        snprintf(err, err_len, "cannot render the chat template: %s", tdm_status_str(st));
        return st == TDM_ERR_NOMEM ? st : TDM_ERR_INVALID;
    }
    st = tokenize(m, text, strlen(text), false, out, n_out, err, err_len);
    free(text);
    return st;
}
