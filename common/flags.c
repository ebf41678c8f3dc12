#include "tandem/flags.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

bool tdm_parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno != 0 || !(v >= 0))
        return false;
    while (*end == ' ')
        end++;
    double mul = 1;
    char u = (char)toupper((unsigned char)*end);
    if (u != '\0') {
        const char *units = "KMGT";
        const char *at = strchr(units, u);
        if (at == NULL)
            return false;
        end++;
        bool binary = *end == 'i' || *end == 'I';
        if (binary)
            end++;
        if (*end == 'B' || *end == 'b')
            end++;
        if (*end != '\0')
            return false;
        for (long i = 0; i <= at - units; i++)
            mul *= binary ? 1024.0 : 1000.0;
    }
    v *= mul;
    if (v > 1.8e19)
        return false;
    *out = (uint64_t)v;
    return true;
}

static tdm_status_t set_value(const tdm_flag_t *f, const char *val, const char *origin, char *err,
                              size_t err_len)
{
    char *end;
    errno = 0;
    switch (f->type) {
    case TDM_FLAG_TYPE_STR: *(const char **)f->dst = val; break;
    case TDM_FLAG_TYPE_INT: {
        long v = strtol(val, &end, 10);
        if (end == val || *end != '\0' || errno != 0 || v < -2147483647L || v > 2147483647L)
            goto bad;
        *(int *)f->dst = (int)v;
        break;
    }
    case TDM_FLAG_TYPE_U64: {
        if (val[0] == '-')
            goto bad;
        unsigned long long v = strtoull(val, &end, 10);
        if (end == val || *end != '\0' || errno != 0)
            goto bad;
        *(uint64_t *)f->dst = v;
        break;
    }
    case TDM_FLAG_TYPE_FLOAT: {
        float v = strtof(val, &end);
        if (end == val || *end != '\0' || errno != 0 || !isfinite(v))
            goto bad;
        *(float *)f->dst = v;
        break;
    }
    case TDM_FLAG_TYPE_BOOL: {
        if (strcmp(val, "1") == 0 || strcmp(val, "true") == 0 || strcmp(val, "yes") == 0)
            *(bool *)f->dst = true;
        else if (strcmp(val, "0") == 0 || strcmp(val, "false") == 0 || strcmp(val, "no") == 0)
            *(bool *)f->dst = false;
        else
            goto bad;
        break;
    }
    case TDM_FLAG_TYPE_SIZE:
        if (!tdm_parse_size(val, (uint64_t *)f->dst))
            goto bad;
        break;
    case TDM_FLAG_TYPE_LIST: {
        tdm_flag_list_t *l = f->dst;
        if (l->n >= TDM_FLAG_LIST_MAX) {
            snprintf(err, err_len, "--%s given more than %d times", f->name, TDM_FLAG_LIST_MAX);
            return TDM_ERR_INVALID;
        }
        l->items[l->n++] = val;
        break;
    }
    }
    if (f->was_set != NULL)
        *f->was_set = true;
    return TDM_OK;
bad:
    snprintf(err, err_len, "bad value '%s' for --%s (from %s)", val, f->name, origin);
    return TDM_ERR_INVALID;
}

/* A list flag from the environment: "a:1,b:2". The items are copied into
 * one process-lifetime arena (environ may change under us); they stay valid
 * until the next tdm_flags_parse. */
static char env_arena[4096];
static size_t env_arena_used;

static tdm_status_t set_env_list(const tdm_flag_t *f, const char *val, const char *origin,
                                 char *err, size_t err_len)
{
    char *arena = env_arena;
    size_t used = env_arena_used;
    for (const char *p = val; *p != '\0';) {
        size_t len = strcspn(p, ",");
        const char *item = p;
        p += len + (p[len] == ',');
        while (len > 0 && (*item == ' ' || *item == '\t')) {
            item++;
            len--;
        }
        while (len > 0 && (item[len - 1] == ' ' || item[len - 1] == '\t'))
            len--;
        if (len == 0)
            continue;
        if (used + len + 1 > sizeof(env_arena)) {
            snprintf(err, err_len, "%s is too long (%zu bytes at most)", origin, sizeof(env_arena));
            return TDM_ERR_INVALID;
        }
        char *copy = arena + used;
        memcpy(copy, item, len);
        copy[len] = '\0';
        used += len + 1;
        env_arena_used = used;
        tdm_status_t st = set_value(f, copy, origin, err, err_len);
        if (st != TDM_OK)
            return st;
    }
    return TDM_OK;
}

