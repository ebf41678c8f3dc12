/* The connection handshake's protocol (net/handshake.h). */
#include "handshake.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HS_MAGIC     "TDMH"
#define HS_HELLO_LEN 40                /* magic 4, version 2, flags 2, nonce 32 */
#define HS_PROOF_HDR (TDM_HS_MAC + 12) /* MAC, id 8, address length 4 */
#define HS_FLAG_AUTH 1u                /* CHAL: the server checks the token */

enum hs_state {
    HS_SERVER_HELLO,      /* server: waits for HELLO */
    HS_SERVER_PROOF_HDR,  /* server: waits for PROOF's fixed part */
    HS_SERVER_PROOF_ADDR, /* server: waits for the client's address */
    HS_CLIENT_CHAL,       /* client: waits for CHAL */
    HS_CLIENT_ACCEPT_HDR, /* client: waits for ACCEPT's fixed part */
    HS_CLIENT_ACCEPT_ADDR,
    HS_FINISHED,
    HS_DEAD,
};

struct tdm_hs {
    bool server;
    enum hs_state state;
    char *token; /* "" when none */
    uint8_t nonce_c[TDM_HS_NONCE], nonce_s[TDM_HS_NONCE];
    uint64_t my_id, peer_id;
    bool peer_open; /* client: the server checks no token */
    uint8_t *addr;
    size_t addr_len;
    uint8_t peer_mac[TDM_HS_MAC];
    uint8_t *peer_addr;
    size_t peer_addr_len;
    /* input being gathered for the current state */
    uint8_t in[HS_HELLO_LEN > HS_PROOF_HDR ? HS_HELLO_LEN : HS_PROOF_HDR];
    size_t in_have, in_need;
    /* output not sent yet */
    uint8_t *out;
    size_t out_len, out_off;
};

static void put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static uint16_t get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}
static uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}
static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* HMAC-SHA256(token, label | nonce_c | nonce_s | id | other_id | addr). */
static bool mac_of(const tdm_hs_t *hs, bool of_server, uint64_t id, uint64_t other_id,
                   const uint8_t *addr, size_t addr_len, uint8_t out[TDM_HS_MAC])
{
    const char *label = of_server ? "tandem/1 server" : "tandem/1 client";
    size_t ll = strlen(label);
    size_t n = ll + 2 * TDM_HS_NONCE + 16 + addr_len;
    uint8_t *msg = malloc(n);
    if (msg == NULL)
        return false;
    uint8_t *p = msg;
    memcpy(p, label, ll);
    p += ll;
    memcpy(p, hs->nonce_c, TDM_HS_NONCE);
    p += TDM_HS_NONCE;
    memcpy(p, hs->nonce_s, TDM_HS_NONCE);
    p += TDM_HS_NONCE;
    put_u64(p, id);
    put_u64(p + 8, other_id);
    p += 16;
    memcpy(p, addr, addr_len);
    unsigned int out_len = 0;
    const char *key = hs->token;
    size_t key_len = strlen(key);
    /* HMAC with an empty key is defined (the key is zero padded); OpenSSL
     * wants a non-NULL pointer for it. */
    bool ok = HMAC(EVP_sha256(), key_len ? key : "", (int)key_len, msg, n, out, &out_len) != NULL &&
              out_len == TDM_HS_MAC;
    free(msg);
    return ok;
}

static tdm_status_t set_output(tdm_hs_t *hs, size_t len)
{
    free(hs->out);
    hs->out = malloc(len);
    if (hs->out == NULL)
        return TDM_ERR_NOMEM;
    hs->out_len = len;
    hs->out_off = 0;
    return TDM_OK;
}

static tdm_status_t put_hello(tdm_hs_t *hs, uint16_t flags, const uint8_t *nonce)
{
    tdm_status_t st = set_output(hs, HS_HELLO_LEN);
    if (st != TDM_OK)
        return st;
    memcpy(hs->out, HS_MAGIC, 4);
    put_u16(hs->out + 4, TDM_HS_VERSION);
    put_u16(hs->out + 6, flags);
    memcpy(hs->out + 8, nonce, TDM_HS_NONCE);
    return TDM_OK;
}

/* PROOF (client) or ACCEPT (server): MAC, our id, our address. */
static tdm_status_t put_proof(tdm_hs_t *hs)
{
    tdm_status_t st = set_output(hs, HS_PROOF_HDR + hs->addr_len);
    if (st != TDM_OK)
        return st;
    uint64_t other = hs->server ? hs->peer_id : 0;
    if (!mac_of(hs, hs->server, hs->my_id, other, hs->addr, hs->addr_len, hs->out))
        return TDM_ERR_NOMEM;
    put_u64(hs->out + TDM_HS_MAC, hs->my_id);
    put_u32(hs->out + TDM_HS_MAC + 8, (uint32_t)hs->addr_len);
    memcpy(hs->out + HS_PROOF_HDR, hs->addr, hs->addr_len);
    return TDM_OK;
}

