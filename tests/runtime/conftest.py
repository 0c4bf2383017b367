import warnings

import pytest


@pytest.fixture(scope="session")
def small_x4_unfused_onnx(bi_ref, tmp_path_factory):
    """The reduced BI-DiffSR checkpoint in the unfused debug form (TimestepBias -> BinarySignConv2d ->
    TimestepRPReLU), as `bdm export --no-fused` writes it, unvalidated."""
    from bdm.export import registry
    from bdm.export.base.family import ExportOptions

    out = tmp_path_factory.mktemp("bidiffsr") / "small_x4_unfused.onnx"
    registry.export_checkpoint(bi_ref / "ckpt_small_x4.pth", out, bi_ref / "ckpt_small_x4.yml",
                               ExportOptions(fused=False, validate=False), log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def unet_onnx(bdm_ref, tmp_path_factory):
    """mode -> the BinaryDM UNet golden exported in that activation mode (its one sign-0 weight as +1)."""
    from bdm.export import registry
    from bdm.export.base.family import ExportOptions

    case = "unet_cifar_like_w32"
    folder = tmp_path_factory.mktemp("binarydm")
    paths = {}
    for mode in ("static", "dynamic", "w1a32", "fp"):
        paths[mode] = folder / f"{case}_{mode}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exact-zero weight, resolved by zero_weight_sign
            registry.export_checkpoint(bdm_ref / f"{case}.pt", paths[mode], bdm_ref / f"{case}.json",
                                       ExportOptions(mode=mode, validate=False, zero_weight_sign=1),
                                       log=lambda line: None)
    return paths
