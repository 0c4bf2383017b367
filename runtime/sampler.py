"""The official BI-DiffSR sampler: deterministic DDIM (eta = 0) around any noise predictor.

This is what the official `BIDiffSRModel.test()` runs through diffusers' `DDIMScheduler` (0.31.0 defaults:
`clip_sample=True`, `set_alpha_to_one=True`, `steps_offset=0`, `timestep_spacing='leading'`), written out
so that every backend (PyTorch, ONNX Runtime, TensorRT) runs the same arithmetic. It knows nothing about
the network: it calls `eps_fn(x, cond, t)` and steps the whole image.

Notation (shapes for one image; N images work the same):

    T            number of training timesteps (2000)
    beta_k       training noise variance at timestep k, linear from beta_start to beta_end (fp32)
    abar_k       prod_{j <= k} (1 - beta_j), fp32 cumulative product ("alphas_cumprod")
    S            number of sampling steps (`steps`, default 50)
    t_i          i-th sampling timestep, i = 0..S-1: t_i = (S-1-i) * (T // S)  ("leading": 1960, 1920, ..., 0)
    abar_t       abar_{t_i}
    abar_prev    abar_{t_i - T//S}, or 1.0 when t_i - T//S < 0 (the last step; `set_alpha_to_one`)
    x            current sample x_{t_i}, float32 [N, 3, H, W]; starts as the initial noise x_T ~ N(0, I)
    cond         condition: bicubic-upsampled low-resolution image in [0, 1], [N, 3, H, W]
    eps          predicted noise eps_theta(x, cond, t_i), [N, 3, H, W]
    x0           predicted clean image

One step (DDIM, Song et al. 2021, eq. 12 with sigma_t = 0; diffusers `DDIMScheduler.step`):

    (1) x0     = (x - sqrt(1 - abar_t) * eps) / sqrt(abar_t)            "predicted x_0"
    (2) x0     = clip(x0, -1, 1)                                         `clip_sample=True` (data is in [0, 1])
    (3) x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev) * eps       "direction pointing to x_t"
                                                                         (no noise term: eta = 0)
At the last step abar_prev = 1, so the result is the clipped x0; it is not clamped to [0, 1] (the caller
quantizes). The four square roots are taken by torch on 0-d fp32 tensors, as in the original, and the
array arithmetic is fp32 in the order above: replaying the stored noise predictions of the official run
reproduces its trajectory bit for bit.

The LDM variant (`ldm_ddim_schedule`, for unconditional LDM-style models such as BinaryDM) runs the same three
equations with the tables of LDM's `DDIMSampler` (ldm/models/diffusion/ddim.py, eta = 0):

    beta_k       (linspace(linear_start**0.5, linear_end**0.5, T, float64))**2   `make_beta_schedule('linear')`
    abar_k       cumprod(1 - beta) in float64, stored as float32 (`register_schedule`)
    t_i          range(0, T, T // S) + 1, descending (991, 981, ..., 1 for S=100, T=1000); when T % S != 0
                 this gives more than S steps, exactly as LDM does (`make_ddim_timesteps`, 'uniform')
    abar_prev    abar[t_{i+1}] and, at the last step, abar[0] (not 1: `make_ddim_sampling_parameters`)
    (2) skipped  LDM's DDIMSampler never clips x0 (it has no such option; the DDPM `clip_denoised` flag is
                 not used by DDIM), so `Schedule.clip_x0` is False
sqrt(1 - abar_t) is numpy's float32 sqrt (`np.sqrt(1. - ddim_alphas)`), the other three torch's; sigma_t = 0
makes LDM's noise term `0 * randn` and its `- sigma_t**2` exact no-ops.

Arrays: the step uses only `*`, `-`, `/`, `+` and `.clip()`, so numpy, torch and cupy arrays all work (the
TensorRT backend keeps x on the GPU); the coefficients are Python floats holding fp32 values exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from bdm.errors import BdmError

# The official test config (`beta_schedule` of options/test/test_BI_DiffSR_x4.yml).
NUM_TRAIN_TIMESTEPS = 2000
BETA_START = 1e-6
BETA_END = 1e-2
DEFAULT_STEPS = 50


def alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                   beta_end: float = BETA_END) -> np.ndarray:
    """abar_k for k = 0..T-1, fp32, computed with the very torch calls diffusers makes.

    torch is used on purpose: `torch.linspace` rounds its fp32 values with a vectorised arange whose
    rounding numpy's linspace does not reproduce (713 of the 2000 betas differ), and the products then
    differ in the last bits.
    """
    import torch

    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0).numpy()


@dataclass(frozen=True)
class Schedule:
    """The S sampling timesteps, their fp32 abar_t / abar_prev and the four square roots of each step."""

    timesteps: np.ndarray       # int64 [S], t_i, descending
    alpha_bar: np.ndarray       # float32 [S], abar_t
    alpha_bar_prev: np.ndarray  # float32 [S], abar_prev
    sqrt_alpha_bar: np.ndarray             # float32 [S], sqrt(abar_t)
    sqrt_one_minus_alpha_bar: np.ndarray   # float32 [S], sqrt(1 - abar_t)
    sqrt_alpha_bar_prev: np.ndarray        # float32 [S], sqrt(abar_prev)
    sqrt_one_minus_alpha_bar_prev: np.ndarray  # float32 [S], sqrt(1 - abar_prev)
    num_train_timesteps: int
    clip_x0: bool = True                   # step (2); False for LDM's DDIMSampler

    def __len__(self):
        return len(self.timesteps)


def _sqrt_like_torch(values: np.ndarray) -> np.ndarray:
    """`v ** 0.5` on each value as a 0-d fp32 torch tensor, exactly as diffusers' `step()` computes it.

    torch's fp32 sqrt is not always the correctly rounded one (on AVX-512 CPUs it is SLEEF's 0.5-ulp sqrt:
    sqrt(1 - abar_1960) comes out 1 ulp above numpy's), so numpy would drift 1 ulp from the original.
    """
    import torch

    return np.array([float(torch.tensor(v, dtype=torch.float32) ** 0.5) for v in values], dtype=np.float32)


def ddim_schedule(steps: int = DEFAULT_STEPS, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                  beta_start: float = BETA_START, beta_end: float = BETA_END) -> Schedule:
    """The DDIM schedule with "leading" spacing: t_i = (S-1-i) * (T // S), abar_prev = 1 past t = 0."""
    if not 1 <= steps <= num_train_timesteps:
        raise BdmError(f"--steps {steps} is outside 1..{num_train_timesteps} (the training timesteps); "
                       f"use {DEFAULT_STEPS}, the original setting")
    table = alphas_cumprod(num_train_timesteps, beta_start, beta_end)
    ratio = num_train_timesteps // steps
    timesteps = (np.arange(steps, dtype=np.int64) * ratio)[::-1].copy()
    prev = timesteps - ratio
    alpha_bar = table[timesteps]
    alpha_bar_prev = np.where(prev >= 0, table[np.maximum(prev, 0)], np.float32(1.0)).astype(np.float32)
    one = np.float32(1.0)
    return Schedule(timesteps, alpha_bar, alpha_bar_prev,
                    _sqrt_like_torch(alpha_bar), _sqrt_like_torch(one - alpha_bar),
                    _sqrt_like_torch(alpha_bar_prev), _sqrt_like_torch(one - alpha_bar_prev),
                    num_train_timesteps)


# LDM's DDPM defaults (ldm/models/diffusion/ddpm.py), used where the LDM YAML's model.params leaves them out.
LDM_NUM_TRAIN_TIMESTEPS = 1000
LDM_LINEAR_START = 1e-4
LDM_LINEAR_END = 2e-2
LDM_DEFAULT_STEPS = 100  # BinaryDM's sampling setting (DDIM, 100 steps)


def ldm_alphas_cumprod(num_train_timesteps: int = LDM_NUM_TRAIN_TIMESTEPS, linear_start: float = LDM_LINEAR_START,
                       linear_end: float = LDM_LINEAR_END) -> np.ndarray:
    """abar_k for k = 0..T-1 as LDM's `register_schedule` stores it: float64 betas and product, then float32."""
    import torch

    betas = (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_train_timesteps,
                            dtype=torch.float64) ** 2).numpy()
    return np.cumprod(1.0 - betas, axis=0).astype(np.float32)


