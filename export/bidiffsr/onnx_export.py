"""`bdm export` of a BI-DiffSR network: one ONNX file with `bdm` custom ops, bit-packed weights and a model-local
function per op (so ONNX Runtime runs it as is, and TensorRT picks the plugins).

Every BIConv is swapped, for the duration of the export only, for a `PackedBIConv` that holds the spec's inputs
(packed sign bits, alpha, the [K, C] group tables) as buffers and emits one `bdm` node (base.onnx_graph.bdm_op); the
network is traced with dynamic N, H, W and finished as every bdm export is (base.onnx_graph.finish_model).
"""

import copy
import dataclasses
from pathlib import Path
from typing import Callable, Optional

import onnx
import torch
from torch import nn

from bdm.contract import BI_DIFFSR, CONDITIONAL_INPUT_NAMES, DEFAULT_OPSET, FORMAT_VERSION, OUTPUT_NAME, ZERO_SIGN_TEXT
from bdm.contract import ModelMetadata
from bdm.errors import BdmError
from bdm.export.base.family import ExportOptions
from bdm.export.base.onnx_graph import (DTYPES, bdm_op, check_no_binarized_weights, check_options, finish_model,
                                        swapped_modules, trace, write_validated)
from bdm.export.base.sign_zeros import refuse_sign_zeros, resolve_sign_zeros
from bdm.export.bidiffsr import network as bidiffsr
from bdm.export.bidiffsr.config import bidiffsr_network_g, recorded_scale
from bdm.files import file_sha256
from bdm.plugins import packing
# What `bdm export` checks before it reports success: the last t of every group (group_rule of the spec), batch 2
# (the second sample's t lies in another group), 32x32.
EXPORT_CHECK_TIMESTEPS = (399, 799, 1199, 1599, 1999)
EXPORT_CHECK_NHW = (2, 32, 32)
# Trace size: any multiple of 8 works (the graph is dynamic in N, H, W); batch 2 so no dimension is 1.
_TRACE_NHW = (2, 16, 16)


class PackedBIConv(bidiffsr.BIConv):
    """What a BIConv becomes in the exported graph: one `bdm::BinaryConv2d` node (or, unfused, TimestepBias ->
    BinarySignConv2d -> TimestepRPReLU -> Add) reading the packed sign bits, alpha and group tables.

    It subclasses BIConv only so that the network passes it the timestep; it holds none of BIConv's latent
    parameters (its buffers live in `self.packed`, named after the spec's inputs)."""

    def __init__(self, biconv: bidiffsr.BIConv, fused: bool = True):
        nn.Module.__init__(self)
        self.in_channels, self.out_channels = biconv.in_channels, biconv.out_channels
        self.kernel_size, self.num_groups, self.total_steps = biconv.kernel_size, biconv.num_groups, biconv.total_steps
        self.fused = fused
        self.packed = nn.Module()
        latent = biconv.binary_conv.weight.detach().float().cpu().numpy()
        self.packed.register_buffer("weight", torch.from_numpy(packing.pack_signs(latent)))
        self.packed.register_buffer("alpha", biconv.alpha().cpu())
        for name, table in biconv.group_tables().items():
            self.packed.register_buffer(name, table.cpu())

    def float32_tables(self):
        """alpha and the tables are float32 by the spec: after a .half() of the network they hold the values
        rounded through fp16 (the fp16 network's own), in float32."""
        for name, value in self.packed.named_buffers():
            if value.is_floating_point():
                setattr(self.packed, name, value.float())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t32 = t.to(torch.int32)  # the exporter traces one Cast, shared by every node (TorchScript CSE)
        tables = dict(self.packed.named_buffers())
        steps = dict(num_groups=self.num_groups, total_steps=self.total_steps)
        conv = dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size)
        if self.fused:
            return bdm_op("BinaryConv2d", dict(tables, x=x, t=t32), **conv, **steps)
        shifted = bdm_op("TimestepBias", dict(x=x, t=t32, table=tables["threshold"]), channels=self.in_channels,
                         **steps)
        scaled = bdm_op("BinarySignConv2d", dict(tables, x=shifted), **conv)
        return bdm_op("TimestepRPReLU", dict(tables, x=scaled, t=t32), channels=self.out_channels, **steps) + x


