"""Benchmark (not a test) of all 56 BIConv layers of one step of the released x4 BI-DiffSR network (random weights,
64 -> 256): the bdm CPU kernels against the same layers in PyTorch eager (deploy arithmetic), measured side by side.

    python -m bdm.runtime.bench_layers [--repeats 5] [--isa avx512|avx2|portable] [--threads N] [--cpu-time]

Prints one row as bdm.plugins.bench_cpu does (--cpu-time: every contestant on one thread, timed by its CPU time).
"""

import contextlib
import sys
import time
from typing import Optional

import torch

from bdm.errors import BdmError
from bdm.export.bidiffsr.network import biconvs
from bdm.plugins import cpu_kernels, packing
from bdm.plugins.bench_cpu import OneThread, benchmark_parser, format_rows, median_ms
from bdm.runtime.bench import released_model


def network_row(repeats: int = 5, isa: Optional[str] = None, threads: Optional[int] = None, size: int = 256,
                cpu_time: bool = False) -> dict:
    """The 56 BIConv layers of one step of the released x4 network at a size x size output: their total time on the
    kernels vs in PyTorch eager (the same modules, deploy arithmetic), as medians of `repeats` steps."""

    kernels = cpu_kernels.load(isa, 1 if cpu_time else threads)
    model = released_model()
    layers = biconvs(model)
    inputs = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: inputs.setdefault(name, args[0]))
             for name, module in layers]
    t = torch.tensor([[1000]])
    with torch.no_grad():
        model(torch.randn(1, 3, size, size), torch.rand(1, 3, size, size), t)
    for h in hooks:
        h.remove()
    prepared = []
    for name, module in layers:
        attrs = dict(in_channels=module.in_channels, out_channels=module.out_channels,
                     kernel_size=module.kernel_size, num_groups=module.num_groups, total_steps=module.total_steps)
        constants = dict(weight=packing.pack_signs(module.binary_conv.weight.detach().numpy()),
                         alpha=module.alpha().numpy(), **{k: v.numpy() for k, v in module.group_tables().items()})
        prepared.append((kernels.prepare("BinaryConv2d", attrs, constants), module, inputs[name]))
    t1 = torch.tensor([1000])

    def on_kernels():
        for run, _, x in prepared:
            run(x=x, t=t1)

    def in_torch():
        for _, module, x in prepared:
            module(x, t)

    with torch.no_grad(), (OneThread() if cpu_time else contextlib.nullcontext()):
        times = median_ms({"bdm": on_kernels, "torch": in_torch}, repeats, warmup=1,
                          clock=time.thread_time if cpu_time else time.perf_counter)
    return dict(layer=f"all {len(prepared)} BIConv of one released x4 step", shape=f"{size}x{size} output",
                isa=kernels.isa, threads=kernels.threads, bdm_ms=times["bdm"], torch_ms=times["torch"],
                vs_torch=times["torch"] / times["bdm"])


def main(argv=None) -> int:
    args = benchmark_parser("python -m bdm.runtime.bench_layers", __doc__, repeats=5).parse_args(argv)
    try:
        row = network_row(args.repeats, args.isa, args.threads, cpu_time=args.cpu_time)
    except BdmError as e:
        print(f"bdm: error: {e}", file=sys.stderr)
        return 2
    print(format_rows([row]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
