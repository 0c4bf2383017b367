"""The model families and the commands that dispatch to them: `load_model` (bdm.load_model), `export_checkpoint`
(`bdm export`), `validate_file` (`bdm validate`) and `inspect_file` (`bdm inspect`). Add a family by adding its
FAMILY to FAMILIES."""

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from bdm.contract import FORMAT_VERSION, ModelMetadata
from bdm.errors import BdmError
from bdm.export import bidiffsr, binarydm
from bdm.export.base.family import ExportOptions, ModelFamily
from bdm.files import check_output_path, file_sha256

FAMILIES: Dict[str, ModelFamily] = {family.name: family for family in (bidiffsr.FAMILY, binarydm.FAMILY)}


def _claims_config(family: ModelFamily, config) -> bool:
    """A config another family cannot parse is simply not that family's."""
    try:
        return family.claims_config(config)
    except BdmError:
        return False


def resolve_family(family: Optional[str], config, state_keys) -> ModelFamily:
    """The explicit family, else the one whose config type matches, else the one that claims the keys."""
    if family is not None:
        if family not in FAMILIES:
            raise BdmError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
        return FAMILIES[family]
    if config is not None:
        claimed = [f for f in FAMILIES.values() if _claims_config(f, config)]
        if claimed:
            return claimed[0]
    claimed = [f for f in FAMILIES.values() if f.claims_keys(state_keys)]
    if claimed:
        return claimed[0]
    from bdm.export.base.checkpoint import first_names

    raise BdmError(f"cannot tell which model family this checkpoint is ({len(state_keys)} tensors, first "
                   f"{first_names(sorted(state_keys))}); known families {sorted(FAMILIES)}: pass family=... and "
                   f"--config")


def load(ckpt_path, config=None, family: Optional[str] = None) -> Tuple[ModelFamily, "object"]:
    """(family, its PyTorch network in eval mode, CPU, float32) of an official checkpoint; see load_model."""
    from bdm.export.base import checkpoint

    raw = checkpoint.safe_load(ckpt_path)
    keys = set() if family is not None else checkpoint.state_keys(raw, FAMILIES.values(), f"checkpoint {ckpt_path}")
    chosen = resolve_family(family, config, keys)
    return chosen, checkpoint.load_network(chosen, raw, ckpt_path, config)


def load_model(ckpt_path, config=None, family: Optional[str] = None):
    """Official checkpoint -> the family's PyTorch network in eval mode, on CPU, float32 (bdm.load_model).

    config: the family's config, a path or a mapping (None: the family's released network). family: a FAMILIES name
    (None: detected from the config's network type, else from the checkpoint keys). Strict: a missing or unexpected
    key or a shape mismatch is a BdmError. Sign-0 weights give a warning (the exporter refuses them)."""
    return load(ckpt_path, config, family)[1]


@dataclass
class ExportSummary:
    path: Path
    seconds: float
    validation: Optional["object"]  # the family's ParityReport; None with validate=False


def export_checkpoint(ckpt, output, config=None, options: ExportOptions = ExportOptions(),
                      log: Callable[[str], None] = print) -> ExportSummary:
    """`bdm export`: load (strictly), export with the checkpoint's family and, unless options.validate is False,
    compare ONNX Runtime with PyTorch before the file appears at `output` (written atomically: on any failure no
    file is left)."""
    from bdm.export.base.onnx_graph import check_options

    start = time.perf_counter()
    output = check_output_path(output)
    check_options(options.dtype, options.opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sign-0 weights: resolved or refused by the exporter
        family, model = load(ckpt, config)
    report = family.export_checkpoint(ckpt, output, config, model, options, log)
    return ExportSummary(output, time.perf_counter() - start, report)


def read_onnx(path, what: str = "ONNX file"):
    """The ONNX model at `path`; one BdmError line when there is none."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BdmError(f"{path}: no such {what}; export one with `bdm export`")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and onnx's own errors
        raise BdmError(f"{path} is not an ONNX model ({type(e).__name__}); pass a file written by "
                       f"`bdm export`") from None


def model_metadata(onnx_model, path) -> ModelMetadata:
    """The bdm metadata of an exported model (BdmError for a file `bdm export` did not write)."""
    metadata = ModelMetadata.from_props({p.key: p.value for p in onnx_model.metadata_props}, str(path))
    if metadata.format != FORMAT_VERSION:
        raise BdmError(f"{path} was not written by `bdm export` (no bdm metadata); export it with `bdm export`")
    if metadata.family not in FAMILIES:
        raise BdmError(f"{path} holds a {metadata.family!r} model, which this bdm does not know (known: "
                       f"{sorted(FAMILIES)})")
    return metadata


def validate_file(model_path, ckpt, config=None, nhw: Tuple[int, int, int] = (1, 64, 64),
                  open_engine: Optional[Callable] = None, seed: int = 0, log: Callable[[str], None] = print,
                  open_kernels: Optional[Callable] = None):
    """`bdm validate`: the exported model against its PyTorch reference, `ckpt` loaded with `config` (default: the
    network the export recorded) and with the sign-0 resolution the export recorded, through the family's
    comparison; `open_engine()` and `open_kernels()`, when given, open a TensorRT runner and the CPU kernels runner
    of the same model to compare too."""
    from bdm.export.base.sign_zeros import resolve_sign_zeros

    model_path = Path(model_path)
    onnx_model = read_onnx(model_path)
    metadata = model_metadata(onnx_model, model_path)
    family = FAMILIES[metadata.family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sign-0 weights: resolved as the export did, below
        _, model = load(ckpt, config if config is not None else family.recorded_config(metadata), family.name)
    if metadata.checkpoint_sha256 not in (None, file_sha256(ckpt)):
        log(f"note: {ckpt} is not the file this model was exported from ({metadata.checkpoint}); "
            f"differences below may be weights, not the export")
    resolve_sign_zeros(family.sign_sources, model, metadata.zero_sign, f"checkpoint {ckpt}")
    return family.compare_file(model_path, onnx_model, metadata, model, ckpt, nhw, open_engine, open_kernels, seed,
                               log)


def inspect_file(path):
    """`bdm inspect`: a bdm.export.inspect.ModelSummary of the exported model at `path`."""
    from bdm.export import inspect

    path = Path(path)
    onnx_model = read_onnx(path)
    metadata = ModelMetadata.from_props({p.key: p.value for p in onnx_model.metadata_props}, str(path))
    family = FAMILIES.get(metadata.family)
    packed = family.packed_inputs if family else {op: io for f in FAMILIES.values() for op, io in
                                                  f.packed_inputs.items()}
    return inspect.summarize(onnx_model, path, path.stat().st_size, metadata, packed)
