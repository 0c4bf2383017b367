// The CPU kernels for x86-64 AVX-512 with VPOPCNTDQ: build.py compiles this file with -mavx512f -mavx512bw
// -mavx512dq -mavx512vl -mavx512vpopcntdq -mpopcnt; elsewhere it is empty.
#if defined(__x86_64__)
#define BDM_CPU_NS avx512
#if !defined(__AVX512F__) || !defined(__AVX512VPOPCNTDQ__)
#error "cpu_isa_avx512.cpp needs -mavx512f -mavx512vpopcntdq ... (bdm.plugins.build passes them)"
#endif

#include "../binary_conv/binary_conv_cpu_kernel.h"
#include "../multibasis_conv/multibasis_conv_cpu_kernel.h"

int bdm::cpu::avx512::tileChannels()
{
    return kTileChannels;
}
#endif
