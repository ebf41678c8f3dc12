/* Byte-level BPE tokenizer (see include/tandem/tokenizer.h).
 *
 * Encoding, per call:
 *   1. with parse_special, the text of control and user-defined tokens is cut
 *      out first (longest token first, then left to right, as llama.cpp does);
 *   2. every remaining fragment is split by the pre-tokenizer's regexes, one
 *      after the other: each regex splits the pieces of the one before, and
 *      the text between two matches is a piece of its own, so every byte
 *      lands in exactly one piece (invalid UTF-8 never matches anything with
 *      PCRE2_MATCH_INVALID_UTF and so ends up in the gaps);
 *   3. each piece is mapped byte by byte to GPT-2's printable alphabet and
 *      merged: the adjacent pair with the lowest merge rank (the leftmost on
 *      a tie) first, through a binary heap, so a piece of n bytes costs
 *      O(n log n);
 *   4. each final symbol is looked up in the vocabulary; one that is absent
 *      falls back to the tokens of its single bytes.
 *
 * Everything built at create time is read-only afterwards; the per-call
 * state (PCRE2 match data, BPE buffers) lives in an encode context on the
 * caller's stack and heap, so any number of threads may encode at once. */
#include "tandem/tokenizer.h"
#include "tandem/utf8.h"

#include "tandem/log.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOK_MOD       "tokenizer"
#define TOK_MAX_REGEX 4
#define TOK_MAX_EOG   8
/* Longest token string accepted from a file, and longest text one call may
 * encode: keeps every offset inside uint32_t / int32_t arithmetic. */
#define TOK_MAX_TOKEN_LEN ((size_t)1 << 20)
#define TOK_MAX_TEXT_LEN  ((size_t)1 << 30)

/* Pre-tokenizer regexes. The contractions of Llama 3 are spelled out in both
 * cases instead of (?i:...) so that Unicode case folding (U+017F 'ſ' folds to
 * 's') does not make them match more than the reference does. */
#define RE_GPT2  "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
#define RE_DIGIT "\\p{N}"
#define RE_LLAMA3                                                                                  \
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"     \
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
/* llama.cpp's list for "default" (and a missing tokenizer.ggml.pre). */
#define RE_DEFAULT_PUNCT "[\\p{P}\\$\\+<=>\\^~\\|]+"
#define RE_DEFAULT_GPT2                                                                            \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
#define RE_DEFAULT_NUM   "\\p{N}+"
#define RE_DEFAULT_DIGIT "[0-9][0-9][0-9]"

typedef struct tok_pre {
    const char *name;
    const char *re[TOK_MAX_REGEX]; /* applied in order; NULL ends the list */
    bool ignore_merges;            /* a piece that is a whole token is not merged */
    bool add_bos_default;          /* when tokenizer.ggml.add_bos_token is absent */
} tok_pre_t;

static const tok_pre_t tok_pres[] = {
    {"gpt2", {RE_GPT2}, false, false},
    {"starcoder", {RE_DIGIT, RE_GPT2}, false, false},
    {"smollm", {RE_DIGIT, RE_GPT2}, false, false},
    {"llama-bpe", {RE_LLAMA3}, true, true},
    {"llama3", {RE_LLAMA3}, true, true},
    {"default",
     {RE_DEFAULT_PUNCT, RE_DEFAULT_GPT2, RE_DEFAULT_NUM, RE_DEFAULT_DIGIT},
     false,
     false},
};

/* One merge "a b": the bytes of a and b back to back, and where b starts. */
typedef struct tok_merge {
    uint32_t off; /* into merge_arena */
    uint32_t len; /* len(a) + len(b) */
    uint32_t split;
} tok_merge_t;

/* An open-addressing hash table of int32 indexes (-1 = empty slot); the keys
 * live in the arrays the indexes point into. */
typedef struct tok_table {
    int32_t *slots;
    size_t mask; /* capacity - 1; capacity a power of two */
} tok_table_t;

struct tdm_tokenizer {
    int32_t n_vocab;
    char *text_arena;   /* vocabulary strings, each NUL terminated */
    size_t *text_off;   /* n_vocab */
    uint32_t *text_len; /* n_vocab */
    char *dec_arena;    /* decoded bytes of every token */
    size_t *dec_off;    /* n_vocab */
    uint32_t *dec_len;  /* n_vocab */
    uint8_t *types;     /* n_vocab, tdm_token_type_t */
    tok_table_t vocab;  /* string -> id; the last id wins for a repeated string */

    char *merge_arena;
    tok_merge_t *merges; /* n_merges, rank = index */
    int32_t n_merges;
    uint32_t max_merge_len;  /* longest len(a) + len(b): longer pairs never merge */
    tok_table_t merge_table; /* (a, b) -> rank; the first (lowest) rank wins */

    /* Control and user-defined tokens, sorted by length (longest first),
     * then id; by_byte lists their indexes grouped by first byte. */
    int32_t *special; /* n_special ids */
    int32_t n_special;
    int32_t *special_by_byte;       /* n_special indexes into special */
    int32_t special_start[256 + 1]; /* by_byte range of each first byte */

    pcre2_code *re[TOK_MAX_REGEX];
    int n_re;
    bool ignore_merges;

    /* Byte alphabet: byte -> UTF-8 of its printable stand-in (1 or 2 bytes),
     * and the token of each byte's stand-in (-1 if absent). */
    uint8_t byte_utf8[256][2];
    uint8_t byte_utf8_len[256];
    int32_t byte_token[256];

    int32_t bos, eos, eot, unk, pad;
    bool add_bos;
    int32_t eog[TOK_MAX_EOG];
    int n_eog;
};

