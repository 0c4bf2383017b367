"""`bdm generate`: unconditional sampling (BinaryDM and other pixel-space LDM-style UNets)."""

import sys
from pathlib import Path
from typing import Optional

import typer

from bdm.errors import BdmError
from bdm.runtime.generate import GenerateSettings


def generate(
    output: Path = typer.Argument(..., help="Image grid to write (.png, .jpg, .webp or .tif), atomically."),
    engine: Optional[Path] = typer.Option(None, help="TensorRT engine (backend: TensorRT)."),
    onnx: Optional[Path] = typer.Option(None, help="ONNX model (backend: the bdm CPU kernels, else ONNX Runtime; "
                                                   "the CPU default)."),
    ckpt: Optional[Path] = typer.Option(None, help="Checkpoint (backend: the PyTorch reference)."),
    config: Optional[Path] = typer.Option(
        None, help="LDM YAML (or golden UNet JSON): network for --ckpt; schedule and image size for every backend "
                   "(default: what `bdm export` recorded in the model)."),
    plugins: Optional[Path] = typer.Option(None, help="Plugin library for --engine (default: the built one)."),
    device: Optional[str] = typer.Option(None, help="Device for --ckpt: cpu or cuda (default: cuda if present)."),
    mode: Optional[str] = typer.Option(
        None, help="Activation-step mode for --ckpt: static (default), dynamic, w1a32 or fp."),
    num: int = typer.Option(GenerateSettings.num, help="Number of samples (the grid holds ceil(sqrt(num)) per row)."),
    steps: int = typer.Option(GenerateSettings.steps, help=f"DDIM steps (LDM's DDIMSampler, eta 0; BinaryDM samples "
                                                           f"with {GenerateSettings.steps})."),
    seed: int = typer.Option(0, help="Seed of the initial noise (drawn on the host, identical for all backends)."),
    noise_file: Optional[Path] = typer.Option(None, help="Replay the initial noise from a .npy [num,C,H,W] file."),
    size: Optional[int] = typer.Option(None, help="Image side in pixels (default: the model's image_size)."),
    batch: Optional[int] = typer.Option(None, help="Samples per network call (default: all; dynamic-mode models "
                                                   "quantize with statistics of the whole call)."),
):
    """Sample images from an unconditional diffusion model with DDIM and write them as one grid."""
    from bdm.contract import UNCONDITIONAL_INPUT_NAMES
    from bdm.runtime.backends import make_runner, require_inputs
    from bdm.runtime.generate import check_request, generate as run_generate
    from bdm.runtime.options import OptionError, generate_options, set_mode

    if noise_file is not None and not noise_file.is_file():
        raise BdmError(f"--noise-file {noise_file}: no such file; give a .npy written by numpy.save")
    runner = make_runner(engine, onnx, ckpt, config, plugins, device)
    require_inputs(runner, UNCONDITIONAL_INPUT_NAMES)  # before asking it for sampling settings
    try:
        options = generate_options(config, runner)
    except OptionError as e:
        raise BdmError(f"{e}; pass --config <the LDM YAML>") from None
    try:
        set_mode(runner, mode)
    except OptionError as e:
        raise BdmError(f"--mode {mode}: {e}; --mode applies to --ckpt (export again with `bdm export --mode {mode}` "
                       f"for this mode)") from None
    settings = GenerateSettings(num=num, steps=steps, seed=seed, image_size=size or options.image_size,
                                channels=options.channels, noise_file=noise_file, batch=batch,
                                schedule=options.schedule)
    check_request(runner, output, settings)
    summary = run_generate(runner, output, settings, stream=sys.stderr)
    print(summary.path)


def register(app: typer.Typer):
    app.command()(generate)
