"""The options of the sampling jobs (runtime/options.py). `bdm upscale`: read from the reference options YAML, resolved
in the order asked > YAML > model > released, one-line errors that name the file. `bdm generate`: from the LDM config,
else from what the export recorded; the mode of an exported model is the one it records."""

import pytest

from bdm.errors import BdmError
from bdm.runtime.backends import OrtRunner
from bdm.runtime.options import (RELEASED_SCALE, OptionError, UpscaleOptions, generate_options, read_options,
                                 set_mode, upscale_options)
from bdm.runtime.sampler import DEFAULT_STEPS


def test_the_reference_options_yaml_gives_its_schedule(bi_ref):
    options = upscale_options(read_options(bi_ref / "ckpt_small_x4.yml"))
    assert options.schedule == {"num_train_timesteps": 2000, "beta_start": 1e-06, "beta_end": 0.01}
    assert options.scale is None and options.steps == 50  # this YAML has no top-level scale
    assert upscale_options(read_options(None)) == UpscaleOptions()


def test_scale_and_steps_resolve_in_order():
    released = []
    nothing, yaml = UpscaleOptions(), UpscaleOptions(scale=2, steps=20)
    assert yaml.resolve_scale(3, 4, released.append) == 3 and yaml.resolve_scale(None, 4, released.append) == 2
    assert nothing.resolve_scale(None, "4", released.append) == 4 and released == []  # metadata values are text
    assert nothing.resolve_scale(None, None, released.append) == RELEASED_SCALE and released == [RELEASED_SCALE]
    assert yaml.resolve_steps(5) == 5 and yaml.resolve_steps(None) == 20 and nothing.resolve_steps(None) == DEFAULT_STEPS


def test_errors_name_the_file_not_the_option(bi_ref, tmp_path):
    with pytest.raises(OptionError) as err:
        read_options(tmp_path / "none.yml")
    assert str(err.value) == f"{tmp_path / 'none.yml'}: no such file; pass the official options YAML"
    with pytest.raises(BdmError) as err:
        read_options(bi_ref / "ckpt_small_x4.pth")
    assert str(err.value).startswith(f"{bi_ref / 'ckpt_small_x4.pth'} is not a readable YAML file (")
    with pytest.raises(BdmError, match="beta_schedule DDPM/linear is not supported"):
        upscale_options({"beta_schedule": {"scheduler_type": "DDPM", "schedule": "linear"}})


def test_generate_options_come_from_the_config_else_from_the_export(bdm_ref, binarydm_onnx):
    exported = OrtRunner(binarydm_onnx)
    from_config = generate_options(bdm_ref / "unet_cifar_like_w32.json", exported)
    assert generate_options(None, exported) == from_config
    assert (from_config.image_size, from_config.channels) == (32, 3)
    assert set(from_config.schedule) == {"num_train_timesteps", "linear_start", "linear_end"}


def test_an_exported_model_keeps_its_mode_and_one_without_a_record_needs_a_config(binarydm_onnx):
    exported = OrtRunner(binarydm_onnx)
    recorded = exported.metadata["bdm.act_mode"]
    set_mode(exported, None)
    set_mode(exported, recorded)
    with pytest.raises(OptionError) as err:
        set_mode(exported, "fp" if recorded != "fp" else "static")
    assert err.value.option == "mode" and str(err.value) == f"{exported.describe()} was exported in mode {recorded}"
    exported.metadata = {}
    with pytest.raises(OptionError) as err:
        generate_options(None, exported)
    assert err.value.option == "config" and "records no sampling settings" in str(err.value)