/* ---- small helpers ---- */

static void set_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t err_len, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (err != NULL && err_len > 0)
        snprintf(err, err_len, "%s", msg);
    tdm_log_debug(TOK_MOD, "%s", msg);
}

/* FNV-1a, 64-bit, then a final mix: keys are short strings. */
static uint64_t hash_bytes(const void *data, size_t len, uint64_t seed)
{
    const uint8_t *p = data;
    uint64_t h = 0xcbf29ce484222325ull ^ seed;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static bool table_init(tok_table_t *tb, size_t n)
{
    size_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    tb->slots = malloc(cap * sizeof(*tb->slots));
    if (tb->slots == NULL)
        return false;
    memset(tb->slots, 0xff, cap * sizeof(*tb->slots)); /* all -1 */
    tb->mask = cap - 1;
    return true;
}

static const char *tok_text(const tdm_tokenizer_t *t, int32_t id)
{
    return t->text_arena + t->text_off[id];
}

/* The id of a vocabulary string, or -1. */
static int32_t vocab_lookup(const tdm_tokenizer_t *t, const char *s, size_t len)
{
    size_t i = (size_t)hash_bytes(s, len, 0) & t->vocab.mask;
    for (;;) {
        int32_t id = t->vocab.slots[i];
        if (id < 0)
            return -1;
        if (t->text_len[id] == len && memcmp(tok_text(t, id), s, len) == 0)
            return id;
        i = (i + 1) & t->vocab.mask;
    }
}

static void vocab_insert(tdm_tokenizer_t *t, int32_t id)
{
    const char *s = tok_text(t, id);
    size_t len = t->text_len[id];
    size_t i = (size_t)hash_bytes(s, len, 0) & t->vocab.mask;
    for (;;) {
        int32_t cur = t->vocab.slots[i];
        if (cur < 0 || (t->text_len[cur] == len && memcmp(tok_text(t, cur), s, len) == 0)) {
            t->vocab.slots[i] = id; /* a repeated string maps to its last id */
            return;
        }
        i = (i + 1) & t->vocab.mask;
    }
}

/* The rank of merging a (s[0..split)) with b (s[split..len)), or -1. */
static int32_t merge_lookup(const tdm_tokenizer_t *t, const char *s, size_t len, size_t split)
{
    if (len > t->max_merge_len)
        return -1;
    size_t i = (size_t)hash_bytes(s, len, split) & t->merge_table.mask;
    for (;;) {
        int32_t r = t->merge_table.slots[i];
        if (r < 0)
            return -1;
        const tok_merge_t *m = &t->merges[r];
        if (m->len == len && m->split == split && memcmp(t->merge_arena + m->off, s, len) == 0)
            return r;
        i = (i + 1) & t->merge_table.mask;
    }
}

/* Inserts merge r unless the same pair is already there with a lower rank. */
static void merge_insert(tdm_tokenizer_t *t, int32_t r)
{
    const tok_merge_t *m = &t->merges[r];
    const char *s = t->merge_arena + m->off;
    size_t i = (size_t)hash_bytes(s, m->len, m->split) & t->merge_table.mask;
    for (;;) {
        int32_t cur = t->merge_table.slots[i];
        if (cur < 0) {
            t->merge_table.slots[i] = r;
            return;
        }
        const tok_merge_t *c = &t->merges[cur];
        if (c->len == m->len && c->split == m->split &&
            memcmp(t->merge_arena + c->off, s, m->len) == 0)
            return;
        i = (i + 1) & t->merge_table.mask;
    }
}

/* GPT-2's bytes_to_unicode: the printable bytes '!'..'~', 0xA1..0xAC and
 * 0xAE..0xFF stand for themselves; the other 68 bytes, in increasing order,
 * take U+0100, U+0101, ... */
static void build_byte_alphabet(tdm_tokenizer_t *t)
{
    unsigned next = 0x100;
    for (unsigned b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
        unsigned cp = printable ? b : next++;
        if (cp < 0x80) {
            t->byte_utf8[b][0] = (uint8_t)cp;
            t->byte_utf8_len[b] = 1;
        } else {
            t->byte_utf8[b][0] = (uint8_t)(0xc0 | (cp >> 6));
            t->byte_utf8[b][1] = (uint8_t)(0x80 | (cp & 0x3f));
            t->byte_utf8_len[b] = 2;
        }
    }
}

/* Writes the bytes a vocabulary string stands for into out (room for len
 * bytes: decoding never grows a string); returns the count. A code point
 * outside the byte alphabet, or bytes that are not UTF-8, are copied as
 * they are. */
static size_t decode_alphabet(const int16_t *cp_to_byte, const char *s, size_t len, char *out)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t i = 0, n = 0;
    while (i < len) {
        uint32_t cp;
        size_t l = tdm_utf8_decode(u + i, len - i, &cp);
        if (l == 0) {
            out[n++] = (char)u[i++];
            continue;
        }
        if (cp < 0x144 && cp_to_byte[cp] >= 0) {
            out[n++] = (char)cp_to_byte[cp];
        } else {
            memcpy(out + n, u + i, l);
            n += l;
        }
        i += l;
    }
    return n;
}

/* ---- create / destroy ---- */

void tdm_tokenizer_destroy(tdm_tokenizer_t *t)
{
    if (t == NULL)
        return;
    for (int i = 0; i < t->n_re; i++)
        pcre2_code_free(t->re[i]);
    free(t->special_by_byte);
    free(t->special);
    free(t->merge_table.slots);
    free(t->merges);
    free(t->merge_arena);
    free(t->vocab.slots);
    free(t->types);
    free(t->dec_len);
    free(t->dec_off);
    free(t->dec_arena);
    free(t->text_len);
    free(t->text_off);
    free(t->text_arena);
    free(t);
}

