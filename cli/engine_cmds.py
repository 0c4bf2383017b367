"""`bdm build-engine`, `bdm doctor`."""

import ctypes
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

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
    from bdm.runtime.trt import build

    # build_engine checks the model and the arguments before it needs TensorRT.
    build.build_engine(model, engine, plugins=plugins, min_shape=min_shape, opt_shape=opt_shape, max_shape=max_shape,
                       timing_cache=timing_cache, workspace_mb=workspace, use_cache=not no_cache,
                       log=lambda line: typer.echo(line, err=True))
    typer.echo(str(engine))


@dataclass
class BackendReport:
    """What `bdm doctor` says about one backend: its lines, and what it lacks to run here (empty: ready)."""

    name: str                 # what `bdm doctor --backend` takes
    option: str               # the option of `bdm upscale` / `bdm generate` that picks it
    lines: List[str]
    missing: List[str] = field(default_factory=list)


def _pytorch() -> BackendReport:
    report = BackendReport("pytorch", "--ckpt", [])
    try:
        import torch
    except ImportError:
        report.lines.append("PyTorch: not installed")
        report.missing.append("PyTorch (pip install torch)")
        return report
    report.lines.append(f"PyTorch: {torch.__version__} (CUDA runtime {torch.version.cuda or 'none: CPU build'})")
    if not torch.cuda.is_available():
        report.lines.append("GPU: none visible to PyTorch")
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        report.lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}")
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            report.lines.append(f"NVIDIA driver: {out.stdout.strip().splitlines()[0]}")
    return report


def _onnxruntime() -> BackendReport:
    report = BackendReport("onnxruntime", "--onnx", [])
    try:
        import onnxruntime as ort
    except ImportError:
        report.lines.append("ONNX Runtime: not installed")
        report.missing.append("ONNX Runtime (pip install onnxruntime, or onnxruntime-gpu)")
        return report
    report.lines.append(f"ONNX Runtime: {ort.__version__}, providers {', '.join(ort.get_available_providers())}")
    report.lines.append(_cpu_path_line())
    return report


def _cpu_path_line() -> str:
    """Which CPU path runs an exported model where ONNX Runtime has no GPU (`--onnx`, `bdm validate`)."""
    from bdm.runtime.kernel_runner import KernelsRefused, load_kernels

    try:
        kernels = load_kernels()
    except KernelsRefused as e:
        return f"CPU path: ONNX Runtime with the function bodies ({e})"
    return f"CPU path: bdm CPU kernels, instruction set {kernels.isa}, {kernels.threads} threads"


def _tensorrt() -> BackendReport:
    """TensorRT, a GPU, and the plugin library: found, built for which TensorRT, loadable, its creators."""
    from bdm.plugins import build as plugin_build
    from bdm.files import file_sha256
    from bdm.runtime.trt import environment

    report = BackendReport("tensorrt", "--engine", [])
    least = ".".join(map(str, environment.MIN_TENSORRT))
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        report.lines.append("TensorRT: not installed")
        report.missing.append(f"TensorRT >= {least} (not installed: `pip install 'bdm[tensorrt]'` on a machine with "
                              f"an NVIDIA GPU and driver)")
    else:
        report.lines.append(f"TensorRT: {trt.__version__}")
        try:
            environment.check_tensorrt_version(trt.__version__)
        except BdmError:
            report.missing.append(f"TensorRT >= {least} ({trt.__version__} is installed: pip install "
                                  f"'tensorrt>={least}')")
    try:
        environment.gpu_identity()
    except BdmError:
        report.missing.append("an NVIDIA GPU visible to PyTorch (none is: a driver and a CUDA build of PyTorch)")
    try:
        kernels = plugin_build.find_kernels_library()
        library = plugin_build.find_plugins_library()
    except BdmError as e:  # an environment variable naming a missing file
        report.lines.append(f"plugin libraries: {e}")
        report.missing.append(str(e))
        return report
    report.lines.append(f"kernel library: {kernels or 'not built (python -m bdm.plugins.build)'}")
    if library is None:
        report.lines.append("TensorRT plugin library: not built (python -m bdm.plugins.build, with TensorRT headers)")
        report.missing.append(f"{plugin_build.PLUGINS_LIB} (python -m bdm.plugins.build, with the TensorRT headers)")
        return report
    version_file = library.with_name("bdm_trt_plugins.version")
    built_for = version_file.read_text().strip() if version_file.is_file() else "unknown"
    report.lines.append(f"TensorRT plugin library: {library} (TensorRT {built_for} headers, sha256 "
                        f"{file_sha256(library)[:16]})")
    problem = _plugin_library_problem(trt, library)
    if problem:
        report.lines.append(f"TensorRT plugin library: does not load: {problem}")
        report.missing.append(f"a plugin library that loads ({problem})")
    elif trt is not None:
        creators = environment.registered_bdm_creators(trt.get_plugin_registry())
        report.lines.append(f"registered creators: {', '.join(creators) or 'none'}")
    else:
        report.lines.append(f"creators in the library: {_harness_creators(library)}")
    return report


