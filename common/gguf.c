/* GGUF v3 reader: maps the file read-only and validates every field before
 * the handle is handed out (see include/tandem/gguf.h for the format).
 *
 * Rules the parser keeps so that no input can crash it:
 *   - every read goes through need(), which compares against the bytes left;
 *   - every count is checked against the bytes left (times the smallest size
 *     an item can have) before anything is allocated for it;
 *   - every sum and product of sizes from the file is checked for overflow. */
#include "tandem/gguf.h"

#include "tandem/dtype.h"
#include "tandem/log.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC   0x46554747u /* "GGUF" read as a little-endian u32 */
#define GGUF_VERSION 3u

/* Smallest encodings, used to bound counts before allocating:
 * kv = key length (8) + type (4) + a one-byte value;
 * tensor info = name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8). */
#define GGUF_MIN_KV_BYTES     13u
#define GGUF_MIN_TENSOR_BYTES 32u
#define GGUF_NAME_SHOW        64 /* bytes of a name quoted in a message */

struct tdm_gguf {
    const uint8_t *base; /* the file: mapped (mapped != 0) or the caller's buffer */
    uint64_t size;
    int mapped;
    uint32_t version;
    uint64_t alignment;
    uint64_t data_offset; /* byte offset of the data section */
    uint64_t n_kv;
    tdm_gguf_kv_t *kvs;              /* n_kv, in file order */
    tdm_str_t *kv_strs;              /* n_kv: the value of kv i when it is a single string */
    const tdm_gguf_kv_t **kv_sorted; /* n_kv, by key, for binary search */
    uint64_t n_tensors;
    tdm_gguf_tensor_t *tensors;              /* n_tensors, in file order */
    const tdm_gguf_tensor_t **tensor_sorted; /* n_tensors, by name */
    /* A split model: shards[0..n_shards) are complete handles over their own
     * maps; this handle borrows the kvs (and their indexes) of shards[0],
     * owns the concatenated tensor table and `meta`, and base/size is meta. */
    uint32_t n_shards;   /* 1 for one file */
    tdm_gguf_t **shards; /* NULL for one file */
    uint8_t *meta;       /* every shard's bytes before its data section */
};

typedef struct gguf_parser {
    const uint8_t *base;
    uint64_t size;
    uint64_t pos;
    char *err;
    size_t err_len;
    char ctx[192]; /* the item being parsed, prefixed to messages; "" for none */
} gguf_parser_t;

static const char *gguf_type_name(uint32_t type)
{
    static const char *const names[] = {
        "u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
        "bool", "string", "array", "u64", "i64", "f64",
    };
    return type < sizeof(names) / sizeof(names[0]) ? names[type] : "unknown";
}

