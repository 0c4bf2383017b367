#include "plugin_base.h"

#include "bdm_status.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>

using namespace nvinfer1;

namespace bdm
{
namespace trt
{
namespace
{

using Severity = ILogger::Severity;

int findField(std::vector<FieldSpec> const& specs, char const* name)
{
    for (size_t i = 0; i < specs.size(); ++i)
    {
        if (name && std::strcmp(specs[i].name, name) == 0)
        {
            return static_cast<int>(i);
        }
    }
    return -1;
}

// One integer out of a PluginField of any integer type and length 1.
bool readInteger(PluginField const& field, int64_t& value)
{
    if (field.length != 1 || field.data == nullptr)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); return true;
    case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); return true;
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
    case PluginFieldType::kINT64: value = *static_cast<int64_t const*>(field.data); return true;
    default: return false;
    }
}

bool allowedValue(FieldSpec const& spec, int64_t value)
{
    if (spec.allowed.empty())
    {
        return value >= spec.minimum && value <= spec.maximum;
    }
    for (int32_t const a : spec.allowed)
    {
        if (a == value)
        {
            return true;
        }
    }
    return false;
}

std::string allowedText(FieldSpec const& spec)
{
    if (spec.allowed.empty() && spec.maximum != INT32_MAX)
    {
        return "an int32 from " + std::to_string(spec.minimum) + " to " + std::to_string(spec.maximum);
    }
    if (spec.allowed.empty())
    {
        return spec.minimum == 1 ? std::string("a positive int32") : "an int32 >= " + std::to_string(spec.minimum);
    }
    std::ostringstream s;
    s << "one of";
    for (int32_t const a : spec.allowed)
    {
        s << ' ' << a;
    }
    return s.str();
}

// Field collection -> values in spec order; an error text on any field that is unknown, mistyped, out of the
// allowed set, or missing without a default.
std::string parseFields(OpDescriptor const& op, PluginFieldCollection const* fc, std::vector<int32_t>& values)
{
    std::vector<bool> seen(op.fields.size(), false);
    values.assign(op.fields.size(), 0);
    for (int32_t i = 0; fc && i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        int const index = findField(op.fields, field.name);
        if (index < 0)
        {
            return std::string("unknown field '") + (field.name ? field.name : "(null)") + "'";
        }
        int64_t value = 0;
        if (!readInteger(field, value))
        {
            return std::string("field '") + field.name + "' must be one integer (INT attribute)";
        }
        if (!allowedValue(op.fields[index], value))
        {
            return std::string("field '") + field.name + "' = " + std::to_string(value) + " is not "
                + allowedText(op.fields[index]);
        }
        values[index] = static_cast<int32_t>(value);
        seen[index] = true;
    }
    for (size_t i = 0; i < op.fields.size(); ++i)
    {
        if (!seen[i])
        {
            if (!op.fields[i].hasDefault)
            {
                return std::string("required field '") + op.fields[i].name + "' is missing";
            }
            values[i] = op.fields[i].defaultValue;
        }
    }
    return {};
}

// The types an activation input (x) may have; the output takes x's type.
bool activationType(InputKind kind, DataType type)
{
    return type == DataType::kFLOAT || (kind == InputKind::kActivation && type == DataType::kHALF);
}

std::string pluginLabel(OpDescriptor const& op)
{
    return std::string(kPluginNamespace) + "::" + op.name + " v" + kPluginVersion;
}

} // namespace

int32_t FieldValues::get(char const* name) const
{
    int const index = findField(*mSpecs, name);
    if (index < 0)
    {
        logMessage(Severity::kINTERNAL_ERROR, std::string("bdm plugin asked for unknown field ") + name);
        std::abort();
    }
    return mValues[index];
}

