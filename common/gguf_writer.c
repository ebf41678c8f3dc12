/* GGUF v3 writer: keeps kvs (already encoded) and tensors (copied) in
 * memory, then writes header, kvs, tensor infos, padding and the data, each
 * tensor at a multiple of the alignment (32, or general.alignment if it was
 * set as a u32 power of two). It writes one file, or a split model: several
 * such files, each holding a run of the tensors (docs/gguf-split.md). */
#include "tandem/dtype.h"
#include "tandem/gguf.h"
#include "tandem/hash.h"
#include "tandem/log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GGUF_MAGIC   0x46554747u /* "GGUF" as a little-endian u32 */
#define GGUF_VERSION 3u

/* A growable byte buffer; `failed` latches the first allocation failure so
 * callers check once at the end. */
typedef struct gguf_buf {
    uint8_t *p;
    size_t len, cap;
    int failed;
} gguf_buf_t;

typedef struct gguf_wkv {
    char *key;
    uint32_t type;
    gguf_buf_t val; /* the value as encoded after the type field */
} gguf_wkv_t;

typedef struct gguf_wtensor {
    char *name;
    uint32_t n_dims;
    uint64_t ne[TDM_GGUF_MAX_DIMS];
    uint32_t type;
    uint64_t nbytes;
    void *data; /* nbytes, owned */
} gguf_wtensor_t;

struct tdm_gguf_writer {
    gguf_wkv_t *kvs;
    size_t n_kv, cap_kv;
    gguf_wtensor_t *tensors;
    size_t n_tensors, cap_tensors;
};

static void buf_put(gguf_buf_t *b, const void *src, size_t n)
{
    if (b->failed || n == 0)
        return;
    if (n > SIZE_MAX - b->len) {
        b->failed = 1;
        return;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n)
            cap = cap > SIZE_MAX / 2 ? b->len + n : cap * 2;
        uint8_t *p = realloc(b->p, cap);
        if (p == NULL) {
            b->failed = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void buf_put_le(gguf_buf_t *b, uint64_t v, unsigned n)
{
    uint8_t bytes[8];
    for (unsigned i = 0; i < n; i++)
        bytes[i] = (uint8_t)(v >> (8 * i));
    buf_put(b, bytes, n);
}

static void buf_put_str(gguf_buf_t *b, const char *s)
{
    size_t n = strlen(s);
    buf_put_le(b, n, 8);
    buf_put(b, s, n);
}

tdm_status_t tdm_gguf_writer_create(tdm_gguf_writer_t **out)
{
    tdm_gguf_writer_t *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return TDM_ERR_NOMEM;
    *out = w;
    return TDM_OK;
}

void tdm_gguf_writer_destroy(tdm_gguf_writer_t *w)
{
    if (w == NULL)
        return;
    for (size_t i = 0; i < w->n_kv; i++) {
        free(w->kvs[i].key);
        free(w->kvs[i].val.p);
    }
    free(w->kvs);
    for (size_t i = 0; i < w->n_tensors; i++) {
        free(w->tensors[i].name);
        free(w->tensors[i].data);
    }
    free(w->tensors);
    free(w);
}

/* Takes ownership of val: stores it under key, replacing an earlier value
 * of the same key (the file keeps the first position). */
static tdm_status_t set_kv(tdm_gguf_writer_t *w, const char *key, uint32_t type, gguf_buf_t val)
{
    if (val.failed) {
        free(val.p);
        tdm_log_error("gguf", "out of memory encoding kv '%s'", key);
        return TDM_ERR_NOMEM;
    }
    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kvs[i].key, key) == 0) {
            free(w->kvs[i].val.p);
            w->kvs[i].type = type;
            w->kvs[i].val = val;
            return TDM_OK;
        }
    }
    if (w->n_kv == w->cap_kv) {
        size_t cap = w->cap_kv ? w->cap_kv * 2 : 16;
        gguf_wkv_t *kvs = realloc(w->kvs, cap * sizeof(*kvs));
        if (kvs == NULL)
            goto err_nomem;
        w->kvs = kvs;
        w->cap_kv = cap;
    }
    char *k = strdup(key);
    if (k == NULL)
        goto err_nomem;
    w->kvs[w->n_kv++] = (gguf_wkv_t){.key = k, .type = type, .val = val};
    return TDM_OK;

