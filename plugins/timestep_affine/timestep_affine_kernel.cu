// TimestepBias: y = x + table[g, c]; TimestepRPReLU: y = PReLU_{slope[g, c]}(x + bias0[g, c]) + bias1[g, c].
// One elementwise kernel serves both; g comes from t[0] on the device (plugins/common.yaml group_rule).
#include "../common/bdm_device.cuh"
#include "../common/bdm_launch.h"
#include "timestep_affine_kernel.h"

#include <cuda_fp16.h>

namespace bdm
{
namespace
{

constexpr int kThreads = 256;

template <typename T>
__host__ __device__ inline void affineElement(bdm_timestep_affine_tensors const& ts, bdm_timestep_affine_shape const& s,
    int group, long long i)
{
    int const c = static_cast<int>((i / s.spatial) % s.channels);
    long long const gc = static_cast<long long>(group) * s.channels + c;
    float const v = toFloat(static_cast<T const*>(ts.x)[i]);
    float const y = ts.table ? addRn(v, ts.table[gc]) : addRn(prelu(addRn(v, ts.bias0[gc]), ts.slope[gc]), ts.bias1[gc]);
    static_cast<T*>(ts.y)[i] = fromFloat<T>(y);
}

template <typename T>
__global__ void affineKernel(bdm_timestep_affine_tensors ts, bdm_timestep_affine_shape s, long long count)
{
    int const group = groupIndex(ts.t[0], s.num_groups, s.total_steps);
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
         i += static_cast<long long>(gridDim.x) * blockDim.x)
    {
        affineElement<T>(ts, s, group, i);
    }
}

int checkArguments(bdm_timestep_affine_shape const* s, bdm_timestep_affine_tensors const* ts, int dtype)
{
    if (!s || !ts || !ts->x || !ts->t || !ts->y || (dtype != BDM_FLOAT32 && dtype != BDM_FLOAT16))
    {
        return BDM_INVALID_ARGUMENT;
    }
    bool const bias = ts->table && !ts->bias0 && !ts->slope && !ts->bias1;
    bool const rprelu = !ts->table && ts->bias0 && ts->slope && ts->bias1;
    bool const shapeOk = s->batch > 0 && s->channels > 0 && s->spatial > 0 && s->num_groups > 0 && s->total_steps > 0;
    return (bias || rprelu) && shapeOk ? BDM_OK : BDM_INVALID_ARGUMENT;
}

long long elementCount(bdm_timestep_affine_shape const& s)
{
    return static_cast<long long>(s.batch) * s.channels * s.spatial;
}

} // namespace
} // namespace bdm

extern "C" int bdm_timestep_affine(bdm_timestep_affine_shape const* shape, bdm_timestep_affine_tensors const* tensors,
    int dtype, cudaStream_t stream)
{
    if (int const status = bdm::checkArguments(shape, tensors, dtype))
    {
        return status;
    }
    long long const count = bdm::elementCount(*shape);
    long long const blocks = (count + bdm::kThreads - 1) / bdm::kThreads;
    unsigned const grid = static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
    if (dtype == BDM_FLOAT32)
    {
        bdm::affineKernel<float><<<grid, bdm::kThreads, 0, stream>>>(*tensors, *shape, count);
    }
    else
    {
        bdm::affineKernel<__half><<<grid, bdm::kThreads, 0, stream>>>(*tensors, *shape, count);
    }
    return bdm::launchStatus();
}

extern "C" int bdm_timestep_affine_host(bdm_timestep_affine_shape const* shape,
    bdm_timestep_affine_tensors const* tensors, int dtype)
{
    if (int const status = bdm::checkArguments(shape, tensors, dtype))
    {
        return status;
    }
    int const group = bdm::groupIndex(tensors->t[0], shape->num_groups, shape->total_steps);
    long long const count = bdm::elementCount(*shape);
    for (long long i = 0; i < count; ++i)
    {
        if (dtype == BDM_FLOAT32)
        {
            bdm::affineElement<float>(*tensors, *shape, group, i);
        }
        else
        {
            bdm::affineElement<__half>(*tensors, *shape, group, i);
        }
    }
    return BDM_OK;
}
