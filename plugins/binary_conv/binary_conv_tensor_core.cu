// Tensor-core binary convolution: an implicit GEMM D[pixel, o] = sum_k A[pixel, k] AND W[o, k] on packed
// 32-bit words, one mma.sync.m16n8k256.b1.and.popc per 16x8x256 tile (native BMMA on sm_80..sm_90).
// A is im2col'd on the fly from the two sign bit-planes (pos, nonzero); the epilogue is shared with the
// straightforward kernel (binary_conv_device.cuh), so both give identical results.
#include "binary_conv_device.cuh"

#include <cuda_fp16.h>

namespace bdm
{
namespace
{

constexpr int kTileM = 64;      // output pixels per block
constexpr int kTileN = 64;      // output channels per block
constexpr int kChunkWords = 8;  // 256 bits of K per mma
constexpr int kRowStride = 12;  // shared-memory words per tile row: 12 (not 8) makes fragment loads conflict-free
constexpr int kThreads = 128;   // 4 warps, 2 x 2 over the tile, each 32 pixels x 32 channels

// acc += popc(a AND b) for a 16x8 tile; fragment layout of the PTX ISA for .b1 m16n8k256:
// a[0]: row grp, word tig; a[1]: row grp+8, word tig; a[2], a[3]: the same rows, word tig+4;
// b[0], b[1]: column grp, words tig and tig+4; acc[0..3]: (grp, 2tig), (grp, 2tig+1), (grp+8, 2tig), (grp+8, 2tig+1).
__device__ inline void mmaAndPopc(int (&acc)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap(); // the library is built for sm_80+ only (CMakeLists.txt)
#endif
}

__device__ inline void loadAFragment(uint32_t const* tile, int row, int tig, uint32_t (&a)[4])
{
    a[0] = tile[row * kRowStride + tig];
    a[1] = tile[(row + 8) * kRowStride + tig];
    a[2] = tile[row * kRowStride + tig + 4];
    a[3] = tile[(row + 8) * kRowStride + tig + 4];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) tensorCoreConvKernel(
    bdm_binary_conv_tensors ts, ConvGeometry geo, uint32_t const* pos, uint32_t const* nonzero)
{
    __shared__ uint32_t tilePos[kTileM * kRowStride];
    __shared__ uint32_t tileNonzero[kTileM * kRowStride];
    __shared__ uint32_t tileWeight[kTileN * kRowStride];
    __shared__ int rowPos[2][kTileM];     // per-pixel popc(pos) over all of K, one partial per loader half
    __shared__ int rowNonzero[2][kTileM];

    long long const m0 = static_cast<long long>(blockIdx.x) * kTileM;
    int const n0 = blockIdx.y * kTileN;
    int const tid = threadIdx.x;

    // Loader role: thread tid fills words half*4 .. half*4+3 of row `loadRow` of the three tiles.
    int const loadRow = tid >> 1;
    int const half = tid & 1;
    long long const loadPixel = m0 + loadRow;
    bool const pixelValid = loadPixel < geo.pixels;
    PixelCoord const loadAt = pixelCoord(geo, pixelValid ? loadPixel : 0);
    int const loadO = n0 + loadRow;
    bool const oValid = loadO < geo.outChannels;
    uint32_t const* wrow = reinterpret_cast<uint32_t const*>(ts.weight) + static_cast<long long>(oValid ? loadO : 0) * geo.tapWords;
    int myPos = 0;
    int myNonzero = 0;

    // MMA role.
    int const warp = tid >> 5;
    int const lane = tid & 31;
    int const grp = lane >> 2;
    int const tig = lane & 3;
    int const warpM = (warp >> 1) * 32;
    int const warpN = (warp & 1) * 32;
    int accPos[2][4][4] = {};
    int accNonzero[2][4][4] = {};

    for (int k0 = 0; k0 < geo.tapWords; k0 += kChunkWords)
    {
#pragma unroll
        for (int q = 0; q < 4; ++q)
        {
            int const slot = half * 4 + q;
            int const kw = k0 + slot;
            bool const inK = kw < geo.tapWords; // K is zero-padded to whole chunks: zero words add nothing
            SignBits s{0u, 0u};
            if (pixelValid && inK)
            {
                s = im2colSigns(pos, nonzero, geo, loadAt, kw);
            }
            tilePos[loadRow * kRowStride + slot] = s.pos;
            tileNonzero[loadRow * kRowStride + slot] = s.nonzero;
            myPos += popcount(s.pos);
            myNonzero += popcount(s.nonzero);
            tileWeight[loadRow * kRowStride + slot] = oValid && inK ? wrow[kw] : 0u;
        }
        __syncthreads();

        uint32_t aPos[2][4];
        uint32_t aNonzero[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
        {
            loadAFragment(tilePos, warpM + mt * 16 + grp, tig, aPos[mt]);
            loadAFragment(tileNonzero, warpM + mt * 16 + grp, tig, aNonzero[mt]);
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
        {
            int const col = warpN + nt * 8 + grp;
            uint32_t const b0 = tileWeight[col * kRowStride + tig];
            uint32_t const b1 = tileWeight[col * kRowStride + tig + 4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
            {
                mmaAndPopc(accPos[mt][nt], aPos[mt], b0, b1);
                mmaAndPopc(accNonzero[mt][nt], aNonzero[mt], b0, b1);
            }
        }
        __syncthreads();
    }
    rowPos[half][loadRow] = myPos;
    rowNonzero[half][loadRow] = myNonzero;
    __syncthreads();

    int const group = launchGroup(ts, geo);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
    {
#pragma unroll
        for (int rowHalf = 0; rowHalf < 2; ++rowHalf)
        {
            int const row = warpM + mt * 16 + grp + rowHalf * 8;
            long long const pixel = m0 + row;
            if (pixel >= geo.pixels)
            {
                continue;
            }
            PixelCoord const at = pixelCoord(geo, pixel);
            int const sumPos = rowPos[0][row] + rowPos[1][row];
            int const sumNonzero = rowNonzero[0][row] + rowNonzero[1][row];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
            {
#pragma unroll
                for (int colOdd = 0; colOdd < 2; ++colOdd)
                {
                    int const o = n0 + warpN + nt * 8 + tig * 2 + colOdd;
                    int const r = rowHalf * 2 + colOdd;
                    if (o < geo.outChannels)
                    {
                        int const dot = dotFromCounts(accPos[mt][nt][r], accNonzero[mt][nt][r], sumPos, sumNonzero);
                        storeOutput<T>(ts, geo, group, at, o, dot);
                    }
                }
            }
        }
    }
}

} // namespace

template <typename T>
void launchTensorCoreConv(bdm_binary_conv_tensors const& ts, ConvGeometry const& geo, uint32_t const* pos,
    uint32_t const* nonzero, cudaStream_t stream)
{
    dim3 const grid(static_cast<unsigned>((geo.pixels + kTileM - 1) / kTileM),
        static_cast<unsigned>((geo.outChannels + kTileN - 1) / kTileN));
    tensorCoreConvKernel<T><<<grid, kThreads, 0, stream>>>(ts, geo, pos, nonzero);
}

template void launchTensorCoreConv<float>(
    bdm_binary_conv_tensors const&, ConvGeometry const&, uint32_t const*, uint32_t const*, cudaStream_t);
template void launchTensorCoreConv<__half>(
    bdm_binary_conv_tensors const&, ConvGeometry const&, uint32_t const*, uint32_t const*, cudaStream_t);

} // namespace bdm
