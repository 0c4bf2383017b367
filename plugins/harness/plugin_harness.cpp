// Host-only test harness for libbdm_trt_plugins.so: no GPU, no TensorRT runtime, only the public headers.
// It dlopens the library the way IPluginRegistry::loadLibrary does (getCreators, setLoggerFinder) and drives
// one op's creator and plugin through the build-time and serialization calls TensorRT makes.
//
//   bdm_plugin_harness LIB OP [field=value ...] -- dtype:d0,d1,... (one per input; dtype f32|f16|i32)
//   bdm_plugin_harness --registration REGISTRY_DOUBLE LIB dlopen|load_library
//
// The second form checks registration in a process that already holds "libnvinfer" (the test double
// registry_double.cpp, loaded RTLD_LOCAL as Python loads the real one): a plain dlopen of LIB (scenario dlopen)
// registers nothing, IPluginRegistry::loadLibrary(LIB) then registers every creator once, and a second
// loadLibrary of LIB fails as TensorRT documents, leaving the registry as it was.
//
// Prints one JSON object (creators, fields, checks, output shape/types, workspace, log) and exits 0 when every
// check passed, 1 when one failed, 2 on a usage or load error. A plugin the creator refuses is a result
// ("created": false), not a failed check: the Python tests use that for invalid attributes.
#include <NvInferRuntime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <dlfcn.h>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

std::string jsonString(std::string const& s)
{
    std::string out = "\"";
    for (char const c : s)
    {
        if (c == '"' || c == '\\')
        {
            out += '\\';
        }
        if (static_cast<unsigned char>(c) < 0x20)
        {
            out += ' ';
            continue;
        }
        out += c;
    }
    return out + "\"";
}

class CapturingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        messages.push_back(std::to_string(static_cast<int>(severity)) + ": " + (msg ? msg : ""));
    }
    std::vector<std::string> messages;
};

class HarnessLoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &logger;
    }
    CapturingLogger logger;
};

// Constant-only dimension expressions: IExprBuilder / IDimensionExpr forward to the apiv:: implementation
// classes, which are what TensorRT itself provides. Test-only.
class ConstDimImpl : public apiv::VDimensionExpr
{
public:
    explicit ConstDimImpl(int64_t v)
        : value(v)
    {
    }
    bool isConstant() const override
    {
        return true;
    }
    int64_t getConstantValue() const override
    {
        return value;
    }
    bool isSizeTensor() const override
    {
        return false;
    }
    int64_t value;
};

class ConstDim : public IDimensionExpr
{
public:
    explicit ConstDim(int64_t v)
        : impl(v)
    {
        mImpl = &impl;
    }
    ConstDimImpl impl;
};

class ConstExprBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        return &dims.emplace_back(value);
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        int64_t const x = a.getConstantValue();
        int64_t const y = b.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return constant(x + y);
        case DimensionOperation::kPROD: return constant(x * y);
        case DimensionOperation::kMAX: return constant(x > y ? x : y);
        case DimensionOperation::kMIN: return constant(x < y ? x : y);
        case DimensionOperation::kSUB: return constant(x - y);
        case DimensionOperation::kEQUAL: return constant(x == y);
        case DimensionOperation::kLESS: return constant(x < y);
        case DimensionOperation::kFLOOR_DIV: return constant(x / y - ((x % y != 0) && ((x < 0) != (y < 0))));
        case DimensionOperation::kCEIL_DIV: return constant((x + y - 1) / y);
        }
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    std::deque<ConstDim> dims; // stable addresses
};

class ConstExprBuilder : public IExprBuilder
{
public:
    ConstExprBuilder()
    {
        mImpl = &impl;
    }
    ConstExprBuilderImpl impl;
};

struct TensorArg
{
    DataType type;
    Dims dims;
};

