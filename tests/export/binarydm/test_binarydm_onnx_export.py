"""BinaryDM through `bdm export`'s machinery (bdm.export.binarydm.onnx_export): every layer, attention and block golden
exported alone in every mode and run in ONNX Runtime against the official outputs (bound 1e-5 * max|y|, and the
quantized operands bit for bit), and the golden UNet exported whole: ONNX Runtime against the PyTorch model in w1a32
and fp (and fp against the official y_fp), static/dynamic through the teacher-forced validation, packed weights only,
dynamic N/H/W, the exact-zero weight refused with its location or resolved on request."""

import re
import warnings

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
from onnx import helper

import bdm
from bdm.errors import BdmError
from bdm.export.base.onnx_graph import check_no_binarized_weights, write_validated
from bdm.export.base.sign_zeros import resolve_sign_zeros
from bdm.export.binarydm import onnx_export as binarydm_onnx, validate as binarydm_validate
from bdm.export.binarydm.network import sign_sources
from bdm.export.binarydm.network import binarized_layers
from bdm.export.binarydm.layers import set_mode
from bdm.runtime.kernel_runner import CpuKernelRunner

from binarydm_goldens import ATTENTION_CASE, BLOCK_CASES, LAYER_CASES, assert_within_bound, build_case  # tests/export

UNET = "unet_cifar_like_w32"
MODES_OF = {**{c: ("static", "dynamic", "w1a32", "fp") for c in LAYER_CASES + BLOCK_CASES},
            ATTENTION_CASE: ("static", "dynamic", "fp")}


def run(model: onnx.ModelProto, feed, outputs=None):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {k: np.asarray(v) for k, v in feed.items()})


def expose_quantized_inputs(model: onnx.ModelProto) -> (onnx.ModelProto, list):
    """The model with its quantizers' DequantizeLinear outputs (x_q) as graph outputs, in execution order: the
    functions inlined and each quantizing If (act_bits > 0) replaced by its then-branch."""
    flat = onnx.inliner.inline_local_functions(model)
    nodes = []
    for node in flat.graph.node:
        branch = next((a.g for a in node.attribute if a.name == "then_branch"), None)
        if node.op_type == "If" and branch is not None and branch.name == "quantized":
            nodes += list(branch.node) + [helper.make_node("Identity", [branch.output[0].name], [node.output[0]])]
        else:
            nodes.append(node)
    del flat.graph.node[:]
    flat.graph.node.extend(nodes)
    names = [n.output[0] for n in nodes if n.op_type == "DequantizeLinear"]
    flat.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return flat, names


@pytest.mark.parametrize("case", LAYER_CASES + BLOCK_CASES + [ATTENTION_CASE])
def test_each_golden_case_exported_alone(bdm_ref, case):
    module, inputs, arrays = build_case(bdm_ref, case)
    names = ["x", "emb"][:len(inputs)]
    for mode in MODES_OF[case]:
        exported = binarydm_onnx.layer_to_onnx(module, mode, inputs, names)
        (y,) = run(exported, dict(zip(names, inputs)), ["y"])
        rel = assert_within_bound(torch.from_numpy(y), arrays[f"y_{mode}"], f"{case} {mode}")
        print(f"[{case} {mode}] ONNX Runtime vs official: rel {rel:.1e}"
              + (" (bit-exact)" if np.array_equal(y, arrays[f"y_{mode}"].numpy()) else ""))
        custom = [n.op_type for n in exported.graph.node if n.domain == "bdm"]
        assert custom == [] if mode == "fp" or case == ATTENTION_CASE else set(custom) == {"MultiBasisConv"}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_exported_layer_quantizes_its_input_bit_for_bit(bdm_ref, case):
    module, (x,), arrays = build_case(bdm_ref, case)
    flat, names = expose_quantized_inputs(binarydm_onnx.layer_to_onnx(module, "static", (x,), ["x"]))
    assert len(names) == 1
    (x_q,) = run(flat, {"x": x}, names)  # inside the body: [N, C, H, W], conv1d [N, C, 1, L], linear [N, C, 1, 1]
    assert np.array_equal(x_q.reshape(x.shape), arrays["static_xq"].numpy())