/* Reads an optional token id key; an id outside the vocabulary is treated as
 * absent, with a warning. */
static int32_t read_token_id(const tdm_gguf_t *g, const char *key, int32_t n_vocab)
{
    uint64_t v;
    if (!tdm_gguf_get_u64(g, key, &v)) {
        if (tdm_gguf_find_kv(g, key) != NULL)
            tdm_log_warn(TOK_MOD, "%s is not a non-negative integer; ignored", key);
        return -1;
    }
    if (v >= (uint64_t)n_vocab) {
        tdm_log_warn(TOK_MOD, "%s = %" PRIu64 " is outside the vocabulary (%d tokens); ignored",
                     key, v, n_vocab);
        return -1;
    }
    return (int32_t)v;
}

static int special_cmp(const tdm_tokenizer_t *t, int32_t a, int32_t b)
{
    uint32_t la = t->text_len[a], lb = t->text_len[b];
    if (la != lb)
        return la > lb ? -1 : 1;
    return a < b ? -1 : (a > b ? 1 : 0);
}

/* Sorts the special ids by (length desc, id asc); insertion sort is enough
 * for the few hundred specials a vocabulary has, and qsort has no context. */
static void sort_specials(tdm_tokenizer_t *t)
{
    for (int32_t i = 1; i < t->n_special; i++) {
        int32_t v = t->special[i];
        int32_t j = i - 1;
        while (j >= 0 && special_cmp(t, t->special[j], v) > 0) {
            t->special[j + 1] = t->special[j];
            j--;
        }
        t->special[j + 1] = v;
    }
}

static tdm_status_t build_specials(tdm_tokenizer_t *t)
{
    int32_t n = 0;
    for (int32_t i = 0; i < t->n_vocab; i++)
        if ((t->types[i] == TDM_TOKEN_TYPE_CONTROL || t->types[i] == TDM_TOKEN_TYPE_USER_DEFINED) &&
            t->text_len[i] > 0)
            n++;
    t->special = malloc((size_t)(n > 0 ? n : 1) * sizeof(*t->special));
    t->special_by_byte = malloc((size_t)(n > 0 ? n : 1) * sizeof(*t->special_by_byte));
    if (t->special == NULL || t->special_by_byte == NULL)
        return TDM_ERR_NOMEM;
    n = 0;
    for (int32_t i = 0; i < t->n_vocab; i++)
        if ((t->types[i] == TDM_TOKEN_TYPE_CONTROL || t->types[i] == TDM_TOKEN_TYPE_USER_DEFINED) &&
            t->text_len[i] > 0)
            t->special[n++] = i;
    t->n_special = n;
    sort_specials(t);
    /* Counting sort by first byte keeps the (length, id) order in a bucket. */
    int32_t count[256] = {0};
    for (int32_t k = 0; k < n; k++)
        count[(uint8_t)tok_text(t, t->special[k])[0]]++;
    t->special_start[0] = 0;
    for (int b = 0; b < 256; b++)
        t->special_start[b + 1] = t->special_start[b] + count[b];
    int32_t fill[256];
    memcpy(fill, t->special_start, sizeof(fill));
    for (int32_t k = 0; k < n; k++)
        t->special_by_byte[fill[(uint8_t)tok_text(t, t->special[k])[0]]++] = k;
    return TDM_OK;
}

static tdm_status_t build_regexes(tdm_tokenizer_t *t, const tok_pre_t *pre, char *err,
                                  size_t err_len)
{
    for (int i = 0; i < TOK_MAX_REGEX && pre->re[i] != NULL; i++) {
        int code;
        PCRE2_SIZE off;
        pcre2_code *re =
            pcre2_compile((PCRE2_SPTR)pre->re[i], PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &code, &off, NULL);
        if (re == NULL) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(code, msg, sizeof(msg));
            set_err(err, err_len, "pre-tokenizer '%s': regex %d does not compile at offset %zu: %s",
                    pre->name, i, (size_t)off, (const char *)msg);
            return TDM_ERR_INTERNAL;
        }
        t->re[t->n_re++] = re;
        /* Without JIT (not built in, or refused by the system) the
         * interpreter gives the same matches, only slower. */
        int jrc = pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
        if (jrc != 0)
            tdm_log_debug(TOK_MOD, "regex %d of '%s': no JIT (%d); using the interpreter", i,
                          pre->name, jrc);
    }
    return TDM_OK;
}