bool parseTensor(std::string const& arg, TensorArg& out)
{
    size_t const colon = arg.find(':');
    if (colon == std::string::npos)
    {
        return false;
    }
    std::string const type = arg.substr(0, colon);
    if (type == "f32")
        out.type = DataType::kFLOAT;
    else if (type == "f16")
        out.type = DataType::kHALF;
    else if (type == "i32")
        out.type = DataType::kINT32;
    else
        return false;
    out.dims.nbDims = 0;
    std::stringstream dims(arg.substr(colon + 1));
    std::string item;
    while (std::getline(dims, item, ','))
    {
        out.dims.d[out.dims.nbDims++] = std::atoll(item.c_str());
    }
    return true;
}

std::string dimsJson(Dims const& d)
{
    std::string s = "[";
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        s += (i ? ", " : "") + std::to_string(d.d[i]);
    }
    return s + "]";
}

// Integer fields of a collection as {"name": value}; every bdm field is one INT32.
std::map<std::string, int64_t> fieldMap(PluginFieldCollection const* fc)
{
    std::map<std::string, int64_t> m;
    for (int32_t i = 0; fc && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        m[f.name] = (f.type == PluginFieldType::kINT32 && f.length == 1 && f.data) ? *static_cast<int32_t const*>(f.data) : -999999;
    }
    return m;
}

std::string fieldMapJson(std::map<std::string, int64_t> const& m)
{
    std::string s = "{";
    bool first = true;
    for (auto const& [k, v] : m)
    {
        s += (first ? "" : ", ") + jsonString(k) + ": " + std::to_string(v);
        first = false;
    }
    return s + "}";
}

std::vector<DynamicPluginTensorDesc> describe(std::vector<TensorArg> const& tensors)
{
    std::vector<DynamicPluginTensorDesc> descs(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i)
    {
        descs[i].desc.dims = tensors[i].dims;
        descs[i].desc.type = tensors[i].type;
        descs[i].desc.format = TensorFormat::kLINEAR;
        descs[i].desc.scale = 1.0F;
        descs[i].min = descs[i].opt = descs[i].max = tensors[i].dims;
    }
    return descs;
}

struct Report
{
    std::vector<std::pair<std::string, bool>> checks;
    std::vector<std::string> extra; // preformatted "key": value members
    void check(std::string const& name, bool ok)
    {
        checks.emplace_back(name, ok);
    }
    bool allPassed() const
    {
        for (auto const& c : checks)
        {
            if (!c.second)
                return false;
        }
        return true;
    }
};

