"""Everything of plugins/ that needs a GPU, in one command (a few minutes on an H100-class machine):

    python -m bdm.plugins.gpu_check [--out DIR] [--tensorrt-include DIR] [--budget SECONDS]

Steps, each in its own process with its own timeout (and all within --budget): build the kernels for every
architecture (into the folder the tests use), build the TensorRT plugin library for this GPU where TensorRT headers
are found, run the GPU test files (tests/plugins; the harness too where there are headers), the kernel benchmark of
both ops, and, where TensorRT is installed, an engine check: a three-node bdm model (MultiBasisConv on the tensor
cores, BinaryConv2d with its timestep group, MultiBasisConv on the simple kernel) exported with its function bodies,
built into an engine with the plugins, and run through TrtRunner (CUDA graphs, a second input shape evicting the
first) against ONNX Runtime and the NumPy reference of the specs (bdm.runtime.engine_check). Its weights, scales and steps are powers of two,
so every runtime computes it exactly: all three must agree bit for bit.

Prints one row per step as it ends and then one summary table (step, status, seconds, key number); writes the table
(gpu_check_summary.txt, .json) and every step's output (gpu_check.log) to --out, three files (default
build/gpu_check, which also holds the plugin library built for this GPU and the engine check's files). Exit status: 0
when no step failed (a step may be skipped, saying why), 1 when one failed or ran out of time, 2 with one line when
there is no CUDA GPU.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional


from bdm.plugins import build as plugin_build

REPO = plugin_build.PLUGINS_DIR.parent
TESTS_BUILD_DIR = REPO / "build" / "plugins-test"  # tests/plugins/plugin_test_support.py BUILD_DIR
WORK_DIR = REPO / "build" / "gpu_check"  # the plugin library for this GPU, the engine check's files
# Test files with GPU cases (their host cases run too: they are quick); `slow` ones (a second CMake build) left out.
GPU_TEST_FILES = ("tests/plugins/test_binary_kernels.py", "tests/plugins/test_multibasis_kernels.py",
                  "tests/plugins/test_bench_kernels.py", "tests/plugins/test_plugin_build.py")
HARNESS_TEST_FILE = "tests/plugins/test_plugin_harness.py"
NO_GPU_SKIP = "no CUDA GPU"  # the GPU tests' skip reason: on a GPU machine, a failure of this check


@dataclass
class Step:
    name: str
    command: List[str]
    timeout: float
    key: Callable[[str], str] = lambda output: ""       # the key number, from the step's output
    failure: Callable[[str], Optional[str]] = lambda output: None  # a failure a zero exit status hides
    skip: Optional[str] = None                            # why the step does not run here
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    step: str
    status: str  # ok, FAIL, timeout, skip
    seconds: float
    key: str


def run_step(step: Step, deadline: float, log) -> Result:
    """Run one step in its own process group (killed whole on timeout), its output appended to `log`."""
    if step.skip:
        return Result(step.name, "skip", 0.0, step.skip)
    left = deadline - time.monotonic()
    if left < 5:
        return Result(step.name, "skip", 0.0, "no time left in --budget")
    timeout = min(step.timeout, left)
    log.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(step.command, cwd=REPO, env=dict(os.environ, **step.env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        log.write(output)
        return Result(step.name, "timeout", time.monotonic() - start, f"killed after {timeout:.0f} s")
    seconds = time.monotonic() - start
    log.write(output)
    log.flush()
    if proc.returncode != 0:
        last = (output.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return Result(step.name, "FAIL", seconds, last[:100])
    failure = step.failure(output)
    if failure:
        return Result(step.name, "FAIL", seconds, failure)
    return Result(step.name, "ok", seconds, step.key(output))


def format_row(result: Result) -> str:
    return f"{result.step:<26} {result.status:<8} {result.seconds:>8.1f}  {result.key}"


def format_table(results: List[Result]) -> str:
    header = f"{'step':<26} {'status':<8} {'seconds':>8}  key"
    return "\n".join([header, "-" * 100] + [format_row(r) for r in results])


def exit_status(results: List[Result]) -> int:
    return 1 if any(r.status in ("FAIL", "timeout") for r in results) else 0


# ---- key numbers and hidden failures, read from each step's output -------------------------------------------

def pytest_counts(output: str) -> str:
    """'12 passed, 3 skipped' from pytest's last line."""
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", (output.strip().splitlines() or [""])[-1])
    return ", ".join(f"{n} {what}" for n, what in found)


def gpu_tests_skipped(output: str) -> Optional[str]:
    return "GPU tests skipped: PyTorch sees no GPU in pytest" if NO_GPU_SKIP in output else None


def ratio_median(output: str, column: str) -> str:
    """The median of a benchmark table column (TC/cuDNN, ...), over every row."""
    lines = [line for line in output.splitlines() if "|" in line]
    if len(lines) < 2:
        return "no table"
    header = lines[0].split("|")[-1].split()
    values = [float(line.split("|")[-1].split()[header.index(column)]) for line in lines[1:]]
    return f"{column} median {statistics.median(values):.2f} ({len(values)} shapes)"


