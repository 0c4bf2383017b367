// Tensor-core binary convolution: an implicit GEMM D[pixel, o] = sum_k A[pixel, k] AND W[o, k] on packed
// 32-bit words, one mma.sync.m16n8k256.b1.and.popc per 16x8x256 tile (native BMMA on sm_80..sm_90).
// A is im2col'd on the fly from the two sign bit-planes (pos, nonzero); the epilogue is shared with the
// straightforward kernel (binary_conv_device.cuh), so both give identical results.
//
// The kernel is written as per-thread phases (stage a K chunk, multiply, publish row counts, epilogue) that
// are __host__ __device__: bdm_binary_conv2d_host(..., BDM_CONV_TENSOR_CORE) runs the same phases block by block
// on the CPU, with the mma replaced by an emulation of the PTX ISA's fragment layout, so the tiling, staging and
// fragment indexing are checked on machines without a GPU.
#include "binary_conv_tensor_core.cuh"

#include <cuda_fp16.h>
#include <vector>

namespace bdm
{
namespace tc
{

Loader::Loader(ConvGeometry const& geo, bdm_binary_conv_tensors const& ts, long long m0, int n0, int tid)
    : row(tid >> 1)
    , half(tid & 1)
{
    long long const pixel = m0 + row;
    pixelValid = pixel < geo.pixels;
    at = pixelCoord(geo, pixelValid ? pixel : 0);
    int const o = n0 + row;
    oValid = o < geo.outChannels;
    weightRow = reinterpret_cast<uint32_t const*>(ts.weight) + static_cast<long long>(oValid ? o : 0) * geo.tapWords;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) tensorCoreConvKernel(
    bdm_binary_conv_tensors ts, ConvGeometry geo, uint32_t const* pos, uint32_t const* nonzero)
{
    __shared__ Tile tile;
    long long const m0 = static_cast<long long>(blockIdx.x) * kTileM;
    int const n0 = blockIdx.y * kTileN;
    int const tid = threadIdx.x;
    Loader loader(geo, ts, m0, n0, tid);
    Accumulators acc{};
    for (int k0 = 0; k0 < geo.tapWords; k0 += kChunkWords)
    {
        loader.stage(tile, geo, pos, nonzero, k0);
        __syncthreads();
        multiplyChunk(tile, tid >> 5, tid & 31, acc);
        __syncthreads();
    }
    loader.publish(tile);
    __syncthreads();
    epilogue<T>(tile, ts, geo, launchGroup(ts, geo), m0, n0, tid >> 5, tid & 31, acc);
}

#ifndef __CUDA_ARCH__
namespace
{

// The PTX ISA's fragment layout of mma.m16n8k256 .b1 (grp = lane / 4, tig = lane % 4), written independently of
// the kernel's loaders: A rows grp / grp+8 words tig / tig+4 in a[0..3] as (grp,tig) (grp+8,tig) (grp,tig+4)
// (grp+8,tig+4); B column grp words tig, tig+4; D (grp,2tig) (grp,2tig+1) (grp+8,2tig) (grp+8,2tig+1).
void emulateMma(int (*acc)[4], uint32_t const (*a)[4], uint32_t const (*b)[2])
{
    uint32_t A[16][8];
    uint32_t B[8][8];
    for (int lane = 0; lane < 32; ++lane)
    {
        int const grp = lane >> 2;
        int const tig = lane & 3;
        A[grp][tig] = a[lane][0];
        A[grp + 8][tig] = a[lane][1];
        A[grp][tig + 4] = a[lane][2];
        A[grp + 8][tig + 4] = a[lane][3];
        B[grp][tig] = b[lane][0];
        B[grp][tig + 4] = b[lane][1];
    }
    for (int lane = 0; lane < 32; ++lane)
    {
        int const grp = lane >> 2;
        int const tig = lane & 3;
        int const rows[4] = {grp, grp, grp + 8, grp + 8};
        int const cols[4] = {2 * tig, 2 * tig + 1, 2 * tig, 2 * tig + 1};
        for (int r = 0; r < 4; ++r)
        {
            for (int w = 0; w < 8; ++w)
            {
                acc[lane][r] += popcount(A[rows[r]][w] & B[cols[r]][w]);
            }
        }
    }
}

// One k-chunk of multiplyChunk for a whole warp, lane by lane, through the kernel's own fragment loaders.
void emulateWarpChunk(Tile const& tile, int warp, std::vector<Accumulators>& lanes)
{
    for (int mt = 0; mt < kMTiles; ++mt)
    {
        uint32_t aPos[32][4];
        uint32_t aNonzero[32][4];
        for (int lane = 0; lane < 32; ++lane)
        {
            loadAFragment(tile.pos, warpRow(warp) + mt * 16, lane, aPos[lane]);
            loadAFragment(tile.nonzero, warpRow(warp) + mt * 16, lane, aNonzero[lane]);
        }
        for (int nt = 0; nt < kNTiles; ++nt)
        {
            uint32_t b[32][2];
            int accPos[32][4];
            int accNonzero[32][4];
            for (int lane = 0; lane < 32; ++lane)
            {
                loadBFragment(tile, warpCol(warp) + nt * 8, lane, b[lane][0], b[lane][1]);
                for (int r = 0; r < 4; ++r)
                {
                    accPos[lane][r] = lanes[warp * 32 + lane].pos[mt][nt][r];
                    accNonzero[lane][r] = lanes[warp * 32 + lane].nonzero[mt][nt][r];
                }
            }
            emulateMma(accPos, aPos, b);
            emulateMma(accNonzero, aNonzero, b);
            for (int lane = 0; lane < 32; ++lane)
            {
                for (int r = 0; r < 4; ++r)
                {
                    lanes[warp * 32 + lane].pos[mt][nt][r] = accPos[lane][r];
                    lanes[warp * 32 + lane].nonzero[mt][nt][r] = accNonzero[lane][r];
                }
            }
        }
    }
}

} // namespace

template <typename T>
void emulateTensorCoreConv(bdm_binary_conv_tensors const& ts, ConvGeometry const& geo, uint32_t const* pos,
    uint32_t const* nonzero)
{
    int const group = launchGroup(ts, geo);
    Tile tile;
    for (long long m0 = 0; m0 < geo.pixels; m0 += kTileM)
    {
        for (int n0 = 0; n0 < geo.outChannels; n0 += kTileN)
        {
            std::vector<Loader> loaders;
            for (int tid = 0; tid < kThreads; ++tid)
            {
                loaders.emplace_back(geo, ts, m0, n0, tid);
            }
            std::vector<Accumulators> lanes(kThreads, Accumulators{});
            for (int k0 = 0; k0 < geo.tapWords; k0 += kChunkWords)
            {
                for (Loader& l : loaders) // between the barriers every thread stages, then every warp multiplies
                {
                    l.stage(tile, geo, pos, nonzero, k0);
                }
                for (int warp = 0; warp < kThreads / 32; ++warp)
                {
                    emulateWarpChunk(tile, warp, lanes);
                }
            }
            for (Loader& l : loaders)
            {
                l.publish(tile);
            }
            for (int tid = 0; tid < kThreads; ++tid)
            {
                epilogue<T>(tile, ts, geo, group, m0, n0, tid >> 5, tid & 31, lanes[tid]);
            }
        }
    }
}

template void emulateTensorCoreConv<float>(
    bdm_binary_conv_tensors const&, ConvGeometry const&, uint32_t const*, uint32_t const*);
template void emulateTensorCoreConv<__half>(
    bdm_binary_conv_tensors const&, ConvGeometry const&, uint32_t const*, uint32_t const*);
#endif

} // namespace tc

template <typename T>
void launchTensorCoreConv(bdm_binary_conv_tensors const& ts, ConvGeometry const& geo, uint32_t const* pos,
    uint32_t const* nonzero, cudaStream_t stream)
{
    dim3 const grid(static_cast<unsigned>((geo.pixels + tc::kTileM - 1) / tc::kTileM),
        static_cast<unsigned>((geo.outChannels + tc::kTileN - 1) / tc::kTileN));
    tc::tensorCoreConvKernel<T><<<grid, tc::kThreads, 0, stream>>>(ts, geo, pos, nonzero);
}

template void launchTensorCoreConv<float>(
    bdm_binary_conv_tensors const&, ConvGeometry const&, uint32_t const*, uint32_t const*, cudaStream_t);
template void launchTensorCoreConv<__half>(
    bdm_binary_conv_tensors const&, ConvGeometry const&, uint32_t const*, uint32_t const*, cudaStream_t);

} // namespace bdm
