"""The ONNX converters (runtime/torch_ops.py) against ONNX Runtime: every node of the real exported graphs (both
families, every BinaryDM activation mode) on ONNX Runtime's own inputs to that node, and single-node models for the
semantics the exports do not reach (negative Slice steps, negative Gather indices, integer Div, rounding and
saturation of QuantizeLinear, Reshape's 0, Expand both ways, DepthToSpace DCR)."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from bdm.runtime import torch_ops
from bdm.runtime.execution_plan import ExecutionPlan
from bdm.runtime.kernel_runner import bdm_converters

from reference_kernels import ReferenceKernels  # tests/runtime

# Ops that must agree with ONNX Runtime bit for bit: one IEEE operation per element, or data movement.
EXACT = {"Add", "Sub", "Mul", "Div", "Abs", "Sqrt", "Cast", "Clip", "Where", "Equal", "Shape", "Size", "Reshape",
         "Unsqueeze", "Squeeze", "Transpose", "Concat", "Split", "Gather", "Slice", "Expand", "ConstantOfShape",
         "DepthToSpace", "Resize", "QuantizeLinear", "DequantizeLinear"}
# Sums in another order, or another libm: max|diff| <= ROUNDING * max|onnxruntime|.
ROUNDING = 1e-5


def ort_values(model: onnx.ModelProto, feed) -> dict:
    """ONNX Runtime's value of every node output (all exposed as graph outputs)."""
    typed = onnx.shape_inference.infer_shapes(model)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(v for v in typed.graph.value_info if v.name not in known)
    names = [o.name for o in exposed.graph.output]
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feed)))


def node_errors(model: onnx.ModelProto, feed) -> dict:
    """op_type -> (nodes checked, worst relative error, exact?) of each plan node and folded constant, run on ONNX
    Runtime's inputs against ONNX Runtime's outputs."""
    values = dict(ort_values(model, feed), **feed)
    plan = ExecutionPlan(model, bdm_converters(ReferenceKernels()), fuse=False)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    found = collections.defaultdict(lambda: [0, 0.0, True])

    def record(op_type, ours, theirs):
        ours = ours.numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (op_type, ours.shape, theirs.shape)
        entry = found[op_type]
        entry[0] += 1
        if not np.array_equal(ours, theirs):
            entry[2] = False
            diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max()
            entry[1] = max(entry[1], float(diff / (np.abs(theirs).max() or 1.0)))

    for name, value in plan.constants.items():       # folded at build time by the same converters
        if name in values and producers.get(name) not in (None, "Constant"):
            record(producers[name], value, values[name])
    with torch.inference_mode():
        for node in plan.nodes:
            inputs = [torch.from_numpy(np.array(values[v])) if v in values else plan.constants.get(v) if v else None
                      for v in node.inputs]
            outputs = node.fn(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            for name, ours in zip(node.outputs, outputs):
                if name in values:
                    record(node.op_type, ours, values[name])
    return dict(found)


def check(errors: dict):
    for op_type, (count, worst, exact) in errors.items():
        if op_type in EXACT:
            assert exact, f"{op_type}: {count} nodes, worst rel {worst:.1e}, must be exact"
        else:
            assert worst <= ROUNDING, f"{op_type}: worst rel {worst:.1e} over {count} nodes"


def test_every_node_of_the_bidiffsr_export(small_x4_onnx, small_x4_unfused_onnx):
    rng = np.random.default_rng(0)
    feed = {"x_t": rng.standard_normal((2, 3, 16, 24), dtype=np.float32),
            "cond": rng.random((2, 3, 16, 24), dtype=np.float32), "t": np.array([1234, 5])}
    seen = set()
    for path in (small_x4_onnx, small_x4_unfused_onnx):
        errors = node_errors(onnx.load(str(path)), feed)
        check(errors)
        seen |= set(errors)
    assert {"Conv", "Gemm", "InstanceNormalization", "DepthToSpace", "Slice", "MatMul", "Softmax",
            "BinaryConv2d", "BinarySignConv2d", "TimestepBias", "TimestepRPReLU"} <= seen


@pytest.mark.parametrize("mode", ["static", "dynamic", "w1a32", "fp"])
def test_every_node_of_the_binarydm_export(unet_onnx, mode):
    rng = np.random.default_rng(1)
    feed = {"x_t": rng.standard_normal((2, 3, 32, 32), dtype=np.float32), "t": np.array([500, 500])}
    errors = node_errors(onnx.load(str(unet_onnx[mode])), feed)
    check(errors)
    expected = {"Einsum", "Resize", "Split", "Expand", "Where", "Equal", "ConstantOfShape"}
    expected |= {"QuantizeLinear", "DequantizeLinear", "Clip", "Size", "Sqrt"} if mode in ("static", "dynamic") \
        else set()
    expected |= {"ReduceMean", "Abs"} if mode == "dynamic" else set()
    expected |= {"MultiBasisConv"} if mode != "fp" else {"Conv", "Gemm"}
    assert expected <= set(errors)


def test_converters_cover_exactly_the_exported_op_types(small_x4_onnx, small_x4_unfused_onnx, unet_onnx):
    used = {n.op_type for path in [small_x4_onnx, small_x4_unfused_onnx, *unet_onnx.values()]
            for n in onnx.load(str(path)).graph.node if n.domain == "" and n.op_type != "Constant"}
    assert used == set(torch_ops.supported_op_types())


# --- single nodes ----------------------------------------------------------------------------------------------

def run_both(op_type, inputs: dict, attributes=None, outputs=1, opset=17, constant_inputs=()):
    """The one-node model in ONNX Runtime and in an ExecutionPlan. `inputs`: name -> array ('' skips one);
    `constant_inputs`: names given as initializers (the plan then sees them when it is built)."""
    names = list(inputs)
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    for n, v in inputs.items() if n and n not in constant_inputs]
    initializers = [onnx.numpy_helper.from_array(inputs[n], n) for n in constant_inputs]
    out_names = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op_type, names, out_names, **(attributes or {}))
    graph = helper.make_graph([node], "one", graph_inputs, [helper.make_value_info(n, onnx.TypeProto())
                                                            for n in out_names], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    feed = {n: v for n, v in inputs.items() if n and n not in constant_inputs}
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    plan = ExecutionPlan(model)
    ours = plan.run({n: torch.from_numpy(v) for n, v in feed.items()})
    return [ours[n].numpy() for n in out_names], theirs


def assert_same(op_type, inputs, attributes=None, **kwargs):
    ours, theirs = run_both(op_type, inputs, attributes, **kwargs)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (op_type, a, b)


I64 = np.int64


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([-1], [-100], [1], [-1]), ([5, 0], [0, 9], [0, 1], [-2, 3]), ([1], [2 ** 62], [-1], [2]),
    ([0], [-1], [0], [1]), ([-3, 10], [-1, -20], [1, 0], [1, -3])])
