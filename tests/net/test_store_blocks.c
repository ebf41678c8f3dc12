/* The KV store's block memory (kvstore/blocks.h): allocator, index, LRU,
 * leases, pins; directed cases and a long randomized run checked against a
 * reference model and tdm_kvs_blocks_check(). Fixed seeds, bounded loops. */
#include "../../kvstore/blocks.h"
#include "../unit/test_util.h"

#include <stdint.h>
#include <time.h>

#define KIB 1024ull
#define MIB (1024ull * 1024ull)
#define GIB (1024ull * MIB)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A value in [lo, hi]. */
static uint64_t rng_range(uint64_t lo, uint64_t hi)
{
    return lo + rng() % (hi - lo + 1);
}

static tdm_hash128_t key_of(uint64_t i)
{
    return (tdm_hash128_t){.lo = i * 0x9e3779b97f4a7c15ull + 1, .hi = ~i ^ 0x1234567890abcdefull};
}

static tdm_kvs_blocks_stats_t stats_of(const tdm_kvs_blocks_t *s)
{
    tdm_kvs_blocks_stats_t st;
    tdm_kvs_blocks_stats(s, &st);
    return st;
}

/* Reserves and commits key i (no lease); returns the id or -1. */
static tdm_kvs_block_id_t put(tdm_kvs_blocks_t *s, uint64_t i, uint64_t len, uint32_t lease_ms,
                              uint64_t now, tdm_kvs_owner_t owner)
{
    tdm_kvs_reservation_t r;
    if (tdm_kvs_blocks_reserve(s, key_of(i), len, lease_ms, now, owner, &r) != TDM_OK)
        return -1;
    if (r.created && tdm_kvs_blocks_commit(s, r.id, now) != TDM_OK)
        return -1;
    return r.id;
}

static int present(const tdm_kvs_blocks_t *s, uint64_t i)
{
    return tdm_kvs_blocks_peek(s, key_of(i)) >= 0;
}

static void test_create(void)
{
    tdm_kvs_blocks_t *s = NULL;
    fprintf(stderr, "(four expected errors follow)\n");
    CHECK(tdm_kvs_blocks_create(MIB, 64 * KIB, 3000, &s) == TDM_ERR_INVALID, "granule 3000");
    CHECK(tdm_kvs_blocks_create(MIB, 0, 4096, &s) == TDM_ERR_INVALID, "max 0");
    CHECK(tdm_kvs_blocks_create(MIB, 4 * GIB, 4096, &s) == TDM_ERR_INVALID, "max 4 GiB");
    CHECK(tdm_kvs_blocks_create(60 * KIB, 64 * KIB, 4096, &s) == TDM_ERR_INVALID, "too small");
    CHECK(s == NULL, "output set on failure");
    tdm_kvs_blocks_destroy(NULL);

    /* The tail under one granule is not used; granule 0 is the default. */
    CHECK(tdm_kvs_blocks_create(MIB + 100, 64 * KIB, 0, &s) == TDM_OK, "create");
    tdm_kvs_blocks_stats_t st = stats_of(s);
    CHECK(st.capacity == MIB && st.bytes_free == MIB && st.largest_free == MIB, "capacity %llu",
          (unsigned long long)st.capacity);
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    tdm_kvs_blocks_destroy(s);
}

static void test_basic(void)
{
    tdm_kvs_blocks_t *s;
    CHECK(tdm_kvs_blocks_create(MIB, 64 * KIB, 4096, &s) == TDM_OK, "create");
    tdm_kvs_reservation_t r, r2;
    CHECK(tdm_kvs_blocks_reserve(s, key_of(1), 0, 0, 0, 1, &r) == TDM_ERR_INVALID, "length 0");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(1), 64 * KIB + 1, 0, 0, 1, &r) == TDM_ERR_INVALID,
          "length over max");

    CHECK(tdm_kvs_blocks_reserve(s, key_of(1), 5000, 0, 10, 1, &r) == TDM_OK, "reserve");
    CHECK(r.created && r.length == 5000 && r.offset % 4096 == 0, "reservation");
    tdm_kvs_blocks_stats_t st = stats_of(s);
    CHECK(st.receiving == 1 && st.blocks == 0 && st.bytes_reserved == 8192 &&
              st.bytes_used == 8192 && st.bytes_free == MIB - 8192,
          "receiving stats");
    /* Not findable while RECEIVING, but a second PUT sees it. */
    CHECK(tdm_kvs_blocks_find(s, key_of(1), 10) < 0, "find receiving");
    CHECK(tdm_kvs_blocks_peek(s, key_of(1)) < 0, "peek receiving");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(1), 5000, 0, 10, 2, &r2) == TDM_OK && !r2.created &&
              r2.id == r.id && r2.offset == r.offset,
          "exists while receiving");
    CHECK(tdm_kvs_blocks_delete(s, key_of(1)) == TDM_ERR_NOT_FOUND, "delete receiving");
    CHECK(tdm_kvs_blocks_pin(s, r.id) == TDM_ERR_INVALID, "pin receiving");
    CHECK(tdm_kvs_blocks_commit(s, r.id, 10) == TDM_OK, "commit");
    CHECK(tdm_kvs_blocks_commit(s, r.id, 10) == TDM_ERR_INVALID, "commit twice");
    CHECK(tdm_kvs_blocks_abort(s, r.id) == TDM_ERR_INVALID, "abort ready");

    tdm_kvs_block_info_t info;
    CHECK(tdm_kvs_blocks_info(s, r.id, &info) == TDM_OK &&
              info.state == TDM_KVS_BLOCK_STATE_READY && info.length == 5000 &&
              info.extent_bytes == 8192 && info.offset == r.offset && info.pins == 0 &&
              info.lease_until_ms == 0,
          "info");
    CHECK(tdm_kvs_blocks_find(s, key_of(1), 11) == r.id, "find");
    CHECK(tdm_kvs_blocks_find(s, key_of(2), 11) < 0, "miss");
    CHECK(tdm_kvs_blocks_peek(s, key_of(1)) == r.id && tdm_kvs_blocks_peek(s, key_of(2)) < 0,
          "peek");
    st = stats_of(s);
    CHECK(st.hits == 1 && st.misses == 2 && st.blocks == 1 && st.receiving == 0 &&
              st.bytes_reserved == 0 && st.bytes_used == 8192 && st.bytes_evictable == 8192,
          "stats hits %llu misses %llu", (unsigned long long)st.hits,
          (unsigned long long)st.misses);
    CHECK(tdm_kvs_blocks_release_lease(s, key_of(1)) == TDM_OK, "release without lease");
    CHECK(tdm_kvs_blocks_release_lease(s, key_of(2)) == TDM_ERR_NOT_FOUND, "release absent");

    /* Aborts, stale ids, generations. */
    CHECK(tdm_kvs_blocks_reserve(s, key_of(3), 100, 0, 12, 1, &r2) == TDM_OK && r2.created,
          "reserve 3");
    CHECK(tdm_kvs_blocks_abort(s, r2.id) == TDM_OK, "abort");
    CHECK(tdm_kvs_blocks_abort(s, r2.id) == TDM_ERR_INVALID, "abort twice");
    CHECK(tdm_kvs_blocks_info(s, r2.id, &info) == TDM_ERR_INVALID, "stale info");
    tdm_kvs_reservation_t r3;
    CHECK(tdm_kvs_blocks_reserve(s, key_of(4), 100, 0, 12, 1, &r3) == TDM_OK && r3.created &&
              r3.offset == r2.offset && r3.id != r2.id,
          "same extent, new id");
    CHECK(tdm_kvs_blocks_commit(s, r2.id, 12) == TDM_ERR_INVALID, "stale commit");
    CHECK(tdm_kvs_blocks_commit(s, r3.id, 12) == TDM_OK, "commit 4");
    CHECK(tdm_kvs_blocks_pin(s, -1) == TDM_ERR_INVALID &&
              tdm_kvs_blocks_unpin(s, r3.id) == TDM_ERR_INVALID,
          "bad pin/unpin");
    CHECK(tdm_kvs_blocks_pin(s, (int64_t)1 << 40) == TDM_ERR_INVALID, "pin garbage id");
    CHECK(tdm_kvs_blocks_pin(s, 5) == TDM_ERR_INVALID, "pin interior granule");
    CHECK(tdm_kvs_blocks_delete(s, key_of(1)) == TDM_OK &&
              tdm_kvs_blocks_delete(s, key_of(4)) == TDM_OK,
          "delete");
    CHECK(tdm_kvs_blocks_delete(s, key_of(1)) == TDM_ERR_NOT_FOUND, "delete twice");
    st = stats_of(s);
    CHECK(st.bytes_free == MIB && st.largest_free == MIB && st.free_extents == 1 && st.blocks == 0,
          "empty again");
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    tdm_kvs_blocks_destroy(s);
}

