"""`bdm bench` runs each available backend in its own process and reports time and peak memory."""

import io

from bdm.export.bidiffsr.network import build_bidiffsr
from bdm.runtime import bench


def test_bench_reports_the_torch_cpu_backend_on_a_tiny_input():
    stream = io.StringIO()
    results = bench.main(steps=2, size=8, only=["torch-cpu"], stream=stream)
    assert len(results) == 1
    result = results[0]
    assert result["backend"] == "PyTorch (cpu)" and result["output"] == "32x32" and result["steps"] == 2
    # the process held the network's weights (built on the meta device here: sizes only)
    weights_mib = 4 * sum(p.numel() for p in build_bidiffsr(None, device="meta").parameters()) / 2 ** 20
    assert 0 < result["step_s"] <= result["end_to_end_s"] and result["peak_rss_mib"] >= weights_mib
    assert "s/step" in stream.getvalue() and "peak RSS" in stream.getvalue()
