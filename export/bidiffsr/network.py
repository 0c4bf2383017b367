"""The BI-DiffSR network (official `BIDiffSRUNet`, unet_BI_DiffSR_arch.py) rewritten for deployment, with the official
module tree and parameter names (official checkpoints load strictly); `BIDiffSRUNet` documents what differs.
Reference: ../shared/reference/bi_diffsr/ARCHITECTURE.md §3.
"""

import math
from typing import List, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bdm.errors import BdmError
from bdm.export.base.sign_zeros import SignSource
from bdm.export.bidiffsr.config import MODES, bidiffsr_kwargs, bidiffsr_network_g


def timestep_group(t: torch.Tensor, num_groups: int, total_steps: int) -> torch.Tensor:
    """Group index of the spec's group_rule, g = clamp(t[0]*K div T, 0, K-1), as an int64 0-d tensor.
    Only the first sample's t selects the group for the whole batch, as in the official forward."""
    t0 = t.reshape(-1)[0].to(torch.int64)
    return torch.clamp(torch.div(t0 * num_groups, total_steps, rounding_mode="floor"), 0, num_groups - 1)


class _ApproxSignSTE(torch.autograd.Function):
    """sign(x) forward (sign(0) = 0); backward the derivative of the official ApproxSign polynomial
    (-1; x^2 + 2x; -x^2 + 2x; 1), i.e. max(0, 2 - 2|x|). The official `sign.detach() - p.detach() + p` has this
    forward value exactly (ARCHITECTURE.md 3.1) and this gradient, without keeping p's intermediates."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * x.abs()).clamp_min(0.0)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class ChannelBias(nn.Module):
    """Per-channel bias [1,C,1,1] (official LearnableBias: TaR threshold, TaA biases). A parameter holder: BIConv
    selects the group's row from the stacked table."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))


class RPReLU(nn.Module):
    """PReLU_a(x + b0) + b1, per channel; parameter holder like ChannelBias."""

    def __init__(self, channels: int):
        super().__init__()
        self.pr_bias0 = ChannelBias(channels)
        self.pr_prelu = nn.PReLU(channels, init=0.25)
        self.pr_bias1 = ChannelBias(channels)


