"""The bit-packed CPU kernels (bdm.plugins.cpu_kernels, libbdm_cpu_kernels.so) against the op specs' NumPy reference
(plugins/reference.py), the golden networks' own layers, the CUDA kernels' host path, and each other.

BinaryConv2d / BinarySignConv2d must be bit-identical to the reference: the dot product is an exact integer and every
later step one IEEE float32 operation in the spec's order, so any difference is a bug, not rounding. MultiBasisConv
(act_bits 4 / 8) must equal the CUDA kernels' host path bit for bit (same exact class dots, same epilogue) and meet
the spec's bound against the reference; act_bits 0 runs torch's float conv on W_hat (the spec's bound). Every
instruction-set path this CPU runs and 1 vs 2 threads must give identical outputs.
"""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bdm.errors import BdmError
from bdm.plugins import build as plugin_build
from bdm.plugins import cpu_kernels, packing, reference
from bdm.plugins import multibasis_reference as mref
from bdm.plugins.cpu_kernels import CpuKernelsUnavailable
from multibasis_cases import (CHANNELS, FORMS, assert_conforms, attributes, exact_code_case, golden_layer_nodes,
                              ones_case, random_case)
from plugin_test_support import BUILD_DIR

from binarydm_goldens import LAYER_CASES  # noqa: E402 (on sys.path through multibasis_cases)

# t values: every group, both sides of each boundary, and clamping below 0 / above total_steps
TIMESTEPS = [0, 399, 400, 1000, 1599, 1600, 1999, 2500, -5]
# (in_channels, out_channels, kernel_size, height, width, batch): channels below, across and past multiples of 32 and
# 64, 1x1 and 3x3, tiny images (1x1, 2x3, 1xW, Hx1), odd sizes, rows across the 16 / 32-pixel tile edges
BINARY_CASES = [
    (3, 3, 3, 5, 6, 2),
    (33, 33, 3, 9, 7, 2),
    (65, 65, 1, 4, 3, 3),
    (40, 40, 3, 1, 1, 2),
    (40, 40, 3, 2, 3, 1),
    (40, 40, 3, 1, 37, 2),
    (8, 8, 3, 3, 1, 2),
    (64, 64, 3, 7, 40, 1),
    (96, 70, 3, 6, 33, 2),
    (130, 20, 1, 5, 17, 1),
]


@pytest.fixture(scope="module")
def isas():
    """The instruction-set paths this CPU runs (the library is built here on first use)."""
    try:
        return cpu_kernels.available_isas()
    except CpuKernelsUnavailable as e:
        if "needs a C++ compiler" in str(e):
            pytest.skip(str(e))
        raise


def kernel_sets(isas):
    """(name, CpuKernels) for every path, each with 1 and 2 threads."""
    return [(f"{isa}/{threads} threads", cpu_kernels.load(isa, threads)) for isa in isas for threads in (1, 2)]


def assert_bit_identical(ours, expected, what):
    assert ours.dtype == expected.dtype and ours.shape == expected.shape, what
    differ = int((ours.view(np.uint32) != expected.view(np.uint32)).sum())
    assert differ == 0, (f"{what}: {differ} of {ours.size} elements differ, max |diff| "
                         f"{np.abs(ours.astype(np.float64) - expected).max():.3g}")


def binary_layer(cin, cout, k, seed):
    """Packed weights, alpha and tables of a random BinaryConv2d; channels 0 and cin-1 have threshold 0 (with zeros
    in x they give exact zeros of the sign map, in the first and the last 32-channel word)."""
    rng = np.random.default_rng(seed)
    weight = packing.pack_signs(rng.standard_normal((cout, cin, k, k)).astype(np.float32))
    alpha = (rng.random(cout) + 0.01).astype(np.float32)
    tables = {"threshold": (rng.standard_normal((5, cin)) * 0.3).astype(np.float32),
              "bias0": rng.standard_normal((5, cout)).astype(np.float32),
              "slope": rng.random((5, cout)).astype(np.float32),
              "bias1": rng.standard_normal((5, cout)).astype(np.float32)}
    tables["threshold"][:, [0, cin - 1]] = 0.0
    return weight, alpha, tables


