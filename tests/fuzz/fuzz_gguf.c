/* libFuzzer target: tdm_gguf_open_memory on arbitrary bytes. A file that
 * opens is walked through every getter, so pointers the reader hands out
 * are read in full (ASan catches any that leave the buffer). */
#include "tandem/dtype.h"
#include "tandem/gguf.h"
#include "tandem/qform.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint64_t sink; /* keeps the reads of touch() */

/* Reads every byte of a range so ASan checks it. */
static uint64_t touch(const void *p, uint64_t n)
{
    const volatile uint8_t *b = p;
    uint64_t sum = 0;
    for (uint64_t i = 0; i < n; i++)
        sum += b[i];
    return sum;
}

/* A NUL-terminated copy of a name, to look it up again by C string. */
static char *dup_name(tdm_str_t s)
{
    char *c = malloc((size_t)s.len + 1);
    if (c == NULL)
        return NULL;
    memcpy(c, s.ptr, (size_t)s.len);
    c[s.len] = '\0';
    return c;
}

static uint64_t walk_kv(const tdm_gguf_t *g, const tdm_gguf_kv_t *kv)
{
    uint64_t sum = touch(kv->key.ptr, kv->key.len);
    char *key = dup_name(kv->key);
    if (key == NULL)
        return sum;
    /* Lookups by a name with an embedded NUL may find another kv. */
    const tdm_gguf_kv_t *found = tdm_gguf_find_kv(g, key);
    if (strlen(key) == kv->key.len && found != kv)
        abort();
    uint64_t u;
    float f;
    bool b;
    tdm_str_t s;
    const tdm_str_t *strs;
    uint64_t n;
    tdm_gguf_type_t type;
    const void *data;
    if (tdm_gguf_get_u64(g, key, &u))
        sum += u;
    if (tdm_gguf_get_f32(g, key, &f))
        sum += f == f;
    if (tdm_gguf_get_bool(g, key, &b))
        sum += b;
    if (tdm_gguf_get_str(g, key, &s))
        sum += touch(s.ptr, s.len);
    if (tdm_gguf_get_str_array(g, key, &strs, &n))
        for (uint64_t i = 0; i < n; i++)
            sum += touch(strs[i].ptr, strs[i].len);
    if (tdm_gguf_get_array(g, key, &type, &data, &n)) {
        for (uint64_t i = 0; i <= n; i++) { /* one past the end must fail */
            int64_t iv;
            double d;
            bool ok_i = tdm_gguf_array_i64(found, i, &iv);
            bool ok_f = tdm_gguf_array_f64(found, i, &d);
            if (i == n && (ok_i || ok_f))
                abort();
            sum += ok_i ? (uint64_t)iv : 0;
            sum += ok_f && d == d;
        }
    }
    free(key);
    return sum;
}

/* What the model loader and the kernels' packing do with a tensor's
 * bytes: the scale check, then the first rows (at most 4 of at most 4096
 * elements) dequantized and split into their integer form. */
static uint64_t decode(const tdm_gguf_tensor_t *t)
{
    uint64_t at = 0, sum = 0;
    char what[128];
    sum += (uint64_t)tdm_dtype_validate(t->type, t->data, t->nbytes, &at, what, sizeof(what)) + at;
    const uint64_t k = t->ne[0];
    const size_t rb = tdm_dtype_row_bytes(t->type, k);
    if (rb == 0 || k > 4096 || t->nbytes < rb)
        return sum;
    static float y[4096], sc[4096 / 16], mn[4096 / 16];
    static uint8_t u[4096];
    tdm_qform_t f;
    for (uint64_t r = 0; r < 4 && (r + 1) * rb <= t->nbytes; r++) {
        const uint8_t *row = (const uint8_t *)t->data + r * rb;
        tdm_dtype_to_f32(t->type, row, y, k);
        sum += (uint64_t)(y[0] == y[0]) + (uint64_t)(y[k - 1] == y[k - 1]);
        if (tdm_qform_of(t->type, &f)) {
            tdm_qform_decode(t->type, row, k, u, sc, mn);
            if (f.nib && u[k - 1] > 15)
                abort();
            sum += u[0] + u[k - 1];
        }
    }
    return sum;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The last byte's low bit picks the type policy, so both paths run. */
    bool allow_any = size > 0 && (data[size - 1] & 1);
    char err[256];
    tdm_gguf_t *g = NULL;
    if (tdm_gguf_open_memory(data, size, allow_any, err, sizeof(err), &g) != TDM_OK) {
        if (g != NULL || err[0] == '\0')
            abort(); /* the output stays untouched and a message is written */
        return 0;
    }
    uint64_t sum = tdm_gguf_version(g);
    for (uint64_t i = 0; i < tdm_gguf_n_kv(g); i++)
        sum += walk_kv(g, tdm_gguf_kv(g, i));
    if (tdm_gguf_kv(g, tdm_gguf_n_kv(g)) != NULL)
        abort();
    size_t len;
    const uint8_t *base = tdm_gguf_file_data(g, &len);
    uint64_t data_off = tdm_gguf_data_offset(g);
    if (base != data || len != size || data_off > size)
        abort();
    for (uint64_t i = 0; i < tdm_gguf_n_tensors(g); i++) {
        const tdm_gguf_tensor_t *t = tdm_gguf_tensor(g, i);
        sum += touch(t->name.ptr, t->name.len) + t->n_dims + t->type;
        if (t->data != NULL)
            sum += touch(t->data, t->nbytes) + decode(t);
        char *name = dup_name(t->name);
        if (name != NULL) {
            const tdm_gguf_tensor_t *found = tdm_gguf_find_tensor(g, name);
            if (strlen(name) == t->name.len && found != t)
                abort();
            free(name);
        }
    }
    if (tdm_gguf_tensor(g, tdm_gguf_n_tensors(g)) != NULL)
        abort();
    tdm_gguf_find_kv(g, "general.alignment");
    tdm_gguf_find_tensor(g, "");
    tdm_gguf_close(g);
    sink = sum;
    return 0;
}
