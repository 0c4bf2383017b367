// MultiBasisConv's math, shared by the CUDA kernels and the host path of the C ABI. README.md beside this file
// derives the formulas; spec.yaml is the contract.
#pragma once

#include "../common/bdm_device.cuh"
#include "multibasis_conv_kernel.h"

#include <math.h>

namespace bdm
{
namespace mb
{

constexpr int kMaxActBits = 8;

// Everything the kernels derive from bdm_multibasis_conv_shape, computed once on the host.
struct Geometry
{
    int inChannels;
    int outChannels;
    int height;
    int width;
    int outHeight;
    int outWidth;
    int kernelH; // 1 for conv1d and linear
    int kernelW;
    int stride;
    int padH; // 0 for conv1d and linear
    int padW;
    int numBases;
    int actBits;  // 0, 4, 8
    int qn;       // -2^(b-1)
    int qp;       // 2^(b-1) - 1
    float gradScale; // g = float32(1 / sqrt(double(numel(x) * Qp))), numel(x) of the whole tensor
    int words;    // ceil(in_channels / 32)
    int tapWords; // taps * words: K of the tensor-core GEMM in 32-bit words
    long long hw; // height * width
    long long outHw;
    long long pixels;    // batch * height * width
    long long outPixels; // batch * outHeight * outWidth
};

// The official LSQ grad_scale forward of the stored step a: (a - a*g) + a*g, three float32 operations.
__host__ __device__ inline float activationStep(float a, float gradScale)
{
    float const scaled = mulRn(a, gradScale);
    return addRn(subRn(a, scaled), scaled);
}

// k = round_half_even(clamp(x / step, Qn, Qp)) with a true float32 division.
__host__ __device__ inline int activationCode(float x, float step, Geometry const& geo)
{
    float const v = divRn(x, step);
    float const clamped = v < geo.qn ? static_cast<float>(geo.qn) : (v > geo.qp ? static_cast<float>(geo.qp) : v);
    return static_cast<int>(rintf(clamped)); // rintf rounds half to even in the default rounding mode
}

// Bit-planes of the codes of 32 channels (word) of one input pixel, two's complement over act_bits bits:
// plane j bit b = bit j of (k & (2^bits - 1)) for channel 32*word + b. Channels past in_channels stay 0 (code 0),
// like zero padding, so they add nothing to any dot product.
__host__ __device__ inline void packCodePlanes(float const* x, float step, Geometry const& geo, long long pixel,
    int word, uint32_t* planes)
{
    long long const n = pixel / geo.hw;
    long long const hw = pixel - n * geo.hw;
    int const c0 = word * 32;
    float const* xc = x + (n * geo.inChannels + c0) * geo.hw + hw;
    int const count = geo.inChannels - c0 < 32 ? geo.inChannels - c0 : 32;
    for (int j = 0; j < geo.actBits; ++j)
    {
        planes[j] = 0u;
    }
    for (int b = 0; b < count; ++b)
    {
        uint32_t const u = static_cast<uint32_t>(activationCode(xc[b * geo.hw], step, geo));
        for (int j = 0; j < geo.actBits; ++j)
        {
            planes[j] |= ((u >> j) & 1u) << b;
        }
    }
}

// Weight of bit-plane j in the two's complement value: 2^j, and -2^(bits-1) for the sign plane.
__host__ __device__ inline int planeWeight(int j, int bits)
{
    return j == bits - 1 ? -(1 << j) : (1 << j);
}

// An output position, decoded once per thread.
struct OutCoord
{
    long long n;
    long long ohw; // oh * outWidth + ow
    int h0;        // oh * stride - padH: input row of tap row 0
    int w0;
};

__host__ __device__ inline OutCoord outCoord(Geometry const& geo, long long outPixel)
{
    OutCoord c;
    c.n = outPixel / geo.outHw;
    c.ohw = outPixel - c.n * geo.outHw;
    int const oh = static_cast<int>(c.ohw / geo.outWidth);
    int const ow = static_cast<int>(c.ohw - static_cast<long long>(oh) * geo.outWidth);
    c.h0 = oh * geo.stride - geo.padH;
    c.w0 = ow * geo.stride - geo.padW;
    return c;
}

// The input pixel index of tap (i, j), or -1 for a padded tap (which contributes 0 in both arithmetic paths).
__host__ __device__ inline long long tapPixel(Geometry const& geo, OutCoord const& at, int i, int j)
{
    int const h = at.h0 + i;
    int const w = at.w0 + j;
    if (h < 0 || h >= geo.height || w < 0 || w >= geo.width)
    {
        return -1;
    }
    return at.n * geo.hw + static_cast<long long>(h) * geo.width + w;
}

// Packed sign word of basis k, output channel o, tap, word (weight layout [bases, O, taps, words]).
__host__ __device__ inline uint32_t weightWord(int32_t const* weight, Geometry const& geo, int k, int o, int tap, int word)
{
    long long const taps = static_cast<long long>(geo.kernelH) * geo.kernelW;
    return static_cast<uint32_t>(weight[((static_cast<long long>(k) * geo.outChannels + o) * taps + tap) * geo.words + word]);
}

// W_hat = s1*B1 (+ s2*B2) = B1 * v with v = s1 (one basis), v = float32(s1 + s2) where B2 = B1 and
// v = float32(s1 - s2) where B2 = -B1: the same float32 values the spec's W_hat takes. The channels split into
// those two classes by the mask B1 XNOR B2, so the dot product is exact per class:
//   y = bias + step * (v_same * dot_same + v_diff * dot_diff),  dot_class = sum over its channels of k * B1.
struct ClassValues
{
    float same; // s1 (+ s2)
    float diff; // s1 - s2 (two bases only)
};

__host__ __device__ inline ClassValues classValues(float const* scale, Geometry const& geo, int o)
{
    float const s1 = scale[o];
    if (geo.numBases == 1)
    {
        return ClassValues{s1, 0.0f};
    }
    float const s2 = scale[geo.outChannels + o];
    return ClassValues{addRn(s1, s2), subRn(s1, s2)};
}

// Exact integer dots of one output (quantized path): per plane P_j of a class mask M,
//   sum_{c in M} bit_j(k_c) * B1_c = 2*popc(P_j & W1 & M) - popc(P_j & M).
struct ClassDots
{
    int same = 0;
    int diff = 0;
};

// Calls visit(pixel, word, w1, sameMask) for every in-image tap and channel word of output `at`, o (padded taps
// contribute 0 in both arithmetic paths); sameMask = B1 XNOR B2 (all ones for one basis).
template <typename Visit>
__host__ __device__ inline void forEachTapWord(int32_t const* weight, Geometry const& geo, OutCoord const& at, int o,
    Visit visit)
{
    for (int i = 0; i < geo.kernelH; ++i)
    {
        for (int j = 0; j < geo.kernelW; ++j)
        {
            long long const pixel = tapPixel(geo, at, i, j);
            if (pixel < 0)
            {
                continue;
            }
            int const tap = i * geo.kernelW + j;
            for (int word = 0; word < geo.words; ++word)
            {
                uint32_t const w1 = weightWord(weight, geo, 0, o, tap, word);
                uint32_t const sameMask = geo.numBases == 2 ? ~(w1 ^ weightWord(weight, geo, 1, o, tap, word)) : ~0u;
                visit(pixel, word, w1, sameMask);
            }
        }
    }
}

__host__ __device__ inline ClassDots dotQuantized(uint32_t const* planes, int32_t const* weight, Geometry const& geo,
    OutCoord const& at, int o)
{
    ClassDots d;
    forEachTapWord(weight, geo, at, o, [&](long long pixel, int word, uint32_t w1, uint32_t sameMask) {
        uint32_t const* p = planes + (pixel * geo.words + word) * geo.actBits;
        for (int b = 0; b < geo.actBits; ++b)
        {
            int const pw = planeWeight(b, geo.actBits);
            uint32_t const same = p[b] & sameMask;
            uint32_t const diff = p[b] & ~sameMask;
            d.same += pw * (2 * popcount(same & w1) - popcount(same));
            d.diff += pw * (2 * popcount(diff & w1) - popcount(diff));
        }
    });
    return d;
}

// y = bias + step * (v_same * dot_same + v_diff * dot_diff), one float32 operation at a time.
__host__ __device__ inline float outputQuantized(ClassDots const& d, ClassValues const& v, float step, float bias)
{
    float acc = mulRn(v.same, static_cast<float>(d.same));
    acc = addRn(acc, mulRn(v.diff, static_cast<float>(d.diff)));
    return addRn(bias, mulRn(step, acc));
}

// y[n, o, *out_spatial] of output `at`.
__host__ __device__ inline void storeOutput(bdm_multibasis_conv_tensors const& ts, Geometry const& geo,
    OutCoord const& at, int o, float y)
{
    ts.y[(at.n * geo.outChannels + o) * geo.outHw + at.ohw] = y;
}

// act_bits = 0 (W1A32): y = bias + sum x * W_hat in float32, taps outer, channels inner.
__host__ __device__ inline float outputFloat(float const* x, int32_t const* weight, ClassValues const& v, float bias,
    Geometry const& geo, OutCoord const& at, int o)
{
    float acc = 0.0f;
    forEachTapWord(weight, geo, at, o, [&](long long pixel, int word, uint32_t w1, uint32_t sameMask) {
        long long const n = pixel / geo.hw;
        float const* xc = x + (n * geo.inChannels + word * 32) * geo.hw + (pixel - n * geo.hw);
        int const count = geo.inChannels - word * 32 < 32 ? geo.inChannels - word * 32 : 32;
        for (int b = 0; b < count; ++b)
        {
            float const magnitude = (sameMask >> b) & 1u ? v.same : v.diff;
            acc = addRn(acc, mulRn(xc[b * geo.hw], (w1 >> b) & 1u ? magnitude : -magnitude));
        }
    });
    return addRn(bias, acc);
}

// The simple kernel's whole work for one output (pixel `at`, channel o): quantized or float32 path, then the store.
__host__ __device__ inline void simpleOutput(bdm_multibasis_conv_tensors const& ts, Geometry const& geo,
    uint32_t const* planes, OutCoord const& at, int o)
{
    ClassValues const v = classValues(ts.scale, geo, o);
    float const y = geo.actBits
        ? outputQuantized(dotQuantized(planes, ts.weight, geo, at, o), v, activationStep(ts.act_step[0], geo.gradScale),
            ts.bias[o])
        : outputFloat(ts.x, ts.weight, v, ts.bias[o], geo, at, o);
    storeOutput(ts, geo, at, o, y);
}

} // namespace mb
} // namespace bdm