err_nomem:
    free(val.p);
    tdm_log_error("gguf", "out of memory adding kv '%s'", key);
    return TDM_ERR_NOMEM;
}

static tdm_status_t check_key(const char *key)
{
    if (key == NULL || key[0] == '\0') {
        tdm_log_error("gguf", "writer: a kv needs a non-empty key");
        return TDM_ERR_INVALID;
    }
    return TDM_OK;
}

static tdm_status_t set_scalar(tdm_gguf_writer_t *w, const char *key, uint32_t type, uint64_t bits)
{
    tdm_status_t s = check_key(key);
    if (s != TDM_OK)
        return s;
    gguf_buf_t b = {0};
    buf_put_le(&b, bits, (unsigned)tdm_gguf_type_size(type));
    return set_kv(w, key, type, b);
}

tdm_status_t tdm_gguf_writer_set_u32(tdm_gguf_writer_t *w, const char *key, uint32_t v)
{
    return set_scalar(w, key, TDM_GGUF_TYPE_UINT32, v);
}

tdm_status_t tdm_gguf_writer_set_u64(tdm_gguf_writer_t *w, const char *key, uint64_t v)
{
    return set_scalar(w, key, TDM_GGUF_TYPE_UINT64, v);
}

tdm_status_t tdm_gguf_writer_set_i32(tdm_gguf_writer_t *w, const char *key, int32_t v)
{
    return set_scalar(w, key, TDM_GGUF_TYPE_INT32, (uint32_t)v);
}

tdm_status_t tdm_gguf_writer_set_f32(tdm_gguf_writer_t *w, const char *key, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    return set_scalar(w, key, TDM_GGUF_TYPE_FLOAT32, bits);
}

tdm_status_t tdm_gguf_writer_set_bool(tdm_gguf_writer_t *w, const char *key, bool v)
{
    return set_scalar(w, key, TDM_GGUF_TYPE_BOOL, v ? 1 : 0);
}

tdm_status_t tdm_gguf_writer_set_str(tdm_gguf_writer_t *w, const char *key, const char *v)
{
    tdm_status_t s = check_key(key);
    if (s != TDM_OK)
        return s;
    if (v == NULL) {
        tdm_log_error("gguf", "writer: kv '%s': NULL string", key);
        return TDM_ERR_INVALID;
    }
    gguf_buf_t b = {0};
    buf_put_str(&b, v);
    return set_kv(w, key, TDM_GGUF_TYPE_STRING, b);
}

tdm_status_t tdm_gguf_writer_set_str_array(tdm_gguf_writer_t *w, const char *key,
                                           const char *const *v, uint64_t n)
{
    tdm_status_t s = check_key(key);
    if (s != TDM_OK)
        return s;
    for (uint64_t i = 0; i < n; i++) {
        if (v == NULL || v[i] == NULL) {
            tdm_log_error("gguf", "writer: kv '%s': string #%" PRIu64 " is NULL", key, i);
            return TDM_ERR_INVALID;
        }
    }
    gguf_buf_t b = {0};
    buf_put_le(&b, TDM_GGUF_TYPE_STRING, 4);
    buf_put_le(&b, n, 8);
    for (uint64_t i = 0; i < n; i++)
        buf_put_str(&b, v[i]);
    return set_kv(w, key, TDM_GGUF_TYPE_ARRAY, b);
}

