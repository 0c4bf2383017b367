import os
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
