// Plain launcher and C ABI of MultiBasisConv (plugins/multibasis_conv/spec.yaml): BinaryDM's binarized conv2d /
// conv1d / linear with its activation quantizer. No TensorRT types: the TensorRT adapter, ctypes tests and
// benchmarks all call these functions.
#pragma once

#include "../common/bdm_status.h"

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Shapes and attributes. Every form runs as a 2-D convolution over [batch, in_channels, height, width]:
// conv2d (spatial_dims 2) as it is, conv1d [N, C, L] as height 1, width L (kernel 1 x k, padding on the width
// only), linear [N, C] as 1 x 1.
typedef struct bdm_multibasis_conv_shape
{
    int32_t batch;
    int32_t in_channels;
    int32_t out_channels;
    int32_t spatial_dims; // 0 linear, 1 conv1d, 2 conv2d
    int32_t height;       // input H (1 for conv1d and linear)
    int32_t width;        // input W, or L for conv1d (1 for linear)
    int32_t kernel_size;  // square kernel side (1 x k for conv1d, 1 for linear)
    int32_t stride;       // 1, or 2 for conv2d
    int32_t padding;      // zeros on both sides of every spatial axis of the quantized x
    int32_t num_bases;    // 1 or 2 sign bases
    int32_t act_bits;     // 0 (no activation quantization), 4 or 8
} bdm_multibasis_conv_shape;

// Device pointers (host pointers for bdm_multibasis_conv_host). All float32.
typedef struct bdm_multibasis_conv_tensors
{
    float const* x;          // [N, in_channels, *spatial]
    int32_t const* weight;   // [num_bases, out_channels, *taps, ceil(in_channels/32)] (common.yaml bit_layout)
    float const* scale;      // [num_bases, out_channels]
    float const* bias;       // [out_channels]
    float const* act_step;   // [1]: the step before the grad_scale identity; read on the device; unused at act_bits 0
    float* y;                // [N, out_channels, *out_spatial]
} bdm_multibasis_conv_tensors;

// Output size of one spatial axis of length `length` (the spec's floor((L + 2*padding - kernel) / stride) + 1).
BDM_API int32_t bdm_multibasis_conv_out_size(int32_t length, int32_t kernel_size, int32_t stride, int32_t padding);

// Bytes of device workspace bdm_multibasis_conv needs: act_bits bit-planes of the activation codes (0 at act_bits 0).
BDM_API size_t bdm_multibasis_conv_workspace_size(bdm_multibasis_conv_shape const* shape);

// Enqueue the op on `stream`. Capture safe: no allocation, no synchronisation, no host read of device data.
// algo (bdm_conv_algo): BDM_CONV_SIMPLE runs one thread per output on CUDA cores, BDM_CONV_TENSOR_CORE the
// mma.sync m16n8k256 b1 AND.POPC kernel (sm_80+), BDM_CONV_AUTO the tensor cores where the shape fills their tiles
// (taps * in_channels rounded up to 32 >= 256 and out_channels >= 16) and the GPU runs them natively
// (bdm_conv_algo_choice). Both give bit-identical results; act_bits 0 (float32 arithmetic) always runs the simple
// kernel. out_channels <= BDM_MAX_OUT_CHANNELS.
BDM_API int bdm_multibasis_conv(bdm_multibasis_conv_shape const* shape, bdm_multibasis_conv_tensors const* tensors,
    int algo, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The same computation on the CPU (host pointers, synchronous) through the kernels' own functions, so machines
// without a GPU check the device code against the reference: BDM_CONV_SIMPLE / AUTO run the simple kernel's
// per-output functions; BDM_CONV_TENSOR_CORE (act_bits 4, 8) runs the tensor-core kernel's phases block by block
// with the mma emulated from the PTX ISA's fragment layout.
BDM_API int bdm_multibasis_conv_host(bdm_multibasis_conv_shape const* shape, bdm_multibasis_conv_tensors const* tensors,
    int algo);

#ifdef __cplusplus
}
#endif
