"""The model-file contract (bdm.contract): ModelMetadata's text form is what the exporters write and every reader
parses back, in field order, with typed values; a malformed value is one error line."""

import pytest

from bdm.contract import (BI_DIFFSR, BINARYDM, CONDITIONAL_INPUT_NAMES, FAMILY_INPUT_NAMES, UNCONDITIONAL_INPUT_NAMES,
                          ModelMetadata, metadata_key)
from bdm.errors import BdmError


def test_metadata_round_trip_in_field_order():
    recorded = ModelMetadata(format=1, family=BI_DIFFSR, dtype="fp16", fused=False, zero_weight_sign="-1",
                             binarized_convs=56, network_g={"type": "BIDiffSRUNet", "inner_channel": 8}, scale=4)
    props = recorded.to_props()
    assert list(props) == ["bdm.format", "bdm.family", "bdm.dtype", "bdm.fused", "bdm.zero_weight_sign",
                           "bdm.binarized_convs", "bdm.network_g", "bdm.scale"]
    assert props["bdm.fused"] == "0" and props["bdm.network_g"] == '{"inner_channel": 8, "type": "BIDiffSRUNet"}'
    parsed = ModelMetadata.from_props({**props, "other.key": "ignored"})
    assert parsed == recorded and parsed.zero_sign == -1
    assert ModelMetadata.from_props({}).zero_sign is None and metadata_key("scale") == "bdm.scale"


def test_malformed_values_are_one_line_errors():
    with pytest.raises(BdmError, match=r"m.onnx: metadata bdm.scale = 'x4' is not an integer; export the model again"):
        ModelMetadata.from_props({"bdm.scale": "x4"}, "m.onnx")
    with pytest.raises(BdmError, match="bdm.sampling = '{' is not a JSON object"):
        ModelMetadata.from_props({"bdm.sampling": "{"})


def test_input_names_per_family():
    assert FAMILY_INPUT_NAMES == {BI_DIFFSR: CONDITIONAL_INPUT_NAMES, BINARYDM: UNCONDITIONAL_INPUT_NAMES}
    assert CONDITIONAL_INPUT_NAMES == ("x_t", "cond", "t") and UNCONDITIONAL_INPUT_NAMES == ("x_t", "t")
