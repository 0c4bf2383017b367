// The plugin library's entry points: getCreators / setLoggerFinder, the dynamic-plugin interface TensorRT
// documents (IPluginRegistry::loadLibrary, trt.get_plugin_registry().load_library, trtexec --dynamicPlugins).
// Registration is TensorRT's job alone: the library registers nothing when it is loaded (loadLibrary refuses a
// creator that is already registered, and nothing documents registering from a load-time constructor as safe),
// and it never links libnvinfer, so loading it without TensorRT is harmless.
#include "../binary_conv/binary_conv_plugin.h"
#include "../multibasis_conv/multibasis_conv_plugin.h"
#include "../timestep_affine/timestep_affine_plugin.h"
#include "plugin_base.h"

#include <atomic>
#include <cstdio>

using namespace nvinfer1;

namespace bdm
{
namespace trt
{
namespace
{

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr}; // from setLoggerFinder

std::vector<IPluginCreatorInterface*>& creators()
{
    static Creator binaryConv(binaryConv2dDescriptor());
    static Creator binarySignConv(binarySignConv2dDescriptor());
    static Creator timestepBias(timestepBiasDescriptor());
    static Creator timestepRPReLU(timestepRPReLUDescriptor());
    static Creator multibasisConv(multibasisConvDescriptor());
    static std::vector<IPluginCreatorInterface*> all{
        &binaryConv, &binarySignConv, &timestepBias, &timestepRPReLU, &multibasisConv};
    return all;
}

} // namespace

void logMessage(ILogger::Severity severity, std::string const& message)
{
    ILoggerFinder* const finder = gLoggerFinder.load();
    ILogger* const logger = finder ? finder->findLogger() : nullptr;
    if (logger)
    {
        logger->log(severity, message.c_str());
    }
    else if (severity <= ILogger::Severity::kWARNING)
    {
        std::fprintf(stderr, "bdm plugins: %s\n", message.c_str());
    }
}

} // namespace trt
} // namespace bdm

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = static_cast<int32_t>(bdm::trt::creators().size());
    return bdm::trt::creators().data();
}

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    bdm::trt::gLoggerFinder.store(finder);
}
