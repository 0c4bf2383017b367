// C ABI of the bit-serial CPU MultiBasisConv (plugins/multibasis_conv/spec.yaml) with act_bits 4 or 8, in
// libbdm_cpu_kernels.so. A layer is prepared once from the exported node's constants, then run per call. Outputs equal
// the CUDA kernels' host path (bdm_multibasis_conv_host) bit for bit, on every path and thread count; act_bits 0
// (W1A32, float32 arithmetic) is not a popcount conv and is refused here (bdm.plugins.cpu_kernels runs it in torch).
#pragma once

#include "../common/bdm_cpu.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bdm_multibasis_conv_cpu_layer bdm_multibasis_conv_cpu_layer; // opaque

// Every form runs as a 2-D convolution of [batch, in_channels, height, width]: conv2d as it is, conv1d [N, C, L] as
// height 1 (kernel 1 x k, padding on the width only), linear [N, C] as height = width = 1.
typedef struct bdm_multibasis_conv_cpu_params
{
    int32_t in_channels;
    int32_t out_channels;
    int32_t spatial_dims; // 0 linear, 1 conv1d, 2 conv2d
    int32_t kernel_size;
    int32_t stride;       // 1, or 2 for conv2d
    int32_t padding;
    int32_t num_bases;    // 1 or 2
    int32_t act_bits;     // 4 or 8
    int32_t const* weight; // [num_bases, out_channels, *taps, ceil(in_channels/32)] (common.yaml bit_layout)
    float const* scale;    // [num_bases, out_channels]
    float const* bias;     // [out_channels]
} bdm_multibasis_conv_cpu_params;

// One call: x float32 [batch, in_channels, height, width] contiguous, y float32 [batch, out_channels, out_height,
// out_width] (bdm_multibasis_conv_cpu_out_size per axis). act_step: the node's act_step[0]; the quantizer's step is
// (a - a*g) + a*g with g = float32(1 / sqrt(double(batch * in_channels * height * width * Qp))).
typedef struct bdm_multibasis_conv_cpu_call
{
    float const* x;
    float* y;
    int32_t batch;
    int32_t height;
    int32_t width;
    float act_step;
    int32_t threads; // 0: the OpenMP default
} bdm_multibasis_conv_cpu_call;

BDM_API int bdm_multibasis_conv_cpu_prepare(
    int isa, bdm_multibasis_conv_cpu_params const* params, bdm_multibasis_conv_cpu_layer** layer);

BDM_API void bdm_multibasis_conv_cpu_release(bdm_multibasis_conv_cpu_layer* layer);

// Output size of one spatial axis: floor((length + 2*padding - kernel) / stride) + 1, or 0 if the kernel does not fit.
BDM_API int32_t bdm_multibasis_conv_cpu_out_size(int32_t length, int32_t kernel_size, int32_t stride, int32_t padding);

BDM_API int bdm_multibasis_conv_cpu_run(
    bdm_multibasis_conv_cpu_layer const* layer, bdm_multibasis_conv_cpu_call const* call);

#ifdef __cplusplus
}
#endif
