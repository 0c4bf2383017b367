// Test double of libnvinfer's plugin registry, built as libnvinfer.so.<major> in its own folder, for the
// registration test only (plugin_harness --registration: loading the bdm library registers nothing by itself,
// loadLibrary registers it once). It implements what TensorRT documents for
// IPluginRegistry: registerCreator refuses a (name, version, namespace) that is already registered, and
// loadLibrary dlopens a library, calls its getCreators and fails without registering anything if any creator
// is already registered. Nothing else of TensorRT is imitated.
#include <NvInferRuntime.h>

#include <cstring>
#include <dlfcn.h>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

std::string key(IPluginCreatorInterface const& c)
{
    if (std::strcmp(c.getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
    {
        return "?";
    }
    auto const& v3 = static_cast<IPluginCreatorV3One const&>(c);
    return std::string(v3.getPluginNamespace()) + "::" + v3.getPluginName() + " v" + v3.getPluginVersion();
}

class RegistryDouble : public IPluginRegistry
{
public:
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
    bool isParentSearchEnabled() const override
    {
        return false;
    }
    void setParentSearchEnabled(bool const) override {}

    PluginLibraryHandle loadLibrary(AsciiChar const* pluginPath) noexcept override
    {
        void* lib = dlopen(pluginPath, RTLD_LAZY | RTLD_LOCAL);
        auto getCreators = lib ? reinterpret_cast<IPluginCreatorInterface* const* (*) (int32_t&)>(
                               dlsym(lib, "getCreators"))
                               : nullptr;
        if (!getCreators)
        {
            return nullptr;
        }
        int32_t n = 0;
        IPluginCreatorInterface* const* creators = getCreators(n);
        for (int32_t i = 0; i < n; ++i)
        {
            if (find(key(*creators[i])) >= 0)
            {
                return nullptr;
            }
        }
        for (int32_t i = 0; i < n; ++i)
        {
            mCreators.push_back(creators[i]);
        }
        return lib;
    }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}

    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const) noexcept override
    {
        if (find(key(creator)) >= 0)
        {
            return false;
        }
        mCreators.push_back(&creator);
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override
    {
        *numCreators = static_cast<int32_t>(mCreators.size());
        return mCreators.data();
    }
    IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const& creator) noexcept override
    {
        for (size_t i = 0; i < mCreators.size(); ++i)
        {
            if (mCreators[i] == &creator)
            {
                mCreators.erase(mCreators.begin() + static_cast<long>(i));
                return true;
            }
        }
        return false;
    }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept override
    {
        return -1;
    }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const numCreators) noexcept override
    {
        return getAllCreators(numCreators);
    }
#if NV_TENSORRT_MAJOR < 11
    // Deprecated IPluginCreator (V1) interface, still pure virtual in TensorRT 10.
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override
    {
        return false;
    }
    IPluginCreator* const* getPluginCreatorList(int32_t* const numCreators) const noexcept override
    {
        *numCreators = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override
    {
        return false;
    }
#endif

private:
    int find(std::string const& k) const
    {
        for (size_t i = 0; i < mCreators.size(); ++i)
        {
            if (key(*mCreators[i]) == k)
            {
                return static_cast<int>(i);
            }
        }
        return -1;
    }
    std::vector<IPluginCreatorInterface*> mCreators;
};

} // namespace

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept
{
    static RegistryDouble registry;
    return &registry;
}

extern "C" __attribute__((visibility("default"))) ILogger* getLogger() noexcept
{
    return nullptr;
}
