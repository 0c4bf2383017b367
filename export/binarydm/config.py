"""BinaryDM configs and checkpoints: the UNet's constructor arguments from an LDM YAML (or a dict of it, or a golden
UNet JSON), what sampling needs beyond the UNet (schedule, image size, pixel or latent space), and how a BinaryDM
state_dict (plain, or inside a Lightning checkpoint, EMA preferred) is recognised and extracted."""

import copy
from typing import Dict, Mapping, Optional

from bdm.errors import BdmError
from bdm.export.base.config import load_config

# How the PyTorch network computes (bdm.export.binarydm.layers.set_mode); the first is the default:
#   static   stored activation steps (the official inference recipe; the deployment default)
#   dynamic  steps recomputed on every call from the whole tensor (what the official training code runs)
#   w1a32    binarized weights, no activation quantization
#   fp       latent fp32 weights, no quantization at all
MODES = ("static", "dynamic", "w1a32", "fp")
ACT_BITS = (4, 8, None)  # None: the layer never quantizes its input

UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel_ours.UNetModel"

# model.params.unet_config.params of the official bedrooms.yaml (LDM-4 LSUN-Bedrooms, latent 3x64x64), plus
# act_bits: the official layers build _ActQ() with its default of 8 bits (W1.1A8); a W1.1A4 checkpoint needs
# act_bits: 4 in its config (the checkpoint does not record it).
BINARYDM_RELEASED = {
    "image_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 224,
    "attention_resolutions": [8, 4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 3, 4],
    "num_head_channels": 32,
    "act_bits": 8,
}

# Constructor arguments of the official UNetModel that this rewrite supports, with the official defaults.
_DEFAULTS = {"dropout": 0.0, "conv_resample": True, "num_heads": -1, "num_head_channels": -1,
             "num_heads_upsample": -1, "use_scale_shift_norm": False, "resblock_updown": False, "act_bits": 8}
_REQUIRED = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
             "attention_resolutions", "channel_mult")
# Official arguments without effect at fp32 inference (gradient checkpointing; the head split of the spatial
# transformer, which is refused below).
_IGNORED = ("use_checkpoint", "legacy", "transformer_depth")
# Official arguments whose non-default values select layers this rewrite does not have.
_UNSUPPORTED = {"dims": 2, "num_classes": None, "use_fp16": False, "use_spatial_transformer": False,
                "context_dim": None, "n_embed": None, "use_new_attention_order": False}
GROUP_NORM_GROUPS = 32


def _load_mapping(config) -> "tuple[dict, str]":
    config, source = load_config(config, "the LDM YAML of the model (model.params.unet_config)")
    if not isinstance(config, dict):
        raise BdmError(f"{source} is not a mapping; expected an LDM YAML with model.params.unet_config.params")
    return config, source


def _unet_section(config: dict) -> Optional[dict]:
    """The UNet's constructor arguments inside an LDM YAML / its unet_config / a golden unet_*.json / a flat
    params dict; None when `config` is none of these. act_bits of a golden JSON come from its act_quantizer."""
    if isinstance(config.get("model"), dict):
        config = config["model"].get("params") or {}
    if isinstance(config.get("unet_config"), dict):
        config = config["unet_config"]
    if isinstance(config.get("constructor"), dict) and "UNetModel" in str(config.get("official_class", "")):
        params = dict(config["constructor"])
        params.setdefault("act_bits", (config.get("act_quantizer") or {}).get("nbits", _DEFAULTS["act_bits"]))
        return params
    if "target" in config or isinstance(config.get("params"), dict):
        target = str(config.get("target", ""))
        if target and not target.endswith("UNetModel"):
            return None
        config = config.get("params") or {}
    return dict(config) if "model_channels" in config and "attention_resolutions" in config else None


def claims_config(config) -> bool:
    """Whether `config` (path or dict) describes an LDM-style UNet (the BinaryDM family)."""
    try:
        mapping, _ = _load_mapping(config)
    except BdmError:
        return False
    return _unet_section(mapping) is not None


