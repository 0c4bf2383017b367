"""The JSON sidecar `<engine>.json` of a bdm engine (ONNX hash, TensorRT version, GPU name and compute capability,
profile, dtype, plugin library hash): written beside the engine, checked against this machine (a mismatch names the
field and the command that rebuilds it). Built engines are also cached per (GPU model, TensorRT version), keyed by
everything in the sidecar that changes the engine. Plain Python: no TensorRT needed."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional, Tuple

from bdm.contract import SIDECAR_CACHE_KEY, SIDECAR_CHECKED, SIDECAR_FORMAT
from bdm.errors import BdmError
from bdm.files import atomic_path


def sidecar_path(engine_path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path) -> dict:
    path = sidecar_path(engine_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BdmError(f"engine {engine_path} has no sidecar {path.name} (it was not built by `bdm build-engine`); "
                       f"rebuild it with `bdm build-engine MODEL.onnx {engine_path}`") from None
    except (OSError, ValueError) as e:
        raise BdmError(f"engine sidecar {path} is unreadable ({e}); rebuild the engine with `bdm build-engine`") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise BdmError(f"engine sidecar {path} has an unknown format; rebuild the engine with `bdm build-engine`")
    return data


def write_sidecar(engine_path, sidecar: dict):
    with atomic_path(sidecar_path(engine_path)) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


def sidecar_mismatch(recorded: dict, current: dict) -> Optional[Tuple[str, object, object]]:
    """The first checked field whose recorded value differs from this machine's (fields absent from
    `current` are not checked), as (field, recorded, current); None when the engine fits."""
    for field in SIDECAR_CHECKED:
        if field in current and recorded.get(field) != current[field]:
            return field, recorded.get(field), current[field]
    return None


def check_sidecar(engine_path, current: dict, onnx_hint: str = "MODEL.onnx"):
    """BdmError naming the first field that differs and the command that rebuilds the engine."""
    recorded = read_sidecar(engine_path)
    mismatch = sidecar_mismatch(recorded, current)
    if mismatch:
        field, was, now = mismatch
        raise BdmError(f"engine {engine_path} does not fit here: {field} is {was!r} in the engine, {now!r} here; "
                       f"rebuild it on this machine: bdm build-engine {recorded.get('onnx_path') or onnx_hint} "
                       f"{engine_path}")
    return recorded


def cache_dir() -> Path:
    return Path(os.environ.get("BDM_CACHE_DIR") or Path.home() / ".cache" / "bdm")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def engine_cache_key(sidecar: dict) -> str:
    """Everything that changes the engine: model, plugin code, profile and dtype (GPU and TensorRT version
    are the cache folder)."""
    relevant = {k: sidecar[k] for k in SIDECAR_CACHE_KEY}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:24]


def machine_cache_dir(gpu_name: str, tensorrt_version: str) -> Path:
    return cache_dir() / "engines" / f"{slug(gpu_name)}-trt{tensorrt_version}"
