"""BI-DiffSR configs and checkpoints: an official options YAML (its `network_g` section), or a dict of it, turned into
validated constructor arguments; the upscaling factor an export records; how a BI-DiffSR state_dict is recognised."""

import copy
import re
from pathlib import Path
from typing import Optional

from bdm.errors import BdmError
from bdm.export.base.config import load_config, read_yaml

BIDIFFSR_TYPE = "BIDiffSRUNet"
# How the PyTorch network computes (bdm.export.bidiffsr.network.set_mode):
# "deploy" (default): binary convs compute alpha * conv(sign map, sign(W)), the exact integer dot product scaled
#     once: the op spec's arithmetic (plugins/binary_conv/spec.yaml), alpha*sign(W) with alpha = flat mean|W|.
# "official": the official fp32 order of operations, which reproduces the official outputs bit for bit (CPU,
#     1 thread): straight-through weights W_eff = fl(fl(alpha*sign(W) - clamp(W,-1,1)) + clamp(W,-1,1)) with alpha
#     as nested means, and the attention's value sum over keys in the order the official 6-D einsum uses. Its
#     gradients are the official straight-through estimators: d W_eff / d W = 1 where |W| <= 1 (alpha and sign
#     detached), and the activation sign's gradient is ApproxSign's, 2 - 2|x| for |x| < 1 and 0 elsewhere.
MODES = ("deploy", "official")

# network_g of the official options/{train,test}/*_BI_DiffSR_x{2,4}.yml: x2 and x4 build the same network.
BIDIFFSR_RELEASED = {
    "type": BIDIFFSR_TYPE,
    "in_channel": 6,
    "out_channel": 3,
    "inner_channel": 64,
    "norm_groups": 16,
    "channel_mults": [1, 2, 4, 8],
    "attn_res": [],
    "res_blocks": 2,
    "dropout": 0.2,
    "image_size": 256,
    "fp_res": [256, 128],
    "total_step": 2000,
    "dynamic_group": 5,
}

# Dropout is the identity at inference, so a config may leave it out.
_BIDIFFSR_OPTIONAL = {"dropout": 0.0}
_INT_KEYS = ("in_channel", "out_channel", "inner_channel", "norm_groups", "res_blocks", "image_size",
             "total_step", "dynamic_group")
_INT_LIST_KEYS = ("channel_mults", "attn_res", "fp_res")


def read_network_g(config) -> dict:
    """The `network_g` mapping of `config`: a path to an official options YAML, a dict of the whole options
    file, or a dict of its `network_g` section. Returns a deep copy."""
    config, source = load_config(config, "the official options YAML (e.g. options/test/test_BI_DiffSR_x4.yml)")
    if not isinstance(config, dict):
        raise BdmError(f"{source} is not a mapping; expected an options YAML with a network_g section")
    network_g = config.get("network_g", config)
    if not isinstance(network_g, dict) or "type" not in network_g:
        raise BdmError(f"{source} has no network_g section with a 'type'; expected an official options YAML "
                       f"(network_g: {{type: {BIDIFFSR_TYPE}, ...}})")
    return copy.deepcopy(network_g)


def bidiffsr_network_g(config=None) -> dict:
    """Validated BI-DiffSR network_g; `config=None` gives the released x2/x4 network."""
    network_g = copy.deepcopy(BIDIFFSR_RELEASED) if config is None else read_network_g(config)
    if network_g["type"] != BIDIFFSR_TYPE:
        raise BdmError(f"network_g type {network_g['type']!r} is not a BI-DiffSR network (expected {BIDIFFSR_TYPE!r})")
    network_g = {**_BIDIFFSR_OPTIONAL, **network_g}
    missing = [k for k in BIDIFFSR_RELEASED if k not in network_g]
    unknown = [k for k in network_g if k not in BIDIFFSR_RELEASED]
    if missing or unknown:
        raise BdmError(f"network_g of type {BIDIFFSR_TYPE}: missing keys {missing}, unknown keys {unknown}; "
                       f"the official options list exactly {list(BIDIFFSR_RELEASED)}")
    _check_bidiffsr_values(network_g)
    return network_g


def bidiffsr_kwargs(network_g: dict) -> dict:
    """Constructor arguments of `BIDiffSRUNet` (network_g without its `type`)."""
    return {k: v for k, v in network_g.items() if k != "type"}


def _check_bidiffsr_values(g: dict):
    def fail(what):
        raise BdmError(f"network_g of type {BIDIFFSR_TYPE}: {what}")

    for key in _INT_KEYS:
        if not isinstance(g[key], int) or isinstance(g[key], bool) or g[key] < 1:
            fail(f"{key} must be a positive integer, got {g[key]!r}")
    for key in _INT_LIST_KEYS:
        if not isinstance(g[key], (list, tuple)) or not all(isinstance(v, int) for v in g[key]):
            fail(f"{key} must be a list of integers, got {g[key]!r}")
    if not isinstance(g["dropout"], (int, float)) or not 0 <= g["dropout"] < 1:
        fail(f"dropout must be in [0, 1), got {g['dropout']!r}")
    mults = list(g["channel_mults"])
    # Every binary ResBlock is square (BIConv's identity shortcut) and CP-Down doubles the channels, so the
    # stages must go 1, 2, 4, ... times inner_channel.
    if mults != [2 ** i for i in range(len(mults))]:
        fail(f"channel_mults must be [1, 2, 4, ...] (CP-Down doubles the channels), got {mults}")
    if g["inner_channel"] % 2 or g["inner_channel"] % g["norm_groups"]:
        fail(f"inner_channel {g['inner_channel']} must be even and divisible by norm_groups {g['norm_groups']}")
    if g["out_channel"] >= g["in_channel"]:
        fail(f"in_channel {g['in_channel']} must exceed out_channel {g['out_channel']} "
             f"(the input is cat([cond, x_t]))")


def claims_config(config) -> bool:
    return read_network_g(config).get("type") == BIDIFFSR_TYPE


def claims_keys(keys) -> bool:
    return any(k.endswith("TaR.dynamic_move_0.bias") for k in keys) and "timestep_level_mlp.1.weight" in keys


def options_scale(config) -> Optional[int]:
    """The top-level `scale` of an options YAML (the network does not know its upscaling factor), or None."""
    if not isinstance(config, (str, Path)):
        return None
    options = read_yaml(config)  # the model was loaded from it already
    scale = options.get("scale") if isinstance(options, dict) else None
    return scale if isinstance(scale, int) and not isinstance(scale, bool) else None


def checkpoint_name_scale(ckpt) -> Optional[int]:
    """The upscaling factor a checkpoint's file name states as a word `x<N>` (BI_DiffSR_x4.pth, net_g_x2_500000.pth),
    or None when it states none or several different ones."""
    found = {int(n) for n in re.findall(r"(?:^|[^a-z0-9])x(\d+)(?![0-9])", Path(ckpt).stem.lower())}
    return found.pop() if len(found) == 1 else None


def recorded_scale(config, ckpt) -> Optional[int]:
    """The scale an export records: the options YAML's `scale`, else the one the checkpoint's name states."""
    scale = options_scale(config)
    return scale if scale is not None else checkpoint_name_scale(ckpt)
