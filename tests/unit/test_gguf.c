/* Unit test of the GGUF reader and writer: a round trip through the writer,
 * then many broken files that the reader must refuse with a message that
 * names the byte offset, then split models (written whole and split, and
 * the errors of broken splits), then (if present) the default model. */
#include "tandem/dtype.h"
#include "tandem/gguf.h"

#include <dirent.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"

static int str_eq(tdm_str_t s, const char *c)
{
    return s.len == strlen(c) && memcmp(s.ptr, c, s.len) == 0;
}

static void put_le(uint8_t *buf, uint64_t pos, uint64_t v, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        buf[pos + i] = (uint8_t)(v >> (8 * i));
}

/* ---- the reference file ---- */

#define N_TENSORS 5
static const char *const tensor_names[N_TENSORS] = {"w_f32", "w_f16", "w_q40", "w_q41", "w_q80"};
static const uint32_t tensor_types[N_TENSORS] = {TDM_DTYPE_F32, TDM_DTYPE_F16, TDM_DTYPE_Q4_0,
                                                 TDM_DTYPE_Q4_1, TDM_DTYPE_Q8_0};
static const uint32_t tensor_ndims[N_TENSORS] = {2, 2, 1, 3, 4};
static const uint64_t tensor_ne[N_TENSORS][4] = {
    {8, 3, 1, 1}, {16, 2, 1, 1}, {64, 1, 1, 1}, {32, 2, 2, 1}, {96, 1, 1, 2}};
static void *tensor_data[N_TENSORS];
static uint64_t tensor_nbytes[N_TENSORS];

static const char *const tokens[] = {"a", "bc", "", "h\xc3\xa9llo", "<|im_end|>"};
static const float arr_f32[] = {0.5f, -1.25f, 3.0f};
static const int32_t arr_i32[] = {-7, 0, 2147483647};
static const uint8_t arr_bool[] = {1, 0, 1, 1};
static const uint64_t arr_u64[] = {0, 18446744073709551615ull};

static void make_tensor_data(void)
{
    for (int i = 0; i < N_TENSORS; i++) {
        uint64_t n = 1;
        for (int d = 0; d < 4; d++)
            n *= tensor_ne[i][d];
        float *f = malloc(n * sizeof(float));
        for (uint64_t j = 0; j < n; j++)
            f[j] = sinf((float)(j * 7 + (uint64_t)i)) * 3.0f;
        tensor_nbytes[i] =
            tdm_dtype_row_bytes(tensor_types[i], tensor_ne[i][0]) * (n / tensor_ne[i][0]);
        tensor_data[i] = malloc(tensor_nbytes[i]);
        tdm_dtype_from_f32(tensor_types[i], f, tensor_data[i], n);
        free(f);
    }
}

/* Builds the reference writer: every KV type the test needs and the five
 * tensors. alignment 0 leaves general.alignment unset. */
static tdm_gguf_writer_t *make_writer(uint32_t alignment)
{
    tdm_gguf_writer_t *w;
    if (tdm_gguf_writer_create(&w) != TDM_OK)
        return NULL;
    int ok = 1;
    ok &= tdm_gguf_writer_set_str(w, "general.architecture", "llama") == TDM_OK;
    ok &= tdm_gguf_writer_set_str(w, "general.name", "placeholder") == TDM_OK;
    if (alignment)
        ok &= tdm_gguf_writer_set_u32(w, "general.alignment", alignment) == TDM_OK;
    ok &= tdm_gguf_writer_set_u32(w, "test.u32", 4000000000u) == TDM_OK;
    ok &= tdm_gguf_writer_set_u64(w, "test.u64", 1ull << 40) == TDM_OK;
    ok &= tdm_gguf_writer_set_i32(w, "test.i32", -5) == TDM_OK;
    ok &= tdm_gguf_writer_set_f32(w, "test.f32", 1.5f) == TDM_OK;
    ok &= tdm_gguf_writer_set_bool(w, "test.bool", true) == TDM_OK;
    ok &= tdm_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", tokens, 5) == TDM_OK;
    ok &= tdm_gguf_writer_set_array(w, "test.arr_f32", TDM_GGUF_TYPE_FLOAT32, arr_f32, 3) == TDM_OK;
    ok &= tdm_gguf_writer_set_array(w, "test.arr_i32", TDM_GGUF_TYPE_INT32, arr_i32, 3) == TDM_OK;
    ok &= tdm_gguf_writer_set_array(w, "test.arr_bool", TDM_GGUF_TYPE_BOOL, arr_bool, 4) == TDM_OK;
    ok &= tdm_gguf_writer_set_array(w, "test.arr_u64", TDM_GGUF_TYPE_UINT64, arr_u64, 2) == TDM_OK;
    ok &= tdm_gguf_writer_set_array(w, "test.arr_empty", TDM_GGUF_TYPE_INT32, NULL, 0) == TDM_OK;
    /* Replacing a value keeps one kv. */
    ok &= tdm_gguf_writer_set_str(w, "general.name", "tiny") == TDM_OK;
    for (int i = 0; i < N_TENSORS; i++)
        ok &= tdm_gguf_writer_add_tensor(w, tensor_names[i], tensor_ndims[i], tensor_ne[i],
                                         tensor_types[i], tensor_data[i]) == TDM_OK;
    if (!ok) {
        tdm_gguf_writer_destroy(w);
        return NULL;
    }
    return w;
}

