/* libFuzzer target: the tokenizer on arbitrary bytes.
 *
 * The StarCoder vocabulary is loaded once, from $TANDEM_FUZZ_VOCAB or else
 * ../shared/testdata/tokenizer/ggml-vocab-starcoder.gguf relative to the
 * working directory. For every input, with parse_special off and on:
 * encode, decode, and abort unless the decoded bytes are the input less the
 * bytes the vocabulary has no token for (0xC0, 0xC1, 0xF1, 0xF5..0xFF in
 * this one, which the tokenizer drops). The input also goes through both
 * chat templates as a message, which must not fail.
 *
 * Build (clang): -fsanitize=fuzzer,address,undefined; seeds in
 * tests/fuzz/corpus/tokenizer/. */
#include "tandem/gguf.h"
#include "tandem/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static tdm_tokenizer_t *tok;
static bool covered[256]; /* bytes whose byte-alphabet stand-in is a token */

static void load_once(void)
{
    if (tok != NULL)
        return;
    const char *path = getenv("TANDEM_FUZZ_VOCAB");
    if (path == NULL || path[0] == '\0')
        path = "../shared/testdata/tokenizer/ggml-vocab-starcoder.gguf";
    char err[512] = "";
    tdm_gguf_t *g;
    if (tdm_gguf_open(path, true, err, sizeof(err), &g) != TDM_OK) {
        fprintf(stderr, "fuzz_tokenizer: cannot open %s (set TANDEM_FUZZ_VOCAB): %s\n", path, err);
        abort();
    }
    tdm_status_t st = tdm_tokenizer_create(g, err, sizeof(err), &tok);
    tdm_gguf_close(g);
    if (st != TDM_OK) {
        fprintf(stderr, "fuzz_tokenizer: cannot build the tokenizer: %s\n", err);
        abort();
    }
    /* The stand-in of each byte, encoded alone, is one token when the
     * vocabulary has it; a byte without one encodes to nothing. */
    for (unsigned b = 0; b < 256; b++) {
        char c = (char)b;
        int32_t id[4];
        size_t n = 0;
        if (tdm_tokenizer_encode(tok, &c, 1, false, id, 4, &n) != TDM_OK || n > 1)
            abort();
        covered[b] = n == 1;
    }
}

static void check(const uint8_t *data, size_t size, bool special, const char *want, size_t want_len)
{
    size_t n = 0;
    tdm_status_t st = tdm_tokenizer_encode(tok, (const char *)data, size, special, NULL, 0, &n);
    if (st != TDM_OK && st != TDM_ERR_NOMEM)
        abort();
    if (st == TDM_OK && n != 0)
        abort(); /* cap 0 with tokens must say NOMEM */
    int32_t *ids = malloc((n > 0 ? n : 1) * sizeof(*ids));
    size_t n2 = 0;
    if (ids == NULL ||
        tdm_tokenizer_encode(tok, (const char *)data, size, special, ids, n, &n2) != TDM_OK ||
        n2 != n)
        abort();
    char *out = malloc(size + 1);
    size_t len = 0;
    if (out == NULL || tdm_tokenizer_decode(tok, ids, n, special, out, size + 1, &len) != TDM_OK)
        abort();
    if (len != want_len || memcmp(out, want, len) != 0 || out[len] != '\0') {
        fprintf(stderr, "round trip mismatch (parse_special=%d): %zu bytes in, %zu out\n", special,
                size, len);
        abort();
    }
    /* Hidden control tokens can only shorten the text. */
    if (tdm_tokenizer_decode(tok, ids, n, false, out, size + 1, &len) != TDM_OK || len > want_len)
        abort();
    free(out);
    free(ids);
}

static void check_chat(const uint8_t *data, size_t size)
{
    /* The input, cut at its first NUL, as a user message. */
    char *content = malloc(size + 1);
    if (content == NULL)
        abort();
    memcpy(content, data, size);
    content[size] = '\0';
    tdm_chat_msg_t msg = {"user", content};
    for (int k = 0; k < 2; k++) {
        char *out = NULL;
        tdm_chat_template_t tmpl = k == 0 ? TDM_CHAT_TEMPLATE_CHATML : TDM_CHAT_TEMPLATE_LLAMA3;
        if (tdm_chat_render(tmpl, "sys", &msg, 1, true, &out) != TDM_OK || out == NULL)
            abort();
        size_t cl = strlen(content);
        /* ChatML keeps the content; Llama 3 keeps a trimmed part of it. */
        if (k == 0 && strlen(out) != strlen("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n"
                                            "<|im_end|>\n<|im_start|>assistant\n") +
                                         cl)
            abort();
        if (k == 1 && strlen(out) > cl + 200)
            abort();
        free(out);
    }
    free(content);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    load_once();
    char *want = malloc(size + 1);
    if (want == NULL)
        abort();
    size_t wl = 0;
    for (size_t i = 0; i < size; i++)
        if (covered[data[i]])
            want[wl++] = (char)data[i];
    check(data, size, false, want, wl);
    check(data, size, true, want, wl);
    check_chat(data, size);
    free(want);
    return 0;
}
