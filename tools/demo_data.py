"""Photos, degradation and metrics shared by tools/train_demo.py and tools/eval_demo.py (outside the bdm package).

Photos: scikit-image's bundled sample images (files inside the installed wheel, nothing is fetched). They split
into three disjoint sets:
- TRAIN: every bundled photograph except those below.
- HELD_OUT: chelsea (a cat) and coffee (a cup); never trained on: they monitor training and are evaluated.
- EXCLUDED: astronaut, the quickstart's demonstration photo (runtime/samples/astronaut_64.png is a crop of it).
Synthetic images (chessboard, color, logo, phantom, horse, ...) are not photographs and are not used.

Degradation (the SR convention): HR cropped to a multiple of the scale; LR = Pillow's bicubic downscale of the
8-bit HR (Image.resize BICUBIC: Keys a = -0.5 with the kernel widened by the scale, i.e. antialiased, as
MATLAB's imresize), rounded to 8 bits like an LR PNG file; the condition is bdm's own bicubic upsampling
(bdm.runtime.preprocess.condition, cv2 INTER_CUBIC semantics), exactly what `bdm upscale` feeds the network.

Metrics (basicsr's calculate_psnr / calculate_ssim with test_y_channel=True): 8-bit images, Y of ITU-R BT.601
(16..235), `crop_border = scale` pixels shaved on every side; SSIM with an 11x11 Gaussian window (sigma 1.5).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from bdm.runtime.preprocess import condition

TRAIN = ("rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "motorcycle_left.png", "motorcycle_right.png",
         "ihc.png", "camera.png", "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png", "page.png",
         "text.png", "cell.png")
HELD_OUT = ("chelsea.png", "coffee.png")
EXCLUDED = ("astronaut.png",)


def skimage_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as uint8 (H, W, 3) RGB (gray replicated); refuses anything not in the wheel."""
    import skimage.data

    path = os.path.join(os.path.dirname(skimage.data.__file__), name)
    if not os.path.isfile(path):
        raise SystemExit(f"{name} is not bundled with this scikit-image ({path} missing); nothing is downloaded")
    image = np.asarray(Image.open(path).convert("RGB"))
    return image


def degrade(hr: np.ndarray, scale: int):
    """(hr cropped to a multiple of scale, lr uint8) with lr = Pillow bicubic / scale, rounded to 8 bits."""
    h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
    hr = np.ascontiguousarray(hr[:h, :w])
    lr = np.asarray(Image.fromarray(hr).resize((w // scale, h // scale), Image.BICUBIC))
    return hr, lr


def hr_and_condition(hr: np.ndarray, scale: int):
    """(hr float32 (H, W, 3) in [0, 1], lr uint8, cond float32 (H, W, 3)): what training and evaluation see."""
    hr, lr = degrade(hr, scale)
    cond, _ = condition(lr.astype(np.float32) / 255.0, scale)
    return hr.astype(np.float32) / 255.0, lr, np.ascontiguousarray(cond[0].transpose(1, 2, 0))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 as basicsr tensor2img (clamp, *255, round)."""
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def y_channel(rgb_uint8: np.ndarray) -> np.ndarray:
    """basicsr rgb2ycbcr(y_only=True) on [0, 255] values: 16 + (65.481 R + 128.553 G + 24.966 B) / 255."""
    rgb = rgb_uint8.astype(np.float64)
    return 16.0 + (rgb @ np.array([65.481, 128.553, 24.966])) / 255.0


def _shave(y: np.ndarray, border: int) -> np.ndarray:
    return y[border:-border, border:-border] if border else y


def psnr_y(a_uint8: np.ndarray, b_uint8: np.ndarray, border: int) -> float:
    ya, yb = _shave(y_channel(a_uint8), border), _shave(y_channel(b_uint8), border)
    mse = np.mean((ya - yb) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def _gaussian_filter_valid(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """2-D 'valid' correlation with a separable window (basicsr uses cv2.filter2D then crops 5 px)."""
    k = window.shape[0]
    g = window[k // 2] / window[k // 2].sum()  # the 1-D factor of the separable Gaussian
    rows = sum(g[i] * img[:, i:img.shape[1] - k + 1 + i] for i in range(k))
    return sum(g[i] * rows[i:rows.shape[0] - k + 1 + i] for i in range(k))


def ssim_y(a_uint8: np.ndarray, b_uint8: np.ndarray, border: int) -> float:
    """basicsr _ssim on Y: constants (0.01*255)^2, (0.03*255)^2, 11x11 Gaussian sigma 1.5, valid region."""
    x, y = _shave(y_channel(a_uint8), border), _shave(y_channel(b_uint8), border)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ax = np.arange(11) - 5
    g = np.exp(-(ax ** 2) / (2 * 1.5 ** 2))
    window = np.outer(g, g)
    mu_x, mu_y = _gaussian_filter_valid(x, window), _gaussian_filter_valid(y, window)
    sxx = _gaussian_filter_valid(x * x, window) - mu_x ** 2
    syy = _gaussian_filter_valid(y * y, window) - mu_y ** 2
    sxy = _gaussian_filter_valid(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())


def gradient_energy(y: np.ndarray) -> float:
    """Sum of squared forward differences (horizontal + vertical) of a Y image."""
    return float((np.diff(y, axis=0) ** 2).sum() + (np.diff(y, axis=1) ** 2).sum())


def gradient_share(out_uint8: np.ndarray, gt_uint8: np.ndarray, border: int) -> float:
    """The share of the ground truth's gradient energy (on Y, shaved) that an output has: 1 = as sharp as the
    ground truth, below 1 = smoother (bicubic is well below), above 1 = extra high frequencies (noise)."""
    return gradient_energy(_shave(y_channel(out_uint8), border)) / gradient_energy(_shave(y_channel(gt_uint8), border))