tdm_status_t tdm_gguf_writer_set_array(tdm_gguf_writer_t *w, const char *key,
                                       tdm_gguf_type_t elem_type, const void *data, uint64_t n)
{
    tdm_status_t s = check_key(key);
    if (s != TDM_OK)
        return s;
    uint64_t size = tdm_gguf_type_size((uint32_t)elem_type);
    if (size == 0) {
        tdm_log_error("gguf", "writer: kv '%s': element type %d is not a numeric type", key,
                      (int)elem_type);
        return TDM_ERR_INVALID;
    }
    if ((data == NULL && n > 0) || n > SIZE_MAX / size) {
        tdm_log_error("gguf", "writer: kv '%s': bad array (%" PRIu64 " elements)", key, n);
        return TDM_ERR_INVALID;
    }
    gguf_buf_t b = {0};
    buf_put_le(&b, (uint32_t)elem_type, 4);
    buf_put_le(&b, n, 8);
    if (elem_type == TDM_GGUF_TYPE_BOOL) {
        /* Any nonzero byte is written as 1: readers insist on 0 or 1. */
        const uint8_t *src = data;
        for (uint64_t i = 0; i < n; i++) {
            uint8_t v = src[i] != 0;
            buf_put(&b, &v, 1);
        }
    } else {
        buf_put(&b, data, (size_t)(n * size));
    }
    return set_kv(w, key, TDM_GGUF_TYPE_ARRAY, b);
}

tdm_status_t tdm_gguf_writer_add_tensor(tdm_gguf_writer_t *w, const char *name, uint32_t n_dims,
                                        const uint64_t *ne, uint32_t type, const void *data)
{
    if (name == NULL || name[0] == '\0' || n_dims == 0 || n_dims > TDM_GGUF_MAX_DIMS ||
        ne == NULL || data == NULL) {
        tdm_log_error("gguf", "writer: tensor '%s': bad name, n_dims (%" PRIu32 "), dims or data",
                      name ? name : "(null)", n_dims);
        return TDM_ERR_INVALID;
    }
    for (size_t i = 0; i < w->n_tensors; i++) {
        if (strcmp(w->tensors[i].name, name) == 0) {
            tdm_log_error("gguf", "writer: tensor '%s' added twice", name);
            return TDM_ERR_INVALID;
        }
    }
    uint64_t n_elems = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] == 0 || ne[d] > (uint64_t)INT64_MAX / n_elems) {
            tdm_log_error("gguf",
                          "writer: tensor '%s': ne[%" PRIu32 "] = %" PRIu64 " is 0 or "
                          "overflows the element count",
                          name, d, ne[d]);
            return TDM_ERR_INVALID;
        }
        n_elems *= ne[d];
    }
    uint64_t row = tdm_dtype_supported(type) ? tdm_dtype_row_bytes(type, ne[0]) : 0;
    uint64_t rows = n_elems / ne[0];
    if (row == 0 || rows > SIZE_MAX / row) {
        tdm_log_error("gguf",
                      "writer: tensor '%s': type %s with rows of %" PRIu64
                      " elements cannot be stored",
                      name, tdm_dtype_name(type), ne[0]);
        return TDM_ERR_INVALID;
    }
    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? w->cap_tensors * 2 : 16;
        gguf_wtensor_t *t = realloc(w->tensors, cap * sizeof(*t));
        if (t == NULL)
            goto err_nomem;
        w->tensors = t;
        w->cap_tensors = cap;
    }
    gguf_wtensor_t t = {.n_dims = n_dims, .type = type, .nbytes = rows * row};
    for (uint32_t d = 0; d < TDM_GGUF_MAX_DIMS; d++)
        t.ne[d] = d < n_dims ? ne[d] : 1;
    t.name = strdup(name);
    if (t.name == NULL)
        goto err_nomem;
    t.data = malloc((size_t)t.nbytes);
    if (t.data == NULL)
        goto err_free_name;
    memcpy(t.data, data, (size_t)t.nbytes);
    w->tensors[w->n_tensors++] = t;
    return TDM_OK;

err_free_name:
    free(t.name);
err_nomem:
    tdm_log_error("gguf", "writer: out of memory adding tensor '%s'", name);
    return TDM_ERR_NOMEM;
}

/* The alignment the file will use: general.alignment when set as a u32
 * power of two, else the default. */
