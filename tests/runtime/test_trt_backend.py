"""The parts of the TensorRT backend that need no TensorRT: the input names an engine may have, profile shapes
(conditional and unconditional models), the engine sidecar check, the engine cache key, the plugin-library/TensorRT
major check, the TensorRT version floor, the plugin-layer count (on real exported files, with a fake network), the
timing cache and precision settings (a fake builder config), and the TrtRunner's per-shape cache and CUDA graph
order. What runs an engine is checked on a GPU by `python -m bdm.plugins.gpu_check`."""

import json

import onnx
import pytest

from bdm.errors import BdmError
from bdm.runtime import trt_backend as tb
from bdm.runtime.backends import INPUT_NAMES, UNCONDITIONAL_INPUT_NAMES, Runner, model_input_names

ONNX_DIMS = {"x_t": (-1, 3, -1, -1), "cond": (-1, 3, -1, -1), "t": (-1,)}
UNCONDITIONAL_DIMS = {"x_t": (-1, 3, -1, -1), "t": (-1,)}  # BinaryDM's export: N, H, W dynamic


def sidecar(**changes):
    base = {"format": tb.SIDECAR_FORMAT, "onnx_path": "model.onnx", "onnx_sha256": "a" * 64,
            "tensorrt_version": "11.4.0.106", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
            "plugin_sha256": "b" * 64, "profile": {"min": [1, 64, 64], "opt": [1, 256, 256], "max": [2, 512, 512]},
            "dtype": "float32", "workspace_mb": 4096}
    return dict(base, **changes)


@pytest.mark.parametrize("text, nhw", [("1x64x64", (1, 64, 64)), (" 2X256x128 ", (2, 256, 128))])
def test_parse_nhw(text, nhw):
    assert tb.parse_nhw(text) == nhw


@pytest.mark.parametrize("text, message", [("64x64", "is not NxHxW"), ("1x60x64", "multiples of 8"),
                                           ("0x64x64", "batch must be >= 1"), ("1x64x64x3", "is not NxHxW")])
def test_parse_nhw_refuses(text, message):
    with pytest.raises(BdmError, match=message):
        tb.parse_nhw(text, "--opt-shape")


def test_profile_shapes_follow_the_onnx_inputs():
    shapes = tb.profile_shapes(ONNX_DIMS, (1, 64, 64), (1, 256, 192), (2, 512, 512))
    assert shapes["x_t"] == {"min": (1, 3, 64, 64), "opt": (1, 3, 256, 192), "max": (2, 3, 512, 512)}
    assert shapes["t"] == {"min": (1,), "opt": (1,), "max": (2,)}
    with pytest.raises(BdmError, match="axis 1 is dynamic"):
        tb.profile_shapes({"x_t": (-1, -1, -1, -1)}, (1, 64, 64), (1, 64, 64), (1, 64, 64))
    with pytest.raises(BdmError, match="need min <= opt <= max"):
        tb.profile_shapes(ONNX_DIMS, (1, 64, 64), (1, 32, 64), (1, 64, 64))


@pytest.mark.parametrize("inputs, names", [
    (["t", "cond", "x_t"], INPUT_NAMES),                 # engine order does not matter: INPUT_NAMES order
    (["x_t", "cond", "t"], INPUT_NAMES),
    (["t", "x_t"], UNCONDITIONAL_INPUT_NAMES),
])
def test_model_input_names_in_input_names_order(inputs, names):
    assert model_input_names(inputs, ["eps"], "engine e.engine", "rebuild it") == names


@pytest.mark.parametrize("inputs, outputs", [
    (["x_t", "cond"], ["eps"]),                          # no t
    (["x_t", "cond", "t", "extra"], ["eps"]),            # an input bdm cannot feed
    (["x_t"], ["eps"]),
    (["x_t", "t"], ["y"]),                               # no eps
])
def test_model_input_names_refuses_other_layouts(inputs, outputs):
    with pytest.raises(BdmError) as err:
        model_input_names(inputs, outputs, "engine e.engine", "rebuild it")
    assert str(err.value) == (f"engine e.engine has inputs {inputs} and outputs {outputs}; a bdm model has inputs "
                              "['x_t', 'cond', 't'] (unconditional: ['x_t', 't']) and output 'eps' (rebuild it)")


def test_unconditional_profile_shapes():
    shapes = tb.profile_shapes(UNCONDITIONAL_DIMS, *tb.resolve_profile((None, None, None), image_size=32))
    assert shapes == {"x_t": {"min": (1, 3, 32, 32), "opt": (16, 3, 32, 32), "max": (16, 3, 32, 32)},
                      "t": {"min": (1,), "opt": (16,), "max": (16,)}}


