"""BI-DiffSR (Chen et al., NeurIPS 2024): a conditional UNet with 1-bit weights and activations whose binary convs
(BIConv) select timestep-aware thresholds and activations (TaR, TaA). `network` is the PyTorch network, `config` its
options and checkpoints, `onnx_export` and `validate` its `bdm export` and `bdm validate`; FAMILY registers it."""

from bdm.contract import BI_DIFFSR
from bdm.export.base.family import ModelFamily, deferred
from bdm.export.bidiffsr import config

FAMILY = ModelFamily(
    name=BI_DIFFSR,
    build=deferred(f"{__name__}.network", "build_bidiffsr"),
    claims_config=config.claims_config,
    claims_keys=config.claims_keys,
    recorded_config=lambda metadata: metadata.network_g,
    sign_sources=deferred(f"{__name__}.network", "sign_sources"),
    modes=config.MODES,
    set_mode=deferred(f"{__name__}.network", "set_mode"),
    export_checkpoint=deferred(f"{__name__}.onnx_export", "export_checkpoint"),
    compare_file=deferred(f"{__name__}.validate", "compare_file"),
    packed_inputs={"BinaryConv2d": ("weight", "alpha"), "BinarySignConv2d": ("weight", "alpha")},
)
