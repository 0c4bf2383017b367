"""The plan's fusions (runtime/plan_fusion.py) on the exported graphs: every GroupNorm chain and SiLU fused, the
fused plan equal to the unfused one within the validation bound."""

import numpy as np
import torch

from bdm.export.bidiffsr.validate import validation_feeds
from bdm.runtime.kernel_runner import CpuKernelRunner

from reference_kernels import ReferenceKernels  # tests/runtime

BOUND = 1e-5


def rel(reference, other):
    return float(np.abs(other - reference).max() / np.abs(reference).max())


def test_fused_plan_equals_the_unfused_plan(small_x4_onnx, unet_onnx):
    for path, feed in ((small_x4_onnx, validation_feeds((2, 16, 16), [1999], np.float32)[0]),
                       (unet_onnx["fp"], {"x_t": np.random.default_rng(2).standard_normal((2, 3, 32, 32),
                                                                                         dtype=np.float32),
                                          "t": np.array([400, 400])})):
        fused = CpuKernelRunner(path, kernels=ReferenceKernels())
        plain = CpuKernelRunner(path, kernels=ReferenceKernels(), fuse=False)
        counts = {op: [n.op_type for n in fused.plan.nodes].count(op) for op in ("GroupNorm", "SiLU")}
        assert counts["GroupNorm"] == sum(n.op_type == "InstanceNormalization" for n in plain.plan.nodes)
        assert not any(n.op_type in ("InstanceNormalization", "Sigmoid") for n in fused.plan.nodes)
        assert len(fused.plan.nodes) < len(plain.plan.nodes)
        assert rel(plain.infer(feed)["eps"], fused.infer(feed)["eps"]) <= BOUND


def test_slices_of_a_concat_read_its_parts_without_concatenating():
    """Concat(a, b) read only by Slices and a Shape: slices inside a or b are views of them, one across both
    concatenates; every value equals ONNX Runtime's."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from bdm.runtime.execution_plan import ExecutionPlan

    i64 = lambda name, values: onnx.numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
             helper.make_node("Shape", ["ab"], ["shape"]),
             helper.make_node("Slice", ["ab", "s0", "e0", "axis1"], ["in_a"]),
             helper.make_node("Slice", ["ab", "s1", "e1", "axis1"], ["in_b"]),
             helper.make_node("Slice", ["ab", "s2", "e2", "axis1"], ["across"]),
             helper.make_node("Slice", ["ab", "s0", "e0", "axis2"], ["other_axis"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("in_a", "in_b", "across", "other_axis")] + [
        helper.make_tensor_value_info("shape", TensorProto.INT64, None)]
    constants = [i64("s0", [1]), i64("e0", [3]), i64("s1", [-2]), i64("e1", [2 ** 40]), i64("s2", [2]),
                 i64("e2", [5]), i64("axis1", [1]), i64("axis2", [2])]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, constants),
                              opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((2, 4, 5), dtype=np.float32), "b": rng.standard_normal((2, 3, 5),
                                                                                            dtype=np.float32)}
    theirs = dict(zip([o.name for o in outputs], ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)))
    plan = ExecutionPlan(model)
    assert not any(n.op_type == "Concat" for n in plan.nodes)
    tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
    ours = plan.run(tensors)
    for name, value in theirs.items():
        assert np.array_equal(ours[name].numpy(), value), name
    assert ours["in_a"].data_ptr() == tensors["a"][:, 1:3].data_ptr()          # a view, no copy
    assert ours["in_b"].data_ptr() == tensors["b"][:, 1:].data_ptr()


def test_a_slice_of_a_concat_keeps_its_part_from_being_updated_in_place():
    """v is a view of b (the second concatenated tensor): the Add reading b last must not write into it while v is
    read afterwards."""
    import onnx
    from onnx import TensorProto, helper

    from bdm.runtime.execution_plan import ExecutionPlan

    nodes = [helper.make_node("Mul", ["x", "w"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["ab"], axis=0),
             helper.make_node("Slice", ["ab", "start", "end"], ["v"]),
             helper.make_node("Add", ["b", "w"], ["c"]),
             helper.make_node("Add", ["v", "c"], ["y"])]
    constants = [onnx.numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
                 (("w", [2.0, 2.0], np.float32), ("start", [1], np.int64), ("end", [2 ** 40], np.int64))]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("x", "a")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], constants),
        opset_imports=[helper.make_opsetid("", 17)])
    plan = ExecutionPlan(model)
    x, a = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    b = x * 2
    assert torch.equal(plan.run({"x": x, "a": a})["y"], b + (b + 2))
