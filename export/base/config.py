"""Reading a network config: a YAML file or an already loaded mapping, with one-line errors naming the file wanted."""

from pathlib import Path
from typing import Tuple

import yaml

from bdm.errors import BdmError


def load_config(config, wanted: str) -> Tuple[object, str]:
    """(the loaded YAML, its name for messages) for a path, or (config, "the config dict") for anything else.
    `wanted` names the file a user should pass, for the one-line errors."""
    if not isinstance(config, (str, Path)):
        return config, "the config dict"
    path = Path(config)
    if not path.is_file():
        raise BdmError(f"config {path} not found: pass {wanted}")
    try:
        return yaml.safe_load(path.read_text()), str(path)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BdmError(f"config {path} is not valid YAML ({reason}); pass {wanted}") from None
