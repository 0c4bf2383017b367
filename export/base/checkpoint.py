"""Loading an official checkpoint into a family's PyTorch network: torch.load(weights_only=True), the state_dict
unwrapped from its container, wrapper prefixes stripped, a strict key and shape comparison with the network, and a
warning for sign-0 weights. Which family a checkpoint is comes from bdm.export.registry."""

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Set

import torch

from bdm.errors import BdmError
from bdm.export.base.family import ModelFamily
from bdm.export.base.sign_zeros import describe, find_sign_zeros

_SHOW = 3  # offenders named in one error line


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
                           f"state_dict (top-level keys {first_names(list(obj))}); expected torch.save({{'params': "
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


def first_names(keys: List[str]) -> str:
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
        parts.append(f"{len(missing)} missing keys ({first_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({first_names(unexpected)})")
    if mismatched:
        shown = [f"{k}: checkpoint {list(state[k].shape)} vs network {list(expected[k])}" for k in mismatched]
        parts.append(f"{len(mismatched)} shape mismatches ({first_names(shown)})")
    if not_float:
        parts.append(f"{len(not_float)} non-float tensors ({first_names(not_float)})")
    hint = f"; {family.config_hint}" if family.config_hint and (missing or unexpected or mismatched) else ""
    raise BdmError(f"{source} does not match {network} ({len(expected)} tensors): {'; '.join(parts)}{hint}")


def state_keys(raw, families: Iterable[ModelFamily], source: str) -> Set[str]:
    """The state_dict keys of a loaded checkpoint, for family detection: the container keys may differ per family,
    so every family's unwrapping is tried."""
    keys = set()
    if isinstance(raw, Mapping):
        for family in families:
            try:
                keys |= set(unwrap_state_dict(raw, family, source))
            except BdmError:
                continue
    return keys


def load_network(family: ModelFamily, raw, ckpt_path, config=None) -> torch.nn.Module:
    """A loaded checkpoint (`safe_load`) -> `family`'s network in eval mode, on CPU, float32.

    config: the family's config (path or mapping; None: its released network). Strict: any missing or unexpected key
    or shape mismatch is a BdmError. Sign-0 weights give a warning (the exporter refuses them unless told their sign).
    """
    source = f"checkpoint {ckpt_path}"
    state = unwrap_state_dict(raw, family, source)
    model = family.build(config, device="meta")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if family.select_state is not None:
        state = family.select_state(state, expected)
    network = f"the {family.name} network of " + (f"config {config}" if isinstance(config, (str, Path))
                                                  else "the given config" if config is not None
                                                  else "the released config")
    check_state_dict(expected, state, family, source, network)
    # assign=True adopts the checkpoint tensors: no second copy, no init of a throwaway network.
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, strict=True,
                          assign=True)
    zeros = find_sign_zeros(family.sign_sources(model))
    if zeros:
        warnings.warn(f"{source}: {describe(zeros)}, so `bdm export` will refuse this checkpoint unless given their "
                      f"sign", stacklevel=3)
    return model.eval()
