"""BinaryDM's quantized layers (official ours_util.py / openaimodel_ours.py) rewritten for inference, with the
official parameter names and fp32 arithmetic step for step (BinarizedLayer), so that every 4-bit rounding decision
comes out the same; `set_mode` puts a whole tree in one of config.MODES.
Reference: ../shared/reference/binarydm/README.md ("Exact semantics") and ARCHITECTURE.md §4.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bdm.errors import BdmError
from bdm.export.binarydm.config import ACT_BITS, MODES
from bdm.plugins.multibasis_reference import pack_bases

PRECISIONS = ("bnn", "full")
ORDERS = (1, 2)


def act_range(bits: int) -> Tuple[int, int]:
    """(Qn, Qp) of the signed b-bit grid."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def effective_step(alpha: torch.Tensor, numel: int, qp: int) -> torch.Tensor:
    """The step the official forward divides by: grad_scale(alpha, g) evaluated in fp32, (alpha - alpha*g) + alpha*g.
    Equal to alpha except for about 0.1 % of (alpha, numel) pairs, where it is 1 ulp off."""
    g = 1.0 / math.sqrt(numel * qp)
    scaled = alpha * g
    return (alpha - scaled) + scaled


def dynamic_step(x: torch.Tensor, qp: int) -> torch.Tensor:
    """The official LSQ re-initialisation 2*mean|x|/sqrt(Qp), over the whole tensor (batch included), shape [1]."""
    return (2 * x.abs().mean() / math.sqrt(qp)).reshape(1)


class ActQuantizer(nn.Module):
    """Per-tensor signed activation quantizer (official `_ActQ`): one learnable step `alpha` [1].
    `bits` None makes it the identity (a layer without activation quantization)."""

    def __init__(self, bits: Optional[int]):
        super().__init__()
        if bits not in ACT_BITS:
            raise BdmError(f"activation bits {bits!r} are not supported; choose one of {list(ACT_BITS)}")
        self.bits = bits
        self.alpha = nn.Parameter(torch.ones(1))

    def step(self, x: torch.Tensor, dynamic: bool) -> torch.Tensor:
        """The step a forward on `x` uses (after grad_scale), [1]."""
        qp = act_range(self.bits)[1]
        return effective_step(dynamic_step(x, qp) if dynamic else self.alpha, x.numel(), qp)

    def codes(self, x: torch.Tensor, dynamic: bool) -> torch.Tensor:
        """Integer codes round(clamp(x / step, Qn, Qp)) as float32 (exact), and the step: x_q = codes * step."""
        qn, qp = act_range(self.bits)
        step = self.step(x, dynamic)
        return torch.round(torch.clamp(x / step, qn, qp)), step

    def forward(self, x: torch.Tensor, dynamic: bool = False) -> torch.Tensor:
        if self.bits is None:
            return x
        codes, step = self.codes(x, dynamic)
        return codes * step


def _check_choice(what: str, value, allowed):
    if value not in allowed:
        raise BdmError(f"{what} {value!r} is not supported; choose one of {list(allowed)}")


@dataclass
class BinarizedLayerExport:
    """What an exporter needs from one binarized layer (all tensors detached, CPU).

    kind: "conv2d" | "conv1d" | "linear"; weight_shape [O, I, *taps]; stride, padding (0 for linear).
    sign_planes: int8 [order, O, I, *taps] with values -1/0/+1 (B1, then B2 for order 2).
    packed_signs: int32 [order, O, *taps, ceil(I/32)] in the plugins/common.yaml bit layout (a plane holding a 0,
                  which one bit cannot represent, raises ZeroWeightError: base.sign_zeros finds and resolves them).
    scales: float32 [order, O] (s1, then s2). bias: float32 [O].
    act_bits: 4 / 8, or None when the input is not quantized. act_step: the stored static step alpha, float32 [1]
              (the forward divides by effective_step(alpha, numel(x), Qp), which can be 1 ulp off alpha).
    """

    kind: str
    weight_shape: Tuple[int, ...]
    stride: int
    padding: int
    order: int
    sign_planes: torch.Tensor
    packed_signs: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor
    act_bits: Optional[int]
    act_step: torch.Tensor


