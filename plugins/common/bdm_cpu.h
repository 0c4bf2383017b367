// C ABI shared by the bdm CPU kernels (libbdm_cpu_kernels.so): the instruction-set paths, chosen at run time, and
// the status texts. Each op's launcher header (binary_conv/binary_conv_cpu.h, multibasis_conv/multibasis_conv_cpu.h)
// takes one of these ISA codes when it prepares a layer. No CUDA, no TensorRT: plain C.
#pragma once

#include "bdm_status.h"

#ifdef __cplusplus
extern "C" {
#endif

// The kernel paths. All are bit-identical; they differ in speed only.
enum bdm_cpu_isa
{
    BDM_CPU_PORTABLE = 0, // plain C++ (SWAR popcount, auto-vectorised for the target's baseline, e.g. NEON on aarch64)
    BDM_CPU_AVX2 = 1,     // x86-64 AVX2: nibble-lookup (vpshufb) popcount
    BDM_CPU_AVX512 = 2    // x86-64 AVX-512 F/BW/DQ/VL with VPOPCNTDQ: one vpopcntd per 16 words
};

// Status codes of the CPU launchers besides bdm_status's BDM_OK and BDM_INVALID_ARGUMENT.
enum bdm_cpu_status
{
    BDM_CPU_UNSUPPORTED_ISA = -10, // the path was not compiled in or this CPU lacks its instructions
    BDM_CPU_OUT_OF_MEMORY = -11
};

// 1 if this CPU (and OS) runs `isa`, else 0.
BDM_API int bdm_cpu_isa_supported(int isa);

// The fastest path this CPU runs.
BDM_API int bdm_cpu_best_isa(void);

// "portable", "avx2", "avx512-vpopcntdq"; NULL for an unknown code.
BDM_API char const* bdm_cpu_isa_name(int isa);

// Threads a parallel region gets when the caller passes threads = 0 (OpenMP's default), 1 without OpenMP.
BDM_API int bdm_cpu_default_threads(void);

// A static text for a status code.
BDM_API char const* bdm_cpu_status_string(int status);

#ifdef __cplusplus
}
#endif
