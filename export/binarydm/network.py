"""The BinaryDM UNet (official openaimodel_ours.UNetModel in its inference configuration) rewritten for deployment.

Same module tree and parameter names as the official code, so official state_dicts load strictly; the layers are
those of binarydm_layers.py (official fp32 arithmetic, modes static / dynamic / w1a32 / fp). Called as
`model(x_t, t)` -> eps, with x_t [N, in_channels, H, W] and t int64 [N].

Which layers are binarized, and with how many bases, is not stored in any checkpoint: the official constructor
derives it from module names, and `official_layer_settings` repeats that rule exactly:
- order 1 for modules whose name contains 'middle', for input_blocks.i with i//3 in {2, 3} and for
  output_blocks.i with 3 - i//3 in {2, 3}; order 2 everywhere else (so input_blocks.0-5, output_blocks.6-11,
  and index 12+ of deeper nets);
- every binarizable layer is 'bnn' except the first three and the last one in module order (time_embed.0,
  time_embed.2, input_blocks.0.0, out.2), which stay full precision (txt2img.py recipe).
`layer_overrides` changes any of it by name.

Reference: ../shared/reference/binarydm/README.md and ARCHITECTURE.md §3-4.
"""

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bdm.errors import BdmError
from bdm.export.binarydm.layers import (ACT_BITS, BNNConv1d, BNNConv2d, BNNLinear, BinarizedLayer,
                                        QuantizedQKVAttention, act_range, set_mode)
from bdm.export.bidiffsr.config import ModelFamily, load_config

UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel_ours.UNetModel"

# model.params.unet_config.params of the official bedrooms.yaml (LDM-4 LSUN-Bedrooms, latent 3x64x64), plus
# act_bits: the official layers build _ActQ() with its default of 8 bits (W1.1A8); a W1.1A4 checkpoint needs
# act_bits: 4 in its config (the checkpoint does not record it).
BINARYDM_RELEASED = {
    "image_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 224,
    "attention_resolutions": [8, 4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 3, 4],
    "num_head_channels": 32,
    "act_bits": 8,
}

# Constructor arguments of the official UNetModel that this rewrite supports, with the official defaults.
_DEFAULTS = {"dropout": 0.0, "conv_resample": True, "num_heads": -1, "num_head_channels": -1,
             "num_heads_upsample": -1, "use_scale_shift_norm": False, "resblock_updown": False, "act_bits": 8}
_REQUIRED = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
             "attention_resolutions", "channel_mult")
# Official arguments without effect at fp32 inference (gradient checkpointing; the head split of the spatial
# transformer, which is refused below).
_IGNORED = ("use_checkpoint", "legacy", "transformer_depth")
# Official arguments whose non-default values select layers this rewrite does not have.
_UNSUPPORTED = {"dims": 2, "num_classes": None, "use_fp16": False, "use_spatial_transformer": False,
                "context_dim": None, "n_embed": None, "use_new_attention_order": False}
GROUP_NORM_GROUPS = 32


# --------------------------------------------------------------------------- config
def _load_mapping(config) -> "tuple[dict, str]":
    config, source = load_config(config, "the LDM YAML of the model (model.params.unet_config)")
    if not isinstance(config, dict):
        raise BdmError(f"{source} is not a mapping; expected an LDM YAML with model.params.unet_config.params")
    return config, source


def _unet_section(config: dict) -> Optional[dict]:
    """The UNet's constructor arguments inside an LDM YAML / its unet_config / a golden unet_*.json / a flat
    params dict; None when `config` is none of these. act_bits of a golden JSON come from its act_quantizer."""
    if isinstance(config.get("model"), dict):
        config = config["model"].get("params") or {}
    if isinstance(config.get("unet_config"), dict):
        config = config["unet_config"]
    if isinstance(config.get("constructor"), dict) and "UNetModel" in str(config.get("official_class", "")):
        params = dict(config["constructor"])
        params.setdefault("act_bits", (config.get("act_quantizer") or {}).get("nbits", _DEFAULTS["act_bits"]))
        return params
    if "target" in config or isinstance(config.get("params"), dict):
        target = str(config.get("target", ""))
        if target and not target.endswith("UNetModel"):
            return None
        config = config.get("params") or {}
    return dict(config) if "model_channels" in config and "attention_resolutions" in config else None


def claims_config(config) -> bool:
    """Whether `config` (path or dict) describes an LDM-style UNet (the BinaryDM family)."""
    try:
        mapping, _ = _load_mapping(config)
    except BdmError:
        return False
    return _unet_section(mapping) is not None