/* Copies the vocabulary strings and their decoded bytes. */
static tdm_status_t build_vocab(tdm_tokenizer_t *t, const tdm_str_t *toks, char *err,
                                size_t err_len)
{
    size_t total = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        if (toks[i].len > TOK_MAX_TOKEN_LEN) {
            set_err(err, err_len, "tokenizer.ggml.tokens[%d] is %" PRIu64 " bytes long (limit %zu)",
                    i, toks[i].len, TOK_MAX_TOKEN_LEN);
            return TDM_ERR_FORMAT;
        }
        total += (size_t)toks[i].len + 1;
    }
    size_t n = (size_t)t->n_vocab;
    t->text_arena = malloc(total);
    t->dec_arena = malloc(total);
    t->text_off = malloc(n * sizeof(*t->text_off));
    t->text_len = malloc(n * sizeof(*t->text_len));
    t->dec_off = malloc(n * sizeof(*t->dec_off));
    t->dec_len = malloc(n * sizeof(*t->dec_len));
    if (t->text_arena == NULL || t->dec_arena == NULL || t->text_off == NULL ||
        t->text_len == NULL || t->dec_off == NULL || t->dec_len == NULL ||
        !table_init(&t->vocab, n))
        return TDM_ERR_NOMEM;

    int16_t cp_to_byte[0x144];
    for (int c = 0; c < 0x144; c++)
        cp_to_byte[c] = -1;
    for (int b = 0; b < 256; b++) {
        uint32_t cp;
        tdm_utf8_decode(t->byte_utf8[b], t->byte_utf8_len[b], &cp);
        cp_to_byte[cp] = (int16_t)b;
    }

    size_t off = 0, doff = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        size_t len = (size_t)toks[i].len;
        if (len > 0)
            memcpy(t->text_arena + off, toks[i].ptr, len);
        t->text_arena[off + len] = '\0';
        t->text_off[i] = off;
        t->text_len[i] = (uint32_t)len;
        off += len + 1;
        /* Control and user-defined tokens are raw text, not byte alphabet. */
        int ty = t->types[i];
        size_t dlen;
        if (ty == TDM_TOKEN_TYPE_CONTROL || ty == TDM_TOKEN_TYPE_USER_DEFINED) {
            if (len > 0)
                memcpy(t->dec_arena + doff, toks[i].ptr, len);
            dlen = len;
        } else {
            dlen = decode_alphabet(cp_to_byte, t->text_arena + t->text_off[i], len,
                                   t->dec_arena + doff);
        }
        t->dec_off[i] = doff;
        t->dec_len[i] = (uint32_t)dlen;
        doff += dlen;
        vocab_insert(t, i);
    }
    for (int b = 0; b < 256; b++)
        t->byte_token[b] = vocab_lookup(t, (const char *)t->byte_utf8[b], t->byte_utf8_len[b]);
    return TDM_OK;
}

/* Keeps the merges whose two parts are vocabulary strings. */
static tdm_status_t build_merges(tdm_tokenizer_t *t, const tdm_str_t *m, uint64_t n_in)
{
    size_t total = 0;
    for (uint64_t i = 0; i < n_in; i++)
        total += (size_t)m[i].len;
    t->merge_arena = malloc(total > 0 ? total : 1);
    t->merges = malloc((size_t)(n_in > 0 ? n_in : 1) * sizeof(*t->merges));
    if (t->merge_arena == NULL || t->merges == NULL || !table_init(&t->merge_table, n_in))
        return TDM_ERR_NOMEM;
    uint64_t n_bad = 0, first_bad = 0;
    size_t off = 0;
    int32_t n = 0;
    for (uint64_t i = 0; i < n_in; i++) {
        const char *s = m[i].ptr;
        size_t len = (size_t)m[i].len;
        /* The separator is the first space after the first byte, so that a
         * part made of one space byte (possible outside byte-level vocabs)
         * still parses. */
        const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
        size_t la = sp != NULL ? (size_t)(sp - s) : 0;
        size_t lb = sp != NULL ? len - la - 1 : 0;
        if (sp == NULL || lb == 0 || len > TOK_MAX_TOKEN_LEN || vocab_lookup(t, s, la) < 0 ||
            vocab_lookup(t, sp + 1, lb) < 0) {
            if (n_bad++ == 0)
                first_bad = i;
            continue;
        }
        memcpy(t->merge_arena + off, s, la);
        memcpy(t->merge_arena + off + la, sp + 1, lb);
        /* Kept merges are stored densely in file order: rank comparisons
         * are the same as with the file's own indexes. */
        t->merges[n] = (tok_merge_t){(uint32_t)off, (uint32_t)(la + lb), (uint32_t)la};
        merge_insert(t, n);
        if (la + lb > t->max_merge_len)
            t->max_merge_len = (uint32_t)(la + lb);
        n++;
        off += la + lb;
    }
    t->n_merges = n;
    if (n_bad > 0)
        tdm_log_warn(TOK_MOD,
                     "%" PRIu64 " of %" PRIu64 " merges skipped (first: #%" PRIu64
                     "): not 'a b' with both parts in the vocabulary",
                     n_bad, n_in, first_bad);
    return TDM_OK;
}

static void add_eog(tdm_tokenizer_t *t, int32_t id)
{
    if (id < 0)
        return;
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == id)
            return;
    if (t->n_eog < TOK_MAX_EOG)
        t->eog[t->n_eog++] = id;
}

