"""The BinaryDM UNet (official openaimodel_ours.UNetModel in its inference configuration) rewritten for deployment,
with the official module tree and parameter names (official state_dicts load strictly) and the layers of layers.py:
`model(x_t, t)` -> eps; plus the quantizer trace that finds the first layer where two runs part.
Reference: ../shared/reference/binarydm/README.md and ARCHITECTURE.md §3-4.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bdm.errors import BdmError
from bdm.export.base.sign_zeros import SignSource
from bdm.export.binarydm.config import GROUP_NORM_GROUPS, unet_params
from bdm.export.binarydm.layers import (BinarizedConv1d, BinarizedConv2d, BinarizedLayer, BinarizedLinear,
                                        QuantizedQKVAttention, act_range, set_mode)

# --------------------------------------------------------------------------- blocks
class TimestepEmbedSequential(nn.Sequential):
    """Children in order; ResBlocks also get the timestep embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x, then (conv_resample) a binarized 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, act_bits):
        super().__init__()
        if use_conv:
            self.conv = BinarizedConv2d(channels, channels, 3, padding=1, act_bits=act_bits)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    """Binarized 3x3 stride-2 conv (conv_resample), or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, act_bits):
        super().__init__()
        self.op = (BinarizedConv2d(channels, channels, 3, stride=2, padding=1, act_bits=act_bits) if use_conv
                   else nn.AvgPool2d(kernel_size=2, stride=2))

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """h = conv_in(SiLU(GN(x))); h += Linear(SiLU(emb)) (or GN(h)*(1+scale)+shift with use_scale_shift_norm);
    h = conv_out(SiLU(GN(h))); out = skip(x) + h. skip: identity, or a binarized 1x1 conv when the width changes.
    up/down (resblock_updown) resample h and x after in_layers' SiLU, before conv_in."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, act_bits, use_scale_shift_norm=False,
                 up=False, down=False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(nn.GroupNorm(GROUP_NORM_GROUPS, channels), nn.SiLU(),
                                       BinarizedConv2d(channels, out_channels, 3, padding=1, act_bits=act_bits))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, act_bits), Upsample(channels, False, act_bits)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, act_bits), Downsample(channels, False, act_bits)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), BinarizedLinear(emb_channels, emb_out, act_bits=act_bits))
        # index 2 is the official Dropout, the identity at inference
        self.out_layers = nn.Sequential(nn.GroupNorm(GROUP_NORM_GROUPS, out_channels), nn.SiLU(), nn.Identity(),
                                        BinarizedConv2d(out_channels, out_channels, 3, padding=1, act_bits=act_bits))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else BinarizedConv2d(channels, out_channels, 1, act_bits=act_bits))

    def forward(self, x, emb):
        if self.updown:
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """out = x + proj_out(attention(qkv(GN(x)))) on x flattened to [B, C, H*W]; no SiLU before qkv."""

    def __init__(self, channels: int, num_heads: int, act_bits):
        super().__init__()
        self.norm = nn.GroupNorm(GROUP_NORM_GROUPS, channels)
        self.qkv = BinarizedConv1d(channels, channels * 3, 1, act_bits=act_bits)
        self.attention = QuantizedQKVAttention(num_heads, act_bits=act_bits)
        self.proj_out = BinarizedConv1d(channels, channels, 1, act_bits=act_bits)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f), sin(t f)] (cos first), f_i = exp(-ln(max_period) i / (dim/2)), fp32 as in the official code;
    a zero column is appended for odd dim."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an official AttentionBlock built by UNetModel with legacy=True: the UNet passes
    num_head_channels through unchanged, and the block uses channels // num_head_channels unless that is -1."""
    return num_heads if num_head_channels == -1 else channels // num_head_channels


# --------------------------------------------------------------------------- precision map
@dataclass(frozen=True)
class LayerSetting:
    precision: str  # "bnn" | "full"
    order: int  # 1 | 2 (number of sign bases; unused when precision is "full")


