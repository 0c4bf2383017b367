// BinaryConv2d / BinarySignConv2d on the CPU, one instruction-set path: defines that path's binaryConv entry point,
// so it is included once by each plugins/common/cpu_isa_*.cpp. README.md beside this file explains the arithmetic.
//
// Threads take bands of output rows of one image; a band packs each input row just before the first output row that
// needs it, so the residual read of x (and the planes) come from cache, and x is read from memory once.
// 1. Sign + pack: s = sign(float32(x) + threshold[g, c]) into two bit-planes per padded row: P (bit = s > 0) and Zb
//    (bit = s == 0), plus a flag per pixel holding an exact zero. Taps outside the image hold the padding word:
//    P = all valid channels for pad_value +1, else 0.
// 2. Popcount conv: per tile of 32 pixels x kTileChannels channels (AVX-512; 16 x 4 otherwise),
//    counts = sum popcount(P XOR W), dot = K - 2 * counts with K = taps * in_channels: exact where every tap is +-1.
//    Two exact integer corrections where it is not: a pad_value 0 border pixel adds, per padded tap, sum_c w[o, c, tap]
//    (the tap was packed as -1 but contributes 0); a window holding an exact zero adds, per zero channel,
//    w = 2 * popc(Zb & W) - popc(Zb) per word (packed as -1, contributes 0).
// 3. Output transform (in the same tile, vectorised over its pixels): the spec's float32 operations in order, the
//    stores streaming past the caches when y is large.
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

constexpr long long kStreamBytes = 8LL << 20; // outputs from this size on are stored around the caches

struct Geometry
{
    int channels; // in
    int outChannels;
    int height;
    int width;
    int kernel;
    int pad;
    int taps;
    PlaneLayout layout;
    long long hw;
    int bandRows;      // output rows per band
    int bandsPerImage;
    bool stream;       // storeRow's choice
};

inline Geometry geometry(BinaryConvLayer const& layer, BinaryConvCall const& call, int threads)
{
    Geometry g;
    g.channels = layer.inChannels;
    g.outChannels = layer.outChannels;
    g.height = call.height;
    g.width = call.width;
    g.kernel = layer.kernelSize;
    g.pad = layer.kernelSize / 2;
    g.taps = layer.kernelSize * layer.kernelSize;
    g.layout = planeLayout(1, layer.words, 1, call.width + 2 * g.pad, call.width, layer.kernelSize);
    g.hw = static_cast<long long>(call.height) * call.width;
    // About four bands per thread (load balance); each band packs its 2 * pad halo rows again.
    long long const rows = static_cast<long long>(call.batch) * call.height;
    long long const wanted = static_cast<long long>(threads) * 4;
    g.bandRows = static_cast<int>((rows + wanted - 1) / wanted);
    g.bandRows = g.bandRows < 4 ? 4 : g.bandRows;
    g.bandRows = g.bandRows > call.height ? call.height : g.bandRows;
    g.bandsPerImage = (call.height + g.bandRows - 1) / g.bandRows;
    g.stream = sizeof(float) * g.hw * call.batch * layer.outChannels >= kStreamBytes;
    return g;
}

// One thread's planes of a band of output rows [h0, h0 + bandRows): padded rows h0 .. h0 + bandRows + 2 * pad - 1,
// stored from local row 0.
struct Band
{
    uint32_t* pos;
    uint32_t* zero;
    uint8_t* pixelZero; // [rows][phaseWidth]
    uint8_t* rowZero;   // [rows]
};

inline long long bandRowsPadded(Geometry const& g)
{
    return g.bandRows + 2 * g.pad;
}

inline size_t bandBytes(Geometry const& g)
{
    long long const rows = bandRowsPadded(g);
    size_t const bytes = sizeof(uint32_t) * 2 * rows * g.layout.rowStride + rows * g.layout.phaseWidth + rows;
    return (bytes + 63) / 64 * 64;
}

inline Band bandAt(uint8_t* base, Geometry const& g)
{
    long long const rows = bandRowsPadded(g);
    Band b;
    b.pos = reinterpret_cast<uint32_t*>(base);
    b.zero = b.pos + rows * g.layout.rowStride;
    b.pixelZero = reinterpret_cast<uint8_t*>(b.zero + rows * g.layout.rowStride);
    b.rowZero = b.pixelZero + rows * g.layout.phaseWidth;
    return b;
}

