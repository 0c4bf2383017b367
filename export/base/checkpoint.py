"""Load an official checkpoint into the PyTorch reference network: `load_model` (re-exported as bdm.load_model).

The generic steps (safe load, container unwrap, prefix strip, strict comparison, exact-zero detection) serve every
model family; a family (config.ModelFamily) only says how to build its network and how to recognise its
checkpoints and configs. Register a family by adding its FAMILY to FAMILIES below.
"""

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional

import torch

from bdm.errors import BdmError
from bdm.export.bidiffsr import network as bidiffsr
from bdm.export.binarydm import network as binarydm
from bdm.export.bidiffsr.config import ModelFamily

FAMILIES: Dict[str, ModelFamily] = {family.name: family for family in (bidiffsr.FAMILY, binarydm.FAMILY)}

_SHOW = 3  # offenders named in one error line


class ZeroWeights(NamedTuple):
    """Exact-zero latent weights of one binarized conv: sign(0) = 0 cannot be packed into 1 bit."""

    module: str
    count: int
    first_index: tuple


def safe_load(path) -> object:
    """torch.load(weights_only=True) on CPU; every failure is one BdmError line."""
    path = Path(path)
    if not path.exists():
        raise BdmError(f"checkpoint {path} not found")
    if not path.is_file():
        raise BdmError(f"checkpoint {path} is not a file; pass the .pth file itself")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the unpickler's own error (its __context__): "Unsupported global" means a pickled Python
        # object weights_only refuses; anything else (an unknown opcode, ...) means the file is no pickle at all.
        inner = e.__context__ if e.__context__ is not None else e
        if "Unsupported global" in str(inner):
            raise BdmError(f"checkpoint {path} holds a pickled Python object that torch.load(weights_only=True) "
                           f"refuses ({_first_line(inner).split('. ')[0]}); bdm loads plain tensors only: re-save the weights "
                           f"with torch.save({{'params': model.state_dict()}}, path)") from None
        raise _not_a_checkpoint(path, inner)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise _not_a_checkpoint(path, e)


def _not_a_checkpoint(path, error: BaseException) -> BdmError:
    return BdmError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {_first_line(error)}); pass "
                    f"the .pth file written by torch.save")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else "empty"


def unwrap_state_dict(obj, family: ModelFamily, source="checkpoint") -> Dict[str, torch.Tensor]:
    """The state_dict inside `obj`: the first of family.container_keys present (basicsr: params_ema, then
    params), else `obj` itself when it is a bare state_dict; family.key_prefixes stripped from every key."""
    if not isinstance(obj, Mapping):
        raise BdmError(f"{source} holds a {type(obj).__name__}, not a state_dict or {{'params': state_dict}}")
    for key in family.container_keys:
        if key in obj:
            obj = obj[key]
            if not isinstance(obj, Mapping):
                raise BdmError(f"{source}: '{key}' holds a {type(obj).__name__}, not a state_dict")
            break
    else:
        not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if not_tensors:
            raise BdmError(f"{source} has none of the keys {list(family.container_keys)} and is not a bare "
                           f"state_dict (top-level keys {_names(list(obj))}); expected torch.save({{'params': "
                           f"state_dict}})")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise BdmError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        for prefix in family.key_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _names(keys: List[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... (+{len(keys) - _SHOW})" if len(keys) > _SHOW else "")


def check_state_dict(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], family: ModelFamily,
                     source="checkpoint", network="the network"):
    """Strict key and shape comparison; one BdmError line naming counts, the first offenders and the fix."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    not_float = [k for k in expected if k in state and not state[k].is_floating_point()]
    if not (missing or unexpected or mismatched or not_float):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if mismatched:
        shown = [f"{k}: checkpoint {list(state[k].shape)} vs network {list(expected[k])}" for k in mismatched]
        parts.append(f"{len(mismatched)} shape mismatches ({_names(shown)})")
    if not_float:
        parts.append(f"{len(not_float)} non-float tensors ({_names(not_float)})")
    hint = f"; {family.config_hint}" if family.config_hint and (missing or unexpected or mismatched) else ""
    raise BdmError(f"{source} does not match {network} ({len(expected)} tensors): {'; '.join(parts)}{hint}")


def find_zero_binary_weights(model: torch.nn.Module) -> List[ZeroWeights]:
    """Binarized convs of `model` (any registered family) whose latent weights hold exact zeros."""
    found = []
    for family in FAMILIES.values():
        for module, weight in family.binarized_weights(model):
            zeros = weight.detach() == 0
            count = int(zeros.sum())
            if count:
                first = tuple(int(i) for i in zeros.nonzero()[0])
                found.append(ZeroWeights(module, count, first))
    return found


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
    raise BdmError(f"cannot tell which model family this checkpoint is ({len(state_keys)} tensors, first "
                   f"{_names(sorted(state_keys))}); known families {sorted(FAMILIES)}: pass family=... and --config")


def load_model(ckpt_path, config=None, family: Optional[str] = None) -> torch.nn.Module:
    """Official checkpoint -> the family's PyTorch network in eval mode, on CPU, float32.

    config: official options YAML path or network_g dict (None: the family's released network).
    family: "bi_diffsr" (None: detected from the config's network type, else from the checkpoint keys).
    Strict: any missing / unexpected key or shape mismatch is a BdmError. Exact-zero latent binary weights
    give a warning (the exporter refuses them: 1-bit packing has no 0).
    """
    source = f"checkpoint {ckpt_path}"
    raw = safe_load(ckpt_path)
    # Detection needs the keys, and the container keys may differ per family: try each family's unwrapping.
    keys = set()
    if family is None and isinstance(raw, Mapping):
        for candidate in FAMILIES.values():
            try:
                keys |= set(unwrap_state_dict(raw, candidate, source))
            except BdmError:
                continue
    chosen = resolve_family(family, config, keys)
    state = unwrap_state_dict(raw, chosen, source)
    model = chosen.build(config, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if chosen.select_state is not None:
        state = chosen.select_state(state, expected)
    network = f"the {chosen.name} network of " + (f"config {config}" if isinstance(config, (str, Path))
                                                   else "the given config" if config is not None
                                                   else "the released config")
    check_state_dict(expected, state, chosen, source, network)
    # assign=True adopts the checkpoint tensors: no second copy, no init of a throwaway network.
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, strict=True,
                          assign=True)
    zeros = find_zero_binary_weights(model)
    if zeros:
        first = zeros[0]
        warnings.warn(f"{source}: {sum(z.count for z in zeros)} exact-zero latent weights in {len(zeros)} "
                      f"binarized convs (first: {first.module}, {first.count} at index {first.first_index}); "
                      f"sign(0)=0 cannot be packed into 1 bit, so `bdm export` will refuse this checkpoint",
                      stacklevel=2)
    return model.eval()