tdm_status_t tdm_tokenizer_create(const tdm_gguf_t *g, char *err, size_t err_len,
                                  tdm_tokenizer_t **out)
{
    if (g == NULL || out == NULL) {
        set_err(err, err_len, "tdm_tokenizer_create: NULL argument");
        return TDM_ERR_INVALID;
    }
    tdm_str_t s;
    if (!tdm_gguf_get_str(g, "tokenizer.ggml.model", &s)) {
        set_err(err, err_len, "tokenizer.ggml.model is missing (or not a string)");
        return TDM_ERR_FORMAT;
    }
    if (s.len != 4 || memcmp(s.ptr, "gpt2", 4) != 0) {
        set_err(err, err_len,
                "tokenizer.ggml.model '%.*s' is not supported (only 'gpt2', byte-level BPE)",
                (int)(s.len > 64 ? 64 : s.len), s.ptr);
        return TDM_ERR_UNSUPPORTED;
    }
    const tok_pre_t *pre = NULL;
    if (!tdm_gguf_get_str(g, "tokenizer.ggml.pre", &s)) {
        tdm_log_warn(TOK_MOD, "tokenizer.ggml.pre is missing; using the 'default' pre-tokenizer");
        pre = &tok_pres[sizeof(tok_pres) / sizeof(tok_pres[0]) - 1];
    } else {
        for (size_t i = 0; i < sizeof(tok_pres) / sizeof(tok_pres[0]); i++)
            if (strlen(tok_pres[i].name) == s.len && memcmp(tok_pres[i].name, s.ptr, s.len) == 0)
                pre = &tok_pres[i];
        if (pre == NULL) {
            set_err(err, err_len,
                    "tokenizer.ggml.pre '%.*s' is not supported (known: gpt2, starcoder, smollm, "
                    "llama-bpe, llama3, default)",
                    (int)(s.len > 64 ? 64 : s.len), s.ptr);
            return TDM_ERR_UNSUPPORTED;
        }
    }
    const tdm_str_t *toks;
    uint64_t n_tok;
    if (!tdm_gguf_get_str_array(g, "tokenizer.ggml.tokens", &toks, &n_tok)) {
        set_err(err, err_len, "tokenizer.ggml.tokens is missing (or not an array of strings)");
        return TDM_ERR_FORMAT;
    }
    if (n_tok == 0 || n_tok > (uint64_t)INT32_MAX / 4) {
        set_err(err, err_len, "tokenizer.ggml.tokens has %" PRIu64 " entries", n_tok);
        return TDM_ERR_FORMAT;
    }
    const tdm_str_t *merges = NULL;
    uint64_t n_merges = 0;
    if (!tdm_gguf_get_str_array(g, "tokenizer.ggml.merges", &merges, &n_merges)) {
        set_err(err, err_len, "tokenizer.ggml.merges is missing (or not an array of strings)");
        return TDM_ERR_FORMAT;
    }
    if (n_merges > (uint64_t)INT32_MAX / 4) {
        set_err(err, err_len, "tokenizer.ggml.merges has %" PRIu64 " entries", n_merges);
        return TDM_ERR_FORMAT;
    }
    const tdm_gguf_kv_t *types_kv = tdm_gguf_find_kv(g, "tokenizer.ggml.token_type");
    if (types_kv != NULL &&
        (types_kv->type != TDM_GGUF_TYPE_ARRAY || types_kv->arr_len != n_tok ||
         types_kv->arr_type == TDM_GGUF_TYPE_STRING || types_kv->arr_type == TDM_GGUF_TYPE_ARRAY)) {
        set_err(err, err_len,
                "tokenizer.ggml.token_type is not an integer array of %" PRIu64 " entries", n_tok);
        return TDM_ERR_FORMAT;
    }

    tdm_status_t st = TDM_ERR_NOMEM;
    tdm_tokenizer_t *t = calloc(1, sizeof(*t));
    if (t == NULL)
        goto fail_nomem;
    t->n_vocab = (int32_t)n_tok;
    t->types = malloc((size_t)n_tok);
    if (t->types == NULL)
        goto fail_nomem;
    uint64_t n_bad_types = 0, first_bad_type = 0;
    for (uint64_t i = 0; i < n_tok; i++) {
        int64_t v = TDM_TOKEN_TYPE_NORMAL;
        if (types_kv != NULL && !tdm_gguf_array_i64(types_kv, i, &v)) {
            st = TDM_ERR_FORMAT;
            set_err(err, err_len, "tokenizer.ggml.token_type[%" PRIu64 "] is not an integer", i);
            goto fail;
        }
        if (v < TDM_TOKEN_TYPE_UNDEFINED || v > TDM_TOKEN_TYPE_BYTE) {
            if (n_bad_types++ == 0)
                first_bad_type = i;
            v = TDM_TOKEN_TYPE_NORMAL;
        }
        t->types[i] = (uint8_t)v;
    }
    if (n_bad_types > 0)
        tdm_log_warn(TOK_MOD,
                     "%" PRIu64 " tokens (first: %" PRIu64 ") have an unknown token_type; taken "
                     "as normal",
                     n_bad_types, first_bad_type);
    build_byte_alphabet(t);
    st = build_vocab(t, toks, err, err_len);
    if (st == TDM_OK)
        st = build_merges(t, merges, n_merges);
    if (st == TDM_OK)
        st = build_specials(t);
    if (st == TDM_OK)
        st = build_regexes(t, pre, err, err_len);
    if (st != TDM_OK) {
        if (st == TDM_ERR_NOMEM)
            goto fail_nomem;
        goto fail;
    }
    t->ignore_merges = pre->ignore_merges;

    t->bos = read_token_id(g, "tokenizer.ggml.bos_token_id", t->n_vocab);
    t->eos = read_token_id(g, "tokenizer.ggml.eos_token_id", t->n_vocab);
    t->eot = read_token_id(g, "tokenizer.ggml.eot_token_id", t->n_vocab);
    t->unk = read_token_id(g, "tokenizer.ggml.unknown_token_id", t->n_vocab);
    t->pad = read_token_id(g, "tokenizer.ggml.padding_token_id", t->n_vocab);
    bool add_bos;
    t->add_bos = tdm_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos)
                     ? add_bos
                     : pre->add_bos_default;
    if (t->add_bos && t->bos < 0) {
        tdm_log_warn(TOK_MOD, "add_bos_token is set but there is no BOS token; no BOS is added");
        t->add_bos = false;
    }
    add_eog(t, t->eos);
    add_eog(t, t->eot);
    static const char *const eog_names[] = {"<|im_end|>", "<|eot_id|>", "<|eom_id|>",
                                            "<|end_of_text|>"};
    for (size_t i = 0; i < sizeof(eog_names) / sizeof(eog_names[0]); i++)
        add_eog(t, vocab_lookup(t, eog_names[i], strlen(eog_names[i])));

    tdm_log_debug(TOK_MOD, "tokenizer: %d tokens, %d merges, %d special, pre '%s'", t->n_vocab,
                  t->n_merges, t->n_special, pre->name);
    *out = t;
    return TDM_OK;

