// The CPU kernels in plain C++ (no target flags): the path for every CPU, and the reference the others equal.
#define BDM_CPU_NS portable

#include "../binary_conv/binary_conv_cpu_kernel.h"
#include "../multibasis_conv/multibasis_conv_cpu_kernel.h"

int bdm::cpu::portable::tileChannels()
{
    return kTileChannels;
}
