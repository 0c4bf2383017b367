"""The LDM-style DDIM schedule (ldm_ddim_schedule, used by `bdm generate`) against LDM's own DDIMSampler
arithmetic, transcribed below from ldm/modules/diffusionmodules/util.py and ldm/models/diffusion/ddim.py
(CompVis/latent-diffusion): make_beta_schedule('linear'), register_schedule, make_ddim_timesteps('uniform'),
make_ddim_sampling_parameters and p_sample_ddim with eta = 0, in torch as LDM runs them."""

import numpy as np
import pytest
import torch

from bdm.errors import BdmError
from bdm.runtime.sampler import ddim_schedule, ldm_alphas_cumprod, ldm_ddim_schedule, sample

# np.sqrt on a torch tensor, as LDM writes it, warns under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


def ldm_tables(steps, timesteps=1000, linear_start=1e-4, linear_end=2e-2):
    betas = (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2).numpy()
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)  # model.alphas_cumprod
    ddim_timesteps = np.asarray(list(range(0, timesteps, timesteps // steps))) + 1
    alphas = alphas_cumprod[ddim_timesteps]
    alphas_prev = np.asarray([alphas_cumprod[0]] + alphas_cumprod[ddim_timesteps[:-1]].tolist())
    sqrt_one_minus_alphas = np.sqrt(1. - alphas)
    return alphas_cumprod, ddim_timesteps, alphas, alphas_prev, sqrt_one_minus_alphas


def ldm_sample(eps_fn, x_T, steps, **schedule):
    """LDM's ddim_sampling loop (eta = 0, no conditioning), returning every x_prev."""
    _, ddim_timesteps, alphas, alphas_prev, sqrt_one_minus_alphas = ldm_tables(steps, **schedule)
    img, b, trajectory = x_T, x_T.shape[0], []
    total_steps = ddim_timesteps.shape[0]
    for i, step in enumerate(np.flip(ddim_timesteps)):
        index = total_steps - i - 1
        e_t = eps_fn(img, int(step))
        a_t = torch.full((b, 1, 1, 1), alphas[index])
        a_prev = torch.full((b, 1, 1, 1), alphas_prev[index])
        sigma_t = torch.full((b, 1, 1, 1), 0.0)
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), sqrt_one_minus_alphas[index])
        pred_x0 = (img - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * torch.randn(img.shape)
        img = a_prev.sqrt() * pred_x0 + dir_xt + noise
        trajectory.append(img)
    return trajectory


def toy_eps(x: np.ndarray, t: int) -> np.ndarray:
    """A deterministic float32 'network' whose output depends on x and t (same values for numpy and torch)."""
    return np.tanh(np.float32(0.9) * x + np.float32(t / 1000.0)).astype(np.float32)


@pytest.mark.parametrize("steps,schedule", [(100, {}), (50, {}), (7, {}), (20, dict(linear_start=0.0015,
                                                                                       linear_end=0.0195))])
def test_tables_are_ldm_s(steps, schedule):
    alphas_cumprod, ddim_timesteps, alphas, alphas_prev, sqrt_one_minus_alphas = ldm_tables(steps, **schedule)
    ours = ldm_ddim_schedule(steps, **schedule)
    assert np.array_equal(ldm_alphas_cumprod(**schedule), alphas_cumprod.numpy())
    assert np.array_equal(ours.timesteps, ddim_timesteps[::-1])
    assert np.array_equal(ours.alpha_bar, alphas.numpy()[::-1])
    assert np.array_equal(ours.alpha_bar_prev, alphas_prev.astype(np.float32)[::-1])
    assert np.array_equal(ours.sqrt_one_minus_alpha_bar, np.asarray(sqrt_one_minus_alphas)[::-1])
    assert not ours.clip_x0
    if steps == 100:
        assert list(ours.timesteps[:2]) == [991, 981] and ours.timesteps[-1] == 1
        assert ours.alpha_bar_prev[-1] == alphas_cumprod[0]  # abar[0], not 1
    if steps == 7:  # 1000 // 7 = 142: range(0, 1000, 142) has 8 entries, and LDM runs all 8
        assert len(ours) == 8


def test_sampling_replays_ldm_bit_for_bit():
    x_T = np.random.default_rng(3).standard_normal((2, 3, 8, 8), dtype=np.float32)
    expected = ldm_sample(lambda x, t: torch.from_numpy(toy_eps(x.numpy(), t)), torch.from_numpy(x_T), 25)
    ours = []
    final = sample(lambda x, cond, t: toy_eps(x, t), None, x_T, ldm_ddim_schedule(25),
                   callback=lambda info: ours.append(info.x))
    assert len(ours) == len(expected) == 25
    for i, (mine, theirs) in enumerate(zip(ours, expected)):
        assert np.array_equal(mine, theirs.numpy()), f"step {i}: max diff {np.abs(mine - theirs.numpy()).max()}"
    assert np.array_equal(final, expected[-1].numpy())
    assert np.abs(final).max() > 1.0  # x0 is not clipped (the toy eps drives it past 1)


def test_clipping_still_applies_to_the_bi_diffsr_schedule():
    x_T = np.random.default_rng(3).standard_normal((1, 3, 8, 8), dtype=np.float32) * 4
    final = sample(lambda x, cond, t: toy_eps(x, t), x_T, x_T, ddim_schedule(10))
    assert ddim_schedule(10).clip_x0 and np.abs(final).max() <= 1.0


@pytest.mark.parametrize("steps, text", [(0, "outside 1..500"), (501, "outside 1..500"), (1000, "outside 1..500"),
                                         (3, "reach t = 1000")])
def test_step_counts_ldm_cannot_run_are_refused(steps, text):
    """3 steps: range(0, 1000, 333) + 1 ends at 1000, where LDM's alphacums[1000] raises IndexError."""
    with pytest.raises(BdmError, match=text):
        ldm_ddim_schedule(steps)
