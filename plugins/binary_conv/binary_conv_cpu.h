// C ABI of the bit-packed CPU binary convolution (ops BinaryConv2d and BinarySignConv2d,
// plugins/binary_conv/spec.yaml), in libbdm_cpu_kernels.so. A layer is prepared once from the exported node's
// constants (weights repacked for the chosen instruction-set path, tables copied), then run per call; outputs are
// bit-identical to the spec's NumPy reference (plugins/reference.py) on every path and thread count.
#pragma once

#include "../common/bdm_cpu.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bdm_binary_conv_cpu_layer bdm_binary_conv_cpu_layer; // opaque

// The node's attributes and constants (host pointers, read during prepare only). BinarySignConv2d: threshold, bias0,
// slope and bias1 all NULL (y = alpha * dot; num_groups and residual ignored); BinaryConv2d: all set.
typedef struct bdm_binary_conv_cpu_params
{
    int32_t in_channels;
    int32_t out_channels;
    int32_t kernel_size; // 1 or 3
    int32_t num_groups;
    int32_t pad_value;   // -1, 0, 1
    int32_t residual;    // 0 or 1 (needs in_channels == out_channels)
    int32_t const* weight; // [out_channels, k, k, ceil(in_channels/32)] packed sign bits (common.yaml bit_layout)
    float const* alpha;    // [out_channels]
    float const* threshold; // [num_groups, in_channels]
    float const* bias0;     // [num_groups, out_channels]
    float const* slope;
    float const* bias1;
} bdm_binary_conv_cpu_params;

// One call: x float32 [batch, in_channels, height, width] NCHW contiguous, y float32 [batch, out_channels, height,
// width]. group: the timestep group of t[0] (common.yaml group_rule; 0 for BinarySignConv2d). threads: 0 for the
// OpenMP default (the runtime torch uses, when torch is loaded first), else that many.
typedef struct bdm_binary_conv_cpu_call
{
    float const* x;
    float* y;
    int32_t batch;
    int32_t height;
    int32_t width;
    int32_t group;
    int32_t threads;
} bdm_binary_conv_cpu_call;

// Prepare a layer for `isa` (bdm_cpu_isa): BDM_CPU_UNSUPPORTED_ISA if this CPU or build lacks it.
BDM_API int bdm_binary_conv_cpu_prepare(
    int isa, bdm_binary_conv_cpu_params const* params, bdm_binary_conv_cpu_layer** layer);

BDM_API void bdm_binary_conv_cpu_release(bdm_binary_conv_cpu_layer* layer);

// Run a prepared layer (thread safe: a layer is read-only; each call allocates its own scratch).
BDM_API int bdm_binary_conv_cpu_run(bdm_binary_conv_cpu_layer const* layer, bdm_binary_conv_cpu_call const* call);

#ifdef __cplusplus
}
#endif