tdm_status_t tdm_hs_create(bool server, const char *token, const uint8_t nonce[TDM_HS_NONCE],
                           uint64_t my_id, const void *addr, size_t addr_len, tdm_hs_t **out)
{
    if (my_id == 0 || addr_len == 0 || addr_len > TDM_HS_MAX_ADDR)
        return TDM_ERR_INVALID;
    tdm_hs_t *hs = calloc(1, sizeof(*hs));
    if (hs == NULL)
        return TDM_ERR_NOMEM;
    hs->server = server;
    hs->my_id = my_id;
    hs->token = strdup(token != NULL ? token : "");
    hs->addr = malloc(addr_len);
    if (hs->token == NULL || hs->addr == NULL) {
        tdm_hs_destroy(hs);
        return TDM_ERR_NOMEM;
    }
    memcpy(hs->addr, addr, addr_len);
    hs->addr_len = addr_len;
    memcpy(server ? hs->nonce_s : hs->nonce_c, nonce, TDM_HS_NONCE);
    hs->in_need = HS_HELLO_LEN;
    if (server) {
        hs->state = HS_SERVER_HELLO;
    } else {
        hs->state = HS_CLIENT_CHAL;
        tdm_status_t st = put_hello(hs, 0, hs->nonce_c);
        if (st != TDM_OK) {
            tdm_hs_destroy(hs);
            return st;
        }
    }
    *out = hs;
    return TDM_OK;
}

void tdm_hs_destroy(tdm_hs_t *hs)
{
    if (hs == NULL)
        return;
    if (hs->token != NULL) {
        OPENSSL_cleanse(hs->token, strlen(hs->token));
        free(hs->token);
    }
    free(hs->addr);
    free(hs->peer_addr);
    free(hs->out);
    free(hs);
}

const uint8_t *tdm_hs_output(const tdm_hs_t *hs, size_t *len)
{
    if (hs->state == HS_DEAD || hs->out == NULL || hs->out_off == hs->out_len) {
        *len = 0;
        return NULL;
    }
    *len = hs->out_len - hs->out_off;
    return hs->out + hs->out_off;
}

void tdm_hs_sent(tdm_hs_t *hs, size_t n)
{
    if (hs->out == NULL)
        return;
    hs->out_off += n < hs->out_len - hs->out_off ? n : hs->out_len - hs->out_off;
}

static bool output_pending(const tdm_hs_t *hs)
{
    return hs->out != NULL && hs->out_off < hs->out_len;
}

size_t tdm_hs_want(const tdm_hs_t *hs)
{
    if (hs->state == HS_FINISHED || hs->state == HS_DEAD || output_pending(hs))
        return 0;
    return hs->in_need - hs->in_have;
}

static tdm_status_t refuse(tdm_hs_t *hs, char *why, size_t why_len, const char *msg)
{
    hs->state = HS_DEAD;
    if (why != NULL && why_len > 0)
        snprintf(why, why_len, "%s", msg);
    return TDM_ERR_INVALID;
}

static tdm_status_t check_hello(tdm_hs_t *hs, const uint8_t *p, char *why, size_t why_len)
{
    if (memcmp(p, HS_MAGIC, 4) != 0)
        return refuse(hs, why, why_len, "not a tandem peer (bad handshake magic)");
    uint16_t v = get_u16(p + 4);
    if (v != TDM_HS_VERSION) {
        char msg[96];
        snprintf(msg, sizeof(msg), "handshake version %u, this side speaks %d: run one release", v,
                 TDM_HS_VERSION);
        return refuse(hs, why, why_len, msg);
    }
    return TDM_OK;
}

/* The fixed part of PROOF / ACCEPT: keeps the MAC, id and length. */
static tdm_status_t take_proof_hdr(tdm_hs_t *hs, const uint8_t *p, char *why, size_t why_len)
{
    memcpy(hs->peer_mac, p, TDM_HS_MAC);
    hs->peer_id = get_u64(p + TDM_HS_MAC);
    uint32_t n = get_u32(p + TDM_HS_MAC + 8);
    if (hs->peer_id == 0)
        return refuse(hs, why, why_len, "connection id 0");
    if (n == 0 || n > TDM_HS_MAX_ADDR)
        return refuse(hs, why, why_len, "a worker address of a size out of range");
    hs->peer_addr = malloc(n);
    if (hs->peer_addr == NULL)
        return refuse(hs, why, why_len, "out of memory");
    hs->peer_addr_len = n;
    hs->in_have = 0;
    hs->in_need = n;
    return TDM_OK;
}

