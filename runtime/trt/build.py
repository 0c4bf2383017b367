"""`bdm build-engine`: an exported ONNX file -> a serialized TensorRT engine and its sidecar, both written
atomically; strongly typed, TF32 off, one plugin layer per bdm node, the timing cache loaded and saved, and an engine
built before for the same model, plugins, profile and dtype on this GPU model and TensorRT version reused."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Dict, NamedTuple, Tuple

import numpy as np

from bdm.contract import SIDECAR_FORMAT
from bdm.errors import BdmError
from bdm.files import atomic_path, file_sha256
from bdm.runtime.backends import model_input_names
from bdm.runtime.trt.environment import (MIN_TENSORRT, gpu_identity, import_tensorrt, load_plugins, make_logger,
                                         resolve_plugins)
from bdm.runtime.trt.profile import profile_shapes, recorded_image_size, resolve_profile
from bdm.runtime.trt.sidecar import (engine_cache_key, machine_cache_dir, read_sidecar, sidecar_mismatch,
                                     sidecar_path, write_sidecar)


class OnnxModelInfo(NamedTuple):
    input_names: Tuple[str, ...]  # the bdm inputs (backends.model_input_names)
    metadata: Dict[str, str]      # what `bdm export` recorded
    bdm_nodes: int                # nodes of the bdm domain: the plugin layers an engine must hold


def onnx_model_info(onnx_path) -> OnnxModelInfo:
    """What build_engine needs of an exported ONNX file, read without TensorRT."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError or onnx's own errors, depending on what the file holds
        raise BdmError(f"{onnx_path} cannot be read as ONNX ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                       f"; export it with `bdm export`") from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    names = model_input_names(inputs, [o.name for o in model.graph.output], str(onnx_path),
                              "export it with `bdm export`")
    return OnnxModelInfo(names, {p.key: p.value for p in model.metadata_props}, bdm_node_count(model))


def bdm_node_count(model) -> int:
    """The graph's nodes of the bdm domain (each one should become one plugin layer in TensorRT)."""
    from bdm.plugins import spec

    return sum(1 for node in model.graph.node if node.domain == spec.common()["domain"])

def check_plugin_layers(trt, network, bdm_nodes: int, onnx_path):
    """Before building: one plugin layer per bdm node of the file, else the parser ran function bodies instead of
    the bdm plugins (TensorRT older than 10.7, or nodes without the plugin_namespace attribute)."""
    plugin_layers = sum(1 for i in range(network.num_layers)
                        if network.get_layer(i).type == trt.LayerType.PLUGIN_V3)
    if plugin_layers != bdm_nodes:
        raise BdmError(f"TensorRT {trt.__version__} parsed {onnx_path} into {plugin_layers} plugin layers for its "
                       f"{bdm_nodes} bdm nodes, so the engine would not run the bdm plugins; export the model again "
                       f"with `bdm export` and build with TensorRT >= {'.'.join(map(str, MIN_TENSORRT))}")


def attach_timing_cache(trt_config, path: Path, log=print):
    """Load the timing cache at `path` into a builder config. A cache TensorRT cannot read, or one from another GPU
    or TensorRT version (set_timing_cache refuses it), is left aside for an empty one, with one line; it is replaced
    when the build saves. Returns the cache in use, or None (one line) when TensorRT gives none: the build then runs
    without."""
    blob = path.read_bytes() if path.is_file() else b""
    if blob:
        cache = trt_config.create_timing_cache(blob)
        if cache is not None and trt_config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
    cache = trt_config.create_timing_cache(b"")
    if cache is None or not trt_config.set_timing_cache(cache, ignore_mismatch=False):
        log("TensorRT gave no timing cache; building without one")
        return None
    if blob:
        log(f"timing cache {path} was written by another GPU or TensorRT version (or is damaged); starting from an "
            f"empty one, which replaces it after the build")
    return cache


def save_timing_cache(trt_config, path: Path, log=print) -> bool:
    """Write the builder config's timing cache to `path` atomically; one line and nothing written when TensorRT
    returns none."""
    cache = trt_config.get_timing_cache()
    serialized = cache.serialize() if cache is not None else None
    if serialized is None:
        log(f"TensorRT returned no timing cache; {path} is left as it was")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return True


def exact_precision(trt, trt_config):
    """The ONNX file's precision and nothing else: TensorRT computes float32 layers in TF32 by default (10-bit
    mantissas in the products), which a binarized network turns into flipped signs."""
    trt_config.clear_flag(trt.BuilderFlag.TF32)


