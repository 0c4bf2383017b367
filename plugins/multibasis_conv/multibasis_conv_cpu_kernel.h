// MultiBasisConv (act_bits 4 / 8) on the CPU, one instruction-set path: defines that path's multibasisConv entry
// point, so it is included once by each plugins/common/cpu_isa_*.cpp. README.md beside this file explains the
// arithmetic; it is the CUDA kernel's (multibasis_conv_device.cuh), so outputs equal its host path bit for bit.
//
// 1. Quantize + pack (one pass over x, threaded over rows): codes k = round_half_even(clamp(x / step, Qn, Qp)) with
//    a true float32 division, stored as act_bits two's-complement bit-planes per padded row (padding and channels
//    past in_channels: code 0), columns split by stride phase (cpu_simd.h PlaneLayout), and the sum of the codes of
//    each pixel over its channels.
// 2. Bit-serial popcount conv (threaded over output rows x channel blocks): per virtual channel (o, basis k),
//    acc_k = sum_j w_j popc(P_j AND B_k) over the window (w_j = 2^j, the top plane negative), so with R the window's
//    code sum d_k = sum_c code_c * B_k,c = 2 * acc_k - R, exactly.
// 3. Epilogue: the CUDA kernel's classes S = B1 XNOR B2 from the two exact dots, dot_same = (d1 + d2) / 2 and
//    dot_diff = (d1 - d2) / 2, then y = bias + step * (v_same * dot_same + v_diff * dot_diff), one float32
//    operation at a time (one basis: dot_same = d1, dot_diff = 0).
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
namespace multibasis
{

constexpr int kPackChunk = 128; // pixels of a row quantized per step (stack arrays of the pack pass)
// (v + 1.5 * 2^23) - 1.5 * 2^23 rounds |v| < 2^22 to the nearest integer, ties to even, in the default rounding mode:
// rintf's result, with two adds that vectorise on every target (the build has no -ffast-math to fold them).
constexpr float kRoundHalfEven = 12582912.0f;

struct Geometry
{
    int channels;
    int outChannels;
    int height;
    int width;
    int outHeight;
    int outWidth;
    int paddedHeight;
    int taps;
    int qn;
    int qp;
    PlaneLayout layout;
    long long hw;
    long long outHw;
    long long imageWords; // paddedHeight * layout.rowStride
    long long sumRowStride; // code sums per padded row: stride * phaseWidth
};

inline int outSize(int length, int kernel, int stride, int padding)
{
    return (length + 2 * padding - kernel) / stride + 1;
}

inline Geometry geometry(MultibasisConvLayer const& layer, MultibasisConvCall const& call)
{
    Geometry g;
    g.channels = layer.inChannels;
    g.outChannels = layer.outChannels;
    g.height = call.height;
    g.width = call.width;
    g.outHeight = outSize(call.height, layer.kernelH, layer.stride, layer.padH);
    g.outWidth = outSize(call.width, layer.kernelW, layer.stride, layer.padW);
    g.paddedHeight = call.height + 2 * layer.padH;
    g.taps = layer.kernelH * layer.kernelW;
    g.qn = -(1 << (layer.actBits - 1));
    g.qp = (1 << (layer.actBits - 1)) - 1;
    g.layout = planeLayout(layer.actBits, layer.words, layer.stride, call.width + 2 * layer.padW, g.outWidth,
        layer.kernelW);
    g.hw = static_cast<long long>(call.height) * call.width;
    g.outHw = static_cast<long long>(g.outHeight) * g.outWidth;
    g.imageWords = g.paddedHeight * g.layout.rowStride;
    g.sumRowStride = g.layout.wordStride();
    return g;
}

// Padded row r of image n: the code bit-planes and the per-pixel code sums.
template <int kBits>
inline void packRow(MultibasisConvLayer const& layer, MultibasisConvCall const& call, Geometry const& g,
    uint32_t* planes, int32_t* sums, int n, int r)
{
    PlaneLayout const& l = g.layout;
    long long const row = static_cast<long long>(n) * g.paddedHeight + r;
    uint32_t* dst = planes + row * l.rowStride;
    int32_t* sumRow = sums + row * g.sumRowStride;
    std::memset(dst, 0, sizeof(uint32_t) * l.rowStride);
    std::memset(sumRow, 0, sizeof(int32_t) * g.sumRowStride);
    int const h = r - layer.padH;
    if (h < 0 || h >= g.height)
    {
        return;
    }
    float const step = call.step;
    float const qn = static_cast<float>(g.qn);
    float const qp = static_cast<float>(g.qp);
    for (int c0 = 0; c0 < g.width; c0 += kPackChunk)
    {
        int const count = minInt(kPackChunk, g.width - c0);
        int32_t codeSum[kPackChunk];
        for (int p = 0; p < count; ++p)
        {
            codeSum[p] = 0;
        }
        for (int word = 0; word < l.words; ++word)
        {
            uint32_t bits[kBits][kPackChunk];
            for (int j = 0; j < kBits; ++j)
            {
                for (int p = 0; p < count; ++p)
                {
                    bits[j][p] = 0;
                }
            }
            int const channels = minInt(32, g.channels - 32 * word);
            for (int b = 0; b < channels; ++b)
            {
                float const* xc = call.x + (static_cast<long long>(n) * g.channels + 32 * word + b) * g.hw
                    + static_cast<long long>(h) * g.width + c0;
                for (int p = 0; p < count; ++p)
                {
                    float v = xc[p] / step; // a true IEEE division, as the spec
                    v = v < qn ? qn : (v > qp ? qp : v);
                    int32_t const code = static_cast<int32_t>((v + kRoundHalfEven) - kRoundHalfEven);
                    codeSum[p] += code;
                    uint32_t const u = static_cast<uint32_t>(code);
                    for (int j = 0; j < kBits; ++j)
                    {
                        bits[j][p] |= ((u >> j) & 1u) << b;
                    }
                }
            }
            for (int j = 0; j < kBits; ++j)
            {
                uint32_t* planeRow = dst + static_cast<long long>(j * l.words + word) * l.wordStride();
                for (int p = 0; p < count; ++p)
                {
                    int const cp = c0 + p + layer.padW; // padded column
                    planeRow[(cp % l.stride) * l.phaseWidth + cp / l.stride] = bits[j][p];
                }
            }
        }
        for (int p = 0; p < count; ++p)
        {
            int const cp = c0 + p + layer.padW;
            sumRow[(cp % l.stride) * l.phaseWidth + cp / l.stride] = codeSum[p];
        }
    }
}

// The CUDA kernel's epilogue for the tile's `outputs` channels from o0 and `count` pixels: store(m, z) writes channel
// o0 + m's values z.
template <typename Store>
inline void storeOutputs(MultibasisConvLayer const& layer, float step, int32_t (*acc)[kTileWidth],
    int32_t const* window, int count, int o0, int outputs, Store store)
{
    int const bases = layer.numBases;
    for (int m = 0; m < outputs; ++m)
    {
        int const o = o0 + m;
        float const same = layer.classSame[o];
        float const diff = layer.classDiff[o];
        float const bias = layer.bias[o];
        int32_t const* acc1 = acc[bases * m];
        int32_t const* acc2 = acc[bases * m + bases - 1];
        float z[kTileWidth];
        for (int p = 0; p < count; ++p)
        {
            int32_t const d1 = 2 * acc1[p] - window[p];
            int32_t const d2 = bases == 2 ? 2 * acc2[p] - window[p] : d1;
            int32_t const dotSame = (d1 + d2) / 2; // even: both sums run over the same codes
            int32_t const dotDiff = (d1 - d2) / 2;
            float v = same * static_cast<float>(dotSame);
            v = v + diff * static_cast<float>(dotDiff);
            z[p] = bias + step * v;
        }
        store(m, z);
    }
}

// Row mode: tiles along each output row, reading the padded planes directly.
inline void convolveRows(MultibasisConvLayer const& layer, MultibasisConvCall const& call, Geometry const& g,
    uint32_t const* planes, int32_t const* sums, long long const* offsets, long long const* sumOffsets, int threads)
{
    PlaneLayout const& l = g.layout;
    int const blocks = layer.blocked.blocks;
    int const perBlock = kTileChannels / layer.numBases;
    long long const items = static_cast<long long>(call.batch) * g.outHeight * blocks;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && items > 1)
    for (long long item = 0; item < items; ++item)
    {
        long long const row = item / blocks;
        int const block = static_cast<int>(item - row * blocks);
        int const n = static_cast<int>(row / g.outHeight);
        int const oh = static_cast<int>(row - static_cast<long long>(n) * g.outHeight);
        int const o0 = block * perBlock;
        Tile tile{planes + n * g.imageWords + static_cast<long long>(oh) * l.stride * l.rowStride, l, g.taps, offsets,
            layer.blocked.words + static_cast<long long>(block) * g.taps * l.words * kTileChannels};
        int32_t const* rowSums = sums + (static_cast<long long>(n) * g.paddedHeight + oh * l.stride) * g.sumRowStride;
        for (int ow0 = 0; ow0 < g.outWidth; ow0 += kTileWidth, tile.origin += kTileWidth)
        {
            int32_t acc[kTileChannels][kTileWidth];
            popcountTile<false>(tile, acc);
            int32_t window[kTileWidth] = {}; // R: the window's code sum
            for (int tap = 0; tap < g.taps; ++tap)
            {
                int32_t const* s = rowSums + sumOffsets[tap] + ow0;
                for (int p = 0; p < kTileWidth; ++p)
                {
                    window[p] += s[p];
                }
            }
            int const count = minInt(kTileWidth, g.outWidth - ow0);
            float* y = call.y + (static_cast<long long>(n) * g.outChannels + o0) * g.outHw
                + static_cast<long long>(oh) * g.outWidth + ow0;
            storeOutputs(layer, call.step, acc, window, count, o0, minInt(perBlock, g.outChannels - o0),
                [&](int m, float const* z) { storeRow(y + m * g.outHw, z, count, false); });
        }
    }
}

