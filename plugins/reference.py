"""NumPy reference of every `bdm` op, written line by line from the `semantics` of the specs
(plugins/*/spec.yaml, plugins/common.yaml): the oracle for the ONNX function bodies (bdm.export.base.functions), the
exporter's stand-in modules and the CUDA kernels.

Arithmetic as the spec says: the convolution is an exact integer dot product of the (padded) sign map with the
weight signs; every later step is one IEEE float32 operation in the spec's order (NumPy float32 scalars and
arrays never contract a*b+c into an FMA); the result is rounded once to the dtype of x.

    run(op_type, inputs, attributes) -> y      inputs by the spec's input names, attributes with spec defaults
"""

from typing import Dict

import numpy as np

from bdm.plugins import packing, spec
from bdm.plugins.multibasis_reference import multibasis_conv


def group_index(t: np.ndarray, num_groups: int, total_steps: int) -> int:
    """common.yaml group_rule: only sample 0's t selects the group of the whole batch."""
    return spec.group_index(int(np.asarray(t).reshape(-1)[0]), num_groups, total_steps)


def sign(v: np.ndarray) -> np.ndarray:
    """common.yaml sign_rule as int8: +1, -1, and 0 for +0.0 and -0.0."""
    return ((v > 0).astype(np.int8) - (v < 0).astype(np.int8))


def binary_dot(sign_map: np.ndarray, weight: np.ndarray, in_channels: int, kernel_size: int,
               pad_value: int) -> np.ndarray:
    """dot[n,o,h,w] = sum_{c,i,j} s_pad[n,c,h+i,w+j] * sign(W)[o,c,i,j], exact, int64. `weight` is packed."""
    weight_signs = packing.unpack_signs(weight, in_channels).astype(np.float64)  # [Cout, Cin, k, k]
    if weight_signs.shape[2:] != (kernel_size, kernel_size):
        raise ValueError(f"packed weight has {weight_signs.shape[2]}x{weight_signs.shape[3]} taps; "
                         f"kernel_size is {kernel_size}")
    p = kernel_size // 2
    padded = np.pad(sign_map.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)), constant_values=pad_value)
    n, _, h, w = sign_map.shape
    dot = np.zeros((n, weight_signs.shape[0], h, w), dtype=np.float64)
    for i in range(kernel_size):
        for j in range(kernel_size):
            # float64 sums of +-1 and 0 below 2**53 are exact integers
            dot += np.einsum("nchw,oc->nohw", padded[:, :, i:i + h, j:j + w], weight_signs[:, :, i, j])
    return dot.astype(np.int64)


def _row(table: np.ndarray, g: int) -> np.ndarray:
    """Row g of a [num_groups, C] float32 table, shaped to broadcast over [N, C, H, W]."""
    return np.asarray(table, dtype=np.float32)[g].reshape(1, -1, 1, 1)


def _rprelu(z: np.ndarray, bias0: np.ndarray, slope: np.ndarray, bias1: np.ndarray, g: int) -> np.ndarray:
    """z + bias0[g]; p = z if z >= 0 else slope[g] * z; p + bias1[g] (float32, one operation at a time)."""
    z = z + _row(bias0, g)
    p = np.where(z >= 0, z, _row(slope, g) * z)
    return p + _row(bias1, g)


def _scaled_dot(sign_map, weight, alpha, in_channels, kernel_size, pad_value) -> np.ndarray:
    dot = binary_dot(sign_map, weight, in_channels, kernel_size, pad_value)
    return np.asarray(alpha, dtype=np.float32).reshape(1, -1, 1, 1) * dot.astype(np.float32)


def binary_conv2d(x, t, weight, alpha, threshold, bias0, slope, bias1, *, in_channels, out_channels, kernel_size,
                  num_groups, total_steps, pad_value, residual):
    g = group_index(t, num_groups, total_steps)
    x32 = x.astype(np.float32)
    s = sign(x32 + _row(threshold, g))
    y = _rprelu(_scaled_dot(s, weight, alpha, in_channels, kernel_size, pad_value), bias0, slope, bias1, g)
    if residual:
        y = y + x32
    return y.astype(x.dtype)


def binary_sign_conv2d(x, weight, alpha, *, in_channels, out_channels, kernel_size, pad_value):
    s = sign(x.astype(np.float32))
    return _scaled_dot(s, weight, alpha, in_channels, kernel_size, pad_value).astype(x.dtype)


def timestep_bias(x, t, table, *, channels, num_groups, total_steps):
    g = group_index(t, num_groups, total_steps)
    return (x.astype(np.float32) + _row(table, g)).astype(x.dtype)


def timestep_rprelu(x, t, bias0, slope, bias1, *, channels, num_groups, total_steps):
    g = group_index(t, num_groups, total_steps)
    return _rprelu(x.astype(np.float32), bias0, slope, bias1, g).astype(x.dtype)


OPS = {"BinaryConv2d": binary_conv2d, "BinarySignConv2d": binary_sign_conv2d, "TimestepBias": timestep_bias,
       "TimestepRPReLU": timestep_rprelu, "MultiBasisConv": multibasis_conv}


def complete_attributes(op_type: str, attributes: Dict[str, int]) -> Dict[str, int]:
    """`attributes` with the spec's defaults filled in; unknown, missing, disallowed or too large values raise
    ValueError."""
    declared = spec.op(op_type)["attributes"]
    unknown = sorted(set(attributes) - set(declared))
    if unknown:
        raise ValueError(f"{op_type} has no attributes {unknown}; it has {sorted(declared)}")
    complete = {**spec.attribute_defaults(op_type), **attributes}
    missing = sorted(set(declared) - set(complete))
    if missing:
        raise ValueError(f"{op_type} needs the attributes {missing}")
    for name, value in complete.items():
        allowed = declared[name].get("allowed")
        if allowed is not None and value not in allowed:
            raise ValueError(f"{op_type}.{name} = {value} is not one of {allowed}")
        maximum = declared[name].get("maximum")
        if maximum is not None and value > maximum:
            raise ValueError(f"{op_type}.{name} = {value} is above {maximum} ({declared[name].get('doc')})")
    return complete


def run(op_type: str, inputs: Dict[str, np.ndarray], attributes: Dict[str, int]) -> np.ndarray:
    """Evaluate one op: inputs keyed by the spec's input names, attributes completed with the spec's defaults."""
    names = spec.input_names(op_type)
    if sorted(inputs) != sorted(names):
        raise ValueError(f"{op_type} takes inputs {names}; got {sorted(inputs)}")
    return OPS[op_type](*(inputs[n] for n in names), **complete_attributes(op_type, attributes))
