"""TensorRT backend: build an engine from an exported ONNX file (`bdm build-engine`), check that an engine
fits this machine (its JSON sidecar), and run it (`TrtRunner`, the backends.Runner interface). Both input layouts
of backends.py are served: a conditional model (BI-DiffSR: x_t, cond, t; any image size, tiled) and an
unconditional one (BinaryDM: x_t, t; the profile defaults to the image size its export records).

The engine and its plugin library are tied to one GPU model and one TensorRT version. Each engine therefore
carries a sidecar `<engine>.json` (ONNX hash, TensorRT version, GPU name and compute capability, profile shapes,
dtype, plugin library hash); a mismatch is reported naming the field and the command that rebuilds it. Built
engines are also cached per (GPU model, TensorRT version) and keyed by everything in the sidecar, so an
unchanged model is never rebuilt.

Only `import_tensorrt` and what calls it need TensorRT; the sidecar, shape and cache logic are plain Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from collections import OrderedDict
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from bdm.contract import OUTPUT_NAME, SAMPLING_KEY, SIDECAR_CACHE_KEY, SIDECAR_CHECKED, SIDECAR_FORMAT
from bdm.errors import BdmError
from bdm.files import atomic_path, file_sha256
from bdm.runtime.backends import Limits, Runner, model_input_names
from bdm.runtime.generate import GenerateSettings

# TensorRT's ONNX parser prefers a registered plugin over a node's model-local function from 10.7 on (its changelog,
# 10.7.0); 10.0 to 10.6 always expand the function body, so an engine would hold no bdm plugin.
MIN_TENSORRT = (10, 7)
INSTALL_TENSORRT = ("TensorRT is not installed: on a machine with an NVIDIA GPU and driver, "
                    "`pip install 'bdm[tensorrt]'` (the tensorrt wheel, 10.7 or newer)")

Shape = Tuple[int, ...]
NHW = Tuple[int, int, int]
PROFILE_OPTIONS = ("--min-shape", "--opt-shape", "--max-shape")
# Input shapes a TrtRunner keeps buffers, a context and a CUDA graph for (least recently used ones go first): the
# whole-image shape and a few tile shapes of one image.
DEFAULT_MAX_SHAPES = 4
# A conditional (BI-DiffSR) model upscales images of any size, in tiles that fit this range.
CONDITIONAL_PROFILE = ("1x64x64", "1x256x256", "1x512x512")


# ---- pure helpers ----------------------------------------------------------------------------------------

def parse_nhw(text: str, option: str = "--shape") -> Tuple[int, int, int]:
    """'1x64x64' -> (1, 64, 64): batch, height, width of the image inputs."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m:
        raise BdmError(f"{option} {text!r} is not NxHxW (e.g. 1x256x256)")
    n, h, w = (int(v) for v in m.groups())
    if n < 1 or h < 8 or w < 8 or h % 8 or w % 8:
        raise BdmError(f"{option} {text}: batch must be >= 1 and H, W multiples of 8 (the UNet downsamples 3 times)")
    return n, h, w


def check_profile(min_nhw, opt_nhw, max_nhw):
    """min <= opt <= max in every dimension."""
    for i, name in enumerate(("batch", "height", "width")):
        if not min_nhw[i] <= opt_nhw[i] <= max_nhw[i]:
            raise BdmError(f"profile {name}: need min <= opt <= max, got {min_nhw[i]}, {opt_nhw[i]}, {max_nhw[i]}; "
                           f"fix --min-shape / --opt-shape / --max-shape")


def unconditional_profile(image_size: int) -> Tuple[str, str, str]:
    """An unconditional model (BinaryDM) samples at its image size S: 1xSxS up to bdm generate's default call
    (all of its default --num samples at once), which TensorRT optimises for."""
    batch, side = GenerateSettings.num, image_size
    return f"1x{side}x{side}", f"{batch}x{side}x{side}", f"{batch}x{side}x{side}"


