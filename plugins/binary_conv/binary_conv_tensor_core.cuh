// Phases of the tensor-core binary convolution (binary_conv_tensor_core.cu), per thread and __host__ __device__
// so that the host emulation runs the kernel's own code.
#pragma once

#include "binary_conv_device.cuh"

namespace bdm
{
namespace tc
{

constexpr int kTileM = 64;      // output pixels per block
constexpr int kTileN = 64;      // output channels per block
constexpr int kChunkWords = 8;  // 256 bits of K per mma
constexpr int kRowStride = 12;  // shared-memory words per tile row: 12 (not 8) makes fragment loads conflict-free
constexpr int kThreads = 128;   // 4 warps, 2 x 2 over the tile, each 32 pixels x 32 channels
constexpr int kMTiles = 2;      // m16 tiles per warp
constexpr int kNTiles = 4;      // n8 tiles per warp

struct Tile
{
    uint32_t pos[kTileM * kRowStride];     // A: sign bit-plane s > 0 of the chunk, row = pixel
    uint32_t nonzero[kTileM * kRowStride]; // A: sign bit-plane s != 0
    uint32_t weight[kTileN * kRowStride];  // B: weight bits, row = output channel
    int rowPos[2][kTileM];                 // per-pixel popc(pos) over all of K, one partial per loader half
    int rowNonzero[2][kTileM];
};

struct Accumulators
{
    int pos[kMTiles][kNTiles][4];     // popc(pos & W)
    int nonzero[kMTiles][kNTiles][4]; // popc(nonzero & W)
};

__host__ __device__ inline int warpRow(int warp)
{
    return (warp >> 1) * 32;
}

__host__ __device__ inline int warpCol(int warp)
{
    return (warp & 1) * 32;
}

// Loader role: thread tid fills words half*4 .. half*4+3 of row tid/2 of the three tiles, and counts its
// pixel's pos/nonzero bits over all of K.
struct Loader
{
    __host__ __device__ Loader(ConvGeometry const& geo, bdm_binary_conv_tensors const& ts, long long m0, int n0, int tid);

    __host__ __device__ void stage(Tile& tile, ConvGeometry const& geo, uint32_t const* pos, uint32_t const* nonzero, int k0)
    {
BDM_UNROLL
        for (int q = 0; q < 4; ++q)
        {
            int const slot = half * 4 + q;
            int const kw = k0 + slot;
            bool const inK = kw < geo.tapWords; // K is zero-padded to whole chunks: zero words add nothing
            SignBits s{0u, 0u};
            if (pixelValid && inK)
            {
                s = im2colSigns(pos, nonzero, geo, at, kw);
            }
            tile.pos[row * kRowStride + slot] = s.pos;
            tile.nonzero[row * kRowStride + slot] = s.nonzero;
            countPos += popcount(s.pos);
            countNonzero += popcount(s.nonzero);
            tile.weight[row * kRowStride + slot] = oValid && inK ? weightRow[kw] : 0u;
        }
    }

    __host__ __device__ void publish(Tile& tile) const
    {
        tile.rowPos[half][row] = countPos;
        tile.rowNonzero[half][row] = countNonzero;
    }

