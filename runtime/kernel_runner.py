"""`CpuKernelRunner`: an exported ONNX file on the CPU with the `bdm` nodes on the bit-packed CPU kernels
(bdm.plugins.cpu_kernels) and every standard node as a torch CPU op (runtime/torch_ops.py), so the binary layers
cost popcounts instead of +-1 float convolutions. The file is the same one ONNX Runtime and TensorRT run.

Lifecycle: the constructor reads the file once into an execution plan (runtime/execution_plan.py), and each `bdm`
node's packed weights and tables are handed to the kernels once (`CpuKernels.prepare`); `infer` runs the plan;
`close` (or leaving a `with` block) releases the plan and the prepared kernels.

Memory: a step allocates and frees dozens of activations of up to 32 MB. glibc serves blocks that large with
mmap and returns them on free, so every step page-faults all of them in again (a fresh 16 MB tensor costs ~4096
faults, more than some whole layers). The runner asks glibc once, process-wide, to keep such blocks on its heap for
reuse (`cpu_kernels.reuse_freed_memory`): measured on the released x4 network at 256 x 256, 801 -> 746 ms per step and peak RSS
731 -> 623 MiB.

Refusal: a model this runner cannot run exactly (an op type without a converter, a `bdm` node whose attributes the
kernels do not support, weights computed in the graph, an fp16 export) or kernels that cannot load raise
`KernelsRefused` with one line naming the reason; `backends.onnx_runner` then falls back to ONNX Runtime with the
function bodies and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import onnx
import torch

from bdm.contract import OUTPUT_NAME
from bdm.errors import BdmError
from bdm.plugins import cpu_kernels, spec
from bdm.plugins.reference import complete_attributes
from bdm.runtime.backends import Limits, OnnxFileRunner, model_input_names
from bdm.runtime.execution_plan import ExecutionPlan
from bdm.runtime.torch_ops import NodeView, Unsupported

DOMAIN = spec.common()["domain"]
# The inputs of each kernel op that the kernels take on every call; the others are weights and tables, handed over
# once when the plan is built (the CpuKernels.prepare contract).
RUNTIME_INPUTS = cpu_kernels.RUNTIME_INPUTS


class KernelsRefused(BdmError):
    """This model cannot run on the bdm CPU kernels (one line why); ONNX Runtime can run its function bodies."""


def _op_attributes(op_type: str, node: NodeView) -> Dict[str, int]:
    """The node's spec attributes (defaults filled in), without the TensorRT plugin selectors."""
    declared = spec.op(op_type)["attributes"]
    try:
        return complete_attributes(op_type, {k: v for k, v in node.attributes.items() if k in declared})
    except ValueError as e:
        node.refuse(str(e))


def _kernel_converter(kernels, op_type: str):
    """Converter of one kernel op: its constant inputs prepared once, its runtime inputs passed on each call."""
    names = spec.input_names(op_type)
    runtime = RUNTIME_INPUTS[op_type]

    def convert(node: NodeView):
        attributes = _op_attributes(op_type, node)
        why = kernels.supports(op_type, attributes)
        if why:
            node.refuse(f"the CPU kernels do not support it: {why}")
        constants = {}
        for name, value in zip(names, node.constants):
            if name in runtime:
                continue
            if value is None:
                node.refuse(f"its input {name} is computed in the graph; the CPU kernels take it as a weight")
            constants[name] = value.numpy()
        try:
            prepared = kernels.prepare(op_type, attributes, constants)
        except cpu_kernels.CpuKernelsUnavailable as e:
            node.refuse(f"the CPU kernels do not support it: {e}")
        positions = [names.index(n) for n in runtime]

        def run(*inputs):
            return prepared(**{name: inputs[i].contiguous() for name, i in zip(runtime, positions)})

        return run

    return convert


def _group_rows(node: NodeView, tables: Iterable[str], attributes: Dict[str, int]):
    """Per group g, the rows [1, C, 1, 1] of the node's constant [K, C] tables (spec group_rule)."""
    names = spec.input_names(node.op_type)
    rows = []
    for name in tables:
        table = node.constants[names.index(name)]
        if table is None:
            node.refuse(f"its table {name} is computed in the graph")
        rows.append([table[g].to(torch.float32).reshape(1, -1, 1, 1) for g in range(attributes["num_groups"])])
    return list(zip(*rows))


def _group(t: torch.Tensor, attributes: Dict[str, int]) -> int:
    return spec.group_index(int(t.reshape(-1)[0]), attributes["num_groups"], attributes["total_steps"])


def _timestep_bias(node: NodeView):
    """TimestepBias (the unfused form's TaR), the spec's one float32 add: x + table[g]."""
    attributes = _op_attributes("TimestepBias", node)
    rows = _group_rows(node, ["table"], attributes)

    def run(x, t, *tables):
        (table,) = rows[_group(t, attributes)]
        return (x.to(torch.float32) + table).to(x.dtype)

    return run


