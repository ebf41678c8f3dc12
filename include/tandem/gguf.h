/* tandem: a validating GGUF v3 reader over mmap, and a writer.
 *
 * File format (little endian), as GGML defines it:
 *
 *   u32 magic "GGUF"   u32 version (3)
 *   u64 n_tensors      u64 n_kv
 *   n_kv x { str key; u32 type; value }
 *   n_tensors x { str name; u32 n_dims (1..4); u64 ne[n_dims]; u32 dtype; u64 offset }
 *   padding to `general.alignment` (u32, default 32, a power of two)
 *   tensor data: each tensor at data_start + offset, offset a multiple of
 *   the alignment, inside the file, not overlapping another tensor.
 *
 *   str   = u64 len; len bytes (not NUL terminated)
 *   value = scalar of its type | str | { u32 elem_type; u64 n; n x elem }
 *           (arrays of arrays are refused)
 *
 * Everything is validated when the file is opened: counts and lengths
 * against the bytes left in the file, types, dims (each > 0, product fits in
 * 63 bits), tensor names unique, offsets aligned, data within the file and
 * non-overlapping. A bad file yields TDM_ERR_FORMAT (or TDM_ERR_UNSUPPORTED
 * for a tensor of a type tandem cannot compute) and one message naming the
 * field and its byte offset, e.g.
 *   "tensor 'blk.0.attn_q.weight' (info at byte 1234): data offset 99999 + 4096
 *    bytes runs past the end of the file (65536 bytes)"
 * The reader never crashes on any input and never reads outside the map.
 *
 * Lifetime: strings and data pointers returned point into the map and stay
 * valid until tdm_gguf_close().
 *
 * Split models (llama.cpp's gguf-split convention; docs/gguf-split.md):
 * PREFIX-00001-of-00003.gguf, PREFIX-00002-of-00003.gguf, ... in one
 * directory, each a complete GGUF file holding some of the tensors, with
 * offsets relative to its own data section. Every shard has the kvs
 * split.no (u16, 0-based), split.count (u16) and split.tensors.count (i32,
 * tensors over all shards); the first also has all the model's metadata.
 * tdm_gguf_open() of the first shard maps every shard, validates each as a
 * file and all together (names, split.* keys, tensor counts, no tensor name
 * in two shards), and presents one model:
 *   - kvs: the first shard's, the split.* keys included, as in the file;
 *     kv file_offset is in the first shard;
 *   - tensors: every shard's in shard order (tdm_gguf_tensor_t.shard says
 *     which); data points into that shard's map; offset and info_offset are
 *     in that shard's file;
 *   - tdm_gguf_file_data / tdm_gguf_data_offset: see there.
 * Errors name the shard ("shard 2 of 3 'PATH' is missing: ..."); opening a
 * later shard directly is refused with a message naming the first. */
#ifndef TANDEM_GGUF_H
#define TANDEM_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tandem/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TDM_GGUF_MAX_DIMS          4
#define TDM_GGUF_DEFAULT_ALIGNMENT 32

typedef enum tdm_gguf_type {
    TDM_GGUF_TYPE_UINT8 = 0,
    TDM_GGUF_TYPE_INT8 = 1,
    TDM_GGUF_TYPE_UINT16 = 2,
    TDM_GGUF_TYPE_INT16 = 3,
    TDM_GGUF_TYPE_UINT32 = 4,
    TDM_GGUF_TYPE_INT32 = 5,
    TDM_GGUF_TYPE_FLOAT32 = 6,
    TDM_GGUF_TYPE_BOOL = 7,
    TDM_GGUF_TYPE_STRING = 8,
    TDM_GGUF_TYPE_ARRAY = 9,
    TDM_GGUF_TYPE_UINT64 = 10,
    TDM_GGUF_TYPE_INT64 = 11,
    TDM_GGUF_TYPE_FLOAT64 = 12,
} tdm_gguf_type_t;

/* A string inside the file: not NUL terminated. */
typedef struct tdm_str {
    const char *ptr;
    uint64_t len;
} tdm_str_t;

typedef struct tdm_gguf_kv {
    tdm_str_t key;
    tdm_gguf_type_t type;     /* the value's type */
    tdm_gguf_type_t arr_type; /* element type when type == ARRAY */
    uint64_t arr_len;         /* element count when type == ARRAY */
    const void *data;         /* scalar value, string's u64 length, or first
                                 element; little endian, maybe unaligned */
    const tdm_str_t *strs;    /* array of strings: arr_len entries; string: 1 */
    uint64_t file_offset;     /* byte offset of the key in the file */
} tdm_gguf_kv_t;

