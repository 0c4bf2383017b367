"""Optimisation-profile shapes of a bdm engine: NxHxW texts, the defaults of a conditional (BI-DiffSR: any image
size, tiled) and an unconditional (BinaryDM: the image size its export records) model, and each input's
min/opt/max shape. Plain Python: no TensorRT needed."""

from __future__ import annotations

import json
import re
from typing import Dict, Optional, Sequence, Tuple

from bdm.contract import SAMPLING_KEY
from bdm.errors import BdmError
from bdm.runtime.generate import GenerateSettings

Shape = Tuple[int, ...]
NHW = Tuple[int, int, int]
PROFILE_OPTIONS = ("--min-shape", "--opt-shape", "--max-shape")
# A conditional (BI-DiffSR) model upscales images of any size, in tiles that fit this range.
CONDITIONAL_PROFILE = ("1x64x64", "1x256x256", "1x512x512")


def parse_nhw(text: str, option: str = "--shape") -> Tuple[int, int, int]:
    """'1x64x64' -> (1, 64, 64): batch, height, width of the image inputs."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m:
        raise BdmError(f"{option} {text!r} is not NxHxW (e.g. 1x256x256)")
    n, h, w = (int(v) for v in m.groups())
    if n < 1 or h < 8 or w < 8 or h % 8 or w % 8:
        raise BdmError(f"{option} {text}: batch must be >= 1 and H, W multiples of 8 (the UNet downsamples 3 times)")
    return n, h, w


def check_profile(min_nhw, opt_nhw, max_nhw):
    """min <= opt <= max in every dimension."""
    for i, name in enumerate(("batch", "height", "width")):
        if not min_nhw[i] <= opt_nhw[i] <= max_nhw[i]:
            raise BdmError(f"profile {name}: need min <= opt <= max, got {min_nhw[i]}, {opt_nhw[i]}, {max_nhw[i]}; "
                           f"fix --min-shape / --opt-shape / --max-shape")


def unconditional_profile(image_size: int) -> Tuple[str, str, str]:
    """An unconditional model (BinaryDM) samples at its image size S: 1xSxS up to bdm generate's default call
    (all of its default --num samples at once), which TensorRT optimises for."""
    batch, side = GenerateSettings.num, image_size
    return f"1x{side}x{side}", f"{batch}x{side}x{side}", f"{batch}x{side}x{side}"


def resolve_profile(shapes: Sequence[Optional[str]], image_size: Optional[int] = None) -> Tuple[NHW, NHW, NHW]:
    """min / opt / max (batch, H, W) from the --min/--opt/--max-shape texts (None: not given). The defaults are
    CONDITIONAL_PROFILE, or unconditional_profile for a model that records the image size it samples at; that
    size must lie inside the profile, or the engine could not run the model's own images."""
    defaults = CONDITIONAL_PROFILE if image_size is None else unconditional_profile(image_size)
    nhw = tuple(parse_nhw(text or default, option) for text, default, option in zip(shapes, defaults, PROFILE_OPTIONS))
    check_profile(*nhw)
    (_, min_h, min_w), _, (_, max_h, max_w) = nhw
    if image_size is not None and not max(min_h, min_w) <= image_size <= min(max_h, max_w):
        raise BdmError(f"the model samples {image_size}x{image_size} images (`bdm generate`), outside the profile "
                       f"(H {min_h} to {max_h}, W {min_w} to {max_w}); give shapes that contain it, e.g. "
                       f"{' '.join(f'{o} {d}' for o, d in zip(PROFILE_OPTIONS, defaults))} (the defaults for this "
                       f"model)")
    return nhw


def recorded_image_size(metadata: Dict[str, str]) -> Optional[int]:
    """The image size `bdm export` recorded for an unconditional model (what bdm generate samples), or None."""
    sampling = metadata.get(SAMPLING_KEY)
    return int(json.loads(sampling)["image_size"]) if sampling else None




def input_shape_for(name: str, dims: Sequence[int], nhw: Tuple[int, int, int]) -> Shape:
    """The concrete shape of network input `name` (ONNX dims, -1 = dynamic) at batch/height/width `nhw`:
    dynamic dim 0 is the batch, dynamic dims 2 and 3 of a 4-D input are H and W; fixed dims stay."""
    shape = []
    for axis, dim in enumerate(dims):
        if dim >= 0:
            shape.append(int(dim))
        elif axis == 0:
            shape.append(nhw[0])
        elif len(dims) == 4 and axis in (2, 3):
            shape.append(nhw[axis - 1])
        else:
            raise BdmError(f"input {name} has dims {list(dims)}: axis {axis} is dynamic, but only batch, H and W "
                           f"may be; export the model with `bdm export`")
    return tuple(shape)


def profile_shapes(input_dims: Dict[str, Sequence[int]], min_nhw, opt_nhw, max_nhw) -> Dict[str, Dict[str, Shape]]:
    """{input: {"min": shape, "opt": shape, "max": shape}} for every network input."""
    check_profile(min_nhw, opt_nhw, max_nhw)
    return {name: {key: input_shape_for(name, dims, nhw)
                   for key, nhw in (("min", min_nhw), ("opt", opt_nhw), ("max", max_nhw))}
            for name, dims in input_dims.items()}