def binary_input(cin, h, w, batch, seed):
    """x with exact zeros (+0.0 and -0.0) in channels 0 and cin-1 (sign 0 inside the image)."""
    x = np.random.default_rng(seed).standard_normal((batch, cin, h, w)).astype(np.float32)
    x[:, 0, ::2, ::3] = 0.0
    x[:, cin - 1, 1::3, ::2] = -0.0
    return x


def run_binary(kernels, op_type, attrs, constants, x, t=None):
    run = kernels.prepare(op_type, attrs, constants)
    inputs = {"x": torch.from_numpy(x)} if t is None else {"x": torch.from_numpy(x), "t": torch.from_numpy(t)}
    y = run(**inputs)
    assert y.dtype == torch.float32 and y.is_contiguous()
    return y.numpy()


@pytest.mark.parametrize("case", BINARY_CASES, ids=lambda c: "cin{}_cout{}_k{}_{}x{}_n{}".format(*c))
def test_binary_conv2d_is_bit_identical_to_the_reference(isas, case):
    """Every pad_value, residual 0 / 1, every group and its boundaries (only t[0] counts), every path and thread
    count."""
    cin, cout, k, h, w, batch = case
    weight, alpha, tables = binary_layer(cin, cout, k, seed=cin * 1000 + cout)
    x = binary_input(cin, h, w, batch, seed=h * w)
    constants = dict(weight=weight, alpha=alpha, **tables)
    kernels = kernel_sets(isas)
    for pad_value in (-1, 0, 1):
        for residual in ((0, 1) if cin == cout else (0,)):
            attrs = dict(in_channels=cin, out_channels=cout, kernel_size=k, pad_value=pad_value, residual=residual)
            for t0 in TIMESTEPS:
                t = np.array([t0] + [1999 - max(t0, 0) % 2000] * (batch - 1), dtype=np.int32)
                expected = reference.run("BinaryConv2d", dict(constants, x=x, t=t), attrs)
                for name, k_set in kernels:
                    assert_bit_identical(run_binary(k_set, "BinaryConv2d", attrs, constants, x, t), expected,
                                         f"{name} pad {pad_value} residual {residual} t={t0}")


@pytest.mark.parametrize("case", BINARY_CASES[:6], ids=lambda c: "cin{}_cout{}_k{}_{}x{}_n{}".format(*c))
def test_binary_sign_conv2d_is_bit_identical_to_the_reference(isas, case):
    """sign(x) with x = +0.0 / -0.0 -> 0, y = alpha * dot."""
    cin, cout, k, h, w, batch = case
    weight, alpha, _ = binary_layer(cin, cout, k, seed=cin + cout)
    x = binary_input(cin, h, w, batch, seed=h + w)
    for pad_value in (-1, 0, 1):
        attrs = dict(in_channels=cin, out_channels=cout, kernel_size=k, pad_value=pad_value)
        expected = reference.run("BinarySignConv2d", dict(x=x, weight=weight, alpha=alpha), attrs)
        for name, k_set in kernel_sets(isas):
            assert_bit_identical(run_binary(k_set, "BinarySignConv2d", attrs, dict(weight=weight, alpha=alpha), x),
                                 expected, f"{name} pad {pad_value}")


@pytest.mark.parametrize("pad_value", [-1, 0, 1])
def test_integer_dot_product_is_exact(isas, pad_value):
    """BinarySignConv2d with alpha = 1 returns the dot product itself (|dot| <= 9*300 < 2**24), against the
    reference's integer dot; a window with many zeros (a zero band of x) takes the exact-zero correction."""
    cin, cout = 300, 72
    weight, _, _ = binary_layer(cin, cout, 3, seed=7)
    x = binary_input(cin, 13, 35, 1, seed=3)
    x[:, 100:200, 4:6, :] = 0.0
    dot = reference.binary_dot(reference.sign(x), weight, cin, 3, pad_value).astype(np.float32)
    attrs = dict(in_channels=cin, out_channels=cout, kernel_size=3, pad_value=pad_value)
    for name, k_set in kernel_sets(isas):
        ours = run_binary(k_set, "BinarySignConv2d", attrs, dict(weight=weight, alpha=np.ones(cout, np.float32)), x)
        assert_bit_identical(ours, dot, f"{name} pad {pad_value}")
    assert np.abs(dot).max() > 100  # not a degenerate all-zero sign map


