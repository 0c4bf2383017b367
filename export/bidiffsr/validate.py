"""`bdm validate` of a BI-DiffSR export: the PyTorch reference against ONNX Runtime (and the bdm CPU kernels, a
TensorRT engine) through the validation harness, on seeded inputs whose t covers both boundaries of every timestep group; a case that misses
the bound (and every fp16 case) is looked into sign flip by sign flip (`compare`)."""

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
from polygraphy.backend.onnxrt import SessionFromOnnx

from bdm.contract import CONDITIONAL_INPUT_NAMES, OUTPUT_NAME, ModelMetadata
from bdm.errors import BdmError
from bdm.export.base import functions
from bdm.export.base.validation import (TOLERANCE, ParityCase, ParityReport, bdm_runner, case_line, module_path,
                                        onnxruntime_runner, pytorch_runner, relative_error, run_comparator)
from bdm.export.bidiffsr import network as bidiffsr
from bdm.plugins import spec

# A flip is rounding-level chaos only where |x + beta| is this small against the layer's largest |x + beta|:
# fp32 runtimes differ by ~1e-7 relative per op, fp16 by ~1e-3 (one fp16 ulp is 2**-11 = 4.9e-4).
FLIP_MARGIN = {"float32": 1e-4, "float16": 2e-2}


