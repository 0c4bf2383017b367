"""The ONNX function body of `MultiBasisConv` (plugins/multibasis_conv/spec.yaml) and its activation quantizer
(`act_quantize`, also what the BinaryDM exporter writes for the attention's quantizers), from standard opset-17
operators. Builders take a body `b` with the interface of bdm.export.base.functions._Body."""

import numpy as np
from onnx import TensorProto, helper

_INT64_MAX = np.iinfo(np.int64).max
# Qp = 2^(b-1) - 1 indexed by b (act_bits); entry 0 is unused (act_bits 0 does not quantize).
_QP_BY_BITS = [0] + [2 ** (bits - 1) - 1 for bits in range(1, 9)]


def act_quantize(b, x: str, act_step: str, qn: str, qp: str) -> str:
    """x_q of the spec: step = (a - a*g) + a*g, g = float32(1 / sqrt(float64(numel(x) * Qp))); then
    DequantizeLinear(QuantizeLinear(Clip(x, Qn*step, Qp*step), step, int8 0)). qn, qp: float32 scalars. `b`: a
    function body, or (the exported attention) a TorchScript graph with the same `op` / `const` interface.

    Checked bit for bit against the official `static_xq` goldens: QuantizeLinear divides x by the scale and rounds
    half to even, as the official torch.round(x / step); it saturates to int8 [-128, 127], so x is clipped to
    [Qn*step, Qp*step] first. Clipping x instead of x / step gives the same codes: Qn*step is exact (a power of two
    times step), and a value between Qp*step and float32(Qp*step) divides to within one rounding of Qp, which
    rounds to Qp either way."""
    numel_times_qp = b.op("Mul", b.op("Cast", b.op("Size", x), to=TensorProto.DOUBLE),
                          b.op("Cast", qp, to=TensorProto.DOUBLE))
    g = b.op("Cast", b.op("Div", b.const(1.0, np.float64), b.op("Sqrt", numel_times_qp)), to=TensorProto.FLOAT)
    a = b.op("Reshape", act_step, b.const(np.zeros(0, np.int64), np.int64))  # [1] -> scalar
    scaled = b.op("Mul", a, g)
    step = b.op("Add", b.op("Sub", a, scaled), scaled)
    clipped = b.op("Clip", x, b.op("Mul", qn, step), b.op("Mul", qp, step))
    zero = b.const(0, np.int8)
    return b.op("DequantizeLinear", b.op("QuantizeLinear", clipped, step, zero), step, zero)


def _branch(b, name: str, build) -> "object":
    """An If branch: the nodes build(inner) adds to a fresh body of b's kind, their values prefixed with `name` so
    that they cannot clash with the function's own; its one output is build's result (float32)."""
    inner = type(b)()
    result = build(inner)
    renamed = {o: f"{name}_{o}" for node in inner.nodes for o in node.output}
    for node in inner.nodes:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    output = renamed.get(result, f"{name}_out")
    if result not in renamed:  # the branch passes an outer value through
        inner.nodes.append(helper.make_node("Identity", [result], [output]))
    return helper.make_graph(inner.nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])


def _slice(b, values: str, start, end) -> str:
    """values[start:end] of a 1-D int64 tensor; start/end are ints or [1]-shaped int64 values."""
    def bound(v):
        return b.const([v], np.int64) if isinstance(v, int) else v
    return b.op("Slice", values, bound(start), bound(end))


def _as_1d(b, scalar: str) -> str:
    return b.op("Reshape", scalar, b.const([1], np.int64))


