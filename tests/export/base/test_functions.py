"""The op specs, the ONNX function bodies (run by ONNX Runtime) and the NumPy reference agree: random inputs with
many border pixels, exact zeros of x + threshold (sign(0) = 0), C not a multiple of 32, 1x1 and 3x3, every pad
value, fp32 and fp16, and t on every group boundary and out of range. The reference is tied to the PyTorch
BIConv and to hand-computed border values."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bdm.export.base import functions
from bdm.export.bidiffsr.network import BIConv
from bdm.plugins import packing, reference, spec

K, T = 5, 2000
# group boundaries (399/400 ... 1599/1600), the ends, and out-of-range t
TIMESTEPS = [0, 399, 400, 799, 800, 1199, 1200, 1599, 1600, 1999, -7, 2000, 123456]


def session(op_type, dtypes, attributes):
    model = functions.single_op_model(op_type, dtypes, attributes)
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def table(rng, channels, dtype):
    # rounded through x's dtype, so that -table is representable in it (exact zeros of x + table below)
    return rng.standard_normal((K, channels)).astype(dtype).astype(np.float32)


def with_exact_zeros(x, row, rng, fraction=0.15):
    """x with x[n,c,h,w] = -row[c] at random places (x + row == +0.0 there) and -0.0 at some others."""
    x = x.copy()
    hit = rng.random(x.shape) < fraction
    x[hit] = np.broadcast_to(-row.reshape(1, -1, 1, 1), x.shape)[hit].astype(x.dtype)
    x[(rng.random(x.shape) < 0.02) & ~hit] = -0.0
    return x


def other_group_t(t0):
    """A second sample's t in another group: only t[0] may select the group."""
    return (t0 + T // 2) % T


def check_against_reference(op_type, dtype, attributes, inputs_for_t, added_table=None):
    """Bit-identical outputs for every t; the pre-sign (or pre-PReLU) value x + added_table[g] must have hit
    exact zeros."""
    sess = session(op_type, {n: v.dtype for n, v in inputs_for_t(0).items()}, attributes)
    zeros_seen = 0
    for t0 in TIMESTEPS:
        inputs = inputs_for_t(t0)
        (got,) = sess.run(None, inputs)
        expected = reference.run(op_type, inputs, attributes)
        assert got.dtype == expected.dtype == dtype
        np.testing.assert_array_equal(got, expected, err_msg=f"{op_type} {attributes} t={t0}")
        added = 0 if added_table is None else inputs[added_table][spec.group_index(t0, K, T)].reshape(1, -1, 1, 1)
        zeros_seen += int(np.sum(inputs["x"].astype(np.float32) + added == 0))
    assert zeros_seen > 0


BINARY_CASES = [  # in_channels, out_channels, kernel_size, pad_value, residual, dtype
    (40, 40, 3, 0, 1, np.float32),
    (40, 40, 1, 0, 1, np.float32),
    (32, 7, 3, -1, 0, np.float32),
    (5, 5, 3, 1, 1, np.float16),
    (33, 9, 1, 0, 0, np.float16),
    (64, 64, 3, 0, 1, np.float16),
]


@pytest.mark.parametrize("cin, cout, k, pad_value, residual, dtype", BINARY_CASES)
def test_binary_conv2d_function_equals_reference(cin, cout, k, pad_value, residual, dtype):
    rng = np.random.default_rng(cin * 100 + k)
    latent = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    tables = dict(threshold=table(rng, cin, dtype), bias0=table(rng, cout, dtype), slope=table(rng, cout, dtype),
                  bias1=table(rng, cout, dtype))
    x = rng.standard_normal((2, cin, 5, 6)).astype(dtype)

    def inputs_for_t(t0):
        g = spec.group_index(t0, K, T)
        return dict(x=with_exact_zeros(x, tables["threshold"][g], rng), t=np.array([t0, other_group_t(t0)], np.int32),
                    weight=packing.pack_signs(latent), alpha=np.abs(latent).mean(axis=(1, 2, 3)), **tables)

    attributes = dict(in_channels=cin, out_channels=cout, kernel_size=k, pad_value=pad_value, residual=residual)
    check_against_reference("BinaryConv2d", dtype, attributes, inputs_for_t, "threshold")


@pytest.mark.parametrize("cin, cout, k, pad_value, residual, dtype", BINARY_CASES[1:4])
def test_binary_sign_conv2d_function_equals_reference(cin, cout, k, pad_value, residual, dtype):
    rng = np.random.default_rng(cin + k)
    latent = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    x = rng.standard_normal((3, cin, 4, 7)).astype(dtype)

    def inputs_for_t(_t0):
        return dict(x=with_exact_zeros(x, np.zeros(cin, np.float32), rng), weight=packing.pack_signs(latent),
                    alpha=np.abs(latent).mean(axis=(1, 2, 3)))

    attributes = dict(in_channels=cin, out_channels=cout, kernel_size=k, pad_value=pad_value)
    check_against_reference("BinarySignConv2d", dtype, attributes, inputs_for_t)


@pytest.mark.parametrize("op_type", ["TimestepBias", "TimestepRPReLU"])
@pytest.mark.parametrize("channels, dtype", [(3, np.float32), (37, np.float16)])
def test_timestep_affine_functions_equal_reference(op_type, channels, dtype):
    rng = np.random.default_rng(channels)
    names = [n for n in spec.input_names(op_type) if n not in ("x", "t")]
    tables = {n: table(rng, channels, dtype) for n in names}
    x = rng.standard_normal((2, channels, 3, 5)).astype(dtype)

    def inputs_for_t(t0):
        g = spec.group_index(t0, K, T)
        first = tables[names[0]][g]  # table / bias0: the value x + it == 0 exercises the z >= 0 branch at 0
        return dict(x=with_exact_zeros(x, first, rng), t=np.array([t0, other_group_t(t0)], np.int32), **tables)

    check_against_reference(op_type, dtype, dict(channels=channels), inputs_for_t, names[0])


@pytest.mark.parametrize("num_groups, total_steps", [(5, 2000), (7, 1000)])
def test_function_group_rule_is_the_spec_rule_for_every_t(num_groups, total_steps):
    """TimestepBias with table[g] = g on x = 0 outputs g itself."""
    sess = session("TimestepBias", dict(x=np.float32, t=np.int32, table=np.float32),
                   dict(channels=1, num_groups=num_groups, total_steps=total_steps))
    group_table = np.arange(num_groups, dtype=np.float32).reshape(-1, 1)
    x = np.zeros((2, 1, 1, 1), np.float32)
    for t0 in [*range(-30, total_steps + 30), 2 ** 31 - 1, -2 ** 31]:
        (y,) = sess.run(None, dict(x=x, t=np.array([t0, 0], np.int32), table=group_table))
        assert y.reshape(-1).tolist() == [spec.group_index(t0, num_groups, total_steps)] * 2, t0


def test_function_signatures_follow_the_spec():
    for op_type, op in spec.ops().items():
        fn = functions.make_function(op_type, functions.MIN_OPSET)
        assert fn.domain == spec.common()["domain"] and fn.name == op_type
        assert list(fn.input) == spec.input_names(op_type)
        assert list(fn.output) == [o["name"] for o in op["outputs"]]
        defaults = {a.name: onnx.helper.get_attribute_value(a) for a in fn.attribute_proto}
        assert set(fn.attribute) | set(defaults) == set(op["attributes"]) | set(functions.PLUGIN_ATTRIBUTES)
        expected = {**spec.attribute_defaults(op_type), "plugin_namespace": b"bdm", "plugin_version": b"1"}
        assert defaults == expected
        used = {n.op_type for n in fn.node}
        assert not used & {"BitwiseAnd", "BitShift"}  # opset 17 bodies: arithmetic unpacking


def test_node_attributes_write_out_every_default_and_check_allowed_values():
    attrs = functions.node_attributes("BinaryConv2d", dict(in_channels=8, out_channels=8, kernel_size=3))
    assert attrs == dict(in_channels=8, out_channels=8, kernel_size=3, num_groups=5, total_steps=2000, pad_value=0,
                         residual=1, plugin_namespace="bdm", plugin_version="1")
    with pytest.raises(ValueError, match="kernel_size = 5"):
        functions.node_attributes("BinaryConv2d", dict(in_channels=8, out_channels=8, kernel_size=5))
    with pytest.raises(ValueError, match="needs the attributes"):
        functions.node_attributes("TimestepBias", {})


@pytest.mark.parametrize("pad_value, corner, edge, inside", [(0, 4, 6, 9), (-1, -1, 3, 9), (1, 9, 9, 9)])
def test_reference_pads_the_sign_map_after_the_sign(pad_value, corner, edge, inside):
    """All-ones sign map and all-positive weights, 3x3: a tap outside the image contributes pad_value."""
    weight = packing.pack_signs(np.ones((1, 1, 3, 3), np.float32))
    dot = reference.binary_dot(np.ones((1, 1, 4, 5), np.int8), weight, 1, 3, pad_value)[0, 0]
    assert (dot[0, 0], dot[0, 2], dot[1, 1]) == (corner, edge, inside)
    assert dot[3, 4] == corner and dot[2, 0] == edge


@pytest.mark.parametrize("k", [1, 3])
def test_reference_equals_the_pytorch_biconv(k):
    """The spec's BinaryConv2d on the packed weights and group tables of a BIConv is that BIConv, bit for bit."""
    torch.manual_seed(k)
    cin = 36
    module = BIConv(cin, cin, k, K, T).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, cin, 6, 5)
    tables = {n: v.numpy() for n, v in module.group_tables().items()}
    attributes = dict(in_channels=cin, out_channels=cin, kernel_size=k)
    for t0 in TIMESTEPS:
        g = spec.group_index(t0, K, T)
        x_zeros = torch.from_numpy(with_exact_zeros(x.numpy(), tables["threshold"][g], np.random.default_rng(t0 & 7)))
        t = torch.tensor([t0, other_group_t(t0)])
        with torch.no_grad():
            expected = module(x_zeros, t).numpy()
        got = reference.run("BinaryConv2d", dict(x=x_zeros.numpy(), t=t.numpy().astype(np.int32),
                                                 weight=packing.pack_signs(module.binary_conv.weight.detach().numpy()),
                                                 alpha=module.alpha().numpy(), **tables), attributes)
        np.testing.assert_array_equal(got, expected, err_msg=f"t={t0}")
