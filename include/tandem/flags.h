/* tandem: command-line flags from one table.
 *
 * Each command describes its flags once, in an array of tdm_flag_t; that
 * table gives the parser, `--help`, and environment variables: a flag
 * "max-num-seqs" may also be set by TANDEM_MAX_NUM_SEQS (the command line
 * wins). A repeatable (list) flag takes a comma-separated list from its
 * variable (TANDEM_ROUTER="a:7500,b:7500"); giving it on the command line
 * replaces that list. Values are written to the flag's destination as they are parsed;
 * destinations hold the defaults beforehand. */
#ifndef TANDEM_FLAGS_H
#define TANDEM_FLAGS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tdm_flag_type {
    TDM_FLAG_TYPE_STR = 0,   /* const char **: points into argv or environ */
    TDM_FLAG_TYPE_INT = 1,   /* int *: decimal, may be negative */
    TDM_FLAG_TYPE_FLOAT = 2, /* float * */
    TDM_FLAG_TYPE_BOOL = 3,  /* bool *: given = true; "--no-NAME" = false */
    TDM_FLAG_TYPE_SIZE = 4,  /* uint64_t *: bytes, "4GiB", "512MB", "1024" */
    TDM_FLAG_TYPE_U64 = 5,   /* uint64_t * */
    TDM_FLAG_TYPE_LIST = 6,  /* tdm_flag_list_t *: repeatable string */
} tdm_flag_type_t;

#define TDM_FLAG_LIST_MAX 16

typedef struct tdm_flag_list {
    const char *items[TDM_FLAG_LIST_MAX];
    size_t n;
} tdm_flag_list_t;

typedef struct tdm_flag {
    const char *name; /* long name without dashes */
    char short_name;  /* 0 if none */
    tdm_flag_type_t type;
    void *dst;
    const char *help; /* one line; the default is printed from dst */
    bool *was_set;    /* optional: set to true when given */
} tdm_flag_t;

/* Parses argv[0..argc) (argv[0] is not the program). Positional arguments
 * are collected in order into positional (up to max_pos). "-h"/"--help"
 * sets *help. Unknown flags and bad values are TDM_ERR_INVALID with a
 * message in err. */
tdm_status_t tdm_flags_parse(const tdm_flag_t *flags, size_t n_flags, int argc, char **argv,
                             const char **positional, size_t max_pos, size_t *n_pos, bool *help,
                             char *err, size_t err_len);
/* Prints "usage" lines for every flag with its default and env name. */
void tdm_flags_usage(FILE *f, const tdm_flag_t *flags, size_t n_flags);
/* Parses "4GiB", "512MB", "1.5G", "1024" into bytes. */
bool tdm_parse_size(const char *s, uint64_t *out);

#ifdef __cplusplus
}
#endif

#endif
