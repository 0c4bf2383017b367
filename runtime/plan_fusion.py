"""Pattern fusions of an execution plan (runtime/execution_plan.py): chains of nodes that the exporters write for
one PyTorch op, replaced by that torch op, which computes the same thing up to float rounding in one or two passes
over the activation instead of five.

- GroupNorm: Reshape(x, [0, G, -1]) -> InstanceNormalization(scale 1, bias 0) -> Reshape(Shape(x)) -> Mul(gamma)
  -> Add(beta), gamma and beta constant [C, 1, ...] -> torch group_norm(x, G, gamma, beta, eps).
- SiLU: Mul(a, Sigmoid(a)) -> torch silu(a); directly after a fused GroupNorm it runs in place on its output.
- Slices of a Concat: a Concat read only by Slices (and Shape) is not materialized; each Slice whose range lies in
  one of the concatenated tensors is a view of that tensor (the U-Net's skip joins, cut into halves again by
  CS-Fusion), any other concatenates first.

A chain is fused only where its intermediate values have no other reader and are not graph outputs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set

import torch
import torch.nn.functional as F

from bdm.runtime.execution_plan import PlanNode
from bdm.runtime.torch_ops import slice_bounds


class _Graph:
    def __init__(self, nodes: List[PlanNode], protected: Set[str]):
        self.nodes = nodes
        self.protected = protected
        self.readers: Dict[str, List[PlanNode]] = {}
        self.producer: Dict[str, PlanNode] = {}
        for node in nodes:
            for v in node.inputs:
                if v:
                    self.readers.setdefault(v, []).append(node)
            for v in node.outputs:
                self.producer[v] = node

    def only_reader(self, value: str, op_type: str) -> Optional[PlanNode]:
        """The one node reading `value`, if it is of `op_type` and `value` is not a graph output."""
        readers = self.readers.get(value, [])
        if len(readers) == 1 and readers[0].op_type == op_type and value not in self.protected:
            return readers[0]
        return None


def _channel_vector(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A constant [C, 1, ..., 1] (or [1, C, 1, ...]) per-channel vector as [C], else None."""
    if value is None or not value.is_floating_point() or value.dim() < 2:
        return None
    shape = list(value.shape)
    if shape[0] == 1 and value.dim() > 2:
        shape = shape[1:]
    if any(d != 1 for d in shape[1:]):
        return None
    return value.reshape(-1)


def _other_input(node: PlanNode, value: str) -> Optional[str]:
    others = [v for v in node.inputs if v != value]
    return others[0] if len(others) == 1 and len(node.inputs) == 2 else None


def _group_norm(graph: _Graph, reshape: PlanNode, constants) -> Optional[tuple]:
    """(fused node, replaced nodes) for a GroupNorm chain starting at `reshape`, else None."""
    target = constants.get(reshape.inputs[1])
    if target is None or target.dim() != 1 or target.numel() != 3 or target[0] != 0 or target[2] != -1:
        return None
    groups = int(target[1])
    norm = graph.only_reader(reshape.outputs[0], "InstanceNormalization")
    if norm is None or norm.inputs[0] != reshape.outputs[0]:
        return None
    scale, bias = constants.get(norm.inputs[1]), constants.get(norm.inputs[2])
    if scale is None or bias is None or scale.numel() != groups or not bool((scale == 1).all()) \
            or not bool((bias == 0).all()):
        return None
    back = graph.only_reader(norm.outputs[0], "Reshape")
    shape_node = graph.producer.get(back.inputs[1]) if back is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.inputs[0] != reshape.inputs[0] \
            or back.inputs[0] != norm.outputs[0]:
        return None
    eps = norm.attributes.get("epsilon", 1e-5)
    chain = [reshape, norm, back]
    gamma = beta = None
    mul = graph.only_reader(back.outputs[0], "Mul")
    if mul is not None:
        gamma = _channel_vector(constants.get(_other_input(mul, back.outputs[0]) or ""))
    add = graph.only_reader(mul.outputs[0], "Add") if gamma is not None else None
    if add is not None:
        beta = _channel_vector(constants.get(_other_input(add, mul.outputs[0]) or ""))
    if gamma is not None and beta is not None and gamma.numel() == beta.numel() and gamma.numel() % groups == 0:
        chain += [mul, add]
    else:
        gamma = beta = None
    return chain, groups, gamma, beta, eps


