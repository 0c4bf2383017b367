// Tensor-core MultiBasisConv (act_bits 4 and 8): an implicit GEMM of the activation code bit-planes against the
// packed sign bases, one mma.sync.m16n8k256.b1.and.popc per plane, operand and 16x8x256 tile (native BMMA on
// sm_80..sm_90). multibasis_conv_tensor_core.cuh derives the arithmetic; the epilogue is the simple kernel's.
//
// The kernel is written as per-thread phases (stage a K chunk, multiply, publish row counts, epilogue) that are
// __host__ __device__: bdm_multibasis_conv_host(..., BDM_CONV_TENSOR_CORE) runs the same phases block by block on
// the CPU, with the mma replaced by an emulation of the PTX ISA's fragment layout, so the tiling, staging, fragment
// indexing and plane weighting are checked on machines without a GPU.
#include "multibasis_conv_tensor_core.cuh"

#include <vector>

namespace bdm
{
namespace mb
{
namespace tc
{
namespace
{

// The kernels' two compile-time parameters: act_bits and num_bases.
template <int BitsT, int BasesT>
struct Variant
{
    static constexpr int kBits = BitsT;
    static constexpr int kBases = BasesT;
};

// Calls f(Variant<act_bits, num_bases>{}) for the geometry's act_bits (4 or 8) and num_bases.
template <typename F>
void withVariant(Geometry const& geo, F f)
{
    if (geo.actBits == 4)
    {
        geo.numBases == 1 ? f(Variant<4, 1>{}) : f(Variant<4, 2>{});
    }
    else
    {
        geo.numBases == 1 ? f(Variant<8, 1>{}) : f(Variant<8, 2>{});
    }
}

template <int Bits, int Bases>
__global__ void __launch_bounds__(kThreads) tensorCoreConvKernel(
    bdm_multibasis_conv_tensors ts, Geometry geo, uint32_t const* planes)
{
    __shared__ Tile<Bits, Bases> tile;
    long long const m0 = static_cast<long long>(blockIdx.x) * kTileM;
    int const n0 = blockIdx.y * kTileN;
    int const tid = threadIdx.x;
    Loader<Bits, Bases> loader(geo, ts, m0, n0, tid);
    Accumulators acc{};
    for (int k0 = 0; k0 < geo.tapWords; k0 += kChunkWords)
    {
        loader.stage(tile, geo, planes, k0);
        __syncthreads();
        multiplyChunk(tile, tid >> 5, tid & 31, acc);
        __syncthreads();
    }
    loader.publish(tile);
    __syncthreads();
    epilogue(tile, ts, geo, m0, n0, tid >> 5, tid & 31, acc);
}

#ifndef __CUDA_ARCH__
// The PTX ISA's fragment layout of mma.m16n8k256 .b1 (grp = lane / 4, tig = lane % 4), written independently of
// the kernel's loaders: register i of A holds row grp + 8*(i % 2), K word tig + 4*(i / 2); register i of B column
// grp, K word tig + 4*i; register i of D row grp + 8*(i / 2), column 2*tig + i % 2. d += popc(A AND B).
void emulateMma(int (&d)[32][4], uint32_t const (&a)[32][4], uint32_t const (&b)[32][2])
{
    uint32_t rowsA[16][8];
    uint32_t colsB[8][8];
    for (int lane = 0; lane < 32; ++lane)
    {
        int const grp = lane >> 2;
        int const tig = lane & 3;
        for (int i = 0; i < 4; ++i)
        {
            rowsA[grp + 8 * (i % 2)][tig + 4 * (i / 2)] = a[lane][i];
        }
        for (int i = 0; i < 2; ++i)
        {
            colsB[grp][tig + 4 * i] = b[lane][i];
        }
    }
    for (int lane = 0; lane < 32; ++lane)
    {
        for (int i = 0; i < 4; ++i)
        {
            uint32_t const* rowA = rowsA[(lane >> 2) + 8 * (i / 2)];
            uint32_t const* colB = colsB[2 * (lane & 3) + i % 2];
            for (int w = 0; w < 8; ++w)
            {
                d[lane][i] += popcount(rowA[w] & colB[w]);
            }
        }
    }
}

// multiplyChunk for a whole warp (lanes[0..31]), lane by lane, through the kernel's own fragment loaders and
// plane accumulation.
template <int Bits, int Bases>
void emulateWarpChunk(Tile<Bits, Bases> const& tile, int warp, Accumulators* lanes)
{
    constexpr int kOps = kOperands<Bases>;
    for (int j = 0; j < Bits; ++j)
    {
        for (int mt = 0; mt < kMTiles; ++mt)
        {
            uint32_t a[32][4];
            for (int lane = 0; lane < 32; ++lane)
            {
                loadAFragment(tile.planes[j], warpRow(warp) + mt * 16, lane, a[lane]);
            }
            for (int nt = 0; nt < kNTiles; ++nt)
            {
                int t[kOps][32][4] = {};
                for (int x = 0; x < kOps; ++x)
                {
                    uint32_t b[32][2];
                    for (int lane = 0; lane < 32; ++lane)
                    {
                        loadBFragment(tile.operands[x], warpCol(warp) + nt * 8, lane, b[lane]);
                    }
                    emulateMma(t[x], a, b);
                }
                for (int lane = 0; lane < 32; ++lane)
                {
                    int laneT[kOps][4];
                    for (int x = 0; x < kOps; ++x)
                    {
                        for (int r = 0; r < 4; ++r)
                        {
                            laneT[x][r] = t[x][lane][r];
                        }
                    }
                    accumulatePlane<Bases>(lanes[lane], mt, nt, planeWeight(j, Bits), laneT);
                }
            }
        }
    }
}

template <int Bits, int Bases>
void emulate(bdm_multibasis_conv_tensors const& ts, Geometry const& geo, uint32_t const* planes)
{
    Tile<Bits, Bases> tile;
    for (long long m0 = 0; m0 < geo.outPixels; m0 += kTileM)
    {
        for (int n0 = 0; n0 < geo.outChannels; n0 += kTileN)
        {
            std::vector<Loader<Bits, Bases>> loaders;
            for (int tid = 0; tid < kThreads; ++tid)
            {
                loaders.emplace_back(geo, ts, m0, n0, tid);
            }
            std::vector<Accumulators> lanes(kThreads, Accumulators{});
            for (int k0 = 0; k0 < geo.tapWords; k0 += kChunkWords)
            {
                for (auto& l : loaders) // between the barriers every thread stages, then every warp multiplies
                {
                    l.stage(tile, geo, planes, k0);
                }
                for (int warp = 0; warp < kThreads / 32; ++warp)
                {
                    emulateWarpChunk(tile, warp, lanes.data() + warp * 32);
                }
            }
            for (auto const& l : loaders)
            {
                l.publish(tile);
            }
            for (int tid = 0; tid < kThreads; ++tid)
            {
                epilogue(tile, ts, geo, m0, n0, tid >> 5, tid & 31, lanes[tid]);
            }
        }
    }
}
#endif

} // namespace

#ifndef __CUDA_ARCH__
void emulateTensorCoreConv(bdm_multibasis_conv_tensors const& ts, Geometry const& geo, uint32_t const* planes)
{
    withVariant(geo, [&](auto v) { emulate<decltype(v)::kBits, decltype(v)::kBases>(ts, geo, planes); });
}
#endif

} // namespace tc

void launchTensorCoreConv(bdm_multibasis_conv_tensors const& ts, Geometry const& geo, uint32_t const* planes,
    cudaStream_t stream)
{
    dim3 const grid(static_cast<unsigned>((geo.outPixels + tc::kTileM - 1) / tc::kTileM),
        static_cast<unsigned>((geo.outChannels + tc::kTileN - 1) / tc::kTileN));
    tc::withVariant(geo, [&](auto v) {
        tc::tensorCoreConvKernel<decltype(v)::kBits, decltype(v)::kBases><<<grid, tc::kThreads, 0, stream>>>(
            ts, geo, planes);
    });
}

} // namespace mb
} // namespace bdm
