"""`bdm export`, `bdm validate`, `bdm inspect`."""

from pathlib import Path
from typing import Optional

import typer

from bdm.contract import DEFAULT_OPSET
from bdm.errors import BdmError

_ZERO_SIGNS = {"+1": 1, "1": 1, "-1": -1}


def _zero_sign(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    if text not in _ZERO_SIGNS:
        raise BdmError(f"--zero-weight-sign {text}: give +1 or -1")
    return _ZERO_SIGNS[text]


def _err(line: str):
    typer.echo(line, err=True)


def export(
    ckpt: Path = typer.Argument(..., help="Official BI-DiffSR checkpoint (.pth, {'params': ...}), or BinaryDM "
                                          "(Lightning or UNet state_dict, with --config <LDM YAML>)."),
    output: Path = typer.Argument(..., help="ONNX file to write (atomically: nothing is left on failure)."),
    config: Optional[Path] = typer.Option(None, help="Official options YAML; default: the released x2/x4 network."),
    dtype: str = typer.Option("fp32", help="Activation and FP-weight precision: fp32 or fp16 (tables stay fp32)."),
    opset: int = typer.Option(DEFAULT_OPSET, help="ONNX opset of the main graph (>= 17)."),
    fused: bool = typer.Option(True, help="One fused node per binary conv (default), or the unfused debug form "
                                          "TimestepBias -> BinarySignConv2d -> TimestepRPReLU -> Add."),
    validate: bool = typer.Option(True, help="Compare ONNX Runtime with PyTorch before reporting success."),
    zero_weight_sign: Optional[str] = typer.Option(
        None, help="Export exact-zero latent binary weights as +1 or -1 (default: refuse them)."),
    mode: Optional[str] = typer.Option(
        None, help="BinaryDM only: activation steps static (stored, the default), dynamic (computed in the graph), "
                   "w1a32 (no activation quantization) or fp (latent weights); recorded in the model."),
    act_mode: Optional[str] = typer.Option(None, hidden=True, help="The former name of --mode."),
):
    """Export a checkpoint to ONNX with bit-packed `bdm` custom ops and executable function bodies."""
    from bdm.export import registry
    from bdm.export.base.family import ExportOptions

    if mode is not None and act_mode is not None and mode != act_mode:
        raise BdmError(f"--mode {mode} and --act-mode {act_mode}: --act-mode is the former name of --mode; give one")
    options = ExportOptions(dtype=dtype, opset=opset, fused=fused, mode=mode or act_mode, validate=validate,
                            zero_weight_sign=_zero_sign(zero_weight_sign))
    done = registry.export_checkpoint(ckpt, output, config, options, log=_err)
    summary = registry.inspect_file(done.path)
    _err(f"exported in {done.seconds:.1f} s: {summary.file_bytes / 1e6:.2f} MB, latent fp32 "
         f"{summary.latent_fp32_bytes / 1e6:.2f} MB, compression {summary.compression_ratio:.2f}x"
         + ("" if done.validation is None else f"; ONNX Runtime vs PyTorch: {done.validation.summary()}"))
    typer.echo(str(done.path))


def validate(
    model: Path = typer.Argument(..., help="ONNX file written by `bdm export`."),
    ckpt: Path = typer.Option(..., help="The checkpoint it was exported from (the PyTorch reference)."),
    config: Optional[Path] = typer.Option(None, help="Official options YAML; default: the network recorded in the "
                                                     "model by `bdm export`."),
    engine: Optional[Path] = typer.Option(None, help="Also compare a TensorRT engine (needs TensorRT and a GPU)."),
    plugins: Optional[Path] = typer.Option(None, help="Plugin library for --engine."),
    shape: str = typer.Option("1x64x64", help="Input shape NxHxW (H, W multiples of 8; inside the engine profile)."),
    seed: int = typer.Option(0, help="Seed of the random inputs."),
):
    """Output parity between PyTorch, ONNX Runtime, the bdm CPU kernels and (optionally) TensorRT, via Polygraphy's
    Comparator."""
    from bdm.export import registry
    from bdm.runtime.kernel_runner import comparison_runner
    from bdm.runtime.backends import trt_runner
    from bdm.runtime.trt.profile import parse_nhw

    nhw = parse_nhw(shape, "--shape")
    open_engine = None if engine is None else (lambda: trt_runner(engine, plugins))
    report = registry.validate_file(model, ckpt, config, nhw, open_engine, seed, log=typer.echo,
                                    open_kernels=lambda: comparison_runner(model, typer.echo))
    failed = [c for c in report.cases if not c.passed]
    if failed:
        raise BdmError(f"{len(failed)} of {len(report.cases)} comparisons exceed {report.tolerance:.0e} * max|eps| "
                       f"(first: {failed[0].runner} at t={failed[0].t0}); see the lines above")
    typer.echo(f"PASSED: {report.summary()}")


def inspect(model: Path = typer.Argument(..., help="ONNX file written by `bdm export`.")):
    """Op census, packed versus latent weight size, and compression ratio of an exported model."""
    from bdm.export import registry

    for line in registry.inspect_file(model).lines():
        typer.echo(line)


def register(app: typer.Typer):
    app.command()(export)
    app.command()(validate)
    app.command()(inspect)
