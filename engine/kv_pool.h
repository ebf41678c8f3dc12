/* Engine-private: the paged KV cache's block manager and prefix index.
 *
 * Blocks are refcounted. A block whose contents are a full, hashed block of
 * some sequence (its chained key, DESIGN.md "KV blocks") is registered in
 * the prefix index; when its last user releases it, it keeps its contents
 * and its key and goes to the tail of the cached-free LRU list, from which
 * it can be revived by a prefix hit or, as the least recently freed, be
 * evicted for a new allocation. Blocks without a key go to a plain free
 * stack, which allocation uses first. All metadata is allocated at create. */
#ifndef TANDEM_ENGINE_KV_POOL_H
#define TANDEM_ENGINE_KV_POOL_H

#include <stdbool.h>
#include <stdint.h>

#include "tandem/hash.h"
#include "tandem/status.h"

typedef struct tdm_kv_block {
    int32_t ref;
    int32_t prev, next; /* links in the cached-free LRU list (-1: none) */
    int32_t hnext;      /* next block in the same hash bucket (-1: none) */
    bool has_key;
    bool in_lru;
    tdm_hash128_t key;
} tdm_kv_block_t;

typedef struct tdm_kv_pool {
    int32_t n_blocks;
    tdm_kv_block_t *blocks;
    int32_t *plain; /* stack of free blocks without a key */
    int32_t n_plain;
    int32_t lru_head; /* least recently freed cached block (evicted first) */
    int32_t lru_tail;
    int32_t n_lru;
    int32_t *buckets; /* prefix index: hash buckets of block ids */
    uint32_t bucket_mask;
} tdm_kv_pool_t;

tdm_status_t tdm_kv_pool_init(tdm_kv_pool_t *p, int32_t n_blocks);
void tdm_kv_pool_fini(tdm_kv_pool_t *p);
static inline int32_t tdm_kv_pool_num_free(const tdm_kv_pool_t *p)
{
    return p->n_plain + p->n_lru;
}
/* A block with ref 1 and no key, or -1 when none is free. */
int32_t tdm_kv_pool_alloc(tdm_kv_pool_t *p);
/* Drops one reference. */
void tdm_kv_pool_release(tdm_kv_pool_t *p, int32_t b);
/* The block registered under key, with one more reference, or -1. */
int32_t tdm_kv_pool_acquire_cached(tdm_kv_pool_t *p, tdm_hash128_t key);
/* Registers a full block under its key unless that key is already present
 * (then the block stays unregistered and is freed plainly later). */
void tdm_kv_pool_register(tdm_kv_pool_t *p, int32_t b, tdm_hash128_t key);

#endif
