"""The MultiBasisConv kernels through their C ABI (bdm.plugins.kernels.multibasis_conv) against the op spec's NumPy
reference (bdm.plugins.multibasis_reference), exact integer arithmetic, and BinaryDM's official layer goldens.

Backends "<side>-<kernel>": side "host" runs the device code's own functions on the CPU through the C ABI's host path
(every machine with nvcc): "host-simple" the straightforward kernel's per-output functions, "host-tensor_core" the
tensor-core kernel's own phases block by block with the mma emulated from the PTX ISA fragment layout; side "gpu" runs
the two CUDA kernels (skipped without a GPU). All four must be bit-identical: they share the quantizer and the
epilogue, and the class dots are exact integers however they are summed.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bdm.errors import BdmError
from bdm.plugins import kernels, spec
from bdm.plugins import multibasis_reference as ref
from multibasis_cases import (CHANNELS, FORMS, assert_conforms, attributes, exact_code_case, golden_layer_nodes,
                              ones_case, random_case)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))  # shared golden helpers of the BinaryDM tests
from binarydm_goldens import BOUND, LAYER_CASES, golden  # noqa: E402

BACKENDS = ["host-simple", "host-tensor_core", "gpu-simple", "gpu-tensor_core"]


@pytest.fixture(scope="module")
def library(kernels_library):
    return str(kernels_library)


def on_backend(backend, array):
    if backend.startswith("host"):
        return np.asarray(array)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the GPU kernels are checked on a machine with one")
    return torch.as_tensor(np.asarray(array)).cuda()


def to_numpy(y):
    return y if isinstance(y, np.ndarray) else y.cpu().numpy()


def run(library, backend, inputs, attrs):
    return to_numpy(kernels.multibasis_conv(*(on_backend(backend, a) for a in inputs), algo=backend.split("-", 1)[1],
                                            library=library, **attrs))


@pytest.mark.parametrize("act_bits", spec.op("MultiBasisConv")["attributes"]["act_bits"]["allowed"])
@pytest.mark.parametrize("num_bases", [1, 2])
@pytest.mark.parametrize("form", FORMS, ids=lambda f: "d{}_k{}_s{}_p{}".format(*f[:4]))
def test_host_path_conforms_to_the_spec_reference(library, form, num_bases, act_bits):
    for cin, cout in CHANNELS:
        inputs = random_case(cin, cout, form, num_bases, seed=cin * 100 + cout)
        attrs = attributes(cin, cout, form, num_bases, act_bits)
        assert_conforms(run(library, "host-simple", inputs, attrs), ref.multibasis_conv(*inputs, **attrs),
                        f"cin {cin} cout {cout}")


@pytest.mark.parametrize("act_bits", [0, 4, 8])
@pytest.mark.parametrize("num_bases", [1, 2])
@pytest.mark.parametrize("form", FORMS, ids=lambda f: "d{}_k{}_s{}_p{}".format(*f[:4]))
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_every_kernel_equals_the_simple_host_path_bit_for_bit(library, backend, form, num_bases, act_bits):
    """The tensor-core kernel (emulated on the host, native on a GPU) and the GPU simple kernel against the host's
    simple kernel, which conforms to the reference (above). act_bits 0 runs the float32 kernel whatever algo says."""
    for cin, cout in CHANNELS:
        inputs = random_case(cin, cout, form, num_bases, seed=cin + cout)
        attrs = attributes(cin, cout, form, num_bases, act_bits)
        ours = run(library, backend, inputs, attrs)
        simple = run(library, "host-simple", inputs, attrs)
        assert ours.tobytes() == simple.tobytes(), (f"cin {cin} cout {cout}: {int((ours != simple).sum())} of "
                                                    f"{ours.size} elements differ")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act_bits", [4, 8])
def test_codes_and_dot_products_are_exact(library, backend, act_bits):
    """exact_code_case: codes with ties and clamping, dots in exact integer arithmetic."""
    inputs, attrs, doubled = exact_code_case(act_bits)
    assert np.array_equal(run(library, backend, inputs, attrs).astype(np.float64) * 2, doubled)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_comes_after_quantization_and_adds_zero(library, backend):
    """ones_case: an interior output sums 9*C codes of 1, a corner 4*C (padded taps add 0, not a quantized pad value)."""
    inputs, attrs = ones_case()
    y = run(library, backend, inputs, attrs)[0, 0]
    cin = attrs["in_channels"]
    assert y[0, 0] == 4 * cin and y[0, 2] == 6 * cin and y[1, 1] == 9 * cin


def test_arguments_outside_the_spec_are_refused(library):
    form = (2, 3, 1, 1, (9, 7))
    inputs = random_case(40, 24, form, 2, seed=1)
    with pytest.raises(BdmError, match="invalid argument"):
        run(library, "host-simple", inputs, dict(attributes(40, 24, form, 2, 4), act_bits=3))
    with pytest.raises(BdmError, match="invalid argument"):  # stride 2 is conv2d only
        run(library, "host-simple", random_case(40, 24, FORMS[4], 2, seed=1), dict(attributes(40, 24, FORMS[4], 2, 4),
                                                                             stride=2))
    with pytest.raises(BdmError, match="algo must be one of auto, simple, tensor_core, got 'fastest'"):
        run(library, "host-fastest", inputs, attributes(40, 24, form, 2, 4))
    with pytest.raises(BdmError, match="float32 x"):
        kernels.multibasis_conv(inputs[0].astype(np.float16), *inputs[1:], library=library,
                                **attributes(40, 24, form, 2, 4))


# ---- BinaryDM's own layers: the official goldens ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAYER_CASES)
def test_every_binarydm_layer_golden(library, bdm_ref, backend, case):
    """What the exporter feeds the node (packed bases, s1/s2, bias, and the step: the stored alpha in static mode,
    2*mean|x|/sqrt(Qp) computed before the node in dynamic mode) against the official output of every mode."""
    for mode, inputs, attrs, expected in golden_layer_nodes(bdm_ref, case):
        assert_conforms(run(library, backend, inputs, attrs), expected, f"{case} {mode}")


@pytest.mark.parametrize("backend", ["gpu-simple", "gpu-tensor_core"])
def test_kernels_are_cuda_graph_capture_safe(library, backend):
    """No allocation, synchronisation or host read of act_step: a captured graph replays with a new step."""
    form = (2, 3, 1, 1, (9, 7))
    x, weight, scale, bias, act_step = (on_backend(backend, a) for a in random_case(40, 24, form, 2, seed=3))
    attrs = dict(attributes(40, 24, form, 2, 4), algo=backend.split("-", 1)[1])
    kernels.multibasis_conv(x, weight, scale, bias, act_step, library=library, **attrs)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.multibasis_conv(x, weight, scale, bias, act_step, library=library, **attrs)
    for step in (0.37, 0.11):
        act_step.fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        expected = ref.multibasis_conv(*(to_numpy(a) for a in (x, weight, scale, bias, act_step)),
                                       **attributes(40, 24, form, 2, 4))
        assert_conforms(to_numpy(y), expected.astype(np.float64), f"replay step {step}")


# ---- the golden UNet with every binarized layer run by the kernels --------------------------------------------

SPATIAL_DIMS = {"conv2d": 2, "conv1d": 1, "linear": 0}


def layer_through_kernel(library, backend, layer, x):
    """The node the exporter writes for `layer` (static: stored step; dynamic: 2*mean|x|/sqrt(Qp)), on a host backend.
    Returns y and the step the node's quantizer used (None at act_bits 0)."""
    from bdm.export.binarydm_layers import act_range, dynamic_step, effective_step

    view = layer.export_view()
    spatial_dims = SPATIAL_DIMS[view.kind]
    bits = view.act_bits or 0
    act_step = dynamic_step(x, act_range(bits)[1]) if bits and layer.mode == "dynamic" else view.act_step
    y = run(library, backend, (x.numpy(), view.packed_signs.numpy(), view.scales.numpy(), view.bias.numpy(),
                              act_step.numpy()),
            dict(in_channels=layer.in_channels, out_channels=layer.out_channels, num_bases=view.order,
                 spatial_dims=spatial_dims, kernel_size=view.weight_shape[2] if spatial_dims else 1,
                 stride=view.stride, padding=view.padding, act_bits=bits))
    step = effective_step(act_step, x.numel(), act_range(bits)[1]) if bits else None
    return torch.from_numpy(y), step


