// Internal helpers of the kernels' launchers (not part of the C ABI).
#pragma once

namespace bdm
{

// The kernel (bdm_conv_algo) that `algo` runs for a shape that fills the tensor-core tiles or not, on the current
// CUDA device (bdm_conv_algo_choice); returns 0, a negative bdm_status, or the cudaError_t of the device query.
int convAlgoForCurrentDevice(int algo, bool fits, int& chosen);

} // namespace bdm
