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
# Sizes chosen to hit the awkward cases: channels not a multiple of 32, odd H, W and L, batch 2.
SIZES = {"N": 2, "H": 9, "W": 7, "L": 11, "in_channels": 40, "out_channels": 40, "channels": 40, "kernel_size": 3,
         "num_bases": 2, "spatial_dims": 2}
SPATIAL_AXES = {2: ["H", "W"], 1: ["L"], 0: []}  # MultiBasisConv's x axes after [N, C] per spatial_dims
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
    """A spec shape entry at the test sizes, as a list of dims: an int, a name, 'ceil(in_channels/32)', or a
    '*'-group of axes (x's spatial axes, the kernel taps, the output's spatial axes)."""
    if isinstance(dim, int):
        return [dim]
    if dim.startswith("ceil(in_channels/32)"):
        return [math.ceil(fields["in_channels"] / 32)]
    spatial = [fields[axis] for axis in SPATIAL_AXES.get(fields.get("spatial_dims"), [])]
    if dim == "*spatial":
        return spatial
    if dim == "*taps":
        return [fields["kernel_size"]] * len(spatial)
    if dim == "*out_spatial":
        return [(n + 2 * fields["padding"] - fields["kernel_size"]) // fields["stride"] + 1 for n in spatial]
    return [fields[dim]]


def spec_shape(shape, fields):
    return [d for dim in shape for d in symbolic(dim, fields)]


def full_fields(op_name, fields):
    return {**SIZES, **spec.attribute_defaults(op_name), **fields}


def x_dtypes(op_name):
    return spec.op(op_name)["inputs"][0]["dtype"]


def required_fields(op_name):
    attrs = spec.op(op_name)["attributes"]
    return {name: SIZES[name] for name, a in attrs.items() if "default" not in a}


def harness_args(op_name, fields, x_dtype):
    full = full_fields(op_name, fields)
    tensors = []
    for tensor in spec.op(op_name)["inputs"]:
        dtype = x_dtype if tensor["name"] == "x" else tensor["dtype"][0]
        dims = spec_shape(tensor["shape"], full)
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
    assert "getPluginRegistry" not in undefined  # TensorRT registers the creators (getCreators), never the library
    exported = subprocess.run(["nm", "-D", "--defined-only", str(build.plugins)], capture_output=True, text=True,
                              check=True).stdout
    assert {line.split()[-1] for line in exported.splitlines() if " T " in line} == {"getCreators", "setLoggerFinder"}


@pytest.mark.parametrize("op_name, x_dtype", [(op, d) for op in sorted(spec.plugin_ops()) for d in x_dtypes(op)])
def test_harness_exercises_each_creator(adapter_build, op_name, x_dtype):
    build, _ = adapter_build
    report, rc = run_harness(build, op_name, required_fields(op_name), x_dtype)
    assert report["found"] and report["created"], report["log"]
    assert rc == 0 and all(report["checks"].values()), report["checks"]
    # the plugin types x (and the output, which follows it) exactly as the spec lists
    assert report["x_types"] == [TYPES[d] for d in x_dtypes(op_name)]
    # every op of the specs has a creator, with the spec's attribute names in order, namespace and version
    creators = {c["name"]: c for c in report["creators"]}
    assert set(creators) == set(spec.plugin_ops())
    creator = creators[op_name]
    assert creator["fields"] == list(spec.op(op_name)["attributes"])
    assert (creator["namespace"], creator["version"], creator["kind"]) == (
        spec.common()["plugin_namespace"], spec.common()["plugin_version"], "PLUGIN CREATOR_V3ONE")
    # defaults of the spec fill what the node leaves out, and survive serialization
    assert report["serialized_fields"] == dict(spec.attribute_defaults(op_name), **required_fields(op_name))
    output = spec.op(op_name)["outputs"][0]
    assert report["output_shape"] == spec_shape(output["shape"], full_fields(op_name, report["serialized_fields"]))


def test_multibasis_conv_refuses_float16_x(adapter_build):
    """The spec gives MultiBasisConv float32 x only (its quantizer divides in float32): a float16 x is neither typed
    nor offered as a format, and the log says why."""
    build, _ = adapter_build
    report, rc = run_harness(build, "MultiBasisConv", required_fields("MultiBasisConv"), "float16")
    assert report["created"] and rc == 1
    assert not report["checks"]["output_type_follows_x"] and not report["checks"]["formats_accept_given_types"]
    assert "bdm::MultiBasisConv v1: x must be float32" in " ".join(report["log"])


# (attributes, output spatial dims, activation bit-planes) at x spatial H x W = 9 x 7 (conv2d) or L = 11 (conv1d).
@pytest.mark.parametrize("fields, out_spatial, planes", [
    (dict(spatial_dims=2, kernel_size=3, padding=1), [9, 7], 4),
    (dict(spatial_dims=2, kernel_size=3, stride=2, padding=1, act_bits=8, num_bases=1), [5, 4], 8),
    (dict(spatial_dims=2, kernel_size=3, stride=2, padding=0), [4, 3], 4),
    (dict(spatial_dims=2, kernel_size=2, stride=2), [4, 3], 4),  # odd spans 7 and 5: the division floors
    (dict(spatial_dims=2, kernel_size=1, padding=2, act_bits=0), [13, 11], 0),
    (dict(spatial_dims=1, kernel_size=3, padding=1), [11], 4),
    (dict(spatial_dims=1, kernel_size=3, act_bits=8), [9], 8),
    (dict(spatial_dims=0), [], 4),
    (dict(spatial_dims=0, act_bits=0), [], 0),
])
def test_multibasis_conv_output_shape_and_workspace(adapter_build, fields, out_spatial, planes):
    build, _ = adapter_build
    fields = {"in_channels": 40, "out_channels": 24, "num_bases": 2, **fields}
    report, rc = run_harness(build, "MultiBasisConv", fields)
    assert rc == 0 and all(report["checks"].values()), (report["checks"], report["log"])
    assert report["output_shape"] == [SIZES["N"], 24] + out_spatial
    # act_bits uint32 bit-planes of the codes: one word per 32 input channels per input pixel
    pixels = math.prod(SIZES[axis] for axis in SPATIAL_AXES[fields["spatial_dims"]])
    assert report["workspace_bytes"] == SIZES["N"] * pixels * math.ceil(40 / 32) * planes * 4


def test_multibasis_conv_refuses_x_shorter_than_its_kernel(adapter_build):
    """H x W = 9 x 7 with kernel 9, no padding: H gives one output row, W none; refused where TensorRT first knows
    the dims (configurePlugin), not at enqueue."""
    build, _ = adapter_build
    report, rc = run_harness(build, "MultiBasisConv", dict(required_fields("MultiBasisConv"), kernel_size=9))
    assert report["created"] and rc == 1 and not report["checks"]["configure_accepts_given_dims"]
    assert any("x has dims [2, 40, 9, 7]: spatial axis 3 is shorter than kernel_size 9 after padding 0" in line
               for line in report["log"]), report["log"]


def test_workspace_holds_both_sign_bit_planes(adapter_build):
    build, _ = adapter_build
    report, _ = run_harness(build, "BinaryConv2d", required_fields("BinaryConv2d"))
    words = math.ceil(SIZES["in_channels"] / 32)
    assert report["workspace_bytes"] == 2 * SIZES["N"] * SIZES["H"] * SIZES["W"] * words * 4
    report, _ = run_harness(build, "TimestepBias", required_fields("TimestepBias"))
    assert report["workspace_bytes"] == 0


@pytest.mark.parametrize("op_name, change, message", [
    ("BinaryConv2d", {"kernel_size": 5}, "field 'kernel_size' = 5 is not one of 1 3"),
    ("BinaryConv2d", {"pad_value": 2}, "field 'pad_value' = 2 is not one of -1 0 1"),
    ("BinaryConv2d", {"residual": 1, "out_channels": 48}, "residual = 1 needs in_channels == out_channels"),
    ("BinaryConv2d", {"in_channels": None}, "required field 'in_channels' is missing"),
    ("BinaryConv2d", {"groups": 2}, "unknown field 'groups'"),
    ("BinaryConv2d", {"num_groups": 0}, "field 'num_groups' = 0 is not a positive int32"),
    ("MultiBasisConv", {"stride": 2, "spatial_dims": 1}, "stride = 2 needs spatial_dims = 2"),
    ("MultiBasisConv", {"act_bits": 3}, "field 'act_bits' = 3 is not one of 0 4 8"),
    ("MultiBasisConv", {"spatial_dims": 0, "kernel_size": 3},
     "spatial_dims = 0 (linear) needs kernel_size = 1 and padding = 0"),
    ("MultiBasisConv", {"spatial_dims": 0, "padding": 1},
     "spatial_dims = 0 (linear) needs kernel_size = 1 and padding = 0"),
    ("MultiBasisConv", {"padding": -1}, "field 'padding' = -1 is not an int32 >= 0"),
    ("MultiBasisConv", {"num_bases": 3}, "field 'num_bases' = 3 is not one of 1 2"),
    ("MultiBasisConv", {"spatial_dims": None}, "required field 'spatial_dims' is missing"),
])
def test_creator_refuses_attributes_outside_the_spec(adapter_build, op_name, change, message):
    build, _ = adapter_build
    fields = dict(required_fields(op_name), **change)
    fields = {k: v for k, v in fields.items() if v is not None}
    report, _ = run_harness(build, op_name, fields)
    assert report["found"] and not report["created"]
    assert any(message in line for line in report["log"]), report["log"]


@pytest.mark.parametrize("op_name, attribute", [(op, name) for op in sorted(spec.plugin_ops())
                                                 for name, a in spec.op(op)["attributes"].items() if "maximum" in a])
def test_creator_refuses_what_the_spec_maximum_refuses(adapter_build, op_name, attribute):
    build, _ = adapter_build
    maximum = spec.op(op_name)["attributes"][attribute]["maximum"]
    for value, created in ((maximum, True), (maximum + 1, False)):
        fields = dict(required_fields(op_name), **{attribute: value}, **({"residual": 0} if op_name == "BinaryConv2d"
                                                                         else {}))
        report, _ = run_harness(build, op_name, fields)
        assert report["created"] == created, report["log"]
    assert any(f"field '{attribute}' = {maximum + 1} is not an int32 from 1 to {maximum}" in line
               for line in report["log"]), report["log"]


@pytest.mark.parametrize("scenario", ["dlopen", "load_library"])
def test_load_library_is_the_one_registration_path(adapter_build, scenario):
    """In a process that already holds libnvinfer.so.<major> (here the registry test double, loaded RTLD_LOCAL like
    Python loads the real one): a plain dlopen (polygraphy --plugins, ctypes) registers nothing; IPluginRegistry::
    loadLibrary registers every creator once, and a second loadLibrary fails as TensorRT documents, changing nothing
    (bdm's load_plugins therefore checks the registry first)."""
    build, _ = adapter_build
    major = build.tensorrt_version.split(".")[0]
    double = build.build_dir / "test_registry_double" / f"libnvinfer.so.{major}"
    proc = subprocess.run([str(build.harness), "--registration", str(double), str(build.plugins), scenario],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    expected = sorted(f"bdm::{name}" for name in spec.plugin_ops())
    assert report["after_dlopen"] == ([] if scenario == "dlopen" else None)
    assert report["load_library_ok"] and sorted(report["after_load_library"]) == expected
    assert not report["second_load_library_ok"] and sorted(report["after_second_load_library"]) == expected
