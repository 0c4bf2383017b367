"""Throughput of `bdm upscale --ray` on this machine: images per second with 1 and with 2 single-threaded Ray
workers, measured side by side in one run (rounds alternate 1, 2, 1, 2, ... so machine load hits both alike).

Ray starts on this machine for the run. Each round creates its workers, lets every worker upscale one image
(loading and the first inference stay out of the timing), then times a folder job of --images images.

    python -m bdm.runtime.bench_cluster --onnx model.onnx [--images 8] [--steps 20] [--size 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import functools
import io
import statistics
import sys
import tempfile
from pathlib import Path

from bdm.errors import BdmError

WORKER_COUNTS = (1, 2)


def _write_images(folder: Path, count: int, size: int):
    from PIL import Image
    from skimage import data

    folder.mkdir()
    astronaut = data.astronaut()
    for i in range(count):  # distinct crops: the same work per image, different pixels
        y, x = 40 + 7 * i, 160 + 5 * i
        Image.fromarray(astronaut[y:y + size, x:x + size]).save(folder / f"crop{i:03d}.png")


def measure(onnx: Path, images: int, steps: int, size: int, rounds: int, stream=sys.stdout) -> dict:
    """{workers: [images per second of each round]}; prints a row per round and the table."""
    from bdm.runtime.backends import OrtRunner
    from bdm.runtime.cluster import RayWorkers, ray_session
    from bdm.runtime.upscale import UpscaleSettings

    settings = UpscaleSettings(scale=4, steps=steps, seed=0, overwrite=True)
    make_runner = functools.partial(OrtRunner, onnx)
    rates = {n: [] for n in WORKER_COUNTS}
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        tmp = Path(tmp)
        _write_images(tmp / "in", images, size)
        (tmp / "warm").mkdir()
        for round_ in range(1, rounds + 1):
            for workers in WORKER_COUNTS:
                with RayWorkers(make_runner, workers=workers, threads=1, gpus=False) as pool:
                    warm = [tmp / "in" / f"crop{i:03d}.png" for i in range(workers)]
                    pool.run_job(warm, tmp / "warm", settings, stream=io.StringIO())
                    log = io.StringIO()
                    summary = pool.run_job(tmp / "in", tmp / f"out{workers}", settings, stream=log)
                if summary.failed or len(summary.written) != images:
                    raise SystemExit(f"bench_cluster: the job failed:\n{log.getvalue()}")
                rates[workers].append(images / summary.seconds)
                print(f"round {round_}: {workers} worker{'s' * (workers > 1)} x 1 thread: {images} images in "
                      f"{summary.seconds:.1f} s, {rates[workers][-1]:.3f} images/s", file=stream, flush=True)
    base = statistics.median(rates[1])
    print(f"\n{size}x{size} -> {4 * size}x{4 * size}, {steps} DDIM steps, ONNX Runtime (CPU), model {onnx.name}; "
          f"median of {rounds} rounds", file=stream)
    print("| workers x threads | images/s | vs 1 worker |\n|---|---|---|", file=stream)
    for workers in WORKER_COUNTS:
        rate = statistics.median(rates[workers])
        print(f"| {workers} x 1 | {rate:.3f} | {rate / base:.2f}x |", file=stream)
    return rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="a model exported by `bdm export`")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32, help="input side in pixels (output: x4)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        measure(args.onnx, args.images, args.steps, args.size, args.rounds)
    except BdmError as e:
        raise SystemExit(f"bench_cluster: error: {e}") from None


if __name__ == "__main__":
    main()
