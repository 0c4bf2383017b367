"""`bdm export`: a BI-DiffSR checkpoint -> one ONNX file with `bdm` custom ops, bit-packed weights and a
model-local function per op (so ONNX Runtime runs it as is, and TensorRT picks the plugins).

How: every BIConv of the loaded PyTorch network is swapped, for the duration of the export only, for a
`PackedBIConv` that holds the spec's inputs (packed sign bits, alpha, the [K, C] group tables) as buffers and
calls a torch.autograd.Function whose forward is the NumPy reference of the op and whose `symbolic` emits the
`bdm` node. The network is then exported with the TorchScript exporter (dynamic N, H, W) and post-processed with
onnx: the function bodies attached, metadata written, the latent-weight and checker checks run, and the file
written atomically.
"""

import contextlib
import copy
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import onnx
import torch
import yaml
from torch import nn

from bdm.errors import BdmError
from bdm.export.base import functions
from bdm.export.bidiffsr import network as bidiffsr
from bdm.export.base.checkpoint import FAMILIES, find_zero_binary_weights, load_model
from bdm.export.bidiffsr.config import bidiffsr_network_g
from bdm.plugins import packing, reference, spec
from bdm.contract import CONDITIONAL_INPUT_NAMES, DEFAULT_OPSET, OUTPUT_NAME
from bdm.files import atomic_path, check_output_path, file_sha256

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
METADATA_PREFIX = "bdm."
# What `bdm export` checks before it reports success: the last t of every group (group_rule of the spec), batch 2
# (the second sample's t lies in another group), 32x32.
EXPORT_CHECK_TIMESTEPS = (399, 799, 1199, 1599, 1999)
EXPORT_CHECK_NHW = (2, 32, 32)
# Trace size: any multiple of 8 works (the graph is dynamic in N, H, W); batch 2 so no dimension is 1.
_TRACE_NHW = (2, 16, 16)


def _op_function(op_type: str):
    """A torch.autograd.Function for one `bdm` op: forward = the NumPy reference (plugins/reference.py),
    symbolic = the `bdm` node with every attribute of the spec plus the TensorRT plugin selectors. Called as
    Op.apply(*inputs in spec order, *attribute values in spec order): see `bdm_op`."""
    input_names = spec.input_names(op_type)
    attribute_names = list(spec.op(op_type)["attributes"])

    def split(args):
        return args[:len(input_names)], dict(zip(attribute_names, args[len(input_names):]))

    def forward(ctx, *args):
        tensors, attributes = split(args)
        arrays = {name: tensor.detach().cpu().numpy() for name, tensor in zip(input_names, tensors)}
        return torch.from_numpy(reference.run(op_type, arrays, attributes))

    def symbolic(g, *args):
        tensors, attributes = split(args)
        onnx_attributes = {f"{name}_i": value for name, value in attributes.items()}
        onnx_attributes.update({f"{name}_s": value for name, value in functions.PLUGIN_ATTRIBUTES.items()})
        y = g.op(f"{functions.DOMAIN}::{op_type}", *tensors, **onnx_attributes)
        channels = attributes.get("out_channels", attributes.get("channels"))
        return y.setType(tensors[0].type().with_sizes([None, channels, None, None]))

    function = type(op_type, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                          "symbolic": staticmethod(symbolic)})
    return input_names, attribute_names, function


_OPS = {op_type: _op_function(op_type) for op_type in spec.ops()}


def bdm_op(op_type: str, inputs: Dict[str, torch.Tensor], **attributes) -> torch.Tensor:
    """Apply a `bdm` op: inputs by the spec's names, attributes completed with the spec's defaults."""
    input_names, attribute_names, function = _OPS[op_type]
    attributes = reference.complete_attributes(op_type, attributes)
    return function.apply(*(inputs[n] for n in input_names), *(attributes[n] for n in attribute_names))


class PackedBIConv(bidiffsr.BIConv):
    """What a BIConv becomes in the exported graph: one `bdm::BinaryConv2d` node (or, unfused, TimestepBias ->
    BinarySignConv2d -> TimestepRPReLU -> Add) reading the packed sign bits, alpha and group tables.

    It subclasses BIConv only so that the network passes it the timestep; it holds none of BIConv's latent
    parameters (its buffers live in `self.packed`, named after the spec's inputs)."""

    def __init__(self, biconv: bidiffsr.BIConv, fused: bool = True, zero_sign: Optional[int] = None):
        nn.Module.__init__(self)
        self.in_channels, self.out_channels = biconv.in_channels, biconv.out_channels
        self.kernel_size, self.num_groups, self.total_steps = biconv.kernel_size, biconv.num_groups, biconv.total_steps
        self.fused = fused
        self.packed = nn.Module()
        latent = biconv.binary_conv.weight.detach().float().cpu().numpy()
        self.packed.register_buffer("weight", torch.from_numpy(packing.pack_signs(latent, zero_sign)))
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


