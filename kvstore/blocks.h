/* tandem-kvstore: the block memory of the store (pool allocator and block
 * index with LRU eviction, leases and pins). Pure data structures: no I/O,
 * no clock, no locks; one thread (the server's progress thread) owns it.
 *
 * Memory. The server maps ONE region of `capacity` bytes and registers it
 * with UCX; this module never touches the payload bytes and knows the region
 * only by offsets: a block's payload lives at base + offset, length bytes,
 * in one contiguous extent (a UCX rendezvous receive needs one). All
 * metadata is allocated by create(); no call allocates afterwards.
 *
 * Allocator (docs/kvstore-pool.md has the long form):
 *   - The region is cut into granules (default 4 KiB); an extent is a run
 *     of whole granules, a block holds ceil(length / granule) of them.
 *     n_granules = capacity / granule (the tail under one granule is unused).
 *   - Side arrays indexed by granule: edge[g] holds "length in granules |
 *     free flag" at the first and the last granule of every extent, used or
 *     free, so a freed extent finds both neighbours in O(1) and coalesces
 *     with them: two free extents are never adjacent.
 *   - Segregated free lists: bin k (1 <= k <= max_bin, max_bin =
 *     ceil(max_block_bytes / granule)) holds free extents of exactly k
 *     granules, bin max_bin + 1 every larger one. A bitmap marks the
 *     non-empty bins; allocation takes the first non-empty bin >= the size
 *     (O(bins / 64) words): the smallest free extent that fits, or any of
 *     the large ones. The extent is split, the rest goes back to its bin.
 *   - Blocks are numbered by their first granule, so the block table is one
 *     array of n_granules entries (the most blocks there can be) overlaid
 *     with the free-list links of free extents. Metadata: 60 bytes per
 *     granule plus a 4-byte hash bucket per granule: 64 MiB for 4 GiB at
 *     4 KiB granules (1.6%).
 *
 * Blocks. A block is keyed by its 128-bit content key and is
 *   RECEIVING  reserved by reserve(): its extent is where the payload must
 *              be received; findable by reserve() ("exists") only;
 *   READY      committed: findable, evictable when unleased and unpinned;
 *   DOOMED     deleted while pinned: no longer findable, its extent is freed
 *              at the last unpin.
 * Lists: READY blocks that are unleased and unpinned are on the LRU list
 * (eviction takes its least recent end); READY blocks with a lease are on
 * the lease list; RECEIVING blocks on the receiving list.
 *
 * Leases protect a block from eviction until `lease_until_ms` (exclusive:
 * active while lease_until_ms > now). Times are caller's monotonic
 * milliseconds. A lease whose time has passed still counts until it is
 * noticed: by expire(), by find() of that block, by reserve() when it must
 * evict (it runs expire(now) first), by commit(), or it is ended by
 * release_lease(), drop_owner() or delete. Eviction therefore never spares a
 * block whose lease time has passed. An ended lease puts the block at the
 * most recent end of the LRU (unless pinned). A lease belongs to the owner
 * that set or last extended it.
 *
 * Block ids carry a generation: an id of a block that was freed (aborted,
 * evicted, deleted) is refused by every call taking an id (TDM_ERR_INVALID),
 * even if a new block starts at the same granule. Ids are >= 0; -1 is none.
 *
 * Statuses: TDM_ERR_INVALID for a bad argument, a stale id or a call in the
 * wrong state; nothing changes then. This module logs nothing except from
 * tdm_kvs_blocks_check() and create(). */
#ifndef TANDEM_KVSTORE_BLOCKS_H
#define TANDEM_KVSTORE_BLOCKS_H

#include <stdbool.h>
#include <stdint.h>

#include "tandem/hash.h"
#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_KVS_BLOCKS_DEFAULT_GRANULE 4096u
/* Most pins one block can hold at once (pin() says TDM_ERR_BUSY beyond). */
#define TDM_KVS_BLOCKS_MAX_PINS 65535u

typedef struct tdm_kvs_blocks tdm_kvs_blocks_t;
/* generation << 32 | first granule; -1: none. */
typedef int64_t tdm_kvs_block_id_t;
/* Who asked: the server's id of a client connection. Any value. */
typedef uint32_t tdm_kvs_owner_t;