static void check_reference(const tdm_gguf_t *g, uint64_t alignment, const char *label)
{
    CHECK(tdm_gguf_version(g) == 3, "%s", label);
    CHECK(tdm_gguf_n_kv(g) == 14, "%s: n_kv %" PRIu64, label, tdm_gguf_n_kv(g));
    CHECK(tdm_gguf_n_tensors(g) == N_TENSORS, "%s", label);

    tdm_str_t s;
    CHECK(tdm_gguf_get_str(g, "general.architecture", &s) && str_eq(s, "llama"), "%s", label);
    CHECK(tdm_gguf_get_str(g, "general.name", &s) && str_eq(s, "tiny"), "%s", label);
    const tdm_gguf_kv_t *kv0 = tdm_gguf_kv(g, 0);
    CHECK(kv0 != NULL && str_eq(kv0->key, "general.architecture") && kv0->file_offset == 24,
          "%s: first kv", label);
    CHECK(tdm_gguf_kv(g, tdm_gguf_n_kv(g)) == NULL, "%s", label);

    uint64_t u;
    CHECK(tdm_gguf_get_u64(g, "test.u32", &u) && u == 4000000000u, "%s: u32 as u64", label);
    CHECK(tdm_gguf_get_u64(g, "test.u64", &u) && u == (1ull << 40), "%s: u64", label);
    CHECK(tdm_gguf_get_u64(g, "general.alignment", &u) && u == alignment, "%s: alignment", label);
    CHECK(!tdm_gguf_get_u64(g, "test.i32", &u), "%s: negative i32 is not a u64", label);
    CHECK(!tdm_gguf_get_u64(g, "general.name", &u), "%s: string is not a u64", label);
    CHECK(!tdm_gguf_get_u64(g, "no.such.key", &u), "%s", label);
    CHECK(tdm_gguf_find_kv(g, "no.such.key") == NULL, "%s", label);
    CHECK(tdm_gguf_find_kv(g, "test") == NULL, "%s: prefix does not match", label);
    const tdm_gguf_kv_t *kv = tdm_gguf_find_kv(g, "test.i32");
    CHECK(kv != NULL && kv->type == TDM_GGUF_TYPE_INT32, "%s", label);

    float f;
    CHECK(tdm_gguf_get_f32(g, "test.f32", &f) && f == 1.5f, "%s: f32", label);
    CHECK(!tdm_gguf_get_f32(g, "test.u32", &f), "%s: u32 is not f32", label);
    bool b = false;
    CHECK(tdm_gguf_get_bool(g, "test.bool", &b) && b, "%s: bool", label);
    CHECK(!tdm_gguf_get_bool(g, "test.u32", &b), "%s", label);
    CHECK(!tdm_gguf_get_str(g, "test.u32", &s), "%s", label);

    const tdm_str_t *strs;
    uint64_t n;
    CHECK(tdm_gguf_get_str_array(g, "tokenizer.ggml.tokens", &strs, &n) && n == 5, "%s", label);
    for (uint64_t i = 0; i < 5 && n == 5; i++)
        CHECK(str_eq(strs[i], tokens[i]), "%s: token %" PRIu64, label, i);
    CHECK(!tdm_gguf_get_str_array(g, "test.arr_f32", &strs, &n), "%s", label);

    tdm_gguf_type_t type;
    const void *data;
    CHECK(tdm_gguf_get_array(g, "test.arr_f32", &type, &data, &n) &&
              type == TDM_GGUF_TYPE_FLOAT32 && n == 3 && memcmp(data, arr_f32, 12) == 0,
          "%s: f32 array", label);
    CHECK(!tdm_gguf_get_array(g, "tokenizer.ggml.tokens", &type, &data, &n),
          "%s: string array is not numeric", label);
    CHECK(tdm_gguf_get_array(g, "test.arr_empty", &type, &data, &n) && n == 0, "%s", label);
    kv = tdm_gguf_find_kv(g, "test.arr_f32");
    double d;
    int64_t iv;
    CHECK(tdm_gguf_array_f64(kv, 1, &d) && d == -1.25, "%s", label);
    CHECK(!tdm_gguf_array_f64(kv, 3, &d), "%s: index past the end", label);
    CHECK(!tdm_gguf_array_i64(kv, 0, &iv), "%s: float is not an integer", label);
    kv = tdm_gguf_find_kv(g, "test.arr_i32");
    CHECK(tdm_gguf_array_i64(kv, 0, &iv) && iv == -7, "%s", label);
    CHECK(tdm_gguf_array_i64(kv, 2, &iv) && iv == 2147483647, "%s", label);
    CHECK(tdm_gguf_array_f64(kv, 0, &d) && d == -7.0, "%s", label);
    kv = tdm_gguf_find_kv(g, "test.arr_bool");
    CHECK(kv != NULL && kv->arr_type == TDM_GGUF_TYPE_BOOL && kv->arr_len == 4, "%s", label);
    CHECK(tdm_gguf_array_i64(kv, 1, &iv) && iv == 0 && tdm_gguf_array_i64(kv, 3, &iv) && iv == 1,
          "%s: bool array", label);
    kv = tdm_gguf_find_kv(g, "test.arr_u64");
    CHECK(tdm_gguf_array_i64(kv, 0, &iv) && iv == 0, "%s", label);
    CHECK(!tdm_gguf_array_i64(kv, 1, &iv), "%s: u64 max is not an i64", label);
    CHECK(tdm_gguf_array_f64(kv, 1, &d) && d == 18446744073709551615.0, "%s", label);
    CHECK(!tdm_gguf_array_i64(tdm_gguf_find_kv(g, "tokenizer.ggml.tokens"), 0, &iv), "%s", label);
    CHECK(!tdm_gguf_array_i64(tdm_gguf_find_kv(g, "test.u32"), 0, &iv), "%s", label);

    size_t file_len;
    const uint8_t *base = tdm_gguf_file_data(g, &file_len);
    uint64_t data_off = tdm_gguf_data_offset(g);
    CHECK(data_off % alignment == 0 && data_off <= file_len, "%s: data offset %" PRIu64, label,
          data_off);
    for (int i = 0; i < N_TENSORS; i++) {
        const tdm_gguf_tensor_t *t = tdm_gguf_tensor(g, (uint64_t)i);
        CHECK(t != NULL && t == tdm_gguf_find_tensor(g, tensor_names[i]), "%s: %s", label,
              tensor_names[i]);
        if (t == NULL)
            continue;
        CHECK(str_eq(t->name, tensor_names[i]), "%s", label);
        CHECK(t->n_dims == tensor_ndims[i], "%s: %s n_dims", label, tensor_names[i]);
        CHECK(memcmp(t->ne, tensor_ne[i], sizeof(t->ne)) == 0, "%s: %s ne", label, tensor_names[i]);
        CHECK(t->type == tensor_types[i], "%s: %s type", label, tensor_names[i]);
        CHECK(t->nbytes == tensor_nbytes[i], "%s: %s nbytes %" PRIu64, label, tensor_names[i],
              t->nbytes);
        CHECK(t->offset % alignment == 0, "%s: %s offset", label, tensor_names[i]);
        CHECK(t->data == base + data_off + t->offset, "%s: %s data pointer", label,
              tensor_names[i]);
        CHECK(t->data != NULL && memcmp(t->data, tensor_data[i], tensor_nbytes[i]) == 0,
              "%s: %s data", label, tensor_names[i]);
        CHECK(t->info_offset > 24 && t->info_offset < data_off, "%s", label);
    }
    CHECK(tdm_gguf_tensor(g, N_TENSORS) == NULL, "%s", label);
    CHECK(tdm_gguf_find_tensor(g, "w_f3") == NULL, "%s", label);
    CHECK(tdm_gguf_find_tensor(g, "nope") == NULL, "%s", label);
}

static void test_round_trip(void)
{
    tdm_gguf_writer_t *w = make_writer(32);
    CHECK(w != NULL, "writer");
    if (w == NULL)
        return;
    char path[] = "/tmp/tandem-test-gguf-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd < 0) {
        tdm_gguf_writer_destroy(w);
        return;
    }
    close(fd);
    CHECK(tdm_gguf_writer_write(w, path) == TDM_OK, "write");
    const char *keep = getenv("TANDEM_TEST_GGUF_OUT"); /* for checks with other readers */
    if (keep != NULL)
        CHECK(tdm_gguf_writer_write(w, keep) == TDM_OK, "write %s", keep);

    char err[256] = "";
    tdm_gguf_t *g = NULL;
    tdm_status_t st = tdm_gguf_open(path, false, err, sizeof(err), &g);
    CHECK(st == TDM_OK, "open: %s", err);
    if (st == TDM_OK) {
        check_reference(g, 32, "file");
        /* The file and the memory image are the same bytes. */
        void *mem;
        size_t mem_len, file_len;
        const void *file = tdm_gguf_file_data(g, &file_len);
        CHECK(tdm_gguf_writer_write_memory(w, &mem, &mem_len) == TDM_OK, "write_memory");
        CHECK(mem_len == file_len && memcmp(mem, file, file_len) == 0, "memory image");
        free(mem);
        tdm_gguf_close(g);
    }
    unlink(path);

    /* Errors of open itself. */
    g = (tdm_gguf_t *)&n_pass; /* sentinel: must stay untouched */
    st = tdm_gguf_open("/nonexistent/x.gguf", false, err, sizeof(err), &g);
    CHECK(st == TDM_ERR_IO && err[0] != '\0' && g == (tdm_gguf_t *)&n_pass, "missing file");
    st = tdm_gguf_open("/tmp", false, NULL, 0, &g);
    CHECK(st == TDM_ERR_IO && g == (tdm_gguf_t *)&n_pass, "directory");
    tdm_gguf_close(NULL);

    /* Alignment 64 and the default (no key). */
    tdm_gguf_writer_destroy(w);
    w = make_writer(64);
    void *mem = NULL;
    size_t mem_len = 0;
    CHECK(w != NULL && tdm_gguf_writer_write_memory(w, &mem, &mem_len) == TDM_OK, "align 64");
    if (mem != NULL) {
        g = NULL;
        st = tdm_gguf_open_memory(mem, mem_len, false, err, sizeof(err), &g);
        CHECK(st == TDM_OK, "open align 64: %s", err);
        if (st == TDM_OK) {
            check_reference(g, 64, "align64");
            tdm_gguf_close(g);
        }
        free(mem);
    }
    tdm_gguf_writer_destroy(w);
    w = make_writer(0);
    mem = NULL;
    CHECK(w != NULL && tdm_gguf_writer_write_memory(w, &mem, &mem_len) == TDM_OK, "align def");
    if (mem != NULL) {
        g = NULL;
        st = tdm_gguf_open_memory(mem, mem_len, false, err, sizeof(err), &g);
        CHECK(st == TDM_OK, "open default alignment: %s", err);
        if (st == TDM_OK) {
            uint64_t u;
            CHECK(tdm_gguf_n_kv(g) == 13 && !tdm_gguf_get_u64(g, "general.alignment", &u),
                  "no alignment key");
            CHECK(tdm_gguf_data_offset(g) % 32 == 0, "default alignment");
            tdm_gguf_close(g);
        }
        free(mem);
    }
    tdm_gguf_writer_destroy(w);

    /* Writer refusals. */
    if (tdm_gguf_writer_create(&w) != TDM_OK) {
        CHECK(0, "writer_create");
        return;
    }
    uint64_t ne[2] = {33, 1};
    float zeros[64] = {0};
    fprintf(stderr, "(the next writer errors are expected)\n");
    CHECK(tdm_gguf_writer_add_tensor(w, "x", 1, ne, TDM_DTYPE_Q8_0, zeros) == TDM_ERR_INVALID,
          "row not a block multiple");
    ne[0] = 32;
    CHECK(tdm_gguf_writer_add_tensor(w, "x", 1, ne, 16, zeros) == TDM_ERR_INVALID,
          "unsupported type");
    CHECK(tdm_gguf_writer_add_tensor(w, "x", 1, ne, TDM_DTYPE_F16, zeros) == TDM_OK, "add");
    CHECK(tdm_gguf_writer_add_tensor(w, "x", 1, ne, TDM_DTYPE_F16, zeros) == TDM_ERR_INVALID,
          "duplicate tensor");
    CHECK(tdm_gguf_writer_add_tensor(w, "y", 0, ne, TDM_DTYPE_F16, zeros) == TDM_ERR_INVALID,
          "n_dims 0");
    CHECK(tdm_gguf_writer_set_u32(w, "", 1) == TDM_ERR_INVALID, "empty key");
    CHECK(tdm_gguf_writer_set_array(w, "a", TDM_GGUF_TYPE_STRING, zeros, 1) == TDM_ERR_INVALID,
          "string as numeric array");
    CHECK(tdm_gguf_writer_set_u32(w, "general.alignment", 48) == TDM_OK, "set");
    CHECK(tdm_gguf_writer_write_memory(w, &mem, &mem_len) == TDM_ERR_INVALID, "alignment 48");
    tdm_gguf_writer_destroy(w);
    tdm_gguf_writer_destroy(NULL);
}