@contextlib.contextmanager
def swapped_modules(model: nn.Module, replace: Callable[[str, nn.Module], Optional[nn.Module]]):
    """Within the block, every submodule for which replace(path, module) returns a module is that module;
    the originals are put back afterwards, whatever happens."""
    swaps = []  # (parent, name, original, replacement), all built before the model is touched
    for parent_path, parent in list(model.named_modules()):
        for name, child in parent.named_children():
            new = replace(f"{parent_path}.{name}" if parent_path else name, child)
            if new is not None:
                swaps.append((parent, name, child, new))
    try:
        for parent, name, _, new in swaps:
            setattr(parent, name, new)
        yield model
    finally:
        for parent, name, child, _ in swaps:
            setattr(parent, name, child)


def resolve_zero_weights(model: nn.Module, zero_sign: Optional[int], source: str) -> int:
    """Refuse exact-zero latent binary weights (naming where they are), or with zero_sign = +1/-1 give them that
    sign in `model` itself, so that the PyTorch reference and the export agree: the zero becomes
    zero_sign * the smallest normal float32 (alpha = mean|W| is unchanged). Returns how many were resolved."""
    zeros = find_zero_binary_weights(model)
    if not zeros:
        return 0
    first = zeros[0]
    total = sum(z.count for z in zeros)
    if zero_sign is None:
        raise BdmError(f"{source}: {total} exact-zero latent weights in {len(zeros)} binarized convs (first: "
                       f"{first.module}, {first.count} at [o, c, i, j] = {list(first.first_index)}); sign(0) = 0 "
                       f"cannot be packed into 1 bit: pass --zero-weight-sign +1 or -1 to export them with that sign")
    tiny = torch.finfo(torch.float32).tiny
    for family in FAMILIES.values():
        for _, weight in family.binarized_weights(model):
            with torch.no_grad():
                weight[weight == 0] = zero_sign * tiny
    return total


def _network_metadata(model: nn.Module, dtype: str, fused: bool, zero_sign: Optional[int],
                      extra: Dict[str, str]) -> Dict[str, str]:
    return {"format": "1", "family": "bi_diffsr", "dtype": dtype, "fused": str(int(fused)),
            "zero_weight_sign": {None: "none", 1: "+1", -1: "-1"}[zero_sign],
            "binarized_convs": str(len(bidiffsr.biconvs(model))), **extra}


def _trace(model: nn.Module, dtype: torch.dtype, opset: int) -> onnx.ModelProto:
    n, h, w = _TRACE_NHW
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(n, model.out_channel, h, w, generator=generator, dtype=dtype)
    cond = torch.rand(n, model.in_channel - model.out_channel, h, w, generator=generator, dtype=dtype)
    t = torch.tensor([1000, 10][:n], dtype=torch.int64)
    spatial = {0: "N", 2: "H", 3: "W"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer notes
        torch.onnx.export(model, (x_t, cond, t), buffer, input_names=list(CONDITIONAL_INPUT_NAMES), output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, do_constant_folding=True,
                          dynamic_axes={"x_t": spatial, "cond": spatial, "t": {0: "N"}, OUTPUT_NAME: spatial})
    return onnx.load_from_string(buffer.getvalue())


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


def check_no_binarized_weights(onnx_model: onnx.ModelProto,
                               layers: Iterable[Tuple[str, torch.Tensor, Callable[[], List[torch.Tensor]]]], kind: str):
    """No tensor stored in the file (initializer or Constant; float32, float16 or int8) holds the latent weight of a
    binarized layer, nor another form of it that the file holds only as packed bits (signs, scaled signs), exactly or
    rounded to fp16. `layers`: (path, latent weight, forms) with forms() those other forms, of the weight's shape;
    called only for a layer whose shape a stored tensor has (all forms of a released network at once: gigabytes)."""
    stored = {}
    nodes = onnx_model.graph.node
    constants = (a.t for n in nodes if n.op_type == "Constant" for a in n.attribute if a.name == "value")
    for tensor in [*onnx_model.graph.initializer, *constants]:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8):
            stored.setdefault(tuple(tensor.dims), []).append(tensor)
    for path, weight, other_forms in layers:
        candidates = stored.get(tuple(weight.shape), [])
        if not candidates:
            continue
        with torch.no_grad():
            forms = [form.detach().float() for form in [weight, *other_forms()]]
        forms += [form.half().float() for form in forms]
        for tensor in candidates:
            value = torch.from_numpy(onnx.numpy_helper.to_array(tensor).astype(np.float32))
            if any(torch.equal(value, form) for form in forms):
                raise BdmError(f"internal check failed: {tensor.name or 'a constant'} in the exported graph holds the "
                               f"full-precision weight of the {kind} {path}")


