"""An independent PyTorch implementation of the op specs (plugins/*/spec.yaml) for the plugin tests: float64
convolution of the padded sign map (exact integers), float32 epilogue one operation at a time, one rounding to
the activation dtype. Also the spec's weight bit packing."""

import numpy as np
import torch
import torch.nn.functional as F

from bdm.plugins import spec


def pack_weight_signs(weight: torch.Tensor) -> np.ndarray:
    """Latent weights [Cout, Cin, k, k] (no exact zeros) -> int32 [Cout, k, k, ceil(Cin/32)], bit b of word w =
    (W[o, 32w+b, i, j] > 0), LSB first (plugins/common.yaml bit_layout)."""
    cout, cin, k, _ = weight.shape
    words = (cin + 31) // 32
    bits = np.zeros((cout, k, k, words * 32), dtype=np.uint64)
    bits[..., :cin] = (weight > 0).permute(0, 2, 3, 1).numpy()
    packed = (bits.reshape(cout, k, k, words, 32) << np.arange(32, dtype=np.uint64)).sum(axis=-1)
    return packed.astype(np.uint32).view(np.int32)


def group_of(t, num_groups: int, total_steps: int) -> int:
    return spec.group_index(int(np.asarray(t).reshape(-1)[0]), num_groups, total_steps)


def binary_conv_dot(sign_map: torch.Tensor, weight: torch.Tensor, pad_value: int) -> torch.Tensor:
    """Exact integer dot [N, Cout, H, W] (int64) of a sign map with sign(W), padding by pad_value."""
    p = weight.shape[-1] // 2
    padded = F.pad(sign_map.double(), (p, p, p, p), value=float(pad_value))
    return F.conv2d(padded, torch.sign(weight).double()).round().long()


def binary_conv2d(x, weight, alpha, *, pad_value=0, t=None, threshold=None, bias0=None, slope=None, bias1=None,
                  num_groups=5, total_steps=2000, residual=1):
    """BinaryConv2d (t and tables given) or BinarySignConv2d; x float32/float16 torch, returns (y, dot)."""
    x32 = x.float()
    if t is None:
        sign_map = torch.sign(x32)
    else:
        g = group_of(t, num_groups, total_steps)
        sign_map = torch.sign(x32 + threshold[g].reshape(1, -1, 1, 1))
    dot = binary_conv_dot(sign_map, weight, pad_value)
    z = alpha.reshape(1, -1, 1, 1) * dot.float()
    if t is not None:
        row = lambda table: table[g].reshape(1, -1, 1, 1)  # noqa: E731
        z = z + row(bias0)
        z = torch.where(z >= 0, z, row(slope) * z)
        z = z + row(bias1)
        if residual:
            z = z + x32
    return z.to(x.dtype), dot


def timestep_affine(x, t, *, num_groups=5, total_steps=2000, table=None, bias0=None, slope=None, bias1=None):
    """TimestepBias (table) or TimestepRPReLU (bias0, slope, bias1)."""
    g = group_of(t, num_groups, total_steps)
    row = lambda tab: tab[g].reshape(1, -1, *([1] * (x.dim() - 2)))  # noqa: E731
    x32 = x.float()
    if table is not None:
        return (x32 + row(table)).to(x.dtype)
    z = x32 + row(bias0)
    z = torch.where(z >= 0, z, row(slope) * z)
    return (z + row(bias1)).to(x.dtype)
