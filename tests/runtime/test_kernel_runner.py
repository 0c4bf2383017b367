"""CpuKernelRunner (runtime/kernel_runner.py): the exported files of both families against ONNX Runtime with the real
CPU kernels and with the spec's NumPy reference behind the same contract; weights prepared once; the prologue cache;
refusals and the fallback to ONNX Runtime in one line."""

import numpy as np
import onnx
import pytest
from onnx import helper

from bdm.errors import BdmError
from bdm.export.bidiffsr.validate import group_boundaries, validation_feeds
from bdm.runtime import backends
from bdm.runtime.backends import OrtRunner
from bdm.runtime.kernel_runner import CpuKernelRunner, KernelsRefused

from reference_kernels import ReferenceKernels  # tests/runtime

BOUND = 1e-5  # the validation bound: max|ours - onnxruntime| <= 1e-5 * max|onnxruntime|


@pytest.fixture(params=["cpu-kernels", "numpy-reference"])
def kernels(request):
    return request.getfixturevalue("cpu_kernels") if request.param == "cpu-kernels" else ReferenceKernels()


def rel(reference, other):
    return float(np.abs(other - reference).max() / np.abs(reference).max())


def test_bidiffsr_exports_match_onnxruntime_at_every_group_boundary(small_x4_onnx, small_x4_unfused_onnx, kernels):
    feeds = validation_feeds((2, 16, 24), group_boundaries(5, 2000), np.float32)
    for path in (small_x4_onnx, small_x4_unfused_onnx):
        ours, theirs = CpuKernelRunner(path, kernels=kernels), OrtRunner(path)
        errors = [rel(theirs.infer(f)["eps"], ours.infer(f)["eps"]) for f in feeds]
        assert max(errors) <= BOUND, (path.name, errors)


def test_bidiffsr_net_golden_at_every_timestep(bi_ref, small_x4_onnx, small_x4_unfused_onnx, cpu_kernels, capsys):
    """The official network outputs (net_golden: every golden t, and one batch of mixed t where only t[0] selects the
    group) from both export forms on the CPU kernels, within the foundation bound of the official y."""
    g = np.load(bi_ref / "net_golden.npz")
    fused, unfused = (CpuKernelRunner(p, kernels=cpu_kernels) for p in (small_x4_onnx, small_x4_unfused_onnx))
    rows = []
    for i, t in enumerate(g["timesteps"]):
        feed = {"x_t": g["x"], "cond": g["c"], "t": np.full(g["x"].shape[0], t, np.int64)}
        rows.append((int(t), rel(g["y"][i], fused.infer(feed)["eps"]), rel(g["y"][i], unfused.infer(feed)["eps"])))
    mixed = rel(g["y_mixed_t"], fused.infer({"x_t": g["x"], "cond": g["c"], "t": g["mixed_t"].reshape(-1)})["eps"])
    with capsys.disabled():
        print("\n[net_golden, bdm CPU kernels] t: rel err vs official (fused / unfused)")
        for t, a, b in rows:
            print(f"  t={t:<5} {a:.2e} / {b:.2e}")
        print(f"  mixed t {g['mixed_t'].reshape(-1).tolist()}: {mixed:.2e}")
    assert max(max(a, b) for _, a, b in rows) <= BOUND and mixed <= BOUND


@pytest.mark.parametrize("mode", ["static", "w1a32", "fp"])
def test_binarydm_exports_match_onnxruntime(unet_onnx, mode, cpu_kernels):
    """Static mode's codes agree on these feeds; dynamic mode's rounding-level code flips are judged by the
    validation's diagnosis (tests/export/test_onnx_validate.py)."""
    ours, theirs = CpuKernelRunner(unet_onnx[mode], kernels=cpu_kernels), OrtRunner(unet_onnx[mode])
    rng = np.random.default_rng(0)
    for t in (999, 500, 1):
        feed = {"x_t": rng.standard_normal((2, 3, 32, 32), dtype=np.float32), "t": np.array([t, t])}
        assert rel(theirs.infer(feed)["eps"], ours.infer(feed)["eps"]) <= BOUND