// Every build/serialization call TensorRT makes on a created plugin.
void exercisePlugin(IPluginCreatorV3One& creator, IPluginV3& plugin, std::string const& op,
    std::vector<TensorArg> const& tensors, Report& r)
{
    auto* core = static_cast<IPluginV3OneCore*>(plugin.getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin.getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin.getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    r.check("capabilities", core && build && runtime);
    if (!core || !build || !runtime)
    {
        return;
    }
    r.check("identity", op == core->getPluginName() && std::strcmp(core->getPluginVersion(), "1") == 0
            && std::strcmp(core->getPluginNamespace(), "bdm") == 0);
    r.check("nb_outputs", build->getNbOutputs() == 1);

    int32_t const nbInputs = static_cast<int32_t>(tensors.size());
    std::vector<DataType> inTypes;
    for (auto const& t : tensors)
        inTypes.push_back(t.type);
    DataType out = DataType::kINT8;
    bool const typed = build->getOutputDataTypes(&out, 1, inTypes.data(), nbInputs) == 0;
    r.check("output_type_follows_x", typed && out == inTypes[0]);
    // The x types the plugin takes, each with the other inputs as given: typed by getOutputDataTypes (output = x's
    // type) and offered by supportsFormatCombination for x and the output alike.
    std::string xTypes = "[";
    for (auto const& [x, name] : {std::pair{DataType::kFLOAT, "f32"}, std::pair{DataType::kHALF, "f16"}})
    {
        std::vector<DataType> types = inTypes;
        types[0] = x;
        DataType xOut = DataType::kINT8;
        std::vector<DynamicPluginTensorDesc> io = describe(tensors);
        io.push_back(io[0]);
        io[0].desc.type = io[nbInputs].desc.type = x;
        if (build->getOutputDataTypes(&xOut, 1, types.data(), nbInputs) == 0 && xOut == x
            && build->supportsFormatCombination(0, io.data(), nbInputs, 1)
            && build->supportsFormatCombination(nbInputs, io.data(), nbInputs, 1))
        {
            xTypes += std::string(xTypes.size() > 1 ? ", " : "") + jsonString(name);
        }
    }
    r.extra.push_back("\"x_types\": " + xTypes + "]");
    inTypes[0] = DataType::kINT32;
    r.check("output_type_rejects_int32_x", build->getOutputDataTypes(&out, 1, inTypes.data(), nbInputs) != 0);

    ConstExprBuilder exprs;
    std::vector<DimsExprs> inExprs(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i)
    {
        inExprs[i].nbDims = tensors[i].dims.nbDims;
        for (int32_t k = 0; k < tensors[i].dims.nbDims; ++k)
            inExprs[i].d[k] = exprs.constant(tensors[i].dims.d[k]);
    }
    DimsExprs outExprs{};
    bool const shapeOk = build->getOutputShapes(inExprs.data(), nbInputs, nullptr, 0, &outExprs, 1, exprs) == 0;
    r.check("output_shapes", shapeOk);
    if (shapeOk)
    {
        Dims outDims{};
        outDims.nbDims = outExprs.nbDims;
        for (int32_t k = 0; k < outExprs.nbDims; ++k)
            outDims.d[k] = outExprs.d[k]->isConstant() ? outExprs.d[k]->getConstantValue() : -1;
        r.extra.push_back("\"output_shape\": " + dimsJson(outDims));
    }

    // Format negotiation: the given types pass; each input retyped, the output retyped, or a non-linear
    // format is refused.
    std::vector<DynamicPluginTensorDesc> io = describe(tensors);
    DynamicPluginTensorDesc outDesc = io[0];
    io.push_back(outDesc);
    bool given = true;
    for (int32_t pos = 0; pos <= nbInputs; ++pos)
        given = build->supportsFormatCombination(pos, io.data(), nbInputs, 1) && given;
    r.check("formats_accept_given_types", given);
    bool wrongRefused = true;
    for (int32_t pos = 1; pos <= nbInputs; ++pos)
    {
        std::vector<DynamicPluginTensorDesc> bad = io;
        DataType& t = bad[pos].desc.type;
        t = (t == DataType::kINT32) ? DataType::kFLOAT : DataType::kINT32;
        wrongRefused = !build->supportsFormatCombination(pos, bad.data(), nbInputs, 1) && wrongRefused;
    }
    {
        std::vector<DynamicPluginTensorDesc> bad = io;
        bad[0].desc.type = DataType::kINT8;
        wrongRefused = !build->supportsFormatCombination(0, bad.data(), nbInputs, 1) && wrongRefused;
        bad = io;
        bad[nbInputs].desc.type = io[0].desc.type == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
        wrongRefused = !build->supportsFormatCombination(nbInputs, bad.data(), nbInputs, 1) && wrongRefused;
        bad = io;
        bad[0].desc.format = TensorFormat::kCHW32;
        wrongRefused = !build->supportsFormatCombination(0, bad.data(), nbInputs, 1) && wrongRefused;
    }
    r.check("formats_refuse_other_types", wrongRefused);

    std::vector<DynamicPluginTensorDesc> in = describe(tensors);
    r.check("configure_accepts_given_dims", build->configurePlugin(in.data(), nbInputs, &outDesc, 1) == 0);
    // A wrong size anywhere is refused: x's channel dim, every other input's last dim.
    bool mismatchRefused = true;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        std::vector<DynamicPluginTensorDesc> bad = describe(tensors);
        Dims& d = bad[i].desc.dims;
        d.d[i == 0 ? 1 : d.nbDims - 1] += 1;
        mismatchRefused = build->configurePlugin(bad.data(), nbInputs, &outDesc, 1) != 0 && mismatchRefused;
    }
    r.check("configure_refuses_wrong_dims", mismatchRefused);
    r.extra.push_back("\"workspace_bytes\": " + std::to_string(build->getWorkspaceSize(in.data(), nbInputs, &outDesc, 1)));
    char const* timingId = build->getTimingCacheID();
    r.check("timing_cache_id", timingId && *timingId);

    // Serialization round trip and the runtime-side copies: same fields everywhere.
    auto const fields = fieldMap(runtime->getFieldsToSerialize());
    r.extra.push_back("\"serialized_fields\": " + fieldMapJson(fields));
    PluginFieldCollection const* serial = runtime->getFieldsToSerialize();
    IPluginV3* restored = creator.createPlugin("restored", serial, TensorRTPhase::kRUNTIME);
    bool roundTrip = restored != nullptr;
    if (restored)
    {
        auto* restoredRuntime
            = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        roundTrip = restoredRuntime && fieldMap(restoredRuntime->getFieldsToSerialize()) == fields;
        delete restored;
    }
    r.check("serialize_round_trip", roundTrip);

    IPluginV3* cloned = plugin.clone();
    bool cloneOk = cloned != nullptr;
    if (cloned)
    {
        auto* c = static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        auto* cc = static_cast<IPluginV3OneCore*>(cloned->getCapabilityInterface(PluginCapabilityType::kCORE));
        cloneOk = c && cc && op == cc->getPluginName() && fieldMap(c->getFieldsToSerialize()) == fields;
        delete cloned;
    }
    r.check("clone", cloneOk);

    IPluginV3* attached = runtime->attachToContext(nullptr);
    bool attachOk = attached != nullptr;
    if (attached)
    {
        auto* a = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        attachOk = a && fieldMap(a->getFieldsToSerialize()) == fields;
        delete attached;
    }
    r.check("attach_to_context", attachOk);
}

