"""The `bdm upscale` job: image files in, upscaled image files out, one runner for all of them.

Per image: read (EXIF orientation applied, gray replicated to RGB, alpha apart) -> condition (bicubic x
scale, reflect-pad to multiples of 8) -> host noise from the seed or a .npy file -> DDIM sampler with the
network on the whole image or on blended tiles at every step -> crop -> alpha upscaled bicubically and
re-attached -> written atomically in the input's bit depth with its ICC profile.

A failing image (unreadable, non-finite values during sampling, ...) is reported with its name and the
job goes on with the others; the caller turns `JobSummary.failed` into a non-zero exit.
"""

from __future__ import annotations

import glob
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


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in image_io.INPUT_SUFFIXES)


def _refuse_output_inside(folder: Path, output: Path):
    """A later run would take the outputs written inside the input folder for inputs."""
    folder_abs, output_abs = folder.resolve(), output.resolve()
    if output_abs == folder_abs or folder_abs in output_abs.parents:
        raise BdmError(f"output {output} is inside the input folder {folder}, where its images would be read as "
                       "inputs by the next run; choose an output folder outside it")


def _is_pattern(entry: Path) -> bool:
    return any(c in str(entry) for c in "*?[")


def _expand(entry: Path) -> List[Path]:
    """The images one input names: a file, a folder's images, or a quoted glob pattern's matching images."""
    if entry.is_dir():
        files = _images_in(entry)
        if not files:
            raise BdmError(f"input folder {entry} holds no images ({', '.join(sorted(image_io.INPUT_SUFFIXES))})")
        return files
    if entry.is_file():
        return [entry]
    if _is_pattern(entry):
        files = sorted(Path(p) for p in glob.glob(str(entry))
                       if Path(p).is_file() and Path(p).suffix.lower() in image_io.INPUT_SUFFIXES)
        if not files:
            raise BdmError(f"input pattern {entry} matches no images "
                           f"({', '.join(sorted(image_io.INPUT_SUFFIXES))}); check the folder and the pattern")
        return files
    raise BdmError(f"input {entry}: no such file or folder")


def plan_outputs(inputs, output: Path, fmt: str) -> List[Tuple[Path, Path]]:
    """(input file, output file) pairs. `inputs`: an image, a folder, or a list of images, folders and quoted glob
    patterns. One image maps to an output file (or into an output folder); anything else maps into an output
    folder by name and --format. Several inputs writing one output are refused before any work."""
    entries = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    output = Path(output)
    if len(entries) == 1 and not entries[0].is_dir() and not _is_pattern(entries[0]):
        (source,) = entries
        if not source.exists():
            raise BdmError(f"input {source}: no such file or folder")
        if output.is_dir():
            return [(source, output / (source.stem + image_io.output_suffix(fmt)))]
        if not output.parent.is_dir():
            raise BdmError(f"cannot write {output}: folder {output.parent} does not exist; create it first")
        image_io.check_output(output, has_alpha=False)
        return [(source, output)]
    if output.exists() and not output.is_dir():
        what = (f"{len(entries)} inputs are given" if len(entries) > 1 else
                f"input {entries[0]} is a {'folder' if entries[0].is_dir() else 'pattern'}")
        raise BdmError(f"{what}, so the output must be a folder; {output} is a file")
    for entry in entries:
        if entry.is_dir():
            _refuse_output_inside(entry, output)
    suffix = image_io.output_suffix(fmt)
    files = list(dict.fromkeys(p for entry in entries for p in _expand(entry)))  # each file once, in order
    pairs = [(p, output / (p.stem + suffix)) for p in files]
    first_source = {}
    for source, target in pairs:
        if target in first_source:
            raise BdmError(f"inputs {first_source[target]} and {source} would both be written to {target}; "
                           "rename one of them or upscale them apart")
        first_source[target] = source
    return pairs


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


def upscale_file(runner, source: Path, target: Path, settings: UpscaleSettings, schedule: Schedule, budget: int,
                 progress: Optional[Progress] = None) -> float:
    """Read one image, upscale it and write it atomically; returns the seconds spent in the sampler.
    Any failure is a BdmError and leaves `target` as it was."""
    picture = image_io.read_image(source)
    image_io.check_output(target, picture.alpha is not None)
    started = time.perf_counter()
    rgb, alpha = upscale_picture(runner, picture, settings, schedule, budget, progress, source.name)
    seconds = time.perf_counter() - started
    image_io.write_image(target, rgb, alpha, picture.grayscale, picture.bits, picture.icc_profile)
    return seconds


def job_budget(runner, settings: UpscaleSettings) -> int:
    """Bytes the network may use per call; the same rule everywhere, so every runner tiles an image alike."""
    return settings.memory_budget or runner.limits.memory_budget or host_memory_budget()


def job_header(runner, settings: UpscaleSettings) -> str:
    return (f"bdm: backend {runner.describe()}; x{settings.scale}, {settings.steps} DDIM steps, "
            + (f"noise from {settings.noise_file}" if settings.noise_file else f"seed {settings.seed}"))


def failure_line(source: Path, message: str) -> str:
    return f"bdm: error: {message}" if str(source) in message else f"bdm: error: {source}: {message}"


def summary_line(summary: JobSummary, workers: int = 1) -> str:
    done = len(summary.written)
    rates = ""
    if done:
        spread = f" on {workers} workers" if workers > 1 else ""
        rates = (f"; {done / summary.seconds:.3f} images/s{spread}, {summary.seconds / done:.2f} s/image, "
                 f"{summary.sampling_seconds / summary.steps:.3f} s/step")
    return (f"bdm: {done} upscaled, {len(summary.skipped)} skipped, {len(summary.failed)} failed "
            f"in {summary.seconds:.1f} s{rates}")


def skip_done(target: Path, settings: UpscaleSettings, summary: JobSummary, progress: Progress) -> bool:
    """Resume: an output that exists is kept and counted as skipped, unless settings.overwrite."""
    if target.exists() and not settings.overwrite:
        summary.skipped.append(target)
        progress.message(f"  {target} exists, skipped (--overwrite to redo it)")
        return True
    return False


def make_folders(pairs: List[Tuple[Path, Path]]):
    """The output folders of a plan (a single output file's folder already exists, see plan_outputs)."""
    for folder in dict.fromkeys(target.parent for _, target in pairs):
        folder.mkdir(parents=True, exist_ok=True)


def run_job(runner, inputs, output, settings: UpscaleSettings, stream: TextIO = sys.stderr) -> JobSummary:
    """Upscale every input; report each failure by name and go on. See the module docstring."""
    pairs = plan_outputs(inputs, output, settings.fmt)
    make_folders(pairs)
    schedule = ddim_schedule(settings.steps, **settings.schedule)
    budget = job_budget(runner, settings)
    summary = JobSummary()
    progress = Progress(stream, len(pairs))
    progress.message(job_header(runner, settings))
    started = time.perf_counter()
    for index, (source, target) in enumerate(pairs, 1):
        progress.begin(index, source.name)
        if skip_done(target, settings, summary, progress):
            continue
        try:
            sampling_seconds = upscale_file(runner, source, target, settings, schedule, budget, progress)
        except BdmError as e:
            summary.failed.append((source, str(e)))
            progress.message(failure_line(source, str(e)))
            continue
        summary.written.append(target)
        summary.sampling_seconds += sampling_seconds
        summary.steps += len(schedule)
        progress.message(f"  wrote {target}")
    summary.seconds = time.perf_counter() - started
    progress.message(summary_line(summary))
    return summary
