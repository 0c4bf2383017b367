"""The `bdm generate` job: unconditional DDIM sampling (eta = 0, LDM's DDIMSampler schedule) of a pixel-space
model such as BinaryDM, N samples written as one image grid.

x_T ~ N(0, I) is drawn on the host from the seed for the whole [N, C, H, W] batch (or replayed from a .npy file),
so every backend and every --batch sees the same noise. Each step calls the runner on chunks of at most `batch`
samples (all N by default, as LDM samples its batch; a model in BinaryDM's dynamic mode quantizes with statistics of
the whole call, so its samples depend on the chunking). The final x, in LDM's data range [-1, 1], becomes
clamp((x + 1) / 2, 0, 1) as LDM's sampling scripts do, and the samples are tiled row by row into a grid with
a 2-pixel black border (torchvision's make_grid layout), written atomically.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import numpy as np

from bdm.contract import OUTPUT_NAME, UNCONDITIONAL_INPUT_NAMES
from bdm.errors import BdmError
from bdm.runtime import image_io
from bdm.runtime.backends import require_inputs
from bdm.runtime.noise import draw_noise, load_noise
from bdm.runtime.sampler import LDM_DEFAULT_STEPS, is_finite, ldm_ddim_schedule, sample
from bdm.runtime.upscale import NonFiniteError, Progress

GRID_PADDING = 2


@dataclass
class GenerateSettings:
    num: int = 16
    steps: int = LDM_DEFAULT_STEPS
    seed: int = 0
    image_size: int = 32                      # H = W of x_t
    channels: int = 3                         # C of x_t: 3 (RGB) or 1 (gray)
    noise_file: Optional[Path] = None
    batch: Optional[int] = None               # samples per network call; None: all of them
    schedule: dict = field(default_factory=dict)  # ldm_ddim_schedule keyword arguments


@dataclass
class GenerateSummary:
    path: Path
    seconds: float          # sampling (network + steps)
    steps: int


def image_grid(images: np.ndarray, padding: int = GRID_PADDING) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> one [rows*(H+p)+p, cols*(W+p)+p, C] image, cols = ceil(sqrt(N)), black border."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.float32)
    for i, image in enumerate(images):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = image.transpose(1, 2, 0)
    return grid


def check_request(runner, output, settings: GenerateSettings) -> Path:
    """Fail before any sampling: a conditional model, a bad output path or a shape the model cannot take."""
    require_inputs(runner, UNCONDITIONAL_INPUT_NAMES)
    output = Path(output)
    if not output.parent.is_dir():
        raise BdmError(f"cannot write {output}: folder {output.parent} does not exist; create it first")
    image_io.check_output(output, has_alpha=False)
    if settings.num < 1:
        raise BdmError(f"--num {settings.num}: give at least one sample")
    if settings.channels not in (1, 3):
        raise BdmError(f"the model samples {settings.channels}-channel images; bdm generate writes 1 (gray) or 3 "
                       f"(RGB) channels")
    multiple = getattr(getattr(runner, "model", None), "size_multiple", 1)
    if settings.image_size < 1 or settings.image_size % multiple:
        raise BdmError(f"--size {settings.image_size} is not a positive multiple of {multiple} (the UNet halves the "
                       f"image {int(math.log2(multiple))} times)")
    side, (min_h, min_w), max_hw = settings.image_size, runner.limits.min_hw, runner.limits.max_hw
    if side < max(min_h, min_w) or (max_hw is not None and side > min(max_hw)):
        accepted = f"{min_h}x{min_w} to {max_hw[0]}x{max_hw[1]}" if max_hw else f"{min_h}x{min_w} or more"
        raise BdmError(f"--size {side} (default: the model's image size): {runner.describe()} takes images of "
                       f"{accepted}; give a --size in that range"
                       + (f", or rebuild the engine with a profile that contains {side}x{side} (`bdm build-engine`)"
                          if max_hw else ""))
    return output


def generate(runner, output, settings: GenerateSettings, stream: TextIO = sys.stderr) -> GenerateSummary:
    """Sample settings.num images with `runner` (inputs x_t, t -> eps) and write their grid to `output`."""
    output = check_request(runner, output, settings)
    schedule = ldm_ddim_schedule(settings.steps, **settings.schedule)
    shape = (settings.num, settings.channels, settings.image_size, settings.image_size)
    noise = load_noise(settings.noise_file, shape) if settings.noise_file else draw_noise(settings.seed, shape)
    batch = min(settings.batch or settings.num, runner.limits.max_batch or settings.num)
    if batch < 1:
        raise BdmError(f"--batch {settings.batch}: give at least one sample per call")

    def eps_fn(x, cond, t):
        eps = runner.to_device(np.empty(shape, dtype=np.float32))
        for start in range(0, settings.num, batch):
            chunk = x[start:start + batch]
            feed = {"x_t": chunk, "t": np.full(chunk.shape[0], t, dtype=np.int64)}
            eps[start:start + batch] = runner.infer(feed)[OUTPUT_NAME]
        return eps

    progress = Progress(stream, 1)
    side = settings.image_size
    progress.message(f"bdm: backend {runner.describe()}; {settings.num} samples of {settings.channels}x{side}x{side}, "
                     f"{len(schedule)} DDIM steps (t {schedule.timesteps[0]}..{schedule.timesteps[-1]}), "
                     f"{batch} per call, "
                     + (f"noise from {settings.noise_file}" if settings.noise_file else f"seed {settings.seed}"))
    progress.begin(1, output.name)

    def on_step(info):
        if not is_finite(info.x):
            raise NonFiniteError(f"step {info.index + 1}/{info.steps} (t={info.timestep}) produced NaN or Inf values, "
                                 f"so {output} was not written; use an fp32 model or engine")
        progress.step(info)

    started = time.perf_counter()
    x = sample(eps_fn, None, runner.to_device(noise), schedule, callback=on_step)
    seconds = time.perf_counter() - started
    images = np.clip((np.asarray(runner.to_host(x), dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)
    if settings.channels == 1:
        images = np.repeat(images, 3, axis=1)
    image_io.write_image(output, image_grid(images), None, settings.channels == 1, 8, None)
    progress.message(f"bdm: wrote {output}: {settings.num} samples in {seconds:.1f} s, "
                     f"{seconds / len(schedule):.3f} s/step")
    return GenerateSummary(output, seconds, len(schedule))
