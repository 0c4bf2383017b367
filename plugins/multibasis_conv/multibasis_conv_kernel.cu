// MultiBasisConv: activation quantization into code bit-planes, the bit-serial AND+popcount convolution (and the
// float32 one for act_bits 0), the C ABI. The shared math is in multibasis_conv_device.cuh; the tensor-core kernel
// in multibasis_conv_tensor_core.cu.
#include "../common/bdm_launch.h"
#include "multibasis_conv_device.cuh"
#include "multibasis_conv_kernel.h"
#include "multibasis_conv_tensor_core.cuh"

#include <cmath>
#include <vector>

namespace bdm
{
namespace mb
{
namespace
{

constexpr int kThreads = 256;

int32_t outSize(int32_t length, int32_t kernel, int32_t stride, int32_t padding)
{
    long long const span = static_cast<long long>(length) + 2LL * padding - kernel;
    return span < 0 || stride < 1 ? 0 : static_cast<int32_t>(span / stride + 1);
}

bool validShape(bdm_multibasis_conv_shape const& s)
{
    bool ok = s.batch > 0 && s.in_channels > 0 && s.out_channels > 0 && s.out_channels <= BDM_MAX_OUT_CHANNELS
        && s.height > 0 && s.width > 0
        && s.kernel_size > 0 && s.padding >= 0 && (s.stride == 1 || s.stride == 2)
        && (s.num_bases == 1 || s.num_bases == 2) && (s.act_bits == 0 || s.act_bits == 4 || s.act_bits == 8);
    switch (s.spatial_dims)
    {
    case 0: ok = ok && s.height == 1 && s.width == 1 && s.kernel_size == 1 && s.padding == 0 && s.stride == 1; break;
    case 1: ok = ok && s.height == 1 && s.stride == 1; break;
    case 2: ok = ok && outSize(s.height, s.kernel_size, s.stride, s.padding) > 0; break;
    default: return false;
    }
    return ok && outSize(s.width, s.kernel_size, s.stride, s.padding) > 0;
}

bool validTensors(bdm_multibasis_conv_tensors const& ts, int actBits)
{
    return ts.x && ts.weight && ts.scale && ts.bias && ts.y && (actBits == 0 || ts.act_step);
}

Geometry makeGeometry(bdm_multibasis_conv_shape const& s)
{
    Geometry g{};
    bool const conv2d = s.spatial_dims == 2;
    g.inChannels = s.in_channels;
    g.outChannels = s.out_channels;
    g.height = s.height;
    g.width = s.width;
    g.kernelH = conv2d ? s.kernel_size : 1;
    g.kernelW = s.kernel_size;
    g.stride = s.stride;
    g.padH = conv2d ? s.padding : 0;
    g.padW = s.padding;
    g.outHeight = outSize(s.height, g.kernelH, s.stride, g.padH);
    g.outWidth = outSize(s.width, g.kernelW, s.stride, g.padW);
    g.numBases = s.num_bases;
    g.actBits = s.act_bits;
    g.qn = s.act_bits ? -(1 << (s.act_bits - 1)) : 0;
    g.qp = s.act_bits ? (1 << (s.act_bits - 1)) - 1 : 0;
    g.hw = static_cast<long long>(s.height) * s.width;
    g.outHw = static_cast<long long>(g.outHeight) * g.outWidth;
    g.pixels = g.hw * s.batch;
    g.outPixels = g.outHw * s.batch;
    g.words = (s.in_channels + 31) / 32;
    g.tapWords = g.kernelH * g.kernelW * g.words;
    double const numel = static_cast<double>(g.pixels) * s.in_channels;
    g.gradScale = s.act_bits ? static_cast<float>(1.0 / std::sqrt(numel * g.qp)) : 0.0f;
    return g;
}

size_t planeWords(Geometry const& geo)
{
    return static_cast<size_t>(geo.pixels) * geo.words * geo.actBits;
}

unsigned blocksFor(long long items)
{
    return static_cast<unsigned>((items + kThreads - 1) / kThreads);
}

// One thread per (input pixel, word); pixels vary fastest so a warp reads 32 consecutive x values per channel.
__global__ void quantizeKernel(bdm_multibasis_conv_tensors ts, Geometry geo, uint32_t* planes)
{
    long long const idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= geo.pixels * geo.words)
    {
        return;
    }
    int const word = static_cast<int>(idx / geo.pixels);
    long long const pixel = idx - static_cast<long long>(word) * geo.pixels;
    uint32_t bits[kMaxActBits];
    packCodePlanes(ts.x, activationStep(ts.act_step[0], geo.gradScale), geo, pixel, word, bits);
    uint32_t* out = planes + (pixel * geo.words + word) * geo.actBits;
    for (int j = 0; j < geo.actBits; ++j)
    {
        out[j] = bits[j];
    }
}

// One thread per (output pixel, output channel); a block's threads share o, so weight words are broadcast.
__global__ void convKernel(bdm_multibasis_conv_tensors ts, Geometry geo, uint32_t const* planes)
{
    long long const outPixel = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (outPixel >= geo.outPixels)
    {
        return;
    }
    simpleOutput(ts, geo, planes, outCoord(geo, outPixel), blockIdx.y);
}

// The tensor cores serve the quantized path only (act_bits 0 is float32 arithmetic); they fit where the shape fills
// the mma tiles: K of at least 256 bits and 16 output channels.
bool tensorCoreFits(Geometry const& geo)
{
    return geo.tapWords >= tc::kChunkWords && geo.outChannels >= 16;
}

void runHost(bdm_multibasis_conv_tensors const& ts, Geometry const& geo, int algo)
{
    std::vector<uint32_t> planes(planeWords(geo));
    if (geo.actBits)
    {
        float const step = activationStep(ts.act_step[0], geo.gradScale);
        for (long long pixel = 0; pixel < geo.pixels; ++pixel)
        {
            for (int word = 0; word < geo.words; ++word)
            {
                packCodePlanes(ts.x, step, geo, pixel, word, planes.data() + (pixel * geo.words + word) * geo.actBits);
            }
        }
    }
    if (geo.actBits && algo == BDM_CONV_TENSOR_CORE)
    {
        tc::emulateTensorCoreConv(ts, geo, planes.data());
        return;
    }
    for (long long outPixel = 0; outPixel < geo.outPixels; ++outPixel)
    {
        OutCoord const at = outCoord(geo, outPixel);
        for (int o = 0; o < geo.outChannels; ++o)
        {
            simpleOutput(ts, geo, planes.data(), at, o);
        }
    }
}

int checkArguments(bdm_multibasis_conv_shape const* shape, bdm_multibasis_conv_tensors const* tensors, int algo)
{
    bool const ok = shape && tensors && validShape(*shape) && validTensors(*tensors, shape->act_bits)
        && algo >= BDM_CONV_AUTO && algo <= BDM_CONV_TENSOR_CORE;
    return ok ? BDM_OK : BDM_INVALID_ARGUMENT;
}

} // namespace
} // namespace mb
} // namespace bdm