def _plugin_library_problem(trt, library: Path) -> Optional[str]:
    """Why the plugin library does not load (None when it does): into TensorRT where it is installed (the major
    check, loadLibrary), else with a plain dlopen (the library needs no TensorRT to load)."""
    if trt is not None:
        from bdm.runtime.trt.environment import load_plugins

        try:
            load_plugins(trt, library)
        except BdmError as e:
            return str(e)
        return None
    try:
        ctypes.CDLL(str(library))
    except OSError as e:
        return str(e).splitlines()[0]
    return None


def _harness_creators(library: Path) -> str:
    """The creators the library exports, listed by the host-only harness built beside it (no TensorRT needed)."""
    from bdm.plugins import build as plugin_build

    harness = library.with_name(plugin_build.HARNESS_EXE)
    if not harness.is_file():
        return f"unknown (no {plugin_build.HARNESS_EXE} beside it)"
    out = subprocess.run([str(harness), str(library), "-"], capture_output=True, text=True)
    try:
        return ", ".join(c["name"] for c in json.loads(out.stdout)["creators"])
    except (ValueError, KeyError):
        return f"unknown ({(out.stderr.strip().splitlines() or ['the harness failed'])[0]})"


# One report per backend, in the order printed: a new backend (or a check of an existing one) is one more entry.
BACKEND_REPORTS = [_pytorch, _onnxruntime, _tensorrt]


def doctor(
    backend: Optional[List[str]] = typer.Option(
        None, "--backend", help="Fail (one line, exit 2) unless this backend can run here: pytorch, onnxruntime, "
                                "tensorrt (repeatable)."),
):
    """Print what each backend needs and what is ready: GPU, driver/CUDA, ONNX Runtime providers, TensorRT, the
    plugin library and its creators."""
    import bdm

    asked = list(backend or [])
    typer.echo(f"bdm {bdm.__version__}, Python {platform.python_version()}, {platform.platform()}")
    reports = []
    for make_report in BACKEND_REPORTS:
        report = make_report()
        reports.append(report)
        for line in report.lines:
            typer.echo(line)
    for report in reports:
        state = "ready" if not report.missing else f"not ready, needs: {'; '.join(report.missing)}"
        typer.echo(f"backend {report.name} ({report.option}): {state}")
    names = [r.name for r in reports]
    unknown = [name for name in asked if name not in names]
    if unknown:
        raise BdmError(f"--backend {unknown[0]}: no such backend; choose from {', '.join(names)}")
    for report in reports:
        if report.name in asked and report.missing:
            sys.stdout.flush()
            raise BdmError(f"backend {report.name} cannot run here; it needs: {'; '.join(report.missing)}")


def register(app: typer.Typer):
    app.command("build-engine")(build_engine)
    app.command()(doctor)
