/* tandem: 128-bit content hashes (xxh3-128) for fingerprints and KV block keys. */
#ifndef TANDEM_HASH_H
#define TANDEM_HASH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tdm_hash128 {
    uint64_t lo, hi;
} tdm_hash128_t;

tdm_hash128_t tdm_hash128(const void *data, size_t len, uint64_t seed);
/* H(prev || data): the chaining step of block keys. */
tdm_hash128_t tdm_hash128_chain(tdm_hash128_t prev, const void *data, size_t len);
/* 32 lowercase hex digits and a NUL into out[33]. */
void tdm_hash128_hex(tdm_hash128_t h, char out[33]);

#ifdef __cplusplus
}
#endif

#endif
