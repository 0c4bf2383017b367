"""An ONNX graph loaded once into an execution plan of torch CPU calls.

Building the plan (once per model):
- every initializer and Constant becomes a torch tensor; every node gets its function from its converter
  (runtime/torch_ops.py for the default domain, the caller's converters for custom domains such as `bdm`), which
  sees the constant inputs, so work that depends only on weights happens here, once;
- nodes whose inputs are all constant are evaluated now (constant folding);
- obvious patterns are fused where the fused torch op is the same computation up to float rounding
  (runtime/plan_fusion.py), and nodes nobody reads are dropped;
- liveness: every intermediate is released right after its last reader, and an elementwise op whose first input
  dies there (and shares no memory with a live value) writes into it instead of allocating.

Running it: the "prologue", every value that depends only on the input shapes and on the integer inputs (t: the
timestep embedding, the group selection, all shape arithmetic), is computed on the first call and reused while the
shapes and t stay the same (the tiles of one sampler step); the rest runs in the file's node order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from bdm.runtime import torch_ops
from bdm.runtime.torch_ops import NodeView, Unsupported

DEFAULT_DOMAINS = ("", "ai.onnx")

Converter = Callable[[NodeView], Callable]


@dataclass
class PlanNode:
    """One call of the plan: fn(*inputs) -> output (or a tuple of outputs)."""

    name: str
    op_type: str
    inputs: List[str]            # '' for an omitted optional input
    outputs: List[str]
    fn: Callable
    fresh: bool = False          # its outputs never share memory with its inputs (else: maybe with inputs[0])
    aliased_inputs: int = 1      # when not fresh: how many leading inputs its outputs may be views of
    in_place: Optional[Callable] = None   # fn variant that writes into inputs[0] (elementwise ops)
    shape_only: bool = False     # reads only the shapes of its inputs (Shape, Size)
    attributes: Dict[str, object] = field(default_factory=dict)


def _attribute_value(attribute: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return _tensor(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def _tensor(proto: onnx.TensorProto) -> torch.Tensor:
    array = numpy_helper.to_array(proto)
    return torch.from_numpy(np.array(array, copy=True)) if array.ndim else torch.tensor(array.item(),
                                                                                          dtype=_dtype(array))


def _dtype(array: np.ndarray) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, array.dtype)).dtype


def _constant_node_value(node: onnx.NodeProto) -> torch.Tensor:
    attribute = node.attribute[0]
    value = onnx.helper.get_attribute_value(attribute)
    if attribute.name == "value":
        return _tensor(value)
    dtypes = {"value_float": torch.float32, "value_floats": torch.float32, "value_int": torch.int64,
              "value_ints": torch.int64}
    if attribute.name not in dtypes:
        raise Unsupported(f"node {node.name} (Constant): attribute {attribute.name} is not supported")
    return torch.tensor(value, dtype=dtypes[attribute.name])


# elementwise ops that may write into their first input: (in place, out of place)
_ELEMENTWISE = {"Add": (torch.Tensor.add_, torch.add), "Sub": (torch.Tensor.sub_, torch.sub),
                "Mul": (torch.Tensor.mul_, torch.mul)}


def _in_place(op_type: str) -> Callable:
    """op(a, b) written into a where the broadcast result has a's shape and dtype, else into a new tensor."""
    in_place, out_of_place = _ELEMENTWISE[op_type]

    def fn(a, b):
        if a.dtype == b.dtype and a.is_floating_point() and _broadcasts_into(b.shape, a.shape):
            return in_place(a, b)
        return out_of_place(a, b)

    return fn


def _broadcasts_into(small: torch.Size, big: torch.Size) -> bool:
    """broadcast(big, small) == big (torch.broadcast_shapes costs ~0.1 ms a call)."""
    if len(small) > len(big):
        return False
    return all(s == b or s == 1 for s, b in zip(reversed(small), reversed(big)))


