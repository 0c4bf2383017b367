"""`bdm upscale --ray` jobs (runtime/cluster.py) on the session's local Ray cluster (2 CPUs), with the reduced
checkpoint in ONNX Runtime, against the local job on real images."""

import functools
import io

import pytest
from PIL import Image
from skimage import data

from bdm.errors import BdmError
from bdm.runtime.backends import make_runner
from bdm.runtime.cluster import RayWorkers, cpu_layout
from bdm.runtime.upscale import UpscaleSettings, run_job


def _onnx_factory(onnx):
    """The factory the command line builds its runners with, for an ONNX model."""
    return functools.partial(make_runner, None, onnx, None, None, None, None)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    astronaut = data.astronaut()
    Image.fromarray(astronaut[80:104, 180:204]).save(folder / "a.png")
    Image.fromarray(astronaut[100:116, 150:182]).save(folder / "b.png")  # 32 x 16
    Image.fromarray(astronaut[60:84, 200:216]).save(folder / "c.jpg", quality=90)
    (folder / "d.png").write_bytes(b"\x89PNG broken")
    return folder


def test_cluster_job_writes_what_the_local_job_writes_bit_for_bit(ray_cluster, small_x4_onnx, photos, tmp_path):
    settings = UpscaleSettings(steps=3, seed=5)
    run_job(_onnx_factory(small_x4_onnx)(threads=1), photos, tmp_path / "local", settings, io.StringIO())
    log, again = io.StringIO(), io.StringIO()
    with RayWorkers(_onnx_factory(small_x4_onnx), workers=2, threads=1) as workers:
        assert workers.describe().endswith("; 2 Ray workers x 1 CPU thread")
        summary = workers.run_job(photos, tmp_path / "ray", settings, log)
        resumed = workers.run_job(photos, tmp_path / "ray", settings, again)
    assert sorted(p.name for p in summary.written) == ["a.png", "b.png", "c.png"]
    for target in summary.written:  # the same noise from the seed, the same runner, one thread: the same bytes
        assert target.read_bytes() == (tmp_path / "local" / target.name).read_bytes(), target.name
    text = log.getvalue()
    # the broken file is retried once, then listed; the others went on
    assert [p.name for p, _ in summary.failed] == ["d.png"] and "not a readable image" in summary.failed[0][1]
    assert text.count("d.png failed") == 1 and "will be retried" in text and "[4/4]" in text
    assert "3 upscaled, 0 skipped, 1 failed" in text and "images/s on 2 workers" in text
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["a.png", "b.png", "c.png"]  # no temporaries
    # resume: the outputs that exist are kept
    assert len(resumed.skipped) == 3 and not resumed.written and "exists, skipped" in again.getvalue()


def test_a_model_that_fails_to_load_is_one_error(ray_cluster, tmp_path):
    with pytest.raises(BdmError, match=f"--onnx {tmp_path / 'missing.onnx'}: no such ONNX file"):
        RayWorkers(_onnx_factory(tmp_path / "missing.onnx"), workers=1, threads=1)


def test_cpu_layout_shares_the_cores():
    assert cpu_layout(2, None, None) == (2, 1)   # one single-threaded worker per core
    assert cpu_layout(8, 2, None) == (2, 4)
    assert cpu_layout(8, None, 3) == (2, 3)
    with pytest.raises(BdmError, match="3 workers with 1 thread each need 3 CPUs and the Ray cluster has 2"):
        cpu_layout(2, 3, 1)
