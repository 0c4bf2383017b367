"""`bdm export` of a BinaryDM network: one ONNX file, `x_t` [N, C, H, W] float32, `t` [N] int64 -> `eps`, N, H and
W dynamic, with one `bdm::MultiBasisConv` node per binarized layer (a `PackedMultiBasisLayer` for the duration of the
trace) and the attention's quantizers as standard ops, in one of config.MODES (recorded as metadata bdm.act_mode)."""

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import torch
from torch import nn

from bdm.contract import (BINARYDM, DEFAULT_OPSET, FORMAT_VERSION, OUTPUT_NAME, UNCONDITIONAL_INPUT_NAMES,
                          ZERO_SIGN_TEXT, ModelMetadata)
from bdm.errors import BdmError
from bdm.export.base import functions
from bdm.export.base.family import ExportOptions
from bdm.export.base.multibasis_functions import act_quantize
from bdm.export.base.onnx_graph import (check_no_binarized_weights, check_options, finish_model, swapped_modules,
                                        trace, write_validated)
from bdm.export.base.sign_zeros import refuse_sign_zeros, resolve_sign_zeros
from bdm.export.binarydm.config import MODES, sampling_options, unet_params
from bdm.export.binarydm.layers import (ActQuantizer, BinarizedLayer, QuantizedQKVAttention, act_range, dynamic_step,
                                        effective_step, set_mode)
from bdm.export.binarydm.network import BinaryDMUNet, binarized_layers, sign_sources
from bdm.files import file_sha256
from bdm.plugins.multibasis_reference import multibasis_conv

OP_TYPE = "MultiBasisConv"
SPATIAL_DIMS = {"linear": 0, "conv1d": 1, "conv2d": 2}
# Trace shape: any multiple of the UNet's size multiple works (N, H, W are dynamic); batch 2 so no dimension is 1.
_TRACE_BATCH = 2


# --- the TorchScript side of the standard-op builders ----------------------------------------------------------

class TorchGraphBuilder:
    """The `op` / `const` interface of the function-body builders over a TorchScript graph (inside a symbolic), so
    the exported attention quantizers come from the same code as the MultiBasisConv body's."""

    _SUFFIX = {int: "i", float: "f", str: "s"}

    def __init__(self, graph):
        self.graph = graph

    def op(self, op_type: str, *inputs, **attributes):
        named = {}
        for key, value in attributes.items():
            sample = value[0] if isinstance(value, (list, tuple)) else value
            named[f"{key}_{self._SUFFIX[type(sample)]}"] = value
        return self.graph.op(op_type, *inputs, **named)

    def const(self, value, dtype):
        return self.graph.op("Constant", value_t=torch.from_numpy(np.array(value, dtype=dtype)))


class _ActQuantize(torch.autograd.Function):
    """One attention quantizer: forward = the PyTorch quantizer, symbolic = multibasis_functions.act_quantize."""

    @staticmethod
    def forward(ctx, x, step, bits):
        qn, qp = act_range(bits)
        effective = effective_step(step, x.numel(), qp)
        return torch.round(torch.clamp(x / effective, qn, qp)) * effective

    @staticmethod
    def symbolic(g, x, step, bits):
        builder = TorchGraphBuilder(g)
        qn, qp = act_range(bits)
        y = act_quantize(builder, x, step, builder.const(float(qn), np.float32), builder.const(float(qp), np.float32))
        return y.setType(x.type())


