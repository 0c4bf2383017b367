"""Noise-predictor backends behind one small interface (Polygraphy style):

    runner.infer({"x_t": x, "cond": c, "t": t}) -> {"eps": eps}

An unconditional model (BinaryDM, `bdm generate`) takes no cond: its feeds and `input_names` are ("x_t", "t").
Every runner names its model's inputs in `input_names`, in the contract's CONDITIONAL_INPUT_NAMES order
(`model_input_names` checks an ONNX graph's or an engine's); the runners of exported models (ONNX Runtime,
TensorRT) also carry in `metadata` what `bdm export` recorded in the ONNX file (an engine's sidecar keeps a copy).

x_t, cond: float32 [N, 3, H, W] (H, W multiples of 8); t: int64 [N] (one timestep for the whole batch, or
[1], broadcast); eps: float32 [N, 3, H, W]. Each runner also states what it accepts (`Limits`: batch, the
smallest/largest H and W, the dtype it computes in) and where the sampler state should live
(`to_device` / `to_host`: identity for host backends; the TensorRT runner keeps it on the GPU).

- `TorchRunner`: the PyTorch reference model (`bdm.load_model`), on CPU or a CUDA GPU.
- `OrtRunner`: an exported ONNX file in ONNX Runtime, with the CUDA execution provider when
  onnxruntime-gpu offers it, else the CPU provider (the `bdm` nodes as their function bodies).
- `CpuKernelRunner` (runtime/kernel_runner.py): an exported ONNX file on the CPU with the `bdm` nodes on the
  bit-packed CPU kernels; `onnx_runner` chooses it for `--onnx` where ONNX Runtime has no GPU.
- `TrtRunner` (runtime/trt/runner.py, needs TensorRT): a serialized engine with the bdm plugins.

`make_runner` picks the runner of the one model given (what `bdm upscale` and `bdm generate` run).

A runner that keeps the state on a device returns device arrays from `to_device` and `infer`; the sampler
and the tiling use on them only slicing, item assignment (`a[j] = b[...]`, `a[...] = 0`), `*`, `+`, `-`,
`/`, `*=`, `+=`, `.clip()`, `abs()` and `.max()`, which numpy, torch and cupy arrays all provide; `t` stays
a host int64 array. Runners take float32 and return float32; one that computes in fp16 casts inside.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from bdm.contract import CHECKPOINT_KEY, CONDITIONAL_INPUT_NAMES, OUTPUT_NAME, UNCONDITIONAL_INPUT_NAMES
from bdm.errors import BdmError


@dataclass(frozen=True)
class Limits:
    """What a runner accepts. None means no limit."""

    dtype: str = "float32"                       # precision the network computes in
    max_batch: Optional[int] = None              # tiles per call; 1 = no batching
    min_hw: Tuple[int, int] = (8, 8)
    max_hw: Optional[Tuple[int, int]] = None     # e.g. a TensorRT optimisation profile's max shape
    memory_budget: Optional[int] = None          # bytes the network may use; None: the host default


def host_memory_budget() -> int:
    """A quarter of physical memory: room for the activations next to everything else on the machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class Runner:
    """Base class: host (numpy) arrays, no shape limits. Subclasses implement `infer`, and `close` where they hold
    device memory (a runner is also a context manager that closes it)."""

    name = "runner"
    limits = Limits()
    input_names = CONDITIONAL_INPUT_NAMES  # or UNCONDITIONAL_INPUT_NAMES

    def describe(self) -> str:
        return self.name

    def to_device(self, array: np.ndarray):
        return array

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array)

    def infer(self, feed: dict) -> dict:
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def model_input_names(inputs, outputs, what: str, fix: str) -> Tuple[str, ...]:
    """The bdm inputs of a model (ONNX graph or TensorRT engine) with these input and output names, in
    CONDITIONAL_INPUT_NAMES order: CONDITIONAL_INPUT_NAMES (BI-DiffSR) or UNCONDITIONAL_INPUT_NAMES (BinaryDM). Any
    other set of inputs cannot be fed by bdm: BdmError naming `what`, with `fix` as the remedy."""
    names = tuple(n for n in CONDITIONAL_INPUT_NAMES if n in inputs)
    layouts = (CONDITIONAL_INPUT_NAMES, UNCONDITIONAL_INPUT_NAMES)
    if set(inputs) != set(names) or names not in layouts or OUTPUT_NAME not in outputs:
        raise BdmError(f"{what} has inputs {list(inputs)} and outputs {list(outputs)}; a bdm model has inputs "
                       f"{list(CONDITIONAL_INPUT_NAMES)} (unconditional: {list(UNCONDITIONAL_INPUT_NAMES)}) and output "
                       f"{OUTPUT_NAME!r} ({fix})")
    return names