/* ---- broken files ---- */

/* Positions of fields in the reference image, found through the reader. */
typedef struct layout {
    uint8_t *img;
    size_t len;
    uint64_t data_offset;
    uint64_t kv_at[16];       /* file offset of each kv */
    uint64_t kv_val[16];      /* of the type field of each kv */
    uint64_t t_at[N_TENSORS]; /* info offset of each tensor */
    uint64_t t_ndims[N_TENSORS], t_ne[N_TENSORS], t_type[N_TENSORS], t_off[N_TENSORS];
    uint64_t t_data_end; /* end of the last tensor's data */
} layout_t;

static int kv_index(const layout_t *l, const char *key, tdm_gguf_t *g)
{
    for (uint64_t i = 0; i < tdm_gguf_n_kv(g); i++)
        if (str_eq(tdm_gguf_kv(g, i)->key, key))
            return (int)i;
    (void)l;
    return -1;
}

/* Expects the image to be refused with status (any error when 0). Checks
 * the message, that *out stays untouched, and that err may be NULL or tiny. */
static void expect_bad(const char *label, const uint8_t *img, size_t len, bool allow_any,
                       tdm_status_t status, const char *must_contain)
{
    /* A private copy, so ASan sees reads past the end. */
    uint8_t *copy = malloc(len ? len : 1);
    memcpy(copy, img, len);
    char err[512];
    memset(err, 0, sizeof(err));
    tdm_gguf_t *sentinel = (tdm_gguf_t *)&n_fail, *g = sentinel;
    tdm_status_t st = tdm_gguf_open_memory(copy, len, allow_any, err, sizeof(err), &g);
    CHECK(st != TDM_OK, "%s: accepted", label);
    if (st == TDM_OK) {
        tdm_gguf_close(g);
        free(copy);
        return;
    }
    if (status != TDM_OK)
        CHECK(st == status, "%s: status %s, expected %s (%s)", label, tdm_status_str(st),
              tdm_status_str(status), err);
    CHECK(g == sentinel, "%s: output argument written", label);
    CHECK(err[0] != '\0', "%s: empty message", label);
    CHECK(strstr(err, "byte") != NULL, "%s: message without a byte offset: %s", label, err);
    CHECK(strchr(err, '\n') == NULL, "%s: message not one line: %s", label, err);
    if (must_contain != NULL)
        CHECK(strstr(err, must_contain) != NULL, "%s: message lacks '%s': %s", label, must_contain,
              err);
    CHECK(tdm_gguf_open_memory(copy, len, allow_any, NULL, 0, &g) == st && g == sentinel,
          "%s: NULL err", label);
    char tiny[6] = "xxxxx";
    CHECK(tdm_gguf_open_memory(copy, len, allow_any, tiny, sizeof(tiny), &g) == st &&
              strlen(tiny) < sizeof(tiny),
          "%s: small err buffer", label);
    printf("  ok %-28s %s\n", label, err);
    /* For the command-line test (test_bad_models.sh): keep each refused file. */
    const char *dir = getenv("TANDEM_TEST_GGUF_BAD_DIR");
    if (dir != NULL && !allow_any) {
        char path[512];
        int n = snprintf(path, sizeof(path), "%s/", dir);
        for (const char *c = label; *c != '\0' && n < (int)sizeof(path) - 6; c++)
            path[n++] = (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') ? *c : '_';
        snprintf(path + n, sizeof(path) - (size_t)n, ".gguf");
        FILE *f = fopen(path, "wb");
        if (f != NULL) {
            fwrite(copy, 1, len, f);
            fclose(f);
        }
    }
    free(copy);
}

/* A fresh copy of the reference image to corrupt. */
static uint8_t *dup_img(const layout_t *l)
{
    uint8_t *p = malloc(l->len);
    memcpy(p, l->img, l->len);
    return p;
}

static void test_broken(void)
{
    tdm_gguf_writer_t *w = make_writer(32);
    layout_t l = {0};
    void *mem = NULL;
    CHECK(w != NULL && tdm_gguf_writer_write_memory(w, &mem, &l.len) == TDM_OK, "reference");
    tdm_gguf_writer_destroy(w);
    if (mem == NULL)
        return;
    l.img = mem;
    tdm_gguf_t *g = NULL;
    char err[512] = "";
    if (tdm_gguf_open_memory(l.img, l.len, false, err, sizeof(err), &g) != TDM_OK) {
        CHECK(0, "reference does not open: %s", err);
        free(l.img);
        return;
    }
    l.data_offset = tdm_gguf_data_offset(g);
    for (uint64_t i = 0; i < tdm_gguf_n_kv(g) && i < 16; i++) {
        const tdm_gguf_kv_t *kv = tdm_gguf_kv(g, i);
        l.kv_at[i] = kv->file_offset;
        l.kv_val[i] = kv->file_offset + 8 + kv->key.len;
    }
    for (int i = 0; i < N_TENSORS; i++) {
        const tdm_gguf_tensor_t *t = tdm_gguf_tensor(g, (uint64_t)i);
        l.t_at[i] = t->info_offset;
        l.t_ndims[i] = t->info_offset + 8 + t->name.len;
        l.t_ne[i] = l.t_ndims[i] + 4;
        l.t_type[i] = l.t_ne[i] + 8 * t->n_dims;
        l.t_off[i] = l.t_type[i] + 4;
        uint64_t end = l.data_offset + t->offset + t->nbytes;
        l.t_data_end = end > l.t_data_end ? end : l.t_data_end;
    }
    int k_name = kv_index(&l, "general.name", g);
    int k_align = kv_index(&l, "general.alignment", g);
    int k_u64 = kv_index(&l, "test.u64", g);
    int k_bool = kv_index(&l, "test.bool", g);
    int k_tokens = kv_index(&l, "tokenizer.ggml.tokens", g);
    int k_arr = kv_index(&l, "test.arr_i32", g);
    uint64_t t0_offset = tdm_gguf_tensor(g, 0)->offset;
    uint64_t t1_offset = tdm_gguf_tensor(g, 1)->offset;
    tdm_gguf_close(g);
    CHECK(k_name >= 0 && k_align >= 0 && k_u64 >= 0 && k_bool >= 0 && k_tokens >= 0 && k_arr >= 0,
          "kv positions");
    if (n_fail > 0) {
        free(l.img);
        return;
    }

    uint8_t *b;
#define CASE(label, len, allow, status, contains)                                                  \
    do {                                                                                           \
        expect_bad(label, b, len, allow, status, contains);                                        \
        free(b);                                                                                   \
    } while (0)

    /* Truncations. */
    b = dup_img(&l);
    CASE("empty file", 0, false, TDM_ERR_FORMAT, "magic");
    b = dup_img(&l);
    CASE("truncated header", 10, false, TDM_ERR_FORMAT, "truncated");
    b = dup_img(&l);
    CASE("truncated counts", 20, false, TDM_ERR_FORMAT, "kv count");
    /* Cuts early in the kvs fail the count bound; cuts in the last kv pass
     * it and fail inside the kv. */
    b = dup_img(&l);
    CASE("truncated in early kv", l.kv_at[1] + 10, false, TDM_ERR_FORMAT, "kv count");
    b = dup_img(&l);
    CASE("truncated in last kv key", l.kv_at[13] + 10, false, TDM_ERR_FORMAT, "kv #13");
    b = dup_img(&l);
    CASE("truncated in last kv value", l.kv_val[13] + 6, false, TDM_ERR_FORMAT, "test.arr_empty");
    b = dup_img(&l);
    CASE("truncated in string array", l.kv_val[k_tokens] + 30, false, TDM_ERR_FORMAT, NULL);
    b = dup_img(&l);
    CASE("truncated in early tensor info", l.t_ne[2] + 3, false, TDM_ERR_FORMAT, NULL);
    b = dup_img(&l);
    CASE("truncated in last tensor info", l.t_ne[4] + 3, false, TDM_ERR_FORMAT, "w_q80");
    b = dup_img(&l);
    CASE("truncated before data", l.t_off[4] + 8 + 1, false, TDM_ERR_FORMAT, NULL);
    b = dup_img(&l);
    CASE("truncated in data", l.t_data_end - 1, false, TDM_ERR_FORMAT, "past the end");

    /* Header. */
    b = dup_img(&l);
    b[0] = 'X';
    CASE("bad magic", l.len, false, TDM_ERR_FORMAT, "magic");
    for (uint32_t v = 1; v <= 4; v++) {
        if (v == 3)
            continue;
        char label[32];
        snprintf(label, sizeof(label), "version %u", v);
        b = dup_img(&l);
        put_le(b, 4, v, 4);
        CASE(label, l.len, false, TDM_ERR_FORMAT, "version");
    }
    b = dup_img(&l);
    put_le(b, 4, 0x03000000u, 4);
    CASE("big-endian version", l.len, false, TDM_ERR_FORMAT, "big-endian");
    b = dup_img(&l);
    put_le(b, 8, UINT64_MAX, 8);
    CASE("huge tensor count", l.len, false, TDM_ERR_FORMAT, "tensor count");
    b = dup_img(&l);
    put_le(b, 8, 1ull << 32, 8);
    CASE("large tensor count", l.len, false, TDM_ERR_FORMAT, "tensor count");
    b = dup_img(&l);
    put_le(b, 16, UINT64_MAX, 8);
    CASE("huge kv count", l.len, false, TDM_ERR_FORMAT, "kv count");
    b = dup_img(&l);
    put_le(b, 16, 15, 8); /* one more kv than there is: reads a tensor info as a kv */
    CASE("kv count one too many", l.len, false, TDM_ERR_FORMAT, NULL);

    /* KVs. */
    b = dup_img(&l);
    put_le(b, l.kv_at[0], UINT64_MAX, 8);
    CASE("huge key length", l.len, false, TDM_ERR_FORMAT, "exceeds");
    b = dup_img(&l);
    put_le(b, l.kv_at[0], 0, 8);
    CASE("empty key", l.len, false, TDM_ERR_FORMAT, "empty key");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_name] + 4, UINT64_MAX, 8);
    CASE("huge string length", l.len, false, TDM_ERR_FORMAT, "general.name");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_name] + 4, l.len - (l.kv_val[k_name] + 12) + 1, 8);
    CASE("string past EOF", l.len, false, TDM_ERR_FORMAT, "exceeds");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_arr] + 4, 9, 4);
    CASE("array of arrays", l.len, false, TDM_ERR_FORMAT, "array of arrays");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_arr] + 4, 77, 4);
    CASE("unknown array element type", l.len, false, TDM_ERR_FORMAT, "element type");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_arr] + 8, UINT64_MAX / 2, 8);
    CASE("huge numeric array", l.len, false, TDM_ERR_FORMAT, "test.arr_i32");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_tokens] + 8, UINT64_MAX, 8);
    CASE("huge string array", l.len, false, TDM_ERR_FORMAT, "strings");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_u64], 13, 4);
    CASE("unknown kv type 13", l.len, false, TDM_ERR_FORMAT, "unknown value type");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_u64], UINT32_MAX, 4);
    CASE("unknown kv type 2^32-1", l.len, false, TDM_ERR_FORMAT, "unknown value type");
    b = dup_img(&l);
    b[l.kv_val[k_bool] + 4] = 2;
    CASE("bool value 2", l.len, false, TDM_ERR_FORMAT, "bool");
    b = dup_img(&l);
    memcpy(b + l.kv_at[k_u64] + 8, "test.u32", 8); /* same length as test.u64 */
    CASE("duplicate key", l.len, false, TDM_ERR_FORMAT, "duplicate key");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_align] + 4, 48, 4);
    CASE("alignment 48", l.len, false, TDM_ERR_FORMAT, "power of two");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_align] + 4, 0, 4);
    CASE("alignment 0", l.len, false, TDM_ERR_FORMAT, "power of two");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_align], TDM_GGUF_TYPE_INT32, 4);
    CASE("alignment of type i32", l.len, false, TDM_ERR_FORMAT, "alignment");
    b = dup_img(&l);
    put_le(b, l.kv_val[k_align] + 4, 64, 4); /* valid, but the offsets are not multiples of 64 */
    CASE("alignment 64, offsets of 32", l.len, false, TDM_ERR_FORMAT, "alignment");

    /* Tensor infos. */
    b = dup_img(&l);
    put_le(b, l.t_ndims[0], 0, 4);
    CASE("n_dims 0", l.len, false, TDM_ERR_FORMAT, "n_dims");
    b = dup_img(&l);
    put_le(b, l.t_ndims[0], 5, 4);
    CASE("n_dims 5", l.len, false, TDM_ERR_FORMAT, "n_dims");
    b = dup_img(&l);
    put_le(b, l.t_ne[0] + 8, 0, 8);
    CASE("dim of 0", l.len, false, TDM_ERR_FORMAT, "ne[1]");
    b = dup_img(&l);
    put_le(b, l.t_ne[0], 1ull << 32, 8);
    put_le(b, l.t_ne[0] + 8, 1ull << 32, 8);
    CASE("dims product overflow", l.len, false, TDM_ERR_FORMAT, "overflow");
    b = dup_img(&l);
    put_le(b, l.t_ne[4], 96, 8); /* 4 dims of Q8_0: 96 * 2^20 * 2^20 * 2^20 > 2^63 */
    put_le(b, l.t_ne[4] + 8, 1ull << 20, 8);
    put_le(b, l.t_ne[4] + 16, 1ull << 20, 8);
    put_le(b, l.t_ne[4] + 24, 1ull << 20, 8);
    CASE("4-dim product overflow", l.len, false, TDM_ERR_FORMAT, "overflow");
    b = dup_img(&l);
    put_le(b, l.t_ne[4], 33, 8);
    CASE("row not a block multiple", l.len, false, TDM_ERR_FORMAT, "block");
    b = dup_img(&l);
    put_le(b, l.t_type[2], 99, 4);
    CASE("unknown tensor type 99", l.len, false, TDM_ERR_FORMAT, "type id 99");
    b = dup_img(&l);
    put_le(b, l.t_type[2], 99, 4);
    CASE("type 99, any type allowed", l.len, true, TDM_ERR_FORMAT, "type id 99");
    b = dup_img(&l);
    /* 16 is IQ2_XXS, a GGML type tandem does not compute. */
    put_le(b, l.t_type[2], 16, 4);
    CASE("unsupported type IQ2_XXS", l.len, false, TDM_ERR_UNSUPPORTED, "tensor 'w_q40'");
    b = dup_img(&l);
    put_le(b, l.t_type[2], 16, 4);
    expect_bad("IQ2_XXS names the type", b, l.len, false, TDM_ERR_UNSUPPORTED, "IQ2_XXS");
    {
        /* With allow_any_type the same file opens; the tensor has no data. */
        g = NULL;
        tdm_status_t st = tdm_gguf_open_memory(b, l.len, true, err, sizeof(err), &g);
        CHECK(st == TDM_OK, "IQ2_XXS with allow_any_type: %s", err);
        if (st == TDM_OK) {
            const tdm_gguf_tensor_t *t = tdm_gguf_find_tensor(g, "w_q40");
            CHECK(t != NULL && t->type == 16 && t->nbytes == 0 && t->data == NULL,
                  "unknown-size tensor");
            tdm_gguf_close(g);
        }
        free(b);
    }
    b = dup_img(&l);
    put_le(b, l.t_off[3], 1ull << 40, 8);
    CASE("offset past EOF", l.len, false, TDM_ERR_FORMAT, "past the end");
    b = dup_img(&l);
    put_le(b, l.t_off[3], UINT64_MAX - 31, 8);
    CASE("offset near 2^64", l.len, false, TDM_ERR_FORMAT, "past the end");
    b = dup_img(&l);
    put_le(b, l.t_off[1], t1_offset + 4, 8);
    CASE("misaligned offset", l.len, false, TDM_ERR_FORMAT, "alignment");
    b = dup_img(&l);
    put_le(b, l.t_off[1], t0_offset, 8);
    CASE("overlapping tensors", l.len, false, TDM_ERR_FORMAT, "overlaps");
    b = dup_img(&l);
    put_le(b, l.t_off[0], t1_offset, 8); /* f32 [8,3] (96 bytes) over f16 at the next slot */
    put_le(b, l.t_off[1], t0_offset, 8);
    CASE("swapped, overlapping", l.len, false, TDM_ERR_FORMAT, "overlaps");
    b = dup_img(&l);
    memcpy(b + l.t_at[1] + 8, "w_f32", 5);
    CASE("duplicate tensor name", l.len, false, TDM_ERR_FORMAT, "duplicate name");
    b = dup_img(&l);
    put_le(b, l.t_at[1], 0, 8);
    CASE("empty tensor name", l.len, false, TDM_ERR_FORMAT, "empty name");
    b = dup_img(&l);
    put_le(b, l.t_ne[4] + 24, 1000, 8);
    CASE("tensor data past EOF", l.len, false, TDM_ERR_FORMAT, "past the end");
    b = dup_img(&l);
    put_le(b, l.t_at[4], UINT64_MAX - 3, 8);
    CASE("huge tensor name length", l.len, false, TDM_ERR_FORMAT, "exceeds");

    /* Every prefix of the file: either refused with a message or (cutting
     * only the final padding) accepted; never a crash. */
    int prefix_ok = 1;
    for (size_t n = 0; n < l.len; n++) {
        uint8_t *copy = malloc(n ? n : 1);
        memcpy(copy, l.img, n);
        g = NULL;
        err[0] = '\0';
        tdm_status_t st = tdm_gguf_open_memory(copy, n, false, err, sizeof(err), &g);
        if (st == TDM_OK) {
            prefix_ok &= n >= l.t_data_end;
            tdm_gguf_close(g);
        } else {
            prefix_ok &= n < l.t_data_end && strstr(err, "byte") != NULL;
        }
        free(copy);
    }
    CHECK(prefix_ok, "prefixes: every cut before the data end refused with a byte offset");

    /* Every byte set to 0xff, 0x00 and 0x80 in turn: no crash, and a
     * refusal always carries a message. */
    int flip_ok = 1;
    static const uint8_t vals[] = {0xff, 0x00, 0x80, 0x01};
    for (size_t pos = 0; pos < l.data_offset; pos++) {
        for (size_t k = 0; k < sizeof(vals); k++) {
            uint8_t *copy = dup_img(&l);
            copy[pos] = vals[k];
            g = NULL;
            err[0] = '\0';
            tdm_status_t st = tdm_gguf_open_memory(copy, l.len, true, err, sizeof(err), &g);
            if (st == TDM_OK)
                tdm_gguf_close(g);
            else
                flip_ok &= err[0] != '\0';
            free(copy);
        }
    }
    CHECK(flip_ok, "byte flips");