def resolve_profile(shapes: Sequence[Optional[str]], image_size: Optional[int] = None) -> Tuple[NHW, NHW, NHW]:
    """min / opt / max (batch, H, W) from the --min/--opt/--max-shape texts (None: not given). The defaults are
    CONDITIONAL_PROFILE, or unconditional_profile for a model that records the image size it samples at; that
    size must lie inside the profile, or the engine could not run the model's own images."""
    defaults = CONDITIONAL_PROFILE if image_size is None else unconditional_profile(image_size)
    nhw = tuple(parse_nhw(text or default, option) for text, default, option in zip(shapes, defaults, PROFILE_OPTIONS))
    check_profile(*nhw)
    (_, min_h, min_w), _, (_, max_h, max_w) = nhw
    if image_size is not None and not max(min_h, min_w) <= image_size <= min(max_h, max_w):
        raise BdmError(f"the model samples {image_size}x{image_size} images (`bdm generate`), outside the profile "
                       f"(H {min_h} to {max_h}, W {min_w} to {max_w}); give shapes that contain it, e.g. "
                       f"{' '.join(f'{o} {d}' for o, d in zip(PROFILE_OPTIONS, defaults))} (the defaults for this "
                       f"model)")
    return nhw


def recorded_image_size(metadata: Dict[str, str]) -> Optional[int]:
    """The image size `bdm export` recorded for an unconditional model (what bdm generate samples), or None."""
    sampling = metadata.get(SAMPLING_KEY)
    return int(json.loads(sampling)["image_size"]) if sampling else None


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


def input_shape_for(name: str, dims: Sequence[int], nhw: Tuple[int, int, int]) -> Shape:
    """The concrete shape of network input `name` (ONNX dims, -1 = dynamic) at batch/height/width `nhw`:
    dynamic dim 0 is the batch, dynamic dims 2 and 3 of a 4-D input are H and W; fixed dims stay."""
    shape = []
    for axis, dim in enumerate(dims):
        if dim >= 0:
            shape.append(int(dim))
        elif axis == 0:
            shape.append(nhw[0])
        elif len(dims) == 4 and axis in (2, 3):
            shape.append(nhw[axis - 1])
        else:
            raise BdmError(f"input {name} has dims {list(dims)}: axis {axis} is dynamic, but only batch, H and W "
                           f"may be; export the model with `bdm export`")
    return tuple(shape)


def profile_shapes(input_dims: Dict[str, Sequence[int]], min_nhw, opt_nhw, max_nhw) -> Dict[str, Dict[str, Shape]]:
    """{input: {"min": shape, "opt": shape, "max": shape}} for every network input."""
    check_profile(min_nhw, opt_nhw, max_nhw)
    return {name: {key: input_shape_for(name, dims, nhw)
                   for key, nhw in (("min", min_nhw), ("opt", opt_nhw), ("max", max_nhw))}
            for name, dims in input_dims.items()}


def sidecar_path(engine_path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path) -> dict:
    path = sidecar_path(engine_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BdmError(f"engine {engine_path} has no sidecar {path.name} (it was not built by `bdm build-engine`); "
                       f"rebuild it with `bdm build-engine MODEL.onnx {engine_path}`") from None
    except (OSError, ValueError) as e:
        raise BdmError(f"engine sidecar {path} is unreadable ({e}); rebuild the engine with `bdm build-engine`") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise BdmError(f"engine sidecar {path} has an unknown format; rebuild the engine with `bdm build-engine`")
    return data


def write_sidecar(engine_path, sidecar: dict):
    with atomic_path(sidecar_path(engine_path)) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


def sidecar_mismatch(recorded: dict, current: dict) -> Optional[Tuple[str, object, object]]:
    """The first checked field whose recorded value differs from this machine's (fields absent from
    `current` are not checked), as (field, recorded, current); None when the engine fits."""
    for field in SIDECAR_CHECKED:
        if field in current and recorded.get(field) != current[field]:
            return field, recorded.get(field), current[field]
    return None


def check_sidecar(engine_path, current: dict, onnx_hint: str = "MODEL.onnx"):
    """BdmError naming the first field that differs and the command that rebuilds the engine."""
    recorded = read_sidecar(engine_path)
    mismatch = sidecar_mismatch(recorded, current)
    if mismatch:
        field, was, now = mismatch
        raise BdmError(f"engine {engine_path} does not fit here: {field} is {was!r} in the engine, {now!r} here; "
                       f"rebuild it on this machine: bdm build-engine {recorded.get('onnx_path') or onnx_hint} "
                       f"{engine_path}")
    return recorded


def check_plugin_major(plugin_library: Path, tensorrt_version: str):
    """A plugin library works only with the TensorRT major its headers came from (the build records it)."""
    version_file = Path(plugin_library).with_name("bdm_trt_plugins.version")
    if not version_file.is_file():
        return
    built_for = version_file.read_text().strip()
    if built_for.split(".")[0] != tensorrt_version.split(".")[0]:
        raise BdmError(f"{plugin_library} was compiled against TensorRT {built_for} headers, the installed TensorRT "
                       f"is {tensorrt_version}; rebuild it: python -m bdm.plugins.build --tensorrt-include "
                       f"<TensorRT {tensorrt_version.split('.')[0]}.x include folder>")


def cache_dir() -> Path:
    return Path(os.environ.get("BDM_CACHE_DIR") or Path.home() / ".cache" / "bdm")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def engine_cache_key(sidecar: dict) -> str:
    """Everything that changes the engine: model, plugin code, profile and dtype (GPU and TensorRT version
    are the cache folder)."""
    relevant = {k: sidecar[k] for k in SIDECAR_CACHE_KEY}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:24]


