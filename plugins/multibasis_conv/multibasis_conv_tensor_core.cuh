// Phases of MultiBasisConv's tensor-core kernel (multibasis_conv_tensor_core.cu), per thread and __host__ __device__
// so that the host emulation runs the kernel's own code. The block tiling (64 output pixels x 64 output channels,
// 4 warps of 32 x 32, K chunks of 256 bits, 12-word shared rows), the A fragment loader and the mma are the binary
// conv's (../binary_conv/binary_conv_tensor_core.cuh); what differs is the operands and the accumulation.
//
// GEMM: rows = output pixels (im2col of the code bit-planes P_j), K = taps * words, columns = output channels.
// Per plane j and weight-side operand X the mma gives popc(P_j & X) of a 256-bit chunk; weighting the planes by
// w_j (2^j, -2^(b-1) for the sign plane) cannot happen inside the mma, so each plane's product starts from zero and
// is added, times w_j, to two class accumulators. With S = B1 XNOR B2 and R = sum_j w_j popc(P_j) over the pixel's K
// (counted by the loaders):
//   one basis  (X = W1):                 dot_same = 2*acc_W1 - R
//   two bases  (X = W1&S, S, W1&~S):     dot_same = 2*acc_W1&S - acc_S,  dot_diff = 2*acc_W1&~S + acc_S - R
// (P_j has no bits past in_channels, so popc(P_j & ~S) = popc(P_j) - popc(P_j & S)). The epilogue is the simple
// kernel's (outputQuantized), so both kernels give bit-identical results.
#pragma once

#include "../binary_conv/binary_conv_tensor_core.cuh"
#include "multibasis_conv_device.cuh"

namespace bdm
{
namespace mb
{
namespace tc
{

using ::bdm::tc::kChunkWords;
using ::bdm::tc::kMTiles;
using ::bdm::tc::kNTiles;
using ::bdm::tc::kRowStride;
using ::bdm::tc::kThreads;
using ::bdm::tc::kTileM;
using ::bdm::tc::kTileN;
using ::bdm::tc::loadAFragment;
using ::bdm::tc::warpCol;
using ::bdm::tc::warpRow;

// Weight-side operands per K word: W1 (one basis); W1 & S, S, W1 & ~S (two bases).
template <int Bases>
constexpr int kOperands = Bases == 1 ? 1 : 3;

// A8 with two bases: 8 * 3 KB of planes + 9 KB of operands + 0.5 KB of counts, under the 48 KB static limit.
template <int Bits, int Bases>
struct Tile
{
    uint32_t planes[Bits][kTileM * kRowStride];                 // A: code bit-plane j of the chunk, row = output pixel
    uint32_t operands[kOperands<Bases>][kTileN * kRowStride];  // B: row = output channel
    int rowCount[2][kTileM]; // per-pixel R = sum_j w_j popc(P_j) over all of K, one partial per loader half
};

// Class accumulators of this lane's outputs (see the top of this file); diff stays 0 with one basis.
struct Accumulators
{
    int same[kMTiles][kNTiles][4];
    int diff[kMTiles][kNTiles][4];
};

// The code planes of GEMM column kw (tap kw / words, word kw % words) of output `at`, or nullptr for a padded tap.
__host__ __device__ inline uint32_t const* im2colPlanes(uint32_t const* planes, Geometry const& geo,
    OutCoord const& at, int kw)
{
    int const tap = kw / geo.words;
    int const word = kw - tap * geo.words;
    int const i = tap / geo.kernelW;
    long long const pixel = tapPixel(geo, at, i, tap - i * geo.kernelW);
    return pixel < 0 ? nullptr : planes + (pixel * geo.words + word) * geo.actBits;
}

// Loader role: thread tid fills words half*4 .. half*4+3 of row tid/2 of every plane and operand tile, and
// accumulates its pixel's R over all of K.
template <int Bits, int Bases>
struct Loader
{
    __host__ __device__ Loader(
        Geometry const& geo, bdm_multibasis_conv_tensors const& ts, long long m0, int n0, int tid)
        : row(tid >> 1)
        , half(tid & 1)
    {
        long long const outPixel = m0 + row;
        pixelValid = outPixel < geo.outPixels;
        at = outCoord(geo, pixelValid ? outPixel : 0);
        int const o = n0 + row;
        oValid = o < geo.outChannels;
        uint32_t const* weight = reinterpret_cast<uint32_t const*>(ts.weight);
        w1Row = weight + static_cast<long long>(oValid ? o : 0) * geo.tapWords;
        w2Row = Bases == 2 ? w1Row + static_cast<long long>(geo.outChannels) * geo.tapWords : nullptr; // basis 1
    }

    __host__ __device__ void stage(Tile<Bits, Bases>& tile, Geometry const& geo, uint32_t const* planes, int k0)
    {
BDM_UNROLL
        for (int q = 0; q < 4; ++q)
        {
            int const slot = half * 4 + q;
            int const index = row * kRowStride + slot;
            int const kw = k0 + slot;
            bool const inK = kw < geo.tapWords; // K is zero-padded to whole chunks: zero words add nothing
            uint32_t const* src = pixelValid && inK ? im2colPlanes(planes, geo, at, kw) : nullptr;
BDM_UNROLL
            for (int j = 0; j < Bits; ++j)
            {
                uint32_t const p = src ? src[j] : 0u;
                tile.planes[j][index] = p;
                count += planeWeight(j, Bits) * popcount(p);
            }
            uint32_t const w1 = oValid && inK ? w1Row[kw] : 0u;
            if constexpr (Bases == 1)
            {
                tile.operands[0][index] = w1;
            }
            else
            {
                uint32_t const same = oValid && inK ? ~(w1 ^ w2Row[kw]) : 0u;
                tile.operands[0][index] = w1 & same;
                tile.operands[1][index] = same;
                tile.operands[2][index] = w1 & ~same;
            }
        }
    }