#undef CASE
    free(l.img);
}

/* ---- split models ---- */

#define SPLIT_T 6 /* tensors of the split test model */

/* The split test model: SPLIT_T tensors alternating F32 [256, 4] (4096
 * bytes) and Q8_0 [256, 4] (1088 bytes), named prefix.N in order, or in
 * reverse order when reverse; data from a fixed seed. */
static tdm_gguf_writer_t *make_split_writer(const char *prefix, int n, int reverse, uint64_t seed)
{
    tdm_gguf_writer_t *w;
    if (tdm_gguf_writer_create(&w) != TDM_OK)
        return NULL;
    int ok = 1;
    ok &= tdm_gguf_writer_set_str(w, "general.architecture", "llama") == TDM_OK;
    ok &= tdm_gguf_writer_set_str(w, "general.name", prefix) == TDM_OK;
    ok &= tdm_gguf_writer_set_u32(w, "llama.block_count", 2) == TDM_OK;
    ok &= tdm_gguf_writer_set_f32(w, "llama.rope.freq_base", 10000.0f) == TDM_OK;
    ok &= tdm_gguf_writer_set_bool(w, "test.bool", true) == TDM_OK;
    ok &= tdm_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", tokens, 5) == TDM_OK;
    ok &= tdm_gguf_writer_set_array(w, "test.arr_i32", TDM_GGUF_TYPE_INT32, arr_i32, 3) == TDM_OK;
    float f[1024];
    uint8_t q[1088];
    for (int i = 0; i < n && ok; i++) {
        for (int j = 0; j < 1024; j++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            f[j] = (float)((int64_t)(seed >> 40) - (1 << 23)) / (float)(1 << 22);
        }
        char name[32];
        snprintf(name, sizeof(name), "%s.%d", prefix, reverse ? n - 1 - i : i);
        uint64_t ne[2] = {256, 4};
        if (i % 2 == 0) {
            ok &= tdm_gguf_writer_add_tensor(w, name, 2, ne, TDM_DTYPE_F32, f) == TDM_OK;
        } else {
            tdm_dtype_from_f32(TDM_DTYPE_Q8_0, f, q, 1024);
            ok &= tdm_gguf_writer_add_tensor(w, name, 2, ne, TDM_DTYPE_Q8_0, q) == TDM_OK;
        }
    }
    if (!ok) {
        tdm_gguf_writer_destroy(w);
        return NULL;
    }
    return w;
}

