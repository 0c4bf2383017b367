from bdm.errors import BdmError


def not_implemented(command: str):
    raise BdmError(f"'bdm {command}' is not implemented yet in this version")