def unet_params(config=None) -> dict:
    """Validated constructor arguments of BinaryDMUNet from an LDM YAML path / dict (model.params.unet_config.params,
    or that section itself, or a golden unet_*.json); None gives the released bedrooms network."""
    if config is None:
        params = copy.deepcopy(BINARYDM_RELEASED)
    else:
        mapping, source = _load_mapping(config)
        params = _unet_section(mapping)
        if params is None:
            raise BdmError(f"{source} has no LDM UNet section; expected model.params.unet_config.params with "
                           f"model_channels, attention_resolutions, ... (target {UNET_TARGET})")
        params = copy.deepcopy(params)

    def fail(what):
        raise BdmError(f"BinaryDM unet_config: {what}")

    missing = [k for k in _REQUIRED if k not in params]
    known = set(_REQUIRED) | set(_DEFAULTS) | set(_IGNORED) | set(_UNSUPPORTED)
    unknown = sorted(k for k in params if k not in known)
    if missing or unknown:
        fail(f"missing keys {missing}, unknown keys {unknown}; the official UNetModel takes {sorted(known)}")
    for key, supported in _UNSUPPORTED.items():
        if key in params and params.pop(key) != supported:
            fail(f"{key} other than {supported!r} is not supported (binarized unconditional 2-D UNets only)")
    for key in _IGNORED:
        params.pop(key, None)
    params = {**_DEFAULTS, **params}
    for key in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks"):
        if not isinstance(params[key], int) or isinstance(params[key], bool) or params[key] < 1:
            fail(f"{key} must be a positive integer, got {params[key]!r}")
    for key in ("attention_resolutions", "channel_mult"):
        if not isinstance(params[key], (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in params[key]):
            fail(f"{key} must be a list of positive integers, got {params[key]!r}")
        params[key] = list(params[key])
    if not params["channel_mult"]:
        fail("channel_mult is empty")
    if params["act_bits"] not in ACT_BITS:
        fail(f"act_bits must be one of {list(ACT_BITS)}, got {params['act_bits']!r}")
    widths = [params["model_channels"] * m for m in params["channel_mult"]]
    if any(w % GROUP_NORM_GROUPS for w in widths):
        fail(f"model_channels * channel_mult = {widths} must be multiples of {GROUP_NORM_GROUPS} (GroupNorm32)")
    if params["num_head_channels"] == -1 and params["num_heads"] == -1:
        fail("either num_heads or num_head_channels has to be set")
    if params["num_head_channels"] != -1 and any(w % params["num_head_channels"] for w in widths):
        fail(f"widths {widths} are not divisible by num_head_channels {params['num_head_channels']}")
    return params


# LDM's DDPM defaults (ldm/models/diffusion/ddpm.py) for the keys of model.params a YAML leaves out.
_LDM_SCHEDULE_DEFAULTS = {"timesteps": 1000, "linear_start": 1e-4, "linear_end": 2e-2}
_PIXEL_FIRST_STAGE = "IdentityFirstStage"
# model.params of the official bedrooms.yaml (the released config's schedule; ARCHITECTURE.md section 3).
_BEDROOMS_SCHEDULE = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195}


def sampling_options(config=None) -> dict:
    """What sampling needs beyond the UNet, from an LDM YAML path / dict (None: the released bedrooms model):
    {"timesteps", "linear_start", "linear_end"} (model.params, LDM's defaults where absent), "image_size" and
    "channels" of x_t (the UNet's), and "space": "pixel", or "latent" when model.params.first_stage_config is a
    real autoencoder (its decoder is not part of the exported UNet). A bare UNet params dict or golden JSON names no
    first stage and counts as pixel space. beta_schedule other than linear and parameterization other than eps
    are refused."""
    unet = unet_params(config)
    model_params = dict(_BEDROOMS_SCHEDULE) if config is None else {}
    space = "latent" if config is None else "pixel"
    if config is not None:
        mapping, source = _load_mapping(config)
        if isinstance(mapping.get("model"), dict):
            model_params = mapping["model"].get("params") or {}
            first_stage = model_params.get("first_stage_config")
            target = first_stage.get("target", "") if isinstance(first_stage, dict) else str(first_stage or "")
            if target and not target.endswith(_PIXEL_FIRST_STAGE):
                space = "latent"
        for key, supported in (("beta_schedule", "linear"), ("parameterization", "eps")):
            if model_params.get(key, supported) != supported:
                raise BdmError(f"{source}: model.params.{key} {model_params[key]!r} is not supported; bdm samples "
                               f"{supported!r} models (LDM's DDIMSampler, linear betas, eps prediction)")
    options = {key: model_params.get(key, default) for key, default in _LDM_SCHEDULE_DEFAULTS.items()}
    return {**options, "image_size": unet["image_size"], "channels": unet["in_channels"], "space": space}


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
            self.conv = BNNConv2d(channels, channels, 3, padding=1, act_bits=act_bits)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    """Binarized 3x3 stride-2 conv (conv_resample), or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, act_bits):
        super().__init__()
        self.op = (BNNConv2d(channels, channels, 3, stride=2, padding=1, act_bits=act_bits) if use_conv
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
                                       BNNConv2d(channels, out_channels, 3, padding=1, act_bits=act_bits))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, act_bits), Upsample(channels, False, act_bits)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, act_bits), Downsample(channels, False, act_bits)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), BNNLinear(emb_channels, emb_out, act_bits=act_bits))
        # index 2 is the official Dropout, the identity at inference
        self.out_layers = nn.Sequential(nn.GroupNorm(GROUP_NORM_GROUPS, out_channels), nn.SiLU(), nn.Identity(),
                                        BNNConv2d(out_channels, out_channels, 3, padding=1, act_bits=act_bits))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else BNNConv2d(channels, out_channels, 1, act_bits=act_bits))

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
        self.qkv = BNNConv1d(channels, channels * 3, 1, act_bits=act_bits)
        self.attention = QuantizedQKVAttention(num_heads, act_bits=act_bits)
        self.proj_out = BNNConv1d(channels, channels, 1, act_bits=act_bits)

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
    (openaimodel_ours.py UNetModel.__init__, then the txt2img.py recipe: all 'bnn' except bnn_modules[0, 1, 2, -1])."""
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
        self.time_embed = nn.Sequential(BNNLinear(model_channels, time_embed_dim, act_bits=act_bits), nn.SiLU(),
                                        BNNLinear(time_embed_dim, time_embed_dim, act_bits=act_bits))

        def res_block(channels, out, **updown):
            return ResBlock(channels, time_embed_dim, out, act_bits, use_scale_shift_norm, **updown)

        def attention(channels, heads):
            return AttentionBlock(channels, _attention_heads(channels, heads, num_head_channels), act_bits)

        def resample(channels, up):
            if resblock_updown:
                return res_block(channels, channels, up=up, down=not up)
            return Upsample(channels, conv_resample, act_bits) if up else Downsample(channels, conv_resample, act_bits)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            BNNConv2d(in_channels, model_channels, 3, padding=1, act_bits=act_bits))])
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
                                 BNNConv2d(model_channels, out_channels, 3, padding=1, act_bits=act_bits))
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


