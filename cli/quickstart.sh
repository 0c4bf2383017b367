#!/usr/bin/env bash
# The main job end to end on a machine without a GPU (README "Upscale an image"): set-up, export the
# checkpoint to ONNX (validated against PyTorch), upscale a real photo x4 with ONNX Runtime on the CPU.
# Until trained BI-DiffSR weights are shipped it uses the reduced reference checkpoint (random weights,
# official format), so the picture shows the pipeline working, not the model's quality.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 -e .
ref="${BDM_REFERENCE_DIR:-../shared/reference}/bi_diffsr"
ckpt="${BDM_CKPT:-$ref/ckpt_small_x4.pth}"
config="${BDM_CONFIG:-$ref/ckpt_small_x4.yml}"
[ -f "$ckpt" ] || { echo "quickstart: no checkpoint at $ckpt; set BDM_CKPT (and BDM_CONFIG) to an official BI-DiffSR checkpoint" >&2; exit 2; }
echo "quickstart: checkpoint $ckpt (config $config)" >&2
mkdir -p out
bdm export "$ckpt" out/bi_diffsr_x4.onnx --config "$config"
bdm upscale --onnx out/bi_diffsr_x4.onnx runtime/samples/astronaut_64.png out/astronaut_x4.png --scale 4 --seed 10
echo "$(pwd)/out/astronaut_x4.png"
