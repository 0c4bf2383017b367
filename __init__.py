"""bdm: deploy binarized diffusion super-resolution models (BI-DiffSR, BinaryDM).

Public API:
    load_model(ckpt_path, config=None, family=None) -> torch.nn.Module (eval mode)
"""

__version__ = "0.1.0"


def load_model(ckpt_path, config=None, family=None):
    """Load an official checkpoint into the PyTorch reference network (see README, "Python API")."""
    from bdm.export.base.checkpoint import load_model as _load

    return _load(ckpt_path, config=config, family=family)


__all__ = ["load_model", "__version__"]