def test_exported_attention_quantizes_its_operands_bit_for_bit(bdm_ref):
    module, (qkv,), arrays = build_case(bdm_ref, ATTENTION_CASE)
    exported = binarydm_onnx.layer_to_onnx(module, "static", (qkv,), ["x"])
    flat, names = expose_quantized_inputs(exported)
    operands = run(flat, {"x": qkv}, names)
    assert [o.shape for o in operands] == [arrays[f"static_{tag}_q"].shape for tag in "qkwv"]
    for tag, x_q in zip("qkwv", operands):
        assert np.array_equal(x_q, arrays[f"static_{tag}_q"].numpy()), tag
    used = {n.op_type for n in exported.graph.node}
    assert {"Clip", "QuantizeLinear", "DequantizeLinear", "Softmax"} <= used and not {n.domain for n in
                                                                                     exported.graph.node} - {""}


# --- the whole UNet ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet(bdm_ref):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bdm.load_model(bdm_ref / f"{UNET}.pt", config=bdm_ref / f"{UNET}.json")
    return model


@pytest.fixture(scope="module")
def resolved_unet(bdm_ref):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bdm.load_model(bdm_ref / f"{UNET}.pt", config=bdm_ref / f"{UNET}.json")
    assert resolve_sign_zeros(sign_sources, model, +1, "golden") == 1
    return model


@pytest.fixture(scope="module")
def unet_arrays(bdm_ref):
    data = np.load(bdm_ref / f"{UNET}.npz")
    return {k: data[k] for k in data.files}


def test_exact_zero_weight_is_refused_with_its_location(unet):
    with pytest.raises(BdmError, match=r"output_blocks\.2\.1\.conv\.weight at \[o, c, \.\.\.\] = \[19, 19, 2, 1\], "
                                       r"basis 1\); pass --zero-weight-sign"):
        binarydm_onnx.to_onnx(unet, "static")


def test_zero_resolution_moves_only_that_weight(unet, resolved_unet):
    diff = [(p, (a != b).nonzero().tolist()) for (p, a), b in zip(unet.state_dict().items(),
                                                                   resolved_unet.state_dict().values())
            if not torch.equal(a, b)]
    assert diff == [("output_blocks.2.1.conv.weight", [[19, 19, 2, 1]])]
    moved = resolved_unet.output_blocks[2][1].conv.weight.detach()[19, 19, 2, 1]
    assert float(moved) == torch.finfo(torch.float32).tiny


@pytest.fixture(scope="module")
def unet_exports(resolved_unet):
    return {mode: binarydm_onnx.to_onnx(resolved_unet, mode) for mode in ("static", "dynamic", "w1a32", "fp")}


def pytorch_eps(model, mode, x, t):
    set_mode(model, mode)
    try:
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    finally:
        set_mode(model, "static")


@pytest.mark.parametrize("mode", ["w1a32", "fp"])
def test_unet_matches_pytorch_in_the_well_conditioned_modes(resolved_unet, unet_exports, unet_arrays, mode):
    for x, t, official in zip(unet_arrays["x"], unet_arrays["timesteps"], unet_arrays[f"y_{mode}"]):
        (eps,) = run(unet_exports[mode], {"x_t": x, "t": t}, ["eps"])
        reference = pytorch_eps(resolved_unet, mode, x, t)
        rel = np.abs(eps - reference).max() / np.abs(reference).max()
        rel_official = np.abs(eps - official).max() / np.abs(official).max()
        print(f"[{UNET} {mode} t={t[0]}] ONNX Runtime vs PyTorch rel {rel:.1e}; vs official y_{mode} "
              f"{rel_official:.1e}")
        assert rel <= 1e-5
        if mode == "fp":  # the zero resolution only moves binarized signs; fp uses the latent weights
            assert rel_official <= 1e-5


