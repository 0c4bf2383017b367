"""`bdm upscale --ray` through the console script: a list and a pattern of files on the session's Ray cluster
(the same bytes as the local command), Ctrl-C on a Ray started by the command, and bad input as one line."""

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data


def run_bdm(*args, **kwargs):
    return subprocess.run(["bdm", *map(str, args)], capture_output=True, text=True, **kwargs)


def _crops(folder, count, prefix="p", size=24):
    folder.mkdir(parents=True, exist_ok=True)
    astronaut = data.astronaut()
    for i in range(count):
        Image.fromarray(astronaut[80 + 6 * i:80 + 6 * i + size, 180:180 + size]).save(folder / f"{prefix}{i}.png")
    return folder


def _last_line(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_list_and_a_pattern_upscale_on_the_cluster_as_the_local_command_does(ray_cluster, small_x4_onnx,
                                                                                 tmp_path):
    _crops(tmp_path / "in", 2)
    extra = _crops(tmp_path / "more", 1, prefix="q") / "q0.png"
    common = ["--onnx", small_x4_onnx, "--steps", "2", "--seed", "3", "--threads", "1"]
    result = run_bdm("upscale", "--ray", "--ray-address", ray_cluster, "--workers", "2", *common,
                     tmp_path / "in" / "*.png", extra, tmp_path / "ray")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == [str(tmp_path / "ray" / n) for n in ("p0.png", "p1.png", "q0.png")]
    assert "2 Ray workers x 1 CPU thread" in result.stderr and "[3/3] wrote" in result.stderr
    assert "3 upscaled, 0 skipped, 0 failed" in result.stderr and "images/s on 2 workers" in result.stderr
    local = run_bdm("upscale", *common, tmp_path / "in" / "*.png", extra, tmp_path / "local")
    assert local.returncode == 0, local.stderr
    for name in ("p0.png", "p1.png", "q0.png"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_ctrl_c_stops_the_workers_and_leaves_no_partial_file(small_x4_onnx, tmp_path):
    """Without --ray-address the command starts Ray here; Ctrl-C (SIGINT to the terminal's process group) ends
    it with status 130 and only complete images in the output folder."""
    _crops(tmp_path / "in", 4)
    out = tmp_path / "out"
    command = ["bdm", "upscale", "--ray", "--onnx", str(small_x4_onnx), "--steps", "30", "--threads", "1",
               str(tmp_path / "in"), str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = []
    for line in process.stderr:
        log.append(line)
        if line.startswith("[1/4] wrote"):
            os.killpg(process.pid, signal.SIGINT)
            break
    log.append(process.stderr.read())
    assert process.wait(timeout=120) == 130, "".join(log)
    written = sorted(out.iterdir())
    assert 1 <= len(written) < 4 and all(not p.name.startswith(".") for p in written), written
    for path in written:
        assert np.asarray(Image.open(path)).shape == (96, 96, 3)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unreachable", "no ray", "empty folder", "output inside input"])
def test_bad_input_is_one_line_and_writes_nothing(small_x4_onnx, tmp_path, case):
    photos = _crops(tmp_path / "in", 1)
    out = tmp_path / "out"
    args = ["upscale", "--ray", "--onnx", small_x4_onnx, photos, out]
    if case == "unreachable":
        address = f"127.0.0.1:{_closed_port()}"
        line = _last_line(run_bdm(*args, "--ray-address", address))
        assert line.startswith(f"bdm: error: cannot reach the Ray cluster at {address}") and "ray start" in line
    elif case == "no ray":
        hide_ray = ("import sys; sys.modules['ray'] = None; from bdm.cli.main import main; "
                    "main(sys.argv[1:])")
        result = subprocess.run([sys.executable, "-c", hide_ray, *map(str, args)], capture_output=True, text=True)
        assert _last_line(result) == ("bdm: error: running on a Ray cluster needs Ray, which is not installed "
                                      "here; install it with: pip install 'bdm[ray]'")
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        line = _last_line(run_bdm("upscale", "--ray", "--onnx", small_x4_onnx, tmp_path / "empty", out))
        assert line == f"bdm: error: input folder {tmp_path / 'empty'} holds no images (.jpeg, .jpg, .png, " \
                       ".tif, .tiff, .webp)"
    else:
        out = photos / "x4"
        line = _last_line(run_bdm("upscale", "--ray", "--onnx", small_x4_onnx, photos, out))
        assert line.startswith(f"bdm: error: output {out} is inside the input folder {photos}")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) in (["in"], ["empty", "in"])
    assert sorted(p.name for p in photos.iterdir()) == ["p0.png"]
