/* tandem: comparing shared secrets (see include/tandem/secret.h). */
#include "tandem/secret.h"

#include <string.h>
#include <strings.h>

bool tdm_secret_equal(const char *want, const void *got, size_t got_len)
{
    const unsigned char *g = got;
    size_t want_len = strlen(want);
    unsigned diff = want_len != got_len;
    for (size_t i = 0; i < want_len; i++)
        diff |= (unsigned)(unsigned char)want[i] ^ (unsigned)(i < got_len ? g[i] : 0);
    return diff == 0;
}

bool tdm_bearer_matches(const char *header, const char *want)
{
    if (header == NULL || strncasecmp(header, "Bearer ", 7) != 0)
        return false;
    const char *h = header + 7;
    while (*h == ' ' || *h == '\t')
        h++;
    size_t len = strlen(h);
    while (len > 0 && (h[len - 1] == ' ' || h[len - 1] == '\t'))
        len--;
    return tdm_secret_equal(want, h, len);
}
