"""NumPy reference of `MultiBasisConv` (plugins/multibasis_conv/spec.yaml), written line by line from its
`semantics`: the oracle for its ONNX function body (bdm.export.base.multibasis_functions), the BinaryDM exporter and
the CUDA kernels. Registered in bdm.plugins.reference.OPS, so `reference.run("MultiBasisConv", ...)` works.

The quantizer is float32, one IEEE operation at a time in the spec's order (NumPy float32 arrays and scalars never
contract a*b+c); the weighted sum is taken in float64, where every float32 product is exact, and rounded once.
"""

import math

import numpy as np

from bdm.plugins import packing


def act_range(bits: int):
    """(Qn, Qp) of the signed b-bit grid."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def activation_step(act_step, numel: int, qp: int) -> np.float32:
    """step = (a - a*g) + a*g in float32, g = float32(1 / sqrt(float64(numel * Qp)))."""
    g = np.float32(1.0 / math.sqrt(numel * qp))
    a = np.float32(np.asarray(act_step, dtype=np.float32).reshape(-1)[0])
    scaled = a * g
    return (a - scaled) + scaled


def quantize(x32: np.ndarray, act_step, bits: int) -> np.ndarray:
    """x_q = round_half_even(clamp(x / step, Qn, Qp)) * step, per tensor, float32."""
    qn, qp = act_range(bits)
    step = activation_step(act_step, x32.size, qp)
    codes = np.round(np.clip(x32 / step, qn, qp))  # np.round: half to even
    return (codes * step).astype(np.float32)


def pack_bases(signs: np.ndarray) -> np.ndarray:
    """Signs +-1 [num_bases, O, I, *taps] -> packed int32 [num_bases, O, *taps, ceil(I/32)] (common.yaml bit_layout,
    through bdm.plugins.packing with every (basis, o, tap) as one 1x1 'output channel'). A 0 raises ZeroWeightError."""
    signs = np.asarray(signs)
    num_bases, out_channels, in_channels, taps = signs.shape[0], signs.shape[1], signs.shape[2], signs.shape[3:]
    rows = np.moveaxis(signs, 2, -1).reshape(-1, in_channels, 1, 1)
    return packing.pack_signs(rows).reshape((num_bases, out_channels) + taps + (-1,))


def sign_bases(weight: np.ndarray, in_channels: int) -> np.ndarray:
    """Packed int32 [num_bases, O, *taps, words] -> int8 +-1 [num_bases, O, in_channels, *taps]."""
    weight = np.asarray(weight)
    rows = np.ascontiguousarray(weight.reshape(-1, 1, 1, weight.shape[-1]))
    signs = packing.unpack_signs(rows, in_channels).reshape(weight.shape[:-1] + (in_channels,))
    return np.moveaxis(signs, -1, 2)


def check_attributes(x_shape, weight_shape, *, in_channels, out_channels, num_bases, spatial_dims, kernel_size,
                     stride, padding):
    """The spec's constraints, and the input shapes its attributes imply (ValueError otherwise)."""
    if stride != 1 and spatial_dims != 2:
        raise ValueError(f"MultiBasisConv: stride {stride} needs spatial_dims 2 (got {spatial_dims})")
    if spatial_dims == 0 and (kernel_size, padding) != (1, 0):
        raise ValueError("MultiBasisConv: spatial_dims 0 (linear) needs kernel_size 1 and padding 0")
    if kernel_size < 1 or padding < 0:
        raise ValueError(f"MultiBasisConv: kernel_size {kernel_size} / padding {padding} out of range")
    expected = (num_bases, out_channels) + (kernel_size,) * spatial_dims + (packing.words_per_tap(in_channels),)
    if tuple(weight_shape) != expected:
        raise ValueError(f"MultiBasisConv: weight shape {tuple(weight_shape)}, the attributes say {expected}")
    if len(x_shape) != 2 + spatial_dims or x_shape[1] != in_channels:
        raise ValueError(f"MultiBasisConv: x shape {tuple(x_shape)} is not [N, {in_channels}] + {spatial_dims} axes")


def multibasis_conv(x, weight, scale, bias, act_step, *, in_channels, out_channels, num_bases, spatial_dims,
                    kernel_size, stride, padding, act_bits):
    check_attributes(np.shape(x), np.shape(weight), in_channels=in_channels, out_channels=out_channels,
                     num_bases=num_bases, spatial_dims=spatial_dims, kernel_size=kernel_size, stride=stride,
                     padding=padding)
    x32 = np.asarray(x).astype(np.float32)
    x_q = quantize(x32, act_step, act_bits) if act_bits else x32
    bases = sign_bases(weight, in_channels).astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    per_channel = (out_channels,) + (1,) * (1 + spatial_dims)
    w_hat = scale[0].reshape(per_channel) * bases[0]
    if num_bases == 2:
        w_hat = w_hat + scale[1].reshape(per_channel) * bases[1]
    # two spatial axes for every form: conv1d is 1 x L, linear 1 x 1
    n = x32.shape[0]
    x4 = x_q.reshape((n, in_channels) + (1,) * (2 - spatial_dims) + x32.shape[2:]).astype(np.float64)
    w4 = w_hat.reshape((out_channels, in_channels) + (1,) * (2 - spatial_dims) + w_hat.shape[2:]).astype(np.float64)
    pad_h, pad_w = (padding if spatial_dims == 2 else 0), (padding if spatial_dims >= 1 else 0)
    x4 = np.pad(x4, ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)))
    kh, kw = w4.shape[2:]
    h, w = x4.shape[2] - kh + 1, x4.shape[3] - kw + 1
    y = np.zeros((n, out_channels, h, w), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nchw,oc->nohw", x4[:, :, i:i + h, j:j + w], w4[:, :, i, j])
    y = y[:, :, ::stride, ::stride] + np.asarray(bias, dtype=np.float64).reshape(1, -1, 1, 1)
    out_spatial = y.shape[2:][2 - spatial_dims:]
    return y.reshape((n, out_channels) + out_spatial).astype(np.float32).astype(np.asarray(x).dtype)
