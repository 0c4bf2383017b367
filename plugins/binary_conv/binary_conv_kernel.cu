// Fused binary convolution: sign bit-packing, the straightforward AND+popcount kernel, the C ABI.
// The tensor-core kernel is in binary_conv_tensor_core.cu; the shared math in binary_conv_device.cuh.
#include "../common/bdm_launch.h"
#include "binary_conv_device.cuh"
#include "binary_conv_kernel.h"
#include "binary_conv_tensor_core.cuh"

#include <cuda_fp16.h>
#include <vector>

namespace bdm
{
namespace
{

constexpr int kThreads = 256;

bool validShape(bdm_binary_conv_shape const& s, bool timestepTables)
{
    bool ok = s.batch > 0 && s.in_channels > 0 && s.out_channels > 0 && s.out_channels <= BDM_MAX_OUT_CHANNELS
        && s.height > 0 && s.width > 0
        && (s.kernel_size == 1 || s.kernel_size == 3) && s.pad_value >= -1 && s.pad_value <= 1;
    if (timestepTables)
    {
        ok = ok && s.num_groups > 0 && s.total_steps > 0 && (s.residual == 0 || s.residual == 1)
            && (s.residual == 0 || s.in_channels == s.out_channels);
    }
    else
    {
        ok = ok && s.residual == 0;
    }
    return ok;
}

// BinaryConv2d needs every table, BinarySignConv2d none; anything in between is a caller bug.
bool validTensors(bdm_binary_conv_tensors const& ts, bool& timestepTables)
{
    timestepTables = ts.t != nullptr;
    bool const tables = ts.threshold && ts.bias0 && ts.slope && ts.bias1;
    bool const noTables = !ts.threshold && !ts.bias0 && !ts.slope && !ts.bias1;
    return ts.x && ts.weight && ts.alpha && ts.y && (timestepTables ? tables : noTables);
}

ConvGeometry makeGeometry(bdm_binary_conv_shape const& s)
{
    ConvGeometry g{};
    g.inChannels = s.in_channels;
    g.outChannels = s.out_channels;
    g.height = s.height;
    g.width = s.width;
    g.kernelSize = s.kernel_size;
    g.pad = s.kernel_size / 2;
    g.padValue = s.pad_value;
    g.residual = s.residual;
    g.numGroups = s.num_groups;
    g.totalSteps = s.total_steps;
    g.words = (s.in_channels + 31) / 32;
    g.tapWords = s.kernel_size * s.kernel_size * g.words;
    g.lastWordMask = s.in_channels % 32 ? (1u << (s.in_channels % 32)) - 1u : 0xffffffffu;
    g.hw = static_cast<long long>(s.height) * s.width;
    g.pixels = g.hw * s.batch;
    return g;
}

size_t planeWords(ConvGeometry const& geo)
{
    return static_cast<size_t>(geo.pixels) * geo.words;
}

// One thread per (pixel, word); pixels vary fastest so a warp reads 32 consecutive x values per channel.
template <typename T>
__global__ void packSignsKernel(bdm_binary_conv_tensors ts, ConvGeometry geo, uint32_t* pos, uint32_t* nonzero)
{
    long long const idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= geo.pixels * geo.words)
    {
        return;
    }
    int const word = static_cast<int>(idx / geo.pixels);
    long long const pixel = idx - static_cast<long long>(word) * geo.pixels;
    SignBits const bits = packSigns(static_cast<T const*>(ts.x), ts.threshold, launchGroup(ts, geo), geo, pixel, word);
    pos[pixel * geo.words + word] = bits.pos;
    nonzero[pixel * geo.words + word] = bits.nonzero;
}

// One thread per (pixel, output channel); the block's threads share o, so weight words are broadcast.
template <typename T>
__global__ void simpleConvKernel(bdm_binary_conv_tensors ts, ConvGeometry geo, uint32_t const* pos,
    uint32_t const* nonzero)
{
    long long const pixel = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    int const o = blockIdx.y;
    if (pixel >= geo.pixels)
    {
        return;
    }
    PixelCoord const at = pixelCoord(geo, pixel);
    storeOutput<T>(ts, geo, launchGroup(ts, geo), at, o, dotSimple(pos, nonzero, ts.weight, geo, at, o));
}

unsigned blocksFor(long long items)
{
    return static_cast<unsigned>((items + kThreads - 1) / kThreads);
}

bool tensorCoreFits(ConvGeometry const& geo)
{
    return geo.tapWords >= 8 && geo.outChannels >= 16;
}

template <typename T>
int launchConv(bdm_binary_conv_tensors const& ts, ConvGeometry const& geo, int algo, void* workspace,
    cudaStream_t stream)
{
    int chosen = BDM_CONV_SIMPLE;
    if (int const status = convAlgoForCurrentDevice(algo, tensorCoreFits(geo), chosen))
    {
        return status;
    }
    uint32_t* pos = static_cast<uint32_t*>(workspace);
    uint32_t* nonzero = pos + planeWords(geo);
    packSignsKernel<T><<<blocksFor(geo.pixels * geo.words), kThreads, 0, stream>>>(ts, geo, pos, nonzero);
    if (chosen == BDM_CONV_TENSOR_CORE)
    {
        launchTensorCoreConv<T>(ts, geo, pos, nonzero, stream);
    }
    else
    {
        dim3 const grid(blocksFor(geo.pixels), static_cast<unsigned>(geo.outChannels));
        simpleConvKernel<T><<<grid, kThreads, 0, stream>>>(ts, geo, pos, nonzero);
    }
    return launchStatus();
}

template <typename T>
void runHost(bdm_binary_conv_tensors const& ts, ConvGeometry const& geo, int algo)
{
    std::vector<uint32_t> pos(planeWords(geo)), nonzero(planeWords(geo));
    int const group = launchGroup(ts, geo);
    for (long long pixel = 0; pixel < geo.pixels; ++pixel)
    {
        for (int word = 0; word < geo.words; ++word)
        {
            SignBits const bits = packSigns(static_cast<T const*>(ts.x), ts.threshold, group, geo, pixel, word);
            pos[pixel * geo.words + word] = bits.pos;
            nonzero[pixel * geo.words + word] = bits.nonzero;
        }
    }
    if (algo == BDM_CONV_TENSOR_CORE)
    {
        tc::emulateTensorCoreConv<T>(ts, geo, pos.data(), nonzero.data());
        return;
    }
    for (long long pixel = 0; pixel < geo.pixels; ++pixel)
    {
        PixelCoord const at = pixelCoord(geo, pixel);
        for (int o = 0; o < geo.outChannels; ++o)
        {
            storeOutput<T>(ts, geo, group, at, o, dotSimple(pos.data(), nonzero.data(), ts.weight, geo, at, o));
        }
    }
}

int checkArguments(bdm_binary_conv_shape const* shape, bdm_binary_conv_tensors const* tensors, int dtype)
{
    bool timestepTables = false;
    if (!shape || !tensors || !validTensors(*tensors, timestepTables) || !validShape(*shape, timestepTables)
        || (dtype != BDM_FLOAT32 && dtype != BDM_FLOAT16))
    {
        return BDM_INVALID_ARGUMENT;
    }
    return BDM_OK;
}

} // namespace
} // namespace bdm