/* 16 blocks of 64 KiB fill the store; eviction follows use exactly. */
static void test_lru_order(void)
{
    tdm_kvs_blocks_t *s;
    CHECK(tdm_kvs_blocks_create(16 * 64 * KIB, 64 * KIB, 4096, &s) == TDM_OK, "create");
    uint64_t now = 100;
    for (uint64_t i = 0; i < 16; i++)
        CHECK(put(s, i, 64 * KIB, 0, now++, 1) >= 0, "fill %llu", (unsigned long long)i);
    tdm_kvs_blocks_stats_t st = stats_of(s);
    CHECK(st.bytes_free == 0 && st.largest_free == 0 && st.evictions == 0, "full");
    for (uint64_t i = 0; i < 3; i++)
        CHECK(tdm_kvs_blocks_find(s, key_of(i), now++) >= 0, "touch %llu", (unsigned long long)i);
    /* 16, 17, 18 evict 3, 4, 5 one by one. */
    for (uint64_t i = 16; i < 19; i++) {
        CHECK(put(s, i, 64 * KIB, 0, now++, 1) >= 0, "put %llu", (unsigned long long)i);
        CHECK(!present(s, i - 13) && present(s, i - 12), "put %llu evicted %llu only",
              (unsigned long long)i, (unsigned long long)(i - 13));
    }
    /* A second PUT counts as use; peek does not. */
    tdm_kvs_reservation_t r;
    CHECK(tdm_kvs_blocks_reserve(s, key_of(6), 64 * KIB, 0, now++, 2, &r) == TDM_OK && !r.created,
          "re-put 6");
    CHECK(tdm_kvs_blocks_peek(s, key_of(7)) >= 0, "peek 7");
    CHECK(put(s, 19, 64 * KIB, 0, now++, 1) >= 0, "put 19");
    CHECK(present(s, 6) && !present(s, 7), "19 evicted 7, not 6");
    CHECK(put(s, 20, 1, 0, now++, 1) >= 0, "put 20 (1 byte)");
    CHECK(!present(s, 8) && present(s, 9), "20 evicted 8");
    CHECK(put(s, 21, 1, 0, now++, 1) >= 0, "put 21 (1 byte)");
    CHECK(stats_of(s).evictions == 5, "21 fit in the rest of 8's extent");
    CHECK(put(s, 22, 15 * 4096, 0, now++, 1) >= 0, "put 22 (15 granules)");
    CHECK(!present(s, 9) && present(s, 10), "22 evicted 9");
    static const int want[] = {0, 1, 2, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22};
    int all = 1;
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        all &= present(s, (uint64_t)want[i]);
    st = stats_of(s);
    CHECK(all && st.blocks == 17 && st.evictions == 6, "survivors: blocks %llu evictions %llu",
          (unsigned long long)st.blocks, (unsigned long long)st.evictions);
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    tdm_kvs_blocks_destroy(s);
}