class _MultiBasisConv(torch.autograd.Function):
    """One `bdm::MultiBasisConv` node: forward = the NumPy reference of the spec, symbolic = the node with every
    attribute written out plus the TensorRT plugin selectors. apply(x, weight, scale, bias, act_step, attributes)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, act_step, attributes):
        arrays = [t.detach().cpu().numpy() for t in (x, weight, scale, bias, act_step)]
        return torch.from_numpy(multibasis_conv(*arrays, **attributes))

    @staticmethod
    def symbolic(g, x, weight, scale, bias, act_step, attributes):
        node_attributes = functions.node_attributes(OP_TYPE, attributes)
        named = {f"{k}_{'s' if isinstance(v, str) else 'i'}": v for k, v in node_attributes.items()}
        y = g.op(f"{functions.DOMAIN}::{OP_TYPE}", x, weight, scale, bias, act_step, **named)
        sizes = [None, attributes["out_channels"]] + [None] * attributes["spatial_dims"]
        return y.setType(x.type().with_sizes(sizes))


def _step(quantizer_alpha: torch.Tensor, x: torch.Tensor, bits: int, dynamic: bool) -> torch.Tensor:
    """The step fed to a quantizer: the stored alpha, or (dynamic) 2*mean|x|/sqrt(Qp) traced as standard ops."""
    return dynamic_step(x, act_range(bits)[1]) if dynamic else quantizer_alpha


class PackedMultiBasisLayer(nn.Module):
    """What a binarized layer (BinarizedConv2d, BinarizedConv1d, BinarizedLinear) becomes in the exported graph: one
    MultiBasisConv node reading the packed sign bases, scales, bias and step (buffers under `packed.`, named after the
    spec's inputs)."""

    def __init__(self, layer: BinarizedLayer, act_bits: int, dynamic: bool):
        super().__init__()
        view = layer.export_view()
        self.attributes = dict(in_channels=layer.in_channels, out_channels=layer.out_channels, num_bases=view.order,
                               spatial_dims=SPATIAL_DIMS[view.kind],
                               kernel_size=view.weight_shape[2] if len(view.weight_shape) > 2 else 1,
                               stride=view.stride, padding=view.padding, act_bits=act_bits)
        self.dynamic = dynamic and act_bits > 0
        self.packed = nn.Module()
        self.packed.register_buffer("weight", view.packed_signs)
        self.packed.register_buffer("scale", view.scales)
        self.packed.register_buffer("bias", view.bias)
        self.packed.register_buffer("act_step", view.act_step)

    def forward(self, x):
        p = self.packed
        step = _step(p.act_step, x, self.attributes["act_bits"], self.dynamic)
        return _MultiBasisConv.apply(x, p.weight, p.scale, p.bias, step, self.attributes)


class ExportActQuantizer(nn.Module):
    """An attention quantizer in the exported graph (standard ops)."""

    def __init__(self, quantizer: ActQuantizer):
        super().__init__()
        self.bits = quantizer.bits
        self.register_buffer("alpha", quantizer.alpha.detach().float().clone())

    def forward(self, x, dynamic: bool = False):
        return _ActQuantize.apply(x, _step(self.alpha, x, self.bits, dynamic), self.bits)


# --- export ------------------------------------------------------------------------------------------------------

def _swap(mode: str):
    """replace(path, module) for swapped_modules: binarized layers and (quantizing modes) attention quantizers.

    static: the stored alpha of every quantizer is an initializer fed to the node (the deployment default).
    dynamic: the step 2*mean|x|/sqrt(Qp) is computed in the graph (ReduceMean(Abs(x)) over the whole tensor, batch
    included) before every quantizer, as the official training code runs. w1a32: packed weights, act_bits 0. fp:
    nothing is swapped (latent weights in plain Conv/Gemm: a parity reference, not a deployment). The attention's
    quantizers are Clip, QuantizeLinear, DequantizeLinear, built by the function body's own act_quantize."""
    dynamic = mode == "dynamic"
    quantizing = mode in ("static", "dynamic")
    attention_quantizers = set()

    def replace(path, module):
        if isinstance(module, BinarizedLayer) and module.binarized:
            bits = module.act_bits if quantizing and module.act_bits is not None else 0
            return PackedMultiBasisLayer(module, bits, dynamic)
        if isinstance(module, QuantizedQKVAttention) and module.quantizes():
            attention_quantizers.update(f"{path}.{n}" for n, _ in module.named_children())
        elif path in attention_quantizers:
            return ExportActQuantizer(module)
        return None

    return replace


def _check_arguments(mode: str, opset: int):
    if mode not in MODES:
        raise BdmError(f"--mode {mode} is not a BinaryDM mode; choose one of {list(MODES)}")
    check_options("fp32", opset)


def _binarized_weights(model: nn.Module):
    """check_no_binarized_weights' layers of a BinaryDM network: each binarized layer's W, with its sign bases and
    W_hat."""
    for path, layer in binarized_layers(model):
        if layer.binarized:
            yield path, layer.weight, lambda layer=layer: [*layer.sign_planes(), layer.binarized_weight()]


def _traced_in_mode(root: nn.Module, mode: str, opset: int, examples, input_names, output_name,
                    dynamic_axes) -> onnx.ModelProto:
    """`root` traced in `mode`, its binarized layers (and attention quantizers) swapped for the export's modules and
    its own modes restored afterwards; unless mode is fp (latent weights by design), checked to hold no binarized
    weight."""
    previous_modes = {m: m.mode for m in root.modules() if hasattr(m, "mode")}
    set_mode(root, mode)
    try:
        with swapped_modules(root, _swap(mode) if mode != "fp" else lambda path, module: None):
            onnx_model = trace(root, examples, input_names, output_name, dynamic_axes, opset)
    finally:
        for module, previous in previous_modes.items():
            module.mode = previous
    if mode != "fp":
        check_no_binarized_weights(onnx_model, _binarized_weights(root), "binarized layer")
    return onnx_model


def to_onnx(model: BinaryDMUNet, mode: str = "static", opset: int = DEFAULT_OPSET,
            metadata: Optional[ModelMetadata] = None) -> onnx.ModelProto:
    """The ONNX model of a BinaryDM UNet in `mode` (the network itself is left as it was). Sign-0 weights raise
    BdmError unless resolve_sign_zeros ran first; `metadata`: what the caller records beyond the export's own."""
    if not isinstance(model, BinaryDMUNet):
        raise BdmError(f"the BinaryDM exporter handles BinaryDM UNets; got a {type(model).__name__}")
    _check_arguments(mode, opset)
    refuse_sign_zeros(sign_sources, model, "the network")
    size = 2 * model.size_multiple
    x_t = torch.randn(_TRACE_BATCH, model.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 10][:_TRACE_BATCH], dtype=torch.int64)
    spatial = {0: "N", 2: "H", 3: "W"}
    axes = {"x_t": spatial, "t": {0: "N"}, OUTPUT_NAME: spatial}
    onnx_model = _traced_in_mode(model, mode, opset, (x_t, t), UNCONDITIONAL_INPUT_NAMES, OUTPUT_NAME, axes)
    binarized = [layer for _, layer in binarized_layers(model) if layer.binarized]
    recorded = dataclasses.replace(metadata or ModelMetadata(), format=FORMAT_VERSION, family=BINARYDM, dtype="fp32",
                                   act_mode=mode, binarized_layers=len(binarized),
                                   binarized_params=sum(layer.weight.numel() for layer in binarized))
    return finish_model(onnx_model, recorded)


