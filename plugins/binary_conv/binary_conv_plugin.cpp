#include "binary_conv_plugin.h"

#include "binary_conv_kernel.h"

using namespace nvinfer1;

namespace bdm
{
namespace trt
{
namespace
{

int32_t words(FieldValues const& f)
{
    return (f.get("in_channels") + 31) / 32;
}

bdm_binary_conv_shape makeShape(FieldValues const& f, Dims const& x, bool fused)
{
    bdm_binary_conv_shape s{};
    s.batch = static_cast<int32_t>(x.d[0]);
    s.in_channels = f.get("in_channels");
    s.out_channels = f.get("out_channels");
    s.height = static_cast<int32_t>(x.d[2]);
    s.width = static_cast<int32_t>(x.d[3]);
    s.kernel_size = f.get("kernel_size");
    s.pad_value = f.get("pad_value");
    s.num_groups = fused ? f.get("num_groups") : 1;
    s.total_steps = fused ? f.get("total_steps") : 1;
    s.residual = fused ? f.get("residual") : 0;
    return s;
}

size_t workspaceSize(FieldValues const& f, Dims const& x, bool fused)
{
    if (x.nbDims != 4 || x.d[0] < 0 || x.d[2] < 0 || x.d[3] < 0)
    {
        return 0;
    }
    bdm_binary_conv_shape const shape = makeShape(f, x, fused);
    return bdm_binary_conv_workspace_size(&shape);
}

int dtypeOf(DataType t)
{
    return t == DataType::kHALF ? BDM_FLOAT16 : BDM_FLOAT32;
}

int32_t enqueueConv(FieldValues const& f, PluginTensorDesc const* in, void const* const* inputs, void* const* outputs,
    void* workspace, size_t workspaceBytes, cudaStream_t stream, bool fused)
{
    bdm_binary_conv_shape const shape = makeShape(f, in[0].dims, fused);
    bdm_binary_conv_tensors ts{};
    ts.x = inputs[0];
    ts.y = outputs[0];
    if (fused) // x, t, weight, alpha, threshold, bias0, slope, bias1
    {
        ts.t = static_cast<int32_t const*>(inputs[1]);
        ts.weight = static_cast<int32_t const*>(inputs[2]);
        ts.alpha = static_cast<float const*>(inputs[3]);
        ts.threshold = static_cast<float const*>(inputs[4]);
        ts.bias0 = static_cast<float const*>(inputs[5]);
        ts.slope = static_cast<float const*>(inputs[6]);
        ts.bias1 = static_cast<float const*>(inputs[7]);
    }
    else // x, weight, alpha
    {
        ts.weight = static_cast<int32_t const*>(inputs[1]);
        ts.alpha = static_cast<float const*>(inputs[2]);
    }
    return bdm_binary_conv2d(&shape, &ts, dtypeOf(in[0].type), algoFromEnvironment(), workspace, workspaceBytes, stream);
}

std::vector<int64_t> weightDims(FieldValues const& f)
{
    int64_t const k = f.get("kernel_size");
    return {f.get("out_channels"), k, k, words(f)};
}

FieldSpec const kInChannels{"in_channels", false, 0, {}};
FieldSpec const kOutChannels{"out_channels", false, 0, {}, 1, BDM_MAX_OUT_CHANNELS};
FieldSpec const kKernelSize{"kernel_size", false, 0, {1, 3}};
FieldSpec const kPadValue{"pad_value", true, 0, {-1, 0, 1}};

} // namespace

OpDescriptor const& binaryConv2dDescriptor()
{
    static OpDescriptor const op{
        "BinaryConv2d",
        {InputKind::kActivation, InputKind::kInt32, InputKind::kInt32, InputKind::kFloat32, InputKind::kFloat32,
            InputKind::kFloat32, InputKind::kFloat32, InputKind::kFloat32},
        {kInChannels, kOutChannels, kKernelSize, {"num_groups", true, 5, {}}, {"total_steps", true, 2000, {}},
            kPadValue, {"residual", true, 1, {0, 1}}},
        "out_channels",
        [](FieldValues const& f) -> std::string {
            if (f.get("residual") == 1 && f.get("in_channels") != f.get("out_channels"))
            {
                return "residual = 1 needs in_channels == out_channels";
            }
            return {};
        },
        [](FieldValues const& f) -> std::vector<std::vector<int64_t>> {
            int64_t const groups = f.get("num_groups");
            int64_t const cout = f.get("out_channels");
            return {{kAnyDim, f.get("in_channels"), kAnyDim, kAnyDim}, {kBatchDim}, weightDims(f), {cout},
                {groups, f.get("in_channels")}, {groups, cout}, {groups, cout}, {groups, cout}};
        },
        [](FieldValues const& f, Dims const& x) { return workspaceSize(f, x, true); },
        [](FieldValues const& f, PluginTensorDesc const* in, void const* const* inputs, void* const* outputs,
            void* workspace, size_t bytes, cudaStream_t stream) {
            return enqueueConv(f, in, inputs, outputs, workspace, bytes, stream, true);
        },
    };
    return op;
}

OpDescriptor const& binarySignConv2dDescriptor()
{
    static OpDescriptor const op{
        "BinarySignConv2d",
        {InputKind::kActivation, InputKind::kInt32, InputKind::kFloat32},
        {kInChannels, kOutChannels, kKernelSize, kPadValue},
        "out_channels",
        [](FieldValues const&) { return std::string(); },
        [](FieldValues const& f) -> std::vector<std::vector<int64_t>> {
            return {{kAnyDim, f.get("in_channels"), kAnyDim, kAnyDim}, weightDims(f), {f.get("out_channels")}};
        },
        [](FieldValues const& f, Dims const& x) { return workspaceSize(f, x, false); },
        [](FieldValues const& f, PluginTensorDesc const* in, void const* const* inputs, void* const* outputs,
            void* workspace, size_t bytes, cudaStream_t stream) {
            return enqueueConv(f, in, inputs, outputs, workspace, bytes, stream, false);
        },
    };
    return op;
}

} // namespace trt
} // namespace bdm
