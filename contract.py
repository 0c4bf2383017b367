"""The model-file contract: what `bdm export` records in an ONNX file and `bdm build-engine` in an engine's JSON
sidecar, and what every reader (backends, validate, inspect, upscale, generate) expects there. Writers and readers
take the input names, metadata keys, sidecar fields and format versions from here."""

import json
from dataclasses import dataclass, fields
from typing import Dict, List, Mapping, Optional, Tuple, TypedDict, get_args

from bdm.errors import BdmError

BDM_VERSION = "0.1.0"  # bdm's own version: the producer_version of every exported file (bdm.__version__)
FORMAT_VERSION = 1  # bdm.format of an exported ONNX file
DEFAULT_OPSET = 17  # the opset of the default domain that `bdm export` writes unless asked for another

# Model families: the value of bdm.family.
BI_DIFFSR = "bi_diffsr"
BINARYDM = "binarydm"

# Graph inputs, in feed order, and the output. A bdm model takes one of two input layouts.
CONDITIONAL_INPUT_NAMES = ("x_t", "cond", "t")  # noisy image, upsampled low-resolution image, timestep
UNCONDITIONAL_INPUT_NAMES = ("x_t", "t")
OUTPUT_NAME = "eps"
FAMILY_INPUT_NAMES = {BI_DIFFSR: CONDITIONAL_INPUT_NAMES, BINARYDM: UNCONDITIONAL_INPUT_NAMES}

METADATA_PREFIX = "bdm."
# bdm.zero_weight_sign: how the export packed sign-0 weights ("none": it refused them).
ZERO_SIGN_TEXT = {None: "none", 1: "+1", -1: "-1"}
ZERO_SIGN_VALUE = {text: sign for sign, text in ZERO_SIGN_TEXT.items()}


@dataclass(frozen=True)
class ModelMetadata:
    """The `bdm.<field>` entries of an exported ONNX file's metadata_props, written in field order; None: not
    recorded. Dicts are stored as JSON with sorted keys, booleans as 1 / 0."""

    format: Optional[int] = None
    family: Optional[str] = None              # BI_DIFFSR | BINARYDM
    dtype: Optional[str] = None               # fp32 | fp16: the activations and full-precision weights
    fused: Optional[bool] = None              # BI-DiffSR: one BinaryConv2d node per BIConv
    act_mode: Optional[str] = None            # BinaryDM: the mode the network was exported in
    binarized_layers: Optional[int] = None    # BinaryDM: MultiBasisConv nodes
    binarized_params: Optional[int] = None    # BinaryDM: latent weights they pack
    unet: Optional[dict] = None               # BinaryDM: the UNet's constructor arguments
    sampling: Optional[dict] = None           # unconditional models: timesteps, betas, image size, channels, space
    zero_weight_sign: Optional[str] = None    # a ZERO_SIGN_TEXT value
    binarized_convs: Optional[int] = None     # BI-DiffSR: BIConvs
    network_g: Optional[dict] = None          # BI-DiffSR: the options YAML's network_g
    checkpoint: Optional[str] = None          # file name of the checkpoint exported
    checkpoint_sha256: Optional[str] = None
    scale: Optional[int] = None               # conditional models: the upscaling factor the network was trained for

    def to_props(self) -> Dict[str, str]:
        """metadata_props entries (key -> text) of the recorded fields."""
        props = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = int(value)
            elif isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            props[metadata_key(f.name)] = str(value)
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "the model") -> "ModelMetadata":
        """The bdm entries of metadata_props (other keys are ignored); BdmError for a value of the wrong type."""
        values = {}
        for f in fields(cls):
            text = props.get(metadata_key(f.name))
            if text is None:
                continue
            kind = next(a for a in get_args(f.type) if a is not type(None))
            try:
                values[f.name] = _PARSERS[kind](text)
            except ValueError:
                raise BdmError(f"{source}: metadata {metadata_key(f.name)} = {text!r} is not {_KINDS[kind]}; "
                               f"export the model again with `bdm export`") from None
        return cls(**values)

    @property
    def zero_sign(self) -> Optional[int]:
        """The sign the export gave sign-0 weights: +1, -1, or None (it refused them, or did not record it)."""
        return ZERO_SIGN_VALUE.get(self.zero_weight_sign)


_PARSERS = {int: int, bool: lambda text: bool(int(text)), dict: json.loads, str: str}
_KINDS = {int: "an integer", bool: "0 or 1", dict: "a JSON object", str: "text"}


def metadata_key(field: str) -> str:
    """The metadata_props key of a ModelMetadata field."""
    return METADATA_PREFIX + field


# Keys readers look up in a runner's metadata (ONNX Runtime's custom metadata map, an engine sidecar's copy).
SAMPLING_KEY = metadata_key("sampling")
SCALE_KEY = metadata_key("scale")
ACT_MODE_KEY = metadata_key("act_mode")
CHECKPOINT_KEY = metadata_key("checkpoint")

SIDECAR_FORMAT = 1  # "format" of an engine sidecar


class EngineSidecar(TypedDict, total=False):
    """`<engine>.json`, written by `bdm build-engine` beside the engine and checked before the engine runs."""

    format: int                              # SIDECAR_FORMAT
    onnx_path: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str                  # "8.6"
    plugin_library: str
    plugin_sha256: str
    profile: Dict[str, List[int]]            # {"min" | "opt" | "max": [N, H, W]}
    workspace_mb: int
    onnx_metadata: Dict[str, str]            # the ONNX file's metadata_props, read like ONNX Runtime's
    input_shapes: Dict[str, Dict[str, List[int]]]  # input -> {"min" | "opt" | "max": shape}
    dtype: str                               # numpy name of x_t's type


# Fields whose mismatch makes an engine unusable here, in the order they are reported.
SIDECAR_CHECKED: Tuple[str, ...] = ("tensorrt_version", "gpu_name", "compute_capability", "plugin_sha256",
                                    "onnx_sha256")
# Fields that change the engine built (GPU model and TensorRT version name the cache folder).
SIDECAR_CACHE_KEY: Tuple[str, ...] = ("onnx_sha256", "plugin_sha256", "profile", "dtype", "workspace_mb")
