#include "timestep_affine_plugin.h"

#include "timestep_affine_kernel.h"

using namespace nvinfer1;

namespace bdm
{
namespace trt
{
namespace
{

std::vector<FieldSpec> const kFields{
    {"channels", false, 0, {}}, {"num_groups", true, 5, {}}, {"total_steps", true, 2000, {}}};

// x [N, channels, H, W], t [N], then `tables` tables [num_groups, channels].
std::vector<std::vector<int64_t>> inputDims(FieldValues const& f, int tables)
{
    int64_t const c = f.get("channels");
    std::vector<std::vector<int64_t>> dims{{kAnyDim, c, kAnyDim, kAnyDim}, {kBatchDim}};
    dims.insert(dims.end(), tables, std::vector<int64_t>{f.get("num_groups"), c});
    return dims;
}

int32_t enqueueAffine(FieldValues const& f, PluginTensorDesc const* in, void const* const* inputs, void* const* outputs,
    cudaStream_t stream, bool rprelu)
{
    Dims const& x = in[0].dims;
    bdm_timestep_affine_shape s{};
    s.batch = static_cast<int32_t>(x.d[0]);
    s.channels = f.get("channels");
    s.spatial = 1;
    for (int32_t i = 2; i < x.nbDims; ++i)
    {
        s.spatial *= x.d[i];
    }
    s.num_groups = f.get("num_groups");
    s.total_steps = f.get("total_steps");
    bdm_timestep_affine_tensors ts{};
    ts.x = inputs[0];
    ts.t = static_cast<int32_t const*>(inputs[1]);
    ts.y = outputs[0];
    if (rprelu)
    {
        ts.bias0 = static_cast<float const*>(inputs[2]);
        ts.slope = static_cast<float const*>(inputs[3]);
        ts.bias1 = static_cast<float const*>(inputs[4]);
    }
    else
    {
        ts.table = static_cast<float const*>(inputs[2]);
    }
    return bdm_timestep_affine(&s, &ts, in[0].type == DataType::kHALF ? BDM_FLOAT16 : BDM_FLOAT32, stream);
}

std::string noCrossFieldRules(FieldValues const&)
{
    return {};
}

size_t noWorkspace(FieldValues const&, Dims const&)
{
    return 0;
}

} // namespace

OpDescriptor const& timestepBiasDescriptor()
{
    static OpDescriptor const op{
        "TimestepBias",
        {InputKind::kActivation, InputKind::kInt32, InputKind::kFloat32},
        kFields,
        "channels",
        noCrossFieldRules,
        [](FieldValues const& f) { return inputDims(f, 1); },
        noWorkspace,
        [](FieldValues const& f, PluginTensorDesc const* in, void const* const* inputs, void* const* outputs, void*,
            size_t, cudaStream_t stream) { return enqueueAffine(f, in, inputs, outputs, stream, false); },
    };
    return op;
}

OpDescriptor const& timestepRPReLUDescriptor()
{
    static OpDescriptor const op{
        "TimestepRPReLU",
        {InputKind::kActivation, InputKind::kInt32, InputKind::kFloat32, InputKind::kFloat32, InputKind::kFloat32},
        kFields,
        "channels",
        noCrossFieldRules,
        [](FieldValues const& f) { return inputDims(f, 3); },
        noWorkspace,
        [](FieldValues const& f, PluginTensorDesc const* in, void const* const* inputs, void* const* outputs, void*,
            size_t, cudaStream_t stream) { return enqueueAffine(f, in, inputs, outputs, stream, true); },
    };
    return op;
}

} // namespace trt
} // namespace bdm