    __host__ __device__ void publish(Tile<Bits, Bases>& tile) const
    {
        tile.rowCount[half][row] = count;
    }

    int row;
    int half;
    bool pixelValid;
    bool oValid;
    OutCoord at;
    uint32_t const* w1Row;
    uint32_t const* w2Row;
    int count = 0;
};

// b[0], b[1]: words tig and tig+4 of column grp of the 8-column operand tile at colBase.
__host__ __device__ inline void loadBFragment(uint32_t const* operand, int colBase, int lane, uint32_t (&b)[2])
{
    int const col = colBase + (lane >> 2);
    b[0] = operand[col * kRowStride + (lane & 3)];
    b[1] = operand[col * kRowStride + (lane & 3) + 4];
}

// Adds plane weight w times this lane's products t[X] of tile (mt, nt), each computed from zero, to the classes.
template <int Bases>
__host__ __device__ inline void accumulatePlane(Accumulators& acc, int mt, int nt, int w,
    int const (&t)[kOperands<Bases>][4])
{
BDM_UNROLL
    for (int r = 0; r < 4; ++r)
    {
        if constexpr (Bases == 1)
        {
            acc.same[mt][nt][r] += w * 2 * t[0][r];
        }
        else
        {
            acc.same[mt][nt][r] += w * (2 * t[0][r] - t[1][r]);
            acc.diff[mt][nt][r] += w * (2 * t[2][r] + t[1][r]);
        }
    }
}

#ifdef __CUDACC__
// One K chunk for one warp: every plane against the operand fragments, which are loaded once per chunk.
template <int Bits, int Bases>
__device__ inline void multiplyChunk(Tile<Bits, Bases> const& tile, int warp, int lane, Accumulators& acc)
{
    uint32_t b[kNTiles][kOperands<Bases>][2];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
    {
#pragma unroll
        for (int x = 0; x < kOperands<Bases>; ++x)
        {
            loadBFragment(tile.operands[x], warpCol(warp) + nt * 8, lane, b[nt][x]);
        }
    }
#pragma unroll
    for (int j = 0; j < Bits; ++j)
    {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
        {
            loadAFragment(tile.planes[j], warpRow(warp) + mt * 16, lane, a[mt]);
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
        {
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
            {
                int t[kOperands<Bases>][4] = {};
#pragma unroll
                for (int x = 0; x < kOperands<Bases>; ++x)
                {
                    ::bdm::tc::mmaAndPopc(t[x], a[mt], b[nt][x][0], b[nt][x][1]);
                }
                accumulatePlane<Bases>(acc, mt, nt, planeWeight(j, Bits), t);
            }
        }
    }
}
#endif

// The exact class dots of one output from its accumulators and its pixel's R.
template <int Bases>
__host__ __device__ inline ClassDots classDots(int same, int diff, int rowCount)
{
    ClassDots d;
    d.same = Bases == 1 ? same - rowCount : same;
    d.diff = Bases == 1 ? 0 : diff - rowCount;
    return d;
}

// The outputs of this lane's accumulators (::bdm::tc::forEachAccumulator has the fragment layout).
template <int Bits, int Bases>
__host__ __device__ inline void epilogue(Tile<Bits, Bases> const& tile, bdm_multibasis_conv_tensors const& ts,
    Geometry const& geo, long long m0, int n0, int warp, int lane, Accumulators const& acc)
{
    float const step = activationStep(ts.act_step[0], geo.gradScale);
    OutCoord at{};
    int rowCount = 0;
    ::bdm::tc::forEachAccumulator(
        warp, lane,
        [&](int row) {
            long long const outPixel = m0 + row;
            if (outPixel >= geo.outPixels)
            {
                return false;
            }
            at = outCoord(geo, outPixel);
            rowCount = tile.rowCount[0][row] + tile.rowCount[1][row];
            return true;
        },
        [&](int mt, int nt, int r, int col) {
            int const o = n0 + col;
            if (o < geo.outChannels)
            {
                ClassDots const d = classDots<Bases>(acc.same[mt][nt][r], acc.diff[mt][nt][r], rowCount);
                ClassValues const v = classValues(ts.scale, geo, o);
                storeOutput(ts, geo, at, o, outputQuantized(d, v, step, ts.bias[o]));
            }
        });
}

// The whole launch on the CPU, block by block, with the mma emulated from the PTX ISA layout (host only).
void emulateTensorCoreConv(bdm_multibasis_conv_tensors const& ts, Geometry const& geo, uint32_t const* planes);

} // namespace tc

// Tensor-core path (multibasis_conv_tensor_core.cu) for act_bits 4 and 8: same planes in, same epilogue out.
void launchTensorCoreConv(bdm_multibasis_conv_tensors const& ts, Geometry const& geo, uint32_t const* planes,
    cudaStream_t stream);

} // namespace mb
} // namespace bdm