    int row;
    int half;
    bool pixelValid;
    bool oValid;
    PixelCoord at;
    uint32_t const* weightRow;
    int countPos = 0;
    int countNonzero = 0;
};

// a[0]: (grp, tig), a[1]: (grp+8, tig), a[2]: (grp, tig+4), a[3]: (grp+8, tig+4) of the 16-row tile at rowBase.
__host__ __device__ inline void loadAFragment(uint32_t const* plane, int rowBase, int lane, uint32_t (&a)[4])
{
    int const row = rowBase + (lane >> 2);
    int const tig = lane & 3;
    a[0] = plane[row * kRowStride + tig];
    a[1] = plane[(row + 8) * kRowStride + tig];
    a[2] = plane[row * kRowStride + tig + 4];
    a[3] = plane[(row + 8) * kRowStride + tig + 4];
}

// b0, b1: words tig and tig+4 of column grp of the 8-column tile at colBase.
__host__ __device__ inline void loadBFragment(Tile const& tile, int colBase, int lane, uint32_t& b0, uint32_t& b1)
{
    int const col = colBase + (lane >> 2);
    b0 = tile.weight[col * kRowStride + (lane & 3)];
    b1 = tile.weight[col * kRowStride + (lane & 3) + 4];
}

#ifdef __CUDACC__
// acc += popc(a AND b) over a 16x8x256 tile.
__device__ inline void mmaAndPopc(int (&acc)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
{
#ifdef __CUDA_ARCH__
#if __CUDA_ARCH__ < 800
#error "bdm kernels need sm_80 or newer (mma .b1 .and.popc): build for CUDA architectures 80 and up"
#endif
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// One K chunk for one warp: both bit-planes against the shared weight fragment.
__device__ inline void multiplyChunk(Tile const& tile, int warp, int lane, Accumulators& acc)
{
    uint32_t aPos[kMTiles][4];
    uint32_t aNonzero[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
    {
        loadAFragment(tile.pos, warpRow(warp) + mt * 16, lane, aPos[mt]);
        loadAFragment(tile.nonzero, warpRow(warp) + mt * 16, lane, aNonzero[mt]);
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
    {
        uint32_t b0;
        uint32_t b1;
        loadBFragment(tile, warpCol(warp) + nt * 8, lane, b0, b1);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
        {
            mmaAndPopc(acc.pos[mt][nt], aPos[mt], b0, b1);
            mmaAndPopc(acc.nonzero[mt][nt], aNonzero[mt], b0, b1);
        }
    }
}
#endif

// Accumulator element r of tile (mt, nt) of this lane is output (row, col) of the block tile: rows grp / grp+8
// for r < 2 / r >= 2, columns 2tig / 2tig+1 for even / odd r. For each of the lane's rows, startRow(row) says
// whether the row is in the output (and may set up per-row state); then visit(mt, nt, r, col) runs for its
// elements. Shared by every tensor-core kernel's epilogue.
template <typename StartRow, typename Visit>
__host__ __device__ inline void forEachAccumulator(int warp, int lane, StartRow startRow, Visit visit)
{
    int const grp = lane >> 2;
    int const tig = lane & 3;
BDM_UNROLL
    for (int mt = 0; mt < kMTiles; ++mt)
    {
BDM_UNROLL
        for (int rowHalf = 0; rowHalf < 2; ++rowHalf)
        {
            if (!startRow(warpRow(warp) + mt * 16 + grp + rowHalf * 8))
            {
                continue;
            }
BDM_UNROLL
            for (int nt = 0; nt < kNTiles; ++nt)
            {
BDM_UNROLL
                for (int colOdd = 0; colOdd < 2; ++colOdd)
                {
                    visit(mt, nt, rowHalf * 2 + colOdd, warpCol(warp) + nt * 8 + tig * 2 + colOdd);
                }
            }
        }
    }
}

template <typename T>
__host__ __device__ inline void epilogue(Tile const& tile, bdm_binary_conv_tensors const& ts, ConvGeometry const& geo,
    int group, long long m0, int n0, int warp, int lane, Accumulators const& acc)
{
    PixelCoord at{};
    int sumPos = 0;
    int sumNonzero = 0;
    forEachAccumulator(
        warp, lane,
        [&](int row) {
            long long const pixel = m0 + row;
            if (pixel >= geo.pixels)
            {
                return false;
            }
            at = pixelCoord(geo, pixel);
            sumPos = tile.rowPos[0][row] + tile.rowPos[1][row];
            sumNonzero = tile.rowNonzero[0][row] + tile.rowNonzero[1][row];
            return true;
        },
        [&](int mt, int nt, int r, int col) {
            int const o = n0 + col;
            if (o < geo.outChannels)
            {
                int const dot = dotFromCounts(acc.pos[mt][nt][r], acc.nonzero[mt][nt][r], sumPos, sumNonzero);
                storeOutput<T>(ts, geo, group, at, o, dot);
            }
        });
}

// The whole launch on the CPU, block by block, with the mma emulated from the PTX ISA layout (host only).
template <typename T>
void emulateTensorCoreConv(bdm_binary_conv_tensors const& ts, ConvGeometry const& geo, uint32_t const* pos,
    uint32_t const* nonzero);

} // namespace tc
} // namespace bdm