def _biconv_weights(model: nn.Module):
    """check_no_binarized_weights' layers of a BI-DiffSR network: each BIConv's W, with sign(W) and
    alpha * sign(W)."""
    for path, module in bidiffsr.biconvs(model):
        weight = module.binary_conv.weight
        yield path, weight, lambda w=weight, m=module: [torch.sign(w),
                                                        m.alpha().reshape(-1, 1, 1, 1) * torch.sign(w)]


def check_options(dtype: str, opset: int):
    if dtype not in DTYPES:
        raise BdmError(f"--dtype {dtype} is not supported; choose one of {list(DTYPES)}")
    if opset < functions.MIN_OPSET:
        raise BdmError(f"--opset {opset} is too old: the bdm function bodies need opset >= {functions.MIN_OPSET}")
    if opset > onnx.defs.onnx_opset_version():
        raise BdmError(f"--opset {opset} is newer than this onnx package knows ({onnx.defs.onnx_opset_version()})")


def to_onnx(model: bidiffsr.BIDiffSRUNet, dtype: str = "fp32", opset: int = DEFAULT_OPSET, fused: bool = True,
            zero_sign: Optional[int] = None, metadata: Optional[Dict[str, str]] = None) -> onnx.ModelProto:
    """The ONNX model of a BI-DiffSR network (left unchanged). Exact-zero latent weights raise BdmError unless
    resolve_zero_weights ran first."""
    if not isinstance(model, bidiffsr.BIDiffSRUNet):
        raise BdmError(f"bdm export handles BI-DiffSR networks; this checkpoint built a {type(model).__name__}")
    check_options(dtype, opset)
    biconv_paths = {path for path, _ in bidiffsr.biconvs(model)}

    def pack(path, module):
        if path in biconv_paths:
            try:
                return PackedBIConv(module, fused, zero_sign)
            except packing.ZeroWeightError as e:
                raise BdmError(f"{path}: {e}; pass --zero-weight-sign +1 or -1") from None
        return None

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
    return finish_model(onnx_model, _network_metadata(model, dtype, fused, zero_sign, metadata or {}))


def finish_model(onnx_model: onnx.ModelProto, metadata: Dict[str, str]) -> onnx.ModelProto:
    """Functions, metadata, producer and the full checker: the post-processing of every bdm export."""
    functions.attach_functions(onnx_model)
    onnx.helper.set_model_props(onnx_model, {METADATA_PREFIX + k: str(v) for k, v in metadata.items()})
    onnx_model.producer_name, onnx_model.producer_version = "bdm", _bdm_version()
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise BdmError(f"internal check failed: the exported model does not pass the ONNX checker "
                       f"({str(e).splitlines()[0]})") from None
    return onnx_model


def _bdm_version() -> str:
    import bdm

    return bdm.__version__