static void test_leases(void)
{
    tdm_kvs_blocks_t *s;
    CHECK(tdm_kvs_blocks_create(8 * 64 * KIB, 64 * KIB, 4096, &s) == TDM_OK, "create");
    tdm_kvs_reservation_t r;
    for (uint64_t i = 0; i < 8; i++)
        CHECK(put(s, i, 64 * KIB, 500, 1000, 1) >= 0, "leased put %llu", (unsigned long long)i);
    tdm_kvs_blocks_stats_t st = stats_of(s);
    CHECK(st.leased == 8 && st.bytes_evictable == 0, "8 leased");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(100), 64 * KIB, 0, 1200, 1, &r) == TDM_ERR_NOMEM,
          "full of leases");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(100), 1, 0, 1499, 1, &r) == TDM_ERR_NOMEM,
          "full of leases at 1499");
    CHECK(stats_of(s).evictions == 0 && stats_of(s).blocks == 8, "nothing evicted");
    CHECK(tdm_kvs_blocks_release_lease(s, key_of(3)) == TDM_OK, "release 3");
    CHECK(put(s, 8, 64 * KIB, 0, 1499, 1) >= 0, "put 8 after release");
    CHECK(!present(s, 3) && stats_of(s).evictions == 1 && stats_of(s).leased == 7, "3 evicted");
    /* At 1500 the leases have passed: eviction sees it without expire().
     * The passed leases join the LRU behind 8, so 8 goes first. */
    CHECK(put(s, 9, 64 * KIB, 0, 1500, 1) >= 0, "put 9 at 1500");
    CHECK(!present(s, 8) && stats_of(s).leased == 0, "8 evicted, leases ended");
    CHECK(put(s, 10, 64 * KIB, 0, 1500, 1) >= 0, "put 10");
    int gone = 0;
    for (uint64_t i = 0; i < 8; i++)
        gone += !present(s, i);
    CHECK(gone == 2 && stats_of(s).evictions == 3, "one formerly leased block evicted");

    /* Extension: a re-PUT extends to max(current, now + lease), and the lease
     * passes to the re-PUT's owner. */
    tdm_kvs_blocks_destroy(s);
    CHECK(tdm_kvs_blocks_create(4 * 64 * KIB, 64 * KIB, 4096, &s) == TDM_OK, "create");
    tdm_kvs_block_id_t a = put(s, 0, 64 * KIB, 100, 0, 1);
    CHECK(put(s, 1, 64 * KIB, 0, 0, 1) >= 0 && put(s, 2, 64 * KIB, 0, 0, 1) >= 0 &&
              put(s, 3, 64 * KIB, 0, 0, 1) >= 0,
          "fill");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(0), 64 * KIB, 1000, 50, 2, &r) == TDM_OK && !r.created &&
              r.id == a,
          "extend");
    tdm_kvs_block_info_t info;
    CHECK(tdm_kvs_blocks_info(s, a, &info) == TDM_OK && info.lease_until_ms == 1050 &&
              info.lease_owner == 2,
          "lease until %llu owner %u", (unsigned long long)info.lease_until_ms, info.lease_owner);
    CHECK(tdm_kvs_blocks_reserve(s, key_of(0), 64 * KIB, 10, 60, 3, &r) == TDM_OK,
          "shorter re-put");
    CHECK(tdm_kvs_blocks_info(s, a, &info) == TDM_OK && info.lease_until_ms == 1050 &&
              info.lease_owner == 3,
          "never shortened");
    CHECK(tdm_kvs_blocks_drop_owner(s, 1) == 0 && stats_of(s).leased == 1, "1 owns nothing");
    CHECK(tdm_kvs_blocks_expire(s, 1049) == 0 && tdm_kvs_blocks_expire(s, 1050) == 1 &&
              stats_of(s).leased == 0,
          "expire");
    CHECK(tdm_kvs_blocks_info(s, a, &info) == TDM_OK && info.lease_until_ms == 0, "ended");
    CHECK(tdm_kvs_blocks_find(s, key_of(1), 1060) >= 0, "touch 1");
    CHECK(put(s, 4, 64 * KIB, 0, 1060, 1) >= 0, "put 4");
    CHECK(!present(s, 2) && present(s, 0), "2 evicted (the ended lease went behind it)");

    /* NOMEM known upfront evicts nothing: 32 KiB free plus 32 KiB
     * evictable cannot hold 128 KiB. */
    tdm_kvs_blocks_destroy(s);
    CHECK(tdm_kvs_blocks_create(4 * 64 * KIB, 128 * KIB, 4096, &s) == TDM_OK, "create");
    CHECK(put(s, 0, 64 * KIB, 1000, 0, 1) >= 0 && put(s, 1, 64 * KIB, 1000, 0, 1) >= 0 &&
              put(s, 2, 64 * KIB, 1000, 0, 1) >= 0 && put(s, 3, 32 * KIB, 0, 0, 1) >= 0,
          "fill");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(4), 128 * KIB, 0, 1, 1, &r) == TDM_ERR_NOMEM &&
              present(s, 3) && stats_of(s).evictions == 0,
          "NOMEM without eviction");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(4), 64 * KIB, 0, 1, 1, &r) == TDM_OK && !present(s, 3) &&
              stats_of(s).evictions == 1,
          "64 KiB evicts the unleased block");

    /* Leased blocks survive any number of PUTs; NOMEM when only leased,
     * pinned and receiving blocks remain. A find() of a passed lease ends it. */
    tdm_kvs_blocks_destroy(s);
    CHECK(tdm_kvs_blocks_create(16 * 64 * KIB, 64 * KIB, 4096, &s) == TDM_OK, "create");
    for (uint64_t i = 0; i < 16; i++)
        CHECK(put(s, i, 64 * KIB, i % 2 ? 10000 : 0, 0, 1) >= 0, "put %llu", (unsigned long long)i);
    tdm_kvs_block_id_t p = tdm_kvs_blocks_find(s, key_of(0), 1);
    CHECK(p >= 0 && tdm_kvs_blocks_pin(s, p) == TDM_OK, "pin 0");
    tdm_kvs_reservation_t recv;
    CHECK(tdm_kvs_blocks_reserve(s, key_of(500), 64 * KIB, 0, 2, 1, &recv) == TDM_OK &&
              recv.created,
          "receiving 500");
    /* New leased PUTs evict the unleased blocks (even keys but the pinned
     * 0) and each other never, until only leased, pinned and receiving
     * blocks are left. */
    uint64_t i = 1000;
    tdm_status_t rc = TDM_OK;
    for (; i < 1100 && rc == TDM_OK; i++) {
        rc = tdm_kvs_blocks_reserve(s, key_of(i), rng_range(1, 64 * KIB), 5000, 3, 1, &r);
        if (rc == TDM_OK)
            CHECK(tdm_kvs_blocks_commit(s, r.id, 3) == TDM_OK, "commit");
        for (uint64_t k = 1; k < 16; k += 2)
            CHECK(present(s, k), "leased %llu survives put %llu", (unsigned long long)k,
                  (unsigned long long)i);
    }
    uint64_t n_new = i - 1 - 1000;
    CHECK(rc == TDM_ERR_NOMEM && n_new >= 7, "NOMEM at last (after %llu puts)",
          (unsigned long long)n_new);
    for (uint64_t k = 1000; k < 1000 + n_new; k++)
        CHECK(present(s, k), "leased new %llu survives", (unsigned long long)k);
    for (uint64_t k = 2; k < 16; k += 2)
        CHECK(!present(s, k), "unleased %llu evicted", (unsigned long long)k);
    CHECK(present(s, 0) && tdm_kvs_blocks_info(s, recv.id, &info) == TDM_OK &&
              info.state == TDM_KVS_BLOCK_STATE_RECEIVING,
          "pinned and receiving survive");
    st = stats_of(s);
    CHECK(st.bytes_evictable == 0 && st.evictions == 7 && st.leased == 8 + n_new,
          "only leased/pinned/receiving left: evictions %llu leased %llu",
          (unsigned long long)st.evictions, (unsigned long long)st.leased);
    CHECK(tdm_kvs_blocks_find(s, key_of(1), 10000) >= 0 && stats_of(s).leased == 7 + n_new,
          "find ends a passed lease");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(2000), 64 * KIB, 0, 10000, 1, &r) == TDM_OK,
          "room after the leases passed");
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    CHECK(tdm_kvs_blocks_unpin(s, p) == TDM_OK, "unpin");
    tdm_kvs_blocks_destroy(s);
}

