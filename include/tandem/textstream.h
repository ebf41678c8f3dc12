/* tandem: turning a stream of token texts into text a client may see.
 *
 * Shared by the engine (its events) and the router (which assembles text
 * from the token ids nodes send), so a request's text is the same however
 * it was served. Text is held back while it ends inside a UTF-8 character
 * or could be the start of a stop string; a stop string ends the stream
 * and neither it nor anything after it is shown. */
#ifndef TANDEM_TEXTSTREAM_H
#define TANDEM_TEXTSTREAM_H

#include <stdbool.h>
#include <stddef.h>

#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tdm_textstream {
    char *pending; /* [consumed, n_pending): held back */
    size_t n_pending, cap, consumed;
    char **stop;
    size_t n_stop;
    size_t max_stop_len;
} tdm_textstream_t;

/* Empty strings in stop are ignored; they are copied. */
tdm_status_t tdm_textstream_init(tdm_textstream_t *ts, const char *const *stop, size_t n_stop);
void tdm_textstream_free(tdm_textstream_t *ts);

/* Appends one token's bytes. *out / *out_len: the text that is ready now
 * (valid until the next call). With final, nothing is held back. Returns
 * true when a stop string matched: *out holds the text before it and the
 * stream is over (what was pending is dropped). */
bool tdm_textstream_push(tdm_textstream_t *ts, const char *piece, size_t len, bool final,
                         const char **out, size_t *out_len);
/* Everything still held back (the request ended for another reason). */
void tdm_textstream_flush(tdm_textstream_t *ts, const char **out, size_t *out_len);

#ifdef __cplusplus
}
#endif

#endif