def read_metadata(onnx_model: onnx.ModelProto) -> Dict[str, str]:
    return {p.key[len(METADATA_PREFIX):]: p.value for p in onnx_model.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def census(onnx_model: onnx.ModelProto) -> Dict[str, int]:
    """Node count per op type (custom ops as domain::op_type), most frequent first."""
    counts: Dict[str, int] = {}
    for node in onnx_model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _options_scale(config) -> Dict[str, str]:
    """{"scale": s} when `config` is an options YAML with a top-level `scale` (the network does not know its SR
    scale; `bdm upscale` reads it from the model)."""
    if not isinstance(config, (str, Path)):
        return {}
    options = yaml.safe_load(Path(config).read_text())  # load_model has read it already
    scale = options.get("scale") if isinstance(options, dict) else None
    return {"scale": str(scale)} if isinstance(scale, int) and not isinstance(scale, bool) else {}


def case_line(measured: str, note: str, passed: bool, separator: str) -> str:
    """The line a validation case prints: what it measured, its note, the verdict."""
    return measured + (f"{separator}{note}" if note else "") + ("  PASS" if passed else "  FAIL")


@dataclass
class ParityReport:
    """ONNX Runtime (and TensorRT) against PyTorch on one export, the cases judged by max|diff| <= tolerance *
    max|eps|: what `bdm export` and `bdm validate` print. Each family's validation (export.validate,
    export.binarydm_validate) subclasses it with its cases, worst() and details()."""

    tolerance: float
    cases: list

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def summary(self) -> str:
        return (f"worst error {self.worst():.1e} * max|eps| (bound {self.tolerance:.0e}) over {len(self.cases)} cases"
                + self.details())

    def missed_bound(self) -> str:
        """The bound a failed validation names."""
        return f"{self.tolerance:.0e}"


@dataclass
class ExportSummary:
    path: Path
    seconds: float
    validation: Optional[ParityReport]  # None with validate=False


def write_validated(onnx_model: onnx.ModelProto, output: Path,
                    validation: Optional[Callable[[Path], ParityReport]]) -> Optional[ParityReport]:
    """Write `onnx_model` to `output` atomically (runtime.atomic.atomic_path): to a temporary file beside it, which
    `validation` (unless None) compares with PyTorch before the rename; on a failed validation, or any error, no
    file is left."""
    with atomic_path(output) as tmp:
        try:
            tmp.write_bytes(onnx_model.SerializeToString())
        except OSError as e:
            raise BdmError(f"cannot write {output}: {e.strerror}; choose another output path") from None
        report = None if validation is None else validation(tmp)
        if report is not None and not report.passed:
            raise BdmError(f"validation failed: ONNX Runtime differs from PyTorch beyond {report.missed_bound()} "
                           f"(lines above); no file written; `--no-validate` writes it anyway for debugging")
    return report


def export_checkpoint(ckpt, output, config=None, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                      fused: bool = True, validate: bool = True, zero_weight_sign: Optional[int] = None,
                      log: Callable[[str], None] = print, act_mode: Optional[str] = None) -> ExportSummary:
    """`bdm export`: load (strictly), pack, export, check and, unless validate=False, compare ONNX Runtime with
    PyTorch before the file appears at `output` (written atomically: on any failure no file is left)."""
    start = time.perf_counter()
    output = check_output_path(output)
    check_options(dtype, opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_model warns about exact-zero weights: resolved or refused below
        model = load_model(ckpt, config=config)
    if not isinstance(model, bidiffsr.BIDiffSRUNet):  # BinaryDM: bdm.export.binarydm.onnx_export, the same machinery
        from bdm.export.binarydm import onnx_export as binarydm_onnx

        if dtype != "fp32" or not fused:
            raise BdmError(f"{ckpt} is a BinaryDM checkpoint: its export is fp32 with one MultiBasisConv node per "
                           f"layer; leave out --dtype {dtype} / --no-fused")
        return binarydm_onnx.export_checkpoint(ckpt, output, config, act_mode or "static", opset, validate,
                                               zero_weight_sign, log, model=model)
    if act_mode is not None:
        raise BdmError(f"--act-mode applies to BinaryDM checkpoints; {ckpt} is a BI-DiffSR checkpoint")
    resolved = resolve_zero_weights(model, zero_weight_sign, f"checkpoint {ckpt}")
    if resolved:
        log(f"{resolved} exact-zero latent weights exported as {zero_weight_sign:+d}")
    metadata = {"network_g": json.dumps(bidiffsr_network_g(config), sort_keys=True),
                "checkpoint": Path(ckpt).name, "checkpoint_sha256": file_sha256(ckpt), **_options_scale(config)}
    onnx_model = to_onnx(model, dtype, opset, fused, zero_weight_sign, metadata)

    def compare(path):
        from bdm.export.bidiffsr import validate as validation

        log(f"validating: ONNX Runtime vs PyTorch, {len(EXPORT_CHECK_TIMESTEPS)} inputs "
            f"{'x'.join(map(str, EXPORT_CHECK_NHW))} (one per timestep group)")
        return validation.compare(path, model, nhw=EXPORT_CHECK_NHW, timesteps=EXPORT_CHECK_TIMESTEPS, log=log,
                                  polygraphy_stats=False)

    report = write_validated(onnx_model, output, compare if validate else None)
    return ExportSummary(output, time.perf_counter() - start, report)
