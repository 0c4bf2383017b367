// Plain launchers and C ABI of the timestep-conditioned elementwise ops TimestepBias (TaR) and
// TimestepRPReLU (TaA) (plugins/timestep_affine/spec.yaml). No TensorRT types.
#pragma once

#include "../common/bdm_status.h"

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bdm_timestep_affine_shape
{
    int32_t batch;
    int32_t channels;
    int64_t spatial; // H * W (any trailing dims flattened)
    int32_t num_groups;
    int32_t total_steps;
} bdm_timestep_affine_shape;

// Device pointers (host pointers for the _host variant). TimestepBias: table set, bias0/slope/bias1 NULL.
// TimestepRPReLU: table NULL, bias0/slope/bias1 set. All tables are [num_groups, channels] float32.
typedef struct bdm_timestep_affine_tensors
{
    void const* x;        // [N, channels, spatial] float32 or float16
    int32_t const* t;     // [N] int32; only t[0] is read, on the device
    float const* table;   // TimestepBias
    float const* bias0;   // TimestepRPReLU
    float const* slope;
    float const* bias1;
    void* y;              // like x
} bdm_timestep_affine_tensors;

// Enqueue on `stream`; capture safe (no allocation, no synchronisation, no host read of device data).
BDM_API int bdm_timestep_affine(bdm_timestep_affine_shape const* shape, bdm_timestep_affine_tensors const* tensors,
    int dtype, cudaStream_t stream);

// The same per-element function on the CPU (host pointers).
BDM_API int bdm_timestep_affine_host(bdm_timestep_affine_shape const* shape, bdm_timestep_affine_tensors const* tensors,
    int dtype);

#ifdef __cplusplus
}
#endif
