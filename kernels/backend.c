/* tandem kernel library: what every backend shares. */
#include "tandem/kernels.h"

void tdm_backend_destroy(tdm_backend_t *be)
{
    if (be != NULL)
        be->ops->destroy(be);
}
