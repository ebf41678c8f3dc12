/* tandem tokenize / detokenize: only the tokenizer is loaded. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tandem/log.h"
#include "tool.h"

static int open_tokenizer(const char *model, tdm_gguf_t **g, tdm_tokenizer_t **tok)
{
    char path[4096], err[512] = "";
    if (model != NULL)
        snprintf(path, sizeof(path), "%s", model);
    else
        tool_default_model_path(path, sizeof(path));
    tdm_status_t st = tdm_gguf_open(path, true, err, sizeof(err), g);
    if (st != TDM_OK) {
        fprintf(stderr, "tandem: cannot read %s: %s\n", path, err[0] ? err : tdm_status_str(st));
        if (model == NULL)
            fprintf(stderr, "  fetch the default model with `make model`, or pass -m MODEL.gguf\n");
        return TOOL_EXIT_USAGE;
    }
    st = tdm_tokenizer_create(*g, err, sizeof(err), tok);
    if (st != TDM_OK) {
        fprintf(stderr, "tandem: no usable tokenizer in %s: %s\n", path, err);
        tdm_gguf_close(*g);
        return TOOL_EXIT_USAGE;
    }
    return TOOL_EXIT_OK;
}

int cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL;
    bool special = false;
    tdm_flag_t flags[] = {
        {"model", 'm', TDM_FLAG_TYPE_STR, &model, "GGUF model file (its tokenizer)", NULL},
        {"special", 0, TDM_FLAG_TYPE_BOOL, &special,
         "turn special-token text (<|im_start|>) into special tokens", NULL},
    };
    int rc;
    if (!tool_parse("tokenize [-m MODEL] [--special] < TEXT",
                    "Prints the token ids of stdin's raw text on one line (no BOS added).", flags,
                    2, argc, argv, NULL, 0, NULL, &rc))
        return rc;
    tdm_gguf_t *g;
    tdm_tokenizer_t *tok;
    rc = open_tokenizer(model, &g, &tok);
    if (rc != TOOL_EXIT_OK)
        return rc;
    size_t len;
    char *text = tool_read_all(stdin, &len);
    size_t cap = len + 16, n = 0;
    int32_t *ids = malloc(cap * sizeof(int32_t));
    rc = TOOL_EXIT_FAIL;
    if (text != NULL && ids != NULL &&
        tdm_tokenizer_encode(tok, text, len, special, ids, cap, &n) == TDM_OK) {
        for (size_t i = 0; i < n; i++)
            printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        rc = TOOL_EXIT_OK;
    } else {
        fprintf(stderr, "tandem tokenize: failed\n");
    }
    free(ids);
    free(text);
    tdm_tokenizer_destroy(tok);
    tdm_gguf_close(g);
    return rc;
}

int cmd_detokenize(int argc, char **argv)
{
    const char *model = NULL;
    bool special = true;
    tdm_flag_t flags[] = {
        {"model", 'm', TDM_FLAG_TYPE_STR, &model, "GGUF model file (its tokenizer)", NULL},
        {"special", 0, TDM_FLAG_TYPE_BOOL, &special, "render special tokens' text", NULL},
    };
    int rc;
    if (!tool_parse("detokenize [-m MODEL] < IDS",
                    "Prints the text of the token ids on stdin (separated by spaces or newlines), "
                    "without a trailing newline.",
                    flags, 2, argc, argv, NULL, 0, NULL, &rc))
        return rc;
    tdm_gguf_t *g;
    tdm_tokenizer_t *tok;
    rc = open_tokenizer(model, &g, &tok);
    if (rc != TOOL_EXIT_OK)
        return rc;
    size_t len;
    char *text = tool_read_all(stdin, &len);
    rc = text != NULL ? TOOL_EXIT_OK : TOOL_EXIT_FAIL;
    char buf[1024];
    for (const char *p = text; rc == TOOL_EXIT_OK && p != NULL && *p != '\0';) {
        while (*p != '\0' && isspace((unsigned char)*p))
            p++;
        if (*p == '\0')
            break;
        char *end;
        long id = strtol(p, &end, 10);
        if (end == p || id < 0 || id >= tdm_tokenizer_n_vocab(tok)) {
            fprintf(stderr, "tandem detokenize: '%.20s' is not a token id of this vocabulary\n", p);
            rc = TOOL_EXIT_USAGE;
            break;
        }
        size_t n = tdm_tokenizer_token_bytes(tok, (int32_t)id, special, buf, sizeof(buf));
        fwrite(buf, 1, n < sizeof(buf) ? n : sizeof(buf), stdout);
        p = end;
    }
    free(text);
    tdm_tokenizer_destroy(tok);
    tdm_gguf_close(g);
    return rc;
}
