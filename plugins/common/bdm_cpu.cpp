// Which CPU kernel path runs here (compiled for the baseline instruction set: it must run on every CPU).
#include "bdm_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

extern "C" int bdm_cpu_isa_supported(int isa)
{
    switch (isa)
    {
    case BDM_CPU_PORTABLE: return 1;
#if defined(__x86_64__)
    // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers (XCR0).
    case BDM_CPU_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case BDM_CPU_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt");
#endif
    default: return 0;
    }
}

extern "C" int bdm_cpu_best_isa(void)
{
    if (bdm_cpu_isa_supported(BDM_CPU_AVX512))
    {
        return BDM_CPU_AVX512;
    }
    return bdm_cpu_isa_supported(BDM_CPU_AVX2) ? BDM_CPU_AVX2 : BDM_CPU_PORTABLE;
}

extern "C" char const* bdm_cpu_isa_name(int isa)
{
    switch (isa)
    {
    case BDM_CPU_PORTABLE: return "portable";
    case BDM_CPU_AVX2: return "avx2";
    case BDM_CPU_AVX512: return "avx512-vpopcntdq";
    default: return nullptr;
    }
}

extern "C" int bdm_cpu_default_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

extern "C" char const* bdm_cpu_status_string(int status)
{
    switch (status)
    {
    case BDM_OK: return "success";
    case BDM_INVALID_ARGUMENT: return "invalid argument";
    case BDM_CPU_UNSUPPORTED_ISA: return "instruction set not supported by this CPU or build";
    case BDM_CPU_OUT_OF_MEMORY: return "out of memory";
    default: return "unknown status";
    }
}