static void test_pins(void)
{
    tdm_kvs_blocks_t *s;
    CHECK(tdm_kvs_blocks_create(4 * 64 * KIB, 64 * KIB, 4096, &s) == TDM_OK, "create");
    for (uint64_t i = 0; i < 4; i++)
        CHECK(put(s, i, 64 * KIB, 0, 0, 1) >= 0, "put %llu", (unsigned long long)i);
    tdm_kvs_block_id_t b0 = tdm_kvs_blocks_find(s, key_of(0), 1);
    CHECK(tdm_kvs_blocks_pin(s, b0) == TDM_OK && tdm_kvs_blocks_pin(s, b0) == TDM_OK, "pin 0 x2");
    CHECK(tdm_kvs_blocks_delete(s, key_of(0)) == TDM_OK, "delete pinned");
    CHECK(tdm_kvs_blocks_peek(s, key_of(0)) < 0 && tdm_kvs_blocks_find(s, key_of(0), 2) < 0,
          "not findable at once");
    CHECK(tdm_kvs_blocks_delete(s, key_of(0)) == TDM_ERR_NOT_FOUND, "delete doomed");
    CHECK(tdm_kvs_blocks_pin(s, b0) == TDM_ERR_NOT_FOUND, "pin doomed");
    tdm_kvs_block_info_t info;
    CHECK(tdm_kvs_blocks_info(s, b0, &info) == TDM_OK && info.state == TDM_KVS_BLOCK_STATE_DOOMED &&
              info.pins == 2,
          "doomed info");
    tdm_kvs_blocks_stats_t st = stats_of(s);
    CHECK(st.doomed == 1 && st.blocks == 3 && st.bytes_used == 4 * 64 * KIB && st.pinned == 1,
          "doomed holds its bytes");
    /* The same key can be stored again meanwhile; it evicts 1, not 0's extent. */
    tdm_kvs_block_id_t b0b = put(s, 0, 64 * KIB, 0, 3, 1);
    CHECK(b0b >= 0 && b0b != b0 && !present(s, 1), "new 0 evicted 1");
    CHECK(tdm_kvs_blocks_info(s, b0, &info) == TDM_OK && info.pins == 2, "doomed 0 intact");
    /* A pinned READY block is never evicted; nothing else left: NOMEM. */
    tdm_kvs_block_id_t b2 = tdm_kvs_blocks_find(s, key_of(2), 4);
    tdm_kvs_block_id_t b3 = tdm_kvs_blocks_find(s, key_of(3), 4);
    CHECK(tdm_kvs_blocks_pin(s, b2) == TDM_OK && tdm_kvs_blocks_pin(s, b3) == TDM_OK &&
              tdm_kvs_blocks_pin(s, b0b) == TDM_OK,
          "pin all");
    tdm_kvs_reservation_t r;
    CHECK(tdm_kvs_blocks_reserve(s, key_of(9), 1, 0, 5, 1, &r) == TDM_ERR_NOMEM, "all pinned");
    CHECK(tdm_kvs_blocks_unpin(s, b0) == TDM_OK, "unpin 1 of 2");
    CHECK(tdm_kvs_blocks_info(s, b0, &info) == TDM_OK && stats_of(s).doomed == 1, "still doomed");
    CHECK(tdm_kvs_blocks_unpin(s, b0) == TDM_OK, "last unpin");
    CHECK(tdm_kvs_blocks_info(s, b0, &info) == TDM_ERR_INVALID &&
              tdm_kvs_blocks_unpin(s, b0) == TDM_ERR_INVALID,
          "freed: id stale");
    st = stats_of(s);
    CHECK(st.doomed == 0 && st.bytes_free == 64 * KIB && st.pinned == 3, "bytes back");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(9), 1, 0, 5, 1, &r) == TDM_OK && r.created &&
              stats_of(s).evictions == 1,
          "room without eviction");
    CHECK(tdm_kvs_blocks_commit(s, r.id, 5) == TDM_OK, "commit 9");
    /* Unpinned blocks go back to the LRU, most recent last. */
    CHECK(tdm_kvs_blocks_unpin(s, b3) == TDM_OK && tdm_kvs_blocks_unpin(s, b2) == TDM_OK &&
              tdm_kvs_blocks_unpin(s, b0b) == TDM_OK,
          "unpin all");
    CHECK(put(s, 10, 64 * KIB, 0, 6, 1) >= 0, "put 10");
    CHECK(!present(s, 9) && present(s, 3), "9 (used before the unpins) evicted first");
    CHECK(put(s, 11, 64 * KIB, 0, 7, 1) >= 0 && !present(s, 3) && present(s, 2), "then 3");
    /* The pin count is bounded. */
    tdm_kvs_block_id_t b = tdm_kvs_blocks_find(s, key_of(2), 8);
    int ok = 1;
    for (uint32_t i = 0; i < TDM_KVS_BLOCKS_MAX_PINS; i++)
        ok &= tdm_kvs_blocks_pin(s, b) == TDM_OK;
    CHECK(ok && tdm_kvs_blocks_pin(s, b) == TDM_ERR_BUSY, "pin limit");
    for (uint32_t i = 0; i < TDM_KVS_BLOCKS_MAX_PINS; i++)
        ok &= tdm_kvs_blocks_unpin(s, b) == TDM_OK;
    CHECK(ok && stats_of(s).pinned == 0, "unpinned");
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    tdm_kvs_blocks_destroy(s);
}

/* Two free extents of 64 KiB cannot hold 128 KiB until the block between
 * them is freed and all three coalesce. */
static void test_coalesce(void)
{
    tdm_kvs_blocks_t *s;
    CHECK(tdm_kvs_blocks_create(8 * 64 * KIB, 128 * KIB, 4096, &s) == TDM_OK, "create");
    tdm_kvs_block_id_t id[8];
    tdm_kvs_block_info_t info;
    for (uint64_t i = 0; i < 8; i++) {
        id[i] = put(s, i, 64 * KIB, 0, 0, 1);
        CHECK(id[i] >= 0 && tdm_kvs_blocks_pin(s, id[i]) == TDM_OK, "put+pin %llu",
              (unsigned long long)i);
        CHECK(tdm_kvs_blocks_info(s, id[i], &info) == TDM_OK && info.offset == i * 64 * KIB,
              "block %llu at %llu", (unsigned long long)i, (unsigned long long)info.offset);
    }
    for (uint64_t i = 1; i <= 5; i += 2) {
        CHECK(tdm_kvs_blocks_unpin(s, id[i]) == TDM_OK, "unpin");
        CHECK(tdm_kvs_blocks_delete(s, key_of(i)) == TDM_OK, "delete %llu", (unsigned long long)i);
    }
    tdm_kvs_blocks_stats_t st = stats_of(s);
    CHECK(st.bytes_free == 192 * KIB && st.largest_free == 64 * KIB && st.free_extents == 3,
          "three holes");
    tdm_kvs_reservation_t r;
    CHECK(tdm_kvs_blocks_reserve(s, key_of(100), 128 * KIB, 0, 1, 1, &r) == TDM_ERR_NOMEM,
          "fragmented");
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    /* Free 2: merges with both neighbours (1 and 3). */
    CHECK(tdm_kvs_blocks_unpin(s, id[2]) == TDM_OK && tdm_kvs_blocks_delete(s, key_of(2)) == TDM_OK,
          "delete 2");
    st = stats_of(s);
    CHECK(st.largest_free == 192 * KIB && st.free_extents == 2, "coalesced: largest %llu, %llu",
          (unsigned long long)st.largest_free, (unsigned long long)st.free_extents);
    CHECK(tdm_kvs_blocks_reserve(s, key_of(100), 128 * KIB, 0, 1, 1, &r) == TDM_OK && r.created &&
              r.offset == 64 * KIB && stats_of(s).evictions == 0,
          "128 KiB fits at 64 KiB");
    CHECK(tdm_kvs_blocks_commit(s, r.id, 1) == TDM_OK, "commit");
    /* Best fit: a 64 KiB block takes the exact 64 KiB hole (3's old place is
     * now the rest of the split, 5 is exact too), not a larger extent. */
    CHECK(tdm_kvs_blocks_reserve(s, key_of(101), 60 * KIB, 0, 1, 1, &r) == TDM_OK &&
              (r.offset == 3 * 64 * KIB || r.offset == 5 * 64 * KIB),
          "exact hole at %llu", (unsigned long long)r.offset);
    CHECK(tdm_kvs_blocks_abort(s, r.id) == TDM_OK, "abort");
    /* Free 4, then 6: left-only and right-side merges into one extent. */
    CHECK(tdm_kvs_blocks_unpin(s, id[4]) == TDM_OK && tdm_kvs_blocks_delete(s, key_of(4)) == TDM_OK,
          "delete 4");
    CHECK(stats_of(s).free_extents == 1 && stats_of(s).largest_free == 192 * KIB, "3+4+5");
    CHECK(tdm_kvs_blocks_unpin(s, id[6]) == TDM_OK && tdm_kvs_blocks_delete(s, key_of(6)) == TDM_OK,
          "delete 6");
    CHECK(stats_of(s).free_extents == 1 && stats_of(s).largest_free == 256 * KIB, "3..6");
    for (uint64_t i = 0; i < 8; i += 7) {
        CHECK(tdm_kvs_blocks_unpin(s, id[i]) == TDM_OK &&
                  tdm_kvs_blocks_delete(s, key_of(i)) == TDM_OK,
              "delete %llu", (unsigned long long)i);
    }
    CHECK(tdm_kvs_blocks_delete(s, key_of(100)) == TDM_OK, "delete 100");
    st = stats_of(s);
    CHECK(st.bytes_free == st.capacity && st.largest_free == st.capacity && st.free_extents == 1 &&
              st.bytes_used == 0,
          "one extent again");
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    tdm_kvs_blocks_destroy(s);
}

