"""Throughput of `bdm upscale --ray` on this machine: images per second with 1 and with 2 single-threaded Ray
workers, measured side by side in one run (rounds alternate, so machine load hits every column alike).

Ray starts on this machine for the run. Each round creates its workers, lets every worker upscale one image
(loading and the first inference stay out of the timing), then times a folder job of --images images. The
same split over 1 and 2 plain processes without Ray (each process its share of the images, started together)
is the ceiling this machine allows right now: on a shared, busy machine two processes cannot run twice as fast.

    python -m bdm.runtime.bench_cluster --onnx model.onnx [--images 8] [--steps 20] [--size 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import functools
import io
import multiprocessing
import statistics
import sys
import tempfile
import time
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


def _plain_process(onnx, files, out, settings, barrier, seconds):
    """One process without Ray: load, warm up on one image, wait for the others, time its share."""
    from bdm.runtime.backends import onnx_runner
    from bdm.runtime.upscale import run_job

    runner = onnx_runner(onnx, threads=1)
    run_job(runner, files[:1], out, settings, io.StringIO())
    barrier.wait()
    started = time.perf_counter()
    run_job(runner, files, out, settings, io.StringIO())
    seconds.put(time.perf_counter() - started)


def _plain_rate(onnx: Path, folder: Path, out: Path, settings, processes: int) -> float:
    """Images per second of `processes` plain processes, each with an equal share of the images."""
    context = multiprocessing.get_context("spawn")
    files = sorted(folder.iterdir())
    barrier, seconds = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_plain_process, args=(onnx, files[i::processes], out, settings, barrier,
                                                             seconds)) for i in range(processes)]
    for worker in workers:
        worker.start()
    slowest = max(seconds.get() for _ in workers)
    for worker in workers:
        worker.join()
    return len(files) / slowest


def measure(onnx: Path, images: int, steps: int, size: int, rounds: int, stream=sys.stdout) -> dict:
    """{(kind, workers): [images per second of each round]}; prints a line per measurement and the table."""
    from bdm.runtime.backends import onnx_runner
    from bdm.runtime.cluster import RayWorkers, ray_session
    from bdm.runtime.upscale import UpscaleSettings

    settings = UpscaleSettings(scale=4, steps=steps, seed=0, overwrite=True)
    make_runner = functools.partial(onnx_runner, onnx)  # what `bdm upscale --onnx` runs
    rates = {(kind, n): [] for kind in ("ray", "plain") for n in WORKER_COUNTS}
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        tmp = Path(tmp)
        _write_images(tmp / "in", images, size)
        (tmp / "warm").mkdir()
        (tmp / "out").mkdir()
        for round_ in range(1, rounds + 1):
            for workers in WORKER_COUNTS:
                with RayWorkers(make_runner, workers=workers, threads=1, gpus=False) as pool:
                    warm = [tmp / "in" / f"crop{i:03d}.png" for i in range(workers)]
                    pool.run_job(warm, tmp / "warm", settings, stream=io.StringIO())
                    log = io.StringIO()
                    summary = pool.run_job(tmp / "in", tmp / "out", settings, stream=log)
                if summary.failed or len(summary.written) != images:
                    raise BdmError(f"the job failed:\n{log.getvalue()}")
                rates["ray", workers].append(images / summary.seconds)
                rates["plain", workers].append(_plain_rate(onnx, tmp / "in", tmp / "out", settings, workers))
                print(f"round {round_}, {workers} x 1 thread: Ray {rates['ray', workers][-1]:.3f} images/s, plain "
                      f"processes {rates['plain', workers][-1]:.3f} images/s", file=stream, flush=True)
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"\n{images} images {size}x{size} -> {4 * size}x{4 * size}, {steps} DDIM steps, the --onnx runner (bdm CPU kernels), "
          f"model {onnx.name}; median of {rounds} rounds", file=stream)
    print("| workers x threads | Ray images/s | vs 1 worker | plain processes images/s | vs 1 process |\n"
          "|---|---|---|---|---|", file=stream)
    for workers in WORKER_COUNTS:
        ray_rate, plain_rate = median["ray", workers], median["plain", workers]
        print(f"| {workers} x 1 | {ray_rate:.3f} | {ray_rate / median['ray', 1]:.2f}x | {plain_rate:.3f} | "
              f"{plain_rate / median['plain', 1]:.2f}x |", file=stream)
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
