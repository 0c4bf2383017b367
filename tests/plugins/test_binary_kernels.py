"""The kernels through their C ABI (bdm.plugins.kernels) against an independent PyTorch implementation of the
op specs (plugin_spec_reference.py) and against the BI-DiffSR network's own BIConv layers on the reference
goldens' inputs.

Backends "<side>-<kernel>": side "host" runs the device code on the CPU through the C ABI's host path (every
machine with nvcc): "host-simple" the straightforward kernel's per-output function, "host-tensor_core" the
tensor-core kernel's own phases block by block with the mma emulated from the PTX ISA fragment layout; side "gpu"
runs the two kernels on a CUDA GPU (skipped without one). The results must be bit-identical to the reference: the
integer dot product is exact and every epilogue step is one IEEE float32 operation in the spec's order, so any
difference is a bug, not rounding.
"""

import numpy as np
import pytest
import torch

import plugin_spec_reference as ref
from bdm.errors import BdmError
from bdm.plugins import kernels

BACKENDS = ["host-simple", "host-tensor_core", "gpu-simple", "gpu-tensor_core"]
# t values: every group, both sides of each boundary, and clamping below 0 / above total_steps
TIMESTEPS = [0, 399, 400, 1000, 1599, 1600, 1999, 2500, -5]
# (in_channels, out_channels, kernel_size, pad_value, H, W): channels around and across multiples of 32, odd
# H/W, 1x1 and 3x3, a tile edge of the tensor-core kernel (64 pixels / 64 channels) crossed in both directions
CONV_CASES = [
    (40, 40, 3, 0, 9, 7),
    (8, 8, 3, 0, 5, 6),
    (70, 70, 1, -1, 4, 3),
    (33, 16, 3, 1, 6, 5),
    (64, 64, 3, 0, 17, 13),
    (96, 32, 3, -1, 3, 31),
    (160, 160, 3, 0, 11, 9),
]


@pytest.fixture(scope="module")
def library(kernels_library):
    return str(kernels_library)


def on_backend(backend, array_or_tensor):
    if backend.startswith("host"):
        return None if array_or_tensor is None else np.asarray(array_or_tensor)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the GPU kernels are checked on a machine with one")
    if array_or_tensor is None:
        return None
    return torch.as_tensor(np.asarray(array_or_tensor)).cuda()


def to_numpy(y):
    return y if isinstance(y, np.ndarray) else y.cpu().numpy()


def assert_bit_identical(ours, expected, what):
    ours, expected = np.asarray(ours), np.asarray(expected)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape, what
    same = ours.view(np.uint8).reshape(ours.shape + (-1,)) == expected.view(np.uint8).reshape(expected.shape + (-1,))
    mismatched = int((~same.all(axis=-1)).sum())
    assert mismatched == 0, (f"{what}: {mismatched} of {ours.size} elements differ, max |diff| "
                             f"{np.abs(ours.astype(np.float64) - expected.astype(np.float64)).max():.3g}")


