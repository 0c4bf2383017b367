"""The TensorRT adapter compiled against each available TensorRT header version, exercised by the host-only
harness (plugins/harness/plugin_harness.cpp): creators match the op specs, build-time calls, serialization.
Skips without headers; point $TENSORRT_INCLUDE_DIR at one or more include folders (':'-separated)."""

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from bdm.plugins import build as plugin_build
from bdm.plugins import spec

from plugin_test_support import BUILD_DIR, require_toolchain, tensorrt_header_dirs

HEADER_DIRS = tensorrt_header_dirs()
# Sizes chosen to hit the awkward cases: channels not a multiple of 32, odd H and W, batch 2.
SIZES = {"N": 2, "H": 9, "W": 7, "in_channels": 40, "out_channels": 40, "channels": 40, "kernel_size": 3}
TYPES = {"float32": "f32", "float16": "f16", "int32": "i32"}

pytestmark = pytest.mark.skipif(not HEADER_DIRS, reason="no TensorRT headers: set TENSORRT_INCLUDE_DIR (or "
                                                        "TENSORRT_ROOT) to test the plugin adapter")


def header_version(include_dir):
    text = (Path(include_dir) / "NvInferVersion.h").read_text()
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH", "BUILD"):
        m = re.search(rf"#define (?:TRT_{part}_ENTERPRISE|NV_TENSORRT_{part}) +(\d+)", text)
        parts.append(m.group(1))
    return ".".join(parts)


@pytest.fixture(scope="module", params=HEADER_DIRS)
def adapter_build(request):
    require_toolchain()
    return plugin_build.build(BUILD_DIR, tensorrt_include=request.param), request.param


def symbolic(dim, fields):
    """A spec shape entry (int, a name, or 'ceil(in_channels/32)') at the test sizes."""
    if isinstance(dim, int):
        return dim
    if dim.startswith("ceil(in_channels/32)"):
        return math.ceil(fields["in_channels"] / 32)
    return fields[dim]


def required_fields(op_name):
    attrs = spec.op(op_name)["attributes"]
    return {name: SIZES[name] for name, a in attrs.items() if "default" not in a}


def harness_args(op_name, fields, x_dtype):
    full = {**SIZES, **spec.attribute_defaults(op_name), **fields}
    tensors = []
    for tensor in spec.op(op_name)["inputs"]:
        dtype = x_dtype if tensor["name"] == "x" else tensor["dtype"][0]
        dims = [symbolic(d, full) for d in tensor["shape"]]
        tensors.append(f"{TYPES[dtype]}:{','.join(str(d) for d in dims)}")
    return [f"{k}={v}" for k, v in fields.items()] + ["--"] + tensors


def run_harness(build, op_name, fields, x_dtype="float32"):
    proc = subprocess.run([str(build.harness), str(build.plugins), op_name] + harness_args(op_name, fields, x_dtype),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout), proc.returncode


def test_build_names_the_header_version_and_needs_no_tensorrt_library(adapter_build):
    build, include_dir = adapter_build
    version = header_version(include_dir)
    assert f"against TensorRT {version} headers" in build.configure_log
    assert build.tensorrt_version == version
    needed = subprocess.run(["readelf", "-d", str(build.plugins)], capture_output=True, text=True, check=True).stdout
    assert "libnvinfer" not in needed and "libcudart" not in needed
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(build.plugins)], capture_output=True, text=True,
                               check=True).stdout
    assert "getPluginRegistry" not in undefined  # resolved at load time through dlopen(RTLD_NOLOAD) instead
    exported = subprocess.run(["nm", "-D", "--defined-only", str(build.plugins)], capture_output=True, text=True,
                              check=True).stdout
    assert {line.split()[-1] for line in exported.splitlines() if " T " in line} == {"getCreators", "setLoggerFinder"}


@pytest.mark.parametrize("op_name", sorted(spec.plugin_ops()))
@pytest.mark.parametrize("x_dtype", ["float32", "float16"])
def test_harness_exercises_each_creator(adapter_build, op_name, x_dtype):
    build, _ = adapter_build
    report, rc = run_harness(build, op_name, required_fields(op_name), x_dtype)
    assert report["found"] and report["created"], report["log"]
    assert rc == 0 and all(report["checks"].values()), report["checks"]
    # every op of the specs has a creator, with the spec's attribute names in order, namespace and version
    creators = {c["name"]: c for c in report["creators"]}
    assert set(creators) == set(spec.plugin_ops())
    creator = creators[op_name]
    assert creator["fields"] == list(spec.op(op_name)["attributes"])
    assert (creator["namespace"], creator["version"], creator["kind"]) == (
        spec.common()["plugin_namespace"], spec.common()["plugin_version"], "PLUGIN CREATOR_V3ONE")
    # defaults of the spec fill what the node leaves out, and survive serialization
    assert report["serialized_fields"] == dict(spec.attribute_defaults(op_name), **required_fields(op_name))
    out_channels = report["serialized_fields"].get("out_channels", report["serialized_fields"].get("channels"))
    assert report["output_shape"] == [SIZES["N"], out_channels, SIZES["H"], SIZES["W"]]


def test_workspace_holds_both_sign_bit_planes(adapter_build):
    build, _ = adapter_build
    report, _ = run_harness(build, "BinaryConv2d", required_fields("BinaryConv2d"))
    words = math.ceil(SIZES["in_channels"] / 32)
    assert report["workspace_bytes"] == 2 * SIZES["N"] * SIZES["H"] * SIZES["W"] * words * 4
    report, _ = run_harness(build, "TimestepBias", required_fields("TimestepBias"))
    assert report["workspace_bytes"] == 0


@pytest.mark.parametrize("change, message", [
    ({"kernel_size": 5}, "field 'kernel_size' = 5 is not one of 1 3"),
    ({"pad_value": 2}, "field 'pad_value' = 2 is not one of -1 0 1"),
    ({"residual": 1, "out_channels": 48}, "residual = 1 needs in_channels == out_channels"),
    ({"in_channels": None}, "required field 'in_channels' is missing"),
    ({"groups": 2}, "unknown field 'groups'"),
    ({"num_groups": 0}, "field 'num_groups' = 0 is not a positive int32"),
])
def test_creator_refuses_attributes_outside_the_spec(adapter_build, change, message):
    build, _ = adapter_build
    fields = dict(required_fields("BinaryConv2d"), **change)
    fields = {k: v for k, v in fields.items() if v is not None}
    report, _ = run_harness(build, "BinaryConv2d", fields)
    assert report["found"] and not report["created"]
    assert any(message in line for line in report["log"]), report["log"]


@pytest.mark.parametrize("scenario", ["dlopen", "load_library"])
def test_self_registration_without_double_registration(adapter_build, scenario):
    """In a process that already holds libnvinfer.so.<major> (here the registry test double, loaded RTLD_LOCAL
    like Python loads the real one): a plain dlopen (polygraphy --plugins, ctypes) registers the creators, and
    IPluginRegistry::loadLibrary afterwards (or alone) still succeeds with every creator registered once."""
    build, _ = adapter_build
    major = build.tensorrt_version.split(".")[0]
    double = build.build_dir / "test_registry_double" / f"libnvinfer.so.{major}"
    proc = subprocess.run([str(build.harness), "--registration", str(double), str(build.plugins), scenario],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    expected = sorted(f"bdm::{name}" for name in spec.plugin_ops())
    if scenario == "dlopen":
        assert sorted(report["after_dlopen"]) == expected
    assert report["load_library_ok"]
    assert sorted(report["after_load_library"]) == expected
