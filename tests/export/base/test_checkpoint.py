"""Checkpoint loading (bdm.load_model) and network configs: official formats load strictly, every bad input is
one BdmError line that names the problem and the fix."""

import collections
import warnings

import pytest
import torch
import yaml

import bdm
from bdm.errors import BdmError
from bdm.export.base.sign_zeros import SignZero, find_sign_zeros
from bdm.export.bidiffsr import network as bidiffsr
from bdm.export.bidiffsr.config import BIDIFFSR_RELEASED, bidiffsr_network_g
from bdm.export.registry import FAMILIES, load_model


class NotATensor:  # a custom class: torch.load(weights_only=True) must refuse it
    pass


@pytest.fixture(scope="module")
def small(bi_ref):
    state = torch.load(bi_ref / "ckpt_small_x4.pth", weights_only=True)["params"]
    return bi_ref / "ckpt_small_x4.pth", bi_ref / "ckpt_small_x4.yml", state


def _error(call) -> str:
    with pytest.raises(BdmError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message
    return message


def _assert_loaded(model, state):
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k].float()) for k in state)
    assert not model.training


def test_official_checkpoint_loads_strictly_without_warnings(small):
    path, config, state = small
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no exact-zero warning for the reduced checkpoint
        model = bdm.load_model(path, config=config)
    _assert_loaded(model, state)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_config_as_network_g_dict_or_whole_options_dict(small):
    path, config, state = small
    options = yaml.safe_load(config.read_text())
    _assert_loaded(load_model(path, config=options["network_g"]), state)
    _assert_loaded(load_model(path, config=options, family="bi_diffsr"), state)


