"""Benchmark (not a test) of the bdm CPU kernels per layer, against ONNX Runtime's fp32 `Conv` (a session with that one
node, intra-op threads = this machine's cores) and torch's conv2d of the same shape, measured side by side in one run:

- the BI-DiffSR binary 3x3 conv (BinaryConv2d: threshold, sign, bit-pack, popcount conv, alpha, RPReLU, residual) at
  the released x4 network's shapes for a 256 x 256 output: C=64 @256x256, 128 @128x128, 256 @64x64, 512 @32x32;
- the BinaryDM A4 3x3 conv (MultiBasisConv, 2 sign bases: quantize into code bit-planes, bit-serial popcount conv) at
  C=128 @32x32 and C=256 @16x16;
- (python -m bdm.runtime.bench_layers: all 56 BIConv layers of one step of the released x4 network, the kernels
  against the same layers in PyTorch eager.)

    python -m bdm.plugins.bench_cpu [--repeats 15] [--isa avx512|avx2|portable] [--threads N] [--cpu-time]

Prints one row per layer: median milliseconds (rounds interleave the contestants, so the machine's load hits all
alike) and the kernel's speed-up over each. bench_rows() returns the rows (for `bdm bench`). --cpu-time runs every
contestant on one thread and times the CPU time of that thread instead of the wall clock: per-core ratios that a
busy, shared machine does not distort (OpenMP threads spinning at barriers while other processes hold the cores
inflate multi-threaded wall times there).
"""

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from bdm.errors import BdmError

# (op, channels, size, where)
LAYERS = [
    ("BinaryConv2d", 64, 256, "BI-DiffSR ResBlock 64"),
    ("BinaryConv2d", 128, 128, "BI-DiffSR ResBlock 128"),
    ("BinaryConv2d", 256, 64, "BI-DiffSR ResBlock 256"),
    ("BinaryConv2d", 512, 32, "BI-DiffSR ResBlock 512"),
    ("MultiBasisConv", 128, 32, "BinaryDM A4, 2 bases"),
    ("MultiBasisConv", 256, 16, "BinaryDM A4, 2 bases"),
]


