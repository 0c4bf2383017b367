"""The bit-packed CPU kernels of the `bdm` ops (libbdm_cpu_kernels.so, C ABI binary_conv/binary_conv_cpu.h and
multibasis_conv/multibasis_conv_cpu.h), computing straight from an exported node's packed INT32 weights. The library
is built on first use with the system C++ compiler (bdm.plugins.build.build_cpu). For a runner:

    kernels = cpu_kernels.load()                            # CpuKernelsUnavailable (one line) if they cannot run here
    why_not = kernels.supports(op_type, attributes)         # None, or why this node form is not supported
    run = kernels.prepare(op_type, attributes, constants)   # weights repacked once for the instruction set
    y = run(x=x, t=t)                                       # runtime inputs by spec name -> new float32 tensor
    run(x=x, t=t, out=buffer)                               # or into a buffer the caller reuses (no page faults)

- BinaryConv2d / BinarySignConv2d: outputs bit-identical to the spec's NumPy reference (plugins/reference.py).
- MultiBasisConv act_bits 4 / 8: bit-serial popcount over the activation codes' bit-planes, equal bit for bit to the
  CUDA kernels' host path and within the spec bound of the reference. act_bits 0 (W1A32) is float32 arithmetic, not
  a popcount: W_hat is expanded once at prepare time and torch's conv / linear computes it (the honest fast path).
- Instruction set: the fastest this CPU runs (`isa`: "avx512-vpopcntdq", "avx2", "portable"), or the one
  $BDM_CPU_ISA names (avx512 | avx2 | portable); all give identical outputs.
- Threads: torch's count (torch.get_num_threads()) unless load(threads=n) fixes one; the library's OpenMP runtime is
  torch's own libgomp.so.1 (same soname, loaded by torch first), so the two share one thread pool. Outputs do not
  depend on the thread count.
"""

import ctypes
import threading
import weakref
from typing import Callable, Dict, List, Optional

import numpy as np

from bdm.errors import BdmError
from bdm.plugins import build as plugin_build
from bdm.plugins import multibasis_reference, packing, reference, spec

ISA_ENVIRONMENT = "BDM_CPU_ISA"
# $BDM_CPU_ISA names -> the C ABI's bdm_cpu_isa codes
ISA_CODES = {"portable": 0, "avx2": 1, "avx512": 2, "avx512-vpopcntdq": 2}
# Inputs given per call; the other spec inputs are the node's constants, given once to prepare.
RUNTIME_INPUTS = {"BinaryConv2d": ("x", "t"), "BinarySignConv2d": ("x",), "MultiBasisConv": ("x", "act_step")}
_OK, _UNSUPPORTED_ISA = 0, -10


class CpuKernelsUnavailable(BdmError):
    """The CPU kernels cannot run here, or not this node form: one line saying why (the runner falls back)."""


class _BinaryParams(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("in_channels", "out_channels", "kernel_size", "num_groups", "pad_value",
                                              "residual")] + \
               [(n, ctypes.c_void_p) for n in ("weight", "alpha", "threshold", "bias0", "slope", "bias1")]


class _BinaryCall(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p)] + \
               [(n, ctypes.c_int32) for n in ("batch", "height", "width", "group", "threads")]


class _MultibasisParams(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("in_channels", "out_channels", "spatial_dims", "kernel_size", "stride",
                                              "padding", "num_bases", "act_bits")] + \
               [(n, ctypes.c_void_p) for n in ("weight", "scale", "bias")]


class _MultibasisCall(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p), ("batch", ctypes.c_int32),
                ("height", ctypes.c_int32), ("width", ctypes.c_int32), ("act_step", ctypes.c_float),
                ("threads", ctypes.c_int32)]


_lock = threading.Lock()
_library_state: Dict[str, object] = {}  # "lib" or "failure", decided once per process


def _library() -> ctypes.CDLL:
    """The built library (built here on first use); a failure is remembered, not retried on every node."""
    with _lock:
        if "lib" not in _library_state and "failure" not in _library_state:
            try:
                _library_state["lib"] = _open_library()
            except CpuKernelsUnavailable as e:
                _library_state["failure"] = e
        if "failure" in _library_state:
            raise _library_state["failure"]
        return _library_state["lib"]


