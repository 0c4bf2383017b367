"""ONNX operators as torch CPU operations, with ONNX semantics: one converter per standard op type that `bdm export`
writes for either family (BI-DiffSR, BinaryDM in every activation mode), nothing else.

A converter runs once, when a plan is built (runtime/execution_plan.py): it reads the node's attributes and the
inputs known then (constants) and returns the function the plan calls on every run, `fn(*inputs) -> tensor` (or a
tuple of tensors for several outputs). An omitted optional input arrives as None. What a converter cannot do with
ONNX semantics it refuses with `Unsupported` (one line, naming what), never a wrong number.

Semantics worth knowing (ONNX operator docs): integer Div truncates toward zero; Cast from float to integer truncates;
Slice clamps starts/ends per axis and takes negative steps; Gather takes negative indices; Reshape copies a 0 from the
input shape unless allowzero; Expand broadcasts both ways; QuantizeLinear rounds half to even and saturates;
DepthToSpace has two channel orders (DCR, CRD); Resize here is nearest with the asymmetric transform only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from onnx import TensorProto

from bdm.errors import BdmError


class Unsupported(BdmError):
    """A node that this module cannot run with ONNX semantics."""


@dataclass
class NodeView:
    """What a converter sees of one node when the plan is built."""

    op_type: str
    name: str
    attributes: Dict[str, object]               # python values; tensors as torch tensors, strings decoded
    constants: List[Optional[torch.Tensor]]     # per input: its value when known at build time, else None
    present: List[bool]                         # per input: False for an omitted optional input ('')
    num_outputs: int = 1
    opset: int = 17
    domain: str = ""
    inputs: List[str] = field(default_factory=list)   # value names, for the converters of custom domains

    def attribute(self, name: str, default=None):
        return self.attributes.get(name, default)

    def constant_list(self, index: int) -> Optional[List[int]]:
        """A constant integer input as a list (None when absent or not known at build time)."""
        if index >= len(self.constants) or self.constants[index] is None:
            return None
        return [int(v) for v in self.constants[index].reshape(-1).tolist()]

    def refuse(self, why: str):
        raise Unsupported(f"node {self.name or '(unnamed)'} ({self.op_type}): {why}")


TORCH_DTYPES = {TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64,
                TensorProto.FLOAT16: torch.float16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
                TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
                TensorProto.BOOL: torch.bool}


def _ints(tensor: torch.Tensor) -> List[int]:
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- elementwise --------------------------------------------------------------------------------------------------

def _div(a, b):
    if a.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def _cast(node: NodeView):
    to = node.attribute("to")
    if to not in TORCH_DTYPES:
        node.refuse(f"cast to ONNX type {to} is not supported")
    dtype = TORCH_DTYPES[to]
    return lambda x: x.to(dtype)


def _clip(node: NodeView):
    if node.opset < 11:
        node.refuse("Clip before opset 11 (bounds as attributes) is not supported")
    return lambda x, low=None, high=None: torch.clamp(x, low, high)


def _where(node: NodeView):
    return torch.where


# --- shapes and indexing ------------------------------------------------------------------------------------------

def _shape(node: NodeView):
    start, end = node.attribute("start", 0), node.attribute("end")
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64)


def _size(node: NodeView):
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64)


def _reshape(node: NodeView):
    allowzero = node.attribute("allowzero", 0)

    def reshape_to(x, dims: List[int]):
        if not allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    dims = node.constant_list(1)
    if dims is not None:
        return lambda x, shape: reshape_to(x, dims)
    return lambda x, shape: reshape_to(x, _ints(shape))


def _with_axes(node: NodeView, input_since: int, apply: Callable):
    """fn(x[, axes]) = apply(x, axes) with ONNX's `axes`: an attribute before opset `input_since`, the optional second
    input from it on (read once when it is a constant; None when absent)."""
    if node.opset < input_since:
        axes = node.attribute("axes")
        return lambda x: apply(x, axes)
    axes = node.constant_list(1)
    if axes is not None or not (len(node.present) > 1 and node.present[1]):
        return lambda x, *unused: apply(x, axes)
    return lambda x, axes_tensor: apply(x, _ints(axes_tensor))


def _unsqueeze(node: NodeView):
    def unsqueeze(x, axes: List[int]):
        rank = x.dim() + len(axes)
        for axis in sorted(_axis(a, rank) for a in axes):
            x = x.unsqueeze(axis)
        return x

    return _with_axes(node, 13, unsqueeze)


def _squeeze(node: NodeView):
    def squeeze(x, axes: Optional[List[int]]):
        if axes is None:
            return x.squeeze()
        return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))

    return _with_axes(node, 13, squeeze)


def _transpose(node: NodeView):
    perm = node.attribute("perm")
    return lambda x: x.permute(perm if perm is not None else tuple(reversed(range(x.dim()))))


def _concat(node: NodeView):
    axis = node.attribute("axis")
    return lambda *xs: torch.cat(xs, axis)


def _split(node: NodeView):
    axis, count = node.attribute("axis", 0), node.num_outputs

    def split(x, sizes=None):
        if sizes is None:  # equal parts, the last one smaller (opset 18's num_outputs rule)
            sizes = -(-x.shape[axis] // count)
            return tuple(torch.split(x, sizes, axis))
        return tuple(torch.split(x, _ints(sizes), axis))

    if node.opset < 13 and node.attribute("split") is not None:
        sizes = torch.tensor(node.attribute("split"))
        return lambda x: split(x, sizes)
    return split


def _gather(node: NodeView):
    axis = node.attribute("axis", 0)

    def gather(data, indices):
        a = _axis(axis, data.dim())
        size = data.shape[a]
        flat = indices.reshape(-1).to(torch.int64)
        flat = torch.where(flat < 0, flat + size, flat)
        picked = data.index_select(a, flat)
        return picked.reshape(data.shape[:a] + indices.shape + data.shape[a + 1:])

    return gather


def slice_bounds(dim: int, start: int, end: int, step: int):
    """ONNX Slice's clamping of (start, end) along an axis of length dim."""
    if step == 0:
        raise ValueError("Slice step 0")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


