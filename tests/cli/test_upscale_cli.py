"""`bdm upscale` through the console script: the main job end to end, and bad inputs as one line."""

import subprocess

import numpy as np
import pytest
from PIL import Image
from skimage import data


def run_bdm(*args, cwd=None):
    return subprocess.run(["bdm", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def lr_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("lr") / "astronaut.png"
    Image.fromarray(data.astronaut()[80:104, 180:204]).save(path)
    return path


def _one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    return lines[-1]


def test_ckpt_upscale_end_to_end(bi_ref, lr_png, tmp_path):
    out = tmp_path / "x4.png"
    result = run_bdm("upscale", "--ckpt", bi_ref / "ckpt_small_x4.pth", "--config", bi_ref / "ckpt_small_x4.yml",
                     "--steps", "2", "--seed", "10", lr_png, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)                       # the path of the written image
    assert "using x4" in result.stderr and "1 upscaled" in result.stderr
    assert np.asarray(Image.open(out)).shape == (96, 96, 3)


@pytest.mark.parametrize("args, text", [
    (["--ckpt", "{ref}/ckpt_small_x4.pth", "{tmp}/missing.png", "{tmp}/o.png"], "no such file or folder"),
    (["--onnx", "{tmp}/a.onnx", "--ckpt", "{ref}/ckpt_small_x4.pth", "{lr}", "{tmp}/o.png"],
     "give exactly one model"),
    (["--onnx", "{tmp}/missing.onnx", "{lr}", "{tmp}/o.png"], "no such ONNX file"),
    (["--onnx", "{lr}", "{lr}", "{tmp}/o.png"], "is not an ONNX model"),
    (["--engine", "{lr}", "{lr}", "{tmp}/o.png"], "TensorRT"),
    (["--ckpt", "{ref}/ckpt_small_x4.pth", "{lr}", "{tmp}/no_folder/o.png"], "does not exist; create it first"),
    (["--ckpt", "{ref}/ckpt_small_x4.pth", "{lr}", "{tmp}/o.xyz"], "unknown image suffix"),
    (["--ckpt", "{ref}/ckpt_small_x4.pth", "--config", "{ref}/ckpt_small_x4.yml", "--noise-file",
      "{tmp}/missing.npy", "{lr}", "{tmp}/o.png"], "no such file"),
])
def test_bad_inputs_are_one_line_and_write_nothing(bi_ref, lr_png, tmp_path, args, text):
    filled = [a.format(ref=bi_ref, tmp=tmp_path, lr=lr_png) for a in args]
    result = run_bdm("upscale", *filled)
    assert text in _one_error_line(result)
    assert not (tmp_path / "o.png").exists() and not list(tmp_path.glob(".*.part"))


@pytest.mark.filterwarnings("ignore:.*sign-0 weights")
def test_unconditional_model_is_refused(bdm_ref, binarydm_onnx, lr_png, tmp_path):
    """BinaryDM takes no cond: upscaling with it would sample an unrelated image, so every backend refuses it."""
    ckpt = bdm_ref / "unet_cifar_like_w32.pt"
    for model, backend in ((["--onnx", binarydm_onnx], f"model {binarydm_onnx}"),
                           (["--ckpt", ckpt, "--config", bdm_ref / "unet_cifar_like_w32.json", "--device", "cpu"],
                            f"PyTorch (cpu), checkpoint {ckpt}")):
        line = _one_error_line(run_bdm("upscale", *model, lr_png, tmp_path / "o.png"))
        assert backend in line and line.endswith(
            "takes inputs ['x_t', 't']: an unconditional (BinaryDM) model; bdm upscale runs models with inputs "
            "['x_t', 'cond', 't']: use `bdm generate` for this one"), line
    assert not (tmp_path / "o.png").exists()


def test_non_image_input_fails_with_its_name(bi_ref, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    result = run_bdm("upscale", "--ckpt", bi_ref / "ckpt_small_x4.pth", "--config", bi_ref / "ckpt_small_x4.yml",
                     "--steps", "1", bad, tmp_path / "o.png")
    assert result.returncode == 1
    assert f"cannot read {bad}: not a readable image" in result.stderr and "Traceback" not in result.stderr
    assert "0 upscaled, 0 skipped, 1 failed" in result.stderr and not (tmp_path / "o.png").exists()


def test_a_scale_other_than_the_recorded_one_is_one_warning(bi_ref, lr_png, tmp_path):
    """The export records x4 (the checkpoint's name says so); upscaling x3 with it runs, and says so in one line."""
    model = tmp_path / "small_x4.onnx"
    exported = run_bdm("export", bi_ref / "ckpt_small_x4.pth", model, "--config", bi_ref / "ckpt_small_x4.yml",
                       "--no-validate")
    assert exported.returncode == 0, exported.stderr
    warnings = {}
    for scale in ("3", "4"):
        out = tmp_path / f"x{scale}.png"
        result = run_bdm("upscale", "--onnx", model, "--scale", scale, "--steps", "1", lr_png, out)
        assert result.returncode == 0, result.stderr
        warnings[scale] = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings["4"] == [] and len(warnings["3"]) == 1
    assert warnings["3"][0].startswith("bdm: warning: upscaling x3, but bdm CPU kernels") and "exported for x4" in \
        warnings["3"][0]
    assert np.asarray(Image.open(tmp_path / "x3.png")).shape == (72, 72, 3)


def test_no_model_upscales_x4_with_the_bundled_demo_model_from_any_folder(lr_png, tmp_path):
    """`bdm upscale in out` alone: the demo model shipped in the package, x4, said in one stderr line; run from
    a folder that is not the repository, with relative paths."""
    (tmp_path / "in.png").write_bytes(lr_png.read_bytes())
    result = run_bdm("upscale", "in.png", "out.png", "--steps", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "bundled demo model" in line]
    assert len(said) == 1 and said[0].startswith("bdm: no model given; using the bundled demo model "
                                                 "bi_diffsr_demo_x4.onnx"), result.stderr
    assert "x4, 3 DDIM steps" in result.stderr and "using x4" not in result.stderr  # scale from the model
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (96, 96, 3)