int algoFromEnvironment()
{
    static int const algo = [] {
        char const* v = std::getenv("BDM_BINARY_CONV_ALGO");
        if (!v || !*v || std::strcmp(v, "auto") == 0)
        {
            return static_cast<int>(BDM_CONV_AUTO);
        }
        if (std::strcmp(v, "simple") == 0)
        {
            return static_cast<int>(BDM_CONV_SIMPLE);
        }
        if (std::strcmp(v, "tensor_core") == 0)
        {
            return static_cast<int>(BDM_CONV_TENSOR_CORE);
        }
        logMessage(Severity::kWARNING,
            std::string("BDM_BINARY_CONV_ALGO=") + v + " is not auto, simple or tensor_core; using auto");
        return static_cast<int>(BDM_CONV_AUTO);
    }();
    return algo;
}

std::string formatDims(Dims const& d)
{
    std::ostringstream s;
    s << '[';
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        s << (i ? ", " : "") << d.d[i];
    }
    s << ']';
    return s.str();
}

Plugin::Plugin(OpDescriptor const& op, FieldValues fields)
    : mOp(op)
    , mFields(std::move(fields))
{
    std::ostringstream id;
    id << pluginLabel(op);
    for (size_t i = 0; i < op.fields.size(); ++i)
    {
        id << ' ' << op.fields[i].name << '=' << mFields.values()[i];
    }
    mTimingCacheId = id.str();
}

IPluginCapability* Plugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* Plugin::clone() noexcept
{
    try
    {
        return new Plugin(mOp, mFields);
    }
    catch (std::exception const& e)
    {
        logMessage(Severity::kERROR, pluginLabel(mOp) + ": clone failed: " + e.what());
        return nullptr;
    }
}

AsciiChar const* Plugin::getPluginName() const noexcept
{
    return mOp.name;
}

AsciiChar const* Plugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

AsciiChar const* Plugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

bool Plugin::checkInputDims(Dims const* dims, int32_t nbInputs) const
{
    if (nbInputs != static_cast<int32_t>(mOp.inputs.size()))
    {
        logMessage(Severity::kERROR, pluginLabel(mOp) + ": expected " + std::to_string(mOp.inputs.size())
                + " inputs, got " + std::to_string(nbInputs));
        return false;
    }
    std::vector<std::vector<int64_t>> const expected = mOp.inputDims(mFields);
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        bool ok = dims[i].nbDims == static_cast<int32_t>(expected[i].size());
        for (int32_t k = 0; ok && k < dims[i].nbDims; ++k)
        {
            int64_t const want = expected[i][k] == kBatchDim ? dims[0].d[0] : expected[i][k];
            ok = dims[i].d[k] < 0 || want < 0 || dims[i].d[k] == want; // -1: not known at this point
        }
        if (!ok)
        {
            std::ostringstream s;
            s << pluginLabel(mOp) << ": input " << i << " has dims " << formatDims(dims[i]) << ", the op's fields need [";
            for (size_t k = 0; k < expected[i].size(); ++k)
            {
                int64_t const e = expected[i][k];
                s << (k ? ", " : "") << (e == kAnyDim ? std::string("*") : e == kBatchDim ? std::string("N") : std::to_string(e));
            }
            s << "] (check the exported attributes against plugins/*/spec.yaml)";
            logMessage(Severity::kERROR, s.str());
            return false;
        }
    }
    bool const xKnown = std::all_of(dims[0].d, dims[0].d + dims[0].nbDims, [](int64_t d) { return d >= 0; });
    std::string const error = mOp.checkInputShape && xKnown ? mOp.checkInputShape(mFields, dims[0]) : std::string();
    if (!error.empty())
    {
        logMessage(Severity::kERROR, pluginLabel(mOp) + ": x has dims " + formatDims(dims[0]) + ": " + error);
        return false;
    }
    return true;
}

int32_t Plugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    std::vector<Dims> dims(nbInputs);
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = in[i].desc.dims;
    }
    return nbOutputs == 1 && checkInputDims(dims.data(), nbInputs) ? 0 : -1;
}