def test_zero_padding_is_not_plus_minus_one(isas):
    """A constant +1 sign map and +1 weights: interior outputs see 9*C, edges 6*C, corners 4*C with pad_value 0;
    pad_value 1 gives 9*C everywhere, -1 gives 9*C - 2*(padded taps)*C. Counts independent of the reference."""
    cin = 37
    weight = packing.pack_signs(np.ones((1, cin, 3, 3), np.float32))
    x = np.ones((1, cin, 4, 5), np.float32)
    for name, k_set in kernel_sets(isas):
        y = {pad: run_binary(k_set, "BinarySignConv2d", dict(in_channels=cin, out_channels=1, kernel_size=3,
                                                               pad_value=pad),
                             dict(weight=weight, alpha=np.ones(1, np.float32)), x)[0, 0] for pad in (-1, 0, 1)}
        assert (y[0][0, 0], y[0][0, 2], y[0][1, 1]) == (4 * cin, 6 * cin, 9 * cin), name
        assert (y[1] == 9 * cin).all(), name
        assert (y[-1][0, 0], y[-1][0, 2], y[-1][1, 1]) == (-cin, 3 * cin, 9 * cin), name


def test_a_corrupted_weight_bit_changes_exactly_its_output_channel(isas):
    """Not a stub: flipping one packed bit (o = 5, centre tap, channel 40) moves every output of channel 5 by 2
    (alpha 1, no zeros in x) and leaves every other channel alone."""
    cin, cout = 70, 9
    weight, _, _ = binary_layer(cin, cout, 3, seed=11)
    x = np.random.default_rng(1).standard_normal((1, cin, 6, 7)).astype(np.float32)
    attrs = dict(in_channels=cin, out_channels=cout, kernel_size=3, pad_value=0)
    corrupted = weight.copy()
    corrupted.view(np.uint32)[5, 1, 1, 1] ^= np.uint32(1 << 8)
    for name, k_set in kernel_sets(isas):
        run = lambda w: run_binary(k_set, "BinarySignConv2d", attrs,  # noqa: E731
                                   dict(weight=w, alpha=np.ones(cout, np.float32)), x)
        diff = run(corrupted) - run(weight)
        assert (np.delete(diff, 5, axis=1) == 0).all(), name
        assert (np.abs(diff[0, 5]) == 2).all(), name


def test_a_large_output_streamed_past_the_caches_is_bit_identical(isas):
    """64 channels at 128 x 256 (an 8 MB y: the stores go around the caches), one image in many row bands per
    thread, against the reference."""
    cin = 64
    weight, alpha, tables = binary_layer(cin, cin, 3, seed=5)
    x = binary_input(cin, 128, 256, 1, seed=5)
    attrs = dict(in_channels=cin, out_channels=cin, kernel_size=3)
    constants = dict(weight=weight, alpha=alpha, **tables)
    t = np.array([1234], np.int32)
    expected = reference.run("BinaryConv2d", dict(constants, x=x, t=t), attrs)
    for name, k_set in kernel_sets(isas):
        assert_bit_identical(run_binary(k_set, "BinaryConv2d", attrs, constants, x, t), expected, name)


def test_every_biconv_layer_of_the_golden_network(isas, golden_layer_io):
    """The 56 BIConv layers of the BI-DiffSR golden network at 5 timesteps (every group), on their real inputs."""
    for name, t0, module, x, expected in golden_layer_io:
        attrs = dict(in_channels=module.in_channels, out_channels=module.out_channels,
                     kernel_size=module.kernel_size, num_groups=module.num_groups, total_steps=module.total_steps,
                     pad_value=0, residual=1)
        constants = dict(weight=packing.pack_signs(module.binary_conv.weight.detach().numpy()),
                         alpha=module.alpha().numpy(), **{k: v.numpy() for k, v in module.group_tables().items()})
        for isa in isas:
            ours = run_binary(cpu_kernels.load(isa), "BinaryConv2d", attrs, constants, x.numpy(),
                              np.full(x.shape[0], t0, dtype=np.int64))
            assert_bit_identical(ours, expected.numpy(), f"{isa} {name} at t={t0}")