def machine_cache_dir(gpu_name: str, tensorrt_version: str) -> Path:
    return cache_dir() / "engines" / f"{slug(gpu_name)}-trt{tensorrt_version}"


# ---- TensorRT ----------------------------------------------------------------------------------------------

def import_tensorrt():
    """The tensorrt module, 10.7 or newer (check_tensorrt_version)."""
    try:
        import tensorrt
    except ImportError:
        raise BdmError(INSTALL_TENSORRT) from None
    check_tensorrt_version(tensorrt.__version__)
    return tensorrt


def check_tensorrt_version(version: str):
    """BdmError unless `version` is MIN_TENSORRT or newer."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers < MIN_TENSORRT:
        least = ".".join(map(str, MIN_TENSORRT))
        raise BdmError(f"TensorRT {version} is installed; bdm needs {least} or newer, whose ONNX parser uses the bdm "
                       f"plugins (older ones run the nodes' function bodies instead): pip install 'tensorrt>={least}'")


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


def gpu_identity() -> Dict[str, str]:
    """Name and compute capability of CUDA device 0 (through PyTorch, which bdm already needs)."""
    import torch

    if not torch.cuda.is_available():
        raise BdmError("no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT engines need an "
                       "NVIDIA GPU, a driver, and a CUDA build of PyTorch")
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu_name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def resolve_plugins(plugins) -> Path:
    from bdm.plugins.build import PLUGINS_LIB, find_plugins_library

    path = Path(plugins) if plugins else find_plugins_library()
    if path is None:
        raise BdmError(f"no {PLUGINS_LIB} found; build it with `python -m bdm.plugins.build` (needs nvcc and the "
                       f"TensorRT headers) or pass --plugins PATH")
    if not path.is_file():
        raise BdmError(f"--plugins {path}: no such file; build it with `python -m bdm.plugins.build`")
    return path


def registered_bdm_creators(registry) -> list:
    """'bdm::Name vN' of every bdm creator in a TensorRT plugin registry."""
    return sorted(f"{c.plugin_namespace}::{c.name} v{c.plugin_version}" for c in registry.all_creators
                  if getattr(c, "plugin_namespace", None) == "bdm")


def load_plugins(trt, plugin_library: Path):
    """Register the bdm creators through IPluginRegistry::loadLibrary (getCreators), once per process: loadLibrary
    fails when a creator is already registered, so a process that loaded the library before keeps those."""
    check_plugin_major(plugin_library, trt.__version__)
    registry = trt.get_plugin_registry()
    if registered_bdm_creators(registry):
        return None
    try:
        handle = registry.load_library(str(plugin_library))
    except Exception as e:  # the bindings raise on failure in some versions, return None in others
        handle, error = None, e
    else:
        error = None
    if handle is None:
        raise BdmError(f"TensorRT {trt.__version__} could not load {plugin_library}"
                       f"{f' ({error})' if error else ''}; rebuild it against this TensorRT's headers with "
                       f"`python -m bdm.plugins.build`")
    return handle


class _Logger:
    """A trt.ILogger that keeps errors for the one-line message and prints warnings."""

    def __init__(self, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors.append(msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    print(f"TensorRT: {msg}", file=sys.stderr)

        self.logger = Logger()


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

    builder_logger = _Logger(trt).logger
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


class ShapeCache:
    """A bounded LRU of per-input-shape state: get(key, create) returns the state of `key`, made by create() when
    absent; past `capacity` entries the least recently used one is evicted and handed to `release`. A runner fed
    images of many sizes thus holds at most `capacity` sets of buffers, execution contexts and CUDA graphs."""

    def __init__(self, capacity: int, release):
        if capacity < 1:
            raise BdmError(f"max_shapes {capacity}: keep at least one input shape")
        self.capacity, self._release, self._items = capacity, release, OrderedDict()

    def get(self, key, create):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = create()  # first, so that a shape refused by create() evicts nothing
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._release(self._items.popitem(last=False)[1])
        return value

    def keys(self):
        return list(self._items)

    def clear(self):
        while self._items:
            self._release(self._items.popitem(last=False)[1])


class CaptureFailed(Exception):
    """A CUDA graph capture that did not complete (the reason is the message)."""


class GraphedExecution:
    """How one input shape runs, in trtexec's and NVIDIA's diffusion demo's order: the first call enqueues eagerly
    (TensorRT finishes its lazy set-up for the shape) and then, with `capture` given, captures the same enqueue into
    a CUDA graph; later calls replay the graph. A capture that fails leaves this shape eager, with one line.

    enqueue() runs the work (raises on failure); capture(enqueue) returns a graph with replay(), or raises
    CaptureFailed."""

    def __init__(self, enqueue, capture=None, warn=None, label="this input shape"):
        self._enqueue, self._capture, self._label = enqueue, capture, label
        self._warn = warn or (lambda line: print(line, file=sys.stderr))
        self.graph = None

    def run(self) -> str:
        """'replay', 'eager' or 'eager+capture' (what this call did)."""
        if self.graph is not None:
            self.graph.replay()
            return "replay"
        self._enqueue()
        if self._capture is None:
            return "eager"
        capture, self._capture = self._capture, None  # one try per shape
        try:
            self.graph = capture(self._enqueue)
        except CaptureFailed as e:
            self._warn(f"bdm: CUDA graph capture failed for {self._label} ({e}); running it without a graph")
            return "eager"
        return "eager+capture"


class _ShapeState(NamedTuple):
    context: object      # trt.IExecutionContext with this shape and these buffers set
    buffers: Dict[str, object]  # name -> torch CUDA tensor
    execution: GraphedExecution


class TrtRunner(Runner):
    """A bdm engine in TensorRT: plugin library loaded, sidecar checked against this machine, `execute_async_v3` on a
    private stream. Per input shape (ShapeCache, at most `max_shapes` of them): its own execution context (shapes
    and tensor addresses set once; all contexts share one device scratch buffer, as they run one after the other on
    the stream), device buffers, and (by default) a CUDA graph captured right after the shape's first, eager call
    (GraphedExecution). close() or a `with` block frees all of it.

    infer() takes numpy arrays or torch CUDA tensors and returns eps as a torch CUDA tensor; to_device/to_host
    let the sampler keep its state on the GPU between steps."""

    def __init__(self, engine_path, plugins=None, onnx_path=None, cuda_graphs: bool = True,
                 max_shapes: int = DEFAULT_MAX_SHAPES):
        import torch

        trt = import_tensorrt()
        self.torch, self.trt = torch, trt
        engine_path = Path(engine_path)
        gpu = gpu_identity()
        plugin_library = resolve_plugins(plugins)
        current = dict(gpu, tensorrt_version=trt.__version__, plugin_sha256=file_sha256(plugin_library))
        if onnx_path is not None:
            current["onnx_sha256"] = file_sha256(onnx_path)
        self.sidecar = check_sidecar(engine_path, current)
        load_plugins(trt, plugin_library)
        self._logger = _Logger(trt).logger
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BdmError(f"TensorRT could not deserialize {engine_path}: {self._last_error()}; rebuild it with "
                           f"`bdm build-engine`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_names = model_input_names(
            [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT], self.outputs,
            f"engine {engine_path}", "build it from a `bdm export` model with `bdm build-engine`")
        self.metadata = self.sidecar.get("onnx_metadata", {})
        self.dtypes = {n: torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                       for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape("x_t", 0)
        self.limits = Limits(dtype=str(self.dtypes["x_t"]).replace("torch.", ""), max_batch=int(hi[0]),
                             min_hw=(int(lo[2]), int(lo[3])), max_hw=(int(hi[2]), int(hi[3])))
        self.stream = torch.cuda.Stream()
        self.cuda_graphs = cuda_graphs
        # One device scratch buffer, the largest any shape of the profile needs, for every context.
        scratch_bytes = int(self.engine.device_memory_size_v2)
        self._scratch = torch.empty(max(scratch_bytes, 1), dtype=torch.uint8, device="cuda")
        self._shapes = ShapeCache(max_shapes, self._release)
        self.last_execution = None  # what the last infer() did: GraphedExecution.run's answer
        self.name = f"TensorRT {trt.__version__} ({gpu['gpu_name']})"
        self.path = engine_path

    def describe(self) -> str:
        return f"{self.name}, engine {self.path}"

    def to_device(self, array):
        return self.torch.as_tensor(np.asarray(array) if isinstance(array, np.ndarray) else array).cuda()

    def to_host(self, array) -> np.ndarray:
        return array.float().cpu().numpy() if hasattr(array, "cpu") else np.asarray(array)

    def _last_error(self) -> str:
        return self._logger.errors[-1] if self._logger.errors else "no reason given"

    def _new_state(self, shapes: Dict[str, Shape]) -> _ShapeState:
        torch, trt = self.torch, self.trt
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BdmError(f"TensorRT could not create an execution context for {self.path}: {self._last_error()}")
        context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        for name in self.input_names:
            if not context.set_input_shape(name, shapes[name]):
                raise BdmError(f"input {name} of shape {list(shapes[name])} is outside the engine's profile "
                               f"(H, W from {self.limits.min_hw} to {self.limits.max_hw}, batch up to "
                               f"{self.limits.max_batch}); rebuild with a larger --max-shape or use tiling")
        buffers = {n: torch.empty(shapes[n], dtype=self.dtypes[n], device="cuda") for n in self.input_names}
        for name in self.outputs:
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
        for name, tensor in buffers.items():
            context.set_tensor_address(name, tensor.data_ptr())
        label = "input shape " + ", ".join(f"{n} {list(shapes[n])}" for n in self.input_names)
        execution = GraphedExecution(lambda: self._enqueue(context), self._capture if self.cuda_graphs else None,
                                     label=label)
        return _ShapeState(context, buffers, execution)

    def _release(self, state: _ShapeState):
        """Drop an evicted shape's graph, buffers and context, once the stream no longer uses them."""
        self.stream.synchronize()
        if state.execution.graph is not None:
            state.execution.graph.reset()
        state.buffers.clear()

    def infer(self, feed: dict) -> dict:
        if self._shapes is None:
            raise BdmError(f"{self.describe()} is closed")
        torch = self.torch
        batch = feed["x_t"].shape[0]
        arrays = {}
        for name in self.input_names:  # an unconditional engine reads no cond
            value = torch.as_tensor(feed[name])
            if name == "t" and value.shape[0] != batch:
                value = value.expand(batch)
            arrays[name] = value
        shapes = {n: tuple(arrays[n].shape) for n in self.input_names}
        state = self._shapes.get(tuple(shapes[n] for n in self.input_names), lambda: self._new_state(shapes))
        self.stream.wait_stream(torch.cuda.current_stream())  # the inputs may still be in flight there
        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                state.buffers[name].copy_(arrays[name], non_blocking=True)
            self.last_execution = state.execution.run()
            # a copy: the output buffer is overwritten by the next call (and by graph replays)
            eps = state.buffers[OUTPUT_NAME].to(torch.float32, copy=True)
        torch.cuda.current_stream().wait_stream(self.stream)
        return {OUTPUT_NAME: eps}

    def _enqueue(self, context):
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise BdmError(f"TensorRT execution failed: {self._last_error()}")

    def _capture(self, enqueue):
        """A CUDA graph of enqueue() on the runner's stream (CaptureFailed when TensorRT or CUDA refuses)."""
        torch = self.torch
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                enqueue()
        except (RuntimeError, BdmError) as e:
            raise CaptureFailed(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        return graph

    def close(self):
        """Free the graphs, buffers, contexts, scratch memory and engine (idempotent; infer() refuses afterwards)."""
        if self._shapes is None:
            return
        self.stream.synchronize()
        self._shapes.clear()
        self._shapes = None
        self._scratch = self.engine = self.runtime = None