def official_layer_settings(names: List[str]) -> Dict[str, LayerSetting]:
    """The official UNetModel's precision and order for its binarizable layers, `names` in module order
    (openaimodel_ours.py UNetModel.__init__, then the txt2img.py recipe: all 'bnn' except bnn_modules[0, 1, 2, -1]).

    No checkpoint stores them: the official constructor derives them from module names, and this repeats that rule:
    - order 1 for modules whose name contains 'middle', for input_blocks.i with i//3 in {2, 3} and for
      output_blocks.i with 3 - i//3 in {2, 3}; order 2 everywhere else (so input_blocks.0-5, output_blocks.6-11,
      and index 12+ of deeper nets);
    - every binarizable layer is 'bnn' except the first three and the last one in module order (time_embed.0,
      time_embed.2, input_blocks.0.0, out.2), which stay full precision.
    BinaryDMUNet's `layer_overrides` changes any of it by name."""
    settings = {}
    for name in names:
        if "middle" in name:
            order = 1
        elif "input_blocks" in name:
            order = 1 if int(name.split(".")[1]) // 3 in (2, 3) else 2
        elif "output_blocks" in name:
            order = 1 if 3 - int(name.split(".")[1]) // 3 in (2, 3) else 2
        else:
            order = 2
        settings[name] = LayerSetting("bnn", order)
    for name in {names[0], names[1], names[2], names[-1]}:
        settings[name] = LayerSetting("full", settings[name].order)
    return settings


# --------------------------------------------------------------------------- UNet
class BinaryDMUNet(nn.Module):
    """model(x_t, t) -> eps [N, out_channels, H, W]; x_t [N, in_channels, H, W] with H, W multiples of
    2**(len(channel_mult)-1); t int64 [N] (or [1] / 0-d, broadcast over the batch).

    Arguments are the official UNetModel's (see unet_params), plus act_bits (4, 8, or None) and layer_overrides
    {module name: {"precision": "bnn"|"full", "order": 1|2}} applied over official_layer_settings."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, num_heads=-1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False, act_bits=8,
                 layer_overrides: Optional[Mapping[str, Mapping]] = None):
        super().__init__()
        del dropout  # the identity at inference
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(BinarizedLinear(model_channels, time_embed_dim, act_bits=act_bits), nn.SiLU(),
                                        BinarizedLinear(time_embed_dim, time_embed_dim, act_bits=act_bits))

        def res_block(channels, out, **updown):
            return ResBlock(channels, time_embed_dim, out, act_bits, use_scale_shift_norm, **updown)

        def attention(channels, heads):
            return AttentionBlock(channels, _attention_heads(channels, heads, num_head_channels), act_bits)

        def resample(channels, up):
            if resblock_updown:
                return res_block(channels, channels, up=up, down=not up)
            return Upsample(channels, conv_resample, act_bits) if up else Downsample(channels, conv_resample, act_bits)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            BinarizedConv2d(in_channels, model_channels, 3, padding=1, act_bits=act_bits))])
        skip_widths, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(resample(ch, up=False)))
                skip_widths.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_widths.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(resample(ch, up=True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(GROUP_NORM_GROUPS, ch), nn.SiLU(),
                                 BinarizedConv2d(model_channels, out_channels, 3, padding=1, act_bits=act_bits))
        self.layer_settings = official_layer_settings([name for name, _ in binarized_layers(self)])
        self.apply_layer_settings(layer_overrides or {})

    def apply_layer_settings(self, overrides: Mapping[str, Mapping]):
        """Set precision and order of every binarized layer: official_layer_settings, then `overrides`
        ({name: {"precision": ..., "order": ...}}, unknown names or fields refused)."""
        layers = dict(binarized_layers(self))
        unknown = sorted(set(overrides) - set(layers))
        if unknown:
            raise BdmError(f"layer_overrides name layers {unknown[:5]} that this UNet does not have; "
                           f"binarizable layers are e.g. {list(layers)[:4]}")
        for name, override in overrides.items():
            if not isinstance(override, Mapping) or set(override) - {"precision", "order"}:
                raise BdmError(f"layer_overrides[{name!r}] must be a mapping with 'precision' and/or 'order', "
                               f"got {override!r}")
            current = self.layer_settings[name]
            self.layer_settings[name] = LayerSetting(override.get("precision", current.precision),
                                                     override.get("order", current.order))
        for name, layer in layers.items():
            setting = self.layer_settings[name]
            layer.configure(precision=setting.precision, order=setting.order)

    def _check_inputs(self, x_t, t) -> torch.Tensor:
        """Shape checks (no data access, so tracing is unaffected); returns t as [N]."""
        if x_t.dim() != 4 or x_t.shape[1] != self.in_channels:
            raise BdmError(f"x_t must be [N, {self.in_channels}, H, W]; got {list(x_t.shape)}")
        h, w = x_t.shape[2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise BdmError(f"image size {h}x{w} is not a multiple of {self.size_multiple} (one halving per level)")
        n = x_t.shape[0]
        if not isinstance(t, torch.Tensor) or t.dim() > 1 or t.numel() not in (1, n):
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise BdmError(f"t must be an int64 tensor of shape [N] with N={n} (or one timestep); got {shape}")
        return t.reshape(-1).expand(n)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = self._check_inputs(x_t, t)
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        skips = []
        h = x_t
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def binarized_layers(model: nn.Module):
    """(module path, BinarizedLayer) of every binarizable layer, in module order (the official bnn_modules order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BinarizedLayer)]