# ---- MultiBasisConv -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_host_library():
    """libbdm_kernels.so if built here (its host path runs the CUDA kernels' own per-output functions)."""
    for build_dir in (None, BUILD_DIR):
        path = plugin_build.find_kernels_library(build_dir)
        if path is not None:
            return str(path)
    pytest.skip("libbdm_kernels.so is not built here (python -m bdm.plugins.build, needs nvcc and CMake): equality "
                "with the CUDA kernels' host path is checked where it is")


# The forms of the CUDA tests, whose narrow outputs run in flat mode (im2col), plus outputs 64 and 30 wide that run in
# row mode on every path, and a 1 x 1 image.
CPU_FORMS = FORMS + [(2, 3, 1, 1, (3, 64)), (2, 3, 2, 1, (5, 60)), (1, 3, 1, 1, (64,)), (2, 3, 1, 1, (1, 1))]


def form_id(form):
    return "d{}_k{}_s{}_p{}_{}".format(*form[:4], "x".join(map(str, form[4])) or "1")


def run_multibasis(kernels, inputs, attrs):
    x, weight, scale, bias, act_step = inputs
    run = kernels.prepare("MultiBasisConv", attrs, dict(weight=weight, scale=scale, bias=bias))
    y = run(x=torch.from_numpy(x), act_step=torch.from_numpy(act_step))
    assert y.dtype == torch.float32 and y.is_contiguous()
    return y.numpy()


def cuda_host(library, inputs, attrs):
    from bdm.plugins import kernels

    return kernels.multibasis_conv(*inputs, algo="simple", library=library, **attrs)


@pytest.mark.parametrize("act_bits", [0, 4, 8])
@pytest.mark.parametrize("num_bases", [1, 2])
@pytest.mark.parametrize("form", CPU_FORMS, ids=form_id)
def test_multibasis_conv_conforms_and_every_path_is_identical(isas, form, num_bases, act_bits):
    """Within the spec bound of the reference; every path and thread count bit-identical to the portable one."""
    for cin, cout in CHANNELS:
        inputs = random_case(cin, cout, form, num_bases, seed=cin * 100 + cout)
        attrs = attributes(cin, cout, form, num_bases, act_bits)
        first = None
        for name, k_set in kernel_sets(isas):
            ours = run_multibasis(k_set, inputs, attrs)
            if first is None:
                assert_conforms(ours, mref.multibasis_conv(*inputs, **attrs), f"{name} cin {cin} cout {cout}")
                first = ours
            assert_bit_identical(ours, first, f"{name} cin {cin} cout {cout}")


@pytest.mark.parametrize("act_bits", [4, 8])
@pytest.mark.parametrize("num_bases", [1, 2])
@pytest.mark.parametrize("form", CPU_FORMS, ids=form_id)
def test_multibasis_conv_equals_the_cuda_host_path(isas, cuda_host_library, form, num_bases, act_bits):
    for cin, cout in CHANNELS:
        inputs = random_case(cin, cout, form, num_bases, seed=cin + cout)
        attrs = attributes(cin, cout, form, num_bases, act_bits)
        expected = cuda_host(cuda_host_library, inputs, attrs)
        for isa in isas:
            assert_bit_identical(run_multibasis(cpu_kernels.load(isa), inputs, attrs), expected,
                                 f"{isa} cin {cin} cout {cout}")


@pytest.mark.parametrize("act_bits", [4, 8])
def test_multibasis_codes_and_dot_products_are_exact(isas, act_bits):
    inputs, attrs, doubled = exact_code_case(act_bits)
    for name, k_set in kernel_sets(isas):
        assert np.array_equal(run_multibasis(k_set, inputs, attrs).astype(np.float64) * 2, doubled), name