/* Allocation takes the smallest free extent that fits: an exact hole
 * before the rest of the store, which is one large free extent. */
static void test_best_fit(void)
{
    tdm_kvs_blocks_t *s;
    CHECK(tdm_kvs_blocks_create(8 * 64 * KIB, 128 * KIB, 4096, &s) == TDM_OK, "create");
    CHECK(put(s, 0, 64 * KIB, 0, 0, 1) >= 0 && put(s, 1, 20 * KIB, 0, 0, 1) >= 0 &&
              put(s, 2, 8 * KIB, 0, 0, 1) >= 0,
          "put 3");
    CHECK(tdm_kvs_blocks_delete(s, key_of(0)) == TDM_OK &&
              tdm_kvs_blocks_delete(s, key_of(2)) == TDM_OK,
          "holes of 64 KiB at 0 and 404 KiB at 84 KiB");
    tdm_kvs_reservation_t r;
    CHECK(tdm_kvs_blocks_reserve(s, key_of(3), 60 * KIB, 0, 1, 1, &r) == TDM_OK && r.offset == 0,
          "60 KiB into the 64 KiB hole, at %llu", (unsigned long long)r.offset);
    CHECK(tdm_kvs_blocks_reserve(s, key_of(4), 1, 0, 1, 1, &r) == TDM_OK && r.offset == 60 * KIB,
          "1 byte into the 4 KiB rest, at %llu", (unsigned long long)r.offset);
    CHECK(tdm_kvs_blocks_reserve(s, key_of(5), 128 * KIB, 0, 1, 1, &r) == TDM_OK &&
              r.offset == 84 * KIB,
          "128 KiB from the large extent, at %llu", (unsigned long long)r.offset);
    tdm_kvs_blocks_stats_t st = stats_of(s);
    CHECK(st.free_extents == 1 && st.largest_free == (512 - 212) * KIB, "rest %llu",
          (unsigned long long)st.largest_free);
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    tdm_kvs_blocks_destroy(s);
}

static void test_drop_owner(void)
{
    tdm_kvs_blocks_t *s;
    CHECK(tdm_kvs_blocks_create(16 * 64 * KIB, 64 * KIB, 4096, &s) == TDM_OK, "create");
    tdm_kvs_reservation_t r[4];
    /* Owner 7: three reservations (one leased), two leased READY blocks. */
    CHECK(tdm_kvs_blocks_reserve(s, key_of(0), 10 * KIB, 0, 0, 7, &r[0]) == TDM_OK, "r0");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(1), 20 * KIB, 1000, 0, 7, &r[1]) == TDM_OK, "r1");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(2), 30 * KIB, 0, 0, 7, &r[2]) == TDM_OK, "r2");
    CHECK(put(s, 3, 40 * KIB, 1000, 0, 7) >= 0 && put(s, 4, 40 * KIB, 1000, 0, 7) >= 0, "put 3 4");
    /* Owner 8: a leased reservation, a leased block, and takes over 4's
     * lease and the lease of 7's reservation 2. */
    CHECK(tdm_kvs_blocks_reserve(s, key_of(5), 50 * KIB, 1000, 0, 8, &r[3]) == TDM_OK, "r5");
    CHECK(put(s, 6, 40 * KIB, 1000, 0, 8) >= 0, "put 6");
    tdm_kvs_reservation_t x;
    CHECK(tdm_kvs_blocks_reserve(s, key_of(4), 40 * KIB, 1000, 1, 8, &x) == TDM_OK && !x.created,
          "8 re-puts 4");
    CHECK(tdm_kvs_blocks_reserve(s, key_of(2), 30 * KIB, 1000, 1, 8, &x) == TDM_OK && !x.created,
          "8 re-puts receiving 2");
    tdm_kvs_blocks_stats_t st = stats_of(s);
    CHECK(st.receiving == 4 && st.leased == 6 && st.bytes_reserved == (12 + 20 + 32 + 52) * KIB,
          "before: receiving %llu leased %llu reserved %llu", (unsigned long long)st.receiving,
          (unsigned long long)st.leased, (unsigned long long)st.bytes_reserved);
    /* 7 dies: r0 r1 r2 aborted, the lease of 3 ended. */
    CHECK(tdm_kvs_blocks_drop_owner(s, 7) == 4, "drop 7");
    st = stats_of(s);
    CHECK(st.receiving == 1 && st.bytes_reserved == 52 * KIB && st.leased == 3 && st.blocks == 3,
          "after 7: receiving %llu reserved %llu leased %llu", (unsigned long long)st.receiving,
          (unsigned long long)st.bytes_reserved, (unsigned long long)st.leased);
    CHECK(present(s, 3) && present(s, 4) && !present(s, 0) &&
              tdm_kvs_blocks_commit(s, r[0].id, 2) == TDM_ERR_INVALID,
          "blocks stay, reservations gone");
    tdm_kvs_block_info_t info;
    CHECK(tdm_kvs_blocks_info(s, tdm_kvs_blocks_peek(s, key_of(3)), &info) == TDM_OK &&
              info.lease_until_ms == 0,
          "3 unleased");
    CHECK(tdm_kvs_blocks_info(s, tdm_kvs_blocks_peek(s, key_of(4)), &info) == TDM_OK &&
              info.lease_until_ms == 1001 && info.lease_owner == 8,
          "4 leased by 8");
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    CHECK(tdm_kvs_blocks_drop_owner(s, 8) == 3, "drop 8");
    st = stats_of(s);
    CHECK(st.receiving == 0 && st.bytes_reserved == 0 && st.leased == 0 && st.blocks == 3 &&
              st.bytes_evictable == st.bytes_used,
          "after 8");
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    tdm_kvs_blocks_destroy(s);
}

/* ---- randomized run against a reference model ------------------------- */

enum { M_ABSENT = 0, M_RECEIVING, M_READY };

typedef struct mblk {
    int state;
    uint64_t len;
    uint64_t lease_until;
    tdm_kvs_owner_t lease_owner, owner;
    uint32_t pins;
    uint64_t stamp; /* recency in the LRU; equal stamps: order unspecified */
    tdm_kvs_block_id_t id;
} mblk_t;

typedef struct mdoomed {
    tdm_kvs_block_id_t id;
    uint64_t len;
    uint32_t pins;
} mdoomed_t;

#define N_KEYS   600
#define N_DOOMED 4096
#define N_STALE  64

typedef struct model {
    tdm_kvs_blocks_t *s;
    uint64_t granule, capacity, max;
    uint8_t *region; /* stands for the registered memory */
    mblk_t k[N_KEYS];
    mdoomed_t doomed[N_DOOMED];
    int n_doomed;
    tdm_kvs_block_id_t stale[N_STALE];
    int n_stale;
    uint64_t clock, now;
    uint64_t hits, misses, evictions;
    uint64_t n_nomem, n_doomed_total, n_expired; /* events seen, to show coverage */
} model_t;

static uint64_t m_gran(const model_t *m, uint64_t len)
{
    return (len + m->granule - 1) / m->granule;
}

static int m_evictable(const mblk_t *b)
{
    return b->state == M_READY && b->pins == 0 && b->lease_until == 0;
}