class BinarizedLayer(nn.Module):
    """Common part of BinarizedConv2d / BinarizedConv1d / BinarizedLinear (official BNNConv2d, BNNConv1d, BNNLinear):
    latent weight [O, I, *taps], bias [O] (always present), scaling_first_order / scaling_second_order [O, 1, ...]
    (s1, s2), quantizer_a.alpha [1].

    Attributes outside the state_dict (the official ones are Python flags too): precision "bnn"/"full", order 1/2,
    mode (MODES), act_bits (quantizer_a.bits), stride, padding.

    The official fp32 arithmetic:
        Qn, Qp = -2^(b-1), 2^(b-1)-1                         signed, even after SiLU (b = 4: -8, 7)
        a      = (alpha - alpha*g) + alpha*g,  g = 1/sqrt(numel(x)*Qp)   the official grad_scale step, fp32
        x_q    = round(clamp(x / a, Qn, Qp)) * a             true division; torch.round = half to even
        B1     = sign(W),  W_hat = s1*B1                     order 1; sign(0) = 0
        W_hat  = s1*B1 + s2*sign(W - s1*B1)                  order 2 (the residual uses the stored s1)
        y      = conv2d / conv1d / linear(x_q, W_hat, bias, stride, padding)   W_hat materialised first
    Mode dynamic recomputes the step on every call as 2*mean|x|/sqrt(Qp) over the whole tensor, batch included (what
    the official training code runs, because of its init_state/init_scale typo); the stored alpha is not used and
    not modified. w1a32 quantizes no activation (layers and attention); fp uses the latent weights."""

    kind = ""

    def __init__(self, weight_shape, stride: int = 1, padding: int = 0, order: int = 2, precision: str = "bnn",
                 act_bits: Optional[int] = 8):
        super().__init__()
        out_channels = weight_shape[0]
        scale_shape = (out_channels,) + (1,) * (len(weight_shape) - 1)
        self.weight = nn.Parameter(torch.zeros(weight_shape))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scaling_first_order = nn.Parameter(torch.ones(scale_shape))
        self.scaling_second_order = nn.Parameter(torch.ones(scale_shape))
        self.quantizer_a = ActQuantizer(act_bits)
        self.stride, self.padding = stride, padding
        self.configure(precision=precision, order=order)
        self.mode = "static"

    def configure(self, precision: Optional[str] = None, order: Optional[int] = None):
        if precision is not None:
            _check_choice("precision", precision, PRECISIONS)
            self.precision = precision
        if order is not None:
            _check_choice("order", order, ORDERS)
            self.order = order

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def act_bits(self) -> Optional[int]:
        return self.quantizer_a.bits

    @property
    def binarized(self) -> bool:
        return self.precision == "bnn"

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sign_planes(self) -> torch.Tensor:
        """[order, O, I, *taps] float32 signs -1/0/+1: B1 = sign(W), B2 = sign(W - s1*B1)."""
        first = torch.sign(self.weight)
        if self.order == 1:
            return first.unsqueeze(0)
        return torch.stack([first, torch.sign(self.weight - first * self.scaling_first_order)])

    def binarized_weight(self) -> torch.Tensor:
        """W_hat in the official fp32 order: bw = sign(W)*s1; bw + sign(W - bw)*s2."""
        first = torch.sign(self.weight) * self.scaling_first_order
        if self.order == 1:
            return first
        return first + torch.sign(self.weight - first) * self.scaling_second_order

    def quantizes_input(self) -> bool:
        return self.binarized and self.mode in ("static", "dynamic") and self.act_bits is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.binarized or self.mode == "fp":
            return self._apply_weight(x, self.weight)
        if self.quantizes_input():
            x = self.quantizer_a(x, dynamic=self.mode == "dynamic")
        return self._apply_weight(x, self.binarized_weight())

    def export_view(self) -> BinarizedLayerExport:
        """The layer as an exporter reads it (see BinarizedLayerExport)."""
        with torch.no_grad():
            planes = self.sign_planes().to(torch.int8).cpu()
            scales = [self.scaling_first_order, self.scaling_second_order][:self.order]
            return BinarizedLayerExport(
                kind=self.kind, weight_shape=tuple(self.weight.shape), stride=self.stride, padding=self.padding,
                order=self.order, sign_planes=planes, packed_signs=torch.from_numpy(pack_bases(planes.numpy())),
                scales=torch.stack([s.detach().reshape(-1).float().cpu() for s in scales]),
                bias=self.bias.detach().float().cpu(), act_bits=self.act_bits if self.quantizes_input() else None,
                act_step=self.quantizer_a.alpha.detach().float().cpu())

    def extra_repr(self) -> str:
        return (f"{self.kind} {tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, "
                f"precision={self.precision}, order={self.order}, act_bits={self.act_bits}, mode={self.mode}")