def _open_library() -> ctypes.CDLL:
    import torch  # noqa: F401 (loaded first, so the library's libgomp.so.1 resolves to torch's OpenMP runtime)

    try:
        path = plugin_build.build_cpu()
    except BdmError as e:
        raise CpuKernelsUnavailable(str(e)) from None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise CpuKernelsUnavailable(f"the bdm CPU kernels at {path} do not load: {e}") from None
    lib.bdm_cpu_isa_supported.argtypes = [ctypes.c_int]
    lib.bdm_cpu_best_isa.argtypes = []
    lib.bdm_cpu_isa_name.argtypes = [ctypes.c_int]
    lib.bdm_cpu_isa_name.restype = ctypes.c_char_p
    lib.bdm_cpu_status_string.argtypes = [ctypes.c_int]
    lib.bdm_cpu_status_string.restype = ctypes.c_char_p
    lib.bdm_binary_conv_cpu_prepare.argtypes = [ctypes.c_int, ctypes.POINTER(_BinaryParams),
                                                ctypes.POINTER(ctypes.c_void_p)]
    lib.bdm_binary_conv_cpu_release.argtypes = [ctypes.c_void_p]
    lib.bdm_binary_conv_cpu_release.restype = None
    lib.bdm_binary_conv_cpu_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BinaryCall)]
    lib.bdm_multibasis_conv_cpu_prepare.argtypes = [ctypes.c_int, ctypes.POINTER(_MultibasisParams),
                                                    ctypes.POINTER(ctypes.c_void_p)]
    lib.bdm_multibasis_conv_cpu_release.argtypes = [ctypes.c_void_p]
    lib.bdm_multibasis_conv_cpu_release.restype = None
    lib.bdm_multibasis_conv_cpu_out_size.argtypes = [ctypes.c_int32] * 4
    lib.bdm_multibasis_conv_cpu_out_size.restype = ctypes.c_int32
    lib.bdm_multibasis_conv_cpu_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(_MultibasisCall)]
    return lib


_loaded: Dict[tuple, "CpuKernels"] = {}


