// TensorRT IPluginV3 glue for BinaryConv2d and BinarySignConv2d (spec.yaml beside this file): their
// descriptors for the shared Plugin / Creator classes (../common/plugin_base.h). One kernel serves both.
#pragma once

#include "../common/plugin_base.h"

namespace bdm
{
namespace trt
{

OpDescriptor const& binaryConv2dDescriptor();
OpDescriptor const& binarySignConv2dDescriptor();

} // namespace trt
} // namespace bdm
