/* Chat templates: ChatML (SmolLM2's template) and Llama 3, rendered in C
 * exactly as their Jinja templates render (see include/tandem/tokenizer.h).
 *
 * No Jinja engine: the template text in the GGUF only chooses which of the
 * two is used and, for ChatML, supplies the default system prompt that
 * SmolLM2's template writes when the conversation has none. */
#include "tandem/log.h"
#include "tandem/tokenizer.h"
#include "tandem/utf8.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHAT_MOD "chat"

/* First occurrence of needle in [hay, hay + n), or NULL. */
static const char *find_bytes(const char *hay, size_t n, const char *needle)
{
    size_t m = strlen(needle);
    if (m == 0 || m > n)
        return m == 0 ? hay : NULL;
    for (size_t i = 0; i + m <= n; i++)
        if (hay[i] == needle[0] && memcmp(hay + i, needle, m) == 0)
            return hay + i;
    return NULL;
}

static bool vocab_has(const tdm_gguf_t *g, const char *text)
{
    const tdm_str_t *toks;
    uint64_t n;
    size_t len = strlen(text);
    if (!tdm_gguf_get_str_array(g, "tokenizer.ggml.tokens", &toks, &n))
        return false;
    for (uint64_t i = 0; i < n; i++)
        if (toks[i].len == len && memcmp(toks[i].ptr, text, len) == 0)
            return true;
    return false;
}

/* Extracts the default system prompt of a ChatML template: the text of a
 * string literal between "<|im_start|>system\n" and "<|im_end|>". The
 * newline may be a real one or the escape "\n" inside the literal. Returns
 * the unescaped length (written to out when it fits in cap with its NUL), 0
 * when the template has no such literal text, or (size_t)-1 when it does not
 * fit. */
static size_t extract_default_system(const char *tpl, size_t n, char *out, size_t cap)
{
    static const char *const heads[] = {"<|im_start|>system\n", "<|im_start|>system\\n"};
    for (size_t h = 0; h < 2; h++) {
        const char *from = tpl;
        const char *head;
        /* Every occurrence in turn: templates such as Qwen2.5's write the
         * header once with the user's system message and once with the
         * default. */
        for (; (head = find_bytes(from, n - (size_t)(from - tpl), heads[h])) != NULL;
             from = head + 1) {
            const char *start = head + strlen(heads[h]);
            const char *end = find_bytes(start, n - (size_t)(start - tpl), "<|im_end|>");
            if (end == NULL || end == start)
                continue;
            /* The literal's quote is the nearest quote before the head; if that
             * quote closes inside [start, end), the text between is an
             * expression (messages[0]['content'], a variable), not a default. */
            char quote = 0;
            for (const char *q = head; q > tpl; q--)
                if (q[-1] == '\'' || q[-1] == '"') {
                    quote = q[-1];
                    break;
                }
            bool literal = true;
            for (const char *q = start; q < end && literal; q++) {
                if (*q == '\\' && q + 1 < end)
                    q++;
                else if (quote != 0 && *q == quote)
                    literal = false;
                else if (*q == '{' && q + 1 < end && (q[1] == '{' || q[1] == '%'))
                    literal = false;
            }
            if (!literal)
                continue;
            /* Unescape the literal as Jinja reads it (Python string escapes). */
            size_t len = 0;
            for (const char *q = start; q < end; q++) {
                char ch = *q;
                if (ch == '\\' && q + 1 < end) {
                    char e = q[1];
                    if (e == 'n' || e == 't' || e == 'r' || e == '\\' || e == '\'' || e == '"') {
                        ch = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
                        q++;
                    }
                }
                if (len + 1 < cap)
                    out[len] = ch;
                len++;
            }
            if (len + 1 > cap)
                return (size_t)-1;
            out[len] = '\0';
            return len;
        }
    }
    return 0;
}

tdm_status_t tdm_chat_template_detect(const tdm_gguf_t *g, tdm_chat_template_t *tmpl,
                                      char *default_system, size_t default_system_cap)
{
    if (g == NULL || tmpl == NULL || (default_system == NULL && default_system_cap > 0))
        return TDM_ERR_INVALID;
    tdm_str_t tpl;
    bool have_tpl = tdm_gguf_get_str(g, "tokenizer.chat_template", &tpl);
    tdm_chat_template_t kind;
    size_t sys_len = 0;
    if (have_tpl && find_bytes(tpl.ptr, tpl.len, "<|start_header_id|>") != NULL) {
        kind = TDM_CHAT_TEMPLATE_LLAMA3;
    } else if (have_tpl && find_bytes(tpl.ptr, tpl.len, "<|im_start|>") != NULL) {
        kind = TDM_CHAT_TEMPLATE_CHATML;
        if (default_system_cap > 0) {
            sys_len = extract_default_system(tpl.ptr, tpl.len, default_system, default_system_cap);
            if (sys_len == (size_t)-1) {
                tdm_log_error(CHAT_MOD,
                              "the default system prompt of the chat template is longer than "
                              "the %zu bytes reserved for it",
                              default_system_cap - 1);
                return TDM_ERR_NOMEM;
            }
        }
    } else {
        if (have_tpl)
            tdm_log_warn(CHAT_MOD, "tokenizer.chat_template is neither ChatML nor Llama 3; "
                                   "choosing from the vocabulary");
        kind = vocab_has(g, "<|start_header_id|>") ? TDM_CHAT_TEMPLATE_LLAMA3
                                                   : TDM_CHAT_TEMPLATE_CHATML;
    }
    if (default_system_cap > 0 && sys_len == 0)
        default_system[0] = '\0';
    *tmpl = kind;
    return TDM_OK;
}