typedef struct tdm_gguf_tensor {
    tdm_str_t name;
    uint32_t n_dims;
    uint64_t ne[TDM_GGUF_MAX_DIMS]; /* ne[0] is the row length; unused dims 1 */
    uint32_t type;                  /* tdm_dtype_t */
    uint64_t offset;                /* relative to the data section */
    uint64_t nbytes;
    const void *data;     /* into the map */
    uint64_t info_offset; /* byte offset of the tensor info in the file */
    uint32_t shard;       /* the shard file holding it (0-based); 0 for one file */
} tdm_gguf_tensor_t;

typedef struct tdm_gguf tdm_gguf_t;

/* Opens and validates a GGUF file. On failure *out is untouched and, if err
 * is not NULL, a message naming the field and its byte offset is written to
 * err (also logged at debug level; callers log or print it once). Tensors of
 * types tandem cannot compute are refused (TDM_ERR_UNSUPPORTED) with a
 * message naming the tensor and its type, unless allow_any_type.
 * A file named PREFIX-00001-of-0000N.gguf (N > 1) or with split.count > 1 is
 * the first shard of a split model: its siblings are opened too (above).
 * A missing shard is TDM_ERR_IO; shards that disagree are TDM_ERR_FORMAT. */
tdm_status_t tdm_gguf_open(const char *path, bool allow_any_type, char *err, size_t err_len,
                           tdm_gguf_t **out);
/* The same over a caller's buffer (not copied; must outlive the handle).
 * Always one file: a shard opens as a model of its own tensors. */
tdm_status_t tdm_gguf_open_memory(const void *buf, size_t len, bool allow_any_type, char *err,
                                  size_t err_len, tdm_gguf_t **out);
void tdm_gguf_close(tdm_gguf_t *g);

/* Drops the memory pages of tensor t's data from this process (the file
 * stays mapped: a later read brings them back from the file). For a weight
 * the backend copied or repacked, so that the process does not keep the
 * file's pages as a second resident copy. No-op for an in-memory file. */
void tdm_gguf_release_data(const tdm_gguf_t *g, const tdm_gguf_tensor_t *t);
uint32_t tdm_gguf_version(const tdm_gguf_t *g);
uint64_t tdm_gguf_n_kv(const tdm_gguf_t *g);
const tdm_gguf_kv_t *tdm_gguf_kv(const tdm_gguf_t *g, uint64_t i);
const tdm_gguf_kv_t *tdm_gguf_find_kv(const tdm_gguf_t *g, const char *key);
uint64_t tdm_gguf_n_tensors(const tdm_gguf_t *g);
const tdm_gguf_tensor_t *tdm_gguf_tensor(const tdm_gguf_t *g, uint64_t i);
const tdm_gguf_tensor_t *tdm_gguf_find_tensor(const tdm_gguf_t *g, const char *name);
/* The whole mapped file (for fingerprints): bytes [0, tdm_gguf_data_offset)
 * are the header, kvs and tensor table, and a tensor's data is at
 * data_offset + offset.
 * A split model has no one file: this is then a buffer owned by g holding
 * every shard's bytes before its data section (header, kvs, tensor infos,
 * padding), concatenated in shard order, and *len and tdm_gguf_data_offset
 * are both its length. So [0, data_offset) still covers all the metadata
 * and every tensor table (the model fingerprint hashes it), but tensor data
 * are not in it: use tensor->data, or tdm_gguf_shard_data. A model's
 * fingerprint split and unsplit differs (the bytes differ). */
const void *tdm_gguf_file_data(const tdm_gguf_t *g, size_t *len);
/* Byte offset of the data section (split: the length above). */
uint64_t tdm_gguf_data_offset(const tdm_gguf_t *g);
/* Shard files: 1 for one file. */
uint32_t tdm_gguf_n_shards(const tdm_gguf_t *g);
/* Shard i's whole mapped file (*len bytes) and the byte offset of its data
 * section; for one file, shard 0 is the file. NULL if i is out of range. */
const void *tdm_gguf_shard_data(const tdm_gguf_t *g, uint32_t i, size_t *len,
                                uint64_t *data_offset);

/* Bytes of one scalar of a GGUF type; 0 for string, array and unknown ids. */
uint64_t tdm_gguf_type_size(uint32_t type);

/* Typed getters: return false if the key is missing or of another type.
 * get_u64 accepts any integer type (u8..u64, i8..i64 when >= 0); get_f32
 * accepts f32 and f64; get_bool accepts bool. */
