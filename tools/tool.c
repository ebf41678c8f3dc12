#include "tool.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "tandem/log.h"

void tool_engine_opts_default(tool_engine_opts_t *o)
{
    tdm_engine_config_t c;
    tdm_engine_config_default(&c);
    memset(o, 0, sizeof(*o));
    o->threads = c.threads;
    o->max_num_seqs = c.max_num_seqs;
    o->max_num_batched_tokens = c.max_num_batched_tokens;
    o->max_model_len = c.max_model_len;
    o->block_size = c.block_size;
    o->kv_cache_memory = 0;
    o->enable_prefix_caching = c.enable_prefix_caching;
    o->cpu_isa = "auto";
    o->device = c.device;
    o->gpu_memory_utilization = c.gpu_memory_utilization;
}

size_t tool_engine_flags(tool_engine_opts_t *o, tdm_flag_t *out)
{
    tdm_flag_t f[] = {
        {"model", 'm', TDM_FLAG_TYPE_STR, &o->model,
         "GGUF model file (default: $TANDEM_HOME/models/" DEFAULT_MODEL_FILE ")", NULL},
        {"threads", 't', TDM_FLAG_TYPE_INT, &o->threads, "CPU threads (0: all available)", NULL},
        {"max-num-seqs", 0, TDM_FLAG_TYPE_INT, &o->max_num_seqs, "sequences per step", NULL},
        {"max-num-batched-tokens", 0, TDM_FLAG_TYPE_INT, &o->max_num_batched_tokens,
         "tokens per step (prefill chunk budget)", NULL},
        {"max-model-len", 0, TDM_FLAG_TYPE_INT, &o->max_model_len,
         "prompt + output tokens (0: min(trained, 8192))", NULL},
        {"block-size", 0, TDM_FLAG_TYPE_INT, &o->block_size, "tokens per KV block", NULL},
        {"kv-cache-memory", 0, TDM_FLAG_TYPE_SIZE, &o->kv_cache_memory,
         "bytes of KV cache, e.g. 2GiB (0: 1 GiB on the CPU, what --gpu-memory-utilization "
         "leaves on a GPU)",
         NULL},
        {"enable-prefix-caching", 0, TDM_FLAG_TYPE_BOOL, &o->enable_prefix_caching,
         "reuse KV blocks of identical prompt prefixes", NULL},
        {"cpu-isa", 0, TDM_FLAG_TYPE_STR, &o->cpu_isa, "auto, scalar, avx2 or avx512", NULL},
        {"device", 0, TDM_FLAG_TYPE_STR, &o->device, "cpu, cuda or cuda:N", NULL},
        {"gpu-memory-utilization", 0, TDM_FLAG_TYPE_FLOAT, &o->gpu_memory_utilization,
         "fraction of the GPU's memory for weights, buffers and KV cache", NULL},
    };
    memcpy(out, f, sizeof(f));
    return sizeof(f) / sizeof(f[0]);
}

void tool_default_model_path(char *buf, size_t cap)
{
    const char *home = getenv("TANDEM_HOME");
    if (home != NULL && home[0] != '\0') {
        snprintf(buf, cap, "%s/models/%s", home, DEFAULT_MODEL_FILE);
        return;
    }
    const char *h = getenv("HOME");
    snprintf(buf, cap, "%s/.cache/tandem/models/%s", h ? h : ".", DEFAULT_MODEL_FILE);
}