uint64_t tdm_gguf_type_size(uint32_t type)
{
    switch (type) {
    case TDM_GGUF_TYPE_UINT8:
    case TDM_GGUF_TYPE_INT8:
    case TDM_GGUF_TYPE_BOOL: return 1;
    case TDM_GGUF_TYPE_UINT16:
    case TDM_GGUF_TYPE_INT16: return 2;
    case TDM_GGUF_TYPE_UINT32:
    case TDM_GGUF_TYPE_INT32:
    case TDM_GGUF_TYPE_FLOAT32: return 4;
    case TDM_GGUF_TYPE_UINT64:
    case TDM_GGUF_TYPE_INT64:
    case TDM_GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

static uint64_t load_le(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* Copies a name from the file into buf for a message: at most
 * GGUF_NAME_SHOW bytes, control characters and quotes replaced by '?', so a
 * hostile name cannot break the one-line message. */
static const char *show_str(tdm_str_t s, char *buf, size_t buf_len)
{
    size_t n = s.len < GGUF_NAME_SHOW ? (size_t)s.len : GGUF_NAME_SHOW;
    if (n + 4 > buf_len)
        n = buf_len - 4;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        buf[i] = (c < 0x20 || c == 0x7f || c == '\'') ? '?' : (char)c;
    }
    if (n < s.len) {
        memcpy(buf + n, "...", 4);
    } else {
        buf[n] = '\0';
    }
    return buf;
}

__attribute__((format(printf, 4, 0))) static tdm_status_t
vfail(gguf_parser_t *p, tdm_status_t status, int with_ctx, const char *fmt, va_list ap)
{
    char msg[1024];
    int n = 0;
    if (with_ctx && p->ctx[0] != '\0')
        n = snprintf(msg, sizeof(msg), "%s: ", p->ctx);
    if (n < 0 || (size_t)n >= sizeof(msg))
        n = 0;
    vsnprintf(msg + n, sizeof(msg) - (size_t)n, fmt, ap);
    tdm_log_debug("gguf", "%s", msg);
    if (p->err != NULL && p->err_len > 0)
        snprintf(p->err, p->err_len, "%s", msg);
    return status;
}

/* Records the error "<ctx>: <message>" and returns status. */
__attribute__((format(printf, 3, 4))) static tdm_status_t
fail(gguf_parser_t *p, tdm_status_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    tdm_status_t s = vfail(p, status, 1, fmt, ap);
    va_end(ap);
    return s;
}

/* Records the error without the context prefix. */
__attribute__((format(printf, 3, 4))) static tdm_status_t
fail_plain(gguf_parser_t *p, tdm_status_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    tdm_status_t s = vfail(p, status, 0, fmt, ap);
    va_end(ap);
    return s;
}

static uint64_t left(const gguf_parser_t *p)
{
    return p->size - p->pos;
}

static tdm_status_t need(gguf_parser_t *p, uint64_t n, const char *what)
{
    if (n > left(p))
        return fail(p, TDM_ERR_FORMAT,
                    "%s at byte %" PRIu64 " needs %" PRIu64 " bytes, only %" PRIu64
                    " left (file truncated?)",
                    what, p->pos, n, left(p));
    return TDM_OK;
}

static tdm_status_t read_u32(gguf_parser_t *p, const char *what, uint32_t *out)
{
    tdm_status_t s = need(p, 4, what);
    if (s != TDM_OK)
        return s;
    *out = (uint32_t)load_le(p->base + p->pos, 4);
    p->pos += 4;
    return TDM_OK;
}

static tdm_status_t read_u64(gguf_parser_t *p, const char *what, uint64_t *out)
{
    tdm_status_t s = need(p, 8, what);
    if (s != TDM_OK)
        return s;
    *out = load_le(p->base + p->pos, 8);
    p->pos += 8;
    return TDM_OK;
}

static tdm_status_t read_str(gguf_parser_t *p, const char *what, tdm_str_t *out)
{
    uint64_t at = p->pos;
    uint64_t len;
    tdm_status_t s = read_u64(p, what, &len);
    if (s != TDM_OK)
        return s;
    if (len > left(p))
        return fail(p, TDM_ERR_FORMAT,
                    "%s length %" PRIu64 " at byte %" PRIu64 " exceeds the %" PRIu64 " bytes left",
                    what, len, at, left(p));
    out->ptr = (const char *)p->base + p->pos;
    out->len = len;
    p->pos += len;
    return TDM_OK;
}

/* Checks that n bytes at the current position are each 0 or 1. */
static tdm_status_t check_bools(gguf_parser_t *p, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        uint8_t b = p->base[p->pos + i];
        if (b > 1)
            return fail(p, TDM_ERR_FORMAT, "bool value %u at byte %" PRIu64 " is not 0 or 1",
                        (unsigned)b, p->pos + i);
    }
    return TDM_OK;
}

static int str_cmp(tdm_str_t a, tdm_str_t b)
{
    uint64_t n = a.len < b.len ? a.len : b.len;
    int c = n > 0 ? memcmp(a.ptr, b.ptr, (size_t)n) : 0;
    if (c != 0)
        return c;
    return a.len < b.len ? -1 : a.len > b.len ? 1 : 0;
}

static int kv_ptr_cmp(const void *a, const void *b)
{
    const tdm_gguf_kv_t *x = *(const tdm_gguf_kv_t *const *)a;
    const tdm_gguf_kv_t *y = *(const tdm_gguf_kv_t *const *)b;
    int c = str_cmp(x->key, y->key);
    /* Ties by file position, so the first of two duplicates is reported first. */
    return c != 0 ? c : (x->file_offset < y->file_offset ? -1 : 1);
}

static int tensor_name_cmp(const void *a, const void *b)
{
    const tdm_gguf_tensor_t *x = *(const tdm_gguf_tensor_t *const *)a;
    const tdm_gguf_tensor_t *y = *(const tdm_gguf_tensor_t *const *)b;
    int c = str_cmp(x->name, y->name);
    if (c != 0)
        return c;
    /* Ties by shard, then position, so the first of two duplicates comes first. */
    if (x->shard != y->shard)
        return x->shard < y->shard ? -1 : 1;
    return x->info_offset < y->info_offset ? -1 : x->info_offset > y->info_offset ? 1 : 0;
}

static int tensor_offset_cmp(const void *a, const void *b)
{
    const tdm_gguf_tensor_t *x = *(const tdm_gguf_tensor_t *const *)a;
    const tdm_gguf_tensor_t *y = *(const tdm_gguf_tensor_t *const *)b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    return x->info_offset < y->info_offset ? -1 : x->info_offset > y->info_offset ? 1 : 0;
}

static void set_kv_ctx(gguf_parser_t *p, uint64_t i, const tdm_gguf_kv_t *kv)
{
    char name[GGUF_NAME_SHOW + 4];
    snprintf(p->ctx, sizeof(p->ctx), "kv #%" PRIu64 " '%s' at byte %" PRIu64, i,
             show_str(kv->key, name, sizeof(name)), kv->file_offset);
}

static void set_tensor_ctx(gguf_parser_t *p, const tdm_gguf_tensor_t *t)
{
    char name[GGUF_NAME_SHOW + 4];
    snprintf(p->ctx, sizeof(p->ctx), "tensor '%s' (info at byte %" PRIu64 ")",
             show_str(t->name, name, sizeof(name)), t->info_offset);
}

/* Parses kv #i at the current position into g->kvs[i]. */
static tdm_status_t parse_kv(gguf_parser_t *p, tdm_gguf_t *g, uint64_t i)
{
    tdm_gguf_kv_t *kv = &g->kvs[i];
    tdm_status_t s;
    kv->file_offset = p->pos;
    snprintf(p->ctx, sizeof(p->ctx), "kv #%" PRIu64 " at byte %" PRIu64, i, kv->file_offset);
    if ((s = read_str(p, "key", &kv->key)) != TDM_OK)
        return s;
    if (kv->key.len == 0)
        return fail(p, TDM_ERR_FORMAT, "empty key");
    set_kv_ctx(p, i, kv);

    uint64_t type_at = p->pos;
    uint32_t type;
    if ((s = read_u32(p, "value type", &type)) != TDM_OK)
        return s;
    if (type > TDM_GGUF_TYPE_FLOAT64)
        return fail(p, TDM_ERR_FORMAT, "unknown value type %" PRIu32 " at byte %" PRIu64, type,
                    type_at);
    kv->type = (tdm_gguf_type_t)type;

    if (type == TDM_GGUF_TYPE_STRING) {
        kv->data = p->base + p->pos; /* the string's length field */
        if ((s = read_str(p, "string", &g->kv_strs[i])) != TDM_OK)
            return s;
        kv->strs = &g->kv_strs[i];
        return TDM_OK;
    }
    if (type != TDM_GGUF_TYPE_ARRAY) {
        uint64_t size = tdm_gguf_type_size(type);
        if ((s = need(p, size, gguf_type_name(type))) != TDM_OK)
            return s;
        if (type == TDM_GGUF_TYPE_BOOL && (s = check_bools(p, 1)) != TDM_OK)
            return s;
        kv->data = p->base + p->pos;
        p->pos += size;
        return TDM_OK;
    }

    uint32_t elem;
    uint64_t elem_at = p->pos;
    if ((s = read_u32(p, "array element type", &elem)) != TDM_OK)
        return s;
    if (elem == TDM_GGUF_TYPE_ARRAY)
        return fail(p, TDM_ERR_FORMAT, "array of arrays (element type at byte %" PRIu64 ")",
                    elem_at);
    if (elem > TDM_GGUF_TYPE_FLOAT64)
        return fail(p, TDM_ERR_FORMAT, "unknown array element type %" PRIu32 " at byte %" PRIu64,
                    elem, elem_at);
    kv->arr_type = (tdm_gguf_type_t)elem;
    uint64_t n_at = p->pos;
    if ((s = read_u64(p, "array length", &kv->arr_len)) != TDM_OK)
        return s;
    uint64_t n = kv->arr_len;
    kv->data = p->base + p->pos;

    if (elem == TDM_GGUF_TYPE_STRING) {
        /* Each string takes at least its 8-byte length: bound n before the
         * index is allocated. */
        if (n > left(p) / 8)
            return fail(p, TDM_ERR_FORMAT,
                        "array of %" PRIu64 " strings (length at byte %" PRIu64
                        ") needs at least %" PRIu64 " bytes per string, only %" PRIu64
                        " bytes left",
                        n, n_at, (uint64_t)8, left(p));
        if (n > 0) {
            tdm_str_t *strs = calloc((size_t)n, sizeof(*strs));
            if (strs == NULL)
                return fail(p, TDM_ERR_NOMEM, "out of memory for %" PRIu64 " strings", n);
            kv->strs = strs;
            for (uint64_t j = 0; j < n; j++) {
                char what[48];
                snprintf(what, sizeof(what), "string #%" PRIu64, j);
                if ((s = read_str(p, what, &strs[j])) != TDM_OK)
                    return s;
            }
        }
        return TDM_OK;
    }

    uint64_t size = tdm_gguf_type_size(elem);
    if (n > left(p) / size)
        return fail(p, TDM_ERR_FORMAT,
                    "array of %" PRIu64 " %s (length at byte %" PRIu64 ") needs %" PRIu64
                    " bytes each, only %" PRIu64 " bytes left",
                    n, gguf_type_name(elem), n_at, size, left(p));
    if (elem == TDM_GGUF_TYPE_BOOL && (s = check_bools(p, n)) != TDM_OK)
        return s;
    p->pos += n * size;
    return TDM_OK;
}

/* Finds general.alignment among the parsed kvs and checks it. */
static tdm_status_t parse_alignment(gguf_parser_t *p, tdm_gguf_t *g)
{
    g->alignment = TDM_GGUF_DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const tdm_gguf_kv_t *kv = &g->kvs[i];
        if (str_cmp(kv->key, (tdm_str_t){"general.alignment", 17}) != 0)
            continue;
        set_kv_ctx(p, i, kv);
        uint64_t a;
        if (kv->type == TDM_GGUF_TYPE_UINT32)
            a = load_le(kv->data, 4);
        else if (kv->type == TDM_GGUF_TYPE_UINT64)
            a = load_le(kv->data, 8);
        else
            return fail(p, TDM_ERR_FORMAT, "alignment has type %s, expected u32",
                        gguf_type_name(kv->type));
        if (a == 0 || (a & (a - 1)) != 0)
            return fail(p, TDM_ERR_FORMAT, "alignment %" PRIu64 " is not a nonzero power of two",
                        a);
        g->alignment = a;
    }
    p->ctx[0] = '\0';
    return TDM_OK;
}

