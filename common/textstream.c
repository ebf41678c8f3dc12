/* tandem: token texts to showable text (see textstream.h). */
#include "tandem/textstream.h"

#include <stdlib.h>
#include <string.h>

#include "tandem/utf8.h"

tdm_status_t tdm_textstream_init(tdm_textstream_t *ts, const char *const *stop, size_t n_stop)
{
    memset(ts, 0, sizeof(*ts));
    if (n_stop > 0) {
        ts->stop = calloc(n_stop, sizeof(char *));
        if (ts->stop == NULL)
            return TDM_ERR_NOMEM;
    }
    for (size_t i = 0; i < n_stop; i++) {
        if (stop[i] == NULL || stop[i][0] == '\0')
            continue;
        size_t len = strlen(stop[i]);
        ts->stop[ts->n_stop] = malloc(len + 1);
        if (ts->stop[ts->n_stop] == NULL) {
            tdm_textstream_free(ts);
            return TDM_ERR_NOMEM;
        }
        memcpy(ts->stop[ts->n_stop++], stop[i], len + 1);
        ts->max_stop_len = len > ts->max_stop_len ? len : ts->max_stop_len;
    }
    ts->cap = 256 + 2 * ts->max_stop_len;
    ts->pending = malloc(ts->cap);
    if (ts->pending == NULL) {
        tdm_textstream_free(ts);
        return TDM_ERR_NOMEM;
    }
    return TDM_OK;
}

void tdm_textstream_free(tdm_textstream_t *ts)
{
    for (size_t i = 0; i < ts->n_stop; i++)
        free(ts->stop[i]);
    free(ts->stop);
    free(ts->pending);
    memset(ts, 0, sizeof(*ts));
}

/* Drops the text handed out by the previous call. */
static void drop_consumed(tdm_textstream_t *ts)
{
    if (ts->consumed == 0)
        return;
    memmove(ts->pending, ts->pending + ts->consumed, ts->n_pending - ts->consumed);
    ts->n_pending -= ts->consumed;
    ts->consumed = 0;
}

bool tdm_textstream_push(tdm_textstream_t *ts, const char *piece, size_t len, bool final,
                         const char **out, size_t *out_len)
{
    drop_consumed(ts);
    if (ts->n_pending + len > ts->cap) {
        size_t cap = (ts->n_pending + len) * 2;
        char *p = realloc(ts->pending, cap);
        if (p == NULL) { /* keep what fits; the text loses bytes, the request goes on */
            len = ts->cap - ts->n_pending;
        } else {
            ts->pending = p;
            ts->cap = cap;
        }
    }
    if (len > 0)
        memcpy(ts->pending + ts->n_pending, piece, len);
    ts->n_pending += len;
    *out = ts->pending;
    /* A stop string anywhere in the pending text ends the stream there. */
    for (size_t i = 0; i < ts->n_stop; i++) {
        size_t sl = strlen(ts->stop[i]);
        for (size_t at = 0; at + sl <= ts->n_pending; at++) {
            if (memcmp(ts->pending + at, ts->stop[i], sl) == 0) {
                *out_len = at;
                ts->consumed = ts->n_pending; /* the rest is dropped */
                return true;
            }
        }
    }
    size_t hold = 0;
    if (!final) { /* a tail that is half a character or could begin a stop string */
        hold = tdm_utf8_incomplete_tail(ts->pending, ts->n_pending);
        for (size_t i = 0; i < ts->n_stop; i++) {
            size_t sl = strlen(ts->stop[i]);
            for (size_t k = sl - 1; k > hold; k--) {
                if (k <= ts->n_pending &&
                    memcmp(ts->pending + ts->n_pending - k, ts->stop[i], k) == 0) {
                    hold = k;
                    break;
                }
            }
        }
    }
    *out_len = ts->n_pending - hold;
    ts->consumed = *out_len;
    return false;
}

void tdm_textstream_flush(tdm_textstream_t *ts, const char **out, size_t *out_len)
{
    drop_consumed(ts);
    *out = ts->pending;
    *out_len = ts->n_pending;
    ts->consumed = ts->n_pending;
}
