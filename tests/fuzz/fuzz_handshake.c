/* libFuzzer target: the connection handshake (net/handshake.h) fed
 * arbitrary peer bytes. The first byte picks the side under test (bit 0:
 * server or client), whether it has a token (bit 1) and how the peer's
 * bytes are cut into reads (the other bits); the rest is what the peer
 * sends. Whatever comes, the handshake must ask for no more than it can
 * take, never read past what it was given (every chunk is copied into a
 * buffer of its exact size for ASan), and finish only when the peer's MAC
 * checks out (abort() otherwise; a valid transcript with a fixed nonce is
 * in the seeds, so the fuzzer reaches the end).
 *
 * Seeds (tests/fuzz/corpus/handshake/): transcripts of a real exchange,
 * written by this target itself:
 *   TANDEM_FUZZ_HS_WRITE_SEEDS=DIR build-asan/bin/fuzz_handshake */
#include "../../net/handshake.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define TOKEN "fuzz-token"

static const uint8_t nonce_s[TDM_HS_NONCE] = {1, 2, 3, 4, 5, 6, 7, 8};
static const uint8_t nonce_c[TDM_HS_NONCE] = {9, 10, 11, 12, 13, 14, 15, 16};
static const uint8_t addr_s[24] = "server worker address";
static const uint8_t addr_c[20] = "client worker addr";

static tdm_hs_t *make(bool server, bool token)
{
    tdm_hs_t *hs = NULL;
    if (tdm_hs_create(server, token ? TOKEN : NULL, server ? nonce_s : nonce_c, server ? 7 : 5,
                      server ? addr_s : addr_c, server ? sizeof(addr_s) : sizeof(addr_c),
                      &hs) != TDM_OK)
        abort();
    return hs;
}

/* Drains hs's output into out (NULL: dropped); returns the bytes. */
static size_t drain(tdm_hs_t *hs, uint8_t *out, size_t cap)
{
    size_t total = 0, n;
    const uint8_t *p;
    while ((p = tdm_hs_output(hs, &n)) != NULL && n > 0) {
        if (out != NULL && total + n <= cap)
            memcpy(out + total, p, n);
        total += n;
        tdm_hs_sent(hs, n);
    }
    return total;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    bool server = data[0] & 1, token = (data[0] & 2) != 0;
    size_t cut = (data[0] >> 2) + 1; /* 1..64 bytes a read */
    data++;
    size--;
    tdm_hs_t *hs = make(server, token);
    char why[160];
    size_t off = 0;
    bool dead = false;
    while (!dead) {
        drain(hs, NULL, 0);
        if (tdm_hs_done(hs))
            break;
        size_t want = tdm_hs_want(hs);
        if (want == 0 || off == size)
            break;
        size_t n = want < cut ? want : cut;
        if (n > size - off)
            n = size - off;
        uint8_t *chunk = malloc(n);
        if (chunk == NULL)
            abort();
        memcpy(chunk, data + off, n);
        off += n;
        tdm_status_t st = tdm_hs_input(hs, chunk, n, why, sizeof(why));
        free(chunk);
        if (st != TDM_OK) {
            if (why[0] == '\0')
                abort(); /* a refusal always says why */
            dead = true;
            if (tdm_hs_want(hs) != 0 || tdm_hs_done(hs))
                abort(); /* a dead handshake takes nothing more */
        }
    }
    if (tdm_hs_done(hs)) {
        /* finished: the peer proved the token, unless the server has none */
        size_t alen;
        const void *a = tdm_hs_peer_addr(hs, &alen);
        if (a == NULL || alen == 0 || alen > TDM_HS_MAX_ADDR || tdm_hs_peer_id(hs) == 0)
            abort();
        if (!server && token && !tdm_hs_peer_open(hs) &&
            (alen != sizeof(addr_s) || memcmp(a, addr_s, alen) != 0))
            abort(); /* a proven server's address is the one the MAC covered */
    }
    tdm_hs_destroy(hs);
    return 0;
}

/* Feeds n bytes as the socket loop does: never more than the handshake
 * wants at once. */
static bool feed(tdm_hs_t *hs, const uint8_t *p, size_t n, char *why, size_t why_len)
{
    while (n > 0) {
        size_t w = tdm_hs_want(hs);
        if (w == 0)
            return false;
        size_t k = w < n ? w : n;
        if (tdm_hs_input(hs, p, k, why, why_len) != TDM_OK)
            return false;
        p += k;
        n -= k;
    }
    return true;
}

/* A real exchange between two sides: must finish, with each side's view
 * of the other right; a wrong token must fail. Optionally writes seeds. */
static void self_test(const char *seed_dir)
{
    for (int mismatch = 0; mismatch < 2; mismatch++) {
        tdm_hs_t *s = make(true, true), *c = NULL;
        if (tdm_hs_create(false, mismatch ? "other" : TOKEN, nonce_c, 5, addr_c, sizeof(addr_c),
                          &c) != TDM_OK)
            abort();
        uint8_t to_s[4096], to_c[4096];
        size_t n_to_s = 0, n_to_c = 0;
        bool failed = false;
        char why[160];
        for (int round = 0; round < 8 && !failed; round++) {
            size_t n = drain(c, to_s + n_to_s, sizeof(to_s) - n_to_s);
            if (n > 0 && !feed(s, to_s + n_to_s, n, why, sizeof(why)))
                failed = true;
            n_to_s += n;
            size_t m = drain(s, to_c + n_to_c, sizeof(to_c) - n_to_c);
            if (!failed && m > 0 && !feed(c, to_c + n_to_c, m, why, sizeof(why)))
                failed = true;
            n_to_c += m;
        }
        if (mismatch != failed || (!mismatch && (!tdm_hs_done(s) || !tdm_hs_done(c))))
            abort();
        if (!mismatch && seed_dir != NULL) {
            const struct {
                const char *name;
                uint8_t head;
                const uint8_t *bytes;
                size_t n;
            } seeds[] = {{"server_valid", 1 | 2 | (63 << 2), to_s, n_to_s},
                         {"client_valid", 0 | 2 | (63 << 2), to_c, n_to_c},
                         {"server_bytewise", 1 | 2, to_s, n_to_s}};
            for (size_t i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++) {
                char path[1024];
                snprintf(path, sizeof(path), "%s/%s", seed_dir, seeds[i].name);
                FILE *f = fopen(path, "wb");
                if (f == NULL)
                    abort();
                fwrite(&seeds[i].head, 1, 1, f);
                fwrite(seeds[i].bytes, 1, seeds[i].n, f);
                fclose(f);
            }
        }
        tdm_hs_destroy(s);
        tdm_hs_destroy(c);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    self_test(getenv("TANDEM_FUZZ_HS_WRITE_SEEDS"));
    return 0;
}
