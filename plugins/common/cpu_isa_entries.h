// What the C ABI (compiled for the baseline instruction set) hands the per-ISA kernels (cpu_isa_*.cpp, compiled with
// their own target flags): plain views of a prepared layer and of one call, and the entry points of each path.
// Only plain data crosses this line: an inline function or template shared by two translation units with different
// target flags could be merged by the linker into the one with the wider instructions.
#pragma once

#include <cstddef>
#include <cstdint>

namespace bdm
{
namespace cpu
{

// Weights repacked once for the popcount tile: output (or virtual) channels in blocks of `tileChannels`, each block
// [taps][words][tileChannels] uint32 so one tap word of all the block's channels is contiguous; bits past
// in_channels and channels past the end are 0.
struct BlockedWeights
{
    uint32_t const* words;
    int channels; // real or virtual channels (MultiBasisConv: num_bases per output channel)
    int blocks;   // ceil(channels / tileChannels)
};

// A prepared BinaryConv2d / BinarySignConv2d (tables NULL for BinarySignConv2d).
struct BinaryConvLayer
{
    int inChannels;
    int outChannels;
    int kernelSize; // 1 or 3; padding kernelSize / 2
    int padValue;   // -1, 0, 1
    int residual;
    int numGroups;
    int words; // ceil(in_channels / 32)
    BlockedWeights blocked;
    uint32_t const* weights; // [outChannels][taps][words], bits past in_channels cleared (zero-sign correction)
    int32_t const* tapSums;  // [outChannels][taps]: sum over c of sign(W)[o, c, tap] (pad_value 0 correction)
    float const* alpha;      // [outChannels]
    float const* threshold;  // [numGroups][inChannels]
    float const* bias0;      // [numGroups][outChannels]
    float const* slope;
    float const* bias1;
};

struct BinaryConvCall
{
    float const* x; // [batch, inChannels, height, width]
    float* y;       // [batch, outChannels, height, width]
    int batch;
    int height;
    int width;
    int group;   // timestep group (0 for BinarySignConv2d)
    int threads; // 0: OpenMP's default
};

// A prepared MultiBasisConv with act_bits 4 or 8; every form as a 2-D convolution (conv1d: height 1, linear: 1 x 1
// per sample, or one 1 x N row, see multibasis_conv_cpu.h).
struct MultibasisConvLayer
{
    int inChannels;
    int outChannels;
    int numBases;
    int kernelH;
    int kernelW;
    int stride;
    int padH;
    int padW;
    int actBits;
    int words;
    BlockedWeights blocked; // virtual channel numBases*o + k holds basis k of output channel o
    float const* classSame; // [outChannels] v_same = s1 (+ s2): the CUDA kernel's ClassValues
    float const* classDiff; // [outChannels] v_diff = s1 - s2 (0 with one basis)
    float const* bias;      // [outChannels]
};

struct MultibasisConvCall
{
    float const* x; // [batch, inChannels, height, width]
    float* y;       // [batch, outChannels, outHeight, outWidth]
    int batch;
    int height;
    int width;
    float step; // the quantizer's step: (a - a*g) + a*g of a = act_step[0] (the C ABI computes it)
    int threads;
};

// Entry points of one instruction-set path; they return a bdm_status / bdm_cpu_status code.
#define BDM_CPU_DECLARE_ISA(ns)                                                                                        \
    namespace ns                                                                                                       \
    {                                                                                                                  \
    int tileChannels();                                                                                                \
    int binaryConv(BinaryConvLayer const& layer, BinaryConvCall const& call);                                          \
    int multibasisConv(MultibasisConvLayer const& layer, MultibasisConvCall const& call);                              \
    }

BDM_CPU_DECLARE_ISA(portable)
#if defined(__x86_64__)
BDM_CPU_DECLARE_ISA(avx2)
BDM_CPU_DECLARE_ISA(avx512)
#endif

#undef BDM_CPU_DECLARE_ISA

} // namespace cpu
} // namespace bdm
