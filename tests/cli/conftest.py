import warnings

import pytest


@pytest.fixture(scope="session")
def binarydm_onnx(bdm_ref, tmp_path_factory):
    """The BinaryDM UNet golden exported as `bdm export` writes it (static mode; its one sign-0 weight as +1),
    unvalidated: the export itself is tested in test_binarydm_export_cli."""
    from bdm.export import registry
    from bdm.export.base.family import ExportOptions

    case = "unet_cifar_like_w32"
    out = tmp_path_factory.mktemp("binarydm") / f"{case}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exact-zero weight, resolved by zero_weight_sign
        registry.export_checkpoint(bdm_ref / f"{case}.pt", out, bdm_ref / f"{case}.json",
                                   ExportOptions(validate=False, zero_weight_sign=1), log=lambda line: None)
    return out
