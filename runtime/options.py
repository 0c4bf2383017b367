"""The sampling options of `bdm upscale`: what the official options YAML says (scale, DDIM steps, beta schedule),
read once (export.base.config.read_yaml), and the scale and steps a job uses from what the caller asked, that YAML
and what the model records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from bdm.errors import BdmError
from bdm.export.base.config import YAML_ERRORS, read_yaml
from bdm.runtime.sampler import DEFAULT_STEPS

RELEASED_SCALE = 4  # the released BI-DiffSR checkpoint most users deploy is x4


@dataclass(frozen=True)
class UpscaleOptions:
    """What an official options YAML says about sampling (nothing: no YAML, or keys it lacks)."""

    scale: Optional[int] = None      # the top-level `scale`
    steps: Optional[int] = None      # beta_schedule.num_inference_steps
    schedule: dict = field(default_factory=dict)  # ddim_schedule keyword arguments from beta_schedule

    def resolve_scale(self, asked: Optional[int], recorded, on_released: Callable[[int], None]) -> int:
        """The upscaling factor: `asked`, else the YAML's, else the one the model records, else RELEASED_SCALE
        (told to `on_released` first, which says so in the caller's terms)."""
        scale = asked if asked is not None else self.scale or recorded
        if scale is None:
            on_released(RELEASED_SCALE)
            scale = RELEASED_SCALE
        return int(scale)

    def resolve_steps(self, asked: Optional[int]) -> int:
        """DDIM steps: `asked`, else the YAML's num_inference_steps, else the original DEFAULT_STEPS."""
        return int(asked if asked is not None else self.steps if self.steps is not None else DEFAULT_STEPS)


def read_options(config) -> dict:
    """The whole official options YAML at `config` (scale and beta_schedule live beside network_g), or {} for None.
    The errors name the file (the caller adds how it was given)."""
    if config is None:
        return {}
    try:
        options = read_yaml(config)
    except FileNotFoundError:
        raise BdmError(f"{config}: no such file; pass the official options YAML") from None
    except (OSError, *YAML_ERRORS) as e:
        raise BdmError(f"{config} is not a readable YAML file ({type(e).__name__}); "
                       "pass the official options YAML") from None
    return options if isinstance(options, dict) else {}


def upscale_options(options: dict) -> UpscaleOptions:
    """The sampling part of an options YAML (official key names); BdmError for a schedule bdm does not run."""
    beta = options.get("beta_schedule") or {}
    if beta.get("scheduler_type", "DDIM") != "DDIM" or beta.get("schedule", "linear") != "linear":
        raise BdmError(f"beta_schedule {beta.get('scheduler_type')}/{beta.get('schedule')} is not supported; "
                       "bdm runs the official DDIM sampler with a linear schedule")
    names = {"n_timestep": "num_train_timesteps", "linear_start": "beta_start", "linear_end": "beta_end"}
    return UpscaleOptions(scale=options.get("scale"), steps=beta.get("num_inference_steps"),
                          schedule={ours: beta[theirs] for theirs, ours in names.items() if theirs in beta})
