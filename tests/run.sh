#!/usr/bin/env bash
# Set-up and tests in one command (README "Run the tests"): installs the CPU build of torch, bdm itself, and
# the test and Ray extras, builds the CUDA kernels and the plugin host harness where nvcc / TensorRT headers exist,
# then runs pytest. pytest's exit code 5 (no tests collected) counts as failure.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 -e '.[test,ray]'
python3 -m pytest "$@"
