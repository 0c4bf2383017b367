"""The sampling options of `bdm upscale` (runtime/options.py): read from the reference options YAML, resolved in the
order asked > YAML > model > released, and one-line errors that name the file."""

import pytest

from bdm.errors import BdmError
from bdm.runtime.options import RELEASED_SCALE, UpscaleOptions, read_options, upscale_options
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
    with pytest.raises(BdmError) as err:
        read_options(tmp_path / "none.yml")
    assert str(err.value) == f"{tmp_path / 'none.yml'}: no such file; pass the official options YAML"
    with pytest.raises(BdmError) as err:
        read_options(bi_ref / "ckpt_small_x4.pth")
    assert str(err.value).startswith(f"{bi_ref / 'ckpt_small_x4.pth'} is not a readable YAML file (")
    with pytest.raises(BdmError, match="beta_schedule DDPM/linear is not supported"):
        upscale_options({"beta_schedule": {"scheduler_type": "DDPM", "schedule": "linear"}})
