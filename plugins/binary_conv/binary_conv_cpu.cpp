// C ABI of the CPU binary convolution (binary_conv_cpu.h): prepare (weights repacked once for the chosen path),
// run (dispatch to that path's kernel, binary_conv_cpu_kernel.h), release.
#include "binary_conv_cpu.h"

#include "../common/cpu_dispatch.h"

#include <new>
#include <vector>

struct bdm_binary_conv_cpu_layer
{
    int isa;
    std::vector<uint32_t> blocked;
    std::vector<uint32_t> rows;
    std::vector<int32_t> tapSums;
    std::vector<float> alpha;
    std::vector<float> tables; // threshold, bias0, slope, bias1 (empty for BinarySignConv2d)
    bdm::cpu::BinaryConvLayer view;
};

namespace
{

bool validParams(bdm_binary_conv_cpu_params const& p)
{
    bool const fused = p.threshold != nullptr;
    bool const tables = fused ? p.bias0 && p.slope && p.bias1 : !p.bias0 && !p.slope && !p.bias1;
    return p.in_channels > 0 && p.out_channels > 0 && (p.kernel_size == 1 || p.kernel_size == 3)
        && p.pad_value >= -1 && p.pad_value <= 1 && p.weight && p.alpha && tables
        && (!fused || (p.num_groups > 0 && (p.residual == 0 || (p.residual == 1 && p.in_channels == p.out_channels))));
}

} // namespace

extern "C" int bdm_binary_conv_cpu_prepare(
    int isa, bdm_binary_conv_cpu_params const* params, bdm_binary_conv_cpu_layer** layer)
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
    bdm_binary_conv_cpu_params const& p = *params;
    try
    {
        auto* l = new bdm_binary_conv_cpu_layer();
        int const words = (p.in_channels + 31) / 32;
        int const taps = p.kernel_size * p.kernel_size;
        l->isa = isa;
        l->rows = bdm::cpu::maskedRows(p.weight, static_cast<long long>(p.out_channels) * taps, words, p.in_channels);
        l->blocked = bdm::cpu::blockWeights(l->rows, p.out_channels, taps, words, tileChannels);
        // sum_c sign(W)[o, c, tap] = 2 * (ones) - in_channels
        l->tapSums.resize(static_cast<size_t>(p.out_channels) * taps);
        for (size_t row = 0; row < l->tapSums.size(); ++row)
        {
            int ones = 0;
            for (int w = 0; w < words; ++w)
            {
                ones += __builtin_popcount(l->rows[row * words + w]);
            }
            l->tapSums[row] = 2 * ones - p.in_channels;
        }
        l->alpha.assign(p.alpha, p.alpha + p.out_channels);
        bdm::cpu::BinaryConvLayer& v = l->view;
        v.inChannels = p.in_channels;
        v.outChannels = p.out_channels;
        v.kernelSize = p.kernel_size;
        v.padValue = p.pad_value;
        v.words = words;
        v.blocked = bdm::cpu::BlockedWeights{
            l->blocked.data(), p.out_channels, (p.out_channels + tileChannels - 1) / tileChannels};
        v.weights = l->rows.data();
        v.tapSums = l->tapSums.data();
        v.alpha = l->alpha.data();
        v.threshold = v.bias0 = v.slope = v.bias1 = nullptr;
        v.numGroups = 1;
        v.residual = 0;
        if (p.threshold)
        {
            size_t const in = static_cast<size_t>(p.num_groups) * p.in_channels;
            size_t const out = static_cast<size_t>(p.num_groups) * p.out_channels;
            l->tables.reserve(in + 3 * out);
            l->tables.insert(l->tables.end(), p.threshold, p.threshold + in);
            for (float const* table : {p.bias0, p.slope, p.bias1})
            {
                l->tables.insert(l->tables.end(), table, table + out);
            }
            v.threshold = l->tables.data();
            v.bias0 = v.threshold + in;
            v.slope = v.bias0 + out;
            v.bias1 = v.slope + out;
            v.numGroups = p.num_groups;
            v.residual = p.residual;
        }
        *layer = l;
        return BDM_OK;
    }
    catch (std::bad_alloc const&)
    {
        return BDM_CPU_OUT_OF_MEMORY;
    }
}

extern "C" void bdm_binary_conv_cpu_release(bdm_binary_conv_cpu_layer* layer)
{
    delete layer;
}

extern "C" int bdm_binary_conv_cpu_run(bdm_binary_conv_cpu_layer const* layer, bdm_binary_conv_cpu_call const* call)
{
    if (!layer || !call || !call->x || !call->y || call->batch <= 0 || call->height <= 0 || call->width <= 0
        || call->group < 0 || call->group >= layer->view.numGroups || call->threads < 0)
    {
        return BDM_INVALID_ARGUMENT;
    }
    bdm::cpu::BinaryConvCall const c{call->x, call->y, call->batch, call->height, call->width, call->group,
        call->threads};
    return bdm::cpu::runBinaryConv(layer->isa, layer->view, c);
}
