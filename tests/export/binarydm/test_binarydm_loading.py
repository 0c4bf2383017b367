"""bdm.load_model for BinaryDM checkpoints: Lightning state_dicts (student, EMA, FP teacher, first stage) and plain
UNet state_dicts, family detection, exact-zero reporting, one-line failures. Built from the official UNet golden."""

import pytest
import torch

from bdm.errors import BdmError
from bdm.export.binarydm.config import claims_keys
from bdm.export.binarydm.layers import set_mode
from bdm.export.registry import load_model, resolve_family

from binarydm_goldens import UNET_CASE, one_thread, unet_golden  # noqa: F401 (fixtures)  # tests/export


@pytest.fixture(scope="module")
def config(bdm_ref):
    """The golden's JSON (its constructor and act bits) as a config path."""
    return bdm_ref / f"{UNET_CASE}.json"


def lightning_checkpoint(state, ema=True):
    """What LatentDiffusion + LitEma + trainer.save_checkpoint write: the student under model.diffusion_model.,
    the EMA under model_ema.diffusion_model<key without dots>, the FP teacher under model2., the first stage,
    schedule buffers and LitEma's counters. Here the student is perturbed, so only the EMA copy reproduces the
    golden; one EMA entry is left out (a parameter LitEma did not track) and its student copy is exact."""
    untracked = "out.0.bias"
    sd = {}
    for key, value in state.items():
        sd["model.diffusion_model." + key] = value if key == untracked or not ema else value * 1.5 + 0.01
        sd["model2.model.diffusion_model." + key] = torch.zeros_like(value)
        if ema and key != untracked:
            sd["model_ema.diffusion_model" + key.replace(".", "")] = value.clone()
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
               "betas": torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)})
    return {"state_dict": sd, "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.4.2"}


def eps(model, arrays, i=0):
    return model(arrays["x"][i], arrays["timesteps"][i])


def test_lightning_checkpoint_prefers_ema(unet_golden, config, tmp_path):
    _, state, arrays = unet_golden
    path = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(state), path)
    with pytest.warns(UserWarning, match=r"output_blocks\.2\.1\.conv\.weight at \[o, c, \.\.\.\] = \[19, 19, 2, 1\]"):
        model = load_model(path, config=config)
    assert type(model).__name__ == "BinaryDMUNet"
    for mode in ("static", "fp"):
        set_mode(model, mode)
        assert torch.equal(eps(model, arrays), arrays[f"y_{mode}"][0]), mode


def test_plain_state_dict_with_config_dict(unet_golden, tmp_path):
    meta, state, arrays = unet_golden
    path = tmp_path / "unet.pt"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="sign-0"):
        model = load_model(path, config=meta, family="binarydm")
    set_mode(model, "w1a32")
    assert torch.equal(eps(model, arrays, 2), arrays["y_w1a32"][2])


def test_family_detected_from_keys(unet_golden):
    _, state, _ = unet_golden
    lightning = lightning_checkpoint(state)["state_dict"]
    assert claims_keys(state) and claims_keys(lightning)
    assert resolve_family(None, None, set(state)).name == "binarydm"
    assert resolve_family(None, None, set(lightning)).name == "binarydm"
    assert not claims_keys({"downs.0.weight", "timestep_level_mlp.1.weight"})


def test_student_used_without_ema(unet_golden, config, tmp_path):
    _, state, arrays = unet_golden
    path = tmp_path / "student.ckpt"
    torch.save(lightning_checkpoint(state, ema=False), path)
    with pytest.warns(UserWarning):
        model = load_model(path, config=config)
    set_mode(model, "fp")
    assert torch.equal(eps(model, arrays, 1), arrays["y_fp"][1])


def test_bad_inputs_are_one_line_errors(unet_golden, config, tmp_path):
    _, state, _ = unet_golden
    path = tmp_path / "unet.pt"
    missing = dict(state)
    del missing["middle_block.1.attention.act_quantizer_w.alpha"]
    torch.save(missing, path)
    with pytest.raises(BdmError, match=r"1 missing keys \(middle_block\.1\.attention\.act_quantizer_w\.alpha\)"):
        load_model(path, config=config)
    torch.save(state, path)
    # no config: the released bedrooms network, which this small UNet does not fit
    with pytest.raises(BdmError, match="shape mismatches.*LDM YAML") as failure:
        load_model(path)
    assert "\n" not in str(failure.value)
    with pytest.raises(BdmError, match="no LDM UNet section"):
        load_model(path, config={"network_g": {"type": "BIDiffSRUNet"}}, family="binarydm")
    with pytest.raises(BdmError, match="unknown model family"):
        load_model(path, family="binary_dm")
    lightning = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(state), lightning)
    with pytest.raises(BdmError, match="not a bare state_dict"):
        load_model(lightning, family="bi_diffsr")
