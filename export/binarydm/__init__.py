"""BinaryDM (Zheng et al., 2024): an unconditional LDM-style UNet whose weights are one or two sign bases with
per-channel scales and whose activations are 4- or 8-bit. `layers` and `network` are the PyTorch network, `config` its
LDM YAML and checkpoints, `onnx_export` and `validate` its `bdm export` and `bdm validate`; FAMILY registers it."""

from bdm.contract import BINARYDM
from bdm.export.base.family import ModelFamily, deferred
from bdm.export.binarydm import config

FAMILY = ModelFamily(
    name=BINARYDM,
    build=deferred(f"{__name__}.network", "build_binarydm"),
    claims_config=config.claims_config,
    claims_keys=config.claims_keys,
    recorded_config=lambda metadata: metadata.unet,
    sign_sources=deferred(f"{__name__}.network", "sign_sources"),
    modes=config.MODES,
    set_mode=deferred(f"{__name__}.layers", "set_mode"),
    export_checkpoint=deferred(f"{__name__}.onnx_export", "export_checkpoint"),
    compare_file=deferred(f"{__name__}.validate", "compare_file"),
    packed_inputs={"MultiBasisConv": ("weight", "scale")},
    container_keys=("state_dict",),
    select_state=config.unet_state_dict,
    config_hint="pass --config <the LDM YAML (model.params.unet_config)>, with act_bits: 4 for a W1A4 model",
)
