"""The execution plan (runtime/execution_plan.py) on small graphs: intermediates released after their last reader,
elementwise ops writing into an input that dies there and into nothing else."""

import gc
import weakref

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from bdm.runtime.execution_plan import ExecutionPlan


def chain_model(nodes, inputs=("x",), outputs=("y",), initializers=()):
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                               for n in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test", 1)])


def test_intermediates_are_released_after_their_last_reader():
    """x -> a -> b -> c -> y: when a node runs, the tensors no later node reads are gone."""
    outputs = {"A": "a", "B": "b", "C": "c", "D": "y"}
    produced, alive_at = {}, {}

    def converter(view):
        def run(x):
            alive_at[view.name] = {name: ref() is not None for name, ref in produced.items()}
            y = x + 1
            produced[outputs[view.name]] = weakref.ref(y)
            return y
        return run

    nodes = [helper.make_node("Step", [i], [outputs[n]], name=n, domain="test")
             for n, i in (("A", "x"), ("B", "a"), ("C", "b"), ("D", "c"))]
    plan = ExecutionPlan(chain_model(nodes), {("test", "Step"): converter})
    gc.disable()
    try:
        y = plan.run({"x": torch.zeros(3)})["y"]
    finally:
        gc.enable()
    assert alive_at["C"] == {"a": False, "b": True}
    assert alive_at["D"] == {"a": False, "b": False, "c": True}
    assert torch.equal(y, torch.full((3,), 4.0))


def test_elementwise_ops_update_a_dying_input_in_place_and_nothing_else():
    w = onnx.numpy_helper.from_array(np.full((1, 3), 2.0, np.float32), "w")
    nodes = [helper.make_node("Mul", ["x", "w"], ["a"]),            # x is the caller's: never in place
             helper.make_node("Add", ["a", "w"], ["b"]),            # a dies here: in place
             helper.make_node("Reshape", ["b", "shape"], ["v"]),    # v is a view of b ...
             helper.make_node("Add", ["b", "w"], ["c"]),            # ... read below: b is not updated in place
             helper.make_node("Add", ["v", "c"], ["y"])]            # b (and v) die here: in place
    shape = onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    plan = ExecutionPlan(chain_model(nodes, initializers=[w, shape]))
    in_place = [step[0] is node.in_place for step, node in zip(plan._steps[False], plan.nodes)]
    assert in_place == [False, True, False, False, True]
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    before = x.clone()
    y = plan.run({"x": x})["y"]
    assert torch.equal(x, before)
    b = before * 2 + 2
    assert torch.equal(y, b + (b + 2))
