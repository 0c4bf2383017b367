"""Find or build the native libraries of plugins/ (CMakeLists.txt beside this file).

- libbdm_kernels.so: the CUDA kernels and their C ABI (needs nvcc; no TensorRT).
- libbdm_trt_plugins.so: the TensorRT IPluginV3 adapters (needs TensorRT headers of the runtime's major).
- bdm_plugin_harness: the host-only creator test.
- libbdm_cpu_kernels.so: the bit-packed CPU kernels (needs only a C++ compiler; no CMake, CUDA or torch headers),
  built on first use into a cache folder keyed by the sources' hash (bdm.plugins.cpu_kernels).

`python -m bdm.plugins.build [BUILD_DIR] [--tensorrt-include DIR]` builds the CUDA ones; the default folder is
build/plugins under the repository root (or $BDM_PLUGINS_BUILD_DIR). `python -m bdm.plugins.build --cpu` builds the
CPU kernels (folder: $BDM_CPU_KERNELS_CACHE, else $XDG_CACHE_HOME/bdm/cpu-kernels or ~/.cache/bdm/cpu-kernels).
"""

import argparse
import concurrent.futures
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from bdm.errors import BdmError

PLUGINS_DIR = Path(__file__).resolve().parent
KERNELS_LIB = "libbdm_kernels.so"
PLUGINS_LIB = "libbdm_trt_plugins.so"
HARNESS_EXE = "bdm_plugin_harness"
TRT_HEADERS_SKIPPED = "bdm: TensorRT headers not found"  # CMakeLists.txt's one message when it skips the adapter


def default_build_dir() -> Path:
    return Path(os.environ.get("BDM_PLUGINS_BUILD_DIR") or PLUGINS_DIR.parent / "build" / "plugins")


def find_library(name: str, env_var: str, build_dir: Optional[Path] = None) -> Optional[Path]:
    """An explicit $env_var path, else the file in the build folder; None when neither exists."""
    explicit = os.environ.get(env_var)
    if explicit:
        if not Path(explicit).is_file():
            raise BdmError(f"${env_var} points to {explicit}, which does not exist; unset it or build the library "
                           f"with `python -m bdm.plugins.build`")
        return Path(explicit)
    candidate = (build_dir or default_build_dir()) / name
    return candidate if candidate.is_file() else None


def find_kernels_library(build_dir: Optional[Path] = None) -> Optional[Path]:
    return find_library(KERNELS_LIB, "BDM_KERNELS_LIB", build_dir)


def find_plugins_library(build_dir: Optional[Path] = None) -> Optional[Path]:
    return find_library(PLUGINS_LIB, "BDM_PLUGINS_LIB", build_dir)


def tensorrt_include_from_environment() -> Optional[str]:
    """The TensorRT include folder named by the environment (the variables CMakeLists.txt reads)."""
    for var in ("TensorRT_INCLUDE_DIR", "TENSORRT_INCLUDE_DIR"):
        if os.environ.get(var):
            return os.environ[var]
    root = os.environ.get("TENSORRT_ROOT")
    return str(Path(root) / "include") if root else None


@dataclass
class BuildResult:
    build_dir: Path
    configure_log: str
    kernels: Path
    plugins: Optional[Path]   # None when CMake found no TensorRT headers
    harness: Optional[Path]
    tensorrt_version: Optional[str]  # of the headers the plugin library was compiled against


