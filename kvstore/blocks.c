/* tandem-kvstore: block memory. The layout and the rules are in blocks.h;
 * docs/kvstore-pool.md explains the allocator. */
#include "blocks.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "tandem/log.h"

#define MOD "kvstore"

#define NIL       UINT32_MAX  /* no granule / no block */
#define EDGE_FREE 0x80000000u /* edge[]: the extent is free */
#define EDGE_LEN  0x7fffffffu /* edge[]: its length in granules */
#define GEN_MASK  0x7fffffffu /* generations fit in the id's bits 32..62 */

/* Which list a granule heads (blk_t.in). */
enum { IN_NONE = 0, IN_LRU, IN_LEASED, IN_RECEIVING, IN_FREE };

/* The state of a granule's blk_t; anything but a live block's first granule
 * is FREE. */
enum { ST_FREE = 0 };

typedef struct blk_list {
    uint32_t head, tail; /* head: least recent (LRU), tail: most recent */
    uint32_t n;
} blk_list_t;

/* One per granule; meaningful at the first granule of a block (all fields)
 * or of a free extent (prev, next, in). 56 bytes. */
typedef struct blk {
    tdm_hash128_t key;
    uint64_t lease_until; /* ms; 0: no lease */
    uint32_t prev, next;  /* links in the list named by `in` */
    uint32_t hnext;       /* next block in the same hash bucket */
    uint32_t length;      /* payload bytes */
    uint32_t gen;         /* bumped at every block made here; in the id */
    tdm_kvs_owner_t lease_owner;
    tdm_kvs_owner_t owner; /* RECEIVING: who sends the payload */
    uint16_t pins;
    uint8_t state; /* ST_FREE or a tdm_kvs_block_state_t */
    uint8_t in;    /* IN_* */
} blk_t;

struct tdm_kvs_blocks {
    uint64_t granule;
    unsigned granule_shift;
    uint64_t max_block_bytes;
    uint32_t n_granules;
    uint32_t max_bin; /* largest exact-size bin: max_block_bytes in granules */
    uint32_t n_bins;  /* max_bin + 2: bin 0 unused, bin max_bin + 1 is "larger" */
    uint32_t n_words; /* of binmap */

    blk_t *blk;       /* (n_granules) a block's id is its first granule */
    uint32_t *edge;   /* (n_granules) len | EDGE_FREE at each extent's ends */
    uint32_t *bucket; /* (bucket_mask + 1) hash chains through blk_t.hnext */
    uint32_t bucket_mask;
    blk_list_t *bin;  /* (n_bins) free extents by size */
    uint64_t *binmap; /* (n_words) bit k: bin[k] is not empty */

    blk_list_t lru;       /* READY, unleased, unpinned */
    blk_list_t leased;    /* READY with lease_until != 0 */
    blk_list_t receiving; /* RECEIVING */
    uint64_t lease_min;   /* <= every lease_until on `leased` */

    uint64_t used;     /* granules held by blocks */
    uint64_t reserved; /* granules held by RECEIVING blocks */
    uint64_t lru_gran; /* granules on the LRU list */
    uint64_t n_free_ext;
    uint64_t n_ready, n_doomed, n_leased, n_pinned;
    uint64_t hits, misses, evictions;
    uint64_t metadata_bytes;
};

/* ---- extents and free lists ------------------------------------------ */

static inline uint32_t ext_len(const tdm_kvs_blocks_t *s, uint32_t g)
{
    return s->edge[g] & EDGE_LEN;
}

static inline bool ext_is_free(const tdm_kvs_blocks_t *s, uint32_t g)
{
    return (s->edge[g] & EDGE_FREE) != 0;
}

static inline void ext_set(tdm_kvs_blocks_t *s, uint32_t g, uint32_t len, bool is_free)
{
    uint32_t e = len | (is_free ? EDGE_FREE : 0);
    s->edge[g] = e;
    s->edge[g + len - 1] = e;
}

static inline uint32_t bin_of(const tdm_kvs_blocks_t *s, uint32_t len)
{
    return len <= s->max_bin ? len : s->max_bin + 1;
}

static inline uint32_t granules_of(const tdm_kvs_blocks_t *s, uint64_t bytes)
{
    return (uint32_t)((bytes + s->granule - 1) >> s->granule_shift);
}

static void list_push_tail(tdm_kvs_blocks_t *s, blk_list_t *l, uint32_t g, uint8_t in)
{
    blk_t *b = &s->blk[g];
    b->prev = l->tail;
    b->next = NIL;
    if (l->tail != NIL)
        s->blk[l->tail].next = g;
    else
        l->head = g;
    l->tail = g;
    l->n++;
    b->in = in;
}

