"""`bdm export` of the reduced reference checkpoint: the graph contract (inputs, dynamic dims, bdm nodes and their
attributes, packed weights, no latent weight, functions, checker), and ONNX Runtime against PyTorch and against
the official outputs at every net_golden timestep (fp32: <= 1e-5 * max|y|; fp16: the error reported, <= 1e-2
with the same signs)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import bdm
from bdm.contract import ModelMetadata
from bdm.export import inspect, registry
from bdm.export.base.family import ExportOptions
from bdm.export.base.sign_zeros import resolve_sign_zeros
from bdm.export.bidiffsr import network as bidiffsr, onnx_export, validate
from bdm.export.bidiffsr.config import checkpoint_name_scale, recorded_scale
from bdm.plugins import packing, spec

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def small_model(bi_ref):
    return bdm.load_model(bi_ref / "ckpt_small_x4.pth", config=bi_ref / "ckpt_small_x4.yml")


@pytest.fixture(scope="module")
def exported(small_model, tmp_path_factory):
    """dtype/form -> (path, ModelProto) of the reduced checkpoint's exports."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, kwargs in {"fp32": {}, "fp16": {"dtype": "fp16"}, "unfused": {"fused": False}}.items():
        model = onnx_export.to_onnx(small_model, **kwargs)
        path = folder / f"{name}.onnx"
        path.write_bytes(model.SerializeToString())
        out[name] = (path, model)
    return out


def metadata(model: onnx.ModelProto) -> ModelMetadata:
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def golden_feed(g, i, dtype=np.float32):
    return {"x_t": g["x"].astype(dtype), "cond": g["c"].astype(dtype),
            "t": np.full(g["x"].shape[0], g["timesteps"][i], np.int64)}


def test_graph_inputs_outputs_and_dynamic_dims(exported):
    for name, (_, model) in exported.items():
        graph = model.graph
        float_type = onnx.TensorProto.FLOAT16 if name == "fp16" else onnx.TensorProto.FLOAT
        inputs = {i.name: i.type.tensor_type for i in graph.input}
        assert list(inputs) == ["x_t", "cond", "t"]
        assert [o.name for o in graph.output] == ["eps"]
        for tensor_type in (inputs["x_t"], inputs["cond"], graph.output[0].type.tensor_type):
            assert tensor_type.elem_type == float_type
            dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
            assert dims == ["N", 3, "H", "W"]
        assert inputs["t"].elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in inputs["t"].shape.dim] == ["N"]
        onnx.checker.check_model(model, full_check=True)
        opsets = {o.domain: o.version for o in model.opset_import}
        assert opsets[""] == onnx_export.DEFAULT_OPSET and opsets["bdm"] == 1


def test_bdm_nodes_carry_the_spec_attributes_and_packed_checkpoint_weights(exported, small_model):
    _, model = exported["fp32"]
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.domain == "bdm"]
    biconvs = bidiffsr.biconvs(small_model)
    assert len(nodes) == len(biconvs) == 56
    assert [f.name for f in model.functions] == ["BinaryConv2d"]
    for node, (path, module) in zip(nodes, biconvs):
        assert node.op_type == "BinaryConv2d" and validate.module_path(node.name) == path
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes.pop("plugin_namespace") == b"bdm" and attributes.pop("plugin_version") == b"1"
        assert all(a.type == onnx.AttributeProto.INT for a in node.attribute if not a.name.startswith("plugin_"))
        assert attributes == dict(in_channels=module.in_channels, out_channels=module.out_channels,
                                  kernel_size=module.kernel_size, num_groups=5, total_steps=2000, pad_value=0,
                                  residual=1)
        inputs = dict(zip(spec.input_names("BinaryConv2d"), node.input))
        weight = initializers[inputs["weight"]]
        assert weight.dtype == np.int32
        np.testing.assert_array_equal(weight, packing.pack_signs(module.binary_conv.weight.detach().numpy()))
        np.testing.assert_array_equal(initializers[inputs["alpha"]], module.alpha().numpy())
        for table, value in module.group_tables().items():
            assert initializers[inputs[table]].dtype == np.float32
            np.testing.assert_array_equal(initializers[inputs[table]], value.numpy())