def conv_case(cin, cout, k, seed):
    """Random weights/tables with exact zeros in the sign map: channel 0 has threshold 0 and zeros in x."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin, k, k, generator=gen)
    tables = {"threshold": torch.randn(5, cin, generator=gen) * 0.3, "bias0": torch.randn(5, cout, generator=gen),
              "slope": torch.rand(5, cout, generator=gen), "bias1": torch.randn(5, cout, generator=gen)}
    tables["threshold"][:, 0] = 0.0
    return weight, torch.rand(cout, generator=gen) + 0.01, tables


def make_x(cin, h, w, dtype, seed):
    x = torch.randn(2, cin, h, w, generator=torch.Generator().manual_seed(seed))
    x[:, 0, ::2, ::3] = 0.0
    return x.to(dtype)


def run_conv(library, backend, x, weight, alpha, t=None, tables=None, **attrs):
    tables = tables or {}
    return to_numpy(kernels.binary_conv2d(
        on_backend(backend, x.numpy()), on_backend(backend, ref.pack_weight_signs(weight)),
        on_backend(backend, alpha.numpy()), t=on_backend(backend, t),
        **{name: on_backend(backend, None if v is None else v.numpy()) for name, v in tables.items()},
        in_channels=weight.shape[1], out_channels=weight.shape[0], kernel_size=weight.shape[-1],
        algo=backend.split("-", 1)[1], library=library, **attrs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "cin{}_cout{}_k{}_pad{}_{}x{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_binary_conv2d_matches_spec_for_every_group(library, backend, case, dtype):
    cin, cout, k, pad, h, w = case
    weight, alpha, tables = conv_case(cin, cout, k, seed=cin * 1000 + cout)
    x = make_x(cin, h, w, dtype, seed=h * w)
    residual = int(cin == cout)
    for t0 in TIMESTEPS:
        t = np.array([t0, 1999 - max(t0, 0) % 2000], dtype=np.int32)  # sample 1's t must not matter
        expected, _ = ref.binary_conv2d(x, weight, alpha, pad_value=pad, t=t, residual=residual, **tables)
        ours = run_conv(library, backend, x, weight, alpha, t=t, tables=tables, pad_value=pad, residual=residual)
        assert_bit_identical(ours, expected.numpy(), f"t={t0}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", [-1, 0, 1])
def test_integer_dot_product_is_exact(library, backend, pad):
    """BinarySignConv2d with alpha = 1 returns the popcount result itself (|dot| <= 9*300 < 2**24)."""
    cin, cout = 300, 72
    weight, _, _ = conv_case(cin, cout, 3, seed=7)
    x = make_x(cin, 13, 11, torch.float32, seed=3)
    _, dot = ref.binary_conv2d(x, weight, torch.ones(cout), pad_value=pad)
    ours = run_conv(library, backend, x, weight, torch.ones(cout), pad_value=pad)
    assert_bit_identical(ours, dot.numpy().astype(np.float32), f"pad_value={pad}")
    assert np.abs(ours).max() > 100  # not a degenerate all-zero sign map


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_padding_is_not_plus_minus_one(library, backend):
    """A constant +1 sign map: interior taps see 9*C, border taps fewer (padding 0), corners 4*C; pad_value=1
    gives 9*C everywhere. Exact counts, independent of the reference."""
    cin = 37
    weight = torch.ones(1, cin, 3, 3)
    x = torch.ones(1, cin, 4, 5)
    zero_pad = run_conv(library, backend, x, weight, torch.ones(1), pad_value=0)[0, 0]
    assert zero_pad[0, 0] == 4 * cin and zero_pad[0, 2] == 6 * cin and zero_pad[1, 1] == 9 * cin
    one_pad = run_conv(library, backend, x, weight, torch.ones(1), pad_value=1)[0, 0]
    assert (one_pad == 9 * cin).all()


@pytest.mark.parametrize("backend", ["host", "gpu"])
@pytest.mark.parametrize("op", ["TimestepBias", "TimestepRPReLU"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_timestep_affine_matches_spec_for_every_group(library, backend, op, dtype):
    gen = torch.Generator().manual_seed(5)
    channels = 45
    x = torch.randn(2, channels, 7, 9, generator=gen).to(dtype)
    if op == "TimestepBias":
        tables = {"table": torch.randn(5, channels, generator=gen)}
    else:
        tables = {"bias0": torch.randn(5, channels, generator=gen), "slope": torch.rand(5, channels, generator=gen),
                  "bias1": torch.randn(5, channels, generator=gen)}
    for t0 in TIMESTEPS:
        t = np.array([t0, 0], dtype=np.int32)
        expected = ref.timestep_affine(x, t, **tables)
        ours = kernels.timestep_affine(on_backend(backend, x.numpy()), on_backend(backend, t),
                                       **{k: on_backend(backend, v.numpy()) for k, v in tables.items()},
                                       library=library)
        assert_bit_identical(to_numpy(ours), expected.numpy(), f"{op} t={t0}")


def test_arguments_outside_the_spec_are_refused(library):
    weight, alpha, tables = conv_case(8, 8, 3, seed=1)
    x = make_x(8, 4, 4, torch.float32, seed=1)
    with pytest.raises(BdmError, match="invalid argument"):
        run_conv(library, "host-simple", x, weight, alpha, t=np.zeros(2, np.int32), tables=dict(tables, slope=None))
    with pytest.raises(BdmError, match="x must be float32 or float16"):
        kernels.binary_conv2d(x.double().numpy(), ref.pack_weight_signs(weight), alpha.numpy(), in_channels=8,
                              out_channels=8, kernel_size=3, library=library)


# ---- the network's own layers on the reference goldens' inputs (fixture golden_layer_io: conftest.py) -------


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_biconv_layer_of_the_golden_network(library, backend, golden_layer_io):
    for name, t0, module, x, expected in golden_layer_io:
        tables = module.group_tables()
        ours = run_conv(library, backend, x, module.binary_conv.weight.detach(), module.alpha(),
                        t=np.full(x.shape[0], t0, dtype=np.int32), tables=tables, residual=1,
                        num_groups=module.num_groups, total_steps=module.total_steps)
        assert_bit_identical(ours, expected.numpy(), f"{name} at t={t0}")


@pytest.mark.parametrize("backend", ["gpu-simple", "gpu-tensor_core"])
def test_kernels_are_cuda_graph_capture_safe(library, backend):
    """The launchers allocate nothing, synchronise nothing and read no device data on the host: they can be
    captured in a CUDA graph, and replays with new inputs (new t, so another group) give fresh results."""
    weight, alpha, tables = conv_case(64, 64, 3, seed=11)
    x = on_backend(backend, make_x(64, 10, 12, torch.float32, seed=2).numpy())
    t = on_backend(backend, np.array([100, 0], dtype=np.int32))
    args = dict(in_channels=64, out_channels=64, kernel_size=3, library=library, algo=backend.split("-", 1)[1],
                **{k: on_backend(backend, v.numpy()) for k, v in tables.items()})
    packed, alpha_dev = on_backend(backend, ref.pack_weight_signs(weight)), on_backend(backend, alpha.numpy())
    kernels.binary_conv2d(x, packed, alpha_dev, t=t, **args)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.binary_conv2d(x, packed, alpha_dev, t=t, **args)
    for t0 in (100, 1700):
        t.fill_(t0)
        graph.replay()
        torch.cuda.synchronize()
        expected, _ = ref.binary_conv2d(torch.from_numpy(to_numpy(x)), weight, alpha, t=np.array([t0]), **tables)
        assert_bit_identical(to_numpy(y), expected.numpy(), f"replay t={t0}")
