"""Fixtures of the plugin tests: one CMake build folder for the whole session (build/plugins-test under the
repository, so a second run rebuilds nothing)."""

import pytest

from bdm.plugins import build as plugin_build
from plugin_test_support import BUILD_DIR, require_toolchain


@pytest.fixture(scope="session")
def kernels_build():
    """The kernels for every listed architecture, configured without TensorRT headers."""
    require_toolchain()
    return plugin_build.build(BUILD_DIR, tensorrt_include="")


@pytest.fixture(scope="session")
def kernels_library(kernels_build):
    return kernels_build.kernels