def group_boundaries(num_groups: int, total_steps: int) -> List[int]:
    """The first and last t of every group (spec group_rule): 0, 399, 400, ..., 1999 for K=5, T=2000."""
    firsts = [-(-g * total_steps // num_groups) for g in range(num_groups)]
    lasts = [first - 1 for first in firsts[1:]] + [total_steps - 1]
    return [t for pair in zip(firsts, lasts) for t in pair]


def validation_feeds(nhw: Sequence[int], timesteps: Sequence[int], dtype, channels=(3, 3), total_steps=2000,
                     seed: int = 0) -> List["OrderedDict[str, np.ndarray]"]:
    """One feed per t0: x_t ~ N(0, 1), cond ~ U(0, 1) (seeded), t = [t0, others]; the other samples' t lie half a
    schedule away (another group: only t[0] may select it)."""
    n, h, w = nhw
    rng = np.random.default_rng(seed)
    feeds = []
    for t0 in timesteps:
        t = np.array([t0] + [(t0 + total_steps // 2) % total_steps] * (n - 1), np.int64)
        feeds.append(OrderedDict(x_t=rng.standard_normal((n, channels[0], h, w)).astype(dtype),
                                 cond=rng.random((n, channels[1], h, w)).astype(dtype), t=t))
    return feeds


# --- per-layer values: pre-sign x + beta of every binary layer, from PyTorch and from the ONNX model -----------

@dataclass
class BinaryLayer:
    """One binary layer of an exported graph, and the graph values its pre-sign value x + beta comes from."""

    path: str              # the PyTorch module path of the BIConv (from the node name)
    sources: frozenset     # fused: {x, threshold}; unfused: {TimestepBias output}
    num_groups: int
    total_steps: int


def onnx_binary_layers(model: onnx.ModelProto) -> List[BinaryLayer]:
    """Fused form: BinaryConv2d(x, t, weight, alpha, threshold, ...) takes sign(x + threshold[g]) inside; unfused:
    BinarySignConv2d takes the sign of TimestepBias(x, t, table)'s output."""
    layers = []
    for node in model.graph.node:
        if node.domain != functions.DOMAIN or node.op_type not in ("BinaryConv2d", "TimestepBias"):
            continue
        sources = {node.input[0], node.input[4]} if node.op_type == "BinaryConv2d" else {node.output[0]}
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layers.append(BinaryLayer(module_path(node.name), frozenset(sources), attributes["num_groups"],
                                  attributes["total_steps"]))
    return layers


def _sign_taps(model: onnx.ModelProto, inlined: onnx.ModelProto, layers: List[BinaryLayer]):
    """path -> (pre-sign value, sign map) names in the inlined model: the Sign node of each layer's function
    body, found by the graph values its input derives from (its layer's sources)."""
    graph_values = {v for n in model.graph.node for v in (*n.input, *n.output)}
    producers = {o: n for n in inlined.graph.node for o in n.output}

    def sources_of(name, depth=5):
        if name in graph_values or depth == 0 or name not in producers:
            return {name} & graph_values
        return set().union(*(sources_of(i, depth - 1) for i in producers[name].input))

    signs = [n for n in inlined.graph.node if n.op_type == "Sign"]
    taps = {}
    for layer in layers:
        sign = next((n for n in signs if layer.sources <= sources_of(n.input[0])), None)
        if sign is None:
            raise BdmError(f"cannot find the sign of layer {layer.path} in the inlined model")
        signs.remove(sign)
        taps[layer.path] = (sign.input[0], sign.output[0])
    return taps


class OnnxLayerProbe:
    """ONNX Runtime's own pre-sign values and sign maps of every binary layer: the model with its functions
    inlined and each layer's Sign input and output as extra graph outputs. (Recomputing them from a layer's
    input would not be the same thing: ONNX Runtime on CPU runs fp16 ops that lack fp16 kernels in float32 and
    may hand the unrounded float32 result on to the next cast to float32.)"""

    def __init__(self, model: onnx.ModelProto):
        import onnxruntime as ort
        from onnx.inliner import inline_local_functions

        self.layers = onnx_binary_layers(model)
        inlined = inline_local_functions(model)
        self.taps = _sign_taps(model, inlined, self.layers)
        for names in self.taps.values():
            for name in names:
                inlined.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        self.session = ort.InferenceSession(inlined.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(self, feed):
        """(eps, {path: pre-sign value}, {path: sign map}) as ONNX Runtime computed them."""
        names = [OUTPUT_NAME] + [name for pair in self.taps.values() for name in pair]
        eps, *values = self.session.run(names, dict(feed))
        presign = dict(zip(self.taps, values[0::2]))
        signs = dict(zip(self.taps, values[1::2]))
        return eps.astype(np.float32), presign, signs


class RunnerLayerProbe:
    """The same per-layer values from a runner that reads graph values, `runner.values(feed, names)` (the CPU kernels
    runner): a fused layer's x + threshold[g] (the spec's one float32 addition before the sign, as the kernels
    compute it), an unfused layer's TimestepBias output; the sign maps are their signs (sign(0) = 0)."""

    def __init__(self, model: onnx.ModelProto, runner):
        self.layers = onnx_binary_layers(model)
        tables = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        self.taps = {}  # path -> (graph value, threshold table or None)
        for node, layer in zip([n for n in model.graph.node if n.domain == functions.DOMAIN
                                and n.op_type in ("BinaryConv2d", "TimestepBias")], self.layers):
            fused = node.op_type == "BinaryConv2d"
            self.taps[layer.path] = (node.input[0], tables[node.input[4]]) if fused else (node.output[0], None)
        self.runner = runner

    def run(self, feed):
        """(eps, {path: pre-sign value}, {path: sign map}) as the runner computed them."""
        values = self.runner.values(feed, [name for name, _ in self.taps.values()])
        presign, signs = {}, {}
        for layer in self.layers:
            name, threshold = self.taps[layer.path]
            value = values[name].astype(np.float32)
            if threshold is not None:
                g = spec.group_index(int(feed["t"][0]), layer.num_groups, layer.total_steps)
                value = value + threshold[g].astype(np.float32).reshape(1, -1, 1, 1)
            presign[layer.path], signs[layer.path] = value, np.sign(value)
        return np.asarray(values[OUTPUT_NAME], np.float32), presign, signs


def _torch_inputs(feed):
    return [torch.from_numpy(np.asarray(feed[n], dtype=np.int64 if n == "t" else np.float32))
            for n in CONDITIONAL_INPUT_NAMES]


def torch_presign(model: torch.nn.Module, feed):
    """Run the PyTorch network; returns (eps, {path: x + beta_g}) for every BIConv, in execution order (the
    value its sign is taken of, even when `forced_signs` replaces that sign)."""
    values = OrderedDict()

    def record(path):
        def hook(module, args):
            x, t = args
            g = int(bidiffsr.timestep_group(t, module.num_groups, module.total_steps))
            values[path] = (x + module.group_tables()["threshold"][g].reshape(1, -1, 1, 1)).numpy()
        return hook

    handles = [m.register_forward_pre_hook(record(path)) for path, m in bidiffsr.biconvs(model)]
    try:
        with torch.no_grad():
            y = model(*_torch_inputs(feed)).numpy()
    finally:
        for handle in handles:
            handle.remove()
    return y, values


@contextlib.contextmanager
def forced_signs(model: torch.nn.Module, sign_maps: Dict[str, np.ndarray]):
    """Within the block every BIConv of `model` uses the given sign map instead of sign(x + beta_g)."""
    modules = dict(bidiffsr.biconvs(model))
    for path, signs in sign_maps.items():
        modules[path].sign_input = lambda x, group, s=torch.from_numpy(signs): s
    try:
        yield model
    finally:
        for path in sign_maps:
            del modules[path].sign_input


@dataclass
class LayerFlips:
    path: str
    flipped: int
    size: int
    margin: float  # largest |x + beta| / max|x + beta| (reference values) among the flipped positions

    def __str__(self):
        return f"{self.path}: {self.flipped}/{self.size} signs at |x+beta| <= {self.margin:.1e} max"


def sign_flips(reference: Dict[str, np.ndarray], signs: Dict[str, np.ndarray]) -> List[LayerFlips]:
    """Layers (in the reference's order) where the sign of the reference's pre-sign value differs from `signs`."""
    flips = []
    for path, ref in reference.items():
        flipped = np.sign(ref) != signs[path]
        if flipped.any():
            scale = float(np.abs(ref).max()) or 1.0
            flips.append(LayerFlips(path, int(flipped.sum()), ref.size, float(np.abs(ref[flipped]).max()) / scale))
    return flips


def first_input_divergence(reference: Dict[str, np.ndarray], other: Dict[str, np.ndarray], tol: float):
    """(path, relative max difference) of the first layer whose pre-sign values differ beyond tol."""
    for path, ref in reference.items():
        rel = float(np.abs(ref - other[path]).max() / (np.abs(ref).max() or 1.0))
        if rel > tol:
            return path, rel
    return None


# --- the comparison ----------------------------------------------------------------------------------------

@dataclass
class CaseResult(ParityCase):
    group: int = 0
    max_abs: float = 0.0
    flips: List[LayerFlips] = field(default_factory=list)  # against the free-running reference
    local_flips: int = 0       # flips of the forced re-run: each one a layer's own rounding
    local_margin: float = 0.0  # their largest |x + beta| / max|x + beta|

    def line(self, tol: float) -> str:
        text = (f"{self.runner:>16} t={self.t0:<5} g={self.group}  max|diff| {self.max_abs:.3e}  "
                f"rel {self.rel:.2e} (bound {tol:.0e})")
        if self.flips:
            text += f"  sign flips in {len(self.flips)} layers, first {self.flips[0]}"
        if self.forced_rel is not None:
            text += f"  with the same signs: rel {self.forced_rel:.2e}"
            if self.local_flips:
                text += f" ({self.local_flips} local flips, |x+beta| <= {self.local_margin:.1e} max)"
        return case_line(text, self.note, self.passed, "  ")


@dataclass
class ValidationReport(ParityReport):
    dtype: str

    def worst(self) -> float:
        """The largest error with the same signs (the raw error where no sign flipped)."""
        return max(c.rel if c.forced_rel is None else c.forced_rel for c in self.cases)

    def details(self) -> str:
        flipped = [c for c in self.cases if c.flips]
        if not flipped:
            return ""
        return (f"; {len(flipped)} with rounding-level sign flips (raw error up to "
                f"{max(c.rel for c in flipped):.1e}, compared with the same signs)")

    def missed_bound(self) -> str:
        failed = sum(not c.passed for c in self.cases)
        return f"{self.tolerance:.0e} * max|eps| in {failed} of {len(self.cases)} cases"


def _diagnose(case: CaseResult, model, probe: OnnxLayerProbe, feed, y_ort, dtype: str, tol: float):
    """Sign flips and the error with the same signs; sets case.passed from them (see the module doc).

    Flips against the free-running reference show where the two runs first part (later layers then see
    different inputs). The pass criterion uses the reference re-run with ONNX Runtime's signs forced in: its own
    pre-sign values follow the same trajectory, so each of its flips is that layer's own rounding."""
    _, reference = torch_presign(model, feed)
    y_probe, ours, signs = probe.run(feed)
    if not np.array_equal(y_probe, y_ort):
        case.note = f"(the layer probe's eps differs from the session's by {relative_error(y_ort, y_probe):.1e})"
    case.flips = sign_flips(reference, signs)
    with forced_signs(model, signs):
        y_forced, forced = torch_presign(model, feed)
    case.forced_rel = relative_error(y_forced, y_ort)
    local = sign_flips(forced, signs)
    margin = max((f.margin for f in local), default=0.0)
    case.local_flips, case.local_margin = sum(f.flipped for f in local), margin
    case.passed = case.forced_rel <= tol and margin <= FLIP_MARGIN[dtype]
    if margin > FLIP_MARGIN[dtype]:
        worst = max(local, key=lambda f: f.margin)
        case.note = f"a flip at |x+beta| = {margin:.1e} max is not rounding (> {FLIP_MARGIN[dtype]:.0e}): {worst.path}"
    elif not case.flips:
        divergence = first_input_divergence(reference, ours, tol)
        if divergence is not None:
            case.note = f"first layer input off by {divergence[1]:.1e}: {divergence[0]}"


def compare(onnx_path, model: torch.nn.Module, *, nhw=(1, 64, 64), timesteps: Optional[Sequence[int]] = None,
            seed: int = 0, feeds: Optional[Sequence[dict]] = None, open_engine: Optional[Callable] = None,
            log=print, polygraphy_stats: bool = True, kernels_runner=None) -> ValidationReport:
    """Run PyTorch, ONNX Runtime (and `kernels_runner`, the bdm CPU kernels runner of the file, and the TensorRT
    runner `open_engine()`, when given) on the same feeds through Polygraphy's Comparator; returns the per-case
    results. The feeds are seeded random inputs of shape `nhw` at
    `timesteps` (default: both ends of every group), unless given.

    The bound is base.validation.TOLERANCE: max|y - y_ref| <= tol * max|y_ref| (fp32: 1e-5; fp16: 1e-2). A
    binarized network is chaotic: a pre-sign value x + beta that lies within rounding of 0 can take the other sign in
    another runtime, and one flipped sign moves the output far more than any rounding. So when ONNX Runtime misses
    the bound (and always for fp16), the check looks inside (ONNX Runtime's cases and the CPU kernels' alike): it reads every binary layer's pre-sign values and sign
    maps from both runtimes (ONNX Runtime's from its own run of the inlined graph), counts the flipped signs per
    layer, and re-runs the PyTorch reference with ONNX Runtime's sign maps forced in. The model passes only if, with
    the same signs, it is within the bound, and every flip happened at a value within `FLIP_MARGIN` of zero
    (relative to the layer's largest |x + beta|): a flip anywhere else is a bug, not chaos. Nothing is loosened: a
    flip is reported, with its layer, never absorbed into a tolerance."""
    onnx_path = Path(onnx_path)
    onnx_model = onnx.load(str(onnx_path))
    x_dtype = onnx.helper.tensor_dtype_to_np_dtype(onnx_model.graph.input[0].type.tensor_type.elem_type)
    dtype = np.dtype(x_dtype).name
    tol = TOLERANCE[dtype]
    layers = onnx_binary_layers(onnx_model)
    num_groups, total_steps = (layers[0].num_groups, layers[0].total_steps) if layers else (1, 1)
    timesteps = group_boundaries(num_groups, total_steps) if timesteps is None else timesteps
    if feeds is None:
        feeds = validation_feeds(nhw, timesteps, x_dtype, (model.out_channel, model.in_channel - model.out_channel),
                                 total_steps, seed)
    else:
        feeds = [OrderedDict((n, np.asarray(f[n], np.int64 if n == "t" else x_dtype))
                             for n in CONDITIONAL_INPUT_NAMES) for f in feeds]
    input_dtypes = {n: feeds[0][n].dtype for n in CONDITIONAL_INPUT_NAMES}

    runners = [pytorch_runner(model, CONDITIONAL_INPUT_NAMES, input_dtypes, np.float32),
               onnxruntime_runner(SessionFromOnnx(onnx_path.read_bytes(), providers=["CPUExecutionProvider"]))]
    if kernels_runner is not None:
        runners.append(bdm_runner(kernels_runner, "cpu-kernels", input_dtypes))
    if open_engine is not None:
        runners.append(bdm_runner(open_engine(), "tensorrt", input_dtypes))
    # Polygraphy's own verdict uses the plain bound; the sign-flip analysis below may overrule a miss.
    results = run_comparator(runners, feeds, bound=tol if polygraphy_stats else None)
    if polygraphy_stats:
        log(f"bdm verdict: max|diff| <= {tol:.0e} * max|eps|, else the sign-flip analysis "
            f"(export/bidiffsr/validate.py)")
    outputs = {name: [np.asarray(it[OUTPUT_NAME], np.float32) for it in iterations]
               for name, iterations in results.items()}
    probes = {}
    cases = []
    for name in list(outputs)[1:]:
        for i, feed in enumerate(feeds):
            y_ref, y = outputs["pytorch"][i], outputs[name][i]
            t0 = int(feed["t"][0])
            case = CaseResult(runner=name, t0=t0, rel=relative_error(y_ref, y),
                              group=spec.group_index(t0, num_groups, total_steps),
                              max_abs=float(np.abs(y - y_ref).max()))
            case.passed = case.rel <= tol
            if name in ("onnxruntime", "cpu-kernels") and (not case.passed or dtype == "float16"):
                if name not in probes:
                    probes[name] = (OnnxLayerProbe(onnx_model) if name == "onnxruntime"
                                    else RunnerLayerProbe(onnx_model, kernels_runner))
                _diagnose(case, model, probes[name], feed, y, dtype, tol)
            elif name == "tensorrt" and not case.passed:
                case.note = "(no per-layer values from an engine: compare the onnxruntime lines for sign flips)"
            cases.append(case)
            log(case.line(tol))
    return ValidationReport(tolerance=tol, cases=cases, dtype=dtype)


def compare_file(model_path: Path, onnx_model: onnx.ModelProto, metadata: ModelMetadata, model: torch.nn.Module, ckpt,
                 nhw, open_engine: Optional[Callable], open_kernels: Optional[Callable], seed: int,
                 log: Callable[[str], None]) -> ValidationReport:
    """`bdm validate` of a BI-DiffSR export against its reference `model`, loaded from `ckpt`
    (registry.validate_file); `open_kernels()` gives the CPU kernels runner of the file to compare too (or None)."""
    log(f"comparing {model_path} ({metadata.dtype}) with {ckpt}: inputs {'x'.join(map(str, nhw))}, t at both ends of "
        f"every timestep group, seed {seed}")
    return compare(model_path, model, nhw=nhw, seed=seed, open_engine=open_engine, log=log,
                   kernels_runner=None if open_kernels is None else open_kernels())