def fuse(nodes: List[PlanNode], constants: Dict[str, torch.Tensor], protected: Set[str]) -> List[PlanNode]:
    """The plan's nodes with the patterns of the module doc fused."""
    graph = _Graph(nodes, protected)
    replaced: Dict[int, Optional[PlanNode]] = {}   # id(node) -> its replacement (None: dropped)
    for node in nodes:
        if node.op_type != "Reshape" or id(node) in replaced:
            continue
        found = _group_norm(graph, node, constants)
        if found is None:
            continue
        chain, groups, gamma, beta, eps = found
        last = chain[-1]
        silu = _silu_after(graph, last.outputs[0])
        outputs = silu.outputs if silu is not None else last.outputs
        fused = PlanNode(f"{node.name}+GroupNorm" + ("+SiLU" if silu else ""), "GroupNorm", [node.inputs[0]],
                         list(outputs), _group_norm_fn(groups, gamma, beta, eps, silu is not None), fresh=True)
        for member in chain + (list(_silu_chain(graph, last.outputs[0])) if silu else []):
            replaced[id(member)] = None
        replaced[id(chain[0])] = fused
    for node in nodes:
        if node.op_type == "Sigmoid" and id(node) not in replaced:
            mul = graph.only_reader(node.outputs[0], "Mul")
            if mul is not None and id(mul) not in replaced and sorted(mul.inputs) == sorted([node.inputs[0],
                                                                                             node.outputs[0]]):
                replaced[id(node)] = PlanNode(f"{mul.name}+SiLU", "SiLU", [node.inputs[0]], list(mul.outputs),
                                              F.silu, fresh=True)
                replaced[id(mul)] = None
    for node in nodes:
        if node.op_type == "Concat" and _read_by_slices(graph, node):
            replaced[id(node)] = None
            for reader in graph.readers[node.outputs[0]]:
                replaced[id(reader)] = _from_parts(node, reader)
    return [replaced.get(id(n), n) for n in nodes if replaced.get(id(n), n) is not None]


def _read_by_slices(graph: _Graph, concat: PlanNode) -> bool:
    value = concat.outputs[0]
    readers = graph.readers.get(value, [])
    return value not in graph.protected and any(r.op_type == "Slice" for r in readers) and all(
        (r.op_type == "Slice" and r.inputs.index(value) == 0 and r.inputs.count(value) == 1)
        or (r.op_type == "Shape" and r.inputs == [value]) for r in readers)


def _from_parts(concat: PlanNode, reader: PlanNode) -> PlanNode:
    """`reader` (a Slice or Shape of the Concat) computed from the concatenated tensors themselves."""
    axis, count = concat.attributes["axis"], len(concat.inputs)
    inputs = concat.inputs + reader.inputs[1:]
    if reader.op_type == "Shape":
        start, end = reader.attributes.get("start", 0), reader.attributes.get("end")

        def shape(*parts):
            dims = list(parts[0].shape)
            dims[axis] = sum(part.shape[axis] for part in parts)
            return torch.tensor(dims[start:end], dtype=torch.int64)

        return PlanNode(reader.name, "Shape", inputs, list(reader.outputs), shape, fresh=True, shape_only=True)
    whole_slice = reader.fn

    def slice_of_parts(*inputs):
        parts, params = inputs[:count], inputs[count:]
        starts, ends = params[0].reshape(-1), params[1].reshape(-1)
        rank = parts[0].dim()
        axes = params[2].reshape(-1) if len(params) > 2 and params[2] is not None else torch.tensor([0])
        steps = params[3].reshape(-1) if len(params) > 3 and params[3] is not None else torch.tensor([1])
        if starts.numel() == 1 and int(axes[0]) % rank == axis % rank and int(steps[0]) == 1:
            sizes = [part.shape[axis] for part in parts]
            start, end = slice_bounds(sum(sizes), int(starts[0]), int(ends[0]), 1)
            offset = 0
            for part, size in zip(parts, sizes):
                if offset <= start and end <= offset + size and start < end:
                    return part.narrow(axis, start - offset, end - start)
                offset += size
        return whole_slice(torch.cat(parts, axis), *params)

    return PlanNode(reader.name, "Slice", inputs, list(reader.outputs), slice_of_parts, aliased_inputs=count)


def _silu_chain(graph: _Graph, value: str):
    sigmoid = next((n for n in graph.readers.get(value, []) if n.op_type == "Sigmoid"), None)
    mul = graph.only_reader(sigmoid.outputs[0], "Mul") if sigmoid is not None else None
    return (sigmoid, mul) if mul is not None else ()


def _silu_after(graph: _Graph, value: str) -> Optional[PlanNode]:
    """The Mul of x * Sigmoid(x) when `value` is read by exactly that pair and nothing else."""
    if value in graph.protected or len(graph.readers.get(value, [])) != 2:
        return None
    chain = _silu_chain(graph, value)
    if not chain or sorted(chain[1].inputs) != sorted([value, chain[0].outputs[0]]):
        return None
    return chain[1]


def _group_norm_fn(groups: int, gamma, beta, eps: float, silu: bool):
    if silu:
        return lambda x: F.silu(F.group_norm(x, groups, gamma, beta, eps), inplace=True)
    return lambda x: F.group_norm(x, groups, gamma, beta, eps)


def drop_unread(nodes: List[PlanNode], protected: Set[str]) -> List[PlanNode]:
    """Without the nodes whose outputs nobody reads (after fusion: the Shape feeding a fused Reshape)."""
    needed = set(protected)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.outputs):
            kept.append(node)
            needed.update(v for v in node.inputs if v)
    return kept[::-1]