extern "C" size_t bdm_binary_conv_workspace_size(bdm_binary_conv_shape const* shape)
{
    return 2 * bdm::planeWords(bdm::makeGeometry(*shape)) * sizeof(uint32_t);
}

extern "C" int bdm_binary_conv2d(bdm_binary_conv_shape const* shape, bdm_binary_conv_tensors const* tensors, int dtype,
    int algo, void* workspace, size_t workspace_bytes, cudaStream_t stream)
{
    if (int const status = bdm::checkArguments(shape, tensors, dtype))
    {
        return status;
    }
    if (algo < BDM_CONV_AUTO || algo > BDM_CONV_TENSOR_CORE || !workspace)
    {
        return BDM_INVALID_ARGUMENT;
    }
    if (workspace_bytes < bdm_binary_conv_workspace_size(shape))
    {
        return BDM_WORKSPACE_TOO_SMALL;
    }
    bdm::ConvGeometry const geo = bdm::makeGeometry(*shape);
    return dtype == BDM_FLOAT32 ? bdm::launchConv<float>(*tensors, geo, algo, workspace, stream)
                                : bdm::launchConv<__half>(*tensors, geo, algo, workspace, stream);
}

extern "C" int bdm_binary_conv2d_host(
    bdm_binary_conv_shape const* shape, bdm_binary_conv_tensors const* tensors, int dtype, int algo)
{
    if (int const status = bdm::checkArguments(shape, tensors, dtype))
    {
        return status;
    }
    if (algo < BDM_CONV_AUTO || algo > BDM_CONV_TENSOR_CORE)
    {
        return BDM_INVALID_ARGUMENT;
    }
    bdm::ConvGeometry const geo = bdm::makeGeometry(*shape);
    if (dtype == BDM_FLOAT32)
    {
        bdm::runHost<float>(*tensors, geo, algo);
    }
    else
    {
        bdm::runHost<__half>(*tensors, geo, algo);
    }
    return BDM_OK;
}
