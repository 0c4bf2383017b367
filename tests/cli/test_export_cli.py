"""`bdm export`, `bdm validate`, `bdm inspect` through the command line: success prints the file / the stats, bad
input gives one line, a non-zero exit and no file (not even a temporary one)."""

import importlib.util
import subprocess

import onnx
import pytest
import torch

from bdm.cli import main as cli_main


def run_bdm(*args):
    return subprocess.run(["bdm", *map(str, args)], capture_output=True, text=True)


def run_main(capsys, *args):
    """The console entry point in this process (no interpreter start-up): returncode, stdout, stderr."""
    try:
        cli_main.main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_failure(run, *fragments):
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bdm: error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def small(bi_ref):
    return bi_ref / "ckpt_small_x4.pth", bi_ref / "ckpt_small_x4.yml"


@pytest.fixture(scope="module")
def exported(small, tmp_path_factory):
    ckpt, config = small
    out = tmp_path_factory.mktemp("cli") / "small.onnx"
    run = run_bdm("export", ckpt, out, "--config", config)
    assert run.returncode == 0, run.stderr
    return out, run


def test_export_validates_then_prints_the_file(exported):
    out, run = exported
    assert run.stdout.strip() == str(out)
    assert "validating: ONNX Runtime vs PyTorch" in run.stderr and run.stderr.count("PASS") == 5
    assert "compression" in run.stderr
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["bdm.checkpoint"] == "ckpt_small_x4.pth" and '"inner_channel": 8' in meta["bdm.network_g"]


def test_inspect_prints_census_sizes_and_ratio(exported):
    out, _ = exported
    run = run_bdm("inspect", out)
    assert run.returncode == 0, run.stderr
    assert "bdm::BinaryConv2d 56" in run.stdout and "compression ratio" in run.stdout
    assert "packed floor" in run.stdout and "latent fp32" in run.stdout


def test_validate_uses_the_recorded_network_and_prints_polygraphy_stats(exported, small):
    out, _ = exported
    run = run_bdm("validate", out, "--ckpt", small[0], "--shape", "1x16x16")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Accuracy Summary | pytorch vs. onnxruntime | Passed: 10/10" in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("PASSED: worst error")


def test_validate_compares_the_cpu_kernels_too(exported, small, cpu_kernels):
    out, _ = exported
    run = run_bdm("validate", out, "--ckpt", small[0], "--shape", "1x16x16")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Accuracy Summary | pytorch vs. cpu-kernels | Passed: 10/10" in run.stdout
    assert sum("cpu-kernels t=" in line and line.endswith("PASS") for line in run.stdout.splitlines()) == 10


def test_validate_fails_against_other_weights(exported, small, tmp_path):
    out, _ = exported
    state = torch.load(small[0], weights_only=True)
    state["params"] = {k: v + 0.05 * torch.randn_like(v) for k, v in state["params"].items()}
    other = tmp_path / "other.pth"
    torch.save(state, other)
    run = run_bdm("validate", out, "--ckpt", other, "--shape", "1x16x16")
    assert_one_line_failure(run, "comparisons exceed 1e-05")
    assert "is not the file this model was exported from" in run.stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_validate_engine_without_tensorrt_is_one_line(exported, small, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    run = run_bdm("validate", exported[0], "--ckpt", small[0], "--engine", engine)
    assert_one_line_failure(run, "needs TensorRT")


def bad_ckpt(tmp_path, small):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    return garbage


@pytest.mark.parametrize("case", ["missing ckpt", "garbage ckpt", "wrong config", "not yaml", "missing folder",
                                  "output is a folder", "parent is a file", "bad dtype", "old opset",
                                  "bad zero sign"])
def test_bad_input_is_one_line_and_leaves_no_file(case, small, tmp_path, capsys):
    ckpt, config = small
    out = tmp_path / "out.onnx"
    args = {
        "missing ckpt": (tmp_path / "nope.pth", out, "--config", config),
        "garbage ckpt": (bad_ckpt(tmp_path, small), out, "--config", config),
        "wrong config": (ckpt, out),  # the released network's config for the reduced checkpoint
        "not yaml": (ckpt, out, "--config", ckpt),
        "missing folder": (ckpt, tmp_path / "no" / "out.onnx", "--config", config),
        "output is a folder": (ckpt, tmp_path, "--config", config),
        "parent is a file": (ckpt, config / "out.onnx", "--config", config),
        "bad dtype": (ckpt, out, "--config", config, "--dtype", "int8"),
        "old opset": (ckpt, out, "--config", config, "--opset", "13"),
        "bad zero sign": (ckpt, out, "--config", config, "--zero-weight-sign", "0"),
    }[case]
    before = set(tmp_path.iterdir())
    run = run_main(capsys, "export", *args)
    assert_one_line_failure(run)
    assert set(tmp_path.iterdir()) == before  # no output, no temporary file


def test_exact_zero_weight_is_refused_then_exported_with_a_chosen_sign(small, tmp_path):
    ckpt, config = small
    state = torch.load(ckpt, weights_only=True)
    state["params"]["downs.4.res_block.block2.conv.binary_conv.weight"][7, 3, 2, 0] = 0.0
    zero = tmp_path / "zero.pth"
    torch.save(state, zero)
    out = tmp_path / "zero.onnx"
    run = run_bdm("export", zero, out, "--config", config)
    assert_one_line_failure(run, "downs.4.res_block.block2.conv", "[7, 3, 2, 0]", "--zero-weight-sign")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero.pth"]
    run = run_bdm("export", zero, out, "--config", config, "--zero-weight-sign", "-1", "--no-validate")
    assert run.returncode == 0, run.stderr
    assert "1 sign-0 weights exported as -1" in run.stderr
    # bdm validate reads the resolution from the model and applies it to its PyTorch reference
    assert run_bdm("validate", out, "--ckpt", zero, "--shape", "1x16x16").returncode == 0


def test_unreadable_model_for_inspect_and_validate(small, tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07junk")
    assert_one_line_failure(run_main(capsys, "inspect", junk), "not an ONNX model")
    assert_one_line_failure(run_main(capsys, "inspect", tmp_path / "none.onnx"), "no such ONNX file")
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(plain))
    assert_one_line_failure(run_main(capsys, "validate", plain, "--ckpt", small[0]), "not written by `bdm export`")
