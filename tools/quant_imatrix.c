/* Importance matrices as tandem quantize reads them (see quant_tool.h for
 * the file's layout; tandem imatrix writes it). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant_tool.h"
#include "tandem/dtype.h"

typedef struct imat_entry {
    char *name; /* the weight's name */
    uint64_t k;
    float *mean; /* [k] */
} imat_entry_t;

struct quant_imatrix {
    imat_entry_t *e;
    size_t n;
};

void quant_imatrix_free(quant_imatrix_t *im)
{
    if (im == NULL)
        return;
    for (size_t i = 0; i < im->n; i++) {
        free(im->e[i].name);
        free(im->e[i].mean);
    }
    free(im->e);
    free(im);
}

tdm_status_t quant_imatrix_load(const char *path, quant_imatrix_t **out, char *err, size_t err_len)
{
    tdm_gguf_t *g = NULL;
    tdm_status_t st = tdm_gguf_open(path, false, err, err_len, &g);
    if (st != TDM_OK)
        return st;
    quant_imatrix_t *im = calloc(1, sizeof(*im));
    const uint64_t nt = tdm_gguf_n_tensors(g);
    if (im == NULL || (im->e = calloc(nt ? nt : 1, sizeof(imat_entry_t))) == NULL) {
        free(im);
        tdm_gguf_close(g);
        snprintf(err, err_len, "out of memory");
        return TDM_ERR_NOMEM;
    }
    static const char sfx[] = ".in_sum2";
    const size_t ls = sizeof(sfx) - 1;
    st = TDM_OK;
    for (uint64_t i = 0; i < nt && st == TDM_OK; i++) {
        const tdm_gguf_tensor_t *t = tdm_gguf_tensor(g, i);
        if (t->name.len <= ls || memcmp(t->name.ptr + t->name.len - ls, sfx, ls) != 0)
            continue;
        const size_t bl = (size_t)t->name.len - ls;
        char cname[160];
        if (bl + 8 > sizeof(cname)) {
            snprintf(err, err_len, "tensor name of %zu bytes is too long", (size_t)t->name.len);
            st = TDM_ERR_FORMAT;
            break;
        }
        memcpy(cname, t->name.ptr, bl);
        memcpy(cname + bl, ".counts", 8);
        const tdm_gguf_tensor_t *c = tdm_gguf_find_tensor(g, cname);
        if (t->type != TDM_DTYPE_F32 || c == NULL || c->type != TDM_DTYPE_F32 || t->n_dims != 1) {
            snprintf(err, err_len, "'%.*s': expected a 1-D F32 tensor and an F32 '%s' beside it",
                     (int)t->name.len, t->name.ptr, cname);
            st = TDM_ERR_FORMAT;
            break;
        }
        float count;
        memcpy(&count, c->data, sizeof(count));
        imat_entry_t *e = &im->e[im->n];
        e->k = t->ne[0];
        e->name = malloc(bl + 1);
        e->mean = malloc(e->k * sizeof(float));
        if (e->name == NULL || e->mean == NULL) {
            free(e->name);
            free(e->mean);
            snprintf(err, err_len, "out of memory");
            st = TDM_ERR_NOMEM;
            break;
        }
        memcpy(e->name, t->name.ptr, bl);
        e->name[bl] = '\0';
        const float *sum = t->data;
        for (uint64_t j = 0; j < e->k; j++) {
            float v;
            memcpy(&v, sum + j, sizeof(v));
            e->mean[j] = count > 0 && v >= 0 ? v / count : 0.0f; /* NaN and negatives: 0 */
        }
        im->n++;
    }
    tdm_gguf_close(g);
    if (st == TDM_OK && im->n == 0) {
        snprintf(err, err_len, "no '*.in_sum2' tensors: not an importance matrix");
        st = TDM_ERR_FORMAT;
    }
    if (st != TDM_OK) {
        quant_imatrix_free(im);
        return st;
    }
    *out = im;
    return TDM_OK;
}

const float *quant_imatrix_find(const quant_imatrix_t *im, const char *name, uint64_t k)
{
    for (size_t i = 0; i < im->n; i++)
        if (strcmp(im->e[i].name, name) == 0)
            return im->e[i].k == k ? im->e[i].mean : NULL;
    return NULL;
}