/* Whether two kvs have the same key, type and value. */
static int kv_same(const tdm_gguf_kv_t *a, const tdm_gguf_kv_t *b)
{
    if (a->key.len != b->key.len || memcmp(a->key.ptr, b->key.ptr, a->key.len) != 0 ||
        a->type != b->type)
        return 0;
    if (a->type == TDM_GGUF_TYPE_STRING)
        return a->strs[0].len == b->strs[0].len &&
               memcmp(a->strs[0].ptr, b->strs[0].ptr, a->strs[0].len) == 0;
    if (a->type != TDM_GGUF_TYPE_ARRAY)
        return memcmp(a->data, b->data, tdm_gguf_type_size(a->type)) == 0;
    if (a->arr_type != b->arr_type || a->arr_len != b->arr_len)
        return 0;
    if (a->arr_type != TDM_GGUF_TYPE_STRING)
        return memcmp(a->data, b->data, a->arr_len * tdm_gguf_type_size(a->arr_type)) == 0;
    for (uint64_t i = 0; i < a->arr_len; i++)
        if (a->strs[i].len != b->strs[i].len ||
            memcmp(a->strs[i].ptr, b->strs[i].ptr, a->strs[i].len) != 0)
            return 0;
    return 1;
}

/* The whole model and its split must be the same model. */
static void check_split_equal(const tdm_gguf_t *gw, const tdm_gguf_t *gs)
{
    CHECK(tdm_gguf_n_shards(gw) == 1 && tdm_gguf_n_shards(gs) == 3, "shards %" PRIu32,
          tdm_gguf_n_shards(gs));
    CHECK(tdm_gguf_n_tensors(gs) == tdm_gguf_n_tensors(gw) && tdm_gguf_n_tensors(gs) == SPLIT_T,
          "split tensors %" PRIu64, tdm_gguf_n_tensors(gs));
    for (uint64_t i = 0; i < tdm_gguf_n_tensors(gw) && i < tdm_gguf_n_tensors(gs); i++) {
        const tdm_gguf_tensor_t *a = tdm_gguf_tensor(gw, i), *b = tdm_gguf_tensor(gs, i);
        CHECK(a->name.len == b->name.len && memcmp(a->name.ptr, b->name.ptr, a->name.len) == 0 &&
                  a->type == b->type && a->n_dims == b->n_dims &&
                  memcmp(a->ne, b->ne, sizeof(a->ne)) == 0 && a->nbytes == b->nbytes &&
                  memcmp(a->data, b->data, (size_t)a->nbytes) == 0,
              "tensor %" PRIu64 " equal", i);
        /* Two tensors a shard at this size, each in its own shard's map. */
        size_t len = 0;
        uint64_t doff = 0;
        const uint8_t *base = tdm_gguf_shard_data(gs, b->shard, &len, &doff);
        CHECK(a->shard == 0 && b->shard == i / 2 && base != NULL &&
                  (const uint8_t *)b->data == base + doff + b->offset &&
                  doff + b->offset + b->nbytes <= len,
              "tensor %" PRIu64 " in shard %" PRIu32, i, b->shard);
        char name[32];
        snprintf(name, sizeof(name), "%.*s", (int)b->name.len, b->name.ptr);
        CHECK(tdm_gguf_find_tensor(gs, name) == b, "find %s", name);
    }
    CHECK(tdm_gguf_find_tensor(gs, "a.6") == NULL, "no such tensor");
    CHECK(tdm_gguf_shard_data(gs, 3, NULL, NULL) == NULL, "shard out of range");

    /* Metadata: the same kvs, in the same order, then the split.* ones
     * (split.no, split.count, split.tensors.count, split.tandem_id). */
    CHECK(tdm_gguf_n_kv(gs) == tdm_gguf_n_kv(gw) + 4, "split kvs %" PRIu64, tdm_gguf_n_kv(gs));
    for (uint64_t i = 0; i < tdm_gguf_n_kv(gw); i++)
        CHECK(kv_same(tdm_gguf_kv(gw, i), tdm_gguf_kv(gs, i)), "kv %" PRIu64 " equal", i);
    const tdm_gguf_kv_t *kv = tdm_gguf_find_kv(gs, "split.no");
    uint64_t u = 99;
    CHECK(kv != NULL && kv->type == TDM_GGUF_TYPE_UINT16 && tdm_gguf_get_u64(gs, "split.no", &u) &&
              u == 0,
          "split.no");
    kv = tdm_gguf_find_kv(gs, "split.count");
    CHECK(kv != NULL && kv->type == TDM_GGUF_TYPE_UINT16 &&
              tdm_gguf_get_u64(gs, "split.count", &u) && u == 3,
          "split.count");
    kv = tdm_gguf_find_kv(gs, "split.tensors.count");
    CHECK(kv != NULL && kv->type == TDM_GGUF_TYPE_INT32 &&
              tdm_gguf_get_u64(gs, "split.tensors.count", &u) && u == SPLIT_T,
          "split.tensors.count");
    tdm_str_t s;
    CHECK(tdm_gguf_get_str(gs, "general.name", &s) && str_eq(s, "a"), "general.name");

    /* file_data of a split: every shard's bytes before its data section. */
    size_t flen = 0, sum = 0;
    const uint8_t *file = tdm_gguf_file_data(gs, &flen);
    int same = file != NULL;
    for (uint32_t k = 0; k < 3 && same; k++) {
        size_t len;
        uint64_t doff;
        const void *base = tdm_gguf_shard_data(gs, k, &len, &doff);
        same = base != NULL && sum + doff <= flen && memcmp(file + sum, base, (size_t)doff) == 0;
        sum += (size_t)doff;
    }
    CHECK(same && flen == sum && tdm_gguf_data_offset(gs) == sum, "split file_data (%zu bytes)",
          flen);
}