fail_nomem:
    st = TDM_ERR_NOMEM;
    set_err(err, err_len, "out of memory building the tokenizer (%" PRIu64 " tokens)", n_tok);
fail:
    tdm_tokenizer_destroy(t);
    return st;
}

/* ---- encode ---- */

typedef struct bpe_sym {
    uint32_t start; /* offset into the mapped piece */
    uint32_t len;   /* mapped bytes; 0 once merged into the symbol on its left */
    int32_t prev, next;
} bpe_sym_t;

typedef struct bpe_pair {
    int32_t rank;
    int32_t left, right;
    uint32_t len; /* len(left) + len(right) when the pair was queued */
} bpe_pair_t;

typedef struct enc_ctx {
    const tdm_tokenizer_t *t;
    int32_t *tokens;
    size_t cap;
    size_t count; /* tokens produced, also past cap */
    pcre2_match_data *md;
    /* BPE buffers, grown to the longest piece seen. */
    size_t ws_cap; /* in input bytes */
    char *mapped;  /* 2 * ws_cap */
    bpe_sym_t *sym;
    bpe_pair_t *heap; /* 3 * ws_cap: n - 1 initial pairs, at most 2 per merge */
    size_t heap_n;
} enc_ctx_t;

static void emit(enc_ctx_t *c, int32_t id)
{
    if (c->count < c->cap)
        c->tokens[c->count] = id;
    c->count++;
}

static bool pair_less(const bpe_pair_t *a, const bpe_pair_t *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static void heap_push(enc_ctx_t *c, bpe_pair_t p)
{
    size_t i = c->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!pair_less(&p, &c->heap[parent]))
            break;
        c->heap[i] = c->heap[parent];
        i = parent;
    }
    c->heap[i] = p;
}

static bpe_pair_t heap_pop(enc_ctx_t *c)
{
    bpe_pair_t top = c->heap[0];
    bpe_pair_t last = c->heap[--c->heap_n];
    size_t n = c->heap_n, i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const bpe_pair_t *best = &last;
        if (l < n && pair_less(&c->heap[l], best)) {
            m = l;
            best = &c->heap[l];
        }
        if (r < n && pair_less(&c->heap[r], best))
            m = r;
        if (m == i)
            break;
        c->heap[i] = c->heap[m];
        i = m;
    }
    if (n > 0)
        c->heap[i] = last;
    return top;
}

static void queue_pair(enc_ctx_t *c, int32_t left, int32_t right)
{
    if (left < 0 || right < 0)
        return;
    const bpe_sym_t *a = &c->sym[left], *b = &c->sym[right];
    int32_t rank = merge_lookup(c->t, c->mapped + a->start, a->len + b->len, a->len);
    if (rank >= 0)
        heap_push(c, (bpe_pair_t){rank, left, right, a->len + b->len});
}

static tdm_status_t ensure_workspace(enc_ctx_t *c, size_t n)
{
    if (n <= c->ws_cap)
        return TDM_OK;
    size_t cap = c->ws_cap > 0 ? c->ws_cap : 256;
    while (cap < n)
        cap *= 2;
    char *mapped = realloc(c->mapped, 2 * cap);
    if (mapped == NULL)
        return TDM_ERR_NOMEM;
    c->mapped = mapped;
    bpe_sym_t *sym = realloc(c->sym, cap * sizeof(*sym));
    if (sym == NULL)
        return TDM_ERR_NOMEM;
    c->sym = sym;
    bpe_pair_t *heap = realloc(c->heap, 3 * cap * sizeof(*heap));
    if (heap == NULL)
        return TDM_ERR_NOMEM;
    c->heap = heap;
    c->ws_cap = cap;
    return TDM_OK;
}

/* Emits the tokens of the n input bytes at p, one token per byte: the
 * fallback for a symbol that is not in the vocabulary.
 *
 * A byte whose stand-in is not a token cannot be represented at all and is
 * dropped, as llama.cpp and HF tokenizers do. Real vocabularies lack the
 * bytes that never occur in UTF-8 (StarCoder's: 0xC0, 0xC1, 0xF1, 0xF5..0xFF;
 * SmolLM2's also 0xF2 and six ASCII control bytes). The unknown token is no
 * substitute: in these vocabularies it is <|endoftext|>, which would end the
 * text in the middle of a prompt. */
static void emit_bytes(enc_ctx_t *c, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int32_t id = c->t->byte_token[p[i]];
        if (id >= 0)
            emit(c, id);
    }
}