def build(build_dir: Optional[Path] = None, tensorrt_include: Optional[str] = None, cuda_architectures: Optional[str] = None,
          jobs: int = 2) -> BuildResult:
    """Configure and build with CMake (incremental: an unchanged tree rebuilds nothing).

    tensorrt_include: the TensorRT include folder ("" = none, build the kernels only; None = what CMake finds
    from the environment and system paths)."""
    for tool in ("cmake", "nvcc"):
        if shutil.which(tool) is None:
            raise BdmError(f"building the bdm kernels needs `{tool}` on PATH; install the CUDA toolkit (12.x or 13.x) "
                           f"and CMake >= 3.24")
    build_dir = Path(build_dir or default_build_dir())
    build_dir.mkdir(parents=True, exist_ok=True)
    configure = ["cmake", "-S", str(PLUGINS_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        if not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
    env = dict(os.environ)
    if tensorrt_include is not None:
        # The explicit choice replaces whatever the environment says (CMakeLists.txt reads these names).
        for var in ("TENSORRT_ROOT", "TensorRT_INCLUDE_DIR", "TENSORRT_INCLUDE_DIR"):
            env.pop(var, None)
        configure += [f"-DTensorRT_INCLUDE_DIR={tensorrt_include}", "-DTENSORRT_INCLUDE_DIR=", "-DTENSORRT_ROOT="]
    if cuda_architectures:
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}")
    configured = _run(configure, env, "configure")
    _run(["cmake", "--build", str(build_dir), "-j", str(jobs)], env, "build")
    skipped = TRT_HEADERS_SKIPPED in configured
    version_file = build_dir / "bdm_trt_plugins.version"
    if skipped:
        # A previous configure with headers may have left these behind: they are stale now.
        for stale in (PLUGINS_LIB, HARNESS_EXE, version_file.name):
            (build_dir / stale).unlink(missing_ok=True)
    return BuildResult(
        build_dir=build_dir,
        configure_log=configured,
        kernels=build_dir / KERNELS_LIB,
        plugins=None if skipped else build_dir / PLUGINS_LIB,
        harness=None if skipped else build_dir / HARNESS_EXE,
        tensorrt_version=None if skipped else version_file.read_text().strip(),
    )


def _run(cmd, env, what) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BdmError(f"CMake {what} of plugins/ failed (exit {proc.returncode}): {tail}")
    return proc.stdout + proc.stderr


# ---- the CPU kernels: one shared library from plain C++, built by the system compiler --------------------------

CPU_LIB = "libbdm_cpu_kernels.so"
CPU_BUILD_NOTICE = "building the bdm CPU kernels for this machine (once)"
CPU_SOURCES = ["common/bdm_cpu.cpp", "common/cpu_dispatch.cpp", "common/cpu_isa_portable.cpp",
               "common/cpu_isa_avx2.cpp", "common/cpu_isa_avx512.cpp", "binary_conv/binary_conv_cpu.cpp",
               "multibasis_conv/multibasis_conv_cpu.cpp"]
CPU_HEADER_PATTERNS = ["common/bdm_status.h", "common/bdm_cpu.h", "common/cpu_*.h", "*/*_cpu*.h"]
# -ffp-contract=off: no a*b+c contracted into one FMA rounding (the outputs are bit-identical to the reference).
# -fno-trapping-math: floating-point exceptions are not observed, so a compare-select (PReLU, clamp) may compute both
# sides and vectorise; no value changes (no reassociation, signed zeros and NaNs kept: no -ffast-math).
# -fopenmp: the library links libgomp.so.1, the soname of the OpenMP runtime the torch wheel loads, so after torch it
# shares torch's thread pool.
CPU_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-ffp-contract=off", "-fno-trapping-math", "-fvisibility=hidden",
             "-fopenmp"]
# The per-ISA translation units get their instruction sets here (x86-64 only; elsewhere those files are empty), the
# rest is compiled for the baseline, so one library loads on every CPU and picks its path at run time.
CPU_ISA_FLAGS = {
    "common/cpu_isa_avx2.cpp": ["-mavx2", "-mpopcnt"],
    "common/cpu_isa_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vpopcntdq",
                                  "-mpopcnt"],
}
CXX_CANDIDATES = ("c++", "g++", "clang++")


def _compiler_target(cxx: str) -> str:
    """The machine the compiler builds for (`-dumpmachine`, e.g. x86_64-linux-gnu), so a cross compiler in $CXX gets
    its own target's flags; the host's machine if the compiler does not say."""
    result = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else platform.machine()


def _targets_x86_64(target: str) -> bool:
    return target.split("-")[0].lower() in ("x86_64", "amd64")


