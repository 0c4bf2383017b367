"""`bdm build-engine`, `bdm doctor`."""

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from bdm.errors import BdmError


def build_engine(
    model: Path = typer.Argument(..., help="ONNX file written by `bdm export` (BI-DiffSR: inputs x_t, cond, t; "
                                           "unconditional BinaryDM: x_t, t)."),
    engine: Path = typer.Argument(..., help="Engine file to write (atomically), with a .json sidecar."),
    plugins: Optional[Path] = typer.Option(None, help="libbdm_trt_plugins.so; default: the one built in plugins/."),
    min_shape: Optional[str] = typer.Option(None, help="Smallest input, NxHxW (default: 1x64x64; an unconditional "
                                                       "model: 1xSxS, S the image size it samples)."),
    opt_shape: Optional[str] = typer.Option(None, help="Input shape TensorRT optimises for, NxHxW (default: "
                                                       "1x256x256; an unconditional model: 16xSxS, what `bdm "
                                                       "generate` feeds by default)."),
    max_shape: Optional[str] = typer.Option(None, help="Largest input, NxHxW (default: 1x512x512; an unconditional "
                                                       "model: 16xSxS)."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache to load and save "
                                                           "(default: one per GPU model and TensorRT version)."),
    workspace: int = typer.Option(4096, help="Builder workspace limit in MB."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Rebuild even if this model was built before here."),
):
    """Build a TensorRT engine with the bdm plugins (needs TensorRT and an NVIDIA GPU)."""
    from bdm.runtime import trt_backend

    # build_engine checks the model and the arguments before it needs TensorRT.
    trt_backend.build_engine(model, engine, plugins=plugins, min_shape=min_shape, opt_shape=opt_shape,
                             max_shape=max_shape, timing_cache=timing_cache, workspace_mb=workspace,
                             use_cache=not no_cache, log=lambda line: typer.echo(line, err=True))
    typer.echo(str(engine))


def _gpu_lines() -> List[str]:
    try:
        import torch
    except ImportError:
        return ["GPU: unknown (PyTorch is not installed)"]
    lines = [f"PyTorch: {torch.__version__} (CUDA runtime {torch.version.cuda or 'none: CPU build'})"]
    if not torch.cuda.is_available():
        lines.append("GPU: none visible to PyTorch")
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}")
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            lines.append(f"NVIDIA driver: {out.stdout.strip().splitlines()[0]}")
    return lines


def _onnxruntime_line() -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return "ONNX Runtime: not installed"
    return f"ONNX Runtime: {ort.__version__}, providers {', '.join(ort.get_available_providers())}"


def _cpu_path_line() -> str:
    """Which CPU path runs an exported model where ONNX Runtime has no GPU (`--onnx`, `bdm validate`)."""
    from bdm.runtime.kernel_runner import KernelsRefused, load_kernels

    try:
        kernels = load_kernels()
    except KernelsRefused as e:
        return f"CPU path: ONNX Runtime with the function bodies ({e})"
    return f"CPU path: bdm CPU kernels, instruction set {kernels.isa}, {kernels.threads} threads"


def _plugin_lines(trt) -> Tuple[List[str], Optional[Path]]:
    from bdm.plugins import build as plugin_build
    from bdm.runtime.trt_backend import file_sha256

    lines = []
    kernels = plugin_build.find_kernels_library()
    lines.append(f"kernel library: {kernels or 'not built (python -m bdm.plugins.build)'}")
    library = plugin_build.find_plugins_library()
    if library is None:
        lines.append("TensorRT plugin library: not built (python -m bdm.plugins.build, with TensorRT headers)")
        return lines, None
    version_file = library.with_name("bdm_trt_plugins.version")
    built_for = version_file.read_text().strip() if version_file.is_file() else "unknown"
    lines.append(f"TensorRT plugin library: {library} (TensorRT {built_for} headers, sha256 {file_sha256(library)[:16]})")
    if trt is not None:
        from bdm.runtime.trt_backend import load_plugins

        load_plugins(trt, library)
        creators = sorted(f"{c.plugin_namespace}::{c.name} v{c.plugin_version}"
                          for c in trt.get_plugin_registry().all_creators if c.plugin_namespace == "bdm")
        lines.append(f"registered creators: {', '.join(creators) or 'none'}")
    else:
        harness = library.with_name(plugin_build.HARNESS_EXE)
        if harness.is_file():  # lists the creators without TensorRT (host-only harness)
            out = subprocess.run([str(harness), str(library), "-"], capture_output=True, text=True)
            if out.returncode == 0:
                names = [c["name"] for c in json.loads(out.stdout)["creators"]]
                lines.append(f"creators in the library: {', '.join(names)}")
    return lines, library


def doctor():
    """Print what a deployment needs: GPU, driver/CUDA, TensorRT, ONNX Runtime providers, plugin library."""
    import bdm

    lines = [f"bdm {bdm.__version__}, Python {platform.python_version()}, {platform.platform()}"]
    lines += _gpu_lines()
    lines.append(_onnxruntime_line())
    lines.append(_cpu_path_line())
    try:
        import tensorrt as trt
        lines.append(f"TensorRT: {trt.__version__}")
    except ImportError:
        trt = None
        lines.append("TensorRT: not installed")
    plugin_lines, _ = _plugin_lines(trt)
    lines += plugin_lines
    for line in lines:
        typer.echo(line)
    if trt is None:
        from bdm.runtime.trt_backend import INSTALL_TENSORRT

        sys.stdout.flush()
        raise BdmError(INSTALL_TENSORRT)


def register(app: typer.Typer):
    app.command("build-engine")(build_engine)
    app.command()(doctor)