def _slice(node: NodeView):
    if node.opset < 10:
        node.refuse("Slice before opset 10 (attributes) is not supported")

    def slice_(data, starts, ends, axes=None, steps=None):
        starts, ends = _ints(starts), _ints(ends)
        axes = list(range(len(starts))) if axes is None else _ints(axes)
        steps = [1] * len(starts) if steps is None else _ints(steps)
        index = [slice(None)] * data.dim()
        reversed_axes = []
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = _axis(axis, data.dim())
            start, end = slice_bounds(data.shape[axis], start, end, step)
            if step > 0:
                index[axis] = slice(start, max(start, end), step)
            else:
                reversed_axes.append((axis, torch.arange(start, end, step)))
        out = data[tuple(index)]
        for axis, picked in reversed_axes:  # torch slicing has no negative steps
            out = out.index_select(axis, picked)
        return out

    return slice_


def _expand(node: NodeView):
    return lambda x, shape: x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


def _constant_of_shape(node: NodeView):
    value = node.attribute("value")
    fill = value.reshape(-1)[0] if value is not None else torch.tensor(0.0)
    return lambda shape: torch.full(_ints(shape), fill.item(), dtype=fill.dtype)


def _depth_to_space(node: NodeView):
    block, mode = node.attribute("blocksize"), node.attribute("mode", "DCR")
    if mode == "CRD":
        return lambda x: F.pixel_shuffle(x, block)
    if mode != "DCR":
        node.refuse(f"mode {mode!r}")

    def dcr(x):
        n, c, h, w = x.shape
        y = x.reshape(n, block, block, c // (block * block), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (block * block), h * block, w * block)

    return dcr


def _resize(node: NodeView):
    mode = node.attribute("mode", "nearest")
    transform = node.attribute("coordinate_transformation_mode", "half_pixel")
    rounding = node.attribute("nearest_mode", "round_prefer_floor")
    if (mode, transform, rounding) != ("nearest", "asymmetric", "floor") or node.attribute("antialias", 0) \
            or node.attribute("axes") is not None:
        node.refuse(f"mode {mode}/{transform}/{rounding} (only nearest/asymmetric/floor is supported)")

    def resize(x, roi=None, scales=None, sizes=None):
        # x_original = x_resized / scale, floored: output index i reads input index floor(i / scale), in float32
        # as ONNX Runtime computes it
        if sizes is not None and sizes.numel():
            sizes = _ints(sizes)
            factors = torch.tensor(sizes, dtype=torch.float32) / torch.tensor(x.shape, dtype=torch.float32)
        else:
            factors = scales.reshape(-1).to(torch.float32)
            sizes = [int(size * float(f)) for size, f in zip(x.shape, factors)]
        for axis, (size, out, factor) in enumerate(zip(x.shape, sizes, factors)):
            if out != size or factor != 1.0:
                picked = torch.floor(torch.arange(out, dtype=torch.float32) / factor).to(torch.int64)
                x = x.index_select(axis, picked.clamp_(0, size - 1))
        return x

    return resize


# --- arithmetic on tensors ----------------------------------------------------------------------------------------

def _conv(node: NodeView):
    if node.attribute("auto_pad", "NOTSET") != "NOTSET":
        node.refuse(f"auto_pad {node.attribute('auto_pad')}")
    group = node.attribute("group", 1)
    weight = node.constants[1]
    rank = (len(node.attribute("kernel_shape")) if node.attribute("kernel_shape")
            else weight.dim() - 2 if weight is not None else None)
    if rank not in (1, 2, 3):
        node.refuse("the kernel rank is unknown or not 1-3")
    strides = node.attribute("strides") or [1] * rank
    dilations = node.attribute("dilations") or [1] * rank
    pads = node.attribute("pads") or [0] * (2 * rank)
    begin, end = pads[:rank], pads[rank:]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    if begin == end:
        return lambda x, w, b=None: conv(x, w, b, strides, begin, dilations, group)
    torch_pads = [p for axis in reversed(range(rank)) for p in (begin[axis], end[axis])]
    return lambda x, w, b=None: conv(F.pad(x, torch_pads), w, b, strides, 0, dilations, group)


def _gemm(node: NodeView):
    alpha, beta = node.attribute("alpha", 1.0), node.attribute("beta", 1.0)
    trans_a, trans_b = node.attribute("transA", 0), node.attribute("transB", 0)
    if (alpha, beta, trans_a, trans_b) == (1.0, 1.0, 0, 1):
        return lambda a, b, c=None: F.linear(a, b, c)

    def gemm(a, b, c=None):
        y = torch.matmul(a.t() if trans_a else a, b.t() if trans_b else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return gemm


def _instance_normalization(node: NodeView):
    eps = node.attribute("epsilon", 1e-5)
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=eps)


def _softmax(node: NodeView):
    if node.opset < 13:
        node.refuse("Softmax before opset 13 (2-D coercion) is not supported")
    axis = node.attribute("axis", -1)
    return lambda x: torch.softmax(x, axis)


def _reduce_mean(node: NodeView):
    keepdims = bool(node.attribute("keepdims", 1))
    noop_empty = node.attribute("noop_with_empty_axes", 0)

    def reduce_mean(x, axes: Optional[List[int]]):
        if not axes:
            if noop_empty:
                return x
            axes = list(range(x.dim()))
        return torch.mean(x, dim=axes, keepdim=keepdims)

    return _with_axes(node, 18, reduce_mean)


def _einsum(node: NodeView):
    equation = node.attribute("equation")
    return lambda *xs: torch.einsum(equation, *xs)


def _per_axis(scale, x, axis):
    """A 1-D per-axis scale or zero point shaped to broadcast along `axis` of x."""
    if scale.dim() != 1:
        return scale
    shape = [1] * x.dim()
    shape[_axis(axis, x.dim())] = -1
    return scale.reshape(shape)


_SATURATION = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def _quantize_linear(node: NodeView):
    axis = node.attribute("axis", 1)
    if node.attribute("saturate", 1) != 1 or node.attribute("block_size", 0):
        node.refuse("only per-tensor or per-axis int8/uint8 quantization is supported")

    def quantize(x, scale, zero_point=None):
        dtype = zero_point.dtype if zero_point is not None else torch.uint8
        if dtype not in _SATURATION:
            raise ValueError(f"QuantizeLinear to {dtype}")
        q = torch.round(x / _per_axis(scale, x, axis))  # torch.round: half to even
        if zero_point is not None:
            q = q + _per_axis(zero_point, x, axis).to(q.dtype)
        return q.clamp_(*_SATURATION[dtype]).to(dtype)

    return quantize


def _dequantize_linear(node: NodeView):
    axis = node.attribute("axis", 1)

    def dequantize(x, scale, zero_point=None):
        y = x.to(scale.dtype)
        if zero_point is not None:
            y = y - _per_axis(zero_point, x, axis).to(scale.dtype)
        return y * _per_axis(scale, x, axis)

    return dequantize


def _plain(fn: Callable) -> Callable[[NodeView], Callable]:
    return lambda node: fn


CONVERTERS: Dict[str, Callable[[NodeView], Callable]] = {
    "Abs": _plain(torch.abs), "Add": _plain(torch.add), "Sub": _plain(torch.sub), "Mul": _plain(torch.mul),
    "Div": _plain(_div), "Sqrt": _plain(torch.sqrt), "Sin": _plain(torch.sin), "Cos": _plain(torch.cos),
    "Sigmoid": _plain(torch.sigmoid), "Equal": _plain(torch.eq), "MatMul": _plain(torch.matmul),
    "Where": _where, "Cast": _cast, "Clip": _clip,
    "Shape": _shape, "Size": _size, "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Transpose": _transpose, "Concat": _concat, "Split": _split, "Gather": _gather, "Slice": _slice,
    "Expand": _expand, "ConstantOfShape": _constant_of_shape, "DepthToSpace": _depth_to_space, "Resize": _resize,
    "Conv": _conv, "Gemm": _gemm, "InstanceNormalization": _instance_normalization, "Softmax": _softmax,
    "ReduceMean": _reduce_mean, "Einsum": _einsum, "QuantizeLinear": _quantize_linear,
    "DequantizeLinear": _dequantize_linear,
}

# Ops whose output never shares memory with an input (the plan may then update it in place once its last reader
# has run); every other op may return a view of its first input (and of no other).
FRESH_OUTPUT = frozenset({"Abs", "Add", "Sub", "Mul", "Div", "Sqrt", "Sin", "Cos", "Sigmoid", "Equal", "MatMul",
                          "Where", "Clip", "Concat", "Conv", "Gemm", "InstanceNormalization", "Softmax",
                          "ReduceMean", "Einsum", "QuantizeLinear", "DequantizeLinear", "ConstantOfShape", "Shape",
                          "Size"})


def supported_op_types() -> Sequence[str]:
    return sorted(CONVERTERS)
