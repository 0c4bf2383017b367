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
def cpu_kernels():
    """The bdm CPU kernels (bdm.plugins.cpu_kernels, built on first use); skips with the reason where they cannot
    load."""
    from bdm.plugins import cpu_kernels as module

    try:
        return module.load()
    except module.CpuKernelsUnavailable as e:
        pytest.skip(f"the CPU kernels cannot load here: {e}")
