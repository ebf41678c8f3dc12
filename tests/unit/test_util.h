/* Small helpers shared by the unit tests (header-only). */
#ifndef TANDEM_TEST_UTIL_H
#define TANDEM_TEST_UTIL_H

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int n_pass, n_fail;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (cond) {                                                                                \
            n_pass++;                                                                              \
        } else {                                                                                   \
            n_fail++;                                                                              \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

/* The seed of a test on fresh random inputs: TANDEM_TEST_SEED, or the
 * clock; printed so that TANDEM_TEST_SEED can repeat the run. */
static inline uint64_t t_seed(const char *test)
{
    const char *env = getenv("TANDEM_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL);
    printf("%s: seed %llu (TANDEM_TEST_SEED=%llu repeats this run)\n", test,
           (unsigned long long)seed, (unsigned long long)seed);
    return seed;
}

static inline int t_finish(void)
{
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}

/* The Python that has the reference packages (numpy, gguf): TANDEM_PYTHON,
 * else the project's .venv (under TANDEM_SOURCE_DIR, else the current
 * directory); NULL when there is none. */
static inline const char *t_python(void)
{
    static char path[1024];
    const char *env = getenv("TANDEM_PYTHON");
    if (env != NULL && env[0] != '\0')
        return env;
    const char *src = getenv("TANDEM_SOURCE_DIR");
    snprintf(path, sizeof(path), "%s/.venv/bin/python", src != NULL ? src : ".");
    return access(path, X_OK) == 0 ? path : NULL;
}

/* The default model if it is present, else NULL. */
static inline const char *t_default_model(void)
{
    static char path[1024];
    const char *home = getenv("TANDEM_HOME");
    if (home != NULL && home[0] != '\0')
        snprintf(path, sizeof(path), "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", home);
    else
        snprintf(path, sizeof(path), "%s/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 getenv("HOME") ? getenv("HOME") : ".");
    struct stat sb;
    return stat(path, &sb) == 0 ? path : NULL;
}

/* Writes a synthetic model with `tandem mkmodel ARGS` into a temp file;
 * returns its path (static buffer per call site is the caller's job). */
static inline int t_mkmodel(char *out, size_t cap, const char *args)
{
    const char *bin = getenv("TANDEM_BIN_DIR");
    snprintf(out, cap, "/tmp/tandem-test-%d-%ld.gguf", (int)getpid(), random());
    char cmd[2048];
    snprintf(cmd, sizeof(cmd), "%s/tandem mkmodel -o %s %s 2>/dev/null", bin ? bin : "build/bin",
             out, args);
    return system(cmd);
}

/* File descriptors this process has open (for leak checks), -1 on error. */
static inline int t_count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    int n = 0;
    while (readdir(d) != NULL)
        n++;
    closedir(d);
    return n;
}

static inline int t_sanitized(void)
{
    return getenv("TANDEM_TEST_SANITIZED") != NULL;
}

#endif
