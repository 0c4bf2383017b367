"""The runner interface (backends.Runner's lifecycle, model_input_names) and the ONNX Runtime path of an exported
file (backends.OrtRunner, the CPU fallback of the bdm kernels): the packed weights are expanded once, when the session
is created, not on every call."""

import onnx
import onnxruntime as ort
import pytest

from bdm.contract import CONDITIONAL_INPUT_NAMES, UNCONDITIONAL_INPUT_NAMES
from bdm.errors import BdmError
from bdm.runtime.backends import Runner, model_input_names


def test_onnxruntime_folds_every_weight_expansion_when_the_session_is_created(small_x4_onnx, tmp_path):
    """Every Conv of the optimized session graph (the 56 inlined BinaryConv2d bodies and the float convs) reads its
    weight from an initializer: no Mod/GreaterOrEqual/Where on packed words is left to run per call. The Where
    nodes that remain are the TaA RPReLU on activations (z >= 0 ? z : slope * z), one per binary layer."""
    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(str(small_x4_onnx), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(optimized)).graph
    initializers = {i.name for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) >= 56 + 28 and all(n.input[1] in initializers for n in convs)
    assert not any(n.op_type == "Mod" for n in graph.node)
    wheres = [n for n in graph.node if n.op_type == "Where"]
    assert len(wheres) == 56
    assert all(producers[n.input[0]].op_type == "GreaterOrEqual" and n.input[1] not in initializers for n in wheres)


@pytest.mark.parametrize("inputs, names", [
    (["t", "cond", "x_t"], CONDITIONAL_INPUT_NAMES),     # engine order does not matter: the contract's order
    (["x_t", "cond", "t"], CONDITIONAL_INPUT_NAMES),
    (["t", "x_t"], UNCONDITIONAL_INPUT_NAMES),
])
def test_model_input_names_in_input_names_order(inputs, names):
    assert model_input_names(inputs, ["eps"], "engine e.engine", "rebuild it") == names


@pytest.mark.parametrize("inputs, outputs", [
    (["x_t", "cond"], ["eps"]),                          # no t
    (["x_t", "cond", "t", "extra"], ["eps"]),            # an input bdm cannot feed
    (["x_t"], ["eps"]),
    (["x_t", "t"], ["y"]),                               # no eps
])
def test_model_input_names_refuses_other_layouts(inputs, outputs):
    with pytest.raises(BdmError) as err:
        model_input_names(inputs, outputs, "engine e.engine", "rebuild it")
    assert str(err.value) == (f"engine e.engine has inputs {inputs} and outputs {outputs}; a bdm model has inputs "
                              "['x_t', 'cond', 't'] (unconditional: ['x_t', 't']) and output 'eps' (rebuild it)")


def test_runners_are_context_managers_that_close():
    closed = []

    class Holder(Runner):
        def close(self):
            closed.append(self)

    with Holder() as runner:
        pass
    assert closed == [runner]