def test_unet_graph_is_dynamic_in_batch_and_size(resolved_unet, unet_exports):
    rng = np.random.default_rng(1)
    for n, side in [(1, 16), (3, 24)]:
        x = rng.standard_normal((n, 3, side, side)).astype(np.float32)
        t = np.full(n, 321, np.int64)
        (eps,) = run(unet_exports["w1a32"], {"x_t": x, "t": t}, ["eps"])
        reference = pytorch_eps(resolved_unet, "w1a32", x, t)
        assert eps.shape == (n, 3, side, side)
        assert np.abs(eps - reference).max() <= 1e-5 * np.abs(reference).max()


def test_unet_static_export_holds_packed_weights_and_records_its_mode(resolved_unet, unet_exports):
    exported = unet_exports["static"]
    meta = {p.key: p.value for p in exported.metadata_props}
    assert meta["bdm.act_mode"] == "static" and meta["bdm.family"] == "binarydm"
    assert [i.name for i in exported.graph.input] == ["x_t", "t"] and [o.name for o in exported.graph.output] == ["eps"]
    assert {p.key: p.value for p in unet_exports["dynamic"].metadata_props}["bdm.act_mode"] == "dynamic"
    nodes = [n for n in exported.graph.node if n.op_type == "MultiBasisConv"]
    layers = {p: layer for p, layer in binarized_layers(resolved_unet) if layer.binarized}
    assert len(nodes) == len(layers) == int(meta["bdm.binarized_layers"])
    initializers = {i.name: i for i in exported.graph.initializer}
    packed_words = 0
    for node in nodes:
        weight = initializers[node.input[1]]
        layer = layers[node.input[1].rsplit(".packed.", 1)[0]]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert weight.data_type == onnx.TensorProto.INT32
        assert attributes["num_bases"] == layer.order and attributes["act_bits"] == 4
        assert list(weight.dims)[:2] == [layer.order, layer.out_channels]
        assert node.input[4] in initializers  # the stored step
        packed_words += int(np.prod(weight.dims))
    latent = sum(layer.weight.numel() for layer in layers.values())
    assert not any(any(i.name.endswith(f"{p}.weight") for p in layers) for i in exported.graph.initializer)
    size = len(exported.SerializeToString())
    latent_fp32 = 4 * sum(p.numel() for p in resolved_unet.parameters())
    print(f"[{UNET} static] {len(nodes)} MultiBasisConv nodes, {latent:,} binarized weights in {4 * packed_words:,} "
          f"packed bytes; file {size:,} B vs latent fp32 {latent_fp32:,} B: ratio {latent_fp32 / size:.2f}x")
    assert size < latent_fp32 / 3


def test_export_refuses_a_network_traced_without_packing(resolved_unet, monkeypatch):
    monkeypatch.setattr(binarydm_onnx, "_swap", lambda mode: lambda path, module: None)  # latent layers traced
    with pytest.raises(BdmError, match=r"holds the full-precision weight of the binarized layer "
                                       r"input_blocks\.1\.0\.in_layers\.2$"):
        binarydm_onnx.to_onnx(resolved_unet, "w1a32")


@pytest.mark.parametrize("form", ["W", "B1", "B2", "B2 int8", "W_hat"])
def test_latent_weight_check_finds_each_form_of_a_binarized_weight(resolved_unet, unet_exports, form):
    """The latent W, either sign basis or W_hat of an order-2 layer, stored anywhere in the file, fails the check."""
    path, layer = next((p, l) for p, l in binarized_layers(resolved_unet) if l.binarized and l.order == 2)
    with torch.no_grad():
        planes = layer.sign_planes()
        value = {"W": layer.weight, "B1": planes[0], "B2": planes[1], "B2 int8": planes[1].to(torch.int8),
                 "W_hat": layer.binarized_weight()}[form]
    leaky = onnx.ModelProto()
    leaky.CopyFrom(unet_exports["static"])
    leaky.graph.initializer.append(onnx.numpy_helper.from_array(value.detach().numpy(), "leak"))
    with pytest.raises(BdmError, match=rf"leak .* binarized layer {re.escape(path)}$"):
        check_no_binarized_weights(leaky, binarydm_onnx._binarized_weights(resolved_unet), "binarized layer")


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_unet_chaotic_modes_pass_the_validation(resolved_unet, unet_exports, mode, tmp_path, cpu_kernels):
    """t = 999 parts at a code flip in dynamic mode (measured): the forced-codes run must then meet the bound."""
    path = tmp_path / f"{mode}.onnx"
    path.write_bytes(unet_exports[mode].SerializeToString())
    lines = []
    report = binarydm_validate.compare(path, resolved_unet, mode, timesteps=(999,), log=lines.append,
                                       kernels_runner=CpuKernelRunner(path, kernels=cpu_kernels))
    print("\n".join(f"[{UNET} {mode} validation] {line}" for line in lines))
    assert [c.runner for c in report.cases] == ["onnxruntime", "cpu-kernels"]
    assert report.passed and all(c.layers == 96 and c.worst_layer[1] <= 1e-5 for c in report.cases)
    for case in report.cases:
        assert case.rel <= 1e-5 or (case.forced_rel <= 1e-5 and case.flips.codes >= 1)
    assert resolved_unet.input_blocks[1][0].in_layers[2].mode == "static"  # the model's modes are restored