def _timestep_rprelu(node: NodeView):
    """TimestepRPReLU (the unfused form's TaA): z = x + bias0[g]; z if z >= 0 else slope[g] * z; + bias1[g]."""
    attributes = _op_attributes("TimestepRPReLU", node)
    rows = _group_rows(node, ["bias0", "slope", "bias1"], attributes)

    def run(x, t, *tables):
        bias0, slope, bias1 = rows[_group(t, attributes)]
        z = x.to(torch.float32) + bias0
        return (torch.where(z >= 0, z, slope * z) + bias1).to(x.dtype)

    return run


def load_kernels(threads: Optional[int] = None):
    """The CPU kernels (built on first use), or KernelsRefused saying why they cannot load here."""
    try:
        return cpu_kernels.load(threads=threads)
    except cpu_kernels.CpuKernelsUnavailable as e:
        raise KernelsRefused(f"the bdm CPU kernels cannot load: {e}") from None


def bdm_converters(kernels) -> dict:
    """(domain, op_type) -> converter for every `bdm` op."""
    converters = {(DOMAIN, op_type): _kernel_converter(kernels, op_type) for op_type in RUNTIME_INPUTS}
    converters[(DOMAIN, "TimestepBias")] = _timestep_bias
    converters[(DOMAIN, "TimestepRPReLU")] = _timestep_rprelu
    return converters


class CpuKernelRunner(OnnxFileRunner):
    """See the module doc. `kernels`: a CpuKernels (default: bdm.plugins.cpu_kernels.load()); `threads`: for the
    kernels and torch's ops (process-wide in PyTorch: one runner per process, as a Ray worker is), default torch's."""

    def __init__(self, onnx_path, kernels=None, fuse: bool = True, threads: Optional[int] = None):
        path = Path(onnx_path)
        if not path.is_file():
            raise BdmError(f"--onnx {path}: no such ONNX file")
        try:
            model = onnx.load(str(path))
        except Exception as e:  # protobuf's DecodeError and onnx's own errors
            raise BdmError(f"--onnx {path} is not an ONNX model ({type(e).__name__}); "
                           "export it again with `bdm export`") from None
        graph_inputs = {i.name: i for i in model.graph.input}
        self.input_names = model_input_names(list(graph_inputs), [o.name for o in model.graph.output],
                                             f"--onnx {path}", "export it with `bdm export`")
        x_type = graph_inputs["x_t"].type.tensor_type.elem_type
        if x_type != onnx.TensorProto.FLOAT:
            raise KernelsRefused(f"{path} computes in {onnx.helper.tensor_dtype_to_np_dtype(x_type).name}; the CPU "
                                 "kernels run float32 exports")
        if threads:
            torch.set_num_threads(threads)
        cpu_kernels.reuse_freed_memory()
        kernels = kernels if kernels is not None else load_kernels(threads)
        try:
            self.plan = ExecutionPlan(model, bdm_converters(kernels), fuse=fuse)
        except Unsupported as e:
            raise KernelsRefused(f"{path}: {e}") from None
        self.kernels = kernels
        self.path = path
        self.metadata = {p.key: p.value for p in model.metadata_props}
        self.limits = Limits(dtype="float32")
        self.name = f"bdm CPU kernels ({kernels.isa}, {kernels.threads} threads)"

    def _feed(self, feed: dict) -> Dict[str, torch.Tensor]:
        tensors = {}
        for name in self.input_names:
            array = np.ascontiguousarray(feed[name], dtype=np.int64 if name == "t" else np.float32)
            tensors[name] = torch.from_numpy(array if array.flags.writeable else array.copy())
        n = tensors["x_t"].shape[0]
        if tensors["t"].shape[0] != n:
            tensors["t"] = tensors["t"].reshape(-1)[:1].expand(n).contiguous()
        return tensors

    def infer(self, feed: dict) -> dict:
        with torch.inference_mode():
            eps = self.plan.run(self._feed(feed))[OUTPUT_NAME]
        return {OUTPUT_NAME: eps.numpy()}

    def values(self, feed: dict, names: Iterable[str]) -> Dict[str, np.ndarray]:
        """eps and the named graph values of one run (node inputs and outputs, for layer-by-layer comparisons)."""
        with torch.inference_mode():
            values = self.plan.run(self._feed(feed), keep=names)
        return {name: value.numpy() for name, value in values.items()}

    def close(self):
        if getattr(self, "plan", None) is not None:
            self.plan.release()
            self.plan = None


def comparison_runner(onnx_path, log) -> "CpuKernelRunner | None":
    """The CPU kernels runner of an exported file for a parity comparison (`bdm validate`), or None with one line on
    `log` saying why the kernels cannot run it."""
    try:
        return CpuKernelRunner(onnx_path)
    except KernelsRefused as e:
        log(f"cpu-kernels: not compared ({e})")
        return None
