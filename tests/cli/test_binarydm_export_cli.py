"""BinaryDM through the console script: `bdm export` of the official UNet golden (refused for its exact-zero weight,
then exported with --zero-weight-sign in a chosen --mode and validated), `bdm inspect` and `bdm validate` on
the file, and `bdm generate --onnx` against `bdm generate --ckpt` on the same noise."""

import subprocess

import numpy as np
import onnx
import pytest
from PIL import Image

CASE = "unet_cifar_like_w32"
pytestmark = pytest.mark.filterwarnings("ignore:.*sign-0 weights")


def run_bdm(*args):
    return subprocess.run(["bdm", *map(str, args)], capture_output=True, text=True)


def one_error_line(result):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("bdm: error: ")
    return line


@pytest.fixture(scope="module")
def exported(bdm_ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("binarydm") / "unet_w1a32.onnx"
    result = run_bdm("export", bdm_ref / f"{CASE}.pt", out, "--config", bdm_ref / f"{CASE}.json",
                     "--mode", "w1a32", "--zero-weight-sign", "+1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    return out, result.stderr


def test_export_validates_and_records_the_mode(exported):
    path, log = exported
    assert "1 sign-0 weights exported as +1" in log and "validating" in log and "PASS" in log
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["bdm.family"] == "binarydm" and meta["bdm.act_mode"] == "w1a32"
    assert meta["bdm.zero_weight_sign"] == "+1" and '"image_size": 32' in meta["bdm.sampling"]


def test_inspect_counts_the_packed_bases(exported):
    path, _ = exported
    result = run_bdm("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "bdm::MultiBasisConv 96" in result.stdout and "act_mode=w1a32" in result.stdout
    assert "compression ratio" in result.stdout


def test_validate_the_export(exported, bdm_ref):
    path, _ = exported
    result = run_bdm("validate", path, "--ckpt", bdm_ref / f"{CASE}.pt", "--shape", "2x16x16")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASSED" in result.stdout and "w1a32 mode" in result.stdout


def test_generate_with_onnx_runtime_matches_pytorch(exported, bdm_ref, tmp_path):
    path, _ = exported
    ort_png, torch_png = tmp_path / "ort.png", tmp_path / "torch.png"
    result = run_bdm("generate", "--onnx", path, "--num", "2", "--steps", "4", "--seed", "3", ort_png)
    assert result.returncode == 0, result.stderr
    assert "2 samples of 3x32x32, 4 DDIM steps" in result.stderr
    # the PyTorch reference with the same resolution of the exact-zero weight is not a checkpoint on disk: compare
    # with the checkpoint itself, whose only difference is that one sign (w1a32 is well conditioned)
    result = run_bdm("generate", "--ckpt", bdm_ref / f"{CASE}.pt", "--config", bdm_ref / f"{CASE}.json",
                     "--mode", "w1a32", "--num", "2", "--steps", "4", "--seed", "3", "--device", "cpu", torch_png)
    assert result.returncode == 0, result.stderr
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (ort_png, torch_png))
    print(f"[generate w1a32, 4 steps] ONNX Runtime vs PyTorch checkpoint: max |diff| {np.abs(a - b).max()}/255, "
          f"mean {np.abs(a - b).mean():.3f}/255")
    assert a.shape == b.shape == (36, 70, 3) and np.abs(a - b).max() <= 2


@pytest.mark.parametrize("args, text", [
    ([], "basis 1); pass --zero-weight-sign +1 or -1"),
    (["--zero-weight-sign", "+1", "--mode", "w2a4"], "--mode w2a4 is not a BinaryDM mode"),
    (["--zero-weight-sign", "+1", "--act-mode", "w2a4"], "--mode w2a4 is not a BinaryDM mode"),  # the former name
    (["--mode", "static", "--act-mode", "fp"], "--act-mode is the former name of --mode; give one"),
    (["--zero-weight-sign", "+1", "--dtype", "fp16"], "fp16"),
])
def test_bad_exports_are_one_line_without_a_file(bdm_ref, tmp_path, args, text):
    out = tmp_path / "o.onnx"
    line = one_error_line(run_bdm("export", bdm_ref / f"{CASE}.pt", out, "--config", bdm_ref / f"{CASE}.json",
                                  *args))
    assert text in line, line
    assert not out.exists() and not list(tmp_path.glob(".*.part"))


def test_mode_is_refused_for_bi_diffsr(bi_ref, tmp_path):
    line = one_error_line(run_bdm("export", bi_ref / "ckpt_small_x4.pth", tmp_path / "o.onnx", "--config",
                                  bi_ref / "ckpt_small_x4.yml", "--mode", "static"))
    assert "--mode applies to BinaryDM" in line


def test_validate_with_an_engine_needs_tensorrt(exported, bdm_ref, tmp_path):
    """BinaryDM engines are validated like BI-DiffSR ones; without TensorRT (this machine) the request is one line.
    (No engine can be built here: the file only has to exist.)"""
    path, _ = exported
    engine = tmp_path / "unet.engine"
    engine.write_bytes(b"not an engine")
    line = one_error_line(run_bdm("validate", path, "--ckpt", bdm_ref / f"{CASE}.pt", "--shape", "2x16x16",
                                  "--engine", engine))
    assert "--engine" in line and str(engine) in line, line
