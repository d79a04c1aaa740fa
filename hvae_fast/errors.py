"""The project's one exception type: a message that names the problem and the fix."""


class HVAEError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""