@pytest.fixture(scope="module")
def golden_unet(bdm_ref):
    """The golden UNet with its one exact-zero latent weight given sign +1 (1 bit cannot hold 0): the kernels are
    compared with this same model in PyTorch, whose layers match the official goldens (tests/export)."""
    from bdm.export.binarydm import build_binarydm
    from bdm.export.binarydm_onnx import resolve_zero_signs

    meta, state, arrays = golden(bdm_ref, "unet_cifar_like_w32")
    model = build_binarydm(meta)
    model.load_state_dict(state, strict=True)
    assert resolve_zero_signs(model, 1, "golden UNet") == 1
    return model, arrays


def run_unet(model, arrays, i, hook):
    """eps of timestep case i with `hook(path, layer, x, y) -> y or None` on every binarized layer that quantizes
    or binarizes (mode != fp)."""
    from bdm.export.binarydm import binarized_layers

    handles = [layer.register_forward_hook(lambda m, args, y, path=path: hook(path, m, args[0], y))
               for path, layer in binarized_layers(model) if layer.binarized and layer.mode != "fp"]
    try:
        with torch.no_grad():
            return model(arrays["x"][i], arrays["timesteps"][i])
    finally:
        for h in handles:
            h.remove()


@pytest.mark.slow
# the tensor-core kernel quantizes; at act_bits 0 (w1a32) every algo runs the simple kernel
@pytest.mark.parametrize("backend, mode", [("host-simple", "static"), ("host-simple", "dynamic"),
                                           ("host-simple", "w1a32"), ("host-tensor_core", "static"),
                                           ("host-tensor_core", "dynamic")])
