"""The engine check of `python -m bdm.plugins.gpu_check` (its last step, in a process of its own): a three-node bdm
model whose arithmetic is exact in every runtime, built into a TensorRT engine with the plugin library and run
through TrtRunner against ONNX Runtime and the NumPy reference of the op specs; all three must agree bit for bit.

    python -m bdm.runtime.engine_check --work DIR --plugins LIBRARY
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

CHECK_PROFILE = ("1x16x16", "2x16x16", "2x32x32")
# (x_t shape, t): a shape, the same shape with other timesteps (graph replays read t from the buffer), a second
# shape (evicts the first: max_shapes=1), the first again (a new context and graph)
CHECK_FEEDS = [((2, 3, 16, 16), (900, 10)), ((2, 3, 16, 16), (100, 1990)), ((2, 3, 16, 16), (1999, 0)),
               ((1, 3, 32, 32), (1500,)), ((2, 3, 16, 16), (450, 450))]
CHECK_MODES = ["eager+capture", "replay", "replay", "eager+capture", "eager+capture"]


def check_layers(seed: int = 0) -> List[dict]:
    """The three bdm nodes of the engine check: MultiBasisConv 3 -> 64 (A4, two bases, 3x3: the tensor-core kernel
    on sm_80..sm_90), BinaryConv2d 64 -> 64 (3x3, fused, residual: the tensor cores, its group from t), MultiBasisConv
    64 -> 3 (the simple kernel). Scales, steps, alphas, tables and biases are small multiples of powers of two, so
    every sum is exact in float32 whatever its order: ONNX Runtime's function bodies, the kernels and the NumPy
    reference all give the same bits."""
    from bdm.plugins import multibasis_reference, packing

    rng = np.random.default_rng(seed)

    def signs(*shape):
        return np.where(rng.random(shape) < 0.5, -1.0, 1.0)

    def grid(shape, step, bound):  # multiples of `step` in [-bound, bound]
        return (rng.integers(-int(bound / step), int(bound / step) + 1, shape) * step).astype(np.float32)

    def multibasis(cin, cout):
        scale = np.stack([np.full(cout, 0.5), rng.choice([0.25, 0.125], cout)]).astype(np.float32)
        return {"op_type": "MultiBasisConv",
                "attributes": dict(in_channels=cin, out_channels=cout, num_bases=2, spatial_dims=2, kernel_size=3,
                                   padding=1, act_bits=4),
                "inputs": dict(weight=multibasis_reference.pack_bases(signs(2, cout, cin, 3, 3)), scale=scale,
                               bias=grid(cout, 1 / 16, 2), act_step=np.array([0.25], np.float32))}

    groups, channels = 5, 64
    binary = {"op_type": "BinaryConv2d",
              "attributes": dict(in_channels=channels, out_channels=channels, kernel_size=3, num_groups=groups,
                                 total_steps=2000, residual=1),
              "inputs": dict(weight=packing.pack_signs(signs(channels, channels, 3, 3)),
                             alpha=rng.choice([1 / 16, 1 / 32], channels).astype(np.float32),
                             threshold=grid((groups, channels), 1 / 32, 1), bias0=grid((groups, channels), 1 / 16, 2),
                             slope=rng.choice([0.25, 0.5], (groups, channels)).astype(np.float32),
                             bias1=grid((groups, channels), 1 / 16, 2))}
    return [multibasis(3, channels), binary, multibasis(channels, 3)]


def check_model(layers: List[dict]):
    """An unconditional bdm model (inputs x_t, t; output eps) of the layers, with their function bodies."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bdm.export.base import functions
    from bdm.plugins import spec

    nodes = [helper.make_node("Cast", ["t"], ["t_int32"], to=TensorProto.INT32)]
    initializers = []
    value = "x_t"
    for i, layer in enumerate(layers):
        names = spec.input_names(layer["op_type"])
        inputs = {"x": value, "t": "t_int32"}
        for name, array in layer["inputs"].items():
            inputs[name] = f"layer{i}.{name}"
            initializers.append(numpy_helper.from_array(array, inputs[name]))
        value = "eps" if i == len(layers) - 1 else f"y{i}"
        nodes.append(helper.make_node(layer["op_type"], [inputs[n] for n in names], [value], name=f"layer{i}",
                                      domain=functions.DOMAIN,
                                      **functions.node_attributes(layer["op_type"], layer["attributes"])))
    dims = ["N", 3, "H", "W"]
    graph = helper.make_graph(nodes, "bdm_gpu_check",
                              [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, dims),
                               helper.make_tensor_value_info("t", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("eps", TensorProto.FLOAT, dims)], initializers)
    model = functions.attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_output(layers: List[dict], x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The layers through the NumPy reference of the op specs (bdm.plugins.reference)."""
    from bdm.plugins import reference

    value = x_t.astype(np.float32)
    for layer in layers:
        inputs = dict(layer["inputs"], x=value)
        if layer["op_type"] == "BinaryConv2d":
            inputs["t"] = t.astype(np.int32)
        value = reference.run(layer["op_type"], inputs, layer["attributes"])
    return value


def check_feed(shape, timesteps, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x_t": rng.standard_normal(shape).astype(np.float32), "t": np.array(timesteps, np.int64)}


def same_bits(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool((a.view(np.uint32) == b.view(np.uint32)).all())


def engine_check(work: Path, plugins: Path) -> int:
    """Build the check model's engine with the plugins and run it against ONNX Runtime and the reference; prints a
    line per feed and a final `key: ...` line; 0 when everything agreed bit for bit."""
    import onnx

    from bdm.errors import BdmError
    from bdm.runtime.backends import OrtRunner
    from bdm.runtime.trt.build import build_engine
    from bdm.runtime.trt.runner import TrtRunner

    work.mkdir(parents=True, exist_ok=True)
    layers = check_layers()
    onnx_path, engine_path = work / "check.onnx", work / "check.engine"
    onnx.save(check_model(layers), str(onnx_path))
    try:
        build_engine(onnx_path, engine_path, plugins=plugins, min_shape=CHECK_PROFILE[0], opt_shape=CHECK_PROFILE[1],
                     max_shape=CHECK_PROFILE[2], timing_cache=work / "timing.cache", use_cache=False, log=print)
        ort = OrtRunner(onnx_path, providers=["CPUExecutionProvider"])
        failures, modes = [], []
        with TrtRunner(engine_path, plugins=plugins, max_shapes=1) as trt:
            for i, (shape, timesteps) in enumerate(CHECK_FEEDS):
                feed = check_feed(shape, timesteps, seed=i)
                expected = reference_output(layers, feed["x_t"], feed["t"])
                y_trt = trt.to_host(trt.infer(feed)["eps"])
                y_ort = ort.infer(feed)["eps"]
                modes.append(trt.last_execution)
                verdict = {"TensorRT": same_bits(y_trt, expected), "ONNX Runtime": same_bits(y_ort, expected)}
                print(f"feed {i}: x_t {list(shape)}, t {list(timesteps)}: {trt.last_execution}; equal to the reference: "
                      + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in verdict.items())
                      + f"; max|TensorRT - reference| {float(np.abs(y_trt - expected).max()):.3g}")
                failures += [f"feed {i}: {k} differs" for k, v in verdict.items() if not v]
            if modes != CHECK_MODES:
                failures.append(f"CUDA graphs: ran {modes}, expected {CHECK_MODES}")
    except BdmError as e:
        print(f"engine check: error: {e}")
        return 1
    for failure in failures:
        print(f"engine check: {failure}")
    print(f"key: {len(CHECK_FEEDS)} feeds, 2 shapes, {len(layers)} plugin layers: "
          + ("bit-identical to ONNX Runtime and the reference" if not failures else f"{len(failures)} failures"))
    return 1 if failures else 0


# ---- entry point ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdm.runtime.engine_check", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, the engine and its caches")
    parser.add_argument("--plugins", type=Path, required=True, help="the bdm TensorRT plugin library")
    args = parser.parse_args(argv)
    return engine_check(args.work, args.plugins)


if __name__ == "__main__":
    sys.exit(main())