// Flat mode, for narrow outputs (a row would fill a tile poorly): the windows of all output pixels of the batch
// gathered into one row (im2col, K = taps * words per plane), so tiles run over consecutive output pixels; then the
// same tile as a 1 x 1 convolution.
struct Columns
{
    PlaneLayout layout; // one row: planes x (taps * words) x pixels, pixels padded to whole tiles
    long long pixels;   // batch * outHeight * outWidth
};

inline Columns columnsFor(MultibasisConvLayer const& layer, Geometry const& g, int batch)
{
    Columns c;
    c.pixels = static_cast<long long>(batch) * g.outHw;
    long long const padded = (c.pixels + kTileWidth - 1) / kTileWidth * kTileWidth;
    c.layout.planes = layer.actBits;
    c.layout.words = g.taps * layer.words;
    c.layout.stride = 1;
    c.layout.phaseWidth = static_cast<int>(padded);
    c.layout.rowStride = static_cast<long long>(c.layout.planes) * c.layout.words * padded;
    return c;
}

inline void gatherColumns(Geometry const& g, uint32_t const* planes, int32_t const* sums, long long const* offsets,
    long long const* sumOffsets, Columns const& c, uint32_t* columns, int32_t* windows, int threads)
{
    PlaneLayout const& l = g.layout;
    long long const width = c.layout.phaseWidth;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long long p = 0; p < width; ++p)
    {
        int32_t window = 0;
        if (p < c.pixels)
        {
            long long const n = p / g.outHw;
            long long const q = p - n * g.outHw;
            int const oh = static_cast<int>(q / g.outWidth);
            int const ow = static_cast<int>(q - static_cast<long long>(oh) * g.outWidth);
            long long const row = static_cast<long long>(oh) * l.stride; // the window's first padded row
            uint32_t const* origin = planes + n * g.imageWords + row * l.rowStride + ow;
            int32_t const* sumOrigin = sums + (n * g.paddedHeight + row) * g.sumRowStride + ow;
            for (int tap = 0; tap < g.taps; ++tap)
            {
                window += sumOrigin[sumOffsets[tap]];
                for (int plane = 0; plane < l.planes; ++plane)
                {
                    uint32_t const* src = origin + offsets[tap] + plane * l.words * l.wordStride();
                    uint32_t* dst
                        = columns + (static_cast<long long>(plane) * c.layout.words + tap * l.words) * width + p;
                    for (int word = 0; word < l.words; ++word)
                    {
                        dst[word * width] = src[word * l.wordStride()];
                    }
                }
            }
        }
        else
        {
            for (long long k = 0; k < static_cast<long long>(c.layout.planes) * c.layout.words; ++k)
            {
                columns[k * width + p] = 0u;
            }
        }
        windows[p] = window;
    }
}

