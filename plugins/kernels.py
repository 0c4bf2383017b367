"""ctypes binding of libbdm_kernels.so's C ABI (binary_conv/binary_conv_kernel.h,
timestep_affine/timestep_affine_kernel.h, multibasis_conv/multibasis_conv_kernel.h), for tests and benchmarks
without TensorRT.

Every op takes either NumPy arrays (the C ABI's host path: the device code's own per-output functions run
on the CPU) or torch CUDA tensors (the kernels, enqueued on torch's current stream). Arguments follow the op
specs (plugins/*/spec.yaml): activations float32/float16 NCHW, t and packed weights int32, tables float32.
"""

import ctypes
import functools
from pathlib import Path
from typing import Optional

import numpy as np

from bdm.errors import BdmError
from bdm.plugins import build as plugin_build

FLOAT32, FLOAT16 = 0, 1
ALGOS = {"auto": 0, "simple": 1, "tensor_core": 2}


class ConvShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in (
        "batch", "in_channels", "out_channels", "height", "width", "kernel_size", "num_groups", "total_steps",
        "pad_value", "residual")]


class ConvTensors(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "x", "t", "weight", "alpha", "threshold", "bias0", "slope", "bias1", "y")]


class AffineShape(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int32), ("channels", ctypes.c_int32), ("spatial", ctypes.c_int64),
                ("num_groups", ctypes.c_int32), ("total_steps", ctypes.c_int32)]


class AffineTensors(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "t", "table", "bias0", "slope", "bias1", "y")]


class MultiBasisShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in (
        "batch", "in_channels", "out_channels", "spatial_dims", "height", "width", "kernel_size", "stride", "padding",
        "num_bases", "act_bits")]


class MultiBasisTensors(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "weight", "scale", "bias", "act_step", "y")]