class BinarizedConv2d(BinarizedLayer):
    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, **kwargs):
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), stride, padding, **kwargs)

    def _apply_weight(self, x, weight):
        return F.conv2d(x, weight, self.bias, stride=self.stride, padding=self.padding)


class BinarizedConv1d(BinarizedLayer):
    kind = "conv1d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, **kwargs):
        super().__init__((out_channels, in_channels, kernel_size), stride, padding, **kwargs)

    def _apply_weight(self, x, weight):
        return F.conv1d(x, weight, self.bias, stride=self.stride, padding=self.padding)


class BinarizedLinear(BinarizedLayer):
    kind = "linear"

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__((out_features, in_features), **kwargs)

    def _apply_weight(self, x, weight):
        return F.linear(x, weight, self.bias)


def official_layer(official_class: str, constructor: Dict[str, int], act_bits: Optional[int]) -> BinarizedLayer:
    """BinarizedConv2d / BinarizedConv1d / BinarizedLinear from the official class name (BNNConv2d, BNNConv1d,
    BNNLinear) and its constructor arguments (in_channels, out_channels, kernel_size, stride, padding, order;
    in_features / out_features for BNNLinear)."""
    c = constructor
    if official_class == "BNNLinear":
        return BinarizedLinear(c["in_features"], c["out_features"], order=c["order"], act_bits=act_bits)
    classes = {"BNNConv2d": BinarizedConv2d, "BNNConv1d": BinarizedConv1d}
    if official_class not in classes:
        raise BdmError(f"{official_class} is not a BinaryDM binarized layer; expected one of "
                       f"{sorted(classes) + ['BNNLinear']}")
    return classes[official_class](c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"], c["padding"],
                                   order=c["order"], act_bits=act_bits)


def official_scale_init(layer: BinarizedLayer):
    """What the official layer does on its first 'bnn' call while init_scale is False: s1 = mean|W| over
    (I, *taps) as nested means, s2 = the same mean of |W - s1*sign(W)|. Overwrites the stored scales."""
    def nested_mean(v):
        for dim in reversed(range(1, v.dim())):
            v = v.mean(dim=dim, keepdim=True)
        return v

    with torch.no_grad():
        weight = layer.weight
        layer.scaling_first_order.copy_(nested_mean(weight.abs()))
        if layer.order == 2:
            residual = weight - torch.sign(weight) * layer.scaling_first_order
            layer.scaling_second_order.copy_(nested_mean(residual.abs()))


class QuantizedQKVAttention(nn.Module):
    """Official QKVAttentionLegacy with its activation quantizers (binary_act=True): qkv [N, 3*H*C, T] ->
    [N, H*C, T], heads split before q/k/v.

        logits = Qq(q*sc)^T Qk(k*sc), sc = C^-1/4;  w = softmax(logits) (fp32);  out = Qw(w) Qv(v)

    Each Q is a per-tensor signed quantizer with its own stored step. `quantize` False is the official
    binary_act=False (plain attention); modes w1a32 and fp do not quantize either."""

    def __init__(self, n_heads: int, act_bits: Optional[int] = 8, quantize: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.act_quantizer_q = ActQuantizer(act_bits)
        self.act_quantizer_k = ActQuantizer(act_bits)
        self.act_quantizer_w = ActQuantizer(act_bits)
        self.act_quantizer_v = ActQuantizer(act_bits)
        self.quantize = quantize
        self.mode = "static"

    def quantizes(self) -> bool:
        return self.quantize and self.mode in ("static", "dynamic") and self.act_quantizer_q.bits is not None

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        channels = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(batch * self.n_heads, channels * 3, length).split(channels, dim=1)
        scale = 1 / math.sqrt(math.sqrt(channels))
        q, k = q * scale, k * scale
        if self.quantizes():
            dynamic = self.mode == "dynamic"
            q, k = self.act_quantizer_q(q, dynamic), self.act_quantizer_k(k, dynamic)
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k), dim=-1)
        if self.quantizes():
            weight, v = self.act_quantizer_w(weight, dynamic), self.act_quantizer_v(v, dynamic)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, act_bits={self.act_quantizer_q.bits}, quantize={self.quantize}, "
                f"mode={self.mode}")


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Put every binarized layer and attention core of `model` in `mode` (one of MODES)."""
    _check_choice("mode", mode, MODES)
    for m in model.modules():
        if isinstance(m, (BinarizedLayer, QuantizedQKVAttention)):
            m.mode = mode
    return model
