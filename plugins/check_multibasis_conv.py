"""Check script (not a test): the MultiBasisConv kernels against BinaryDM's official layer goldens and the op
spec's NumPy reference, printing the errors the tests only bound.

    python -m bdm.plugins.check_multibasis_conv [--reference DIR] [--library PATH]

Rows: every layer golden of shared/reference/binarydm in static, dynamic and w1a32 mode, then random layers of
every form (conv2d k3 / k3 stride 2 / k1, conv1d, linear; 1 and 2 bases; act_bits 0, 4, 8) against the reference.
Columns: max|y - y_ref| / max|y_ref| of each kernel (simple, tensor_core) on each side here: the C ABI's host path
(the device code on the CPU, the tensor cores' mma emulated) and, with a CUDA GPU, the kernels (plus whether both
equal the host path bit for bit); then the bit-packed CPU kernels (bdm.plugins.cpu_kernels, this CPU's fastest
path) and whether they equal the host path bit for bit (act_bits 4 / 8; at act_bits 0 they run torch's float conv).
The spec's bound is 1e-5.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from bdm.errors import BdmError

LAYER_CASES = ["conv3x3_s1_order2", "conv3x3_s2_order2", "conv1x1_order1", "conv1d_qkv_order2", "linear_emb_order2",
               "conv3x3_s1_order2_a8"]
MODES = {"static": "y_static", "dynamic": "y_dynamic", "w1a32": "y_w1a32"}
SPATIAL_DIMS = {"conv2d": 2, "conv1d": 1, "linear": 0}
# (spatial_dims, kernel_size, stride, padding, spatial shape)
FORMS = [(2, 3, 1, 1, (16, 12)), (2, 3, 2, 1, (15, 12)), (2, 1, 1, 0, (9, 7)), (1, 3, 1, 1, (64,)), (0, 1, 1, 0, ())]


def relative(ours, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - expected).max() / (np.abs(expected).max() or 1.0))


def golden_layer(reference: Path, case: str):
    """(node inputs per mode, node attributes, official outputs) of one layer golden."""
    import json

    import torch

    from bdm.export.binarydm_layers import act_range, dynamic_step, official_layer

    meta = json.loads((reference / f"{case}.json").read_text())
    state = torch.load(reference / f"{case}.pt", weights_only=True)
    arrays = dict(np.load(reference / f"{case}.npz"))
    bits = meta["act_quantizer"]["nbits"]
    layer = official_layer(meta["official_class"], meta["constructor"], bits)
    layer.load_state_dict(state, strict=True)
    view = layer.export_view()
    if view.packed_signs is None:
        raise BdmError(f"{case}: the golden layer holds an exact-zero sign, which the packed op cannot take")
    spatial_dims = SPATIAL_DIMS[view.kind]
    attrs = dict(in_channels=layer.in_channels, out_channels=layer.out_channels, num_bases=view.order,
                 spatial_dims=spatial_dims, kernel_size=view.weight_shape[2] if spatial_dims else 1,
                 stride=view.stride, padding=view.padding)
    x = arrays["x"]
    steps = {"static": view.act_step.numpy(), "w1a32": view.act_step.numpy(),
             "dynamic": dynamic_step(torch.from_numpy(x), act_range(bits)[1]).numpy()}
    tensors = (view.packed_signs.numpy(), view.scales.numpy(), view.bias.numpy())
    return {mode: ((x,) + tensors + (steps[mode],), dict(attrs, act_bits=0 if mode == "w1a32" else bits),
                   arrays[key]) for mode, key in MODES.items()}


def random_layer(form, num_bases, act_bits, seed, cin=72, cout=48):
    from bdm.plugins import multibasis_reference as ref

    spatial_dims, kernel_size, stride, padding, shape = form
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cin) + shape).astype(np.float32)
    signs = np.where(rng.standard_normal((num_bases, cout, cin) + (kernel_size,) * spatial_dims) > 0, 1, -1)
    scale = (rng.random((num_bases, cout)) * [[0.1], [0.03]][:num_bases] + 0.005).astype(np.float32)
    inputs = (x, ref.pack_bases(signs), scale, rng.standard_normal(cout).astype(np.float32),
              np.array([0.37], np.float32))
    attrs = dict(in_channels=cin, out_channels=cout, num_bases=num_bases, spatial_dims=spatial_dims,
                 kernel_size=kernel_size, stride=stride, padding=padding, act_bits=act_bits)
    return inputs, attrs, ref.multibasis_conv(*inputs, **attrs)


def run_backends(inputs, attrs, library, gpu: bool, cpu=None):
    """{backend: y}: both kernels on the host path (the tensor-core one with the mma emulated) and, with a GPU,
    on the GPU; with `cpu` (loaded CpuKernels) the CPU kernels. act_bits 0 has only the float kernel (the tensor-core
    choice falls back to it)."""
    from bdm.plugins import kernels

    out = {}
    if cpu is not None:
        import torch

        x, weight, scale, bias, act_step = inputs
        run = cpu.prepare("MultiBasisConv", attrs, dict(weight=weight, scale=scale, bias=bias))
        out["cpu"] = run(x=torch.from_numpy(x), act_step=torch.from_numpy(act_step)).numpy()
    for side in ("host", "gpu") if gpu else ("host",):
        for algo in ("simple", "tensor_core"):
            args = inputs
            if side == "gpu":
                import torch

                args = tuple(torch.as_tensor(a).cuda() for a in inputs)
            y = kernels.multibasis_conv(*args, library=library, algo=algo, **attrs)
            out[f"{side}-{algo}"] = y if side == "host" else y.cpu().numpy()
    return out


def row(label, backends, expected, act_bits):
    order = [name for name in backends if name != "cpu"] + (["cpu"] if "cpu" in backends else [])
    text = f"{label:<44}" + "".join(f"{relative(backends[name], expected):>17.2e}" for name in order)
    if "gpu-simple" in backends:
        same = all(backends[f"gpu-{a}"].tobytes() == backends[f"host-{a}"].tobytes() for a in ("simple", "tensor_core"))
        text += f"{'yes' if same else 'NO':>10}"
    if "cpu" in backends:
        same = backends["cpu"].tobytes() == backends["host-simple"].tobytes()
        text += f"{('yes' if same else 'NO') if act_bits else '-':>10}"
    return text


def cpu_kernels_here():
    """The CPU kernels, or None (with a line saying why) where they cannot run."""
    from bdm.plugins import cpu_kernels

    try:
        return cpu_kernels.load()
    except cpu_kernels.CpuKernelsUnavailable as e:
        print(f"(no CPU kernels column: {e})")
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bdm.plugins.check_multibasis_conv",
                                     description=__doc__.splitlines()[0])
    default_ref = os.environ.get("BDM_REFERENCE_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "reference")
    parser.add_argument("--reference", default=default_ref, help="the shared/reference folder (has binarydm/)")
    parser.add_argument("--library", default=None, help="libbdm_kernels.so (default: the built one)")
    args = parser.parse_args(argv)
    reference = Path(args.reference) / "binarydm"
    try:
        import torch

        gpu = torch.cuda.is_available()
        sides = ("host", "gpu") if gpu else ("host",)
        print(f"MultiBasisConv kernels: max|y - y_ref| / max|y_ref| (spec bound 1e-5); "
              f"{'GPU ' + torch.cuda.get_device_name(0) if gpu else 'no GPU: host path only'}")
        cpu = cpu_kernels_here()
        if cpu:
            print(f"column cpu: the bit-packed CPU kernels, path {cpu.isa}")
        header = f"{'case':<44}" + "".join(f"{s + '-' + a:>17}" for s in sides for a in ("simple", "tensor_core"))
        header += f"{'cpu':>17}" if cpu else ""
        header += f"{'gpu==host':>10}" if gpu else ""
        header += f"{'cpu==host':>10}" if cpu else ""
        print(header)
        print("-" * len(header))
        if reference.is_dir():
            for case in LAYER_CASES:
                for mode, (inputs, attrs, official) in golden_layer(reference, case).items():
                    print(row(f"golden {case} {mode}", run_backends(inputs, attrs, args.library, gpu, cpu), official,
                              attrs["act_bits"]))
        else:
            print(f"(no BinaryDM goldens at {reference}: golden rows skipped; pass --reference)")
        for i, form in enumerate(FORMS):
            for num_bases in (1, 2):
                for act_bits in (0, 4, 8):
                    inputs, attrs, expected = random_layer(form, num_bases, act_bits, seed=i * 10 + num_bases)
                    label = f"random d{form[0]} k{form[1]} s{form[2]} p{form[3]} bases {num_bases} A{act_bits or 32}"
                    print(row(label, run_backends(inputs, attrs, args.library, gpu, cpu), expected, act_bits))
    except BdmError as e:
        print(f"check_multibasis_conv: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
