#!/usr/bin/env bash
# The main job end to end on a machine without a GPU (README "Upscale an image"): set-up, then upscale a real
# photo x4 on the CPU (the bdm CPU kernels), with the demo model bundled in bdm (nothing beside the repository is
# needed). With BDM_CKPT (and BDM_CONFIG) set to an official BI-DiffSR checkpoint it exports that one to ONNX
# first (validated against PyTorch) and upscales with it instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 -e .
mkdir -p out
if [ -n "${BDM_CKPT:-}" ]; then
    [ -f "$BDM_CKPT" ] || { echo "quickstart: no checkpoint at $BDM_CKPT; set BDM_CKPT to an official BI-DiffSR checkpoint (and BDM_CONFIG to its options YAML)" >&2; exit 2; }
    echo "quickstart: checkpoint $BDM_CKPT${BDM_CONFIG:+ (config $BDM_CONFIG)}" >&2
    bdm export "$BDM_CKPT" out/bi_diffsr_x4.onnx ${BDM_CONFIG:+--config "$BDM_CONFIG"}
    bdm upscale --onnx out/bi_diffsr_x4.onnx runtime/samples/astronaut_64.png out/astronaut_x4.png --scale 4 --seed 10 --overwrite
else
    bdm upscale runtime/samples/astronaut_64.png out/astronaut_x4.png --seed 10 --overwrite
fi
echo "$(pwd)/out/astronaut_x4.png"
