"""`bdm build-engine` and `bdm doctor` on a machine without TensorRT: one clear line, non-zero exit."""

import importlib.util
import subprocess

import pytest

from bdm.runtime.trt_backend import INSTALL_TENSORRT

no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                 reason="TensorRT is installed here")


def run_bdm(*args):
    return subprocess.run(["bdm", *args], capture_output=True, text=True)


@no_tensorrt
def test_doctor_reports_then_says_what_to_install():
    out = run_bdm("doctor")
    assert out.returncode == 2
    assert out.stderr == f"bdm: error: {INSTALL_TENSORRT}\n"
    assert "pip install" in INSTALL_TENSORRT
    for line in ("ONNX Runtime: ", "TensorRT: not installed", "GPU", "kernel library: "):
        assert line in out.stdout


@no_tensorrt
def test_build_engine_without_tensorrt(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not checked before TensorRT is")
    out = run_bdm("build-engine", str(model), str(tmp_path / "model.engine"))
    assert out.returncode == 2 and out.stderr == f"bdm: error: {INSTALL_TENSORRT}\n"
    assert not (tmp_path / "model.engine").exists()


@pytest.mark.parametrize("args, message", [
    (["--min-shape", "1x64"], "--min-shape '1x64' is not NxHxW"),
    (["--max-shape", "1x128x128"], "profile height: need min <= opt <= max"),
    (["--workspace", "0"], "--workspace 0"),
])
def test_build_engine_bad_arguments_are_one_line(tmp_path, args, message):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    out = run_bdm("build-engine", str(model), str(tmp_path / "e.engine"), *args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr


def test_build_engine_missing_model_is_one_line(tmp_path):
    out = run_bdm("build-engine", str(tmp_path / "missing.onnx"), str(tmp_path / "e.engine"))
    assert out.returncode == 2 and "no such ONNX file" in out.stderr and out.stderr.count("\n") == 1
