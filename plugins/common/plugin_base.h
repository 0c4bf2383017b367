// Shared TensorRT glue for every bdm op: one IPluginV3 class and one IPluginCreatorV3One class, both driven
// by a per-op OpDescriptor (inputs, integer fields, shape rules, enqueue). The op folders only describe
// their op and adapt their kernel launcher; field parsing, validation, serialization, format and shape
// negotiation live here once.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace bdm
{
namespace trt
{

// How an op input may be typed (plugins/*/spec.yaml `dtype`).
enum class InputKind
{
    kActivation,        // float32 or float16; the output follows its type
    kFloat32Activation, // float32 only (spec x dtype [float32]); the output is float32
    kInt32,
    kFloat32
};

// An integer attribute of the op (spec `attributes`). `allowed` empty means "any value from minimum to maximum".
struct FieldSpec
{
    char const* name;
    bool hasDefault;
    int32_t defaultValue;
    std::vector<int32_t> allowed;
    int32_t minimum = 1;
    int32_t maximum = INT32_MAX;
};

// The op's attribute values, in FieldSpec order.
class FieldValues
{
public:
    FieldValues(std::vector<FieldSpec> const* specs, std::vector<int32_t> values)
        : mSpecs(specs)
        , mValues(std::move(values))
    {
    }

    int32_t get(char const* name) const; // aborts on a name the op does not have: a programming error
    std::vector<int32_t> const& values() const
    {
        return mValues;
    }

private:
    std::vector<FieldSpec> const* mSpecs;
    std::vector<int32_t> mValues;
};

// Expected input dims: a concrete size, kAnyDim, or kBatchDim (must equal x's dim 0).
constexpr int64_t kAnyDim = -1;
constexpr int64_t kBatchDim = -2;

struct OpDescriptor
{
    char const* name; // plugin name == ONNX op_type
    std::vector<InputKind> inputs;
    std::vector<FieldSpec> fields;
    char const* outputChannelsField; // y = x's dims with dim 1 replaced by this field (spatial dims: see below)
    // Rules across fields (e.g. residual needs in_channels == out_channels): an error text, or empty.
    std::string (*validate)(FieldValues const& f);
    // Expected dims of every input (x included); checked in configurePlugin where TensorRT knows them.
    std::vector<std::vector<int64_t>> (*inputDims)(FieldValues const& f);
    // Device workspace for input dims `x` (0 when the op needs none).
    size_t (*workspaceSize)(FieldValues const& f, nvinfer1::Dims const& x);
    // Launch on `stream`; 0 on success (capture safe: no allocation, no synchronisation, no host reads).
    int32_t (*enqueue)(FieldValues const& f, nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, size_t workspaceBytes, cudaStream_t stream);
    // Optional: rewrites y's dims 2.. in place (y starts as x's dims with the output channels set); nullptr keeps
    // x's spatial dims. Called only when x has the rank inputDims expects.
    void (*outputSpatialDims)(FieldValues const& f, nvinfer1::IExprBuilder& exprBuilder, nvinfer1::DimsExprs& y)
        = nullptr;
    // Optional: an error text when x's known dims (rank already checked) give no valid output, else empty.
    std::string (*checkInputShape)(FieldValues const& f, nvinfer1::Dims const& x) = nullptr;
};

constexpr char const* kPluginNamespace = "bdm"; // plugins/common.yaml plugin_namespace
constexpr char const* kPluginVersion = "1";     // plugins/common.yaml plugin_version

// Log through the logger TensorRT handed us (setLoggerFinder); warnings and errors go to stderr before that.
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message);

class Plugin final : public nvinfer1::IPluginV3,
                     public nvinfer1::IPluginV3OneCore,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime
{
public:
    Plugin(OpDescriptor const& op, FieldValues fields);

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    nvinfer1::AsciiChar const* getPluginName() const noexcept override;
    nvinfer1::AsciiChar const* getPluginVersion() const noexcept override;
    nvinfer1::AsciiChar const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    bool checkInputDims(nvinfer1::Dims const* dims, int32_t nbInputs) const;

    OpDescriptor const& mOp;
    FieldValues mFields;
    std::string mTimingCacheId;
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection{};
};

class Creator final : public nvinfer1::IPluginCreatorV3One
{
public:
    explicit Creator(OpDescriptor const& op);

    nvinfer1::IPluginV3* createPlugin(nvinfer1::AsciiChar const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::AsciiChar const* getPluginName() const noexcept override;
    nvinfer1::AsciiChar const* getPluginVersion() const noexcept override;
    nvinfer1::AsciiChar const* getPluginNamespace() const noexcept override;

private:
    OpDescriptor const& mOp;
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

// BDM_BINARY_CONV_ALGO = auto | simple | tensor_core: the kernel (a bdm_conv_algo value) of the binary conv
// ops and MultiBasisConv, read once per process. Every choice is exact, so it is a switch for testing and
// benchmarking, not an attribute of the model; anything else warns and gives auto.
int algoFromEnvironment();

// Dims -> "[2, 40, 9, 7]" for messages.
std::string formatDims(nvinfer1::Dims const& d);

} // namespace trt
} // namespace bdm
