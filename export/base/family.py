"""What a model family plugs into bdm (`ModelFamily`): how to build its network and recognise its checkpoints and
configs, where its sign-0 weights can be, its modes, its exporter and its validation. Each family package defines one
FAMILY; bdm.export.registry lists them and dispatches to them. A family descriptor is light: the modules that need
torch, onnx or polygraphy are imported when first called (`deferred`)."""

import importlib
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, Mapping, Optional, Tuple

from bdm.contract import DEFAULT_OPSET


def deferred(module: str, function: str) -> Callable:
    """`module.function`, imported on its first call (loading a model needs no onnx; listing families no torch)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    call.__qualname__ = call.__name__ = function
    call.__doc__ = f"{module}.{function}, imported on use."
    return call


@dataclass(frozen=True)
class ExportOptions:
    """What `bdm export` asks for; a family refuses what does not apply to it."""

    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    fused: bool = True
    mode: Optional[str] = None           # BinaryDM: the mode to export (None: its default)
    validate: bool = True
    zero_weight_sign: Optional[int] = None


@dataclass(frozen=True)
class ModelFamily:
    """One model family.

    build(config, device) -> the network in eval mode; config None: the family's released network; device "meta"
        builds the structure without weights.
    claims_config(config) / claims_keys(keys): whether a user-given config / a state_dict (container and prefixes
        removed) is this family's.
    recorded_config(metadata) -> the network config its export recorded in a bdm.contract.ModelMetadata.
    sign_sources(model) -> the bdm.export.base.sign_zeros.SignSource of every binarized layer.
    modes, default_mode, set_mode(model, mode): how its PyTorch network computes (set_mode returns the model).
    export_checkpoint(ckpt, output, config, model, options, log) -> the validation report (None: not validated);
        writes `output` atomically.
    compare_file(onnx_path, onnx_model, metadata, model, ckpt, nhw, open_engine, open_kernels, seed, log) -> a
        ParityReport: `bdm validate` of one of its exports against the PyTorch reference `model`.
    packed_inputs: {bdm op: (packed sign-bit input, per-channel scale input)} of the ops its exports hold.
    container_keys: checkpoint keys holding the state_dict, first present wins; key_prefixes: stripped from keys.
    select_state(state, network keys) -> the network's state_dict inside an unwrapped checkpoint (None: as is).
    config_hint: the fix a failed strict load suggests.
    """

    name: str
    build: Callable
    claims_config: Callable[[object], bool]
    claims_keys: Callable[[Collection[str]], bool]
    recorded_config: Callable
    sign_sources: Callable
    modes: Tuple[str, ...]
    set_mode: Callable
    export_checkpoint: Callable
    compare_file: Callable
    packed_inputs: Mapping[str, Tuple[str, str]] = field(default_factory=dict)
    container_keys: Tuple[str, ...] = ("params_ema", "params")  # basicsr: the EMA weights first
    key_prefixes: Tuple[str, ...] = ("module.",)  # DataParallel / DDP wrappers
    select_state: Optional[Callable[[Dict[str, object], Collection[str]], Dict[str, object]]] = None
    config_hint: Optional[str] = "pass --config <the official options YAML> for a non-released network"

    @property
    def default_mode(self) -> str:
        return self.modes[0]
