// TensorRT IPluginV3 glue for TimestepBias and TimestepRPReLU (spec.yaml beside this file): their
// descriptors for the shared Plugin / Creator classes (../common/plugin_base.h).
#pragma once

#include "../common/plugin_base.h"

namespace bdm
{
namespace trt
{

OpDescriptor const& timestepBiasDescriptor();
OpDescriptor const& timestepRPReLUDescriptor();

} // namespace trt
} // namespace bdm
