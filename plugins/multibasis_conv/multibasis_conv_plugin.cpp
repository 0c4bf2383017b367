#include "multibasis_conv_plugin.h"

#include "multibasis_conv_kernel.h"

using namespace nvinfer1;

namespace bdm
{
namespace trt
{
namespace
{

// x [N, C, *spatial] -> the kernel's shape: conv1d runs as height 1, width L; linear as 1 x 1.
bdm_multibasis_conv_shape makeShape(FieldValues const& f, Dims const& x)
{
    bdm_multibasis_conv_shape s{};
    s.spatial_dims = f.get("spatial_dims");
    s.batch = static_cast<int32_t>(x.d[0]);
    s.in_channels = f.get("in_channels");
    s.out_channels = f.get("out_channels");
    s.height = s.spatial_dims == 2 ? static_cast<int32_t>(x.d[2]) : 1;
    s.width = s.spatial_dims >= 1 ? static_cast<int32_t>(x.d[x.nbDims - 1]) : 1;
    s.kernel_size = f.get("kernel_size");
    s.stride = f.get("stride");
    s.padding = f.get("padding");
    s.num_bases = f.get("num_bases");
    s.act_bits = f.get("act_bits");
    return s;
}

size_t workspaceSize(FieldValues const& f, Dims const& x)
{
    if (x.nbDims != 2 + f.get("spatial_dims"))
    {
        return 0;
    }
    for (int32_t i = 0; i < x.nbDims; ++i)
    {
        if (x.d[i] < 0)
        {
            return 0;
        }
    }
    bdm_multibasis_conv_shape const shape = makeShape(f, x);
    return bdm_multibasis_conv_workspace_size(&shape);
}

int32_t enqueue(FieldValues const& f, PluginTensorDesc const* in, void const* const* inputs, void* const* outputs,
    void* workspace, size_t workspaceBytes, cudaStream_t stream)
{
    bdm_multibasis_conv_shape const shape = makeShape(f, in[0].dims);
    bdm_multibasis_conv_tensors ts{};
    ts.x = static_cast<float const*>(inputs[0]);
    ts.weight = static_cast<int32_t const*>(inputs[1]);
    ts.scale = static_cast<float const*>(inputs[2]);
    ts.bias = static_cast<float const*>(inputs[3]);
    ts.act_step = static_cast<float const*>(inputs[4]);
    ts.y = static_cast<float*>(outputs[0]);
    return bdm_multibasis_conv(&shape, &ts, algoFromEnvironment(), workspace, workspaceBytes, stream);
}

std::string crossFieldRules(FieldValues const& f)
{
    if (f.get("stride") == 2 && f.get("spatial_dims") != 2)
    {
        return "stride = 2 needs spatial_dims = 2";
    }
    if (f.get("spatial_dims") == 0 && (f.get("kernel_size") != 1 || f.get("padding") != 0))
    {
        return "spatial_dims = 0 (linear) needs kernel_size = 1 and padding = 0";
    }
    return {};
}

// x [N, in_channels, *spatial], weight [num_bases, out_channels, *taps, words], scale [num_bases, out_channels],
// bias [out_channels], act_step [1].
std::vector<std::vector<int64_t>> inputDims(FieldValues const& f)
{
    int32_t const spatial = f.get("spatial_dims");
    int64_t const bases = f.get("num_bases");
    int64_t const cout = f.get("out_channels");
    std::vector<int64_t> x{kAnyDim, f.get("in_channels")};
    x.insert(x.end(), spatial, kAnyDim);
    std::vector<int64_t> weight{bases, cout};
    weight.insert(weight.end(), spatial, f.get("kernel_size"));
    weight.push_back((f.get("in_channels") + 31) / 32);
    return {x, weight, {bases, cout}, {cout}, {1}};
}

// Every spatial axis: floor((L + 2*padding - kernel_size) / stride) + 1.
// A spatial axis shorter than the kernel (after padding) has no output position.
std::string checkInputShape(FieldValues const& f, Dims const& x)
{
    for (int32_t axis = 2; axis < x.nbDims; ++axis)
    {
        if (bdm_multibasis_conv_out_size(static_cast<int32_t>(x.d[axis]), f.get("kernel_size"), f.get("stride"),
                f.get("padding"))
            < 1)
        {
            return "spatial axis " + std::to_string(axis) + " is shorter than kernel_size " + std::to_string(f.get("kernel_size"))
                + " after padding " + std::to_string(f.get("padding")) + " on both sides: no output position";
        }
    }
    return {};
}

void outputSpatialDims(FieldValues const& f, IExprBuilder& b, DimsExprs& y)
{
    IDimensionExpr const* const span = b.constant(2 * int64_t{f.get("padding")} - f.get("kernel_size"));
    IDimensionExpr const* const stride = b.constant(f.get("stride"));
    IDimensionExpr const* const one = b.constant(1);
    for (int32_t i = 2; i < y.nbDims; ++i)
    {
        IDimensionExpr const* const padded = b.operation(DimensionOperation::kSUM, *y.d[i], *span);
        IDimensionExpr const* const steps = b.operation(DimensionOperation::kFLOOR_DIV, *padded, *stride);
        y.d[i] = b.operation(DimensionOperation::kSUM, *steps, *one);
    }
}

} // namespace

OpDescriptor const& multibasisConvDescriptor()
{
    static OpDescriptor const op{
        "MultiBasisConv",
        {InputKind::kFloat32Activation, InputKind::kInt32, InputKind::kFloat32, InputKind::kFloat32,
            InputKind::kFloat32},
        {{"in_channels", false, 0, {}}, {"out_channels", false, 0, {}, 1, BDM_MAX_OUT_CHANNELS}, {"num_bases", false, 0, {1, 2}},
            {"spatial_dims", false, 0, {0, 1, 2}}, {"kernel_size", true, 1, {}}, {"stride", true, 1, {1, 2}},
            {"padding", true, 0, {}, 0}, {"act_bits", true, 4, {0, 4, 8}}},
        "out_channels",
        crossFieldRules,
        inputDims,
        workspaceSize,
        enqueue,
        outputSpatialDims,
        checkInputShape,
    };
    return op;
}

} // namespace trt
} // namespace bdm
