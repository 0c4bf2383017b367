// BinaryConv2d / BinarySignConv2d on the CPU, one instruction-set path: defines that path's binaryConv entry point,
// so it is included once by each plugins/common/cpu_isa_*.cpp. README.md beside this file explains the arithmetic.
//
// 1. Sign + pack (one pass over x, threaded over rows): s = sign(float32(x) + threshold[g, c]) into two bit-planes
//    per padded row: P (bit = s > 0) and Zb (bit = s == 0), plus a flag per pixel holding an exact zero. Taps outside
//    the image hold the padding word: P = all valid channels for pad_value +1, else 0.
// 2. Popcount conv (threaded over output rows x channel blocks): per tile of 32 pixels x kTileChannels channels,
//    counts = sum popcount(P XOR W), dot = K - 2 * counts with K = taps * in_channels: exact where every tap is +-1.
//    Two exact integer corrections where it is not: a pad_value 0 border pixel adds, per padded tap, sum_c w[o, c, tap]
//    (the tap was packed as -1 but contributes 0); a window holding an exact zero adds, per zero channel,
//    w = 2 * popc(Zb & W) - popc(Zb) per word (packed as -1, contributes 0).
// 3. Output transform (in the same tile, vectorised over its pixels): the spec's float32 operations in order.
#pragma once

#include "../common/bdm_cpu.h"
#include "../common/cpu_isa_entries.h"
#include "../common/cpu_simd.h"

#include <cstring>

