import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_REPO_REFERENCE = REPO / "tests" / "data" / "reference"  # the goldens the tests need, see tests/data/README.md


def _reference_dir():
    """$BDM_REFERENCE_DIR when set (another set of goldens in the same layout, e.g. other seeds and shapes),
    else the copy inside the repository."""
    env = os.environ.get("BDM_REFERENCE_DIR")
    return Path(env) if env else IN_REPO_REFERENCE


@pytest.fixture(scope="session")
def reference_dir():
    ref = _reference_dir()
    if not (ref / "bi_diffsr").is_dir():
        pytest.skip(f"reference data not found at {ref} (BDM_REFERENCE_DIR must name a folder with bi_diffsr/ "
                    f"and binarydm/, like tests/data/reference)")
    return ref


@pytest.fixture(scope="session")
def bi_ref(reference_dir):
    return reference_dir / "bi_diffsr"


@pytest.fixture(scope="session")
def bdm_ref(reference_dir):
    path = reference_dir / "binarydm"
    if not path.is_dir():
        pytest.skip(f"BinaryDM reference data not found at {path}")
    return path


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


@pytest.fixture(scope="session")
def small_x4_onnx(bi_ref, tmp_path_factory):
    """The reduced BI-DiffSR checkpoint exported as `bdm export` writes it (unvalidated: the export is tested in
    tests/export); a small model for jobs that need an ONNX file."""
    from bdm.export import registry
    from bdm.export.base.family import ExportOptions

    out = tmp_path_factory.mktemp("small_x4") / "ckpt_small_x4.onnx"
    registry.export_checkpoint(bi_ref / "ckpt_small_x4.pth", out, bi_ref / "ckpt_small_x4.yml",
                               ExportOptions(validate=False), log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the whole session; its address (host:port), for drivers in this
    process (already connected) and in subprocesses (`--ray-address`)."""
    import logging

    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bdm[ray]')")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def cpu_kernels():
    """The bdm CPU kernels (bdm.plugins.cpu_kernels, built on first use); skips only on a machine without a C++
    compiler: a failed build or load is a failure."""
    from bdm.plugins import cpu_kernels as module

    try:
        return module.load()
    except module.CpuKernelsUnavailable as e:
        if "needs a C++ compiler" in str(e):
            pytest.skip(str(e))
        raise