def cpu_cache_dir() -> Path:
    explicit = os.environ.get("BDM_CPU_KERNELS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bdm" / "cpu-kernels"


def find_cxx() -> str:
    """$CXX, else the first of c++, g++, clang++ on PATH."""
    explicit = os.environ.get("CXX")
    candidates = [explicit] if explicit else list(CXX_CANDIDATES)
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    wanted = f"$CXX ({explicit})" if explicit else " or ".join(CXX_CANDIDATES)
    raise BdmError(f"building the bdm CPU kernels needs a C++ compiler: {wanted} is not on PATH; install g++ "
                   f"(e.g. `apt-get install g++`) or set $CXX")


def _cpu_source_files() -> List[Path]:
    files = {PLUGINS_DIR / s for s in CPU_SOURCES}
    for pattern in CPU_HEADER_PATTERNS:
        files.update(PLUGINS_DIR.glob(pattern))
    return sorted(files)


def _compile_commands(cxx: str, target: str, out_dir: Path) -> List[List[str]]:
    commands = []
    for source in CPU_SOURCES:
        extra = CPU_ISA_FLAGS.get(source, []) if _targets_x86_64(target) else []
        obj = out_dir / (source.replace("/", "_") + ".o")
        commands.append([cxx, *CPU_FLAGS, *extra, "-c", str(PLUGINS_DIR / source), "-o", str(obj)])
    return commands


def cpu_build_key(cxx: str, target: str) -> str:
    """Hash of what the library is made of: sources, flags, compiler (path, version, target)."""
    digest = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    for part in [cxx, *version, target, *CPU_FLAGS, repr(sorted(CPU_ISA_FLAGS.items()))]:
        digest.update(part.encode() + b"\0")
    for path in _cpu_source_files():
        digest.update(str(path.relative_to(PLUGINS_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def find_cpu_library() -> Optional[Path]:
    """The built CPU library for the current sources and compiler, or None."""
    cxx = find_cxx()
    candidate = cpu_cache_dir() / cpu_build_key(cxx, _compiler_target(cxx)) / CPU_LIB
    return candidate if candidate.is_file() else None


def build_cpu(announce: bool = True) -> Path:
    """Build libbdm_cpu_kernels.so unless the cache holds one of these sources; return its path. Atomic: objects and
    the library are made in a private temporary folder and the library renamed into place, so concurrent builders
    (two processes on first use) both end with a complete file. BdmError (one line) without a compiler or on failure."""
    cxx = find_cxx()
    machine = _compiler_target(cxx)
    target = cpu_cache_dir() / cpu_build_key(cxx, machine) / CPU_LIB
    if target.is_file():
        return target
    if announce:
        print(CPU_BUILD_NOTICE, file=sys.stderr, flush=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            tmp_dir = Path(tmp)
            commands = _compile_commands(cxx, machine, tmp_dir)
            with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for result in pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), commands):
                    _check_compiler(result, cxx)
            library = tmp_dir / CPU_LIB
            objects = [cmd[-1] for cmd in commands]
            _check_compiler(subprocess.run([cxx, "-shared", "-fopenmp", *objects, "-o", str(library)],
                                           capture_output=True, text=True), cxx)
            os.replace(library, target)
    except OSError as e:
        raise BdmError(f"building the bdm CPU kernels in {target.parent} failed: {e}") from None
    return target


def _check_compiler(result: subprocess.CompletedProcess, cxx: str) -> None:
    if result.returncode == 0:
        return
    lines = (result.stderr or result.stdout).strip().splitlines()
    first_error = next((line for line in lines if "error" in line), lines[-1] if lines else "no output")
    raise BdmError(f"building the bdm CPU kernels with {cxx} failed (exit {result.returncode}): {first_error.strip()}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bdm.plugins.build", description=__doc__.splitlines()[0])
    parser.add_argument("build_dir", nargs="?", type=Path, default=None)
    parser.add_argument("--tensorrt-include", default=None, help="TensorRT include folder ('' to skip the adapter)")
    parser.add_argument("--cuda-architectures", default=None, help="override, e.g. '90-real' for a quick local build")
    parser.add_argument("--cpu", action="store_true",
                        help="build the CPU kernels (libbdm_cpu_kernels.so) with the system C++ compiler instead")
    args = parser.parse_args(argv)
    if args.cpu:
        return _main_cpu()
    try:
        result = build(args.build_dir, args.tensorrt_include, args.cuda_architectures)
    except BdmError as e:
        print(f"bdm: error: {e}", file=sys.stderr)
        return 2
    print(f"kernels: {result.kernels}")
    if result.plugins:
        print(f"TensorRT plugins: {result.plugins} (TensorRT {result.tensorrt_version} headers)")
    else:
        print("TensorRT plugins: skipped, no TensorRT headers (set TENSORRT_ROOT or TensorRT_INCLUDE_DIR)")
    return 0


def _main_cpu() -> int:
    from bdm.plugins import cpu_kernels

    try:
        path = build_cpu()
        kernels = cpu_kernels.load()
    except BdmError as e:
        print(f"bdm: error: {e}", file=sys.stderr)
        return 2
    print(f"CPU kernels: {path} (path {kernels.isa}, {kernels.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
