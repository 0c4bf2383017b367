"""Fixtures of the plugin tests: one CMake build folder for the whole session (build/plugins-test under the
repository, so a second run rebuilds nothing), and the BI-DiffSR golden network's BIConv layers on their real inputs
(for the CUDA and the CPU kernels)."""

import numpy as np
import pytest
import torch

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


GOLDEN_TIMESTEPS = [1960, 1599, 1000, 400, 399]  # groups 4, 3, 2, 1, 0


@pytest.fixture(scope="module")
def golden_layer_io(bi_ref):
    """(layer name, t, BIConv, input, output) of every BIConv of the small checkpoint on net_golden's x and c,
    the network in its deploy arithmetic (the op spec's)."""
    import bdm
    from bdm.export.bidiffsr import biconvs

    model = bdm.load_model(bi_ref / "ckpt_small_x4.pth", config=bi_ref / "ckpt_small_x4.yml")
    arrays = np.load(bi_ref / "net_golden.npz")
    x_t, cond = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["c"])
    records = []
    for t0 in GOLDEN_TIMESTEPS:
        t = torch.tensor([[t0]], dtype=torch.int64)
        hooks = [module.register_forward_hook(
            lambda m, args, out, name=name, t0=t0: records.append((name, t0, m, args[0].detach(), out.detach())))
            for name, module in biconvs(model)]
        with torch.no_grad():
            model(x_t, cond, t)
        for h in hooks:
            h.remove()
    assert len(records) == 56 * len(GOLDEN_TIMESTEPS)
    return records
