"""`bdm upscale`."""

from pathlib import Path
from typing import Optional

import typer

from bdm.cli import not_implemented


def upscale(
    inputs: Path = typer.Argument(..., help="An image, or a folder of images."),
    output: Path = typer.Argument(..., help="Output image, or a folder when the input is a folder."),
    engine: Optional[Path] = typer.Option(None, help="TensorRT engine (backend: TensorRT)."),
    onnx: Optional[Path] = typer.Option(None, help="ONNX model (backend: ONNX Runtime; the CPU default)."),
    ckpt: Optional[Path] = typer.Option(None, help="Checkpoint (backend: the PyTorch reference)."),
    config: Optional[Path] = typer.Option(None, help="Official options YAML for --ckpt."),
    steps: int = typer.Option(50, help="DDIM steps (the original uses 50)."),
    seed: int = typer.Option(0, help="Seed of the initial noise (drawn on the host, identical for all backends)."),
):
    """Upscale images with the multi-step diffusion sampler around an engine, ONNX model or checkpoint."""
    not_implemented("upscale")


def register(app: typer.Typer):
    app.command()(upscale)