static void list_unlink(tdm_kvs_blocks_t *s, blk_list_t *l, uint32_t g)
{
    blk_t *b = &s->blk[g];
    if (b->prev != NIL)
        s->blk[b->prev].next = b->next;
    else
        l->head = b->next;
    if (b->next != NIL)
        s->blk[b->next].prev = b->prev;
    else
        l->tail = b->prev;
    b->prev = b->next = NIL;
    l->n--;
    b->in = IN_NONE;
}

/* Makes [g, g + len) a free extent on its bin. The caller made sure that
 * neither neighbour is free. */
static void free_insert(tdm_kvs_blocks_t *s, uint32_t g, uint32_t len)
{
    uint32_t k = bin_of(s, len);
    ext_set(s, g, len, true);
    list_push_tail(s, &s->bin[k], g, IN_FREE);
    s->binmap[k >> 6] |= 1ull << (k & 63);
    s->n_free_ext++;
}

static void free_remove(tdm_kvs_blocks_t *s, uint32_t g)
{
    uint32_t k = bin_of(s, ext_len(s, g));
    list_unlink(s, &s->bin[k], g);
    if (s->bin[k].n == 0)
        s->binmap[k >> 6] &= ~(1ull << (k & 63));
    s->n_free_ext--;
}

/* The first non-empty bin >= k, or NIL. */
static uint32_t bin_find(const tdm_kvs_blocks_t *s, uint32_t k)
{
    uint32_t w = k >> 6;
    uint64_t bits = s->binmap[w] & (~0ull << (k & 63));
    while (bits == 0) {
        if (++w == s->n_words)
            return NIL;
        bits = s->binmap[w];
    }
    return (w << 6) + (uint32_t)__builtin_ctzll(bits);
}

/* An extent of exactly n granules (1 <= n <= max_bin), or NIL: the smallest
 * free extent that fits (any one of the larger-than-max_bin extents), split. */
static uint32_t ext_alloc(tdm_kvs_blocks_t *s, uint32_t n)
{
    uint32_t k = bin_find(s, n);
    if (k == NIL)
        return NIL;
    uint32_t g = s->bin[k].tail; /* LIFO: the rest of a split is used next */
    uint32_t len = ext_len(s, g);
    free_remove(s, g);
    if (len > n)
        free_insert(s, g + n, len - n);
    ext_set(s, g, n, false);
    s->used += n;
    return g;
}

/* Frees the extent that starts at g and merges it with free neighbours;
 * returns the length of the merged free extent. */
static uint32_t ext_free(tdm_kvs_blocks_t *s, uint32_t g)
{
    uint32_t len = ext_len(s, g);
    uint32_t start = g, end = g + len;
    s->used -= len;
    if (start > 0 && ext_is_free(s, start - 1)) {
        uint32_t left = ext_len(s, start - 1);
        start -= left;
        free_remove(s, start);
        len += left;
    }
    if (end < s->n_granules && ext_is_free(s, end)) {
        len += ext_len(s, end);
        free_remove(s, end);
    }
    free_insert(s, start, len);
    return len;
}

static uint64_t largest_free(const tdm_kvs_blocks_t *s)
{
    uint32_t best = 0;
    for (uint32_t w = s->n_words; w-- > 0;) {
        if (s->binmap[w] != 0) {
            best = (w << 6) + 63 - (uint32_t)__builtin_clzll(s->binmap[w]);
            break;
        }
    }
    if (best == s->max_bin + 1) {
        uint32_t most = 0;
        for (uint32_t g = s->bin[best].head; g != NIL; g = s->blk[g].next)
            if (ext_len(s, g) > most)
                most = ext_len(s, g);
        best = most;
    }
    return (uint64_t)best << s->granule_shift;
}

/* ---- index ------------------------------------------------------------- */

static inline uint32_t bucket_of(const tdm_kvs_blocks_t *s, tdm_hash128_t key)
{
    uint64_t h = (key.lo ^ (key.hi * 0x9e3779b97f4a7c15ull)) * 0xff51afd7ed558ccdull;
    return (uint32_t)(h >> 32) & s->bucket_mask;
}

static inline bool key_eq(tdm_hash128_t a, tdm_hash128_t b)
{
    return a.lo == b.lo && a.hi == b.hi;
}

/* The READY or RECEIVING block of key, or NIL. */
static uint32_t index_find(const tdm_kvs_blocks_t *s, tdm_hash128_t key)
{
    for (uint32_t g = s->bucket[bucket_of(s, key)]; g != NIL; g = s->blk[g].hnext)
        if (key_eq(s->blk[g].key, key))
            return g;
    return NIL;
}

static void index_insert(tdm_kvs_blocks_t *s, uint32_t g)
{
    uint32_t *head = &s->bucket[bucket_of(s, s->blk[g].key)];
    s->blk[g].hnext = *head;
    *head = g;
}

