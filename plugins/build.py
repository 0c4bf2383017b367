"""Find or build the native libraries of plugins/ (CMakeLists.txt beside this file).

- libbdm_kernels.so: the CUDA kernels and their C ABI (needs nvcc; no TensorRT).
- libbdm_trt_plugins.so: the TensorRT IPluginV3 adapters (needs TensorRT headers of the runtime's major).
- bdm_plugin_harness: the host-only creator test.

`python -m bdm.plugins.build [BUILD_DIR] [--tensorrt-include DIR]` builds them; the default folder is
build/plugins under the repository root (or $BDM_PLUGINS_BUILD_DIR).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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


# Where CMakeLists.txt looks for NvInferRuntime.h when no location is given.
SYSTEM_TENSORRT_INCLUDES = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu",
                            "/usr/local/TensorRT/include", "/opt/tensorrt/include")


def find_tensorrt_include() -> Optional[str]:
    """The TensorRT include folder a build would use: the environment's (tensorrt_include_from_environment; the first
    of several ':'-separated ones), else the first system folder CMakeLists.txt searches; None when none holds
    NvInferRuntime.h."""
    named = tensorrt_include_from_environment()
    candidates = named.split(os.pathsep) if named else list(SYSTEM_TENSORRT_INCLUDES)
    return next((d for d in candidates if (Path(d) / "NvInferRuntime.h").is_file()), None)


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
        output = proc.stdout + proc.stderr
        # CMakeLists.txt's own refusals are one `bdm: ...` message, which CMake wraps over indented lines.
        ours = re.search(r"^CMake Error at [^\n]*\n((?:  .*\n?)+)", output, re.MULTILINE)
        if ours and ours.group(1).strip().startswith("bdm:"):
            raise BdmError(" ".join(ours.group(1).split())[len("bdm: "):])
        tail = "\n".join(output.strip().splitlines()[-25:])
        raise BdmError(f"CMake {what} of plugins/ failed (exit {proc.returncode}): {tail}")
    return proc.stdout + proc.stderr


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bdm.plugins.build", description=__doc__.splitlines()[0])
    parser.add_argument("build_dir", nargs="?", type=Path, default=None)
    parser.add_argument("--tensorrt-include", default=None, help="TensorRT include folder ('' to skip the adapter)")
    parser.add_argument("--cuda-architectures", default=None, help="override, e.g. '90-real' for a quick local build")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    args = parser.parse_args(argv)
    try:
        result = build(args.build_dir, args.tensorrt_include, args.cuda_architectures, args.jobs)
    except BdmError as e:
        print(f"bdm: error: {e}", file=sys.stderr)
        return 2
    print(f"kernels: {result.kernels}")
    if result.plugins:
        print(f"TensorRT plugins: {result.plugins} (TensorRT {result.tensorrt_version} headers)")
    else:
        print("TensorRT plugins: skipped, no TensorRT headers (set TENSORRT_ROOT or TensorRT_INCLUDE_DIR)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
