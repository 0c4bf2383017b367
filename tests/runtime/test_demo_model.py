"""The demo model shipped in the package (runtime/models, made by tools/train_demo.py): its files, its ONNX
against its checkpoint, and that the 50-step sampler with it really super-resolves a photo it never saw."""

import sys
from pathlib import Path

import numpy as np
import torch
import yaml

import bdm
from bdm.export import registry
from bdm.runtime import demo_model
from bdm.runtime.backends import OrtRunner
from bdm.runtime.noise import draw_noise
from bdm.runtime.preprocess import condition
from bdm.runtime.sampler import ddim_schedule, sample

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import demo_data  # noqa: E402  (the held-out photos, the degradation and the metrics of tools/eval_demo.py)

# Measured on this crop (seed 10): the shipped model (iteration 4300) 27.33 dB PSNR-Y, bicubic
# 30.26 dB, the reference checkpoint's random weights 9.9 dB, uniform noise 13.4 dB. The floor leaves 1.5 dB for
# other CPUs' rounding (the sampler is chaotic: one flipped sign changes every later step).
MEASURED_PSNR = 27.33
BICUBIC_PSNR = 30.26
PSNR_FLOOR = MEASURED_PSNR - 1.5


def test_shipped_files_are_an_official_x4_checkpoint_its_yaml_and_its_onnx_within_10_mb():
    sizes = {p: p.stat().st_size for p in (demo_model.CKPT, demo_model.CONFIG, demo_model.ONNX)}
    assert sum(sizes.values()) <= 10 * 2 ** 20, sizes
    options = yaml.safe_load(demo_model.CONFIG.read_text())
    assert options["scale"] == 4 and options["network_g"]["type"] == "BIDiffSRUNet"
    assert options["beta_schedule"] == {**options["beta_schedule"], "scheduler_type": "DDIM", "schedule": "linear",
                                        "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 0.01,
                                        "num_inference_steps": 50}
    assert list(torch.load(demo_model.CKPT, weights_only=True)) == ["params"]
    model = bdm.load_model(demo_model.CKPT, config=demo_model.CONFIG)  # strict: every key and shape
    assert model.in_channel == 6 and not model.training


def test_shipped_onnx_matches_the_shipped_checkpoint():
    lines = []
    report = registry.validate_file(demo_model.ONNX, demo_model.CKPT, log=lines.append)
    assert report.passed, "\n".join(lines)
    assert not any(line.startswith("note:") for line in lines), lines  # exported from this very checkpoint


def test_50_steps_with_the_shipped_model_super_resolve_a_held_out_photo():
    """A 96 x 96 crop of chelsea (never trained on), LR = bicubic / 4: the official 50-step sampler with the
    shipped ONNX lands within reach of bicubic, far above what an untrained network or noise gives."""
    hr, lr = demo_data.degrade(demo_data.skimage_photo("chelsea.png")[100:196, 180:276], 4)
    _, cond = condition(lr.astype(np.float32) / 255.0, 4)
    runner = OrtRunner(demo_model.ONNX)
    out = sample(lambda x, c, t: runner.infer({"x_t": x, "cond": c, "t": np.array([t], np.int64)})["eps"],
                 cond, draw_noise(10, cond.shape), ddim_schedule(50))
    psnr = demo_data.psnr_y(demo_data.to_uint8(out[0].transpose(1, 2, 0)), hr, 4)
    print(f"PSNR-Y {psnr:.2f} dB (measured {MEASURED_PSNR}, floor {PSNR_FLOOR}, bicubic {BICUBIC_PSNR})")
    assert psnr >= PSNR_FLOOR
