"""BinaryDM layers, attention core and blocks against the official goldens (shared/reference/binarydm).

Every mode of every case must match bit for bit on one thread (the official fp32 arithmetic is reproduced step by
step); the acceptance bound max|ours - official| <= 1e-5 * max|official| is asserted as well, so a failure says
which of the two broke."""

import numpy as np
import pytest
import torch

from bdm.errors import BdmError
from bdm.export.base.sign_zeros import SignZero, find_sign_zeros
from bdm.export.binarydm.config import MODES
from bdm.export.binarydm.network import sign_sources
from bdm.export.binarydm.layers import (BinarizedConv2d, BinarizedLinear, QuantizedQKVAttention, act_range,
                                        dynamic_step, effective_step, official_scale_init, set_mode)
from bdm.plugins.multibasis_reference import pack_bases, sign_bases
from bdm.plugins.packing import ZeroWeightError

from binarydm_goldens import LAYER_CASES, assert_within_bound, build_case, build_layer, golden  # tests/export
from binarydm_goldens import one_thread  # noqa: F401 (an autouse fixture)


def assert_matches(ours, official, what):
    err = assert_within_bound(ours, official, what)
    assert torch.equal(ours, official), f"{what}: within the bound ({err:.3g} relative) but not bit-exact"


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_every_mode(bdm_ref, case):
    meta, state, arrays = golden(bdm_ref, case)
    layer = build_layer(meta, state)
    x = arrays["x"]
    for mode in MODES:
        set_mode(layer, mode)
        assert_matches(layer(x), arrays[f"y_{mode}"], f"{case} {mode}")
    # the static forward neither uses nor changes anything but the stored parameters
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_quantized_input_and_weight_exact(bdm_ref, case):
    meta, state, arrays = golden(bdm_ref, case)
    layer = build_layer(meta, state)
    assert torch.equal(layer.quantizer_a(arrays["x"]), arrays["static_xq"])
    assert torch.equal(layer.binarized_weight(), arrays["static_w_hat"])
    qn, qp = act_range(meta["act_quantizer"]["nbits"])
    assert (qn, qp) == (meta["act_quantizer"]["Qn"], meta["act_quantizer"]["Qp"])
    assert torch.equal(dynamic_step(arrays["x"], qp), arrays["dynamic_alpha"])
    # README: no case of this set is affected by the 1-ulp grad_scale effect, so x_q is an exact multiple of alpha
    codes, step = layer.quantizer_a.codes(arrays["x"], dynamic=False)
    assert torch.equal(step, layer.quantizer_a.alpha)
    assert torch.equal(codes * layer.quantizer_a.alpha, arrays["static_xq"])
    assert codes.min() >= qn and codes.max() <= qp and bool((codes == qp).any())


def test_reinit_matches_official_first_call(bdm_ref):
    meta, state, arrays = golden(bdm_ref, "conv3x3_s1_order2")
    layer = build_layer(meta, state)
    official_scale_init(layer)
    assert torch.equal(layer.scaling_first_order, arrays["reinit_scaling_first_order"])
    assert torch.equal(layer.scaling_second_order, arrays["reinit_scaling_second_order"])
    set_mode(layer, "dynamic")
    assert_matches(layer(arrays["x"]), arrays["y_reinit"], "reinit")


def test_effective_step_is_grad_scale_arithmetic():
    """The official step (a - a*g) + a*g is not always a: find a 1-ulp case and check the formula's value."""
    alphas = torch.linspace(0.01, 1.0, 4001)
    steps = effective_step(alphas, 65536, 7)
    g = torch.tensor(1.0 / np.sqrt(65536 * 7), dtype=torch.float32)
    expected = (alphas - alphas * g) + alphas * g
    assert torch.equal(steps, expected)
    off = int((steps != alphas).sum())
    assert 0 < off < 0.01 * alphas.numel()


def test_attention_core_every_mode(bdm_ref):
    attention, _, arrays = build_case(bdm_ref, "attention_core_legacy")
    for mode in ("static", "dynamic", "fp"):
        set_mode(attention, mode)
        assert_matches(attention(arrays["x"]), arrays[f"y_{mode}"], f"attention {mode}")
    # w1a32 has no quantization inside attention either
    set_mode(attention, "w1a32")
    assert_matches(attention(arrays["x"]), arrays["y_fp"], "attention w1a32")


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_attention_quantizers_exact(bdm_ref, mode):
    """static: the four quantized einsum operands; dynamic: the four steps recomputed from the batch."""
    _, state, arrays = golden(bdm_ref, "attention_core_legacy")
    attention = set_mode(QuantizedQKVAttention(2, act_bits=4), mode)
    attention.load_state_dict(state, strict=True)
    seen = {}

    def record(tag):
        def hook(module, args, x_q):
            seen[tag] = (args[0], x_q)
        return hook

    for tag in "qkwv":
        getattr(attention, f"act_quantizer_{tag}").register_forward_hook(record(tag))
    attention(arrays["x"])
    for tag, (x, x_q) in seen.items():
        if mode == "static":
            assert torch.equal(x_q, arrays[f"static_{tag}_q"]), tag
        else:
            assert torch.equal(dynamic_step(x, 7), arrays[f"dynamic_alpha_{tag}"]), tag
    assert sorted(seen) == sorted("qkwv")


