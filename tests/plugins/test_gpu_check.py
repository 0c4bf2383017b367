"""`python -m bdm.plugins.gpu_check` where it can be checked without a GPU: one error line and exit 2 without one;
the steps' process handling (timeouts kill the whole process group), the table and the exit status; the plan's skips;
and the engine check's model, which must be exact in every runtime: ONNX Runtime's function bodies, the kernels'
host path and the NumPy reference give the same bits here, so a GPU engine has exactly one right answer."""

import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bdm.plugins import gpu_check, kernels, spec
from bdm.runtime import engine_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: gpu_check runs for real here")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("gpu_check: error: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is "
                                 "False); run it on a machine with an NVIDIA GPU, its driver and a CUDA build of "
                                 "PyTorch\n")
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing written


def python_step(name, code, timeout=60, **kwargs):
    return gpu_check.Step(name, [sys.executable, "-c", code], timeout, **kwargs)


def test_steps_pass_fail_time_out_or_skip_and_the_exit_status_follows(tmp_path):
    log_path = tmp_path / "log"
    deadline = time.monotonic() + 120
    steps = [
        python_step("passes", "print('key: 42 shapes')", key=gpu_check.last_key_line),
        python_step("fails", "import sys; print('first'); print('the last line says why'); sys.exit(3)"),
        python_step("hides a failure", "print('SKIPPED [4] no CUDA GPU: the GPU kernels ...')",
                    failure=gpu_check.gpu_tests_skipped),
        # the child leaves a grandchild behind: the whole process group goes
        gpu_check.Step("hangs", ["sh", "-c", "sleep 60 & sleep 60"], timeout=1),
        python_step("not here", "raise SystemExit(1)", skip="TensorRT is not installed"),
    ]
    start = time.monotonic()
    with open(log_path, "w") as log:
        results = [gpu_check.run_step(step, deadline, log) for step in steps]
    assert time.monotonic() - start < 30
    assert [(r.step, r.status, r.key) for r in results] == [
        ("passes", "ok", "42 shapes"), ("fails", "FAIL", "the last line says why"),
        ("hides a failure", "FAIL", "GPU tests skipped: PyTorch sees no GPU in pytest"),
        ("hangs", "timeout", "killed after 1 s"), ("not here", "skip", "TensorRT is not installed")]
    assert "===== fails:" in log_path.read_text() and "the last line says why" in log_path.read_text()
    assert gpu_check.exit_status(results) == 1
    assert gpu_check.exit_status([results[0], results[4]]) == 0
    table = gpu_check.format_table(results).splitlines()
    assert table[0].split() == ["step", "status", "seconds", "key"] and len(table) == 2 + len(results)
    assert table[4].split()[:4] == ["hides", "a", "failure", "FAIL"]


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    with open(tmp_path / "log", "w") as log:
        result = gpu_check.run_step(python_step("late", "print(1)"), time.monotonic() + 1, log)
    assert (result.status, result.key) == ("skip", "no time left in --budget")


def test_key_numbers_from_pytest_and_the_benchmark_tables():
    assert gpu_check.pytest_counts("...\n120 passed, 8 skipped, 1 deselected in 60.2s") == \
        "120 passed, 8 skipped, 1 deselected"
    table = ("GPU: NVIDIA H200, ...\n"
             f"{'layer':<24}{'A':>3} | {'simple':>9}{'TC':>9}{'cuDNN fp16':>11} | {'TC/cuDNN':>8}\n"
             "-----\n"
             "ResBlock 128              4  128 | 10.0 5.0 20.0 |     0.25\n"
             "ResBlock 128              8  128 | 10.0 5.0 20.0 |     0.50\n"
             "ResBlock 256              4  256 | 10.0 5.0 20.0 |     2.00\n")
    assert gpu_check.ratio_median(table, "TC/cuDNN") == "TC/cuDNN median 0.50 (3 shapes)"
    assert gpu_check.ratio_median("bench_kernels: error: ...", "TC/cuDNN") == "no table"


