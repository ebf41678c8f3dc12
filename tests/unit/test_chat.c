/* Unit test of the chat templates: exact rendered strings for ChatML
 * (SmolLM2's template, with and without a system message and a default
 * prompt) and Llama 3 (with its trim), then template detection from GGUF
 * metadata built with the writer, then the default model if present.
 * Prints "N passed, M failed"; exits 0 only when all pass. */
#include "tandem/gguf.h"
#include "tandem/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#define SMOL_DEFAULT "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

/* SmolLM2-135M-Instruct's tokenizer.chat_template, byte for byte. */
static const char smol_template[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\n' }}{% endif %}";

/* Meta-Llama-3-8B-Instruct's template. */
static const char llama3_template[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
    "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/* A ChatML template without a default prompt. */
static const char chatml_plain_template[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
    "}}{% endif %}";

/* Qwen2.5's shape: the system header first with the user's message, then
 * with the default; escapes written as in tokenizer_config.json. */
static const char qwen_like_template[] =
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
    "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are "
    "Qwen, created by Alibaba Cloud. You\\'re a helpful assistant.<|im_end|>\\n' }}{%- endif "
    "%}{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content "
    "+ '<|im_end|>' + '\\n' }}{%- endfor %}";

static void expect_render(tdm_chat_template_t tmpl, const char *def, const tdm_chat_msg_t *msgs,
                          size_t n, bool gen, const char *want, const char *what)
{
    char *out = NULL;
    tdm_status_t st = tdm_chat_render(tmpl, def, msgs, n, gen, &out);
    int ok = st == TDM_OK && out != NULL && strcmp(out, want) == 0;
    if (!ok)
        fprintf(stderr, "%s:\n  want [%s]\n  got  [%s] (status %d)\n", what, want,
                out != NULL ? out : "(null)", st);
    CHECK(ok, "%s", what);
    free(out);
}

static void test_chatml(void)
{
    const tdm_chat_template_t C = TDM_CHAT_TEMPLATE_CHATML;
    tdm_chat_msg_t user[] = {{"user", "What is 2+2?"}};
    expect_render(C, SMOL_DEFAULT, user, 1, true,
                  "<|im_start|>system\n" SMOL_DEFAULT "<|im_end|>\n"
                  "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                  "<|im_start|>assistant\n",
                  "chatml: default system prompt added");
    expect_render(C, SMOL_DEFAULT, user, 1, false,
                  "<|im_start|>system\n" SMOL_DEFAULT "<|im_end|>\n"
                  "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
                  "chatml: no generation prompt");
    tdm_chat_msg_t sys[] = {{"system", "Answer in French."},
                            {"user", "Hello"},
                            {"assistant", "Bonjour !"},
                            {"user", " spaces kept \n"}};
    expect_render(C, SMOL_DEFAULT, sys, 4, true,
                  "<|im_start|>system\nAnswer in French.<|im_end|>\n"
                  "<|im_start|>user\nHello<|im_end|>\n"
                  "<|im_start|>assistant\nBonjour !<|im_end|>\n"
                  "<|im_start|>user\n spaces kept \n<|im_end|>\n"
                  "<|im_start|>assistant\n",
                  "chatml: system message given, default unused, content untouched");
    expect_render(C, NULL, user, 1, true,
                  "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                  "chatml: no default (NULL)");
    expect_render(C, "", user, 1, false, "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
                  "chatml: no default (empty)");
    expect_render(C, SMOL_DEFAULT, NULL, 0, true, "<|im_start|>assistant\n",
                  "chatml: no messages, generation prompt only");
    expect_render(C, SMOL_DEFAULT, NULL, 0, false, "", "chatml: nothing at all");
    tdm_chat_msg_t asst[] = {{"assistant", "Hi."}};
    expect_render(C, "Be kind.", asst, 1, false,
                  "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>assistant\nHi.<|im_end|>\n",
                  "chatml: default before a first assistant message");
}

static void test_llama3(void)
{
    const tdm_chat_template_t L = TDM_CHAT_TEMPLATE_LLAMA3;
    tdm_chat_msg_t msgs[] = {
        {"system", "  You are terse.\n"}, {"user", "\n\t Hi there \r\n"}, {"assistant", "Hello."}};
    expect_render(L, NULL, msgs, 3, true,
                  "<|begin_of_text|>"
                  "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
                  "llama3: trimmed contents, generation prompt");
    tdm_chat_msg_t user[] = {{"user", "What is 2+2?"}};
    expect_render(L, NULL, user, 1, false,
                  "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is "
                  "2+2?<|eot_id|>",
                  "llama3: one message");
    /* Python's str.strip() takes Unicode whitespace (NBSP, ideographic
     * space, U+2028) but leaves U+200B (zero width space, not whitespace). */
    tdm_chat_msg_t uni[] = {{"user", "\xc2\xa0\xe3\x80\x80hi\xe2\x80\xa8 \xe2\x80\x8b"}};
    expect_render(L, NULL, uni, 1, false,
                  "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi\xe2\x80\xa8 "
                  "\xe2\x80\x8b<|eot_id|>",
                  "llama3: unicode trim");
    tdm_chat_msg_t blank[] = {{"user", " \n\t "}};
    expect_render(L, NULL, blank, 1, true,
                  "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
                  "llama3: blank content trims to nothing");
    expect_render(L, NULL, NULL, 0, true, "<|start_header_id|>assistant<|end_header_id|>\n\n",
                  "llama3: no messages, no BOS");
    expect_render(L, "Be brief.", user, 1, false,
                  "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe "
                  "brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is "
                  "2+2?<|eot_id|>",
                  "llama3: a default system prompt, when given");
    /* Invalid UTF-8 stops the trimming instead of being misread. */
    tdm_chat_msg_t bad[] = {{"user", " \xff x \xe3\x80"}};
    expect_render(L, NULL, bad, 1, false,
                  "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n\xff x "
                  "\xe3\x80<|eot_id|>",
                  "llama3: invalid UTF-8 is not whitespace");
}

static void test_invalid(void)
{
    char *out = (char *)"untouched";
    tdm_chat_msg_t no_role[] = {{NULL, "x"}};
    tdm_chat_msg_t no_content[] = {{"user", NULL}};
    CHECK(tdm_chat_render(TDM_CHAT_TEMPLATE_CHATML, NULL, no_role, 1, true, &out) ==
                  TDM_ERR_INVALID &&
              strcmp(out, "untouched") == 0,
          "NULL role");
    CHECK(tdm_chat_render(TDM_CHAT_TEMPLATE_LLAMA3, NULL, no_content, 1, true, &out) ==
              TDM_ERR_INVALID,
          "NULL content");
    CHECK(tdm_chat_render((tdm_chat_template_t)7, NULL, NULL, 0, true, &out) == TDM_ERR_INVALID,
          "unknown template");
    CHECK(tdm_chat_render(TDM_CHAT_TEMPLATE_CHATML, NULL, NULL, 1, true, &out) == TDM_ERR_INVALID,
          "NULL messages");
    CHECK(tdm_chat_render(TDM_CHAT_TEMPLATE_CHATML, NULL, NULL, 0, true, NULL) == TDM_ERR_INVALID,
          "NULL out");
}

/* Opens a GGUF made of an optional template and a token list. */
static tdm_gguf_t *make_gguf(const char *tmpl, const char *const *toks, size_t n, void **buf)
{
    tdm_gguf_writer_t *w;
    if (tdm_gguf_writer_create(&w) != TDM_OK)
        return NULL;
    if (tmpl != NULL)
        tdm_gguf_writer_set_str(w, "tokenizer.chat_template", tmpl);
    if (toks != NULL)
        tdm_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", toks, n);
    size_t len = 0;
    tdm_status_t st = tdm_gguf_writer_write_memory(w, buf, &len);
    tdm_gguf_writer_destroy(w);
    if (st != TDM_OK)
        return NULL;
    tdm_gguf_t *g = NULL;
    char err[256];
    if (tdm_gguf_open_memory(*buf, len, true, err, sizeof(err), &g) != TDM_OK) {
        fprintf(stderr, "open_memory: %s\n", err);
        free(*buf);
        return NULL;
    }
    return g;
}

static void expect_detect(const char *tmpl, const char *const *toks, size_t n,
                          tdm_chat_template_t want, const char *want_default, const char *what)
{
    void *buf = NULL;
    tdm_gguf_t *g = make_gguf(tmpl, toks, n, &buf);
    CHECK(g != NULL, "%s: gguf", what);
    if (g == NULL)
        return;
    tdm_chat_template_t got = (tdm_chat_template_t)-1;
    char def[256];
    memset(def, 'x', sizeof(def));
    tdm_status_t st = tdm_chat_template_detect(g, &got, def, sizeof(def));
    int ok = st == TDM_OK && got == want && strcmp(def, want_default) == 0;
    if (!ok)
        fprintf(stderr, "%s: status %d, template %d (want %d), default [%s] (want [%s])\n", what,
                st, got, want, st == TDM_OK ? def : "", want_default);
    CHECK(ok, "%s", what);
    tdm_gguf_close(g);
    free(buf);
}

static void test_detect(void)
{
    static const char *const llama_vocab[] = {"a", "<|begin_of_text|>", "<|start_header_id|>",
                                              "<|end_header_id|>", "<|eot_id|>"};
    static const char *const smol_vocab[] = {"a", "<|im_start|>", "<|im_end|>"};
    expect_detect(smol_template, smol_vocab, 3, TDM_CHAT_TEMPLATE_CHATML, SMOL_DEFAULT,
                  "SmolLM2 template: ChatML with its default prompt");
    expect_detect(llama3_template, llama_vocab, 5, TDM_CHAT_TEMPLATE_LLAMA3, "",
                  "Llama 3 template");
    expect_detect(chatml_plain_template, NULL, 0, TDM_CHAT_TEMPLATE_CHATML, "",
                  "ChatML template without a default");
    expect_detect(qwen_like_template, NULL, 0, TDM_CHAT_TEMPLATE_CHATML,
                  "You are Qwen, created by Alibaba Cloud. You're a helpful assistant.",
                  "escaped template: the literal default, not the expression");
    expect_detect(NULL, llama_vocab, 5, TDM_CHAT_TEMPLATE_LLAMA3, "",
                  "no template, Llama 3 vocabulary");
    expect_detect(NULL, smol_vocab, 3, TDM_CHAT_TEMPLATE_CHATML, "",
                  "no template, other vocabulary");
    expect_detect(NULL, NULL, 0, TDM_CHAT_TEMPLATE_CHATML, "", "no template, no vocabulary");
    expect_detect("{{ messages }}", llama_vocab, 5, TDM_CHAT_TEMPLATE_LLAMA3, "",
                  "unknown template: chosen from the vocabulary");

    /* A default that does not fit the caller's buffer is an error, not a
     * silently shortened prompt; NULL/0 skips the extraction. */
    void *buf = NULL;
    tdm_gguf_t *g = make_gguf(smol_template, NULL, 0, &buf);
    if (g != NULL) {
        tdm_chat_template_t got = TDM_CHAT_TEMPLATE_LLAMA3;
        char small[16];
        CHECK(tdm_chat_template_detect(g, &got, small, sizeof(small)) == TDM_ERR_NOMEM &&
                  got == TDM_CHAT_TEMPLATE_LLAMA3,
              "default longer than the buffer");
        CHECK(tdm_chat_template_detect(g, &got, NULL, 0) == TDM_OK &&
                  got == TDM_CHAT_TEMPLATE_CHATML,
              "no buffer for the default");
        CHECK(tdm_chat_template_detect(NULL, &got, NULL, 0) == TDM_ERR_INVALID, "NULL gguf");
        tdm_gguf_close(g);
        free(buf);
    }
}

static void test_model(void)
{
    char path[4096] = "";
    const char *home = getenv("TANDEM_HOME");
    if (home != NULL && home[0] != '\0')
        snprintf(path, sizeof(path), "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", home);
    else if ((home = getenv("HOME")) != NULL)
        snprintf(path, sizeof(path), "%s/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 home);
    FILE *f = path[0] != '\0' ? fopen(path, "rb") : NULL;
    if (f == NULL) {
        printf("default model part skipped: %s not present\n", path[0] ? path : "(no HOME)");
        return;
    }
    fclose(f);
    char err[512];
    tdm_gguf_t *g;
    if (tdm_gguf_open(path, true, err, sizeof(err), &g) != TDM_OK) {
        CHECK(0, "open %s: %s", path, err);
        return;
    }
    tdm_chat_template_t tmpl;
    char def[512];
    tdm_status_t st = tdm_chat_template_detect(g, &tmpl, def, sizeof(def));
    CHECK(st == TDM_OK && tmpl == TDM_CHAT_TEMPLATE_CHATML && strcmp(def, SMOL_DEFAULT) == 0,
          "SmolLM2 model: ChatML with default '%s'", st == TDM_OK ? def : "");
    tdm_gguf_close(g);
}

int main(void)
{
    test_chatml();
    test_llama3();
    test_invalid();
    test_detect();
    test_model();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
