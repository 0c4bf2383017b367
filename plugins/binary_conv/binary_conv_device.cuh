// The binary convolution's math, shared by the straightforward kernel, the tensor-core kernel and the host
// reference path. README.md beside this file derives the formulas.
#pragma once

#include "../common/bdm_device.cuh"
#include "binary_conv_kernel.h"

namespace bdm
{

// Everything the kernels derive from bdm_binary_conv_shape, computed once on the host.
struct ConvGeometry
{
    int inChannels;
    int outChannels;
    int height;
    int width;
    int kernelSize;
    int pad;            // kernel_size / 2
    int padValue;       // -1, 0, 1
    int residual;
    int numGroups;
    int totalSteps;
    int words;          // ceil(in_channels / 32): packed words per pixel per bit-plane
    int tapWords;       // kernel_size^2 * words: K of the GEMM in 32-bit words
    uint32_t lastWordMask; // valid channel bits of the last word
    long long hw;       // height * width
    long long pixels;   // batch * height * width: M of the GEMM
};

__host__ __device__ inline uint32_t channelMask(ConvGeometry const& geo, int word)
{
    return word == geo.words - 1 ? geo.lastWordMask : 0xffffffffu;
}

// The two bit-planes of the sign map s in {-1, 0, +1}: pos bit = (s > 0), nonzero bit = (s != 0).
struct SignBits
{
    uint32_t pos;
    uint32_t nonzero;
};

// Signs of 32 channels (word) of one pixel: s = sign(float32(x) + threshold[g, c]) (no threshold: sign(x)).
// Bits for c >= in_channels stay 0, so they drop out of every AND below whatever the weight bits hold.
template <typename T>
__host__ __device__ inline SignBits packSigns(T const* x, float const* threshold, int group, ConvGeometry const& geo,
    long long pixel, int word)
{
    long long const n = pixel / geo.hw;
    long long const hw = pixel - n * geo.hw;
    int const c0 = word * 32;
    T const* xc = x + (n * geo.inChannels + c0) * geo.hw + hw;
    float const* thr = threshold ? threshold + static_cast<long long>(group) * geo.inChannels + c0 : nullptr;
    int const count = geo.inChannels - c0 < 32 ? geo.inChannels - c0 : 32;
    SignBits bits{0u, 0u};
    for (int b = 0; b < count; ++b)
    {
        float v = toFloat(xc[b * geo.hw]);
        if (thr)
        {
            v = addRn(v, thr[b]);
        }
        bits.pos |= static_cast<uint32_t>(v > 0.0f) << b;
        bits.nonzero |= static_cast<uint32_t>(v != 0.0f) << b;
    }
    return bits;
}

// A tap outside the image holds pad_value for every valid channel (zero padding: nonzero plane empty).
__host__ __device__ inline SignBits paddingSigns(ConvGeometry const& geo, int word)
{
    uint32_t const valid = geo.padValue != 0 ? channelMask(geo, word) : 0u;
    return SignBits{geo.padValue > 0 ? valid : 0u, valid};
}

// Popcounts accumulated over all taps and words of one output; dot = sum over taps/channels of s * w with
// w = 2*wbit - 1 and, where s != 0, s = 2*pos - 1:
//   dot = 4*popc(pos & W) - 2*popc(pos) - 2*popc(nonzero & W) + popc(nonzero)
// (pos is a subset of nonzero; README.md beside this file has the derivation).
struct PopCounts
{
    int posAndW = 0;
    int nonzeroAndW = 0;
    int pos = 0;
    int nonzero = 0;
};

__host__ __device__ inline int dotFromCounts(int posAndW, int nonzeroAndW, int pos, int nonzero)
{
    return 4 * posAndW - 2 * pos - 2 * nonzeroAndW + nonzero;
}

// An output pixel's batch index and position, decoded once per thread (64-bit divisions are slow on GPUs).
struct PixelCoord
{
    long long n;
    long long hw; // h * width + w
    int h;
    int w;
};

__host__ __device__ inline PixelCoord pixelCoord(ConvGeometry const& geo, long long pixel)
{
    PixelCoord c;
    c.n = pixel / geo.hw;
    c.hw = pixel - c.n * geo.hw;
    c.h = static_cast<int>(c.hw / geo.width);
    c.w = static_cast<int>(c.hw - static_cast<long long>(c.h) * geo.width);
    return c;
}

// Sign bits of GEMM column kw (tap kw / words, word kw % words) for output pixel `at`, read from the packed
// planes (layout [pixels, words]); taps outside the image give paddingSigns.
__host__ __device__ inline SignBits im2colSigns(uint32_t const* pos, uint32_t const* nonzero, ConvGeometry const& geo,
    PixelCoord const& at, int kw)
{
    int const tap = kw / geo.words;
    int const word = kw - tap * geo.words;
    int const h = at.h + tap / geo.kernelSize - geo.pad;
    int const w = at.w + tap % geo.kernelSize - geo.pad;
    if (h < 0 || h >= geo.height || w < 0 || w >= geo.width)
    {
        return paddingSigns(geo, word);
    }
    long long const src = (at.n * geo.hw + static_cast<long long>(h) * geo.width + w) * geo.words + word;
    return SignBits{pos[src], nonzero[src]};
}

// The straightforward kernel's whole dot product for one (pixel, output channel).
__host__ __device__ inline int dotSimple(uint32_t const* pos, uint32_t const* nonzero, int32_t const* weight,
    ConvGeometry const& geo, PixelCoord const& at, int o)
{
    uint32_t const* wrow = reinterpret_cast<uint32_t const*>(weight) + static_cast<long long>(o) * geo.tapWords;
    PopCounts c;
    for (int kw = 0; kw < geo.tapWords; ++kw)
    {
        SignBits const s = im2colSigns(pos, nonzero, geo, at, kw);
        uint32_t const wbits = wrow[kw];
        c.posAndW += popcount(s.pos & wbits);
        c.nonzeroAndW += popcount(s.nonzero & wbits);
        c.pos += popcount(s.pos);
        c.nonzero += popcount(s.nonzero);
    }
    return dotFromCounts(c.posAndW, c.nonzeroAndW, c.pos, c.nonzero);
}

// The spec's epilogue for output (pixel, o): z = alpha*dot + bias0[g]; PReLU; + bias1[g]; + x (residual);
// BinarySignConv2d (no tables): y = alpha*dot. One rounding to T at the end.
template <typename T>
__host__ __device__ inline void storeOutput(bdm_binary_conv_tensors const& ts, ConvGeometry const& geo, int group,
    PixelCoord const& at, int o, int dot)
{
    long long const n = at.n;
    long long const hw = at.hw;
    float z = mulRn(ts.alpha[o], static_cast<float>(dot));
    if (ts.bias0)
    {
        long long const go = static_cast<long long>(group) * geo.outChannels + o;
        z = addRn(prelu(addRn(z, ts.bias0[go]), ts.slope[go]), ts.bias1[go]);
        if (geo.residual)
        {
            z = addRn(z, toFloat(static_cast<T const*>(ts.x)[(n * geo.inChannels + o) * geo.hw + hw]));
        }
    }
    static_cast<T*>(ts.y)[(n * geo.outChannels + o) * geo.hw + hw] = fromFloat<T>(z);
}

// Group of this launch, from t[0] (device memory on the GPU paths). BinarySignConv2d has no t: group 0.
__host__ __device__ inline int launchGroup(bdm_binary_conv_tensors const& ts, ConvGeometry const& geo)
{
    return ts.t ? groupIndex(ts.t[0], geo.numGroups, geo.totalSteps) : 0;
}

// Tensor-core path (binary_conv_tensor_core.cu): same planes in, same epilogue out.
template <typename T>
void launchTensorCoreConv(bdm_binary_conv_tensors const& ts, ConvGeometry const& geo, uint32_t const* pos,
    uint32_t const* nonzero, cudaStream_t stream);

} // namespace bdm