inline void convolveColumns(MultibasisConvLayer const& layer, MultibasisConvCall const& call, Geometry const& g,
    Columns const& c, uint32_t const* columns, int32_t const* windows, int threads)
{
    int const blocks = layer.blocked.blocks;
    int const perBlock = kTileChannels / layer.numBases;
    long long const tiles = c.layout.phaseWidth / kTileWidth;
    long long const items = tiles * blocks;
    long long const zero = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && items > 1)
    for (long long item = 0; item < items; ++item)
    {
        long long const p0 = item / blocks * kTileWidth;
        int const block = static_cast<int>(item % blocks);
        int const o0 = block * perBlock;
        Tile const tile{columns + p0, c.layout, 1, &zero,
            layer.blocked.words + static_cast<long long>(block) * g.taps * layer.words * kTileChannels};
        int32_t acc[kTileChannels][kTileWidth];
        popcountTile<false>(tile, acc);
        int const count = static_cast<int>(c.pixels - p0 < kTileWidth ? c.pixels - p0 : kTileWidth);
        storeOutputs(layer, call.step, acc, windows + p0, count, o0, minInt(perBlock, g.outChannels - o0),
            [&](int m, float const* z) {
                for (int p = 0; p < count; ++p)
                {
                    long long const n = (p0 + p) / g.outHw;
                    call.y[(n * g.outChannels + o0 + m) * g.outHw + (p0 + p - n * g.outHw)] = z[p];
                }
            });
    }
}