static tdm_status_t writer_alignment(const tdm_gguf_writer_t *w, uint64_t *out)
{
    *out = TDM_GGUF_DEFAULT_ALIGNMENT;
    for (size_t i = 0; i < w->n_kv; i++) {
        const gguf_wkv_t *kv = &w->kvs[i];
        if (strcmp(kv->key, "general.alignment") != 0)
            continue;
        uint64_t a = 0;
        if (kv->type == TDM_GGUF_TYPE_UINT32)
            a = (uint64_t)kv->val.p[0] | (uint64_t)kv->val.p[1] << 8 |
                (uint64_t)kv->val.p[2] << 16 | (uint64_t)kv->val.p[3] << 24;
        if (a == 0 || (a & (a - 1)) != 0) {
            tdm_log_error("gguf", "writer: general.alignment must be a u32 power of two");
            return TDM_ERR_INVALID;
        }
        *out = a;
    }
    return TDM_OK;
}

/* Output with a running position; `failed` latches the first write error. */
typedef struct gguf_out {
    FILE *f;
    uint64_t pos;
    int failed;
} gguf_out_t;

static void out_put(gguf_out_t *o, const void *p, size_t n)
{
    if (o->failed || n == 0)
        return;
    if (fwrite(p, 1, n, o->f) != n)
        o->failed = 1;
    o->pos += n;
}

static void out_put_le(gguf_out_t *o, uint64_t v, unsigned n)
{
    uint8_t bytes[8];
    for (unsigned i = 0; i < n; i++)
        bytes[i] = (uint8_t)(v >> (8 * i));
    out_put(o, bytes, n);
}

static void out_pad(gguf_out_t *o, uint64_t alignment)
{
    static const uint8_t zeros[64];
    uint64_t pad = (alignment - o->pos % alignment) % alignment;
    while (pad > 0) {
        size_t n = pad < sizeof(zeros) ? (size_t)pad : sizeof(zeros);
        out_put(o, zeros, n);
        pad -= n;
    }
}

/* What one file holds: tensors [t0, t1) and, for a shard of a split, which
 * kvs. A whole file has every kv as set and no split.* added. */
typedef struct gguf_part {
    size_t t0, t1;
    int split;     /* write split.no, split.count, split.tensors.count, split.tandem_id */
    int with_meta; /* every kv (split: but split.*), else only general.alignment */
    uint32_t no, count;
    uint64_t id; /* split.tandem_id: the same in every shard of one model */
} gguf_part_t;

static int is_split_key(const char *key)
{
    return strncmp(key, "split.", 6) == 0;
}

/* Whether kv goes into the part. */
static int part_has_kv(const gguf_part_t *part, const gguf_wkv_t *kv)
{
    if (!part->split)
        return 1;
    if (is_split_key(kv->key))
        return 0; /* replaced by this split's own */
    return part->with_meta || strcmp(kv->key, "general.alignment") == 0;
}

static uint64_t kv_bytes(const gguf_wkv_t *kv)
{
    return 8 + strlen(kv->key) + 4 + kv->val.len;
}

static uint64_t tensor_info_bytes(const gguf_wtensor_t *t)
{
    return 8 + strlen(t->name) + 4 + 8 * (uint64_t)t->n_dims + 4 + 8;
}

static uint64_t align_up(uint64_t n, uint64_t align)
{
    return (n + align - 1) / align * align;
}

/* The split.* kvs as written: key length, key, type, value. */
#define SPLIT_KVS_BYTES ((8 + 8 + 4 + 2) + (8 + 11 + 4 + 2) + (8 + 19 + 4 + 4) + (8 + 15 + 4 + 8))

/* split.tandem_id: a hash of everything the shards hold together (every
 * kv but split.*, every tensor's info and data), so that a reader can tell
 * a shard of another model, even one with the same tensor names and
 * counts (another quantization of the same model, say). */
static uint64_t split_id(const tdm_gguf_writer_t *w)
{
    tdm_hash128_t h = tdm_hash128("tandem split", 12, 0);
    for (size_t i = 0; i < w->n_kv; i++) {
        const gguf_wkv_t *kv = &w->kvs[i];
        if (is_split_key(kv->key))
            continue;
        h = tdm_hash128_chain(h, kv->key, strlen(kv->key) + 1);
        h = tdm_hash128_chain(h, &kv->type, sizeof(kv->type));
        h = tdm_hash128_chain(h, kv->val.p, kv->val.len);
    }
    for (size_t i = 0; i < w->n_tensors; i++) {
        const gguf_wtensor_t *t = &w->tensors[i];
        h = tdm_hash128_chain(h, t->name, strlen(t->name) + 1);
        h = tdm_hash128_chain(h, t->ne, sizeof(t->ne));
        h = tdm_hash128_chain(h, &t->type, sizeof(t->type));
        h = tdm_hash128_chain(h, t->data, t->nbytes);
    }
    return h.lo ^ h.hi;
}

