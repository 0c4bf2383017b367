"""`bdm validate` of a BinaryDM export: ONNX Runtime (and the bdm CPU kernels, a TensorRT engine) against the PyTorch
reference in the export's mode, through the validation harness one feed at a time (only one feed's per-layer values
are held); a case that misses the bound in a chaotic mode is looked into code flip by code flip (`compare`)."""
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch

from bdm.contract import OUTPUT_NAME, UNCONDITIONAL_INPUT_NAMES, ModelMetadata
from bdm.errors import BdmError
from bdm.export.base import functions
from bdm.export.base.validation import (ParityCase, ParityReport, bdm_runner, case_line, module_path,
                                        onnxruntime_runner, probing_runner, pytorch_runner, relative_error,
                                        run_comparator)
from bdm.export.base.validation import TOLERANCE as TOLERANCES
from bdm.export.binarydm.layers import ActQuantizer, act_range, set_mode
from bdm.export.binarydm.network import binarized_layers
from bdm.export.binarydm.onnx_export import OP_TYPE
from bdm.plugins.multibasis_reference import activation_step

TOLERANCE = TOLERANCES["float32"]
# A code flip is rounding-level chaos only where x / step lies this close (in code units) to the midpoint between
# the two codes: the two runtimes' x differ by ~1e-7 relative, |x / step| <= 128.
FLIP_MARGIN = 1e-4
TIMESTEPS = (999, 500, 1)
CHAOTIC_MODES = ("static", "dynamic")


@dataclass
class ProbedNode:
    path: str                # module path of the binarized layer
    x: str                   # value names in the graph
    act_step: Optional[str]  # None when it is an initializer (static mode): the layer's stored alpha
    y: str


def probed_nodes(model: onnx.ModelProto) -> List[ProbedNode]:
    """Every MultiBasisConv node, named after its layer by its packed weight (`<path>.packed.weight`)."""
    initializers = {i.name for i in model.graph.initializer}
    return [ProbedNode(node.input[1].rsplit(".packed.", 1)[0], node.input[0],
                       None if node.input[4] in initializers else node.input[4], node.output[0])
            for node in model.graph.node if node.domain == functions.DOMAIN and node.op_type == OP_TYPE]


@dataclass
class ProbedQuantizer:
    """An attention quantizer in the graph: Clip(x) -> QuantizeLinear(., step) -> DequantizeLinear(., step)."""

    path: str  # module path of the ActQuantizer, from the node's scope name
    x: str
    step: str  # the effective step (the grad_scale result)


def probed_quantizers(model: onnx.ModelProto) -> List[ProbedQuantizer]:
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            clip = producers[producers[node.input[0]].input[0]]
            found.append(ProbedQuantizer(module_path(node.name), clip.input[0], node.input[1]))
    return found


