#include "bdm_launch.h"
#include "bdm_status.h"

#include <atomic>
#include <cuda_runtime_api.h>

extern "C" const char* bdm_status_string(int status)
{
    switch (status)
    {
    case BDM_OK: return "success";
    case BDM_INVALID_ARGUMENT: return "invalid argument (shape, attribute or null pointer outside the op spec)";
    case BDM_WORKSPACE_TOO_SMALL: return "workspace smaller than bdm_*_workspace_size() asked for";
    case BDM_UNSUPPORTED_DEVICE:
        return "the tensor-core kernel needs a GPU of compute capability 8.0 or newer; use the simple kernel (or auto)";
    default: return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "unknown bdm status";
    }
}

extern "C" int bdm_conv_algo_choice(int algo, int fits, int cc_major, int cc_minor)
{
    bool const bmma = cc_major >= 8;                   // mma .b1 .and.popc exists from sm_80
    bool const nativeBmma = cc_major == 8 || cc_major == 9; // BMMA; newer GPUs emulate it with IMMA
    if (cc_major < 0 || cc_minor < 0)
    {
        return BDM_INVALID_ARGUMENT;
    }
    switch (algo)
    {
    case BDM_CONV_SIMPLE: return BDM_CONV_SIMPLE;
    case BDM_CONV_TENSOR_CORE: return bmma ? static_cast<int>(BDM_CONV_TENSOR_CORE) : BDM_UNSUPPORTED_DEVICE;
    case BDM_CONV_AUTO: return fits && nativeBmma ? BDM_CONV_TENSOR_CORE : BDM_CONV_SIMPLE;
    default: return BDM_INVALID_ARGUMENT;
    }
}

namespace bdm
{
namespace
{

constexpr int kMaxDevices = 64;

// Compute capability (major * 10 + minor) per device, 0 until first asked: queried once, so the launchers make no
// CUDA call but cudaGetDevice on later launches (capture safe either way).
std::atomic<int> gCapability[kMaxDevices];

} // namespace

int convAlgoForCurrentDevice(int algo, bool fits, int& chosen)
{
    int device = 0;
    if (cudaError_t const e = cudaGetDevice(&device))
    {
        return static_cast<int>(e);
    }
    int capability = device < kMaxDevices ? gCapability[device].load(std::memory_order_relaxed) : 0;
    if (capability == 0)
    {
        int major = 0;
        int minor = 0;
        if (cudaError_t const e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device))
        {
            return static_cast<int>(e);
        }
        if (cudaError_t const e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device))
        {
            return static_cast<int>(e);
        }
        capability = major * 10 + minor;
        if (device < kMaxDevices)
        {
            gCapability[device].store(capability, std::memory_order_relaxed);
        }
    }
    int const choice = bdm_conv_algo_choice(algo, fits ? 1 : 0, capability / 10, capability % 10);
    if (choice < 0)
    {
        return choice;
    }
    chosen = choice;
    return BDM_OK;
}

} // namespace bdm
