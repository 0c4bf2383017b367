"""Benchmark (not a test) of the bdm conv kernels against cuDNN on the same shapes (GPU only).

--op binary_conv (default): the fused binary convolution (BinaryConv2d: threshold, sign, bit-pack, AND+popcount conv,
alpha, RPReLU, residual) against cuDNN's FP16 convolution of the same shape (torch F.conv2d, nothing fused) and an
INT8 GEMM of the same im2col shape (torch._int_mm: the GEMM alone, no im2col, a lower bound for an INT8 Q/DQ
convolution), for the BI-DiffSR binary layer shapes at 64x64..256x256 outputs.

--op multibasis_conv: MultiBasisConv (BinaryDM, 2 bases, A4 and A8: quantize into code bit-planes, bit-serial
AND+popcount conv) with each kernel against cuDNN's FP16 convolution, for 3x3 ResBlock convs of an LDM UNet at the
same output sizes.

    python -m bdm.plugins.bench_kernels [--op binary_conv|multibasis_conv] [--sizes 64 128 256] [--batch 1] [--library PATH]

Prints one row per (layer shape, image size): median times in microseconds (each contestant captured in a CUDA
graph and replayed, so launch overhead is not measured) and ratios of the tensor-core kernel to the baselines.
Needs a CUDA GPU and libbdm_kernels.so (python -m bdm.plugins.build).
"""

import argparse
import sys

import numpy as np

from bdm.errors import BdmError

# (in = out channels, kernel, resolution divisor, where in the released BI-DiffSR UNet)
BINARY_LAYERS = [
    (32, 3, 1, "CP-Down 64 halves"),
    (64, 3, 1, "ResBlock 64"),
    (64, 3, 2, "CP-Down 128 halves"),
    (128, 3, 2, "ResBlock 128 / CP-Up 128"),
    (128, 3, 4, "CP-Down 256 halves"),
    (256, 3, 4, "ResBlock 256 / CP-Up 256"),
    (256, 1, 4, "CS-Fusion 256"),
    (512, 3, 8, "ResBlock 512 / CP-Up 512"),
    (512, 1, 8, "CS-Fusion 512"),
]
# (in = out channels, resolution divisor, where in an LDM UNet of 128 base channels, channel_mult 1,2,2,4); 3x3
MULTIBASIS_LAYERS = [
    (128, 1, "ResBlock 128"),
    (256, 2, "ResBlock 256"),
    (256, 4, "ResBlock 256"),
    (512, 8, "ResBlock 512"),
]


