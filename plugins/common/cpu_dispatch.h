// The baseline side of the CPU kernels' C ABI (compiled without target flags): which path runs a prepared layer,
// and the weight repacking every path's popcount tile reads.
#pragma once

#include "cpu_isa_entries.h"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace bdm
{
namespace cpu
{

// Channels per tile of `isa`'s popcount tile; 0 if this CPU or build lacks the path.
int tileChannels(int isa);

// rows: [channels][taps][words] sign words (bit c of word w = input channel 32w + c); bits past in_channels are
// cleared. Returns the blocked layout of BlockedWeights for `tileChannels` channels per block, zero channels past
// the end.
std::vector<uint32_t> blockWeights(
    std::vector<uint32_t> const& rows, int channels, int taps, int words, int tileChannels);

// rows with the bits past in_channels cleared (the spec does not promise they are 0).
std::vector<uint32_t> maskedRows(int32_t const* weight, long long rows, int words, int inChannels);

int runBinaryConv(int isa, BinaryConvLayer const& layer, BinaryConvCall const& call);
int runMultibasisConv(int isa, MultibasisConvLayer const& layer, MultibasisConvCall const& call);

} // namespace cpu
} // namespace bdm
