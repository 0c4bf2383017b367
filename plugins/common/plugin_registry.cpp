// The plugin library's entry points: getCreators / setLoggerFinder (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins) and self-registration on load when libnvinfer is already in the process
// (polygraphy --plugins, ctypes.CDLL). The library never links libnvinfer: the registry is looked up with
// dlopen(RTLD_NOLOAD), so loading it without TensorRT is harmless.
#include "../binary_conv/binary_conv_plugin.h"
#include "../multibasis_conv/multibasis_conv_plugin.h"
#include "../timestep_affine/timestep_affine_plugin.h"
#include "plugin_base.h"

#include <NvInferVersion.h>

#include <cstdio>
#include <dlfcn.h>
#include <mutex>

using namespace nvinfer1;

namespace bdm
{
namespace trt
{
namespace
{

#define BDM_STRINGIFY2(x) #x
#define BDM_STRINGIFY(x) BDM_STRINGIFY2(x)
// A plugin built against major M headers only works with libnvinfer.so.M (the vtables differ).
constexpr char const* kNvinferSoname = "libnvinfer.so." BDM_STRINGIFY(NV_TENSORRT_MAJOR);

struct State
{
    std::mutex mutex;
    ILoggerFinder* loggerFinder = nullptr;      // from setLoggerFinder
    ILogger* (*nvinferLogger)() = nullptr;      // libnvinfer's getLogger, when we self-registered
    IPluginRegistry* selfRegistry = nullptr;    // non-null while our creators are self-registered
};

State& state()
{
    static State s;
    return s;
}

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

__attribute__((constructor)) void selfRegister()
{
    void* nvinfer = dlopen(kNvinferSoname, RTLD_LAZY | RTLD_NOLOAD);
    if (!nvinfer)
    {
        return; // no TensorRT in this process: getCreators is the only way in
    }
    auto const getRegistry = reinterpret_cast<IPluginRegistry* (*) ()>(dlsym(nvinfer, "getPluginRegistry"));
    auto const getNvinferLogger = reinterpret_cast<ILogger* (*) ()>(dlsym(nvinfer, "getLogger"));
    dlclose(nvinfer); // drops only the reference RTLD_NOLOAD added
    IPluginRegistry* registry = getRegistry ? getRegistry() : nullptr;
    if (!registry)
    {
        return;
    }
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    s.nvinferLogger = getNvinferLogger;
    bool allRegistered = true;
    for (IPluginCreatorInterface* c : creators())
    {
        allRegistered = registry->registerCreator(*c, kPluginNamespace) && allRegistered;
    }
    s.selfRegistry = registry;
    if (!allRegistered)
    {
        // Another copy of the library (another path) registered the same creators first.
        std::fprintf(stderr, "bdm plugins: some creators were already registered; this copy's duplicates are unused\n");
    }
}

// Undo selfRegister (no-op when it did not register).
void withdrawSelfRegistration()
{
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.selfRegistry)
    {
        for (IPluginCreatorInterface* c : creators())
        {
            s.selfRegistry->deregisterCreator(*c);
        }
        s.selfRegistry = nullptr;
    }
}

__attribute__((destructor)) void selfDeregister()
{
    withdrawSelfRegistration();
}

} // namespace

void logMessage(ILogger::Severity severity, std::string const& message)
{
    State& s = state();
    ILogger* logger = s.loggerFinder ? s.loggerFinder->findLogger() : (s.nvinferLogger ? s.nvinferLogger() : nullptr);
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

// TensorRT's loadLibrary registers what getCreators returns and fails if any of it is already registered:
// hand registration over to it by withdrawing the load-time self-registration first.
extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    using namespace bdm::trt;
    withdrawSelfRegistration();
    nbCreators = static_cast<int32_t>(creators().size());
    return creators().data();
}

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(bdm::trt::state().mutex);
    bdm::trt::state().loggerFinder = finder;
}
