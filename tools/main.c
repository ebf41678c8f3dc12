/* tandem: the operator's tool. */
#include <stdio.h>
#include <string.h>

#include "tool.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: tandem COMMAND [flags]   (tandem COMMAND --help for its flags)\n\n"
               "commands:\n"
               "  generate     generate text from a prompt or a chat message (streams to stdout)\n"
               "  tokenize     text on stdin -> token ids\n"
               "  detokenize   token ids on stdin -> text\n"
               "  bench        bench engine | codec | kvstore | serve: figures (--json)\n"
               "  up           start a local cluster (router, prefill, decode, kvstore)\n"
               "  status       list the local cluster's processes and their health\n"
               "  down         stop the local cluster\n"
               "  drain        drain a prefill or decode node (as SIGTERM does)\n"
               "  ppl          perplexity of a text file\n"
               "  mkmodel      write a small Llama GGUF with random weights\n"
               "  quantize     a GGUF model into another weight type or mix (Q4_K_M, ...)\n"
               "  imatrix      an importance matrix from calibration text (for quantize)\n"
               "  logits       logits of a prompt's last position (for tests)\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return TOOL_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } cmds[] = {
        {"generate", cmd_generate},
        {"tokenize", cmd_tokenize},
        {"detokenize", cmd_detokenize},
        {"bench", cmd_bench},
        {"ppl", cmd_ppl},
        {"mkmodel", cmd_mkmodel},
        {"quantize", cmd_quantize},
        {"imatrix", cmd_imatrix},
        {"logits", cmd_logits},
        {"up", cmd_up},
        {"status", cmd_status},
        {"down", cmd_down},
        {"drain", cmd_drain},
        {"__up-supervisor", cmd_up_supervisor}, /* started by `up`; not listed */
    };
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        if (strcmp(cmd, cmds[i].name) == 0)
            return cmds[i].fn(argc - 2, argv + 2);
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return TOOL_EXIT_OK;
    }
    fprintf(stderr, "tandem: unknown command '%s'\n", cmd);
    usage(stderr);
    return TOOL_EXIT_USAGE;
}
