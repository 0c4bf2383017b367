"""Tiling inside the diffusion loop: tile plans, Gaussian blending, batching and backend limits."""

import numpy as np
import pytest

from bdm.errors import BdmError
from bdm.runtime.backends import Limits, Runner
from bdm.runtime.sampler import ddim_schedule, sample
from bdm.runtime.tiling import TiledEps, blend_normaliser, blend_window, choose_tiling, network_bytes, plan_tiles


class PointwiseRunner(Runner):
    """A stand-in network with a receptive field of one pixel: tiling must then change nothing."""

    name = "pointwise"

    def __init__(self, max_batch=None):
        self.limits = Limits(max_batch=max_batch)
        self.batches = []

    def infer(self, feed):
        x, cond, t = feed["x_t"], feed["cond"], feed["t"]
        assert x.shape[0] == cond.shape[0] and (t == t[0]).all()  # one timestep per call: g(t[0]) is exact
        self.batches.append(x.shape[0])
        return {"eps": np.tanh(0.7 * x - 0.4 * cond + t[0] / 2000.0).astype(np.float32)}


@pytest.mark.parametrize("height, width, tile, overlap", [(96, 96, 32, 8), (104, 40, 48, 16), (32, 200, 64, 24)])
def test_tiles_cover_the_image_on_the_8_pixel_grid(height, width, tile, overlap):
    grid = plan_tiles(height, width, tile, overlap)
    assert grid.tile_h == min(tile, height) and grid.tile_w == min(tile, width)
    ys = sorted({y for y, _ in grid.origins})
    xs = sorted({x for _, x in grid.origins})
    for origins, length, side in ((ys, height, grid.tile_h), (xs, width, grid.tile_w)):
        assert origins[0] == 0 and origins[-1] == length - side
        assert all(o % 8 == 0 for o in origins)
        assert all(b - a <= side - 8 for a, b in zip(origins, origins[1:]))  # neighbours overlap
    normaliser = blend_normaliser(grid, blend_window(grid.tile_h, grid.tile_w))
    assert np.isfinite(normaliser).all() and normaliser.shape == (height, width)


def test_tiled_eps_equals_whole_image_eps_for_a_local_network():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 96, 96), dtype=np.float32)
    cond = rng.random((1, 3, 96, 96), dtype=np.float32)
    whole = PointwiseRunner().infer({"x_t": x, "cond": cond, "t": np.array([800])})["eps"]
    runner = PointwiseRunner(max_batch=3)
    grid, batch = choose_tiling(96, 96, runner.limits, budget=1 << 40, tile=32, overlap=8)
    assert len(grid.origins) == 16 and batch == 3
    tiled = TiledEps(runner, cond, grid, batch)(x, cond, 800)
    assert runner.batches == [3, 3, 3, 3, 3, 1]
    assert np.abs(tiled - whole).max() <= 2e-7   # only the rounding of sum(w * eps) / sum(w)


def test_tiled_sampling_is_seamless_for_a_local_network():
    """Whole DDIM runs, tiled (4 x 4 tiles) and untiled, from the same noise: the same image."""
    rng = np.random.default_rng(4)
    noise = rng.standard_normal((1, 3, 96, 96), dtype=np.float32)
    cond = rng.random((1, 3, 96, 96), dtype=np.float32)
    schedule = ddim_schedule(10)
    runner = PointwiseRunner()
    whole_grid, _ = choose_tiling(96, 96, runner.limits, budget=1 << 40)
    assert whole_grid.whole                              # small images run whole, as the original does
    whole = sample(TiledEps(runner, cond, whole_grid, 1), cond, noise, schedule)
    grid, batch = choose_tiling(96, 96, runner.limits, budget=1 << 40, tile=32, overlap=8)
    tiled = sample(TiledEps(runner, cond, grid, batch), cond, noise, schedule)
    assert np.abs(tiled - whole).max() <= 1e-5


def test_tile_size_follows_the_memory_budget_and_backend_limits():
    limits = Limits(max_batch=4, min_hw=(64, 64), max_hw=(256, 256))
    grid, batch = choose_tiling(1024, 768, limits, budget=network_bytes(200, 200))
    assert network_bytes(grid.tile_h, grid.tile_w) <= network_bytes(200, 200) and batch == 1
    grid, batch = choose_tiling(1024, 768, limits, budget=1 << 40)
    assert grid.tile_h <= 256 and grid.tile_w <= 256 and batch == 4
    square, _ = choose_tiling(1024, 768, limits, budget=1 << 40, tile=256)
    assert pixels(grid) <= pixels(square)
    with pytest.raises(BdmError, match="larger than the backend accepts"):
        choose_tiling(1024, 768, limits, budget=1 << 40, tile=512)
    with pytest.raises(BdmError, match="smaller than the backend accepts"):
        choose_tiling(1024, 768, limits, budget=1 << 40, tile=32)
    with pytest.raises(BdmError, match="multiple of 8"):
        plan_tiles(96, 96, 30, 8)
    with pytest.raises(BdmError, match="tile-overlap"):
        plan_tiles(96, 96, 32, 32)


