"""`bdm build-engine` and `bdm doctor` on a machine without TensorRT: build-engine fails with one clear line after the
model and profile checks made before TensorRT is needed (on the exported BinaryDM UNet golden); doctor reports what
each backend needs and fails only when asked about one that cannot run."""

import importlib.util
import os
import subprocess

import onnx
import pytest

from bdm.runtime.trt.environment import INSTALL_TENSORRT

no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                 reason="TensorRT is installed here")


def run_bdm(*args):
    return subprocess.run(["bdm", *args], capture_output=True, text=True)


@no_tensorrt
def test_doctor_reports_every_backend_and_exits_0_without_tensorrt():
    out = run_bdm("doctor")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    for line in ("ONNX Runtime: ", "TensorRT: not installed", "GPU", "kernel library: ",
                 "backend pytorch (--ckpt): ready", "backend onnxruntime (--onnx): ready",
                 "backend tensorrt (--engine): not ready, needs: TensorRT >= 10.7 (not installed: `pip install "
                 "'bdm[tensorrt]'` on a machine with an NVIDIA GPU and driver)"):
        assert line in out.stdout


@no_tensorrt
def test_doctor_fails_only_when_asked_about_a_backend_that_cannot_run():
    assert run_bdm("doctor", "--backend", "onnxruntime", "--backend", "pytorch").returncode == 0
    out = run_bdm("doctor", "--backend", "tensorrt")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("bdm: error: backend tensorrt cannot run here; it needs: TensorRT >= 10.7")
    out = run_bdm("doctor", "--backend", "cuda")
    assert out.returncode == 2 and out.stderr == ("bdm: error: --backend cuda: no such backend; choose from pytorch, "
                                                  "onnxruntime, tensorrt\n")


def test_doctor_names_a_plugin_library_that_does_not_load(tmp_path):
    broken = tmp_path / "libbdm_trt_plugins.so"
    broken.write_bytes(b"not a shared object")
    out = subprocess.run(["bdm", "doctor"], capture_output=True, text=True,
                         env=dict(os.environ, BDM_PLUGINS_LIB=str(broken)))
    assert out.returncode == 0
    lines = [line for line in out.stdout.splitlines() if "does not load" in line]
    assert len(lines) == 1 and lines[0].startswith("TensorRT plugin library: does not load: ") and str(broken) in lines[0]
    assert "a plugin library that loads (" in out.stdout


@no_tensorrt
def test_build_engine_without_tensorrt(binarydm_onnx, tmp_path):
    """A real unconditional model with the default profile passes every check made before TensorRT is needed."""
    out = run_bdm("build-engine", str(binarydm_onnx), str(tmp_path / "model.engine"))
    assert out.returncode == 2 and out.stderr == f"bdm: error: {INSTALL_TENSORRT}\n"
    assert not (tmp_path / "model.engine").exists()


@pytest.mark.parametrize("args, message", [
    (["--min-shape", "1x64"], "--min-shape '1x64' is not NxHxW"),
    (["--min-shape", "1x32x32", "--opt-shape", "1x64x64", "--max-shape", "1x48x48"],
     "profile height: need min <= opt <= max, got 32, 64, 48"),
    (["--max-shape", "4x32x32"], "profile batch: need min <= opt <= max, got 1, 16, 4"),  # default opt: 16 samples
    (["--workspace", "0"], "--workspace 0"),
    # BI-DiffSR's tile range leaves out the 32x32 images this model samples
    (["--min-shape", "1x64x64", "--opt-shape", "1x256x256", "--max-shape", "1x512x512"],
     "the model samples 32x32 images (`bdm generate`), outside the profile (H 64 to 512, W 64 to 512); give shapes "
     "that contain it, e.g. --min-shape 1x32x32 --opt-shape 16x32x32 --max-shape 16x32x32"),
])
def test_build_engine_bad_arguments_are_one_line(binarydm_onnx, tmp_path, args, message):
    out = run_bdm("build-engine", str(binarydm_onnx), str(tmp_path / "e.engine"), *args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_build_engine_refuses_what_is_not_a_bdm_model(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an ONNX file")
    other = tmp_path / "other.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "other",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), other)
    for model, message in ((garbage, f"{garbage} cannot be read as ONNX"),
                           (other, f"{other} has inputs ['x'] and outputs ['y']; a bdm model has inputs")):
        out = run_bdm("build-engine", str(model), str(tmp_path / "e.engine"))
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_build_engine_missing_model_is_one_line(tmp_path):
    out = run_bdm("build-engine", str(tmp_path / "missing.onnx"), str(tmp_path / "e.engine"))
    assert out.returncode == 2 and "no such ONNX file" in out.stderr and out.stderr.count("\n") == 1


def test_doctor_names_the_cpu_path_and_its_instruction_set_or_why_not():
    from bdm.plugins import cpu_kernels

    try:
        isa = cpu_kernels.load().isa
    except cpu_kernels.CpuKernelsUnavailable as e:
        isa = None
        reason = str(e)
    lines = run_bdm("doctor").stdout.splitlines()
    expected = (f"CPU path: bdm CPU kernels, instruction set {isa}, " if isa else
                f"CPU path: ONNX Runtime with the function bodies (the bdm CPU kernels cannot load: {reason})")
    assert any(line.startswith(expected) for line in lines), lines
    forced = subprocess.run(["bdm", "doctor"], capture_output=True, text=True,
                            env=dict(os.environ, BDM_CPU_ISA="sse9"))
    assert any(line.startswith("CPU path: ONNX Runtime with the function bodies (the bdm CPU kernels cannot load: "
                               "BDM_CPU_ISA=sse9 is not an instruction-set path")
               for line in forced.stdout.splitlines())
