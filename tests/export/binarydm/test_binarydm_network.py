"""The BinaryDM UNet against the official UNet golden (unet_cifar_like_w32), its precision map and its config.

y_fp and y_w1a32 are well conditioned; y_static and y_dynamic are chaotic (one flipped 4-bit code moves the output
by up to ~30 %), so they are only reproducible by the bit-faithful fp32 path on one thread, which is what is
asserted here for all three timesteps; the execution trace localises the first diverging layer otherwise."""

import json

import pytest
import torch

from bdm.errors import BdmError
from bdm.export.base.sign_zeros import SignZero, find_sign_zeros
from bdm.export.binarydm.config import BINARYDM_RELEASED, MODES, claims_config, unet_params
from bdm.export.binarydm.layers import set_mode
from bdm.export.binarydm.network import (binarized_layers, build_binarydm, first_trace_divergence, quantizer_trace,
                                         sign_sources)

from binarydm_goldens import BOUND, one_thread, unet_golden  # noqa: F401 (fixtures)  # tests/export


@pytest.fixture()
def unet(unet_golden):
    meta, state, _ = unet_golden
    model = build_binarydm(meta)
    model.load_state_dict(state, strict=True)
    return model


def test_precision_map_is_the_official_one(unet, unet_golden):
    meta = unet_golden[0]
    layers = dict(binarized_layers(unet))
    assert list(layers) == [m["name"] for m in meta["modules"]]
    for m in meta["modules"]:
        layer = layers[m["name"]]
        assert (layer.precision, layer.order, list(layer.weight.shape)) == \
               (m["precision"], m["order"], m["weight_shape"]), m["name"]
        assert layer.kind == {"BNNConv2d": "conv2d", "BNNConv1d": "conv1d", "BNNLinear": "linear"}[m["class"]]
        if "stride" in m:
            assert (layer.stride, layer.padding) == (m["stride"], m["padding"]), m["name"]
    assert [n for n, l in layers.items() if l.precision == "full"] == meta["full_precision_layers"]


@pytest.mark.parametrize("mode", MODES)
def test_unet_every_mode_and_timestep(unet, unet_golden, mode):
    _, _, arrays = unet_golden
    set_mode(unet, mode)
    for i, t in enumerate(arrays["timesteps"]):
        eps = unet(arrays["x"][i], t)
        official = arrays[f"y_{mode}"][i]
        err = float((eps - official).abs().max())
        assert err <= BOUND * float(official.abs().max()), f"{mode} t={int(t[0])}: max|diff| {err:.3g}"
        assert torch.equal(eps, official), f"{mode} t={int(t[0])}: within the bound ({err:.3g}) but not bit-exact"


def test_static_trace_and_block_outputs(unet, unet_golden):
    meta, _, arrays = unet_golden
    captured = {}
    for name in meta["hooks"]:
        unet.get_submodule(name).register_forward_hook(
            lambda m, args, y, name=name: captured.__setitem__(name, y))
    eps, trace = quantizer_trace(unet, arrays["x"][0], arrays["timesteps"][0])
    assert torch.equal(eps, arrays["y_static"][0])
    for name in meta["hooks"]:
        assert torch.equal(captured[name], arrays["static_t0_" + name.replace(".", "_")]), name
    reference = meta["static_t0_trace"]
    assert first_trace_divergence(trace, reference) is None
    assert [e["op"] for e in trace] == [e["op"] for e in reference]
    for mine, ref in zip(trace, reference):
        assert {k: mine.get(k) for k in ("sum_k", "sum_abs_k", "n_at_Qn", "n_at_Qp", "y_sum", "y_absmax")} == \
               {k: ref.get(k) for k in ("sum_k", "sum_abs_k", "n_at_Qn", "n_at_Qp", "y_sum", "y_absmax")}, ref["op"]


def test_exact_zero_weight_found_and_matters(unet, unet_golden):
    """README: output_blocks.2.1.conv.weight[19,19,2,1] is exactly 0, sign 0 in the official layer. Packing it as
    +1 moves y_static by ~30 %, and the trace points at that very layer."""
    meta, state, arrays = unet_golden
    assert find_sign_zeros(sign_sources(unet)) == [SignZero("output_blocks.2.1.conv.weight", 1, (19, 19, 2, 1))]
    unet.get_submodule("output_blocks.2.1.conv").weight[19, 19, 2, 1] = 1e-12  # what 1-bit packing does: +1
    eps, trace = quantizer_trace(unet, arrays["x"][0], arrays["timesteps"][0])
    rel = float((eps - arrays["y_static"][0]).abs().max() / arrays["y_static"][0].abs().max())
    assert rel > 0.05
    diverged = first_trace_divergence(trace, meta["static_t0_trace"])
    assert trace[diverged]["op"] == "output_blocks.2.1.conv"