namespace bdm
{
namespace cpu
{
namespace BDM_CPU_NS
{
namespace binary
{

constexpr int kPackChunk = 256; // pixels of a row packed per step (stack arrays of the pack pass)

struct Geometry
{
    int channels; // in
    int outChannels;
    int height;
    int width;
    int kernel;
    int pad;
    int taps;
    int paddedHeight;
    PlaneLayout layout;
    long long hw;
    long long imageWords; // paddedHeight * layout.rowStride
};

inline Geometry geometry(BinaryConvLayer const& layer, BinaryConvCall const& call)
{
    Geometry g;
    g.channels = layer.inChannels;
    g.outChannels = layer.outChannels;
    g.height = call.height;
    g.width = call.width;
    g.kernel = layer.kernelSize;
    g.pad = layer.kernelSize / 2;
    g.taps = layer.kernelSize * layer.kernelSize;
    g.paddedHeight = call.height + 2 * g.pad;
    g.layout = planeLayout(1, layer.words, 1, call.width + 2 * g.pad, call.width, layer.kernelSize);
    g.hw = static_cast<long long>(call.height) * call.width;
    g.imageWords = g.paddedHeight * g.layout.rowStride;
    return g;
}

// The per-call buffers: P and Zb planes, zero flags per padded pixel and per padded row, for every image.
struct Planes
{
    uint32_t* pos;
    uint32_t* zero;
    uint8_t* pixelZero; // [batch][paddedHeight][phaseWidth]
    uint8_t* rowZero;   // [batch][paddedHeight]
};

inline uint32_t validBits(int channels, int word)
{
    int const left = channels - 32 * word;
    return left >= 32 ? 0xffffffffu : (1u << left) - 1u;
}

// Padded row r of image n of the sign planes.
template <bool kThreshold>
inline void packRow(BinaryConvLayer const& layer, BinaryConvCall const& call, Geometry const& g, float const* threshold,
    Planes const& planes, int n, int r)
{
    PlaneLayout const& l = g.layout;
    long long const row = static_cast<long long>(n) * g.paddedHeight + r;
    uint32_t* pos = planes.pos + row * l.rowStride;
    uint32_t* zero = planes.zero + row * l.rowStride;
    uint8_t* pixelZero = planes.pixelZero + row * l.phaseWidth;
    int const h = r - g.pad;
    bool const inside = h >= 0 && h < g.height;
    for (int word = 0; word < l.words; ++word)
    {
        uint32_t const padWord = layer.padValue > 0 ? validBits(g.channels, word) : 0u;
        uint32_t* p = pos + word * l.phaseWidth;
        int const first = inside ? g.pad : l.phaseWidth; // data columns [pad, pad + width) of an image row
        int const last = inside ? g.pad + g.width : l.phaseWidth;
        for (int q = 0; q < l.phaseWidth; ++q)
        {
            p[q] = q < first || q >= last ? padWord : 0u;
        }
        std::memset(zero + word * l.phaseWidth, 0, sizeof(uint32_t) * l.phaseWidth);
    }
    std::memset(pixelZero, 0, l.phaseWidth);
    planes.rowZero[row] = 0;
    if (!inside)
    {
        return;
    }
    uint8_t rowHasZero = 0;
    for (int c0 = 0; c0 < g.width; c0 += kPackChunk)
    {
        int const count = minInt(kPackChunk, g.width - c0);
        uint32_t zeroAny[kPackChunk];
        for (int p = 0; p < count; ++p)
        {
            zeroAny[p] = 0;
        }
        for (int word = 0; word < l.words; ++word)
        {
            uint32_t posBits[kPackChunk];
            uint32_t zeroBits[kPackChunk];
            for (int p = 0; p < count; ++p)
            {
                posBits[p] = 0;
                zeroBits[p] = 0;
            }
            int const bits = minInt(32, g.channels - 32 * word);
            for (int b = 0; b < bits; ++b)
            {
                int const c = 32 * word + b;
                float const* xc = call.x + (static_cast<long long>(n) * g.channels + c) * g.hw
                    + static_cast<long long>(h) * g.width + c0;
                float const t = kThreshold ? threshold[c] : 0.0f;
                uint32_t const bit = 1u << b;
                for (int p = 0; p < count; ++p)
                {
                    float const v = kThreshold ? xc[p] + t : xc[p]; // one IEEE add, as the spec
                    posBits[p] |= v > 0.0f ? bit : 0u;
                    zeroBits[p] |= v == 0.0f ? bit : 0u; // +0.0 and -0.0
                }
            }
            uint32_t* p0 = pos + word * l.phaseWidth + g.pad + c0;
            uint32_t* z0 = zero + word * l.phaseWidth + g.pad + c0;
            for (int p = 0; p < count; ++p)
            {
                p0[p] = posBits[p];
                z0[p] = zeroBits[p];
                zeroAny[p] |= zeroBits[p];
            }
        }
        for (int p = 0; p < count; ++p)
        {
            pixelZero[g.pad + c0 + p] = zeroAny[p] != 0;
            rowHasZero |= zeroAny[p] != 0;
        }
    }
    planes.rowZero[row] = rowHasZero;
}

// pad_value 0: each padded tap was counted as -1 per channel; it contributes 0, so add back sum_c w[o, c, tap].
inline void correctPadding(BinaryConvLayer const& layer, Geometry const& g, int oh, int ow0, int count, int o0,
    int channels, int32_t (*dots)[kTileWidth])
{
    for (int p = 0; p < count; ++p)
    {
        int const ow = ow0 + p;
        if (oh >= g.pad && oh < g.height - g.pad && ow >= g.pad && ow < g.width - g.pad)
        {
            continue;
        }
        for (int i = 0; i < g.kernel; ++i)
        {
            int const h = oh + i - g.pad;
            for (int j = 0; j < g.kernel; ++j)
            {
                int const w = ow + j - g.pad;
                if (h >= 0 && h < g.height && w >= 0 && w < g.width)
                {
                    continue;
                }
                int32_t const* sums = layer.tapSums + static_cast<long long>(o0) * g.taps + i * g.kernel + j;
                for (int c = 0; c < channels; ++c)
                {
                    dots[c][p] += sums[c * g.taps];
                }
            }
        }
    }
}

// Exact zeros inside the image: each zero channel of a tap was counted as -1; it contributes 0, so add back its
// weight sign, per word 2 * popc(Zb & W) - popc(Zb).
inline void correctZeros(BinaryConvLayer const& layer, Geometry const& g, Planes const& planes, int n, int oh, int ow0,
    int count, int o0, int channels, int32_t (*dots)[kTileWidth])
{
    PlaneLayout const& l = g.layout;
    long long const row0 = static_cast<long long>(n) * g.paddedHeight + oh;
    bool any = false;
    for (int i = 0; i < g.kernel; ++i)
    {
        any = any || planes.rowZero[row0 + i];
    }
    if (!any)
    {
        return;
    }
    for (int p = 0; p < count; ++p)
    {
        for (int i = 0; i < g.kernel; ++i)
        {
            if (!planes.rowZero[row0 + i])
            {
                continue;
            }
            for (int j = 0; j < g.kernel; ++j)
            {
                int const q = ow0 + p + j; // padded column of tap j
                if (!planes.pixelZero[(row0 + i) * l.phaseWidth + q])
                {
                    continue;
                }
                uint32_t const* zb = planes.zero + (row0 + i) * l.rowStride + q;
                for (int word = 0; word < l.words; ++word)
                {
                    uint32_t const z = zb[word * l.phaseWidth];
                    if (!z)
                    {
                        continue;
                    }
                    int const zeros = popcountScalar(z);
                    uint32_t const* w = layer.weights + (static_cast<long long>(o0) * g.taps + i * g.kernel + j) * l.words
                        + word;
                    for (int c = 0; c < channels; ++c)
                    {
                        dots[c][p] += 2 * popcountScalar(z & w[static_cast<long long>(c) * g.taps * l.words]) - zeros;
                    }
                }
            }
        }
    }
}

// The spec's epilogue, one float32 operation at a time in its order (the build has -ffp-contract=off: no FMA):
// z = alpha * dot [+ bias0; PReLU; + bias1; + x].
template <bool kFused, bool kResidual>
inline void storeOutputs(BinaryConvLayer const& layer, BinaryConvCall const& call, Geometry const& g, int n, int oh,
    int ow0, int count, int o0, int channels, int32_t (*dots)[kTileWidth])
{
    for (int c = 0; c < channels; ++c)
    {
        int const o = o0 + c;
        float const alpha = layer.alpha[o];
        long long const offset = static_cast<long long>(oh) * g.width + ow0;
        float* y = call.y + (static_cast<long long>(n) * g.outChannels + o) * g.hw + offset;
        int32_t const* dot = dots[c];
        if (!kFused)
        {
            for (int p = 0; p < count; ++p)
            {
                y[p] = alpha * static_cast<float>(dot[p]);
            }
            continue;
        }
        long long const go = static_cast<long long>(call.group) * g.outChannels + o;
        float const bias0 = layer.bias0[go];
        float const slope = layer.slope[go];
        float const bias1 = layer.bias1[go];
        float const* x = call.x + (static_cast<long long>(n) * g.channels + o) * g.hw + offset;
        for (int p = 0; p < count; ++p)
        {
            float z = alpha * static_cast<float>(dot[p]);
            z = z + bias0;
            z = z >= 0.0f ? z : slope * z;
            z = z + bias1;
            if (kResidual)
            {
                z = z + x[p];
            }
            y[p] = z;
        }
    }
}

template <bool kFused, bool kResidual>
inline void convolve(BinaryConvLayer const& layer, BinaryConvCall const& call, Geometry const& g, Planes const& planes,
    int threads)
{
    int const blocks = layer.blocked.blocks;
    long long const items = static_cast<long long>(call.batch) * g.height * blocks;
    int const k = g.channels * g.taps;
    bool const zeroPadding = layer.padValue == 0 && g.pad > 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
    for (long long item = 0; item < items; ++item)
    {
        long long const row = item / blocks;
        int const block = static_cast<int>(item - row * blocks);
        int const n = static_cast<int>(row / g.height);
        int const oh = static_cast<int>(row - static_cast<long long>(n) * g.height);
        int const o0 = block * kTileChannels;
        int const channels = minInt(kTileChannels, g.outChannels - o0);
        Tile tile{planes.pos + n * g.imageWords, g.layout, g.kernel, g.kernel, oh, 0,
            layer.blocked.words + static_cast<long long>(block) * g.taps * g.layout.words * kTileChannels};
        for (int ow0 = 0; ow0 < g.width; ow0 += kTileWidth)
        {
            int32_t dots[kTileChannels][kTileWidth];
            tile.ow0 = ow0;
            popcountTile<true>(tile, dots);
            for (auto& d : dots)
            {
                for (int32_t& v : d)
                {
                    v = k - 2 * v;
                }
            }
            int const count = minInt(kTileWidth, g.width - ow0);
            if (zeroPadding)
            {
                correctPadding(layer, g, oh, ow0, count, o0, channels, dots);
            }
            correctZeros(layer, g, planes, n, oh, ow0, count, o0, channels, dots);
            storeOutputs<kFused, kResidual>(layer, call, g, n, oh, ow0, count, o0, channels, dots);
        }
    }
}

inline int run(BinaryConvLayer const& layer, BinaryConvCall const& call)
{
    Geometry const g = geometry(layer, call);
    long long const planeWords = call.batch * g.imageWords;
    long long const pixels = static_cast<long long>(call.batch) * g.paddedHeight * g.layout.phaseWidth;
    Scratch scratch(sizeof(uint32_t) * 2 * planeWords + pixels + call.batch * g.paddedHeight);
    if (!scratch.ok())
    {
        return BDM_CPU_OUT_OF_MEMORY;
    }
    Planes planes;
    planes.pos = scratch.as<uint32_t>();
    planes.zero = planes.pos + planeWords;
    planes.pixelZero = reinterpret_cast<uint8_t*>(planes.zero + planeWords);
    planes.rowZero = planes.pixelZero + pixels;
    int const threads = threadCount(call.threads);
    float const* threshold = layer.threshold ? layer.threshold + static_cast<long long>(call.group) * g.channels : nullptr;
    long long const rows = static_cast<long long>(call.batch) * g.paddedHeight;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 1)
    for (long long row = 0; row < rows; ++row)
    {
        int const n = static_cast<int>(row / g.paddedHeight);
        int const r = static_cast<int>(row - static_cast<long long>(n) * g.paddedHeight);
        if (threshold)
        {
            packRow<true>(layer, call, g, threshold, planes, n, r);
        }
        else
        {
            packRow<false>(layer, call, g, nullptr, planes, n, r);
        }
    }
    if (!layer.threshold)
    {
        convolve<false, false>(layer, call, g, planes, threads);
    }
    else if (layer.residual)
    {
        convolve<true, true>(layer, call, g, planes, threads);
    }
    else
    {
        convolve<true, false>(layer, call, g, planes, threads);
    }
    return BDM_OK;
}

} // namespace binary

int binaryConv(BinaryConvLayer const& layer, BinaryConvCall const& call)
{
    return binary::run(layer, call);
}

} // namespace BDM_CPU_NS
} // namespace cpu
} // namespace bdm
