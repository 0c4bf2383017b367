"""`bdm upscale` (the main job) and `bdm bench`."""

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from bdm.contract import SCALE_KEY
from bdm.errors import BdmError
from bdm.runtime.sampler import DEFAULT_STEPS

def upscale(
    ctx: typer.Context,
    inputs: List[Path] = typer.Argument(
        ..., help="An image (PNG/JPEG/WebP/TIFF), a folder of images, or several images, folders and quoted "
                  "glob patterns ('photos/*.jpg')."),
    output: Path = typer.Argument(..., help="Output image, or a folder (always a folder for several inputs)."),
    engine: Optional[Path] = typer.Option(None, help="TensorRT engine (backend: TensorRT)."),
    onnx: Optional[Path] = typer.Option(None, help="ONNX model (backend: the bdm CPU kernels, else ONNX Runtime; "
                                                   "the CPU default)."),
    ckpt: Optional[Path] = typer.Option(None, help="Checkpoint (backend: the PyTorch reference)."),
    config: Optional[Path] = typer.Option(
        None, help="Official options YAML: network for --ckpt; scale and beta_schedule for every backend."),
    plugins: Optional[Path] = typer.Option(None, help="Plugin library for --engine (default: the built one)."),
    device: Optional[str] = typer.Option(None, help="Device for --ckpt: cpu or cuda (default: cuda if present)."),
    scale: Optional[int] = typer.Option(
        None, min=1, help="Upscaling factor (default: the config's `scale`, else 4 as the released x4)."),
    steps: Optional[int] = typer.Option(
        None, help=f"DDIM steps (default: the config's num_inference_steps, else {DEFAULT_STEPS} as the original)."),
    seed: int = typer.Option(0, help="Seed of the initial noise (drawn on the host, identical for all backends)."),
    noise_file: Optional[Path] = typer.Option(None, help="Replay the initial noise from a .npy [1,3,H,W] file."),
    tile: Optional[int] = typer.Option(
        None, help="Tile side in pixels (multiple of 8); default from --memory-budget, whole image if it fits."),
    tile_overlap: Optional[int] = typer.Option(None, help="Tile overlap in pixels (default: a quarter tile)."),
    memory_budget: Optional[int] = typer.Option(
        None, help="MiB the network may use per call (default: a quarter of RAM, or the engine's)."),
    fmt: str = typer.Option("png", "--format", help="Output format for folder outputs: png, jpg, webp, tif."),
    overwrite: bool = typer.Option(False, help="Redo outputs that already exist (default: skip them)."),
    threads: Optional[int] = typer.Option(
        None, min=1, help="CPU threads per runner (default: one per core; with --ray: the cores / --workers)."),
    ray: bool = typer.Option(False, "--ray", help="Spread the images over the workers of a Ray cluster "
                                                  "(needs Ray: the 'ray' extra of bdm)."),
    ray_address: Optional[str] = typer.Option(
        None, help="With --ray: the cluster's head node, host:port (default: $RAY_ADDRESS, else start Ray here)."),
    workers: Optional[int] = typer.Option(
        None, min=1, help="With --ray: runners on the cluster (default: one per GPU, else cores / --threads)."),
):
    """Upscale images with the multi-step diffusion sampler around an engine, ONNX model or checkpoint (none
    given: the bundled demo model, x4)."""
    from bdm.contract import CONDITIONAL_INPUT_NAMES
    from bdm.runtime.backends import make_runner, require_inputs
    from bdm.runtime.options import OptionError, read_options, upscale_options
    from bdm.runtime.upscale import UpscaleSettings, plan_outputs, run_job

    if (ray_address or workers) and not ray:
        raise BdmError("--ray-address and --workers go with --ray; add --ray to run on a Ray cluster")
    plan_outputs(inputs, output, fmt)  # bad paths fail before a model is loaded
    if noise_file is not None and not noise_file.is_file():
        raise BdmError(f"--noise-file {noise_file}: no such file; give a .npy written by numpy.save")
    try:
        options = read_options(config)
    except OptionError as e:
        raise BdmError(f"--config {e}") from None
    sampling = upscale_options(options)  # a schedule bdm does not run fails before a model is loaded
    if not (engine or onnx or ckpt):
        from bdm.runtime import demo_model

        onnx = demo_model.onnx_path()
        print(f"bdm: no model given; using the bundled demo model {onnx.name} ({demo_model.SUMMARY})",
              file=sys.stderr)
    chosen_runner = functools.partial(make_runner, engine, onnx, ckpt, config, plugins, device)
    if ray:  # each worker builds its runner from chosen_runner (picklable): the backend choice made here
        from bdm.runtime.cluster import RayWorkers, ray_session

        ctx.with_resource(ray_session(ray_address))  # left (workers killed, Ray stopped) when the command ends
        runner = ctx.with_resource(RayWorkers(chosen_runner, workers, threads, gpus=device != "cpu"))
        job = runner.run_job
    else:
        runner = chosen_runner(threads=threads)
        job = functools.partial(run_job, runner)
    require_inputs(runner, CONDITIONAL_INPUT_NAMES)  # an unconditional model would ignore cond and upscale nothing
    recorded = getattr(runner, "metadata", {}).get(SCALE_KEY)
    scale = sampling.resolve_scale(scale, recorded, lambda released: print(
        f"bdm: no --scale and no scale in the config; using x{released} (the released model)", file=sys.stderr))
    if recorded is not None and int(recorded) != scale:
        print(f"bdm: warning: upscaling x{scale}, but {runner.describe()} was exported for x{recorded}; the output "
              f"will be poor unless the network was trained for x{scale}", file=sys.stderr)
    settings = UpscaleSettings(
        scale=scale, steps=sampling.resolve_steps(steps), seed=seed, noise_file=noise_file, tile=tile,
        tile_overlap=tile_overlap, memory_budget=memory_budget << 20 if memory_budget else None, fmt=fmt,
        overwrite=overwrite, schedule=sampling.schedule)
    summary = job(inputs, output, settings)
    for path in summary.written:
        print(path)
    if summary.failed:
        raise typer.Exit(1)


def bench(
    steps: int = typer.Option(DEFAULT_STEPS, help="DDIM steps per run."),
    size: int = typer.Option(64, help="LR side in pixels; x4 gives the network input size (64 -> 256)."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated subset, e.g. torch-cpu,kernels-cpu "
                                                      "(ort-cpu: ONNX Runtime, kernels-cpu: the bdm CPU kernels)."),
):
    """Per-step and end-to-end time and peak memory of every backend available here (released x4 network,
    random weights built locally: nothing is downloaded)."""
    from bdm.runtime.bench import main as bench_main

    bench_main(steps=steps, size=size, only=backends.split(",") if backends else None)


def register(app: typer.Typer):
    app.command()(upscale)
    app.command()(bench)
