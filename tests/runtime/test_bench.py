"""`bdm bench` runs each available backend in its own process and reports time and peak memory."""

import io

from bdm.runtime import bench


def test_bench_reports_the_torch_cpu_backend_on_a_tiny_input():
    stream = io.StringIO()
    results = bench.main(steps=2, size=8, only=["torch-cpu"], stream=stream)
    assert len(results) == 1
    result = results[0]
    assert result["backend"] == "PyTorch (cpu)" and result["output"] == "32x32" and result["steps"] == 2
    assert 0 < result["step_s"] <= result["end_to_end_s"] and result["peak_rss_mib"] > 200  # 205 MB of weights
    assert "s/step" in stream.getvalue() and "peak RSS" in stream.getvalue()