/* Opens path (which must fail with status) and checks the message holds
 * each of the NULL-terminated strings. */
static void expect_split_bad(const char *label, const char *path, tdm_status_t status, ...)
{
    char err[1024] = "";
    tdm_gguf_t *g = (tdm_gguf_t *)&n_pass; /* sentinel: must stay untouched */
    tdm_status_t st = tdm_gguf_open(path, false, err, sizeof(err), &g);
    CHECK(st == status, "%s: status %s, expected %s (%s)", label, tdm_status_str(st),
          tdm_status_str(status), err);
    CHECK(g == (tdm_gguf_t *)&n_pass, "%s: *out untouched", label);
    if (st == TDM_OK && g != (tdm_gguf_t *)&n_pass)
        tdm_gguf_close(g);
    va_list ap;
    va_start(ap, status);
    for (const char *want = va_arg(ap, const char *); want != NULL; want = va_arg(ap, const char *))
        CHECK(strstr(err, want) != NULL, "%s: message '%s' lacks '%s'", label, err, want);
    va_end(ap);
    printf("  ok %-28s %s\n", label, err);
}

static int copy_file(const char *from, const char *to)
{
    FILE *in = fopen(from, "rb"), *out = in ? fopen(to, "wb") : NULL;
    int ok = in != NULL && out != NULL;
    char buf[4096];
    size_t n;
    while (ok && (n = fread(buf, 1, sizeof(buf), in)) > 0)
        ok = fwrite(buf, 1, n, out) == n;
    if (in != NULL)
        fclose(in);
    if (out != NULL && fclose(out) != 0)
        ok = 0;
    return ok;
}

/* Removes every file in dir (flat), then dir. */
static void remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (d != NULL) {
        struct dirent *e;
        char p[512];
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    CHECK(rmdir(dir) == 0, "rmdir %s", dir);
}

/* Puts a NaN (k = 0) or an infinity (k = 1) into the first f16 scale of
 * the block at p (or its first element, for BF16). */
static void f16_or_bf16_poison(uint32_t type, uint8_t *p, int k)
{
    size_t off = 0;
    switch (type) {
    case TDM_DTYPE_Q2_K: off = 80; break;
    case TDM_DTYPE_Q3_K: off = 108; break;
    case TDM_DTYPE_Q6_K: off = 208; break;
    default: off = 0; break;
    }
    if (type == TDM_DTYPE_BF16) {
        p[0] = k ? 0x00 : 0xc0, p[1] = 0x7f; /* bf16 0x7fc0 NaN, 0x7f80 inf */
        if (k)
            p[0] = 0x80;
        return;
    }
    p[off] = k ? 0x00 : 0x00, p[off + 1] = k ? 0x7c : 0x7e; /* f16 0x7e00 NaN, 0x7c00 inf */
}

/* Every quantized type tandem computes with: a file of two rows of 256
 * (valid blocks: random codes, finite scales) opens; the same file cut
 * short, with a row length that is not a multiple of the type's block,
 * or with a NaN or infinite scale is refused with the field and the byte
 * offset (the scale check is tdm_dtype_validate, which the model loader
 * runs on every tensor). */
