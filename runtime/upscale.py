"""The `bdm upscale` job: image files in, upscaled image files out, one runner for all of them.

Per image: read (EXIF orientation applied, gray replicated to RGB, alpha apart) -> condition (bicubic x
scale, reflect-pad to multiples of 8) -> host noise from the seed or a .npy file -> DDIM sampler with the
network on the whole image or on blended tiles at every step -> crop -> alpha upscaled bicubically and
re-attached -> written atomically in the input's bit depth with its ICC profile.

A failing image (unreadable, non-finite values during sampling, ...) is reported with its name and the
job goes on with the others; the caller turns `JobSummary.failed` into a non-zero exit.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, TextIO, Tuple

import numpy as np

from bdm.errors import BdmError
from bdm.runtime import image_io
from bdm.runtime.backends import host_memory_budget
from bdm.runtime.noise import draw_noise, load_noise
from bdm.runtime.preprocess import WINDOW, bicubic_resize, condition, crop, pad_to_multiple
from bdm.runtime.sampler import DEFAULT_STEPS, Schedule, ddim_schedule, is_finite, sample
from bdm.runtime.tiling import TiledEps, choose_tiling


@dataclass
class UpscaleSettings:
    scale: int = 4
    steps: int = DEFAULT_STEPS
    seed: int = 0
    noise_file: Optional[Path] = None
    tile: Optional[int] = None                # None: from the memory budget (whole image when it fits)
    tile_overlap: Optional[int] = None        # None: a quarter of the tile
    memory_budget: Optional[int] = None       # bytes; None: the runner's, else a quarter of host memory
    fmt: str = "png"
    overwrite: bool = False
    schedule: dict = field(default_factory=dict)  # ddim_schedule keyword arguments from the options YAML


class NonFiniteError(BdmError):
    pass


def _pad_at_least(x: np.ndarray, min_hw: Tuple[int, int]) -> np.ndarray:
    """Reflect-pad further (right/bottom) for a runner whose smallest accepted shape exceeds the image."""
    h, w = x.shape[-2:]
    need_h = max(0, -(-min_hw[0] // WINDOW) * WINDOW - h)
    need_w = max(0, -(-min_hw[1] // WINDOW) * WINDOW - w)
    if need_h or need_w:
        x = np.pad(x, [(0, 0), (0, 0), (0, need_h), (0, need_w)], mode="reflect")
    return x


class Progress:
    """Progress on stderr: a line per image, its step counter rewritten in place on a terminal
    (every tenth step as its own line otherwise, so logs stay short)."""

    def __init__(self, stream: TextIO, total: int):
        self.stream, self.total = stream, total
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.started = time.perf_counter()

    def begin(self, index: int, name: str):
        self.started = time.perf_counter()
        self.message(f"[{index}/{self.total}] {name}")

    def step(self, info):
        done = info.index + 1
        per_step = (time.perf_counter() - self.started) / done
        line = f"  step {done}/{info.steps} (t={info.timestep}) {per_step:.3f} s/step"
        if self.tty:
            print(f"\r{line}", end="\n" if done == info.steps else "", file=self.stream, flush=True)
        elif done == info.steps or done % max(1, info.steps // 10) == 0:
            self.message(line)

    def message(self, text: str):
        print(text, file=self.stream, flush=True)


@dataclass
class JobSummary:
    written: List[Path] = field(default_factory=list)
    skipped: List[Path] = field(default_factory=list)
    failed: List[Tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0           # the whole job
    sampling_seconds: float = 0.0  # inside the sampler (network + steps), written images only
    steps: int = 0


def plan_outputs(inputs: Path, output: Path, fmt: str) -> List[Tuple[Path, Path]]:
    """(input file, output file) pairs. A folder input maps into an output folder by name and --format."""
    inputs, output = Path(inputs), Path(output)
    if inputs.is_dir():
        if output.exists() and not output.is_dir():
            raise BdmError(f"input {inputs} is a folder, so the output must be a folder; {output} is a file")
        suffix = image_io.output_suffix(fmt)
        files = sorted(p for p in inputs.iterdir()
                       if p.is_file() and p.suffix.lower() in image_io.INPUT_SUFFIXES)
        if not files:
            raise BdmError(f"input folder {inputs} holds no images ({', '.join(sorted(image_io.INPUT_SUFFIXES))})")
        return [(p, output / (p.stem + suffix)) for p in files]
    if not inputs.exists():
        raise BdmError(f"input {inputs}: no such file or folder")
    if output.is_dir():
        return [(inputs, output / (inputs.stem + image_io.output_suffix(fmt)))]
    if not output.parent.is_dir():
        raise BdmError(f"cannot write {output}: folder {output.parent} does not exist; create it first")
    image_io.check_output(output, has_alpha=False)
    return [(inputs, output)]


def upscale_picture(runner, picture: image_io.Picture, settings: UpscaleSettings, schedule: Schedule,
                    budget: int, progress: Optional[Progress] = None, name: str = "image"):
    """Upscale one decoded picture; returns (rgb float32 (H*s, W*s, 3), alpha or None)."""
    h, w = picture.size
    out_h, out_w = h * settings.scale, w * settings.scale
    _, cond_padded = condition(picture.rgb, settings.scale)
    cond_padded = _pad_at_least(cond_padded, runner.limits.min_hw)
    shape = cond_padded.shape
    if settings.noise_file is not None:
        noise = load_noise(settings.noise_file, shape)
    else:
        noise = draw_noise(settings.seed, shape)
    grid, batch = choose_tiling(shape[2], shape[3], runner.limits, budget, settings.tile, settings.tile_overlap)
    if progress is not None:
        tiles = "whole image" if grid.whole else \
            f"{len(grid.origins)} tiles of {grid.tile_h}x{grid.tile_w}, {batch} per call"
        progress.message(f"  {w}x{h} -> {out_w}x{out_h}, {len(schedule)} steps, {tiles}")
        progress.started = time.perf_counter()
    cond_dev = runner.to_device(cond_padded)
    eps_fn = TiledEps(runner, cond_dev, grid, batch)

    def on_step(info):
        if not is_finite(info.x):
            raise NonFiniteError(
                f"step {info.index + 1}/{info.steps} (t={info.timestep}) produced NaN or Inf values, so "
                f"{name} was not written; the backend's precision is likely too low: use an fp32 model or engine")
        if progress is not None:
            progress.step(info)

    x = sample(eps_fn, cond_dev, runner.to_device(noise), schedule, callback=on_step)
    rgb = runner.to_host(crop(x, out_h, out_w))[0].transpose(1, 2, 0)
    alpha = None
    if picture.alpha is not None:
        alpha = np.clip(bicubic_resize(picture.alpha, out_h, out_w), 0.0, 1.0)
    return np.ascontiguousarray(rgb, dtype=np.float32), alpha


def run_job(runner, inputs, output, settings: UpscaleSettings, stream: TextIO = sys.stderr) -> JobSummary:
    """Upscale every input; report each failure by name and go on. See the module docstring."""
    pairs = plan_outputs(inputs, output, settings.fmt)
    if Path(inputs).is_dir():
        Path(output).mkdir(parents=True, exist_ok=True)
    schedule = ddim_schedule(settings.steps, **settings.schedule)
    budget = settings.memory_budget or runner.limits.memory_budget or host_memory_budget()
    summary = JobSummary()
    progress = Progress(stream, len(pairs))
    progress.message(f"bdm: backend {runner.describe()}; x{settings.scale}, {len(schedule)} DDIM steps, "
                     + (f"noise from {settings.noise_file}" if settings.noise_file else f"seed {settings.seed}"))
    started = time.perf_counter()
    for index, (source, target) in enumerate(pairs, 1):
        progress.begin(index, source.name)
        if target.exists() and not settings.overwrite:
            summary.skipped.append(target)
            progress.message(f"  {target} exists, skipped (--overwrite to redo it)")
            continue
        try:
            picture = image_io.read_image(source)
            image_io.check_output(target, picture.alpha is not None)
            sampling_started = time.perf_counter()
            rgb, alpha = upscale_picture(runner, picture, settings, schedule, budget, progress, source.name)
            sampling_seconds = time.perf_counter() - sampling_started
            image_io.write_image(target, rgb, alpha, picture.grayscale, picture.bits, picture.icc_profile)
        except BdmError as e:
            summary.failed.append((source, str(e)))
            progress.message(f"bdm: error: {e}" if str(source) in str(e) else f"bdm: error: {source}: {e}")
            continue
        summary.written.append(target)
        summary.sampling_seconds += sampling_seconds
        summary.steps += len(schedule)
        progress.message(f"  wrote {target}")
    summary.seconds = time.perf_counter() - started
    done = len(summary.written)
    rates = (f"; {summary.seconds / done:.2f} s/image, {summary.sampling_seconds / summary.steps:.3f} s/step"
             if done else "")
    progress.message(f"bdm: {done} upscaled, {len(summary.skipped)} skipped, {len(summary.failed)} failed "
                     f"in {summary.seconds:.1f} s{rates}")
    return summary