class ScaledSignConv(nn.Module):
    """The binary conv of a BIConv (official HardBinaryConv): latent fp32 weights [Cout,Cin,k,k], no bias, stride 1,
    applied as alpha * sign(W) to its input, which is already the sign map, padded by k//2 with zeros."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's init; checkpoints overwrite it
        self.mode = "deploy"

    def alpha(self) -> torch.Tensor:
        """Per-output-channel mean|W| [Cout] (flat mean: the deployment scale)."""
        return self.weight.abs().mean(dim=(1, 2, 3))

    def forward(self, sign_map: torch.Tensor) -> torch.Tensor:
        w = self.weight
        padding = w.shape[-1] // 2
        if self.mode == "official":
            alpha = w.abs().mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)
            clipped = w.clamp(-1.0, 1.0)
            w_eff = ((alpha * torch.sign(w)).detach() - clipped.detach()) + clipped  # official STE
            return F.conv2d(sign_map, w_eff, padding=padding)
        # sums of +-1 and 0 are exact in fp32 (|dot| <= k*k*Cin < 2**24): one rounding, in the alpha product
        dot = F.conv2d(sign_map, torch.sign(w), padding=padding)
        return dot * self.alpha().reshape(1, -1, 1, 1)


class BIConv(nn.Module):
    """Binary conv unit with timestep-aware threshold (TaR) and activation (TaA):

        y = PReLU_{a_g}( conv(sign(x + beta_g), alpha*sign(W), zero padding of the sign map) + b0_g ) + b1_g + x

    with g = timestep_group(t). Contract used by the exporter: attributes in_channels, out_channels, kernel_size,
    num_groups, total_steps; TaR / binary_conv / TaA as in the official state_dict; group_tables(); alpha().
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_groups: int, total_steps: int):
        super().__init__()
        if in_channels != out_channels:
            raise ValueError("BIConv adds its input: in_channels must equal out_channels")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.num_groups, self.total_steps = num_groups, total_steps
        self.TaR = nn.ModuleDict({f"dynamic_move_{g}": ChannelBias(in_channels) for g in range(num_groups)})
        self.binary_conv = ScaledSignConv(in_channels, out_channels, kernel_size)
        self.TaA = nn.ModuleDict({f"dynamic_relu_{g}": RPReLU(out_channels) for g in range(num_groups)})

    def _table(self, name: str) -> torch.Tensor:
        """The [K, C] table `name` (threshold, bias0, slope, bias1) of the K groups, stacked from the official
        per-group modules (inside the autograd graph; group_tables() is the detached copy)."""
        groups = range(self.num_groups)
        if name == "threshold":
            rows = [self.TaR[f"dynamic_move_{g}"].bias for g in groups]
        else:
            taa = [self.TaA[f"dynamic_relu_{g}"] for g in groups]
            rows = {"bias0": [m.pr_bias0.bias for m in taa], "slope": [m.pr_prelu.weight for m in taa],
                    "bias1": [m.pr_bias1.bias for m in taa]}[name]
        return torch.stack([r.reshape(-1) for r in rows])

    def _row(self, name: str, group: torch.Tensor) -> torch.Tensor:
        """Row `group` (int64 0-d tensor) of table `name`, as [1, C, 1, 1]: a Gather, so traces keep it dynamic."""
        return self._table(name).index_select(0, group.reshape(1)).reshape(1, -1, 1, 1)

    def group_tables(self) -> dict:
        """float32 tables: threshold [K,Cin], bias0 [K,Cout], slope [K,Cout], bias1 [K,Cout]."""
        return {name: self._table(name).detach().float() for name in ("threshold", "bias0", "slope", "bias1")}

    def alpha(self) -> torch.Tensor:
        """[Cout] float32, mean|W| per output channel."""
        return self.binary_conv.alpha().detach().float()

    def sign_input(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """sign(x + beta_g), with sign(0) = 0 (torch.sign); the official STE's gradient in official arithmetic."""
        shifted = x + self._row("threshold", group)
        if self.binary_conv.mode == "official" and torch.is_grad_enabled():
            return _ApproxSignSTE.apply(shifted)
        return torch.sign(shifted)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        group = timestep_group(t, self.num_groups, self.total_steps)
        conv = self.binary_conv(self.sign_input(x, group))
        activated = F.prelu(conv + self._row("bias0", group), self._row("slope", group).reshape(-1))
        return activated + self._row("bias1", group) + x


def _apply(layer: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Binary units take the timestep (their group); full-precision convs do not."""
    return layer(x, t) if isinstance(layer, BIConv) else layer(x)


class NormSwishConv(nn.Module):
    """GroupNorm -> Swish -> Dropout -> conv (BIConv 3x3, or FP Conv2d 3x3 with bias); official Block."""

    def __init__(self, channels: int, norm_groups: int, dropout: float, conv: nn.Module):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(norm_groups, channels), Swish(),
                                   nn.Dropout(dropout) if dropout else nn.Identity())
        self.conv = conv

    def forward(self, x, t):
        return _apply(self.conv, self.block(x), t)


class ResBlock(nn.Module):
    """The official BI_ResnetBlock (binary=True) or its FP twin ResnetBlock: square, C -> C.
    h = block1(x); h += Linear(Swish(temb)); h = block2(h) (dropout here); out = h + x."""

    def __init__(self, channels: int, time_dim: int, norm_groups: int, dropout: float, binary: bool,
                 num_groups: int, total_steps: int):
        super().__init__()

        def conv():
            if binary:
                return BIConv(channels, channels, 3, num_groups, total_steps)
            return nn.Conv2d(channels, channels, 3, padding=1)

        self.timestep_func = nn.Sequential(Swish(), nn.Linear(time_dim, channels))
        self.block1 = NormSwishConv(channels, norm_groups, 0.0, conv())
        self.block2 = NormSwishConv(channels, norm_groups, dropout, conv())

    def forward(self, x, temb, t):
        h = self.block1(x, t)
        h = h + self.timestep_func(temb)[:, :, None, None]
        h = self.block2(h, t)
        return h + x


class SelfAttention(nn.Module):
    """Single-head spatial self-attention, FP: out = Conv1x1(v softmax(q^T k / sqrt(C))^T) + x, with q, k, v
    the channel thirds of Conv1x1(GN(x)). Written as reshape + matmul (the official code uses 6-D einsum)."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)
        self.score_divisor = math.sqrt(channels)
        self.mode = "deploy"

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3 * c, h * w).chunk(3, dim=1)  # each [N, C, HW]
        scores = torch.matmul(q.transpose(1, 2), k) / self.score_divisor  # [N, HW query, HW key]
        weights = torch.softmax(scores, dim=-1)
        if self.mode == "official":
            # The official einsum flattens the key dims (y, x) as (x, y) for its bmm: same products, another
            # summation order. Reorder the keys the same way (costs a transpose of the HW x HW matrix).
            weights = weights.reshape(n, h * w, h, w).transpose(2, 3).reshape(n, h * w, h * w)
            v = v.reshape(n, c, h, w).transpose(2, 3).reshape(n, c, h * w)
        attended = torch.matmul(v, weights.transpose(1, 2))  # [N, C, HW query]
        return self.out(attended.reshape(n, c, h, w)) + x


class ResBlockWithAttention(nn.Module):
    """A ResBlock, then (where the config asks for it) self-attention (official ResnetBlocWithAttn)."""

    def __init__(self, res_block: ResBlock, attn: "SelfAttention | None"):
        super().__init__()
        self.res_block = res_block
        if attn is not None:
            self.attn = attn

    def forward(self, x, temb, t):
        x = self.res_block(x, temb, t)
        return self.attn(x) if hasattr(self, "attn") else x


class CPDown(nn.Module):
    """C -> 2C, resolution halved: PixelUnshuffle2(BIConv1(x[:, :C/2]) + BIConv2(x[:, C/2:]))."""

    def __init__(self, channels: int, num_groups: int, total_steps: int):
        super().__init__()
        half = channels // 2
        self.biconv1 = BIConv(half, half, 3, num_groups, total_steps)
        self.biconv2 = BIConv(half, half, 3, num_groups, total_steps)

    def forward(self, x, t):
        half = x.shape[1] // 2
        return F.pixel_unshuffle(self.biconv1(x[:, :half], t) + self.biconv2(x[:, half:], t), 2)


class CPUp(nn.Module):
    """C -> C/2, resolution doubled: PixelShuffle2(cat[BIConv1(x), BIConv2(x)])."""

    def __init__(self, channels: int, num_groups: int, total_steps: int):
        super().__init__()
        self.biconv1 = BIConv(channels, channels, 3, num_groups, total_steps)
        self.biconv2 = BIConv(channels, channels, 3, num_groups, total_steps)

    def forward(self, x, t):
        return F.pixel_shuffle(torch.cat([self.biconv1(x, t), self.biconv2(x, t)], dim=1), 2)


class CSFusion(nn.Module):
    """CS_Fusion (binary 1x1 BIConvs) or CS_Fusion_FP (Conv2d 1x1 with bias), 2C -> C, on x = cat(decoder, skip):
    y = conv_1(cat(dec[:, 1::2], skip[:, 0::2])) + conv_2(cat(dec[:, 0::2], skip[:, 1::2]))."""

    def __init__(self, channels: int, binary: bool, num_groups: int, total_steps: int):
        super().__init__()

        def conv():
            if binary:
                return BIConv(channels, channels, 1, num_groups, total_steps)
            return nn.Conv2d(channels, channels, 1)

        self.biconv_1 = conv()
        self.biconv_2 = conv()

    def forward(self, x, t):
        c = x.shape[1] // 2
        decoder, skip = x[:, :c], x[:, c:]
        fused_1 = torch.cat([decoder[:, 1::2], skip[:, 0::2]], dim=1)
        fused_2 = torch.cat([decoder[:, 0::2], skip[:, 1::2]], dim=1)
        return _apply(self.biconv_1, fused_1, t) + _apply(self.biconv_2, fused_2, t)


class PositionalEncoding(nn.Module):
    """WaveGrad embedding of the raw timestep: [sin(t f_k), cos(t f_k)], f_k = exp(-ln(1e4) k / (C/2))."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        count = self.dim // 2
        step = torch.arange(count, dtype=torch.float32, device=t.device) / count
        encoding = t.to(torch.float32).unsqueeze(1) * torch.exp(-math.log(1e4) * step.unsqueeze(0))
        return torch.cat([torch.sin(encoding), torch.cos(encoding)], dim=-1)


class FinalBlock(nn.Module):
    """GroupNorm -> Swish -> (Identity) -> Conv3x3 with bias, FP (official Block_F: keys block.0 and block.3)."""

    def __init__(self, channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(norm_groups, channels), Swish(), nn.Identity(),
                                   nn.Conv2d(channels, out_channels, 3, padding=1))

    def forward(self, x):
        return self.block(x)


class BIDiffSRUNet(nn.Module):
    """model(x_t, cond, t) -> predicted noise eps [N, out_channel, H, W].

    What differs from the official code: the timestep group g = clamp(t[0]*K div T, 0, K-1) is computed with
    tensor ops and the TaR/TaA parameters are selected with `index_select`, so one trace (TorchScript / ONNX)
    serves every timestep; inference arithmetic only (sign(x) activations: the official STE has the same forward
    value; no train-time straight-through terms unless `set_mode(model, "official")` asks for them, config.MODES);
    self-attention as reshape + matmul instead of 6-D einsum (TensorRT-friendly).

    x_t: noisy image [N, out_channel, H, W]; cond: bicubic-upsampled LR in [0, 1], [N, in_channel-out_channel, H, W];
    H, W multiples of 2**(len(channel_mults)-1) (8 for the released config); t: int64 [N] or [N, 1] (a single
    timestep [1] / [1, 1] is broadcast over the batch, as in the official test()). The timestep group comes from
    t[0]; the time embedding is per sample. Arguments are the official network_g keys.
    """

    def __init__(self, in_channel, out_channel, inner_channel, norm_groups, channel_mults, attn_res, res_blocks,
                 dropout, image_size, fp_res, total_step, dynamic_group):
        super().__init__()
        self.in_channel, self.out_channel = in_channel, out_channel
        self.size_multiple = 2 ** (len(channel_mults) - 1)
        steps = dict(num_groups=dynamic_group, total_steps=total_step)
        time_dim = inner_channel

        def res_block(channels, binary, with_attn):
            block = ResBlock(channels, time_dim, norm_groups, dropout, binary, **steps)
            return ResBlockWithAttention(block, SelfAttention(channels, norm_groups) if with_attn else None)

        self.timestep_level_mlp = nn.Sequential(PositionalEncoding(inner_channel),
                                                nn.Linear(inner_channel, inner_channel * 4), Swish(),
                                                nn.Linear(inner_channel * 4, inner_channel))
        # Encoder: every layer's output is a skip feature. Resolutions are the virtual ones of image_size.
        downs = [nn.Conv2d(in_channel, inner_channel, 3, padding=1)]
        channels, res = inner_channel, image_size
        for level in range(len(channel_mults)):
            for _ in range(res_blocks):
                downs.append(res_block(channels, True, res in attn_res))
            if level < len(channel_mults) - 1:
                downs.append(CPDown(channels, **steps))
                channels, res = channels * 2, res // 2
        self.downs = nn.ModuleList(downs)
        self.mid = nn.ModuleList([res_block(channels, True, True), res_block(channels, True, False)])
        # Decoder: stages whose virtual resolution is in fp_res are full precision; CP-Up is always binary.
        ups = []
        for level in reversed(range(len(channel_mults))):
            binary = res not in fp_res
            for _ in range(res_blocks + 1):
                ups.append(CSFusion(channels, binary, **steps))
                ups.append(res_block(channels, binary, res in attn_res))
            if level > 0:
                ups.append(CPUp(channels, **steps))
                channels, res = channels // 2, res * 2
        self.ups = nn.ModuleList(ups)
        self.final_conv = FinalBlock(channels, out_channel, norm_groups)

    def _check_inputs(self, x_t, cond, t) -> torch.Tensor:
        """Shape checks (no data access, so tracing is unaffected); returns t as [N] or [1]."""
        if x_t.dim() != 4 or cond.dim() != 4 or x_t.shape[0] != cond.shape[0] or x_t.shape[2:] != cond.shape[2:]:
            raise BdmError(f"x_t and cond must be [N,C,H,W] of the same N, H, W; got {list(x_t.shape)} and "
                           f"{list(cond.shape)}")
        if x_t.shape[1] != self.out_channel or x_t.shape[1] + cond.shape[1] != self.in_channel:
            raise BdmError(f"x_t must have {self.out_channel} channels and cond {self.in_channel - self.out_channel}; "
                           f"got {x_t.shape[1]} and {cond.shape[1]}")
        h, w = x_t.shape[2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise BdmError(f"image size {h}x{w} is not a multiple of {self.size_multiple}; pad it first "
                           f"(the sampler reflect-pads right and bottom)")
        n = x_t.shape[0]
        if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[1] != 1) \
                or t.shape[0] not in (1, n):
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise BdmError(f"t must be an int64 tensor of shape [N] or [N,1] with N={n} (or 1); got {shape}")
        return t.reshape(-1)

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # A tracer (jit / ONNX export) gets its inputs from code, not users; checking would only add warnings.
        t = t.reshape(-1) if torch.jit.is_tracing() else self._check_inputs(x_t, cond, t)
        temb = self.timestep_level_mlp(t)
        h = torch.cat([cond, x_t], dim=1)
        skips = []
        for layer in self.downs:
            if isinstance(layer, ResBlockWithAttention):
                h = layer(h, temb, t)
            elif isinstance(layer, CPDown):
                h = layer(h, t)
            else:
                h = layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, temb, t)
        for layer in self.ups:
            if isinstance(layer, CSFusion):
                h = layer(torch.cat([h, skips.pop()], dim=1), t)
            elif isinstance(layer, ResBlockWithAttention):
                h = layer(h, temb, t)
            else:
                h = layer(h, t)
        return self.final_conv(h)


def biconvs(model: nn.Module):
    """(module path, BIConv) in execution order (module registration order is the execution order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BIConv)]


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch the model between "deploy" (default) and "official" arithmetic (config.MODES)."""
    if mode not in MODES:
        raise BdmError(f"mode {mode!r} is unknown; choose one of {list(MODES)}")
    for m in model.modules():
        if isinstance(m, (ScaledSignConv, SelfAttention)):
            m.mode = mode
    return model


def build_bidiffsr(config=None, device=None) -> BIDiffSRUNet:
    """A BIDiffSRUNet in eval mode from an options YAML path / network_g dict (None: the released network).
    device="meta" builds the structure without allocating weights."""
    with torch.device(device or "cpu"):
        model = BIDiffSRUNet(**bidiffsr_kwargs(bidiffsr_network_g(config)))
    return model.eval()


class SignCounts(NamedTuple):
    module: str
    group: int
    act_pos: int
    act_neg: int
    act_zero: int


def sign_trace(model: nn.Module, x_t, cond, t) -> "tuple[torch.Tensor, List[SignCounts]]":
    """Run the model once and record, for every BIConv in execution order, the counts of +1 / -1 / 0 in its
    sign map (same fields as the golden `traces` of net_golden.json). Returns (output, rows)."""
    rows = []

    def record(name):
        def hook(module, args):
            x, tm = args
            group = timestep_group(tm, module.num_groups, module.total_steps)
            s = module.sign_input(x, group)
            rows.append(SignCounts(name, int(group), int((s > 0).sum()), int((s < 0).sum()), int((s == 0).sum())))
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in biconvs(model)]
    try:
        with torch.no_grad():
            y = model(x_t, cond, t)
    finally:
        for handle in handles:
            handle.remove()
    return y, rows


def first_sign_divergence(ours: List[SignCounts], reference: List[dict]):
    """The first BIConv whose sign counts differ from a golden trace (list of dicts with the same fields), as
    (index, ours, reference); None when every count matches. A differing module order is a divergence too."""
    if len(ours) != len(reference):
        return (min(len(ours), len(reference)), None, None)
    for i, (row, ref) in enumerate(zip(ours, reference)):
        if any(getattr(row, f) != ref[f] for f in SignCounts._fields):
            return (i, row, ref)
    return None


def sign_sources(model: nn.Module):
    """The sign plane sign(W) of every BIConv (bdm.export.base.sign_zeros)."""
    return [SignSource(f"{path}.binary_conv.weight", 1, torch.sign(m.binary_conv.weight.detach()), m.binary_conv.weight)
            for path, m in biconvs(model)]