int32_t Plugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || nbInputs < 1 || !activationType(mOp.inputs[0], inputTypes[0]))
    {
        bool const halfToo = mOp.inputs[0] == InputKind::kActivation;
        logMessage(Severity::kERROR, pluginLabel(mOp) + (halfToo ? ": x must be float32 or float16" : ": x must be float32"));
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t Plugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
    int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    auto const rank = static_cast<int32_t>(mOp.inputDims(mFields)[0].size());
    if (nbInputs != static_cast<int32_t>(mOp.inputs.size()) || nbOutputs != 1 || inputs[0].nbDims != rank)
    {
        logMessage(Severity::kERROR,
            pluginLabel(mOp) + ": x must have rank " + std::to_string(rank) + " ([N, C, ...]) and there is one output");
        return -1;
    }
    outputs[0] = inputs[0];
    outputs[0].d[1] = exprBuilder.constant(mFields.get(mOp.outputChannelsField));
    if (mOp.outputSpatialDims)
    {
        mOp.outputSpatialDims(mFields, exprBuilder, outputs[0]);
    }
    return 0;
}

bool Plugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != static_cast<int32_t>(mOp.inputs.size()) || nbOutputs != 1 || pos < 0 || pos > nbInputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == nbInputs) // the output follows x
    {
        return desc.type == inOut[0].desc.type;
    }
    switch (mOp.inputs[pos])
    {
    case InputKind::kActivation:
    case InputKind::kFloat32Activation: return activationType(mOp.inputs[pos], desc.type);
    case InputKind::kInt32: return desc.type == DataType::kINT32;
    case InputKind::kFloat32: return desc.type == DataType::kFLOAT;
    }
    return false;
}

int32_t Plugin::getNbOutputs() const noexcept
{
    return 1;
}

size_t Plugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    return nbInputs >= 1 ? mOp.workspaceSize(mFields, inputs[0].max) : 0;
}

char const* Plugin::getTimingCacheID() noexcept
{
    return mTimingCacheId.c_str();
}

int32_t Plugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    std::vector<Dims> dims(nbInputs);
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = in[i].dims;
    }
    return nbOutputs == 1 && checkInputDims(dims.data(), nbInputs) ? 0 : -1;
}

int32_t Plugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
    void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    size_t const workspaceBytes = mOp.workspaceSize(mFields, inputDesc[0].dims);
    int32_t const status = mOp.enqueue(mFields, inputDesc, inputs, outputs, workspace, workspaceBytes, stream);
    if (status != 0)
    {
        logMessage(Severity::kERROR, pluginLabel(mOp) + ": enqueue failed: " + bdm_status_string(status));
    }
    return status;
}

IPluginV3* Plugin::attachToContext(IPluginResourceContext*) noexcept
{
    return clone();
}

PluginFieldCollection const* Plugin::getFieldsToSerialize() noexcept
{
    mSerialFields.clear();
    for (size_t i = 0; i < mOp.fields.size(); ++i)
    {
        mSerialFields.emplace_back(mOp.fields[i].name, &mFields.values()[i], PluginFieldType::kINT32, 1);
    }
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
    return &mSerialCollection;
}

Creator::Creator(OpDescriptor const& op)
    : mOp(op)
{
    for (FieldSpec const& f : op.fields)
    {
        mFieldNames.emplace_back(f.name, nullptr, PluginFieldType::kINT32, 1);
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

IPluginV3* Creator::createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    try
    {
        std::vector<int32_t> values;
        std::string error = parseFields(mOp, fc, values);
        FieldValues fields(&mOp.fields, std::move(values));
        if (error.empty())
        {
            error = mOp.validate(fields);
        }
        if (!error.empty())
        {
            logMessage(Severity::kERROR, pluginLabel(mOp) + " (node " + (name ? name : "?") + "): " + error);
            return nullptr;
        }
        return new Plugin(mOp, std::move(fields));
    }
    catch (std::exception const& e)
    {
        logMessage(Severity::kERROR, pluginLabel(mOp) + ": createPlugin failed: " + e.what());
        return nullptr;
    }
}

PluginFieldCollection const* Creator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

AsciiChar const* Creator::getPluginName() const noexcept
{
    return mOp.name;
}

AsciiChar const* Creator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

AsciiChar const* Creator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

} // namespace trt
} // namespace bdm
