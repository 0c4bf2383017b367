// The CPU kernels for x86-64 AVX2: build.py compiles this file with -mavx2 -mpopcnt; elsewhere it is empty.
#if defined(__x86_64__)
#define BDM_CPU_NS avx2
#if !defined(__AVX2__)
#error "cpu_isa_avx2.cpp needs -mavx2 -mpopcnt (bdm.plugins.build passes them)"
#endif

#include "../binary_conv/binary_conv_cpu_kernel.h"
#include "../multibasis_conv/multibasis_conv_cpu_kernel.h"

int bdm::cpu::avx2::tileChannels()
{
    return kTileChannels;
}
#endif
