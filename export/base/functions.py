"""One model-local ONNX function (FunctionProto) per `bdm` op, built from standard ops only, so that ONNX Runtime
(or any ONNX runtime) runs an exported model with no extra library: the executable form of each op's spec
(plugins/*/spec.yaml: inputs, attributes, defaults; every step below is one line of the op's `semantics`)."""

from typing import Dict, Iterable, List

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from bdm.export.base.multibasis_functions import multibasis_conv_body
from bdm.plugins import packing, spec
from bdm.plugins.reference import complete_attributes

# Node attributes TensorRT's ONNX parser needs to pick our plugin over the function body (notes/tensorrt.md §3);
# declared by the functions too, so a node's attributes are exactly its function's.
PLUGIN_ATTRIBUTES = {"plugin_namespace": str(spec.common()["plugin_namespace"]),
                     "plugin_version": str(spec.common()["plugin_version"])}
DOMAIN = spec.common()["domain"]
DOMAIN_VERSION = 1
# A model-local function uses the model's own version of the default domain, so the bodies are built per opset from
# operators whose semantics are the same from opset 17 on. That rules out BitwiseAnd (opset 18): a packed word is
# unpacked arithmetically instead, after mapping the int32 word to its unsigned value u in int64 (`Mod` of integers
# takes the divisor's sign): bit b is set iff u mod 2**(b+1) >= 2**b.
MIN_OPSET = 17


class _Body:
    """Collects the nodes of one function body; every helper returns the name of the value it computes."""

    def __init__(self):
        self.nodes: List[onnx.NodeProto] = []
        self.attributes: Dict[str, str] = {}

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        output = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def const(self, value, dtype) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def attribute(self, name: str) -> str:
        """The function's INT attribute `name` as an int64 scalar tensor (Constant value_int ref_attr_name)."""
        if name not in self.attributes:
            output = self.attributes[name] = f"attr_{name}"
            node = helper.make_node("Constant", [], [output])
            node.attribute.append(AttributeProto(name="value_int", ref_attr_name=name, type=AttributeProto.INT))
            self.nodes.append(node)
        return self.attributes[name]

    # --- pieces shared by the ops ------------------------------------------------------------------------------

    def group(self, t: str) -> str:
        """common.yaml group_rule, g = clamp((t[0] * K) div T, 0, K-1), as an int64 scalar. ONNX integer Div
        truncates toward zero; for a negative dividend the truncated and the floored quotient are both <= 0, so
        after the clamp they give the same g."""
        t0 = self.op("Cast", self.op("Gather", t, self.const(0, np.int64), axis=0), to=TensorProto.INT64)
        num_groups = self.attribute("num_groups")
        quotient = self.op("Div", self.op("Mul", t0, num_groups), self.attribute("total_steps"))
        last = self.op("Sub", num_groups, self.const(1, np.int64))
        return self.op("Max", self.op("Min", quotient, last), self.const(0, np.int64))

    def row(self, table: str, group: str) -> str:
        """Row `group` of a [K, C] table as [1, C, 1, 1]."""
        return self.op("Reshape", self.op("Gather", table, group, axis=0), self.const([1, -1, 1, 1], np.int64))

    def float32(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.FLOAT)

    def sign(self, v: str) -> str:
        return self.op("Sign", v)  # ONNX Sign: 0 for +0.0 and -0.0, as common.yaml sign_rule

    def weight_signs(self, weight: str) -> str:
        """Packed int32 [Cout, k, k, words] -> float32 +-1 [Cout, Cin, k, k] (common.yaml bit_layout)."""
        return self.op("Where", self.weight_bits(weight), self.const(1, np.float32), self.const(-1, np.float32))

    def weight_bits(self, weight: str) -> str:
        """Packed int32 [Cout, k, k, words] -> bool [Cout, Cin, k, k], True where the sign is +1.

        Bit b of the word's unsigned value u is set iff (u mod 2**(b+1)) >= 2**b. The one wide integer
        tensor is that remainder; the rearranging runs on booleans and the float weights come last, which keeps
        ONNX Runtime's constant folding of this subgraph (it keeps every folded intermediate until the end) to
        about 10 bytes per weight."""
        unsigned = self.op("Mod", self.op("Cast", weight, to=TensorProto.INT64), self.const(2 ** 32, np.int64))
        words = self.op("Unsqueeze", unsigned, self.const([-1], np.int64))            # [Cout, k, k, words, 1]
        powers = 1 << np.arange(packing.BITS_PER_WORD + 1, dtype=np.int64)
        low_bits = self.op("Mod", words, self.const(powers[1:], np.int64))            # [Cout, k, k, words, 32]
        bits = self.op("GreaterOrEqual", low_bits, self.const(powers[:-1], np.int64))
        channels = self.op("Reshape", bits, self.const([0, 0, 0, -1], np.int64))      # channel c = 32*w + b
        in_channels = self.op("Reshape", self.attribute("in_channels"), self.const([1], np.int64))
        used = self.op("Slice", channels, self.const([0], np.int64), in_channels, self.const([3], np.int64))
        return self.op("Transpose", used, perm=[0, 3, 1, 2])

    def scaled_dot(self, sign_map: str, weight: str, alpha: str) -> str:
        """alpha[o] * dot, dot = the sign map padded by kernel_size div 2 with pad_value (after the sign),
        convolved with sign(W): sums of +-1 and 0 below 2**24, so the float32 Conv is the exact integer."""
        margin = self.op("Div", self.attribute("kernel_size"), self.const(2, np.int64))
        pads = self.op("Mul", margin, self.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64))  # H and W, both sides
        padded = self.op("Pad", sign_map, pads, self.float32(self.attribute("pad_value")), mode="constant")
        dot = self.op("Conv", padded, self.weight_signs(weight))
        return self.op("Mul", self.op("Reshape", alpha, self.const([1, -1, 1, 1], np.int64)), dot)

    def rprelu(self, z: str, bias0: str, slope: str, bias1: str, group: str) -> str:
        """z + bias0[g]; p = z if z >= 0 else slope[g] * z; p + bias1[g]."""
        z = self.op("Add", z, self.row(bias0, group))
        negative_part = self.op("Mul", self.row(slope, group), z)
        p = self.op("Where", self.op("GreaterOrEqual", z, self.const(0, np.float32)), z, negative_part)
        return self.op("Add", p, self.row(bias1, group))

    def output(self, y32: str, like: str, name: str):
        """Rounded once to the dtype of x."""
        self.nodes.append(helper.make_node("CastLike", [y32, like], [name]))


