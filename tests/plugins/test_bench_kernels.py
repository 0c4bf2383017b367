"""The kernel benchmark's command line: without a GPU one error line and exit 2; with one, a row per layer shape
and a positive time for every contestant (smallest size only: numbers come from running it by hand)."""

import pytest
import torch

from bdm.plugins import bench_kernels


@pytest.mark.parametrize("op, rows", [("binary_conv", len(bench_kernels.BINARY_LAYERS)),
                                      ("multibasis_conv", 2 * len(bench_kernels.MULTIBASIS_LAYERS))])
def test_bench_prints_a_row_per_layer_or_one_error_line(kernels_library, capsys, op, rows):
    status = bench_kernels.main(["--op", op, "--sizes", "64", "--library", str(kernels_library)])
    out, err = capsys.readouterr()
    if not torch.cuda.is_available():
        assert status == 2 and err.strip().splitlines() == [
            "bench_kernels: error: needs a CUDA GPU (torch.cuda.is_available() is False); run it on an NVIDIA GPU "
            "machine with a CUDA build of PyTorch"]
        return
    assert status == 0, err
    table = [line for line in out.splitlines() if "|" in line][1:]
    assert len(table) == rows
    times = [float(v) for line in table for v in line.split("|")[1].split()]
    assert min(times) > 0