/* A growing output string. */
typedef struct chat_buf {
    char *p;
    size_t len, cap;
    bool failed;
} chat_buf_t;

static void buf_add(chat_buf_t *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (n > SIZE_MAX / 2 - b->len) {
        b->failed = true;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap > 0 ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_str(chat_buf_t *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

/* Python's str.isspace(), which Jinja's trim filter uses. */
static bool is_py_space(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 ||
           c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Jinja's `| trim`: strips Python whitespace at both ends. Bytes that are
 * not UTF-8 are not whitespace and stop the stripping. */
static void trim_span(const char *s, size_t *start, size_t *end)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t a = 0, b = strlen(s);
    while (a < b) {
        uint32_t cp;
        size_t l = tdm_utf8_decode(u + a, b - a, &cp);
        if (l == 0 || !is_py_space(cp))
            break;
        a += l;
    }
    while (b > a) {
        size_t k = b - 1;
        while (k > a && b - k < 4 && (u[k] & 0xc0) == 0x80)
            k--;
        uint32_t cp;
        size_t l = tdm_utf8_decode(u + k, b - k, &cp);
        if (l != b - k || !is_py_space(cp))
            break;
        b = k;
    }
    *start = a;
    *end = b;
}

tdm_status_t tdm_chat_render(tdm_chat_template_t tmpl, const char *default_system,
                             const tdm_chat_msg_t *msgs, size_t n, bool add_generation_prompt,
                             char **out)
{
    if (out == NULL || (msgs == NULL && n > 0) ||
        (tmpl != TDM_CHAT_TEMPLATE_CHATML && tmpl != TDM_CHAT_TEMPLATE_LLAMA3))
        return TDM_ERR_INVALID;
    for (size_t i = 0; i < n; i++)
        if (msgs[i].role == NULL || msgs[i].content == NULL)
            return TDM_ERR_INVALID;
    chat_buf_t b = {0};
    buf_add(&b, "", 0); /* an empty conversation still yields "" */
    /* Both templates only write the default prompt inside their message
     * loop (loop.first), so an empty conversation gets none. */
    bool add_default = n > 0 && strcmp(msgs[0].role, "system") != 0 && default_system != NULL &&
                       default_system[0] != '\0';
    if (tmpl == TDM_CHAT_TEMPLATE_CHATML) {
        if (add_default) {
            buf_str(&b, "<|im_start|>system\n");
            buf_str(&b, default_system);
            buf_str(&b, "<|im_end|>\n");
        }
        for (size_t i = 0; i < n; i++) {
            buf_str(&b, "<|im_start|>");
            buf_str(&b, msgs[i].role);
            buf_str(&b, "\n");
            buf_str(&b, msgs[i].content);
            buf_str(&b, "<|im_end|>\n");
        }
        if (add_generation_prompt)
            buf_str(&b, "<|im_start|>assistant\n");
    } else {
        /* The BOS text belongs to the first message: no messages, no BOS. */
        if (n > 0)
            buf_str(&b, "<|begin_of_text|>");
        for (size_t i = 0; i < n + (add_default ? 1 : 0); i++) {
            const char *role, *content;
            if (add_default && i == 0) {
                role = "system";
                content = default_system;
            } else {
                const tdm_chat_msg_t *m = &msgs[add_default ? i - 1 : i];
                role = m->role;
                content = m->content;
            }
            size_t a, z;
            trim_span(content, &a, &z);
            buf_str(&b, "<|start_header_id|>");
            buf_str(&b, role);
            buf_str(&b, "<|end_header_id|>\n\n");
            buf_add(&b, content + a, z - a);
            buf_str(&b, "<|eot_id|>");
        }
        if (add_generation_prompt)
            buf_str(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
    if (b.failed) {
        free(b.p);
        return TDM_ERR_NOMEM;
    }
    *out = b.p;
    return TDM_OK;
}