static void test_quant_types_bad(void)
{
    static const uint32_t types[] = {TDM_DTYPE_Q5_0, TDM_DTYPE_Q5_1, TDM_DTYPE_IQ4_NL,
                                     TDM_DTYPE_Q2_K, TDM_DTYPE_Q3_K, TDM_DTYPE_Q4_K,
                                     TDM_DTYPE_Q5_K, TDM_DTYPE_Q6_K, TDM_DTYPE_IQ4_XS,
                                     TDM_DTYPE_BF16, TDM_DTYPE_Q4_0, TDM_DTYPE_Q8_0};
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        const uint32_t type = types[ti];
        const char *tn = tdm_dtype_name(type);
        const uint64_t ne[2] = {256, 2};
        const size_t rb = tdm_dtype_row_bytes(type, 256);
        uint8_t *rows = malloc(2 * rb);
        uint64_t st = 0x9e37 + type;
        for (size_t i = 0; i < 2 * rb; i++) {
            st = st * 6364136223846793005ull + 1442695040888963407ull;
            rows[i] = (uint8_t)(st >> 56);
        }
        /* finite scales: the f16 fields tdm_dtype_validate knows */
        uint64_t bad_at;
        char what[128];
        for (int guard = 0;
             guard < 64 && tdm_dtype_validate(type, rows, 2 * rb, &bad_at, what, sizeof(what));
             guard++)
            rows[bad_at + (type == TDM_DTYPE_BF16 ? 1 : 1)] &= 0x3b; /* clear exponent bits */
        CHECK(!tdm_dtype_validate(type, rows, 2 * rb, &bad_at, what, sizeof(what)),
              "%s: could not make valid blocks (%s)", tn, what);
        tdm_gguf_writer_t *w = NULL;
        tdm_gguf_writer_create(&w);
        tdm_gguf_writer_set_str(w, "general.architecture", "llama");
        CHECK(tdm_gguf_writer_add_tensor(w, "w", 2, ne, type, rows) == TDM_OK, "%s: add", tn);
        void *mem = NULL;
        size_t len = 0;
        CHECK(tdm_gguf_writer_write_memory(w, &mem, &len) == TDM_OK, "%s: write", tn);
        tdm_gguf_writer_destroy(w);
        tdm_gguf_t *g = NULL;
        char err[512] = "";
        CHECK(tdm_gguf_open_memory(mem, len, false, err, sizeof(err), &g) == TDM_OK,
              "%s: a valid file is refused: %s", tn, err);
        const tdm_gguf_tensor_t *t = g != NULL ? tdm_gguf_tensor(g, 0) : NULL;
        if (t == NULL) {
            free(mem);
            free(rows);
            continue;
        }
        const uint64_t data_at = tdm_gguf_data_offset(g) + t->offset;
        const uint64_t ne_at = t->info_offset + 8 + t->name.len + 4;
        tdm_gguf_close(g);
        char label[64];
        /* short data: the last block cut off */
        snprintf(label, sizeof(label), "%s short data", tn);
        expect_bad(label, mem, (size_t)(data_at + 2 * rb - 1), false, TDM_ERR_FORMAT, "data");
        /* a row length that is not a multiple of the block */
        uint8_t *img = malloc(len);
        memcpy(img, mem, len);
        const uint64_t odd = tdm_dtype_block_elems(type) > 1 ? 256 + 16 : 257;
        for (int i = 0; i < 8; i++)
            img[ne_at + (uint64_t)i] = (uint8_t)(odd >> (8 * i));
        snprintf(label, sizeof(label), "%s misaligned row", tn);
        if (type == TDM_DTYPE_BF16) /* any length is whole elements: the data no longer fits */
            expect_bad(label, img, len, false, TDM_ERR_FORMAT, "data");
        else
            expect_bad(label, img, len, false, TDM_ERR_FORMAT, "not a multiple");
        free(img);
        /* a NaN (then infinite) scale or element in the second row */
        for (int k = 0; k < 2; k++) {
            img = malloc(len);
            memcpy(img, mem, len);
            uint8_t *d = img + data_at;
            f16_or_bf16_poison(type, d + rb, k);
            uint64_t at = 0;
            int r = tdm_dtype_validate(type, d, 2 * rb, &at, what, sizeof(what));
            CHECK(r == 1 && at >= rb && at < rb + tdm_dtype_block_bytes(type) + 2,
                  "%s: a %s scale is not found (%d, byte %" PRIu64 ")", tn, k ? "infinite" : "NaN",
                  r, at);
            if (k == 0)
                printf("  ok %-28s %s at byte %" PRIu64 " of the data\n", tn, what, at);
            free(img);
        }
        free(mem);
        free(rows);
    }
}