def test_slice_clamps_and_takes_negative_steps(starts, ends, axes, steps):
    x = np.arange(7 * 9, dtype=np.float32).reshape(7, 9)
    assert_same("Slice", {"x": x, "s": np.array(starts, I64), "e": np.array(ends, I64), "a": np.array(axes, I64),
                          "p": np.array(steps, I64)})
    assert_same("Slice", {"x": x, "s": np.array(starts, I64), "e": np.array(ends, I64), "a": np.array(axes, I64),
                          "p": np.array(steps, I64)}, constant_inputs=("s", "e", "a", "p"))


def test_gather_takes_negative_indices_and_index_shapes():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert_same("Gather", {"x": x, "i": np.array([[-1, 0], [2, -3]], I64)}, {"axis": 1})
    assert_same("Gather", {"x": x, "i": np.array(-2, I64)}, {"axis": 2})


def test_integer_div_truncates_and_cast_truncates():
    a, b = np.array([7, -7, 7, -7, 0], I64), np.array([2, 2, -2, -2, 3], I64)
    assert_same("Div", {"a": a, "b": b})
    assert_same("Cast", {"x": np.array([-2.7, -0.5, 0.5, 2.7, 1e3], np.float32)}, {"to": TensorProto.INT64})
    assert_same("Cast", {"x": np.array([0.0, -0.0, 0.3, np.inf], np.float32)}, {"to": TensorProto.BOOL})


def test_quantize_linear_rounds_half_to_even_and_saturates():
    x = np.array([-1000, -8.5, -7.5, -0.5, 0.5, 1.5, 2.5, 6.5, 7.5, 1000, -0.0], np.float32)
    for zero_point in (np.array(0, np.int8), np.array(3, np.int8), np.array(128, np.uint8)):
        assert_same("QuantizeLinear", {"x": x, "s": np.array(1.0, np.float32), "z": zero_point})
        assert_same("QuantizeLinear", {"x": x, "s": np.array(0.37, np.float32), "z": zero_point})
    codes = np.array([-128, -3, 0, 5, 127], np.int8)
    assert_same("DequantizeLinear", {"x": codes, "s": np.array(0.37, np.float32), "z": np.array(2, np.int8)})


def test_reshape_zero_copies_a_dimension_unless_allowzero():
    x = np.zeros((2, 3, 4), np.float32)
    assert_same("Reshape", {"x": x, "s": np.array([0, -1], I64)})
    assert_same("Reshape", {"x": x, "s": np.array([0, 4, 3], I64)}, {"allowzero": 0}, constant_inputs=("s",))
    empty = np.zeros((0, 3), np.float32)
    assert_same("Reshape", {"x": empty, "s": np.array([3, 0], I64)}, {"allowzero": 1})


def test_expand_broadcasts_both_ways_and_depth_to_space_orders():
    assert_same("Expand", {"x": np.arange(3, dtype=np.float32).reshape(3, 1), "s": np.array([2, 1, 4], I64)})
    x = np.arange(2 * 8 * 3 * 2, dtype=np.float32).reshape(2, 8, 3, 2)
    for mode in ("DCR", "CRD"):
        assert_same("DepthToSpace", {"x": x}, {"blocksize": 2, "mode": mode})


def test_resize_nearest_asymmetric_floor_with_non_integer_scales():
    x = np.arange(2 * 5 * 7, dtype=np.float32).reshape(1, 2, 5, 7)
    attributes = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    for scales in ([1, 1, 2, 2], [1, 1, 1.5, 0.6]):
        assert_same("Resize", {"x": x, "": None, "s": np.array(scales, np.float32)}, attributes)


def test_a_node_without_onnx_semantics_here_is_refused_by_name():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(torch_ops.Unsupported, match=r"node .*Resize.*only nearest/asymmetric/floor"):
        run_both("Resize", {"x": x, "": None, "s": np.array([1, 1, 2, 2], np.float32)}, {"mode": "linear"})
    graph = helper.make_graph([helper.make_node("Tanh", ["x"], ["y"], name="/act/Tanh")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(torch_ops.Unsupported, match=r"no CPU implementation of the op type\(s\) Tanh \(e.g. node "
                                                    r"/act/Tanh\)"):
        ExecutionPlan(helper.make_model(graph))
