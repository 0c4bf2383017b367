"""Shared by the plugin tests and their fixtures (a module with a unique name: `conftest` is ambiguous on sys.path)."""

import os
import shutil
from pathlib import Path

import pytest

from bdm.plugins import build as plugin_build

BUILD_DIR = Path(plugin_build.PLUGINS_DIR).parent / "build" / "plugins-test"
SYSTEM_TRT_INCLUDES = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include",
                       "/usr/local/TensorRT/include")


def tensorrt_header_dirs():
    """TensorRT include folders to test against: $TENSORRT_INCLUDE_DIR / $TensorRT_INCLUDE_DIR (several may be
    given, ':'-separated, e.g. the 10.x and 11.x headers), $TENSORRT_ROOT/include, else the system's."""
    listed = []
    for var in ("TENSORRT_INCLUDE_DIR", "TensorRT_INCLUDE_DIR"):
        listed += [d for d in os.environ.get(var, "").split(os.pathsep) if d]
    if os.environ.get("TENSORRT_ROOT"):
        listed.append(str(Path(os.environ["TENSORRT_ROOT"]) / "include"))
    if not listed:
        listed = [d for d in SYSTEM_TRT_INCLUDES if (Path(d) / "NvInferRuntime.h").is_file()]
    return list(dict.fromkeys(listed))


def require_toolchain():
    missing = [tool for tool in ("cmake", "nvcc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH: the CUDA kernels cannot be built here")
