// Plain launcher and C ABI of the fused binary convolution (ops BinaryConv2d and BinarySignConv2d,
// plugins/binary_conv/spec.yaml). No TensorRT types: the TensorRT adapter, ctypes tests and the benchmark
// all call these functions.
#pragma once

#include "../common/bdm_status.h"

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Shapes and hyper-parameters (the spec's attributes). x is [batch, in_channels, height, width] NCHW.
typedef struct bdm_binary_conv_shape
{
    int32_t batch;
    int32_t in_channels;
    int32_t out_channels;
    int32_t height;
    int32_t width;
    int32_t kernel_size; // 1 or 3
    int32_t num_groups;  // timestep groups (BinaryConv2d only)
    int32_t total_steps; // (BinaryConv2d only)
    int32_t pad_value;   // -1, 0 or 1: sign-domain value of taps outside the image
    int32_t residual;    // 0 or 1: add x (needs in_channels == out_channels; BinaryConv2d only)
} bdm_binary_conv_shape;

// Device pointers (host pointers for bdm_binary_conv2d_host). BinarySignConv2d: t, threshold, bias0, slope
// and bias1 are all NULL (y = alpha * dot); BinaryConv2d: all of them are set.
typedef struct bdm_binary_conv_tensors
{
    void const* x;           // [N, Cin, H, W] float32 or float16
    int32_t const* t;        // [N] int32; only t[0] is read, on the device
    int32_t const* weight;   // [Cout, k, k, ceil(Cin/32)] packed sign bits (plugins/common.yaml bit_layout)
    float const* alpha;      // [Cout]
    float const* threshold;  // [num_groups, Cin]
    float const* bias0;      // [num_groups, Cout]
    float const* slope;      // [num_groups, Cout]
    float const* bias1;      // [num_groups, Cout]
    void* y;                 // [N, Cout, H, W], dtype of x
} bdm_binary_conv_tensors;


// Bytes of device workspace bdm_binary_conv2d needs: the two packed bit-planes of the sign map.
BDM_API size_t bdm_binary_conv_workspace_size(bdm_binary_conv_shape const* shape);

// Enqueue the op on `stream`. Capture safe: no allocation, no synchronisation, no host read of device data.
// algo (bdm_conv_algo): both kernels are exact; AUTO picks the tensor cores where the shape fills their tiles
// (in_channels * k * k >= 256 and out_channels >= 16) and the GPU runs them natively (bdm_conv_algo_choice).
// out_channels <= BDM_MAX_OUT_CHANNELS.
BDM_API int bdm_binary_conv2d(bdm_binary_conv_shape const* shape, bdm_binary_conv_tensors const* tensors, int dtype,
    int algo, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The same computation on the CPU (host pointers, synchronous) through the device code's own functions, so
// machines without a GPU check it against the reference: BDM_CONV_SIMPLE / AUTO run the straightforward
// kernel's per-output function; BDM_CONV_TENSOR_CORE runs the tensor-core kernel's phases block by block with
// the mma emulated from the PTX ISA's fragment layout.
BDM_API int bdm_binary_conv2d_host(
    bdm_binary_conv_shape const* shape, bdm_binary_conv_tensors const* tensors, int dtype, int algo);

#ifdef __cplusplus
}
#endif