def test_weights_are_prepared_once_and_the_prologue_is_cached_per_shape_and_t(small_x4_onnx):
    kernels = ReferenceKernels()
    runner = CpuKernelRunner(small_x4_onnx, kernels=kernels)
    onnx_model = onnx.load(str(small_x4_onnx))
    bdm_nodes = [n for n in onnx_model.graph.node if n.domain == "bdm"]
    assert len(kernels.prepared) == len(bdm_nodes) == 56
    assert all(names == ["alpha", "bias0", "bias1", "slope", "threshold", "weight"]
               for _, _, names in kernels.prepared)
    assert kernels.prepared[0][1] == {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "num_groups": 5,
                                      "total_steps": 2000, "pad_value": 0, "residual": 1}

    calls = []
    plan = runner.plan
    for index in plan.prologue:
        node = plan.nodes[index]
        original = node.fn
        node.fn = lambda *a, original=original, name=node.name: calls.append(name) or original(*a)
    plan._compile()   # the steps pick up the counting functions
    feed = validation_feeds((1, 16, 16), [700], np.float32)[0]
    first = runner.infer(feed)["eps"]
    per_run = len(calls)
    assert per_run == len(plan.prologue) > 100
    assert np.array_equal(runner.infer(feed)["eps"], first) and len(calls) == per_run      # same shapes and t
    other_t = dict(feed, t=np.array([1500]))
    runner.infer(other_t)
    assert len(calls) == 2 * per_run
    larger = validation_feeds((1, 24, 16), [1500], np.float32)[0]
    runner.infer(larger)
    assert len(calls) == 3 * per_run
    assert len(kernels.prepared) == 56


# --- refusals and the fallback --------------------------------------------------------------------------------

def test_a_node_the_kernels_refuse_refuses_the_model_in_one_line(small_x4_onnx):
    with pytest.raises(KernelsRefused, match=r"small_x4.onnx: node /downs.1/res_block/block1/conv/BinaryConv2d "
                                             r"\(BinaryConv2d\): the CPU kernels do not support it: no tiles today$"):
        CpuKernelRunner(small_x4_onnx, kernels=ReferenceKernels(refuse={"BinaryConv2d": "no tiles today"}))


def test_an_fp16_export_and_weights_computed_in_the_graph_are_refused(bi_ref, small_x4_onnx, tmp_path):
    from bdm.export import registry
    from bdm.export.base.family import ExportOptions

    fp16 = tmp_path / "fp16.onnx"
    registry.export_checkpoint(bi_ref / "ckpt_small_x4.pth", fp16, bi_ref / "ckpt_small_x4.yml",
                               ExportOptions(dtype="fp16", validate=False), log=lambda line: None)
    with pytest.raises(KernelsRefused, match="computes in float16; the CPU kernels run float32 exports"):
        CpuKernelRunner(fp16, kernels=ReferenceKernels())
    model = onnx.load(str(small_x4_onnx))
    node = next(n for n in model.graph.node if n.op_type == "BinaryConv2d")
    zero = onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")
    model.graph.initializer.append(zero)
    model.graph.node.insert(0, helper.make_node("ReduceMean", ["x_t"], ["mean"], keepdims=0))
    model.graph.node.insert(1, helper.make_node("Mul", ["mean", "zero"], ["nothing"]))
    model.graph.node.insert(2, helper.make_node("Add", [node.input[3], "nothing"], ["alpha_at_run_time"]))
    node.input[3] = "alpha_at_run_time"
    computed = tmp_path / "computed.onnx"
    onnx.save(model, str(computed))
    with pytest.raises(KernelsRefused, match=r"\(BinaryConv2d\): its input alpha is computed in the graph; the CPU "
                                             r"kernels take it as a weight"):
        CpuKernelRunner(computed, kernels=ReferenceKernels())


def test_onnx_runner_falls_back_to_onnxruntime_with_one_line(small_x4_onnx, monkeypatch, capsys):
    from bdm.runtime import kernel_runner

    def unavailable(threads=None):
        raise KernelsRefused("the bdm CPU kernels cannot load: no C++ compiler")

    monkeypatch.setattr(kernel_runner, "load_kernels", unavailable)
    runner = backends.onnx_runner(small_x4_onnx)
    assert isinstance(runner, OrtRunner)
    assert capsys.readouterr().err.splitlines() == [
        "bdm: the bdm CPU kernels cannot load: no C++ compiler; running it in ONNX Runtime with the function bodies "
        "instead"]


def test_onnx_runner_is_the_kernels_runner_where_they_load(small_x4_onnx, capsys, cpu_kernels):
    runner = backends.onnx_runner(small_x4_onnx)
    assert isinstance(runner, CpuKernelRunner) and capsys.readouterr().err == ""
    assert runner.name == f"bdm CPU kernels ({runner.kernels.isa}, {runner.kernels.threads} threads)"


def test_a_missing_or_broken_file_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(BdmError, match="no such ONNX file"):
        backends.onnx_runner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(BdmError, match="is not an ONNX model") as raised:
        CpuKernelRunner(tmp_path / "junk.onnx", kernels=ReferenceKernels())
    assert not isinstance(raised.value, KernelsRefused)


def test_close_releases_the_plan(small_x4_onnx):
    with CpuKernelRunner(small_x4_onnx, kernels=ReferenceKernels()) as runner:
        runner.infer(validation_feeds((1, 8, 8), [0], np.float32)[0])
    assert runner.plan is None