/* Bytes of the part's header, kvs and tensor infos, before the padding. */
static uint64_t part_header_bytes(const tdm_gguf_writer_t *w, const gguf_part_t *part)
{
    uint64_t n = 24;
    for (size_t i = 0; i < w->n_kv; i++)
        if (part_has_kv(part, &w->kvs[i]))
            n += kv_bytes(&w->kvs[i]);
    if (part->split)
        n += SPLIT_KVS_BYTES;
    for (size_t i = part->t0; i < part->t1; i++)
        n += tensor_info_bytes(&w->tensors[i]);
    return n;
}

static void out_kv(gguf_out_t *o, const char *key, uint32_t type, const void *val, size_t len)
{
    size_t klen = strlen(key);
    out_put_le(o, klen, 8);
    out_put(o, key, klen);
    out_put_le(o, type, 4);
    out_put(o, val, len);
}

static tdm_status_t write_part(const tdm_gguf_writer_t *w, const gguf_part_t *part, uint64_t align,
                               FILE *f)
{
    gguf_out_t o = {.f = f};
    uint64_t n_kv = 0;
    for (size_t i = 0; i < w->n_kv; i++)
        n_kv += (uint64_t)part_has_kv(part, &w->kvs[i]);
    if (part->split)
        n_kv += 4;
    out_put_le(&o, GGUF_MAGIC, 4);
    out_put_le(&o, GGUF_VERSION, 4);
    out_put_le(&o, part->t1 - part->t0, 8);
    out_put_le(&o, n_kv, 8);
    for (size_t i = 0; i < w->n_kv; i++) {
        const gguf_wkv_t *kv = &w->kvs[i];
        if (part_has_kv(part, kv))
            out_kv(&o, kv->key, kv->type, kv->val.p, kv->val.len);
    }
    if (part->split) {
        uint8_t v[4];
        v[0] = (uint8_t)part->no;
        v[1] = (uint8_t)(part->no >> 8);
        out_kv(&o, "split.no", TDM_GGUF_TYPE_UINT16, v, 2);
        v[0] = (uint8_t)part->count;
        v[1] = (uint8_t)(part->count >> 8);
        out_kv(&o, "split.count", TDM_GGUF_TYPE_UINT16, v, 2);
        for (unsigned i = 0; i < 4; i++)
            v[i] = (uint8_t)((uint64_t)w->n_tensors >> (8 * i));
        out_kv(&o, "split.tensors.count", TDM_GGUF_TYPE_INT32, v, 4);
        uint8_t id[8];
        for (unsigned i = 0; i < 8; i++)
            id[i] = (uint8_t)(part->id >> (8 * i));
        out_kv(&o, "split.tandem_id", TDM_GGUF_TYPE_UINT64, id, 8);
    }
    uint64_t offset = 0; /* of the next tensor, relative to the data section */
    for (size_t i = part->t0; i < part->t1; i++) {
        const gguf_wtensor_t *t = &w->tensors[i];
        size_t nlen = strlen(t->name);
        out_put_le(&o, nlen, 8);
        out_put(&o, t->name, nlen);
        out_put_le(&o, t->n_dims, 4);
        for (uint32_t d = 0; d < t->n_dims; d++)
            out_put_le(&o, t->ne[d], 8);
        out_put_le(&o, t->type, 4);
        out_put_le(&o, offset, 8);
        offset += align_up(t->nbytes, align);
    }
    out_pad(&o, align);
    for (size_t i = part->t0; i < part->t1; i++) {
        out_put(&o, w->tensors[i].data, (size_t)w->tensors[i].nbytes);
        out_pad(&o, align);
    }
    return o.failed ? TDM_ERR_IO : TDM_OK;
}

