// Runs fixed layers of every CPU kernel form on one instruction-set path (argv[1], a bdm_cpu_isa code) through the C
// ABI and prints one FNV-1a digest of the output bytes per layer, so builds for other machines (aarch64 under qemu)
// and other paths can be compared bit for bit without Python. Inputs come from a fixed LCG, with exact +0.0 / -0.0.
// Built and run by tests/plugins/test_cpu_kernels.py.
#include "binary_conv/binary_conv_cpu.h"
#include "multibasis_conv/multibasis_conv_cpu.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace
{

uint32_t state = 12345u;

uint32_t next()
{
    state = state * 1664525u + 1013904223u;
    return state;
}

// Values in [-1, 1), every 11th +0.0 and every 13th -0.0.
std::vector<float> values(size_t count)
{
    std::vector<float> v(count);
    for (size_t i = 0; i < count; ++i)
    {
        v[i] = i % 11 == 0 ? 0.0f : (i % 13 == 0 ? -0.0f : static_cast<float>(next() >> 8) / 8388608.0f - 1.0f);
    }
    return v;
}

std::vector<int32_t> words(size_t count)
{
    std::vector<int32_t> w(count);
    for (auto& x : w)
    {
        x = static_cast<int32_t>(next());
    }
    return w;
}

void print(char const* name, int status, std::vector<float> const& y)
{
    uint64_t hash = 1469598103934665603ull;
    auto const* bytes = reinterpret_cast<unsigned char const*>(y.data());
    for (size_t i = 0; i < y.size() * sizeof(float); ++i)
    {
        hash = (hash ^ bytes[i]) * 1099511628211ull;
    }
    std::printf("%s status %d digest %016llx\n", name, status, static_cast<unsigned long long>(hash));
}

void binaryConv(int isa, char const* name, int cin, int cout, int k, int pad, int residual, bool fused, int n, int h,
    int w)
{
    int const groups = 5;
    std::vector<int32_t> weight = words(static_cast<size_t>(cout) * k * k * ((cin + 31) / 32));
    std::vector<float> alpha = values(cout), threshold = values(groups * cin), bias0 = values(groups * cout),
                       slope = values(groups * cout), bias1 = values(groups * cout), x = values(size_t(n) * cin * h * w);
    std::vector<float> y(size_t(n) * cout * h * w);
    bdm_binary_conv_cpu_params p{cin, cout, k, groups, pad, residual, weight.data(), alpha.data(),
        fused ? threshold.data() : nullptr, fused ? bias0.data() : nullptr, fused ? slope.data() : nullptr,
        fused ? bias1.data() : nullptr};
    bdm_binary_conv_cpu_layer* layer = nullptr;
    int status = bdm_binary_conv_cpu_prepare(isa, &p, &layer);
    if (status == BDM_OK)
    {
        bdm_binary_conv_cpu_call c{x.data(), y.data(), n, h, w, fused ? 3 : 0, 2};
        status = bdm_binary_conv_cpu_run(layer, &c);
        bdm_binary_conv_cpu_release(layer);
    }
    print(name, status, y);
}

void multibasisConv(int isa, char const* name, int cin, int cout, int dims, int k, int stride, int pad, int bases,
    int bits, int n, int h, int w)
{
    int const taps = dims == 2 ? k * k : (dims == 1 ? k : 1);
    std::vector<int32_t> weight = words(static_cast<size_t>(bases) * cout * taps * ((cin + 31) / 32));
    std::vector<float> scale = values(bases * cout), bias = values(cout), x = values(size_t(n) * cin * h * w);
    int const oh = bdm_multibasis_conv_cpu_out_size(h, dims == 2 ? k : 1, stride, dims == 2 ? pad : 0);
    int const ow = bdm_multibasis_conv_cpu_out_size(w, k, stride, pad);
    std::vector<float> y(size_t(n) * cout * oh * ow);
    for (auto& s : scale)
    {
        s = s < 0.0f ? -s : s;
    }
    bdm_multibasis_conv_cpu_params p{cin, cout, dims, k, stride, pad, bases, bits, weight.data(), scale.data(),
        bias.data()};
    bdm_multibasis_conv_cpu_layer* layer = nullptr;
    int status = bdm_multibasis_conv_cpu_prepare(isa, &p, &layer);
    if (status == BDM_OK)
    {
        bdm_multibasis_conv_cpu_call c{x.data(), y.data(), n, h, w, 0.37f, 2};
        status = bdm_multibasis_conv_cpu_run(layer, &c);
        bdm_multibasis_conv_cpu_release(layer);
    }
    print(name, status, y);
}

} // namespace

int main(int argc, char** argv)
{
    int const isa = argc > 1 ? std::atoi(argv[1]) : BDM_CPU_PORTABLE;
    binaryConv(isa, "BinaryConv2d_k3_pad0_residual", 70, 70, 3, 0, 1, true, 2, 9, 37);
    binaryConv(isa, "BinaryConv2d_k1_pad1", 33, 20, 1, 1, 0, true, 1, 5, 6);
    binaryConv(isa, "BinarySignConv2d_k3_pad-1", 40, 24, 3, -1, 0, false, 1, 7, 40);
    multibasisConv(isa, "MultiBasisConv_A4_2bases_s2", 40, 24, 2, 3, 2, 1, 2, 4, 2, 9, 60);
    multibasisConv(isa, "MultiBasisConv_A4_2bases_rows", 40, 24, 2, 3, 1, 1, 2, 4, 1, 3, 64);
    multibasisConv(isa, "MultiBasisConv_A8_conv1d", 32, 33, 1, 3, 1, 1, 1, 8, 2, 1, 70);
    multibasisConv(isa, "MultiBasisConv_A8_linear", 96, 16, 0, 1, 1, 0, 2, 8, 5, 1, 1);
    return 0;
}
