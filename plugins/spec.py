"""Load the machine-readable op specs (common.yaml + */spec.yaml): one source of truth for the exporter,
the ONNX function bodies, the NumPy reference, the plugin field names and the tests."""

import functools
from pathlib import Path

import yaml

PLUGINS_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def common() -> dict:
    return yaml.safe_load((PLUGINS_DIR / "common.yaml").read_text())


@functools.lru_cache(maxsize=None)
def ops() -> dict:
    """op_type -> its spec dict (inputs, outputs, attributes, semantics), plus 'folder'."""
    found = {}
    for spec_file in sorted(PLUGINS_DIR.glob("*/spec.yaml")):
        for name, op in yaml.safe_load(spec_file.read_text())["ops"].items():
            if name in found:
                raise ValueError(f"op {name} is specified twice ({found[name]['folder']} and {spec_file.parent.name})")
            found[name] = dict(op, folder=spec_file.parent.name)
    return found


def plugin_ops() -> dict:
    """The ops with a TensorRT plugin: all but those whose spec says `tensorrt_plugin: false` (kernel not written)."""
    return {name: op for name, op in ops().items() if op.get("tensorrt_plugin", True)}


def op(name: str) -> dict:
    return ops()[name]


def input_names(name: str) -> list:
    return [i["name"] for i in op(name)["inputs"]]


def attribute_defaults(name: str) -> dict:
    return {k: v["default"] for k, v in op(name)["attributes"].items() if "default" in v}


def group_index(t0: int, num_groups: int, total_steps: int) -> int:
    """The spec's group_rule for one timestep value (Python ints: no float rounding involved)."""
    return min(max((int(t0) * num_groups) // total_steps, 0), num_groups - 1)
