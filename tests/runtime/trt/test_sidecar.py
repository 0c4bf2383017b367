"""The engine sidecar and cache of the TensorRT backend (runtime/trt/sidecar.py): round trip, the field a mismatch
names and the rebuild command, one-line errors for bad sidecars, and the engine cache key."""

import json

import pytest

from bdm.contract import SIDECAR_CHECKED, SIDECAR_FORMAT
from bdm.errors import BdmError
from bdm.runtime.trt import sidecar as sc


def sidecar(**changes):
    base = {"format": SIDECAR_FORMAT, "onnx_path": "model.onnx", "onnx_sha256": "a" * 64,
            "tensorrt_version": "11.4.0.106", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
            "plugin_sha256": "b" * 64, "profile": {"min": [1, 64, 64], "opt": [1, 256, 256], "max": [2, 512, 512]},
            "dtype": "float32", "workspace_mb": 4096}
    return dict(base, **changes)


def test_sidecar_round_trip_and_match(tmp_path):
    engine = tmp_path / "model.engine"
    sc.write_sidecar(engine, sidecar())
    assert sc.sidecar_path(engine).name == "model.engine.json"
    current = {k: sidecar()[k] for k in SIDECAR_CHECKED}
    assert sc.check_sidecar(engine, current) == sidecar()


@pytest.mark.parametrize("field, here", [("tensorrt_version", "10.16.0.72"), ("gpu_name", "NVIDIA A100-SXM4-80GB"),
                                         ("compute_capability", "8.0"), ("plugin_sha256", "c" * 64),
                                         ("onnx_sha256", "d" * 64)])
def test_sidecar_mismatch_names_the_field_and_the_rebuild(tmp_path, field, here):
    engine = tmp_path / "model.engine"
    sc.write_sidecar(engine, sidecar())
    current = dict({k: sidecar()[k] for k in SIDECAR_CHECKED}, **{field: here})
    with pytest.raises(BdmError) as err:
        sc.check_sidecar(engine, current)
    message = str(err.value)
    assert f"{field} is {sidecar()[field]!r} in the engine, {here!r} here" in message
    assert f"bdm build-engine model.onnx {engine}" in message and "\n" not in message


def test_fields_this_machine_cannot_tell_are_not_checked(tmp_path):
    engine = tmp_path / "model.engine"
    sc.write_sidecar(engine, sidecar())
    assert sc.sidecar_mismatch(sidecar(), {"gpu_name": sidecar()["gpu_name"]}) is None  # no ONNX given


@pytest.mark.parametrize("content, message", [(None, "has no sidecar"), ("{not json", "is unreadable"),
                                              (json.dumps({"format": 99}), "unknown format")])
def test_bad_sidecar_is_one_line(tmp_path, content, message):
    engine = tmp_path / "model.engine"
    if content is not None:
        sc.sidecar_path(engine).write_text(content)
    with pytest.raises(BdmError, match=message):
        sc.read_sidecar(engine)


def test_engine_cache_key_changes_with_what_changes_the_engine():
    key = sc.engine_cache_key(sidecar())
    assert key == sc.engine_cache_key(sidecar(onnx_path="elsewhere.onnx", gpu_name="same folder decides"))
    for change in ({"onnx_sha256": "e" * 64}, {"plugin_sha256": "f" * 64}, {"dtype": "float16"},
                   {"profile": {"min": [1, 64, 64], "opt": [1, 128, 128], "max": [2, 512, 512]}}):
        assert sc.engine_cache_key(sidecar(**change)) != key
    assert sc.machine_cache_dir("NVIDIA H100 80GB HBM3", "11.4.0.106").name == "NVIDIA-H100-80GB-HBM3-trt11.4.0.106"