def build_binarydm(config=None, device=None, mode: str = "static",
                   layer_overrides: Optional[Mapping[str, Mapping]] = None) -> BinaryDMUNet:
    """A BinaryDMUNet in eval mode and `mode` (MODES) from an LDM YAML path / dict (None: the released bedrooms
    network). device="meta" builds the structure without allocating weights."""
    params = unet_params(config)
    with torch.device(device or "cpu"):
        model = BinaryDMUNet(**params, layer_overrides=layer_overrides)
    return set_mode(model.eval(), mode)


def sign_sources(model: nn.Module):
    """The sign planes of every binarized layer (bdm.export.base.sign_zeros): B1 = sign(W) and, for order 2,
    B2 = sign(W - s1*sign(W)). Full-precision layers are left out."""
    found = []
    for name, layer in binarized_layers(model):
        if layer.binarized:
            with torch.no_grad():
                planes = layer.sign_planes()
            path = f"{name}.weight" if name else "weight"
            found += [SignSource(path, basis, plane, layer.weight) for basis, plane in enumerate(planes, 1)]
    return found



# --------------------------------------------------------------------------- divergence localisation
def quantizer_trace(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor):
    """Run `model` once and record, in execution order, one entry per binarized layer and per attention
    quantizer, with the fields of the golden `static_t0_trace`: for quantizing ops the integer codes' numel,
    sum_k, sum_abs_k, n_at_Qn, n_at_Qp; for layers y_sum (float64) and y_absmax. Returns (output, entries)."""
    names = {m: name for name, m in model.named_modules()}
    entries = []

    def code_stats(quantizer, x, dynamic):
        qn, qp = act_range(quantizer.bits)
        codes, _ = quantizer.codes(x, dynamic)
        return {"numel": codes.numel(), "sum_k": int(codes.sum()), "sum_abs_k": int(codes.abs().sum()),
                "n_at_Qn": int((codes == qn).sum()), "n_at_Qp": int((codes == qp).sum())}

    def layer_hook(layer, args, y):
        e = {"op": names[layer], "fn": layer.kind, "precision": layer.precision, "order": layer.order,
             "in_shape": list(args[0].shape), "y_sum": float(y.double().sum()), "y_absmax": float(y.abs().max())}
        if layer.quantizes_input():
            e.update(code_stats(layer.quantizer_a, args[0], layer.mode == "dynamic"))
        entries.append(e)

    def attention_hook(quantizer, args, _):
        e = {"op": names[quantizer], "shape": list(args[0].shape)}
        e.update(code_stats(quantizer, *args))
        entries.append(e)

    handles = [m.register_forward_hook(layer_hook) for _, m in binarized_layers(model)]
    for m in model.modules():
        if isinstance(m, QuantizedQKVAttention) and m.quantizes():
            handles += [q.register_forward_hook(attention_hook) for q in
                        (m.act_quantizer_q, m.act_quantizer_k, m.act_quantizer_w, m.act_quantizer_v)]
    try:
        with torch.no_grad():
            y = model(x_t, t)
    finally:
        for handle in handles:
            handle.remove()
    return y, entries


CODE_FIELDS = ("numel", "sum_k", "sum_abs_k", "n_at_Qn", "n_at_Qp")


def first_trace_divergence(ours: List[dict], reference: List[dict], rtol: float = 1e-5):
    """Index of the first entry whose op or integer code statistics differ, or whose y_absmax / y_sum differ by more
    than rtol relative to the reference (|y_sum| + y_absmax); None when all entries match."""
    for i, (mine, ref) in enumerate(zip(ours, reference)):
        if mine["op"] != ref["op"] or any(mine.get(f) != ref.get(f) for f in CODE_FIELDS):
            return i
        if "y_sum" in ref and (abs(mine["y_absmax"] - ref["y_absmax"]) > rtol * ref["y_absmax"] or
                               abs(mine["y_sum"] - ref["y_sum"]) > rtol * (abs(ref["y_sum"]) + ref["y_absmax"])):
            return i
    return None if len(ours) == len(reference) else min(len(ours), len(reference))