def test_multibasis_padding_comes_after_quantization_and_adds_zero(isas):
    inputs, attrs = ones_case()
    cin = attrs["in_channels"]
    for name, k_set in kernel_sets(isas):
        y = run_multibasis(k_set, inputs, attrs)[0, 0]
        assert (y[0, 0], y[0, 2], y[1, 1]) == (4 * cin, 6 * cin, 9 * cin), name


@pytest.mark.parametrize("case", LAYER_CASES)
def test_every_binarydm_layer_golden(isas, bdm_ref, case):
    """The official layer goldens in static / dynamic / w1a32 mode, through the node the exporter writes."""
    for mode, inputs, attrs, expected in golden_layer_nodes(bdm_ref, case):
        for isa in isas:
            assert_conforms(run_multibasis(cpu_kernels.load(isa), inputs, attrs), expected, f"{isa} {case} {mode}")


@pytest.mark.parametrize("case", LAYER_CASES)
def test_binarydm_layer_goldens_equal_the_cuda_host_path(isas, cuda_host_library, bdm_ref, case):
    for mode, inputs, attrs, _ in golden_layer_nodes(bdm_ref, case):
        if attrs["act_bits"]:
            expected = cuda_host(cuda_host_library, inputs, attrs)
            for isa in isas:
                assert_bit_identical(run_multibasis(cpu_kernels.load(isa), inputs, attrs), expected,
                                     f"{isa} {case} {mode}")


# ---- the contract: refusals, ISA choice, build, OpenMP runtime ------------------------------------------------------

def test_supports_names_what_the_kernels_do_not_run(isas):
    kernels = cpu_kernels.load()
    assert kernels.supports("BinaryConv2d", dict(in_channels=8, out_channels=8, kernel_size=3)) is None
    assert kernels.supports("MultiBasisConv", dict(in_channels=8, out_channels=8, num_bases=2, spatial_dims=2,
                                                   kernel_size=3, padding=1, act_bits=4)) is None
    assert "no CPU kernel for TimestepBias" in kernels.supports("TimestepBias", dict(channels=8))
    assert "kernel_size = 5" in kernels.supports("BinaryConv2d", dict(in_channels=8, out_channels=8, kernel_size=5))
    assert "in_channels == out_channels" in kernels.supports("BinaryConv2d", dict(in_channels=8, out_channels=4,
                                                                                   kernel_size=3))
    assert "stride 2 needs spatial_dims 2" in kernels.supports(
        "MultiBasisConv", dict(in_channels=8, out_channels=8, num_bases=1, spatial_dims=1, kernel_size=3, stride=2))
    with pytest.raises(CpuKernelsUnavailable, match="act_bits = 3"):
        kernels.prepare("MultiBasisConv", dict(in_channels=8, out_channels=8, num_bases=1, spatial_dims=0,
                                               act_bits=3), {})


def test_unsupported_inputs_are_refused_in_one_line(isas):
    kernels = cpu_kernels.load()
    weight, alpha, _ = binary_layer(8, 8, 3, seed=1)
    attrs = dict(in_channels=8, out_channels=8, kernel_size=3)
    run = kernels.prepare("BinarySignConv2d", attrs, dict(weight=weight, alpha=alpha))
    with pytest.raises(CpuKernelsUnavailable, match="BinarySignConv2d with float16 x"):
        run(x=torch.zeros(1, 8, 4, 4, dtype=torch.float16))
    with pytest.raises(CpuKernelsUnavailable, match=r"constant alpha is float64 \[8\]"):
        kernels.prepare("BinarySignConv2d", attrs, dict(weight=weight, alpha=alpha.astype(np.float64)))
    with pytest.raises(CpuKernelsUnavailable, match="takes the constants"):
        kernels.prepare("BinarySignConv2d", attrs, dict(weight=weight))
    with pytest.raises(BdmError, match="8 channels on axis 1"):
        run(x=torch.zeros(1, 9, 4, 4))


