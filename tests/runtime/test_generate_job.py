"""The `bdm generate` job on the official BinaryDM UNet golden (unet_cifar_like_w32): LDM DDIM sampling of an
unconditional model, the grid it writes, chunked network calls, noise replay and the checks made before sampling."""

import warnings

import numpy as np
import pytest
from PIL import Image

import bdm
from bdm.errors import BdmError
from bdm.runtime.backends import Limits, TorchRunner
from bdm.runtime.generate import GRID_PADDING, GenerateSettings, generate, image_grid
from bdm.runtime.noise import draw_noise, save_noise
from bdm.runtime.sampler import ldm_ddim_schedule, sample

CASE = "unet_cifar_like_w32"


@pytest.fixture(scope="module")
def runner(bdm_ref):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the golden holds one exact-zero weight: irrelevant to sampling in PyTorch
        model = bdm.load_model(bdm_ref / f"{CASE}.pt", config=bdm_ref / f"{CASE}.json")
    return TorchRunner(model=model, device="cpu")


class CallLog:
    """Records the batch size of every network call of a real runner."""

    def __init__(self, runner):
        self.runner, self.batches = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def infer(self, feed):
        assert set(feed) == {"x_t", "t"} and feed["t"].dtype == np.int64 and len(set(feed["t"])) == 1
        self.batches.append(feed["x_t"].shape[0])
        return self.runner.infer(feed)


def test_grid_holds_the_ldm_ddim_samples(runner, tmp_path):
    settings = GenerateSettings(num=3, steps=4, seed=5, image_size=32)
    logged = CallLog(runner)
    summary = generate(logged, tmp_path / "grid.png", settings, stream=open(tmp_path / "log.txt", "w"))
    assert summary.steps == 4 and logged.batches == [3, 3, 3, 3]
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    side = 2 * (32 + GRID_PADDING) + GRID_PADDING
    assert grid.shape == (side, side, 3)

    noise = draw_noise(5, (3, 3, 32, 32))
    x = sample(lambda x, cond, t: runner.infer({"x_t": x, "t": np.full(3, t, np.int64)})["eps"], None, noise,
               ldm_ddim_schedule(4))
    expected = np.clip((x + 1) / 2, 0, 1)
    for i in range(3):
        top, left = GRID_PADDING + (i // 2) * 34, GRID_PADDING + (i % 2) * 34
        cell = grid[top:top + 32, left:left + 32].astype(np.float32) / 255
        assert np.abs(cell - expected[i].transpose(1, 2, 0)).max() <= 0.5 / 255 + 1e-6, f"sample {i}"
    assert grid[36:, 36:].max() == 0  # the fourth cell is empty: black
    assert grid[:GRID_PADDING].max() == 0 and expected.std() > 0.05
    log = (tmp_path / "log.txt").read_text()
    assert "3 samples of 3x32x32, 4 DDIM steps (t 751..1)" in log and "step 4/4" in log


def test_batches_noise_file_and_determinism(runner, tmp_path):
    logged = CallLog(runner)
    generate(logged, tmp_path / "a.png", GenerateSettings(num=3, steps=2, seed=9, batch=2),
             stream=open(tmp_path / "log.txt", "w"))
    assert logged.batches == [2, 1, 2, 1]
    save_noise(tmp_path / "noise.npy", draw_noise(9, (3, 3, 32, 32)))
    generate(runner, tmp_path / "b.png", GenerateSettings(num=3, steps=2, noise_file=tmp_path / "noise.npy"),
             stream=open(tmp_path / "log.txt", "w"))
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1  # same noise; the per-call batch changes only the conv's float rounding


@pytest.mark.parametrize("settings, text", [
    (dict(size=20), "not a positive multiple of 8"),
    (dict(num=0), "at least one sample"),
    (dict(channels=4), "4-channel"),
    (dict(steps=600), "outside 1..500"),
])
def test_bad_requests_fail_before_writing(runner, tmp_path, settings, text):
    size = settings.pop("size", 32)
    with pytest.raises(BdmError, match=text):
        generate(runner, tmp_path / "g.png", GenerateSettings(image_size=size, **settings),
                 stream=open(tmp_path / "log.txt", "w"))
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.part"))


class ProfileLimited(CallLog):
    """A real runner under the limits of a TensorRT engine built for 32x32 images, at most 2 per call."""

    limits = Limits(max_batch=2, min_hw=(32, 32), max_hw=(32, 32))


def test_engine_limits_chunk_the_calls_and_refuse_other_sizes(runner, tmp_path):
    limited = ProfileLimited(runner)
    generate(limited, tmp_path / "g.png", GenerateSettings(num=3, steps=2), stream=open(tmp_path / "log.txt", "w"))
    assert limited.batches == [2, 1, 2, 1]
    with pytest.raises(BdmError) as err:
        generate(limited, tmp_path / "h.png", GenerateSettings(num=1, steps=2, image_size=64))
    assert str(err.value).startswith("--size 64 (default: the model's image size): PyTorch (cpu), checkpoint "
                                     "in-memory model takes images of 32x32 to 32x32; give a --size in that range, "
                                     "or rebuild the engine with a profile that contains 64x64")
    assert not (tmp_path / "h.png").exists() and not list(tmp_path.glob(".*.part"))


def test_conditional_model_is_refused(bi_ref, tmp_path):
    bi = TorchRunner(bi_ref / "ckpt_small_x4.pth", config=bi_ref / "ckpt_small_x4.yml", device="cpu")
    with pytest.raises(BdmError, match="conditional .*use `bdm upscale`"):
        generate(bi, tmp_path / "g.png", GenerateSettings(num=1, steps=1))


def test_image_grid_layout():
    images = np.stack([np.full((1, 2, 3), v, np.float32) for v in (0.25, 0.5, 0.75, 1.0, 0.1)])
    grid = image_grid(images, padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0.25 and grid[1, 5, 0] == 0.5 and grid[1, 9, 0] == 0.75
    assert grid[4, 1, 0] == 1.0 and grid[4, 5, 0] == np.float32(0.1) and grid[4, 9, 0] == 0