static void env_name(const char *name, char *out, size_t cap)
{
    size_t n = (size_t)snprintf(out, cap, "TANDEM_");
    for (const char *p = name; *p != '\0' && n + 1 < cap; p++)
        out[n++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
    out[n] = '\0';
}

tdm_status_t tdm_flags_parse(const tdm_flag_t *flags, size_t n_flags, int argc, char **argv,
                             const char **positional, size_t max_pos, size_t *n_pos, bool *help,
                             char *err, size_t err_len)
{
    *help = false;
    *n_pos = 0;
    env_arena_used = 0;
    /* Environment first, so the command line wins (a list given on the
     * command line replaces the one from the environment). */
    enum { MAX_LISTS = 8 };
    const tdm_flag_t *env_lists[MAX_LISTS];
    size_t n_env_lists = 0;
    for (size_t i = 0; i < n_flags; i++) {
        char name[96];
        env_name(flags[i].name, name, sizeof(name));
        const char *v = getenv(name);
        if (v == NULL)
            continue;
        tdm_status_t st;
        if (flags[i].type == TDM_FLAG_TYPE_LIST) {
            if (n_env_lists == MAX_LISTS) {
                snprintf(err, err_len, "more than %d list flags set from the environment",
                         MAX_LISTS);
                return TDM_ERR_INVALID;
            }
            env_lists[n_env_lists++] = &flags[i];
            st = set_env_list(&flags[i], v, name, err, err_len);
        } else {
            st = set_value(&flags[i], v, name, err, err_len);
        }
        if (st != TDM_OK)
            return st;
    }
    for (int a = 0; a < argc; a++) {
        const char *arg = argv[a];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            *help = true;
            return TDM_OK;
        }
        if (arg[0] != '-' || arg[1] == '\0' || (arg[1] != '-' && isdigit((unsigned char)arg[1]))) {
            if (*n_pos >= max_pos) {
                snprintf(err, err_len, "unexpected argument '%s'", arg);
                return TDM_ERR_INVALID;
            }
            positional[(*n_pos)++] = arg;
            continue;
        }
        const tdm_flag_t *f = NULL;
        const char *val = NULL;
        bool negated = false;
        if (arg[1] == '-') {
            const char *name = arg + 2;
            const char *eq = strchr(name, '=');
            size_t len = eq ? (size_t)(eq - name) : strlen(name);
            for (size_t i = 0; i < n_flags && f == NULL; i++) {
                if (strlen(flags[i].name) == len && strncmp(flags[i].name, name, len) == 0)
                    f = &flags[i];
                else if (flags[i].type == TDM_FLAG_TYPE_BOOL && len == strlen(flags[i].name) + 3 &&
                         strncmp(name, "no-", 3) == 0 &&
                         strncmp(name + 3, flags[i].name, len - 3) == 0) {
                    f = &flags[i];
                    negated = true;
                }
            }
            if (eq != NULL)
                val = eq + 1;
        } else if (arg[2] == '\0') {
            for (size_t i = 0; i < n_flags && f == NULL; i++)
                if (flags[i].short_name == arg[1])
                    f = &flags[i];
        }
        if (f == NULL) {
            snprintf(err, err_len, "unknown flag '%s' (see --help)", arg);
            return TDM_ERR_INVALID;
        }
        if (f->type == TDM_FLAG_TYPE_BOOL && val == NULL) {
            *(bool *)f->dst = !negated;
            if (f->was_set != NULL)
                *f->was_set = true;
            continue;
        }
        if (val == NULL) {
            if (a + 1 >= argc) {
                snprintf(err, err_len, "flag '%s' needs a value", arg);
                return TDM_ERR_INVALID;
            }
            val = argv[++a];
        }
        for (size_t k = 0; k < n_env_lists; k++)
            if (env_lists[k] == f) { /* the first command-line item drops the env's */
                ((tdm_flag_list_t *)f->dst)->n = 0;
                env_lists[k] = NULL;
            }
        tdm_status_t st = set_value(f, val, "the command line", err, err_len);
        if (st != TDM_OK)
            return st;
    }
    return TDM_OK;
}

void tdm_flags_usage(FILE *out, const tdm_flag_t *flags, size_t n_flags)
{
    for (size_t i = 0; i < n_flags; i++) {
        const tdm_flag_t *f = &flags[i];
        char left[64], def[64] = "", env[96];
        static const char *const meta[] = {"TEXT", "N", "X", "", "BYTES", "N", "TEXT"};
        if (f->short_name)
            snprintf(left, sizeof(left), "-%c, --%s %s", f->short_name, f->name, meta[f->type]);
        else
            snprintf(left, sizeof(left), "    --%s %s", f->name, meta[f->type]);
        switch (f->type) {
        case TDM_FLAG_TYPE_STR:
            if (*(const char **)f->dst != NULL)
                snprintf(def, sizeof(def), " (default: %s)", *(const char **)f->dst);
            break;
        case TDM_FLAG_TYPE_INT: snprintf(def, sizeof(def), " (default: %d)", *(int *)f->dst); break;
        case TDM_FLAG_TYPE_FLOAT:
            snprintf(def, sizeof(def), " (default: %g)", (double)*(float *)f->dst);
            break;
        case TDM_FLAG_TYPE_BOOL:
            snprintf(def, sizeof(def), " (default: %s)", *(bool *)f->dst ? "on" : "off");
            break;
        case TDM_FLAG_TYPE_SIZE:
        case TDM_FLAG_TYPE_U64:
            snprintf(def, sizeof(def), " (default: %llu)", (unsigned long long)*(uint64_t *)f->dst);
            break;
        case TDM_FLAG_TYPE_LIST: break;
        }
        env_name(f->name, env, sizeof(env));
        fprintf(out, "  %-34s %s%s [env %s]\n", left, f->help, def, env);
    }
}