def reuse_freed_memory() -> bool:
    """The CPU path's allocator setting, process-wide (the runtime's runner and the benchmarks ask for it): glibc
    serves blocks up to 1 GiB from its heap (M_MMAP_THRESHOLD) and keeps freed memory for reuse (M_TRIM_THRESHOLD),
    so activations freed and allocated again each step are not page-faulted in again; False where this is not glibc
    (nothing changes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def load(isa: Optional[str] = None, threads: Optional[int] = None) -> "CpuKernels":
    """The CPU kernels on instruction set `isa` (None: $BDM_CPU_ISA, else the fastest this CPU runs), with `threads`
    threads per call (None: torch.get_num_threads() at each call). Cached; builds the library on first use.
    Raises CpuKernelsUnavailable with a one-line reason."""
    import os

    key = (isa or os.environ.get(ISA_ENVIRONMENT) or None, threads)
    with _lock:
        cached = _loaded.get(key)
    if cached is not None:
        return cached
    lib = _library()
    kernels = CpuKernels(lib, _isa_code(lib, key[0]), threads)
    with _lock:
        return _loaded.setdefault(key, kernels)


def available_isas() -> List[str]:
    """The paths this CPU runs, fastest first, as $BDM_CPU_ISA spells them (CpuKernelsUnavailable if none loads)."""
    lib = _library()
    return [name for name in ("avx512", "avx2", "portable") if lib.bdm_cpu_isa_supported(ISA_CODES[name])]


def _isa_code(lib: ctypes.CDLL, requested: Optional[str]) -> int:
    best = lib.bdm_cpu_best_isa()
    if requested is None:
        return best
    code = ISA_CODES.get(requested.lower())
    best_name = lib.bdm_cpu_isa_name(best).decode()
    if code is None:
        raise CpuKernelsUnavailable(f"{ISA_ENVIRONMENT}={requested} is not an instruction-set path; choose avx512, "
                                    f"avx2 or portable (this CPU's best: {best_name})")
    if not lib.bdm_cpu_isa_supported(code):
        raise CpuKernelsUnavailable(f"{ISA_ENVIRONMENT}={requested} asks for the {lib.bdm_cpu_isa_name(code).decode()} "
                                    f"path, which this CPU (or build) lacks; its best is {best_name} (unset "
                                    f"{ISA_ENVIRONMENT} or choose a lower path)")
    return code


class CpuKernels:
    """The loaded CPU kernels on one instruction-set path (see the module docstring)."""

    def __init__(self, lib: ctypes.CDLL, isa_code: int, threads: Optional[int]):
        if threads is not None and threads < 1:
            raise BdmError(f"threads must be >= 1 (or None: torch's count); got {threads}")
        self._lib = lib
        self._isa_code = isa_code
        self._threads = threads
        self.isa = lib.bdm_cpu_isa_name(isa_code).decode()

    @property
    def threads(self) -> int:
        """Threads of the next call: the fixed count, else torch.get_num_threads()."""
        if self._threads is not None:
            return self._threads
        import torch

        return torch.get_num_threads()

    def __repr__(self):
        return f"CpuKernels(isa={self.isa!r}, threads={self.threads})"

    def supports(self, op_type: str, attributes: dict) -> Optional[str]:
        """None if the kernels run this node form, else the reason in one line."""
        if op_type not in RUNTIME_INPUTS:
            return (f"no CPU kernel for {op_type} (the CPU kernels run "
                    f"{', '.join(sorted(RUNTIME_INPUTS))})")
        try:
            attrs = reference.complete_attributes(op_type, dict(attributes))
        except ValueError as e:
            return f"{op_type}: {e}"
        for name in ("in_channels", "out_channels"):
            if attrs[name] < 1:
                return f"{op_type}: {name} = {attrs[name]} must be >= 1"
        if op_type == "BinaryConv2d" and attrs["residual"] and attrs["in_channels"] != attrs["out_channels"]:
            return (f"BinaryConv2d with residual 1 needs in_channels == out_channels "
                    f"(got {attrs['in_channels']} -> {attrs['out_channels']})")
        if op_type == "MultiBasisConv":
            try:
                multibasis_reference.check_attributes(
                    (1, attrs["in_channels"]) + (attrs["kernel_size"],) * attrs["spatial_dims"],
                    _multibasis_weight_shape(attrs), **{k: attrs[k] for k in _MULTIBASIS_SHAPE_ATTRIBUTES})
            except ValueError as e:
                return str(e)
        return None

    def prepare(self, op_type: str, attributes: dict, constants: dict) -> Callable:
        """A callable running this node: weights repacked once now, each call takes the runtime inputs (torch CPU
        tensors) by spec name and returns y, a new contiguous float32 tensor (or `out=`, filled). Raises
        CpuKernelsUnavailable for a node form or constant the kernels do not take."""
        reason = self.supports(op_type, attributes)
        if reason:
            raise CpuKernelsUnavailable(reason)
        attrs = reference.complete_attributes(op_type, dict(attributes))
        wanted = [n for n in spec.input_names(op_type) if n not in RUNTIME_INPUTS[op_type]]
        if sorted(constants) != sorted(wanted):
            raise CpuKernelsUnavailable(f"{op_type} on the CPU kernels takes the constants {wanted}; got "
                                        f"{sorted(constants)}")
        if op_type == "MultiBasisConv":
            if attrs["act_bits"] == 0:
                return _FloatMultibasisConv(self, attrs, constants)
            return _PreparedMultibasisConv(self, attrs, constants)
        return _PreparedBinaryConv(self, op_type, attrs, constants)


_MULTIBASIS_SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "num_bases", "spatial_dims", "kernel_size", "stride",
                                "padding")


def _multibasis_weight_shape(attrs) -> tuple:
    return ((attrs["num_bases"], attrs["out_channels"]) + (attrs["kernel_size"],) * attrs["spatial_dims"]
            + (packing.words_per_tap(attrs["in_channels"]),))


def _constant(op_type: str, name: str, value, dtype, shape: tuple) -> np.ndarray:
    """A constant as a contiguous array of its spec dtype and shape (CpuKernelsUnavailable otherwise)."""
    array = np.asarray(value)
    if array.dtype != dtype or array.shape != tuple(shape):
        raise CpuKernelsUnavailable(f"{op_type} constant {name} is {array.dtype} {list(array.shape)}; the CPU "
                                    f"kernels take {np.dtype(dtype).name} {list(shape)}")
    return np.ascontiguousarray(array)


class _Prepared:
    """A prepared node: runtime inputs by spec name (keywords, or positionally in spec order) -> y."""

    def __init__(self, kernels: CpuKernels, op_type: str, attrs: dict):
        self.op_type = op_type
        self.runtime_inputs = RUNTIME_INPUTS[op_type]
        self.attributes = attrs
        self._kernels = kernels
        self._lib = kernels._lib

    def __call__(self, *args, out=None, **kwargs):
        """y of the runtime inputs. out: an optional contiguous float32 CPU tensor of y's shape to write y into (and
        return), so a caller can reuse buffers instead of a fresh allocation per call (whose page faults cost about
        as much as a small layer); it must not share memory with x."""
        if len(args) > len(self.runtime_inputs):
            raise BdmError(f"{self.op_type} takes the runtime inputs {list(self.runtime_inputs)}; got {len(args)} "
                           f"positional")
        given = dict(zip(self.runtime_inputs, args), **kwargs)
        if sorted(given) != sorted(self.runtime_inputs):
            raise BdmError(f"{self.op_type} takes the runtime inputs {list(self.runtime_inputs)}; got {sorted(given)}")
        return self._run(out=out, **given)

    def _output(self, shape: tuple, out, x):
        """`out` checked against y's shape, or a new tensor."""
        import torch

        if out is None:
            return torch.empty(shape, dtype=torch.float32)
        if (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device.type != "cpu"
                or tuple(out.shape) != tuple(shape) or not out.is_contiguous()):
            described = (f"{str(out.dtype).replace('torch.', '')} {list(out.shape)} on {out.device}"
                         if isinstance(out, torch.Tensor) else type(out).__name__)
            raise BdmError(f"{self.op_type}: out must be a contiguous float32 CPU tensor of shape {list(shape)}; got "
                           f"{described}")
        if out.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise BdmError(f"{self.op_type}: out shares memory with x; the kernels read x while they write y")
        return out

    def _activation(self, x, rank: int):
        """x as a contiguous float32 CPU tensor of the node's rank and in_channels."""
        import torch

        if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
            raise BdmError(f"{self.op_type} on the CPU kernels takes x as a torch CPU tensor; got "
                           f"{type(x).__name__}{'' if not isinstance(x, torch.Tensor) else ' on ' + str(x.device)}")
        if x.dtype != torch.float32:
            raise CpuKernelsUnavailable(f"{self.op_type} with {str(x.dtype).replace('torch.', '')} x: the CPU kernels "
                                        f"take float32 x")
        if x.dim() != rank or x.shape[1] != self.attributes["in_channels"]:
            raise BdmError(f"{self.op_type}: x has shape {list(x.shape)}; the node takes {rank} axes with "
                           f"{self.attributes['in_channels']} channels on axis 1")
        return x.contiguous()

    def _check(self, status: int, what: str):
        if status != _OK:
            raise BdmError(f"{what} failed: {self._lib.bdm_cpu_status_string(status).decode()} (status {status})")

    def _handle(self, prepare, params, release):
        handle = ctypes.c_void_p()
        status = prepare(self._kernels._isa_code, ctypes.byref(params), ctypes.byref(handle))
        if status == _UNSUPPORTED_ISA:
            raise CpuKernelsUnavailable(f"the {self._kernels.isa} path is not in this build of the CPU kernels")
        self._check(status, f"preparing {self.op_type}")
        weakref.finalize(self, release, handle.value)
        return handle.value