def test_released_network_layout():
    """bedrooms.yaml: 274.25 M parameters; 39.84 M weights in order-2 layers, 233.02 M in order-1, 1.02 M FP
    (ARCHITECTURE.md §7)."""
    model = build_binarydm(None, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 274_250_340
    counts = {}
    for _, layer in binarized_layers(model):
        key = "fp" if layer.precision == "full" else f"order{layer.order}"
        counts[key] = counts.get(key, 0) + layer.weight.numel()
    assert counts == {"fp": 1_015_616, "order2": 39_839_744, "order1": 233_017_344}
    assert all(layer.act_bits == 8 for _, layer in binarized_layers(model))


def test_layer_overrides(unet_golden):
    meta = unet_golden[0]
    model = build_binarydm(meta, device="meta", layer_overrides={"out.2": {"precision": "bnn", "order": 1},
                                                                 "middle_block.0.in_layers.2": {"order": 2}})
    assert (model.out[2].precision, model.out[2].order) == ("bnn", 1)
    assert model.middle_block[0].in_layers[2].order == 2
    with pytest.raises(BdmError, match="does not have"):
        build_binarydm(meta, device="meta", layer_overrides={"out.3": {"order": 1}})
    with pytest.raises(BdmError, match="precision 'binary'"):
        build_binarydm(meta, device="meta", layer_overrides={"out.2": {"precision": "binary"}})


def test_config_forms(unet_golden, tmp_path):
    params = dict(unet_golden[0]["constructor"], act_bits=4)
    ldm_yaml = tmp_path / "ldm.yaml"
    ldm_yaml.write_text(json.dumps({"model": {"target": "ldm.models.diffusion.ddpm_ours.LatentDiffusion", "params": {
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel_ours.UNetModel",
                        "params": dict(params, use_checkpoint=True, legacy=False)}}}}))
    expected = unet_params(params)
    assert unet_params(ldm_yaml) == expected
    assert unet_params(unet_golden[0]) == expected  # the golden JSON: constructor + act_quantizer.nbits
    assert unet_params({"target": "x.UNetModel", "params": params}) == expected
    assert claims_config(ldm_yaml) and claims_config(params)
    assert not claims_config({"network_g": {"type": "BIDiffSRUNet"}}) and not claims_config(tmp_path / "none.yaml")
    assert unet_params(None) == unet_params(BINARYDM_RELEASED)


@pytest.mark.parametrize("change, message", [
    ({"num_classes": 10}, "num_classes"),
    ({"use_spatial_transformer": True}, "use_spatial_transformer"),
    ({"act_bits": 2}, "act_bits"),
    ({"model_channels": 48}, "multiples of 32"),
    ({"channel_mults": [1, 2]}, "unknown keys \\['channel_mults'\\]"),
    ({"num_head_channels": -1}, "num_heads or num_head_channels"),
])
def test_bad_configs_are_one_line_errors(unet_golden, change, message):
    params = dict(unet_golden[0]["constructor"], **change)
    with pytest.raises(BdmError, match=message):
        unet_params(params)


def test_bad_inputs_are_one_line_errors(unet, tmp_path):
    with pytest.raises(BdmError, match="no LDM UNet section"):
        unet_params({"network_g": {"type": "BIDiffSRUNet"}})
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    with pytest.raises(BdmError, match="not valid YAML"):
        unet_params(tmp_path / "broken.yaml")
    with pytest.raises(BdmError, match="multiple of 8"):
        unet(torch.zeros(1, 3, 36, 36), torch.tensor([5]))
    with pytest.raises(BdmError, match="x_t must be"):
        unet(torch.zeros(1, 4, 32, 32), torch.tensor([5]))
    with pytest.raises(BdmError, match="t must be"):
        unet(torch.zeros(2, 3, 32, 32), torch.tensor([5, 6, 7]))