static void test_split(void)
{
    char dir[] = "/tmp/tandem-test-split-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    tdm_gguf_writer_t *w = make_split_writer("a", SPLIT_T, 0, 7);
    CHECK(w != NULL, "split writer");
    if (w == NULL) {
        remove_dir(dir);
        return;
    }
    char whole[256], prefix[64], sh[3][128], other[256];
    snprintf(whole, sizeof(whole), "%s/whole.gguf", dir);
    snprintf(prefix, sizeof(prefix), "%s/a", dir);
    for (int k = 0; k < 3; k++)
        snprintf(sh[k], sizeof(sh[k]), "%s-%05d-of-00003.gguf", prefix, k + 1);
    CHECK(tdm_gguf_writer_write(w, whole) == TDM_OK, "write whole");
    /* Two tensors (5184 bytes of data) and a header fit in 6000 bytes,
     * three do not: 3 shards. */
    const uint64_t max_bytes = 6000;
    char err[1024] = "";
    int n = 0;
    tdm_status_t st = tdm_gguf_writer_write_split(w, prefix, max_bytes, &n, err, sizeof(err));
    CHECK(st == TDM_OK && n == 3, "write split: %s, %d shards (%s)", tdm_status_str(st), n, err);
    for (int k = 0; k < 3; k++) {
        struct stat sb;
        CHECK(stat(sh[k], &sb) == 0 && (uint64_t)sb.st_size <= max_bytes, "%s: %lld bytes", sh[k],
              (long long)sb.st_size);
    }

    tdm_gguf_t *gw = NULL, *gs = NULL;
    st = tdm_gguf_open(whole, false, err, sizeof(err), &gw);
    CHECK(st == TDM_OK, "open whole: %s", err);
    tdm_status_t st2 = tdm_gguf_open(sh[0], false, err, sizeof(err), &gs);
    CHECK(st2 == TDM_OK, "open split: %s", err);
    if (st == TDM_OK && st2 == TDM_OK)
        check_split_equal(gw, gs);
    tdm_gguf_close(gw);
    tdm_gguf_close(gs);

    /* A later shard alone: refused by path, a model of its own in memory. */
    snprintf(other, sizeof(other), "a-00001-of-00003.gguf");
    expect_split_bad("open shard 2", sh[1], TDM_ERR_FORMAT, "shard 2 of 3", "open the first shard",
                     other, (const char *)NULL);
    {
        FILE *f = fopen(sh[1], "rb");
        uint8_t *buf = malloc(8192);
        size_t len = f != NULL && buf != NULL ? fread(buf, 1, 8192, f) : 0;
        if (f != NULL)
            fclose(f);
        tdm_gguf_t *g = NULL;
        st = tdm_gguf_open_memory(buf, len, false, err, sizeof(err), &g);
        CHECK(st == TDM_OK && tdm_gguf_n_shards(g) == 1 && tdm_gguf_n_tensors(g) == 2 &&
                  str_eq(tdm_gguf_tensor(g, 0)->name, "a.2"),
              "shard 2 in memory: %s", err);
        tdm_gguf_close(g);
        free(buf);
    }

    /* A missing shard. */
    CHECK(unlink(sh[1]) == 0, "unlink");
    expect_split_bad("missing shard", sh[0], TDM_ERR_IO, "shard 2 of 3", "a-00002-of-00003.gguf",
                     "is missing", (const char *)NULL);
    CHECK(tdm_gguf_writer_write_split(w, prefix, max_bytes, &n, err, sizeof(err)) == TDM_OK,
          "rewrite: %s", err);

    /* A truncated shard: the message names the shard and the offset. */
    {
        struct stat sb;
        CHECK(stat(sh[1], &sb) == 0 && truncate(sh[1], sb.st_size - 100) == 0, "truncate");
        expect_split_bad("truncated shard", sh[0], TDM_ERR_FORMAT, "shard 2 of 3",
                         "a-00002-of-00003.gguf", "runs past the end", "data offset",
                         (const char *)NULL);
        CHECK(tdm_gguf_writer_write_split(w, prefix, max_bytes, &n, err, sizeof(err)) == TDM_OK,
              "rewrite: %s", err);
    }

    /* Shard 3 of another model with another tensor count. */
    tdm_gguf_writer_t *wb = make_split_writer("b", 9, 0, 11);
    char pb[64];
    snprintf(pb, sizeof(pb), "%s/b", dir);
    CHECK(wb != NULL &&
              tdm_gguf_writer_write_split(wb, pb, 11000, &n, err, sizeof(err)) == TDM_OK && n == 3,
          "write b: %d shards (%s)", n, err);
    snprintf(other, sizeof(other), "%s/b-00003-of-00003.gguf", dir);
    CHECK(copy_file(other, sh[2]), "copy b's shard 3");
    expect_split_bad("shard of another model", sh[0], TDM_ERR_FORMAT, "shard 3 of 3",
                     "a-00003-of-00003.gguf", "split.tensors.count is 9", (const char *)NULL);
    tdm_gguf_writer_destroy(wb);

    /* Shard 3 of a model with the same counts: its tensor names repeat. */
    wb = make_split_writer("a", SPLIT_T, 1, 13);
    snprintf(pb, sizeof(pb), "%s/c", dir);
    CHECK(wb != NULL &&
              tdm_gguf_writer_write_split(wb, pb, max_bytes, &n, err, sizeof(err)) == TDM_OK &&
              n == 3,
          "write c: %d shards (%s)", n, err);
    snprintf(other, sizeof(other), "%s/c-00003-of-00003.gguf", dir);
    CHECK(copy_file(other, sh[2]), "copy c's shard 3");
    expect_split_bad("same counts, other model", sh[0], TDM_ERR_FORMAT, "shard 3 of 3",
                     "a-00003-of-00003.gguf", "shard of another model", "split.tandem_id",
                     (const char *)NULL);
    tdm_gguf_writer_destroy(wb);

    /* Shard 3 in the place of shard 2; a one-file model in the place of 3. */
    CHECK(tdm_gguf_writer_write_split(w, prefix, max_bytes, &n, err, sizeof(err)) == TDM_OK,
          "rewrite: %s", err);
    CHECK(copy_file(sh[2], sh[1]), "copy 3 over 2");
    expect_split_bad("shards swapped", sh[0], TDM_ERR_FORMAT, "shard 2 of 3",
                     "split.no is 2, expected 1", (const char *)NULL);
    CHECK(tdm_gguf_writer_write_split(w, prefix, max_bytes, &n, err, sizeof(err)) == TDM_OK,
          "rewrite: %s", err);
    CHECK(copy_file(whole, sh[2]), "copy whole over 3");
    expect_split_bad("one file as shard", sh[0], TDM_ERR_FORMAT, "shard 3 of 3", "has no split.no",
                     (const char *)NULL);

    /* The first shard under a name that disagrees, or follows no pattern. */
    snprintf(other, sizeof(other), "%s/d-00001-of-00004.gguf", dir);
    CHECK(copy_file(sh[0], other), "copy");
    expect_split_bad("name disagrees", other, TDM_ERR_FORMAT, "named as shard 1 of 4",
                     "split.count 3", (const char *)NULL);
    snprintf(other, sizeof(other), "%s/plain.gguf", dir);
    CHECK(copy_file(sh[0], other), "copy");
    expect_split_bad("unnamed first shard", other, TDM_ERR_FORMAT, "plain.gguf",
                     "-00001-of-00003.gguf", (const char *)NULL);
    snprintf(other, sizeof(other), "%s/e-00001-of-00002.gguf", dir);
    CHECK(copy_file(whole, other), "copy");
    expect_split_bad("one file named as shard", other, TDM_ERR_FORMAT, "named as shard 1 of 2",
                     "no split.count", (const char *)NULL);

    /* A limit below every tensor: one tensor a shard. */
    snprintf(pb, sizeof(pb), "%s/f", dir);
    st = tdm_gguf_writer_write_split(w, pb, 1, &n, err, sizeof(err));
    CHECK(st == TDM_OK && n == SPLIT_T, "limit 1: %d shards (%s)", n, err);
    snprintf(other, sizeof(other), "%s/f-00001-of-%05d.gguf", dir, SPLIT_T);
    gs = NULL;
    st = tdm_gguf_open(other, false, err, sizeof(err), &gs);
    CHECK(st == TDM_OK && tdm_gguf_n_shards(gs) == SPLIT_T && tdm_gguf_n_tensors(gs) == SPLIT_T &&
              tdm_gguf_tensor(gs, 5)->shard == 5,
          "open 6 shards: %s", err);
    tdm_gguf_close(gs);
    /* A limit that holds everything: one shard, a plain model. */
    snprintf(pb, sizeof(pb), "%s/g", dir);
    st = tdm_gguf_writer_write_split(w, pb, 1ull << 30, &n, err, sizeof(err));
    CHECK(st == TDM_OK && n == 1, "one shard: %d (%s)", n, err);
    snprintf(other, sizeof(other), "%s/g-00001-of-00001.gguf", dir);
    gs = NULL;
    st = tdm_gguf_open(other, false, err, sizeof(err), &gs);
    CHECK(st == TDM_OK && tdm_gguf_n_shards(gs) == 1 && tdm_gguf_n_tensors(gs) == SPLIT_T,
          "open one shard: %s", err);
    tdm_gguf_close(gs);
    err[0] = '\0';
    CHECK(tdm_gguf_writer_write_split(w, pb, 0, &n, err, sizeof(err)) == TDM_ERR_INVALID &&
              err[0] != '\0',
          "limit 0");

    tdm_gguf_writer_destroy(w);
    remove_dir(dir);
}

/* ---- the default model ---- */

static void test_default_model(void)
{
    const char *home = getenv("HOME");
    char path[1024];
    snprintf(path, sizeof(path), "%s/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf",
             home ? home : "");
    if (access(path, R_OK) != 0) {
        printf("default model not found at %s: skipped\n", path);
        return;
    }
    char err[512] = "";
    tdm_gguf_t *g = NULL;
    tdm_status_t st = tdm_gguf_open(path, false, err, sizeof(err), &g);
    CHECK(st == TDM_OK, "open %s: %s", path, err);
    if (st != TDM_OK)
        return;
    CHECK(tdm_gguf_n_tensors(g) == 272, "tensors: %" PRIu64, tdm_gguf_n_tensors(g));
    uint64_t u = 0;
    CHECK(tdm_gguf_get_u64(g, "llama.block_count", &u) && u == 30, "block_count %" PRIu64, u);
    CHECK(tdm_gguf_get_u64(g, "llama.context_length", &u) && u > 0, "context_length");
    tdm_str_t s;
    CHECK(tdm_gguf_get_str(g, "general.architecture", &s) && str_eq(s, "llama"), "arch");
    const tdm_str_t *toks;
    uint64_t n = 0;
    CHECK(tdm_gguf_get_str_array(g, "tokenizer.ggml.tokens", &toks, &n) && n == 49152,
          "vocabulary %" PRIu64, n);
    const tdm_gguf_tensor_t *t = tdm_gguf_find_tensor(g, "token_embd.weight");
    CHECK(t != NULL && t->type == TDM_DTYPE_Q8_0 && t->n_dims == 2 && t->ne[0] == 576 &&
              t->ne[1] == 49152 && t->nbytes == 49152ull * (576 / 32) * 34 && t->data != NULL,
          "token_embd.weight");
    uint64_t sum = 0;
    for (uint64_t i = 0; i < tdm_gguf_n_tensors(g); i++)
        sum += tdm_gguf_tensor(g, i)->nbytes;
    size_t len;
    tdm_gguf_file_data(g, &len);
    CHECK(sum <= len - tdm_gguf_data_offset(g), "tensor bytes fit in the data section");
    printf("default model: %" PRIu64 " tensors, %" PRIu64 " kvs, data at byte %" PRIu64 "\n",
           tdm_gguf_n_tensors(g), tdm_gguf_n_kv(g), tdm_gguf_data_offset(g));
    tdm_gguf_close(g);
}

int main(void)
{
    test_quant_types_bad();
    make_tensor_data();
    test_round_trip();
    test_broken();
    test_split();
    test_default_model();
    for (int i = 0; i < N_TENSORS; i++)
        free(tensor_data[i]);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