def test_golden_unet_through_the_kernels(library, golden_unet, backend, mode):
    """Teacher-forced (each layer's own PyTorch input): every layer within the spec bound of PyTorch, every mode
    and timestep. Free-running (the kernels feed each other): w1a32 is well conditioned and must meet the bound on
    eps; W1A4 is chaotic, so where eps departs, the first layer whose activation codes differ must differ only by
    rounding-level flips (x/step within 1e-4 of a .5 midpoint in both runs), never by a wrong code."""
    from bdm.export.binarydm_layers import act_range, set_mode

    model, arrays = golden_unet
    set_mode(model, mode)
    for i, t in enumerate(arrays["timesteps"]):
        def teacher_forced(path, layer, x, y):
            ours, _ = layer_through_kernel(library, backend, layer, x)
            assert_conforms(ours.numpy(), y.numpy().astype(np.float64), f"{mode} t={int(t[0])} {path}")

        expected = run_unet(model, arrays, i, teacher_forced)
        torch_inputs, kernel_inputs = [], []
        run_unet(model, arrays, i, lambda path, layer, x, y: torch_inputs.append((path, x)))

        def free(path, layer, x, y):
            ours, step = layer_through_kernel(library, backend, layer, x)
            kernel_inputs.append((path, x, step, act_range(layer.act_bits) if step is not None else None))
            return ours

        eps = run_unet(model, arrays, i, free)
        err = float((eps - expected).abs().max()) / float(expected.abs().max())
        if err <= BOUND or mode == "w1a32":
            assert err <= BOUND, f"{mode} t={int(t[0])}: eps max|diff| {err:.3g} relative"
            continue
        for (path, x_torch), (_, x_kernel, step, grid) in zip(torch_inputs, kernel_inputs):
            if step is None:
                continue
            v_torch, v_kernel = (x / step for x in (x_torch, x_kernel))
            flipped = torch.round(v_torch.clamp(*grid)) != torch.round(v_kernel.clamp(*grid))
            if flipped.any():
                distance = max(float(((v - v.floor()) - 0.5).abs().max()) for v in (v_torch[flipped], v_kernel[flipped]))
                print(f"{mode} t={int(t[0])}: eps {err:.3g} relative; first flipped codes at {path}: "
                      f"{int(flipped.sum())}, at most {distance:.2g} from a midpoint")
                assert distance < 1e-4, f"{mode} t={int(t[0])} {path}: a code differs away from a rounding midpoint"
                break
        else:
            pytest.fail(f"{mode} t={int(t[0])}: eps differs by {err:.3g} without any flipped activation code")