/* Parses tensor info #i at the current position into g->tensors[i]. */
static tdm_status_t parse_tensor_info(gguf_parser_t *p, tdm_gguf_t *g, uint64_t i,
                                      bool allow_any_type)
{
    tdm_gguf_tensor_t *t = &g->tensors[i];
    tdm_status_t s;
    t->info_offset = p->pos;
    snprintf(p->ctx, sizeof(p->ctx), "tensor #%" PRIu64 " (info at byte %" PRIu64 ")", i,
             t->info_offset);
    if ((s = read_str(p, "name", &t->name)) != TDM_OK)
        return s;
    if (t->name.len == 0)
        return fail(p, TDM_ERR_FORMAT, "empty name");
    set_tensor_ctx(p, t);

    uint64_t at = p->pos;
    if ((s = read_u32(p, "n_dims", &t->n_dims)) != TDM_OK)
        return s;
    if (t->n_dims == 0 || t->n_dims > TDM_GGUF_MAX_DIMS)
        return fail(p, TDM_ERR_FORMAT, "n_dims %" PRIu32 " at byte %" PRIu64 " is not in 1..%d",
                    t->n_dims, at, TDM_GGUF_MAX_DIMS);
    uint64_t n_elems = 1;
    for (uint32_t d = 0; d < TDM_GGUF_MAX_DIMS; d++)
        t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        at = p->pos;
        if ((s = read_u64(p, "dim", &t->ne[d])) != TDM_OK)
            return s;
        if (t->ne[d] == 0)
            return fail(p, TDM_ERR_FORMAT, "ne[%" PRIu32 "] at byte %" PRIu64 " is 0", d, at);
        if (t->ne[d] > (uint64_t)INT64_MAX / n_elems)
            return fail(p, TDM_ERR_FORMAT,
                        "ne[%" PRIu32 "] = %" PRIu64 " at byte %" PRIu64
                        " makes the element count overflow 63 bits",
                        d, t->ne[d], at);
        n_elems *= t->ne[d];
    }

    at = p->pos;
    if ((s = read_u32(p, "type", &t->type)) != TDM_OK)
        return s;
    if (t->type >= TDM_DTYPE_COUNT_)
        return fail(p, TDM_ERR_FORMAT, "type id %" PRIu32 " at byte %" PRIu64 " is not a GGML type",
                    t->type, at);
    if (tdm_dtype_supported(t->type)) {
        uint64_t row = tdm_dtype_row_bytes(t->type, t->ne[0]);
        if (row == 0)
            return fail(p, TDM_ERR_FORMAT,
                        "row length ne[0] = %" PRIu64 " is not a multiple of the %s block "
                        "size %zu (type at byte %" PRIu64 ")",
                        t->ne[0], tdm_dtype_name(t->type), tdm_dtype_block_elems(t->type), at);
        uint64_t rows = n_elems / t->ne[0];
        if (rows > UINT64_MAX / row || rows * row > (uint64_t)INT64_MAX)
            return fail(p, TDM_ERR_FORMAT, "data size overflows 63 bits (type at byte %" PRIu64 ")",
                        at);
        t->nbytes = rows * row;
    } else if (!allow_any_type) {
        char name[GGUF_NAME_SHOW + 4];
        return fail_plain(p, TDM_ERR_UNSUPPORTED,
                          "tensor '%s' (type at byte %" PRIu64
                          ") has type %s, which tandem does not support (supported: %s)",
                          show_str(t->name, name, sizeof(name)), at, tdm_dtype_name(t->type),
                          tdm_dtype_supported_list());
    } else {
        t->nbytes = 0; /* size unknown to tandem; data stays NULL */
    }

    at = p->pos;
    if ((s = read_u64(p, "data offset", &t->offset)) != TDM_OK)
        return s;
    if (t->offset % g->alignment != 0)
        return fail(p, TDM_ERR_FORMAT,
                    "data offset %" PRIu64 " at byte %" PRIu64
                    " is not a multiple of the alignment %" PRIu64,
                    t->offset, at, g->alignment);
    return TDM_OK;
}

/* Places every tensor's data in the file and checks that none runs past
 * the end or overlaps another. */
static tdm_status_t check_tensor_data(gguf_parser_t *p, tdm_gguf_t *g)
{
    uint64_t avail = p->size - g->data_offset;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        tdm_gguf_tensor_t *t = &g->tensors[i];
        if (t->offset > avail || t->nbytes > avail - t->offset) {
            set_tensor_ctx(p, t);
            return fail(p, TDM_ERR_FORMAT,
                        "data offset %" PRIu64 " + %" PRIu64
                        " bytes runs past the end of the file (%" PRIu64
                        " bytes, data section at byte %" PRIu64 ")",
                        t->offset, t->nbytes, p->size, g->data_offset);
        }
        if (t->nbytes > 0)
            t->data = p->base + g->data_offset + t->offset;
    }
    if (g->n_tensors < 2)
        return TDM_OK;

    const tdm_gguf_tensor_t **by_off = calloc((size_t)g->n_tensors, sizeof(*by_off));
    if (by_off == NULL)
        return fail_plain(p, TDM_ERR_NOMEM, "out of memory sorting %" PRIu64 " tensors",
                          g->n_tensors);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        by_off[i] = &g->tensors[i];
    qsort(by_off, (size_t)g->n_tensors, sizeof(*by_off), tensor_offset_cmp);
    /* Tensors of unknown size (nbytes 0) are skipped: they cannot be checked. */
    const tdm_gguf_tensor_t *prev = NULL;
    tdm_status_t s = TDM_OK;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const tdm_gguf_tensor_t *t = by_off[i];
        if (t->nbytes == 0)
            continue;
        if (prev != NULL && prev->offset + prev->nbytes > t->offset) {
            char name[GGUF_NAME_SHOW + 4];
            set_tensor_ctx(p, t);
            s = fail(p, TDM_ERR_FORMAT,
                     "data at offset %" PRIu64 " overlaps tensor '%s' (info at byte %" PRIu64
                     "), whose %" PRIu64 " bytes start at offset %" PRIu64,
                     t->offset, show_str(prev->name, name, sizeof(name)), prev->info_offset,
                     prev->nbytes, prev->offset);
            break;
        }
        prev = t;
    }
    free(by_off);
    return s;
}