/* BPE over one pre-tokenized piece of n input bytes. */
static tdm_status_t bpe_piece(enc_ctx_t *c, const uint8_t *p, size_t n)
{
    const tdm_tokenizer_t *t = c->t;
    if (n == 0)
        return TDM_OK;
    if (n == 1) {
        emit_bytes(c, p, 1);
        return TDM_OK;
    }
    tdm_status_t st = ensure_workspace(c, n);
    if (st != TDM_OK)
        return st;
    uint32_t off = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t l = t->byte_utf8_len[p[i]];
        memcpy(c->mapped + off, t->byte_utf8[p[i]], l);
        c->sym[i] = (bpe_sym_t){off, l, (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1};
        off += l;
    }
    if (t->ignore_merges) {
        int32_t id = vocab_lookup(t, c->mapped, off);
        if (id >= 0) {
            emit(c, id);
            return TDM_OK;
        }
    }
    c->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++)
        queue_pair(c, (int32_t)i, (int32_t)i + 1);
    while (c->heap_n > 0) {
        bpe_pair_t pr = heap_pop(c);
        bpe_sym_t *a = &c->sym[pr.left], *b = &c->sym[pr.right];
        /* Stale entry: one side was merged away or grew since it was queued. */
        if (a->len == 0 || b->len == 0 || a->next != pr.right || a->len + b->len != pr.len)
            continue;
        a->len += b->len;
        a->next = b->next;
        if (b->next >= 0)
            c->sym[b->next].prev = pr.left;
        b->len = 0;
        queue_pair(c, a->prev, pr.left);
        queue_pair(c, pr.left, a->next);
    }
    for (int32_t i = 0; i >= 0; i = c->sym[i].next) {
        const bpe_sym_t *s = &c->sym[i];
        int32_t id = vocab_lookup(t, c->mapped + s->start, s->len);
        if (id >= 0) {
            emit(c, id);
        } else {
            size_t end = s->next >= 0 ? (size_t)s->next : n;
            emit_bytes(c, p + i, end - (size_t)i);
        }
    }
    return TDM_OK;
}

static int re_match(const pcre2_code *re, const uint8_t *p, size_t n, size_t start,
                    pcre2_match_data *md)
{
    int rc = pcre2_match(re, p, n, start, 0, md, NULL);
    /* The JIT's default stack is 32 KiB; the interpreter keeps its
     * backtracking frames on the heap and has no such limit. */
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(re, p, n, start, PCRE2_NO_JIT, md, NULL);
    return rc;
}

/* Splits [p, p + n) with regex `level` and passes every match and every gap
 * between matches to the next level; after the last regex, to BPE. */
static tdm_status_t split_piece(enc_ctx_t *c, int level, const uint8_t *p, size_t n)
{
    if (n == 0)
        return TDM_OK;
    if (level == c->t->n_re)
        return bpe_piece(c, p, n);
    tdm_status_t st;
    size_t off = 0;
    while (off < n) {
        int rc = re_match(c->t->re[level], p, n, off, c->md);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof(msg));
            tdm_log_error(TOK_MOD, "pre-tokenizer regex %d failed on a %zu-byte piece: %s", level,
                          n, (const char *)msg);
            return rc == PCRE2_ERROR_NOMEMORY ? TDM_ERR_NOMEM : TDM_ERR_INTERNAL;
        }
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
        size_t s = ov[0], e = ov[1];
        if (s < off || e <= s || e > n) /* no pattern here can match empty */
            break;
        if (s > off && (st = split_piece(c, level + 1, p + off, s - off)) != TDM_OK)
            return st;
        if ((st = split_piece(c, level + 1, p + s, e - s)) != TDM_OK)
            return st;
        off = e;
    }
    return split_piece(c, level + 1, p + off, n - off);
}

/* A special token found in the text. */
typedef struct spec_hit {
    size_t pos;
    int32_t rank; /* index into t->special: length order */
} spec_hit_t;

static int hit_cmp_rank(const void *a, const void *b)
{
    const spec_hit_t *x = a, *y = b;
    if (x->rank != y->rank)
        return x->rank < y->rank ? -1 : 1;
    return x->pos < y->pos ? -1 : (x->pos > y->pos ? 1 : 0);
}

static int hit_cmp_pos(const void *a, const void *b)
{
    const spec_hit_t *x = a, *y = b;
    return x->pos < y->pos ? -1 : (x->pos > y->pos ? 1 : 0);
}

/* Finds the special tokens to cut out and writes them, in text order, to
 * *hits_out (*n_hits_out entries; malloc'd, may be NULL when none).
 *
 * The result is the one llama.cpp gets by taking the specials longest first
 * and splitting every still-plain fragment at each occurrence, left to right:
 * all occurrences are collected, sorted by (length rank, position), and an
 * occurrence is taken when none of its bytes is taken yet. */
static tdm_status_t find_specials(const tdm_tokenizer_t *t, const uint8_t *p, size_t n,
                                  spec_hit_t **hits_out, size_t *n_hits_out)
{
    spec_hit_t *hits = NULL;
    size_t nh = 0, cap = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t b0 = t->special_start[p[i]], b1 = t->special_start[p[i] + 1];
        for (int32_t k = b0; k < b1; k++) {
            int32_t rank = t->special_by_byte[k];
            int32_t id = t->special[rank];
            size_t len = t->text_len[id];
            if (len > n - i || memcmp(p + i, tok_text(t, id), len) != 0)
                continue;
            if (nh == cap) {
                size_t ncap = cap > 0 ? 2 * cap : 16;
                spec_hit_t *nhits = realloc(hits, ncap * sizeof(*hits));
                if (nhits == NULL) {
                    free(hits);
                    return TDM_ERR_NOMEM;
                }
                hits = nhits;
                cap = ncap;
            }
            hits[nh++] = (spec_hit_t){i, rank};
        }
    }
    if (nh == 0) {
        *hits_out = NULL;
        *n_hits_out = 0;
        return TDM_OK;
    }
    uint8_t *taken = calloc(n, 1);
    if (taken == NULL) {
        free(hits);
        return TDM_ERR_NOMEM;
    }
    qsort(hits, nh, sizeof(*hits), hit_cmp_rank);
    size_t kept = 0;
    for (size_t h = 0; h < nh; h++) {
        size_t len = t->text_len[t->special[hits[h].rank]];
        bool free_run = true;
        for (size_t j = 0; j < len && free_run; j++)
            free_run = !taken[hits[h].pos + j];
        if (!free_run)
            continue;
        memset(taken + hits[h].pos, 1, len);
        hits[kept++] = hits[h];
    }
    free(taken);
    qsort(hits, kept, sizeof(*hits), hit_cmp_pos);
    *hits_out = hits;
    *n_hits_out = kept;
    return TDM_OK;
}

