/* tandem: the UTF-8 helpers shared by the tokenizer, chat templates and
 * the engine's streaming (and, later, everything that puts text in JSON). */
#ifndef TANDEM_UTF8_H
#define TANDEM_UTF8_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Decodes one UTF-8 sequence at s (n > 0 bytes left) into *cp; returns its
 * length, or 0 when it is not a valid shortest-form sequence (overlong,
 * surrogate, above U+10FFFF, truncated). */
size_t tdm_utf8_decode(const uint8_t *s, size_t n, uint32_t *cp);

/* How many bytes at the end of buf[0..n) begin a character that is not
 * complete yet (0 when the text ends on a character boundary). Streamed text
 * holds these back until the next token completes them. */
size_t tdm_utf8_incomplete_tail(const char *buf, size_t n);

#ifdef __cplusplus
}
#endif

#endif
