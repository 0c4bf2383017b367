"""The TrtRunner's per-shape cache and CUDA graph order (runtime/trt/runner.py), with fakes. What runs an engine
is checked on a GPU by `python -m bdm.plugins.gpu_check`."""

import pytest

from bdm.errors import BdmError
from bdm.runtime.trt import runner


def test_shape_cache_keeps_the_most_recently_used_shapes_and_releases_the_others():
    released = []
    cache = runner.ShapeCache(2, released.append)
    made = []

    def create(key):
        made.append(key)
        return f"state {key}"

    for key in ("64x64", "96x64", "64x64", "128x128"):
        assert cache.get(key, lambda: create(key)) == f"state {key}"
    assert made == ["64x64", "96x64", "128x128"] and released == ["state 96x64"]
    assert cache.keys() == ["64x64", "128x128"]

    def refuse():
        raise BdmError("outside the profile")

    with pytest.raises(BdmError):
        cache.get("4096x4096", refuse)
    assert cache.keys() == ["64x64", "128x128"] and released == ["state 96x64"]  # a refused shape evicts nothing
    cache.clear()
    assert released == ["state 96x64", "state 64x64", "state 128x128"] and cache.keys() == []
    with pytest.raises(BdmError, match="keep at least one"):
        runner.ShapeCache(0, released.append)


class RecordingGraph:
    def __init__(self, recorded):
        self.recorded, self.replays = recorded, 0

    def replay(self):
        self.replays += 1


def test_a_shape_runs_eagerly_then_is_captured_right_after_then_replayed():
    enqueues = []
    graphs = []

    def capture(enqueue):
        enqueue()  # what a capture records; nothing runs
        graphs.append(RecordingGraph(len(enqueues)))
        return graphs[-1]

    execution = runner.GraphedExecution(lambda: enqueues.append("enqueue"), capture, warn=pytest.fail)
    assert [execution.run() for _ in range(3)] == ["eager+capture", "replay", "replay"]
    assert len(enqueues) == 2 and graphs[0].recorded == 2 and graphs[0].replays == 2  # eager, then captured


def test_a_failed_capture_leaves_the_shape_eager_with_one_line():
    enqueues, lines = [], []

    def capture(enqueue):
        raise runner.CaptureFailed("operation not permitted when stream is capturing")

    execution = runner.GraphedExecution(lambda: enqueues.append("enqueue"), capture, warn=lines.append,
                                    label="input shape x_t [1, 3, 64, 64]")
    assert [execution.run() for _ in range(3)] == ["eager", "eager", "eager"]
    assert len(enqueues) == 3 and lines == [
        "bdm: CUDA graph capture failed for input shape x_t [1, 3, 64, 64] (operation not permitted when stream is "
        "capturing); running it without a graph"]
    assert runner.GraphedExecution(lambda: enqueues.append("enqueue")).run() == "eager"  # graphs off