class _PreparedBinaryConv(_Prepared):
    def __init__(self, kernels: CpuKernels, op_type: str, attrs: dict, constants: dict):
        super().__init__(kernels, op_type, attrs)
        cin, cout, k = attrs["in_channels"], attrs["out_channels"], attrs["kernel_size"]
        fused = op_type == "BinaryConv2d"
        groups = attrs["num_groups"] if fused else 1
        shapes = {"weight": (np.int32, (cout, k, k, packing.words_per_tap(cin))), "alpha": (np.float32, (cout,)),
                  "threshold": (np.float32, (groups, cin)), "bias0": (np.float32, (groups, cout)),
                  "slope": (np.float32, (groups, cout)), "bias1": (np.float32, (groups, cout))}
        arrays = {name: _constant(op_type, name, value, *shapes[name]) for name, value in constants.items()}
        pointer = lambda name: arrays[name].ctypes.data if name in arrays else None  # noqa: E731
        params = _BinaryParams(cin, cout, k, groups, attrs["pad_value"], attrs["residual"] if fused else 0,
                               *(pointer(n) for n in ("weight", "alpha", "threshold", "bias0", "slope", "bias1")))
        self._handle_value = self._handle(self._lib.bdm_binary_conv_cpu_prepare, params,
                                          self._lib.bdm_binary_conv_cpu_release)

    def _run(self, x, t=None, out=None):
        x = self._activation(x, 4)
        n, _, h, w = x.shape
        y = self._output((n, self.attributes["out_channels"], h, w), out, x)
        if y.numel() == 0:
            return y
        group = 0
        if self.op_type == "BinaryConv2d":
            if t is None or t.numel() < 1 or t.dtype.is_floating_point:
                raise BdmError(f"BinaryConv2d takes t as an integer tensor [N]; got {t!r}")
            group = spec.group_index(int(t.reshape(-1)[0]), self.attributes["num_groups"],
                                     self.attributes["total_steps"])
        call = _BinaryCall(x.data_ptr(), y.data_ptr(), n, h, w, group, self._kernels.threads)
        self._check(self._lib.bdm_binary_conv_cpu_run(self._handle_value, ctypes.byref(call)), self.op_type)
        return y


