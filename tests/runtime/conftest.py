import warnings

import pytest


@pytest.fixture(scope="session")
def small_x4_onnx(bi_ref, tmp_path_factory):
    """The reduced BI-DiffSR checkpoint as `bdm export` writes it (fused BinaryConv2d nodes), unvalidated."""
    return _export_bidiffsr(bi_ref, tmp_path_factory, fused=True)


@pytest.fixture(scope="session")
def small_x4_unfused_onnx(bi_ref, tmp_path_factory):
    """The same checkpoint in the unfused debug form (TimestepBias -> BinarySignConv2d -> TimestepRPReLU)."""
    return _export_bidiffsr(bi_ref, tmp_path_factory, fused=False)


def _export_bidiffsr(bi_ref, tmp_path_factory, fused: bool):
    from bdm.export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("bidiffsr") / f"small_x4{'' if fused else '_unfused'}.onnx"
    export_checkpoint(bi_ref / "ckpt_small_x4.pth", out, config=bi_ref / "ckpt_small_x4.yml", fused=fused,
                      validate=False, log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def unet_onnx(bdm_ref, tmp_path_factory):
    """mode -> the BinaryDM UNet golden exported in that activation mode (its one sign-0 weight as +1)."""
    from bdm.export.binarydm_onnx import export_checkpoint

    case = "unet_cifar_like_w32"
    folder = tmp_path_factory.mktemp("binarydm")
    paths = {}
    for mode in ("static", "dynamic", "w1a32", "fp"):
        paths[mode] = folder / f"{case}_{mode}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exact-zero weight, resolved by zero_weight_sign
            export_checkpoint(bdm_ref / f"{case}.pt", paths[mode], config=bdm_ref / f"{case}.json", mode=mode,
                              validate=False, zero_weight_sign=1, log=lambda line: None)
    return paths
