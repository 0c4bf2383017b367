"""Pre- and post-processing around the sampler, as the official BI-DiffSR test pipeline does it.

    lr (h, w, C) float32 in [0, 1]
      -> bicubic_resize to (h*s, w*s)        cv2.resize(..., INTER_CUBIC) semantics, float32
      -> NCHW, reflect-pad right/bottom      F.pad(cond, (0, pw, 0, ph), 'reflect') to multiples of 8
      -> sampler -> crop back to (h*s, w*s)  not clamped
      -> quantize                            round(clamp(x, 0, 1) * 255), basicsr `tensor2img`

cv2 is not a dependency: the resize is written here in numpy. It follows OpenCV's reference C++ path
(`resizeGeneric_` with `HResizeCubic`/`VResizeCubic`): per output coordinate d, f = (d + 0.5) / s - 0.5,
x0 = floor(f), taps x0-1..x0+2 clamped to the image (replicate border), weights from `interpolateCubic`
with A = -0.75 in float32, a horizontal pass over the source rows, then a vertical pass, both float32 and
summed left to right. The opencv-python wheels route float32 INTER_CUBIC through Intel IPP, whose
arithmetic is not public, so the official `cond` differs from this in the last bit or two (<= 2.4e-7 on
the goldens, where the fractional offsets are exact binary fractions and the weights therefore agree).
"""

from __future__ import annotations

import numpy as np

WINDOW = 8  # three 2x downsamplings in the UNet: H and W must be multiples of 8

_A = np.float32(-0.75)


def _cubic_weights(fraction: np.ndarray) -> np.ndarray:
    """OpenCV `interpolateCubic(x, coeffs)` in float32: the 4 tap weights for offsets x+1, x, 1-x, 2-x."""
    x = fraction.astype(np.float32)
    one = np.float32(1.0)
    x1 = x + one
    w0 = ((_A * x1 - np.float32(5.0) * _A) * x1 + np.float32(8.0) * _A) * x1 - np.float32(4.0) * _A
    w1 = ((_A + np.float32(2.0)) * x - (_A + np.float32(3.0))) * x * x + one
    y = one - x
    w2 = ((_A + np.float32(2.0)) * y - (_A + np.float32(3.0))) * y * y + one
    w3 = one - w0 - w1 - w2
    return np.stack([w0, w1, w2, w3], axis=1)


def _taps(in_size: int, out_size: int):
    """Source indices [out, 4] (replicate border) and float32 weights [out, 4] along one axis."""
    scale = in_size / out_size  # OpenCV: 1 / inv_scale, inv_scale = out / in, both double
    position = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(position)
    weights = _cubic_weights(position - start)
    index = start.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(index, 0, in_size - 1), weights


def bicubic_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize an (h, w) or (h, w, C) float32 image with cv2 INTER_CUBIC semantics (see module docstring)."""
    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape[:2]
    col_index, col_weights = _taps(w, out_w)
    row_index, row_weights = _taps(h, out_h)
    extra = (None,) * (image.ndim - 2)  # broadcast the weights over channels

    rows = image[:, col_index[:, 0]] * col_weights[(slice(None), 0) + extra]
    for k in range(1, 4):
        rows = rows + image[:, col_index[:, k]] * col_weights[(slice(None), k) + extra]
    out = rows[row_index[:, 0]] * row_weights[(slice(None), 0, None) + extra]
    for k in range(1, 4):
        out = out + rows[row_index[:, k]] * row_weights[(slice(None), k, None) + extra]
    return out


def pad_to_multiple(x, multiple: int = WINDOW):
    """Reflect-pad an NCHW array right and bottom so H and W become multiples of `multiple`."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad_h), (0, pad_w)], mode="reflect")


def condition(lr: np.ndarray, scale: int, multiple: int = WINDOW):
    """The network condition for an (h, w, 3) float32 LR image in [0, 1].

    Returns (cond, cond_padded): cond is the bicubic upsampling as float32 [1, 3, h*s, w*s] in [0, 1];
    cond_padded is cond reflect-padded to multiples of `multiple`, what the sampler and network see.
    """
    h, w = lr.shape[:2]
    up = bicubic_resize(lr, h * scale, w * scale)
    cond = np.ascontiguousarray(up.transpose(2, 0, 1)[None])
    return cond, pad_to_multiple(cond, multiple)


def crop(x, height: int, width: int):
    """Undo `pad_to_multiple`: keep the top-left height x width (the official `output = x[..., :H, :W]`)."""
    return x[..., :height, :width]


def quantize(x: np.ndarray, bits: int = 8) -> np.ndarray:
    """float image -> uint8/uint16, round(clamp(x, 0, 1) * max): basicsr `tensor2img` for 8 bits."""
    top = np.float32(2 ** bits - 1)
    dtype = np.uint8 if bits == 8 else np.uint16
    return (np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * top).round().astype(dtype)
