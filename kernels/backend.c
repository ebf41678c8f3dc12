/* tandem kernel library: what every backend shares, and the CUDA entry
 * points of a build without CUDA. */
#include "tandem/kernels.h"
#include "tandem/log.h"

void tdm_backend_destroy(tdm_backend_t *be)
{
    if (be != NULL)
        be->ops->destroy(be);
}

#ifdef TANDEM_HAVE_CUDA
int tdm_backend_cuda_built(void)
{
    return 1;
}
#else
int tdm_backend_cuda_built(void)
{
    return 0;
}

tdm_status_t tdm_backend_cuda_create(int device, tdm_backend_t **out)
{
    (void)device;
    *out = NULL;
    tdm_log_error("cuda",
                  "this tandem was built without the CUDA backend (no nvcc at build time); "
                  "rebuild with the CUDA toolkit on PATH (-DTANDEM_CUDA=ON) or use --device cpu");
    return TDM_ERR_UNSUPPORTED;
}

tdm_status_t tdm_backend_cuda_mem_info(tdm_backend_t *be, size_t *free_bytes, size_t *total_bytes)
{
    (void)be;
    *free_bytes = *total_bytes = 0;
    return TDM_ERR_UNSUPPORTED;
}
#endif