def _binary_conv2d(b: _Body, x, t, weight, alpha, threshold, bias0, slope, bias1, y):
    g = b.group(t)
    x32 = b.float32(x)
    s = b.sign(b.op("Add", x32, b.row(threshold, g)))
    activated = b.rprelu(b.scaled_dot(s, weight, alpha), bias0, slope, bias1, g)
    # An If, not x * residual: without the shortcut, in_channels may differ from out_channels.
    with_shortcut = helper.make_graph([helper.make_node("Add", [activated, x32], ["shortcut_sum"])], "with_shortcut",
                                      [], [helper.make_tensor_value_info("shortcut_sum", TensorProto.FLOAT, None)])
    without = helper.make_graph([helper.make_node("Identity", [activated], ["no_shortcut"])], "without_shortcut",
                                [], [helper.make_tensor_value_info("no_shortcut", TensorProto.FLOAT, None)])
    residual = b.op("Cast", b.attribute("residual"), to=TensorProto.BOOL)
    b.output(b.op("If", residual, then_branch=with_shortcut, else_branch=without), x, y)


def _binary_sign_conv2d(b: _Body, x, weight, alpha, y):
    b.output(b.scaled_dot(b.sign(b.float32(x)), weight, alpha), x, y)


def _timestep_bias(b: _Body, x, t, table, y):
    b.output(b.op("Add", b.float32(x), b.row(table, b.group(t))), x, y)


def _timestep_rprelu(b: _Body, x, t, bias0, slope, bias1, y):
    b.output(b.rprelu(b.float32(x), bias0, slope, bias1, b.group(t)), x, y)


_BODIES = {"BinaryConv2d": _binary_conv2d, "BinarySignConv2d": _binary_sign_conv2d,
           "TimestepBias": _timestep_bias, "TimestepRPReLU": _timestep_rprelu,
           "MultiBasisConv": multibasis_conv_body}  # BinaryDM's layer: body in multibasis_functions.py


def make_function(op_type: str, opset: int) -> onnx.FunctionProto:
    """The FunctionProto of `op_type` (domain bdm) for a model importing `opset` of the default domain."""
    if opset < MIN_OPSET:
        raise ValueError(f"the bdm function bodies need opset >= {MIN_OPSET}; got {opset}")
    op = spec.op(op_type)
    inputs = spec.input_names(op_type)
    outputs = [o["name"] for o in op["outputs"]]
    body = _Body()
    _BODIES[op_type](body, *inputs, *outputs)
    defaults = {**spec.attribute_defaults(op_type), **PLUGIN_ATTRIBUTES}
    required = [name for name in op["attributes"] if name not in defaults]
    return helper.make_function(
        DOMAIN, op_type, inputs, outputs, body.nodes, [helper.make_opsetid("", opset)],
        attributes=required,
        attribute_protos=[helper.make_attribute(name, value) for name, value in defaults.items()],
        doc_string=str(op["summary"]).strip())


def functions_for(op_types: Iterable[str], opset: int) -> List[onnx.FunctionProto]:
    return [make_function(op_type, opset) for op_type in sorted(set(op_types))]


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the function of every `bdm` op the graph uses, the `bdm` opset import and the IR version that
    function attribute defaults need (9). The default domain's opset is the model's own."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    unknown = sorted(used - set(_BODIES))
    if unknown:
        raise ValueError(f"the graph uses {DOMAIN} ops without a spec: {unknown}")
    del model.functions[:]
    model.functions.extend(functions_for(used, opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    model.ir_version = max(model.ir_version, 9)
    return model


def single_op_model(op_type: str, input_dtypes: Dict[str, np.dtype], attributes: Dict[str, int],
                    opset: int = MIN_OPSET) -> onnx.ModelProto:
    """A one-node model of `op_type` as the exporter writes it (all shapes dynamic): for per-op checks of the
    function body in ONNX Runtime, or of the plugin in TensorRT."""
    names = spec.input_names(op_type)
    output = spec.op(op_type)["outputs"][0]["name"]
    node = helper.make_node(op_type, names, [output], domain=DOMAIN, **node_attributes(op_type, attributes))

    def value_info(name, dtype, rank):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                             [f"{name}_{d}" for d in range(rank)])

    ranks = {i["name"]: len(i["shape"]) for i in spec.op(op_type)["inputs"]}
    graph = helper.make_graph([node], op_type, [value_info(n, input_dtypes[n], ranks[n]) for n in names],
                              [value_info(output, input_dtypes["x"], 4)])
    return attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def node_attributes(op_type: str, attributes: Dict[str, int]) -> Dict[str, object]:
    """Every attribute a `bdm` node carries: the op's hyper-parameters (all of them, defaults written out,
    because TensorRT passes only the node's own attributes to the plugin) and the plugin selectors."""
    return {**complete_attributes(op_type, attributes), **PLUGIN_ATTRIBUTES}
