#include "tandem/status.h"

const char *tdm_status_str(tdm_status_t status)
{
    switch (status) {
    case TDM_OK: return "ok";
    case TDM_ERR_INVALID: return "invalid argument";
    case TDM_ERR_NOMEM: return "out of memory";
    case TDM_ERR_IO: return "input/output error";
    case TDM_ERR_FORMAT: return "bad format";
    case TDM_ERR_UNSUPPORTED: return "unsupported";
    case TDM_ERR_NOT_FOUND: return "not found";
    case TDM_ERR_BUSY: return "busy";
    case TDM_ERR_TIMEOUT: return "timed out";
    case TDM_ERR_CANCELLED: return "cancelled";
    case TDM_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}