def test_no_latent_binary_weight_and_one_int32_cast_of_t(exported, small_model):
    for name, (_, model) in exported.items():
        names = [i.name for i in model.graph.initializer]
        assert not [n for n in names if "binary_conv" in n or "TaR" in n or "TaA" in n], name
        stored = [onnx.numpy_helper.to_array(i).astype(np.float32) for i in model.graph.initializer
                  if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        for path, module in bidiffsr.biconvs(small_model):
            weight = module.binary_conv.weight.detach().numpy()
            for form in (weight, np.sign(weight), weight.astype(np.float16).astype(np.float32)):
                assert not any(a.shape == form.shape and np.array_equal(a, form) for a in stored), (name, path)
        int32_casts = [n for n in model.graph.node if n.op_type == "Cast"
                       and onnx.helper.get_attribute_value(n.attribute[0]) == onnx.TensorProto.INT32]
        assert len(int32_casts) == 1, name  # t, once, for every bdm node
        assert all(int32_casts[0].output[0] == n.input[1] for n in model.graph.node
                   if n.op_type in ("BinaryConv2d", "TimestepBias", "TimestepRPReLU"))


def test_standard_ops_are_the_deployable_ones(exported):
    ops = inspect.census(exported["fp32"][1])
    assert not {"Einsum", "SpaceToDepth", "GroupNormalization", "PRelu", "Sign", "Less"} & set(ops)
    assert ops["InstanceNormalization"] == 46 and ops["MatMul"] == 2 and ops["DepthToSpace"] == 3
    unfused = inspect.census(exported["unfused"][1])
    assert unfused["bdm::TimestepBias"] == unfused["bdm::BinarySignConv2d"] == unfused["bdm::TimestepRPReLU"] == 56
    assert "bdm::BinaryConv2d" not in unfused


def test_onnx_runtime_matches_pytorch_and_the_official_outputs_at_every_golden_timestep(
        exported, small_model, bi_ref, capsys):
    g = np.load(bi_ref / "net_golden.npz")
    sessions = {name: session(exported[name][0]) for name in ("fp32", "unfused")}
    rows = []
    for i, t in enumerate(g["timesteps"]):
        feed = golden_feed(g, i)
        with torch.no_grad():
            y_torch = small_model(*(torch.from_numpy(feed[n]) for n in ("x_t", "cond", "t"))).numpy()
        (y_ort,) = sessions["fp32"].run(None, feed)
        (y_unfused,) = sessions["unfused"].run(None, feed)
        rows.append((int(t), validate.relative_error(y_torch, y_ort), validate.relative_error(g["y"][i], y_ort),
                     validate.relative_error(y_ort, y_unfused)))
    feed = {"x_t": g["x"], "cond": g["c"], "t": g["mixed_t"].reshape(-1)}
    (y_mixed,) = sessions["fp32"].run(None, feed)
    mixed = validate.relative_error(g["y_mixed_t"], y_mixed)
    with capsys.disabled():
        print("\n[net_golden fp32] t: rel err ORT vs PyTorch / ORT vs official / unfused vs fused")
        for t, vs_torch, vs_official, unfused in rows:
            print(f"  t={t:<5} {vs_torch:.2e} / {vs_official:.2e} / {unfused:.1e}")
        print(f"  mixed t {g['mixed_t'].reshape(-1).tolist()}: ORT vs official {mixed:.2e}")
    assert max(r[1] for r in rows) <= REL_TOL and max(r[2] for r in rows) <= REL_TOL and mixed <= REL_TOL
    assert max(r[3] for r in rows) == 0.0  # the unfused form computes the same float32 operations


def test_fp16_export_error_at_every_golden_timestep(exported, small_model, bi_ref, capsys):
    path, model = exported["fp16"]
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "BinaryConv2d")
    threshold = initializers[node.input[4]]
    assert threshold.dtype == np.float32  # float32 by the spec, holding the fp16 network's values
    np.testing.assert_array_equal(threshold, threshold.astype(np.float16).astype(np.float32))
    fp_weights = {i.dtype for n, i in initializers.items() if "packed" not in n and i.dtype.kind == "f"}
    assert fp_weights == {np.dtype(np.float16)}
    g = np.load(bi_ref / "net_golden.npz")
    feeds = [golden_feed(g, i) for i in range(len(g["timesteps"]))]
    report = validate.compare(path, small_model, feeds=feeds, log=lambda line: None, polygraphy_stats=False)
    with capsys.disabled():
        print("\n[net_golden fp16] ORT fp16 vs PyTorch fp32 (max rel err; sign flips; with the same signs)")
        for case in report.cases:
            print(f"  t={case.t0:<5} {case.rel:.2e}; flips in {len(case.flips)} layers "
                  f"(first: {case.flips[0] if case.flips else '-'}); same signs {case.forced_rel:.2e}")
    assert report.passed and report.worst() <= 1e-2


