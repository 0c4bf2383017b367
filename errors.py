"""The one error type the CLI turns into a single line and a non-zero exit."""


class BdmError(Exception):
    """A user-facing failure. The message is one line: what was asked, what exists, the fix."""