static void m_stale(model_t *m, tdm_kvs_block_id_t id)
{
    m->stale[m->n_stale++ % N_STALE] = id;
}

/* The payload stands in as one tag per granule (and the last bytes) derived
 * from the block id, written at commit and verified at every hit. */
static void m_payload(model_t *m, const mblk_t *b, int verify, int *bad)
{
    tdm_kvs_block_info_t info;
    if (tdm_kvs_blocks_info(m->s, b->id, &info) != TDM_OK) {
        *bad = 1;
        return;
    }
    uint64_t tag = (uint64_t)b->id * 0x2545f4914f6cdd1dull;
    for (uint64_t o = 0; o < b->len; o += m->granule) {
        uint64_t n = b->len - 1 - o < 8 ? b->len - 1 - o : 8; /* the last byte is apart */
        uint8_t *p = m->region + info.offset + o;
        if (verify)
            *bad |= memcmp(p, &tag, n) != 0;
        else
            memcpy(p, &tag, n);
    }
    uint8_t *last = m->region + info.offset + b->len - 1;
    if (verify)
        *bad |= *last != (uint8_t)(tag >> 56);
    else
        *last = (uint8_t)(tag >> 56);
}

/* A lease ends: a READY unpinned block joins the LRU with stamp `stamp`. */
static void m_lease_end(model_t *m, mblk_t *b, uint64_t stamp)
{
    b->lease_until = 0;
    b->lease_owner = 0;
    if (m_evictable(b))
        b->stamp = stamp;
}

static uint32_t m_expire(model_t *m)
{
    uint32_t n = 0;
    uint64_t stamp = ++m->clock;
    for (int i = 0; i < N_KEYS; i++) {
        mblk_t *b = &m->k[i];
        if (b->state == M_READY && b->lease_until != 0 && b->lease_until <= m->now) {
            m_lease_end(m, b, stamp);
            n++;
        }
    }
    m->n_expired += n;
    return n;
}

static void m_touch(model_t *m, mblk_t *b)
{
    if (b->lease_until != 0 && b->lease_until <= m->now)
        m_lease_end(m, b, ++m->clock);
    else if (m_evictable(b))
        b->stamp = ++m->clock;
}

static void m_reserve(model_t *m, int ki)
{
    mblk_t *b = &m->k[ki];
    uint64_t len;
    switch (rng() % 4) {
    case 0: len = rng_range(1, m->max / 16); break;
    case 1: len = rng_range(1, m->max); break;
    default: len = rng_range(m->max / 6, m->max); break;
    }
    uint32_t lease_ms = rng() % 2 ? 0 : (uint32_t)rng_range(1, 2000);
    tdm_kvs_owner_t owner = (tdm_kvs_owner_t)rng_range(1, 5);
    uint64_t until = lease_ms ? m->now + lease_ms : 0;
    tdm_kvs_reservation_t r;
    tdm_status_t rc =
        tdm_kvs_blocks_reserve(m->s, key_of((uint64_t)ki), len, lease_ms, m->now, owner, &r);
    if (b->state != M_ABSENT) {
        CHECK(rc == TDM_OK && !r.created && r.id == b->id && r.length == b->len,
              "reserve of existing key %d: rc %d", ki, rc);
        if (b->state == M_READY)
            m_touch(m, b);
        if (until != 0) {
            if (until > b->lease_until)
                b->lease_until = until;
            b->lease_owner = owner;
        }
        return;
    }
    tdm_kvs_blocks_stats_t st = stats_of(m->s);
    uint64_t ev = st.evictions - m->evictions;
    m->evictions = st.evictions;
    uint64_t n = m_gran(m, len);
    if (rc == TDM_ERR_NOMEM || ev > 0) {
        m_expire(m); /* reserve() ends passed leases before it evicts */
        uint64_t evictable_g = 0, n_evictable = 0, gone_g = 0;
        uint64_t max_gone = 0, min_kept = UINT64_MAX, gone = 0;
        for (int i = 0; i < N_KEYS; i++) {
            mblk_t *o = &m->k[i];
            if (!m_evictable(o))
                continue;
            evictable_g += m_gran(m, o->len);
            if (tdm_kvs_blocks_peek(m->s, key_of((uint64_t)i)) < 0) {
                gone++;
                gone_g += m_gran(m, o->len);
                if (o->stamp > max_gone)
                    max_gone = o->stamp;
                m_stale(m, o->id);
                o->state = M_ABSENT;
            } else {
                n_evictable++;
                if (o->stamp < min_kept)
                    min_kept = o->stamp;
            }
        }
        CHECK(gone == ev, "evicted %llu blocks, model saw %llu gone", (unsigned long long)ev,
              (unsigned long long)gone);
        CHECK(gone == 0 || max_gone <= min_kept, "eviction out of LRU order");
        /* NOMEM: evicting everything could not help (then nothing was
         * evicted), or everything evictable went and still nothing fits. */
        if (rc == TDM_ERR_NOMEM) {
            uint64_t free_before = st.bytes_free / m->granule - gone_g;
            m->n_nomem++;
            CHECK(free_before + evictable_g >= n || ev == 0,
                  "evicted %llu blocks though free %llu + evictable %llu < %llu granules",
                  (unsigned long long)ev, (unsigned long long)free_before,
                  (unsigned long long)evictable_g, (unsigned long long)n);
            CHECK((ev == 0 && st.bytes_free / m->granule + evictable_g < n) ||
                      (n_evictable == 0 && st.largest_free < n * m->granule),
                  "NOMEM for %llu granules: free %llu evictable %llu largest %llu",
                  (unsigned long long)n, (unsigned long long)(st.bytes_free / m->granule),
                  (unsigned long long)evictable_g, (unsigned long long)st.largest_free);
        }
    }
    if (rc == TDM_ERR_NOMEM)
        return;
    CHECK(rc == TDM_OK && r.created && r.length == len && r.offset % m->granule == 0 &&
              r.offset + n * m->granule <= m->capacity,
          "reserve %d (%llu bytes): rc %d", ki, (unsigned long long)len, rc);
    if (rc != TDM_OK)
        return;
    *b = (mblk_t){.state = M_RECEIVING,
                  .len = len,
                  .lease_until = until,
                  .lease_owner = until ? owner : 0,
                  .owner = owner,
                  .id = r.id};
}

static int m_pick(model_t *m, int state)
{
    int start = (int)(rng() % N_KEYS);
    for (int j = 0; j < N_KEYS; j++) {
        int i = (start + j) % N_KEYS;
        if (m->k[i].state == state)
            return i;
    }
    return -1;
}

static void m_commit_or_abort(model_t *m, int commit)
{
    int i = m_pick(m, M_RECEIVING);
    if (i < 0)
        return;
    mblk_t *b = &m->k[i];
    if (!commit) {
        CHECK(tdm_kvs_blocks_abort(m->s, b->id) == TDM_OK, "abort %d", i);
        m_stale(m, b->id);
        b->state = M_ABSENT;
        return;
    }
    CHECK(tdm_kvs_blocks_commit(m->s, b->id, m->now) == TDM_OK, "commit %d", i);
    b->state = M_READY;
    if (b->lease_until != 0 && b->lease_until <= m->now) {
        b->lease_until = 0;
        b->lease_owner = 0;
    }
    b->stamp = ++m->clock;
    int bad = 0;
    m_payload(m, b, 0, &bad);
    CHECK(!bad, "payload write %d", i);
}