static void index_remove(tdm_kvs_blocks_t *s, uint32_t g)
{
    uint32_t *link = &s->bucket[bucket_of(s, s->blk[g].key)];
    while (*link != g) {
        assert(*link != NIL);
        link = &s->blk[*link].hnext;
    }
    *link = s->blk[g].hnext;
    s->blk[g].hnext = NIL;
}

/* ---- block lists and leases -------------------------------------------- */

static void lru_push(tdm_kvs_blocks_t *s, uint32_t g)
{
    list_push_tail(s, &s->lru, g, IN_LRU);
    s->lru_gran += ext_len(s, g);
}

static void lru_remove(tdm_kvs_blocks_t *s, uint32_t g)
{
    list_unlink(s, &s->lru, g);
    s->lru_gran -= ext_len(s, g);
}

/* Takes a block off whichever block list it is on. */
static void detach(tdm_kvs_blocks_t *s, uint32_t g)
{
    switch (s->blk[g].in) {
    case IN_LRU: lru_remove(s, g); break;
    case IN_LEASED: list_unlink(s, &s->leased, g); break;
    case IN_RECEIVING: list_unlink(s, &s->receiving, g); break;
    default: assert(s->blk[g].in == IN_NONE); break;
    }
}

/* Puts a READY block, on no list, where its lease and pins say. */
static void place(tdm_kvs_blocks_t *s, uint32_t g)
{
    blk_t *b = &s->blk[g];
    assert(b->state == TDM_KVS_BLOCK_STATE_READY && b->in == IN_NONE);
    if (b->lease_until != 0) {
        list_push_tail(s, &s->leased, g, IN_LEASED);
        if (b->lease_until < s->lease_min)
            s->lease_min = b->lease_until;
    } else if (b->pins == 0) {
        lru_push(s, g);
    }
}

/* Ends a block's lease; a READY one moves to the LRU (unless pinned). */
static void lease_end(tdm_kvs_blocks_t *s, uint32_t g)
{
    blk_t *b = &s->blk[g];
    assert(b->lease_until != 0);
    b->lease_until = 0;
    b->lease_owner = 0;
    s->n_leased--;
    if (b->in == IN_LEASED) {
        list_unlink(s, &s->leased, g);
        place(s, g);
    }
}

/* Sets or extends a block's lease to at least `until`, owned by `owner`. */
static void lease_grant(tdm_kvs_blocks_t *s, uint32_t g, uint64_t until, tdm_kvs_owner_t owner)
{
    blk_t *b = &s->blk[g];
    if (b->lease_until == 0)
        s->n_leased++;
    if (until > b->lease_until)
        b->lease_until = until;
    b->lease_owner = owner;
    /* On the lease list already, lease_min stays a bound: leases only grow. */
    if (b->state == TDM_KVS_BLOCK_STATE_READY && b->in != IN_LEASED) {
        detach(s, g);
        place(s, g);
    }
}

/* A lease whose time has passed (still counted until noticed). */
static inline bool lease_passed(const blk_t *b, uint64_t now)
{
    return b->lease_until != 0 && b->lease_until <= now;
}

/* A READY block was used: end a passed lease, make it the most recent. */
static void touch(tdm_kvs_blocks_t *s, uint32_t g, uint64_t now)
{
    if (lease_passed(&s->blk[g], now)) {
        lease_end(s, g);
    } else if (s->blk[g].in == IN_LRU) {
        lru_remove(s, g);
        lru_push(s, g);
    }
}

/* Frees a block that is on no list and not in the index. */
static uint32_t block_free(tdm_kvs_blocks_t *s, uint32_t g)
{
    blk_t *b = &s->blk[g];
    assert(b->in == IN_NONE && b->pins == 0);
    b->state = ST_FREE;
    return ext_free(s, g);
}

static inline tdm_kvs_block_id_t id_of(const tdm_kvs_blocks_t *s, uint32_t g)
{
    return (tdm_kvs_block_id_t)(((uint64_t)s->blk[g].gen << 32) | g);
}

/* The first granule of the live block `id`, or NIL. */
static uint32_t id_resolve(const tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id)
{
    if (id < 0)
        return NIL;
    uint64_t g = (uint64_t)id & 0xffffffffu;
    if (g >= s->n_granules || s->blk[g].state == ST_FREE || s->blk[g].gen != (uint64_t)id >> 32)
        return NIL;
    return (uint32_t)g;
}

/* ---- create / destroy -------------------------------------------------- */

