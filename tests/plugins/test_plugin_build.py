"""The CMake build of plugins/: kernels for sm_80/86/89/90 + PTX with CUDA alone, the TensorRT adapter skipped
with one message when no headers are found, and only the C ABI exported."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bdm.errors import BdmError
from bdm.plugins import build as plugin_build

SASS_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
PTX_ARCH = "sm_90"
C_ABI = {"bdm_binary_conv2d", "bdm_binary_conv2d_host", "bdm_binary_conv_workspace_size", "bdm_status_string",
         "bdm_timestep_affine", "bdm_timestep_affine_host", "bdm_multibasis_conv", "bdm_multibasis_conv_host",
         "bdm_multibasis_conv_out_size", "bdm_multibasis_conv_workspace_size"}


def cuda_tool(name):
    """A CUDA binary tool from PATH, the CUDA toolkit of nvcc, or the NVIDIA pip wheels (nvidia-cuda-cuobjdump,
    nvidia-cuda-nvdisasm)."""
    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.path.realpath(nvcc)).parent / name] if nvcc else []
    try:  # the wheels' namespace package, wherever it is installed (a venv, or the system site of one)
        import nvidia
        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    candidates += sorted(path for root in roots for path in Path(root).glob(f"cu*/bin/{name}"))
    return next((str(c) for c in candidates if c.is_file()), None)


def exported_symbols(library):
    out = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.split()[1:2] == ["T"]}


def test_kernels_contain_sass_for_every_architecture_and_ptx(kernels_library):
    cuobjdump = cuda_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    elf = subprocess.run([cuobjdump, "--list-elf", str(kernels_library)], capture_output=True, text=True, check=True)
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(kernels_library)], capture_output=True, text=True, check=True)
    sass_archs = set(re.findall(r"\.(sm_\d+)\.cubin", elf.stdout))
    ptx_archs = set(re.findall(r"\.(sm_\d+)\.ptx", ptx.stdout))
    assert sass_archs == set(SASS_ARCHS), elf.stdout
    assert ptx_archs == {PTX_ARCH}, ptx.stdout


# One BMMA.168256.AND.POPC per mma of a K chunk (2 m-tiles x 4 n-tiles per warp, unrolled): the binary conv
# multiplies 2 sign bit-planes, MultiBasisConv act_bits code bit-planes by 1 operand (one basis) or 3 (two bases).
BMMA_PER_KERNEL = {"binary_conv float": 16, "binary_conv half": 16, "multibasis_conv A4 1 basis": 32,
                   "multibasis_conv A4 2 bases": 96, "multibasis_conv A8 1 basis": 64,
                   "multibasis_conv A8 2 bases": 192}


def kernel_label(mangled):
    binary = re.search(r"bdm2tc20tensorCoreConvKernelI(f|6__half)E", mangled)
    if binary:
        return f"binary_conv {'float' if binary[1] == 'f' else 'half'}"
    multibasis = re.search(r"bdm2mb2tc.*tensorCoreConvKernelILi(\d)ELi(\d)E", mangled)
    if multibasis:
        return f"multibasis_conv A{multibasis[1]} {multibasis[2]} {'basis' if multibasis[2] == '1' else 'bases'}"
    return mangled


def test_tensor_core_kernels_are_native_bmma_on_every_architecture(kernels_library):
    cuobjdump, nvdisasm = cuda_tool("cuobjdump"), cuda_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = dict(os.environ, PATH=f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for arch in SASS_ARCHS:
        sass = subprocess.run([cuobjdump, "-sass", "-arch", arch, str(kernels_library)], capture_output=True,
                              text=True, check=True, env=env).stdout
        sections = re.split(r"Function : (\S+)", sass)[1:]
        counts = {kernel_label(name): body.count("BMMA.168256.AND.POPC")
                  for name, body in zip(sections[::2], sections[1::2]) if "BMMA" in body}
        assert counts == BMMA_PER_KERNEL, arch
        assert "XOR.POPC" not in sass, arch


def test_without_tensorrt_headers_only_the_kernels_build(kernels_build):
    messages = [line for line in kernels_build.configure_log.splitlines() if line.startswith("-- bdm:")]
    assert len(messages) == 1 and plugin_build.TRT_HEADERS_SKIPPED in messages[0], messages
    assert "TENSORRT_ROOT" in messages[0]
    assert kernels_build.plugins is None and kernels_build.harness is None
    assert not (kernels_build.build_dir / plugin_build.PLUGINS_LIB).exists()
    assert kernels_build.kernels.is_file()


def test_kernels_library_exports_only_the_c_abi_and_links_cudart_statically(kernels_library):
    assert exported_symbols(kernels_library) == C_ABI
    needed = subprocess.run(["readelf", "-d", str(kernels_library)], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in needed


def test_missing_toolchain_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no nvcc
    with pytest.raises(BdmError, match="needs `cmake` on PATH"):
        plugin_build.build(tmp_path / "b")