@pytest.mark.parametrize("include, installed, skipped", [
    (None, False, {"build TensorRT plugins", "engine vs ONNX Runtime"}),
    ("/opt/tensorrt/include", False, {"engine vs ONNX Runtime"}),
    (None, True, {"build TensorRT plugins", "engine vs ONNX Runtime"}),  # no headers: no plugin library
    ("/opt/tensorrt/include", True, set()),
])
def test_the_plan_skips_what_this_machine_cannot_do(tmp_path, include, installed, skipped):
    steps = gpu_check.plan(tmp_path, (9, 0), include, installed)
    assert [s.name for s in steps] == ["build kernels", "build TensorRT plugins", "GPU tests", "bench binary_conv",
                                       "bench multibasis_conv", "engine vs ONNX Runtime"]
    assert {s.name for s in steps if s.skip} == skipped
    plugins = next(s for s in steps if s.name == "build TensorRT plugins")
    assert plugins.command[-2:] == ["--cuda-architectures", "90-real"]  # this GPU only: quick
    tests = next(s for s in steps if s.name == "GPU tests")
    assert (gpu_check.HARNESS_TEST_FILE in tests.command) == (include is not None)
    assert tests.env == ({"TENSORRT_INCLUDE_DIR": include} if include else {})


@pytest.fixture(scope="module")
def check():
    layers = engine_check.check_layers()
    return layers, engine_check.check_model(layers)


def test_the_engine_check_model_is_exact_in_onnx_runtime(check):
    layers, model = check
    assert [n.op_type for n in model.graph.node if n.domain == spec.common()["domain"]] == [
        "MultiBasisConv", "BinaryConv2d", "MultiBasisConv"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = []
    for i, (shape, timesteps) in enumerate(engine_check.CHECK_FEEDS):
        feed = engine_check.check_feed(shape, timesteps, seed=i)
        expected = engine_check.reference_output(layers, feed["x_t"], feed["t"])
        (ours,) = session.run(["eps"], feed)
        assert engine_check.same_bits(ours, expected), f"feed {i}"
        assert np.unique(expected).size > 500  # not a degenerate output
        outputs.append(expected)
    # the timestep group matters (a graph replay with a new t must give another output)
    feed = engine_check.check_feed(*engine_check.CHECK_FEEDS[0], seed=0)
    assert not engine_check.same_bits(outputs[0], engine_check.reference_output(layers, feed["x_t"], feed["t"][::-1]))


def test_the_engine_check_model_is_exact_in_the_kernels_host_path(check, kernels_library):
    """The plugins run this very code on the GPU: their result must be these bits."""
    layers, _ = check
    feed = engine_check.check_feed(*engine_check.CHECK_FEEDS[3], seed=3)
    value = feed["x_t"]
    for layer in layers:
        inputs = dict(layer["inputs"])
        if layer["op_type"] == "BinaryConv2d":
            value = kernels.binary_conv2d(value, inputs.pop("weight"), inputs.pop("alpha"),
                                          t=feed["t"].astype(np.int32), library=str(kernels_library), **inputs,
                                          **layer["attributes"])
        else:
            value = kernels.multibasis_conv(value, *inputs.values(), library=str(kernels_library),
                                            **layer["attributes"])
    assert engine_check.same_bits(value, engine_check.reference_output(layers, feed["x_t"], feed["t"]))


def test_main_prints_a_row_per_step_then_the_table_and_writes_it(monkeypatch, tmp_path, capsys):
    """The whole command with the GPU query and the plan replaced (a named stand-in GPU, two quick steps)."""
    monkeypatch.setattr(gpu_check, "gpu_capability", lambda: ("Stand-in GPU", (9, 0)))
    monkeypatch.setattr(gpu_check, "plan", lambda work, capability, include, installed: [
        python_step("quick", "print('key: 1.00x')", key=gpu_check.last_key_line),
        python_step("broken", "raise SystemExit('bench_kernels: error: no library')")])
    assert gpu_check.main(["--out", str(tmp_path), "--tensorrt-include", ""]) == 1
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["GPU"], ["quick"], ["broken"])]
    assert rows == [["GPU", "ok"], ["quick", "ok"], ["broken", "FAIL"]] * 2  # as each ends, then in the table
    assert "Stand-in GPU, compute capability 9.0" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "gpu_check_summary.json",
                                                          "gpu_check_summary.txt"]
    assert "bench_kernels: error: no library" in (tmp_path / "gpu_check_summary.txt").read_text()