constexpr long long kMaxColumnBytes = 64LL << 20;

// Flat mode where row tiles would waste more than a quarter of their pixels, unless the columns would be large (a
// big batch of narrow images): row mode needs no copy.
inline bool flatMode(Geometry const& g, Columns const& c)
{
    long long const rowTiles = (g.outWidth + kTileWidth - 1) / kTileWidth * kTileWidth;
    long long const columnBytes = c.layout.rowStride * static_cast<long long>(sizeof(uint32_t));
    return rowTiles * 4 > g.outWidth * 5LL && columnBytes <= kMaxColumnBytes;
}

inline int run(MultibasisConvLayer const& layer, MultibasisConvCall const& call)
{
    Geometry const g = geometry(layer, call);
    long long const planeWords = call.batch * g.imageWords;
    long long const sumWords = static_cast<long long>(call.batch) * g.paddedHeight * g.sumRowStride;
    Columns const columns = columnsFor(layer, g, call.batch);
    bool const flat = flatMode(g, columns);
    long long const columnWords = flat ? columns.layout.rowStride + columns.layout.phaseWidth : 0;
    Scratch scratch(sizeof(long long) * 2 * g.taps + sizeof(uint32_t) * (planeWords + sumWords + columnWords));
    if (!scratch.ok())
    {
        return BDM_CPU_OUT_OF_MEMORY;
    }
    // tap offsets in the planes and in the code sums (one plane of one word)
    long long* offsets = scratch.as<long long>();
    long long* sumOffsets = offsets + g.taps;
    tapOffsets(g.layout, layer.kernelH, layer.kernelW, offsets);
    PlaneLayout sumLayout = g.layout;
    sumLayout.planes = sumLayout.words = 1;
    sumLayout.rowStride = g.sumRowStride;
    tapOffsets(sumLayout, layer.kernelH, layer.kernelW, sumOffsets);
    uint32_t* planes = reinterpret_cast<uint32_t*>(sumOffsets + g.taps);
    int32_t* sums = reinterpret_cast<int32_t*>(planes + planeWords);
    int const threads = threadCount(call.threads);
    long long const rows = static_cast<long long>(call.batch) * g.paddedHeight;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && rows > 1)
    for (long long row = 0; row < rows; ++row)
    {
        int const n = static_cast<int>(row / g.paddedHeight);
        int const r = static_cast<int>(row - static_cast<long long>(n) * g.paddedHeight);
        if (layer.actBits == 4)
        {
            packRow<4>(layer, call, g, planes, sums, n, r);
        }
        else
        {
            packRow<8>(layer, call, g, planes, sums, n, r);
        }
    }
    if (!flat)
    {
        convolveRows(layer, call, g, planes, sums, offsets, sumOffsets, threads);
        return BDM_OK;
    }
    uint32_t* columnWordsAt = reinterpret_cast<uint32_t*>(sums + sumWords);
    int32_t* windows = reinterpret_cast<int32_t*>(columnWordsAt + columns.layout.rowStride);
    gatherColumns(g, planes, sums, offsets, sumOffsets, columns, columnWordsAt, windows, threads);
    convolveColumns(layer, call, g, columns, columnWordsAt, windows, threads);
    return BDM_OK;
}

} // namespace multibasis

int multibasisConv(MultibasisConvLayer const& layer, MultibasisConvCall const& call)
{
    return multibasis::run(layer, call);
}

} // namespace BDM_CPU_NS
} // namespace cpu
} // namespace bdm