class Float16Embedding(nn.Module):
    """The time embedding of an fp16 network: computed in float32 from the integer t (sin/cos of t*f up to
    ~2000 rad need float32), handed on in fp16."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, t):
        return self.embedding(t).to(torch.float16)


def _trace(model: nn.Module, dtype: torch.dtype, opset: int) -> onnx.ModelProto:
    n, h, w = _TRACE_NHW
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(n, model.out_channel, h, w, generator=generator, dtype=dtype)
    cond = torch.rand(n, model.in_channel - model.out_channel, h, w, generator=generator, dtype=dtype)
    t = torch.tensor([1000, 10][:n], dtype=torch.int64)
    spatial = {0: "N", 2: "H", 3: "W"}
    return trace(model, (x_t, cond, t), CONDITIONAL_INPUT_NAMES, OUTPUT_NAME,
                 {"x_t": spatial, "cond": spatial, "t": {0: "N"}, OUTPUT_NAME: spatial}, opset)


def _bypass_initializer_identities(graph: onnx.GraphProto):
    """The exporter shares equal initializers through Identity nodes (e.g. identical GroupNorm affines): let the
    consumers read the initializer itself, so every weight of a `bdm` node is a plain initializer input."""
    initializers = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    source = {n.output[0]: n.input[0] for n in graph.node
              if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs}
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in source)]
    for node in kept:
        node.input[:] = [source.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)


def _biconv_weights(model: nn.Module):
    """check_no_binarized_weights' layers of a BI-DiffSR network: each BIConv's W, with sign(W) and
    alpha * sign(W)."""
    for path, module in bidiffsr.biconvs(model):
        weight = module.binary_conv.weight
        yield path, weight, lambda w=weight, m=module: [torch.sign(w),
                                                        m.alpha().reshape(-1, 1, 1, 1) * torch.sign(w)]


def to_onnx(model: bidiffsr.BIDiffSRUNet, dtype: str = "fp32", opset: int = DEFAULT_OPSET, fused: bool = True,
            zero_sign: Optional[int] = None, metadata: Optional[ModelMetadata] = None) -> onnx.ModelProto:
    """The ONNX model of a BI-DiffSR network (left unchanged). Sign-0 weights raise BdmError unless
    resolve_sign_zeros ran first; zero_sign is what it was given (recorded), `metadata` what the caller records
    beyond the export's own fields."""
    if not isinstance(model, bidiffsr.BIDiffSRUNet):
        raise BdmError(f"bdm export handles BI-DiffSR networks; this checkpoint built a {type(model).__name__}")
    check_options(dtype, opset)
    refuse_sign_zeros(bidiffsr.sign_sources, model, "the network")
    biconv_paths = {path for path, _ in bidiffsr.biconvs(model)}

    def pack(path, module):
        return PackedBIConv(module, fused) if path in biconv_paths else None

    with swapped_modules(model, pack):
        exported = model
        if dtype == "fp16":
            exported = copy.deepcopy(model).half()  # no latent binary weight left to copy
            for module in exported.modules():
                if isinstance(module, PackedBIConv):
                    module.float32_tables()
            exported.timestep_level_mlp[0] = Float16Embedding(exported.timestep_level_mlp[0])
        onnx_model = _trace(exported, DTYPES[dtype], opset)
    _bypass_initializer_identities(onnx_model.graph)
    check_no_binarized_weights(onnx_model, _biconv_weights(model), "binarized conv")
    recorded = dataclasses.replace(metadata or ModelMetadata(), format=FORMAT_VERSION, family=BI_DIFFSR, dtype=dtype,
                                   fused=fused, zero_weight_sign=ZERO_SIGN_TEXT[zero_sign],
                                   binarized_convs=len(bidiffsr.biconvs(model)))
    return finish_model(onnx_model, recorded)


def export_checkpoint(ckpt, output: Path, config, model: nn.Module, options: ExportOptions,
                      log: Callable[[str], None]):
    """`bdm export` of a loaded BI-DiffSR checkpoint (registry.export_checkpoint): sign-0 weights resolved or
    refused, exported, and (options.validate) compared with PyTorch before `output` is written; returns the report."""
    if options.mode is not None:
        raise BdmError(f"--mode applies to BinaryDM checkpoints; {ckpt} is a BI-DiffSR checkpoint")
    zero_sign = options.zero_weight_sign
    resolved = resolve_sign_zeros(bidiffsr.sign_sources, model, zero_sign, f"checkpoint {ckpt}")
    if resolved:
        log(f"{resolved} sign-0 weights exported as {zero_sign:+d}")
    recorded = ModelMetadata(network_g=bidiffsr_network_g(config), checkpoint=Path(ckpt).name,
                             checkpoint_sha256=file_sha256(ckpt), scale=recorded_scale(config, ckpt))
    onnx_model = to_onnx(model, options.dtype, options.opset, options.fused, zero_sign, recorded)

    def compare(path):
        from bdm.export.bidiffsr import validate

        log(f"validating: ONNX Runtime vs PyTorch, {len(EXPORT_CHECK_TIMESTEPS)} inputs "
            f"{'x'.join(map(str, EXPORT_CHECK_NHW))} (one per timestep group)")
        return validate.compare(path, model, nhw=EXPORT_CHECK_NHW, timesteps=EXPORT_CHECK_TIMESTEPS, log=log,
                                polygraphy_stats=False)

    return write_validated(onnx_model, output, compare if options.validate else None)