bool tool_engine_config(const tool_engine_opts_t *o, tdm_engine_config_t *cfg)
{
    static char path[4096];
    tdm_engine_config_default(cfg);
    if (o->model != NULL) {
        snprintf(path, sizeof(path), "%s", o->model);
    } else {
        tool_default_model_path(path, sizeof(path));
        struct stat sb;
        if (stat(path, &sb) != 0) {
            fprintf(stderr,
                    "tandem: no model given and the default model is not at %s\n"
                    "  fetch it with `make model`, or pass -m MODEL.gguf\n",
                    path);
            return false;
        }
    }
    cfg->model_path = path;
    cfg->threads = o->threads;
    cfg->max_num_seqs = o->max_num_seqs;
    cfg->max_num_batched_tokens = o->max_num_batched_tokens;
    cfg->max_model_len = o->max_model_len;
    cfg->block_size = o->block_size;
    cfg->kv_cache_bytes = o->kv_cache_memory;
    cfg->enable_prefix_caching = o->enable_prefix_caching;
    cfg->device = o->device;
    cfg->gpu_memory_utilization = o->gpu_memory_utilization;
    if (strcmp(o->cpu_isa, "scalar") == 0)
        cfg->isa = TDM_CPU_ISA_SCALAR;
    else if (strcmp(o->cpu_isa, "avx2") == 0)
        cfg->isa = TDM_CPU_ISA_AVX2;
    else if (strcmp(o->cpu_isa, "avx512") == 0)
        cfg->isa = TDM_CPU_ISA_AVX512;
    else if (strcmp(o->cpu_isa, "auto") == 0)
        cfg->isa = TDM_CPU_ISA_AUTO;
    else {
        fprintf(stderr, "tandem: --cpu-isa must be auto, scalar, avx2 or avx512\n");
        return false;
    }
    return true;
}

int tool_engine_create(const tool_engine_opts_t *o, tdm_engine_t **out)
{
    tdm_engine_config_t cfg;
    if (!tool_engine_config(o, &cfg))
        return TOOL_EXIT_USAGE;
    char err[512] = "";
    tdm_status_t st = tdm_engine_create(&cfg, err, sizeof(err), out);
    if (st != TDM_OK) {
        fprintf(stderr, "tandem: cannot load %s: %s\n", cfg.model_path,
                err[0] ? err : tdm_status_str(st));
        /* A bad model file is bad input (2); anything else a failure (1). */
        return st == TDM_ERR_FORMAT || st == TDM_ERR_UNSUPPORTED || st == TDM_ERR_IO ||
                       st == TDM_ERR_INVALID
                   ? TOOL_EXIT_USAGE
                   : TOOL_EXIT_FAIL;
    }
    return TOOL_EXIT_OK;
}

bool tool_parse(const char *cmd, const char *summary, const tdm_flag_t *flags, size_t n, int argc,
                char **argv, const char **pos, size_t max_pos, size_t *n_pos, int *exit_code)
{
    bool help = false;
    char err[256];
    size_t np = 0;
    tdm_status_t st = tdm_flags_parse(flags, n, argc, argv, pos, max_pos, n_pos ? n_pos : &np,
                                      &help, err, sizeof(err));
    if (st != TDM_OK) {
        fprintf(stderr, "tandem %s: %s\n", cmd, err);
        *exit_code = TOOL_EXIT_USAGE;
        return false;
    }
    if (help) {
        printf("usage: tandem %s\n%s\n\nflags:\n", cmd, summary);
        tdm_flags_usage(stdout, flags, n);
        *exit_code = TOOL_EXIT_OK;
        return false;
    }
    return true;
}

int32_t *tool_tokenize_text(const tdm_tokenizer_t *tok, const char *text, size_t len, size_t *n,
                            int32_t *bos)
{
    *bos = tdm_tokenizer_add_bos(tok) ? tdm_tokenizer_bos(tok) : -1;
    const size_t off = *bos >= 0 ? 1 : 0, cap = len + 16;
    int32_t *toks = malloc(cap * sizeof(int32_t));
    size_t nt = 0;
    if (toks == NULL ||
        tdm_tokenizer_encode(tok, text, len, false, toks + off, cap - off, &nt) != TDM_OK) {
        free(toks);
        return NULL;
    }
    if (off)
        toks[0] = *bos;
    *n = nt + off;
    return toks;
}

char *tool_read_all(FILE *f, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    if (buf == NULL)
        return NULL;
    for (;;) {
        if (n == cap) {
            char *b = realloc(buf, cap * 2 + 1);
            if (b == NULL) {
                free(buf);
                return NULL;
            }
            buf = b;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0)
            break;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

double tool_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

uint64_t tool_rng_next(uint64_t *state)
{
    *state += 0x9e3779b97f4a7c15ull;
    uint64_t z = *state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double tool_token_logprob(const float *l, int32_t n_vocab, int32_t token)
{
    double mx = l[0];
    for (int32_t t = 1; t < n_vocab; t++)
        mx = l[t] > mx ? l[t] : mx;
    double sum = 0;
    for (int32_t t = 0; t < n_vocab; t++)
        sum += exp((double)l[t] - mx);
    return (double)l[token] - mx - log(sum);
}
