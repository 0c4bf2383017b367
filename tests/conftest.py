import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _reference_dir():
    env = os.environ.get("BDM_REFERENCE_DIR")
    return Path(env) if env else REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir():
    ref = _reference_dir()
    if not (ref / "bi_diffsr").is_dir():
        pytest.skip(f"reference data not found at {ref} (set BDM_REFERENCE_DIR to the shared/reference folder)")
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
def small_x4_onnx(bi_ref, tmp_path_factory):
    """The reduced BI-DiffSR checkpoint exported as `bdm export` writes it (unvalidated: the export is tested in
    tests/export); a small model for jobs that need an ONNX file."""
    from bdm.export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("small_x4") / "ckpt_small_x4.onnx"
    export_checkpoint(bi_ref / "ckpt_small_x4.pth", out, config=bi_ref / "ckpt_small_x4.yml", validate=False,
                      log=lambda line: None)
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
