"""Evaluate the bundled demo model (or any exported x4 ONNX file) on held-out photographs.

    python tools/eval_demo.py                        # the shipped model, 50 steps, seed 10; prints the table
    python tools/eval_demo.py --png docs/demo_x4.png # also the side-by-side picture (bicubic | bdm | ground truth)

HR: scikit-image's bundled chelsea and coffee, never trained on (tools/demo_data.py). LR = Pillow bicubic / 4
of the HR (8-bit). bdm's output is exactly what `bdm upscale` computes (ONNX Runtime, the official 50-step
DDIM sampler, noise from the seed); bicubic is bdm's own bicubic upsampling of the same LR (the condition).
Metrics as basicsr with test_y_channel: PSNR and SSIM on Y (BT.601), `scale` pixels shaved at the border; and
the share of the ground truth's gradient energy each output has (1.0 = as much detail as the ground truth).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data  # noqa: E402

from bdm.runtime import demo_model, image_io  # noqa: E402
from bdm.runtime.backends import OrtRunner  # noqa: E402
from bdm.runtime.sampler import ddim_schedule  # noqa: E402
from bdm.runtime.upscale import UpscaleSettings, upscale_picture  # noqa: E402

SCALE = 4


def upscale(runner, lr_uint8: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """The `bdm upscale` computation on one LR image: uint8 output."""
    picture = image_io.Picture(lr_uint8.astype(np.float32) / 255.0, None, False, 8, None)
    settings = UpscaleSettings(scale=SCALE, steps=steps, seed=seed)
    rgb, _ = upscale_picture(runner, picture, settings, ddim_schedule(steps), budget=1 << 30)
    return demo_data.to_uint8(rgb)


def evaluate(onnx: Path, names, steps: int, seed: int):
    """Rows (name, method, PSNR-Y, SSIM-Y, gradient share) and the images per photo."""
    runner = OrtRunner(onnx)
    rows, images = [], {}
    for name in names:
        hr, lr, cond = demo_data.hr_and_condition(demo_data.skimage_photo(name), SCALE)
        gt = demo_data.to_uint8(hr)
        outputs = {"bicubic": demo_data.to_uint8(cond), "bdm": upscale(runner, lr, steps, seed)}
        for method, out in outputs.items():
            rows.append((name, method, demo_data.psnr_y(out, gt, SCALE), demo_data.ssim_y(out, gt, SCALE),
                         demo_data.gradient_share(out, gt, SCALE)))
        images[name] = (outputs["bicubic"], outputs["bdm"], gt)
    return rows, images


def table(rows) -> str:
    lines = [f"{'photo':<14}{'method':<10}{'PSNR-Y dB':>10}{'SSIM-Y':>9}{'grad. energy':>14}"]
    for name, method, psnr, ssim, share in rows:
        lines.append(f"{name:<14}{method:<10}{psnr:>10.2f}{ssim:>9.4f}{share:>14.2f}")
    for method in ("bicubic", "bdm"):
        mine = [r for r in rows if r[1] == method]
        lines.append(f"{'mean':<14}{method:<10}{np.mean([r[2] for r in mine]):>10.2f}"
                     f"{np.mean([r[3] for r in mine]):>9.4f}{np.mean([r[4] for r in mine]):>14.2f}")
    return "\n".join(lines)


def side_by_side(images: dict, crop: int = 160, zoom: int = 2) -> Image.Image:
    """One row per photo: bicubic | bdm | ground truth, a crop x crop window around the busiest area, zoomed
    (nearest) so single pixels show."""
    tiles = []
    for bicubic, ours, gt in images.values():
        y = demo_data.y_channel(gt)
        energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1]
        best, where = -1.0, (0, 0)
        for top in range(0, gt.shape[0] - crop + 1, 16):
            for left in range(0, gt.shape[1] - crop + 1, 16):
                value = energy[top:top + crop - 1, left:left + crop - 1].sum()
                if value > best:
                    best, where = value, (top, left)
        top, left = where
        row = [Image.fromarray(im[top:top + crop, left:left + crop]).resize((crop * zoom, crop * zoom),
                                                                               Image.NEAREST)
               for im in (bicubic, ours, gt)]
        tiles.append(row)
    side, gap, label = crop * zoom, 4, 14
    canvas = Image.new("RGB", (3 * side + 2 * gap, label + len(tiles) * (side + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(("bicubic", "bdm demo model (50 steps)", "ground truth")):
        draw.text((j * (side + gap) + 4, 1), title, fill="black")
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            canvas.paste(tile, (j * (side + gap), label + i * (side + gap)))
    return canvas


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=demo_model.ONNX, help="x4 BI-DiffSR ONNX (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=10, help="noise seed (10: the official test seed)")
    parser.add_argument("--png", type=Path, help="write the side-by-side picture here")
    args = parser.parse_args(argv)
    rows, images = evaluate(args.onnx, demo_data.HELD_OUT, args.steps, args.seed)
    print(f"{args.onnx.name}, {args.steps} DDIM steps, seed {args.seed}, x{SCALE}, held-out photos "
          f"(LR = Pillow bicubic / {SCALE}); Y channel, {SCALE} px shaved")
    print(table(rows))
    if args.png:
        side_by_side(images).save(args.png)
        print(args.png)


if __name__ == "__main__":
    main()