tdm_status_t tdm_kvs_blocks_create(uint64_t capacity, uint64_t max_block_bytes, uint64_t granule,
                                   tdm_kvs_blocks_t **out)
{
    if (granule == 0)
        granule = TDM_KVS_BLOCKS_DEFAULT_GRANULE;
    if ((granule & (granule - 1)) != 0) {
        tdm_log_error(MOD, "granule %llu is not a power of two", (unsigned long long)granule);
        return TDM_ERR_INVALID;
    }
    if (max_block_bytes == 0 || max_block_bytes > UINT32_MAX) {
        tdm_log_error(MOD, "max block bytes %llu is outside 1 .. 4 GiB - 1",
                      (unsigned long long)max_block_bytes);
        return TDM_ERR_INVALID;
    }
    uint64_t n_granules = capacity / granule;
    uint64_t max_bin = (max_block_bytes + granule - 1) / granule;
    if (n_granules < max_bin || n_granules > EDGE_LEN) {
        tdm_log_error(MOD,
                      "capacity %llu bytes is %llu granules of %llu bytes; it must hold one "
                      "block of %llu bytes and at most 2^31 - 1 granules",
                      (unsigned long long)capacity, (unsigned long long)n_granules,
                      (unsigned long long)granule, (unsigned long long)max_block_bytes);
        return TDM_ERR_INVALID;
    }

    tdm_kvs_blocks_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        goto err_nomem;
    s->granule = granule;
    s->granule_shift = (unsigned)__builtin_ctzll(granule);
    s->max_block_bytes = max_block_bytes;
    s->n_granules = (uint32_t)n_granules;
    s->max_bin = (uint32_t)max_bin;
    s->n_bins = s->max_bin + 2;
    s->n_words = (s->n_bins + 63) / 64;
    uint64_t n_buckets = 16;
    while (n_buckets < n_granules)
        n_buckets <<= 1;
    s->bucket_mask = (uint32_t)(n_buckets - 1);

    /* calloc: state ST_FREE and in IN_NONE everywhere, pages mapped lazily. */
    s->blk = calloc(n_granules, sizeof(*s->blk));
    if (s->blk == NULL)
        goto err_free_store;
    s->edge = calloc(n_granules, sizeof(*s->edge));
    if (s->edge == NULL)
        goto err_free_blk;
    s->bucket = malloc(n_buckets * sizeof(*s->bucket));
    if (s->bucket == NULL)
        goto err_free_edge;
    s->bin = malloc(s->n_bins * sizeof(*s->bin));
    if (s->bin == NULL)
        goto err_free_bucket;
    s->binmap = calloc(s->n_words, sizeof(*s->binmap));
    if (s->binmap == NULL)
        goto err_free_bin;
    s->metadata_bytes = sizeof(*s) + n_granules * (sizeof(*s->blk) + sizeof(*s->edge)) +
                        n_buckets * sizeof(*s->bucket) + s->n_bins * sizeof(*s->bin) +
                        s->n_words * sizeof(*s->binmap);

    memset(s->bucket, 0xff, n_buckets * sizeof(*s->bucket));
    for (uint32_t k = 0; k < s->n_bins; k++)
        s->bin[k] = (blk_list_t){NIL, NIL, 0};
    s->lru = s->leased = s->receiving = (blk_list_t){NIL, NIL, 0};
    s->lease_min = UINT64_MAX;
    free_insert(s, 0, s->n_granules);
    *out = s;
    return TDM_OK;

err_free_bin:
    free(s->bin);
err_free_bucket:
    free(s->bucket);
err_free_edge:
    free(s->edge);
err_free_blk:
    free(s->blk);
err_free_store:
    free(s);
err_nomem:
    tdm_log_error(MOD, "out of memory for the metadata of %llu granules",
                  (unsigned long long)n_granules);
    return TDM_ERR_NOMEM;
}

void tdm_kvs_blocks_destroy(tdm_kvs_blocks_t *s)
{
    if (s == NULL)
        return;
    free(s->binmap);
    free(s->bin);
    free(s->bucket);
    free(s->edge);
    free(s->blk);
    free(s);
}

/* ---- operations -------------------------------------------------------- */

static void receiving_free(tdm_kvs_blocks_t *s, uint32_t g)
{
    blk_t *b = &s->blk[g];
    list_unlink(s, &s->receiving, g);
    index_remove(s, g);
    if (b->lease_until != 0) {
        b->lease_until = 0;
        s->n_leased--;
    }
    s->reserved -= ext_len(s, g);
    block_free(s, g);
}

static void evict(tdm_kvs_blocks_t *s, uint32_t g, uint32_t *merged)
{
    lru_remove(s, g);
    index_remove(s, g);
    s->n_ready--;
    s->evictions++;
    *merged = block_free(s, g);
}

