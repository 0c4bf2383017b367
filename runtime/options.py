"""The options of the sampling jobs, resolved from what the caller asked, the config and what the model records.
`bdm upscale`: what the official options YAML says (scale, DDIM steps, beta schedule), read once
(export.base.config.read_yaml). `bdm generate`: image size, channels and schedule (LDM YAML or the export's record),
and the activation mode of a BinaryDM checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

from bdm.contract import ACT_MODE_KEY, BINARYDM, SAMPLING_KEY
from bdm.errors import BdmError
from bdm.export.base.config import YAML_ERRORS, read_yaml
from bdm.runtime.sampler import DEFAULT_STEPS

RELEASED_SCALE = 4  # the released BI-DiffSR checkpoint most users deploy is x4


class OptionError(BdmError):
    """What a job's options cannot do, said without naming how they were given (`option`: the setting at fault);
    the caller adds its own hint (the CLI: the flag to use)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


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
    Its OptionError("config") names the file, not how it was given."""
    if config is None:
        return {}
    try:
        options = read_yaml(config)
    except FileNotFoundError:
        raise OptionError("config", f"{config}: no such file; pass the official options YAML") from None
    except (OSError, *YAML_ERRORS) as e:
        raise OptionError("config", f"{config} is not a readable YAML file ({type(e).__name__}); "
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


@dataclass(frozen=True)
class GenerateOptions:
    """What `bdm generate` samples: x_t's side and channels, and the LDM schedule (ldm_ddim_schedule keywords)."""

    image_size: int
    channels: int
    schedule: dict


def generate_options(config, runner) -> GenerateOptions:
    """The LDM YAML `config` first, then what `bdm export` recorded in the runner's model, then the released
    (bedrooms) config. OptionError("config") for an exported model that records none; BdmError for a latent model."""
    from bdm.export.binarydm.config import sampling_options

    if config is not None:
        options = sampling_options(config)
    elif getattr(runner, "metadata", {}).get(SAMPLING_KEY) is not None:
        options = json.loads(runner.metadata[SAMPLING_KEY])
    elif getattr(runner, "metadata", None) is not None:
        raise OptionError("config", f"{runner.describe()} records no sampling settings (not exported by this bdm for "
                                    f"an unconditional model)")
    else:
        options = sampling_options(None)
    if options["space"] != "pixel":
        raise BdmError("this is a latent diffusion model (its first stage is an autoencoder whose decoder is not "
                       "part of the UNet): bdm generate samples pixel-space models only")
    return GenerateOptions(image_size=options["image_size"], channels=options["channels"],
                           schedule={"num_train_timesteps": options["timesteps"],
                                     "linear_start": options["linear_start"], "linear_end": options["linear_end"]})


def set_mode(runner, mode: Optional[str]):
    """Put a checkpoint's BinaryDM network in `mode` (None: the family's default). An exported model carries the mode
    it was exported in: another `mode` is OptionError("mode")."""
    from bdm.export.registry import FAMILIES

    model = getattr(runner, "model", None)
    if model is not None:
        family = FAMILIES[BINARYDM]
        family.set_mode(model, mode or family.default_mode)
    elif mode is not None:
        recorded = getattr(runner, "metadata", {}).get(ACT_MODE_KEY)
        if recorded != mode:
            raise OptionError("mode", f"{runner.describe()} was exported in mode {recorded}")