def test_params_ema_preferred_and_module_prefix_stripped(small, tmp_path):
    path, config, state = small
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    wrapped = tmp_path / "ema.pth"
    torch.save({"params": zeros, "params_ema": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    _assert_loaded(load_model(wrapped, config=config), state)


def test_bare_state_dict_and_fp16_weights(small, tmp_path):
    path, config, state = small
    bare = tmp_path / "bare.pth"
    torch.save(collections.OrderedDict(state), bare)
    _assert_loaded(load_model(bare, config=config), state)
    half = tmp_path / "half.pth"
    torch.save({"params": {k: v.half() for k, v in state.items()}}, half)
    model = load_model(half, config=config)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_loaded(model, {k: v.half() for k, v in state.items()})


def test_missing_and_unexpected_keys(small, tmp_path):
    path, config, state = small
    broken = dict(state)
    del broken["final_conv.block.3.bias"]
    broken["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "keys.pth"
    torch.save({"params": broken}, bad)
    message = _error(lambda: load_model(bad, config=config))
    assert "1 missing keys (final_conv.block.3.bias)" in message
    assert "1 unexpected keys (extra.weight)" in message
    assert "(1371 tensors)" in message and "--config" in message


def test_wrong_shapes_name_the_first_offenders_and_the_fix(small):
    path, _, _ = small
    # the reduced checkpoint against the default (released) network: same keys, other shapes
    message = _error(lambda: load_model(path))
    assert "released config" in message
    assert "1370 shape mismatches (timestep_level_mlp.1.weight: checkpoint [32, 8] vs network [256, 64]" in message
    assert "(+1367)" in message
    assert "pass --config <the official options YAML> for a non-released network" in message


def test_pickled_custom_object_is_refused(small, tmp_path):
    _, config, state = small
    bad = tmp_path / "object.pth"
    torch.save({"params": state, "optimizer": NotATensor()}, bad)
    message = _error(lambda: load_model(bad, config=config))
    assert "pickled Python object that torch.load(weights_only=True) refuses" in message
    assert "NotATensor" in message and "torch.save({'params': model.state_dict()}, path)" in message


@pytest.mark.parametrize("content, reason", [(b"network_g:\n  type: BIDiffSRUNet\n", "UnpicklingError"),
                                             (b"", "EOFError: empty")])
def test_non_checkpoint_file(tmp_path, content, reason):
    bad = tmp_path / "notes.pth"
    bad.write_bytes(content)
    message = _error(lambda: load_model(bad))
    assert message.startswith(f"{bad} is not a PyTorch checkpoint ({reason}")
    assert "pass the .pth file written by torch.save" in message


def test_missing_path_and_directory(tmp_path):
    assert _error(lambda: load_model(tmp_path / "nope.pth")) == f"checkpoint {tmp_path / 'nope.pth'} not found"
    assert "is not a file" in _error(lambda: load_model(tmp_path))


def test_containers_that_hold_no_state_dict(tmp_path):
    cases = [(torch.zeros(3), "holds a Tensor, not a state_dict"),
             ({"params": [torch.zeros(1)]}, "'params' holds a list, not a state_dict"),
             ({"epoch": 3, "weights": {}}, "has none of the keys ['params_ema', 'params']"),
             ({"params": {"a": 1}}, "entry 'a' is a int, not a tensor")]
    for i, (obj, expected) in enumerate(cases):
        path = tmp_path / f"{i}.pth"
        torch.save(obj, path)
        assert expected in _error(lambda: load_model(path, family="bi_diffsr"))


def test_family_dispatch(small, tmp_path):
    path, config, state = small
    assert FAMILIES["bi_diffsr"].name == "bi_diffsr"
    assert "unknown model family 'sr3'" in _error(lambda: load_model(path, config=config, family="sr3"))
    other = tmp_path / "other.pth"
    torch.save({"params": {"encoder.conv_in.weight": torch.zeros(1)}}, other)
    assert "cannot tell which model family" in _error(lambda: load_model(other))
    # no config: the keys say bi_diffsr (its released network then mismatches the reduced shapes)
    assert "does not match the bi_diffsr network of the released config" in _error(lambda: load_model(path))
    # the config's network type says bi_diffsr even when the keys do not
    renamed = tmp_path / "renamed.pth"
    torch.save({"params": {k.replace("TaR", "TaX"): v for k, v in state.items()}}, renamed)
    assert "unexpected keys" in _error(lambda: load_model(renamed, config=config))


def test_exact_zero_binary_weights_are_found_and_warned(small, tmp_path):
    _, config, state = small
    zeroed = {k: v.clone() for k, v in state.items()}
    zeroed["downs.3.biconv2.binary_conv.weight"][1, 2, 0, 1] = 0.0
    zeroed["ups.20.biconv1.binary_conv.weight"][0, 0, 2, 2] = 0.0
    zeroed["ups.20.biconv1.binary_conv.weight"][5, 1, 0, 0] = 0.0
    zeroed["final_conv.block.3.weight"][0, 0, 0, 0] = 0.0  # FP weight: zeros are fine there
    path = tmp_path / "zeros.pth"
    torch.save({"params": zeroed}, path)
    with pytest.warns(UserWarning, match=r"3 sign-0 weights, which 1-bit packing cannot hold \(first: exact-zero "
                                         r"latent weights in downs.3.biconv2.binary_conv.weight at \[o, c, \.\.\.\] = "
                                         r"\[1, 2, 0, 1\], basis 1\).*refuse"):
        model = load_model(path, config=config)
    weight = "ups.20.biconv1.binary_conv.weight"
    assert find_sign_zeros(bidiffsr.sign_sources(model)) == [
        SignZero("downs.3.biconv2.binary_conv.weight", 1, (1, 2, 0, 1)), SignZero(weight, 1, (0, 0, 2, 2)),
        SignZero(weight, 1, (5, 1, 0, 0))]


def test_network_config_parsing_and_validation(bi_ref, tmp_path):
    assert bidiffsr_network_g() == BIDIFFSR_RELEASED
    small = bidiffsr_network_g(bi_ref / "ckpt_small_x4.yml")
    assert small == {**BIDIFFSR_RELEASED, "inner_channel": 8, "norm_groups": 2}
    assert bidiffsr_network_g({k: v for k, v in small.items() if k != "dropout"})["dropout"] == 0.0
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("network_g: [unclosed\n")
    cases = [
        ({**small, "type": "SR3UNet"}, "network_g type 'SR3UNet' is not a BI-DiffSR network"),
        ({k: v for k, v in small.items() if k != "fp_res"}, "missing keys ['fp_res'], unknown keys []"),
        ({**small, "with_noise_level_emb": True}, "unknown keys ['with_noise_level_emb']"),
        ({**small, "channel_mults": [1, 2, 2, 4]}, "channel_mults must be [1, 2, 4, ...]"),
        ({**small, "norm_groups": 3}, "divisible by norm_groups 3"),
        ({**small, "res_blocks": 0}, "res_blocks must be a positive integer"),
        ({**small, "fp_res": 128}, "fp_res must be a list of integers"),
        ({"path": {}}, "has no network_g section"),
        (tmp_path / "missing.yml", "missing.yml not found"),
        (bad_yaml, "is not valid YAML"),
    ]
    for config, expected in cases:
        assert expected in _error(lambda: bidiffsr_network_g(config))
