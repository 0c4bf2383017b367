// Internal helpers of the kernels' launchers (not part of the C ABI).
#pragma once

#include <cuda_runtime_api.h>

namespace bdm
{

// The kernel (bdm_conv_algo) that `algo` runs for a shape that fills the tensor-core tiles or not, on the current
// CUDA device (bdm_conv_algo_choice); returns 0, a negative bdm_status, or the cudaError_t of the device query.
int convAlgoForCurrentDevice(int algo, bool fits, int& chosen);

// The status of the launches just made: peeked, so that a pending error is left alone when all went well; a failure
// is cleared once read (it is reported now, and cudart is linked statically, so a pending error of this library's
// runtime left in place would fail every later call of this thread).
inline int launchStatus()
{
    cudaError_t const status = cudaPeekAtLastError();
    if (status != cudaSuccess)
    {
        static_cast<void>(cudaGetLastError());
    }
    return static_cast<int>(status);
}

} // namespace bdm
