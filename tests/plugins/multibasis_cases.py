"""Shared by the MultiBasisConv tests of the CUDA kernels' C ABI (test_multibasis_kernels.py) and of the CPU kernels
(test_cpu_kernels.py): random layers of every form, the spec's conformance bound, and the nodes the exporter writes
for BinaryDM's official layer goldens."""

import sys
from pathlib import Path

import numpy as np
import pytest

from bdm.plugins import multibasis_reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))  # shared golden helpers of the BinaryDM tests
from binarydm_goldens import BOUND, build_layer, golden  # noqa: E402

# (spatial_dims, kernel_size, stride, padding, spatial shape): every form of the op, odd sizes, stride 2 with an
# odd input (the last window is cut), padding wider than 1, a 1-D kernel over a short sequence
FORMS = [
    (2, 3, 1, 1, (9, 7)),
    (2, 3, 2, 1, (9, 7)),
    (2, 1, 1, 0, (5, 6)),
    (2, 3, 1, 2, (4, 5)),
    (1, 3, 1, 1, (11,)),
    (1, 1, 1, 0, (6,)),
    (0, 1, 1, 0, ()),
]
# (in_channels, out_channels): below, across and at multiples of 32, and across the tensor-core kernel's 64-channel
# block edge (its 64-pixel edge: the 9 x 7 forms, batch 2); with 3 x 3 kernels K is never a whole number of its
# 256-bit chunks
CHANNELS = [(40, 24), (32, 33), (7, 5), (96, 16), (70, 80)]


def random_case(cin, cout, form, num_bases, seed):
    """x, packed weight, scale, bias, act_step of one layer; s2 < s1 as BinaryDM's residual basis."""
    spatial_dims, kernel_size = form[0], form[1]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cin) + form[4]).astype(np.float32)
    signs = np.where(rng.standard_normal((num_bases, cout, cin) + (kernel_size,) * spatial_dims) > 0, 1, -1)
    scale = (rng.random((num_bases, cout)) * [[0.1], [0.03]][:num_bases] + 0.005).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    return x, ref.pack_bases(signs), scale, bias, np.array([0.37], np.float32)


def attributes(cin, cout, form, num_bases, act_bits):
    spatial_dims, kernel_size, stride, padding, _ = form
    return dict(in_channels=cin, out_channels=cout, num_bases=num_bases, spatial_dims=spatial_dims,
                kernel_size=kernel_size, stride=stride, padding=padding, act_bits=act_bits)


def assert_conforms(ours, expected, what):
    """The spec's bound: |y - y_ref| <= 1e-5 * max|y_ref| over the tensor."""
    assert ours.shape == expected.shape and ours.dtype == np.float32, what
    err = float(np.abs(ours.astype(np.float64) - expected).max())
    bound = BOUND * float(np.abs(expected).max())
    assert err <= bound, f"{what}: max|diff| {err:.3g} > {bound:.3g}"


def unit_step_case(bits, numel):
    """act_step a with grad_scale(a) == 1.0 exactly for this numel (so x / step is x and codes are exact)."""
    qp = 2 ** (bits - 1) - 1
    for a in (1.0, 2.0, 0.5):
        if ref.activation_step(np.float32(a), numel, qp) == np.float32(1.0):
            return np.array([a], np.float32)
    pytest.fail(f"no power-of-two act_step gives step 1 for numel {numel}")


def exact_code_case(act_bits):
    """(inputs, attributes, 2 * expected y) of a layer whose output float32 holds exactly: step 1, s1 = 1, s2 = 0.5,
    bias 0, so y = sum_c k_c * W_hat_c is a multiple of 0.5 far below 2^24. x holds halves (ties round to even:
    2.5 -> 2, -0.5 -> -0, 3.5 -> 4) and values beyond the grid (clamped to Qn / Qp); the expected y is integer
    arithmetic, independent of the reference's quantizer."""
    cin, cout, form = 70, 9, (2, 3, 1, 1, (6, 5))
    rng = np.random.default_rng(act_bits)
    qn, qp = ref.act_range(act_bits)
    x = (rng.integers(2 * qn - 12, 2 * qp + 12, size=(2, cin) + form[4]) / 2).astype(np.float32)
    signs = np.where(rng.standard_normal((2, cout, cin, 3, 3)) > 0, 1, -1)
    scale = np.stack([np.ones(cout), np.full(cout, 0.5)]).astype(np.float32)
    act_step = unit_step_case(act_bits, x.size)
    codes = np.round(np.clip(x.astype(np.float64), qn, qp))  # half to even
    w_hat = 2 * (signs[0] + 0.5 * signs[1])  # in halves: integer
    padded = np.pad(codes, ((0, 0), (0, 0), (1, 1), (1, 1)))
    doubled = np.zeros((2, cout, 6, 5))
    for i in range(3):
        for j in range(3):
            doubled += np.einsum("nchw,oc->nohw", padded[:, :, i:i + 6, j:j + 5], w_hat[:, :, i, j])
    assert np.abs(doubled).max() > 4 * qp  # not a degenerate case
    inputs = (x, ref.pack_bases(signs), scale, np.zeros(cout, np.float32), act_step)
    return inputs, attributes(cin, cout, form, 2, act_bits), doubled


def ones_case():
    """(inputs, attributes) of all-ones x and weights, one basis, step 1, A4, 3x3 with padding 1 on a 4 x 5 image."""
    cin = 37
    x = np.ones((1, cin, 4, 5), np.float32)
    weight = ref.pack_bases(np.ones((1, 1, cin, 3, 3)))
    inputs = (x, weight, np.ones((1, 1), np.float32), np.zeros(1, np.float32), unit_step_case(4, x.size))
    return inputs, attributes(cin, 1, (2, 3, 1, 1, (4, 5)), 1, 4)


GOLDEN_MODES = {"static": "y_static", "dynamic": "y_dynamic", "w1a32": "y_w1a32"}


def golden_layer_nodes(bdm_ref, case):
    """(mode, node inputs x / weight / scale / bias / act_step as NumPy, attributes, official output as float64) for
    every mode of a layer golden: what the exporter feeds the node (packed bases, s1/s2, bias, and the step: the stored
    alpha in static mode, 2*mean|x|/sqrt(Qp) computed before the node in dynamic mode)."""
    from bdm.export.binarydm_layers import act_range, dynamic_step

    meta, state, arrays = golden(bdm_ref, case)
    layer = build_layer(meta, state)
    view = layer.export_view()
    assert view.packed_signs is not None, f"{case}: the golden layer holds an exact-zero sign"
    x = arrays["x"]
    bits = meta["act_quantizer"]["nbits"]
    spatial_dims = {"conv2d": 2, "conv1d": 1, "linear": 0}[view.kind]
    base = dict(in_channels=layer.in_channels, out_channels=layer.out_channels, num_bases=view.order,
                spatial_dims=spatial_dims, kernel_size=view.weight_shape[2] if spatial_dims else 1,
                stride=view.stride, padding=view.padding)
    for mode, key in GOLDEN_MODES.items():
        act_step = dynamic_step(x, act_range(bits)[1]) if mode == "dynamic" else view.act_step
        inputs = (x.numpy(), view.packed_signs.numpy(), view.scales.numpy(), view.bias.numpy(), act_step.numpy())
        yield mode, inputs, dict(base, act_bits=0 if mode == "w1a32" else bits), arrays[key].numpy().astype(np.float64)
