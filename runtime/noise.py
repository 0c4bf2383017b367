"""The sampler's only random draw, x_T ~ N(0, I), made on the host so every backend sees the same noise.

The same seed gives the same float32 array on every machine (numpy's PCG64 `default_rng` and its ziggurat
normal sampler are platform independent); backends copy it to wherever they keep the sampler state.
A draw can be saved to `.npy` and replayed (`--noise-file`), e.g. to feed the official run's `noise_init`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdm.errors import BdmError
from bdm.files import atomic_path


def draw_noise(seed: int, shape) -> np.ndarray:
    """Standard normal float32 noise of `shape` (the padded condition's NCHW shape) from `seed`."""
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def save_noise(path, noise: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, np.asarray(noise, dtype=np.float32))


def load_noise(path, shape) -> np.ndarray:
    """Read a `.npy` noise file and check it is float32-convertible and exactly `shape`."""
    path = Path(path)
    try:
        noise = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BdmError(f"--noise-file {path}: no such file; give a .npy written by numpy.save") from None
    except (OSError, ValueError) as e:
        raise BdmError(f"--noise-file {path} is not a readable .npy array ({e}); "
                       "give a float array written by numpy.save") from None
    if not isinstance(noise, np.ndarray):  # an .npz archive
        raise BdmError(f"--noise-file {path} is an .npz archive; give one array saved with numpy.save (.npy)")
    if tuple(noise.shape) != tuple(shape):
        raise BdmError(f"--noise-file {path} has shape {tuple(noise.shape)} but this image needs "
                       f"{tuple(shape)} (the padded condition, N x 3 x H x W); draw it for this image size")
    if not np.issubdtype(noise.dtype, np.floating):
        raise BdmError(f"--noise-file {path} holds {noise.dtype} values; give a float array")
    return noise.astype(np.float32, copy=False)