def _progress_monitor(trt, stream=sys.stderr):
    """TensorRT's IProgressMonitor as a text progress bar of the innermost phase."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.phases = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = (num_steps, parent_phase)
            self._draw(phase_name, 0)

        def step_complete(self, phase_name, step):
            self._draw(phase_name, step + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.phases.pop(phase_name, None)
            if not self.phases:
                stream.write("\n")

        def _draw(self, phase_name, done):
            total = max(self.phases.get(phase_name, (1, None))[0], 1)
            filled = int(30 * min(done, total) / total)
            stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {phase_name[:40]:<40} {done}/{total}")
            stream.flush()

    return Monitor()


def onnx_input_dims(trt, network) -> Dict[str, Tuple[int, ...]]:
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def build_engine(onnx_path, engine_path, plugins=None, min_shape=None, opt_shape=None, max_shape=None,
                 timing_cache=None, workspace_mb=4096, use_cache=True, log=print) -> Path:
    """`bdm build-engine`: ONNX (with bdm custom nodes; inputs x_t, cond, t or, unconditional, x_t, t) ->
    serialized engine + sidecar, both written atomically. Shapes not given: see resolve_profile.

    Strongly typed: the precision is the ONNX file's (TensorRT 11 has no other mode; on 10 the flag is set), and
    TF32 is off. The parsed network must hold one plugin layer per bdm node (check_plugin_layers).
    The timing cache is loaded and saved (default: one per GPU model and TensorRT version). An engine built
    before for the same model, plugins, profile and dtype on this GPU model and TensorRT version is reused.
    The sidecar keeps the ONNX metadata, which the runner reads as ONNX Runtime's reads the model's."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    # Everything checkable without TensorRT comes first, so bad arguments fail the same way on every machine.
    if not onnx_path.is_file():
        raise BdmError(f"{onnx_path}: no such ONNX file; export one with `bdm export`")
    if workspace_mb < 1:
        raise BdmError(f"--workspace {workspace_mb}: give the builder workspace in MB (>= 1)")
    info = onnx_model_info(onnx_path)
    metadata = info.metadata
    min_nhw, opt_nhw, max_nhw = resolve_profile((min_shape, opt_shape, max_shape), recorded_image_size(metadata))
    trt = import_tensorrt()
    gpu = gpu_identity()
    plugin_library = resolve_plugins(plugins)
    load_plugins(trt, plugin_library)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "onnx_path": str(onnx_path),
        "onnx_sha256": file_sha256(onnx_path),
        "tensorrt_version": trt.__version__,
        **gpu,
        "plugin_library": str(plugin_library),
        "plugin_sha256": file_sha256(plugin_library),
        "profile": {"min": list(min_nhw), "opt": list(opt_nhw), "max": list(max_nhw)},
        "workspace_mb": int(workspace_mb),
        "onnx_metadata": metadata,
    }
    machine_dir = machine_cache_dir(gpu["gpu_name"], trt.__version__)
    timing_cache = Path(timing_cache) if timing_cache else machine_dir / "timing.cache"

    builder_logger = make_logger(trt)
    builder = trt.Builder(builder_logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and int(trt.__version__.split(".")[0]) < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, builder_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BdmError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[0] if errors else 'unknown error'}"
                       f"{' (is the plugin library the one built for this model?)' if 'plugin' in str(errors).lower() else ''}")
    check_plugin_layers(trt, network, info.bdm_nodes, onnx_path)
    dims = onnx_input_dims(trt, network)
    shapes = profile_shapes(dims, min_nhw, opt_nhw, max_nhw)
    sidecar["input_shapes"] = {name: {k: list(v) for k, v in s.items()} for name, s in shapes.items()}
    sidecar["dtype"] = np.dtype(trt.nptype(network.get_input(list(dims).index("x_t")).dtype)).name

    cached_engine = machine_dir / f"{engine_cache_key(sidecar)}.engine"
    if use_cache and cached_engine.is_file() and sidecar_path(cached_engine).is_file():
        recorded = read_sidecar(cached_engine)
        if sidecar_mismatch(recorded, sidecar) is None and recorded.get("input_shapes") == sidecar["input_shapes"]:
            _copy_atomic(cached_engine, engine_path)
            write_sidecar(engine_path, dict(recorded, onnx_path=str(onnx_path), onnx_metadata=metadata))
            log(f"unchanged model: reused the cached engine {cached_engine}")
            return engine_path

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    for name, s in shapes.items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)
    exact_precision(trt, config)
    attach_timing_cache(config, timing_cache, log)
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt)

    log(f"building {engine_path} from {onnx_path} (TensorRT {trt.__version__}, {gpu['gpu_name']}, "
        f"profile {' / '.join('x'.join(map(str, nhw)) for nhw in (min_nhw, opt_nhw, max_nhw))}, {sidecar['dtype']})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = builder_logger.errors[-1] if builder_logger.errors else "no reason given"
        raise BdmError(f"TensorRT could not build an engine from {onnx_path}: {reason}")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    write_sidecar(engine_path, sidecar)
    save_timing_cache(config, timing_cache, log)
    if use_cache:
        machine_dir.mkdir(parents=True, exist_ok=True)
        _copy_atomic(engine_path, cached_engine)
        write_sidecar(cached_engine, sidecar)
    log(f"wrote {engine_path} and {sidecar_path(engine_path).name}; timing cache {timing_cache}")
    return engine_path


def _copy_atomic(src: Path, dst: Path):
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


