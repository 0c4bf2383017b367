"""The ONNX side of every bdm export: `bdm` nodes from the op specs (`bdm_op`: forward = the NumPy reference,
symbolic = the node), layers swapped for their packed stand-ins for the duration of a trace, the TorchScript trace
itself, the check that no latent binarized weight reached the file, the post-processing every export gets (function
bodies, metadata, producer, checker) and the atomic, validated write."""

import contextlib
import io
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from torch import nn

from bdm.contract import BDM_VERSION, ModelMetadata
from bdm.errors import BdmError
from bdm.export.base import functions
from bdm.files import atomic_path
from bdm.plugins import reference, spec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


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


def trace(model: nn.Module, examples: Sequence[torch.Tensor], input_names: Sequence[str], output_name: str,
          dynamic_axes: Dict[str, Dict[int, str]], opset: int) -> onnx.ModelProto:
    """`model(*examples)` exported with the TorchScript exporter (constant folding on)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer notes
        torch.onnx.export(model, tuple(examples), buffer, input_names=list(input_names), output_names=[output_name],
                          opset_version=opset, dynamo=False, do_constant_folding=True, dynamic_axes=dynamic_axes)
    return onnx.load_from_string(buffer.getvalue())


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


def check_options(dtype: str, opset: int):
    if dtype not in DTYPES:
        raise BdmError(f"--dtype {dtype} is not supported; choose one of {list(DTYPES)}")
    if opset < functions.MIN_OPSET:
        raise BdmError(f"--opset {opset} is too old: the bdm function bodies need opset >= {functions.MIN_OPSET}")
    if opset > onnx.defs.onnx_opset_version():
        raise BdmError(f"--opset {opset} is newer than this onnx package knows ({onnx.defs.onnx_opset_version()})")


def finish_model(onnx_model: onnx.ModelProto, metadata: ModelMetadata) -> onnx.ModelProto:
    """Functions, metadata, producer and the full checker: the post-processing of every bdm export."""
    functions.attach_functions(onnx_model)
    onnx.helper.set_model_props(onnx_model, metadata.to_props())
    onnx_model.producer_name, onnx_model.producer_version = "bdm", BDM_VERSION
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise BdmError(f"internal check failed: the exported model does not pass the ONNX checker "
                       f"({str(e).splitlines()[0]})") from None
    return onnx_model


def write_validated(onnx_model: onnx.ModelProto, output: Path,
                    validation: Optional[Callable[[Path], "object"]]):
    """Write `onnx_model` to `output` atomically (bdm.files.atomic_path): to a temporary file beside it, which
    `validation` (unless None) compares with PyTorch before the rename, returning its ParityReport; on a failed
    validation, or any error, no file is left. Returns the report (None without validation)."""
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
