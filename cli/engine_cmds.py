"""`bdm build-engine`, `bdm doctor`."""

from pathlib import Path
from typing import Optional

import typer

from bdm.cli import not_implemented


def build_engine(
    model: Path = typer.Argument(..., help="ONNX file written by `bdm export`."),
    engine: Path = typer.Argument(..., help="Engine file to write (atomically), with a .json sidecar."),
    plugins: Optional[Path] = typer.Option(None, help="libbdm_trt_plugins.so; default: the one built in plugins/."),
    min_shape: str = typer.Option("1x64x64", help="Smallest input, NxHxW."),
    opt_shape: str = typer.Option("1x256x256", help="Input shape TensorRT optimises for, NxHxW."),
    max_shape: str = typer.Option("1x512x512", help="Largest input, NxHxW."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache to load and save."),
    workspace: int = typer.Option(4096, help="Builder workspace limit in MB."),
):
    """Build a TensorRT engine with the bdm plugins (needs TensorRT and an NVIDIA GPU)."""
    not_implemented("build-engine")


def doctor():
    """Print what a deployment needs: GPU, driver/CUDA, TensorRT, ONNX Runtime providers, plugin library."""
    not_implemented("doctor")


def register(app: typer.Typer):
    app.command("build-engine")(build_engine)
    app.command()(doctor)