def test_outputs_go_into_a_given_buffer(isas):
    """out=: y written into the caller's tensor (the same bits as a fresh one) and returned; a wrong buffer, or one
    sharing memory with x, is refused."""
    kernels = cpu_kernels.load()
    weight, alpha, tables = binary_layer(40, 40, 3, seed=2)
    x = torch.from_numpy(binary_input(40, 5, 7, 2, seed=2))
    t = torch.tensor([700, 0])
    run = kernels.prepare("BinaryConv2d", dict(in_channels=40, out_channels=40, kernel_size=3),
                          dict(weight=weight, alpha=alpha, **tables))
    out = torch.full((2, 40, 5, 7), float("nan"))
    assert run(x=x, t=t, out=out) is out
    assert_bit_identical(out.numpy(), run(x=x, t=t).numpy(), "BinaryConv2d out=")
    for form, act_bits in (((0, 1, 1, 0, ()), 4), ((2, 3, 2, 1, (9, 7)), 8), ((1, 3, 1, 1, (11,)), 0)):
        inputs = random_case(40, 24, form, 2, seed=4)
        attrs = attributes(40, 24, form, 2, act_bits)
        mrun = kernels.prepare("MultiBasisConv", attrs, dict(weight=inputs[1], scale=inputs[2], bias=inputs[3]))
        feed = dict(x=torch.from_numpy(inputs[0]), act_step=torch.from_numpy(inputs[4]))
        fresh = mrun(**feed)
        out = torch.full(fresh.shape, float("nan"))
        assert mrun(**feed, out=out) is out
        assert_bit_identical(out.numpy(), fresh.numpy(), f"MultiBasisConv {form} act_bits {act_bits} out=")
    with pytest.raises(BdmError, match=r"out must be a contiguous float32 CPU tensor of shape \[2, 40, 5, 7\]"):
        run(x=x, t=t, out=torch.zeros(2, 40, 5, 6))
    with pytest.raises(BdmError, match="out shares memory with x"):
        run(x=x, t=t, out=x)


def test_isa_choice(isas, monkeypatch):
    """$BDM_CPU_ISA forces a path; an unknown name is one clear error; the default is the fastest path."""
    assert cpu_kernels.load().isa == cpu_kernels.load(isas[0]).isa
    monkeypatch.setenv(cpu_kernels.ISA_ENVIRONMENT, "portable")
    assert cpu_kernels.load().isa == "portable"
    monkeypatch.setenv(cpu_kernels.ISA_ENVIRONMENT, "sse9")
    with pytest.raises(CpuKernelsUnavailable, match="BDM_CPU_ISA=sse9 is not an instruction-set path"):
        cpu_kernels.load()
    lacking = [isa for isa in ("avx512", "avx2") if isa not in isas]
    if not lacking:
        pytest.skip("this CPU runs every path: the refusal of a missing one is checked on a CPU without one")
    monkeypatch.setenv(cpu_kernels.ISA_ENVIRONMENT, lacking[0])
    with pytest.raises(CpuKernelsUnavailable, match="which this CPU"):
        cpu_kernels.load()


