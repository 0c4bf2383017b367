"""The MultiBasisConv op (plugins/multibasis_conv/spec.yaml): its NumPy reference against the official BinaryDM
layer goldens in every mode, and its ONNX function body in ONNX Runtime against the reference on random inputs
(conv2d / conv1d / linear, 1 and 2 bases, A4 / A8 / none, stride 2, padding, channel counts not multiples of 32),
the quantizer bit for bit on rounding ties, clipping and the grad_scale step."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from bdm.export.base import functions
from bdm.export.binarydm.layers import dynamic_step, effective_step
from bdm.export.base.multibasis_functions import act_quantize
from bdm.plugins import reference, spec
from bdm.plugins.multibasis_reference import activation_step, pack_bases, quantize, sign_bases

from binarydm_goldens import LAYER_CASES, assert_within_bound, build_layer, golden  # tests/export

OP = "MultiBasisConv"


def session(model):
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def single_node(arrays, attributes):
    node = helper.make_node(OP, list(arrays), ["y"], domain=functions.DOMAIN,
                            **functions.node_attributes(OP, attributes))
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), [f"{n}{d}" for d in
                                                                                        range(a.ndim)])
              for n, a in arrays.items()]
    output = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [f"y{d}" for d in range(arrays["x"].ndim)])
    graph = helper.make_graph([node], OP, inputs, [output])
    return functions.attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def layer_inputs(layer, x, step):
    view = layer.export_view()
    return dict(x=np.asarray(x, np.float32), weight=view.packed_signs.numpy(), scale=view.scales.numpy(),
                bias=view.bias.numpy(), act_step=np.asarray(step, np.float32).reshape(1))


def layer_attributes(layer, act_bits):
    view = layer.export_view()
    spatial = {"linear": 0, "conv1d": 1, "conv2d": 2}[view.kind]
    return dict(in_channels=layer.in_channels, out_channels=layer.out_channels, num_bases=view.order,
                spatial_dims=spatial, kernel_size=view.weight_shape[-1] if spatial else 1, stride=view.stride,
                padding=view.padding, act_bits=act_bits)


@pytest.mark.parametrize("case", LAYER_CASES)
def test_reference_reproduces_the_official_layer(bdm_ref, case):
    """static / dynamic / w1a32 from the packed bases and scales alone; static_xq bit for bit."""
    meta, state, arrays = golden(bdm_ref, case)
    layer = build_layer(meta, state)
    bits = meta["act_quantizer"]["nbits"]
    x = arrays["x"].numpy()
    alpha = state["quantizer_a.alpha"].numpy()
    assert np.array_equal(quantize(x, alpha, bits), arrays["static_xq"].numpy())
    steps = {"static": alpha, "dynamic": dynamic_step(arrays["x"], 2 ** (bits - 1) - 1).numpy(), "w1a32": alpha}
    for mode, step in steps.items():
        attributes = layer_attributes(layer, 0 if mode == "w1a32" else bits)
        y = reference.run(OP, layer_inputs(layer, x, step), attributes)
        assert_within_bound(torch.from_numpy(y), arrays[f"y_{mode}"], f"{case} {mode}")


CASES = [  # spatial_dims, in, out, kernel, stride, padding, bases, bits, size
    (2, 40, 8, 3, 1, 1, 2, 4, 9), (2, 64, 16, 3, 2, 1, 1, 8, 9), (2, 33, 5, 1, 1, 0, 2, 0, 7),
    (2, 96, 7, 3, 2, 1, 2, 4, 8),
    (1, 70, 12, 1, 1, 0, 2, 4, 9), (1, 20, 6, 3, 1, 1, 1, 4, 11), (0, 256, 16, 1, 1, 0, 2, 4, 0),
    (0, 31, 3, 1, 1, 0, 1, 0, 0), (0, 128, 9, 1, 1, 0, 1, 8, 0)]


@pytest.mark.parametrize("spatial_dims, cin, cout, k, stride, padding, bases, bits, size", CASES)
def test_function_body_matches_reference(spatial_dims, cin, cout, k, stride, padding, bases, bits, size):
    rng = np.random.default_rng(cin * 7 + cout)
    signs = rng.choice(np.array([-1, 1], np.int8), size=(bases, cout, cin) + (k,) * spatial_dims)
    packed = pack_bases(signs)
    assert packed.shape == (bases, cout) + (k,) * spatial_dims + (math.ceil(cin / 32),)
    assert np.array_equal(sign_bases(packed, cin), signs)
    attributes = dict(in_channels=cin, out_channels=cout, num_bases=bases, spatial_dims=spatial_dims, kernel_size=k,
                      stride=stride, padding=padding, act_bits=bits)
    sess = session(single_node(dict(x=np.zeros((1, cin) + (size,) * spatial_dims, np.float32), weight=packed,
                                    scale=np.zeros((bases, cout), np.float32), bias=np.zeros(cout, np.float32),
                                    act_step=np.zeros(1, np.float32)), attributes))
    for batch in (1, 3):
        arrays = dict(x=(rng.standard_normal((batch, cin) + (size,) * spatial_dims) * 2).astype(np.float32),
                      weight=packed, scale=rng.uniform(0.01, 0.2, (bases, cout)).astype(np.float32),
                      bias=rng.standard_normal(cout).astype(np.float32), act_step=np.array([0.37], np.float32))
        expected = reference.run(OP, arrays, attributes)
        (y,) = sess.run(None, arrays)
        assert y.shape == expected.shape
        assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


def quantizer_session(bits):
    """The quantizer subgraph alone, built by the function bodies' own builder."""
    body = functions._Body()
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = act_quantize(body, "x", "act_step", body.const(float(qn), np.float32), body.const(float(qp), np.float32))
    body.nodes.append(helper.make_node("Identity", [out], ["x_q"]))
    graph = helper.make_graph(body.nodes, "quantizer",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"]),
                               helper.make_tensor_value_info("act_step", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x_q", onnx.TensorProto.FLOAT, ["n"])])
    return session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def off_by_one_ulp_alpha(numel, qp, rng):
    """An alpha whose official grad_scale step differs from it (about 0.1 % of alphas)."""
    for _ in range(100000):
        alpha = np.float32(rng.uniform(0.01, 2.0))
        if float(effective_step(torch.tensor([alpha]), numel, qp)) != alpha:
            return alpha
    raise AssertionError("no such alpha found")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizer_subgraph_is_bit_exact(bits):
    """Ties k + 0.5 (half to even), their float neighbours, values far outside [Qn, Qp] and signed zeros."""
    rng = np.random.default_rng(bits)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    sess = quantizer_session(bits)
    for alpha in (np.float32(0.0731), off_by_one_ulp_alpha(4099, qp, rng)):
        ties = (np.arange(qn - 3, qp + 3, dtype=np.float32) + np.float32(0.5)) * alpha
        x = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)),
                            rng.standard_normal(4099 - 3 * ties.size - 2).astype(np.float32) * alpha * 20,
                            np.array([0.0, -0.0], np.float32)]).astype(np.float32)
        step = np.array([alpha], np.float32)
        (x_q,) = sess.run(None, dict(x=x, act_step=step))
        assert np.array_equal(x_q, quantize(x, step, bits))
        official = effective_step(torch.tensor(step), x.size, qp)
        assert activation_step(step, x.size, qp) == np.float32(official)
        codes = torch.round(torch.clamp(torch.from_numpy(x) / official, qn, qp))
        assert np.array_equal(x_q, (codes * official).numpy())
        assert set(np.unique(x_q / activation_step(step, x.size, qp)).round().astype(int)) >= {qn, qp}


def test_spec_declares_the_plugin_and_checks_attributes():
    assert OP in spec.plugin_ops()
    assert set(spec.plugin_ops()) == {"BinaryConv2d", "BinarySignConv2d", "TimestepBias", "TimestepRPReLU", OP}
    packed = pack_bases(np.ones((1, 4, 8, 3), np.int8))
    arrays = dict(x=np.ones((1, 8, 5), np.float32), weight=packed, scale=np.ones((1, 4), np.float32),
                  bias=np.zeros(4, np.float32), act_step=np.ones(1, np.float32))
    good = dict(in_channels=8, out_channels=4, num_bases=1, spatial_dims=1, kernel_size=3, padding=1, act_bits=4)
    assert reference.run(OP, arrays, good).shape == (1, 4, 5)
    for change, text in [(dict(stride=2), "needs spatial_dims 2"), (dict(kernel_size=1), "weight shape"),
                         (dict(num_bases=2), "weight shape"), (dict(act_bits=3), "act_bits = 3"),
                         (dict(in_channels=9), "weight shape|x shape")]:
        with pytest.raises(ValueError, match=text):
            reference.run(OP, arrays, {**good, **change})