bool tdm_gguf_get_u64(const tdm_gguf_t *g, const char *key, uint64_t *out);
bool tdm_gguf_get_f32(const tdm_gguf_t *g, const char *key, float *out);
bool tdm_gguf_get_bool(const tdm_gguf_t *g, const char *key, bool *out);
bool tdm_gguf_get_str(const tdm_gguf_t *g, const char *key, tdm_str_t *out);
/* Array of strings: *out points at n entries owned by g. */
bool tdm_gguf_get_str_array(const tdm_gguf_t *g, const char *key, const tdm_str_t **out,
                            uint64_t *n);
/* Array of numbers: *data points at n raw little-endian elements of *type. */
bool tdm_gguf_get_array(const tdm_gguf_t *g, const char *key, tdm_gguf_type_t *type,
                        const void **data, uint64_t *n);
/* Element of a numeric array as i64/f64 (false if index or type bad). */
bool tdm_gguf_array_i64(const tdm_gguf_kv_t *kv, uint64_t i, int64_t *out);
bool tdm_gguf_array_f64(const tdm_gguf_kv_t *kv, uint64_t i, double *out);

/* ---- writer: builds a GGUF file in memory, then writes it. ---- */
typedef struct tdm_gguf_writer tdm_gguf_writer_t;

tdm_status_t tdm_gguf_writer_create(tdm_gguf_writer_t **out);
void tdm_gguf_writer_destroy(tdm_gguf_writer_t *w);
tdm_status_t tdm_gguf_writer_set_u32(tdm_gguf_writer_t *w, const char *key, uint32_t v);
tdm_status_t tdm_gguf_writer_set_u64(tdm_gguf_writer_t *w, const char *key, uint64_t v);
tdm_status_t tdm_gguf_writer_set_i32(tdm_gguf_writer_t *w, const char *key, int32_t v);
tdm_status_t tdm_gguf_writer_set_f32(tdm_gguf_writer_t *w, const char *key, float v);
tdm_status_t tdm_gguf_writer_set_bool(tdm_gguf_writer_t *w, const char *key, bool v);
tdm_status_t tdm_gguf_writer_set_str(tdm_gguf_writer_t *w, const char *key, const char *v);
tdm_status_t tdm_gguf_writer_set_str_array(tdm_gguf_writer_t *w, const char *key,
                                           const char *const *v, uint64_t n);
/* Numeric array; elem_type is a scalar tdm_gguf_type_t, data n elements. */
tdm_status_t tdm_gguf_writer_set_array(tdm_gguf_writer_t *w, const char *key,
                                       tdm_gguf_type_t elem_type, const void *data, uint64_t n);
/* Adds a tensor; data (nbytes = row bytes * rows) is copied. */
tdm_status_t tdm_gguf_writer_add_tensor(tdm_gguf_writer_t *w, const char *name, uint32_t n_dims,
                                        const uint64_t *ne, uint32_t type, const void *data);
/* Writes the file to path (through a temporary file beside it, renamed at
 * the end). The alignment is general.alignment when set (a u32 power of
 * two), else 32. */
tdm_status_t tdm_gguf_writer_write(const tdm_gguf_writer_t *w, const char *path);
/* The same file into a buffer: *out (malloc'd, the caller frees it) of
 * *out_len bytes. */
tdm_status_t tdm_gguf_writer_write_memory(const tdm_gguf_writer_t *w, void **out, size_t *out_len);
/* Writes the model split as llama.cpp's gguf-split does (docs/gguf-split.md):
 * PREFIX-00001-of-0000N.gguf .. PREFIX-0000N-of-0000N.gguf (PREFIX may hold
 * a directory), the tensors in the order added, each shard filled while its
 * whole file stays at or below max_bytes. A shard holds at least one tensor,
 * so a tensor too big for max_bytes gets a shard of its own (over the
 * limit). The first shard has every kv set on the writer (split.* ones
 * excepted) then split.no (u16), split.count (u16) and split.tensors.count
 * (i32); the others have only these three, after general.alignment when it
 * is set (so every shard's data keeps that alignment). With no tensors there
 * is one shard (split.count 1). Every shard goes to a temporary file first
 * and all are renamed at the end; on failure none is left. *n_shards_out
 * (may be NULL) gets N. Errors: TDM_ERR_INVALID (max_bytes 0, an empty
 * prefix, more than 65535 shards, a bad general.alignment), TDM_ERR_IO,
 * TDM_ERR_NOMEM, with a message in err (may be NULL). The tensor data are
 * the copies the writer holds in memory. */
tdm_status_t tdm_gguf_writer_write_split(const tdm_gguf_writer_t *w, const char *prefix,
                                         uint64_t max_bytes, int *n_shards_out, char *err,
                                         size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