class _Root(nn.Module):
    """A parent for a module exported alone, so that the module itself can be swapped."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs):
        return self.module(*inputs)


def layer_to_onnx(module: nn.Module, mode: str, examples, input_names=("x",),
                  opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """One binarized layer, attention core or block alone, exported as the UNet exporter exports it: graph inputs
    `input_names` (e.g. x, emb) -> `y`, batch and spatial axes dynamic; for checking against per-layer goldens."""
    _check_arguments(mode, opset)
    refuse_sign_zeros(sign_sources, module, "the layer")
    axes = {name: {d: f"{name}_{d}" for d in [0, *range(2, example.dim())]}
            for name, example in zip(input_names, examples)}
    axes["y"] = {d: f"y_{d}" for d in [0, *range(2, examples[0].dim())]}
    onnx_model = _traced_in_mode(_Root(module), mode, opset, tuple(examples), input_names, "y", axes)
    return finish_model(onnx_model, ModelMetadata(format=FORMAT_VERSION, family=BINARYDM, act_mode=mode))


def export_checkpoint(ckpt, output: Path, config, model: BinaryDMUNet, options: ExportOptions,
                      log: Callable[[str], None]):
    """`bdm export` of a loaded BinaryDM checkpoint (registry.export_checkpoint): sign-0 weights resolved or refused,
    exported in options.mode, and (options.validate) compared with PyTorch before `output` is written; returns the
    report."""
    if options.dtype != "fp32" or not options.fused:
        raise BdmError(f"{ckpt} is a BinaryDM checkpoint: its export is fp32 with one MultiBasisConv node per "
                       f"layer; leave out --dtype {options.dtype} / --no-fused")
    mode = options.mode or MODES[0]
    _check_arguments(mode, options.opset)
    zero_sign = options.zero_weight_sign
    resolved = resolve_sign_zeros(sign_sources, model, zero_sign, f"checkpoint {ckpt}")
    if resolved:
        log(f"{resolved} sign-0 weights exported as {zero_sign:+d}")
    recorded = ModelMetadata(unet=unet_params(config), sampling=sampling_options(config),
                             zero_weight_sign=ZERO_SIGN_TEXT[zero_sign], checkpoint=Path(ckpt).name,
                             checkpoint_sha256=file_sha256(ckpt))
    onnx_model = to_onnx(model, mode, options.opset, recorded)

    def compare(path):
        from bdm.export.binarydm.validate import TIMESTEPS, compare as compare_outputs

        log(f"validating: ONNX Runtime vs PyTorch in {mode} mode at t = {list(TIMESTEPS)}, every binarized layer "
            f"also teacher-forced")
        return compare_outputs(path, model, mode, log=log)

    return write_validated(onnx_model, output, compare if options.validate else None)