def test_dynamic_batch_and_size(exported, small_model):
    sess = session(exported["fp32"][0])
    rng = np.random.default_rng(3)
    feed = {"x_t": rng.standard_normal((3, 3, 16, 40)).astype(np.float32),
            "cond": rng.random((3, 3, 16, 40)).astype(np.float32), "t": np.array([1234, 5, 1999])}
    (y,) = sess.run(None, feed)
    with torch.no_grad():
        y_torch = small_model(*(torch.from_numpy(feed[n]) for n in ("x_t", "cond", "t"))).numpy()
    assert y.shape == (3, 3, 16, 40) and validate.relative_error(y_torch, y) <= REL_TOL


@pytest.mark.parametrize("opset", [18, 21])
def test_newer_opsets_export_the_same_model(small_model, bi_ref, opset):
    model = onnx_export.to_onnx(small_model, opset=opset)
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    assert all(f.opset_import[0].version == opset for f in model.functions)
    g = np.load(bi_ref / "net_golden.npz")
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, golden_feed(g, 0))
    assert validate.relative_error(g["y"][0], y) <= REL_TOL


def test_exact_zero_weights_are_refused_with_their_location_or_resolved(bi_ref):
    model = bdm.load_model(bi_ref / "ckpt_small_x4.pth", config=bi_ref / "ckpt_small_x4.yml")
    weight = dict(bidiffsr.biconvs(model))["ups.6.biconv2"].binary_conv.weight
    alpha = weight.abs().mean(dim=(1, 2, 3))
    with torch.no_grad():
        weight[3, 5, 1, 2] = 0.0
    with pytest.raises(bdm.errors.BdmError, match=r"ups\.6\.biconv2.*\[3, 5, 1, 2\].*--zero-weight-sign"):
        onnx_export.to_onnx(model)
    assert resolve_sign_zeros(bidiffsr.sign_sources, model, -1, "test") == 1
    assert weight[3, 5, 1, 2] < 0 and torch.equal(weight.abs().mean(dim=(1, 2, 3))[4:], alpha[4:])
    exported = onnx_export.to_onnx(model, zero_sign=-1)
    assert metadata(exported).zero_weight_sign == "-1"


def test_export_checkpoint_records_the_source_and_the_options_scale(bi_ref, tmp_path):
    options = tmp_path / "options.yml"
    options.write_text((bi_ref / "ckpt_small_x4.yml").read_text() + "scale: 2\n")
    done = registry.export_checkpoint(bi_ref / "ckpt_small_x4.pth", tmp_path / "m.onnx", options,
                                      ExportOptions(validate=False), log=lambda line: None)
    meta = metadata(onnx.load(str(done.path)))
    assert meta.scale == 2 and meta.checkpoint == "ckpt_small_x4.pth" and meta.dtype == "fp32"
    assert meta.network_g["inner_channel"] == 8 and len(meta.checkpoint_sha256) == 64


def test_the_scale_recorded_comes_from_the_options_yaml_else_the_checkpoint_name(bi_ref, tmp_path):
    assert [checkpoint_name_scale(name) for name in ("BI_DiffSR_x4.pth", "net_g_x2_500000.pth", "x16.pth")] == [4, 2, 16]
    assert [checkpoint_name_scale(name) for name in ("model.pth", "max8.pth", "unet_x4_x2.pth")] == [None] * 3
    options = tmp_path / "options.yml"
    options.write_text("scale: 2\n")
    assert recorded_scale(options, "BI_DiffSR_x4.pth") == 2
    assert recorded_scale(bi_ref / "ckpt_small_x4.yml", bi_ref / "ckpt_small_x4.pth") == 4  # no scale in the YAML
    assert recorded_scale(None, "model.pth") is None


def test_the_latent_weight_check_catches_a_network_traced_without_packing(small_model):
    traced = onnx_export._trace(small_model, torch.float32, onnx_export.DEFAULT_OPSET)  # BIConvs not swapped
    with pytest.raises(bdm.errors.BdmError, match="holds the full-precision weight of the binarized conv"):
        onnx_export.check_no_binarized_weights(traced, onnx_export._biconv_weights(small_model), "binarized conv")
