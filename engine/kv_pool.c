#include "kv_pool.h"

#include <stdlib.h>

static uint32_t bucket_of(const tdm_kv_pool_t *p, tdm_hash128_t key)
{
    return (uint32_t)(key.lo ^ (key.hi >> 17)) & p->bucket_mask;
}

tdm_status_t tdm_kv_pool_init(tdm_kv_pool_t *p, int32_t n_blocks)
{
    uint32_t nb = 16;
    while (nb < 2u * (uint32_t)n_blocks)
        nb <<= 1;
    p->n_blocks = n_blocks;
    p->blocks = calloc((size_t)n_blocks, sizeof(*p->blocks));
    p->plain = malloc((size_t)n_blocks * sizeof(*p->plain));
    p->buckets = malloc(nb * sizeof(*p->buckets));
    if (p->blocks == NULL || p->plain == NULL || p->buckets == NULL) {
        tdm_kv_pool_fini(p);
        return TDM_ERR_NOMEM;
    }
    p->bucket_mask = nb - 1;
    for (uint32_t i = 0; i < nb; i++)
        p->buckets[i] = -1;
    /* Stack order: block 0 is allocated first. */
    for (int32_t i = 0; i < n_blocks; i++) {
        p->blocks[i] = (tdm_kv_block_t){.ref = 0, .prev = -1, .next = -1, .hnext = -1};
        p->plain[i] = n_blocks - 1 - i;
    }
    p->n_plain = n_blocks;
    p->lru_head = p->lru_tail = -1;
    p->n_lru = 0;
    return TDM_OK;
}

void tdm_kv_pool_fini(tdm_kv_pool_t *p)
{
    free(p->blocks);
    free(p->plain);
    free(p->buckets);
    p->blocks = NULL;
    p->plain = NULL;
    p->buckets = NULL;
}

static void lru_unlink(tdm_kv_pool_t *p, int32_t b)
{
    tdm_kv_block_t *k = &p->blocks[b];
    if (k->prev >= 0)
        p->blocks[k->prev].next = k->next;
    else
        p->lru_head = k->next;
    if (k->next >= 0)
        p->blocks[k->next].prev = k->prev;
    else
        p->lru_tail = k->prev;
    k->prev = k->next = -1;
    k->in_lru = false;
    p->n_lru--;
}

static void index_remove(tdm_kv_pool_t *p, int32_t b)
{
    int32_t *link = &p->buckets[bucket_of(p, p->blocks[b].key)];
    while (*link >= 0 && *link != b)
        link = &p->blocks[*link].hnext;
    if (*link == b)
        *link = p->blocks[b].hnext;
    p->blocks[b].hnext = -1;
    p->blocks[b].has_key = false;
}

int32_t tdm_kv_pool_alloc(tdm_kv_pool_t *p)
{
    int32_t b;
    if (p->n_plain > 0) {
        b = p->plain[--p->n_plain];
    } else if (p->lru_head >= 0) {
        b = p->lru_head; /* evict the least recently freed cached prefix */
        lru_unlink(p, b);
        index_remove(p, b);
    } else {
        return -1;
    }
    p->blocks[b].ref = 1;
    return b;
}

void tdm_kv_pool_release(tdm_kv_pool_t *p, int32_t b)
{
    tdm_kv_block_t *k = &p->blocks[b];
    if (--k->ref > 0)
        return;
    if (k->has_key) {
        k->prev = p->lru_tail;
        k->next = -1;
        if (p->lru_tail >= 0)
            p->blocks[p->lru_tail].next = b;
        else
            p->lru_head = b;
        p->lru_tail = b;
        k->in_lru = true;
        p->n_lru++;
    } else {
        p->plain[p->n_plain++] = b;
    }
}

static int32_t index_find(const tdm_kv_pool_t *p, tdm_hash128_t key)
{
    for (int32_t b = p->buckets[bucket_of(p, key)]; b >= 0; b = p->blocks[b].hnext)
        if (p->blocks[b].key.lo == key.lo && p->blocks[b].key.hi == key.hi)
            return b;
    return -1;
}

int32_t tdm_kv_pool_acquire_cached(tdm_kv_pool_t *p, tdm_hash128_t key)
{
    int32_t b = index_find(p, key);
    if (b < 0)
        return -1;
    if (p->blocks[b].in_lru)
        lru_unlink(p, b);
    p->blocks[b].ref++;
    return b;
}

void tdm_kv_pool_register(tdm_kv_pool_t *p, int32_t b, tdm_hash128_t key)
{
    if (p->blocks[b].has_key || index_find(p, key) >= 0)
        return;
    tdm_kv_block_t *k = &p->blocks[b];
    k->key = key;
    k->has_key = true;
    uint32_t h = bucket_of(p, key);
    k->hnext = p->buckets[h];
    p->buckets[h] = b;
}
