"""`bdm export`, `bdm validate`, `bdm inspect`."""

from pathlib import Path
from typing import Optional

import typer

from bdm.cli import not_implemented


def export(
    ckpt: Path = typer.Argument(..., help="Official checkpoint (.pth): BI-DiffSR {'params': ...} or BinaryDM."),
    output: Path = typer.Argument(..., help="ONNX file to write (written atomically)."),
    config: Optional[Path] = typer.Option(None, help="Official options YAML; default: the released x2/x4 network."),
    dtype: str = typer.Option("fp32", help="Activation and FP-weight precision: fp32 or fp16."),
    opset: int = typer.Option(17, help="ONNX opset of the main graph."),
    fused: bool = typer.Option(True, help="One fused node per binary conv (default) or the unfused debug form."),
    validate: bool = typer.Option(True, help="Compare ONNX Runtime with PyTorch before reporting success."),
):
    """Export a checkpoint to ONNX with bit-packed `bdm` custom ops and executable function bodies."""
    not_implemented("export")


def validate(
    model: Path = typer.Argument(..., help="ONNX file written by `bdm export`."),
    ckpt: Path = typer.Option(..., help="The checkpoint it was exported from (the PyTorch reference)."),
    config: Optional[Path] = typer.Option(None, help="Official options YAML, as given to `bdm export`."),
    engine: Optional[Path] = typer.Option(None, help="Also compare a TensorRT engine (needs TensorRT and a GPU)."),
    plugins: Optional[Path] = typer.Option(None, help="Plugin library for --engine."),
):
    """Output parity between PyTorch, ONNX Runtime and (optionally) TensorRT, via Polygraphy's Comparator."""
    not_implemented("validate")


def inspect(model: Path = typer.Argument(..., help="ONNX file written by `bdm export`.")):
    """Op census, packed versus latent weight size, and compression ratio of an exported model."""
    not_implemented("inspect")


def register(app: typer.Typer):
    app.command()(export)
    app.command()(validate)
    app.command()(inspect)