def median_ms(contestants: Dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
              clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median time of each contestant in milliseconds by `clock` (wall, or time.thread_time for the calling thread's
    CPU time); each round runs every contestant once."""
    times = {name: [] for name in contestants}
    for round_index in range(warmup + repeats):
        for name, fn in contestants.items():
            start = clock()
            fn()
            if round_index >= warmup:
                times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


class OneThread:
    """torch on one thread inside the block (the CPU-time mode: every contestant on the calling thread)."""

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.threads)


def _ort_conv(weight: np.ndarray, bias: np.ndarray, x_shape, threads: int):
    """An ONNX Runtime session of one fp32 Conv (3x3, padding 1) with these weights."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x_shape[0], weight.shape[0], *x_shape[2:]])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _bdm_layer(kernels, op: str, channels: int, rng: np.random.Generator):
    """A prepared random layer of `op` (3x3) and its runtime inputs but x."""
    import torch

    from bdm.plugins import multibasis_reference, packing

    signs = np.where(rng.standard_normal((2, channels, channels, 3, 3)) > 0, 1, -1).astype(np.float32)
    attrs = dict(in_channels=channels, out_channels=channels, kernel_size=3)
    if op == "BinaryConv2d":
        tables = {name: (rng.standard_normal((5, channels)) * 0.1).astype(np.float32)
                  for name in ("threshold", "bias0", "slope", "bias1")}
        constants = dict(weight=packing.pack_signs(signs[0]), alpha=np.full(channels, 0.01, np.float32), **tables)
        return kernels.prepare(op, attrs, constants), {"t": torch.tensor([1000])}
    attrs.update(num_bases=2, spatial_dims=2, padding=1, act_bits=4)
    constants = dict(weight=multibasis_reference.pack_bases(signs),
                     scale=np.array([[0.01] * channels, [0.003] * channels], np.float32),
                     bias=np.zeros(channels, np.float32))
    return kernels.prepare(op, attrs, constants), {"act_step": torch.tensor([0.05])}


def bench_rows(repeats: int = 15, isa: Optional[str] = None, threads: Optional[int] = None,
               layers=LAYERS, cpu_time: bool = False) -> List[dict]:
    """One row per layer: {layer, shape, isa, threads, bdm_ms, ort_ms, torch_ms, vs_ort, vs_torch}. cpu_time: every
    contestant on one thread, timed by the calling thread's CPU time. Every contestant runs with the CPU path's
    allocator setting (cpu_kernels.reuse_freed_memory: no page faults on freed and reallocated outputs)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from bdm.plugins import cpu_kernels

    cpu_kernels.reuse_freed_memory()
    kernels = cpu_kernels.load(isa, 1 if cpu_time else threads)
    cores = 1 if cpu_time else os.cpu_count() or 1
    clock = time.thread_time if cpu_time else time.perf_counter
    rng = np.random.default_rng(0)
    rows = []
    for op, channels, size, where in layers:
        x = torch.randn(1, channels, size, size)
        weight = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
        bias = rng.standard_normal(channels).astype(np.float32)
        session = _ort_conv(weight, bias, x.shape, cores)
        x_numpy = x.numpy()
        weight_t, bias_t = torch.from_numpy(weight), torch.from_numpy(bias)
        run, inputs = _bdm_layer(kernels, op, channels, rng)
        with torch.no_grad(), (OneThread() if cpu_time else contextlib.nullcontext()):
            times = median_ms({"bdm": lambda: run(x=x, **inputs),
                               "ort": lambda: session.run(None, {"x": x_numpy}),
                               "torch": lambda: F.conv2d(x, weight_t, bias_t, padding=1)}, repeats, clock=clock)
        rows.append(dict(layer=f"{op} ({where})", shape=f"C={channels} {size}x{size}", isa=kernels.isa,
                         threads=kernels.threads, bdm_ms=times["bdm"], ort_ms=times["ort"],
                         torch_ms=times["torch"], vs_ort=times["ort"] / times["bdm"],
                         vs_torch=times["torch"] / times["bdm"]))
    return rows


def format_rows(rows: List[dict]) -> str:
    def cell(row, key, fmt):
        return fmt.format(row[key]) if key in row else "-"

    lines = [f"{'layer':44} {'shape':18} {'bdm ms':>8} {'ORT ms':>8} {'torch ms':>9} {'vs ORT':>7} {'vs torch':>9}"]
    for row in rows:
        lines.append(f"{row['layer']:44} {row['shape']:18} {cell(row, 'bdm_ms', '{:.2f}'):>8} "
                     f"{cell(row, 'ort_ms', '{:.2f}'):>8} {cell(row, 'torch_ms', '{:.2f}'):>9} "
                     f"{cell(row, 'vs_ort', '{:.1f}x'):>7} {cell(row, 'vs_torch', '{:.1f}x'):>9}")
    return "\n".join(lines)


def benchmark_parser(prog: str, doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options of the CPU kernel benchmarks (this one, bdm.runtime.bench_layers)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--isa", default=None, help="avx512, avx2 or portable (default: $BDM_CPU_ISA or the fastest)")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread each, timed by CPU time (per-core ratios a busy machine does not distort)")
    return parser


def main(argv=None) -> int:
    args = benchmark_parser("python -m bdm.plugins.bench_cpu", __doc__, repeats=15).parse_args(argv)
    try:
        rows = bench_rows(args.repeats, args.isa, args.threads, cpu_time=args.cpu_time)
    except BdmError as e:
        print(f"bdm: error: {e}", file=sys.stderr)
        return 2
    if args.cpu_time:
        setup = "every contestant on one thread, CPU time of that thread"
    else:
        setup = (f"bdm {rows[0]['threads']} threads, ONNX Runtime and torch {os.cpu_count()} cores, wall time")
    print(f"bdm CPU kernels: path {rows[0]['isa']}; {setup}; medians of {args.repeats} interleaved rounds")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
