// The baseline side of the CPU kernels' C ABI: path dispatch and weight repacking (cpu_dispatch.h).
#include "cpu_dispatch.h"

#include "bdm_cpu.h"

namespace bdm
{
namespace cpu
{

int tileChannels(int isa)
{
    if (!bdm_cpu_isa_supported(isa))
    {
        return 0;
    }
    switch (isa)
    {
    case BDM_CPU_PORTABLE: return portable::tileChannels();
#if defined(__x86_64__)
    case BDM_CPU_AVX2: return avx2::tileChannels();
    case BDM_CPU_AVX512: return avx512::tileChannels();
#endif
    default: return 0;
    }
}

std::vector<uint32_t> maskedRows(int32_t const* weight, long long rows, int words, int inChannels)
{
    std::vector<uint32_t> masked(static_cast<size_t>(rows) * words);
    int const tail = inChannels - 32 * (words - 1);
    uint32_t const lastMask = tail >= 32 ? 0xffffffffu : (1u << tail) - 1u;
    for (size_t i = 0; i < masked.size(); ++i)
    {
        uint32_t const bits = static_cast<uint32_t>(weight[i]);
        masked[i] = static_cast<int>(i % words) == words - 1 ? bits & lastMask : bits;
    }
    return masked;
}

std::vector<uint32_t> blockWeights(
    std::vector<uint32_t> const& rows, int channels, int taps, int words, int tileChannels)
{
    int const blocks = (channels + tileChannels - 1) / tileChannels;
    std::vector<uint32_t> blocked(static_cast<size_t>(blocks) * taps * words * tileChannels, 0u);
    for (int c = 0; c < channels; ++c)
    {
        int const block = c / tileChannels;
        int const lane = c % tileChannels;
        for (int tw = 0; tw < taps * words; ++tw)
        {
            blocked[(static_cast<size_t>(block) * taps * words + tw) * tileChannels + lane]
                = rows[static_cast<size_t>(c) * taps * words + tw];
        }
    }
    return blocked;
}

int runBinaryConv(int isa, BinaryConvLayer const& layer, BinaryConvCall const& call)
{
    switch (isa)
    {
    case BDM_CPU_PORTABLE: return portable::binaryConv(layer, call);
#if defined(__x86_64__)
    case BDM_CPU_AVX2: return avx2::binaryConv(layer, call);
    case BDM_CPU_AVX512: return avx512::binaryConv(layer, call);
#endif
    default: return BDM_CPU_UNSUPPORTED_ISA;
    }
}

int runMultibasisConv(int isa, MultibasisConvLayer const& layer, MultibasisConvCall const& call)
{
    switch (isa)
    {
    case BDM_CPU_PORTABLE: return portable::multibasisConv(layer, call);
#if defined(__x86_64__)
    case BDM_CPU_AVX2: return avx2::multibasisConv(layer, call);
    case BDM_CPU_AVX512: return avx512::multibasisConv(layer, call);
#endif
    default: return BDM_CPU_UNSUPPORTED_ISA;
    }
}

} // namespace cpu
} // namespace bdm