/* Builds the sorted indexes and refuses duplicate keys and names. */
static tdm_status_t build_indexes(gguf_parser_t *p, tdm_gguf_t *g)
{
    char name[GGUF_NAME_SHOW + 4];
    if (g->n_kv > 0) {
        g->kv_sorted = calloc((size_t)g->n_kv, sizeof(*g->kv_sorted));
        if (g->kv_sorted == NULL)
            return fail_plain(p, TDM_ERR_NOMEM, "out of memory indexing %" PRIu64 " kvs", g->n_kv);
        for (uint64_t i = 0; i < g->n_kv; i++)
            g->kv_sorted[i] = &g->kvs[i];
        qsort(g->kv_sorted, (size_t)g->n_kv, sizeof(*g->kv_sorted), kv_ptr_cmp);
        for (uint64_t i = 1; i < g->n_kv; i++) {
            const tdm_gguf_kv_t *a = g->kv_sorted[i - 1], *b = g->kv_sorted[i];
            if (str_cmp(a->key, b->key) == 0) {
                set_kv_ctx(p, (uint64_t)(b - g->kvs), b);
                return fail(p, TDM_ERR_FORMAT, "duplicate key (first at byte %" PRIu64 ")",
                            a->file_offset);
            }
        }
    }
    if (g->n_tensors > 0) {
        g->tensor_sorted = calloc((size_t)g->n_tensors, sizeof(*g->tensor_sorted));
        if (g->tensor_sorted == NULL)
            return fail_plain(p, TDM_ERR_NOMEM, "out of memory indexing %" PRIu64 " tensors",
                              g->n_tensors);
        for (uint64_t i = 0; i < g->n_tensors; i++)
            g->tensor_sorted[i] = &g->tensors[i];
        qsort(g->tensor_sorted, (size_t)g->n_tensors, sizeof(*g->tensor_sorted), tensor_name_cmp);
        for (uint64_t i = 1; i < g->n_tensors; i++) {
            const tdm_gguf_tensor_t *a = g->tensor_sorted[i - 1], *b = g->tensor_sorted[i];
            if (str_cmp(a->name, b->name) == 0)
                return fail_plain(p, TDM_ERR_FORMAT,
                                  "tensor '%s' (info at byte %" PRIu64
                                  "): duplicate name (first at byte %" PRIu64 ")",
                                  show_str(b->name, name, sizeof(name)), b->info_offset,
                                  a->info_offset);
        }
    }
    return TDM_OK;
}

static tdm_status_t parse(gguf_parser_t *p, tdm_gguf_t *g, bool allow_any_type)
{
    tdm_status_t s;
    uint32_t magic;
    if ((s = read_u32(p, "magic", &magic)) != TDM_OK)
        return s;
    if (magic != GGUF_MAGIC)
        return fail(p, TDM_ERR_FORMAT,
                    "bad magic 0x%08" PRIx32 " at byte 0 (not a GGUF file; expected \"GGUF\")",
                    magic);
    if ((s = read_u32(p, "version", &g->version)) != TDM_OK)
        return s;
    if (g->version != GGUF_VERSION) {
        if ((g->version & 0xffff) == 0 && g->version != 0)
            return fail(p, TDM_ERR_FORMAT,
                        "version 0x%08" PRIx32 " at byte 4 looks big-endian; only "
                        "little-endian GGUF v3 is read",
                        g->version);
        return fail(p, TDM_ERR_FORMAT, "version %" PRIu32 " at byte 4 is not supported (only 3)",
                    g->version);
    }
    if ((s = read_u64(p, "tensor count", &g->n_tensors)) != TDM_OK)
        return s;
    if ((s = read_u64(p, "kv count", &g->n_kv)) != TDM_OK)
        return s;
    /* Bound both counts by what the rest of the file can hold before
     * allocating anything for them. */
    if (g->n_kv > left(p) / GGUF_MIN_KV_BYTES)
        return fail(p, TDM_ERR_FORMAT,
                    "kv count %" PRIu64 " at byte 16 cannot fit in the %" PRIu64
                    " bytes left (each kv takes at least %u bytes)",
                    g->n_kv, left(p), GGUF_MIN_KV_BYTES);
    if (g->n_tensors > (left(p) - g->n_kv * GGUF_MIN_KV_BYTES) / GGUF_MIN_TENSOR_BYTES)
        return fail(p, TDM_ERR_FORMAT,
                    "tensor count %" PRIu64 " at byte 8 cannot fit in the %" PRIu64
                    " bytes left (each tensor info takes at least %u bytes)",
                    g->n_tensors, left(p), GGUF_MIN_TENSOR_BYTES);

    if (g->n_kv > 0) {
        g->kvs = calloc((size_t)g->n_kv, sizeof(*g->kvs));
        g->kv_strs = calloc((size_t)g->n_kv, sizeof(*g->kv_strs));
        if (g->kvs == NULL || g->kv_strs == NULL)
            return fail_plain(p, TDM_ERR_NOMEM, "out of memory for %" PRIu64 " kvs", g->n_kv);
    }
    for (uint64_t i = 0; i < g->n_kv; i++)
        if ((s = parse_kv(p, g, i)) != TDM_OK)
            return s;
    p->ctx[0] = '\0';
    if ((s = parse_alignment(p, g)) != TDM_OK)
        return s;

    if (g->n_tensors > left(p) / GGUF_MIN_TENSOR_BYTES)
        return fail(p, TDM_ERR_FORMAT,
                    "tensor count %" PRIu64 " at byte 8 cannot fit in the %" PRIu64
                    " bytes left after the kvs (at byte %" PRIu64 ")",
                    g->n_tensors, left(p), p->pos);
    if (g->n_tensors > 0) {
        g->tensors = calloc((size_t)g->n_tensors, sizeof(*g->tensors));
        if (g->tensors == NULL)
            return fail_plain(p, TDM_ERR_NOMEM, "out of memory for %" PRIu64 " tensors",
                              g->n_tensors);
    }
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if ((s = parse_tensor_info(p, g, i, allow_any_type)) != TDM_OK)
            return s;
    p->ctx[0] = '\0';

    /* The data section starts at the next multiple of the alignment. */
    uint64_t pad = (g->alignment - p->pos % g->alignment) % g->alignment;
    if (pad > UINT64_MAX - p->pos)
        return fail(p, TDM_ERR_FORMAT,
                    "data section offset overflows (tensor infos end at byte %" PRIu64 ")", p->pos);
    g->data_offset = p->pos + pad;
    if (g->n_tensors > 0 && g->data_offset > p->size)
        return fail(p, TDM_ERR_FORMAT,
                    "data section would start at byte %" PRIu64
                    " (tensor infos end at byte %" PRIu64 ", alignment %" PRIu64
                    "), past the end of the file (%" PRIu64 " bytes)",
                    g->data_offset, p->pos, g->alignment, p->size);
    if (g->data_offset > p->size)
        g->data_offset = p->size; /* no tensors: an unpadded end is harmless */

    if ((s = check_tensor_data(p, g)) != TDM_OK)
        return s;
    return build_indexes(p, g);
}

