"""`bdm bench`: per-step and end-to-end time and peak memory of every backend available on this machine.

The workload is the released x4 BI-DiffSR network (51.3 M latent parameters) with random weights built
here (PyTorch default initialisation, seed 0, exact zeros nudged to 1e-6: nothing is downloaded), upscaling a 64 x 64 crop of
scikit-image's astronaut to 256 x 256 with the official 50-step DDIM sampler. Each backend runs in its own
process so that its peak memory (peak resident set size of that process, plus peak CUDA memory for
PyTorch on a GPU) is its own. The ONNX model is exported once with `bdm export`; on the CPU it runs in ONNX Runtime
with the function bodies (ort-cpu) and on the bdm CPU kernels (kernels-cpu). Each row gives its per-step speed-up
over PyTorch on the CPU measured in the same run; with kernels-cpu a per-layer table follows (bdm.plugins.bench_cpu:
the binary 3x3 convs of the released shapes and BinaryDM's A4 conv against ONNX Runtime's fp32 Conv).

    bdm bench [--steps 50] [--size 64] [--backends torch-cpu,ort-cpu,kernels-cpu]
    python -m bdm.runtime.bench ...   (the same)
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from bdm.errors import BdmError

SCALE = 4
ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "kernels-cpu")


def released_model():
    """The released x4 network with random weights (default init, seed 0), in eval mode."""
    import torch

    from bdm.export.bidiffsr.network import build_bidiffsr

    torch.manual_seed(0)
    model = build_bidiffsr(None)
    with torch.no_grad():  # default init can draw an exact 0.0, which 1-bit packing refuses; nudge it
        for parameter in model.parameters():
            parameter[parameter == 0] = 1e-6
    return model


def available_backends() -> List[str]:
    names = ["torch-cpu"]
    import torch

    if torch.cuda.is_available():
        names.append("torch-cuda")
    import onnxruntime as ort

    names += ["ort-cpu", "kernels-cpu"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        names.append("ort-cuda")
    return names


def _export_onnx(path: Path) -> None:
    """`bdm export` of the random released model, saved first in the official checkpoint format."""
    import torch

    ckpt = path.with_suffix(".pth")
    torch.save({"params": released_model().state_dict()}, ckpt)
    run = subprocess.run([sys.executable, "-m", "bdm.cli.main", "export", str(ckpt), str(path), "--no-validate"],
                         capture_output=True, text=True)
    ckpt.unlink()
    if run.returncode != 0:
        raise BdmError((run.stderr.strip().splitlines() or ["bdm export failed"])[-1])


class _StepClock:
    """Progress sink for upscale_picture that records the time of every step."""

    def __init__(self):
        self.started = time.perf_counter()
        self.stamps = []

    def step(self, info):
        self.stamps.append(time.perf_counter())

    def message(self, text):
        pass


def _worker(backend: str, steps: int, size: int, onnx: Optional[str]) -> dict:
    from skimage import data

    from bdm.runtime.backends import OrtRunner, TorchRunner
    from bdm.runtime.image_io import Picture
    from bdm.runtime.sampler import ddim_schedule
    from bdm.runtime.upscale import UpscaleSettings, upscale_picture

    if backend.startswith("torch"):
        runner = TorchRunner(model=released_model(), device=backend.split("-")[1])
    elif backend == "kernels-cpu":
        from bdm.runtime.kernel_runner import CpuKernelRunner

        runner = CpuKernelRunner(onnx)
    else:
        providers = ["CUDAExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
        runner = OrtRunner(onnx, providers=providers)
    lr = data.astronaut()[100:100 + size, 180:180 + size].astype(np.float32) / 255
    picture = Picture(lr, None, False, 8, None)
    schedule = ddim_schedule(steps)
    clock = _StepClock()
    settings = UpscaleSettings(scale=SCALE, steps=steps, seed=0)
    started = time.perf_counter()
    rgb, _ = upscale_picture(runner, picture, settings, schedule, budget=1 << 40, progress=clock)
    total = time.perf_counter() - started
    step_times = np.diff([clock.started] + clock.stamps)
    result = {
        "backend": runner.name, "steps": steps, "input": f"{size}x{size}", "output": f"{rgb.shape[1]}x{rgb.shape[0]}",
        "end_to_end_s": total, "first_step_s": float(step_times[0]),
        "step_s": float(np.median(step_times[1:] if steps > 1 else step_times)),
        "mean_step_s": float(np.mean(step_times)),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if backend == "torch-cuda":
        import torch

        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def main(steps: int = 50, size: int = 64, only: Optional[List[str]] = None, stream=sys.stdout) -> List[dict]:
    names = available_backends()
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise BdmError(f"backend(s) {unknown} not available here; available: {names}")
        names = only
    results = []
    torch_step = None
    with tempfile.TemporaryDirectory() as tmp:
        onnx = Path(tmp) / "bi_diffsr_x4_random.onnx"
        if any(n in ONNX_BACKENDS for n in names):
            try:
                _export_onnx(onnx)
            except BdmError as e:
                print(f"bench: the ONNX backends skipped: {e}", file=stream)
                names = [n for n in names if n not in ONNX_BACKENDS]
        print(f"bench: released x4 BI-DiffSR (random weights), {size}x{size} -> {size * SCALE}x{size * SCALE}, "
              f"{steps} DDIM steps", file=stream)
        for name in names:
            command = [sys.executable, "-m", "bdm.runtime.bench", "--worker", name, "--steps", str(steps),
                       "--size", str(size), "--onnx", str(onnx)]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"  {name:11s} failed: {tail}", file=stream)
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            results.append(result)
            gpu = f", peak CUDA {result['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in result else ""
            if name == "torch-cpu":
                torch_step = result["step_s"]
            if torch_step is not None:
                result["vs_torch_cpu"] = torch_step / result["step_s"]
            print(f"  {result['backend']:46s} {result['step_s']:.3f} s/step median (mean {result['mean_step_s']:.3f}, "
                  f"first {result['first_step_s']:.3f}), "
                  f"end to end {result['end_to_end_s']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB{gpu}"
                  + (f", {result['vs_torch_cpu']:.2f}x PyTorch CPU per step" if "vs_torch_cpu" in result else ""),
                  file=stream, flush=True)
    if "kernels-cpu" in names:
        _print_layers(stream)
    return results


def _print_layers(stream) -> None:
    """The per-layer table of the CPU kernels against ONNX Runtime's (and torch's) fp32 conv of the same shape."""
    from bdm.plugins import bench_cpu

    try:
        rows = bench_cpu.bench_rows(repeats=7)
    except BdmError as e:
        print(f"bench: per-layer table skipped: {e}", file=stream)
        return
    print(f"per layer (bdm CPU kernels, {rows[0]['isa']}, {rows[0]['threads']} threads; medians of 7 interleaved "
          f"rounds):", file=stream)
    for line in bench_cpu.format_rows(rows).splitlines():
        print(f"  {line}", file=stream)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--onnx")
    parser.add_argument("--backends")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.size, args.onnx)))
    else:
        main(args.steps, args.size, args.backends.split(",") if args.backends else None)