extern "C" int32_t bdm_multibasis_conv_out_size(int32_t length, int32_t kernel_size, int32_t stride, int32_t padding)
{
    return bdm::mb::outSize(length, kernel_size, stride, padding);
}

extern "C" size_t bdm_multibasis_conv_workspace_size(bdm_multibasis_conv_shape const* shape)
{
    return bdm::mb::planeWords(bdm::mb::makeGeometry(*shape)) * sizeof(uint32_t);
}

extern "C" int bdm_multibasis_conv(bdm_multibasis_conv_shape const* shape, bdm_multibasis_conv_tensors const* tensors,
    int algo, void* workspace, size_t workspace_bytes, cudaStream_t stream)
{
    using namespace bdm::mb;
    if (int const status = checkArguments(shape, tensors, algo))
    {
        return status;
    }
    Geometry const geo = makeGeometry(*shape);
    int chosen = BDM_CONV_SIMPLE;
    if (geo.actBits)
    {
        if (int const status = bdm::convAlgoForCurrentDevice(algo, tensorCoreFits(geo), chosen))
        {
            return status;
        }
    }
    uint32_t* planes = static_cast<uint32_t*>(workspace);
    if (geo.actBits)
    {
        if (!workspace)
        {
            return BDM_INVALID_ARGUMENT;
        }
        if (workspace_bytes < bdm_multibasis_conv_workspace_size(shape))
        {
            return BDM_WORKSPACE_TOO_SMALL;
        }
        quantizeKernel<<<blocksFor(geo.pixels * geo.words), kThreads, 0, stream>>>(*tensors, geo, planes);
    }
    if (chosen == BDM_CONV_TENSOR_CORE)
    {
        launchTensorCoreConv(*tensors, geo, planes, stream);
    }
    else
    {
        dim3 const grid(blocksFor(geo.outPixels), static_cast<unsigned>(geo.outChannels));
        convKernel<<<grid, kThreads, 0, stream>>>(*tensors, geo, planes);
    }
    return bdm::launchStatus();
}

extern "C" int bdm_multibasis_conv_host(
    bdm_multibasis_conv_shape const* shape, bdm_multibasis_conv_tensors const* tensors, int algo)
{
    if (int const status = bdm::mb::checkArguments(shape, tensors, algo))
    {
        return status;
    }
    bdm::mb::runHost(*tensors, bdm::mb::makeGeometry(*shape), algo);
    return BDM_OK;
}
