"""The plan's fusions (runtime/plan_fusion.py) on the exported graphs: every GroupNorm chain and SiLU fused, the
fused plan equal to the unfused one within the validation bound."""

import numpy as np

from bdm.export.validate import validation_feeds
from bdm.runtime.kernel_runner import CpuKernelRunner

from reference_kernels import ReferenceKernels  # tests/runtime

BOUND = 1e-5


def rel(reference, other):
    return float(np.abs(other - reference).max() / np.abs(reference).max())


def test_fused_plan_equals_the_unfused_plan(small_x4_onnx, unet_onnx):
    for path, feed in ((small_x4_onnx, validation_feeds((2, 16, 16), [1999], np.float32)[0]),
                       (unet_onnx["fp"], {"x_t": np.random.default_rng(2).standard_normal((2, 3, 32, 32),
                                                                                         dtype=np.float32),
                                          "t": np.array([400, 400])})):
        fused = CpuKernelRunner(path, kernels=ReferenceKernels())
        plain = CpuKernelRunner(path, kernels=ReferenceKernels(), fuse=False)
        counts = {op: [n.op_type for n in fused.plan.nodes].count(op) for op in ("GroupNorm", "SiLU")}
        assert counts["GroupNorm"] == sum(n.op_type == "InstanceNormalization" for n in plain.plan.nodes)
        assert not any(n.op_type in ("InstanceNormalization", "Sigmoid") for n in fused.plan.nodes)
        assert len(fused.plan.nodes) < len(plain.plan.nodes)
        assert rel(plain.infer(feed)["eps"], fused.infer(feed)["eps"]) <= BOUND