typedef enum tdm_kvs_block_state {
    TDM_KVS_BLOCK_STATE_RECEIVING = 1,
    TDM_KVS_BLOCK_STATE_READY = 2,
    TDM_KVS_BLOCK_STATE_DOOMED = 3,
} tdm_kvs_block_state_t;

/* What reserve() decided. */
typedef struct tdm_kvs_reservation {
    tdm_kvs_block_id_t id;
    bool created;    /* true: a new RECEIVING block; receive the payload into
                      * [offset, offset + length) of the region, then commit()
                      * or abort(). false: the key is already READY or
                      * RECEIVING (its lease was extended): drop the payload,
                      * never write to this extent. */
    uint64_t offset; /* bytes from the start of the region */
    uint64_t length; /* payload bytes (of the existing block if !created) */
} tdm_kvs_reservation_t;

typedef struct tdm_kvs_block_info {
    tdm_hash128_t key;
    tdm_kvs_block_state_t state;
    uint64_t offset;         /* bytes from the start of the region */
    uint64_t length;         /* payload bytes */
    uint64_t extent_bytes;   /* length rounded up to granules */
    uint32_t pins;           /* sends in progress */
    uint64_t lease_until_ms; /* 0: no lease (may lie in the past, see top) */
    tdm_kvs_owner_t lease_owner;
    tdm_kvs_owner_t owner; /* RECEIVING: the client sending the payload */
} tdm_kvs_block_info_t;

typedef struct tdm_kvs_blocks_stats {
    uint64_t blocks;          /* READY (findable) blocks */
    uint64_t receiving;       /* RECEIVING reservations */
    uint64_t doomed;          /* deleted while pinned, not yet freed */
    uint64_t bytes_used;      /* granule-rounded bytes of all blocks (any state) */
    uint64_t bytes_reserved;  /* of which RECEIVING */
    uint64_t bytes_free;      /* capacity - bytes_used */
    uint64_t bytes_evictable; /* READY, unleased, unpinned (the LRU list) */
    uint64_t capacity;        /* usable bytes: n_granules * granule */
    uint64_t leased;          /* READY or RECEIVING blocks holding a lease */
    uint64_t pinned;          /* blocks with pins > 0 (DOOMED ones too) */
    uint64_t hits, misses;    /* find() */
    uint64_t evictions;
    uint64_t largest_free;   /* bytes of the largest free extent */
    uint64_t free_extents;   /* number of free extents (fragmentation) */
    uint64_t metadata_bytes; /* allocated by create() */
} tdm_kvs_blocks_stats_t;

/* A store for a region of `capacity` bytes holding blocks of 1 ..
 * max_block_bytes bytes; granule is a power of two (0: the default).
 * TDM_ERR_INVALID (logged) when granule is not a power of two, max_block_bytes
 * is 0 or over 4 GiB - 1, capacity holds less than one max_block_bytes block
 * or more than 2^31 - 1 granules; TDM_ERR_NOMEM when the metadata cannot be
 * allocated. Destroy with tdm_kvs_blocks_destroy(). */
tdm_status_t tdm_kvs_blocks_create(uint64_t capacity, uint64_t max_block_bytes, uint64_t granule,
                                   tdm_kvs_blocks_t **out);
/* Frees the metadata; the region is the caller's. Accepts NULL. */
void tdm_kvs_blocks_destroy(tdm_kvs_blocks_t *s);

/* A PUT of one block. If `key` is READY or RECEIVING: the lease (when
 * lease_ms > 0) becomes max(current, now + lease_ms) and passes to `owner`,
 * a READY block counts as used (most recent in the LRU), and out->created is
 * false. Else a new RECEIVING block owned by `owner` (with a lease until
 * now + lease_ms if lease_ms > 0), evicting least recently used evictable
 * blocks one at a time until one extent fits (leases whose time has passed
 * are ended first); out->created is true.
 * TDM_ERR_INVALID: length 0 or over max_block_bytes. TDM_ERR_NOMEM: no
 * extent even after evicting every evictable block; nothing is evicted when
 * free plus evictable bytes are too few, otherwise the evictions done stay
 * done. */
tdm_status_t tdm_kvs_blocks_reserve(tdm_kvs_blocks_t *s, tdm_hash128_t key, uint64_t length,
                                    uint32_t lease_ms, uint64_t now_ms, tdm_kvs_owner_t owner,
                                    tdm_kvs_reservation_t *out);