def time_us(fn, warmup=3, iters=20, repeats=10):
    """Median time of fn() in microseconds, from CUDA-event timings of `repeats` replays of a CUDA graph of fn:
    the graph removes Python/launch overhead from every contestant alike (and proves fn capture safe)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / repeats)
    return float(np.median(times))


def bench_binary_layer(channels, k, hw, batch, library):
    import torch
    import torch.nn.functional as F

    from bdm.plugins import kernels

    dev = "cuda"
    x = torch.randn(batch, channels, hw, hw, device=dev, dtype=torch.float16)
    words = (channels + 31) // 32
    weight_bits = torch.randint(-2**31, 2**31 - 1, (channels, k, k, words), device=dev, dtype=torch.int32)
    tables = {name: torch.randn(5, channels, device=dev) for name in ("threshold", "bias0", "slope", "bias1")}
    alpha = torch.rand(channels, device=dev)
    t = torch.tensor([1000], device=dev, dtype=torch.int32)

    def fused(algo):
        return lambda: kernels.binary_conv2d(x, weight_bits, alpha, t=t, in_channels=channels,
                                             out_channels=channels, kernel_size=k, residual=1, algo=algo,
                                             library=library, **tables)

    w16 = torch.randn(channels, channels, k, k, device=dev, dtype=torch.float16)
    cudnn = lambda: F.conv2d(x, w16, padding=k // 2)  # noqa: E731
    a8 = torch.randint(-1, 2, (batch * hw * hw, channels * k * k), device=dev, dtype=torch.int8)
    b8 = torch.randint(-1, 2, (channels * k * k, channels), device=dev, dtype=torch.int8)
    int8_gemm = lambda: torch._int_mm(a8, b8)  # noqa: E731
    return {"simple": time_us(fused("simple")), "tensor_core": time_us(fused("tensor_core")),
            "cudnn_fp16": time_us(cudnn), "int8_gemm": time_us(int8_gemm)}


def bench_multibasis_layer(channels, hw, batch, library, act_bits):
    import torch
    import torch.nn.functional as F

    from bdm.plugins import kernels

    dev = "cuda"
    x = torch.randn(batch, channels, hw, hw, device=dev)
    words = (channels + 31) // 32
    weight_bits = torch.randint(-2**31, 2**31 - 1, (2, channels, 3, 3, words), device=dev, dtype=torch.int32)
    scale = torch.rand(2, channels, device=dev) * 0.1
    bias, act_step = torch.randn(channels, device=dev), torch.tensor([0.3], device=dev)

    def kernel(algo):
        return lambda: kernels.multibasis_conv(x, weight_bits, scale, bias, act_step, in_channels=channels,
                                               out_channels=channels, num_bases=2, spatial_dims=2, kernel_size=3,
                                               padding=1, act_bits=act_bits, algo=algo, library=library)

    x16, w16 = x.half(), torch.randn(channels, channels, 3, 3, device=dev, dtype=torch.float16)
    return {"simple": time_us(kernel("simple")), "tensor_core": time_us(kernel("tensor_core")),
            "cudnn_fp16": time_us(lambda: F.conv2d(x16, w16, padding=1))}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bdm.plugins.bench_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["binary_conv", "multibasis_conv"], default="binary_conv")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="output image sizes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--library", default=None, help="libbdm_kernels.so (default: the built one)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_kernels: error: PyTorch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernels: error: needs a CUDA GPU (torch.cuda.is_available() is False); run it on an "
              "NVIDIA GPU machine with a CUDA build of PyTorch", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"batch {args.batch}; times in us (CUDA graph replays, median)")
    try:
        if args.op == "binary_conv":
            print_binary(args)
        else:
            print_multibasis(args)
    except BdmError as e:
        print(f"bench_kernels: error: {e}", file=sys.stderr)
        return 2
    return 0


def rows(op: str, sizes):
    """The table's rows in order: (where, channels, kernel size, output side, act_bits or None) per output size."""
    if op == "binary_conv":
        return [(where, channels, k, size // div, None) for size in sizes for channels, k, div, where in BINARY_LAYERS]
    return [(where, channels, 3, size // div, act_bits) for size in sizes for channels, div, where in MULTIBASIS_LAYERS
            for act_bits in (4, 8)]


def print_binary(args):
    header = (f"{'layer (fp16 activations)':<26}{'C':>5}{'k':>3}{'HxW':>9} | {'fused simple':>12}{'fused TC':>10}"
              f"{'cuDNN fp16':>11}{'int8 GEMM':>10} | {'TC/cuDNN':>8}{'TC/int8':>8}")
    print(header)
    print("-" * len(header))
    for where, channels, k, hw, _ in rows(args.op, args.sizes):
        r = bench_binary_layer(channels, k, hw, args.batch, args.library)
        print(f"{where:<26}{channels:>5}{k:>3}{f'{hw}x{hw}':>9} | {r['simple']:>12.1f}{r['tensor_core']:>10.1f}"
              f"{r['cudnn_fp16']:>11.1f}{r['int8_gemm']:>10.1f} | "
              f"{r['tensor_core'] / r['cudnn_fp16']:>8.2f}{r['tensor_core'] / r['int8_gemm']:>8.2f}")


def print_multibasis(args):
    header = (f"{'layer (fp32 x, 2 bases)':<24}{'A':>3}{'C':>5}{'HxW':>9} | {'simple':>9}{'TC':>9}{'cuDNN fp16':>11} | "
              f"{'TC/cuDNN':>8}")
    print(header)
    print("-" * len(header))
    for where, channels, _, hw, act_bits in rows(args.op, args.sizes):
        r = bench_multibasis_layer(channels, hw, args.batch, args.library, act_bits)
        print(f"{where:<24}{act_bits:>3}{channels:>5}{f'{hw}x{hw}':>9} | {r['simple']:>9.1f}"
              f"{r['tensor_core']:>9.1f}{r['cudnn_fp16']:>11.1f} | {r['tensor_core'] / r['cudnn_fp16']:>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
