/* tandem: comparing shared secrets (cluster tokens, API keys).
 *
 * Every role checks a secret a peer presents: the store and the router a
 * node's cluster token, the router's APIs a client's API key, a node the
 * token of `tandem drain`. The comparisons take time independent of where
 * the two differ, so a peer cannot find the secret byte by byte. */
#ifndef TANDEM_SECRET_H
#define TANDEM_SECRET_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* True when got[0..got_len) equals the NUL-terminated secret want. */
bool tdm_secret_equal(const char *want, const void *got, size_t got_len);
/* True when an Authorization header value is "Bearer SECRET" ("bearer" in
 * any case, blanks around the secret ignored) and SECRET equals want.
 * header may be NULL (no header: false). */
bool tdm_bearer_matches(const char *header, const char *want);

#ifdef __cplusplus
}
#endif

#endif
