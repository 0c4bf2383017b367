"""The demo model shipped inside bdm: a small BI-DiffSR x4 network trained on a CPU (tools/train_demo.py), so
`bdm upscale photo.png out.png` works with no model given. runtime/models/README.md says how it was made and
how well it does (tools/eval_demo.py).

Files (package data): the official-format checkpoint `{'params': state_dict}` with its official options YAML,
and the bit-packed ONNX file `bdm export` made from them (validated against the checkpoint).
"""

from pathlib import Path

from bdm.errors import BdmError

FOLDER = Path(__file__).resolve().parent / "models"
NAME = "bi_diffsr_demo_x4"
ONNX = FOLDER / f"{NAME}.onnx"
CKPT = FOLDER / f"{NAME}.pth"
CONFIG = FOLDER / f"{NAME}.yml"
SUMMARY = "small BI-DiffSR x4 trained on a CPU for the demo; pass --onnx/--engine/--ckpt for a real model"


def onnx_path() -> Path:
    """The shipped ONNX file; a one-line error when the installation lacks it."""
    if not ONNX.is_file():
        raise BdmError(f"the bundled demo model {ONNX} is missing (bdm installed without its package data?); "
                       "reinstall bdm, or give a model with --onnx, --engine or --ckpt")
    return ONNX