# What each input layout is, and the command that runs it.
_LAYOUTS = {CONDITIONAL_INPUT_NAMES: ("a conditional (BI-DiffSR)", "bdm upscale"),
            UNCONDITIONAL_INPUT_NAMES: ("an unconditional (BinaryDM)", "bdm generate")}


def require_inputs(runner, expected: Tuple[str, ...]):
    """Before any work: the runner's model has the `expected` layout, else one line naming the command for it."""
    names = tuple(runner.input_names)
    if names != expected:
        kind, command = _LAYOUTS[names] if names in _LAYOUTS else ("a non-bdm", None)
        raise BdmError(f"{runner.describe()} takes inputs {list(names)}: {kind} model; {_LAYOUTS[expected][1]} runs "
                       f"models with inputs {list(expected)}" + (f": use `{command}` for this one" if command else ""))


def _check_file(path: Path, what: str, option: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BdmError(f"{option} {path}: no such {what} file")
    return path


class TorchRunner(Runner):
    """The PyTorch reference: `bdm.load_model(ckpt, config=...)`, or an already built module."""

    def __init__(self, ckpt=None, config=None, device: Optional[str] = None, model=None,
                 threads: Optional[int] = None):
        import torch

        self.torch = torch
        if threads:  # process-wide in PyTorch: one runner per process (a Ray worker is one)
            torch.set_num_threads(threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise BdmError(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu")
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise BdmError(f"--device {device} is not a torch device; use cpu or cuda") from None
        if model is None:
            import bdm

            model = bdm.load_model(_check_file(ckpt, "checkpoint", "--ckpt"), config=config)
        self.model = model.eval().to(self.device)
        parameters = inspect.signature(self.model.forward).parameters
        self.input_names = tuple(n for n in CONDITIONAL_INPUT_NAMES if n in parameters)
        self.name = f"PyTorch ({self.device.type})"
        self.source = str(ckpt) if ckpt is not None else "in-memory model"

    def describe(self) -> str:
        return f"{self.name}, checkpoint {self.source}"

    def infer(self, feed: dict) -> dict:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.as_tensor(np.asarray(feed[name])).to(self.device) for name in self.input_names]
            eps = self.model(*args)
        return {OUTPUT_NAME: eps.float().cpu().numpy()}


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class OnnxFileRunner(Runner):
    """A runner of an exported ONNX file (`path`, its metadata map `metadata`)."""

    path: Path
    metadata: Dict[str, str]

    def describe(self) -> str:
        source = self.metadata.get(CHECKPOINT_KEY)
        return f"{self.name}, model {self.path}" + (f" (exported from checkpoint {source})" if source else "")


class OrtRunner(OnnxFileRunner):
    """ONNX Runtime on an exported model; CUDA EP where onnxruntime-gpu provides it, else CPU."""

    def __init__(self, onnx_path, providers=None, threads: Optional[int] = None):
        import onnxruntime as ort

        path = _check_file(onnx_path, "ONNX", "--onnx")
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:  # else ONNX Runtime's default: one thread per physical core
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own exception types for unreadable or invalid models
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BdmError(f"--onnx {path}: ONNX Runtime cannot load it ({reason}); "
                           "export it again with `bdm export`") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = model_input_names(list(inputs), [o.name for o in self.session.get_outputs()],
                                             f"--onnx {path}", "export it with `bdm export`")
        self.input_types = {n: _ORT_TYPES.get(inputs[n].type, np.float32) for n in self.input_names}
        batch = inputs["x_t"].shape[0]
        self.limits = Limits(dtype=np.dtype(self.input_types["x_t"]).name,
                             max_batch=batch if isinstance(batch, int) else None)
        self.provider = self.session.get_providers()[0]
        self.name = f"ONNX Runtime ({self.provider.replace('ExecutionProvider', '')})"
        self.path = path
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def infer(self, feed: dict) -> dict:
        ort_feed = {n: np.ascontiguousarray(np.asarray(feed[n]), dtype=self.input_types[n])
                    for n in self.input_names}
        if ort_feed["t"].shape[0] != ort_feed["x_t"].shape[0]:
            ort_feed["t"] = np.broadcast_to(ort_feed["t"], ort_feed["x_t"].shape[:1]).copy()
        (eps,) = self.session.run([OUTPUT_NAME], ort_feed)
        return {OUTPUT_NAME: eps.astype(np.float32, copy=False)}


def onnx_runner(onnx_path, stream=None, threads: Optional[int] = None) -> Runner:
    """The runner of `--onnx`: ONNX Runtime where onnxruntime-gpu has the CUDA provider; on the CPU the bdm kernels
    runner, or, where the kernels cannot load or run a node of this model, ONNX Runtime with the function bodies,
    said in one line on `stream` (default stderr). `threads`: CPU threads (default: one per core)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return OrtRunner(onnx_path, threads=threads)
    from bdm.runtime.kernel_runner import CpuKernelRunner, KernelsRefused

    try:
        return CpuKernelRunner(onnx_path, threads=threads)
    except KernelsRefused as e:
        print(f"bdm: {e}; running it in ONNX Runtime with the function bodies instead", file=stream or sys.stderr)
    return OrtRunner(onnx_path, threads=threads)


def make_runner(engine=None, onnx=None, ckpt=None, config=None, plugins=None, device=None,
                threads: Optional[int] = None) -> Runner:
    """The runner of exactly one model: a TensorRT engine, an exported ONNX file (onnx_runner) or a checkpoint
    (TorchRunner, its network from `config`)."""
    chosen = [name for name, value in (("--engine", engine), ("--onnx", onnx), ("--ckpt", ckpt)) if value]
    if len(chosen) != 1:
        raise BdmError("give exactly one model: --engine model.engine (TensorRT), --onnx model.onnx "
                       f"(bdm CPU kernels or ONNX Runtime) or --ckpt ckpt.pth (PyTorch); got {len(chosen)}"
                       + (f" ({', '.join(chosen)})" if chosen else ""))
    if engine:
        return trt_runner(engine, plugins=plugins)
    if onnx:
        return onnx_runner(onnx, threads=threads)
    return TorchRunner(ckpt, config=config, device=device, threads=threads)


def trt_runner(engine_path, plugins=None):
    """The TensorRT runner, imported only when asked for, so machines without TensorRT never need it."""
    path = _check_file(engine_path, "engine", "--engine")
    try:
        import tensorrt  # noqa: F401  (the one-line error below is for a missing TensorRT)
    except ImportError:
        raise BdmError(f"--engine {path} needs TensorRT, which is not installed here; install the "
                       "'tensorrt' extra on an NVIDIA GPU machine, or use --onnx on this one") from None
    try:
        from bdm.runtime.trt.runner import TrtRunner
    except ImportError as e:
        raise BdmError(f"--engine {path}: the TensorRT backend cannot be loaded ({e})") from None
    return TrtRunner(path, plugins=plugins)
