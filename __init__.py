"""bdm: deploy binarized diffusion super-resolution models (BI-DiffSR, BinaryDM).

Public API:
    load_model(ckpt_path, config=None, family=None) -> torch.nn.Module (eval mode)
"""

from bdm.contract import BDM_VERSION as __version__


def load_model(ckpt_path, config=None, family=None):
    """Load an official checkpoint into the PyTorch reference network (see README, "Python API")."""
    from bdm.export.registry import load_model as _load

    return _load(ckpt_path, config=config, family=family)


__all__ = ["load_model", "__version__"]
