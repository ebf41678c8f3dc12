/* tandem: logging to stderr.
 *
 * Logs go to stderr so that tools can stream their real output on stdout.
 * The level comes from TANDEM_LOG_LEVEL (error, warn, info, debug; default
 * info) or tdm_log_set_level(). Every line carries a timestamp, the level
 * and the module that logged it. Log an error once, where it is found, with
 * its cause and what to do about it. */
#ifndef TANDEM_LOG_H
#define TANDEM_LOG_H

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tdm_log_level {
    TDM_LOG_LEVEL_ERROR = 0,
    TDM_LOG_LEVEL_WARN = 1,
    TDM_LOG_LEVEL_INFO = 2,
    TDM_LOG_LEVEL_DEBUG = 3,
} tdm_log_level_t;

void tdm_log_set_level(tdm_log_level_t level);
tdm_log_level_t tdm_log_get_level(void);
/* Parses "error", "warn", "info", "debug" (or 0..3); returns -1 if unknown. */
int tdm_log_parse_level(const char *name);
/* A --log-level flag's value (NULL: unchanged). False for an unknown name. */
bool tdm_log_set_level_name(const char *name);

void tdm_log_write(tdm_log_level_t level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define tdm_log_error(mod, ...) tdm_log_write(TDM_LOG_LEVEL_ERROR, mod, __VA_ARGS__)
#define tdm_log_warn(mod, ...)  tdm_log_write(TDM_LOG_LEVEL_WARN, mod, __VA_ARGS__)
#define tdm_log_info(mod, ...)  tdm_log_write(TDM_LOG_LEVEL_INFO, mod, __VA_ARGS__)
#define tdm_log_debug(mod, ...)                                                                    \
    do {                                                                                           \
        if (tdm_log_get_level() >= TDM_LOG_LEVEL_DEBUG)                                            \
            tdm_log_write(TDM_LOG_LEVEL_DEBUG, mod, __VA_ARGS__);                                  \
    } while (0)

#ifdef __cplusplus
}
#endif

#endif