static tdm_status_t open_buffer(const void *buf, size_t len, int mapped, bool allow_any_type,
                                char *err, size_t err_len, tdm_gguf_t **out)
{
    tdm_gguf_t *g = calloc(1, sizeof(*g));
    gguf_parser_t p = {.base = buf, .size = len, .err = err, .err_len = err_len};
    if (g == NULL)
        return fail_plain(&p, TDM_ERR_NOMEM, "out of memory");
    g->base = buf;
    g->size = len;
    g->n_shards = 1;
    tdm_status_t s = parse(&p, g, allow_any_type);
    if (s != TDM_OK) {
        tdm_gguf_close(g); /* g->mapped is 0: the caller unmaps */
        return s;
    }
    g->mapped = mapped;
    *out = g;
    return TDM_OK;
}

tdm_status_t tdm_gguf_open_memory(const void *buf, size_t len, bool allow_any_type, char *err,
                                  size_t err_len, tdm_gguf_t **out)
{
    if (buf == NULL && len > 0) {
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "NULL buffer of %zu bytes", len);
        return TDM_ERR_INVALID;
    }
    return open_buffer(buf, len, 0, allow_any_type, err, err_len, out);
}

/* Maps and parses one file. *sys_errno gets the errno of a failed open
 * (0 otherwise), so a missing shard can be told from a broken one. */