static bool peer_mac_ok(const tdm_hs_t *hs)
{
    uint8_t want[TDM_HS_MAC];
    uint64_t other = hs->server ? 0 : hs->my_id;
    if (!mac_of(hs, !hs->server, hs->peer_id, other, hs->peer_addr, hs->peer_addr_len, want))
        return false;
    return CRYPTO_memcmp(want, hs->peer_mac, TDM_HS_MAC) == 0;
}

/* The current state's input is whole: act on it. */
static tdm_status_t step(tdm_hs_t *hs, char *why, size_t why_len)
{
    tdm_status_t st;
    switch (hs->state) {
    case HS_SERVER_HELLO:
        if ((st = check_hello(hs, hs->in, why, why_len)) != TDM_OK)
            return st;
        memcpy(hs->nonce_c, hs->in + 8, TDM_HS_NONCE);
        if (put_hello(hs, hs->token[0] ? HS_FLAG_AUTH : 0, hs->nonce_s) != TDM_OK)
            return refuse(hs, why, why_len, "out of memory");
        hs->state = HS_SERVER_PROOF_HDR;
        hs->in_have = 0;
        hs->in_need = HS_PROOF_HDR;
        return TDM_OK;
    case HS_CLIENT_CHAL:
        if ((st = check_hello(hs, hs->in, why, why_len)) != TDM_OK)
            return st;
        hs->peer_open = (get_u16(hs->in + 6) & HS_FLAG_AUTH) == 0;
        memcpy(hs->nonce_s, hs->in + 8, TDM_HS_NONCE);
        if (put_proof(hs) != TDM_OK)
            return refuse(hs, why, why_len, "out of memory");
        hs->state = HS_CLIENT_ACCEPT_HDR;
        hs->in_have = 0;
        hs->in_need = HS_PROOF_HDR;
        return TDM_OK;
    case HS_SERVER_PROOF_HDR:
    case HS_CLIENT_ACCEPT_HDR:
        if ((st = take_proof_hdr(hs, hs->in, why, why_len)) != TDM_OK)
            return st;
        hs->state = hs->state == HS_SERVER_PROOF_HDR ? HS_SERVER_PROOF_ADDR : HS_CLIENT_ACCEPT_ADDR;
        return TDM_OK;
    case HS_SERVER_PROOF_ADDR:
        if (hs->token[0] && !peer_mac_ok(hs))
            return refuse(hs, why, why_len, "wrong cluster token");
        if (put_proof(hs) != TDM_OK)
            return refuse(hs, why, why_len, "out of memory");
        hs->state = HS_FINISHED;
        return TDM_OK;
    case HS_CLIENT_ACCEPT_ADDR:
        if (!hs->peer_open && !peer_mac_ok(hs))
            return refuse(hs, why, why_len,
                          "the server could not prove the cluster token (a different token?)");
        free(hs->out);
        hs->out = NULL;
        hs->state = HS_FINISHED;
        return TDM_OK;
    case HS_FINISHED:
    case HS_DEAD: break;
    }
    return refuse(hs, why, why_len, "input after the handshake ended");
}

tdm_status_t tdm_hs_input(tdm_hs_t *hs, const void *data, size_t len, char *why, size_t why_len)
{
    if (len > tdm_hs_want(hs))
        return refuse(hs, why, why_len, "more bytes than the handshake asked for");
    uint8_t *dst = (hs->state == HS_SERVER_PROOF_ADDR || hs->state == HS_CLIENT_ACCEPT_ADDR)
                       ? hs->peer_addr
                       : hs->in;
    memcpy(dst + hs->in_have, data, len);
    hs->in_have += len;
    if (hs->in_have < hs->in_need)
        return TDM_OK;
    return step(hs, why, why_len);
}

bool tdm_hs_done(const tdm_hs_t *hs)
{
    return hs->state == HS_FINISHED && !output_pending(hs);
}

bool tdm_hs_peer_open(const tdm_hs_t *hs)
{
    return hs->peer_open;
}

uint64_t tdm_hs_peer_id(const tdm_hs_t *hs)
{
    return hs->peer_id;
}

const void *tdm_hs_peer_addr(const tdm_hs_t *hs, size_t *len)
{
    *len = hs->peer_addr_len;
    return hs->peer_addr;
}
