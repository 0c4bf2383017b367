#include "bdm_status.h"

#include <cuda_runtime_api.h>

extern "C" const char* bdm_status_string(int status)
{
    switch (status)
    {
    case BDM_OK: return "success";
    case BDM_INVALID_ARGUMENT: return "invalid argument (shape, attribute or null pointer outside the op spec)";
    case BDM_WORKSPACE_TOO_SMALL: return "workspace smaller than bdm_*_workspace_size() asked for";
    default: return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "unknown bdm status";
    }
}