def test_one_openmp_runtime_shared_with_torch(isas):
    """After torch, the library's libgomp.so.1 is torch's own: exactly one OpenMP runtime is mapped."""
    script = textwrap.dedent("""
        import re, torch
        from bdm.plugins import cpu_kernels
        kernels = cpu_kernels.load(threads=2)
        run = kernels.prepare("BinarySignConv2d", dict(in_channels=40, out_channels=8, kernel_size=3),
                              dict(weight=__import__("numpy").zeros((8, 3, 3, 2), "int32"),
                                   alpha=__import__("numpy").ones(8, "float32")))
        run(x=torch.randn(1, 40, 64, 64))
        maps = open("/proc/self/maps").read()
        print(sorted(set(re.findall(r"\\S*lib[gi]omp\\S*", maps))))
        print(torch.__file__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    mapped, torch_file = out.strip().splitlines()
    mapped = eval(mapped)
    assert len(mapped) == 1 and mapped[0].startswith(torch_file.rsplit("/", 1)[0]), mapped


FAKE_CXX = """#!/bin/sh
# A stand-in C++ compiler: --version, then every -o target gets a file after a pause, or it fails as told.
case "$1" in --version) echo "fake c++ 1.0"; exit 0;; esac
if [ -n "$FAKE_CXX_FAIL" ]; then echo "x.cpp:1:1: error: $FAKE_CXX_FAIL" >&2; exit 1; fi
while [ $# -gt 1 ]; do if [ "$1" = "-o" ]; then sleep 0.3; echo "built by $$" > "$2"; fi; shift; done
"""


@pytest.fixture
def fake_cxx(tmp_path, monkeypatch):
    cxx = tmp_path / "fake-c++"
    cxx.write_text(FAKE_CXX)
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("BDM_CPU_KERNELS_CACHE", str(tmp_path / "cache"))
    return cxx


def test_build_announces_itself_once_and_is_atomic_under_concurrent_builders(fake_cxx, tmp_path, capfd):
    """Two processes build at once (first use in two workers): both end with the same complete file, no temporary
    folder is left, the notice goes to stderr once per build, and a built library is not rebuilt."""
    script = "from bdm.plugins import build; print(build.build_cpu())"
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate() + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    paths = {r[0].strip() for r in results}
    assert len(paths) == 1, paths
    assert all(r[1].strip() == plugin_build.CPU_BUILD_NOTICE for r in results), results
    library = paths.pop()
    assert open(library).read().startswith("built by ")
    assert [p.name for p in (tmp_path / "cache").rglob(".build-*")] == []
    assert str(plugin_build.build_cpu()) == library
    assert capfd.readouterr().err == ""


def test_build_failure_is_one_line(fake_cxx, monkeypatch):
    monkeypatch.setenv("FAKE_CXX_FAIL", "boom")
    with pytest.raises(BdmError) as failure:
        plugin_build.build_cpu(announce=False)
    message = str(failure.value)
    assert "\n" not in message and "failed (exit 1): x.cpp:1:1: error: boom" in message
    assert plugin_build.find_cpu_library() is None
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(BdmError, match=r"needs a C\+\+ compiler: \$CXX \(/nonexistent/c\+\+\) is not on PATH"):
        plugin_build.build_cpu()


CROSSCHECK = Path(__file__).with_name("cpu_kernels_crosscheck.cpp")


def crosscheck_digests(cxx, library: Path, out: Path, isa: int, runner=()) -> str:
    """Build the crosscheck driver against `library` with `cxx` and run it on path `isa`: its digest lines."""
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{plugin_build.PLUGINS_DIR}", str(CROSSCHECK), f"-L{library.parent}",
                    "-lbdm_cpu_kernels", f"-Wl,-rpath,{library.parent}", "-o", str(out)], check=True)
    return subprocess.run([*runner, str(out), str(isa)], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_the_portable_path_on_aarch64_gives_the_same_bits(isas, tmp_path, monkeypatch):
    """The library cross-built for aarch64 (portable path only: the x86 translation units are empty there) and run
    under qemu gives the same output bytes, layer by layer, as every path here."""
    cross, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not (cross and qemu):
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu, qemu-user)")
    native = {isa: crosscheck_digests(plugin_build.find_cxx(), plugin_build.build_cpu(announce=False),
                                      tmp_path / "native", cpu_kernels.ISA_CODES[isa]) for isa in isas}
    assert len(set(native.values())) == 1 and "status 0 " in native["portable"], native
    assert native["portable"].count("status 0 ") == 7, native["portable"]
    monkeypatch.setenv("CXX", cross)
    monkeypatch.setenv("BDM_CPU_KERNELS_CACHE", str(tmp_path / "cache"))
    arm = crosscheck_digests(cross, plugin_build.build_cpu(announce=False), tmp_path / "arm", 0,
                             runner=(qemu, "-L", "/usr/aarch64-linux-gnu"))
    assert arm == native["portable"]


FAULTS_PER_STEP = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from bdm.plugins.cpu_kernels import reuse_freed_memory
    assert reuse_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(1, 64, 256, 256).fill_(1.0)  # a 16 MB activation, written and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_activations_are_reused_without_page_faults():
    """What the CPU path asks of glibc: a 16 MB activation freed and allocated again costs no new page faults (glibc's
    default mmaps and unmaps it each time: ~4096 faults)."""
    counts = {}
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True)
        counts[mode] = int(out.stdout)
    assert counts["default"] > 4 * 2000 and counts["reuse"] < 400, counts
