"""`bdm generate`: unconditional sampling (BinaryDM and other pixel-space LDM-style UNets)."""

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from bdm.contract import ACT_MODE_KEY, BINARYDM, SAMPLING_KEY
from bdm.errors import BdmError
from bdm.runtime.generate import GenerateSettings


def _sampling_options(config: Optional[Path], runner) -> dict:
    """--config first, then what `bdm export` recorded in the model, then the released (bedrooms) config."""
    from bdm.export.binarydm.config import sampling_options

    if config is not None:
        return sampling_options(config)
    recorded = getattr(runner, "metadata", {}).get(SAMPLING_KEY)
    if recorded is not None:
        return json.loads(recorded)
    if getattr(runner, "metadata", None) is not None:
        raise BdmError(f"{runner.describe()} records no sampling settings (not exported by this bdm for an "
                       f"unconditional model); pass --config <the LDM YAML>")
    return sampling_options(None)


def _set_mode(runner, mode: Optional[str]):
    """--mode applies to a checkpoint; an exported model carries the mode it was exported in."""
    from bdm.export.registry import FAMILIES

    model = getattr(runner, "model", None)
    if model is not None:
        family = FAMILIES[BINARYDM]
        family.set_mode(model, mode or family.default_mode)
    elif mode is not None:
        recorded = getattr(runner, "metadata", {}).get(ACT_MODE_KEY)
        if recorded != mode:
            raise BdmError(f"--mode {mode}: {runner.describe()} was exported in mode {recorded}; --mode applies to "
                           f"--ckpt (export again with `bdm export --act-mode {mode}` for this mode)")


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
    from bdm.runtime.backends import UNCONDITIONAL_INPUT_NAMES, make_runner, require_inputs
    from bdm.runtime.generate import check_request, generate as run_generate

    if noise_file is not None and not noise_file.is_file():
        raise BdmError(f"--noise-file {noise_file}: no such file; give a .npy written by numpy.save")
    runner = make_runner(engine, onnx, ckpt, config, plugins, device)
    require_inputs(runner, UNCONDITIONAL_INPUT_NAMES)  # before asking it for sampling settings
    options = _sampling_options(config, runner)
    if options["space"] != "pixel":
        raise BdmError("this is a latent diffusion model (its first stage is an autoencoder whose decoder is not "
                       "part of the UNet): bdm generate samples pixel-space models only")
    _set_mode(runner, mode)
    schedule = {"num_train_timesteps": options["timesteps"], "linear_start": options["linear_start"],
                "linear_end": options["linear_end"]}
    settings = GenerateSettings(num=num, steps=steps, seed=seed, image_size=size or options["image_size"],
                                channels=options["channels"], noise_file=noise_file, batch=batch, schedule=schedule)
    check_request(runner, output, settings)
    summary = run_generate(runner, output, settings, stream=sys.stderr)
    print(summary.path)


def register(app: typer.Typer):
    app.command()(generate)