@functools.lru_cache(maxsize=None)
def load(path: Optional[str] = None) -> ctypes.CDLL:
    """The kernels library: `path`, $BDM_KERNELS_LIB, or the default build folder."""
    lib_path = Path(path) if path else plugin_build.find_kernels_library()
    if lib_path is None:
        raise BdmError(f"{plugin_build.KERNELS_LIB} is not built; run `python -m bdm.plugins.build` "
                       f"(needs nvcc and CMake) or set $BDM_KERNELS_LIB")
    lib = ctypes.CDLL(str(lib_path))
    conv_args = [ctypes.POINTER(ConvShape), ctypes.POINTER(ConvTensors), ctypes.c_int]
    lib.bdm_binary_conv_workspace_size.argtypes = [ctypes.POINTER(ConvShape)]
    lib.bdm_binary_conv_workspace_size.restype = ctypes.c_size_t
    lib.bdm_binary_conv2d.argtypes = conv_args + [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.bdm_binary_conv2d.restype = ctypes.c_int
    lib.bdm_binary_conv2d_host.argtypes = conv_args + [ctypes.c_int]
    lib.bdm_binary_conv2d_host.restype = ctypes.c_int
    affine_args = [ctypes.POINTER(AffineShape), ctypes.POINTER(AffineTensors), ctypes.c_int]
    lib.bdm_timestep_affine.argtypes = affine_args + [ctypes.c_void_p]
    lib.bdm_timestep_affine.restype = ctypes.c_int
    lib.bdm_timestep_affine_host.argtypes = affine_args
    lib.bdm_timestep_affine_host.restype = ctypes.c_int
    mb_args = [ctypes.POINTER(MultiBasisShape), ctypes.POINTER(MultiBasisTensors)]
    lib.bdm_multibasis_conv_out_size.argtypes = [ctypes.c_int32] * 4
    lib.bdm_multibasis_conv_out_size.restype = ctypes.c_int32
    lib.bdm_multibasis_conv_workspace_size.argtypes = [ctypes.POINTER(MultiBasisShape)]
    lib.bdm_multibasis_conv_workspace_size.restype = ctypes.c_size_t
    lib.bdm_multibasis_conv.argtypes = mb_args + [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.bdm_multibasis_conv.restype = ctypes.c_int
    lib.bdm_multibasis_conv_host.argtypes = mb_args + [ctypes.c_int]
    lib.bdm_multibasis_conv_host.restype = ctypes.c_int
    lib.bdm_status_string.argtypes = [ctypes.c_int]
    lib.bdm_status_string.restype = ctypes.c_char_p
    lib.bdm_conv_algo_choice.argtypes = [ctypes.c_int] * 4
    lib.bdm_conv_algo_choice.restype = ctypes.c_int
    return lib


class _Operands:
    """Pointers of a call's operands, all on one side: NumPy (host path) or torch CUDA (device path)."""

    def __init__(self, x):
        self.on_gpu = not isinstance(x, np.ndarray)
        if self.on_gpu and not (hasattr(x, "is_cuda") and x.is_cuda):
            raise BdmError("bdm kernels take NumPy arrays (host path) or torch CUDA tensors (GPU path); "
                           f"got {type(x).__name__} on the CPU")
        self.x_dtype = str(x.dtype).replace("torch.", "")
        if self.x_dtype not in ("float32", "float16"):
            raise BdmError(f"x must be float32 or float16, got {self.x_dtype}")
        self.dtype = FLOAT16 if self.x_dtype == "float16" else FLOAT32
        self.keep = []  # contiguous copies must outlive the call

    def ptr(self, array, dtype_name):
        """Pointer to a contiguous copy of an input in dtype_name (None stays None)."""
        if array is None:
            return None
        if self.on_gpu:
            import torch
            tensor = array.to(device="cuda", dtype=getattr(torch, dtype_name)).contiguous()
            self.keep.append(tensor)
            return tensor.data_ptr()
        host = np.ascontiguousarray(array, dtype=dtype_name)
        self.keep.append(host)
        return host.ctypes.data

    def output(self, shape, like):
        """A new output array like x, and its pointer."""
        if self.on_gpu:
            import torch
            y = torch.empty(shape, dtype=like.dtype, device=like.device)
            return y, y.data_ptr()
        y = np.empty(shape, dtype=like.dtype)
        return y, y.ctypes.data


def _check(lib, status, what):
    if status != 0:
        raise BdmError(f"{what} failed: {lib.bdm_status_string(status).decode()} (status {status})")


def _algo(algo):
    if algo not in ALGOS:
        raise BdmError(f"algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    return ALGOS[algo]


def conv_algo_choice(algo: str, fits: bool, capability, library=None) -> str:
    """The kernel ("simple" or "tensor_core") that `algo` runs on a GPU of compute capability (major, minor) for a
    shape that fills the tensor-core tiles (`fits`) or not; BdmError where it cannot run (the C ABI's choice, with no
    GPU needed)."""
    lib = load(library)
    chosen = lib.bdm_conv_algo_choice(_algo(algo), int(fits), *capability)
    _check(lib, min(chosen, 0), f"algo {algo} on compute capability {capability[0]}.{capability[1]}")
    return next(name for name, value in ALGOS.items() if value == chosen)


def _stream():
    import torch
    return torch.cuda.current_stream().cuda_stream


def binary_conv2d(x, weight, alpha, *, in_channels, out_channels, kernel_size, pad_value=0, t=None,
                  threshold=None, bias0=None, slope=None, bias1=None, num_groups=5, total_steps=2000, residual=1,
                  algo="auto", library=None):
    """BinaryConv2d (t and the four tables given) or BinarySignConv2d (none given; residual ignored).
    algo: "auto", "simple" or "tensor_core" (on the host path: the tensor-core kernel's emulation)."""
    lib = load(library)
    ops = _Operands(x)
    fused = t is not None
    n, c, h, w = x.shape
    if c != in_channels:
        raise BdmError(f"x has {c} channels, in_channels is {in_channels}")
    shape = ConvShape(n, in_channels, out_channels, h, w, kernel_size, num_groups if fused else 1,
                      total_steps if fused else 1, pad_value, residual if fused else 0)
    y, y_ptr = ops.output((n, out_channels, h, w), x)
    tensors = ConvTensors(ops.ptr(x, ops.x_dtype), ops.ptr(t, "int32"), ops.ptr(weight, "int32"),
                          ops.ptr(alpha, "float32"), ops.ptr(threshold, "float32"), ops.ptr(bias0, "float32"),
                          ops.ptr(slope, "float32"), ops.ptr(bias1, "float32"), y_ptr)
    if ops.on_gpu:
        import torch
        workspace_bytes = lib.bdm_binary_conv_workspace_size(ctypes.byref(shape))
        workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=x.device)
        status = lib.bdm_binary_conv2d(ctypes.byref(shape), ctypes.byref(tensors), ops.dtype, _algo(algo),
                                       workspace.data_ptr(), workspace_bytes, _stream())
    else:
        status = lib.bdm_binary_conv2d_host(ctypes.byref(shape), ctypes.byref(tensors), ops.dtype, _algo(algo))
    _check(lib, status, "bdm_binary_conv2d")
    return y


def timestep_affine(x, t, *, num_groups=5, total_steps=2000, table=None, bias0=None, slope=None, bias1=None,
                    library=None):
    """TimestepBias (table given) or TimestepRPReLU (bias0, slope, bias1 given)."""
    lib = load(library)
    ops = _Operands(x)
    n, c = x.shape[:2]
    spatial = int(np.prod(x.shape[2:])) if len(x.shape) > 2 else 1
    shape = AffineShape(n, c, spatial, num_groups, total_steps)
    y, y_ptr = ops.output(tuple(x.shape), x)
    tensors = AffineTensors(ops.ptr(x, ops.x_dtype), ops.ptr(t, "int32"), ops.ptr(table, "float32"),
                            ops.ptr(bias0, "float32"), ops.ptr(slope, "float32"), ops.ptr(bias1, "float32"), y_ptr)
    if ops.on_gpu:
        status = lib.bdm_timestep_affine(ctypes.byref(shape), ctypes.byref(tensors), ops.dtype, _stream())
    else:
        status = lib.bdm_timestep_affine_host(ctypes.byref(shape), ctypes.byref(tensors), ops.dtype)
    _check(lib, status, "bdm_timestep_affine")
    return y


def multibasis_conv(x, weight, scale, bias, act_step, *, in_channels, out_channels, num_bases, spatial_dims,
                    kernel_size=1, stride=1, padding=0, act_bits=4, algo="auto", library=None):
    """MultiBasisConv (plugins/multibasis_conv/spec.yaml): x float32 [N, C, *spatial] with spatial_dims axes.
    algo: "auto", "simple" or "tensor_core" (on the host path: the tensor-core kernel's emulation); act_bits 0
    always runs the simple kernel."""
    lib = load(library)
    ops = _Operands(x)
    if ops.x_dtype != "float32":
        raise BdmError(f"MultiBasisConv takes float32 x, got {ops.x_dtype}")
    if len(x.shape) != 2 + spatial_dims or x.shape[1] != in_channels:
        raise BdmError(f"x has shape {tuple(x.shape)}, spatial_dims {spatial_dims} and in_channels {in_channels} "
                       f"need [N, {in_channels}] + {spatial_dims} axes")
    n = x.shape[0]
    spatial = (1,) * (2 - spatial_dims) + tuple(x.shape[2:])  # every form as a 2-D conv: H, W
    shape = MultiBasisShape(n, in_channels, out_channels, spatial_dims, *spatial, kernel_size, stride, padding,
                            num_bases, act_bits)
    out_spatial = tuple(lib.bdm_multibasis_conv_out_size(length, kernel_size, stride, padding)
                        for length in x.shape[2:])
    y, y_ptr = ops.output((n, out_channels) + out_spatial, x)
    tensors = MultiBasisTensors(ops.ptr(x, "float32"), ops.ptr(weight, "int32"), ops.ptr(scale, "float32"),
                                ops.ptr(bias, "float32"), ops.ptr(act_step, "float32"), y_ptr)
    if ops.on_gpu:
        import torch
        workspace_bytes = lib.bdm_multibasis_conv_workspace_size(ctypes.byref(shape))
        workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=x.device)
        status = lib.bdm_multibasis_conv(ctypes.byref(shape), ctypes.byref(tensors), _algo(algo),
                                         workspace.data_ptr(), workspace_bytes, _stream())
    else:
        status = lib.bdm_multibasis_conv_host(ctypes.byref(shape), ctypes.byref(tensors), _algo(algo))
    _check(lib, status, "bdm_multibasis_conv")
    return y
