"""`bdm validate`'s comparison of a BI-DiffSR export (bdm.export.bidiffsr.validate): Polygraphy's Comparator with
ONNX Runtime and a PyTorch runner; the sign-flip analysis passes a flip at a value within rounding of zero and fails
real errors (a threshold off by more than rounding, a flipped weight bit)."""

import numpy as np
import onnx
import pytest

import bdm
from bdm.errors import BdmError
from bdm.export.base.onnx_graph import write_validated
from bdm.export.bidiffsr import onnx_export, validate
from bdm.plugins import spec
from bdm.runtime.kernel_runner import CpuKernelRunner


@pytest.fixture(scope="module")
def small_model(bi_ref):
    return bdm.load_model(bi_ref / "ckpt_small_x4.pth", config=bi_ref / "ckpt_small_x4.yml")


@pytest.fixture(scope="module")
def small_onnx(small_model):
    return onnx_export.to_onnx(small_model)


def test_group_boundaries_are_the_first_and_last_t_of_every_group():
    assert validate.group_boundaries(5, 2000) == [0, 399, 400, 799, 800, 1199, 1200, 1599, 1600, 1999]
    for k, total in ((7, 1000), (3, 10)):
        ends = validate.group_boundaries(k, total)
        assert [spec.group_index(t, k, total) for t in ends] == [g for g in range(k) for _ in (0, 1)]
        assert all(spec.group_index(t + 1, k, total) == g + 1 for g, t in enumerate(ends[1:-1:2]))


def test_feeds_cover_the_timesteps_and_put_the_other_samples_in_another_group():
    feeds = validate.validation_feeds((3, 16, 24), [0, 1999], np.float16)
    assert [f["t"].tolist() for f in feeds] == [[0, 1000, 1000], [1999, 999, 999]]
    assert feeds[0]["x_t"].shape == (3, 3, 16, 24) and feeds[0]["cond"].dtype == np.float16


def write(model, folder, name):
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def test_comparator_passes_the_export_and_prints_polygraphy_statistics(small_onnx, small_model, tmp_path, capfd):
    lines = []
    report = validate.compare(write(small_onnx, tmp_path, "m.onnx"), small_model, nhw=(1, 16, 16), log=lines.append)
    assert report.passed and report.dtype == "float32" and len(report.cases) == 10
    assert [c.t0 for c in report.cases] == validate.group_boundaries(5, 2000)
    assert [c.group for c in report.cases] == [g for g in range(5) for _ in (0, 1)]
    case_lines = [line for line in lines if "onnxruntime t=" in line]
    assert report.worst() <= 1e-5 and len(case_lines) == 10 and all(line.endswith("PASS") for line in case_lines)
    assert "Accuracy Summary | pytorch vs. onnxruntime" in capfd.readouterr().out