def ldm_ddim_schedule(steps: int = LDM_DEFAULT_STEPS, num_train_timesteps: int = LDM_NUM_TRAIN_TIMESTEPS,
                      linear_start: float = LDM_LINEAR_START, linear_end: float = LDM_LINEAR_END) -> Schedule:
    """LDM's DDIMSampler schedule (eta = 0, 'uniform'): t = range(0, T, T // S) + 1, abar_prev of the last step
    abar[0], no x0 clipping (module docstring)."""
    if not 1 <= steps <= num_train_timesteps // 2:
        raise BdmError(f"--steps {steps} is outside 1..{num_train_timesteps // 2} (LDM's DDIM needs T // steps >= 2 "
                       f"for T = {num_train_timesteps} training timesteps); use {LDM_DEFAULT_STEPS}, BinaryDM's "
                       f"setting")
    ascending = np.arange(0, num_train_timesteps, num_train_timesteps // steps, dtype=np.int64) + 1
    if ascending[-1] >= num_train_timesteps:
        raise BdmError(f"--steps {steps}: LDM's DDIM timesteps range(0, {num_train_timesteps}, "
                       f"{num_train_timesteps // steps}) + 1 reach t = {ascending[-1]}, past the last training "
                       f"timestep (LDM itself fails there); choose another step count, e.g. {LDM_DEFAULT_STEPS}")
    table = ldm_alphas_cumprod(num_train_timesteps, linear_start, linear_end)
    alpha_bar = table[ascending]
    alpha_bar_prev = np.concatenate([table[:1], table[ascending[:-1]]])
    timesteps, alpha_bar, alpha_bar_prev = ascending[::-1].copy(), alpha_bar[::-1].copy(), alpha_bar_prev[::-1].copy()
    one = np.float32(1.0)
    return Schedule(timesteps, alpha_bar, alpha_bar_prev,
                    _sqrt_like_torch(alpha_bar), np.sqrt(one - alpha_bar),
                    _sqrt_like_torch(alpha_bar_prev), _sqrt_like_torch(one - alpha_bar_prev),
                    num_train_timesteps, clip_x0=False)


def ddim_step(x, eps, schedule: Schedule, i: int):
    """Step i of the schedule on the whole image, equations (1)-(3) of the module docstring.

    Returns (x_prev, x0). The coefficients enter as Python floats holding the fp32 values exactly, so the
    array arithmetic stays fp32 in numpy, torch and cupy alike.
    """
    x0 = (x - float(schedule.sqrt_one_minus_alpha_bar[i]) * eps) / float(schedule.sqrt_alpha_bar[i])  # (1)
    if schedule.clip_x0:
        x0 = x0.clip(-1.0, 1.0)                                                                         # (2)
    x_prev = (float(schedule.sqrt_alpha_bar_prev[i]) * x0
              + float(schedule.sqrt_one_minus_alpha_bar_prev[i]) * eps)                                 # (3)
    return x_prev, x0


@dataclass
class StepInfo:
    """What the per-step callback sees after step i (x is already x_prev)."""

    index: int
    timestep: int
    steps: int
    x: object
    x0: object
    eps: object


EpsFn = Callable[[object, object, int], object]


def sample(eps_fn: EpsFn, cond, noise, schedule: Schedule,
           callback: Optional[Callable[[StepInfo], None]] = None):
    """Run the whole DDIM loop from the initial noise x_T and return the final x (the BI-DiffSR schedule: the
    clipped x0 of the last step).

    `eps_fn(x, cond, t)` gets the full current sample, the condition (None for an unconditional model) and the
    integer timestep t_i, and returns eps of x's shape. `callback(StepInfo)` runs after every step; raising from
    it stops sampling (the NaN/Inf guard does this).
    """
    if cond is not None and tuple(noise.shape) != tuple(cond.shape):
        raise BdmError(f"initial noise has shape {tuple(noise.shape)} but the padded condition is "
                       f"{tuple(cond.shape)}; draw the noise for the padded condition")
    x = noise
    for i, t in enumerate(schedule.timesteps):
        eps = eps_fn(x, cond, int(t))
        x, x0 = ddim_step(x, eps, schedule, i)
        if callback is not None:
            callback(StepInfo(i, int(t), len(schedule), x, x0, eps))
    return x


def is_finite(x) -> bool:
    """True when every element is finite; max(|x|) propagates NaN in numpy, torch and cupy alike."""
    return math.isfinite(float(abs(x).max()))