class ExecutionPlan:
    """See the module doc. `custom`: (domain, op_type) -> converter for the non-standard nodes."""

    def __init__(self, model: onnx.ModelProto, custom: Optional[Dict[Tuple[str, str], Converter]] = None,
                 fuse: bool = True):
        from bdm.runtime import plan_fusion

        custom = custom or {}
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
        self._check_op_types(graph, custom)
        self.constants: Dict[str, torch.Tensor] = {i.name: _tensor(i) for i in graph.initializer}
        initializer_names = set(self.constants)
        self.input_names = [i.name for i in graph.input if i.name not in initializer_names]
        self.output_names = [o.name for o in graph.output]
        self.input_types = {i.name: i.type.tensor_type.elem_type for i in graph.input if i.name in self.input_names}
        # integer inputs (t) key the prologue by value; float inputs (x_t, cond) by shape only
        self.keyed_inputs = [n for n in self.input_names
                             if not torch_ops.TORCH_DTYPES.get(self.input_types[n], torch.float32).is_floating_point]
        nodes = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                self.constants[node.output[0]] = _constant_node_value(node)
                continue
            plan_node = self._convert(node, custom)
            if all(i in self.constants for i in plan_node.inputs if i) and node.domain in DEFAULT_DOMAINS:
                outputs = plan_node.fn(*(self.constants[i] if i else None for i in plan_node.inputs))
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                self.constants.update(zip(plan_node.outputs, outputs))
                continue
            nodes.append(plan_node)
        if fuse:
            nodes = plan_fusion.fuse(nodes, self.constants, set(self.output_names))
        self.nodes = plan_fusion.drop_unread(nodes, set(self.output_names))
        self.fused = fuse
        self._compile()
        self._cache_key = None
        self._cache: List[Tuple[int, torch.Tensor]] = []

    # --- building ---------------------------------------------------------------------------------------------

    def _check_op_types(self, graph: onnx.GraphProto, custom):
        missing = {}
        for node in graph.node:
            known = (node.op_type in torch_ops.CONVERTERS or node.op_type == "Constant"
                     if node.domain in DEFAULT_DOMAINS else (node.domain, node.op_type) in custom)
            if not known:
                missing.setdefault(f"{node.domain + '::' if node.domain else ''}{node.op_type}", node.name)
        if missing:
            listed = ", ".join(f"{op} (e.g. node {name})" for op, name in missing.items())
            raise Unsupported(f"no CPU implementation of the op type(s) {listed}")

    def _convert(self, node: onnx.NodeProto, custom) -> PlanNode:
        view = NodeView(op_type=node.op_type, name=node.name,
                        attributes={a.name: _attribute_value(a) for a in node.attribute},
                        constants=[self.constants.get(i) if i else None for i in node.input],
                        present=[bool(i) for i in node.input], num_outputs=len(node.output), opset=self.opset,
                        domain=node.domain, inputs=list(node.input))
        standard = node.domain in DEFAULT_DOMAINS
        converter = torch_ops.CONVERTERS[node.op_type] if standard else custom[(node.domain, node.op_type)]
        fn = converter(view)
        return PlanNode(node.name, node.op_type, list(node.input), list(node.output), fn,
                        fresh=(node.op_type in torch_ops.FRESH_OUTPUT) if standard else True,
                        in_place=_in_place(node.op_type) if standard and node.op_type in _ELEMENTWISE else None,
                        shape_only=standard and node.op_type in ("Shape", "Size"), attributes=view.attributes)

    def _compile(self):
        """Slots, the prologue, liveness and in-place updates: see the module doc."""
        names = list(self.constants) + self.input_names
        names += [o for n in self.nodes for o in n.outputs if o not in self.constants]
        self.slots = {name: i for i, name in enumerate(dict.fromkeys(names))}
        self._constant_env = [None] * len(self.slots)
        for name, value in self.constants.items():
            self._constant_env[self.slots[name]] = value

        # prologue: depends on input shapes and integer inputs only
        prologue_values = set(self.constants) | set(self.keyed_inputs)
        self.prologue = []
        for i, node in enumerate(self.nodes):
            if node.shape_only or all(v in prologue_values for v in node.inputs if v):
                self.prologue.append(i)
                prologue_values.update(node.outputs)
        self._prologue_outputs = [self.slots[o] for i in self.prologue for o in self.nodes[i].outputs]
        persistent = prologue_values | set(self.input_names) | set(self.output_names)

        # memory roots: a fresh output is its own root; any other output may be a view of the node's leading inputs
        roots: Dict[str, frozenset] = {name: frozenset([name]) for name in persistent}
        for node in self.nodes:
            for output in node.outputs:
                roots.setdefault(output, frozenset([output]) if node.fresh else
                                 frozenset().union(*(roots[v] for v in node.inputs[:node.aliased_inputs])))

        self._steps = {cached: self._liveness(cached, roots, persistent) for cached in (False, True)}

    def _liveness(self, cached: bool, roots, persistent) -> List[tuple]:
        """The step list of a run with (cached) or without the prologue cache: (fn, input slots, output slots,
        slots to release after the step)."""
        skipped = set(self.prologue) if cached else set()
        order = [i for i in range(len(self.nodes)) if i not in skipped]
        last_read: Dict[str, int] = {}
        for position, i in enumerate(order):
            for v in self.nodes[i].inputs:
                if v:
                    last_read[v] = position
        by_root: Dict[str, List[str]] = {}
        for value, value_roots in roots.items():
            for root in value_roots:
                by_root.setdefault(root, []).append(value)

        def dies_here(value: str, position: int) -> bool:
            """`value` is last read at `position`, and every other value sharing its memory before."""
            if value in persistent or last_read.get(value) != position:
                return False
            sharing = {w for root in roots[value] for w in by_root[root]} - {value}
            return all(w not in persistent and last_read.get(w, -1) < position for w in sharing)

        steps = []
        for position, i in enumerate(order):
            node = self.nodes[i]
            fn = node.fn
            first = node.inputs[0] if node.inputs else ""
            if node.in_place is not None and first and node.inputs.count(first) == 1 and dies_here(first, position):
                fn = node.in_place
            frees = tuple(self.slots[v] for v in dict.fromkeys(node.inputs)
                          if v and last_read.get(v) == position and v not in persistent)
            frees += tuple(self.slots[o] for o in node.outputs if o not in last_read and o not in persistent)
            steps.append((fn, tuple(self.slots[v] if v else -1 for v in node.inputs),
                          tuple(self.slots[o] for o in node.outputs), frees))
        return steps

    # --- running ----------------------------------------------------------------------------------------------

    def run(self, feed: Dict[str, torch.Tensor], keep: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
        """The graph outputs (and the values named in `keep`, for probing: then nothing is released or updated in
        place, and the prologue is recomputed)."""
        keep = list(keep)
        env = list(self._constant_env)
        for name in self.input_names:
            env[self.slots[name]] = feed[name]
        key = tuple((name, tuple(feed[name].shape)) for name in self.input_names) + \
            tuple(feed[name].numpy().tobytes() for name in self.keyed_inputs)
        cached = not keep and key == self._cache_key
        if cached:
            for slot, value in self._cache:
                env[slot] = value
            steps = self._steps[True]
        else:
            steps = self._steps[False] if not keep else [(self.nodes[i].fn, s[1], s[2], ())
                                                         for i, s in enumerate(self._steps[False])]
        for fn, inputs, outputs, frees in steps:
            result = fn(*[env[i] if i >= 0 else None for i in inputs])
            if len(outputs) == 1:
                env[outputs[0]] = result
            else:
                for slot, value in zip(outputs, result):
                    env[slot] = value
            for slot in frees:
                env[slot] = None
        if not cached:
            self._cache_key = key if not keep else None
            self._cache = [(slot, env[slot]) for slot in self._prologue_outputs if env[slot] is not None]
        wanted = self.output_names + [k for k in keep if k not in self.output_names]
        return {name: env[self.slots[name]] for name in wanted}

    def release(self):
        """Drop the cached prologue, the constants and the prepared functions."""
        self._cache, self._cache_key = [], None
        self._constant_env, self.constants, self.nodes, self._steps = [], {}, [], {}