class _PreparedMultibasisConv(_Prepared):
    """act_bits 4 / 8 on the popcount kernels; every form as a 2-D conv."""

    def __init__(self, kernels: CpuKernels, attrs: dict, constants: dict):
        super().__init__(kernels, "MultiBasisConv", attrs)
        bases, cout = attrs["num_bases"], attrs["out_channels"]
        arrays = {"weight": _constant("MultiBasisConv", "weight", constants["weight"], np.int32,
                                      _multibasis_weight_shape(attrs)),
                  "scale": _constant("MultiBasisConv", "scale", constants["scale"], np.float32, (bases, cout)),
                  "bias": _constant("MultiBasisConv", "bias", constants["bias"], np.float32, (cout,))}
        params = _MultibasisParams(*(attrs[k] for k in ("in_channels", "out_channels", "spatial_dims", "kernel_size",
                                                        "stride", "padding", "num_bases", "act_bits")),
                                   arrays["weight"].ctypes.data, arrays["scale"].ctypes.data,
                                   arrays["bias"].ctypes.data)
        self._handle_value = self._handle(self._lib.bdm_multibasis_conv_cpu_prepare, params,
                                          self._lib.bdm_multibasis_conv_cpu_release)

    def _run(self, x, act_step, out=None):
        import torch

        dims = self.attributes["spatial_dims"]
        x = self._activation(x, 2 + dims)
        cout = self.attributes["out_channels"]
        step = float(torch.as_tensor(act_step, dtype=torch.float32).reshape(-1)[0])
        x4 = x.reshape((x.shape[0], x.shape[1]) + (1,) * (2 - dims) + tuple(x.shape[2:]))  # every form as conv2d
        n, _, h, w = x4.shape
        k, stride, padding = (self.attributes[a] for a in ("kernel_size", "stride", "padding"))
        out_size = self._lib.bdm_multibasis_conv_cpu_out_size
        out_h = out_size(h, k, stride, padding) if dims == 2 else 1
        out_w = out_size(w, k, stride, padding) if dims >= 1 else 1
        if out_h <= 0 or out_w <= 0:
            raise BdmError(f"MultiBasisConv: x of shape {list(x.shape)} is shorter than the kernel ({k}) with "
                           f"padding {padding}")
        shape = (n, cout) + (out_h, out_w)[2 - dims:]  # the node's form: spatial_dims trailing axes
        y = self._output(shape, out, x)
        if y.numel() == 0:
            return y
        call = _MultibasisCall(x4.data_ptr(), y.data_ptr(), n, h, w, step, self._kernels.threads)
        self._check(self._lib.bdm_multibasis_conv_cpu_run(self._handle_value, ctypes.byref(call)), self.op_type)
        return y


class _FloatMultibasisConv(_Prepared):
    """act_bits 0 (W1A32): float32 arithmetic, no popcount. W_hat = s1*B1 (+ s2*B2) is expanded once here, exactly as
    the spec's float32 values, and torch's conv / linear computes y (within the spec bound of the reference)."""

    def __init__(self, kernels: CpuKernels, attrs: dict, constants: dict):
        import torch

        super().__init__(kernels, "MultiBasisConv", attrs)
        bases, cout = attrs["num_bases"], attrs["out_channels"]
        weight = _constant("MultiBasisConv", "weight", constants["weight"], np.int32, _multibasis_weight_shape(attrs))
        scale = _constant("MultiBasisConv", "scale", constants["scale"], np.float32, (bases, cout))
        bias = _constant("MultiBasisConv", "bias", constants["bias"], np.float32, (cout,))
        signs = multibasis_reference.sign_bases(weight, attrs["in_channels"]).astype(np.float32)
        per_channel = (cout,) + (1,) * (1 + attrs["spatial_dims"])
        w_hat = scale[0].reshape(per_channel) * signs[0]
        if bases == 2:
            w_hat = w_hat + scale[1].reshape(per_channel) * signs[1]
        self._weight = torch.from_numpy(np.ascontiguousarray(w_hat, dtype=np.float32))
        self._bias = torch.from_numpy(bias.copy())

    def _run(self, x, act_step=None, out=None):
        import torch
        import torch.nn.functional as F

        dims = self.attributes["spatial_dims"]
        x = self._activation(x, 2 + dims)
        with torch.no_grad():
            if dims == 0:
                y = F.linear(x, self._weight, self._bias)
            else:
                conv = F.conv2d if dims == 2 else F.conv1d
                y = conv(x, self._weight, self._bias, stride=self.attributes["stride"],
                         padding=self.attributes["padding"])
        return y.contiguous() if out is None else self._output(tuple(y.shape), out, x).copy_(y)