def multibasis_conv_body(b, x, weight, scale, bias, act_step, y):
    """MultiBasisConv, one spec line at a time. conv1d and linear run as conv2d over [N, C, 1, L] / [N, C, 1, 1]."""
    spatial_dims = b.attribute("spatial_dims")
    x32 = b.float32(x)
    two_minus_dims = _as_1d(b, b.op("Sub", b.const(2, np.int64), spatial_dims))
    ones = _slice(b, b.const([1, 1], np.int64), 0, two_minus_dims)                 # 2 - spatial_dims ones
    x_shape = b.op("Shape", x32)
    x4 = b.op("Reshape", x32, b.op("Concat", _slice(b, x_shape, 0, 2), ones, _slice(b, x_shape, 2, _INT64_MAX),
                                   axis=0))

    # x_q: quantized per tensor when act_bits > 0
    bits = b.attribute("act_bits")
    qp = b.op("Gather", b.const(_QP_BY_BITS, np.float32), bits)
    qn = b.op("Sub", b.op("Neg", qp), b.const(1, np.float32))
    x_q = b.op("If", b.op("Greater", bits, b.const(0, np.int64)),
               then_branch=_branch(b, "quantized", lambda inner: act_quantize(inner, x4, act_step, qn, qp)),
               else_branch=_branch(b, "unquantized", lambda inner: x4))

    # W_hat = sum_k scale[k] * B_k, as [O, I, kh, kw] (1 x k for conv1d, 1 x 1 for linear)
    w_shape = b.op("Shape", weight)
    in_channels = _as_1d(b, b.attribute("in_channels"))
    words = _slice(b, w_shape, -1, _INT64_MAX)
    per_tap = b.op("Reshape", weight, b.op("Concat", b.const([-1, 1, 1], np.int64), words, axis=0))
    bits = b.weight_bits(per_tap)                                                   # [K*O*T, I, 1, 1] bool
    bits = b.op("Reshape", bits, b.op("Concat", _slice(b, w_shape, 0, 2), b.const([-1], np.int64), in_channels,
                                      axis=0))                                      # [K, O, T, I]
    bits = b.op("Transpose", bits, perm=[0, 1, 3, 2])                               # [K, O, I, T]
    scale4 = b.op("Reshape", scale, b.const([0, 0, 1, 1], np.int64))
    # scale[k, o] * B_k as a selection of +-scale: booleans until here, one float tensor per basis (ONNX Runtime
    # folds these weights once per session and keeps every intermediate: ~23 bytes per sign bit in all)
    weighted = b.op("Where", bits, scale4, b.op("Neg", scale4))
    w_hat = b.op("ReduceSum", weighted, b.const([0], np.int64), keepdims=0)         # one float32 add for K = 2
    w4 = b.op("Reshape", w_hat, b.op("Concat", _slice(b, w_shape, 1, 2), in_channels, ones,
                                     _slice(b, w_shape, 2, -1), axis=0))

    # zero padding of x_q on the real spatial axes, then the conv (+ bias) at stride 1 or 2
    padding = b.attribute("padding")
    pad_h = b.op("Mul", padding, b.op("Cast", b.op("Equal", spatial_dims, b.const(2, np.int64)),
                                      to=TensorProto.INT64))
    pad_w = b.op("Mul", padding, b.op("Min", spatial_dims, b.const(1, np.int64)))
    side = b.op("Concat", b.const([0, 0], np.int64), _as_1d(b, pad_h), _as_1d(b, pad_w), axis=0)
    x_pad = b.op("Pad", x_q, b.op("Concat", side, side, axis=0), b.const(0, np.float32), mode="constant")
    stride_two = b.op("Equal", b.attribute("stride"), b.const(2, np.int64))
    y4 = b.op("If", stride_two,
              then_branch=_branch(b, "stride2", lambda inner: inner.op("Conv", x_pad, w4, bias, strides=[2, 2])),
              else_branch=_branch(b, "stride1", lambda inner: inner.op("Conv", x_pad, w4, bias)))

    y_shape = b.op("Shape", y4)
    spatial_start = _as_1d(b, b.op("Sub", b.const(4, np.int64), spatial_dims))
    out_shape = b.op("Concat", _slice(b, y_shape, 0, 2), _slice(b, y_shape, spatial_start, 4), axis=0)
    b.output(b.op("Reshape", y4, out_shape), x, y)
