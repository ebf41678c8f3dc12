/* tandem: one status type for every module.
 *
 * 0 is success, every error is negative. Functions that can fail return a
 * tdm_status_t and set their output arguments (always last) only on success.
 * The message for the user is logged once, where the error is found; the
 * status travels up the stack without being logged again. */
#ifndef TANDEM_STATUS_H
#define TANDEM_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tdm_status {
    TDM_OK = 0,
    TDM_ERR_INVALID = -1,     /* bad argument or bad input from outside */
    TDM_ERR_NOMEM = -2,       /* an allocation or a bounded pool ran out */
    TDM_ERR_IO = -3,          /* open/read/write/mmap failed */
    TDM_ERR_FORMAT = -4,      /* a file or message does not follow its format */
    TDM_ERR_UNSUPPORTED = -5, /* valid, but not something tandem handles */
    TDM_ERR_NOT_FOUND = -6,   /* a key, tensor or item is missing */
    TDM_ERR_BUSY = -7,        /* a bounded queue is full; retry later */
    TDM_ERR_TIMEOUT = -8,     /* a deadline passed */
    TDM_ERR_CANCELLED = -9,   /* the caller cancelled the operation */
    TDM_ERR_INTERNAL = -10,   /* a bug: an invariant did not hold */
} tdm_status_t;

/* A short constant name for a status ("invalid argument", ...). */
const char *tdm_status_str(tdm_status_t status);

#ifdef __cplusplus
}
#endif

#endif
