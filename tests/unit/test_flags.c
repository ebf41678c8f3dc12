/* Unit tests of the flag table parser (include/tandem/flags.h): values from
 * the command line and from TANDEM_* variables, lists from comma-separated
 * variables, precedence, and the errors a user sees. */
#include <stdlib.h>
#include <string.h>

#include "tandem/flags.h"
#include "test_util.h"

typedef struct opts {
    const char *model;
    int threads;
    float temp;
    bool prefix;
    uint64_t mem;
    tdm_flag_list_t routers, stores;
} opts_t;

static tdm_status_t parse(opts_t *o, int argc, char **argv, char *err, size_t cap)
{
    memset(o, 0, sizeof(*o));
    o->threads = 4;
    o->prefix = true;
    tdm_flag_t flags[] = {
        {"model", 'm', TDM_FLAG_TYPE_STR, &o->model, "GGUF", NULL},
        {"threads", 't', TDM_FLAG_TYPE_INT, &o->threads, "threads", NULL},
        {"temperature", 0, TDM_FLAG_TYPE_FLOAT, &o->temp, "temperature", NULL},
        {"enable-prefix-caching", 0, TDM_FLAG_TYPE_BOOL, &o->prefix, "prefix cache", NULL},
        {"kv-cache-memory", 0, TDM_FLAG_TYPE_SIZE, &o->mem, "bytes", NULL},
        {"router", 'r', TDM_FLAG_TYPE_LIST, &o->routers, "routers", NULL},
        {"kvstore", 0, TDM_FLAG_TYPE_LIST, &o->stores, "stores", NULL},
    };
    const char *pos[2];
    size_t n_pos = 0;
    bool help = false;
    return tdm_flags_parse(flags, sizeof(flags) / sizeof(flags[0]), argc, argv, pos, 2, &n_pos,
                           &help, err, cap);
}

static void clear_env(void)
{
    const char *names[] = {"TANDEM_MODEL",
                           "TANDEM_THREADS",
                           "TANDEM_ROUTER",
                           "TANDEM_KVSTORE",
                           "TANDEM_ENABLE_PREFIX_CACHING",
                           "TANDEM_KV_CACHE_MEMORY",
                           "TANDEM_TEMPERATURE"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        unsetenv(names[i]);
}

int main(void)
{
    opts_t o;
    char err[256];
    clear_env();

    char *a1[] = {"--model",           "m.gguf", "-t",  "2",
                  "--router=a:1",      "-r",     "b:2", "--no-enable-prefix-caching",
                  "--kv-cache-memory", "1GiB"};
    CHECK(parse(&o, 10, a1, err, sizeof(err)) == TDM_OK, "%s", err);
    CHECK(strcmp(o.model, "m.gguf") == 0 && o.threads == 2 && !o.prefix, "basic values");
    CHECK(o.mem == (1ull << 30), "size %llu", (unsigned long long)o.mem);
    CHECK(o.routers.n == 2 && strcmp(o.routers.items[0], "a:1") == 0 &&
              strcmp(o.routers.items[1], "b:2") == 0,
          "list from the command line: %zu", o.routers.n);

    /* the environment sets what the command line does not */
    setenv("TANDEM_MODEL", "env.gguf", 1);
    setenv("TANDEM_THREADS", "8", 1);
    setenv("TANDEM_ROUTER", " r1:7500, r2:7500 ,,r3:7500", 1);
    setenv("TANDEM_KVSTORE", "s0:7400", 1);
    setenv("TANDEM_ENABLE_PREFIX_CACHING", "false", 1);
    CHECK(parse(&o, 0, NULL, err, sizeof(err)) == TDM_OK, "%s", err);
    CHECK(strcmp(o.model, "env.gguf") == 0 && o.threads == 8 && !o.prefix, "env values");
    CHECK(o.routers.n == 3, "env list: %zu items", o.routers.n);
    CHECK(o.routers.n == 3 && strcmp(o.routers.items[0], "r1:7500") == 0 &&
              strcmp(o.routers.items[1], "r2:7500") == 0 &&
              strcmp(o.routers.items[2], "r3:7500") == 0,
          "env list items trimmed, empty ones skipped");
    CHECK(o.stores.n == 1 && strcmp(o.stores.items[0], "s0:7400") == 0,
          "a second env list keeps its own items");

    /* the command line wins: scalars replaced, a list given replaces the env's */
    char *a2[] = {"-t", "3", "--router", "cli:1", "--enable-prefix-caching"};
    CHECK(parse(&o, 5, a2, err, sizeof(err)) == TDM_OK, "%s", err);
    CHECK(o.threads == 3 && o.prefix && strcmp(o.model, "env.gguf") == 0, "precedence");
    CHECK(o.routers.n == 1 && strcmp(o.routers.items[0], "cli:1") == 0,
          "command-line list replaces the env list: %zu", o.routers.n);
    CHECK(o.stores.n == 1, "an env list not on the command line stays");

    /* errors name the variable */
    setenv("TANDEM_THREADS", "many", 1);
    CHECK(parse(&o, 0, NULL, err, sizeof(err)) == TDM_ERR_INVALID &&
              strstr(err, "TANDEM_THREADS") != NULL,
          "bad env value: %s", err);
    unsetenv("TANDEM_THREADS");
    setenv("TANDEM_ROUTER", "a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q", 1);
    CHECK(parse(&o, 0, NULL, err, sizeof(err)) == TDM_ERR_INVALID &&
              strstr(err, "more than") != NULL,
          "too many list items: %s", err);
    clear_env();
    char *a3[] = {"--bogus"};
    CHECK(parse(&o, 1, a3, err, sizeof(err)) == TDM_ERR_INVALID && strstr(err, "--bogus") != NULL,
          "unknown flag: %s", err);
    char *a4[] = {"--threads"};
    CHECK(parse(&o, 1, a4, err, sizeof(err)) == TDM_ERR_INVALID, "missing value");
    return t_finish();
}
