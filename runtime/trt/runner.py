"""`TrtRunner`: a bdm engine run in TensorRT behind the backends.Runner interface, with its lifecycle (per-shape
execution contexts, buffers and CUDA graphs in a bounded cache; close() or a `with` block frees them)."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, NamedTuple

import numpy as np

from bdm.contract import OUTPUT_NAME
from bdm.errors import BdmError
from bdm.files import file_sha256
from bdm.runtime.backends import Limits, Runner, model_input_names
from bdm.runtime.trt.environment import gpu_identity, import_tensorrt, load_plugins, make_logger, resolve_plugins
from bdm.runtime.trt.profile import Shape
from bdm.runtime.trt.sidecar import check_sidecar

# Input shapes a TrtRunner keeps buffers, a context and a CUDA graph for (least recently used ones go first): the
# whole-image shape and a few tile shapes of one image.
DEFAULT_MAX_SHAPES = 4


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
        self._logger = make_logger(trt)
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
