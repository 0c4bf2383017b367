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
// one where the shape fills its tiles (each op's header says when) and the GPU runs it natively
// (bdm_conv_algo_choice).
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
    BDM_WORKSPACE_TOO_SMALL = -2,
    BDM_UNSUPPORTED_DEVICE = -3 // BDM_CONV_TENSOR_CORE asked for on a GPU below compute capability 8.0
};

// The conv kernels put the output channels on gridDim.y (at most 65535): larger out_channels are refused.
#define BDM_MAX_OUT_CHANNELS 65535

// A static, human-readable text for a status code (CUDA's text for positive codes).
BDM_API const char* bdm_status_string(int status);

// The kernel (BDM_CONV_SIMPLE or BDM_CONV_TENSOR_CORE) that `algo` runs for a shape that fills the tensor-core tiles
// (`fits` != 0) or not, on a GPU of compute capability cc_major.cc_minor; BDM_UNSUPPORTED_DEVICE or
// BDM_INVALID_ARGUMENT when it cannot run. AUTO takes the tensor cores only where the b1 mma is native (8.x, 9.x:
// BMMA); 10.x and 12.x would JIT the sm_90 PTX into an IMMA emulation, so AUTO keeps the simple kernel there.
BDM_API int bdm_conv_algo_choice(int algo, int fits, int cc_major, int cc_minor);

#ifdef __cplusplus
}
#endif
