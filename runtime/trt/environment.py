"""What this machine offers the TensorRT backend: the tensorrt module (10.7 or newer), the GPU (name and compute
capability), the bdm plugin library (found, built for this TensorRT major, its creators registered), and a TensorRT
logger that keeps errors for one-line messages."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict

from bdm.errors import BdmError

# TensorRT's ONNX parser prefers a registered plugin over a node's model-local function from 10.7 on (its changelog,
# 10.7.0); 10.0 to 10.6 always expand the function body, so an engine would hold no bdm plugin.
MIN_TENSORRT = (10, 7)
INSTALL_TENSORRT = ("TensorRT is not installed: on a machine with an NVIDIA GPU and driver, "
                    "`pip install 'bdm[tensorrt]'` (the tensorrt wheel, 10.7 or newer)")


def import_tensorrt():
    """The tensorrt module, 10.7 or newer (check_tensorrt_version)."""
    try:
        import tensorrt
    except ImportError:
        raise BdmError(INSTALL_TENSORRT) from None
    check_tensorrt_version(tensorrt.__version__)
    return tensorrt


def check_tensorrt_version(version: str):
    """BdmError unless `version` is MIN_TENSORRT or newer."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers < MIN_TENSORRT:
        least = ".".join(map(str, MIN_TENSORRT))
        raise BdmError(f"TensorRT {version} is installed; bdm needs {least} or newer, whose ONNX parser uses the bdm "
                       f"plugins (older ones run the nodes' function bodies instead): pip install 'tensorrt>={least}'")


def check_plugin_major(plugin_library: Path, tensorrt_version: str):
    """A plugin library works only with the TensorRT major its headers came from (the build records it)."""
    version_file = Path(plugin_library).with_name("bdm_trt_plugins.version")
    if not version_file.is_file():
        return
    built_for = version_file.read_text().strip()
    if built_for.split(".")[0] != tensorrt_version.split(".")[0]:
        raise BdmError(f"{plugin_library} was compiled against TensorRT {built_for} headers, the installed TensorRT "
                       f"is {tensorrt_version}; rebuild it: python -m bdm.plugins.build --tensorrt-include "
                       f"<TensorRT {tensorrt_version.split('.')[0]}.x include folder>")


def gpu_identity() -> Dict[str, str]:
    """Name and compute capability of CUDA device 0 (through PyTorch, which bdm already needs)."""
    import torch

    if not torch.cuda.is_available():
        raise BdmError("no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT engines need an "
                       "NVIDIA GPU, a driver, and a CUDA build of PyTorch")
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu_name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def resolve_plugins(plugins) -> Path:
    from bdm.plugins.build import PLUGINS_LIB, find_plugins_library

    path = Path(plugins) if plugins else find_plugins_library()
    if path is None:
        raise BdmError(f"no {PLUGINS_LIB} found; build it with `python -m bdm.plugins.build` (needs nvcc and the "
                       f"TensorRT headers) or pass --plugins PATH")
    if not path.is_file():
        raise BdmError(f"--plugins {path}: no such file; build it with `python -m bdm.plugins.build`")
    return path


def registered_bdm_creators(registry) -> list:
    """'bdm::Name vN' of every bdm creator in a TensorRT plugin registry."""
    return sorted(f"{c.plugin_namespace}::{c.name} v{c.plugin_version}" for c in registry.all_creators
                  if getattr(c, "plugin_namespace", None) == "bdm")


def load_plugins(trt, plugin_library: Path):
    """Register the bdm creators through IPluginRegistry::loadLibrary (getCreators), once per process: loadLibrary
    fails when a creator is already registered, so a process that loaded the library before keeps those."""
    check_plugin_major(plugin_library, trt.__version__)
    registry = trt.get_plugin_registry()
    if registered_bdm_creators(registry):
        return None
    try:
        handle = registry.load_library(str(plugin_library))
    except Exception as e:  # the bindings raise on failure in some versions, return None in others
        handle, error = None, e
    else:
        error = None
    if handle is None:
        raise BdmError(f"TensorRT {trt.__version__} could not load {plugin_library}"
                       f"{f' ({error})' if error else ''}; rebuild it against this TensorRT's headers with "
                       f"`python -m bdm.plugins.build`")
    return handle


def make_logger(trt):
    """A trt.ILogger that keeps errors (its `errors`, for the one-line message) and prints warnings."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                print(f"TensorRT: {msg}", file=sys.stderr)

    return Logger()