std::string registeredJson(IPluginRegistry& registry)
{
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = registry.getAllCreators(&n);
    std::string s = "[";
    for (int32_t i = 0; i < n; ++i)
    {
        auto const* c = static_cast<IPluginCreatorV3One const*>(creators[i]);
        s += (i ? ", " : "") + jsonString(std::string(c->getPluginNamespace()) + "::" + c->getPluginName());
    }
    return s + "]";
}

int runRegistration(char const* registryDouble, char const* library, std::string const& scenario)
{
    void* nvinfer = dlopen(registryDouble, RTLD_NOW | RTLD_LOCAL);
    auto getRegistry = nvinfer ? reinterpret_cast<IPluginRegistry* (*) ()>(dlsym(nvinfer, "getPluginRegistry")) : nullptr;
    if (!getRegistry || (scenario != "dlopen" && scenario != "load_library"))
    {
        std::fprintf(stderr, "cannot use %s as the registry, or unknown scenario %s\n", registryDouble, scenario.c_str());
        return 2;
    }
    IPluginRegistry& registry = *getRegistry();
    std::string afterDlopen = "null";
    if (scenario == "dlopen")
    {
        if (!dlopen(library, RTLD_NOW | RTLD_LOCAL))
        {
            std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
            return 2;
        }
        afterDlopen = registeredJson(registry);
    }
    bool const loaded = registry.loadLibrary(library) != nullptr;
    std::string const afterLoad = registeredJson(registry);
    bool const loadedAgain = registry.loadLibrary(library) != nullptr;
    std::printf("{\"after_dlopen\": %s, \"load_library_ok\": %s, \"after_load_library\": %s, "
                "\"second_load_library_ok\": %s, \"after_second_load_library\": %s}\n",
        afterDlopen.c_str(), loaded ? "true" : "false", afterLoad.c_str(), loadedAgain ? "true" : "false",
        registeredJson(registry).c_str());
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc == 5 && std::string(argv[1]) == "--registration")
    {
        return runRegistration(argv[2], argv[3], argv[4]);
    }
    if (argc < 3)
    {
        std::fprintf(stderr, "usage: %s LIB OP [field=value ...] -- dtype:d0,d1,... ...\n", argv[0]);
        return 2;
    }
    std::string const op = argv[2];
    std::vector<std::string> fieldNames;
    std::vector<int32_t> fieldValues;
    std::vector<TensorArg> tensors;
    bool inTensors = false;
    for (int i = 3; i < argc; ++i)
    {
        std::string const a = argv[i];
        if (a == "--")
        {
            inTensors = true;
            continue;
        }
        if (inTensors)
        {
            TensorArg t{};
            if (!parseTensor(a, t))
            {
                std::fprintf(stderr, "bad tensor argument %s (want dtype:d0,d1,...)\n", a.c_str());
                return 2;
            }
            tensors.push_back(t);
            continue;
        }
        size_t const eq = a.find('=');
        if (eq == std::string::npos)
        {
            std::fprintf(stderr, "bad field argument %s (want name=value)\n", a.c_str());
            return 2;
        }
        fieldNames.push_back(a.substr(0, eq));
        fieldValues.push_back(std::atoi(a.c_str() + eq + 1));
    }

    // RTLD_LOCAL and no libnvinfer in this process: the library must load on its own.
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    if (!getCreators || !setLoggerFinder)
    {
        std::fprintf(stderr, "the library does not export getCreators and setLoggerFinder\n");
        return 2;
    }
    HarnessLoggerFinder finder;
    setLoggerFinder(&finder);

    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    std::string creatorsJson = "[";
    IPluginCreatorV3One* chosen = nullptr;
    for (int32_t i = 0; i < nbCreators; ++i)
    {
        InterfaceInfo const info = creators[i]->getInterfaceInfo();
        if (std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") != 0)
        {
            continue;
        }
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        std::string names = "[";
        PluginFieldCollection const* fn = c->getFieldNames();
        for (int32_t k = 0; fn && k < fn->nbFields; ++k)
        {
            names += (k ? ", " : "") + jsonString(fn->fields[k].name);
        }
        names += "]";
        creatorsJson += std::string(i ? ", " : "") + "{\"name\": " + jsonString(c->getPluginName())
            + ", \"version\": " + jsonString(c->getPluginVersion()) + ", \"namespace\": "
            + jsonString(c->getPluginNamespace()) + ", \"kind\": " + jsonString(info.kind) + ", \"fields\": " + names + "}";
        if (op == c->getPluginName())
        {
            chosen = c;
        }
    }
    creatorsJson += "]";

    Report report;
    bool created = false;
    if (chosen)
    {
        std::vector<PluginField> fields;
        for (size_t i = 0; i < fieldNames.size(); ++i)
        {
            fields.emplace_back(fieldNames[i].c_str(), &fieldValues[i], PluginFieldType::kINT32, 1);
        }
        PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
        IPluginV3* plugin = chosen->createPlugin("harness_node", &fc, TensorRTPhase::kBUILD);
        created = plugin != nullptr;
        if (plugin)
        {
            exercisePlugin(*chosen, *plugin, op, tensors, report);
            delete plugin;
        }
    }

    std::printf("{\"op\": %s, \"creators\": %s, \"found\": %s, \"created\": %s", jsonString(op).c_str(),
        creatorsJson.c_str(), chosen ? "true" : "false", created ? "true" : "false");
    std::printf(", \"checks\": {");
    for (size_t i = 0; i < report.checks.size(); ++i)
    {
        std::printf("%s%s: %s", i ? ", " : "", jsonString(report.checks[i].first).c_str(),
            report.checks[i].second ? "true" : "false");
    }
    std::printf("}");
    for (auto const& e : report.extra)
    {
        std::printf(", %s", e.c_str());
    }
    std::printf(", \"log\": [");
    for (size_t i = 0; i < finder.logger.messages.size(); ++i)
    {
        std::printf("%s%s", i ? ", " : "", jsonString(finder.logger.messages[i]).c_str());
    }
    std::printf("]}\n");
    return report.allPassed() ? 0 : 1;
}