static tdm_status_t write_to(const tdm_gguf_writer_t *w, FILE *f)
{
    uint64_t align;
    tdm_status_t s = writer_alignment(w, &align);
    if (s != TDM_OK)
        return s;
    gguf_part_t whole = {.t0 = 0, .t1 = w->n_tensors};
    return write_part(w, &whole, align, f);
}

tdm_status_t tdm_gguf_writer_write_memory(const tdm_gguf_writer_t *w, void **out, size_t *out_len)
{
    char *p = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&p, &len);
    if (f == NULL) {
        tdm_log_error("gguf", "writer: open_memstream: %s", strerror(errno));
        return TDM_ERR_NOMEM;
    }
    tdm_status_t s = write_to(w, f);
    if (fclose(f) != 0 && s == TDM_OK)
        s = TDM_ERR_NOMEM;
    if (s != TDM_OK) {
        if (s == TDM_ERR_IO)
            s = TDM_ERR_NOMEM; /* a memory stream fails only for lack of memory */
        tdm_log_error("gguf", "writer: cannot serialize the file: %s", tdm_status_str(s));
        free(p);
        return s;
    }
    *out = p;
    *out_len = len;
    return TDM_OK;
}

/* The temporary file a file is written to before it is renamed. */
static char *tmp_path(const char *path)
{
    size_t n = strlen(path) + 32;
    char *tmp = malloc(n);
    if (tmp != NULL)
        snprintf(tmp, n, "%s.tmp.%ld", path, (long)getpid());
    return tmp;
}

/* Writes the part into the file tmp (removed again on failure); a message
 * goes to err. */
static tdm_status_t write_file(const tdm_gguf_writer_t *w, const gguf_part_t *part, uint64_t align,
                               const char *tmp, char *err, size_t err_len)
{
    FILE *f = fopen(tmp, "wb");
    if (f == NULL) {
        snprintf(err, err_len, "cannot create '%s': %s", tmp, strerror(errno));
        return TDM_ERR_IO;
    }
    tdm_status_t s = write_part(w, part, align, f);
    int e = errno;
    if (fclose(f) != 0 && s == TDM_OK) {
        e = errno;
        s = TDM_ERR_IO;
    }
    if (s != TDM_OK) {
        snprintf(err, err_len, "cannot write '%s': %s", tmp, strerror(e));
        unlink(tmp);
    }
    return s;
}