tdm_status_t tdm_kvs_blocks_reserve(tdm_kvs_blocks_t *s, tdm_hash128_t key, uint64_t length,
                                    uint32_t lease_ms, uint64_t now_ms, tdm_kvs_owner_t owner,
                                    tdm_kvs_reservation_t *out)
{
    if (length == 0 || length > s->max_block_bytes)
        return TDM_ERR_INVALID;
    uint64_t until = lease_ms == 0                    ? 0
                     : now_ms > UINT64_MAX - lease_ms ? UINT64_MAX
                                                      : now_ms + lease_ms;

    uint32_t g = index_find(s, key);
    if (g != NIL) {
        if (s->blk[g].state == TDM_KVS_BLOCK_STATE_READY)
            touch(s, g, now_ms);
        if (until != 0)
            lease_grant(s, g, until, owner);
        *out = (tdm_kvs_reservation_t){.id = id_of(s, g),
                                       .created = false,
                                       .offset = (uint64_t)g << s->granule_shift,
                                       .length = s->blk[g].length};
        return TDM_OK;
    }

    uint32_t n = granules_of(s, length);
    g = ext_alloc(s, n);
    if (g == NIL) {
        tdm_kvs_blocks_expire(s, now_ms);
        /* Evicting everything evictable could not make room: evict nothing. */
        if ((uint64_t)s->n_granules - s->used + s->lru_gran < n)
            return TDM_ERR_NOMEM;
        while (g == NIL) {
            if (s->lru.head == NIL)
                return TDM_ERR_NOMEM; /* fragmented by leased, pinned or receiving blocks */
            uint32_t merged;
            evict(s, s->lru.head, &merged);
            if (merged >= n) {
                g = ext_alloc(s, n);
                assert(g != NIL);
            }
        }
    }

    blk_t *b = &s->blk[g];
    b->key = key;
    b->lease_until = 0;
    b->lease_owner = 0;
    b->length = (uint32_t)length;
    b->gen = (b->gen + 1) & GEN_MASK;
    b->owner = owner;
    b->pins = 0;
    b->state = TDM_KVS_BLOCK_STATE_RECEIVING;
    index_insert(s, g);
    list_push_tail(s, &s->receiving, g, IN_RECEIVING);
    s->reserved += n;
    if (until != 0)
        lease_grant(s, g, until, owner);
    *out = (tdm_kvs_reservation_t){.id = id_of(s, g),
                                   .created = true,
                                   .offset = (uint64_t)g << s->granule_shift,
                                   .length = length};
    return TDM_OK;
}

tdm_status_t tdm_kvs_blocks_commit(tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id, uint64_t now_ms)
{
    uint32_t g = id_resolve(s, id);
    if (g == NIL || s->blk[g].state != TDM_KVS_BLOCK_STATE_RECEIVING)
        return TDM_ERR_INVALID;
    blk_t *b = &s->blk[g];
    list_unlink(s, &s->receiving, g);
    s->reserved -= ext_len(s, g);
    b->state = TDM_KVS_BLOCK_STATE_READY;
    s->n_ready++;
    if (lease_passed(b, now_ms)) {
        b->lease_until = 0;
        b->lease_owner = 0;
        s->n_leased--;
    }
    place(s, g);
    return TDM_OK;
}

tdm_status_t tdm_kvs_blocks_abort(tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id)
{
    uint32_t g = id_resolve(s, id);
    if (g == NIL || s->blk[g].state != TDM_KVS_BLOCK_STATE_RECEIVING)
        return TDM_ERR_INVALID;
    receiving_free(s, g);
    return TDM_OK;
}

tdm_kvs_block_id_t tdm_kvs_blocks_find(tdm_kvs_blocks_t *s, tdm_hash128_t key, uint64_t now_ms)
{
    uint32_t g = index_find(s, key);
    if (g == NIL || s->blk[g].state != TDM_KVS_BLOCK_STATE_READY) {
        s->misses++;
        return -1;
    }
    touch(s, g, now_ms);
    s->hits++;
    return id_of(s, g);
}

tdm_kvs_block_id_t tdm_kvs_blocks_peek(const tdm_kvs_blocks_t *s, tdm_hash128_t key)
{
    uint32_t g = index_find(s, key);
    if (g == NIL || s->blk[g].state != TDM_KVS_BLOCK_STATE_READY)
        return -1;
    return id_of(s, g);
}

tdm_status_t tdm_kvs_blocks_info(const tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id,
                                 tdm_kvs_block_info_t *out)
{
    uint32_t g = id_resolve(s, id);
    if (g == NIL)
        return TDM_ERR_INVALID;
    const blk_t *b = &s->blk[g];
    *out = (tdm_kvs_block_info_t){.key = b->key,
                                  .state = (tdm_kvs_block_state_t)b->state,
                                  .offset = (uint64_t)g << s->granule_shift,
                                  .length = b->length,
                                  .extent_bytes = (uint64_t)ext_len(s, g) << s->granule_shift,
                                  .pins = b->pins,
                                  .lease_until_ms = b->lease_until,
                                  .lease_owner = b->lease_owner,
                                  .owner = b->owner};
    return TDM_OK;
}