def unet_params(config=None) -> dict:
    """Validated constructor arguments of BinaryDMUNet from an LDM YAML path / dict (model.params.unet_config.params,
    or that section itself, or a golden unet_*.json); None gives the released bedrooms network."""
    if config is None:
        params = copy.deepcopy(BINARYDM_RELEASED)
    else:
        mapping, source = _load_mapping(config)
        params = _unet_section(mapping)
        if params is None:
            raise BdmError(f"{source} has no LDM UNet section; expected model.params.unet_config.params with "
                           f"model_channels, attention_resolutions, ... (target {UNET_TARGET})")
        params = copy.deepcopy(params)

    def fail(what):
        raise BdmError(f"BinaryDM unet_config: {what}")

    missing = [k for k in _REQUIRED if k not in params]
    known = set(_REQUIRED) | set(_DEFAULTS) | set(_IGNORED) | set(_UNSUPPORTED)
    unknown = sorted(k for k in params if k not in known)
    if missing or unknown:
        fail(f"missing keys {missing}, unknown keys {unknown}; the official UNetModel takes {sorted(known)}")
    for key, supported in _UNSUPPORTED.items():
        if key in params and params.pop(key) != supported:
            fail(f"{key} other than {supported!r} is not supported (binarized unconditional 2-D UNets only)")
    for key in _IGNORED:
        params.pop(key, None)
    params = {**_DEFAULTS, **params}
    for key in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks"):
        if not isinstance(params[key], int) or isinstance(params[key], bool) or params[key] < 1:
            fail(f"{key} must be a positive integer, got {params[key]!r}")
    for key in ("attention_resolutions", "channel_mult"):
        if not isinstance(params[key], (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in params[key]):
            fail(f"{key} must be a list of positive integers, got {params[key]!r}")
        params[key] = list(params[key])
    if not params["channel_mult"]:
        fail("channel_mult is empty")
    if params["act_bits"] not in ACT_BITS:
        fail(f"act_bits must be one of {list(ACT_BITS)}, got {params['act_bits']!r}")
    widths = [params["model_channels"] * m for m in params["channel_mult"]]
    if any(w % GROUP_NORM_GROUPS for w in widths):
        fail(f"model_channels * channel_mult = {widths} must be multiples of {GROUP_NORM_GROUPS} (GroupNorm32)")
    if params["num_head_channels"] == -1 and params["num_heads"] == -1:
        fail("either num_heads or num_head_channels has to be set")
    if params["num_head_channels"] != -1 and any(w % params["num_head_channels"] for w in widths):
        fail(f"widths {widths} are not divisible by num_head_channels {params['num_head_channels']}")
    return params


# LDM's DDPM defaults (ldm/models/diffusion/ddpm.py) for the keys of model.params a YAML leaves out.
_LDM_SCHEDULE_DEFAULTS = {"timesteps": 1000, "linear_start": 1e-4, "linear_end": 2e-2}
_PIXEL_FIRST_STAGE = "IdentityFirstStage"
# model.params of the official bedrooms.yaml (the released config's schedule; ARCHITECTURE.md section 3).
_BEDROOMS_SCHEDULE = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195}


def sampling_options(config=None) -> dict:
    """What sampling needs beyond the UNet, from an LDM YAML path / dict (None: the released bedrooms model):
    {"timesteps", "linear_start", "linear_end"} (model.params, LDM's defaults where absent), "image_size" and
    "channels" of x_t (the UNet's), and "space": "pixel", or "latent" when model.params.first_stage_config is a
    real autoencoder (its decoder is not part of the exported UNet). A bare UNet params dict or golden JSON names no
    first stage and counts as pixel space. beta_schedule other than linear and parameterization other than eps
    are refused."""
    unet = unet_params(config)
    model_params = dict(_BEDROOMS_SCHEDULE) if config is None else {}
    space = "latent" if config is None else "pixel"
    if config is not None:
        mapping, source = _load_mapping(config)
        if isinstance(mapping.get("model"), dict):
            model_params = mapping["model"].get("params") or {}
            first_stage = model_params.get("first_stage_config")
            target = first_stage.get("target", "") if isinstance(first_stage, dict) else str(first_stage or "")
            if target and not target.endswith(_PIXEL_FIRST_STAGE):
                space = "latent"
        for key, supported in (("beta_schedule", "linear"), ("parameterization", "eps")):
            if model_params.get(key, supported) != supported:
                raise BdmError(f"{source}: model.params.{key} {model_params[key]!r} is not supported; bdm samples "
                               f"{supported!r} models (LDM's DDIMSampler, linear betas, eps prediction)")
    options = {key: model_params.get(key, default) for key, default in _LDM_SCHEDULE_DEFAULTS.items()}
    return {**options, "image_size": unet["image_size"], "channels": unet["in_channels"], "space": space}


EMA_PREFIX = "model_ema.diffusion_model"
STUDENT_PREFIX = "model.diffusion_model."


def unet_state_dict(state: Mapping[str, object], model_keys) -> Dict[str, object]:
    """The UNet state_dict inside a Lightning `state_dict` (or a plain UNet state_dict, returned as is).

    Student keys are `model.diffusion_model.<key>`; the EMA copy (LitEma) stores `model_ema.diffusion_model<key
    without dots>` and wins where present, as the official sampling runs inside `ema_scope()`. The FP teacher
    `model2.*`, `first_stage_model.*`, schedule buffers and LitEma's decay/num_updates are ignored."""
    if not any(k.startswith((STUDENT_PREFIX, EMA_PREFIX)) for k in state):
        return dict(state)
    unet = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    undotted = {}
    for key in model_keys:
        flat = key.replace(".", "")
        if flat in undotted:
            raise BdmError(f"EMA names are ambiguous for this UNet ({undotted[flat]!r} and {key!r} both flatten "
                           f"to {flat!r}); load the student weights (drop the model_ema.* keys)")
        undotted[flat] = key
    for k, v in state.items():
        if k.startswith(EMA_PREFIX) and k[len(EMA_PREFIX):] in undotted:
            unet[undotted[k[len(EMA_PREFIX):]]] = v
    return unet


def claims_keys(keys) -> bool:
    """A BinaryDM UNet state_dict (plain or Lightning): binarized layers' scaling_first_order and the UNet's
    time_embed / input_blocks / middle_block names."""
    keys = set(keys)
    plain = any(k.endswith("scaling_first_order") for k in keys) and "time_embed.0.weight" in keys \
        and any(k.startswith("middle_block.") for k in keys)
    lightning = any(k.startswith(STUDENT_PREFIX + "time_embed.0.") or k.startswith(EMA_PREFIX + "time_embed0")
                    for k in keys)
    return plain or lightning
