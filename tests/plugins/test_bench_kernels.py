"""The kernel benchmark's command line: the rows it plans from the layer tables; without a GPU one error line and exit
2; with one, exactly the planned rows, each with a positive time for every contestant (smallest size only: numbers
come from running it by hand)."""

import pytest
import torch

from bdm.plugins import bench_kernels

PLANNED = {  # the rows at output size 64: (where, channels, kernel, side, act_bits)
    "binary_conv": [(where, c, k, 64 // div, None) for c, k, div, where in bench_kernels.BINARY_LAYERS],
    "multibasis_conv": [(where, c, 3, 64 // div, bits) for c, div, where in bench_kernels.MULTIBASIS_LAYERS
                        for bits in (4, 8)],
}


def test_rows_cover_every_layer_shape_at_every_size():
    assert bench_kernels.rows("binary_conv", [64]) == PLANNED["binary_conv"]
    assert ("CS-Fusion 512", 512, 1, 8, None) in PLANNED["binary_conv"] and len(PLANNED["binary_conv"]) == 9
    assert bench_kernels.rows("multibasis_conv", [64]) == PLANNED["multibasis_conv"]
    assert [r[3] for r in bench_kernels.rows("binary_conv", [64, 128])][::9] == [64, 128]


@pytest.mark.parametrize("op", sorted(PLANNED))
def test_bench_prints_the_planned_rows_or_one_error_line(kernels_library, capsys, op):
    status = bench_kernels.main(["--op", op, "--sizes", "64", "--library", str(kernels_library)])
    out, err = capsys.readouterr()
    if not torch.cuda.is_available():
        assert status == 2 and out == "" and err.strip().splitlines() == [
            "bench_kernels: error: needs a CUDA GPU (torch.cuda.is_available() is False); run it on an NVIDIA GPU "
            "machine with a CUDA build of PyTorch"]
        return
    assert status == 0, err
    table = [line for line in out.splitlines() if "|" in line][1:]
    assert [line.split()[0] for line in table] == [row[0].split()[0] for row in PLANNED[op]]
    times = [float(v) for line in table for v in line.split("|")[1].split()]
    assert len(table) == len(PLANNED[op]) and min(times) > 0