static void m_find(model_t *m, int i)
{
    mblk_t *b = &m->k[i];
    tdm_kvs_block_id_t id = tdm_kvs_blocks_find(m->s, key_of((uint64_t)i), m->now);
    if (b->state != M_READY) {
        CHECK(id < 0, "find %d: found a block the model lacks", i);
        m->misses++;
        return;
    }
    CHECK(id == b->id, "find %d: id %lld, model %lld", i, (long long)id, (long long)b->id);
    m->hits++;
    m_touch(m, b);
    int bad = 0;
    m_payload(m, b, 1, &bad);
    CHECK(!bad, "payload of %d overwritten", i);
}

static void m_delete(model_t *m, int i)
{
    mblk_t *b = &m->k[i];
    tdm_status_t rc = tdm_kvs_blocks_delete(m->s, key_of((uint64_t)i));
    if (b->state != M_READY) {
        CHECK(rc == TDM_ERR_NOT_FOUND, "delete %d: rc %d", i, rc);
        return;
    }
    CHECK(rc == TDM_OK, "delete %d: rc %d", i, rc);
    if (b->pins > 0) {
        m->doomed[m->n_doomed++] = (mdoomed_t){b->id, b->len, b->pins};
        m->n_doomed_total++;
    } else
        m_stale(m, b->id);
    b->state = M_ABSENT;
}

static void m_release(model_t *m, int i)
{
    mblk_t *b = &m->k[i];
    tdm_status_t rc = tdm_kvs_blocks_release_lease(m->s, key_of((uint64_t)i));
    if (b->state == M_ABSENT) {
        CHECK(rc == TDM_ERR_NOT_FOUND, "release %d: rc %d", i, rc);
        return;
    }
    CHECK(rc == TDM_OK, "release %d: rc %d", i, rc);
    if (b->lease_until != 0)
        m_lease_end(m, b, ++m->clock);
}

static void m_pin(model_t *m)
{
    int i = m_pick(m, M_READY);
    if (i < 0 || m->k[i].pins >= 8 || m->n_doomed + N_KEYS >= N_DOOMED)
        return;
    CHECK(tdm_kvs_blocks_pin(m->s, m->k[i].id) == TDM_OK, "pin %d", i);
    m->k[i].pins++;
}

static void m_unpin(model_t *m)
{
    if (m->n_doomed > 0 && rng() % 3 == 0) {
        int j = (int)(rng() % (uint64_t)m->n_doomed);
        mdoomed_t *d = &m->doomed[j];
        CHECK(tdm_kvs_blocks_unpin(m->s, d->id) == TDM_OK, "unpin doomed");
        if (--d->pins == 0) {
            m_stale(m, d->id);
            *d = m->doomed[--m->n_doomed];
        }
        return;
    }
    int start = (int)(rng() % N_KEYS);
    for (int j = 0; j < N_KEYS; j++) {
        mblk_t *b = &m->k[(start + j) % N_KEYS];
        if (b->state == M_READY && b->pins > 0) {
            CHECK(tdm_kvs_blocks_unpin(m->s, b->id) == TDM_OK, "unpin");
            if (--b->pins == 0 && b->lease_until == 0)
                b->stamp = ++m->clock;
            return;
        }
    }
}

static void m_drop_owner(model_t *m, tdm_kvs_owner_t owner)
{
    uint32_t n = 0;
    uint64_t stamp = ++m->clock;
    for (int i = 0; i < N_KEYS; i++) {
        mblk_t *b = &m->k[i];
        if (b->state == M_RECEIVING && b->owner == owner) {
            m_stale(m, b->id);
            b->state = M_ABSENT;
            n++;
        } else if (b->state != M_ABSENT && b->lease_until != 0 && b->lease_owner == owner) {
            m_lease_end(m, b, stamp);
            n++;
        }
    }
    CHECK(tdm_kvs_blocks_drop_owner(m->s, owner) == n, "drop_owner %u", owner);
}

static void m_stale_op(model_t *m)
{
    if (m->n_stale == 0)
        return;
    int n = m->n_stale < N_STALE ? m->n_stale : N_STALE;
    tdm_kvs_block_id_t id = m->stale[rng() % (uint64_t)n];
    tdm_kvs_block_info_t info;
    tdm_status_t rc;
    switch (rng() % 5) {
    case 0: rc = tdm_kvs_blocks_commit(m->s, id, m->now); break;
    case 1: rc = tdm_kvs_blocks_abort(m->s, id); break;
    case 2: rc = tdm_kvs_blocks_pin(m->s, id); break;
    case 3: rc = tdm_kvs_blocks_unpin(m->s, id); break;
    default: rc = tdm_kvs_blocks_info(m->s, id, &info); break;
    }
    CHECK(rc == TDM_ERR_INVALID, "stale id %lld accepted (rc %d)", (long long)id, rc);
}

/* Everything the store says agrees with the model. */
static void m_compare(model_t *m)
{
    uint64_t ready = 0, recv = 0, used = 0, reserved = 0, leased = 0, pinned = 0, evictable = 0;
    int bad = 0;
    for (int i = 0; i < N_KEYS; i++) {
        mblk_t *b = &m->k[i];
        tdm_kvs_block_id_t id = tdm_kvs_blocks_peek(m->s, key_of((uint64_t)i));
        if (b->state == M_ABSENT) {
            bad |= id >= 0;
            continue;
        }
        tdm_kvs_block_info_t info;
        if (tdm_kvs_blocks_info(m->s, b->id, &info) != TDM_OK) {
            CHECK(0, "info of key %d", i);
            continue;
        }
        bad |= info.length != b->len || info.pins != b->pins ||
               info.lease_until_ms != b->lease_until ||
               (b->lease_until != 0 && info.lease_owner != b->lease_owner);
        uint64_t g = m_gran(m, b->len);
        used += g;
        leased += b->lease_until != 0;
        pinned += b->pins != 0;
        if (b->state == M_READY) {
            bad |= id != b->id || info.state != TDM_KVS_BLOCK_STATE_READY;
            ready++;
            if (m_evictable(b))
                evictable += g;
        } else {
            bad |= id >= 0 || info.state != TDM_KVS_BLOCK_STATE_RECEIVING || info.owner != b->owner;
            recv++;
            reserved += g;
        }
    }
    CHECK(!bad, "blocks differ from the model");
    for (int j = 0; j < m->n_doomed; j++) {
        used += m_gran(m, m->doomed[j].len);
        pinned++;
    }
    tdm_kvs_blocks_stats_t st = stats_of(m->s);
    CHECK(st.blocks == ready && st.receiving == recv && st.doomed == (uint64_t)m->n_doomed &&
              st.bytes_used == used * m->granule && st.bytes_reserved == reserved * m->granule &&
              st.bytes_free + st.bytes_used == st.capacity &&
              st.bytes_evictable == evictable * m->granule && st.leased == leased &&
              st.pinned == pinned && st.hits == m->hits && st.misses == m->misses &&
              st.evictions == m->evictions,
          "stats differ from the model: blocks %llu/%llu used %llu/%llu leased %llu/%llu",
          (unsigned long long)st.blocks, (unsigned long long)ready,
          (unsigned long long)st.bytes_used, (unsigned long long)(used * m->granule),
          (unsigned long long)st.leased, (unsigned long long)leased);
    CHECK(st.largest_free <= st.bytes_free, "largest free");
}