def group_norm_scale(model: onnx.ModelProto, scope: str) -> str:
    """The initializer a GroupNorm's affine scale became (the Mul after InstanceNormalization)."""
    return next(n for n in model.graph.node if n.name == f"{scope}/Mul").input[1]


def corrupted(model: onnx.ModelProto, name: str, change) -> onnx.ModelProto:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    tensor = next(i for i in broken.graph.initializer if i.name == name)
    tensor.CopyFrom(onnx.numpy_helper.from_array(change(onnx.numpy_helper.to_array(tensor).copy()), name))
    return broken


def invert_first_channel(packed):
    """One output channel's packed signs inverted (both bases): that layer computes something else."""
    packed[:, 0] = ~packed[:, 0]
    return packed


@pytest.mark.parametrize("where", ["layer", "glue"])
def test_validation_catches_a_wrong_export(resolved_unet, unet_exports, tmp_path, where, cpu_kernels):
    exported = unet_exports["static"]
    if where == "layer":
        broken = corrupted(exported, "output_blocks.3.0.in_layers.2.packed.weight", invert_first_channel)
    else:  # the output GroupNorm's scale off by 1e-3 (FP glue; one feeding a 4-bit quantizer may change no code)
        broken = corrupted(exported, group_norm_scale(exported, "/out/out.0"), lambda w: w * np.float32(1.001))
    reports = []

    def compare(path):
        reports.append(binarydm_validate.compare(path, resolved_unet, "static", timesteps=(500,),
                                                 log=lambda line: None,
                                                 kernels_runner=CpuKernelRunner(path, kernels=cpu_kernels)))
        return reports[-1]

    with pytest.raises(BdmError, match=r"beyond 1e-05 \(lines above\); no file written"):
        write_validated(broken, tmp_path / "broken.onnx", compare)  # as `bdm export` writes its file
    assert list(tmp_path.iterdir()) == []
    assert not reports[0].passed and [c.runner for c in reports[0].cases] == ["onnxruntime", "cpu-kernels"]
    for case in reports[0].cases:
        assert case.rel > 1e-5 and not case.passed
        if where == "layer":
            assert case.worst_layer[0] == "output_blocks.3.0.in_layers.2" and case.worst_layer[1] > 1e-3
        else:
            assert case.worst_layer[1] <= 1e-5 and case.forced_rel > 1e-5


def test_report_with_an_engine_case_that_misses_the_bound():
    """An engine case has no forced-codes diagnosis: the report fails and its summary names the worst error (the
    chaotic-mode details cover ONNX Runtime's diagnosed cases only)."""
    ort = binarydm_validate.CaseResult("onnxruntime", 999, 2e-7, True, layers=3, worst_layer=("out.2", 1e-7))
    engine = binarydm_validate.CaseResult("tensorrt", 999, 3e-2, False, note="no per-layer values from an engine")
    report = binarydm_validate.ValidationReport(tolerance=1e-5, cases=[ort, engine], mode="static")
    assert not report.passed
    assert report.summary() == "worst error 3.0e-02 * max|eps| (bound 1e-05) over 2 cases"
    assert engine.line(1e-5).startswith("   tensorrt t=999") and engine.line(1e-5).endswith("FAIL")
