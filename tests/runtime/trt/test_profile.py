"""Profile shapes of the TensorRT backend (runtime/trt/profile.py): NxHxW texts, the defaults of conditional and
unconditional models, and each input's min/opt/max shape."""

import pytest

from bdm.errors import BdmError
from bdm.runtime.trt import profile

ONNX_DIMS = {"x_t": (-1, 3, -1, -1), "cond": (-1, 3, -1, -1), "t": (-1,)}
UNCONDITIONAL_DIMS = {"x_t": (-1, 3, -1, -1), "t": (-1,)}  # BinaryDM's export: N, H, W dynamic


@pytest.mark.parametrize("text, nhw", [("1x64x64", (1, 64, 64)), (" 2X256x128 ", (2, 256, 128))])
def test_parse_nhw(text, nhw):
    assert profile.parse_nhw(text) == nhw


@pytest.mark.parametrize("text, message", [("64x64", "is not NxHxW"), ("1x60x64", "multiples of 8"),
                                           ("0x64x64", "batch must be >= 1"), ("1x64x64x3", "is not NxHxW")])
def test_parse_nhw_refuses(text, message):
    with pytest.raises(BdmError, match=message):
        profile.parse_nhw(text, "--opt-shape")


def test_profile_shapes_follow_the_onnx_inputs():
    shapes = profile.profile_shapes(ONNX_DIMS, (1, 64, 64), (1, 256, 192), (2, 512, 512))
    assert shapes["x_t"] == {"min": (1, 3, 64, 64), "opt": (1, 3, 256, 192), "max": (2, 3, 512, 512)}
    assert shapes["t"] == {"min": (1,), "opt": (1,), "max": (2,)}
    with pytest.raises(BdmError, match="axis 1 is dynamic"):
        profile.profile_shapes({"x_t": (-1, -1, -1, -1)}, (1, 64, 64), (1, 64, 64), (1, 64, 64))
    with pytest.raises(BdmError, match="need min <= opt <= max"):
        profile.profile_shapes(ONNX_DIMS, (1, 64, 64), (1, 32, 64), (1, 64, 64))


def test_unconditional_profile_shapes():
    shapes = profile.profile_shapes(UNCONDITIONAL_DIMS, *profile.resolve_profile((None, None, None), image_size=32))
    assert shapes == {"x_t": {"min": (1, 3, 32, 32), "opt": (16, 3, 32, 32), "max": (16, 3, 32, 32)},
                      "t": {"min": (1,), "opt": (16,), "max": (16,)}}


def test_resolve_profile_defaults_and_the_image_size():
    assert profile.resolve_profile((None, None, None)) == ((1, 64, 64), (1, 256, 256), (1, 512, 512))
    assert profile.resolve_profile((None, None, "4x512x1024")) == ((1, 64, 64), (1, 256, 256), (4, 512, 1024))
    # a model that samples one size: the defaults are that size; a range around it is accepted
    assert profile.resolve_profile((None, None, None), 256) == ((1, 256, 256), (16, 256, 256), (16, 256, 256))
    assert profile.resolve_profile(("1x16x16", "4x32x32", "8x64x64"), 32) == ((1, 16, 16), (4, 32, 32), (8, 64, 64))
    with pytest.raises(BdmError, match=r"samples 32x32 images .*outside the profile \(H 40 to 64, W 16 to 64\)"):
        profile.resolve_profile(("1x40x16", "1x48x32", "1x64x64"), 32)
    with pytest.raises(BdmError, match=r"--opt-shape '2x32' is not NxHxW"):
        profile.resolve_profile((None, "2x32", None), 32)
    assert profile.recorded_image_size({"bdm.sampling": '{"channels": 3, "image_size": 32, "space": "pixel"}'}) == 32
    assert profile.recorded_image_size({"bdm.family": "bi_diffsr"}) is None