tdm_status_t tdm_gguf_writer_write(const tdm_gguf_writer_t *w, const char *path)
{
    /* Write beside the target and rename, so a reader never sees half a file. */
    uint64_t align;
    tdm_status_t s = writer_alignment(w, &align);
    if (s != TDM_OK)
        return s;
    char *tmp = tmp_path(path);
    if (tmp == NULL)
        return TDM_ERR_NOMEM;
    char err[512];
    gguf_part_t whole = {.t0 = 0, .t1 = w->n_tensors};
    s = write_file(w, &whole, align, tmp, err, sizeof(err));
    if (s != TDM_OK)
        tdm_log_error("gguf", "%s", err);
    if (s == TDM_OK && rename(tmp, path) != 0) {
        tdm_log_error("gguf", "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
        unlink(tmp);
        s = TDM_ERR_IO;
    }
    free(tmp);
    return s;
}

__attribute__((format(printf, 3, 4))) static tdm_status_t split_fail(char *err, size_t err_len,
                                                                     const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    tdm_log_debug("gguf", "%s", msg);
    if (err != NULL && err_len > 0)
        snprintf(err, err_len, "%s", msg);
    return TDM_ERR_INVALID;
}

tdm_status_t tdm_gguf_writer_write_split(const tdm_gguf_writer_t *w, const char *prefix,
                                         uint64_t max_bytes, int *n_shards_out, char *err,
                                         size_t err_len)
{
    char msg[1024];
    uint64_t align;
    if (writer_alignment(w, &align) != TDM_OK)
        return split_fail(err, err_len, "general.alignment must be a u32 power of two");
    if (prefix == NULL || prefix[0] == '\0' || prefix[strlen(prefix) - 1] == '/')
        return split_fail(err, err_len, "split: the prefix '%s' names no file",
                          prefix ? prefix : "(null)");
    if (max_bytes == 0)
        return split_fail(err, err_len, "split: the size limit is 0 bytes");
    if (w->n_tensors > (size_t)INT32_MAX)
        return split_fail(err, err_len, "split: %zu tensors do not fit split.tensors.count (i32)",
                          w->n_tensors);

    /* Plan: fill each shard in order while its whole file stays within
     * max_bytes; a shard takes at least one tensor (the first shard may
     * hold none only when there are none). */
    size_t cap = w->n_tensors > 0 ? w->n_tensors : 1;
    gguf_part_t *parts = calloc(cap, sizeof(*parts));
    if (parts == NULL) {
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "split: out of memory");
        return TDM_ERR_NOMEM;
    }
    size_t n_parts = 0, t = 0;
    do {
        gguf_part_t part = {.t0 = t, .t1 = t, .split = 1, .with_meta = n_parts == 0};
        uint64_t head = part_header_bytes(w, &part), data = 0;
        while (part.t1 < w->n_tensors) {
            const gguf_wtensor_t *next = &w->tensors[part.t1];
            uint64_t h = head + tensor_info_bytes(next);
            uint64_t d = data + align_up(next->nbytes, align);
            if (part.t1 > part.t0 && align_up(h, align) + d > max_bytes)
                break;
            part.t1++;
            head = h;
            data = d;
        }
        parts[n_parts++] = part;
        t = part.t1;
    } while (t < w->n_tensors);
    tdm_status_t s = TDM_OK;
    if (n_parts > 65535) {
        s = split_fail(err, err_len,
                       "split: %zu shards needed at %" PRIu64
                       " bytes each, more than split.count (u16) holds",
                       n_parts, max_bytes);
        free(parts);
        return s;
    }

    /* Write every shard to a temporary file, then rename them all, so a
     * failure leaves no partial set behind. */
    char **paths = calloc(n_parts, sizeof(*paths));
    char **tmps = calloc(n_parts, sizeof(*tmps));
    size_t written = 0, renamed = 0;
    if (paths == NULL || tmps == NULL) {
        s = TDM_ERR_NOMEM;
        goto out;
    }
    size_t plen = strlen(prefix) + 32;
    const uint64_t id = split_id(w);
    for (size_t i = 0; i < n_parts; i++) {
        parts[i].id = id;
        parts[i].no = (uint32_t)i;
        parts[i].count = (uint32_t)n_parts;
        paths[i] = malloc(plen);
        if (paths[i] == NULL) {
            s = TDM_ERR_NOMEM;
            goto out;
        }
        snprintf(paths[i], plen, "%s-%05zu-of-%05zu.gguf", prefix, i + 1, n_parts);
        tmps[i] = tmp_path(paths[i]);
        if (tmps[i] == NULL) {
            s = TDM_ERR_NOMEM;
            goto out;
        }
    }
    for (; written < n_parts; written++) {
        s = write_file(w, &parts[written], align, tmps[written], msg, sizeof(msg));
        if (s != TDM_OK)
            goto out;
    }
    for (; renamed < n_parts; renamed++) {
        if (rename(tmps[renamed], paths[renamed]) != 0) {
            snprintf(msg, sizeof(msg), "cannot rename '%s' to '%s': %s", tmps[renamed],
                     paths[renamed], strerror(errno));
            s = TDM_ERR_IO;
            goto out;
        }
    }
    if (n_shards_out != NULL)
        *n_shards_out = (int)n_parts;

out:
    if (s != TDM_OK) {
        if (s == TDM_ERR_NOMEM)
            snprintf(msg, sizeof(msg), "split: out of memory");
        tdm_log_debug("gguf", "%s", msg);
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "%s", msg);
        for (size_t i = 0; i < renamed; i++)
            unlink(paths[i]);
        for (size_t i = renamed; i < written; i++)
            unlink(tmps[i]);
    }
    for (size_t i = 0; i < n_parts && paths != NULL; i++)
        free(paths[i]);
    for (size_t i = 0; i < n_parts && tmps != NULL; i++)
        free(tmps[i]);
    free(paths);
    free(tmps);
    free(parts);
    return s;
}