def corrupted(model, initializer, change):
    """A copy of `model` with `change(array)` applied to one initializer."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    tensor = next(i for i in copy.graph.initializer if i.name == initializer)
    tensor.CopyFrom(onnx.numpy_helper.from_array(change(onnx.numpy_helper.to_array(tensor).copy()), initializer))
    return copy


def first_layer_presign(small_model, feed):
    _, values = validate.torch_presign(small_model, feed)
    path, v = next(iter(values.items()))
    return path, v


def nudge_threshold(small_onnx, small_model, feed, scale):
    """Shift one threshold of the first binary layer so that the pre-sign value closest to zero in its channel
    changes sign: a flip at |x+beta| = that value (scale 1.001), or a shift `scale` times larger."""
    path, v = first_layer_presign(small_model, feed)
    closest = np.unravel_index(np.abs(v).argmin(), v.shape)
    g = spec.group_index(int(feed["t"][0]), 5, 2000)
    node = next(node for node in small_onnx.graph.node
                if node.op_type == "BinaryConv2d" and validate.module_path(node.name) == path)

    def shift(table):
        table[g, closest[1]] -= np.float32(v[closest] * scale)
        return table

    return corrupted(small_onnx, node.input[4], shift), abs(v[closest]) / np.abs(v).max()


def test_a_flip_within_rounding_of_zero_passes_with_the_same_signs(small_onnx, small_model, tmp_path,
                                                                   cpu_kernels):
    feed = validate.validation_feeds((1, 32, 32), [1200], np.float32)[0]
    nudged, margin = nudge_threshold(small_onnx, small_model, feed, 1.001)
    assert margin < validate.FLIP_MARGIN["float32"]
    path = write(nudged, tmp_path, "n.onnx")
    report = validate.compare(path, small_model, feeds=[feed], log=print, polygraphy_stats=False,
                              kernels_runner=CpuKernelRunner(path, kernels=cpu_kernels))
    assert [c.runner for c in report.cases] == ["onnxruntime", "cpu-kernels"]
    for case in report.cases:
        assert case.rel > 1e-5  # the flipped sign moves the output far beyond rounding ...
        assert case.flips and case.flips[0].path == "downs.1.res_block.block1.conv" and case.flips[0].flipped >= 1
        assert case.forced_rel <= 1e-5 and case.passed  # ... and with the same signs all else agrees


def test_a_threshold_off_by_more_than_rounding_fails(small_onnx, small_model, tmp_path, cpu_kernels):
    feed = validate.validation_feeds((1, 32, 32), [1200], np.float32)[0]
    path, v = first_layer_presign(small_model, feed)
    shifted, _ = nudge_threshold(small_onnx, small_model, feed, 1.001 * 0.02 * np.abs(v).max() / np.abs(v).min())
    path = write(shifted, tmp_path, "s.onnx")
    report = validate.compare(path, small_model, feeds=[feed], log=print, polygraphy_stats=False,
                              kernels_runner=CpuKernelRunner(path, kernels=cpu_kernels))
    assert len(report.cases) == 2
    for case in report.cases:
        assert not case.passed and "is not rounding" in case.note


def test_a_flipped_weight_bit_fails(small_onnx, small_model, tmp_path):
    node = next(n for n in small_onnx.graph.node if n.op_type == "BinaryConv2d")

    def flip_bit(words):
        words[0, 1, 1, 0] ^= 1
        return words

    broken = corrupted(small_onnx, node.input[2], flip_bit)
    reports = []

    def compare(path):
        reports.append(validate.compare(path, small_model, nhw=(1, 16, 16), timesteps=[0], log=print,
                                        polygraphy_stats=False))
        return reports[-1]

    with pytest.raises(BdmError, match=r"beyond 1e-05 \* max\|eps\| in 1 of 1 cases \(lines above\); no file written"):
        write_validated(broken, tmp_path / "b.onnx", compare)  # as `bdm export` writes its file
    assert list(tmp_path.iterdir()) == []
    (case,) = reports[0].cases
    assert not case.passed and case.forced_rel > 1e-5


def test_probe_reads_onnx_runtimes_signs_in_the_fused_and_the_unfused_form(small_onnx, small_model):
    feed = validate.validation_feeds((2, 16, 16), [700], np.float32)[0]
    fused = validate.OnnxLayerProbe(small_onnx)
    unfused = validate.OnnxLayerProbe(onnx_export.to_onnx(small_model, fused=False))
    y_fused, presign, signs = fused.run(feed)
    y_unfused, presign_unfused, signs_unfused = unfused.run(feed)
    _, reference = validate.torch_presign(small_model, feed)
    assert list(signs) == list(signs_unfused) == list(reference)  # every BIConv, in execution order
    np.testing.assert_array_equal(y_fused, y_unfused)  # the same float32 operations
    for path, ref in reference.items():
        np.testing.assert_array_equal(signs[path], signs_unfused[path])
        assert np.abs(presign[path] - ref).max() <= 1e-5 * np.abs(ref).max()
        assert set(np.unique(signs[path])) <= {-1.0, 0.0, 1.0}


def test_the_kernels_runner_probe_reads_the_signs_onnx_runtime_reads(small_onnx, small_model, tmp_path,
                                                                     cpu_kernels):
    """RunnerLayerProbe (the CPU kernels' pre-sign values, from the node inputs they read) against ONNX Runtime's
    own Sign nodes, fused and unfused."""
    feed = validate.validation_feeds((2, 16, 16), [700], np.float32)[0]
    for model in (small_onnx, onnx_export.to_onnx(small_model, fused=False)):
        path = write(model, tmp_path, "m.onnx")
        ours = validate.RunnerLayerProbe(model, CpuKernelRunner(path, kernels=cpu_kernels)).run(feed)
        theirs = validate.OnnxLayerProbe(model).run(feed)
        assert list(ours[2]) == list(theirs[2])
        assert validate.relative_error(theirs[0], ours[0]) <= 1e-5
        for path_ in theirs[2]:
            assert np.abs(ours[1][path_] - theirs[1][path_]).max() <= 1e-5 * np.abs(theirs[1][path_]).max()
            flipped = ours[2][path_] != theirs[2][path_]
            assert np.abs(theirs[1][path_][flipped]).max(initial=0) <= 1e-5 * np.abs(theirs[1][path_]).max()
