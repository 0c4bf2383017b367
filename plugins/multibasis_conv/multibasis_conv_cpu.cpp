// C ABI of the CPU MultiBasisConv (multibasis_conv_cpu.h): prepare (both bases repacked once as virtual channels for
// the chosen path, the class values v_same / v_diff), run (the quantizer's step, dispatch to the path's kernel,
// multibasis_conv_cpu_kernel.h), release.
#include "multibasis_conv_cpu.h"

#include "../common/cpu_dispatch.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <vector>

struct bdm_multibasis_conv_cpu_layer
{
    int isa;
    int spatialDims;
    std::vector<uint32_t> blocked;
    std::vector<float> values; // classSame, classDiff, bias
    bdm::cpu::MultibasisConvLayer view;
};

namespace
{

bool validParams(bdm_multibasis_conv_cpu_params const& p)
{
    bool const form = (p.spatial_dims == 2 && (p.stride == 1 || p.stride == 2))
        || (p.spatial_dims == 1 && p.stride == 1)
        || (p.spatial_dims == 0 && p.stride == 1 && p.kernel_size == 1 && p.padding == 0);
    return form && p.in_channels > 0 && p.out_channels > 0 && p.kernel_size > 0 && p.padding >= 0
        && (p.num_bases == 1 || p.num_bases == 2) && (p.act_bits == 4 || p.act_bits == 8) && p.weight && p.scale
        && p.bias;
}

} // namespace

extern "C" int32_t bdm_multibasis_conv_cpu_out_size(
    int32_t length, int32_t kernel_size, int32_t stride, int32_t padding)
{
    long long const span = static_cast<long long>(length) + 2LL * padding - kernel_size;
    return span < 0 || stride < 1 ? 0 : static_cast<int32_t>(span / stride + 1);
}

extern "C" int bdm_multibasis_conv_cpu_prepare(
    int isa, bdm_multibasis_conv_cpu_params const* params, bdm_multibasis_conv_cpu_layer** layer)
{
    if (!params || !layer || !validParams(*params))
    {
        return BDM_INVALID_ARGUMENT;
    }
    int const tileChannels = bdm::cpu::tileChannels(isa);
    if (!tileChannels)
    {
        return BDM_CPU_UNSUPPORTED_ISA;
    }
    bdm_multibasis_conv_cpu_params const& p = *params;
    try
    {
        auto* l = new bdm_multibasis_conv_cpu_layer();
        bool const conv2d = p.spatial_dims == 2;
        int const words = (p.in_channels + 31) / 32;
        int const kernelH = conv2d ? p.kernel_size : 1;
        int const taps = kernelH * p.kernel_size;
        int const out = p.out_channels;
        long long const basisRows = static_cast<long long>(out) * taps; // rows of one basis: [o][tap]
        std::vector<uint32_t> const bases
            = bdm::cpu::maskedRows(p.weight, p.num_bases * basisRows, words, p.in_channels);
        // virtual channel num_bases * o + k: basis k of output channel o, so both bases of o share a tile
        std::vector<uint32_t> rows(bases.size());
        size_t const rowWords = static_cast<size_t>(taps) * words;
        for (int o = 0; o < out; ++o)
        {
            for (int k = 0; k < p.num_bases; ++k)
            {
                std::copy_n(bases.begin() + (k * basisRows + static_cast<long long>(o) * taps) * words, rowWords,
                    rows.begin() + static_cast<size_t>(p.num_bases * o + k) * rowWords);
            }
        }
        l->isa = isa;
        l->spatialDims = p.spatial_dims;
        l->blocked = bdm::cpu::blockWeights(rows, p.num_bases * out, taps, words, tileChannels);
        // The CUDA kernel's ClassValues: v_same = s1 (+ s2), v_diff = s1 - s2 (0 with one basis).
        l->values.resize(3 * static_cast<size_t>(out));
        float* same = l->values.data();
        float* diff = same + out;
        float* bias = diff + out;
        for (int o = 0; o < out; ++o)
        {
            float const s1 = p.scale[o];
            float const s2 = p.num_bases == 2 ? p.scale[out + o] : 0.0f;
            same[o] = p.num_bases == 2 ? s1 + s2 : s1;
            diff[o] = p.num_bases == 2 ? s1 - s2 : 0.0f;
            bias[o] = p.bias[o];
        }
        bdm::cpu::MultibasisConvLayer& v = l->view;
        v.inChannels = p.in_channels;
        v.outChannels = out;
        v.numBases = p.num_bases;
        v.kernelH = kernelH;
        v.kernelW = p.kernel_size;
        v.stride = p.stride;
        v.padH = conv2d ? p.padding : 0;
        v.padW = p.padding;
        v.actBits = p.act_bits;
        v.words = words;
        v.blocked = bdm::cpu::BlockedWeights{l->blocked.data(), p.num_bases * out,
            (p.num_bases * out + tileChannels - 1) / tileChannels};
        v.classSame = same;
        v.classDiff = diff;
        v.bias = bias;
        *layer = l;
        return BDM_OK;
    }
    catch (std::bad_alloc const&)
    {
        return BDM_CPU_OUT_OF_MEMORY;
    }
}

extern "C" void bdm_multibasis_conv_cpu_release(bdm_multibasis_conv_cpu_layer* layer)
{
    delete layer;
}

extern "C" int bdm_multibasis_conv_cpu_run(
    bdm_multibasis_conv_cpu_layer const* layer, bdm_multibasis_conv_cpu_call const* call)
{
    if (!layer || !call || !call->x || !call->y || call->batch <= 0 || call->height <= 0 || call->width <= 0
        || call->threads < 0 || (layer->spatialDims < 2 && call->height != 1))
    {
        return BDM_INVALID_ARGUMENT;
    }
    bdm::cpu::MultibasisConvLayer const& v = layer->view;
    if (bdm_multibasis_conv_cpu_out_size(call->height, v.kernelH, v.stride, v.padH) <= 0
        || bdm_multibasis_conv_cpu_out_size(call->width, v.kernelW, v.stride, v.padW) <= 0)
    {
        return BDM_INVALID_ARGUMENT;
    }
    // The spec's step: g = float32(1 / sqrt(double(numel(x) * Qp))), then (a - a*g) + a*g in float32.
    int const qp = (1 << (v.actBits - 1)) - 1;
    double const numel = static_cast<double>(call->batch) * v.inChannels * call->height * call->width;
    float const gradScale = static_cast<float>(1.0 / std::sqrt(numel * qp));
    float const scaled = call->act_step * gradScale;
    float const step = (call->act_step - scaled) + scaled;
    bdm::cpu::MultibasisConvCall const c{call->x, call->y, call->batch, call->height, call->width, step,
        call->threads};
    return bdm::cpu::runMultibasisConv(layer->isa, v, c);
}
