"""The validation harness of every family: the PyTorch reference, ONNX Runtime and optionally a TensorRT engine (and
the bdm CPU kernels runner) run on
the same feeds through Polygraphy's Comparator (which, when asked, also prints its per-output error statistics
against the bound); the one error measure; the TorchScript exporter's node-name-to-module-path rule; and the report
that each family's diagnosis (bidiffsr.validate: sign flips; binarydm.validate: code flips) fills in."""

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from polygraphy import comparator
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from bdm.contract import OUTPUT_NAME

# The bound: max|y - y_ref| <= TOLERANCE[dtype] * max|y_ref|.
TOLERANCE = {"float32": 1e-5, "float16": 1e-2}


def relative_error(reference, other) -> float:
    """max|other - reference| / max|reference| (in float64)."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    return float(np.abs(other - reference).max() / (np.abs(reference).max() or 1.0))


def module_path(node_name: str) -> str:
    """The PyTorch module path in a node name of the TorchScript exporter: '/ups.20/biconv1/BinaryConv2d' ->
    'ups.20.biconv1'; a scope that repeats its parent's path (children of a Sequential) replaces it:
    '/input_blocks.4/input_blocks.4.1/attention/act_quantizer_q/DequantizeLinear' ->
    'input_blocks.4.1.attention.act_quantizer_q'."""
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


class FunctionRunner(BaseRunner):
    """A Polygraphy runner around `infer(feed) -> {output name: array}`: for the PyTorch reference (Polygraphy's own
    PyTorch runner cannot run on CPU: it forces .cuda()) and for a bdm runner (runtime.backends) of an engine."""

    def __init__(self, name: str, infer: Callable[[Mapping[str, np.ndarray]], Dict[str, np.ndarray]],
                 input_dtypes: Mapping[str, np.dtype]):
        super().__init__(name=name)
        self._infer, self._input_dtypes = infer, dict(input_dtypes)

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for input_name, dtype in self._input_dtypes.items():
            meta.add(input_name, np.dtype(dtype), (None,) * (1 if input_name == "t" else 4))
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = OrderedDict(self._infer(feed_dict))
        self.inference_time = time.perf_counter() - start
        return outputs


def pytorch_runner(model: torch.nn.Module, input_names: Sequence[str], input_dtypes: Mapping[str, np.dtype],
                   compute_float=None) -> FunctionRunner:
    """The PyTorch reference as runner "pytorch": eps of model(*inputs) in float32. Float inputs are handed on as
    `compute_float` when given (the fp32 reference of an fp16 model sees the same fp16 values)."""

    def infer(feed):
        inputs = [np.asarray(feed[n]) for n in input_names]
        inputs = [v.astype(compute_float) if compute_float and v.dtype.kind == "f" else v for v in inputs]
        with torch.inference_mode():
            eps = model(*(torch.as_tensor(v) for v in inputs))
        return {OUTPUT_NAME: eps.float().cpu().numpy()}

    return FunctionRunner("pytorch", infer, input_dtypes)


def bdm_runner(runner, name: str, input_dtypes: Mapping[str, np.dtype]) -> FunctionRunner:
    """A bdm runner (runtime.backends: infer / to_host) as Polygraphy runner `name`: "tensorrt" for an engine,
    "cpu-kernels" for the CPU kernels runner."""

    def infer(feed):
        return {OUTPUT_NAME: np.asarray(runner.to_host(runner.infer(feed)[OUTPUT_NAME]), dtype=np.float32)}

    return FunctionRunner(name, infer, input_dtypes)


def probing_runner(runner, name: str, values: Sequence[str], input_dtypes: Mapping[str, np.dtype]) -> FunctionRunner:
    """A bdm runner that reads graph values (`runner.values(feed, names)`: the CPU kernels runner) as Polygraphy
    runner `name`: its outputs are eps and those values, as ONNX Runtime's probed session gives them."""
    return FunctionRunner(name, lambda feed: runner.values(feed, values), input_dtypes)


def onnxruntime_runner(session) -> OnnxrtRunner:
    """ONNX Runtime as runner "onnxruntime": `session` is an InferenceSession or a Polygraphy loader of one."""
    return OnnxrtRunner(session, name="onnxruntime")


@contextlib.contextmanager
def polygraphy_log(verbose: bool):
    """Polygraphy's log at INFO (its run and accuracy statistics) or silenced, without colours."""
    severity, colors = G_LOGGER.module_severity, G_LOGGER.colors
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.CRITICAL
    G_LOGGER.colors = False
    try:
        yield
    finally:
        G_LOGGER.module_severity, G_LOGGER.colors = severity, colors


def _max_error_within(bound: float):
    """Polygraphy's simple comparison at max|diff| <= bound * max|reference| per output. SimpleCompareFunc is
    CompareFunc.simple in Polygraphy before 0.51, which later versions deprecate: use whichever this one has."""
    simple = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple

    def within_bound(reference_iteration, other_iteration):
        atol = {name: bound * float(np.abs(v).max()) for name, v in reference_iteration.items()}
        return simple(atol=atol, rtol=0.0, check_error_stat="max")(reference_iteration, other_iteration)

    return within_bound


def run_comparator(runners: Sequence[BaseRunner], feeds: Sequence[Mapping[str, np.ndarray]],
                   bound: Optional[float] = None) -> Dict[str, List[Dict[str, np.ndarray]]]:
    """Every runner on every feed through Polygraphy's Comparator: {runner name: [its outputs on each feed]}. With
    `bound`, Polygraphy also compares each runner with the first at that bound and prints its statistics (INFO);
    without, Polygraphy says nothing."""
    with polygraphy_log(verbose=bound is not None):
        results = Comparator.run(list(runners), data_loader=list(feeds))
        if bound is not None:
            Comparator.compare_accuracy(results, comparisons=[(0, i) for i in range(1, len(runners))],
                                        compare_func=_max_error_within(bound))
    return {name: [dict(iteration) for iteration in iterations] for name, iterations in results}


def case_line(measured: str, note: str, passed: bool, separator: str) -> str:
    """The line a validation case prints: what it measured, its note, the verdict."""
    return measured + (f"{separator}{note}" if note else "") + ("  PASS" if passed else "  FAIL")


@dataclass
class ParityCase:
    """One runner against PyTorch on one feed (t0: the first sample's timestep): rel = relative_error of eps.
    forced_rel: the error left once the runner's own rounding-level flips are forced into PyTorch (None: not
    looked into)."""

    runner: str
    t0: int
    rel: float
    passed: bool = False
    forced_rel: Optional[float] = None
    note: str = ""


@dataclass
class ParityReport:
    """ONNX Runtime (and TensorRT) against PyTorch on one export, the cases judged by max|diff| <= tolerance *
    max|eps|: what `bdm export` and `bdm validate` print. Each family's validation subclasses it with worst() and
    details()."""

    tolerance: float
    cases: List[ParityCase]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def worst(self) -> float:
        raise NotImplementedError

    def details(self) -> str:
        return ""

    def summary(self) -> str:
        return (f"worst error {self.worst():.1e} * max|eps| (bound {self.tolerance:.0e}) over {len(self.cases)} cases"
                + self.details())

    def missed_bound(self) -> str:
        """The bound a failed validation names."""
        return f"{self.tolerance:.0e}"