# --------------------------------------------------------------------------- checkpoints
EMA_PREFIX = "model_ema.diffusion_model"
STUDENT_PREFIX = "model.diffusion_model."


def unet_state_dict(state: Mapping[str, torch.Tensor], model_keys) -> Dict[str, torch.Tensor]:
    """The UNet state_dict inside a Lightning `state_dict` (or a plain UNet state_dict, returned as is).

    Student keys are `model.diffusion_model.<key>`; the EMA copy (LitEma) stores `model_ema.diffusion_model<key
    without dots>` and wins where present, as the official sampling runs inside `ema_scope()`. The FP teacher
    `model2.*`, `first_stage_model.*`, schedule buffers and LitEma's decay/num_updates are ignored."""
    if not any(k.startswith((STUDENT_PREFIX, EMA_PREFIX)) for k in state):
        return dict(state)
    unet = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    undotted = {}
    for key in model_keys:
        flat = key.replace(".", "")
        if flat in undotted:
            raise BdmError(f"EMA names are ambiguous for this UNet ({undotted[flat]!r} and {key!r} both flatten "
                           f"to {flat!r}); load the student weights (drop the model_ema.* keys)")
        undotted[flat] = key
    for k, v in state.items():
        if k.startswith(EMA_PREFIX) and k[len(EMA_PREFIX):] in undotted:
            unet[undotted[k[len(EMA_PREFIX):]]] = v
    return unet


def claims_keys(keys) -> bool:
    """A BinaryDM UNet state_dict (plain or Lightning): binarized layers' scaling_first_order and the UNet's
    time_embed / input_blocks / middle_block names."""
    keys = set(keys)
    plain = any(k.endswith("scaling_first_order") for k in keys) and "time_embed.0.weight" in keys \
        and any(k.startswith("middle_block.") for k in keys)
    lightning = any(k.startswith(STUDENT_PREFIX + "time_embed.0.") or k.startswith(EMA_PREFIX + "time_embed0")
                    for k in keys)
    return plain or lightning


def zero_sign_weights(model: nn.Module):
    """(module path with basis, tensor) whose exact zeros become sign 0 in a binarized layer: the latent weight
    (B1 = sign(W)) and, for order 2, the residual W - s1*sign(W) (B2). Full-precision layers are left out."""
    found = []
    for name, layer in binarized_layers(model):
        if not layer.binarized:
            continue
        with torch.no_grad():
            planes = layer.sign_planes()
        found.append((f"{name}.weight", planes[0]))
        if layer.order == 2:
            found.append((f"{name}.weight (second basis: W - s1*sign(W))", planes[1]))
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


FAMILY = ModelFamily(name="binarydm", build=build_binarydm, claims_config=claims_config, claims_keys=claims_keys,
                     binarized_weights=zero_sign_weights, container_keys=("state_dict",),
                     select_state=unet_state_dict,
                     config_hint="pass --config <the LDM YAML (model.params.unet_config)>, with act_bits: 4 "
                                 "for a W1A4 model")
