"""The sampler, pre- and post-processing against the official BI-DiffSR runs (sampler_x4, sampler_x2_pad)."""

import numpy as np
import pytest

from bdm.errors import BdmError
from bdm.runtime import noise as noise_mod
from bdm.runtime.preprocess import bicubic_resize, condition, crop, pad_to_multiple, quantize
from bdm.runtime.sampler import alphas_cumprod, ddim_schedule, ddim_step, is_finite, sample

GOLDENS = {"sampler_x4": 4, "sampler_x2_pad": 2}


@pytest.fixture(scope="module", params=sorted(GOLDENS))
def golden(request, bi_ref):
    data = np.load(bi_ref / f"{request.param}.npz")
    return request.param, GOLDENS[request.param], {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def schedule():
    return ddim_schedule(50)


def test_schedule_tables_equal_the_official(golden, schedule):
    _, _, g = golden
    assert np.array_equal(alphas_cumprod(), g["alphas_cumprod"])
    assert np.array_equal(schedule.timesteps, g["timesteps"])
    assert schedule.timesteps[0] == 1960 and schedule.timesteps[-1] == 0
    assert np.array_equal(schedule.alpha_bar, g["alpha_bar_t"])
    assert np.array_equal(schedule.alpha_bar_prev, g["alpha_bar_prev"])
    assert schedule.alpha_bar_prev[-1] == 1.0


def test_single_steps_replay_the_stored_trajectory(golden, schedule):
    """x_in[i+1] (or x_final_padded after the last step) from x_in[i] and the stored eps[i], bit for bit."""
    _, _, g = golden
    saved = list(g["saved_step_indices"])
    checked = 0
    for k, i in enumerate(saved):
        x_next, _ = ddim_step(g["x_in"][k], g["eps"][k], schedule, i)
        if i + 1 in saved:
            target = g["x_in"][saved.index(i + 1)]
        elif i == len(schedule) - 1:
            target = g["x_final_padded"]
        else:
            continue
        assert x_next.dtype == np.float32
        assert np.array_equal(x_next, target), f"step {i}: max err {np.abs(x_next - target).max()}"
        checked += 1
    assert checked >= 5


def test_full_loop_replays_the_official_run_from_noise_init(bi_ref, schedule, tmp_path):
    """All 50 eps of sampler_x2_pad, fed back in order from the replayed noise file: exact x and output."""
    g = np.load(bi_ref / "sampler_x2_pad.npz")
    noise_path = tmp_path / "noise.npy"
    noise_mod.save_noise(noise_path, g["noise_init"])
    noise = noise_mod.load_noise(noise_path, g["cond_padded"].shape)
    g_cond = g["cond_padded"]
    stored_eps = iter(g["eps"])
    seen = []

    def eps_fn(x, cond, t):
        k = len(seen)
        assert np.array_equal(x, g["x_in"][k]) and t == g["timesteps"][k] and cond is g_cond
        seen.append(t)
        return next(stored_eps)

    steps_seen = []
    x = sample(eps_fn, g_cond, noise, schedule, callback=lambda info: steps_seen.append(info.index))
    assert steps_seen == list(range(50))
    assert np.array_equal(x, g["x_final_padded"])
    out = crop(x, *g["output"].shape[-2:])
    assert np.array_equal(out, g["output"])
    assert np.array_equal(quantize(out[0].transpose(1, 2, 0)), g["output_uint8"])


def test_sampler_steps_torch_tensors_identically(bi_ref, schedule):
    torch = pytest.importorskip("torch")
    g = np.load(bi_ref / "sampler_x2_pad.npz")
    stored_eps = iter(torch.from_numpy(g["eps"]))
    x = sample(lambda x, c, t: next(stored_eps), torch.from_numpy(g["cond_padded"]),
               torch.from_numpy(g["noise_init"]), schedule)
    assert isinstance(x, torch.Tensor) and np.array_equal(x.numpy(), g["x_final_padded"])


def test_condition_matches_cv2_bicubic_and_reflect_padding(golden):
    name, scale, g = golden
    lr = g["lr_uint8"].astype(np.float32) / np.float32(255.0)
    assert np.array_equal(lr.transpose(2, 0, 1)[None], g["lr"])
    cond, cond_padded = condition(lr, scale)
    assert cond.shape == g["cond"].shape and cond_padded.shape == g["cond_padded"].shape
    # cv2 (through Intel IPP) and this numpy port round differently in the last bits: <= 2 ulp below 1.0.
    assert np.abs(cond - g["cond"]).max() <= 2.0 ** -22
    assert np.array_equal(pad_to_multiple(g["cond"]), g["cond_padded"])   # the padding itself is exact
    assert np.abs(cond_padded - g["cond_padded"]).max() <= 2.0 ** -22


def test_bicubic_is_per_channel_and_interpolating():
    from skimage import data

    image = data.astronaut()[100:116, 200:220].astype(np.float32) / 255
    up = bicubic_resize(image, 48, 60)
    assert up.shape == (48, 60, 3) and up.dtype == np.float32
    assert np.array_equal(bicubic_resize(image[..., 1], 48, 60), up[..., 1])
    assert np.array_equal(bicubic_resize(image, 16, 20), image)         # scale 1 is the identity
    flat = np.full((5, 7), 0.3, np.float32)
    assert np.allclose(bicubic_resize(flat, 20, 28), 0.3, atol=1e-7)    # weights sum to one, border replicated


def test_noise_is_seeded_host_side_and_shape_checked(tmp_path):
    a = noise_mod.draw_noise(10, (1, 3, 8, 16))
    assert a.dtype == np.float32 and a.shape == (1, 3, 8, 16)
    assert np.array_equal(a, noise_mod.draw_noise(10, (1, 3, 8, 16)))
    assert not np.array_equal(a, noise_mod.draw_noise(11, (1, 3, 8, 16)))
    path = tmp_path / "n.npy"
    noise_mod.save_noise(path, a)
    assert np.array_equal(noise_mod.load_noise(path, a.shape), a)
    with pytest.raises(BdmError, match=r"shape \(1, 3, 8, 16\) but this image needs \(1, 3, 16, 16\)"):
        noise_mod.load_noise(path, (1, 3, 16, 16))
    with pytest.raises(BdmError, match="no such file"):
        noise_mod.load_noise(tmp_path / "missing.npy", a.shape)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(BdmError, match="not a readable .npy"):
        noise_mod.load_noise(tmp_path / "junk.npy", a.shape)


def test_steps_are_validated_and_finite_check_sees_nan_and_inf():
    assert list(ddim_schedule(4).timesteps) == [1500, 1000, 500, 0]
    with pytest.raises(BdmError, match="outside 1..2000"):
        ddim_schedule(0)
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert is_finite(x)
    x[0, 1, 2, 3] = np.nan
    assert not is_finite(x)
    x[0, 1, 2, 3] = -np.inf
    assert not is_finite(x)