def pixels(grid) -> int:
    return len(grid.origins) * grid.tile_h * grid.tile_w


def check_plan(grid, budget, limits):
    """Every pixel covered, origins on the 8-pixel grid inside the image, neighbours overlapping, every tile within
    the budget and the runner's shapes."""
    normaliser = blend_normaliser(grid, blend_window(grid.tile_h, grid.tile_w))   # raises if a pixel is uncovered
    assert np.isfinite(normaliser).all()
    for origins, length, side in ((sorted({y for y, _ in grid.origins}), grid.height, grid.tile_h),
                                  (sorted({x for _, x in grid.origins}), grid.width, grid.tile_w)):
        assert origins[0] == 0 and origins[-1] == length - side and all(o % 8 == 0 for o in origins)
        assert all(b - a <= side - 8 for a, b in zip(origins, origins[1:]))
    assert grid.whole or network_bytes(grid.tile_h, grid.tile_w) <= budget
    if limits.max_hw:
        assert grid.tile_h <= limits.max_hw[0] and grid.tile_w <= limits.max_hw[1]


def test_the_320x240_example_computes_at_most_1_3_times_its_pixels():
    """1280x960 output on a 24 GiB machine (the host budget, a quarter of it): the square plan ran 4 tiles of
    912x912, 2.7x the pixels, at every step; the plan now cuts one axis."""
    budget = 6 << 30
    grid, batch = choose_tiling(960, 1280, Limits(), budget)
    check_plan(grid, budget, Limits())
    assert pixels(grid) <= 1.3 * 960 * 1280 and len(grid.origins) == 2
    square, _ = choose_tiling(960, 1280, Limits(), budget, tile=912)
    assert pixels(square) > 2.7 * 960 * 1280


@pytest.mark.parametrize("height, width, budget_side, limits", [
    (960, 1280, 700, Limits()), (2048, 512, 400, Limits()), (512, 4096, 512, Limits()),
    (1024, 768, 2000, Limits(max_hw=(256, 384))), (640, 640, 300, Limits(min_hw=(128, 128))),
    (96, 4000, 96, Limits())])
def test_plans_cover_fit_and_never_compute_more_than_square_tiles(height, width, budget_side, limits):
    budget = network_bytes(budget_side, budget_side)
    grid, _ = choose_tiling(height, width, limits, budget)
    check_plan(grid, budget, limits)
    assert max(grid.tile_h, grid.tile_w) <= 4 * min(grid.tile_h, grid.tile_w) or grid.whole
    tile = min(budget_side, *(limits.max_hw or (budget_side,))) // 8 * 8
    square, _ = choose_tiling(height, width, limits, budget, tile=tile)
    assert pixels(grid) <= pixels(square)


def test_an_image_that_fits_runs_whole_and_rectangular_tiles_blend_like_the_whole_image():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 3, 96, 200), dtype=np.float32)
    cond = rng.random((1, 3, 96, 200), dtype=np.float32)
    runner = PointwiseRunner(max_batch=2)
    assert choose_tiling(96, 200, runner.limits, budget=network_bytes(96, 200))[0].whole
    grid, batch = choose_tiling(96, 200, runner.limits, budget=network_bytes(96, 80))
    assert grid.tile_h == 96 and grid.tile_w < 200 and len(grid.origins) > 1
    whole = PointwiseRunner().infer({"x_t": x, "cond": cond, "t": np.array([300])})["eps"]
    tiled = TiledEps(runner, cond, grid, batch)(x, cond, 300)
    assert np.abs(tiled - whole).max() <= 2e-7


class TorchStateRunner(PointwiseRunner):
    """Keeps the sampler state in torch tensors, as a GPU backend keeps it on the device (here on the CPU)."""

    def to_device(self, array):
        import torch

        return torch.from_numpy(np.array(array))

    def to_host(self, array):
        return array.numpy()

    def infer(self, feed):
        import torch

        host = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feed.items()}
        return {"eps": torch.from_numpy(super().infer(host)["eps"])}


def test_device_resident_state_gives_the_same_tiled_run():
    pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    noise = rng.standard_normal((1, 3, 64, 96), dtype=np.float32)
    cond = rng.random((1, 3, 64, 96), dtype=np.float32)
    schedule = ddim_schedule(5)
    results = []
    for runner in (PointwiseRunner(max_batch=2), TorchStateRunner(max_batch=2)):
        grid, batch = choose_tiling(64, 96, runner.limits, budget=1 << 40, tile=32, overlap=8)
        cond_dev = runner.to_device(cond)
        x = sample(TiledEps(runner, cond_dev, grid, batch), cond_dev, runner.to_device(noise), schedule)
        results.append(runner.to_host(x))
    assert np.array_equal(results[0], results[1])