tdm_status_t tdm_kvs_blocks_pin(tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id)
{
    uint32_t g = id_resolve(s, id);
    if (g == NIL)
        return TDM_ERR_INVALID;
    blk_t *b = &s->blk[g];
    if (b->state == TDM_KVS_BLOCK_STATE_DOOMED)
        return TDM_ERR_NOT_FOUND;
    if (b->state != TDM_KVS_BLOCK_STATE_READY)
        return TDM_ERR_INVALID;
    if (b->pins == TDM_KVS_BLOCKS_MAX_PINS)
        return TDM_ERR_BUSY;
    if (b->pins++ == 0) {
        s->n_pinned++;
        if (b->in == IN_LRU)
            lru_remove(s, g);
    }
    return TDM_OK;
}

tdm_status_t tdm_kvs_blocks_unpin(tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id)
{
    uint32_t g = id_resolve(s, id);
    if (g == NIL || s->blk[g].pins == 0)
        return TDM_ERR_INVALID;
    blk_t *b = &s->blk[g];
    if (--b->pins > 0)
        return TDM_OK;
    s->n_pinned--;
    if (b->state == TDM_KVS_BLOCK_STATE_DOOMED) {
        s->n_doomed--;
        block_free(s, g);
    } else if (b->in == IN_NONE) {
        place(s, g);
    }
    return TDM_OK;
}

tdm_status_t tdm_kvs_blocks_release_lease(tdm_kvs_blocks_t *s, tdm_hash128_t key)
{
    uint32_t g = index_find(s, key);
    if (g == NIL)
        return TDM_ERR_NOT_FOUND;
    if (s->blk[g].lease_until != 0)
        lease_end(s, g);
    return TDM_OK;
}

tdm_status_t tdm_kvs_blocks_delete(tdm_kvs_blocks_t *s, tdm_hash128_t key)
{
    uint32_t g = index_find(s, key);
    if (g == NIL || s->blk[g].state != TDM_KVS_BLOCK_STATE_READY)
        return TDM_ERR_NOT_FOUND;
    blk_t *b = &s->blk[g];
    index_remove(s, g);
    detach(s, g);
    if (b->lease_until != 0) {
        b->lease_until = 0;
        b->lease_owner = 0;
        s->n_leased--;
    }
    s->n_ready--;
    if (b->pins > 0) {
        b->state = TDM_KVS_BLOCK_STATE_DOOMED;
        s->n_doomed++;
    } else {
        block_free(s, g);
    }
    return TDM_OK;
}

uint32_t tdm_kvs_blocks_expire(tdm_kvs_blocks_t *s, uint64_t now_ms)
{
    if (s->leased.n == 0 || now_ms < s->lease_min)
        return 0;
    uint32_t ended = 0;
    uint64_t least = UINT64_MAX;
    for (uint32_t g = s->leased.head, next; g != NIL; g = next) {
        next = s->blk[g].next;
        if (s->blk[g].lease_until <= now_ms) {
            lease_end(s, g); /* moves g off the lease list, after `next` is read */
            ended++;
        } else if (s->blk[g].lease_until < least) {
            least = s->blk[g].lease_until;
        }
    }
    s->lease_min = least;
    return ended;
}

uint32_t tdm_kvs_blocks_drop_owner(tdm_kvs_blocks_t *s, tdm_kvs_owner_t owner)
{
    uint32_t n = 0;
    for (uint32_t g = s->receiving.head, next; g != NIL; g = next) {
        blk_t *b = &s->blk[g];
        next = b->next;
        if (b->owner == owner) {
            receiving_free(s, g);
            n++;
        } else if (b->lease_until != 0 && b->lease_owner == owner) {
            lease_end(s, g);
            n++;
        }
    }
    for (uint32_t g = s->leased.head, next; g != NIL; g = next) {
        next = s->blk[g].next;
        if (s->blk[g].lease_owner == owner) {
            lease_end(s, g);
            n++;
        }
    }
    return n;
}

void tdm_kvs_blocks_stats(const tdm_kvs_blocks_t *s, tdm_kvs_blocks_stats_t *out)
{
    unsigned sh = s->granule_shift;
    *out = (tdm_kvs_blocks_stats_t){
        .blocks = s->n_ready,
        .receiving = s->receiving.n,
        .doomed = s->n_doomed,
        .bytes_used = s->used << sh,
        .bytes_reserved = s->reserved << sh,
        .bytes_free = ((uint64_t)s->n_granules - s->used) << sh,
        .bytes_evictable = s->lru_gran << sh,
        .capacity = (uint64_t)s->n_granules << sh,
        .leased = s->n_leased,
        .pinned = s->n_pinned,
        .hits = s->hits,
        .misses = s->misses,
        .evictions = s->evictions,
        .largest_free = largest_free(s),
        .free_extents = s->n_free_ext,
        .metadata_bytes = s->metadata_bytes,
    };
}