def last_key_line(output: str) -> str:
    keys = [line[len("key: "):] for line in output.splitlines() if line.startswith("key: ")]
    return keys[-1] if keys else ""


def build_key(output: str) -> str:
    match = re.search(r"^kernels: (.+)$", output, re.MULTILINE)
    if not match or not Path(match.group(1)).is_file():
        return ""
    return f"{Path(match.group(1)).name} {Path(match.group(1)).stat().st_size / 2**20:.1f} MiB"


def plugins_key(output: str) -> str:
    match = re.search(r"^TensorRT plugins: (\S+) \((TensorRT [^)]*)\)", output, re.MULTILINE)
    return match.group(2) if match else ""


# ---- the plan ------------------------------------------------------------------------------------------------

def plan(work_dir: Path, capability, tensorrt_include: Optional[str], tensorrt_installed: bool) -> List[Step]:
    python = sys.executable
    jobs = str(os.cpu_count() or 2)
    kernels = TESTS_BUILD_DIR / plugin_build.KERNELS_LIB
    plugins_dir = work_dir / "plugins"
    no_headers = "no TensorRT headers (--tensorrt-include DIR or $TENSORRT_INCLUDE_DIR)"
    tests_present = (REPO / GPU_TEST_FILES[0]).is_file()
    test_files = list(GPU_TEST_FILES) + ([HARNESS_TEST_FILE] if tensorrt_include else [])
    steps = [
        Step("build kernels", [python, "-m", "bdm.plugins.build", str(TESTS_BUILD_DIR), "--tensorrt-include", "",
                               "--jobs", jobs], 240, key=build_key),
        Step("build TensorRT plugins", [python, "-m", "bdm.plugins.build", str(plugins_dir), "--tensorrt-include",
                                        tensorrt_include or "", "--jobs", jobs, "--cuda-architectures",
                                        f"{capability[0]}{capability[1]}-real"], 150, key=plugins_key,
             skip=None if tensorrt_include else no_headers),
        Step("GPU tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *test_files], 240,
             key=pytest_counts, failure=gpu_tests_skipped,
             skip=None if tests_present else "tests/ not found (run from a source checkout)",
             env={"TENSORRT_INCLUDE_DIR": tensorrt_include} if tensorrt_include else {}),
    ]
    for op, column in (("binary_conv", "TC/cuDNN"), ("multibasis_conv", "TC/cuDNN")):
        steps.append(Step(f"bench {op}", [python, "-m", "bdm.plugins.bench_kernels", "--op", op, "--library",
                                          str(kernels)], 120, key=lambda output, column=column: ratio_median(output,
                                                                                                           column)))
    engine_skip = None if tensorrt_installed else "TensorRT is not installed"
    if engine_skip is None and not tensorrt_include:
        engine_skip = f"no plugin library: {no_headers}"
    steps.append(Step("engine vs ONNX Runtime", [python, "-m", "bdm.runtime.engine_check", "--work",
                                                  str(work_dir / "engine"), "--plugins",
                                                  str(plugins_dir / plugin_build.PLUGINS_LIB)], 240,
                      key=last_key_line, skip=engine_skip))
    return steps


def gpu_capability():
    """(name, (major, minor)) of CUDA device 0, or None when PyTorch sees no GPU (or is missing)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)


def tensorrt_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdm.plugins.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WORK_DIR, help="folder for the log and the summary table")
    parser.add_argument("--tensorrt-include", default=None, help="TensorRT include folder for the plugin library "
                                                                 "(default: the environment's, else the system's)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    gpu = gpu_capability()
    if gpu is None:
        print("gpu_check: error: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); run it on a "
              "machine with an NVIDIA GPU, its driver and a CUDA build of PyTorch", file=sys.stderr)
        return 2
    name, capability = gpu
    include = args.tensorrt_include if args.tensorrt_include is not None else plugin_build.find_tensorrt_include()
    include = str(Path(include).resolve()) if include else None  # the steps run in the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    results = [Result("GPU", "ok", 0.0, f"{name}, compute capability {capability[0]}.{capability[1]}")]
    print(format_row(results[0]), flush=True)
    with open(args.out / "gpu_check.log", "w") as log:
        for step in plan(WORK_DIR, capability, include, tensorrt_installed()):
            results.append(run_step(step, deadline, log))
            print(format_row(results[-1]), flush=True)
    table = format_table(results)
    (args.out / "gpu_check_summary.txt").write_text(table + "\n")
    (args.out / "gpu_check_summary.json").write_text(json.dumps([r.__dict__ for r in results], indent=1) + "\n")
    print(f"\n{table}\nlogs: {args.out / 'gpu_check.log'}")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
