"""Reading a config: `read_yaml`, bdm's one reader of YAML files (network configs, official options YAMLs), and
`load_config`, a network config from a YAML file or an already loaded mapping, with one-line errors naming the file
wanted."""

from pathlib import Path
from typing import Tuple

import yaml

from bdm.errors import BdmError

# What read_yaml raises, besides OSError, for a file that is not a YAML text.
YAML_ERRORS = (yaml.YAMLError, UnicodeDecodeError)


def read_yaml(path):
    """The document of the YAML file at `path`; OSError (FileNotFoundError for a missing file) or one of YAML_ERRORS
    for the caller's one-line error."""
    return yaml.safe_load(Path(path).read_text())


def load_config(config, wanted: str) -> Tuple[object, str]:
    """(the loaded YAML, its name for messages) for a path, or (config, "the config dict") for anything else.
    `wanted` names the file a user should pass, for the one-line errors."""
    if not isinstance(config, (str, Path)):
        return config, "the config dict"
    path = Path(config)
    if not path.is_file():
        raise BdmError(f"config {path} not found: pass {wanted}")
    try:
        return read_yaml(path), str(path)
    except YAML_ERRORS as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BdmError(f"config {path} is not valid YAML ({reason}); pass {wanted}") from None