def test_resolve_profile_defaults_and_the_image_size():
    assert tb.resolve_profile((None, None, None)) == ((1, 64, 64), (1, 256, 256), (1, 512, 512))
    assert tb.resolve_profile((None, None, "4x512x1024")) == ((1, 64, 64), (1, 256, 256), (4, 512, 1024))
    # a model that samples one size: the defaults are that size; a range around it is accepted
    assert tb.resolve_profile((None, None, None), 256) == ((1, 256, 256), (16, 256, 256), (16, 256, 256))
    assert tb.resolve_profile(("1x16x16", "4x32x32", "8x64x64"), 32) == ((1, 16, 16), (4, 32, 32), (8, 64, 64))
    with pytest.raises(BdmError, match=r"samples 32x32 images .*outside the profile \(H 40 to 64, W 16 to 64\)"):
        tb.resolve_profile(("1x40x16", "1x48x32", "1x64x64"), 32)
    with pytest.raises(BdmError, match=r"--opt-shape '2x32' is not NxHxW"):
        tb.resolve_profile((None, "2x32", None), 32)
    assert tb.recorded_image_size({"bdm.sampling": '{"channels": 3, "image_size": 32, "space": "pixel"}'}) == 32
    assert tb.recorded_image_size({"bdm.family": "bi_diffsr"}) is None


def test_sidecar_round_trip_and_match(tmp_path):
    engine = tmp_path / "model.engine"
    tb.write_sidecar(engine, sidecar())
    assert tb.sidecar_path(engine).name == "model.engine.json"
    current = {k: sidecar()[k] for k in tb.SIDECAR_CHECKED}
    assert tb.check_sidecar(engine, current) == sidecar()


@pytest.mark.parametrize("field, here", [("tensorrt_version", "10.16.0.72"), ("gpu_name", "NVIDIA A100-SXM4-80GB"),
                                         ("compute_capability", "8.0"), ("plugin_sha256", "c" * 64),
                                         ("onnx_sha256", "d" * 64)])
def test_sidecar_mismatch_names_the_field_and_the_rebuild(tmp_path, field, here):
    engine = tmp_path / "model.engine"
    tb.write_sidecar(engine, sidecar())
    current = dict({k: sidecar()[k] for k in tb.SIDECAR_CHECKED}, **{field: here})
    with pytest.raises(BdmError) as err:
        tb.check_sidecar(engine, current)
    message = str(err.value)
    assert f"{field} is {sidecar()[field]!r} in the engine, {here!r} here" in message
    assert f"bdm build-engine model.onnx {engine}" in message and "\n" not in message


def test_fields_this_machine_cannot_tell_are_not_checked(tmp_path):
    engine = tmp_path / "model.engine"
    tb.write_sidecar(engine, sidecar())
    assert tb.sidecar_mismatch(sidecar(), {"gpu_name": sidecar()["gpu_name"]}) is None  # no ONNX given


@pytest.mark.parametrize("content, message", [(None, "has no sidecar"), ("{not json", "is unreadable"),
                                              (json.dumps({"format": 99}), "unknown format")])
def test_bad_sidecar_is_one_line(tmp_path, content, message):
    engine = tmp_path / "model.engine"
    if content is not None:
        tb.sidecar_path(engine).write_text(content)
    with pytest.raises(BdmError, match=message):
        tb.read_sidecar(engine)


def test_engine_cache_key_changes_with_what_changes_the_engine():
    key = tb.engine_cache_key(sidecar())
    assert key == tb.engine_cache_key(sidecar(onnx_path="elsewhere.onnx", gpu_name="same folder decides"))
    for change in ({"onnx_sha256": "e" * 64}, {"plugin_sha256": "f" * 64}, {"dtype": "float16"},
                   {"profile": {"min": [1, 64, 64], "opt": [1, 128, 128], "max": [2, 512, 512]}}):
        assert tb.engine_cache_key(sidecar(**change)) != key
    assert tb.machine_cache_dir("NVIDIA H100 80GB HBM3", "11.4.0.106").name == "NVIDIA-H100-80GB-HBM3-trt11.4.0.106"