static void test_random(uint64_t seed, uint64_t capacity, uint64_t max, uint64_t granule, int n_ops)
{
    static model_t m;
    memset(&m, 0, sizeof(m));
    rng_state = seed;
    m.granule = granule;
    m.capacity = capacity;
    m.max = max;
    m.now = 1000;
    CHECK(tdm_kvs_blocks_create(capacity, max, granule, &m.s) == TDM_OK, "create");
    m.region = malloc(capacity);
    int fails_before = n_fail;
    for (int op = 0; op < n_ops && n_fail == fails_before; op++) {
        /* A hot set the store can hold, so that finds hit and re-PUTs meet
         * their key; the rest of the keys come by now and then. */
        int ki = (int)(rng() % 4 ? rng() % 24 : rng() % N_KEYS);
        unsigned r = (unsigned)(rng() % 100);
        if (r < 30)
            m_reserve(&m, ki);
        else if (r < 42)
            m_commit_or_abort(&m, 1);
        else if (r < 45)
            m_commit_or_abort(&m, 0);
        else if (r < 62)
            m_find(&m, ki);
        else if (r < 66) {
            tdm_kvs_block_id_t id = tdm_kvs_blocks_peek(m.s, key_of((uint64_t)ki));
            CHECK((id >= 0) == (m.k[ki].state == M_READY), "peek %d", ki);
        } else if (r < 72)
            m_delete(&m, ki);
        else if (r < 76)
            m_release(&m, ki);
        else if (r < 82)
            m.now += rng_range(0, 200);
        else if (r < 85)
            CHECK(tdm_kvs_blocks_expire(m.s, m.now) == m_expire(&m), "expire");
        else if (r < 90)
            m_pin(&m);
        else if (r < 95)
            m_unpin(&m);
        else if (r < 96)
            m_drop_owner(&m, (tdm_kvs_owner_t)rng_range(1, 6));
        else if (r < 98)
            m_stale_op(&m);
        else {
            tdm_kvs_reservation_t rr;
            CHECK(tdm_kvs_blocks_reserve(m.s, key_of((uint64_t)ki), rng() % 2 ? 0 : max + 1, 0,
                                         m.now, 1, &rr) == TDM_ERR_INVALID,
                  "bad length");
        }
        if (op % 97 == 0) {
            m_compare(&m);
            CHECK(tdm_kvs_blocks_check(m.s) == TDM_OK, "check after op %d", op);
        }
    }
    m_compare(&m);
    tdm_kvs_blocks_stats_t st = stats_of(m.s);
    printf("random seed %#llx: %d ops, %llu hits, %llu misses, %llu evictions, %llu NOMEM, "
           "%llu doomed, %llu leases expired; at the end %llu blocks, %llu free extents\n",
           (unsigned long long)seed, n_ops, (unsigned long long)st.hits,
           (unsigned long long)st.misses, (unsigned long long)st.evictions,
           (unsigned long long)m.n_nomem, (unsigned long long)m.n_doomed_total,
           (unsigned long long)m.n_expired, (unsigned long long)st.blocks,
           (unsigned long long)st.free_extents);
    CHECK(st.evictions > 1000 && st.hits > 1000 && m.n_nomem > 0 && m.n_doomed_total > 10 &&
              m.n_expired > 100,
          "the run exercised eviction, hits, NOMEM, doomed blocks and expiry");

    /* Tear down: abort, unpin, delete everything: one free extent. */
    for (int i = 0; i < N_KEYS; i++) {
        mblk_t *b = &m.k[i];
        if (b->state == M_RECEIVING)
            CHECK(tdm_kvs_blocks_abort(m.s, b->id) == TDM_OK, "abort");
        if (b->state == M_READY) {
            for (; b->pins > 0; b->pins--)
                CHECK(tdm_kvs_blocks_unpin(m.s, b->id) == TDM_OK, "unpin");
            CHECK(tdm_kvs_blocks_delete(m.s, key_of((uint64_t)i)) == TDM_OK, "delete");
        }
    }
    for (int j = 0; j < m.n_doomed; j++)
        for (; m.doomed[j].pins > 0; m.doomed[j].pins--)
            CHECK(tdm_kvs_blocks_unpin(m.s, m.doomed[j].id) == TDM_OK, "unpin doomed");
    st = stats_of(m.s);
    CHECK(st.bytes_free == st.capacity && st.largest_free == st.capacity && st.free_extents == 1 &&
              st.bytes_used == 0 && st.blocks == 0 && st.receiving == 0 && st.doomed == 0 &&
              st.pinned == 0 && st.leased == 0,
          "all freed: free %llu largest %llu of %llu", (unsigned long long)st.bytes_free,
          (unsigned long long)st.largest_free, (unsigned long long)st.capacity);
    CHECK(tdm_kvs_blocks_check(m.s) == TDM_OK, "check at the end");
    free(m.region);
    tdm_kvs_blocks_destroy(m.s);
}

/* The production shape: 4 GiB, 4 MiB blocks, 4 KiB granules. Metadata stays
 * in tens of MiB; operations cost no more than a few hash and list steps. */
static void test_production_shape(void)
{
    tdm_kvs_blocks_t *s;
    CHECK(tdm_kvs_blocks_create(4 * GIB, 4 * MIB, 4096, &s) == TDM_OK, "create 4 GiB");
    tdm_kvs_blocks_stats_t st = stats_of(s);
    CHECK(st.metadata_bytes < 80 * MIB, "metadata %llu bytes",
          (unsigned long long)st.metadata_bytes);
    rng_state = 7;
    int n_ops = t_sanitized() ? 50000 : 300000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n_ops; i++) {
        tdm_kvs_reservation_t r;
        uint64_t len = rng_range(180 * KIB, 2 * MIB);
        tdm_status_t rc =
            tdm_kvs_blocks_reserve(s, key_of((uint64_t)i), len, 0, (uint64_t)i, 1, &r);
        if (rc != TDM_OK || tdm_kvs_blocks_commit(s, r.id, (uint64_t)i) != TDM_OK) {
            CHECK(0, "put %d", i);
            break;
        }
        tdm_kvs_blocks_find(s, key_of(rng() % (uint64_t)(i + 1)), (uint64_t)i);
        if (i % 3 == 0)
            tdm_kvs_blocks_delete(s, key_of(rng() % (uint64_t)(i + 1)));
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ns = ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / n_ops;
    st = stats_of(s);
    printf("4 GiB store: metadata %.1f MiB; %d puts (+finds, deletes) at %.0f ns each; %llu "
           "blocks, %llu evictions, %llu free extents, largest free %llu KiB\n",
           (double)st.metadata_bytes / MIB, n_ops, ns, (unsigned long long)st.blocks,
           (unsigned long long)st.evictions, (unsigned long long)st.free_extents,
           (unsigned long long)(st.largest_free / KIB));
    CHECK(tdm_kvs_blocks_check(s) == TDM_OK, "check");
    tdm_kvs_blocks_destroy(s);
}

int main(void)
{
    test_create();
    test_basic();
    test_lru_order();
    test_leases();
    test_pins();
    test_coalesce();
    test_best_fit();
    test_drop_owner();
    /* 4 KiB granules, blocks up to 1 MiB in 16 MiB; 64-byte granules, blocks
     * up to 32 KiB in 1 MiB (16384 granules, 512 exact bins). */
    test_random(0x5eed0001, 16 * MIB, MIB, 4096, 150000);
    test_random(0x5eed0002, MIB, 32 * KIB, 64, 150000);
    test_random(0x5eed0003, 8 * MIB + 4096 * 3, 3 * MIB / 2 + 17, 4096, 100000);
    test_production_shape();
    return t_finish();
}
