"""A CpuKernels stand-in for tests only: the spec's NumPy reference (bdm.plugins.reference) behind the
CpuKernels.prepare contract, so the runner is tested on its own, and against the real kernels where they load."""

import numpy as np
import torch

from bdm.plugins import reference


class ReferenceKernels:
    isa = "numpy-reference"
    threads = 1

    def __init__(self, refuse=None):
        self.refuse = refuse or {}   # op_type -> reason, to test refusals
        self.prepared = []           # (op_type, attributes, constant names) of every prepare call

    def supports(self, op_type, attributes):
        return self.refuse.get(op_type)

    def prepare(self, op_type, attributes, constants):
        self.prepared.append((op_type, dict(attributes), sorted(constants)))

        def run(**inputs):
            feed = dict(constants, **{name: value.numpy() for name, value in inputs.items()})
            return torch.from_numpy(np.ascontiguousarray(reference.run(op_type, feed, attributes)))

        return run