def test_plugin_library_built_for_another_major_is_refused(tmp_path):
    library = tmp_path / "libbdm_trt_plugins.so"
    library.write_bytes(b"")
    (tmp_path / "bdm_trt_plugins.version").write_text("10.16.0.72\n")
    tb.check_plugin_major(library, "10.13.0.35")
    with pytest.raises(BdmError, match="compiled against TensorRT 10.16.0.72 headers, the installed TensorRT is 11"):
        tb.check_plugin_major(library, "11.4.0.106")


@pytest.mark.parametrize("version, ok", [("10.6.0.26", False), ("10.0.1.6", False), ("8.6.1", False),
                                         ("10.7.0.23", True), ("10.16.0.72", True), ("11.4.0.106", True)])
def test_tensorrt_before_10_7_is_refused(version, ok):
    """Before 10.7 TensorRT's ONNX parser always runs a node's model-local function, never the registered plugin."""
    if ok:
        tb.check_tensorrt_version(version)
        return
    with pytest.raises(BdmError) as err:
        tb.check_tensorrt_version(version)
    assert str(err.value) == (f"TensorRT {version} is installed; bdm needs 10.7 or newer, whose ONNX parser uses the "
                              "bdm plugins (older ones run the nodes' function bodies instead): pip install "
                              "'tensorrt>=10.7'")


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
    info = tb.onnx_model_info(path)
    model = onnx.load(str(path), load_external_data=False)
    # every binary layer of the real file is one bdm node, of the family's op
    assert info.bdm_nodes == sum(n.op_type == op_type for n in model.graph.node) > 10
    tb.check_plugin_layers(FakeTensorRT, FakeNetwork(info.bdm_nodes, 400), info.bdm_nodes, path)
    for plugin_layers in (0, info.bdm_nodes - 1):  # function bodies expanded: all of them, or one node's
        with pytest.raises(BdmError) as err:
            tb.check_plugin_layers(FakeTensorRT, FakeNetwork(plugin_layers, 400), info.bdm_nodes, path)
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
    cache = tb.attach_timing_cache(config, path, log.append)
    assert (cache.blob if cache else None) == used and config.cache is cache and len(log) == lines
    if lines:
        assert log[0] == ("TensorRT gave no timing cache; building without one" if used is None else
                          f"timing cache {path} was written by another GPU or TensorRT version (or is damaged); "
                          "starting from an empty one, which replaces it after the build")


def test_timing_cache_is_saved_only_when_tensorrt_returns_one(tmp_path):
    path = tmp_path / "cache" / "timing.cache"
    log = []
    assert not tb.save_timing_cache(FakeBuilderConfig(), path, log.append)
    assert not path.exists() and log == [f"TensorRT returned no timing cache; {path} is left as it was"]
    config = FakeBuilderConfig()
    config.cache = FakeTimingCache(b"tuned")
    assert tb.save_timing_cache(config, path, log.append) and path.read_bytes() == b"tuned"


def test_float32_layers_are_not_computed_in_tf32():
    config = FakeBuilderConfig()
    tb.exact_precision(FakeTensorRT, config)
    assert config.cleared == [FakeTensorRT.BuilderFlag.TF32]


def test_shape_cache_keeps_the_most_recently_used_shapes_and_releases_the_others():
    released = []
    cache = tb.ShapeCache(2, released.append)
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
        tb.ShapeCache(0, released.append)


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

    execution = tb.GraphedExecution(lambda: enqueues.append("enqueue"), capture, warn=pytest.fail)
    assert [execution.run() for _ in range(3)] == ["eager+capture", "replay", "replay"]
    assert len(enqueues) == 2 and graphs[0].recorded == 2 and graphs[0].replays == 2  # eager, then captured


def test_a_failed_capture_leaves_the_shape_eager_with_one_line():
    enqueues, lines = [], []

    def capture(enqueue):
        raise tb.CaptureFailed("operation not permitted when stream is capturing")

    execution = tb.GraphedExecution(lambda: enqueues.append("enqueue"), capture, warn=lines.append,
                                    label="input shape x_t [1, 3, 64, 64]")
    assert [execution.run() for _ in range(3)] == ["eager", "eager", "eager"]
    assert len(enqueues) == 3 and lines == [
        "bdm: CUDA graph capture failed for input shape x_t [1, 3, 64, 64] (operation not permitted when stream is "
        "capturing); running it without a graph"]
    assert tb.GraphedExecution(lambda: enqueues.append("enqueue")).run() == "eager"  # graphs off


def test_runners_are_context_managers_that_close():
    closed = []

    class Holder(Runner):
        def close(self):
            closed.append(self)

    with Holder() as runner:
        pass
    assert closed == [runner]