def test_attention_probabilities_clip_at_qp_steps(bdm_ref):
    """Signed A4 on softmax output: probabilities saturate at 7 * alpha_w, half of the grid is unused."""
    _, state, arrays = golden(bdm_ref, "attention_core_legacy")
    alpha_w = state["act_quantizer_w.alpha"]
    w_q = arrays["static_w_q"]
    assert float(w_q.min()) >= 0 and torch.isclose(w_q.max(), 7 * alpha_w).all()


def test_resblock_every_mode(bdm_ref):
    block, _, arrays = build_case(bdm_ref, "resblock_32to64_order2")
    for mode in MODES:
        set_mode(block, mode)
        assert_matches(block(arrays["x"], arrays["emb"]), arrays[f"y_{mode}"], f"resblock {mode}")


def test_attention_block_every_mode(bdm_ref):
    block, _, arrays = build_case(bdm_ref, "attnblock_64_order1")
    for mode in MODES:
        set_mode(block, mode)
        assert_matches(block(arrays["x"]), arrays[f"y_{mode}"], f"attention block {mode}")


def test_export_view_packs_both_bases(bdm_ref):
    meta, state, arrays = golden(bdm_ref, "conv3x3_s2_order2")
    layer = build_layer(meta, state)
    view = layer.export_view()
    assert (view.kind, view.stride, view.padding, view.order, view.act_bits) == ("conv2d", 2, 1, 2, 4)
    assert view.packed_signs.shape == (2, 64, 3, 3, 2)
    assert view.packed_signs.dtype == torch.int32
    # W_hat rebuilt from the planes and the per-channel scales is the official effective weight
    rebuilt = (view.sign_planes.float() * view.scales[:, :, None, None, None]).sum(0)
    assert torch.allclose(rebuilt, arrays["static_w_hat"], rtol=1e-6, atol=0)
    assert torch.equal(view.act_step, state["quantizer_a.alpha"])
    # unpack: bit b of word w is input channel 32*w + b, 1 means +1
    bits = (view.packed_signs.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    unpacked = bits.reshape(2, 64, 3, 3, 64).movedim(-1, 2) * 2 - 1
    assert torch.equal(unpacked.to(torch.int8), view.sign_planes)


def test_pack_bases_layout_and_zero_refusal():
    planes = -np.ones((1, 2, 40), dtype=np.int8)  # linear [O=2, I=40]: two words, 24 unused bits in the second
    planes[0, 0, 0] = planes[0, 0, 31] = planes[0, 1, 33] = 1
    packed = pack_bases(planes)
    assert packed.dtype == np.int32 and packed.tolist() == [[[1 | -(2 ** 31), 0], [0, 2]]]
    assert np.array_equal(sign_bases(packed, 40), planes)
    planes[0, 1, 5] = 0
    with pytest.raises(ZeroWeightError, match="exact-zero"):
        pack_bases(planes)


def test_exact_zero_weight_reported_in_both_bases():
    layer = BinarizedConv2d(4, 2, 3, padding=1, order=2, act_bits=4)
    torch.manual_seed(0)
    layer.weight.data.normal_()
    layer.weight.data[1, 2, 0, 1] = 0.0
    assert find_sign_zeros(sign_sources(layer)) == [SignZero("weight", 1, (1, 2, 0, 1)),
                                                    SignZero("weight", 2, (1, 2, 0, 1))]
    with pytest.raises(ZeroWeightError):
        layer.export_view()


def test_bad_layer_settings_are_one_line_errors():
    with pytest.raises(BdmError, match="activation bits 3"):
        BinarizedConv2d(4, 4, act_bits=3)
    with pytest.raises(BdmError, match="order 3"):
        BinarizedLinear(4, 4, order=3)
    with pytest.raises(BdmError, match="mode 'int4'"):
        set_mode(BinarizedLinear(4, 4), "int4")
