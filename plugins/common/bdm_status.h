// Status, dtype and kernel-choice codes of the bdm kernels' C ABI (shared by every op's launcher).
#pragma once

// The C ABI is the only thing libbdm_kernels.so exports (everything else is built with hidden visibility).
#define BDM_API __attribute__((visibility("default")))

#ifdef __cplusplus
extern "C" {
#endif

// Activation dtype: the dtype of x and y.
enum bdm_dtype
{
    BDM_FLOAT32 = 0,
    BDM_FLOAT16 = 1
};

// Which kernel computes a convolution (binary conv, MultiBasisConv). All are exact; AUTO picks the tensor-core
// one where the shape fills its tiles (each op's header says when).
enum bdm_conv_algo
{
    BDM_CONV_AUTO = 0,
    BDM_CONV_SIMPLE = 1,      // one thread per output, AND + popcount on CUDA cores
    BDM_CONV_TENSOR_CORE = 2  // mma.sync m16n8k256 b1 AND.POPC (sm_80+)
};

// 0: success; negative: rejected before any launch; positive: the cudaError_t of the launch.
enum bdm_status
{
    BDM_OK = 0,
    BDM_INVALID_ARGUMENT = -1,
    BDM_WORKSPACE_TOO_SMALL = -2
};

// A static, human-readable text for a status code (CUDA's text for positive codes).
BDM_API const char* bdm_status_string(int status);

#ifdef __cplusplus
}
#endif