tdm_status_t tdm_tokenizer_encode(const tdm_tokenizer_t *t, const char *text, size_t len,
                                  bool parse_special, int32_t *tokens, size_t cap, size_t *n_out)
{
    if (t == NULL || n_out == NULL || (text == NULL && len > 0) || (tokens == NULL && cap > 0))
        return TDM_ERR_INVALID;
    if (len > TOK_MAX_TEXT_LEN) {
        tdm_log_error(TOK_MOD, "text of %zu bytes is over the %zu-byte limit", len,
                      TOK_MAX_TEXT_LEN);
        return TDM_ERR_INVALID;
    }
    const uint8_t *p = (const uint8_t *)text;
    enc_ctx_t c = {.t = t, .tokens = tokens, .cap = cap};
    tdm_status_t st = TDM_OK;
    spec_hit_t *hits = NULL;
    size_t n_hits = 0;
    if (len == 0)
        goto done;
    c.md = pcre2_match_data_create(1, NULL);
    if (c.md == NULL) {
        st = TDM_ERR_NOMEM;
        goto done;
    }
    if (parse_special && t->n_special > 0)
        st = find_specials(t, p, len, &hits, &n_hits);
    size_t pos = 0;
    for (size_t h = 0; h < n_hits && st == TDM_OK; h++) {
        st = split_piece(&c, 0, p + pos, hits[h].pos - pos);
        int32_t id = t->special[hits[h].rank];
        emit(&c, id);
        pos = hits[h].pos + t->text_len[id];
    }
    if (st == TDM_OK)
        st = split_piece(&c, 0, p + pos, len - pos);
done:
    free(hits);
    free(c.heap);
    free(c.sym);
    free(c.mapped);
    pcre2_match_data_free(c.md);
    if (st != TDM_OK)
        return st;
    *n_out = c.count;
    return c.count <= cap ? TDM_OK : TDM_ERR_NOMEM;
}

/* ---- decode and accessors ---- */

size_t tdm_tokenizer_token_bytes(const tdm_tokenizer_t *t, int32_t id, bool render_special,
                                 char *buf, size_t cap)
{
    if (t == NULL || id < 0 || id >= t->n_vocab)
        return 0;
    if (t->types[id] == TDM_TOKEN_TYPE_CONTROL && !render_special)
        return 0;
    size_t n = t->dec_len[id];
    if (buf != NULL && cap > 0)
        memcpy(buf, t->dec_arena + t->dec_off[id], n < cap ? n : cap);
    return n;
}

tdm_status_t tdm_tokenizer_decode(const tdm_tokenizer_t *t, const int32_t *ids, size_t n,
                                  bool render_special, char *buf, size_t cap, size_t *len_out)
{
    if (t == NULL || len_out == NULL || (ids == NULL && n > 0) || (buf == NULL && cap > 0))
        return TDM_ERR_INVALID;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return TDM_ERR_INVALID;
        size_t room = total < cap ? cap - total : 0;
        total += tdm_tokenizer_token_bytes(t, ids[i], render_special, room > 0 ? buf + total : NULL,
                                           room);
    }
    if (total < cap)
        buf[total] = '\0';
    *len_out = total;
    return total <= cap ? TDM_OK : TDM_ERR_NOMEM;
}

int32_t tdm_tokenizer_n_vocab(const tdm_tokenizer_t *t)
{
    return t != NULL ? t->n_vocab : 0;
}

int32_t tdm_tokenizer_bos(const tdm_tokenizer_t *t)
{
    return t != NULL ? t->bos : -1;
}

int32_t tdm_tokenizer_eos(const tdm_tokenizer_t *t)
{
    return t != NULL ? t->eos : -1;
}

bool tdm_tokenizer_is_eog(const tdm_tokenizer_t *t, int32_t id)
{
    if (t == NULL || id < 0)
        return false;
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == id)
            return true;
    return false;
}

bool tdm_tokenizer_is_stop(const tdm_tokenizer_t *t, int32_t id, bool ignore_eos,
                           const int32_t *stop_ids, size_t n_stop_ids)
{
    if (!ignore_eos && tdm_tokenizer_is_eog(t, id))
        return true;
    for (size_t i = 0; i < n_stop_ids; i++)
        if (stop_ids[i] == id)
            return true;
    return false;
}

bool tdm_tokenizer_add_bos(const tdm_tokenizer_t *t)
{
    return t != NULL && t->add_bos;
}

tdm_token_type_t tdm_tokenizer_token_type(const tdm_tokenizer_t *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_vocab)
        return TDM_TOKEN_TYPE_UNDEFINED;
    return (tdm_token_type_t)t->types[id];
}

tdm_str_t tdm_tokenizer_token_text(const tdm_tokenizer_t *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_vocab)
        return (tdm_str_t){"", 0};
    return (tdm_str_t){tok_text(t, id), t->text_len[id]};
}

int32_t tdm_tokenizer_find(const tdm_tokenizer_t *t, const char *text)
{
    if (t == NULL || text == NULL)
        return -1;
    return vocab_lookup(t, text, strlen(text));
}