/* The payload of a RECEIVING block is in: it becomes READY, on the lease
 * list if its lease is still active at now_ms, else at the most recent end of
 * the LRU. TDM_ERR_INVALID for a stale id or a block not RECEIVING. */
tdm_status_t tdm_kvs_blocks_commit(tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id, uint64_t now_ms);
/* Frees a RECEIVING block (the receive failed or was cancelled). The caller
 * must be sure that nothing writes into its extent any more (the UCX receive
 * has completed or been cancelled). TDM_ERR_INVALID as for commit(). */
tdm_status_t tdm_kvs_blocks_abort(tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id);

/* GET: the READY block of `key` or -1 (RECEIVING and DOOMED blocks are
 * misses). Counts a hit or a miss; a hit becomes the most recent in the LRU
 * and ends its lease if its time has passed. Pin the block before sending. */
tdm_kvs_block_id_t tdm_kvs_blocks_find(tdm_kvs_blocks_t *s, tdm_hash128_t key, uint64_t now_ms);
/* LOOKUP: as find() but counts nothing and changes nothing. */
tdm_kvs_block_id_t tdm_kvs_blocks_peek(const tdm_kvs_blocks_t *s, tdm_hash128_t key);
/* Everything about one block. TDM_ERR_INVALID for a stale id. */
tdm_status_t tdm_kvs_blocks_info(const tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id,
                                 tdm_kvs_block_info_t *out);

/* One more send of a READY block's payload in progress: a pinned block is
 * never evicted or freed. TDM_ERR_NOT_FOUND for a DOOMED block,
 * TDM_ERR_INVALID for a stale id or a RECEIVING block, TDM_ERR_BUSY at
 * TDM_KVS_BLOCKS_MAX_PINS. */
tdm_status_t tdm_kvs_blocks_pin(tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id);
/* A send completed (or failed). At the last unpin a DOOMED block is freed
 * (its id goes stale) and an unleased READY block becomes the most recent in
 * the LRU. TDM_ERR_INVALID for a stale id or a block without pins. */
tdm_status_t tdm_kvs_blocks_unpin(tdm_kvs_blocks_t *s, tdm_kvs_block_id_t id);

/* RELEASE: ends the lease of a READY or RECEIVING block, whoever owns it
 * (TDM_OK also when it had none). TDM_ERR_NOT_FOUND when the key is absent. */
tdm_status_t tdm_kvs_blocks_release_lease(tdm_kvs_blocks_t *s, tdm_hash128_t key);
/* DELETE of a READY block: freed at once, or made DOOMED when pinned (then
 * not findable at once; freed at the last unpin). A key that is only
 * RECEIVING, or absent, gives TDM_ERR_NOT_FOUND (the delete is ordered
 * before that PUT). */
tdm_status_t tdm_kvs_blocks_delete(tdm_kvs_blocks_t *s, tdm_hash128_t key);

/* Ends the leases of READY blocks whose time has passed (lease_until <=
 * now_ms); returns how many. O(1) when none can have passed (a lower bound
 * of the lease times is kept), else one walk of the lease list. Call it
 * now and then (e.g. every 100 ms); correctness does not depend on it. */
uint32_t tdm_kvs_blocks_expire(tdm_kvs_blocks_t *s, uint64_t now_ms);
/* A client died: aborts its RECEIVING blocks (same precondition as abort():
 * no receive may still write into them) and ends the leases it owns; its
 * READY blocks stay as ordinary cached blocks. Pins are the send path's to
 * release. Returns reservations aborted plus leases ended. */
uint32_t tdm_kvs_blocks_drop_owner(tdm_kvs_blocks_t *s, tdm_kvs_owner_t owner);

void tdm_kvs_blocks_stats(const tdm_kvs_blocks_t *s, tdm_kvs_blocks_stats_t *out);

/* Debug and test helper, O(n_granules): walks every extent and verifies the
 * edges, coalescing (no two adjacent free extents), the free lists and their
 * bitmap, the index, the LRU, lease and receiving lists and every counter.
 * TDM_OK, or TDM_ERR_INTERNAL with the first violation logged. */
tdm_status_t tdm_kvs_blocks_check(const tdm_kvs_blocks_t *s);

#ifdef __cplusplus
}
#endif

#endif
