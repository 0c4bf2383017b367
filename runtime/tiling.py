"""Tiling inside the diffusion loop: at every step the network runs on overlapping tiles of the whole
current sample, and the tiles' noise predictions are blended into one full-image eps with smooth
(Gaussian) weights; the sampler then steps the whole image. Stitching finished tiles instead would leave
seams, because every later step amplifies the differences at tile borders.

    eps(p) = sum_k w(p - o_k) * eps_k(p - o_k) / sum_k w(p - o_k)      for every pixel p

with o_k the tile origins and w a separable Gaussian window over the tile (> 0 everywhere, so each pixel
covered by any tile is defined). Origins are multiples of 8, the network's downsampling factor, so each
tile sees the same pixel grid as the whole image. Tiles of one step share t, so batching them is exact
for the group rule g(t[0]).

All array operations are slicing, `*`, `+=` and item assignment, so the sample may live on the host
(numpy) or on the GPU (torch/cupy) as the runner prefers; the runner's `to_device` makes the buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from bdm.errors import BdmError

MULTIPLE = 8
WINDOW_SIGMA = 0.25  # Gaussian sigma as a fraction of the tile side: the tile border weighs exp(-2) of its centre


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile_h: int
    tile_w: int
    origins: Tuple[Tuple[int, int], ...]   # (y0, x0) of every tile, row-major

    @property
    def whole(self) -> bool:
        return len(self.origins) == 1


def _axis_origins(length: int, tile: int, overlap: int) -> List[int]:
    """Evenly spread origins, multiples of MULTIPLE, first 0 and last length - tile, neighbours
    overlapping by about `overlap` or more."""
    if tile >= length:
        return [0]
    return _spread(length, tile, max(2, math.ceil((length - overlap) / (tile - overlap))))


def _spread(length: int, tile: int, count: int) -> List[int]:
    """`count` origins from 0 to length - tile, evenly spaced on the 8-pixel grid."""
    span = (length - tile) / MULTIPLE
    return [int(round(k * span / (count - 1))) * MULTIPLE for k in range(count)]


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    """Tiles of at most tile x tile over a (height, width) image (both multiples of 8)."""
    if height % MULTIPLE or width % MULTIPLE:
        raise BdmError(f"image {height}x{width} is not padded to multiples of {MULTIPLE}")
    if tile < MULTIPLE or tile % MULTIPLE:
        raise BdmError(f"--tile {tile} must be a positive multiple of {MULTIPLE}")
    if (tile < height or tile < width) and not MULTIPLE <= overlap < tile:
        raise BdmError(f"--tile-overlap {overlap} must be at least {MULTIPLE} and less than the tile ({tile})")
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows = _axis_origins(height, tile_h, overlap)
    cols = _axis_origins(width, tile_w, overlap)
    return TileGrid(height, width, tile_h, tile_w, tuple((y, x) for y in rows for x in cols))


def blend_window(tile_h: int, tile_w: int) -> np.ndarray:
    """Separable Gaussian weights [tile_h, tile_w], peak 1 at the centre."""
    def axis(n):
        centre = (np.arange(n, dtype=np.float64) + 0.5 - n / 2) / (WINDOW_SIGMA * n)
        return np.exp(-0.5 * centre ** 2)

    return np.outer(axis(tile_h), axis(tile_w)).astype(np.float32)


def blend_normaliser(grid: TileGrid, window: np.ndarray) -> np.ndarray:
    """1 / sum of the windows covering each pixel, [height, width]."""
    total = np.zeros((grid.height, grid.width), np.float64)
    for y, x in grid.origins:
        total[y:y + grid.tile_h, x:x + grid.tile_w] += window
    if not total.all():
        raise AssertionError("tile grid leaves pixels uncovered")  # a bug in _axis_origins, not bad input
    return (1.0 / total).astype(np.float32)


class TiledEps:
    """eps_fn(x, cond, t) for the sampler: the runner on the whole image, or on tiles blended per step.

    `cond` is fixed for one image, so its tiles are cut once; x is [1, 3, H, W] in the runner's array type.
    """

    def __init__(self, runner, cond, grid: TileGrid, batch: int):
        self.runner, self.grid, self.cond = runner, grid, cond
        self.batch = max(1, min(batch, len(grid.origins)))
        if grid.whole:
            return
        th, tw = grid.tile_h, grid.tile_w
        window = blend_window(th, tw)
        self.window = runner.to_device(window[None])
        self.normaliser = runner.to_device(blend_normaliser(grid, window)[None, None])
        self.eps = runner.to_device(np.zeros((1, 3, grid.height, grid.width), np.float32))
        self.groups = [grid.origins[i:i + self.batch] for i in range(0, len(grid.origins), self.batch)]
        self.x_tiles, self.cond_tiles = {}, []
        for group in self.groups:
            n = len(group)
            if n not in self.x_tiles:
                self.x_tiles[n] = runner.to_device(np.zeros((n, 3, th, tw), np.float32))
            cond_tiles = runner.to_device(np.zeros((n, cond.shape[1], th, tw), np.float32))
            for j, (y, x) in enumerate(group):
                cond_tiles[j] = cond[0, :, y:y + th, x:x + tw]
            self.cond_tiles.append(cond_tiles)

    def __call__(self, x, cond, t: int):
        if self.grid.whole:
            return self.runner.infer({"x_t": x, "cond": cond, "t": np.array([t], np.int64)})["eps"]
        th, tw = self.grid.tile_h, self.grid.tile_w
        self.eps[...] = 0
        for group, cond_tiles in zip(self.groups, self.cond_tiles):
            x_tiles = self.x_tiles[len(group)]
            for j, (y, x0) in enumerate(group):
                x_tiles[j] = x[0, :, y:y + th, x0:x0 + tw]
            t_batch = np.full(len(group), t, np.int64)
            eps_tiles = self.runner.infer({"x_t": x_tiles, "cond": cond_tiles, "t": t_batch})["eps"]
            for j, (y, x0) in enumerate(group):
                self.eps[0, :, y:y + th, x0:x0 + tw] += self.window * eps_tiles[j]
        self.eps *= self.normaliser
        return self.eps


def network_bytes(height: int, width: int, batch: int = 1) -> int:
    """Estimated peak activation memory of one BI-DiffSR forward at the released width (fp32).

    Measured with the PyTorch reference on CPU (peak RSS growth, released x4 network): about 4.8 KiB per
    pixel at 128x128 and 256x256; plus the mid-block attention matrix, (HW/64)^2 scores held about three
    times (scores, softmax, einsum operand) at 4 bytes.
    """
    pixels = height * width
    return batch * int(5 * 1024 * pixels + 12 * (pixels / 64) ** 2)


# An automatic tile is at most this many times as long as it is wide, so that every tile keeps context both ways.
MAX_ASPECT = 4
OVERLAP_FRACTION = 4  # automatic overlap: a quarter of the tile side along each axis that is cut


def _ceil_multiple(value: float) -> int:
    return int(math.ceil(value / MULTIPLE)) * MULTIPLE


def _axis_cut(length: int, count: int, overlap=None) -> Tuple[int, List[int]]:
    """(tile side, origins) of `count` tiles along an axis of `length`: the smallest side (a multiple of 8) whose
    neighbours overlap by `overlap`, by default a quarter of the side, origins spread evenly on the 8-pixel grid."""
    if count == 1:
        return length, [0]
    if overlap is None:  # count * tile - (count - 1) * tile / 4 >= length
        tile = _ceil_multiple(length / (count - (count - 1) / OVERLAP_FRACTION))
    else:
        tile = _ceil_multiple((length + (count - 1) * overlap) / count)
    if tile >= length:
        return length, [0]
    return tile, _spread(length, tile, count)


def _most_cuts(length: int, shortest: int, overlap) -> int:
    """The largest tile count along an axis whose tiles are still at least `shortest` long (or the whole axis)."""
    low, high = 1, max(1, length // MULTIPLE)
    while low < high:
        middle = (low + high + 1) // 2
        tile = _axis_cut(length, middle, overlap)[0]
        low, high = (middle, high) if tile >= shortest or tile == length else (low, middle - 1)
    return low


def plan_rectangular(height: int, width: int, fits, min_hw=(MULTIPLE, MULTIPLE), overlap=None) -> TileGrid:
    """The grid of rows x cols equal tiles (each axis cut as `_axis_cut`, tiles at least min_hw where an axis is
    cut) that computes the fewest pixels among those whose tile passes fits(tile_h, tile_w) (memory budget, largest
    shape: true for every smaller tile too) and MAX_ASPECT; fewer tiles on a tie. The whole image when it fits."""
    best = None
    max_cols = _most_cuts(width, min_hw[1], overlap)
    for rows in range(1, _most_cuts(height, min_hw[0], overlap) + 1):
        tile_h, ys = _axis_cut(height, rows, overlap)
        if len(ys) < rows or (best is not None and rows * tile_h * width >= best[0][0]):
            break  # more rows cannot compute fewer pixels
        if not fits(tile_h, _axis_cut(width, max_cols, overlap)[0]):
            continue
        low, high = 1, max_cols  # the fewest columns whose tile fits (more columns only add overlap)
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(tile_h, _axis_cut(width, middle, overlap)[0]) else (middle + 1, high)
        cols = low
        tile_w, xs = _axis_cut(width, cols, overlap)
        while tile_w > MAX_ASPECT * tile_h and cols < max_cols:  # too wide: cut more
            cols += 1
            tile_w, xs = _axis_cut(width, cols, overlap)
        if (rows, cols) != (1, 1) and max(tile_h, tile_w) > MAX_ASPECT * min(tile_h, tile_w):
            continue
        cost = (rows * cols * tile_h * tile_w, rows * cols)
        if best is None or cost < best[0]:
            best = (cost, TileGrid(height, width, tile_h, tile_w, tuple((y, x) for y in ys for x in xs)))
    if best is None:
        raise BdmError(f"no tiling of the {height}x{width} image fits the memory budget and the backend's limits; "
                       "raise --memory-budget")
    return best[1]


def choose_tiling(height: int, width: int, limits, budget: int, tile=None, overlap=None):
    """(TileGrid, batch) for a padded height x width image under a memory budget and the runner's limits.

    Without `tile`: the whole image when it fits (as the original runs it), otherwise the grid of equal, possibly
    rectangular, tiles that computes the fewest pixels while each tile fits the budget and the runner's shapes
    (`plan_rectangular`). With `tile`: square tiles of that side (`plan_tiles`). As many tiles per call as the
    budget allows.
    """
    max_h, max_w = limits.max_hw or (height, width)
    min_h, min_w = limits.min_hw
    if tile is None:
        def fits(tile_h, tile_w):
            return tile_h <= max_h and tile_w <= max_w and network_bytes(tile_h, tile_w) <= budget

        grid = plan_rectangular(height, width, fits, (min_h, min_w), overlap)
    else:
        if limits.max_hw is not None and tile > min(max_h, max_w):
            raise BdmError(f"--tile {tile} is larger than the backend accepts ({max_h}x{max_w}); "
                           f"use --tile {min(max_h, max_w) // MULTIPLE * MULTIPLE} or less")
        if tile < max(min_h, min_w):
            raise BdmError(f"--tile {tile} is smaller than the backend accepts ({min_h}x{min_w}); "
                           f"use --tile {max(min_h, min_w)} or more")
        if overlap is None:
            overlap = max(MULTIPLE, tile // OVERLAP_FRACTION // MULTIPLE * MULTIPLE)
        grid = plan_tiles(height, width, tile, overlap)
    per_tile = network_bytes(grid.tile_h, grid.tile_w)
    batch = max(1, min(budget // per_tile, limits.max_batch or len(grid.origins), len(grid.origins)))
    return grid, batch