/* ---- consistency check ------------------------------------------------- */

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        tdm_log_error(MOD, "check: " __VA_ARGS__);                                                 \
        return TDM_ERR_INTERNAL;                                                                   \
    } while (0)

/* Walks a list: links both ways, tag, count; *gran sums extent lengths. */
static tdm_status_t check_list(const tdm_kvs_blocks_t *s, const blk_list_t *l, uint8_t in,
                               const char *name, uint64_t *gran)
{
    uint32_t prev = NIL, steps = 0;
    *gran = 0;
    for (uint32_t g = l->head; g != NIL; g = s->blk[g].next) {
        if (g >= s->n_granules || ++steps > l->n)
            FAIL("list %s: bad link or more than %u entries", name, l->n);
        if (s->blk[g].prev != prev || s->blk[g].in != in)
            FAIL("list %s: granule %u has prev %u (want %u) and tag %u (want %u)", name, g,
                 s->blk[g].prev, prev, s->blk[g].in, in);
        *gran += ext_len(s, g);
        prev = g;
    }
    if (steps != l->n || l->tail != prev)
        FAIL("list %s: %u entries, count says %u; tail %u, last %u", name, steps, l->n, l->tail,
             prev);
    return TDM_OK;
}

tdm_status_t tdm_kvs_blocks_check(const tdm_kvs_blocks_t *s)
{
    uint64_t used = 0, reserved = 0, lru_gran = 0, n_free = 0, n_ready = 0, n_doomed = 0;
    uint64_t n_leased = 0, n_pinned = 0, n_lru = 0, n_lease_list = 0, n_recv = 0;
    bool prev_free = false;
    for (uint32_t g = 0; g < s->n_granules;) {
        uint32_t len = ext_len(s, g);
        if (len == 0 || len > s->n_granules - g)
            FAIL("extent at granule %u has length %u", g, len);
        if (s->edge[g + len - 1] != s->edge[g])
            FAIL("extent at granule %u: last edge %#x differs from first %#x", g,
                 s->edge[g + len - 1], s->edge[g]);
        for (uint32_t i = g + 1; i < g + len; i++)
            if (s->blk[i].state != ST_FREE)
                FAIL("granule %u inside the extent at %u is marked as a block", i, g);
        const blk_t *b = &s->blk[g];
        if (ext_is_free(s, g)) {
            if (prev_free)
                FAIL("free extent at granule %u follows another free extent", g);
            if (b->state != ST_FREE || b->in != IN_FREE)
                FAIL("free extent at granule %u has state %u tag %u", g, b->state, b->in);
            n_free++;
            prev_free = true;
            g += len;
            continue;
        }
        prev_free = false;
        used += len;
        if (b->length == 0 || b->length > s->max_block_bytes || granules_of(s, b->length) != len)
            FAIL("block at granule %u: %u bytes in %u granules", g, b->length, len);
        uint8_t want = IN_NONE;
        switch (b->state) {
        case TDM_KVS_BLOCK_STATE_RECEIVING:
            want = IN_RECEIVING;
            reserved += len;
            n_recv++;
            if (b->pins != 0)
                FAIL("receiving block at granule %u is pinned", g);
            break;
        case TDM_KVS_BLOCK_STATE_READY:
            want = b->lease_until != 0 ? IN_LEASED : b->pins == 0 ? IN_LRU : IN_NONE;
            n_ready++;
            if (want == IN_LRU) {
                n_lru++;
                lru_gran += len;
            } else if (want == IN_LEASED) {
                n_lease_list++;
                if (b->lease_until < s->lease_min)
                    FAIL("leased block at granule %u: lease %llu under the bound %llu", g,
                         (unsigned long long)b->lease_until, (unsigned long long)s->lease_min);
            }
            break;
        case TDM_KVS_BLOCK_STATE_DOOMED:
            n_doomed++;
            if (b->pins == 0 || b->lease_until != 0)
                FAIL("doomed block at granule %u has %u pins, lease %llu", g, b->pins,
                     (unsigned long long)b->lease_until);
            break;
        default: FAIL("used extent at granule %u has state %u", g, b->state);
        }
        if (b->in != want)
            FAIL("block at granule %u (state %u) is on list %u, want %u", g, b->state, b->in, want);
        uint32_t found = index_find(s, b->key);
        if ((b->state == TDM_KVS_BLOCK_STATE_DOOMED) != (found != g))
            FAIL("block at granule %u (state %u): index finds %u", g, b->state, found);
        n_leased += b->lease_until != 0;
        n_pinned += b->pins != 0;
        g += len;
    }
    if (used != s->used || reserved != s->reserved || lru_gran != s->lru_gran ||
        n_free != s->n_free_ext)
        FAIL("counters: used %llu/%llu reserved %llu/%llu lru %llu/%llu free extents %llu/%llu",
             (unsigned long long)used, (unsigned long long)s->used, (unsigned long long)reserved,
             (unsigned long long)s->reserved, (unsigned long long)lru_gran,
             (unsigned long long)s->lru_gran, (unsigned long long)n_free,
             (unsigned long long)s->n_free_ext);
    if (n_ready != s->n_ready || n_doomed != s->n_doomed || n_leased != s->n_leased ||
        n_pinned != s->n_pinned)
        FAIL("counters: ready %llu/%llu doomed %llu/%llu leased %llu/%llu pinned %llu/%llu",
             (unsigned long long)n_ready, (unsigned long long)s->n_ready,
             (unsigned long long)n_doomed, (unsigned long long)s->n_doomed,
             (unsigned long long)n_leased, (unsigned long long)s->n_leased,
             (unsigned long long)n_pinned, (unsigned long long)s->n_pinned);

    uint64_t gran;
    if (check_list(s, &s->lru, IN_LRU, "lru", &gran) != TDM_OK)
        return TDM_ERR_INTERNAL;
    if (s->lru.n != n_lru || gran != lru_gran)
        FAIL("lru holds %u blocks, %llu granules; want %llu, %llu", s->lru.n,
             (unsigned long long)gran, (unsigned long long)n_lru, (unsigned long long)lru_gran);
    if (check_list(s, &s->leased, IN_LEASED, "leased", &gran) != TDM_OK)
        return TDM_ERR_INTERNAL;
    if (s->leased.n != n_lease_list)
        FAIL("lease list holds %u blocks, want %llu", s->leased.n,
             (unsigned long long)n_lease_list);
    if (check_list(s, &s->receiving, IN_RECEIVING, "receiving", &gran) != TDM_OK)
        return TDM_ERR_INTERNAL;
    if (s->receiving.n != n_recv || gran != reserved)
        FAIL("receiving list holds %u blocks, %llu granules; want %llu, %llu", s->receiving.n,
             (unsigned long long)gran, (unsigned long long)n_recv, (unsigned long long)reserved);

    uint64_t free_gran = 0, listed = 0;
    for (uint32_t k = 0; k < s->n_bins; k++) {
        if (check_list(s, &s->bin[k], IN_FREE, "free bin", &gran) != TDM_OK)
            return TDM_ERR_INTERNAL;
        for (uint32_t g = s->bin[k].head; g != NIL; g = s->blk[g].next)
            if (!ext_is_free(s, g) || bin_of(s, ext_len(s, g)) != k)
                FAIL("bin %u holds granule %u (edge %#x)", k, g, s->edge[g]);
        bool bit = (s->binmap[k >> 6] >> (k & 63)) & 1;
        if (bit != (s->bin[k].n != 0))
            FAIL("bitmap bit %u is %d, bin has %u extents", k, bit, s->bin[k].n);
        free_gran += gran;
        listed += s->bin[k].n;
    }
    for (uint32_t k = s->n_bins; k < s->n_words * 64; k++)
        if ((s->binmap[k >> 6] >> (k & 63)) & 1)
            FAIL("bitmap bit %u past the last bin is set", k);
    if (listed != n_free || free_gran + used != s->n_granules)
        FAIL("free lists hold %llu extents, %llu granules; walk found %llu extents, %llu used "
             "of %u",
             (unsigned long long)listed, (unsigned long long)free_gran, (unsigned long long)n_free,
             (unsigned long long)used, s->n_granules);

    uint64_t indexed = 0;
    for (uint64_t h = 0; h <= s->bucket_mask; h++) {
        for (uint32_t g = s->bucket[h]; g != NIL; g = s->blk[g].hnext) {
            if (g >= s->n_granules || ++indexed > n_ready + n_recv)
                FAIL("index: bad link or too many entries in bucket %llu", (unsigned long long)h);
            if ((s->blk[g].state != TDM_KVS_BLOCK_STATE_READY &&
                 s->blk[g].state != TDM_KVS_BLOCK_STATE_RECEIVING) ||
                bucket_of(s, s->blk[g].key) != h)
                FAIL("index: bucket %llu holds granule %u in state %u", (unsigned long long)h, g,
                     s->blk[g].state);
        }
    }
    if (indexed != n_ready + n_recv)
        FAIL("index holds %llu blocks, want %llu", (unsigned long long)indexed,
             (unsigned long long)(n_ready + n_recv));
    return TDM_OK;
}