inline uint32_t validBits(int channels, int word)
{
    int const left = channels - 32 * word;
    return left >= 32 ? 0xffffffffu : (1u << left) - 1u;
}

// Padded row r of image n into local row `local` of the band.
template <bool kThreshold>
inline void packRow(BinaryConvLayer const& layer, BinaryConvCall const& call, Geometry const& g, float const* threshold,
    Band const& band, int n, int r, int local)
{
    PlaneLayout const& l = g.layout;
    uint32_t* pos = band.pos + local * l.rowStride;
    uint32_t* zero = band.zero + local * l.rowStride;
    uint8_t* pixelZero = band.pixelZero + static_cast<long long>(local) * l.phaseWidth;
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
    band.rowZero[local] = 0;
    if (!inside)
    {
        return;
    }
    uint8_t rowHasZero = 0;
    for (int c0 = 0; c0 < g.width; c0 += kLanes)
    {
        int const count = minInt(kLanes, g.width - c0);
        uint32_t zeroAny[kLanes] = {};
        for (int word = 0; word < l.words; ++word)
        {
            uint32_t posBits[kLanes] = {};
            uint32_t zeroBits[kLanes] = {};
            float const* xc = call.x + (static_cast<long long>(n) * g.channels + 32 * word) * g.hw
                + static_cast<long long>(h) * g.width + c0;
            int const bits = minInt(32, g.channels - 32 * word);
            float const* t = kThreshold ? threshold + 32 * word : nullptr;
            if (count == kLanes)
            {
                signBits<kThreshold>(xc, g.hw, t, bits, posBits, zeroBits);
            }
            else // the row's last pixels: no vector read past its end
            {
                for (int b = 0; b < bits; ++b, xc += g.hw)
                {
                    for (int p = 0; p < count; ++p)
                    {
                        float const v = kThreshold ? xc[p] + t[b] : xc[p]; // one IEEE add, as the spec
                        posBits[p] |= static_cast<uint32_t>(v > 0.0f) << b;
                        zeroBits[p] |= static_cast<uint32_t>(v == 0.0f) << b; // +0.0 and -0.0
                    }
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
    band.rowZero[local] = rowHasZero;
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
// weight sign, per word 2 * popc(Zb & W) - popc(Zb). `local`: the band row of the window's first row.
inline void correctZeros(BinaryConvLayer const& layer, Geometry const& g, Band const& band, int local, int ow0,
    int count, int o0, int channels, int32_t (*dots)[kTileWidth])
{
    PlaneLayout const& l = g.layout;
    bool any = false;
    for (int i = 0; i < g.kernel; ++i)
    {
        any = any || band.rowZero[local + i];
    }
    if (!any)
    {
        return;
    }
    for (int p = 0; p < count; ++p)
    {
        for (int i = 0; i < g.kernel; ++i)
        {
            if (!band.rowZero[local + i])
            {
                continue;
            }
            for (int j = 0; j < g.kernel; ++j)
            {
                int const q = ow0 + p + j; // padded column of tap j
                if (!band.pixelZero[static_cast<long long>(local + i) * l.phaseWidth + q])
                {
                    continue;
                }
                uint32_t const* zb = band.zero + (local + i) * l.rowStride + q;
                for (int word = 0; word < l.words; ++word)
                {
                    uint32_t const z = zb[word * l.phaseWidth];
                    if (!z)
                    {
                        continue;
                    }
                    int const zeros = popcountScalar(z);
                    uint32_t const* w
                        = layer.weights + (static_cast<long long>(o0) * g.taps + i * g.kernel + j) * l.words + word;
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
// z = alpha * dot [+ bias0; PReLU; + bias1; + x], for `count` pixels (a loop the compiler vectorises).
template <bool kFused, bool kResidual>
inline void transform(float alpha, float bias0, float slope, float bias1, int32_t const* dot, float const* x, int count,
    float* z)
{
    for (int p = 0; p < count; ++p)
    {
        float v = alpha * static_cast<float>(dot[p]);
        if (kFused)
        {
            v = v + bias0;
            v = v >= 0.0f ? v : slope * v;
            v = v + bias1;
            if (kResidual)
            {
                v = v + x[p];
            }
        }
        z[p] = v;
    }
}

template <bool kFused, bool kResidual>
inline void storeOutputs(BinaryConvLayer const& layer, BinaryConvCall const& call, Geometry const& g, int n, int oh,
    int ow0, int count, int o0, int channels, int32_t (*dots)[kTileWidth])
{
    long long const offset = static_cast<long long>(oh) * g.width + ow0;
    for (int c = 0; c < channels; ++c)
    {
        int const o = o0 + c;
        long long const go = static_cast<long long>(call.group) * g.outChannels + o;
        float const bias0 = kFused ? layer.bias0[go] : 0.0f;
        float const slope = kFused ? layer.slope[go] : 0.0f;
        float const bias1 = kFused ? layer.bias1[go] : 0.0f;
        float const* x = kResidual ? call.x + (static_cast<long long>(n) * g.channels + o) * g.hw + offset : nullptr;
        float z[kTileWidth];
        transform<kFused, kResidual>(layer.alpha[o], bias0, slope, bias1, dots[c], x, count, z);
        storeRow(call.y + (static_cast<long long>(n) * g.outChannels + o) * g.hw + offset, z, count, g.stream);
    }
}

// Output rows [h0, h1) of image n, all channels: each input row is packed right before the first output row that
// reads it.
template <bool kFused, bool kResidual>
inline void convolveBand(BinaryConvLayer const& layer, BinaryConvCall const& call, Geometry const& g,
    float const* threshold, long long const* offsets, Band const& band, int n, int h0, int h1)
{
    PlaneLayout const& l = g.layout;
    int const k = g.channels * g.taps;
    bool const zeroPadding = layer.padValue == 0 && g.pad > 0;
    int packed = 0; // band rows packed so far
    for (int oh = h0; oh < h1; ++oh)
    {
        int const local = oh - h0;
        for (; packed <= local + 2 * g.pad; ++packed)
        {
            packRow<kFused>(layer, call, g, threshold, band, n, h0 + packed, packed);
        }
        for (int block = 0; block < layer.blocked.blocks; ++block)
        {
            int const o0 = block * kTileChannels;
            int const channels = minInt(kTileChannels, g.outChannels - o0);
            Tile tile{band.pos + local * l.rowStride, l, g.taps, offsets,
                layer.blocked.words + static_cast<long long>(block) * g.taps * l.words * kTileChannels};
            for (int ow0 = 0; ow0 < g.width; ow0 += kTileWidth, tile.origin += kTileWidth)
            {
                int32_t dots[kTileChannels][kTileWidth];
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
                correctZeros(layer, g, band, local, ow0, count, o0, channels, dots);
                storeOutputs<kFused, kResidual>(layer, call, g, n, oh, ow0, count, o0, channels, dots);
            }
        }
    }
}

template <bool kFused, bool kResidual>
inline void convolve(BinaryConvLayer const& layer, BinaryConvCall const& call, Geometry const& g,
    float const* threshold, uint8_t* buffers, int threads)
{
    long long offsets[9];
    tapOffsets(g.layout, g.kernel, g.kernel, offsets);
    long long const bands = static_cast<long long>(call.batch) * g.bandsPerImage;
#pragma omp parallel num_threads(threads) if (threads > 1 && bands > 1)
    {
        Band const band = bandAt(buffers + bandBytes(g) * threadIndex(), g);
#pragma omp for schedule(dynamic)
        for (long long b = 0; b < bands; ++b)
        {
            int const n = static_cast<int>(b / g.bandsPerImage);
            int const h0 = static_cast<int>(b - static_cast<long long>(n) * g.bandsPerImage) * g.bandRows;
            convolveBand<kFused, kResidual>(layer, call, g, threshold, offsets, band, n, h0,
                minInt(h0 + g.bandRows, g.height));
        }
        storeFence();
    }
}

inline int run(BinaryConvLayer const& layer, BinaryConvCall const& call)
{
    int const threads = threadCount(call.threads);
    Geometry const g = geometry(layer, call, threads);
    Scratch scratch(bandBytes(g) * threads);
    if (!scratch.ok())
    {
        return BDM_CPU_OUT_OF_MEMORY;
    }
    float const* threshold
        = layer.threshold ? layer.threshold + static_cast<long long>(call.group) * g.channels : nullptr;
    uint8_t* buffers = scratch.as<uint8_t>();
    if (!layer.threshold)
    {
        convolve<false, false>(layer, call, g, nullptr, buffers, threads);
    }
    else if (layer.residual)
    {
        convolve<true, true>(layer, call, g, threshold, buffers, threads);
    }
    else
    {
        convolve<true, false>(layer, call, g, threshold, buffers, threads);
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