class OnnxProbe:
    """ONNX Runtime on the model with every MultiBasisConv node's input, step and output, and every attention
    quantizer's input and step, as extra outputs (the session the onnxruntime runner runs); `names` (eps first) are
    the values a runner of the file gives for the per-layer diagnosis (the CPU kernels runner reads the same)."""

    def __init__(self, model: onnx.ModelProto):
        import onnxruntime as ort

        self.nodes = probed_nodes(model)
        self.quantizers = probed_quantizers(model)
        probed = onnx.ModelProto()
        probed.CopyFrom(model)
        values = {n for node in self.nodes for n in (node.x, node.act_step, node.y) if n}
        values |= {n for q in self.quantizers for n in (q.x, q.step)}
        self.names = [OUTPUT_NAME] + sorted(values)
        probed.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                   for n in self.names[1:])
        self.session = ort.InferenceSession(probed.SerializeToString(), providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def forced_step(layer, step: Optional[np.ndarray]):
    """Within the block a dynamic-mode layer quantizes with `step` (ONNX Runtime's) as if it were static."""
    if step is None:
        yield layer
        return
    mode, alpha = layer.mode, layer.quantizer_a.alpha.detach().clone()
    layer.mode = "static"
    layer.quantizer_a.alpha.data = torch.from_numpy(np.asarray(step, np.float32).reshape(1))
    try:
        yield layer
    finally:
        layer.mode = mode
        layer.quantizer_a.alpha.data = alpha


def hooked_run(model, feed, handles) -> np.ndarray:
    """eps of `model` on `feed`; the hooks of `handles` are removed afterwards, whatever happens."""
    try:
        with torch.no_grad():
            return model(*(torch.from_numpy(feed[n]) for n in UNCONDITIONAL_INPUT_NAMES)).numpy()
    finally:
        for handle in handles:
            handle.remove()


def torch_run(model, feed) -> Tuple[np.ndarray, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """eps and (input, output) of every binarized layer of the free-running PyTorch model, in execution order."""
    values = {}
    handles = [layer.register_forward_hook(lambda m, args, y, path=path: values.__setitem__(
        path, (args[0].numpy(), y.numpy()))) for path, layer in binarized_layers(model)]
    return hooked_run(model, feed, handles), values


def first_divergence(torch_values, ours, nodes: List[ProbedNode]) -> Optional[str]:
    """The first layer (execution order) whose input or output differs between the free runs beyond the bound."""
    by_path = {node.path: node for node in nodes}
    for path, (x, y) in torch_values.items():
        node = by_path.get(path)
        if node is None:
            continue
        if relative_error(x, ours[node.x]) > TOLERANCE:
            return f"the input of {path}"
        if relative_error(y, ours[node.y]) > TOLERANCE:
            return f"the output of {path}"
    return None


def codes(x: np.ndarray, step, bits: int) -> np.ndarray:
    """round_half_even(clamp(x / step, Qn, Qp)) in float32, as the spec and both runtimes compute it."""
    qn, qp = act_range(bits)
    return np.round(np.clip(np.asarray(x, np.float32) / np.float32(step), qn, qp))


def onnx_quantizers(model, ours, probe: OnnxProbe) -> Dict[str, Tuple[np.ndarray, np.float32]]:
    """ActQuantizer path -> (ONNX Runtime's input, its effective step) for every quantizer that ran."""
    layers = dict(binarized_layers(model))
    found = {}
    for node in probe.nodes:
        quantizer = layers[node.path].quantizer_a
        if not layers[node.path].quantizes_input():
            continue
        x = ours[node.x]
        raw = ours[node.act_step] if node.act_step else quantizer.alpha.detach().numpy()
        found[f"{node.path}.quantizer_a"] = (x, activation_step(raw, x.size, act_range(quantizer.bits)[1]))
    for q in probe.quantizers:
        found[q.path] = (ours[q.x], np.float32(ours[q.step]))
    return found


@dataclass
class Flips:
    quantizers: int = 0   # quantizers whose codes differ
    codes: int = 0        # differing codes
    margin: float = 0.0   # the largest distance (code units) of PyTorch's x / step from the midpoint of a flip
    worst: str = ""       # ... at this quantizer
    step_rel: float = 0.0  # largest relative difference of a dynamic step


def forced_codes_run(model, feed, quantizers: Dict[str, Tuple[np.ndarray, np.float32]]) -> Tuple[np.ndarray, Flips]:
    """The PyTorch network with ONNX Runtime's codes * step at every quantizer; the flips against its own codes."""
    modules = dict(model.named_modules())
    flips = Flips()

    def force(path):
        x_onnx, step_onnx = quantizers[path]
        bits = modules[path].bits

        def hook(module, args, kwargs, _):
            x_own = args[0].numpy()
            dynamic = args[1] if len(args) > 1 else kwargs.get("dynamic", False)
            step_own = np.float32(module.step(args[0], dynamic).numpy()[0])
            flips.step_rel = max(flips.step_rel, abs(float(step_own - step_onnx)) / float(step_onnx))
            own, theirs = codes(x_own, step_own, bits), codes(x_onnx, step_onnx, bits)
            differ = own != theirs
            if differ.any():
                midpoint = (own[differ] + theirs[differ]) / 2
                margin = float(np.abs(x_own[differ] / step_own - midpoint).max())
                if np.abs(own[differ] - theirs[differ]).max() > 1:
                    margin = float("inf")
                flips.quantizers += 1
                flips.codes += int(differ.sum())
                if margin >= flips.margin:
                    flips.margin, flips.worst = margin, path
            return torch.from_numpy((theirs * step_onnx).astype(np.float32))
        return hook

    handles = [modules[path].register_forward_hook(force(path), with_kwargs=True) for path in quantizers
               if isinstance(modules.get(path), ActQuantizer)]
    return hooked_run(model, feed, handles), flips


@dataclass
class CaseResult(ParityCase):
    layers: int = 0                             # teacher-forced layer checks
    worst_layer: Tuple[str, float] = ("", 0.0)  # largest teacher-forced error
    first_divergence: Optional[str] = None      # first layer whose input differed between the free runs
    flips: Flips = field(default_factory=Flips)  # of the forced-codes run (forced_rel: its output error)

    def line(self, tolerance: float) -> str:
        text = f"{self.runner:>11} t={self.t0:<4} max|eps diff| rel {self.rel:.2e} (bound {tolerance:.0e})"
        if self.layers:
            path, rel = self.worst_layer
            text += f"; {self.layers} layers teacher-forced, worst rel {rel:.1e} ({path})"
        if self.first_divergence:
            text += f"; the free runs part at {self.first_divergence}"
        if self.forced_rel is not None:
            f = self.flips
            text += (f"; with {self.runner}'s codes: rel {self.forced_rel:.2e}, {f.codes} codes flipped in "
                     f"{f.quantizers} quantizers")
            if f.codes:
                text += f" (all within {f.margin:.1e} of a rounding midpoint, worst at {f.worst})"
            if f.step_rel:
                text += f", dynamic steps within {f.step_rel:.1e}"
        return case_line(text, self.note, self.passed, "; ")


@dataclass
class ValidationReport(ParityReport):
    mode: str

    def worst(self) -> float:
        return max(c.rel for c in self.cases)

    def details(self) -> str:
        # the cases that passed through the forced-codes diagnosis (ONNX Runtime's, the CPU kernels'; an engine's
        # have none)
        chaotic = [c for c in self.cases if c.rel > self.tolerance and c.forced_rel is not None]
        if not chaotic:
            return ""
        layers = max(c.worst_layer[1] for c in self.cases)
        forced = max(c.forced_rel for c in chaotic)
        return (f"; {len(chaotic)} parted at rounding-level 4-bit code flips (chaotic {self.mode} mode): with "
                f"the runner's own codes {forced:.1e}, every layer teacher-forced within {layers:.1e}")


def validation_feeds(channels: int, size: int, timesteps: Sequence[int], batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"x_t": rng.standard_normal((batch, channels, size, size)).astype(np.float32),
             "t": np.full(batch, t0, np.int64)} for t0 in timesteps]


def _probed_case(runner: str, probe: OnnxProbe, ours: Dict[str, np.ndarray], model, layers, mode: str, feed,
                 reference) -> CaseResult:
    """One runner's case on one feed from its probed values `ours`, judged as `compare` says."""
    case = CaseResult(runner=runner, t0=int(feed["t"][0]), rel=relative_error(reference, ours[OUTPUT_NAME]))
    for node in probe.nodes:
        layer = layers[node.path]
        with forced_step(layer, ours[node.act_step] if node.act_step else None), torch.no_grad():
            forced = layer(torch.from_numpy(ours[node.x])).numpy()
        rel = relative_error(forced, ours[node.y])
        case.layers += 1
        if rel >= case.worst_layer[1]:
            case.worst_layer = (node.path, rel)
    case.passed = case.worst_layer[1] <= TOLERANCE and case.rel <= TOLERANCE
    if case.rel > TOLERANCE:
        case.first_divergence = first_divergence(torch_run(model, feed)[1], ours, probe.nodes)
        if mode in CHAOTIC_MODES:
            forced, flips = forced_codes_run(model, feed, onnx_quantizers(model, ours, probe))
            case.flips = flips
            case.forced_rel = relative_error(forced, ours[OUTPUT_NAME])
            case.passed = (case.worst_layer[1] <= TOLERANCE and case.forced_rel <= TOLERANCE
                           and flips.margin <= FLIP_MARGIN and flips.step_rel <= TOLERANCE)
            if flips.margin > FLIP_MARGIN:
                case.note = f"a code flip {flips.margin:.1e} from a rounding midpoint is not chaos: {flips.worst}"
        else:
            case.note = f"{mode} is not chaotic: this is an export error"
    return case


def compare(onnx_path, model, mode: str, *, size: Optional[int] = None, batch: int = 2,
            timesteps: Sequence[int] = TIMESTEPS, seed: int = 0, engine=None, kernels_runner=None,
            log: Callable[[str], None] = print) -> ValidationReport:
    """ONNX Runtime (and `kernels_runner`, the bdm CPU kernels runner of the file, and `engine`, a bdm runner of a
    TensorRT engine, when given) vs `model` (put in `mode` for the comparison) on seeded feeds at the start, middle
    and end of the schedule.

    Bound: max|y - y_ref| <= 1e-5 * max|y_ref| (fp32). In w1a32 and fp the whole network is well conditioned and
    must meet it. A W1A4 network in static or dynamic mode is chaotic: a value that lands within rounding of a 4-bit
    code boundary can take the neighbouring code in another runtime, and one flipped code moves the output by up to
    ~30 % (reference README). So a case whose output misses the bound is looked into, as the BI-DiffSR validation
    does with sign maps:
    - forced codes: the PyTorch network is re-run with ONNX Runtime's activation codes at every quantizer (each
      layer's and each attention quantizer's, recomputed bit for bit from ONNX Runtime's own input and step); its
      output must then meet the bound: everything else (convolutions, attention, GroupNorm, ...) is compared;
    - each code that differs from PyTorch's own (from PyTorch's input in that forced run) must be a rounding-level
      flip: x / step within FLIP_MARGIN of the midpoint between the two codes; any other difference is a bug;
    - every binarized layer teacher-forced: ONNX Runtime's input (and dynamic step) of each MultiBasisConv node
      through the PyTorch layer must meet the bound against the node's output (this localises a layer error).
    Nothing is loosened: a flip is reported with its quantizer, never absorbed into a tolerance. An engine gives no
    per-layer values, so its cases are judged by the plain bound: in a chaotic mode a rounding-level code flip fails
    them (the onnxruntime lines show whether flips occur)."""
    onnx_model = onnx.load(str(onnx_path))
    probe = OnnxProbe(onnx_model)
    layers = dict(binarized_layers(model))
    size = size or max(32, 2 * model.size_multiple)
    input_dtypes = {"x_t": np.dtype(np.float32), "t": np.dtype(np.int64)}
    runners = [pytorch_runner(model, UNCONDITIONAL_INPUT_NAMES, input_dtypes),
               onnxruntime_runner(lambda: probe.session)]
    probed_runners = ["onnxruntime"]  # the runners whose per-layer values are read
    if kernels_runner is not None:
        runners.append(probing_runner(kernels_runner, "cpu-kernels", probe.names[1:], input_dtypes))
        probed_runners.append("cpu-kernels")
    if engine is not None:
        runners.append(bdm_runner(engine, "tensorrt", input_dtypes))
    previous = {m: m.mode for m in model.modules() if hasattr(m, "mode")}
    set_mode(model, mode)
    report = ValidationReport(tolerance=TOLERANCE, cases=[], mode=mode)
    try:
        for feed in validation_feeds(model.in_channels, size, timesteps, batch, seed):
            outputs = run_comparator(runners, [feed])
            reference = outputs["pytorch"][0][OUTPUT_NAME]
            for name in probed_runners:
                case = _probed_case(name, probe, outputs[name][0], model, layers, mode, feed, reference)
                log(case.line(TOLERANCE))
                report.cases.append(case)
            if engine is not None:
                case = CaseResult(runner="tensorrt", t0=int(feed["t"][0]),
                                  rel=relative_error(reference, outputs["tensorrt"][0][OUTPUT_NAME]))
                case.passed = case.rel <= TOLERANCE
                if not case.passed:
                    case.note = "no per-layer values from an engine: see the onnxruntime line for code flips"
                log(case.line(TOLERANCE))
                report.cases.append(case)
    finally:
        for module, mode_before in previous.items():
            module.mode = mode_before
    return report


def compare_file(model_path: Path, onnx_model: onnx.ModelProto, metadata: ModelMetadata, model: torch.nn.Module, ckpt,
                 nhw, open_engine: Optional[Callable], open_kernels: Optional[Callable], seed: int,
                 log: Callable[[str], None]) -> ValidationReport:
    """`bdm validate` of a BinaryDM export against its reference `model`, loaded from `ckpt`, in the export's mode
    (registry.validate_file); `open_kernels()` gives the CPU kernels runner of the file to compare too (or None).
    nhw: batch and a square side, a multiple of the UNet's size multiple."""
    batch, size, width = nhw
    if size != width or size % model.size_multiple:
        raise BdmError(f"--shape {'x'.join(map(str, nhw))}: BinaryDM validation takes square inputs whose side is a "
                       f"multiple of {model.size_multiple}; give e.g. 2x32x32")
    mode = metadata.act_mode or "static"
    log(f"comparing {model_path} (BinaryDM, {mode} mode) with {ckpt}: t in {list(TIMESTEPS)}, seed {seed}")
    engine = None if open_engine is None else open_engine()
    kernels = None if open_kernels is None else open_kernels()
    return compare(model_path, model, mode, size=size, batch=batch, seed=seed, engine=engine, kernels_runner=kernels,
                   log=log)
