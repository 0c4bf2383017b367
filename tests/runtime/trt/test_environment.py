"""This machine's TensorRT as the backend checks it (runtime/trt/environment.py): the plugin library's TensorRT
major and the TensorRT version floor."""

import pytest

from bdm.errors import BdmError
from bdm.runtime.trt import environment


def test_plugin_library_built_for_another_major_is_refused(tmp_path):
    library = tmp_path / "libbdm_trt_plugins.so"
    library.write_bytes(b"")
    (tmp_path / "bdm_trt_plugins.version").write_text("10.16.0.72\n")
    environment.check_plugin_major(library, "10.13.0.35")
    with pytest.raises(BdmError, match="compiled against TensorRT 10.16.0.72 headers, the installed TensorRT is 11"):
        environment.check_plugin_major(library, "11.4.0.106")


@pytest.mark.parametrize("version, ok", [("10.6.0.26", False), ("10.0.1.6", False), ("8.6.1", False),
                                         ("10.7.0.23", True), ("10.16.0.72", True), ("11.4.0.106", True)])
def test_tensorrt_before_10_7_is_refused(version, ok):
    """Before 10.7 TensorRT's ONNX parser always runs a node's model-local function, never the registered plugin."""
    if ok:
        environment.check_tensorrt_version(version)
        return
    with pytest.raises(BdmError) as err:
        environment.check_tensorrt_version(version)
    assert str(err.value) == (f"TensorRT {version} is installed; bdm needs 10.7 or newer, whose ONNX parser uses the "
                              "bdm plugins (older ones run the nodes' function bodies instead): pip install "
                              "'tensorrt>=10.7'")
