// Device helpers shared by every bdm kernel: the spec's group rule and sign rule (plugins/common.yaml),
// fp32/fp16 element access and IEEE operations that the compiler may not contract into FMAs, so that GPU
// results round exactly like the NumPy reference. Everything is __host__ __device__: the host reference
// paths of the C ABI run the very same code.
#pragma once

#include <cstdint>
#include <cuda_fp16.h>

// `#pragma unroll` for code that is also compiled for the host (where g++ would warn about it).
#ifdef __CUDA_ARCH__
#define BDM_UNROLL _Pragma("unroll")
#else
#define BDM_UNROLL
#endif

namespace bdm
{

// common.yaml group_rule: g = clamp((t0 * K) div T, 0, K - 1), floor division, 64-bit product.
__host__ __device__ inline int groupIndex(int32_t t0, int32_t numGroups, int32_t totalSteps)
{
    long long const num = static_cast<long long>(t0) * numGroups;
    long long quot = num / totalSteps;
    if ((num % totalSteps != 0) && ((num < 0) != (totalSteps < 0)))
    {
        --quot;
    }
    return static_cast<int>(quot < 0 ? 0 : (quot > numGroups - 1 ? numGroups - 1 : quot));
}

// Separate rounding for each operation: nvcc would otherwise fuse a*b+c into one FMA (one rounding),
// which the reference does not do.
__host__ __device__ inline float mulRn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

__host__ __device__ inline float addRn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

__host__ __device__ inline float subRn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

// A true IEEE division (round to nearest even), also under --use_fast_math.
__host__ __device__ inline float divRn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

__host__ __device__ inline float toFloat(float v)
{
    return v;
}

__host__ __device__ inline float toFloat(__half v)
{
    return __half2float(v);
}

template <typename T>
__host__ __device__ inline T fromFloat(float v);

template <>
__host__ __device__ inline float fromFloat<float>(float v)
{
    return v;
}

// Round to nearest even, as NumPy's astype(float16).
template <>
__host__ __device__ inline __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

// y = PReLU_slope(z) = z if z >= 0 else slope * z
__host__ __device__ inline float prelu(float z, float slope)
{
    return z >= 0.0f ? z : mulRn(slope, z);
}

__host__ __device__ inline int popcount(uint32_t v)
{
#ifdef __CUDA_ARCH__
    return __popc(v);
#else
    return __builtin_popcount(v);
#endif
}

} // namespace bdm
