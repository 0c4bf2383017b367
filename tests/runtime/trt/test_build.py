"""The engine build's checks and settings that need no TensorRT (runtime/trt/build.py): the plugin-layer count (on
real exported files, with a fake network), the timing cache and the precision (a fake builder config). Building an
engine is checked on a GPU by `python -m bdm.plugins.gpu_check`."""

import onnx
import pytest

from bdm.errors import BdmError
from bdm.runtime.trt import build


class FakeTensorRT:
    """A fake of the TensorRT Python module surface these checks read: its version, LayerType and BuilderFlag."""

    __version__ = "10.16.0.72"

    class LayerType:
        PLUGIN_V3, CONVOLUTION, ELEMENTWISE = "PLUGIN_V3", "CONVOLUTION", "ELEMENTWISE"

    class BuilderFlag:
        TF32 = "TF32"


class FakeNetwork:
    """A fake of INetworkDefinition as check_plugin_layers reads it (num_layers, get_layer(i).type): a parsed
    network of `plugin_layers` PLUGIN_V3 layers among `other_layers` others."""

    def __init__(self, plugin_layers, other_layers):
        self.types = [FakeTensorRT.LayerType.CONVOLUTION] * other_layers + [FakeTensorRT.LayerType.PLUGIN_V3] * plugin_layers
        self.num_layers = len(self.types)

    def get_layer(self, i):
        return type("FakeLayer", (), {"type": self.types[i]})()


@pytest.fixture(scope="module")
def bi_diffsr_onnx(bi_ref, tmp_path_factory):
    """The reduced BI-DiffSR reference checkpoint exported as `bdm export` writes it (fused form)."""
    import bdm
    from bdm.export.bidiffsr import onnx_export

    path = tmp_path_factory.mktemp("bi_diffsr") / "small.onnx"
    model = bdm.load_model(bi_ref / "ckpt_small_x4.pth", config=bi_ref / "ckpt_small_x4.yml")
    path.write_bytes(onnx_export.to_onnx(model).SerializeToString())
    return path


@pytest.mark.parametrize("exported, op_type", [("bi_diffsr_onnx", "BinaryConv2d"),
                                               ("binarydm_onnx", "MultiBasisConv")])
def test_the_parsed_network_must_hold_one_plugin_layer_per_bdm_node(request, exported, op_type):
    path = request.getfixturevalue(exported)
    info = build.onnx_model_info(path)
    model = onnx.load(str(path), load_external_data=False)
    # every binary layer of the real file is one bdm node, of the family's op
    assert info.bdm_nodes == sum(n.op_type == op_type for n in model.graph.node) > 10
    build.check_plugin_layers(FakeTensorRT, FakeNetwork(info.bdm_nodes, 400), info.bdm_nodes, path)
    for plugin_layers in (0, info.bdm_nodes - 1):  # function bodies expanded: all of them, or one node's
        with pytest.raises(BdmError) as err:
            build.check_plugin_layers(FakeTensorRT, FakeNetwork(plugin_layers, 400), info.bdm_nodes, path)
        assert str(err.value) == (f"TensorRT 10.16.0.72 parsed {path} into {plugin_layers} plugin layers for its "
                                  f"{info.bdm_nodes} bdm nodes, so the engine would not run the bdm plugins; export "
                                  "the model again with `bdm export` and build with TensorRT >= 10.7")


class FakeTimingCache:
    def __init__(self, blob):
        self.blob = blob

    def serialize(self):
        return self.blob


class FakeBuilderConfig:
    """A fake of IBuilderConfig's timing-cache and flag surface: create_timing_cache returns None for blobs in
    `unreadable` (and for everything when `no_cache`), set_timing_cache refuses blobs in `foreign` (another GPU or
    TensorRT version), get_timing_cache returns the cache set (or None)."""

    def __init__(self, unreadable=(), foreign=(), no_cache=False):
        self.unreadable, self.foreign, self.no_cache = unreadable, foreign, no_cache
        self.cache, self.cleared = None, []

    def create_timing_cache(self, blob):
        return None if self.no_cache or blob in self.unreadable else FakeTimingCache(bytes(blob) or b"empty")

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        if cache.blob in self.foreign:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def clear_flag(self, flag):
        self.cleared.append(flag)


@pytest.mark.parametrize("stored, config, used, lines", [
    (None, FakeBuilderConfig(), b"empty", 0),                              # first build: an empty cache
    (b"mine", FakeBuilderConfig(), b"mine", 0),                            # the cache of this GPU and TensorRT
    (b"other", FakeBuilderConfig(foreign=[b"other"]), b"empty", 1),        # set_timing_cache returns False
    (b"garbage", FakeBuilderConfig(unreadable=[b"garbage"]), b"empty", 1),  # create_timing_cache returns None
    (b"mine", FakeBuilderConfig(no_cache=True), None, 1),                  # no cache at all: build without
])
def test_timing_cache_falls_back_to_an_empty_one_with_a_line(tmp_path, stored, config, used, lines):
    path = tmp_path / "timing.cache"
    if stored is not None:
        path.write_bytes(stored)
    log = []
    cache = build.attach_timing_cache(config, path, log.append)
    assert (cache.blob if cache else None) == used and config.cache is cache and len(log) == lines
    if lines:
        assert log[0] == ("TensorRT gave no timing cache; building without one" if used is None else
                          f"timing cache {path} was written by another GPU or TensorRT version (or is damaged); "
                          "starting from an empty one, which replaces it after the build")


def test_timing_cache_is_saved_only_when_tensorrt_returns_one(tmp_path):
    path = tmp_path / "cache" / "timing.cache"
    log = []
    assert not build.save_timing_cache(FakeBuilderConfig(), path, log.append)
    assert not path.exists() and log == [f"TensorRT returned no timing cache; {path} is left as it was"]
    config = FakeBuilderConfig()
    config.cache = FakeTimingCache(b"tuned")
    assert build.save_timing_cache(config, path, log.append) and path.read_bytes() == b"tuned"


def test_float32_layers_are_not_computed_in_tf32():
    config = FakeBuilderConfig()
    build.exact_precision(FakeTensorRT, config)
    assert config.cleared == [FakeTensorRT.BuilderFlag.TF32]
