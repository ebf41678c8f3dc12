#include "tandem/log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static atomic_int log_level = -1; /* -1: not read from the environment yet */

int tdm_log_parse_level(const char *name)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    if (name == NULL)
        return -1;
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0 || (name[0] == '0' + i && name[1] == '\0'))
            return i;
    return -1;
}

bool tdm_log_set_level_name(const char *name)
{
    if (name == NULL)
        return true;
    int level = tdm_log_parse_level(name);
    if (level < 0)
        return false;
    tdm_log_set_level((tdm_log_level_t)level);
    return true;
}

tdm_log_level_t tdm_log_get_level(void)
{
    int level = atomic_load_explicit(&log_level, memory_order_relaxed);
    if (level < 0) {
        level = tdm_log_parse_level(getenv("TANDEM_LOG_LEVEL"));
        if (level < 0)
            level = TDM_LOG_LEVEL_INFO;
        atomic_store(&log_level, level);
    }
    return (tdm_log_level_t)level;
}

void tdm_log_set_level(tdm_log_level_t level)
{
    atomic_store(&log_level, (int)level);
}

void tdm_log_write(tdm_log_level_t level, const char *module, const char *fmt, ...)
{
    static const char *const tags[] = {"E", "W", "I", "D"};
    if ((int)level > (int)tdm_log_get_level())
        return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char line[2048];
    int n = snprintf(line, sizeof(line), "%02d:%02d:%02d.%03ld %s %-9s ", tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, tags[level], module);
    if (n < 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;
    line[len++] = '\n';
    /* One write per line so lines from threads and processes do not mix. */
    fwrite(line, 1, len, stderr);
}
