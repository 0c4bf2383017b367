"""The CMake build of plugins/: kernels for sm_80/86/89/90 + PTX with CUDA alone, the TensorRT adapter skipped
with one message when no headers are found, and only the C ABI exported."""

import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bdm.errors import BdmError
from bdm.plugins import build as plugin_build
from plugin_test_support import require_toolchain

SASS_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
PTX_ARCH = "sm_90"
C_ABI = {"bdm_binary_conv2d", "bdm_binary_conv2d_host", "bdm_binary_conv_workspace_size", "bdm_status_string",
         "bdm_conv_algo_choice",
         "bdm_timestep_affine", "bdm_timestep_affine_host", "bdm_multibasis_conv", "bdm_multibasis_conv_host",
         "bdm_multibasis_conv_out_size", "bdm_multibasis_conv_workspace_size"}


def cuda_tool(name):
    """A CUDA binary tool from PATH, the CUDA toolkit of nvcc, or the NVIDIA pip wheels (nvidia-cuda-cuobjdump,
    nvidia-cuda-nvdisasm), wherever on sys.path they are installed."""
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


# Flags the exactness claims rely on (CMakeLists.txt BDM_EXACT_FLOAT_FLAGS), and what a parent project may set.
EXACT_FLOAT_FLAGS = ["--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-Xcompiler=-ffp-contract=off"]
HOST_FMA = {"x86_64": re.compile(r"\bvf(n?m(add|sub))"), "aarch64": re.compile(r"\bf(n?m(add|sub))\b")}
PARENT_CUDA_FLAGS = "--use_fast_math" + (" -Xcompiler=-march=x86-64-v3" if platform.machine() == "x86_64" else "")


def kernel_compile_commands(build_dir):
    commands = json.loads((Path(build_dir) / "compile_commands.json").read_text())
    return {Path(c["file"]).relative_to(plugin_build.PLUGINS_DIR).as_posix(): c["command"] for c in commands
            if c["file"].endswith(".cu")}


def kernel_objects(build_dir):
    return sorted((Path(build_dir) / "CMakeFiles" / "bdm_kernel_objects.dir").rglob("*.cu.o"))


def sass_by_function(library, arch):
    """{function: its SASS instructions (addresses and encodings left out)} of one architecture."""
    cuobjdump, nvdisasm = cuda_tool("cuobjdump"), cuda_tool("nvdisasm")
    env = dict(os.environ, PATH=f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    sass = subprocess.run([cuobjdump, "-sass", "-arch", arch, str(library)], capture_output=True, text=True,
                          check=True, env=env).stdout
    sections = re.split(r"Function : (\S+)", sass)[1:]
    return {name: re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*;)", body) for name, body in zip(sections[::2], sections[1::2])}


def test_every_kernel_object_is_compiled_with_the_exact_float_flags(kernels_build):
    commands = kernel_compile_commands(kernels_build.build_dir)
    assert set(commands) == {"common/bdm_status.cu", "binary_conv/binary_conv_kernel.cu",
                             "binary_conv/binary_conv_tensor_core.cu", "timestep_affine/timestep_affine_kernel.cu",
                             "multibasis_conv/multibasis_conv_kernel.cu", "multibasis_conv/multibasis_conv_tensor_core.cu"}
    for source, command in commands.items():
        assert all(flag in command.split() for flag in EXACT_FLOAT_FLAGS), (source, command)


@pytest.mark.slow
def test_a_parent_projects_fast_math_cannot_change_the_kernels(kernels_build, tmp_path):
    """Built as a parent project with --use_fast_math (and, on x86-64, -march=x86-64-v3 for the host) would build
    it: the pinned flags come after the parent's, the host oracle has no FMA instruction (g++ contracts a*b+c into
    one there without -ffp-contract=off), and the sm_90 SASS is the default build's, function by function."""
    if cuda_tool("cuobjdump") is None or cuda_tool("nvdisasm") is None:
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    if platform.machine() not in HOST_FMA:
        pytest.skip(f"no host FMA pattern for {platform.machine()}")
    build_dir = tmp_path / "parent"
    for cmd in (["cmake", "-S", str(plugin_build.PLUGINS_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 "-DCMAKE_CUDA_ARCHITECTURES=90-real", f"-DCMAKE_CUDA_FLAGS={PARENT_CUDA_FLAGS}",
                 "-DTensorRT_INCLUDE_DIR="],
                ["cmake", "--build", str(build_dir), "--target", "bdm_kernels", "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for source, command in kernel_compile_commands(build_dir).items():
        words = command.split()
        assert words.index("--use_fast_math") < min(words.index(f) for f in EXACT_FLOAT_FLAGS), source
    for obj in kernel_objects(build_dir):
        host = subprocess.run(["objdump", "-d", str(obj)], capture_output=True, text=True, check=True).stdout
        assert not HOST_FMA[platform.machine()].search(host), f"{obj.name}: FMA in the host code"
    default, parent = (sass_by_function(lib, "sm_90") for lib in (kernels_build.kernels, build_dir / "libbdm_kernels.so"))
    assert parent.keys() == default.keys()
    assert [name for name in default if parent[name] != default[name]] == []


def test_architectures_below_sm_80_are_refused_at_configure_time(tmp_path):
    require_toolchain()
    with pytest.raises(BdmError, match=r"^CMAKE_CUDA_ARCHITECTURES=80-real;75-real includes 75-real; the bdm kernels "
                                       r"need sm_80 or newer \(binary tensor cores\): give 80 and up"):
        plugin_build.build(tmp_path / "b", tensorrt_include="", cuda_architectures="80-real;75-real")


def test_kernels_do_not_compile_below_sm_80(tmp_path):
    """Whatever sets the architectures (a parent project, 'native' on an old GPU): no kernel that would trap."""
    require_toolchain()
    source = plugin_build.PLUGINS_DIR / "binary_conv" / "binary_conv_tensor_core.cu"
    proc = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_75", "-c", str(source), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "bdm kernels need sm_80 or newer" in proc.stdout + proc.stderr


def test_launchers_peek_at_the_last_cuda_error(kernels_build):
    """Each launcher reads its launches' status with cudaPeekAtLastError (common/bdm_launch.h launchStatus)."""
    launchers = ("binary_conv_kernel", "multibasis_conv_kernel", "timestep_affine_kernel")
    for obj in kernel_objects(kernels_build.build_dir):
        if obj.name.split(".")[0] in launchers:
            undefined = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout
            assert "cudaPeekAtLastError" in undefined.split(), obj.name