static tdm_status_t open_file(const char *path, bool allow_any_type, char *err, size_t err_len,
                              tdm_gguf_t **out, int *sys_errno)
{
    gguf_parser_t p = {.err = err, .err_len = err_len};
    *sys_errno = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *sys_errno = errno;
        return fail_plain(&p, TDM_ERR_IO, "cannot open '%s': %s", path, strerror(*sys_errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return fail_plain(&p, TDM_ERR_IO, "cannot stat '%s': %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return fail_plain(&p, TDM_ERR_IO, "'%s' is not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    void *map = NULL;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            return fail_plain(&p, TDM_ERR_IO, "cannot map '%s' (%zu bytes): %s", path, size,
                              strerror(e));
        }
    }
    close(fd); /* the map keeps the file */

    tdm_gguf_t *g;
    tdm_status_t s = open_buffer(map, size, map != NULL, allow_any_type, err, err_len, &g);
    if (s != TDM_OK) {
        if (map != NULL)
            munmap(map, size);
        return s;
    }
    *out = g;
    return TDM_OK;
}

/* ---- split models (llama.cpp's gguf-split convention) ---- */

#define SPLIT_SUFFIX_LEN 20 /* "-00001-of-00003.gguf" */
#define SPLIT_MAX_COUNT  99999u

/* Reads a run of 5 decimal digits; -1 if any is not a digit. */
static long digits5(const char *s)
{
    long v = 0;
    for (int i = 0; i < 5; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* Matches a shard name "PREFIX-00002-of-00003.gguf" (PREFIX not empty):
 * sets *no (1-based), *count and *stem (bytes of path before the suffix). */
static bool split_name(const char *path, uint32_t *no, uint32_t *count, size_t *stem)
{
    size_t len = strlen(path);
    if (len <= SPLIT_SUFFIX_LEN)
        return false;
    const char *suf = path + len - SPLIT_SUFFIX_LEN;
    if (suf[-1] == '/' || suf[0] != '-' || memcmp(suf + 6, "-of-", 4) != 0 ||
        memcmp(suf + 15, ".gguf", 5) != 0)
        return false;
    long n = digits5(suf + 1), c = digits5(suf + 10);
    if (n < 1 || c < 1 || n > c)
        return false;
    *no = (uint32_t)n;
    *count = (uint32_t)c;
    *stem = len - SPLIT_SUFFIX_LEN;
    return true;
}

/* The path of shard no (1-based) of count: malloc'd, NULL without memory. */
static char *shard_path(const char *path, size_t stem, uint32_t no, uint32_t count)
{
    char *p = malloc(stem + SPLIT_SUFFIX_LEN + 1);
    if (p == NULL)
        return NULL;
    memcpy(p, path, stem);
    snprintf(p + stem, SPLIT_SUFFIX_LEN + 1, "-%05" PRIu32 "-of-%05" PRIu32 ".gguf", no, count);
    return p;
}

/* Reads split key `key` of g: 0 when absent, 1 when read, -1 when present
 * but not a non-negative integer. */
static int split_key(const tdm_gguf_t *g, const char *key, uint64_t *out)
{
    if (tdm_gguf_find_kv(g, key) == NULL)
        return 0;
    return tdm_gguf_get_u64(g, key, out) ? 1 : -1;
}

/* Checks that key of shard `at` (path `sp`) is an integer; *v gets it. */
static tdm_status_t need_split_key(gguf_parser_t *p, const tdm_gguf_t *g, const char *key,
                                   uint32_t no, uint32_t count, const char *sp, uint64_t *v)
{
    int r = split_key(g, key, v);
    if (r == 1)
        return TDM_OK;
    if (r == 0)
        return fail_plain(p, TDM_ERR_FORMAT,
                          "shard %" PRIu32 " of %" PRIu32 " '%s' has no %s key (not a shard of "
                          "this split model?)",
                          no, count, sp, key);
    return fail_plain(p, TDM_ERR_FORMAT,
                      "shard %" PRIu32 " of %" PRIu32 " '%s': %s is not a non-negative integer", no,
                      count, sp, key);
}

/* Builds the handle of a split model over its opened shards (taking them
 * over): the kvs of the first, the tensor tables concatenated in shard
 * order, and the concatenated headers for fingerprints. */
static tdm_status_t join_shards(gguf_parser_t *p, tdm_gguf_t **shards, uint32_t count,
                                char *const *paths, tdm_gguf_t **out)
{
    tdm_gguf_t *g = calloc(1, sizeof(*g));
    if (g == NULL) {
        for (uint32_t k = 0; k < count; k++)
            tdm_gguf_close(shards[k]);
        free(shards);
        return fail_plain(p, TDM_ERR_NOMEM, "out of memory");
    }
    const tdm_gguf_t *first = shards[0];
    g->n_shards = count;
    g->shards = shards;
    g->version = first->version;
    g->alignment = first->alignment;
    g->n_kv = first->n_kv;
    g->kvs = first->kvs;
    g->kv_strs = first->kv_strs;
    g->kv_sorted = first->kv_sorted;
    uint64_t meta_len = 0;
    for (uint32_t k = 0; k < count; k++) {
        g->n_tensors += shards[k]->n_tensors;
        meta_len += shards[k]->data_offset;
    }
    g->meta = malloc(meta_len > 0 ? (size_t)meta_len : 1);
    if (g->n_tensors > 0) {
        g->tensors = calloc((size_t)g->n_tensors, sizeof(*g->tensors));
        g->tensor_sorted = calloc((size_t)g->n_tensors, sizeof(*g->tensor_sorted));
    }
    if (g->meta == NULL || (g->n_tensors > 0 && (g->tensors == NULL || g->tensor_sorted == NULL))) {
        tdm_gguf_close(g);
        return fail_plain(p, TDM_ERR_NOMEM, "out of memory joining %" PRIu32 " shards", count);
    }
    uint64_t at = 0, i = 0;
    for (uint32_t k = 0; k < count; k++) {
        const tdm_gguf_t *sh = shards[k];
        if (sh->data_offset > 0)
            memcpy(g->meta + at, sh->base, (size_t)sh->data_offset);
        at += sh->data_offset;
        for (uint64_t j = 0; j < sh->n_tensors; j++, i++) {
            g->tensors[i] = sh->tensors[j];
            g->tensors[i].shard = k;
        }
    }
    g->base = g->meta;
    g->size = meta_len;
    g->data_offset = meta_len;

    for (i = 0; i < g->n_tensors; i++)
        g->tensor_sorted[i] = &g->tensors[i];
    if (g->n_tensors > 0)
        qsort(g->tensor_sorted, (size_t)g->n_tensors, sizeof(*g->tensor_sorted), tensor_name_cmp);
    for (i = 1; i < g->n_tensors; i++) {
        const tdm_gguf_tensor_t *a = g->tensor_sorted[i - 1], *b = g->tensor_sorted[i];
        if (str_cmp(a->name, b->name) != 0)
            continue;
        char name[GGUF_NAME_SHOW + 4];
        tdm_status_t s =
            fail_plain(p, TDM_ERR_FORMAT,
                       "shard %" PRIu32 " of %" PRIu32 " '%s': tensor '%s' (info at byte %" PRIu64
                       ") is also in shard %" PRIu32 " '%s' (info at byte %" PRIu64
                       "): the shards are of different models",
                       b->shard + 1, count, paths[b->shard], show_str(b->name, name, sizeof(name)),
                       b->info_offset, a->shard + 1, paths[a->shard], a->info_offset);
        tdm_gguf_close(g);
        return s;
    }
    *out = g;
    return TDM_OK;
}

/* Opens the shards 2..count beside the first (already open as first) and
 * joins them. Takes over first. */
static tdm_status_t open_split(gguf_parser_t *p, const char *path, size_t stem, tdm_gguf_t *first,
                               uint32_t count, uint64_t total, bool allow_any_type,
                               tdm_gguf_t **out)
{
    tdm_status_t s = TDM_OK;
    tdm_gguf_t **shards = calloc(count, sizeof(*shards));
    char **paths = calloc(count, sizeof(*paths));
    if (shards == NULL || paths == NULL) {
        s = fail_plain(p, TDM_ERR_NOMEM, "out of memory for %" PRIu32 " shards", count);
        tdm_gguf_close(first);
        goto out_free;
    }
    shards[0] = first;
    uint64_t sum = first->n_tensors;
    /* tandem's writer marks every shard of one model with the same id */
    uint64_t id = 0, kid = 0;
    const int has_id = split_key(first, "split.tandem_id", &id) == 1;
    for (uint32_t k = 0; k < count && s == TDM_OK; k++) {
        paths[k] = shard_path(path, stem, k + 1, count);
        if (paths[k] == NULL)
            s = fail_plain(p, TDM_ERR_NOMEM, "out of memory");
    }
    for (uint32_t k = 1; k < count && s == TDM_OK; k++) {
        const char *sp = paths[k];
        char msg[1024];
        int e;
        s = open_file(sp, allow_any_type, msg, sizeof(msg), &shards[k], &e);
        if (s != TDM_OK) {
            if (s == TDM_ERR_IO && e == ENOENT)
                fail_plain(p, s, "shard %" PRIu32 " of %" PRIu32 " '%s' is missing: %s", k + 1,
                           count, sp, strerror(e));
            else
                fail_plain(p, s, "shard %" PRIu32 " of %" PRIu32 " '%s': %s", k + 1, count, sp,
                           msg);
            break;
        }
        uint64_t no, cnt, tot;
        if ((s = need_split_key(p, shards[k], "split.no", k + 1, count, sp, &no)) != TDM_OK ||
            (s = need_split_key(p, shards[k], "split.count", k + 1, count, sp, &cnt)) != TDM_OK ||
            (s = need_split_key(p, shards[k], "split.tensors.count", k + 1, count, sp, &tot)) !=
                TDM_OK)
            break;
        if (cnt != count)
            s = fail_plain(p, TDM_ERR_FORMAT,
                           "shard %" PRIu32 " of %" PRIu32 " '%s': split.count is %" PRIu64
                           ", expected %" PRIu32 " (a shard of another split?)",
                           k + 1, count, sp, cnt, count);
        else if (no != k)
            s = fail_plain(p, TDM_ERR_FORMAT,
                           "shard %" PRIu32 " of %" PRIu32 " '%s': split.no is %" PRIu64
                           ", expected %" PRIu32 " (split.no counts from 0)",
                           k + 1, count, sp, no, k);
        else if (tot != total)
            s = fail_plain(p, TDM_ERR_FORMAT,
                           "shard %" PRIu32 " of %" PRIu32 " '%s': split.tensors.count is %" PRIu64
                           " but the first shard '%s' says %" PRIu64 " (a shard of another model?)",
                           k + 1, count, sp, tot, paths[0], total);
        else if (has_id && (split_key(shards[k], "split.tandem_id", &kid) != 1 || kid != id))
            s = fail_plain(p, TDM_ERR_FORMAT,
                           "shard %" PRIu32 " of %" PRIu32 " '%s' is a shard of another model: "
                           "its split.tandem_id differs from the first shard's '%s'",
                           k + 1, count, sp, paths[0]);
        sum += shards[k]->n_tensors;
    }
    if (s == TDM_OK && sum != total)
        s = fail_plain(p, TDM_ERR_FORMAT,
                       "shard 1 of %" PRIu32 " '%s': split.tensors.count is %" PRIu64
                       " but the %" PRIu32 " shards hold %" PRIu64
                       " tensors (a shard of another model?)",
                       count, paths[0], total, count, sum);
    if (s != TDM_OK) {
        for (uint32_t k = 0; k < count; k++)
            tdm_gguf_close(shards[k]);
        free(shards);
    } else {
        s = join_shards(p, shards, count, paths, out); /* takes the shards */
    }
out_free:
    for (uint32_t k = 0; k < count && paths != NULL; k++)
        free(paths[k]);
    free(paths);
    return s;
}

tdm_status_t tdm_gguf_open(const char *path, bool allow_any_type, char *err, size_t err_len,
                           tdm_gguf_t **out)
{
    gguf_parser_t p = {.err = err, .err_len = err_len};
    uint32_t name_no = 0, name_count = 0;
    size_t stem = 0;
    bool named = split_name(path, &name_no, &name_count, &stem) && name_count > 1;

    char msg[1024];
    int e;
    tdm_gguf_t *g;
    tdm_status_t s = open_file(path, allow_any_type, msg, sizeof(msg), &g, &e);
    if (s != TDM_OK) {
        if (named && s != TDM_ERR_IO) /* messages of I/O errors name the file already */
            fail_plain(&p, s, "shard %" PRIu32 " of %" PRIu32 " '%s': %s", name_no, name_count,
                       path, msg);
        else if (err != NULL && err_len > 0)
            snprintf(err, err_len, "%s", msg);
        return s;
    }

    uint64_t count = 0, no = 0, total = 0;
    int has_count = split_key(g, "split.count", &count);
    int has_no = split_key(g, "split.no", &no);
    int has_total = split_key(g, "split.tensors.count", &total);
    if (has_count < 0 || has_no < 0 || has_total < 0) {
        s = fail_plain(&p, TDM_ERR_FORMAT, "'%s': split.%s is not a non-negative integer", path,
                       has_count < 0 ? "count"
                       : has_no < 0  ? "no"
                                     : "tensors.count");
        goto err_close;
    }
    if (has_count == 0 || count <= 1) {
        if (named) {
            s = fail_plain(&p, TDM_ERR_FORMAT,
                           "'%s' is named as shard %" PRIu32 " of %" PRIu32 " but %s", path,
                           name_no, name_count,
                           has_count ? "its split.count is 1" : "has no split.count key");
            goto err_close;
        }
        *out = g; /* one file */
        return TDM_OK;
    }
    if (count > SPLIT_MAX_COUNT) {
        s = fail_plain(&p, TDM_ERR_FORMAT, "'%s': split.count %" PRIu64 " is over %u", path, count,
                       SPLIT_MAX_COUNT);
        goto err_close;
    }
    if (has_no == 0 || has_total == 0) {
        s = fail_plain(&p, TDM_ERR_FORMAT, "'%s': split.count is %" PRIu64 " but %s is missing",
                       path, count, has_no == 0 ? "split.no" : "split.tensors.count");
        goto err_close;
    }
    if (no >= count) {
        s = fail_plain(&p, TDM_ERR_FORMAT,
                       "'%s': split.no %" PRIu64 " is not below split.count %" PRIu64, path, no,
                       count);
        goto err_close;
    }
    if (named && (name_count != count || name_no != no + 1)) {
        s = fail_plain(&p, TDM_ERR_FORMAT,
                       "'%s' is named as shard %" PRIu32 " of %" PRIu32
                       " but its split.no is %" PRIu64 " and split.count %" PRIu64
                       " (shard %" PRIu64 " of %" PRIu64 ")",
                       path, name_no, name_count, no, count, no + 1, count);
        goto err_close;
    }
    if (no != 0) {
        if (named)
            s = fail_plain(&p, TDM_ERR_FORMAT,
                           "'%s' is shard %" PRIu64 " of %" PRIu64
                           " of a split model: open the first shard '%.*s-00001-of-%05" PRIu64
                           ".gguf' instead",
                           path, no + 1, count, (int)stem, path, count);
        else
            s = fail_plain(&p, TDM_ERR_FORMAT,
                           "'%s' is shard %" PRIu64 " of %" PRIu64
                           " of a split model (split.no = %" PRIu64 "): open the first shard",
                           path, no + 1, count, no);
        goto err_close;
    }
    if (!named) {
        s = fail_plain(&p, TDM_ERR_FORMAT,
                       "'%s' is shard 1 of %" PRIu64
                       " of a split model, but its name does not end in -00001-of-%05" PRIu64
                       ".gguf, so the other shards cannot be found",
                       path, count, count);
        goto err_close;
    }
    return open_split(&p, path, stem, g, (uint32_t)count, total, allow_any_type, out);

err_close:
    tdm_gguf_close(g);
    return s;
}

void tdm_gguf_close(tdm_gguf_t *g)
{
    if (g == NULL)
        return;
    if (g->shards != NULL) { /* split: the kvs belong to shards[0] */
        free(g->tensors);
        free(g->tensor_sorted);
        free(g->meta);
        for (uint32_t k = 0; k < g->n_shards; k++)
            tdm_gguf_close(g->shards[k]);
        free(g->shards);
        free(g);
        return;
    }
    for (uint64_t i = 0; i < g->n_kv && g->kvs != NULL; i++)
        if (g->kvs[i].type == TDM_GGUF_TYPE_ARRAY && g->kvs[i].arr_type == TDM_GGUF_TYPE_STRING)
            free((void *)g->kvs[i].strs);
    free(g->kvs);
    free(g->kv_strs);
    free(g->kv_sorted);
    free(g->tensors);
    free(g->tensor_sorted);
    if (g->mapped)
        munmap((void *)g->base, (size_t)g->size);
    free(g);
}

void tdm_gguf_release_data(const tdm_gguf_t *g, const tdm_gguf_tensor_t *t)
{
    const tdm_gguf_t *owner = g->shards != NULL && t->shard < g->n_shards ? g->shards[t->shard] : g;
    if (!owner->mapped || t->data == NULL || t->nbytes == 0)
        return;
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)t->data + page - 1) & ~(page - 1);
    uintptr_t hi = ((uintptr_t)t->data + (uintptr_t)t->nbytes) & ~(page - 1);
    if (hi > lo)
        (void)madvise((void *)lo, hi - lo, MADV_DONTNEED); /* a hint: pages come back on a read */
}

uint32_t tdm_gguf_version(const tdm_gguf_t *g)
{
    return g->version;
}

uint64_t tdm_gguf_n_kv(const tdm_gguf_t *g)
{
    return g->n_kv;
}

const tdm_gguf_kv_t *tdm_gguf_kv(const tdm_gguf_t *g, uint64_t i)
{
    return i < g->n_kv ? &g->kvs[i] : NULL;
}

const tdm_gguf_kv_t *tdm_gguf_find_kv(const tdm_gguf_t *g, const char *key)
{
    tdm_str_t k = {key, strlen(key)};
    uint64_t lo = 0, hi = g->n_kv;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int c = str_cmp(g->kv_sorted[mid]->key, k);
        if (c == 0)
            return g->kv_sorted[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

uint64_t tdm_gguf_n_tensors(const tdm_gguf_t *g)
{
    return g->n_tensors;
}

const tdm_gguf_tensor_t *tdm_gguf_tensor(const tdm_gguf_t *g, uint64_t i)
{
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const tdm_gguf_tensor_t *tdm_gguf_find_tensor(const tdm_gguf_t *g, const char *name)
{
    tdm_str_t k = {name, strlen(name)};
    uint64_t lo = 0, hi = g->n_tensors;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int c = str_cmp(g->tensor_sorted[mid]->name, k);
        if (c == 0)
            return g->tensor_sorted[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const void *tdm_gguf_file_data(const tdm_gguf_t *g, size_t *len)
{
    if (len != NULL)
        *len = (size_t)g->size;
    return g->base;
}

uint64_t tdm_gguf_data_offset(const tdm_gguf_t *g)
{
    return g->data_offset;
}

uint32_t tdm_gguf_n_shards(const tdm_gguf_t *g)
{
    return g->n_shards;
}

const void *tdm_gguf_shard_data(const tdm_gguf_t *g, uint32_t i, size_t *len, uint64_t *data_offset)
{
    if (i >= g->n_shards)
        return NULL;
    const tdm_gguf_t *sh = g->shards != NULL ? g->shards[i] : g;
    if (len != NULL)
        *len = (size_t)sh->size;
    if (data_offset != NULL)
        *data_offset = sh->data_offset;
    return sh->base;
}

/* Reads one integer of an integer type as i64 (u64 values above INT64_MAX
 * and non-integer types fail). */
static bool load_int(tdm_gguf_type_t type, const void *data, int64_t *out)
{
    const uint8_t *p = data;
    switch (type) {
    case TDM_GGUF_TYPE_UINT8: *out = (int64_t)load_le(p, 1); return true;
    case TDM_GGUF_TYPE_UINT16: *out = (int64_t)load_le(p, 2); return true;
    case TDM_GGUF_TYPE_UINT32: *out = (int64_t)load_le(p, 4); return true;
    case TDM_GGUF_TYPE_INT8: *out = (int8_t)load_le(p, 1); return true;
    case TDM_GGUF_TYPE_INT16: *out = (int16_t)load_le(p, 2); return true;
    case TDM_GGUF_TYPE_INT32: *out = (int32_t)load_le(p, 4); return true;
    case TDM_GGUF_TYPE_INT64: *out = (int64_t)load_le(p, 8); return true;
    case TDM_GGUF_TYPE_UINT64: {
        uint64_t v = load_le(p, 8);
        if (v > (uint64_t)INT64_MAX)
            return false;
        *out = (int64_t)v;
        return true;
    }
    default: return false;
    }
}

static bool load_float(tdm_gguf_type_t type, const void *data, double *out)
{
    if (type == TDM_GGUF_TYPE_FLOAT32) {
        uint32_t b32 = (uint32_t)load_le(data, 4);
        float f;
        memcpy(&f, &b32, 4);
        *out = f;
        return true;
    }
    if (type == TDM_GGUF_TYPE_FLOAT64) {
        uint64_t bits = load_le(data, 8);
        double d;
        memcpy(&d, &bits, 8);
        *out = d;
        return true;
    }
    return false;
}

bool tdm_gguf_get_u64(const tdm_gguf_t *g, const char *key, uint64_t *out)
{
    const tdm_gguf_kv_t *kv = tdm_gguf_find_kv(g, key);
    if (kv == NULL)
        return false;
    if (kv->type == TDM_GGUF_TYPE_UINT64) {
        *out = load_le(kv->data, 8);
        return true;
    }
    int64_t v;
    if (!load_int(kv->type, kv->data, &v) || v < 0)
        return false;
    *out = (uint64_t)v;
    return true;
}

bool tdm_gguf_get_f32(const tdm_gguf_t *g, const char *key, float *out)
{
    const tdm_gguf_kv_t *kv = tdm_gguf_find_kv(g, key);
    double d;
    if (kv == NULL || !load_float(kv->type, kv->data, &d))
        return false;
    *out = (float)d;
    return true;
}

bool tdm_gguf_get_bool(const tdm_gguf_t *g, const char *key, bool *out)
{
    const tdm_gguf_kv_t *kv = tdm_gguf_find_kv(g, key);
    if (kv == NULL || kv->type != TDM_GGUF_TYPE_BOOL)
        return false;
    *out = *(const uint8_t *)kv->data != 0;
    return true;
}

bool tdm_gguf_get_str(const tdm_gguf_t *g, const char *key, tdm_str_t *out)
{
    const tdm_gguf_kv_t *kv = tdm_gguf_find_kv(g, key);
    if (kv == NULL || kv->type != TDM_GGUF_TYPE_STRING)
        return false;
    *out = *kv->strs;
    return true;
}

bool tdm_gguf_get_str_array(const tdm_gguf_t *g, const char *key, const tdm_str_t **out,
                            uint64_t *n)
{
    const tdm_gguf_kv_t *kv = tdm_gguf_find_kv(g, key);
    if (kv == NULL || kv->type != TDM_GGUF_TYPE_ARRAY || kv->arr_type != TDM_GGUF_TYPE_STRING)
        return false;
    *out = kv->strs;
    *n = kv->arr_len;
    return true;
}

bool tdm_gguf_get_array(const tdm_gguf_t *g, const char *key, tdm_gguf_type_t *type,
                        const void **data, uint64_t *n)
{
    const tdm_gguf_kv_t *kv = tdm_gguf_find_kv(g, key);
    if (kv == NULL || kv->type != TDM_GGUF_TYPE_ARRAY || kv->arr_type == TDM_GGUF_TYPE_STRING)
        return false;
    *type = kv->arr_type;
    *data = kv->data;
    *n = kv->arr_len;
    return true;
}

bool tdm_gguf_array_i64(const tdm_gguf_kv_t *kv, uint64_t i, int64_t *out)
{
    if (kv == NULL || kv->type != TDM_GGUF_TYPE_ARRAY || i >= kv->arr_len)
        return false;
    uint64_t size = tdm_gguf_type_size(kv->arr_type);
    if (size == 0)
        return false;
    const uint8_t *p = (const uint8_t *)kv->data + i * size;
    if (kv->arr_type == TDM_GGUF_TYPE_BOOL) {
        *out = *p != 0;
        return true;
    }
    return load_int(kv->arr_type, p, out);
}

bool tdm_gguf_array_f64(const tdm_gguf_kv_t *kv, uint64_t i, double *out)
{
    if (kv == NULL || kv->type != TDM_GGUF_TYPE_ARRAY || i >= kv->arr_len)
        return false;
    uint64_t size = tdm_gguf_type_size(kv->arr_type);
    if (size == 0 || kv->arr_type == TDM_GGUF_TYPE_BOOL)
        return false;
    const uint8_t *p = (const uint8_t *)kv->data + i * size;
    if (load_float(kv->arr_type, p, out))
        return true;
    if (kv->arr_type == TDM_GGUF_TYPE_UINT64) { /* may exceed INT64_MAX */
        *out = (double)load_le(p, 8);
        return true;
    }
    int64_t v;
    if (!load_int(kv->arr_type, p, &v))
        return false;
    *out = (double)v;
    return true;
}
