#include "tandem/hash.h"

#include <stdio.h>
#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

tdm_hash128_t tdm_hash128(const void *data, size_t len, uint64_t seed)
{
    XXH128_hash_t h = XXH3_128bits_withSeed(data, len, seed);
    return (tdm_hash128_t){.lo = h.low64, .hi = h.high64};
}

tdm_hash128_t tdm_hash128_chain(tdm_hash128_t prev, const void *data, size_t len)
{
    XXH3_state_t st;
    uint8_t p[16];
    memcpy(p, &prev.lo, 8);
    memcpy(p + 8, &prev.hi, 8);
    XXH3_128bits_reset(&st);
    XXH3_128bits_update(&st, p, sizeof(p));
    XXH3_128bits_update(&st, data, len);
    XXH128_hash_t h = XXH3_128bits_digest(&st);
    return (tdm_hash128_t){.lo = h.low64, .hi = h.high64};
}

void tdm_hash128_hex(tdm_hash128_t h, char out[33])
{
    snprintf(out, 33, "%016llx%016llx", (unsigned long long)h.hi, (unsigned long long)h.lo);
}
