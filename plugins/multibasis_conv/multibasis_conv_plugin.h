// TensorRT IPluginV3 glue for MultiBasisConv (spec.yaml beside this file): its descriptor for the shared Plugin /
// Creator classes (../common/plugin_base.h).
#pragma once

#include "../common/plugin_base.h"

namespace bdm
{
namespace trt
{

OpDescriptor const& multibasisConvDescriptor();

} // namespace trt
} // namespace bdm
